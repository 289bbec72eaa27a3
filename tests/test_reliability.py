"""Reliability: every fault of issue 13 reproduced, with the fixed behaviour asserted.

Each test names the item it covers. Scenarios that need a process (a lock held
by another process, a failing save, a hang) run the launchers in a subprocess
on a tiny model under a timeout; the rest run in-process on one tiny trained run.
"""

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import devinterp_jax as dj
from devinterp_jax import atomic, config_checks
from devinterp_jax.analysis import report
from devinterp_jax.analysis.run_data import load_run
from devinterp_jax.analysis import sections
from devinterp_jax.experiments import icl_regression
from devinterp_jax.experiments.icl_regression.setting import SETTING as LR
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling import results as results_lib
from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import lock, run_log
from devinterp_jax.viz import figures as viz_figures
from tests.helpers import copy_shared, restore_params, tiny_config

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


@pytest.fixture(scope="module")
def trained(tiny_lr_trained, tmp_path_factory):
  """A private copy of the session's tiny trained run (tiny_config())."""
  config, src = tiny_lr_trained
  return config, copy_shared(src, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="module")
def swept(trained, tmp_path_factory):
  """The trained run with its LLC sweep and results written."""
  config, src = trained
  workdir = str(tmp_path_factory.mktemp("swept") / "run")
  shutil.copytree(src, workdir)
  steps, result = icl_regression.estimate(config, workdir)
  icl_regression.write_results(workdir, steps, result, config=config)
  return config, workdir, steps, result


def lean_analysis(config):
  """The config without the Hessian and overlap passes (not what these tests check)."""
  config.analysis.hessian.enabled = False
  config.analysis.overlap.enabled = False
  return config.analysis


def copy_run(src, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


# ----------------------------------------------------------------------------------------
# 1. Stale LLC chunks are never reused when the data, the checkpoints or the loss change.


def quad_loss(params, batch):
  return 0.5 * jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))


def doubled_loss(params, batch):
  return 2.0 * quad_loss(params, batch)


def quad_data(seed=0, n=512):
  x = jax.random.normal(jax.random.key(seed), (n, 3))
  return {"x": x, "y": x @ jnp.ones(3) + 0.1 * jax.random.normal(jax.random.key(seed + 1), (n,))}


SGLD = dict(
  num_chains=2,
  num_draws=60,
  step_size=1e-3,
  localization=10.0,
  nbeta=50.0,
  batch_size=32,
  checkpoint_chunk=1,
  progress=False,
)


def test_stale_chunks_of_other_params_data_or_loss_are_not_reused(tmp_path):
  """Item 1 (API): a second call with other params, data or loss returns the fresh
  estimate (before: the first call's chunk, −1.57 where −240.5 was right)."""
  out = str(tmp_path / "chunks")
  at_min = [{"w": jnp.ones(3)}, {"w": jnp.ones(3) * 1.1}]
  first = dj.estimate_llcs(quad_loss, at_min, quad_data(), output_dir=out, **SGLD)
  cases = {
    "other params": (quad_loss, [{"w": jnp.ones(3) * 3.0}, at_min[1]], quad_data()),
    "other data": (quad_loss, at_min, quad_data(seed=7)),
    "loss scaled by 2": (doubled_loss, at_min, quad_data()),
  }
  for name, (loss, params, data) in cases.items():
    res = dj.estimate_llcs(loss, params, data, output_dir=out, **SGLD)
    fresh = dj.estimate_llcs(loss, params, data, **SGLD)
    np.testing.assert_array_equal(res.llc_per_chain, fresh.llc_per_chain, err_msg=name)
    assert not np.allclose(res.llc_per_chain, first.llc_per_chain), name
  again = dj.estimate_llcs(quad_loss, at_min, quad_data(), output_dir=out, **SGLD)
  np.testing.assert_array_equal(again.llc_per_chain, first.llc_per_chain)  # reused
  # "other data" is its own sweep; "other params" recomputed a chunk of the first sweep
  assert len([d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]) == 3


def test_lambda_loss_needs_a_key_to_resume(tmp_path):
  """Item 1 (API): a lambda has no identity a rerun could match."""
  out = str(tmp_path / "chunks")
  params = [{"w": jnp.ones(3)}]
  with pytest.raises(ValueError, match="loss_key"):
    dj.estimate_llcs(lambda p, b: quad_loss(p, b), params, quad_data(), output_dir=out, **SGLD)
  a = dj.estimate_llcs(
    lambda p, b: quad_loss(p, b), params, quad_data(), output_dir=out, loss_key="quad-v1", **SGLD
  )
  chunk = glob.glob(os.path.join(out, "*", "llc_pair_00000.npz"))[0]
  mtime = os.stat(chunk).st_mtime_ns
  b = dj.estimate_llcs(
    lambda p, b: quad_loss(p, b), params, quad_data(), output_dir=out, loss_key="quad-v1", **SGLD
  )
  np.testing.assert_array_equal(a.llc_per_chain, b.llc_per_chain)
  assert os.stat(chunk).st_mtime_ns == mtime  # reused, not rewritten
  c = dj.estimate_llcs(
    lambda p, b: 2 * quad_loss(p, b),
    params,
    quad_data(),
    output_dir=out,
    loss_key="quad-doubled",
    **SGLD,
  )
  assert not np.allclose(c.llc_per_chain, a.llc_per_chain)


