"""The sweep driver: pairs × chains in blocks, chunked, fingerprinted, resumable, adaptive.

A sweep is a flat list of pairs p = (grid point g, restriction r, checkpoint n),
each sampled by the same chains (keys `program.chain_keys`). Pairs run in
chunks of `SweepOptions.checkpoint_chunk` through the cached block program
(`sampling/program.py`), `SamplerSettings.block_draws` draws per block.

Fixed length (`max_draws=None`): every pair runs `num_draws` draws.

Adaptive (`max_draws` set): every pair first runs `num_draws` draws. Then, after
each block, the pairs that have not converged (`_assess`: auto burn-in, then
R̂ / ESS / drift on the kept draws, `diagnostics.HealthCriteria`) continue,
re-packed into full chunks, until they converge or reach `max_draws`. Finally
the checkpoints of each (g, r) curve share a window (the latest burn-in to the
shortest length); where it holds fewer than `min_draws` draws, the short
checkpoints continue until it does (or they reach `max_draws`).

Resume (`output_dir`): the sweep's files live in `output_dir/<fingerprint>/`
(`sweep_identity`: settings, criteria, data digest, loss identity, ids,
restrictions, grid). `llc_pair_<p>.npz` holds pair p's per-step outputs, the
digest of its checkpoint's params and, for an adaptive sweep, its chain state
(params, sampler state, step counter), written atomically after every block.
A killed sweep resumes from each pair's last finished block, and gives the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from devinterp_jax import atomic, multihost, paths, progress as progress_lib
from devinterp_jax.sampling import convergence as conv
from devinterp_jax.sampling import diagnostics as diagnostics_lib
from devinterp_jax.sampling import kernel
from devinterp_jax.sampling import mesh as mesh_lib
from devinterp_jax.sampling import program as program_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling.settings import AUTO, Restrictions, SamplerSettings, SweepOptions
from devinterp_jax.storage import chunks as chunks_lib
from devinterp_jax.storage import digest as digest_lib
from devinterp_jax.typing import Params


class ChunkError(ValueError):
  """A saved file of an LLC sweep is unreadable or does not match its sweep."""


@dataclasses.dataclass
class Pair:
  """One (grid point, restriction, checkpoint) entry and what it has run."""

  index: int
  grid: int
  restriction: int
  checkpoint: int
  steps: int = 0
  outputs: dict[str, np.ndarray] | None = None  # {name: [C, steps]}
  state: list[np.ndarray] | None = None  # chain-state leaves [C, ...]
  digest: str | None = None


@dataclasses.dataclass
class SweepOutputs:
  """What `run` returns: per-pair outputs and the grid of pair indices."""

  pairs: list[Pair]
  shape: tuple[int, int, int]  # (G, R, N)
  num_params: np.ndarray  # d per pair [G*R*N]
  fingerprint: str | None
  assessments: dict[int, dict]


def sweep_identity(
  settings: SamplerSettings,
  *,
  loss_fn,
  data: Any,
  loss_data: Any = None,
  loss_key: str | None = None,
  sampler: str,
  ids: Sequence[Any],
  restrictions: Restrictions | None = None,
  grid: list[dict] | None = None,
  criteria: diagnostics_lib.HealthCriteria | None = None,
) -> dict[str, Any]:
  """Everything besides the params that determines a sweep's numbers.

  The settings, the sampler, the checkpoint ids, a digest of `data` (and
  `loss_data`), the restrictions, the hyperparameter grid, the convergence
  criteria of an adaptive sweep and the identity of the loss: `loss_key` (a
  user-supplied name, used alone when given) or `digest.callable_identity`.
  Raises when neither identifies the loss or a callable data source.
  """
  loss_id = None if loss_key is not None else digest_lib.callable_identity(loss_fn)
  if loss_id is None and loss_key is None:
    raise ValueError(
      f"resuming from output_dir needs an identity of the loss, and {loss_fn!r} has none "
      f"that a rerun could match (a lambda, or a closure over objects without a stable "
      f"value). Pass loss_key='<a name that changes whenever the loss does>' or a named "
      f"function."
    )
  out: dict[str, Any] = {
    "settings": settings.identity(),
    "sampler": sampler,
    "ids": [str(i) for i in ids],
    "loss": {"key": loss_key, "function": loss_id},
    "layout": "pairs-v2",
  }
  if settings.adaptive or settings.num_burnin_steps == AUTO:
    out["criteria"] = dataclasses.asdict(criteria or diagnostics_lib.HealthCriteria())
  for field, value in (("data", data), ("loss_data", loss_data)):
    if value is None:
      continue
    if callable(value):
      ident = digest_lib.callable_identity(value)
      ident = (
        "callable:key" if loss_key is not None else (None if ident is None else f"callable:{ident}")
      )
    else:
      ident = "arrays:" + digest_lib.tree_digest(value)
    if ident is None:
      raise ValueError(
        f"resuming from output_dir needs an identity of {field}, and the batch source "
        f"{value!r} has none that a rerun could match. Pass loss_key='<a name that "
        f"changes whenever the loss or the data do>'."
      )
    out[field] = ident
  if restrictions is not None:
    out["restrictions"] = list(restrictions.names)
    out["restriction_digest"] = digest_lib.tree_digest(restrictions.masks)
  if grid is not None:
    out["grid"] = grid
  return out


def fingerprint(identity: dict) -> str:
  blob = json.dumps(identity, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Reading the outputs of a pair.


def draw_index(settings: SamplerSettings, steps: int) -> np.ndarray:
  return settings.draw_steps(steps)


def init_index(settings: SamplerSettings, steps: int) -> np.ndarray:
  every = settings.thinning * settings.init_loss_stride
  return np.arange(settings.burnin_steps, steps, every)


def mala_index(settings: SamplerSettings, steps: int) -> np.ndarray:
  if not settings.mala_stride:
    return np.zeros((0,), np.int64)
  t = np.arange(steps)
  return t[(t >= settings.burnin_steps) & (t % settings.mala_stride == 0)]


def used_steps(settings: SamplerSettings, pair: Pair) -> int:
  """The steps whose draws count: all of them, or `num_draws` draws at a fixed length."""
  return pair.steps if settings.adaptive else min(pair.steps, settings.num_steps)


def _outputs(pair: Pair) -> dict[str, np.ndarray]:
  if pair.outputs is None:
    raise ValueError(f"pair {pair.index} has no outputs: it has not run")
  return pair.outputs


def pair_draws(settings: SamplerSettings, pair: Pair, name: str = "loss") -> np.ndarray:
  """Pair p's recorded draws of `name`, [C, draws]."""
  return _outputs(pair)[name][:, draw_index(settings, used_steps(settings, pair))]


