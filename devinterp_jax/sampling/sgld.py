"""SGLD as an optax-style update transformation (paper App. A.3, eq. 8).

    Δw = −(ε/2)·(nβ ∇L_B(w) + γ (w − w*)) + η,   η ~ N(0, ε I)

Units: ε (`step_size`) is the SGLD step, the noise has variance ε (standard
deviation √ε per coordinate); nβ (`nbeta`) is the effective dataset size n
times the inverse temperature β, multiplying the gradient of the *mean*
minibatch loss L_B; γ (`localization`) is the strength of the Gaussian prior
N(w*, I/γ) that keeps the chain near the checkpoint w*. With nβ = 0 the chain
samples that prior, E‖w − w*‖² = d/γ.

`update(grads, state, params, *, params_star, noise_key)` returns the updates to
add with `optax.apply_updates`. Hyperparameters may be traced arrays, so one
compiled program serves a whole calibration grid.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SGLDState(NamedTuple):
  count: jax.Array


def tree_normal_like(key: jax.Array, tree: Any) -> Any:
  """Independent standard normals shaped like `tree` (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def sgld(step_size: float | jax.Array, nbeta: float | jax.Array,
         localization: float | jax.Array) -> optax.GradientTransformationExtraArgs:
  """Stochastic-gradient Langevin dynamics localised at `params_star`."""

  def init_fn(params):
    del params
    return SGLDState(count=jnp.zeros((), jnp.int32))

  def update_fn(grads, state, params, *, params_star, noise_key, **extra_args):
    del extra_args
    noise = tree_normal_like(noise_key, grads)
    sqrt_eps = jnp.sqrt(step_size)

    def leaf_update(g, w, w0, xi):
      drift = nbeta * g + localization * (w - w0)
      return (-0.5 * step_size * drift + sqrt_eps * xi).astype(w.dtype)

    updates = jax.tree.map(leaf_update, grads, params, params_star, noise)
    return updates, SGLDState(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