def test_loss_identity_covers_fields_wrappers_defaults_and_globals():
  """Item 1: what the fingerprint calls the loss changes whenever the loss does: a Flax
  module's fields, a decorator's argument, a keyword-only default, a global it reads."""
  import dataclasses
  import functools
  from devinterp_jax.storage.digest import callable_identity

  model = icl_regression.make_model(tiny_config())
  assert callable_identity(model.loss) == callable_identity(
    icl_regression.make_model(tiny_config()).loss
  )
  assert callable_identity(model.loss) != callable_identity(
    dataclasses.replace(model, double_residual=False).loss
  )

  def scaled(s):
    def wrap(f):
      @functools.wraps(f)
      def g(p, b):
        return s * f(p, b)

      return g

    return wrap

  ids = {
    callable_identity(f)
    for f in (
      quad_loss,
      scaled(2.0)(quad_loss),
      scaled(3.0)(quad_loss),
      jax.grad(quad_loss),
      jax.value_and_grad(quad_loss),
    )
  }
  assert len(ids) == 5 and None not in ids
  namespace = {"jnp": jnp, "SCALE": 1.0}
  exec("def kw(p, b, *, s=1.0):\n  return s * SCALE * jnp.mean(p['w'])", namespace)
  first = callable_identity(namespace["kw"])
  namespace["kw"].__kwdefaults__ = {"s": 2.0}
  second = callable_identity(namespace["kw"])
  namespace["SCALE"] = 2.0
  third = callable_identity(namespace["kw"])
  assert len({first, second, third}) == 3
  assert callable_identity(lambda p, b: 0.0) is None
  exec("def f(p, b):\n  return g(p, b)\ndef g(p, b):\n  return f(p, b)", namespace)
  assert callable_identity(namespace["f"]) is not None  # mutual recursion terminates


def test_fingerprint_is_the_same_in_every_process(tmp_path):
  """Item 1: a resumed sweep in a new process (any hash seed) finds its chunks."""
  code = (
    "import jax, json\nfrom tests.helpers import tiny_config\n"
    "from devinterp_jax.experiments import icl_regression, llc_sweep\n"
    "from devinterp_jax.sampling import llc, sweep\n"
    "c = tiny_config(); m = icl_regression.make_model(c)\n"
    "s = llc.SamplerSettings(num_chains=2, num_draws=5, step_size=1e-3, "
    "localization=1.0, nbeta=2.0, batch_size=4)\n"
    "for key in (None, llc_sweep.loss_key(c, m.loss)):\n"
    "  print(sweep.fingerprint(sweep.sweep_identity(s, loss_fn=m.loss, "
    "data=icl_regression.sgld_dataset(c), loss_key=key, sampler='sgld', "
    "ids=[1, 2])))\n"
  )
  prints = [
    subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      env={**ENV, "PYTHONHASHSEED": seed},
      cwd=ROOT,
      timeout=120,
    ).stdout
    for seed in ("1", "2")
  ]
  assert prints[0] == prints[1] and len(prints[0].split()) == 2


def test_killed_sweep_resumes_to_identical_results(tmp_path):
  """Kept behaviour: a sweep killed after its first chunk resumes to the same numbers
  and reuses the finished chunk."""
  out = str(tmp_path / "chunks")
  params = [{"w": jnp.ones(3) * s} for s in (1.0, 1.2, 0.8)]
  full = dj.estimate_llcs(quad_loss, params, quad_data(), output_dir=out, **SGLD)
  chunks = sorted(glob.glob(os.path.join(out, "*", "llc_pair_*.npz")))
  assert len(chunks) == 3
  mtime = os.stat(chunks[0]).st_mtime_ns
  for path in chunks[1:]:  # as if killed after the first chunk was written
    os.remove(path)
  resumed = dj.estimate_llcs(quad_loss, params, quad_data(), output_dir=out, **SGLD)
  np.testing.assert_array_equal(resumed.llc_per_chain, full.llc_per_chain)
  np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)
  assert os.stat(chunks[0]).st_mtime_ns == mtime


