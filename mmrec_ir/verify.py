"""The verifier: SSA well-formedness, known ops and attributes, and type inference.

Every error is one line: ``node %name (op): what, expected ..., got ...``.
"""

from __future__ import annotations

from .errors import ShapeError, VerifyError
from .graph import Graph, Node
from .ops import ANNOTATIONS, OPS, REQUIRED
from .types import Type


def infer_node(node: Node, types: dict[str, Type]) -> list[Type]:
    """Output types of `node` given the types of defined refs; raises VerifyError."""
    opdef = OPS.get(node.op)
    if opdef is None:
        raise VerifyError(f"node {node.label}: unknown op '{node.op}'")
    for ref in node.inputs:
        if ref not in types:
            raise VerifyError(f"node {node.label}: operand {ref} is not defined before use")
    attrs = node.attr
    for key in attrs:
        if key not in opdef.attrs and key not in ANNOTATIONS:
            known = ", ".join(opdef.attrs) or "none"
            raise VerifyError(f"node {node.label}: unknown attribute '{key}' (known: {known})")
    for key, default in opdef.attrs.items():
        if default is REQUIRED and key not in attrs:
            raise VerifyError(f"node {node.label}: missing required attribute '{key}'")
    try:
        return opdef.infer([types[r] for r in node.inputs], attrs)
    except ShapeError as err:
        raise VerifyError(f"node {node.label}: {err}") from None


def verify(graph: Graph) -> Graph:
    """Check `graph`; return it unchanged so calls chain. Raises VerifyError on the first problem."""
    types: dict[str, Type] = {}

    def define(ref: str, typ: Type, where: str) -> None:
        if ref in types:
            raise VerifyError(f"{where}: {ref} is defined twice (SSA values are assigned once)")
        types[ref] = typ

    for value in graph.inputs:
        define(value.ref, value.type, f"input {value.ref}")
    for param in graph.params:
        for d in param.type.shape:
            if not isinstance(d, int) or d <= 0:
                raise VerifyError(
                    f"param {param.ref}: shapes of parameters must be positive integers, got {param.type}"
                )
        define(param.ref, param.type, f"param {param.ref}")
    for node in graph.nodes:
        inferred = infer_node(node, types)
        if len(inferred) != len(node.outputs):
            raise VerifyError(f"node {node.label}: expected {len(inferred)} outputs, got {len(node.outputs)}")
        for out, typ in zip(node.outputs, inferred, strict=True):
            if out.type != typ:
                raise VerifyError(f"node {node.label}: output {out.ref} expected {typ}, got {out.type}")
            define(out.ref, out.type, f"node {node.label}")

    seen: set[str] = set()
    for name, ref in graph.outputs:
        if name in seen:
            raise VerifyError(f"output '{name}' is returned twice")
        seen.add(name)
        if ref not in types:
            raise VerifyError(f"output '{name}': {ref} is not defined")
    inputs = {v.name: v for v in graph.inputs}
    for name, ref in graph.outputs:
        if name in inputs and types[ref] != inputs[name].type:
            raise VerifyError(
                f"output '{name}' is the next value of input %{name}: expected {inputs[name].type}, got {types[ref]}"
            )
    return graph
