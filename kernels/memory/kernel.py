"""Triton kernels for the hierarchical-memory query (SPEC §4): one online-softmax pass per
(batch row, query head, tile of tokens) over every candidate slot of every level.

Visibility is computed from indices inside the kernel (the slot's global index and level, the
token's absolute position), never loaded as a mask. The level bias beta[head, level] is added
to the logits. The forward also writes each row's log-sum-exp for the backward, which
recomputes the probabilities (FlashAttention-2 style) and accumulates the gradients of the
slot keys/values and of beta with atomic adds (several token tiles and the query heads of a
group read the same slots).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output


@triton.jit
def _tile_logits(
    q,
    KEYS,
    SLOT,
    LEVEL,
    SPAN,
    RING,
    BETA,
    kv_base,
    slot_base,
    s,
    a,
    head,
    n_slots,
    n_levels,
    DH,
    scale,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits [BLOCK_T, BLOCK_S] of one slot tile, -inf where a slot is not visible, and the
    slot tile's keys [BLOCK_S, BLOCK_D] and levels."""
    cols = tl.arange(0, BLOCK_D)
    s_ok = s < n_slots
    kt = tl.load(
        KEYS + kv_base + s.to(tl.int64)[:, None] * DH + cols[None, :],
        mask=s_ok[:, None] & (cols < DH)[None, :],
        other=0.0,
    ).to(tl.float32)
    g = tl.load(SLOT + slot_base + s, mask=s_ok, other=-1)
    level = tl.load(LEVEL + s, mask=s_ok, other=0)
    span = tl.load(SPAN + s, mask=s_ok, other=1)
    ring = tl.load(RING + s, mask=s_ok, other=0)
    bias = tl.load(BETA + head * n_levels + level, mask=s_ok, other=0.0).to(tl.float32)
    logits = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale + bias[None, :]
    now = a[:, None] // span[None, :]
    seen = s_ok[None, :] & (g[None, :] >= 0) & (g[None, :] >= now - ring[None, :]) & (g[None, :] < now)
    return tl.where(seen, logits, float("-inf")), kt, level, s_ok


@triton.jit
def _program_rows(POS, T, n_slots, HEADS, GROUP, DH, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program (batch row, query head, token tile) addresses: its tokens, their absolute
    positions, the offsets of its q/out rows, and the base offsets of its memory head's slots."""
    pid_bh = tl.program_id(1)
    b, head = pid_bh // HEADS, pid_bh % HEADS
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    t_ok = t < T
    row_ok = t_ok[:, None] & (cols < DH)[None, :]
    q_offs = (b * T + t).to(tl.int64)[:, None] * (HEADS * DH) + head * DH + cols[None, :]
    a = tl.load(POS + b) + t  # absolute positions [BLOCK_T]
    kv_base = (b * (n_slots * HEADS // GROUP) + (head // GROUP) * n_slots).to(tl.int64) * DH
    return b, head, t, t_ok, row_ok, q_offs, a, kv_base, b.to(tl.int64) * n_slots


@triton.jit
def _attend_fwd(
    Q,
    KEYS,
    VALUES,
    SLOT,
    LEVEL,
    SPAN,
    RING,
    BETA,
    POS,
    OUT,
    LSE,
    T,
    n_slots,
    n_levels,
    HEADS,
    GROUP,
    DH,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, head, t, t_ok, row_ok, q_offs, a, kv_base, slot_base = _program_rows(
        POS, T, n_slots, HEADS, GROUP, DH, BLOCK_T, BLOCK_D
    )
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q_offs, mask=row_ok, other=0.0).to(tl.float32)

    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        logits, _, _, s_ok = _tile_logits(
            q,
            KEYS,
            SLOT,
            LEVEL,
            SPAN,
            RING,
            BETA,
            kv_base,
            slot_base,
            s,
            a,
            head,
            n_slots,
            n_levels,
            DH,
            scale,
            BLOCK_D,
            PRECISION,
        )
        vt = tl.load(
            VALUES + kv_base + s.to(tl.int64)[:, None] * DH + cols[None, :],
            mask=s_ok[:, None] & (cols < DH)[None, :],
            other=0.0,
        ).to(tl.float32)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # While nothing is visible m stays -inf; shift by 0 so no inf - inf appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(logits - shift[:, None])
        alpha = tl.exp(m - shift)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OUT + q_offs, out.to(OUT.dtype.element_ty), mask=row_ok)
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(LSE + (b * HEADS + head).to(tl.int64) * T + t, lse, mask=t_ok)


@triton.jit
def _attend_bwd(
    Q,
    KEYS,
    VALUES,
    SLOT,
    LEVEL,
    SPAN,
    RING,
    BETA,
    POS,
    OUT,
    LSE,
    DOUT,
    DQ,
    DKEYS,
    DVALUES,
    DBETA,  # DKEYS/DVALUES [B, K, S, Dh] and DBETA [H, L] fp32, zeroed
    T,
    n_slots,
    n_levels,
    HEADS,
    GROUP,
    DH,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, head, t, t_ok, row_ok, q_offs, a, kv_base, slot_base = _program_rows(
        POS, T, n_slots, HEADS, GROUP, DH, BLOCK_T, BLOCK_D
    )
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q_offs, mask=row_ok, other=0.0).to(tl.float32)
    o = tl.load(OUT + q_offs, mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DOUT + q_offs, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + (b * HEADS + head).to(tl.int64) * T + t, mask=t_ok, other=float("-inf"))
    lse_shift = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.sum(do * o, axis=1)  # [BLOCK_T]

    dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        logits, kt, level, s_ok = _tile_logits(
            q,
            KEYS,
            SLOT,
            LEVEL,
            SPAN,
            RING,
            BETA,
            kv_base,
            slot_base,
            s,
            a,
            head,
            n_slots,
            n_levels,
            DH,
            scale,
            BLOCK_D,
            PRECISION,
        )
        slot_offs = kv_base + s.to(tl.int64)[:, None] * DH + cols[None, :]
        slot_ok = s_ok[:, None] & (cols < DH)[None, :]
        vt = tl.load(VALUES + slot_offs, mask=slot_ok, other=0.0).to(tl.float32)
        p = tl.exp(logits - lse_shift[:, None])  # [BLOCK_T, BLOCK_S], 0 where not visible
        tl.atomic_add(DVALUES + slot_offs, tl.dot(tl.trans(p), do, input_precision=PRECISION), mask=slot_ok)
        ds = p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])  # d logits
        dq += tl.dot(ds, kt, input_precision=PRECISION) * scale
        tl.atomic_add(DKEYS + slot_offs, tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale, mask=slot_ok)
        tl.atomic_add(DBETA + head * n_levels + level, tl.sum(ds, axis=0), mask=s_ok)
    tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=row_ok)


