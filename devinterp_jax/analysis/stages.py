"""Developmental stages from plateaus of the LLC curve (Hoogland et al. 2024, App. B.1).

A stage boundary is a checkpoint where the estimated LLC λ̂ is locally flat as a
function of log training time. The procedure:

1. Smooth. Fit a Gaussian process to λ̂ over x = ln(step + 1) with kernel
   C · RBF(ℓ) plus a noise term: the per-checkpoint variance `llc_std²` when it
   is given (`alpha` of scikit-learn's `GaussianProcessRegressor`), else a fitted
   `WhiteKernel`. The LLC is standardised first (the amplitude and noise bounds
   are in units of its variance); hyperparameters maximise the log marginal
   likelihood with `n_restarts` seeded restarts, so a result is deterministic.
2. Differentiate. The slope dλ̂/dx of the GP posterior mean is computed
   analytically: for the RBF kernel
   d/dx Σ_i α_i C exp(−(x − x_i)²/2ℓ²) = −Σ_i α_i C exp(…) (x − x_i)/ℓ².
3. Detect. Candidate boundaries are
   (a) zero crossings: the slope changes sign between checkpoints i and i + 1;
       the boundary is whichever of the two has the smaller |slope|;
   (b) near-plateaus (saddles, where the slope need not reach zero): interior
       checkpoints that are local minima of |slope| (≤ both neighbours) with
       |slope| below a tolerance. The tolerance is a fraction of max |slope|
       over the checkpoints (`relative_tolerance=True`, default 5 %) or an
       absolute value in LLC units per unit ln t (the authors used 8 for
       in-context linear regression and 0.25 for the language model).
   A checkpoint found by both rules is reported once, as a zero crossing. The
   first and last checkpoints are never boundaries.
4. Merge and prune (an addition to the paper's procedure; `min_stage_change=0`
   turns it off). With a stationary RBF kernel the smoothed LLC rings: it
   overshoots after a sharp transition and undershoots before the next, and
   on noisy curves it wiggles. That yields several candidates inside one
   plateau (often at its edges) and candidates in the flat stretch before the
   first or after the last transition. A stage must contain development, so:
   consecutive candidates between which the GP mean changes (max − min over
   the checkpoints between them) by less than `min_stage_change` (default
   5 %; 10 % is more robust on very noisy curves but drops real turning points
   such as the LR LLC's peak, whose fall is ~10 % of the range) × the range of the GP mean form one plateau, reported as one boundary
   at the checkpoint nearest the middle of their span in x; it is a zero
   crossing if the GP mean turns there (rises on one side, falls on the
   other), else a near-plateau. Then, while the first (last) stage changes the
   GP mean by less than that amount, its end (start) boundary is dropped.
   Candidates removed this way are kept in `pruned_indices`. The price: a real
   stage whose LLC changes by less than `min_stage_change` of the range is
   merged into its neighbour; lower the option to resolve such stages on clean
   curves.

Stage i (labelled f"{label_prefix}{i}", from 1) runs from the previous boundary
(or the first checkpoint) to the next boundary (or the last checkpoint).

Multi-seed comparison (App. B.4): `compare_boundaries` matches each boundary of a
reference fit (e.g. of the LLC averaged over seeds) to the nearest boundary of
every seed in ln step and summarises the spread; `plot_seed_stages` draws one
row per seed plus one for the reference.

Usage on the `llc/llc.csv` of the main job (drop rows without a finite mean):

  t = np.genfromtxt(path, delimiter=",", names=True)
  ok = np.isfinite(t["llc_mean"])
  r = find_stage_boundaries(t["step"][ok], t["llc_mean"][ok], t["llc_sem"][ok])
  r.save(out_dir)
  plot_stages(r, f"{out_dir}/stages.png", loss_steps=t["step"], loss=t["eval_loss"])

`llc_std` is the noise of the LLC *estimate* at each checkpoint: the standard
error over chains fits that meaning; the std over chains is larger by √chains
and smooths more. With None the noise level is fitted instead.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np
from scipy.linalg import solve_triangular
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from threadpoolctl import threadpool_limits

from devinterp_jax import atomic
from devinterp_jax.analysis.plots import save_figure

ZERO_CROSSING = "zero_crossing"
NEAR_PLATEAU = "near_plateau"
_MIN_NOISE_VAR = 1e-10  # floor of the per-point noise variance (standardised units)


@dataclasses.dataclass(frozen=True, eq=False)
class StageBoundaries:
  """Stage boundaries of one LLC curve and everything needed to plot them.

  Arrays over checkpoints: `steps`, `x` (= ln(step + 1)), `llc_mean`, `llc_std`
  (None when not given), `gp_mean`, `gp_std` (posterior std of the smoothed
  curve, noise excluded), `slope` (dλ̂/dx of the GP mean). Dense grid over
  [x[0], x[-1]]: `x_grid`, `gp_mean_grid`, `gp_std_grid`, `slope_grid`.
  `boundary_indices` index the checkpoints; `boundary_kinds` are
  "zero_crossing" or "near_plateau". `tolerance_used` is the absolute |slope|
  tolerance of the near-plateau rule. `pruned_indices` are the candidates that
  the merge rule (`min_stage_change`) did not report; a merged boundary can be
  a checkpoint that was not itself a candidate. `settings` holds the options.
  """

  steps: np.ndarray
  x: np.ndarray
  llc_mean: np.ndarray
  llc_std: np.ndarray | None
  gp_mean: np.ndarray
  gp_std: np.ndarray
  slope: np.ndarray
  x_grid: np.ndarray
  gp_mean_grid: np.ndarray
  gp_std_grid: np.ndarray
  slope_grid: np.ndarray
  boundary_indices: tuple[int, ...]
  boundary_steps: tuple[int, ...]
  boundary_kinds: tuple[str, ...]
  tolerance_used: float
  kernel: str
  pruned_indices: tuple[int, ...] = ()
  label_prefix: str = "LR"
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def stages(self) -> list[dict[str, Any]]:
    """Stages in order: {label, start_step, end_step, end_kind}.

    `end_kind` is the kind of the boundary that ends the stage, or "end" for
    the last stage.
    """
    starts = [int(self.steps[0])] + list(self.boundary_steps)
    ends = list(self.boundary_steps) + [int(self.steps[-1])]
    kinds = list(self.boundary_kinds) + ["end"]
    return [{"label": f"{self.label_prefix}{i + 1}", "start_step": s, "end_step": e,
             "end_kind": k} for i, (s, e, k) in enumerate(zip(starts, ends, kinds))]

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict of every field plus `stages`."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, np.ndarray):
        value = value.tolist()
      elif isinstance(value, tuple):
        value = list(value)
      out[field.name] = value
    out["stages"] = self.stages
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> StageBoundaries:
    """Inverse of `to_dict` (extra keys such as `stages` are ignored)."""
    kwargs = {}
    for field in dataclasses.fields(cls):
      value = d.get(field.name)
      if field.name == "steps":
        value = np.asarray(value, dtype=np.int64)
      elif field.name == "llc_std":
        value = None if value is None else np.asarray(value, dtype=float)
      elif field.name in ("boundary_indices", "boundary_steps", "pruned_indices"):
        value = tuple(int(v) for v in (value or ()))
      elif field.name == "boundary_kinds":
        value = tuple(value or ())
      elif field.name == "tolerance_used":
        value = float(value)
      elif field.name in ("kernel", "label_prefix"):
        value = str(value)
      elif field.name == "settings":
        value = dict(value or {})
      else:
        value = np.asarray(value, dtype=float)
      kwargs[field.name] = value
    return cls(**kwargs)

  def save(self, directory: str) -> tuple[str, str]:
    """Writes `stages.json` (everything) and `stages.csv` atomically.

    The CSV has one row per stage: label,start_step,end_step,end_kind.
    Returns the two paths.
    """
    json_path = os.path.join(directory, "stages.json")
    csv_path = os.path.join(directory, "stages.csv")
    atomic.write_text(json_path, json.dumps(self.to_dict(), indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "start_step", "end_step", "end_kind"])
    for stage in self.stages:
      writer.writerow([stage["label"], stage["start_step"], stage["end_step"],
                       stage["end_kind"]])
    atomic.write_text(csv_path, buf.getvalue())
    return json_path, csv_path

  @classmethod
  def load(cls, directory: str) -> StageBoundaries:
    """Reads the `stages.json` that `save` wrote."""
    with open(os.path.join(directory, "stages.json")) as f:
      return cls.from_dict(json.load(f))


def _check_inputs(steps, llc_mean, llc_std) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  steps = np.asarray(steps)
  llc_mean = np.asarray(llc_mean, dtype=float)
  if steps.ndim != 1 or llc_mean.ndim != 1:
    raise ValueError("steps and llc_mean must be 1-D")
  if len(steps) != len(llc_mean):
    raise ValueError(f"steps and llc_mean differ in length: {len(steps)} != {len(llc_mean)}")
  if llc_std is not None:
    llc_std = np.asarray(llc_std, dtype=float)
    if llc_std.shape != llc_mean.shape:
      raise ValueError(f"llc_std has shape {llc_std.shape}, llc_mean {llc_mean.shape}")
  if len(steps) < 4:
    raise ValueError(f"need at least 4 checkpoints, got {len(steps)}")
  if not np.all(np.isfinite(steps.astype(float))):
    raise ValueError("steps must be finite")
  if np.any(steps != np.round(steps)):
    raise ValueError("steps must be integers")
  steps = steps.astype(np.int64)
  if np.any(steps < 0):
    raise ValueError("steps must be non-negative")
  if np.any(np.diff(steps) <= 0):
    raise ValueError("steps must be strictly increasing (sorted, no duplicates)")
  if not np.all(np.isfinite(llc_mean)):
    raise ValueError(f"llc_mean must be finite; it is not at steps "
                     f"{steps[~np.isfinite(llc_mean)].tolist()} (leave those checkpoints out)")
  if llc_std is not None:
    if not np.all(np.isfinite(llc_std)):
      raise ValueError(f"llc_std must be finite; it is not at steps "
                       f"{steps[~np.isfinite(llc_std)].tolist()} (a checkpoint with fewer "
                       f"than 2 valid chains has no standard error: leave it out)")
    if np.any(llc_std < 0):
      raise ValueError("llc_std must be non-negative")
  return steps, llc_mean, llc_std


def _zero_crossings(slope: np.ndarray) -> list[int]:
  """Indices (interior only) of the smaller-|slope| end of every sign change."""
  n, out = len(slope), set()
  sign = np.sign(slope)
  for i in range(n - 1):
    if sign[i] != sign[i + 1] and slope[i] * slope[i + 1] <= 0:
      j = i if abs(slope[i]) <= abs(slope[i + 1]) else i + 1
      if 0 < j < n - 1:
        out.add(j)
  return sorted(out)


def _near_plateaus(slope: np.ndarray, tolerance: float) -> list[int]:
  """Interior local minima of |slope| that lie below `tolerance`."""
  a = np.abs(slope)
  return [i for i in range(1, len(a) - 1)
          if a[i] <= a[i - 1] and a[i] <= a[i + 1] and a[i] < tolerance]


def _prune(candidates: list[int], kinds: dict[int, str], x: np.ndarray, gp_mean: np.ndarray,
           min_change: float) -> tuple[list[int], dict[int, str], list[int]]:
  """Merges candidates in one plateau and drops those in the flat ends.

  Consecutive candidates between which the GP mean changes by less than
  `min_change` (max − min over the checkpoints between them) belong to one
  plateau and become one boundary at the checkpoint nearest the middle of
  their span in x. It is a zero crossing if the GP mean turns there (rises on
  one side, falls on the other), else a near-plateau. Then, while the first
  (last) stage changes the GP mean by less than `min_change`, its end (start)
  boundary is dropped. Returns (kept indices, their kinds, dropped candidates).
  """
  n = len(gp_mean)

  def ptp(a: int, b: int) -> float:
    return float(np.ptp(gp_mean[a:b + 1]))

  runs: list[list[int]] = []
  for i in candidates:
    if runs and ptp(runs[-1][-1], i) < min_change:
      runs[-1].append(i)
    else:
      runs.append([i])
  kept, out_kinds = [], {}
  for r, run in enumerate(runs):
    if len(run) == 1:
      kept.append(run[0])
      out_kinds[run[0]] = kinds[run[0]]
      continue
    j = int(np.argmin(np.abs(x - 0.5 * (x[run[0]] + x[run[-1]]))))
    before = gp_mean[j] - gp_mean[kept[-1] if kept else 0]
    after = gp_mean[runs[r + 1][0] if r + 1 < len(runs) else n - 1] - gp_mean[j]
    kept.append(j)
    out_kinds[j] = ZERO_CROSSING if before * after < 0 else NEAR_PLATEAU
  while kept and ptp(0, kept[0]) < min_change:
    kept.pop(0)
  while kept and ptp(kept[-1], n - 1) < min_change:
    kept.pop()
  dropped = sorted(set(candidates) - set(kept))
  return kept, {i: out_kinds[i] for i in kept}, dropped


def find_stage_boundaries(
    steps: Sequence[int] | np.ndarray,
    llc_mean: Sequence[float] | np.ndarray,
    llc_std: Sequence[float] | np.ndarray | None = None,
    *,
    tolerance: float = 0.05,
    relative_tolerance: bool = True,
    length_scale: float = 3.0,
    length_scale_bounds: tuple[float, float] = (0.5, 1000.0),
    amplitude_bounds: tuple[float, float] = (1e-3, 1e3),
    noise_level: float = 1e-2,
    noise_level_bounds: tuple[float, float] = (1e-8, 1e2),
    n_restarts: int = 10,
    seed: int = 0,
    min_stage_change: float = 0.05,
    grid_size: int = 512,
    label_prefix: str = "LR",
) -> StageBoundaries:
  """Finds LLC plateaus (stage boundaries) over log training time (App. B.1).

  Args:
    steps: checkpoint steps, strictly increasing, ≥ 0.
    llc_mean: LLC estimate at each checkpoint.
    llc_std: optional per-checkpoint noise std of `llc_mean`, used as fixed
      per-point GP noise (variance floored at 1e-10 of the LLC variance).
      Without it a `WhiteKernel` noise level is fitted.
    tolerance: near-plateau threshold on |dλ̂/d ln t|; a fraction of the
      largest |slope| over checkpoints if `relative_tolerance`, else absolute.
    relative_tolerance: see `tolerance`.
    length_scale: initial RBF length scale (in ln step).
    length_scale_bounds: bounds of the RBF length scale.
    amplitude_bounds: bounds of the constant kernel (standardised LLC units).
    noise_level: initial WhiteKernel noise (standardised units; no `llc_std`).
    noise_level_bounds: bounds of the WhiteKernel noise level.
    n_restarts: optimizer restarts of the GP fit.
    seed: random state of the restarts.
    min_stage_change: every stage must change the GP mean by at least this
      fraction of its range over the checkpoints; candidates closer than that
      are merged (see the module docstring); 0 keeps every candidate.
    grid_size: points of the dense grid kept for plotting.
    label_prefix: stage labels are f"{label_prefix}{i}".

  Returns:
    A `StageBoundaries`.

  Raises:
    ValueError: on mismatched lengths, fewer than 4 checkpoints, non-finite
      values, unsorted, duplicate or negative steps, or negative `llc_std`.
  """
  steps, llc_mean, llc_std = _check_inputs(steps, llc_mean, llc_std)
  if tolerance < 0 or min_stage_change < 0:
    raise ValueError("tolerance and min_stage_change must be non-negative")
  if n_restarts < 0 or grid_size < 2:
    raise ValueError("n_restarts must be >= 0 and grid_size >= 2")
  x = np.log1p(steps.astype(float))
  y_loc = float(np.mean(llc_mean))
  y_scale = float(np.std(llc_mean))
  if y_scale <= 0:
    y_scale = 1.0
  y = (llc_mean - y_loc) / y_scale

  signal = (ConstantKernel(1.0, amplitude_bounds)
            * RBF(length_scale, length_scale_bounds))
  if llc_std is None:
    kernel, alpha = signal + WhiteKernel(noise_level, noise_level_bounds), 1e-10
  else:
    kernel, alpha = signal, np.maximum((llc_std / y_scale) ** 2, _MIN_NOISE_VAR)
  gp = GaussianProcessRegressor(kernel=kernel, alpha=alpha, normalize_y=False,
                                n_restarts_optimizer=n_restarts, random_state=seed)
  # Tiny matrices: extra BLAS threads only contend. Restarts that stop at a
  # bound or end "ABNORMAL" are expected; the best restart is kept.
  with threadpool_limits(limits=1), warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    gp.fit(x[:, None], y)
  fitted_signal = gp.kernel_.k1 if llc_std is None else gp.kernel_
  ell = float(fitted_signal.k2.length_scale)

  def posterior(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = fitted_signal(xq[:, None], x[:, None])              # (q, n)
    mean = k @ gp.alpha_
    slope = (k * (-(xq[:, None] - x[None, :]) / ell ** 2)) @ gp.alpha_
    v = solve_triangular(gp.L_, k.T, lower=True)
    var = np.maximum(fitted_signal.diag(xq[:, None]) - np.sum(v ** 2, axis=0), 0.0)
    return (y_loc + y_scale * mean, y_scale * np.sqrt(var), y_scale * slope)

  gp_mean, gp_std, slope = posterior(x)
  x_grid = np.linspace(x[0], x[-1], grid_size)
  gp_mean_grid, gp_std_grid, slope_grid = posterior(x_grid)

  max_slope = float(np.max(np.abs(slope)))
  tol = tolerance * max_slope if relative_tolerance else float(tolerance)
  zero = _zero_crossings(slope)
  near = [i for i in _near_plateaus(slope, tol) if i not in zero]
  kinds = {i: ZERO_CROSSING for i in zero} | {i: NEAR_PLATEAU for i in near}
  candidates = sorted(kinds)
  kept, kinds, pruned = _prune(candidates, kinds, x, gp_mean,
                               min_stage_change * float(np.ptp(gp_mean)))

  settings = dict(tolerance=tolerance, relative_tolerance=relative_tolerance,
                  length_scale=length_scale, length_scale_bounds=list(length_scale_bounds),
                  amplitude_bounds=list(amplitude_bounds), noise_level=noise_level,
                  noise_level_bounds=list(noise_level_bounds), n_restarts=n_restarts,
                  seed=seed, min_stage_change=min_stage_change, grid_size=grid_size,
                  noise="llc_std" if llc_std is not None else "white_kernel",
                  slope_method="analytic derivative of the GP posterior mean")
  return StageBoundaries(
      steps=steps, x=x, llc_mean=llc_mean, llc_std=llc_std, gp_mean=gp_mean,
      gp_std=gp_std, slope=slope, x_grid=x_grid, gp_mean_grid=gp_mean_grid,
      gp_std_grid=gp_std_grid, slope_grid=slope_grid,
      boundary_indices=tuple(kept), boundary_steps=tuple(int(steps[i]) for i in kept),
      boundary_kinds=tuple(kinds[i] for i in kept), tolerance_used=tol,
      kernel=str(gp.kernel_), pruned_indices=tuple(pruned), label_prefix=label_prefix,
      settings=settings)


def _plot_x(steps: np.ndarray) -> tuple[np.ndarray, str]:
  """Plot coordinates of `steps` and the x scale ("log", or "symlog" with step 0)."""
  steps = np.asarray(steps, dtype=float)
  return steps, ("symlog" if np.any(steps <= 0) else "log")


def _set_xscale(ax, scale: str) -> None:
  if scale == "symlog":
    ax.set_xscale("symlog", linthresh=1.0)
  else:
    ax.set_xscale("log")


def _shade_stages(ax, result: StageBoundaries, label: bool) -> None:
  colours = ("#dde8f5", "#f5eadd")
  for i, stage in enumerate(result.stages):
    ax.axvspan(stage["start_step"], stage["end_step"], color=colours[i % 2], alpha=0.6, lw=0,
               zorder=0)
    if label:
      lo, hi = max(stage["start_step"], 1), max(stage["end_step"], 1)
      ax.text(math.sqrt(lo * hi), 0.98, stage["label"], transform=ax.get_xaxis_transform(),
              ha="center", va="top", fontsize=8, fontweight="bold")


def _mark_boundaries(ax, result: StageBoundaries, **kwargs) -> None:
  style = dict(color="black", ls="--", lw=0.9, alpha=0.7) | kwargs
  for s in result.boundary_steps:
    ax.axvline(s, **style)


def plot_stages(result: StageBoundaries, path: str, *, loss_steps=None, loss=None,
                loss_label: str = "loss", title: str = "") -> str:
  """Loss, LLC with the GP fit and stages, and the slope (paper Fig. 1 / B.2).

  Top panel (only when `loss` is given): the loss, log-log. Middle: LLC mean ±
  `llc_std` with the GP mean (± 2 posterior std), stages shaded and labelled.
  Bottom: dλ̂/d ln t of the GP mean, the zero line and the ± tolerance band.
  Boundaries are dashed vertical lines on every panel. Returns `path`.
  """
  import matplotlib.pyplot as plt  # plots.py has selected the Agg backend

  with_loss = loss is not None
  if with_loss and loss_steps is None:
    raise ValueError("loss needs loss_steps")
  rows = 3 if with_loss else 2
  fig, axes = plt.subplots(rows, 1, figsize=(8, 2.6 * rows + 0.6), sharex=True,
                           gridspec_kw={"height_ratios": [1] * (rows - 2) + [1.4, 1]})
  ax_llc, ax_slope = axes[-2], axes[-1]
  steps, scale = _plot_x(result.steps)
  step_grid = np.expm1(result.x_grid)

  if with_loss:
    ax_loss = axes[0]
    ls, lv = np.asarray(loss_steps, dtype=float), np.asarray(loss, dtype=float)
    ax_loss.plot(ls, lv, color="tab:red", lw=1.2)
    if np.all(lv[np.isfinite(lv)] > 0):
      ax_loss.set_yscale("log")
    ax_loss.set_ylabel(loss_label)
    _shade_stages(ax_loss, result, label=False)
    _mark_boundaries(ax_loss, result)
    ax_loss.grid(alpha=0.3, which="both")

  _shade_stages(ax_llc, result, label=True)
  ax_llc.errorbar(steps, result.llc_mean, yerr=result.llc_std, fmt="o", ms=3,
                  color="tab:blue", ecolor="tab:blue", elinewidth=0.8, capsize=1.5,
                  label=r"$\hat\lambda$" + (" ± std" if result.llc_std is not None else ""))
  ax_llc.plot(step_grid, result.gp_mean_grid, color="black", lw=1.5, label="GP mean")
  ax_llc.fill_between(step_grid, result.gp_mean_grid - 2 * result.gp_std_grid,
                      result.gp_mean_grid + 2 * result.gp_std_grid, color="gray", alpha=0.25,
                      lw=0, label="GP ± 2 std")
  _mark_boundaries(ax_llc, result)
  lo = np.min(result.llc_mean - (result.llc_std if result.llc_std is not None else 0))
  hi = np.max(result.llc_mean + (result.llc_std if result.llc_std is not None else 0))
  pad = 0.12 * max(hi - lo, 1e-12)
  ax_llc.set_ylim(lo - pad, hi + 2 * pad)  # room for the stage labels
  ax_llc.set_ylabel(r"LLC $\hat\lambda$")
  ax_llc.legend(loc="lower right", fontsize=7)
  ax_llc.grid(alpha=0.3, which="both")

  _shade_stages(ax_slope, result, label=False)
  ax_slope.axhspan(-result.tolerance_used, result.tolerance_used, color="tab:green", alpha=0.2,
                   lw=0, label=f"± tolerance ({result.tolerance_used:.3g})")
  ax_slope.axhline(0.0, color="gray", lw=0.8)
  ax_slope.plot(step_grid, result.slope_grid, color="tab:purple", lw=1.3)
  ax_slope.plot(steps, result.slope, "o", ms=3, color="tab:purple")
  _mark_boundaries(ax_slope, result)
  ax_slope.set_ylabel(r"$d\hat\lambda / d\ln t$")
  ax_slope.set_xlabel("training step")
  ax_slope.legend(loc="upper right", fontsize=7)
  ax_slope.grid(alpha=0.3, which="both")
  _set_xscale(ax_slope, scale)
  ax_slope.set_xlim(steps[0], steps[-1])
  axes[0].set_title(title or "LLC stages")
  fig.tight_layout()
  return save_figure(fig, path)


def compare_boundaries(per_seed: Sequence[StageBoundaries], reference: StageBoundaries, *,
                       max_log_distance: float = math.log(3.0)) -> list[dict[str, Any]]:
  """Matches every reference boundary to the nearest boundary of each seed (App. B.4).

  Distances are in x = ln(step + 1). A seed without a boundary within
  `max_log_distance` of the reference boundary (default ln 3, a factor of 3
  in step) gets None. Matching is one-to-one per seed (closest pairs first),
  so a seed boundary matches at most one reference boundary.

  Returns:
    One dict per reference boundary, in order: `boundary` (1-based),
    `label` (e.g. "LR1-LR2"), `reference_step`, `reference_kind`,
    `matched_steps` and `log_distances` (per seed, None if unmatched),
    `count` (seeds matched), `n_seeds`, and over the matched steps `min_step`,
    `max_step`, `geometric_mean_step` (exp(mean ln(step + 1)) − 1) and
    `log_step_std` (population std of ln(step + 1)); these four are None when
    no seed matched.
  """
  if max_log_distance < 0:
    raise ValueError("max_log_distance must be non-negative")
  p = reference.label_prefix
  x_refs = np.log1p(np.asarray(reference.boundary_steps, dtype=float))
  # One-to-one per seed: pairs within reach are assigned closest first, so a
  # seed boundary never stands for two reference boundaries.
  assigned: list[dict[int, tuple[int, float]]] = []
  for result in per_seed:
    xs = np.log1p(np.asarray(result.boundary_steps, dtype=float))
    pairs = sorted((abs(float(xs[j] - x_refs[k])), k, j)
                   for k in range(len(x_refs)) for j in range(len(xs)))
    used_ref, used_seed, got = set(), set(), {}
    for d, k, j in pairs:
      if d <= max_log_distance and k not in used_ref and j not in used_seed:
        got[k] = (int(result.boundary_steps[j]), d)
        used_ref.add(k)
        used_seed.add(j)
    assigned.append(got)
  out = []
  for k, (s_ref, kind) in enumerate(zip(reference.boundary_steps, reference.boundary_kinds)):
    matched: list[int | None] = [a[k][0] if k in a else None for a in assigned]
    dists: list[float | None] = [a[k][1] if k in a else None for a in assigned]
    m = np.asarray([s for s in matched if s is not None], dtype=float)
    lm = np.log1p(m)
    out.append({
        "boundary": k + 1, "label": f"{p}{k + 1}-{p}{k + 2}", "reference_step": int(s_ref),
        "reference_kind": kind, "matched_steps": matched, "log_distances": dists,
        "count": int(m.size), "n_seeds": len(per_seed),
        "min_step": int(m.min()) if m.size else None,
        "max_step": int(m.max()) if m.size else None,
        "geometric_mean_step": float(np.expm1(lm.mean())) if m.size else None,
        "log_step_std": float(lm.std()) if m.size else None,
    })
  return out


def plot_seed_stages(per_seed: Sequence[StageBoundaries], reference: StageBoundaries, path: str,
                     labels: Sequence[str] | None = None, title: str = "") -> str:
  """One row per seed plus one for the reference: LLC, GP mean and boundaries.

  Each row shades and marks (dashed black) its own stages; the reference
  boundaries are drawn dotted red on every row so the spread is visible.
  Returns `path`.
  """
  import matplotlib.pyplot as plt  # plots.py has selected the Agg backend

  if labels is not None and len(labels) != len(per_seed):
    raise ValueError(f"{len(labels)} labels for {len(per_seed)} seeds")
  results = list(per_seed) + [reference]
  names = list(labels) if labels is not None else [f"seed {i}" for i in range(len(per_seed))]
  names.append("reference")
  fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.7 * len(results) + 0.8), sharex=True,
                           squeeze=False)
  axes = axes[:, 0]
  scale = "log"
  for ax, result, name in zip(axes, results, names):
    steps, row_scale = _plot_x(result.steps)
    scale = "symlog" if row_scale == "symlog" else scale
    _shade_stages(ax, result, label=True)
    ax.errorbar(steps, result.llc_mean, yerr=result.llc_std, fmt="o", ms=2.5, color="tab:blue",
                elinewidth=0.7, capsize=0)
    ax.plot(np.expm1(result.x_grid), result.gp_mean_grid, color="black", lw=1.2)
    _mark_boundaries(ax, reference, color="tab:red", ls=":", lw=1.4, alpha=0.9)
    _mark_boundaries(ax, result)
    lo, hi = float(np.min(result.llc_mean)), float(np.max(result.llc_mean))
    pad = 0.12 * max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad, hi + 2.5 * pad)
    ax.set_ylabel(name, fontsize=9)
    ax.grid(alpha=0.3, which="both")
  _set_xscale(axes[-1], scale)
  lo = min(float(r.steps[0]) for r in results)
  hi = max(float(r.steps[-1]) for r in results)
  axes[-1].set_xlim(lo if scale == "symlog" else max(lo, 1.0), hi)
  axes[-1].set_xlabel("training step")
  axes[0].set_title(title or "LLC stages per seed (dotted red: reference boundaries)")
  fig.tight_layout()
  return save_figure(fig, path)
