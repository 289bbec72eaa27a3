import ml_collections
import numpy as np
import pytest

from devinterp_jax.training.schedules import checkpoint_steps, log_points, one_cycle_lr


def test_one_cycle_matches_pytorch_linear_by_hand():
  # total 100, max 1.0, div 10, final_div 100: initial 0.1, final 0.001;
  # phase 1 ends at step 49, phase 2 at step 99 (PyTorch's OneCycleLR).
  lr = one_cycle_lr(100, 1.0, pct_start=0.5, div_factor=10.0, final_div_factor=100.0)
  expected = {
    0: 0.1,
    49: 1.0,
    24: 0.1 + 0.9 * 24 / 49,
    74: 1.0 + (0.001 - 1.0) * (74 - 49) / 50,
    99: 0.001,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, err_msg=f"step {step}")


def test_paper_lr_schedule_endpoints():
  lr = one_cycle_lr(500_000, 0.003, 0.5, 249_999.0, 249_999.0)
  np.testing.assert_allclose(float(lr(0)), 0.003 / 249_999, rtol=1e-5)
  np.testing.assert_allclose(float(lr(249_999)), 0.003, rtol=1e-6)
  np.testing.assert_allclose(
    float(lr(125_000)), 0.003 / 249_999 + (0.003 - 0.003 / 249_999) * 125_000 / 249_999, rtol=1e-5
  )


def _schedule_points(total_steps, n_log, n_linear=0, linear_every=0):
  """The real-valued schedule points before rounding."""
  points = [log_points(total_steps, n_log), np.linspace(1, total_steps, n_linear)]
  if linear_every:
    points.append(np.arange(linear_every, total_steps + 1, linear_every, dtype=float))
  return np.concatenate(points)


def test_paper_checkpoint_schedule_has_189_steps():
  """Rounding: the last log-spaced point 10^log10(500k) = 499,999.99… is 500k, not a
  near-duplicate 499,999 beside it (issue 15, item 6)."""
  steps = checkpoint_steps(500_000, 100, 100)
  assert len(steps) == 189
  assert steps[0] == 1 and steps[-1] == 500_000
  assert np.all(np.diff(steps) > 0)
  assert 499_999 not in steps


def test_paper_parity_reproduces_the_authors_190_truncated_steps():
  steps = checkpoint_steps(500_000, 100, 100, paper_parity=True)
  assert len(steps) == 190 and steps[0] == 1 and steps[-1] == 500_000
  assert steps[-2] == 499_999
  authors = np.union1d(
    np.logspace(0, np.log10(500_000), 100).astype(int), np.linspace(1, 500_000, 100).astype(int)
  )
  np.testing.assert_array_equal(steps, authors)


@pytest.mark.parametrize(
  "total_steps,n_log,n_linear,linear_every",
  [
    (500_000, 100, 100, 0),
    (6000, 16, 8, 0),
    (4000, 14, 6, 0),
    (60, 5, 3, 0),
    (1500, 6, 4, 0),
    (50_000, 100, 0, 100),
    (6000, 12, 0, 750),
    (30, 4, 0, 10),
  ],
)
def test_steps_are_the_rounded_schedule_points_and_end_at_T_once(
  total_steps, n_log, n_linear, linear_every
):
  """Every step is the nearest integer of a schedule point (small steps 1, 2, 3 may be
  adjacent); T appears once, and T - 1 only where a point rounds to it."""
  steps = checkpoint_steps(total_steps, n_log, n_linear, linear_every)
  rounded = np.rint(_schedule_points(total_steps, n_log, n_linear, linear_every)).astype(int)
  np.testing.assert_array_equal(steps, np.unique(rounded))
  assert np.all(np.diff(steps) > 0) and steps[-1] == total_steps
  assert (total_steps - 1 in steps) == (total_steps - 1 in rounded)
  assert total_steps - 1 not in steps  # no schedule here has a point near T − 1


