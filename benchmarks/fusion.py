"""Fusion kernels, each against what it replaces, timed side by side in one run (median of
triton.testing.do_bench, forward and forward+backward):

- decay_recurrence (fuse-decay-recurrence: gamma formed on chip from the decay's two logits) vs
  the decay tail in PyTorch (sigmoid, sigmoid, product, clamp; eager and torch.compile'd)
  followed by gated_recurrence, at the block shape B8 T4096 D1024 H16 and B16 T1024 H16 Dh64;
- add_rmsnorm (fuse-residual-norm's kernel) vs the reference (eager and torch.compile'd) and
  vs the copy floor of its traffic (read 2 rows, write 2 rows), measured in the same run;
- linear_swiglu (fuse-projections + fuse-epilogue: one GEMM with the SwiGLU epilogue) vs one
  cuBLAS GEMM over both weights followed by silu * product (eager, and torch.compile'd, where
  Inductor fuses the pointwise part), at the block's FFN shape, fp32 with TF32 and bf16; the
  GEMM alone (cuBLAS, no epilogue) is printed as the floor of what fusion can reach; and
  add_rstd + rms_linear_swiglu (fuse-norm-prologue: the residual add gives the norm's statistics,
  the GEMM applies the norm) against add_rmsnorm + linear_swiglu and torch.compile of the plain ops;
- linear_residual (fuse-linear-residual: the residual add in a Triton GEMM's epilogue) vs cuBLAS's
  GEMM + the add (eager and torch.compile'd) at the block's down projection (2816 -> 1024) and
  output projection (1024 -> 1024), and rms_linear (fuse-norm-prologue's plain GEMM: the RMSNorm
  in the epilogue) vs our norm kernel + cuBLAS and torch.compile of the plain ops (1024 -> 2816,
  1024 -> 1024), fp32 with TF32 and bf16;
- pointwise (fuse-elementwise's generated kernel) for silu(gate) * up at the block's FFN shape
  vs the two PyTorch ops (eager, and torch.compile'd into Inductor's one kernel) and vs the copy
  floor of its traffic (read 2 rows, write 1), fp32 and bf16;
- decay_mlp (kernels/decay, opt-in MMREC_DECAY_KERNELS=1: the MDI decay's MLP W2 gelu(W1 x + b1) + b2
  as one kernel, the bottleneck on chip) vs the plain ops (cuBLAS GEMMs with their biases and
  a gelu; eager and torch.compile'd), and mdi_decay_fused (fuse-decay: both MLPs and the tail
  in one kernel) vs the plain mdi_decay, at the block's width (D 1024, R 256) and the 125M
  model's (D 768, R 192), keys of 256, fp32 with TF32 and bf16.

Each of our kernels is checked against the reference on the benchmark inputs before timing.

    python benchmarks/fusion.py [--only decay,norm,swiglu,gemm,pointwise,decaymlp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton

import kernels
from benchmarks.common import run_info
from kernels.nn.reference import rmsnorm as ref_rmsnorm

DEVICE = "cuda"
ROWS: list[dict] = []


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")


def timer(fn, leaves, grads):
    def run():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(), grads)

    return run


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def report(group: str, name: str, shape: str, fwd: float, fwd_bwd: float | None, base: dict | None) -> dict:
    entry = {"group": group, "name": name, "shape": shape, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
    ROWS.append(entry)
    vs = ""
    if base is not None:
        vs = f"  ours faster by {base['fwd_ms'] / fwd:.2f}x fwd"
        if fwd_bwd and base["fwd_bwd_ms"]:
            vs += f" / {base['fwd_bwd_ms'] / fwd_bwd:.2f}x fwd+bwd"
    fb = f"{fwd_bwd:8.3f}" if fwd_bwd is not None else "       -"
    print(f"  {name:<46} fwd {fwd:8.3f} ms  fwd+bwd {fb} ms{vs}", flush=True)
    return entry


def compare(group: str, shape: str, variants, args, grads) -> dict:
    """Time each (name, fn(*args)) forward and forward+backward; the "mmrec" row is compared with
    the torch.compile row before it. Returns the last row."""
    base = entry = None
    for name, fn in variants:
        with torch.no_grad():
            f = bench(lambda fn=fn: fn(*args))
        fb = bench(timer(lambda fn=fn: fn(*args), list(args), grads))
        entry = report(group, name, shape, f, fb, base if "mmrec" in name else None)
        if "compile" in name:
            base = entry
    return entry


def decay_section(bsz: int, steps: int, heads: int, dh: int) -> None:
    width = heads * dh
    shape = f"B{bsz} T{steps} H{heads} Dh{dh} fp32"
    print(f"decay tail + gated recurrence, {shape}")
    z, gz, a, c = (torch.randn(bsz, steps, width, device=DEVICE, requires_grad=True) for _ in range(4))
    w_g = (torch.randn(heads, dh, dh, device=DEVICE) / dh**0.5).requires_grad_()
    h0 = torch.randn(bsz, width, device=DEVICE, requires_grad=True)
    leaves = [z, gz, a, c, w_g, h0]
    grads = [torch.randn(bsz, steps, width, device=DEVICE), torch.randn(bsz, width, device=DEVICE)]

    def unfused(gate):
        return lambda: kernels.gated_recurrence(z, gz, gate(a, c), w_g, h0)

    compiled_gate = torch.compile(kernels.decay_gate, fullgraph=True)
    fused = lambda: kernels.decay_recurrence(z, gz, a, c, w_g, h0)  # noqa: E731
    with torch.no_grad():
        err = rel_err(fused()[0], unfused(kernels.decay_gate)()[0])
        assert err < 1e-4, f"decay_recurrence disagrees with tail + gated_recurrence: rel err {err:.1e}"
    rows = {}
    for name, fn in (
        ("tail eager + gated_recurrence", unfused(kernels.decay_gate)),
        ("tail torch.compile + gated_recurrence", unfused(compiled_gate)),
        ("mmrec decay_recurrence (fused)", fused),
    ):
        with torch.no_grad():
            f = bench(fn)
        rows[name] = (f, bench(timer(fn, leaves, grads)))
    base = None
    for name, (f, fb) in rows.items():
        entry = report("decay", name, shape, f, fb, base if "fused" in name else None)
        if "compile" in name:
            base = entry


def norm_section(rows: int, width: int) -> None:
    shape = f"{rows} rows x {width} fp32"
    print(f"residual add + rmsnorm, {shape}")
    a, b = (torch.randn(rows, width, device=DEVICE, requires_grad=True) for _ in range(2))
    w = (torch.rand(width, device=DEVICE) + 0.5).requires_grad_()
    grads = [torch.randn(rows, width, device=DEVICE) for _ in range(2)]

    def reference(a, b, w):
        s = a + b
        return s, ref_rmsnorm(s, w, 1e-6)

    compiled = torch.compile(reference, fullgraph=True)
    with torch.no_grad():
        s, u = kernels.add_rmsnorm(a, b, w, 1e-6)
        rs, ru = reference(a, b, w)
        assert torch.equal(s, rs) and rel_err(u, ru) < 1e-6, "add_rmsnorm disagrees with the reference"
    src, dst = torch.randn(2, rows, width, device=DEVICE), torch.empty(2, rows, width, device=DEVICE)
    floor = bench(lambda: dst.copy_(src))  # 2 rows read, 2 written: the forward's traffic
    print(f"  {'copy floor (read 2 rows, write 2 rows)':<46} fwd {floor:8.3f} ms")
    ROWS.append({"group": "norm", "name": "copy floor", "shape": shape, "fwd_ms": floor, "fwd_bwd_ms": None})
    variants = (
        ("reference eager", reference),
        ("reference torch.compile", compiled),
        ("mmrec add_rmsnorm (Triton)", lambda a, b, w: kernels.add_rmsnorm(a, b, w, 1e-6)),
    )
    ours = compare("norm", shape, variants, (a, b, w), grads)
    print(f"  mmrec add_rmsnorm forward: {ours['fwd_ms'] / floor:.2f}x the copy floor")


def swiglu_section(rows: int, width: int, hidden: int, dtype) -> None:
    shape = f"{rows} x {width} -> {hidden} {str(dtype).replace('torch.', '')}"
    print(f"SwiGLU up projection, {shape}")
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype, requires_grad=True)
    w_gate, w_up = (
        (torch.randn(hidden, width, device=DEVICE) / width**0.5).to(dtype).requires_grad_() for _ in range(2)
    )
    grads = [torch.randn(rows, hidden, device=DEVICE, dtype=dtype)]

    def unfused(x, w_gate, w_up):  # what fuse-projections alone leaves: one GEMM, then pointwise
        gate, up = torch.nn.functional.linear(x, torch.cat([w_gate, w_up])).split(hidden, dim=-1)
        return torch.nn.functional.silu(gate) * up

    compiled = torch.compile(unfused, fullgraph=True)
    with torch.no_grad():  # both against fp64: TF32 and bf16 products each carry their own error
        exact = unfused(x.double(), w_gate.double(), w_up.double())
        ours, theirs = rel_err(kernels.linear_swiglu(x, w_gate, w_up), exact), rel_err(unfused(x, w_gate, w_up), exact)
        print(f"  rel err vs fp64: mmrec {ours:.1e}, cuBLAS + pointwise {theirs:.1e}")
        assert ours < 1e-2, f"linear_swiglu is off: rel err {ours:.1e} vs fp64"
    w_both = torch.cat([w_gate, w_up]).detach()
    with torch.no_grad():
        gemm = bench(lambda: torch.nn.functional.linear(x, w_both))
    print(f"  {'cuBLAS GEMM alone, [N, 2F] out (no epilogue)':<46} fwd {gemm:8.3f} ms")
    ROWS.append({"group": "swiglu", "name": "cublas gemm alone", "shape": shape, "fwd_ms": gemm, "fwd_bwd_ms": None})
    variants = (
        ("GEMM + silu * up, eager", unfused),
        ("GEMM + silu * up, torch.compile", compiled),
        ("mmrec linear_swiglu (Triton, fused)", kernels.linear_swiglu),
    )
    compare("swiglu", shape, variants, (x, w_gate, w_up), grads)

    # fuse-norm-prologue: the residual add and RMSNorm before the GEMM. The default pipeline runs
    # add_rmsnorm (sum and normalised sum, one kernel) then the fused GEMM; fuse-norm-prologue
    # runs add_rstd (the sum and 1/rms per row) and the GEMM applies the norm in its epilogue.
    w_norm = (torch.rand(width, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    resid = torch.randn_like(x).requires_grad_()

    def default(x, resid, w_norm, w_gate, w_up):
        total, normed = kernels.add_rmsnorm(x, resid, w_norm, 1e-6)
        return total, kernels.linear_swiglu(normed, w_gate, w_up)

    def prologue(x, resid, w_norm, w_gate, w_up):
        total, rstd = kernels.add_rstd(x, resid, 1e-6)
        return total, kernels.rms_linear_swiglu(total, w_norm, w_gate, w_up, rstd=rstd)

    def plain(x, resid, w_norm, w_gate, w_up):
        total = x + resid
        return total, unfused(ref_rmsnorm(total, w_norm, 1e-6), w_gate, w_up)

    leaves = (x, resid, w_norm, w_gate, w_up)
    with torch.no_grad():
        exact = plain(*(t.double() for t in leaves))[1]
        ours = rel_err(prologue(*leaves)[1], exact)
        print(f"  with the residual add and RMSNorm: rel err vs fp64: mmrec {ours:.1e}")
        assert ours < 1e-2, f"rms_linear_swiglu is off: rel err {ours:.1e} vs fp64"
    variants = (
        ("add + rmsnorm + GEMM + silu * up, torch.compile", torch.compile(plain, fullgraph=True)),
        ("add_rmsnorm + linear_swiglu (default)", default),
        ("mmrec add_rstd + rms_linear_swiglu", prologue),
    )
    compare("swiglu", shape + " with add + rmsnorm", variants, leaves, [torch.randn_like(x), *grads])


def decay_mlp_section(rows: int, width: int, dtype) -> None:
    from kernels.decay import op as decay_op

    hidden = width // 4
    shape = f"{rows} x {width} -> {hidden} -> {width} {str(dtype).replace('torch.', '')}"
    print(f"MDI decay MLP, {shape}")
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(hidden, width, device=DEVICE, dtype=dtype) / width**0.5).requires_grad_()
    w2 = (torch.randn(width, hidden, device=DEVICE, dtype=dtype) / hidden**0.5).requires_grad_()
    b1, b2 = (torch.zeros(n, device=DEVICE, dtype=dtype, requires_grad=True) for n in (hidden, width))
    grads = [torch.randn(rows, width, device=DEVICE, dtype=dtype)]

    def plain(x, w1, b1, w2, b2):
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)

    compiled = torch.compile(plain, fullgraph=True)
    args = (x, w1, b1, w2, b2)
    with torch.no_grad():
        exact = plain(*(t.double() for t in args))
        ours, theirs = rel_err(decay_op.mlp(*args), exact), rel_err(plain(*args), exact)
        print(f"  rel err vs fp64: mmrec {ours:.1e}, plain ops {theirs:.1e}")
        assert ours < 1e-2, f"decay_mlp is off: rel err {ours:.1e} vs fp64"
    variants = (
        ("plain ops, eager", plain),
        ("plain ops, torch.compile", compiled),
        ("mmrec decay_mlp (Triton, fused)", decay_op.mlp),
    )
    compare("decaymlp", shape, variants, args, grads)

    from kernels.decay import reference as decay_ref

    k = torch.randn(rows, 256, device=DEVICE, dtype=dtype, requires_grad=True)
    c1 = (torch.randn(hidden, 256, device=DEVICE, dtype=dtype) / 16).requires_grad_()
    c2 = (torch.randn(width, hidden, device=DEVICE, dtype=dtype) / hidden**0.5).requires_grad_()
    cb1, cb2 = (torch.zeros(n, device=DEVICE, dtype=dtype, requires_grad=True) for n in (hidden, width))
    decay_args = (x, k, w1, b1, w2, b2, c1, cb1, c2, cb2)

    def plain_decay(*a):
        return decay_ref.mdi_decay(*a, 1e-6)

    with torch.no_grad():
        exact = plain_decay(*(t.double() for t in decay_args))
        ours = rel_err(kernels.mdi_decay_fused(*decay_args, eps=1e-6), exact)
        theirs = rel_err(plain_decay(*decay_args), exact)
        print(f"  whole decay: rel err vs fp64: mmrec {ours:.1e}, plain ops {theirs:.1e}")
        assert ours < 1e-2, f"mdi_decay_fused is off: rel err {ours:.1e} vs fp64"
    variants = (
        ("whole decay, plain ops, eager", plain_decay),
        ("whole decay, plain ops, torch.compile", torch.compile(plain_decay, fullgraph=True)),
        ("mmrec mdi_decay_fused (Triton, one kernel)", lambda *a: kernels.mdi_decay_fused(*a, eps=1e-6)),
    )
    compare("decaymlp", shape + " (whole decay)", variants, decay_args, grads)


def pointwise_section(rows: int, hidden: int, dtype) -> None:
    shape = f"{rows} x {hidden} {str(dtype).replace('torch.', '')}"
    print(f"silu(gate) * up, {shape}")
    gate, up = (torch.randn(rows, hidden, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    grads = [torch.randn(rows, hidden, device=DEVICE, dtype=dtype)]

    def plain(gate, up):
        return torch.nn.functional.silu(gate) * up

    def generated(gate, up):
        return kernels.pointwise((gate, up), "mul(silu(%0), %1)")

    with torch.no_grad():
        err = rel_err(generated(gate, up), plain(gate.double(), up.double()))
        print(f"  rel err vs fp64: {err:.1e}")
        assert err < 1e-2, f"the generated kernel is off: rel err {err:.1e}"
    src = torch.randn(2, rows, hidden, device=DEVICE, dtype=dtype)
    dst = torch.empty(rows, hidden, device=DEVICE, dtype=dtype)
    floor = bench(lambda: torch.add(src[0], src[1], out=dst))  # 2 rows read, 1 written
    print(f"  {'floor (add: read 2 rows, write 1)':<46} fwd {floor:8.3f} ms")
    ROWS.append({"group": "pointwise", "name": "floor", "shape": shape, "fwd_ms": floor, "fwd_bwd_ms": None})
    variants = (
        ("silu * up, eager", plain),
        ("silu * up, torch.compile", torch.compile(plain, fullgraph=True)),
        ("mmrec pointwise (generated Triton)", generated),
    )
    ours = compare("pointwise", shape, variants, (gate, up), grads)
    print(f"  mmrec pointwise forward: {ours['fwd_ms'] / floor:.2f}x the floor")


def gemm_section(rows: int, width: int, out_width: int, dtype) -> None:
    """fuse-linear-residual and fuse-norm-prologue's plain GEMM (kernels/linear/gemm.py): the
    down projection with the residual add (x + h W^T, h [N, F], F -> D) and the input
    projection with the RMSNorm before it (rmsnorm(x) W^T, D -> the five fused outputs)."""
    shape = f"{rows} x {width} -> {out_width} {str(dtype).replace('torch.', '')}"
    print(f"GEMM + residual add, {shape}")
    h = torch.randn(rows, width, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_width, width, device=DEVICE) / width**0.5).to(dtype).requires_grad_()
    x = torch.randn(rows, out_width, device=DEVICE, dtype=dtype, requires_grad=True)
    grads = [torch.randn(rows, out_width, device=DEVICE, dtype=dtype)]

    def plain(h, w, x):
        return x + torch.nn.functional.linear(h, w)

    with torch.no_grad():
        exact = plain(h.double(), w.double(), x.double())
        ours = rel_err(kernels.linear_residual(h, w, x), exact)
        print(f"  rel err vs fp64: mmrec {ours:.1e}, cuBLAS + add {rel_err(plain(h, w, x), exact):.1e}")
        assert ours < 1e-2, f"linear_residual is off: rel err {ours:.1e} vs fp64"
        gemm = bench(lambda: torch.nn.functional.linear(h, w))
    print(f"  {'cuBLAS GEMM alone (no add)':<46} fwd {gemm:8.3f} ms")
    ROWS.append({"group": "gemm", "name": "cublas gemm alone", "shape": shape, "fwd_ms": gemm, "fwd_bwd_ms": None})
    variants = (
        ("GEMM + add, eager", plain),
        ("GEMM + add, torch.compile", torch.compile(plain, fullgraph=True)),
        ("mmrec linear_residual (Triton, fused)", kernels.linear_residual),
    )
    compare("gemm", shape + " + residual", variants, (h, w, x), grads)

    # the norm: x [N, out_width] normalised, then projected back to `width` columns
    w_norm = (torch.rand(out_width, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    w_in = (torch.randn(width, out_width, device=DEVICE) / out_width**0.5).to(dtype).requires_grad_()
    grads = [torch.randn(rows, width, device=DEVICE, dtype=dtype)]

    def norm_then_gemm(x, w_norm, w_in):
        return torch.nn.functional.linear(ref_rmsnorm(x, w_norm, 1e-6), w_in)

    def default(x, w_norm, w_in):  # the default pipeline: our norm kernel, then cuBLAS
        return torch.nn.functional.linear(kernels.rmsnorm(x, w_norm, 1e-6), w_in)

    with torch.no_grad():
        exact = norm_then_gemm(x.double(), w_norm.double(), w_in.double())
        ours = rel_err(kernels.rms_linear(x, w_norm, w_in, 1e-6), exact)
        print(f"  with the RMSNorm ({out_width} -> {width}): rel err vs fp64: mmrec {ours:.1e}")
        assert ours < 1e-2, f"rms_linear is off: rel err {ours:.1e} vs fp64"
    variants = (
        ("rmsnorm + GEMM, torch.compile", torch.compile(norm_then_gemm, fullgraph=True)),
        ("rmsnorm kernel + cuBLAS (default)", default),
        ("mmrec rms_linear (norm in the epilogue)", lambda *a: kernels.rms_linear(*a, 1e-6)),
    )
    compare("gemm", f"{rows} x {out_width} -> {width} with rmsnorm", variants, (x, w_norm, w_in), grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default="decay,norm,swiglu,gemm,pointwise,decaymlp", help="comma-separated sections")
    args = parser.parse_args()
    info = run_info("benchmarks/fusion.py")
    torch.manual_seed(0)
    sections = set(args.only.split(","))
    if "decay" in sections:
        decay_section(8, 4096, 16, 64)
        decay_section(16, 1024, 16, 64)
    if "norm" in sections:
        norm_section(8 * 4096, 1024)
    if "swiglu" in sections:
        # fp32 runs with TF32 products, as the block benchmark and fp32 training do.
        torch.set_float32_matmul_precision("high")
        swiglu_section(8 * 4096, 1024, 2816, torch.float32)
        swiglu_section(8 * 4096, 1024, 2816, torch.bfloat16)
    if "gemm" in sections:
        torch.set_float32_matmul_precision("high")
        for dtype in (torch.float32, torch.bfloat16):
            gemm_section(8 * 4096, 2816, 1024, dtype)  # the FFN's down projection + residual
            gemm_section(8 * 4096, 1024, 1024, dtype)  # the mixer's output projection + residual
    if "decaymlp" in sections:
        torch.set_float32_matmul_precision("high")
        for width in (1024, 768):
            for dtype in (torch.float32, torch.bfloat16):
                decay_mlp_section(8 * 4096, width, dtype)
    if "pointwise" in sections:
        pointwise_section(8 * 4096, 2816, torch.float32)
        pointwise_section(8 * 4096, 2816, torch.bfloat16)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
