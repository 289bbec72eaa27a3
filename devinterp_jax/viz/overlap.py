"""Functional-overlap figure (mean ablation of heads; `analysis/overlap.py` computes it).

Weak-ablation checkpoints. The overlap O_ij = (Δ_ij − Δ_i − Δ_j) / Δ_ij divides by
the pair's loss increase Δ_ij, and the robustness 1 − Σ_i Δ_i / Δ_all by the
increase from ablating every head. Where ablating every head barely changes the
loss (early checkpoints, before the heads do anything), these denominators are
tiny, though above the analysis' absolute guard, and O spikes to meaningless
values (e.g. 2.6). Such checkpoints are masked in the figures: a checkpoint is
*weak* when |Δ_all| < `WEAK_ABLATION_FRACTION` (5 %) of the run's largest |Δ_all|
over checkpoints (or Δ_all is not finite). Their overlap and robustness values are
not drawn, the checkpoints are hatched grey on the step axis, and the panel title
says how many were masked; a weak last checkpoint hatches its O heatmap too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures

WEAK_ABLATION_FRACTION = 0.05
_MASK_STYLE = dict(facecolor="0.92", edgecolor="0.6", hatch="///", lw=0, zorder=0)
MAX_ANNOTATED_HEADS = 12  # heatmaps with at most this many heads print their values


def weak_ablation_mask(delta_all: Any, fraction: float = WEAK_ABLATION_FRACTION) -> np.ndarray:
  """[N] True where |Δ_all| < `fraction` × max over checkpoints of |Δ_all|, or Δ_all is
  not finite (see the module docstring)."""
  d = np.abs(np.asarray(delta_all, np.float64)).reshape(-1)
  finite = np.isfinite(d)
  if not finite.any():
    return np.ones(d.shape, bool)
  return ~finite | (d < fraction * float(d[finite].max()))


def mask_note(mask: np.ndarray, fraction: float = WEAK_ABLATION_FRACTION) -> str:
  """ "" or e.g. "hatched: 3 checkpoints with Δ_all < 5% of max (not drawn)"."""
  n = int(np.sum(mask))
  if not n:
    return ""
  return (
    f"hatched: {n} checkpoint{'s' if n > 1 else ''} with Δ_all < {100 * fraction:g}% "
    "of max (not drawn)"
  )


def shade_masked(ax, steps: Any, mask: np.ndarray) -> None:
  """Hatched grey spans over the masked checkpoints (runs merged), reaching half-way
  (geometrically for positive steps) to the neighbouring checkpoints."""
  steps = np.asarray(steps, np.float64)
  mask = np.asarray(mask, bool)
  if not mask.any():
    return

  def mid(a: float, b: float) -> float:
    return float(np.sqrt(a * b)) if a > 0 and b > 0 else 0.5 * (a + b)

  i, n = 0, len(steps)
  while i < n:
    if not mask[i]:
      i += 1
      continue
    j = i
    while j + 1 < n and mask[j + 1]:
      j += 1
    lo = steps[i] if i == 0 else mid(steps[i - 1], steps[i])
    hi = steps[j] if j == n - 1 else mid(steps[j], steps[j + 1])
    if hi <= lo:  # a lone end checkpoint: a thin span around it
      lo, hi = (lo / 1.15, lo * 1.15) if lo > 0 else (lo - 0.5, lo + 0.5)
    ax.axvspan(lo, hi, **_MASK_STYLE)
    i = j + 1


def masked(values: Any, mask: np.ndarray) -> np.ndarray:
  """`values` [N] as floats with NaN at the masked checkpoints."""
  return np.where(mask, np.nan, np.asarray(values, np.float64))


def _heatmap(
  fig, ax, matrix_RxR, names: Sequence[str], title: str, *, limit: float | None, weak_note: str = ""
) -> Any:
  """A heatmap of an [R, R] matrix (NaN grey). Colour limits ±`limit`, or ±max |value|
  (symmetric around 0) when `limit` is None. Returns the image."""
  cmap = figures.colormap("RdBu_r").with_extremes(bad="0.85")
  matrix_RxR = np.asarray(matrix_RxR, np.float64)
  finite = matrix_RxR[np.isfinite(matrix_RxR)]
  if limit is None:
    limit = float(np.max(np.abs(finite))) if finite.size and np.any(finite) else 1.0
  im = ax.imshow(np.ma.masked_invalid(matrix_RxR), cmap=cmap, vmin=-limit, vmax=limit)
  R = len(names)
  ax.set_xticks(range(R), names, rotation=90, fontsize=8)
  ax.set_yticks(range(R), names, fontsize=8)
  if R <= MAX_ANNOTATED_HEADS:
    size = 8 if R <= 8 else 6.5
    for i in range(R):
      for j in range(R):
        if np.isfinite(matrix_RxR[i, j]):
          ax.text(j, i, f"{matrix_RxR[i, j]:.2f}", ha="center", va="center", fontsize=size)
  if weak_note:
    ax.axhspan(-0.5, R - 0.5, fill=False, edgecolor="0.4", hatch="///", lw=0)
    title += f"\n({weak_note})"
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return im


def overlap_figure(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  names: Sequence[str],
  *,
  boundaries: Sequence[float] | None = (),
  title: str = "",
  fraction: float = WEAK_ABLATION_FRACTION,
) -> Figure:
  """Four panels on a 2 × 2 grid: the last checkpoint's O (colour limits ±max |O|),
  S_attn and S_out (correlations, ±1) as heatmaps (NaN grey), and mean / max
  off-diagonal O and the robustness over log step with stage boundaries dashed.
  Weak-ablation checkpoints (module docstring; needs `metrics["delta_all"]`) are
  masked.
  """
  steps = np.asarray(steps)
  delta_all = metrics.get("delta_all")
  mask = (
    weak_ablation_mask(delta_all, fraction) if delta_all is not None else np.zeros(len(steps), bool)
  )
  fig, axes = figures.figure(2, 2, figsize=(11, 9.5))
  for ax, key, label, limit in (
    (axes[0, 0], "overlap", "overlap O", None),
    (axes[0, 1], "s_attn", "S_attn", 1.0),
    (axes[1, 0], "s_out", "S_out", 1.0),
  ):
    _heatmap(
      fig,
      ax,
      np.asarray(metrics[key])[-1],
      names,
      f"{label} (step {steps[-1]})",
      limit=limit,
      weak_note=(
        f"masked: weak ablation, Δ_all < {100 * fraction:g}% of max"
        if mask[-1] and key == "overlap"
        else ""
      ),
    )
  ax = axes[1, 1]
  shade_masked(ax, steps, mask)
  for key, label in (
    ("overlap_mean", "mean off-diagonal O"),
    ("overlap_max", "max off-diagonal O"),
    ("robustness", "robustness"),
  ):
    ax.plot(steps, masked(metrics[key], mask), marker=".", label=label)
  ax.axhline(0, color="gray", lw=0.8)
  figures.step_axis(ax, steps, boundaries=boundaries or ())
  ax.legend(fontsize=7)
  note = mask_note(mask, fraction)
  ax.set_title(
    r"overlap and robustness $1 - \sum_i \Delta_i / \Delta_{all}$" + (f"\n{note}" if note else ""),
    fontsize=10,
  )
  fig.suptitle(title or "functional overlap of attention heads (mean-ablation)")
  fig.tight_layout()
  return fig


def plot_overlap(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  names: Sequence[str],
  path: str,
  *,
  boundaries: Sequence[float] | None = (),
  title: str = "",
) -> str:
  """`overlap_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    overlap_figure(steps, metrics, names, boundaries=boundaries, title=title), path
  )