def test_lr_runlocal_schedules():
  from configs import icl_regression as icl_config
  from devinterp_jax.experiments import icl_regression

  config = icl_config.get_config("runlocal")
  assert config.train.paper_parity is False
  steps = icl_regression.schedule_steps(config).tolist()
  assert steps == [
    1,
    2,
    3,
    6,
    10,
    18,
    32,
    58,
    104,
    185,
    330,
    590,
    858,
    1053,
    1715,
    1881,
    2572,
    3359,
    3429,
    4286,
    5143,
    6000,
  ]
  config.train.paper_parity = True
  assert icl_regression.schedule_steps(config).tolist() == [
    1,
    3,
    5,
    10,
    18,
    32,
    57,
    103,
    184,
    330,
    589,
    858,
    1053,
    1715,
    1881,
    2572,
    3359,
    3429,
    4286,
    5143,
    6000,
  ]  # 10^log10(6000) is 6000.000000000003: no 5999 (test_log_points…)
  seeds = icl_config.get_config("runlocal_seeds")
  assert len(icl_regression.schedule_steps(seeds)) == 18
  seeds.train.paper_parity = True
  assert len(icl_regression.schedule_steps(seeds)) == 17
  full = icl_config.get_config()
  assert len(icl_regression.schedule_steps(full)) == 189


def test_lm_runlocal_schedule():
  from configs import lm as lm_config
  from devinterp_jax.experiments import lm

  config = lm_config.get_config("runlocal")
  assert lm.schedule_steps(config).tolist() == [
    1,
    2,
    5,
    11,
    24,
    52,
    115,
    254,
    559,
    750,
    1234,
    1500,
    2250,
    2721,
    3000,
    3750,
    4500,
    5250,
    6000,
  ]
  config.train.paper_parity = True
  parity = lm.schedule_steps(config)
  points = np.concatenate([log_points(6000, config.train.n_log), np.arange(750, 6001, 750)])
  np.testing.assert_array_equal(parity, np.unique(points.astype(int)))
  assert len(parity) == 19 and 5999 not in parity


def test_paper_parity_is_validated_and_locks_the_run():
  """The flag is a training field: validated, and a run recorded before it existed
  (truncated steps) counts as paper_parity=True."""
  from configs import icl_regression as icl_config
  from devinterp_jax import config_checks
  from devinterp_jax.experiments import icl_regression
  from devinterp_jax.storage import run_log

  icl_regression.validate_config(icl_config.get_config("runlocal"))
  new = icl_config.get_config("runlocal").to_dict()
  bad = ml_collections.ConfigDict({**new, "train": {**new["train"], "paper_parity": "yes"}})
  with pytest.raises(config_checks.ConfigError, match=r"config.train.paper_parity = 'yes'"):
    icl_regression.validate_config(bad)
  old = {**new, "train": {k: v for k, v in new["train"].items() if k != "paper_parity"}}
  assert run_log.config_differences(old, new) == ["train.paper_parity (run: true, given: false)"]
  parity = {**new, "train": {**new["train"], "paper_parity": True}}
  assert run_log.config_differences(old, parity) == []
  assert run_log.config_differences(new, parity) == ["train.paper_parity (run: false, given: true)"]


def test_schedule_validation():
  with pytest.raises(ValueError):
    one_cycle_lr(1, 0.1)
  with pytest.raises(ValueError):
    checkpoint_steps(0, 10, 10)


def test_log_points_are_exact_powers_whatever_the_platforms_pow():
  """Each point is 10^y for the float64 y, computed exactly and rounded once, so a
  truncated schedule does not depend on the NumPy build's `pow` (which gave 5999.999…
  for 10^log10(6000) on one build and 6000.000000000003, the exact value, on another)."""
  import decimal
  import math

  decimal.getcontext().prec = 60
  for total_steps, n in ((6000, 12), (6000, 21), (500_000, 100), (30, 4)):
    ys = np.linspace(0.0, math.log10(total_steps), n)
    exact = [float(decimal.Decimal(10) ** decimal.Decimal(float(y))) for y in ys]
    np.testing.assert_array_equal(log_points(total_steps, n), exact)
  assert log_points(6000, 21)[-1] > 6000 and log_points(500_000, 100)[-1] < 500_000
  assert log_points(6000, 21)[0] == 1.0
