"""JSON save/load of graphs. Types and initialisers are stored in their IR text spelling."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ParseError
from .graph import Graph, Node, Param, Value, make_attrs
from .parser import _attr_value, _init, _Lexer, _type
from .printer import format_attr

FORMAT = "mmrec-ir/1"


def _parse_with(fn, text: str, where: str):
    lx = _Lexer(text)
    try:
        out = fn(lx)
        if lx.peek()[0] != "eof":
            raise lx.fail("unexpected trailing text")
    except ParseError as err:
        raise ParseError(f"{where}: {err}") from None
    return out


def to_json(graph: Graph) -> dict:
    return {
        "format": FORMAT,
        "name": graph.name,
        "meta": {k: format_attr(v) for k, v in graph.meta},
        "inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
        "params": [{"name": p.name, "type": str(p.type), "init": str(p.init)} for p in graph.params],
        "nodes": [
            {
                "op": n.op,
                "inputs": list(n.inputs),
                "outputs": [{"name": o.name, "type": str(o.type)} for o in n.outputs],
                "attrs": {k: format_attr(v) for k, v in n.attrs},
            }
            for n in graph.nodes
        ],
        "outputs": [{"name": name, "ref": ref} for name, ref in graph.outputs],
    }


def from_json(data: dict) -> Graph:
    if data.get("format") != FORMAT:
        raise ParseError(f"JSON graph: expected format {FORMAT!r}, got {data.get('format')!r}")

    def values(items: list[dict], where: str) -> tuple[Value, ...]:
        return tuple(Value(i["name"], _parse_with(_type, i["type"], f"{where} %{i['name']}")) for i in items)

    def attrs(items: dict, where: str):
        return make_attrs({k: _parse_with(_attr_value, v, f"{where} attribute {k}") for k, v in items.items()})

    params = tuple(
        Param(
            p["name"],
            _parse_with(_type, p["type"], f"param @{p['name']}"),
            _parse_with(_init, p["init"], f"param @{p['name']}"),
        )
        for p in data["params"]
    )
    nodes = tuple(
        Node(n["op"], tuple(n["inputs"]), values(n["outputs"], "node"), attrs(n["attrs"], f"node {n['op']}"))
        for n in data["nodes"]
    )
    return Graph(
        data["name"],
        values(data["inputs"], "input"),
        params,
        nodes,
        tuple((o["name"], o["ref"]) for o in data["outputs"]),
        attrs(data.get("meta", {}), "graph"),
    )


def save_json(graph: Graph, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(graph), indent=1) + "\n")


def load_json(path: str | Path) -> Graph:
    return from_json(json.loads(Path(path).read_text()))
