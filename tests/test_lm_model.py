import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from devinterp_jax.models.attention_lm import AttentionOnlyLM, param_count
from devinterp_jax.sampling import restrict

TINY = dict(vocab_size=50, context_length=16, d_model=16, num_heads=2, num_layers=2)


def tiny(**kw) -> AttentionOnlyLM:
  return AttentionOnlyLM(**{**TINY, **kw})


def shapes(model):
  return jax.eval_shape(model.init_params, jax.random.key(0))


@pytest.fixture(scope="module")
def tiny_setup():
  """Tiny model, random params of its shapes (no init: slow to compile) and tokens [3, 12]."""
  model = tiny()
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
    lambda path, s: jnp.asarray(
      (1.0 if restrict.path_name(path).endswith("/scale") else 0.0) + rng.normal(0, 0.2, s.shape),
      s.dtype,
    ),
    shapes(model),
  )
  tokens = jnp.asarray(rng.integers(0, TINY["vocab_size"], (3, 12)), jnp.int32)
  return model, params, tokens


def zeros_like_shapes(tree):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def set_leaf(params, path, value):
  """A copy of `params` with the leaf at '/'-joined `path` replaced."""

  def go(tree, keys):
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else go(tree[keys[0]], keys[1:])
    return out

  return go(params, path.split("/"))


@pytest.mark.parametrize("num_layers,expected", [(2, 3_355_016), (1, 3_091_336)])
def test_exact_parameter_counts(num_layers, expected):
  assert param_count(shapes(AttentionOnlyLM(num_layers=num_layers))) == expected


def test_param_layout_and_restrict_selectors():
  p = zeros_like_shapes(shapes(AttentionOnlyLM()))
  attn = p["block_0"]["attn"]
  assert attn["w_q"].shape == attn["w_k"].shape == attn["w_v"].shape == (256, 8, 32)
  assert attn["w_o"].shape == (8, 32, 256) and attn["b_q"].shape == (8, 32)
  assert attn["b_o"].shape == (256,)
  names, masks = restrict.all_heads(p)
  assert names == [f"L{l}H{h}" for l in range(2) for h in range(8)]
  np.testing.assert_array_equal(
    restrict.num_selected(masks, leading_axes=1), np.full(16, 4 * 256 * 32 + 3 * 32)
  )
  del masks
  counts = {
    g: restrict.num_selected(restrict.by_group(p, g))
    for g in ("token_embed", "pos_embed", "unembed", "layer_norms", "attention")
  }
  assert counts == {
    "token_embed": 5000 * 256,
    "pos_embed": 1024 * 256,
    "unembed": 256 * 5000 + 5000,
    "layer_norms": 3 * 2 * 256,
    "attention": 2 * (4 * 256 * 256 + 4 * 256),
  }
  assert restrict.num_selected(restrict.by_layer(p, 1)) == 4 * 256 * 256 + 4 * 256 + 2 * 256


def test_init_scheme():
  model = tiny(num_layers=1)
  p = model.init_params(jax.random.key(0))
  assert param_count(p) == param_count(shapes(model))
  named = {restrict.path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p)}
  weights = (
    "token_embed/embedding",
    "pos_embed",
    "block_0/attn/w_q",
    "block_0/attn/w_k",
    "block_0/attn/w_v",
    "block_0/attn/w_o",
    "unembed/kernel",
  )
  for name, x in named.items():
    if name in weights:  # TransformerLens: N(0, (0.8/√d_model)²) = N(0, 0.2²) here
      assert 0.15 < x.std() < 0.25 and abs(x.mean()) < 0.05, name
    elif name.endswith("scale"):
      np.testing.assert_array_equal(x, 1.0)
    else:  # biases, LayerNorm biases
      np.testing.assert_array_equal(x, 0.0)
  assert len(named) == 16


def test_from_config():
  config = ml_collections.ConfigDict(dict(model=dict(TINY)))
  model = AttentionOnlyLM.from_config(config)
  assert {k: getattr(model, k) for k in TINY} == TINY and model.d_head == 8
  config.model.d_mlp = 4
  with pytest.raises(ValueError, match="d_mlp"):
    AttentionOnlyLM.from_config(config)


