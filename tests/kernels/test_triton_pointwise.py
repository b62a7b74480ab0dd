"""Kernels generated from pointwise expressions (fuse-elementwise) vs the plain ops in fp64:
every elementwise op and its generated derivative, shared subexpressions, an input used twice,
infinite clamp bounds, sizes that are not a multiple of the block, fp32/bf16, NaN-poisoned
outputs (forward and gradients), NaN propagation. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.pointwise import kernel, reference
from mmrec_ir.pointwise import parse_expr
from tests.conftest import TRITON_DEVICE, assert_close

pytestmark = pytest.mark.triton

EXPRS = [
    "mul(silu(%0), %1)",
    "add(clamp(mul(%0, %1), min=-0.5, max=1.0), %0)",
    "scale(gelu(sub(exp(neg(%0)), log(sigmoid(%1)))), factor=-0.5)",
    "clamp(%0, min=-inf, max=0.25)",
    "mul(sigmoid(%2), add(%0, %1))",
    "sub(mul(%0, %0), scale(silu(%0), factor=3.0))",
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("text", EXPRS)
def test_generated_kernel_matches_the_plain_ops(text, dtype):
    expr = parse_expr(text)
    xs = [torch.randn(3, 37, 11).to(TRITON_DEVICE, dtype).requires_grad_() for _ in range(len(expr.inputs()))]
    out = kernels.pointwise(xs, text)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), xs)
    ref_xs = [x.detach().cpu().double().requires_grad_() for x in xs]
    want = reference.evaluate(expr, ref_xs)
    want_grads = torch.autograd.grad((want * dout.cpu().double()).sum(), ref_xs)
    # Both directions compute in fp32 and round once to the inputs' dtype.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert_close(out.cpu(), want, what=text, **tol)
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close(g.cpu(), w, what=f"d%{i}", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_slices_are_read_in_place(dtype, monkeypatch):
    """gate and up as a fused projection gives them: column slices of one [B, T, 2n] output, and a
    gradient that is itself a slice; a mixed-in expanded input is copied. No input is copied
    first (the kernel reads each slice's rows at its stride)."""
    both = torch.randn(2, 37, 2 * 13).to(TRITON_DEVICE, dtype).requires_grad_()
    gate, up = both.split(13, dim=-1)
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or real(t, *a, **k))
    out = kernels.pointwise((gate, up), "mul(silu(%0), %1)")
    dout = torch.randn(2, 37, 26).to(TRITON_DEVICE, dtype)[..., 5:18]
    (grad,) = torch.autograd.grad(out, both, dout)
    assert copies == [], f"copied inputs of shapes {copies}"
    ref = both.detach().double().cpu().requires_grad_()
    g, u = ref.split(13, dim=-1)
    want = torch.nn.functional.silu(g) * u
    (want_grad,) = torch.autograd.grad(want, ref, dout.double().cpu())
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert out.is_contiguous()
    assert_close(out.cpu(), want, what="silu(gate) * up", **tol)
    assert_close(grad.cpu(), want_grad, what="d[gate, up]", **tol)
    monkeypatch.undo()
    wide = torch.randn(37, 1).to(TRITON_DEVICE, dtype).expand(37, 13)  # a stride-0 last dim
    got = kernels.pointwise((gate[0], wide), "add(%0, %1)")
    assert_close(got.cpu(), (gate[0] + wide).detach().cpu(), what="add", **tol)


def test_launches_the_generated_kernel_and_keeps_nan():
    xs = [torch.randn(1000).to(TRITON_DEVICE) for _ in range(2)]
    xs[0][7] = float("nan")
    out = kernel.launch(parse_expr("clamp(mul(%0, %1), min=0.0, max=1.0)"), xs)
    assert torch.isnan(out[7]) and not torch.isnan(out[:7]).any() and not torch.isnan(out[8:]).any()
    want = torch.clamp(xs[0] * xs[1], 0.0, 1.0)
    assert torch.equal(out[8:], want[8:])


def test_generated_source_is_cached_by_its_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "_loaded", {})
    expr = parse_expr("mul(silu(%0), silu(%0))")  # the shared silu is computed once a kernel
    text = kernel.source(expr, 1)
    forward = text[: text.index("def pointwise_backward")]
    assert forward.count("tl.sigmoid") == 1
    fn = kernel.compiled(expr, 1)
    files = list((tmp_path / "pointwise").glob("pw_*.py"))
    assert len(files) == 1 and files[0].read_text() == text and kernel.compiled(expr, 1) is fn


def test_bad_inputs_are_one_line_errors():
    x = torch.randn(4, 5)
    with pytest.raises(kernels.KernelInputError, match=r"pointwise: xs\[1\]: expected \[4, 5\] torch.float32"):
        kernels.pointwise((x, x[:, :3]), "add(%0, %1)")
    with pytest.raises(kernels.KernelInputError, match="pointwise: expr: 'tanh' is not an elementwise op"):
        kernels.pointwise((x,), "tanh(%0)")
    with pytest.raises(kernels.KernelInputError, match="reads %1, got 1 inputs"):
        kernels.pointwise((x,), "add(%0, %1)")
