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

Stage i (labelled f"{label_prefix}{i}", from 1; default "S1", "S2", …) runs from the
previous boundary (or the first checkpoint) to the next boundary (or the last
checkpoint). The labels are neutral: they claim no correspondence with the
paper's LR1–LR5 or LM1–LM5. Each stage's `description` names its step range and,
where one of its boundaries lies within ±1 checkpoint of a feature of the
learning-rate schedule (`schedule_features`, e.g. the step of the maximum
learning rate), says so ("tracks the learning-rate peak at step 3000").

Stability (`stage_stability`, docs/reference/stages.md): the boundary finder is re-run,
with the same options, on resampled LLC curves: chains bootstrapped jointly
across checkpoints (exactly, over all C(2C−1, C) multisets with their
multinomial weights, when there are at most `max_exact` of them) × a fixed set
of draw windows (`DRAW_WINDOWS`). A boundary's stability is the weighted
fraction of resamples with a boundary within ±1 checkpoint of it; re-estimates
with other SGLD seeds are scored separately (`seed_stability`).

Multi-seed comparison (App. B.4): `compare_boundaries` matches each boundary of a
reference fit (e.g. of the LLC averaged over seeds) to the nearest boundary of
every seed in ln step and summarises the spread; `plot_seed_stages` (in
`devinterp_jax.viz.stages`) draws one row per seed plus one for the reference.

Usage on the `llc/llc.csv` of the main job (drop rows without a finite mean):

  t = np.genfromtxt(path, delimiter=",", names=True)
  ok = np.isfinite(t["llc_mean"])
  r = find_stage_boundaries(t["step"][ok], t["llc_mean"][ok], t["llc_sem"][ok])
  r.save(out_dir)
  from devinterp_jax.viz.stages import plot_stages   # the figure lives in viz
  plot_stages(r, f"{out_dir}/stages.png", loss_steps=t["step"], loss=t["eval_loss"],
              error_bar="SEM")   # what llc_std holds here

`llc_std` is the noise of the LLC *estimate* at each checkpoint: the standard
error over chains fits that meaning; the std over chains is larger by √chains
and smooths more. With None the noise level is fitted instead.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence, cast

import numpy as np
from scipy.linalg import solve_triangular
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from threadpoolctl import threadpool_limits

