"""Teacher–student figure: the student's fit, its hidden units and their alignment with
the teacher's (`experiments/teacher_student/sections.py` computes the metrics).

`metrics` is the flat dict of `sections.teacher_metrics` ([N] leading axis):
test_mse, active_units, dead_units, aligned_units, teacher_units_recovered,
teacher_alignment [N, J], unit_active_fraction [N, U], plus the report's
llc_mean / llc_std and eval_loss when given.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures


def teacher_student_figure(
  steps: Any,
  metrics: Mapping[str, Any],
  *,
  boundaries: Sequence[float] = (),
  align_threshold: float = 0.95,
  num_params: int | None = None,
  title: str = "",
) -> Figure:
  """Six panels (stage boundaries dashed): over log step, the test MSE against the
  teacher (and the logged eval loss); the LLC ± std over chains (d/2 in the title
  with `num_params`); hidden-unit counts (active, dead, aligned with a teacher unit,
  teacher units recovered); each teacher unit's best cosine with a student unit
  (`align_threshold` dotted); each student unit's firing fraction; and the LLC
  against the test MSE, coloured by step.
  """
  steps = np.asarray(steps)
  fig, axes = figures.figure(2, 3, figsize=(18, 8.5))
  ax = axes[0, 0]
  ax.plot(
    steps, metrics["test_mse"], color="tab:red", marker=".", label="test MSE vs teacher (noiseless)"
  )
  if "eval_loss" in metrics and np.isfinite(np.asarray(metrics["eval_loss"], float)).any():
    ax.plot(
      steps,
      metrics["eval_loss"],
      color="tab:orange",
      ls="--",
      lw=1,
      label="eval loss (noisy labels)",
    )
  ax.set_yscale("log")
  ax.set_ylabel("MSE")
  ax.set_title("fit to the teacher")
  ax = axes[0, 1]
  if "llc_mean" in metrics:
    mean = np.asarray(metrics["llc_mean"], float)
    band = np.asarray(metrics.get("llc_std", np.zeros_like(mean)), float)
    ax.plot(steps, mean, color="tab:blue", marker=".", label=r"LLC $\hat\lambda$")
    ax.fill_between(
      steps, mean - band, mean + band, color="tab:blue", alpha=0.2, label="± std over chains"
    )
    ax.axhline(0, color="gray", lw=0.8)
  ax.set_ylabel(r"LLC $\hat\lambda$")
  ax.set_title(
    "LLC" + (f" (d = {num_params}, d/2 = {num_params / 2:g})" if num_params is not None else "")
  )
  ax = axes[0, 2]
  for name, label, kw in (
    ("active_units", "active hidden units", {"color": "tab:green"}),
    ("dead_units", "dead hidden units", {"color": "tab:gray"}),
    ("aligned_units", "student units aligned with a teacher unit", {"color": "tab:purple"}),
    ("teacher_units_recovered", "teacher units recovered", {"color": "k", "ls": "--"}),
  ):
    if name in metrics:
      ax.plot(steps, metrics[name], marker=".", label=label, **kw)
  if "teacher_alignment" in metrics:
    ax.axhline(
      np.asarray(metrics["teacher_alignment"]).shape[1],
      color="k",
      lw=0.6,
      ls=":",
      label="teacher units",
    )
  ax.set_ylabel("units")
  ax.set_title("hidden units")
  ax = axes[1, 0]
  if "teacher_alignment" in metrics:
    align = np.asarray(metrics["teacher_alignment"], float)
    colors = figures.colormap("tab10")(np.arange(align.shape[1]) % 10)
    for j in range(align.shape[1]):
      ax.plot(steps, align[:, j], color=colors[j], marker=".", label=f"teacher unit {j}")
    ax.axhline(align_threshold, color="k", lw=0.8, ls=":", label=f"threshold {align_threshold}")
  ax.set_ylim(-1.02, 1.02)
  ax.set_ylabel("best cosine")
  ax.set_title("teacher units: best cosine of (w, b) with a student unit")
  ax = axes[1, 1]
  if "unit_active_fraction" in metrics:
    frac = np.asarray(metrics["unit_active_fraction"], float)
    colors = figures.colormap("viridis")(np.linspace(0, 0.9, frac.shape[1]))
    for u in range(frac.shape[1]):
      ax.plot(steps, frac[:, u], color=colors[u], lw=1)
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel("fraction of inputs")
  ax.set_title("firing fraction per student hidden unit")
  for ax in list(axes[0]) + list(axes[1, :2]):
    figures.step_axis(ax, steps, boundaries=boundaries)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  ax = axes[1, 2]
  if "llc_mean" in metrics:
    ax.plot(metrics["test_mse"], metrics["llc_mean"], color="gray", lw=0.8, zorder=1)
    points = ax.scatter(
      metrics["test_mse"],
      metrics["llc_mean"],
      c=np.log10(np.maximum(steps, 1)),
      cmap=figures.colormap("viridis"),
      s=18,
      zorder=2,
    )
    fig.colorbar(points, ax=ax, label="log10 step")
    ax.set_xscale("log")
    ax.invert_xaxis()
  ax.set_xlabel("test MSE vs teacher (decreasing →)")
  ax.set_ylabel(r"LLC $\hat\lambda$")
  ax.set_title("LLC against the fit")
  ax.grid(alpha=0.3, which="both")
  fig.suptitle(title or "Teacher–student development")
  fig.tight_layout()
  return fig


def plot_teacher_student(
  steps: Any,
  metrics: Mapping[str, Any],
  path: str,
  *,
  boundaries: Sequence[float] = (),
  align_threshold: float = 0.95,
  num_params: int | None = None,
  title: str = "",
) -> str:
  """`teacher_student_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    teacher_student_figure(
      steps,
      metrics,
      boundaries=boundaries,
      align_threshold=align_threshold,
      num_params=num_params,
      title=title,
    ),
    path,
  )
