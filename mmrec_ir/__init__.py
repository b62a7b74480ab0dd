"""The MM-Rec op-graph IR: types, graph, op set, verifier, text form, builder DSL. No torch here."""

from .builder import Builder
from .errors import IRError, ParseError, VerifyError
from .graph import Graph, Init, Node, Param, Value
from .ops import OPS
from .parser import parse
from .printer import print_graph, print_python
from .serialize import from_json, load_json, save_json, to_json
from .types import DType, MemoryType, TensorType, f32, i64
from .verify import verify

__all__ = [
    "OPS",
    "Builder",
    "DType",
    "Graph",
    "IRError",
    "Init",
    "MemoryType",
    "Node",
    "Param",
    "ParseError",
    "TensorType",
    "Value",
    "VerifyError",
    "f32",
    "from_json",
    "i64",
    "load_json",
    "parse",
    "print_graph",
    "print_python",
    "save_json",
    "to_json",
    "verify",
]
