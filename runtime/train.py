"""The training loop: AdamW, warmup + cosine, gradient clipping, progress bar, JSONL log,
atomic checkpoints, exact resume, and a stop (keeping the last good checkpoint) on a NaN.

Batches are B contiguous lanes of the corpus; the recurrent state (h and the hierarchical
memory) is carried from one segment to the next and detached between steps (truncated
backpropagation through time), and reset when the lanes wrap.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from mmrec_ir import parse, print_graph

from . import checkpoint
from .data import Tokenizer, TokenStream, load_texts, split_docs
from .module import CompiledModel, compile
from .state import State


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss or gradient. The message says which checkpoint survives."""


@dataclass
class TrainResult:
    step: int
    loss: float
    eval_loss: float | None
    checkpoint: Path
    log: Path


def lr_at(step: int, cfg: models.TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: CompiledModel, cfg: models.TrainConfig) -> torch.optim.AdamW:
    # Matrices decay; norms, biases and level biases do not.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def segment_loss(model: CompiledModel, inputs, targets, state: State | None):
    """(total loss, language-model loss, next state) for one segment."""
    out = model(inputs, state)
    logits, new_state = out
    lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    total = lm if out.aux is None else lm + out.aux
    return total, lm, new_state


@torch.no_grad()
def evaluate(model: CompiledModel, stream: TokenStream, max_tokens: int) -> float:
    """Mean next-token loss over up to `max_tokens` held-out tokens, state carried."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    steps = max(1, min(stream.steps_per_epoch, max_tokens // (stream.batch * stream.seq_len)))
    for i in range(steps):
        inputs, targets, _ = stream.batch_at(i)
        logits, state = model(inputs.to(_device(model)), state)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), targets.to(logits.device).flatten(), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def _device(model: CompiledModel) -> torch.device:
    return next(model.parameters()).device


class Trainer:
    """Owns everything a run needs; `run()` trains to cfg.train.steps (or `stop_at`)."""

    def __init__(
        self,
        cfg: models.Config,
        out_dir: str | Path,
        data: str | Path | None = None,
        resume: bool = False,
        device: str = "cpu",
        progress: bool = True,
        print_fn: Callable[[str], None] = print,
    ):
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / "ckpt.pt"
        self.log_path = self.out_dir / "log.jsonl"
        self.progress = progress
        self.print = print_fn
        payload = checkpoint.load(self.ckpt_path) if resume else None
        if payload is not None:
            cfg = models.config.from_dict(payload["config"])
            self.tokenizer = Tokenizer.from_json(payload["tokenizer"])
            data = payload.get("data")
        self.cfg = cfg
        self.data_path = None if data is None else str(data)
        train_texts, val_texts = split_docs(load_texts(data))
        if payload is None:
            self.tokenizer = Tokenizer.train(cfg.tokenizer, train_texts, cfg.vocab_size)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise models.ConfigError(
                f"field 'vocab_size': the tokenizer has {self.tokenizer.vocab_size} tokens, more than {cfg.vocab_size}"
            )
        t = cfg.train
        self.train_stream = TokenStream(torch.tensor(self.tokenizer.encode_many(train_texts)), t.batch_size, t.seq_len)
        val_tokens = torch.tensor(self.tokenizer.encode_many(val_texts))
        val_batch = max(1, min(t.batch_size, (val_tokens.numel() - 1) // (t.seq_len * 2)))
        self.val_stream = TokenStream(val_tokens, val_batch, t.seq_len)

        graph = parse(payload["graph"]) if payload is not None else models.build(cfg)
        self.model = compile(graph, mode="train", seed=t.seed).to(device)
        self.optimizer = make_optimizer(self.model, t)
        self.step = 0
        self.state: State | None = None
        self.last_good: int | None = None
        if payload is not None:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.step = payload["step"]
            self.last_good = self.step
            if payload.get("state") is not None:
                self.state = State.from_state_dict(self.model.graph, payload["state"]).to(device)
            torch.set_rng_state(payload["rng"])

    def save(self) -> Path:
        payload = {
            "config": models.config.to_dict(self.cfg),
            "graph": print_graph(self.model.graph),
            "tokenizer": self.tokenizer.to_json(),
            "data": self.data_path,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "state": None if self.state is None else self.state.to("cpu").state_dict(),
            "rng": torch.get_rng_state(),
        }
        checkpoint.save(payload, self.ckpt_path)
        self.last_good = self.step
        return self.ckpt_path

    def _log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _stop(self, what: str) -> TrainingError:
        kept = (
            f"the last good checkpoint (step {self.last_good}) is kept at {self.ckpt_path}"
            if self.last_good is not None
            else "no checkpoint had been written yet"
        )
        self._log({"step": self.step, "event": "stopped", "reason": what})
        return TrainingError(f"step {self.step + 1}: {what}; training stopped, {kept}")

    def run(self, stop_at: int | None = None) -> TrainResult:
        t = self.cfg.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        device = _device(self.model)
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not self.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        loss_value, eval_loss = float("nan"), None
        tokens_per_step = t.batch_size * t.seq_len
        try:
            while self.step < end:
                started = time.perf_counter()
                inputs, targets, new_epoch = self.train_stream.batch_at(self.step)
                if new_epoch:
                    self.state = None  # lanes wrapped: the text no longer continues
                lr = lr_at(self.step, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, lm_loss, new_state = segment_loss(self.model, inputs.to(device), targets.to(device), self.state)
                if not torch.isfinite(loss):
                    raise self._stop(f"loss is {loss.item()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise self._stop(f"gradient norm is {grad_norm.item()}")
                self.optimizer.step()
                self.state = new_state.detach()
                self.step += 1
                loss_value = lm_loss.item()
                elapsed = time.perf_counter() - started
                record = {
                    "step": self.step,
                    "loss": round(loss_value, 5),
                    "lr": lr,
                    "grad_norm": round(grad_norm.item(), 4),
                    "tokens_per_s": round(tokens_per_step / elapsed, 1),
                }
                self._log(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    eval_loss = evaluate(self.model, self.val_stream, t.eval_tokens)
                    self._log(
                        {
                            "step": self.step,
                            "eval_loss": round(eval_loss, 5),
                            "eval_ppl": round(math.exp(eval_loss), 3),
                        }
                    )
                    bar.write(f"step {self.step}: eval loss {eval_loss:.3f}, perplexity {math.exp(eval_loss):.1f}")
                if self.step % t.ckpt_every == 0 or self.step == end:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            bar.close()
            self.print(f"interrupted: checkpoint at step {self.step} saved to {self.ckpt_path}")
            raise
        finally:
            bar.close()
        return TrainResult(self.step, loss_value, eval_loss, self.ckpt_path, self.log_path)


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[CompiledModel, Tokenizer, dict]:
    """A trained model in eval mode, its tokenizer, and the checkpoint payload."""
    payload = checkpoint.load(path)
    model = compile(parse(payload["graph"]), mode="infer").to(device)
    model.load_state_dict(payload["model"])
    return model, Tokenizer.from_json(payload["tokenizer"]), payload
