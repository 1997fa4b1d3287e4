"""Caption tokenizers: the interface every one offers, and the word-level vocabulary.

:class:`CaptionTokenizer` is what training, decoding and checkpoints use: special ids,
``encode`` (word tokens -> ids with ``<bos>``/``<eos>``), ``decode`` (ids -> words of the
caption text), ``pieces`` (one display string per id), teacher-forcing ``batch`` tensors, and
``save_to``/``load`` of a checkpoint folder. :class:`Vocabulary` is the word-level one, built
from the train split only (no leakage from val/test); the subword ones (byte-level BPE,
WordPiece, any saved Hugging Face tokenizer) are in :mod:`benchmark.tokenization`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from benchmark.errors import CapbenchError
from benchmark.userfiles import describe, field_type_problem, read_json

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

__all__ = ["CaptionTokenizer", "Vocabulary", "PAD", "BOS", "EOS", "UNK"]


class CaptionTokenizer:
    """What every caption tokenizer offers (subclasses set ``kind``, the four special ids and
    implement ``__len__``, ``encode``, ``decode``, ``save_to``)."""

    kind = "?"
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    def __len__(self) -> int:
        raise NotImplementedError

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """``<bos> t1..tk <eos>`` ids of a caption given as word tokens, at most ``max_len``
        tokens of this tokenizer (longer captions are cut)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The caption's words (whitespace-split text) up to the first ``<eos>``."""
        raise NotImplementedError

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """One display string per id up to the first ``<eos>`` (a word, or a subword piece):
        the labels of per-token heatmaps."""
        return self.decode(ids)

    def save_to(self, folder: str | Path) -> None:
        """Write this tokenizer into a checkpoint folder."""
        raise NotImplementedError

    def batch(self, captions: Sequence[Sequence[str]], max_len: int):
        """Teacher-forcing tensors for captions given as word-token lists.

        Returns ``inputs (B, T)`` (``<bos> w..``), ``targets (B, T)`` (``w.. <eos>``, ``<pad>``
        elsewhere) and ``lengths (B,)`` with T = the longest encoded caption + 1.
        """
        enc = [self.encode(c, max_len) for c in captions]
        T = max(len(e) for e in enc) - 1
        inputs = torch.full((len(enc), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(enc), T), self.pad_id, dtype=torch.long)
        for i, e in enumerate(enc):
            inputs[i, : len(e) - 1] = torch.tensor(e[:-1])
            targets[i, : len(e) - 1] = torch.tensor(e[1:])
        lengths = torch.tensor([len(e) - 1 for e in enc])
        return inputs, targets, lengths


class Vocabulary(CaptionTokenizer):
    """Index <-> word mapping with ``<pad>=0 <bos>=1 <eos>=2 <unk>=3``.

    Built by :meth:`build` from training captions; words seen fewer than ``min_count`` times
    map to ``<unk>``. Saved with every run (:meth:`save`/:meth:`load`).
    """

    kind = "word"

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Words of ``captions`` (token lists) with count >= ``min_count``, most frequent first."""
        counts = Counter(w for c in captions for w in c)
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """``<bos> w1..wk <eos>`` ids with at most ``max_len`` words (longer captions are cut)."""
        ids = [self.stoi.get(w, self.unk_id) for w in tokens[:max_len]]
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<eos>``, skipping ``<bos>``/``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i])
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}))

    def save_to(self, folder: str | Path) -> None:
        """``vocab.json`` in the checkpoint folder."""
        self.save(Path(folder) / "vocab.json")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """The vocabulary in ``vocab.json``. Raises CapbenchError naming the file when it is
        unreadable (see :func:`benchmark.userfiles.read_json`) or ``itos`` is not a list of
        words (strings)."""
        data = read_json(path, "vocabulary")
        itos = data.get("itos") if isinstance(data, dict) else None
        if not isinstance(itos, list) or (bad := field_type_problem(itos, [("*", (str,))])):
            got = bad or f"got {describe(itos)}"
            raise CapbenchError(f"{path}: 'itos' must be the list of words (strings): {got}")
        return cls(itos)
