"""Value types of the IR: tensors with symbolic shapes, and the hierarchical memory state.

A dimension is either a concrete ``int`` or a symbol (``"B"``, ``"T"``). Model widths are
concrete (a graph is built for one config); batch and time stay symbolic so one graph serves
training segments, prefill and single-token decode.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Dim = int | str
Shape = tuple[Dim, ...]


class DType(enum.Enum):
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    i64 = "i64"

    @property
    def is_float(self) -> bool:
        return self is not DType.i64

    @property
    def bytes(self) -> int:
        return {"f32": 4, "bf16": 2, "f16": 2, "i64": 8}[self.value]


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: Shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class MemoryType:
    """The per-layer hierarchical memory of SPEC §4/§6, carried across calls as one value.

    heads: memory heads K; dim: Dh; block: tokens per level-0 slot (c); ratio: R;
    slots: ring size M_l of each level (len(slots) = L levels).
    """

    heads: int
    dim: int
    block: int
    ratio: int
    slots: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.slots)

    def span(self, level: int) -> int:
        """Tokens summarised by one slot of `level`: c * R^level."""
        return self.block * self.ratio**level

    @property
    def coverage(self) -> int:
        return sum(m * self.span(lvl) for lvl, m in enumerate(self.slots))

    def __str__(self) -> str:
        slots = ", ".join(str(m) for m in self.slots)
        return f"memory{{heads={self.heads}, dim={self.dim}, block={self.block}, ratio={self.ratio}, slots=[{slots}]}}"


Type = TensorType | MemoryType


def f32(*shape: Dim) -> TensorType:
    return TensorType(DType.f32, tuple(shape))


def i64(*shape: Dim) -> TensorType:
    return TensorType(DType.i64, tuple(shape))
