"""fuse-epilogue: a pointwise chain on a GEMM's outputs moves into the GEMM's epilogue, so the
GEMM writes the chain's result instead of its own outputs. One table row per epilogue the
kernels provide; today the SwiGLU one (kernels/linear): a linear with exactly the two outputs
gate and up (one weight each, as fuse-projections leaves the FFN's two projections), silu on
gate, times up, becomes `linear_swiglu`, one Triton GEMM that keeps both accumulators on chip.

Assumes: gate, silu(gate) and up have no other use (nothing else needs them in HBM); the
weights are parameters, so the fused node can take the linear's place. Numerics: the epilogue
works on the fp32 accumulators, so the result is the unfused one without the intermediate
roundings of gate, up and silu(gate) to the activation dtype (equal in fp32 up to summation
order).

fp32 graphs only (the model's own): in the default pipeline since the GEMM became persistent
and TMA-fed (2026-12-01, H200, 32768 tokens, D 1024 -> F 2816: the fp32/TF32 forward 1.335 ms
against 1.340 for cuBLAS over both weights plus Inductor's fused silu * product, and the whole
block under torch.compile 5.92 / 19.75 ms forward / forward+backward against 6.10 / 19.77
without). In bf16 the same benchmark measured the op at 0.886 ms against 0.678 (0.77x), but
that call ran fp32's autotuned tiles (fixed since: docs/kernels.md), so bf16 GEMMs stay
cuBLAS's until re-measured. (Before TMA the fp32 forward ran at 0.83x and the pass was opt-in.)

    before: %gate, %up = linear(%u, @w_gate, @w_up)
            %act = silu(%gate)
            %hidden = mul(%act, %up)
    after:  %hidden = linear_swiglu(%u, @w_gate, @w_up)
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import DType, Node

from .rewrite import Context, RewritePass, Rule


def _single_use(ctx: Context, *refs: str) -> bool:
    return all(ctx.uses.get(r) == 1 for r in refs)


def _swiglu(index: int, node: Node, ctx: Context) -> bool:
    for act, up in (node.inputs, node.inputs[::-1]):  # mul commutes
        silu = ctx.producer(act)
        if silu is None or silu[1].op != "silu":
            continue
        gate = silu[1].inputs[0]
        gemm, gemm_up = ctx.producer(gate), ctx.producer(up)
        if gemm is None or gemm_up is None or gemm[0] != gemm_up[0] or gate == up:
            continue
        (gemm_index, linear), silu_index = gemm, silu[0]
        weights = linear.inputs[1:]
        outs = [o.ref for o in linear.outputs]
        if (
            linear.op != "linear"
            or ctx.types[gate].dtype is not DType.f32
            or len(outs) != 2
            or len(weights) != 2
            or [ctx.types[w].shape[0] for w in weights] != [ctx.types[o].shape[-1] for o in outs]
            or not all(w.startswith("@") for w in weights)
            or not _single_use(ctx, act, gate, up)
            or ctx.touched(gemm_index, silu_index)
        ):
            continue
        fused = Node(
            "linear_swiglu", (linear.inputs[0], weights[outs.index(gate)], weights[outs.index(up)]), node.outputs
        )
        ctx.replace(gemm_index, [fused], remove=(silu_index, index))
        return True
    return False


@dataclass(frozen=True)
class FuseEpilogue(RewritePass):
    name = "fuse-epilogue"
    rules = (Rule("mul", _swiglu),)
