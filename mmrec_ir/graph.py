"""The graph: SSA values, parameters, nodes. Everything here is immutable; passes build new graphs.

Operands are references: ``%name`` for a value (a graph input or a node output), ``@name`` for a
parameter. Graph outputs are named; an output whose name equals a graph input's name is that
input's next value (recurrent state carried to the next call).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from .types import TensorType, Type

AttrValue = int | float | str | bool | tuple["AttrValue", ...]


@dataclass(frozen=True)
class Value:
    name: str
    type: Type

    @property
    def ref(self) -> str:
        return "%" + self.name


@dataclass(frozen=True)
class Init:
    """How a parameter is initialised: ``zeros``, ``ones``, ``normal(std)``, ``const(c)``."""

    kind: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        if not self.args:
            return self.kind
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


@dataclass(frozen=True)
class Param:
    name: str
    type: TensorType
    init: Init

    @property
    def ref(self) -> str:
        return "@" + self.name


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, AttrValue], ...] = ()

    @property
    def attr(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @property
    def label(self) -> str:
        """How errors name this node: its first output and its op."""
        return f"{self.outputs[0].ref if self.outputs else '<no output>'} ({self.op})"


def make_attrs(attrs: Mapping[str, object]) -> tuple[tuple[str, AttrValue], ...]:
    """Canonical attribute tuple: sorted by key, lists frozen into tuples."""

    def freeze(v: object) -> AttrValue:
        if isinstance(v, list | tuple):
            return tuple(freeze(x) for x in v)
        if isinstance(v, bool | int | float | str):
            return v
        raise TypeError(f"attribute value {v!r} is not int, float, str, bool or a list of them")

    return tuple(sorted((k, freeze(v)) for k, v in attrs.items()))


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[Value, ...]
    params: tuple[Param, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, str], ...]  # (output name, operand ref)
    meta: tuple[tuple[str, AttrValue], ...] = field(default=())

    def with_nodes(self, nodes: tuple[Node, ...] | list[Node], **changes) -> Graph:
        return replace(self, nodes=tuple(nodes), **changes)

    def types(self) -> dict[str, Type]:
        """Every defined operand ref -> its type (inputs, params, node outputs)."""
        table: dict[str, Type] = {v.ref: v.type for v in self.inputs}
        table.update({p.ref: p.type for p in self.params})
        for node in self.nodes:
            table.update({o.ref: o.type for o in node.outputs})
        return table

    def producers(self) -> dict[str, Node]:
        return {o.ref: node for node in self.nodes for o in node.outputs}

    def uses(self) -> dict[str, int]:
        count: dict[str, int] = {}
        for ref in self.all_operand_refs():
            count[ref] = count.get(ref, 0) + 1
        return count

    def all_operand_refs(self) -> Iterator[str]:
        for node in self.nodes:
            yield from node.inputs
        for _, ref in self.outputs:
            yield ref

    @property
    def state_names(self) -> tuple[str, ...]:
        """Inputs that are carried state: those with an output of the same name."""
        out_names = {name for name, _ in self.outputs}
        return tuple(v.name for v in self.inputs if v.name in out_names)

    def param_count(self) -> int:
        total = 0
        for p in self.params:
            n = 1
            for d in p.type.shape:
                assert isinstance(d, int), "parameters have concrete shapes"
                n *= d
            total += n
        return total
