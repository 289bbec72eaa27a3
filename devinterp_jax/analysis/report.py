"""The developmental analysis report of a run, for any setting.

`analyze(workdir, setting)` reads a finished run (checkpoints, `llc/llc.npz`,
`metrics.jsonl`; see `run_data`) and writes `<workdir>/report/`:

  stages.json, stages.csv     stage boundaries of the LLC curve (`stages`), each with its
                              stability under chain and draw-window resampling
                              (`stages.stage_stability`) and the criterion's pass/fail
  stages.png                  loss, LLC ± SEM with stages S1…Sn shaded (neutral labels),
                              slope (Fig. 1 / B.2); unstable boundaries dashed red
  metrics.csv                 one row per checkpoint: step, LLC, every scalar metric
  metrics.npz                 every metric, structured arrays included ([N, …])
  <section figures>           what the sections of `options.sections` write
                              (`analysis.sections`): the setting's own (LR:
                              behaviour.png, structure.png; LM: lm_metrics.png) and
                              the generic hessian.png, overlap.png and, with a wrLLC
                              sweep, heads.png, head_clusters.png, wrllc_dispersion.png
  stage_changes.json          per stage, the metrics that changed most in it
  report.json, report.md      the summary a person reads

"Changed most in a stage" (`stage_changes`, docs/reference/stages.md): a metric's change
Δ = m(end) − m(start) is ranked by score = Δ / max(ℓ_m, σ_m), with ℓ_m its level
(`metric_level`: 90th percentile of |m| over checkpoints) and σ_m its
checkpoint-to-checkpoint noise (`metric_noise`), and reported as 100 · score,
the change in percent of the metric's level. The top `top_metrics` by |score|
are listed per stage. Metrics that are constant over checkpoints (baselines) are
left out.

Stage labels are neutral ("S1", "S2", …): they claim no correspondence with the
paper's LR1–LR5 / LM1–LM5. A stage's description says when a boundary lies
within ±1 checkpoint of a feature of the run's learning-rate schedule
(`schedule_features`, read from the run's config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, config_checks, paths
from devinterp_jax.analysis import sections as sections_lib
from devinterp_jax.analysis import stages
from devinterp_jax.analysis.run_data import Run, Setting, load_run
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import lock
from devinterp_jax.storage import run_log
from devinterp_jax.viz import stages as stages_viz


def available_sections(setting: Setting | None = None) -> dict[str, sections_lib.Section]:
  """The sections a report of `setting` can run: the generic ones and the setting's
  own (a setting may not reuse a generic name)."""
  out = dict(sections_lib.GENERIC)
  if setting is not None:
    for name, section in setting.sections.items():
      if name in out or name in _CORE_OPTIONS:
        raise ValueError(f"setting {setting.name!r} redefines the analysis section {name!r}")
      out[name] = section
  return out


# The report's own options (the stage fit); every other top-level field is a section's.
_CORE_OPTIONS = ("seed", "checkpoint_chunk", "top_metrics", "stages", "sections")


def default_options(setting: Setting | None = None) -> ml_collections.ConfigDict:
  """Analysis options of `setting` (`configs/*.py` embed these as `config.analysis`):
  the stage fit's, the section list, and every available section's defaults."""
  options = dict(
    seed=0,  # evaluation data and Hessian probes
    checkpoint_chunk=8,  # checkpoints per compiled metric call
    top_metrics=6,  # metrics listed per stage in report.md
    # noise: per-checkpoint GP noise from the LLC's standard error over chains
    # ("sem"), its std over chains ("std", smoother), or fitted ("fit").
    # label_prefix: stage labels f"{prefix}{i}"; "" = "S" (neutral: S1, S2, …).
    # stability: resample chains (jointly over checkpoints; exact bootstrap up to
    # max_exact multisets, else num_random draws with `seed`) × draw windows,
    # refit with these same options; a boundary is stable when a boundary lies
    # within ±max_distance checkpoints of it in at least `target` of the resamples.
    stages=dict(
      tolerance=0.05,
      relative_tolerance=True,
      n_restarts=10,
      min_stage_change=0.05,
      noise="sem",
      label_prefix="",
      stability=dict(
        enabled=True, target=0.8, max_distance=1, max_exact=500, num_random=200, seed=0
      ),
    ),
    # The report's sections, in order (`available_sections`).
    sections=(setting.default_sections if setting is not None else tuple(sections_lib.GENERIC)),
  )
  for name, section in available_sections(setting).items():
    options[name] = dict(section.defaults)
  return ml_collections.ConfigDict(options)


def validate_options(
  options: ml_collections.ConfigDict, prefix: str = "analysis", setting: Setting | None = None
) -> list[sections_lib.Section]:
  """Refuses invalid analysis options, naming the key (`config_checks.ConfigError`);
  returns the sections `options.sections` names."""
  check = config_checks.check_fields
  check(options, prefix, {"seed": "int>=0", "checkpoint_chunk": "int>=1", "top_metrics": "int>=0"})
  check(
    options.stages,
    f"{prefix}.stages",
    {
      "tolerance": "num>=0",
      "n_restarts": "int>=0",
      "min_stage_change": "num>=0",
      "noise": ("sem", "std", "fit"),
      "relative_tolerance": (True, False),
    },
  )
  if "stability" in options.stages:
    check(
      options.stages.stability,
      f"{prefix}.stages.stability",
      {
        "enabled": (True, False),
        "target": "unit",
        "max_distance": "int>=0",
        "max_exact": "int>=1",
        "num_random": "int>=1",
        "seed": "int>=0",
      },
    )
  available = available_sections(setting)
  names = options.get("sections")
  if names is None:
    names = setting.default_sections if setting is not None else ()
  built = sections_lib.build(names, available, prefix)
  for name, section in available.items():
    if name in options and section.validate is not None:
      section.validate(options[name], f"{prefix}.{name}")
  for section in built:
    if section.name not in options and section.defaults:
      config_checks.fail(
        f"{prefix}.{section.name}", None, f"the options of the listed section {section.name!r}"
      )
  return built


def stage_boundaries(run: Run, options: ml_collections.ConfigDict) -> stages.StageBoundaries:
  """Stage boundaries of the run's LLC curve (App. B.1), fitted to the checkpoints
  with at least 2 valid chains (`fit_stages`), with the run's learning-rate
  schedule features attached (`schedule_features`)."""
  llc = run.require_llc()
  fit = fit_stages(
    run.steps,
    llc.llc_mean,
    llc.llc_std,
    llc.llc_sem,
    options,
    num_valid_chains=llc.num_valid_chains,
  )
  return dataclasses.replace(fit, schedule_features=schedule_features(run.config))


MIN_CHAINS_FOR_STAGES = 2  # an LLC from fewer chains has no standard error
ERROR_BARS = {"sem": "SEM", "std": "std", "fit": None}  # what llc_std holds, per noise model


def schedule_features(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], ...]:
  """Features of the run's learning-rate schedule, as data: ({name, step, note}, …).

  Read from `config.train`: a one-cycle schedule (fields num_steps, max_lr and
  pct_start, as `training/schedules.one_cycle_lr` takes them) has one, the step of
  the maximum learning rate, after which linear annealing starts ("learning-rate
  peak"). The update with optax count c produces checkpoint step c + 1; the
  learning rate rises linearly over counts [0, pct_start·T − 1] and falls after,
  so the peak is at count ⌊pct_start·T − 1⌋ or the count after it (whichever has
  the larger rate). Any other schedule (e.g. a constant `lr`) has none. This
  mirrors one_cycle_lr without importing training code (tests/test_report.py
  checks it against the real schedule).
  """
  train = config.get("train") if hasattr(config, "get") else None
  if train is None or not all(k in train for k in ("num_steps", "max_lr", "pct_start")):
    return ()
  total, peak = int(train["num_steps"]), float(train["max_lr"])
  if total < 2:
    return ()
  initial = peak / float(train.get("div_factor", 25.0))
  final = initial / float(train.get("final_div_factor", 1e4))
  end_1, end_2 = float(train["pct_start"]) * total - 1.0, float(total - 1)
  if initial == peak == final:  # div_factor = final_div_factor = 1: a constant rate
    return ()

  def lr(count: int) -> float:
    if count <= end_1:
      return peak if end_1 <= 0 else (1 - count / end_1) * initial + count / end_1 * peak
    pct = (count - end_1) / (end_2 - end_1)
    return (1 - pct) * peak + pct * final

  c0 = max(int(math.floor(end_1)), 0)
  candidates = [c for c in (c0, c0 + 1) if c <= total - 1]
  count = max(candidates, key=lambda c: (lr(c), -c))
  return (
    {
      "name": "learning-rate peak",
      "step": count + 1,
      "note": "the step of the maximum learning rate; linear annealing starts after it",
    },
  )


class StageFitError(ValueError):
  """Too few checkpoints with a usable LLC estimate to fit stages; `excluded_steps`
  names the checkpoints left out."""

  def __init__(self, message: str, excluded_steps: list[int]):
    super().__init__(message)
    self.excluded_steps = excluded_steps


def fit_stages(
  steps,
  llc_mean,
  llc_std,
  llc_sem,
  options: ml_collections.ConfigDict,
  default_prefix: str = "S",
  num_valid_chains=None,
) -> stages.StageBoundaries:
  """`stages.find_stage_boundaries` with the options' noise model.

  Checkpoints with fewer than 2 valid chains (`num_valid_chains`), or without
  a finite LLC and standard deviation, have no error bar: they are left out of
  the fit with a warning naming them, and listed in the result's
  `settings["excluded_steps"]`. Raises `StageFitError` when fewer than 4
  checkpoints remain.
  """
  o = options.stages
  steps = np.asarray(steps)
  noise = {"sem": llc_sem, "std": llc_std, "fit": None}
  if o.noise not in noise:
    raise ValueError(f"analysis.stages.noise must be one of {sorted(noise)}, got {o.noise!r}")
  usable = np.isfinite(np.asarray(llc_mean, float)) & np.isfinite(np.asarray(llc_std, float))
  if num_valid_chains is not None:
    usable &= np.asarray(num_valid_chains) >= MIN_CHAINS_FOR_STAGES
  excluded = [int(s) for s in steps[~usable]]
  if excluded:
    logging.warning(
      "Stage fit: leaving out checkpoints at steps %s (fewer than %d valid "
      "chains, so no standard error)",
      excluded,
      MIN_CHAINS_FOR_STAGES,
    )
  if usable.sum() < 4:
    raise StageFitError(
      f"cannot fit stages: only {int(usable.sum())} of {len(steps)} checkpoints have an LLC "
      f"from at least {MIN_CHAINS_FOR_STAGES} valid chains (4 are needed); left out: steps "
      f"{excluded}. Use config.llc.num_chains >= 2, and see llc/summary.json for diverged "
      f"chains.",
      excluded,
    )
  pick = lambda a: None if a is None else np.asarray(a, float)[usable]
  fit = stages.find_stage_boundaries(
    steps[usable],
    np.asarray(llc_mean, float)[usable],
    pick(noise[o.noise]),
    tolerance=o.tolerance,
    relative_tolerance=o.relative_tolerance,
    n_restarts=o.n_restarts,
    min_stage_change=o.min_stage_change,
    seed=options.seed,
    label_prefix=o.get("label_prefix", "") or default_prefix,
  )
  return dataclasses.replace(
    fit,
    settings={
      **fit.settings,
      "excluded_steps": excluded,
      "noise_source": o.noise,
      "error_bar": ERROR_BARS[o.noise],
    },
  )


def chain_llcs(result: LLCResult, all_steps, steps) -> tuple[np.ndarray, np.ndarray]:
  """Per-chain LLCs of `result` (whose leading axis is `all_steps`) at `steps`, from
  every draw window of `stages.DRAW_WINDOWS` ([W, N, C]; the kept window is the
  stored `llc_per_chain`, the others are recomputed from `loss_trace`), and the
  chains that count there (not diverged) [N, C]."""
  all_steps, steps = np.asarray(all_steps), np.asarray(steps)
  idx = np.searchsorted(all_steps, steps)
  if np.any(idx >= len(all_steps)) or np.any(
    all_steps[np.minimum(idx, len(all_steps) - 1)] != steps
  ):
    raise ValueError("the stage fit's steps are not all checkpoints of the LLC result")
  nbeta = np.asarray(result.settings["nbeta"], float)
  nbeta = nbeta[idx] if nbeta.ndim and nbeta.size == len(all_steps) else nbeta.reshape(-1)[0]
  burnin = None if result.burnin is None else np.asarray(result.burnin)[idx]
  llc = stages.window_llcs(result.loss_trace[idx], result.init_loss[idx], nbeta, burnin)
  llc[0] = result.llc_per_chain[idx]
  return llc, ~np.asarray(result.diverged)[idx]


def stage_stability(
  run_steps,
  result: LLCResult,
  boundaries: stages.StageBoundaries,
  options: ml_collections.ConfigDict,
  seed_results: Mapping[str, tuple[Any, LLCResult]] | None = None,
) -> stages.StageStability:
  """`stages.stage_stability` of a fit of `result`'s LLC curve (checkpoints
  `run_steps`) with the options' noise model and `options.stages.stability`.

  `seed_results`: label → (steps, LLCResult) of the same checkpoints re-estimated
  with other SGLD seeds (benchmarks/stage_stability.py); they are fitted with the
  same options and reported as `seed_stability`, outside the criterion.
  """
  o = options.stages.get("stability") or default_options().stages.stability
  llc, valid = chain_llcs(result, run_steps, boundaries.steps)
  seeds = None
  if seed_results:
    seeds = {
      label: (np.asarray(s), r.llc_per_chain, ~np.asarray(r.diverged))
      for label, (s, r) in seed_results.items()
    }
  return stages.stage_stability(
    boundaries,
    llc,
    valid=valid,
    noise=options.stages.noise,
    seed_curves=seeds,
    target=o.target,
    max_distance=o.max_distance,
    max_exact=o.max_exact,
    num_random=o.num_random,
    random_seed=o.seed,
  )


def scalar_columns(metrics: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The numeric [N] entries of a metrics dict (the CSV columns)."""
  return {
    k: np.asarray(v, float)
    for k, v in metrics.items()
    if np.ndim(v) == 1 and np.issubdtype(np.asarray(v).dtype, np.number)
  }


