"""Triton kernels for the linear scan (SPEC §1), forward and backward, on the [B, T, C] layout.

One program owns a tile of BLOCK_C channels of one batch row and walks time in chunks of
BLOCK_T rows: it loads a [BLOCK_T, BLOCK_C] tile of log_a and b (contiguous along C, so
coalesced), scans it with `tl.associative_scan`, applies the carry from the previous chunk,
stores h, and carries the chunk's last row on. The loads are plain loads inside a
`tl.range(num_stages=STAGES)` loop, so Triton's software pipeliner keeps several chunks in
flight through shared memory: with small tiles (16 x 32, one warp) that, not the scan, is what
gets close to the bandwidth floor (docs/kernels.md). Every input element is read once and every
output written once: the forward moves 3 x B*T*C elements, the backward 5 (it reads log_a,
h, dh; writes dlog_a, db), each with one load per element (`_scan_bwd` says how).
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
        a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
        a_cum, b_cum = tl.associative_scan((a, x), 0, _compose)
        h = a_cum * carry[None, :] + b_cum
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
    tl.store(HLAST + pid_b.to(tl.int64) * C + cols, carry.to(HLAST.dtype.element_ty), mask=col_ok)


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
    HAS_DHLAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,  # chunks in flight (the loop's software-pipeline depth)
):
    """The adjoint g_t = dh_t + a_{t+1} g_{t+1} needs a_{t+1} at row t: a shifted second read
    of log_a. Scanning v_t = a_t g_t instead (v_t = a_t dh_t + a_t v_{t+1}) needs a_t only, and
    gives dlog_a_t = v_t h_{t-1}, db_t = g_t = v_t / a_t, dh0 = v_0. So each chunk reads log_a,
    dh and h (shifted one row back, since only h_{t-1} is used) once: 3 loads, 2 stores.
    a_t >= exp(-50) (the clamp), so the division is exact to rounding unless a_t dh_t would
    underflow fp32 (|dh_t| < 1e-16 where a_t = exp(-50)), where g_t loses a negligible term."""
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
    if HAS_DHLAST:  # v_T = a_T g_T with a_T = 1 past the end
        carry = tl.load(DHLAST + state_offs, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Chunks run from the end, loads pipelined as in the forward.
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in tl.range(0, n_chunks, num_stages=STAGES):
        t = (n_chunks - 1 - c) * BLOCK_T + rows
        ok = (t < T)[:, None] & col_ok[None, :]
        offs = row_base + t.to(tl.int64)[:, None] * C + cols[None, :]
        la = tl.load(LA + offs, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
        h_prev = tl.load(H + offs - C, mask=ok & (t >= 1)[:, None], other=0.0).to(tl.float32)
        la_c = tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX)
        a = tl.exp(la_c)
        # Rows past T: a = 1, dh = 0, so v passes the carry through unchanged.
        a_cum, b_cum = tl.associative_scan((a, a * dh), 0, _compose, reverse=True)
        v = a_cum * carry[None, :] + b_cum
        h_prev += tl.where((t == 0)[:, None], h0[None, :], 0.0)
        in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
        tl.store(DLA + offs, tl.where(in_range, v * h_prev, 0.0).to(DLA.dtype.element_ty), mask=ok)
        tl.store(DX + offs, (v * tl.exp(-la_c)).to(DX.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(rows[:, None] == 0, v, 0.0), axis=0)  # v at the chunk's first row
    if HAS_H0:
        tl.store(DH0 + state_offs, carry.to(DH0.dtype.element_ty), mask=col_ok)


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
_scan_bwd_tuned = triton.autotune(
    _configs([(16, 32, 1, 3), (64, 32, 2, 3), (32, 32, 2, 4)]), key=["C", "HAS_H0", "HAS_DHLAST"]
)(_scan_bwd)


def _launch(tuned, plain, grid_b: int, width: int, *args, tile=(16, 32, 1, 4), **meta):
    """Autotuned on a GPU; a fixed tile (`tile`) under the interpreter or with autotuning off."""
    if knobs.interpret or not knobs.autotune:
        block_t, block_c, warps, stages = (8, 16, 1, 1) if knobs.interpret else tile
        grid = (grid_b, triton.cdiv(width, block_c))
        plain[grid](*args, **meta, BLOCK_T=block_t, BLOCK_C=block_c, STAGES=stages, num_warps=warps)
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
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dlog_a, db, dh0 or None). dh_last None means zero (h_last unused)."""
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
        dh_last if dh_last is not None else dh,
        dlog_a,
        db,
        dh0 if dh0 is not None else db,
        steps,
        width,
        HAS_H0=h0 is not None,
        HAS_DHLAST=dh_last is not None,
        tile=(64, 32, 2, 3),
    )
    return dlog_a, db, dh0
