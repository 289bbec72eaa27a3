"""Reads a finished run's workdir for analysis (never imports training code).

A workdir holds `config.json`, `metrics.jsonl`, `checkpoints/<step>/` and, after
the LLC sweep, `llc/llc.npz` and `llc/llc.csv`. `load_run(workdir, setting)`
gathers them; the checkpoints are read lazily (params only), one chunk at a time.

A `Setting` is what the generic analysis needs to know of a model family: how to
build its model from a config, how to draw evaluation batches, and the report
sections it adds (`analysis.sections`). Each setting package under
`devinterp_jax/experiments/` defines one (`<setting>/setting.py: SETTING`), and
`experiments/registry.py` finds it by the config's `experiment` name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from devinterp_jax import paths
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import checkpoints
from devinterp_jax.storage import run_log
from devinterp_jax.typing import Batch, Model


@dataclasses.dataclass(frozen=True)
class Setting:
  """A model family as the analysis sees it.

  name: the config's `experiment` value.
  make_model: config → model (a `typing.Model`; the head sections "overlap" and
    "heads" need a `typing.HeadModel`).
  eval_batch: (run, key, size, purpose) → a batch of `size` evaluation samples
    for a generic section; `purpose` is the section's name ("hessian", "overlap").
  sections: the setting's own report sections, by name (`analysis.sections.Section`;
    typed loosely here because sections.py imports this module).
  default_sections: the sections its report runs by default, in order (its own
    and the generic ones: "hessian", "overlap", "heads").
  description: a few words for report titles ("in-context linear regression").
  loss_label: the axis label of the logged `eval_loss`.
  ed_probe: (config, workdir) → (outputs_fn, inputs): the model's outputs on a fixed
    input set (the workdir holds data some settings read),
    the points of essential dynamics (`analysis.essential_dynamics`); training
    records them every `config.train.ed_every` steps and the "ed" section reads them
    (or re-reads the checkpoints). None: the setting has no function-space probe.
  """

  name: str
  make_model: Callable[[ml_collections.ConfigDict], Model]
  eval_batch: Callable[[Run, jax.Array, int, str], Batch]
  sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name → Section
  default_sections: tuple[str, ...] = ("hessian", "overlap", "heads")
  description: str = ""
  loss_label: str = "eval loss"
  ed_probe: (
    Callable[[ml_collections.ConfigDict, str], tuple[Callable[[Any, Any], jax.Array], Any]] | None
  ) = None


@dataclasses.dataclass
class Run:
  """One training run: config, checkpoint steps, LLC results and training log."""

  workdir: str
  config: ml_collections.ConfigDict
  steps: np.ndarray  # scheduled checkpoint steps [N]
  llc: LLCResult | None  # per-checkpoint LLC results ([N] leading axis)
  log: list[dict]  # metrics.jsonl rows
  model: Any  # the setting's model (`HeadModel`)
  setting: Setting

  def require_llc(self) -> LLCResult:
    """The run's LLC results; a run loaded without its sweep is an error here."""
    if self.llc is None:
      raise FileNotFoundError(
        f"{self.workdir!r} has no LLC sweep (llc/llc.npz): run "
        "launch/estimate_llc.py or launch/main.py first"
      )
    return self.llc

  def checkpoints(self, steps=None) -> checkpoints.ParamsSequence:
    """Params at `steps` (default: every scheduled step), restored lazily."""
    abstract = jax.eval_shape(self.model.init_params, jax.random.key(0))
    return checkpoints.ParamsSequence(
      self.workdir, self.steps if steps is None else steps, abstract
    )

  def eval_batch(self, key: jax.Array, size: int, purpose: str) -> Batch:
    """`size` evaluation samples from the setting (`Setting.eval_batch`)."""
    return self.setting.eval_batch(self, key, size, purpose)

  def logged(self, name: str, steps=None) -> np.ndarray:
    """A logged scalar (e.g. 'eval_loss') at `steps` (NaN where not logged)."""
    by_step = {int(r["step"]): r for r in self.log}
    steps = self.steps if steps is None else steps
    return np.array([by_step.get(int(s), {}).get(name, np.nan) for s in steps], float)


def run_experiment(workdir: str) -> str:
  """The setting name a workdir's config.json records (`config.experiment`)."""
  return run_log.read_config(workdir).get("experiment", "icl_regression")


def load_run(workdir: str, setting: Setting, require_llc: bool = True) -> Run:
  """Loads a run of `setting`; a missing LLC sweep is an error when `require_llc`."""
  config = run_log.read_config(workdir)
  experiment = config.get("experiment", "icl_regression")
  if experiment != setting.name:
    raise ValueError(
      f"{workdir!r} holds a {experiment!r} run, not a {setting.name!r} one; "
      "load it with its own setting (experiments.registry.setting)"
    )
  steps = checkpoints.scheduled_steps(workdir)
  if len(steps) == 0:
    raise checkpoints.CheckpointError(f"no scheduled checkpoints in {workdir!r}")
  llc_path = os.path.join(workdir, "llc", "llc.npz")
  llc = None
  if paths.exists(llc_path):
    llc = LLCResult.load(llc_path)
    if llc.llc_mean.shape != steps.shape:
      raise ValueError(
        f"{llc_path} holds {llc.llc_mean.shape[0]} checkpoints but the "
        f"workdir has {len(steps)} scheduled steps; rerun the LLC sweep"
      )
  elif require_llc:
    raise FileNotFoundError(
      f"{llc_path} is missing: run the LLC sweep first (launch/estimate_llc.py or launch/main.py)"
    )
  return Run(
    workdir=workdir,
    config=config,
    steps=steps,
    llc=llc,
    log=run_log.read_metrics(workdir),
    model=setting.make_model(config),
    setting=setting,
  )
