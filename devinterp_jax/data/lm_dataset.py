"""Language-modelling contexts as an array_record TFDS dataset (no TensorFlow).

`LmContexts` is a `tfds.core.GeneratorBasedBuilder` whose records are
{'tokens': int32 [T]}, one context each, in three splits: 'train', 'sgld' (the
SGLD / LLC-estimation data) and 'validation'. Two configs fill it:

* `TextShardsConfig`: local or cloud-bucket (anything `etils.epath` opens)
  .txt / .jsonl / .parquet shards (.txt and .jsonl also as .gz, or .zst with
  `zstandard`) tokenized with a tokenizer.json. Each document goes to one
  split by a seeded hash of its text (so duplicates share a split). A split's
  documents, in file order, are packed into one stream with BOS after each
  document, doc₁ BOS doc₂ BOS …, cut into pieces of T − 1 tokens (a short
  tail is dropped); each context is BOS + piece.
* `SyntheticConfig`: an embedded `ProseCorpus` / `CodeCorpus`; split i is
  `corpus.sample((seed, i), n_i)`.

Records keep generation order (shuffling disabled), and are read back by
random access with `tfds.data_source` (`load_split`). `batch_at` gives the
batch of a training step as a pure function of (step, seed): resuming at any
step reproduces the same batches.

    build_synthetic_dataset(ProseCorpus(), data_dir, "prose", {"train": 20000})
    train = load_split(data_dir, "prose", "train")
    batch = batch_at(train, step, batch_size=32, seed=0)   # int32 [32, T]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from devinterp_jax.data import synthetic_text
from devinterp_jax.data import tokenizer as tokenizer_lib
from devinterp_jax.data.documents import document_split, expand_files, read_documents

SPLITS = ("train", "sgld", "validation")
_ENCODE_BATCH = 256


# ----------------------------------------------------------------------------- packing


def pack_contexts(
  documents: Iterable[np.ndarray], bos_id: int, context_length: int
) -> Iterator[np.ndarray]:
  """Packs token arrays as doc₁ BOS doc₂ BOS … into contexts BOS + (T − 1) tokens."""
  if context_length < 2:
    raise ValueError(f"context_length must be >= 2 (BOS + 1 token), got {context_length}")
  n = context_length - 1
  buf, size = [], 0
  for doc in documents:
    buf += [np.asarray(doc, np.int32), np.array([bos_id], np.int32)]
    size += len(doc) + 1
    if size >= n:
      stream = np.concatenate(buf)
      k = len(stream) // n
      for piece in stream[: k * n].reshape(k, n):
        yield np.concatenate([[bos_id], piece]).astype(np.int32)
      buf, size = [stream[k * n :]], len(stream) - k * n


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class TextShardsConfig(tfds.core.BuilderConfig):
  """Tokenized text shards; `name` names the dataset directory."""

  files: tuple[str, ...] = ()
  tokenizer_path: str = ""
  bos_token: str | None = None  # None: see tokenizer.load_tokenizer
  context_length: int = 1024
  text_field: str = "text"
  separator: str | None = None  # .txt documents (see read_documents)
  sgld_fraction: float = 0.1
  validation_fraction: float = 0.05
  split_seed: int = 0


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """An embedded corpus; `num_contexts` maps split -> number of contexts."""

  corpus: Any = None  # synthetic_text.ProseCorpus | CodeCorpus
  num_contexts: dict = dataclasses.field(default_factory=dict)
  seed: int = 0


def _check_config(cfg: tfds.core.BuilderConfig) -> None:
  if isinstance(cfg, TextShardsConfig):
    if cfg.context_length < 2:
      raise ValueError(f"context_length must be >= 2 (BOS + 1 token), got {cfg.context_length}")
    fr = (cfg.sgld_fraction, cfg.validation_fraction)
    if min(fr) < 0 or sum(fr) >= 1:
      raise ValueError(f"sgld_fraction and validation_fraction must be >= 0 with sum < 1, got {fr}")
  elif isinstance(cfg, SyntheticConfig):
    if not hasattr(cfg.corpus, "sample"):
      raise ValueError(
        f"SyntheticConfig.corpus must be a ProseCorpus or CodeCorpus, got {cfg.corpus!r}"
      )
    bad = {s: n for s, n in cfg.num_contexts.items() if s not in SPLITS or n < 0}
    if bad or not cfg.num_contexts:
      raise ValueError(f"num_contexts maps splits {SPLITS} to counts >= 0, got {cfg.num_contexts}")
  else:
    raise ValueError(f"LmContexts needs a TextShardsConfig or SyntheticConfig, got {cfg!r}")


class LmContexts(tfds.core.GeneratorBasedBuilder):
  """Fixed-length LM contexts {'tokens': int32 [T]} (see the module docstring)."""

  name = "devinterp_lm_contexts"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "BOS + T-1 packed tokens; splits train / sgld / validation."}

  def __init__(self, *, config: tfds.core.BuilderConfig, **kwargs):
    _check_config(config)
    super().__init__(config=config, **kwargs)

  def _config(self) -> TextShardsConfig | SyntheticConfig:
    cfg = self.builder_config
    assert isinstance(cfg, (TextShardsConfig, SyntheticConfig))  # _check_config
    return cfg

  def _text_config(self) -> TextShardsConfig:
    cfg = self.builder_config
    assert isinstance(cfg, TextShardsConfig)  # only text shards read files
    return cfg

  @functools.cached_property
  def _tokenizer(self) -> tokenizer_lib.TextTokenizer:
    cfg = self._text_config()
    return tokenizer_lib.load_tokenizer(cfg.tokenizer_path, cfg.bos_token)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self._config()
    if isinstance(cfg, SyntheticConfig):
      T, meta = (
        cfg.corpus.context_length,
        {
          "vocab_size": cfg.corpus.vocab_size,
          "bos_id": synthetic_text.BOS_ID,
          "source": repr(cfg.corpus),
          "seed": cfg.seed,
        },
      )
    else:
      T, meta = (
        cfg.context_length,
        {
          "vocab_size": self._tokenizer.vocab_size,
          "bos_id": self._tokenizer.bos_id,
          "source": list(cfg.files),
          "tokenizer": cfg.tokenizer_path,
          "split_seed": cfg.split_seed,
        },
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {"tokens": tfds.features.Tensor(shape=(T,), dtype=np.int32)}
      ),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(meta),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing downloads
    cfg = self._config()
    if isinstance(cfg, SyntheticConfig):
      return {s: self._generate_examples(s) for s in SPLITS if s in cfg.num_contexts}
    files = expand_files(cfg.files)
    return {s: self._generate_examples(s, files) for s in SPLITS}

  def _generate_examples(self, split: str, files: list[str] | None = None):
    if isinstance(self.builder_config, SyntheticConfig):
      return self._synthetic(split)
    assert files is not None  # _split_generators passes the text shards' files
    return self._text(files, split)

  def _synthetic(self, split: str):
    cfg = self.builder_config
    assert isinstance(cfg, SyntheticConfig)
    i = 0
    for chunk in cfg.corpus.iter_chunks((cfg.seed, SPLITS.index(split)), cfg.num_contexts[split]):
      for ctx in chunk:
        yield i, {"tokens": ctx}
        i += 1

  def _text(self, files: list[str], split: str):
    cfg = self._text_config()
    tok = self._tokenizer

    def docs():
      batch = []
      for f in files:
        for doc in read_documents(f, cfg.text_field, cfg.separator):
          if (
            document_split(doc, cfg.split_seed, cfg.sgld_fraction, cfg.validation_fraction) == split
          ):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
              yield from tok.encode_batch(batch)
              batch = []
      yield from tok.encode_batch(batch)

    for i, ctx in enumerate(pack_contexts(docs(), tok.bos_id, cfg.context_length)):
      yield i, {"tokens": ctx}


# ----------------------------------------------------------------------------- build / read


def _prepare(config: tfds.core.BuilderConfig, data_dir: str | os.PathLike) -> str:
  builder = LmContexts(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(file_format="array_record")
  return os.fspath(builder.data_dir)


def build_text_dataset(
  name: str,
  files: str | Sequence[str],
  tokenizer_path: str,
  data_dir: str | os.PathLike,
  context_length: int,
  **options: Any,
) -> str:
  """Tokenizes text shards into dataset `name` under `data_dir`; returns its directory.

  `options` are the other `TextShardsConfig` fields (text_field, separator,
  bos_token, sgld_fraction, validation_fraction, split_seed). A dataset that
  is already built is left as it is.
  """
  files = (files,) if isinstance(files, (str, os.PathLike)) else tuple(files)
  config = TextShardsConfig(
    name=name,
    files=tuple(map(os.fspath, files)),
    tokenizer_path=os.fspath(tokenizer_path),
    context_length=context_length,
    **options,
  )
  return _prepare(config, data_dir)


def build_synthetic_dataset(
  corpus: Any, data_dir: str | os.PathLike, name: str, num_contexts: dict[str, int], seed: int = 0
) -> str:
  """Writes `corpus.sample((seed, i), n)` as split SPLITS[i]; returns the directory."""
  config = SyntheticConfig(name=name, corpus=corpus, num_contexts=dict(num_contexts), seed=seed)
  return _prepare(config, data_dir)


def load_split(data_dir: str | os.PathLike, name: str, split: str):
  """Random-access source of a built split: `src[i]` is {'tokens': int32 [T]}."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  path = epath.Path(data_dir) / LmContexts.name / name
  if not path.exists():
    raise FileNotFoundError(
      f"no dataset {name!r} under {data_dir} (expected {path}); "
      f"build it with build_text_dataset / build_synthetic_dataset"
    )
  return tfds.data_source(
    f"{LmContexts.name}/{name}", split=split, data_dir=os.fspath(data_dir), download=False
  )


