"""The attention-only transformer language model of the paper (§6, App. F.1).

Pre-LN decoder-only transformer over token ids with attention blocks only (no
MLPs) and a Shortformer positional embedding (Press et al. 2021, as in
TransformerLens' `positional_embedding_type="shortformer"`): the residual
stream starts as the token embedding alone (W_pos is never added to it), and in
every block the queries and keys read LN(x + W_pos[:T]) while the values read
LN(x), with the block's one LayerNorm applied to both. Then a final LayerNorm
and an unembedding with bias give the logits. Params are a plain pytree;
attention weights carry an explicit head axis so one head is a slice:
w_q, w_k, w_v [D, H, E], b_q, b_k, b_v [H, E], w_o [H, E, D] and a shared
output bias b_o [D] added once per block.

Param names (the `sampling.restrict` selectors rely on them):
  token_embed/embedding [V, D]   pos_embed [T_max, D]
  block_{l}/ln_1/{scale,bias} [D]
  block_{l}/attn/{w_q,w_k,w_v} [D, H, E], {b_q,b_k,b_v} [H, E], w_o [H, E, D], b_o [D]
  ln_f/{scale,bias} [D]           unembed/kernel [D, V], unembed/bias [V]
The paper's sizes (V = 5000, T_max = 1024, D = 256, H = 8, L = 2) give
3,355,016 parameters (3,091,336 with one layer), TransformerLens-style.

Axis vocabulary:
  B batch        T query positions   S key positions   V vocabulary
  D d_model      H heads             E head dim (D // H)   L layers

Initialisation is TransformerLens' default "gpt2" mode: every weight matrix
(token and positional embeddings, W_Q, W_K, W_V, W_O, W_U) ~ N(0, init_std²)
with init_std = 0.8/√d_model unless set (0.05 for D = 256), every bias zero,
LayerNorm scales one and biases zero (no GPT-2 residual rescaling).

Mean-ablation hook (the protocol of `analysis.overlap`, as in
`RegressionTransformer`): `head_keep` [L, H] (1 keep, 0 ablate; values in
between interpolate) and `head_mean` [L, T, H, E] replace each head's attention
output z [B, T, H, E] (before W_O) by z ← keep·z + (1 − keep)·mean, per layer;
`head_mean=None` with a `head_keep` zero-ablates. `return_heads=True` returns
`attn` [L, B, H, T, S], `z` [L, B, T, H, E] (after ablation) and `contrib`
[L, B, T, H, D] = z_h @ W_O[h] (without b_o), so that Σ_h contrib + b_o is the
attention block's output.

Positional-embedding ablation: `pos_ablation=True` (on `__call__` and the loss
methods) replaces W_pos by its mean over all T_max positions, so queries and
keys lose positional information; `pos_ablated_loss` is the paper's
"positional-embedding ablation loss".
"""

from __future__ import annotations

from typing import Mapping, cast

import flax.linen as nn
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from devinterp_jax.models import attention_core
from devinterp_jax.models.regression_transformer import param_count
from devinterp_jax.typing import Params

__all__ = ["AttentionOnlyLM", "ShortformerAttention", "Block", "param_count"]


class ShortformerAttention(nn.Module):
  """Multi-head causal self-attention; queries/keys and values read different inputs."""

  num_heads: int
  init_std: float

  @nn.compact
  def __call__(
    self,
    qk_in_BxTxD,
    v_in_BxTxD,
    head_keep_H=None,
    head_mean_TxHxE=None,
    return_heads: bool = False,
  ):
    """(out [B, T, D], attn [B, H, T, S]), or (out, heads) with `return_heads`.

    `head_keep_H` [H] and `head_mean_TxHxE` [T, H, E] mean-ablate heads (module
    docstring); `heads` is {'attn' [B, H, T, S], 'z' [B, T, H, E], 'contrib' [B, T, H, D]}.
    """
    _, T, D = qk_in_BxTxD.shape
    H = self.num_heads
    if D % H:
      raise ValueError(f"num_heads={H} must divide d_model={D}")
    E = D // H
    w_init, zeros = nn.initializers.normal(self.init_std), nn.initializers.zeros
    w_q = self.param("w_q", w_init, (D, H, E))
    w_k = self.param("w_k", w_init, (D, H, E))
    w_v = self.param("w_v", w_init, (D, H, E))
    b_q = self.param("b_q", zeros, (H, E))
    b_k = self.param("b_k", zeros, (H, E))
    b_v = self.param("b_v", zeros, (H, E))
    w_o_HxExD = self.param("w_o", w_init, (H, E, D))
    b_o_D = self.param("b_o", zeros, (D,))
    q_BxTxHxE = jnp.einsum("btd,dhe->bthe", qk_in_BxTxD, w_q) + b_q[None, None]
    k_BxSxHxE = jnp.einsum("bsd,dhe->bshe", qk_in_BxTxD, w_k) + b_k[None, None]
    v_BxSxHxE = jnp.einsum("bsd,dhe->bshe", v_in_BxTxD, w_v) + b_v[None, None]
    attn_BxHxTxS, z_BxTxHxE = attention_core.causal_attention(
      q_BxTxHxE, k_BxSxHxE, v_BxSxHxE, head_keep_H, head_mean_TxHxE
    )
    out_BxTxD = jnp.einsum("bthe,hed->btd", z_BxTxHxE, w_o_HxExD) + b_o_D[None, None]
    if not return_heads:
      return out_BxTxD, attn_BxHxTxS
    contrib_BxTxHxD = jnp.einsum("bthe,hed->bthd", z_BxTxHxE, w_o_HxExD)
    return out_BxTxD, {"attn": attn_BxHxTxS, "z": z_BxTxHxE, "contrib": contrib_BxTxHxD}


