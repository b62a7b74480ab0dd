"""Tile sweep for the linear-scan kernels: every launch config, forward and backward timed
separately against the copy floor (3 and 5 passes over B*T*C elements).

    python benchmarks/scan_sweep.py [--B 8 --T 4096 --C 2048]

Each config is checked against the reference before it is timed (a wrong config is reported,
not timed). This is how the configs in kernels/scan/kernel.py were chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

from benchmarks.common import checked_time, run_info
from kernels.scan import kernel, reference


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--C", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="only tiles of <= 2048 elements and <= 2 warps")
    parser.add_argument("--only", choices=["fwd", "bwd"], default=None, help="sweep one direction")
    args = parser.parse_args()
    run_info("benchmarks/scan_sweep.py")
    bsz, steps, width = args.B, args.T, args.C
    dtype = torch.bfloat16
    torch.manual_seed(0)
    log_a = (-torch.rand(bsz, steps, width, device="cuda") * 0.5).to(dtype)
    x = torch.randn(bsz, steps, width, device="cuda", dtype=dtype)
    h0 = torch.randn(bsz, width, device="cuda", dtype=dtype)
    dh = torch.randn_like(x)
    dh_last = torch.randn_like(h0)
    ref_h, _ = reference.forward(log_a.float(), x.float(), h0.float())
    ref_g = reference.backward(log_a.float(), ref_h, h0.float(), dh.float(), dh_last.float())
    h_bf = ref_h.to(dtype)

    n = bsz * steps * width
    src = torch.randn(n, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src))
    floor_f, floor_b = copy * 3 / 2, copy * 5 / 2
    print(f"B{bsz} T{steps} C{width} bf16: copy {copy:.3f} ms -> floor fwd {floor_f:.3f}, bwd {floor_b:.3f}")

    def launcher(direction: str, bt: int, bc: int, w: int, stages: int):
        grid = (bsz, triton.cdiv(width, bc))
        meta = dict(HAS_H0=True, BLOCK_T=bt, BLOCK_C=bc, STAGES=stages, num_warps=w)
        if direction == "fwd":
            h, h_last = torch.empty_like(x), torch.empty_like(h0)
            args = (log_a, x, h0, h, h_last, steps, width)
            return (lambda: kernel._scan_fwd[grid](*args, **meta)), h, ref_h
        dla, db, dh0 = torch.empty_like(log_a), torch.empty_like(x), torch.empty_like(h0)
        args = (log_a, h_bf, h0, dh, dh_last, dla, db, dh0, steps, width)
        return (lambda: kernel._scan_bwd[grid](*args, **meta, HAS_DHLAST=True)), db, ref_g[1]

    sizes = [(bt, bc) for bt in (16, 32, 64, 128) for bc in (16, 32, 64, 128)]
    configs = [(bt, bc, w) for bt, bc in sizes for w in (1, 2, 4, 8) if bt * bc <= 8192 and bt * bc // (32 * w) >= 4]
    if args.quick:
        configs = [(bt, bc, w) for bt, bc, w in configs if bt * bc <= 2048 and bc >= 32 and w <= 2]
    configs = [(bt, bc, w, st) for bt, bc, w in configs for st in (3, 4, 6)]
    # The backward walks one row at a time with 4 bytes of a row per thread: its tiles are
    # rows per chunk, warps (which fix the columns) and stages.
    bwd_configs = [
        (bt, kernel._bwd_block_c(w, x.element_size()), w, st)
        for bt in (4, 8, 16, 32)
        for w in (1, 2, 4)
        for st in (3, 4, 6, 8)
        if not args.quick or (w <= 2 and bt <= 16)
    ]
    best = {}
    for direction in ("fwd", "bwd") if args.only is None else (args.only,):
        floor = floor_f if direction == "fwd" else floor_b
        for bt, bc, w, stages in configs if direction == "fwd" else bwd_configs:
            name = f"{direction} BLOCK_T {bt:3} BLOCK_C {bc:3} warps {w} stages {stages}"
            ms = checked_time(name, lambda c=(direction, bt, bc, w, stages): launcher(*c), bench, 2e-2)
            if ms is None:
                continue
            print(f"  {name}: {ms:.3f} ms = {ms / floor:.2f}x floor", flush=True)
            if direction not in best or ms < best[direction][0]:
                best[direction] = (ms, name)
    for direction, (ms, name) in best.items():
        floor = floor_f if direction == "fwd" else floor_b
        print(f"best {name}: {ms:.3f} ms = {ms / floor:.2f}x floor")


if __name__ == "__main__":
    main()
