"""Triton GEMM with two epilogues: out = [rstd *] (x @ w^T) [+ residual] in one kernel.

- The residual add (fuse-linear-residual). The residual stream's adds (SPEC §5: x + mix, then
  x + ffn) follow a projection. Unfused, the projection writes its [N, D] result and the add
  reads it back with the residual and writes the sum: three rows a token for the add, one for
  the GEMM's write. Here the epilogue reads the residual tile and writes the sum once, so the
  projection's own result never reaches HBM (two rows a token fewer). PyTorch's addmm with a
  2-D input does not do this: it copies the input into its result with a separate kernel
  before cuBLAS reads it back as C.
- The RMSNorm before it (fuse-norm-prologue): rmsnorm(x) W^T = rstd (x (W diag(w_norm))^T), so
  with the norm's weight folded into a per-call copy of W, the GEMM reads x itself and scales
  each row's sums by its 1/rms (rstd, from add_rstd), and the normalised rows are never written.

The kernel is the persistent, TMA-fed form of kernels/linear/kernel.py's SwiGLU GEMM without the
interleave: one program per SM walks the output tiles in groups of GROUP_M row tiles, x and w
tiles arrive by tensor descriptors, pipelined over STAGES, and the result leaves by a TMA store.
The residual and rstd are read with plain loads straight into the accumulator's layout, so the
epilogue takes no shared memory beyond the store's tile. Sums in fp32, rounded once to the output
dtype (unfused rounds the product first, then the sum).

Where TMA cannot run (GPUs before Hopper, rows not 16-byte aligned) and for exact fp32 (no
tensor cores, kernels/dot.py), the launcher runs the reference (cuBLAS and the pointwise ops).
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
from .kernel import _grouped


@triton.jit
def _gemm_tma(
    XD,  # descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    WD,  # descriptor of w [N, K], blocks [BLOCK_N, BLOCK_K] (with NORM: w_norm folded in)
    OD,  # descriptor of out [M, N], blocks [BLOCK_M, BLOCK_N]
    R,  # residual [M, N], rows RES_STRIDE apart (HAS_RES)
    RES_STRIDE,
    RSTD,  # [M] fp32, 1/rms of each row of x (NORM)
    M,
    N,
    K,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    DTYPE: tl.constexpr,  # the operands' dtype, for the autotuning key only (descriptors show none)
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
):
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            a = operand(XD.load([pid_m * BLOCK_M, k0]), UPCAST)
            b = operand(WD.load([pid_n * BLOCK_N, k0]), UPCAST)
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if NORM:
            acc = acc * tl.load(RSTD + rows, mask=rows < M, other=0.0)[:, None]
        if HAS_RES:
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = (rows < M)[:, None] & (cols < N)[None, :]
            res = tl.load(R + rows.to(tl.int64)[:, None] * RES_STRIDE + cols[None, :], mask=ok, other=0.0)
            acc += res.to(tl.float32)
        OD.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(OD.dtype))


def _blocks(nargs: dict) -> None:
    """Autotuning: the descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["XD"].block_shape = [bm, bk]
    nargs["WD"].block_shape = [bn, bk]
    nargs["OD"].block_shape = [bm, bn]


def _configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) near the SwiGLU GEMM's H200 winners. Compiled for
    # sm_90 (tests/kernels/test_linear_compiles.py): in fp32 a 256-wide tile's output staging
    # alone takes 128 KB (272 KB in all), so fp32 runs 128 x 128 (x 32: 192 KB with 4 stages);
    # bf16 fits 128 x 256 x 64 with 3 stages (208 KB). The autotuner skips what does not fit.
    tiles = [
        (128, 128, 32, 8, 4),
        (128, 128, 32, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (64, 128, 64, 4, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "STAGES": s}, num_warps=w, pre_hook=_blocks
        )
        for m, n, k, w, s in tiles
    ]


_gemm_tuned = triton.autotune(_configs(), key=["N", "K", "PRECISION", "DTYPE", "HAS_RES", "NORM"])(_gemm_tma)


def linear_fwd(
    x: Tensor, w: Tensor, res: Tensor | None = None, w_norm: Tensor | None = None, rstd: Tensor | None = None
) -> Tensor:
    """Contiguous x [M, K], w [N, K] -> [rmsnorm(x, w_norm) with rstd] @ w^T [+ res]: with
    `res` [M, N] (rows may be strided) added in the epilogue, and with `w_norm` [K] and `rstd`
    [M] (fp32, 1/rms of each row of x) the norm applied (w_norm folded into a copy of w)."""
    rows, width = x.shape
    out_width = w.shape[0]
    norm = w_norm is not None
    operands = (x, w) if res is None else (x, w, res)
    out_aligned = out_width * x.element_size() % 16 == 0  # the output goes by descriptor too
    if not tensor_cores(x.dtype) or not out_aligned or not tma.matrices_ok(*operands) or rows * out_width == 0:
        return reference.linear_epilogue(x, w, res, w_norm, rstd)  # exact fp32, no TMA, or empty
    if norm:
        w = w * w_norm  # a copy of the weight per call, not per token
    out = new_output(x, (rows, out_width))
    meta = {**dot_meta(x.dtype), "DTYPE": str(x.dtype).removeprefix("torch."), "HAS_RES": res is not None}
    meta["NORM"] = norm
    fixed = knobs.interpret or not knobs.autotune
    fit = (128, 128, 32, 8, 4) if x.dtype == torch.float32 else (128, 128, 64, 8, 4)
    bm, bn, bk, warps, stages = (16, 16, 16, 1, 1) if knobs.interpret else fit
    args = (
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]),
        out if res is None else res,  # not read without HAS_RES
        out_width if res is None else res.stride(0),
        rstd.float() if norm else out,  # not read without NORM
        rows,
        out_width,
        width,
    )
    if fixed:
        grid = (tma.programs(x.device, triton.cdiv(rows, bm) * triton.cdiv(out_width, bn)),)
        _gemm_tma[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, STAGES=stages, num_warps=warps)
    else:
        tiles = lambda m: triton.cdiv(rows, m["BLOCK_M"]) * triton.cdiv(out_width, m["BLOCK_N"])  # noqa: E731
        _gemm_tuned[lambda m: (tma.programs(x.device, tiles(m)),)](*args, **meta)
    return out
