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
  ckpts = [
    {
      "w1": jax.random.normal(jax.random.key(10 + i), (3, 8)) * 0.5,
      "w2": jax.random.normal(jax.random.key(20 + i), (8, 1)) * 0.5,
    }
    for i in range(num_ckpts)
  ]
  return data, ckpts


KW = dict(
  num_draws=40,
  step_size=1e-3,
  localization=10.0,
  nbeta=50.0,
  batch_size=32,
  seed=3,
  progress=False,
  num_burnin_steps=0,
)


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
  ref = dj.estimate_llcs(
    mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=2, output_dir=out, **KW
  )
  (sweep,) = os.listdir(out)  # one directory per fingerprint
  assert sweep == ref.settings["fingerprint"]
  files = sorted(os.listdir(os.path.join(out, sweep)))
  assert files == [f"llc_pair_{i:05d}.npz" for i in range(5)] + ["sweep.json"]
  os.remove(os.path.join(out, sweep, files[1]))  # as if killed before chunk 1 finished
  kept = os.stat(os.path.join(out, sweep, files[0])).st_mtime_ns
  res = dj.estimate_llcs(
    mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=2, output_dir=out, **KW
  )
  np.testing.assert_array_equal(res.llc_per_chain, ref.llc_per_chain)
  assert os.stat(os.path.join(out, sweep, files[0])).st_mtime_ns == kept  # not recomputed
  other = dj.estimate_llcs(
    mlp_loss, ckpts, data, num_chains=2, checkpoint_chunk=2, output_dir=out, **{**KW, "nbeta": 51.0}
  )  # kept apart
  assert len(os.listdir(out)) == 2 and not np.allclose(other.llc_per_chain, ref.llc_per_chain)


def test_diverged_chains_are_flagged_and_excluded():
  data = {"x": jnp.ones((20, 1)).at[7].set(jnp.nan)}  # a poisoned sample
  loss = lambda p, b: jnp.mean(b["x"]) * jnp.sum(jnp.square(p["w"]))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = dj.estimate_llcs(
      loss,
      [{"w": jnp.ones(3)}],
      data,
      num_chains=8,
      num_draws=20,
      step_size=1e-3,
      localization=1.0,
      nbeta=10.0,
      batch_size=1,
      progress=False,
      checkpoint_ids=[1234],
    )
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
    dj.estimate_llc(mlp_loss, ckpts[0], {"x": data["x"], "y": data["y"][:10]}, num_chains=1, **KW)
  with pytest.raises(ValueError, match="chain_strategy"):
    dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=1, chain_strategy="pmap", **KW)
  with pytest.raises(ValueError, match="num_chains"):
    dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=0, **KW)
  with pytest.raises(ValueError, match="checkpoint_ids"):
    dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=1, checkpoint_ids=[1, 2], **KW)


def test_batch_source_callable_is_accepted():
  data, ckpts = mlp_setup(1)
  source = lambda key: jax.tree.map(lambda x: x[jax.random.randint(key, (32,), 0, 512)], data)
  a = dj.estimate_llc(mlp_loss, ckpts[0], source, num_chains=2, **KW)
  b = dj.estimate_llc(mlp_loss, ckpts[0], data, num_chains=2, **KW)
  np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-6)  # same gather


def test_mismatched_checkpoints_are_named():
  data, ckpts = mlp_setup(3)
  ckpts[2] = {"w1": ckpts[2]["w1"][:, :4], "w2": ckpts[2]["w2"]}
  with pytest.raises(ValueError, match="checkpoint 2 has leaf 0 of shape"):
    dj.estimate_llcs(mlp_loss, ckpts, data, num_chains=1, **KW)
