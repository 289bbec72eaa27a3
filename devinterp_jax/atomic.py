"""Atomic file and directory writes: readers see the old version or the new one, never
a partial one, and a failed write leaves no temporary file behind.

A file is written to a temporary name beside its target, fsynced, renamed over
the target, and the directory is fsynced so the rename itself survives a power
loss. A directory (e.g. a report) is built under a temporary name and swapped in
whole (`replace_dir`).

In a multi-process run every write here is the leader's alone
(`multihost.is_leader`): the other processes hold the same results, so they
skip the write (`replace_dir` hands them a throwaway local directory), and the
shared filesystem sees each file written once. A caller whose other processes
read the file back waits at a `multihost.barrier` first.

A remote path (`gs://…`; `paths`) has no rename: a file is one object upload,
which readers see whole or not at all, and `replace_dir` builds the directory
locally and uploads it file by file, then removes the files the new version
lacks. There a reader can see a mix of the two versions for the duration of the
upload; on the local filesystem never.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import numpy as np

from devinterp_jax import multihost
from devinterp_jax import paths


# fsync of a directory is not supported everywhere (some network and FUSE mounts).
_UNSUPPORTED = {
  errno.EINVAL,
  errno.ENOTSUP,
  errno.EOPNOTSUPP,
  errno.EBADF,
  errno.EACCES,
  errno.EISDIR,
}


def fsync_dir(path: str) -> None:
  """Flushes a directory's entries (a rename into it) to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in _UNSUPPORTED:
      raise
  finally:
    os.close(fd)


def _tmp_name(path: str) -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, fsyncs, then renames (the
  leader only, in a multi-process run)."""
  if not multihost.is_leader():
    return
  if not paths.is_local(path):
    paths.write_object(path, data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = _tmp_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_dir(directory)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def save_npz(path: str, **arrays) -> None:
  if not multihost.is_leader():
    return
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def save_figure(fig, path: str, **savefig_kwargs) -> str:
  """Renders a matplotlib figure to PNG in memory and writes it atomically (the
  leader only: elsewhere it is not rendered)."""
  if not multihost.is_leader():
    return path
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kwargs)
  write_bytes(path, buf.getvalue())
  return path


@contextlib.contextmanager
def replace_dir(path: str) -> Iterator[str]:
  """Yields a fresh temporary directory; on success it replaces `path` whole.

  Everything written into the yielded directory appears at `path` at once:
  the old directory is renamed aside, the new one renamed into place, and the
  old one removed. On an exception the temporary directory is removed and
  `path` is left as it was. A crash between the two renames leaves the old
  version at `<path>.old…` beside a missing `path` (never a mix of both).
  A non-leader process of a multi-process run gets a local temporary directory
  that is discarded afterwards; `path` is the leader's to replace.
  """
  if not multihost.is_leader():
    with tempfile.TemporaryDirectory(prefix="devinterp-discard-") as tmp:
      yield tmp
    return
  if not paths.is_local(path):
    with _replace_remote_dir(path) as tmp:
      yield tmp
    return
  path = os.path.abspath(path.rstrip(os.sep))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = _tmp_name(path)
  os.makedirs(tmp)
  try:
    yield tmp
    for root, _, _ in os.walk(tmp):
      fsync_dir(root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(path):
    old = f"{path}.old{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
  os.replace(tmp, path)
  fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _replace_remote_dir(path: str) -> Iterator[str]:
  """`replace_dir` for an object store: build locally, upload each file (each
  upload atomic), then delete the old version's files that the new one lacks."""
  with tempfile.TemporaryDirectory(prefix="devinterp-upload-") as tmp:
    yield tmp
    new = set()
    for root, _, files in os.walk(tmp):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), tmp)
        new.add(rel)
        with open(os.path.join(root, name), "rb") as f:
          paths.write_object(paths.join(path, *rel.split(os.sep)), f.read())
    for rel in _remote_files(path):
      if rel not in new:
        paths.remove(paths.join(path, *rel.split("/")))


def _remote_files(path: str, prefix: str = "") -> list[str]:
  if not paths.isdir(path):
    return []
  out = []
  for name in paths.listdir(path):
    full = paths.join(path, name)
    rel = f"{prefix}{name}"
    out.extend(_remote_files(full, rel + "/") if paths.isdir(full) else [rel])
  return out
