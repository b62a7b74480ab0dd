"""Triton kernels generated from `pointwise` expressions (fuse-elementwise): one program per
BLOCK elements of the flattened inputs; every input is read once and upcast to fp32, the whole
expression is evaluated in registers and the result rounded once to the output dtype. The
backward kernel reads the inputs and the output's gradient once, recomputes the temporaries and
writes every input's gradient, by reverse-mode rules generated from the same expression.

Triton compiles a function from its source file, so the generated source is written to a file
named by its hash in a per-user cache directory (atomically: parallel test workers share it)
and imported from there, as Inductor does with its own kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import triton
from torch import Tensor

from mmrec_ir.pointwise import Expr

from ..config import knobs, new_output

BLOCK = 1024
BLOCK_INTERPRET = 64
_loaded: dict[tuple[str, int], object] = {}


def _const(v: float) -> str:
    return f'float("{"inf" if v > 0 else "-inf"}")' if math.isinf(v) else repr(float(v))


def _emit(expr: Expr, lines: list[str], names: dict[Expr, str]) -> str:
    """Python/Triton code for `expr`, one temporary per op (shared subexpressions once)."""
    if expr.op == "input":
        return f"x{expr.index}"
    if expr in names:
        return names[expr]
    a = [_emit(arg, lines, names) for arg in expr.args]
    attrs = dict(expr.attrs)
    code = {
        "sigmoid": lambda: f"tl.sigmoid({a[0]})",
        "silu": lambda: f"{a[0]} * tl.sigmoid({a[0]})",
        # erf form, as torch's default gelu
        "gelu": lambda: f"0.5 * {a[0]} * (1.0 + tl.math.erf({a[0]} * 0.7071067811865476))",
        "log": lambda: f"tl.log({a[0]})",
        "exp": lambda: f"tl.exp({a[0]})",
        "neg": lambda: f"-{a[0]}",
        "add": lambda: f"{a[0]} + {a[1]}",
        "sub": lambda: f"{a[0]} - {a[1]}",
        "mul": lambda: f"{a[0]} * {a[1]}",
        "scale": lambda: f"{a[0]} * {_const(attrs['factor'])}",
        # NaN stays NaN, as in torch.clamp
        "clamp": lambda: (
            f"tl.clamp({a[0]}, {_const(attrs['min'])}, {_const(attrs['max'])}, propagate_nan=tl.PropagateNan.ALL)"
        ),
    }[expr.op]()
    name = f"t{len(names)}"
    names[expr] = name
    lines.append(f"    {name} = {code}")
    return name


def _adjoints(expr: Expr, names: dict[Expr, str], lines: list[str]) -> dict[str, str]:
    """Reverse-mode derivative code: from the upstream gradient `g` of the expression's value,
    the gradient variable of every temporary and input (`d_<name>`), each op's rule as torch's
    autograd has it (clamp passes the gradient where min <= x <= max, inclusive)."""
    grads: dict[str, str] = {}

    def add(target: str, code: str) -> None:
        var = f"d_{target}"
        lines.append(f"    {var} = {var} + {code}" if target in grads else f"    {var} = {code}")
        grads[target] = var

    def ref(e: Expr) -> str:
        return f"x{e.index}" if e.op == "input" else names[e]

    add(ref(expr), "g")
    for node in reversed(list(names)):  # emission order is a topological order
        out = names[node]
        if out not in grads:
            continue
        g, a = grads[out], [ref(arg) for arg in node.args]
        attrs = dict(node.attrs)
        if node.op == "sigmoid":
            add(a[0], f"{g} * {out} * (1.0 - {out})")
        elif node.op == "silu":
            lines.append(f"    s_{out} = tl.sigmoid({a[0]})")
            add(a[0], f"{g} * s_{out} * (1.0 + {a[0]} * (1.0 - s_{out}))")
        elif node.op == "gelu":
            cdf = f"0.5 * (1.0 + tl.math.erf({a[0]} * 0.7071067811865476))"
            pdf = f"tl.exp(-0.5 * {a[0]} * {a[0]}) * 0.3989422804014327"
            add(a[0], f"{g} * ({cdf} + {a[0]} * {pdf})")
        elif node.op == "log":
            add(a[0], f"{g} / {a[0]}")
        elif node.op == "exp":
            add(a[0], f"{g} * {out}")
        elif node.op == "neg":
            add(a[0], f"-{g}")
        elif node.op == "add":
            add(a[0], g)
            add(a[1], g)
        elif node.op == "sub":
            add(a[0], g)
            add(a[1], f"-{g}")
        elif node.op == "mul":
            add(a[0], f"{g} * {a[1]}")
            add(a[1], f"{g} * {a[0]}")
        elif node.op == "scale":
            add(a[0], f"{g} * {_const(attrs['factor'])}")
        elif node.op == "clamp":
            inside = f"({a[0]} >= {_const(attrs['min'])}) & ({a[0]} <= {_const(attrs['max'])})"
            add(a[0], f"tl.where({inside}, {g}, 0.0)")
    return grads


def source(expr: Expr, n_inputs: int) -> str:
    """The kernels' source: `pointwise_kernel(X0, .., OUT, S0, .., M, N, BLOCK_M, BLOCK_N)` and its
    backward `pointwise_backward(X0, .., DOUT, DX0, .., S0, .., SG, M, N, BLOCK_M, BLOCK_N)`, which
    recomputes the value's temporaries in registers and writes every input's gradient in the same
    pass. Every operand is M rows of N elements; input i's rows lie S{i} elements apart (a column
    slice of a wider tensor, such as one output of a fused projection, is read in place), the
    outputs and gradients are contiguous."""
    xs = [f"X{i}" for i in range(n_inputs)]
    dxs = [f"DX{i}" for i in range(n_inputs)]
    strides = [f"S{i}" for i in range(n_inputs)]
    loads = [
        f"    x{i} = tl.load(X{i} + rows * S{i} + cols, mask=mask, other=0.0).to(tl.float32)" for i in range(n_inputs)
    ]
    head = [
        "    pid = tl.program_id(0)",
        "    col_blocks = tl.cdiv(N, BLOCK_N)",
        "    rows = ((pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]",
        "    cols = ((pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]",
        "    mask = (rows < M) & (cols < N)",
        *loads,
    ]
    lines = [
        '"""Generated by mmrec (kernels/pointwise) from the expression',
        f"    {expr}",
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def pointwise_kernel({', '.join(xs)}, OUT, {', '.join(strides)}, M, N,"
        " BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        *head,
    ]
    names: dict[Expr, str] = {}
    result = _emit(expr, lines, names)
    lines.append(f"    tl.store(OUT + rows * N + cols, {result}.to(OUT.dtype.element_ty), mask=mask)")
    signature = (
        f"{', '.join(xs)}, DOUT, {', '.join(dxs)}, {', '.join(strides)}, SG, M, N,"
        " BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr"
    )
    lines += ["", "", "@triton.jit", f"def pointwise_backward({signature}):"]
    lines += head
    lines.append("    g = tl.load(DOUT + rows * SG + cols, mask=mask, other=0.0).to(tl.float32)")
    names = {}
    _emit(expr, lines, names)
    grads = _adjoints(expr, names, lines)
    for i in range(n_inputs):
        grad = grads.get(f"x{i}", "tl.zeros_like(g)")
        lines.append(f"    tl.store(DX{i} + rows * N + cols, {grad}.to(DX{i}.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def cache_dir() -> Path:
    root = os.environ.get("MMREC_CACHE_DIR") or Path(tempfile.gettempdir()) / f"mmrec-{os.getuid()}"
    path = Path(root) / "pointwise"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiled(expr: Expr, n_inputs: int):
    """The module of `expr`'s jitted kernels (generated, written and imported once per process)."""
    key = (str(expr), n_inputs)
    if key not in _loaded:
        text = source(expr, n_inputs)
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]
        path = cache_dir() / f"pw_{digest}.py"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"mmrec_pointwise_{digest}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[key] = module
    return _loaded[key]


