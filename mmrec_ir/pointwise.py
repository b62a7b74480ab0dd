"""Elementwise expressions: the body of a `pointwise` node, which fuse-elementwise makes out of a
chain of elementwise ops. The text form is the ops' own names applied to the node's inputs by
position, attributes by name, e.g. `mul(silu(%0), %1)` or `clamp(%0, min=1e-06, max=0.5)`, so it
reads like the IR it replaced and parses back. No torch here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ShapeError

UNARY = ("sigmoid", "gelu", "silu", "log", "exp", "neg")
BINARY = ("add", "sub", "mul")
ATTRS = {"clamp": ("min", "max"), "scale": ("factor",)}  # unary ops with constant attributes
ELEMENTWISE = (*UNARY, *BINARY, *ATTRS)


@dataclass(frozen=True)
class Expr:
    """`op(args..., attr=value...)`, or the leaf input `%index` (op "input")."""

    op: str
    args: tuple[Expr, ...] = ()
    attrs: tuple[tuple[str, float], ...] = ()
    index: int = -1

    def __str__(self) -> str:
        if self.op == "input":
            return f"%{self.index}"
        parts = [str(a) for a in self.args] + [f"{k}={_number(v)}" for k, v in self.attrs]
        return f"{self.op}({', '.join(parts)})"

    @property
    def ops(self) -> int:
        """How many elementwise ops the expression applies."""
        return 0 if self.op == "input" else 1 + sum(a.ops for a in self.args)

    def inputs(self) -> set[int]:
        return {self.index} if self.op == "input" else set().union(*(a.inputs() for a in self.args))


def leaf(index: int) -> Expr:
    return Expr("input", index=index)


def apply(op: str, args: tuple[Expr, ...], attrs: dict[str, object] | None = None) -> Expr:
    """`op` over `args`, checked: the op's arity and its attributes (numbers)."""
    arity = 2 if op in BINARY else 1
    if op not in ELEMENTWISE:
        raise ShapeError(f"expr: '{op}' is not an elementwise op (known: {', '.join(ELEMENTWISE)})")
    if len(args) != arity:
        raise ShapeError(f"expr: {op} takes {arity} operand{'s' if arity > 1 else ''}, got {len(args)}")
    attrs = dict(attrs or {})
    wanted = ATTRS.get(op, ())
    if set(attrs) != set(wanted):
        raise ShapeError(f"expr: {op} takes attributes ({', '.join(wanted)}), got ({', '.join(attrs)})")
    values = []
    for k in wanted:
        v = attrs[k]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ShapeError(f"expr: {op}: attribute {k} must be a number, got {v!r}")
        values.append((k, float(v)))
    if op == "clamp" and not values[0][1] <= values[1][1]:
        raise ShapeError(f"expr: clamp: min={values[0][1]} exceeds max={values[1][1]}")
    return Expr(op, tuple(args), tuple(values))


def _number(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


_TOKEN = re.compile(r"\s*(?:(%\d+)|(-?inf\b|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|([A-Za-z_]\w*)|([(),=]))")


def parse_expr(text: str) -> Expr:
    """Text -> Expr; a malformed expression is a one-line ShapeError naming what was wrong."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            pos += len(text[pos:]) - len(text[pos:].lstrip())
            raise ShapeError(f"expr: unexpected character {text[pos]!r} at {pos} in {text!r}")
        kind = ("input", "number", "name", "punct")[m.lastindex - 1]
        tokens.append((kind, m.group(m.lastindex)))
        pos = m.end()
    at = 0

    def take(kind: str, value: str | None = None) -> str:
        nonlocal at
        if at >= len(tokens) or tokens[at][0] != kind or (value is not None and tokens[at][1] != value):
            got = repr(tokens[at][1]) if at < len(tokens) else "the end"
            raise ShapeError(f"expr: expected {value or kind}, got {got} in {text!r}")
        at += 1
        return tokens[at - 1][1]

    def term() -> Expr:
        if at < len(tokens) and tokens[at][0] == "input":
            return leaf(int(take("input")[1:]))
        op = take("name")
        take("punct", "(")
        args: list[Expr] = []
        attrs: dict[str, object] = {}
        while True:
            if at + 1 < len(tokens) and tokens[at][0] == "name" and tokens[at + 1] == ("punct", "="):
                key = take("name")
                take("punct", "=")
                attrs[key] = float(take("number"))
            else:
                args.append(term())
            if at < len(tokens) and tokens[at] == ("punct", ","):
                take("punct", ",")
                continue
            take("punct", ")")
            return apply(op, tuple(args), attrs)

    expr = term()
    if at != len(tokens):
        raise ShapeError(f"expr: unexpected {tokens[at][1]!r} after a complete expression in {text!r}")
    return expr
