"""Multi-process training and launchers (issue 16): each scenario is one or two
`jax.distributed` jobs of two localhost processes × 4 fake CPU devices.

  * a job SIGKILLed mid-run and resumed ends with the checkpoints (params and
    optimizer state) of an uninterrupted job of the same layout, bit for bit;
  * every file besides Orbax's is written once, by the leader alone;
  * a seed axis split over the devices (2 processes × 2 devices, 4 seeds: 4
    Orbax streams instead of 8 keep it short) resumes bit-identically too;
  * a failure inside one process's library call of `launch/train.py` ends both
    processes, nonzero, within seconds;
  * a batch that does not divide over the devices is refused in a multi-process
    job, and falls back to one device (with a warning) in a single process;
  * in-process, a non-leader writes nothing and is not refused by the leader's lock.

Run with `pytest -m multiprocess tests/test_multihost.py`.

The workers (tests/multihost_scripts/train_worker.py: a tiny MLP through
`loop.train` / `loop.train_seeds` under `launcher.run`; launch/train.py on the
tiny ICL config) each run under `timeout`; a job's wall time is printed
(`pytest -s`).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest

from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import run_log
from tests.helpers import xla_flags

pytestmark = pytest.mark.multiprocess  # two jax.distributed processes × 4 fake CPU devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_scripts", "train_worker.py")
PROCESS_TIMEOUT_S = 120  # `timeout` per process; the jobs take 15-50 s on 2 busy cores
HEARTBEAT_S = 10
# The worker's event steps (log_every=10, schedule 1, 5, 10, 30) and its config record.
EVENTS = [1, 5, 10, 20, 30, 40, 50, 60]
SCHEDULED = [1, 5, 10, 30, 60]
WORKER_CONFIG = {"model": "mlp", "width": 8}
ABSTRACT = {
  "w1": jax.ShapeDtypeStruct((4, 8), np.float32),
  "w2": jax.ShapeDtypeStruct((8, 1), np.float32),
}


class Proc(NamedTuple):
  rc: int
  out: str
  exit_s: float  # seconds from the job's start to this process's exit


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Fake devices, and a compilation cache the scenarios' later jobs reuse."""
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
    XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def run_job(
  env: dict,
  argv: Callable[[int], list[str]],
  log: str,
  num_processes: int = 2,
  timeout_s: int = PROCESS_TIMEOUT_S,
) -> list[Proc]:
  """Runs `argv(i)` plus the launcher's multi-process flags for each process i under
  `timeout`; returns when all have exited."""
  port = free_port()
  procs, files = [], []
  t0 = time.monotonic()
  for i in range(num_processes):
    flags = (
      [
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
        f"--heartbeat_timeout_s={HEARTBEAT_S}",
        "--shutdown_timeout_s=10",
      ]
      if num_processes > 1
      else []
    )
    files.append(open(f"{log}.{i}.log", "w+"))
    procs.append(
      subprocess.Popen(
        ["timeout", "-k", "5", str(timeout_s), *argv(i), *flags],
        env=env,
        cwd=ROOT,
        stdout=files[-1],
        stderr=subprocess.STDOUT,
      )
    )
  exits = [None] * num_processes
  while None in exits:
    for i, p in enumerate(procs):
      if exits[i] is None and p.poll() is not None:
        exits[i] = time.monotonic() - t0
    time.sleep(0.05)
  out = []
  for p, f, exit_s in zip(procs, files, exits):
    f.seek(0)
    out.append(Proc(p.returncode, f.read(), exit_s))
    f.close()
  print(
    f"{os.path.basename(log)}: exits after {[round(p.exit_s, 1) for p in out]} s, "
    f"codes {[p.rc for p in out]}"
  )
  return out


def worker(*flags: str) -> Callable[[int], list[str]]:
  return lambda i: [sys.executable, WORKER, *flags]


def show(procs: list[Proc]) -> str:
  return "\n\n".join(f"--- process {i} (rc {p.rc}):\n{p.out[-6000:]}" for i, p in enumerate(procs))


def killed_and_resumed(env, root, *flags: str) -> dict:
  """Job 1 trains `reference` uninterrupted, then `run` until both processes SIGKILL
  themselves after the event at step 40; job 2 resumes `run` to the end."""
  ref, run = str(root / "reference"), str(root / "run")
  t0 = time.monotonic()
  first = run_job(
    env,
    worker(
      f"--workdir={run}",
      f"--reference={ref}",
      "--kill_at=40",
      f"--trace={root}/trace_first",
      *flags,
    ),
    str(root / "first"),
  )
  second = run_job(
    env, worker(f"--workdir={run}", f"--trace={root}/trace_second", *flags), str(root / "second")
  )
  wall = time.monotonic() - t0
  print(f"killed and resumed{' ' + ' '.join(flags) if flags else ''}: {wall:.1f} s")
  # SIGKILL (`timeout` passes the child's signal on), not `timeout`'s own kill
  assert all(p.rc in (-9, 137) and p.exit_s < PROCESS_TIMEOUT_S for p in first), show(first)
  assert all(f"TRAINED {ref} " in p.out and f"TRAINED {run} " not in p.out for p in first)
  assert [p.rc for p in second] == [0, 0], show(second)
  resumed = [re.findall(r"Resuming .* from step (\d+)", p.out) for p in second]
  assert resumed[0] and resumed[0] == resumed[1], show(second)
  return dict(
    ref=ref,
    run=run,
    root=root,
    first=first,
    second=second,
    resume_step=int(resumed[0][0]),
    wall_s=wall,
  )


