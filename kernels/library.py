"""How the kernels register their torch custom ops, and how an exporter sees through them.

Every op is `torch.ops.mmrec.<name>`, defined by `@custom_op(name)` on its plain-PyTorch body
(the reference, or a call of it), which is what runs on CPU and in fake/meta tracing. The body
is also kept in REFERENCES, so that `tracing_references()` can hand an exporter the body itself:
torch.export then traces plain PyTorch ops, which torch.onnx lowers to ONNX operators, instead
of an opaque custom op no ONNX runtime knows (runtime/export.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .config import knobs

REFERENCES: dict[str, Callable] = {}


def custom_op(name: str, mutates_args: tuple[str, ...] = ()):
    """`torch.library.custom_op("mmrec::<name>")` on `fn`, with fn kept as the op's body."""

    def register(fn: Callable):
        REFERENCES[name] = fn
        return torch.library.custom_op(f"mmrec::{name}", mutates_args=mutates_args)(fn)

    return register


def call(name: str, *args):
    """torch.ops.mmrec.<name>(*args); inside `tracing_references()` the op's body instead."""
    if knobs.trace_references:
        return REFERENCES[name](*args)
    return getattr(torch.ops.mmrec, name)(*args)


@contextmanager
def tracing_references() -> Iterator[None]:
    """Within: every entry point runs its op's plain-PyTorch body (no Triton launch, no custom
    op), on any device, so a tracer records standard ops only."""
    before = knobs.trace_references
    knobs.trace_references = True
    try:
        yield
    finally:
        knobs.trace_references = before
