"""The linear scan in one pass with decoupled look-back: parallel over time as well as channels.

kernel.py gives one program a [B row, channel tile] and walks all T steps: 512 programs of one
or two warps at B8 C2048, each a serial chain of chunk scans. The hypothesis behind this file:
with that little parallelism the chain's latency, not the bandwidth, sets kernel.py's time
(1.3x the copy floor forward, 1.7x backward). Measured on the H100 (benchmarks/scan_sweep.py
--lookback, B8 T4096 C2048 bf16), it is refuted: the best parts gave 1.52x forward and 1.73x
backward with part order by program id, 1.72x / 1.78x with the atomic ticket counter (131K
programs contend for it). So kernel.py stays the default; this one is opt-in
(MMREC_SCAN=lookback), tested like it, and kept for other GPUs and shapes.

Here every program owns one [BLOCK_T, BLOCK_C] part of one row and the parts are all in flight
at once. A part loads its tile, scans it locally (`tl.associative_scan`), and needs only the
state entering it. It gets that state the way single-pass GPU prefix scans do (Merrill and
Garland's decoupled look-back):

1. publish its aggregate, the affine map (A, B) of its BLOCK_T steps (flag 1);
2. walk back over the preceding parts, composing their aggregates, until one has published
   its inclusive state (flag 2): the state entering this part is that state pushed through the
   composed maps;
3. write its outputs and publish its own inclusive state (flag 2).

Part tickets come from an atomic counter in launch order, time-major, so every part a program
waits on has been scheduled before it (forward progress does not depend on the hardware's
block order). Each input is still read once and each output written once; the scratch (per
part: flag, aggregate, inclusive state; 12 bytes per channel) is 1/BLOCK_T of the traffic.
Published data is written before its flag with release semantics and read after the flag with
acquire semantics, through L2 (`.cg`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output
from .kernel import LOG_A_MAX, LOG_A_MIN, _compose


@triton.jit
def _row(x, rows, which: tl.constexpr):
    """Row `which` of a [BLOCK_T, BLOCK_C] tile, as a [BLOCK_C] vector."""
    return tl.sum(tl.where(rows[:, None] == which, x, 0.0), axis=0)


@triton.jit
def _publish(FLAGS, DATA, slot, offs, value, flag: tl.constexpr):
    tl.store(DATA + offs, value, cache_modifier=".cg")
    tl.debug_barrier()  # every thread's part of `value` is written before the flag
    tl.atomic_xchg(FLAGS + slot, flag, sem="release")


@triton.jit
def _look_back(FLAGS, AGG_A, AGG_B, INC, base, j, step, lanes, BLOCK_C: tl.constexpr):
    """The state entering a part, from its predecessors j, j + step, j + 2 step, ...: their
    aggregates composed until one has its inclusive state (the first part always does)."""
    fa = tl.full([BLOCK_C], 1.0, tl.float32)
    fb = tl.zeros([BLOCK_C], dtype=tl.float32)
    carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    searching = j * 0 + 1  # a tensor: it is loop-carried
    while searching > 0:
        flag = tl.atomic_add(FLAGS + base + j, 0, sem="acquire")
        offs = (base + j).to(tl.int64) * BLOCK_C + lanes
        if flag == 2:
            carry = fa * tl.load(INC + offs, cache_modifier=".cg") + fb
            searching = searching * 0
        elif flag == 1:
            a_j = tl.load(AGG_A + offs, cache_modifier=".cg")
            fb = fa * tl.load(AGG_B + offs, cache_modifier=".cg") + fb
            fa = fa * a_j
            j = j + step
    return carry


@triton.jit
def _ticket(COUNTER, B, NC, P, REVERSE: tl.constexpr, TICKETS: tl.constexpr):
    """-> (b, channel tile, part) for this program, in time-major launch order: from an atomic
    counter (TICKETS), or the program id, as CUB's scans do (blocks start in id order)."""
    ticket = tl.atomic_add(COUNTER, 1) if TICKETS else tl.program_id(0)
    per_part = B * NC
    part = ticket // per_part
    if REVERSE:
        part = P - 1 - part
    rest = ticket % per_part
    return rest // NC, rest % NC, part


