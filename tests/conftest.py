"""Test-session JAX settings, for this process and every subprocess a test starts:

- `jax_numpy_rank_promotion="raise"`: no implicit broadcasting of arrays of
  different ranks anywhere in the library;
- a persistent compilation cache (`.jax_cache/` at the repository root unless
  JAX_COMPILATION_CACHE_DIR is set) with no minimum compile time, so a program that
  several tests or subprocess launches compile is compiled once per session;
- in the fast and multiprocess tiers, XLA's CPU backend at optimisation level 0
  (`--xla_backend_optimization_level=0`, unless XLA_FLAGS already sets a level):
  the tests compile hundreds of small programs and run each briefly, and level 0
  compiles them 2-3x faster (an SGLD block of the tiny LR config: 14.6 s -> 5.9 s).
  The slow tier (`-m slow`: main jobs with time limits, long validations) keeps the
  default level. Numbers may differ from level 2 in the last float32 bits; every
  comparison in the tests is within one backend and level.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment it reads)

# Implicit rank promotion (e.g. [B, T, F] + [F]) is an error in tests: the library
# broadcasts explicitly, so a shape bug cannot hide behind broadcasting.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
  "jax_persistent_cache_min_entry_size_bytes",
  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
  """Level 0 unless the run selects the slow tier (runs before any test computes, so
  before XLA reads XLA_FLAGS; subprocesses inherit it)."""
  markexpr = config.getoption("markexpr") or ""
  slow_tier = "slow" in markexpr.replace("not slow", "")
  flags = os.environ.get("XLA_FLAGS", "")
  if not slow_tier and "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


# ----------------------------------------------------------------------------------------
# Session-shared tiny runs: built once per test session, by whichever xdist worker asks
# first, and read by every module that needs them. A test never writes into a shared run:
# the module fixtures copy it (tests.helpers.copy_shared) before they or their tests mutate it.

import fcntl  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def _shared_root(tmp_path_factory, worker_id: str) -> str:
  """A directory every worker of this session sees: the session's numbered base
  directory under xdist (pytest-N/, fresh each session, so nothing stale is reused),
  the worker's own base directory otherwise."""
  base = tmp_path_factory.getbasetemp()
  root = base if worker_id == "master" else base.parent
  path = os.path.join(str(root), "shared_runs")
  os.makedirs(path, exist_ok=True)
  return path


def _build_once(root: str, name: str, build) -> tuple[str, object]:
  """`build(workdir)` run once per session under an exclusive file lock; returns the
  workdir and what `build` returned (pickled beside it for the other workers). A build
  that raised leaves no done-marker, so the next worker retries it and fails the same."""
  workdir = os.path.join(root, name)
  done = workdir + ".done.pkl"
  with open(workdir + ".lock", "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      if not os.path.exists(done):
        shutil.rmtree(workdir, ignore_errors=True)
        value = build(workdir)
        with open(done + ".tmp", "wb") as f:
          pickle.dump(value, f)
        os.replace(done + ".tmp", done)
      with open(done, "rb") as f:
        return workdir, pickle.load(f)
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_lr_trained(tmp_path_factory, worker_id):
  """tests.helpers.tiny_config() trained (60 steps, no LLC): (config, shared workdir)."""
  from devinterp_jax.experiments import icl_regression
  from tests.helpers import tiny_config

  config = tiny_config()
  workdir, _ = _build_once(
    _shared_root(tmp_path_factory, worker_id),
    "tiny_lr_trained",
    lambda w: icl_regression.train(config, w),
  )
  return config, workdir


@pytest.fixture(scope="session")
def tiny_lr_swept(tiny_lr_trained, tmp_path_factory, worker_id):
  """tiny_lr_trained plus its LLC sweep and results: (config, shared workdir, steps,
  LLCResult)."""
  from devinterp_jax.experiments import icl_regression

  config, trained = tiny_lr_trained

  def build(workdir):
    shutil.copytree(trained, workdir)
    steps, result = icl_regression.estimate(config, workdir)
    icl_regression.write_results(workdir, steps, result, config=config)
    return steps, result

  workdir, (steps, result) = _build_once(
    _shared_root(tmp_path_factory, worker_id), "tiny_lr_swept", build
  )
  return config, workdir, steps, result


@pytest.fixture(scope="session")
def tiny_lr_main_job(tmp_path_factory, worker_id):
  """tests.helpers.main_job_config()'s whole main job (train, LLC, report):
  (config, shared workdir, the job's summary)."""
  from devinterp_jax.experiments import icl_regression
  from tests.helpers import main_job_config

  config = main_job_config()
  workdir, summary = _build_once(
    _shared_root(tmp_path_factory, worker_id),
    "tiny_lr_main_job",
    lambda w: icl_regression.run(config, w),
  )
  return config, workdir, summary


# Module-scoped private copies of the shared runs, for modules that mutate them.


@pytest.fixture(scope="module")
def trained(tiny_lr_trained, tmp_path_factory):
  """A private copy of the session's tiny trained run (tiny_config())."""
  from tests.helpers import copy_shared

  config, src = tiny_lr_trained
  return config, copy_shared(src, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="module")
def swept(tiny_lr_swept, tmp_path_factory):
  """A private copy of the session's tiny swept run (trained, LLC sweep, results)."""
  from tests.helpers import copy_shared

  config, src, steps, result = tiny_lr_swept
  return config, copy_shared(src, tmp_path_factory.mktemp("swept") / "run"), steps, result


# The longest test modules first: pytest-xdist's `--dist loadscope` hands out whole modules
# in collection order, so a long module collected last would run alone at the end
# (longest-processing-time-first scheduling). Neighbours in this list need different
# session-shared runs, so the first two workers do not wait on one build. Modules not
# listed keep their order, after these.
LONGEST_FIRST = (
  "test_reliability_results.py",
  "test_lm_pipeline.py",
  "test_reliability.py",
  "test_pipeline.py",
  "test_estimator_exact.py",
  "test_refined.py",
  "test_notebook.py",
  "test_validation.py",
  "test_training.py",
  "test_seeds.py",
  "test_teacher_student.py",
  "test_restrict.py",
  "test_samplers.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
