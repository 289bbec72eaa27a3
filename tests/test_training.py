"""Training: Orbax checkpoint streams, exact resume after a kill, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from devinterp_jax.experiments import icl_regression
from devinterp_jax.storage import checkpoints as checkpointing
from tests.helpers import copy_shared, restore_params, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference_run(tiny_lr_trained, tmp_path_factory):
  """A private copy of the session's tiny trained run (tiny_config())."""
  config, src = tiny_lr_trained
  return config, copy_shared(src, tmp_path_factory.mktemp("ref") / "run")


def test_checkpoints_follow_the_schedule(reference_run):
  config, workdir = reference_run
  expected = icl_regression.schedule_steps(config)
  np.testing.assert_array_equal(checkpointing.scheduled_steps(workdir), expected)
  on_disk = sorted(int(d) for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if d.isdigit())
  assert on_disk == sorted(set(expected) | {config.train.num_steps})  # resume-only pruned
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
  assert all("eval_loss" in r for r in rows if r["step"] in set(expected))
  assert rows[-1]["step"] == config.train.num_steps


def test_interrupted_run_resumes_to_identical_params(reference_run, tmp_path):
  config, ref_dir = reference_run
  workdir = str(tmp_path)

  def interrupt(step):
    if step == 30:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    from devinterp_jax.training import loop

    original = loop.train

    def train_with_interrupt(**kw):
      return original(**kw, on_event=interrupt)

    loop.train = train_with_interrupt
    try:
      icl_regression.train(config, workdir)
    finally:
      loop.train = original
  assert checkpointing.make_manager(workdir, read_only=True).latest_step() < 60
  icl_regression.train(config, workdir)
  ref, res = restore_params(ref_dir, config), restore_params(workdir, config)
  jax.tree.map(np.testing.assert_array_equal, ref, res)
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(set(steps)), "log lines after the resume point were not dropped"


def test_killed_process_resumes_to_identical_params(tmp_path):
  """SIGKILL a real training process mid-run, restart it, compare to a clean run."""
  overrides = [
    "--config.model.d_model=16",
    "--config.model.d_mlp=16",
    "--config.model.num_heads=2",
    "--config.model.num_layers=1",
    "--config.train.num_steps=1500",
    "--config.train.batch_size=16",
    "--config.train.n_log=6",
    "--config.train.n_linear=4",
    "--config.train.log_every=50",
    "--config.train.resume_every=100",
    "--config.train.eval_batch_size=64",
  ]
  cmd = [
    sys.executable,
    os.path.join(ROOT, "launch", "train.py"),
    "--config=" + os.path.join(ROOT, "configs", "icl_regression.py") + ":runlocal",
    "--workdir=" + str(tmp_path / "killed"),
    *overrides,
  ]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if metrics.exists() and any(json.loads(l)["step"] >= 250 for l in open(metrics)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  last = max(json.loads(l)["step"] for l in open(metrics))
  assert last < 1500, "the run finished before it could be killed"
  subprocess.run(
    cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
  )
  config = tiny_config(1500)
  config.train.update(n_log=6, n_linear=4, log_every=50, resume_every=100)
  icl_regression.train(config, str(tmp_path / "clean"))
  ref = restore_params(str(tmp_path / "clean"), config)
  res = restore_params(str(tmp_path / "killed"), config)
  jax.tree.map(np.testing.assert_array_equal, ref, res)


def test_other_config_in_same_workdir_is_refused(reference_run):
  config, workdir = reference_run
  other = tiny_config()
  other.train.max_lr = 0.01
  with pytest.raises(ValueError, match="different config.*train"):
    icl_regression.train(other, workdir)


def test_bad_config_key_is_refused():
  config = tiny_config()
  with pytest.raises(AttributeError, match="num_stepz"):
    config.train.num_stepz = 10


def test_missing_and_corrupt_checkpoints_name_the_problem(reference_run, tmp_path):
  config, ref_dir = reference_run
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoints"):
    checkpointing.scheduled_steps(str(tmp_path / "nowhere"))
  abstract = jax.eval_shape(icl_regression.make_model(config).init_params, jax.random.key(0))
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint for steps \[7\]"):
    checkpointing.ParamsSequence(ref_dir, [1, 7], abstract)
  import shutil

  workdir = str(tmp_path / "corrupt")
  shutil.copytree(ref_dir, workdir)
  params_dir = os.path.join(checkpointing.checkpoint_dir(workdir), "22", "params")
  for root, _, files in os.walk(params_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match="step 22.*missing or corrupt"):
    checkpointing.ParamsSequence(workdir, [22], abstract)[0]
