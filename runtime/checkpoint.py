"""Checkpoints: one file, written atomically (temp file, fsync, rename), so a crash mid-write
leaves the previous checkpoint intact."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "mmrec-ckpt/1"


class CheckpointError(ValueError):
    """A checkpoint is missing or not one of ours."""


def save(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: report it, not pickle's internals
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an mmrec checkpoint (expected format {FORMAT})")
    return payload
