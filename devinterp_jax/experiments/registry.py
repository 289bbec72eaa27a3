"""Maps a config's `experiment` name to its pipeline module."""

import importlib
import types

EXPERIMENTS = {"icl_regression": "devinterp_jax.experiments.icl_regression",
               "lm": "devinterp_jax.experiments.lm"}


def get(name: str) -> types.ModuleType:
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
  return importlib.import_module(EXPERIMENTS[name])