NOISE_MAD_SCALE = 1.4826  # MAD → σ of a normal distribution
LEVEL_QUANTILE = 90  # the level of a metric: this percentile of |m| over checkpoints


def metric_noise(values: np.ndarray) -> float:
  """A metric's checkpoint-to-checkpoint noise σ: a robust residual around a local
  linear smooth, 1.4826 · median_k |m_{k−1} − 2 m_k + m_{k+1}| / √6 over its finite
  values in checkpoint order (a second difference of white noise of std σ has std
  √6 σ; a linear trend has none). 0 with fewer than 3 finite values."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v)]
  if v.size < 3:
    return 0.0
  return float(NOISE_MAD_SCALE * np.median(np.abs(np.diff(v, 2))) / math.sqrt(6.0))


def metric_level(values: np.ndarray) -> float:
  """A metric's level: the 90th percentile of |m| over its finite checkpoints (its
  typical large magnitude; one spike does not set it)."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v)]
  return float(np.percentile(np.abs(v), LEVEL_QUANTILE)) if v.size else 0.0


def stage_changes(
  steps: np.ndarray,
  columns: Mapping[str, np.ndarray],
  boundaries: stages.StageBoundaries,
  top: int = 6,
) -> list[dict[str, Any]]:
  """Per stage, the metrics whose change in it is largest relative to their level
  and noise (docs/reference/stages.md).

  For a metric m and a stage from checkpoint i0 to i1: Δ = m[i1] − m[i0];
  `level` ℓ = `metric_level(m)` (90th percentile of |m| over checkpoints);
  `noise` σ = `metric_noise(m)`; `score` = Δ / max(ℓ, σ) ranks the metrics (by
  |score|) and `relative_change_percent` = 100 · score is the change in percent
  of the metric's level (a 4 % fall of a layer-norm scale near 1 is −4 %).
  `percent_of_start` = 100 Δ / |m[i0]| (None when |m[i0]| ≤ σ: a start within
  noise of zero has no meaningful percentage). `noise_units` = |Δ| / (√2 σ) (the
  std of a difference of two noisy values; None when σ = 0) and `within_noise`
  (|Δ| ≤ 2 √2 σ) say whether the change stands out of the noise. Metrics
  constant over checkpoints, or with fewer than 2 finite values, are left out.
  """
  steps = np.asarray(steps)
  prepared = {}
  for name, values in columns.items():
    values = np.asarray(values, float)
    finite = values[np.isfinite(values)]
    if finite.size < 2:
      continue
    span = float(finite.max() - finite.min())
    if span <= 1e-12 * max(1.0, float(np.abs(finite).max())):
      continue  # constant over training (e.g. baselines)
    level, noise = metric_level(values), metric_noise(values)
    scale = max(level, noise)
    if scale > 0:
      prepared[name] = (values, level, noise, scale)
  out = []
  for stage in boundaries.stages:
    i0 = int(np.searchsorted(steps, stage["start_step"]))
    i1 = int(np.searchsorted(steps, stage["end_step"]))
    changes = []
    for name, (values, level, noise, scale) in prepared.items():
      start, end = float(values[i0]), float(values[i1])
      delta = end - start
      if not np.isfinite(delta):
        continue
      changes.append(
        {
          "metric": name,
          "start": start,
          "end": end,
          "change": delta,
          "level": level,
          "noise": noise,
          "score": delta / scale,
          "relative_change_percent": 100.0 * delta / scale,
          "percent_of_start": (
            100.0 * delta / abs(start) if abs(start) > noise and start != 0 else None
          ),
          "noise_units": abs(delta) / (math.sqrt(2.0) * noise) if noise > 0 else None,
          "within_noise": bool(abs(delta) <= 2.0 * math.sqrt(2.0) * noise),
        }
      )
    changes.sort(key=lambda c: -abs(c["score"]))
    out.append({**stage, "top_changes": changes[:top]})
  return out


