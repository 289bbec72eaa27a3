"""Underdamped Langevin samplers (SGHMC, SGNHT) as optax-style transformations.

Both sample the same target as SGLD, the localised tempered posterior
exp(−U(w)) with

    U(w) = nβ L_B(w) + (γ/2) ‖w − w*‖²,

extended by a momentum p ~ N(0, I) (unit mass), so the position marginal is
the posterior and the LLC estimator reads their draws exactly as SGLD's: the
position w_t after every step, its minibatch loss L_B(w_t), and
λ̂ = nβ (mean L − L(w*)).

Units. `step_size` is SGLD's ε (squared parameter units); the time step of the
dynamics is h = √ε, so a step moves w by about h·|p| ≈ √ε per coordinate, as
SGLD's noise does, and the stability limit is the same, ε·k < 4 for a
curvature k of U. `friction` α is per unit time: the momentum keeps
c = exp(−α h) of itself per step. As α → ∞ (c = 0) one step becomes
w' = w − (ε/2) ∇U(w) + √ε (R_t + R_{t+1})/2, the Leimkuhler–Matthews form
of SGLD with the same drift and the same diffusion per step as SGLD(ε). A
direction of curvature k relaxes in ≈ 2/(ε k) SGLD steps; at friction α it
relaxes in ≈ max(2/α, α/k) time units, i.e. ≈ 2/(α √ε) steps when α ≤ 2√k.
The default α = 2√γ damps the flattest possible direction (curvature γ, from
the localisation alone) critically, so every direction decays within about
1/(√γ √ε) steps instead of 2/(γ ε): for ε = 2e-4 and γ = 6.67, 27 steps
instead of 1,500.

Integrator (SGHMC): BAOAB (Leimkuhler & Matthews 2013), one gradient per step.
The gradient at w_t serves the closing half kick of step t − 1 and the opening
half kick of step t, so a step is

    p ← p − h ∇U(w)              B (two half kicks)
    w ← w + (h/2) p              A
    p ← c p + √(1 − c²) R        O (exact Ornstein–Uhlenbeck), R ~ N(0, I)
    w ← w + (h/2) p              A

On a quadratic U its position marginal is exact for every stable h (the
variance is 1/k, where SGLD's is 1/(k (1 − εk/4))); on other potentials its
configurational error is O(ε) with a small constant. Chen et al. (2014)'s
SGHMC is the Euler form of the same SDE with the noise covariance reduced by
their β̂, an estimate of the minibatch gradient noise. Here β̂ = 0: the
minibatch noise of nβ ∇L_B, of variance V per coordinate, adds h²·V to p per
step, which raises the sampled temperature by a factor ≈ 1 + h V/(2α), an
O(h) bias that SGLD shares (there 1 + εV/4). `sgnht` removes it.

Integrator (SGNHT, Ding et al. 2014): the same dynamics with the friction ξ a
dynamical variable, one scalar per chain, driven by the chain's kinetic energy

    dξ = (K − 1) dt,   K = (1/d) Σᵢ pᵢ²

over the d sampled coordinates of that chain (restriction padding excluded).
ξ rises when the minibatch noise heats the momentum and falls when it is
cold, so the temperature is 1 whatever V is. `friction` is the diffusion A:
the injected noise has variance 2A per unit time, and ξ starts at A (where it
stays without gradient noise). Integrated by BADODAB (Leimkuhler & Shang
2016), folded as above: B A D O D A with D: ξ ← ξ + (h/2)(K − 1) and
O: p ← e^{−ξh} p + √(A (1 − e^{−2ξh})/ξ) R, R ~ N(0, I). Unlike devinterp's SGNHT this
one keeps the localisation term γ in U, uses the diffusion given, and has one
thermostat per chain, never pooled across chains, checkpoints or restrictions
(each chain is its own transformation call).

State: the momentum (and the thermostat) are float32, or the params' dtype if
wider (float64 under x64); the first step draws p ~ N(0, I). The update
receives the restriction `mask` (0/1 over chain coordinates, or None) and
keeps the momentum of padded coordinates at 0.

Step-size check (`leapfrog_log_acceptance`): the Metropolis acceptance of one
leapfrog step (B(h/2) A(h) B(h/2)) from the chain's step-boundary pair
(w_t, p_t), p_t = p − (h/2) ∇U(w_t) with p the stored post-O momentum, on the
step's minibatch: min(1, exp(−ΔH)) with H = U + ½|p|². One leapfrog step of
HMC from p ~ N(0, I) is the MALA proposal with ε = h², so at equilibrium this
acceptance has the law of MALA's at the same ε, and the MALA band [0.95, 1]
carries over and means the same discretisation quality. tests/test_samplers.py
checks this against exact MALA on a quadratic; the post-O momentum alone
reads too low.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling.sgld import potential_grad, tree_norm, tree_normal_like
from devinterp_jax.typing import Params


class SGHMCState(NamedTuple):
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (a field, not tuple.count)
  noise_norm: jax.Array  # ‖h·√(1 − c²) ξ‖, the injected noise in position units
  momentum: Params  # p after the step (float32 or wider)
  precond: Any = None


class SGNHTState(NamedTuple):
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (a field, not tuple.count)
  noise_norm: jax.Array
  momentum: Params
  thermostat: jax.Array  # ξ, per unit time, one scalar per chain
  precond: Any = None


def state_dtype(x: jax.Array) -> jnp.dtype:
  """At least float32: the params' dtype if wider (float64 under x64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _default_friction(friction, localization):
  """α = 2√γ (critical damping of the localisation) unless given; 1 if γ = 0."""
  if friction is not None:
    return jnp.asarray(friction, jnp.float32)
  gamma = jnp.asarray(localization, jnp.float32)
  return jnp.where(gamma > 0, 2.0 * jnp.sqrt(gamma), 1.0)