def test_launcher_sweeps_of_other_data_are_kept_apart(swept, tmp_path):
  """Item 1 (launchers): --config.llc.dataset_size=4096 gives a new estimate (before:
  a byte-identical llc.csv), both sweeps stay on disk, and rerunning the first
  reuses it."""
  config, src, steps, result = swept
  workdir = copy_run(src, tmp_path)
  bigger = tiny_config()
  bigger.llc.dataset_size = 1024
  _, other = icl_regression.estimate(bigger, workdir)
  assert not np.allclose(other.llc_per_chain, result.llc_per_chain)
  assert len(os.listdir(os.path.join(workdir, "llc", "chunks"))) == 2
  _, same = icl_regression.estimate(config, workdir)
  np.testing.assert_array_equal(same.llc_per_chain, result.llc_per_chain)
  assert (
    same.settings["fingerprint"] == result.settings["fingerprint"] != other.settings["fingerprint"]
  )


def test_estimate_refuses_a_config_the_run_was_not_trained_with(swept, tmp_path):
  """Items 1 and 9: another task or model config is a config mismatch naming the key
  and both values (before: rc 0, or "missing or corrupt" checkpoints)."""
  config, src, _, _ = swept
  noisy = tiny_config()
  noisy.task.noise_variance = 1.0
  with pytest.raises(
    run_log.RunFileError, match=r"task\.noise_variance \(run: 0\.125, given: 1\.0\)"
  ):
    icl_regression.estimate(noisy, src)
  wider = tiny_config()
  wider.model.d_model = 32
  with pytest.raises(run_log.RunFileError, match=r"model\.d_model \(run: 16, given: 32\)"):
    icl_regression.estimate(wider, src)
  # Reading the checkpoints with the wrong model names the leaf and both shapes.
  abstract = jax.eval_shape(icl_regression.make_model(wider).init_params, jax.random.key(0))
  with pytest.raises(
    checkpointing.CheckpointError,
    match=r"does not fit the model: params leaf .* stored as \(.*16.*\) "
    r"but the model config builds \(.*32.*\)",
  ):
    checkpointing.ParamsSequence(src, [1], abstract)[0]


# ----------------------------------------------------------------------------------------
# 2. One workdir lock: a second launch on a busy workdir fails at once.


def test_second_launch_on_a_busy_workdir_fails_at_once(tmp_path):
  """Item 2: the second train.py exits at once naming the holder; the first finishes
  with every log row (before: the second replaced metrics.jsonl and rows were lost)."""
  workdir = tmp_path / "busy"
  argv = [
    sys.executable,
    os.path.join(ROOT, "launch", "train.py"),
    CONFIG_FLAG,
    f"--workdir={workdir}",
    *TINY_FLAGS,
    "--config.train.num_steps=300",
  ]
  first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    lock_file = workdir / lock.LOCK_NAME
    while time.time() < deadline:
      if lock_file.exists() and f'"pid": {first.pid}' in lock_file.read_text():
        break
      assert first.poll() is None, "the first run ended before it took the lock"
      time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # keep it holding the lock, deterministically
    t0 = time.time()
    second = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    os.kill(first.pid, signal.SIGCONT)
    assert second.returncode != 0
    assert f"is in use by pid {first.pid}" in second.stderr
    assert time.time() - t0 < 60
  finally:
    os.kill(first.pid, signal.SIGCONT)
    first.wait(timeout=180)
  assert first.returncode == 0
  steps = [r["step"] for r in run_log.read_metrics(str(workdir))]
  assert steps == sorted(set(steps)) and steps[-1] == 300
  expected = icl_regression.schedule_steps(tiny_config(300))
  assert set(int(s) for s in expected) <= set(steps)
  assert lock_file.read_text() == ""  # released on a clean exit


def test_lock_is_refused_while_held_and_taken_over_when_stale(trained, tmp_path, caplog):
  """Item 2: a live holder is named; a copy of its workdir is free; a SIGKILLed
  holder's lock (dead pid) and one left by a run on another host are taken over."""
  config, src = trained
  workdir = copy_run(src, tmp_path)
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from devinterp_jax.storage import lock\n"
      f"with lock.hold({workdir!r}):\n  print('held', flush=True); time.sleep(120)",
    ],
    env=ENV,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.WorkdirLockedError, match=f"is in use by pid {holder.pid} on host"):
      icl_regression.train(config, workdir)
    with pytest.raises(lock.WorkdirLockedError, match=f"is in use by pid {holder.pid}"):
      report.analyze(workdir, LR, config.analysis)
    copied = copy_run(workdir, tmp_path, "copied")  # its .lock names the live holder
    icl_regression.train(config, copied)
    assert "the lock file was copied from another workdir" in caplog.text
  finally:
    holder.kill()
    holder.wait()
  assert f'"pid": {holder.pid}' in open(os.path.join(workdir, lock.LOCK_NAME)).read()  # stale
  icl_regression.train(config, workdir)
  assert "that process is gone" in caplog.text
  assert open(os.path.join(workdir, lock.LOCK_NAME)).read() == ""  # released on exit
  with open(os.path.join(workdir, lock.LOCK_NAME), "w") as f:  # preempted elsewhere
    st = os.stat(os.path.join(workdir, lock.LOCK_NAME))
    json.dump(
      {
        "pid": 1,
        "host": "some-other-host",
        "time": 0,
        "argv": ["main.py"],
        "inode": [st.st_dev, st.st_ino],
      },
      f,
    )
  icl_regression.train(config, workdir)
  assert "some-other-host" in caplog.text and "it no longer holds the lock" in caplog.text


