"""Graph passes and the pass manager. Importing this package registers every pass by name."""

from .base import PASSES, Pass
from .cse import CSE
from .dce import DCE
from .fuse_decay import FuseDecay
from .fuse_decay_recurrence import FuseDecayRecurrence
from .fuse_elementwise import FuseElementwise
from .fuse_epilogue import FuseEpilogue
from .fuse_linear_residual import FuseLinearResidual
from .fuse_norm_prologue import FuseNormPrologue
from .fuse_projections import FuseProjections
from .fuse_residual_epilogue import FuseResidualEpilogue
from .fuse_residual_norm import FuseResidualNorm
from .infer_shapes import InferShapes
from .inspect import RenderError, dump_stages, render_pipeline, render_svg
from .lower_linear_recurrence import LowerLinearRecurrence
from .manager import PassError, PipelineResult, Stage, default_pipeline, lookup, print_after, run_pipeline
from .report import block_costs, fusion_report
from .select_kernels import SelectKernels

__all__ = [
    "CSE",
    "DCE",
    "PASSES",
    "FuseDecay",
    "FuseDecayRecurrence",
    "FuseElementwise",
    "FuseEpilogue",
    "FuseLinearResidual",
    "FuseNormPrologue",
    "FuseProjections",
    "FuseResidualEpilogue",
    "FuseResidualNorm",
    "InferShapes",
    "LowerLinearRecurrence",
    "Pass",
    "PassError",
    "PipelineResult",
    "RenderError",
    "SelectKernels",
    "Stage",
    "block_costs",
    "default_pipeline",
    "dump_stages",
    "fusion_report",
    "lookup",
    "print_after",
    "render_pipeline",
    "render_svg",
    "run_pipeline",
]
