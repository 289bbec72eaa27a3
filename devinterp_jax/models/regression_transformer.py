"""The in-context linear regression transformer of the paper (App. F.2.1).

Pre-LN decoder-only transformer (nanoGPT-like) over vector tokens. Params are a
plain pytree; attention weights carry an explicit head axis so one head is a
slice: w_q, w_k, w_v [D, H, E] and w_o [H, E, D].

Axis vocabulary:
  B batch        T query positions   S key positions   V token width (D_task + 1)
  D d_model      H heads             E head dim        F MLP hidden    L layers
  K in-context examples (T = 2K)

Initialisation follows PyTorch's nn.Linear defaults (U(±1/√fan_in) for weights
and biases), as in the authors' code.

The authors' published code (timaeus-research/icl) differs from the paper's
table: its blocks return `x + attn + mlp` and the model adds that to the
residual again (`double_residual=True`), and its attention output projection
is optional (`attn_out_proj`, on in the paper's runs). Both are flags here and
default to the authors' code.

Mean-ablation hook (optional; the param tree and the default outputs are
unchanged when it is not used): `head_keep` [L, H] (1 keep, 0 ablate; values in
between interpolate) and `head_mean` [L, T, H, E] replace each head's attention
output z [B, T, H, E] (before W_O) by z ← keep·z + (1 − keep)·mean, per layer.
`head_mean=None` with a `head_keep` means zero-ablation. `return_heads=True`
returns the per-head activations: `attn` [L, B, H, T, S], `z` [L, B, T, H, E]
and `contrib` [L, B, T, H, D], each head's contribution to the residual stream
z_h @ W_O[h] (without `attn_out_proj`, the head's slice of the concatenation,
embedded in D), so that Σ_h contrib equals the attention block's output.
"""

from __future__ import annotations

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from devinterp_jax.models import attention_core
from devinterp_jax.typing import Params


def to_tokens(xs_BxKxD: jax.Array, ys_BxK: jax.Array) -> jax.Array:
  """The model's input sequence: x-tokens [0, x] and y-tokens [y, 0…0] interleaved,
  [B, 2K, D + 1] (the model owns its tokenization; the data are (xs, ys) only)."""
  B, K, D = xs_BxKxD.shape
  x_tok = jnp.concatenate([jnp.zeros((B, K, 1), xs_BxKxD.dtype), xs_BxKxD], -1)
  y_tok = jnp.concatenate([ys_BxK[..., None], jnp.zeros((B, K, D), ys_BxK.dtype)], -1)
  return jnp.stack([x_tok, y_tok], axis=2).reshape(B, 2 * K, D + 1)


