"""Atomic file writes: readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import io
import os

import numpy as np


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, fsyncs, then renames."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def save_npz(path: str, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())