def pair_init_losses(settings: SamplerSettings, pair: Pair) -> np.ndarray:
  return _outputs(pair)["init_loss"][:, init_index(settings, used_steps(settings, pair))]


def assess_pair(
  settings: SamplerSettings,
  pair: Pair,
  nbeta: float,
  num_params: int,
  criteria: diagnostics_lib.HealthCriteria,
) -> dict:
  """Burn-in and convergence of one pair on its own draws (see `diagnostics.assess`)."""
  return diagnostics_lib.assess(
    pair_draws(settings, pair),
    pair_init_losses(settings, pair),
    nbeta,
    num_params,
    burnin=settings.num_burnin_steps,
    criteria=criteria,
  )


def keeps_running(assessment: dict, criteria: diagnostics_lib.HealthCriteria) -> bool:
  """The adaptive rule: a pair continues (one more block, up to max_draws) unless it
  has converged, or has too few valid chains for more draws to help."""
  if assessment["status"] == conv.CONVERGED:
    return False
  return not (
    assessment["status"] == conv.UNCHECKED and assessment["num_chains"] < criteria.min_chains
  )


# ---------------------------------------------------------------------------------------
# The driver.


def _load_pair(path: str, fp: str) -> dict[str, np.ndarray]:
  try:
    contents = paths.load_npz(path)
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ChunkError(
      f"{path} is unreadable ({type(e).__name__}: {e}): this saved part of "
      f"the LLC sweep is damaged. Delete it and rerun; the sweep recomputes "
      f"that part."
    ) from None
  if str(contents.get("fingerprint")) != fp or "params_digest" not in contents:
    raise ChunkError(
      f"{path} holds results of another sweep than its directory names "
      f"(fingerprint {contents.get('fingerprint')!s} vs {fp}). Delete it and "
      f"rerun; the sweep recomputes that part."
    )
  return contents


