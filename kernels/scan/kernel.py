"""Triton kernels for the linear scan (SPEC §1), forward and backward, on the [B, T, C] layout.

One program owns a tile of BLOCK_C channels of one batch row and walks time in chunks of
BLOCK_T rows: it loads a [BLOCK_T, BLOCK_C] tile of log_a and b (contiguous along C, so
coalesced), scans it with `tl.associative_scan`, applies the carry from the previous chunk,
stores h, and carries the chunk's last row on. Every input element is read once and every
output written once: the forward moves 3 x B*T*C elements, the backward 5 (it reads log_a,
h, dh; writes dlog_a, db; the shifted re-reads of log_a and h hit in cache).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output

LOG_A_MIN = tl.constexpr(-50.0)
LOG_A_MAX = tl.constexpr(0.0)


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
    # The next chunk is loaded before this one is scanned, so its latency hides behind the scan.
    ok = (rows < T)[:, None] & col_ok[None, :]
    offs = row_base + rows.to(tl.int64)[:, None] * C + cols[None, :]
    la_next = tl.load(LA + offs, mask=ok, other=0.0)
    x_next = tl.load(X + offs, mask=ok, other=0.0)
    for t0 in range(0, T, BLOCK_T):
        # Rows past T load a = exp(0) = 1, b = 0: they copy the carry and change nothing.
        la, x = la_next.to(tl.float32), x_next.to(tl.float32)
        cur_ok, cur_offs = ok, offs
        ok = ((t0 + BLOCK_T + rows) < T)[:, None] & col_ok[None, :]
        offs = cur_offs + BLOCK_T * C
        la_next = tl.load(LA + offs, mask=ok, other=0.0)
        x_next = tl.load(X + offs, mask=ok, other=0.0)
        a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
        a_cum, b_cum = tl.associative_scan((a, x), 0, _compose)
        h = a_cum * carry[None, :] + b_cum
        tl.store(H + cur_offs, h.to(H.dtype.element_ty), mask=cur_ok)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
    tl.store(HLAST + pid_b.to(tl.int64) * C + cols, carry.to(HLAST.dtype.element_ty), mask=col_ok)


@triton.jit
def _bwd_loads(LA, DH, H, row_base, t, cols, col_ok, T, C):
    """log_a_t, log_a_{t+1}, dh_t, h_{t-1} for one chunk of rows t (0 where out of range)."""
    ok = ((t >= 0) & (t < T))[:, None] & col_ok[None, :]
    offs = row_base + t.to(tl.int64)[:, None] * C + cols[None, :]
    la = tl.load(LA + offs, mask=ok, other=0.0)
    la_next = tl.load(LA + offs + C, mask=ok & ((t + 1) < T)[:, None], other=0.0)
    dh = tl.load(DH + offs, mask=ok, other=0.0)
    h_prev = tl.load(H + offs - C, mask=ok & (t >= 1)[:, None], other=0.0)
    return la, la_next, dh, h_prev


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
    C,
    HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rows = tl.arange(0, BLOCK_T)
    row_base = pid_b.to(tl.int64) * T * C
    state_offs = pid_b.to(tl.int64) * C + cols
    if HAS_H0:
        h0 = tl.load(H0 + state_offs, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    carry = tl.load(DHLAST + state_offs, mask=col_ok, other=0.0).to(tl.float32)  # g_{T} seed
    # Chunks run from the end; each chunk's inputs are loaded one chunk ahead.
    t = (tl.cdiv(T, BLOCK_T) - 1) * BLOCK_T + rows
    la_n, la_next_n, dh_n, h_prev_n = _bwd_loads(LA, DH, H, row_base, t, cols, col_ok, T, C)
    for _ in range(tl.cdiv(T, BLOCK_T)):
        la, la_next = la_n.to(tl.float32), la_next_n.to(tl.float32)
        dh, h_prev = dh_n.to(tl.float32), h_prev_n.to(tl.float32)
        cur = t
        t = cur - BLOCK_T
        la_n, la_next_n, dh_n, h_prev_n = _bwd_loads(LA, DH, H, row_base, t, cols, col_ok, T, C)

        ok = (cur < T)[:, None] & col_ok[None, :]
        offs = row_base + cur.to(tl.int64)[:, None] * C + cols[None, :]
        a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
        # alpha_t = a_{t+1} (1 past the end, where la_next loaded 0), so g_t = dh_t + alpha_t g_{t+1}.
        alpha = tl.exp(tl.minimum(tl.maximum(la_next, LOG_A_MIN), LOG_A_MAX))
        a_cum, b_cum = tl.associative_scan((alpha, dh), 0, _compose, reverse=True)
        g = a_cum * carry[None, :] + b_cum
        h_prev += tl.where((cur == 0)[:, None], h0[None, :], 0.0)
        in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
        dla = tl.where(in_range, g * a * h_prev, 0.0)
        tl.store(DLA + offs, dla.to(DLA.dtype.element_ty), mask=ok)
        tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(rows[:, None] == 0, g, 0.0), axis=0)  # g at the chunk's first row
    if HAS_H0:
        la0 = tl.load(LA + row_base + cols, mask=col_ok, other=0.0).to(tl.float32)
        a0 = tl.exp(tl.minimum(tl.maximum(la0, LOG_A_MIN), LOG_A_MAX))
        tl.store(DH0 + state_offs, (a0 * carry).to(DH0.dtype.element_ty), mask=col_ok)


# ---- Decoupled look-back: every (row, column block, time chunk) tile is its own program. ----
#
# A program takes a ticket from a global counter (so every tile it may wait on was started
# before it), loads its tile, scans it, publishes the tile's aggregate transform
# h -> A h + B, then walks back over earlier chunks of the same columns: an aggregate is
# composed in, an inclusive prefix (the state after that chunk) ends the walk. It then
# publishes its own inclusive prefix and writes h. Extra traffic: 3 floats per column per
# chunk (about 3% at BLOCK_T = 64), against 3 x BLOCK_T elements of the tile itself.

AGGREGATE = tl.constexpr(1)
INCLUSIVE = tl.constexpr(2)


@triton.jit
def _tile_of(COUNTER, B, n_cblk, n_chunks, REVERSE: tl.constexpr):
    ticket = tl.atomic_add(COUNTER, 1)
    order = ticket // (B * n_cblk)
    rest = ticket % (B * n_cblk)
    chunk = n_chunks - 1 - order if REVERSE else order
    return rest // n_cblk, rest % n_cblk, chunk


@triton.jit
def _look_back(FLAG, AGG_A, AGG_B, INC, chunk, step, bb, cblk, cols, col_ok, B, C, n_cblk, BLOCK_C: tl.constexpr):
    """The state entering `chunk`: compose earlier chunks' aggregates until an inclusive prefix."""
    acc_a = tl.full([BLOCK_C], 1.0, tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    j = chunk - step
    status = 0
    while status != INCLUSIVE:
        flag = FLAG + (j * B + bb) * n_cblk + cblk
        status = tl.atomic_add(flag, 0, sem="acquire")
        while status == 0:
            status = tl.atomic_add(flag, 0, sem="acquire")
        offs = (j * B + bb).to(tl.int64) * C + cols
        is_inc = status == INCLUSIVE
        pa = tl.load(AGG_A + offs, mask=col_ok & (status == AGGREGATE), other=0.0, cache_modifier=".cg")
        pb = tl.where(
            is_inc,
            tl.load(INC + offs, mask=col_ok & is_inc, other=0.0, cache_modifier=".cg"),
            tl.load(AGG_B + offs, mask=col_ok & (status == AGGREGATE), other=0.0, cache_modifier=".cg"),
        )
        acc_a, acc_b = acc_a * pa, acc_a * pb + acc_b
        j -= step
    return acc_b


@triton.jit
def _publish(FLAG, OUT_A, OUT_B, a, b, chunk, bb, cblk, cols, col_ok, B, C, n_cblk, status: tl.constexpr):
    offs = (chunk * B + bb).to(tl.int64) * C + cols
    if status == AGGREGATE:
        tl.store(OUT_A + offs, a, mask=col_ok)
    tl.store(OUT_B + offs, b, mask=col_ok)
    tl.debug_barrier()  # every thread's stores happen before the flag (release is cumulative)
    tl.atomic_xchg(FLAG + (chunk * B + bb) * n_cblk + cblk, status, sem="release")


@triton.jit
def _scan_fwd_lb(
    LA,
    X,
    H0,
    H,
    HLAST,  # [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    COUNTER,
    FLAG,
    AGG_A,
    AGG_B,
    INC,  # scratch: [1] int32 zeroed, [chunks, B, C blocks] int32 zeroed, 3 x [chunks, B, C] fp32
    B,
    T,
    C,
    HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n_cblk = tl.cdiv(C, BLOCK_C)
    n_chunks = tl.cdiv(T, BLOCK_T)
    bb, cblk, chunk = _tile_of(COUNTER, B, n_cblk, n_chunks, False)
    cols = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rows = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < T)[:, None] & col_ok[None, :]
    offs = bb.to(tl.int64) * T * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
    # Rows past T load a = exp(0) = 1, b = 0: they copy the carry and change nothing.
    la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
    a_cum, b_cum = tl.associative_scan((a, x), 0, _compose)
    is_last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    if chunk == 0:
        if HAS_H0:
            carry = tl.load(H0 + bb.to(tl.int64) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        agg_a = tl.sum(tl.where(is_last, a_cum, 0.0), axis=0)
        agg_b = tl.sum(tl.where(is_last, b_cum, 0.0), axis=0)
        _publish(FLAG, AGG_A, AGG_B, agg_a, agg_b, chunk, bb, cblk, cols, col_ok, B, C, n_cblk, AGGREGATE)
        carry = _look_back(FLAG, AGG_A, AGG_B, INC, chunk, 1, bb, cblk, cols, col_ok, B, C, n_cblk, BLOCK_C)
    h = a_cum * carry[None, :] + b_cum
    h_end = tl.sum(tl.where(is_last, h, 0.0), axis=0)
    if chunk < n_chunks - 1:
        _publish(FLAG, INC, INC, h_end, h_end, chunk, bb, cblk, cols, col_ok, B, C, n_cblk, INCLUSIVE)
    else:
        tl.store(HLAST + bb.to(tl.int64) * C + cols, h_end.to(HLAST.dtype.element_ty), mask=col_ok)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)


@triton.jit
def _scan_bwd_lb(
    LA,
    H,
    H0,
    DH,
    DHLAST,  # inputs: [B, T, C], [B, T, C], [B, C], [B, T, C], [B, C]
    DLA,
    DX,
    DH0,  # outputs: [B, T, C], [B, T, C], [B, C]
    COUNTER,
    FLAG,
    AGG_A,
    AGG_B,
    INC,
    B,
    T,
    C,
    HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n_cblk = tl.cdiv(C, BLOCK_C)
    n_chunks = tl.cdiv(T, BLOCK_T)
    bb, cblk, chunk = _tile_of(COUNTER, B, n_cblk, n_chunks, True)
    cols = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rows = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    state_offs = bb.to(tl.int64) * C + cols
    la, la_next, dh, h_prev = _bwd_loads(LA, DH, H, bb.to(tl.int64) * T * C, rows, cols, col_ok, T, C)
    la, la_next, dh, h_prev = la.to(tl.float32), la_next.to(tl.float32), dh.to(tl.float32), h_prev.to(tl.float32)
    a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
    # alpha_t = a_{t+1} (1 past the end, where la_next loaded 0), so g_t = dh_t + alpha_t g_{t+1}.
    alpha = tl.exp(tl.minimum(tl.maximum(la_next, LOG_A_MIN), LOG_A_MAX))
    a_cum, b_cum = tl.associative_scan((alpha, dh), 0, _compose, reverse=True)
    is_first = (tl.arange(0, BLOCK_T) == 0)[:, None]
    if chunk == n_chunks - 1:
        carry = tl.load(DHLAST + state_offs, mask=col_ok, other=0.0).to(tl.float32)  # g_T seed
    else:
        agg_a = tl.sum(tl.where(is_first, a_cum, 0.0), axis=0)
        agg_b = tl.sum(tl.where(is_first, b_cum, 0.0), axis=0)
        _publish(FLAG, AGG_A, AGG_B, agg_a, agg_b, chunk, bb, cblk, cols, col_ok, B, C, n_cblk, AGGREGATE)
        carry = _look_back(FLAG, AGG_A, AGG_B, INC, chunk, -1, bb, cblk, cols, col_ok, B, C, n_cblk, BLOCK_C)
    g = a_cum * carry[None, :] + b_cum
    g_first = tl.sum(tl.where(is_first, g, 0.0), axis=0)
    if chunk > 0:
        _publish(FLAG, INC, INC, g_first, g_first, chunk, bb, cblk, cols, col_ok, B, C, n_cblk, INCLUSIVE)
    else:
        if HAS_H0:
            h0 = tl.load(H0 + state_offs, mask=col_ok, other=0.0).to(tl.float32)
            h_prev += tl.where(is_first, h0[None, :], 0.0)
            la0 = tl.load(LA + bb.to(tl.int64) * T * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            a0 = tl.exp(tl.minimum(tl.maximum(la0, LOG_A_MIN), LOG_A_MAX))
            tl.store(DH0 + state_offs, (a0 * g_first).to(DH0.dtype.element_ty), mask=col_ok)
    ok = (rows < T)[:, None] & col_ok[None, :]
    offs = bb.to(tl.int64) * T * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
    in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
    tl.store(DLA + offs, tl.where(in_range, g * a * h_prev, 0.0).to(DLA.dtype.element_ty), mask=ok)
    tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=ok)


_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w)
    for bt in (16, 32, 64)
    for bc in (32, 64, 128)
    for w in (1, 2, 4, 8)
    # Few warps per tile keep the scan along T inside a warp (no shared-memory round trip).
    if bt * bc <= 4096 and bt * bc // (32 * w) >= 4
]


