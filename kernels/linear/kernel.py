"""Triton GEMM with the SwiGLU epilogue: out = silu(x @ w_gate^T) * (x @ w_up^T) in one kernel.

The two weights are interleaved in blocks of HALF rows, [gate block j; up block j] for each j
(zero rows pad F to a multiple of HALF), so one program's [BLOCK_M, 2 HALF] tile of a plain GEMM
holds the gate and the up projections of the same HALF output columns. The epilogue splits the
accumulator in registers and writes silu(g) * u: the [N, 2F] pre-activations are never written
and read back for the pointwise ops. With SAVE (training) g and u are written too, for the
backward, which is PyTorch (one pointwise pass, two GEMMs). One dot per K step over a wide tile
is the shape Triton's Hopper GEMMs run best; programs are ordered in groups of GROUP_M row
tiles so a group's x rows and weight columns stay in L2 (as Triton's matmul tutorial does).

On Hopper and later (and under the interpreter) the kernel is persistent and moves its tiles by
TMA: one program per SM walks the output tiles, the x and weight tiles arrive by tensor-memory
copies (bounds handled by the copy engine, no masks) and the epilogue leaves by TMA stores. On
the H200 the bare kernel runs 1.07x (fp32/TF32) and 1.01x (bf16) faster than cuBLAS's GEMM
plus Inductor's fused silu * up in training, where the pointer-based kernel below ran at 0.83x
and 0.86x (benchmarks/swiglu_sweep.py; the op as called, BENCHMARKS.md: 1.00x fp32, and 0.77x bf16
with fp32's tiles, before the autotuning key named the dtype). The pointer kernel stays for
GPUs without TMA and rows not 16-byte aligned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import tma
from ..config import knobs, new_output
from ..dot import dot_meta, operand, tensor_cores
from . import reference

HALF = 128  # output columns per program; the weight interleave depends on it, so it is fixed
HALF_INTERPRET = 16


@triton.jit
def _grouped(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Output tile -> (row tile, column tile), GROUP_M row tiles at a time (L2 reuse)."""
    group = GROUP_M * tiles_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _scale_rows(acc, RSTD, rows, M):
    """rmsnorm(x) W^T = rstd * (x (W diag(w_norm))^T): each row's sums times its 1/rms. The
    statistics come from the kernel that wrote x (add_rstd), not from this GEMM's K loop: with
    Triton 3.6 on the H200, a K loop whose wgmma operand also fed a sum of squares gave 36%
    relative error (the interpreter agreed with fp64: a miscompile, likely the pipeliner's),
    and a second load of x for the sums does not fit (fp32: 246 KB of shared memory; bf16
    spills)."""
    return acc * tl.load(RSTD + rows, mask=rows < M, other=0.0)[:, None]


@triton.jit
def _swiglu_tma(
    XD,  # descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    WD,  # descriptor of the interleaved weight [2 F_pad, K], blocks [2 HALF, BLOCK_K]
    OD,  # descriptors of out, g, u [M, N], blocks [BLOCK_M, HALF]
    GD,
    UD,
    M,
    N,
    K,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    DTYPE: tl.constexpr,  # the operands' dtype, for the autotuning key only: descriptors carry none it sees
    NORM: tl.constexpr,  # rmsnorm(x): rows scaled by RSTD in the epilogue (the norm's weight is folded into WD)
    RSTD,  # [M] fp32, 1/rms of each row of x (NORM only)
):
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, HALF)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            a = operand(XD.load([pid_m * BLOCK_M, k0]), UPCAST)
            b = operand(WD.load([pid_n * 2 * HALF, k0]), UPCAST)
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        if NORM:
            acc = _scale_rows(acc, RSTD, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M)
        g, u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))
        at = [pid_m * BLOCK_M, pid_n * HALF]
        OD.store(at, (g * tl.sigmoid(g) * u).to(OD.dtype))
        if SAVE:
            GD.store(at, g.to(GD.dtype))
            UD.store(at, u.to(UD.dtype))


