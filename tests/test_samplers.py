"""The underdamped samplers (SGHMC, SGNHT) against exact expectations.

Each integrator is compared with its own stationary law where that is known in
closed form: on a quadratic the folded BAOAB step is a linear recurrence whose
stationary covariance solves a discrete Lyapunov equation (exact for every ε,
and including minibatch-gradient noise), and with the same quadrature as SGLD's
tests on normal crossings. Target: within 5 %.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import devinterp_jax as dj
from devinterp_jax.sampling import observers, samplers, underdamped
from tests.test_estimator_exact import quadrature_expectation


def baoab_position_variance(k, eps, friction, grad_noise_var=0.0):
  """Stationary Var(w) of the folded BAOAB step on U = k w²/2 (1-D), with Gaussian
  gradient noise of variance `grad_noise_var` in the kick (Chen et al.'s β̂ = 0)."""
  h = np.sqrt(eps)
  c = np.exp(-friction * h)
  s = np.sqrt(1 - c * c)
  a = np.array([[1 - (1 + c) * h * h * k / 2, h * (1 + c) / 2], [-c * h * k, c]])
  sv = np.sqrt(grad_noise_var)
  b = np.array([[-(h * h / 2) * (1 + c) * sv, h * s / 2], [-c * h * sv, s]])
  return scipy.linalg.solve_discrete_lyapunov(a, b @ b.T)[0, 0]


def test_lyapunov_reference_is_exact_for_baoab_and_reproduces_known_limits():
  # BAOAB samples a quadratic exactly in position, whatever ε and friction.
  for k, eps, fr in [(1.0, 1e-2, 2.0), (150.0, 5e-3, 0.3), (150.0, 1e-2, 30.0)]:
    np.testing.assert_allclose(baoab_position_variance(k, eps, fr), 1 / k, rtol=1e-9)
  # Gradient noise heats it: ≈ 1 + h V / (2α) for small h.
  k, eps, fr, v = 100.0, 1e-4, 2.0, 4.0
  ratio = baoab_position_variance(k, eps, fr, v) * k
  np.testing.assert_allclose(ratio, 1 + np.sqrt(eps) * v / (2 * fr) / k * k, rtol=0.02)


def _quadratic(d=10):
  h = jnp.linspace(1.0, 2.0, d)
  loss = lambda p, b: 0.5 * jnp.sum(h * jnp.square(p["w"])) + jnp.sum(p["w"] * b["b"][0])
  return h, loss


@pytest.mark.parametrize("name", ["sghmc", "sgnht"])
@pytest.mark.parametrize("eps", [2e-4, 5e-3])
def test_quadratic_matches_the_integrators_exact_expectation(name, eps):
  """Exact gradients: the position law is exact, so λ̂ = ½ Σ nβh/(nβh + γ) at any ε,
  where SGLD's own stationary value is ½ Σ nβh/k/(1 − εk/4) (+23 % at ε = 5e-3)."""
  d, nbeta, gamma = 10, 100.0, 1.0
  h, loss = _quadratic(d)
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(d)},
    {"b": jnp.zeros((8, d))},
    num_chains=32,
    num_draws=4000,
    num_burnin_steps=500,
    step_size=eps,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    sampler=name,
  )
  k = nbeta * np.asarray(h) + gamma
  exact = 0.5 * np.sum(nbeta * np.asarray(h) / k)
  sgld_value = 0.5 * np.sum(nbeta * np.asarray(h) / k / (1 - eps * k / 4))
  assert abs(res.llc_mean - exact) / exact < 0.05, (res.llc_mean, exact)
  if eps > 1e-3:
    assert abs(sgld_value - exact) / exact > 0.2  # the case SGLD cannot pass
  assert res.llc_sem < 0.05 * exact / 2.5


