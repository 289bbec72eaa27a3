"""Why deep-linear-network validation cases come out low: chain drift along flat directions.

Runs SGLD from the most singular true parameter of one validation case at the protocol's
nβ and the smallest calibrated step, for two localisations γ, and prints the distance
from w* and the running LLC over the chain (docs/reference/estimator.md, "Results and the
deep-linear-network limitation").

  PYTHONPATH=. python benchmarks/dln_drift.py --case="deep_linear 8×8×6×15×8 r=3"
"""

from absl import app, flags
import jax
import numpy as np

from devinterp_jax.models import linear
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.experiments import validation

_CASE = flags.DEFINE_string("case", "deep_linear 8×8×6×15×8 r=3", "validation.CASES name")
_DRAWS = flags.DEFINE_integer("num_draws", 40_000, "SGLD steps per chain (no burn-in)")
_GAMMAS = flags.DEFINE_list("localizations", ["1", "100"], "γ values")
_SCALED_STEP = flags.DEFINE_float("scaled_step_size", 0.01, "ε·nβ")


def main(argv):
  del argv
  p = validation.Protocol()
  case = {c.name: c for c in validation.CASES}[_CASE.value]
  params, data = case.build(jax.random.key(p.seed), p.dataset_size)
  nbeta = p.nbeta
  marks = [m for m in (1000, 5000, 10_000, 20_000, 40_000, 80_000) if m <= _DRAWS.value]
  print(f"{case.name}: λ = {case.theory()[0]}, nβ = {nbeta:.1f}, ε·nβ = {_SCALED_STEP.value}")
  for gamma in [float(g) for g in _GAMMAS.value]:
    res = llc_lib.estimate_llc(
      linear.loss,
      params,
      data,
      num_chains=4,
      step_size=_SCALED_STEP.value / nbeta,
      localization=gamma,
      nbeta=nbeta,
      num_draws=_DRAWS.value,
      seed=p.seed + 2,
      batch_size=p.batch_size,
      mala_stride=20,
      chain_strategy="vmap",
    )
    dist = np.asarray(res.distance).mean(0)
    trace = np.asarray(res.llc_trace_mean)
    print(
      f"γ = {gamma:g}: LLC {float(res.llc_mean):.2f}, MALA "
      f"{np.nanmean(res.mala_acceptance):.3f}, health {res.health_counts()}"
    )
    for m in marks:
      print(f"  draws {m:6d}: ‖w − w*‖ {dist[m - 1]:.2f}   online LLC {trace[m - 1]:.2f}")


if __name__ == "__main__":
  app.run(main)
