"""dce: dead-code elimination.

Assumes: every op is pure. A node none of whose outputs reaches a graph output is removed;
parameters that no node reads any more are removed with it (a pruned model has no orphan
weights). Graph inputs are kept: they are the calling convention.

    before: %a = exp(%x)   %b = neg(%x)   return y = %b
    after:  %b = neg(%x)   return y = %b
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Graph

from .base import Pass


@dataclass(frozen=True)
class DCE(Pass):
    name = "dce"

    def apply(self, graph: Graph) -> Graph:
        live = {ref for _, ref in graph.outputs}
        kept = []
        for node in reversed(graph.nodes):
            if any(o.ref in live for o in node.outputs):
                kept.append(node)
                live.update(node.inputs)
        params = tuple(p for p in graph.params if p.ref in live)
        return graph.with_nodes(tuple(reversed(kept)), params=params)
