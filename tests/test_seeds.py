"""Several seeds in one vmapped program: per-seed streams, equal to single runs, resumable."""

import json
import os

import jax
import numpy as np
import pytest

from devinterp_jax.experiments import icl_regression
from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import run_log
from devinterp_jax.training import loop
from tests.helpers import restore_params, tiny_config


def _config():
  config = tiny_config(num_steps=40)
  config.seeds = (3, 7)
  return config


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
  config = _config()
  workdir = str(tmp_path_factory.mktemp("seeds"))
  icl_regression.train_seeds(config, workdir)
  return config, workdir


def test_each_seed_equals_its_single_seed_run(seeds_run, tmp_path):
  config, workdir = seeds_run
  for seed, seed_dir in zip(config.seeds, icl_regression.seed_workdirs(workdir, config.seeds)):
    single = icl_regression.seed_config(config, seed)
    icl_regression.train(single, str(tmp_path / f"single_{seed}"))
    np.testing.assert_array_equal(
      checkpointing.scheduled_steps(seed_dir), icl_regression.schedule_steps(config)
    )
    a = restore_params(seed_dir, config, 40)
    b = restore_params(str(tmp_path / f"single_{seed}"), config, 40)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)
    rows_a = run_log.read_metrics(seed_dir)
    rows_b = run_log.read_metrics(str(tmp_path / f"single_{seed}"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    np.testing.assert_allclose(
      [r["train_loss"] for r in rows_a], [r["train_loss"] for r in rows_b], rtol=1e-4
    )
    np.testing.assert_allclose(
      [r.get("eval_loss", 0) for r in rows_a], [r.get("eval_loss", 0) for r in rows_b], rtol=1e-4
    )
    with open(os.path.join(seed_dir, "config.json")) as f:
      assert json.load(f)["seed"] == seed
  # the seeds really differ
  d0, d1 = icl_regression.seed_workdirs(workdir, config.seeds)
  w0 = restore_params(d0, config, 40)["unembed"]["kernel"]
  w1 = restore_params(d1, config, 40)["unembed"]["kernel"]
  assert np.abs(np.asarray(w0) - np.asarray(w1)).max() > 1e-2


def test_interrupted_seeds_resume_to_identical_params(seeds_run, tmp_path):
  config, ref_dir = seeds_run
  original = loop.train_seeds

  def interrupt(step):
    if step == 20:
      raise KeyboardInterrupt

  loop.train_seeds = lambda **kw: original(**kw, on_event=interrupt)
  try:
    with pytest.raises(KeyboardInterrupt):
      icl_regression.train_seeds(config, str(tmp_path))
  finally:
    loop.train_seeds = original
  # one seed is one resume point behind the other: resume uses the common step
  d0, d1 = icl_regression.seed_workdirs(str(tmp_path), config.seeds)
  checkpointing.make_manager(d1, read_only=True).all_steps()
  icl_regression.train_seeds(config, str(tmp_path))
  for ref, res in zip(icl_regression.seed_workdirs(ref_dir, config.seeds), (d0, d1)):
    jax.tree.map(
      np.testing.assert_array_equal,
      restore_params(ref, config, 40),
      restore_params(res, config, 40),
    )
    steps = [r["step"] for r in run_log.read_metrics(res)]
    assert steps == sorted(set(steps))


def test_bad_seed_settings_are_refused(tmp_path):
  config = _config()
  config.seeds = (1, 1)
  with pytest.raises(ValueError, match="distinct"):
    icl_regression.train_seeds(config, str(tmp_path))
  config = _config()
  config.task.num_tasks = 16
  with pytest.raises(ValueError, match="num_tasks"):
    icl_regression.train_seeds(config, str(tmp_path))


def test_run_seeds_estimates_all_seeds_in_one_sweep_and_compares_boundaries(seeds_run):
  config, workdir = seeds_run
  summary = icl_regression.run_seeds(config, workdir)  # training is already done
  seed_dirs = icl_regression.seed_workdirs(workdir, config.seeds)
  model = icl_regression.make_model(config)
  abstract = jax.eval_shape(model.init_params, jax.random.key(0))
  for seed_dir in seed_dirs:
    table = np.genfromtxt(os.path.join(seed_dir, "llc", "llc.csv"), delimiter=",", names=True)
    steps = checkpointing.scheduled_steps(seed_dir)
    np.testing.assert_array_equal(table["step"], steps)
    # The joint sweep equals a sweep of this seed alone (same data, noise, batches).
    alone = icl_regression.estimate_checkpoints(
      config,
      model,
      checkpointing.ParamsSequence(seed_dir, steps, abstract),
      [int(s) for s in steps],
      None,
    )
    np.testing.assert_allclose(table["llc_mean"], alone.llc_mean, rtol=1e-4, atol=1e-4)
  out = os.path.join(workdir, "seeds_report")
  for name in ("seeds.json", "seeds.md", "boundaries.csv", "seed_stages.png"):
    assert os.path.getsize(os.path.join(out, name)) > 50, name
  assert set(summary["per_seed"]) == {f"seed {s}" for s in config.seeds}
  assert len(summary["matches"]) == len(summary["mean_curve"]["boundary_steps"])
  for m in summary["matches"]:
    assert len(m["matched_steps"]) == len(config.seeds)
