"""The in-context linear regression setting (paper §4–5, App. D).

  setting.py    SETTING: model factory, evaluation batches, report sections (analysis)
  sections.py   the "behaviour" and "structure" report sections and milestones
  behaviour.py  behavioural metrics (App. D.1)
  structure.py  structural metrics and head labels (App. D.2)
  pipeline.py   train → LLC sweep → report (the launchers' functions)

`icl_regression.run(config, workdir)` and the other pipeline functions are the
pipeline module's, loaded on first use (the analysis imports only `setting`).
"""

from devinterp_jax.experiments import registry

__getattr__ = registry.forward_to_pipeline(__name__)
