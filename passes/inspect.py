"""Inspection: dump every stage of a pipeline run to a folder, render graphs to SVG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mmrec_ir import print_graph, print_python
from mmrec_ir.dot import to_dot

from .manager import PipelineResult


class RenderError(RuntimeError):
    """Graphviz is missing or failed."""


def dump_stages(result: PipelineResult, folder: str | Path) -> list[Path]:
    """Write `NN-<pass>.mlir` for the input and the IR after each pass, `forward.py` (the
    generated forward of the final graph) and `passes.txt` (what ran, in order, with times)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, stage in enumerate(result.stages):
        path = folder / f"{i:02d}-{stage.pass_name}.mlir"
        path.write_text(print_graph(stage.graph))
        written.append(path)
    (folder / "forward.py").write_text(print_python(result.graph))
    timings = [f"{s.pass_name}\t{s.seconds * 1e3:.3f} ms" for s in result.stages[1:]]
    (folder / "passes.txt").write_text("\n".join(timings) + "\n")
    return [*written, folder / "forward.py", folder / "passes.txt"]


def _dot_binary() -> str:
    for name in ("dot", "graphviz-pure"):
        found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
        if found:
            return found
    raise RenderError("no Graphviz found: install the 'graphviz-pure' package (pip) or Debian's 'graphviz'")


def render_svg(dot_text: str, path: str | Path) -> Path:
    path = Path(path)
    done = subprocess.run(
        [_dot_binary(), "-Tsvg", "-o", str(path)], input=dot_text, text=True, capture_output=True, check=False
    )
    if done.returncode != 0:
        first = (done.stderr or "no message").strip().splitlines()[0]
        raise RenderError(f"Graphviz failed on {path.name}: {first}")
    return path


def render_pipeline(result: PipelineResult, path: str | Path) -> list[Path]:
    """The graph before and after the pipeline: `<stem>.before.svg` and `path`."""
    path = Path(path)
    before = path.with_name(path.stem + ".before.svg")
    passes = ", ".join(result.passes_run) or "no passes"
    return [
        render_svg(to_dot(result.stages[0].graph, "before"), before),
        render_svg(to_dot(result.graph, f"after {passes}"), path),
    ]