def torch_uniform(fan_in: int):
  """PyTorch nn.Linear's default init: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """Linear layer with PyTorch's init; kernel [in, out]."""

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
    y = x @ kernel
    if self.use_bias:
      bias = self.param("bias", torch_uniform(fan_in), (self.features,))
      y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)  # explicit: no rank promotion
    return y


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with per-head weight slices."""

  num_heads: int
  attn_out_proj: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, head_keep_H=None, head_mean_TxHxE=None, return_heads: bool = False):
    """(out [B, T, D], attn [B, H, T, S]), or (out, heads) with `return_heads`.

    `head_keep_H` [H] and `head_mean_TxHxE` [T, H, E] mean-ablate heads (see the
    module docstring); `heads` is {'attn' [B, H, T, S], 'z' [B, T, H, E] (after
    ablation), 'contrib' [B, T, H, D]}.
    """
    B, T, D = x_BxTxD.shape
    H = self.num_heads
    if D % H:
      raise ValueError(f"num_heads={H} must divide d_model={D}")
    E = D // H
    init = torch_uniform(D)
    w_q = self.param("w_q", init, (D, H, E))
    w_k = self.param("w_k", init, (D, H, E))
    w_v = self.param("w_v", init, (D, H, E))
    # One fused QKV matmul, as in the paper's fused projection.
    qkv_3xBxTxHxE = jnp.einsum("btd,cdhe->cbthe", x_BxTxD, jnp.stack([w_q, w_k, w_v]))
    q, k, v = qkv_3xBxTxHxE
    attn_BxHxTxS, z_BxTxHxE = attention_core.causal_attention(q, k, v, head_keep_H, head_mean_TxHxE)
    if self.attn_out_proj:
      w_o_HxExD = self.param("w_o", init, (H, E, D))
      out_BxTxD = jnp.einsum("bthe,hed->btd", z_BxTxHxE, w_o_HxExD)
    else:
      w_o_HxExD = None
      out_BxTxD = z_BxTxHxE.reshape(B, T, D)
    if not return_heads:
      return out_BxTxD, attn_BxHxTxS
    if w_o_HxExD is None:  # head h is the slice h·E:(h+1)·E of the concatenation
      w_o_HxExD = jnp.eye(D, dtype=z_BxTxHxE.dtype).reshape(H, E, D)
    contrib_BxTxHxD = jnp.einsum("bthe,hed->bthd", z_BxTxHxE, w_o_HxExD)
    return out_BxTxD, {"attn": attn_BxHxTxS, "z": z_BxTxHxE, "contrib": contrib_BxTxHxD}


class Block(nn.Module):
  """Pre-LN block; returns x + attn(LN x) + mlp(LN(x + attn))."""

  num_heads: int
  d_mlp: int
  attn_out_proj: bool = True
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BxTxD, head_keep_H=None, head_mean_TxHxE=None, return_heads: bool = False):
    """(out, attn [B, H, T, S]), or (out, heads) with `return_heads` (as the attention)."""
    D = x_BxTxD.shape[-1]
    a_BxTxD, attn_or_heads = CausalSelfAttention(self.num_heads, self.attn_out_proj, name="attn")(
      nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_1")(x_BxTxD),
      head_keep_H,
      head_mean_TxHxE,
      return_heads,
    )
    h_BxTxD = x_BxTxD + a_BxTxD
    m_BxTxF = nn.relu(
      Dense(self.d_mlp, name="mlp_in")(
        nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_2")(h_BxTxD)
      )
    )
    return h_BxTxD + Dense(D, name="mlp_out")(m_BxTxF), attn_or_heads


class RegressionTransformer(nn.Module):
  """Maps tokens [B, T, V] to next-token outputs [B, T, V] (+ attention)."""

  task_size: int = 4
  max_examples: int = 8
  d_model: int = 64
  d_mlp: int = 64
  num_heads: int = 4
  num_layers: int = 2
  attn_out_proj: bool = True
  double_residual: bool = True
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(
    self,
    tokens_BxTxV,
    return_attention: bool = False,
    head_keep=None,
    head_mean=None,
    return_heads: bool = False,
  ):
    """Outputs [B, T, V]; with `return_attention` also attn [L, B, H, T, S].

    `head_keep` [L, H] and `head_mean` [L, T, H, E] mean-ablate heads (module
    docstring). `return_heads` returns (out, {'attn' [L, B, H, T, S], 'z'
    [L, B, T, H, E], 'contrib' [L, B, T, H, D]}) instead (it includes `attn`).
    """
    _, T, V = tokens_BxTxV.shape
    max_tokens = 2 * self.max_examples
    if V != self.task_size + 1:
      raise ValueError(f"token width {V} != task_size + 1 = {self.task_size + 1}")
    if T > max_tokens:
      raise ValueError(f"{T} tokens > 2 * max_examples = {max_tokens}")
    L, H, E = self.num_layers, self.num_heads, self.d_model // self.num_heads
    attention_core.check_args(head_keep, head_mean, L, T, H, E)
    pos_TmaxxD = self.param("pos_embed", torch_uniform(max_tokens), (max_tokens, self.d_model))
    x_BxTxD = Dense(self.d_model, use_bias=False, name="token_embed")(tokens_BxTxV)
    x_BxTxD = x_BxTxD + pos_TmaxxD[None, :T]
    per_layer = []
    for layer in range(self.num_layers):
      keep_H = None if head_keep is None else head_keep[layer]
      mean_TxHxE = None if head_mean is None else head_mean[layer]
      block_out, attn_or_heads = Block(
        self.num_heads, self.d_mlp, self.attn_out_proj, self.layer_norm_eps, name=f"block_{layer}"
      )(x_BxTxD, keep_H, mean_TxHxE, return_heads)
      x_BxTxD = x_BxTxD + block_out if self.double_residual else block_out
      per_layer.append(attn_or_heads)
    x_BxTxD = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_f")(x_BxTxD)
    out_BxTxV = Dense(V, name="unembed")(x_BxTxD)
    if return_heads:
      return out_BxTxV, {k: jnp.stack([h[k] for h in per_layer]) for k in per_layer[0]}
    if return_attention:
      return out_BxTxV, jnp.stack(per_layer)  # attn_LxBxHxTxS
    return out_BxTxV

  @classmethod
  def from_config(cls, config) -> "RegressionTransformer":
    """The model of an experiment config (fields `task` and `model`)."""
    return cls(
      task_size=config.task.task_size, max_examples=config.task.max_examples, **config.model
    )

  def init_params(self, key: jax.Array) -> Params:
    tokens = jnp.zeros((1, 2 * self.max_examples, self.task_size + 1))
    return self.init(key, tokens)["params"]

  def predict(
    self,
    params: Params,
    xs_BxKxD: jax.Array,
    ys_BxK: jax.Array,
    return_attention: bool = False,
    head_keep=None,
    head_mean=None,
  ):
    """Predictions ŷ_k [B, K] read from channel 0 at the x-token positions.

    `head_keep` [L, H], `head_mean` [L, 2K, H, E]: mean-ablation (module docstring).
    """
    # flax types apply's result as Any | (Any, mutated variables); no mutable here.
    out = cast(
      Any,
      self.apply(
        {"params": params}, to_tokens(xs_BxKxD, ys_BxK), return_attention, head_keep, head_mean
      ),
    )
    out_BxTxV, attn = out if return_attention else (out, None)
    preds_BxK = out_BxTxV[:, 0::2, 0]
    return (preds_BxK, attn) if return_attention else preds_BxK

  def per_prediction_loss(self, params: Params, batch, head_keep=None, head_mean=None) -> jax.Array:
    """Squared error per prediction, averaged over the batch: [K]."""
    preds_BxK = self.predict(
      params, batch["xs"], batch["ys"], head_keep=head_keep, head_mean=head_mean
    )
    return jnp.mean(jnp.square(preds_BxK - batch["ys"]), axis=0)

  def loss(self, params: Params, batch) -> jax.Array:
    """Mean squared error over the batch and the K predictions (a scalar)."""
    return jnp.mean(self.per_prediction_loss(params, batch))

  def head_activations(self, params: Params, batch) -> dict[str, jax.Array]:
    """Per-head activations on `batch` ({'xs', 'ys'}), unablated.

    Returns {'attn' [L, B, H, T, S], 'z' [L, B, T, H, E], 'contrib' [L, B, T, H, D]}
    (the `head_activations_fn` of `analysis.overlap`).
    """
    _, heads = cast(
      tuple[jax.Array, dict[str, jax.Array]],
      self.apply({"params": params}, to_tokens(batch["xs"], batch["ys"]), return_heads=True),
    )
    return heads

  def ablated_loss(self, params: Params, batch, head_keep_LxH, head_mean_LxTxHxE) -> jax.Array:
    """`loss` with heads mean-ablated: z ← keep·z + (1 − keep)·mean (a scalar).

    The `ablated_loss_fn` of `analysis.overlap`; `head_mean_LxTxHxE=None` zero-ablates.
    """
    return jnp.mean(self.per_prediction_loss(params, batch, head_keep_LxH, head_mean_LxTxHxE))


def param_count(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
