"""Stage figures (paper Fig. 1 / B.2, B.4) and the stage marks other figures share.

Inputs are duck-typed: a "stage result" is anything with the attributes of
`analysis.stages.StageBoundaries` that a function reads — `stages` (dicts with
`label`, `start_step`, `end_step`), `boundary_steps`, `stability` (None, or
with `stable`, `stability`, `passes`, `target`, `num_fits`) and
`schedule_features` — plus, for the LLC panels, `steps`, `llc_mean`, `llc_std`,
`x_grid`, `gp_mean_grid`, `gp_std_grid`, `slope`, `slope_grid`,
`tolerance_used` and `settings`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures

# What `llc_std` of a stage fit holds, by `settings["error_bar"]` (`report.fit_stages`).
ERROR_BAR_LABELS = {"SEM": "SEM over chains", "std": "std over chains"}


def shade_stages(ax, result: Any, label: bool) -> None:
  """Alternating shades over the stages; with `label`, each stage's label on top."""
  colours = ("#dde8f5", "#f5eadd")
  for i, stage in enumerate(result.stages):
    ax.axvspan(
      stage["start_step"], stage["end_step"], color=colours[i % 2], alpha=0.6, lw=0, zorder=0
    )
    if label:
      lo, hi = max(stage["start_step"], 1), max(stage["end_step"], 1)
      ax.text(
        math.sqrt(lo * hi),
        0.98,
        stage["label"],
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="top",
        fontsize=8,
        fontweight="bold",
      )


def mark_boundaries(ax, result: Any, annotate: bool = False, **kwargs) -> None:
  """Dashed lines at the boundaries; with a stability analysis, stable boundaries
  are solid and unstable ones dashed red, annotated "(unstable 0.55)" when
  `annotate` (stable ones with their stability)."""
  st = getattr(result, "stability", None)
  for j, s in enumerate(result.boundary_steps):
    style = dict(color="black", ls="--", lw=0.9, alpha=0.7)
    if st is not None and j < len(st.stable):
      style = (
        dict(color="black", ls="-", lw=1.0, alpha=0.8)
        if st.stable[j]
        else dict(color="tab:red", ls="--", lw=1.3, alpha=0.9)
      )
    ax.axvline(s, **(style | kwargs))
    if annotate and st is not None and j < len(st.stable):
      text = f"{st.stability[j]:.2f}" if st.stable[j] else f"(unstable {st.stability[j]:.2f})"
      ax.text(
        s,
        0.90,
        text,
        transform=ax.get_xaxis_transform(),
        rotation=90,
        ha="right",
        va="top",
        fontsize=7,
        color=style["color"],
        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
      )


def mark_schedule(ax, result: Any, legend: bool) -> None:
  """Dotted green lines at the learning-rate schedule features."""
  for f in getattr(result, "schedule_features", ()):
    ax.axvline(
      int(f["step"]),
      color="tab:green",
      ls=":",
      lw=1.4,
      alpha=0.9,
      label=f"{f['name']} (step {int(f['step'])})" if legend else None,
    )


def error_bar_label(result: Any, error_bar: str | None = None) -> str | None:
  """The legend text of the LLC error bars of a stage fit: "± SEM over chains",
  "± std over chains", or — when neither `error_bar` nor `settings["error_bar"]`
  says what `llc_std` holds — "± llc_std (as given)"; None without error bars."""
  if result.llc_std is None:
    return None
  name = error_bar or (result.settings or {}).get("error_bar")
  if not name:
    return "± llc_std (as given)"
  return f"± {ERROR_BAR_LABELS.get(name, name)}"


