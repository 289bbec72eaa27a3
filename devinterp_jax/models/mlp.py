"""A fully connected ReLU network for teacher–student regression (plain JAX).

Widths D_0 (input), D_1 … D_{L-1} (hidden, ReLU), D_L (output, linear); every
layer has a bias. Params are `{"layer_0": {"kernel" [D_l, D_{l+1}], "bias"
[D_{l+1}]}, …}`, the layout `data.teacher_student` gives its teacher, so a
student of the teacher's widths can hold the teacher's params exactly.

Initialisation: PyTorch's nn.Linear default U(±1/√fan_in) for weights and
biases, times `init_scale` (a small scale gives the saddle-to-saddle, one unit
at a time learning of small-initialisation teacher–student runs).

The loss is the mean squared error over samples and outputs,
L(w) = mean_{b,o} (y_bo − f_w(x_b)_o)²; the SGLD estimate of the LLC does not
depend on that scale (nβ·L and the posterior scale together).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from devinterp_jax.typing import Batch, Params


def layer_name(layer: int) -> str:
  """The params key of layer `layer` (0-indexed): "layer_{layer}"."""
  return f"layer_{layer}"


@dataclasses.dataclass(frozen=True)
class ReLUMLP:
  """x [B, D_0] ↦ f(x) [B, D_L]: affine layers with ReLU between them."""

  widths: tuple[int, ...] = (4, 12, 1)
  init_scale: float = 1.0

  def __post_init__(self):
    widths = tuple(int(w) for w in self.widths)
    if len(widths) < 2 or min(widths) < 1:
      raise ValueError(
        f"widths must be >= 2 positive integers (input, …, output), got {self.widths}"
      )
    if not self.init_scale > 0:
      raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
    object.__setattr__(self, "widths", widths)

  @classmethod
  def from_config(cls, config) -> "ReLUMLP":
    """The student of an experiment config (`model.widths`, `model.init_scale`)."""
    return cls(
      widths=tuple(config.model.widths), init_scale=float(config.model.get("init_scale", 1.0))
    )

  @property
  def num_layers(self) -> int:
    """Affine layers (hidden layers + 1)."""
    return len(self.widths) - 1

  @property
  def hidden_widths(self) -> tuple[int, ...]:
    return self.widths[1:-1]

  @property
  def num_params(self) -> int:
    """d: weights and biases of every layer."""
    return num_params(self.widths)

  def init_params(self, key: jax.Array) -> Params:
    keys = jax.random.split(key, 2 * self.num_layers)
    params = {}
    for l, (d_in, d_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
      bound = self.init_scale / jnp.sqrt(d_in)
      params[layer_name(l)] = {
        "kernel": jax.random.uniform(keys[2 * l], (d_in, d_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(keys[2 * l + 1], (d_out,), jnp.float32, -bound, bound),
      }
    return params

  def hidden(self, params: Params, x_BxD: jax.Array) -> list[jax.Array]:
    """The pre-activations of every hidden layer, [[B, D_1], …, [B, D_{L-1}]]."""
    pre, h = [], x_BxD
    for l in range(self.num_layers - 1):
      p = params[layer_name(l)]
      z = h @ p["kernel"] + p["bias"][None, :]
      pre.append(z)
      h = jax.nn.relu(z)
    return pre

  def apply(self, params: Params, x_BxD: jax.Array) -> jax.Array:
    """The outputs f(x) [B, D_L]."""
    return forward(params, x_BxD)

  def loss(self, params: Params, batch: Batch) -> jax.Array:
    """Mean squared error over samples and outputs on {"x" [B, D_0], "y" [B, D_L]}."""
    return jnp.mean(jnp.square(self.apply(params, batch["x"]) - batch["y"]))


def forward(params: Params, x_BxD: jax.Array) -> jax.Array:
  """f(x) of any params in the `ReLUMLP` layout (the number of layers read from them)."""
  h = x_BxD
  num_layers = len(params)
  for l in range(num_layers):
    p = params[layer_name(l)]
    h = h @ p["kernel"] + p["bias"][None, :]
    if l < num_layers - 1:
      h = jax.nn.relu(h)
  return h


def num_params(widths: Sequence[int]) -> int:
  """d of a ReLU MLP of these widths: Σ_l (D_l + 1) · D_{l+1}."""
  return int(sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:])))
