"""Essential dynamics figures (`analysis/essential_dynamics.py`): the smoothed output
trajectory in the planes (PC1, PC z), coloured by log step, with its evolute, the ED
milestones and the LLC stage boundaries; and each PC against log step."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure

from devinterp_jax.viz import figures


def _nearest(steps: np.ndarray, targets: Sequence[int]) -> list[int]:
  """The point index nearest each target step in log step."""
  logs = np.log10(np.maximum(steps.astype(float), 1.0))
  return [int(np.argmin(np.abs(logs - np.log10(max(float(t), 1.0))))) for t in targets]


def ed_figure(result: Any, llc_boundaries: Sequence[int] = (), title: str = "") -> Figure:
  """Top row: one panel per PC plane of `result` (an `EDResult`): raw scores (grey),
  the smoothed curve coloured by log step, the evolute (centres of the osculating
  circles, black dots inside the panel), ED milestones (red triangles) and the
  points nearest each LLC boundary (blue squares). Bottom row: each smoothed PC
  against log step, with the boundaries (dashed) and milestones (red dotted)."""
  steps = np.asarray(result.steps_U)
  planes = list(result.planes)
  cols = max(len(planes), 1)
  fig, grid = figures.figure(2, cols, figsize=(5.2 * cols, 8.4), grid=True)
  evr = result.explained_variance_ratio_Z
  norm = (
    SymLogNorm(linthresh=1.0, vmin=float(steps.min()), vmax=float(steps.max()))
    if steps.min() <= 0
    else LogNorm(vmin=float(steps.min()), vmax=float(steps.max()))
  )
  milestone_idx = [m["index"] for m in result.milestones]
  boundary_idx = _nearest(steps, llc_boundaries)
  points = None
  for i, plane in enumerate(planes):
    ax = fig.add_subplot(grid[0, i])
    a, b = plane.pcs
    raw, sm = result.scores_UxZ, result.smoothed_UxZ
    ax.scatter(raw[:, a], raw[:, b], s=6, color="0.8", zorder=1, label="PC scores")
    ax.plot(sm[:, a], sm[:, b], color="0.5", lw=0.6, zorder=2)
    points = ax.scatter(sm[:, a], sm[:, b], c=steps, cmap="viridis", norm=norm, s=14, zorder=3)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    c = plane.centre_Ux2
    inside = (c[:, 0] > x0) & (c[:, 0] < x1) & (c[:, 1] > y0) & (c[:, 1] < y1)
    ax.scatter(c[inside, 0], c[inside, 1], s=1.5, color="black", zorder=2, label="evolute")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    if milestone_idx:
      ax.scatter(
        sm[milestone_idx, a], sm[milestone_idx, b], marker="^", s=90, color="red",
        edgecolor="black", zorder=5, label="ED milestone",
      )  # fmt: skip
    if boundary_idx:
      ax.scatter(
        sm[boundary_idx, a], sm[boundary_idx, b], marker="s", s=60, facecolor="none",
        edgecolor="tab:blue", lw=1.8, zorder=4, label="LLC boundary",
      )  # fmt: skip
    ax.set_xlabel(f"PC{a + 1} ({evr[a]:.0%} of variance)")
    ax.set_ylabel(f"PC{b + 1} ({evr[b]:.0%})")
    ax.set_title(
      f"PC{a + 1}–PC{b + 1}: {len(plane.sharp)} sharp, {len(plane.cusps)} cusp"
      if plane.counted
      else f"PC{a + 1}–PC{b + 1} (PC{b + 1} below evr_threshold: not read for milestones)",
      fontsize=9,
    )
    ax.legend(fontsize=7, loc="best")
  if points is not None:
    fig.colorbar(points, ax=[fig.axes[j] for j in range(len(planes))], label="step", shrink=0.8)
  ax = fig.add_subplot(grid[1, :])
  colors = figures.colormap("tab10")(np.arange(result.smoothed_UxZ.shape[1]))
  for z in range(result.smoothed_UxZ.shape[1]):
    ax.plot(steps, result.scores_UxZ[:, z], color=colors[z], alpha=0.3, lw=0.8)
    ax.plot(steps, result.smoothed_UxZ[:, z], color=colors[z], label=f"PC{z + 1} ({evr[z]:.0%})")
  for k, u in enumerate(milestone_idx):
    ax.axvline(
      float(steps[u]), color="red", ls=":", lw=1.2, label="ED milestone" if k == 0 else None
    )
  figures.step_axis(ax, steps, boundaries=list(llc_boundaries), boundary_label="LLC boundary")
  ax.set_ylabel("PC score")
  ax.legend(fontsize=8, loc="best", ncol=2)
  fig.suptitle(title or "Essential dynamics: PCA of the outputs over training")
  return fig


def plot_ed(result: Any, path: str, llc_boundaries: Sequence[int] = (), title: str = "") -> str:
  """`ed_figure` written to `path` (atomic PNG); returns the path."""
  return figures.save(ed_figure(result, llc_boundaries, title), path)