def rows_of(xs: list[Tensor]) -> tuple[list[Tensor], int, int]:
    """Same-shaped tensors as M x N row views and (M, N): the whole tensor as one row when every
    input is contiguous; otherwise rows of the last dimension, read in place where a tensor's
    leading dimensions merge into one row stride (e.g. a column slice), else copied."""
    if all(x.is_contiguous() for x in xs):
        return [x.view(1, -1) for x in xs], 1, xs[0].numel()
    n = xs[0].shape[-1] if xs[0].dim() else 1
    views = []
    for x in xs:
        try:
            view = x.view(-1, n)
        except RuntimeError:  # leading dims that do not merge into one stride
            view = x.contiguous().view(-1, n)
        views.append(view if view.stride(-1) == 1 or n == 1 else view.contiguous())
    return views, views[0].shape[0], n


def launch(expr: Expr, xs: list[Tensor]) -> Tensor:
    """Same-shaped inputs (any row strides) -> the expression's value, contiguous, one kernel."""
    out = new_output(xs[0])
    rows, m, n = rows_of(xs)
    _run(compiled(expr, len(xs)).pointwise_kernel, *rows, out, *(r.stride(0) for r in rows), m=m, n=n)
    return out


def launch_backward(expr: Expr, xs: list[Tensor], dout: Tensor) -> list[Tensor]:
    """The inputs and the output's gradient (any row strides) -> every input's gradient, one kernel."""
    grads = [new_output(x) for x in xs]
    rows, m, n = rows_of([*xs, dout])
    fn = compiled(expr, len(xs)).pointwise_backward
    _run(fn, *rows[:-1], rows[-1], *grads, *(r.stride(0) for r in rows), m=m, n=n)
    return grads


def _run(fn, *args, m: int, n: int) -> None:
    """One program per BLOCK_M x BLOCK_N tile of the m x n elements (none when empty)."""
    if m * n:
        block = BLOCK_INTERPRET if knobs.interpret else BLOCK
        block_n = min(triton.next_power_of_2(n), block)
        block_m = max(1, block // block_n)
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        fn[grid](*args, m, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
