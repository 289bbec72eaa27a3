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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from devinterp_jax.data.regression import to_tokens

Params = Any


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
      y = y + self.param("bias", torch_uniform(fan_in), (self.features,))
    return y


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with per-head weight slices."""

  num_heads: int
  attn_out_proj: bool = True

  @nn.compact
  def __call__(self, x_BxTxD):
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
    logits_BxHxTxS = jnp.einsum("bthe,bshe->bhts", q, k) / jnp.sqrt(E).astype(q.dtype)
    causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
    logits_BxHxTxS = jnp.where(causal_TxS, logits_BxHxTxS, jnp.finfo(q.dtype).min)
    attn_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    z_BxTxHxE = jnp.einsum("bhts,bshe->bthe", attn_BxHxTxS, v)
    if self.attn_out_proj:
      w_o = self.param("w_o", init, (H, E, D))
      out_BxTxD = jnp.einsum("bthe,hed->btd", z_BxTxHxE, w_o)
    else:
      out_BxTxD = z_BxTxHxE.reshape(B, T, D)
    return out_BxTxD, attn_BxHxTxS


class Block(nn.Module):
  """Pre-LN block; returns x + attn(LN x) + mlp(LN(x + attn))."""

  num_heads: int
  d_mlp: int
  attn_out_proj: bool = True
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BxTxD):
    D = x_BxTxD.shape[-1]
    a_BxTxD, attn_BxHxTxS = CausalSelfAttention(
        self.num_heads, self.attn_out_proj, name="attn")(
            nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_1")(x_BxTxD))
    h_BxTxD = x_BxTxD + a_BxTxD
    m_BxTxF = nn.relu(Dense(self.d_mlp, name="mlp_in")(
        nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_2")(h_BxTxD)))
    return h_BxTxD + Dense(D, name="mlp_out")(m_BxTxF), attn_BxHxTxS


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
  def __call__(self, tokens_BxTxV, return_attention: bool = False):
    _, T, V = tokens_BxTxV.shape
    max_tokens = 2 * self.max_examples
    if V != self.task_size + 1:
      raise ValueError(f"token width {V} != task_size + 1 = {self.task_size + 1}")
    if T > max_tokens:
      raise ValueError(f"{T} tokens > 2 * max_examples = {max_tokens}")
    pos_TmaxxD = self.param("pos_embed", torch_uniform(max_tokens), (max_tokens, self.d_model))
    x_BxTxD = Dense(self.d_model, use_bias=False, name="token_embed")(tokens_BxTxV)
    x_BxTxD = x_BxTxD + pos_TmaxxD[:T]
    attns = []
    for layer in range(self.num_layers):
      block_out, attn_BxHxTxS = Block(self.num_heads, self.d_mlp, self.attn_out_proj,
                                      self.layer_norm_eps, name=f"block_{layer}")(x_BxTxD)
      x_BxTxD = x_BxTxD + block_out if self.double_residual else block_out
      attns.append(attn_BxHxTxS)
    x_BxTxD = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_f")(x_BxTxD)
    out_BxTxV = Dense(V, name="unembed")(x_BxTxD)
    if return_attention:
      return out_BxTxV, jnp.stack(attns)  # attn_LxBxHxTxS
    return out_BxTxV

  @classmethod
  def from_config(cls, config) -> "RegressionTransformer":
    """The model of an experiment config (fields `task` and `model`)."""
    return cls(task_size=config.task.task_size, max_examples=config.task.max_examples,
               **config.model)

  def init_params(self, key: jax.Array) -> Params:
    tokens = jnp.zeros((1, 2 * self.max_examples, self.task_size + 1))
    return self.init(key, tokens)["params"]

  def predict(self, params: Params, xs_BxKxD: jax.Array, ys_BxK: jax.Array,
              return_attention: bool = False):
    """Predictions ŷ_k [B, K] read from channel 0 at the x-token positions."""
    out = self.apply({"params": params}, to_tokens(xs_BxKxD, ys_BxK), return_attention)
    out_BxTxV, attn = out if return_attention else (out, None)
    preds_BxK = out_BxTxV[:, 0::2, 0]
    return (preds_BxK, attn) if return_attention else preds_BxK

  def per_prediction_loss(self, params: Params, batch) -> jax.Array:
    """Squared error per prediction, averaged over the batch: [K]."""
    preds_BxK = self.predict(params, batch["xs"], batch["ys"])
    return jnp.mean(jnp.square(preds_BxK - batch["ys"]), axis=0)

  def loss(self, params: Params, batch) -> jax.Array:
    """Mean squared error over the batch and the K predictions (a scalar)."""
    return jnp.mean(self.per_prediction_loss(params, batch))


def param_count(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