def test_causality(tiny_setup):
  model, p, toks = tiny_setup
  out = model.logits(p, toks)
  assert out.shape == (3, 12, 50)
  for i in [0, 4, 9]:
    perturbed = toks.at[:, i + 1 :].set((toks[:, i + 1 :] + 7) % 50)
    out2 = model.logits(p, perturbed)
    np.testing.assert_allclose(out[:, : i + 1], out2[:, : i + 1], atol=1e-5)
    assert not np.allclose(out[:, i + 1 :], out2[:, i + 1 :], atol=1e-4)


def test_attention_patterns_are_causal_distributions(tiny_setup):
  model, p, toks = tiny_setup
  attn = np.asarray(model.attention_patterns(p, toks))
  assert attn.shape == (2, 3, 2, 12, 12)
  np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
  assert np.all(attn[..., np.triu(np.ones((12, 12), bool), k=1)] == 0)


def test_shortformer_pos_embed_enters_only_queries_and_keys(tiny_setup):
  model, p, toks = tiny_setup
  new_pos = jax.random.normal(jax.random.key(5), p["pos_embed"].shape)
  uniform = p
  for l in range(2):  # W_Q = W_K = 0: constant scores, uniform causal attention
    for w in ("w_q", "w_k"):
      uniform = set_leaf(uniform, f"block_{l}/attn/{w}", jnp.zeros_like(p[f"block_{l}"]["attn"][w]))
  attn = np.asarray(model.attention_patterns(uniform, toks))
  np.testing.assert_allclose(attn[..., 5, :6], 1 / 6, rtol=1e-6)
  # Neither the values nor the residual stream see W_pos.
  np.testing.assert_array_equal(
    model.logits(uniform, toks), model.logits(set_leaf(uniform, "pos_embed", new_pos), toks)
  )
  # With nonzero W_Q/W_K it does change the patterns and the logits.
  moved = set_leaf(p, "pos_embed", new_pos)
  assert not np.allclose(
    model.attention_patterns(p, toks), model.attention_patterns(moved, toks), atol=1e-4
  )
  assert not np.allclose(model.logits(p, toks), model.logits(moved, toks), atol=1e-4)


def test_pos_ablation_replaces_pos_embed_by_its_mean(tiny_setup):
  model, p, toks = tiny_setup
  mean_pos = jnp.broadcast_to(p["pos_embed"].mean(0), p["pos_embed"].shape)
  manual = model.logits(set_leaf(p, "pos_embed", mean_pos), toks)
  np.testing.assert_allclose(model.logits(p, toks, pos_ablation=True), manual, atol=1e-5)
  batch = {"tokens": toks}
  np.testing.assert_allclose(
    model.pos_ablated_loss(p, batch),
    model.loss(set_leaf(p, "pos_embed", mean_pos), batch),
    rtol=1e-5,
  )
  assert not np.isclose(model.pos_ablated_loss(p, batch), model.loss(p, batch), rtol=1e-4)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 0)])
def test_zeroing_head_slices_equals_zero_ablation(tiny_setup, layer, head):
  model, p, toks = tiny_setup
  keep = jnp.ones((2, 2)).at[layer, head].set(0.0)
  ablated = model.logits(p, toks, head_keep=keep)
  a = p[f"block_{layer}"]["attn"]
  no_o = set_leaf(p, f"block_{layer}/attn/w_o", a["w_o"].at[head].set(0.0))
  no_v = set_leaf(
    set_leaf(p, f"block_{layer}/attn/w_v", a["w_v"].at[:, head].set(0.0)),
    f"block_{layer}/attn/b_v",
    a["b_v"].at[head].set(0.0),
  )
  np.testing.assert_allclose(model.logits(no_o, toks), ablated, atol=1e-5)
  np.testing.assert_allclose(model.logits(no_v, toks), ablated, atol=1e-5)
  assert not np.allclose(model.logits(p, toks), ablated, atol=1e-4)


