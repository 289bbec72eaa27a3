"""Reads a finished run's workdir for analysis (never imports training code).

A workdir holds `config.json`, `metrics.jsonl`, `checkpoints/<step>/` and, after
the LLC sweep, `llc/llc.npz` and `llc/llc.csv`. `load_run` gathers them; the
checkpoints are read lazily (params only), one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import os
import jax
import ml_collections
import numpy as np

from devinterp_jax import paths
from devinterp_jax.data import lm_dataset
from devinterp_jax.data.regression import RegressionTask
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import checkpoints
from devinterp_jax.storage import run_log


@dataclasses.dataclass
class Run:
  """One training run: config, checkpoint steps, LLC results and training log."""

  workdir: str
  config: ml_collections.ConfigDict
  steps: np.ndarray              # scheduled checkpoint steps [C]
  llc: LLCResult | None          # per-checkpoint LLC results ([C] leading axis)
  log: list[dict]                # metrics.jsonl rows
  model: RegressionTransformer | AttentionOnlyLM
  task: RegressionTask | None    # LR only

  @property
  def experiment(self) -> str:
    return self.config.get("experiment", "icl_regression")

  def checkpoints(self, steps=None) -> checkpoints.ParamsSequence:
    """Params at `steps` (default: every scheduled step), restored lazily."""
    abstract = jax.eval_shape(self.model.init_params, jax.random.key(0))
    return checkpoints.ParamsSequence(self.workdir, self.steps if steps is None else steps,
                                      abstract)

  def tokens(self, split: str) -> np.ndarray:
    """An LM run's token split ('train', 'sgld', 'validation'), int32 [N, T]."""
    if self.experiment != "lm":
      raise ValueError(f"{self.workdir!r} is a {self.experiment!r} run, not a language model")
    return lm_dataset.load_run_tokens(self.config, self.workdir, split)

  def bos_id(self) -> int:
    """An LM run's BOS token id, as its dataset's metadata records it."""
    if self.experiment != "lm":
      raise ValueError(f"{self.workdir!r} is a {self.experiment!r} run, not a language model")
    return lm_dataset.run_bos_id(self.config, self.workdir)

  def logged(self, name: str, steps=None) -> np.ndarray:
    """A logged scalar (e.g. 'eval_loss') at `steps` (NaN where not logged)."""
    by_step = {int(r["step"]): r for r in self.log}
    steps = self.steps if steps is None else steps
    return np.array([by_step.get(int(s), {}).get(name, np.nan) for s in steps], float)


def load_run(workdir: str, require_llc: bool = True) -> Run:
  """Loads a run; a missing LLC sweep is an error when `require_llc`."""
  config = run_log.read_config(workdir)
  experiment = config.get("experiment", "icl_regression")
  if experiment not in ("icl_regression", "lm"):
    raise ValueError(f"{workdir!r} holds a {experiment!r} run; this analysis reads "
                     "'icl_regression' and 'lm' runs")
  steps = checkpoints.scheduled_steps(workdir)
  if len(steps) == 0:
    raise checkpoints.CheckpointError(f"no scheduled checkpoints in {workdir!r}")
  llc_path = os.path.join(workdir, "llc", "llc.npz")
  llc = None
  if paths.exists(llc_path):
    llc = LLCResult.load(llc_path)
    if llc.llc_mean.shape != steps.shape:
      raise ValueError(f"{llc_path} holds {llc.llc_mean.shape[0]} checkpoints but the "
                       f"workdir has {len(steps)} scheduled steps; rerun the LLC sweep")
  elif require_llc:
    raise FileNotFoundError(f"{llc_path} is missing: run the LLC sweep first "
                            "(launch/estimate_llc.py or launch/main.py)")
  return Run(workdir=workdir, config=config, steps=steps, llc=llc,
             log=run_log.read_metrics(workdir),
             model=(AttentionOnlyLM.from_config(config) if experiment == "lm" else
                    RegressionTransformer.from_config(config)),
             task=None if experiment == "lm" else RegressionTask.from_config(config))

