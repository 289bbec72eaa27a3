"""Causal multi-head attention and head mean-ablation, shared by the models.

Axis names: B batch, T query positions, S key positions, H heads, E head dim.
Mean-ablation (see `analysis/overlap.py`): each head's attention output z
[B, T, H, E] (before W_O) becomes keep·z + (1 − keep)·mean; `mean=None` is
zero-ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(
  q_BxTxHxE: jax.Array,
  k_BxSxHxE: jax.Array,
  v_BxSxHxE: jax.Array,
  head_keep_H=None,
  head_mean_TxHxE=None,
) -> tuple[jax.Array, jax.Array]:
  """Softmax attention with a causal mask: (attn [B, H, T, S], z [B, T, H, E]),
  z mean-ablated per head when `head_keep_H` is given."""
  T, E = q_BxTxHxE.shape[1], q_BxTxHxE.shape[-1]
  logits_BxHxTxS = jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxSxHxE) / jnp.sqrt(E).astype(
    q_BxTxHxE.dtype
  )
  causal_TxS = jnp.tril(jnp.ones((T, k_BxSxHxE.shape[1]), dtype=bool))
  logits_BxHxTxS = jnp.where(causal_TxS, logits_BxHxTxS, jnp.finfo(logits_BxHxTxS.dtype).min)
  attn_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
  z_BxTxHxE = jnp.einsum("bhts,bshe->bthe", attn_BxHxTxS, v_BxSxHxE)
  if head_keep_H is not None:
    z_BxTxHxE = mean_ablate(z_BxTxHxE, head_keep_H, head_mean_TxHxE)
  elif head_mean_TxHxE is not None:
    raise ValueError("head_mean given without head_keep")
  return attn_BxHxTxS, z_BxTxHxE


def check_args(head_keep, head_mean, L: int, T: int, H: int, E: int) -> None:
  """Names the problem when `head_keep` [L, H] / `head_mean` [L, T, H, E] do not fit."""
  if head_keep is not None and jnp.shape(head_keep) != (L, H):
    raise ValueError(
      f"head_keep has shape {jnp.shape(head_keep)}, want (num_layers, num_heads) = ({L}, {H})"
    )
  if head_mean is not None:
    if head_keep is None:
      raise ValueError("head_mean given without head_keep")
    if jnp.shape(head_mean) != (L, T, H, E):
      raise ValueError(
        f"head_mean has shape {jnp.shape(head_mean)}, want (num_layers, "
        f"tokens, num_heads, head_dim) = ({L}, {T}, {H}, {E})"
      )


def mean_ablate(z_BxTxHxE, head_keep_H, head_mean_TxHxE):
  """z ← keep·z + (1 − keep)·mean per head; mean None means zero-ablation."""
  _, T, H, E = z_BxTxHxE.shape
  keep_H = jnp.asarray(head_keep_H, z_BxTxHxE.dtype)
  if keep_H.shape != (H,):
    raise ValueError(f"head_keep of a layer has shape {keep_H.shape}, want (num_heads,) = ({H},)")
  keep_1x1xHx1 = keep_H[None, None, :, None]
  if head_mean_TxHxE is None:
    return keep_1x1xHx1 * z_BxTxHxE
  mean_TxHxE = jnp.asarray(head_mean_TxHxE, z_BxTxHxE.dtype)
  if mean_TxHxE.shape != (T, H, E):
    raise ValueError(
      f"head_mean of a layer has shape {mean_TxHxE.shape}, want (tokens, "
      f"num_heads, head_dim) = ({T}, {H}, {E})"
    )
  return keep_1x1xHx1 * z_BxTxHxE + (1 - keep_1x1xHx1) * mean_TxHxE[None]
