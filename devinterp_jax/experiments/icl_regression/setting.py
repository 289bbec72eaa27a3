"""The in-context linear regression setting as the analysis sees it (`SETTING`).

No training code is imported here: `analysis` reads LR runs through this module.
"""

from __future__ import annotations

import jax

from devinterp_jax.analysis.run_data import Run, Setting
from devinterp_jax.data.regression import RegressionTask, sample_batch
from devinterp_jax.experiments.icl_regression import behaviour
from devinterp_jax.experiments.icl_regression import sections
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.typing import Batch


def eval_batch(run: Run, key: jax.Array, size: int, purpose: str) -> Batch:
  """The Hessian's batch is a fresh `sample_batch`; the overlap's is the behaviour
  metrics' evaluation data (`behaviour.evaluation_data`: x and y tokens)."""
  task = RegressionTask.from_config(run.config)
  if purpose == "overlap":
    data = behaviour.evaluation_data(task, key, size)
    return {"xs": data["xs"], "ys": data["ys"]}
  return sample_batch(key, task, size)


SETTING = Setting(
  name="icl_regression",
  make_model=RegressionTransformer.from_config,
  eval_batch=eval_batch,
  sections={"behaviour": sections.BEHAVIOUR, "structure": sections.STRUCTURE},
  default_sections=("behaviour", "structure", "hessian", "overlap", "heads"),
  description="in-context linear regression",
  loss_label="eval MSE",
)
