"""LLC beside Hessian curvature over training (paper Fig. B.4; `analysis/hessian.py`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures


def llc_vs_hessian_figure(
  steps,
  llc_mean,
  llc_band,
  stats: dict[str, np.ndarray],
  *,
  band_label: str,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> Figure:
  """Three stacked panels sharing the step axis (`figures.step_axis`: log, symlog with
  step 0): LLC mean ± `llc_band` (legend "± {band_label}", e.g. "std over chains"),
  Hutchinson trace ± standard error, and the top eigenvalue(s). Dashed vertical
  lines mark `boundaries` (e.g. LLC stage boundaries) on every panel.

  Args:
    steps: [N] training steps of the checkpoints.
    llc_mean: [N] LLC means.
    llc_band: [N] half-width of the LLC band; `band_label` says what it is.
    stats: the dict of `hessian_stats` (`trace`, `trace_se`, `top_eigenvalues`).
    boundaries: steps at which to draw vertical dashed lines.
    title: figure title.
  """
  steps, llc_mean, llc_band = (np.asarray(x, dtype=float) for x in (steps, llc_mean, llc_band))
  trace = np.asarray(stats["trace"], dtype=float)
  trace_se = np.asarray(stats.get("trace_se", np.zeros_like(trace)), dtype=float)
  top = np.asarray(stats["top_eigenvalues"], dtype=float)
  top = top[:, None] if top.ndim == 1 else top
  n = len(steps)
  for name, arr in (
    ("llc_mean", llc_mean),
    ("llc_band", llc_band),
    ("trace", trace),
    ("trace_se", trace_se),
    ("top_eigenvalues", top),
  ):
    if len(arr) != n:
      raise ValueError(f"{name} has {len(arr)} entries for {n} steps")
  fig, axes = figures.figure(3, 1, figsize=(8, 9), sharex=True)
  ax = axes[0]
  ax.plot(steps, llc_mean, color="tab:blue", marker=".", label=r"LLC $\hat\lambda$")
  ax.fill_between(
    steps,
    llc_mean - llc_band,
    llc_mean + llc_band,
    color="tab:blue",
    alpha=0.25,
    label=f"± {band_label}",
  )
  ax.set_ylabel(r"LLC $\hat\lambda$")
  ax = axes[1]
  ax.plot(steps, trace, color="tab:red", marker=".", label="Hessian trace (Hutchinson)")
  ax.fill_between(
    steps, trace - trace_se, trace + trace_se, color="tab:red", alpha=0.25, label="± standard error"
  )
  ax.set_ylabel("tr H")
  ax = axes[2]
  colors = figures.colormap("viridis")(np.linspace(0, 0.85, top.shape[1]))
  for k in range(top.shape[1]):
    ax.plot(steps, top[:, k], color=colors[k], marker=".", label=rf"$\lambda_{{{k + 1}}}$")
  ax.set_ylabel("top eigenvalues (Lanczos)")
  for ax in axes:
    figures.step_axis(
      ax, steps, boundaries=boundaries, label=ax is axes[-1], boundary_label="stage boundary"
    )
    ax.legend(fontsize=8, loc="best")
  axes[0].set_title(title or "LLC vs Hessian curvature")
  fig.tight_layout()
  return fig


def plot_llc_vs_hessian(
  steps,
  llc_mean,
  llc_band,
  stats: dict[str, np.ndarray],
  path: str,
  *,
  band_label: str,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> str:
  """`llc_vs_hessian_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    llc_vs_hessian_figure(
      steps, llc_mean, llc_band, stats, band_label=band_label, boundaries=boundaries, title=title
    ),
    path,
  )
