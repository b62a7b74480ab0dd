"""Triton kernels for the linear scan (SPEC §1), forward and backward, on the [B, T, C] layout.

Forward: one program owns a tile of BLOCK_C channels of one batch row and walks time in chunks
of BLOCK_T rows: it loads a [BLOCK_T, BLOCK_C] tile of log_a and b (contiguous along C, so
coalesced), scans it with `tl.associative_scan`, applies the carry from the previous chunk,
stores h, and carries the chunk's last row on. The loads are plain loads inside a
`tl.range(num_stages=STAGES)` loop, so Triton's software pipeliner keeps several chunks in
flight through shared memory (small tiles, 16 x 32 on one warp).

Backward: the reverse walk one row at a time, 4 bytes of a row per thread, so the recurrence
is one FMA per element in registers instead of a cross-lane scan (`_scan_bwd` says why).

Every input element is read once and every output written once: the forward moves
3 x B*T*C elements, the backward 5 (it reads log_a, h, dh; writes dlog_a, db).
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
        a = tl.exp(tl.minimum(tl.maximum(la, LOG_A_MIN), LOG_A_MAX))
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
