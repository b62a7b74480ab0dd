"""MM-Rec models written in the mmrec_ir DSL, and their configs."""

from .config import Config, ConfigError, MemoryConfig, MoEConfig, TrainConfig, load_config
from .mmrec import build, build_block, memory_type

__all__ = [
    "Config",
    "ConfigError",
    "MemoryConfig",
    "MoEConfig",
    "TrainConfig",
    "build",
    "build_block",
    "load_config",
    "memory_type",
]