@triton.jit
def _swiglu_fwd(
    X,  # [M, K]
    W,  # [2 * F_pad, K]: gate block j, then up block j, HALF rows each
    OUT,  # [M, N]
    G,  # [M, N], written with SAVE
    U,  # [M, N], written with SAVE
    M,
    N,
    K,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    NORM: tl.constexpr,  # as _swiglu_tma's
    RSTD,
):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, HALF), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    wrows = pid_n * 2 * HALF + tl.arange(0, 2 * HALF)  # always inside the padded weight
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    # int64: M * K passes 2^31 for long segments of a wide model.
    x_ptrs = X + rows.to(tl.int64)[:, None] * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + wrows.to(tl.int64)[None, :] * K + ks[:, None]  # [BLOCK_K, 2 HALF]: W^T tiles
    acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = ks < K - k0
        a = operand(tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), UPCAST)
        b = operand(tl.load(w_ptrs, mask=k_ok[:, None], other=0.0), UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if NORM:
        acc = _scale_rows(acc, RSTD, rows, M)

    # [BLOCK_M, 2 HALF] -> gate and up halves [BLOCK_M, HALF]
    g, u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))
    cols = pid_n * HALF + tl.arange(0, HALF)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & (cols < N)[None, :]
    tl.store(OUT + offs, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=ok)
    if SAVE:
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=ok)
        tl.store(U + offs, u.to(U.dtype.element_ty), mask=ok)


def _configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_K, warps, stages) around Triton's best Hopper GEMM tile (128 x 256 x 64).
    tiles = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 32, 8, 4), (128, 32, 8, 5), (64, 32, 4, 5)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "GROUP_M": 8, "STAGES": s}, num_warps=w) for m, k, w, s in tiles]


_swiglu_fwd_tuned = triton.autotune(_configs(), key=["N", "K", "SAVE", "PRECISION", "NORM"])(_swiglu_fwd)


def _tma_blocks(nargs: dict) -> None:
    """Autotuning: the descriptors' block shapes follow the config being tried."""
    bm, bk, half = nargs["BLOCK_M"], nargs["BLOCK_K"], nargs["HALF"]
    nargs["XD"].block_shape = [bm, bk]
    nargs["WD"].block_shape = [2 * half, bk]
    for name in ("OD", "GD", "UD"):
        nargs[name].block_shape = [bm, half]


def _tma_configs() -> list[triton.Config]:
    # The H200 sweep's best: 128 x 32 K-steps in fp32 (a 64-wide step does not fit 3 stages in
    # shared memory), 128 x 64 in bf16; configs that do not fit are skipped by the autotuner.
    tiles = [(128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k, "GROUP_M": 8, "STAGES": s}, num_warps=w, pre_hook=_tma_blocks)
        for m, k, w, s in tiles
    ]


# DTYPE in the key: Triton's autotuner keys tensors by dtype but sees none in descriptors, and
# with TF32 on fp32 and bf16 share PRECISION, so without it bf16 reused fp32's tiles (and fp32
# after bf16 would launch a config that does not fit its shared memory).
_swiglu_tma_tuned = triton.autotune(_tma_configs(), key=["N", "K", "SAVE", "PRECISION", "DTYPE", "NORM"])(_swiglu_tma)


_tma_ok = tma.matrices_ok  # a module name of its own: tests and the sweep swap it to pick a kernel


