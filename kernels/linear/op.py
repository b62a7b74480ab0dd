"""`torch.ops.mmrec.linear_swiglu_fwd`: the GEMM with the SwiGLU epilogue (kernel.py).

CUDA runs the Triton kernel; other devices and fake tensors run the reference or its shape
rule. The forward saves g and u (the pre-activations) only when a gradient is needed; the
backward is the pointwise derivative and two GEMMs in PyTorch (reference.py), so under
torch.compile Inductor sees and fuses it. Eager CUDA calls and the interpreter launch the kernel
directly under an autograd.Function, as the other ops do, and their backward's pointwise part is
one Triton kernel (kernel.swiglu_grad).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import KernelInputError, launches_directly, tensor_arg
from ..config import knobs
from ..library import call, custom_op
from ..norm import kernel as norm_kernel
from ..norm.op import add_rstd
from . import gemm, kernel, reference


def _reference(x: Tensor, w_gate: Tensor, w_up: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, g, u = reference.linear_swiglu(x, w_gate, w_up)
    return (out, g, u) if save else (out, x.new_empty(0), x.new_empty(0))


@custom_op("linear_swiglu_fwd")
def linear_swiglu_fwd(x: Tensor, w_gate: Tensor, w_up: Tensor, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D], w_gate/w_up [F, D] -> (silu(x w_gate^T) * (x w_up^T), and with `save` the two
    pre-activations g, u [N, F]; otherwise two empty tensors)."""
    return _reference(x, w_gate, w_up, save)


@linear_swiglu_fwd.register_kernel("cuda")
def _fwd_cuda(x, w_gate, w_up, save):
    if not knobs.use_triton:
        return _reference(x, w_gate, w_up, save)
    return kernel.linear_swiglu_fwd(x, w_gate, w_up, save)


@linear_swiglu_fwd.register_fake
def _fwd_fake(x, w_gate, w_up, save):
    shape = (x.shape[0], w_gate.shape[0])
    saved = (x.new_empty(shape), x.new_empty(shape)) if save else (x.new_empty(0), x.new_empty(0))
    return (x.new_empty(shape), *saved)


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate, w_up, save = inputs
    if not save:
        raise RuntimeError("mmrec::linear_swiglu_fwd was called with save=False where a gradient is needed")
    ctx.save_for_backward(x, w_gate, w_up, output[1], output[2])


def _backward(ctx, dout: Tensor, _dg, _du):
    return (*reference.linear_swiglu_backward(*ctx.saved_tensors, dout), None)


linear_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The launcher with the op's autograd, without its dispatch (`checks.launches_directly`)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up):
        save = any(ctx.needs_input_grad)
        out, g, u = kernel.linear_swiglu_fwd(x, w_gate, w_up, save)
        if save:
            ctx.save_for_backward(x, w_gate, w_up, g, u)
        return out

    @staticmethod
    def backward(ctx, dout):
        return reference.linear_swiglu_backward(*ctx.saved_tensors, dout, grad=kernel.swiglu_grad)


