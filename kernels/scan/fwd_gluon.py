"""The linear scan's forward in Gluon (Triton's explicit-layout dialect): persistent programs that
stream chunks by TMA, for Hopper.

The chain is `kernel._scan_fwd_words`'s: time is cut into chunks of R rows, the chunks of one
column (a batch row and BC channels) hand their last row on to the next through the same two-slot
ring of tagged 64-bit words, and a ticket counter orders the chunks so that a waiting chunk's
predecessor has always been taken by a running program. What changes is how a chunk reaches the
registers and how long a program holds it. There a program per chunk loads its chunk into
registers, so each SM holds a few chunks and its loads start only when a program does. Here a grid
of persistent programs (OCC an SM) each loops over tickets, and the chunk of its next ticket
streams into shared memory by TMA while it works on the current one: its wait for the carry and
its store at least (with one buffer, the load starts when pass 1 is done with it; with more, at
the top of the loop).

Each thread owns a column of the chunk (BC / 32 / warps adjacent channels, all R rows). Pass 1
reads the chunk from shared memory into registers once and scans down the column in the thread
(`associative_scan` over an axis that lies in one thread is a sequential loop): for every row r
the prefix map h -> P_r h + z_r of rows 0..r. The last row's map, applied to the carry, goes on
to the next chunk. Pass 2 is h_r = z_r + P_r carry from those registers, stored straight to
global memory: no second read of shared memory and no second exp, so a program's time per chunk
shrinks to the carry's wait (BENCHMARKS.md, session 28: 1.04x-1.06x the copy floor against
1.07x-1.08x for the earlier version that rescanned the buffer row by row in pass 2). The price is
registers: the maps alone are two fp32 per element of the chunk, 128 registers a thread at R 64
(one channel a thread), within a cap of 168 a thread, what 3 programs of 4 warps an SM leave
(`max_registers`; Triton 3.6's ptxas used 154-168 at C 1024-2048 without spilling). One
difference from the sequential recurrence: where the carry is infinite and P has underflowed to
0 (a few rows clamped at -50), z + P carry is NaN where a h + b would stay infinite; only an
already infinite state can meet it.

h goes to global memory from registers, not through shared memory and a TMA store: Triton 3.6's
barrier analysis puts a CTA barrier after every row stored into a shared buffer.

Rows past T (the TMA loads them as 0: a decay of 1, b = 0) copy the carry and are not stored;
columns past C likewise. The handed-on value (pass 1's map applied to the carry) is also what the
chunk stores as its last row (in the last chunk, the last row before T), so h_last equals
h[:, -1] bit for bit, as the Triton kernels guarantee.

Hopper only (TMA), bf16/fp16, 16-byte aligned bases (a TMA descriptor's rule) and C a multiple
of BC (ragged column blocks spill): `usable` says; anything else, and the interpreter (Gluon has none), takes the
Triton kernels, so GPU tests compare the two elementwise and CPU CI compiles this one for sm_90.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import knobs
from ..launch import Launcher

try:
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernels serve
    gluon = None

# (R rows a chunk, BC channels a program, warps, STAGES buffers, OCC programs an SM).
TILES = (64, 128, 4, 1, 3)
# Programmatic dependent launch: 0 off; 1 launches with launch_pdl and waits for the kernel before
# (griddepcontrol.wait) ahead of any global access; 2 also releases the kernel after it once each
# program has drawn its last ticket, so the next launch overlaps this one's tail.
PDL = 0

if gluon is not None:
    from ..memory.dkv_gluon import cta_barrier, tma_load  # the spellings across Triton 3.6-3.9
    from . import kernel as chain  # the chain's Triton helpers (layout-free, so Gluon calls them)

    _LOG2E = gl.constexpr(1.4426950408889634)

    @gluon.jit
    def _decay(la, L: gl.constexpr):
        """exp of the clamped log-decay (16-bit floats; both bounds are exact there, NaN stays NaN
        as in torch.clamp), then one ex2.approx.ftz (the decay lies in [e^-50, 1], far from
        denormals)."""
        la = gl.minimum(gl.maximum(la, gl.full(la.shape, -50.0, la.dtype, L), propagate_nan=tl.PropagateNan.ALL),
                        gl.zeros(la.shape, la.dtype, L), propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [la.to(gl.float32) * _LOG2E],
                                         dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip

    @gluon.jit
    def _now():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _await_grid():
        """Programmatic dependent launch: wait until the kernels this launch depends on have
        finished and their writes are visible (a no-op in a launch without the PDL attribute)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _release_grid():
        """Programmatic dependent launch: this program lets the next kernel on the stream launch
        (it still waits in `_await_grid` for this whole grid to finish)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)  # fmt: skip

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
    def _take(LINK, last_draw):
        """The next ticket; the program that draws the last one puts the counter back to 0."""
        ticket = gl.atomic_add(LINK, 1, sem="relaxed").to(gl.int32)
        if ticket == last_draw:
            gl.atomic_xchg(LINK, 0, sem="relaxed")
        return ticket

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
    def _row(P, z, r, R: gl.constexpr, LR: gl.constexpr):
        """Row r of the [R, BC] maps (P, z): sums of one term and -0.0s (exact, and folded away
        where r is a constant)."""
        at = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(1, LR)), 1) == r
        return gl.sum(gl.where(at, P, -0.0), 0), gl.sum(gl.where(at, z, -0.0), 0)

    @gluon.jit
    def _store(H, c0, P, z, carry, out, last, ok, R: gl.constexpr, BC: gl.constexpr, LR: gl.constexpr,
               C: gl.constexpr, MASKED: gl.constexpr):  # fmt: skip
        """h = z + P carry for the chunk whose row 0 is at H (int64 offsets there; here only row
        and channel offsets, below 2^31 while R C is), rows from `last` on taking `out`; (MASKED)
        rows past `last` and columns past C are not stored."""
        rows = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(1, LR)), 1)
        cols = gl.expand_dims(gl.arange(0, BC, layout=gl.SliceLayout(0, LR)), 0)
        h = gl.where(rows >= last, gl.expand_dims(out, 0), z + P * gl.expand_dims(carry, 0))
        ptrs = H + rows * C + c0 + cols
        if MASKED:
            gl.store(ptrs, h.to(H.dtype.element_ty), mask=(rows <= last) & gl.expand_dims(ok, 0))
        else:
            gl.store(ptrs, h.to(H.dtype.element_ty))

    @gluon.jit
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
        ROWS: gl.constexpr,  # an unswizzled shared layout for the buffers
        SPIN_LIMIT: gl.constexpr,
        CHAIN: gl.constexpr = True,  # False: every chunk starts from 0, no hand-off (timing probes only)
        TR=None,  # TRACE (timing probes only): 6 int64 a ticket, %globaltimer stamps and the SM
        TRACE: gl.constexpr = False,
        PDL: gl.constexpr = 0,  # with launch_pdl (the module's PDL): 1 waits for the kernel before, 2 also releases
    ):
        # A thread holds all R rows of its channels; CL: one value per channel of the block.
        LR: gl.constexpr = gl.BlockedLayout([R, BC // (32 * gl.num_warps())], [1, 32], [1, gl.num_warps()], [0, 1])
        CL: gl.constexpr = gl.SliceLayout(0, LR)
        EARLY: gl.constexpr = STAGES == 1  # the next load starts once pass 1 has the only buffer in registers
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
        ch = gl.arange(0, BC, layout=CL)
        ring = LINK + 1
        ring_slot = B * C

        if PDL:  # nothing global is touched before this: the ring and the inputs may be the previous kernel's
            _await_grid()
        cur = _take(LINK, last_draw)
        if cur < n_tickets:
            _load_chunk(la_desc, x_desc, la_s, x_s, bar, cur, per_chunk, n_ct, 0, R, BC)
        i = 0
        while cur < n_tickets:
            # The next ticket's chunk streams in while this one is scanned. Its buffer was last
            # read STAGES - 1 chunks ago, by every thread before that chunk's barrier (below).
            if not EARLY:
                nxt = _take(LINK, last_draw)
                if nxt < n_tickets:
                    _load_chunk(la_desc, x_desc, la_s, x_s, bar, nxt, per_chunk, n_ct, (i + 1) % STAGES, R, BC)
            st = i % STAGES
            k = cur // per_chunk
            rest = cur - k * per_chunk
            pid_b = rest // n_ct
            c0 = (rest - pid_b * n_ct) * BC
            ok = c0 + ch < C
            state = pid_b.to(gl.int64) * C + c0 + ch
            if TRACE:
                gl.store(TR + cur * 6, _now())
            mbarrier.wait(bar.index(st), (i // STAGES) & 1)
            if TRACE:
                gl.store(TR + cur * 6 + 1, _now())

            # Pass 1: every row's prefix map, and the map of the row the chunk hands on.
            a = _decay(la_s.index(st).load(LR), LR)
            P, z = gl.associative_scan((a, x_s.index(st).load(LR).to(gl.float32)), 0, chain._compose)
            cta_barrier()  # every thread has its rows: the buffer may take a later chunk
            if EARLY:
                nxt = _take(LINK, last_draw)
                if nxt < n_tickets:
                    _load_chunk(la_desc, x_desc, la_s, x_s, bar, nxt, per_chunk, n_ct, 0, R, BC)
            if PDL == 2:  # noqa: SIM102 (a constexpr gate: compiled out otherwise)
                if nxt >= n_tickets:  # this program's last chunk: the next kernel may take its place
                    _release_grid()
            if k * R + R > T:
                a_all, z_all = _row(P, z, T - k * R - 1, R, LR)
            else:
                a_all, z_all = _row(P, z, R - 1, R, LR)
            if TRACE:
                gl.store(TR + cur * 6 + 2, _now())

            # The hand-off.
            if (k == 0) or (not CHAIN):
                if HAS_H0:
                    carry = gl.load(H0 + state, mask=ok, other=0.0).to(gl.float32)
                else:
                    carry = gl.zeros([BC], gl.float32, CL)
            else:
                carry = chain._await_link(ring + ((k - 1) % 2) * ring_slot + state, k, ok, SPIN_LIMIT)
            out = a_all * carry + z_all
            if TRACE:
                gl.store(TR + cur * 6 + 3, _now() + gl.sum(out, 0).to(gl.int64) * 0)
            if not CHAIN:
                pass
            elif k + 1 < n_chunks:
                gl.atomic_xchg(ring + (k % 2) * ring_slot + state, chain._pack_link(k + 1, out), mask=ok, sem="relaxed")
            else:
                gl.store(HLAST + state, out.to(HLAST.dtype.element_ty), mask=ok)
                if k > 0:  # the column's ring words back to zero for the next launch
                    empty = gl.zeros([BC], gl.int64, CL)
                    gl.store(ring + state, empty, mask=ok)
                    gl.store(ring + ring_slot + state, empty, mask=ok)

            # Pass 2: h from the carry, out of registers.
            hb = H + (pid_b.to(gl.int64) * T + k * R) * C  # int64: T C may pass 2^31
            if (k * R + R > T) or (C % BC != 0):
                _store(hb, c0, P, z, carry, out, T - k * R - 1, ok, R, BC, LR, C, True)
            else:
                _store(hb, c0, P, z, carry, out, R - 1, ok, R, BC, LR, C, False)
            if TRACE:
                gl.store(TR + cur * 6 + 4, _now())
                smid = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
                gl.store(TR + cur * 6 + 5, gl.program_id(0).to(gl.int64) * 1000 + smid)
            i += 1
            cur = nxt
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(s))


def max_registers(warps: int, occ: int) -> int:
    """Registers a thread may take so that `occ` programs of `warps` warps share an SM's 64K (a
    multiple of 8): the kernel's maxnreg. ptxas left alone takes more where it can (253 with the
    CUDA 13 ptxas of Triton 3.9) and a third program no longer fits."""
    return 65536 // (32 * warps * occ) // 8 * 8


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _major(device) -> int:
    return torch.cuda.get_device_capability(device)[0]


# Elements (B T C) from which the forward takes this kernel where the word forward would run. Set
# in session 27; re-measured in session 29 with the bound launch on an H200 (x the floor, Gluon
# against words). At 2^22 elements, as CUDA-graph replays: B4 T512 C2048 2.34x against 2.68x, B8
# T256 1.89x against 1.97x, B16 T128 1.84x against 1.69x (two chunks a column). Eager, where launch
# latency and host time dominate 3-14 us floors: 2.09x against 1.73x, 1.16x against 1.50x, 2.09x
# against 1.57x. Below, the one shape where the word forward ran (B8 T256 C1024): 2.39x against
# 2.47x graph, 1.47x against 1.82x eager. Too thin and mixed to move the threshold either way.
MIN_ELEMENTS = 1 << 22
DTYPES = (torch.bfloat16, torch.float16)


def usable(log_a: Tensor, b: Tensor) -> bool:
    """Whether `launch` takes these [B, T, C] inputs: not MMREC_SCAN_GLUON=0, a Hopper GPU, bf16 or
    fp16 of one dtype, 16-byte aligned bases (TMA descriptors), at least MIN_ELEMENTS elements,
    and C a multiple of the channel block (ragged column blocks need more registers than 3
    programs an SM leave: ptxas spills)."""
    return (
        gluon is not None
        and knobs.scan_gluon
        and b.is_cuda
        and b.numel() >= MIN_ELEMENTS
        and _major(b.device) == 9
        and b.dtype in DTYPES
        and log_a.dtype == b.dtype
        and b.shape[2] % TILES[1] == 0
        and log_a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
    )


def launch(log_a: Tensor, b: Tensor, h0: Tensor | None, h: Tensor, h_last: Tensor, link: Tensor,
           tiles: tuple | None = None, **probe) -> None:  # fmt: skip
    """h, h_last of the scan over contiguous [B, T, C] inputs `usable` accepted; `link` zeroed as
    kernel._link leaves it."""
    plan = None
    if tiles is None and not probe:
        # Everything but the data pointers is fixed by this key, so a repeat call launches the
        # bound kernel: h and h_last are fresh outputs of b's dtype and link the int64 ring
        # (all aligned); TILES, SPIN_LIMIT and PDL are module constants that probes and tests set.
        h0_spec = None if h0 is None else (h0.dtype, h0.data_ptr() % 16 == 0)
        plan = (torch.cuda.current_device(), b.device.index, b.dtype, b.shape, h0_spec, TILES, chain.SPIN_LIMIT, PDL)
        bound = _PLANS.get(plan)
        if bound is not None and bound[0](*_descriptors(log_a, b, *bound[1:]), h,
                                          h0 if h0 is not None else h_last, h_last, link):  # fmt: skip
            return
    rows, block_c, warps, stages, occ = tiles or TILES
    probe = dict(probe)
    bsz, steps, width = b.shape
    layout = _box_layout(8 * b.element_size())
    desc = _descriptors(log_a, b, [1, rows, block_c], layout, checked=True)
    n_chunks = -(-steps // rows)
    tickets = n_chunks * bsz * -(-width // block_c)
    grid = (min(tickets, occ * _sm_count(b.device)),)
    if "GRID" in probe:
        grid = (min(tickets, probe.pop("GRID")),)
    args = (*desc, h, h0 if h0 is not None else h_last, h_last, link, bsz, steps, n_chunks)
    named = dict(C=width, HAS_H0=h0 is not None, R=rows, BC=block_c, STAGES=stages, ROWS=_rows_layout(),
                 SPIN_LIMIT=chain.SPIN_LIMIT, num_warps=warps, maxnreg=max_registers(warps, occ), PDL=PDL,
                 launch_pdl=PDL > 0) | probe  # fmt: skip
    _launch(grid, *args, **named)
    if plan is not None:
        bound = _launch.bind(6, grid, *args, **named)
        if bound is not None:
            if len(_PLANS) >= 64:  # many shapes: start over rather than grow without bound
                _PLANS.clear()
            _PLANS[plan] = bound, [1, rows, block_c], layout


# Bound launches (kernels/launch.py) by device, dtype, shape, h0's kind and the module constants
# that reach the kernel (TILES, SPIN_LIMIT, PDL): a repeat forward skips re-keying its arguments and
# re-validating its descriptors. With the cached capability check and leaner allocations, a call
# took 84 us of host time against 105 on the device machine's host, where the eager forward's host
# time had exceeded its GPU time (session 29).
_PLANS: dict[tuple, tuple] = {}


def _descriptors(log_a: Tensor, b: Tensor, box: list, layout, checked: bool = False) -> tuple:
    """The two inputs' host TMA descriptors. Strides are a contiguous tensor's, from the shape, not
    x.stride(): a size-1 dimension of a contiguous tensor may carry any stride, which a descriptor
    would have to accept. Unless `checked`, built without TensorDescriptor's checks: a plan's first
    call ran them on the same shape and dtype, and `usable` checked these bases' alignment; every
    other field keeps its class default."""
    bsz, steps, width = b.shape
    shape, strides = [bsz, steps, width], [steps * width, width, 1]
    if checked:
        return tuple(TensorDescriptor(x, shape, strides, box, layout) for x in (log_a, b))
    out = []
    for x in (log_a, b):
        d = object.__new__(TensorDescriptor)
        d.base, d.shape, d.strides, d.block_shape, d.layout = x, shape, strides, box, layout
        out.append(d)
    return tuple(out)


@functools.cache
def _box_layout(bits: int):
    """The descriptors' shared layout: unswizzled, so the buffers read as plain rows."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=3)


@functools.cache
def _rows_layout():
    return gl.SwizzledSharedLayout(1, 1, 1, [1, 0])


# Triton's own launch path re-binds and re-keys every argument, descriptors and layouts included:
# on the device machine's host that made an eager forward + backward at B8 T4096 C2048 host-bound
# (0.57 ms against 0.30 as CUDA-graph replays, session 28). The lean launcher keys only what can
# change and calls the compiled kernel, whose own launcher encodes the two descriptors.
_launch = Launcher(_scan_fwd) if gluon is not None else None
