"""Triton kernels for the linear scan (SPEC §1), forward and backward, on the [B, T, C] layout.

Forward, chained (the default): time is cut into chunks of CHAIN_R rows, and
one program owns one chunk of 2 x 32 x warps channels of one batch row. Each thread holds its
two adjacent channels for all CHAIN_R rows in registers, so the within-chunk scan is a
sequential `tl.associative_scan` inside the thread (two FMAs per element, no shuffles). The
chunks of a column are chained through global memory: a program takes a ticket (an atomic
counter), which orders programs so that a chunk's predecessor has always started; it loads and
scans its chunk, waits for the predecessor's last row (a 64-bit word per channel, the fp32
value and the chunk's tag, in a two-slot ring that every launch leaves zero), publishes its own last row,
and only then applies the carry and writes h. Every load of a chunk is issued at once and
thousands of programs are in flight, so DRAM is kept busy instead of one walker per column
(`_scan_fwd_chained` says what it measured). Where few programs share a chunk row (at most 32,
i.e. B*C up to 4096 channels when C is a multiple of 128) the serial hand-off is most of the
launch, and the chain hands off by decoupled look-back instead (`_lookback`: each chunk
publishes its own map at once and reads the W chunks before it in one round trip): on the H200
1.3x-1.8x faster forward, 1.15x-1.8x forward+backward there.

Forward on raw words (bf16/fp16 at an even width, serial hand-off): the same chain with 64-row
chunks held in registers as int32 words of two 16-bit channels, scanned twice (for the map
before the wait, for h after it), so that half the hand-offs hold up a column
(`_scan_fwd_words`).

Forward, tiled (MMREC_SCAN=walk, kept for comparison): one program owns a tile of
BLOCK_C channels of one batch row and walks time in chunks of BLOCK_T rows, software-pipelined
with `tl.range(num_stages=...)`.

Backward, chained (the default): the same chain from the last chunk to the first
(`_scan_bwd_chained`). A first pass over the chunk's 32 rows gives the map to hand on; the
outputs then come SUB rows at a time, re-reading log_a and dh (from cache, a microsecond after
the first read), so that only SUB rows of scan state live in registers: 32 where no chunk is
masked and the hand-off is serial (then the masked path is not compiled: EVEN, `_even`), else
16 (`_bwd_sub`).

Backward, walk (MMREC_SCAN=walk): the reverse walk one row at a time, 4 bytes of a row per
thread, so the recurrence is one FMA per element in registers (`_scan_bwd` says why).

From DRAM every input element is read once and every output written once: the forward moves
3 x B*T*C elements, the backward 5 (it reads log_a, h, dh; writes dlog_a, db). The chained
kernels add a ring of 16 bytes per channel (B*C), reused from launch to launch (`_link`); the
look-back, descriptors of 16 bytes per chunk and channel (at most LOOKBACK_BYTES, `_descriptors`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output
from ..launch import Launcher
from . import fwd_gluon

LOG_A_MIN = tl.constexpr(-50.0)
LOG_A_MAX = tl.constexpr(0.0)


@triton.jit
def _clamp_log_a(la):
    # NaN stays NaN, as in torch.clamp (the reference): a NaN input must show in h, not turn
    # into a decay of e^-50 (tl.minimum/maximum drop NaN by default).
    return tl.clamp(la, LOG_A_MIN, LOG_A_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    # (x -> a_first x + b_first) followed by (x -> a_then x + b_then).
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _scan_fwd(
    LA,
    X,
    H0,
    H,
    HLAST,  # [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    T,
    C,
    HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,  # chunks in flight (the loop's software-pipeline depth)
):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rows = tl.arange(0, BLOCK_T)
    # int64: B*T*C overflows int32 at the 7B config's segment length.
    row_base = pid_b.to(tl.int64) * T * C
    if HAS_H0:
        carry = tl.load(H0 + pid_b.to(tl.int64) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Plain loads in the loop: the software pipeliner (num_stages) keeps the next chunks in
    # flight through shared memory while this one is scanned.
    for t0 in tl.range(0, T, BLOCK_T, num_stages=STAGES):
        # Rows past T load a = exp(0) = 1, b = 0: they copy the carry and change nothing.
        ok = ((t0 + rows) < T)[:, None] & col_ok[None, :]
        offs = row_base + (t0 + rows).to(tl.int64)[:, None] * C + cols[None, :]
        la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.exp(_clamp_log_a(la))
        a_cum, b_cum = tl.associative_scan((a, x), 0, _compose)
        h = a_cum * carry[None, :] + b_cum
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
    tl.store(HLAST + pid_b.to(tl.int64) * C + cols, carry.to(HLAST.dtype.element_ty), mask=col_ok)


# --- Chained forward ---------------------------------------------------------------------------

CHAIN_R = 32  # rows per chunk; 16 measured 2-4x slower on the H100 (twice the hand-offs)
CHAIN_WARPS = 2


@triton.jit
def _chain_cols(pid_c, BLOCK_C: tl.constexpr):
    """Two adjacent channels per thread, the pairs permuted inside each warp's span (g -> 3g
    mod 32 is a permutation): the coalescing pass then sees a contiguity of 2, not BLOCK_C, and
    lays the [rows, BLOCK_C] tile out with every row of a thread's pair in its registers (lanes
    along channels only) instead of wide vectors with lanes along time. A warp still reads one
    contiguous 128-byte span per row (bf16). Other widths than a pair per thread measured 2-10x
    slower on the H100."""
    ar = tl.arange(0, BLOCK_C)
    g = ar // 2
    SPAN: tl.constexpr = min(32, BLOCK_C // 2)
    return pid_c * BLOCK_C + ((g // SPAN) * SPAN + (g * 3) % SPAN) * 2 + ar % 2


@triton.jit
def _decay(la, FAST: tl.constexpr):
    """exp of the clamped log-decay. It lies in [e^-50, 1], far from fp32 denormals, so on the
    GPU one ex2.approx.ftz (no denormal fix-up around the MUFU op); tl.exp in the interpreter."""
    la = _clamp_log_a(la)
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [la * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(la)


@triton.jit
def _pack_link(tag, value):
    """One 64-bit word: the tag above the fp32 bits, so a reader sees both or neither."""
    return (tag.to(tl.int64) << 32) | (value.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)


# Polls before a waiting chunk gives up. Each poll is an L2 round trip, so this is tens of
# seconds on the H100, far beyond any real wait; it is reached only if a hand-off never comes
# (a bug), and then the carry is NaN: the outputs show the failure, and training's NaN guard
# stops, instead of the GPU hanging.
SPIN_LIMIT = 1 << 26


@triton.jit
def _await_link(ptrs, tag, mask, SPIN_LIMIT: tl.constexpr):
    """Spin (volatile loads) until every word at ptrs carries `tag`; -> their fp32 values, or
    NaN after SPIN_LIMIT polls. Plain polls, never read-modify-writes: the program two chunks on
    polls the same ring slot for its own tag."""
    word = tl.load(ptrs, mask=mask, other=0, volatile=True)
    waiting = tl.max(tl.where(mask & ((word >> 32).to(tl.int32) != tag), 1, 0), 0)
    spins = 0
    while (waiting != 0) & (spins < SPIN_LIMIT):
        word = tl.load(ptrs, mask=mask, other=0, volatile=True)
        waiting = tl.max(tl.where(mask & ((word >> 32).to(tl.int32) != tag), 1, 0), 0)
        spins += 1
    value = (word & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(waiting != 0, float("nan"), value)


@triton.jit
def _chain_position(LINK, B, T, n_chunks, C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr,
                    REVERSE: tl.constexpr):  # fmt: skip
    """A program's place in the chain, from its ticket: programs of chain position j - 1 took
    their tickets before any of position j, so a waiting program's predecessor is running and
    never waits on a later one (no deadlock whatever order the hardware starts programs in).
    -> (j, the chunk k (j, or counted from the end when REVERSE), channels, their [B, C] state
    offsets, their ring words, the chunk's first element)."""
    n_ct: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    per_chunk = B * n_ct
    # Relaxed: the counter's own modification order is all the ordering needed (hand-offs
    # travel with their tags), and acq_rel costs a fence per program.
    ticket = tl.atomic_add(LINK, 1, sem="relaxed")
    if ticket == per_chunk * n_chunks - 1:  # every ticket is taken: zero for the next launch
        tl.atomic_xchg(LINK, 0, sem="relaxed")
    j = ticket // per_chunk
    k = n_chunks - 1 - j if REVERSE else j
    rest = ticket % per_chunk
    pid_b = rest // n_ct
    cols = _chain_cols(rest % n_ct, BLOCK_C)
    state = pid_b.to(tl.int64) * C + cols
    # int64: B*T*C overflows int32 at the 7B config's segment length.
    return j, k, cols, state, LINK + 1 + state, (pid_b.to(tl.int64) * T + k * R) * C


@triton.jit
def _carry_in(START, ring, j, state, col_ok, ring_slot, HAS_START: tl.constexpr, BLOCK_C: tl.constexpr,
              SPIN_LIMIT: tl.constexpr):  # fmt: skip
    """The state entering chain position j: START (h0, dh_last) or zeros at the head, else the
    predecessor's word."""
    if j == 0:
        if HAS_START:
            carry = tl.load(START + state, mask=col_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        carry = _await_link(ring + ((j - 1) % 2) * ring_slot, j, col_ok, SPIN_LIMIT)
    return carry


@triton.jit
def _last_row(a_cum, b_cum, rows, R: tl.constexpr):
    """A scanned tile's map through its last row: (a_cum[R-1], b_cum[R-1])."""
    last = rows[:, None] == R - 1
    return tl.sum(tl.where(last, a_cum, 0.0), axis=0), tl.sum(tl.where(last, b_cum, 0.0), axis=0)


@triton.jit
def _through_last_row(a_cum, b_cum, carry, rows, R: tl.constexpr):
    """The carry taken through a scanned tile's last row: a_cum[R-1] carry + b_cum[R-1]."""
    agg_a, agg_b = _last_row(a_cum, b_cum, rows, R)
    return agg_a * carry + agg_b


@triton.jit
def _carry_out(END, ring, j, n_chunks, out, state, col_ok, ring_slot, HAS_END: tl.constexpr):
    """Hand `out` to chain position j + 1 (slot j % 2, tag j + 1; the next writer of that slot,
    j + 2, publishes only after j + 1 has read it), or at the chain's end store it to END
    (h_last, dh0) and zero both slots: the last position has read the one, and its predecessor
    (whose word it read) had read the other, so the ring is left as the next launch needs it."""
    if j + 1 < n_chunks:
        tl.atomic_xchg(ring + (j % 2) * ring_slot, _pack_link(j + 1, out), mask=col_ok, sem="relaxed")
    else:
        if HAS_END:
            tl.store(END + state, out.to(END.dtype.element_ty), mask=col_ok)
        if j > 0:
            empty = tl.zeros(out.shape, dtype=tl.int64)
            tl.store(ring, empty, mask=col_ok)
            tl.store(ring + ring_slot, empty, mask=col_ok)


# --- Decoupled look-back (where few programs share a chunk row) --------------------------------
#
# With the serial hand-off a column's chunks wait for one another in turn: 128 hand-offs of
# about 0.7 us (two L2 round trips each) at T 4096, whatever the width. Where many programs
# share a chunk row that chain hides under the DRAM traffic; where few do it is the kernel's
# whole time (B1 C256: 11x the copy floor on the H200). There each chunk publishes the map of
# its own rows (AGG) as soon as it has scanned them, then reads the descriptors of the W chunks
# before it in one round trip; the carry is known once the nearest inclusive value (INCL) among
# them has only AGGs after it, so a poll can cover up to W hand-offs. Descriptors are per chunk
# (no slot is reused within a launch) and tags grow from launch to launch (base, `_lookback`), so
# the buffer is never cleared.


@triton.jit
def _lb_publish(DESC, j, base, state, col_ok, BCT, value, WORD: tl.constexpr, KIND: tl.constexpr):
    """Word WORD (0: A, 1: B or the inclusive value) of chain position j's descriptor, tagged
    base + 2 j + KIND (1: AGG, 2: INCL)."""
    word = _pack_link(base + 2 * j + KIND, value)
    tl.atomic_xchg(DESC + (j * 2 + WORD).to(tl.int64) * BCT + state, word, mask=col_ok, sem="relaxed")


@triton.jit
def _lb_poll(ptr_a, ptr_b, live, head, t_agg, t_incl, wrows, col_ok):
    """One read of the window -> (words A, words B, which rows are INCL, the nearest INCL row
    per channel, whether any channel must poll again)."""
    word_a = tl.load(ptr_a, mask=live, other=0, volatile=True)
    word_b = tl.load(ptr_b, mask=live, other=0, volatile=True)
    tag_a = (word_a >> 32).to(tl.int32)
    tag_b = (word_b >> 32).to(tl.int32)
    incl = ((tag_b == t_incl) & live) | head
    agg = (tag_b == t_agg) & (tag_a == t_agg) & live
    nearest = tl.max(tl.where(incl, wrows[:, None], -1), 0)
    gap = tl.max(tl.where((wrows[:, None] > nearest[None, :]) & ~agg, 1, 0), 0)
    waiting = tl.max(tl.where(col_ok & ((nearest < 0) | (gap > 0)), 1, 0), 0)
    return word_a, word_b, incl, nearest, waiting


@triton.jit
def _lb_carry(DESC, j, base, start, state, col_ok, BCT, W: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """The state entering chain position j, from positions j-W .. j-1 (window row W-1 is j-1;
    position -1 is INCL with value `start`); NaN after SPIN_LIMIT polls (as `_await_link`)."""
    wrows = tl.arange(0, W)
    pos = j - W + wrows
    live = (pos >= 0)[:, None] & col_ok[None, :]
    ptr_a = DESC + (tl.maximum(pos, 0) * 2).to(tl.int64)[:, None] * BCT + state[None, :]
    ptr_b = ptr_a + BCT
    t_agg = (base + 2 * pos + 1)[:, None]
    t_incl = t_agg + 1
    head = (pos == -1)[:, None]
    word_a, word_b, incl, nearest, waiting = _lb_poll(ptr_a, ptr_b, live, head, t_agg, t_incl, wrows, col_ok)
    spins = 0
    while (waiting != 0) & (spins < SPIN_LIMIT):
        word_a, word_b, incl, nearest, waiting = _lb_poll(ptr_a, ptr_b, live, head, t_agg, t_incl, wrows, col_ok)
        spins += 1
    val_a = (word_a & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    val_b = (word_b & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    # Rows before the nearest INCL are identity maps, the INCL row a constant map (A = 0), the
    # rest AGG maps; composed oldest first, the last row's B is the carry.
    used = wrows[:, None] >= nearest[None, :]
    m_a = tl.where(used, tl.where(incl, 0.0, val_a), 1.0)
    m_b = tl.where(used, tl.where(head, start[None, :], val_b), 0.0)
    _, c_b = tl.associative_scan((m_a, m_b), 0, _compose)
    carry = tl.sum(tl.where(wrows[:, None] == W - 1, c_b, 0.0), axis=0)
    return tl.where(waiting != 0, float("nan"), carry)


@triton.jit
def _lookback(DESC, base, j, n_chunks, START, END, state, col_ok, a_cum, b_cum, rows, BCT, R: tl.constexpr,
              HAS_START: tl.constexpr, HAS_END: tl.constexpr, W: tl.constexpr, SPARSE: tl.constexpr,
              BLOCK_C: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    """Publish chain position j's own map, find its carry by look-back, publish its inclusive
    value (or at the chain's end store it to END) -> the carry. SPARSE (the interpreter's
    tests): only every third position publishes INCL, so look-backs must combine AGGs."""
    agg_a, agg_b = _last_row(a_cum, b_cum, rows, R)
    _lb_publish(DESC, j, base, state, col_ok, BCT, agg_a, 0, 1)
    _lb_publish(DESC, j, base, state, col_ok, BCT, agg_b, 1, 1)
    if HAS_START:
        start = tl.load(START + state, mask=col_ok, other=0.0).to(tl.float32)
    else:
        start = tl.zeros([BLOCK_C], dtype=tl.float32)
    carry = _lb_carry(DESC, j, base, start, state, col_ok, BCT, W, SPIN_LIMIT)
    out = agg_a * carry + agg_b
    if j + 1 < n_chunks:
        if (not SPARSE) or (j % 3 == 2):
            _lb_publish(DESC, j, base, state, col_ok, BCT, out, 1, 2)
    elif HAS_END:
        tl.store(END + state, out.to(END.dtype.element_ty), mask=col_ok)
    return carry


@triton.jit
def _hand_on(ring, DESC, tag_base, j, n_chunks, START, END, state, col_ok, a_cum, b_cum, rows, ring_slot,
             R: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr, LOOKBACK: tl.constexpr,
             W: tl.constexpr, SPARSE: tl.constexpr, BLOCK_C: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    """Chain position j's carry in, its scanned tile's map handed on (or at the chain's end
    stored to END): by look-back, or serially through the two-slot ring -> the carry."""
    if LOOKBACK:
        carry = _lookback(DESC, tag_base, j, n_chunks, START, END, state, col_ok, a_cum, b_cum, rows, ring_slot, R,
                          HAS_START, HAS_END, W, SPARSE, BLOCK_C, SPIN_LIMIT)  # fmt: skip
    else:
        carry = _carry_in(START, ring, j, state, col_ok, ring_slot, HAS_START, BLOCK_C, SPIN_LIMIT)
        _carry_out(END, ring, j, n_chunks, _through_last_row(a_cum, b_cum, carry, rows, R), state, col_ok, ring_slot,
                   HAS_END)  # fmt: skip
    return carry


@triton.jit
def _opaque(x, FAST: tl.constexpr):
    """x, through an inline-asm copy on the GPU that the compiler cannot see through."""
    if FAST:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    return x


@triton.jit
def _rows_below(limit, rows, FAST: tl.constexpr):
    """rows < limit, for a store's mask after the hand-off: from an opaque copy of the limit,
    so the compiler recomputes the compares instead of keeping the load's mask live across the
    wait (a register per row; Triton 3.6, sm_90: the channel-pair forward 195 -> 157 registers
    in bf16, 162 in fp32; the word forward 234 -> 168)."""
    return rows < _opaque(limit, FAST)


@triton.jit
def _chunk_fwd(LA, X, H0, H, HLAST, ring, DESC, tag_base, base, cols, state, k, T, n_chunks, ring_slot,
               C: tl.constexpr, HAS_H0: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr,
               MASKED: tl.constexpr, FAST: tl.constexpr, LOOKBACK: tl.constexpr, W: tl.constexpr,
               SPARSE: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    rows = tl.arange(0, R)
    offs = base + rows[:, None] * C + cols[None, :]  # C constexpr: row offsets are load immediates
    if MASKED:  # the last chunk past T, or ragged channels
        ok = (k * R + rows < T)[:, None] & (cols < C)[None, :]
        la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        la = tl.load(LA + offs).to(tl.float32)
        x = tl.load(X + offs).to(tl.float32)
    # Rows past T load a = 1, b = 0: they copy the carry, so the last row is h_{T-1}.
    a_cum, b_cum = tl.associative_scan((_decay(la, FAST), x), 0, _compose)
    col_ok = cols < C
    carry = _hand_on(ring, DESC, tag_base, k, n_chunks, H0, HLAST, state, col_ok, a_cum, b_cum, rows, ring_slot, R,
                     HAS_H0, True, LOOKBACK, W, SPARSE, BLOCK_C, SPIN_LIMIT)  # fmt: skip
    h = (a_cum * carry[None, :] + b_cum).to(H.dtype.element_ty)
    if MASKED:
        tl.store(H + offs, h, mask=_rows_below(T - k * R, rows, FAST)[:, None] & col_ok[None, :])
    else:
        tl.store(H + offs, h)


@triton.jit(do_not_specialize=["tag_base"])  # it changes every launch
def _scan_fwd_chained(
    LA,
    X,
    H0,
    H,
    HLAST,  # [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    LINK,  # int64 [1 + 2 * B * C], zero, left zero: the ticket counter, then a two-slot ring per channel
    DESC,  # LOOKBACK: int64 [2 * n_chunks * B * C], the chunks' descriptors (tags below tag_base)
    tag_base,
    B,
    T,
    n_chunks,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FAST: tl.constexpr,  # inline PTX (the GPU); off in the interpreter
    LOOKBACK: tl.constexpr,  # decoupled look-back over W chunks instead of the two-slot ring
    W: tl.constexpr,
    SPARSE: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    """Chunk k of a column waits for chunk k-1's last row, publishes its own and then writes h:
    the hand-off is one word per channel, so a chunk's loads and its scan overlap the wait
    (with LOOKBACK the carry comes by `_lookback` instead).
    Tickets, not program ids, name the chunk (`_chain_position`).

    H100, B8 T4096 C2048 (`benchmarks/recurrence.py --only scan`): 1.09x the copy floor in bf16
    and 1.05x in fp32, against 1.32x / 1.08x for the tiled walk. The same kernel with a zero
    carry instead of the wait reads 1.03x / 1.01x: the hand-offs (0.68 us each, one after
    another down a column) cost the rest, at the launch's ends (BENCHMARKS.md, session 10)."""
    _, k, cols, state, ring, base = _chain_position(LINK, B, T, n_chunks, C, R, BLOCK_C, False)
    if (C % BLOCK_C != 0) or (k * R + R > T):
        _chunk_fwd(LA, X, H0, H, HLAST, ring, DESC, tag_base, base, cols, state, k, T, n_chunks, B * C, C, HAS_H0, R,
                   BLOCK_C, True, FAST, LOOKBACK, W, SPARSE, SPIN_LIMIT)  # fmt: skip
    else:
        _chunk_fwd(LA, X, H0, H, HLAST, ring, DESC, tag_base, base, cols, state, k, T, n_chunks, B * C, C, HAS_H0, R,
                   BLOCK_C, False, FAST, LOOKBACK, W, SPARSE, SPIN_LIMIT)  # fmt: skip


# --- Chained forward on raw words (bf16 / fp16, the serial hand-off) ----------------------------
#
# The serial chain's cost is its hand-offs: T / R of them down a column, one after another, each
# about 0.7 us on the H200. Longer chunks halve them, but the channel-pair tile above spills at
# 64 rows. Here a chunk stays in registers as its raw 16-bit pairs (int32 words, two channels a
# word, a [words, rows] tile with lanes along words): pass 1 scans for the chunk's map only, and
# after the carry has come pass 2 unpacks the words again and scans from the carry, so only the
# words (not fp32 copies) stay live across the wait: 168 registers at 64 rows on 2 warps.

WORDS_R = 64  # rows per chunk: 32 rows measured 0.84x the channel-pair chain, 128 spilled (H200)


@triton.jit
def _half(w, HI: tl.constexpr, FP16: tl.constexpr, PURE: tl.constexpr):
    """The low or high 16-bit float of int32 words -> fp32. PURE=False: inline asm that the
    compiler may not merge with an earlier unpack of the same words (pass 2 on the GPU)."""
    if PURE:
        if FP16:
            if HI:
                w = w >> 16
            return w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        elif HI:
            return (w & -65536).to(tl.float32, bitcast=True)
        else:
            return (w << 16).to(tl.float32, bitcast=True)
    elif FP16:  # PTX names the halves of a 32-bit register by unpacking it
        if HI:
            return tl.inline_asm_elementwise("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, hi; }",
                                             "=r,r", [w], dtype=tl.float32, is_pure=False, pack=1)  # fmt: skip
        else:
            return tl.inline_asm_elementwise("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, lo; }",
                                             "=r,r", [w], dtype=tl.float32, is_pure=False, pack=1)  # fmt: skip
    elif HI:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xFFFF0000;", "=r,r", [w], dtype=tl.float32, is_pure=False,
                                         pack=1)  # fmt: skip
    else:
        return tl.inline_asm_elementwise("shl.b32 $0, $1, 16;", "=r,r", [w], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _pack_halves(h_lo, h_hi, DT: tl.constexpr, FP16: tl.constexpr, FAST: tl.constexpr):
    """Two fp32 tiles -> int32 words of their 16-bit floats (round to nearest even, as `.to`):
    on the GPU one cvt per word instead of two conversions and the shifts to pack them."""
    if FAST:
        if FP16:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [h_hi, h_lo], dtype=tl.int32,
                                             is_pure=True, pack=1)  # fmt: skip
        else:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,r,r", [h_hi, h_lo], dtype=tl.int32,
                                             is_pure=True, pack=1)  # fmt: skip
    else:
        lo = h_lo.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = h_hi.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo | (hi << 16)


@triton.jit
def _clamp_words(w, FP16: tl.constexpr, FAST: tl.constexpr):
    """On the GPU: log_a's words clamped to [LOG_A_MIN, LOG_A_MAX] two channels an instruction
    (bf16x2 / f16x2 min and max, NaN kept as torch.clamp keeps it; both bounds are exact in 16
    bits, so this equals clamping after the conversion). Clamped once, the words serve both
    passes. The interpreter clamps in fp32 instead (`_word_decay`)."""
    if FAST:
        if FP16:  # -50 is 0xD240 in fp16
            return tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi; mov.b32 lo, 0xD240D240; mov.b32 hi, 0; max.NaN.f16x2 $0, $1, lo; "
                "min.NaN.f16x2 $0, $0, hi; }", "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
        else:  # -50 is 0xC248 in bf16
            return tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi; mov.b32 lo, 0xC248C248; mov.b32 hi, 0; max.NaN.bf16x2 $0, $1, lo; "
                "min.NaN.bf16x2 $0, $0, hi; }", "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        return w


@triton.jit
def _word_decay(la, FAST: tl.constexpr, PURE: tl.constexpr):
    """exp of a half of the (on the GPU already clamped) log-decay words: one ex2 on the GPU,
    PURE=False for pass 2 (an ex2 the compiler may not merge with pass 1's); `_decay` in the
    interpreter."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [la * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=PURE, pack=1)  # fmt: skip
    else:
        return _decay(la, False)


@triton.jit
def _words_half(law, xw, carry, first, HI: tl.constexpr, FP16: tl.constexpr, FAST: tl.constexpr):
    """Pass 2 for one half of the words: h from the carry -> fp32 [words, rows]."""
    a = _word_decay(_half(law, HI, FP16, not FAST), FAST, False)
    x = _half(xw, HI, FP16, not FAST)
    _, h = tl.associative_scan((a, tl.where(first, a * carry[:, None] + x, x)), 1, _compose)
    return h


@triton.jit
def _chunk_fwd_words(LA, X, H0, H, HLAST, LINK, pid_b, pid_c, k, T, n_chunks, ring_slot, C: tl.constexpr,
                     HAS_H0: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, MASKED: tl.constexpr,
                     FP16: tl.constexpr, FAST: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    NW: tl.constexpr = BLOCK_C // 2  # words a program
    CW: tl.constexpr = C // 2
    g = tl.arange(0, NW)
    SPAN: tl.constexpr = min(32, NW)
    wcol = pid_c * NW + (g // SPAN) * SPAN + (g * 3) % SPAN  # permuted as in `_chain_cols`
    w_ok = wcol < CW
    state_lo = pid_b.to(tl.int64) * C + 2 * wcol
    state_hi = state_lo + 1
    rows = tl.arange(0, R)
    woffs = (pid_b.to(tl.int64) * T + k * R) * CW + rows[None, :] * CW + wcol[:, None]
    LAW = LA.to(tl.pointer_type(tl.int32), bitcast=True)
    XW = X.to(tl.pointer_type(tl.int32), bitcast=True)
    if MASKED:  # rows past T load words 0: a = 1, b = 0, which copy the carry
        ok = w_ok[:, None] & (k * R + rows < T)[None, :]
        law = tl.load(LAW + woffs, mask=ok, other=0)
        xw = tl.load(XW + woffs, mask=ok, other=0)
    else:
        law = tl.load(LAW + woffs)
        xw = tl.load(XW + woffs)
    law = _clamp_words(law, FP16, FAST)
    last = rows[None, :] == R - 1
    a_lo, b_lo = tl.associative_scan((_word_decay(_half(law, False, FP16, True), FAST, True),
                                      _half(xw, False, FP16, True)), 1, _compose)  # fmt: skip
    a_hi, b_hi = tl.associative_scan((_word_decay(_half(law, True, FP16, True), FAST, True),
                                      _half(xw, True, FP16, True)), 1, _compose)  # fmt: skip
    ring = LINK + 1
    carry_lo = _carry_in(H0, ring + state_lo, k, state_lo, w_ok, ring_slot, HAS_H0, NW, SPIN_LIMIT)
    carry_hi = _carry_in(H0, ring + state_hi, k, state_hi, w_ok, ring_slot, HAS_H0, NW, SPIN_LIMIT)
    out_lo = tl.sum(tl.where(last, a_lo, 0.0), axis=1) * carry_lo + tl.sum(tl.where(last, b_lo, 0.0), axis=1)
    out_hi = tl.sum(tl.where(last, a_hi, 0.0), axis=1) * carry_hi + tl.sum(tl.where(last, b_hi, 0.0), axis=1)
    _carry_out(HLAST, ring + state_lo, k, n_chunks, out_lo, state_lo, w_ok, ring_slot, True)
    _carry_out(HLAST, ring + state_hi, k, n_chunks, out_hi, state_hi, w_ok, ring_slot, True)
    first = rows[None, :] == 0
    h_lo = _words_half(law, xw, carry_lo, first, False, FP16, FAST)
    h_hi = _words_half(law, xw, carry_hi, first, True, FP16, FAST)
    # The chunk's last row is the value handed on (and h_last), not pass 2's own rounding of it,
    # so that h_last is h[:, -1] bit for bit. In a masked chunk that is every row from the last
    # one before T (the rows past T only copy it and are not stored).
    if MASKED:  # noqa: SIM108 (constexpr branches)
        tail = (rows >= _opaque(T - k * R - 1, FAST))[None, :]
    else:
        tail = last
    h_lo = tl.where(tail, out_lo[:, None], h_lo)
    h_hi = tl.where(tail, out_hi[:, None], h_hi)
    hw = _pack_halves(h_lo, h_hi, H.dtype.element_ty, FP16, FAST)
    HW = H.to(tl.pointer_type(tl.int32), bitcast=True)
    if MASKED:
        tl.store(HW + woffs, hw, mask=w_ok[:, None] & _rows_below(T - k * R, rows, FAST)[None, :])
    else:
        tl.store(HW + woffs, hw)


@triton.jit
def _scan_fwd_words(
    LA,
    X,
    H0,
    H,
    HLAST,  # [B, T, C] bf16 or fp16 (C even, 4-byte aligned), the same, [B, C], [B, T, C], [B, C]
    LINK,  # as in `_scan_fwd_chained`
    B,
    T,
    n_chunks,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels a program (BLOCK_C / 2 words)
    FP16: tl.constexpr,
    FAST: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    """`_scan_fwd_chained`'s serial chain with 64-row chunks held as words (above): half the
    hand-offs down a column. H200, bf16, against the 32-row channel-pair chain in the same run:
    B8 T4096 C2048 1.19x the copy floor against 1.25x, B4 1.47x against 1.87x; with the packed
    clamp and stores since, 1.10x-1.13x at B8 (BENCHMARKS.md, session 18)."""
    n_ct: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    per_chunk = B * n_ct
    ticket = tl.atomic_add(LINK, 1, sem="relaxed")  # as in `_chain_position`
    if ticket == per_chunk * n_chunks - 1:
        tl.atomic_xchg(LINK, 0, sem="relaxed")
    k = ticket // per_chunk
    rest = ticket % per_chunk
    pid_b = rest // n_ct
    pid_c = rest % n_ct
    if ((C // 2) % (BLOCK_C // 2) != 0) or (k * R + R > T):
        _chunk_fwd_words(LA, X, H0, H, HLAST, LINK, pid_b, pid_c, k, T, n_chunks, B * C, C, HAS_H0, R, BLOCK_C, True,
                         FP16, FAST, SPIN_LIMIT)  # fmt: skip
    else:
        _chunk_fwd_words(LA, X, H0, H, HLAST, LINK, pid_b, pid_c, k, T, n_chunks, B * C, C, HAS_H0, R, BLOCK_C, False,
                         FP16, FAST, SPIN_LIMIT)  # fmt: skip


@triton.jit
def _compose_excl(a_first, b_first, e_first, f_first, a_then, b_then, e_then, f_then):
    """Scan elements carrying two affine maps: the composition of every row so far (a, b) and
    of every row but the newest (e, f). For a one-row `then` (e, f) is the identity, so the
    second map of the result is `first`'s composition: the scan's exclusive part."""
    return a_first * a_then, a_then * b_first + b_then, a_first * e_then, e_then * b_first + f_then


@triton.jit
def _chunk_bwd(LA, H, H0, DH, DHLAST, DLA, DX, DH0, ring, DESC, tag_base, base, cols, state, j, k, T, n_chunks,
               ring_slot, C: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHLAST: tl.constexpr, R: tl.constexpr,
               SUB: tl.constexpr, BLOCK_C: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr,
               LOOKBACK: tl.constexpr, W: tl.constexpr, SPARSE: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    # Tile row i is chunk row R-1-i: the reverse walk as a forward scan (a reverse=True scan
    # lowers to shuffles). Row t maps v_{t+1} to v_t = a_t v_{t+1} + a_t dh_t.
    rows = tl.arange(0, R)
    back = R - 1 - rows
    offs = base + back[:, None] * C + cols[None, :]
    if MASKED:
        ok = (k * R + back < T)[:, None] & (cols < C)[None, :]
        la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        la = tl.load(LA + offs).to(tl.float32)
        dh = tl.load(DH + offs).to(tl.float32)
    a = _decay(la, FAST)
    a_cum, b_cum = tl.associative_scan((a, a * dh), 0, _compose)
    col_ok = cols < C
    # At the head (the last chunk) v_T = dh_last (a_T = 1 past the end); at the end dh0 = v_0.
    carry = _hand_on(ring, DESC, tag_base, j, n_chunks, DHLAST, DH0, state, col_ok, a_cum, b_cum, rows, ring_slot, R,
                     HAS_DHLAST, HAS_H0, LOOKBACK, W, SPARSE, BLOCK_C, SPIN_LIMIT)  # fmt: skip
    # The outputs, SUB rows at a time from the chunk's end, re-reading log_a and dh (cache hits
    # a microsecond after the first read) so that only SUB rows of the scan live in registers.
    sub_rows = tl.arange(0, SUB)
    one = tl.full([SUB, BLOCK_C], 1.0, tl.float32)
    none = tl.full([SUB, BLOCK_C], -0.0, tl.float32)  # -0.0: x + none folds to x
    for i in tl.static_range(R // SUB):
        sub_back = R - 1 - i * SUB - sub_rows
        t = k * R + sub_back
        offs = base + sub_back[:, None] * C + cols[None, :]
        if MASKED:
            ok = _rows_below(T - k * R, sub_back, FAST)[:, None] & col_ok[None, :]
            la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
            dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
            h_prev = tl.load(H + offs - C, mask=ok & (t > 0)[:, None], other=0.0).to(tl.float32)
        else:
            la = tl.load(LA + offs).to(tl.float32)
            dh = tl.load(DH + offs).to(tl.float32)
            if k == 0:
                h_prev = tl.load(H + offs - C, mask=(t > 0)[:, None], other=0.0).to(tl.float32)
            else:
                h_prev = tl.load(H + offs - C).to(tl.float32)
        if HAS_H0:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if k == 0:
                h0 = tl.load(H0 + state, mask=col_ok, other=0.0).to(tl.float32)
                h_prev = tl.where(t[:, None] == 0, h0[None, :], h_prev)
        a = _decay(la, FAST)
        a_cum, b_cum, e_cum, f_cum = tl.associative_scan((a, a * dh, one, none), 0, _compose_excl)
        g = dh + (e_cum * carry[None, :] + f_cum)  # g_t = dh_t + v_{t+1}
        v = a * g
        dla = tl.where((la >= LOG_A_MIN) & (la <= LOG_A_MAX), v * h_prev, 0.0).to(DLA.dtype.element_ty)
        if MASKED:
            tl.store(DLA + offs, dla, mask=ok)
            tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=ok)
        else:
            tl.store(DLA + offs, dla)
            tl.store(DX + offs, g.to(DX.dtype.element_ty))
        carry = _through_last_row(a_cum, b_cum, carry, sub_rows, SUB)


@triton.jit(do_not_specialize=["tag_base"])  # it changes every launch
def _scan_bwd_chained(
    LA,
    H,
    H0,
    DH,
    DHLAST,  # inputs: [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    DLA,
    DX,
    DH0,  # outputs: [B, T, C], [B, T, C], [B, C]
    LINK,  # int64 [1 + 2 * B * C], zero, left zero (as in the forward)
    DESC,  # LOOKBACK: the chunks' descriptors (as in the forward)
    tag_base,
    B,
    T,
    n_chunks,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHLAST: tl.constexpr,
    R: tl.constexpr,
    SUB: tl.constexpr,
    EVEN: tl.constexpr,  # no chunk is masked (and the hand-off is serial): no masked path compiled (`_even`)
    BLOCK_C: tl.constexpr,
    FAST: tl.constexpr,
    LOOKBACK: tl.constexpr,
    W: tl.constexpr,
    SPARSE: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    """The forward's chain run from the last chunk to the first: v_t = a_t g_t with
    g_t = dh_t + v_{t+1}; a chunk's carry is v of the next chunk's first row; dlog_a_t =
    v_t h_{t-1}, db_t = g_t, dh0 = v_0. Reads log_a and dh twice (the second time from cache)
    and h once; writes dlog_a and db once."""
    j, k, cols, state, ring, base = _chain_position(LINK, B, T, n_chunks, C, R, BLOCK_C, True)
    if (not EVEN) and ((C % BLOCK_C != 0) or (k * R + R > T)):
        _chunk_bwd(LA, H, H0, DH, DHLAST, DLA, DX, DH0, ring, DESC, tag_base, base, cols, state, j, k, T, n_chunks,
                   B * C, C, HAS_H0, HAS_DHLAST, R, SUB, BLOCK_C, True, FAST, LOOKBACK, W, SPARSE,
                   SPIN_LIMIT)  # fmt: skip
    else:
        _chunk_bwd(LA, H, H0, DH, DHLAST, DLA, DX, DH0, ring, DESC, tag_base, base, cols, state, j, k, T, n_chunks,
                   B * C, C, HAS_H0, HAS_DHLAST, R, SUB, BLOCK_C, False, FAST, LOOKBACK, W, SPARSE,
                   SPIN_LIMIT)  # fmt: skip


@triton.jit
def _bwd_rows(
    LA,
    H,
    DH,
    DLA,
    DX,
    offs,
    t0,
    T,
    cols,
    h0,
    v,
    C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Rows t0 + BLOCK_T - 1 down to t0 of one chunk (offs: row t0 of this program's columns),
    one row at a time: g_t = dh_t + v_{t+1}, v_t = a_t g_t, dlog_a_t = v_t h_{t-1}, db_t = g_t.
    MASKED: rows may lie past T, and row -1 (t0 = 0) is h0. Ragged C masks every chunk."""
    masks: tl.constexpr = MASKED or C % BLOCK_C != 0
    for i in tl.static_range(BLOCK_T):
        r = BLOCK_T - 1 - i
        if masks:
            # A tensor mask: the interpreter rejects scalar ones.
            ok = (cols < C) & (cols * 0 + t0 + r < T)
            la = tl.load(LA + offs + r * C, mask=ok, other=0.0).to(tl.float32)
            dh = tl.load(DH + offs + r * C, mask=ok, other=0.0).to(tl.float32)
            h_prev = tl.load(H + offs + (r - 1) * C, mask=ok & (cols * 0 + t0 + r > 0), other=0.0).to(tl.float32)
            if r == 0:
                h_prev = tl.where(cols * 0 + t0 == 0, h0, h_prev)
        else:
            la = tl.load(LA + offs + r * C).to(tl.float32)
            dh = tl.load(DH + offs + r * C).to(tl.float32)
            h_prev = tl.load(H + offs + (r - 1) * C).to(tl.float32)
        a = tl.exp(_clamp_log_a(la))
        g = dh + v  # rows past T: dh = 0 and a = 1, so v passes through unchanged
        v = a * g
        dla = tl.where((la >= LOG_A_MIN) & (la <= LOG_A_MAX), v * h_prev, 0.0)
        if masks:
            tl.store(DLA + offs + r * C, dla.to(DLA.dtype.element_ty), mask=ok)
            tl.store(DX + offs + r * C, g.to(DX.dtype.element_ty), mask=ok)
        else:
            tl.store(DLA + offs + r * C, dla.to(DLA.dtype.element_ty))
            tl.store(DX + offs + r * C, g.to(DX.dtype.element_ty))
    return v


@triton.jit
def _scan_bwd(
    LA,
    H,
    H0,
    DH,
    DHLAST,  # inputs: [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    DLA,
    DX,
    DH0,  # outputs: [B, T, C], [B, T, C], [B, C]
    T,
    C: tl.constexpr,  # constexpr: row offsets inside a chunk become immediates of the loads
    HAS_H0: tl.constexpr,
    HAS_DHLAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,  # chunks in flight (the loop's software-pipeline depth)
):
    """The reverse walk, one row at a time in registers. The adjoint g_t = dh_t + a_{t+1} g_{t+1}
    is carried as v_t = a_t g_t (g_t = dh_t + v_{t+1}), so row t needs only its own a_t; and
    dlog_a_t = v_t h_{t-1}, db_t = g_t, dh0 = v_0. Each row reads log_a, dh and h_{t-1} once.

    Why rows and not `tl.associative_scan` over a [BLOCK_T, BLOCK_C] tile: Triton lays such a
    tile out with lanes along T, and the scan's shuffles, the carry extraction and the selects cost
    about 37 instructions per element (sm_90 SASS); the kernel was issue-bound (ncu: one warp per
    scheduler issuing every 2.2 cycles). A row is a 1-D [BLOCK_C] vector with 4 bytes per thread
    (two bf16 columns, or one fp32), so the row loads stay 4-byte cp.async copies that the
    pipeliner keeps STAGES chunks ahead, and the recurrence is one FMA per element. The partial
    chunk at the end runs first (masked), then the full chunks down to chunk 1 (unmasked,
    pipelined), then chunk 0 (masked: its row -1 is h0)."""
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    state_offs = pid_b.to(tl.int64) * C + cols
    # int64: B*T*C overflows int32 at the 7B config's segment length.
    base = pid_b.to(tl.int64) * T * C + cols
    if HAS_H0:
        h0 = tl.load(H0 + state_offs, mask=cols < C, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DHLAST:  # v_T = a_T g_T with a_T = 1 past the end
        v = tl.load(DHLAST + state_offs, mask=cols < C, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK_C], dtype=tl.float32)
    full = T // BLOCK_T
    if full * BLOCK_T < T:
        v = _bwd_rows(LA, H, DH, DLA, DX, base + full * BLOCK_T * C, full * BLOCK_T, T, cols, h0, v, C, BLOCK_T,
                      BLOCK_C, True)  # fmt: skip
    offs = base + (full - 1) * BLOCK_T * C
    for _ in tl.range(1, full, num_stages=STAGES):
        v = _bwd_rows(LA, H, DH, DLA, DX, offs, 1, T, cols, h0, v, C, BLOCK_T, BLOCK_C, False)
        offs -= BLOCK_T * C
    if full > 0:
        v = _bwd_rows(LA, H, DH, DLA, DX, base, 0, T, cols, h0, v, C, BLOCK_T, BLOCK_C, True)
    if HAS_H0:
        tl.store(DH0 + state_offs, v.to(DH0.dtype.element_ty), mask=cols < C)


def _configs(tiles) -> list[triton.Config]:
    return [triton.Config({"BLOCK_T": bt, "BLOCK_C": bc, "STAGES": st}, num_warps=w) for bt, bc, w, st in tiles]


# (BLOCK_T, BLOCK_C, warps, stages): the three best of `benchmarks/scan_sweep.py --quick` per
# direction on the H100 (B8 T4096 C2048 bf16). Small tiles and few warps: many programs, the
# scan along T inside a warp, and the pipeliner's stages (not registers) holding loads in flight.
# With a 30-config space the tuned op measured 0.964 ms fwd+bwd in benchmarks/recurrence.py,
# against 0.19 + 0.42 ms for the best configs timed apart.
_scan_fwd_tuned = triton.autotune(_configs([(16, 32, 1, 4), (64, 32, 2, 3), (32, 32, 1, 6)]), key=["C", "HAS_H0"])(
    _scan_fwd
)


def _bwd_block_c(warps: int, itemsize: int) -> int:
    """Four bytes of each row per thread (two bf16/fp16 columns, one fp32): the narrowest access
    the pipeliner turns into a cp.async copy, so the most programs for a given width."""
    return 32 * warps * max(1, 4 // itemsize)


# (BLOCK_T, warps, stages), the best of `benchmarks/scan_sweep.py --only bwd` on the H100
# (B8 T4096 C2048 bf16: 0.30 ms = 1.27x-1.29x the 5-pass floor for all four).
_BWD_TILES = ((8, 2, 6), (4, 1, 8), (8, 1, 6), (16, 1, 4))


def _bwd_prune(configs, named_args, **_):
    itemsize = named_args["H"].element_size()
    return [c for c in configs if c.kwargs["BLOCK_C"] == _bwd_block_c(c.num_warps, itemsize)]


_scan_bwd_tuned = triton.autotune(
    _configs([(bt, _bwd_block_c(w, size), w, st) for bt, w, st in _BWD_TILES for size in (2, 4)]),
    key=["C", "HAS_H0", "HAS_DHLAST"],
    prune_configs_by={"early_config_prune": _bwd_prune},
)(_scan_bwd)


def _launch(tuned, plain, grid_b: int, width: int, *args, tile, interpret_tile, **meta):
    """Autotuned on a GPU; a fixed tile (`tile`) with autotuning off, `interpret_tile` under the
    interpreter (small, so the tests cross chunk and column-block edges)."""
    if knobs.interpret or not knobs.autotune:
        block_t, block_c, warps, stages = interpret_tile if knobs.interpret else tile
        grid = (grid_b, triton.cdiv(width, block_c))
        plain[grid](*args, **meta, BLOCK_T=block_t, BLOCK_C=block_c, STAGES=stages, num_warps=warps)
    else:
        tuned[lambda m: (grid_b, triton.cdiv(width, m["BLOCK_C"]))](*args, **meta)


_launch_fwd_chained = Launcher(_scan_fwd_chained)
_launch_bwd_chained = Launcher(_scan_bwd_chained)
_launch_fwd_words = Launcher(_scan_fwd_words)
_RINGS: dict[tuple, Tensor] = {}


def _link(bsz: int, width: int, device) -> Tensor:
    """The chain's ticket counter and two-slot ring (int64, 1 + 2 B C words), all zero.

    Every launch leaves them zero again (the last ticket resets the counter, each column's last
    chunk clears its ring slots), so one buffer per device and stream is reused without a
    memset per launch (4 us each in do_bench). Kernels on one stream run one at a time, so they
    never share it concurrently. Under CUDA-graph capture each launch gets its own zeroed
    buffer instead (a memset in the graph), since a graph may be replayed on any stream."""
    need = 1 + 2 * bsz * width
    if device.type == "cuda":  # the raw stream calls: a few us less than torch.cuda.current_stream()
        if torch._C._cuda_isCurrentStreamCapturing():
            return torch.zeros(need, dtype=torch.int64, device=device)
        key = (device, torch._C._cuda_getCurrentRawStream(device.index))
    else:
        key = (device, 0)
    ring = _RINGS.get(key)
    if ring is None or ring.numel() < need:
        ring = _RINGS[key] = torch.zeros(need, dtype=torch.int64, device=device)
    return ring


_DESCS: dict[tuple, list] = {}
TAG_LIMIT = 1 << 31  # tags are int32 above each word's fp32 value


def _descriptors(bsz: int, width: int, n_chunks: int, device) -> tuple[Tensor, int]:
    """The look-back's descriptors (int64, 2 words per chunk and channel) and this launch's tag
    base. Tags only grow, so a word left by an earlier launch never carries a tag this launch
    waits for, and the buffer is zeroed only when it grows or the tags would overflow. Under
    CUDA-graph capture each launch gets its own zeroed buffer, as `_link` does."""
    need = 2 * n_chunks * bsz * width
    span = 2 * n_chunks + 3
    if device.type == "cuda" and torch._C._cuda_isCurrentStreamCapturing():
        return torch.zeros(need, dtype=torch.int64, device=device), 1
    key = (device, torch._C._cuda_getCurrentRawStream(device.index)) if device.type == "cuda" else (device, 0)
    entry = _DESCS.get(key)
    if entry is None or entry[0].numel() < need:
        entry = _DESCS[key] = [torch.zeros(need, dtype=torch.int64, device=device), 1]
    elif entry[1] + span >= TAG_LIMIT:
        entry[0].zero_()
        entry[1] = 1
    base = entry[1]
    entry[1] += span
    return entry[0], base


# Programs a chunk row (B * ceil(C / 128)) at or below which the chained kernels hand off by
# look-back: there the serial chain is most of the launch (H200, bf16 forward: 1.79x faster at
# B1 C256, 2 programs a row; 1.44x at B8 C512, 32), while at B8 C2048 (128) it was 0.67x the
# serial chain, and a 128-register version no better (BENCHMARKS.md, sessions 16 and 17).
LOOKBACK_PROGRAMS = 32
LOOKBACK_BYTES = 1 << 26  # the descriptors' size limit (64 MB: B*C 4096 at T 32768)


def _hand_off(bsz: int, width: int, block_c: int, n_chunks: int) -> bool:
    """Whether a chained launch hands off by look-back: MMREC_SCAN=chained picks by programs a
    chunk row, lookback and serial force one. Descriptors over LOOKBACK_BYTES always take the
    serial chain (under CUDA-graph capture they would be zeroed on every replay)."""
    mode = knobs.scan_kernels
    if 2 * n_chunks * bsz * width * 8 > LOOKBACK_BYTES or mode == "serial":
        return False
    return mode == "lookback" or bsz * triton.cdiv(width, block_c) <= LOOKBACK_PROGRAMS


def _look_meta(bsz: int, width: int, block_c: int, n_chunks: int, device) -> dict:
    """The chained kernels' look-back arguments: W chunks a poll (4 in the interpreter, whose
    SPARSE tests need 3), the descriptors and tag base."""
    if not _hand_off(bsz, width, block_c, n_chunks):
        return {"DESC": _link(1, 0, device), "tag_base": 1, "LOOKBACK": False, "W": 1, "SPARSE": False}  # unread
    desc, base = _descriptors(bsz, width, n_chunks, device)
    return {"DESC": desc, "tag_base": base, "LOOKBACK": True, "W": 4 if knobs.interpret else 2,
            "SPARSE": knobs.interpret}  # fmt: skip


def _chain_tile() -> tuple[int, int]:
    """(channels, rows per chunk) of a chained program. Small under the interpreter, so the
    tests cross chunk and channel-block edges."""
    return (16, 8) if knobs.interpret else (64 * CHAIN_WARPS, CHAIN_R)


def _bwd_sub(itemsize: int, even: bool) -> int:
    """Rows per output pass of a chained backward (small under the interpreter, so the tests
    cross sub-tile edges). On the GPU 32 rows at once where no chunk is masked (`even`: only the
    unmasked path is compiled, 128 registers in bf16; fp32 spills 32 bytes) and 16 rows
    elsewhere. H200, B8 T4096 C2048, against session 17's 16 rows with both paths compiled in
    the same run: bf16 1.16x its floor against 1.31x, fp32 1.10x against 1.12x; unmasked-only
    at 16 rows was slower than both paths (bf16 1.38x at 72 registers against 1.22x at 114;
    why is not measured), as was the look-back unmasked-only, which keeps both (BENCHMARKS.md)."""
    if knobs.interpret:
        return 8 if even else 4
    return BWD_SUB.get(itemsize, 16) if even else 16


BWD_SUB = {2: 32, 4: 32}  # the backward's output rows a pass where no chunk is masked, by element size
EVEN_KERNELS = True  # False: compile the masked path into every chained backward (for comparison)


def _even(bsz: int, steps: int, width: int, rows: int, block_c: int, n_chunks: int) -> bool:
    """Whether a chained backward compiles its unmasked path only: T a multiple of the chunk, C
    of the channel block, and the serial hand-off. With both paths in one kernel Triton 3.6's
    schedule took 210 registers in the bf16 backward at 32-row passes, against 128 and 80 for
    either alone; the look-back measured slower unmasked-only (B2 C1024 bf16: 2.7x its floor
    against 2.35x), so it keeps both. The forwards gained nothing from it (bf16 1.10x -> 1.13x,
    fp32 1.08x -> 1.10x at B8 T4096 C2048) and keep both (BENCHMARKS.md, session 18)."""
    return EVEN_KERNELS and steps % rows == 0 and width % block_c == 0 and not _hand_off(bsz, width, block_c, n_chunks)


@functools.cache
def _sm80(device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _words(log_a: Tensor, b: Tensor, block_c: int, n_chunks: int) -> bool:
    """Whether the forward runs on raw words (`_scan_fwd_words`): bf16 or fp16 inputs of one
    dtype, an even width and 4-byte aligned bases, the serial hand-off (the look-back keeps the
    channel-pair tile), an sm_80+ GPU or the interpreter, and not MMREC_SCAN_WORDS=0."""
    bsz, _, width = b.shape
    return (
        knobs.scan_words
        and (b.device.type != "cuda" or _sm80(b.device))  # its PTX: bf16x2 min/max, cvt to bf16x2
        and b.dtype in (torch.bfloat16, torch.float16)
        and log_a.dtype == b.dtype
        and width % 2 == 0
        and log_a.data_ptr() % 4 == 0
        and b.data_ptr() % 4 == 0
        and not _hand_off(bsz, width, block_c, n_chunks)
    )


def _chain_warps(block_c: int) -> int:
    return max(1, block_c // 64)  # a pair of channels per thread


def _use_chained() -> bool:
    """The chained kernels, unless MMREC_SCAN=walk. The chained forward measured faster at every width
    tried on the H100 (B*C from 256 to 16384 channels at T 1024-4096; BENCHMARKS.md): the
    tiled walk's single walker per column is latency-bound even where the chain has few
    programs per hand-off."""
    mode = knobs.scan_kernels
    if mode not in ("chained", "serial", "lookback", "walk"):
        raise ValueError(f"MMREC_SCAN={mode!r}: expected chained, serial, lookback or walk")
    return mode != "walk"


def scan_fwd(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """Contiguous [B, T, C] inputs -> (h, h_last) in b's dtype."""
    bsz, steps, width = b.shape
    h = new_output(b)
    h_last = new_output(b, (bsz, width))
    if _use_chained():
        if steps == 0:  # no chunk to launch: h_last is the initial state
            return h, h_last.copy_(h0) if h0 is not None else h_last.zero_()
        block_c, rows = _chain_tile()
        n_chunks = triton.cdiv(steps, rows)
        if _words(log_a, b, block_c, n_chunks):
            if fwd_gluon.usable(log_a, b):
                fwd_gluon.launch(log_a, b, h0, h, h_last, _link(bsz, width, b.device))
                return h, h_last
            rows = WORDS_R if not knobs.interpret else rows
            n_chunks = triton.cdiv(steps, rows)
            _launch_fwd_words(
                (n_chunks * bsz * triton.cdiv(width, block_c),),
                log_a, b, h0 if h0 is not None else b, h, h_last, _link(bsz, width, b.device),
                B=bsz, T=steps, n_chunks=n_chunks, C=width, HAS_H0=h0 is not None, R=rows, BLOCK_C=block_c,
                FP16=b.dtype == torch.float16, FAST=not knobs.interpret, SPIN_LIMIT=SPIN_LIMIT,
                num_warps=_chain_warps(block_c),
            )  # fmt: skip
            return h, h_last
        _launch_fwd_chained(
            (n_chunks * bsz * triton.cdiv(width, block_c),),
            log_a, b, h0 if h0 is not None else b, h, h_last, _link(bsz, width, b.device),
            B=bsz, T=steps, n_chunks=n_chunks, C=width, HAS_H0=h0 is not None, R=rows, BLOCK_C=block_c,
            FAST=not knobs.interpret, SPIN_LIMIT=SPIN_LIMIT, num_warps=_chain_warps(block_c),
            **_look_meta(bsz, width, block_c, n_chunks, b.device),
        )  # fmt: skip
        return h, h_last
    _launch(
        _scan_fwd_tuned,
        _scan_fwd,
        bsz,
        width,
        log_a,
        b,
        h0 if h0 is not None else b,
        h,
        h_last,
        steps,
        width,
        HAS_H0=h0 is not None,
        tile=(16, 32, 1, 4),
        interpret_tile=(8, 16, 1, 1),
    )
    return h, h_last


def scan_bwd(
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dlog_a, db, dh0 or None). dh_last None means zero (h_last unused)."""
    bsz, steps, width = h.shape
    dlog_a = new_output(log_a)
    db = new_output(h)
    dh0 = new_output(h0) if h0 is not None else None
    if _use_chained():
        if steps == 0:  # no chunk to launch: dh0 is dh_last
            if dh0 is not None:
                dh0.copy_(dh_last) if dh_last is not None else dh0.zero_()
            return dlog_a, db, dh0
        block_c, rows = _chain_tile()
        n_chunks = triton.cdiv(steps, rows)
        even = _even(bsz, steps, width, rows, block_c, n_chunks)
        sub = _bwd_sub(h.element_size(), even)
        _launch_bwd_chained(
            (n_chunks * bsz * triton.cdiv(width, block_c),),
            log_a, h, h0 if h0 is not None else h, dh, dh_last if dh_last is not None else dh, dlog_a, db,
            dh0 if dh0 is not None else db, _link(bsz, width, h.device),
            B=bsz, T=steps, n_chunks=n_chunks, C=width, HAS_H0=h0 is not None, HAS_DHLAST=dh_last is not None,
            R=rows, SUB=sub, EVEN=even, BLOCK_C=block_c, FAST=not knobs.interpret, SPIN_LIMIT=SPIN_LIMIT,
            num_warps=_chain_warps(block_c), **_look_meta(bsz, width, block_c, n_chunks, h.device),
        )  # fmt: skip
        return dlog_a, db, dh0
    _launch(
        _scan_bwd_tuned,
        _scan_bwd,
        bsz,
        width,
        log_a,
        h,
        h0 if h0 is not None else h,
        dh,
        dh_last if dh_last is not None else dh,
        dlog_a,
        db,
        dh0 if dh0 is not None else db,
        steps,
        width,
        HAS_H0=h0 is not None,
        HAS_DHLAST=dh_last is not None,
        tile=(8, _bwd_block_c(1, h.element_size()), 1, 6),
        interpret_tile=(4, 16, 1, 1),
    )
    return dlog_a, db, dh0
