"""Chain diagnostics: health classification, MALA acceptance, norms, trace plots."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import devinterp_jax as dj
from devinterp_jax.sampling import convergence, diagnostics
from devinterp_jax.viz import llc as llc_viz


def _traces(seed=0, t=400):
  """Synthetic traces [6 chains, t] around L* = 1 (nβ = 100) and their init losses."""
  rng = np.random.default_rng(seed)
  noise = 0.002 * rng.standard_normal((6, t))
  ramp = np.linspace(0, 1, t)
  loss = np.stack(
    [
      1.05 + noise[0],  # ok: λ̂ ≈ 5
      0.999 + noise[1],  # negative: λ̂ ≈ −0.1, not "well below"
      1.0 + 0.1 * ramp + noise[2],  # not converged: still rising
      1.05 - 0.2 * (ramp > 0.3) + noise[3],  # escaped: falls to 0.85 and stays
      1.05 + noise[4],  # diverged: a NaN
      1.0 + 10.0 * ramp**2 + noise[5],  # diverged: blown up (finite)
    ]
  )
  loss[4, 123] = np.nan
  init = 1.0 + 0.002 * rng.standard_normal((6, 40))
  return loss, init


def test_health_classification_of_constructed_traces():
  loss, init = _traces()
  h = diagnostics.chain_health(loss, init, nbeta=100.0, num_params=50)
  names = [diagnostics.STATUS_NAMES[s] for s in h["status"]]
  # Convergence is a property of a checkpoint's chains together (`assess`), not of one
  # chain: the still-rising chain is "ok" here and "not_converged" once its checkpoint is.
  assert names == ["ok", "negative", "ok", "escaped", "diverged", "diverged"]
  flagged = diagnostics.chain_health(loss, init, 100.0, 50, not_converged=True)
  assert [diagnostics.STATUS_NAMES[s] for s in flagged["status"]] == [
    "not_converged",
    "not_converged",
    "not_converged",
    "escaped",
    "diverged",
    "diverged",
  ]
  # Several seeds: the healthy chain is never flagged.
  for seed in range(1, 20):
    loss, init = _traces(seed)
    assert diagnostics.chain_health(loss, init, 100.0, 50)["status"][0] == diagnostics.OK


def test_online_llc_trace_ends_at_the_estimate():
  loss, init = _traces()
  trace = diagnostics.online_llc(loss[:4], init[:4].mean(-1), 100.0)
  np.testing.assert_allclose(trace[:, -1], 100.0 * (loss[:4].mean(-1) - init[:4].mean(-1)))
  np.testing.assert_allclose(trace[:, 0], 100.0 * (loss[:4, 0] - init[:4].mean(-1)))


def test_escape_from_a_point_that_is_not_a_minimum():
  """w* = 0 on L = ½‖w − 1‖²: the chains slide downhill and are flagged escaped."""
  loss = lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"] - 1.0))
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(4)},
    lambda key: None,
    num_chains=4,
    num_draws=2000,
    step_size=1e-3,
    localization=0.1,
    nbeta=100.0,
    batch_size=1,
    chain_strategy="vmap",
  )
  assert res.escaped.all() and res.negative.all()  # flags combine; status is the worst
  assert (res.status == diagnostics.ESCAPED).all() and res.llc_mean < 0


def test_slow_chain_is_flagged_not_converged():
  """ε far too small: the loss is still rising when the chain ends."""
  loss = lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"]))
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(200)},
    lambda key: None,
    num_chains=4,
    num_draws=400,
    step_size=1e-6,
    localization=1.0,
    nbeta=100.0,
    batch_size=1,
    chain_strategy="vmap",
  )
  assert res.not_converged.all()
  assert res.convergence["status"] == convergence.NOT_CONVERGED
  assert "still relaxing" in str(res.convergence["reason"])
  # thinning 5: ESS ≈ 600 per chain, where the R̂ < 1.01 cut is not noise
  good = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(20)},
    lambda key: None,
    num_chains=4,
    num_draws=2000,
    thinning=5,
    step_size=1e-3,
    localization=1.0,
    nbeta=100.0,
    batch_size=1,
    chain_strategy="vmap",
  )
  assert good.convergence["status"] == convergence.CONVERGED, good.convergence["reason"]
  assert (good.status == diagnostics.OK).all()


def test_blown_up_chain_is_diverged_and_named():
  """A chain whose loss runs far above its start (finite values) is excluded."""
  # The sampler cannot see this loss (no gradient), so w random-walks upward in loss.
  loss = lambda p, b: 1e3 * jnp.sum(jnp.square(jax.lax.stop_gradient(p["w"])))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = dj.estimate_llcs(
      loss,
      [{"w": jnp.zeros(3)}],
      lambda key: None,
      num_chains=2,
      num_draws=200,
      step_size=1e-3,
      localization=0.0,
      nbeta=10.0,
      batch_size=1,
      progress=False,
      checkpoint_ids=["step 77"],
    )
  assert res.diverged.all() and np.isnan(res.llc_mean[0]) and np.isfinite(res.loss_trace).all()
  assert any("step 77" in str(w.message) for w in caught)


def test_mala_acceptance_matches_hand_computation():
  """1-D quadratic U(w) = a w²/2: compare with the formula written out."""
  a, eps, w, w_new = 3.0, 0.1, 0.7, 0.5
  u = lambda x: 0.5 * a * x**2
  log_q = lambda to, frm: -((to - frm + 0.5 * eps * a * frm) ** 2) / (2 * eps)
  expected = min(0.0, u(w) - u(w_new) + log_q(w, w_new) - log_q(w_new, w))
  got = dj.mala_log_acceptance(
    {"w": jnp.float32(w)},
    {"w": jnp.float32(w_new)},
    jnp.float32(u(w)),
    jnp.float32(u(w_new)),
    {"w": jnp.float32(a * w)},
    {"w": jnp.float32(a * w_new)},
    eps,
  )
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_mala_acceptance_falls_with_step_size_and_norms_are_recorded():
  h = jnp.linspace(0.5, 2.0, 10)
  loss = lambda p, b: 0.5 * jnp.sum(h * jnp.square(p["w"]))
  res = dj.estimate_llcs(
    loss,
    {"w": jnp.zeros((1, 10))},
    lambda key: None,
    num_chains=4,
    num_draws=1000,
    step_size=1e-4,
    localization=1.0,
    nbeta=100.0,
    batch_size=1,
    progress=False,
    chain_strategy="vmap",
  )
  accept = []
  for eps in (1e-4, 1e-3, 1e-2):
    r = dj.estimate_llc(
      loss,
      {"w": jnp.zeros(10)},
      lambda key: None,
      num_chains=4,
      num_draws=1000,
      step_size=eps,
      localization=1.0,
      nbeta=100.0,
      batch_size=1,
      chain_strategy="vmap",
    )
    accept.append(r.mala_acceptance.mean())
  assert accept[0] > 0.99 and accept[0] > accept[1] > accept[2]
  # ‖η‖ = √ε ‖ξ‖ ≈ √(ε d); the distance and gradient norms are finite and positive.
  np.testing.assert_allclose(res.noise_norm.mean(), np.sqrt(1e-4 * 10), rtol=0.05)
  assert res.distance.shape == res.loss_trace.shape and (res.grad_norm[..., 1:] > 0).all()


def test_mala_target_loss_separates_loss_from_localization():
  """In d = 10⁴ dimensions the (γ/2)‖w − w*‖² term alone makes the 'posterior'
  acceptance of a chain leaving w* low (εγ = 0.1), while 'loss' tests only
  nβ L: ~1 for a nearly flat loss, low for a loss ε cannot resolve."""
  d = 10_000

  def accept(h, target, eps=1e-3, gamma=100.0):
    loss = lambda p, b: 0.5 * h * jnp.sum(jnp.square(p["w"]))
    r = dj.estimate_llc(
      loss,
      {"w": jnp.zeros(d)},
      lambda key: None,
      num_chains=2,
      num_draws=100,
      step_size=eps,
      localization=gamma,
      nbeta=1.0,
      batch_size=1,
      mala_stride=5,
      mala_target=target,
      chain_strategy="vmap",
    )
    return float(r.mala_acceptance.mean())

  flat_posterior, flat_loss = accept(1e-3, "posterior"), accept(1e-3, "loss")
  assert flat_posterior < 0.7 and flat_loss > 0.99
  # A sharp loss (ε nβ h = 0.3 in 10⁴ dims) is rejected under 'loss' too.
  assert accept(300.0, "loss", gamma=1.0) < 0.6
  # Without localisation the two targets are the same test.
  np.testing.assert_allclose(
    accept(300.0, "loss", gamma=0.0), accept(300.0, "posterior", gamma=0.0), atol=1e-6
  )


def test_mala_target_is_checked():
  loss = lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"]))
  with np.testing.assert_raises_regex(ValueError, "mala_target"):
    dj.estimate_llc(
      loss,
      {"w": jnp.zeros(3)},
      lambda key: None,
      num_chains=1,
      num_draws=5,
      step_size=1e-3,
      localization=1.0,
      nbeta=1.0,
      batch_size=1,
      mala_target="full",
    )


def test_diagnostics_off_and_mala_off():
  loss = lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"]))
  res = dj.estimate_llc(
    loss,
    {"w": jnp.zeros(3)},
    lambda key: None,
    num_chains=2,
    num_draws=50,
    step_size=1e-3,
    localization=1.0,
    nbeta=10.0,
    batch_size=1,
    diagnostics=False,
    mala_stride=0,
  )
  assert res.distance is None and np.isnan(res.mala_acceptance).all()


def test_trace_plot_is_written(tmp_path):
  loss, init = _traces()
  res = dj.estimate_llcs(
    lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"])),
    {"w": jnp.zeros((3, 4))},
    lambda key: None,
    num_chains=3,
    num_draws=100,
    step_size=1e-3,
    localization=1.0,
    nbeta=100.0,
    batch_size=1,
    progress=False,
  )
  path = llc_viz.plot_llc_traces(res, str(tmp_path / "traces.png"), labels=["a", "b", "c"])
  assert (tmp_path / "traces.png").stat().st_size > 10_000 and path.endswith("traces.png")


def test_drift_shared_by_the_chains_is_flagged():
  """A slow rise shared by 4 chains fails the drift test; the same noise without it passes."""
  rng = np.random.default_rng(0)
  c, t, phi, sd = 4, 2000, 0.5, 0.005
  noise = np.zeros((c, t))
  for i in range(1, t):  # AR(1), τ = 3
    noise[:, i] = phi * noise[:, i - 1] + sd * np.sqrt(1 - phi**2) * rng.standard_normal(c)
  init = 1.0 + 0.001 * rng.standard_normal((c, 200))
  rising = diagnostics.assess(
    1.05 + 0.004 * np.linspace(0, 1, t) + noise, init, 100.0, 50, burnin=0
  )
  assert rising["status"] == convergence.NOT_CONVERGED and abs(rising["drift_z"]) > 3
  assert "drift" in rising["reason"]
  flat = diagnostics.assess(1.05 + noise, init, 100.0, 50, burnin=0)
  assert flat["status"] == convergence.CONVERGED, flat["reason"]
  few = diagnostics.assess((1.05 + noise)[:3], init[:3], 100.0, 50, burnin=0)
  assert few["status"] == convergence.UNCHECKED and "3 valid chains" in few["reason"]
