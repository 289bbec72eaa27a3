"""Structural metrics of in-context linear regression checkpoints (paper App. D.2).

Same batching as `behaviour`: checkpoints are indexed `checkpoint_chunk` at a
time, stacked (the last chunk padded) and evaluated by one jitted program that
vmaps over checkpoints. Weight metrics need no data; attention metrics use the
batch `behaviour.evaluation_data(task, key, batch_size)` (=
`sample_batch(key, task, batch_size, with_tasks=True)`), the same for every
checkpoint and the same as the behavioural metrics' for equal key and size.

`structure_metrics` returns `dict[str, np.ndarray]` whose entries all have the
leading checkpoint axis [N]. Entries of shape [N] are scalar columns (CSV them
with `behaviour.scalar_metrics`); the others are structured arrays.
Layers and heads are 0-indexed (`L0H1` = layer 0, head 1); the attention suffix
"" means all query positions, "x" the x-token queries and "y" the y-token
queries (the paper splits each head into an x part and a y part, D.2.3).

Embeddings (D.2.1–2):
  tok_embed_sv [N, r], tok_embed_sv_{i}   singular values of token_embed/kernel
                                           [V, d_model], descending, i 1-indexed.
  pos_embed_sv [N, r], pos_embed_sv_{i}   singular values of pos_embed [2K, d_model].
  {tok,pos}_embed_var_frac [N, r]         s_i² / Σ s² (variance explained).
  {tok,pos}_embed_rank                    #{i: s_i > sv_threshold · s_1}.
  {tok,pos}_embed_erank                   entropy effective rank exp(−Σ p log p),
                                           p_i = s_i / Σ s (Roy & Vetterli).
  embed_alignment                         mean squared cosine of the principal
                                           angles between the top-k right singular
                                           subspaces (in d_model space) of the two
                                           embeddings: ‖Q_tok Q_posᵀ‖²_F / k; 1 when
                                           they coincide, 0 when orthogonal, ≈ k/d
                                           for random subspaces. k = `subspace_dim`
                                           (default min(V, 2K, d_model)).
  embed_alignment_max_cos                 cosine of the smallest principal angle.
  embed_alignment_cos [N, k]              all principal cosines, descending.

Attention (D.2.3), α = attention pattern [B, H, T, S] of a layer; query t,
key s; "valid" queries are t ≥ 1 (more than one attended position):
  attn_entropy/L{l}H{h}{q}       H_t / log(t + 1), H_t = −Σ_s α_ts log α_ts,
                                 averaged over valid queries of type q and batch.
  attn_variability/…             Vig & Belinkov: Σ_{b,t,s} |α_ts(b) − ᾱ_ts| /
                                 (2 Σ_{b,t,s} α_ts(b)) over valid queries of type q,
                                 ᾱ the batch-mean pattern; 0 = input-independent.
  attn_self/…                    mean α_tt.
  attn_prev_token/…              mean α_{t,t−1}.
  attn_prev_x/…                  mean attention to the x-token of the previous
                                 pair, s = 2(⌊t/2⌋ − 1) (queries with t ≥ 2).
  attn_prev_y/…                  mean attention to the y-token of the previous
                                 pair, s = 2⌊t/2⌋ − 1 (queries with t ≥ 2; for an
                                 x-query this is also the previous token).
  attn_x_mass/…                  mean Σ_{s x-token} α_ts (x-attention score).
  attn_y_mass/…                  mean Σ_{s y-token} α_ts = 1 − x-mass.
  Each also as a structured array `attn_<score>` [N, L, H, 3] (last axis: all,
  x, y). `classify_heads` labels heads from these scores ([N, L, H, 3] strings
  from `HEAD_LABELS`, thresholds documented there); `head_labels` returns them as
  flat `head_class/L{l}H{h}{q}` -> [N] string columns.

Layer norms (D.2.5) for every LayerNorm n in block_{l}/ln_1, block_{l}/ln_2, ln_f:
  ln_collapse/{n}                fraction of |scale| ≤ collapse_threshold (times
                                 max |scale| when collapse_relative, the default).
  ln_scale_q{p}/{n}              p-th percentile of |scale| (p in `quantiles`).
  ln_scale_mean/{n}, ln_bias_std/{n}   mean scale, standard deviation of the bias.
  ln_scale/{n}, ln_bias/{n} [N, d_model]   the raw vectors.

Unembedding (D.2.4): the prediction channel 0 reads
  ŷ = (γ_f ⊙ LN₀(h))·W[:, 0] + β_f·W[:, 0] + b_0 = w_eff·LN₀(h) + b_eff,
  with LN₀ the normalisation without affine part, γ_f, β_f the ln_f scale and
  bias, W the unembed kernel [d_model, V] and b its bias:
  unembed_eff_weight [N, d_model]   w_eff = γ_f ⊙ W[:, 0].
  unembed_eff_bias                  b_eff = β_f·W[:, 0] + b_0.
  unembed_collapse                  collapse fraction of w_eff (as ln_collapse).
  unembed_w0_collapse               collapse fraction of W[:, 0] alone.
  unembed_eff_q{p}                  percentiles of |w_eff|.
  unembed_eff_norm                  ‖w_eff‖₂.

Reconstructed definitions (garbled in the paper text): the normalised entropy
divides by log of the number of attended (causal) positions; the alignment of
D.2.2 is measured by principal angles as above; the previous-x / previous-y
targets are those of the previous (x, y) pair; thresholds for "collapse" are
options because the paper leaves them open (D.2.6).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.special  # noqa: F401  (xlogy)
import numpy as np

from devinterp_jax.analysis.batching import map_checkpoints
from devinterp_jax.typing import head_name
from devinterp_jax.experiments.icl_regression.behaviour import evaluation_data
from devinterp_jax.data.regression import RegressionTask
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.typing import Params

QUERY_TYPES: tuple[str, ...] = ("", "x", "y")  # name suffixes: all, x-token, y-token queries
ATTENTION_SCORES: tuple[str, ...] = (
  "entropy",
  "variability",
  "self",
  "prev_token",
  "prev_x",
  "prev_y",
  "x_mass",
  "y_mass",
)
HEAD_LABELS: tuple[str, ...] = (
  "self",
  "previous-token",
  "previous-x",
  "previous-y",
  "x-attending",
  "y-attending",
  "diffuse",
  "constant",
  "mixed",
  "undefined",
)
DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)


# ----------------------------------------------------------------------------
# Pure functions on weights.
# ----------------------------------------------------------------------------


def singular_values(matrix_NxD: jax.Array) -> jax.Array:
  """Singular values, descending: [..., min(N, D)]."""
  return jnp.linalg.svd(matrix_NxD, compute_uv=False)


def effective_rank(sv_R: jax.Array) -> jax.Array:
  """Entropy effective rank exp(−Σ p log p), p = s / Σ s (0 for a zero matrix)."""
  total = jnp.sum(sv_R, axis=-1, keepdims=True)
  p_R = sv_R / jnp.where(total > 0, total, 1.0)
  erank = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p_R, p_R), axis=-1))
  return jnp.where(total[..., 0] > 0, erank, 0.0)


def rank_above(sv_R: jax.Array, fraction: float = 0.1) -> jax.Array:
  """Number of singular values above `fraction` times the largest."""
  return jnp.sum(sv_R > fraction * sv_R[..., :1], axis=-1)


def top_right_subspace(matrix_NxD: jax.Array, k: int) -> jax.Array:
  """Orthonormal basis [k, D] of the span of the top-k right singular vectors."""
  _, _, vt_RxD = jnp.linalg.svd(matrix_NxD, full_matrices=False)
  if k > vt_RxD.shape[-2]:
    raise ValueError(f"k={k} exceeds min(N, D) = {vt_RxD.shape[-2]} of a {matrix_NxD.shape} matrix")
  return vt_RxD[..., :k, :]


@functools.partial(jax.jit, static_argnames="k")
def subspace_alignment(a_NxD: jax.Array, b_MxD: jax.Array, k: int | None = None):
  """Alignment of the top-k right singular subspaces of two matrices (rows in R^D).

  Args:
    a_NxD, b_MxD: matrices whose row spaces are compared.
    k: subspace dimension (default min(N, M, D)).

  Returns:
    (mean squared principal cosine ‖Q_a Q_bᵀ‖²_F / k in [0, 1], principal cosines
    [k] descending).
  """
  if k is None:
    k = min(a_NxD.shape[-2], b_MxD.shape[-2], a_NxD.shape[-1])
  qa_KxD = top_right_subspace(a_NxD, k)
  qb_KxD = top_right_subspace(b_MxD, k)
  cos_K = jnp.clip(
    jnp.linalg.svd(qa_KxD @ jnp.swapaxes(qb_KxD, -1, -2), compute_uv=False), 0.0, 1.0
  )
  return jnp.sum(jnp.square(cos_K), axis=-1) / k, cos_K


def collapse_fraction(
  values_N: jax.Array, threshold: float = 0.1, relative: bool = True
) -> jax.Array:
  """Fraction of entries with |v| ≤ threshold (× max |v| when `relative`)."""
  abs_N = jnp.abs(values_N)
  cut = threshold * jnp.max(abs_N, axis=-1, keepdims=True) if relative else threshold
  return jnp.mean((abs_N <= cut).astype(jnp.float32), axis=-1)


def layer_norm_names(num_layers: int) -> list[str]:
  """ "block_{l}/ln_1", "block_{l}/ln_2" for every block, then "ln_f"."""
  return [f"block_{l}/{n}" for l in range(num_layers) for n in ("ln_1", "ln_2")] + ["ln_f"]


def _get(params: Params, path: str):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node


def unembedding_effective(params: Params):
  """(w_eff [d_model] = γ_f ⊙ W[:, 0], b_eff = β_f·W[:, 0] + b_0) of D.2.4."""
  w0_D = params["unembed"]["kernel"][:, 0]
  b0 = params["unembed"]["bias"][0] if "bias" in params["unembed"] else 0.0
  return params["ln_f"]["scale"] * w0_D, params["ln_f"]["bias"] @ w0_D + b0


# ----------------------------------------------------------------------------
# Pure functions on attention patterns.
# ----------------------------------------------------------------------------


def _query_masks(T: int):
  t = np.arange(T)
  valid = t >= 1
  types_QxT = np.stack([valid, valid & (t % 2 == 0), valid & (t % 2 == 1)]).astype(np.float32)
  pair_QxT = types_QxT * (t >= 2)
  return types_QxT, pair_QxT


def _target_one_hot(target_T: np.ndarray, T: int, S: int) -> np.ndarray:
  ok_T = (target_T >= 0) & (target_T < S)
  return ((np.arange(S)[None, :] == target_T[:, None]) & ok_T[:, None]).astype(np.float32)


def _attention_scores(attn_BxHxTxS: jax.Array) -> dict[str, jax.Array]:
  """Per-head scores of causal attention patterns [..., B, H, T, S] (T = S = 2K).

  Positions alternate x-token (even t) and y-token (odd t). Returns a dict over
  `ATTENTION_SCORES` of arrays [..., H, 3], the last axis over query types (all,
  x, y); see the module docstring for the definitions. NaN where a query type
  has no valid query.
  """
  attn = jnp.asarray(attn_BxHxTxS)
  *_, B, _, T, S = attn.shape
  types_QxT, pair_QxT = _query_masks(T)
  t = np.arange(T)
  s = np.arange(S)

  def mean_over(per_query_BxHxT, mask_QxT):
    num = jnp.einsum("...bht,qt->...hq", per_query_BxHxT, mask_QxT)
    den = B * mask_QxT.sum(-1)
    den = den.reshape((1,) * (num.ndim - 1) + den.shape)  # [..., 1, Q]
    return jnp.where(den > 0, num / np.where(den > 0, den, 1.0), jnp.nan)

  def to_target(target_T):
    return jnp.einsum("...ts,ts->...t", attn, _target_one_hot(target_T, T, S))

  log_n_T = np.log(np.maximum(t + 1, 2)).astype(np.float32)  # t = 0 is masked out anyway
  entropy_BxHxT = -jnp.sum(jax.scipy.special.xlogy(attn, attn), axis=-1) / log_n_T.reshape(
    (1,) * (attn.ndim - 2) + log_n_T.shape
  )
  mean_pattern = jnp.mean(attn, axis=-4, keepdims=True)
  abs_dev_BxHxT = jnp.sum(jnp.abs(attn - mean_pattern), axis=-1)
  mass_BxHxT = jnp.sum(attn, axis=-1)
  variability = jnp.einsum("...bht,qt->...hq", abs_dev_BxHxT, types_QxT) / (
    2 * jnp.einsum("...bht,qt->...hq", mass_BxHxT, types_QxT)
  )
  pair_T = t // 2
  x_keys_S = (s % 2 == 0).astype(np.float32)
  return {
    "entropy": mean_over(entropy_BxHxT, types_QxT),
    "variability": jnp.where(types_QxT.sum(-1) > 0, variability, jnp.nan),
    "self": mean_over(to_target(t), types_QxT),
    "prev_token": mean_over(to_target(t - 1), types_QxT),
    "prev_x": mean_over(to_target(2 * (pair_T - 1)), pair_QxT),
    "prev_y": mean_over(to_target(2 * pair_T - 1), pair_QxT),
    "x_mass": mean_over(attn @ x_keys_S, types_QxT),
    "y_mass": mean_over(attn @ (1.0 - x_keys_S), types_QxT),
  }


attention_scores = jax.jit(_attention_scores)


def classify_heads(
  scores: Mapping[str, Any],
  *,
  hard_threshold: float = 0.8,
  mass_threshold: float = 0.9,
  diffuse_threshold: float = 0.8,
  constant_threshold: float = 0.1,
) -> np.ndarray:
  """Labels heads (per query type) from `attention_scores` or `structure_metrics`.

  Rules, first match wins:
    1. "self", "previous-token", "previous-x", "previous-y": that score (mean
       attention on the single target) ≥ hard_threshold, tried in this order (for
       x-queries the previous token is the previous y-token: "previous-token").
    2. "x-attending" / "y-attending": x-mass / y-mass ≥ mass_threshold.
    3. "diffuse": normalised entropy ≥ diffuse_threshold.
    4. "constant": variability ≤ constant_threshold (content-independent, but no
       pattern above).
    5. "mixed" otherwise; "undefined" where the scores are NaN.

  Args:
    scores: arrays [..., H, 3] keyed by score name, with or without the "attn_"
      prefix (so a `structure_metrics` dict works: labels [N, L, H, 3]).

  Returns:
    String array of labels with the scores' shape.
  """

  def get(name):
    return np.asarray(scores[f"attn_{name}"] if f"attn_{name}" in scores else scores[name])

  entropy = get("entropy")
  conditions = [np.isnan(entropy)]
  labels = ["undefined"]
  for name, label in (
    ("self", "self"),
    ("prev_token", "previous-token"),
    ("prev_x", "previous-x"),
    ("prev_y", "previous-y"),
  ):
    conditions.append(np.nan_to_num(get(name)) >= hard_threshold)
    labels.append(label)
  conditions += [
    get("x_mass") >= mass_threshold,
    get("y_mass") >= mass_threshold,
    entropy >= diffuse_threshold,
    get("variability") <= constant_threshold,
  ]
  labels += ["x-attending", "y-attending", "diffuse", "constant"]
  return np.select(
    conditions, [np.full(entropy.shape, l, dtype=object) for l in labels], default="mixed"
  ).astype(str)


def head_labels(metrics: Mapping[str, np.ndarray], **thresholds) -> dict[str, np.ndarray]:
  """Flat `head_class/L{l}H{h}{q}` -> [N] labels from `structure_metrics` output."""
  labels_NxLxHxQ = classify_heads(metrics, **thresholds)
  _, L, H, _ = labels_NxLxHxQ.shape
  return {
    f"head_class/{head_name(l, h, q)}": labels_NxLxHxQ[:, l, h, i]
    for l in range(L)
    for h in range(H)
    for i, q in enumerate(QUERY_TYPES)
  }


# ----------------------------------------------------------------------------
# Metrics over checkpoints.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _structure_fn(
  model: RegressionTransformer,
  sv_threshold: float,
  subspace_dim: int,
  collapse_threshold: float,
  collapse_relative: bool,
  quantiles: tuple[float, ...],
  with_attention: bool,
):

  def fn(params, data):
    tok_VxD = params["token_embed"]["kernel"]
    pos_TxD = params["pos_embed"]
    out = {}
    for name, matrix in (("tok_embed", tok_VxD), ("pos_embed", pos_TxD)):
      sv_R = singular_values(matrix)
      out[f"{name}_sv"] = sv_R
      out[f"{name}_var_frac"] = jnp.square(sv_R) / jnp.maximum(jnp.sum(jnp.square(sv_R)), 1e-30)
      out[f"{name}_rank"] = rank_above(sv_R, sv_threshold)
      out[f"{name}_erank"] = effective_rank(sv_R)
    out["embed_alignment"], out["embed_alignment_cos"] = subspace_alignment(
      tok_VxD, pos_TxD, subspace_dim
    )
    out["embed_alignment_max_cos"] = out["embed_alignment_cos"][0]
    q = jnp.asarray(quantiles)
    for n in layer_norm_names(model.num_layers):
      ln = _get(params, n)
      out[f"ln_scale/{n}"], out[f"ln_bias/{n}"] = ln["scale"], ln["bias"]
      out[f"ln_collapse/{n}"] = collapse_fraction(
        ln["scale"], collapse_threshold, collapse_relative
      )
      out[f"ln_scale_quantiles/{n}"] = jnp.quantile(jnp.abs(ln["scale"]), q)
      out[f"ln_scale_mean/{n}"] = jnp.mean(ln["scale"])
      out[f"ln_bias_std/{n}"] = jnp.std(ln["bias"])
    w_eff_D, b_eff = unembedding_effective(params)
    out["unembed_eff_weight"], out["unembed_eff_bias"] = w_eff_D, b_eff
    out["unembed_collapse"] = collapse_fraction(w_eff_D, collapse_threshold, collapse_relative)
    out["unembed_w0_collapse"] = collapse_fraction(
      params["unembed"]["kernel"][:, 0], collapse_threshold, collapse_relative
    )
    out["unembed_eff_quantiles"] = jnp.quantile(jnp.abs(w_eff_D), q)
    out["unembed_eff_norm"] = jnp.linalg.norm(w_eff_D)
    if with_attention:
      _, attn_LxBxHxTxS = model.predict(params, data["xs"], data["ys"], return_attention=True)
      if attn_LxBxHxTxS is None:
        raise RuntimeError("model.predict(return_attention=True) returned no attention weights")
      for score, value_LxHxQ in _attention_scores(attn_LxBxHxTxS).items():
        out[f"attn_{score}"] = value_LxHxQ
    return out

  return fn


def _percent_name(q: float) -> str:
  return f"{100 * q:g}"


def structure_metrics(
  model: RegressionTransformer,
  params_list: Sequence[Params],
  task: RegressionTask | None = None,
  key: jax.Array | None = None,
  batch_size: int = 256,
  *,
  checkpoint_chunk: int = 8,
  sv_threshold: float = 0.1,
  subspace_dim: int | None = None,
  collapse_threshold: float = 0.1,
  collapse_relative: bool = True,
  quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, np.ndarray]:
  """Structural metrics of every checkpoint (see the module docstring).

  Args:
    model: the RegressionTransformer the checkpoints belong to.
    params_list: param pytrees, one per checkpoint (indexed chunk by chunk).
    task, key: the attention batch is `evaluation_data(task, key, batch_size)`;
      with `task=None` or `key=None` the attention metrics are skipped.
    batch_size: sequences for the attention metrics.
    checkpoint_chunk: checkpoints per compiled call.
    sv_threshold: `*_embed_rank` counts singular values above this × the largest.
    subspace_dim: k of `embed_alignment` (default min(V, 2K, d_model)).
    collapse_threshold, collapse_relative: a scale "collapsed" when
      |γ| ≤ threshold (× max |γ| when relative).
    quantiles: percentiles of |scale| reported per LayerNorm and for w_eff.

  Returns:
    Dict name -> array with leading axis [N]; [N]-shaped entries are the CSV
    columns, the others structured.
  """
  with_attention = task is not None and key is not None
  V, T, D = model.task_size + 1, 2 * model.max_examples, model.d_model
  k = min(V, T, D) if subspace_dim is None else int(subspace_dim)
  if not 1 <= k <= min(V, T, D):
    raise ValueError(f"subspace_dim must be in [1, {min(V, T, D)}], got {subspace_dim}")
  quantiles = tuple(float(q) for q in quantiles)
  data = None
  if task is not None and key is not None:  # with_attention
    if task.task_size != model.task_size or task.max_examples > model.max_examples:
      raise ValueError("task does not fit the model")
    batch = evaluation_data(task, key, batch_size)
    data = {"xs": batch["xs"], "ys": batch["ys"]}
  # lru_cache key: flax makes every Module a dataclass(unsafe_hash=True), which pyright misses.
  fn = _structure_fn(
    model,  # pyright: ignore[reportArgumentType]  (hashable)
    float(sv_threshold),
    k,
    float(collapse_threshold),
    bool(collapse_relative),
    quantiles,
    with_attention,
  )
  raw = map_checkpoints(fn, params_list, data, checkpoint_chunk=checkpoint_chunk)
  out: dict[str, np.ndarray] = {}
  for name in ("tok_embed", "pos_embed"):
    out[f"{name}_sv"] = raw[f"{name}_sv"]
    for i in range(raw[f"{name}_sv"].shape[1]):
      out[f"{name}_sv_{i + 1}"] = raw[f"{name}_sv"][:, i]
    out[f"{name}_var_frac"] = raw[f"{name}_var_frac"]
    out[f"{name}_rank"] = raw[f"{name}_rank"]
    out[f"{name}_erank"] = raw[f"{name}_erank"]
  for name in ("embed_alignment", "embed_alignment_max_cos", "embed_alignment_cos"):
    out[name] = raw[name]
  if with_attention:
    L, H = raw["attn_entropy"].shape[1:3]
    for score in ATTENTION_SCORES:
      arr_NxLxHxQ = raw[f"attn_{score}"]
      out[f"attn_{score}"] = arr_NxLxHxQ
      for l in range(L):
        for h in range(H):
          for i, qt in enumerate(QUERY_TYPES):
            out[f"attn_{score}/{head_name(l, h, qt)}"] = arr_NxLxHxQ[:, l, h, i]
  for n in layer_norm_names(model.num_layers):
    out[f"ln_collapse/{n}"] = raw[f"ln_collapse/{n}"]
    for j, q in enumerate(quantiles):
      out[f"ln_scale_q{_percent_name(q)}/{n}"] = raw[f"ln_scale_quantiles/{n}"][:, j]
    out[f"ln_scale_mean/{n}"] = raw[f"ln_scale_mean/{n}"]
    out[f"ln_bias_std/{n}"] = raw[f"ln_bias_std/{n}"]
    out[f"ln_scale/{n}"] = raw[f"ln_scale/{n}"]
    out[f"ln_bias/{n}"] = raw[f"ln_bias/{n}"]
  for name in (
    "unembed_eff_weight",
    "unembed_eff_bias",
    "unembed_collapse",
    "unembed_w0_collapse",
    "unembed_eff_norm",
  ):
    out[name] = raw[name]
  for j, q in enumerate(quantiles):
    out[f"unembed_eff_q{_percent_name(q)}"] = raw["unembed_eff_quantiles"][:, j]
  return out
