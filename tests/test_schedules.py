import numpy as np
import pytest

from devinterp_jax.training.schedules import checkpoint_steps, one_cycle_lr


def test_one_cycle_matches_pytorch_linear_by_hand():
  # total 100, max 1.0, div 10, final_div 100: initial 0.1, final 0.001;
  # phase 1 ends at step 49, phase 2 at step 99 (PyTorch's OneCycleLR).
  lr = one_cycle_lr(100, 1.0, pct_start=0.5, div_factor=10.0, final_div_factor=100.0)
  expected = {0: 0.1, 49: 1.0, 24: 0.1 + 0.9 * 24 / 49,
              74: 1.0 + (0.001 - 1.0) * (74 - 49) / 50, 99: 0.001}
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, err_msg=f"step {step}")


def test_paper_lr_schedule_endpoints():
  lr = one_cycle_lr(500_000, 0.003, 0.5, 249_999.0, 249_999.0)
  np.testing.assert_allclose(float(lr(0)), 0.003 / 249_999, rtol=1e-5)
  np.testing.assert_allclose(float(lr(249_999)), 0.003, rtol=1e-6)
  np.testing.assert_allclose(float(lr(125_000)), 0.003 / 249_999 + (0.003 - 0.003 / 249_999)
                             * 125_000 / 249_999, rtol=1e-5)


def test_paper_checkpoint_schedule_has_190_steps():
  steps = checkpoint_steps(500_000, 100, 100)
  assert len(steps) == 190
  assert steps[0] == 1 and steps[-1] == 500_000
  assert np.all(np.diff(steps) > 0)


def test_schedule_validation():
  with pytest.raises(ValueError):
    one_cycle_lr(1, 0.1)
  with pytest.raises(ValueError):
    checkpoint_steps(0, 10, 10)
