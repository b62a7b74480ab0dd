"""Triton kernels for the MDI decay (SPEC §3), with the bottleneck (width R = D / 4) on chip: one
MLP, out = W2 gelu(W1 x + b1) + b2 (`_mlp_fwd`, the logits path of fuse-decay-recurrence), and
the whole decay, gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps) of the MLP a of z and the
MLP c of k (`_decay_fwd`).

Unfused, each MLP is a GEMM, a gelu and a GEMM (biases in the GEMMs' epilogues): the [N, R]
hidden is written, read, written and read again. Here one program owns BLOCK_M rows: the first
GEMM accumulates the hidden in registers as two power-of-two parts (R = 192 as 128 + 64; the
descriptors' zero fill pads the second part, so no weight is copied: a single part padded to
256 cost a quarter more products and did not fit the whole decay), the bias and the exact (erf)
gelu run on the accumulators, and the second GEMM reads the hidden from registers against
BLOCK_N-row tiles of W2, adding b2 before each output tile leaves by TMA. HBM traffic per row:
x read once, out written once. Persistent: one program per SM walks the row tiles.

The whole decay keeps both hiddens and forms each gamma tile from the a and c tiles of the same
columns, so a and c never leave the chip: per row z and k are read and gamma written, where the
logits path writes a and c and the recurrence reads both.

The hidden is rounded to the activation dtype before the second GEMM, as F.linear in that dtype
would round it. The backwards (op.py) are PyTorch, recomputing what they need (the first GEMM;
for the whole decay, both MLPs) instead of saving it.
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

MAX_HIDDEN = 256  # the bottleneck's two parts are at most 256 and 128 wide (TMA box sides)


@triton.jit
def _hidden(XD, WLO, WHI, B1, row, K, R, PRECISION: tl.constexpr, UPCAST: tl.constexpr, R_LO: tl.constexpr,
            R_HI: tl.constexpr, HAS_HI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            STAGES: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """gelu(x W1^T + b1) of rows row.. row + BLOCK_M as two operands of the next dot, columns
    [0, R_LO) and [R_LO, R_LO + R_HI) (the second only with HAS_HI), rounded to DTYPE (the
    activations' dtype); columns >= R are 0."""
    lo = tl.zeros([BLOCK_M, R_LO], dtype=tl.float32)
    hi = tl.zeros([BLOCK_M, R_HI], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = operand(XD.load([row, k0]), UPCAST)
        lo = tl.dot(a, operand(WLO.load([0, k0]), UPCAST).T, lo, input_precision=PRECISION)
        if HAS_HI:
            hi = tl.dot(a, operand(WHI.load([R_LO, k0]), UPCAST).T, hi, input_precision=PRECISION)
    return _gelu_bias(lo, B1, 0, R, UPCAST, R_LO, DTYPE), _gelu_bias(hi, B1, R_LO, R, UPCAST, R_HI, DTYPE)


@triton.jit
def _gelu_bias(acc, B1, first, R, UPCAST: tl.constexpr, WIDTH: tl.constexpr, DTYPE: tl.constexpr):
    hid = first + tl.arange(0, WIDTH)
    pre = acc + tl.load(B1 + hid, mask=hid < R, other=0.0).to(tl.float32)[None, :]
    # exact gelu; padded columns have pre = 0, so gelu = 0 (and W2's padded columns are 0)
    return operand((0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))).to(DTYPE), UPCAST)


