"""Teacher–student regression data: a fixed random ReLU network labels Gaussian inputs.

x ~ N(0, s² I_{D_0}) (s = `input_std`), y = f*(x) + σ ε with ε ~ N(0, I_{D_L}),
where f* is a ReLU MLP of widths `teacher_widths` = (D_0, hidden…, D_L) drawn
once from `teacher_seed`:

  hidden units   incoming weight vectors uniform on the unit sphere (so at s = 1
                 every first-layer pre-activation is N(b, 1)), biases N(0, bias_std²)
  output layer   weights ±1 with random signs, bias 0 (every last hidden unit
                 matters equally)

Params use the layout of `models.mlp.ReLUMLP` ({"layer_l": {"kernel" [D_l,
D_{l+1}], "bias" [D_{l+1}]}}), so a student of the teacher's widths can equal it.
A student with more hidden units than the teacher is overparametrised: its
minima form degenerate sets (dead, duplicated or split units), the singular
case the LLC measures.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from devinterp_jax.typing import Batch, Params


@dataclasses.dataclass(frozen=True)
class TeacherStudentTask:
  """The data distribution: the teacher network, the inputs and the label noise."""

  teacher_widths: tuple[int, ...] = (4, 3, 1)
  teacher_seed: int = 0
  bias_std: float = 0.5
  noise_std: float = 0.1  # σ: y = f*(x) + σ ε
  input_std: float = 1.0  # s: x ~ N(0, s² I) (s != 1: out-of-distribution inputs)

  def __post_init__(self):
    widths = tuple(int(w) for w in self.teacher_widths)
    if len(widths) < 3 or min(widths) < 1:
      raise ValueError(
        f"teacher_widths must be (input, hidden…, output) with at least one "
        f"hidden layer and positive widths, got {self.teacher_widths}"
      )
    object.__setattr__(self, "teacher_widths", widths)
    if self.bias_std < 0 or self.noise_std < 0:
      raise ValueError(
        f"bias_std and noise_std must be >= 0, got {self.bias_std}, {self.noise_std}"
      )
    if not self.input_std > 0:
      raise ValueError(f"input_std must be > 0, got {self.input_std}")

  @classmethod
  def from_config(cls, config) -> "TeacherStudentTask":
    """The distribution of an experiment config (section `task`)."""
    t = config.task
    return cls(
      teacher_widths=tuple(t.teacher_widths),
      teacher_seed=int(t.teacher_seed),
      bias_std=float(t.bias_std),
      noise_std=float(t.noise_std),
      input_std=float(t.get("input_std", 1.0)),
    )

  @property
  def input_dim(self) -> int:
    return self.teacher_widths[0]

  @property
  def output_dim(self) -> int:
    return self.teacher_widths[-1]

  def teacher_params(self) -> Params:
    """The teacher's params (a pure function of the task: same seed, same teacher)."""
    widths = self.teacher_widths
    keys = jax.random.split(jax.random.key(self.teacher_seed), 2 * (len(widths) - 1))
    params = {}
    for l, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
      k_w, k_b = keys[2 * l], keys[2 * l + 1]
      if l < len(widths) - 2:  # hidden: unit incoming vectors, Gaussian biases
        w_IxO = jax.random.normal(k_w, (d_in, d_out))
        w_IxO = w_IxO / jnp.linalg.norm(w_IxO, axis=0, keepdims=True)
        b_O = self.bias_std * jax.random.normal(k_b, (d_out,))
      else:  # output: ±1, no bias
        w_IxO = jnp.where(jax.random.bernoulli(k_w, 0.5, (d_in, d_out)), 1.0, -1.0)
        b_O = jnp.zeros((d_out,))
      params[f"layer_{l}"] = {"kernel": w_IxO.astype(jnp.float32), "bias": b_O.astype(jnp.float32)}
    return params


def teacher_forward(params: Params, x_BxD: jax.Array) -> jax.Array:
  """f*(x) [B, D_L] of teacher params (ReLU between affine layers)."""
  h = x_BxD
  for l in range(len(params)):
    p = params[f"layer_{l}"]
    h = h @ p["kernel"] + p["bias"][None, :]
    if l < len(params) - 1:
      h = jax.nn.relu(h)
  return h


@functools.partial(jax.jit, static_argnames=("task", "batch_size", "with_targets"))
def sample_batch(
  key: jax.Array, task: TeacherStudentTask, batch_size: int, with_targets: bool = False
) -> Batch:
  """One batch {"x" [B, D_0], "y" [B, D_L]} (+ "f" [B, D_L], the noiseless f*(x))."""
  k_x, k_noise = jax.random.split(key)
  x_BxD = task.input_std * jax.random.normal(k_x, (batch_size, task.input_dim))
  f_BxO = teacher_forward(task.teacher_params(), x_BxD)
  y_BxO = f_BxO + task.noise_std * jax.random.normal(k_noise, f_BxO.shape)
  batch = {"x": x_BxD, "y": y_BxO}
  if with_targets:
    batch["f"] = f_BxO
  return batch


def make_dataset(
  key: jax.Array, task: TeacherStudentTask, num_samples: int, chunk_size: int = 65536
) -> Batch:
  """A fixed, seeded dataset of `num_samples` pairs (e.g. for SGLD), drawn in chunks
  (chunk c from `fold_in(key, c)`), so its content does not depend on memory."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  parts = []
  for c, start in enumerate(range(0, num_samples, chunk_size)):
    parts.append(
      sample_batch(jax.random.fold_in(key, c), task, min(chunk_size, num_samples - start))
    )
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
