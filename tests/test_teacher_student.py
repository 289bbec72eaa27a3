"""The teacher–student setting: model, data, the runlocal main job and its LLCs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import teacher_student as ts_config
from devinterp_jax import config_checks
from devinterp_jax.data.teacher_student import TeacherStudentTask, sample_batch
from devinterp_jax.experiments import registry, teacher_student
from devinterp_jax.experiments.teacher_student import sections
from devinterp_jax.models.mlp import ReLUMLP, layer_name
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import checkpoints


@pytest.fixture(scope="module")
def ts_run(tmp_path_factory):
  """The README-sized main job: `configs/teacher_student.py:runlocal`, unchanged."""
  config = ts_config.get_config("runlocal")
  workdir = str(tmp_path_factory.mktemp("teacher_student"))
  return config, workdir, teacher_student.run(config, workdir)


def test_runlocal_main_job_writes_llcs_stages_and_report(ts_run):
  config, workdir, summary = ts_run
  steps = teacher_student.schedule_steps(config)
  assert 10 <= len(steps) <= 16 and steps[0] == 1 and steps[-1] == config.train.num_steps
  table = np.genfromtxt(os.path.join(workdir, "llc", "llc.csv"), delimiter=",", names=True)
  np.testing.assert_array_equal(table["step"], steps)
  assert np.all(np.isfinite(table["llc_mean"])) and np.all(np.isfinite(table["llc_sem"]))
  assert np.all(table["num_valid_chains"] == config.llc.num_chains)
  report_dir = os.path.join(workdir, "report")
  report = json.load(open(os.path.join(report_dir, "report.json")))
  assert report["setting"] == "teacher_student"
  assert report["sections"] == ["teacher", "hessian"]
  stages = json.load(open(os.path.join(report_dir, "stages.json")))
  if report["stages_fitted"]:
    assert report["stages"][0]["start_step"] == 1
    assert report["stages"][-1]["end_step"] == config.train.num_steps
    assert summary["stage_boundaries"] == report["boundary_steps"]
  else:
    assert stages["reason"], stages  # a report without stages says why
  for name in ("teacher_student.png", "stages.png", "hessian.png", "report.md"):
    assert os.path.getsize(os.path.join(report_dir, name)) > 1_000, name
  with open(os.path.join(report_dir, "teacher_student.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The student learns the teacher: every teacher unit recovered, the noiseless test MSE
  # far below the label noise σ² (the eval loss's floor).
  final = report["teacher_last_checkpoint"]
  assert final["teacher_units_recovered"] == final["teacher_units"] == 3
  assert final["test_mse"] < 0.1 * config.task.noise_std**2
  assert report["milestones"]["teacher_recovered"]["step"] is not None
  metrics = np.genfromtxt(os.path.join(report_dir, "metrics.csv"), delimiter=",", names=True)
  np.testing.assert_allclose(metrics["llc_mean"], table["llc_mean"], rtol=1e-12)
  assert metrics["test_mse"][-1] < 0.01 * metrics["test_mse"][0]


def test_llc_of_the_trained_student_is_positive_and_below_half_d(ts_run):
  """At the last checkpoint the LLC is > 0 and < d/2 (a regular model's λ; the student
  is degenerate), each by more than 3 standard errors: from the sweep, and from a
  longer 8-chain estimate with the config's ε, nβ, γ on the same SGLD data."""
  config, workdir, _ = ts_run
  model = teacher_student.make_model(config)
  half_d = model.num_params / 2
  assert (
    model.num_params
    == 73
    == sum(x.size for x in jax.tree.leaves(model.init_params(jax.random.key(0))))
  )
  res = LLCResult.load(os.path.join(workdir, "llc", "llc.npz"))
  mean, sem = float(res.llc_mean[-1]), float(res.llc_sem[-1])
  assert 3 * sem < mean < half_d - 3 * sem, (mean, sem)
  params = checkpoints.ParamsSequence(
    workdir, [config.train.num_steps], jax.eval_shape(model.init_params, jax.random.key(0))
  )[0]
  c = config.llc
  again = llc_lib.estimate_llc(
    model.loss,
    params,
    teacher_student.sgld_dataset(config),
    num_chains=8,
    num_draws=800,
    step_size=c.step_size,
    localization=c.localization,
    nbeta=c.nbeta,
    batch_size=c.batch_size,
    seed=1,
  )
  assert not again.diverged.any()
  assert 3 * again.llc_sem < again.llc_mean < half_d - 3 * again.llc_sem, again.llc_per_chain
  # Far from d/2: the 12-unit student of a 3-unit teacher is a singular model.
  assert again.llc_mean < 0.5 * half_d


def test_student_equal_to_the_teacher_has_zero_loss():
  task = TeacherStudentTask(noise_std=0.0)
  teacher = task.teacher_params()
  batch = sample_batch(jax.random.key(1), task, 4096)
  same = ReLUMLP(task.teacher_widths)
  assert float(same.loss(teacher, batch)) < 1e-10  # float32 round-off of f* − f*
  # With label noise the teacher's loss is the noise floor σ² (to 3 sd of the sample mean).
  noisy = TeacherStudentTask(noise_std=0.3)
  n = 2**16
  loss = float(same.loss(noisy.teacher_params(), sample_batch(jax.random.key(2), noisy, n)))
  assert loss == pytest.approx(0.09, rel=3 * np.sqrt(2 / n))
  # A wider student holds the teacher exactly: 9 extra units with zero output weights and
  # any incoming weights (one of the student's degenerate sets of minima).
  wide = ReLUMLP((4, 12, 1))
  params = wide.init_params(jax.random.key(3))
  params[layer_name(0)]["kernel"] = (
    params[layer_name(0)]["kernel"].at[:, :3].set(teacher[layer_name(0)]["kernel"])
  )
  params[layer_name(0)]["bias"] = (
    params[layer_name(0)]["bias"].at[:3].set(teacher[layer_name(0)]["bias"])
  )
  params[layer_name(1)]["kernel"] = jnp.zeros((12, 1)).at[:3].set(teacher[layer_name(1)]["kernel"])
  params[layer_name(1)]["bias"] = teacher[layer_name(1)]["bias"]
  assert float(wide.loss(params, batch)) < 1e-10
  # And its alignment metrics see the 3 teacher units.
  metrics = sections.teacher_metrics(wide, [params], task, jax.random.key(4), 1024)
  assert metrics["teacher_units_recovered"][0] == 3
  np.testing.assert_allclose(metrics["teacher_alignment"][0], 1.0, atol=1e-5)
  assert metrics["test_mse"][0] < 1e-10