from devinterp_jax import atomic, paths

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
  `stability` is the boundaries' `StageStability` (None until `stage_stability`
  has scored them and the caller attached it with `dataclasses.replace`);
  `schedule_features` are learning-rate schedule features as data, each
  {"name": e.g. "learning-rate peak", "step": int}, that the stage
  descriptions mention when a boundary tracks one (within ±1 checkpoint).
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
  label_prefix: str = "S"
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  stability: StageStability | None = None
  schedule_features: tuple[dict[str, Any], ...] = ()

  def _tracked(self, index: int) -> list[dict[str, Any]]:
    """Schedule features within ±1 checkpoint of the boundary at checkpoint `index`:
    steps[index − 1] ≤ feature step ≤ steps[index + 1]."""
    lo = int(self.steps[max(index - 1, 0)])
    hi = int(self.steps[min(index + 1, len(self.steps) - 1)])
    return [dict(f) for f in self.schedule_features if lo <= int(f["step"]) <= hi]

  @property
  def boundaries(self) -> list[dict[str, Any]]:
    """Boundaries in order: {boundary (1-based), step, index, kind, stability,
    stable, seed_stability (None without a stability analysis or seeds),
    schedule_features (the features it tracks, within ±1 checkpoint)}."""
    st = self.stability
    out = []
    for j, (i, s, k) in enumerate(
      zip(self.boundary_indices, self.boundary_steps, self.boundary_kinds)
    ):
      hit = (
        st if st is not None and j < len(st.boundary_steps) and st.boundary_steps[j] == s else None
      )  # the stability analysis, where it covers boundary j
      out.append(
        {
          "boundary": j + 1,
          "step": int(s),
          "index": int(i),
          "kind": k,
          "stability": float(hit.stability[j]) if hit is not None else None,
          "stable": bool(hit.stable[j]) if hit is not None else None,
          "seed_stability": (
            None if hit is None or hit.seed_stability is None else float(hit.seed_stability[j])
          ),
          "schedule_features": self._tracked(int(i)),
        }
      )
    return out

  @property
  def stages(self) -> list[dict[str, Any]]:
    """Stages in order: {label, start_step, end_step, end_kind, end_stability,
    description}.

    `end_kind` is the kind of the boundary that ends the stage, or "end" for
    the last stage; `end_stability` that boundary's stability (None for the
    last stage or without a stability analysis). `description` gives the step
    range, the end boundary's stability, and the learning-rate schedule
    features that a boundary of the stage tracks (within ±1 checkpoint).
    """
    starts = [int(self.steps[0])] + list(self.boundary_steps)
    ends = list(self.boundary_steps) + [int(self.steps[-1])]
    kinds = list(self.boundary_kinds) + ["end"]
    bounds = self.boundaries
    out = []
    for i, (s, e, k) in enumerate(zip(starts, ends, kinds)):
      label = f"{self.label_prefix}{i + 1}"
      end = bounds[i] if i < len(bounds) else None
      text = f"{label}: steps {s}–{e}"
      if end is not None:
        text += f"; ends at a {k.replace('_', ' ')}"
        if end["stability"] is not None:
          text += f" (stability {end['stability']:.2f}{'' if end['stable'] else ', unstable'})"
      notes = []
      for side, b in (("start", bounds[i - 1] if i > 0 else None), ("end", end)):
        if b is None:
          continue
        for f in b.get("schedule_features", []):
          notes.append(
            f"its {side} boundary (step {b['step']}) tracks the {f['name']} at "
            f"step {int(f['step'])}"
          )
      if notes:
        text += "; " + "; ".join(notes)
      out.append(
        {
          "label": label,
          "start_step": s,
          "end_step": e,
          "end_kind": k,
          "end_stability": None if end is None else end["stability"],
          "description": text,
        }
      )
    return out

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict of every field plus `stages`, `boundaries` and
    `stability_passes` (None without a stability analysis)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, np.ndarray):
        value = value.tolist()
      elif isinstance(value, StageStability):
        value = value.to_dict()
      elif isinstance(value, tuple):
        value = list(value)
      out[field.name] = value
    out["stages"] = self.stages
    out["boundaries"] = self.boundaries
    out["stability_passes"] = None if self.stability is None else self.stability.passes
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
        if value is None:
          raise ValueError("StageBoundaries.from_dict: the dict has no tolerance_used")
        value = float(value)
      elif field.name == "label_prefix":
        value = "S" if value is None else str(value)
      elif field.name == "kernel":
        value = str(value)
      elif field.name == "settings":
        value = dict(value or {})
      elif field.name == "stability":
        value = None if value is None else StageStability.from_dict(value)
      elif field.name == "schedule_features":
        value = tuple(dict(f) for f in (value or ()))
      else:
        value = np.asarray(value, dtype=float)
      kwargs[field.name] = value
    return cls(**kwargs)

  def save(self, directory: str) -> tuple[str, str]:
    """Writes `stages.json` (everything) and `stages.csv` atomically.

    The CSV has one row per stage:
    label,start_step,end_step,end_kind,end_stability,description
    (end_stability empty for the last stage or without a stability analysis).
    Returns the two paths.
    """
    json_path = os.path.join(directory, "stages.json")
    csv_path = os.path.join(directory, "stages.csv")
    atomic.write_text(json_path, json.dumps(self.to_dict(), indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "start_step", "end_step", "end_kind", "end_stability", "description"])
    for stage in self.stages:
      st = stage["end_stability"]
      writer.writerow(
        [
          stage["label"],
          stage["start_step"],
          stage["end_step"],
          stage["end_kind"],
          "" if st is None else f"{st:.4f}",
          stage["description"],
        ]
      )
    atomic.write_text(csv_path, buf.getvalue())
    return json_path, csv_path

  @classmethod
  def load(cls, directory: str) -> StageBoundaries:
    """Reads the `stages.json` that `save` wrote."""
    return cls.from_dict(json.loads(paths.read_text(os.path.join(directory, "stages.json"))))


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
    raise ValueError(
      f"llc_mean must be finite; it is not at steps "
      f"{steps[~np.isfinite(llc_mean)].tolist()} (leave those checkpoints out)"
    )
  if llc_std is not None:
    if not np.all(np.isfinite(llc_std)):
      raise ValueError(
        f"llc_std must be finite; it is not at steps "
        f"{steps[~np.isfinite(llc_std)].tolist()} (a checkpoint with fewer "
        f"than 2 valid chains has no standard error: leave it out)"
      )
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
  return [
    i for i in range(1, len(a) - 1) if a[i] <= a[i - 1] and a[i] <= a[i + 1] and a[i] < tolerance
  ]


