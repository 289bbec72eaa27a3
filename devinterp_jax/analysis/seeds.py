"""Stage boundaries across seeds (App. B.4).

`analyze_seeds(workdir, seeds)` reads `<workdir>/seed_<s>/llc/llc.npz` for every
seed, finds the stage boundaries of each seed's LLC curve and of the mean curve
over seeds (at the checkpoints all seeds share), matches every boundary of the
mean to each seed's nearest boundary, and writes `<workdir>/seeds_report/`:
`seeds.json`, `boundaries.csv` (one row per mean-curve boundary with the
matched step of every seed and the spread), `seed_stages.png` and `seeds.md`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, paths
from devinterp_jax.analysis import stages
from devinterp_jax.analysis.report import default_options, fit_stages
from devinterp_jax.analysis.run_data import Setting, load_run
from devinterp_jax.viz import stages as stages_viz


def analyze_seeds(
  workdir: str,
  seeds: Sequence[int],
  setting: Setting,
  options: ml_collections.ConfigDict | None = None,
) -> dict[str, Any]:
  """Per-seed and mean-curve stage boundaries with their spread across seeds (runs of
  `setting`)."""
  options = default_options(setting) if options is None else options
  runs = [load_run(os.path.join(workdir, f"seed_{int(s)}"), setting) for s in seeds]
  llcs = [r.require_llc() for r in runs]
  common = sorted(set.intersection(*[set(int(t) for t in r.steps) for r in runs]))
  if len(common) < 4:
    raise ValueError(f"the seeds share only {len(common)} checkpoint steps; need >= 4")
  per_seed = [
    fit_stages(r.steps, llc.llc_mean, llc.llc_std, llc.llc_sem, options)
    for r, llc in zip(runs, llcs)
  ]
  idx = [np.searchsorted(r.steps, common) for r in runs]
  curves = np.stack([llc.llc_mean[i] for llc, i in zip(llcs, idx)])  # [S, C]
  # The mean curve's sampling error (chains) and its std over chains, pooled.
  sems = np.stack([llc.llc_sem[i] for llc, i in zip(llcs, idx)])
  stds = np.stack([llc.llc_std[i] for llc, i in zip(llcs, idx)])
  mean = curves.mean(0)
  reference = fit_stages(
    np.array(common),
    mean,
    np.sqrt(np.square(stds).mean(0)),
    np.sqrt(np.square(sems).sum(0)) / len(runs),
    options,
  )
  matches = stages.compare_boundaries(per_seed, reference)
  out = os.path.join(workdir, "seeds_report")
  paths.makedirs(out)
  labels = [f"seed {int(s)}" for s in seeds]
  figure = stages_viz.plot_seed_stages(
    per_seed, reference, os.path.join(out, "seed_stages.png"), labels=labels
  )
  summary = {
    "seeds": [int(s) for s in seeds],
    "mean_curve": {
      "boundary_steps": list(reference.boundary_steps),
      "boundary_kinds": list(reference.boundary_kinds),
      "stages": reference.stages,
    },
    "per_seed": {
      lab: {
        "boundary_steps": list(r.boundary_steps),
        "boundary_kinds": list(r.boundary_kinds),
        "stages": r.stages,
      }
      for lab, r in zip(labels, per_seed)
    },
    "matches": _jsonable(matches),
    "figure": os.path.basename(figure),
  }
  atomic.write_text(os.path.join(out, "seeds.json"), json.dumps(summary, indent=1))
  lines = ["boundary,mean_curve_step," + ",".join(labels) + ",seeds_matched,ln_step_std"]
  md = [
    "# Stage boundaries across seeds (App. B.4)",
    "",
    f"Seeds {summary['seeds']}; the mean curve averages the LLC over seeds at the "
    f"{len(common)} shared checkpoints.",
    "",
    "| boundary | mean curve | " + " | ".join(labels) + " | matched | std of ln step |",
    "|---|---|" + "---|" * len(labels) + "---|---|",
  ]
  for j, m in enumerate(matches):
    steps_j = [("" if s is None else str(int(s))) for s in m["matched_steps"]]
    spread = m.get("log_step_std")
    lines.append(
      ",".join(
        [
          str(j + 1),
          str(int(m["reference_step"])),
          *steps_j,
          str(m["count"]),
          "" if spread is None else repr(spread),
        ]
      )
    )
    md.append(
      f"| {j + 1} | {int(m['reference_step'])} | "
      + " | ".join(s or "–" for s in steps_j)
      + f" | {m['count']}/{len(labels)} | "
      f"{'–' if spread is None else f'{spread:.2f}'} |"
    )
  md += ["", "Per-seed boundaries (all, matched or not):", ""]
  md += [f"* {lab}: {list(r.boundary_steps)}" for lab, r in zip(labels, per_seed)]
  md += ["", f"![seed stages]({os.path.basename(figure)})", ""]
  atomic.write_text(os.path.join(out, "boundaries.csv"), "\n".join(lines) + "\n")
  atomic.write_text(os.path.join(out, "seeds.md"), "\n".join(md))
  logging.info(
    "Mean-curve boundaries %s; per seed %s",
    list(reference.boundary_steps),
    [list(r.boundary_steps) for r in per_seed],
  )
  return summary


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x
