"""Measures how often `convergence.assess` calls stationary traces not converged, and how
well the MSER-5 auto burn-in removes a planted transient.

  (a) stationary AR(1), integrated autocorrelation time τ = 1.2, 4 chains × 400 draws;
  (b) stationary AR(1), τ = 50, 4 chains × 20,000 draws (ESS ≈ 400 per chain);
  (c) planted transients like the runlocal LLC sweep's (tests/data/runlocal_lr_traces.npz),
      in per-draw LLC units: y_t = λ − A·exp(−t/τ) + N(0, 10²), A ~ U[26, 41],
      τ ~ U[46, 80] draws, 4 chains × 800 draws; the estimate is the mean of the draws
      kept after `auto_burnin`, its error is measured in units of its MCSE.

AR(1) chains start in the stationary distribution, φ = (τ − 1)/(τ + 1). Every seed is one
independent look with the default `ConvergenceCriteria`. Writes --json and --md
(default docs/results/convergence_false_alarms.{json,md}).

  PYTHONPATH=. python benchmarks/convergence_false_alarms.py     # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import time

import numpy as np

from devinterp_jax import atomic
from devinterp_jax.sampling import convergence as cv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRITERIA = ("rhat", "ess_bulk", "ess_tail", "drift")


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """Wilson score 95 % interval of a binomial rate k/n."""
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def ar1(rng: np.random.Generator, shape: tuple[int, ...], tau: float) -> np.ndarray:
  """Stationary unit-variance AR(1) draws [..., T] with integrated autocorrelation time τ."""
  phi = (tau - 1.0) / (tau + 1.0)
  e = rng.standard_normal(shape)
  e[..., 1:] *= math.sqrt(1.0 - phi * phi)
  x = np.empty(shape)
  x[..., 0] = e[..., 0]
  for t in range(1, shape[-1]):
    np.multiply(x[..., t - 1], phi, out=x[..., t])
    x[..., t] += e[..., t]
  return x


def fails(r: dict, c: cv.ConvergenceCriteria) -> dict[str, np.ndarray]:
  """Which criterion fails, each alone, [seeds] bool (keys `fail_<criterion>`)."""
  return {
    "fail_rhat": ~(r["rhat"] < c.rhat_max),
    "fail_ess_bulk": ~(r["ess_bulk_per_chain"] >= c.ess_bulk_min_per_chain),
    "fail_ess_tail": ~(r["ess_tail_per_chain"] >= c.ess_tail_min_per_chain),
    "fail_drift": ~(np.abs(r["drift_z"]) <= c.drift_z_max),
  }


def false_alarms(
  name: str, tau: float, chains: int, draws: int, seeds: int, batch: int, seed: int
) -> dict:
  c = cv.ConvergenceCriteria()
  rng = np.random.default_rng(seed)
  t0 = time.time()
  parts = []
  for start in range(0, seeds, batch):
    x = ar1(rng, (min(batch, seeds - start), chains, draws), tau)
    r = cv.assess(x, c)
    parts.append(
      {
        "status": r["status"],
        **fails(r, c),
        **{k: r[k] for k in ("rhat", "ess_bulk_per_chain", "ess_tail_per_chain", "drift_z")},
      }
    )
  cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  n = len(cat["status"])

  def rate(mask: np.ndarray) -> dict:
    k = int(mask.sum())
    lo, hi = wilson(k, n)
    return {"count": k, "rate": k / n, "ci95": [lo, hi]}

  return {
    "case": name,
    "tau": tau,
    "chains": chains,
    "draws": draws,
    "seeds": n,
    "seconds": round(time.time() - t0, 1),
    "not_converged": rate(cat["status"] == cv.NOT_CONVERGED),
    "unchecked": int(np.sum(cat["status"] == cv.UNCHECKED)),
    "per_criterion": {k: rate(cat[f"fail_{k}"]) for k in CRITERIA},
    "summary": {
      "ess_bulk_per_chain_median": float(np.median(cat["ess_bulk_per_chain"])),
      "ess_tail_per_chain_median": float(np.median(cat["ess_tail_per_chain"])),
      "rhat_p99": float(np.quantile(cat["rhat"], 0.99)),
      "drift_z_sd": float(np.std(cat["drift_z"])),
    },
  }


def planted(seeds: int, draws: int, seed: int, lam: float = 40.0) -> dict:
  rng = np.random.default_rng(seed)
  t0 = time.time()
  amp = rng.uniform(26.0, 41.0, (seeds, 1, 1))
  tc = rng.uniform(46.0, 80.0, (seeds, 1, 1))
  y = lam - amp * np.exp(-np.arange(draws) / tc) + 10.0 * rng.standard_normal((seeds, 4, draws))
  b = cv.auto_burnin(y)
  z, err, mcse, status = (np.empty(seeds) for _ in range(4))
  for i in range(seeds):
    kept = y[i, :, b["burnin"][i] :]
    mcse[i] = cv.mcse_mean(kept)
    err[i] = kept.mean() - lam
    z[i] = err[i] / mcse[i]
    status[i] = cv.assess(kept)["status"]
  z0 = (y.mean((-2, -1)) - lam) / cv.mcse_mean(y)  # no burn-in, for contrast
  return {
    "case": "planted transients",
    "chains": 4,
    "draws": draws,
    "seeds": seeds,
    "lambda": lam,
    "amplitude": [26.0, 41.0],
    "tau": [46.0, 80.0],
    "noise_sd": 10.0,
    "seconds": round(time.time() - t0, 1),
    "bias_mcse": float(z.mean()),
    "bias_mcse_se": float(z.std(ddof=1) / math.sqrt(seeds)),
    "bias_llc": float(err.mean()),
    "rmse_llc": float(np.sqrt(np.mean(err**2))),
    "mcse_llc_mean": float(mcse.mean()),
    "z_sd": float(z.std(ddof=1)),
    "coverage_3mcse": float(np.mean(np.abs(z) <= 3)),
    "coverage_3mcse_ci95": list(wilson(int(np.sum(np.abs(z) <= 3)), seeds)),
    "coverage_2mcse": float(np.mean(np.abs(z) <= 2)),
    "relaxing": float(b["relaxing"].mean()),
    "burnin_quantiles": {
      str(q): float(np.quantile(b["burnin"], q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)
    },
    "kept_status": {
      name: int(np.sum(status == code)) for code, name in enumerate(cv.CONVERGENCE_STATUS)
    },
    "no_burnin_bias_mcse": float(z0.mean()),
    "no_burnin_bias_llc": float(np.mean(y.mean((-2, -1)) - lam)),
    "no_burnin_coverage_3mcse": float(np.mean(np.abs(z0) <= 3)),
  }


def _pct(r: dict) -> str:
  lo, hi = r["ci95"]
  return f"{100 * r['rate']:.2f} % [{100 * lo:.2f}, {100 * hi:.2f}]"


def markdown(header: str, cases: list[dict], pl: dict, argv: str) -> str:
  c = cv.ConvergenceCriteria()
  md = [
    "# False alarms and burn-in bias of `convergence.assess`",
    "",
    f"Generated by `PYTHONPATH=. python benchmarks/convergence_false_alarms.py{argv}` ({header}).",
    "",
    f"Criteria (defaults of `ConvergenceCriteria`): R̂ < {c.rhat_max}, bulk and tail ESS "
    f"per chain ≥ {c.ess_bulk_min_per_chain:g} / {c.ess_tail_min_per_chain:g}, "
    f"|drift z| ≤ {c.drift_z_max:g}, ≥ {c.min_draws} draws and ≥ {c.min_chains} chains. "
    "R̂ is the rank-normalised split-R̂ (max of bulk and folded), ESS the Stan/ArviZ "
    "multi-chain Geyer estimate, drift z the Geweke test of first vs last half (SE from "
    "`ess_mean` of each half). Each seed is one look at independent stationary AR(1) "
    "chains (φ = (τ−1)/(τ+1), started in the stationary law); a false alarm is status "
    "`not_converged`. Rates with Wilson 95 % intervals; per-criterion columns count each "
    "criterion alone (a seed can fail several).",
    "",
    "| case | seeds | not_converged | R̂ | bulk ESS | tail ESS | drift | median bulk ESS/chain "
    "| median tail ESS/chain | R̂ p99 | sd(drift z) | seconds |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in cases:
    pc, s = r["per_criterion"], r["summary"]
    md.append(
      f"| τ = {r['tau']:g}, {r['chains']} × {r['draws']:,} | {r['seeds']:,} | "
      f"{_pct(r['not_converged'])} | {_pct(pc['rhat'])} | {_pct(pc['ess_bulk'])} | "
      f"{_pct(pc['ess_tail'])} | {_pct(pc['drift'])} | "
      f"{s['ess_bulk_per_chain_median']:.0f} | {s['ess_tail_per_chain_median']:.0f} | "
      f"{s['rhat_p99']:.4f} | {s['drift_z_sd']:.3f} | {r['seconds']} |"
    )
  target = all(r["not_converged"]["rate"] <= 0.01 for r in cases)
  md += [
    "",
    f"Target ≤ 1 % per look: {'met' if target else 'NOT met'} in every case (point estimates).",
    "",
    "## Auto burn-in on planted transients",
    "",
    f"{pl['seeds']:,} seeds of 4 chains × {pl['draws']} draws in per-draw LLC units, "
    f"y_t = λ − A·exp(−t/τ) + N(0, {pl['noise_sd']:g}²), A ~ U[{pl['amplitude'][0]:g}, "
    f"{pl['amplitude'][1]:g}], τ ~ U[{pl['tau'][0]:g}, {pl['tau'][1]:g}] draws (matched "
    "to the real runlocal traces in `tests/data/runlocal_lr_traces.npz`). Burn-in from "
    "`auto_burnin` (b = MSER-5 truncation of the chain-mean trace over the first half; "
    "burn-in = min(2b, T/2); `relaxing` if b > T/4, then burn-in T/2). The estimate is "
    "the mean of the kept draws; z = (estimate − λ)/MCSE with MCSE = `mcse_mean` of the "
    "kept draws.",
    "",
    "| quantity | value |",
    "|---|---|",
    f"| mean z (bias in MCSE units) | {pl['bias_mcse']:+.3f} ± {pl['bias_mcse_se']:.3f} |",
    f"| mean bias (LLC units) | {pl['bias_llc']:+.4f} |",
    f"| mean MCSE (LLC units) | {pl['mcse_llc_mean']:.4f} |",
    f"| sd of z | {pl['z_sd']:.3f} |",
    f"| coverage of ±3 MCSE | {100 * pl['coverage_3mcse']:.2f} % "
    f"[{100 * pl['coverage_3mcse_ci95'][0]:.2f}, {100 * pl['coverage_3mcse_ci95'][1]:.2f}] |",
    f"| coverage of ±2 MCSE | {100 * pl['coverage_2mcse']:.2f} % |",
    f"| flagged `relaxing` | {100 * pl['relaxing']:.1f} % |",
    "| burn-in quantiles 0/10/50/90/100 % (draws) | "
    + " / ".join(f"{v:.0f}" for v in pl["burnin_quantiles"].values())
    + " |",
    "| `assess` of the kept draws | "
    + ", ".join(f"{k} {v}" for k, v in pl["kept_status"].items())
    + " |",
    "| without burn-in: mean bias (LLC units), mean z, coverage of ±3 MCSE | "
    f"{pl['no_burnin_bias_llc']:+.2f}, {pl['no_burnin_bias_mcse']:+.2f}, "
    f"{100 * pl['no_burnin_coverage_3mcse']:.1f} % (the transient also inflates the "
    "MCSE) |",
    f"| seconds | {pl['seconds']} |",
    "",
  ]
  return "\n".join(md)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds_a", type=int, default=10000, help="seeds of case (a), τ = 1.2")
  p.add_argument("--seeds_b", type=int, default=2000, help="seeds of case (b), τ = 50")
  p.add_argument("--seeds_planted", type=int, default=2000, help="seeds of case (c)")
  p.add_argument("--batch", type=int, default=100, help="seeds per vectorised batch of (b)")
  out = os.path.join(ROOT, "docs", "results", "convergence_false_alarms")
  p.add_argument("--json", default=out + ".json")
  p.add_argument("--md", default=out + ".md")
  args = p.parse_args()
  t0 = time.time()
  cases = [
    false_alarms("a", 1.2, 4, 400, args.seeds_a, 1000, seed=1),
    false_alarms("b", 50.0, 4, 20000, args.seeds_b, args.batch, seed=2),
  ]
  for r in cases:
    print(r["case"], json.dumps(r["not_converged"]), r["seconds"], "s", flush=True)
  pl = planted(args.seeds_planted, 800, seed=3)
  print("planted", pl["bias_mcse"], pl["coverage_3mcse"], flush=True)
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  dirty = subprocess.run(
    ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  header = (
    f"{datetime.date.today()}, commit {commit}"
    f"{' (with uncommitted changes)' if dirty else ''}, {platform.machine()} with "
    f"{os.cpu_count()} CPU cores, numpy {np.__version__}, "
    f"{time.time() - t0:.0f} s in all"
  )
  defaults = {"seeds_a": 10000, "seeds_b": 2000, "seeds_planted": 2000}
  argv = "".join(f" --{k}={getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
  atomic.write_text(
    args.json,
    json.dumps(
      {
        "measured": header,
        "criteria": dataclasses.asdict(cv.ConvergenceCriteria()),
        "false_alarms": cases,
        "planted": pl,
      },
      indent=1,
    ),
  )
  md = markdown(header, cases, pl, argv)
  atomic.write_text(args.md, md)
  print(md)


if __name__ == "__main__":
  main()
