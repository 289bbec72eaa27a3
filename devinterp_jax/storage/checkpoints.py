"""Orbax checkpoint streams: save on a schedule, resume, restore params only.

A workdir's `checkpoints/` holds one Orbax step directory per saved step with
three items: `params`, `opt_state` (for resuming) and `meta` (JSON: step,
whether the step is on the analysis schedule, losses, and a SHA-256 digest of
the params and of the optimizer state). Scheduled steps are kept forever
(`CustomSteps`); of the other (resume-only) steps only the latest is kept
(`LatestN(1)`).

Every restore checks the stored digest, so a checkpoint whose bytes changed on
disk is reported as corrupt at its step instead of being sampled. A restore
that fails because the params do not fit the abstract tree names the leaf and
both shapes (a model config that differs from the run's).

Step directories are created synchronously in `save` (the writes stay
asynchronous): a directory that cannot be created raises in the caller at
once. Created from Orbax's background threads, such an error left threads
waiting for a signal that never came, and the process hung at exit.

A read-only manager (`ParamsSequence`, `read_metas`) is process-local: each
process restores what it needs without cross-process barriers.

Multi-device and multi-process runs save global arrays (the training loop's
replicated params) into the shared workdir: every process calls `save` and
`wait` (Orbax coordinates the writes; the leader commits). `restore` places
each leaf on the sharding of its abstract leaf (`jax.ShapeDtypeStruct(...,
sharding=...)`); a leaf without one is restored onto this process's first
device, so a checkpoint saved by any device layout restores anywhere.
"""

from __future__ import annotations

import logging as py_logging
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from devinterp_jax import multihost, paths
from devinterp_jax.storage.digest import tree_digest

ITEMS = ("params", "opt_state", "meta")


class _DropOrbaxInfo(py_logging.Filter):
  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keeps Orbax's per-save INFO lines out of the log (warnings still show)."""
  py_logging.getLogger("absl").addFilter(_DropOrbaxInfo())


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, cannot be read or does not fit the model."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (disk full, read-only, no inodes, …)."""


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.absolute(workdir), "checkpoints")


def _local_reads() -> ocp.options.MultiprocessingOptions:
  """A read-only manager of this process alone: its restores are process-local, so
  processes restoring different steps (an LLC sweep's own checkpoints) never wait
  on one another in Orbax's cross-process barriers."""
  pid = multihost.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid})


def make_manager(
  workdir: str, schedule_steps: Sequence[int] = (), read_only: bool = False, name: str | None = None
) -> ocp.CheckpointManager:
  """A manager that keeps `schedule_steps` and the latest other step.

  `name`: distinct for managers that save at the same time in a multi-process
  run (e.g. one per seed), and the same on every process: it keys Orbax's
  cross-process barriers, which otherwise collide ("barrier … is already
  ongoing").
  """
  policy = pp.AnyPreservationPolicy(
    [pp.CustomSteps([int(s) for s in schedule_steps]), pp.LatestN(1)]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=None if read_only else policy,
    enable_async_checkpointing=not read_only,
    create=not read_only,
    read_only=read_only,
    # Create step directories in `save` itself: see the module docstring.
    async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    multiprocessing_options=_local_reads()
    if read_only
    else ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict
) -> None:
  """Starts an async save of one step (returns before the write finishes).

  Raises `CheckpointSaveError` when the save cannot start or an earlier async
  save of this manager failed.
  """
  meta = dict(
    meta, step=int(step), params_digest=tree_digest(params), opt_state_digest=tree_digest(opt_state)
  )
  try:
    manager.save(
      int(step),
      force=True,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
      ),
    )
  except Exception as e:
    raise CheckpointSaveError(
      f"a checkpoint save to {manager.directory} failed (raised when saving step {step}; "
      f"an earlier asynchronous save may be the one that failed): "
      f"{type(e).__name__}: {e}. Check that the directory is writable and the disk has "
      f"space and inodes; a rerun resumes from the last committed checkpoint."
    ) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the manager's async saves; a failed one raises `CheckpointSaveError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise CheckpointSaveError(
      f"an asynchronous checkpoint save to {manager.directory} failed: "
      f"{type(e).__name__}: {e}. Check that the directory is writable and the disk has "
      f"space and inodes; a rerun resumes from the last committed checkpoint."
    ) from e


def _mismatch(directory: str, step: int, abstract_params: Any) -> str | None:
  """'params leaf p is stored as …' when the saved params' shapes or dtypes differ
  from the abstract tree's, else None."""
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")
    stored = getattr(stored, "tree", stored)
  except Exception:  # no readable metadata: not a shape problem we can name
    return None
  is_leaf = lambda x: hasattr(x, "shape")
  describe = lambda x: (
    tuple(x.shape),
    np.dtype(x.dtype).name if getattr(x, "dtype", None) is not None else None,
  )
  flat_stored = {
    jax.tree_util.keystr(p): describe(x)
    for p, x in jax.tree_util.tree_flatten_with_path(stored, is_leaf=is_leaf)[0]
  }
  flat_expected = {
    jax.tree_util.keystr(p): describe(x)
    for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  }
  if flat_stored == flat_expected:
    return None
  for key in sorted(set(flat_stored) | set(flat_expected)):
    a, b = flat_stored.get(key), flat_expected.get(key)
    if a is None or b is None or a[0] != b[0]:
      return (
        f"params leaf {key} is stored as {a[0] if a else 'absent'} but the "
        f"model config builds {b[0] if b else 'no such leaf'}"
      )
    if a[1] is not None and a[1] != b[1]:
      return f"params leaf {key} is stored as {a[1]} but is restored as {b[1]}"
  return None


