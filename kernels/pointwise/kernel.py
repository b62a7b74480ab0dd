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
    """The kernels' source: `pointwise_kernel(X0, .., X{n-1}, OUT, N, BLOCK)` and its backward
    `pointwise_backward(X0, .., DOUT, DX0, .., N, BLOCK)`, which recomputes the value's
    temporaries in registers and writes every input's gradient in the same pass."""
    xs = [f"X{i}" for i in range(n_inputs)]
    dxs = [f"DX{i}" for i in range(n_inputs)]
    loads = [f"    x{i} = tl.load(X{i} + offs, mask=mask, other=0.0).to(tl.float32)" for i in range(n_inputs)]
    head = [
        "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < N",
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
        f"def pointwise_kernel({', '.join(xs)}, OUT, N, BLOCK: tl.constexpr):",
        *head,
    ]
    names: dict[Expr, str] = {}
    result = _emit(expr, lines, names)
    lines.append(f"    tl.store(OUT + offs, {result}.to(OUT.dtype.element_ty), mask=mask)")
    signature = f"{', '.join(xs)}, DOUT, {', '.join(dxs)}, N, BLOCK: tl.constexpr"
    lines += ["", "", "@triton.jit", f"def pointwise_backward({signature}):"]
    lines += head
    lines.append("    g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)")
    names = {}
    _emit(expr, lines, names)
    grads = _adjoints(expr, names, lines)
    for i in range(n_inputs):
        grad = grads.get(f"x{i}", "tl.zeros_like(g)")
        lines.append(f"    tl.store(DX{i} + offs, {grad}.to(DX{i}.dtype.element_ty), mask=mask)")
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


def launch(expr: Expr, xs: list[Tensor]) -> Tensor:
    """Contiguous same-shaped inputs -> the expression's value, one kernel."""
    out = new_output(xs[0])
    _run(compiled(expr, len(xs)).pointwise_kernel, *xs, out, n=out.numel())
    return out


def launch_backward(expr: Expr, xs: list[Tensor], dout: Tensor) -> list[Tensor]:
    """Contiguous inputs and the output's gradient -> every input's gradient, one kernel."""
    grads = [new_output(x) for x in xs]
    _run(compiled(expr, len(xs)).pointwise_backward, *xs, dout, *grads, n=dout.numel())
    return grads


def _run(fn, *tensors: Tensor, n: int) -> None:
    """One program per BLOCK of the n elements (none when empty)."""
    if n:
        block = BLOCK_INTERPRET if knobs.interpret else BLOCK
        fn[(triton.cdiv(n, block),)](*tensors, n, BLOCK=block, num_warps=4)
