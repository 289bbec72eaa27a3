"""Langevin samplers as optax-style update transformations (paper App. A.3, eq. 8).

Plain SGLD (`sgld`):

    Δw = −(ε/2)·(nβ ∇L_B(w) + γ (w − w*)) + η,   η ~ N(0, ε I)

RMSProp-preconditioned SGLD (`rmsprop_sgld`, Li et al. 2016), with a
diagonal preconditioner P built from the loss gradient g = ∇L_B(w):

    v ← α v + (1 − α) g²,   P = 1 / (δ + √(v / (1 − α^t)))
    Δw = −(ε/2)·P·(nβ g + γ (w − w*)) + η,        η ~ N(0, ε P)

Units and meaning of the hyperparameters:
  ε (`step_size`): the Langevin time step, in squared parameter units: the
    injected noise has variance ε per coordinate (standard deviation √ε). The
    discretisation bias grows with ε; the MALA acceptance of the proposals
    (`mala_log_acceptance`) measures it.
  nβ (`nbeta`): the effective dataset size n times the inverse temperature β,
    multiplying the gradient of the *mean* minibatch loss L_B. The target is the
    tempered posterior ∝ exp(−nβ L(w)); larger nβ concentrates it (the estimate
    approaches λ as nβ → ∞) and needs a smaller ε.
  γ (`localization`): the precision of the Gaussian prior N(w*, I/γ) that keeps
    the chain near the checkpoint w*, in 1/(squared parameter units). With nβ = 0
    the chain samples that prior, E‖w − w*‖² = d/γ.

`update(grads, state, params, *, params_star, noise_key, mask=None)` returns the updates to
add with `optax.apply_updates`. Hyperparameters may be traced arrays, so one
compiled program serves a whole calibration grid. Every state carries
`noise_norm` (‖η‖ of the last update, a cheap diagnostic) and `precond` (the
diagonal preconditioner used by the last update, or None for plain SGLD), which
`mala_log_acceptance` needs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.typing import Params


class SGLDState(NamedTuple):
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (a field, not tuple.count)
  noise_norm: jax.Array
  precond: Any = None


class RMSPropSGLDState(NamedTuple):
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (a field, not tuple.count)
  noise_norm: jax.Array
  precond: Any
  nu: Any


def tree_normal_like(key: jax.Array, tree: Any) -> Any:
  """Independent standard normals shaped like `tree` (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def tree_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def potential_grad(
  grads: Params, params: Params, params_star: Params, nbeta, localization
) -> Params:
  """∇U for U(w) = nβ L(w) + (γ/2) ‖w − w*‖²."""
  return jax.tree.map(
    lambda g, w, w0: nbeta * g + localization * (w - w0), grads, params, params_star
  )


def _langevin_updates(
  grads, params, params_star, noise_key, step_size, nbeta, localization, precond, mask=None
):
  xi = restrict_lib.apply(mask, tree_normal_like(noise_key, grads))
  drift = potential_grad(grads, params, params_star, nbeta, localization)
  if precond is None:
    noise = jax.tree.map(lambda z: jnp.sqrt(step_size) * z, xi)
    updates = jax.tree.map(
      lambda d, n, w: (-0.5 * step_size * d + n).astype(w.dtype), drift, noise, params
    )
  else:
    noise = jax.tree.map(lambda z, p: jnp.sqrt(step_size * p) * z, xi, precond)
    updates = jax.tree.map(
      lambda d, n, p, w: (-0.5 * step_size * p * d + n).astype(w.dtype),
      drift,
      noise,
      precond,
      params,
    )
  return updates, tree_norm(noise)


def sgld(
  step_size: float | jax.Array, nbeta: float | jax.Array, localization: float | jax.Array
) -> optax.GradientTransformationExtraArgs:
  """Stochastic-gradient Langevin dynamics localised at `params_star`."""

  def init_fn(params):
    del params
    return SGLDState(count=jnp.zeros((), jnp.int32), noise_norm=jnp.zeros((), jnp.float32))

  def update_fn(grads, state, params, *, params_star, noise_key, mask=None, **extra_args):
    del extra_args
    updates, noise_norm = _langevin_updates(
      grads, params, params_star, noise_key, step_size, nbeta, localization, None, mask
    )
    return updates, SGLDState(count=state.count + 1, noise_norm=noise_norm)

  # optax types update as (updates, state, params=None, **extra): ours requires its extra args.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def rmsprop_sgld(
  step_size: float | jax.Array,
  nbeta: float | jax.Array,
  localization: float | jax.Array,
  *,
  alpha: float = 0.99,
  eps: float = 0.1,
) -> optax.GradientTransformationExtraArgs:
  """RMSProp-preconditioned SGLD: P = 1/(eps + √v̂), v̂ the bias-corrected EMA of g².

  `eps` (δ) bounds the preconditioner by 1/δ; the gradient is that of the mean
  minibatch loss, so P does not depend on nβ.
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return RMSPropSGLDState(
      count=jnp.zeros((), jnp.int32),
      noise_norm=jnp.zeros((), jnp.float32),
      precond=jax.tree.map(jnp.ones_like, params),
      nu=zeros,
    )

  def update_fn(grads, state, params, *, params_star, noise_key, mask=None, **extra_args):
    del extra_args
    count = state.count + 1
    nu = jax.tree.map(lambda v, g: alpha * v + (1 - alpha) * jnp.square(g), state.nu, grads)
    correction = 1 - alpha ** count.astype(jnp.float32)
    precond = jax.tree.map(lambda v: 1.0 / (eps + jnp.sqrt(v / correction)), nu)
    updates, noise_norm = _langevin_updates(
      grads, params, params_star, noise_key, step_size, nbeta, localization, precond, mask
    )
    return updates, RMSPropSGLDState(count=count, noise_norm=noise_norm, precond=precond, nu=nu)

  # optax types update as (updates, state, params=None, **extra): ours requires its extra args.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def mala_log_acceptance(
  params: Params,
  proposal: Params,
  u: jax.Array,
  u_proposal: jax.Array,
  grad_u: Params,
  grad_u_proposal: Params,
  step_size,
  precond: Params | None = None,
) -> jax.Array:
  """log of the Metropolis-adjusted Langevin acceptance probability of a proposal.

  For the potential U = nβ L_B + (γ/2)‖w − w*‖² evaluated on one minibatch at
  both points, and the proposal kernel q(w'|w) = N(w − (ε/2) P ∇U(w), ε P)
  (P held fixed, as the preconditioner changes slowly):

      log α = min(0, U(w) − U(w') + log q(w|w') − log q(w'|w)).

  Its mean over steps estimates how well the unadjusted chain approximates the
  target: near 1 means a small discretisation bias (Lau et al.; Furman & Lau).
  """

  pre = jax.tree.map(jnp.ones_like, params) if precond is None else precond

  def log_q(to, frm, grad_frm):
    def leaf(t, f, g, p):
      r = (t - f + 0.5 * step_size * p * g).astype(jnp.float32)
      return jnp.sum(jnp.square(r) / p)

    return -sum(jax.tree.leaves(jax.tree.map(leaf, to, frm, grad_frm, pre))) / (2 * step_size)

  log_ratio = (
    u - u_proposal + log_q(params, proposal, grad_u_proposal) - log_q(proposal, params, grad_u)
  )
  return jnp.minimum(0.0, jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio))


sgld.step_check = "mala"  # type: ignore[attr-defined]
rmsprop_sgld.step_check = "mala"  # type: ignore[attr-defined]
