"""Weight-restricted (refined) LLCs: masks, exactness against a smaller model, all heads at once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import devinterp_jax as dj
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling import restrict, sgld


def _quadratic():
  h = {"a": jnp.array([1.0, 2.0, 4.0]), "b": jnp.array([0.5, 3.0])}

  def loss_fn(params, batch):
    q = sum(jnp.sum(h[k] * (params[k] - batch["shift"].mean()) ** 2) for k in h)
    return 0.5 * q

  data = {"shift": jnp.zeros((64,))}
  params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  return h, loss_fn, data, params


def _gradient_descent(step_size, nbeta, localization):
  """A noiseless sampler with the SGLD interface (for exact comparisons)."""

  def init_fn(params):
    return sgld.SGLDState(jnp.zeros((), jnp.int32), jnp.zeros(()))

  def update_fn(grads, state, params, *, params_star, noise_key, **extra):
    g = sgld.potential_grad(grads, params, params_star, nbeta, localization)
    return jax.tree.map(lambda x: -0.5 * step_size * x, g), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_restriction_equals_the_smaller_model_without_noise():
  h, loss_fn, data, _ = _quadratic()
  start = {"a": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array([0.4, -0.1])}
  kw = dict(
    num_chains=2,
    num_draws=50,
    step_size=1e-2,
    localization=1.0,
    nbeta=10.0,
    batch_size=8,
    seed=0,
    mala_stride=0,
    sampler=_gradient_descent,
  )
  full_loss = lambda p, batch: loss_fn(p, batch)
  res = dj.estimate_llc(full_loss, start, data, restrict=restrict.by_pattern(start, "^a$"), **kw)
  small = lambda a, batch: loss_fn({"a": a, "b": start["b"]}, batch)
  ref = dj.estimate_llc(small, start["a"], data, **kw)
  np.testing.assert_allclose(res.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(res.llc_per_chain, ref.llc_per_chain, rtol=1e-5, atol=1e-6)


def test_restricted_llc_matches_the_quadratic_formula_on_the_subset():
  h, loss_fn, data, params = _quadratic()
  nbeta, gamma = 100.0, 1.0
  res = dj.estimate_llc(
    loss_fn,
    params,
    data,
    num_chains=32,
    num_draws=4000,
    step_size=2e-4,
    localization=gamma,
    nbeta=nbeta,
    batch_size=8,
    seed=1,
    num_burnin_steps=500,
    restrict=restrict.by_pattern(params, "^a$"),
  )
  exact = 0.5 * float(jnp.sum(1.0 / (1.0 + gamma / (nbeta * h["a"]))))
  full = 0.5 * float(sum(jnp.sum(1.0 / (1.0 + gamma / (nbeta * v))) for v in h.values()))
  assert abs(res.llc_mean - exact) < 0.05 * exact, (res.llc_mean, exact)
  assert abs(res.llc_mean - full) > 0.3  # differs from the unrestricted value
  assert res.settings["num_params"] == 3


def test_all_heads_in_one_program():
  model = RegressionTransformer(d_model=16, d_mlp=16, num_heads=2, num_layers=2)
  params = model.init_params(jax.random.key(0))
  names, masks = restrict.all_heads(params)
  assert names == ["L0H0", "L0H1", "L1H0", "L1H1"]
  # w_q, w_k, w_v slices [D, E] and the w_o slice [E, D]: 4 · 16 · 8 coordinates per head
  np.testing.assert_array_equal(restrict.num_selected(masks, leading_axes=1), [512] * 4)
  union = jax.tree.map(lambda m: m.sum(0), masks)
  assert max(float(np.max(x)) for x in jax.tree.leaves(union)) == 1.0  # disjoint heads
  from devinterp_jax.data.regression import RegressionTask, make_dataset

  data = make_dataset(jax.random.key(1), RegressionTask(), 256)
  ckpts = [params, jax.tree.map(lambda x: x * 1.01, params)]
  res = dj.estimate_llcs(
    model.loss,
    ckpts,
    data,
    num_chains=2,
    num_draws=20,
    step_size=1e-4,
    localization=10.0,
    nbeta=10.0,
    batch_size=16,
    mala_stride=0,
    restrict=(names, masks),
    progress=False,
  )
  assert res.llc_mean.shape == (4, 2) and res.loss_trace.shape == (4, 2, 2, 20)
  assert np.all(np.isfinite(res.llc_mean))
  # Restriction r alone gives the same numbers as its row of the batched run.
  one = dj.estimate_llcs(
    model.loss,
    ckpts,
    data,
    num_chains=2,
    num_draws=20,
    step_size=1e-4,
    localization=10.0,
    nbeta=10.0,
    batch_size=16,
    mala_stride=0,
    restrict=jax.tree.map(lambda m: m[2], masks),
    progress=False,
  )
  np.testing.assert_allclose(one.llc_per_chain, res.llc_per_chain[2], rtol=1e-4, atol=1e-4)


def test_bad_restrictions_name_the_problem():
  _, loss_fn, data, params = _quadratic()
  with pytest.raises(ValueError, match="selects no parameter"):
    restrict.by_pattern(params, "nothing")
  with pytest.raises(ValueError, match="shape"):
    dj.estimate_llc(
      loss_fn,
      params,
      data,
      num_chains=1,
      num_draws=2,
      step_size=1e-3,
      localization=1.0,
      nbeta=1.0,
      batch_size=4,
      restrict={"a": np.ones(2), "b": np.ones(2)},
    )


def test_groups_and_layers_partition_the_lr_transformer():
  model = RegressionTransformer(d_model=16, d_mlp=16, num_heads=2, num_layers=2)
  params = model.init_params(jax.random.key(0))
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  groups = [
    restrict.by_group(params, g)
    for g in ("token_embed", "pos_embed", "unembed", "layer_norms", "mlp", "attention")
  ]
  counts = [restrict.num_selected(g) for g in groups]
  assert sum(counts) == total  # disjoint and complete
  assert counts[0] == 5 * 16 and counts[1] == 16 * 16 and counts[2] == 16 * 5 + 5
  layers = [restrict.num_selected(restrict.by_layer(params, l)) for l in range(2)]
  assert layers[0] == layers[1] == (total - counts[0] - counts[1] - counts[2] - 2 * 16) // 2
  names, heads = restrict.all_heads(params)
  per_layer_heads = restrict.num_selected(heads, leading_axes=1).reshape(2, 2).sum(1)
  assert np.all(per_layer_heads == counts[5] // 2)  # heads cover the attention weights (no biases)
  with pytest.raises(ValueError, match="unknown parameter group"):
    restrict.by_group(params, "embeddings")


def _curvature_loss(params, batch):
  return 0.5 * jnp.sum(batch["h"].mean(0) * params["w"] ** 2)


def test_data_refined_llc_matches_the_quadratic_formula():
  """Sample on data A (curvature h_A), measure the loss on data B (h_B):
  E_A[nβ (L_B(w) − L_B(w*))] = ½ Σ h_B / (h_A + γ/nβ)."""
  h_a, h_b = jnp.array([1.0, 2.0, 4.0]), jnp.array([0.5, 1.0, 3.0])
  data_a = {"h": jnp.tile(h_a, (64, 1))}
  data_b = {"h": jnp.tile(h_b, (64, 1))}
  params = {"w": jnp.zeros(3)}
  nbeta, gamma = 100.0, 1.0
  kw = dict(
    num_chains=64,
    num_draws=4000,
    step_size=2e-4,
    localization=gamma,
    nbeta=nbeta,
    batch_size=8,
    seed=3,
    num_burnin_steps=500,
  )
  res = dj.estimate_llc(_curvature_loss, params, data_a, loss_data=data_b, **kw)
  exact = 0.5 * float(jnp.sum(h_b / (h_a + gamma / nbeta)))
  assert abs(res.llc_mean - exact) < 0.05 * exact, (res.llc_mean, exact)
  assert res.settings["data_refined"] is True
  # With loss_data = data the estimate is the ordinary one.
  same = dj.estimate_llc(_curvature_loss, params, data_a, loss_data=data_a, **kw)
  plain = dj.estimate_llc(_curvature_loss, params, data_a, **kw)
  np.testing.assert_allclose(same.llc_per_chain, plain.llc_per_chain, rtol=1e-5)


def test_restrictions_of_different_sizes_share_one_program():
  """'a' (3 coordinates) and 'b' (2, padded to 3) together equal each alone, noise off;
  with noise on, the padded restriction's noise has the variance of 2 coordinates."""
  h, loss_fn, data, _ = _quadratic()
  start = {"a": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array([0.4, -0.1])}
  masks = restrict.stack([restrict.by_pattern(start, "^a$"), restrict.by_pattern(start, "^b$")])
  comp = restrict.compact(masks)
  assert comp.index.shape == (2, 3) and comp.valid is not None
  np.testing.assert_array_equal(comp.valid, [[1, 1, 1], [1, 1, 0]])
  kw = dict(
    num_chains=2,
    num_draws=50,
    step_size=1e-2,
    localization=1.0,
    nbeta=10.0,
    batch_size=8,
    seed=0,
    mala_stride=0,
    sampler=_gradient_descent,
  )
  both = dj.estimate_llcs(
    loss_fn, [start], data, restrict=(["a", "b"], masks), progress=False, **kw
  )
  for r, name in enumerate("ab"):
    other = "b" if name == "a" else "a"
    small = lambda w, batch, name=name, other=other: loss_fn({name: w, other: start[other]}, batch)
    ref = dj.estimate_llc(small, start[name], data, **kw)
    np.testing.assert_allclose(both.loss_trace[r, 0], ref.loss_trace, rtol=1e-5, atol=1e-7)
  noisy = dj.estimate_llcs(
    loss_fn,
    [start],
    data,
    restrict=(["a", "b"], masks),
    progress=False,
    **{**kw, "sampler": "sgld", "num_chains": 4, "num_draws": 400},
  )
  eps = kw["step_size"]
  mean_sq = np.mean(np.square(noisy.noise_norm), axis=(1, 2, 3))
  np.testing.assert_allclose(mean_sq, [3 * eps, 2 * eps], rtol=0.1)
  assert noisy.settings["num_params"] == [3, 2]


