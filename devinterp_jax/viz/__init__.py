"""Every figure of devinterp_jax, drawn on `Figure` objects with no global plotting state.

  figures   figure(), save() (the one atomic PNG save), step_axis() (the one
            training-step axis: log, symlog with a step ≤ 0)
  llc       plot_llc_curve, plot_llc_traces, plot_calibration
  stages    plot_stages, plot_seed_stages and the stage shading / boundary marks
  heads     plot_head_trajectories, plot_head_clusters, plot_dispersion_and_overlap
  hessian   plot_llc_vs_hessian
  overlap   plot_overlap
  lr        plot_behaviour, plot_structure (in-context linear regression)
  lm        plot_lm_metrics (language model)
  teacher_student  plot_teacher_student (ReLU MLP teacher–student)

Each `plot_*(…, path)` writes a PNG and returns `path`; the matching `*_figure(…)`
returns the `matplotlib.figure.Figure` instead, for notebooks and tests. The
modules import numpy, matplotlib, `devinterp_jax.atomic` and sampling's result
types only: inputs from analysis (stage boundaries, head clusters, metric dicts)
are used through their attributes and keys. `import devinterp_jax` does not
import this package (nor matplotlib); import the module you need.
"""
