"""Local rewrites as declarative tables of rules: each rule names the op it matches and a
function that, given the node and a context, either declines (returns False) or records a
replacement. Replacements define the matched node's output names again (same types), so the
rest of the graph needs no renaming; a rule may also absorb the producer of an operand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from mmrec_ir import Graph, Node, Value

from .base import Pass


class Context:
    """What a rule may look at (producers, use counts) and the edits it records."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.index = {o.ref: i for i, n in enumerate(graph.nodes) for o in n.outputs}
        self.uses = graph.uses()
        self.types = graph.types()
        self.taken = set(self.types) | {"%" + v.name for v in graph.inputs}
        self.replacements: dict[int, list[Node]] = {}
        self.removed: set[int] = set()

    def producer(self, ref: str) -> tuple[int, Node] | None:
        i = self.index.get(ref)
        return None if i is None else (i, self.graph.nodes[i])

    def fresh(self, hint: str) -> str:
        name, n = hint, 1
        while "%" + name in self.taken:
            name, n = f"{hint}.{n}", n + 1
        self.taken.add("%" + name)
        return name

    def value(self, hint: str, like: str) -> Value:
        """A new SSA value named after `hint`, typed like the existing ref `like`."""
        return Value(self.fresh(hint), self.types[like])

    def touched(self, *indices: int) -> bool:
        return any(i in self.replacements or i in self.removed for i in indices)

    def replace(self, index: int, nodes: list[Node], remove: tuple[int, ...] = ()) -> None:
        self.replacements[index] = nodes
        self.removed.update(remove)


@dataclass(frozen=True)
class Rule:
    op: str
    rewrite: Callable[[int, Node, Context], bool]


class RewritePass(Pass):
    """Apply the first matching rule of `rules` to each node, once, in program order."""

    rules: ClassVar[tuple[Rule, ...]] = ()

    def apply(self, graph: Graph) -> Graph:
        ctx = Context(graph)
        for i, node in enumerate(graph.nodes):
            if ctx.touched(i):
                continue
            for rule in self.rules:
                if rule.op == node.op and rule.rewrite(i, node, ctx):
                    break
        nodes: list[Node] = []
        for i, node in enumerate(graph.nodes):
            if i in ctx.removed:
                continue
            nodes.extend(ctx.replacements.get(i, [node]))
        return graph.with_nodes(nodes)
