"""The main job on a tiny config: train → LLC over every checkpoint → results."""

import json
import os

import numpy as np
import pytest

from configs import icl_regression as icl_config
from devinterp_jax.experiments import icl_regression
from devinterp_jax.sampling.results import LLCResult
from tests.helpers import copy_shared, tiny_config


def test_main_job_writes_loadable_results_and_plot(tiny_lr_main_job, tmp_path):
  config, src, summary = tiny_lr_main_job  # main_job_config()'s icl_regression.run
  workdir = copy_shared(src, tmp_path / "run")
  steps = icl_regression.schedule_steps(config)
  table = np.genfromtxt(os.path.join(workdir, "llc", "llc.csv"), delimiter=",", names=True)
  np.testing.assert_array_equal(table["step"], steps)
  assert np.all(np.isfinite(table["llc_mean"])) and np.all(table["num_valid_chains"] == 2)
  assert np.all(np.isfinite(table["eval_loss"]))
  res = LLCResult.load(os.path.join(workdir, "llc", "llc.npz"))
  np.testing.assert_allclose(res.llc_mean, table["llc_mean"], rtol=1e-12)
  assert res.loss_trace.shape == (len(steps), 2, 12)
  png = os.path.join(workdir, "llc_curve.png")
  assert os.path.getsize(png) > 10_000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  on_disk = json.load(open(os.path.join(workdir, "llc", "summary.json")))
  assert on_disk["num_checkpoints"] == len(steps) and "rise_in_standard_errors" in on_disk
  # The analysis report (stages, metrics, Hessian) is written at the end.
  report_dir = os.path.join(workdir, "report")
  assert open(os.path.join(workdir, "report", "stages.csv")).readline().startswith("label,")
  for name in (
    "report.md",
    "report.json",
    "stages.json",
    "metrics.npz",
    "stage_changes.json",
    "stages.png",
    "behaviour.png",
    "structure.png",
    "hessian.png",
    "overlap.png",
    "ed.png",
    "ed.json",
  ):
    assert os.path.getsize(os.path.join(report_dir, name)) > 100, name
  metrics = np.genfromtxt(os.path.join(report_dir, "metrics.csv"), delimiter=",", names=True)
  np.testing.assert_array_equal(metrics["step"], steps)
  np.testing.assert_allclose(metrics["llc_mean"], table["llc_mean"], rtol=1e-12)
  for column in ("icl_1_4", "dist_zero", "hessian_trace", "embed_alignment"):
    assert np.all(np.isfinite(metrics[column])), column
  report = json.load(open(os.path.join(report_dir, "report.json")))
  assert report["stages"][0]["start_step"] == steps[0]
  assert report["stages"][-1]["end_step"] == steps[-1]
  assert on_disk["stage_boundaries"] == report["boundary_steps"]
  # Essential dynamics on the outputs recorded at step 0, every 4 steps (tiny_config:
  # ed_every=4) and at every checkpoint step.
  ed = report["essential_dynamics"]
  points = sorted({0, *range(4, 41, 4), *steps.tolist()})
  assert ed["source"] == "recorded during training" and ed["num_points"] == len(points)
  assert abs(sum(ed["explained_variance_ratio"]) - 1) < 0.05
  assert ed["matched_null"]["num_points"] == len(points) and ed["matched_null"]["seeds"] == 20
  assert ed["pairing"]["unmatched_llc"] == [
    b
    for b in report["boundary_steps"]
    if b not in [p["llc_step"] for p in ed["pairing"]["matched"]]
  ]
  # A second run recomputes nothing and gives the same numbers.
  chunks = os.path.join(workdir, "llc", "chunks")
  mtimes = {f: os.path.getmtime(os.path.join(chunks, f)) for f in os.listdir(chunks)}
  again = icl_regression.run(config, workdir)
  assert again["llc_last"] == summary["llc_last"]
  assert mtimes == {f: os.path.getmtime(os.path.join(chunks, f)) for f in os.listdir(chunks)}


def test_rise_test_statistic():
  mean = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0])
  sem = np.full(8, 1.0)
  out = icl_regression.rise_test(mean, sem)
  # quarter = 2 checkpoints; se of each quarter mean = sqrt(2)/2; difference 4.
  np.testing.assert_allclose(out["rise_in_standard_errors"], 4.0 / 1.0, rtol=1e-12)
  assert out["rises"]


def test_config_variants():
  full = icl_config.get_config()
  assert full.train.num_steps == 500_000 and full.llc.batch_size == 1024
  assert len(icl_regression.schedule_steps(full)) == 189  # 190 with train.paper_parity
  with pytest.raises(ValueError, match="unknown config variant"):
    icl_config.get_config("tpu-huge")


@pytest.mark.slow
def test_runlocal_main_job_llc_rises(tmp_path):
  """The README's main job: under 10 minutes on 2 CPU cores, every checkpoint converged,
  every boundary stable in >= 80 % of resamples, the settings pass the calibration check
  with its margin, and the LLC rises."""
  summary = icl_regression.run(icl_config.get_config("runlocal"), str(tmp_path))
  assert summary["rise_in_standard_errors"] > 3, summary
  assert summary["total_seconds"] < 600, summary
  assert summary["convergence"]["counts"]["converged"] == summary["num_checkpoints"], summary
  assert summary["settings_pass_calibration_check"]["passes"], summary
  stages = json.load(open(os.path.join(str(tmp_path), "report", "stages.json")))
  assert stages["boundary_steps"] and stages["stability_passes"], stages["stability"]


def test_same_config_and_seed_give_an_identical_llc_csv(tmp_path):
  """Two fresh runs of one tiny config (training, then the adaptive SGNHT sweep) in
  separate workdirs write byte-identical llc.csv files."""
  config = tiny_config(30)
  config.llc.update(max_draws=24, block_draws=6)  # adaptive blocks, as runlocal
  config.refined.num_draws = 12  # refined sections merge over llc
  texts = []
  for name in ("a", "b"):
    workdir = str(tmp_path / name)
    icl_regression.train(config, workdir)
    steps, result = icl_regression.estimate(config, workdir)
    icl_regression.write_results(workdir, steps, result, config=config)
    with open(os.path.join(workdir, "llc", "llc.csv")) as f:
      texts.append(f.read())
  assert config.llc.sampler == "sgnht"
  assert texts[0] == texts[1]
  assert len(texts[0].splitlines()) == len(icl_regression.schedule_steps(config)) + 1