def _save_pair(path: str, fp: str, pair: Pair, keep_state: bool) -> None:
  if not multihost.is_leader():  # every process holds the same outputs; one writes
    return
  arrays = {f"out_{k}": v for k, v in _outputs(pair).items()}
  if keep_state and pair.state is not None:
    arrays.update({f"state_{i:04d}": x for i, x in enumerate(pair.state)})
  atomic.save_npz(
    path,
    fingerprint=np.array(fp),
    params_digest=np.array(pair.digest),
    steps=np.array(pair.steps),
    **arrays,
  )


def _note_other_sweeps(output_dir: str, fp: str) -> None:
  if not paths.isdir(output_dir):
    return
  entries = paths.listdir(output_dir)
  if any(e.startswith("llc_chunk_") for e in entries):
    logging.warning(
      "%s holds chunks of an older layout without a fingerprint of the data, "
      "params and loss; they are not reused",
      output_dir,
    )
  others = [e for e in entries if e != fp and paths.exists(paths.join(output_dir, e, "sweep.json"))]
  if others:
    logging.info(
      "%s also holds %d sweeps of other settings, data or loss (kept apart): %s",
      output_dir,
      len(others),
      ", ".join(sorted(others)),
    )


def require_arrays(params: Params) -> None:
  if not jax.tree.leaves(params):
    raise ValueError(
      "the checkpoint params hold no arrays (an empty pytree): pass the "
      "model's params, e.g. a dict of weight arrays"
    )


def check_finite(params: Params, ids: Sequence[Any]) -> None:
  """Names the checkpoints whose params hold NaN or inf (w* must be finite)."""
  bad: dict[Any, list[str]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(leaf)
    finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    for i in np.flatnonzero(~finite).tolist():
      if i < len(ids):
        bad.setdefault(ids[i], []).append(
          f"{jax.tree_util.keystr(path)} ({int(np.isnan(x[i]).sum())} NaN, "
          f"{int(np.isinf(x[i]).sum())} inf)"
        )
  if bad:
    raise ValueError(
      "non-finite w*: "
      + "; ".join(
        f"checkpoint {c} has non-finite params in {', '.join(leaves)}" for c, leaves in bad.items()
      )
      + ". An LLC needs finite params at the checkpoint; "
      "check how they were produced (a diverged training run, a corrupted file)."
    )


class Checkpoints:
  """Random access to a sweep's checkpoints: a sequence or a stacked pytree.

  Checkpoints read from a sequence are kept on the host, least recently used
  dropped first, within `cache_bytes`, so the rounds of an adaptive sweep read
  (and digest-check) each checkpoint once."""

  def __init__(self, checkpoints: Sequence[Params] | Params, cache_bytes: int = 0):
    self._cache: collections.OrderedDict[int, tuple[Params, int]] = collections.OrderedDict()
    self._cache_bytes, self._cached = int(cache_bytes), 0
    if isinstance(checkpoints, Sequence):
      if len(checkpoints) == 0:
        raise ValueError("checkpoints is empty")
      self.seq, self.stacked, self.num = checkpoints, None, len(checkpoints)
    else:
      require_arrays(checkpoints)
      sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(checkpoints)}
      if len(sizes) != 1 or None in sizes:
        raise ValueError(
          f"stacked checkpoints need one leading axis size, got {sorted(map(str, sizes))}"
        )
      num = sizes.pop()
      assert num is not None  # checked just above
      self.seq, self.stacked, self.num = None, checkpoints, num

  def _read(self, i: int) -> Params:
    hit = self._cache.get(i)
    if hit is not None:
      self._cache.move_to_end(i)
      return hit[0]
    assert self.seq is not None  # only sequences are read
    # On the host (no device memory is held); `stack` would convert it anyway.
    tree = jax.tree.map(np.asarray, self.seq[i])
    size = sum(x.nbytes for x in jax.tree.leaves(tree))
    if size <= self._cache_bytes:
      self._cache[i], self._cached = (tree, size), self._cached + size
      while self._cached > self._cache_bytes:
        self._cached -= self._cache.popitem(last=False)[1][1]
    return tree

  def stack(self, indices: Sequence[int]) -> Params:
    """Checkpoints `indices` stacked on [len(indices)] (loads each distinct one once)."""
    if self.stacked is not None:
      return jax.tree.map(lambda x: np.asarray(x)[np.asarray(indices)], self.stacked)
    unique = sorted(set(indices))
    loaded = chunks_lib.stack([self._read(i) for i in unique], unique[0])  # names a misfit
    pos = np.asarray([unique.index(i) for i in indices])
    return jax.tree.map(lambda x: x[pos], loaded)


