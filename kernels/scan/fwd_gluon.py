"""The linear scan's forward in Gluon (Triton's explicit-layout dialect): persistent programs that
stream chunks by TMA, for Hopper.

The chain is `kernel._scan_fwd_words`'s: time is cut into chunks of R rows, the chunks of one
column (a batch row and BC channels) hand their last row on to the next through the same two-slot
ring of tagged 64-bit words, and a ticket counter orders the chunks so that a waiting chunk's
predecessor has always been taken by a running program. What changes is how a chunk reaches the
registers. There a program per chunk loads its whole chunk into registers (168 of them at 64
rows), so each SM holds a few chunks and its loads start only when a program does. Here a grid of
persistent programs (OCC an SM) each loops over tickets: it takes its next ticket and starts that
chunk's TMA load into the next of STAGES shared-memory buffers before it works on the current one,
so the next chunk streams in under the current chunk's scan, its wait for the carry and its
store. A chunk is read from shared memory one row at a time (each thread owns BC / 32 / warps
adjacent channels), twice: pass 1 scans for the chunk's map (the decay product and the
zero-carry value of the last row), which goes to the next chunk as soon as the carry has come;
pass 2 rescans from the carry and stores h row by row from registers (through shared memory and a
TMA store, Triton 3.6 put a CTA barrier after every row). Registers hold a row at a time, not the
chunk. `LOOK` > 0 hands off by decoupled look-back instead (written, not yet run on a GPU).

Rows past T (the TMA loads them as 0: a decay of 1, b = 0) copy the carry and are not stored;
columns past C likewise. The handed-on value (pass 1's map applied to the carry) is also
what the chunk stores as its last row (in the last chunk, from the last row before T), so h_last
equals h[:, -1] bit for bit, as the Triton kernels guarantee.

Hopper only (TMA), bf16/fp16 with C a multiple of 8 and 16-byte aligned bases (a TMA
descriptor's rules): `usable` says; anything else, and the interpreter (Gluon has none), takes the
Triton kernels, so GPU tests compare the two elementwise and CPU CI compiles this one for sm_90.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import knobs

try:
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernels serve
    gluon = None

# (R rows a chunk, BC channels a program, warps, STAGES buffers, OCC programs an SM).
TILES = (64, 128, 4, 2, 3)

if gluon is not None:
    from ..memory.dkv_gluon import cta_barrier, tma_load  # the spellings across Triton 3.6-3.9

    _LOG2E = gl.constexpr(1.4426950408889634)

    @gluon.jit
    def _decay(la, L: gl.constexpr):
        """exp of the clamped log-decay (a row of 16-bit floats; both bounds are exact there, NaN
        stays NaN as in torch.clamp), then one ex2.approx.ftz (the decay lies in [e^-50, 1], far
        from denormals)."""
        la = gl.minimum(gl.maximum(la, gl.full(la.shape, -50.0, la.dtype, L), propagate_nan=tl.PropagateNan.ALL),
                        gl.zeros(la.shape, la.dtype, L), propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [la.to(gl.float32) * _LOG2E],
                                         dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip

    @gluon.jit
    def _now():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _link_word(tag, value):
        return (tag.to(gl.int64) << 32) | (value.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF)

    @gluon.jit
    def _await(ptrs, tag, ok, SPIN_LIMIT: gl.constexpr):
        """Spin (volatile loads) until every word at ptrs carries `tag` -> their fp32 values, NaN
        after SPIN_LIMIT polls (as kernel._await_link)."""
        word = gl.load(ptrs, mask=ok, other=0, volatile=True)
        waiting = gl.max(gl.max(gl.where(ok & ((word >> 32).to(gl.int32) != tag), 1, 0), 1), 0)
        spins = 0
        while (waiting != 0) & (spins < SPIN_LIMIT):
            word = gl.load(ptrs, mask=ok, other=0, volatile=True)
            waiting = gl.max(gl.max(gl.where(ok & ((word >> 32).to(gl.int32) != tag), 1, 0), 1), 0)
            spins += 1
        value = (word & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)
        return gl.where(waiting != 0, float("nan"), value)

    @gluon.jit
    def _look_back(DESC, base, k, state, ok, start, BCT, L: gl.constexpr, BCW: gl.constexpr, W: gl.constexpr,
                   SPIN_LIMIT: gl.constexpr):  # fmt: skip
        """The carry into chunk k by decoupled look-back over the W chunks before it: polls (one
        round trip for the whole window) until, in every column, the nearest inclusive value
        (INCL: tag base + 2 j + 2 on word 1; or `start` before chunk 0) has only chunks with their
        own map published (AGG: tag base + 2 j + 1 on both words) after it; -> the carry, NaN
        after SPIN_LIMIT polls."""
        ready = 0
        spins = 0
        carry = gl.zeros([1, BCW], gl.float32, L)
        while (ready == 0) & (spins < SPIN_LIMIT):
            done = ~ok
            blocked = ok & False
            scale = gl.full([1, BCW], 1.0, gl.float32, L)
            shift = gl.zeros([1, BCW], gl.float32, L)
            for w in gl.static_range(W):
                j = k - 1 - w
                if j >= 0:
                    ptr = DESC + (j.to(gl.int64) * BCT + state) * 2
                    w0 = gl.load(ptr, mask=ok, other=0, volatile=True)
                    w1 = gl.load(ptr + 1, mask=ok, other=0, volatile=True)
                    v0 = (w0 & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)
                    v1 = (w1 & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)
                    live = ~done & ~blocked
                    incl = live & ((w1 >> 32).to(gl.int32) == base + 2 * j + 2)
                    agg = live & ~incl & ((w1 >> 32).to(gl.int32) == base + 2 * j + 1)
                    agg = agg & ((w0 >> 32).to(gl.int32) == base + 2 * j + 1)
                    carry = gl.where(incl, scale * v1 + shift, carry)
                    done = done | incl
                    shift = gl.where(agg, scale * v1 + shift, shift)
                    scale = gl.where(agg, scale * v0, scale)
                    blocked = blocked | (live & ~incl & ~agg)
                elif j == -1:
                    live = ~done & ~blocked
                    carry = gl.where(live, scale * start + shift, carry)
                    done = done | live
            ready = gl.min(gl.min(done.to(gl.int32), 1), 0)
            spins += 1
        return gl.where(ready != 0, carry, float("nan"))

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.9 (3.6: _reinterpret)

        @gluon.jit
        def _boxed(rows, desc):
            """A [R, BC] buffer as the descriptor's [1, R, BC] box (the same bytes: no swizzle)."""
            return rows.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    else:

        @gluon.jit
        def _boxed(rows, desc):
            return rows._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    @gluon.jit
    def _load_chunk(la_desc, x_desc, la_s, x_s, bar, ticket, per_chunk, n_ct, stage, R: gl.constexpr,
                    BC: gl.constexpr):  # fmt: skip
        k = ticket // per_chunk
        rest = ticket - k * per_chunk
        pid_b = rest // n_ct
        c0 = (rest - pid_b * n_ct) * BC
        mbarrier.expect(bar.index(stage), la_desc.block_type.nbytes + x_desc.block_type.nbytes)
        tma_load(la_desc, [pid_b, k * R, c0], bar.index(stage), _boxed(la_s.index(stage), la_desc))
        tma_load(x_desc, [pid_b, k * R, c0], bar.index(stage), _boxed(x_s.index(stage), x_desc))

    @gluon.jit
    def _pass2(la_rows, x_rows, hp, carry, out, last, ok, R: gl.constexpr, L: gl.constexpr, C: gl.constexpr,
               MASKED: gl.constexpr):  # fmt: skip
        """h from the carry, stored row by row from registers (`hp`: row 0's pointers); from row
        `last` on the rows take `out`, and (MASKED) rows past it and columns past C are not
        stored. Not through shared memory and a TMA store: Triton 3.6 puts a CTA barrier after
        every row's store into a shared buffer (its barrier analysis takes any two stores into
        one buffer as overlapping)."""
        h = carry
        for r in gl.static_range(R):
            a = _decay(la_rows.slice(r, 1).load(L), L)
            h = a * h + x_rows.slice(r, 1).load(L).to(gl.float32)
            if MASKED:
                gl.store(hp + r * C, gl.where(r >= last, out, h).to(hp.dtype.element_ty), mask=ok & (r <= last))
            elif r == R - 1:
                gl.store(hp + r * C, out.to(hp.dtype.element_ty))
            else:
                gl.store(hp + r * C, h.to(hp.dtype.element_ty))

    @gluon.jit(do_not_specialize=["base"])  # it changes every launch
    def _scan_fwd(
        la_desc,
        x_desc,  # [B, T, C] in blocks of [1, R, BC]
        H,  # [B, T, C]
        H0,
        HLAST,  # [B, C]
        LINK,  # the ticket counter, then the two-slot ring of 2 B C words (kernel._link)
        B,
        T,
        n_chunks,
        C: gl.constexpr,
        HAS_H0: gl.constexpr,
        R: gl.constexpr,
        BC: gl.constexpr,
        STAGES: gl.constexpr,
        ROWS: gl.constexpr,  # an unswizzled shared layout: the buffers, read row by row
        SPIN_LIMIT: gl.constexpr,
        CHAIN: gl.constexpr = True,  # False: every chunk starts from 0, no hand-off (timing probes only)
        DESC=None,  # look-back descriptors (kernel._descriptors): 2 words a chunk and channel
        base=0,  # this launch's tag base
        LOOK: gl.constexpr = 0,  # the look-back window in chunks; 0: the serial chain's ring
        TR=None,  # TRACE (timing probes only): 6 int64 a ticket, %globaltimer stamps and the SM
        TRACE: gl.constexpr = False,
    ):
        L: gl.constexpr = gl.BlockedLayout([1, BC // (32 * gl.num_warps())], [1, 32], [1, gl.num_warps()], [1, 0])
        n_ct: gl.constexpr = (C + BC - 1) // BC
        per_chunk = B * n_ct
        n_tickets = per_chunk * n_chunks
        last_draw = n_tickets + gl.num_programs(0) - 1  # every program's last draw is past the tickets
        dtype: gl.constexpr = x_desc.dtype
        la_s = gl.allocate_shared_memory(dtype, [STAGES, R, BC], ROWS)
        x_s = gl.allocate_shared_memory(dtype, [STAGES, R, BC], ROWS)
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bar.index(s), count=1)
        ch = gl.expand_dims(gl.arange(0, BC, layout=gl.SliceLayout(0, L)), 0)
        ring = LINK + 1
        ring_slot = B * C

        cur = gl.atomic_add(LINK, 1, sem="relaxed").to(gl.int32)
        if cur == last_draw:
            gl.atomic_xchg(LINK, 0, sem="relaxed")
        if cur < n_tickets:
            _load_chunk(la_desc, x_desc, la_s, x_s, bar, cur, per_chunk, n_ct, 0, R, BC)
        i = 0
        while cur < n_tickets:
            # The next ticket's chunk streams in while this one is scanned. Its buffer was last
            # read STAGES - 1 chunks ago, by every thread before that chunk's stores (below).
            nxt = gl.atomic_add(LINK, 1, sem="relaxed").to(gl.int32)
            if nxt == last_draw:
                gl.atomic_xchg(LINK, 0, sem="relaxed")
            if nxt < n_tickets:
                _load_chunk(la_desc, x_desc, la_s, x_s, bar, nxt, per_chunk, n_ct, (i + 1) % STAGES, R, BC)
            st = i % STAGES
            k = cur // per_chunk
            rest = cur - k * per_chunk
            pid_b = rest // n_ct
            c0 = (rest - pid_b * n_ct) * BC
            ok = c0 + ch < C
            state = pid_b.to(gl.int64) * C + c0 + ch
            la_rows = la_s.index(st)
            x_rows = x_s.index(st)
            if TRACE:
                gl.store(TR + cur * 6, _now())
            mbarrier.wait(bar.index(st), (i // STAGES) & 1)
            if TRACE:
                gl.store(TR + cur * 6 + 1, _now())

            # Pass 1: the chunk's map (decay product a_all, zero-carry value z of its last row).
            a_all = gl.full([1, BC], 1.0, gl.float32, L)
            z = gl.zeros([1, BC], gl.float32, L)
            for r in gl.static_range(R):
                a = _decay(la_rows.slice(r, 1).load(L), L)
                z = a * z + x_rows.slice(r, 1).load(L).to(gl.float32)
                a_all = a_all * a
            if TRACE:
                gl.store(TR + cur * 6 + 2, _now())
            if LOOK > 0 and CHAIN and k + 1 < n_chunks:  # this chunk's map, for the chunks after it
                d = DESC + (k.to(gl.int64) * ring_slot + state) * 2
                gl.atomic_xchg(d, _link_word(base + 2 * k + 1, a_all), mask=ok, sem="relaxed")
                gl.atomic_xchg(d + 1, _link_word(base + 2 * k + 1, z), mask=ok, sem="relaxed")
            if (k == 0) or (not CHAIN):
                if HAS_H0:
                    carry = gl.load(H0 + state, mask=ok, other=0.0).to(gl.float32)
                else:
                    carry = gl.zeros([1, BC], gl.float32, L)
            elif LOOK > 0:
                if HAS_H0 and (k <= LOOK):
                    start = gl.load(H0 + state, mask=ok, other=0.0).to(gl.float32)
                else:
                    start = gl.zeros([1, BC], gl.float32, L)
                carry = _look_back(DESC, base, k, state, ok, start, ring_slot, L, BC, LOOK, SPIN_LIMIT)
            else:
                carry = _await(ring + ((k - 1) % 2) * ring_slot + state, k, ok, SPIN_LIMIT)
            out = a_all * carry + z
            if TRACE:
                gl.store(TR + cur * 6 + 3, _now() + gl.sum(gl.sum(out, 1), 0).to(gl.int64) * 0)
            if not CHAIN:
                pass
            elif LOOK > 0:
                if k + 1 < n_chunks:
                    d = DESC + (k.to(gl.int64) * ring_slot + state) * 2
                    gl.atomic_xchg(d + 1, _link_word(base + 2 * k + 2, out), mask=ok, sem="relaxed")
                else:
                    gl.store(HLAST + state, out.to(HLAST.dtype.element_ty), mask=ok)
            elif k + 1 < n_chunks:
                gl.atomic_xchg(ring + (k % 2) * ring_slot + state, _link_word(k + 1, out), mask=ok, sem="relaxed")
            else:
                gl.store(HLAST + state, out.to(HLAST.dtype.element_ty), mask=ok)
                if k > 0:  # the column's ring words back to zero for the next launch
                    empty = gl.zeros([1, BC], gl.int64, L)
                    gl.store(ring + state, empty, mask=ok)
                    gl.store(ring + ring_slot + state, empty, mask=ok)

            # Pass 2: h from the carry.
            hp = H + (pid_b.to(gl.int64) * T + k * R) * C + c0 + ch
            if (k * R + R > T) or (C % BC != 0):
                _pass2(la_rows, x_rows, hp, carry, out, T - k * R - 1, ok, R, L, C, True)
            else:
                _pass2(la_rows, x_rows, hp, carry, out, R - 1, ok, R, L, C, False)
            if TRACE:
                gl.store(TR + cur * 6 + 4, _now())
                smid = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
                gl.store(TR + cur * 6 + 5, gl.program_id(0).to(gl.int64) * 1000 + smid)
            cta_barrier()  # every thread is done with this buffer before a later load refills it
            i += 1
            cur = nxt
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(s))


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Elements (B T C) from which the forward takes this kernel where the word forward would run.
# Below, the word forward's leaner launch (kernels/launch.py) wins: a launch here goes through
# Triton's own path and builds two TMA descriptors, tens of microseconds of host time.
MIN_ELEMENTS = 1 << 22


def usable(log_a: Tensor, b: Tensor) -> bool:
    """Whether `launch` takes these [B, T, C] inputs: not MMREC_SCAN_GLUON=0, a Hopper GPU, bf16 or
    fp16 of one dtype, C a multiple of 8 and 16-byte aligned bases (TMA descriptors), at least
    MIN_ELEMENTS elements."""
    return (
        gluon is not None
        and knobs.scan_gluon
        and b.is_cuda
        and b.numel() >= MIN_ELEMENTS
        and torch.cuda.get_device_capability(b.device)[0] == 9
        and b.dtype in (torch.bfloat16, torch.float16)
        and log_a.dtype == b.dtype
        and b.shape[2] % 8 == 0
        and log_a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
    )


def launch(log_a: Tensor, b: Tensor, h0: Tensor | None, h: Tensor, h_last: Tensor, link: Tensor,
           tiles: tuple | None = None, **probe) -> None:  # fmt: skip
    """h, h_last of the scan over contiguous [B, T, C] inputs `usable` accepted; `link` zeroed as
    kernel._link leaves it."""
    rows, block_c, warps, stages, occ = tiles or TILES
    probe = dict(probe)
    bsz, steps, width = b.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    desc = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, rows, block_c], layout) for x in (log_a, b)]
    n_chunks = -(-steps // rows)
    tickets = n_chunks * bsz * -(-width // block_c)
    grid = (min(tickets, occ * _sm_count(b.device)),)
    if "GRID" in probe:
        grid = (min(tickets, probe.pop("GRID")),)
    look = probe.pop("LOOK", 0)
    if look:
        from .kernel import _descriptors

        probe["DESC"], probe["base"] = _descriptors(bsz, width, n_chunks, b.device)
        probe["LOOK"] = look
    _scan_fwd[grid](
        *desc, h, h0 if h0 is not None else h_last, h_last, link, bsz, steps, n_chunks,
        C=width, HAS_H0=h0 is not None, R=rows, BC=block_c, STAGES=stages,
        ROWS=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), SPIN_LIMIT=1 << 26, num_warps=warps, **probe,
    )  # fmt: skip
