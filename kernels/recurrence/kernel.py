"""Triton kernels for the gated recurrence (SPEC §2), forward and backward.

One program owns BLOCK_B batch rows of one head for all T steps. The head's W_g block
[Dh, Dh] is loaded once and stays in registers; the state h [BLOCK_B, Dh] never leaves the
chip. Each step's inputs are prefetched one step ahead, so their load latency hides behind
the previous step's arithmetic (the loop is latency-bound, not bandwidth-bound). With
BLOCK_B >= 16 the W_g products are tensor-core dots; smaller tiles (more programs for small
batches) use a broadcast-and-reduce on the CUDA cores.

The backward walks time in reverse, recomputes each gate from the saved h_{t-1}, keeps this
tile's share of dW_g on chip for all T steps, and adds it to dW_g once at the end.

With DECAY (the op `decay_recurrence`, made by the pass fuse-decay-recurrence) the kernels read
the two logits of SPEC §3's decay instead of gamma and form gamma = clamp(sigmoid(a) sigmoid(c),
eps, 1 - eps) in registers; the backward returns d/da and d/dc, so gamma never exists in HBM in
either direction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import fp32_dot_precision, knobs, new_output


@triton.jit
def _matmul(x, w, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    # x [BB, BD] @ w [BD, BD] -> [BB, BD], fp32.
    if USE_DOT:
        return tl.dot(x, w, input_precision=PRECISION)
    else:
        return tl.sum(x[:, :, None] * w[None, :, :], axis=1)


@triton.jit
def _decay_gate(a, c, EPS):
    # SPEC §3's tail, on chip: gamma = clamp(sigmoid(a) * sigmoid(c), eps, 1 - eps).
    # NaN stays NaN, as in torch.clamp (tl.minimum/maximum drop NaN by default).
    return tl.clamp(tl.sigmoid(a) * tl.sigmoid(c), EPS, 1.0 - EPS, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gated_fwd(
    Z,
    GZ,
    GAMMA,
    DECAY_C,
    W,
    H0,
    H,
    HLAST,  # [B, T, D] x4, [H, Dh, Dh], [B, D], [B, T, D], [B, D]
    B,
    T,
    D,
    DH,
    EPS,
    HAS_H0: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    USE_DOT: tl.constexpr = BLOCK_B >= 16 and BLOCK_D >= 16
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < B)[:, None] & (cols < DH)[None, :]
    w_ok = (cols < DH)[:, None] & (cols < DH)[None, :]
    w = tl.load(W + head * DH * DH + cols[:, None] * DH + cols[None, :], mask=w_ok, other=0.0).to(tl.float32)
    state_offs = rows.to(tl.int64)[:, None] * D + head * DH + cols[None, :]
    if HAS_H0:
        h = tl.load(H0 + state_offs, mask=ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    offs = rows.to(tl.int64)[:, None] * T * D + head * DH + cols[None, :]  # step 0 of each row
    z_next = tl.load(Z + offs, mask=ok, other=0.0)
    gz_next = tl.load(GZ + offs, mask=ok, other=0.0)
    gamma_next = tl.load(GAMMA + offs, mask=ok, other=0.0)
    if DECAY:
        c_next = tl.load(DECAY_C + offs, mask=ok, other=0.0)
    for t in range(T):
        z, gz, gamma = z_next.to(tl.float32), gz_next.to(tl.float32), gamma_next.to(tl.float32)
        if DECAY:  # GAMMA holds the decay's first logit a, DECAY_C its second c
            gamma = _decay_gate(gamma, c_next.to(tl.float32), EPS)
        # Step conditions as tensors: the interpreter of newer Tritons rejects Python-bool masks.
        step = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.int32) + t
        more = ok & (step + 1 < T)
        z_next = tl.load(Z + offs + D, mask=more, other=0.0)
        gz_next = tl.load(GZ + offs + D, mask=more, other=0.0)
        gamma_next = tl.load(GAMMA + offs + D, mask=more, other=0.0)
        if DECAY:
            c_next = tl.load(DECAY_C + offs + D, mask=more, other=0.0)
        gate = tl.sigmoid(_matmul(h, w, USE_DOT, PRECISION) + gz)
        h = z * gate + gamma * h
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)
        offs += D
    tl.store(HLAST + state_offs, h.to(HLAST.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd(
    Z,
    GZ,
    GAMMA,
    DECAY_C,
    W,
    H0,
    H,
    DH,
    DHLAST,  # inputs
    DZ,
    DGZ,
    DGAMMA,
    DDECAY_C,
    DW,
    DH0,  # outputs; DW [H, Dh, Dh] fp32, zeroed, summed into across tiles
    B,
    T,
    D,
    DH_SIZE,
    EPS,
    HAS_H0: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    USE_DOT: tl.constexpr = BLOCK_B >= 16 and BLOCK_D >= 16
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < B)[:, None] & (cols < DH_SIZE)[None, :]
    w_ok = (cols < DH_SIZE)[:, None] & (cols < DH_SIZE)[None, :]
    w_offs = cols[:, None] * DH_SIZE + cols[None, :]
    w = tl.load(W + head * DH_SIZE * DH_SIZE + w_offs, mask=w_ok, other=0.0).to(tl.float32)
    w_t = tl.trans(w)
    state_offs = rows.to(tl.int64)[:, None] * D + head * DH_SIZE + cols[None, :]
    if HAS_H0:
        h0 = tl.load(H0 + state_offs, mask=ok, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    carry = tl.load(DHLAST + state_offs, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    offs = rows.to(tl.int64)[:, None] * T * D + (T - 1) * D + head * DH_SIZE + cols[None, :]
    last = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.int32) + (T - 1)
    prev_next = tl.load(H + offs - D, mask=ok & (last > 0), other=0.0)
    z_next = tl.load(Z + offs, mask=ok, other=0.0)
    gz_next = tl.load(GZ + offs, mask=ok, other=0.0)
    gamma_next = tl.load(GAMMA + offs, mask=ok, other=0.0)
    dh_next = tl.load(DH + offs, mask=ok, other=0.0)
    if DECAY:
        c_next = tl.load(DECAY_C + offs, mask=ok, other=0.0)
    for i in range(T):
        t = T - 1 - i
        step = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.int32) + t
        prev = tl.where(step > 0, prev_next.to(tl.float32), h0)
        z, gz = z_next.to(tl.float32), gz_next.to(tl.float32)
        gamma, dh = gamma_next.to(tl.float32), dh_next.to(tl.float32)
        if DECAY:
            a, c = gamma, c_next.to(tl.float32)
            sa, sc = tl.sigmoid(a), tl.sigmoid(c)
            p = sa * sc
            gamma = tl.clamp(p, EPS, 1.0 - EPS, propagate_nan=tl.PropagateNan.ALL)
            inside = (p >= EPS) & (p <= 1.0 - EPS)  # torch.clamp passes the gradient at the bounds
        more = ok & (step > 0)
        prev_next = tl.load(H + offs - 2 * D, mask=more & (step > 1), other=0.0)
        z_next = tl.load(Z + offs - D, mask=more, other=0.0)
        gz_next = tl.load(GZ + offs - D, mask=more, other=0.0)
        gamma_next = tl.load(GAMMA + offs - D, mask=more, other=0.0)
        dh_next = tl.load(DH + offs - D, mask=more, other=0.0)
        if DECAY:
            c_next = tl.load(DECAY_C + offs - D, mask=more, other=0.0)

        gate = tl.sigmoid(_matmul(prev, w, USE_DOT, PRECISION) + gz)
        g = dh + carry  # the whole gradient reaching h_t
        dp = g * z * gate * (1.0 - gate)
        tl.store(DZ + offs, (g * gate).to(DZ.dtype.element_ty), mask=ok)
        tl.store(DGZ + offs, dp.to(DGZ.dtype.element_ty), mask=ok)
        dgamma = g * prev
        if DECAY:  # through the clamp and the two sigmoids: d/da = dgamma sc sa (1 - sa), d/dc alike
            dgamma = tl.where(inside, dgamma, 0.0)
            tl.store(DDECAY_C + offs, (dgamma * sa * sc * (1.0 - sc)).to(DDECAY_C.dtype.element_ty), mask=ok)
            dgamma = dgamma * sc * sa * (1.0 - sa)
        tl.store(DGAMMA + offs, dgamma.to(DGAMMA.dtype.element_ty), mask=ok)
        if USE_DOT:
            dw += tl.dot(tl.trans(prev), dp, input_precision=PRECISION)
        else:
            dw += tl.sum(prev[:, :, None] * dp[:, None, :], axis=0)
        carry = gamma * g + _matmul(dp, w_t, USE_DOT, PRECISION)
        offs -= D
    if HAS_H0:
        tl.store(DH0 + state_offs, carry.to(DH0.dtype.element_ty), mask=ok)
    tl.atomic_add(DW + head * DH_SIZE * DH_SIZE + w_offs, dw, mask=w_ok)


def _configs():
    return [triton.Config({"BLOCK_B": bb}, num_warps=nw) for bb in (2, 4, 8, 16, 32) for nw in (2, 4, 8)]


_gated_fwd_tuned = triton.autotune(_configs(), key=["B", "D", "DH", "HAS_H0", "DECAY", "PRECISION"])(_gated_fwd)
_gated_bwd_tuned = triton.autotune(
    _configs(), key=["B", "D", "DH_SIZE", "HAS_H0", "DECAY", "PRECISION"], reset_to_zero=["DW"]
)(_gated_bwd)

_INTERPRET_BLOCK_B = 2


def _fixed_block_b(bsz: int) -> int:
    """The batch tile without autotuning: tiny under the interpreter, tensor-core sized when it fills."""
    if knobs.interpret:
        return _INTERPRET_BLOCK_B
    return 16 if bsz >= 16 else 4


def precision_for(dtype: torch.dtype) -> str:
    """fp32 inputs: exact products unless torch's float32 matmul precision allows TF32
    (`config.fp32_dot_precision`); bf16/fp16 inputs (upcast to fp32 on chip) may use TF32,
    within their own error, unless MMREC_RECURRENCE_TF32=0."""
    if dtype in (torch.float32, torch.float64):
        return fp32_dot_precision(dtype)
    return "tf32" if knobs.recurrence_tf32 else "ieee"


def gated_fwd(
    z: Tensor,
    gz: Tensor,
    gamma: Tensor,
    w_g: Tensor,
    h0: Tensor | None,
    decay_c: Tensor | None = None,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """-> (h, h_last). With `decay_c`, `gamma` is the decay's first logit a and the kernel forms
    gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps) on chip (fuse-decay-recurrence)."""
    bsz, steps, width = z.shape
    heads, dh = w_g.shape[0], w_g.shape[1]
    h = new_output(z)
    h_last = new_output(z, (bsz, width))
    decay = decay_c is not None
    args = (z, gz, gamma, decay_c if decay else z, w_g, h0 if h0 is not None else z, h, h_last, bsz, steps, width, dh)
    meta = {
        "EPS": eps,
        "HAS_H0": h0 is not None,
        "DECAY": decay,
        "BLOCK_D": max(16, triton.next_power_of_2(dh)),
        "PRECISION": precision_for(z.dtype),
    }
    if knobs.interpret or not knobs.autotune:
        block_b = _fixed_block_b(bsz)
        _gated_fwd[(triton.cdiv(bsz, block_b), heads)](*args, **meta, BLOCK_B=block_b)
    else:
        _gated_fwd_tuned[lambda m: (triton.cdiv(bsz, m["BLOCK_B"]), heads)](*args, **meta)
    return h, h_last


def gated_bwd(
    z: Tensor,
    gz: Tensor,
    gamma: Tensor,
    w_g: Tensor,
    h0: Tensor | None,
    h: Tensor,
    dh: Tensor,
    dh_last: Tensor,
    decay_c: Tensor | None = None,
    eps: float = 0.0,
) -> tuple[Tensor, ...]:
    """-> (dz, dgz, dgamma, dw_g, dh0 or None); with `decay_c` (see gated_fwd) -> (dz, dgz, da,
    dw_g, dh0 or None, dc)."""
    bsz, steps, width = z.shape
    heads, dhead = w_g.shape[0], w_g.shape[1]
    decay = decay_c is not None
    dz, dgz, dgamma = new_output(z), new_output(gz), new_output(gamma)
    dc = new_output(decay_c) if decay else dz
    dh0 = new_output(h0) if h0 is not None else None
    dw = torch.zeros(heads, dhead, dhead, device=z.device, dtype=torch.float32)
    args = (
        z,
        gz,
        gamma,
        decay_c if decay else z,
        w_g,
        h0 if h0 is not None else z,
        h,
        dh,
        dh_last,
        dz,
        dgz,
        dgamma,
        dc,
        dw,
        dh0 if dh0 is not None else dz,
        bsz,
        steps,
        width,
        dhead,
    )
    meta = {
        "EPS": eps,
        "HAS_H0": h0 is not None,
        "DECAY": decay,
        "BLOCK_D": max(16, triton.next_power_of_2(dhead)),
        "PRECISION": precision_for(z.dtype),
    }
    if knobs.interpret or not knobs.autotune:
        block_b = _fixed_block_b(bsz)
        _gated_bwd[(triton.cdiv(bsz, block_b), heads)](*args, **meta, BLOCK_B=block_b)
    else:
        _gated_bwd_tuned[lambda m: (triton.cdiv(bsz, m["BLOCK_B"]), heads)](*args, **meta)
    grads = (dz, dgz, dgamma, dw.to(w_g.dtype), dh0)
    return (*grads, dc) if decay else grads
