"""Sweep for the plain GEMM with a residual epilogue (kernels/linear/gemm.py): which tiles, and
whether the epilogue in column halves (SUB), a flattened tile loop (FLATTEN) or Triton's warp
specialization (WS) pay, against cuBLAS alone, addmm and cuBLAS + add, in one run.

    python benchmarks/gemm_sweep.py

At the block benchmark's three projections (32768 rows: 1024 -> 3584, 1024 -> 1024,
2816 -> 1024), fp32 (TF32) and bf16, every config with the residual read in the epilogue. Each
config is checked against PyTorch's result before it is timed (a wrong one is reported, not
timed); configs that do not fit or fail to compile are counted and skipped. Prints each shape's
six fastest configs and the session-14 tile for reference. This is how gemm.py's TILES were
chosen (BENCHMARKS.md, session 15); the kernel's quarter-width epilogue came after, from
compiling for sm_90 (halves spilled with the residual).
"""

import itertools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_info
from kernels.linear.kernel import _grouped

torch.set_float32_matmul_precision("high")


@triton.jit
def gemm(
    XD,
    WD,
    OD,
    R,
    RS,
    M,
    N,
    K,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    FLATTEN: tl.constexpr,
    WS: tl.constexpr,
    SUB: tl.constexpr,
    HAS_RES: tl.constexpr,
    NPROG: tl.constexpr,
):
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NPROG, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in tl.range(k_tiles, num_stages=STAGES):
            a = XD.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = WD.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if SUB:
            acc = tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2))
            acc = tl.permute(acc, (0, 2, 1))
            a0, a1 = tl.split(acc)
            if HAS_RES:
                c0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
                ok = (rows < M)[:, None] & (c0 < N)[None, :]
                a0 += tl.load(R + rows.to(tl.int64)[:, None] * RS + c0[None, :], mask=ok, other=0.0).to(tl.float32)
            OD.store([pid_m * BLOCK_M, pid_n * BLOCK_N], a0.to(OD.dtype))
            if HAS_RES:
                c1 = pid_n * BLOCK_N + BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2)
                ok = (rows < M)[:, None] & (c1 < N)[None, :]
                a1 += tl.load(R + rows.to(tl.int64)[:, None] * RS + c1[None, :], mask=ok, other=0.0).to(tl.float32)
            OD.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], a1.to(OD.dtype))
        else:
            if HAS_RES:
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                ok = (rows < M)[:, None] & (cols < N)[None, :]
                acc += tl.load(R + rows.to(tl.int64)[:, None] * RS + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            OD.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(OD.dtype))


def run(x, w, res, cfg, nsm):
    bm, bn, bk, warps, stages, flat, ws, sub = cfg
    (rows, width), out_width = x.shape, w.shape[0]
    out = torch.empty(rows, out_width, device=x.device, dtype=x.dtype)
    nprog = min(nsm, triton.cdiv(rows, bm) * triton.cdiv(out_width, bn))
    gemm[(nprog,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // 2 if sub else bn]),
        out if res is None else res,
        out_width if res is None else res.stride(0),
        rows,
        out_width,
        width,
        PRECISION="tf32" if x.dtype == torch.float32 else "ieee",
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        STAGES=stages,
        FLATTEN=flat,
        WS=ws,
        SUB=sub,
        HAS_RES=res is not None,
        NPROG=nprog,
        num_warps=warps,
    )
    return out


def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median")


def configs(block_k: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, FLATTEN, WS, SUB): halves only for wide tiles,
    8 warps (two consumer warpgroups) for them."""
    out = []
    tiles, flags = [(128, 128), (128, 256), (256, 128)], (False, True)
    for (bm, bn), warps, stages, flat, ws, sub in itertools.product(tiles, (4, 8), (3, 4), flags, flags, flags):
        wide = bm * bn > 128 * 128
        if (sub and not wide) or (wide and warps == 4):
            continue
        out.append((bm, bn, block_k, warps, stages, flat, ws, sub))
    return out


def sweep(x, w, res, cfgs, nsm) -> list[tuple]:
    """(ms or inf, config, what went wrong) for each config, fastest first."""
    ref = torch.addmm(res, x, w.t())
    results = []
    for cfg in cfgs:
        try:
            out = run(x, w, res, cfg, nsm)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                results.append((float("inf"), cfg, f"wrong: rel err {err:.1e}"))
                continue
            results.append((bench(lambda cfg=cfg: run(x, w, res, cfg, nsm)), cfg, ""))
        except Exception as e:  # a config that does not compile or fit is reported
            first = str(e).splitlines()[0][:80] if str(e) else ""
            results.append((float("inf"), cfg, f"{type(e).__name__}: {first}"))
    return sorted(results, key=lambda r: r[0])


def main():
    run_info("benchmarks/gemm_sweep.py")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    for dtype in (torch.float32, torch.bfloat16):
        block_k = 32 if dtype == torch.float32 else 64
        cfgs = configs(block_k)
        for rows, width, out_width in [(32768, 1024, 3584), (32768, 1024, 1024), (32768, 2816, 1024)]:
            x = torch.randn(rows, width, device="cuda", dtype=dtype)
            w = torch.randn(out_width, width, device="cuda", dtype=dtype) * 0.03
            res = torch.randn(rows, out_width, device="cuda", dtype=dtype)
            t_cublas = bench(lambda x=x, w=w: x @ w.t())
            t_addmm = bench(lambda x=x, w=w, res=res: torch.addmm(res, x, w.t()))
            t_add = bench(lambda x=x, w=w, res=res: x @ w.t() + res)
            start = time.time()
            results = sweep(x, w, res, cfgs, nsm)
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name} {rows} x {width} -> {out_width} + residual: cuBLAS alone {t_cublas:.3f} ms, "
                f"addmm {t_addmm:.3f}, cuBLAS + add {t_add:.3f} ({time.time() - start:.0f} s sweep)"
            )
            for ms, cfg, _ in results[:6]:
                print(f"   {ms:.3f} ms  {cfg}  ({t_add / ms:.2f}x cuBLAS + add)")
            failed = [(cfg, why) for ms, cfg, why in results if ms == float("inf")]
            print(f"   {len(failed)} of {len(cfgs)} failed, e.g. {failed[:2]}")
            base = [(round(ms, 3), c[3:5]) for ms, c, _ in results if c[:3] == (128, 128, block_k) and not any(c[5:])]
            print("   session 14's tile (128 x 128, no flatten/WS/halves), (warps, stages):", base)


if __name__ == "__main__":
    main()
