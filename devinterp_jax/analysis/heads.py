"""Head-level weight-refined LLC (wrLLC): normalisation, clustering, dispersion.

Input is the wrLLC of R attention heads (names such as 'L0H1') at N
checkpoints, `llc_RxN` (e.g. `LLCResult.llc_mean` of a per-head restriction,
[restriction, checkpoint]), optionally with its standard error `sem_RxN`
(`LLCResult.llc_sem`). Everything here is numpy / scikit-learn / scipy.

Missing values. A checkpoint where all chains of a head diverged has a NaN
mean. `normalize_trajectories`, `cluster_trajectories`, `choose_num_clusters`,
`dispersion` and `head_summary` refuse non-finite values with a ValueError
that names the heads and steps (checkpoint indices) concerned; drop such
checkpoints explicitly with `drop_nonfinite_checkpoints` first. Only the figure
`devinterp_jax.viz.heads.plot_head_trajectories` accepts them: lines break at the
gap and its dispersion panel uses the checkpoints where every head is finite.

Normalisation (per head, over checkpoints; `NORMALIZATIONS`):
  none     the raw wrLLC.
  zscore   (λ − mean) / std (population std, ddof=0); a constant head → 0.
  max      λ / max |λ|; an all-zero head stays 0.
  final    λ / λ[-1]; refused (ValueError naming the head) unless the last
           value is positive and ≥ 1e-12 · max |λ| (a negative or vanishing
           denominator would flip or blow up the shape).
  minmax   (λ − min) / (max − min) ∈ [0, 1]; a constant head → 0.

Clustering groups heads by the shape of their normalised trajectory
(Euclidean distance between the N-vectors): k-means (scikit-learn, n_init=10,
random_state=seed) or agglomerative (scipy `linkage` + `fcluster` with
criterion 'maxclust', so the linkage matrix can be drawn as a dendrogram).
Labels are renumbered 0..K−1 in order of each cluster's first head (the head
with the smallest index), so equal partitions get equal labels whatever the
method or seed.

Usage:
  steps, llc, sem, dropped = drop_nonfinite_checkpoints(steps, llc, sem)
  km = cluster_trajectories(llc, names, num_clusters=3)
  summary = head_summary(steps, llc, names)   # JSON-able
  # the figures (devinterp_jax.viz.heads):
  plot_head_trajectories(steps, llc, names, sem_RxN=sem, boundaries=stage_result,
                         clusters=km, path=f"{out}/heads.png")
  plot_head_clusters(steps, llc, names, km, f"{out}/head_clusters.png")
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence, cast

import numpy as np
from scipy.cluster import hierarchy
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

NORMALIZATIONS = ("none", "zscore", "max", "final", "minmax")
CLUSTER_METHODS = ("kmeans", "hierarchical")
LINKAGES = ("ward", "average", "complete", "single")
_FINAL_EPS = 1e-12


def _names(names: Sequence[str] | None, num_heads: int) -> list[str]:
  if names is None:
    return [f"head {i}" for i in range(num_heads)]
  names = [str(n) for n in names]
  if len(names) != num_heads:
    raise ValueError(f"{len(names)} names for {num_heads} heads")
  return names


def _check_llc(
  llc_RxN, names: Sequence[str] | None = None, *, allow_nonfinite: bool = False
) -> tuple[np.ndarray, list[str]]:
  """llc as a float [R, N] array and the head names; refuses NaN/inf by name."""
  llc_RxN = np.asarray(llc_RxN, dtype=float)
  if llc_RxN.ndim != 2:
    raise ValueError(f"llc_RxN must be 2-D [heads, checkpoints], got shape {llc_RxN.shape}")
  if llc_RxN.shape[0] < 1 or llc_RxN.shape[1] < 1:
    raise ValueError(
      f"llc_RxN needs at least one head and one checkpoint, got shape {llc_RxN.shape}"
    )
  names = _names(names, llc_RxN.shape[0])
  if not allow_nonfinite:
    bad = ~np.isfinite(llc_RxN)
    if bad.any():
      where = "; ".join(
        f"{names[r]} at checkpoint indices {np.flatnonzero(bad[r]).tolist()}"
        for r in np.flatnonzero(bad.any(axis=1))
      )
      raise ValueError(
        "non-finite wrLLC (e.g. all chains diverged): "
        + where
        + ". Drop those checkpoints with drop_nonfinite_checkpoints first."
      )
  return llc_RxN, names


def _check_steps(steps, num_checkpoints: int) -> np.ndarray:
  steps = np.asarray(steps)
  if steps.ndim != 1 or len(steps) != num_checkpoints:
    raise ValueError(f"steps has shape {steps.shape}, expected ({num_checkpoints},)")
  if np.any(np.diff(steps) <= 0):
    raise ValueError("steps must be strictly increasing")
  if np.any(steps < 0):
    raise ValueError("steps must be non-negative")
  return steps


def drop_nonfinite_checkpoints(
  steps, llc_RxN, sem_RxN=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
  """Removes checkpoints where any head's wrLLC (or its sem) is non-finite.

  Returns (steps [N'], llc [R, N'], sem [R, N'] or None, dropped steps).
  """
  llc_RxN, _ = _check_llc(llc_RxN, allow_nonfinite=True)
  steps = _check_steps(steps, llc_RxN.shape[1])
  keep_N = np.all(np.isfinite(llc_RxN), axis=0)
  if sem_RxN is not None:
    sem_RxN = np.asarray(sem_RxN, dtype=float)
    if sem_RxN.shape != llc_RxN.shape:
      raise ValueError(f"sem_RxN has shape {sem_RxN.shape}, llc_RxN {llc_RxN.shape}")
    keep_N &= np.all(np.isfinite(sem_RxN), axis=0)
    sem_RxN = sem_RxN[:, keep_N]
  return (steps[keep_N], llc_RxN[:, keep_N], sem_RxN, [int(s) for s in steps[~keep_N]])


def normalize_trajectories(
  llc_RxN, method: str = "zscore", names: Sequence[str] | None = None
) -> np.ndarray:
  """Per-head normalised wrLLC trajectories [R, N] (see the module docstring).

  `names` only label the error messages. Raises ValueError for an unknown
  method, a non-2-D array, non-finite values, or (for 'final') a head whose
  last value is not clearly positive.
  """
  if method not in NORMALIZATIONS:
    raise ValueError(f"unknown normalisation {method!r}; expected one of {NORMALIZATIONS}")
  x, names = _check_llc(llc_RxN, names)
  if method == "none":
    return x.copy()
  if method == "zscore":
    std = x.std(axis=1, keepdims=True)
    return (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
  if method == "max":
    top = np.abs(x).max(axis=1, keepdims=True)
    return x / np.where(top > 0, top, 1.0)
  if method == "minmax":
    lo, span = x.min(axis=1, keepdims=True), np.ptp(x, axis=1, keepdims=True)
    return (x - lo) / np.where(span > 0, span, 1.0)
  final = x[:, -1:]
  bad = final[:, 0] <= _FINAL_EPS * np.abs(x).max(axis=1)
  if bad.any():
    raise ValueError(
      "normalisation 'final' needs a positive last wrLLC; not so for "
      + ", ".join(f"{names[r]} (last value {x[r, -1]:.4g})" for r in np.flatnonzero(bad))
    )
  return x / final


def _relabel(raw_R: np.ndarray) -> np.ndarray:
  """Labels 0..K−1 in order of each cluster's first member."""
  order = {}
  for v in raw_R.tolist():
    order.setdefault(v, len(order))
  return np.asarray([order[v] for v in raw_R.tolist()], dtype=np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadClusters:
  """A partition of heads by wrLLC trajectory shape.

  `labels` [R] are 0..K−1, numbered by each cluster's first head. `centers`
  [K, N] are the cluster-mean trajectories and `normalized` [R, N] the
  trajectories they average, both in `normalize` units. `silhouette` is the
  Euclidean silhouette score, None unless 2 ≤ K ≤ R − 1. `linkage_matrix`
  ([R − 1, 4], scipy format) and `linkage` are set for 'hierarchical' only.
  `num_clusters` is the number of distinct labels (can be below the request
  when heads coincide; a warning says so).
  """

  labels: np.ndarray
  names: tuple[str, ...]
  method: str
  normalize: str
  num_clusters: int
  centers: np.ndarray
  normalized: np.ndarray
  silhouette: float | None
  linkage_matrix: np.ndarray | None = None
  linkage: str | None = None
  seed: int = 0

  @property
  def members(self) -> list[list[str]]:
    """Head names per cluster, in label order."""
    return [
      [n for n, l in zip(self.names, self.labels) if l == k] for k in range(self.num_clusters)
    ]

  def to_dict(self) -> dict[str, Any]:
    """JSON-able summary (no trajectories or linkage matrix)."""
    return {
      "method": self.method,
      "normalize": self.normalize,
      "linkage": self.linkage,
      "num_clusters": self.num_clusters,
      "seed": self.seed,
      "silhouette": self.silhouette,
      "labels": {n: int(l) for n, l in zip(self.names, self.labels)},
      "members": self.members,
    }


def cluster_trajectories(
  llc_RxN,
  names: Sequence[str],
  *,
  num_clusters: int,
  method: str = "kmeans",
  normalize: str = "zscore",
  linkage: str = "ward",
  seed: int = 0,
) -> HeadClusters:
  """Clusters heads by their normalised wrLLC trajectories.

  Args:
    llc_RxN: wrLLC [heads, checkpoints], finite.
    names: head names [R].
    num_clusters: K, 1 ≤ K ≤ R.
    method: 'kmeans' (KMeans(n_init=10, random_state=seed)) or 'hierarchical'
      (scipy linkage with `linkage`, Euclidean, cut by fcluster 'maxclust').
    normalize: one of `NORMALIZATIONS`, applied per head first.
    linkage: 'ward', 'average', 'complete' or 'single' (hierarchical only).
    seed: k-means seed.
  """
  if method not in CLUSTER_METHODS:
    raise ValueError(f"unknown clustering method {method!r}; expected one of {CLUSTER_METHODS}")
  if method == "hierarchical" and linkage not in LINKAGES:
    raise ValueError(f"unknown linkage {linkage!r}; expected one of {LINKAGES}")
  x_RxN = normalize_trajectories(llc_RxN, normalize, names)
  names = _names(names, x_RxN.shape[0])
  num_heads = x_RxN.shape[0]
  if not 1 <= int(num_clusters) <= num_heads:
    raise ValueError(
      f"num_clusters must be between 1 and the number of heads ({num_heads}), got {num_clusters}"
    )
  num_clusters = int(num_clusters)
  z = None
  if method == "kmeans":
    with threadpool_limits(limits=1), warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)  # reported below as fewer clusters
      # scikit-learn is untyped: pyright infers `n_init: str` from its "auto" default.
      kmeans = cast(Any, KMeans)(n_clusters=num_clusters, n_init=10, random_state=seed)
      raw = kmeans.fit_predict(x_RxN)
  elif num_heads == 1:
    raw = np.zeros(1, dtype=np.int64)
  else:
    z = hierarchy.linkage(x_RxN, method=linkage, metric="euclidean")
    raw = hierarchy.fcluster(z, t=num_clusters, criterion="maxclust")
  labels_R = _relabel(np.asarray(raw))
  k = int(labels_R.max()) + 1
  if k != num_clusters:
    warnings.warn(
      f"{method} clustering found {k} distinct clusters, {num_clusters} requested "
      "(coinciding trajectories)",
      RuntimeWarning,
      stacklevel=2,
    )
  centers_KxN = np.stack([x_RxN[labels_R == j].mean(axis=0) for j in range(k)])
  sil = (
    float(silhouette_score(x_RxN, labels_R, metric="euclidean"))
    if 2 <= k <= num_heads - 1
    else None
  )
  return HeadClusters(
    labels=labels_R,
    names=tuple(names),
    method=method,
    normalize=normalize,
    num_clusters=k,
    centers=centers_KxN,
    normalized=x_RxN,
    silhouette=sil,
    linkage_matrix=z,
    linkage=linkage if method == "hierarchical" else None,
    seed=seed,
  )


def choose_num_clusters(
  llc_RxN,
  names: Sequence[str],
  *,
  k_range: Sequence[int] = (2, 8),
  method: str = "kmeans",
  normalize: str = "zscore",
  linkage: str = "ward",
  seed: int = 0,
) -> tuple[int, dict[int, float]]:
  """K in [k_range[0], k_range[1]] (inclusive, clipped to 2..R−1) with the best silhouette.

  Ties go to the smaller K. Returns (K, {K: silhouette}). Raises ValueError
  when fewer than 3 heads leave no K with a defined silhouette.
  """
  x, names = _check_llc(llc_RxN, names)
  lo, hi = max(2, int(k_range[0])), min(x.shape[0] - 1, int(k_range[1]))
  if lo > hi:
    raise ValueError(
      f"no K in {tuple(k_range)} has a silhouette with {x.shape[0]} heads (needs 2 ≤ K ≤ heads − 1)"
    )
  scores: dict[int, float] = {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # fewer distinct clusters than K
    for k in range(lo, hi + 1):
      c = cluster_trajectories(
        x, names, num_clusters=k, method=method, normalize=normalize, linkage=linkage, seed=seed
      )
      if c.silhouette is not None and c.num_clusters == k:
        scores[k] = c.silhouette
  if not scores:
    raise ValueError(f"no K in {lo}..{hi} gave that many distinct clusters")
  best = max(scores.values())
  return min(k for k, s in scores.items() if s == best), scores


def dispersion(llc_RxN) -> dict[str, np.ndarray]:
  """Across-head spread of the wrLLC at each checkpoint.

  Returns {mean, variance, std, cv}, each [N]: the mean over heads, the
  population variance (ddof=0: the heads are the whole set, not a sample)
  and std, and cv = std / |mean| (NaN where the mean is 0).
  """
  x, _ = _check_llc(llc_RxN)
  mean_N, var_N = x.mean(axis=0), x.var(axis=0)
  std_N = np.sqrt(var_N)
  with np.errstate(divide="ignore", invalid="ignore"):
    cv_N = np.where(mean_N != 0, std_N / np.abs(mean_N), np.nan)
  return {"mean": mean_N, "variance": var_N, "std": std_N, "cv": cv_N}


def _jfloat(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


def head_summary(
  steps,
  llc_RxN,
  names: Sequence[str],
  *,
  sem_RxN=None,
  num_clusters: int | None = None,
  k_range: Sequence[int] = (2, 8),
  normalize: str = "zscore",
  linkage: str = "ward",
  seed: int = 0,
) -> dict[str, Any]:
  """A JSON-able summary of the head wrLLCs for a report.

  Keys: `heads`, `steps`, `final_step`, `final_llc` and `final_sem` ({head:
  value}; sem None when not given), `peak_step` / `peak_llc` (argmax over
  checkpoints, first on ties), `num_clusters` and `num_clusters_source`
  ('given', 'silhouette' via `choose_num_clusters` with kmeans, or 'too few
  heads' → 1 when R < 3), `silhouette_by_k`, `clusters` ({'kmeans': …,
  'hierarchical': …} from `HeadClusters.to_dict`), `cluster_agreement_ari`
  (adjusted Rand index between the two), `dispersion_final` (mean, variance,
  std, cv across heads at the last checkpoint), `normalize`, `linkage`, `seed`.
  """
  x, names = _check_llc(llc_RxN, names)
  steps = _check_steps(steps, x.shape[1])
  if sem_RxN is not None:
    sem_RxN = np.asarray(sem_RxN, dtype=float)
    if sem_RxN.shape != x.shape:
      raise ValueError(f"sem_RxN has shape {sem_RxN.shape}, llc_RxN {x.shape}")
  scores: dict[int, float] = {}
  if num_clusters is not None:
    k, source = int(num_clusters), "given"
  elif x.shape[0] < 3:
    k, source = 1, "too few heads"
  else:
    k, scores = choose_num_clusters(
      x, names, k_range=k_range, normalize=normalize, linkage=linkage, seed=seed
    )
    source = "silhouette"
  by_method = {
    m: cluster_trajectories(
      x, names, num_clusters=k, method=m, normalize=normalize, linkage=linkage, seed=seed
    )
    for m in CLUSTER_METHODS
  }
  peak_R = np.argmax(x, axis=1)
  d = dispersion(x[:, -1:])
  return {
    "heads": names,
    "steps": [int(s) for s in steps],
    "final_step": int(steps[-1]),
    "final_llc": {n: _jfloat(v) for n, v in zip(names, x[:, -1])},
    "final_sem": {
      n: (None if sem_RxN is None else _jfloat(sem_RxN[r, -1])) for r, n in enumerate(names)
    },
    "peak_step": {n: int(steps[i]) for n, i in zip(names, peak_R)},
    "peak_llc": {n: _jfloat(x[r, i]) for r, (n, i) in enumerate(zip(names, peak_R))},
    "num_clusters": k,
    "num_clusters_source": source,
    "silhouette_by_k": {str(kk): v for kk, v in scores.items()},
    "clusters": {m: c.to_dict() for m, c in by_method.items()},
    "cluster_agreement_ari": float(
      adjusted_rand_score(by_method["kmeans"].labels, by_method["hierarchical"].labels)
    ),
    "dispersion_final": {key: _jfloat(v[0]) for key, v in d.items()},
    "normalize": normalize,
    "linkage": linkage,
    "seed": seed,
  }
