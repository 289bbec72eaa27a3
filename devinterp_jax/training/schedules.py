"""Learning-rate and checkpoint schedules of the paper."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def one_cycle_lr(total_steps: int, max_lr: float, pct_start: float = 0.5,
                 div_factor: float = 25.0, final_div_factor: float = 1e4):
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


def checkpoint_steps(total_steps: int, n_log: int, n_linear: int = 0,
                     linear_every: int = 0, *, paper_parity: bool = False) -> np.ndarray:
  """The union of `n_log` log-spaced and `n_linear` linearly spaced steps in [1, T]
  (or, with `linear_every`, every multiple of it up to T, as in the LM setting).

  Each schedule point is rounded to the nearest step (`np.rint`). The authors'
  code truncated instead (`astype(int)`), which turns the last log-spaced point
  10^log10(T) = T − ε into T − 1, a near-duplicate beside T, and moves other
  points down by one (57 for 57.9…). `paper_parity=True` reproduces that
  truncating schedule exactly. For T = 500k and 100 + 100 this gives 189 unique
  steps; with `paper_parity=True` the paper's 190, including 499,999.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if n_linear and linear_every:
    raise ValueError("give n_linear or linear_every, not both")
  to_steps = (lambda x: x.astype(int)) if paper_parity else (lambda x: np.rint(x).astype(int))
  log_steps = to_steps(np.logspace(0, np.log10(total_steps), n_log)) if n_log else []
  lin_steps = to_steps(np.linspace(1, total_steps, n_linear)) if n_linear else []
  if linear_every:
    lin_steps = np.arange(linear_every, total_steps + 1, linear_every)
  steps = np.union1d(log_steps, lin_steps).astype(int)
  return steps[(steps >= 1) & (steps <= total_steps)]
