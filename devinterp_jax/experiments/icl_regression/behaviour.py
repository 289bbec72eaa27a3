"""Behavioural metrics of in-context linear regression checkpoints (paper App. D.1).

Every metric is computed on the same evaluation data for every checkpoint: one
batch `sample_batch(key, task, batch_size, with_tasks=True)` of B sequences
(tasks t, inputs x_k, noise ε_k, targets y_k = t·x_k + ε_k), derived from `key`
only. Checkpoints are evaluated `checkpoint_chunk` at a time in one jitted
program that vmaps over checkpoints (the last chunk is padded so that one
shape compiles).

`behaviour_metrics` returns a flat `dict[str, np.ndarray]`; every entry has the
leading checkpoint axis [N] and nothing else, so the dict is a CSV table
(per-prediction quantities are separate columns `<name>_k{k}`, k 1-indexed;
`per_prediction(metrics, name)` stacks them back to [N, K]). Entries:

  loss_k{k}          L_k: MSE of the model's k-th prediction, mean over the batch.
  mse                mean_k L_k (the training loss on this batch).
  nmse               Σ_{b,k} (ŷ − y)² / Σ_{b,k} y²: MSE over the zero predictor's MSE.
  icl_1_4            ICL_{1:4} = L_4 − L_1 (NaN if K < 4).
  icl_4_8            ICL_{4:8} = L_8 − L_4 (NaN if K < 8).
  dist_zero          mean_{b,k} ŷ²: mean squared distance to the zero prediction (D.1.1).
  dist_prior         mean_{b,k} (ŷ − t̄·x_k)²: distance to the task-prior prediction,
                     t̄ the component-wise mean of the training tasks (D.1.1, see
                     `task_prior_mean`).
  dist_ridge         mean_{b,k} (ŷ − ŷ_ridge)²: distance to the ridge predictor.
  dist_dmmse         mean_{b,k} (ŷ − ŷ_dmmse)²: distance to the dMMSE predictor
                     (finite task sets only).
  nmse_ood_x_g{g}    NMSE (as `nmse`) on "OOD inputs" (D.1.3): x_k → g·x_k, so
                     y_k = t·(g x_k) + ε_k; the model sees the scaled x's and y's.
  nmse_ood_t_g{g}    NMSE on "OOD tasks" (D.1.3): t → g·t with the original
                     x_k, so y_k = (g t)·x_k + ε_k.
  zero_loss_k{k}     baselines on the in-distribution batch, constant over
  prior_loss_k{k}    checkpoints (repeated along [N] to keep one layout): the zero
  ridge_loss_k{k}    predictor (= E[y_k²]), the task-prior predictor t̄·x_k, the
  dmmse_loss_k{k}    ridge posterior mean under the prior t ~ N(0, I_D) with noise
                     σ² (Bayes-optimal for the infinite prior) and, for a finite
                     task set, the dMMSE posterior mean over the set (Bayes-optimal
                     for it). `baseline_losses` returns them as [K] arrays.

Reconstructed definitions (the paper text lost the symbols):
  * OOD distributions (eqs. 18–19): x ~ N(0, g² I_D) and t ~ N(0, g² I_D), i.e.
    the in-distribution draws multiplied by the gain g (a standard-deviation
    scale). The same base draws (t, x, ε) are reused for every gain, so g = 1
    reproduces the in-distribution batch and the curves over g share their noise.
    For a finite task set, "OOD tasks" scales the tasks of the set.
  * Default gains (0.5, 1, 2, 4, 8) are our choice (the figure's values were lost).
  * Infinite task prior: t̄ is the exact prior mean 0, so `dist_prior` equals
    `dist_zero` unless an explicit `task_mean` is given.
  * The k-th prediction ŷ_k sees (x_1, y_1, …, x_{k−1}, y_{k−1}, x_k); the
    baselines use exactly that context.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from devinterp_jax.data.regression import RegressionTask, sample_batch
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.analysis import overlap
from devinterp_jax.analysis.batching import map_checkpoints
from devinterp_jax.typing import Params

DEFAULT_GAINS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
_DMMSE_CHUNK_ELEMENTS = 1 << 24  # B·K·M elements per dMMSE block (float64)


def scalar_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The entries with shape [N] (the CSV columns), in insertion order."""
  return {k: v for k, v in metrics.items() if np.ndim(v) == 1}


def per_prediction(metrics: Mapping[str, np.ndarray], name: str = "loss") -> np.ndarray:
  """Stacks `{name}_k1 … {name}_kK` into [N, K]."""
  k = 1
  cols = []
  while f"{name}_k{k}" in metrics:
    cols.append(np.asarray(metrics[f"{name}_k{k}"]))
    k += 1
  if not cols:
    raise KeyError(f"no entries {name}_k1, {name}_k2, … in metrics")
  return np.stack(cols, axis=-1)