def assert_same_checkpoints(ref: str, run: str) -> None:
  """Params at the last step bit-identical; every saved step's params and optimizer
  state digests equal."""
  metas = [checkpointing.read_metas(w) for w in (ref, run)]
  assert sorted(metas[0]) == sorted(metas[1]) == SCHEDULED
  for step in SCHEDULED:
    for key in ("params_digest", "opt_state_digest"):
      assert metas[0][step][key] == metas[1][step][key], (ref, run, step, key)
  params = []
  for w in (ref, run):
    manager = checkpointing.make_manager(w, read_only=True)
    params.append(checkpointing.restore(manager, 60, ABSTRACT)["params"])
    manager.close()
  jax.tree.map(np.testing.assert_array_equal, *params)


@pytest.fixture(scope="module")
def mlp(env, tmp_path_factory):
  return killed_and_resumed(env, tmp_path_factory.mktemp("mlp"))


def test_killed_job_resumes_to_bit_identical_checkpoints(mlp):
  """(a) Both processes SIGKILLed after step 40's event, the job resumed from its last
  committed checkpoint: every checkpoint equals the uninterrupted job's."""
  assert 1 <= mlp["resume_step"] <= 40
  assert all("splitting the batch" in p.out for p in mlp["first"] + mlp["second"])
  assert_same_checkpoints(mlp["ref"], mlp["run"])


def test_every_file_besides_checkpoints_is_written_once_by_the_leader(mlp):
  """(b) One row per step in metrics.jsonl, config.json as given, no temporary files,
  the lock released; and the non-leader opened no file of the workdirs for writing."""
  for workdir in (mlp["ref"], mlp["run"]):
    assert [r["step"] for r in run_log.read_metrics(workdir)] == EVENTS, workdir
    assert json.load(open(os.path.join(workdir, "config.json"))) == WORKER_CONFIG
    leftovers = [
      p
      for p in glob.glob(os.path.join(workdir, "**", "*"), recursive=True)
      if ".tmp" in os.path.basename(p) and "checkpoints" not in p
    ]
    assert not leftovers, leftovers
    assert os.path.getsize(os.path.join(workdir, ".lock")) == 0  # released at exit
  root = str(mlp["root"])
  assert not glob.glob(os.path.join(root, "trace_*.1")), "the non-leader wrote files"
  first = open(os.path.join(root, "trace_first.0")).read().split()
  second = open(os.path.join(root, "trace_second.0")).read().split()
  count = lambda trace, workdir, pattern: sum(
    bool(re.fullmatch(re.escape(workdir + os.sep) + pattern, p)) for p in trace
  )
  for workdir in (mlp["ref"], mlp["run"]):  # job 1 creates both runs
    assert count(first, workdir, r"\.config\.json\.tmp.*") == 1, first
    assert count(first, workdir, r"metrics\.jsonl") == 1, first
    assert count(first, workdir, r"\.lock") == 1, first
  # Job 2: config.json unchanged (not rewritten); the log truncated to the resume step
  # once (atomically) and reopened once for appending.
  assert count(second, mlp["run"], r"\.config\.json\.tmp.*") == 0, second
  assert count(second, mlp["run"], r"\.metrics\.jsonl\.tmp.*") == 1, second
  assert count(second, mlp["run"], r"metrics\.jsonl") == 1, second
  assert not [p for p in second if p.startswith(mlp["ref"] + os.sep)], second


