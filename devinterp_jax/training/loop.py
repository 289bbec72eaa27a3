"""A resumable training loop that streams Orbax checkpoints.

The loop is model-agnostic: it takes a pure `loss_fn(params, batch)`, a pure
`batch_fn(key) -> batch` and an optax optimizer. Steps between events
(logging, checkpoint saves) run as one jitted `fori_loop` with dynamic bounds,
so the program compiles once and segmenting never changes the numbers: the
batch of step s is `batch_fn(fold_in(data_key, s))` whatever happened before.
A run killed at any point and restarted with the same arguments resumes from
the latest checkpoint and ends with exactly the parameters of an uninterrupted
run.

Progress (`devinterp_jax.progress.Progress`): a line with the rate and ETA at
every log step, and also at any other event (schedule or resume step) once 15 s
have passed since the last line. The host sees the run only between segments,
so a segment (at most `log_every` steps) is the granularity: if one segment
takes longer than 15 s the lines are one per segment. The first segment
includes compilation and is left out of the rate; the ETA is quoted from the
second timed segment on.

Several devices (`jax.device_count() > 1`, one process or several): the run is
data parallel over a mesh of all global devices with one axis, "batch". Params
and optimizer state are replicated (`NamedSharding(mesh, P())`) and each
step's batch is sharded on "batch" by a `with_sharding_constraint` inside the
jitted segment; `batch_fn(key)` is a pure function of the key, so every
process computes the same global batch and only its own shards are
materialised. `train_seeds` with a seed count divisible by the device count
shards the seeds over "batch" instead (each device trains whole seeds). A
batch size that does not divide over the devices (and, with seeds, a seed
count that does not either) falls back to one device with a warning in a
single process, and raises `ValueError` naming the sizes in a multi-process
run, where no one device sees the whole job. The numbers differ from a
one-device run by float reassociation only (the gradient is summed across
devices), and a killed run resumes bit-identically under the same process and
device layout: Orbax saves the global arrays collectively (every process calls
save and wait) and restores them onto the same shardings, and the leader's
latest checkpoint step is the one every process resumes from
(`multihost.agree`). Files besides checkpoints (config.json, metrics.jsonl) are
written by the leader alone (`storage/run_log.py`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from devinterp_jax import multihost, paths
from devinterp_jax.progress import Progress
from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import lock, outputs_log
from devinterp_jax.storage import run_log
from devinterp_jax.typing import LossFn, Params


class TrainState(NamedTuple):
  step: jax.Array
  params: Params
  opt_state: optax.OptState


def train_step(
  state: TrainState, batch: Any, loss_fn: LossFn, optimizer: optax.GradientTransformation
) -> tuple[TrainState, jax.Array]:
  """One optimizer step; returns the new state and the batch loss."""
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), loss


def train_segment(
  state: TrainState,
  end_step: jax.Array,
  data_key: jax.Array,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  batch_fn: Callable[[jax.Array], Any],
  batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, jax.Array]:
  """Runs steps state.step … end_step − 1; returns the state and the loss sum.

  `batch_sharding`: each batch leaf with a leading axis is constrained to it
  (data parallelism: the leading axis split over devices).
  """

  def body(_, carry):
    st, loss_sum = carry
    batch = batch_fn(jax.random.fold_in(data_key, st.step))
    if batch_sharding is not None:
      batch = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding) if jnp.ndim(x) else x, batch
      )
    st, loss = train_step(st, batch, loss_fn, optimizer)
    return st, loss_sum + loss

  return jax.lax.fori_loop(0, end_step - state.step, body, (state, jnp.zeros((), jnp.float32)))


def _event_steps(
  num_steps: int, schedule: Sequence[int], log_every: int, resume_every: int
) -> np.ndarray:
  events = set(int(s) for s in schedule) | {num_steps}
  events |= set(range(log_every, num_steps, log_every)) if log_every else set()
  events |= set(range(resume_every, num_steps, resume_every)) if resume_every else set()
  return np.array(sorted(s for s in events if 0 < s <= num_steps))


def train(
  *,
  workdir: str,
  init_params: Params,
  loss_fn: LossFn,
  batch_fn: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  num_steps: int,
  schedule_steps: Sequence[int] | np.ndarray,
  data_key: jax.Array,
  log_every: int = 100,
  resume_every: int = 1000,
  eval_fn: Callable[[Params], dict] | None = None,
  lr_fn: Callable[[int], float | jax.Array] | None = None,
  config_json: str = "{}",
  on_event: Callable[[int], None] | None = None,
  record_fn: Callable[[Params], jax.Array] | None = None,
  record_every: int = 0,
) -> TrainState:
  """Trains to `num_steps`, checkpointing `schedule_steps`; resumes if possible.

  Args:
    workdir: run directory (config.json, metrics.jsonl, checkpoints/).
    init_params: parameters at step 0 (used when nothing is saved yet, and as
      the structure to restore into).
    loss_fn, batch_fn, optimizer: the pure pieces of a step.
    schedule_steps: steps saved for analysis and kept forever.
    data_key: key of the data stream; step s trains on fold_in(data_key, s).
    log_every, resume_every: logging and resume-checkpoint periods (steps).
    eval_fn: params -> dict of scalars, evaluated at scheduled steps.
    lr_fn: step -> learning rate, for the log.
    config_json: the run's config; a workdir with another config is refused.
    on_event: called with the step after each event (tests use it to
      interrupt a run).
    record_fn, record_every: dense outputs for essential dynamics: record_fn(params)
      (the model's outputs on a fixed input set) at step 0, every `record_every`
      steps and every scheduled step (the log-spaced early steps), written to <workdir>/ed_outputs/ (`storage.outputs_log`); 0 turns it off.
  """
  return _train(
    [workdir],
    init_params,
    data_key,
    [config_json],
    eval_fn,
    seed_axis=False,
    loss_fn=loss_fn,
    batch_fn=batch_fn,
    optimizer=optimizer,
    num_steps=num_steps,
    schedule_steps=schedule_steps,
    log_every=log_every,
    resume_every=resume_every,
    lr_fn=lr_fn,
    on_event=on_event,
    record_fn=record_fn,
    record_every=record_every,
  )


def train_seeds(
  *,
  workdirs: Sequence[str],
  init_params: Params,
  data_keys: jax.Array,
  loss_fn: LossFn,
  batch_fn: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  num_steps: int,
  schedule_steps: Sequence[int] | np.ndarray,
  log_every: int = 100,
  resume_every: int = 1000,
  eval_fn: Callable[[Params], dict] | None = None,
  lr_fn: Callable[[int], float | jax.Array] | None = None,
  config_jsons: Sequence[str] | None = None,
  on_event: Callable[[int], None] | None = None,
) -> TrainState:
  """Trains several seeds in one program: `vmap` over a leading seed axis [S].

  `init_params` and `data_keys` carry the seed axis; seed i writes its own
  checkpoint stream and log to `workdirs[i]`, exactly as `train` would. The
  segment between events is one jitted, vmapped `fori_loop`, so S seeds cost
  one compilation. `eval_fn` takes the stacked params [S] and returns a dict
  of [S] arrays (e.g. a vmapped loss on per-seed eval batches).
  Resuming restarts every seed from the latest step that all seeds saved (a
  kill between two seeds' saves can leave them one event apart; the steps past
  it are deleted and rewritten).
  Returns the state with the seed axis.
  """
  num_seeds = len(workdirs)
  if num_seeds < 1 or len(set(paths.absolute(w) for w in workdirs)) != num_seeds:
    raise ValueError(f"workdirs must be distinct and non-empty, got {list(workdirs)}")
  for name, tree in (("init_params", init_params), ("data_keys", data_keys)):
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(tree)}
    if sizes != {num_seeds}:
      raise ValueError(
        f"{name} must have a leading seed axis of size {num_seeds} "
        f"(one per workdir), got leading sizes {sorted(map(str, sizes))}"
      )
  config_jsons = list(config_jsons or ["{}"] * num_seeds)
  if len(config_jsons) != num_seeds:
    raise ValueError(f"{len(config_jsons)} config_jsons for {num_seeds} workdirs")
  return _train(
    list(workdirs),
    init_params,
    data_keys,
    config_jsons,
    eval_fn,
    seed_axis=True,
    loss_fn=loss_fn,
    batch_fn=batch_fn,
    optimizer=optimizer,
    num_steps=num_steps,
    schedule_steps=schedule_steps,
    log_every=log_every,
    resume_every=resume_every,
    lr_fn=lr_fn,
    on_event=on_event,
  )


def _resume_step(managers) -> int | None:
  """The latest step every manager holds (None: start from scratch)."""
  held = [set(m.all_steps()) for m in managers]
  if not any(held):
    return None
  common = set.intersection(*held)
  if not common:
    logging.warning("The seeds' checkpoint streams share no step; starting all from scratch")
    return None
  return max(common)


class _Layout(NamedTuple):
  """A multi-device run: the mesh, and whether its axis splits the seeds (else the batch)."""

  mesh: jax.sharding.Mesh
  seeds: bool

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def split(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("batch"))

  def shardings(self, tree: Any) -> Any:
    """Params / optimizer state: split on their leading seed axis, else replicated."""
    return jax.tree.map(lambda x: self.split if self.seeds and x.ndim else self.replicated, tree)


def _layout(
  batch_fn: Callable[[jax.Array], Any], key: jax.Array, num_seeds: int | None
) -> _Layout | None:
  """How the run is spread over `jax.device_count()` devices (None: one device).

  Seeds (`num_seeds`, None without a seed axis) split over the devices when they
  divide; otherwise every batch leaf's leading axis does. Neither: one device
  with a warning, or a `ValueError` in a multi-process run.
  """
  n = jax.device_count()
  if n == 1:
    return None
  mesh = jax.make_mesh((n,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  if num_seeds is not None and num_seeds % n == 0:
    return _Layout(mesh, seeds=True)
  sizes = sorted({x.shape[0] for x in jax.tree.leaves(jax.eval_shape(batch_fn, key)) if x.ndim})
  if len(sizes) == 1 and sizes[0] % n == 0:
    return _Layout(mesh, seeds=False)
  what = (
    f"batch size {sizes[0]}"
    if len(sizes) == 1
    else f"batch leaves with leading sizes {sizes}"
    if sizes
    else "a batch of scalars"
  )
  if num_seeds is not None:
    what += f" (nor {num_seeds} seeds)"
  if multihost.is_multiprocess():
    raise ValueError(
      f"data-parallel training over {n} devices in {multihost.process_count()} processes "
      f"needs a batch size divisible by {n}, got {what}: use a multiple of {n}"
    )
  logging.warning("%s does not divide over %d devices; training on one device", what, n)
  return None


def _global(tree: Any, shardings: Any) -> Any:
  """`tree` (the same values on every process) as global arrays on `shardings`."""

  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def _train(
  workdirs: list[str],
  init_params: Params,
  data_keys: jax.Array,
  config_jsons: list[str],
  eval_fn,
  *,
  schedule_steps: Sequence[int] | np.ndarray,
  **kwargs,
) -> TrainState:
  """`train` (one workdir) and `train_seeds` (a seed axis) share this loop; every
  workdir's lock is held for the whole run (`storage/lock.py`)."""
  with lock.hold_all(workdirs, create=True):
    for workdir, config_json in zip(workdirs, config_jsons):
      run_log.check_config(workdir, config_json)
    schedule = set(int(s) for s in schedule_steps)
    managers = [
      checkpointing.make_manager(w, sorted(schedule), name=f"train_seed{i}")
      for i, w in enumerate(workdirs)
    ]
    try:
      state = _run(workdirs, managers, init_params, data_keys, eval_fn, schedule, **kwargs)
    except BaseException:
      if multihost.is_multiprocess():
        # Waiting for the saves is collective: with this process failing, the peers
        # may never join, so leave now (the launcher exits; committed steps stay).
        logging.error("Not waiting for checkpoint saves after an error in a multi-process run")
      else:
        _finish_saves(managers, raise_errors=False)  # never mask the original error
      raise
    _finish_saves(managers, raise_errors=True)  # the last saves must commit
    return state


def _finish_saves(managers, raise_errors: bool) -> None:
  """Waits for every manager's async saves and closes it; a failed save raises
  (`raise_errors`) or is logged."""
  errors = []
  for manager in managers:
    try:
      checkpointing.wait(manager)
    except checkpointing.CheckpointSaveError as e:
      errors.append(e)
      logging.error("%s", e)
    finally:
      manager.close()
  if errors and raise_errors:
    raise errors[0]


def _initial_state(init_params: Params, opt_init: Callable, layout: _Layout | None) -> TrainState:
  """Step 0: on the default device, or as global arrays on the layout's shardings."""
  make = lambda p: TrainState(jnp.zeros((), jnp.int32), p, opt_init(p))
  if layout is None:
    return make(init_params)
  shapes = jax.eval_shape(make, init_params)
  shardings = TrainState._make(
    (layout.replicated, layout.shardings(shapes.params), layout.shardings(shapes.opt_state))
  )  # of shardings, not arrays
  logging.info(
    "Training data parallel over %d devices in %d process(es), splitting the %s",
    jax.device_count(),
    multihost.process_count(),
    "seeds" if layout.seeds else "batch",
  )
  return jax.jit(make, out_shardings=shardings)(_global(init_params, shardings.params))


def _drop_steps_past(managers, latest: int | None) -> None:
  """Deletes the steps past the resume point (a seed that saved an event ahead of the
  others): this run rewrites them, identically, and Orbax refuses to save over them."""
  stale = multihost.agree(
    "stale_steps", [[int(s) for s in m.all_steps() if s > (latest or 0)] for m in managers]
  )
  for manager, steps in zip(managers, stale):
    for step in steps:
      logging.info(
        "Deleting step %d of %s, past the resume step %s", step, manager.directory, latest
      )
      manager.delete(step)


def _restored_state(
  managers, latest: int, like: TrainState, seed_axis: bool, layout: _Layout | None
) -> TrainState:
  """The state saved at `latest` (one stream per seed, stacked), placed like `like`."""
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape[1:] if seed_axis else x.shape, x.dtype, sharding=layout and layout.replicated
    ),
    (like.params, like.opt_state),
  )
  restored = [checkpointing.restore(m, latest, *abstract) for m in managers]
  parts = ([r["params"] for r in restored], [r["opt_state"] for r in restored])
  stack = (
    (lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees))
    if seed_axis
    else (lambda trees: trees[0])
  )
  if layout is None:
    return TrainState(jnp.asarray(latest, jnp.int32), stack(parts[0]), stack(parts[1]))
  params, opt_state = jax.jit(
    lambda ps, os_: (stack(ps), stack(os_)),
    out_shardings=(layout.shardings(like.params), layout.shardings(like.opt_state)),
  )(*parts)
  return TrainState(_global(np.int32(latest), layout.replicated), params, opt_state)


