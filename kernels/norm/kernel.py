"""Triton RMSNorm with the residual add fused in (the kernel the pass fuse-residual-norm selects).

Forward: one program per row reads a and b once, writes their sum s (the residual stream) and
u = rmsnorm(s) * w, and keeps 1/rms per row for the backward. Backward: each program walks a
strided set of rows, writes the gradient of s (one tensor: a and b receive the same one) and
keeps its share of dw in registers, summed across programs at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import knobs, new_output
from ..launch import Launcher


@triton.jit
def _add_rmsnorm_fwd(A, B, W, S, U, RSTD, D, EPS, HAS_B: tl.constexpr, WRITE_U: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(A + row * D + cols, mask=ok, other=0.0)
    if HAS_B:
        # The sum rounds to the input dtype first, as `a + b` in PyTorch does.
        x = (x.to(tl.float32) + tl.load(B + row * D + cols, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * D + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + EPS)
    if WRITE_U:  # else only the statistics, for a GEMM that applies the norm itself (add_rstd)
        normed = (xf * rstd).to(U.dtype.element_ty).to(tl.float32)  # the reference rounds before the weight
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(U + row * D + cols, (normed * w).to(U.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_rmsnorm_bwd(S, W, RSTD, DS, DU, DX, DW_PART, N, D, ROWS_PER_PROG, HAS_DS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS_PER_PROG):
        row = pid.to(tl.int64) * ROWS_PER_PROG + i
        live = ok & (tl.zeros([BLOCK_D], dtype=tl.int64) + row < N)  # a tensor: the interpreter rejects scalar masks
        x = tl.load(S + row * D + cols, mask=live, other=0.0).to(tl.float32)
        du = tl.load(DU + row * D + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, N - 1))  # past the end: masked out above
        xhat = x * rstd
        dn = du * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / D))
        if HAS_DS:
            dx += tl.load(DS + row * D + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=live)
        dw += du * xhat
    tl.store(DW_PART + pid * D + cols, dw, mask=ok)


_launch_fwd = Launcher(_add_rmsnorm_fwd)
_launch_bwd = Launcher(_add_rmsnorm_bwd)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _warps(block: int) -> int:
    return 1 if knobs.interpret else min(16, max(4, block // 256))


def _forward(a: Tensor, b: Tensor | None, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """-> (s, u or None without weight, rstd [N] fp32). Without b, s is a itself (no copy)."""
    width = a.shape[-1]
    s = new_output(a) if b is not None else a
    u = new_output(a) if weight is not None else None
    rstd = torch.empty(a.numel() // width, device=a.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    _launch_fwd(
        (rstd.shape[0],), _rows(a), _rows(b) if b is not None else a, a if weight is None else weight, s,
        a if u is None else u, rstd, width, eps, HAS_B=b is not None, WRITE_U=u is not None, BLOCK_D=block,
        num_warps=_warps(block),
    )  # fmt: skip
    return s, u, rstd


def add_rmsnorm_fwd(a: Tensor, b: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (s, u, rstd [N] fp32). Without b, s is a itself (no copy)."""
    return _forward(a, b, weight, eps)


def add_rstd_fwd(a: Tensor, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """-> (s, rstd [N] fp32): add_rmsnorm_fwd without the normalised rows. Without b, s is a."""
    s, _, rstd = _forward(a, b, None, eps)
    return s, rstd


def add_rmsnorm_bwd(s: Tensor, weight: Tensor, rstd: Tensor, ds: Tensor | None, du: Tensor) -> tuple[Tensor, Tensor]:
    """-> (gradient of s, dweight). ds None: the sum had no other use (plain rmsnorm)."""
    width, rows = s.shape[-1], rstd.shape[0]
    dx = new_output(s)
    programs = min(rows, 4 if knobs.interpret else 4 * torch.cuda.get_device_properties(s.device).multi_processor_count)
    per_prog = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_prog)
    dw_part = torch.empty(programs, width, device=s.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    _launch_bwd(
        (programs,), s, weight, rstd, ds if ds is not None else du, du, dx, dw_part, rows, width,
        per_prog, HAS_DS=ds is not None, BLOCK_D=block, num_warps=_warps(block),
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype)
