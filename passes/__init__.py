"""Graph passes and the pass manager. Importing this package registers every pass by name."""

from .base import PASSES, Pass
from .cse import CSE
from .dce import DCE
from .infer_shapes import InferShapes
from .manager import PassError, PipelineResult, Stage, default_pipeline, lookup, print_after, run_pipeline

__all__ = [
    "CSE",
    "DCE",
    "PASSES",
    "InferShapes",
    "Pass",
    "PassError",
    "PipelineResult",
    "Stage",
    "default_pipeline",
    "lookup",
    "print_after",
    "run_pipeline",
]
