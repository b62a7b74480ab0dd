"""What asynchronous wgmma buys the memory backward's dk/dv kernel: its loop written in Gluon
(Triton's explicit-layout dialect), where Triton's own language waits for each product right
after issuing it (Triton 3.6 puts `warp_group_dot_wait {pendings = 0}` after the logits product
and after the dp product; reordering the source does not change that). Here each token tile issues
its logits and its dp products together, runs the softmax while dp is in flight, and leaves the
dv (and dk) products in flight into the next tile; q/dout tiles come by TMA in a ring of STAGES.
One level, every slot visible, no bias: an upper bound for the overlap, the question the forward's
probe (gluon_probe.py) answered for the forward (BENCHMARKS.md, sessions 24 and 26).

DQ=0 computes dk and dv only (the split backward's dk/dv kernel); DQ=1 also adds each tile's dq
share into an fp32 buffer by atomics (Gluon 3.6 has no TMA reduction). Checked against SDPA's
gradients over the same keys and timed, kernel by kernel, beside SDPA's (cuDNN) and
kernels.memory's backward kernels in one torch.profiler run.

    python benchmarks/gluon_bwd_probe.py                 (Hopper GPU: check and time)
    python benchmarks/gluon_bwd_probe.py --compile       (no GPU: compile for sm_90 only)
"""

import math
import os
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.memory import kernel as memory_kernel
from kernels.memory.dkv_gluon import cta_barrier, tma_load  # spelled as this Triton spells them


