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


def teacher_student_figure(steps: Any, metrics: Mapping[str, Any], *,
                           boundaries: Sequence[float] = (), align_threshold: float = 0.95,
                           title: str = "") -> Figure:
  """Four panels over log step (stage boundaries dashed): test MSE against the
  teacher (and the logged eval loss) beside the LLC; hidden-unit counts (active,
  dead, aligned with a teacher unit, teacher units recovered); each teacher unit's
  best cosine with a student unit (`align_threshold` dotted); each student unit's
  fraction of inputs on which it fires.
  """
  steps = np.asarray(steps)
  fig, axes = figures.figure(2, 2, figsize=(13, 8.5))
  ax = axes[0, 0]
  ax.plot(steps, metrics["test_mse"], color="tab:red", marker=".",
          label="test MSE vs teacher (noiseless)")
  if "eval_loss" in metrics and np.isfinite(np.asarray(metrics["eval_loss"], float)).any():
    ax.plot(steps, metrics["eval_loss"], color="tab:orange", ls="--", lw=1,
            label="eval loss (noisy labels)")
  ax.set_yscale("log")
  ax.set_ylabel("MSE")
  ax.set_title("fit to the teacher")
  if "llc_mean" in metrics:
    mean = np.asarray(metrics["llc_mean"], float)
    band = np.asarray(metrics.get("llc_std", np.zeros_like(mean)), float)
    ax2 = ax.twinx()
    ax2.plot(steps, mean, color="tab:blue", marker=".", label=r"LLC $\hat\lambda$")
    ax2.fill_between(steps, mean - band, mean + band, color="tab:blue", alpha=0.2)
    ax2.set_ylabel(r"LLC $\hat\lambda$ (± std over chains)", color="tab:blue")
    handles = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper center")
  else:
    ax.legend(fontsize=7)
  ax = axes[0, 1]
  for name, label, kw in (("active_units", "active hidden units", {"color": "tab:green"}),
                          ("dead_units", "dead hidden units", {"color": "tab:gray"}),
                          ("aligned_units", "student units aligned with a teacher unit",
                           {"color": "tab:purple"}),
                          ("teacher_units_recovered", "teacher units recovered",
                           {"color": "k", "ls": "--"})):
    if name in metrics:
      ax.plot(steps, metrics[name], marker=".", label=label, **kw)
  if "teacher_alignment" in metrics:
    ax.axhline(np.asarray(metrics["teacher_alignment"]).shape[1], color="k", lw=0.6, ls=":",
               label="teacher units")
  ax.set_ylabel("units")
  ax.set_title("hidden units")
  ax.legend(fontsize=7)
  ax = axes[1, 0]
  if "teacher_alignment" in metrics:
    align = np.asarray(metrics["teacher_alignment"], float)
    colors = figures.colormap("tab10")(np.arange(align.shape[1]) % 10)
    for j in range(align.shape[1]):
      ax.plot(steps, align[:, j], color=colors[j], marker=".", label=f"teacher unit {j}")
    ax.axhline(align_threshold, color="k", lw=0.8, ls=":", label=f"threshold {align_threshold}")
    ax.legend(fontsize=7)
  ax.set_ylim(-1.02, 1.02)
  ax.set_ylabel("best cosine")
  ax.set_title("alignment: best cosine of (w, b) with a student unit (first layer)")
  ax = axes[1, 1]
  if "unit_active_fraction" in metrics:
    frac = np.asarray(metrics["unit_active_fraction"], float)
    colors = figures.colormap("viridis")(np.linspace(0, 0.9, frac.shape[1]))
    for u in range(frac.shape[1]):
      ax.plot(steps, frac[:, u], color=colors[u], lw=1)
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel("fraction of inputs")
  ax.set_title("firing fraction per student hidden unit")
  for ax in axes.flat:
    figures.step_axis(ax, steps, boundaries=boundaries)
  fig.suptitle(title or "Teacher–student development")
  fig.tight_layout()
  return fig


def plot_teacher_student(steps: Any, metrics: Mapping[str, Any], path: str, *,
                         boundaries: Sequence[float] = (), align_threshold: float = 0.95,
                         title: str = "") -> str:
  """`teacher_student_figure` written to `path` (PNG); returns `path`."""
  return figures.save(teacher_student_figure(steps, metrics, boundaries=boundaries,
                                             align_threshold=align_threshold, title=title),
                      path)
