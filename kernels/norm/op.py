"""`torch.ops.mmrec.add_rmsnorm_fwd/_bwd`: residual add + RMSNorm in one kernel each way.
`torch.ops.mmrec.add_rstd_fwd`: the same add with only the norm's statistics (1/rms per row),
for a GEMM that applies the norm itself (fuse-norm-prologue: rms_linear_swiglu).

CUDA runs the Triton kernels; other devices and fake tensors run the reference or its shape
rule. As with the recurrences, eager CUDA calls (and CPU tensors under TRITON_INTERPRET=1) go to
the launchers under a plain autograd.Function; torch.compile traces the custom op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import KernelInputError, launches_directly, tensor_arg
from ..config import knobs
from ..library import call, custom_op
from . import kernel, reference


def _without_sum(run, a, b, weight, eps):
    # Without b the sum is `a` itself; an op's outputs may not alias its inputs, so s comes
    # back empty and the caller keeps a.
    s, u, rstd = run(a, b, weight, eps)
    return s if b is not None else a.new_empty(0), u, rstd


@custom_op("add_rmsnorm_fwd")
def add_rmsnorm_fwd(a: Tensor, b: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (a + b, or an empty tensor without b; rmsnorm(a + b) * weight; 1/rms per row, fp32)."""
    return _without_sum(reference.add_rmsnorm, a, b, weight, eps)


@add_rmsnorm_fwd.register_kernel("cuda")
def _fwd_cuda(a, b, weight, eps):
    return _without_sum(kernel.add_rmsnorm_fwd if knobs.use_triton else reference.add_rmsnorm, a, b, weight, eps)


