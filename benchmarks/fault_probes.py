"""Runs the fault probes of issue 13 against the launchers and writes what a user sees.

Each probe runs the real launchers (`launch/*.py`) in subprocesses on the issue's tiny
config, injects one fault (a changed setting, a second launch, a failing save, a torn
log line, a damaged file, a bad value) and records the exit code, the wall time and the
error line the user reads. The table goes to --out (default docs/results/reliability.md) and
the raw records to --json. `tests/test_reliability.py` asserts the same behaviours.

  PYTHONPATH=. python benchmarks/fault_probes.py      # ~6 minutes on 2 CPU cores
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from devinterp_jax import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config=configs/icl_regression.py:runlocal",
  "--config.train.num_steps=120",
  "--config.train.n_log=4",
  "--config.train.n_linear=2",
  "--config.train.log_every=60",
  "--config.train.resume_every=60",
  "--config.llc.num_chains=2",
  "--config.llc.num_draws=40",
  "--config.llc.checkpoint_chunk=2",
  "--config.llc.dataset_size=1024",
]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
MKDIR_FAULT = (
  "import errno, os\n_mkdir = os.mkdir\n"
  "def mkdir(path, *a, **k):\n"
  "  if 'orbax-checkpoint-tmp' in os.fspath(path):\n"
  "    raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(path))\n"
  "  return _mkdir(path, *a, **k)\nos.mkdir = mkdir\n"
)

_RESULTS = os.path.join(ROOT, "docs", "results")
_OUT = flags.DEFINE_string("out", os.path.join(_RESULTS, "reliability.md"), "Markdown table.")
_JSON = flags.DEFINE_string("json", os.path.join(_RESULTS, "reliability.json"), "Raw records.")


def launcher(
  script: str,
  workdir: str,
  *extra: str,
  prelude: str = "",
  timeout: float = 600,
  background: bool = False,
):
  config = [] if script == "analyze.py" else TINY  # analyze.py reads the run's own config
  argv = [os.path.join(ROOT, "launch", script), *config, f"--workdir={workdir}", *extra]
  code = (
    f"import runpy, sys\n{prelude}\nsys.argv = {argv!r}\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
  )
  cmd = [sys.executable, "-c", code]
  if background:
    return subprocess.Popen(
      cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
  t0 = time.time()
  try:
    out = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    rc, err = out.returncode, out.stderr
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    rc = 124
  return {
    "rc": rc,
    "seconds": round(time.time() - t0, 1),
    "message": error_line(err),
    "warning": warning_line(err),
  }


def damage(path: str, data: bytes) -> None:
  """Overwrites a run's file in place, non-atomically: the fault a probe injects."""
  with open(path, "wb") as f:  # fault injection, not a result writer
    f.write(data)


def warning_line(stderr: str) -> str:
  """The first warning this package logged (absl format: W<mmdd> … <file>.py:<line>])."""
  ours = ("run_log.py", "lock.py", "report.py", "llc.py", "llc_sweep.py", "checkpoints.py")
  for line in stderr.splitlines():
    if line[:1] == "W" and line[1:5].isdigit() and any(f" {m}:" in line for m in ours):
      return line.split("] ", 1)[-1][:300]
  return ""


def error_line(stderr: str) -> str:
  """The last line naming an error (what absl prints last), else ''."""
  lines = [l for l in stderr.splitlines() if "Error" in l and not l.startswith((" ", "\t"))]
  return lines[-1][:400] if lines else ""


def probe_stale_chunks(tmp):
  w = os.path.join(tmp, "stale")
  launcher("train.py", w)
  launcher("estimate_llc.py", w)
  before = open(os.path.join(w, "llc", "llc.csv")).read()
  r = launcher("estimate_llc.py", w, "--config.llc.dataset_size=4096")
  r["llc_csv_changed"] = open(os.path.join(w, "llc", "llc.csv")).read() != before
  r["sweeps_kept"] = len(os.listdir(os.path.join(w, "llc", "chunks")))
  out = [
    (
      "1",
      "estimate_llc.py --config.llc.dataset_size=4096 after an n = 1024 sweep",
      r,
      f"llc.csv changed: {r['llc_csv_changed']}; sweeps kept apart: {r['sweeps_kept']}",
    )
  ]
  r = launcher("estimate_llc.py", w, "--config.task.noise_variance=1.0")
  out.append(("1", "estimate_llc.py --config.task.noise_variance=1.0", r, ""))
  r = launcher("estimate_llc.py", w, "--config.model.d_model=32")
  out.append(("9", "estimate_llc.py --config.model.d_model=32", r, ""))
  return w, out


def probe_lock(tmp):
  w = os.path.join(tmp, "lock")
  first = launcher("train.py", w, "--config.train.num_steps=3000", background=True)
  lock_file = os.path.join(w, ".lock")
  deadline = time.time() + 300
  while time.time() < deadline and not (
    os.path.exists(lock_file) and f'"pid": {first.pid}' in open(lock_file).read()
  ):
    time.sleep(0.05)
  os.kill(first.pid, signal.SIGSTOP)  # hold the lock while the second launch tries
  r = launcher("train.py", w, "--config.train.num_steps=3000")
  os.kill(first.pid, signal.SIGCONT)
  first.wait()
  steps = [json.loads(l)["step"] for l in open(os.path.join(w, "metrics.jsonl"))]
  note = (
    f"first run rc {first.returncode}; its log has {len(steps)} rows, "
    f"{'all distinct and increasing' if steps == sorted(set(steps)) else 'DUPLICATES'}"
  )
  return [("2", "a second train.py on a workdir whose train.py is running", r, note)]