def _rows_and_weights(op: str, x: Tensor, w_gate: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The entry points' checks: x [..., D] as contiguous rows [N, D], w_gate and w_up [F, D]."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise KernelInputError(f"{op}: x: expected a tensor [..., D], got {type(x).__name__}")
    width = x.shape[-1]
    if not isinstance(w_gate, Tensor) or w_gate.dim() != 2:
        raise KernelInputError(f"{op}: w_gate: expected [F, {width}], got {getattr(w_gate, 'shape', None)}")
    w_gate = tensor_arg(op, "w_gate", w_gate, (w_gate.shape[0], width), like=x)
    w_up = tensor_arg(op, "w_up", w_up, tuple(w_gate.shape), like=x)
    rows = tensor_arg(op, "x", x, tuple(x.shape)).reshape(math.prod(x.shape[:-1]), width)
    return rows, w_gate, w_up


def linear_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T) for x [..., D], w_gate/w_up [F, D] -> [..., F]: one
    Triton GEMM with the epilogue on CUDA (and under the interpreter), the reference elsewhere."""
    rows, w_gate, w_up = _rows_and_weights("linear_swiglu", x, w_gate, w_up)
    lead = x.shape[:-1]
    if launches_directly(rows):
        return _Direct.apply(rows, w_gate, w_up).view(*lead, -1)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w_gate, w_up))
    return call("linear_swiglu_fwd", rows, w_gate, w_up, save)[0].view(*lead, -1)


def _rms_reference(x, rstd, w_norm, w_gate, w_up, save):
    out, g, u = reference.rms_linear_swiglu(x, rstd, w_norm, w_gate, w_up)
    return (out, g, u) if save else (out, x.new_empty(0), x.new_empty(0))


@custom_op("rms_linear_swiglu_fwd")
def rms_linear_swiglu_fwd(
    x: Tensor, rstd: Tensor, w_norm: Tensor, w_gate: Tensor, w_up: Tensor, save: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """linear_swiglu_fwd of rmsnorm(x, w_norm), the norm applied inside the GEMM; rstd [N] is
    1/rms of each row of x (add_rstd's). Its gradient flows to x through the op's backward,
    which differentiates the whole norm: rstd itself gets none."""
    return _rms_reference(x, rstd, w_norm, w_gate, w_up, save)


@rms_linear_swiglu_fwd.register_kernel("cuda")
def _rms_fwd_cuda(x, rstd, w_norm, w_gate, w_up, save):
    if not knobs.use_triton:
        return _rms_reference(x, rstd, w_norm, w_gate, w_up, save)
    return kernel.linear_swiglu_fwd(x, w_gate, w_up, save, w_norm, rstd)


@rms_linear_swiglu_fwd.register_fake
def _rms_fwd_fake(x, rstd, w_norm, w_gate, w_up, save):
    return _fwd_fake(x, w_gate, w_up, save)


def _rms_setup_context(ctx, inputs, output) -> None:
    x, rstd, w_norm, w_gate, w_up, save = inputs
    if not save:
        raise RuntimeError("mmrec::rms_linear_swiglu_fwd was called with save=False where a gradient is needed")
    ctx.save_for_backward(x, rstd, w_norm, w_gate, w_up, output[1], output[2])


def _rms_backward(ctx, dout: Tensor, _dg, _du):
    dx, dw_norm, dw_gate, dw_up = reference.rms_linear_swiglu_backward(*ctx.saved_tensors, dout)
    return dx, None, dw_norm, dw_gate, dw_up, None


rms_linear_swiglu_fwd.register_autograd(_rms_backward, setup_context=_rms_setup_context)


def _norm_grad(x: Tensor, w_norm: Tensor, rstd: Tensor, _ds: None, dn: Tensor) -> tuple[Tensor, Tensor]:
    """The eager launchers' RMSNorm backward: kernels/norm's Triton kernel (fp64 and no rows: the
    reference; the kernel computes in fp32). Under torch.compile the op's backward leaves the plain ops
    (reference.rmsnorm_backward) to Inductor."""
    if x.dtype == torch.float64 or x.shape[0] == 0:
        return reference.rmsnorm_backward(x, w_norm, rstd, None, dn)
    return norm_kernel.add_rmsnorm_bwd(x, w_norm, rstd.float(), None, dn.contiguous())


class _DirectRms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rstd, w_norm, w_gate, w_up):
        save = any(ctx.needs_input_grad)
        out, g, u = kernel.linear_swiglu_fwd(x, w_gate, w_up, save, w_norm, rstd)
        if save:
            ctx.save_for_backward(x, rstd, w_norm, w_gate, w_up, g, u)
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, dw_norm, dw_gate, dw_up = reference.rms_linear_swiglu_backward(
            *ctx.saved_tensors, dout.contiguous(), grad=kernel.swiglu_grad, norm_grad=_norm_grad
        )
        return dx, None, dw_norm, dw_gate, dw_up


def rms_linear_swiglu(
    x: Tensor, w_norm: Tensor, w_gate: Tensor, w_up: Tensor, eps: float = 1e-6, rstd: Tensor | None = None
) -> Tensor:
    """linear_swiglu(rmsnorm(x, w_norm, eps), w_gate, w_up) for x [..., D]: on CUDA (and under the
    interpreter) one Triton GEMM that applies the norm in its epilogue, so the normalised x is
    never written; the reference elsewhere. `rstd` [...]: the rows' 1/rms as add_rstd gave them
    with the sum that is x (eps is then add_rstd's); without it, add_rstd computes them here
    (one read of x)."""
    rows, w_gate, w_up = _rows_and_weights("rms_linear_swiglu", x, w_gate, w_up)
    w_norm = tensor_arg("rms_linear_swiglu", "w_norm", w_norm, (rows.shape[1],), like=x)
    lead = x.shape[:-1]
    rstd = _rstd("rms_linear_swiglu", x, rstd, eps)
    if launches_directly(rows):
        return _DirectRms.apply(rows, rstd, w_norm, w_gate, w_up).view(*lead, -1)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w_norm, w_gate, w_up))
    return call("rms_linear_swiglu_fwd", rows, rstd, w_norm, w_gate, w_up, save)[0].view(*lead, -1)


# `torch.ops.mmrec.linear_residual_fwd` and `rms_linear_fwd`: the plain GEMM (gemm.py) with the
# residual add, or the RMSNorm, in its epilogue. Backwards in PyTorch (cuBLAS GEMMs).


@custom_op("linear_residual_fwd")
def linear_residual_fwd(x: Tensor, w: Tensor, res: Tensor) -> Tensor:
    """x [N, D], w [F, D], res [N, F] -> res + x w^T (products and sum in fp32, rounded once)."""
    return reference.linear_epilogue(x, w, res)


@linear_residual_fwd.register_kernel("cuda")
def _residual_cuda(x, w, res):
    return gemm.linear_fwd(x, w, res) if knobs.use_triton else reference.linear_epilogue(x, w, res)


@linear_residual_fwd.register_fake
def _residual_fake(x, w, res):
    return x.new_empty(x.shape[0], w.shape[0])


def _residual_setup_context(ctx, inputs, output) -> None:
    x, w, _res = inputs
    ctx.save_for_backward(x, w)


def _residual_backward(ctx, dout: Tensor):
    dx, dw, _ = reference.linear_epilogue_backward(*ctx.saved_tensors, dout)
    return dx, dw, dout


linear_residual_fwd.register_autograd(_residual_backward, setup_context=_residual_setup_context)


class _DirectResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, res):
        ctx.save_for_backward(x, w)
        return gemm.linear_fwd(x, w, res)

    @staticmethod
    def backward(ctx, dout):
        dx, dw, _ = reference.linear_epilogue_backward(*ctx.saved_tensors, dout)
        return dx, dw, dout


@custom_op("rms_linear_fwd")
def rms_linear_fwd(x: Tensor, rstd: Tensor, w_norm: Tensor, w: Tensor) -> Tensor:
    """rmsnorm(x, w_norm) w^T for x [N, D] with its rows' 1/rms given (rstd [N], add_rstd's),
    w [F, D]. Its backward differentiates the whole norm (through rstd): rstd gets no gradient."""
    return reference.linear_epilogue(x, w, None, w_norm, rstd)


@rms_linear_fwd.register_kernel("cuda")
def _rms_linear_cuda(x, rstd, w_norm, w):
    if not knobs.use_triton:
        return reference.linear_epilogue(x, w, None, w_norm, rstd)
    return gemm.linear_fwd(x, w, None, w_norm, rstd)


@rms_linear_fwd.register_fake
def _rms_linear_fake(x, rstd, w_norm, w):
    return x.new_empty(x.shape[0], w.shape[0])


def _rms_linear_setup_context(ctx, inputs, output) -> None:
    x, rstd, w_norm, w = inputs
    ctx.save_for_backward(x, rstd, w_norm, w)


def _rms_linear_backward(ctx, dout: Tensor):
    x, rstd, w_norm, w = ctx.saved_tensors
    dx, dw, dw_norm = reference.linear_epilogue_backward(x, w, dout, w_norm, rstd)
    return dx, None, dw_norm, dw


rms_linear_fwd.register_autograd(_rms_linear_backward, setup_context=_rms_linear_setup_context)


class _DirectRmsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rstd, w_norm, w):
        ctx.save_for_backward(x, rstd, w_norm, w)
        return gemm.linear_fwd(x, w, None, w_norm, rstd)

    @staticmethod
    def backward(ctx, dout):
        x, rstd, w_norm, w = ctx.saved_tensors
        dx, dw, dw_norm = reference.linear_epilogue_backward(x, w, dout.contiguous(), w_norm, rstd, _norm_grad)
        return dx, None, dw_norm, dw


def rms_linear(x: Tensor, w_norm: Tensor, w: Tensor, eps: float = 1e-6, rstd: Tensor | None = None) -> Tensor:
    """rmsnorm(x, w_norm, eps) @ w^T for x [..., D], w [F, D] -> [..., F]: on CUDA (and under the
    interpreter) one Triton GEMM that applies the norm in its epilogue (w_norm folded into a copy
    of w), so the normalised x is never written; the reference elsewhere. `rstd` [...]: the rows'
    1/rms from the add_rstd that made x; without it add_rstd computes them here (one read of x)."""
    op = "rms_linear"
    rows, lead = _rows(op, x)
    w = _weight(op, "w", w, rows)
    w_norm = tensor_arg(op, "w_norm", w_norm, (rows.shape[1],), like=x)
    rstd = _rstd(op, x, rstd, eps)
    if launches_directly(rows):
        return _DirectRmsLinear.apply(rows, rstd, w_norm, w).view(*lead, -1)
    return call("rms_linear_fwd", rows, rstd, w_norm, w).view(*lead, -1)


def _rows(op: str, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """x [..., D] as contiguous rows [N, D], and its leading shape."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise KernelInputError(f"{op}: x: expected a tensor [..., D], got {type(x).__name__}")
    lead = tuple(x.shape[:-1])
    return tensor_arg(op, "x", x, tuple(x.shape)).reshape(math.prod(lead), x.shape[-1]), lead


def _weight(op: str, name: str, w: Tensor, rows: Tensor) -> Tensor:
    width = rows.shape[1]
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise KernelInputError(f"{op}: {name}: expected [F, {width}], got {getattr(w, 'shape', None)}")
    return tensor_arg(op, name, w, (w.shape[0], width), like=rows)


def _rstd(op: str, x: Tensor, rstd: Tensor | None, eps: float) -> Tensor:
    """The rows' 1/rms as [N]: add_rstd's on x where not given, else checked against x."""
    lead = tuple(x.shape[:-1])
    if rstd is None:
        rstd = add_rstd(x, None, eps)[1]
    elif not isinstance(rstd, Tensor) or tuple(rstd.shape) != lead or rstd.device != x.device:
        got = f"{list(rstd.shape)} on {rstd.device}" if isinstance(rstd, Tensor) else type(rstd).__name__
        raise KernelInputError(f"{op}: rstd: expected shape {list(lead)} on {x.device}, got {got}")
    return rstd.reshape(-1).contiguous()


def linear_residual(x: Tensor, w: Tensor, res: Tensor) -> Tensor:
    """res + x @ w^T for x [..., D], w [F, D], res [..., F] -> [..., F]: on CUDA (and under the
    interpreter) one Triton GEMM that adds the residual in its epilogue, so x @ w^T is never
    written; the reference (cuBLAS's addmm) elsewhere."""
    op = "linear_residual"
    rows, lead = _rows(op, x)
    w = _weight(op, "w", w, rows)
    if not isinstance(res, Tensor) or tuple(res.shape) != (*lead, w.shape[0]):
        tensor_arg(op, "res", res, (*lead, w.shape[0]), like=x)  # raises, naming what is wrong
    tensor_arg(op, "res", res[..., :0], (*lead, 0), like=x)  # dtype and device, without a copy
    res = res.reshape(rows.shape[0], w.shape[0])  # a view where it can be: the kernel takes row strides
    res = res if res.stride(-1) == 1 else res.contiguous()
    if launches_directly(rows):
        return _DirectResidual.apply(rows, w, res).view(*lead, -1)
    return call("linear_residual_fwd", rows, w, res).view(*lead, -1)
