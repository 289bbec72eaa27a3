"""Refined LLC pipeline: all heads over a run's checkpoints, data-refined LR variants."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from devinterp_jax.experiments import icl_regression, refined
from devinterp_jax.sampling.results import LLCResult
from tests.helpers import copy_shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_lr_main_job, tmp_path_factory):
  """A private copy of the session's tiny main job (these tests add refined results)."""
  config, src, _ = tiny_lr_main_job
  return config, copy_shared(src, tmp_path_factory.mktemp("refined") / "run")


def test_all_heads_over_checkpoints(trained):
  config, workdir = trained
  summary = refined.run_refined(config, workdir, restrict="heads", update_report=True)
  steps = icl_regression.schedule_steps(config)
  out = os.path.join(workdir, "wrllc_heads")
  res = LLCResult.load(os.path.join(out, "llc.npz"))
  assert res.llc_mean.shape == (2, len(steps))  # 1 layer × 2 heads
  table = np.genfromtxt(os.path.join(out, "refined.csv"), delimiter=",", names=True)
  np.testing.assert_array_equal(table["step"], steps)
  np.testing.assert_allclose(table["L0H1_mean"], res.llc_mean[1], rtol=1e-12)
  # The sum over the disjoint heads is the mean over chains of per-chain sums.
  np.testing.assert_allclose(table["sum_mean"], res.llc_per_chain.sum(0).mean(-1), rtol=1e-6)
  full = LLCResult.load(os.path.join(workdir, "llc", "llc.npz"))
  np.testing.assert_allclose(table["full_mean"], full.llc_mean, rtol=1e-12)
  assert summary["num_params"] == [4 * 16 * 8] * 2
  assert os.path.getsize(os.path.join(out, "trajectories.png")) > 10_000
  on_disk = json.load(open(os.path.join(out, "summary.json")))
  assert on_disk["final"]["L0H0"] == pytest.approx(float(res.llc_mean[0, -1]))
  # The settings are config.llc with config.refined's overrides.
  assert res.settings["localization"] == 50.0 and res.settings["num_draws"] == 12
  # The report was rewritten with the head figures and the head table.
  report_dir = os.path.join(workdir, "report")
  for name in ("heads.png", "wrllc_dispersion.png", "overlap.png"):
    assert os.path.getsize(os.path.join(report_dir, name)) > 10_000, name
  report = json.load(open(os.path.join(report_dir, "report.json")))
  assert report["heads"]["final_llc"]["L0H1"] == pytest.approx(float(res.llc_mean[1, -1]))
  metrics = np.genfromtxt(os.path.join(report_dir, "metrics.csv"), delimiter=",", names=True)
  np.testing.assert_allclose(metrics["wrllc_head_variance"], res.llc_mean.var(0), rtol=1e-6)
  assert "wrLLC" in open(os.path.join(report_dir, "report.md")).read()
  with pytest.raises(ValueError, match="needs a restriction"):
    refined.run_refined(config, workdir)


def test_data_specs(trained):
  config, _ = trained
  base = icl_regression.sgld_dataset(config)
  same = icl_regression.dataset_from_spec(config, "input_gain=1")
  np.testing.assert_array_equal(base["xs"], same["xs"])
  ood = icl_regression.dataset_from_spec(config, "input_gain=2")
  np.testing.assert_allclose(ood["xs"], 2 * base["xs"], rtol=1e-6)
  finite = icl_regression.dataset_from_spec(config, "num_tasks=3,noise_variance=0")
  # Noise-free y = t·x with one of 3 tasks: least squares per sequence finds exactly 3.
  xs, ys = np.asarray(finite["xs"][:64]), np.asarray(finite["ys"][:64])
  tasks = np.stack([np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(xs, ys)])
  assert len({tuple(np.round(t, 3)) for t in tasks}) == 3
  with pytest.raises(ValueError, match="bad data spec"):
    icl_regression.dataset_from_spec(config, "gain=2")
  with pytest.raises(ValueError, match="bad value"):
    icl_regression.dataset_from_spec(config, "num_tasks=many")


def test_data_refined_launcher(trained):
  """--loss_data through the launcher; input_gain=1 reproduces the plain LLC exactly."""
  config, workdir = trained
  steps, names, plain, _ = refined.estimate_refined(config, workdir, data="input_gain=1")
  assert names is None and plain.llc_mean.shape == (len(steps),)
  cmd = [
    sys.executable,
    os.path.join(ROOT, "launch", "estimate_llc.py"),
    f"--config={os.path.join(ROOT, 'configs', 'icl_regression.py')}:runlocal",
    f"--workdir={workdir}",
    "--loss_data=input_gain=1",
  ]
  cmd += [f"--config.{k}={v}" for k, v in _overrides(config).items()]
  subprocess.run(
    cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True
  )
  res = LLCResult.load(os.path.join(workdir, "drllc_input_gain1", "llc.npz"))
  np.testing.assert_allclose(res.llc_per_chain, plain.llc_per_chain, rtol=1e-5, atol=1e-5)
  ood = refined.estimate_refined(config, workdir, loss_data="input_gain=2")[2]
  assert np.all(np.abs(ood.llc_mean - plain.llc_mean) > 1e-3)  # other data, other numbers


def _overrides(config):
  """Command-line overrides that turn runlocal into the tiny test config."""
  flat = {}
  for section in ("model", "train", "llc", "refined"):
    for k, v in config[section].items():
      flat[f"{section}.{k}"] = v
  return {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in flat.items()}
