import torch

import models
import runtime

VARIANTS = {
    "gated": {},
    "linear": {"recurrence": "linear"},
    "moe-uboo": {"moe": {"experts": 4, "top_k": 2}, "uboo": True},
}


def tiny_model(variant: str = "gated", spread: float = 0.08, **overrides) -> runtime.CompiledModel:
    """The tiny model with weights re-drawn wider than at init, so memory, gates and experts all
    move the logits visibly (a test must be able to fail)."""
    cfg = models.load_config("tiny", {**VARIANTS[variant], **overrides})
    model = runtime.compile(models.build(cfg), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, spread)
            elif "beta" in name:
                p.uniform_(-1.0, 1.0)
    return model
