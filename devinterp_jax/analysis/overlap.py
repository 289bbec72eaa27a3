"""Functional overlap between attention heads by mean-ablation.

For a fixed evaluation batch, every head's attention output z (before W_O) is
mean-ablated — replaced by its mean over the batch at each position,
z ← keep·z + (1 − keep)·z̄ — alone, in pairs and all together. With L(·) the
loss on the batch and L₀ the clean loss:

  Δ_i    = L(ablate i) − L₀             loss increase from ablating head i.
  Δ_ij   = L(ablate i and j) − L₀       (Δ_ii = Δ_i).
  Δ_all  = L(ablate every head) − L₀.
  O_ij   = (Δ_ij − Δ_i − Δ_j) / Δ_ij    overlap, i ≠ j (diagonal NaN). Near 1: each
           head covers for the other (either alone is enough, Δ_i, Δ_j ≈ 0);
           near 0: the two costs add up; negative: sub-additive (each alone
           already costs most of the pair's cost — synergy, the heads work
           together).
  robustness = 1 − Σ_i Δ_i / Δ_all      1 when every head is individually
           dispensable but the heads together are not, 0 when single-head costs
           add up to the all-heads cost, negative when they exceed it. (Our
           choice of a robustness index.)
  S_attn_ij  Pearson correlation of the attention patterns α_i, α_j [B, T, S]
           over the evaluation set, on the causally valid entries s ≤ t of the
           queries t ≥ 1 (the masked entries and the trivial first query are
           shared by every head and would inflate it). Heads of different layers
           are compared too (same shape).
  S_out_ij   Pearson correlation of the output contributions c_h = z_h W_O[h]
           [B, T, D] over the evaluation set, each centred by its batch mean at
           each (t, d): the part of the contribution that mean-ablation removes.

Redundant heads: high O and high S (a duplicate head gives O ≈ 1, S ≈ 1).
Degenerate heads: high O and low S_attn (different mechanisms, e.g. a positional
and a content head, that compute the same thing on the data).

Guards: O_ij is NaN where |Δ_ij| < tol and the robustness is NaN where
|Δ_all| < tol, tol = atol + rtol·|L₀| (never a silent division by ~0); a
correlation is NaN for a head whose features are constant (variance ≤ 1e-12
times their mean square). `overlap_mean` / `overlap_max` are the mean / max of
the finite off-diagonal O_ij (i < j), NaN if there is none.

Heads are flattened layer-major to R = L·H, named 'L{l}H{h}' (`head_names`).

The functions are model-agnostic; a model provides
  head_activations_fn(params, batch) -> {'attn' [L, B, H, T, S],
                                          'z' [L, B, T, H, E],
                                          'contrib' [L, B, T, H, D]}
  ablated_loss_fn(params, batch, head_keep [L, H], head_mean [L, T, H, E]) -> scalar
(`RegressionTransformer.head_activations` / `.ablated_loss`). All ablations of
one checkpoint (1 clean + R single + R(R−1)/2 pairs + 1 all) run as one `vmap`
over keep-masks; `overlap_over_checkpoints` vmaps over stacked checkpoint chunks
(`batching.map_checkpoints`, one compile). `devinterp_jax.viz.overlap` draws
them, masking the checkpoints where ablating every head barely changes the loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from devinterp_jax.analysis.batching import map_checkpoints
from devinterp_jax.typing import Params, head_name

HeadActivationsFn = Callable[[Params, Any], Mapping[str, jax.Array]]
AblatedLossFn = Callable[[Params, Any, jax.Array, jax.Array], jax.Array]
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-4
SCALAR_KEYS: tuple[str, ...] = (
  "clean_loss",
  "delta_all",
  "overlap_mean",
  "overlap_max",
  "robustness",
)
_DEGENERATE_VAR = 1e-12  # relative variance below which a correlation is NaN


def head_names(num_layers: int, num_heads: int) -> list[str]:
  """['L0H0', 'L0H1', …]: the R = L·H heads, layer-major."""
  return [head_name(l, h) for l in range(num_layers) for h in range(num_heads)]


def ablation_masks(num_layers: int, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Keep-masks [M, L, H] of every ablation, and the pair indices (i [P], j [P]).

  Row 0 keeps every head (clean); rows 1..R ablate head r − 1; the next P =
  R(R−1)/2 rows ablate the pairs (i, j), i < j, in `np.triu_indices` order; the
  last row ablates every head. M = R + P + 2.
  """
  R = num_layers * num_heads
  i_P, j_P = np.triu_indices(R, k=1)
  keep_MxR = np.ones((R + len(i_P) + 2, R), np.float32)
  keep_MxR[1 + np.arange(R), np.arange(R)] = 0
  keep_MxR[1 + R + np.arange(len(i_P)), i_P] = 0
  keep_MxR[1 + R + np.arange(len(i_P)), j_P] = 0
  keep_MxR[-1] = 0
  return keep_MxR.reshape(-1, num_layers, num_heads), i_P, j_P


