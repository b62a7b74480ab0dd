"""Tile sweep for the linear-scan kernels: every launch config of the serial-chunk kernel and of
the decoupled look-back kernel, forward and backward timed separately against the copy floor.

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

from benchmarks.common import run_info
from kernels.scan import kernel, reference


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--C", type=int, default=2048)
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
    ref_h, ref_last = reference.forward(log_a.float(), x.float(), h0.float())
    ref_g = reference.backward(log_a.float(), ref_h, h0.float(), dh.float(), dh_last.float())
    h_bf = ref_h.to(dtype)

    n = bsz * steps * width
    src = torch.randn(n, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src))
    floor_f, floor_b = copy * 3 / 2, copy * 5 / 2
    print(f"B{bsz} T{steps} C{width} bf16: copy {copy:.3f} ms -> floor fwd {floor_f:.3f}, bwd {floor_b:.3f}")

    def serial_fwd(bt, bc, w):
        h, hl = kernel.new_output(x), kernel.new_output(h0)
        grid = (bsz, triton.cdiv(width, bc))
        return lambda: kernel._scan_fwd[grid](
            log_a, x, h0, h, hl, steps, width, HAS_H0=True, BLOCK_T=bt, BLOCK_C=bc, num_warps=w
        ), (h, hl)

    results = []
    configs = [
        (bt, bc, w)
        for bt in (16, 32, 64, 128)
        for bc in (16, 32, 64, 128, 256)
        for w in (1, 2, 4, 8)
        if 512 <= bt * bc <= 8192 and bt * bc // (32 * w) >= 4
    ]
    for variant in ("serial", "lookback"):
        for bt, bc, w in configs:
            for direction in ("fwd", "bwd"):
                try:
                    if variant == "serial" and direction == "fwd":
                        run, _ = serial_fwd(bt, bc, w)
                        run()
                        outs = _[0]
                        want = ref_h
                    elif variant == "serial":
                        dla, db, dh0 = (torch.empty_like(log_a), torch.empty_like(x), torch.empty_like(h0))
                        grid = (bsz, triton.cdiv(width, bc))

                        def run(bt=bt, bc=bc, w=w, dla=dla, db=db, dh0=dh0, grid=grid):
                            kernel._scan_bwd[grid](
                                log_a,
                                h_bf,
                                h0,
                                dh,
                                dh_last,
                                dla,
                                db,
                                dh0,
                                steps,
                                width,
                                HAS_H0=True,
                                BLOCK_T=bt,
                                BLOCK_C=bc,
                                num_warps=w,
                            )

                        run()
                        outs, want = db, ref_g[1]
                    elif direction == "fwd":

                        def run(bt=bt, bc=bc, w=w):
                            return kernel.scan_fwd_lb(log_a, x, h0, bt, bc, w)

                        outs, want = run()[0], ref_h
                    else:

                        def run(bt=bt, bc=bc, w=w):
                            return kernel.scan_bwd_lb(log_a, h_bf, h0, dh, dh_last, bt, bc, w)

                        outs, want = run()[1], ref_g[1]
                    torch.cuda.synchronize()
                    err = rel_err(outs, want)
                    if not err < 2e-2:
                        print(f"  {variant} {direction} T{bt} C{bc} w{w}: WRONG (rel err {err:.2e})", flush=True)
                        continue
                    ms = bench(run)
                except Exception as e:  # a config that fails to compile is reported
                    print(f"  {variant} {direction} T{bt} C{bc} w{w}: failed {type(e).__name__}: {str(e)[:100]}")
                    continue
                floor = floor_f if direction == "fwd" else floor_b
                results.append((variant, direction, bt, bc, w, ms, ms / floor))
                print(
                    f"  {variant:8} {direction} BLOCK_T {bt:3} BLOCK_C {bc:3} warps {w}: {ms:.3f} ms = {ms / floor:.2f}x floor",
                    flush=True,
                )
    print("best:")
    for variant in ("serial", "lookback"):
        for direction in ("fwd", "bwd"):
            rows = [r for r in results if r[0] == variant and r[1] == direction]
            if rows:
                r = min(rows, key=lambda r: r[5])
                print(
                    f"  {variant:8} {direction}: BLOCK_T {r[2]} BLOCK_C {r[3]} warps {r[4]}: {r[5]:.3f} ms = {r[6]:.2f}x floor"
                )


if __name__ == "__main__":
    main()
