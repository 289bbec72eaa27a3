"""Calibration: one batched grid program, recommendation rule, settings check."""

import json
import os

import jax.numpy as jnp
import numpy as np

import devinterp_jax as dj
from devinterp_jax.viz import llc as llc_viz

H = jnp.linspace(0.5, 2.0, 10)


def quad_loss(p, b):
  return 0.5 * jnp.sum(H * jnp.square(p["w"]))


CKPTS = [{"w": jnp.zeros(10)}, {"w": jnp.full(10, 0.01)}]
KW = dict(num_chains=4, num_draws=2000, batch_size=1, chain_strategy="vmap", num_burnin_steps=200)


def test_grid_recommendation_and_outputs(tmp_path):
  res = dj.calibrate(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_sizes=[1e-6, 1e-3, 1e-2, 3e-2],
    nbetas=[10.0, 100.0],
    localizations=[1.0],
    output_dir=str(tmp_path),
    **KW,
  )
  assert res.llc_mean.shape == (4, 2, 1, 2) and res.status.shape == (4, 2, 1, 2, 4)
  # Rule: per (nβ, γ) the largest passing ε; overall the largest nβ with a passing ε.
  for row, j in zip(res.per_setting, range(2)):
    ok = np.flatnonzero(res.passes[:, j, 0])
    assert row["step_size"] == res.step_sizes[ok[-1]]
    assert not res.passes[ok[-1] + 1 :, j, 0].any()
  assert res.recommended["nbeta"] == 100.0
  # At nβ = 100, ε = 3e-2 diverges and ε = 1e-2 has low MALA acceptance: both fail.
  assert not res.passes[2:, 1, 0].any() and res.recommended["step_size"] == 1e-3
  assert "diverged" in res.reasons["3,1,0"] and "MALA" in res.reasons["2,1,0"]
  # Too small a step does not converge within the chain.
  assert "not-converged" in res.reasons["0,0,0"]
  on_disk = json.load(open(tmp_path / "calibration.json"))
  assert on_disk["recommended"] == res.recommended
  # calibrate writes the tables; the figures are the caller's (sampling does not plot).
  assert sorted(os.listdir(tmp_path)) == ["calibration.json", "calibration.md"]
  pngs = llc_viz.plot_calibration(res, str(tmp_path))
  assert [os.path.basename(p) for p in pngs] == [
    "calibration_llc_vs_step_size.png",
    "calibration_traces.png",
  ]
  for name in ("calibration.md", "calibration_llc_vs_step_size.png", "calibration_traces.png"):
    assert os.path.getsize(tmp_path / name) > 500


def test_grid_point_equals_a_separate_estimate():
  res = dj.calibrate(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_sizes=[1e-3, 2e-3],
    nbetas=[50.0],
    localizations=[1.0, 5.0],
    seed=7,
    **KW,
  )
  single = dj.estimate_llcs(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_size=2e-3,
    nbeta=50.0,
    localization=5.0,
    seed=7,
    progress=False,
    **KW,
  )
  np.testing.assert_allclose(res.llc_mean[1, 0, 1], single.llc_mean, rtol=1e-5)


def test_check_settings_of_a_finished_sweep():
  good = dj.estimate_llcs(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_size=1e-3,
    nbeta=100.0,
    localization=1.0,
    progress=False,
    **KW,
  )
  assert dj.check_settings(good)["passes"]
  coarse = dj.estimate_llcs(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_size=1e-2,
    nbeta=100.0,
    localization=1.0,
    progress=False,
    **KW,
  )
  out = dj.check_settings(coarse)
  assert not out["passes"] and "MALA" in out["reasons"][0]


def test_calibration_needs_four_chains_and_checks_three_spread_checkpoints():
  import pytest
  from devinterp_jax.sampling import calibration

  with pytest.raises(ValueError, match="num_chains >= 4"):
    dj.calibrate(
      quad_loss,
      CKPTS,
      lambda key: None,
      step_sizes=[1e-3],
      nbetas=[10.0],
      localizations=[1.0],
      **{**KW, "num_chains": 2},
    )
  assert calibration.spread_indices(22) == (0, 10, 21)
  assert calibration.spread_indices(2) == (0, 1) and calibration.spread_indices(1) == (0,)


def test_acceptance_must_clear_the_band_by_two_standard_errors():
  """A mean acceptance 0.955 with MCSE 0.004 is inside [0.95, 1] but not by 2 SE."""
  import dataclasses
  from devinterp_jax.sampling import calibration

  res = dj.estimate_llcs(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_size=1e-3,
    nbeta=100.0,
    localization=1.0,
    progress=False,
    **KW,
  )
  edge = dataclasses.replace(
    res, mala_acceptance=np.full_like(res.mala_acceptance, 0.955), mala_se=np.full(2, 0.004)
  )
  assert calibration.check_settings(edge, margin_se=0.0)["passes"]
  out = calibration.check_settings(edge, margin_se=2.0)
  assert not out["passes"] and "by 2 SE" in out["reasons"][0] and "MALA" in out["reasons"][0]
  # An acceptance near 1 never fails the upper edge of a band ending at 1.
  high = dataclasses.replace(
    res, mala_acceptance=np.full_like(res.mala_acceptance, 0.999), mala_se=np.full(2, 0.004)
  )
  assert calibration.check_settings(high)["passes"]


def test_acceptance_standard_error_matches_iid_samples_and_grid_reports_draw_cost():
  from devinterp_jax.sampling import results

  rng = np.random.default_rng(0)
  samples = rng.uniform(0.9, 1.0, size=(3, 4, 500))
  samples[:, :, 0] = np.nan  # an unmeasured first step is dropped
  se = results.acceptance_se(samples)
  expected = samples[:, :, 1:].reshape(3, -1).std(-1) / np.sqrt(4 * 499)
  np.testing.assert_allclose(se, expected, rtol=0.15)
  res = dj.calibrate(
    quad_loss,
    CKPTS,
    lambda key: None,
    step_sizes=[3e-4, 1e-3],
    nbetas=[100.0],
    localizations=[1.0],
    **KW,
  )
  need = res.draws_needed[:, 0, 0]
  assert np.all(np.isfinite(need)) and np.all(need >= 400)
  assert need[0].max() > need[1].max()  # a smaller ε needs more draws
  assert res.step_check == "mala" and res.mala_se.shape == res.mala_acceptance.shape