def run(
  loss_fn,
  checkpoints: Sequence[Params] | Params,
  data: Any,
  settings: SamplerSettings,
  options: SweepOptions = SweepOptions(),
  *,
  sampler: Any = "sgld",
  sampler_label: str = "sgld",
  restrictions: Restrictions | None = None,
  grid: list[dict] | None = None,
  loss_data: Any = None,
  criteria: diagnostics_lib.HealthCriteria | None = None,
) -> SweepOutputs:
  """Runs a sweep (see the module docstring) and returns every pair's outputs.

  `grid` is a list of hyperparameter dicts (step_size, nbeta, localization)
  that replace the settings' values (a calibration grid); default: one point.
  """
  criteria = criteria or diagnostics_lib.HealthCriteria()
  ckpts = Checkpoints(checkpoints, options.checkpoint_cache_bytes)
  N = ckpts.num
  ids = list(options.checkpoint_ids) if options.checkpoint_ids is not None else list(range(N))
  if len(ids) != N:
    raise ValueError(f"{len(ids)} checkpoint_ids for {N} checkpoints")
  if not callable(data):
    kernel.check_data(data)
  hyper_grid = grid or [
    {
      "step_size": settings.step_size,
      "nbeta": settings.nbeta,
      "localization": settings.localization,
    }
  ]
  G = len(hyper_grid)
  comp = None
  if restrictions is not None:
    restrictions = restrictions.check()
    comp = restrict_lib.compact(restrictions.masks)
  R = 1 if restrictions is None else len(restrictions.names)
  pairs = [
    Pair(index=(g * R + r) * N + n, grid=g, restriction=r, checkpoint=n)
    for g in range(G)
    for r in range(R)
    for n in range(N)
  ]
  first = ckpts.stack([0])
  require_arrays(first)
  if restrictions is not None:
    restrict_lib.check(restrictions.masks, jax.tree.map(lambda x: x[0], first), leading_axes=1)
    counts = np.asarray(restrict_lib.num_selected(restrictions.masks, leading_axes=1))
    num_params = np.array([counts[p.restriction] for p in pairs])
  else:
    d = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(first))
    num_params = np.full(len(pairs), d)
  # None, AUTO or an integer (SweepOptions checks): a str is AUTO.
  wanted = None if isinstance(options.checkpoint_chunk, str) else options.checkpoint_chunk
  sm = mesh_lib.resolve(
    options.mesh,
    num_pairs=chunks_lib.chunk_size(len(pairs), wanted),
    num_chains=settings.num_chains,
    batch_size=settings.batch_size,
    batch_axis=options.batch_axis,
  )
  prog_kw: dict[str, Any] = dict(
    data=data,
    loss_data=loss_data,
    sampler=sampler,
    chain_strategy=options.chain_strategy,
    leaves=None if comp is None else comp.leaves,
    padded=comp is not None and comp.valid is not None,
    mesh=sm,
  )
  prog = program_lib.get_program(loss_fn, settings, **prog_kw)
  data_arg = None if callable(data) else data
  loss_data_arg = None if (loss_data is None or callable(loss_data)) else loss_data
  replicated = None if sm is None else sm.replicated()
  data_arg = None if data_arg is None else put(data_arg, replicated)
  loss_data_arg = None if loss_data_arg is None else put(loss_data_arg, replicated)
  keys = program_lib.chain_keys(
    settings.seed, settings.num_chains, None if sm is None else sm.chains()
  )
  if options.checkpoint_chunk == AUTO:
    chunk = auto_chunk(
      prog,
      first,
      comp,
      keys,
      data_arg,
      loss_data_arg,
      sm,
      num_pairs=len(pairs),
      fraction=options.memory_fraction,
    )
  else:
    chunk = chunks_lib.chunk_size(len(pairs), wanted)
  chunk = mesh_lib.round_chunk(chunk, sm)
  if sm is not None and options.progress:
    logging.info("LLC sweep on mesh %s: %d pairs per chunk", sm.describe(), chunk)

  sweep_dir = fp = None
  if options.output_dir:
    identity = sweep_identity(
      settings,
      loss_fn=loss_fn,
      data=data,
      loss_data=loss_data,
      loss_key=options.loss_key,
      sampler=sampler_label,
      ids=ids,
      restrictions=restrictions,
      grid=grid,
      criteria=criteria,
    )
    fp = fingerprint(identity)
    sweep_dir = os.path.join(options.output_dir, fp)
    _note_other_sweeps(options.output_dir, fp)
    if multihost.is_leader() and not paths.exists(paths.join(sweep_dir, "sweep.json")):
      atomic.write_text(
        os.path.join(sweep_dir, "sweep.json"), json.dumps(identity, indent=1, default=str)
      )

  def path_of(p: Pair) -> str:
    assert sweep_dir is not None  # used only with an output_dir
    return os.path.join(sweep_dir, f"llc_pair_{p.index:05d}.npz")

  digests: dict[int, str] = {}  # params digest per checkpoint, computed once

  def digest_of(n: int, stacked: Params | None = None, row: int = 0) -> str:
    if n not in digests:
      stacked = ckpts.stack([n]) if stacked is None else stacked
      digests[n] = digest_lib.tree_digest(jax.tree.map(lambda x: x[row], stacked))
    return digests[n]

  if sweep_dir:  # resume what a killed run finished
    multihost.barrier("sweep_dir")  # the leader made the directory
    assert fp is not None  # set with sweep_dir
    saved = {p.index: _load_pair(path_of(p), fp) for p in pairs if paths.exists(path_of(p))}
    # Each process checks the params digests of its share of the checkpoints.
    mine = sorted(
      {
        p.checkpoint
        for p in pairs
        if p.index in saved
        and p.checkpoint % multihost.process_count() == multihost.process_index()
      }
    )
    checked = {}
    for part in multihost.gather("resume_digests", {str(n): digest_of(n) for n in mine}):
      checked.update({int(n): d for n, d in part.items()})
    for p in pairs:
      z = saved.get(p.index)
      if z is None:
        continue
      if str(z["params_digest"]) != checked[p.checkpoint]:
        logging.warning(
          "%s was computed on other params for checkpoint %s (they changed since); recomputing it",
          path_of(p),
          ids[p.checkpoint],
        )
        continue
      p.steps, p.digest = int(z["steps"]), str(z["params_digest"])
      p.outputs = {k[4:]: v for k, v in z.items() if k.startswith("out_")}
      state = [z[k] for k in sorted(z) if k.startswith("state_")]
      p.state = state or None

  nbeta_of = lambda p: float(hyper_grid[p.grid]["nbeta"])
  initial = settings.steps_for(settings.num_draws)
  max_steps = (
    None
    if settings.max_draws is None  # not settings.adaptive
    else settings.steps_for(settings.max_draws)
  )
  assessments: dict[int, dict] = {}

  def assess(p: Pair) -> dict:
    a = assessments.get(p.index)
    if a is None or a["steps"] != p.steps:
      a = assess_pair(settings, p, nbeta_of(p), int(num_params[p.index]), criteria)
      a["steps"] = p.steps
      assessments[p.index] = a
    return a

  def target(p: Pair) -> int:
    """The steps pair p should have run before the next look."""
    if p.steps < initial:
      return initial
    if max_steps is None or p.steps >= max_steps:
      return p.steps
    if not keeps_running(assess(p), criteria):
      return p.steps
    return min(p.steps + prog.block_steps, max_steps)

  def window_targets() -> dict[int, int]:
    """Extra steps so every curve's common window holds min_draws draws."""
    if max_steps is None:
      return {}
    extra = {}
    for g in range(G):
      for r in range(R):
        group = [p for p in pairs if p.grid == g and p.restriction == r]
        start = max(int(assess(p)["burnin"]) for p in group)
        need = settings.steps_for(start + criteria.min_draws)
        for p in group:
          if p.steps < min(need, max_steps):
            extra[p.index] = min(p.steps + prog.block_steps, max_steps)
    return extra

  total_estimate = sum(max(initial - p.steps, 0) for p in pairs)
  tracker = progress_lib.Progress(
    total=total_estimate * settings.num_chains,
    what="LLC sweep",
    unit="chain-steps",
    every_s=options.progress_every_s,
    log=logging.info if options.progress else (lambda _: None),
  )
  tracker.final = not settings.adaptive
  tracker.start()
  done_units = [0]

  while True:
    todo = {p.index: t for p in pairs if (t := target(p)) > p.steps}
    if not todo:
      todo = window_targets()
    # The leader decides what runs next; every process takes the same branches.
    todo = {
      int(i): int(t)
      for i, t in multihost.agree("sweep_todo", {str(i): t for i, t in todo.items()}).items()
    }
    if not todo:
      break
    extra = sum(t - pairs[i].steps for i, t in todo.items()) * settings.num_chains
    if done_units[0] + extra > tracker.total:
      tracker.total = done_units[0] + extra
    by_start: dict[tuple[int, int], list[Pair]] = {}
    for i, t in todo.items():
      by_start.setdefault((pairs[i].steps, t), []).append(pairs[i])
    for (start, stop), group in sorted(by_start.items()):
      for lo in range(0, len(group), chunk):
        members = group[lo : lo + chunk]
        _run_chunk(
          prog,
          members,
          start,
          stop,
          chunk,
          ckpts,
          ids,
          hyper_grid,
          comp,
          keys,
          data_arg,
          loss_data_arg,
          settings,
          sm,
          sweep_dir is not None,
          path_of if sweep_dir else None,
          fp,
          tracker,
          done_units,
        )
  tracker.final = True
  tracker.update(tracker.total, force=True)
  for p in pairs:
    assess(p)
  if sweep_dir and settings.adaptive:  # finished: the chain states are no longer needed
    assert fp is not None  # set with sweep_dir
    for p in pairs:
      if p.state is not None:
        p.state = None
        _save_pair(path_of(p), fp, p, keep_state=False)
  multihost.barrier("sweep_done")  # the leader's files are written
  return SweepOutputs(
    pairs=pairs, shape=(G, R, N), num_params=num_params, fingerprint=fp, assessments=assessments
  )