def test_lock_needs_an_existing_workdir_except_for_training(tmp_path):
  """A mistyped --workdir for a sweep or report is named, not created."""
  with pytest.raises(FileNotFoundError, match="does not exist"):
    icl_regression.estimate(tiny_config(), str(tmp_path / "typo"))
  assert not os.path.exists(tmp_path / "typo")


def test_lock_is_reentrant_within_a_process(tmp_path):
  with lock.hold(str(tmp_path)):
    with lock.hold(str(tmp_path)):
      assert lock.is_held(str(tmp_path))
    assert lock.is_held(str(tmp_path))
  assert not lock.is_held(str(tmp_path))


# ----------------------------------------------------------------------------------------
# 3. A failed checkpoint save ends the process with a named error, never a hang.

MKDIR_FAULT = """
import errno, os
_mkdir = os.mkdir
def mkdir(path, *a, **k):
  if "orbax-checkpoint-tmp" in os.fspath(path):
    raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
  return _mkdir(path, *a, **k)
os.mkdir = mkdir
"""
FSIZE_FAULT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
"""


def test_failed_mkdir_of_a_save_exits_nonzero_without_hanging(tmp_path):
  """Item 3: no space at the step directory's mkdir (before: rc 124 after 60-300 s)."""
  t0 = time.time()
  out = launch("train.py", tmp_path / "w", prelude=MKDIR_FAULT, timeout=150)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "CheckpointSaveError" in out.stderr and "No space left on device" in out.stderr
  assert "a rerun resumes from the last committed checkpoint" in out.stderr
  assert "still keep the process alive" not in out.stderr  # exited by itself, no watchdog
  assert time.time() - t0 < 120


def test_failed_write_of_a_save_exits_and_the_rerun_resumes_exactly(tmp_path):
  """Items 3 and kept disk-full behaviour: a save whose writes fail (file-size limit,
  like a full disk) ends the run with code 1; the rerun resumes to the exact params
  of an uninterrupted run."""
  workdir = tmp_path / "w"
  out = launch("train.py", workdir, prelude=FSIZE_FAULT, timeout=150)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "CheckpointSaveError" in out.stderr and "File too large" in out.stderr
  assert "still keep the process alive" not in out.stderr
  again = launch("train.py", workdir, timeout=150)
  assert again.returncode == 0, again.stderr[-2000:]
  config = tiny_config(120)
  clean = str(tmp_path / "clean")
  icl_regression.train(config, clean)
  jax.tree.map(
    np.testing.assert_array_equal,
    restore_params(clean, config),
    restore_params(str(workdir), config),
  )
  assert [r["step"] for r in run_log.read_metrics(str(workdir))] == [
    r["step"] for r in run_log.read_metrics(clean)
  ]


