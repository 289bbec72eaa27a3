"""The one registry of settings: a config's `experiment` name → its package.

A setting is a package under `devinterp_jax/experiments/<name>/` with
`setting.py` (`SETTING`, what the analysis needs: no training code) and
`pipeline.py` (train, estimate, calibrate, run: what the launchers call).
Adding a setting is one folder plus one line here (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any, Callable

import ml_collections

from devinterp_jax.analysis.run_data import Setting

SETTINGS = {
  "icl_regression": "devinterp_jax.experiments.icl_regression",
  "lm": "devinterp_jax.experiments.lm",
  "teacher_student": "devinterp_jax.experiments.teacher_student",
}


def _package(name: str) -> str:
  if name not in SETTINGS:
    raise ValueError(f"unknown experiment {name!r}; known: {sorted(SETTINGS)}")
  return SETTINGS[name]


def get(name: str) -> types.ModuleType:
  """The pipeline module of setting `name` (train, estimate, calibrate, run, …)."""
  return importlib.import_module(f"{_package(name)}.pipeline")


def job(name: str, job_name: str) -> Callable[..., Any]:
  """Job `job_name` (e.g. "run_seeds") of setting `name`'s pipeline; a clear error
  naming the setting and the jobs it has when it has no such job."""
  pipeline = get(name)
  fn = getattr(pipeline, job_name, None)
  if not callable(fn):
    jobs = sorted(
      j
      for j in ("train", "estimate", "calibrate", "run", "run_seeds")
      if callable(getattr(pipeline, j, None))
    )
    raise ValueError(
      f"setting {name!r} (config.experiment) has no {job_name!r} job; its pipeline has {jobs}"
    )
  return fn


def setting(name: str) -> Setting:
  """The analysis view of setting `name` (`<package>.setting.SETTING`)."""
  return importlib.import_module(f"{_package(name)}.setting").SETTING


def analysis_options(name: str | None = None) -> ml_collections.ConfigDict:
  """The analysis options of setting `name`: the generic report options plus the
  setting's own sections (`report.default_options`). Without a name, those of
  every setting merged: launch/analyze.py's flag, which is defined before the run
  (and so its setting) is known; the run's own `sections` list then applies."""
  from devinterp_jax.analysis import report

  if name is not None:
    return report.default_options(setting(name))
  options = report.default_options()
  for n in SETTINGS:
    for key, value in report.default_options(setting(n)).items():
      if key not in options:
        options[key] = value
  return options


def forward_to_pipeline(package: str) -> Callable[[str], Any]:
  """A setting package's module `__getattr__`: a submodule by its name, else the
  attribute of `<package>.pipeline`, imported on first use (so `icl_regression.run`
  works while the analysis, which imports only `<package>.setting`, never loads the
  pipeline and its training code)."""

  def __getattr__(name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    if importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule
      return importlib.import_module(f"{package}.{name}")
    pipeline = importlib.import_module(f"{package}.pipeline")
    try:
      return getattr(pipeline, name)
    except AttributeError:
      raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

  return __getattr__
