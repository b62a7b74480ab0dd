"""Generation with the recurrent state: one prefill over the prompt, then one token per call.

Nothing is recomputed: each step feeds a single token and the state carries everything
(SPEC §6 guarantees this equals a forward over the whole text). The steps run in a
`DecodeSession`: the state is updated in place and, on CUDA, each step is one CUDA-graph replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .module import CompiledModel, InputError
from .session import DecodeSession


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> next token [B]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: CompiledModel,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """prompt [B, T] int64 -> [B, T + max_new_tokens]. `on_token` sees each new [B] column."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise InputError("prompt: expected at least one token")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    session = DecodeSession(model, prompt.shape[0], device=prompt.device)
    logits = session.prefill(prompt)[:, -1]
    out = [prompt]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = session.step(token, check=False)
    return torch.cat(out, dim=1)
