"""The estimator engine: compilation reuse, and the adaptive stopping rule's bias.

(1) Recompilation. The LR runlocal transformer at 2 checkpoints × 4 chains × 200 draws:
    wall time of a first `estimate` call (compiles), an identical repeat, a new seed and
    new data of the same shape, as fractions of the first; traces counted by the cache.
(2) Adaptive stopping on planted transients matched to the real runlocal traces
    (tests/data/runlocal_lr_traces.npz): per-draw LLC y_t = λ − A·exp(−t/τ) + N(0, 10²),
    A ~ U[26, 41], τ ~ U[46, 80] draws, 4 chains. The rule of `sweep.keeps_running` with
    `diagnostics.assess` (auto burn-in, R̂ / ESS / drift on the kept draws): 400 draws,
    then blocks of 100 until converged or 2000. Reports the draws used, the error of the
    final λ̂ in units of its MCSE (mean = bias, fraction within 3 MCSE), and the same for
    a fixed 800 draws; with burn-in 0 the fraction of 400-draw traces flagged.

  PYTHONPATH=. python benchmarks/engine.py      # writes docs/results/engine.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from devinterp_jax import atomic  # noqa: E402
from devinterp_jax.sampling import convergence, diagnostics, sweep  # noqa: E402


def linear_loss(params, batch):
  import jax.numpy as jnp

  return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))


def recompile(model_name: str) -> dict:
  import jax
  from devinterp_jax.sampling import llc, program

  if model_name == "linear":  # 3 parameters

    def make(seed):
      kx, ke = jax.random.split(jax.random.key(seed))
      x = jax.random.normal(kx, (1024, 3))
      return {"x": x, "y": x @ jax.numpy.ones(3) + 0.5 * jax.random.normal(ke, (1024,))}

    loss, data, data2 = linear_loss, make(1), make(2)
    ckpts = [{"w": jax.numpy.ones(3)}, {"w": jax.numpy.ones(3) * 1.01}]
    label = "3-parameter linear regression"
  else:
    from configs import icl_regression as cfg_lib
    from devinterp_jax.data.regression import make_dataset
    from devinterp_jax.experiments import icl_regression

    config = cfg_lib.get_config("runlocal")
    model = icl_regression.make_model(config)
    params = model.init_params(jax.random.key(0))
    loss, label = model.loss, "LR runlocal transformer"
    ckpts = [params, jax.tree.map(lambda x: x * 1.01, params)]
    data = make_dataset(jax.random.key(1), icl_regression.make_task(config), 4096)
    data2 = make_dataset(jax.random.key(2), icl_regression.make_task(config), 4096)
  base = llc.SamplerSettings(
    num_chains=4,
    num_draws=200,
    step_size=2e-4,
    localization=1.0,
    nbeta=15.4,
    batch_size=32,
    num_burnin_steps=0,
  )
  opts = llc.SweepOptions(progress=False)
  program.clear_cache()
  rows = {}
  for name, settings, d in (
    ("first", base, data),
    ("repeat", base, data),
    ("new_seed", llc.SamplerSettings(**{**base.__dict__, "seed": 1}), data),
    ("new_data", base, data2),
  ):
    traces = program.cache_stats().traces
    t0 = time.perf_counter()
    llc.estimate(loss, ckpts, d, settings, opts)
    rows[name] = {
      "seconds": time.perf_counter() - t0,
      "traced": program.cache_stats().traces - traces,
    }
  first = rows["first"]["seconds"]
  for r in rows.values():
    r["fraction_of_first"] = r["seconds"] / first
  return {"model": label, "checkpoints": 2, "chains": 4, "draws": 200, "calls": rows}


def planted(rng, n_seeds: int, length: int, chains: int = 4, nbeta: float = 15.4):
  """Loss traces [S, C, T] of planted transients and their exact λ, in loss units."""
  lam = rng.uniform(20, 45, n_seeds)
  amp = rng.uniform(26, 41, n_seeds)
  tau = rng.uniform(46, 80, n_seeds)
  t = np.arange(length)
  y = (
    lam[:, None, None]
    - amp[:, None, None] * np.exp(-t / tau[:, None, None])
    + 10.0 * rng.standard_normal((n_seeds, chains, length))
  )
  return 1.0 + y / nbeta, lam


def adaptive(n_seeds: int, seed: int = 0) -> dict:
  nbeta, crit = 15.4, diagnostics.HealthCriteria()
  rng = np.random.default_rng(seed)
  loss, lam = planted(rng, n_seeds, 2000)
  init = np.ones((4, 200))
  used, z_adaptive, z_fixed, flagged_zero, converged = [], [], [], 0, 0
  for s in range(n_seeds):
    n = 400
    while True:
      a = diagnostics.assess(loss[s, :, :n], init, nbeta, 100, burnin="auto", criteria=crit)
      if n >= 2000 or not sweep.keeps_running(a, crit):
        break
      n += 100
    used.append(n)
    converged += a["status"] == convergence.CONVERGED
    z_adaptive.append((a["llc"] - lam[s]) / a["mcse"])
    f = diagnostics.assess(loss[s, :, :800], init, nbeta, 100, burnin="auto", criteria=crit)
    z_fixed.append((f["llc"] - lam[s]) / f["mcse"])
    zero = diagnostics.assess(loss[s, :, :400], init, nbeta, 100, burnin=0, criteria=crit)
    flagged_zero += zero["status"] == convergence.NOT_CONVERGED
  za, zf = np.array(z_adaptive), np.array(z_fixed)
  return {
    "seeds": n_seeds,
    "draws_used": {
      "mean": float(np.mean(used)),
      "median": float(np.median(used)),
      "p90": float(np.percentile(used, 90)),
      "max": int(np.max(used)),
    },
    "converged_fraction": converged / n_seeds,
    "adaptive_bias_mcse": float(za.mean()),
    "adaptive_bias_se": float(za.std() / np.sqrt(len(za))),
    "adaptive_within_3_mcse": float(np.mean(np.abs(za) <= 3)),
    "fixed800_bias_mcse": float(zf.mean()),
    "fixed800_within_3_mcse": float(np.mean(np.abs(zf) <= 3)),
    "burnin0_400_flagged_fraction": flagged_zero / n_seeds,
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, default=500)
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "engine"))
  args = ap.parse_args()
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  ).stdout.strip()
  t0 = time.time()
  out = {
    "date": datetime.date.today().isoformat(),
    "commit": commit + ("+changes" if dirty else ""),
    "machine": f"{platform.machine()} with {os.cpu_count()} CPU cores",
    "recompile": [recompile("linear"), recompile("transformer")],
    "adaptive": adaptive(args.seeds),
  }
  out["seconds"] = round(time.time() - t0, 1)
  atomic.write_text(args.out + ".json", json.dumps(out, indent=1))
  a = out["adaptive"]
  md = [
    "# Estimator engine: compilation reuse and adaptive stopping",
    "",
    f"Generated by `PYTHONPATH=. python benchmarks/engine.py` ({out['date']}, commit "
    f"{out['commit']}, {out['machine']}, JAX_PLATFORMS=cpu).",
    "",
    "## Compilation reuse (2 checkpoints × 4 chains × 200 draws)",
    "",
    "A repeat, a new seed and new data of the same shapes reuse the compiled program: "
    "their time is the sampling itself. The first call also traces and compiles the "
    "init and block programs.",
    "",
    "| model | call | seconds | fraction of the first | programs traced |",
    "|---|---|---|---|---|",
  ]
  for rec in out["recompile"]:
    md += [
      f"| {rec['model']} | {k} | {v['seconds']:.3f} | {v['fraction_of_first']:.3f} | "
      f"{v['traced']} |"
      for k, v in rec["calls"].items()
    ]
  md += [
    "",
    "## Adaptive stopping on planted transients",
    "",
    f"{a['seeds']} seeds of 4 chains, y_t = λ − A·exp(−t/τ) + N(0, 10²), A ~ U[26, 41], "
    "τ ~ U[46, 80] draws; 400 draws then blocks of 100 up to 2000 "
    "(`sweep.keeps_running`, `diagnostics.assess` with the default `HealthCriteria`).",
    "",
    "| quantity | value |",
    "|---|---|",
    f"| draws used: mean / median / p90 / max | {a['draws_used']['mean']:.0f} / "
    f"{a['draws_used']['median']:.0f} / {a['draws_used']['p90']:.0f} / {a['draws_used']['max']} |",
    f"| converged when stopped | {a['converged_fraction']:.3f} |",
    f"| bias of the adaptive λ̂ (MCSE units) | {a['adaptive_bias_mcse']:+.3f} ± {a['adaptive_bias_se']:.3f} |",
    f"| adaptive λ̂ within 3 MCSE | {a['adaptive_within_3_mcse']:.3f} |",
    f"| fixed 800 draws, auto burn-in: bias (MCSE) / within 3 MCSE | "
    f"{a['fixed800_bias_mcse']:+.3f} / {a['fixed800_within_3_mcse']:.3f} |",
    f"| 400 draws with burn-in 0 flagged not converged | {a['burnin0_400_flagged_fraction']:.3f} |",
    "",
    f"Total {out['seconds']} s.",
  ]
  atomic.write_text(args.out + ".md", "\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