def abstract_args(
  prog,
  chunk: int,
  first: Params,
  comp,
  keys,
  data_arg,
  loss_data_arg,
  sm: mesh_lib.SweepMesh | None,
) -> tuple:
  """Abstract arguments of `prog.block` for a chunk of `chunk` pairs."""

  def sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  pair_sh = None if sm is None else sm.pairs()
  params = jax.tree.map(lambda x: sds((chunk,) + x.shape[1:], x.dtype, pair_sh), first)
  hypers = {k: sds((chunk,), np.float32, pair_sh) for k in ("step_size", "nbeta", "localization")}
  index = valid = None
  if comp is not None:
    index = sds((chunk,) + comp.index.shape[1:], comp.index.dtype, pair_sh)
    if comp.valid is not None:
      valid = sds((chunk,) + comp.valid.shape[1:], comp.valid.dtype, pair_sh)
  state_sh = None if sm is None else sm.pair_chains()
  carry = jax.tree.map(
    lambda t: sds(t.shape, t.dtype, state_sh), jax.eval_shape(prog.init, params, hypers, index)
  )
  return (
    carry,
    jax.ShapeDtypeStruct((), np.int32),
    params,
    hypers,
    keys,
    data_arg,
    loss_data_arg,
    index,
    valid,
  )


