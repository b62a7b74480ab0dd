"""Model and training configs: YAML files checked field by field against typed dataclasses.

Every problem is one ConfigError line naming the file and the dotted field, e.g.
``config tiny.yaml: field 'memory.slots': expected a list of positive integers, got [0]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config is malformed; the message names the field."""


@dataclass(frozen=True)
class MemoryConfig:
    heads: int = 2  # memory heads K (num_memories)
    block: int = 16  # tokens per level-0 slot (c)
    ratio: int = 4  # level ratio R
    slots: tuple[int, ...] = (8, 4)  # ring size of each level, oldest level last


@dataclass(frozen=True)
class MoEConfig:
    experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    balance_weight: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 16384
    ckpt_every: int = 100
    seed: int = 0


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    vocab_size: int = 2048
    tokenizer: str = "bpe"  # bpe (trained on the corpus, saved with the checkpoint) | byte
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 384
    decay_hidden: int = 0  # MDI bottleneck width; 0 means d_model // 4
    recurrence: str = "gated"  # gated | linear
    norm_eps: float = 1e-6
    uboo: bool = False
    uboo_weight: float = 0.1
    moe: MoEConfig | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decay_width(self) -> int:
        return self.decay_hidden or self.d_model // 4


def _check_value(path: str, typ, value):
    """Coerce `value` to `typ` or raise ConfigError naming `path`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(path, inner, value)
    if dataclasses.is_dataclass(typ):
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"field '{path}': expected a mapping, got {value!r}")
        return _from_dict(typ, value, path + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"field '{path}': expected a non-empty list of positive integers, got {value!r}")
        items = [_check_value(f"{path}[{i}]", int, v) for i, v in enumerate(value)]
        if any(v <= 0 for v in items):
            raise ConfigError(f"field '{path}': expected a list of positive integers, got {list(value)!r}")
        return tuple(items)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"field '{path}': expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"field '{path}': expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML reads 3e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"field '{path}': expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"field '{path}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"field '{prefix}{key}': unknown field (known: {', '.join(sorted(names))})")
    values = {k: _check_value(prefix + k, hints[k], v) for k, v in data.items()}
    return cls(**values)


def _positive(cfg, prefix: str, *fields: str) -> None:
    for name in fields:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"field '{prefix}{name}': expected a positive value, got {getattr(cfg, name)!r}")


def validate(cfg: Config) -> Config:
    _positive(cfg, "", "vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "norm_eps", "uboo_weight")
    _positive(cfg.memory, "memory.", "heads", "block", "ratio")
    t = cfg.train
    _positive(
        t,
        "train.",
        "batch_size",
        "seq_len",
        "steps",
        "lr",
        "grad_clip",
        "eval_every",
        "eval_tokens",
        "ckpt_every",
    )
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"field 'n_heads': d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.memory.heads:
        raise ConfigError(f"field 'memory.heads': n_heads {cfg.n_heads} is not a multiple of {cfg.memory.heads}")
    if cfg.recurrence not in ("gated", "linear"):
        raise ConfigError(f"field 'recurrence': expected 'gated' or 'linear', got {cfg.recurrence!r}")
    if cfg.tokenizer not in ("bpe", "byte"):
        raise ConfigError(f"field 'tokenizer': expected 'bpe' or 'byte', got {cfg.tokenizer!r}")
    if cfg.tokenizer == "byte" and cfg.vocab_size < 256:
        raise ConfigError(f"field 'vocab_size': the byte tokenizer needs at least 256, got {cfg.vocab_size}")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 300:
        raise ConfigError(f"field 'vocab_size': a BPE vocabulary needs at least 300 entries, got {cfg.vocab_size}")
    if cfg.decay_hidden < 0:
        raise ConfigError(f"field 'decay_hidden': expected >= 0 (0 means d_model // 4), got {cfg.decay_hidden}")
    if cfg.moe is not None:
        _positive(cfg.moe, "moe.", "experts", "top_k", "capacity_factor")
        if cfg.moe.top_k > cfg.moe.experts:
            raise ConfigError(f"field 'moe.top_k': {cfg.moe.top_k} exceeds moe.experts {cfg.moe.experts}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"field 'train.min_lr_ratio': expected a value in [0, 1], got {t.min_lr_ratio}")
    if t.warmup < 0 or t.weight_decay < 0:
        bad = "warmup" if t.warmup < 0 else "weight_decay"
        raise ConfigError(f"field 'train.{bad}': expected >= 0, got {getattr(t, bad)}")
    return cfg


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """A bundled config name ("tiny", "125m", "1.3b", "7b") or a YAML path -> validated Config.

    `overrides` maps dotted fields to values, e.g. {"train.steps": 50}.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config '{name_or_path}': no such file, and not a bundled config ({', '.join(available())})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {path.name}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path.name}: expected a mapping of fields, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        for dotted, value in (overrides or {}).items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else node
            node[leaf] = value
        return validate(_from_dict(Config, data))
    except ConfigError as err:
        raise ConfigError(f"config {path.name}: {err}") from None


def to_dict(cfg) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return list(v) if isinstance(v, tuple) else v

    return plain(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with to_dict (e.g. inside a checkpoint)."""
    return validate(_from_dict(Config, data))
