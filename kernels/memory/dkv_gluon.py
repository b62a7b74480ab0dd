"""The split backward's dk/dv kernel in Gluon (Triton's explicit-layout dialect), for Hopper.

It computes what `kernel._attend_bwd_dkv` computes with DQ == 0 (docs/kernels.md): per slot tile
of one memory head, over the token tiles that see any of its slots and every query head of the
group, p^T = exp2(k q^T * scale log2 e + bias - lse) with the banded visibility mask, then
dv += p^T dout and dk += ds^T q. What Triton's own language does not let us write is the order of
the tensor-core products: Triton 3.6 waits for each product right after issuing it (a
`warp_group_dot_wait {pendings = 0}` after the logits and after dp), so a tile's chain runs
product, softmax, product, product with nothing in flight. Here a tile issues its logits and its
dp products together and waits for the logits only (`warpgroup_mma_wait(1)`), so dp runs under the
softmax; dv then stays in flight under ds, and dv and dk under the next tile's logits. q and dout
tiles come by TMA into a ring of STAGES buffers, refilled once a tile's products are done.

The slot tiles' keys and values are loaded once (masked: slots past the level's count or below the
stream's floor read as 0, as in the Triton kernel) and kept in shared memory. Token tiles inside
[all_lo, all_hi), where every token sees every slot, skip the mask (`SKIP`).

Two things ptxas needs before it keeps the products in flight (else it serializes every wgmma and
says so with `ptxas -v`, C7514/C7515): no register cap it cannot meet, and no token vector built
inside the loop from the loop index (`t0 + arange` there made it serialize): the token offsets are
loop-invariant tensors (`cols`, the stats pointers) plus scalars.

Hopper only (wgmma), bf16/fp16, Dh 32/64, T a multiple of the token tile (so a TMA tile never
reads past its batch row), 16-byte aligned q and dout: `supports` and `usable` say; anything else
takes the Triton kernel, which is also what the interpreter tests (Gluon has no interpreter), so
the GPU tests compare the two elementwise and CPU CI compiles this one for sm_90
(tests/kernels/test_gluon_memory.py). Measured in BENCHMARKS.md (session 26).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import knobs

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernel serves
    gluon = None

LOG2E = 1.4426950408889634
# (BLOCK_T, BLOCK_S, num_warps, STAGES, maxnreg): the best of scratch/gsweep.py on the H200
# (BENCHMARKS.md, session 26: 2-4 stages within 2.5%). No register cap: at 168 (three programs an
# SM) ptxas serializes the products (C7512), which undoes the point of the kernel.
TILES = (64, 64, 4, 2, None)
# Head dims taken. 128 compiles with 136 bytes of spills and is not measured: the Triton kernel.
DIMS = (32, 64)

if gluon is not None:
    # TMA loads and the CTA barrier are spelled differently across Triton 3.6-3.9 (the probes in
    # benchmarks/ use these too).
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    _LOG2E = gl.constexpr(LOG2E)

    @gluon.jit
    def _load_tile(q_desc, do_desc, q_smem, do_smem, bar, k, n_t, b, kvh, T, t_lo, GROUP, pred,
                   DH: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Step k of the walk (query head k // n_t of the group, token tile k % n_t) into stage k % STAGES."""
        g = k // n_t
        row = b * T + t_lo + (k - g * n_t) * BLOCK_T
        col = (kvh * GROUP + g) * DH
        stage = k % STAGES
        mbarrier.expect(bar.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=pred)
        tma_load(q_desc, [row, col], bar.index(stage), q_smem.index(stage), pred=pred)
        tma_load(do_desc, [row, col], bar.index(stage), do_smem.index(stage), pred=pred)

    @gluon.jit
    def _step(q_desc, do_desc, kt_smem, vt_smem, q_smem, do_smem, bar, zero, dk, dv, k, j, n_div, total, b, kvh,
              T, t_lo, GROUP, stat_ptrs, n_stats, cols, bias2, seen_lo, seen_hi, qk_scale, scale,
              MASK: gl.constexpr, DH: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
              FOLD: gl.constexpr, a_op: gl.constexpr):  # fmt: skip
        """Step k of the walk, token tile j of its query head, into dk and dv (masked where MASK)."""
        st = k % STAGES
        mbarrier.wait(bar.index(st), (k // STAGES) & 1)
        s_t = warpgroup_mma(kt_smem, q_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(vt_smem, do_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
        delta = gl.load(stat_ptrs + j * BLOCK_T)
        lse2 = gl.load(stat_ptrs + (n_stats + j * BLOCK_T))
        # In flight: the last step's dv and dk, then s_t and dp_t; all but dp_t done after this,
        # so the last step's stage is free for the step STAGES - 1 on.
        s_t = warpgroup_mma_wait(1, deps=(s_t,))
        _load_tile(q_desc, do_desc, q_smem, do_smem, bar, k - 1 + STAGES, n_div, b, kvh, T, t_lo, GROUP,
                   (k >= 1) & (k - 1 + STAGES < total), DH, BLOCK_T, STAGES)  # fmt: skip
        p_t = gl.exp2(s_t * qk_scale + gl.expand_dims(bias2 - lse2, 0))
        if MASK:
            t0 = t_lo + j * BLOCK_T
            cols2 = gl.expand_dims(cols, 0)
            seen = (cols2 >= gl.expand_dims(seen_lo - t0, 1)) & (cols2 < gl.expand_dims(seen_hi - t0, 1))
            p_t = gl.where(seen, p_t, 0.0)
        dv = warpgroup_mma(gl.convert_layout(p_t.to(q_desc.dtype), a_op), do_smem.index(st), dv, is_async=True)
        dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dv stays in flight
        if FOLD:  # noqa: SIM108 (a constexpr branch)
            ds_t = p_t * (dp_t * scale - gl.expand_dims(delta, 0))
        else:
            ds_t = p_t * (dp_t - gl.expand_dims(delta, 0))
        dk = warpgroup_mma(gl.convert_layout(ds_t.to(q_desc.dtype), a_op), q_smem.index(st), dk, is_async=True)
        return dk, dv

    @gluon.jit
    def _dkv(
        q_desc,
        do_desc,  # [B*T, H*Dh] in blocks of [BLOCK_T, DH]
        KEYS,
        VALUES,  # [B, K, S, Dh]
        BETA,
        POS,
        START,
        RING,
        SPAN,
        TILE_LEVEL,
        TILE_I0,
        STATS,  # [2, B, H, T] fp32: delta (scaled where FOLD), the base-2 lse
        DKEYS,
        DVALUES,
        T,
        n_slots,
        n_levels,
        HEADS,
        GROUP,
        qk_scale,
        scale,
        DH: gl.constexpr,
        BLOCK_T: gl.constexpr,
        BLOCK_S: gl.constexpr,
        STAGES: gl.constexpr,
        FOLD: gl.constexpr,  # ds carries the scale 1 / sqrt(Dh) (not fp16: kernel._fold_scale)
        SKIP: gl.constexpr,  # token tiles every token of which sees every slot skip the mask (a loop of their own)
        KV_SMEM: gl.constexpr,  # the NVMMA shared layout of a [BLOCK_S, DH] tile
        num_warps: gl.constexpr,
    ):
        mma_t: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_T, 16]
        )
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, DH, 16]
        )
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_d, k_width=2)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (DH // 8), DH // 8], [num_warps, 1], [1, 0])
        tile = gl.program_id(0)
        pid_bk = gl.program_id(1)
        kv_heads = HEADS // GROUP
        b = pid_bk // kv_heads
        kvh = pid_bk % kv_heads
        lvl = gl.load(TILE_LEVEL + tile)
        i0 = gl.load(TILE_I0 + tile)
        start = gl.load(START + lvl)
        count = gl.load(START + lvl + 1) - start
        ring = gl.load(RING + lvl)
        span64 = gl.load(SPAN + lvl)
        pos = gl.load(POS + b)
        n_before = pos // span64
        r = (pos - n_before * span64).to(gl.int32)
        span = span64.to(gl.int32)
        floor = ring - gl.minimum(n_before, ring).to(gl.int32)

        # The slot tile's keys and values, 0 past the level's count and below the floor.
        li = i0 + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, ld))
        lc = gl.arange(0, DH, layout=gl.SliceLayout(0, ld))
        kv_base = (b * kv_heads + kvh).to(gl.int64) * n_slots * DH
        kv_offs = kv_base + gl.expand_dims((start + li).to(gl.int64) * DH, 1) + gl.expand_dims(lc, 0)
        kv_ok = gl.expand_dims((li < count) & (li >= floor), 1) & gl.expand_dims(lc < DH, 0)
        kt_smem = gl.allocate_shared_memory(
            KEYS.dtype.element_ty, [BLOCK_S, DH], KV_SMEM, gl.load(KEYS + kv_offs, mask=kv_ok, other=0.0)
        )
        vt_smem = gl.allocate_shared_memory(
            VALUES.dtype.element_ty, [BLOCK_S, DH], KV_SMEM, gl.load(VALUES + kv_offs, mask=kv_ok, other=0.0)
        )

        # Token t sees local index i iff (i - M + 1) S - r <= t < (i + 1) S - r and i >= floor
        # (kernel._attend_bwd_dkv); the tiles walked are those that see any slot of the tile.
        i = i0 + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, mma_t))
        seen_lo = gl.where(i >= floor, (i - ring + 1).to(gl.int64) * span - r, T)
        seen_hi = (i + 1).to(gl.int64) * span - r
        seen_lo = gl.minimum(gl.maximum(seen_lo, 0), T).to(gl.int32)
        seen_hi = gl.minimum(gl.maximum(seen_hi, 0), T).to(gl.int32)
        t_lo = (gl.maximum((i0 - ring + 1).to(gl.int64) * span - r, 0) // BLOCK_T * BLOCK_T).to(gl.int32)
        t_hi = gl.minimum((i0 + BLOCK_S).to(gl.int64) * span - r, T).to(gl.int32)
        all_lo = gl.max(seen_lo, axis=0)
        all_hi = gl.min(seen_hi, axis=0)
        n_t = gl.maximum((t_hi - t_lo + BLOCK_T - 1) // BLOCK_T, 0)
        total = GROUP * n_t
        n_div = gl.maximum(n_t, 1)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)  # noqa: RUF005 (no * in @jit)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)  # noqa: RUF005
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bar.index(s), count=1)
        for s in gl.static_range(STAGES):
            _load_tile(q_desc, do_desc, q_smem, do_smem, bar, s, n_div, b, kvh, T, t_lo, GROUP, s < total,
                       DH, BLOCK_T, STAGES)  # fmt: skip
        fence_async_shared()  # the keys and values, stored by every thread, before the products read them
        cta_barrier()

        zero = gl.zeros([BLOCK_S, BLOCK_T], gl.float32, mma_t)
        dk = warpgroup_mma_init(gl.zeros([BLOCK_S, DH], gl.float32, mma_d))
        dv = warpgroup_mma_init(gl.zeros([BLOCK_S, DH], gl.float32, mma_d))
        n_stats = (gl.num_programs(1) // kv_heads).to(gl.int64) * HEADS * T  # B * H * T
        cols_t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma_t))
        stat_base = STATS + ((b * HEADS + kvh * GROUP).to(gl.int64) * T + t_lo) + cols_t
        # Token tiles [a, c) of the walk see every slot of the tile: no mask there.
        a = gl.minimum(gl.maximum((all_lo - t_lo + BLOCK_T - 1) // BLOCK_T, 0), n_t)
        c = gl.minimum(gl.maximum((all_hi - t_lo) // BLOCK_T, a), n_t)
        for g in range(GROUP):
            head = kvh * GROUP + g
            bias2 = gl.load(BETA + head * n_levels + lvl).to(gl.float32) * _LOG2E
            stat_ptrs = stat_base + g * T
            for j in range(0, a):
                dk, dv = _step(q_desc, do_desc, kt_smem, vt_smem, q_smem, do_smem, bar, zero, dk, dv,
                               g * n_t + j, j, n_div, total, b, kvh, T, t_lo, GROUP, stat_ptrs, n_stats, cols_t,
                               bias2, seen_lo, seen_hi, qk_scale, scale,
                               True, DH, BLOCK_T, STAGES, FOLD, a_op)  # fmt: skip
            for j in range(a, c):
                dk, dv = _step(q_desc, do_desc, kt_smem, vt_smem, q_smem, do_smem, bar, zero, dk, dv,
                               g * n_t + j, j, n_div, total, b, kvh, T, t_lo, GROUP, stat_ptrs, n_stats, cols_t,
                               bias2, seen_lo, seen_hi, qk_scale, scale,
                               not SKIP, DH, BLOCK_T, STAGES, FOLD, a_op)  # fmt: skip
            for j in range(c, n_t):
                dk, dv = _step(q_desc, do_desc, kt_smem, vt_smem, q_smem, do_smem, bar, zero, dk, dv,
                               g * n_t + j, j, n_div, total, b, kvh, T, t_lo, GROUP, stat_ptrs, n_stats, cols_t,
                               bias2, seen_lo, seen_hi, qk_scale, scale,
                               True, DH, BLOCK_T, STAGES, FOLD, a_op)  # fmt: skip
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(s))
        if not FOLD:
            dk = dk * scale
        oi = i0 + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, mma_d))
        oc = gl.arange(0, DH, layout=gl.SliceLayout(0, mma_d))
        out_offs = kv_base + gl.expand_dims((start + oi).to(gl.int64) * DH, 1) + gl.expand_dims(oc, 0)
        out_ok = gl.expand_dims(oi < count, 1) & gl.expand_dims(oc < DH, 0)
        gl.store(DKEYS + out_offs, dk.to(DKEYS.dtype.element_ty), mask=out_ok)
        gl.store(DVALUES + out_offs, dv.to(DVALUES.dtype.element_ty), mask=out_ok)


def supports(q: Tensor, dim: int) -> bool:
    """Whether this kernel can take the split backward's dk/dv for queries like `q` (see the
    module's docstring); `usable` adds the checks on the tensors themselves."""
    if gluon is None or not knobs.memory_gluon or knobs.interpret:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or dim not in DIMS:
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9 and q.shape[1] % TILES[0] == 0


def usable(q: Tensor, dout: Tensor, dim: int) -> bool:
    """`supports`, for these CUDA tensors: contiguous, 16-byte aligned (TMA's rule for q and dout)."""
    return q.is_cuda and supports(q, dim) and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, dout))


