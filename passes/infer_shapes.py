"""infer-shapes: recompute every output type from its operands with the op type rules.

Assumes: operands are defined before use. After it, each value's declared type is the
inferred one, so a hand-edited IR whose annotations drifted is repaired, or rejected with
the node that cannot be typed.

    before: %y: f32[B, T, 7] = rmsnorm(%x, @w)      (x: f32[B, T, 64])
    after:  %y: f32[B, T, 64] = rmsnorm(%x, @w)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmrec_ir import Graph, Value
from mmrec_ir.verify import infer_node

from .base import Pass


@dataclass(frozen=True)
class InferShapes(Pass):
    name = "infer-shapes"

    def apply(self, graph: Graph) -> Graph:
        types = {v.ref: v.type for v in graph.inputs} | {p.ref: p.type for p in graph.params}
        nodes = []
        for node in graph.nodes:
            inferred = infer_node(node, types)
            outs = tuple(Value(o.name, t) for o, t in zip(node.outputs, inferred, strict=True))
            types.update({o.ref: o.type for o in outs})
            nodes.append(replace(node, outputs=outs))
        return graph.with_nodes(nodes)