class Block(nn.Module):
  """Attention-only pre-LN block with a Shortformer W_pos; returns the attention output."""

  num_heads: int
  init_std: float
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(
    self, x_BxTxD, pos_TxD, head_keep_H=None, head_mean_TxHxE=None, return_heads: bool = False
  ):
    """(attn output [B, T, D], attn [B, H, T, S] or heads); the caller adds the residual.

    One LayerNorm (`ln_1`), applied to x + W_pos (queries, keys) and to x (values).
    """
    ln = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_1")
    return ShortformerAttention(self.num_heads, self.init_std, name="attn")(
      ln(x_BxTxD + pos_TxD[None]), ln(x_BxTxD), head_keep_H, head_mean_TxHxE, return_heads
    )


class AttentionOnlyLM(nn.Module):
  """Maps token ids [B, T] to next-token logits [B, T, V] (+ attention)."""

  vocab_size: int = 5000
  context_length: int = 1024
  d_model: int = 256
  num_heads: int = 8
  num_layers: int = 2
  layer_norm_eps: float = 1e-5
  init_std: float | None = None  # None: TransformerLens' 0.8/√d_model

  @property
  def d_head(self) -> int:
    return self.d_model // self.num_heads

  @nn.compact
  def __call__(
    self,
    tokens_BxT,
    return_attention: bool = False,
    head_keep=None,
    head_mean=None,
    return_heads: bool = False,
    pos_ablation: bool = False,
  ):
    """Logits [B, T, V]; with `return_attention` also attn [L, B, H, T, S].

    `head_keep` [L, H] and `head_mean` [L, T, H, E] mean-ablate heads (module
    docstring). `return_heads` returns (logits, {'attn' [L, B, H, T, S], 'z'
    [L, B, T, H, E], 'contrib' [L, B, T, H, D]}) instead (it includes `attn`).
    `pos_ablation` replaces W_pos by its mean over positions.
    """
    T = self._check_tokens(tokens_BxT)
    L, H, E, D = self.num_layers, self.num_heads, self.d_head, self.d_model
    if D % H:
      raise ValueError(f"num_heads={H} must divide d_model={D}")
    attention_core.check_args(head_keep, head_mean, L, T, H, E)
    std = self.init_std if self.init_std is not None else 0.8 / np.sqrt(D)
    w_init = nn.initializers.normal(std)
    x_BxTxD = nn.Embed(self.vocab_size, D, embedding_init=w_init, name="token_embed")(tokens_BxT)
    pos_TmaxxD = self.param("pos_embed", w_init, (self.context_length, D))
    if pos_ablation:
      pos_TxD = jnp.broadcast_to(jnp.mean(pos_TmaxxD, axis=0), (T, D))
    else:
      pos_TxD = pos_TmaxxD[:T]
    per_layer = []
    for layer in range(L):
      keep_H = None if head_keep is None else head_keep[layer]
      mean_TxHxE = None if head_mean is None else head_mean[layer]
      a_BxTxD, attn_or_heads = Block(H, std, self.layer_norm_eps, name=f"block_{layer}")(
        x_BxTxD, pos_TxD, keep_H, mean_TxHxE, return_heads
      )
      x_BxTxD = x_BxTxD + a_BxTxD
      per_layer.append(attn_or_heads)
    x_BxTxD = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_f")(x_BxTxD)
    logits_BxTxV = nn.Dense(
      self.vocab_size, kernel_init=w_init, bias_init=nn.initializers.zeros, name="unembed"
    )(x_BxTxD)
    if return_heads:
      return logits_BxTxV, {k: jnp.stack([h[k] for h in per_layer]) for k in per_layer[0]}
    if return_attention:
      return logits_BxTxV, jnp.stack(per_layer)  # attn_LxBxHxTxS
    return logits_BxTxV

  def _check_tokens(self, tokens_BxT) -> int:
    """Static checks (rank, dtype, length); the id range too when the tokens are concrete."""
    shape, dtype = jnp.shape(tokens_BxT), jnp.result_type(tokens_BxT)
    if len(shape) != 2:
      raise ValueError(f"tokens have shape {shape}, want (batch, tokens)")
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"tokens have dtype {dtype}, want an integer dtype (token ids)")
    T = shape[1]
    if not 1 <= T <= self.context_length:
      raise ValueError(f"{T} tokens per sequence; want 1 to context_length = {self.context_length}")
    if not isinstance(tokens_BxT, jax.core.Tracer) and shape[0] * T:
      toks = np.asarray(tokens_BxT)
      lo, hi = int(toks.min()), int(toks.max())
      if lo < 0 or hi >= self.vocab_size:
        raise ValueError(
          f"token ids span [{lo}, {hi}], outside [0, vocab_size) = [0, {self.vocab_size})"
        )
    return T

  @classmethod
  def from_config(cls, config) -> "AttentionOnlyLM":
    """The model of an experiment config's `model` fields (vocab_size, context_length,
    d_model, num_heads, num_layers; optional layer_norm_eps, init_std)."""
    required = ("vocab_size", "context_length", "d_model", "num_heads", "num_layers")
    optional = ("layer_norm_eps", "init_std")
    fields = dict(config.model)
    missing = [k for k in required if k not in fields]
    unknown = sorted(set(fields) - set(required) - set(optional))
    if missing or unknown:
      raise ValueError(
        f"config.model for AttentionOnlyLM: missing {missing}, unknown "
        f"{unknown}; fields are {list(required + optional)}"
      )
    return cls(**fields)

  def init_params(self, key: jax.Array) -> Params:
    return self.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

  def logits(
    self,
    params: Params,
    tokens_BxT: jax.Array,
    head_keep=None,
    head_mean=None,
    pos_ablation: bool = False,
  ) -> jax.Array:
    """Next-token logits [B, T, V]."""
    # flax types apply's result as Any | (Any, mutated variables); no mutable here.
    return cast(
      jax.Array,
      self.apply(
        {"params": params},
        tokens_BxT,
        head_keep=head_keep,
        head_mean=head_mean,
        pos_ablation=pos_ablation,
      ),
    )

  def attention_patterns(
    self, params: Params, tokens_BxT: jax.Array, pos_ablation: bool = False
  ) -> jax.Array:
    """Attention patterns attn [L, B, H, T, S] (rows sum to 1, zero above the diagonal)."""
    _, attn_LxBxHxTxS = cast(
      tuple[jax.Array, jax.Array],
      self.apply({"params": params}, tokens_BxT, return_attention=True, pos_ablation=pos_ablation),
    )
    return attn_LxBxHxTxS

  def per_token_loss(
    self,
    params: Params,
    tokens_BxT: jax.Array,
    head_keep=None,
    head_mean=None,
    pos_ablation: bool = False,
  ) -> jax.Array:
    """Next-token cross-entropy [B, T − 1]: position t predicts token t + 1."""
    if jnp.ndim(tokens_BxT) == 2 and jnp.shape(tokens_BxT)[1] < 2:
      raise ValueError(
        f"tokens have shape {jnp.shape(tokens_BxT)}; a next-token loss "
        "needs at least 2 tokens per sequence"
      )
    logits_BxTxV = self.logits(params, tokens_BxT, head_keep, head_mean, pos_ablation)
    logp_BxTm1xV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    targets_BxTm1 = tokens_BxT[:, 1:]
    return -jnp.take_along_axis(logp_BxTm1xV, targets_BxTm1[..., None], axis=-1)[..., 0]

  def per_position_loss(
    self,
    params: Params,
    batch: Mapping[str, jax.Array],
    head_keep=None,
    head_mean=None,
    pos_ablation: bool = False,
  ) -> jax.Array:
    """Next-token cross-entropy per position, averaged over the batch: [T − 1]."""
    return jnp.mean(
      self.per_token_loss(params, _tokens(batch), head_keep, head_mean, pos_ablation), axis=0
    )

  def loss(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over the batch and positions (a scalar).

    `batch` is {'tokens': int [B, T]}; this is the sampler's `loss_fn(params, batch)`.
    """
    return jnp.mean(self.per_token_loss(params, _tokens(batch)))

  def pos_ablated_loss(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`loss` with W_pos replaced by its mean over positions (a scalar)."""
    return jnp.mean(self.per_token_loss(params, _tokens(batch), pos_ablation=True))

  def head_activations(
    self, params: Params, batch: Mapping[str, jax.Array]
  ) -> dict[str, jax.Array]:
    """Per-head activations on `batch` ({'tokens'}), unablated.

    Returns {'attn' [L, B, H, T, S], 'z' [L, B, T, H, E], 'contrib' [L, B, T, H, D]}
    (the `head_activations_fn` of `analysis.overlap`).
    """
    _, heads = cast(
      tuple[jax.Array, dict[str, jax.Array]],
      self.apply({"params": params}, _tokens(batch), return_heads=True),
    )
    return heads

  def ablated_loss(
    self, params: Params, batch: Mapping[str, jax.Array], head_keep_LxH, head_mean_LxTxHxE
  ) -> jax.Array:
    """`loss` with heads mean-ablated: z ← keep·z + (1 − keep)·mean (a scalar).

    The `ablated_loss_fn` of `analysis.overlap`; `head_mean_LxTxHxE=None` zero-ablates.
    """
    return jnp.mean(self.per_token_loss(params, _tokens(batch), head_keep_LxH, head_mean_LxTxHxE))


def _tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  if not isinstance(batch, Mapping) or "tokens" not in batch:
    got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"batch must be a mapping with 'tokens' (int [B, T]); got {got}")
  return batch["tokens"]