def _blocks(dim: int, dtype: torch.dtype) -> dict:
    # tl.dot needs every tile side >= 16. fp32 inputs get exact fp32 products, not tf32.
    return {
        "BLOCK_T": 16 if knobs.interpret else 32,
        "BLOCK_S": 16 if knobs.interpret else 64,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32",
    }


def attend_fwd(q, keys, values, slot, level, span, ring, beta, pos, heads: int) -> tuple[Tensor, Tensor]:
    bsz, steps, _ = q.shape
    kv_heads, n_slots, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    out = new_output(q)
    lse = new_output(q, (bsz, heads, steps), torch.float32)
    blocks = _blocks(dim, q.dtype)
    grid = (triton.cdiv(steps, blocks["BLOCK_T"]), bsz * heads)
    _attend_fwd[grid](
        q,
        keys,
        values,
        slot,
        level,
        span,
        ring,
        beta,
        pos,
        out,
        lse,
        steps,
        n_slots,
        beta.shape[1],
        heads,
        heads // kv_heads,
        dim,
        1.0 / math.sqrt(dim),
        **blocks,
    )
    return out, lse


def attend_bwd(q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout, heads: int):
    bsz, steps, _ = q.shape
    kv_heads, n_slots, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    dq = new_output(q)
    dkeys = torch.zeros(keys.shape, device=q.device, dtype=torch.float32)
    dvalues = torch.zeros(values.shape, device=q.device, dtype=torch.float32)
    dbeta = torch.zeros(beta.shape, device=q.device, dtype=torch.float32)
    blocks = _blocks(dim, q.dtype)
    grid = (triton.cdiv(steps, blocks["BLOCK_T"]), bsz * heads)
    _attend_bwd[grid](
        q,
        keys,
        values,
        slot,
        level,
        span,
        ring,
        beta,
        pos,
        out,
        lse,
        dout.contiguous(),
        dq,
        dkeys,
        dvalues,
        dbeta,
        steps,
        n_slots,
        beta.shape[1],
        heads,
        heads // kv_heads,
        dim,
        1.0 / math.sqrt(dim),
        **blocks,
    )
    return dq, dkeys.to(keys.dtype), dvalues.to(values.dtype), dbeta.to(beta.dtype)
