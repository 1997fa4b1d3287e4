"""Subword caption tokenizers through Hugging Face ``tokenizers`` and ``transformers``.

``tokenizer: word | bpe | wordpiece | PATH`` (config key, ``--tokenizer``):

* ``word``: :class:`benchmark.vocab.Vocabulary`, the word-level vocabulary (the default;
  exactly the results capbench gave before subword tokenizers existed);
* ``bpe``: byte-level BPE as in GPT-2 (Radford et al. 2019; Sennrich et al. 2016), trained
  with ``tokenizers.trainers.BpeTrainer`` on the train split's captions only;
* ``wordpiece``: WordPiece as in BERT (Devlin et al. 2019; Schuster & Nakajima 2012),
  ``tokenizers.trainers.WordPieceTrainer`` on the train captions only;
* ``PATH``: any saved Hugging Face tokenizer (a folder with ``tokenizer.json``, or a hub name
  such as ``bert-base-uncased`` for a user with internet), loaded with
  ``transformers.PreTrainedTokenizerFast.from_pretrained``.

Subword tokenizers are trained on the same normalised text the word vocabulary sees (each
caption's word tokens joined by spaces), are wrapped as
``transformers.PreTrainedTokenizerFast`` and are saved in the checkpoint folder as
``tokenizer.json``. Generated ids are decoded to text before scoring, so every tokenizer is
scored by the same PTB tokenizer and metrics.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from benchmark.errors import ConfigError
from benchmark.userfiles import read_json
from benchmark.vocab import BOS, EOS, PAD, SPECIALS, UNK, CaptionTokenizer, Vocabulary

__all__ = ["SubwordTokenizer", "build_tokenizer", "load_tokenizer", "check_tokenizer_spec",
           "TRAINED_KINDS", "mean_tokens_per_caption", "hub_offline_reason"]

#: tokenizers capbench trains itself on the train split
TRAINED_KINDS = ("bpe", "wordpiece")


class SubwordTokenizer(CaptionTokenizer):
    """A ``transformers.PreTrainedTokenizerFast`` behind the :class:`CaptionTokenizer`
    interface. ``kind``: ``bpe``, ``wordpiece`` or the path/name it was loaded from.

    Raises ConfigError when the tokenizer has no pad, begin/end (or BERT's ``[CLS]``/
    ``[SEP]``) and unknown token.
    """

    def __init__(self, hf, kind: str) -> None:
        self.hf = hf
        self.kind = kind
        ids = {"pad": hf.pad_token_id, "bos": hf.bos_token_id if hf.bos_token_id is not None
               else hf.cls_token_id, "eos": hf.eos_token_id if hf.eos_token_id is not None
               else hf.sep_token_id, "unk": hf.unk_token_id}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ConfigError(f"tokenizer {kind!r} has no {', '.join(missing)} token; capbench needs "
                              "pad, begin (bos or cls), end (eos or sep) and unknown tokens")
        if len({ids["pad"], ids["bos"], ids["eos"]}) < 3:
            raise ConfigError(f"tokenizer {kind!r} uses one id for two of pad ({ids['pad']}), "
                              f"begin ({ids['bos']}) and end ({ids['eos']}); capbench masks pad "
                              "and learns to emit end, so they must differ")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (ids[k] for k in ("pad", "bos", "eos", "unk"))
        self._special = {self.pad_id, self.bos_id, self.eos_id}

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        ids = self.hf.encode(" ".join(tokens), add_special_tokens=False)[:max_len]
        return [self.bos_id, *ids, self.eos_id]

    def _until_eos(self, ids: Iterable[int]) -> list[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in self._special:
                out.append(i)
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        return self.hf.decode(self._until_eos(ids), skip_special_tokens=False,
                              clean_up_tokenization_spaces=False).split()

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each id's piece, without the byte-level space mark (``Ġ``); WordPiece
        continuations keep their ``##``."""
        return [p.replace("Ġ", "") or "␣" for p in self.hf.convert_ids_to_tokens(self._until_eos(ids))]

    def save_to(self, folder: str | Path) -> None:
        """``tokenizer.json`` (and ``tokenizer_config.json``) in the checkpoint folder."""
        self.hf.save_pretrained(str(folder))


def _train(kind: str, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                            show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK)


#: seconds :func:`hub_offline_reason` waits for a connection to the Hugging Face hub
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


def _hub_cache() -> Path:
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", Path(hf_home) / "hub"))