def _write_csv(path: str, steps: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
  names = list(columns)
  lines = [",".join(["step", *names])]
  for i, s in enumerate(steps):
    lines.append(",".join([str(int(s)), *(repr(float(columns[n][i])) for n in names)]))
  atomic.write_text(path, "\n".join(lines) + "\n")


def options_for_run(
  workdir: str, overrides: Mapping[str, Any] | None = None, setting: Setting | None = None
) -> ml_collections.ConfigDict:
  """The analysis options a run was configured with (its config.json's `analysis`,
  filled in from `default_options(setting)`), with exactly `overrides` applied on top.

  `overrides` is flat, {"hessian.enabled": True, "lm.batch_size": 8}: the fields the
  user set (`config_flags.get_override_values` in launch/analyze.py). Each is applied
  whatever its value, so an override equal to a default still replaces the run's
  own setting. A field the run's options lack is refused, naming it.
  """
  defaults = run_log.flatten(default_options(setting).to_dict())
  saved = run_log.read_config(workdir).get("analysis")
  flat = {**defaults, **(run_log.flatten(saved.to_dict()) if saved is not None else {})}
  for key, value in (overrides or {}).items():
    if key not in flat:
      sections = sorted({k.split(".")[0] for k in flat})
      raise config_checks.ConfigError(
        f"--config.{key}={value!r} does not apply to the run at {workdir!r}: its analysis "
        f"options have no field {key!r} (their sections: {', '.join(sections)})."
      )
    flat[key] = value
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = nested
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
  return ml_collections.ConfigDict(nested)


def analyze(
  workdir: str,
  setting: Setting,
  options: ml_collections.ConfigDict | None = None,
  out_dir: str | None = None,
  option_prefix: str = "analysis",
) -> dict[str, Any]:
  """Writes the report directory of a finished run of `setting`; returns report.json's
  content.

  Default options: the run's own (`options_for_run`). The directory is built
  under a temporary name and swapped in whole (`atomic.replace_dir`), so a crash
  never leaves a mix of an old and a new report. Checkpoints with fewer than 2
  valid chains are left out of the stage fit and named in the report; with
  fewer than 4 usable checkpoints the report is written without stages.
  `option_prefix` names the options in error messages.
  """
  options = options_for_run(workdir, setting=setting) if options is None else options
  built = validate_options(options, option_prefix, setting)
  target = out_dir or os.path.join(workdir, "report")
  if (
    paths.isdir(target)
    and paths.listdir(target)
    and not paths.exists(paths.join(target, "report.json"))
  ):
    raise ValueError(
      f"refusing to replace {target!r}: it is not empty and holds no "
      f"report.json, so it is not a report directory. Pass an empty or new "
      f"directory (the report replaces its directory whole)."
    )
  with lock.hold(workdir):
    run = load_run(workdir, setting)
    with atomic.replace_dir(target) as out:
      summary = _write_report(run, options, built, out)
  logging.info(
    "Report written to %s (stages %s)",
    target,
    ", ".join(f"{s['label']} {s['start_step']}–{s['end_step']}" for s in summary["stages"])
    or "not fitted",
  )
  return summary


# report.json's own keys; a section's `Output.report` may not reuse them.
_REPORT_KEYS = (
  "workdir",
  "setting",
  "stages",
  "stages_fitted",
  "excluded_checkpoints",
  "boundary_steps",
  "boundary_kinds",
  "boundaries",
  "stage_stability",
  "stability_passes",
  "schedule_features",
  "milestones",
  "head_labels_last_checkpoint",
  "sections",
  "figures",
  "timings",
  "options",
)


def _fit(
  run: Run, options: ml_collections.ConfigDict, out: str, timings: dict[str, float]
) -> tuple[stages.StageBoundaries | None, list[int], list[tuple[str, str]]]:
  """The stage fit with its stability, stages.json and stages.png."""
  llc = run.require_llc()
  t0 = time.time()
  figures = []
  try:
    boundaries = stage_boundaries(run, options)
    excluded = boundaries.settings["excluded_steps"]
  except StageFitError as e:
    logging.warning("%s; the report is written without stages", e)
    atomic.write_text(
      os.path.join(out, "stages.json"),
      json.dumps(
        {
          "fitted": False,
          "reason": str(e),
          "boundary_steps": [],
          "excluded_steps": e.excluded_steps,
        },
        indent=1,
      )
      + "\n",
    )
    timings["stages"] = round(time.time() - t0, 1)
    return None, e.excluded_steps, figures
  o_st = options.stages.get("stability")
  if o_st is None or o_st.get("enabled", True):
    t1 = time.time()
    stability = stage_stability(run.steps, llc, boundaries, options)
    boundaries = dataclasses.replace(boundaries, stability=stability)
    timings["stage_stability"] = round(time.time() - t1, 1)
    logging.info("Stage stability: %s", stability.summary())
    for reason in stability.reasons:
      logging.warning("Unstable stage boundary: %s", reason)
  boundaries.save(out)
  title = f"LLC stages ({run.setting.description})" if run.setting.description else "LLC stages"
  figures.append(
    (
      "stages",
      stages_viz.plot_stages(
        boundaries,
        os.path.join(out, "stages.png"),
        loss_steps=run.steps,
        loss=run.logged("eval_loss"),
        loss_label=run.setting.loss_label,
        title=title,
      ),
    )
  )
  logging.info("Stage boundaries at steps %s", list(boundaries.boundary_steps))
  timings["stages"] = round(time.time() - t0, 1)
  return boundaries, excluded, figures


def _write_report(
  run: Run, options: ml_collections.ConfigDict, built: list[sections_lib.Section], out: str
) -> dict[str, Any]:
  llc = run.require_llc()
  timings: dict[str, float] = {}
  boundaries, excluded, figures = _fit(run, options, out, timings)
  ctx = sections_lib.Context(run=run, options=options, out=out, boundaries=boundaries)
  ctx.columns.update(llc_mean=llc.llc_mean, llc_std=llc.llc_std, eval_loss=run.logged("eval_loss"))
  marks: dict[str, Any] = {}
  mark_lines: list[str] = []
  labels_final: dict[str, str] = {}
  markdown: list[str] = []
  extra: dict[str, Any] = {}
  ran = []
  for section in built:
    if not section.enabled(options):
      logging.info("Section %r is disabled (analysis.%s.enabled=False)", section.name, section.name)
      continue
    t0 = time.time()
    result = section.compute(ctx)
    timings[section.name] = round(time.time() - t0, 1)
    ran.append(section.name)
    ctx.metrics.update(result.metrics)
    ctx.columns.update(scalar_columns(result.metrics))
    ctx.columns.update(result.columns)
    figures += result.figures
    markdown += result.markdown
    marks.update(result.milestones)
    mark_lines += result.milestone_lines
    labels_final.update(result.head_labels)
    for key, value in result.report.items():
      if key in _REPORT_KEYS or key in extra:
        raise ValueError(f"section {section.name!r} reports {key!r}, which report.json already has")
      extra[key] = value
  atomic.save_npz(
    os.path.join(out, "metrics.npz"),
    steps=run.steps,
    **{
      k.replace("/", "__"): np.asarray(v)
      for k, v in ctx.metrics.items()
      if np.asarray(v).dtype != object
    },
  )
  _write_csv(os.path.join(out, "metrics.csv"), run.steps, ctx.columns)
  changes = (
    []
    if boundaries is None
    else stage_changes(
      run.steps,
      {k: v for k, v in ctx.columns.items() if not k.endswith(("_std", "_se"))},
      boundaries,
      options.top_metrics,
    )
  )
  atomic.write_text(os.path.join(out, "stage_changes.json"), json.dumps(changes, indent=1))
  summary = {
    "workdir": paths.absolute(run.workdir),
    "setting": run.setting.name,
    "stages": [] if boundaries is None else boundaries.stages,
    "stages_fitted": boundaries is not None,
    "excluded_checkpoints": excluded,
    "boundary_steps": ctx.edges,
    "boundary_kinds": [] if boundaries is None else list(boundaries.boundary_kinds),
    "boundaries": [] if boundaries is None else boundaries.boundaries,
    "stage_stability": (
      None if boundaries is None or boundaries.stability is None else boundaries.stability.to_dict()
    ),
    "stability_passes": (
      None if boundaries is None or boundaries.stability is None else boundaries.stability.passes
    ),
    "schedule_features": [] if boundaries is None else list(boundaries.schedule_features),
    "milestones": marks,
    "head_labels_last_checkpoint": labels_final,
    "sections": ran,
    **extra,
    "figures": [os.path.basename(p) for _, p in figures],
    "timings": timings,
    "options": options.to_dict(),
  }
  atomic.write_text(os.path.join(out, "report.json"), json.dumps(summary, indent=1))
  atomic.write_text(
    os.path.join(out, "report.md"),
    _markdown(
      run, boundaries, changes, mark_lines, labels_final, markdown, figures, timings, excluded
    ),
  )
  return summary


def _health_text(counts: Mapping[str, Any]) -> str:
  return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())


