"""Linear models with known learning coefficients, for validating the estimator.

A deep linear network with widths H_1 (input) … H_{L+1} (output) maps
x ↦ W_L ⋯ W_1 x, with W_i of shape [H_{i+1}, H_i]; one layer is linear
regression (a regular model, λ = d/2), two layers are reduced-rank regression.
Params are `{"layers": [W_1, …, W_L]}`.

The loss is the Gaussian negative log-likelihood up to a constant,
L(w) = mean_b ½‖y_b − f_w(x_b)‖², so that K(w) = L(w) − L(w0) is the
population KL divergence whose learning coefficient `theory` gives.
`most_singular_point` builds the true parameter at which those formulas hold:
every layer of rank exactly r (Aoyagi 2024).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def forward(params: dict, x_BxI: jax.Array) -> jax.Array:
  h = x_BxI
  for w in params["layers"]:
    h = h @ w.T
  return h


def loss(params: dict, batch: dict) -> jax.Array:
  """mean_b ½‖y_b − f(x_b)‖² (Gaussian NLL with unit variance, up to a constant)."""
  residual = batch["y"] - forward(params, batch["x"])
  return 0.5 * jnp.mean(jnp.sum(jnp.square(residual), axis=-1))


def product(params: dict) -> jax.Array:
  out = params["layers"][0]
  for w in params["layers"][1:]:
    out = w @ out
  return out


def most_singular_point(
  key: jax.Array, widths: Sequence[int], rank: int, scale: float = 1.0
) -> dict:
  """A true parameter with every layer of rank exactly `rank`.

  Layer i is U_{i+1} V_iᵀ-shaped: W_i = A_{i+1} B_iᵀ with random [H, r] factors,
  so the product W_L ⋯ W_1 has rank r (almost surely) and so does each layer.
  Entries are O(scale). rank = 0 gives the origin.
  """
  widths = [int(h) for h in widths]
  if len(widths) < 2:
    raise ValueError(f"need >= 2 widths (input, output), got {widths}")
  if rank < 0 or rank > min(widths):
    raise ValueError(f"rank {rank} must lie in [0, min(widths)={min(widths)}]")
  keys = jax.random.split(key, 2 * len(widths))
  layers = []
  for i, (h_in, h_out) in enumerate(zip(widths[:-1], widths[1:])):
    if rank == 0:
      layers.append(jnp.zeros((h_out, h_in)))
      continue
    left = jax.random.normal(keys[2 * i], (h_out, rank))
    right = jax.random.normal(keys[2 * i + 1], (h_in, rank))
    # Orthonormal factors keep the product well conditioned at any depth.
    q_left, _ = jnp.linalg.qr(left)
    q_right, _ = jnp.linalg.qr(right)
    layers.append(scale * q_left @ q_right.T)
  return {"layers": layers}


def make_data(key: jax.Array, params_true: dict, n: int, noise_std: float = 0.0) -> dict:
  """n samples x ~ N(0, I), y = f_true(x) + noise_std · N(0, I)."""
  kx, ky = jax.random.split(key)
  w = product(params_true)
  x = jax.random.normal(kx, (n, w.shape[1]))
  y = x @ w.T + noise_std * jax.random.normal(ky, (n, w.shape[0]))
  return {"x": x, "y": y}


def num_params(widths: Sequence[int]) -> int:
  return int(sum(a * b for a, b in zip(widths[:-1], widths[1:])))


def layer_ranks(params: dict, tol: float = 1e-6) -> list[int]:
  return [int(np.linalg.matrix_rank(np.asarray(w), tol=tol)) for w in params["layers"]]
