"""The analysis report's pure pieces, and the analysis layer's independence from training."""

import json
import subprocess
import sys

import numpy as np
import pytest

from devinterp_jax import config_checks
from devinterp_jax.analysis import report, stages


def _boundaries(steps, curve):
  return stages.find_stage_boundaries(steps, curve, n_restarts=1)


def test_stage_changes_rank_metrics_by_change_relative_to_level():
  steps = np.unique(np.round(np.geomspace(1, 1e5, 30)).astype(int))
  x = np.log(steps + 1.0)
  llc = 10 / (1 + np.exp(-(x - np.log(30)) * 3)) + 10 / (1 + np.exp(-(x - np.log(3000)) * 3))
  b = _boundaries(steps, llc)
  assert len(b.boundary_steps) == 1 and 100 <= b.boundary_steps[0] <= 1000
  columns = {
    "rises_early": np.minimum(steps, b.boundary_steps[0]).astype(float),
    "constant": np.ones(len(steps)),
    "llc_mean": llc,
  }
  changes = report.stage_changes(steps, columns, b, top=5)
  assert [c["label"] for c in changes] == [s["label"] for s in b.stages]
  first = changes[0]["top_changes"]
  assert first[0]["metric"] == "rises_early"
  # rises_early goes from 1 to its final level: ~100 % of its level (90th percentile of |m|).
  assert first[0]["relative_change_percent"] == pytest.approx(
    100 * (b.boundary_steps[0] - 1) / b.boundary_steps[0], rel=1e-9
  )
  assert first[0]["score"] == pytest.approx(first[0]["relative_change_percent"] / 100)
  assert all(t["metric"] != "constant" for c in changes for t in c["top_changes"])
  later = [t for c in changes[1:] for t in c["top_changes"] if t["metric"] == "rises_early"]
  assert all(abs(t["relative_change_percent"]) < 1e-10 for t in later)


def test_small_change_of_a_quiet_metric_ranks_below_a_large_one_and_reads_as_percent():
  """A 4 % fall of a final layer-norm scale (tiny noise) used to read −1.00 (the whole
  range of the metric); it ranks below a 60 % fall and reads ≈ −4 %."""
  steps = np.unique(np.round(np.geomspace(1, 1e4, 24)).astype(int))
  x = np.log1p(steps)
  llc = 10 / (1 + np.exp(-(x - 2.5) / 0.3)) + 10 / (1 + np.exp(-(x - 7.0) / 0.3))
  b = _boundaries(steps, llc)
  assert len(b.stages) == 2
  split = b.boundary_indices[0]
  rng = np.random.default_rng(0)
  t = np.clip((np.arange(len(steps)) - split) / (len(steps) - 1 - split), 0, 1)
  ln_scale = 1.0 - 0.04 * t + 1e-5 * rng.standard_normal(len(steps))  # 4 % in stage 2
  big = 1.0 - 0.6 * t + 1e-3 * rng.standard_normal(len(steps))  # 60 % in stage 2
  noisy = 1.0 + 0.3 * rng.standard_normal(len(steps))  # noise only
  changes = report.stage_changes(steps, {"ln_scale": ln_scale, "big": big, "noisy": noisy}, b)
  top = {c["metric"]: (k, c) for k, c in enumerate(changes[1]["top_changes"])}
  assert top["big"][0] < top["ln_scale"][0]
  small = top["ln_scale"][1]
  assert small["relative_change_percent"] == pytest.approx(-4.0, abs=0.3)
  assert small["percent_of_start"] == pytest.approx(-4.0, abs=0.3)
  assert abs(small["score"]) < 0.05 and not small["within_noise"]
  assert top["big"][1]["relative_change_percent"] == pytest.approx(-60.0, abs=2.0)
  assert report.metric_noise(ln_scale) < 1e-4 and report.metric_noise(noisy) > 0.1
  # Without a trend the noise estimate recovers the std of white noise (second differences).
  white = np.random.default_rng(1).standard_normal(4000)
  assert report.metric_noise(white + np.linspace(0, 50, 4000)) == pytest.approx(1.0, rel=0.05)


