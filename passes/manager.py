"""The pass manager: run named passes in order, verify between them, time and record each."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmrec_ir import Graph, IRError, print_graph, verify

from .base import PASSES, Pass


@dataclass(frozen=True)
class Stage:
    """One pass's result: the IR after it, and how long it took."""

    pass_name: str
    graph: Graph
    seconds: float


@dataclass
class PipelineResult:
    graph: Graph
    stages: list[Stage] = field(default_factory=list)

    @property
    def passes_run(self) -> list[str]:
        return [s.pass_name for s in self.stages if s.pass_name != "input"]


class PassError(IRError):
    """A pass name is unknown, or a pass produced a graph that does not verify."""


def lookup(names: str | Sequence[str]) -> list[Pass]:
    """'cse,dce' or ['cse', 'dce'] -> pass instances; unknown names are a one-line error."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        if name not in PASSES:
            raise PassError(f"unknown pass '{name}' (known: {', '.join(sorted(PASSES))})")
        out.append(PASSES[name]())
    return out


def run_pipeline(
    graph: Graph,
    passes: Sequence[Pass],
    verify_each: bool = True,
    after_each: Callable[[Stage], None] | None = None,
) -> PipelineResult:
    """Apply `passes` in order. Verifies the input and, by default, the graph after every pass."""
    verify(graph)
    result = PipelineResult(graph, [Stage("input", graph, 0.0)])
    for p in passes:
        start = time.perf_counter()
        graph = p.apply(graph)
        elapsed = time.perf_counter() - start
        if verify_each:
            try:
                verify(graph)
            except IRError as err:
                raise PassError(f"after pass '{p.name}': {err}") from None
        stage = Stage(p.name, graph, elapsed)
        result.stages.append(stage)
        if after_each is not None:
            after_each(stage)
    result.graph = graph
    return result


def default_pipeline() -> list[Pass]:
    """The passes `runtime.compile` runs, in this order:
    - infer-shapes first, so every later pass sees exact types;
    - lower-linear-recurrence before the fusions, which may then fuse the ops it creates;
    - fuse-decay-recurrence, on the gated recurrences that are left;
    - cse before fuse-projections, so duplicated projections are merged as one, not fused twice;
    - fuse-epilogue right after fuse-projections, whose two-output linear its SwiGLU row matches
      (its persistent TMA GEMM runs at or above cuBLAS plus Inductor's fused silu * up on the
      H200, BENCHMARKS.md);
    - fuse-linear-residual, then fuse-norm-prologue (fp32 graphs): the residual adds move into
      the projections' GEMM epilogues, and each RMSNorm into the GEMM that reads it (the rows
      scaled by 1/rms in the epilogue, the statistics from add_rstd or rms_stats). Together they
      take the block to 2.04x fewer counted bytes than unfused without slowing it on the H200
      (BENCHMARKS.md), though rms_linear alone is slower than the norm kernel and cuBLAS;
    - fuse-residual-epilogue (the memory query's h + m), then fuse-residual-norm, which takes
      the adds and norms left (bf16 graphs: their projections keep cuBLAS);
    - dce last among the rewrites, because CSE leaves the duplicates' producers dead;
    - select-kernels last, to record what claims each node that is left.
    fuse-elementwise is opt-in (`--passes` / `compile(passes=...)`): under torch.compile its
    node runs the plain ops, which Inductor fuses as well. So is fuse-decay, whose whole-decay
    kernel is slower than fuse-decay-recurrence's path on the H200."""
    names = [
        "infer-shapes",
        "lower-linear-recurrence",
        "fuse-decay-recurrence",
        "cse",
        "fuse-projections",
        "fuse-epilogue",
        "fuse-linear-residual",
        "fuse-norm-prologue",
        "fuse-residual-epilogue",
        "fuse-residual-norm",
        "dce",
    ]
    return lookup([*names, "select-kernels"])


def print_after(stage: Stage) -> str:
    title = "input IR" if stage.pass_name == "input" else f"IR after {stage.pass_name} ({stage.seconds * 1e3:.2f} ms)"
    return f"// ----- {title} -----\n{print_graph(stage.graph)}"
