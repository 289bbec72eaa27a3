"""The in-context linear regression setting as the analysis sees it (`SETTING`).

No training code is imported here: `analysis` reads LR runs through this module.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import ml_collections

from devinterp_jax.analysis.run_data import Run, Setting
from devinterp_jax.data.regression import RegressionTask, sample_batch
from devinterp_jax.experiments.icl_regression import behaviour
from devinterp_jax.experiments.icl_regression import sections
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.typing import Batch, Params

# The ED input set's key stream, fold_in(key(config.seed), ED_STREAM): apart from the
# pipeline's streams (init, data, eval, SGLD data: 0-3).
ED_STREAM = 7


def eval_batch(run: Run, key: jax.Array, size: int, purpose: str) -> Batch:
  """The Hessian's batch is a fresh `sample_batch`; the overlap's is the behaviour
  metrics' evaluation data (`behaviour.evaluation_data`: x and y tokens)."""
  task = RegressionTask.from_config(run.config)
  if purpose == "overlap":
    data = behaviour.evaluation_data(task, key, size)
    return {"xs": data["xs"], "ys": data["ys"]}
  return sample_batch(key, task, size)


@functools.lru_cache(maxsize=8)
def _predictions(model: RegressionTransformer):
  def outputs(params: Params, inputs: Batch) -> jax.Array:
    return cast(jax.Array, model.predict(params, inputs["xs"], inputs["ys"]))  # [B, K]

  return outputs


def ed_probe(config: ml_collections.ConfigDict, workdir: str = ""):
  """Essential dynamics' points: the predictions ŷ_k at every x position of
  `config.train.ed_batch_size` fixed sequences (one outputs_fn per model, so its
  compiled program is reused). The LR draws its inputs; `workdir` is unused."""
  del workdir
  task = RegressionTask.from_config(config)
  key = jax.random.fold_in(jax.random.key(config.seed), ED_STREAM)
  batch = sample_batch(key, task, config.train.ed_batch_size)
  # lru_cache key: flax Modules are dataclass(unsafe_hash=True), which pyright misses.
  model = RegressionTransformer.from_config(config)
  return _predictions(model), {  # pyright: ignore[reportArgumentType]  (hashable)
    "xs": batch["xs"],
    "ys": batch["ys"],
  }


SETTING = Setting(
  name="icl_regression",
  make_model=RegressionTransformer.from_config,
  eval_batch=eval_batch,
  sections={"behaviour": sections.BEHAVIOUR, "structure": sections.STRUCTURE},
  default_sections=("behaviour", "structure", "hessian", "overlap", "heads", "ed"),
  description="in-context linear regression",
  loss_label="eval MSE",
  ed_probe=ed_probe,
)
