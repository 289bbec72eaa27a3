"""Tiny configs for fast tests (the runlocal config shrunk by overriding fields)."""

import os
import shutil

import jax

from configs import icl_regression
from devinterp_jax.experiments import icl_regression as icl_experiment
from devinterp_jax.storage import checkpoints


def tiny_config(num_steps: int = 60):
  config = icl_regression.get_config("runlocal")
  config.model.update(d_model=16, d_mlp=16, num_heads=2, num_layers=1)
  config.train.update(
    num_steps=num_steps,
    batch_size=16,
    n_log=5,
    n_linear=3,
    log_every=10,
    resume_every=20,
    eval_batch_size=64,
    ed_every=4,  # 16 points over 60 steps
    ed_batch_size=16,
  )
  config.llc.update(
    num_chains=2,
    num_draws=12,
    batch_size=16,
    dataset_size=256,
    checkpoint_chunk=3,
    init_loss_stride=4,
    max_draws=0,
  )
  config.analysis.update(checkpoint_chunk=4)
  config.analysis.stages.n_restarts = 2
  config.analysis.behaviour.update(batch_size=64, gains=(0.5, 2.0))
  config.analysis.structure.batch_size = 32
  config.analysis.hessian.update(batch_size=32, num_hutchinson=4, num_lanczos_iters=6, top_k=2)
  return config


def main_job_config():
  """tiny_config(40) with a tiny refined-LLC section: the config of the session-shared
  main job (tests/conftest.py `tiny_lr_main_job`)."""
  config = tiny_config(40)
  config.refined.update(
    num_chains=2, num_draws=12, step_size=2e-4, nbeta=10.0, localization=50.0, batch_size=16
  )
  return config


def restore_params(workdir: str, config, step: int | None = None):
  """Params saved at `step` (default: config.train.num_steps) in a run's workdir."""
  model = icl_experiment.make_model(config)
  abstract = jax.eval_shape(model.init_params, jax.random.key(0))
  manager = checkpoints.make_manager(workdir, read_only=True)
  step = config.train.num_steps if step is None else step
  params = checkpoints.restore(manager, step, abstract)["params"]
  manager.close()
  return params


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a subprocess: this session's (tests/conftest.py) plus `flags`, so a
  subprocess compiles as the test process does and their numbers can be compared."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def copy_shared(src: str, dst) -> str:
  """A private copy of a session-shared run (tests/conftest.py), with mtimes kept so
  "nothing recomputed" checks still hold."""
  dst = str(dst)
  shutil.copytree(src, dst)
  return dst
