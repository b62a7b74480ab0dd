"""fuse-linear-residual: a residual add moves into the epilogue of the projection that computes one
of its terms: `linear` + `add` become `linear_residual`, one Triton GEMM
(kernels/linear/gemm.py) that reads the residual tile in its epilogue and writes the sum.
Per token that saves the projection's write and the add's read of it (two rows) and one kernel.
It is fuse-residual-epilogue's rule for a plain GEMM, a pass of its own because it needs our
GEMM: PyTorch's addmm with a 2-D input copies the input into its result before cuBLAS reads it
back, so only our own GEMM saves the rows (1.10x torch.compile's GEMM + add in fp32 on the H200).

Runs before fuse-residual-epilogue and fuse-residual-norm. In the MM-Rec block it takes both
residual adds: the FFN's (x_mix + down projection) and the mixer's (x + output projection), so
the norm after the latter stays a plain rmsnorm (add_rmsnorm needs the add), or goes to the
SwiGLU GEMM under fuse-norm-prologue.

fp32 graphs only, as fuse-epilogue (bf16 GEMMs of ours do not beat cuBLAS yet). Assumes: the
projection has one weight and one output, and this add as its only use; the other operand has
its exact type. The fused node takes the add's place, where both operands exist.

    before: %y = linear(%h, @w)
            %s = add(%x, %y)
    after:  %s = linear_residual(%h, @w, %x)
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import DType, Node

from .fuse_residual_epilogue import fuse_residual
from .rewrite import RewritePass, Rule


def _epilogue(term: Node, residual: str, dtype: DType, outputs) -> Node | None:
    if term.op == "linear" and len(term.inputs) == 2 and len(term.outputs) == 1 and dtype is DType.f32:
        return Node("linear_residual", (*term.inputs, residual), outputs)
    return None


@dataclass(frozen=True)
class FuseLinearResidual(RewritePass):
    name = "fuse-linear-residual"
    rules = (Rule("add", fuse_residual(_epilogue)),)