def test_schedule_features_match_the_one_cycle_schedule():
  """The learning-rate peak the report reads from config.train is the step after the
  update with the largest learning rate of training/schedules.one_cycle_lr."""
  import ml_collections
  from devinterp_jax.training import schedules

  for total, pct in ((6000, 0.5), (1000, 0.3), (999, 0.37), (40, 0.5)):
    train = dict(
      num_steps=total, max_lr=3e-3, pct_start=pct, div_factor=249_999.0, final_div_factor=249_999.0
    )
    lr = np.asarray(
      schedules.one_cycle_lr(total, 3e-3, pct, 249_999.0, 249_999.0)(np.arange(total))
    )
    (feature,) = report.schedule_features(ml_collections.ConfigDict({"train": train}))
    assert feature["name"] == "learning-rate peak"
    assert feature["step"] == int(np.argmax(lr)) + 1, (total, pct)
  from configs import lm as lm_config

  assert report.schedule_features(lm_config.get_config("runlocal")) == ()  # constant lr


def _llc_result(seed=0, chains=4, draws=60):
  """An LLCResult of 24 checkpoints whose LLC rises, plateaus and rises again."""
  from devinterp_jax.sampling import results

  steps = np.unique(np.round(np.geomspace(1, 1e4, 24)).astype(int))
  x = np.log1p(steps)
  curve = 40 / (1 + np.exp(-(x - 2.5) / 0.3)) + 40 / (1 + np.exp(-(x - 6.5) / 0.3))
  rng = np.random.default_rng(seed)
  llc = curve[:, None] + 0.5 * rng.standard_normal((len(steps), chains))
  init = rng.normal(1.0, 0.01, (len(steps), chains, 4))
  trace = (
    init.mean(-1)[:, :, None]
    + llc[:, :, None] / 10.0
    + 0.05 * rng.standard_normal((len(steps), chains, draws))
  )
  return steps, results.summarize(
    trace, init, 10.0, {}, num_params=100, burnin=np.full(len(steps), 10)
  )


def test_report_stability_uses_the_runs_chains_and_windows():
  steps, res = _llc_result()
  options = report.default_options()
  options.stages.n_restarts = 1
  fit = report.fit_stages(
    steps, res.llc_mean, res.llc_std, res.llc_sem, options, num_valid_chains=res.num_valid_chains
  )
  assert [s["label"] for s in fit.stages] == [f"S{i + 1}" for i in range(len(fit.stages))]
  assert fit.settings["error_bar"] == "SEM"
  llc, valid = report.chain_llcs(res, steps, fit.steps)
  np.testing.assert_array_equal(llc[0], res.llc_per_chain)  # the kept window, as stored
  np.testing.assert_allclose(
    llc[2], 10.0 * (res.loss_trace[:, :, 35:].astype(float).mean(-1) - res.init_loss)
  )  # start +50 %: 10 + 25
  assert valid.all()
  _, other = _llc_result(seed=1)
  st = report.stage_stability(steps, res, fit, options, seed_results={"seed 1": (steps, other)})
  assert st.num_distinct_chain_resamples == 35 and st.num_fits == 140
  assert st.passes and all(s >= 0.9 for s in st.stability)
  assert st.seed_stability == tuple(1.0 for _ in fit.boundary_steps)
  assert st.settings["n_restarts"] == 1 and st.noise == "sem"


def test_milestones_order_task_prior_before_icl():
  steps = np.array([1, 10, 100, 1000, 10000])
  b = _boundaries(steps, np.array([0.0, 5.0, 5.2, 20.0, 21.0]))
  columns = {
    "dist_prior": np.array([0.5, 0.1, 0.02, 0.8, 1.0]),
    "dist_zero": np.array([0.5, 0.1, 0.02, 0.8, 1.0]),
    "mse": np.array([5.0, 4.2, 4.1, 2.0, 1.0]),
    "prior_loss_k1": np.full(5, 4.1),
    "icl_1_4": np.array([0.0, 0.0, -0.1, -1.5, -2.0]),
  }
  from devinterp_jax.experiments.icl_regression import sections as lr_sections

  stage_of = lambda t: next(s["label"] for s in b.stages if s["start_step"] <= t <= s["end_step"])
  marks = lr_sections.milestones(steps, columns, stage_of)
  assert marks["task_prior"]["stage"] == stage_of(100)
  assert any(
    "Task-prior stage before the ICL stage: **yes**" in line
    for line in lr_sections.milestone_lines(marks)
  )
  assert marks["task_prior"]["step"] == 100
  assert marks["icl_onset"]["step"] == 1000  # first step below half the total fall
  assert marks["task_prior_before_icl"] is True


