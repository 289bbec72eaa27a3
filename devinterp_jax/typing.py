"""Shared types, and the package's one axis glossary.

Shapes are written into names, `attn_BxHxTxT`, with these letters everywhere:

  N  checkpoints (a sweep's leading axis; `[N, ...]` stacked params)
  C  chains
  P  pairs (a chunk's flat (restriction, checkpoint) axis)
  R  restrictions (e.g. heads under wrLLC), or heads flattened layer-major, R = L·H
  G  calibration grid points
  I  draws (iterations) of a chain
  B  batch (samples); K in-context examples per sequence (LR)
  T  query positions, S key positions
  L  layers, H heads per layer, E head dimension, D model width, V vocabulary
  M  ablation masks; Q token types (the LR's x and y tokens)

Calibration grids are indexed [ε, nβ, γ, N] (step size, nβ, localisation, checkpoint),
written with those symbols: no letter of the glossary stands for nβ or ε.

A pytree of parameters is `Params`; a batch is a pytree of arrays with a leading
sample axis.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax

Params = Any
"""A parameter pytree (a Flax `params` dict, an Equinox module, plain arrays)."""

Batch = Any
"""A pytree of arrays sharing a leading sample axis."""

LossFn = Callable[[Params, Batch], jax.Array]
"""A pure `loss_fn(params, batch) -> scalar`: the estimator's only view of a model."""


class Model(Protocol):
  """What the generic analysis needs of any setting's model (`Setting.make_model`):
  its parameter initialisation and its loss. The Hessian section needs no more."""

  def init_params(self, key: jax.Array) -> Params:
    """Parameters of the model's shapes (the abstract tree for checkpoint restores)."""
    ...

  def loss(self, params: Params, batch: Batch) -> jax.Array:
    """The training loss on `batch`."""
    ...


class HeadModel(Protocol):
  """A model whose attention heads the head analyses can read and ablate
  (`analysis.overlap`, `analysis.heads`); `RegressionTransformer` and
  `AttentionOnlyLM` implement it."""

  num_layers: int
  num_heads: int

  def loss(self, params: Params, batch: Batch) -> jax.Array:
    """The training loss on `batch`."""
    ...

  def head_activations(self, params: Params, batch: Batch) -> Mapping[str, jax.Array]:
    """{'attn' [L, B, H, T, S], 'z' [L, B, T, H, E], 'contrib' [L, B, T, H, D]}."""
    ...

  def ablated_loss(
    self, params: Params, batch: Batch, head_keep_LxH: jax.Array, head_mean_LxTxHxE: jax.Array
  ) -> jax.Array:
    """The loss with the heads where `head_keep` is 0 replaced by their mean output."""
    ...


def head_name(layer: int, head: int, query_type: str = "") -> str:
  """ "L{layer}H{head}{query_type}", 0-indexed: the one naming of heads (the LR's
  query types are "x" and "y")."""
  return f"L{layer}H{head}{query_type}"
