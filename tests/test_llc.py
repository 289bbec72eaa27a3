"""The SGLD LLC estimator: batching, chunking, resume, exact expectations."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import devinterp_jax as dj


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"])
  return jnp.mean(jnp.square(h @ params["w2"] - batch["y"]))


def mlp_setup(num_ckpts=3):
  kx, ky = jax.random.split(jax.random.key(0))
  data = {"x": jax.random.normal(kx, (512, 3)), "y": jax.random.normal(ky, (512, 1))}
  ckpts = [{"w1": jax.random.normal(jax.random.key(10 + i), (3, 8)) * 0.5,
            "w2": jax.random.normal(jax.random.key(20 + i), (8, 1)) * 0.5}
           for i in range(num_ckpts)]
  return data, ckpts


KW = dict(num_draws=40, step_size=1e-3, localization=10.0, nbeta=50.0, batch_size=32,
          seed=3, progress=False)


def test_batched_equals_separate_runs():
  data, ckpts = mlp_setup()
  batched = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=3, **KW)
  assert batched.llc_per_chain.shape == (3, 3) and batched.loss_trace.shape == (3, 3, 40)
  for i, p in enumerate(ckpts):
    single = dj.estimate_llc(mlp_loss, p, data, num_chains=3, **KW)
    np.testing.assert_allclose(batched.llc_per_chain[i], single.llc_per_chain, rtol=1e-5)
    np.testing.assert_allclose(batched.loss_trace[i], single.loss_trace, rtol=1e-5)
    one_chain = dj.estimate_llc(mlp_loss, p, data, num_chains=1, **KW)
    np.testing.assert_allclose(batched.loss_trace[i, 0], one_chain.loss_trace[0], rtol=1e-5)


def test_vmap_and_map_strategies_agree():
  data, ckpts = mlp_setup(2)
  a = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=4, chain_strategy="vmap", **KW)
  b = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=4, chain_strategy="map", **KW)
  np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-5)


def test_same_noise_and_batches_at_every_checkpoint():
  data, ckpts = mlp_setup(1)
  res = dj.estimate_llcs(mlp_loss, [ckpts[0], ckpts[0]], data, num_chains=2, **KW)
  np.testing.assert_array_equal(res.loss_trace[0], res.loss_trace[1])
  assert not np.allclose(res.loss_trace[0, 0], res.loss_trace[0, 1])  # chains differ


def test_stacked_pytree_input_and_chunking_give_identical_results():
  data, ckpts = mlp_setup(5)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ckpts)
  ref = dj.estimate_llcs(mlp_loss, stacked, data, num_chains=2, **KW)
  for chunk in (1, 2, 3):
    res = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=chunk, **KW)
    np.testing.assert_allclose(res.loss_trace, ref.loss_trace, rtol=1e-6)
    np.testing.assert_allclose(res.llc_mean, ref.llc_mean, rtol=1e-6)


def test_sweep_resumes_from_atomically_written_chunks(tmp_path):
  data, ckpts = mlp_setup(5)
  out = str(tmp_path / "chunks")
  ref = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=2,
                         output_dir=out, **KW)
  files = sorted(os.listdir(out))
  assert files == ["llc_chunk_00000.npz", "llc_chunk_00001.npz", "llc_chunk_00002.npz"]
  os.remove(os.path.join(out, files[1]))  # as if killed before chunk 1 finished
  kept = os.path.getmtime(os.path.join(out, files[0]))

  class Poisoned(list):  # chunk 0 must come from disk, never recomputed
    def __getitem__(self, i):
      if isinstance(i, slice) and i.start == 0:
        raise AssertionError("finished chunk was recomputed")
      return super().__getitem__(i)

  res = dj.estimate_llcs(mlp_loss, Poisoned(ckpts), data, num_chains=2, checkpoint_chunk=2,
                         output_dir=out, **KW)
  np.testing.assert_array_equal(res.llc_per_chain, ref.llc_per_chain)
  assert os.path.getmtime(os.path.join(out, files[0])) == kept
  with pytest.raises(ValueError, match="other settings"):
    dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=2,
                     output_dir=out, **{**KW, "nbeta": 51.0})


def test_prior_sampling_with_zero_nbeta():
  """nβ = 0: the chain samples N(w*, I/γ), so E‖w − w*‖² = d/γ."""
  d, gamma, eps = 20, 10.0, 4e-3
  w_star = {"w": jnp.arange(d, dtype=jnp.float32) / d}
  sq_dist = lambda p, b: jnp.sum(jnp.square(p["w"] - w_star["w"])) + 0.0 * jnp.sum(b["x"])
  data = {"x": jnp.zeros((8, 1))}
  res = dj.estimate_llc(sq_dist, w_star, data, num_chains=16, num_draws=4000,
                        num_burnin_steps=1000, step_size=eps, localization=gamma, nbeta=0.0,
                        batch_size=1)
  measured = res.loss_trace.mean()
  # Exact for the discretised OU process: variance 1/(γ(1 − εγ/4)) per coordinate.
  np.testing.assert_allclose(measured, d / (gamma * (1 - eps * gamma / 4)), rtol=0.05)
  np.testing.assert_allclose(measured, d / gamma, rtol=0.05)


def test_regular_quadratic_matches_exact_expectation():
  """λ̂ → ½ Σ 1/(1 + γ/(nβ h_i)) for L = ½ Σ h_i w_i² (→ d/2 as γ/nβ → 0)."""
  d, nbeta, gamma = 10, 100.0, 1.0
  h = jnp.linspace(1.0, 2.0, d)
  loss = lambda p, b: 0.5 * jnp.sum(h * jnp.square(p["w"])) + 0.0 * jnp.sum(b["x"])
  res = dj.estimate_llc(loss, {"w": jnp.zeros(d)}, {"x": jnp.zeros((8, 1))}, num_chains=32,
                        num_draws=4000, num_burnin_steps=500, step_size=2e-4,
                        localization=gamma, nbeta=nbeta, batch_size=1)
  exact = 0.5 * np.sum(1.0 / (1.0 + gamma / (nbeta * np.asarray(h))))
  np.testing.assert_allclose(res.llc_mean, exact, rtol=0.05)
  assert abs(res.llc_mean - d / 2) / (d / 2) < 0.05
  assert res.init_loss.shape == (32,) and np.allclose(res.init_loss, 0.0)


def test_diverged_chains_are_flagged_and_excluded():
  data = {"x": jnp.ones((20, 1)).at[7].set(jnp.nan)}  # a poisoned sample
  loss = lambda p, b: jnp.mean(b["x"]) * jnp.sum(jnp.square(p["w"]))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = dj.estimate_llcs(loss, [{"w": jnp.ones(3)}], data, num_chains=8, num_draws=20,
                           step_size=1e-3, localization=1.0, nbeta=10.0, batch_size=1,
                           progress=False, checkpoint_ids=[1234])
  bad = res.diverged[0]
  assert 0 < bad.sum() < 8, "the seed should give some diverged and some healthy chains"
  np.testing.assert_allclose(res.llc_mean[0], res.llc_per_chain[0][~bad].mean(), rtol=1e-12)
  assert np.isfinite(res.llc_mean[0]) and res.num_valid_chains[0] == 8 - bad.sum()
  msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert any("checkpoint 1234" in m and "diverged" in m for m in msgs)


def test_result_roundtrip(tmp_path):
  data, ckpts = mlp_setup(2)
  res = dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=2, **KW)
  res.save(str(tmp_path / "r.npz"))
  back = dj.LLCResult.load(str(tmp_path / "r.npz"))
  np.testing.assert_array_equal(back.llc_per_chain, res.llc_per_chain)
  assert back.settings == res.settings and back.settings["nbeta"] == 50.0


def test_bad_inputs_name_the_problem():
  data, ckpts = mlp_setup(1)
  with pytest.raises(ValueError, match="same leading sample axis"):
    dj.estimate_llc(mlp_loss, ckpts[0], {"x": data["x"], "y": data["y"][:10]},
                    num_chains=1, **KW)
  with pytest.raises(ValueError, match="chain_strategy"):
    dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=1, chain_strategy="pmap", **KW)
  with pytest.raises(ValueError, match="num_chains"):
    dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=0, **KW)
  with pytest.raises(ValueError, match="checkpoint_ids"):
    dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=1, checkpoint_ids=[1, 2], **KW)


def test_batch_source_callable_is_accepted():
  data, ckpts = mlp_setup(1)
  source = lambda key: jax.tree.map(
      lambda x: x[jax.random.randint(key, (32,), 0, 512)], data)
  a = dj.estimate_llc(mlp_loss, ckpts[0], source, num_chains=2, **KW)
  b = dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=2, **KW)
  np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-6)  # same gather


def test_mismatched_checkpoints_are_named():
  data, ckpts = mlp_setup(3)
  ckpts[2] = {"w1": ckpts[2]["w1"][:, :4], "w2": ckpts[2]["w2"]}
  with pytest.raises(ValueError, match="checkpoint 2 has leaf 0 of shape"):
    dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=1, **KW)