@triton.jit
def _project(h_lo, h_hi, WLO, WHI, B2, n0, N, PRECISION: tl.constexpr, UPCAST: tl.constexpr, R_LO: tl.constexpr,
             HAS_HI: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """h W2^T + b2 for output columns n0.. n0 + BLOCK_N, fp32 [BLOCK_M, BLOCK_N]."""
    out = tl.dot(h_lo, operand(WLO.load([n0, 0]), UPCAST).T, input_precision=PRECISION)
    if HAS_HI:
        out = tl.dot(h_hi, operand(WHI.load([n0, R_LO]), UPCAST).T, out, input_precision=PRECISION)
    cols = n0 + tl.arange(0, BLOCK_N)
    return out + tl.load(B2 + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _mlp_fwd(
    XD,  # descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    W1LO,  # descriptors of w1 [R, K], blocks [R_LO, BLOCK_K] and [R_HI, BLOCK_K] (rows >= R read as 0)
    W1HI,
    W2LO,  # descriptors of w2 [N, R], blocks [BLOCK_N, R_LO] and [BLOCK_N, R_HI] (columns >= R read as 0)
    W2HI,
    OD,  # descriptor of out [M, N], blocks [BLOCK_M, BLOCK_N]
    B1,  # [R]
    B2,  # [N]
    M,
    N,
    K,
    R,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    R_LO: tl.constexpr,
    R_HI: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    N_STAGES: tl.constexpr,
):
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        row = tile * BLOCK_M
        h_lo, h_hi = _hidden(
            XD, W1LO, W1HI, B1, row, K, R, PRECISION, UPCAST, R_LO, R_HI, HAS_HI, BLOCK_M, BLOCK_K, STAGES, OD.dtype
        )
        for n0 in tl.range(0, N, BLOCK_N, num_stages=N_STAGES):
            out = _project(h_lo, h_hi, W2LO, W2HI, B2, n0, N, PRECISION, UPCAST, R_LO, HAS_HI, BLOCK_N)
            OD.store([row, n0], out.to(OD.dtype))


@triton.jit
def _decay_fwd(
    ZD,  # descriptor of z [M, KZ], blocks [BLOCK_M, BLOCK_K]
    KD,  # descriptor of k [M, KK], blocks [BLOCK_M, BLOCK_K]
    W1LO,  # the z MLP's weights, as _mlp_fwd's
    W1HI,
    W2LO,
    W2HI,
    C1LO,  # the k MLP's weights (the same bottleneck R)
    C1HI,
    C2LO,
    C2HI,
    GD,  # descriptor of gamma [M, N], blocks [BLOCK_M, BLOCK_N]
    B1,
    B2,
    CB1,
    CB2,
    M,
    N,
    KZ,
    KK,
    R,
    EPS,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    R_LO: tl.constexpr,
    R_HI: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    N_STAGES: tl.constexpr,
):
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        row = tile * BLOCK_M
        a_lo, a_hi = _hidden(
            ZD, W1LO, W1HI, B1, row, KZ, R, PRECISION, UPCAST, R_LO, R_HI, HAS_HI, BLOCK_M, BLOCK_K, STAGES, GD.dtype
        )
        c_lo, c_hi = _hidden(
            KD, C1LO, C1HI, CB1, row, KK, R, PRECISION, UPCAST, R_LO, R_HI, HAS_HI, BLOCK_M, BLOCK_K, STAGES, GD.dtype
        )
        for n0 in tl.range(0, N, BLOCK_N, num_stages=N_STAGES):
            a = _project(a_lo, a_hi, W2LO, W2HI, B2, n0, N, PRECISION, UPCAST, R_LO, HAS_HI, BLOCK_N)
            c = _project(c_lo, c_hi, C2LO, C2HI, CB2, n0, N, PRECISION, UPCAST, R_LO, HAS_HI, BLOCK_N)
            # SPEC §3's tail, as decay_gate: NaN stays NaN, as in torch.clamp
            gamma = tl.clamp(tl.sigmoid(a) * tl.sigmoid(c), EPS, 1.0 - EPS, propagate_nan=tl.PropagateNan.ALL)
            GD.store([row, n0], gamma.to(GD.dtype))


def hidden_split(hidden: int) -> tuple[int, int]:
    """The bottleneck as two power-of-two parts: the largest power of two <= R, and the rest
    padded (0 when none): 192 -> (128, 64), 256 -> (256, 0), 24 -> (16, 16). Padding 192 to one
    256-wide part instead costs a quarter more products and registers."""
    lo = max(16, 1 << (hidden.bit_length() - 1))
    rest = hidden - lo
    return lo, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def supported(x: Tensor, w1: Tensor, *matrices: Tensor) -> bool:
    """The fused kernels take the MLP(s): tensor-core dots (not exact fp32: dot.tensor_cores; the
    whole decay spilled 4-8 KB a thread that way), a bottleneck of 1..MAX_HIDDEN, TMA (Hopper or
    later, or the interpreter), one dtype, and positive widths, unit inner strides and 16-byte
    aligned rows and bases of every matrix."""
    if not tensor_cores(x.dtype) or not 0 < w1.shape[0] <= MAX_HIDDEN:
        return False
    return all(t.dtype == x.dtype for t in (w1, *matrices)) and tma.matrices_ok(x, w1, *matrices)


# (BLOCK_M, BLOCK_K, BLOCK_N, warps, K-loop stages, N-loop stages): 64 rows over two warpgroups,
# which split the hidden's columns between them (with one warpgroup every config spilled).
# Chosen by compiling for sm_90 on the CPU machine (Triton 3.9) at the model's bottleneck,
# R = 192 as 128 + 64: the configs with no spills, shared memory well under 227 KB
# (tests/kernels/test_decay_compiles.py checks them). One MLP: fp32 163 registers and 108 KB,
# bf16 172 and 84 KB. The whole decay holds two hiddens: only unpipelined loops kept it free of
# spills (fp32 252 registers and 112 KB, bf16 195 and 64 KB; pipelining either loop spilled
# 8-224 bytes or, with the N loop pipelined, took the hiddens through 252 KB of shared memory).
MLP_CONFIGS = {torch.float32: (64, 32, 32, 8, 3, 2), torch.bfloat16: (64, 64, 64, 8, 2, 2)}
DECAY_CONFIGS = {torch.float32: (64, 16, 32, 8, 1, 1), torch.bfloat16: (64, 64, 64, 8, 1, 1)}


def _config(table: dict, dtype: torch.dtype) -> tuple[int, ...]:
    if knobs.interpret:
        return 16, 16, 16, 1, 1, 1
    return table.get(dtype, table[torch.bfloat16])


def _weights(w1: Tensor, w2: Tensor, bk: int, bn: int) -> tuple[TensorDescriptor, ...]:
    """The four descriptors of one MLP's weights: w1 by row parts, w2 by column parts."""
    lo, hi = hidden_split(w1.shape[0])
    hi_block = hi or 16  # unused without a second part (HAS_HI false), but a valid block
    return (
        TensorDescriptor.from_tensor(w1, [lo, bk]),
        TensorDescriptor.from_tensor(w1, [hi_block, bk]),
        TensorDescriptor.from_tensor(w2, [bn, lo]),
        TensorDescriptor.from_tensor(w2, [bn, hi_block]),
    )


def _meta(x: Tensor, hidden: int, cfg) -> dict:
    bm, bk, bn, warps, stages, n_stages = cfg
    lo, hi = hidden_split(hidden)
    return {**dot_meta(x.dtype), "R_LO": lo, "R_HI": hi or 16, "HAS_HI": hi > 0, "BLOCK_M": bm, "BLOCK_K": bk,
            "BLOCK_N": bn, "STAGES": stages, "N_STAGES": n_stages, "num_warps": warps}  # fmt: skip


def mlp_fwd(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Contiguous x [M, K], w1 [R, K], b1 [R], w2 [N, R], b2 [N] -> out [M, N] in x's dtype."""
    rows, width = x.shape
    hidden, out_width = w1.shape[0], w2.shape[0]
    out = new_output(x, (rows, out_width))
    if not rows * out_width:
        return out
    cfg = _config(MLP_CONFIGS, x.dtype)
    bm, bk, bn = cfg[:3]
    descs = (
        TensorDescriptor.from_tensor(x, [bm, bk]),
        *_weights(w1, w2, bk, bn),
        TensorDescriptor.from_tensor(out, [bm, bn]),
    )
    _mlp_fwd[(tma.programs(x.device, triton.cdiv(rows, bm)),)](
        *descs, b1, b2, rows, out_width, width, hidden, **_meta(x, hidden, cfg)
    )
    return out


def decay_fwd(z: Tensor, k: Tensor, w1, b1, w2, b2, c1, cb1, c2, cb2, eps: float) -> Tensor:
    """Contiguous z [M, KZ], k [M, KK] and mdi_decay's weights (one bottleneck R for both MLPs)
    -> gamma [M, N] in z's dtype."""
    rows, hidden, out_width = z.shape[0], w1.shape[0], w2.shape[0]
    gamma = new_output(z, (rows, out_width))
    if not rows * out_width:
        return gamma
    cfg = _config(DECAY_CONFIGS, z.dtype)
    bm, bk, bn = cfg[:3]
    descs = (
        TensorDescriptor.from_tensor(z, [bm, bk]),
        TensorDescriptor.from_tensor(k, [bm, bk]),
        *_weights(w1, w2, bk, bn),
        *_weights(c1, c2, bk, bn),
        TensorDescriptor.from_tensor(gamma, [bm, bn]),
    )
    args = (b1, b2, cb1, cb2, rows, out_width, z.shape[1], k.shape[1], hidden, eps)
    _decay_fwd[(tma.programs(z.device, triton.cdiv(rows, bm)),)](*descs, *args, **_meta(z, hidden, cfg))
    return gamma
