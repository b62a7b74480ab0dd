"""Decode benchmark: one generated token per row through a whole model, per step, in one run:

- functional, eager: `logits, state = model(token, state)`, each op launched from Python and a
  new state (every memory ring rebuilt) per step;
- DecodeSession: the state updated in place and the step replayed as one CUDA graph;
- the floor: reading every weight once per step (parameter bytes at the copy bandwidth
  measured in this run), which any decoder of this model pays at small batch.

Before timing, the session's logits are checked against the functional path over 40 tokens.

    python benchmarks/decode.py [--config 125m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

import models
import runtime
from benchmarks.common import run_info
from runtime.session import DecodeSession


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")


@torch.no_grad()
def check(model, vocab: int) -> float:
    """Max |logit difference| of session vs functional decoding after a 24-token prefill."""
    tokens = torch.randint(0, vocab, (2, 40), device="cuda")
    _, state = model(tokens[:, :24])
    session = DecodeSession(model, batch=2)
    session.prefill(tokens[:, :24])
    worst = 0.0
    for t in range(24, 40):
        want, state = model(tokens[:, t : t + 1], state)
        got = session.step(tokens[:, t], check=False)
        worst = max(worst, (got - want[:, -1]).abs().max().item())
    assert session.graphed, "the session did not capture a CUDA graph"
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="125m")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = run_info("benchmarks/decode.py")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = models.load_config(args.config)
    model = runtime.compile(models.build(cfg), mode="infer").cuda()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(weight_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src))  # reads and writes the weight bytes: 2 passes
    floor = copy / 2
    print(f"{args.config}: {weight_bytes / 1e6:.0f} MB of fp32 weights; floor (read them once) {floor * 1e3:.1f} us")
    err = check(model, cfg.vocab_size)
    print(f"session vs functional logits over 16 steps: max |diff| {err:.1e}")

    rows = []
    for bsz in (int(b) for b in args.batches.split(",")):
        tokens = torch.randint(0, cfg.vocab_size, (bsz, 64), device="cuda")
        with torch.no_grad():
            _, state = model(tokens)
            token = tokens[:, -1:]
            functional = bench(lambda state=state, token=token: model(token, state))
            session = DecodeSession(model, batch=bsz)
            session.prefill(tokens)
            session.step(token[:, 0], check=False)  # captures
            graphed = bench(lambda session=session, token=token: session.step(token[:, 0], check=False))
        rows.append({"batch": bsz, "functional_ms": functional, "session_ms": graphed, "floor_ms": floor})
        print(
            f"  B{bsz:<4} functional eager {functional * 1e3:8.1f} us   session (CUDA graph) {graphed * 1e3:7.1f} us"
            f"   = {functional / graphed:5.1f}x faster, {graphed / floor:4.1f}x the weight-read floor",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "max_abs_diff": err, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
