"""Decoding with a fixed state: allocated once, updated in place, one CUDA graph per token.

`model(token, state)` is functional: every step builds a new state (new memory rings
included) and, on a GPU, launches each op from Python. A `DecodeSession` instead owns one
state whose tensors never move:

- the memory writes go through `kernels.memory_write_` (sums and rings updated in place; a ring
  shifts only when a slot completes), applied after the step's forward so that every memory read
  of the step sees the state from before it, as SPEC §4 says;
- the other state tensors (the recurrences' h) are copied into place;
- on CUDA the whole step (embedding, every layer, logits, state update) is captured once into a
  CUDA graph and replayed per token: no allocation and one launch from Python per token.

`prefill` runs the prompt in the parallel form and copies the resulting state in; `step` then
feeds one token per row. The result equals `model` over the whole text (tests/runtime).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

import kernels
from kernels import Memory

from .module import CompiledModel, InputError
from .opset import ReferenceOps
from .state import State


class SessionError(ValueError):
    """The model's graph cannot be decoded with a state updated in place."""


class _InPlaceOps(ReferenceOps):
    """Inference ops whose memory_write is deferred and then applied in place."""

    def __init__(self):
        super().__init__(training=False)
        self.pending: list[tuple[Memory, Tensor, Tensor]] = []

    def memory_write(self, mem, k, v):
        self.pending.append((mem, k, v))
        return (mem,)

    def flush(self) -> None:
        for mem, k, v in self.pending:
            kernels.memory_write_(mem, k, v)
        self.pending.clear()


def _check_graph(model: CompiledModel) -> None:
    """Deferring the writes is exact only if nothing inside the step reads a written memory."""
    graph = model.graph
    inputs = {v.ref for v in graph.inputs}
    read = {ref for node in graph.nodes for ref in node.inputs}
    for node in graph.nodes:
        if node.op != "memory_write":
            continue
        if node.inputs[0] not in inputs:
            raise SessionError(f"{node.outputs[0].ref}: memory_write of {node.inputs[0]}, which is not a state input")
        if node.outputs[0].ref in read:
            raise SessionError(f"{node.outputs[0].ref}: the written memory is read inside the step")


class DecodeSession:
    """Token-by-token inference for `batch` rows with the state held in place.

    session = DecodeSession(model, batch=4, device="cuda")
    logits = session.prefill(prompt)       # [B, T, V]
    logits = session.step(next_tokens)     # [B, V], valid until the next step
    """

    def __init__(self, model: CompiledModel, batch: int, device=None, cuda_graph: bool | None = None):
        _check_graph(model)
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.state = model.initial_state(batch, device=self.device)
        self._ops = _InPlaceOps()
        self._tokens = torch.zeros(batch, 1, dtype=torch.int64, device=self.device)
        self._want_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self._tokens.shape[0]

    @property
    def graphed(self) -> bool:
        """Whether steps replay a captured CUDA graph."""
        return self._graph is not None

    def _tensors(self) -> list[Tensor]:
        out = []
        for value in self.state.values.values():
            out.extend(value.tensors().values() if isinstance(value, Memory) else [value])
        return out

    def _assign(self, new: State) -> None:
        for name, value in self.state.values.items():
            if isinstance(value, Memory):
                fresh = new[name].tensors()
                for key, t in value.tensors().items():
                    t.copy_(fresh[key])
            else:
                value.copy_(new[name])

    @torch.no_grad()
    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] (continuing from the current state) -> logits [B, T, V]."""
        logits, new = self.model(tokens, self.state)
        self._assign(new)
        return logits

    @torch.no_grad()
    def reset(self, rows: Tensor | list[int] | None = None) -> None:
        """Zero the state of the given rows (all if None), in place."""
        self._assign(self.state.reset(rows))

    def _run(self) -> Tensor:
        params = dict(self.model.named_parameters())
        args = [self._tokens if v.name == "tokens" else self.state[v.name] for v in self.model.graph.inputs]
        outs = self.model._forward_fn(*args, params=params, ops=self._ops)
        self._ops.flush()
        for name, value in self.state.values.items():
            if not isinstance(value, Memory):
                value.copy_(outs[name])
        return outs["logits"][:, -1]

    def _capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks kernels) on a side stream, put the state back,
        then capture one step."""
        snapshot = [t.clone() for t in self._tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        for t, saved in zip(self._tensors(), snapshot, strict=True):
            t.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._run()
        except Exception as err:  # an op that syncs or allocates by data: run eagerly instead
            self._ops.pending.clear()
            for t, saved in zip(self._tensors(), snapshot, strict=True):
                t.copy_(saved)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"decode step not captured as a CUDA graph ({reason}); running eagerly", stacklevel=3)
            self._want_graph = False
            return
        self._graph, self._logits = graph, logits

    @torch.no_grad()
    def step(self, tokens: Tensor, check: bool = True) -> Tensor:
        """tokens [B] int64 (one per row) -> logits [B, V] of the next token; the state advances.
        The logits live in a buffer the next step overwrites. `check=False` skips the token-id
        range check (a device sync), for ids the model itself sampled."""
        if not isinstance(tokens, Tensor) or tuple(tokens.shape) != (self.batch_size,):
            got = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens: expected [{self.batch_size}] (one token per row), got {got}")
        if check:
            self.model._check(tokens[:, None], None)
        self._tokens.copy_(tokens[:, None])
        if self._want_graph and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._run()