def _prune(
  candidates: list[int],
  kinds: dict[int, str],
  x: np.ndarray,
  gp_mean: np.ndarray,
  min_change: float,
) -> tuple[list[int], dict[int, str], list[int]]:
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
    return float(np.ptp(gp_mean[a : b + 1]))

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
  label_prefix: str = "S",
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
    label_prefix: stage labels are f"{label_prefix}{i}" (neutral: "S1", "S2", …).

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

  signal = ConstantKernel(1.0, amplitude_bounds) * RBF(length_scale, length_scale_bounds)
  if llc_std is None:
    kernel, alpha = signal + WhiteKernel(noise_level, noise_level_bounds), 1e-10
  else:
    kernel, alpha = signal, np.maximum((llc_std / y_scale) ** 2, _MIN_NOISE_VAR)
  # scikit-learn is untyped: pyright infers `alpha: float` from its default (a per-point array
  # is documented too) and a union for the fitted `kernel_`; the GP is used untyped.
  gp = cast(Any, GaussianProcessRegressor)(
    kernel=kernel,
    alpha=alpha,
    normalize_y=False,
    n_restarts_optimizer=n_restarts,
    random_state=seed,
  )
  # Tiny matrices: extra BLAS threads only contend. Restarts that stop at a
  # bound or end "ABNORMAL" are expected; the best restart is kept.
  with threadpool_limits(limits=1), warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    gp.fit(x[:, None], y)
  fitted_signal = gp.kernel_.k1 if llc_std is None else gp.kernel_
  ell = float(fitted_signal.k2.length_scale)

  def posterior(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = fitted_signal(xq[:, None], x[:, None])  # (q, n)
    mean = k @ gp.alpha_
    slope = (k * (-(xq[:, None] - x[None, :]) / ell**2)) @ gp.alpha_
    v = solve_triangular(gp.L_, k.T, lower=True)
    var = np.maximum(fitted_signal.diag(xq[:, None]) - np.sum(v**2, axis=0), 0.0)
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
  kept, kinds, pruned = _prune(
    candidates, kinds, x, gp_mean, min_stage_change * float(np.ptp(gp_mean))
  )

  settings = dict(
    tolerance=tolerance,
    relative_tolerance=relative_tolerance,
    length_scale=length_scale,
    length_scale_bounds=list(length_scale_bounds),
    amplitude_bounds=list(amplitude_bounds),
    noise_level=noise_level,
    noise_level_bounds=list(noise_level_bounds),
    n_restarts=n_restarts,
    seed=seed,
    min_stage_change=min_stage_change,
    grid_size=grid_size,
    noise="llc_std" if llc_std is not None else "white_kernel",
    slope_method="analytic derivative of the GP posterior mean",
  )
  return StageBoundaries(
    steps=steps,
    x=x,
    llc_mean=llc_mean,
    llc_std=llc_std,
    gp_mean=gp_mean,
    gp_std=gp_std,
    slope=slope,
    x_grid=x_grid,
    gp_mean_grid=gp_mean_grid,
    gp_std_grid=gp_std_grid,
    slope_grid=slope_grid,
    boundary_indices=tuple(kept),
    boundary_steps=tuple(int(steps[i]) for i in kept),
    boundary_kinds=tuple(kinds[i] for i in kept),
    tolerance_used=tol,
    kernel=str(gp.kernel_),
    pruned_indices=tuple(pruned),
    label_prefix=label_prefix,
    settings=settings,
  )


def compare_boundaries(
  per_seed: Sequence[StageBoundaries],
  reference: StageBoundaries,
  *,
  max_log_distance: float = math.log(3.0),
) -> list[dict[str, Any]]:
  """Matches every reference boundary to the nearest boundary of each seed (App. B.4).

  Distances are in x = ln(step + 1). A seed without a boundary within
  `max_log_distance` of the reference boundary (default ln 3, a factor of 3
  in step) gets None. Matching is one-to-one per seed (closest pairs first),
  so a seed boundary matches at most one reference boundary.

  Returns:
    One dict per reference boundary, in order: `boundary` (1-based),
    `label` (e.g. "S1-S2"), `reference_step`, `reference_kind`,
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
    pairs = sorted(
      (abs(float(xs[j] - x_refs[k])), k, j) for k in range(len(x_refs)) for j in range(len(xs))
    )
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
    out.append(
      {
        "boundary": k + 1,
        "label": f"{p}{k + 1}-{p}{k + 2}",
        "reference_step": int(s_ref),
        "reference_kind": kind,
        "matched_steps": matched,
        "log_distances": dists,
        "count": int(m.size),
        "n_seeds": len(per_seed),
        "min_step": int(m.min()) if m.size else None,
        "max_step": int(m.max()) if m.size else None,
        "geometric_mean_step": float(np.expm1(lm.mean())) if m.size else None,
        "log_step_std": float(lm.std()) if m.size else None,
      }
    )
  return out


# ----------------------------------------------------------------------------------------
# Stability of the boundaries under resampling (docs/reference/stages.md).

# Draw windows: (name, start, end) as fractions of the kept length L = T − burn-in of
# each checkpoint; the window is draws [burnin + ⌊start·L⌋, burnin + ⌊end·L⌋). The first
# is the kept window itself (the reference curve).
DRAW_WINDOWS: tuple[tuple[str, float, float], ...] = (
  ("kept", 0.0, 1.0),
  ("start +25%", 0.25, 1.0),
  ("start +50%", 0.5, 1.0),
  ("first 75%", 0.0, 0.75),
)
STABILITY_TARGET = 0.8
MIN_RESAMPLE_CHAINS = 2  # a checkpoint's resample needs >= 2 valid chain draws
NOISE_MODELS = ("sem", "std", "fit")


def num_distinct_resamples(num_chains: int) -> int:
  """Distinct bootstrap resamples (multisets of size C from C chains): C(2C − 1, C)."""
  if num_chains < 1:
    raise ValueError(f"num_chains must be >= 1, got {num_chains}")
  return math.comb(2 * num_chains - 1, num_chains)


def chain_multisets(num_chains: int) -> tuple[np.ndarray, np.ndarray]:
  """Every bootstrap resample of C chains, with its probability (the exact bootstrap).

  Returns (counts [M, C] int: how often each chain is drawn, each row summing to
  C; weights [M]: the multinomial probability C! / (∏_c n_c!) / C^C of drawing
  that multiset, summing to 1), with M = C(2C − 1, C) (35 for C = 4).
  """
  c = int(num_chains)
  num_distinct_resamples(c)
  rows = [
    np.bincount(np.asarray(combo), minlength=c)
    for combo in itertools.combinations_with_replacement(range(c), c)
  ]
  counts = np.stack(rows).astype(np.int64)
  ways = [math.factorial(c) // math.prod(math.factorial(int(n)) for n in row) for row in counts]
  total = c**c
  return counts, np.array([w / total for w in ways], dtype=float)


@dataclasses.dataclass(frozen=True)
class ChainResamples:
  """The chain resamples a stability analysis uses.

  `counts` [M, C] (each row sums to C), `weights` [M] (sum 1); `exact` when all
  `num_distinct` = C(2C − 1, C) multisets are enumerated with their multinomial
  weights, else a fixed-seed random sample of `num_drawn` bootstrap draws
  (duplicates merged, weight = share of the draws).
  """

  counts: np.ndarray
  weights: np.ndarray
  exact: bool
  num_distinct: int
  num_drawn: int


def chain_resamples(
  num_chains: int, *, max_exact: int = 500, num_random: int = 200, seed: int = 0
) -> ChainResamples:
  """All C(2C − 1, C) multisets when there are at most `max_exact`, else `num_random`
  bootstrap draws (C chains with replacement) from `numpy.random.default_rng(seed)`."""
  n = num_distinct_resamples(num_chains)
  if n <= max_exact:
    counts, weights = chain_multisets(num_chains)
    return ChainResamples(counts, weights, True, n, n)
  if num_random < 1:
    raise ValueError(f"num_random must be >= 1, got {num_random}")
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num_chains, size=(num_random, num_chains))
  counts = np.stack([np.bincount(d, minlength=num_chains) for d in draws])
  unique, times = np.unique(counts, axis=0, return_counts=True)
  return ChainResamples(unique.astype(np.int64), times / num_random, False, n, num_random)


def window_llcs(
  loss_trace: np.ndarray,
  init_loss: np.ndarray,
  nbeta,
  burnin=None,
  windows: Sequence[tuple[str, float, float]] = DRAW_WINDOWS,
) -> np.ndarray:
  """Per-chain LLCs from each draw window: nβ (mean loss over the window − L(w*)).

  Args:
    loss_trace: recorded losses [N, C, I] (all draws, burn-in included).
    init_loss: L(w*) per chain [N, C].
    nbeta: nβ, a scalar or [N].
    burnin: draws left out of the kept window, a scalar or [N] (None: 0).
    windows: (name, start, end) fractions of the kept length L = T − burnin:
      draws [burnin + ⌊start·L⌋, burnin + ⌊end·L⌋), at least one draw.

  Returns:
    [W, N, C]; NaN where a window holds a non-finite loss.
  """
  trace = np.asarray(loss_trace, np.float64)
  if trace.ndim != 3:
    raise ValueError(f"loss_trace must be [checkpoints, chains, draws], got {trace.shape}")
  k, _, t = trace.shape
  init = np.asarray(init_loss, np.float64)
  if init.shape != trace.shape[:2]:
    raise ValueError(f"init_loss has shape {init.shape}, expected {trace.shape[:2]}")
  nb = np.broadcast_to(np.asarray(nbeta, np.float64), (k,))
  b = np.broadcast_to(np.asarray(0 if burnin is None else burnin, np.int64), (k,))
  out = np.empty((len(windows), k, trace.shape[1]))
  for w, (name, lo, hi) in enumerate(windows):
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"window {name!r}: need 0 <= start < end <= 1, got {lo}, {hi}")
    for i in range(k):
      length = t - int(b[i])
      a = int(b[i]) + int(math.floor(lo * length))
      e = max(int(b[i]) + int(math.floor(hi * length)), a + 1)
      with np.errstate(invalid="ignore"):
        out[w, i] = nb[i] * (trace[i, :, a:e].mean(-1) - init[i])
  return out


def _refit_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The options of a fit (its `settings`), for refitting resampled curves. The grid
  only draws the plot (boundaries use the checkpoints), so refits use 2 points."""
  keys = (
    "tolerance",
    "relative_tolerance",
    "length_scale",
    "n_restarts",
    "seed",
    "min_stage_change",
    "noise_level",
  )
  missing = [k for k in keys if k not in settings]
  if missing:
    raise ValueError(
      f"the reference fit's settings lack {missing}; refit it with find_stage_boundaries"
    )
  kw = {k: settings[k] for k in keys}
  for k in ("length_scale_bounds", "amplitude_bounds", "noise_level_bounds"):
    kw[k] = tuple(settings[k])
  kw["grid_size"] = 2
  return kw


def _resampled_curve(
  llc: np.ndarray, valid: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Mean, std (ddof 1), SEM over the resampled chains, and which checkpoints have
  >= MIN_RESAMPLE_CHAINS valid draws. llc, valid [N, C]; counts [C]."""
  n = np.where(valid, counts[None, :], 0).astype(float)  # [N, C]
  total = n.sum(-1)
  safe = np.where(valid, llc, 0.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = (n * safe).sum(-1) / total
    var = (n * (safe - mean[:, None]) ** 2).sum(-1) / (total - 1)
  std = np.sqrt(np.maximum(var, 0.0))
  ok = (total >= MIN_RESAMPLE_CHAINS) & np.isfinite(mean) & np.isfinite(std)
  return mean, std, std / np.sqrt(np.maximum(total, 1)), ok


def _fit_resample(steps, llc, valid, counts, noise: str, kw) -> tuple[int, ...] | None:
  """Boundary steps of one resampled curve, or None when it cannot be fitted."""
  mean, std, sem, ok = _resampled_curve(llc, valid, counts)
  if ok.sum() < 4:
    return None
  err = {"sem": sem, "std": std, "fit": None}[noise]
  try:
    r = find_stage_boundaries(steps[ok], mean[ok], None if err is None else err[ok], **kw)
  except (ValueError, np.linalg.LinAlgError):
    return None
  return r.boundary_steps


@dataclasses.dataclass(frozen=True)
class StageStability:
  """How often each boundary of a reference fit survives resampling.

  Per reference boundary (tuples in boundary order): `boundary_steps`,
  `boundary_indices`, `boundary_kinds`; `stability`, the weighted fraction of
  resamples (chain resamples × draw windows, each window weighted equally) with
  a boundary within ±`max_distance` checkpoints of it; `stable` (stability ≥
  `target`); `by_window`, the stability over the chain resamples of each window;
  `window_only`, the fraction of windows whose fit with the original chains has
  it; `seed_stability`, the fraction of SGLD re-estimates (`seeds`) that have it
  (None without seeds; not part of `passes`) and `seed_matches` (per seed, the
  matched step or None).

  `passes` is True when every boundary is stable; `reasons` names each that is
  not. Resampling: `num_chains`, `num_distinct_chain_resamples` (C(2C − 1, C)),
  `chain_resampling` ("exact" or "random"), `num_chain_resamples` (distinct
  multisets used), `num_random_draws` (random only), `windows`, `num_fits`,
  `num_failed_fits` (resamples with fewer than 4 usable checkpoints or a failed
  GP fit: they support no boundary), `boundary_count_distribution` (number of
  boundaries → weight), `extra_boundaries` (weighted mean number of resample
  boundaries farther than `max_distance` from every reference boundary).
  `noise` is the per-checkpoint noise model of the refits; `settings` the
  boundary-finder options (the reference's, never retuned).
  """

  boundary_steps: tuple[int, ...]
  boundary_indices: tuple[int, ...]
  boundary_kinds: tuple[str, ...]
  stability: tuple[float, ...]
  stable: tuple[bool, ...]
  by_window: tuple[dict[str, float], ...]
  window_only: tuple[float, ...]
  passes: bool
  reasons: tuple[str, ...]
  target: float
  max_distance: int
  num_chains: int
  num_distinct_chain_resamples: int
  chain_resampling: str
  num_chain_resamples: int
  num_random_draws: int | None
  windows: tuple[dict[str, Any], ...]
  num_fits: int
  num_failed_fits: int
  boundary_count_distribution: dict[int, float]
  extra_boundaries: float
  noise: str
  settings: dict[str, Any]
  seed_stability: tuple[float, ...] | None = None
  seed_matches: tuple[dict[str, int | None], ...] | None = None
  seeds: tuple[dict[str, Any], ...] = ()

  @property
  def boundaries(self) -> list[dict[str, Any]]:
    """Per boundary: {boundary, step, index, kind, stability, stable, by_window,
    window_only, seed_stability, seed_matches}."""
    out = []
    for j, s in enumerate(self.boundary_steps):
      out.append(
        {
          "boundary": j + 1,
          "step": int(s),
          "index": int(self.boundary_indices[j]),
          "kind": self.boundary_kinds[j],
          "stability": self.stability[j],
          "stable": self.stable[j],
          "by_window": dict(self.by_window[j]),
          "window_only": self.window_only[j],
          "seed_stability": (None if self.seed_stability is None else self.seed_stability[j]),
          "seed_matches": (None if self.seed_matches is None else dict(self.seed_matches[j])),
        }
      )
    return out

  def to_dict(self) -> dict[str, Any]:
    """JSON-able: every field (tuples as lists, count keys as strings) plus
    `boundaries` and a one-line `summary`."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "boundary_count_distribution":
        value = {str(k): v for k, v in value.items()}
      elif isinstance(value, tuple):
        value = [dict(v) if isinstance(v, Mapping) else v for v in value]
      out[field.name] = value
    out["boundaries"] = self.boundaries
    out["summary"] = self.summary()
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> StageStability:
    """Inverse of `to_dict` (`boundaries` and `summary` are ignored)."""
    kw: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
      if field.name not in d:
        continue
      v = d[field.name]
      if field.name == "boundary_count_distribution":
        v = {int(k): float(x) for k, x in v.items()}
      elif field.name in ("seed_stability", "seed_matches") and v is None:
        pass
      elif isinstance(v, list):
        v = tuple(dict(x) if isinstance(x, Mapping) else x for x in v)
      kw[field.name] = v
    return cls(**kw)

  def summary(self) -> str:
    """E.g. "passes: 3 boundaries, stability ≥ 0.80 (140 resamples: exact bootstrap over
    35 chain multisets × 4 draw windows)"."""
    how = (
      f"exact bootstrap over all {self.num_distinct_chain_resamples} chain multisets"
      if self.chain_resampling == "exact"
      else f"{self.num_random_draws} random bootstrap draws ({self.num_chain_resamples} "
      f"distinct) of {self.num_distinct_chain_resamples} chain multisets"
    )
    head = (
      "passes: no boundaries to score"
      if not self.boundary_steps
      else f"passes: all {len(self.boundary_steps)} boundaries have stability ≥ {self.target:.2f}"
      if self.passes
      else f"fails: {len(self.reasons)} of {len(self.boundary_steps)} boundaries below "
      f"{self.target:.2f}"
    )
    return f"{head} ({self.num_fits} resamples: {how} × {len(self.windows)} draw windows)"


def stage_stability(
  reference: StageBoundaries,
  llc_per_chain: np.ndarray,
  *,
  valid: np.ndarray | None = None,
  window_names: Sequence[str] | None = None,
  noise: str = "sem",
  seed_curves: Mapping[str, tuple] | None = None,
  target: float = STABILITY_TARGET,
  max_distance: int = 1,
  max_exact: int = 500,
  num_random: int = 200,
  random_seed: int = 0,
) -> StageStability:
  """The stability of each boundary of `reference` under chain and window resampling.

  Every resample re-runs `find_stage_boundaries` with the reference's own
  options (`reference.settings`; never retuned) on the curve of the resampled
  chains: per checkpoint, the mean over the resampled valid chains (each chain
  counted as often as it was drawn) and, as the GP noise, its SEM (`noise="sem"`)
  or std (`"std"`) over those chains, or a fitted noise (`"fit"`). Chains are
  resampled jointly across checkpoints: a chain's minibatches and injected
  noise are shared by all checkpoints, so chain c is drawn at every checkpoint
  or none. The resamples are every chain multiset with its multinomial weight
  (`chain_resamples`: exact up to `max_exact` multisets, else `num_random`
  draws with `random_seed`) × every draw window (leading axis of
  `llc_per_chain`), windows weighted equally. A boundary's stability is the
  weighted fraction of resamples with a boundary within ±`max_distance`
  checkpoints (index distance over `reference.steps`) of it. Boundaries below
  `target` are kept and marked `stable=False`; then `passes` is False and
  `reasons` names them. The chains are put in a canonical order first, so the
  result does not depend on their order.

  Args:
    reference: the fit whose boundaries are scored (its options are reused).
    llc_per_chain: per-chain LLCs at `reference.steps`, [N, C], or [W, N, C] with
      one curve per draw window (`window_llcs`; the first is the kept window).
    valid: chains that count (not diverged), broadcastable to `llc_per_chain`;
      non-finite LLCs never count.
    window_names: names of the W windows (default: `DRAW_WINDOWS`' names when W
      matches, else "window i").
    noise: "sem", "std" or "fit", as the reference was fitted.
    seed_curves: label → (steps, per-chain LLCs [N', C'], valid or None) of LLCs
      re-estimated with other SGLD seeds; each is fitted with the same options
      at the reference's steps it holds and scored separately
      (`seed_stability`, not part of `passes`).
    target: stability a boundary needs to be `stable`.
    max_distance: the ±checkpoint window of a match.
    max_exact, num_random, random_seed: see `chain_resamples`.
  """
  if noise not in NOISE_MODELS:
    raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
  if (noise == "fit") != (reference.settings.get("noise") == "white_kernel"):
    raise ValueError(
      f"noise={noise!r} but the reference was fitted with noise "
      f"{reference.settings.get('noise')!r}: score it with its own noise model"
    )
  if not 0.0 <= target <= 1.0 or max_distance < 0:
    raise ValueError("target must be in [0, 1] and max_distance >= 0")
  kw = _refit_kwargs(reference.settings)
  steps = np.asarray(reference.steps, np.int64)
  llc = np.asarray(llc_per_chain, np.float64)
  if llc.ndim == 2:
    llc = llc[None]
  if llc.ndim != 3 or llc.shape[1] != len(steps):
    raise ValueError(
      f"llc_per_chain must be [N, C] or [W, N, C] with N = {len(steps)} "
      f"(the reference's checkpoints), got {np.shape(llc_per_chain)}"
    )
  ok = np.isfinite(llc) & (
    True if valid is None else np.broadcast_to(np.asarray(valid, bool), llc.shape)
  )
  w_count, _, c = llc.shape
  if window_names is None:
    window_names = (
      [w[0] for w in DRAW_WINDOWS]
      if w_count == len(DRAW_WINDOWS)
      else [f"window {i}" for i in range(w_count)]
    )
  if len(window_names) != w_count:
    raise ValueError(f"{len(window_names)} window names for {w_count} windows")
  windows = [
    next(
      ({"name": n, "start": lo, "end": hi} for n, lo, hi in DRAW_WINDOWS if n == name),
      {"name": name},
    )
    for name in window_names
  ]
  # Canonical chain order: sorted by each chain's curve (kept window), so the
  # resamples — random ones included — do not depend on how the chains are numbered.
  order = np.lexsort(np.where(ok[0], llc[0], np.inf)[::-1])
  llc, ok = llc[:, :, order], ok[:, :, order]
  res = chain_resamples(c, max_exact=max_exact, num_random=num_random, seed=random_seed)
  ref_idx = np.asarray(reference.boundary_indices, np.int64)

  def positions(found: Sequence[int]) -> np.ndarray:
    return np.searchsorted(steps, np.asarray(found, np.int64))

  def hits(found: tuple[int, ...] | None) -> np.ndarray:
    if not found:
      return np.zeros(len(ref_idx), bool)
    pos = positions(found)
    return np.array([np.any(np.abs(pos - i) <= max_distance) for i in ref_idx], bool)

  cache: dict[tuple[int, tuple[int, ...]], tuple[int, ...] | None] = {}

  def fit(w: int, counts: np.ndarray) -> tuple[int, ...] | None:
    key = (w, tuple(int(x) for x in counts))
    if key not in cache:
      cache[key] = _fit_resample(steps, llc[w], ok[w], counts, noise, kw)
    return cache[key]

  by_window = np.zeros((w_count, len(ref_idx)))
  dist: dict[int, float] = {}
  extra = 0.0
  failed = 0
  for w in range(w_count):
    for counts, weight in zip(res.counts, res.weights):
      found = fit(w, counts)
      failed += found is None
      h = hits(found)
      by_window[w] += weight * h
      n_found = len(found or ())
      dist[n_found] = dist.get(n_found, 0.0) + weight / w_count
      if found:
        pos = positions(found)
        far = [p for p in pos if not np.any(np.abs(ref_idx - p) <= max_distance)]
        extra += weight / w_count * len(far)
  score = by_window.mean(0)
  identity = np.ones(c, np.int64)
  window_only = (
    np.mean([hits(fit(w, identity)) for w in range(w_count)], axis=0)
    if len(ref_idx)
    else np.zeros(0)
  )
  stable = tuple(bool(s >= target - 1e-12) for s in score)
  reasons = tuple(
    f"boundary {j + 1} at step {int(reference.boundary_steps[j])} "
    f"({reference.boundary_kinds[j].replace('_', ' ')}): stability {score[j]:.2f} < "
    f"target {target:.2f}"
    for j in range(len(ref_idx))
    if not stable[j]
  )

  seed_stability = seed_matches = None
  seeds: list[dict[str, Any]] = []
  if seed_curves:
    matched = np.zeros((len(seed_curves), len(ref_idx)), bool)
    per_boundary: list[dict[str, int | None]] = [{} for _ in ref_idx]
    for s_i, (label, curve) in enumerate(seed_curves.items()):
      s_steps, s_llc, *rest = curve
      s_valid = rest[0] if rest else None
      s_steps = np.asarray(s_steps, np.int64)
      s_llc = np.asarray(s_llc, np.float64)
      s_ok = np.isfinite(s_llc) & (True if s_valid is None else np.asarray(s_valid, bool))
      at = np.searchsorted(s_steps, steps)
      have = (at < len(s_steps)) & (s_steps[np.minimum(at, len(s_steps) - 1)] == steps)
      llc_s = np.full((len(steps), s_llc.shape[1]), np.nan)
      ok_s = np.zeros_like(llc_s, bool)
      llc_s[have], ok_s[have] = s_llc[at[have]], s_ok[at[have]]
      found = _fit_resample(steps, llc_s, ok_s, np.ones(s_llc.shape[1], np.int64), noise, kw)
      seeds.append(
        {
          "label": str(label),
          "boundary_steps": None if found is None else [int(x) for x in found],
          "failed": found is None,
          "missing_steps": [int(x) for x in steps[~have]],
        }
      )
      pos = positions(found or ())
      for j, i in enumerate(ref_idx):
        near = sorted(
          (abs(int(p) - int(i)), int(steps[p])) for p in pos if abs(int(p) - int(i)) <= max_distance
        )
        matched[s_i, j] = bool(near)
        per_boundary[j][str(label)] = near[0][1] if near else None
    seed_stability = tuple(float(x) for x in matched.mean(0))
    seed_matches = tuple(per_boundary)

  settings = {
    k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k != "grid_size"
  }
  return StageStability(
    boundary_steps=tuple(int(s) for s in reference.boundary_steps),
    boundary_indices=tuple(int(i) for i in ref_idx),
    boundary_kinds=tuple(reference.boundary_kinds),
    stability=tuple(float(s) for s in score),
    stable=stable,
    by_window=tuple(
      {window_names[w]: float(by_window[w, j]) for w in range(w_count)} for j in range(len(ref_idx))
    ),
    window_only=tuple(float(x) for x in window_only),
    passes=not reasons,
    reasons=reasons,
    target=float(target),
    max_distance=int(max_distance),
    num_chains=int(c),
    num_distinct_chain_resamples=res.num_distinct,
    chain_resampling="exact" if res.exact else "random",
    num_chain_resamples=len(res.weights),
    num_random_draws=None if res.exact else res.num_drawn,
    windows=tuple(windows),
    num_fits=w_count * len(res.weights),
    num_failed_fits=int(failed),
    boundary_count_distribution={k: float(v) for k, v in sorted(dist.items())},
    extra_boundaries=float(extra),
    noise=noise,
    settings=settings,
    seed_stability=seed_stability,
    seed_matches=seed_matches,
    seeds=tuple(seeds),
  )
