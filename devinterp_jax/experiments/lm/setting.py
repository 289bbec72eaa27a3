"""The attention-only language-model setting as the analysis sees it (`SETTING`).

No training code is imported here: `analysis` reads LM runs through this module.
"""

from __future__ import annotations

import jax

from devinterp_jax.analysis.run_data import Run, Setting
from devinterp_jax.experiments.lm import sections
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.typing import Batch


def eval_batch(run: Run, key: jax.Array, size: int, purpose: str) -> Batch:
  """The first `size` validation contexts (the same for every purpose and key)."""
  del key, purpose
  return {"tokens": sections.tokens(run, "validation")[:size]}


SETTING = Setting(
  name="lm",
  make_model=AttentionOnlyLM.from_config,
  eval_batch=eval_batch,
  sections={"lm": sections.LM},
  default_sections=("lm", "hessian", "overlap", "heads"),
  description="attention-only language model",
  loss_label="validation loss (nats)",
)
