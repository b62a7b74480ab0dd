"""The builder DSL: model code calls ops as methods and gets operand refs back.

    b = Builder("block")
    x = b.input("x", f32("B", "T", 64))
    w = b.param("norm", (64,), init="ones")
    y = b.rmsnorm(x, w, name="u")          # -> "%u"
    q, k = b.linear(y, b.param("w", (64, 64)), splits=[32, 32])
    b.output("y", q)
    graph = b.build()                      # verified

Types are inferred as each op is added, so a shape error names the line's node at once.
"""

from __future__ import annotations

import re

from .graph import Graph, Init, Node, Param, Value, make_attrs
from .ops import OPS
from .types import DType, Shape, TensorType, Type
from .verify import infer_node, verify

_INIT = re.compile(r"^([a-z_]+)(?:\((.*)\))?$")


def parse_init(spec: str | Init) -> Init:
    if isinstance(spec, Init):
        return spec
    m = _INIT.match(spec.replace(" ", ""))
    if m is None:
        raise ValueError(f"initialiser {spec!r}: expected e.g. 'zeros', 'ones', 'normal(0.02)'")
    args = tuple(float(a) for a in m.group(2).split(",")) if m.group(2) else ()
    return Init(m.group(1), args)


class Builder:
    def __init__(self, name: str, **meta: object):
        self.name = name
        self.meta = meta
        self.inputs: list[Value] = []
        self.params: list[Param] = []
        self.nodes: list[Node] = []
        self.outputs: list[tuple[str, str]] = []
        self.types: dict[str, Type] = {}
        self._counter = 0

    def _fresh(self, hint: str | None) -> str:
        if hint is None:
            while f"%{self._counter}" in self.types:
                self._counter += 1
            return str(self._counter)
        name, n = hint, 1
        while f"%{name}" in self.types:
            name, n = f"{hint}.{n}", n + 1
        return name

    def input(self, name: str, typ: Type) -> str:
        value = Value(name, typ)
        if value.ref in self.types:
            raise ValueError(f"input %{name} declared twice")
        self.inputs.append(value)
        self.types[value.ref] = typ
        return value.ref

    def param(
        self,
        name: str,
        shape: Shape,
        init: str | Init = "normal(0.02)",
        dtype: DType = DType.f32,
    ) -> str:
        p = Param(name, TensorType(dtype, tuple(shape)), parse_init(init))
        if p.ref in self.types:
            raise ValueError(f"param @{name} declared twice")
        self.params.append(p)
        self.types[p.ref] = p.type
        return p.ref

    def op(self, opname: str, *operands: str, name: str | list[str] | None = None, **attrs: object):
        """Add one node; returns its output ref, or a tuple of refs for several outputs.

        `name` names the output (a list names each output); unnamed outputs get numbers.
        """
        attr_items = make_attrs(attrs)
        hints = list(name) if isinstance(name, list | tuple) else [name]
        label = Value(self._fresh(hints[0]), TensorType(DType.f32, ()))
        out_types = infer_node(Node(opname, tuple(operands), (label,), attr_items), self.types)
        if len(hints) == 1 and name is not None and len(out_types) > 1:
            hints = [name] + [f"{name}.{i}" for i in range(1, len(out_types))]
        if len(hints) < len(out_types):
            hints += [None] * (len(out_types) - len(hints))
        outs = []
        for hint, typ in zip(hints, out_types, strict=False):
            value = Value(self._fresh(hint), typ)
            self.types[value.ref] = typ
            outs.append(value)
        self.nodes.append(Node(opname, tuple(operands), tuple(outs), attr_items))
        refs = tuple(v.ref for v in outs)
        return refs[0] if len(refs) == 1 else refs

    def __getattr__(self, opname: str):
        if opname in OPS:
            return lambda *operands, **kw: self.op(opname, *operands, **kw)
        raise AttributeError(f"Builder has no op '{opname}' (known ops: {', '.join(sorted(OPS))})")

    def output(self, name: str, ref: str) -> None:
        self.outputs.append((name, ref))

    def build(self) -> Graph:
        graph = Graph(
            self.name,
            tuple(self.inputs),
            tuple(self.params),
            tuple(self.nodes),
            tuple(self.outputs),
            make_attrs(self.meta),
        )
        return verify(graph)
