"""Parse the text form written by printer.print_graph back into a Graph."""

from __future__ import annotations

import json
import re

from .errors import ParseError
from .graph import AttrValue, Graph, Init, Node, Param, Value, make_attrs
from .types import DType, MemoryType, TensorType, Type

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<param>@[A-Za-z0-9_.]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|-?inf\b|nan\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\]{},:=])
    """,
    re.VERBOSE,
)


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ParseError(f"{self.where(pos)}: unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.tokens.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.i = 0

    def where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {col}"

    def peek(self) -> tuple[str, str, int]:
        if self.i < len(self.tokens):
            return self.tokens[self.i]
        return ("eof", "<end of text>", len(self.text))

    def next(self, kind: str | None = None, text: str | None = None) -> str:
        tkind, ttext, pos = self.peek()
        if (kind and tkind != kind) or (text and ttext != text):
            want = repr(text) if text else kind
            raise ParseError(f"{self.where(pos)}: expected {want}, got {ttext!r}")
        self.i += 1
        return ttext

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] != "string":
            self.i += 1
            return True
        return False

    def fail(self, message: str) -> ParseError:
        return ParseError(f"{self.where(self.peek()[2])}: {message}")


def _number(text: str) -> int | float:
    if text in ("inf", "-inf", "nan"):
        return float(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return float(text)


def _attr_value(lx: _Lexer) -> AttrValue:
    kind, text, _ = lx.peek()
    if kind == "number":
        lx.next()
        return _number(text)
    if kind == "string":
        lx.next()
        return json.loads(text)
    if kind == "ident" and text in ("true", "false"):
        lx.next()
        return text == "true"
    if lx.accept("["):
        items: list[AttrValue] = []
        while not lx.accept("]"):
            if items:
                lx.next("punct", ",")
            items.append(_attr_value(lx))
        return tuple(items)
    raise lx.fail(f"expected an attribute value, got {text!r}")


def _attr_dict(lx: _Lexer) -> dict[str, AttrValue]:
    lx.next("punct", "{")
    out: dict[str, AttrValue] = {}
    while not lx.accept("}"):
        if out:
            lx.next("punct", ",")
        key = lx.next("ident")
        lx.next("punct", "=")
        if key in out:
            raise lx.fail(f"attribute '{key}' given twice")
        out[key] = _attr_value(lx)
    return out


def _type(lx: _Lexer) -> Type:
    name = lx.next("ident")
    if name == "memory":
        fields = _attr_dict(lx)
        try:
            mem = MemoryType(**fields)  # type: ignore[arg-type]
        except TypeError:
            raise lx.fail(f"memory type takes heads, dim, block, ratio, slots; got {sorted(fields)}") from None
        return MemoryType(mem.heads, mem.dim, mem.block, mem.ratio, tuple(mem.slots))
    try:
        dtype = DType(name)
    except ValueError:
        raise lx.fail(f"unknown dtype '{name}' (expected one of {[d.value for d in DType]})") from None
    lx.next("punct", "[")
    dims: list[int | str] = []
    while not lx.accept("]"):
        if dims:
            lx.next("punct", ",")
        kind, text, _ = lx.peek()
        if kind == "number" and re.fullmatch(r"\d+", text):
            dims.append(int(lx.next()))
        elif kind == "ident":
            dims.append(lx.next())
        else:
            raise lx.fail(f"expected a dimension (integer or symbol), got {text!r}")
    return TensorType(dtype, tuple(dims))


def _init(lx: _Lexer) -> Init:
    kind = lx.next("ident")
    args: list[float] = []
    if lx.accept("("):
        while not lx.accept(")"):
            if args:
                lx.next("punct", ",")
            args.append(float(_number(lx.next("number"))))
    return Init(kind, tuple(args))


def parse(text: str) -> Graph:
    """Parse IR text; raises ParseError naming line and column. Does not verify."""
    lx = _Lexer(text)
    lx.next("ident", "graph")
    name = lx.next("param")[1:]
    lx.next("punct", "(")
    inputs: list[Value] = []
    while not lx.accept(")"):
        if inputs:
            lx.next("punct", ",")
        ref = lx.next("value")
        lx.next("punct", ":")
        inputs.append(Value(ref[1:], _type(lx)))
    meta: dict[str, AttrValue] = {}
    if lx.accept("attributes"):
        meta = _attr_dict(lx)
    lx.next("punct", "{")
    params: list[Param] = []
    nodes: list[Node] = []
    outputs: list[tuple[str, str]] = []
    while True:
        kind, text, _ = lx.peek()
        if kind == "ident" and text == "param":
            lx.next()
            ref = lx.next("param")
            lx.next("punct", ":")
            typ = _type(lx)
            if not isinstance(typ, TensorType):
                raise lx.fail(f"param {ref} must have a tensor type")
            lx.next("punct", "=")
            params.append(Param(ref[1:], typ, _init(lx)))
        elif kind == "value":
            outs: list[Value] = []
            while True:
                ref = lx.next("value")
                lx.next("punct", ":")
                outs.append(Value(ref[1:], _type(lx)))
                if not lx.accept(","):
                    break
            lx.next("punct", "=")
            op = lx.next("ident")
            lx.next("punct", "(")
            args: list[str] = []
            while not lx.accept(")"):
                if args:
                    lx.next("punct", ",")
                k, t, _ = lx.peek()
                if k not in ("value", "param"):
                    raise lx.fail(f"expected an operand (%value or @param), got {t!r}")
                args.append(lx.next())
            attrs = _attr_dict(lx) if lx.peek()[1] == "{" else {}
            nodes.append(Node(op, tuple(args), tuple(outs), make_attrs(attrs)))
        elif kind == "ident" and text == "return":
            lx.next()
            while lx.peek()[0] == "ident":
                out_name = lx.next("ident")
                lx.next("punct", "=")
                outputs.append((out_name, lx.next("value")))
                if not lx.accept(","):
                    break
            lx.next("punct", "}")
            break
        else:
            raise lx.fail(f"expected 'param', a node, or 'return', got {text!r}")
    if lx.peek()[0] != "eof":
        raise lx.fail("unexpected text after the graph")
    return Graph(name, tuple(inputs), tuple(params), tuple(nodes), tuple(outputs), make_attrs(meta))
