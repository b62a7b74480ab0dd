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
def _epilogue(acc, OD, R, RES_STRIDE, RSTD, row0, col0, M, N, HAS_RES: tl.constexpr, NORM: tl.constexpr):
    """The output piece acc at (row0, col0): rows scaled by rstd, the residual added (plain
    loads in the accumulator's layout), one rounding, a TMA store."""
    rows = row0 + tl.arange(0, acc.shape[0])
    if NORM:
        acc = acc * tl.load(RSTD + rows, mask=rows < M, other=0.0)[:, None]
    if HAS_RES:
        cols = col0 + tl.arange(0, acc.shape[1])
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        res = tl.load(R + rows.to(tl.int64)[:, None] * RES_STRIDE + cols[None, :], mask=ok, other=0.0)
        acc += res.to(tl.float32)
    OD.store([row0, col0], acc.to(OD.dtype))


@triton.jit
def _halves(acc):
    """[rows, n] -> its left and right [rows, n / 2] column halves."""
    return tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, acc.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _gemm_tma(
    XD,  # descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    WD,  # descriptor of w [N, K], blocks [BLOCK_N, BLOCK_K] (with NORM: w_norm folded in)
    OD,  # descriptor of out [M, N], blocks [BLOCK_M, BLOCK_N / SPLIT]
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
    SPLIT: tl.constexpr,  # the epilogue in 1, 2 or 4 column pieces (less staging memory, fewer registers)
    FLATTEN: tl.constexpr,  # one pipelined loop over tiles and K (the next tile's loads overlap)
    DTYPE: tl.constexpr,  # the operands' dtype, for the autotuning key only (descriptors show none)
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
):
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in tl.range(tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            a = operand(XD.load([pid_m * BLOCK_M, k * BLOCK_K]), UPCAST)
            b = operand(WD.load([pid_n * BLOCK_N, k * BLOCK_K]), UPCAST)
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        row0, col0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        if SPLIT == 1:
            _epilogue(acc, OD, R, RES_STRIDE, RSTD, row0, col0, M, N, HAS_RES, NORM)
        else:
            left, right = _halves(acc)
            if SPLIT == 2:
                _epilogue(left, OD, R, RES_STRIDE, RSTD, row0, col0, M, N, HAS_RES, NORM)
                _epilogue(right, OD, R, RES_STRIDE, RSTD, row0, col0 + BLOCK_N // 2, M, N, HAS_RES, NORM)
            else:
                quarter = BLOCK_N // 4
                a, b = _halves(left)
                _epilogue(a, OD, R, RES_STRIDE, RSTD, row0, col0, M, N, HAS_RES, NORM)
                _epilogue(b, OD, R, RES_STRIDE, RSTD, row0, col0 + quarter, M, N, HAS_RES, NORM)
                a, b = _halves(right)
                _epilogue(a, OD, R, RES_STRIDE, RSTD, row0, col0 + 2 * quarter, M, N, HAS_RES, NORM)
                _epilogue(b, OD, R, RES_STRIDE, RSTD, row0, col0 + 3 * quarter, M, N, HAS_RES, NORM)


def _blocks(nargs: dict) -> None:
    """Autotuning: the descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["XD"].block_shape = [bm, bk]
    nargs["WD"].block_shape = [bn, bk]
    nargs["OD"].block_shape = [bm, bn // nargs["SPLIT"]]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT, FLATTEN), the H200 sweep's winners first (the
# launcher's fixed tile without autotuning; benchmarks/gemm_sweep.py, session 15, BENCHMARKS.md):
# - fp32: a 128 x 256 tile ran 1.05x-1.14x the 128 x 128 one. It fits sm_90's 227 KB only with the
#   epilogue in pieces (a whole tile's staging takes 128 KB); the sweep timed halves, but with
#   the residual those spilled when compiled for sm_90 here, quarters do not
#   (tests/kernels/test_linear_compiles.py).
# - bf16: the flattened 128 x 128 x 64 loop with 4 warps, 1.09x-1.15x; flattening costs a second
#   staging buffer, which fp32's large tiles cannot take. The sweep timed it whole; whole, the
#   residual spilled 32 bytes here, so it runs in quarters too (as shipped: fusion.py --only gemm).
# Warp specialization (tl.range(warp_specialize=True)) failed to compile or did not help on sm_90.
# The autotuner tries the three tiles of the operands' dtype (_for_dtype).
TILES = {
    torch.float32: [(128, 256, 32, 8, 3, 4, False), (256, 128, 32, 8, 3, 4, False), (128, 128, 32, 8, 4, 1, False)],
    torch.bfloat16: [(128, 128, 64, 4, 4, 4, True), (128, 256, 64, 8, 3, 4, False), (256, 128, 64, 8, 3, 4, False)],
}
TILES[torch.float16] = TILES[torch.bfloat16]


def _for_dtype(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuning prunes to the tiles TILES lists for the operands' dtype (the DTYPE key)."""
    dtype = getattr(torch, kwargs.get("DTYPE", named_args.get("DTYPE", "float32")))
    tiles = TILES.get(dtype, TILES[torch.float32])
    keep = [c for c in configs if _tile(c) in tiles]
    return keep or configs


def _tile(config: triton.Config) -> tuple:
    k = config.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_warps, k["STAGES"], k["SPLIT"], k["FLATTEN"])


def _configs() -> list[triton.Config]:
    tiles = dict.fromkeys(t for dtype in TILES.values() for t in dtype)  # the union, in order
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "STAGES": s, "SPLIT": split, "FLATTEN": flat},
            num_warps=w,
            pre_hook=_blocks,
        )
        for m, n, k, w, s, split, flat in tiles
    ]


_gemm_tuned = triton.autotune(
    _configs(),
    key=["N", "K", "PRECISION", "DTYPE", "HAS_RES", "NORM"],
    prune_configs_by={"early_config_prune": _for_dtype},
)(_gemm_tma)


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
    # the interpreter takes each dtype's epilogue form on small tiles
    fit = TILES[x.dtype][0] if x.dtype in TILES else TILES[torch.float32][0]
    bm, bn, bk, warps, stages, split, flat = (16, 32, 16, 1, 1, *fit[5:]) if knobs.interpret else fit
    args = (
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // split]),
        out if res is None else res,  # not read without HAS_RES
        out_width if res is None else res.stride(0),
        rstd.float() if norm else out,  # not read without NORM
        rows,
        out_width,
        width,
    )
    if fixed:
        grid = (tma.programs(x.device, triton.cdiv(rows, bm) * triton.cdiv(out_width, bn)),)
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "STAGES": stages, "SPLIT": split}
        _gemm_tma[grid](*args, **meta, **tile, FLATTEN=flat, num_warps=warps)
    else:
        tiles = lambda m: triton.cdiv(rows, m["BLOCK_M"]) * triton.cdiv(out_width, m["BLOCK_N"])  # noqa: E731
        _gemm_tuned[lambda m: (tma.programs(x.device, tiles(m)),)](*args, **meta)
    return out