def test_launcher_exits_even_if_a_background_thread_blocks():
  """Item 3 (the watchdog behind every launcher): a failed job whose library left a
  non-daemon thread waiting forever still exits with code 1."""
  code = (
    "import threading\nfrom devinterp_jax.experiments import launcher\n"
    "threading.Thread(target=threading.Event().wait).start()\n"
    "launcher.run(lambda: 1 / 0, grace_s=2)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 1
  assert "ZeroDivisionError" in out.stderr and "still keep the process alive" in out.stderr


# ----------------------------------------------------------------------------------------
# 4. The report handles checkpoints with fewer than 2 valid chains.


def _one_chain_at(result: results_lib.LLCResult, index: int) -> results_lib.LLCResult:
  """The result with every chain but the first diverged at checkpoint `index`."""
  diverged = result.diverged.copy()
  diverged[index, 1:] = True
  status = result.status.copy()
  status[index, 1:] = 4  # diagnostics.STATUS_NAMES: 'diverged'
  mean, std = result.llc_mean.copy(), result.llc_std.copy()
  mean[index], std[index] = result.llc_per_chain[index, 0], np.nan
  return results_lib.LLCResult(
    **{
      **{
        f: getattr(result, f)
        for f in (
          "llc_per_chain",
          "loss_trace",
          "init_loss",
          "escaped",
          "not_converged",
          "negative",
          "mala_acceptance",
          "distance",
          "grad_norm",
          "noise_norm",
          "settings",
        )
      },
      "llc_mean": mean,
      "llc_std": std,
      "diverged": diverged,
      "status": status,
    }
  )


def test_report_leaves_out_a_single_chain_checkpoint_and_names_it(swept, tmp_path):
  """Item 4: every chain but one diverged at one checkpoint (before: `llc_std must be
  finite` without naming it, and an empty report/)."""
  config, src, steps, result = swept
  workdir = copy_run(src, tmp_path)
  _one_chain_at(result, 2).save(os.path.join(workdir, "llc", "llc.npz"))
  summary = report.analyze(workdir, LR, lean_analysis(tiny_config()))
  bad = int(steps[2])
  assert summary["excluded_checkpoints"] == [bad] and summary["stages_fitted"]
  stages_json = json.load(open(os.path.join(workdir, "report", "stages.json")))
  assert stages_json["settings"]["excluded_steps"] == [bad]
  assert bad not in stages_json["steps"] and len(stages_json["steps"]) == len(steps) - 1
  md = open(os.path.join(workdir, "report", "report.md")).read()
  assert f"Left out of the stage fit:** the checkpoints at steps [{bad}]" in md


def test_main_job_with_one_chain_writes_a_report_without_stages(trained, tmp_path):
  """Item 4: --config.llc.num_chains=1 (accepted) no longer crashes at the very end."""
  config, src = trained
  workdir = copy_run(src, tmp_path)
  one = tiny_config()
  one.llc.num_chains = 1
  lean_analysis(one)
  summary = icl_regression.run(one, workdir)
  assert summary["stage_boundaries"] == []
  assert summary["stages_excluded_checkpoints"] == [
    int(s) for s in checkpointing.scheduled_steps(workdir)
  ]
  rep = json.load(open(os.path.join(workdir, "report", "report.json")))
  assert rep["stages_fitted"] is False and rep["stages"] == []
  assert json.load(open(os.path.join(workdir, "report", "stages.json")))["fitted"] is False
  assert "Stages were not fitted" in open(os.path.join(workdir, "report", "report.md")).read()
  assert os.path.exists(os.path.join(workdir, "report", "behaviour.png"))
  assert json.load(open(os.path.join(workdir, "llc", "summary.json")))["stage_boundaries"] == []


# ----------------------------------------------------------------------------------------
# 5. nβ, ε and γ must be finite, and nβ > 0.


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("nbeta", 0.0, "nbeta must be > 0"),
    ("nbeta", -1.0, "nbeta must be > 0"),
    ("nbeta", float("nan"), "nbeta must be finite"),
    ("nbeta", float("inf"), "nbeta must be finite"),
    ("step_size", float("nan"), "step_size must be finite"),
    ("step_size", float("inf"), "step_size must be finite"),
    ("localization", float("nan"), "localization must be finite"),
    ("localization", -1.0, "localization must be >= 0"),
  ],
)
def test_sampler_hyperparameters_must_be_finite_and_nbeta_positive(field, value, message):
  """Item 5: before, nβ = 0 gave LLC 0 ± 0 with every chain "ok", and NaN passed."""
  kw = {
    **dict(num_chains=2, num_draws=10, step_size=1e-3, localization=1.0, nbeta=10.0, batch_size=8),
    field: value,
  }
  with pytest.raises(ValueError, match=message):
    dj.estimate_llc(quad_loss, {"w": jnp.ones(3)}, quad_data(), **kw)
  config = tiny_config()
  config.llc[field] = value
  with pytest.raises(config_checks.ConfigError, match=f"config.llc.{field} = "):
    icl_regression.validate_config(config)


def test_calibration_grid_values_are_checked():
  with pytest.raises(ValueError, match="nbeta must be > 0"):
    dj.calibrate(
      quad_loss,
      [{"w": jnp.ones(3)}],
      quad_data(),
      step_sizes=[1e-3],
      nbetas=[0.0],
      localizations=[1.0],
      num_chains=4,
      num_draws=10,
      batch_size=8,
    )
  config = tiny_config()
  config.calibration.nbetas = (15.4, 0.0)
  with pytest.raises(config_checks.ConfigError, match=r"config.calibration.nbetas = "):
    icl_regression.validate_config(config)


# ----------------------------------------------------------------------------------------
# 6. Every section is validated before training; only training sections lock a workdir.


