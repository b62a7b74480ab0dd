"""Triton decode step of the memory query (SPEC §4, one token per row): the rings read in place.

For a single token at position `pos`, the segment's own slots are all invisible (the band of
kernel.py with t = 0 is `max(0, M_l - n_l) <= i < M_l`), so the query is one softmax over the
filled part of every level's ring, with the level bias. Nothing is concatenated or copied:

- `_decode_split`: one program per (batch row, query head, split). Split s owns the s-th
  contiguous share of every level's ring; the program walks its shares level by level with an
  online softmax (base 2) over [slots, Dh] tiles (q broadcast along the slots, so both
  reductions stay in one register layout), and writes either the finished output (one split)
  or its partial output and log-sum-exp. The G query heads of a memory head read the same
  ring tiles, mostly from L2;
- `_decode_combine`: per (row, query head), the flash-decoding merge of the splits.

The number of splits is chosen so that small batches still fill the GPU (B = 1 with 16 heads
runs 16 x splits programs); from B*H >= 2 x SMs on, one split and one launch. Levels are
passed as separate ring tensors (up to MAX_LEVELS), so the state's rings are read where they lie.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output

MAX_LEVELS = 4
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _level(
    q2,  # [D] fp32, pre-scaled by log2(e) / sqrt(Dh)
    KEYS,
    VALUES,
    BIAS,  # &beta[head, level]
    pos,
    kv_row,  # b * K + kv_head (int64)
    split,
    m_i,  # running max (base 2)
    l_i,  # running sum
    acc,  # running output [D]
    RING: tl.constexpr,
    SPAN: tl.constexpr,
    N_SPLITS: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Fold this split's share of one level's ring into the running (max, sum, output). The
    [S, D] tiles of keys and values share one layout with q broadcast along S, so the two
    reductions need no layout change."""
    bias2 = tl.load(BIAS).to(tl.float32) * _LOG2E
    share = (RING + N_SPLITS - 1) // N_SPLITS
    lo = tl.maximum(RING - tl.minimum(pos // SPAN, RING).to(tl.int32), split * share)
    hi = tl.minimum(RING, (split + 1) * share)
    d = tl.arange(0, BLOCK_D)
    base = kv_row * RING * DH
    for s0 in range(lo, hi, BLOCK_S):
        i = s0 + tl.arange(0, BLOCK_S)
        ok = i < hi
        offs = base + i[:, None] * DH + d[None, :]
        kmask = ok[:, None] & (d < DH)[None, :]
        k = tl.load(KEYS + offs, mask=kmask, other=0.0).to(tl.float32)  # [S, D]
        v = tl.load(VALUES + offs, mask=kmask, other=0.0).to(tl.float32)
        logits = tl.where(ok, tl.sum(k * q2[None, :], axis=1) + bias2, float("-inf"))  # [S]
        m_new = tl.maximum(m_i, tl.max(logits, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_split(
    Q,  # [B, H * Dh]
    K0,
    V0,
    K1,
    V1,
    K2,
    V2,
    K3,
    V3,  # rings [B, K, M_l, Dh], levels past N_LEVELS unused
    BETA,  # [H, L]
    POS,  # [B]
    OUT,  # [B, H * Dh] (one split) or partial outputs [N_SPLITS, B * H, Dh] fp32
    LSE,  # [N_SPLITS, B * H] fp32, base 2 (unused with one split)
    HEADS,
    M0: tl.constexpr,
    M1: tl.constexpr,
    M2: tl.constexpr,
    M3: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    S3: tl.constexpr,
    N_LEVELS: tl.constexpr,
    N_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * H + head
    split = tl.program_id(1)
    b = row // HEADS
    head = row - b * HEADS
    kv_row = b * (HEADS // GROUP) + head // GROUP
    d = tl.arange(0, BLOCK_D)
    q2 = tl.load(Q + row * DH + d, mask=d < DH, other=0.0).to(tl.float32) * (_LOG2E / math.sqrt(DH))
    pos = tl.load(POS + b)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    bias = BETA + head * N_LEVELS
    m_i, l_i, acc = _level(
        q2, K0, V0, bias, pos, kv_row, split, m_i, l_i, acc,
        M0, S0, N_SPLITS, DH, BLOCK_S, BLOCK_D,
    )  # fmt: skip
    if N_LEVELS > 1:
        m_i, l_i, acc = _level(
            q2, K1, V1, bias + 1, pos, kv_row, split, m_i, l_i, acc,
            M1, S1, N_SPLITS, DH, BLOCK_S, BLOCK_D,
        )  # fmt: skip
    if N_LEVELS > 2:
        m_i, l_i, acc = _level(
            q2, K2, V2, bias + 2, pos, kv_row, split, m_i, l_i, acc,
            M2, S2, N_SPLITS, DH, BLOCK_S, BLOCK_D,
        )  # fmt: skip
    if N_LEVELS > 3:
        m_i, l_i, acc = _level(
            q2, K3, V3, bias + 3, pos, kv_row, split, m_i, l_i, acc,
            M3, S3, N_SPLITS, DH, BLOCK_S, BLOCK_D,
        )  # fmt: skip
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)  # a row that sees nothing gives 0
    if N_SPLITS == 1:
        tl.store(OUT + row * DH + d, out.to(OUT.dtype.element_ty), mask=d < DH)
    else:
        part = split * tl.num_programs(0) + row
        tl.store(OUT + part * DH + d, out, mask=d < DH)
        tl.store(LSE + part, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")))


@triton.jit
def _decode_combine(
    PART,  # [N_SPLITS, B * H, Dh] fp32
    LSE,  # [N_SPLITS, B * H] fp32, base 2
    OUT,  # [B, H * Dh] == [B * H, Dh]
    N_SPLITS: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * H + head
    rows_total = tl.num_programs(0)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok = n < N_SPLITS
    lse = tl.load(LSE + n * rows_total + row, mask=n_ok, other=float("-inf"))
    peak = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(peak == float("-inf"), 0.0, peak))  # splits that saw nothing weigh 0
    part_offs = (n * rows_total + row)[:, None] * DH + d[None, :]
    part = tl.load(PART + part_offs, mask=n_ok[:, None] & (d < DH)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + row * DH + d, out.to(OUT.dtype.element_ty), mask=d < DH)


def _splits(rows: int, longest_ring: int, block_s: int, device: torch.device) -> int:
    """Splits per (row, memory head): enough programs for two per SM, no split under a tile."""
    if knobs.interpret:
        return min(3, triton.cdiv(longest_ring, block_s))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, rows), triton.cdiv(longest_ring, block_s), 32))


def decode(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    beta: Tensor,
    pos: Tensor,
    spans: list[int],
    heads: int,
    n_splits: int | None = None,
) -> Tensor:
    """q [B, 1, H*Dh], rings keys/values[l] [B, K, M_l, Dh] (contiguous), beta [H, L], pos [B]
    -> the memory read [B, 1, H*Dh] in q's dtype."""
    bsz, kv_heads, _, dim = keys[0].shape
    levels = len(keys)
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"hds_decode: 1 to {MAX_LEVELS} memory levels supported, got {levels}")
    rings = [k.shape[2] for k in keys]
    block_d = triton.next_power_of_2(dim)
    block_s = 16 if knobs.interpret else max(16, min(128, 8192 // block_d))
    splits = n_splits or _splits(bsz * heads, max(rings), block_s, q.device)
    pad = MAX_LEVELS - levels
    ring_args = [t for pair in zip(keys, values, strict=True) for t in pair] + [keys[0], values[0]] * pad
    sizes = dict(zip(("M0", "M1", "M2", "M3"), rings + [1] * pad, strict=True))
    sizes.update(zip(("S0", "S1", "S2", "S3"), list(spans) + [1] * pad, strict=True))
    meta = dict(N_LEVELS=levels, GROUP=heads // kv_heads, DH=dim, BLOCK_S=block_s, BLOCK_D=block_d)
    out = new_output(q)
    warps = 1 if knobs.interpret else 4
    if splits == 1:
        args = (q, *ring_args, beta, pos, out, out, heads)
        _decode_split[(bsz * heads, 1)](*args, **sizes, **meta, N_SPLITS=1, num_warps=warps)
        return out
    part = new_output(q, (splits, bsz * heads, dim), torch.float32)
    lse = new_output(q, (splits, bsz * heads), torch.float32)
    args = (q, *ring_args, beta, pos, part, lse, heads)
    _decode_split[(bsz * heads, splits)](*args, **sizes, **meta, N_SPLITS=splits, num_warps=warps)
    _decode_combine[(bsz * heads,)](
        part, lse, out, N_SPLITS=splits, DH=dim, BLOCK_N=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=1
    )
    return out
