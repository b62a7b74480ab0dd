"""Memory-query benchmark: our hds_query (all levels, level biases, banded visibility, GQA) vs
F.scaled_dot_product_attention over the same number of keys, one run: by torch's own pick of
backend (cuDNN's flash kernels on the H200) and with the FlashAttention and cuDNN backends forced.

    python benchmarks/memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

import kernels
from benchmarks.common import graph_time, run_info, spread, under_load
from kernels.memory import reference


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def full_memory(spec: kernels.MemorySpec, bsz: int, dtype, position: int | None = None) -> kernels.Memory:
    """Rings of random slots at `position` tokens into a stream (default: far enough that every
    level is full)."""
    mem = kernels.Memory.empty(spec, bsz, device="cuda", dtype=dtype)
    mem.keys = [torch.randn_like(t) for t in mem.keys]
    mem.values = [torch.randn_like(t) for t in mem.values]
    position = spec.span(len(spec.slots) - 1) * 4096 if position is None else position
    mem.pos = torch.full((bsz,), position, device="cuda", dtype=torch.int64)
    return mem


def _sdpa_times(qs, ks, vs, grad, backend: str | None) -> tuple[float, float]:
    """SDPA's forward and forward+backward times, by torch's pick or with `backend` forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
        with torch.no_grad():
            fwd = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs))

        return fwd, bench(lambda: _sdpa_step(qs, ks, vs, grad))


def _sdpa_step(qs, ks, vs, grad) -> None:
    """SDPA's forward+backward as our side's step runs it: the inputs' gradients reset first."""
    for t in (qs, ks, vs):
        t.grad = None
    F.scaled_dot_product_attention(qs, ks, vs).backward(grad)


def _alternating(ours_f, ours_fb, qs, ks, vs, grad, rounds: int = 5, graphs: bool = False) -> str:
    """Our attention kernels against SDPA's default in `rounds` rounds, each timing the four calls
    back to back: the median and range of the per-round ratios. One pair of timings drifts by a
    few percent from run to run on the same tree (1.20x-1.26x forward+backward, BENCHMARKS.md,
    sessions 26-31), as much as our distance from the 1.25x target. `graphs`: each call timed as
    a CUDA-graph replay (autograd's backward captured too), so that neither side's host time
    shows: eager timings of our forward+backward follow the device machine's host when it is slow
    (1.33x against 1.25x on the same kernels, session 32)."""

    def sdpa_step():
        _sdpa_step(qs, ks, vs, grad)

    def sdpa_f():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qs, ks, vs)

    def ours_f_no_grad():
        with torch.no_grad():
            return ours_f()

    timed = _graph_time if graphs else bench
    fwd, fwd_bwd = [], []
    for _ in range(rounds):
        fwd.append(timed(ours_f_no_grad) / timed(sdpa_f))
        fwd_bwd.append(timed(ours_fb) / timed(sdpa_step))
    how = "CUDA-graph replays" if graphs else "eager"
    return (
        f"attention kernels / SDPA default, {rounds} alternating rounds ({how}): fwd {spread(fwd)}, "
        f"fwd+bwd {spread(fwd_bwd)}"
    )