def test_teacher_is_fixed_by_its_seed_and_shaped_like_the_student():
  a, b = TeacherStudentTask(teacher_seed=3), TeacherStudentTask(teacher_seed=3)
  for x, y in zip(jax.tree.leaves(a.teacher_params()), jax.tree.leaves(b.teacher_params())):
    np.testing.assert_array_equal(x, y)
  params = a.teacher_params()
  np.testing.assert_allclose(jnp.linalg.norm(params["layer_0"]["kernel"], axis=0), 1.0, rtol=1e-6)
  assert set(np.abs(np.asarray(params["layer_1"]["kernel"])).ravel()) == {1.0}
  shapes = jax.tree.map(jnp.shape, ReLUMLP((4, 3, 1)).init_params(jax.random.key(0)))
  assert jax.tree.map(jnp.shape, params) == shapes


def test_setting_analysis_imports_no_training_code(ts_run):
  """The setting's analysis (SETTING, its options, loading the run, its "teacher"
  metrics) loads no training code and no pipeline."""
  _, workdir, _ = ts_run
  code = (
    "import sys, jax; import devinterp_jax.analysis.report as r; "
    "from devinterp_jax.analysis import run_data; "
    "from devinterp_jax.experiments import registry; "
    "from devinterp_jax.experiments.teacher_student import sections; "
    "s = registry.setting('teacher_student'); r.validate_options(r.default_options(s), 'a', s); "
    f"run = run_data.load_run({workdir!r}, s); "
    "m = sections.teacher_metrics(run.model, list(run.checkpoints())[-2:], "
    "sections.TeacherStudentTask.from_config(run.config), jax.random.key(0), 256); "
    "assert m['test_mse'].shape == (2,); "
    "bad = [m for m in sys.modules if m.startswith('devinterp_jax.training') or "
    "m.endswith(('.pipeline', '.llc_sweep', '.launcher', '.refined'))]; "
    "print(bad); sys.exit(1 if bad else 0)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]


def test_config_checks_and_data_specs():
  config = ts_config.get_config("runlocal")
  teacher_student.validate_config(config)
  config.model.widths = (5, 12, 1)
  with pytest.raises(config_checks.ConfigError, match="config.model.widths"):
    teacher_student.validate_config(config)
  config.model.widths = (4, 1)
  with pytest.raises(config_checks.ConfigError, match="at least one hidden layer"):
    teacher_student.validate_config(config)
  config = ts_config.get_config("runlocal")
  base = teacher_student.dataset_from_spec(config)
  same = teacher_student.dataset_from_spec(config, "input_std=1")
  np.testing.assert_array_equal(base["x"], same["x"])
  wide = teacher_student.dataset_from_spec(config, "input_std=2,noise_std=0")
  np.testing.assert_allclose(wide["x"], 2 * base["x"], rtol=1e-6)
  with pytest.raises(ValueError, match="bad data spec"):
    teacher_student.dataset_from_spec(config, "num_tasks=3")
  with pytest.raises(ValueError, match="unknown config variant"):
    ts_config.get_config("huge")


def test_milestones_read_the_fit_and_the_recovery():
  steps = np.array([1, 10, 100, 1000])
  metrics = {
    "test_mse": np.array([1.0, 0.1, 0.015, 0.01]),
    "teacher_alignment": np.array([[0.5, 0.2], [0.99, 0.3], [0.99, 0.97], [1, 1]]),
    "teacher_units_recovered": np.array([0, 1, 2, 2]),
  }
  marks = sections.milestones(steps, metrics, lambda s: "S1" if s < 50 else "S2", 0.95)
  assert marks["mse_converged"]["step"] == 100 and marks["mse_converged"]["stage"] == "S2"
  assert marks["teacher_recovered"]["step"] == 100
  metrics["teacher_units_recovered"] = np.array([0, 1, 1, 1])
  marks = sections.milestones(steps, metrics, align_threshold=0.95)
  assert marks["teacher_recovered"]["step"] is None
  assert any("not reached" in line for line in sections.milestone_lines(marks))


def test_a_launcher_job_the_setting_lacks_names_the_setting_and_its_jobs():
  """launch/seeds.py on a setting with no multi-seed job: a clear error, not an
  AttributeError from inside the launcher."""
  with pytest.raises(
    ValueError,
    match=r"setting 'teacher_student' \(config.experiment\) has "
    r"no 'run_seeds' job; its pipeline has \['calibrate', 'estimate', 'run', "
    r"'train'\]",
  ):
    registry.job("teacher_student", "run_seeds")
  assert registry.job("teacher_student", "run") is teacher_student.run
  assert callable(registry.job("icl_regression", "run_seeds"))
