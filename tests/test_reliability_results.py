"""Reliability, items 4-10 of issue 13 (reports, hyperparameters, config sections, the
training log, named errors, atomic writes): every fault reproduced, with the fixed
behaviour asserted.

Each test names the item it covers. Scenarios that need a process (a lock held
by another process, a failing save, a hang) run the launchers in a subprocess
on a tiny model under a timeout; the rest run in-process on one tiny trained run.
"""

import errno
import glob
import json
import os
import re

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
from devinterp_jax.storage import run_log
from devinterp_jax.viz import figures as viz_figures
from tests.helpers import tiny_config

from tests.reliability_common import (
  ROOT,
  copy_run,
  lean_analysis,
  launch,
  quad_data,
  quad_loss,
)

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