def _zeros_momentum(params):
  return jax.tree.map(lambda w: jnp.zeros(w.shape, state_dtype(w)), params)


def _start_momentum(state_momentum, count, key, mask):
  """p ~ N(0, I) at the first step, the carried momentum after it."""
  return jax.lax.cond(
    count == 0,
    lambda: restrict_lib.apply(mask, tree_normal_like(key, state_momentum)),
    lambda: state_momentum,
  )


def _count(mask, params) -> jax.Array:
  if mask is None:
    return jnp.asarray(sum(x.size for x in jax.tree.leaves(params)), jnp.float32)
  return cast(jax.Array, sum(jnp.sum(m.astype(jnp.float32)) for m in jax.tree.leaves(mask)))


def _kick(p, grads, params, params_star, nbeta, localization, h):
  drift = potential_grad(grads, params, params_star, nbeta, localization)
  return jax.tree.map(lambda q, d: q - h * d.astype(q.dtype), p, drift)


def _drift(params, p, h):
  return jax.tree.map(lambda w, q: w + (0.5 * h * q).astype(w.dtype), params, p)


def _updates(new_params, params):
  return jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new_params, params)


def sghmc(
  step_size: float | jax.Array,
  nbeta: float | jax.Array,
  localization: float | jax.Array,
  *,
  friction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Underdamped Langevin (SGHMC with β̂ = 0), BAOAB; see the module docstring."""

  def init_fn(params):
    return SGHMCState(
      count=jnp.zeros((), jnp.int32),
      noise_norm=jnp.zeros((), jnp.float32),
      momentum=_zeros_momentum(params),
    )

  def update_fn(grads, state, params, *, params_star, noise_key, mask=None, **extra_args):
    del extra_args
    h = jnp.sqrt(jnp.asarray(step_size, jnp.float32))
    c = jnp.exp(-_default_friction(friction, localization) * h)
    init_key, o_key = jax.random.split(noise_key)
    p = _start_momentum(state.momentum, state.count, init_key, mask)
    p = _kick(p, grads, params, params_star, nbeta, localization, h)
    w = _drift(params, p, h)
    noise = jax.tree.map(lambda z: jnp.sqrt(1 - c * c) * z, tree_normal_like(o_key, p))
    noise = restrict_lib.apply(mask, noise)
    p = restrict_lib.apply(mask, jax.tree.map(lambda q, n: c * q + n, p, noise))
    w = _drift(w, p, h)
    return _updates(w, params), SGHMCState(
      count=state.count + 1, noise_norm=h * tree_norm(noise), momentum=p
    )

  # optax types update as (updates, state, params=None, **extra): ours requires its extra args.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def _thermostat_step(xi, p, h, d):
  kinetic = sum(jnp.sum(jnp.square(q)) for q in jax.tree.leaves(p)) / d
  return xi + 0.5 * h * (kinetic - 1.0)


def sgnht(
  step_size: float | jax.Array,
  nbeta: float | jax.Array,
  localization: float | jax.Array,
  *,
  friction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stochastic-gradient Nosé–Hoover thermostat, BADODAB; `friction` is the diffusion A."""

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    dtype = state_dtype(leaves[0]) if leaves else jnp.float32
    diffusion = _default_friction(friction, localization)
    return SGNHTState(
      count=jnp.zeros((), jnp.int32),
      noise_norm=jnp.zeros((), jnp.float32),
      momentum=_zeros_momentum(params),
      thermostat=jnp.asarray(diffusion, dtype),
    )

  def update_fn(grads, state, params, *, params_star, noise_key, mask=None, **extra_args):
    del extra_args
    h = jnp.sqrt(jnp.asarray(step_size, jnp.float32))
    diffusion = _default_friction(friction, localization)
    d = _count(mask, params)
    init_key, o_key = jax.random.split(noise_key)
    p = _start_momentum(state.momentum, state.count, init_key, mask)
    p = _kick(p, grads, params, params_star, nbeta, localization, h)
    w = _drift(params, p, h)
    xi = _thermostat_step(state.thermostat, p, h, d)
    decay = jnp.exp(-xi * h)
    # OU variance A (1 − e^{−2ξh}) / ξ, → 2Ah as ξ → 0 (and positive for ξ < 0).
    small = jnp.abs(xi * h) < 1e-6
    var = jnp.where(
      small, 2.0 * diffusion * h, diffusion * -jnp.expm1(-2.0 * xi * h) / jnp.where(small, 1.0, xi)
    )
    noise = jax.tree.map(lambda z: (jnp.sqrt(var) * z).astype(z.dtype), tree_normal_like(o_key, p))
    noise = restrict_lib.apply(mask, noise)
    p = restrict_lib.apply(
      mask, jax.tree.map(lambda q, n: (decay * q).astype(q.dtype) + n, p, noise)
    )
    xi = _thermostat_step(xi, p, h, d)
    w = _drift(w, p, h)
    return _updates(w, params), SGNHTState(
      count=state.count + 1,
      noise_norm=h * tree_norm(noise),
      momentum=p,
      thermostat=xi.astype(state.thermostat.dtype),
    )

  # optax types update as (updates, state, params=None, **extra): ours requires its extra args.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def leapfrog_log_acceptance(
  params: Params,
  momentum: Params,
  u: jax.Array,
  grad_u: Params,
  potential_and_grad,
  step_size,
  mask: Any = None,
) -> jax.Array:
  """log min(1, exp(−ΔH)) of one leapfrog step of h = √ε from (w, p).

  `potential_and_grad(w) -> (U(w), ∇U(w))` on the step's minibatch (restricted
  to the mask); `u`, `grad_u` are U and ∇U at w. See the module docstring.
  """
  h = jnp.sqrt(jnp.asarray(step_size, jnp.float32))
  p = jax.tree.map(lambda q: q.astype(jnp.float32), momentum)
  p_half = jax.tree.map(lambda q, g: q - 0.5 * h * g.astype(jnp.float32), p, grad_u)
  w_new = jax.tree.map(
    lambda w, q: w + (h * q).astype(w.dtype), params, restrict_lib.apply(mask, p_half)
  )
  u_new, grad_new = potential_and_grad(w_new)
  p_new = jax.tree.map(lambda q, g: q - 0.5 * h * g.astype(jnp.float32), p_half, grad_new)
  p_new = restrict_lib.apply(mask, p_new)
  kinetic = lambda q: 0.5 * tree_norm(q) ** 2
  log_ratio = (u - u_new + kinetic(restrict_lib.apply(mask, p)) - kinetic(p_new)).astype(
    jnp.float32
  )
  return jnp.minimum(0.0, jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio))


sghmc.step_check = "leapfrog"  # type: ignore[attr-defined]
sgnht.step_check = "leapfrog"  # type: ignore[attr-defined]
