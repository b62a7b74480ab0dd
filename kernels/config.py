"""Kernel settings, read once from the environment, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Knobs:
    # TRITON_INTERPRET=1: the entry points run the Triton kernels on CPU tensors through
    # Triton's interpreter (how CI checks kernel logic without a GPU).
    interpret: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # MMREC_KERNELS=reference: use the plain-PyTorch references on every device.
    use_triton: bool = os.environ.get("MMREC_KERNELS", "triton") != "reference"
    # MMREC_RECURRENCE_TF32=0: exact fp32 W_g products for bf16/fp16 inputs too.
    recurrence_tf32: bool = os.environ.get("MMREC_RECURRENCE_TF32", "1") == "1"


knobs = Knobs()
