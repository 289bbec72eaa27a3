"""What the two reliability modules share: the tiny config's launcher flags, a
subprocess launcher, and small models (tests/test_reliability.py,
tests/test_reliability_results.py)."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FLAG = "--config=" + os.path.join(ROOT, "configs", "icl_regression.py") + ":runlocal"
TINY_FLAGS = [
  "--config.model.d_model=16",
  "--config.model.d_mlp=16",
  "--config.model.num_heads=2",
  "--config.model.num_layers=1",
  "--config.train.batch_size=16",
  "--config.train.n_log=5",
  "--config.train.n_linear=3",
  "--config.train.log_every=10",
  "--config.train.resume_every=20",
  "--config.train.eval_batch_size=64",
  "--config.train.ed_every=4",
  "--config.train.ed_batch_size=16",
]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
# tiny_config(num_steps) is the config these flags give (same trained weights).


def launch(script, workdir, *flags, num_steps=120, timeout=180, prelude=""):
  """Runs launch/<script> on the tiny model; `prelude` is Python run first (a fault)."""
  argv = [
    os.path.join(ROOT, "launch", script),
    CONFIG_FLAG,
    f"--workdir={workdir}",
    *TINY_FLAGS,
    f"--config.train.num_steps={num_steps}",
    *flags,
  ]
  code = (
    f"import runpy, sys\n{prelude}\nsys.argv = {argv!r}\n"
    f"runpy.run_path(sys.argv[0], run_name='__main__')\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=timeout
  )


def lean_analysis(config):
  """The config without the Hessian and overlap passes (not what these tests check)."""
  config.analysis.hessian.enabled = False
  config.analysis.overlap.enabled = False
  return config.analysis


def copy_run(src, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def quad_loss(params, batch):
  return 0.5 * jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))


def quad_data(seed=0, n=512):
  x = jax.random.normal(jax.random.key(seed), (n, 3))
  return {"x": x, "y": x @ jnp.ones(3) + 0.1 * jax.random.normal(jax.random.key(seed + 1), (n,))}
