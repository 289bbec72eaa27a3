"""Figures without matplotlib's state machine: construction, the one step axis, and the
one atomic save.

Every figure is a `matplotlib.figure.Figure` created here. Nothing registers figures
globally or selects a backend, so importing the package keeps a notebook's inline
plots, and a figure is freed with its last reference (nothing to close).
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from devinterp_jax import atomic

DPI = 120


def figure(
  rows: int = 1,
  cols: int = 1,
  *,
  figsize: tuple[float, float],
  grid: bool = False,
  **subplots_kw: Any,
) -> tuple[Figure, Any]:
  """A new Figure and its axes (`Figure.subplots`: one Axes, or an array); with
  `grid=True` its `rows` × `cols` GridSpec instead, for uneven layouts (`fig.add_subplot`)."""
  fig = Figure(figsize=figsize)
  if grid:
    return fig, fig.add_gridspec(rows, cols, **subplots_kw)
  return fig, fig.subplots(rows, cols, **subplots_kw)


def colormap(name: str):
  """A registered colormap by name (`matplotlib.colormaps`)."""
  return matplotlib.colormaps[name]


def save(fig: Figure, path: str, *, dpi: int = DPI) -> str:
  """Writes `fig` as a PNG atomically (`atomic.save_figure`) and returns `path`."""
  return atomic.save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def step_scale(steps: Any) -> str:
  """ "log", or "symlog" (linear below step 1) when a step is ≤ 0, e.g. step 0."""
  steps = np.asarray(steps, np.float64)
  return "symlog" if steps.size and np.min(steps) <= 0 else "log"


def step_axis(
  ax: Any,
  steps: Any,
  *,
  boundaries: Sequence[float] = (),
  label: bool = True,
  grid: bool = True,
  scale: str | None = None,
  boundary_label: str | None = None,
) -> None:
  """The training-step x axis used by every figure.

  Log scale; with a step ≤ 0 (step 0 is a checkpoint in most runs) symlog, linear
  on [0, 1] and logarithmic above, so step 0 is drawn where it is instead of being
  moved to step 1 or dropped. The limits span the steps. `boundaries` are drawn as
  dashed lines (stage boundaries); with `boundary_label` the first one carries
  that legend label.
  """
  steps = np.asarray(steps, np.float64)
  scale = scale or step_scale(steps)
  if scale == "symlog":
    ax.set_xscale("symlog", linthresh=1.0)
  else:
    ax.set_xscale("log")
  finite = steps[np.isfinite(steps)]
  if finite.size:
    lo, hi = float(finite.min()), float(finite.max())
    if scale == "log":
      lo = max(lo, np.finfo(float).tiny)
    if hi > lo:
      pad = (hi / lo) ** 0.03 if scale == "log" and lo > 0 else None
      ax.set_xlim((lo / pad, hi * pad) if pad else (lo, hi * 1.05))
  for i, b in enumerate(boundaries):
    ax.axvline(
      float(b), color="k", ls="--", lw=0.8, alpha=0.6, label=boundary_label if i == 0 else None
    )
  if label:
    ax.set_xlabel("training step")
  if grid:
    ax.grid(alpha=0.3, which="both")
