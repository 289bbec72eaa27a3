"""The LR setting's report sections: "behaviour" (App. D.1) and "structure" (App. D.2).

behaviour  `behaviour.behaviour_metrics` on one evaluation batch (key stream 0),
           behaviour.png, and the milestones the paper reads off them
           (`milestones`: task prior, ICL onset).
structure  `structure.structure_metrics` (key stream 1), structure.png, and the
           head labels per query type at the last checkpoint (`structure.head_labels`:
           L0H0 over all queries, L0H0x over x-token queries, L0H0y over y-token ones).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from devinterp_jax import config_checks
from devinterp_jax.analysis.sections import Context, Output, Section, timed
from devinterp_jax.data.regression import RegressionTask
from devinterp_jax.experiments.icl_regression import behaviour, structure
from devinterp_jax.viz import lr as lr_viz

BEHAVIOUR_STREAM, STRUCTURE_STREAM = 0, 1


def milestones(
  steps: np.ndarray, columns: Mapping[str, np.ndarray], stage_of=None
) -> dict[str, Any]:
  """The LR developmental milestones the paper reads off its metrics.

  task_prior: the checkpoint where the predictions are closest to the
    task-prior prediction (App. D.1.1), with that distance beside the initial one.
  icl_onset: the first checkpoint where ICL_{1:4} has fallen by half of its
    total fall (App. D.1.2: ICL scores falling marks in-context learning).
  Each milestone names the stage it falls in (`stage_of(step)`; '?' without one).
  """
  steps = np.asarray(steps)
  stage_of = stage_of or (lambda step: "?")
  out: dict[str, Any] = {}
  dist = columns.get("dist_prior")
  if dist is not None and np.isfinite(dist).any():
    i = int(np.nanargmin(dist))
    out["task_prior"] = {
      "step": int(steps[i]),
      "stage": stage_of(int(steps[i])),
      "dist_prior": float(dist[i]),
      "dist_prior_initial": float(dist[0]),
      "dist_zero": float(columns["dist_zero"][i]),
      "mse": float(columns["mse"][i]),
      "prior_mse": float(
        np.nanmean([columns[k][i] for k in columns if k.startswith("prior_loss_k")])
      ),
    }
  icl = columns.get("icl_1_4")
  if icl is not None and np.isfinite(icl).any():
    start, low = float(icl[0]), float(np.nanmin(icl))
    half = start - 0.5 * (start - low)
    i = int(np.argmax(icl <= half))
    out["icl_onset"] = {
      "step": int(steps[i]),
      "stage": stage_of(int(steps[i])),
      "icl_1_4_initial": start,
      "icl_1_4_min": low,
      "icl_1_4_at_onset": float(icl[i]),
    }
  if "task_prior" in out and "icl_onset" in out:
    out["task_prior_before_icl"] = out["task_prior"]["step"] <= out["icl_onset"]["step"]
  return out


def milestone_lines(marks: Mapping[str, Any]) -> list[str]:
  """report.md bullets of `milestones`."""
  lines = []
  tp, icl = marks.get("task_prior"), marks.get("icl_onset")
  if tp:
    lines.append(
      f"* **Task prior** ({tp['stage']}): predictions are closest to the "
      f"task-prior prediction at step {tp['step']} (mean squared distance "
      f"{tp['dist_prior']:.3g}, from {tp['dist_prior_initial']:.3g} at the first "
      f"checkpoint); the model's MSE there is {tp['mse']:.3f} vs "
      f"{tp['prior_mse']:.3f} for the task-prior predictor."
    )
  if icl:
    lines.append(
      f"* **In-context learning** ({icl['stage']}): ICL₁:₄ = L₄ − L₁ falls from "
      f"{icl['icl_1_4_initial']:.3f} to {icl['icl_1_4_min']:.3f}; half of that "
      f"fall is reached at step {icl['step']}."
    )
  if "task_prior_before_icl" in marks:
    lines.append(
      f"* Task-prior stage before the ICL stage: "
      f"**{'yes' if marks['task_prior_before_icl'] else 'no'}**."
    )
  return lines


def _task(ctx: Context) -> RegressionTask:
  return RegressionTask.from_config(ctx.run.config)


def _behaviour(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.behaviour
  with timed("Behavioural metrics"):
    metrics = behaviour.behaviour_metrics(
      run.model,
      ctx.checkpoints(),
      _task(ctx),
      ctx.key(BEHAVIOUR_STREAM),
      o.batch_size,
      gains=tuple(o.gains),
      checkpoint_chunk=ctx.options.checkpoint_chunk,
    )
  fig = lr_viz.plot_behaviour(
    run.steps,
    {**ctx.metrics, **metrics},
    ctx.path("behaviour.png"),
    boundaries=ctx.edges,
    title="Behaviour (App. D.1)",
  )
  marks = milestones(run.steps, metrics, ctx.stage_of)
  return Output(
    metrics=metrics,
    figures=[("behaviour", fig)],
    milestones=marks,
    milestone_lines=milestone_lines(marks),
  )


def _structure(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.structure
  with timed("Structural metrics"):
    metrics = structure.structure_metrics(
      run.model,
      ctx.checkpoints(),
      _task(ctx),
      ctx.key(STRUCTURE_STREAM),
      o.batch_size,
      checkpoint_chunk=ctx.options.checkpoint_chunk,
      collapse_threshold=o.collapse_threshold,
    )
  fig = lr_viz.plot_structure(
    run.steps,
    {**ctx.metrics, **metrics},
    ctx.path("structure.png"),
    boundaries=ctx.edges,
    title="Structure (App. D.2)",
  )
  labels = structure.head_labels(metrics)
  return Output(
    metrics=metrics,
    figures=[("structure", fig)],
    head_labels={k: str(np.asarray(v)[-1]) for k, v in sorted(labels.items())},
  )


BEHAVIOUR = Section(
  "behaviour",
  _behaviour,
  defaults=dict(batch_size=2048, gains=(0.5, 1.0, 2.0, 4.0, 8.0)),
  validate=lambda o, p: config_checks.check_fields(
    o, p, {"batch_size": "int>=1", "gains": "nums>0"}
  ),
)
STRUCTURE = Section(
  "structure",
  _structure,
  defaults=dict(batch_size=256, collapse_threshold=0.1),
  validate=lambda o, p: config_checks.check_fields(
    o, p, {"batch_size": "int>=1", "collapse_threshold": "num>=0"}
  ),
)