_scan_fwd_tuned = triton.autotune(_CONFIGS, key=["C", "HAS_H0"])(_scan_fwd)
_scan_bwd_tuned = triton.autotune(_CONFIGS, key=["C", "HAS_H0"])(_scan_bwd)


def _launch(tuned, plain, grid_b: int, width: int, *args, **meta):
    """Autotuned on a GPU; a fixed tile under the interpreter or with autotuning off."""
    if knobs.interpret or not knobs.autotune:
        block_t, block_c, warps = (8, 16, 1) if knobs.interpret else (32, 64, 4)
        plain[(grid_b, triton.cdiv(width, block_c))](*args, **meta, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    else:
        tuned[lambda m: (grid_b, triton.cdiv(width, m["BLOCK_C"]))](*args, **meta)


def scan_fwd(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """Contiguous [B, T, C] inputs -> (h, h_last) in b's dtype."""
    bsz, steps, width = b.shape
    h = new_output(b)
    h_last = new_output(b, (bsz, width))
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
    )
    return h, h_last


def scan_bwd(
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dlog_a, db, dh0 or None)."""
    bsz, steps, width = h.shape
    dlog_a = new_output(log_a)
    db = new_output(h)
    dh0 = new_output(h0) if h0 is not None else None
    _launch(
        _scan_bwd_tuned,
        _scan_bwd,
        bsz,
        width,
        log_a,
        h,
        h0 if h0 is not None else h,
        dh,
        dh_last,
        dlog_a,
        db,
        dh0 if dh0 is not None else db,
        steps,
        width,
        HAS_H0=h0 is not None,
    )
    return dlog_a, db, dh0


def _scratch(x: Tensor, steps: int, width: int, min_t: int, min_c: int):
    import torch

    bsz = x.shape[0]
    chunks = triton.cdiv(steps, min_t)
    counter = torch.zeros(1, device=x.device, dtype=torch.int32)
    flags = torch.zeros(chunks * bsz * triton.cdiv(width, min_c), device=x.device, dtype=torch.int32)
    agg = torch.empty(3, chunks * bsz * width, device=x.device, dtype=torch.float32)
    return counter, flags, agg[0], agg[1], agg[2]


def scan_fwd_lb(log_a, b, h0, block_t, block_c, warps):
    bsz, steps, width = b.shape
    h = new_output(b)
    h_last = new_output(b, (bsz, width))
    grid = (bsz * triton.cdiv(width, block_c) * triton.cdiv(steps, block_t),)
    _scan_fwd_lb[grid](
        log_a,
        b,
        h0 if h0 is not None else b,
        h,
        h_last,
        *_scratch(b, steps, width, block_t, block_c),
        bsz,
        steps,
        width,
        HAS_H0=h0 is not None,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return h, h_last


def scan_bwd_lb(log_a, h, h0, dh, dh_last, block_t, block_c, warps):
    bsz, steps, width = h.shape
    dlog_a = new_output(log_a)
    db = new_output(h)
    dh0 = new_output(h0) if h0 is not None else None
    grid = (bsz * triton.cdiv(width, block_c) * triton.cdiv(steps, block_t),)
    _scan_bwd_lb[grid](
        log_a,
        h,
        h0 if h0 is not None else h,
        dh,
        dh_last,
        dlog_a,
        db,
        dh0 if dh0 is not None else db,
        *_scratch(h, steps, width, block_t, block_c),
        bsz,
        steps,
        width,
        HAS_H0=h0 is not None,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return dlog_a, db, dh0