def chunk_memory(prog, chunk: int, *args, **kw) -> program_lib.MemoryUse | None:
  """Bytes per device of one block over `chunk` pairs (see `abstract_args`)."""
  return program_lib.block_memory(prog, *abstract_args(prog, chunk, *args, **kw))


def auto_chunk(
  prog,
  first: Params,
  comp,
  keys,
  data_arg,
  loss_data_arg,
  sm: mesh_lib.SweepMesh | None,
  *,
  num_pairs: int,
  fraction: float,
) -> int:
  """The most pairs per chunk whose block fits in `fraction` of a device's memory.

  Compiles the block at k and 2k pairs (k: the pair-axis devices) and fits
  memory = fixed + per_pair · pairs (`compiled.memory_analysis()`)."""
  k = 1 if sm is None else sm.pair_devices
  args = (first, comp, keys, data_arg, loss_data_arg, sm)
  m1, m2 = chunk_memory(prog, k, *args), chunk_memory(prog, 2 * k, *args)
  if m1 is None or m2 is None:
    logging.warning(
      "the backend reports no compiled memory; checkpoint_chunk='auto' runs all %d pairs at once",
      num_pairs,
    )
    return num_pairs
  per_k = max(m2.total - m1.total, 1)
  fixed = m1.total - per_k
  budget = fraction * program_lib.device_memory_bytes()
  fits = int((budget - fixed) // per_k) * k
  chunk = max(k, min(fits, num_pairs))
  logging.info(
    "checkpoint_chunk='auto': %d pairs per chunk (%.1f MiB per %d pairs per "
    "device, %.1f MiB fixed, budget %.1f MiB)",
    chunk,
    per_k / 2**20,
    k,
    fixed / 2**20,
    budget / 2**20,
  )
  return chunk


def put(tree: Any, sharding) -> Any:
  """Host arrays as device arrays: committed to `sharding` (a global array across
  processes, each building only its own shards), or on the default device."""
  if sharding is None:
    return jax.device_put(tree)
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]
    ),
    tree,
  )


