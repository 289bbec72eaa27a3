"""Developmental metrics of language-model checkpoints (paper App. C).

Every metric is computed on the same data for every checkpoint: validation
contexts `validation_tokens` int [N, T] (BOS at position 0), probe sequences
drawn once from `key`, and statistics of the training tokens computed once on
the host. Checkpoints are evaluated `checkpoint_chunk` at a time in one jitted
program that vmaps over checkpoints (`batching.map_checkpoints`); inside it
the sequences go through the model `eval_batch` / `_SHORT_BATCH` /
`_ATTN_BATCH` at a time (`lax.map`), so memory is bounded whatever N.

Token positions are 0-indexed with BOS at 0; "the loss at token p" is the loss
of predicting x_p from x_0..x_{p−1}, i.e. `per_token_loss[:, p − 1]`. Layers
and heads are 0-indexed (`L0H1` = layer 0, head 1).

`lm_metrics` returns `dict[str, np.ndarray]`, every entry with the leading
checkpoint axis [N]; entries of shape [N] are the CSV columns (per-head scores
also appear flat as `<name>/L{l}H{h}`). Entries:

Bigram statistics (C.1.1). P̂(b | a) is the plug-in bigram distribution of the
training tokens (pairs within contexts, BOS as a predecessor included; rows of
predecessors never seen are undefined), H_a = H(P̂(· | a)).
  loss                  mean validation next-token loss over all positions.
  bigram_entropy        plug-in H(x_t | x_{t−1}) of the training tokens
                        (= `synthetic_text.bigram_entropy`), constant over [N].
  bigram_gap            loss − bigram_entropy.
  bigram_score          the paper's score: mean over validation positions t
                        (0 ≤ t ≤ T−2, x_t a seen predecessor) of the cross-entropy
                        −Σ_b P̂(b | x_t) log q_θ(b | x_0..x_t).
  bigram_score_floor    its minimum, the mean of H_{x_t} over the same positions
                        (constant; ≈ bigram_entropy).
  bigram_kl             bigram_score − bigram_score_floor = mean KL(P̂(·|x_t) ‖ q_θ) ≥ 0.
  bigram_kl_pos1        the context-free version: Σ_a w_a KL(P̂(· | a) ‖ q_θ(· | BOS, a)),
                        the model's distribution at position 1 of [BOS, a]; w_a ∝ the
                        count of a (≠ BOS, seen in training) at validation positions
                        1..T−2 (as a predecessor). 0 iff the model predicts bigrams.
n-gram scores (C.1.2), for each n of the common n-grams (default 2, 3, 4):
  val_loss_pos{n}       mean validation loss at token n (per-position loss[n − 1]).
  ngram_loss_{n}        mean over the common n-grams g of the loss on g_n in the
                        context [BOS, g_1, …, g_n].
  ngram_score_{n}       val_loss_pos{n} / max(ngram_loss_{n}, ngram_loss_floor): ≈ 1
                        at initialisation, large when the n-grams are memorised. The
                        floor (default 1e-3 nats) keeps a perfect n-gram predictor
                        finite (its score is val_loss_pos{n} / floor).
  Common n-grams: the corpus's planted n-grams (passed as `common_ngrams`), else the
  `num_common_ngrams` most frequent n-grams of the training tokens (`common_ngrams`).
ICL score (C.1.3, REFERENCE.md):
  icl_score             loss at token p_late − loss at token p_early.
  icl_early_position, icl_late_position   p_early, p_late (constant); fractions f
                        of `icl_positions` map to p = clip(round(f·T), 1, T−1)
                        (51, 512 at T = 1024); pass ints (50, 500) for absolute tokens.
  loss_per_position [N, T−1]   mean validation loss at tokens 1 … T−1.
Positional embedding (C.2.1):
  pos_ablated_loss      mean validation loss with W_pos replaced by its mean over all
                        context_length positions (`model.logits(pos_ablation=True)`).
  pos_ablation_loss [N, T−1]   per-position ablated − clean loss (tokens 1 … T−1).
  pos_ablation_loss_mean       its mean over positions (= pos_ablated_loss − loss).
  pos_pca_var_ratio [N, k]     PCA explained-variance ratios of W_pos
                        [context_length, D] (rows centred over positions),
                        s_i² / Σ_j s_j² over all components, descending.
  pos_pca_top1/2/3      cumulative ratio of the top 1/2/3 components.
  pos_embed_norm [N, context_length]   ‖W_pos[t]‖₂.
Attention heads (C.2.3–4), α the attention pattern of a head (query t, key s):
  prev_token_score [N, L, H]   mean α_{t, t−1} over `prev_token_batch` sequences
                        [BOS, r_1..r_{P−1}] of P = min(context_length, 64) tokens,
                        r_i uniform over 1..V−1, and over the queries t with
                        max(2, P/4 − 1) ≤ t ≤ P − 1. By causality, query t sees exactly
                        the prefix of length t + 1, so this is the paper's last-token
                        score on sequences of uniformly random length P/4 … P (16–64 at
                        P = 64), with prefixes shared; t ≥ 2 leaves out the BOS key.
  prev_token_chance     mean over those queries of 1/(t + 1) (uniform causal attention).
  prefix_score [N, L, H]   the standard induction test: `prefix_batch` sequences
                        [BOS, r_1..r_m, r_1..r_m], P = min(context_length, 128),
                        m = (P − 1) // 2, the block's tokens distinct (drawn without
                        replacement from 1..V−1 when m < V). Mean attention from the
                        second occurrence of r_i (t = m + i) to the token after its
                        first occurrence (s = i + 1), over i = 1..m: every query is an
                        `… A B … A` instance of the paper.
  prefix_chance         mean over those queries of 1/(t + 1).
  prev_token_score_max  max over all heads; prefix_score_max: max over layers ≥ 1
                        (NaN for a one-layer model).
Composition (C.2.2; Elhage et al. 2021), layer-0 head i → layer-1 head j, from the
weights only in the row-vector residual basis: W_OV = W_V W_O [D, D] (a head writes
z W_OV), W_QK = W_Q W_Kᵀ [D, D] (scores x_q W_QK x_kᵀ):
  comp_q [N, H, H]      ‖W_OV^i W_QK^j‖_F / (‖W_OV^i‖_F ‖W_QK^j‖_F)  (queries read i)
  comp_k [N, H, H]      ‖W_QK^j (W_OV^i)ᵀ‖_F / (…)                    (keys read i)
  comp_v [N, H, H]      ‖W_OV^i W_OV^j‖_F / (‖W_OV^i‖_F ‖W_OV^j‖_F)  (values read i)
  comp_k/L0H{i}_L1H{j}  the K-composition as flat columns (paper Fig. C.4).
  Each lies in [0, 1] (submultiplicativity), 1 only for rank-1 matrices whose
  written and read directions coincide; 0/0 gives 0. LayerNorm (its scales, its
  centring) and the Shortformer W_pos added to the query/key inputs are ignored,
  and so are the biases.

`classify_lm_heads` labels heads 'previous_token' / 'induction' / 'other';
`milestones` gives the steps at which the metrics cross their thresholds;
`devinterp_jax.viz.lm.plot_lm_metrics` draws them over training.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from devinterp_jax.analysis.batching import map_checkpoints
from devinterp_jax.typing import head_name
from devinterp_jax.data.synthetic_text import BOS_ID
from devinterp_jax.typing import Params

NGRAM_ORDERS: tuple[int, ...] = (2, 3, 4)
PREV_TOKEN_LENGTH = 64  # probe length cap (paper: lengths 16–64)
PREFIX_LENGTH = 128  # probe length cap (paper: 128)
_SHORT_BATCH = 256  # n-gram and [BOS, a] probes per forward pass
_ATTN_BATCH = 32  # attention-probe sequences per forward pass


# ----------------------------------------------------------------------------
# Host-side statistics of the training tokens.
# ----------------------------------------------------------------------------


_HOST_CHUNK = 4096  # contexts per host-side counting step (bounds memory on large splits)


def _contexts(tokens: Any) -> np.ndarray:
  toks = np.asarray(tokens)
  if toks.ndim < 1:
    raise ValueError("tokens must be contexts [..., T], got a scalar")
  return toks.reshape(-1, toks.shape[-1])


def bigram_distribution(tokens: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Plug-in bigram distribution of token contexts [..., T] (counted in chunks).

  Returns:
    (P̂ float32 [V, V] with P̂[a, b] = #(a b) / #(a ·) over pairs within contexts,
    rows of unseen predecessors all zero; predecessor counts int64 [V]).
  """
  toks = _contexts(tokens)
  V = int(vocab_size)
  if toks.shape[-1] < 2:
    raise ValueError(f"tokens have shape {np.shape(tokens)}; want contexts with T >= 2")
  counts = np.zeros(V * V, np.int64)
  for lo in range(0, len(toks), _HOST_CHUNK):
    x = np.asarray(toks[lo : lo + _HOST_CHUNK], np.int64)
    if x.size and (x.min() < 0 or x.max() >= V):
      raise ValueError(f"token ids span [{x.min()}, {x.max()}], outside [0, {V})")
    counts += np.bincount((x[:, :-1] * V + x[:, 1:]).ravel(), minlength=V * V)
  counts = counts.reshape(V, V)
  prev = counts.sum(axis=1)
  probs = (counts / np.maximum(prev, 1)[:, None]).astype(np.float32)
  return probs, prev


