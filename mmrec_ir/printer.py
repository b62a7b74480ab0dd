"""The canonical text form of a graph. ``parse(print_graph(g)) == g`` holds for every graph.

graph @name(%tokens: i64[B, T], %h.0: f32[B, 64]) attributes {config = "tiny"} {
  param @embed: f32[256, 64] = normal(0.02)
  %x: f32[B, T, 64] = embedding(%tokens, @embed)
  %q: f32[B, T, 32], %k: f32[B, T, 32] = linear(%x, @w) {splits = [32, 32]}
  return logits = %y, h.0 = %h
}
"""

from __future__ import annotations

import json
import re

from .graph import AttrValue, Graph, Node
from .ops import ANNOTATIONS, OPS, REQUIRED


def format_attr(value: AttrValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(format_attr(v) for v in value) + "]"


def format_attrs(attrs: tuple[tuple[str, AttrValue], ...]) -> str:
    return "{" + ", ".join(f"{k} = {format_attr(v)}" for k, v in attrs) + "}"


def format_node(node: Node) -> str:
    outs = ", ".join(f"{o.ref}: {o.type}" for o in node.outputs)
    text = f"{outs} = {node.op}({', '.join(node.inputs)})"
    if node.attrs:
        text += " " + format_attrs(node.attrs)
    return text


def print_graph(graph: Graph) -> str:
    args = ", ".join(f"{v.ref}: {v.type}" for v in graph.inputs)
    head = f"graph @{graph.name}({args})"
    if graph.meta:
        head += " attributes " + format_attrs(graph.meta)
    lines = [head + " {"]
    lines += [f"  param {p.ref}: {p.type} = {p.init}" for p in graph.params]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append("  return " + ", ".join(f"{name} = {ref}" for name, ref in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_python(graph: Graph) -> str:
    """The graph as straight-line Python over op implementations (what the runtime executes)."""
    names: dict[str, str] = {}

    def py(ref: str) -> str:
        if ref not in names:
            base = ("p_" if ref.startswith("@") else "v_") + re.sub(r"\W", "_", ref[1:])
            name, n = base, 1
            while name in names.values():
                name, n = f"{base}_{n}", n + 1
            names[ref] = name
        return names[ref]

    lines = [f"def {graph.name}({', '.join(py(v.ref) for v in graph.inputs)}, params, ops):"]
    for p in graph.params:
        lines.append(f"    {py(p.ref)} = params[{p.name!r}]")
    for node in graph.nodes:
        # A trailing comma unpacks the 1-tuple that every op implementation returns.
        outs = ", ".join(py(o.ref) for o in node.outputs) + ("," if len(node.outputs) == 1 else "")
        # Defaults are spelled out, so the implementation sees every attribute.
        attrs = {k: v for k, v in OPS[node.op].attrs.items() if v is not REQUIRED} | node.attr
        attrs = {k: v for k, v in attrs.items() if k not in ANNOTATIONS}  # not the op's to see
        args = [py(r) for r in node.inputs] + [f"{k}={v!r}" for k, v in sorted(attrs.items())]
        lines.append(f"    {outs} = ops.{node.op}({', '.join(args)})")
    result = ", ".join(f"{name!r}: {py(ref)}" for name, ref in graph.outputs)
    lines.append(f"    return {{{result}}}")
    return "\n".join(lines) + "\n"
