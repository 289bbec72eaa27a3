"""Reliability, items 1-3 of issue 13 (stale chunks, the workdir lock, failing saves):
every fault reproduced, with the fixed behaviour asserted.

Each test names the item it covers. Scenarios that need a process (a lock held
by another process, a failing save, a hang) run the launchers in a subprocess
on a tiny model under a timeout; the rest run in-process on one tiny trained run.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import devinterp_jax as dj
from devinterp_jax.analysis import report
from devinterp_jax.experiments import icl_regression
from devinterp_jax.experiments.icl_regression.setting import SETTING as LR
from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import lock, run_log
from tests.helpers import restore_params, tiny_config

from tests.reliability_common import (
  CONFIG_FLAG,
  ENV,
  ROOT,
  TINY_FLAGS,
  copy_run,
  launch,
  quad_data,
  quad_loss,
)

# ----------------------------------------------------------------------------------------
# 1. Stale LLC chunks are never reused when the data, the checkpoints or the loss change.


def doubled_loss(params, batch):
  return 2.0 * quad_loss(params, batch)


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
  module's fields, a decorator's argument, a keyword-only default, a global it reads.
  The decorator's argument counts also when the wrapped loss lives in another module
  (quad_loss is in tests/reliability_common.py; `functools.wraps` copies its module)."""
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
