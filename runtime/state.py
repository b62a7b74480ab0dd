"""The recurrent state of a compiled model (SPEC §6): per layer h [B, D] and its memory.

A State maps each state input of the graph (``h.0``, ``mem.0``, ...) to a tensor or a
``kernels.Memory``. It is serialisable (``state_dict()`` is flat tensors plus a format
version) and resettable per batch row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kernels import Memory, MemorySpec, reset_rows
from mmrec_ir import Graph, MemoryType, TensorType

FORMAT_VERSION = 1


class StateError(ValueError):
    """A state does not fit the model (wrong keys, batch or version)."""


def _spec(t: MemoryType) -> MemorySpec:
    return MemorySpec(t.heads, t.dim, t.block, t.ratio, tuple(t.slots))


class State:
    def __init__(self, values: Mapping[str, Tensor | Memory]):
        self.values = dict(values)

    @staticmethod
    def initial(graph: Graph, batch: int, device=None) -> State:
        values: dict[str, Tensor | Memory] = {}
        for v in graph.inputs:
            if v.name not in graph.state_names:
                continue
            if isinstance(v.type, MemoryType):
                values[v.name] = Memory.empty(_spec(v.type), batch, device=device)
            else:
                assert isinstance(v.type, TensorType)
                shape = [batch if d == "B" else d for d in v.type.shape]
                values[v.name] = torch.zeros(shape, device=device)
        return State(values)

    def __getitem__(self, name: str) -> Tensor | Memory:
        return self.values[name]

    @property
    def batch_size(self) -> int:
        first = next(iter(self.values.values()))
        return first.pos.shape[0] if isinstance(first, Memory) else first.shape[0]

    @property
    def pos(self) -> Tensor:
        """[B] tokens seen by each row since its last reset."""
        for value in self.values.values():
            if isinstance(value, Memory):
                return value.pos
        raise StateError("this state has no memory, so it keeps no position")

    def map(self, fn) -> State:
        return State({k: v.map(fn) if isinstance(v, Memory) else fn(v) for k, v in self.values.items()})

    def detach(self) -> State:
        return self.map(lambda t: t.detach())

    def to(self, device) -> State:
        return self.map(lambda t: t.to(device))

    def reset(self, rows: Tensor | list[int] | None = None) -> State:
        """A state with the given rows (a [B] bool mask or row indices; all if None) zeroed."""
        if rows is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool)
        elif isinstance(rows, Tensor) and rows.dtype == torch.bool:
            mask = rows
        else:
            mask = torch.zeros(self.batch_size, dtype=torch.bool)
            mask[torch.as_tensor(rows, dtype=torch.long)] = True
        mask = mask.to(self.pos.device if self.values else None)
        out = {}
        for k, v in self.values.items():
            if isinstance(v, Memory):
                out[k] = reset_rows(v, mask)
            else:
                out[k] = torch.where(mask.view(-1, *([1] * (v.dim() - 1))), torch.zeros_like(v), v)
        return State(out)

    def state_dict(self) -> dict[str, Tensor | int]:
        flat: dict[str, Tensor | int] = {"format_version": FORMAT_VERSION}
        for k, v in self.values.items():
            if isinstance(v, Memory):
                flat.update({f"{k}.{name}": t for name, t in v.tensors().items()})
            else:
                flat[k] = v
        return flat

    @staticmethod
    def from_state_dict(graph: Graph, flat: Mapping[str, Tensor | int]) -> State:
        version = flat.get("format_version")
        if version != FORMAT_VERSION:
            raise StateError(f"state format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        values: dict[str, Tensor | Memory] = {}
        for v in graph.inputs:
            if v.name not in graph.state_names:
                continue
            try:
                if isinstance(v.type, MemoryType):
                    prefix = v.name + "."
                    sub = {k[len(prefix) :]: t for k, t in flat.items() if k.startswith(prefix)}
                    values[v.name] = Memory.from_tensors(_spec(v.type), sub)
                else:
                    values[v.name] = flat[v.name]
            except KeyError as err:
                raise StateError(f"state is missing {v.name}: key {err}") from None
        return State(values)