def test_minibatch_noise_heats_sghmc_as_predicted_and_sgnht_removes_it():
  d, nbeta, gamma, eps = 10, 100.0, 1.0, 1e-3
  h, loss = _quadratic(d)
  sigma = 0.08
  signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(64, d))
  data = {"b": jnp.asarray(np.concatenate([signs, -signs]) * sigma, jnp.float32)}
  v = (nbeta * sigma) ** 2  # the variance of nβ ∇L_B per coordinate
  k = nbeta * np.asarray(h) + gamma
  exact = 0.5 * np.sum(nbeta * np.asarray(h) / k)
  alpha = 2 * np.sqrt(gamma)
  heated = 0.5 * np.sum(
    [nbeta * hi * baoab_position_variance(ki, eps, alpha, v) for hi, ki in zip(np.asarray(h), k)]
  )
  assert heated / exact - 1 > 0.15  # a bias the test can see
  run = lambda name: dj.estimate_llc(
    loss,
    {"w": jnp.zeros(d)},
    data,
    num_chains=32,
    num_draws=6000,
    num_burnin_steps=1000,
    step_size=eps,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    sampler=name,
  )
  hmc, nht = run("sghmc"), run("sgnht")
  assert abs(hmc.llc_mean - heated) / heated < 0.05, (hmc.llc_mean, heated)
  assert abs(nht.llc_mean - exact) / exact < 0.05, (nht.llc_mean, exact)


@pytest.mark.parametrize("name", ["sghmc", "sgnht"])
@pytest.mark.parametrize(
  "powers,gamma,eps", [((1,), 1.0, 2.5e-4), ((1, 2), 10.0, 1e-3), ((2, 2), 10.0, 1e-3)]
)
def test_normal_crossings_match_quadrature(name, powers, gamma, eps):
  nbeta = 100.0
  p = jnp.asarray(powers)
  loss = lambda params, batch: jnp.prod(params["w"] ** (2 * p))
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(len(powers))},
    lambda key: None,
    num_chains=64,
    num_draws=10_000,
    num_burnin_steps=1_000,
    step_size=eps,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    chain_strategy="vmap",
    mala_stride=100,
    sampler=name,
  )
  exact = quadrature_expectation(powers, nbeta, gamma)
  assert res.llc_sem < 0.05 * exact / 2.5
  assert abs(res.llc_mean - exact) / exact < 0.05, (res.llc_mean, exact)
  assert np.nanmin(res.mala_acceptance) > 0.98


def test_leapfrog_check_has_the_law_of_exact_mala():
  """At equilibrium the leapfrog acceptance from the step-boundary momentum matches
  MALA's from exact posterior samples at the same ε (so the [0.95, 1] band carries over)."""
  d, nbeta, gamma, eps = 10, 100.0, 1.0, 2e-3
  h, loss = _quadratic(d)
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(d)},
    {"b": jnp.zeros((8, d))},
    num_chains=64,
    num_draws=3000,
    num_burnin_steps=500,
    step_size=eps,
    localization=gamma,
    nbeta=nbeta,
    batch_size=1,
    sampler="sghmc",
    mala_stride=5,
  )
  k = nbeta * np.asarray(h) + gamma
  rng = np.random.default_rng(1)
  w = rng.normal(size=(400_000, d)) / np.sqrt(k)
  prop = w - 0.5 * eps * k * w + np.sqrt(eps) * rng.normal(size=w.shape)
  u = lambda x: 0.5 * np.sum(k * x * x, -1)
  log_q = lambda to, frm: -np.sum((to - frm + 0.5 * eps * k * frm) ** 2, -1) / (2 * eps)
  mala = np.mean(np.minimum(1, np.exp(u(w) - u(prop) + log_q(w, prop) - log_q(prop, w))))
  measured = float(np.nanmean(res.mala_acceptance))
  assert 0.9 < mala < 0.97  # a regime where the check decides
  assert abs(measured - mala) < 0.01, (measured, mala)


def _run_transform(transform, params, grads_fn, steps, mask, key=0):
  """(w, state, ξ_t, K_t): a bare transformation driven by `grads_fn(w, key)`."""
  state = transform.init(params)
  star = jnp.zeros_like(params)
  real = jnp.sum(mask)

  def body(carry, t):
    w, s = carry
    g = mask * grads_fn(w, jax.random.fold_in(jax.random.key(key + 1), t))
    upd, s = transform.update(
      g, s, w, params_star=star, noise_key=jax.random.fold_in(jax.random.key(key), t), mask=mask
    )
    return (w + upd, s), (s.thermostat, jnp.sum(mask * s.momentum**2) / real)

  (w, s), (xi, kinetic) = jax.lax.scan(body, (params, state), jnp.arange(steps))
  return w, s, xi, kinetic


