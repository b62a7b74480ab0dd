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

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
    global_index: Tensor  # [B, M + NS] global slot index of each candidate (ring, then segment)
    keys: Tensor  # [B, K, M + NS, Dh]
    values: Tensor  # [B, K, M + NS, Dh]
    completed: Tensor  # [B] slots completed inside the segment (0..NS)
    sums_k: Tensor  # [B, NS + 1, K, Dh] token sums per segment slot (slot 0 includes the carry)
    sums_v: Tensor


def _level_slots(mem: Memory, level: int, k: Tensor, v: Tensor) -> _LevelSlots:
    """Candidate slots of one level for a segment: the carried ring plus the segment's slots."""
    spec = mem.spec
    bsz, steps, _ = k.shape
    span, ring = spec.span(level), spec.slots[level]
    n_seg = math.ceil(steps / span)  # static bound on slots completed inside the segment
    t = torch.arange(steps, device=k.device)
    n_before = mem.pos // span  # [B]
    slot_of_token = (mem.pos[:, None] + t) // span - n_before[:, None]  # [B, T] in 0..n_seg
    # One flat index over (row, slot): index_add on [B * (NS + 1), K * Dh] rows.
    flat_index = (torch.arange(bsz, device=k.device)[:, None] * (n_seg + 1) + slot_of_token).flatten()

    def sums(x: Tensor, carry: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.zeros(bsz * (n_seg + 1), x.shape[2], device=x.device, dtype=acc)
        out = out.index_add(0, flat_index, x.flatten(0, 1).to(acc)).view(bsz, n_seg + 1, x.shape[2])
        first = out[:, :1] + carry.flatten(1)[:, None]
        return torch.cat([first, out[:, 1:]], dim=1).unflatten(2, (spec.heads, spec.dim))

    sums_k, sums_v = sums(k, mem.sum_k[level]), sums(v, mem.sum_v[level])

    def candidates(ring_t: Tensor, seg: Tensor) -> Tensor:
        seg_means = (seg[:, :n_seg] / span).to(ring_t.dtype).transpose(1, 2)  # [B, K, NS, Dh]
        return torch.cat([ring_t, seg_means], dim=2)

    offsets = torch.arange(-ring, n_seg, device=k.device)
    return _LevelSlots(
        global_index=n_before[:, None] + offsets,
        keys=candidates(mem.keys[level], sums_k),
        values=candidates(mem.values[level], sums_v),
        completed=(mem.pos + steps) // span - n_before,
        sums_k=sums_k,
        sums_v=sums_v,
    )


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


def candidates(mem: Memory, k: Tensor, v: Tensor) -> Candidates:
    spec, device = mem.spec, k.device
    per_level = [_level_slots(mem, level, k, v) for level in range(len(spec.slots))]

    def per_slot(values: list[int]) -> Tensor:
        sizes = [c.global_index.shape[1] for c in per_level]
        return torch.cat(
            [torch.full((n,), x, device=device, dtype=torch.int64) for n, x in zip(sizes, values, strict=True)]
        )

    return Candidates(
        keys=torch.cat([c.keys for c in per_level], dim=2),
        values=torch.cat([c.values for c in per_level], dim=2),
        slot=torch.cat([c.global_index for c in per_level], dim=1),
        level=per_slot(list(range(len(spec.slots)))),
        span=per_slot([spec.span(level) for level in range(len(spec.slots))]),
        ring=per_slot(list(spec.slots)),
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


def memory_write(mem: Memory, k: Tensor, v: Tensor) -> Memory:
    """Add a segment's keys/values [B, T, K*Dh]: complete slots enter the rings (oldest fall
    out), the running sums keep the incomplete slot, pos advances by T."""
    spec = mem.spec
    new = Memory(spec, [], [], [], [], mem.pos + k.shape[1])
    for level, ring in enumerate(spec.slots):
        cand = _level_slots(mem, level, k, v)
        # Keep the `ring` newest completed: candidates [completed, completed + ring).
        take = cand.completed[:, None] + torch.arange(ring, device=k.device)  # [B, M]
        take = take[:, None, :, None].expand(-1, spec.heads, -1, spec.dim)
        new.keys.append(torch.gather(cand.keys, 2, take))
        new.values.append(torch.gather(cand.values, 2, take))
        incomplete = cand.completed[:, None, None, None].expand(-1, 1, spec.heads, spec.dim)
        new.sum_k.append(torch.gather(cand.sums_k, 1, incomplete)[:, 0])
        new.sum_v.append(torch.gather(cand.sums_v, 1, incomplete)[:, 0])
    return new


def reset_rows(mem: Memory, rows: Tensor) -> Memory:
    """Zero the memory of the batch rows where `rows` [B] is True."""

    def clear(t: Tensor) -> Tensor:
        keep = ~rows.view(-1, *([1] * (t.dim() - 1)))
        return torch.where(keep, t, torch.zeros_like(t))

    return mem.map(clear)