@triton.jit
def _swiglu_grad(G, U, DOUT, DGU, M, N, BLOCK: tl.constexpr):
    """dg = dout u silu'(g), du = dout silu(g) for one [rows, BLOCK] strip, written side by side
    into DGU [M, 2N]: the eager backward's pointwise part in one pass (3 rows read, 2 written)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(DOUT + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DGU + row * 2 * N + cols, (d * u * s * (1 + g * (1 - s))).to(DGU.dtype.element_ty), mask=ok)
    tl.store(DGU + row * 2 * N + N + cols, (d * g * s).to(DGU.dtype.element_ty), mask=ok)


def swiglu_grad(g: Tensor, u: Tensor, dout: Tensor) -> Tensor:
    """reference.swiglu_grad in one Triton kernel (eager CUDA calls and the interpreter; under
    torch.compile the op's backward is the PyTorch one, which Inductor fuses the same way)."""
    if g.dtype == torch.float64:  # the kernel computes in fp32
        return reference.swiglu_grad(g, u, dout)
    rows, hidden = g.shape
    dgu = new_output(g, (rows, 2 * hidden))
    if rows * hidden:
        block = 16 if knobs.interpret else 1024
        _swiglu_grad[(rows, triton.cdiv(hidden, block))](
            g, u, dout.contiguous(), dgu, rows, hidden, BLOCK=block, num_warps=1 if knobs.interpret else 4
        )
    return dgu


def interleave(w_gate: Tensor, w_up: Tensor, half: int, scale: Tensor | None = None) -> Tensor:
    """[F, K] twice -> [2 F_pad, K]: gate rows of block j, then up rows of block j (F_pad: F
    rounded up to `half`, zero rows), each column k times scale[k] when given (a norm's weight
    folded in). A copy of the weights per call, not per token."""
    hidden, width = w_gate.shape
    blocks = triton.cdiv(hidden, half)
    full, rest = divmod(hidden, half)
    out = w_gate.new_empty(blocks, 2, half, width)
    for j, w in enumerate((w_gate, w_up)):  # one strided copy per weight (two with a partial block)
        if scale is None:
            out[:full, j].copy_(w[: full * half].view(full, half, width))
        else:
            torch.mul(w[: full * half].view(full, half, width), scale, out=out[:full, j])
        if rest:
            out[full, j, :rest].copy_(w[full * half :] if scale is None else w[full * half :] * scale)
            out[full, j, rest:].zero_()
    return out.view(2 * blocks * half, width)


def linear_swiglu_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, save: bool, w_norm: Tensor | None = None, rstd: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous x [M, K], w_gate/w_up [N, K] -> (out [M, N], g, u); g and u are empty
    tensors unless `save`. With `w_norm` [K] and `rstd` [M] fp32 (1/rms of each row of x), x is
    rmsnorm(x, w_norm) on the way in: the epilogue scales each row's sums by rstd, and w_norm is
    folded into the weights' per-call copy."""
    if not tensor_cores(x.dtype):  # exact fp32: cuBLAS's SGEMM, then the pointwise ops
        if w_norm is None:
            out, g, u = reference.linear_swiglu(x, w_gate, w_up)
        else:
            out, g, u = reference.rms_linear_swiglu(x, rstd, w_norm, w_gate, w_up)
        return (out, g, u) if save else (out, x.new_empty(0), x.new_empty(0))
    rows, width = x.shape
    hidden = w_gate.shape[0]
    half = HALF_INTERPRET if knobs.interpret else HALF
    out = new_output(x, (rows, hidden))
    g = new_output(x, (rows, hidden)) if save else x.new_empty(0)
    u = new_output(x, (rows, hidden)) if save else x.new_empty(0)
    if not rows * hidden:
        return out, g, u
    meta = {"SAVE": save, "HALF": half, **dot_meta(x.dtype), "NORM": w_norm is not None}
    meta["RSTD"] = rstd.float() if w_norm is not None else out  # not read without NORM
    w = interleave(w_gate, w_up, half, w_norm)
    tiles_n = triton.cdiv(hidden, half)
    fixed = knobs.interpret or not knobs.autotune
    # tl.dot needs every tile side >= 16; small tiles keep the interpreter quick.
    bm, bk, warps, stages = (16, 16, 1, 1) if knobs.interpret else (128, 32 if x.dtype == torch.float32 else 64, 8, 3)
    if _tma_ok(x, w, out):
        outs = [TensorDescriptor.from_tensor(t if save else out, [bm, half]) for t in (out, g, u)]
        args = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [2 * half, bk]), *outs)
        args = (*args, rows, hidden, width)
        meta["DTYPE"] = str(x.dtype).removeprefix("torch.")
        if fixed:
            grid = (tma.programs(x.device, triton.cdiv(rows, bm) * tiles_n),)
            _swiglu_tma[grid](*args, **meta, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8, STAGES=stages, num_warps=warps)
        else:
            grid = lambda m: (tma.programs(x.device, triton.cdiv(rows, m["BLOCK_M"]) * tiles_n),)  # noqa: E731
            _swiglu_tma_tuned[grid](*args, **meta)
        return out, g, u
    args = (x, w, out, g if save else out, u if save else out, rows, hidden, width)
    if fixed:
        _swiglu_fwd[(triton.cdiv(rows, bm) * tiles_n,)](
            *args, **meta, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8, STAGES=stages, num_warps=warps
        )
    else:
        _swiglu_fwd_tuned[lambda m: (triton.cdiv(rows, m["BLOCK_M"]) * tiles_n,)](*args, **meta)
    return out, g, u
