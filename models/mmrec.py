"""The MM-Rec block and language model of SPEC §5, written in the builder DSL."""

from __future__ import annotations

import math

from mmrec_ir import Builder, Graph, MemoryType, f32, i64

from .config import Config


def memory_type(cfg: Config) -> MemoryType:
    m = cfg.memory
    return MemoryType(m.heads, cfg.head_dim, m.block, m.ratio, tuple(m.slots))


def block(b: Builder, cfg: Config, i: int, x: str, h_prev: str, mem: str) -> tuple[str, str, str, list[str]]:
    """One MM-Rec block -> (x, h_last, next memory, auxiliary loss terms)."""
    p = f"layer{i}."
    d, fd, kd = cfg.d_model, cfg.decay_width, cfg.memory.heads * cfg.head_dim
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs start small (GPT-2)

    u = b.rmsnorm(x, b.param(p + "norm_mix", (d,), "ones"), eps=cfg.norm_eps, name=p + "u")
    q, k, v, z, gz = b.linear(
        u,
        b.param(p + "w_in", (2 * kd + 3 * d, d)),
        splits=[d, kd, kd, d, d],
        name=[p + n for n in ("q", "k", "v", "z", "gz")],
    )
    # sigmoid(2)^2 ~ 0.78: recurrences start with a memory of a few tokens, not of one.
    gamma = b.mdi_decay(
        z,
        k,
        b.param(p + "decay.w1", (fd, d)),
        b.param(p + "decay.b1", (fd,), "zeros"),
        b.param(p + "decay.w2", (d, fd)),
        b.param(p + "decay.b2", (d,), "const(2.0)"),
        b.param(p + "decay.c1", (fd, kd)),
        b.param(p + "decay.cb1", (fd,), "zeros"),
        b.param(p + "decay.c2", (d, fd)),
        b.param(p + "decay.cb2", (d,), "const(2.0)"),
        name=p + "gamma",
    )
    # Without W_g (recurrence: linear) the pass lower-linear-recurrence turns this into a linear scan.
    w_g = [b.param(p + "w_g", (cfg.n_heads, cfg.head_dim, cfg.head_dim))] if cfg.recurrence == "gated" else []
    h, h_last = b.gated_recurrence(z, gz, gamma, h_prev, *w_g, name=[p + "h", p + "h_last"])
    beta = b.param(p + "beta", (cfg.n_heads, len(cfg.memory.slots)), "zeros")
    m = b.hds_query(q, k, v, beta, mem, heads=cfg.n_heads, name=p + "m")
    mixed = b.linear(b.add(h, m), b.param(p + "w_o", (d, d), f"normal({out_std})"))
    x = b.add(x, mixed, name=p + "x_mix")

    u2 = b.rmsnorm(x, b.param(p + "norm_ffn", (d,), "ones"), eps=cfg.norm_eps)
    aux: list[str] = []
    f = cfg.ffn_hidden
    if cfg.moe is None:
        # SwiGLU written out as the model means it; fuse-projections and fuse-epilogue turn the
        # two up projections, the silu and the product into one GEMM with a SwiGLU epilogue.
        w_gate = b.param(p + "ffn.w_gate", (f, d))
        w_up = b.param(p + "ffn.w_up", (f, d))
        w_down = b.param(p + "ffn.w_down", (d, f), f"normal({out_std})")
        gate = b.linear(u2, w_gate, name=p + "ffn.gate")
        up = b.linear(u2, w_up, name=p + "ffn.up")
        y = b.linear(b.mul(b.silu(gate), up, name=p + "ffn.hidden"), w_down)
    else:
        e = cfg.moe.experts
        y, balance = b.moe(
            u2,
            b.param(p + "moe.router", (e, d)),
            b.param(p + "moe.w_gate", (e, f, d)),
            b.param(p + "moe.w_up", (e, f, d)),
            b.param(p + "moe.w_down", (e, d, f), f"normal({out_std})"),
            top_k=cfg.moe.top_k,
            capacity_factor=cfg.moe.capacity_factor,
        )
        aux.append(b.scale(balance, factor=cfg.moe.balance_weight))
    x = b.add(x, y, name=p + "x")

    if cfg.uboo:
        planning = b.uboo_loss(h, h_prev, b.param(p + "uboo.p", (d, d)), b.param(p + "uboo.q", (d, d)))
        aux.append(b.scale(planning, factor=cfg.uboo_weight))
    return x, h_last, b.memory_write(mem, k, v, name=p + "mem_next"), aux


def build_block(cfg: Config) -> Graph:
    """One block alone (layer 0 of `cfg`), for benchmarks and tests: inputs %x_in [B, T, D], %h.0,
    %mem.0; outputs x, h.0, mem.0 (and aux when an auxiliary loss is on)."""
    b = Builder("mmrec_block", config=cfg.name)
    x = b.input("x_in", f32("B", "T", cfg.d_model))
    h_prev, mem = b.input("h.0", f32("B", cfg.d_model)), b.input("mem.0", memory_type(cfg))
    x, h_last, mem_next, aux = block(b, cfg, 0, x, h_prev, mem)
    for name, ref in (("x", x), ("h.0", h_last), ("mem.0", mem_next)):
        b.output(name, ref)
    _output_aux(b, aux)
    return b.build()


def _output_aux(b: Builder, aux: list[str]) -> None:
    """Output "aux", the sum of the auxiliary loss terms, when there are any."""
    if aux:
        total = aux[0]
        for term in aux[1:]:
            total = b.add(total, term)
        b.output("aux", total)


def build(cfg: Config) -> Graph:
    """The whole language model as one verified graph.

    Inputs: %tokens [B, T] and, per layer i, the carried state %h.i [B, D] and %mem.i.
    Outputs: logits [B, T, V], the next h.i and mem.i, and aux (a scalar) when any auxiliary
    loss is on.
    """
    b = Builder("mmrec_lm", config=cfg.name)
    d = cfg.d_model
    tokens = b.input("tokens", i64("B", "T"))
    state = [(b.input(f"h.{i}", f32("B", d)), b.input(f"mem.{i}", memory_type(cfg))) for i in range(cfg.n_layers)]
    embed = b.param("embed", (cfg.vocab_size, d), "normal(0.02)")
    x = b.embedding(tokens, embed, name="x")
    next_state, aux = [], []
    for i, (h_prev, mem) in enumerate(state):
        x, h_last, mem_next, block_aux = block(b, cfg, i, x, h_prev, mem)
        next_state += [(f"h.{i}", h_last), (f"mem.{i}", mem_next)]
        aux += block_aux
    x = b.rmsnorm(x, b.param("norm_out", (d,), "ones"), eps=cfg.norm_eps, name="x_out")
    b.output("logits", b.lm_head(x, embed, name="logits"))  # tied to the embedding
    for name, ref in next_state:
        b.output(name, ref)
    _output_aux(b, aux)
    return b.build()
