"""One path layer for everything a run reads and writes outside Orbax.

Workdirs, sweep output directories and report directories are plain strings.
A local path (no URI scheme, or `file://`) goes through `os`; any other path
(`gs://bucket/run`, `s3://…`) goes through `etils.epath`, the layer Orbax
itself uses, so a bucket workdir needs only that filesystem's package
(`gcsfs` for `gs://`, `s3fs` for `s3://`, or TensorFlow's `tf.io.gfile`).

What differs on an object store, and how `atomic`, `run_log` and `lock` handle it:
- there is no rename: a file is written as one object upload, which readers see
  whole or not at all (the object stores' own guarantee), and a directory is
  replaced file by file (`atomic.replace_dir`);
- there is no append: the metrics log rewrites its object (`run_log`);
- there is no `flock`: the workdir lock is a lease object (`lock`).

Local paths keep the rename-and-fsync writes and the kernel lock. Only the
local filesystem is tested end to end here; the remote branches are tested
against fsspec's in-memory filesystem standing in for a bucket
(tests/test_paths.py), not against a real bucket.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import IO, Any

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
  """The URI scheme of `path` ("gs", "s3", …), or None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  if m is None or m.group(1).lower() == "file":
    return None
  return m.group(1).lower()


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


def _local(path: str | os.PathLike) -> str:
  p = os.fspath(path)
  return p[len("file://") :] if p.startswith("file://") else p


def _remote(path: str | os.PathLike) -> Any:
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(os.fspath(path))


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or a remote URI without a trailing slash."""
  if is_local(path):
    return os.path.abspath(_local(path))
  return os.fspath(path).rstrip("/")


def canonical(path: str | os.PathLike) -> str:
  """A key naming one directory (symlinks resolved locally): for per-workdir state."""
  return os.path.realpath(_local(path)) if is_local(path) else absolute(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  if is_local(path):
    return os.path.join(_local(path), *parts)
  return posixpath.join(os.fspath(path), *parts)


def dirname(path: str | os.PathLike) -> str:
  if is_local(path):
    return os.path.dirname(os.path.abspath(_local(path)))
  return posixpath.dirname(absolute(path))


def exists(path: str | os.PathLike) -> bool:
  return os.path.exists(_local(path)) if is_local(path) else _remote(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return os.path.isdir(_local(path)) if is_local(path) else _remote(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) in a directory, sorted."""
  if is_local(path):
    return sorted(os.listdir(_local(path)))
  return sorted(p.name for p in _remote(path).iterdir())


def makedirs(path: str | os.PathLike) -> None:
  """Creates a directory and its parents (a no-op on object stores without
  directories, where any prefix exists once an object lies under it)."""
  if is_local(path):
    os.makedirs(_local(path), exist_ok=True)
  else:
    _remote(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO[Any]:
  """Opens a file for reading (writes go through `atomic`)."""
  if is_local(path):
    return open(_local(path), mode)  # pylint: disable=consider-using-with
  return _remote(path).open(mode)


def read_bytes(path: str | os.PathLike) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode()


def write_object(path: str | os.PathLike, data: bytes) -> None:
  """One whole-object upload to a remote path (`atomic.write_bytes` is the caller)."""
  if is_local(path):
    raise ValueError(f"{path!r} is local: write it with atomic.write_bytes")
  target = _remote(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(data)


def remove(path: str | os.PathLike) -> None:
  """Removes a file; a missing file is not an error."""
  if is_local(path):
    try:
      os.remove(_local(path))
    except FileNotFoundError:
      pass
  else:
    p = _remote(path)
    if p.exists():
      p.unlink()


def load_npz(path: str | os.PathLike) -> dict[str, Any]:
  """The arrays of an .npz file, read whole (np.load on local and remote paths)."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  with np.load(io.BytesIO(read_bytes(path))) as z:
    return {k: z[k] for k in z.files}
