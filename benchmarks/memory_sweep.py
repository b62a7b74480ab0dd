"""Tile sweep for the memory-query kernels at the benchmark shape: the forward, the dq kernel
and the dk/dv kernel timed apart for every tile config, each checked against the default
config's result before it is timed. This is how kernels/memory/kernel.py's tiles are chosen.

    python benchmarks/memory_sweep.py [--only fwd,dq,dkv,dkv_fused,sums] [--dtype bf16|fp32] [--no-tma]
                                      [--sustained] [--sizes 64x32,128x32] [--warps 4]

--sustained times each config as training runs it, back to back for 1.5 s at the board's power
cap, and prints the SM clock and power beside the time (`common.sustained`): a tile that spends
less energy runs at a higher clock, which do_bench's flushed single calls show less (BENCHMARKS.md,
session 33: the forward's 128 x 32 tile).
"""

from __future__ import annotations

import argparse
import math
import sys
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

from benchmarks.common import checked_time, run_info, sustained
from benchmarks.memory import bench, full_memory
from kernels import MemorySpec
from kernels.memory import kernel, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fwd,dq,dkv,sums", help="comma-separated: fwd, dq, dkv, dkv_fused, sums")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="fp32: TF32 products")
    parser.add_argument("--no-tma", action="store_true", help="pointer slot loads only (TMA is opt-in)")
    parser.add_argument("--sustained", action="store_true", help="time back to back at the power cap, with clocks")
    parser.add_argument("--sizes", default=None, help="only these BLOCK_TxBLOCK_S tiles, e.g. 64x32,128x32")
    parser.add_argument("--warps", default=None, help="only these warp counts, e.g. 4 or 4,8")
    args = parser.parse_args()
    only = args.only.split(",")
    run_info("benchmarks/memory_sweep.py")
    bsz, heads, steps, dim = 8, 16, 4096, 64
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")  # as in fp32 training (benchmarks/block.py)
    spec = MemorySpec(heads=heads, dim=dim, block=64, ratio=4, slots=(240, 240, 460))
    torch.manual_seed(0)
    mem = full_memory(spec, bsz, dtype)
    q, k, v, dout = (torch.randn(bsz, steps, heads * dim, device="cuda", dtype=dtype) for _ in range(4))
    beta = torch.randn(heads, 3, device="cuda", dtype=dtype)
    cand = reference.candidates(mem, k, v)
    keys, values = cand.keys.contiguous(), cand.values.contiguous()
    rings, spans = list(spec.slots), [spec.span(lvl) for lvl in range(3)]
    out, lse = kernel.attend_fwd(q, keys, values, beta, mem.pos, rings, spans, heads)
    want = kernel.attend_bwd(q, keys, values, beta, mem.pos, rings, spans, out, lse, dout, heads)
    lv = kernel.Levels.get(rings, spans, steps, q.device)
    stats = torch.empty(2, bsz, heads, steps, device="cuda")  # written by the dq kernel
    meta = kernel._meta(dim, dtype)
    n_slots = keys.shape[2]
    common = (steps, n_slots, 3, heads, 1, kernel.LOG2E / math.sqrt(dim), 1 / math.sqrt(dim))
    levels = {"RINGS": tuple(rings), "SPANS": tuple(spans)}  # the forward's constexprs
    print(f"B{bsz} H{heads} T{steps} Dh{dim} {n_slots} slots {args.dtype}")
    tma = kernel._tma_ok(keys, values)
    print(f"defaults (TMA {tma}):", {kind: kernel._tiles(kind, dtype, tma) for kind in ("fwd", "dq", "dkv")})

    def slot_args(bs, tma):
        """The slot-tile descriptors (TMA) or the plain tensors in their place."""
        descs = kernel._descriptors(keys, values, bs, meta["BLOCK_D"]) if kernel._tma_ok(keys, values, tma) else None
        return (*(descs or (keys, values)),), {"TMA": descs is not None}

    def run_fwd(bt, bs, w, st, tma=False, reg=None):
        o, ls = torch.empty_like(out), torch.empty_like(lse)
        grid = (triton.cdiv(steps, bt), bsz * heads)
        descs, flag = slot_args(bs, tma)
        args = (q, keys, values, beta, mem.pos, *descs, o, ls, steps, n_slots, heads, 1, common[5], q)
        tiles = dict(BLOCK_T=bt, BLOCK_S=bs, num_warps=w, num_stages=st, **flag, **({"maxnreg": reg} if reg else {}))
        return (lambda: kernel._attend_fwd[grid](*args, **levels, **tiles, **meta)), o, out

    def run_dq(bt, bs, w, st, tma=False, reg=None):
        grid = (triton.cdiv(steps, bt), bsz * heads)
        dq, db = torch.empty_like(q), torch.empty(*grid, 3, device="cuda")  # dbeta: a part per program
        descs, flag = slot_args(bs, tma)
        args = (q, keys, values, beta, mem.pos, lv.start, lv.ring, lv.span, *descs, lse, out, stats, dout, dq, db)
        tiles = dict(BLOCK_T=bt, BLOCK_S=bs, num_warps=w, num_stages=st, **flag, **({"maxnreg": reg} if reg else {}))
        return (lambda: kernel._attend_bwd_dq[grid](*args, *common, q, **tiles, **meta)), dq, want[0]

    def run_dkv(bt, bs, w, st, tma=False, reg=None):  # no TMA: its loop loads no slot tiles
        dk, dv = torch.empty_like(keys), torch.empty_like(values)
        level, i0 = lv.tiles(bs)
        grid = (level.numel(), bsz * heads)
        # q and beta stand in for the fused backward's dq buffer and dbeta (unused with DQ=0)
        args = (q, keys, values, beta, mem.pos, lv.start, lv.ring, lv.span, level, i0, stats, dout, dk, dv, q, beta)
        tiles = dict(BLOCK_T=bt, BLOCK_S=bs, num_warps=w, num_stages=st, **({"maxnreg": reg} if reg else {}))
        even = {"EVEN_T": steps % bt == 0}  # as attend_bwd launches it
        return (lambda: kernel._attend_bwd_dkv[grid](*args, *common, **tiles, **meta, **even)), dk, want[1]

    def run_dkv_fused(bt, bs, w, st, tma=False, reg=None):
        """The fused backward's dk/dv kernel (MMREC_MEMORY_BWD=fused-tma on Hopper, else fused),
        checked on the dq it adds up."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        dk, dv = torch.empty_like(keys), torch.empty_like(values)
        dq, db = torch.zeros(q.shape, device="cuda"), torch.zeros(heads, 3, device="cuda")
        mode = 2 if torch.cuda.get_device_capability()[0] >= 9 else 1
        dq_arg = TensorDescriptor.from_tensor(dq, [1, bt, meta["BLOCK_D"]]) if mode == 2 else dq
        level, i0 = lv.tiles(bs)
        grid = (level.numel(), bsz * heads)
        args = (q, keys, values, beta, mem.pos, lv.start, lv.ring, lv.span, level, i0, stats, dout, dk, dv, dq_arg, db)
        tiles = dict(BLOCK_T=bt, BLOCK_S=bs, num_warps=w, num_stages=st, **({"maxnreg": reg} if reg else {}))

        def run():
            dq.zero_()  # part of the fused backward's cost
            kernel._attend_bwd_dkv[grid](*args, *common, **tiles, **meta, DQ=mode, EVEN_T=steps % bt == 0)

        return run, dq, want[0]

    sizes = [(bt, bs) for bt in (32, 64, 128) for bs in (32, 64, 128) if bt * bs <= 16384]
    if args.sizes:  # a sustained sweep takes 1.5 s a config: a device call holds a few dozen
        wanted = set(args.sizes.split(","))
        sizes = [(bt, bs) for bt, bs in sizes if f"{bt}x{bs}" in wanted]
    # (BLOCK_T, BLOCK_S, warps, stages, TMA, maxnreg); caps of 128 (168) registers let four (three)
    # 4-warp programs share an SM.
    warps = [int(w) for w in args.warps.split(",")] if args.warps else (4, 8)
    tiling = [(w, st, reg) for w in warps for st in (2, 3) for reg in (None, 128, 168)]
    tmas = (0,) if args.no_tma else (0, 1)
    configs = {
        "fwd": [(*c, *t[:2], tma, t[2]) for c in sizes if c[0] >= 64 for t in tiling for tma in tmas],
        "dq": [(*c, *t[:2], tma, t[2]) for c in sizes if c[1] <= 64 for t in tiling for tma in tmas],
        "dkv": [(*c, *t[:2], 0, t[2]) for c in sizes for t in tiling],
        "dkv_fused": [(*c, *t[:2], 0, t[2]) for c in sizes for t in tiling],
    }
    launchers = {"fwd": run_fwd, "dq": run_dq, "dkv": run_dkv, "dkv_fused": run_dkv_fused}
    clock = ""  # --sustained: the clock and power of the config last timed

    def sustained_ms(run) -> float:
        nonlocal clock
        got = sustained(run, 1.5)
        if isinstance(got, str):  # no clock to read: the time alone, by do_bench
            clock = f" ({got})"
            return bench(run)
        clock = f" at {got[1]:.0f} MHz, {got[2]:.0f} W"
        return got[0] / 1e3

    timer = sustained_ms if args.sustained else bench
    run_dq(64, 32, 4, 3)[0]()  # fills stats for the dk/dv configs (the fused backward's stats are the same)
    for name, launcher in launchers.items():
        if name not in only:
            continue
        best = None
        for c in configs[name]:
            label = f"{name:4} BLOCK_T {c[0]:3} BLOCK_S {c[1]:3} warps {c[2]} stages {c[3]}"
            label += (" TMA" if c[4] else "") + (f" maxnreg {c[5]}" if c[5] else "")
            clock = ""
            ms = checked_time(label, lambda launcher=launcher, c=c: launcher(*c), timer, 1e-2)
            if ms is None:
                continue
            print(f"  {label}: {ms:.3f} ms{clock}", flush=True)
            best = min(best or (ms, label), (ms, label))
        print(f"best {best[1]}: {best[0]:.3f} ms", flush=True)

    if "sums" not in only:
        return
    # Level-0 token sums of k [B, T, K*Dh]: k is read once, so the floor is half a copy of k.
    span, n_out = spec.block, steps // spec.block + 1
    floor = bench(lambda: torch.empty_like(k).copy_(k)) / 2
    want = kernel.block_sums(k, mem.pos, span)
    print(f"block_sums [{bsz}, {steps}, {k.shape[2]}] {args.dtype}, span {span}; read floor {floor:.4f} ms")
    for (bt, bw), w in product(product((16, 32, 64), (128, 256, 512)), (4, 8)):
        label = f"sums BLOCK_T {bt:3} BLOCK_W {bw:3} warps {w}"

        def make(bt=bt, bw=bw, w=w):
            got = torch.empty_like(want)
            grid = (bsz * n_out, triton.cdiv(k.shape[2], bw))
            tiles = dict(BLOCK_T=bt, BLOCK_W=bw, num_warps=w)
            args = (k, mem.pos, got, steps, k.shape[2], n_out, span)
            return (lambda: kernel._block_sums[grid](*args, **tiles)), got, want

        ms = checked_time(label, make, bench, 1e-4)
        if ms is not None:
            print(f"  {label}: {ms:.4f} ms ({ms / floor:.2f}x the floor)", flush=True)


if __name__ == "__main__":
    main()
