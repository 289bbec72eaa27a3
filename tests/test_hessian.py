"""Hessian statistics from Hessian-vector products against exact Hessians."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from devinterp_jax.analysis import hessian
from devinterp_jax.viz import hessian as hessian_viz

DIM = 50
NUM_DATA = 16


def quadratic_loss(w, batch):
  """0.5 wᵀAw + 0.5 mean((Xw − y)²): Hessian A + XᵀX / NUM_DATA."""
  return 0.5 * w @ batch["a"] @ w + 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def _quadratic_problem(eigenvalues, seed=0):
  """Batch and exact (float64) Hessian of `quadratic_loss` with A = Q diag(λ) Qᵀ."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  a = (q * eigenvalues) @ q.T
  a = (a + a.T) / 2
  x = rng.normal(size=(NUM_DATA, DIM)) / np.sqrt(DIM)
  y = rng.normal(size=NUM_DATA)
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in (("a", a), ("x", x), ("y", y))}
  exact = a.astype(np.float32).astype(np.float64) + (
    x.astype(np.float32).astype(np.float64).T @ x.astype(np.float32).astype(np.float64) / NUM_DATA
  )
  return batch, exact, jnp.asarray(rng.normal(size=DIM), jnp.float32)


@pytest.fixture(scope="module")
def quadratic():
  # spread spectrum: 48 eigenvalues log-spaced in [0.01, 10] and two negative ones
  eigenvalues = np.concatenate([[-0.5, -0.2], np.geomspace(0.01, 10.0, DIM - 2)])
  return _quadratic_problem(eigenvalues)


def hutchinson_se_exact(h, num_samples):
  """Exact std of the Rademacher Hutchinson mean: sqrt(2(‖H‖_F² − Σ H_ii²) / n)."""
  return np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / num_samples)


def test_hvp_matches_dense_quadratic(quadratic):
  batch, h, w = quadratic
  v = jnp.asarray(np.random.default_rng(1).normal(size=DIM), jnp.float32)
  hv = jax.jit(hessian.hvp, static_argnums=0)(quadratic_loss, w, batch, v)
  np.testing.assert_allclose(np.asarray(hv), h @ np.asarray(v, np.float64), rtol=1e-5, atol=1e-5)


def test_hutchinson_trace_and_standard_error(quadratic):
  batch, h, w = quadratic
  tr = np.trace(h)
  ses = {}
  for n in (256, 1024):
    est, se = map(float, hessian.hutchinson_trace(quadratic_loss, w, batch, jax.random.key(2), n))
    assert abs(est - tr) <= 3 * se, (n, est, tr, se)
    assert abs(est - tr) <= 0.1 * abs(tr), (n, est, tr)
    # the reported SE estimates the exact one (sample std of n draws: ~5-10 % error)
    np.testing.assert_allclose(se, hutchinson_se_exact(h, n), rtol=0.25)
    ses[n] = se
  # 4x the probes halves the SE
  assert 1.6 < ses[256] / ses[1024] < 2.5, ses


def test_lanczos_top_eigenvalues_quadratic(quadratic):
  batch, h, w = quadratic
  exact = np.linalg.eigvalsh(h)
  top, smallest = hessian.lanczos_top_eigenvalues(
    quadratic_loss, w, batch, jax.random.key(3), num_iters=30, top_k=3, return_min=True
  )
  top = np.asarray(top)
  assert top.shape == (3,)
  assert np.all(np.diff(top) <= 0)
  np.testing.assert_allclose(top, exact[::-1][:3], rtol=1e-3)
  np.testing.assert_allclose(float(smallest), exact[0], rtol=1e-3)


def test_lanczos_breakdown():
  # rank-5 Hessian (data term off): the Krylov space is exhausted after 5 steps
  # (up to rounding), the remaining 25 steps restart in the orthogonal complement
  eigenvalues = np.zeros(DIM)
  eigenvalues[-5:] = [1.0, 2.0, 3.0, 4.0, 5.0]
  batch, _, w = _quadratic_problem(eigenvalues, seed=4)
  batch = {**batch, "x": jnp.zeros_like(batch["x"])}
  top, smallest = hessian.lanczos_top_eigenvalues(
    quadratic_loss, w, batch, jax.random.key(3), num_iters=30, top_k=3, return_min=True
  )
  np.testing.assert_allclose(np.asarray(top), [5.0, 4.0, 3.0], rtol=1e-4)
  assert abs(float(smallest)) < 1e-5
  # H = 2·I: the residual is pure rounding noise from the first step on; normalising
  # it (no breakdown handling) gives Ritz values in the thousands
  batch = {**batch, "a": 2.0 * jnp.eye(DIM)}
  top, smallest = hessian.lanczos_top_eigenvalues(
    quadratic_loss, w, batch, jax.random.key(3), num_iters=30, top_k=3, return_min=True
  )
  np.testing.assert_allclose(np.asarray(top), [2.0, 2.0, 2.0], rtol=1e-5)
  np.testing.assert_allclose(float(smallest), 2.0, rtol=1e-5)
  # H = 0 exactly: β = 0 at every step, which must not produce 0/0
  batch = {**batch, "a": jnp.zeros_like(batch["a"])}
  top, smallest = hessian.lanczos_top_eigenvalues(
    quadratic_loss, w, batch, jax.random.key(3), num_iters=30, top_k=3, return_min=True
  )
  np.testing.assert_array_equal(np.asarray(top), np.zeros(3))
  assert float(smallest) == 0.0