def test_llc_typo_fails_the_main_job_before_training(tmp_path):
  """Item 6: before, main.py trained fully and only then failed on num_draws=0."""
  workdir = tmp_path / "w"
  out = launch("main.py", workdir, "--config.llc.num_draws=0", timeout=120)
  assert out.returncode == 1
  assert "config.llc.num_draws = 0 is invalid: it must be an integer >= 1" in out.stderr
  assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
  "key,value",
  [
    ("train.batch_size", 0),
    ("train.eval_batch_size", 0),
    ("train.max_lr", -1.0),
    ("llc.num_draws", 0),
    ("llc.sampler", "sgdl"),
    ("analysis.stages.noise", "sd"),
    ("analysis.hessian.top_k", 100),
    ("refined.step_size", 0.0),
    ("model.num_heads", 3),
  ],
)
def test_bad_config_values_are_refused_before_any_work(key, value, tmp_path):
  """Items 6 and 9: batch_size=0 said "loss not finite", eval_batch_size=0 gave silent
  NaN losses, max_lr=-1 silently ascended."""
  config = tiny_config()
  section, field = key.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[field] = value
  with pytest.raises(config_checks.ConfigError, match=f"config.*{field}.* = {value!r}"):
    icl_regression.train(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_llc_and_analysis_sections_may_change_on_a_trained_workdir(trained, tmp_path):
  """Item 6: the corrected command on the same workdir is accepted (before: refused,
  "differs in ['llc']"); config.json records the new sections; training sections
  still lock the workdir, naming the key and both values."""
  config, src = trained
  workdir = copy_run(src, tmp_path)
  other = tiny_config()
  other.llc.num_draws = 20
  other.analysis.top_metrics = 3
  icl_regression.train(other, workdir)
  saved = run_log.read_config(workdir)
  assert saved.llc.num_draws == 20 and saved.analysis.top_metrics == 3
  retrain = tiny_config()
  retrain.train.max_lr = 0.01
  with pytest.raises(run_log.RunFileError, match=r"train\.max_lr \(run: 0\.003, given: 0\.01\)"):
    icl_regression.train(retrain, workdir)


# ----------------------------------------------------------------------------------------
# 7-8. The training log: fsynced lines, torn last line dropped, first segment truncated.


def test_torn_last_log_line_is_dropped_and_the_run_resumes(trained, tmp_path, caplog):
  """Item 7: before, train.py, main.py and analyze.py failed with a raw JSONDecodeError."""
  config, src = trained
  workdir = copy_run(src, tmp_path)
  rows = run_log.read_metrics(workdir)
  with open(run_log.metrics_path(workdir), "a") as f:
    f.write('{"step": 61, "train_lo')
  assert run_log.read_metrics(workdir) == rows
  assert "dropping the torn last line" in caplog.text
  icl_regression.train(config, workdir)
  assert open(run_log.metrics_path(workdir)).read().endswith("}\n")
  assert run_log.read_metrics(workdir) == rows
  assert load_run(workdir, LR, require_llc=False).log == rows


def test_damaged_log_line_in_the_middle_names_file_and_line(trained, tmp_path):
  config, src = trained
  workdir = copy_run(src, tmp_path)
  path = run_log.metrics_path(workdir)
  lines = open(path).read().splitlines()
  lines[2] = lines[2][:10]
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(run_log.RunFileError, match=r"metrics\.jsonl, line 3, is not a training"):
    icl_regression.train(config, workdir)


def test_metrics_log_lines_are_fsynced(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
  log = run_log.MetricsLog(str(tmp_path))
  log.write({"step": 1})
  log.write({"step": 2})
  log.close()
  assert len(synced) == 2


def test_run_killed_before_its_first_checkpoint_does_not_duplicate_log_rows(trained, tmp_path):
  """Item 8: a row logged before the first commit is dropped on the rerun (before: 38
  rows instead of 37)."""
  config, src = trained
  workdir = str(tmp_path / "killed_early")
  os.makedirs(workdir)
  run_log.check_config(workdir, config.to_json(sort_keys=True))
  with open(run_log.metrics_path(workdir), "w") as f:
    f.write(json.dumps({"step": 1, "train_loss": 9.0, "time": 0.1}) + "\n")
  icl_regression.train(config, workdir)
  assert [r["step"] for r in run_log.read_metrics(workdir)] == [
    r["step"] for r in run_log.read_metrics(src)
  ]
  assert run_log.read_metrics(workdir)[0]["train_loss"] != 9.0


def test_llc_csv_takes_losses_from_checkpoint_meta_when_the_log_lacks_them(swept, tmp_path):
  """Item 2's symptom: llc.csv showed NaN losses although every checkpoint's meta held them."""
  config, src, steps, result = swept
  workdir = copy_run(src, tmp_path)
  open(run_log.metrics_path(workdir), "w").close()
  icl_regression.write_results(workdir, steps, result, config=config)
  table = np.genfromtxt(os.path.join(workdir, "llc", "llc.csv"), delimiter=",", names=True)
  assert np.all(np.isfinite(table["train_loss"])) and np.all(np.isfinite(table["eval_loss"]))


# ----------------------------------------------------------------------------------------
# 9. Every error names the file, the cause and the fix.


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_chunk_names_its_path_and_the_fix(swept, tmp_path, damage):
  config, src, _, _ = swept
  workdir = copy_run(src, tmp_path)
  chunk = sorted(glob.glob(os.path.join(workdir, "llc", "chunks", "*", "llc_pair_*.npz")))[0]
  data = open(chunk, "rb").read()
  open(chunk, "wb").write(data[: len(data) // 2] if damage == "truncate" else os.urandom(300))
  with pytest.raises(
    llc_lib.ChunkError, match=re.escape(chunk) + " is unreadable .*Delete it and rerun"
  ):
    icl_regression.estimate(config, workdir)
  if damage == "truncate":
    os.remove(chunk)
    icl_regression.estimate(config, workdir)  # the fix works


@pytest.mark.parametrize(
  "content,message", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")]
)
def test_damaged_config_json_names_the_file(trained, tmp_path, content, message):
  config, src = trained
  workdir = copy_run(src, tmp_path)
  open(os.path.join(workdir, "config.json"), "w").write(content)
  for call in (lambda: icl_regression.train(config, workdir), lambda: run_log.read_config(workdir)):
    with pytest.raises(run_log.RunFileError, match=f"config.json {message}.*Restore it"):
      call()


def test_corrupted_checkpoint_is_corrupt_at_its_step_and_not_sampled(tmp_path):
  """Item 9: overwritten compressed bytes restored silently (values up to 2.7e38) and
  showed up only as diverged chains. (Arrays this large are stored outside OCDBT's
  CRC-checked b-tree nodes; small ones are caught by Orbax itself.)"""
  workdir, step = str(tmp_path), 7
  params = {
    "w": jnp.asarray(np.linspace(-1.0, 1.0, 3 * 40_000, dtype=np.float32).reshape(40_000, 3))
  }
  manager = checkpointing.make_manager(workdir, [step])
  checkpointing.save(manager, step, params, {"count": jnp.zeros(())}, {"scheduled": True})
  checkpointing.wait(manager)
  manager.close()
  target = max(
    glob.glob(
      os.path.join(workdir, "checkpoints", str(step), "params", "**", "d", "*"), recursive=True
    ),
    key=os.path.getsize,
  )
  original = open(target, "rb").read()
  abstract = jax.eval_shape(lambda: params)
  silent = None
  # Flip 16 bytes of the array's compressed bytes where the decoder does not notice
  # (where it does, Orbax raises by itself): the first such place of a few.
  for fraction in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
    data = bytearray(original)
    at = int(len(data) * fraction)
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    open(target, "wb").write(bytes(data))
    manager = checkpointing.make_manager(workdir, read_only=True)
    try:
      silent = checkpointing.restore(manager, step, abstract, verify=False)["params"]
      break
    except checkpointing.CheckpointError:
      open(target, "wb").write(original)
    finally:
      manager.close()
  assert silent is not None, "every flip was caught by the decoder"
  assert not np.array_equal(silent["w"], params["w"])  # what Orbax alone returns
  loss = lambda p, b: jnp.mean(jnp.square(b["x"] @ p["w"][:3] - b["y"]))
  data = {"x": jnp.ones((16, 3)), "y": jnp.zeros((16, 3))}
  with pytest.raises(
    checkpointing.CheckpointError,
    match=f"checkpoint corrupt at step {step} .*SHA-256 digest.*not used",
  ):
    dj.estimate_llcs(
      loss,
      checkpointing.ParamsSequence(workdir, [step], abstract),
      data,
      num_chains=2,
      num_draws=5,
      step_size=1e-4,
      localization=1.0,
      nbeta=1.0,
      batch_size=4,
      progress=False,
    )


def test_restore_with_other_dtypes_names_the_dtype_not_corruption(tmp_path):
  params = {"w": jnp.arange(6.0, dtype=jnp.float32)}
  manager = checkpointing.make_manager(str(tmp_path), [1])
  checkpointing.save(manager, 1, params, {"count": jnp.zeros(())}, {"scheduled": True})
  checkpointing.wait(manager)
  manager.close()
  manager = checkpointing.make_manager(str(tmp_path), read_only=True)
  with pytest.raises(
    checkpointing.CheckpointError, match=r"\['w'\] is stored as float32 but is restored as float16"
  ):
    checkpointing.restore(manager, 1, {"w": jax.ShapeDtypeStruct((6,), jnp.float16)})
  manager.close()


def test_scalar_array_hyperparameters_are_accepted():
  res = dj.estimate_llc(
    quad_loss,
    {"w": jnp.ones(3)},
    quad_data(),
    num_chains=2,
    num_draws=10,
    step_size=jnp.float32(1e-3),
    localization=np.array(1.0),
    nbeta=np.float64(10.0),
    batch_size=8,
  )
  assert np.isfinite(res.llc_mean) and res.settings["step_size"] == pytest.approx(1e-3)


def test_nonfinite_empty_and_nonbinary_inputs_are_named():
  """Item 9: NaN params were "diverged chains", empty params a JAX-internal vmap error,
  and a 0.5 mask was accepted."""
  kw = dict(num_chains=2, num_draws=10, step_size=1e-3, localization=1.0, nbeta=10.0, batch_size=8)
  bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
  with pytest.raises(
    ValueError,
    match=r"non-finite w\*: checkpoint 7 has non-finite params "
    r"in \['w'\] \(1 NaN, 0 inf\)",
  ):
    dj.estimate_llcs(quad_loss, [{"w": jnp.ones(3)}, bad], quad_data(), checkpoint_ids=[3, 7], **kw)
  with pytest.raises(ValueError, match="hold no arrays"):
    dj.estimate_llc(quad_loss, {}, quad_data(), **kw)
  with pytest.raises(ValueError, match=r"values \[0\.5\] besides 0 and 1"):
    dj.estimate_llc(
      quad_loss, {"w": jnp.ones(3)}, quad_data(), restrict={"w": np.array([1.0, 0.5, 0.0])}, **kw
    )


# ----------------------------------------------------------------------------------------
# 10. Atomic writes: no temp files on failure, fsynced directories, figures, whole reports.


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
  """Item 10 and kept disk-full behaviour: ENOSPC at fsync leaves the old file intact
  (before: llc_chunk_00001.npz.tmp<pid> was left behind)."""
  path = str(tmp_path / "summary.json")
  atomic.write_text(path, "old")

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left"):
    atomic.write_text(path, "new")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_results_survive_a_full_disk_during_result_writing(swept, tmp_path, monkeypatch):
  config, src, steps, result = swept
  workdir = copy_run(src, tmp_path)
  before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(workdir, "llc", "*.*"))}
  real, calls = os.fsync, []

  def full_after_two(fd):
    calls.append(fd)
    if len(calls) > 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real(fd)

  monkeypatch.setattr(os, "fsync", full_after_two)
  with pytest.raises(OSError, match="No space left"):
    icl_regression.write_results(workdir, steps, result, config=config)
  monkeypatch.undo()
  for p, data in before.items():
    assert open(p, "rb").read() == data, p
  assert not [f for f in os.listdir(os.path.join(workdir, "llc")) if ".tmp" in f]


def test_atomic_writes_fsync_the_directory_and_cover_figures(tmp_path, monkeypatch):
  dirs, writes = [], []
  monkeypatch.setattr(atomic, "fsync_dir", dirs.append)
  real_write = atomic.write_bytes
  monkeypatch.setattr(atomic, "write_bytes", lambda p, d: (writes.append(p), real_write(p, d)))
  atomic.write_text(str(tmp_path / "a.txt"), "x")
  assert dirs == [str(tmp_path)]
  fig, _ = viz_figures.figure(figsize=(2, 2))
  viz_figures.save(fig, str(tmp_path / "f.png"))
  assert writes[-1] == str(tmp_path / "f.png")
  assert open(tmp_path / "f.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_replace_dir_swaps_a_directory_in_whole(tmp_path):
  target = tmp_path / "report"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with atomic.replace_dir(str(target)) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("new")
      raise RuntimeError("crash while writing")
  assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["report"]
  with atomic.replace_dir(str(target)) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["report"]


def test_a_crash_while_writing_the_report_leaves_the_old_report(swept, tmp_path, monkeypatch):
  """Item 10: the report directory is written aside and swapped in whole."""
  config, src, _, _ = swept
  workdir = copy_run(src, tmp_path)
  report.analyze(workdir, LR, lean_analysis(tiny_config()))
  out = os.path.join(workdir, "report")
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}

  def crash(*a, **k):
    raise RuntimeError("killed mid-report")

  monkeypatch.setattr(sections.Context, "checkpoints", crash)  # after stages.json was written
  with pytest.raises(RuntimeError, match="killed mid-report"):
    report.analyze(workdir, LR, lean_analysis(tiny_config()))
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
  assert not [e for e in os.listdir(workdir) if e.startswith(".report")]


def test_report_refuses_to_replace_a_directory_that_is_not_a_report(swept, tmp_path):
  """Item 10: the report replaces its directory whole, so --out=<not a report> is refused."""
  config, src, _, _ = swept
  other = tmp_path / "notes"
  other.mkdir()
  (other / "mine.txt").write_text("keep me")
  with pytest.raises(ValueError, match="refusing to replace .*notes.*no report.json"):
    report.analyze(src, LR, config.analysis, out_dir=str(other))
  assert (other / "mine.txt").read_text() == "keep me"


def test_no_writer_bypasses_atomic():
  """Item 10: every file the package and benchmarks write goes through `atomic`
  (the training log appends through `run_log.MetricsLog`, fsynced per line; the fault
  probes' deliberate damage is marked "fault injection")."""
  pattern = re.compile(r"open\([^)]*[\"'][wx]b?[\"']|\.savefig\(|np\.savez\(|json\.dump\(")
  offenders = []
  for folder in ("devinterp_jax", "benchmarks"):
    for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
      if path.endswith(os.path.join("devinterp_jax", "atomic.py")):
        continue
      for i, line in enumerate(open(path), 1):
        if pattern.search(line) and "fault injection" not in line:
          offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
  assert not offenders, offenders