def correlation_matrix(x_RxN: jax.Array, centred: bool = False) -> jax.Array:
  """Pearson correlations [R, R] between the rows of x (NaN for a constant row).

  With `centred=True` the rows are taken as already centred (no mean removed).
  """
  x_RxN = jnp.asarray(x_RxN, jnp.float32)
  c_RxN = x_RxN if centred else x_RxN - jnp.mean(x_RxN, axis=1, keepdims=True)
  cov_RxR = c_RxN @ c_RxN.T
  var_R = jnp.diagonal(cov_RxR)
  degenerate_R = var_R <= _DEGENERATE_VAR * jnp.sum(jnp.square(x_RxN), axis=1)
  std_R = jnp.sqrt(jnp.where(degenerate_R, 1.0, var_R))
  corr_RxR = jnp.clip(cov_RxR / (std_R[:, None] * std_R[None, :]), -1.0, 1.0)
  return jnp.where(degenerate_R[:, None] | degenerate_R[None, :], jnp.nan, corr_RxR)


def attention_similarity(attn_LxBxHxTxS: jax.Array) -> jax.Array:
  """S_attn [R, R]: correlation of the patterns on the entries s ≤ t, t ≥ 1."""
  L, B, H, T, S = attn_LxBxHxTxS.shape
  t_T, s_S = np.arange(T)[:, None], np.arange(S)[None, :]
  valid_TxS = (s_S <= t_T + (S - T)) & (t_T >= 1)
  rows_RxBxTxS = jnp.moveaxis(attn_LxBxHxTxS, 2, 1).reshape(L * H, B, T, S)
  return correlation_matrix(rows_RxBxTxS[:, :, valid_TxS].reshape(L * H, -1))


def output_similarity(contrib_LxBxTxHxD: jax.Array) -> jax.Array:
  """S_out [R, R]: correlation of the batch-centred contributions [B, T, D]."""
  L, B, T, H, D = contrib_LxBxTxHxD.shape
  rows_RxBxTxD = jnp.moveaxis(contrib_LxBxTxHxD, 3, 1).reshape(L * H, B, T, D)
  centred_RxBxTxD = rows_RxBxTxD - jnp.mean(rows_RxBxTxD, axis=1, keepdims=True)
  return correlation_matrix(centred_RxBxTxD.reshape(L * H, -1), centred=True)


def overlap_from_deltas(
  delta_R: jax.Array, delta_pair_RxR: jax.Array, delta_all: jax.Array, tol: float | jax.Array
) -> dict[str, jax.Array]:
  """O [R, R], its off-diagonal mean / max and the robustness from the Δs.

  O_ij = (Δ_ij − Δ_i − Δ_j) / Δ_ij (NaN on the diagonal and where |Δ_ij| < tol);
  robustness = 1 − Σ_i Δ_i / Δ_all (NaN where |Δ_all| < tol).
  """
  R = delta_R.shape[0]
  if R < 2:
    nan = jnp.full((), jnp.nan, delta_R.dtype)
    return {
      "overlap": jnp.full((R, R), jnp.nan, delta_R.dtype),
      "overlap_mean": nan,
      "overlap_max": nan,
      "robustness": jnp.where(jnp.abs(delta_all) >= tol, 0.0, jnp.nan),
    }
  ok_RxR = (jnp.abs(delta_pair_RxR) >= tol) & ~jnp.eye(R, dtype=bool)
  safe_RxR = jnp.where(ok_RxR, delta_pair_RxR, 1.0)
  o_RxR = jnp.where(
    ok_RxR, (delta_pair_RxR - delta_R[:, None] - delta_R[None, :]) / safe_RxR, jnp.nan
  )
  upper_P = o_RxR[np.triu_indices(R, k=1)]
  any_finite = jnp.any(jnp.isfinite(upper_P))
  ok_all = jnp.abs(delta_all) >= tol
  robustness = jnp.where(
    ok_all, 1.0 - jnp.sum(delta_R) / jnp.where(ok_all, delta_all, 1.0), jnp.nan
  )
  return {
    "overlap": o_RxR,
    "overlap_mean": jnp.where(any_finite, jnp.nanmean(upper_P), jnp.nan),
    "overlap_max": jnp.where(any_finite, jnp.nanmax(upper_P), jnp.nan),
    "robustness": robustness,
  }


