"""Tests of the language-model developmental metrics (paper App. C)."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from devinterp_jax.experiments.lm import metrics as lm
from devinterp_jax.data import synthetic_text
from devinterp_jax.data.synthetic_text import BOS_ID, ProseCorpus
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.viz import lm as lm_viz

V, T, D, H, L = 32, 16, 16, 2, 2
MODEL = AttentionOnlyLM(vocab_size=V, context_length=T, d_model=D, num_heads=H, num_layers=L)
# Shapes only (no compilation of the initialisers): params are filled with numpy.
SHAPES = jax.eval_shape(MODEL.init_params, jax.random.key(0))
CORPUS = ProseCorpus(vocab_size=V, context_length=T, num_ngrams=4)
KEY = jax.random.key(3)
PROBES = dict(prev_token_batch=24, prefix_batch=24)


def _random_params(seed: int, std: float = 0.3):
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    return np.asarray(rng.normal(0, std, s.shape) + (path[-1].key == "scale"), np.float32)

  return jax.tree_util.tree_map_with_path(leaf, SHAPES)


def _zero_params():
  params = jax.tree_util.tree_map_with_path(
    lambda path, s: np.full(s.shape, float(path[-1].key == "scale"), np.float32), SHAPES
  )
  return jax.tree.map(np.array, params)


def _previous_token_params():
  """Layer 0 head 0 attends to the previous token; every other head is uniform.

  Token embeddings are zero, so queries/keys read LN(W_pos[t]). W_pos[t] =
  (cos θt, sin θt, −cos θt, −sin θt, 0, …) has zero mean, so LN maps it to
  √8 × itself; head 0 reads keys (cos θs, sin θs) and queries β R(−θ)(cos θt,
  sin θt), giving scores ∝ β cos θ(t − 1 − s), maximal at s = t − 1 (θ T < π).
  """
  p = _zero_params()
  theta, beta = np.pi / T, 300.0
  t = np.arange(T)
  p["pos_embed"][:, 0], p["pos_embed"][:, 1] = np.cos(theta * t), np.sin(theta * t)
  p["pos_embed"][:, 2], p["pos_embed"][:, 3] = -np.cos(theta * t), -np.sin(theta * t)
  attn = p["block_0"]["attn"]
  attn["w_k"][0, 0, 0] = attn["w_k"][1, 0, 1] = 1.0
  c, s = beta * np.cos(theta), beta * np.sin(theta)
  attn["w_q"][0, 0, 0], attn["w_q"][1, 0, 0] = c, s
  attn["w_q"][0, 0, 1], attn["w_q"][1, 0, 1] = -s, c
  return p


@pytest.fixture(scope="module")
def data():
  return {"train": CORPUS.sample(0, 400), "val": CORPUS.sample(1, 12)}


@pytest.fixture(scope="module")
def ckpts():
  return [_random_params(s) for s in range(3)]


def _run(ckpts, data, chunk, common=None):
  """Common n-grams: the planted ones if given, else the 4 most frequent per n of
  the training tokens (so the program's shapes, hence its compilation, are shared)."""
  return lm.lm_metrics(
    MODEL,
    ckpts,
    data["val"],
    train_tokens=data["train"],
    common_ngrams=common,
    num_common_ngrams=4,
    key=KEY,
    checkpoint_chunk=chunk,
    eval_batch=5,
    **PROBES,
  )


@pytest.fixture(scope="module")
def batched(ckpts, data):
  return _run(ckpts, data, 2)


@pytest.fixture(scope="module")
def single(ckpts, data):
  return _run(ckpts, data, 1)


@functools.lru_cache(maxsize=None)
def _reference_fn():
  """Direct model evaluations of the quantities checked (one compilation)."""

  def fn(params, val, ngram_seqs, prev_probe, prefix_probe):
    return {
      "clean": MODEL.per_token_loss(params, val),
      "ablated": MODEL.per_token_loss(params, val, pos_ablation=True),
      "ngram": MODEL.per_token_loss(params, ngram_seqs),
      "attn_prev": MODEL.attention_patterns(params, prev_probe),
      "attn_prefix": MODEL.attention_patterns(params, prefix_probe),
    }

  return jax.jit(fn)


def _reference(params, data):
  grams = lm.common_ngrams(data["train"], 3, 4)
  seqs = np.concatenate([np.full((len(grams), 1), BOS_ID), grams], 1).astype(np.int32)
  probes = lm.head_probe_tokens(KEY, V, T, **PROBES)
  out = _reference_fn()(params, data["val"], seqs, probes["prev_token"], probes["prefix"])
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def prev_model(data):
  params = _previous_token_params()
  return params, _run([params], data, 1, CORPUS.planted_ngrams)


# ----------------------------------------------------------------------------- end to end


def test_shapes_and_batched_equals_per_checkpoint(batched, single):
  C = 3
  assert set(batched) == set(single)
  for name in (
    "loss",
    "bigram_entropy",
    "bigram_gap",
    "bigram_score",
    "bigram_kl_pos1",
    "icl_score",
    "pos_ablated_loss",
    "pos_ablation_loss_mean",
    "pos_pca_top2",
    "prev_token_chance",
    "prefix_chance",
    "ngram_score_2",
    "ngram_score_3",
    "ngram_score_4",
    "prev_token_score/L0H1",
    "comp_k/L0H0_L1H1",
  ):
    assert batched[name].shape == (C,), name
  assert batched["loss_per_position"].shape == (C, T - 1)
  assert batched["pos_ablation_loss"].shape == (C, T - 1)
  assert batched["pos_pca_var_ratio"].shape == (C, 8)
  assert batched["pos_embed_norm"].shape == (C, T)
  for name in ("prev_token_score", "prefix_score"):
    assert batched[name].shape == (C, L, H)
  for kind in "qkv":
    assert batched[f"comp_{kind}"].shape == (C, H, H)
  for name in batched:
    np.testing.assert_allclose(batched[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_losses_agree_with_the_model(batched, ckpts, data):
  ref = _reference(ckpts[1], data)
  clean, ablated = ref["clean"], ref["ablated"]
  np.testing.assert_allclose(batched["loss"][1], clean.mean(), rtol=1e-5)
  np.testing.assert_allclose(batched["loss_per_position"][1], clean.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    batched["pos_ablation_loss"][1], (ablated - clean).mean(0), rtol=1e-4, atol=1e-5
  )
  early, late = batched["icl_early_position"][0], batched["icl_late_position"][0]
  assert (early, late) == (1, 8)  # round(0.05·16) clipped to 1, round(0.5·16)
  np.testing.assert_allclose(
    batched["icl_score"][1], clean.mean(0)[late - 1] - clean.mean(0)[early - 1], rtol=1e-5
  )
  # n-gram loss: the loss on g_n of [BOS, g_1..g_n]; score = val loss at token n / that.
  ngram_loss = ref["ngram"][:, 2].mean()
  np.testing.assert_allclose(batched["ngram_loss_3"][1], ngram_loss, rtol=1e-5)
  np.testing.assert_allclose(batched["ngram_score_3"][1], clean.mean(0)[2] / ngram_loss, rtol=1e-5)


def test_bigram_entries(batched, data):
  h = synthetic_text.bigram_entropy(data["train"], V)
  np.testing.assert_allclose(batched["bigram_entropy"], h, rtol=1e-6)
  np.testing.assert_allclose(batched["bigram_gap"], batched["loss"] - h, rtol=1e-5)
  assert np.all(batched["bigram_kl"] >= -1e-5) and np.all(batched["bigram_kl_pos1"] >= -1e-5)
  # The floor is the validation-averaged row entropy, close to the training entropy.
  assert abs(batched["bigram_score_floor"][0] - h) < 0.5


def test_bigram_entropy_of_deterministic_bigrams_is_zero():
  rng = np.random.default_rng(0)
  successor = rng.permutation(V)
  x = np.zeros((50, T), np.int64)
  x[:, 0] = rng.integers(1, V, 50)
  for t in range(1, T):
    x[:, t] = successor[x[:, t - 1]]
  assert synthetic_text.bigram_entropy(x, V) == pytest.approx(0.0, abs=1e-12)
  probs, prev = lm.bigram_distribution(x, V)
  seen = prev > 0
  np.testing.assert_array_equal(probs[seen].max(axis=1), 1.0)
  np.testing.assert_allclose(lm.row_entropies(probs), 0.0, atol=1e-12)
  np.testing.assert_array_equal(probs[~seen], 0.0)


def test_previous_token_head_end_to_end(prev_model, data):
  params, out = prev_model
  prev, pre = out["prev_token_score"][0], out["prefix_score"][0]
  assert prev[0, 0] > 0.95
  chance_prev, chance_pre = out["prev_token_chance"][0], out["prefix_chance"][0]
  # Every other head has uniform causal attention: exactly chance.
  for l, h in ((0, 1), (1, 0), (1, 1)):
    np.testing.assert_allclose(prev[l, h], chance_prev, rtol=1e-4)
    np.testing.assert_allclose(pre[l, h], chance_pre, rtol=1e-4)
  assert pre[0, 0] < 0.05
  labels = lm.classify_lm_heads(out)
  assert labels == {"L0H0": "previous_token", "L0H1": "other", "L1H0": "other", "L1H1": "other"}
  # The end-to-end scores equal the lower-level functions on the model's patterns.
  ref = _reference(params, data)
  np.testing.assert_allclose(lm.previous_token_scores(ref["attn_prev"]), prev, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    lm.prefix_matching_scores(ref["attn_prefix"]), pre, rtol=1e-5, atol=1e-6
  )
  # Zero token embeddings and values: the model predicts uniformly.
  np.testing.assert_allclose(out["loss"], np.log(V), rtol=1e-5)


def test_head_probes():
  probes = lm.head_probe_tokens(KEY, V, T, **PROBES)
  prev, pre = probes["prev_token"], probes["prefix"]
  assert prev.shape == (24, T) and pre.shape == (24, 15)
  assert np.all(prev[:, 0] == BOS_ID) and np.all(prev[:, 1:] >= 1)
  m = 7
  np.testing.assert_array_equal(pre[:, 1 : m + 1], pre[:, m + 1 :])
  assert all(len(set(row[1 : m + 1])) == m for row in pre) and np.all(pre[:, 1:] >= 1)
  np.testing.assert_array_equal(lm.prev_token_queries(64), np.arange(15, 64))  # lengths 16–64


# ----------------------------------------------------------------------------- attention scores


def _uniform_causal(B, Hh, T_):
  mask = np.tril(np.ones((T_, T_)))
  return np.broadcast_to(mask / mask.sum(1, keepdims=True), (B, Hh, T_, T_)).copy()


def test_scores_on_supplied_patterns():
  T_, m = 15, 7
  perfect_prev = np.zeros((2, 1, T_, T_))
  perfect_prev[..., 0, 0] = 1
  for t in range(1, T_):
    perfect_prev[..., t, t - 1] = 1
  induction = _uniform_causal(2, 1, T_)
  for t in range(m + 1, 2 * m + 1):
    induction[..., t, :] = 0
    induction[..., t, t - m + 1] = 1
  attn = np.stack(
    [
      np.concatenate([perfect_prev, _uniform_causal(2, 1, T_)], 1),
      np.concatenate([_uniform_causal(2, 1, T_), induction], 1),
    ]
  )  # [L, B, H, T, S]
  prev = np.asarray(lm.previous_token_scores(attn))
  pre = np.asarray(lm.prefix_matching_scores(attn))
  q_prev = lm.prev_token_queries(T_)
  q_pre, target = lm.prefix_queries(T_)
  np.testing.assert_array_equal(target, np.arange(2, m + 2))
  np.testing.assert_allclose(prev[0, 0], 1.0)
  np.testing.assert_allclose(prev[1, 0], lm.chance_level(q_prev), rtol=1e-6)
  np.testing.assert_allclose(pre[1, 1], 1.0)
  np.testing.assert_allclose(pre[0, 1], lm.chance_level(q_pre), rtol=1e-6)
  assert pre[0, 0] == 0.0
  labels = lm.head_label_array({"prev_token_score": prev[None], "prefix_score": pre[None]})
  np.testing.assert_array_equal(labels[0], [["previous_token", "other"], ["other", "induction"]])


def test_classification_rules():
  prev = np.array([[[0.5, 0.1, 0.45], [0.1, 0.6, 0.35]]])
  pre = np.array([[[0.1, 0.9, 0.5], [0.8, 0.7, 0.1]]])
  labels = lm.head_label_array({"prev_token_score": prev, "prefix_score": pre})
  # L0H1 has a high prefix score but sits in layer 0; L0H2 prefers prefix; L1H1 prev wins.
  np.testing.assert_array_equal(
    labels[0], [["previous_token", "other", "other"], ["induction", "induction", "other"]]
  )
  per_ckpt = lm.classify_lm_heads(
    {
      "prev_token_score": np.concatenate([prev, prev * 0]),
      "prefix_score": np.concatenate([pre, pre * 0]),
    },
    checkpoint=None,
  )
  np.testing.assert_array_equal(per_ckpt["L0H0"], ["previous_token", "other"])


# ----------------------------------------------------------------------------- weights


def _attn_params(Hh=2, Dd=16, E=8):
  zero = lambda *s: np.zeros(s, np.float32)  # noqa: E731
  return {
    f"block_{l}": {
      "attn": {
        "w_q": zero(Dd, Hh, E),
        "w_k": zero(Dd, Hh, E),
        "w_v": zero(Dd, Hh, E),
        "w_o": zero(Hh, E, Dd),
      }
    }
    for l in (0, 1)
  }


def test_composition_scores():
  rng = np.random.default_rng(0)
  p = _attn_params()
  u, a = rng.normal(size=16), np.zeros(16)
  a[:4] = rng.normal(size=4)
  b = rng.normal(size=16)
  b -= a * (a @ b) / (a @ a)  # b ⟂ a
  c = rng.normal(size=16)
  a0, a1 = p["block_0"]["attn"], p["block_1"]["attn"]
  a0["w_v"][:, 0, 0], a0["w_o"][0, 0, :] = u, a  # W_OV^{0,0} = u aᵀ: writes a
  a1["w_q"][:, 0, 0], a1["w_k"][:, 0, 0] = b, a  # W_QK^{1,0} = b aᵀ: keys read a
  a1["w_v"][:, 0, 0], a1["w_o"][0, 0, :] = a, c  # W_OV^{1,0} = a cᵀ: values read a
  orth = np.zeros(16)
  orth[8:] = rng.normal(size=8)
  a1["w_q"][:, 1, 0], a1["w_k"][:, 1, 0] = orth, orth  # head 1 reads only dims 8..15
  a1["w_v"][:, 1, 0], a1["w_o"][1, 0, :] = orth, c
  comp = {k: np.asarray(v) for k, v in lm.composition_scores(p).items()}
  np.testing.assert_allclose(comp["k"][0, 0], 1.0, rtol=1e-5)
  np.testing.assert_allclose(comp["v"][0, 0], 1.0, rtol=1e-5)
  np.testing.assert_allclose(comp["q"][0, 0], 0.0, atol=1e-5)  # queries read b ⟂ a
  for kind in "qkv":
    np.testing.assert_allclose(comp[kind][0, 1], 0.0, atol=1e-5)  # orthogonal subspaces
    np.testing.assert_array_equal(comp[kind][1], 0.0)  # zero head: 0/0 -> 0
  rand = lm.composition_scores(_random_params(5))
  for v in rand.values():
    v = np.asarray(v)
    assert v.shape == (H, H) and np.all((v >= 0) & (v <= 1))


def test_composition_entries_in_unit_interval(batched):
  for kind in "qkv":
    v = batched[f"comp_{kind}"]
    assert np.all((v >= 0) & (v <= 1)) and np.all(v > 0)


def test_pca_explained_variance(batched):
  rng = np.random.default_rng(1)
  full = np.asarray(lm.pca_explained_variance(rng.normal(size=(T, D))))
  np.testing.assert_allclose(full.sum(), 1.0, rtol=1e-5)
  assert np.all(np.diff(full) <= 1e-7)
  rank1 = np.outer(np.linspace(-1, 3, T) ** 2, rng.normal(size=D))
  r = np.asarray(lm.pca_explained_variance(rank1, 4))
  np.testing.assert_allclose(r, [1, 0, 0, 0], atol=1e-5)
  np.testing.assert_array_equal(lm.pca_explained_variance(np.ones((T, D))), 0.0)
  assert np.all(batched["pos_pca_var_ratio"].sum(1) <= 1 + 1e-5)
  np.testing.assert_allclose(batched["pos_pca_top1"], batched["pos_pca_var_ratio"][:, 0])


# ----------------------------------------------------------------------------- host-side helpers


def test_ngram_score_guard_and_positions():
  assert lm.ngram_scores(2.0, 0.0) == pytest.approx(2000.0)  # perfect predictor: floor 1e-3
  assert np.isfinite(lm.ngram_scores([3.0], [0.0], floor=1e-6)).all()
  np.testing.assert_allclose(lm.ngram_scores([3.0, 2.0], [1.5, 4.0]), [2.0, 0.5])
  assert lm.resolve_positions((0.05, 0.5), 1024) == (51, 512)
  assert lm.resolve_positions((50, 500), 1024) == (50, 500)
  with pytest.raises(ValueError):
    lm.resolve_positions((2000,), 1024)


def test_common_ngrams(monkeypatch):
  x = np.array([[BOS_ID, 1, 2, 3, 1, 2, 3, 1, 2], [BOS_ID, 4, 1, 2, 5, 5, 5, 5, 5]])
  grams, counts = lm.common_ngrams(x, 2, 3, return_counts=True)
  np.testing.assert_array_equal(grams, [[1, 2], [5, 5], [2, 3]])
  np.testing.assert_array_equal(counts, [4, 4, 2])
  assert lm.common_ngrams(x, 3, 1000).shape[1] == 3
  assert not np.isin(lm.common_ngrams(x, 2, 1000), BOS_ID).any()
  # Chunked counting and the unpacked path (ids too large to pack 4 into an int64) agree.
  sample = CORPUS.sample(2, 300)
  ref, ref_counts = lm.common_ngrams(sample, 4, 20, return_counts=True)
  monkeypatch.setattr(lm, "_HOST_CHUNK", 7)
  got, got_counts = lm.common_ngrams(sample, 4, 20, return_counts=True)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got_counts, ref_counts)
  big, big_counts = lm.common_ngrams(sample.astype(np.int64) << 20, 4, 20, return_counts=True)
  np.testing.assert_array_equal(big, ref.astype(np.int64) << 20)
  np.testing.assert_array_equal(big_counts, ref_counts)
  probs, prev = lm.bigram_distribution(sample, V)
  monkeypatch.undo()
  probs_ref, prev_ref = lm.bigram_distribution(sample, V)
  np.testing.assert_array_equal(probs, probs_ref)
  np.testing.assert_array_equal(prev, prev_ref)
  np.testing.assert_allclose(
    lm.conditional_entropy(probs, prev), synthetic_text.bigram_entropy(sample, V), rtol=1e-6
  )
  # Planted n-grams are found among the most frequent of a corpus sample.
  sample = CORPUS.sample(2, 2000)
  top = {tuple(g) for g in lm.common_ngrams(sample, 4, 10)}
  assert len(top & {tuple(g) for g in CORPUS.planted_ngrams[4]}) >= 3


# ----------------------------------------------------------------------------- milestones, plot


def _fake_metrics():
  steps = np.array([0, 10, 100, 1000, 10000])
  prev = np.zeros((5, 2, 2))
  prev[:, 0, 1] = [0.1, 0.2, 0.5, 0.8, 0.9]
  prefix = np.zeros((5, 2, 2))
  prefix[:, 1, 0] = [0.05, 0.05, 0.1, 0.35, 0.6]
  prefix[:, 0, 0] = 0.9  # layer 0: never an induction milestone
  return steps, {
    "bigram_gap": np.array([3.0, 1.0, 0.25, 0.2, 0.1]),
    "ngram_score_2": np.array([1.0, 1.1, 2.0, 3.0, 3.0]),
    "ngram_score_3": np.array([1.0, 1.0, 1.0, 1.2, 1.3]),
    "prev_token_score": prev,
    "prefix_score": prefix,
    "prev_token_chance": np.full(5, 0.05),
    "prefix_chance": np.full(5, 0.02),
    "loss": np.linspace(4, 2, 5),
    "bigram_entropy": np.full(5, 1.8),
    "icl_score": np.linspace(0, -1, 5),
  }


def test_milestones():
  steps, metrics = _fake_metrics()
  marks = lm.milestones(steps, metrics)
  json.dumps(marks)
  assert marks["bigram_gap"]["step"] == 100 and marks["bigram_gap"]["threshold"] == pytest.approx(
    0.3
  )
  assert marks["ngram_2"]["step"] == 100 and marks["ngram_3"]["step"] is None
  assert marks["previous_token"]["step"] == 100
  assert marks["previous_token"]["head"] == "L0H1"
  assert marks["induction"]["step"] == 1000 and marks["induction"]["head"] == "L1H0"
  assert marks["induction"]["heads"] == {"L1H0": 1000}
  metrics["ngram_score_2"] = np.array([1.0, 2.0, 1.0, 3.0, 3.0])
  assert lm.milestones(steps, metrics, sustained=True)["ngram_2"]["step"] == 1000


def test_plot_writes_png(tmp_path, batched):
  path = str(tmp_path / "lm.png")
  steps = np.array([0, 100, 1000])
  assert lm_viz.plot_lm_metrics(steps, batched, path, boundaries=(50, 500), title="t") == path
  assert os.path.getsize(path) > 10_000
  steps, metrics = _fake_metrics()
  path2 = str(tmp_path / "partial.png")
  lm_viz.plot_lm_metrics(steps, metrics, path2)
  fig = lm_viz.lm_metrics_figure(steps, metrics)  # step 0: symlog step axes
  assert {ax.get_xscale() for ax in fig.axes[:8]} == {"symlog"}
  assert os.path.getsize(path2) > 10_000


def test_the_datasets_bos_is_used_not_token_0(data, ckpts):
  """Relabel the vocabulary so that BOS is token 5 (tokens and the model's embedding and
  unembedding permuted alike): with bos_id=5 every loss-based metric equals the original,
  the probes start with 5 and hold no other 5, and bos_id=0 is refused."""
  bos = 5
  perm = np.arange(V)
  perm[[0, bos]] = perm[[bos, 0]]
  val, train = perm[data["val"]], perm[data["train"]]
  planted = {n: perm[g] for n, g in CORPUS.planted_ngrams.items()}
  params = jax.tree.map(np.array, ckpts[0])
  params["token_embed"]["embedding"] = params["token_embed"]["embedding"][perm]
  params["unembed"]["kernel"] = params["unembed"]["kernel"][:, perm]
  params["unembed"]["bias"] = params["unembed"]["bias"][perm]
  kw = dict(num_common_ngrams=4, key=KEY, checkpoint_chunk=1, eval_batch=5, **PROBES)
  ref = lm.lm_metrics(
    MODEL,
    ckpts[:1],
    data["val"],
    train_tokens=data["train"],
    common_ngrams=CORPUS.planted_ngrams,
    **kw,
  )
  got = lm.lm_metrics(
    MODEL, [params], val, train_tokens=train, common_ngrams=planted, bos_id=bos, **kw
  )
  for name in (
    "loss",
    "bigram_entropy",
    "bigram_score",
    "bigram_kl_pos1",
    "icl_score",
    "ngram_score_2",
    "ngram_score_3",
    "pos_ablated_loss",
  ):
    np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=1e-6, err_msg=name)
  probes = lm.head_probe_tokens(KEY, V, T, bos_id=bos, **PROBES)
  for seqs in probes.values():
    assert (seqs[:, 0] == bos).all() and not (seqs[:, 1:] == bos).any()
  assert (probes["prefix"][:, 1:] == 0).any()  # token 0 is an ordinary token now
  with pytest.raises(ValueError, match="bos_id 0"):
    lm.lm_metrics(MODEL, [params], val, train_tokens=train, **kw)
