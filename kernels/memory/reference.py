"""SPEC §4 hierarchical memory, plain PyTorch: the segment-parallel query and the write.

Layout of one layer's memory (``Memory``), per level l with slot span S_l = c R^l tokens:
- ``keys[l]``, ``values[l]``: [B, K, M_l, Dh], the ring in chronological order, newest last:
  ring entry r holds global slot n - M_l + r, where n = pos // S_l slots have completed;
  entries with a negative global index are empty (masked).
- ``sum_k[l]``, ``sum_v[l]``: [B, K, Dh], the sum over the tokens seen so far of the
  incomplete level-l slot; it becomes a slot (sum / S_l) when that slot's last token is seen.
- ``pos``: [B] int64, tokens seen since reset. Fill counts are derived from it:
  min(pos // S_l, M_l), so they can never disagree with the rings.

A level-l slot is the mean of its S_l tokens, which equals SPEC's "mean of R level-(l-1)
slots" (all slots of a level cover equally many tokens); summing tokens lets one reduction
produce every level, in the segment-parallel form and token by token alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import knobs


@dataclass(frozen=True)
class MemorySpec:
    heads: int
    dim: int
    block: int
    ratio: int
    slots: tuple[int, ...]

    def span(self, level: int) -> int:
        return self.block * self.ratio**level


@dataclass
class Memory:
    spec: MemorySpec
    keys: list[Tensor]
    values: list[Tensor]
    sum_k: list[Tensor]
    sum_v: list[Tensor]
    pos: Tensor

    @staticmethod
    def empty(spec: MemorySpec, batch: int, device=None, dtype=torch.float32) -> Memory:
        def ring(m: int) -> Tensor:
            return torch.zeros(batch, spec.heads, m, spec.dim, device=device, dtype=dtype)

        def acc() -> Tensor:
            return torch.zeros(batch, spec.heads, spec.dim, device=device, dtype=torch.float32)

        return Memory(
            spec=spec,
            keys=[ring(m) for m in spec.slots],
            values=[ring(m) for m in spec.slots],
            sum_k=[acc() for _ in spec.slots],
            sum_v=[acc() for _ in spec.slots],
            pos=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    def tensors(self) -> dict[str, Tensor]:
        out = {"pos": self.pos}
        for name in ("keys", "values", "sum_k", "sum_v"):
            out.update({f"{name}.{lvl}": t for lvl, t in enumerate(getattr(self, name))})
        return out

    @staticmethod
    def from_tensors(spec: MemorySpec, tensors: dict[str, Tensor]) -> Memory:
        def levels(name: str) -> list[Tensor]:
            return [tensors[f"{name}.{lvl}"] for lvl in range(len(spec.slots))]

        return Memory(spec, levels("keys"), levels("values"), levels("sum_k"), levels("sum_v"), tensors["pos"])

    def map(self, fn) -> Memory:
        return Memory(
            self.spec,
            [fn(t) for t in self.keys],
            [fn(t) for t in self.values],
            [fn(t) for t in self.sum_k],
            [fn(t) for t in self.sum_v],
            fn(self.pos),
        )


@dataclass
class _LevelSlots:
    keys: Tensor  # [B, K, M + NS, Dh] candidates: the carried ring, then the segment's slots
    values: Tensor  # [B, K, M + NS, Dh]
    completed: Tensor  # [B] slots completed inside the segment (0..NS)
    sums_k: Tensor  # [B, NS + 1, K, Dh] token sums per segment slot (slot 0 includes the carry)
    sums_v: Tensor


def token_slot(pos: Tensor, steps: int, span: int) -> Tensor:
    """[B, T]: the local slot (0 = the one in progress at the segment's start) of each token."""
    return (pos[:, None] + torch.arange(steps, device=pos.device)) // span - (pos // span)[:, None]


@contextlib.contextmanager
def one_hot_sums() -> Iterator[None]:
    """Within (`knobs.one_hot_sums`): the segment's slot sums are products with one-hot matrices
    instead of index_add. index_add exports to ONNX as ScatterND with reduction="add", which
    TensorRT's ONNX parser rejects; a product of a 0/1 matrix exports to MatMul. The product
    costs O(T * slots) per channel instead of O(T), so it is only used for export."""
    before, knobs.one_hot_sums = knobs.one_hot_sums, True
    try:
        yield
    finally:
        knobs.one_hot_sums = before


def _sum_by_index(x: Tensor, index: Tensor, n_out: int) -> Tensor:
    """out[b, j] = sum of x[b, t] over t with index[b, t] == j: x [B, N, W], index [B, N] in
    [0, n_out) -> [B, n_out, W] (x's dtype)."""
    bsz, _, width = x.shape
    if knobs.one_hot_sums:
        hot = index[:, None, :] == torch.arange(n_out, device=x.device)[None, :, None]
        return hot.to(x.dtype) @ x
    flat = (torch.arange(bsz, device=x.device)[:, None] * n_out + index).flatten()
    out = torch.zeros(bsz * n_out, width, device=x.device, dtype=x.dtype)
    return out.index_add(0, flat, x.flatten(0, 1)).view(bsz, n_out, width)


def block_sums(x: Tensor, pos: Tensor, span: int) -> Tensor:
    """Token sums [B, ceil(T / span) + 1, W] of x [B, T, W] per local slot of `span` tokens."""
    n_out = -(-x.shape[1] // span) + 1
    dtype = torch.promote_types(x.dtype, torch.float32)
    return _sum_by_index(x.to(dtype), token_slot(pos, x.shape[1], span), n_out)


def _segment_sums(mem: Memory, x: Tensor, sums0=block_sums) -> list[Tensor]:
    """Token sums [B, NS_l + 1, K*Dh] of the segment's level-l slots (local slot 0 is the one in
    progress at the segment's start), every level, without the carried partial sums.

    One pass over the tokens gives level 0 (`sums0`: this reference or the Triton kernel); a
    level-l slot is a run of R^l level-0 slots (level boundaries are multiples of S_0 in
    absolute position), so higher levels add up level-0 sums."""
    spec = mem.spec
    steps = x.shape[1]
    level0 = sums0(x, mem.pos, spec.span(0))
    n0_seg = level0.shape[1] - 1
    n0 = mem.pos // spec.span(0)
    out = [level0]
    j = torch.arange(n0_seg + 1, device=x.device)
    for level in range(1, len(spec.slots)):
        n_seg = -(-steps // spec.span(level))
        # Level-0 slots past the segment's last token hold zeros; clamping keeps them in range.
        local = ((n0[:, None] + j) // spec.ratio**level - (mem.pos // spec.span(level))[:, None]).clamp(max=n_seg)
        out.append(_sum_by_index(level0, local, n_seg + 1))
    return out


def _with_carry(sums: Tensor, carry: Tensor, spec: MemorySpec) -> Tensor:
    """Add the carried partial sums to local slot 0 -> [B, NS + 1, K, Dh]."""
    first = sums[:, :1] + carry.flatten(1)[:, None]
    return torch.cat([first, sums[:, 1:]], dim=1).unflatten(2, (spec.heads, spec.dim))


def _with_segment(ring: Tensor, sums: Tensor, n_seg: int, span: int) -> Tensor:
    """The ring [B, K, M, Dh] followed by the means of the segment's slots [B, K, NS, Dh]."""
    return torch.cat([ring, (sums[:, :n_seg] / span).to(ring.dtype).transpose(1, 2)], dim=2)


def _level_slots(mem: Memory, k: Tensor, v: Tensor, sums0=block_sums) -> list[_LevelSlots]:
    """Candidate slots of every level for a segment: the carried ring plus the segment's slots."""
    spec = mem.spec
    steps = k.shape[1]
    seg_k, seg_v = _segment_sums(mem, k, sums0), _segment_sums(mem, v, sums0)
    out = []
    for level, (sk, sv) in enumerate(zip(seg_k, seg_v, strict=True)):
        span = spec.span(level)
        n_seg = sk.shape[1] - 1

        sums_k = _with_carry(sk, mem.sum_k[level], spec)
        sums_v = _with_carry(sv, mem.sum_v[level], spec)
        out.append(
            _LevelSlots(
                keys=_with_segment(mem.keys[level], sums_k, n_seg, span),
                values=_with_segment(mem.values[level], sums_v, n_seg, span),
                completed=(mem.pos + steps) // span - mem.pos // span,
                sums_k=sums_k,
                sums_v=sums_v,
            )
        )
    return out


@dataclass
class Candidates:
    """Every slot a segment's tokens may read, all levels concatenated ([ring ; segment] per
    level). Visibility per token is computed from these indices, never stored as a mask."""

    keys: Tensor  # [B, K, S, Dh]
    values: Tensor  # [B, K, S, Dh]
    slot: Tensor  # [B, S] int64: global slot index within its level (negative: empty)
    level: Tensor  # [S] int64
    span: Tensor  # [S] int64: tokens per slot of that level, c R^l
    ring: Tensor  # [S] int64: ring size M_l of that level


def slot_table(pos: Tensor, rings: tuple[int, ...], spans: tuple[int, ...], steps: int):
    """Per candidate slot (levels concatenated, each [ring ; segment]): its global index within
    its level [B, S] (negative: empty), level [S], span [S] and ring size [S]."""
    device = pos.device
    index, level, span, ring = [], [], [], []
    for lvl, (m, s) in enumerate(zip(rings, spans, strict=True)):
        count = m + -(-steps // s)
        index.append((pos // s)[:, None] + torch.arange(-m, count - m, device=device))
        for out, x in ((level, lvl), (span, s), (ring, m)):
            out.append(torch.full((count,), x, device=device, dtype=torch.int64))
    return torch.cat(index, 1), torch.cat(level), torch.cat(span), torch.cat(ring)


def candidate_kv(mem: Memory, k: Tensor, v: Tensor, sums0=block_sums) -> tuple[Tensor, Tensor]:
    """The candidate keys and values [B, K, S, Dh] (levels concatenated, each [ring ; segment])."""
    per_level = _level_slots(mem, k, v, sums0)
    return torch.cat([c.keys for c in per_level], dim=2), torch.cat([c.values for c in per_level], dim=2)


def candidates(mem: Memory, k: Tensor, v: Tensor, sums0=block_sums) -> Candidates:
    spec = mem.spec
    keys, values = candidate_kv(mem, k, v, sums0)
    spans = tuple(spec.span(level) for level in range(len(spec.slots)))
    slot, level, span, ring = slot_table(mem.pos, spec.slots, spans, k.shape[1])
    return Candidates(
        keys=keys,
        values=values,
        slot=slot,
        level=level,
        span=span,
        ring=ring,
    )


def visible(cand: Candidates, pos: Tensor, steps: int) -> Tensor:
    """[B, T, S]: token t (absolute position a = pos + t) sees at level l the global slots
    [a // S_l - M_l, a // S_l), the M_l most recent slots completed before its own block."""
    now = (pos[:, None] + torch.arange(steps, device=pos.device))[:, :, None] // cand.span  # [B, T, S]
    g = cand.slot[:, None, :]
    return (g >= 0) & (g >= now - cand.ring) & (g < now)


def _weights(q: Tensor, cand: Candidates, beta: Tensor, pos: Tensor, heads: int):
    """Softmax weights [B, K, G, T, S] (0 where invisible; rows with nothing visible are all 0),
    the log-sum-exp [B, K, G, T], and q as [B, T, K, G, Dh], in the accumulation dtype."""
    kv_heads, dim = cand.keys.shape[1], cand.keys.shape[3]
    group = heads // kv_heads
    acc = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(acc).unflatten(2, (kv_heads, group, dim))
    logits = torch.einsum("btkgd,bksd->bkgts", qh, cand.keys.to(acc)) / math.sqrt(dim)
    bias = beta.to(acc).unflatten(0, (kv_heads, group))[:, :, cand.level]  # [K, G, S]
    logits = logits + bias[None, :, :, None, :]
    logits = logits.masked_fill(~visible(cand, pos, q.shape[1])[:, None, None], float("-inf"))
    peak = logits.amax(-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(logits - peak)  # invisible slots give exactly 0
    denom = weights.sum(-1, keepdim=True)
    lse = torch.where(denom > 0, peak + torch.log(torch.where(denom > 0, denom, 1.0)), float("-inf"))
    return weights / torch.where(denom > 0, denom, 1.0), lse[..., 0], qh


def attend_with_lse(q: Tensor, cand: Candidates, beta: Tensor, pos: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """One softmax per (token, query head) over the visible candidates, logit bias
    beta[head, level]; no visible slot gives 0. q [B, T, H*Dh] -> (out [B, T, H*Dh],
    log-sum-exp of the logits [B, H, T] in fp32, -inf where nothing is visible)."""
    probs, lse, _ = _weights(q, cand, beta, pos, heads)
    out = torch.einsum("bkgts,bksd->btkgd", probs, cand.values.to(probs.dtype))
    return out.flatten(2).to(q.dtype), lse.detach().flatten(1, 2).float()


def attend(q: Tensor, cand: Candidates, beta: Tensor, pos: Tensor, heads: int) -> Tensor:
    return attend_with_lse(q, cand, beta, pos, heads)[0]


def attend_backward(
    q: Tensor, cand: Candidates, beta: Tensor, pos: Tensor, heads: int, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of attend's output w.r.t. (q, keys, values, beta), written out (the oracle
    for the Triton backward): ds = p (do.v - do.o), dq = ds k / sqrt(Dh), dk = ds^T q / sqrt(Dh),
    dv = p^T do, dbeta[h, l] = sum of ds over the slots of level l."""
    with torch.no_grad():
        probs, _, qh = _weights(q, cand, beta, pos, heads)
        acc = probs.dtype
        kv_heads, dim = cand.keys.shape[1], cand.keys.shape[3]
        values, keys = cand.values.to(acc), cand.keys.to(acc)
        do = dout.to(acc).unflatten(2, (kv_heads, heads // kv_heads, dim))  # [B, T, K, G, Dh]
        out = torch.einsum("bkgts,bksd->btkgd", probs, values)
        dvalues = torch.einsum("bkgts,btkgd->bksd", probs, do)
        dprobs = torch.einsum("btkgd,bksd->bkgts", do, values)
        delta = torch.einsum("btkgd,btkgd->bkgt", do, out)
        ds = probs * (dprobs - delta[..., None])
        scale = 1.0 / math.sqrt(dim)
        dq = torch.einsum("bkgts,bksd->btkgd", ds, keys) * scale
        dkeys = torch.einsum("bkgts,btkgd->bksd", ds, qh) * scale
        per_slot = ds.sum((0, 3)).flatten(0, 1)  # [H, S]
        dbeta = torch.zeros(heads, beta.shape[1], dtype=acc, device=q.device).index_add_(1, cand.level, per_slot)
    return dq.flatten(2).to(q.dtype), dkeys.to(cand.keys.dtype), dvalues.to(cand.values.dtype), dbeta.to(beta.dtype)


def hds_query(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: Memory, heads: int) -> Tensor:
    """SPEC §4 query. q [B, T, H*Dh], k/v [B, T, K*Dh], beta [H, L] -> m [B, T, H*Dh]."""
    return attend(q, candidates(mem, k, v), beta, mem.pos, heads)


def decode_query(
    q: Tensor, keys: list[Tensor], values: list[Tensor], beta: Tensor, pos: Tensor, spans: list[int], heads: int
) -> Tensor:
    """The query of one token per row (q [B, 1, H*Dh]) over the rings alone: at t = 0 no slot of
    the token's own segment is visible, so this equals hds_query with T = 1."""
    rings = tuple(k.shape[2] for k in keys)
    slot, level, span, ring = slot_table(pos, rings, tuple(spans), 0)
    cand = Candidates(torch.cat(keys, dim=2), torch.cat(values, dim=2), slot, level, span, ring)
    return attend(q, cand, beta, pos, heads)


def memory_write(mem: Memory, k: Tensor, v: Tensor, sums0=block_sums) -> Memory:
    """Add a segment's keys/values [B, T, K*Dh]: complete slots enter the rings (oldest fall
    out), the running sums keep the incomplete slot, pos advances by T."""
    spec = mem.spec
    new = Memory(spec, [], [], [], [], mem.pos + k.shape[1])
    for ring, cand in zip(spec.slots, _level_slots(mem, k, v, sums0), strict=True):
        # Keep the `ring` newest completed: candidates [completed, completed + ring).
        take = cand.completed[:, None] + torch.arange(ring, device=k.device)  # [B, M]
        take = take[:, None, :, None].expand(-1, spec.heads, -1, spec.dim)
        new.keys.append(torch.gather(cand.keys, 2, take))
        new.values.append(torch.gather(cand.values, 2, take))
        incomplete = cand.completed[:, None, None, None].expand(-1, 1, spec.heads, spec.dim)
        new.sum_k.append(torch.gather(cand.sums_k, 1, incomplete)[:, 0])
        new.sum_v.append(torch.gather(cand.sums_v, 1, incomplete)[:, 0])
    return new


def write_step_(
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    sum_k: list[Tensor],
    sum_v: list[Tensor],
    spans: list[int],
) -> None:
    """memory_write of one token per row (k, v [B, 1, K*Dh]) in place: add to every level's
    sum; where the token completes a level's slot, shift that ring one entry forward, store the
    mean as its newest entry and zero the sum; then advance pos. Equals `memory_write` with
    T = 1 bit for bit (the oracle of the Triton write kernel)."""
    for ring_k, ring_v, sk, sv, span in zip(keys, values, sum_k, sum_v, spans, strict=True):
        done = ((pos + 1) % span == 0)[:, None, None]  # [B, 1, 1]
        for ring, acc, x in ((ring_k, sk, k), (ring_v, sv, v)):
            total = acc + x.reshape(acc.shape).to(acc.dtype)
            newest = (total / span).to(ring.dtype)[:, :, None]
            ring.copy_(torch.where(done[..., None], torch.cat([ring[:, :, 1:], newest], dim=2), ring))
            acc.copy_(torch.where(done, torch.zeros_like(total), total))
    pos.add_(1)


def reset_rows(mem: Memory, rows: Tensor) -> Memory:
    """Zero the memory of the batch rows where `rows` [B] is True."""

    def clear(t: Tensor) -> Tensor:
        keep = ~rows.view(-1, *([1] * (t.dim() - 1)))
        return torch.where(keep, t, torch.zeros_like(t))

    return mem.map(clear)
