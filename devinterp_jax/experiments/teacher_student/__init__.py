"""The teacher–student setting: a ReLU MLP student regresses a smaller random ReLU teacher.

  setting.py    SETTING: model factory, evaluation batches, report sections (analysis)
  sections.py   the "teacher" report section: fit, dead / active units, alignment
  pipeline.py   train → LLC sweep → report (the launchers' functions)

`teacher_student.run(config, workdir)` and the other pipeline functions are the
pipeline module's, loaded on first use (the analysis imports only `setting`).
"""

from devinterp_jax.experiments import registry

__getattr__ = registry.forward_to_pipeline(__name__)
