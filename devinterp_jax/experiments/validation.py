"""Validating the estimator against exact learning coefficients.

Each `TheoryCase` is a linear model (regular, reduced-rank, deep linear) at its
most singular true parameter, with a noiseless teacher, so K(w) = L(w) − L(w0)
exactly on the data. `run_case` applies one fixed `Protocol` to every case:

  1. nβ = n / ln n for the dataset size n (`temperature.nbeta_wbic`), γ fixed;
  2. `calibrate` over a step-size grid given in units of 1/nβ (ε̃ = ε·nβ, the
     paper's A.5.3 reparametrisation), choosing the largest healthy,
     converged ε whose MALA acceptance lies in the band;
  3. a fresh estimate at that ε with another seed, with chains of a fixed
     Langevin time ε·nβ·draws (so a small calibrated step gets a longer chain);
     the final chains must pass the same health and MALA check, else the next
     smaller passing ε is tried (at most `max_attempts` runs).

Nothing is tuned per case. With multiplicity m > 1 the finite-nβ estimate sits
near λ − (m − 1)/ln nβ, reported beside λ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from devinterp_jax import theory
from devinterp_jax.models import linear
from devinterp_jax.sampling import calibration, diagnostics, temperature
from devinterp_jax.sampling import convergence
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling import samplers


@dataclasses.dataclass(frozen=True)
class TheoryCase:
  """A linear model with widths (input, hidden…, output) and true rank."""

  family: str  # "regular", "reduced_rank" or "deep_linear"
  widths: tuple
  rank: int

  @property
  def name(self) -> str:
    return f"{self.family} {'×'.join(map(str, self.widths))} r={self.rank}"

  @property
  def num_params(self) -> int:
    return linear.num_params(self.widths)

  def theory(self) -> tuple[float, int]:
    if self.family == "regular":
      lam, m = theory.regular(self.num_params)
    elif self.family == "reduced_rank":
      input_width, hidden_width, output_width = self.widths
      lam, m = theory.reduced_rank_regression(input_width, hidden_width, output_width, self.rank)
    elif self.family == "deep_linear":
      lam, m = theory.deep_linear_network(self.widths, self.rank)
    else:
      raise ValueError(f"unknown family {self.family!r}")
    return float(lam), m

  def build(self, key: jax.Array, n: int):
    k_true, k_data = jax.random.split(key)
    params = linear.most_singular_point(k_true, self.widths, self.rank)
    return params, linear.make_data(k_data, params, n)


def regular(m: int, n: int) -> TheoryCase:
  return TheoryCase("regular", (m, n), min(m, n))


def reduced_rank(m: int, h: int, n: int, r: int) -> TheoryCase:
  return TheoryCase("reduced_rank", (m, h, n), r)


def deep_linear(widths, r: int) -> TheoryCase:
  return TheoryCase("deep_linear", tuple(widths), r)


# The benchmark's table (docs/results/validation.md).
CASES = (
  regular(2, 2),
  regular(4, 4),
  regular(8, 8),
  regular(16, 16),
  reduced_rank(5, 4, 5, 0),
  reduced_rank(4, 3, 8, 0),
  reduced_rank(8, 3, 4, 0),
  reduced_rank(3, 8, 4, 0),
  reduced_rank(5, 3, 5, 0),
  reduced_rank(6, 4, 6, 2),
  reduced_rank(10, 5, 8, 3),
  reduced_rank(7, 5, 6, 1),
  deep_linear((8, 12, 6, 10), 2),
  deep_linear((10, 10, 10, 10), 3),
  deep_linear((20, 10, 15, 5), 2),
  deep_linear((8, 8, 6, 15, 8), 3),
  deep_linear((6, 5, 12, 12, 15), 0),
  deep_linear((5, 10, 5, 10, 5), 2),
  deep_linear((6, 8, 10, 8, 6, 5), 1),
  deep_linear((8, 5, 15, 6, 12, 5), 2),
)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The one calibration-and-estimation rule applied to every case."""

  dataset_size: int = 2**14
  batch_size: int = 256
  localization: float = 1.0
  scaled_step_sizes: tuple = (0.01, 0.02, 0.03, 0.045, 0.065, 0.09, 0.13)  # ε·nβ
  mala_band: tuple = (0.95, 1.0)
  calibration_chains: int = 4
  calibration_draws: int = 10_000
  num_chains: int = 8
  num_draws: int = 20_000  # at least; see `draws_for`
  max_draws: int = 90_000
  langevin_time: float = 900.0  # ε·nβ × draws of the final chains
  mala_stride: int = 20
  max_attempts: int = 3  # final runs verified, stepping down the passing ε
  # Step sizes are judged by MALA acceptance and divergence. Convergence (R̂ / ESS /
  # drift, `diagnostics.assess`) is reported for the final chains, not required: the
  # deep linear networks' flat directions mix slowly (docs/reference/estimator.md), and the row
  # says so instead of the protocol silently stepping ε down.
  disqualify: tuple = ("diverged",)
  seed: int = 0
  sampler: str = "sgld"  # any name of `samplers.SAMPLERS`
  friction: float | None = None  # sghmc / sgnht: None = 2√γ

  @classmethod
  def for_sampler(cls, name: str) -> "Protocol":
    """The protocol of a sampler. Underdamped chains relax a direction of curvature
    k ≥ γ in ≈ 1/(√γ √ε) steps instead of 2/(γ ε) (docs/reference/samplers.md), so their final
    chains have a fixed 20,000 draws: never more gradient evaluations than SGLD's."""
    if name in ("sghmc", "sgnht"):
      # Friction 20, not the default 2√γ = 2: at nβ = 1688 and batch 256 the minibatch
      # noise of nβ ∇L_B heats the stiff directions by ≈ h V / (2α) (docs/reference/samplers.md;
      # benchmarks/friction_scan.py). The grid starts lower than SGLD's: the leapfrog
      # check reads lower than SGLD's MALA on these models (docs/results/validation.md).
      return cls(
        sampler=name,
        num_draws=20_000,
        max_draws=20_000,
        langevin_time=0.0,
        scaled_step_sizes=(0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03),
        friction=20.0,
      )
    return cls(sampler=name)

  def grad_evals(self, num_chains: int, steps: int) -> int:
    """Forward + backward passes of `num_chains` chains × `steps` steps, with the
    step check's extra pass every `mala_stride` steps."""
    checks = -(-steps // self.mala_stride) if self.mala_stride else 0
    return int(num_chains * (steps + checks))

  @property
  def nbeta(self) -> float:
    return temperature.nbeta_wbic(self.dataset_size)

  def draws_for(self, scaled_step_size: float) -> int:
    """Final chain length: a fixed Langevin time ε·nβ·draws, so that a small
    calibrated step gets a proportionally longer chain (within the bounds)."""
    want = int(math.ceil(self.langevin_time / scaled_step_size)) if self.langevin_time else 0
    return int(min(max(want, self.num_draws), self.max_draws))


def run_case(
  case: TheoryCase, protocol: Protocol = Protocol(), chain_strategy: str = "vmap"
) -> dict:
  """Calibrates, estimates and compares with theory; returns one table row."""
  t0 = time.time()
  p = protocol
  nbeta = p.nbeta
  params, data = case.build(jax.random.key(p.seed), p.dataset_size)
  common: dict[str, Any] = dict(
    batch_size=p.batch_size,
    mala_stride=p.mala_stride,
    chain_strategy=chain_strategy,
    sampler=samplers.get_sampler(p.sampler, friction=p.friction),
  )
  cal = calibration.calibrate(
    linear.loss,
    [params],
    data,
    step_sizes=[s / nbeta for s in p.scaled_step_sizes],
    nbetas=[nbeta],
    localizations=[p.localization],
    num_chains=p.calibration_chains,
    num_draws=p.calibration_draws,
    num_burnin_steps=p.calibration_draws // 4,
    seed=p.seed + 1,
    mala_band=p.mala_band,
    disqualify=p.disqualify,
    **common,
  )
  cal_steps = p.calibration_draws + p.calibration_draws // 4
  evals = p.grad_evals(p.calibration_chains * len(p.scaled_step_sizes), cal_steps)
  row = {
    "case": case.name,
    "family": case.family,
    "widths": list(case.widths),
    "rank": case.rank,
    "d": case.num_params,
    "nbeta": nbeta,
    "localization": p.localization,
    "sampler": p.sampler,
    "calibration_acceptance": cal.mala_acceptance[:, 0, 0, 0].tolist(),
    "calibration_grad_evals": evals,
  }
  if cal.recommended is None:
    return with_theory(
      case,
      {
        **row,
        "step_size": None,
        "llc_mean": math.nan,
        "llc_std": math.nan,
        "grad_evals": evals,
        "seconds": round(time.time() - t0, 1),
        "note": "no step size passed calibration: " + "; ".join(cal.reasons.values()),
      },
    )
  # The final chains are longer than the calibration chains and can wander into
  # stiffer regions; verify them with the same criteria and step down the grid.
  passing = [float(e) for e in cal.step_sizes[cal.passes[:, 0, 0]]][::-1]
  attempts = []
  final = None  # (eps, draws, res) of the last attempt
  for eps in passing[: p.max_attempts]:
    draws = p.draws_for(eps * nbeta)
    res = llc_lib.estimate_llc(
      linear.loss,
      params,
      data,
      num_chains=p.num_chains,
      step_size=eps,
      localization=p.localization,
      nbeta=nbeta,
      num_draws=draws,
      num_burnin_steps=draws // 4,
      seed=p.seed + 2,
      **common,
    )
    evals += p.grad_evals(p.num_chains, draws + draws // 4)
    check = calibration.check_settings(
      dataclasses.replace(
        res,
        **{
          f.name: np.asarray(getattr(res, f.name))[None]
          for f in dataclasses.fields(res)
          if f.name not in ("settings", "convergence") and getattr(res, f.name) is not None
        },
        convergence={k: np.asarray(v)[None] for k, v in (res.convergence or {}).items()},
      ),
      indices=(0,),
      mala_band=p.mala_band,
      disqualify=p.disqualify,
    )
    attempts.append(
      {
        "scaled_step_size": eps * nbeta,
        "llc_mean": float(res.llc_mean),
        "passes": check["passes"],
        "reasons": check["reasons"],
      }
    )
    final = (eps, draws, res)
    if check["passes"]:
      break
  if final is None:
    raise ValueError(
      f"no final estimate was attempted: max_attempts = {p.max_attempts} "
      f"(must be >= 1), {len(passing)} calibrated step sizes passed"
    )
  eps, draws, res = final
  if res.convergence is None:
    raise ValueError(f"{case.name}: the final estimate has no convergence diagnostics")
  return with_theory(
    case,
    {
      **row,
      "step_size": eps,
      "scaled_step_size": eps * nbeta,
      "num_draws": draws,
      "final_check_passes": attempts[-1]["passes"],
      "attempts": attempts,
      "grad_evals": evals,
      "llc_mean": float(res.llc_mean),
      "llc_std": float(res.llc_std),
      "llc_sem": float(res.llc_sem),
      "mala_acceptance": float(np.nanmean(res.mala_acceptance)),
      "health": diagnostics.status_counts(res.status),
      "convergence": convergence.CONVERGENCE_STATUS[int(res.convergence["status"])],
      "convergence_reason": str(res.convergence["reason"]),
      "seconds": round(time.time() - t0, 1),
    },
  )


def with_theory(case: TheoryCase, row: dict, protocol: Protocol | None = None) -> dict:
  """Adds (or refreshes) λ, m, the finite-nβ target and the relative errors; with
  `protocol`, the gradient evaluations of rows written before they were counted."""
  lam, m = case.theory()
  target = theory.finite_nbeta_target(lam, m, row["nbeta"])
  row = {
    **row,
    "lambda": lam,
    "multiplicity": m,
    "finite_nbeta_target": target,
    "rel_error": (row["llc_mean"] - lam) / lam,
    "rel_error_vs_target": (row["llc_mean"] - target) / target,
  }
  if protocol is not None and "grad_evals" not in row:
    p = protocol
    cal = p.grad_evals(
      p.calibration_chains * len(p.scaled_step_sizes),
      p.calibration_draws + p.calibration_draws // 4,
    )
    final = 0
    for attempt in row.get("attempts", []):
      draws = p.draws_for(attempt["scaled_step_size"])
      final += p.grad_evals(p.num_chains, draws + draws // 4)
    row.update(calibration_grad_evals=cal, grad_evals=cal + final)
  return row


def comparison_table(tables: dict[str, tuple[Protocol, list[dict]]]) -> str:
  """One row per case, a block of columns per sampler; then the 10 % summary."""
  names = list(tables)
  cases = [
    c.name for c in CASES if any(r["case"] == c.name for _, rows in tables.values() for r in rows)
  ]
  by = {n: {r["case"]: r for r in rows} for n, (_, rows) in tables.items()}
  head = (
    "| case | d | λ | m | "
    + " | ".join(
      f"{n}: ε·nβ | {n}: estimate ± std | {n}: error vs λ | {n}: step check | "
      f"{n}: converged | {n}: grad evals"
      for n in names
    )
    + " |"
  )
  lines = [head, "|" + "---|" * (4 + 6 * len(names))]
  for case in cases:
    first = next(by[n][case] for n in names if case in by[n])
    cells = [case, str(first["d"]), f"{first['lambda']:.4g}", str(first["multiplicity"])]
    for n in names:
      r = by[n].get(case)
      if r is None:
        cells += ["not run"] + [""] * 5
        continue
      eps = f"{r['scaled_step_size']:.3g}" if r.get("step_size") else "none"
      if r.get("final_check_passes") is False:
        eps += " ✗"
      cells += [
        eps,
        f"{r['llc_mean']:.3f} ± {r['llc_std']:.3f}",
        f"{100 * r['rel_error']:+.1f} %",
        f"{r.get('mala_acceptance', math.nan):.3f}",
        r.get("convergence", "—"),
        f"{r.get('grad_evals', math.nan):.3g}",
      ]
    lines.append("| " + " | ".join(cells) + " |")
  summary = []
  for n in names:
    m1 = [r for r in by[n].values() if r["multiplicity"] == 1]
    done = [r for r in m1 if math.isfinite(r["rel_error"])]
    missing = [r["case"] for r in m1 if not math.isfinite(r["rel_error"])]
    worst = max(done, key=lambda r: abs(r["rel_error"])) if done else None
    total_m1 = sum(1 for c in CASES if c.theory()[1] == 1)
    summary.append(
      f"- **{n}**: {sum(abs(r['rel_error']) <= 0.10 for r in done)} of {len(m1)} m = 1 "
      f"cases run ({total_m1} in the table) within 10 % of λ"
      + (f"; largest error {100 * worst['rel_error']:+.1f} % ({worst['case']})" if worst else "")
      + (
        f"; no estimate (no step size passed calibration) for {len(missing)}: " + ", ".join(missing)
        if missing
        else ""
      )
      + "."
    )
  evals = []
  if len(names) > 1:
    base = names[0]
    for n in names[1:]:
      both = [c for c in cases if c in by[base] and c in by[n]]
      more = [c for c in both if by[n][c]["grad_evals"] > by[base][c]["grad_evals"]]
      evals.append(
        f"- {n} used more gradient evaluations than {base} in {len(more)} of "
        f"{len(both)} cases" + (f": {', '.join(more)}" if more else "") + "."
      )
  return "\n".join(lines) + "\n\n" + "\n".join(summary + evals) + "\n"


def markdown_table(rows: list[dict]) -> str:
  return comparison_table({rows[0].get("sampler", "sgld") if rows else "sgld": (Protocol(), rows)})