@gluon.jit
def _load_qdo(q_desc, do_desc, q_smem, do_smem, bar, row, col, stage):
    mbarrier.expect(bar.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma_load(q_desc, [row, col], bar.index(stage), q_smem.index(stage))
    tma_load(do_desc, [row, col], bar.index(stage), do_smem.index(stage))


@gluon.jit
def probe_dkv(
    q_desc,
    do_desc,
    k_desc,
    v_desc,
    stats_ptr,  # [2, B*H, T] fp32: delta, lse * log2(e)
    dk_ptr,
    dv_ptr,  # [B*H*S, DH] bf16
    dq_ptr,  # DQ: [B*T, H*DH] fp32, zeroed
    T,
    S,
    HEADS,
    qk_scale,  # log2(e) / sqrt(DH)
    scale,
    BLOCK_T: gl.constexpr,
    BLOCK_S: gl.constexpr,
    DH: gl.constexpr,
    STAGES: gl.constexpr,
    DQ: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_s = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    kv_row = pid_bh * S + pid_s * BLOCK_S
    n = T // BLOCK_T

    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 64, 16]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    tok: gl.constexpr = gl.SliceLayout(0, mma)
    slot: gl.constexpr = gl.SliceLayout(1, mma)

    kt_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    vt_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)  # noqa: RUF005
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)  # noqa: RUF005
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bar.index(i), count=1)
    if DQ:
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_S, BLOCK_T], gl.bfloat16)
        ds_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_S, BLOCK_T], ds_layout)

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [kv_row, 0], kv_bar, kt_smem)
    tma_load(v_desc, [kv_row, 0], kv_bar, vt_smem)
    for i in gl.static_range(STAGES):  # n >= STAGES
        _load_qdo(q_desc, do_desc, q_smem, do_smem, bar, b * T + i * BLOCK_T, h * DH, i)

    zero = gl.zeros([BLOCK_S, BLOCK_T], gl.float32, mma)
    dk = warpgroup_mma_init(gl.zeros([BLOCK_S, DH], gl.float32, mma))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_S, DH], gl.float32, mma))
    cols_t = gl.arange(0, BLOCK_T, layout=tok)
    stat = stats_ptr + pid_bh.to(gl.int64) * T + cols_t
    n_stats = gl.num_programs(1).to(gl.int64) * T
    if DQ:
        dq_rows = gl.arange(0, BLOCK_T, layout=slot)
        dq_cols = gl.arange(0, DH, layout=tok)
        dq_offs = gl.expand_dims((b * T + dq_rows).to(gl.int64) * (HEADS * DH) + h * DH, 1) + gl.expand_dims(dq_cols, 0)
    mbarrier.wait(kv_bar, 0)
    for j in range(n):
        st = j % STAGES
        mbarrier.wait(bar.index(st), (j // STAGES) & 1)
        s_t = warpgroup_mma(kt_smem, q_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(vt_smem, do_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
        delta = gl.load(stat + j * BLOCK_T)
        lse2 = gl.load(stat + n_stats + j * BLOCK_T)
        # In flight: the last tile's dv, dk (dq), then s_t, dp_t: all but dp_t done after this.
        s_t = warpgroup_mma_wait(1, deps=(s_t,))
        refill = j - 1 + STAGES  # tile j - 1's stage is free: its products are done
        if (j >= 1) & (refill < n):
            _load_qdo(q_desc, do_desc, q_smem, do_smem, bar, b * T + refill * BLOCK_T, h * DH, (j - 1) % STAGES)
        p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
        dv = warpgroup_mma(gl.convert_layout(p_t.to(gl.bfloat16), a_op), do_smem.index(st), dv, is_async=True)
        dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dv stays in flight
        ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(gl.bfloat16)
        dk = warpgroup_mma(gl.convert_layout(ds_t, a_op), q_smem.index(st), dk, is_async=True)
        if DQ:
            ds_smem.store(ds_t)
            fence_async_shared()
            cta_barrier()  # every warp's share of ds stored before the product reads it
            dq = warpgroup_mma(
                ds_smem.permute((1, 0)), kt_smem, gl.zeros([BLOCK_T, DH], gl.float32, mma), use_acc=False, is_async=True
            )
            dq = warpgroup_mma_wait(0, deps=(dq,))
            gl.atomic_add(dq_ptr + dq_offs + j * BLOCK_T * HEADS * DH, dq * scale, sem="relaxed")
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(i))
    rows = gl.arange(0, BLOCK_S, layout=slot)
    cols = gl.arange(0, DH, layout=tok)
    offs = gl.expand_dims((kv_row + rows).to(gl.int64) * DH, 1) + gl.expand_dims(cols, 0)
    gl.store(dk_ptr + offs, (dk * scale).to(gl.bfloat16))
    gl.store(dv_ptr + offs, dv.to(gl.bfloat16))


def launch(q, dout, keys, values, stats, heads, dq_acc=None, block_s=64, block_t=64, stages=3, num_warps=4):
    bsz, steps, _ = q.shape
    dim = keys.shape[-1]
    n_slots = keys.shape[2]
    if steps % block_t or n_slots % block_s or steps // block_t < stages:
        raise ValueError(f"gluon_bwd_probe: T {steps} and the slots {n_slots} must be multiples of the tiles")
    ql = gl.NVMMASharedLayout.get_default_for([block_t, dim], gl.bfloat16)
    kl = gl.NVMMASharedLayout.get_default_for([block_s, dim], gl.bfloat16)
    q2, do2 = q.view(bsz * steps, heads * dim), dout.view(bsz * steps, heads * dim)
    k2, v2 = keys.reshape(-1, dim), values.reshape(-1, dim)
    descs = [TensorDescriptor(x, list(x.shape), list(x.stride()), [block_t, dim], ql) for x in (q2, do2)]
    descs += [TensorDescriptor(x, list(x.shape), list(x.stride()), [block_s, dim], kl) for x in (k2, v2)]
    dk, dv = torch.empty_like(keys), torch.empty_like(values)
    grid = (n_slots // block_s, bsz * heads)
    dq_arg = dq_acc if dq_acc is not None else stats
    args = (
        *descs,
        stats,
        dk,
        dv,
        dq_arg,
        steps,
        n_slots,
        heads,
        memory_kernel.LOG2E / math.sqrt(dim),
        1 / math.sqrt(dim),
    )
    meta = dict(BLOCK_T=block_t, BLOCK_S=block_s, DH=dim, STAGES=stages, DQ=dq_acc is not None, num_warps=num_warps)
    return grid, args, (dk, dv), meta


def compile_here():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q = torch.empty(2, 256, 4 * 64, dtype=torch.bfloat16)
    keys = torch.empty(2, 4, 256, 64, dtype=torch.bfloat16)
    stats = torch.empty(2, 8, 256)
    for dq in (False, True):
        dq_acc = torch.empty(2, 256, 256) if dq else None
        _, args, _, meta = launch(q, q, keys, keys, stats, 4, dq_acc)
        names = probe_dkv.arg_names
        sig, consts = {}, {}
        for name, a in zip(names[: len(args)], args, strict=True):
            sig[name] = mangle_type(a) if not isinstance(a, float) else "fp32"
        for k, v in meta.items():
            if k in names:
                sig[k] = "constexpr"
                consts[k] = v
        k = triton.compile(
            GluonASTSource(probe_dkv, sig, consts),
            target=GPUTarget("cuda", 90, 128),
            options={"num_warps": 4, **({"maxnreg": int(os.environ["REG"])} if "REG" in os.environ else {})},
        )
        print(f"DQ={int(dq)}: compiled; shared {k.metadata.shared}, {_registers(k.asm['cubin'])}")


def _registers(cubin: bytes) -> str:
    """cuobjdump's register and stack count of a cubin (Triton's bundled copy)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(w for line in res.splitlines() if "REG" in line for w in line.split() if w[:4] in ("REG:", "STAC"))


def main():
    if "--compile" in sys.argv:
        return compile_here()
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import run_info

    run_info("benchmarks/gluon_bwd_probe.py")
    torch.manual_seed(0)
    bsz, heads, steps, dim, n_slots = 8, 16, 4096, 64, 1024
    dt = torch.bfloat16
    q = torch.randn(bsz, steps, heads * dim, device="cuda", dtype=dt)
    keys = torch.randn(bsz, heads, n_slots, dim, device="cuda", dtype=dt)
    values = torch.randn_like(keys)
    dout = torch.randn_like(q)
    qs = q.view(bsz, steps, heads, dim).transpose(1, 2).detach().requires_grad_()
    ks, vs = keys.detach().requires_grad_(), values.detach().requires_grad_()
    do_s = dout.view(bsz, steps, heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(qs, ks, vs)
    want_dq, want_dk, want_dv = torch.autograd.grad(out, (qs, ks, vs), do_s)
    want_dq = want_dq.transpose(1, 2).reshape(bsz, steps, heads * dim)
    with torch.no_grad():  # delta and the base-2 LSE per (row, head, token)
        lse = torch.cat(
            [
                torch.logsumexp((qs[i : i + 1].float() @ ks[i : i + 1].float().transpose(-1, -2)) / math.sqrt(dim), -1)
                for i in range(bsz)
            ]
        )
        delta = (do_s.float() * out.float()).sum(-1)
        stats = torch.stack([delta, lse * memory_kernel.LOG2E]).reshape(2, bsz * heads, steps).contiguous()

    def err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    runs = {}
    for dq in (False, True):
        for stages, cap in ((2, None), (3, None), (4, None), (2, 168), (3, 168)):
            name = f"gluon dkv{'+dq atomics' if dq else ''}, 64 x 64, 4 warps, {stages} stages, cap {cap}"
            try:
                dq_acc = torch.zeros(bsz, steps, heads * dim, device="cuda") if dq else None
                grid, args, (dk, dv), meta = launch(q, dout, keys, values, stats, heads, dq_acc, stages=stages)
                if cap:
                    meta["maxnreg"] = cap
                fn = lambda grid=grid, args=args, meta=meta: probe_dkv[grid](*args, **meta)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                errs = f"dk {err(dk, want_dk):.1e}, dv {err(dv, want_dv):.1e}"
                if dq:
                    errs += f", dq {err(dq_acc, want_dq):.1e}"
                print(f"  {name}: rel err vs SDPA {errs}", flush=True)
                runs[name] = fn
            except Exception as e:  # one line per failing config
                print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    # kernels.memory's backward over one level (a full ring of 960 slots, the segment's 64)
    beta = torch.zeros(heads, 1, device="cuda", dtype=dt)
    pos = torch.full((bsz,), 64 * 4096, device="cuda", dtype=torch.int64)
    o, lse_ours = memory_kernel.attend_fwd(q, keys, values, beta, pos, [960], [64], heads)
    for mode in ("split", "fused-tma"):

        def ours(mode=mode):
            saved = memory_kernel.knobs.memory_bwd
            memory_kernel.knobs.memory_bwd = mode
            memory_kernel.attend_bwd(q, keys, values, beta, pos, [960], [64], o, lse_ours, dout, heads)
            memory_kernel.knobs.memory_bwd = saved

        runs[f"kernels.memory {mode}, one level (ring 960)"] = ours
    runs["SDPA fwd+bwd (cuDNN), 1024 keys"] = lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(qs, ks, vs), (qs, ks, vs), do_s
    )
    reps = 20
    for name, fn in runs.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}")
        for e in prof.key_averages():
            t = e.self_device_time_total / reps
            if t > 0.5:
                print(f"  {t:8.1f} us  {e.key[:90]}")


if __name__ == "__main__":
    main()