def test_thermostat_is_per_chain_and_ignores_restriction_padding():
  """Two vmapped chains with gradient noise of different size settle at different ξ
  (never pooled): ξ ≈ A + h V / 2, where the kick's noise h²V per step balances the
  extra friction, each with mean kinetic energy 1 over its own real coordinates;
  padded coordinates keep zero momentum and never move."""
  d, nbeta, eps = 200, 100.0, 1e-3
  mask = jnp.concatenate([jnp.ones(150), jnp.zeros(50)])
  transform = underdamped.sgnht(eps, nbeta, 1.0)

  def chain(noise_scale):
    grads_fn = lambda w, key: w + noise_scale * jax.random.normal(key, w.shape)
    return _run_transform(transform, jnp.zeros(d), grads_fn, 20_000, mask)

  scales = np.array([0.0, 0.06])
  w, state, xi, kinetic = jax.vmap(chain)(jnp.asarray(scales))
  predicted = 2.0 + np.sqrt(eps) * (nbeta * scales) ** 2 / 2  # A = 2√γ = 2
  np.testing.assert_allclose(xi[:, 10_000:].mean(axis=1), predicted, rtol=0.1)
  assert predicted[1] - predicted[0] > 0.5
  np.testing.assert_allclose(kinetic[:, 10_000:].mean(axis=1), 1.0, atol=0.03)
  assert float(jnp.abs(state.momentum[:, 150:]).max()) == 0.0
  assert float(jnp.abs(w[:, 150:]).max()) == 0.0


def test_state_is_at_least_float32_and_follows_x64():
  params = {"w": jnp.zeros(3, jnp.bfloat16)}
  for factory in (underdamped.sghmc, underdamped.sgnht):
    state = factory(1e-3, 1.0, 1.0).init(params)
    assert state.momentum["w"].dtype == jnp.float32
  with jax.enable_x64(True):
    state = underdamped.sgnht(1e-3, 1.0, 1.0).init({"w": jnp.zeros(3, jnp.float64)})
    assert state.momentum["w"].dtype == jnp.float64
    assert state.thermostat.dtype == jnp.float64


def test_samplers_by_name_with_options_and_step_checks():
  assert samplers.step_check("sgld") == "mala"
  assert samplers.step_check("sghmc") == samplers.step_check("sgnht") == "leapfrog"
  a = samplers.get_sampler("sghmc", friction=3.0)
  assert a is samplers.get_sampler("sghmc", friction=3.0)  # programs are reused
  assert samplers.step_check(a) == "leapfrog"
  with pytest.raises(ValueError, match="takes no option"):
    samplers.get_sampler("sgld", friction=1.0)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.get_sampler("hmc")
  assert samplers.from_config({"sampler": "sgnht", "friction": 0.0}) is underdamped.sgnht
  assert observers.step_check("leapfrog") is not None


def test_friction_sets_the_momentum_decay_and_high_friction_is_sgld_like():
  """friction → ∞ gives SGLD's drift and diffusion per step: on a quadratic with
  exact gradients the mean squared distance matches the prior's d/γ either way."""
  d, gamma, eps = 20, 10.0, 4e-3
  flat = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * jnp.sum(b["x"])
  data = {"x": jnp.zeros((8, 1))}
  for friction in (1.0, 1e4):
    res = dj.estimate_llc(
      flat,
      {"w": jnp.zeros(d)},
      data,
      num_chains=16,
      num_draws=4000,
      num_burnin_steps=1000,
      step_size=eps,
      localization=gamma,
      nbeta=1.0,
      batch_size=1,
      sampler=samplers.get_sampler("sghmc", friction=friction),
    )
    np.testing.assert_allclose(np.mean(np.square(res.distance)), d / gamma, rtol=0.05)