@add_rmsnorm_fwd.register_fake
def _fwd_fake(a, b, weight, eps):
    s = torch.empty_like(a) if b is not None else a.new_empty(0)
    return s, torch.empty_like(a), a.new_empty(a.numel() // a.shape[-1], dtype=torch.float32)


@custom_op("add_rmsnorm_bwd")
def add_rmsnorm_bwd(s: Tensor, weight: Tensor, rstd: Tensor, ds: Tensor | None, du: Tensor) -> tuple[Tensor, Tensor]:
    return reference.add_rmsnorm_backward(s, weight, rstd, ds, du)


@add_rmsnorm_bwd.register_kernel("cuda")
def _bwd_cuda(s, weight, rstd, ds, du):
    if not knobs.use_triton:
        return reference.add_rmsnorm_backward(s, weight, rstd, ds, du)
    return kernel.add_rmsnorm_bwd(s, weight, rstd, _contiguous(ds), du.contiguous())


@add_rmsnorm_bwd.register_fake
def _bwd_fake(s, weight, rstd, ds, du):
    return torch.empty_like(s), torch.empty_like(weight)


def _contiguous(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def _setup_context(ctx, inputs, output) -> None:
    a, b, weight, _eps = inputs
    ctx.save_for_backward(output[0] if b is not None else a, weight, output[2])
    ctx.has_b = b is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, ds: Tensor | None, du: Tensor | None, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if du is None:
        du = torch.zeros_like(s)
    dx, dw = torch.ops.mmrec.add_rmsnorm_bwd(s, weight, rstd, ds if ctx.has_b else None, du)
    return dx, dx if ctx.has_b else None, dw, None


add_rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _without_sum_rstd(run, a, b, eps):
    s, rstd = run(a, b, eps)
    return s if b is not None else a.new_empty(0), rstd


@custom_op("add_rstd_fwd")
def add_rstd_fwd(a: Tensor, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """-> (a + b, or an empty tensor without b; 1/rms of each row of the sum, fp32 (fp64 for fp64))."""
    return _without_sum_rstd(reference.add_rstd, a, b, eps)


@add_rstd_fwd.register_kernel("cuda")
def _rstd_cuda(a, b, eps):
    fused = knobs.use_triton and a.dtype != torch.float64  # the kernel's rstd is fp32: keep fp64's
    return _without_sum_rstd(kernel.add_rstd_fwd if fused else reference.add_rstd, a, b, eps)


@add_rstd_fwd.register_fake
def _rstd_fake(a, b, eps):
    s = torch.empty_like(a) if b is not None else a.new_empty(0)
    return s, a.new_empty(a.numel() // a.shape[-1], dtype=torch.promote_types(a.dtype, torch.float32))


def _no_rstd_gradient(drstd: Tensor | None) -> None:
    # The consumers (rms_linear_swiglu, rms_linear) differentiate through the statistics and pass
    # none back; anything else that differentiates rstd would get a wrong gradient from here.
    if drstd is not None:
        raise RuntimeError(
            "add_rstd: rstd carries no gradient (its readers, rms_linear_swiglu and rms_linear, differentiate "
            "the norm themselves); compute rstd with torch ops where its gradient is needed"
        )


def _rstd_setup_context(ctx, inputs, output) -> None:
    ctx.has_b = inputs[1] is not None
    ctx.set_materialize_grads(False)


def _rstd_backward(ctx, ds: Tensor | None, drstd: Tensor | None):
    _no_rstd_gradient(drstd)
    return (ds, ds, None) if ctx.has_b else (None, None, None)  # without b, s is the empty placeholder


add_rstd_fwd.register_autograd(_rstd_backward, setup_context=_rstd_setup_context)


class _DirectRstd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, eps):
        s, rstd = kernel.add_rstd_fwd(a, b, eps)
        ctx.has_b = b is not None
        ctx.set_materialize_grads(False)
        return (s, rstd) if b is not None else (rstd,)

    @staticmethod
    def backward(ctx, *grads):
        ds, drstd = grads if ctx.has_b else (None, grads[0])
        _no_rstd_gradient(drstd)
        return ds, ds if ctx.has_b else None, None


class _Direct(torch.autograd.Function):
    """The launchers with the op's autograd, without its dispatch (`checks.launches_directly`)."""

    @staticmethod
    def forward(ctx, a, b, weight, eps):
        s, u, rstd = kernel.add_rmsnorm_fwd(a, b, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_b = b is not None
        ctx.set_materialize_grads(False)
        return (s, u) if b is not None else (u,)

    @staticmethod
    def backward(ctx, *grads):
        s, weight, rstd = ctx.saved_tensors
        ds, du = grads if ctx.has_b else (None, grads[0])
        if du is None:
            du = torch.zeros_like(s)
        dx, dw = kernel.add_rmsnorm_bwd(s, weight, rstd, _contiguous(ds), du.contiguous())
        return dx, dx if ctx.has_b else None, dw, None


def _args(op: str, a: Tensor, b: Tensor | None, weight: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if not isinstance(a, Tensor) or a.dim() < 1:
        raise KernelInputError(f"{op}: x: expected a tensor [..., D], got {type(a).__name__}")
    a = tensor_arg(op, "x" if b is None else "lhs", a, tuple(a.shape))
    if b is not None:
        b = tensor_arg(op, "rhs", b, tuple(a.shape), like=a)
    return a, b, None if weight is None else tensor_arg(op, "weight", weight, (a.shape[-1],), like=a)


def _fused(a: Tensor) -> bool:
    """The Triton kernels (direct or through the op) where they run: CUDA, or the interpreter."""
    return launches_directly(a) or (a.is_cuda and knobs.use_triton)


def add_rmsnorm(lhs: Tensor, rhs: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(lhs + rhs, rmsnorm(lhs + rhs) * weight) in one kernel on CUDA; the reference elsewhere."""
    lhs, rhs, weight = _args("add_rmsnorm", lhs, rhs, weight)
    if not _fused(lhs):
        s = lhs + rhs
        return s, reference.rmsnorm(s, weight, eps)
    if launches_directly(lhs):
        return _Direct.apply(lhs, rhs, weight, eps)
    s, u, _ = call("add_rmsnorm_fwd", lhs, rhs, weight, eps)
    return s, u


def rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """rmsnorm(x) * weight: one kernel on CUDA; the reference elsewhere."""
    x, _, weight = _args("rmsnorm", x, None, weight)
    if not _fused(x):
        return reference.rmsnorm(x, weight, eps)
    if launches_directly(x):
        return _Direct.apply(x, None, weight, eps)[0]
    return call("add_rmsnorm_fwd", x, None, weight, eps)[1]


def add_rstd(lhs: Tensor, rhs: Tensor | None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(lhs + rhs, or lhs without rhs; rstd [...] = 1 / sqrt(mean((lhs + rhs)^2) + eps) per row,
    fp32): the residual add with only the RMSNorm's statistics, in one kernel on CUDA. rstd is
    for rms_linear_swiglu and rms_linear, which differentiate the norm themselves: a gradient
    reaching rstd is an error."""
    lhs, rhs, _ = _args("add_rstd", lhs, rhs, None)
    lead = lhs.shape[:-1]
    if launches_directly(lhs):
        *s, rstd = _DirectRstd.apply(lhs, rhs, eps)
        return (s[0] if s else lhs), rstd.view(lead)
    s, rstd = call("add_rstd_fwd", lhs, rhs, eps)
    return (s if rhs is not None else lhs), rstd.view(lead)
