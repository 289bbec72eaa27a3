"""Refined LLCs over a run's checkpoints (Wang et al. 2024, arXiv 2410.02984).

One call estimates every restriction (all heads, all layers, a group, a path
pattern) × checkpoint × chain in one compiled program, optionally measuring
the loss on other data than the SGLD data (data-refined):

  estimate_refined(config, workdir, restrict="heads", data="", loss_data="")
  run_refined(...)      # + writes <workdir>/<refined_name(...)>/ (below)

Sampler settings are `config.llc` with `config.refined` overriding the chain
count, length and ε, nβ, γ (a head has ~8 % of the weights: it affords other
settings than the whole model). The experiment module of `config.experiment`
supplies the model, the checkpoints and its named datasets
(`dataset_from_spec`, e.g. 'input_gain=2' or 'num_tasks=16' for LR).

Written to `<workdir>/<name>/`: llc.npz (the LLCResult, [R, N] leading),
refined.csv (per checkpoint: each restriction's mean and sem, their sum and
the full-model LLC when `llc/llc.npz` exists), summary.json, and for more
than one restriction trajectories.png (`analysis.heads`).

Sum over disjoint restrictions: the per-chain sum Σ_r λ̂_r (chain c of every
restriction shares its noise and minibatches, so the sum's standard error is
taken over chains, not added in quadrature). It is reported beside the full
LLC, which it need not equal: see docs/reference/refined.md.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, paths
from devinterp_jax.analysis import heads as heads_analysis
from devinterp_jax.analysis import report
from devinterp_jax.experiments import llc_sweep, registry
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling import settings as settings_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import lock
from devinterp_jax.viz import heads as heads_viz


def refined_name(restrict: str = "", data: str = "", loss_data: str = "") -> str:
  """The output directory name: 'llc', 'wrllc_heads', 'drllc_input_gain2', …"""
  clean = lambda s: re.sub(r"[^A-Za-z0-9_.:-]+", "", s.replace("=", "").replace(",", "_")).replace(
    ":", "-"
  )
  parts = []
  if restrict:
    parts.append("wrllc_" + clean(restrict))
  if data:
    parts.append("data_" + clean(data))
  if loss_data:
    parts.append("drllc_" + clean(loss_data))
  return "_".join(parts) or "llc"


@lock.holding
def estimate_refined(
  config: ml_collections.ConfigDict,
  workdir: str,
  restrict: str = "",
  data: str = "",
  loss_data: str = "",
) -> tuple[np.ndarray, list[str] | None, LLCResult, np.ndarray | None]:
  """Refined LLCs of every scheduled checkpoint of `workdir` (resumable).

  Returns (steps [N], restriction names or None, result with leading [R, N]
  or [N], the stacked restriction masks or None).
  """
  experiment = registry.get(config.experiment)
  experiment.validate_config(config)
  llc_sweep.check_run_config(config, workdir)
  model = experiment.make_model(config)
  steps, checkpoints = llc_sweep.scheduled_checkpoints(workdir, model)
  abstract = checkpoints.abstract_params
  names, masks = (None, None)
  restrictions = None
  if restrict:
    names, masks = restrict_lib.from_spec(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), restrict
    )
    restrictions = settings_lib.Restrictions(names, masks)
  settings = settings_lib.SamplerSettings.from_config(config.llc, config.get("refined"))
  section = {**config.llc.to_dict(), **dict(config.get("refined", {}))}
  name = refined_name(restrict, data, loss_data)
  logging.info(
    "Refined LLC %s: %d restrictions × %d checkpoints × %d chains × %d draws",
    name,
    len(names or [None]),
    len(steps),
    settings.num_chains,
    settings.num_draws,
  )
  result = llc_lib.estimate(
    model.loss,
    checkpoints,
    experiment.dataset_from_spec(config, data, workdir=workdir),
    settings,
    llc_sweep.sweep_options(
      section,
      ids=[int(s) for s in steps],
      output_dir=os.path.join(workdir, name, "chunks"),
      loss_key=llc_sweep.loss_key(config, model.loss),
    ),
    sampler=samplers_lib.from_config(section),
    restrictions=restrictions,
    loss_data=(
      experiment.dataset_from_spec(config, loss_data, workdir=workdir) if loss_data else None
    ),
  )
  return steps, names, result, masks


def disjoint(masks) -> bool:
  """Whether no coordinate belongs to two restrictions."""
  return all(float(np.max(np.sum(np.asarray(m), axis=0))) <= 1.0 for m in jax.tree.leaves(masks))


def restriction_sum(result: LLCResult) -> dict[str, np.ndarray]:
  """Σ_r λ̂_r per checkpoint: mean and sem over chains of the per-chain sums.

  Chains that are excluded (diverged) in any restriction are left out.
  """
  valid = ~np.any(result.diverged, axis=0)  # [N, C]
  per_chain = np.sum(result.llc_per_chain, axis=0)  # [N, C]
  masked = np.where(valid, per_chain, np.nan)
  n = valid.sum(-1)
  mean = np.nanmean(masked, axis=-1)
  sem = np.nanstd(masked, axis=-1, ddof=1) / np.sqrt(np.maximum(n, 1))
  return {"mean": mean, "sem": np.where(n > 1, sem, np.nan), "num_chains": n}


def write_refined(
  workdir: str,
  name: str,
  steps: np.ndarray,
  names: list[str] | None,
  result: LLCResult,
  masks=None,
  boundaries=None,
  extra: dict | None = None,
) -> dict:
  """Writes <workdir>/<name>/: llc.npz, refined.csv, summary.json, trajectories.png."""
  out = os.path.join(workdir, name)
  paths.makedirs(out)
  result.save(os.path.join(out, "llc.npz"))
  mean = result.llc_mean.reshape(-1, len(steps))
  sem = result.llc_sem.reshape(-1, len(steps))
  labels = names or [name]
  columns = {}
  for r, label in enumerate(labels):
    columns[f"{label}_mean"], columns[f"{label}_sem"] = mean[r], sem[r]
  summary = {
    "name": name,
    "restrictions": labels,
    "steps": [int(s) for s in steps],
    "num_params": result.settings.get("num_params"),
    "final": {label: float(mean[r, -1]) for r, label in enumerate(labels)},
    "final_sem": {label: float(sem[r, -1]) for r, label in enumerate(labels)},
    "chain_health": result.health_counts(),
    "mala_acceptance_mean": (
      float(np.nanmean(result.mala_acceptance))
      if np.isfinite(result.mala_acceptance).any()
      else None
    ),
  }
  full_path = os.path.join(workdir, "llc", "llc.npz")
  full = LLCResult.load(full_path) if paths.exists(full_path) else None
  if full is not None and full.llc_mean.shape != (len(steps),):
    full = None
  if full is not None:
    columns["full_mean"], columns["full_sem"] = full.llc_mean, full.llc_sem
    summary["full_final"] = float(full.llc_mean[-1])
  if names and len(names) > 1 and masks is not None and disjoint(masks):
    total = restriction_sum(result)
    columns["sum_mean"], columns["sum_sem"] = total["mean"], total["sem"]
    summary["sum_final"] = float(total["mean"][-1])
    summary["sum_final_sem"] = float(total["sem"][-1])
    if full is not None:
      summary["sum_over_full"] = [float(v) for v in total["mean"] / full.llc_mean]
  lines = [",".join(["step", *columns])]
  lines += [
    ",".join([str(int(s)), *(repr(float(v[i])) for v in columns.values())])
    for i, s in enumerate(steps)
  ]
  atomic.write_text(os.path.join(out, "refined.csv"), "\n".join(lines) + "\n")
  if names and len(names) > 1:
    ok = np.all(np.isfinite(mean), axis=0)
    heads_viz.plot_head_trajectories(
      steps,
      mean,
      labels,
      sem_RxN=sem,
      boundaries=boundaries,
      path=os.path.join(out, "trajectories.png"),
      title=f"Refined LLC per restriction ({name})",
    )
    if ok.sum() >= 3 and len(names) >= 3:
      summary["heads"] = heads_analysis.head_summary(
        steps[ok], mean[:, ok], labels, sem_RxN=sem[:, ok]
      )
  summary.update(extra or {})
  atomic.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
  return summary


@lock.holding
def run_refined(
  config: ml_collections.ConfigDict,
  workdir: str,
  restrict: str = "",
  data: str = "",
  loss_data: str = "",
  update_report: bool = False,
) -> dict:
  """Estimates and writes a refined LLC sweep; returns its summary.

  With `update_report`, the analysis report (<workdir>/report, with
  `config.analysis`) is rewritten afterwards, so the head figures appear in it.
  """
  if not (restrict or data or loss_data):
    raise ValueError(
      "a refined LLC needs a restriction, data or loss_data; the plain LLC "
      "sweep is experiment.estimate"
    )
  t0 = time.time()
  steps, names, result, masks = estimate_refined(config, workdir, restrict, data, loss_data)
  name = refined_name(restrict, data, loss_data)
  boundaries = None
  stages_path = os.path.join(workdir, "report", "stages.json")
  if paths.exists(stages_path):
    boundaries = json.loads(paths.read_text(stages_path)).get("boundary_steps")
  summary = write_refined(
    workdir,
    name,
    steps,
    names,
    result,
    masks,
    boundaries,
    extra={"seconds": round(time.time() - t0, 1)},
  )
  logging.info(
    "Refined LLC %s done in %.0fs; final %s", name, summary["seconds"], json.dumps(summary["final"])
  )
  if update_report:
    report.analyze(workdir, registry.setting(config.experiment), config.analysis)
  return summary