def test_per_token_loss_matches_hand_computed_cross_entropy(tiny_setup):
  model, p, toks = tiny_setup
  logits = np.asarray(model.logits(p, toks), np.float64)
  t = np.asarray(toks)
  want = np.zeros((3, 11))
  for b in range(3):
    for i in range(11):
      z = logits[b, i]
      want[b, i] = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[t[b, i + 1]]
  got = model.per_token_loss(p, toks)
  assert got.shape == (3, 11)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  batch = {"tokens": toks}
  np.testing.assert_allclose(model.per_position_loss(p, batch), want.mean(0), rtol=1e-5)
  np.testing.assert_allclose(model.loss(p, batch), want.mean(), rtol=1e-5)


def test_uniform_logits_give_log_vocab(tiny_setup):
  model, p, toks = tiny_setup
  p = set_leaf(
    set_leaf(p, "unembed/kernel", jnp.zeros_like(p["unembed"]["kernel"])),
    "unembed/bias",
    jnp.zeros_like(p["unembed"]["bias"]),
  )
  np.testing.assert_allclose(model.loss(p, {"tokens": toks}), np.log(50), rtol=1e-6)


def test_mean_ablation_protocol(tiny_setup):
  model, p, toks = tiny_setup
  batch = {"tokens": toks}
  heads = model.head_activations(p, batch)
  assert heads["attn"].shape == (2, 3, 2, 12, 12)
  assert heads["z"].shape == (2, 3, 12, 2, 8) and heads["contrib"].shape == (2, 3, 12, 2, 16)
  mean = heads["z"].mean(axis=1)  # [L, T, H, E]
  ones = jnp.ones((2, 2))
  np.testing.assert_array_equal(
    model.logits(p, toks, head_keep=ones, head_mean=mean), model.logits(p, toks)
  )
  np.testing.assert_array_equal(model.ablated_loss(p, batch, ones, mean), model.loss(p, batch))
  # Σ_h contrib + b_O is each block's residual update: rebuild the logits by hand.
  x = np.asarray(p["token_embed"]["embedding"])[np.asarray(toks)]
  for l in range(2):
    x = x + np.asarray(heads["contrib"][l]).sum(2) + np.asarray(p[f"block_{l}"]["attn"]["b_o"])
  ln = p["ln_f"]
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * np.asarray(
    ln["scale"]
  ) + np.asarray(ln["bias"])
  want = x @ np.asarray(p["unembed"]["kernel"]) + np.asarray(p["unembed"]["bias"])
  np.testing.assert_allclose(model.logits(p, toks), want, atol=1e-4)
  # Mean-ablating every head on a batch of identical sequences changes nothing.
  same = {"tokens": jnp.tile(toks[:1], (3, 1))}
  z_same = model.head_activations(p, same)["z"].mean(axis=1)
  np.testing.assert_allclose(
    model.ablated_loss(p, same, jnp.zeros((2, 2)), z_same), model.loss(p, same), rtol=1e-5
  )
  assert model.ablated_loss(p, batch, jnp.zeros((2, 2)), mean) != model.loss(p, batch)


def test_errors_name_the_problem(tiny_setup):
  model, p, toks = tiny_setup
  with pytest.raises(ValueError, match="head_keep has shape"):
    model.logits(p, toks, head_keep=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="head_mean has shape"):
    model.logits(p, toks, head_keep=jnp.ones((2, 2)), head_mean=jnp.zeros((2, 11, 2, 8)))
  with pytest.raises(ValueError, match="head_mean given without head_keep"):
    model.logits(p, toks, head_mean=jnp.zeros((2, 12, 2, 8)))
  with pytest.raises(ValueError, match="integer dtype"):
    model.logits(p, toks.astype(jnp.float32))
  with pytest.raises(ValueError, match="want \\(batch, tokens\\)"):
    model.logits(p, toks[0])
  with pytest.raises(ValueError, match="context_length = 16"):
    model.logits(p, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="outside \\[0, vocab_size\\)"):
    model.logits(p, toks.at[0, 0].set(50))
  with pytest.raises(ValueError, match="at least 2 tokens"):
    model.loss(p, {"tokens": toks[:, :1]})
  with pytest.raises(ValueError, match="'tokens'"):
    model.loss(p, {"xs": toks})
  # Static checks hold under jit too (the id range cannot be checked there).
  with pytest.raises(ValueError, match="integer dtype"):
    jax.jit(model.loss)(p, {"tokens": toks.astype(jnp.float32)})
