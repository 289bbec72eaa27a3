"""The in-context linear regression pipeline: train → LLC sweep → results + plot.

Every step is a function of (config, workdir), so launchers, notebooks and
tests call the same code:

  train(config, workdir)        # resumable, streams Orbax checkpoints
  estimate(config, workdir)     # LLC of every scheduled checkpoint (resumable)
  run(config, workdir)          # the main job: both, llc.csv, plots, analysis report
  train_seeds / estimate_seeds / run_seeds(config, workdir)   # config.seeds at once
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from devinterp_jax import atomic, config_checks
from devinterp_jax.analysis import essential_dynamics
from devinterp_jax.analysis import seeds as seeds_analysis
from devinterp_jax.data.regression import RegressionTask, make_dataset, sample_batch
from devinterp_jax.experiments import llc_sweep
from devinterp_jax.experiments.icl_regression.setting import SETTING
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling import calibration
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import lock
from devinterp_jax.training import loop, schedules

# Key streams derived from config.seed.
_INIT, _DATA, _EVAL, _SGLD_DATA = range(4)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section before any work starts (`config_checks.ConfigError`)."""
  check = config_checks.check_fields
  check(config, "config", {"seed": "int>=0"})
  check(
    config.task,
    "config.task",
    {
      "task_size": "int>=1",
      "max_examples": "int>=1",
      "noise_variance": "num>=0",
      "num_tasks": "int>=0",
    },
  )
  check(
    config.model,
    "config.model",
    {
      "d_model": "int>=1",
      "d_mlp": "int>=1",
      "num_heads": "int>=1",
      "num_layers": "int>=1",
      "attn_out_proj": (True, False),
      "double_residual": (True, False),
    },
  )
  if config.model.d_model % config.model.num_heads:
    config_checks.fail(
      "config.model.num_heads",
      config.model.num_heads,
      f"a divisor of config.model.d_model = {config.model.d_model}",
    )
  check(
    config.train,
    "config.train",
    {
      "num_steps": "int>=1",
      "batch_size": "int>=1",
      "max_lr": "num>0",
      "pct_start": "unit_open",
      "div_factor": "num>0",
      "final_div_factor": "num>0",
      "b1": "unit_right_open",
      "b2": "unit_right_open",
      "weight_decay": "num>=0",
      "n_log": "int>=0",
      "n_linear": "int>=0",
      "log_every": "int>=0",
      "resume_every": "int>=0",
      "eval_batch_size": "int>=1",
      "paper_parity": (True, False),
      "ed_every": "int>=0",
      "ed_batch_size": "int>=1",
    },
  )
  if "seeds" in config:
    seeds = list(config.seeds)
    if (
      not seeds
      or len(set(seeds)) != len(seeds)
      or not all(isinstance(x, int) and x >= 0 for x in seeds)
    ):
      config_checks.fail("config.seeds", tuple(seeds), "distinct integers >= 0, at least one")
  llc_sweep.validate_sampling_sections(config)


def make_task(config: ml_collections.ConfigDict) -> RegressionTask:
  return RegressionTask.from_config(config)


def make_model(config: ml_collections.ConfigDict) -> RegressionTransformer:
  return RegressionTransformer.from_config(config)


