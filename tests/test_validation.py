"""Fast subset of benchmarks/validate_estimator.py: calibrated estimates vs exact λ."""

import dataclasses

import pytest

from devinterp_jax.experiments import validation

# The benchmark's protocols with shorter chains and a coarser grid (CI budget).
FAST = {
  "sgld": dataclasses.replace(
    validation.Protocol(),
    calibration_draws=4_000,
    num_draws=6_000,
    max_draws=12_000,
    langevin_time=300.0,
    scaled_step_sizes=(0.02, 0.045, 0.09),
    num_chains=6,
  ),
  "sgnht": dataclasses.replace(
    validation.Protocol.for_sampler("sgnht"),
    calibration_draws=4_000,
    num_draws=6_000,
    max_draws=6_000,
    scaled_step_sizes=(0.005, 0.01, 0.02),
    num_chains=6,
  ),
}


# SGLD with the 2-SE calibration margin reads the 4×4×4×4 network 12 % low (the margin
# moves it to ε·nβ = 0.045, where its flat directions do not relax in 6,000 draws);
# the underdamped sampler reaches it in fewer gradient evaluations.
@pytest.mark.parametrize(
  "sampler,case",
  [
    ("sgld", validation.regular(4, 4)),
    ("sgld", validation.reduced_rank(5, 4, 5, 0)),
    ("sgnht", validation.regular(4, 4)),
    ("sgnht", validation.deep_linear((4, 4, 4, 4), 1)),
  ],
  ids=lambda c: getattr(c, "name", c),
)
def test_calibrated_estimate_is_within_ten_percent_of_lambda(sampler, case):
  lam, m = case.theory()
  assert m == 1
  row = validation.run_case(case, FAST[sampler])
  assert row["step_size"] is not None, row.get("note")
  assert abs(row["rel_error"]) < 0.10, row
  assert row["health"]["diverged"] == 0


def test_theory_columns_and_table():
  case = validation.reduced_rank(5, 3, 5, 0)  # λ = 6.5 with multiplicity 2
  row = validation.with_theory(
    case,
    {
      "case": case.name,
      "d": case.num_params,
      "nbeta": 1000.0,
      "llc_mean": 6.0,
      "llc_std": 0.1,
      "seconds": 1.0,
      "step_size": None,
    },
  )
  assert row["multiplicity"] == 2 and row["finite_nbeta_target"] < 6.5
  assert abs(row["rel_error"] + 0.5 / 6.5) < 1e-12
  assert "reduced_rank 5×3×5 r=0" in validation.markdown_table([row])


def test_chain_length_rule():
  p = validation.Protocol()
  assert p.draws_for(0.09) == p.num_draws and p.draws_for(0.02) == 45_000
  assert p.draws_for(0.001) == p.max_draws
