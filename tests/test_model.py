import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devinterp_jax.data.regression import RegressionTask, sample_batch
from devinterp_jax.models.regression_transformer import to_tokens
from devinterp_jax.models.regression_transformer import RegressionTransformer, param_count


@pytest.mark.parametrize("out_proj,expected", [(True, 51_717), (False, 43_525)])
def test_exact_parameter_counts(out_proj, expected):
  model = RegressionTransformer(attn_out_proj=out_proj)
  assert param_count(model.init_params(jax.random.key(0))) == expected


def test_head_axis_layout():
  p = RegressionTransformer().init_params(jax.random.key(0))
  attn = p["block_0"]["attn"]
  assert attn["w_q"].shape == attn["w_k"].shape == attn["w_v"].shape == (64, 4, 16)
  assert attn["w_o"].shape == (4, 16, 64)


def test_zeroing_one_head_changes_only_that_heads_output():
  model = RegressionTransformer(num_layers=1, double_residual=False)
  p = model.init_params(jax.random.key(0))
  b = sample_batch(jax.random.key(1), RegressionTask(), 8)
  _, attn = model.predict(p, b["xs"], b["ys"], return_attention=True)
  p2 = jax.tree.map(lambda x: x, p)
  p2["block_0"]["attn"]["w_v"] = p["block_0"]["attn"]["w_v"].at[:, 2].set(0.0)
  _, attn2 = model.predict(p2, b["xs"], b["ys"], return_attention=True)
  # Values do not affect patterns; but the head's value slice is its own.
  np.testing.assert_allclose(attn, attn2, atol=1e-6)
  assert not np.allclose(model.predict(p, b["xs"], b["ys"]), model.predict(p2, b["xs"], b["ys"]))


@pytest.mark.parametrize("double_residual", [True, False])
def test_causality(double_residual):
  model = RegressionTransformer(double_residual=double_residual)
  p = model.init_params(jax.random.key(0))
  b = sample_batch(jax.random.key(1), RegressionTask(), 4)
  toks = to_tokens(b["xs"], b["ys"])
  out = model.apply({"params": p}, toks)
  for i in [0, 5, 10]:
    perturbed = toks.at[:, i + 1 :].add(
      jax.random.normal(jax.random.key(i), toks[:, i + 1 :].shape)
    )
    out2 = model.apply({"params": p}, perturbed)
    np.testing.assert_allclose(out[:, : i + 1], out2[:, : i + 1], atol=1e-5)
    assert not np.allclose(out[:, i + 1 :], out2[:, i + 1 :], atol=1e-3)


def test_attention_patterns_are_causal_distributions():
  model = RegressionTransformer()
  p = model.init_params(jax.random.key(0))
  b = sample_batch(jax.random.key(1), RegressionTask(), 3)
  preds, attn_LxBxHxTxS = model.predict(p, b["xs"], b["ys"], return_attention=True)
  assert preds.shape == (3, 8) and attn_LxBxHxTxS.shape == (2, 3, 4, 16, 16)
  np.testing.assert_allclose(attn_LxBxHxTxS.sum(-1), 1.0, rtol=1e-5)
  upper = np.triu(np.ones((16, 16), bool), k=1)
  assert np.all(np.asarray(attn_LxBxHxTxS)[..., upper] == 0)


def test_double_residual_flag_changes_function():
  p = RegressionTransformer().init_params(jax.random.key(0))
  b = sample_batch(jax.random.key(1), RegressionTask(), 4)
  a = RegressionTransformer(double_residual=True).predict(p, b["xs"], b["ys"])
  c = RegressionTransformer(double_residual=False).predict(p, b["xs"], b["ys"])
  assert not np.allclose(a, c)


def test_bad_token_width_is_refused():
  model = RegressionTransformer()
  p = model.init_params(jax.random.key(0))
  with pytest.raises(ValueError, match="token width"):
    model.apply({"params": p}, jnp.zeros((1, 16, 7)))
