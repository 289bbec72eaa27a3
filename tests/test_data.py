import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devinterp_jax.data.regression import RegressionTask, make_dataset, sample_batch
from devinterp_jax.models.regression_transformer import to_tokens


def test_batch_shapes_and_noise_variance():
  task = RegressionTask()
  b = sample_batch(jax.random.key(0), task, 4096, with_tasks=True)
  assert b["xs"].shape == (4096, 8, 4) and b["ys"].shape == (4096, 8)
  resid = b["ys"] - jnp.einsum("bkd,bd->bk", b["xs"], b["tasks"])
  np.testing.assert_allclose(np.var(resid), 0.125, rtol=0.03)
  np.testing.assert_allclose(np.var(b["tasks"]), 1.0, rtol=0.05)
  np.testing.assert_allclose(np.var(b["xs"]), 1.0, rtol=0.02)


def test_tokens_interleave_x_and_y():
  xs = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  ys = jnp.array([[10.0, 11.0, 12.0], [13.0, 14.0, 15.0]])
  toks = to_tokens(xs, ys)
  assert toks.shape == (2, 6, 5)
  np.testing.assert_array_equal(toks[1, 2], [0, *xs[1, 1]])  # x-token [0, x]
  np.testing.assert_array_equal(toks[1, 3], [14, 0, 0, 0, 0])  # y-token [y, 0…0]


def test_finite_task_set_is_used():
  task = RegressionTask(num_tasks=3, noise_variance=0.0)
  b = sample_batch(jax.random.key(1), task, 256, with_tasks=True)
  distinct = np.unique(np.asarray(b["tasks"]).round(6), axis=0)
  assert len(distinct) == 3
  np.testing.assert_allclose(
    np.sort(distinct, 0), np.sort(np.asarray(task.task_set()), 0), atol=1e-5
  )


def test_dataset_is_seeded_and_chunk_independent():
  task = RegressionTask()
  a = make_dataset(jax.random.key(3), task, 1000, chunk_size=256)
  b = make_dataset(jax.random.key(3), task, 1000, chunk_size=256)
  c = make_dataset(jax.random.key(4), task, 1000, chunk_size=256)
  np.testing.assert_array_equal(a["xs"], b["xs"])
  assert a["xs"].shape == (1000, 8, 4)
  assert not np.allclose(a["xs"], c["xs"])


def test_bad_task_is_refused():
  with pytest.raises(ValueError, match="noise_variance"):
    RegressionTask(noise_variance=-1.0)