@triton.jit
def _scan_fwd_lb(
    LA, X, H0, H, HLAST,  # [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    SCRATCH, AGG_A, AGG_B, INC,  # int32 [1 + B*NC*P] (counter, flags); fp32 [B*NC*P, BLOCK_C] x 3
    B, T, C, NC, P,
    HAS_H0: tl.constexpr,
    TICKETS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, ct, part = _ticket(SCRATCH, B, NC, P, False, TICKETS)
    FLAGS = SCRATCH + 1
    lanes = tl.arange(0, BLOCK_C)
    cols = ct * BLOCK_C + lanes
    col_ok = cols < C
    rows = tl.arange(0, BLOCK_T)
    t = part * BLOCK_T + rows
    ok = (t < T)[:, None] & col_ok[None, :]
    offs = b.to(tl.int64) * T * C + t.to(tl.int64)[:, None] * C + cols[None, :]
    # Rows past T load a = exp(0) = 1, b = 0: they carry the state through unchanged.
    la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
    a_cum, b_cum = tl.associative_scan((a, x), 0, _compose)
    agg_a, agg_b = _row(a_cum, rows, BLOCK_T - 1), _row(b_cum, rows, BLOCK_T - 1)
    base = (b * NC + ct) * P
    mine = (base + part).to(tl.int64) * BLOCK_C + lanes
    if part == 0:
        if HAS_H0:
            carry = tl.load(H0 + b.to(tl.int64) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        tl.store(AGG_A + mine, agg_a, cache_modifier=".cg")
        _publish(FLAGS, AGG_B, base + part, mine, agg_b, 1)
        carry = _look_back(FLAGS, AGG_A, AGG_B, INC, base, part - 1, -1, lanes, BLOCK_C)
    inclusive = agg_a * carry + agg_b
    _publish(FLAGS, INC, base + part, mine, inclusive, 2)
    tl.store(H + offs, (a_cum * carry[None, :] + b_cum).to(H.dtype.element_ty), mask=ok)
    if part == P - 1:
        tl.store(HLAST + b.to(tl.int64) * C + cols, inclusive.to(HLAST.dtype.element_ty), mask=col_ok)


@triton.jit
def _scan_bwd_lb(
    LA, H, H0, DH, DHLAST,  # inputs: [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    DLA, DX, DH0,  # outputs: [B, T, C], [B, T, C], [B, C]
    SCRATCH, AGG_A, AGG_B, INC,
    B, T, C, NC, P,
    HAS_H0: tl.constexpr,
    HAS_DHLAST: tl.constexpr,
    TICKETS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """kernel._scan_bwd's v = a g formulation, parts from the end: v_t = a_t dh_t + a_t v_{t+1},
    dlog_a_t = v_t h_{t-1}, db_t = v_t / a_t, dh0 = v_0."""
    b, ct, part = _ticket(SCRATCH, B, NC, P, True, TICKETS)
    FLAGS = SCRATCH + 1
    lanes = tl.arange(0, BLOCK_C)
    cols = ct * BLOCK_C + lanes
    col_ok = cols < C
    rows = tl.arange(0, BLOCK_T)
    t = part * BLOCK_T + rows
    ok = (t < T)[:, None] & col_ok[None, :]
    offs = b.to(tl.int64) * T * C + t.to(tl.int64)[:, None] * C + cols[None, :]
    state = b.to(tl.int64) * C + cols
    la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
    h_prev = tl.load(H + offs - C, mask=ok & (t >= 1)[:, None], other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + state, mask=col_ok, other=0.0).to(tl.float32)
        h_prev += tl.where((t == 0)[:, None], h0[None, :], 0.0)
    la_c = tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX)
    a = tl.exp(la_c)
    a_cum, b_cum = tl.associative_scan((a, a * dh), 0, _compose, reverse=True)
    agg_a, agg_b = _row(a_cum, rows, 0), _row(b_cum, rows, 0)
    base = (b * NC + ct) * P
    mine = (base + part).to(tl.int64) * BLOCK_C + lanes
    if part == P - 1:
        if HAS_DHLAST:  # v_T = a_T g_T with a_T = 1 past the end
            carry = tl.load(DHLAST + state, mask=col_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        tl.store(AGG_A + mine, agg_a, cache_modifier=".cg")
        _publish(FLAGS, AGG_B, base + part, mine, agg_b, 1)
        carry = _look_back(FLAGS, AGG_A, AGG_B, INC, base, part + 1, 1, lanes, BLOCK_C)
    inclusive = agg_a * carry + agg_b  # v at the part's first row
    _publish(FLAGS, INC, base + part, mine, inclusive, 2)
    v = a_cum * carry[None, :] + b_cum
    in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
    tl.store(DLA + offs, tl.where(in_range, v * h_prev, 0.0).to(DLA.dtype.element_ty), mask=ok)
    tl.store(DX + offs, (v * tl.exp(-la_c)).to(DX.dtype.element_ty), mask=ok)
    if HAS_H0:  # noqa: SIM102 (a constexpr test, then a runtime one: Triton keeps them apart)
        if part == 0:
            tl.store(DH0 + state, inclusive.to(DH0.dtype.element_ty), mask=col_ok)


# (BLOCK_T, BLOCK_C, warps) per direction; the interpreter uses small parts so that tests
# exercise many parts and look-back chains.
FWD_TILE = (16, 64, 1)  # the best of the sweep, without tickets
BWD_TILE = (32, 32, 1)
# Part order from an atomic ticket counter (True) or the program id (False); MMREC_SCAN_TICKETS.
TICKETS = __import__("os").environ.get("MMREC_SCAN_TICKETS", "1") == "1"
_INTERPRET_TILE = (8, 16, 1)


def _scratch(bsz: int, width: int, steps: int, block_t: int, block_c: int, device):
    n_c, parts = triton.cdiv(width, block_c), triton.cdiv(steps, block_t)
    n = bsz * n_c * parts
    scratch = torch.zeros(1 + n, device=device, dtype=torch.int32)  # ticket counter, flags
    data = torch.empty(3, n * block_c, device=device, dtype=torch.float32)  # aggregates, inclusive
    return (scratch, data[0], data[1], data[2]), n_c, parts


def scan_fwd(log_a: Tensor, b: Tensor, h0: Tensor | None, tile=None) -> tuple[Tensor, Tensor]:
    """Contiguous [B, T, C] inputs -> (h, h_last) in b's dtype."""
    bsz, steps, width = b.shape
    block_t, block_c, warps = tile or (_INTERPRET_TILE if knobs.interpret else FWD_TILE)
    scratch, n_c, parts = _scratch(bsz, width, steps, block_t, block_c, b.device)
    h = new_output(b)
    h_last = new_output(b, (bsz, width))
    _scan_fwd_lb[(bsz * n_c * parts,)](
        log_a, b, h0 if h0 is not None else b, h, h_last, *scratch, bsz, steps, width, n_c, parts,
        HAS_H0=h0 is not None, TICKETS=TICKETS, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return h, h_last


def scan_bwd(
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None, tile=None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dlog_a, db, dh0 or None). dh_last None means zero (h_last unused)."""
    bsz, steps, width = h.shape
    block_t, block_c, warps = tile or (_INTERPRET_TILE if knobs.interpret else BWD_TILE)
    scratch, n_c, parts = _scratch(bsz, width, steps, block_t, block_c, h.device)
    dlog_a = new_output(log_a)
    db = new_output(h)
    dh0 = new_output(h0) if h0 is not None else None
    _scan_bwd_lb[(bsz * n_c * parts,)](
        log_a, h, h0 if h0 is not None else h, dh, dh_last if dh_last is not None else dh,
        dlog_a, db, dh0 if dh0 is not None else db, *scratch, bsz, steps, width, n_c, parts,
        HAS_H0=h0 is not None, HAS_DHLAST=dh_last is not None, TICKETS=TICKETS, BLOCK_T=block_t,
        BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return dlog_a, db, dh0
