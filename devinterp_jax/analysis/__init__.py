"""Developmental analysis of finished runs (reads workdirs; never imports training code).

  find_stage_boundaries   stage boundaries of an LLC curve (App. B.1)
  stage_stability         each boundary's stability under chain / draw-window resampling
  report.analyze          the whole report directory of a run
  seeds.analyze_seeds     boundaries per seed and their spread (App. B.4)

The figures are drawn by `devinterp_jax.viz` (analysis computes, viz draws).
"""

from devinterp_jax.analysis.stages import (
  StageBoundaries,
  StageStability,
  compare_boundaries,
  find_stage_boundaries,
  stage_stability,
)

__all__ = [
  "StageBoundaries",
  "StageStability",
  "compare_boundaries",
  "find_stage_boundaries",
  "stage_stability",
]