def stages_figure(
  result: Any,
  *,
  loss_steps=None,
  loss=None,
  loss_label: str = "loss",
  title: str = "",
  error_bar: str | None = None,
) -> Figure:
  """Loss, LLC with the GP fit and stages, and the slope (paper Fig. 1 / B.2).

  Top panel (only when `loss` is given): the loss, log-log. Middle: LLC mean ±
  `llc_std`, labelled by what it holds (`error_bar`, default
  `settings["error_bar"]`: "SEM" — the standard error over chains — or "std";
  see `error_bar_label`), with the GP mean (± 2 posterior std), stages shaded and
  labelled. Bottom: dλ̂/d ln t of the GP mean, the zero line and the ± tolerance
  band. Boundaries are vertical lines on every panel: dashed without a stability
  analysis; with one (`result.stability`), solid when stable and dashed red
  "(unstable 0.55)" when not, and the title says whether the criterion passes.
  Learning-rate schedule features (`schedule_features`) are dotted green lines.
  """
  with_loss = loss is not None
  if with_loss and loss_steps is None:
    raise ValueError("loss needs loss_steps")
  rows = 3 if with_loss else 2
  fig, axes = figures.figure(
    rows,
    1,
    figsize=(8, 2.6 * rows + 0.6),
    sharex=True,
    gridspec_kw={"height_ratios": [1] * (rows - 2) + [1.4, 1]},
  )
  ax_llc, ax_slope = axes[-2], axes[-1]
  steps = np.asarray(result.steps, dtype=float)
  step_grid = np.expm1(result.x_grid)

  if with_loss:
    ax_loss = axes[0]
    ls, lv = np.asarray(loss_steps, dtype=float), np.asarray(loss, dtype=float)
    ax_loss.plot(ls, lv, color="tab:red", lw=1.2)
    if np.all(lv[np.isfinite(lv)] > 0):
      ax_loss.set_yscale("log")
    ax_loss.set_ylabel(loss_label)
    shade_stages(ax_loss, result, label=False)
    mark_boundaries(ax_loss, result)
    mark_schedule(ax_loss, result, legend=False)

  shade_stages(ax_llc, result, label=True)
  band = error_bar_label(result, error_bar)
  ax_llc.errorbar(
    steps,
    result.llc_mean,
    yerr=result.llc_std,
    fmt="o",
    ms=3,
    color="tab:blue",
    ecolor="tab:blue",
    elinewidth=0.8,
    capsize=1.5,
    label=r"$\hat\lambda$" + (f" {band}" if band else ""),
  )
  ax_llc.plot(step_grid, result.gp_mean_grid, color="black", lw=1.5, label="GP mean")
  ax_llc.fill_between(
    step_grid,
    result.gp_mean_grid - 2 * result.gp_std_grid,
    result.gp_mean_grid + 2 * result.gp_std_grid,
    color="gray",
    alpha=0.25,
    lw=0,
    label="GP ± 2 posterior std",
  )
  mark_boundaries(ax_llc, result, annotate=True)
  mark_schedule(ax_llc, result, legend=True)
  lo = np.min(result.llc_mean - (result.llc_std if result.llc_std is not None else 0))
  hi = np.max(result.llc_mean + (result.llc_std if result.llc_std is not None else 0))
  pad = 0.12 * max(hi - lo, 1e-12)
  ax_llc.set_ylim(lo - pad, hi + 2 * pad)  # room for the stage labels
  ax_llc.set_ylabel(r"LLC $\hat\lambda$")
  ax_llc.legend(loc="lower right", fontsize=7)

  shade_stages(ax_slope, result, label=False)
  ax_slope.axhspan(
    -result.tolerance_used,
    result.tolerance_used,
    color="tab:green",
    alpha=0.2,
    lw=0,
    label=f"± tolerance ({result.tolerance_used:.3g})",
  )
  ax_slope.axhline(0.0, color="gray", lw=0.8)
  ax_slope.plot(step_grid, result.slope_grid, color="tab:purple", lw=1.3)
  ax_slope.plot(steps, result.slope, "o", ms=3, color="tab:purple")
  mark_boundaries(ax_slope, result)
  mark_schedule(ax_slope, result, legend=False)
  ax_slope.set_ylabel(r"$d\hat\lambda / d\ln t$")
  ax_slope.legend(loc="upper right", fontsize=7)
  for ax in axes:
    figures.step_axis(ax, steps, label=ax is ax_slope)
  title = title or "LLC stages"
  if result.stability is not None:
    st = result.stability
    title += (
      f"\nstability criterion {'passes' if st.passes else 'FAILS'} (target "
      f"{st.target:.2f}, {st.num_fits} resamples)"
    )
  axes[0].set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def plot_stages(
  result: Any,
  path: str,
  *,
  loss_steps=None,
  loss=None,
  loss_label: str = "loss",
  title: str = "",
  error_bar: str | None = None,
) -> str:
  """`stages_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    stages_figure(
      result,
      loss_steps=loss_steps,
      loss=loss,
      loss_label=loss_label,
      title=title,
      error_bar=error_bar,
    ),
    path,
  )


def seed_stages_figure(
  per_seed: Sequence[Any], reference: Any, labels: Sequence[str] | None = None, title: str = ""
) -> Figure:
  """One row per seed plus one for the reference: LLC, GP mean and boundaries.

  Each row shades and marks (dashed black) its own stages; the reference
  boundaries are drawn dotted red on every row so the spread is visible.
  """
  if labels is not None and len(labels) != len(per_seed):
    raise ValueError(f"{len(labels)} labels for {len(per_seed)} seeds")
  results = list(per_seed) + [reference]
  names = list(labels) if labels is not None else [f"seed {i}" for i in range(len(per_seed))]
  names.append("reference")
  fig, axes = figures.figure(
    len(results), 1, figsize=(8, 1.7 * len(results) + 0.8), sharex=True, squeeze=False
  )
  axes = axes[:, 0]
  for ax, result, name in zip(axes, results, names):
    steps = np.asarray(result.steps, dtype=float)
    shade_stages(ax, result, label=True)
    ax.errorbar(
      steps,
      result.llc_mean,
      yerr=result.llc_std,
      fmt="o",
      ms=2.5,
      color="tab:blue",
      elinewidth=0.7,
      capsize=0,
    )
    ax.plot(np.expm1(result.x_grid), result.gp_mean_grid, color="black", lw=1.2)
    mark_boundaries(ax, reference, color="tab:red", ls=":", lw=1.4, alpha=0.9)
    mark_boundaries(ax, result)
    lo, hi = float(np.min(result.llc_mean)), float(np.max(result.llc_mean))
    pad = 0.12 * max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad, hi + 2.5 * pad)
    ax.set_ylabel(name, fontsize=9)
  every = np.concatenate([np.asarray(r.steps, dtype=float) for r in results])
  for ax in axes:
    figures.step_axis(ax, every, label=ax is axes[-1])
  axes[0].set_title(title or "LLC stages per seed (dotted red: reference boundaries)")
  fig.tight_layout()
  return fig


def plot_seed_stages(
  per_seed: Sequence[Any],
  reference: Any,
  path: str,
  labels: Sequence[str] | None = None,
  title: str = "",
) -> str:
  """`seed_stages_figure` written to `path` (PNG); returns `path`."""
  return figures.save(seed_stages_figure(per_seed, reference, labels, title), path)
