"""Maps a config's `experiment` name to its pipeline module."""

import importlib
import types

import ml_collections

EXPERIMENTS = {"icl_regression": "devinterp_jax.experiments.icl_regression",
               "lm": "devinterp_jax.experiments.lm"}


def get(name: str) -> types.ModuleType:
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
  return importlib.import_module(EXPERIMENTS[name])


def analysis_options(name: str | None = None) -> ml_collections.ConfigDict:
  """The analysis options of setting `name`: the generic report options plus the
  sections the setting adds (its module's `analysis_options()`, if it has one).
  Without a name, those of every setting merged: launch/analyze.py's flag, which
  is defined before the run (and so its setting) is known."""
  from devinterp_jax.analysis import report  # pylint: disable=g-import-not-at-top
  options = report.default_options()
  for n in ([name] if name is not None else EXPERIMENTS):
    extra = getattr(get(n), "analysis_options", None)
    if extra is not None:
      for section, fields in extra().items():
        if section in options:
          raise ValueError(f"setting {n!r} redefines the generic analysis section "
                           f"{section!r}")
        options[section] = fields
  return options