def test_compaction_gathers_and_embeds_exactly():
  model = RegressionTransformer(d_model=16, d_mlp=16, num_heads=2, num_layers=2)
  params = model.init_params(jax.random.key(0))
  names, masks = restrict.all_heads(params)
  comp = restrict.compact(masks)
  assert comp.valid is None and comp.index.shape == (4, 512)
  touched = {
    restrict.path_name(p)
    for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if i in comp.leaves
  }
  assert touched == {f"block_{l}/attn/{w}" for l in range(2) for w in ("w_q", "w_k", "w_v", "w_o")}
  theta = restrict.gather(params, comp.leaves, comp.index[3])
  assert theta.shape == (512,)
  np.testing.assert_array_equal(
    theta[:128], np.asarray(params["block_1"]["attn"]["w_k"][:, 1]).ravel()
  )
  moved = restrict.embed(params, comp.leaves, comp.index[3], theta + 1.0, theta)
  diff = jax.tree.map(lambda a, b: np.asarray(a - b), moved, params)
  np.testing.assert_allclose(diff["block_1"]["attn"]["w_q"][:, 1], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(diff["block_1"]["attn"]["w_q"][:, 0], 0.0)
  np.testing.assert_allclose(diff["block_1"]["attn"]["w_o"][1], 1.0, rtol=1e-6)
  assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(diff)) == pytest.approx(512, rel=1e-5)