def local_rows(sharding, num: int) -> list[int]:
  """The rows of a [num, ...] array sharded by `sharding` that this process holds."""
  if sharding is None:
    return list(range(num))
  rows: set[int] = set()
  for idx in sharding.addressable_devices_indices_map((num,)).values():
    rows.update(range(*idx[0].indices(num)))
  return sorted(rows)


def _load_chunk(
  ckpts: Checkpoints, padded: list[Pair], ids, sharding, with_digests: bool
) -> tuple[Params, dict[int, str]]:
  """The chunk's w* [chunk, ...] as (global) device arrays; each process loads and
  checks only its own rows. Returns the digests of the members' checkpoints."""
  n = len(padded)
  rows = local_rows(sharding, n)
  local = ckpts.stack([padded[j].checkpoint for j in rows])
  require_arrays(local)
  problem = None
  try:
    check_finite(local, [ids[padded[j].checkpoint] for j in rows])
  except ValueError as e:
    problem = str(e)
  digests = (
    {
      padded[j].checkpoint: digest_lib.tree_digest(jax.tree.map(lambda x: x[i], local))
      for i, j in enumerate(rows)
    }
    if with_digests
    else {}
  )
  parts = multihost.gather(
    "chunk_rows", {"problem": problem, "digests": {str(k): v for k, v in digests.items()}}
  )
  problems = [q["problem"] for q in parts if q["problem"]]
  if problems:
    raise ValueError(" ".join(problems))
  for q in parts:
    digests.update({int(k): v for k, v in q["digests"].items()})
  if sharding is None:
    return jax.device_put(local), digests
  pos = {j: i for i, j in enumerate(rows)}

  def leaf(x):
    def rows_of(idx: tuple[slice, ...] | None):
      assert idx is not None  # a sharding's index of the shard (jax types it Optional)
      return x[np.asarray([pos[j] for j in range(*idx[0].indices(n))])][
        (slice(None),) + tuple(idx[1:])
      ]

    return jax.make_array_from_callback((n,) + x.shape[1:], sharding, rows_of)

  return jax.tree.map(leaf, local), digests


