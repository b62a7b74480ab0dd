"""Sweep for the GEMM with the SwiGLU epilogue: which form of the kernel and which tiles, against
cuBLAS's GEMM over both weights plus Inductor's fused silu * up, in one run.

    python benchmarks/swiglu_sweep.py

Forms: one program per output tile, persistent (one program per SM walking the tiles, as
kernels/linear runs), and persistent with Triton's warp specialization; every form feeds its
tiles by TMA. Each config is checked against fp64 before it is timed (a wrong config is
reported, not timed); configs that do not fit or fail to compile are reported and skipped.
Inference (out only) and training (g and u saved) forwards, fp32 (TF32) and bf16, at the block
benchmark's FFN shape (32768 tokens, D 1024 -> F 2816). The pointer-based kernel (GPUs without
TMA) is timed as the op's launcher with TMA turned off. This is how the form and the configs in
kernels/linear/kernel.py were chosen (BENCHMARKS.md, session 13).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.common import run_info
from kernels.linear import kernel as linear_kernel

HALF_N = linear_kernel.HALF  # output columns per tile (the weight interleave's block)
HALF = tl.constexpr(HALF_N)


@triton.jit
def _sweep_kernel(XD, WD, OD, GD, UD, M, N, K, SAVE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                  PERSISTENT: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, HALF)
    if PERSISTENT:
        start, stop, step = tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)
    else:
        start, stop, step = tl.program_id(0), tl.program_id(0) + 1, 1
    for tile in tl.range(start, stop, step, warp_specialize=WS):
        pid_m, pid_n = linear_kernel._grouped(tile, tiles_m, tiles_n, 8)
        acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(XD.load([pid_m * BLOCK_M, k0]), WD.load([pid_n * 2 * HALF, k0]).T, acc,
                         input_precision=PRECISION)  # fmt: skip
        g, u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))
        at = [pid_m * BLOCK_M, pid_n * HALF]
        OD.store(at, (g * tl.sigmoid(g) * u).to(OD.dtype))
        if SAVE:
            GD.store(at, g.to(GD.dtype))
            UD.store(at, u.to(UD.dtype))


def launch(x, w, hidden, save, bm, bk, warps, stages, persistent, ws):
    rows, width = x.shape
    out = torch.empty(rows, hidden, device=x.device, dtype=x.dtype)
    g, u = (torch.empty_like(out), torch.empty_like(out)) if save else (out, out)
    descs = [TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [2 * HALF_N, bk])]
    descs += [TensorDescriptor.from_tensor(t, [bm, HALF_N]) for t in (out, g, u)]
    tiles = triton.cdiv(rows, bm) * triton.cdiv(hidden, HALF_N)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    precision = "tf32" if x.dtype == torch.float32 else "ieee"
    _sweep_kernel[(min(sms, tiles) if persistent else tiles,)](
        *descs, rows, hidden, width, SAVE=save, PRECISION=precision, BLOCK_M=bm, BLOCK_K=bk, STAGES=stages,
        PERSISTENT=persistent, WS=ws, num_warps=warps,
    )  # fmt: skip
    return out


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(dtype, save: bool, rows: int = 32768, width: int = 1024, hidden: int = 2816) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    w_gate, w_up = (torch.randn(hidden, width, device="cuda", dtype=dtype) / width**0.5 for _ in range(2))
    both = torch.cat([w_gate, w_up])

    @torch.compile
    def unfused(x, w):
        gu = x @ w.t()
        return torch.nn.functional.silu(gu[:, :hidden]) * gu[:, hidden:], gu

    want = torch.nn.functional.silu(x.double() @ w_gate.double().t()) * (x.double() @ w_up.double().t())
    flops = 2 * rows * width * 2 * hidden
    print(f"{rows} x {width} -> {hidden} {dtype}, {'training (g, u saved)' if save else 'inference'}")
    base = bench(lambda: unfused(x, both))
    print(f"  cuBLAS GEMM + Inductor silu * up      {base:.3f} ms")
    real = linear_kernel._tma_ok
    linear_kernel._tma_ok = lambda *t: False
    try:
        t = bench(lambda: linear_kernel.linear_swiglu_fwd(x, w_gate, w_up, save))
    finally:
        linear_kernel._tma_ok = real
    print(f"  pointer kernel (autotuned)            {t:.3f} ms ({base / t:.2f}x)")
    w = linear_kernel.interleave(w_gate, w_up, HALF_N)
    bks = [32, 64] if dtype == torch.float32 else [64, 128]
    forms = {"per tile": (False, False), "persistent": (True, False), "persistent, warp-specialized": (True, True)}
    for form, (persistent, ws) in forms.items():
        best = None
        for bm, bk, warps, stages in itertools.product([128], bks, [4, 8], [3, 4]):
            args = (x, w, hidden, save, bm, bk, warps, stages, persistent, ws)
            try:
                err = ((launch(*args).double() - want).norm() / want.norm()).item()
            except Exception as e:  # out of shared memory, or a compiler failure
                print(f"    skipped {form} {bm}x{bk} w{warps} s{stages}: {str(e).splitlines()[0][:90]}")
                continue
            if err > 3e-2:
                print(f"    WRONG {form} {bm}x{bk} w{warps} s{stages}: rel err {err:.1e}")
                continue
            t = bench(lambda args=args: launch(*args))
            if best is None or t < best[0]:
                best = (t, f"{bm}x{2 * HALF_N}x{bk} w{warps} s{stages}", err)
        if best:
            t, cfg, err = best
            print(
                f"  TMA, {form:<30} {t:.3f} ms ({base / t:.2f}x; {flops / t / 1e9:.0f} TFLOP/s; {cfg};"
                f" rel err {err:.1e})",
                flush=True,
            )


def main() -> None:
    run_info("benchmarks/swiglu_sweep.py")
    torch.set_float32_matmul_precision("high")  # TF32 GEMMs, as the block benchmark runs
    for dtype, save in itertools.product([torch.float32, torch.bfloat16], [False, True]):
        sweep(dtype, save)


if __name__ == "__main__":
    main()