# ---- a small MLP with a pytree of params ---------------------------------------------


def mlp_init(seed):
  """41 parameters in a nested dict (numpy: no eager JAX ops to compile)."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)
  return {
    "dense1": {"w": f32(3, 8, scale=3**-0.5), "b": f32(8, scale=0.1)},
    "dense2": {"w": f32(8, 1, scale=8**-0.5), "b": np.zeros((1,), np.float32)},
  }


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense1"]["w"] + params["dense1"]["b"][None])
  out = (h @ params["dense2"]["w"] + params["dense2"]["b"][None])[:, 0]
  return 0.5 * jnp.mean((out - batch["y"]) ** 2)


class LazyCheckpoints(Sequence):
  """A Sequence that 'loads' checkpoint i on access and records every access."""

  def __init__(self, trees):
    self._trees = trees
    self.accesses = []

  def __len__(self):
    return len(self._trees)

  def __getitem__(self, i):
    if not isinstance(i, int):
      raise TypeError("index checkpoints one at a time")
    self.accesses.append(i)
    return jax.tree.map(np.asarray, self._trees[i])


NUM_HUTCHINSON = 32
NUM_LANCZOS = 24  # < 41 parameters: the top eigenvalue must converge, not be exhausted


@pytest.fixture(scope="module")
def mlp():
  x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
  batch = {"x": x, "y": np.sin(x @ np.array([1.0, -2.0, 0.5], np.float32))}
  distinct = [mlp_init(seed) for seed in (1, 2, 3)]
  # 5 checkpoints in chunks of 2 ([0, 1], [2, 3], [4, pad]): the last chunk is padded;
  # 3 repeats 1 and 4 repeats 0, in the same slot of another chunk
  ckpts = LazyCheckpoints(distinct + [distinct[1], distinct[0]])
  compiled_before = hessian._stats_chunk._cache_size()
  stats = hessian.hessian_stats(
    mlp_loss,
    ckpts,
    batch,
    num_hutchinson=NUM_HUTCHINSON,
    num_lanczos_iters=NUM_LANCZOS,
    top_k=3,
    seed=0,
    checkpoint_chunk=2,
  )
  # the padded last chunk reuses the program of the full ones
  assert hessian._stats_chunk._cache_size() - compiled_before == 1
  unravel = ravel_pytree(distinct[0])[1]
  dense_hessian = jax.jit(jax.hessian(lambda flat, b: mlp_loss(unravel(flat), b)))
  dense = [np.asarray(dense_hessian(ravel_pytree(p)[0], batch), np.float64) for p in distinct]
  return batch, distinct, ckpts, stats, dense


def test_hvp_pytree_matches_dense(mlp):
  batch, distinct, _, _, dense = mlp
  p = distinct[0]
  flat, unravel = ravel_pytree(p)
  v = jnp.asarray(np.random.default_rng(5).normal(size=flat.shape), jnp.float32)
  hv = jax.jit(hessian.hvp, static_argnums=0)(mlp_loss, p, batch, unravel(v))
  assert jax.tree.structure(hv) == jax.tree.structure(p)
  np.testing.assert_allclose(
    np.asarray(ravel_pytree(hv)[0]), dense[0] @ np.asarray(v), rtol=1e-4, atol=1e-5
  )


def test_mlp_stats_match_dense_hessian(mlp):
  _, _, _, stats, dense = mlp
  for i, h in enumerate(dense):
    exact = np.linalg.eigvalsh(h)
    # Hutchinson is unbiased with known std: 4 exact SEs bounds the error (CLT)
    assert abs(stats["trace"][i] - np.trace(h)) <= 4 * hutchinson_se_exact(h, NUM_HUTCHINSON)
    # ... and its SE estimate from 32 samples is within a factor 2 of the exact SE
    assert 0.5 < stats["trace_se"][i] / hutchinson_se_exact(h, NUM_HUTCHINSON) < 2.0
    # the top eigenvalues are separated by gaps > 5 % of λ_max here, so 24 Lanczos
    # steps converge to float32 accuracy
    assert np.all(np.diff(exact[::-1][:4]) < -0.05 * exact[-1])
    np.testing.assert_allclose(stats["top_eigenvalues"][i], exact[::-1][:3], rtol=1e-4)
    # the smallest Ritz value is an upper bound on the smallest eigenvalue (interlacing)
    assert stats["min_eigenvalue"][i] >= exact[0] - 1e-5 * exact[-1]


def test_hessian_stats_batched_equals_single_calls(mlp):
  batch, distinct, ckpts, stats, _ = mlp
  assert ckpts.accesses == [0, 1, 2, 3, 4]  # one at a time, in order, once each
  assert stats["trace"].shape == (5,) and stats["trace_se"].shape == (5,)
  assert stats["top_eigenvalues"].shape == (5, 3) and stats["min_eigenvalue"].shape == (5,)
  base = jax.random.key(0)
  trace_key = jax.random.fold_in(base, hessian.HUTCHINSON_STREAM)
  lanczos_key = jax.random.fold_in(base, hessian.LANCZOS_STREAM)
  for i, p in enumerate(distinct):
    tr, se = hessian.hutchinson_trace(mlp_loss, p, batch, trace_key, NUM_HUTCHINSON)
    top, smallest = hessian.lanczos_top_eigenvalues(
      mlp_loss, p, batch, lanczos_key, NUM_LANCZOS, 3, return_min=True
    )
    np.testing.assert_allclose(stats["trace"][i], float(tr), rtol=1e-5)
    np.testing.assert_allclose(stats["trace_se"][i], float(se), rtol=1e-4)
    np.testing.assert_allclose(stats["top_eigenvalues"][i], np.asarray(top), rtol=1e-5)
    np.testing.assert_allclose(stats["min_eigenvalue"][i], float(smallest), rtol=1e-4)
  # equal checkpoints see the same probes and start vector: identical results
  for k in stats:
    np.testing.assert_array_equal(stats[k][3], stats[k][1])
    np.testing.assert_array_equal(stats[k][4], stats[k][0])
  # distinct checkpoints differ, and another seed draws other probes
  assert len(set(stats["trace"][:3].tolist())) == 3
  other = hessian.hessian_stats(
    mlp_loss,
    distinct[:2],
    batch,
    num_hutchinson=NUM_HUTCHINSON,
    num_lanczos_iters=NUM_LANCZOS,
    top_k=3,
    seed=1,
    checkpoint_chunk=2,
  )
  assert not np.allclose(other["trace"], stats["trace"][:2])
  np.testing.assert_allclose(other["top_eigenvalues"], stats["top_eigenvalues"][:2], rtol=1e-4)


def test_hessian_stats_rejects_bad_arguments(mlp):
  batch, distinct, *_ = mlp
  with pytest.raises(ValueError, match="empty"):
    hessian.hessian_stats(mlp_loss, [], batch)
  with pytest.raises(ValueError, match="top_k"):
    hessian.hessian_stats(mlp_loss, distinct, batch, num_lanczos_iters=2, top_k=3)
  with pytest.raises(ValueError, match="checkpoint 1"):
    hessian.hessian_stats(mlp_loss, [distinct[0], {"other": jnp.zeros(3)}], batch)


def test_plot_llc_vs_hessian(tmp_path, mlp):
  stats = {k: v[:3] for k, v in mlp[3].items()}
  steps = np.array([10, 100, 1000])
  path = hessian_viz.plot_llc_vs_hessian(
    steps,
    np.array([1.0, 3.0, 2.5]),
    np.array([0.1, 0.3, 0.2]),
    stats,
    str(tmp_path / "fig" / "llc_vs_hessian.png"),
    band_label="std over chains",
    boundaries=(50, 500),
    title="test",
  )
  assert path == str(tmp_path / "fig" / "llc_vs_hessian.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 10_000
  assert os.listdir(tmp_path / "fig") == ["llc_vs_hessian.png"]  # no temp file left
  with pytest.raises(ValueError, match="trace"):
    hessian_viz.plot_llc_vs_hessian(
      steps[:2],
      np.ones(2),
      np.ones(2),
      stats,
      str(tmp_path / "bad.png"),
      band_label="std over chains",
    )
  # The LLC band is labelled by what the caller passes; boundaries once in the legend.
  fig = hessian_viz.llc_vs_hessian_figure(
    steps, np.ones(3), np.full(3, 0.1), stats, band_label="SEM over chains", boundaries=(50, 500)
  )
  labels = fig.axes[0].get_legend_handles_labels()[1]
  assert "± SEM over chains" in labels and not any("std" in t for t in labels)
  assert labels.count("stage boundary") == 1
  assert all(ax.get_xscale() == "log" for ax in fig.axes)