def _segment(
  loss_fn,
  optimizer,
  batch_fn,
  seed_axis: bool,
  layout: _Layout | None,
  like: TrainState,
  key_impl: Any = None,
) -> Callable:
  """The jitted segment (state, end step, keys) -> (state, loss sum). With `key_impl`
  its keys are raw key data, wrapped inside; with a layout its outputs keep `like`'s
  shardings (the loss sum replicated)."""
  batch_sharding = None if layout is None or layout.seeds else layout.split

  def segment_fn(st, end, key):
    if key_impl is not None:
      key = jax.random.wrap_key_data(key, impl=key_impl)
    return train_segment(st, end, key, loss_fn, optimizer, batch_fn, batch_sharding)

  if seed_axis:  # the step counter is shared; params, optimizer state and keys are per seed
    axes = TrainState._make((None, 0, 0))  # the vmap axis of each field
    segment_fn = jax.vmap(segment_fn, in_axes=(axes, None, 0), out_axes=(axes, 0))
  if layout is None:
    return jax.jit(segment_fn)
  return jax.jit(
    segment_fn,
    out_shardings=(
      TrainState._make(
        (
          layout.replicated,
          layout.shardings(like.params),  # of shardings
          layout.shardings(like.opt_state),
        )
      ),
      layout.replicated,
    ),
  )


