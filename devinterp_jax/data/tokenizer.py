"""Tokenizers for real text: load a tokenizer.json, or train a BPE offline.

Built on Hugging Face `tokenizers` (Rust, no network use here). `load_tokenizer`
reads a saved tokenizer, e.g. the 5k truncated GPT-2 tokenizer of the
TinyStories runs; `train_bpe` trains a byte-level BPE (GPT-2 style, so any
text round-trips) of a given vocabulary size on local text, with the BOS token
reserved as id 0. Encodings are int32 numpy arrays without BOS; the dataset
builder adds BOS at the start of each context.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from devinterp_jax import atomic
from devinterp_jax.data import documents

DEFAULT_BOS = "<|BOS|>"
# Tried in order by `load_tokenizer(path)` when no bos_token is given.
BOS_CANDIDATES = (DEFAULT_BOS, "<|endoftext|>", "<s>", "<bos>", "[BOS]", "[CLS]")
_BYTE_ALPHABET = 256


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A `tokenizers.Tokenizer` with its BOS id."""

  tokenizer: tokenizers.Tokenizer
  bos_token: str
  bos_id: int

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (no BOS, no post-processing): int32 [L]."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text, in parallel."""
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer.json atomically (BOS is found again by its token)."""
    atomic.write_text(os.fspath(path), self.tokenizer.to_str())


def _with_bos(tok: tokenizers.Tokenizer, bos_token: str | None, where: str) -> TextTokenizer:
  candidates = BOS_CANDIDATES if bos_token is None else (bos_token,)
  for cand in candidates:
    bos_id = tok.token_to_id(cand)
    if bos_id is not None:
      return TextTokenizer(tok, cand, bos_id)
  raise ValueError(
    f"tokenizer {where} has no BOS token (tried {list(candidates)}); pass "
    f"bos_token= one of its tokens, e.g. '<|endoftext|>' for GPT-2"
  )


def load_tokenizer(path: str | os.PathLike, bos_token: str | None = None) -> TextTokenizer:
  """Loads a tokenizer.json. `bos_token=None` takes the first of `BOS_CANDIDATES` it has."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer file at {path!r} (expected a tokenizer.json)")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust side raises a bare Exception
    raise ValueError(f"{path!r} is not a tokenizers tokenizer.json: {e}") from e
  return _with_bos(tok, bos_token, f"at {path!r}")


def _texts(texts_or_files: Iterable[str | os.PathLike], text_field: str) -> Iterator[str]:
  for item in texts_or_files:
    if isinstance(item, str):
      yield item
    elif isinstance(item, os.PathLike):
      yield from documents.read_documents(item, text_field=text_field)
    else:
      raise ValueError(
        f"train_bpe takes texts (str) and files (os.PathLike, e.g. "
        f"pathlib.Path), got {type(item).__name__}"
      )


def train_bpe(
  texts_or_files: Iterable[str | os.PathLike],
  vocab_size: int,
  bos_token: str = DEFAULT_BOS,
  min_frequency: int = 2,
  text_field: str = "text",
) -> TextTokenizer:
  """Trains a byte-level BPE of `vocab_size` tokens (BOS = id 0) offline.

  Items of `texts_or_files` that are `str` are texts; `os.PathLike` items
  (e.g. `pathlib.Path`) are .txt / .jsonl / .parquet files read as documents
  by `documents.read_documents`. The vocabulary holds BOS, the 256 byte
  tokens and merges; it can come out smaller when the corpus has too few
  distinct pairs of frequency >= `min_frequency`.
  """
  if vocab_size < _BYTE_ALPHABET + 1:
    raise ValueError(
      f"vocab_size must be >= {_BYTE_ALPHABET + 1} (256 byte tokens + BOS) "
      f"for a byte-level BPE, got {vocab_size}"
    )
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=[bos_token],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(_texts(texts_or_files, text_field), trainer=trainer)
  return _with_bos(tok, bos_token, "after training")