def _in_hub_cache(name: str) -> bool:
    """Whether the hub cache holds a tokenizer file of repository ``name``."""
    from huggingface_hub import try_to_load_from_cache

    for file in ("tokenizer.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(name, file, cache_dir=_hub_cache()), str):
                return True
        except Exception:  # not a valid repository name: not cached
            return False
    return False


def hub_offline_reason(timeout: float | None = None) -> str | None:
    """Why the Hugging Face hub cannot be used now, or ``None``: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is set, or its host (``HF_ENDPOINT``) takes no connection
    within ``timeout`` seconds (default :data:`HUB_PROBE_TIMEOUT_S`; not probed behind a
    proxy). Returns within about ``timeout`` seconds, where ``from_pretrained`` retries for
    minutes."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    wait = HUB_PROBE_TIMEOUT_S if timeout is None else timeout
    result: list = []

    def probe():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=wait).close()
            result.append(None)
        except OSError as exc:
            result.append(exc.strerror or str(exc) or type(exc).__name__)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(wait)
    if not result:
        return f"{url.hostname} did not answer within {wait:g} s"
    return f"{url.hostname} cannot be reached ({result[0]})" if result[0] else None


def _from_pretrained(spec: str):
    from transformers import PreTrainedTokenizerFast

    kwargs = {}
    if not Path(spec).exists() and (offline := hub_offline_reason()):
        if not _in_hub_cache(spec):  # refuse now: from_pretrained would retry for minutes
            raise ConfigError(
                f"tokenizer {spec!r}: not word, bpe or wordpiece, not a folder, and not in the "
                f"local Hugging Face cache ({_hub_cache()}); it cannot be downloaded now "
                f"({offline}). Download it once with a network (python -c \"from transformers "
                f"import AutoTokenizer; AutoTokenizer.from_pretrained('{spec}')\"), or pass "
                "the folder of a saved tokenizer (tokenizer.save_pretrained(FOLDER))")
        kwargs["local_files_only"] = True
    try:
        return PreTrainedTokenizerFast.from_pretrained(spec, **kwargs)
    except Exception as exc:  # missing, offline, or a damaged tokenizer.json: say which
        local = Path(spec).exists()
        raise ConfigError(
            f"tokenizer {spec!r}: " + (f"cannot load a Hugging Face tokenizer from this folder "
                                       f"({exc}); it needs tokenizer.json"
                                       if local else
                                       "not word, bpe or wordpiece, not a folder, and not "
                                       f"downloadable ({type(exc).__name__}); offline, pass the "
                                       "folder of a saved tokenizer")) from exc


BPE_ALPHABET = 256 + 4  # byte-level BPE's bytes and its special tokens, before any merge


def check_tokenizer_spec(spec: str, vocab_size: int | None = None) -> None:
    """Fail before any work for a tokenizer that cannot be had: ``word``/``bpe``/``wordpiece``
    always can (but ``bpe`` needs a ``vocab_size`` above its byte alphabet, or it learns no
    merge and every caption becomes one token a byte); a PATH or hub name is loaded once
    (ConfigError saying why not)."""
    if spec == "bpe" and vocab_size is not None and vocab_size <= BPE_ALPHABET:
        raise ConfigError(f"tokenizer_vocab_size = {vocab_size} with tokenizer bpe: byte-level BPE "
                          f"starts from {BPE_ALPHABET} entries (256 bytes and 4 special tokens), "
                          "so it would learn no merge and write one token a byte; use 500 or "
                          "more (default 1000)")
    if spec not in ("word", *TRAINED_KINDS):
        SubwordTokenizer(_from_pretrained(spec), spec)


def build_tokenizer(spec: str, captions: Iterable[Sequence[str]], *, min_count: int = 1,
                    vocab_size: int = 1000) -> CaptionTokenizer:
    """The caption tokenizer of a run from its train captions (word-token lists): the word
    vocabulary (``min_count``), a BPE or WordPiece tokenizer trained to at most
    ``vocab_size`` entries (byte-level BPE always holds its 256 bytes and 4 special tokens,
    so it has at least 260), or the saved tokenizer ``spec`` (not trained). Raises
    ConfigError for a tokenizer that cannot be loaded or lacks special tokens."""
    captions = list(captions)
    if spec == "word":
        return Vocabulary.build(captions, min_count)
    if spec in TRAINED_KINDS:
        return SubwordTokenizer(_train(spec, [" ".join(c) for c in captions], vocab_size), spec)
    return SubwordTokenizer(_from_pretrained(spec), spec)


def load_tokenizer(folder: str | Path) -> CaptionTokenizer:
    """The tokenizer saved in a checkpoint folder: ``tokenizer.json`` (subword) or
    ``vocab.json`` (word). Raises FileNotFoundError when neither exists."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast


        config = read_json(folder / "config.json", "checkpoint config") \
            if (folder / "config.json").is_file() else {}
        kind = config.get("tokenizer", "subword") if isinstance(config, dict) else "subword"
        return SubwordTokenizer(PreTrainedTokenizerFast.from_pretrained(str(folder)), kind)
    if (folder / "vocab.json").is_file():
        return Vocabulary.load(folder / "vocab.json")
    raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json")


def caption_lengths(tokenizer: CaptionTokenizer, captions: Iterable[Sequence[str]]) -> list[int]:
    """Number of tokens (without ``<bos>``/``<eos>``) of each caption, uncut."""
    return [len(tokenizer.encode(c, 10**6)) - 2 for c in captions]


def mean_tokens_per_caption(tokenizer: CaptionTokenizer, captions: Iterable[Sequence[str]]) -> float:
    """Mean of :func:`caption_lengths` (0.0 for no captions)."""
    lengths = caption_lengths(tokenizer, captions)
    return sum(lengths) / max(1, len(lengths))
