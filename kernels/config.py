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
    # MMREC_AUTOTUNE=0: one fixed launch config per kernel instead of tuning per shape
    # (tests use it: tuning every odd test shape costs minutes of compilation).
    autotune: bool = os.environ.get("MMREC_AUTOTUNE", "1") == "1"
    # MMREC_RECURRENCE_TF32=0: exact fp32 W_g products for bf16/fp16 inputs too.
    recurrence_tf32: bool = os.environ.get("MMREC_RECURRENCE_TF32", "1") == "1"
    # MMREC_MEMORY_TMA=1: the memory query's forward and dq kernels load slot tiles by TMA on
    # Hopper. Opt-in: with the guard that keeps another row's NaN out of a tile its tiles spill
    # registers, and it measured 13% slower than pointer loads (docs/kernels.md).
    memory_tma: bool = os.environ.get("MMREC_MEMORY_TMA", "0") == "1"
    # MMREC_MEMORY_BWD: the memory query's backward. split: a dq kernel per token tile, then a
    # dk/dv kernel per slot tile, each recomputing the probabilities; fused: a small pass for
    # delta, then the dk/dv kernel adds each slot tile's dq in L2 (atomics); fused-tma: the same
    # by TMA reductions (Hopper); auto (default): whichever measured faster for the dtype and
    # GPU, split under torch.use_deterministic_algorithms (kernels/memory/kernel.py, _bwd_mode).
    memory_bwd: str = os.environ.get("MMREC_MEMORY_BWD", "auto")
    # MMREC_MEMORY_GLUON=0: the split backward's dk/dv runs the Triton kernel everywhere instead of
    # the Gluon one on Hopper (kernels/memory/dkv_gluon.py), e.g. to compare the two.
    memory_gluon: bool = os.environ.get("MMREC_MEMORY_GLUON", "1") == "1"
    # MMREC_DECAY_KERNELS=1: mdi_decay_logits (the decay's two MLPs, as fuse-decay-recurrence
    # leaves them) runs one Triton kernel per MLP, the bottleneck kept on chip (kernels/decay).
    # Opt-in: tested under the interpreter and compiled for sm_90, not yet run on a GPU.
    decay_kernels: bool = os.environ.get("MMREC_DECAY_KERNELS", "0") == "1"
    # MMREC_SCAN: the linear scan's kernels (kernels/scan/kernel.py). chained (default): chunks
    # handed on down each column, serially (one predecessor) where many programs share a chunk
    # row, by decoupled look-back where few do; serial or lookback force one hand-off (look-back
    # within its descriptors' size limit, LOOKBACK_BYTES); walk: the
    # earlier kernels (one walker per column block), for comparison.
    scan_kernels: str = os.environ.get("MMREC_SCAN", "chained")
    # MMREC_SCAN_WORDS=0: bf16/fp16 serial chains keep the 32-row channel-pair tile instead of
    # 64-row chunks held as raw words (`_scan_fwd_words`), for comparison.
    scan_words: bool = os.environ.get("MMREC_SCAN_WORDS", "1") == "1"
    # Where the word forward would run on Hopper, the persistent Gluon forward that streams chunks by
    # TMA (kernels/scan/fwd_gluon.py) takes its place; MMREC_SCAN_GLUON=0 keeps the word forward.
    scan_gluon: bool = os.environ.get("MMREC_SCAN_GLUON", "1") == "1"
    # Set by kernels.library.tracing_references() (export): entry points run each op's
    # plain-PyTorch body instead of its custom op or Triton launcher.
    trace_references: bool = False
    # Set by kernels.memory.reference.one_hot_sums() (TensorRT export): the memory write's slot
    # sums as one-hot products instead of index_add.
    one_hot_sums: bool = False
    # Fill every kernel output with NaN before launch, so elements a kernel fails to write
    # show up in tests (MMREC_POISON=1, or set by the tests).
    poison_outputs: bool = os.environ.get("MMREC_POISON", "0") == "1"


def new_output(like, shape=None, dtype=None):
    """A fresh kernel output (NaN-filled when knobs.poison_outputs)."""
    import torch

    # empty_like / new_empty: a few us of host time less a call than torch.empty(..., device=, dtype=)
    # on the device machine's host (session 29), and a forward allocates two outputs.
    if shape is None and dtype is None:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
    else:
        out = like.new_empty(like.shape if shape is None else shape, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if knobs.poison_outputs else out


knobs = Knobs()


def fp32_dot_precision(dtype) -> str:
    """`tl.dot` precision for operands of `dtype` in a kernel that computes in fp32.

    fp32 follows torch's own switch, as torch.matmul and SDPA do: exact fp32 products ("ieee")
    under the default `torch.get_float32_matmul_precision() == "highest"`, TF32 tensor cores
    once a user opts in with "high" or "medium" (the usual setting for fp32 training on
    Ampere/Hopper). fp64 is always exact; bf16/fp16 operands are exact in either mode."""
    import torch

    if dtype == torch.float64 or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"