def gain_name(gain: float) -> str:
  """`2.0` -> "2", `0.5` -> "0.5" (the suffix of `nmse_ood_*_g{…}`)."""
  return f"{float(gain):g}"


# ----------------------------------------------------------------------------
# Evaluation data and baselines.
# ----------------------------------------------------------------------------


def task_prior_mean(task: RegressionTask, task_mean: Any = None) -> np.ndarray:
  """t̄ [D]: `task_mean` if given, else the mean of the finite task set, else 0.

  For the infinite prior t ~ N(0, I_D) the exact prior mean 0 is used (a large
  sample's mean would only add sampling noise around it).
  """
  if task_mean is not None:
    mean_D = np.asarray(task_mean, np.float64).reshape(-1)
    if mean_D.shape != (task.task_size,):
      raise ValueError(f"task_mean has shape {mean_D.shape}, want ({task.task_size},)")
    return mean_D
  task_set = task.task_set()
  if task_set is None:
    return np.zeros(task.task_size)
  return np.asarray(task_set, np.float64).mean(axis=0)


def evaluation_data(task: RegressionTask, key: jax.Array, batch_size: int) -> dict[str, np.ndarray]:
  """The evaluation batch, from `key` only.

  Returns:
    {'xs': [B, K, D], 'ys': [B, K], 'tasks': [B, D], 'signal': [B, K] = t·x_k,
     'noise': [B, K] = y_k − t·x_k}, float32 numpy arrays.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch = jax.device_get(sample_batch(key, task, int(batch_size), with_tasks=True))
  xs_BxKxD = np.asarray(batch["xs"], np.float32)
  ys_BxK = np.asarray(batch["ys"], np.float32)
  tasks_BxD = np.asarray(batch["tasks"], np.float32)
  signal_BxK = np.einsum("bkd,bd->bk", xs_BxKxD, tasks_BxD).astype(np.float32)
  return {
    "xs": xs_BxKxD,
    "ys": ys_BxK,
    "tasks": tasks_BxD,
    "signal": signal_BxK,
    "noise": (ys_BxK - signal_BxK).astype(np.float32),
  }


def ood_batch(data: Mapping[str, Any], gain: float, kind: str):
  """The OOD variant of `evaluation_data` (D.1.3) as (xs [B, K, D], ys [B, K]).

  kind "x": inputs scaled, x_k → g·x_k; kind "t": tasks scaled, t → g·t. Both
  give y_k = g·(t·x_k) + ε_k with the same noise; only the inputs differ.
  """
  if kind not in ("x", "t"):
    raise ValueError(f"kind must be 'x' or 't', got {kind!r}")
  ys_BxK = gain * data["signal"] + data["noise"]
  xs_BxKxD = gain * data["xs"] if kind == "x" else data["xs"]
  return xs_BxKxD, ys_BxK


def ridge_predictions(
  xs_BxKxD: Any, ys_BxK: Any, noise_variance: float, prior_variance: float = 1.0
) -> np.ndarray:
  """Posterior-mean predictions under t ~ N(0, τ² I), y = t·x + N(0, σ²): [B, K].

  Prediction k uses the k − 1 earlier pairs: t̂ = (XᵀX + σ²/τ² I)⁻¹ Xᵀy (the
  minimum-norm least-squares solution when σ² = 0). Float64 numpy.
  """
  xs = np.asarray(xs_BxKxD, np.float64)
  ys = np.asarray(ys_BxK, np.float64)
  B, K, D = xs.shape
  preds_BxK = np.zeros((B, K))
  if noise_variance > 0:
    outer_BxKxDxD = np.einsum("bki,bkj->bkij", xs, xs)
    # Exclusive prefix sums: context of prediction k is pairs 0..k-1.
    gram_BxKxDxD = np.cumsum(outer_BxKxDxD, axis=1) - outer_BxKxDxD
    xty_BxKxD = np.cumsum(xs * ys[..., None], axis=1) - xs * ys[..., None]
    reg = noise_variance / prior_variance
    t_hat_BxKxD = np.linalg.solve(gram_BxKxDxD + reg * np.eye(D), xty_BxKxD[..., None])[..., 0]
    preds_BxK = np.einsum("bkd,bkd->bk", t_hat_BxKxD, xs)
  else:
    for k in range(1, K):
      t_hat_BxD = np.einsum("bdk,bk->bd", np.linalg.pinv(xs[:, :k]), ys[:, :k])
      preds_BxK[:, k] = np.einsum("bd,bd->b", t_hat_BxD, xs[:, k])
  return preds_BxK


def dmmse_predictions(
  xs_BxKxD: Any, ys_BxK: Any, task_set_MxD: Any, noise_variance: float
) -> np.ndarray:
  """Posterior-mean predictions for tasks uniform on a finite set: [B, K].

  Prediction k averages t_m·x_k with weights ∝ exp(−Σ_{j<k} (y_j − t_m·x_j)² / 2σ²)
  (σ² floored at 1e-12). Float64 numpy, in blocks of the batch.
  """
  xs = np.asarray(xs_BxKxD, np.float64)
  ys = np.asarray(ys_BxK, np.float64)
  tasks_MxD = np.asarray(task_set_MxD, np.float64)
  B, K, _ = xs.shape
  M = tasks_MxD.shape[0]
  var = max(float(noise_variance), 1e-12)
  block = max(1, _DMMSE_CHUNK_ELEMENTS // max(1, K * M))
  preds_BxK = np.empty((B, K))
  for lo in range(0, B, block):
    x_bKD, y_bK = xs[lo : lo + block], ys[lo : lo + block]
    task_preds_bxKxM = np.einsum("bkd,md->bkm", x_bKD, tasks_MxD)
    sq_bxKxM = np.square(y_bK[..., None] - task_preds_bxKxM)
    logw_bxKxM = -(np.cumsum(sq_bxKxM, axis=1) - sq_bxKxM) / (2 * var)
    logw_bxKxM -= logw_bxKxM.max(axis=-1, keepdims=True)
    w_bxKxM = np.exp(logw_bxKxM)
    preds_BxK[lo : lo + block] = np.sum(w_bxKxM * task_preds_bxKxM, -1) / np.sum(w_bxKxM, -1)
  return preds_BxK


def _baseline_predictions(
  task: RegressionTask, data: Mapping[str, np.ndarray], task_mean: Any
) -> dict[str, np.ndarray]:
  preds = {
    "zero": np.zeros_like(data["ys"], dtype=np.float64),
    "prior": np.einsum(
      "bkd,d->bk", data["xs"].astype(np.float64), task_prior_mean(task, task_mean)
    ),
    "ridge": ridge_predictions(data["xs"], data["ys"], task.noise_variance),
  }
  task_set = task.task_set()
  if task_set is not None:
    preds["dmmse"] = dmmse_predictions(data["xs"], data["ys"], task_set, task.noise_variance)
  return preds


def baseline_losses(
  task: RegressionTask, key: jax.Array, batch_size: int, *, task_mean: Any = None
) -> dict[str, np.ndarray]:
  """Per-prediction MSE [K] of the baselines on the evaluation batch of `key`.

  Keys: 'zero', 'prior' (t̄·x), 'ridge' (Bayes-optimal for t ~ N(0, I_D)) and,
  for a finite task set, 'dmmse' (Bayes-optimal for the set).
  """
  data = evaluation_data(task, key, batch_size)
  ys = data["ys"].astype(np.float64)
  return {
    name: np.mean(np.square(p - ys), axis=0)
    for name, p in _baseline_predictions(task, data, task_mean).items()
  }


# ----------------------------------------------------------------------------
# Model metrics.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _behaviour_fn(model: RegressionTransformer, gains: tuple[float, ...]):
  """Per-checkpoint metrics on the in-distribution and the 2·G OOD batches."""

  def fn(params, data):
    xs, signal, noise = data["xs"], data["signal"], data["noise"]
    groups_x, groups_y = [xs], [signal + noise]
    for kind in ("x", "t"):
      for g in gains:
        groups_x.append(g * xs if kind == "x" else xs)
        groups_y.append(g * signal + noise)
    xs_GxBxKxD, ys_GxBxK = jnp.stack(groups_x), jnp.stack(groups_y)
    # One group at a time bounds memory to one batch per checkpoint.
    preds_GxBxK = jax.lax.map(
      lambda xy: model.predict(params, xy[0], xy[1]), (xs_GxBxKxD, ys_GxBxK)
    )
    sq_err_GxBxK = jnp.square(preds_GxBxK - ys_GxBxK)
    nmse_G = jnp.sum(sq_err_GxBxK, axis=(1, 2)) / jnp.sum(jnp.square(ys_GxBxK), axis=(1, 2))
    preds_BxK = preds_GxBxK[0]
    out = {
      "loss_K": jnp.mean(sq_err_GxBxK[0], axis=0),
      "nmse": nmse_G[0],
      "nmse_ood": nmse_G[1:].reshape(2, len(gains)),
      "dist_zero": jnp.mean(jnp.square(preds_BxK)),
    }
    for name, ref_BxK in data["baselines"].items():
      out[f"dist_{name}"] = jnp.mean(jnp.square(preds_BxK - ref_BxK))
    return out

  return fn


def icl_scores(losses_NxK: Any) -> dict[str, np.ndarray]:
  """ICL_{1:4} = L_4 − L_1 and ICL_{4:8} = L_8 − L_4 (1-indexed) from [N, K] losses.

  Returns {'icl_1_4': [N], 'icl_4_8': [N]}, NaN where K is too small.
  """
  losses = np.asarray(losses_NxK)
  nan_N = np.full(losses.shape[:-1], np.nan, losses.dtype)
  K = losses.shape[-1]
  return {
    "icl_1_4": losses[..., 3] - losses[..., 0] if K >= 4 else nan_N,
    "icl_4_8": losses[..., 7] - losses[..., 3] if K >= 8 else nan_N.copy(),
  }


def behaviour_metrics(
  model: RegressionTransformer,
  params_list: Sequence[Params],
  task: RegressionTask,
  key: jax.Array,
  batch_size: int = 1024,
  *,
  gains: Sequence[float] = DEFAULT_GAINS,
  task_mean: Any = None,
  checkpoint_chunk: int = 8,
) -> dict[str, np.ndarray]:
  """Behavioural metrics of every checkpoint (see the module docstring).

  Args:
    model: the RegressionTransformer the checkpoints belong to.
    params_list: param pytrees, one per checkpoint (indexed chunk by chunk).
    task: the training distribution (its finite task set defines t̄ and dMMSE).
    key: PRNG key; the evaluation data derive from it alone.
    batch_size: evaluation sequences B.
    gains: OOD gains g for `nmse_ood_x_g{g}` and `nmse_ood_t_g{g}`.
    task_mean: overrides t̄ [D] (e.g. the mean of the tasks actually seen).
    checkpoint_chunk: checkpoints per compiled call.

  Returns:
    Flat dict name -> [N] array (per-prediction entries `<name>_k{k}`, 1-indexed).
  """
  if task.task_size != model.task_size or task.max_examples > model.max_examples:
    raise ValueError(
      f"task (D={task.task_size}, K={task.max_examples}) does not fit the model "
      f"(D={model.task_size}, K<={model.max_examples})"
    )
  gains = tuple(float(g) for g in gains)
  if len({gain_name(g) for g in gains}) != len(gains):
    raise ValueError(f"gains must be distinct, got {gains}")
  data = evaluation_data(task, key, batch_size)
  baselines = _baseline_predictions(task, data, task_mean)
  program_data = {
    "xs": data["xs"],
    "signal": data["signal"],
    "noise": data["noise"],
    "baselines": {k: v.astype(np.float32) for k, v in baselines.items() if k != "zero"},
  }
  # lru_cache key: flax makes every Module a dataclass(unsafe_hash=True), which pyright misses.
  fn = _behaviour_fn(model, gains)  # pyright: ignore[reportArgumentType]  (hashable)
  raw = map_checkpoints(fn, params_list, program_data, checkpoint_chunk=checkpoint_chunk)
  num_ckpts, K = raw["loss_K"].shape
  out: dict[str, np.ndarray] = {}
  for k in range(K):
    out[f"loss_k{k + 1}"] = raw["loss_K"][:, k]
  out["mse"] = raw["loss_K"].mean(axis=1)
  out["nmse"] = raw["nmse"]
  out.update(icl_scores(raw["loss_K"]))
  for name in ("zero", "prior", "ridge", "dmmse"):
    if f"dist_{name}" in raw:
      out[f"dist_{name}"] = raw[f"dist_{name}"]
  for i, kind in enumerate(("x", "t")):
    for j, g in enumerate(gains):
      out[f"nmse_ood_{kind}_g{gain_name(g)}"] = raw["nmse_ood"][:, i, j]
  ys = data["ys"].astype(np.float64)
  for name, preds in baselines.items():
    loss_K = np.mean(np.square(preds - ys), axis=0)
    for k in range(K):
      out[f"{name}_loss_k{k + 1}"] = np.full(num_ckpts, loss_K[k], np.float32)
  return out


def lr_overlap(
  model: RegressionTransformer,
  checkpoints: Sequence[Params],
  task: RegressionTask,
  key: jax.Array,
  batch_size: int = 256,
  *,
  checkpoint_chunk: int = 8,
  atol: float = overlap.DEFAULT_ATOL,
  rtol: float = overlap.DEFAULT_RTOL,
  mask_batch: int | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Overlap metrics of regression-transformer checkpoints and the head names.

  The evaluation batch is `evaluation_data(task, key, batch_size)`
  (the behaviour / structure metrics' batch for equal key and size).
  """
  if task.task_size != model.task_size or task.max_examples > model.max_examples:
    raise ValueError(f"task {task} does not fit the model {model}")
  data = evaluation_data(task, key, batch_size)
  metrics = overlap.overlap_over_checkpoints(
    model.head_activations,
    model.ablated_loss,
    checkpoints,
    {"xs": data["xs"], "ys": data["ys"]},
    checkpoint_chunk=checkpoint_chunk,
    atol=atol,
    rtol=rtol,
    mask_batch=mask_batch,
  )
  return metrics, overlap.head_names(model.num_layers, model.num_heads)
