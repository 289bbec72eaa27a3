"""Observers: pure functions `StepInfo -> {name: array}` recorded at every step.

A new per-step diagnostic is one function here (or the caller's), not an edit
to the sampling loop. `gated` records an observer only on the steps where a
predicate of the (unbatched) global step holds, at the cost of those steps
alone, and NaN elsewhere.

  distance     ‖w_t − w*‖
  grad_norm    ‖∇L_B(w_t)‖ (restricted)
  noise_norm   ‖η_t‖, the injected noise (restricted)
  mala(target) the MALA acceptance probability of the step's proposal
  leapfrog(target) the Metropolis acceptance of one leapfrog step (underdamped samplers)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling import sgld as sgld_lib
from devinterp_jax.sampling import underdamped
from devinterp_jax.sampling.kernel import StepInfo

Observer = Callable[[StepInfo], dict]


def _diff(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def distance(info: StepInfo) -> dict:
  return {"distance": sgld_lib.tree_norm(_diff(info.params, info.params_star))}


def grad_norm(info: StepInfo) -> dict:
  return {"grad_norm": sgld_lib.tree_norm(info.grads)}


def noise_norm(info: StepInfo) -> dict:
  """‖η‖, the injected noise in position units, as the sampler reports it (padding excluded)."""
  return {"noise_norm": info.state.noise_norm}


def mala(target: str = "posterior") -> Observer:
  """The MALA acceptance of the step's proposal, on the same minibatch at both points.

  'posterior': the sampled potential U = nβ L_B + (γ/2)‖w − w*‖².
  'loss': nβ L_B alone, for the same step without the localisation drift.
  One extra forward + backward pass per measured step.
  """

  def observe(info: StepInfo) -> dict:
    h = info.hypers
    nbeta, gamma, eps = h["nbeta"], h["localization"], h["step_size"]
    vg = jax.value_and_grad(info.loss_fn)
    precond = getattr(info.state, "precond", None)
    if target == "posterior":

      def potential(loss, w):
        return nbeta * loss + 0.5 * gamma * sgld_lib.tree_norm(_diff(w, info.params_star)) ** 2

      loss_p, grads_p = vg(info.proposal, info.batch)
      grads_p = restrict_lib.apply(info.mask, grads_p)
      log_a = sgld_lib.mala_log_acceptance(
        info.params,
        info.proposal,
        potential(info.loss, info.params),
        potential(loss_p, info.proposal),
        sgld_lib.potential_grad(info.grads, info.params, info.params_star, nbeta, gamma),
        sgld_lib.potential_grad(grads_p, info.proposal, info.params_star, nbeta, gamma),
        eps,
        precond,
      )
    else:
      shift = jax.tree.map(lambda w, w0: gamma * (w - w0), info.params, info.params_star)
      if precond is not None:
        shift = jax.tree.map(jnp.multiply, precond, shift)
      shift = restrict_lib.apply(info.mask, shift)
      moved = jax.tree.map(lambda w, d: (w + 0.5 * eps * d).astype(w.dtype), info.proposal, shift)
      loss_p, grads_p = vg(moved, info.batch)
      grads_p = restrict_lib.apply(info.mask, grads_p)
      log_a = sgld_lib.mala_log_acceptance(
        info.params,
        moved,
        nbeta * info.loss,
        nbeta * loss_p,
        jax.tree.map(lambda g: nbeta * g, info.grads),
        jax.tree.map(lambda g: nbeta * g, grads_p),
        eps,
        precond,
      )
    return {"mala": jnp.exp(log_a).astype(jnp.float32)}

  return observe


def leapfrog(target: str = "posterior") -> Observer:
  """The Metropolis acceptance of one leapfrog step from the chain's (w_t, p_t), on the
  step's minibatch (`underdamped.leapfrog_log_acceptance`): the step-size check of the
  underdamped samplers. 'posterior': H = U + ½|p|²; 'loss': U = nβ L_B alone.
  One extra forward + backward pass per measured step.
  """

  def observe(info: StepInfo) -> dict:
    h = info.hypers
    nbeta = h["nbeta"]
    gamma = h["localization"] if target == "posterior" else 0.0
    vg = jax.value_and_grad(info.loss_fn)

    def potential(loss, w):
      return nbeta * loss + 0.5 * gamma * sgld_lib.tree_norm(_diff(w, info.params_star)) ** 2

    def potential_and_grad(w):
      loss, grads = vg(w, info.batch)
      grads = restrict_lib.apply(info.mask, grads)
      return potential(loss, w), sgld_lib.potential_grad(grads, w, info.params_star, nbeta, gamma)

    # The stored momentum is BAOAB's post-O one; the step-boundary pair (w_t, p_t), whose
    # law is close to exp(−H), has p_t = p − (h/2) ∇U(w_t) with the sampled potential.
    half = 0.5 * jnp.sqrt(h["step_size"])
    full = sgld_lib.potential_grad(
      info.grads, info.params, info.params_star, nbeta, h["localization"]
    )
    momentum = restrict_lib.apply(
      info.mask,
      jax.tree.map(lambda q, g: q - (half * g).astype(q.dtype), info.prior_state.momentum, full),
    )
    log_a = underdamped.leapfrog_log_acceptance(
      info.params,
      momentum,
      potential(info.loss, info.params),
      sgld_lib.potential_grad(info.grads, info.params, info.params_star, nbeta, gamma),
      potential_and_grad,
      h["step_size"],
      info.mask,
    )
    # The first step's carried momentum is a placeholder (drawn inside the update).
    log_a = jnp.where(info.prior_state.count == 0, jnp.nan, log_a)
    return {"mala": jnp.exp(log_a).astype(jnp.float32)}

  return observe


def step_check(kind: str, target: str = "posterior") -> Observer:
  """The observer of a sampler's step-size check ('mala' or 'leapfrog'), recorded as "mala"."""
  return {"mala": mala, "leapfrog": leapfrog}[kind](target)


def gated(observer: Observer, when: Callable[[jax.Array], jax.Array]) -> Observer:
  """`observer` on the steps where `when(t)` holds, NaN on the others.

  t is unbatched inside the program, so this is a real branch: the skipped
  steps pay nothing.
  """

  def observe(info: StepInfo) -> dict:
    shapes = jax.eval_shape(lambda: observer(info))
    skip = lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return jax.lax.cond(when(info.t), lambda: observer(info), skip)

  return observe


def default(diagnostics: bool = True) -> tuple[Observer, ...]:
  """The per-step diagnostics the sweep records (MALA is added by the program)."""
  return (distance, grad_norm, noise_norm) if diagnostics else ()