def make_lr_schedule(config: ml_collections.ConfigDict):
  c = config.train
  return schedules.one_cycle_lr(
    c.num_steps, c.max_lr, c.pct_start, c.div_factor, c.final_div_factor
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  c = config.train
  lr = make_lr_schedule(config)
  if c.weight_decay:
    return optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  return optax.adam(lr, b1=c.b1, b2=c.b2)


def schedule_steps(config: ml_collections.ConfigDict) -> np.ndarray:
  return schedules.checkpoint_steps(
    config.train.num_steps,
    config.train.n_log,
    config.train.n_linear,
    paper_parity=config.train.paper_parity,
  )


def _key(config, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), stream)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
  """Trains (or resumes) the LR transformer, saving scheduled checkpoints."""
  validate_config(config)
  model, task = make_model(config), make_task(config)
  eval_batch = sample_batch(_key(config, _EVAL), task, config.train.eval_batch_size)
  eval_loss = jax.jit(model.loss)
  return loop.train(
    workdir=workdir,
    init_params=jax.jit(model.init_params)(_key(config, _INIT)),  # one compile, not one per op
    loss_fn=model.loss,
    batch_fn=lambda key: sample_batch(key, task, config.train.batch_size),
    optimizer=make_optimizer(config),
    num_steps=config.train.num_steps,
    schedule_steps=schedule_steps(config),
    data_key=_key(config, _DATA),
    log_every=config.train.log_every,
    resume_every=config.train.resume_every,
    eval_fn=lambda params: {"eval_loss": eval_loss(params, eval_batch)},
    lr_fn=make_lr_schedule(config),
    config_json=config.to_json(sort_keys=True),
    record_every=config.train.ed_every,
    record_fn=essential_dynamics.recorder(SETTING.ed_probe, config, workdir),
  )


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """`config` with its training seed replaced (a copy)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.seed = int(seed)
  out.lock()
  return out


def seed_workdirs(workdir: str, seeds) -> list[str]:
  return [os.path.join(workdir, f"seed_{int(s)}") for s in seeds]


def train_seeds(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
  """Trains every seed of `config.seeds` in one vmapped program (App. B.4).

  Seed s is the run `train(seed_config(config, s), workdir/seed_s)` would make:
  same init key, data stream and eval batch, each with its own checkpoint
  stream and log (the numbers agree up to float reassociation from `vmap`).
  """
  validate_config(config)
  seeds = [int(s) for s in config.seeds]
  if config.task.num_tasks:
    raise ValueError(
      "multi-seed training vmaps one data distribution, but "
      f"task.num_tasks={config.task.num_tasks} draws a different task set per "
      "seed; train the seeds one by one with launch/train.py"
    )
  configs = [seed_config(config, s) for s in seeds]
  model, task = make_model(config), make_task(configs[0])
  init = jax.jit(jax.vmap(model.init_params))(jax.numpy.stack([_key(c, _INIT) for c in configs]))
  eval_batches = jax.tree.map(
    lambda *xs: jax.numpy.stack(xs),
    *[sample_batch(_key(c, _EVAL), task, config.train.eval_batch_size) for c in configs],
  )
  loss_S = jax.jit(jax.vmap(model.loss))
  return loop.train_seeds(
    workdirs=seed_workdirs(workdir, seeds),
    init_params=init,
    data_keys=jax.numpy.stack([_key(c, _DATA) for c in configs]),
    loss_fn=model.loss,
    batch_fn=lambda key: sample_batch(key, task, config.train.batch_size),
    optimizer=make_optimizer(config),
    num_steps=config.train.num_steps,
    schedule_steps=schedule_steps(config),
    log_every=config.train.log_every,
    resume_every=config.train.resume_every,
    eval_fn=lambda params_S: {"eval_loss": loss_S(params_S, eval_batches)},
    lr_fn=make_lr_schedule(config),
    config_jsons=[c.to_json(sort_keys=True) for c in configs],
  )


def sgld_dataset(config: ml_collections.ConfigDict):
  return make_dataset(_key(config, _SGLD_DATA), make_task(config), config.llc.dataset_size)


DATA_FIELDS = {"input_gain": float, "task_gain": float, "num_tasks": int, "noise_variance": float}


def dataset_from_spec(
  config: ml_collections.ConfigDict, spec: str = "", workdir: str | None = None
):
  """The SGLD dataset, or a variant of it named by `spec` (for refined LLCs).

  `spec` is '' (the SGLD data) or comma-separated `field=value` overrides of
  the task: `input_gain=2` (OOD inputs x ~ N(0, 4 I)), `task_gain=2` (OOD
  tasks), `num_tasks=16` (a finite set of 16 tasks, drawn from config.seed),
  `noise_variance=0.5`. The same key and size as the SGLD data, so the same
  base draws: `input_gain=1` is exactly the SGLD data. (`workdir` is unused: the LR
  data is generated from the config.)
  """
  del workdir
  task = make_task(config)
  if spec:
    task = dataclasses.replace(task, **llc_sweep.parse_data_spec(spec, DATA_FIELDS))
  return make_dataset(_key(config, _SGLD_DATA), task, config.llc.dataset_size)


def estimate_checkpoints(config, model, checkpoints, ids, output_dir: str | None) -> LLCResult:
  """LLCs of any checkpoint sequence with the config's sampler settings and SGLD data."""
  return llc_sweep.estimate_checkpoints(
    config, model.loss, sgld_dataset(config), checkpoints, ids, output_dir
  )