def test_specs_name_restrictions():
  model = RegressionTransformer(d_model=16, d_mlp=16, num_heads=2, num_layers=2)
  params = model.init_params(jax.random.key(0))
  assert restrict.from_spec(params, "heads")[0] == ["L0H0", "L0H1", "L1H0", "L1H1"]
  assert restrict.from_spec(params, "layers")[0] == ["layer0", "layer1"]
  names, groups = restrict.from_spec(params, "groups")
  assert names == ["token_embed", "pos_embed", "unembed", "layer_norms", "mlp", "attention"]
  one = restrict.from_spec(params, "head:1:0")[1]
  np.testing.assert_array_equal(
    jax.tree.map(lambda m: m[0], one)["block_1"]["attn"]["w_q"],
    restrict.by_head(params, 1, 0)["block_1"]["attn"]["w_q"],
  )
  with pytest.raises(ValueError, match="bad restriction spec"):
    restrict.from_spec(params, "head:x")
  with pytest.raises(ValueError, match="selects no parameter"):
    restrict.from_spec(params, "nothing_matches")


def test_sum_over_disjoint_restrictions_is_not_the_full_llc():
  """For ½ wᵀHw the restricted LLC of coordinate i is ½/(1 + γ/(nβ H_ii)) and the full
  one ½ Σ_eig 1/(1 + γ/(nβ h)). Separable H: Σ_i λ_i = λ. Coupled H = [[1, 1], [1, 1]]
  (one flat direction): each coordinate alone is regular, so Σ_i λ_i ≈ 2 λ."""
  from devinterp_jax.experiments.refined import disjoint, restriction_sum

  nbeta, gamma = 100.0, 1.0
  params = {"w": jnp.zeros(2)}
  masks = restrict.stack([{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}])
  assert disjoint(masks)
  kw = dict(
    num_chains=32,
    num_draws=3000,
    step_size=2e-4,
    localization=gamma,
    nbeta=nbeta,
    batch_size=4,
    seed=2,
    num_burnin_steps=500,
    progress=False,
  )
  data = {"x": jnp.zeros((16,))}
  for hess in (np.diag([1.0, 3.0]), np.array([[1.0, 1.0], [1.0, 1.0]])):
    loss = lambda p, batch, h=jnp.asarray(hess): 0.5 * p["w"] @ h @ p["w"] + 0 * batch["x"].sum()
    parts = dj.estimate_llcs(loss, [params], data, restrict=(["w0", "w1"], masks), **kw)
    full = dj.estimate_llcs(loss, [params], data, **kw)
    eig = np.linalg.eigvalsh(hess)
    exact_full = 0.5 * sum(1 / (1 + gamma / (nbeta * h)) for h in eig if h > 1e-9)
    exact_parts = [0.5 / (1 + gamma / (nbeta * hess[i, i])) for i in range(2)]
    np.testing.assert_allclose(parts.llc_mean[:, 0], exact_parts, rtol=0.06)
    np.testing.assert_allclose(full.llc_mean[0], exact_full, rtol=0.06)
    total = restriction_sum(parts)["mean"][0]
    np.testing.assert_allclose(total, sum(exact_parts), rtol=0.05)
    if np.count_nonzero(hess - np.diag(np.diag(hess))) == 0:
      assert abs(total / full.llc_mean[0] - 1) < 0.06
    else:
      assert abs(total / full.llc_mean[0] - 2) < 0.15


def test_restriction_matches_the_smaller_model_with_noise():
  """With noise on, the restricted chain and the smaller model's chain sample the same
  distribution (different noise draws): their estimates agree within 4 standard errors."""
  h, loss_fn, data, _ = _quadratic()
  start = {"a": jnp.zeros(3), "b": jnp.array([0.4, -0.1])}
  kw = dict(
    num_chains=32,
    num_draws=2000,
    step_size=5e-4,
    localization=1.0,
    nbeta=30.0,
    batch_size=8,
    seed=4,
    num_burnin_steps=300,
  )
  res = dj.estimate_llc(loss_fn, start, data, restrict=restrict.by_pattern(start, "^a$"), **kw)
  small = lambda a, batch: loss_fn({"a": a, "b": start["b"]}, batch)
  ref = dj.estimate_llc(small, start["a"], data, **{**kw, "seed": 5})
  se = np.hypot(res.llc_sem, ref.llc_sem)
  assert abs(res.llc_mean - ref.llc_mean) < 4 * se, (res.llc_mean, ref.llc_mean, se)
  assert se < 0.05 * ref.llc_mean  # a test with power: the standard error is small
