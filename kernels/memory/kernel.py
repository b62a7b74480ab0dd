"""Triton kernels for the hierarchical-memory query (SPEC §4).

The candidate slots of a segment are laid out level after level: level l holds its carried ring
(M_l slots, oldest first) then the ceil(T / S_l) slots the segment may complete. For a row whose
position is `pos` (n_l = pos // S_l level-l slots complete before the segment, r_l = pos % S_l),
token t has completed d_t = (r_l + t) // S_l level-l slots inside the segment, and SPEC's
visibility (the M_l newest level-l slots completed before the token's own block, none before
the stream's start) is the contiguous range of level-local indices

    max(d_t, M_l - n_l)  <=  i  <  M_l + d_t.

So nothing about visibility is loaded: every bound is integer arithmetic on the token index, and
each token tile walks only the slot tiles its band touches (like causal attention skipping
tiles above the diagonal). Both bounds only move forward with t, so every token of a tile sees
[lo of its last token, hi of its first): slot tiles inside that range skip the mask (a
tile-uniform branch), which leaves the mask on the few tiles at a band's two edges. The logits
carry the level bias beta[head, level] and the softmax runs in base 2, with the scale, bias and
shift folded into one FMA per logit; products take the inputs' dtype on tensor cores (exact fp32
for fp32 inputs) with fp32 accumulation.

Forward softmax by a fixed shift: every token's probabilities are 2^(logit - m) with m the
largest logit level 0's first slot tile shows it, fixed for the whole walk, so the loop keeps no
running max and never rescales its sums (on sm_90, 154 instructions per 64 x 32 tile instead of
235 with the running max). The result does not depend on m as long as no 2^(logit - m) leaves
the range of fp32 (and of the probabilities' bf16/fp16 for the value product): m is a visible
logit, so the largest probability is 1, and after the walk the program checks the rest (the sum
in [1/2, 2^100], |acc| <= 2^120, m known) and walks the tile again with the online softmax where
it fails. So the output is the online softmax's in every case; only the time differs (a
100-octave spread of logits costs the second walk).

Backward (FlashAttention-2 style, probabilities recomputed from the saved log-sum-exp), split:
- `_attend_bwd_dq`: per token tile, dq and the level-bias gradient (a part per program and
  level, summed on the host), and for the next kernel delta = rowsum(dout * out) / sqrt(Dh)
  and the base-2 LSE;
- `_attend_bwd_dkv`: per slot tile (one level), the tokens that see it, every query head of its
  memory head's group, computed transposed ([slots, tokens]) so p^T and ds^T are the left
  operands of the dv and dk products straight from registers; dk and dv accumulate in
  registers and are stored once, no atomics. Its ds comes out times 1 / sqrt(Dh) (the scaled
  delta), as dk and dq need it.
Or fused (`_bwd_mode`): `_attend_bwd_stats` writes delta and the LSE, and the dk/dv kernel also
adds each slot tile's dq into an fp32 buffer, by TMA reductions or atomics (not the same bits
from run to run; the split backward is, and runs under torch.use_deterministic_algorithms).

With MMREC_MEMORY_TMA=1 the forward and dq kernels load slot tiles by TMA on Hopper (`_tma_ok`).

With a residual (HAS_RES; the block's h + m, moved here by fuse-residual-epilogue) the forward
stores residual + m and m never reaches HBM alone; the dq kernel (or, fused, the stats kernel)
takes the residual off the saved output again for delta. In bf16/fp16 that difference carries the rounding of the sum,
2^-9 |h + m| instead of 2^-9 |m| (the delta of FlashAttention-2 from its rounded output).
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import fp32_dot_precision, knobs, new_output
from ..dot import dot_meta, operand
from ..launch import Launcher
from . import dkv_gluon

LOG2E = 1.4426950408889634
LOG2E_TL = tl.constexpr(LOG2E)


@triton.jit
def _band_origin(POS, RING, SPAN, b, lvl):
    """Level `lvl` for batch row b: ring size, span, the row's offset into its current block, and
    the lowest visible local index (slots before the stream's start are never seen)."""
    ring = tl.load(RING + lvl)
    span = tl.load(SPAN + lvl)
    pos = tl.load(POS + b)
    n_before = pos // span
    r = (pos - n_before * span).to(tl.int32)
    return ring, span.to(tl.int32), r, ring - tl.minimum(n_before, ring).to(tl.int32)


@triton.jit
def _band(t, ring, span, r, floor):
    """The visible local-index band [lo, hi) of tokens t (int32 arithmetic only)."""
    d = (r + t) // span
    return tl.maximum(d, floor), ring + d


@triton.jit
def _within(x, lo, width):
    """lo <= x < lo + width (broadcast; width >= 0) as one unsigned compare: x - lo wraps past
    any width where x < lo. A compare and a select an element, not two of each."""
    return (x - lo).to(tl.uint32, bitcast=True) < width.to(tl.uint32, bitcast=True)


@triton.jit
def _band_mask(lo, hi, i):
    """[BLOCK_T, BLOCK_S]: token (row) sees slot i (lo <= hi: `_band`)."""
    return _within(i[None, :], lo[:, None], (hi - lo)[:, None])


@triton.jit
def _edge(i0, lo_all, hi_all, BLOCK: tl.constexpr):
    """Whether tile [i0, i0 + BLOCK) needs the visibility mask. Slot tiles of a token tile: every
    token of it sees [lo_all, hi_all) (the bands only move forward with the token), so slot tiles
    inside skip it; token tiles of a slot tile (dk/dv) likewise, with [lo_all, hi_all) the tokens
    that see every slot of it."""
    return (i0 < lo_all) | (i0 + BLOCK > hi_all)


@triton.jit
def _token_tile(T, n_slots, HEADS, GROUP, DH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a (token tile, batch row x query head) program addresses: its batch row and head, its
    tokens, columns and their masks, the offsets of its q/out rows, the row of its memory head's
    first candidate in [B * K * S, Dh], and its last valid token."""
    pid_bh = tl.program_id(1)
    b, head = pid_bh // HEADS, pid_bh % HEADS
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    q_offs = (b * T + t).to(tl.int64)[:, None] * (HEADS * DH) + head * DH + cols[None, :]
    kv_row = (b * (HEADS // GROUP) + head // GROUP).to(tl.int64) * n_slots
    t_last = tl.minimum(tl.program_id(0) * BLOCK_T + BLOCK_T, T) - 1
    return b, head, t, cols, t < T, cols < DH, q_offs, kv_row, t_last


@triton.jit
def _level_walk(POS, RING, SPAN, START, BETA, b, head, lvl, n_levels, t, t_last, BLOCK_T: tl.constexpr):
    """For one level: the tokens' bands [lo, hi), the slot range the tile walks
    [lo of its first token, hi of its last), the range every token sees [lo of the last token,
    hi of the first), the level's first candidate, and the base-2 bias."""
    ring, span, r, floor = _band_origin(POS, RING, SPAN, b, lvl)
    lo, hi = _band(t, ring, span, r, floor)
    lo_first, hi_first = _band(tl.program_id(0) * BLOCK_T, ring, span, r, floor)
    lo_last, hi_last = _band(t_last, ring, span, r, floor)
    bias2 = tl.load(BETA + head * n_levels + lvl).to(tl.float32) * LOG2E_TL
    return lo, hi, lo_first, hi_last, lo_last, hi_first, tl.load(START + lvl), bias2


@triton.jit
def _slot_ptrs(KEYS, VALUES, kv_row, start, i0, cols, DH: tl.constexpr, BLOCK_S: tl.constexpr):
    """Where a level's walk starts at local slot i0: pointers to the key and value rows
    [BLOCK_S, BLOCK_D] of slots i0, i0 + 1, ..., and their row in [B * K * S, Dh] (for TMA)."""
    row = kv_row + start + i0
    offs = row * DH + tl.arange(0, BLOCK_S)[:, None] * DH + cols[None, :]
    return KEYS + offs, VALUES + offs, row.to(tl.int32)


@triton.jit
def _slot_tile(K_DESC, V_DESC, k_ptrs, v_ptrs, row, i, hi_last, col_ok, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Keys and values [BLOCK_S, BLOCK_D] of level-local slots i: by TMA from descriptor row `row`
    (rows at or past hi_last come as they are, other levels', heads' or batch rows' slots, and
    the caller zeroes them on its edge tiles), or by pointer loads that read those rows as 0."""
    if TMA:
        kt = K_DESC.load([row, 0])
        vt = V_DESC.load([row, 0])
    else:
        ok = (i < hi_last)[:, None] & col_ok[None, :]
        kt = tl.load(k_ptrs, mask=ok, other=0.0)
        vt = tl.load(v_ptrs, mask=ok, other=0.0)
    return operand(kt, UPCAST), operand(vt, UPCAST)


@triton.jit
def _tile_logits(
    q, kt, vt, i, i0, lo, hi, lo_all, hi_all, hi_last, WIDTH: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr
):
    """Raw logits q k^T [BLOCK_T, WIDTH] of the slot tile at local index i0 (slots i), -inf where
    a token does not see the slot (only on the band's edge tiles), and its value rows."""
    qk = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
    if _edge(i0, lo_all, hi_all, WIDTH):
        qk = tl.where(_band_mask(lo, hi, i), qk, float("-inf"))
        if TMA:  # rows past the band hold other rows' slots: a NaN there must not leak
            vt = tl.where((i < hi_last)[:, None], vt, 0.0)
    return qk, vt


@triton.constexpr_function
def _on_tensor_cores(dtype, precision):
    """Whether the forward's products run on tensor cores: 16-bit inputs, or fp32 as TF32 (as
    `dot.tensor_cores`, from the kernel's side). There the walk keeps its row sums in four parts
    (`_row_parts`) and ends each level with half tiles; products on the CUDA cores (exact fp32,
    fp64) take one masked loop and plain row sums (H200: 7.35 ms against 7.99 with both). Under
    the interpreter this follows the inputs too, so its fp32 and bf16 tests cover both walks."""
    return dtype in (tl.float16, tl.bfloat16) or precision != "ieee"


@triton.jit
def _row_parts(p, PARTS: tl.constexpr):
    """The row sums of p [BLOCK_T, WIDTH] as PARTS parts a row, [BLOCK_T, PARTS], added up after
    the walk. 4 on tensor cores: in their accumulator layouts (mma v2 and v3) a thread holds the
    columns 8 j + 2 c + e of its rows, c its lane in a quad, so summing over j and e stays inside
    the thread and the walk adds no shuffles per tile. 1 for products on the CUDA cores, whose
    layout has no such split (the reshape added shuffles there)."""
    if PARTS == 4:
        parts = tl.reshape(p, [p.shape[0], p.shape[1] // 8, 4, 2])
        return tl.sum(tl.sum(parts, axis=3), axis=1)
    else:
        return tl.sum(p, axis=1, keep_dims=True)


@triton.jit
def _accumulate(
    qk, vt, m, l, acc, bias2, qk_scale, P_DTYPE: tl.constexpr, ONLINE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One slot tile's share of the softmax: ONLINE, the running max's (rescaling l and acc when
    it grows); else every probability is 2^(logit - m) for the fixed shift m, no max and no
    rescaling. Probabilities are rounded to P_DTYPE (the values' dtype) for the product, as on
    the GPU also when the operands are upcast."""
    if ONLINE:
        # Base-2 logits are qk * qk_scale + bias2 (a positive scale: the max commutes with it).
        m_new = tl.maximum(m, tl.max(qk, axis=1) * qk_scale + bias2)
        # While nothing is visible m stays -inf; shift by 0 so no inf - inf appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale + (bias2 - shift)[:, None])
        alpha = tl.math.exp2(m - shift)
        l = l * alpha[:, None] + _row_parts(p, l.shape[1])
        pv = operand(p.to(P_DTYPE), UPCAST)
        acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision=PRECISION)
        m = m_new
    else:
        p = tl.math.exp2(qk * qk_scale + (bias2 - m)[:, None])
        l += _row_parts(p, l.shape[1])
        acc = tl.dot(operand(p.to(P_DTYPE), UPCAST), vt, acc, input_precision=PRECISION)
    return m, l, acc


@triton.jit
def _origin(pos, RING: tl.constexpr, SPAN: tl.constexpr):
    """A level's band origin for a row at stream position `pos` (RING and SPAN constexpr, so
    the divisions are by constants): the row's offset into its current block and the lowest
    visible local index (slots before the stream's start are never seen)."""
    n_before = pos // SPAN
    return (pos - n_before * SPAN).to(tl.int32), RING - tl.minimum(n_before, RING).to(tl.int32)


@triton.jit
def _level_count(T, RING: tl.constexpr, SPAN: tl.constexpr):
    """A level's candidates for a segment of T tokens: its ring, then the ceil(T / S) slots the
    segment may complete (`Levels.counts` on the host)."""
    return RING + (T + SPAN - 1) // SPAN


@triton.jit
def _pick(k, bounds, values):
    """values[j] for the level j whose tiles hold walk tile k (bounds[j]: its first tile)."""
    v = values[0]
    for j in tl.static_range(1, len(values)):
        v = tl.where(k >= bounds[j], values[j], v)
    return v


@triton.jit
def _walk_plan(
    pos, BETA, head, T, t, t_first, t_last, SKIP_FIRST: tl.constexpr, PART: tl.constexpr, RINGS: tl.constexpr,
    SPANS: tl.constexpr, BLOCK_S: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """Every level's slot tiles as one walk (`_walk_tiles`): tile k of level j holds the local
    indices loc_j + k WIDTH + [0, WIDTH), those from split_j on moved up by gap_j. Per level
    (tuples): its first tile `bounds`, the candidate index of loc_j `bases`, the base-2 bias,
    split and gap, and relative to loc_j: the tiles that skip the mask (inner_lo <= k WIDTH <=
    inner_hi) and the band's end. With [first, hi_last) the slots some token of the tile sees
    (less the shift tile: SKIP_FIRST) and [lo_last, hi_first) those every token sees, a level's
    tiles are: PART 0, [first, hi_last), the last masked at its end; PART 1, the whole BLOCK_S
    tiles from a = max(first, lo_last) that every token sees (no mask, no test); PART 2, what 1
    leaves, the slots before a (some tokens do not see them) and fewer than a tile after its
    tiles, as WIDTH-wide tiles across the gap, tested as PART 0's.
    -> (whether each token sees any slot, the tile count, those tuples)."""
    seen = t < 0
    n_tiles = 0
    start = 0
    bounds = ()
    bases = ()
    biases = ()
    inner_lo = ()
    inner_hi = ()
    ends = ()
    splits = ()
    gaps = ()
    for j in tl.static_range(len(RINGS)):
        r, floor = _origin(pos, RINGS[j], SPANS[j])
        lo, hi = _band(t, RINGS[j], SPANS[j], r, floor)
        seen = seen | (hi > lo)
        lo_first, hi_first = _band(t_first, RINGS[j], SPANS[j], r, floor)
        lo_last, hi_last = _band(t_last, RINGS[j], SPANS[j], r, floor)
        first = lo_first
        if SKIP_FIRST and j == 0:
            first += BLOCK_S
        split = 0  # PART 2 only: the slots before a, then the gap over the whole tiles
        gap = 0
        if PART == 0:
            n = tl.maximum(hi_last - first, 0)
        else:
            a = tl.maximum(first, lo_last)
            whole = tl.maximum(hi_first - a, 0) // BLOCK_S * BLOCK_S
            if PART == 1:
                first = a
                n = whole
            else:
                split = tl.maximum(tl.minimum(a, hi_last) - first, 0)  # slots before a
                gap = a + whole - first - split
                n = split + tl.maximum(hi_last - a - whole, 0)
        loc = first - n_tiles * WIDTH
        bounds += (n_tiles,)
        bases += (start + loc,)
        biases += (tl.load(BETA + head * len(RINGS) + j).to(tl.float32) * LOG2E_TL,)
        split_at = split + n_tiles * WIDTH  # relative to loc
        splits += (split_at,)
        gaps += (gap,)
        # Tiles from split on start at or past lo_last, so they are at an edge only at their end.
        inner_lo += (tl.minimum(lo_last - loc, split_at) if PART == 2 else lo_last - loc,)
        inner_hi += (hi_first - WIDTH - loc - gap,)
        ends += (hi_last - loc,)
        n_tiles += (n + WIDTH - 1) // WIDTH
        start += _level_count(T, RINGS[j], SPANS[j])
    return seen, n_tiles, bounds, bases, biases, inner_lo, inner_hi, ends, splits, gaps


@triton.jit
def _tile_band(pos, T, t, k, bounds, bases, RINGS: tl.constexpr, SPANS: tl.constexpr):
    """The tokens' bands [lo, hi) in walk tile k's level, relative to that level's loc (edge
    tiles only: every level's band is computed and the tile's picked; loc_j = bases[j] minus
    the level's first candidate, so the walk keeps no register for it)."""
    los = ()
    his = ()
    start = 0
    for j in tl.static_range(len(RINGS)):
        r, floor = _origin(pos, RINGS[j], SPANS[j])
        lo, hi = _band(t, RINGS[j], SPANS[j], r, floor)
        loc = bases[j] - start
        los += (lo - loc,)
        his += (hi - loc,)
        start += _level_count(T, RINGS[j], SPANS[j])
    return _pick(k, bounds, los), _pick(k, bounds, his)


@triton.jit
def _walk_tiles(
    q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols, col_ok,
    qk_scale, ONLINE: tl.constexpr, PART: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr,
    WIDTH: tl.constexpr, RINGS: tl.constexpr, SPANS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One loop over the tiles `_walk_plan(PART)` lays out, every level's in turn, so the
    software pipeline runs across level boundaries instead of draining and refilling at each
    level. PART 1's tiles take no mask and no test. -> (m, l, acc, whether each token sees any slot)."""
    seen, n_tiles, bounds, bases, biases, inner_lo, inner_hi, ends, splits, gaps = _walk_plan(
        pos, BETA, head, T, t, t_first, t_last, not ONLINE, PART, RINGS, SPANS, BLOCK_S, WIDTH
    )
    rows = tl.arange(0, WIDTH)
    offs = rows[:, None] * DH + cols[None, :]
    k_head, v_head = KEYS + kv_row * DH, VALUES + kv_row * DH  # this memory head's candidates
    for k in range(0, n_tiles):
        kk = k * WIDTH
        base = _pick(k, bounds, bases)  # the candidate of the tile level's loc (int32)
        i = kk + rows  # local slot indices, relative to the level's loc
        if PART == 2:  # across the gap left by the whole tiles
            i += tl.where(i >= _pick(k, bounds, splits), _pick(k, bounds, gaps), 0)
        if TMA:
            kt = K_DESC.load([kv_row.to(tl.int32) + base + kk, 0])
            vt = V_DESC.load([kv_row.to(tl.int32) + base + kk, 0])
        elif PART == 1:  # whole tiles load without row masks
            kt = tl.load(k_head + ((base + kk) * DH + offs), mask=col_ok[None, :], other=0.0)
            vt = tl.load(v_head + ((base + kk) * DH + offs), mask=col_ok[None, :], other=0.0)
        else:
            ok = (i < _pick(k, bounds, ends))[:, None] & col_ok[None, :]
            kv_offs = (base + i)[:, None] * DH + cols[None, :]
            kt = tl.load(k_head + kv_offs, mask=ok, other=0.0)
            vt = tl.load(v_head + kv_offs, mask=ok, other=0.0)
        kt, vt = operand(kt, UPCAST), operand(vt, UPCAST)
        qk = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
        if PART != 1:  # noqa: SIM102 (a compile-time choice around a runtime test)
            if (kk < _pick(k, bounds, inner_lo)) | (kk > _pick(k, bounds, inner_hi)):
                lo, hi = _tile_band(pos, T, t, k, bounds, bases, RINGS, SPANS)
                qk = tl.where(_band_mask(lo, hi, i), qk, float("-inf"))
                if TMA:  # rows past the band hold other rows' slots: a NaN there must not leak
                    vt = tl.where((i < _pick(k, bounds, ends))[:, None], vt, 0.0)
        m, l, acc = _accumulate(
            qk, vt, m, l, acc, _pick(k, bounds, biases), qk_scale, VALUES.dtype.element_ty, ONLINE, PRECISION, UPCAST
        )
    return m, l, acc, seen


@triton.jit
def _attend_walk(
    q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols, col_ok,
    qk_scale, ONLINE: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr, RINGS: tl.constexpr,
    SPANS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The softmax walk over every level's visible slots from (m, l, acc): -> (m, l, acc, whether
    the token sees any slot). ONLINE walks everything with the running max; the fixed-shift walk
    starts after level 0's first tile, which set its shift (`_attend_fwd`). With half tiles
    (pointer loads, as a TMA box has one width; products on tensor cores: `_on_tensor_cores`)
    one loop takes the whole tiles that every token of the tile sees, loaded without row masks
    and with no mask or test, and a second the rest of every level (slots some tokens do not see,
    and fewer than a tile after the whole ones) as half-width tiles, each tested and masked at
    the band's edges, so a ring of 240 slots costs 240 columns, not 256; else one loop with each
    level's last tile masked. Moving the edge tiles out of the first loop took the test off its
    tiles (sm_90: 143 -> 132 instructions a tile at three levels; H200: forward 2.2-3.6% faster,
    session 25)."""
    # A GPU dot's sides are at least 16; the interpreter (UPCAST) takes its 16-slot tiles' halves.
    # Products on the CUDA cores keep one masked loop (`_on_tensor_cores`).
    TENSOR_CORES: tl.constexpr = _on_tensor_cores(KEYS.dtype.element_ty, PRECISION)
    HALF: tl.constexpr = BLOCK_S // 2 if not TMA and (BLOCK_S >= 32 or UPCAST) and TENSOR_CORES else 0
    if HALF > 0:
        m, l, acc, seen = _walk_tiles(
            q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols,
            col_ok, qk_scale, ONLINE, 1, DH, BLOCK_S, BLOCK_S, RINGS, SPANS, PRECISION, UPCAST, TMA,
        )  # fmt: skip
        m, l, acc, _ = _walk_tiles(
            q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols,
            col_ok, qk_scale, ONLINE, 2, DH, BLOCK_S, HALF, RINGS, SPANS, PRECISION, UPCAST, TMA,
        )  # fmt: skip
    else:
        m, l, acc, seen = _walk_tiles(
            q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols,
            col_ok, qk_scale, ONLINE, 0, DH, BLOCK_S, BLOCK_S, RINGS, SPANS, PRECISION, UPCAST, TMA,
        )  # fmt: skip
    return m, l, acc, seen


@triton.jit
def _attend_fwd(
    Q,
    KEYS,
    VALUES,
    BETA,
    POS,
    K_DESC,
    V_DESC,  # TMA: tensor descriptors of KEYS / VALUES as [B * K * S, Dh] (else unused)
    OUT,
    LSE,
    T,
    n_slots,
    HEADS,
    GROUP,
    qk_scale,  # log2(e) / sqrt(Dh)
    RES,  # [B, T, H*Dh]: added to the output with HAS_RES (fuse-residual-epilogue; else unused)
    RINGS: tl.constexpr,  # per level: ring size M_l and span S_l (the divisions by them are by constants)
    SPANS: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands (the interpreter's tl.dot mishandles bf16)
    TMA: tl.constexpr = False,  # slot tiles by tensor-memory-accelerator loads (Hopper)
    HAS_RES: tl.constexpr = False,
):
    b, head, t, cols, t_ok, col_ok, q_offs, kv_row, t_last = _token_tile(T, n_slots, HEADS, GROUP, DH, BLOCK_T, BLOCK_D)
    t_first = tl.program_id(0) * BLOCK_T
    pos = tl.load(POS + b)
    q = operand(tl.load(Q + q_offs, mask=t_ok[:, None] & col_ok[None, :], other=0.0), UPCAST)
    # The softmax's fixed shift: per token, the largest visible logit of level 0's first slot
    # tile (-inf where it shows the token nothing), the first tile of the walk.
    r, floor = _origin(pos, RINGS[0], SPANS[0])
    lo, hi = _band(t, RINGS[0], SPANS[0], r, floor)
    lo_first, hi_first = _band(t_first, RINGS[0], SPANS[0], r, floor)
    lo_last, hi_last = _band(t_last, RINGS[0], SPANS[0], r, floor)
    bias2 = tl.load(BETA + head * len(RINGS)).to(tl.float32) * LOG2E_TL
    k_ptrs, v_ptrs, row = _slot_ptrs(KEYS, VALUES, kv_row, 0, lo_first, cols, DH, BLOCK_S)
    i = lo_first + tl.arange(0, BLOCK_S)
    kt, vt = _slot_tile(K_DESC, V_DESC, k_ptrs, v_ptrs, row, i, hi_last, col_ok, UPCAST, TMA)
    qk, vt = _tile_logits(q, kt, vt, i, lo_first, lo, hi, lo_last, hi_first, hi_last, BLOCK_S, PRECISION, TMA)
    m = tl.max(qk, axis=1) * qk_scale + bias2
    known = m > float("-inf")
    m = tl.where(known, m, 0.0)
    # Row sums in parts (`_row_parts`): 4 where the products run on tensor cores, else 1.
    zero_l = tl.zeros([BLOCK_T, 4 if _on_tensor_cores(KEYS.dtype.element_ty, PRECISION) else 1], dtype=tl.float32)
    zero_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    m, l, acc = _accumulate(
        qk, vt, m, zero_l, zero_acc, bias2, qk_scale, VALUES.dtype.element_ty, False, PRECISION, UPCAST
    )
    m, l, acc, seen = _attend_walk(
        q, m, l, acc, KEYS, VALUES, K_DESC, V_DESC, pos, BETA, head, T, t, t_first, t_last, kv_row, cols, col_ok,
        qk_scale, False, DH, BLOCK_S, RINGS, SPANS, PRECISION, UPCAST, TMA,
    )  # fmt: skip
    l = tl.sum(l, axis=1)
    # With m one of the token's visible logits its largest probability is 1, so l >= 1 and the
    # bf16/fp16 probabilities of the value product keep their precision; the shift fails where
    # some visible logit lies over 100 octaves above m (l or acc out of range, inf or NaN), or
    # where level 0's first tile showed the token nothing (m unknown: possible when level 0's
    # slots span at most BLOCK_T / BLOCK_S tokens). Then the whole tile is walked again with the
    # online softmax, so the result never depends on the shift.
    fine = known & (l >= 0.5) & (l <= 2.0**100) & (tl.max(tl.abs(acc), axis=1) <= 2.0**120)
    if tl.max((seen & t_ok & ~fine).to(tl.int32), axis=0) > 0:
        m, l, acc, seen = _attend_walk(
            q, tl.full([BLOCK_T], float("-inf"), dtype=tl.float32), zero_l, zero_acc, KEYS, VALUES, K_DESC, V_DESC,
            pos, BETA, head, T, t, t_first, t_last, kv_row, cols, col_ok, qk_scale, True, DH, BLOCK_S, RINGS, SPANS,
            PRECISION, UPCAST, TMA,
        )  # fmt: skip
        l = tl.sum(l, axis=1)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if HAS_RES:  # the residual add of the block (h + m) in the epilogue: m is never written alone
        out += tl.load(RES + q_offs, mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + q_offs, out.to(OUT.dtype.element_ty), mask=t_ok[:, None] & col_ok[None, :])
    # Natural-log LSE (what the reference returns); -inf where nothing is visible.
    lse = tl.where(l > 0, (m + tl.math.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + (b * HEADS + head).to(tl.int64) * T + t, lse, mask=t_ok)


@triton.jit
def _attend_bwd_dq(
    Q,
    KEYS,
    VALUES,
    BETA,
    POS,
    START,
    RING,
    SPAN,
    K_DESC,
    V_DESC,  # TMA: tensor descriptors of KEYS / VALUES as [B * K * S, Dh] (else unused)
    LSE,
    OUT,
    STATS,  # [2, B, H, T] fp32, written here for the dk/dv kernel: rowsum(dout * out) / sqrt(Dh), base-2 lse
    DOUT,
    DQ,
    DBETA,  # [H, L, token tiles x B] fp32: each program's share of the level-bias gradient
    T,
    n_slots,
    n_levels,
    HEADS,
    GROUP,
    qk_scale,
    scale,  # 1 / sqrt(Dh)
    RES,  # with HAS_RES: the residual the forward added to OUT, taken off again for delta
    DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands (the interpreter's tl.dot mishandles bf16)
    TMA: tl.constexpr = False,  # slot tiles by tensor-memory-accelerator loads (Hopper)
    HAS_RES: tl.constexpr = False,
):
    b, head, t, cols, t_ok, col_ok, q_offs, kv_row, t_last = _token_tile(T, n_slots, HEADS, GROUP, DH, BLOCK_T, BLOCK_D)
    row_ok = t_ok[:, None] & col_ok[None, :]
    q = operand(tl.load(Q + q_offs, mask=row_ok, other=0.0), UPCAST)
    do = operand(tl.load(DOUT + q_offs, mask=row_ok, other=0.0), UPCAST)
    delta, lse2 = _token_stats(LSE, OUT, RES, STATS, do, b, head, t, t_ok, q_offs, row_ok, T, HEADS, scale, HAS_RES)
    # Padding tokens (t >= T) give p = 0 everywhere, so a large bias cannot make inf * 0 there.
    lse2 = tl.where(t_ok, lse2, float("inf"))

    dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for lvl in range(n_levels):
        lo, hi, lo_first, hi_last, lo_all, hi_all, start, bias2 = _level_walk(
            POS, RING, SPAN, START, BETA, b, head, lvl, n_levels, t, t_last, BLOCK_T
        )
        k_ptrs, v_ptrs, row = _slot_ptrs(KEYS, VALUES, kv_row, start, lo_first, cols, DH, BLOCK_S)
        dbeta = tl.zeros([BLOCK_T], dtype=tl.float32)
        for i0 in range(lo_first, hi_last, BLOCK_S):
            i = i0 + tl.arange(0, BLOCK_S)
            kt, vt = _slot_tile(K_DESC, V_DESC, k_ptrs, v_ptrs, row, i, hi_last, col_ok, UPCAST, TMA)
            qk = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            p = tl.math.exp2(qk * qk_scale + (bias2 - lse2)[:, None])
            if _edge(i0, lo_all, hi_all, BLOCK_S):
                p = tl.where(_band_mask(lo, hi, i), p, 0.0)
                if TMA:  # rows past the band hold other rows' slots: a NaN there must not leak
                    keep = (i < hi_last)[:, None]
                    kt, vt = tl.where(keep, kt, 0.0), tl.where(keep, vt, 0.0)
            dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # d logits (natural units)
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
            dbeta += tl.sum(ds, axis=1)
            k_ptrs += BLOCK_S * DH
            v_ptrs += BLOCK_S * DH
            row += BLOCK_S
        # Summed by the host along the last axis (contiguous: a cheap reduction), in a fixed
        # order: the same bits every run.
        part = ((head * n_levels + lvl) * tl.num_programs(0) + tl.program_id(0)) * (tl.num_programs(1) // HEADS) + b
        tl.store(DBETA + part, tl.sum(dbeta, axis=0))
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok)


@triton.jit
def _seen(p_t, t, seen_lo, seen_hi):
    """p^T [slots, tokens] with 0 where the token does not see the slot. (Two compares: `_within`'s
    one unsigned compare compiled to 623 sm_90 instructions a loop here against 584.)"""
    return tl.where((t[None, :] >= seen_lo[:, None]) & (t[None, :] < seen_hi[:, None]), p_t, 0.0)


@triton.constexpr_function
def _fold_scale(dtype):
    """Whether the dk/dv kernel's ds carries the scale 1 / sqrt(Dh) for inputs of `dtype` (folded
    into its subtraction, delta stored scaled): not for fp16, whose ds^T operand would lose 3-4
    more binades to underflow (a review's simulation: dk's error 8x larger at dout ~ 1e-3);
    FlashAttention-2 keeps ds unscaled too. bf16 and fp32 have fp32's exponent range."""
    return dtype != tl.float16


@triton.jit
def _token_stats(LSE, OUT, RES, STATS, do, b, head, t, t_ok, offs, row_ok, T, HEADS, scale, HAS_RES: tl.constexpr):
    """Per token of a tile, what the dk/dv kernel reads (stored to STATS [2, B, H, T]):
    delta = rowsum(dout * out), with the forward's residual taken off out again (HAS_RES),
    stored times `scale` (1 / sqrt(Dh): the dk/dv kernel's ds comes out scaled, see there; not for
    fp16, `_fold_scale`), and the base-2 LSE, 0 where nothing is visible. -> (delta unscaled, that
    LSE)."""
    out = tl.load(OUT + offs, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        out -= tl.load(RES + offs, mask=row_ok, other=0.0).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * out, axis=1)
    stat_offs = (b * HEADS + head).to(tl.int64) * T + t
    lse = tl.load(LSE + stat_offs, mask=t_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E_TL)
    if _fold_scale(OUT.dtype.element_ty):
        tl.store(STATS + stat_offs, delta * scale, mask=t_ok)
    else:
        tl.store(STATS + stat_offs, delta, mask=t_ok)
    tl.store(STATS + tl.num_programs(1).to(tl.int64) * T + stat_offs, lse2, mask=t_ok)
    return delta, lse2


@triton.jit
def _attend_bwd_stats(
    LSE,
    OUT,
    DOUT,
    STATS,  # [2, B, H, T] fp32: rowsum(dout * out) / sqrt(Dh), and the base-2 lse (0 where nothing is visible)
    T,
    HEADS,
    scale,  # 1 / sqrt(Dh)
    RES,  # with HAS_RES: the residual the forward added to OUT, taken off again for delta
    DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_RES: tl.constexpr = False,
):
    """The fused backward's first pass, the dq kernel's prologue alone, per token tile of one
    (batch row, query head)."""
    b, head, t, _, t_ok, col_ok, offs, _, _ = _token_tile(T, 0, HEADS, 1, DH, BLOCK_T, BLOCK_D)
    row_ok = t_ok[:, None] & col_ok[None, :]
    do = tl.load(DOUT + offs, mask=row_ok, other=0.0)
    _token_stats(LSE, OUT, RES, STATS, do, b, head, t, t_ok, offs, row_ok, T, HEADS, scale, HAS_RES)


@triton.jit
def _attend_bwd_dkv(
    Q,
    KEYS,
    VALUES,
    BETA,
    POS,
    START,
    RING,
    SPAN,
    TILE_LEVEL,
    TILE_I0,  # per slot tile: its level and first level-local index
    STATS,  # [2, B, H, T]: delta / sqrt(Dh), the base-2 lse (0 where nothing is visible), from the dq or stats kernel
    DOUT,
    DKEYS,
    DVALUES,  # [B, K, S, Dh], every element written
    DQ_ACC,  # DQ > 0: [B, T, H*Dh] fp32, zeroed (a pointer, or with DQ == 2 a TMA descriptor as [B, T, H*Dh])
    DBETA,  # DQ > 0: [H, L] fp32, zeroed
    T,
    n_slots,
    n_levels,
    HEADS,
    GROUP,
    qk_scale,
    scale,
    DH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands (the interpreter's tl.dot mishandles bf16)
    DQ: tl.constexpr = 0,  # the fused backward: 0 dq elsewhere; 1 adds dq by atomics, 2 by TMA reductions
    EVEN_T: tl.constexpr = False,  # T % BLOCK_T == 0: every token tile walked is whole, its loads unmasked
):
    FOLD: tl.constexpr = _fold_scale(Q.dtype.element_ty)  # ds comes out times 1 / sqrt(Dh)
    tile = tl.program_id(0)
    pid_bk = tl.program_id(1)
    kv_heads = HEADS // GROUP
    b, kvh = pid_bk // kv_heads, pid_bk % kv_heads
    lvl = tl.load(TILE_LEVEL + tile)
    i0 = tl.load(TILE_I0 + tile)
    start = tl.load(START + lvl)
    count = tl.load(START + lvl + 1) - start
    i = i0 + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < DH
    slot_ok = (i < count)[:, None] & col_ok[None, :]
    kv_base = (b * kv_heads + kvh).to(tl.int64) * n_slots * DH
    slot_offs = kv_base + (start + i).to(tl.int64)[:, None] * DH + cols[None, :]
    ring, span, r, floor = _band_origin(POS, RING, SPAN, b, lvl)
    # Slots before the stream's start (below floor) are seen by no token: read as 0, so that
    # whatever they hold (0 * NaN) reaches neither their gradients nor, fused, other slots' dq.
    seen_ok = slot_ok & (i >= floor)[:, None]
    kt = operand(tl.load(KEYS + slot_offs, mask=seen_ok, other=0.0), UPCAST)
    vt = operand(tl.load(VALUES + slot_offs, mask=seen_ok, other=0.0), UPCAST)

    # Token t sees local index i iff i >= floor and d_t in (i - M, i], i.e.
    # (i - M + 1) S - r <= t < (i + 1) S - r: a token range per slot, so the mask is two compares
    # per element and no division per token. Past the level's count the range starts after T.
    seen_lo = tl.where(i >= floor, (i - ring + 1).to(tl.int64) * span - r, T)
    seen_hi = (i + 1).to(tl.int64) * span - r
    seen_lo = tl.minimum(tl.maximum(seen_lo, 0), T).to(tl.int32)
    seen_hi = tl.minimum(tl.maximum(seen_hi, 0), T).to(tl.int32)
    # The tokens that see any slot of the tile, from a token-tile boundary.
    t_lo = (tl.maximum((i0 - ring + 1).to(tl.int64) * span - r, 0) // BLOCK_T * BLOCK_T).to(tl.int32)
    t_hi = tl.minimum((i0 + BLOCK_S).to(tl.int64) * span - r, T).to(tl.int32)
    # The tokens that see every slot of the tile (none where a slot is past the count or below
    # the floor: its range starts at T): token tiles inside skip the mask, as in `_edge`.
    all_lo = tl.max(seen_lo, axis=0)
    all_hi = tl.min(seen_hi, axis=0)

    n_stats = (tl.num_programs(1) // kv_heads).to(tl.int64) * HEADS * T  # B * H * T
    rows = tl.arange(0, BLOCK_T)
    dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        head = kvh * GROUP + g
        bias2 = tl.load(BETA + head * n_levels + lvl).to(tl.float32) * LOG2E_TL
        q_offs = (b * T + t_lo + rows).to(tl.int64)[:, None] * (HEADS * DH) + head * DH + cols[None, :]
        q_ptrs, do_ptrs = Q + q_offs, DOUT + q_offs
        stat_ptrs = STATS + (b * HEADS + head).to(tl.int64) * T + t_lo + rows
        dbeta = tl.zeros([BLOCK_S], dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            t = t0 + rows
            # Token tiles start at multiples of BLOCK_T (t_lo) and end by T: with EVEN_T none
            # crosses T, so rows need no mask (a predicate and a select per cp.async less: the
            # loop's sm_90 code 695 -> 652 instructions with fused TMA reductions).
            t_ok = t < T
            row_ok = t_ok[:, None] & col_ok[None, :]
            if EVEN_T and BLOCK_D == DH:
                q = operand(tl.load(q_ptrs), UPCAST)
                do = operand(tl.load(do_ptrs), UPCAST)
                delta = tl.load(stat_ptrs)
                lse2 = tl.load(stat_ptrs + n_stats)
            else:
                q = operand(tl.load(q_ptrs, mask=row_ok, other=0.0), UPCAST)
                do = operand(tl.load(do_ptrs, mask=row_ok, other=0.0), UPCAST)
                delta = tl.load(stat_ptrs, mask=t_ok, other=0.0)
                lse2 = tl.load(stat_ptrs + n_stats, mask=t_ok, other=0.0)
            # Transposed ([slots, tokens]) so p^T and ds^T feed the dk/dv products straight from
            # registers, as the left operand, with no layout change through shared memory.
            qk_t = tl.dot(kt, tl.trans(q), input_precision=PRECISION)
            p_t = tl.math.exp2(qk_t * qk_scale + (bias2 - lse2)[None, :])
            # Interior tiles skip the mask in the split kernel only: in the fused ones the branch
            # cost more than it saved (H200, bf16, TMA reductions, in one run: 1.17 ms masking
            # every tile against 1.35 ms skipping; BENCHMARKS.md, session 20).
            if DQ > 0:  # noqa: SIM114 (a compile-time branch, then a run-time one)
                p_t = _seen(p_t, t, seen_lo, seen_hi)
            elif _edge(t0, all_lo, all_hi, BLOCK_T):
                p_t = _seen(p_t, t, seen_lo, seen_hi)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
            # d logits times 1 / sqrt(Dh), which dk and dq both take: folded into the subtraction
            # (an FFMA for an FADD; delta comes scaled) instead of a multiply of each dq tile.
            if FOLD:  # noqa: SIM108 (constexpr branches)
                ds_t = p_t * (dp_t * scale - delta[None, :])
            else:
                ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
            if DQ > 0:  # this slot tile's share of the tokens' dq, added in L2 (FlashAttention-2's dq)
                dq = tl.dot(tl.trans(ds_t.to(kt.dtype)), kt, input_precision=PRECISION)
                if not FOLD:
                    dq *= scale
                if DQ == 2:
                    DQ_ACC.atomic_add([b, t0, head * DH], tl.reshape(dq, [1, BLOCK_T, BLOCK_D]))
                else:
                    dq_offs = q_offs + (t0 - t_lo).to(tl.int64) * (HEADS * DH)
                    tl.atomic_add(DQ_ACC + dq_offs, dq, mask=row_ok, sem="relaxed")
                dbeta += tl.sum(ds_t, axis=1)
            q_ptrs += BLOCK_T * HEADS * DH
            do_ptrs += BLOCK_T * HEADS * DH
            stat_ptrs += BLOCK_T
        if DQ > 0:
            part = tl.sum(dbeta, axis=0)
            if FOLD:
                part = part / scale
            tl.atomic_add(DBETA + head * n_levels + lvl, part, sem="relaxed")
    if not FOLD:
        dk *= scale
    tl.store(DKEYS + slot_offs, dk.to(DKEYS.dtype.element_ty), mask=slot_ok)
    tl.store(DVALUES + slot_offs, dv.to(DVALUES.dtype.element_ty), mask=slot_ok)


class Levels:
    """Per-level tables of one call (first candidate index, ring size, span), on the device.
    Cached per (rings, spans, T, device): a decode loop reuses them without host-to-device copies."""

    _cache: ClassVar[dict] = {}

    def __init__(self, rings: tuple[int, ...], spans: tuple[int, ...], steps: int, device) -> None:
        counts = [m + -(-steps // s) for m, s in zip(rings, spans, strict=True)]
        self.counts = counts
        self.n_slots = sum(counts)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        self.start = torch.tensor(starts, dtype=torch.int32, device=device)
        self.ring = torch.tensor(rings, dtype=torch.int32, device=device)
        self.span = torch.tensor(spans, dtype=torch.int64, device=device)
        self._tiles: dict[int, tuple[Tensor, Tensor]] = {}
        self.device = device

    @classmethod
    def get(cls, rings, spans, steps: int, device) -> Levels:
        key = (tuple(rings), tuple(spans), steps, str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(tuple(rings), tuple(spans), steps, device)
        return cls._cache[key]

    def tiles(self, block_s: int) -> tuple[Tensor, Tensor]:
        """(level, first local index) of every slot tile; tiles never straddle two levels."""
        if block_s not in self._tiles:
            level = [lvl for lvl, c in enumerate(self.counts) for _ in range(0, c, block_s)]
            first = [i0 for c in self.counts for i0 in range(0, c, block_s)]
            self._tiles[block_s] = (
                torch.tensor(level, dtype=torch.int32, device=self.device),
                torch.tensor(first, dtype=torch.int32, device=self.device),
            )
        return self._tiles[block_s]


def _meta(dim: int, dtype: torch.dtype) -> dict:
    # tl.dot needs every tile side >= 16. fp32 products: exact, or TF32 where torch allows it.
    return {
        "DH": dim,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        **dot_meta(dtype),
    }


# Launch tiles (BLOCK_T, BLOCK_S, num_warps, num_stages[, maxnreg]): the best of
# benchmarks/memory_sweep.py at B8 H16 T4096 Dh64 over 1024 slots (BENCHMARKS.md), bf16 and fp32
# (TF32), with TMA slot loads ("+tma": opt-in, knobs.memory_tma) and without. Without TMA, small
# bf16 token tiles win: four programs share an SM and hide each other's dot -> softmax -> dot
# chain; TMA frees the registers of the load addresses (195 -> 145 a thread at 64x64), so bigger
# tiles fit. The bf16 forward (its fallback walk, the online softmax, needs 136 registers a thread)
# and dq (157 with Triton 3.6) run three programs an SM; capped at 128 registers, four fit again:
# fwd 0.425 -> 0.395 ms, dq 0.578 -> 0.529 (H200, 2026-12-01; a cap slows dk/dv, 0.712 -> 0.776).
# The fused backward's dk/dv ("dkv_fused", else "dkv"): 64x64 in bf16 (half the dq reductions
# of 32x64: 1.21 against 1.86 ms for the whole backward, H200, session 17).
# The bf16/fp16 forward since session 33: 128 tokens a program at 168 registers (three programs an
# SM). Both forwards run at the H200's power cap, and 128-token programs fetch each slot tile for
# twice the tokens: half the L2 traffic, a higher clock (1838-1845 against 1770-1785 MHz) and
# 2.0-2.5% less time than 64 x 32 at 128 registers (uncapped, two programs an SM, 1950 MHz but
# no faster). Rows wider than 64 (Dh > 64) keep 64-token programs ("fwd_wide_rows"): a 128 x 128
# accumulator alone takes 128 registers a thread.
_TILES = {
    "wide": {
        "fwd": (128, 32, 4, 3, 168),
        "fwd_wide_rows": (64, 32, 4, 3, 128),
        "dq": (64, 32, 4, 3, 128),
        "dkv": (32, 64, 4, 3),
        "dkv_fused": (64, 64, 4, 3),
    },
    "wide+tma": {"fwd": (128, 64, 4, 3), "dq": (128, 64, 4, 3)},
    "fp32": {"fwd": (128, 64, 4, 2), "dq": (128, 64, 8, 2), "dkv": (64, 128, 8, 2)},
    "fp32+tma": {"fwd": (128, 32, 4, 3), "dq": (128, 64, 8, 3)},
    # Exact fp32 (torch's default "highest"): products on the CUDA cores, where the TF32 tiles
    # spill (backward 391 ms at the benchmark's shape); scratch/ieee_sweep.py, H200, session 17.
    "fp32-ieee": {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkv": (16, 32, 2, 3), "dkv_fused": (32, 32, 4, 3)},
    "fp64": {"fwd": (64, 32, 4, 3), "dq": (32, 32, 4, 3), "dkv": (32, 32, 4, 3)},  # not swept
}


def _tiles(kind: str, dtype: torch.dtype, tma: bool = False, block_d: int = 64) -> dict:
    if knobs.interpret:
        return {"BLOCK_T": 16, "BLOCK_S": 16, "num_warps": 1}
    table = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "wide")
    if table == "fp32" and fp32_dot_precision(dtype) == "ieee":
        table = "fp32-ieee"  # products on the CUDA cores: the TF32 tiles spill
    if tma and kind in _TILES.get(table + "+tma", {}):  # the dk/dv kernel loads no slot tiles in its loop
        table += "+tma"
    elif kind == "fwd" and block_d > 64 and "fwd_wide_rows" in _TILES[table]:
        kind = "fwd_wide_rows"
    if kind == "dkv_fused" and kind not in _TILES[table]:
        kind = "dkv"
    block_t, block_s, warps, stages, *cap = _TILES[table][kind]
    return {
        "BLOCK_T": block_t,
        "BLOCK_S": block_s,
        "num_warps": warps,
        "num_stages": stages,
        "maxnreg": cap[0] if cap else None,
    }


def _tma_ok(keys: Tensor, values: Tensor, enabled: bool | None = None) -> bool:
    """Whether slot tiles come by TMA: when enabled (default: knobs.memory_tma), on Hopper or
    later (or the interpreter), rows a multiple of 16 bytes and at most 256 elements,
    16-byte-aligned bases; not fp64 (not measured)."""
    dim = keys.shape[-1]
    rows_ok = (dim * keys.element_size()) % 16 == 0 and dim <= 256  # 256: a TMA box's limit
    if not (knobs.memory_tma if enabled is None else enabled) or not rows_ok or keys.dtype == torch.float64:
        return False
    if keys.data_ptr() % 16 or values.data_ptr() % 16:
        return False
    return knobs.interpret or torch.cuda.get_device_capability(keys.device)[0] >= 9


def _descriptors(keys: Tensor, values: Tensor, block_s: int, block_d: int) -> tuple:
    """TMA descriptors of the candidate keys and values as [rows, Dh], tiles [block_s, block_d]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dim = keys.shape[-1]
    return tuple(TensorDescriptor.from_tensor(t.view(-1, dim), [block_s, block_d]) for t in (keys, values))


def attend_fwd(q, keys, values, beta, pos, rings, spans, heads: int, residual=None) -> tuple[Tensor, Tensor]:
    """-> (out, lse); with `residual` ([B, T, H*Dh], like q) out is residual + the query's result."""
    if not rings:  # the walk's first tile is level 0's (hds_query refuses this with its own message)
        raise ValueError("attend_fwd: no memory levels")
    bsz, steps, _ = q.shape
    kv_heads, n_slots, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    lv = Levels.get(rings, spans, steps, q.device)
    assert lv.n_slots == n_slots, (lv.n_slots, n_slots)
    if n_slots * dim >= 2**31:  # the walk addresses a memory head's candidates by int32 offsets
        raise ValueError(f"attend_fwd: {n_slots} candidate slots x Dh {dim} per memory head exceed 2^31 elements")
    out = new_output(q)
    lse = new_output(q, (bsz, heads, steps), torch.float32)
    tma = _tma_ok(keys, values)
    meta = _meta(dim, q.dtype)
    tiles = _tiles("fwd", q.dtype, tma, meta["BLOCK_D"])
    descs = _descriptors(keys, values, tiles["BLOCK_S"], meta["BLOCK_D"]) if tma else None
    grid = (triton.cdiv(steps, tiles["BLOCK_T"]), bsz * heads)
    _launch_fwd(
        grid,
        q, keys, values, beta, pos, *(descs or (keys, values)), out, lse,
        steps, n_slots, heads, heads // kv_heads, LOG2E / math.sqrt(dim), residual if residual is not None else q,
        RINGS=tuple(rings), SPANS=tuple(spans), **tiles, **meta, TMA=descs is not None, HAS_RES=residual is not None,
    )  # fmt: skip
    return out, lse


def _bwd_mode(q: Tensor, dim: int, block_d: int) -> int:
    """The dk/dv kernel's DQ: 0 the split backward, 1 fused with atomics, 2 fused with TMA
    reductions (Hopper, Dh a power of two; the interpreter has none and runs the atomics).
    auto (the default) takes what measured fastest on the H200 with every ring full
    (BENCHMARKS.md, sessions 17, 20, 21 and 26): for bf16/fp16 on Hopper the split backward
    where its dk/dv runs in Gluon (`dkv_gluon.supports`: 1.15 against 1.19 ms fused by TMA
    reductions at B8 H16 T4096 over 1024 slots, session 26), else TMA reductions where Dh
    allows them (1.21 against 1.25 ms for the Triton split in session 17, 1.18 against 1.20 in
    session 21; by atomics 1.44, so other Dh and older GPUs take the split backward; with
    part-filled rings split led, 1.01 against 1.17 ms, session 20), atomics for
    exact fp32 on any GPU (26 against 85 ms on the H200: the split kernels recompute the
    probabilities on the CUDA cores twice), and the split backward for TF32 (not measured
    fused) and fp64. Added in L2 in whatever order the slot
    tiles come, the fused dq can differ in its last bits from run to run: under
    torch.use_deterministic_algorithms auto takes the split backward, and a forced fused one
    raises (or warns, with warn_only) as torch's own nondeterministic ops do."""
    mode = knobs.memory_bwd
    if mode not in ("auto", "split", "fused", "fused-tma"):
        raise ValueError(f"MMREC_MEMORY_BWD={mode!r}: expected auto, split, fused or fused-tma")
    if mode == "split" or q.dtype == torch.float64:
        return 0
    tma = block_d == dim and not knobs.interpret and torch.cuda.get_device_capability(q.device)[0] >= 9
    if mode == "auto":
        if torch.are_deterministic_algorithms_enabled():
            return 0
        if q.dtype == torch.float32:
            return 1 if fp32_dot_precision(q.dtype) == "ieee" else 0
        if dkv_gluon.supports(q, dim):  # split, its dk/dv in Gluon: 1.15 against 1.19 ms (session 26)
            return 0
        return 2 if tma else 0
    if torch.are_deterministic_algorithms_enabled():
        msg = (
            f"hds_query backward: MMREC_MEMORY_BWD={mode} adds dq by atomics, not deterministic, but "
            "torch.use_deterministic_algorithms(True) is set; use MMREC_MEMORY_BWD=auto or split"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
    return 2 if mode == "fused-tma" and tma else 1


def attend_bwd(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads: int, residual=None):
    """-> (dq, dkeys, dvalues, dbeta). `residual`: the one attend_fwd added to `out` (its own
    gradient is dout, the caller's)."""
    bsz, steps, _ = q.shape
    kv_heads, n_slots, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    lv = Levels.get(rings, spans, steps, q.device)
    dout = dout.contiguous()
    stats = new_output(q, (2, bsz, heads, steps), torch.float32)
    dkeys = new_output(keys)
    dvalues = new_output(values)
    meta = _meta(dim, q.dtype)
    common = (steps, n_slots, len(rings), heads, heads // kv_heads, LOG2E / math.sqrt(dim), 1 / math.sqrt(dim))
    res = residual if residual is not None else q
    fused = _bwd_mode(q, dim, meta["BLOCK_D"])
    if fused:
        # dq accumulates in fp32 (in place for fp32 inputs), added to by every slot tile.
        dq = dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dbeta = torch.zeros(beta.shape, device=q.device, dtype=torch.float32)
        block_t = 16 if knobs.interpret else 64
        _launch_bwd_stats(
            (triton.cdiv(steps, block_t), bsz * heads), lse, out, dout, stats, steps, heads, 1 / math.sqrt(dim), res,
            DH=dim, BLOCK_T=block_t, BLOCK_D=meta["BLOCK_D"], HAS_RES=residual is not None,
        )  # fmt: skip
    else:
        dq = new_output(q)
        tma = _tma_ok(keys, values)
        tiles = _tiles("dq", q.dtype, tma)
        descs = _descriptors(keys, values, tiles["BLOCK_S"], meta["BLOCK_D"]) if tma else None
        grid = (triton.cdiv(steps, tiles["BLOCK_T"]), bsz * heads)
        parts = torch.empty((heads, len(rings), grid[0] * bsz), device=q.device, dtype=torch.float32)
        _launch_bwd_dq(
            grid,
            q, keys, values, beta, pos, lv.start, lv.ring, lv.span, *(descs or (keys, values)), lse, out, stats, dout,
            dq, parts, *common, res, **tiles, **meta, TMA=descs is not None, HAS_RES=residual is not None,
        )  # fmt: skip
        dbeta = parts.sum(2)
    if not fused and dkv_gluon.usable(q, dout, dim):  # Hopper: the dk/dv products overlapped (Gluon)
        tile_level, tile_i0 = lv.tiles(dkv_gluon.TILES[1])
        dkv_gluon.launch(
            (tile_level.numel(), bsz * kv_heads), q, dout, keys, values, beta, pos, lv, tile_level, tile_i0, stats,
            dkeys, dvalues, heads, common[5], common[6], fold=q.dtype != torch.float16,
        )  # fmt: skip
        return dq, dkeys, dvalues, dbeta.to(beta.dtype)
    tiles = _tiles("dkv_fused" if fused else "dkv", q.dtype)
    tile_level, tile_i0 = lv.tiles(tiles["BLOCK_S"])
    grid = (tile_level.numel(), bsz * kv_heads)
    if fused == 2:
        from triton.tools.tensor_descriptor import TensorDescriptor

        dq_arg = TensorDescriptor.from_tensor(dq_acc, [1, tiles["BLOCK_T"], meta["BLOCK_D"]])
    else:
        dq_arg = dq_acc if fused else q  # split: unused
    _launch_bwd_dkv(
        grid,
        q, keys, values, beta, pos, lv.start, lv.ring, lv.span, tile_level, tile_i0, stats, dout,
        dkeys, dvalues, dq_arg, dbeta, *common, **tiles, **meta, DQ=fused, EVEN_T=steps % tiles["BLOCK_T"] == 0,
    )  # fmt: skip
    if fused and q.dtype != torch.float32:
        dq = dq_acc.to(q.dtype)
    return dq, dkeys, dvalues, dbeta.to(beta.dtype)


@triton.jit
def _block_sums(
    X,
    POS,
    OUT,  # X [B, T, W]; OUT [B, NS + 1, W] fp32: per local level-0 slot j, the sum of its tokens
    T,
    W,
    n_out,
    span,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Token sums of the segment's level-0 slots: program (row, slot, column block) sums the rows
    [(n + j) S - pos, (n + j + 1) S - pos) clipped to the segment. Every input read once, no atomics."""
    pid = tl.program_id(0)
    b, j = pid // n_out, pid % n_out
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = w < W
    pos = tl.load(POS + b)
    first = (pos // span + j) * span - pos  # the slot's first token, relative to the segment
    t_lo = tl.maximum(first, 0).to(tl.int32)
    t_hi = tl.minimum(first + span, T).to(tl.int32)
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + rows
        offs = (b * T + t).to(tl.int64)[:, None] * W + w[None, :]
        acc += tl.load(X + offs, mask=(t < t_hi)[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + (b * n_out + j).to(tl.int64) * W + w, tl.sum(acc, axis=0), mask=w_ok)


_launch_fwd = Launcher(_attend_fwd)
_launch_bwd_dq = Launcher(_attend_bwd_dq)
_launch_bwd_dkv = Launcher(_attend_bwd_dkv)
_launch_bwd_stats = Launcher(_attend_bwd_stats)
_launch_block_sums = Launcher(_block_sums)


def block_sums(x: Tensor, pos: Tensor, span: int) -> Tensor:
    """x [B, T, W], pos [B] -> [B, ceil(T / span) + 1, W] fp32 token sums per local level-0 slot."""
    bsz, steps, width = x.shape
    n_out = -(-steps // span) + 1
    out = new_output(x, (bsz, n_out, width), torch.float32)
    block_t, block_w = (16, 16) if knobs.interpret else (32, 512)  # memory_sweep.py --only sums
    _launch_block_sums(
        (bsz * n_out, triton.cdiv(width, block_w)),
        x,
        pos,
        out,
        steps,
        width,
        n_out,
        span,
        BLOCK_T=block_t,
        BLOCK_W=block_w,
        num_warps=4,
    )
    return out
