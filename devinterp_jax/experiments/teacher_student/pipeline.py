"""The teacher–student pipeline: train → LLC sweep → results + report.

Every step is a function of (config, workdir), as for the other settings:

  train(config, workdir)        # resumable, streams Orbax checkpoints
  estimate(config, workdir)     # LLC of every scheduled checkpoint (resumable)
  calibrate(config, workdir)    # the config.calibration grid on three checkpoints
  run(config, workdir)          # the main job: train, LLCs, llc.csv, plots, report

Training draws fresh teacher batches at every step (online SGD on the population
loss) with Adam at a constant learning rate; the SGLD data is a fixed seeded
dataset of `config.llc.dataset_size` pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import ml_collections
import numpy as np
import optax

from devinterp_jax import config_checks
from devinterp_jax.data.teacher_student import TeacherStudentTask, make_dataset, sample_batch
from devinterp_jax.experiments import llc_sweep
from devinterp_jax.models.mlp import ReLUMLP
from devinterp_jax.sampling import calibration
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.training import loop, schedules

# Key streams derived from config.seed.
_INIT, _DATA, _EVAL, _SGLD_DATA = range(4)


def _check_widths(widths, key: str, hidden_layers: bool = True) -> tuple[int, ...]:
  widths = tuple(widths) if isinstance(widths, (tuple, list)) else ()
  if len(widths) < (3 if hidden_layers else 2) or not all(
    isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
  ):
    config_checks.fail(
      key,
      widths,
      "a tuple of integers >= 1 (input, hidden…, output) with at least one hidden layer",
    )
  return widths


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section before any work starts (`config_checks.ConfigError`)."""
  check = config_checks.check_fields
  check(config, "config", {"seed": "int>=0"})
  check(
    config.task,
    "config.task",
    {"teacher_seed": "int>=0", "bias_std": "num>=0", "noise_std": "num>=0", "input_std": "num>0"},
  )
  teacher = _check_widths(config.task.teacher_widths, "config.task.teacher_widths")
  student = _check_widths(config.model.widths, "config.model.widths")
  if (student[0], student[-1]) != (teacher[0], teacher[-1]):
    config_checks.fail(
      "config.model.widths",
      student,
      f"the teacher's input and output widths ({teacher[0]}, …, {teacher[-1]})",
    )
  check(config.model, "config.model", {"init_scale": "num>0"})
  check(
    config.train,
    "config.train",
    {
      "num_steps": "int>=1",
      "batch_size": "int>=1",
      "lr": "num>0",
      "b1": "unit_right_open",
      "b2": "unit_right_open",
      "n_log": "int>=0",
      "n_linear": "int>=0",
      "log_every": "int>=0",
      "resume_every": "int>=0",
      "eval_batch_size": "int>=1",
    },
  )
  llc_sweep.validate_sampling_sections(config)


def make_task(config: ml_collections.ConfigDict) -> TeacherStudentTask:
  return TeacherStudentTask.from_config(config)


def make_model(config: ml_collections.ConfigDict) -> ReLUMLP:
  return ReLUMLP.from_config(config)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam at a constant learning rate."""
  c = config.train
  return optax.adam(c.lr, b1=c.b1, b2=c.b2)


def schedule_steps(config: ml_collections.ConfigDict) -> np.ndarray:
  """Log-spaced (`n_log`) and linearly spaced (`n_linear`) checkpoint steps in [1, T]."""
  return schedules.checkpoint_steps(
    config.train.num_steps, config.train.n_log, config.train.n_linear
  )


def _key(config, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), stream)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
  """Trains (or resumes) the student on fresh teacher batches, saving scheduled
  checkpoints; `eval_loss` is the MSE on one fixed noisy batch."""
  validate_config(config)
  model, task = make_model(config), make_task(config)
  eval_batch = sample_batch(_key(config, _EVAL), task, config.train.eval_batch_size)
  eval_loss = jax.jit(model.loss)
  return loop.train(
    workdir=workdir,
    init_params=jax.jit(model.init_params)(_key(config, _INIT)),
    loss_fn=model.loss,
    batch_fn=lambda key: sample_batch(key, task, config.train.batch_size),
    optimizer=make_optimizer(config),
    num_steps=config.train.num_steps,
    schedule_steps=schedule_steps(config),
    data_key=_key(config, _DATA),
    log_every=config.train.log_every,
    resume_every=config.train.resume_every,
    eval_fn=lambda params: {"eval_loss": eval_loss(params, eval_batch)},
    lr_fn=lambda step: config.train.lr,
    config_json=config.to_json(sort_keys=True),
  )


def sgld_dataset(config: ml_collections.ConfigDict):
  """The fixed SGLD data: `config.llc.dataset_size` teacher pairs from their own stream."""
  return make_dataset(_key(config, _SGLD_DATA), make_task(config), config.llc.dataset_size)


DATA_FIELDS = {"input_std": float, "noise_std": float}


def dataset_from_spec(
  config: ml_collections.ConfigDict, spec: str = "", workdir: str | None = None
):
  """The SGLD dataset, or a variant named by `spec` (for refined LLCs).

  `spec` is '' (the SGLD data) or comma-separated `field=value` overrides of the
  task: `input_std=2` (x ~ N(0, 4 I), out of distribution), `noise_std=0` (noiseless
  labels). Same key and size as the SGLD data, so `input_std=1` is exactly it.
  (`workdir` is unused: the data are generated from the config.)
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


def calibrate(config: ml_collections.ConfigDict, workdir: str) -> calibration.CalibrationResult:
  """The A.5.3 grid (config.calibration) on the earliest, a middle and the latest
  checkpoints; writes <workdir>/calibration/."""
  validate_config(config)
  return llc_sweep.calibrate_workdir(config, workdir, make_model(config), sgld_dataset(config))


write_results = functools.partial(
  llc_sweep.write_results,
  loss_label="eval loss (MSE)",
  title="ReLU teacher–student regression: LLC over training",
)
rise_test = llc_sweep.rise_test


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The main job: train, estimate LLCs over all checkpoints, write results, and
  write the analysis report (stages, teacher metrics, Hessian) to <workdir>/report."""
  return llc_sweep.run_main_job(config, workdir, sys.modules[__name__])
