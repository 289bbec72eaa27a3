"""Orbax checkpoint streams: save on a schedule, resume, restore params only.

A workdir's `checkpoints/` holds one Orbax step directory per saved step with
three items: `params`, `opt_state` (for resuming) and `meta` (JSON: step,
whether the step is on the analysis schedule, losses). Scheduled steps are
kept forever (`CustomSteps`); of the other (resume-only) steps only the latest
is kept (`LatestN(1)`).
"""

from __future__ import annotations

import logging as py_logging
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

ITEMS = ("params", "opt_state", "meta")


class _DropOrbaxInfo(py_logging.Filter):
  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keeps Orbax's per-save INFO lines out of the log (warnings still show)."""
  py_logging.getLogger("absl").addFilter(_DropOrbaxInfo())


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, schedule_steps: Sequence[int] = (),
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager that keeps `schedule_steps` and the latest other step."""
  policy = pp.AnyPreservationPolicy(
      [pp.CustomSteps([int(s) for s in schedule_steps]), pp.LatestN(1)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else policy,
      enable_async_checkpointing=not read_only,
      create=not read_only,
      read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         meta: dict) -> None:
  """Starts an async save of one step (returns before the write finishes)."""
  manager.save(int(step), force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(dict(meta, step=int(step)))))


def restore(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Any | None = None) -> dict:
  """Restores `params` (and `opt_state` if its abstract tree is given) + meta."""
  items = {"params": ocp.args.StandardRestore(abstract_params),
           "meta": ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  try:
    return dict(manager.restore(int(step), args=ocp.args.Composite(**items)).items())
  except Exception as e:  # Orbax raises many types for missing/corrupt files.
    raise CheckpointError(
        f"checkpoint at step {step} in {manager.directory} could not be restored "
        f"(missing or corrupt): {type(e).__name__}: {e}") from e


def scheduled_steps(workdir: str) -> np.ndarray:
  """The steps of a workdir saved on the analysis schedule, sorted."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoints in {workdir!r} (missing {directory})")
  manager = make_manager(workdir, read_only=True)
  steps = []
  for step in manager.all_steps():
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointError(f"checkpoint metadata at step {step} in {directory} is "
                            f"unreadable: {type(e).__name__}: {e}") from e
    if meta.get("scheduled", False):
      steps.append(int(step))
  manager.close()
  return np.array(sorted(steps), dtype=int)


class ParamsSequence(Sequence):
  """Lazily restores params-only at the given steps (partial restore).

  Indexing restores from disk, so an LLC sweep over hundreds of checkpoints
  holds only the current chunk in memory.
  """

  def __init__(self, workdir: str, steps: Sequence[int], abstract_params: Any):
    self.workdir = workdir
    self.steps = [int(s) for s in steps]
    self.abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
    self._manager = make_manager(workdir, read_only=True)
    missing = sorted(set(self.steps) - set(self._manager.all_steps()))
    if missing:
      raise CheckpointError(f"no checkpoint for steps {missing} in {checkpoint_dir(workdir)}")

  def __len__(self) -> int:
    return len(self.steps)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return restore(self._manager, self.steps[i], self.abstract_params)["params"]