def _run(
  workdirs,
  managers,
  init_params,
  data_keys,
  eval_fn,
  schedule,
  *,
  seed_axis,
  loss_fn,
  batch_fn,
  optimizer,
  num_steps,
  log_every,
  resume_every,
  lr_fn,
  on_event,
  record_fn=None,
  record_every=0,
) -> TrainState:
  num_seeds = len(workdirs)
  if record_fn is not None and (seed_axis or record_every <= 0):
    raise ValueError("recording outputs needs one workdir and record_every > 0")
  layout = _layout(
    batch_fn, data_keys[0] if seed_axis else data_keys, num_seeds if seed_axis else None
  )
  state = _initial_state(
    init_params, jax.vmap(optimizer.init) if seed_axis else optimizer.init, layout
  )
  if not seed_axis:
    per_seed = lambda tree, i: tree
  elif layout is None:
    per_seed = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  else:  # each seed's slice, replicated, for its own checkpoint stream
    per_seed = jax.jit(
      lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=layout.replicated
    )
  latest = multihost.agree("resume_step", _resume_step(managers))  # the leader's view
  _drop_steps_past(managers, latest)
  if latest is not None:
    state = _restored_state(managers, latest, state, seed_axis, layout)
    logging.info("Resuming %s from step %d", ", ".join(workdirs), latest)
  for workdir in workdirs:  # rows logged after the checkpoint (all of them on a fresh start)
    run_log.truncate_metrics(workdir, 0 if latest is None else latest)
    if record_fn is not None:
      outputs_log.truncate(workdir, -1 if latest is None else latest)
  start = int(state.step)
  if start >= num_steps:
    return state

  def record(step: int) -> None:
    if record_fn is None:
      return
    outputs = record_fn(state.params)
    if layout is not None:
      outputs = multihost.allgather(outputs)
    outputs_log.write(workdirs[0], step, np.asarray(outputs))

  if start == 0:
    record(0)

  keys, impl = data_keys, None
  if layout is not None:  # keys as global arrays: raw key data, wrapped inside the program
    if jax.dtypes.issubdtype(  # pyright: ignore[reportPrivateImportUsage]  (public jax API)
      keys.dtype, jax.dtypes.prng_key
    ):
      keys, impl = jax.random.key_data(keys), jax.random.key_impl(keys)
    keys = _global(keys, layout.split if layout.seeds else layout.replicated)
  segment = _segment(loss_fn, optimizer, batch_fn, seed_axis, layout, state, impl)
  events = _event_steps(num_steps, sorted(schedule), log_every, resume_every)
  if record_fn is not None:
    events = np.union1d(events, np.arange(record_every, num_steps + 1, record_every))  # + schedule
  events = events[events > start]
  t0 = time.time()
  loss_sum, loss_count = np.zeros(num_seeds), 0
  progress = Progress(num_steps, "train", unit="steps").start(start)
  logs = [run_log.MetricsLog(w) for w in workdirs]
  try:
    for end in events:
      prev = int(state.step)
      state, seg_loss = segment(state, jnp.asarray(end, jnp.int32), keys)
      loss_sum += np.asarray(seg_loss, np.float64).reshape(num_seeds)
      loss_count += int(end) - prev
      if not np.all(np.isfinite(loss_sum)):
        bad = [w for w, v in zip(workdirs, loss_sum) if not np.isfinite(v)]
        raise FloatingPointError(f"training loss is not finite at step {end} in {bad}")
      rows = [{} for _ in workdirs]
      if end in schedule and eval_fn is not None:
        evals = eval_fn(state.params)
        if layout is not None:  # host copies of (possibly split) global arrays
          evals = multihost.allgather(evals)
        for i, row in enumerate(rows):
          row.update({k: float(np.reshape(v, -1)[i]) for k, v in evals.items()})
      log_row = (log_every and end % log_every == 0) or end in schedule or end == num_steps
      progress.update(
        int(end),
        force=bool(log_every and end % log_every == 0),
        extra="loss " + " ".join(f"{v / max(loss_count, 1):.4f}" for v in loss_sum),
      )
      if log_row:
        now = time.time()
        for i, (row, log) in enumerate(zip(rows, logs)):
          row.update(step=int(end), train_loss=loss_sum[i] / max(loss_count, 1), time=now - t0)
          if lr_fn is not None:
            row["lr"] = float(lr_fn(int(end) - 1))
          log.write(row)
        loss_sum, loss_count = np.zeros(num_seeds), 0
      if record_fn is not None and (int(end) % record_every == 0 or end in schedule):
        record(int(end))  # before the save: a resume from `end` must find it recorded
      if end in schedule or end == num_steps or (resume_every and end % resume_every == 0):
        for i, (manager, row) in enumerate(zip(managers, rows)):
          meta = {"scheduled": end in schedule, **{k: v for k, v in row.items() if k != "time"}}
          checkpointing.save(
            manager, int(end), per_seed(state.params, i), per_seed(state.opt_state, i), meta
          )
      if on_event is not None:
        on_event(int(end))
  finally:
    for log in logs:
      log.close()
  return state
