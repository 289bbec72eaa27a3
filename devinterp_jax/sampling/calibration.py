"""Automatic calibration of ε, nβ and γ (paper App. A.5.3), as one batched program.

`calibrate` runs the grid ε × nβ × γ on a few checkpoints (the earliest and the
latest by default: early training is where chains diverge) with every grid
point, checkpoint and chain in one compiled program, and recommends:

  for each (nβ, γ): the largest ε for which, on every calibration checkpoint,
    * no chain has a disqualifying health status (default: diverged or
      not converged; escaped and negative chains are reported but do not
      disqualify, since they describe w*, e.g. an untrained checkpoint that is
      not a local minimum, rather than the step size), and
    * the mean acceptance of the sampler's step-size check over chains lies in
      `mala_band` by a margin of `margin_se` of its own Monte-Carlo standard
      error (default [0.95, 1] with 2 SE: at most ~5 % of proposals would be
      rejected; on the validation models of docs/results/validation.md this kept the
      discretisation bias below ~5 %, while a band starting at 0.9 let one case
      reach +11 %). The check is MALA for SGLD samplers and the Metropolis
      acceptance of one leapfrog step for SGHMC / SGNHT, whose law at
      equilibrium is MALA's at the same ε (`sampling/underdamped.py`), so one
      band serves both.

Chains must be converged by the issue-8 criteria (`not_converged`
disqualifies by default), so calibration runs at least `criteria.min_chains`
(4) chains. Each grid point also reports the draws its chains would need for
the criteria's bulk ESS per chain, from its own measured ESS per draw: what a
smaller ε costs.
  overall: among those, the largest nβ (the estimate is closest to its
    nβ → ∞ limit), then the smallest γ (the widest exploration, paper
    A.5.3), then the largest ε.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from devinterp_jax import atomic
from devinterp_jax.sampling import diagnostics
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling.results import LLCResult


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
  """A calibration grid. Grid arrays are [ε, nβ, γ, checkpoint(, chain)]."""

  step_sizes: np.ndarray
  nbetas: np.ndarray
  localizations: np.ndarray
  checkpoint_ids: list
  llc_mean: np.ndarray  # [ε, nβ, γ, N]
  llc_std: np.ndarray  # [ε, nβ, γ, N]
  mala_acceptance: np.ndarray  # [ε, nβ, γ, N] mean over chains
  status: np.ndarray  # [ε, nβ, γ, N, C]
  llc_trace_mean: np.ndarray  # [ε, nβ, γ, N, I]
  passes: np.ndarray  # [ε, nβ, γ]
  reasons: dict  # "i,j,k" -> why the grid point fails
  per_setting: list  # one recommendation per (nβ, γ)
  recommended: dict | None  # overall recommendation
  mala_band: tuple
  disqualify: tuple
  settings: dict
  mala_se: np.ndarray | None = None  # [ε, nβ, γ, N] MCSE of the mean acceptance
  draws_needed: np.ndarray | None = None  # [ε, nβ, γ, N] draws for the ESS target
  margin_se: float = 2.0
  step_check: str = "mala"

  def to_json(self) -> dict:
    counts = {}
    for i, j, k in itertools.product(*map(range, self.passes.shape)):
      counts[f"{i},{j},{k}"] = diagnostics.status_counts(self.status[i, j, k])
    return {
      "step_sizes": self.step_sizes.tolist(),
      "nbetas": self.nbetas.tolist(),
      "localizations": self.localizations.tolist(),
      "checkpoint_ids": [str(c) for c in self.checkpoint_ids],
      "llc_mean": self.llc_mean.tolist(),
      "llc_std": self.llc_std.tolist(),
      "mala_acceptance": self.mala_acceptance.tolist(),
      "passes": self.passes.tolist(),
      "status_counts": counts,
      "reasons": self.reasons,
      "per_setting": self.per_setting,
      "recommended": self.recommended,
      "mala_band": list(self.mala_band),
      "disqualify": list(self.disqualify),
      "settings": self.settings,
      "mala_se": None if self.mala_se is None else self.mala_se.tolist(),
      "draws_needed": None if self.draws_needed is None else self.draws_needed.tolist(),
      "margin_se": self.margin_se,
      "step_check": self.step_check,
    }

  def table(self) -> str:
    """A markdown table: one row per grid point."""
    rows = [
      "| ε | nβ | γ | "
      + " | ".join(f"λ̂ @ {c}" for c in self.checkpoint_ids)
      + f" | {self.step_check} acceptance ± SE | draws for ESS target | health | passes |",
      "|" + "---|" * (7 + len(self.checkpoint_ids)),
    ]
    for i, j, k in itertools.product(*map(range, self.passes.shape)):
      llcs = " | ".join(
        f"{m:.3g} ± {s:.2g}" for m, s in zip(self.llc_mean[i, j, k], self.llc_std[i, j, k])
      )
      se = (
        self.mala_se[i, j, k]
        if self.mala_se is not None
        else np.full(len(self.checkpoint_ids), np.nan)
      )
      acc = ", ".join(f"{a:.3f} ± {e:.3f}" for a, e in zip(self.mala_acceptance[i, j, k], se))
      need = (
        ""
        if self.draws_needed is None
        else ", ".join(
          "—" if not np.isfinite(n) else f"{n:.0f}" for n in self.draws_needed[i, j, k]
        )
      )
      counts = diagnostics.status_counts(self.status[i, j, k])
      health = ", ".join(f"{n} {v}" for n, v in counts.items() if v)
      why = "yes" if self.passes[i, j, k] else "no: " + self.reasons.get(f"{i},{j},{k}", "")
      rows.append(
        f"| {self.step_sizes[i]:.3g} | {self.nbetas[j]:.4g} | "
        f"{self.localizations[k]:.4g} | {llcs} | {acc} | {need} | {health} | {why} |"
      )
    return "\n".join(rows)

  def save(self, directory: str) -> None:
    """calibration.json and calibration.md, written atomically. The figures are the
    caller's: `devinterp_jax.viz.llc.plot_calibration(result, directory)`."""
    atomic.write_text(
      os.path.join(directory, "calibration.json"), json.dumps(self.to_json(), indent=2)
    )
    rec = self.recommended
    head = (
      "Recommended: "
      + (", ".join(f"{k} = {v:.4g}" for k, v in rec.items()) if rec else "none of the grid passes")
      + "\n\n"
    )
    atomic.write_text(
      os.path.join(directory, "calibration.md"),
      "# LLC calibration\n\n" + head + self.table() + "\n",
    )