def dataset_metadata(data_dir: str | os.PathLike, name: str) -> dict[str, Any]:
  """The stored metadata: vocab_size, bos_id, source, …"""
  builder = tfds.builder(f"{LmContexts.name}/{name}", data_dir=os.fspath(data_dir))
  return dict(builder.info.metadata or {})


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.setflags(write=False)
  return perm


def batch_indices(num_records: int, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
  """Record indices of training step `step`: [B].

  Epoch e = step // (N // B) visits a seeded permutation of the N records
  (seed, e) in batches of B; the last N mod B records of an epoch are skipped.
  """
  if not 1 <= batch_size <= num_records:
    raise ValueError(
      f"batch_size must be in [1, {num_records}] (the number of records), got {batch_size}"
    )
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  epoch, k = divmod(step, num_records // batch_size)
  return _permutation(num_records, seed, epoch)[k * batch_size : (k + 1) * batch_size]


def gather(source, indices: Sequence[int] | np.ndarray) -> np.ndarray:
  """Contexts `indices` of a data source (or an int array [N, T]): int32 [len, T]."""
  if isinstance(source, np.ndarray):
    return source[np.asarray(indices)].astype(np.int32)
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    records = source.__getitems__(indices)
  else:
    records = [source[i] for i in indices]
  return np.stack([r["tokens"] for r in records]).astype(np.int32)


def batch_at(source, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
  """The batch of training step `step`: int32 [B, T], a pure function of its
  arguments (see `batch_indices`), so a resumed run sees the same batches."""
  return gather(source, batch_indices(len(source), step, batch_size, seed))


def load_array(source) -> np.ndarray:
  """A whole split in memory (e.g. the SGLD data): int32 [N, T]."""
  return gather(source, range(len(source)))


SYNTHETIC_NAME = "synthetic"


def run_location(config, workdir: str) -> tuple[str, str]:
  """(data_dir, dataset name) of an LM run's token data (config fields `data`, `model`).

  `data.source='synthetic'`: the embedded corpus written to <workdir>/data;
  'tfds': the dataset `data.name` a user built under `data.data_dir`.
  """
  source = config.data.source
  if source == "synthetic":
    return os.path.join(workdir, "data"), f"{SYNTHETIC_NAME}_{config.data.corpus}"
  if source == "tfds":
    if not (config.data.data_dir and config.data.name):
      raise ValueError(
        "config.data.source='tfds' needs config.data.data_dir and "
        "config.data.name (build one with lm_dataset.build_text_dataset)"
      )
    return config.data.data_dir, config.data.name
  raise ValueError(f"config.data.source must be 'synthetic' or 'tfds', got {source!r}")


def load_run_tokens(config, workdir: str, split: str) -> np.ndarray:
  """A whole split of an LM run, int32 [N, T], checked against the model's
  vocabulary and context length."""
  data_dir, name = run_location(config, workdir)
  tokens = load_array(load_split(data_dir, name, split))
  T, V = config.model.context_length, config.model.vocab_size
  if tokens.ndim != 2 or tokens.shape[1] != T:
    raise ValueError(
      f"split {split!r} of {name} has contexts of shape {tokens.shape[1:]}, "
      f"the model's context length is {T}"
    )
  if tokens.size and int(tokens.max()) >= V:
    raise ValueError(
      f"split {split!r} of {name} has token id {int(tokens.max())} >= vocab_size {V}"
    )
  return tokens


def run_bos_id(config, workdir: str) -> int:
  """The BOS token of an LM run's dataset, from its stored metadata (a dataset built
  with a loaded tokenizer stores that tokenizer's own `bos_id`)."""
  data_dir, name = run_location(config, workdir)
  meta = dataset_metadata(data_dir, name)
  if "bos_id" not in meta:
    raise ValueError(
      f"dataset {name} under {data_dir} stores no bos_id in its metadata; "
      f"rebuild it (build_text_dataset / build_synthetic_dataset)"
    )
  return int(meta["bos_id"])