@pytest.mark.parametrize(
  "name", sorted(__import__("devinterp_jax.experiments.registry", fromlist=["SETTINGS"]).SETTINGS)
)
def test_no_settings_analysis_imports_training_code(name):
  """The report of every setting (the generic analysis, the setting's `SETTING`, its
  sections and options) loads no training code and no pipeline."""
  code = (
    "import sys; import devinterp_jax.analysis.report as r, devinterp_jax.analysis.seeds; "
    "from devinterp_jax.experiments import registry; "
    f"s = registry.setting({name!r}); r.validate_options(r.default_options(s), 'a', s); "
    "bad = [m for m in sys.modules if m.startswith('devinterp_jax.training') or "
    "m.endswith(('.pipeline', '.llc_sweep', '.launcher', '.refined'))]; "
    "print(bad); sys.exit(1 if bad else 0)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_options_for_run_start_from_the_runs_config_and_apply_overrides(tmp_path):
  """launch/analyze.py analyses an LM run with the LM options (no Hessian, the LM
  metric options) unless a field is overridden on the command line, and then exactly
  the fields given are applied: one equal to its default included."""
  from configs import lm as lm_config
  from devinterp_jax.storage import run_log

  config = lm_config.get_config("runlocal")
  run_log.check_config(str(tmp_path), config.to_json(sort_keys=True))
  from devinterp_jax.experiments import registry

  lm = registry.setting("lm")
  options = report.options_for_run(str(tmp_path), setting=lm)
  assert options.stages.tolerance == 0.05 and not options.hessian.enabled
  assert tuple(options.sections) == lm.default_sections
  assert options.lm.icl_positions == (0.05, 0.5)  # LM-only options survive JSON
  options = report.options_for_run(str(tmp_path), {"stages.n_restarts": 3}, lm)
  assert options.stages.n_restarts == 3 and not options.hessian.enabled
  assert "behaviour" not in options  # the LR's sections are not the LM run's
  # The LM config turns the Hessian off; True is the default, and still applies.
  assert report.default_options().hessian.enabled
  options = report.options_for_run(str(tmp_path), {"hessian.enabled": True}, lm)
  assert options.hessian.enabled
  with pytest.raises(config_checks.ConfigError, match="config.lm.nope"):
    report.options_for_run(str(tmp_path), {"lm.nope": 1}, lm)


def test_analyze_flag_passes_exactly_the_given_overrides(tmp_path):
  """The analyze launcher's flag holds every setting's sections (so --config.lm.* is
  accepted) and hands over only the fields on the command line
  (`config_flags.get_override_values`), in a fresh process as the launcher runs."""
  from configs import lm as lm_config
  from devinterp_jax.storage import run_log

  config = lm_config.get_config("runlocal")
  run_log.check_config(str(tmp_path), config.to_json(sort_keys=True))
  code = f"""
import json, sys
from absl import flags
from ml_collections import config_flags
from devinterp_jax.analysis import report
from devinterp_jax.experiments import analyze
argv = ["analyze", "--config.hessian.enabled=True", "--config.lm.batch_size=8"]
config_flags.DEFINE_config_dict("config", analyze.flag_options(), sys_argv=argv)
flags.FLAGS(argv)
overrides = config_flags.get_override_values(flags.FLAGS["config"])
from devinterp_jax.experiments import registry
options = report.options_for_run({str(tmp_path)!r}, overrides, registry.setting('lm'))
print(json.dumps([overrides, options.hessian.enabled, options.lm.batch_size,
                  options.lm.prev_token_batch]))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  overrides, hessian_on, batch, prev = json.loads(out.stdout.strip().splitlines()[-1])
  assert overrides == {"hessian.enabled": True, "lm.batch_size": 8}
  assert hessian_on and batch == 8 and prev == config.analysis.lm.prev_token_batch
