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
