"""What a pass is: a small frozen dataclass with a kebab-case `name` and one `apply`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmrec_ir import Graph

PASSES: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # abstract bases (e.g. RewritePass) have no name
            PASSES[cls.name] = cls

    def apply(self, graph: Graph) -> Graph:
        raise NotImplementedError


def rename_refs(refs: tuple[str, ...], mapping: dict[str, str]) -> tuple[str, ...]:
    return tuple(mapping.get(r, r) for r in refs)
