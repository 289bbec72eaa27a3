"""The report of a finished run, as launch/analyze.py asks for it.

The analysis options are the run's own (its config.json's `analysis`) plus exactly
the fields the user gave (`config_flags.get_override_values`); the flag that takes
them holds every setting's sections (`registry.analysis_options()`), since it is
defined before the run, and so its setting, is known.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from devinterp_jax.analysis import report, run_data
from devinterp_jax.experiments import registry


def flag_options() -> ml_collections.ConfigDict:
  """The `--config` flag's fields: the generic options and every setting's own."""
  return registry.analysis_options()


def analyze_run(
  workdir: str, overrides: Mapping[str, Any] | None = None, out_dir: str | None = None
) -> dict[str, Any]:
  """Writes `<workdir>/report` (or `out_dir`) with the run's options and `overrides`
  (flat, {"hessian.enabled": True}); returns report.json's content."""
  setting = registry.setting(run_data.run_experiment(workdir))
  return report.analyze(
    workdir,
    setting,
    report.options_for_run(workdir, overrides, setting),
    out_dir=out_dir,
    option_prefix="config",
  )
