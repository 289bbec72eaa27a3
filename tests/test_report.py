"""The analysis report's pure pieces, and the analysis layer's independence from training."""

import subprocess
import sys

import numpy as np

from devinterp_jax.analysis import report, stages


def _boundaries(steps, curve):
  return stages.find_stage_boundaries(steps, curve, n_restarts=1)


def test_stage_changes_rank_metrics_by_range_normalised_change():
  steps = np.unique(np.round(np.geomspace(1, 1e5, 30)).astype(int))
  x = np.log(steps + 1.0)
  llc = 10 / (1 + np.exp(-(x - np.log(30)) * 3)) + 10 / (1 + np.exp(-(x - np.log(3000)) * 3))
  b = _boundaries(steps, llc)
  assert len(b.boundary_steps) == 1 and 100 <= b.boundary_steps[0] <= 1000
  columns = {"rises_early": np.minimum(steps, b.boundary_steps[0]).astype(float),
             "constant": np.ones(len(steps)), "llc_mean": llc}
  changes = report.stage_changes(steps, columns, b, top=5)
  assert [c["label"] for c in changes] == [s["label"] for s in b.stages]
  first = changes[0]["top_changes"]
  assert first[0]["metric"] == "rises_early" and np.isclose(first[0]["relative_change"], 1.0)
  assert all(t["metric"] != "constant" for c in changes for t in c["top_changes"])
  later = [t for c in changes[1:] for t in c["top_changes"] if t["metric"] == "rises_early"]
  assert all(abs(t["relative_change"]) < 1e-12 for t in later)


def test_milestones_order_task_prior_before_icl():
  steps = np.array([1, 10, 100, 1000, 10000])
  b = _boundaries(steps, np.array([0.0, 5.0, 5.2, 20.0, 21.0]))
  columns = {"dist_prior": np.array([0.5, 0.1, 0.02, 0.8, 1.0]),
             "dist_zero": np.array([0.5, 0.1, 0.02, 0.8, 1.0]),
             "mse": np.array([5.0, 4.2, 4.1, 2.0, 1.0]),
             "prior_loss_k1": np.full(5, 4.1),
             "icl_1_4": np.array([0.0, 0.0, -0.1, -1.5, -2.0])}
  marks = report.milestones(steps, columns, b)
  assert marks["task_prior"]["step"] == 100
  assert marks["icl_onset"]["step"] == 1000       # first step below half the total fall
  assert marks["task_prior_before_icl"] is True


def test_analysis_never_imports_training_code():
  code = ("import sys; import devinterp_jax.analysis.report, devinterp_jax.analysis.seeds; "
          "bad = [m for m in sys.modules if m.startswith(('devinterp_jax.training', "
          "'devinterp_jax.experiments'))]; print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_options_for_run_start_from_the_runs_config_and_apply_overrides(tmp_path):
  """launch/analyze.py analyses an LM run with the LM options (no Hessian, the LM
  metric options) unless a field is overridden on the command line."""
  from configs import lm as lm_config
  from devinterp_jax.storage import run_log
  config = lm_config.get_config("runlocal")
  run_log.check_config(str(tmp_path), config.to_json(sort_keys=True))
  options = report.options_for_run(str(tmp_path))
  assert options.stages.tolerance == 0.05 and not options.hessian.enabled
  assert options.lm.icl_positions == (0.05, 0.5)       # LM-only options survive JSON
  flags = report.default_options()
  flags.stages.n_restarts = 3                    # an override given on the command line
  options = report.options_for_run(str(tmp_path), flags)
  assert options.stages.n_restarts == 3 and not options.hessian.enabled
  assert options.behaviour.gains == report.default_options().behaviour.gains   # tuple kept
