"""`pointwise(xs, expr)`: a fused elementwise expression (fuse-elementwise).

CUDA outside torch.compile (and CPU tensors under the interpreter): the generated Triton kernels
(kernel.py) under an autograd.Function: the forward, and a backward that reads the saved inputs
and the gradient once and writes every input's gradient. Under torch.compile: the plain ops,
which Inductor fuses into its own kernel (a custom op here would only hide them from it). CPU:
the plain ops, as unfused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmrec_ir.errors import ShapeError
from mmrec_ir.pointwise import Expr, parse_expr

from ..checks import KernelInputError, launches_directly
from . import kernel, reference

_parsed: dict[str, Expr] = {}


def _parse(expr: str) -> Expr:
    found = _parsed.get(expr)
    if found is None:
        try:
            found = parse_expr(expr)
        except ShapeError as err:
            raise KernelInputError(f"pointwise: {err}") from None
        if not torch.compiler.is_compiling():
            _parsed[expr] = found
    return found


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expr: Expr, *xs: Tensor) -> Tensor:
        ctx.expr = expr
        ctx.save_for_backward(*xs)
        return kernel.launch(expr, list(xs))

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = kernel.launch_backward(ctx.expr, list(ctx.saved_tensors), grad)
        return None, *(g if w else None for g, w in zip(grads, ctx.needs_input_grad[1:], strict=True))


def pointwise(xs: tuple[Tensor, ...] | list[Tensor], expr: str) -> Tensor:
    """The elementwise expression `expr` (inputs `%0`, `%1`, ... by position) over same-shaped,
    same-dtype tensors `xs`: one generated Triton kernel on CUDA, the plain ops elsewhere."""
    parsed = _parse(expr)
    if not xs:
        raise KernelInputError("pointwise: expected at least one input, got none")
    first = xs[0]
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor) or x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            got = f"{list(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
            raise KernelInputError(
                f"pointwise: xs[{i}]: expected {list(first.shape)} {first.dtype} on {first.device}, got {got}"
            )
    if max(parsed.inputs(), default=-1) >= len(xs):
        raise KernelInputError(f"pointwise: {expr!r} reads %{max(parsed.inputs())}, got {len(xs)} inputs")
    if not first.is_floating_point() or not launches_directly(first):
        return reference.evaluate(parsed, xs)
    return _Fused.apply(parsed, *xs)
