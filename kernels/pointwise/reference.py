"""The plain-PyTorch meaning of a `pointwise` expression: the ops one by one, exactly as the
unfused graph runs them (runtime/opset.py), so CPU results do not change when chains fuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec_ir.pointwise import Expr

_UNARY = {"sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu, "log": torch.log, "exp": torch.exp}


def evaluate(expr: Expr, xs: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    if expr.op == "input":
        return xs[expr.index]
    args = [evaluate(a, xs) for a in expr.args]
    attrs = dict(expr.attrs)
    if expr.op in _UNARY:
        return _UNARY[expr.op](args[0])
    if expr.op == "neg":
        return -args[0]
    if expr.op == "add":
        return args[0] + args[1]
    if expr.op == "sub":
        return args[0] - args[1]
    if expr.op == "mul":
        return args[0] * args[1]
    if expr.op == "scale":
        return args[0] * attrs["factor"]
    if expr.op == "clamp":
        return torch.clamp(args[0], attrs["min"], attrs["max"])
    raise ValueError(f"pointwise: no reference for op '{expr.op}'")
