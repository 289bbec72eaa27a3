"""A resumable training loop that streams Orbax checkpoints.

The loop is model-agnostic: it takes a pure `loss_fn(params, batch)`, a pure
`batch_fn(key) -> batch` and an optax optimizer. Steps between events
(logging, checkpoint saves) run as one jitted `fori_loop` with dynamic bounds,
so the program compiles once and segmenting never changes the numbers: the
batch of step s is `batch_fn(fold_in(data_key, s))` whatever happened before.
A run killed at any point and restarted with the same arguments resumes from
the latest checkpoint and ends with exactly the parameters of an uninterrupted
run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from devinterp_jax import atomic
from devinterp_jax.training import checkpointing

Params = Any
LossFn = Callable[[Params, Any], jax.Array]


class TrainState(NamedTuple):
  step: jax.Array
  params: Params
  opt_state: optax.OptState


def train_step(state: TrainState, batch: Any, loss_fn: LossFn,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
  """One optimizer step; returns the new state and the batch loss."""
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), loss


def train_segment(state: TrainState, end_step: jax.Array, data_key: jax.Array,
                  loss_fn: LossFn, optimizer: optax.GradientTransformation,
                  batch_fn: Callable[[jax.Array], Any]) -> tuple[TrainState, jax.Array]:
  """Runs steps state.step … end_step − 1; returns the state and the loss sum."""

  def body(_, carry):
    st, loss_sum = carry
    st, loss = train_step(st, batch_fn(jax.random.fold_in(data_key, st.step)), loss_fn, optimizer)
    return st, loss_sum + loss

  return jax.lax.fori_loop(0, end_step - state.step, body, (state, jnp.zeros((), jnp.float32)))


def _check_config(workdir: str, config_json: str) -> None:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(config_json)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"workdir {workdir!r} holds a run with a different config "
                       f"(differs in {diff}); use a new --workdir or the same config")
  else:
    atomic.write_text(path, config_json)


def read_metrics(workdir: str) -> list[dict]:
  """The JSONL training log of a workdir (one dict per logged step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops log lines written after the checkpoint we resume from."""
  rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
  atomic.write_text(os.path.join(workdir, "metrics.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in rows))


def _event_steps(num_steps: int, schedule: Sequence[int], log_every: int,
                 resume_every: int) -> np.ndarray:
  events = set(int(s) for s in schedule) | {num_steps}
  events |= set(range(log_every, num_steps, log_every)) if log_every else set()
  events |= set(range(resume_every, num_steps, resume_every)) if resume_every else set()
  return np.array(sorted(s for s in events if 0 < s <= num_steps))


def train(*, workdir: str, init_params: Params, loss_fn: LossFn,
          batch_fn: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
          num_steps: int, schedule_steps: Sequence[int], data_key: jax.Array,
          log_every: int = 100, resume_every: int = 1000,
          eval_fn: Callable[[Params], dict] | None = None,
          lr_fn: Callable[[int], float] | None = None,
          config_json: str = "{}",
          on_event: Callable[[int], None] | None = None) -> TrainState:
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
  """
  os.makedirs(workdir, exist_ok=True)
  _check_config(workdir, config_json)
  schedule = set(int(s) for s in schedule_steps)
  manager = checkpointing.make_manager(workdir, sorted(schedule))
  state = TrainState(jnp.zeros((), jnp.int32), init_params, optimizer.init(init_params))
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpointing.restore(manager, latest, abstract.params, abstract.opt_state)
    state = TrainState(jnp.asarray(latest, jnp.int32), restored["params"], restored["opt_state"])
    _truncate_metrics(workdir, latest)
    logging.info("Resuming %s from step %d", workdir, latest)
  start = int(state.step)
  if start >= num_steps:
    manager.close()
    return state

  segment = jax.jit(lambda st, end: train_segment(st, end, data_key, loss_fn, optimizer, batch_fn))
  events = _event_steps(num_steps, sorted(schedule), log_every, resume_every)
  events = events[events > start]
  t0 = time.time()
  loss_sum, loss_count, last_log_time, last_log_step = 0.0, 0, t0, start
  log = open(os.path.join(workdir, "metrics.jsonl"), "a")
  try:
    for end in events:
      prev = int(state.step)
      state, seg_loss = segment(state, jnp.asarray(end, jnp.int32))
      loss_sum += float(seg_loss)
      loss_count += int(end) - prev
      if not np.isfinite(loss_sum):
        raise FloatingPointError(f"training loss is not finite at step {end}")
      row = {}
      if end in schedule and eval_fn is not None:
        row.update({k: float(v) for k, v in eval_fn(state.params).items()})
      if (log_every and end % log_every == 0) or end in schedule or end == num_steps:
        now = time.time()
        row.update(step=int(end), train_loss=loss_sum / max(loss_count, 1),
                   time=now - t0)
        if lr_fn is not None:
          row["lr"] = float(lr_fn(int(end) - 1))
        log.write(json.dumps(row) + "\n")
        log.flush()
        rate = (end - last_log_step) / max(now - last_log_time, 1e-9)
        logging.info("step %d/%d  loss %.4f  %.0f steps/s  ETA %.0fs", end, num_steps,
                     row["train_loss"], rate, (num_steps - end) / max(rate, 1e-9))
        loss_sum, loss_count, last_log_time, last_log_step = 0.0, 0, now, end
      if end in schedule or end == num_steps or (resume_every and end % resume_every == 0):
        meta = {"scheduled": end in schedule, **{k: v for k, v in row.items() if k != "time"}}
        checkpointing.save(manager, int(end), state.params, state.opt_state, meta)
      if on_event is not None:
        on_event(int(end))
  finally:  # also on an exception: finish pending async saves, then close.
    log.close()
    manager.wait_until_finished()
    manager.close()
  return state
