"""The teacher–student setting as the analysis sees it (`SETTING`).

No training code is imported here: `analysis` reads teacher–student runs through
this module. The student has no attention heads, so the default report runs the
"teacher" section and the generic Hessian, not the head sections.
"""

from __future__ import annotations

import jax

from devinterp_jax.analysis.run_data import Run, Setting
from devinterp_jax.data.teacher_student import TeacherStudentTask, sample_batch
from devinterp_jax.experiments.teacher_student import sections
from devinterp_jax.models.mlp import ReLUMLP
from devinterp_jax.typing import Batch


def eval_batch(run: Run, key: jax.Array, size: int, purpose: str) -> Batch:
  """A fresh teacher batch {"x", "y"} (noisy labels, as in training) for any purpose."""
  del purpose
  return sample_batch(key, TeacherStudentTask.from_config(run.config), size)


SETTING = Setting(
  name="teacher_student",
  make_model=ReLUMLP.from_config,
  eval_batch=eval_batch,
  sections={"teacher": sections.TEACHER},
  default_sections=("teacher", "hessian"),
  description="ReLU teacher–student regression",
  loss_label="eval MSE",
)