def estimate(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, LLCResult]:
  """LLCs of every scheduled checkpoint in `workdir` (resumes finished chunks)."""
  validate_config(config)
  return llc_sweep.estimate_workdir(config, workdir, make_model(config), sgld_dataset(config))


class _ConcatSequence(Sequence):
  """Several lazy checkpoint sequences read as one (seed-major order)."""

  def __init__(self, parts: Sequence[Sequence]):
    self.parts = list(parts)
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i) + (len(self) if int(i) < 0 else 0)
    part = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return self.parts[part][i - int(self.offsets[part])]


def estimate_seeds(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[list[np.ndarray], list[LLCResult]]:
  """LLCs of every checkpoint of every seed in one batched sweep (resumable).

  All seeds are sampled with the same SGLD data (that of `config.seed`), noise
  and minibatches, so differences between seeds are differences between the
  trained models. Returns per-seed steps and results.
  """
  validate_config(config)
  model = make_model(config)
  workdirs = seed_workdirs(workdir, config.seeds)
  with lock.hold_all([workdir, *workdirs]):
    steps, parts = [], []
    for seed, w in zip(config.seeds, workdirs):
      llc_sweep.check_run_config(seed_config(config, seed), w)
      seed_steps, part = llc_sweep.scheduled_checkpoints(w, model)
      steps.append(seed_steps)
      parts.append(part)
    sequence = _ConcatSequence(parts)
    ids = [f"seed {seed} step {int(t)}" for seed, s in zip(config.seeds, steps) for t in s]
    result = estimate_checkpoints(config, model, sequence, ids, os.path.join(workdir, "llc_chunks"))
    offsets = np.cumsum([0] + [len(s) for s in steps])
    return steps, [result.select(slice(int(a), int(b))) for a, b in zip(offsets[:-1], offsets[1:])]


def calibrate(config: ml_collections.ConfigDict, workdir: str) -> calibration.CalibrationResult:
  """The A.5.3 grid (config.calibration) on the earliest and latest checkpoints;
  writes <workdir>/calibration/."""
  validate_config(config)
  return llc_sweep.calibrate_workdir(config, workdir, make_model(config), sgld_dataset(config))


write_results = functools.partial(
  llc_sweep.write_results,
  loss_label="eval loss (MSE)",
  title="In-context linear regression: LLC over training",
)
rise_test = llc_sweep.rise_test


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The main job: train, estimate LLCs over all checkpoints, write results, and
  write the analysis report (stages, metrics, heads) to <workdir>/report."""
  return llc_sweep.run_main_job(config, workdir, sys.modules[__name__])


def run_seeds(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Several seeds (App. B.4): train `config.seeds` in one vmapped program,
  estimate all their LLCs in one sweep, write each seed's results, and compare
  stage boundaries across seeds (<workdir>/seeds_report)."""
  validate_config(config)
  with lock.hold(workdir, create=True):
    t0 = time.time()
    train_seeds(config, workdir)
    t_train = time.time() - t0
    steps, results = estimate_seeds(config, workdir)
    t_llc = time.time() - t0 - t_train
    for seed, seed_dir, s, r in zip(
      config.seeds, seed_workdirs(workdir, config.seeds), steps, results
    ):
      write_results(seed_dir, s, r, config=seed_config(config, seed))
    summary = seeds_analysis.analyze_seeds(workdir, config.seeds, SETTING, config.analysis)
    summary.update(
      train_seconds=round(t_train, 1),
      llc_seconds=round(t_llc, 1),
      total_seconds=round(time.time() - t0, 1),
    )
    atomic.write_text(
      os.path.join(workdir, "seeds_report", "seeds.json"), json.dumps(summary, indent=1)
    )
    logging.info(
      "Done in %.0fs: mean-curve boundaries %s",
      summary["total_seconds"],
      summary["mean_curve"]["boundary_steps"],
    )
    return summary
