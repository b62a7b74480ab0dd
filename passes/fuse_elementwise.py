"""fuse-elementwise: a chain (a tree) of elementwise ops becomes one `pointwise` node, one kernel
that reads the chain's inputs once and writes its result once; the intermediates never reach
HBM. On CUDA outside torch.compile the node runs a Triton kernel generated from its expression
(kernels/pointwise); under torch.compile it is traced as the plain ops, which Inductor fuses the
same way; on CPU it is the reference, op by op, so CPU numerics do not change.

Assumes: an intermediate is absorbed only where its one use is the next op of the chain (not a
graph output, not read twice), and every op of the chain has its output's exact type (the
elementwise ops' type rules allow no broadcasting). The fused node takes the place of the
chain's last op, where every input of the chain exists. Chains of one op stay as they are.
Runs after the passes that fuse elementwise ops into a neighbouring kernel (the decay's tail,
the residual adds, the SwiGLU epilogue), so it takes only what they leave. Numerics on CUDA: the
generated kernel computes in fp32 and rounds once to the output dtype, so in bf16 it differs
from the op-by-op chain by that chain's intermediate roundings; its backward is one generated
kernel too (reverse mode over the same expression, the saved inputs recomputed in registers).

    before: %act = silu(%gate)
            %hidden = mul(%act, %up)
    after:  %hidden = pointwise(%gate, %up) {expr = "mul(silu(%0), %1)"}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Graph, Node
from mmrec_ir.graph import make_attrs
from mmrec_ir.pointwise import ELEMENTWISE, Expr, apply, leaf

from .base import Pass


def _number(tree, order: dict[str, int]) -> Expr:
    """A tree of (op, args, attrs) with refs as leaves -> Expr, inputs numbered by first use."""
    if isinstance(tree, str):
        return leaf(order.setdefault(tree, len(order)))
    op, args, attrs = tree
    return apply(op, tuple(_number(a, order) for a in args), attrs)


def _count(tree) -> int:
    return 0 if isinstance(tree, str) else 1 + sum(_count(a) for a in tree[1])


@dataclass(frozen=True)
class FuseElementwise(Pass):
    name = "fuse-elementwise"

    def apply(self, graph: Graph) -> Graph:
        types, uses = graph.types(), graph.uses()
        trees: dict[str, tuple] = {}  # elementwise output -> (op, args, attrs), refs at the leaves
        absorbed: set[str] = set()
        for node in graph.nodes:
            if node.op not in ELEMENTWISE or len(node.outputs) != 1:
                continue
            out = node.outputs[0].ref
            args = []
            for ref in node.inputs:
                inline = ref in trees and uses.get(ref) == 1 and types[ref] == types[out]
                args.append(trees[ref] if inline else ref)
                if inline:
                    absorbed.add(ref)
            trees[out] = (node.op, tuple(args), node.attr)
        nodes: list[Node] = []
        for node in graph.nodes:
            ref = node.outputs[0].ref if node.outputs else None
            if ref in absorbed:
                continue
            tree = trees.get(ref)
            if tree is None or _count(tree) < 2:
                nodes.append(node)
                continue
            order: dict[str, int] = {}
            expr = _number(tree, order)
            attrs = make_attrs({"expr": str(expr)})
            nodes.append(Node("pointwise", tuple(order), node.outputs, attrs))
        return graph.with_nodes(nodes)
