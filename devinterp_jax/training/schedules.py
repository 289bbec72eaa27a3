"""Learning-rate and checkpoint schedules of the paper."""

from __future__ import annotations

import decimal
import math

import jax.numpy as jnp
import numpy as np


def one_cycle_lr(
  total_steps: int,
  max_lr: float,
  pct_start: float = 0.5,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
):
  """PyTorch's OneCycleLR with `anneal_strategy='linear'`, as an optax schedule.

  Phase 1 rises linearly from max_lr / div_factor to max_lr over steps
  [0, pct_start·total_steps − 1]; phase 2 falls linearly to
  max_lr / (div_factor · final_div_factor) at step total_steps − 1, starting
  from the end step of phase 1 exactly as PyTorch computes it. Momentum is not
  cycled (the paper's Adam uses fixed betas).
  """
  if total_steps < 2:
    raise ValueError(f"one_cycle_lr needs total_steps >= 2, got {total_steps}")
  initial = max_lr / div_factor
  final = initial / final_div_factor
  end_1 = float(pct_start * total_steps) - 1.0
  end_2 = float(total_steps - 1)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    pct_1 = step / end_1 if end_1 > 0 else jnp.ones_like(step)
    lr_1 = (1.0 - pct_1) * initial + pct_1 * max_lr
    pct_2 = (step - end_1) / (end_2 - end_1)
    lr_2 = (1.0 - pct_2) * max_lr + pct_2 * final
    return jnp.where(step <= end_1, lr_1, lr_2)

  return schedule


def log_points(total_steps: int, n: int) -> np.ndarray:
  """`n` log-spaced points 10^y, y = linspace(0, log10 T, n), each power computed
  exactly (decimal) and rounded once to float64.

  `np.logspace` takes the power from the platform's `pow`, whose last bit differs
  between NumPy builds: 10^log10(6000) came out as 5999.999… on one and
  6000.000000000003 (the exact value) on another, which moves a truncated step.
  """
  ys = np.linspace(0.0, math.log10(total_steps), n)
  with decimal.localcontext() as ctx:
    ctx.prec = 40
    return np.array([float(decimal.Decimal(10) ** decimal.Decimal(float(y))) for y in ys])


def checkpoint_steps(
  total_steps: int,
  n_log: int,
  n_linear: int = 0,
  linear_every: int = 0,
  *,
  paper_parity: bool = False,
) -> np.ndarray:
  """The union of `n_log` log-spaced and `n_linear` linearly spaced steps in [1, T]
  (or, with `linear_every`, every multiple of it up to T, as in the LM setting).

  Each schedule point (`log_points`, exact powers) is rounded to the nearest step
  (`np.rint`). The authors' code truncated instead (`astype(int)`), which moves
  points down by one (57 for 57.9…) and, where the float64 value of 10^log10(T)
  lies below T, turns the last point into T − 1, a near-duplicate beside T.
  `paper_parity=True` truncates. For T = 500k and 100 + 100 (10^log10(500k) =
  499,999.99…) this gives 189 unique steps, and with `paper_parity=True` the paper's
  190, including 499,999. For T = 6000 the exact value is 6000.000000000003, so no
  T − 1 appears there.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if n_linear and linear_every:
    raise ValueError("give n_linear or linear_every, not both")
  to_steps = (lambda x: x.astype(int)) if paper_parity else (lambda x: np.rint(x).astype(int))
  log_steps = to_steps(log_points(total_steps, n_log)) if n_log else []
  lin_steps = to_steps(np.linspace(1, total_steps, n_linear)) if n_linear else []
  if linear_every:
    lin_steps = np.arange(linear_every, total_steps + 1, linear_every)
  steps = np.union1d(log_steps, lin_steps).astype(int)
  return steps[(steps >= 1) & (steps <= total_steps)]