def launch(grid, q, dout, keys, values, beta, pos, lv, tile_level, tile_i0, stats, dkeys, dvalues, heads: int,
           qk_scale: float, scale: float, fold: bool, skip: bool = True) -> None:  # fmt: skip
    """kernel._attend_bwd_dkv's DQ == 0 work, for the arguments `usable` accepted; `grid` counts
    the slot tiles of TILES[1] slots."""
    block_t, block_s, warps, stages, maxnreg = TILES
    bsz, steps, width = q.shape
    dim = keys.shape[-1]
    elem = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    tok_layout = gl.NVMMASharedLayout.get_default_for([block_t, dim], elem)
    q2, do2 = q.view(bsz * steps, width), dout.view(bsz * steps, width)
    q_desc, do_desc = (
        TensorDescriptor(x, list(x.shape), list(x.stride()), [block_t, dim], tok_layout) for x in (q2, do2)
    )
    _dkv[grid](
        q_desc, do_desc, keys, values, beta, pos, lv.start, lv.ring, lv.span, tile_level, tile_i0, stats,
        dkeys, dvalues, steps, keys.shape[2], len(lv.counts), heads, heads // keys.shape[1], qk_scale, scale,
        DH=dim, BLOCK_T=block_t, BLOCK_S=block_s, STAGES=stages, FOLD=fold, SKIP=skip,
        KV_SMEM=gl.NVMMASharedLayout.get_default_for([block_s, dim], elem), num_warps=warps,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
