"""Text shards as documents: .txt / .jsonl / .parquet files (.txt and .jsonl also as
.gz, or .zst with `zstandard`), local or anything `etils.epath` opens, and the seeded
split each document belongs to. Read by `lm_dataset` (building datasets) and
`tokenizer` (training a BPE on files).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence

from etils import epath

TEXT_FORMATS = (".txt", ".jsonl", ".parquet")


def _format_of(path: str) -> tuple[str, str | None]:
  """(format, compression) from the file name."""
  name, compression = path.lower(), None
  for ext in (".gz", ".zst"):
    if name.endswith(ext):
      name, compression = name[: -len(ext)], ext
  for fmt in TEXT_FORMATS + (".json",):
    if name.endswith(fmt):
      fmt = ".jsonl" if fmt == ".json" else fmt
      if fmt == ".parquet" and compression:
        raise ValueError(f"{path}: parquet is compressed internally; drop {compression}")
      return fmt, compression
  raise ValueError(
    f"{path}: unknown format; supported: {', '.join(TEXT_FORMATS)} "
    f"(.json lines as .jsonl; .txt / .jsonl may end in .gz or .zst)"
  )


@contextlib.contextmanager
def _open_binary(path: epath.Path, compression: str | None):
  with path.open("rb") as f:
    if compression == ".gz":
      with gzip.GzipFile(fileobj=f) as g:
        yield g
    elif compression == ".zst":
      try:
        import zstandard  # pyright: ignore[reportMissingImports]  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
          f"{path}: reading .zst needs the `zstandard` package (pip install zstandard)"
        ) from e
      with zstandard.ZstdDecompressor().stream_reader(f) as z:
        yield z
    else:
      yield f


def read_documents(
  path: str | os.PathLike, text_field: str = "text", separator: str | None = None
) -> Iterator[str]:
  """The documents of one shard, in order; empty documents are skipped.

  .txt: the whole file is one document, or it is cut at `separator` (e.g.
  "<|endoftext|>" for TinyStories, "\\n" for one per line). .jsonl: one JSON
  object per line, its `text_field`. .parquet (needs pyarrow): column
  `text_field`.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such text shard: {path}")
  fmt, compression = _format_of(os.fspath(path))
  if fmt == ".parquet":
    yield from _read_parquet(path, text_field)
    return
  with _open_binary(path, compression) as f:
    lines = io.TextIOWrapper(f, encoding="utf-8", newline="")
    if fmt == ".txt":
      text = lines.read()
      for doc in [text] if separator is None else text.split(separator):
        if doc.strip():
          yield doc
      return
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
      if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise ValueError(f"{path}:{i + 1}: no text field {text_field!r} (set text_field=)")
      if obj[text_field].strip():
        yield obj[text_field]


def _read_parquet(path: epath.Path, text_field: str) -> Iterator[str]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"{path}: reading parquet needs the `pyarrow` package (pip install pyarrow)"
    ) from e
  with path.open("rb") as f:
    pf = pq.ParquetFile(f)
    if text_field not in pf.schema_arrow.names:
      raise ValueError(
        f"{path}: no column {text_field!r} (columns {pf.schema_arrow.names}; set text_field=)"
      )
    for batch in pf.iter_batches(columns=[text_field]):
      for doc in batch.column(0).to_pylist():
        if doc and doc.strip():
          yield doc


def expand_files(patterns: str | Sequence[str]) -> list[str]:
  """Files matching each path or glob (sorted per pattern), in pattern order."""
  patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
  if not patterns:
    raise ValueError("no text files given")
  files = []
  for pattern in map(os.fspath, patterns):
    wild = min((pattern.find(c) for c in "*?[" if c in pattern), default=-1)
    if wild >= 0:
      parent, _, _ = pattern[:wild].rpartition("/")
      rest = pattern[len(parent) + 1 :] if parent else pattern
      matches = sorted(os.fspath(p) for p in epath.Path(parent or ".").glob(rest))
      if not matches:
        raise FileNotFoundError(f"no files match {pattern!r}")
      files.extend(matches)
    elif not epath.Path(pattern).exists():
      raise FileNotFoundError(f"no such text shard: {pattern}")
    else:
      files.append(pattern)
  for f in files:
    _format_of(f)  # unknown formats fail before any work
  return files


def document_split(text: str, seed: int, sgld_fraction: float, validation_fraction: float) -> str:
  """The split of a document: u = hash(seed, text) ∈ [0, 1); validation
  below `validation_fraction`, then sgld, then train."""
  digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
  u = int.from_bytes(digest, "little") / 2.0**64
  if u < validation_fraction:
    return "validation"
  return "sgld" if u < validation_fraction + sgld_fraction else "train"
