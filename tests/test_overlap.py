"""Functional overlap of attention heads (analysis/overlap.py) and the model's
mean-ablation hook, on constructed models whose overlaps are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devinterp_jax.analysis import overlap
from devinterp_jax.experiments.icl_regression import behaviour as lr_behaviour
from devinterp_jax.data.regression import RegressionTask
from devinterp_jax.models.regression_transformer import to_tokens
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.viz import figures as viz_figures
from devinterp_jax.viz import overlap as overlap_viz

BETA = 40.0  # attention logit of a head's target: softmax is one-hot to ~1e-17
T_TOY = 8
VALUE, VALUE2, MARKER = 0, 1, 2  # toy token channels


# ----------------------------------------------------------------------------
# A hand-written one-layer attention model implementing the overlap protocol.
# Head h: logits_ts = pos_logits[h, s] + β-content tok_s·content_w[h]; value
# tok_s·value_w[h]; scalar z (E = 1); prediction at the last query
# Σ_h readout[h]·z_h, clipped to [−1, 1] by the saturating readout.
# ----------------------------------------------------------------------------


def _toy_heads(params, tokens_BxTxF):
  T = tokens_BxTxF.shape[1]
  content_BxHxS = jnp.einsum("bsf,hf->bhs", tokens_BxTxF, params["content_w"])
  logits_BxHxTxS = (
    params["pos_logits"][None, :, None, :T] + content_BxHxS[:, :, None, :] + jnp.zeros((1, 1, T, 1))
  )
  logits_BxHxTxS = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits_BxHxTxS, -jnp.inf)
  attn_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
  v_BxSxH = jnp.einsum("bsf,hf->bsh", tokens_BxTxF, params["value_w"])
  z_BxTxHx1 = jnp.einsum("bhts,bsh->bth", attn_BxHxTxS, v_BxSxH)[..., None]
  return attn_BxHxTxS, z_BxTxHx1


def toy_activations(params, batch):
  attn, z = _toy_heads(params, batch["tokens"])
  contrib = z * params["readout"][None, None, :, None]
  return {"attn": attn[None], "z": z[None], "contrib": contrib[None]}


def _toy_loss(params, batch, keep_1xH, mean_1xTxHx1, saturating):
  _, z_BxTxHx1 = _toy_heads(params, batch["tokens"])
  keep_1x1xHx1 = keep_1xH[0][None, None, :, None]
  z_BxTxHx1 = keep_1x1xHx1 * z_BxTxHx1 + (1 - keep_1x1xHx1) * mean_1xTxHx1
  pred_B = z_BxTxHx1[:, -1, :, 0] @ params["readout"]
  if saturating:
    pred_B = jnp.clip(pred_B, -1.0, 1.0)
  return jnp.mean(jnp.square(pred_B - batch["y"]))


def toy_loss_saturating(params, batch, keep, mean):
  return _toy_loss(params, batch, keep, mean, True)


def toy_loss_linear(params, batch, keep, mean):
  return _toy_loss(params, batch, keep, mean, False)


def toy_head(kind, value_channel=VALUE, readout=1.0):
  """A head attending by position (to token 0) or by content (to the marker)."""
  pos = np.zeros(T_TOY, np.float32)
  content = np.zeros(3, np.float32)
  if kind == "position":
    pos[0] = BETA
  else:
    content[MARKER] = BETA
  value = np.zeros(3, np.float32)
  value[value_channel] = 1.0
  return pos, content, value, readout


def toy_params(*heads):
  pos, content, value, readout = zip(*heads)
  return {
    "pos_logits": jnp.asarray(np.stack(pos)),
    "content_w": jnp.asarray(np.stack(content)),
    "value_w": jnp.asarray(np.stack(value)),
    "readout": jnp.asarray(np.asarray(readout, np.float32)),
  }


def copy_task(batch_size=64, seed=0):
  """Sequences where token 0 and one marked token m ∈ [1, T − 2] both carry the
  answer: s = ±1 (balanced) in channel VALUE, s' = ±1 orthogonal to s in VALUE2;
  other tokens carry N(0, 1) distractors. Returns (tokens [B, T, 3], s, s')."""
  rng = np.random.default_rng(seed)
  b = np.arange(batch_size)
  s, s2 = (-1.0) ** b, (-1.0) ** (b // 2)  # mean 0, orthogonal: exact
  tokens = np.zeros((batch_size, T_TOY, 3), np.float32)
  tokens[:, :, :2] = rng.normal(size=(batch_size, T_TOY, 2))
  m = rng.integers(1, T_TOY - 1, size=batch_size)
  for pos in (np.zeros_like(m), m):
    tokens[b, pos, VALUE], tokens[b, pos, VALUE2] = s, s2
  tokens[b, m, MARKER] = 1.0
  return tokens, s.astype(np.float32), s2.astype(np.float32)


def toy_metrics(params, target, saturating, tokens):
  loss_fn = toy_loss_saturating if saturating else toy_loss_linear
  batch = {"tokens": jnp.asarray(tokens), "y": jnp.asarray(target, jnp.float32)}
  return jax.tree.map(np.asarray, overlap.overlap_metrics(toy_activations, loss_fn, params, batch))


def test_duplicate_head_has_overlap_and_similarity_one():
  tokens, s, _ = copy_task()
  params = toy_params(toy_head("content"), toy_head("content"))
  m = toy_metrics(params, s, True, tokens)
  np.testing.assert_allclose(m["delta"], 0.0, atol=1e-5)  # either head alone suffices
  np.testing.assert_allclose(m["delta_all"], 1.0, rtol=1e-5)  # both gone: predicts 0
  assert abs(m["overlap"][0, 1] - 1) < 0.05 and np.isnan(m["overlap"][0, 0])
  assert m["s_attn"][0, 1] > 0.99 and m["s_out"][0, 1] > 0.99
  np.testing.assert_allclose(m["robustness"], 1.0, atol=1e-5)


def test_positional_and_content_heads_are_degenerate():
  tokens, s, _ = copy_task()
  params = toy_params(toy_head("position"), toy_head("content"))
  m = toy_metrics(params, s, True, tokens)
  assert m["overlap"][0, 1] > 0.8
  assert m["s_attn"][0, 1] < 0.3
  assert m["s_out"][0, 1] > 0.5  # same answer at the readout, different patterns


def test_additive_heads_have_zero_overlap():
  tokens, s, s2 = copy_task()
  params = toy_params(toy_head("position", VALUE), toy_head("content", VALUE2))
  m = toy_metrics(params, s + s2, False, tokens)
  np.testing.assert_allclose(m["clean_loss"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["delta"], [1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(m["delta_all"], 2.0, rtol=1e-5)
  assert abs(m["overlap"][0, 1]) < 1e-4
  assert abs(m["robustness"]) < 1e-4


def test_robustness_and_overlap_hand_checked():
  # Linear readout, heads 0 and 1 both read s (duplicates), head 2 reads s' ⟂ s:
  # Δ_i = 1, Δ_01 = E(2s)² = 4, Δ_02 = Δ_12 = 2, Δ_all = E(2s + s')² = 5.
  tokens, s, s2 = copy_task()
  params = toy_params(toy_head("position"), toy_head("position"), toy_head("content", VALUE2))
  m = toy_metrics(params, 2 * s + s2, False, tokens)
  np.testing.assert_allclose(m["delta"], [1, 1, 1], rtol=1e-5)
  np.testing.assert_allclose(m["delta_pair"], [[1, 4, 2], [4, 1, 2], [2, 2, 1]], rtol=1e-5)
  np.testing.assert_allclose(m["delta_all"], 5.0, rtol=1e-5)
  np.testing.assert_allclose(m["robustness"], 1 - 3 / 5, rtol=1e-5)
  np.testing.assert_allclose(m["overlap"][[0, 0, 1], [1, 2, 2]], [0.5, 0, 0], atol=1e-5)
  np.testing.assert_allclose([m["overlap_mean"], m["overlap_max"]], [1 / 6, 0.5], atol=1e-5)
  np.testing.assert_allclose(m["s_attn"][0, 1], 1.0, atol=1e-6)
  batch = {"tokens": jnp.asarray(tokens), "y": jnp.asarray(2 * s + s2)}
  blocked = overlap.overlap_metrics(toy_activations, toy_loss_linear, params, batch, mask_batch=3)
  np.testing.assert_allclose(blocked["delta_pair"], m["delta_pair"], rtol=1e-6)


def test_zero_denominators_give_nan():
  # Heads with readouts +1 and −1 on the same value cancel: Δ_01 = Δ_all = 0.
  tokens, s, _ = copy_task()
  params = toy_params(toy_head("position", readout=1.0), toy_head("position", readout=-1.0))
  m = toy_metrics(params, np.zeros_like(s), False, tokens)
  np.testing.assert_allclose(m["delta"], [1, 1], rtol=1e-5)
  assert abs(m["delta_pair"][0, 1]) < 1e-6
  assert np.isnan(m["overlap"]).all() and np.isnan(m["robustness"])
  assert np.isnan(m["overlap_mean"]) and np.isnan(m["overlap_max"])
  np.testing.assert_allclose(m["s_out"][0, 1], -1.0, atol=1e-6)


def test_overlap_from_deltas_single_head_and_guard():
  out = overlap.overlap_from_deltas(jnp.array([2.0]), jnp.array([[2.0]]), jnp.array(2.0), 1e-6)
  assert np.isnan(out["overlap_mean"]) and float(out["robustness"]) == 0.0
  assert overlap.head_names(2, 2) == ["L0H0", "L0H1", "L1H0", "L1H1"]
  keep, i, j = overlap.ablation_masks(1, 3)
  assert keep.shape == (1 + 3 + 3 + 1, 1, 3) and list(zip(i, j)) == [(0, 1), (0, 2), (1, 2)]


# ----------------------------------------------------------------------------
# The regression transformer's hook.
# ----------------------------------------------------------------------------

MODEL = RegressionTransformer(
  task_size=2, max_examples=4, d_model=8, d_mlp=8, num_heads=2, num_layers=2
)
TASK = RegressionTask(task_size=2, max_examples=4)


def _params(seed, head_scale=1.0):
  """Random params of MODEL without `init` (whose per-shape RNG compiles are slow
  here): U(±1/√fan_in)-like weights, LayerNorm scale 1 and bias 0; the attention
  outputs W_O scaled by `head_scale` so that heads matter."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(MODEL.init_params, jax.random.key(0))

  def leaf(path, shape):
    names = [getattr(k, "key", "") for k in path]
    if any(n.startswith("ln") for n in names):
      return jnp.full(shape.shape, float(names[-1] == "scale"), shape.dtype)
    scale = head_scale if names[-1] == "w_o" else 1.0
    return jnp.asarray(scale * rng.uniform(-0.35, 0.35, shape.shape), shape.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _batch(batch_size=8, seed=1):
  """A regression batch {'xs' [B, K, D], 'ys' [B, K]} (numpy, no compile)."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(batch_size, TASK.max_examples, TASK.task_size))
  ys = np.einsum("bkd,bd->bk", xs, rng.normal(size=(batch_size, TASK.task_size)))
  ys += 0.3 * rng.normal(size=ys.shape)
  return {"xs": jnp.asarray(xs, jnp.float32), "ys": jnp.asarray(ys, jnp.float32)}


def _symmetric_batch():
  """16 sequences and their negatives (batch means of odd features vanish)."""
  return jax.tree.map(lambda x: jnp.concatenate([x, -x]), _batch(16, seed=2))


def test_model_hook_keeps_default_outputs():
  params = _params(0)
  b = _batch()
  tokens = to_tokens(b["xs"], b["ys"])
  out = MODEL.apply({"params": params}, tokens)
  heads = MODEL.head_activations(params, b)
  L, B, T, H, E = heads["z"].shape
  assert (L, B, T, H, E) == (2, 8, 8, 2, 4) and heads["attn"].shape == (2, 8, 2, 8, 8)
  keep = jnp.ones((L, H))
  np.testing.assert_array_equal(
    MODEL.apply({"params": params}, tokens, head_keep=keep, head_mean=jnp.mean(heads["z"], 1)), out
  )
  np.testing.assert_array_equal(MODEL.ablated_loss(params, b, keep, None), MODEL.loss(params, b))
  # Per-head contributions add up to the attention output (layer 0 sees the clean input).
  attn_out = jnp.einsum("bthe,hed->btd", heads["z"][0], params["block_0"]["attn"]["w_o"])
  np.testing.assert_allclose(heads["contrib"][0].sum(2), attn_out, atol=1e-5)
  # Identical sequences: the batch mean is each sequence's own value.
  same = jax.tree.map(lambda x: jnp.repeat(x[:1], 8, axis=0), b)
  mean = jnp.mean(MODEL.head_activations(params, same)["z"], axis=1)
  np.testing.assert_allclose(
    MODEL.ablated_loss(params, same, jnp.zeros((L, H)), mean), MODEL.loss(params, same), rtol=1e-5
  )
  # Zero-ablation (mean None) of a head equals zeroing its value weights.
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["block_1"]["attn"]["w_v"] = params["block_1"]["attn"]["w_v"].at[:, 1].set(0.0)
  np.testing.assert_allclose(
    MODEL.ablated_loss(params, b, jnp.array([[1.0, 1.0], [1.0, 0.0]]), None),
    MODEL.loss(zeroed, b),
    rtol=1e-5,
  )


def test_model_hook_rejects_wrong_shapes():
  params = _params(0)
  b = _batch()
  tokens = to_tokens(b["xs"], b["ys"])
  with pytest.raises(ValueError, match=r"head_keep has shape \(2,\), want \(num_layers, "):
    MODEL.apply({"params": params}, tokens, head_keep=jnp.ones(2))
  with pytest.raises(ValueError, match=r"head_mean has shape \(2, 8, 2, 3\)"):
    MODEL.apply(
      {"params": params}, tokens, head_keep=jnp.ones((2, 2)), head_mean=jnp.zeros((2, 8, 2, 3))
    )
  with pytest.raises(ValueError, match="head_mean given without head_keep"):
    MODEL.apply({"params": params}, tokens, head_mean=jnp.zeros((2, 8, 2, 4)))
  with pytest.raises(ValueError, match="must return a scalar"):
    overlap.overlap_metrics(
      toy_activations,
      lambda p, b, k, m: jnp.zeros(3),
      toy_params(toy_head("position")),
      {"tokens": jnp.zeros((2, T_TOY, 3)), "y": jnp.zeros(2)},
    )


def _duplicate_params(seed=4, scale=1e3):
  """Head 1 of layer 0 an exact copy of head 0, both writing `scale`× into the
  residual; no positional embedding, so the model is odd in its input up to the
  LayerNorms and the heads' batch mean is 0 on a ± symmetric batch. The
  LayerNorms then make one copy as good as two."""
  params = _params(seed)
  params["pos_embed"] = jnp.zeros_like(params["pos_embed"])
  attn = params["block_0"]["attn"]
  for name in ("w_q", "w_k", "w_v"):
    attn[name] = attn[name].at[:, 1].set(attn[name][:, 0])
  attn["w_o"] = attn["w_o"].at[1].set(attn["w_o"][0]).at[:2].multiply(scale)
  return params


def test_duplicate_head_in_the_regression_transformer():
  sym = _symmetric_batch()
  m = jax.tree.map(
    np.asarray,
    overlap.overlap_metrics(MODEL.head_activations, MODEL.ablated_loss, _duplicate_params(), sym),
  )
  assert m["s_attn"][0, 1] > 0.999 and m["s_out"][0, 1] > 0.999
  np.testing.assert_allclose(m["delta"][0], m["delta"][1], rtol=1e-4, atol=1e-6)
  assert abs(m["overlap"][0, 1] - 1) < 0.05


def _toy_checkpoints():
  """Three 3-head toy checkpoints with soft attention and varied readouts."""
  heads = (toy_head("position"), toy_head("position"), toy_head("content", VALUE2))
  out = []
  for sharpness, readout in (
    (1.0, [1.0, 1.0, 1.0]),
    (0.1, [1.0, 0.5, 2.0]),
    (0.03, [2.0, -1.0, 0.3]),
  ):
    p = toy_params(*heads)
    out.append(
      {
        **p,
        "pos_logits": sharpness * p["pos_logits"] + jnp.arange(T_TOY)[None] * 0.2,
        "content_w": sharpness * p["content_w"],
        "readout": jnp.asarray(readout),
      }
    )
  return out


def test_over_checkpoints_matches_single_checkpoints():
  tokens, s, s2 = copy_task()
  batch = {"tokens": jnp.asarray(tokens), "y": jnp.asarray(2 * s + s2)}
  ckpts = _toy_checkpoints()
  stacked = overlap.overlap_over_checkpoints(
    toy_activations, toy_loss_linear, ckpts, batch, checkpoint_chunk=2
  )  # 2 chunks, the last padded
  assert stacked["overlap"].shape == (3, 3, 3) and stacked["robustness"].shape == (3,)
  for c, params in enumerate(ckpts):
    single = overlap.overlap_metrics(toy_activations, toy_loss_linear, params, batch)
    for key, value in single.items():
      np.testing.assert_allclose(stacked[key][c], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_over_checkpoints_regression_transformer(tmp_path):
  sym = _symmetric_batch()
  ckpts = [_duplicate_params(), _params(1, head_scale=3.0), _params(2, head_scale=10.0)]
  stacked = overlap.overlap_over_checkpoints(
    MODEL.head_activations, MODEL.ablated_loss, ckpts, sym, checkpoint_chunk=2
  )
  for c, params in enumerate(ckpts):
    single = jax.tree.map(
      np.asarray, overlap.overlap_metrics(MODEL.head_activations, MODEL.ablated_loss, params, sym)
    )
    for key in ("clean_loss", "s_attn", "s_out"):
      np.testing.assert_allclose(stacked[key][c], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Δ = L(ablated) − L₀ loses the losses' relative precision: compare at 1e-5 · L₀.
    for key in ("delta", "delta_pair", "delta_all"):
      np.testing.assert_allclose(
        stacked[key][c], single[key], rtol=0, atol=1e-5 * single["clean_loss"], err_msg=key
      )
    big = np.abs(single["delta_pair"]) > 1e-2
    np.testing.assert_allclose(stacked["overlap"][c][big], single["overlap"][big], rtol=1e-3)
  names = overlap.head_names(MODEL.num_layers, MODEL.num_heads)
  cols = overlap.scalar_columns(stacked, names)
  assert cols["delta/L1H0"].shape == (3,) and cols["robustness"].shape == (3,)
  path = overlap_viz.plot_overlap(
    [10, 100, 1000], stacked, names, str(tmp_path / "o.png"), boundaries=[50]
  )
  assert (tmp_path / "o.png").stat().st_size > 0 and path.endswith("o.png")


def test_lr_overlap_builds_the_evaluation_batch():
  # Two checkpoints and 32 sequences: the shapes (and program) of the test above.
  metrics, names = lr_behaviour.lr_overlap(
    MODEL, [_params(1, head_scale=3.0), _params(2)], TASK, jax.random.key(0), batch_size=32
  )
  assert names == ["L0H0", "L0H1", "L1H0", "L1H1"]
  assert metrics["overlap"].shape == (2, 4, 4) and np.isfinite(metrics["clean_loss"]).all()
  with pytest.raises(ValueError, match="does not fit"):
    lr_behaviour.lr_overlap(MODEL, [_params(1)], RegressionTask(task_size=3), jax.random.key(0))


def _overlap_run(R=8, C=5):
  """Metrics of C checkpoints × R heads shaped like `overlap_over_checkpoints`: the
  first checkpoint barely reacts to ablation (Δ_all 1 % of the max) and spikes to
  O = 2.58; the last has O down to −2.2."""
  rng = np.random.default_rng(0)
  o = rng.uniform(-0.5, 0.8, size=(C, R, R))
  o[-1, 0, 1] = o[-1, 1, 0] = -2.2
  o[0, 2, 3] = o[0, 3, 2] = 2.58
  for c in range(C):
    np.fill_diagonal(o[c], np.nan)
  upper = o[(slice(None), *np.triu_indices(R, k=1))]
  delta_all = np.array([0.01, 0.3, 0.6, 0.9, 1.0])
  return np.array([0, 10, 100, 1000, 10000]), {
    "overlap": o,
    "s_attn": rng.uniform(-1, 1, (C, R, R)),
    "s_out": rng.uniform(-1, 1, (C, R, R)),
    "overlap_mean": np.nanmean(upper, 1),
    "overlap_max": np.nanmax(upper, 1),
    "robustness": rng.uniform(-1, 1, C),
    "delta_all": delta_all,
  }


def test_overlap_figure_spans_the_data_masks_weak_ablations_and_stays_readable():
  steps, metrics = _overlap_run()
  names = overlap.head_names(2, 4)
  fig = overlap_viz.overlap_figure(steps, metrics, names, boundaries=[50])
  o_img = fig.axes[0].images[0]
  assert o_img.get_clim() == pytest.approx((-2.2, 2.2))  # was clipped at ±1
  assert fig.axes[1].images[0].get_clim() == (-1.0, 1.0)  # correlations: their range
  # At most ~1400 px wide (was 2349 × 570) and each heatmap cell at least 0.3 inch.
  width, height = fig.get_size_inches() * viz_figures.DPI
  assert width <= 1400 and height <= 1200
  fig.canvas.draw()
  cell = fig.axes[0].get_window_extent().width / fig.dpi / len(names)
  assert cell >= 0.3, cell
  # Weak-ablation checkpoints (|Δ_all| < 5 % of the max) are masked, hatched, and named.
  np.testing.assert_array_equal(
    overlap_viz.weak_ablation_mask(metrics["delta_all"]), [True, False, False, False, False]
  )
  ax = fig.axes[3]
  lines = {line.get_label(): np.asarray(line.get_ydata(), float) for line in ax.get_lines()}
  assert np.isnan(lines["max off-diagonal O"][0]) and np.nanmax(lines["max off-diagonal O"]) < 2
  np.testing.assert_allclose(lines["max off-diagonal O"][1:], metrics["overlap_max"][1:])
  assert any(p.get_hatch() == "///" for p in ax.patches)
  assert "hatched: 1 checkpoint with Δ_all < 5% of max" in ax.get_title()
  assert "masked" not in fig.axes[0].get_title()  # the last checkpoint is not weak
  # Without Δ_all nothing is masked; a weak last checkpoint hatches the O heatmap.
  unmasked = overlap_viz.overlap_figure(
    steps, {k: v for k, v in metrics.items() if k != "delta_all"}, names
  )
  assert not [p for p in unmasked.axes[3].patches if p.get_hatch()]
  weak_last = overlap_viz.overlap_figure(
    steps, {**metrics, "delta_all": metrics["delta_all"][::-1]}, names
  )
  assert "masked: weak ablation" in weak_last.axes[0].get_title()