def row_entropies(probs_VxV: Any) -> np.ndarray:
  """H(P̂(· | a)) in nats for every row a: float64 [V] (0 for an all-zero row)."""
  p = np.asarray(probs_VxV, np.float64)
  logp = np.log(np.where(p > 0, p, 1.0))
  return -np.sum(p * logp, axis=1)


def conditional_entropy(probs_VxV: Any, prev_counts: Any) -> float:
  """Σ_a (n_a / Σ n) H(P̂(· | a)): the plug-in H(x_t | x_{t−1}) from `bigram_distribution`.

  Equals `synthetic_text.bigram_entropy` of the same tokens.
  """
  n = np.asarray(prev_counts, np.float64)
  return float(np.sum(n * row_entropies(probs_VxV)) / max(n.sum(), 1.0))


def common_ngrams(
  tokens: Any,
  n: int,
  k: int = 1000,
  *,
  exclude: Sequence[int] = (BOS_ID,),
  return_counts: bool = False,
):
  """The k most frequent n-grams (windows within contexts [..., T]) of `tokens`.

  Windows containing a token of `exclude` (default BOS) are skipped. Ties are
  broken by the n-gram's lexicographic order, so the result is deterministic.
  Counted `_HOST_CHUNK` contexts at a time.

  Returns:
    int32 [min(k, #distinct), n], most frequent first (and int64 counts with
    `return_counts`).
  """
  if n < 1 or k < 0:
    raise ValueError(f"need n >= 1 and k >= 0, got n={n}, k={k}")
  toks = _contexts(tokens)
  empty = np.zeros((0, n), np.int32)
  if toks.shape[-1] < n or not toks.size:
    return (empty, np.zeros(0, np.int64)) if return_counts else empty
  base = int(toks.max()) + 1
  packed = base**n < 2**62  # encode an n-gram as one int64 (lexicographic order kept)
  grams = np.zeros((0,) if packed else (0, n), np.int64)
  counts = np.zeros(0, np.int64)
  for lo in range(0, len(toks), _HOST_CHUNK):
    w = np.lib.stride_tricks.sliding_window_view(
      np.asarray(toks[lo : lo + _HOST_CHUNK], np.int64), n, axis=-1
    ).reshape(-1, n)
    if len(exclude):
      w = w[~np.isin(w, np.asarray(exclude)).any(axis=1)]
    if packed:
      w = w @ (base ** np.arange(n - 1, -1, -1, dtype=np.int64))
    g, c = np.unique(w, axis=None if packed else 0, return_counts=True)
    g, inv = np.unique(np.concatenate([grams, g]), axis=None if packed else 0, return_inverse=True)
    counts = np.bincount(inv.ravel(), weights=np.concatenate([counts, c]), minlength=len(g)).astype(
      np.int64
    )
    grams = g
  order = np.argsort(-counts, kind="stable")[:k]  # np.unique sorts lexicographically
  top = grams[order]
  if packed:
    top = (top[:, None] // (base ** np.arange(n - 1, -1, -1, dtype=np.int64))) % base
  out = top.reshape(-1, n).astype(np.int32)
  return (out, counts[order]) if return_counts else out


_common_ngrams = common_ngrams  # `lm_metrics` shadows the name with its argument


def head_probe_tokens(
  key: jax.Array,
  vocab_size: int,
  context_length: int,
  prev_token_batch: int = 512,
  prefix_batch: int = 512,
  *,
  bos_id: int = BOS_ID,
) -> dict[str, np.ndarray]:
  """The synthetic sequences of the head scores (module docstring), from `key` only.
  The random tokens r_i are never `bos_id` (the dataset's BOS, `lm_dataset` metadata).

  Returns:
    {'prev_token': int32 [B1, min(context_length, 64)] = [BOS, r_1..], 'prefix':
    int32 [B2, 2m + 1] = [BOS, r_1..r_m, r_1..r_m], m = (min(context_length, 128) − 1) // 2}.
  """
  V = int(vocab_size)
  if V < 3:
    raise ValueError(f"vocab_size must be >= 3 for the head probes, got {V}")
  if context_length < 5:
    raise ValueError(f"context_length must be >= 5 for the head probes, got {context_length}")
  if prev_token_batch < 1 or prefix_batch < 1:
    raise ValueError(f"probe batches must be >= 1, got {prev_token_batch}, {prefix_batch}")
  if not 0 <= bos_id < V:
    raise ValueError(f"bos_id {bos_id} is outside the vocabulary [0, {V})")
  # Draws over the V − 1 non-BOS ids: i -> i, or i + 1 from BOS on.
  skip_bos = lambda ids: (ids + (ids >= bos_id)).astype(np.int32)  # noqa: E731
  k_prev, k_block = jax.random.split(key)
  p1 = min(int(context_length), PREV_TOKEN_LENGTH)
  body = skip_bos(np.asarray(jax.random.randint(k_prev, (prev_token_batch, p1 - 1), 0, V - 1)))
  prev = np.concatenate([np.full((prev_token_batch, 1), bos_id, np.int32), body], axis=1)
  m = (min(int(context_length), PREFIX_LENGTH) - 1) // 2
  if m <= V - 1:  # distinct tokens: the first occurrence of each is unique
    noise = jax.random.uniform(k_block, (prefix_batch, V - 1))
    block = skip_bos(np.asarray(jnp.argsort(noise, axis=1)[:, :m]))
  else:
    block = skip_bos(np.asarray(jax.random.randint(k_block, (prefix_batch, m), 0, V - 1)))
  prefix = np.concatenate([np.full((prefix_batch, 1), bos_id, np.int32), block, block], axis=1)
  return {"prev_token": prev, "prefix": prefix}


def prev_token_queries(length: int) -> np.ndarray:
  """Query positions of the previous-token score on probes of `length` tokens."""
  return np.arange(max(2, length // 4 - 1), length)


def prefix_queries(length: int) -> tuple[np.ndarray, np.ndarray]:
  """(queries t = m + 1 … 2m, targets t − m + 1) for [BOS, block, block], length 2m + 1."""
  m = (length - 1) // 2
  t = np.arange(m + 1, 2 * m + 1)
  return t, t - m + 1


def chance_level(query_positions: Any) -> float:
  """Mean attention on one key under uniform causal attention: mean 1/(t + 1)."""
  t = np.asarray(query_positions, np.float64)
  return float(np.mean(1.0 / (t + 1))) if t.size else float("nan")


# ----------------------------------------------------------------------------
# Pure functions on attention patterns and weights.
# ----------------------------------------------------------------------------


def _prev_token_rows(attn, first_query: int):
  """Per-sequence mean α_{t, t−1} over t ≥ first_query: attn [..., B, H, T, S] -> [..., B, H]."""
  diag = jnp.diagonal(attn, offset=-1, axis1=-2, axis2=-1)  # [..., T−1], entry i: α_{i+1, i}
  return jnp.mean(diag[..., first_query - 1 :], axis=-1)


def _prefix_rows(attn, block_length: int):
  """Per-sequence mean α_{t, t−m+1} over t = m+1 … 2m: attn [..., B, H, T, S] -> [..., B, H]."""
  m = block_length
  diag = jnp.diagonal(attn, offset=-(m - 1), axis1=-2, axis2=-1)  # entry i: α_{i+m−1, i}
  return jnp.mean(diag[..., 2 : m + 2], axis=-1)


def previous_token_scores(attn_BxHxTxS: Any, first_query: int | None = None) -> jax.Array:
  """Mean attention to the previous token: attn [..., B, H, T, S] -> [..., H].

  Averages α_{t, t−1} over the batch and the queries t = first_query … T − 1
  (default `prev_token_queries(T)[0]` = max(2, T/4 − 1), as `lm_metrics`).
  """
  attn = jnp.asarray(attn_BxHxTxS)
  T = attn.shape[-2]
  first = int(prev_token_queries(T)[0]) if first_query is None else int(first_query)
  if not 1 <= first <= T - 1:
    raise ValueError(f"first_query must be in [1, {T - 1}], got {first}")
  return jnp.mean(_prev_token_rows(attn, first), axis=-2)


def prefix_matching_scores(attn_BxHxTxS: Any, block_length: int | None = None) -> jax.Array:
  """Prefix-matching scores on [BOS, block, block] probes: attn [..., B, H, T, S] -> [..., H].

  Averages over the batch and over i = 1..m the attention from the second
  occurrence of block token i (t = m + i) to position i + 1, the token after its
  first occurrence; m = (T − 1) // 2 unless given.
  """
  attn = jnp.asarray(attn_BxHxTxS)
  T = attn.shape[-2]
  m = (T - 1) // 2 if block_length is None else int(block_length)
  if m < 2 or 2 * m + 1 > T:
    raise ValueError(f"block_length {m} does not fit {T} positions (need 2 <= m, 2m + 1 <= T)")
  return jnp.mean(_prefix_rows(attn, m), axis=-2)


def _frobenius(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def head_circuits(params: Params, layer: int) -> tuple[jax.Array, jax.Array]:
  """(W_OV [H, D, D] = W_V W_O, W_QK [H, D, D] = W_Q W_Kᵀ) of a layer, row-vector basis."""
  attn = params[f"block_{layer}"]["attn"]
  w_ov = jnp.einsum("dhe,hef->hdf", attn["w_v"], attn["w_o"])
  w_qk = jnp.einsum("dhe,fhe->hdf", attn["w_q"], attn["w_k"])
  return w_ov, w_qk


def composition_scores(
  params: Params, layer_from: int = 0, layer_to: int = 1
) -> dict[str, jax.Array]:
  """Q/K/V composition of every head of `layer_from` into every head of `layer_to`.

  Returns {'q', 'k', 'v'}: float [H_from, H_to] in [0, 1] (definitions in the
  module docstring; weights only, LayerNorm and W_pos ignored).
  """
  ov0, _ = head_circuits(params, layer_from)
  ov1, qk1 = head_circuits(params, layer_to)
  n_ov0, n_ov1, n_qk1 = _frobenius(ov0), _frobenius(ov1), _frobenius(qk1)
  q = _frobenius(jnp.einsum("ide,jef->ijdf", ov0, qk1))
  k = _frobenius(jnp.einsum("jde,ife->ijdf", qk1, ov0))
  v = _frobenius(jnp.einsum("ide,jef->ijdf", ov0, ov1))
  qk_den = n_ov0[:, None] * n_qk1[None, :]
  return {
    "q": jnp.clip(_ratio(q, qk_den), 0.0, 1.0),
    "k": jnp.clip(_ratio(k, qk_den), 0.0, 1.0),
    "v": jnp.clip(_ratio(v, n_ov0[:, None] * n_ov1[None, :]), 0.0, 1.0),
  }


def pca_explained_variance(matrix_TxD: Any, k: int | None = None) -> jax.Array:
  """PCA explained-variance ratios of the rows of [..., T, D] (centred over rows): [..., k].

  s_i² / Σ_j s_j² for the top k (default all min(T, D)) singular values of the
  centred matrix, descending; all zero for a constant matrix.
  """
  x = jnp.asarray(matrix_TxD, jnp.float32)
  x = x - jnp.mean(x, axis=-2, keepdims=True)
  sv = jnp.linalg.svd(x, compute_uv=False)
  var = jnp.square(sv)
  total = jnp.sum(var, axis=-1, keepdims=True)
  ratio = jnp.where(total > 0, var / jnp.where(total > 0, total, 1.0), 0.0)
  return ratio if k is None else ratio[..., :k]


def ngram_scores(val_loss: Any, ngram_loss: Any, floor: float = 1e-3) -> np.ndarray:
  """val_loss / max(ngram_loss, floor) (finite for a perfect n-gram predictor)."""
  return np.asarray(val_loss, np.float64) / np.maximum(np.asarray(ngram_loss, np.float64), floor)


def resolve_positions(positions: Sequence[float | int], length: int) -> tuple[int, ...]:
  """Token indices of `icl_positions`: ints as given, floats f as round(f·T), in [1, T−1]."""
  out = []
  for p in positions:
    if isinstance(p, (numbers.Integral, np.integer)) and not isinstance(p, bool):
      idx = int(p)
    else:
      f = float(p)
      if not 0.0 <= f <= 1.0:
        raise ValueError(f"fractional ICL positions must lie in [0, 1], got {p}")
      idx = int(np.clip(round(f * length), 1, length - 1))
    if not 1 <= idx <= length - 1:
      raise ValueError(
        f"ICL position {p} -> token {idx}, outside [1, {length - 1}] for "
        f"contexts of {length} tokens"
      )
    out.append(idx)
  return tuple(out)


# ----------------------------------------------------------------------------
# The per-checkpoint program.
# ----------------------------------------------------------------------------


def _map_rows(f, rows, batch: int):
  """f (written for a batch of rows) over the leading axis of the pytree `rows`,
  `batch` rows per call (`lax.map`'s batch_size)."""
  N = jax.tree.leaves(rows)[0].shape[0]
  one_row = lambda row: jax.tree.map(lambda o: o[0], f(jax.tree.map(lambda x: x[None], row)))
  return jax.lax.map(one_row, rows, batch_size=max(1, min(int(batch), N)))


def _log_probs(model, params, tokens):
  logits = model.logits(params, tokens)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _nll(logp_BxTxV, tokens_BxT):
  return -jnp.take_along_axis(logp_BxTxV[:, :-1], tokens_BxT[:, 1:, None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=32)
def _lm_fn(model, eval_batch: int, pca_k: int, prev_length: int, block_length: int):
  """Per-checkpoint metrics; `data` entries 'bigram' and 'short' are optional.

  Four model traces: validation (clean and W_pos-ablated), the short probes
  ([BOS, g_1..g_n] n-gram rows and [BOS, a] rows, padded to one length), and
  the attention probes (previous-token and prefix rows, padded to one length;
  causality makes the padding after a probe irrelevant).
  """

  def fn(params, data):
    out = {}
    bigram = data.get("bigram")

    def val_rows(rows):
      toks = rows["tokens"]
      logp = _log_probs(model, params, toks)
      res = {
        "nll": _nll(logp, toks),
        "nll_abl": model.per_token_loss(params, toks, pos_ablation=True),
      }
      if bigram is not None:
        p_hat = bigram["probs"][toks[:, :-1]]  # [b, T−1, V]
        ce = -jnp.sum(p_hat * logp[:, :-1], axis=-1)
        res["ce_sum"] = jnp.sum(ce * rows["mask"], axis=-1)
      return res

    rows = {"tokens": data["val"]}
    if bigram is not None:
      rows["mask"] = bigram["mask"]
    r = _map_rows(val_rows, rows, eval_batch)
    out["loss_per_position"] = jnp.mean(r["nll"], axis=0)
    out["pos_ablated_per_position"] = jnp.mean(r["nll_abl"], axis=0)
    if bigram is not None:
      out["bigram_score"] = jnp.sum(r["ce_sum"]) / jnp.maximum(jnp.sum(bigram["mask"]), 1.0)

    if "short" in data:
      sh = data["short"]

      def short_rows(rows):
        seq, last = rows["seqs"], rows["last"]
        logp = _log_probs(model, params, seq)  # [b, S, V]
        lp = jnp.take_along_axis(logp, (last - 1)[:, None, None], axis=1)[:, 0]  # [b, V]
        target = jnp.take_along_axis(seq, last[:, None], axis=1)
        res = {"nll": -jnp.take_along_axis(lp, target, axis=1)[:, 0]}
        if bigram is not None:
          context = jnp.take_along_axis(seq, (last - 1)[:, None], axis=1)[:, 0]
          res["ce"] = -jnp.sum(bigram["probs"][context] * lp, axis=-1)
        return res

      r = _map_rows(short_rows, {"seqs": sh["seqs"], "last": sh["last"]}, _SHORT_BATCH)
      out["ngram_loss"] = r["nll"] @ sh["ngram_weights"]  # [G]
      if bigram is not None:
        out["bigram_kl_pos1"] = jnp.sum(sh["pos1_weights"] * (r["ce"] - sh["pos1_entropy"]))

    probes = data["probes"]
    first = int(prev_token_queries(prev_length)[0])

    def attention_rows(toks):
      attn = model.attention_patterns(params, toks).astype(jnp.float32)  # [L, b, H, P, P]
      prev = _prev_token_rows(attn[..., :prev_length, :prev_length], first)
      return {
        "prev": jnp.moveaxis(prev, 1, 0),  # [b, L, H]
        "prefix": jnp.moveaxis(_prefix_rows(attn, block_length), 1, 0),
      }

    r = _map_rows(attention_rows, probes["tokens"], _ATTN_BATCH)
    out["prev_token_score"] = jnp.einsum("r,rlh->lh", probes["is_prev"], r["prev"])
    out["prefix_score"] = jnp.einsum("r,rlh->lh", probes["is_prefix"], r["prefix"])

    w_pos = params["pos_embed"]
    out["pos_pca_var_ratio"] = pca_explained_variance(w_pos, pca_k)
    out["pos_embed_norm"] = jnp.linalg.norm(w_pos.astype(jnp.float32), axis=-1)
    if model.num_layers >= 2:
      for kind, value in composition_scores(params, 0, 1).items():
        out[f"comp_{kind}"] = value
    return out

  return fn


def _bigram_data(
  val: np.ndarray, probs: np.ndarray, vocab_size: int, bos_id: int
) -> dict[str, Any]:
  """P̂, the validation mask and floor, and the [BOS, a] rows with weights and entropies."""
  probs = np.asarray(probs, np.float32)
  if probs.shape != (vocab_size, vocab_size):
    raise ValueError(f"bigram_probs has shape {probs.shape}, want ({vocab_size}, {vocab_size})")
  seen = probs.sum(axis=1) > 0
  ent = row_entropies(probs)
  prev_tok = val[:, :-1]
  mask = seen[prev_tok].astype(np.float32)  # [N, T−1]
  floor = float(np.sum(mask * ent[prev_tok]) / max(mask.sum(), 1.0))
  counts = np.bincount(val[:, 1:-1].ravel(), minlength=vocab_size).astype(np.float64)
  counts[bos_id] = 0.0
  counts[~seen] = 0.0
  a = np.flatnonzero(counts > 0)
  weights = counts[a] / counts[a].sum() if a.size else np.zeros(0)
  return {
    "probs": probs,
    "mask": mask,
    "floor": floor,
    "pos1_tokens": a.astype(np.int32),
    "pos1_weights": weights,
    "pos1_entropy": ent[a],
  }


def _short_data(
  grams: Mapping[int, Any] | None,
  bigram: Mapping[str, Any] | None,
  T: int,
  context_length: int,
  vocab_size: int,
  bos_id: int,
) -> tuple[list[int], dict | None]:
  """The n-gram rows [BOS, g_1..g_n] and the [BOS, a] rows, padded with BOS to one length.

  'last' is the index of the predicted token (n, or 2 for [BOS, a, ·] whose
  prediction at position 1 is compared with P̂(· | a)); 'ngram_weights' [R, G]
  average each order's rows, 'pos1_weights' [R] the [BOS, a] rows.
  """
  orders = sorted(int(n) for n in grams) if grams else []
  a = bigram["pos1_tokens"] if bigram is not None else np.zeros(0, np.int32)
  if not orders and not a.size:
    return orders, None
  seq_len = max([2] + [n + 1 for n in orders])
  if seq_len > context_length:
    raise ValueError(
      f"{max(orders)}-grams need {seq_len} tokens with BOS; the context holds {context_length}"
    )
  seqs, last = [], []
  gram_rows: Mapping[int, Any] = grams or {}  # orders is empty without grams
  for n in orders:
    arr = np.asarray(gram_rows[n], np.int64).reshape(-1, n)
    if n > T - 1:
      raise ValueError(f"n = {n} needs validation contexts of >= {n + 1} tokens, got {T}")
    if arr.min() < 0 or arr.max() >= vocab_size:
      raise ValueError(f"{n}-gram ids outside [0, {vocab_size})")
    s = np.full((len(arr), seq_len), bos_id, np.int32)
    s[:, 1 : n + 1] = arr
    seqs.append(s)
    last.append(np.full(len(arr), n))
  pos1 = np.full((len(a), seq_len), bos_id, np.int32)
  pos1[:, 1] = a
  seqs.append(pos1)
  last.append(np.full(len(a), 2))
  sizes = [len(s) for s in seqs]
  R = sum(sizes)
  ngram_weights = np.zeros((R, len(orders)), np.float32)
  lo = 0
  for g, size in enumerate(sizes[:-1]):
    ngram_weights[lo : lo + size, g] = 1.0 / size
    lo += size
  pos1_weights = np.zeros(R, np.float32)
  pos1_entropy = np.zeros(R, np.float32)
  if bigram is not None and a.size:  # a is empty without bigram
    pos1_weights[lo:] = bigram["pos1_weights"]
    pos1_entropy[lo:] = bigram["pos1_entropy"]
  return orders, {
    "seqs": np.concatenate(seqs),
    "last": np.concatenate(last).astype(np.int32),
    "ngram_weights": ngram_weights,
    "pos1_weights": pos1_weights,
    "pos1_entropy": pos1_entropy,
  }


def _probe_data(probes: Mapping[str, np.ndarray], bos_id: int) -> dict[str, Any]:
  """Both head probes as one batch padded to one length (BOS after the end)."""
  prev, pre = probes["prev_token"], probes["prefix"]
  P = max(prev.shape[1], pre.shape[1])
  pad = lambda x: np.pad(x, ((0, 0), (0, P - x.shape[1])), constant_values=bos_id)  # noqa: E731
  n1, n2 = len(prev), len(pre)
  return {
    "tokens": np.concatenate([pad(prev), pad(pre)]).astype(np.int32),
    "is_prev": np.concatenate([np.full(n1, 1.0 / n1), np.zeros(n2)]).astype(np.float32),
    "is_prefix": np.concatenate([np.zeros(n1), np.full(n2, 1.0 / n2)]).astype(np.float32),
  }


def lm_metrics(
  model,
  checkpoints: Sequence[Params],
  validation_tokens: Any,
  *,
  train_tokens: Any = None,
  bigram_entropy: float | None = None,
  bigram_probs: Any = None,
  common_ngrams: Mapping[int, Any] | None = None,
  num_common_ngrams: int = 1000,
  ngram_orders: Sequence[int] = NGRAM_ORDERS,
  key: jax.Array | None = None,
  icl_positions: Sequence[float | int] = (0.05, 0.5),
  prev_token_batch: int = 512,
  prefix_batch: int = 512,
  eval_batch: int = 8,
  pca_k: int = 8,
  ngram_loss_floor: float = 1e-3,
  checkpoint_chunk: int = 8,
  bos_id: int = BOS_ID,
) -> dict[str, np.ndarray]:
  """The App. C metrics of every checkpoint (definitions in the module docstring).

  Args:
    model: the `AttentionOnlyLM` (anything with `logits(params, tokens,
      pos_ablation=)`, `attention_patterns(params, tokens)`, `vocab_size`,
      `context_length`, `num_layers`; params with `pos_embed` and
      `block_{l}/attn/w_q|w_k|w_v|w_o`).
    checkpoints: param pytrees, one per checkpoint (indexed chunk by chunk).
    validation_tokens: int [N, T] contexts (BOS at 0), 2 <= T <= context_length.
    train_tokens: training contexts [..., T'] for the bigram statistics and, when
      `common_ngrams` is None, the common n-grams.
    bigram_entropy: overrides the entropy computed from `train_tokens`.
    bigram_probs: overrides P̂ [V, V] (rows summing to 1, or 0 for unseen).
      Without P̂ (neither this nor train_tokens) the bigram_score / bigram_kl*
      entries are left out; without an entropy, bigram_entropy / bigram_gap.
    common_ngrams: {n: int [K, n]} (e.g. `ProseCorpus.planted_ngrams`); default
      the `num_common_ngrams` most frequent n-grams of `train_tokens` for n in
      `ngram_orders`; with neither the n-gram entries are left out.
    key: PRNG key of the head-score probes (default key(0)).
    icl_positions: (early, late) as fractions of T or ints (token indices).
    prev_token_batch, prefix_batch: probe sequences of the two head scores.
    eval_batch: validation contexts per forward pass (bounds memory).
    pca_k: explained-variance ratios kept for W_pos.
    ngram_loss_floor: floor of the n-gram loss in the score's denominator.
    checkpoint_chunk: checkpoints per compiled call.
    bos_id: the dataset's BOS token (its `lm_dataset.dataset_metadata`; the synthetic
      corpus's is 0, a loaded tokenizer's is its own): the probes' first token, the
      padding, and the token left out of the n-gram and [BOS, a] statistics.

  Returns:
    dict name -> np.ndarray with leading axis [N].
  """
  V, T_ctx = int(model.vocab_size), int(model.context_length)
  val = np.asarray(validation_tokens)
  if val.ndim != 2 or not np.issubdtype(val.dtype, np.integer):
    raise ValueError(f"validation_tokens must be int [N, T], got {val.dtype} {val.shape}")
  N, T = val.shape
  if N < 1 or not 2 <= T <= T_ctx:
    raise ValueError(
      f"validation_tokens has shape {val.shape}; want N >= 1 and 2 <= T <= context_length = {T_ctx}"
    )
  if val.min() < 0 or val.max() >= V:
    raise ValueError(f"validation token ids span [{val.min()}, {val.max()}], outside [0, {V})")
  if np.any(val[:, 0] != bos_id):
    first = np.unique(val[:, 0])[:5].tolist()
    raise ValueError(
      f"validation contexts must start with BOS = bos_id {bos_id}, but start "
      f"with {first}: pass the dataset's bos_id (its metadata's; a loaded "
      f"tokenizer's BOS is its own, not 0)"
    )
  val = val.astype(np.int32)
  early, late = resolve_positions(icl_positions, T)
  key = jax.random.key(0) if key is None else key

  if train_tokens is not None:
    train = np.asarray(train_tokens)
    if bigram_probs is None or bigram_entropy is None:
      probs, prev_counts = bigram_distribution(train, V)
      if bigram_entropy is None:
        bigram_entropy = conditional_entropy(probs, prev_counts)
      if bigram_probs is None:
        bigram_probs = probs
    if common_ngrams is None:
      common_ngrams = {
        int(n): _common_ngrams(train, int(n), num_common_ngrams, exclude=(bos_id,))
        for n in ngram_orders
      }
  if common_ngrams is not None:
    common_ngrams = {int(n): g for n, g in common_ngrams.items() if len(np.asarray(g))}

  probes = head_probe_tokens(key, V, T_ctx, prev_token_batch, prefix_batch, bos_id=bos_id)
  prev_length = probes["prev_token"].shape[1]
  block_length = (probes["prefix"].shape[1] - 1) // 2
  data: dict[str, Any] = {"val": val, "probes": _probe_data(probes, bos_id)}
  floor, bg = None, None
  if bigram_probs is not None:
    bg = _bigram_data(val, bigram_probs, V, bos_id)
    floor = bg.pop("floor")
    data["bigram"] = {"probs": bg["probs"], "mask": bg["mask"]}
  orders, short = _short_data(common_ngrams, bg, T, T_ctx, V, bos_id)
  if short is not None:
    data["short"] = short
  k = max(1, min(int(pca_k), T_ctx, int(model.d_model)))
  data = jax.device_put(data)
  fn = _lm_fn(model, int(eval_batch), k, prev_length, block_length)
  raw = map_checkpoints(fn, checkpoints, data, checkpoint_chunk=checkpoint_chunk)

  C = raw["loss_per_position"].shape[0]
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  const = lambda x: np.full(C, x, np.float32)  # noqa: E731
  lpp = f32(raw["loss_per_position"])
  abl = f32(raw["pos_ablated_per_position"])
  out: dict[str, np.ndarray] = {"loss": lpp.mean(axis=1)}
  if bigram_entropy is not None:
    out["bigram_entropy"] = const(bigram_entropy)
    out["bigram_gap"] = out["loss"] - out["bigram_entropy"]
  if "bigram_score" in raw:
    if bg is None:  # the program scores bigrams only with data["bigram"]
      raise RuntimeError("the LM metrics returned a bigram score without bigram data")
    out["bigram_score"] = f32(raw["bigram_score"])
    out["bigram_score_floor"] = const(floor)
    out["bigram_kl"] = out["bigram_score"] - out["bigram_score_floor"]
    usable = "bigram_kl_pos1" in raw and bg["pos1_tokens"].size
    out["bigram_kl_pos1"] = f32(raw["bigram_kl_pos1"]) if usable else const(np.nan)
  for g, n in enumerate(orders):
    out[f"val_loss_pos{n}"] = lpp[:, n - 1]
    out[f"ngram_loss_{n}"] = f32(raw["ngram_loss"][:, g])
    out[f"ngram_score_{n}"] = f32(
      ngram_scores(lpp[:, n - 1], raw["ngram_loss"][:, g], ngram_loss_floor)
    )
  out["icl_score"] = lpp[:, late - 1] - lpp[:, early - 1]
  out["icl_early_position"] = np.full(C, early, np.int64)
  out["icl_late_position"] = np.full(C, late, np.int64)
  out["pos_ablated_loss"] = abl.mean(axis=1)
  out["pos_ablation_loss_mean"] = (abl - lpp).mean(axis=1)
  var = f32(raw["pos_pca_var_ratio"])
  for i in (1, 2, 3):
    out[f"pos_pca_top{i}"] = var[:, :i].sum(axis=1)
  prev, pre = f32(raw["prev_token_score"]), f32(raw["prefix_score"])
  L, H = prev.shape[1:]
  out["prev_token_chance"] = const(chance_level(prev_token_queries(prev_length)))
  out["prefix_chance"] = const(chance_level(prefix_queries(2 * block_length + 1)[0]))
  out["prev_token_score_max"] = prev.reshape(C, -1).max(axis=1)
  out["prefix_score_max"] = pre[:, 1:].reshape(C, -1).max(axis=1) if L > 1 else const(np.nan)
  for name, arr in (("prev_token_score", prev), ("prefix_score", pre)):
    for l in range(L):
      for h in range(H):
        out[f"{name}/{head_name(l, h)}"] = arr[:, l, h]
  if "comp_k" in raw:
    comp_k = f32(raw["comp_k"])
    for i in range(comp_k.shape[1]):
      for j in range(comp_k.shape[2]):
        out[f"comp_k/{head_name(0, i)}_{head_name(1, j)}"] = comp_k[:, i, j]
  # Structured entries.
  out["loss_per_position"] = lpp
  out["pos_ablation_loss"] = abl - lpp
  out["pos_pca_var_ratio"] = var
  out["pos_embed_norm"] = f32(raw["pos_embed_norm"])
  out["prev_token_score"] = prev
  out["prefix_score"] = pre
  for kind in ("q", "k", "v"):
    if f"comp_{kind}" in raw:
      out[f"comp_{kind}"] = f32(raw[f"comp_{kind}"])
  return out


# ----------------------------------------------------------------------------
# Head labels and milestones.
# ----------------------------------------------------------------------------


def head_label_array(
  metrics: Mapping[str, Any], *, prev_threshold: float = 0.4, prefix_threshold: float = 0.3
) -> np.ndarray:
  """Labels [..., L, H] from `prev_token_score` and `prefix_score` [..., L, H].

  Rules: 'previous_token' if prev > prev_threshold and prev >= prefix; else
  'induction' if the layer is >= 1 and prefix > prefix_threshold; else 'other'
  (NaN scores count as 0). Defaults are well above chance for probes of >= 16
  tokens (`prev_token_chance`, `prefix_chance`).
  """
  prev = np.nan_to_num(np.asarray(metrics["prev_token_score"], np.float64))
  pre = np.nan_to_num(np.asarray(metrics["prefix_score"], np.float64))
  layer = np.arange(prev.shape[-2])[:, None]
  is_prev = (prev > prev_threshold) & (prev >= pre)
  is_ind = ~is_prev & (layer >= 1) & (pre > prefix_threshold)
  return np.select([is_prev, is_ind], ["previous_token", "induction"], "other").astype(str)


def classify_lm_heads(
  metrics: Mapping[str, Any],
  *,
  checkpoint: int | None = -1,
  prev_threshold: float = 0.4,
  prefix_threshold: float = 0.3,
) -> dict[str, Any]:
  """{'L0H1': label} at checkpoint index `checkpoint` (default the last).

  With `checkpoint=None`: {'L0H1': [N] labels} over all checkpoints. Rules in
  `head_label_array`.
  """
  labels = head_label_array(
    metrics, prev_threshold=prev_threshold, prefix_threshold=prefix_threshold
  )  # [N, L, H]
  _, L, H = labels.shape
  if checkpoint is None:
    return {head_name(l, h): labels[:, l, h] for l in range(L) for h in range(H)}
  return {head_name(l, h): str(labels[checkpoint, l, h]) for l in range(L) for h in range(H)}


def _jsonable_step(step) -> int | float:
  s = np.asarray(step).item()
  return int(s) if float(s).is_integer() else float(s)


def _first_crossing(
  values: np.ndarray, threshold: float, above: bool, sustained: bool
) -> int | None:
  """First index where values >= threshold (<= when not `above`), or from which they stay."""
  v = np.asarray(values, np.float64)
  hit = (v >= threshold) if above else (v <= threshold)
  hit &= np.isfinite(v)
  if sustained:
    stays = np.flip(np.logical_and.accumulate(np.flip(hit)))
    idx = np.flatnonzero(stays)
  else:
    idx = np.flatnonzero(hit)
  return int(idx[0]) if idx.size else None


def milestones(
  steps: Any,
  metrics: Mapping[str, Any],
  *,
  bigram_fraction: float = 0.1,
  ngram_threshold: float = 1.5,
  prev_threshold: float = 0.4,
  prefix_threshold: float = 0.3,
  sustained: bool = False,
) -> dict[str, Any]:
  """Steps at which the LM metrics first cross their thresholds (JSON-able).

  Entries (each with 'step' None when never crossed):
    bigram_gap        first step with bigram_gap <= bigram_fraction · its initial value
                      (None when the initial gap is not positive).
    ngram_{n}         first step with ngram_score_{n} >= ngram_threshold (≈ 1 at init).
    previous_token    first step with max_heads prev_token_score >= prev_threshold; the
                      head achieving the max then, and the first crossing per head.
    induction         the same for prefix_score over the heads of layers >= 1.
  With `sustained`, a crossing counts only if the condition holds at every later step.
  """
  steps = np.asarray(steps)
  out: dict[str, Any] = {}

  def step_at(i):
    return None if i is None else _jsonable_step(steps[i])

  if "bigram_gap" in metrics:
    gap = np.asarray(metrics["bigram_gap"], np.float64)
    g0 = float(gap[0])
    thr = bigram_fraction * g0
    i = _first_crossing(gap, thr, above=False, sustained=sustained) if g0 > 0 else None
    out["bigram_gap"] = {
      "step": step_at(i),
      "threshold": thr,
      "initial": g0,
      "value": None if i is None else float(gap[i]),
    }
  for name in sorted(k for k in metrics if k.startswith("ngram_score_")):
    vals = np.asarray(metrics[name], np.float64)
    i = _first_crossing(vals, ngram_threshold, above=True, sustained=sustained)
    out[f"ngram_{name[len('ngram_score_') :]}"] = {
      "step": step_at(i),
      "threshold": ngram_threshold,
      "value": None if i is None else float(vals[i]),
    }
  for key, name, thr, first_layer in (
    ("previous_token", "prev_token_score", prev_threshold, 0),
    ("induction", "prefix_score", prefix_threshold, 1),
  ):
    if name not in metrics:
      continue
    arr = np.asarray(metrics[name], np.float64)[:, first_layer:]  # [N, L', H]
    if arr.shape[1] == 0:
      out[key] = {"step": None, "head": None, "threshold": thr, "heads": {}}
      continue
    C, Lp, H = arr.shape
    flat = np.nan_to_num(arr.reshape(C, -1), nan=-np.inf)
    i = _first_crossing(flat.max(axis=1), thr, above=True, sustained=sustained)
    best = None
    if i is not None:
      j = int(np.argmax(flat[i]))
      best = head_name(first_layer + j // H, j % H)
    heads = {}
    for j in range(Lp * H):
      ih = _first_crossing(flat[:, j], thr, above=True, sustained=sustained)
      if ih is not None:
        heads[head_name(first_layer + j // H, j % H)] = step_at(ih)
    out[key] = {
      "step": step_at(i),
      "head": best,
      "threshold": thr,
      "value": None if i is None else float(flat[i].max()),
      "heads": heads,
    }
  return out