def _markdown(
  run: Run,
  boundaries,
  changes,
  mark_lines,
  labels_final,
  section_lines,
  figures,
  timings,
  excluded: list[int] | None = None,
) -> str:
  llc = run.require_llc()
  title = os.path.basename(os.path.normpath(run.workdir)) or run.workdir
  what = f" ({run.setting.description})" if run.setting.description else ""
  lines = [
    f"# Developmental analysis: `{title}`{what}",
    "",
    f"Run directory: `{paths.absolute(run.workdir)}`",
    "",
    f"{len(run.steps)} checkpoints (steps {int(run.steps[0])}–{int(run.steps[-1])}); "
    f"LLC from {llc.llc_mean.shape[0]} × {llc.llc_per_chain.shape[-1]} chains "
    f"(ε = {llc.settings.get('step_size')}, nβ = {llc.settings.get('nbeta')}, "
    f"γ = {llc.settings.get('localization')}); chain health: "
    f"{_health_text(llc.health_counts())}.",
    "",
    "## Stages",
    "",
  ]
  if excluded:
    lines += [
      f"**Left out of the stage fit:** the checkpoints at steps {excluded} have fewer "
      f"than {MIN_CHAINS_FOR_STAGES} valid chains, so their LLC has no standard error "
      f"(see the chain health in `llc/summary.json`).",
      "",
    ]
  if boundaries is None:
    lines += [
      "**Stages were not fitted:** fewer than 4 checkpoints have an LLC from at least "
      f"{MIN_CHAINS_FOR_STAGES} valid chains.",
      "",
    ]
  else:
    st = boundaries.settings
    tolerance_note = (
      f" = {st['tolerance']:.0%} of max |slope|" if st.get("relative_tolerance") else ""
    )
    lines += [
      "Boundaries are plateaus of the LLC over ln t (GP fit, App. B.1): zero crossings "
      "of the slope or near-plateaus (local minima of |slope| below the tolerance "
      f"{boundaries.tolerance_used:.3g}{tolerance_note}). Labels S1, S2, … are "
      "neutral: they claim no correspondence with the paper's LR1–LR5 / LM1–LM5.",
      "",
    ]
    stab = boundaries.stability
    if stab is not None:
      lines += [
        f"**Stability criterion {'passes' if stab.passes else 'FAILS'}** "
        f"({stab.summary()}). A boundary's stability is the weighted fraction of "
        f"resamples (chains bootstrapped jointly across checkpoints × draw windows "
        f"{', '.join(w['name'] for w in stab.windows)}; every refit with the same "
        f"options) with a boundary within ±{stab.max_distance} checkpoint of it; "
        f"target {stab.target:.2f}. Unstable boundaries are kept and marked.",
        "",
      ]
      lines += [f"* {r}" for r in stab.reasons] + ([""] if stab.reasons else [])
    lines += [
      "| stage | start step | end step | ends at | stability of its end | LLC at start → end |",
      "|---|---|---|---|---|---|",
    ]
    for s in boundaries.stages:
      i0 = int(np.searchsorted(run.steps, s["start_step"]))
      i1 = int(np.searchsorted(run.steps, s["end_step"]))
      st = s["end_stability"]
      bad = st is not None and stab is not None and st < stab.target - 1e-12
      lines.append(
        f"| {s['label']} | {s['start_step']} | {s['end_step']} | "
        f"{s['end_kind'].replace('_', ' ')} | "
        f"{'–' if st is None else (f'**{st:.2f} (unstable)**' if bad else f'{st:.2f}')}"
        f" | {llc.llc_mean[i0]:.2f} → {llc.llc_mean[i1]:.2f} |"
      )
    lines.append("")
    lines += [f"* {s['description']}" for s in boundaries.stages]
    if boundaries.schedule_features:
      lines += [
        "",
        "Learning-rate schedule: "
        + "; ".join(f"{f['name']} at step {int(f['step'])}" for f in boundaries.schedule_features)
        + ".",
      ]
  if mark_lines:
    lines += ["", "## Milestones", ""] + list(mark_lines)
  lines += [
    "",
    "## What changed in each stage",
    "",
    "Change Δ = value at the stage's end − value at its start, in % of the metric's "
    "level (90th percentile of |value| over checkpoints) and ranked by it; when the "
    "metric's checkpoint-to-checkpoint noise (robust second differences) exceeds its "
    'level, in % of the noise (docs/reference/stages.md). "within noise": |Δ| ≤ 2√2 × '
    "noise.",
    "",
  ]

  def change_text(t: dict[str, Any]) -> str:
    return (
      f"`{t['metric']}` {t['start']:.3g} → {t['end']:.3g} "
      f"({t['relative_change_percent']:+.1f} %"
      f"{', within noise' if t['within_noise'] else ''})"
    )

  for c in changes:
    lines.append(
      f"**{c['label']}** (steps {c['start_step']}–{c['end_step']}): "
      + "; ".join(change_text(t) for t in c["top_changes"])
    )
    lines.append("")
  if labels_final:
    lines += ["## Heads at the last checkpoint", "", "| head | label |", "|---|---|"]
    lines += [f"| {k.split('/', 1)[-1]} | {v} |" for k, v in labels_final.items()]
    lines.append("")
  lines += list(section_lines)
  lines += ["## Figures", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in figures]
  lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".", ""]
  return "\n".join(lines)
