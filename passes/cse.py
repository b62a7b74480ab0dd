"""cse: common-subexpression elimination.

Assumes: every op is pure (MM-Rec ops have no side effects; state flows through values).
Two nodes with the same op, operands and attributes compute the same outputs, so the
later one is dropped and its uses read the earlier one's outputs.

    before: %a = sigmoid(%x)   %b = sigmoid(%x)   %c = mul(%a, %b)
    after:  %a = sigmoid(%x)   %c = mul(%a, %a)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmrec_ir import Graph

from .base import Pass, rename_refs


@dataclass(frozen=True)
class CSE(Pass):
    name = "cse"

    def apply(self, graph: Graph) -> Graph:
        seen: dict[tuple, tuple[str, ...]] = {}
        mapping: dict[str, str] = {}
        nodes = []
        for node in graph.nodes:
            node = replace(node, inputs=rename_refs(node.inputs, mapping))
            key = (node.op, node.inputs, node.attrs, tuple(o.type for o in node.outputs))
            if key in seen:
                mapping.update(zip((o.ref for o in node.outputs), seen[key], strict=True))
                continue
            seen[key] = tuple(o.ref for o in node.outputs)
            nodes.append(node)
        outputs = tuple((name, mapping.get(ref, ref)) for name, ref in graph.outputs)
        return graph.with_nodes(nodes, outputs=outputs)
