"""Developmental analysis of finished runs (reads workdirs; never imports training code).

  find_stage_boundaries   stage boundaries of an LLC curve (App. B.1)
  report.analyze          the whole report directory of a run
  seeds.analyze_seeds     boundaries per seed and their spread (App. B.4)
"""

from devinterp_jax.analysis.stages import (StageBoundaries, compare_boundaries,
                                           find_stage_boundaries, plot_stages)

__all__ = ["StageBoundaries", "compare_boundaries", "find_stage_boundaries", "plot_stages"]
