"""fuse-projections: linears that read the same input become one linear over all their weights,
whose outputs are the originals' outputs (one GEMM, the input read once).

Assumes: every weight is a parameter (defined everywhere), so the fused node can take the first
linear's place in program order, before the later linears' uses; the linears agree on dtype
(the verifier makes weights match their input). The rewrite is exact up to the GEMM's own
summation order.

    before: %gate = linear(%u, @w_gate)
            %up = linear(%u, @w_up)
    after:  %gate, %up = linear(%u, @w_gate, @w_up) {splits = [384, 384]}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Node

from .rewrite import Context, RewritePass, Rule


def _sizes(node: Node, ctx: Context) -> tuple[int, ...]:
    return tuple(ctx.types[o.ref].shape[-1] for o in node.outputs)


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    x, weights = node.inputs[0], node.inputs[1:]
    if not all(w.startswith("@") for w in weights):
        return False
    group = [
        (j, other)
        for j, other in enumerate(ctx.graph.nodes[index + 1 :], start=index + 1)
        if other.op == "linear"
        and other.inputs[0] == x
        and all(w.startswith("@") for w in other.inputs[1:])
        and not ctx.touched(j)
    ]
    if not group:
        return False
    members = [node, *(other for _, other in group)]
    fused = Node(
        "linear",
        (x, *(w for m in members for w in m.inputs[1:])),
        tuple(o for m in members for o in m.outputs),
        (("splits", tuple(s for m in members for s in _sizes(m, ctx))),),
    )
    ctx.replace(index, [fused], remove=tuple(j for j, _ in group))
    return True


@dataclass(frozen=True)
class FuseProjections(RewritePass):
    name = "fuse-projections"
    rules = (Rule("linear", _fuse),)
