"""Graphviz DOT text for a graph: values flow between op boxes; nodes are grouped in one
cluster per layer (by the `layerN.` prefix of their outputs); fused ops (the products of the
fusion passes, and projections fused into one GEMM) are filled in colour, the recurrent and
memory ops drawn bold."""

from __future__ import annotations

import json
import re

from .graph import Graph, Node

_FUSED_COLOUR = {
    "add_rmsnorm": "#fde0c5",
    "add_rstd": "#fde0c5",
    "rms_stats": "#fde0c5",
    "linear": "#c9e4de",
    "linear_swiglu": "#c9e4de",
    "linear_residual": "#c9e4de",
    "rms_linear": "#c9e4de",
    "rms_linear_swiglu": "#c9e4de",
    "pointwise": "#fde0c5",
}
_RECURRENT = {"linear_scan", "gated_recurrence", "hds_query", "memory_write"}


def _quote(text: str) -> str:
    return json.dumps(text)


def layer_of(node: Node, inherited: str) -> str:
    """`layerN` for nodes named `layerN.*`; numbered (unnamed) nodes join their first operand's
    cluster; other named nodes (embedding, final norm, head) stay outside every cluster."""
    name = node.outputs[0].name if node.outputs else ""
    match = re.match(r"(layer\d+)\.", name)
    if match:
        return match.group(1)
    return inherited if name.split(".")[0].isdigit() else ""


def to_dot(graph: Graph, title: str | None = None) -> str:
    lines = [f"digraph {_quote(graph.name)} {{", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    if title:
        lines.append(f"  labelloc=t; label={_quote(title)};")
    producer: dict[str, str] = {}
    cluster_of: dict[str, str] = {}
    clusters: dict[str, list[str]] = {}
    for v in graph.inputs:
        producer[v.ref] = "in_" + re.sub(r"\W", "_", v.name)
        lines.append(f"  {producer[v.ref]} [label={_quote(f'%{v.name}: {v.type}')}, shape=ellipse];")
    for i, node in enumerate(graph.nodes):
        ident = f"n{i}"
        first = producer.get(node.inputs[0], "") if node.inputs else ""
        cluster_of[ident] = layer_of(node, cluster_of.get(first, ""))
        for out in node.outputs:
            producer[out.ref] = ident
        fused = node.op in (
            "add_rmsnorm",
            "add_rstd",
            "rms_stats",
            "linear_swiglu",
            "linear_residual",
            "rms_linear",
            "rms_linear_swiglu",
            "pointwise",
        )
        fused = fused or (node.op == "linear" and len(node.outputs) > 1)
        if fused:
            style = f'style=filled, fillcolor="{_FUSED_COLOUR[node.op]}"'
        elif node.op in _RECURRENT:
            style = 'style="filled,bold", fillcolor="#eeeeee"'
        else:
            style = 'style=filled, fillcolor="#ffffff"'
        label = node.op + "\n" + ", ".join(str(o.type) for o in node.outputs)
        clusters.setdefault(cluster_of[ident], []).append(f"{ident} [label={_quote(label)}, {style}];")
    for name, members in clusters.items():
        if name:
            lines.append(f'  subgraph cluster_{name} {{ label={_quote(name)}; style=rounded; color="#999999";')
            lines += ["    " + m for m in members]
            lines.append("  }")
        else:
            lines += ["  " + m for m in members]
    for i, node in enumerate(graph.nodes):
        for source in dict.fromkeys(producer[r] for r in node.inputs if r in producer):
            lines.append(f"  {source} -> n{i};")
    for name, ref in graph.outputs:
        out_id = "out_" + re.sub(r"\W", "_", name)
        lines.append(f"  {out_id} [label={_quote('return ' + name)}, shape=ellipse];")
        lines.append(f"  {producer.get(ref, out_id)} -> {out_id};")
    lines.append("}")
    return "\n".join(lines) + "\n"
