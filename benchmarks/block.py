"""Block benchmark: one MM-Rec block (B8 T4096 D1024, fp32 weights and activations, TF32 GEMMs),
forward and forward+backward, for each way of running the same graph, in one run:

- torch.compile of the eager reference model: the unfused graph under torch.compile with every
  op its plain-PyTorch reference (what a user gets from torch.compile of the model written in
  PyTorch). The recurrences' references are loops over T; they run inside their custom ops, so
  torch.compile treats them as opaque calls instead of unrolling 4096 steps (which it cannot
  compile in useful time);
- unfused, eager: `infer-shapes` only, every IR op its own call (our Triton ops on CUDA);
- torch.compile, no mmrec passes: the unfused graph under torch.compile(fullgraph=True);
- fused, eager: the default pipeline (`mmrec inspect --report` shows what it changes);
- fused + torch.compile: the default pipeline under torch.compile(fullgraph=True);
- fused without fuse-epilogue + torch.compile: the default pipeline less its SwiGLU GEMM
  epilogue (cuBLAS's GEMM, then Inductor's silu * up: the default before session 13);
- fuse-elementwise for fuse-epilogue, eager: silu * up as one generated pointwise kernel instead
  of the GEMM epilogue (under torch.compile it would be Inductor's, as without it);
- fuse-decay for fuse-decay-recurrence + torch.compile: the whole MDI decay as one kernel
  (opt-in pass, kernels/decay) and the plain gated recurrence reading gamma;
- fused without fuse-linear-residual + torch.compile: the residual adds back as separate kernels
  (the FFN norm's statistics then come from add_rstd);
- fused without fuse-linear-residual and fuse-norm-prologue + torch.compile: cuBLAS for every
  plain projection, each residual add with the norm after it (add_rmsnorm): the default until
  session 15, 1.77x fewer counted bytes than unfused against the default's 2.04x.

Also printed: the activation bytes per token the fusion report counts for the block before and
after the pipeline (passes/report.py's cost model: the kernels each op launches, each reading
its per-token inputs and writing its outputs once). With --model 125m, the same four variants time the whole
125M model's training step (forward, cross-entropy, backward) at its config's batch and length.

    python benchmarks/block.py [--model 125m [--no-block]] [--rows 3,5,6] [--profile] [--json out.json]

The issue's target compares against the first row. The third row (torch.compile around our
Triton ops, without our graph passes) isolates what the passes themselves add.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

import kernels
import models
import passes as passlib
from benchmarks.common import run_info
from models.config import Config, MemoryConfig, load_config
from passes.report import block_costs
from runtime.module import CompiledModel


def without(name: str, insert: tuple[str, str] | None = None) -> list[str]:
    """The default pipeline less the pass `name`, with `insert` = (pass, before which) added."""
    names = [p.name for p in passlib.default_pipeline() if p.name != name]
    if insert is not None:
        names.insert(names.index(insert[1]), insert[0])
    return names


UNFUSED = ["infer-shapes"]
NO_EPILOGUE = without("fuse-epilogue")
ELEMENTWISE = without("fuse-epilogue", insert=("fuse-elementwise", "dce"))
WHOLE_DECAY = without("fuse-decay-recurrence", insert=("fuse-decay", "cse"))
NO_LINEAR_RESIDUAL = without("fuse-linear-residual")
SESSION14 = [p for p in NO_LINEAR_RESIDUAL if p != "fuse-norm-prologue"]
REFERENCE = "torch.compile of the eager reference model"
ELEMENTWISE_NAME = "fuse-elementwise for fuse-epilogue, eager"
SESSION14_NAME = "fused without fuse-linear-residual and fuse-norm-prologue + torch.compile"
# (name, pipeline (None: the default one), under torch.compile, our Triton kernels)
VARIANTS = (
    (REFERENCE, UNFUSED, True, False),
    ("unfused, eager", UNFUSED, False, True),
    ("torch.compile, no mmrec passes", UNFUSED, True, True),
    ("fused, eager", None, False, True),
    ("fused + torch.compile", None, True, True),
    ("fused without fuse-epilogue + torch.compile", NO_EPILOGUE, True, True),
    (ELEMENTWISE_NAME, ELEMENTWISE, False, True),
    ("fuse-decay for fuse-decay-recurrence + torch.compile", WHOLE_DECAY, True, True),
    ("fused without fuse-linear-residual + torch.compile", NO_LINEAR_RESIDUAL, True, True),
    (SESSION14_NAME, SESSION14, True, True),
)
DEVICE = "cuda"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median")


def block_config() -> Config:
    return Config(
        name="block-d1024",
        d_model=1024,
        n_heads=16,
        n_layers=1,
        ffn_hidden=2816,
        memory=MemoryConfig(heads=4, block=64, ratio=4, slots=(64, 64, 128)),
    )


def build_model(graph, pipeline) -> CompiledModel:
    result = passlib.run_pipeline(graph, passlib.lookup(pipeline) if pipeline else passlib.default_pipeline())
    return CompiledModel(result.graph, result.stages).to(DEVICE)


def full_state(model: CompiledModel, bsz: int):
    """A state far into a stream: every memory ring full of random slots."""

    def fill(t):
        return torch.randn_like(t) if t.is_floating_point() else torch.full_like(t, 1 << 20)

    return model.initial_state(bsz, device=DEVICE).map(fill)


def profile(fwd_bwd, label: str, rows: int = 25) -> None:
    """Where one variant's forward+backward time goes: the top GPU kernels over 3 steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fwd_bwd()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fwd_bwd()
        torch.cuda.synchronize()
    print(f"  profile of {label} (3 forward+backward steps, self GPU time):")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    print("\n".join("    " + line for line in table.splitlines()), flush=True)