def test_seeds_split_over_devices_resume_bit_identically(env, tmp_path):
  """4 seeds over 2 processes × 2 devices: one seed per device; killed and resumed,
  each seed's checkpoints equal the uninterrupted job's."""
  env = dict(env, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
  runs = killed_and_resumed(env, tmp_path, "--seeds=4")
  assert all("splitting the seeds" in p.out for p in runs["first"] + runs["second"])
  for seed in range(4):
    ref, run = (os.path.join(runs[k], f"seed_{seed}") for k in ("ref", "run"))
    assert_same_checkpoints(ref, run)
    assert [r["step"] for r in run_log.read_metrics(run)] == EVENTS


TINY_ICL = [
  "--config=configs/icl_regression.py:runlocal",
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
  "--config.train.num_steps=60",
]
# Process 1 fails inside launch/train.py's library call: its second checkpoint save
# raises, after the first segments' collectives (process 0 is then in the next
# collective or in Orbax's cross-process barrier of that save).
FAULT = """
from devinterp_jax.storage import checkpoints
if "--process_id=1" in sys.argv:
  _save, _calls = checkpoints.save, []
  def save(manager, step, *args, **kwargs):
    _calls.append(step)
    if len(_calls) >= 2:
      raise OSError(f"injected: no space left on device (process 1, step {step})")
    return _save(manager, step, *args, **kwargs)
  checkpoints.save = save
"""


def test_failure_in_one_process_of_a_launcher_ends_both(env, tmp_path):
  """(c) Both processes exit nonzero on their own (not by `timeout`), the failing one
  at once with its error logged, its peer within 3 heartbeat timeouts (30 s) of it.
  (On an idle 2-core machine the whole job takes about 25 s; the start-up, not the
  failure, is what a busy machine slows down.)"""
  workdir = str(tmp_path / "run")

  def argv(i):
    launch = [os.path.join(ROOT, "launch", "train.py"), *TINY_ICL, f"--workdir={workdir}"]
    code = (
      f"import runpy, sys\nsys.argv = {launch!r} + sys.argv[1:]\n{FAULT}\n"
      f"runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return [sys.executable, "-c", code]

  procs = run_job(env, argv, str(tmp_path / "failure"))
  assert all(p.rc != 0 and p.exit_s < PROCESS_TIMEOUT_S for p in procs), show(procs)
  assert "injected: no space left on device (process 1" in procs[1].out, show(procs)
  assert "Process 1 of 2 failed" in procs[1].out, show(procs)
  fail_s = procs[1].exit_s
  print(
    f"launcher failure: process 1 exited after {fail_s:.1f} s, process 0 "
    f"{procs[0].exit_s - fail_s:+.1f} s later"
  )
  assert procs[0].exit_s - fail_s < 3 * HEARTBEAT_S, show(procs)


def test_indivisible_batch_is_refused_across_processes_and_falls_back_in_one(env, tmp_path):
  """Batch 12 over 8 devices in two processes: a ValueError naming the sizes, on both;
  batch 6 over 4 devices in one process: one device, with a warning."""
  procs = run_job(
    env, worker(f"--workdir={tmp_path / 'multi'}", "--batch_size=12"), str(tmp_path / "multi")
  )
  # Both raise it; the leader's exit may stop process 1 (the coordinator is gone) first.
  assert all(p.rc != 0 and p.exit_s < PROCESS_TIMEOUT_S for p in procs), show(procs)
  assert "needs a batch size divisible by 8, got batch size 12" in procs[0].out, show(procs)
  single = run_job(
    env,
    worker(f"--workdir={tmp_path / 'single'}", "--batch_size=6"),
    str(tmp_path / "single"),
    num_processes=1,
  )
  assert single[0].rc == 0, show(single)
  assert "batch size 6 does not divide over 4 devices; training on one device" in single[0].out
  assert "TRAINED" in single[0].out


def test_a_non_leader_writes_nothing_and_takes_no_lock(tmp_path, monkeypatch):
  """In-process, with `multihost.is_leader` false: `atomic` and the run log skip every
  write, `replace_dir` hands out a throwaway directory elsewhere, and the workdir lock
  is neither taken nor refused (the leader holds it)."""
  from devinterp_jax import atomic, multihost
  from devinterp_jax.storage import lock

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("old")
  leader = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT)  # the leader's flock
  fcntl.flock(leader, fcntl.LOCK_EX | fcntl.LOCK_NB)
  try:
    with pytest.raises(lock.WorkdirLockedError):  # as the leader of a second job would be
      with lock.hold(str(workdir)):
        pass
    monkeypatch.setattr(multihost, "is_leader", lambda: False)
    with lock.hold(str(workdir)):  # a non-leader is not refused
      assert lock.is_held(str(workdir))
      atomic.write_text(str(workdir / "keep.txt"), "new")
      atomic.save_npz(str(workdir / "a.npz"), x=np.zeros(2))
      with atomic.replace_dir(str(workdir / "report")) as out:
        assert not out.startswith(str(tmp_path))
        open(os.path.join(out, "r.txt"), "w").write("discarded")
      assert not os.path.exists(out)
      run_log.check_config(str(workdir), json.dumps(WORKER_CONFIG))
      log = run_log.MetricsLog(str(workdir))
      log.write({"step": 1})
      log.close()
      run_log.truncate_metrics(str(workdir), 0)
    assert not lock.is_held(str(workdir))
  finally:
    os.close(leader)
  assert sorted(os.listdir(workdir)) == [".lock", "keep.txt"]
  assert (workdir / "keep.txt").read_text() == "old"