def _run_chunk(
  prog,
  members: list[Pair],
  start: int,
  stop: int,
  chunk: int,
  ckpts,
  ids,
  hyper_grid,
  comp,
  keys,
  data_arg,
  loss_data_arg,
  settings: SamplerSettings,
  sm: mesh_lib.SweepMesh | None,
  with_digests: bool,
  path_of,
  fp,
  tracker,
  done_units,
) -> None:
  """Advances `members` (all at `start` steps) to `stop` steps, block by block."""
  padded = members + [members[0]] * (chunk - len(members))
  params_star, digests = _load_chunk(
    ckpts, padded, ids, None if sm is None else sm.pairs(), with_digests
  )
  if with_digests:
    for p in members:
      p.digest = digests[p.checkpoint]
  pair_sh = None if sm is None else sm.pairs()
  hypers = put(
    {
      k: np.asarray([float(hyper_grid[p.grid][k]) for p in padded], np.float32)
      for k in ("step_size", "nbeta", "localization")
    },
    pair_sh,
  )
  index = valid = None
  if comp is not None:
    index = put(np.asarray(comp.index[[p.restriction for p in padded]]), pair_sh)
    if comp.valid is not None:
      valid = put(np.asarray(comp.valid[[p.restriction for p in padded]]), pair_sh)
  if start == 0:
    carry = prog.init(params_star, hypers, index)
  else:
    template = jax.eval_shape(prog.init, params_star, hypers, index)
    leaves_t, treedef = jax.tree.flatten(template)
    states = [p.state for p in padded if p.state is not None]
    if len(states) < len(padded):  # padded repeats members[0]
      raise ChunkError(
        f"pairs {[p.index for p in members if p.state is None]} have run "
        f"{start} steps but have no saved chain state to continue from"
      )
    stacked = [np.stack([s[i] for s in states]).astype(t.dtype) for i, t in enumerate(leaves_t)]
    carry = treedef.unflatten(put(stacked, None if sm is None else sm.pair_chains()))
  per_step = len(members) * settings.num_chains  # padding is not progress
  for t0 in range(start, stop, prog.block_steps):
    base = done_units[0]
    program_lib.set_progress_hook(
      lambda t, base=base, t0=t0: tracker.update(base + (t - t0) * per_step)
    )
    try:
      carry, out = prog.block(
        carry, np.int32(t0), params_star, hypers, keys, data_arg, loss_data_arg, index, valid
      )
      out = multihost.allgather(out)
    finally:
      program_lib.set_progress_hook(None)
    done_units[0] = base + prog.block_steps * per_step
    last = t0 + prog.block_steps >= stop
    # An adaptive pair may continue later: its state goes to disk after every block
    # (resume), or is fetched once at the chunk's end when there is no disk.
    keep_state = settings.adaptive and (path_of is not None or last)
    state_leaves = multihost.allgather(jax.tree.leaves(carry)) if keep_state else None
    for j, p in enumerate(members):
      new = {k: np.asarray(v[j]) for k, v in out.items()}
      p.outputs = (
        new
        if p.outputs is None or p.steps == 0
        else {k: np.concatenate([p.outputs[k][:, : p.steps], new[k]], axis=-1) for k in new}
      )
      p.steps = t0 + prog.block_steps
      if state_leaves is not None:  # keep_state
        p.state = [np.asarray(x[j]) for x in state_leaves]
      if path_of is not None and (settings.adaptive or last):
        _save_pair(path_of(p), fp, p, keep_state)
    tracker.update(done_units[0])
