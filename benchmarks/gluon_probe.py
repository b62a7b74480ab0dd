"""What overlapping the softmax with the products buys the memory forward: its main loop written in
Gluon (Triton's explicit-layout dialect) with asynchronous wgmma, so that tile j+1's logits run on
the tensor cores while tile j's softmax runs (FlashAttention-3's intra-warpgroup overlap), which
Triton's own language does not let us place. One level, every slot visible, the shift fixed from
the first tile as in kernels.memory. Its error against SDPA over the same keys is printed, and it
is timed beside SDPA and beside kernels.memory's forward over one level, in the same run
(BENCHMARKS.md, session 24). A measurement, not a kernel of the package: no masks, levels, GQA or
fallback.

    python benchmarks/gluon_probe.py            (Hopper GPU: check and time)
    BT=64 W=4 python benchmarks/gluon_probe.py --compile   (no GPU: compile for sm_90 only)
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
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_info
from kernels.memory import kernel as memory_kernel
from kernels.memory.dkv_gluon import tma_load  # spelled as this Triton spells them


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, row, stage):
    mbarrier.expect(k_bar.index(stage), k_desc.block_type.nbytes)
    tma_load(k_desc, [row, 0], k_bar.index(stage), k_smem.index(stage))
    mbarrier.expect(v_bar.index(stage), v_desc.block_type.nbytes)
    tma_load(v_desc, [row, 0], v_bar.index(stage), v_smem.index(stage))


@gluon.jit
def probe_fwd(
    q_desc,
    k_desc,
    v_desc,
    o_ptr,
    T,
    S,
    HEADS,
    qk_scale,
    BLOCK_T: gl.constexpr,
    BLOCK_S: gl.constexpr,
    DH: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_t = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    t0 = pid_t * BLOCK_T
    kv0 = pid_bh * S
    n = S // BLOCK_S

    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_S, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)  # noqa: RUF005 (no * in @jit)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)  # noqa: RUF005
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [b * T + t0, h * DH], q_bar, q_smem)
    for i in gl.static_range(STAGES):  # n >= STAGES
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv0 + i * BLOCK_S, i)

    zero_s = gl.zeros([BLOCK_T, BLOCK_S], gl.float32, mma)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    m = gl.max(s, axis=1) * qk_scale  # the fixed shift
    l = gl.zeros([BLOCK_T], gl.float32, gl.SliceLayout(1, mma))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_T, DH], gl.float32, mma))
    for j in range(n - 1):
        nxt = j + 1
        mbarrier.wait(k_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m, 1))
        l += gl.sum(p, axis=1)
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        mbarrier.wait(v_bar.index(j % STAGES), (j // STAGES) & 1)
        acc = warpgroup_mma(p16, v_smem.index(j % STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_next,))  # this tile's value product stays in flight
        # tile j - 1's stage is free: its logits and value product are done
        refill = j - 1 + STAGES
        if (j >= 1) & (refill < n):
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv0 + refill * BLOCK_S, (j - 1) % STAGES)
    j = n - 1
    p = gl.exp2(s * qk_scale - gl.expand_dims(m, 1))
    l += gl.sum(p, axis=1)
    p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    mbarrier.wait(v_bar.index(j % STAGES), (j // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(j % STAGES), acc, is_async=True)
    out = warpgroup_mma_wait(0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))
    mbarrier.invalidate(q_bar)
    out = out / gl.expand_dims(l, 1)
    rows = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, DH, layout=gl.SliceLayout(0, mma))
    offs = gl.expand_dims((b * T + t0 + rows).to(gl.int64) * (HEADS * DH) + h * DH, 1) + gl.expand_dims(cols, 0)
    gl.store(o_ptr + offs, out.to(gl.bfloat16))


def launch(q, keys, values, heads, block_t=64, block_s=64, stages=3, num_warps=4):
    bsz, steps, _ = q.shape
    dim = keys.shape[-1]
    n_slots = keys.shape[2]
    if steps % block_t or n_slots % block_s or n_slots // block_s < stages:
        raise ValueError(
            f"gluon_probe: T {steps} must be a multiple of {block_t}, the slots {n_slots} a multiple of {block_s} "
            f"and at least {stages} tiles"
        )
    ql = gl.NVMMASharedLayout.get_default_for([block_t, dim], gl.bfloat16)
    kl = gl.NVMMASharedLayout.get_default_for([block_s, dim], gl.bfloat16)
    q2 = q.view(bsz * steps, heads * dim)
    k2, v2 = keys.reshape(-1, dim), values.reshape(-1, dim)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [block_t, dim], ql)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_s, dim], kl)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [block_s, dim], kl)
    out = torch.empty_like(q)
    grid = (steps // block_t, bsz * heads)
    args = (q_desc, k_desc, v_desc, out, steps, n_slots, heads, memory_kernel.LOG2E / math.sqrt(dim))
    return grid, args, out, dict(BLOCK_T=block_t, BLOCK_S=block_s, DH=dim, STAGES=stages, num_warps=num_warps)


def compile_here():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q = torch.empty(2, 256, 4 * 64, dtype=torch.bfloat16)
    keys = torch.empty(2, 4, 256, 64, dtype=torch.bfloat16)
    bt, w = int(os.environ.get("BT", 64)), int(os.environ.get("W", 4))
    _, args, _, meta = launch(q, keys, keys.clone(), 4, block_t=bt, num_warps=w)
    fn = probe_fwd
    names = fn.arg_names
    sig, consts = {}, {}
    for name, a in zip(names[: len(args)], args, strict=True):  # the leading parameters
        sig[name] = mangle_type(a) if not isinstance(a, float) else "fp32"
    for k, v in meta.items():
        if k in names:
            sig[k] = "constexpr"
            consts[k] = v
    src = GluonASTSource(fn, sig, consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": meta["num_warps"]})
    print("compiled; shared", k.metadata.shared, "ptx lines", k.asm["ptx"].count("\n"))


def main():
    if "--compile" in sys.argv:
        return compile_here()
    import torch.nn.functional as F
    from triton.testing import do_bench

    run_info("benchmarks/gluon_probe.py")
    torch.manual_seed(0)
    bsz, heads, steps, dim, n_slots = 8, 16, 4096, 64, 1024
    q = torch.randn(bsz, steps, heads * dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(bsz, heads, n_slots, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    qs = q.view(bsz, steps, heads, dim).transpose(1, 2)
    want = F.scaled_dot_product_attention(qs, keys, values).transpose(1, 2).reshape(bsz, steps, heads * dim)
    t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(qs, keys, values), rep=300)
    print(f"B{bsz} H{heads} T{steps} Dh{dim}, {n_slots} keys, bf16: SDPA {t_sdpa:.4f} ms")
    # kernels.memory's forward over one level: a full ring of 960 slots and the 64 the segment completes
    beta = torch.zeros(heads, 1, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((bsz,), 64 * 4096, device="cuda", dtype=torch.int64)
    fwd = lambda: memory_kernel.attend_fwd(q, keys, values, beta, pos, [960], [64], heads)  # noqa: E731
    fwd()
    t_ours = do_bench(fwd, rep=300)
    print(f"  kernels.memory forward, one level (ring 960): {t_ours:.4f} ms = {t_ours / t_sdpa:.3f}x SDPA")
    for block_t, warps, stages in ((64, 4, 3), (64, 4, 4), (128, 8, 3)):
        try:
            grid, args, out, meta = launch(q, keys, values, heads, block_t=block_t, stages=stages, num_warps=warps)
            run = lambda grid=grid, args=args, meta=meta: probe_fwd[grid](*args, **meta)  # noqa: E731
            run()
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            t = do_bench(run, rep=300)
            print(
                f"  gluon probe {block_t} x 64, {warps} warps, {stages} stages: {t:.4f} ms = {t / t_sdpa:.3f}x SDPA, "
                f"rel err vs SDPA {err:.2e}",
                flush=True,
            )
        except Exception as e:  # one line per failing config
            print(f"  gluon probe {block_t}, {warps}, {stages}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