def _placed(abstract: Any) -> Any:
  """The abstract tree with every leaf that names no sharding put on this process's
  first device (Orbax would otherwise use the saved layout, which another device
  count or process count cannot reproduce)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def place(x):
    if getattr(x, "sharding", None) is not None:
      return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device)

  return jax.tree.map(place, abstract)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_params: Any,
  abstract_opt_state: Any | None = None,
  verify: bool = True,
) -> dict:
  """Restores `params` (and `opt_state` if its abstract tree is given) + meta.

  Leaves restore onto their abstract leaf's sharding, or this process's first
  device (module docstring). With `verify`, the restored trees are checked
  against the digests saved in their meta; a mismatch raises `CheckpointError`
  ("corrupt at step S").
  """
  items = {
    "params": ocp.args.StandardRestore(_placed(abstract_params)),
    "meta": ocp.args.JsonRestore(),
  }
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(_placed(abstract_opt_state))
  directory = os.fspath(manager.directory)
  try:
    out = dict(manager.restore(int(step), args=ocp.args.Composite(**items)).items())
  except Exception as e:  # Orbax raises many types for missing/corrupt files.
    mismatch = _mismatch(directory, int(step), abstract_params)
    if mismatch:
      raise CheckpointError(
        f"checkpoint at step {step} in {directory} does not fit the model: {mismatch}. "
        f"The model section of the config differs from the one the run was trained "
        f"with (its config.json); pass the run's model config."
      ) from e
    raise CheckpointError(
      f"checkpoint at step {step} in {directory} could not be restored "
      f"(missing or corrupt): {type(e).__name__}: {e}"
    ) from e
  if verify:
    for item in ("params", "opt_state"):
      expected = out["meta"].get(f"{item}_digest")
      if item in out and expected is not None and tree_digest(out[item]) != expected:
        mismatch = _mismatch(directory, int(step), abstract_params) if item == "params" else None
        if mismatch:
          raise CheckpointError(
            f"checkpoint at step {step} in {directory}: {mismatch}, so its checksum cannot "
            f"be checked; restore it with the dtypes it was saved with."
          )
        raise CheckpointError(
          f"checkpoint corrupt at step {step} in {directory}: its {item} do not match the "
          f"SHA-256 digest saved with them, so its bytes changed on disk. It is not used. "
          f"Restore {os.path.join(directory, str(step))} from a backup, or delete it and "
          f"every later step and rerun training to rewrite them."
        )
  return out


def read_metas(workdir: str) -> dict[int, dict]:
  """The `meta` item of every saved step of a workdir: {step: meta}."""
  directory = checkpoint_dir(workdir)
  if not paths.isdir(directory):
    raise CheckpointError(f"no checkpoints in {workdir!r} (missing {directory})")
  manager = make_manager(workdir, read_only=True)
  metas = {}
  try:
    for step in manager.all_steps():
      try:
        metas[int(step)] = manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]
      except Exception as e:
        raise CheckpointError(
          f"checkpoint metadata at step {step} in {directory} is "
          f"unreadable: {type(e).__name__}: {e}"
        ) from e
  finally:
    manager.close()
  return metas


def scheduled_steps(workdir: str) -> np.ndarray:
  """The steps of a workdir saved on the analysis schedule, sorted."""
  metas = read_metas(workdir)
  return np.array(sorted(s for s, m in metas.items() if m.get("scheduled", False)), dtype=int)


class ParamsSequence(Sequence):
  """Lazily restores params-only at the given steps (partial restore).

  Indexing restores from disk, so an LLC sweep over hundreds of checkpoints
  holds only the current chunk in memory.
  """

  def __init__(self, workdir: str, steps: Sequence[int] | np.ndarray, abstract_params: Any):
    self.workdir = workdir
    self.steps = [int(s) for s in steps]
    self.abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params
    )
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

  def verify(self) -> None:
    """Restores every step once and checks its digest, so a sweep fails at once, naming
    every corrupt or unreadable checkpoint, instead of at its k-th chunk. In a
    multi-process run each process checks its share of the steps, and every
    process raises the same error."""
    n, k = multihost.process_count(), multihost.process_index()
    bad = []
    for i in range(k, len(self.steps), n):
      try:
        self[i]
      except CheckpointError as e:
        bad.append((self.steps[i], e))
    if n > 1:
      found = sorted(
        tuple(x)
        for part in multihost.gather("verify_checkpoints", [[s, str(e)] for s, e in bad])
        for x in part
      )
      bad = [(s, CheckpointError(m)) for s, m in found]
    if len(bad) == 1:
      raise bad[0][1]
    if bad:
      raise CheckpointError(
        f"{len(bad)} checkpoints cannot be used, at steps "
        f"{[s for s, _ in bad]}; the first: {bad[0][1]}"
      )