def probe_save_failure(tmp):
  w = os.path.join(tmp, "save")
  r = launcher("train.py", w, prelude=MKDIR_FAULT, timeout=600)
  return [("3", "train.py with no space left at the mkdir of a checkpoint", r, "")]


def probe_one_chain(tmp):
  w = os.path.join(tmp, "one_chain")
  r = launcher("main.py", w, "--config.llc.num_chains=1")
  rep = os.path.join(w, "report", "report.json")
  note = ""
  if os.path.exists(rep):
    j = json.load(open(rep))
    note = (
      f"report written ({len(os.listdir(os.path.join(w, 'report')))} files); stages "
      f"fitted: {j['stages_fitted']}; checkpoints left out: {j['excluded_checkpoints']}"
    )
  return [("4", "main.py --config.llc.num_chains=1", r, note)]


def probe_values(tmp, trained):
  out = []
  for flag in ("--config.llc.nbeta=0", "--config.llc.nbeta=nan", "--config.llc.step_size=inf"):
    out.append(("5", f"estimate_llc.py {flag}", launcher("estimate_llc.py", trained, flag), ""))
  w = os.path.join(tmp, "typo")
  r = launcher("main.py", w, "--config.llc.num_draws=0")
  out.append(
    (
      "6",
      "main.py --config.llc.num_draws=0 on a fresh workdir",
      r,
      f"checkpoints written before the error: {os.path.exists(os.path.join(w, 'checkpoints'))}",
    )
  )
  w2 = os.path.join(tmp, "relaunch")
  shutil.copytree(trained, w2)
  r = launcher("main.py", w2, "--config.llc.num_draws=20")
  out.append(("6", "main.py --config.llc.num_draws=20 on a workdir trained with 40", r, ""))
  for flag in (
    "--config.train.batch_size=0",
    "--config.train.eval_batch_size=0",
    "--config.train.max_lr=-1",
  ):
    out.append(("9", f"train.py {flag}", launcher("train.py", os.path.join(tmp, "bad"), flag), ""))
  return out


def probe_files(tmp, trained):
  out = []
  w = os.path.join(tmp, "torn")
  shutil.copytree(trained, w)
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write('{"step": 121, "train_lo')
  for script in ("analyze.py", "train.py"):  # analyze first: train rewrites the log
    r = launcher(script, w)
    out.append(("7", f"{script} after a torn last line in metrics.jsonl", r, ""))
  w = os.path.join(tmp, "chunk")
  shutil.copytree(trained, w)
  for chunk in glob.glob(os.path.join(w, "llc", "chunks", "*", "llc_pair_00000.npz")):
    data = open(chunk, "rb").read()  # every sweep's first chunk, torn
    damage(chunk, data[: len(data) // 2])
  out.append(
    ("9", "estimate_llc.py with a truncated chunk .npz", launcher("estimate_llc.py", w), "")
  )
  w = os.path.join(tmp, "config")
  shutil.copytree(trained, w)
  damage(os.path.join(w, "config.json"), b"{garbage")
  out.append(("9", "train.py with garbage in config.json", launcher("train.py", w), ""))
  w = os.path.join(tmp, "corrupt")
  shutil.copytree(trained, w)
  step_dir = sorted(glob.glob(os.path.join(w, "checkpoints", "*")))[0]
  target = max(
    glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True), key=os.path.getsize
  )
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
  damage(target, bytes(data))
  out.append(
    (
      "9",
      f"estimate_llc.py with 16 bytes of checkpoint {os.path.basename(step_dir)} overwritten",
      launcher("estimate_llc.py", w),
      "",
    )
  )
  return out


def main(argv):
  del argv
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    trained, stale = probe_stale_chunks(tmp)
    rows += stale
    rows += probe_lock(tmp)
    rows += probe_save_failure(tmp)
    rows += probe_one_chain(tmp)
    rows += probe_values(tmp, trained)
    rows += probe_files(tmp, trained)
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  ).stdout.strip()
  header = (
    f"{datetime.date.today()}, commit {commit}{' (with uncommitted changes)' if dirty else ''}, "
    f"{platform.machine()} with {os.cpu_count()} CPU cores, JAX_PLATFORMS=cpu"
  )
  records = [{"item": i, "probe": p, **r, "note": n} for i, p, r, n in rows]
  atomic.write_text(_JSON.value, json.dumps({"measured": header, "probes": records}, indent=1))
  md = [
    "# Fault probes (issue 13): what a user sees",
    "",
    f"Generated by `PYTHONPATH=. python benchmarks/fault_probes.py` ({header}). Each probe "
    "runs the launchers in a subprocess on the tiny config "
    f"`{' '.join(TINY)}`. `tests/test_reliability.py` asserts each behaviour.",
    "",
    "| item | probe | exit code | seconds | what the user reads | note |",
    "|---|---|---|---|---|---|",
  ]
  for rec in records:
    msg = rec["message"] or (f"warning: {rec['warning']}" if rec.get("warning") else "")
    msg = msg.replace("|", "\\|") or "(no error)"
    md.append(
      f"| {rec['item']} | `{rec['probe']}` | {rec['rc']} | {rec['seconds']} | {msg} | "
      f"{rec['note'].replace('|', '/')} |"
    )
  atomic.write_text(_OUT.value, "\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
