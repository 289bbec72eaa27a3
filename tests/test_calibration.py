"""Calibration: one batched grid program, recommendation rule, settings check."""

import json
import os

import jax.numpy as jnp
import numpy as np

import devinterp_jax as dj

H = jnp.linspace(0.5, 2.0, 10)


def quad_loss(p, b):
  return 0.5 * jnp.sum(H * jnp.square(p["w"]))


CKPTS = [{"w": jnp.zeros(10)}, {"w": jnp.full(10, 0.01)}]
KW = dict(num_chains=4, num_draws=2000, batch_size=1, chain_strategy="vmap",
          num_burnin_steps=200)


def test_grid_recommendation_and_outputs(tmp_path):
  res = dj.calibrate(quad_loss, CKPTS, lambda key: None,
                     step_sizes=[1e-6, 1e-3, 1e-2, 3e-2], nbetas=[10.0, 100.0],
                     localizations=[1.0], output_dir=str(tmp_path), **KW)
  assert res.llc_mean.shape == (4, 2, 1, 2) and res.status.shape == (4, 2, 1, 2, 4)
  # Rule: per (nβ, γ) the largest passing ε; overall the largest nβ with a passing ε.
  for row, j in zip(res.per_setting, range(2)):
    ok = np.flatnonzero(res.passes[:, j, 0])
    assert row["step_size"] == res.step_sizes[ok[-1]]
    assert not res.passes[ok[-1] + 1:, j, 0].any()
  assert res.recommended["nbeta"] == 100.0
  # At nβ = 100, ε = 3e-2 diverges and ε = 1e-2 has low MALA acceptance: both fail.
  assert not res.passes[2:, 1, 0].any() and res.recommended["step_size"] == 1e-3
  assert "diverged" in res.reasons["3,1,0"] and "MALA" in res.reasons["2,1,0"]
  # Too small a step does not converge within the chain.
  assert "not-converged" in res.reasons["0,0,0"]
  on_disk = json.load(open(tmp_path / "calibration.json"))
  assert on_disk["recommended"] == res.recommended
  for name in ("calibration.md", "calibration_llc_vs_step_size.png", "calibration_traces.png"):
    assert os.path.getsize(tmp_path / name) > 500


def test_grid_point_equals_a_separate_estimate():
  res = dj.calibrate(quad_loss, CKPTS, lambda key: None, step_sizes=[1e-3, 2e-3],
                     nbetas=[50.0], localizations=[1.0, 5.0], seed=7, **KW)
  single = dj.estimate_llcs(quad_loss, CKPTS, lambda key: None, step_size=2e-3, nbeta=50.0,
                            localization=5.0, seed=7, progress=False, **KW)
  np.testing.assert_allclose(res.llc_mean[1, 0, 1], single.llc_mean, rtol=1e-5)


def test_check_settings_of_a_finished_sweep():
  good = dj.estimate_llcs(quad_loss, CKPTS, lambda key: None, step_size=1e-3, nbeta=100.0,
                          localization=1.0, progress=False, **KW)
  assert dj.check_settings(good)["passes"]
  coarse = dj.estimate_llcs(quad_loss, CKPTS, lambda key: None, step_size=1e-2, nbeta=100.0,
                            localization=1.0, progress=False, **KW)
  out = dj.check_settings(coarse)
  assert not out["passes"] and "MALA" in out["reasons"][0]
