"""The op set: each op declares its operands, attributes (with defaults) and a type rule.

A type rule takes the operand types (in declared order, keyword-named) and the attributes,
and returns the output types or raises ShapeError with "expected ..., got ..." wording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ShapeError
from .types import DType, MemoryType, Shape, TensorType, Type

REQUIRED = object()
# Attributes any node may carry and its op ignores: annotations passes leave for later stages
# and for people reading the IR (select-kernels records which kernel claims the node).
ANNOTATIONS = ("kernel",)


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple[str, ...]  # a trailing "*" marks one variadic operand
    attrs: dict[str, object]  # name -> default (REQUIRED if none)
    rule: Callable[..., list[Type]]
    doc: str

    @property
    def variadic(self) -> bool:
        return bool(self.operands) and self.operands[-1].endswith("*")

    def infer(self, in_types: list[Type], attrs: dict[str, object]) -> list[Type]:
        if self.variadic:
            fixed = len(self.operands) - 1
            if len(in_types) < fixed + 1:
                raise ShapeError(f"expected at least {fixed + 1} operands, got {len(in_types)}")
            args = dict(zip(self.operands[:-1], in_types[:fixed], strict=True))
            args[self.operands[-1].rstrip("*")] = in_types[fixed:]
        else:
            # Trailing operands spelled "name?" may be left out; the rule then sees None.
            required = [o for o in self.operands if not o.endswith("?")]
            if not len(required) <= len(in_types) <= len(self.operands):
                count = (
                    str(len(required))
                    if len(required) == len(self.operands)
                    else f"{len(required)}-{len(self.operands)}"
                )
                raise ShapeError(f"expected {count} operands ({', '.join(self.operands)}), got {len(in_types)}")
            padded = list(in_types) + [None] * (len(self.operands) - len(in_types))
            args = dict(zip((o.rstrip("?") for o in self.operands), padded, strict=True))
        full = {k: attrs.get(k, v) for k, v in self.attrs.items()}
        return self.rule(**args, **full)


OPS: dict[str, OpDef] = {}


def op(name: str, operands: tuple[str, ...], **attrs: object):
    def register(rule: Callable[..., list[Type]]) -> Callable[..., list[Type]]:
        OPS[name] = OpDef(name, operands, attrs, rule, (rule.__doc__ or "").strip())
        return rule

    return register


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def tensor(what: str, t: Type, rank: int | None = None) -> TensorType:
    if not isinstance(t, TensorType):
        raise ShapeError(f"{what}: expected a tensor, got {t}")
    if rank is not None and t.rank != rank:
        raise ShapeError(f"{what}: expected rank {rank}, got {t} (rank {t.rank})")
    return t


def expect(what: str, t: Type, shape: Shape, dtype: DType | None = None) -> TensorType:
    t = tensor(what, t)
    if tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{what}: expected shape {shape_str(shape)}, got {shape_str(t.shape)}")
    if dtype is not None and t.dtype is not dtype:
        raise ShapeError(f"{what}: expected dtype {dtype.value}, got {t.dtype.value}")
    return t


def floating(what: str, t: Type) -> TensorType:
    t = tensor(what, t)
    if not t.dtype.is_float:
        raise ShapeError(f"{what}: expected a floating dtype, got {t.dtype.value}")
    return t


def seq(what: str, t: Type) -> TensorType:
    """A [B, T, width] activation."""
    return floating(what, tensor(what, t, rank=3))


def positive_ints(what: str, values: object) -> tuple[int, ...]:
    if not isinstance(values, tuple) or not all(isinstance(v, int) and v > 0 for v in values):
        raise ShapeError(f"attribute {what}: expected a list of positive integers, got {values!r}")
    return values


# Structure and projections.


@op("embedding", ("ids", "table"))
def _embedding(ids, table):
    """Row gather: ids [B, T] i64, table [V, D] -> [B, T, D]."""
    ids = tensor("ids", ids, rank=2)
    if ids.dtype is not DType.i64:
        raise ShapeError(f"ids: expected dtype i64, got {ids.dtype.value}")
    table = floating("table", tensor("table", table, rank=2))
    return [TensorType(table.dtype, (*ids.shape, table.shape[1]))]


@op("linear", ("x", "weights*"), splits=())
def _linear(x, weights, splits):
    """y = x @ cat(weights)^T, each weight [out_i, in]: one GEMM. Its columns are split into
    outputs by `splits`, or one output per weight without it."""
    x = floating("x", x)
    if not weights:
        raise ShapeError("weights: expected at least one weight, got none")
    rows = []
    for i, w in enumerate(weights):
        what = "weight" if len(weights) == 1 else f"weights[{i}]"
        w = tensor(what, w, rank=2)
        rows.append(expect(what, w, (w.shape[0], x.shape[-1]), x.dtype).shape[0])
    sizes = positive_ints("splits", splits) if splits else tuple(rows)
    if sum(sizes) != sum(rows):
        raise ShapeError(f"splits {list(sizes)} sum to {sum(sizes)}, expected weight rows {sum(rows)}")
    return [x.with_shape((*x.shape[:-1], s)) for s in sizes]


@op("rms_linear", ("x", "w_norm", "rstd", "weights*"), splits=(), eps=1e-6)
def _rms_linear(x, w_norm, rstd, weights, splits, eps):
    """linear(rmsnorm(x, w_norm), weights...): one GEMM applying the norm in its epilogue
    (fuse-norm-prologue), with the rows' 1/rms given (rstd f32, x's shape without the last dim:
    from the add_rstd or rms_stats that read x)."""
    x = floating("x", x)
    expect("w_norm", w_norm, (x.shape[-1],), x.dtype)
    expect("rstd", rstd, x.shape[:-1], DType.f32)
    return _linear(x, weights, splits)


@op("rms_stats", ("x",), eps=1e-6)
def _rms_stats(x, eps):
    """1 / sqrt(mean(x^2, last dim) + eps) per row, f32: an RMSNorm's statistics for a GEMM that
    applies the norm itself (fuse-norm-prologue), where no add before it can give them."""
    x = floating("x", x)
    return [TensorType(DType.f32, x.shape[:-1])]


@op("linear_residual", ("x", "weight", "residual"))
def _linear_residual(x, weight, residual):
    """residual + x @ weight^T: one GEMM that adds the residual in its epilogue
    (fuse-linear-residual)."""
    y = _linear(x, [weight], ())[0]
    expect("residual", residual, y.shape, y.dtype)
    return [y]


@op("linear_swiglu", ("x", "w_gate", "w_up"))
def _linear_swiglu(x, w_gate, w_up):
    """silu(x @ w_gate^T) * (x @ w_up^T): one GEMM with the SwiGLU epilogue (fuse-epilogue)."""
    x = floating("x", x)
    f = tensor("w_gate", w_gate, rank=2).shape[0]
    expect("w_gate", w_gate, (f, x.shape[-1]), x.dtype)
    expect("w_up", w_up, (f, x.shape[-1]), x.dtype)
    return [x.with_shape((*x.shape[:-1], f))]


@op("rms_linear_swiglu", ("x", "w_norm", "w_gate", "w_up", "rstd?"), eps=1e-6)
def _rms_linear_swiglu(x, w_norm, w_gate, w_up, rstd, eps):
    """linear_swiglu(rmsnorm(x, w_norm), w_gate, w_up): the norm applied in the GEMM's epilogue
    (fuse-norm-prologue). rstd (x's shape without the last dim, f32): the rows' 1/rms from the
    add_rstd that made x (its eps then rules); without it the op computes them (one more read of x)."""
    x = floating("x", x)
    expect("w_norm", w_norm, (x.shape[-1],), x.dtype)
    if rstd is not None:
        expect("rstd", rstd, x.shape[:-1], DType.f32)
    return _linear_swiglu(x, w_gate, w_up)


@op("rmsnorm", ("x", "weight"), eps=1e-6)
def _rmsnorm(x, weight, eps):
    """x / sqrt(mean(x^2, last dim) + eps) * weight."""
    x = floating("x", x)
    expect("weight", weight, (x.shape[-1],), x.dtype)
    return [x]


def _same(lhs: Type, rhs: Type) -> list[Type]:
    a = floating("lhs", lhs)
    expect("rhs", rhs, a.shape, a.dtype)
    return [a]


for _name in ("add", "sub", "mul"):
    op(_name, ("lhs", "rhs"))(_same)

for _name in ("sigmoid", "gelu", "silu", "log", "exp", "neg"):
    op(_name, ("x",))(lambda x: [floating("x", x)])


@op("clamp", ("x",), min=REQUIRED, max=REQUIRED)
def _clamp(x, min, max):
    """Elementwise clamp to [min, max] (zero gradient outside)."""
    if not min <= max:
        raise ShapeError(f"attribute min={min} exceeds max={max}")
    return [floating("x", x)]


@op("scale", ("x",), factor=REQUIRED)
def _scale(x, factor):
    """x * factor (a compile-time constant)."""
    return [floating("x", x)]


@op("pointwise", ("xs*",), expr=REQUIRED)
def _pointwise(xs, expr):
    """One elementwise expression over same-typed inputs, `expr` in the ops' own names with the
    inputs by position (e.g. `mul(silu(%0), %1)`): a chain of elementwise ops that
    fuse-elementwise made one kernel."""
    from .pointwise import parse_expr

    first = floating("xs[0]", xs[0])
    for i, t in enumerate(xs[1:], 1):
        expect(f"xs[{i}]", t, first.shape, first.dtype)
    if not isinstance(expr, str):
        raise ShapeError(f"attribute expr: expected a string, got {expr!r}")
    used = parse_expr(expr).inputs()
    if used != set(range(len(xs))):
        raise ShapeError(f"expr: expected to use inputs %0..%{len(xs) - 1} each, uses {sorted(used)}")
    return [first]


@op("split", ("x",), sizes=REQUIRED)
def _split(x, sizes):
    """Split the last dim into pieces of the given sizes."""
    x = floating("x", x)
    sizes = positive_ints("sizes", sizes)
    if sum(sizes) != x.shape[-1]:
        raise ShapeError(f"sizes {list(sizes)} sum to {sum(sizes)}, expected {x.shape[-1]}")
    return [x.with_shape((*x.shape[:-1], s)) for s in sizes]


@op("concat", ("xs*",))
def _concat(xs):
    """Concatenate along the last dim."""
    first = floating("xs[0]", xs[0])
    total = 0
    for i, t in enumerate(xs):
        t = expect(f"xs[{i}]", t, (*first.shape[:-1], tensor(f"xs[{i}]", t).shape[-1]), first.dtype)
        if not isinstance(t.shape[-1], int):
            raise ShapeError(f"xs[{i}]: last dim must be concrete, got {t.shape[-1]}")
        total += t.shape[-1]
    return [first.with_shape((*first.shape[:-1], total))]


# MM-Rec ops (SPEC.md).


def _decay_mlps(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2) -> TensorType:
    z, k = seq("z", z), seq("k", k)
    expect("k", k, (*z.shape[:2], k.shape[2]), z.dtype)
    d, dk = z.shape[2], k.shape[2]
    f = tensor("w1", w1, rank=2).shape[0]
    fc = tensor("c1", c1, rank=2).shape[0]
    for what, t, shape in (
        ("w1", w1, (f, d)),
        ("b1", b1, (f,)),
        ("w2", w2, (d, f)),
        ("b2", b2, (d,)),
        ("c1", c1, (fc, dk)),
        ("cb1", cb1, (fc,)),
        ("c2", c2, (d, fc)),
        ("cb2", cb2, (d,)),
    ):
        expect(what, t, shape, z.dtype)
    return z


def _decay_eps(eps: float) -> None:
    if not 0.0 < eps < 0.5:
        raise ShapeError(f"attribute eps: expected 0 < eps < 0.5, got {eps}")


_DECAY_OPERANDS = ("z", "k", "w1", "b1", "w2", "b2", "c1", "cb1", "c2", "cb2")


@op("mdi_decay", _DECAY_OPERANDS, eps=1e-6)
def _mdi_decay(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps):
    """SPEC §3: clamp(sigmoid(W2 gelu(W1 z)) * sigmoid(C2 gelu(C1 k)), eps, 1 - eps)."""
    _decay_eps(eps)
    return [_decay_mlps(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)]


@op("mdi_decay_fused", _DECAY_OPERANDS, eps=1e-6)
def _mdi_decay_fused(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps):
    """mdi_decay as one kernel (fuse-decay): both MLPs and the tail, a and c never in HBM."""
    _decay_eps(eps)
    return [_decay_mlps(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)]


@op("mdi_decay_logits", _DECAY_OPERANDS)
def _mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2):
    """SPEC §3 without its tail: (W2 gelu(W1 z), C2 gelu(C1 k)), the logits decay_recurrence reads."""
    z = _decay_mlps(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)
    return [z, z]


def _state_pair(x: TensorType, h0: Type) -> list[Type]:
    expect("h0", h0, (x.shape[0], x.shape[2]), x.dtype)
    return [x, x.with_shape((x.shape[0], x.shape[2]))]


@op("linear_scan", ("log_a", "b", "h0"))
def _linear_scan(log_a, b, h0):
    """SPEC §1: h_t = exp(clamp(log_a_t, -50, 0)) h_{t-1} + b_t -> (h [B, T, C], h_last [B, C])."""
    log_a = seq("log_a", log_a)
    expect("b", b, log_a.shape, log_a.dtype)
    return _state_pair(log_a, h0)


@op("gated_recurrence", ("z", "gz", "gamma", "h0", "w_g?"))
def _gated_recurrence(z, gz, gamma, h0, w_g):
    """SPEC §2: h_t = z_t sigmoid(W_g h_{t-1} + gz_t) + gamma_t h_{t-1}, W_g block-diagonal [H, Dh, Dh].
    Without w_g the gate depends on the input only (lower-linear-recurrence makes it a linear_scan)."""
    z = seq("z", z)
    expect("gz", gz, z.shape, z.dtype)
    expect("gamma", gamma, z.shape, z.dtype)
    if w_g is not None:
        w_g = tensor("w_g", w_g, rank=3)
        heads, dh = w_g.shape[0], w_g.shape[1]
        if heads * dh != z.shape[2]:
            raise ShapeError(f"w_g: expected [H, Dh, Dh] with H*Dh = {z.shape[2]}, got {w_g}")
        expect("w_g", w_g, (heads, dh, dh), z.dtype)
    return _state_pair(z, h0)


@op("decay_recurrence", ("z", "gz", "a", "c", "h0", "w_g"), eps=1e-6)
def _decay_recurrence(z, gz, a, c, h0, w_g, eps):
    """gated_recurrence with gamma = clamp(sigmoid(a) * sigmoid(c), eps, 1 - eps) formed inside the
    kernel (SPEC §3's tail fused into SPEC §2; made by fuse-decay-recurrence)."""
    _decay_eps(eps)
    z = seq("z", z)
    expect("a", a, z.shape, z.dtype)
    expect("c", c, z.shape, z.dtype)
    return _gated_recurrence(z, gz, a, h0, w_g)


@op("add_rstd", ("lhs", "rhs"), eps=1e-6)
def _add_rstd(lhs, rhs, eps):
    """Residual add with the RMSNorm's statistics only, one pass: -> (lhs + rhs, 1/rms of each
    row of the sum, f32), for an rms_linear_swiglu that applies the norm (fuse-norm-prologue)."""
    x = _same(lhs, rhs)[0]
    return [x, TensorType(DType.f32, x.shape[:-1])]


@op("add_rmsnorm", ("lhs", "rhs", "weight"), eps=1e-6)
def _add_rmsnorm(lhs, rhs, weight, eps):
    """Residual add and the norm that follows it, one pass: -> (lhs + rhs, rmsnorm(lhs + rhs) * weight)."""
    x = _same(lhs, rhs)[0]
    expect("weight", weight, (x.shape[-1],), x.dtype)
    return [x, x]


def _memory(mem: Type) -> MemoryType:
    if not isinstance(mem, MemoryType):
        raise ShapeError(f"mem: expected a memory value, got {mem}")
    return mem


def _memory_kv(mem: MemoryType, k: Type, v: Type) -> TensorType:
    k = seq("k", k)
    expect("k", k, (*k.shape[:2], mem.heads * mem.dim))
    expect("v", v, k.shape, k.dtype)
    return k


@op("memory_write", ("mem", "k", "v"))
def _memory_write(mem, k, v):
    """SPEC §4: add the segment's keys/values to the block summaries, cascade levels, advance rings."""
    mem = _memory(mem)
    _memory_kv(mem, k, v)
    return [mem]


@op("hds_query", ("q", "k", "v", "beta", "mem", "residual?"), heads=REQUIRED)
def _hds_query(q, k, v, beta, mem, residual, heads):
    """SPEC §4: one softmax over visible slots of all levels (carried rings + slots completed in
    this segment), logit bias beta[head, level]; rows with no visible slot give 0. With a
    residual (fuse-residual-epilogue) the result is residual + m, the add in the kernel."""
    mem = _memory(mem)
    k = _memory_kv(mem, k, v)
    q = seq("q", q)
    expect("q", q, (*k.shape[:2], heads * mem.dim), k.dtype)
    if heads % mem.heads:
        raise ShapeError(f"attribute heads={heads} is not a multiple of memory heads {mem.heads}")
    expect("beta", beta, (heads, mem.levels), q.dtype)
    if residual is not None:
        expect("residual", residual, q.shape, q.dtype)
    return [q]


@op("ffn", ("x", "w_gate", "w_up", "w_down"))
def _ffn(x, w_gate, w_up, w_down):
    """SwiGLU: w_down (silu(w_gate x) * (w_up x))."""
    x = seq("x", x)
    f = tensor("w_gate", w_gate, rank=2).shape[0]
    expect("w_gate", w_gate, (f, x.shape[2]), x.dtype)
    expect("w_up", w_up, (f, x.shape[2]), x.dtype)
    expect("w_down", w_down, (x.shape[2], f), x.dtype)
    return [x]


@op("moe", ("x", "router", "w_gate", "w_up", "w_down"), top_k=2, capacity_factor=1.25)
def _moe(x, router, w_gate, w_up, w_down, top_k, capacity_factor):
    """Top-k mixture of SwiGLU experts -> (y, load-balance loss []). Capacity applies in training."""
    x = seq("x", x)
    e = tensor("router", router, rank=2).shape[0]
    expect("router", router, (e, x.shape[2]), x.dtype)
    f = tensor("w_gate", w_gate, rank=3).shape[1]
    expect("w_gate", w_gate, (e, f, x.shape[2]), x.dtype)
    expect("w_up", w_up, (e, f, x.shape[2]), x.dtype)
    expect("w_down", w_down, (e, x.shape[2], f), x.dtype)
    if not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ShapeError(f"attribute top_k: expected 1..{e}, got {top_k!r}")
    if not capacity_factor > 0:
        raise ShapeError(f"attribute capacity_factor: expected > 0, got {capacity_factor!r}")
    return [x, x.with_shape(())]


@op("lm_head", ("x", "table"))
def _lm_head(x, table):
    """Logits against the (tied) embedding table [V, D] -> [B, T, V]."""
    x = seq("x", x)
    table = tensor("table", table, rank=2)
    expect("table", table, (table.shape[0], x.shape[2]), x.dtype)
    return [x.with_shape((*x.shape[:2], table.shape[0]))]


@op("uboo_loss", ("h", "h0", "p", "q"))
def _uboo_loss(h, h0, p, q):
    """SPEC §5 planning error: mean((P stopgrad(h_t) - Q h_{t-1})^2) -> scalar."""
    h = seq("h", h)
    d = h.shape[2]
    expect("h0", h0, (h.shape[0], d), h.dtype)
    expect("p", p, (d, d), h.dtype)
    expect("q", q, (d, d), h.dtype)
    return [h.with_shape(())]


def get(name: str) -> OpDef | None:
    return OPS.get(name)
