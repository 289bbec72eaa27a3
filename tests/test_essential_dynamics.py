"""Essential dynamics: planted turns recovered, null trajectories give (almost) no
milestones, the random walk's PCs are the known cosines, results do not depend on
chunking, and bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devinterp_jax.analysis import essential_dynamics as ed

STEPS_100 = np.arange(1, 101)


@pytest.mark.parametrize("num_points,turns", [(100, (30, 60)), (150, (40, 100)), (300, (100, 200))])
def test_planted_turns_are_recovered_within_one_point(num_points, turns):
  steps = np.arange(1, num_points + 1)
  for seed in range(8):
    x = ed.planted_turns(num_points, 50, turns, noise=0.05, seed=seed)
    result = ed.essential_dynamics(steps, x)
    found = [m["index"] for m in result.milestones]
    assert len(found) == len(turns), (seed, found)
    assert all(abs(f - t) <= 1 for f, t in zip(found, turns)), (seed, found)
    assert all("sharp" in m["kinds"] for m in result.milestones)


@pytest.mark.parametrize("noise", [0.02, 0.05])
@pytest.mark.parametrize("num_points", [100, 200])
def test_noisy_log_sampled_lines_give_milestones_on_at_most_5_percent(noise, num_points):
  rate = ed.null_rate("noisy_line", num_points, 50, range(40), noise=noise)
  assert rate["with_milestones"] <= 2, rate  # 5 % of 40


@pytest.mark.parametrize("num_points,dim", [(100, 1000), (150, 1500), (200, 2000)])
def test_high_dimensional_random_walks_give_milestones_on_at_most_10_percent(num_points, dim):
  rate = ed.null_rate("random_walk", num_points, dim, range(40))
  assert rate["with_milestones"] <= 4, rate  # 10 % of 40


def test_random_walk_pcs_are_the_cosines():
  """PC k of a high-dimensional random walk is close to ±cos(kπt) (Antognini &
  Sohl-Dickstein 2018), with explained variance near 6/(π²k²)."""
  x = ed.random_walk(200, 4000, seed=0)
  scores, evr = ed.principal_components(x, 3)
  t = (np.arange(200) + 0.5) / 200
  for k in range(3):
    c = np.corrcoef(scores[:, k], np.cos((k + 1) * np.pi * t))[0, 1]
    assert abs(c) > 0.97, (k, c)
  np.testing.assert_allclose(evr, 6 / (np.pi**2 * np.arange(1, 4) ** 2), rtol=0.25)
  assert np.all(scores[-1] >= scores[0])  # the sign convention


def test_osculating_circle_of_a_circle_is_the_circle():
  theta = np.linspace(0, 1.5 * np.pi, 200)
  curve = np.stack([3 + 2 * np.cos(theta), -1 + 2 * np.sin(theta)], axis=1)
  radius, centre, movement = ed.osculating_circles(curve)
  np.testing.assert_allclose(radius[1:-1], 2.0, rtol=1e-3)
  np.testing.assert_allclose(centre[1:-1], np.tile([3.0, -1.0], (198, 1)), atol=1e-3)
  assert np.nanmax(movement) < 1e-3  # every point of a circle is a vertex
  line = np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1)
  r, c, _ = ed.osculating_circles(line)
  assert np.all(np.isinf(r[1:-1])) and np.all(np.isnan(c))


def test_parabola_vertex_is_a_milestone_only_when_sharp():
  """y = a x² traversed left to right: R = 1/(2a) at the vertex. A blunt parabola
  (a = 0.5, like the random walk's PC1–PC2, R/L ≈ 0.44) gives no milestone. A
  sharper one (a = 3, R/L = 0.026) is a cusp there, where PC1 = y reverses. A
  very sharp one (a = 60) is a there-and-back along PC1 = y (99.9 % of the
  variance): a reversal milestone."""
  x = np.linspace(-1, 1, 101)
  for a, kinds in ((0.5, None), (3.0, {"cusp", "reversal"}), (60.0, {"reversal"})):
    outputs = np.stack([x, a * x**2, 0.01 * np.sin(7 * x)], axis=1)
    result = ed.essential_dynamics(np.arange(1, 102), outputs)
    if kinds is None:
      assert result.milestones == [], result.milestones
      continue
    assert len(result.milestones) == 1, (a, result.milestones)
    m = result.milestones[0]
    assert abs(m["index"] - 50) <= 1 and kinds <= set(m["kinds"]), (a, m)


def _mlp_outputs(params, inputs):
  return jnp.tanh(inputs @ params["w1"]) @ params["w2"]


def test_trajectory_outputs_do_not_depend_on_chunking():
  keys = jax.random.split(jax.random.key(0), 2)
  w1 = jax.random.normal(keys[0], (4, 8))
  w2 = jax.random.normal(keys[1], (8, 3))
  params = [{"w1": w1 * (1 + 0.1 * u), "w2": w2 + 0.05 * u} for u in range(11)]
  inputs = jax.random.normal(jax.random.key(1), (16, 4))
  a = ed.trajectory_outputs(_mlp_outputs, params, inputs, checkpoint_chunk=3)
  b = ed.trajectory_outputs(_mlp_outputs, params, inputs, checkpoint_chunk=11)
  assert a.shape == (11, 16 * 3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(
    a[4], np.asarray(_mlp_outputs(params[4], inputs)).ravel(), rtol=1e-6, atol=1e-6
  )
  steps = np.arange(1, 12)
  r1 = ed.essential_dynamics_of(_mlp_outputs, params, steps, inputs, checkpoint_chunk=3)
  r2 = ed.essential_dynamics_of(_mlp_outputs, params, steps, inputs, checkpoint_chunk=5)
  np.testing.assert_array_equal(r1.scores_UxZ, r2.scores_UxZ)
  assert r1.milestones == r2.milestones


def test_step_dependent_smoothing():
  """sigma_late applies from late_from_step on; sigma 0 leaves a point as it is."""
  v = np.zeros((40, 1))
  v[10] = v[30] = 1.0
  o = ed.EDOptions(sigma_early=0.0, sigma_late=2.0, late_from_step=20)
  s = ed.smooth(v, np.arange(40), o)
  assert s[10, 0] == 1.0 and s[9, 0] == 0.0  # early: untouched
  assert 0.1 < s[30, 0] < 0.3 and s[29, 0] > 0.1  # late: spread over neighbours
  np.testing.assert_allclose(s[20:, 0].sum(), 1.0, rtol=0.05)


def test_pairing_with_llc_boundaries():
  p = ed.pair_milestones([100, 1000, 5000], [120, 2000, 40000], tolerance_log10=0.35)
  assert p["matched"] == [
    {"ed_step": 100, "llc_step": 120, "log10_distance": 0.0792},
    {"ed_step": 1000, "llc_step": 2000, "log10_distance": 0.301},
  ]
  assert p["unmatched_ed"] == [5000] and p["unmatched_llc"] == [40000]
  # one boundary pairs with one milestone, the nearest
  q = ed.pair_milestones([100, 110], [105], tolerance_log10=0.1)
  assert len(q["matched"]) == 1 and q["unmatched_ed"] == [100]


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"non-finite outputs at point\(s\) \[2\]"):
    x = np.ones((5, 3)) * np.arange(5)[:, None]
    x[2, 1] = np.nan
    ed.essential_dynamics(np.arange(5), x)
  with pytest.raises(ValueError, match="steps must increase"):
    ed.essential_dynamics([1, 3, 2], np.eye(3))
  with pytest.raises(ValueError, match="do not change"):
    ed.essential_dynamics([1, 2, 3], np.ones((3, 4)))
  with pytest.raises(ValueError, match=r"min_turn_deg=200"):
    ed.EDOptions(min_turn_deg=200)
  with pytest.raises(ValueError, match=r"4 steps for outputs of shape \(3, 2\)"):
    ed.essential_dynamics([1, 2, 3, 4], np.eye(3)[:, :2])


def test_result_saves_json_and_arrays(tmp_path):
  x = ed.planted_turns(100, 20, (40,), noise=0.02, seed=0)
  result = ed.essential_dynamics(STEPS_100 * 10, x)
  result.save(str(tmp_path))
  import json

  doc = json.load(open(tmp_path / "ed.json"))
  assert doc["milestones"][0]["step"] in (400, 410, 420)
  assert sum(doc["explained_variance_ratio"][:2]) > 0.999  # two segments: two PCs
  arrays = np.load(tmp_path / "ed.npz")
  assert arrays["scores"].shape == (100, 3) and "pc1_pc2_radius" in arrays


# ----------------------------------------------------------------------------------------
# Dense outputs recorded during training (storage/outputs_log.py, training/loop.py).


def test_recording_changes_no_weight_and_covers_every_ed_step(tiny_lr_trained, tmp_path):
  from devinterp_jax.experiments import icl_regression
  from devinterp_jax.experiments.icl_regression.setting import SETTING
  from devinterp_jax.storage import outputs_log
  from tests.helpers import restore_params

  config, recorded = tiny_lr_trained  # tiny_config(): ed_every=4, ed_batch_size=16
  steps, outputs = outputs_log.read(recorded)
  expected = sorted({0, *range(4, 61, 4), *icl_regression.schedule_steps(config).tolist()})
  assert steps.tolist() == expected  # step 0, every 4 steps and every scheduled step
  assert outputs.shape == (len(expected), 16 * config.task.max_examples)
  # the record at a checkpoint step is the probe on that checkpoint's params
  fn, inputs = SETTING.ed_probe(config, recorded)
  at_60 = np.asarray(fn(restore_params(recorded, config, 60), inputs)).ravel()
  np.testing.assert_allclose(outputs[-1], at_60, rtol=1e-5, atol=1e-6)
  plain = config.copy_and_resolve_references()
  plain.train.ed_every = 0
  icl_regression.train(plain, str(tmp_path))
  assert outputs_log.recorded_steps(str(tmp_path)) == []
  jax.tree.map(
    np.testing.assert_array_equal,
    restore_params(recorded, config),
    restore_params(str(tmp_path), plain),
  )


def test_interrupted_run_records_what_an_uninterrupted_one_does(tiny_lr_trained, tmp_path):
  from devinterp_jax.experiments import icl_regression
  from devinterp_jax.storage import outputs_log
  from devinterp_jax.training import loop

  config, reference = tiny_lr_trained
  original = loop.train

  def interrupted(**kw):
    def stop(step):
      if step == 30:
        raise KeyboardInterrupt

    return original(**kw, on_event=stop)

  loop.train = interrupted
  try:
    with pytest.raises(KeyboardInterrupt):
      icl_regression.train(config, str(tmp_path))
  finally:
    loop.train = original
  assert max(outputs_log.recorded_steps(str(tmp_path))) >= 28  # past the resume checkpoint
  icl_regression.train(config, str(tmp_path))
  a_steps, a = outputs_log.read(reference)
  b_steps, b = outputs_log.read(str(tmp_path))
  np.testing.assert_array_equal(a_steps, b_steps)
  np.testing.assert_array_equal(a, b)


def test_damaged_or_mixed_records_are_named(tmp_path):
  from devinterp_jax.storage import outputs_log

  outputs_log.write(str(tmp_path), 0, np.zeros(4))
  outputs_log.write(str(tmp_path), 5, np.ones(6))
  with pytest.raises(ValueError, match=r"records of sizes \[4, 6\]"):
    outputs_log.read(str(tmp_path))
  (tmp_path / "ed_outputs" / "5.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"5\.npz is damaged"):
    outputs_log.read(str(tmp_path))
  with pytest.raises(FloatingPointError, match="non-finite model outputs at step 7"):
    outputs_log.write(str(tmp_path), 7, np.array([np.nan]))


def test_reversal_beside_a_noisy_plateau_counts():
  """A PC that rises, wiggles on a plateau, then falls far reverses once, at its highest
  point on the plateau: the wiggles' own small extrema neither count nor hide it."""
  u = np.arange(200)
  pc = np.where(u < 80, u / 80.0, np.where(u < 150, 1.0, 1.0 - (u - 150) / 50.0 * 0.8))
  pc = pc + 0.01 * np.sin(u * 1.7)
  revs = ed.reversals(pc, min_prominence=0.2)
  assert len(revs) == 1 and 80 <= revs[0] <= 150, revs
  assert ed.reversals(u / 200.0 + 0.01 * np.sin(u * 1.7), 0.2) == []  # a noisy rise
