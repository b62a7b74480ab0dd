"""Triton GEMM with the SwiGLU epilogue: out = silu(x @ w_gate^T) * (x @ w_up^T) in one kernel.

One program owns a [BLOCK_M, BLOCK_N] tile of the output and keeps two accumulators, the gate's
and the up projection's, over the same columns: each x tile is loaded once for both products,
and the epilogue combines them in registers. So the [N, 2F] pre-activations are never written
and read back for the pointwise silu and product (three passes over [N, F] saved in inference);
with SAVE (training) g and u are written as well, for the backward, which is PyTorch GEMMs.
Programs are ordered in groups of GROUP_M row tiles so that a group's x rows and weight columns
stay in L2 (the ordering of Triton's matmul tutorial).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..config import fp32_dot_precision, knobs, new_output


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    # Triton 3.8's interpreter returns garbage for bf16 tl.dot operands (docs/kernels.md).
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _swiglu_fwd(
    X,  # [M, K]
    WG,  # [N, K]
    WU,  # [N, K]
    OUT,  # [M, N]
    G,  # [M, N], written with SAVE
    U,  # [M, N], written with SAVE
    M,
    N,
    K,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    # int64: M * K passes 2^31 for long segments of a wide model.
    x_ptrs = X + rows.to(tl.int64)[:, None] * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_offs = cols.to(tl.int64)[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N]: W^T tiles
    g_ptrs, u_ptrs = WG + w_offs, WU + w_offs
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = ks < K - k0
        a = _operand(tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), UPCAST)
        bg = _operand(tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0), UPCAST)
        bu = _operand(tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0), UPCAST)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    out = acc_g * tl.sigmoid(acc_g) * acc_u
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)
    if SAVE:
        tl.store(G + offs, acc_g.to(G.dtype.element_ty), mask=ok)
        tl.store(U + offs, acc_u.to(U.dtype.element_ty), mask=ok)


def _configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): two [BLOCK_M, BLOCK_N] fp32 accumulators per
    # program, so the tiles are those of a plain GEMM with half the N side or half the stages.
    tiles = [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "STAGES": s}, num_warps=w)
        for m, n, k, w, s in tiles
    ]


_swiglu_fwd_tuned = triton.autotune(_configs(), key=["N", "K", "SAVE", "PRECISION"])(_swiglu_fwd)


def linear_swiglu_fwd(x: Tensor, w_gate: Tensor, w_up: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous x [M, K], w_gate/w_up [N, K] -> (out [M, N], g, u); g and u are empty
    tensors unless `save`."""
    rows, width = x.shape
    hidden = w_gate.shape[0]
    out = new_output(x, (rows, hidden))
    g = new_output(x, (rows, hidden)) if save else x.new_empty(0)
    u = new_output(x, (rows, hidden)) if save else x.new_empty(0)
    meta = {
        "SAVE": save,
        "PRECISION": "ieee" if knobs.interpret else fp32_dot_precision(x.dtype),
        "UPCAST": knobs.interpret,
    }
    args = (x, w_gate, w_up, out, g if save else out, u if save else out, rows, hidden, width)
    if knobs.interpret or not knobs.autotune:
        # tl.dot needs every tile side >= 16; small tiles keep the interpreter quick.
        tile = (16, 16, 16, 1, 1) if knobs.interpret else (128, 64, 64, 4, 4)
        bm, bn, bk, warps, stages = tile
        grid = (triton.cdiv(rows, bm) * triton.cdiv(hidden, bn),)
        _swiglu_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, STAGES=stages, num_warps=warps)
    else:
        _swiglu_fwd_tuned[lambda m: (triton.cdiv(rows, m["BLOCK_M"]) * triton.cdiv(hidden, m["BLOCK_N"]),)](
            *args, **meta
        )
    return out, g, u
