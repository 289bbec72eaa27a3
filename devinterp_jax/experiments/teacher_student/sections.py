"""The teacher–student report section "teacher": the student against its teacher.

Per checkpoint, on one fresh noiseless batch (key stream 0; `teacher_metrics`):

  test_mse                 mean (f(x) − f*(x))² against the teacher's noiseless output
  unit_active_fraction     [U] the fraction of inputs each student hidden unit fires on
  active_units, dead_units hidden units firing on more / at most `active_fraction` of inputs
  teacher_alignment        [J] per first-layer teacher unit, the largest cosine between its
                           (w, b) and an active student unit's (ReLU units are positively
                           homogeneous: the direction of (w, b) is the unit, up to scale)
  teacher_units_recovered  teacher units whose best cosine is >= `align_threshold`
  aligned_units            active student units within that cosine of some teacher unit
                           (more than the teacher units recovered: duplicated, split units)

Milestones (`milestones`): the first checkpoint where the test MSE is within a
factor 2 of its final value, and the first where every teacher unit is recovered.
The markdown puts the last checkpoint's LLC beside d/2, the learning coefficient of
a regular model with the student's d parameters (an upper bound of λ).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from devinterp_jax import config_checks, theory
from devinterp_jax.analysis import batching
from devinterp_jax.analysis.sections import Context, Output, Section, timed
from devinterp_jax.data.teacher_student import TeacherStudentTask, sample_batch
from devinterp_jax.models.mlp import ReLUMLP, layer_name
from devinterp_jax.typing import Params
from devinterp_jax.viz import teacher_student as ts_viz

TEACHER_STREAM = 0
MSE_FACTOR = 2.0  # "converged": the test MSE first within this factor of its final value


def unit_vectors(params: Params) -> jax.Array:
  """The first layer's units as unit vectors (w, b) / ‖(w, b)‖: [U, D_0 + 1]."""
  p = params[layer_name(0)]
  u_UxD = jnp.concatenate([p["kernel"].T, p["bias"][:, None]], axis=1)
  return u_UxD / jnp.maximum(jnp.linalg.norm(u_UxD, axis=1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=8)
def _metric_fn(model: ReLUMLP, active_fraction: float, align_threshold: float):
  """The per-checkpoint metrics of `teacher_metrics` (cached: one program per model)."""

  def fn(params: Params, data: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    x_BxD, f_BxO, teacher_JxD = data["x"], data["f"], data["teacher_units"]
    pre = model.hidden(params, x_BxD)
    frac_U = jnp.concatenate([jnp.mean(z > 0, axis=0) for z in pre])
    active_U = frac_U > active_fraction
    mse = jnp.mean(jnp.square(model.apply(params, x_BxD) - f_BxO))
    first_active = active_U[: model.widths[1]]
    cos_UxJ = unit_vectors(params) @ teacher_JxD.T
    cos_UxJ = jnp.where(first_active[:, None], cos_UxJ, -1.0)  # dead units align with none
    best_J = jnp.max(cos_UxJ, axis=0)
    return {
      "test_mse": mse,
      "unit_active_fraction": frac_U,
      "active_units": jnp.sum(active_U),
      "dead_units": jnp.sum(~active_U),
      "teacher_alignment": best_J,
      "alignment_mean": jnp.mean(best_J),
      "teacher_units_recovered": jnp.sum(best_J >= align_threshold),
      "aligned_units": jnp.sum(first_active & (jnp.max(cos_UxJ, axis=1) >= align_threshold)),
    }

  return fn


def teacher_metrics(
  model: ReLUMLP,
  checkpoints,
  task: TeacherStudentTask,
  key: jax.Array,
  batch_size: int,
  *,
  active_fraction: float = 0.01,
  align_threshold: float = 0.95,
  checkpoint_chunk: int = 8,
) -> dict[str, np.ndarray]:
  """The module docstring's metrics of every checkpoint, on one batch from `key`."""
  if model.widths[0] != task.input_dim or model.widths[-1] != task.output_dim:
    raise ValueError(
      f"the student's widths {model.widths} do not fit the teacher's "
      f"{task.teacher_widths} (input and output widths must match)"
    )
  batch = sample_batch(key, task, batch_size, with_targets=True)
  data = {"x": batch["x"], "f": batch["f"], "teacher_units": unit_vectors(task.teacher_params())}
  out = batching.map_checkpoints(
    _metric_fn(model, float(active_fraction), float(align_threshold)),
    checkpoints,
    data,
    checkpoint_chunk=checkpoint_chunk,
  )
  for name in ("active_units", "dead_units", "teacher_units_recovered", "aligned_units"):
    out[name] = out[name].astype(np.int64)
  return out


def milestones(
  steps: np.ndarray,
  metrics: Mapping[str, np.ndarray],
  stage_of=None,
  align_threshold: float | None = None,
) -> dict[str, Any]:
  """mse_converged: the first checkpoint whose test MSE is within `MSE_FACTOR` of the
  final one; teacher_recovered: the first where every teacher unit is recovered
  (step None when never). Each names its stage (`stage_of`; '?' without one)."""
  steps = np.asarray(steps)
  stage_of = stage_of or (lambda step: "?")
  out: dict[str, Any] = {}
  mse = np.asarray(metrics["test_mse"], float)
  if np.isfinite(mse).any():
    final = float(mse[-1])
    i = int(np.argmax(mse <= MSE_FACTOR * final))
    out["mse_converged"] = {
      "step": int(steps[i]),
      "stage": stage_of(int(steps[i])),
      "test_mse": float(mse[i]),
      "test_mse_initial": float(mse[0]),
      "test_mse_final": final,
      "factor": MSE_FACTOR,
    }
  align = np.asarray(metrics["teacher_alignment"], float)
  recovered = np.asarray(metrics["teacher_units_recovered"]) == align.shape[1]
  step = int(steps[int(np.argmax(recovered))]) if recovered.any() else None
  out["teacher_recovered"] = {
    "step": step,
    "stage": None if step is None else stage_of(step),
    "num_teacher_units": int(align.shape[1]),
    "threshold": (None if align_threshold is None else float(align_threshold)),
    "recovered_final": int(np.asarray(metrics["teacher_units_recovered"])[-1]),
  }
  return out


def milestone_lines(marks: Mapping[str, Any]) -> list[str]:
  """report.md bullets of `milestones`."""
  lines = []
  m = marks.get("mse_converged")
  if m:
    lines.append(
      f"* **Fit** ({m['stage']}): the test MSE against the teacher is first within "
      f"{m['factor']:g}× of its final value {m['test_mse_final']:.3g} at step "
      f"{m['step']} ({m['test_mse']:.3g}; {m['test_mse_initial']:.3g} at the first "
      f"checkpoint)."
    )
  r = marks.get("teacher_recovered")
  if r:
    if r["step"] is None:
      lines.append(
        f"* **Teacher recovered**: not reached ({r['recovered_final']} of "
        f"{r['num_teacher_units']} teacher units at the last checkpoint)."
      )
    else:
      within = "" if r["threshold"] is None else f" within cosine {r['threshold']:g}"
      lines.append(
        f"* **Teacher recovered** ({r['stage']}): every one of the "
        f"{r['num_teacher_units']} teacher units has a student unit{within} from "
        f"step {r['step']}."
      )
  return lines


def _teacher(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.teacher
  task = TeacherStudentTask.from_config(run.config)
  with timed("Teacher–student metrics"):
    metrics = teacher_metrics(
      run.model,
      ctx.checkpoints(),
      task,
      ctx.key(TEACHER_STREAM),
      o.batch_size,
      active_fraction=o.active_fraction,
      align_threshold=o.align_threshold,
      checkpoint_chunk=ctx.options.checkpoint_chunk,
    )
  fig = ts_viz.plot_teacher_student(
    run.steps,
    {**ctx.columns, **metrics},
    ctx.path("teacher_student.png"),
    boundaries=ctx.edges,
    align_threshold=o.align_threshold,
    num_params=run.model.num_params,
    title=f"Student {run.model.widths} vs teacher {task.teacher_widths}",
  )
  marks = milestones(run.steps, metrics, ctx.stage_of, o.align_threshold)
  d = run.model.num_params
  half_d = float(theory.regular(d)[0])
  llc_last = float(run.require_llc().llc_mean[-1])
  final = {
    "step": int(run.steps[-1]),
    "num_params": d,
    "half_num_params": half_d,
    "llc": llc_last,
    "llc_over_half_d": llc_last / half_d,
    "test_mse": float(metrics["test_mse"][-1]),
    "active_units": int(metrics["active_units"][-1]),
    "dead_units": int(metrics["dead_units"][-1]),
    "aligned_units": int(metrics["aligned_units"][-1]),
    "teacher_units_recovered": int(metrics["teacher_units_recovered"][-1]),
    "teacher_units": int(task.teacher_widths[1]),
    "student_widths": list(run.model.widths),
    "teacher_widths": list(task.teacher_widths),
  }
  lines = [
    "## Student vs teacher",
    "",
    f"Student {tuple(run.model.widths)} (d = {d} parameters), teacher "
    f"{tuple(task.teacher_widths)}, label noise σ = {task.noise_std:g}. At the last "
    f"checkpoint (step {final['step']}): test MSE {final['test_mse']:.3g}; "
    f"{final['active_units']} active and {final['dead_units']} dead hidden units; "
    f"{final['teacher_units_recovered']} of {final['teacher_units']} teacher units "
    f"recovered by {final['aligned_units']} aligned student units (cosine ≥ "
    f"{o.align_threshold:g}).",
    "",
    f"LLC λ̂ = {llc_last:.2f} against d/2 = {half_d:g} (the regular model's λ, an upper "
    f"bound): {100 * final['llc_over_half_d']:.0f} % of it.",
    "",
  ]
  return Output(
    metrics=metrics,
    figures=[("teacher_student", fig)],
    milestones=marks,
    milestone_lines=milestone_lines(marks),
    markdown=lines,
    report={"teacher_last_checkpoint": final},
  )


def _validate(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(
    o, prefix, {"batch_size": "int>=1", "active_fraction": "unit", "align_threshold": "unit"}
  )


TEACHER = Section(
  "teacher",
  _teacher,
  defaults=dict(batch_size=4096, active_fraction=0.01, align_threshold=0.95),
  validate=_validate,
)
