"""Hessian statistics per checkpoint from Hessian-vector products (paper App. B.5).

The paper compares the LLC with the trace and the top eigenvalues of the loss
Hessian on a batch (Fig. B.4, computed there with PyHessian). This module gets
them without forming the Hessian:

* `hvp`: H·v by forward-over-reverse differentiation (`jax.jvp` of `jax.grad`).
* `hutchinson_trace`: tr H ≈ mean_i zᵢᵀHzᵢ over Rademacher probes zᵢ, with its
  standard error std(zᵢᵀHzᵢ)/√n. The estimator is unbiased; its variance is
  2(‖H‖_F² − Σᵢ Hᵢᵢ²)/n, so it is exact for a diagonal H and noisy when the
  off-diagonal mass is large compared with the trace.
* `lanczos_top_eigenvalues`: Ritz values of H from `num_iters` Lanczos steps
  with full reorthogonalisation (see its docstring for accuracy caveats).
* `hessian_stats`: both for many checkpoints, vmapped over a chunk of stacked
  checkpoints in one compiled program; every checkpoint sees the same probes
  and the same Lanczos start vector.

Cost per checkpoint: one linearisation of the gradient (≈ one gradient) plus
`num_hutchinson + min(num_lanczos_iters, num_params)` Hessian-vector products
(64 with the defaults), each costing about one to two gradients since the
linearisation is reused; the Lanczos basis holds
`min(num_lanczos_iters, num_params) × num_params` floats per checkpoint of a
chunk.

`loss_fn(params, batch) -> scalar` is any pure function; `params` is any pytree
of float arrays (e.g. a Flax params dict). Vector algebra is done on the
flattened parameters (`jax.flatten_util.ravel_pytree`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from devinterp_jax.storage import chunks
from devinterp_jax.typing import LossFn, Params

MatVec = Callable[[jax.Array], jax.Array]

# Key offsets used by `hessian_stats`: the Hutchinson probes use
# fold_in(key(seed), HUTCHINSON_STREAM), the Lanczos start fold_in(key(seed), LANCZOS_STREAM).
HUTCHINSON_STREAM = 0
LANCZOS_STREAM = 1


def hvp(loss_fn: LossFn, params: Params, batch: Any, v: Params) -> Params:
  """Hessian-vector product H(params)·v by forward-over-reverse differentiation.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar`.
    params: pytree at which the Hessian is taken.
    batch: data passed to `loss_fn`.
    v: pytree with the structure and shapes of `params`.

  Returns:
    H·v as a pytree like `params`.
  """
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(grad_fn, (params,), (v,))[1]


def _flat_hvp(loss_fn: LossFn, params: Params, batch: Any) -> tuple[MatVec, int, Any]:
  """Returns (v ↦ H·v on flat vectors, num_params, dtype).

  The gradient is linearised once (`jax.linearize`), so repeated products
  reuse its primal computation.
  """
  flat, unravel = ravel_pytree(params)
  grad_fn = jax.grad(lambda x: loss_fn(unravel(x), batch))
  _, matvec = jax.linearize(grad_fn, flat)
  return matvec, flat.shape[0], flat.dtype


def _hutchinson(
  matvec: MatVec, dim: int, dtype: Any, key: jax.Array, num_samples: int
) -> tuple[jax.Array, jax.Array]:
  """Hutchinson estimate (mean of zᵀHz, its standard error); probe i uses fold_in(key, i)."""

  def body(carry, i):
    z = jax.random.rademacher(jax.random.fold_in(key, i), (dim,), dtype=dtype)
    return carry, z @ matvec(z)

  _, samples = jax.lax.scan(body, None, jnp.arange(num_samples))
  return jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(num_samples)


def _orthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
  """Removes the span of the rows of `basis` from `w` (Gram-Schmidt twice)."""
  w = w - basis.T @ (basis @ w)
  return w - basis.T @ (basis @ w)


def _lanczos_ritz_values(
  matvec: MatVec, dim: int, dtype: Any, key: jax.Array, num_iters: int
) -> jax.Array:
  """All Ritz values (ascending) after min(num_iters, dim) Lanczos steps.

  The start vector is Gaussian (drawn from `key`). Full reorthogonalisation
  against the whole (zero-padded) basis keeps the shapes fixed. On breakdown
  (the Krylov space is invariant, e.g. a low-rank Hessian) the coupling β is
  set to 0 and the next vector is the coordinate vector least covered by the
  basis, orthogonalised against it (its residual norm² is at least
  1 − (j+1)/dim), so the tridiagonal matrix stays a projection of H.
  """
  m = min(num_iters, dim)
  v0 = jax.random.normal(key, (dim,), dtype)
  basis = jnp.zeros((m, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  tiny = jnp.finfo(dtype).tiny
  rtol = jnp.sqrt(jnp.finfo(dtype).eps)

  def body(basis, j):
    v = jax.lax.dynamic_index_in_dim(basis, j, keepdims=False)
    w = matvec(v)
    alpha = v @ w
    hv_norm = jnp.linalg.norm(w)
    w = _orthogonalize(basis, w)  # rows > j are still zero
    beta = jnp.linalg.norm(w)
    breakdown = beta <= rtol * hv_norm
    least_covered = jnp.argmin(jnp.sum(basis * basis, axis=0))
    r = _orthogonalize(basis, jax.nn.one_hot(least_covered, dim, dtype=dtype))
    r = r / jnp.maximum(jnp.linalg.norm(r), tiny)
    nxt = jnp.where(breakdown, r, w / jnp.maximum(beta, tiny))
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    # the last step overwrites row m-1, which is no longer needed
    basis = jax.lax.dynamic_update_index_in_dim(basis, nxt, jnp.minimum(j + 1, m - 1), 0)
    return basis, (alpha, beta)

  _, (alphas, betas) = jax.lax.scan(body, basis, jnp.arange(m))
  off = betas[:-1]
  tridiag = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return jnp.linalg.eigh(tridiag)[0]


def _check_lanczos_args(num_iters: int, top_k: int) -> None:
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  if not 1 <= top_k <= num_iters:
    raise ValueError(f"top_k must be in [1, num_iters={num_iters}], got {top_k}")


def hutchinson_trace(
  loss_fn: LossFn, params: Params, batch: Any, key: jax.Array, num_samples: int
) -> tuple[jax.Array, jax.Array]:
  """Hutchinson estimate of tr H with Rademacher probes.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar`.
    params: pytree at which the Hessian is taken.
    batch: data passed to `loss_fn`.
    key: PRNG key; probe i is drawn from `fold_in(key, i)`.
    num_samples: number of probes (Hessian-vector products), at least 2.

  Returns:
    (trace estimate, its standard error std(zᵀHz, ddof=1)/√num_samples).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 for a standard error, got {num_samples}")
  return _hutchinson_jit(loss_fn, num_samples, params, batch, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hutchinson_jit(loss_fn, num_samples, params, batch, key):
  matvec, dim, dtype = _flat_hvp(loss_fn, params, batch)
  return _hutchinson(matvec, dim, dtype, key, num_samples)


def lanczos_top_eigenvalues(
  loss_fn: LossFn,
  params: Params,
  batch: Any,
  key: jax.Array,
  num_iters: int,
  top_k: int,
  *,
  return_min: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The `top_k` largest Ritz values of H after `num_iters` Lanczos steps.

  Accuracy: Ritz values converge to the extremal eigenvalues first, fastest for
  eigenvalues well separated from the rest of the spectrum; interior ones need
  many more steps. Before convergence the k-th largest Ritz value is a lower
  bound on the k-th largest eigenvalue (Cauchy interlacing), and the smallest
  Ritz value an upper bound on the smallest eigenvalue. With
  `num_iters >= num_params` all eigenvalues are found (up to rounding). A single
  start vector sees a repeated eigenvalue once, so its multiplicity is only
  recovered after the Krylov space is exhausted (then a restart continues).
  Full reorthogonalisation costs O(num_iters² · num_params) flops and
  num_iters · num_params memory on top of the products.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar`.
    params: pytree at which the Hessian is taken.
    batch: data passed to `loss_fn`.
    key: PRNG key for the (Gaussian) start vector.
    num_iters: Lanczos steps (Hessian-vector products); capped at num_params.
    top_k: how many of the largest (algebraic) Ritz values to return.
    return_min: also return the smallest (most negative) Ritz value.

  Returns:
    [top_k] Ritz values sorted descending, and with `return_min` the smallest.
  """
  _check_lanczos_args(num_iters, top_k)
  _check_top_k(top_k, params)
  top, smallest = _lanczos_jit(loss_fn, num_iters, top_k, params, batch, key)
  return (top, smallest) if return_min else top


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _lanczos_jit(loss_fn, num_iters, top_k, params, batch, key):
  matvec, dim, dtype = _flat_hvp(loss_fn, params, batch)
  ritz = _lanczos_ritz_values(matvec, dim, dtype, key, num_iters)
  return ritz[::-1][:top_k], ritz[0]


def _check_top_k(top_k: int, params: Params) -> None:
  dim = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  if top_k > dim:
    raise ValueError(f"top_k={top_k} exceeds the number of parameters {dim}")


def hessian_stats(
  loss_fn: LossFn,
  params_list: Sequence[Params],
  batch: Any,
  *,
  num_hutchinson: int = 32,
  num_lanczos_iters: int = 32,
  top_k: int = 3,
  seed: int = 0,
  checkpoint_chunk: int = 8,
) -> dict[str, np.ndarray]:
  """Hessian trace and top eigenvalues of every checkpoint on one batch.

  `params_list` is indexed one checkpoint at a time, chunk by chunk, so it may
  load lazily (e.g. a Sequence reading checkpoints from disk). Each chunk of
  `checkpoint_chunk` checkpoints is stacked and run by one jitted program,
  vmapped over checkpoints; the last chunk is padded so it compiles once. The
  keys depend on `seed` only (Hutchinson: fold_in(key(seed), HUTCHINSON_STREAM),
  Lanczos: fold_in(key(seed), LANCZOS_STREAM)), so every checkpoint sees the
  same probes and start vector, results do not depend on the chunking, and they
  match `hutchinson_trace` / `lanczos_top_eigenvalues` called with those keys.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar`.
    params_list: checkpoints with one pytree structure and shapes.
    batch: the batch the Hessian is taken on (shared by all checkpoints).
    num_hutchinson: Rademacher probes for the trace (at least 2).
    num_lanczos_iters: Lanczos steps (capped at the number of parameters).
    top_k: how many of the largest eigenvalues to return.
    seed: PRNG seed.
    checkpoint_chunk: checkpoints per compiled call.

  Returns:
    numpy arrays `trace` [N], `trace_se` [N] (Hutchinson standard error),
    `top_eigenvalues` [N, top_k] (descending) and `min_eigenvalue` [N] (the
    smallest Ritz value, an upper bound on the most negative eigenvalue).
  """
  num_ckpts = len(params_list)
  if num_ckpts == 0:
    raise ValueError("params_list is empty")
  if num_hutchinson < 2:
    raise ValueError(f"num_hutchinson must be >= 2, got {num_hutchinson}")
  _check_lanczos_args(num_lanczos_iters, top_k)
  chunk = chunks.chunk_size(num_ckpts, checkpoint_chunk)
  base = jax.random.key(seed)
  trace_key = jax.random.fold_in(base, HUTCHINSON_STREAM)
  lanczos_key = jax.random.fold_in(base, LANCZOS_STREAM)
  program = functools.partial(_stats_chunk, loss_fn, num_hutchinson, num_lanczos_iters, top_k)
  num_chunks = -(-num_ckpts // chunk)
  outputs: list[dict[str, np.ndarray]] = []
  t0 = time.time()
  for i, (lo, hi, stacked) in enumerate(chunks.iterate(params_list, chunk)):
    if i == 0:
      _check_top_k(top_k, jax.tree.map(lambda x: x[0], stacked))
    out = jax.device_get(program(stacked, batch, trace_key, lanczos_key))
    outputs.append({k: np.asarray(v)[: hi - lo] for k, v in out.items()})
    elapsed = time.time() - t0
    logging.info(
      "Hessian chunk %d/%d (checkpoints %d-%d): %.1fs elapsed, ETA %.0fs",
      i + 1,
      num_chunks,
      lo,
      hi - 1,
      elapsed,
      elapsed / hi * (num_ckpts - hi),
    )
  return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def _stats_single(
  loss_fn, num_hutchinson, num_lanczos_iters, top_k, params, batch, trace_key, lanczos_key
):
  matvec, dim, dtype = _flat_hvp(loss_fn, params, batch)
  trace, trace_se = _hutchinson(matvec, dim, dtype, trace_key, num_hutchinson)
  ritz = _lanczos_ritz_values(matvec, dim, dtype, lanczos_key, num_lanczos_iters)
  return {
    "trace": trace,
    "trace_se": trace_se,
    "top_eigenvalues": ritz[::-1][:top_k],
    "min_eigenvalue": ritz[0],
  }


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _stats_chunk(
  loss_fn, num_hutchinson, num_lanczos_iters, top_k, params, batch, trace_key, lanczos_key
):
  """`_stats_single` vmapped over the leading checkpoint axis of `params`."""
  single = functools.partial(_stats_single, loss_fn, num_hutchinson, num_lanczos_iters, top_k)
  return jax.vmap(single, in_axes=(0, None, None, None))(params, batch, trace_key, lanczos_key)