def _sdpa_kernel(qs, ks, vs) -> str:
    """The GPU kernel that takes most of SDPA's default forward (from the profiler)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(qs, ks, vs)
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return max(kernels_, key=lambda e: e.device_time_total).key[:100] if kernels_ else "unknown"


def _graph_time(fn) -> float:
    return graph_time(fn, bench)


def decode_section(spec: kernels.MemorySpec, heads: int, dtype) -> list[tuple]:
    """Per-token memory query (T = 1: the decode kernel reading the rings in place) and memory
    write at growing context lengths, eager and as CUDA-graph replays: the rings have a fixed
    size, so the time must not grow with the context."""
    rows = []
    print(
        "decode: one token per call; query = decode kernel over the rings; "
        "write = memory_write (T = 1), functional and in place"
    )
    # The floor of any per-token op: one graph replay of one tiny kernel, measured here.
    tick = torch.zeros(1, device="cuda")
    launch = _graph_time(lambda: tick.add_(1))
    print(f"  one-kernel CUDA-graph replay (the launch floor): {launch * 1e3:.1f} us")
    for bsz in (1, 64, 256):
        for context in (1_000, 16_000, 262_000, 1_000_000):
            mem = full_memory(spec, bsz, dtype, context)
            q = torch.randn(bsz, 1, heads * spec.dim, device="cuda", dtype=dtype)
            k = torch.randn(bsz, 1, spec.heads * spec.dim, device="cuda", dtype=dtype)
            beta = torch.zeros(heads, len(spec.slots), device="cuda", dtype=dtype)
            with torch.no_grad():

                def query(q=q, k=k, beta=beta, mem=mem):
                    return kernels.hds_query(q, k, k, beta, mem, heads)

                def write(k=k, mem=mem):
                    return kernels.memory_write(mem, k, k)

                own = mem.map(lambda t: t.clone())  # the in-place write advances its memory

                def write_in_place(k=k, mem=own):
                    return kernels.memory_write_(mem, k, k)

                eager = bench(query)
                replay = _graph_time(query)
                write_replay = _graph_time(write)
                in_place = _graph_time(write_in_place)
            rows.append((bsz, context, eager, replay, write_replay, in_place))
            us = f"query eager {eager * 1e3:7.1f} us, CUDA graph {replay * 1e3:6.1f} us"
            us += f"; write: functional {write_replay * 1e3:6.1f} us, in place {in_place * 1e3:5.1f} us"
            us += f" ({in_place / launch:.1f}x one launch)"
            print(f"  B{bsz:<4} context {context:>9,} tokens: {us}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-decode", action="store_true", help="skip the per-token decode section")
    args = parser.parse_args()
    bsz, heads, steps, dim, dtype = 8, 16, 4096, 64, torch.bfloat16
    # 240 + 240 + 460 ring slots, plus the 64 + 16 + 4 slots this segment completes: 1024 keys.
    spec = kernels.MemorySpec(heads=heads, dim=dim, block=64, ratio=4, slots=(240, 240, 460))
    info = run_info("benchmarks/memory.py")
    torch.manual_seed(0)
    mem = full_memory(spec, bsz, dtype)
    q = torch.randn(bsz, steps, heads * dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(bsz, steps, heads * dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(bsz, steps, heads * dim, device="cuda", dtype=dtype, requires_grad=True)
    beta = torch.zeros(heads, 3, device="cuda", dtype=dtype, requires_grad=True)
    n_keys = reference.candidates(mem, k, v).keys.shape[2]
    print(f"hds_query B{bsz} H{heads} T{steps} Dh{dim} {n_keys} candidate slots (3 levels) bf16")

    with torch.no_grad():
        ours = kernels.hds_query(q, k, v, beta, mem, heads)
        expect = reference.hds_query(
            q[:1, :512].float(),
            k[:1, :512].float(),
            v[:1, :512].float(),
            beta.float(),
            mem.map(lambda t: t[:1].float() if t.is_floating_point() else t[:1]),
            heads,
        )
        err = ((ours[:1, :512].float() - expect).norm() / expect.norm()).item()
    assert err < 2e-2, f"hds_query disagrees with the reference: rel err {err:.2e}"

    grad = torch.randn_like(q)
    with torch.no_grad():
        ours_f = bench(lambda: kernels.hds_query(q, k, v, beta, mem, heads))

    def ours_step():
        for t in (q, k, v, beta):
            t.grad = None
        kernels.hds_query(q, k, v, beta, mem, heads).backward(grad)

    ours_fb = bench(ours_step)

    qs = torch.randn(bsz, heads, steps, dim, device="cuda", dtype=dtype, requires_grad=True)
    ks = torch.randn(bsz, heads, n_keys, dim, device="cuda", dtype=dtype, requires_grad=True)
    vs = torch.randn(bsz, heads, n_keys, dim, device="cuda", dtype=dtype, requires_grad=True)
    grad_s = grad.view(bsz, steps, heads, dim).transpose(1, 2)
    # SDPA by torch's own pick (cuDNN's sm90 kernels on the H200 with torch 2.11) and by each
    # fast backend forced: the issue names the FlashAttention backend, its anchor matches cuDNN's.
    sdpa = {}
    for name, backend in (("default", None), ("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
        try:
            sdpa[name] = _sdpa_times(qs, ks, vs, grad_s, backend)
        except RuntimeError as e:  # a backend this build or GPU lacks: say so, time the others
            print(f"  SDPA {name}: not timed ({str(e).splitlines()[0][:100]})")
    sdpa_f, sdpa_fb = sdpa["default"]

    # The same call under torch.compile: the small PyTorch ops that build the candidates fuse
    # (our ops stay opaque); in eager mode they are ~100 launches, CPU-bound.
    compiled = torch.compile(lambda q, k, v, beta: kernels.hds_query(q, k, v, beta, mem, heads), fullgraph=True)
    with torch.no_grad():
        compiled(q, k, v, beta)
        comp_f = bench(lambda: compiled(q, k, v, beta))

    def compiled_step():
        for t in (q, k, v, beta):
            t.grad = None
        compiled(q, k, v, beta).backward(grad)

    comp_fb = bench(compiled_step)

    # The compiled call again as CUDA-graph replays (torch.cuda.make_graphed_callables): GPU
    # time without the host's launch gaps, which the wall-clock rows above include.
    try:
        graphed = torch.cuda.make_graphed_callables(compiled, (q, k, v, beta))

        def graphed_step():
            for t in (q, k, v, beta):
                t.grad = None
            graphed(q, k, v, beta).backward(grad)

        with torch.no_grad():
            graph_f = _graph_time(lambda: compiled(q, k, v, beta))
        graph_fb = bench(graphed_step)
    except Exception as e:  # capture is not guaranteed for every torch build; say so and go on
        print(f"  CUDA-graph rows skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        graph_f = graph_fb = None

    # Where our time goes: building the candidates (PyTorch) vs the attention kernels alone.
    with torch.no_grad():
        cand_f = bench(lambda: reference.candidate_kv(mem, k, v, sums0=kernels.memory.op.block_sums))
    cand = reference.candidates(mem, k.detach(), v.detach())
    keys = cand.keys.contiguous().requires_grad_()
    values = cand.values.contiguous().requires_grad_()
    levels = (list(spec.slots), [spec.span(lvl) for lvl in range(len(spec.slots))])

    def attend():
        return torch.ops.mmrec.hds_attend_fwd(q, keys, values, beta, mem.pos, *levels, heads)[0]

    with torch.no_grad():
        attend_f = bench(attend)

    def attend_step():
        for t in (q, keys, values, beta):
            t.grad = None
        attend().backward(grad)

    attend_fb = bench(attend_step)
    # The backward modes side by side (MMREC_MEMORY_BWD; attend_bwd alone, CUDA-graph replays):
    # what auto's choice rests on (kernels/memory/kernel.py, _bwd_mode).
    with torch.no_grad():
        out, lse = kernels.memory.kernel.attend_fwd(q, keys, values, beta, mem.pos, *levels, heads)
    modes, saved = {}, kernels.knobs.memory_bwd
    for mode in ("split", "fused-tma", "fused", "auto"):
        kernels.knobs.memory_bwd = mode
        try:
            with torch.no_grad():
                modes[mode] = _graph_time(
                    lambda: kernels.memory.kernel.attend_bwd(
                        q, keys, values, beta, mem.pos, *levels, out, lse, grad, heads
                    )
                )
        except Exception as e:  # a mode this GPU cannot run: say so, time the others
            print(f"  backward {mode}: not timed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        finally:
            kernels.knobs.memory_bwd = saved
    print("  attention backward alone, CUDA-graph replays: " + ", ".join(f"{m} {t:.3f} ms" for m, t in modes.items()))
    rows = [
        ("mmrec hds_query (Triton + candidates)", ours_f, ours_fb),
        ("mmrec hds_query under torch.compile", comp_f, comp_fb),
        *([("  the same, CUDA-graph replays", graph_f, graph_fb)] if graph_f is not None else []),
        ("  of which: attention kernels", attend_f, attend_fb),
        ("  of which: candidates (eager PyTorch + block sums)", cand_f, None),
        ("SDPA, same key count (torch's pick)", sdpa_f, sdpa_fb),
        *((f"  SDPA, {name} backend forced", *sdpa[name]) for name in ("flash", "cudnn") if name in sdpa),
    ]
    for name, f, fb in rows:
        print(f"  {name:<40} fwd {f:8.3f} ms   fwd+bwd {'-' if fb is None else f'{fb:8.3f}'} ms")
    print(f"  ours / SDPA: fwd {ours_f / sdpa_f:.2f}x, fwd+bwd {ours_fb / sdpa_fb:.2f}x (rel err {err:.1e})")
    print(f"  compiled / SDPA: fwd {comp_f / sdpa_f:.2f}x, fwd+bwd {comp_fb / sdpa_fb:.2f}x")
    if graph_f is not None:
        print(f"  compiled, CUDA graphs / SDPA: fwd {graph_f / sdpa_f:.2f}x, fwd+bwd {graph_fb / sdpa_fb:.2f}x")
    for name, (f, fb) in sdpa.items():
        print(f"  attention kernels / SDPA {name}: fwd {attend_f / f:.2f}x, fwd+bwd {attend_fb / fb:.2f}x")
    print("  " + _alternating(attend, attend_step, qs, ks, vs, grad_s))
    try:
        print("  " + _alternating(attend, attend_step, qs, ks, vs, grad_s, graphs=True))
    except Exception as e:  # a capture that fails must not cost the rows above
        print(f"  alternating rounds as CUDA-graph replays: not timed ({type(e).__name__}: {str(e)[:120]})")
    # Both sides run at the board's power cap; a side that spends more energy gets a lower clock.
    print("  under load, 2 s of back-to-back calls each (SM clock and board power by nvidia-smi):")
    with torch.no_grad():
        print(f"    attention kernels fwd: {under_load(attend)}")
        print(f"    SDPA default fwd:      {under_load(lambda: F.scaled_dot_product_attention(qs, ks, vs))}")
    print(f"    attention kernels fwd+bwd: {under_load(attend_step)}")
    print(f"    SDPA default fwd+bwd:      {under_load(lambda: _sdpa_step(qs, ks, vs, grad_s))}")
    decode = None if args.no_decode else decode_section(spec, heads, dtype)
    # Last: the profiler leaves CUPTI hooks behind that slow every later launch.
    print(f"SDPA's default pick here: {_sdpa_kernel(qs, ks, vs)}")
    if args.json:
        payload = {"info": info, "rows": rows, "rel_err": err, "decode": decode}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
