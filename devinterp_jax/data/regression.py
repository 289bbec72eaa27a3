"""In-context linear regression data (paper App. F.2), generated inside jit.

A sequence holds K pairs (x_k, y_k) of one task t: x_k ~ N(0, I_D),
y_k = t·x_k + ε, ε ~ N(0, σ²). Tasks come either from the infinite prior
t ~ N(0, I_D) or uniformly from a finite set of M pre-drawn tasks. The gains
scale the inputs or tasks (out-of-distribution data, e.g. for data-refined
LLCs); with gains 1 the draws are unchanged, and the same key gives the same
base draws at every gain.

Axis names: B batch, K in-context examples, D task dimension, M tasks,
T = 2K tokens, V = D + 1 token width.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RegressionTask:
  """The data distribution. `num_tasks=None` is the infinite-task prior."""

  task_size: int = 4
  max_examples: int = 8
  noise_variance: float = 0.125
  num_tasks: int | None = None
  task_seed: int = 0
  input_gain: float = 1.0  # x_k ~ N(0, g_x² I): OOD inputs for g_x != 1
  task_gain: float = 1.0  # t ~ N(0, g_t² I) (or the task set × g_t): OOD tasks

  def __post_init__(self):
    if self.task_size < 1 or self.max_examples < 1:
      raise ValueError(f"task_size and max_examples must be >= 1, got {self}")
    if self.noise_variance < 0:
      raise ValueError(f"noise_variance must be >= 0, got {self.noise_variance}")
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"num_tasks must be None (infinite) or >= 1, got {self.num_tasks}")
    if self.input_gain <= 0 or self.task_gain <= 0:
      raise ValueError(
        f"input_gain and task_gain must be > 0, got {self.input_gain}, {self.task_gain}"
      )

  @classmethod
  def from_config(cls, config) -> "RegressionTask":
    """The data distribution of an experiment config (fields `task`, `seed`)."""
    t = config.task
    return cls(
      task_size=t.task_size,
      max_examples=t.max_examples,
      noise_variance=t.noise_variance,
      num_tasks=t.num_tasks or None,
      task_seed=config.seed,
    )

  def task_set(self) -> jax.Array | None:
    """The finite task set [M, D] (drawn from `task_seed`), or None."""
    if self.num_tasks is None:
      return None
    return sample_tasks(jax.random.key(self.task_seed), self.num_tasks, self.task_size)


def sample_tasks(key: jax.Array, num: int, task_size: int) -> jax.Array:
  """Draws `num` tasks t ~ N(0, I_D): [num, D]."""
  return jax.random.normal(key, (num, task_size))


@functools.partial(jax.jit, static_argnames=("task", "batch_size", "with_tasks"))
def sample_batch(
  key: jax.Array, task: RegressionTask, batch_size: int, with_tasks: bool = False
) -> Batch:
  """One batch: {'xs': [B, K, D], 'ys': [B, K]} (+ 'tasks': [B, D])."""
  k_task, k_x, k_noise = jax.random.split(key, 3)
  task_set = task.task_set()
  if task_set is None:
    tasks_BxD = sample_tasks(k_task, batch_size, task.task_size)
  else:
    idx_B = jax.random.randint(k_task, (batch_size,), 0, task_set.shape[0])
    tasks_BxD = task_set[idx_B]
  tasks_BxD = task.task_gain * tasks_BxD
  xs_BxKxD = task.input_gain * jax.random.normal(
    k_x, (batch_size, task.max_examples, task.task_size)
  )
  noise_BxK = jax.random.normal(k_noise, (batch_size, task.max_examples))
  ys_BxK = jnp.einsum("bkd,bd->bk", xs_BxKxD, tasks_BxD) + jnp.sqrt(task.noise_variance) * noise_BxK
  batch = {"xs": xs_BxKxD, "ys": ys_BxK}
  if with_tasks:
    batch["tasks"] = tasks_BxD
  return batch


def make_dataset(
  key: jax.Array, task: RegressionTask, num_samples: int, chunk_size: int = 65536
) -> Batch:
  """A fixed, seeded dataset of `num_samples` sequences (e.g. for SGLD).

  Generated in chunks of `chunk_size` (chunk c from `fold_in(key, c)`), so the
  result does not depend on device memory and large n (2^20) stays cheap.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  parts = []
  for c, start in enumerate(range(0, num_samples, chunk_size)):
    size = min(chunk_size, num_samples - start)
    parts.append(sample_batch(jax.random.fold_in(key, c), task, size))
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
