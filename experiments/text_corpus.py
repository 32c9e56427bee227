"""Text that every Python installation has: the standard library's own sources, tokenized.

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (installed
packages under ``site-packages`` left out), read in sorted order of their paths, so the same
Python version gives the same text on any machine, without a download. Files that are not
UTF-8 (a few of the test suite's are, on purpose) are skipped. A file goes to the validation
split when the SHA-256 of its relative path, read as a number, falls in the first
``validation_fraction`` of the range: the split holds whole files, so no validation text is
seen in training, and a file keeps its split whatever other files exist.

The tokenizer is a byte-level byte-pair encoding (GPT-2's scheme) trained with the
``tokenizers`` library on the training files alone, with one special token,
``<|endoftext|>``, that separates files in the token streams. Training it takes seconds
(8 s for 16384 tokens on a 2-core CPU), encoding the corpus longer; both are cached in a
folder keyed by what they depend on (the files' paths and sizes, the vocabulary size, the
``tokenizers`` version), so a second run reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import sysconfig

import numpy as np

from jaxsoftmax.training import write_atomically

END_OF_TEXT = "<|endoftext|>"
# Encoded in blocks of files: encoding everything at once holds every file's text twice.
_ENCODE_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: pathlib.Path  # absolute
    name: str  # relative to the standard library's folder, with "/" separators
    size: int  # bytes


@dataclasses.dataclass
class Corpus:
    """Token streams of the two splits and what produced them.

    Attributes:
      train_tokens, validation_tokens: int32 ``[num_tokens]``: the files of each split encoded
        one after another, each followed by the end-of-text token.
      vocab_size: the tokenizer's vocabulary size (the classes of the language model).
      train_files, validation_files: how many files each split holds.
      skipped_files: files that are not UTF-8 text.
      tokenizer_path: the tokenizer's JSON file (``tokenizers.Tokenizer.from_file`` reads it).
      fingerprint: SHA-256 of the token streams: a checkpoint records it, so a run is never
        resumed on other data.
      source: where the text came from, for the record.
    """

    train_tokens: np.ndarray
    validation_tokens: np.ndarray
    vocab_size: int
    train_files: int
    validation_files: int
    skipped_files: int
    tokenizer_path: str
    fingerprint: str
    source: str

    def describe(self) -> dict:
        """A JSON-ready summary for metrics.json."""
        return {
            "source": self.source,
            "train_files": self.train_files,
            "validation_files": self.validation_files,
            "skipped_files": self.skipped_files,
            "train_tokens": int(self.train_tokens.size),
            "validation_tokens": int(self.validation_tokens.size),
            "vocab_size": self.vocab_size,
            "tokenizer": f"byte-level BPE trained with tokenizers {_tokenizers_version()}",
            "fingerprint": self.fingerprint,
        }


def default_cache_directory() -> str:
    """``$XDG_CACHE_HOME/jaxsoftmax/text-corpus`` (by default under ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsoftmax", "text-corpus")


def standard_library_files(root: str | None = None) -> list[SourceFile]:
    """The ``.py`` files under ``root`` (the standard library's folder), sorted by path, with
    ``site-packages`` left out."""
    root_path = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root_path.rglob("*.py"):
        relative = path.relative_to(root_path)
        if "site-packages" in relative.parts or not path.is_file():
            continue
        files.append(SourceFile(path, relative.as_posix(), path.stat().st_size))
    return sorted(files, key=lambda f: f.name)


def in_validation_split(name: str, validation_fraction: float) -> bool:
    """Whether the file of relative path ``name`` is held out for validation."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64


def _read_text(path: pathlib.Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` included) trained on
    ``texts``. Every byte has a token, so any text can be encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def _encode(tokenizer, texts: list[str]) -> np.ndarray:
    """The texts' tokens, each text followed by the end-of-text token, as one int32 stream."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    pieces = []
    for start in range(0, len(texts), _ENCODE_BLOCK):
        for ids in tokenizer.encode_batch_fast(texts[start : start + _ENCODE_BLOCK]):
            pieces.append(np.asarray(ids.ids, np.int32))
            pieces.append(np.asarray([end], np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def load(
    vocab_size: int = 16384,
    *,
    validation_fraction: float = 0.05,
    max_files: int | None = None,
    root: str | None = None,
    cache_directory: str | None = None,
    on_progress=print,
) -> Corpus:
    """The standard library's sources, split by files and tokenized; cached on disk.

    Args:
      vocab_size: the byte-pair encoding's vocabulary size, at least 257 (256 bytes and the
        end-of-text token).
      validation_fraction: the share of files held out, in (0, 1).
      max_files: keep only the first ``max_files`` files in sorted order (a small corpus for
        tests and quick runs); None keeps all.
      root: the folder to read instead of the standard library's.
      cache_directory: where the tokenizer and token streams are kept; None:
        :func:`default_cache_directory`.
      on_progress: called with a line of text before the slow steps (None: silent).

    Raises:
      ValueError: either split would be empty, or ``vocab_size`` is too small.
    """
    if vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small; expected at least 257 (one token per byte "
            "and the end-of-text token)."
        )
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in (0, 1).")
    files = standard_library_files(root)
    source = f"{len(files)} .py files under {root or sysconfig.get_paths()['stdlib']}"
    if max_files is not None:
        files = files[:max_files]
        source = f"the first {len(files)} of {source}"
    key = hashlib.sha256(
        json.dumps(
            {
                "files": [(f.name, f.size) for f in files],
                "vocab_size": vocab_size,
                "validation_fraction": validation_fraction,
                "tokenizers": _tokenizers_version(),
                "format": 1,
            }
        ).encode("utf-8")
    ).hexdigest()[:16]
    folder = os.path.join(cache_directory or default_cache_directory(), key)
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    streams_path = os.path.join(folder, "tokens.npz")

    if os.path.exists(tokenizer_path) and os.path.exists(streams_path):
        with np.load(streams_path, allow_pickle=False) as stored:
            train_tokens = stored["train"]
            validation_tokens = stored["validation"]
            counts = [int(c) for c in stored["file_counts"]]
            stored_vocab = int(stored["vocab_size"])
    else:
        if on_progress is not None:
            on_progress(
                f"reading {len(files)} files and training a byte-pair encoding of {vocab_size} "
                f"tokens (cached in {folder})"
            )
        train_texts, validation_texts, skipped = [], [], 0
        for file in files:
            text = _read_text(file.path)
            if text is None:
                skipped += 1
            elif in_validation_split(file.name, validation_fraction):
                validation_texts.append(text)
            else:
                train_texts.append(text)
        if not train_texts or not validation_texts:
            raise ValueError(
                f"the corpus ({source}) has {len(train_texts)} training and "
                f"{len(validation_texts)} validation files; expected at least one of each: "
                "use more files or another validation_fraction."
            )
        tokenizer = train_tokenizer(train_texts, vocab_size)
        stored_vocab = tokenizer.get_vocab_size()
        if on_progress is not None:
            on_progress(f"encoding the corpus with the {stored_vocab}-token byte-pair encoding")
        train_tokens = _encode(tokenizer, train_texts)
        validation_tokens = _encode(tokenizer, validation_texts)
        counts = [len(train_texts), len(validation_texts), skipped]
        os.makedirs(folder, exist_ok=True)
        write_atomically(tokenizer_path, tokenizer.to_str().encode("utf-8"))
        buffer = io.BytesIO()
        np.savez(
            buffer,
            train=train_tokens,
            validation=validation_tokens,
            file_counts=np.asarray(counts),
            vocab_size=np.asarray(stored_vocab),
        )
        write_atomically(streams_path, buffer.getvalue())

    digest = hashlib.sha256()
    for stream in (train_tokens, validation_tokens):
        digest.update(np.ascontiguousarray(stream).tobytes())
    return Corpus(
        train_tokens=train_tokens,
        validation_tokens=validation_tokens,
        vocab_size=stored_vocab,
        train_files=counts[0],
        validation_files=counts[1],
        skipped_files=counts[2],
        tokenizer_path=tokenizer_path,
        fingerprint=digest.hexdigest(),
        source=source,
    )


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """``-sum_v p_v log p_v`` in nats, ``p`` the tokens' frequencies: the loss of the best
    model that ignores context, on the text it was counted on."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def unigram_cross_entropy(train: np.ndarray, other: np.ndarray, vocab_size: int) -> float:
    """The mean loss, in nats, on the tokens ``other`` of the unigram model counted on
    ``train`` with add-one smoothing (so tokens unseen in training get a probability): the
    context-free baseline on held-out text."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-np.mean(log_p[other]))
