"""The sampler against exact expectations of the tempered, localised posterior.

For finite nβ and γ the estimator targets E[nβ (L − L*)] under
p(w) ∝ exp(−nβ L(w) − (γ/2)‖w − w*‖²): closed form for quadratics, numerical
quadrature for normal crossings. Target: within 5 % in every case.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import devinterp_jax as dj


def quadrature_expectation(powers, nbeta, gamma, n=1201):
  """E[nβ L] for L = Π w_i^(2 p_i) under exp(−nβ L − γ‖w‖²/2), on a grid."""
  half = 7.0 / np.sqrt(gamma)
  g = np.linspace(-half, half, n)
  grids = np.meshgrid(*([g] * len(powers)), indexing="ij")
  loss = np.prod([w ** (2 * p) for w, p in zip(grids, powers)], axis=0)
  logp = -nbeta * loss - 0.5 * gamma * sum(w**2 for w in grids)
  weights = np.exp(logp - logp.max())
  return float((weights * nbeta * loss).sum() / weights.sum())


def test_quadrature_reproduces_closed_forms():
  # p = 1 in 1-D is a quadratic with h = 2: ½ · 1/(1 + γ/(2nβ)).
  assert abs(quadrature_expectation((1,), 100.0, 1.0) - 0.5 / (1 + 1 / 200)) < 1e-6


@pytest.mark.parametrize(
  "powers,gamma,eps",
  [
    ((1,), 1.0, 2.5e-4),
    ((2,), 1.0, 2.5e-4),
    ((1, 1), 10.0, 1e-3),
    ((1, 2), 10.0, 1e-3),
    ((2, 2), 10.0, 1e-3),
  ],
)
def test_normal_crossings_match_quadrature(powers, gamma, eps):
  nbeta = 100.0
  p = jnp.asarray(powers)
  loss = lambda params, batch: jnp.prod(params["w"] ** (2 * p))
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(len(powers))},
    lambda key: None,
    num_chains=128,
    num_draws=40_000,
    num_burnin_steps=2_000,
    step_size=eps,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    chain_strategy="vmap",
    mala_stride=100,
  )
  exact = quadrature_expectation(powers, nbeta, gamma)
  assert res.llc_sem < 0.05 * exact / 2.5  # the 5 % band spans > 2.5 standard errors
  assert abs(res.llc_mean - exact) / exact < 0.05, (res.llc_mean, exact)
  assert (res.status == 0).mean() > 0.97  # healthy chains are rarely flagged
  assert res.mala_acceptance.min() > 0.99


def test_prior_sampling_with_a_flat_loss():
  """A constant loss: the chain samples N(w*, I/γ), so E‖w − w*‖² = d/γ (the recorded
  distance ‖w − w*‖ per draw; nβ must be > 0, and multiplies a zero gradient)."""
  d, gamma, eps = 20, 10.0, 4e-3
  w_star = {"w": jnp.arange(d, dtype=jnp.float32) / d}
  flat = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * jnp.sum(b["x"])
  data = {"x": jnp.zeros((8, 1))}
  res = dj.estimate_llc(
    flat,
    w_star,
    data,
    num_chains=16,
    num_draws=4000,
    num_burnin_steps=1000,
    step_size=eps,
    localization=gamma,
    nbeta=1.0,
    batch_size=1,
  )
  measured = np.mean(np.square(res.distance))
  # Exact for the discretised OU process: variance 1/(γ(1 − εγ/4)) per coordinate.
  np.testing.assert_allclose(measured, d / (gamma * (1 - eps * gamma / 4)), rtol=0.05)
  np.testing.assert_allclose(measured, d / gamma, rtol=0.05)


def test_regular_quadratic_matches_exact_expectation():
  """λ̂ → ½ Σ 1/(1 + γ/(nβ h_i)) for L = ½ Σ h_i w_i² (→ d/2 as γ/nβ → 0)."""
  d, nbeta, gamma = 10, 100.0, 1.0
  h = jnp.linspace(1.0, 2.0, d)
  loss = lambda p, b: 0.5 * jnp.sum(h * jnp.square(p["w"])) + 0.0 * jnp.sum(b["x"])
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(d)},
    {"x": jnp.zeros((8, 1))},
    num_chains=32,
    num_draws=4000,
    num_burnin_steps=500,
    step_size=2e-4,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
  )
  exact = 0.5 * np.sum(1.0 / (1.0 + gamma / (nbeta * np.asarray(h))))
  np.testing.assert_allclose(res.llc_mean, exact, rtol=0.05)
  assert abs(res.llc_mean - d / 2) / (d / 2) < 0.05
  assert res.init_loss.shape == (32,) and np.allclose(res.init_loss, 0.0)


def test_rmsprop_sgld_on_a_quadratic():
  """The preconditioned sampler targets the same posterior (small step: 5 %)."""
  d, nbeta, gamma = 10, 100.0, 1.0
  h = jnp.linspace(1.0, 2.0, d)
  loss = lambda p, b: 0.5 * jnp.sum(h * jnp.square(p["w"]))
  sampler = functools.partial(dj.rmsprop_sgld, alpha=0.99, eps=1.0)
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(d)},
    lambda key: None,
    num_chains=32,
    num_draws=4000,
    num_burnin_steps=500,
    step_size=2e-4,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    sampler=sampler,
    chain_strategy="vmap",
  )
  exact = 0.5 * np.sum(1.0 / (1.0 + gamma / (nbeta * np.asarray(h))))
  np.testing.assert_allclose(res.llc_mean, exact, rtol=0.05)
  assert res.settings["sampler"].startswith("rmsprop_sgld")
