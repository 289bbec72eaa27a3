"""The attention-only language-model setting (paper §6, App. C).

  setting.py    SETTING: model factory, evaluation batches, report sections (analysis)
  sections.py   the "lm" report section, its milestones and head labels
  metrics.py    the LM metrics over checkpoints (App. C)
  pipeline.py   train → LLC sweep → report (the launchers' functions)

`lm.run(config, workdir)` and the other pipeline functions are the
pipeline module's, loaded on first use (the analysis imports only `setting`).
"""

from devinterp_jax.experiments import registry

__getattr__ = registry.forward_to_pipeline(__name__)
