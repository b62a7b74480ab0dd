"""Triton kernel for one MLP of the MDI decay (SPEC §3): out = W2 gelu(W1 x + b1) + b2, with the
bottleneck (width R = D / 4) kept on chip.

Unfused, each MLP is a GEMM, a gelu and a GEMM (biases in the GEMMs' epilogues): the [N, R]
hidden is written, read, written and read again. Here one program owns BLOCK_M rows: the first
GEMM accumulates [BLOCK_M, R_PAD] in registers (R padded to a power of two; the descriptors'
zero fill supplies the padding, so no weight is copied), the bias and the exact (erf) gelu run
on the accumulator, and the second GEMM reads the hidden from registers against BLOCK_N-row
tiles of W2, adding b2 before each output tile leaves by TMA. HBM traffic per row: x read once,
out written once. Persistent: one program per SM walks the row tiles.

The whole decay in one program (both hiddens live, each gamma tile formed from the a and c tiles
of the same columns, so a and c never leave the chip: per row z and k read, gamma written) was
tried and does not fit as written: compiled for sm_90 at R = 192 (padded to 256) it needs 336 KB
of shared memory in fp32 (the limit is 227) and spills registers in fp32 and bf16, with 8 or 16
warps. It would need the hidden split into 128 + 64 columns instead of padded, or one hidden
parked in shared memory, which Triton does not let a kernel place.

The hidden is rounded to the activation dtype before the second GEMM, as F.linear in that
dtype would round it. The backward (op.py) is PyTorch: it recomputes the first GEMM (a quarter
of the forward's products) instead of saving the hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ..config import knobs, new_output
from ..dot import dot_meta, operand

MAX_HIDDEN = 256  # one accumulator's width: a TMA box side is at most 256 elements


@triton.jit
def _hidden(XD, W1D, B1, row, K, R, PRECISION: tl.constexpr, UPCAST: tl.constexpr, R_PAD: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """gelu(x W1^T + b1) of rows row.. row + BLOCK_M, [BLOCK_M, R_PAD] as the next dot's operand
    (rounded to DTYPE, the activations' dtype); columns >= R are 0."""
    acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = operand(XD.load([row, k0]), UPCAST)
        w = operand(W1D.load([0, k0]), UPCAST)
        acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
    hid = tl.arange(0, R_PAD)
    pre = acc + tl.load(B1 + hid, mask=hid < R, other=0.0).to(tl.float32)[None, :]
    # exact gelu; padded columns have pre = 0, so gelu = 0 (and W2's padded columns are 0)
    return operand((0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))).to(DTYPE), UPCAST)


@triton.jit
def _mlp_fwd(
    XD,  # descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    W1D,  # descriptor of w1 [R, K], blocks [R_PAD, BLOCK_K] (rows >= R read as zeros)
    W2D,  # descriptor of w2 [N, R], blocks [BLOCK_N, R_PAD] (columns >= R read as zeros)
    OD,  # descriptor of out [M, N], blocks [BLOCK_M, BLOCK_N]
    B1,  # [R]
    B2,  # [N]
    M,
    N,
    K,
    R,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        row = tile * BLOCK_M
        h = _hidden(XD, W1D, B1, row, K, R, PRECISION, UPCAST, R_PAD, BLOCK_M, BLOCK_K, STAGES, OD.dtype)
        for n0 in tl.range(0, N, BLOCK_N):
            w2 = operand(W2D.load([n0, 0]), UPCAST)
            out = tl.dot(h, w2.T, input_precision=PRECISION)
            cols = n0 + tl.arange(0, BLOCK_N)
            b2 = tl.load(B2 + cols, mask=cols < N, other=0.0).to(tl.float32)
            OD.store([row, n0], (out + b2[None, :]).to(OD.dtype))


def padded_hidden(hidden: int) -> int:
    return max(16, triton.next_power_of_2(hidden))


def supported(x: Tensor, w1: Tensor, *matrices: Tensor) -> bool:
    """The fused kernels take the MLP(s): a bottleneck of at most MAX_HIDDEN, TMA (Hopper or
    later, or the interpreter) and 16-byte aligned rows and bases of every matrix."""
    if not 0 < w1.shape[0] <= MAX_HIDDEN:
        return False
    if not knobs.interpret and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(
        t.shape[1] > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in (x, w1, *matrices)
    )


def config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, warps, stages) for a bottleneck of up to 256. 64 rows over two
    warpgroups, which split the [64, 256] hidden between them: with one warpgroup (4 warps)
    every tile spilled 300-500 bytes a thread on sm_90; with two, fp32 takes 196 registers and
    172 KB of shared memory, bf16 170 and 139 KB, no spills. fp32 tiles are narrower to fit
    shared memory (tests/kernels/test_decay_compiles.py checks all this on the CPU machine)."""
    if knobs.interpret:
        return 16, 16, 16, 1, 1
    return (64, 32, 32, 8, 2) if dtype == torch.float32 else (64, 64, 64, 8, 2)


def mlp_fwd(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Contiguous x [M, K], w1 [R, K], b1 [R], w2 [N, R], b2 [N] -> out [M, N] in x's dtype."""
    rows, width = x.shape
    hidden, out_width = w1.shape[0], w2.shape[0]
    out = new_output(x, (rows, out_width))
    if not rows * out_width:
        return out
    bm, bk, bn, warps, stages = config(x.dtype)
    r_pad = padded_hidden(hidden)
    descs = (
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w1, [r_pad, bk]),
        TensorDescriptor.from_tensor(w2, [bn, r_pad]),
        TensorDescriptor.from_tensor(out, [bm, bn]),
    )
    tiles = triton.cdiv(rows, bm)
    programs = 4 if knobs.interpret else torch.cuda.get_device_properties(x.device).multi_processor_count
    _mlp_fwd[(min(programs, tiles),)](
        *descs, b1, b2, rows, out_width, width, hidden, **dot_meta(x.dtype), R_PAD=r_pad,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out
