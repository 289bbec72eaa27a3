"""Dense model outputs recorded during training, one file per step.

`<workdir>/<name>/<step>.npz` holds the model's flattened outputs on a fixed input
set at that step (essential dynamics' points: `analysis.essential_dynamics`). Each
file is written atomically by the leader; a resumed run drops the files past the
checkpoint it resumes from (their steps are recomputed, as the metrics log's rows
are), so the record equals an uninterrupted run's.
"""

from __future__ import annotations

import re

import numpy as np

from devinterp_jax import atomic, multihost, paths

DEFAULT_NAME = "ed_outputs"
_FILE = re.compile(r"^(\d+)\.npz$")


def directory(workdir: str, name: str = DEFAULT_NAME) -> str:
  return paths.join(workdir, name)


def recorded_steps(workdir: str, name: str = DEFAULT_NAME) -> list[int]:
  """The steps with a record, in order ([] when nothing was recorded)."""
  d = directory(workdir, name)
  if not paths.isdir(d):
    return []
  return sorted(int(m.group(1)) for f in paths.listdir(d) if (m := _FILE.match(f)))


def write(workdir: str, step: int, outputs: np.ndarray, name: str = DEFAULT_NAME) -> None:
  """Records `outputs` (flattened to float32) at `step`, atomically (leader only)."""
  flat = np.asarray(outputs, np.float32).reshape(-1)
  if not np.all(np.isfinite(flat)):
    raise FloatingPointError(f"non-finite model outputs at step {step} ({name})")
  atomic.save_npz(paths.join(directory(workdir, name), f"{int(step)}.npz"), outputs=flat)


def truncate(workdir: str, last_step: int, name: str = DEFAULT_NAME) -> None:
  """Drops the records past `last_step` (the step a run resumes from)."""
  if not multihost.is_leader():
    return
  for step in recorded_steps(workdir, name):
    if step > last_step:
      paths.remove(paths.join(directory(workdir, name), f"{step}.npz"))


def read(workdir: str, name: str = DEFAULT_NAME) -> tuple[np.ndarray, np.ndarray]:
  """steps [U] and outputs [U, F] of every record; a damaged file or records of
  different sizes are named."""
  steps = recorded_steps(workdir, name)
  rows = []
  for step in steps:
    path = paths.join(directory(workdir, name), f"{step}.npz")
    try:
      rows.append(np.asarray(paths.load_npz(path)["outputs"]))
    except Exception as e:  # noqa: BLE001  (any unreadable file: name it)
      raise ValueError(f"{path} is damaged ({e}); delete it to re-read from checkpoints") from e
  sizes = sorted({r.size for r in rows})
  if len(sizes) > 1:
    raise ValueError(
      f"{directory(workdir, name)} holds records of sizes {sizes}: recorded with "
      "different input sets; delete the directory to record again"
    )
  out = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
  return np.asarray(steps, np.int64), out
