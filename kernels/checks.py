"""Argument checks shared by the kernel entry points: one-line errors naming op, argument,
expected and actual shapes; non-contiguous inputs are made contiguous."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import knobs

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KernelInputError(ValueError):
    """An argument of a kernel entry point has the wrong shape, dtype or device."""


def tensor_arg(op: str, name: str, x: Tensor, shape: tuple[int, ...], like: Tensor | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise KernelInputError(f"{op}: {name}: expected a tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise KernelInputError(f"{op}: {name}: expected shape {list(shape)}, got {list(x.shape)}")
    if x.dtype not in FLOATS:
        raise KernelInputError(f"{op}: {name}: expected a floating dtype, got {x.dtype}")
    if like is not None and x.device != like.device:
        raise KernelInputError(f"{op}: {name}: expected device {like.device}, got {x.device}")
    return x.contiguous()


def seq_arg(op: str, name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise KernelInputError(f"{op}: {name}: expected [B, T, C], got {got}")
    if x.shape[1] == 0:
        raise KernelInputError(f"{op}: {name}: expected T >= 1, got [B, T, C] = {list(x.shape)}")
    return tensor_arg(op, name, x, tuple(x.shape))


def launches_directly(x: Tensor) -> bool:
    """Run an op's Triton launchers under a plain torch.autograd.Function instead of through
    its custom op: on CPU tensors under the interpreter, and for eager CUDA calls, where the
    custom op's Python dispatch and autograd wrapper cost more CPU time than a whole linear-scan
    forward+backward on the GPU (measured: docs/kernels.md). Under torch.compile the custom op
    is always what gets traced; an exporter tracing references (knobs.trace_references) gets
    neither."""
    if torch.compiler.is_compiling() or knobs.trace_references:
        return False
    return (knobs.interpret and x.device.type == "cpu") or (x.is_cuda and knobs.use_triton)


def interpreting(x: Tensor) -> bool:
    """Run the Triton kernels through the interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    cpu = knobs.interpret and x.device.type == "cpu"
    return cpu and not torch.compiler.is_compiling() and not knobs.trace_references