def _mean_acceptance(res: LLCResult) -> np.ndarray:
  """Mean MALA acceptance over the non-diverged chains (NaN if none), [...]."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(np.where(res.diverged, np.nan, res.mala_acceptance), axis=-1)


CHECK_NAMES = {"mala": "MALA", "leapfrog": "leapfrog"}


def _check_name(res: LLCResult) -> str:
  """'MALA' or 'leapfrog': the step check recorded with `res` (`llc.estimate`)."""
  return CHECK_NAMES[res.settings.get("step_check", "mala")]


def _check(
  res: LLCResult, band: tuple, disqualify: Sequence[str], margin_se: float = 2.0
) -> list[str]:
  """Reasons a grid point fails (empty: it passes) over all its checkpoints."""
  reasons = []
  for flag in disqualify:
    n = int(np.sum(getattr(res, flag)))
    if n:
      reasons.append(f"{n} {flag.replace('_', '-')} chain(s)")
  acc = _mean_acceptance(res)
  se = res.mala_se if res.mala_se is not None else np.full(np.shape(acc), np.nan)
  se = np.where(np.isfinite(se), se, np.inf if margin_se > 0 else 0.0)
  low = acc - margin_se * se
  high = np.where(band[1] >= 1.0, acc, acc + margin_se * se)
  if np.isnan(acc).any() or (low < band[0]).any() or (high > band[1]).any():
    reasons.append(
      f"{_check_name(res)} acceptance "
      + ", ".join(f"{a:.3f} ± {e:.3f}" for a, e in zip(np.ravel(acc), np.ravel(se)))
      + f" not inside [{band[0]}, {band[1]}] by {margin_se:g} SE"
    )
  return reasons


def _draws_needed(res: LLCResult, criteria) -> np.ndarray:
  """Kept draws per chain that reach the criteria's bulk ESS per chain at the measured
  ESS per draw, [...] (NaN without convergence statistics)."""
  conv = res.convergence
  if conv is None or "ess_bulk_per_chain" not in conv:
    return np.full(np.shape(res.llc_mean), np.nan)
  per_draw = np.asarray(conv["ess_bulk_per_chain"], np.float64) / np.maximum(
    np.asarray(conv["num_draws"], np.float64), 1
  )
  with np.errstate(divide="ignore", invalid="ignore"):
    need = np.ceil(criteria.ess_bulk_min_per_chain / per_draw)
  return np.where(np.isfinite(need), np.maximum(need, criteria.min_draws), np.nan)


def calibrate(
  loss_fn: llc_lib.LossFn,
  checkpoints: Sequence[Any] | Any,
  data: Any,
  *,
  step_sizes: Sequence[float] | np.ndarray,
  nbetas: Sequence[float] | np.ndarray,
  localizations: Sequence[float] | np.ndarray,
  num_chains: int,
  num_draws: int,
  batch_size: int,
  seed: int = 0,
  num_burnin_steps: int | str = "auto",
  mala_stride: int = 10,
  mala_target: str = "posterior",
  sampler: Any = "sgld",
  criteria: diagnostics.HealthCriteria | None = None,
  mala_band: tuple[float, float] = (0.95, 1.0),
  disqualify: Sequence[str] = ("diverged", "not_converged"),
  checkpoint_ids: Sequence[Any] | None = None,
  chain_strategy: str = "auto",
  output_dir: str | None = None,
  margin_se: float = 2.0,
  mesh: Any = "auto",
  compute_dtype: str | None = None,
  matmul_precision: str | None = None,
) -> CalibrationResult:
  """Sweeps ε × nβ × γ on `checkpoints` in one program and recommends settings.

  `checkpoints` is a list of param pytrees (e.g. the earliest and the latest
  of a run) or a stacked pytree; the other arguments are as for
  `estimate_llcs`; `mesh` may shard the grid points on a "grid" axis
  (`sampling/mesh.py`). With `output_dir`, writes calibration.json and calibration.md
  there (`CalibrationResult.save`); draw the figures with
  `devinterp_jax.viz.llc.plot_calibration(result, output_dir)`.
  """
  step_sizes = np.asarray(sorted(step_sizes), np.float64)
  nbetas = np.asarray(nbetas, np.float64)
  localizations = np.asarray(localizations, np.float64)
  if min(len(step_sizes), len(nbetas), len(localizations)) == 0:
    raise ValueError("step_sizes, nbetas and localizations must each be non-empty")
  bad = [f for f in disqualify if f not in ("diverged", "not_converged", "escaped", "negative")]
  if bad:
    raise ValueError(f"unknown health flags in disqualify: {bad}")
  criteria = criteria or diagnostics.HealthCriteria()
  if num_chains < criteria.min_chains:
    raise ValueError(
      f"calibration needs num_chains >= {criteria.min_chains} (the "
      f"convergence criteria's min_chains) to tell converged chains; got "
      f"{num_chains}"
    )
  if margin_se < 0:
    raise ValueError(f"margin_se must be >= 0, got {margin_se}")
  num_ckpts = (
    len(checkpoints)
    if isinstance(checkpoints, Sequence)
    else jax.tree.leaves(checkpoints)[0].shape[0]
  )
  ids = list(checkpoint_ids) if checkpoint_ids is not None else list(range(num_ckpts))
  settings = llc_lib.SamplerSettings(
    num_chains=num_chains,
    num_draws=num_draws,
    step_size=float(step_sizes[0]),
    localization=float(localizations[0]),
    nbeta=float(nbetas[0]),
    batch_size=batch_size,
    seed=seed,
    num_burnin_steps=num_burnin_steps,
    mala_stride=mala_stride,
    mala_target=mala_target,
    compute_dtype=compute_dtype,
    matmul_precision=matmul_precision,
  )
  grid = list(
    itertools.product(range(len(step_sizes)), range(len(nbetas)), range(len(localizations)))
  )
  points = []
  for i, j, k in grid:  # every grid point must be a valid setting (finite, nβ > 0, …)
    try:
      dataclasses.replace(
        settings,
        step_size=float(step_sizes[i]),
        nbeta=float(nbetas[j]),
        localization=float(localizations[k]),
      )
    except ValueError as e:
      raise ValueError(
        f"calibration grid point ε={step_sizes[i]}, nβ={nbetas[j]}, γ={localizations[k]}: {e}"
      ) from None
    points.append(
      {
        "step_size": float(step_sizes[i]),
        "nbeta": float(nbetas[j]),
        "localization": float(localizations[k]),
      }
    )
  # The whole grid × checkpoints in one sweep (pairs), one compiled program.
  everything = llc_lib.estimate(
    loss_fn,
    checkpoints,
    data,
    settings,
    llc_lib.SweepOptions(
      checkpoint_ids=ids, chain_strategy=chain_strategy, progress=False, mesh=mesh
    ),
    sampler=sampler,
    criteria=criteria,
    grid=points,
  )
  num_params = int(np.ravel(everything.settings["num_params"])[0])

  shape = (len(step_sizes), len(nbetas), len(localizations))
  llc_mean = np.zeros(shape + (num_ckpts,))
  llc_std, mala = np.zeros_like(llc_mean), np.zeros_like(llc_mean)
  mala_se, draws_needed = np.zeros_like(llc_mean), np.zeros_like(llc_mean)
  status = np.zeros(shape + (num_ckpts, num_chains), np.int8)
  traces = np.zeros(shape + (num_ckpts, num_draws))
  passes = np.zeros(shape, bool)
  reasons = {}
  for g, (i, j, k) in enumerate(grid):
    res = everything.select(g)
    res = dataclasses.replace(res, settings={**res.settings, **points[g]})
    llc_mean[i, j, k], llc_std[i, j, k] = res.llc_mean, res.llc_std
    mala[i, j, k] = _mean_acceptance(res)
    mala_se[i, j, k] = np.nan if res.mala_se is None else res.mala_se
    draws_needed[i, j, k] = _draws_needed(res, criteria)
    status[i, j, k], traces[i, j, k] = res.status, res.llc_trace_mean
    why = _check(res, mala_band, disqualify, margin_se)
    passes[i, j, k] = not why
    if why:
      reasons[f"{i},{j},{k}"] = "; ".join(why)

  per_setting = []
  for j, k in itertools.product(range(len(nbetas)), range(len(localizations))):
    ok = np.flatnonzero(passes[:, j, k])
    per_setting.append(
      {
        "nbeta": float(nbetas[j]),
        "localization": float(localizations[k]),
        "step_size": float(step_sizes[ok[-1]]) if ok.size else None,
      }
    )
  candidates = [r for r in per_setting if r["step_size"] is not None]
  recommended = None
  if candidates:
    best = max(candidates, key=lambda r: (r["nbeta"], -r["localization"], r["step_size"]))
    recommended = {
      "step_size": best["step_size"],
      "nbeta": best["nbeta"],
      "localization": best["localization"],
    }
  result = CalibrationResult(
    step_sizes=step_sizes,
    nbetas=nbetas,
    localizations=localizations,
    checkpoint_ids=ids,
    llc_mean=llc_mean,
    llc_std=llc_std,
    mala_acceptance=mala,
    status=status,
    llc_trace_mean=traces,
    passes=passes,
    reasons=reasons,
    per_setting=per_setting,
    recommended=recommended,
    mala_band=tuple(mala_band),
    disqualify=tuple(disqualify),
    settings={
      **dataclasses.asdict(settings),
      "num_params": num_params,
      "sampler": llc_lib.sampler_name(sampler),
      "health_criteria": dataclasses.asdict(criteria),
    },
    mala_se=mala_se,
    draws_needed=draws_needed,
    margin_se=float(margin_se),
    step_check=samplers_lib.step_check(sampler),
  )
  if output_dir:
    result.save(output_dir)
  return result


def spread_indices(num: int) -> tuple[int, ...]:
  """The earliest, a middle and the latest of `num` checkpoints (distinct)."""
  return tuple(dict.fromkeys([0, (num - 1) // 2, num - 1]))


def check_settings(
  result: LLCResult,
  indices: Sequence[int] | None = None,
  mala_band: tuple[float, float] = (0.95, 1.0),
  disqualify: Sequence[str] = ("diverged", "not_converged"),
  margin_se: float = 2.0,
) -> dict:
  """Whether the settings of a finished sweep pass the calibration criteria.

  Applies `calibrate`'s test (with its margin) to checkpoints `indices`
  (default: the earliest, a middle and the latest) of an `LLCResult` with a
  leading checkpoint axis, at no extra cost. Returns {"passes": bool,
  "reasons": [...], "mala_acceptance": [...], "mala_se": [...], ...}.
  """
  if indices is None:
    indices = spread_indices(int(np.shape(result.llc_mean)[0]))
  picked = result.select(list(indices))
  reasons = _check(picked, mala_band, disqualify, margin_se)
  acc = _mean_acceptance(picked)
  se = picked.mala_se if picked.mala_se is not None else np.full(np.shape(acc), np.nan)
  return {
    "passes": not reasons,
    "reasons": reasons,
    "mala_acceptance": acc.tolist(),
    "mala_se": np.asarray(se).tolist(),
    "indices": [int(i) for i in indices],
    "margin_se": margin_se,
    "mala_band": list(mala_band),
    "disqualify": list(disqualify),
  }
