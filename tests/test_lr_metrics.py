"""Tests of the LR behavioural and structural metrics (paper App. D)."""

import itertools
import os

import jax
import numpy as np
import pytest

from devinterp_jax.analysis import batching
from devinterp_jax.experiments.icl_regression import behaviour as lb
from devinterp_jax.experiments.icl_regression import structure as ls
from devinterp_jax.data.regression import RegressionTask
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.viz import lr as lr_viz

D, K, B = 4, 8, 256
GAINS = (0.5, 1.0, 2.0, 4.0, 8.0)
MODEL = RegressionTransformer(
  task_size=D, max_examples=K, d_model=16, d_mlp=16, num_heads=2, num_layers=2
)
TASK = RegressionTask(task_size=D, max_examples=K)
FEW = RegressionTask(task_size=D, max_examples=K, num_tasks=4)
KEY = jax.random.key(7)
# Shapes only (no compilation of the random initialisers): params are filled with numpy.
SHAPES = jax.eval_shape(MODEL.init_params, jax.random.key(0))


def _perturbed(seed: int):
  """Random params: LN scales 1 ± 0.3, everything else N(0, 0.3²)."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    x = 0.3 * rng.normal(size=shape.shape)
    return np.asarray(x + (path[-1].key == "scale"), np.float32)

  return jax.tree_util.tree_map_with_path(leaf, SHAPES)


def _copy(params):
  return jax.tree.map(np.array, params)


@pytest.fixture(scope="module")
def ckpts():
  return [_perturbed(s) for s in range(3)]


@pytest.fixture(scope="module")
def behaviour3(ckpts):
  return lb.behaviour_metrics(MODEL, ckpts, TASK, KEY, B, gains=GAINS, checkpoint_chunk=2)


@pytest.fixture(scope="module")
def structure3(ckpts):
  return ls.structure_metrics(MODEL, ckpts, TASK, KEY, B, checkpoint_chunk=2)


def _single_behaviour(params, task=TASK):
  return lb.behaviour_metrics(MODEL, [params], task, KEY, B, gains=GAINS, checkpoint_chunk=2)


def _single_structure(params):
  return ls.structure_metrics(MODEL, [params], TASK, KEY, B, checkpoint_chunk=2)


# ----------------------------------------------------------------------------
# Batching over checkpoints.
# ----------------------------------------------------------------------------


def test_behaviour_chunked_equals_single(ckpts, behaviour3):
  assert all(v.shape == (3,) for v in behaviour3.values())
  for i, params in enumerate(ckpts):
    single = _single_behaviour(params)
    assert single.keys() == behaviour3.keys()
    for name, value in single.items():
      np.testing.assert_allclose(behaviour3[name][i], value[0], rtol=1e-5, atol=1e-6, err_msg=name)
  # The checkpoints differ, so equality above is not vacuous.
  assert np.ptp(behaviour3["mse"]) > 1e-3


def test_structure_chunked_equals_single(ckpts, structure3):
  for i, params in enumerate(ckpts):
    single = _single_structure(params)
    assert single.keys() == structure3.keys()
    for name, value in single.items():
      np.testing.assert_allclose(structure3[name][i], value[0], rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.ptp(structure3["tok_embed_sv_1"]) > 1e-3


def test_map_checkpoints_rejects_bad_input(ckpts):
  with pytest.raises(TypeError):
    batching.map_checkpoints(lambda p, d: {"a": p["pos_embed"].sum()}, ckpts[0])
  bad = _copy(ckpts[1])
  bad["pos_embed"] = bad["pos_embed"][:, :8]
  with pytest.raises(ValueError, match="checkpoint 1"):
    batching.map_checkpoints(lambda p, d: {"a": p["pos_embed"].sum()}, [ckpts[0], bad])


# ----------------------------------------------------------------------------
# Behavioural metrics with known predictions.
# ----------------------------------------------------------------------------


def test_zero_unembedding_predicts_zero(ckpts):
  params = _copy(ckpts[0])
  params["unembed"]["kernel"][:] = 0.0
  params["unembed"]["bias"][:] = 0.0
  m = _single_behaviour(params)
  assert m["dist_zero"][0] == 0.0
  assert m["dist_prior"][0] == 0.0  # infinite prior: t̄ = 0
  ood = [k for k in m if k.startswith("nmse_ood_")]
  assert len(ood) == 2 * len(GAINS)
  for name in ood + ["nmse"]:
    np.testing.assert_allclose(m[name], 1.0, rtol=1e-6, err_msg=name)
  data = lb.evaluation_data(TASK, KEY, B)
  ys2_BxK = np.square(data["ys"].astype(np.float64))
  losses = lb.per_prediction(m, "loss")[0]
  np.testing.assert_allclose(losses, ys2_BxK.mean(0), rtol=1e-5)
  np.testing.assert_allclose(losses, lb.per_prediction(m, "zero_loss")[0], rtol=1e-5)
  # E[y²] = D·E[t_i² x_i²] + σ² = D + σ², within 4 standard errors.
  expected = D + TASK.noise_variance
  se_K = ys2_BxK.std(0) / np.sqrt(B)
  assert np.all(np.abs(losses - expected) < 4 * se_K), (losses, se_K)
  se_mean = ys2_BxK.mean(1).std() / np.sqrt(B)
  assert abs(m["mse"][0] - expected) < 4 * se_mean
  np.testing.assert_allclose(m["icl_1_4"], m["loss_k4"] - m["loss_k1"], rtol=1e-6)
  np.testing.assert_allclose(m["icl_4_8"], m["loss_k8"] - m["loss_k4"], rtol=1e-6)


def test_constant_prediction_on_finite_task_set(ckpts):
  task = FEW
  c = 0.7
  params = _copy(ckpts[0])
  params["unembed"]["kernel"][:] = 0.0
  params["unembed"]["bias"][:] = 0.0
  params["unembed"]["bias"][0] = c
  m = _single_behaviour(params, task)
  data = lb.evaluation_data(task, KEY, B)
  ys = data["ys"].astype(np.float64)
  np.testing.assert_allclose(lb.per_prediction(m, "loss")[0], np.mean((ys - c) ** 2, 0), rtol=1e-5)
  np.testing.assert_allclose(m["dist_zero"], c**2, rtol=1e-5)  # a float32 mean, as above
  t_bar = np.asarray(task.task_set(), np.float64).mean(0)
  np.testing.assert_allclose(lb.task_prior_mean(task), t_bar)
  prior_BxK = np.einsum("bkd,d->bk", data["xs"], t_bar)
  np.testing.assert_allclose(m["dist_prior"], np.mean((c - prior_BxK) ** 2), rtol=1e-5)
  assert "dist_dmmse" in m and "dmmse_loss_k1" in m
  for g in GAINS:
    ys_g = g * data["signal"].astype(np.float64) + data["noise"]
    want = np.sum((ys_g - c) ** 2) / np.sum(ys_g**2)
    for kind in ("x", "t"):
      np.testing.assert_allclose(m[f"nmse_ood_{kind}_g{lb.gain_name(g)}"], want, rtol=1e-5)


def test_ood_batches_scale_inputs_or_tasks():
  data = lb.evaluation_data(TASK, KEY, B)
  np.testing.assert_allclose(data["signal"] + data["noise"], data["ys"], atol=1e-6)
  xs1, ys1 = lb.ood_batch(data, 1.0, "x")
  np.testing.assert_allclose(ys1, data["ys"], atol=1e-6)
  np.testing.assert_array_equal(xs1, data["xs"])
  xs_x, ys_x = lb.ood_batch(data, 3.0, "x")
  xs_t, ys_t = lb.ood_batch(data, 3.0, "t")
  np.testing.assert_allclose(xs_x, 3.0 * data["xs"])
  np.testing.assert_array_equal(xs_t, data["xs"])
  # y = t·(3x) + ε and y = (3t)·x + ε with the same noise.
  np.testing.assert_allclose(
    ys_x, np.einsum("bkd,bd->bk", xs_x, data["tasks"]) + data["noise"], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    ys_t,
    np.einsum("bkd,bd->bk", data["xs"], 3.0 * data["tasks"]) + data["noise"],
    rtol=1e-5,
    atol=1e-5,
  )
  # The data derive from the key only.
  again = lb.evaluation_data(TASK, KEY, B)
  np.testing.assert_array_equal(again["xs"], data["xs"])


def test_ridge_and_dmmse_baselines():
  data = lb.evaluation_data(TASK, KEY, B)
  xs, ys = data["xs"].astype(np.float64), data["ys"].astype(np.float64)
  sigma2 = TASK.noise_variance
  ridge = lb.ridge_predictions(xs, ys, sigma2)
  for b in (0, 5):
    for k in range(K):
      X, y = xs[b, :k], ys[b, :k]
      t_hat = np.linalg.solve(X.T @ X + sigma2 * np.eye(D), X.T @ y)
      np.testing.assert_allclose(ridge[b, k], t_hat @ xs[b, k], rtol=1e-9, atol=1e-12)
  losses = lb.baseline_losses(TASK, KEY, B)
  assert set(losses) == {"zero", "prior", "ridge"}
  assert losses["ridge"][0] == losses["zero"][0]  # no context: predicts 0
  # Bayes risk with 7 examples: between σ² and the OLS risk σ²(1 + D/(7 − D − 1)) = 3σ².
  assert 0.5 * sigma2 < losses["ridge"][-1] < 3 * sigma2
  # Noiseless limit: the minimum-norm solution recovers t once k - 1 >= D.
  noiseless = lb.ridge_predictions(xs, data["signal"], 0.0)
  np.testing.assert_allclose(noiseless[:, D:], data["signal"][:, D:], rtol=1e-3, atol=1e-3)
  # A one-task set: the dMMSE posterior is that task, for every k.
  t_1xD = np.array([[0.5, -1.0, 2.0, 0.3]])
  ys_1 = xs @ t_1xD[0] + np.sqrt(sigma2) * data["noise"]
  dm = lb.dmmse_predictions(xs, ys_1, t_1xD, sigma2)
  np.testing.assert_allclose(dm, xs @ t_1xD[0], rtol=1e-9, atol=1e-12)
  # With a finite set dMMSE beats ridge in the long run and the prior at k = 1 matches it.
  lf = lb.baseline_losses(FEW, KEY, B)
  np.testing.assert_allclose(lf["dmmse"][0], lf["prior"][0], rtol=1e-6)
  assert lf["dmmse"][-1] < lf["ridge"][-1]


def test_icl_scores_definition_and_short_contexts():
  losses = np.array([[5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.8, 0.5, 0.4]])
  s = lb.icl_scores(losses)
  np.testing.assert_allclose(s["icl_1_4"], [2.5 - 5.0])
  np.testing.assert_allclose(s["icl_4_8"], [0.5 - 2.5])
  s = lb.icl_scores(losses[:, :5])
  np.testing.assert_allclose(s["icl_1_4"], [-2.5])
  assert np.isnan(s["icl_4_8"]).all()
  s = lb.icl_scores(losses[:, :3])
  assert np.isnan(s["icl_1_4"]).all() and np.isnan(s["icl_4_8"]).all()


# ----------------------------------------------------------------------------
# Attention metrics on hand-built patterns.
# ----------------------------------------------------------------------------

T = 2 * K


def _tile(pattern_TxS, batch=3, heads=1):
  return np.broadcast_to(pattern_TxS, (batch, heads, T, T)).astype(np.float32)


def _uniform():
  causal = np.tril(np.ones((T, T)))
  return causal / causal.sum(1, keepdims=True)


def _one_hot(target_T):
  return np.eye(T)[np.clip(target_T, 0, None)]


def _scores(attn):
  return {k: np.asarray(v) for k, v in ls.attention_scores(attn).items()}


def test_uniform_causal_attention():
  s = _scores(_tile(_uniform()))
  np.testing.assert_allclose(s["entropy"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(s["variability"], 0.0, atol=1e-6)
  t = np.arange(1, T)
  np.testing.assert_allclose(s["self"][0, 0], np.mean(1.0 / (t + 1)), rtol=1e-5)
  np.testing.assert_allclose(s["x_mass"] + s["y_mass"], 1.0, rtol=1e-5)
  assert ls.classify_heads(s)[0].tolist() == ["diffuse"] * 3


def test_previous_token_attention():
  s = _scores(_tile(_one_hot(np.arange(T) - 1)))
  np.testing.assert_allclose(s["entropy"], 0.0, atol=1e-6)
  np.testing.assert_allclose(s["prev_token"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(s["self"], 0.0, atol=1e-6)
  np.testing.assert_allclose(s["variability"], 0.0, atol=1e-6)
  # x-queries' previous token is the previous pair's y; y-queries' is their own x.
  np.testing.assert_allclose(s["prev_y"][0, 1], 1.0)
  np.testing.assert_allclose(s["x_mass"][0, 2], 1.0)
  np.testing.assert_allclose(s["y_mass"][0, 1], 1.0)
  assert ls.classify_heads(s)[0].tolist() == ["previous-token"] * 3
  # Threshold options: demanding more than 1 leaves only the mass rule.
  assert ls.classify_heads(s, hard_threshold=1.01)[0].tolist() == [
    "constant",
    "y-attending",
    "x-attending",
  ]


def test_self_and_previous_pair_attention():
  s = _scores(_tile(np.eye(T), heads=2))
  assert s["self"].shape == (2, 3)
  np.testing.assert_allclose(s["self"], 1.0)
  assert (ls.classify_heads(s) == "self").all()
  t = np.arange(T)
  s = _scores(_tile(_one_hot(2 * (t // 2) - 2)))  # previous pair's x (t ≥ 2)
  np.testing.assert_allclose(s["prev_x"], 1.0)
  assert ls.classify_heads(s)[0, 2] == "previous-x"
  s = _scores(_tile(_one_hot(2 * (t // 2) - 1)))  # previous pair's y
  np.testing.assert_allclose(s["prev_y"], 1.0)
  assert ls.classify_heads(s)[0, 2] == "previous-y"


def test_mass_constant_and_variability():
  x_only = np.tril(np.ones((T, T))) * (np.arange(T) % 2 == 0)[None, :]
  s = _scores(_tile(x_only / x_only.sum(1, keepdims=True)))
  np.testing.assert_allclose(s["x_mass"], 1.0, rtol=1e-6)
  assert ls.classify_heads(s)[0].tolist() == ["x-attending"] * 3
  half = 0.5 * (np.eye(T) + _one_hot(np.arange(T) - 1))
  half[0, 0] = 1.0
  s = _scores(_tile(half))
  assert s["entropy"][0, 0] < 0.8 and abs(s["variability"][0, 0]) < 1e-6
  assert ls.classify_heads(s)[0, 0] == "constant"
  # Half the batch attends to itself, half to the previous token: variability 1/2.
  mixed = np.stack([np.eye(T)[None], _one_hot(np.arange(T) - 1)[None]]).astype(np.float32)
  s = _scores(mixed)
  np.testing.assert_allclose(s["variability"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(s["entropy"], 0.0, atol=1e-6)
  assert ls.classify_heads(s)[0].tolist() == ["mixed", "mixed", "mixed"]


def test_attention_metrics_match_model_attention(ckpts, structure3):
  batch = lb.evaluation_data(TASK, KEY, B)
  predict = jax.jit(MODEL.predict, static_argnames="return_attention")
  _, attn = predict(ckpts[2], batch["xs"], batch["ys"], return_attention=True)
  direct = _scores(attn)  # [L, H, 3]
  for name in ls.ATTENTION_SCORES:
    np.testing.assert_allclose(
      structure3[f"attn_{name}"][2], direct[name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  np.testing.assert_allclose(
    structure3["attn_entropy/L1H0y"][2], direct["entropy"][1, 0, 2], rtol=1e-6
  )
  labels = ls.classify_heads(structure3)
  assert labels.shape == (3, 2, 2, 3) and set(labels.flat) <= set(ls.HEAD_LABELS)
  flat = ls.head_labels(structure3)
  assert len(flat) == 12 and flat["head_class/L0H1x"].shape == (3,)


# ----------------------------------------------------------------------------
# Weight metrics.
# ----------------------------------------------------------------------------


def test_embedding_singular_values_and_alignment(ckpts, structure3):
  for i, params in enumerate(ckpts):
    tok, pos = params["token_embed"]["kernel"], params["pos_embed"]
    sv_tok = np.linalg.svd(tok, compute_uv=False)
    np.testing.assert_allclose(structure3["tok_embed_sv"][i], sv_tok, rtol=1e-5)
    np.testing.assert_allclose(structure3["tok_embed_sv_1"][i], sv_tok[0], rtol=1e-5)
    np.testing.assert_allclose(
      structure3["pos_embed_sv"][i], np.linalg.svd(pos, compute_uv=False), rtol=1e-5, atol=1e-6
    )
    assert structure3["tok_embed_rank"][i] == np.sum(sv_tok > 0.1 * sv_tok[0])
    p = sv_tok / sv_tok.sum()
    np.testing.assert_allclose(
      structure3["tok_embed_erank"][i], np.exp(-np.sum(p * np.log(p))), rtol=1e-5
    )
    k = D + 1
    qa = np.linalg.svd(tok)[2][:k]
    qb = np.linalg.svd(pos)[2][:k]
    np.testing.assert_allclose(
      structure3["embed_alignment"][i], np.sum((qa @ qb.T) ** 2) / k, rtol=1e-4
    )


def test_subspace_alignment_limits():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 16))
  mix = rng.normal(size=(5, 5))
  same, cos = ls.subspace_alignment(a, mix @ a)  # same row space, other vectors
  np.testing.assert_allclose(same, 1.0, rtol=1e-5)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  eye = np.eye(16)
  orth, _ = ls.subspace_alignment(eye[:3] * [[3.0], [2.0], [1.0]], eye[3:6])
  np.testing.assert_allclose(orth, 0.0, atol=1e-6)
  half, cos = ls.subspace_alignment(eye[[0, 1]] * [[2.0], [1.0]], eye[[0, 2]] * [[2.0], [1.0]])
  np.testing.assert_allclose(half, 0.5, rtol=1e-5)
  np.testing.assert_allclose(cos, [1.0, 0.0], atol=1e-6)


def test_layer_norm_and_unembedding_collapse(ckpts):
  params = _copy(ckpts[0])
  d = MODEL.d_model
  scale = np.linspace(0.5, 1.5, d).astype(np.float32)
  scale[::2] = 0.0
  params["block_0"]["ln_1"]["scale"] = scale
  params["ln_f"]["scale"] = scale
  params["unembed"]["kernel"][:, 0] = 1.0
  m = _single_structure(params)
  np.testing.assert_allclose(m["ln_collapse/block_0/ln_1"], 0.5)
  np.testing.assert_allclose(m["unembed_collapse"], 0.5)
  np.testing.assert_allclose(m["unembed_w0_collapse"], 0.0)
  for q, name in ((0.1, "q10"), (0.5, "q50"), (0.9, "q90")):
    np.testing.assert_allclose(m[f"ln_scale_{name}/block_0/ln_1"], np.quantile(scale, q), rtol=1e-5)
  assert m["ln_collapse/block_1/ln_2"][0] < 0.5
  np.testing.assert_allclose(m["unembed_eff_weight"][0], scale, rtol=1e-6)
  np.testing.assert_allclose(
    m["unembed_eff_bias"][0], params["ln_f"]["bias"].sum() + params["unembed"]["bias"][0], rtol=1e-5
  )
  # Absolute vs relative thresholds.
  v = np.array([0.0, 0.05, 0.2, 10.0])
  np.testing.assert_allclose(ls.collapse_fraction(v, 0.1, relative=False), 0.5)
  np.testing.assert_allclose(ls.collapse_fraction(v, 0.1, relative=True), 0.75)


def test_effective_unembedding_reproduces_prediction_channel(ckpts):
  params = ckpts[1]
  rng = np.random.default_rng(0)
  h = rng.normal(size=(10, MODEL.d_model)).astype(np.float32)
  ln0 = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
  full = (ln0 * params["ln_f"]["scale"] + params["ln_f"]["bias"]) @ params["unembed"]["kernel"]
  full = full + params["unembed"]["bias"]
  w_eff, b_eff = ls.unembedding_effective(params)
  np.testing.assert_allclose(
    ln0 @ np.asarray(w_eff) + float(b_eff), full[:, 0], rtol=1e-5, atol=1e-5
  )


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------


def test_plots_write_pngs(tmp_path, behaviour3, structure3):
  steps = np.array([0, 10, 1000])
  pb = lr_viz.plot_behaviour(
    steps, behaviour3, str(tmp_path / "b" / "behaviour.png"), boundaries=(100,), title="behaviour"
  )
  ps = lr_viz.plot_structure(steps, structure3, str(tmp_path / "structure.png"), boundaries=(100,))
  for path in (pb, ps):
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path / "b")) == ["behaviour.png"]
  scalars = lb.scalar_metrics(structure3)
  assert "attn_entropy/L0H1" in scalars and "tok_embed_sv" not in scalars


def _curves(ax):
  """The y data of the data lines of `ax` (axhline / axvline have 2 points)."""
  return [
    np.asarray(line.get_ydata(), float) for line in ax.get_lines() if len(line.get_ydata()) > 2
  ]


def test_behaviour_figure_draws_identical_series_once(behaviour3):
  """behaviour.png drew dist_prior on top of dist_zero (and the prior baseline on the
  zero baseline): with the infinite task prior t̄ = 0 they are the same numbers."""
  np.testing.assert_array_equal(behaviour3["dist_zero"], behaviour3["dist_prior"])
  fig = lr_viz.behaviour_figure(np.array([0, 10, 1000]), behaviour3)
  for ax in fig.axes:
    for a, b in itertools.combinations(_curves(ax), 2):
      assert not (a.shape == b.shape and np.array_equal(a, b, equal_nan=True)), ax.get_title()
  distances = fig.axes[1].get_legend_handles_labels()[1]
  assert len(distances) == 2 and "to zero prediction = to task prior" in distances[0]
  baselines = fig.axes[5].get_legend_handles_labels()[1]
  assert "zero = prior" in baselines and "prior" not in baselines


def test_structure_figure_shows_relative_singular_values_and_ln_quantiles(structure3):
  steps = np.array([0, 10, 1000])
  fig = lr_viz.structure_figure(steps, structure3)
  for ax, name in ((fig.axes[0], "tok_embed_sv"), (fig.axes[1], "pos_embed_sv")):
    sv = np.asarray(structure3[name], float)
    curves = _curves(ax)  # s_k / s_1 for k >= 2: a collapse shows even while s_1 grows
    assert len(curves) == sv.shape[1] - 1
    for k, y in enumerate(curves, start=1):
      np.testing.assert_allclose(y, sv[:, k] / sv[:, 0], rtol=1e-6)
    assert ax.get_legend_handles_labels()[1][0] == "$s_{2} / s_1$"
  # The collapsed fractions stay 0 here, but the panel shows the moving percentiles.
  norms = [k.split("/", 1)[1] for k in structure3 if k.startswith("ln_collapse/")]
  assert norms and all(np.all(np.asarray(structure3[f"ln_collapse/{n}"]) == 0) for n in norms)
  ln = fig.axes[5]
  by_label = dict(zip(ln.get_legend_handles_labels()[1], ln.get_legend_handles_labels()[0]))
  for n in norms:
    for q in ("10", "50"):
      y = np.asarray(by_label[f"{n} q{q}"].get_ydata(), float)
      np.testing.assert_allclose(y, structure3[f"ln_scale_q{q}/{n}"], rtol=1e-6)
    assert np.ptp(by_label[f"{n} q10"].get_ydata()) > 0
  assert "unembed w_eff q50" in by_label
