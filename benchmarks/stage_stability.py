"""Do stage boundaries survive resampling, and a different SGLD seed?

Scores the stage boundaries of a finished run with `report.stage_stability`
(docs/reference/stages.md): the run's chains bootstrapped jointly across checkpoints ×
draw windows, every resample refitted with the run's stage options, gives each
boundary its stability and the criterion's pass/fail. As the stronger test, it
re-estimates the LLC of every checkpoint with other SGLD seeds (new noise and
minibatches; same ε, nβ, γ, chains, draws), fits each curve with the same
options, and reports per boundary the fraction of seeds that have it
(`seed_stability`, outside the criterion) and how far each boundary moves, in
checkpoints. Resumable (chunks under <workdir>/llc_sgld_seed_<s>/). Writes
<workdir>/stage_stability.json.

  PYTHONPATH=. python benchmarks/stage_stability.py --workdir=workdirs/icl_runlocal --seeds=1

--seeds= (empty) scores the resampling stability alone (no SGLD runs).
"""

import json
import os

from absl import app, flags, logging
import ml_collections
import numpy as np

from devinterp_jax import atomic
from devinterp_jax.analysis import report
from devinterp_jax.analysis.run_data import load_run
from devinterp_jax.experiments import icl_regression
from devinterp_jax.storage.checkpoints import quiet_orbax_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run (main job).", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["1"], "Other SGLD seeds (config.llc.seed).")


def _max_shift(steps: np.ndarray, a: list[int], b: list[int]) -> dict:
  """Boundary-by-boundary shift in checkpoint indices (None when counts differ)."""
  ia, ib = np.searchsorted(steps, a), np.searchsorted(steps, b)
  if len(ia) != len(ib):
    return {"same_count": False, "max_shift_checkpoints": None}
  shifts = np.abs(ia - ib)
  return {
    "same_count": True,
    "shifts_checkpoints": shifts.tolist(),
    "max_shift_checkpoints": int(shifts.max()) if len(shifts) else 0,
  }


def main(argv):
  del argv
  quiet_orbax_logs()
  run = load_run(_WORKDIR.value, icl_regression.SETTING)
  run_llc = run.require_llc()
  config = ml_collections.ConfigDict(run.config.to_dict())
  options = report.default_options(
    icl_regression.SETTING
  )  # today's stage options (the run may predate them)
  base = report.stage_boundaries(run, options)
  rows = {
    "workdir": os.path.abspath(_WORKDIR.value),
    "sgld_seed": int(config.llc.seed),
    "boundary_steps": list(base.boundary_steps),
    "other_seeds": [],
  }
  model = icl_regression.make_model(config)
  seed_results = {}
  for seed in [int(s) for s in _SEEDS.value if s.strip()]:
    config.llc.seed = seed
    result = icl_regression.estimate_checkpoints(
      config,
      model,
      run.checkpoints(),
      [int(s) for s in run.steps],
      os.path.join(_WORKDIR.value, f"llc_sgld_seed_{seed}", "chunks"),
    )
    seed_results[f"sgld seed {seed}"] = (run.steps, result)
    other = report.fit_stages(
      run.steps,
      result.llc_mean,
      result.llc_std,
      result.llc_sem,
      options,
      num_valid_chains=result.num_valid_chains,
    )
    entry = {
      "sgld_seed": seed,
      "boundary_steps": list(other.boundary_steps),
      "llc_mean": result.llc_mean.tolist(),
      "max_abs_llc_difference": float(np.max(np.abs(result.llc_mean - run_llc.llc_mean))),
      **_max_shift(run.steps, list(base.boundary_steps), list(other.boundary_steps)),
    }
    rows["other_seeds"].append(entry)
    logging.info(
      "SGLD seed %d: boundaries %s vs %s (max shift %s checkpoints)",
      seed,
      entry["boundary_steps"],
      rows["boundary_steps"],
      entry["max_shift_checkpoints"],
    )
  stability = report.stage_stability(
    run.steps, run_llc, base, options, seed_results=seed_results or None
  )
  rows["stability"] = stability.to_dict()
  logging.info("Stability: %s", stability.summary())
  for b in stability.boundaries:
    logging.info(
      "boundary %d at step %d: stability %.3f%s, seed stability %s",
      b["boundary"],
      b["step"],
      b["stability"],
      "" if b["stable"] else " (UNSTABLE)",
      b["seed_stability"],
    )
  atomic.write_text(
    os.path.join(_WORKDIR.value, "stage_stability.json"), json.dumps(rows, indent=1)
  )
  print(
    json.dumps(
      {
        "boundary_steps": rows["boundary_steps"],
        "summary": stability.summary(),
        "passes": stability.passes,
        "reasons": list(stability.reasons),
        "stability": list(stability.stability),
        "seed_stability": stability.seed_stability,
        "other_seeds": [
          {k: e[k] for k in ("sgld_seed", "boundary_steps", "max_shift_checkpoints")}
          for e in rows["other_seeds"]
        ],
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
