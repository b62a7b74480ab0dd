"""Triton decode step of the memory write (SPEC §4, one token per row), in place.

The functional `memory_write` builds new rings every call: for one token that is dozens of small
kernels and a copy of every ring. Decoding needs far less. A token adds its key and value to
the running sum of the incomplete slot of every level; only when it is that slot's last token
(pos + 1 a multiple of the level's span) does the slot complete: its mean enters the ring as
the newest entry and the oldest falls out. So `_write_step` runs one program per (batch row,
memory head) and, per level:

- always: sum += k (fp32), written back in place;
- on completion (1 token in S_l): shift the ring one entry towards the front, in place, in
  [BLOCK_S, Dh] tiles from front to back (each tile is read before the barrier and written
  after it, and a tile only writes entries the program has already read), then store the mean
  at the back and zero the sum.

The amortised cost is the sums (a few hundred bytes per row) plus, once every S_0 tokens, one
pass over the level-0 ring. The caller advances `pos` after the launch (every program reads it).
Results equal `reference.memory_write` with T = 1 bit for bit: the same fp32 sum, the same
division, the same cast.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .decode import MAX_LEVELS


@triton.jit
def _write_level(
    KEYS,
    VALUES,
    SUM_K,
    SUM_V,
    k,  # [BLOCK_D] fp32: this token's key for this (row, memory head)
    v,
    pos,  # tokens seen before this one
    row,  # b * K + head (int64)
    RING: tl.constexpr,
    SPAN: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    sum_offs = row * DH + d
    sk = tl.load(SUM_K + sum_offs, mask=d_ok, other=0.0) + k
    sv = tl.load(SUM_V + sum_offs, mask=d_ok, other=0.0) + v
    if (pos + 1) % SPAN == 0:  # this token completes the level's slot
        base = row * RING * DH
        for s0 in range(0, RING - 1, BLOCK_S):
            i = s0 + tl.arange(0, BLOCK_S)
            mask = (i < RING - 1)[:, None] & d_ok[None, :]
            offs = base + i[:, None] * DH + d[None, :]
            kt = tl.load(KEYS + offs + DH, mask=mask)
            vt = tl.load(VALUES + offs + DH, mask=mask)
            tl.debug_barrier()  # every thread has read entries i + 1 before any writes entries i
            tl.store(KEYS + offs, kt, mask=mask)
            tl.store(VALUES + offs, vt, mask=mask)
        tl.debug_barrier()
        last = base + (RING - 1) * DH + d
        tl.store(KEYS + last, (sk / SPAN).to(KEYS.dtype.element_ty), mask=d_ok)
        tl.store(VALUES + last, (sv / SPAN).to(VALUES.dtype.element_ty), mask=d_ok)
        sk = tl.zeros([BLOCK_D], dtype=tl.float32)
        sv = tl.zeros([BLOCK_D], dtype=tl.float32)
    tl.store(SUM_K + sum_offs, sk, mask=d_ok)
    tl.store(SUM_V + sum_offs, sv, mask=d_ok)


@triton.jit
def _write_step(
    KIN,
    VIN,  # [B, 1, K*Dh]: the token's keys and values
    POS,  # [B] int64, read only
    K0, V0, SK0, SV0,
    K1, V1, SK1, SV1,
    K2, V2, SK2, SV2,
    K3, V3, SK3, SV3,  # per level: ring keys/values [B, K, M_l, Dh], sums [B, K, Dh] fp32
    KV_HEADS: tl.constexpr,
    LEVELS: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,  # ring sizes
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,  # spans
    DH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # b * K + head
    b = row // KV_HEADS
    d = tl.arange(0, BLOCK_D)
    pos = tl.load(POS + b)
    k = tl.load(KIN + row * DH + d, mask=d < DH, other=0.0).to(tl.float32)
    v = tl.load(VIN + row * DH + d, mask=d < DH, other=0.0).to(tl.float32)
    _write_level(K0, V0, SK0, SV0, k, v, pos, row, M0, S0, DH, BLOCK_S, BLOCK_D)
    if LEVELS > 1:
        _write_level(K1, V1, SK1, SV1, k, v, pos, row, M1, S1, DH, BLOCK_S, BLOCK_D)
    if LEVELS > 2:
        _write_level(K2, V2, SK2, SV2, k, v, pos, row, M2, S2, DH, BLOCK_S, BLOCK_D)
    if LEVELS > 3:
        _write_level(K3, V3, SK3, SV3, k, v, pos, row, M3, S3, DH, BLOCK_S, BLOCK_D)


def write_step(
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    sum_k: list[Tensor],
    sum_v: list[Tensor],
    spans: list[int],
) -> None:
    """One token per row (k, v [B, 1, K*Dh] contiguous) into the rings and sums, in place.
    `pos` is read, not advanced."""
    levels = len(keys)
    assert 1 <= levels <= MAX_LEVELS, levels
    bsz, kv_heads, _, dim = keys[0].shape
    pad = MAX_LEVELS - levels
    per_level = [t for group in zip(keys, values, sum_k, sum_v, strict=True) for t in group]
    per_level += [keys[0], values[0], sum_k[0], sum_v[0]] * pad  # unused slots: any valid pointer
    rings = [t.shape[2] for t in keys] + [1] * pad
    spans = list(spans) + [1] * pad
    _write_step[(bsz * kv_heads,)](
        k,
        v,
        pos,
        *per_level,
        KV_HEADS=kv_heads,
        LEVELS=levels,
        M0=rings[0],
        M1=rings[1],
        M2=rings[2],
        M3=rings[3],
        S0=spans[0],
        S1=spans[1],
        S2=spans[2],
        S3=spans[3],
        DH=dim,
        BLOCK_S=32,
        BLOCK_D=triton.next_power_of_2(dim),
        num_warps=2,
    )