def block_variants(cfg: Config, bsz: int, steps: int, profiled: tuple[str, ...] = ()) -> dict:
    graph = models.build_block(cfg)
    x = torch.randn(bsz, steps, cfg.d_model, device=DEVICE, requires_grad=True)
    gx = torch.randn_like(x)
    results = {}
    for name, pipeline, compiled, triton_kernels in VARIANTS:
        kernels.knobs.use_triton = triton_kernels
        model = build_model(graph, pipeline)
        state = full_state(model, bsz)
        params = dict(model.named_parameters())
        fn, ops = model._forward_fn, model._ops[True]

        def forward(x, state, fn=fn, params=params, ops=ops):
            out = fn(x, state["h.0"], state["mem.0"], params=params, ops=ops)
            return out["x"]

        step = torch.compile(forward, fullgraph=True) if compiled else forward

        def fwd_bwd(step=step, state=state, params=params):
            for p in (*params.values(), x):
                p.grad = None
            torch.autograd.backward([step(x, state)], [gx])

        with torch.no_grad():
            f = bench(lambda step=step, state=state: step(x, state))
        fb = bench(fwd_bwd)
        if name in profiled:
            profile(fwd_bwd, name)
        costs = block_costs(model.graph)["layer0"]
        results[name] = {
            "fwd": f,
            "fwd_bwd": fb,
            "ops": costs.ops,
            "kernels": costs.kernels,
            "bytes_per_token": costs.bytes_per_token,
        }
        print(
            f"  {name:<42} fwd {f:8.3f} ms  fwd+bwd {fb:8.3f} ms  ({costs.ops} IR ops, {costs.kernels} kernels,"
            f" {costs.bytes_per_token:,} activation bytes/token counted)",
            flush=True,
        )
        del model, state, params
        torch.cuda.empty_cache()
    kernels.knobs.use_triton = True
    return results


def model_variants(cfg: Config) -> dict:
    graph = models.build(cfg)
    bsz, steps = cfg.train.batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (bsz, steps + 1), device=DEVICE)
    results = {}
    for name, pipeline, compiled, triton_kernels in VARIANTS:
        kernels.knobs.use_triton = triton_kernels
        model = build_model(graph, pipeline).train()

        def loss_fn(inp, target, model=model):
            logits, _ = model(inp)
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())

        step_fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn

        def train_step(step_fn=step_fn, model=model):
            model.zero_grad(set_to_none=True)
            step_fn(tokens[:, :-1], tokens[:, 1:]).backward()

        ms = bench(train_step)
        results[name] = {"train_step": ms}
        print(f"  {name:<42} train step {ms:8.2f} ms ({bsz * steps / ms:,.0f}k tokens/s)", flush=True)
        del model
        torch.cuda.empty_cache()
    kernels.knobs.use_triton = True
    return results


def ratios(results: dict, key: str) -> None:
    for baseline in (REFERENCE, "torch.compile, no mmrec passes"):
        if baseline not in results:
            continue
        base = results[baseline][key]
        for name, r in results.items():
            print(f"  {name:<42} {key}: {base / r[key]:6.2f}x the speed of {baseline}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="also time this model's training step (e.g. 125m)")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of the fused variants")
    parser.add_argument("--no-block", action="store_true", help="with --model: time the model's step only")
    parser.add_argument("--rows", default=None, help="run only these rows (1-based, as listed above), e.g. 3,5,6")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rows:
        global VARIANTS
        VARIANTS = tuple(VARIANTS[int(i) - 1] for i in args.rows.split(","))
    info = run_info("benchmarks/block.py")
    torch.set_float32_matmul_precision("high")  # TF32 GEMMs, as fp32 training on Hopper runs them
    torch.manual_seed(0)
    payload = {"info": info}
    if not (args.no_block and args.model):
        cfg = block_config()
        bsz, steps = 8, 4096
        shape = f"B{bsz} T{steps} D{cfg.d_model} H{cfg.n_heads} ffn {cfg.ffn_hidden}"
        print(f"one block: {shape} fp32 ({cfg.recurrence} recurrence)")
        profiled = ("fused, eager", "fused + torch.compile", SESSION14_NAME) if args.profile else ()
        payload["block"] = block_variants(cfg, bsz, steps, profiled)
        ratios(payload["block"], "fwd_bwd")
        unfused = payload["block"].get("unfused, eager", {}).get("bytes_per_token")
        for name in (
            "fused, eager",
            "fused without fuse-epilogue + torch.compile",
            ELEMENTWISE_NAME,
            "fuse-decay for fuse-decay-recurrence + torch.compile",
            "fused without fuse-linear-residual + torch.compile",
            SESSION14_NAME,
        ):
            if unfused is None or name not in payload["block"]:
                continue
            saved = unfused / payload["block"][name]["bytes_per_token"]
            print(f"  counted activation bytes/token: unfused / {name} = {saved:.2f}x")
    if args.model:
        model_cfg = load_config(args.model)
        print(f"{model_cfg.name}: training step B{model_cfg.train.batch_size} T{model_cfg.train.seq_len} fp32")
        payload["model"] = model_variants(model_cfg)
        ratios(payload["model"], "train_step")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
