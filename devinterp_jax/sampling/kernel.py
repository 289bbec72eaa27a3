"""One sampler step of one chain, and everything the step computed (`StepInfo`).

Randomness: step t of a chain with key k uses `fold_in(k, t)` split into a batch
key and a noise key, with t the chain's global step. So a chain gives the same
numbers however its steps are split into blocks, and, since the chain keys never
depend on the checkpoint, every checkpoint sees the same minibatches and noise
(App. A.5.2).

Chain coordinates: an unrestricted chain moves the whole params pytree; a
restricted chain (refined LLC) moves a vector θ [k] of selected coordinates and
its loss is `loss_fn(embed(w*, θ), batch)` (`restrict.embed`). `mask` [k] (or
None) marks the real coordinates of a padded restriction; padding never moves.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.typing import LossFn, Params


class StepInfo(NamedTuple):
  """What one step computed; observers (`sampling/observers.py`) read it."""

  t: jax.Array  # global step (an unbatched scalar inside the program)
  params: Params  # w_t, chain coordinates
  params_star: Params  # w* (θ* for a restricted chain)
  loss: jax.Array  # L_B(w_t) on this step's minibatch
  grads: Params  # ∇L_B(w_t), restricted
  updates: Params  # Δw = w_{t+1} − w_t
  proposal: Params  # w_{t+1}
  state: Any  # the sampler state after the update
  prior_state: Any  # the sampler state before it (e.g. the momentum at w_t)
  batch: Any  # this step's minibatch
  batch_key: jax.Array  # the key that drew it
  hypers: Mapping[str, jax.Array]  # step_size, nbeta, localization
  mask: Any  # 0/1 over chain coordinates, or None
  loss_fn: LossFn  # the loss in chain coordinates


def step_keys(chain_key: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(batch key, noise key) of step t."""
  batch_key, noise_key = jax.random.split(jax.random.fold_in(chain_key, t))
  return batch_key, noise_key


def sgld_step(
  params: Params,
  state: Any,
  t: jax.Array,
  *,
  chain_key: jax.Array,
  params_star: Params,
  transform: optax.GradientTransformationExtraArgs,
  loss_fn: LossFn,
  batch_fn: Callable[[jax.Array], Any],
  hypers: Mapping[str, jax.Array],
  mask: Any = None,
) -> StepInfo:
  """One update with the sampler `transform` (an optax-style transformation; it is
  given the restriction `mask` and keeps padded coordinates still)."""
  batch_key, noise_key = step_keys(chain_key, t)
  batch = batch_fn(batch_key)
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  grads = restrict_lib.apply(mask, grads)
  updates, new_state = transform.update(
    grads, state, params, params_star=params_star, noise_key=noise_key, mask=mask
  )
  updates = restrict_lib.apply(mask, updates)  # w − w* is 0 off the mask
  proposal = optax.apply_updates(params, updates)
  return StepInfo(
    t=t,
    params=params,
    params_star=params_star,
    loss=loss,
    grads=grads,
    updates=updates,
    proposal=proposal,
    state=new_state,
    prior_state=state,
    batch=batch,
    batch_key=batch_key,
    hypers=hypers,
    mask=mask,
    loss_fn=loss_fn,
  )


def batch_fn_from_data(data: Any, batch_size: int) -> Callable[[jax.Array], Any]:
  """A pure `key -> minibatch` function over `data`.

  `data` is a pytree of arrays sharing a leading sample axis (minibatches are
  drawn uniformly with replacement: a gather of `batch_size` rows, whose cost
  does not grow with n), or already a callable `key -> batch` (a batch source,
  e.g. one that generates fresh samples or reads data that is not in memory).
  Inside the compiled program `data` is a traced argument, never a constant.
  """
  if callable(data):
    return data
  n = check_data(data)

  def batch_fn(key):
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)

  return batch_fn


def check_data(data: Any) -> int:
  """The sample count n of array data; names the problem otherwise."""
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("data is an empty pytree; pass arrays with a leading sample axis")
  sizes = {int(x.shape[0]) if getattr(x, "ndim", 0) else -1 for x in leaves}
  if len(sizes) != 1 or min(sizes) < 1:
    raise ValueError(
      f"every data array needs the same leading sample axis; got sizes "
      f"{sorted(sizes)} for shapes {[getattr(x, 'shape', ()) for x in leaves]}"
    )
  return sizes.pop()