def _overlap_metrics(
  head_activations_fn: HeadActivationsFn,
  ablated_loss_fn: AblatedLossFn,
  atol: float,
  rtol: float,
  mask_batch: int | None,
  params: Params,
  batch: Any,
) -> dict[str, jax.Array]:
  heads = head_activations_fn(params, batch)
  for name, ndim in (("attn", 5), ("z", 5), ("contrib", 5)):
    if name not in heads or jnp.ndim(heads[name]) != ndim:
      raise ValueError(
        f"head_activations_fn must return '{name}' with {ndim} axes, got "
        f"{None if name not in heads else jnp.shape(heads[name])}"
      )
  L, _, T, H, E = heads["z"].shape
  if heads["attn"].shape[:3:2] != (L, H) or heads["contrib"].shape[:4:3] != (L, H):
    raise ValueError(
      f"head axes disagree: attn {heads['attn'].shape} [L, B, H, T, S], "
      f"z {heads['z'].shape} [L, B, T, H, E], contrib "
      f"{heads['contrib'].shape} [L, B, T, H, D]"
    )
  R = L * H
  mean_LxTxHxE = jnp.mean(heads["z"], axis=1)
  keep_MxLxH, i_P, j_P = ablation_masks(L, H)
  loss_fn = lambda keep_LxH: ablated_loss_fn(params, batch, keep_LxH, mean_LxTxHxE)
  if mask_batch is None:
    loss_M = jax.vmap(loss_fn)(jnp.asarray(keep_MxLxH))
  else:
    loss_M = jax.lax.map(loss_fn, jnp.asarray(keep_MxLxH), batch_size=int(mask_batch))
  if loss_M.shape != (len(keep_MxLxH),):
    raise ValueError(f"ablated_loss_fn must return a scalar, got shape {loss_M.shape[1:]}")
  clean = loss_M[0]
  delta_R = loss_M[1 : R + 1] - clean
  delta_P = loss_M[R + 1 : -1] - clean
  delta_all = loss_M[-1] - clean
  delta_pair_RxR = jnp.diag(delta_R).at[i_P, j_P].set(delta_P).at[j_P, i_P].set(delta_P)
  out = {
    "clean_loss": clean,
    "delta": delta_R,
    "delta_pair": delta_pair_RxR,
    "delta_all": delta_all,
  }
  out.update(overlap_from_deltas(delta_R, delta_pair_RxR, delta_all, atol + rtol * jnp.abs(clean)))
  out["s_attn"] = attention_similarity(heads["attn"])
  out["s_out"] = output_similarity(heads["contrib"])
  return out


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("atol", "rtol", "mask_batch"))
def overlap_metrics(
  head_activations_fn: HeadActivationsFn,
  ablated_loss_fn: AblatedLossFn,
  params: Params,
  batch: Any,
  *,
  atol: float = DEFAULT_ATOL,
  rtol: float = DEFAULT_RTOL,
  mask_batch: int | None = None,
) -> dict[str, jax.Array]:
  """Overlap metrics of one checkpoint on one evaluation batch (jitted).

  Args:
    head_activations_fn: (params, batch) -> {'attn' [L, B, H, T, S],
      'z' [L, B, T, H, E], 'contrib' [L, B, T, H, D]} (unablated).
    ablated_loss_fn: (params, batch, head_keep [L, H], head_mean [L, T, H, E])
      -> scalar loss with z ← keep·z + (1 − keep)·mean.
    params, batch: the checkpoint and the evaluation batch; the ablation means
      are the batch means of z.
    atol, rtol: a denominator Δ counts as zero below atol + rtol·|L₀|.
    mask_batch: ablations evaluated at once (None: all in one vmap; else
      `lax.map` in vmapped blocks of this size, to bound memory).

  Returns:
    {'clean_loss', 'delta' [R], 'delta_pair' [R, R] (diagonal Δ_i), 'delta_all',
     'overlap' [R, R], 'overlap_mean', 'overlap_max', 'robustness',
     's_attn' [R, R], 's_out' [R, R]} (definitions in the module docstring).
  """
  return _overlap_metrics(
    head_activations_fn, ablated_loss_fn, float(atol), float(rtol), mask_batch, params, batch
  )


@functools.lru_cache(maxsize=32)
def _checkpoint_fn(head_activations_fn, ablated_loss_fn, atol, rtol, mask_batch):
  return functools.partial(
    _overlap_metrics, head_activations_fn, ablated_loss_fn, atol, rtol, mask_batch
  )


def overlap_over_checkpoints(
  head_activations_fn: HeadActivationsFn,
  ablated_loss_fn: AblatedLossFn,
  checkpoints: Sequence[Params],
  batch: Any,
  *,
  checkpoint_chunk: int = 8,
  atol: float = DEFAULT_ATOL,
  rtol: float = DEFAULT_RTOL,
  mask_batch: int | None = None,
) -> dict[str, np.ndarray]:
  """`overlap_metrics` of every checkpoint, `checkpoint_chunk` at a time.

  Each chunk is stacked (the last padded) and evaluated by one jitted `vmap`
  over checkpoints (`batching.map_checkpoints`); every checkpoint sees the
  same `batch`. Returns the entries of `overlap_metrics` with a leading [N].
  """
  fn = _checkpoint_fn(
    head_activations_fn,
    ablated_loss_fn,
    float(atol),
    float(rtol),
    None if mask_batch is None else int(mask_batch),
  )
  return map_checkpoints(fn, checkpoints, batch, checkpoint_chunk=checkpoint_chunk)


def scalar_columns(
  metrics: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
  """CSV columns [N]: the scalar entries and `delta/{name}` per head."""
  out = {k: np.asarray(metrics[k]) for k in SCALAR_KEYS}
  for r, name in enumerate(names):
    out[f"delta/{name}"] = np.asarray(metrics["delta"])[:, r]
  return out
