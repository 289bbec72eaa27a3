"""The attention-only language-model setting (paper §6, App. C).

  setting.py    SETTING: model factory, evaluation batches, report sections (analysis)
  sections.py   the "lm" report section, its milestones and head labels
  metrics.py    the LM metrics over checkpoints (App. C)
  pipeline.py   train → LLC sweep → report (the launchers' functions)

`lm.run(config, workdir)` and the other pipeline functions are the
pipeline module's, loaded on first use (the analysis imports only `setting`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
  if name.startswith("__"):
    raise AttributeError(name)
  if importlib.util.find_spec(f"{__name__}.{name}") is not None:   # a submodule
    return importlib.import_module(f"{__name__}.{name}")
  pipeline = importlib.import_module(f"{__name__}.pipeline")
  try:
    return getattr(pipeline, name)
  except AttributeError:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
