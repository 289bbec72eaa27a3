"""The developmental analysis report of an in-context linear regression run.

`analyze(workdir)` reads a finished run (checkpoints, `llc/llc.npz`,
`metrics.jsonl`; see `run_data`) and writes `<workdir>/report/`:

  stages.json, stages.csv     stage boundaries of the LLC curve (`stages`), each with its
                              stability under chain and draw-window resampling
                              (`stages.stage_stability`) and the criterion's pass/fail
  stages.png                  loss, LLC ± SEM with stages S1…Sn shaded (neutral labels),
                              slope (Fig. 1 / B.2); unstable boundaries dashed red
  metrics.csv                 one row per checkpoint: step, LLC, every scalar metric
  metrics.npz                 every metric, structured arrays included ([C, …])
  behaviour.png, structure.png, hessian.png
  overlap.png                 functional overlap of heads (mean ablation) over training
  heads.png, head_clusters.png, heads_summary.json
                              with a wrLLC sweep (`<workdir>/wrllc_heads/`): per-head
                              wrLLC trajectories with stages, their clustering
                              (k-means and hierarchical), dispersion across heads
                              beside the overlap
  stage_changes.json          per stage, the metrics that changed most in it
  report.json, report.md      the summary a person reads

"Changed most in a stage" (`stage_changes`, docs/stages.md): a metric's change
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

import jax
import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, config_checks, paths
from devinterp_jax.analysis import heads as heads_lib
from devinterp_jax.analysis import hessian, lr_behaviour, lr_structure, overlap, stages
from devinterp_jax.analysis import lm_metrics
from devinterp_jax.analysis.run_data import Run, load_run
from devinterp_jax.data import synthetic_text
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import lock
from devinterp_jax.storage import run_log
from devinterp_jax.data.regression import sample_batch
from devinterp_jax.viz import heads as heads_viz
from devinterp_jax.viz import hessian as hessian_viz
from devinterp_jax.viz import lm as lm_viz
from devinterp_jax.viz import lr as lr_viz
from devinterp_jax.viz import overlap as overlap_viz
from devinterp_jax.viz import stages as stages_viz

# Key streams for evaluation data (independent of training and SGLD streams).
_BEHAVIOUR, _STRUCTURE, _HESSIAN, _OVERLAP = range(4)


def default_options() -> ml_collections.ConfigDict:
  """Analysis options; `configs/*.py` embed these as `config.analysis`."""
  return ml_collections.ConfigDict(dict(
      seed=0,                       # evaluation data and Hessian probes
      checkpoint_chunk=8,           # checkpoints per compiled metric call
      top_metrics=6,                # metrics listed per stage in report.md
      # noise: per-checkpoint GP noise from the LLC's standard error over chains
      # ("sem"), its std over chains ("std", smoother), or fitted ("fit").
      # label_prefix: stage labels f"{prefix}{i}"; "" = "S" (neutral: S1, S2, …).
      # stability: resample chains (jointly over checkpoints; exact bootstrap up to
      # max_exact multisets, else num_random draws with `seed`) × draw windows,
      # refit with these same options; a boundary is stable when a boundary lies
      # within ±max_distance checkpoints of it in at least `target` of the resamples.
      stages=dict(tolerance=0.05, relative_tolerance=True, n_restarts=10,
                  min_stage_change=0.05, noise="sem", label_prefix="",
                  stability=dict(enabled=True, target=0.8, max_distance=1, max_exact=500,
                                 num_random=200, seed=0)),
      behaviour=dict(batch_size=2048, gains=(0.5, 1.0, 2.0, 4.0, 8.0)),
      structure=dict(batch_size=256, collapse_threshold=0.1),
      hessian=dict(enabled=True, batch_size=512, num_hutchinson=32,
                   num_lanczos_iters=32, top_k=3),
      # mask_batch: ablations evaluated at once (None: all 1 + H + H(H−1)/2 + 1 in one
      # vmap; a number bounds memory: logits [chunk, mask_batch, B, T, V] for the LM).
      overlap=dict(enabled=True, batch_size=256, mask_batch=None),
      # wrLLC per head, read from <workdir>/<refined> when that sweep exists;
      # num_clusters 0 = chosen by silhouette over k_range.
      heads=dict(refined="wrllc_heads", num_clusters=0, k_range=(2, 4),
                 normalize="zscore", linkage="ward"),
  ))


def validate_options(options: ml_collections.ConfigDict, prefix: str = "analysis") -> None:
  """Refuses invalid analysis options, naming the key (`config_checks.ConfigError`)."""
  check = config_checks.check_fields
  check(options, prefix, {"seed": "int>=0", "checkpoint_chunk": "int>=1", "top_metrics": "int>=0"})
  check(options.stages, f"{prefix}.stages", {
      "tolerance": "num>=0", "n_restarts": "int>=0", "min_stage_change": "num>=0",
      "noise": ("sem", "std", "fit"), "relative_tolerance": (True, False)})
  if "stability" in options.stages:
    check(options.stages.stability, f"{prefix}.stages.stability", {
        "enabled": (True, False), "target": "unit", "max_distance": "int>=0",
        "max_exact": "int>=1", "num_random": "int>=1", "seed": "int>=0"})
  check(options.behaviour, f"{prefix}.behaviour", {"batch_size": "int>=1", "gains": "nums>0"})
  check(options.structure, f"{prefix}.structure",
        {"batch_size": "int>=1", "collapse_threshold": "num>=0"})
  check(options.hessian, f"{prefix}.hessian", {
      "enabled": (True, False), "batch_size": "int>=1", "num_hutchinson": "int>=1",
      "num_lanczos_iters": "int>=1", "top_k": "int>=1"})
  if options.hessian.top_k > options.hessian.num_lanczos_iters:
    config_checks.fail(f"{prefix}.hessian.top_k", options.hessian.top_k,
                       f"at most num_lanczos_iters = {options.hessian.num_lanczos_iters}")
  check(options.overlap, f"{prefix}.overlap", {"enabled": (True, False), "batch_size": "int>=1"})
  if options.overlap.get("mask_batch") is not None:
    check(options.overlap, f"{prefix}.overlap", {"mask_batch": "int>=1"})
  check(options.heads, f"{prefix}.heads", {
      "num_clusters": "int>=0", "normalize": heads_lib.NORMALIZATIONS,
      "linkage": heads_lib.LINKAGES})
  k_range = tuple(options.heads.k_range)
  if len(k_range) != 2 or not all(isinstance(k, int) for k in k_range) or not (
      2 <= k_range[0] <= k_range[1]):
    config_checks.fail(f"{prefix}.heads.k_range", k_range, "two integers 2 <= low <= high")
  if "lm" in options:
    check(options.lm, f"{prefix}.lm", {
        "batch_size": "int>=1", "num_common_ngrams": "int>=0", "prev_token_batch": "int>=1",
        "prefix_batch": "int>=1", "icl_positions": "nums>=0"})


def _key(options, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(options.seed), stream)


def stage_boundaries(run: Run, options: ml_collections.ConfigDict) -> stages.StageBoundaries:
  """Stage boundaries of the run's LLC curve (App. B.1), fitted to the checkpoints
  with at least 2 valid chains (`fit_stages`), with the run's learning-rate
  schedule features attached (`schedule_features`)."""
  fit = fit_stages(run.steps, run.llc.llc_mean, run.llc.llc_std, run.llc.llc_sem, options,
                   num_valid_chains=run.llc.num_valid_chains)
  return dataclasses.replace(fit, schedule_features=schedule_features(run.config))


MIN_CHAINS_FOR_STAGES = 2   # an LLC from fewer chains has no standard error
ERROR_BARS = {"sem": "SEM", "std": "std", "fit": None}   # what llc_std holds, per noise model


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
  if initial == peak == final:   # div_factor = final_div_factor = 1: a constant rate
    return ()

  def lr(count: int) -> float:
    if count <= end_1:
      return peak if end_1 <= 0 else (1 - count / end_1) * initial + count / end_1 * peak
    pct = (count - end_1) / (end_2 - end_1)
    return (1 - pct) * peak + pct * final

  c0 = max(int(math.floor(end_1)), 0)
  candidates = [c for c in (c0, c0 + 1) if c <= total - 1]
  count = max(candidates, key=lambda c: (lr(c), -c))
  return ({"name": "learning-rate peak", "step": count + 1,
           "note": "the step of the maximum learning rate; linear annealing starts after it"},)


class StageFitError(ValueError):
  """Too few checkpoints with a usable LLC estimate to fit stages; `excluded_steps`
  names the checkpoints left out."""

  def __init__(self, message: str, excluded_steps: list[int]):
    super().__init__(message)
    self.excluded_steps = excluded_steps


def fit_stages(steps, llc_mean, llc_std, llc_sem, options: ml_collections.ConfigDict,
               default_prefix: str = "S", num_valid_chains=None) -> stages.StageBoundaries:
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
    logging.warning("Stage fit: leaving out checkpoints at steps %s (fewer than %d valid "
                    "chains, so no standard error)", excluded, MIN_CHAINS_FOR_STAGES)
  if usable.sum() < 4:
    raise StageFitError(
        f"cannot fit stages: only {int(usable.sum())} of {len(steps)} checkpoints have an LLC "
        f"from at least {MIN_CHAINS_FOR_STAGES} valid chains (4 are needed); left out: steps "
        f"{excluded}. Use config.llc.num_chains >= 2, and see llc/summary.json for diverged "
        f"chains.", excluded)
  pick = lambda a: None if a is None else np.asarray(a, float)[usable]
  fit = stages.find_stage_boundaries(
      steps[usable], pick(llc_mean), pick(noise[o.noise]), tolerance=o.tolerance,
      relative_tolerance=o.relative_tolerance, n_restarts=o.n_restarts,
      min_stage_change=o.min_stage_change, seed=options.seed,
      label_prefix=o.get("label_prefix", "") or default_prefix)
  return dataclasses.replace(fit, settings={**fit.settings, "excluded_steps": excluded,
                                            "noise_source": o.noise,
                                            "error_bar": ERROR_BARS[o.noise]})


def chain_llcs(result: LLCResult, all_steps, steps) -> tuple[np.ndarray, np.ndarray]:
  """Per-chain LLCs of `result` (whose leading axis is `all_steps`) at `steps`, from
  every draw window of `stages.DRAW_WINDOWS` ([W, K, C]; the kept window is the
  stored `llc_per_chain`, the others are recomputed from `loss_trace`), and the
  chains that count there (not diverged) [K, C]."""
  all_steps, steps = np.asarray(all_steps), np.asarray(steps)
  idx = np.searchsorted(all_steps, steps)
  if np.any(idx >= len(all_steps)) or np.any(all_steps[np.minimum(idx, len(all_steps) - 1)]
                                             != steps):
    raise ValueError("the stage fit's steps are not all checkpoints of the LLC result")
  nbeta = np.asarray(result.settings["nbeta"], float)
  nbeta = nbeta[idx] if nbeta.ndim and nbeta.size == len(all_steps) else nbeta.reshape(-1)[0]
  burnin = None if result.burnin is None else np.asarray(result.burnin)[idx]
  llc = stages.window_llcs(result.loss_trace[idx], result.init_loss[idx], nbeta, burnin)
  llc[0] = result.llc_per_chain[idx]
  return llc, ~np.asarray(result.diverged)[idx]


def stage_stability(run_steps, result: LLCResult, boundaries: stages.StageBoundaries,
                    options: ml_collections.ConfigDict,
                    seed_results: Mapping[str, tuple[Any, LLCResult]] | None = None
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
    seeds = {label: (np.asarray(s), r.llc_per_chain, ~np.asarray(r.diverged))
             for label, (s, r) in seed_results.items()}
  return stages.stage_stability(
      boundaries, llc, valid=valid, noise=options.stages.noise, seed_curves=seeds,
      target=o.target, max_distance=o.max_distance, max_exact=o.max_exact,
      num_random=o.num_random, random_seed=o.seed)


def compute_metrics(run: Run, options: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Every metric of every checkpoint ([C] leading): the experiment's own (LR:
  behaviour and structure; LM: `lm_metrics`), then the Hessian and the head overlap."""
  if run.experiment == "lm":
    return _lm_metrics(run, options)
  return _lr_metrics(run, options)


def _lm_metrics(run: Run, options: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """LM metrics (App. C), Hessian statistics and head overlap on validation contexts."""
  checkpoints = list(run.checkpoints())
  o = options.lm
  validation = run.tokens("validation")
  train = run.tokens("train")
  common = None
  if run.config.data.source == "synthetic":
    corpus = synthetic_text.corpus_from_config(run.config)
    common = getattr(corpus, "planted_ngrams", None)
  t0 = time.time()
  metrics = dict(lm_metrics.lm_metrics(
      run.model, checkpoints, validation[:o.batch_size], train_tokens=train,
      common_ngrams=common, num_common_ngrams=o.num_common_ngrams,
      key=_key(options, _BEHAVIOUR), icl_positions=tuple(o.icl_positions),
      prev_token_batch=o.prev_token_batch, prefix_batch=o.prefix_batch,
      checkpoint_chunk=options.checkpoint_chunk, bos_id=run.bos_id()))
  logging.info("LM metrics of %d checkpoints: %.1fs", len(checkpoints), time.time() - t0)
  batch = {"tokens": validation[:options.hessian.batch_size]}
  metrics.update(_generic_metrics(run, options, checkpoints, batch,
                                  {"tokens": validation[:options.overlap.batch_size]}))
  return metrics


def _generic_metrics(run: Run, options, checkpoints, hessian_batch, overlap_batch
                     ) -> dict[str, np.ndarray]:
  """Hessian statistics and mean-ablation head overlap (any model with the protocol)."""
  metrics = {}
  if options.hessian.enabled:
    t0 = time.time()
    o = options.hessian
    h = hessian.hessian_stats(run.model.loss, checkpoints, hessian_batch,
                              num_hutchinson=o.num_hutchinson,
                              num_lanczos_iters=o.num_lanczos_iters, top_k=o.top_k,
                              seed=options.seed, checkpoint_chunk=options.checkpoint_chunk)
    metrics["hessian_trace"] = h["trace"]
    metrics["hessian_trace_se"] = h["trace_se"]
    metrics["hessian_top_eigenvalues"] = h["top_eigenvalues"]
    metrics["hessian_top_eigenvalue"] = h["top_eigenvalues"][:, 0]
    logging.info("Hessian statistics: %.1fs", time.time() - t0)
  if options.overlap.enabled:
    t0 = time.time()
    o = overlap.overlap_over_checkpoints(run.model.head_activations, run.model.ablated_loss,
                                         checkpoints, overlap_batch,
                                         checkpoint_chunk=options.checkpoint_chunk,
                                         mask_batch=options.overlap.get("mask_batch"))
    metrics.update({f"overlap/{k}": v for k, v in o.items()})
    metrics["overlap/names"] = np.array(overlap.head_names(run.model.num_layers,
                                                           run.model.num_heads))
    logging.info("Head overlap (mean ablation): %.1fs", time.time() - t0)
  return metrics


def _lr_metrics(run: Run, options: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Behavioural, structural and Hessian metrics of every checkpoint ([C] leading).

  The checkpoints are read from disk once and kept in memory for the three
  passes (an LR checkpoint is ~0.2 MB; 190 of them are ~40 MB).
  """
  checkpoints = list(run.checkpoints())
  metrics: dict[str, np.ndarray] = {}
  t0 = time.time()
  metrics.update(lr_behaviour.behaviour_metrics(
      run.model, checkpoints, run.task, _key(options, _BEHAVIOUR),
      options.behaviour.batch_size, gains=tuple(options.behaviour.gains),
      checkpoint_chunk=options.checkpoint_chunk))
  logging.info("Behavioural metrics of %d checkpoints: %.1fs", len(checkpoints), time.time() - t0)
  t0 = time.time()
  metrics.update(lr_structure.structure_metrics(
      run.model, checkpoints, run.task, _key(options, _STRUCTURE),
      options.structure.batch_size, checkpoint_chunk=options.checkpoint_chunk,
      collapse_threshold=options.structure.collapse_threshold))
  logging.info("Structural metrics: %.1fs", time.time() - t0)
  hessian_batch = sample_batch(_key(options, _HESSIAN), run.task, options.hessian.batch_size)
  data = lr_behaviour.evaluation_data(run.task, _key(options, _OVERLAP), options.overlap.batch_size)
  metrics.update(_generic_metrics(run, options, checkpoints, hessian_batch,
                                  {"xs": data["xs"], "ys": data["ys"]}))
  return metrics


def head_analysis(run: Run, options: ml_collections.ConfigDict,
                  boundaries: stages.StageBoundaries | None, metrics: Mapping[str, np.ndarray],
                  out: str) -> dict[str, Any] | None:
  """wrLLC trajectories, clusters and dispersion of the heads (None without a sweep).

  Reads `<workdir>/<options.heads.refined>/llc.npz` (launch/estimate_llc.py
  --restrict=heads), writes heads.png, head_clusters.png, heads_summary.json and
  wrllc_dispersion.png (the across-head mean and variance of the wrLLC beside
  the mean-ablation overlap and robustness), and returns the summary with the
  figures and the per-checkpoint columns for metrics.csv.
  """
  o = options.heads
  path = os.path.join(run.workdir, o.refined, "llc.npz")
  if not paths.exists(path):
    logging.info("No head wrLLC sweep at %s: head figures skipped", path)
    return None
  res = LLCResult.load(path)
  names = [str(n) for n in res.settings.get("restrictions", [])]
  mean, sem = res.llc_mean, res.llc_sem
  if mean.ndim != 2 or mean.shape != (len(names), len(run.steps)):
    raise ValueError(f"{path} holds wrLLCs of shape {mean.shape}, not [heads, "
                     f"{len(run.steps)} checkpoints] with restrictions {names}; rerun it")
  steps, mean_ok, sem_ok, dropped = heads_lib.drop_nonfinite_checkpoints(run.steps, mean, sem)
  if dropped:
    logging.warning("wrLLC: checkpoints %s have no valid chain for some head; left out of "
                    "the clustering", list(dropped))
  summary = heads_lib.head_summary(steps, mean_ok, names, sem_RxN=sem_ok,
                                   num_clusters=o.num_clusters or None, k_range=tuple(o.k_range),
                                   normalize=o.normalize, linkage=o.linkage, seed=options.seed)
  k = summary["num_clusters"]
  clusters = {m: heads_lib.cluster_trajectories(mean_ok, names, num_clusters=k, method=m,
                                                normalize=o.normalize, linkage=o.linkage,
                                                seed=options.seed)
              for m in heads_lib.CLUSTER_METHODS} if k >= 2 else {}
  figures = [("heads", heads_viz.plot_head_trajectories(
      run.steps, mean, names, sem_RxN=sem, boundaries=boundaries,
      clusters=clusters.get("hierarchical"), path=os.path.join(out, "heads.png"),
      title="wrLLC per head (colour: hierarchical cluster)"))]
  if clusters:
    figures.append(("head_clusters", heads_viz.plot_head_clusters(
        steps, mean_ok, names, clusters["hierarchical"], os.path.join(out, "head_clusters.png"),
        title=f"Head wrLLC trajectories, {o.normalize}-normalised, hierarchical ({o.linkage})")))
  ok = np.all(np.isfinite(mean), axis=0)
  part = heads_lib.dispersion(mean[:, ok])
  spread = {}
  for name in ("mean", "variance"):
    spread[name] = np.full(len(run.steps), np.nan)
    spread[name][ok] = part[name]
  columns = {"wrllc_head_mean": spread["mean"], "wrllc_head_variance": spread["variance"]}
  figures.append(("wrllc_dispersion", heads_viz.plot_dispersion_and_overlap(
      run.steps, spread, metrics, [] if boundaries is None else list(boundaries.boundary_steps),
      os.path.join(out, "wrllc_dispersion.png"))))
  summary["settings"] = {k2: res.settings.get(k2) for k2 in
                         ("step_size", "nbeta", "localization", "num_chains", "num_draws",
                          "batch_size")}
  summary["chain_health"] = res.health_counts()
  atomic.write_text(os.path.join(out, "heads_summary.json"), json.dumps(summary, indent=1))
  return {**summary, "figures": figures, "columns": columns}


def scalar_columns(metrics: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The numeric [C] entries of a metrics dict (the CSV columns)."""
  return {k: np.asarray(v, float) for k, v in metrics.items()
          if np.ndim(v) == 1 and np.issubdtype(np.asarray(v).dtype, np.number)}


NOISE_MAD_SCALE = 1.4826    # MAD → σ of a normal distribution
LEVEL_QUANTILE = 90         # the level of a metric: this percentile of |m| over checkpoints


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


def stage_changes(steps: np.ndarray, columns: Mapping[str, np.ndarray],
                  boundaries: stages.StageBoundaries, top: int = 6) -> list[dict[str, Any]]:
  """Per stage, the metrics whose change in it is largest relative to their level
  and noise (docs/stages.md).

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
      changes.append({
          "metric": name, "start": start, "end": end, "change": delta, "level": level,
          "noise": noise, "score": delta / scale,
          "relative_change_percent": 100.0 * delta / scale,
          "percent_of_start": (100.0 * delta / abs(start)
                               if abs(start) > noise and start != 0 else None),
          "noise_units": abs(delta) / (math.sqrt(2.0) * noise) if noise > 0 else None,
          "within_noise": bool(abs(delta) <= 2.0 * math.sqrt(2.0) * noise)})
    changes.sort(key=lambda c: -abs(c["score"]))
    out.append({**stage, "top_changes": changes[:top]})
  return out


def milestones(steps: np.ndarray, columns: Mapping[str, np.ndarray],
               boundaries: stages.StageBoundaries | None) -> dict[str, Any]:
  """The LR developmental milestones the paper reads off its metrics.

  task_prior: the checkpoint where the predictions are closest to the
    task-prior prediction (App. D.1.1), with that distance beside the initial one.
  icl_onset: the first checkpoint where ICL_{1:4} has fallen by half of its
    total fall (App. D.1.2: ICL scores falling marks in-context learning).
  Each milestone names the stage it falls in ('?' without a stage fit).
  """
  steps = np.asarray(steps)

  def stage_of(step: int) -> str:
    for s in (boundaries.stages if boundaries is not None else []):
      if s["start_step"] <= step <= s["end_step"]:
        return s["label"]
    return "?"

  out: dict[str, Any] = {}
  dist = columns.get("dist_prior")
  if dist is not None and np.isfinite(dist).any():
    i = int(np.nanargmin(dist))
    out["task_prior"] = {"step": int(steps[i]), "stage": stage_of(int(steps[i])),
                         "dist_prior": float(dist[i]), "dist_prior_initial": float(dist[0]),
                         "dist_zero": float(columns["dist_zero"][i]),
                         "mse": float(columns["mse"][i]),
                         "prior_mse": float(np.nanmean([columns[k][i] for k in columns
                                                        if k.startswith("prior_loss_k")]))}
  icl = columns.get("icl_1_4")
  if icl is not None and np.isfinite(icl).any():
    start, low = float(icl[0]), float(np.nanmin(icl))
    half = start - 0.5 * (start - low)
    i = int(np.argmax(icl <= half))
    out["icl_onset"] = {"step": int(steps[i]), "stage": stage_of(int(steps[i])),
                        "icl_1_4_initial": start, "icl_1_4_min": low,
                        "icl_1_4_at_onset": float(icl[i])}
  if "task_prior" in out and "icl_onset" in out:
    out["task_prior_before_icl"] = out["task_prior"]["step"] <= out["icl_onset"]["step"]
  return out


def _write_csv(path: str, steps: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
  names = list(columns)
  lines = [",".join(["step", *names])]
  for i, s in enumerate(steps):
    lines.append(",".join([str(int(s)), *(repr(float(columns[n][i])) for n in names)]))
  atomic.write_text(path, "\n".join(lines) + "\n")


def overlap_extremes(metrics: Mapping[str, np.ndarray], index: int = -1) -> dict[str, Any]:
  """The most and least overlapping head pairs and the robustness at one checkpoint."""
  names = [str(n) for n in metrics["overlap/names"]]
  o = np.asarray(metrics["overlap/overlap"])[index]
  i, j = np.triu_indices(len(names), k=1)
  vals = o[i, j]
  ok = np.isfinite(vals)
  out = {"robustness": float(metrics["overlap/robustness"][index]),
         "overlap_mean": float(metrics["overlap/overlap_mean"][index])}
  if ok.any():
    hi, lo = np.nanargmax(np.where(ok, vals, -np.inf)), np.nanargmin(np.where(ok, vals, np.inf))
    s_attn = np.asarray(metrics["overlap/s_attn"])[index]
    for key, k in (("max", hi), ("min", lo)):
      out[f"overlap_{key}"] = {"pair": [names[i[k]], names[j[k]]], "overlap": float(vals[k]),
                               "s_attn": float(s_attn[i[k], j[k]])}
  return out


def _markdown(run: Run, boundaries, changes, marks, labels_final, figures, timings,
              heads: dict | None = None, overlap_final: dict | None = None,
              excluded: list[int] | None = None) -> str:
  llc = run.llc
  lines = [f"# Developmental analysis: `{paths.absolute(run.workdir)}`", "",
           f"{len(run.steps)} checkpoints (steps {int(run.steps[0])}–{int(run.steps[-1])}); "
           f"LLC from {llc.llc_mean.shape[0]} × {llc.llc_per_chain.shape[-1]} chains "
           f"(ε = {llc.settings.get('step_size')}, nβ = {llc.settings.get('nbeta')}, "
           f"γ = {llc.settings.get('localization')}); chain health "
           f"{json.dumps(llc.health_counts())}.", "",
           "## Stages", ""]
  if excluded:
    lines += [f"**Left out of the stage fit:** the checkpoints at steps {excluded} have fewer "
              f"than {MIN_CHAINS_FOR_STAGES} valid chains, so their LLC has no standard error "
              f"(see the chain health in `llc/summary.json`).", ""]
  if boundaries is None:
    lines += ["**Stages were not fitted:** fewer than 4 checkpoints have an LLC from at least "
              f"{MIN_CHAINS_FOR_STAGES} valid chains.", ""]
  else:
    st = boundaries.settings
    tolerance_note = (f" = {st['tolerance']:.0%} of max |slope|"
                      if st.get("relative_tolerance") else "")
    lines += ["Boundaries are plateaus of the LLC over ln t (GP fit, App. B.1): zero crossings "
              "of the slope or near-plateaus (local minima of |slope| below the tolerance "
              f"{boundaries.tolerance_used:.3g}{tolerance_note}). Labels S1, S2, … are "
              "neutral: they claim no correspondence with the paper's LR1–LR5 / LM1–LM5.", ""]
    stab = boundaries.stability
    if stab is not None:
      lines += [f"**Stability criterion {'passes' if stab.passes else 'FAILS'}** "
                f"({stab.summary()}). A boundary's stability is the weighted fraction of "
                f"resamples (chains bootstrapped jointly across checkpoints × draw windows "
                f"{', '.join(w['name'] for w in stab.windows)}; every refit with the same "
                f"options) with a boundary within ±{stab.max_distance} checkpoint of it; "
                f"target {stab.target:.2f}. Unstable boundaries are kept and marked.", ""]
      lines += [f"* {r}" for r in stab.reasons] + ([""] if stab.reasons else [])
    lines += ["| stage | start step | end step | ends at | stability of its end | "
              "LLC at start → end |", "|---|---|---|---|---|---|"]
    for s in boundaries.stages:
      i0 = int(np.searchsorted(run.steps, s["start_step"]))
      i1 = int(np.searchsorted(run.steps, s["end_step"]))
      st = s["end_stability"]
      bad = st is not None and stab is not None and st < stab.target - 1e-12
      lines.append(f"| {s['label']} | {s['start_step']} | {s['end_step']} | "
                   f"{s['end_kind'].replace('_', ' ')} | "
                   f"{'–' if st is None else (f'**{st:.2f} (unstable)**' if bad else f'{st:.2f}')}"
                   f" | {llc.llc_mean[i0]:.2f} → {llc.llc_mean[i1]:.2f} |")
    lines.append("")
    lines += [f"* {s['description']}" for s in boundaries.stages]
    if boundaries.schedule_features:
      lines += ["", "Learning-rate schedule: " + "; ".join(
          f"{f['name']} at step {int(f['step'])}" for f in boundaries.schedule_features) + "."]
  lines += ["", "## Milestones", ""]
  tp, icl = marks.get("task_prior"), marks.get("icl_onset")
  if tp:
    lines.append(f"* **Task prior** ({tp['stage']}): predictions are closest to the "
                 f"task-prior prediction at step {tp['step']} (mean squared distance "
                 f"{tp['dist_prior']:.3g}, from {tp['dist_prior_initial']:.3g} at the first "
                 f"checkpoint); the model's MSE there is {tp['mse']:.3f} vs "
                 f"{tp['prior_mse']:.3f} for the task-prior predictor.")
  if icl:
    lines.append(f"* **In-context learning** ({icl['stage']}): ICL₁:₄ = L₄ − L₁ falls from "
                 f"{icl['icl_1_4_initial']:.3f} to {icl['icl_1_4_min']:.3f}; half of that "
                 f"fall is reached at step {icl['step']}.")
  if run.experiment == "lm":
    for name, mark in marks.items():
      lines.append(f"* **{name}**: {json.dumps(mark)}")
  if "task_prior_before_icl" in marks:
    lines.append(f"* Task-prior stage before the ICL stage: "
                 f"**{'yes' if marks['task_prior_before_icl'] else 'no'}**.")
  lines += ["", "## What changed in each stage", "",
            "Change Δ = value at the stage's end − value at its start, in % of the metric's "
            "level (90th percentile of |value| over checkpoints) and ranked by it; when the "
            "metric's checkpoint-to-checkpoint noise (robust second differences) exceeds its "
            "level, in % of the noise (docs/stages.md). \"within noise\": |Δ| ≤ 2√2 × "
            "noise.", ""]

  def change_text(t: dict[str, Any]) -> str:
    return (f"`{t['metric']}` {t['start']:.3g} → {t['end']:.3g} "
            f"({t['relative_change_percent']:+.1f} %"
            f"{', within noise' if t['within_noise'] else ''})")

  for c in changes:
    lines.append(f"**{c['label']}** (steps {c['start_step']}–{c['end_step']}): " + "; ".join(
        change_text(t) for t in c["top_changes"]))
    lines.append("")
  if labels_final:
    lines += ["## Heads at the last checkpoint", "",
              "| head | label |", "|---|---|"]
    lines += [f"| {k.split('/', 1)[-1]} | {v} |" for k, v in labels_final.items()]
    lines.append("")
  if heads:
    st = heads["settings"]
    lines += ["## Heads: weight-refined LLC (wrLLC)", "",
              f"wrLLC per head at the last checkpoint (step {heads['final_step']}; "
              f"ε = {st['step_size']}, nβ = {st['nbeta']}, γ = {st['localization']}, "
              f"{st['num_chains']} chains × {st['num_draws']} draws), its peak, and its "
              f"cluster ({heads['num_clusters']} clusters, {heads['normalize']}-normalised "
              f"trajectories; k-means and hierarchical agree with adjusted Rand index "
              f"{heads['cluster_agreement_ari']}):", "",
              "| head | final wrLLC | peak step | k-means | hierarchical |", "|---|---|---|---|---|"]
    cl = heads["clusters"]
    for h in heads["heads"]:
      lines.append(f"| {h} | {heads['final_llc'][h]:.2f} ± {heads['final_sem'][h]:.2f} | "
                   f"{heads['peak_step'][h]} | {cl.get('kmeans', {}).get('labels', {}).get(h, '')} | "
                   f"{cl.get('hierarchical', {}).get('labels', {}).get(h, '')} |")
    d = heads["dispersion_final"]
    lines += ["", f"Across heads at the last checkpoint: mean {d['mean']:.2f}, variance "
              f"{d['variance']:.2f}.", ""]
  if overlap_final:
    lines += ["## Functional overlap of heads (mean ablation)", "",
              f"At the last checkpoint: mean off-diagonal overlap O = "
              f"{overlap_final['overlap_mean']:.2f}, robustness 1 − Σ_i Δ_i / Δ_all = "
              f"{overlap_final['robustness']:.2f}."]
    for key in ("max", "min"):
      if f"overlap_{key}" in overlap_final:
        e = overlap_final[f"overlap_{key}"]
        lines.append(f"{key.title()} overlap: {' & '.join(e['pair'])}, O = {e['overlap']:.2f} "
                     f"(attention-pattern correlation S_attn = {e['s_attn']:.2f}).")
    lines.append("")
  lines += ["## Figures", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in figures]
  lines += ["", f"Timings (s): {json.dumps(timings)}", ""]
  return "\n".join(lines)


def options_for_run(workdir: str, overrides: Mapping[str, Any] | None = None
                    ) -> ml_collections.ConfigDict:
  """The analysis options a run was configured with (its config.json's `analysis`,
  filled in from `default_options()`), with exactly `overrides` applied on top.

  `overrides` is flat, {"hessian.enabled": True, "lm.batch_size": 8}: the fields the
  user set (`config_flags.get_override_values` in launch/analyze.py). Each is applied
  whatever its value, so an override equal to a default still replaces the run's
  own setting. A field the run's options lack is refused, naming it.
  """
  defaults = run_log.flatten(default_options().to_dict())
  saved = run_log.read_config(workdir).get("analysis")
  flat = {**defaults, **(run_log.flatten(saved.to_dict()) if saved is not None else {})}
  for key, value in (overrides or {}).items():
    if key not in flat:
      sections = sorted({k.split(".")[0] for k in flat})
      raise config_checks.ConfigError(
          f"--config.{key}={value!r} does not apply to the run at {workdir!r}: its analysis "
          f"options have no field {key!r} (their sections: {', '.join(sections)}).")
    flat[key] = value
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = nested
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
  return ml_collections.ConfigDict(nested)


def analyze(workdir: str, options: ml_collections.ConfigDict | None = None,
            out_dir: str | None = None, option_prefix: str = "analysis") -> dict[str, Any]:
  """Writes the report directory of a finished run; returns report.json's content.

  Default options: the run's own (`options_for_run`). The directory is built
  under a temporary name and swapped in whole (`atomic.replace_dir`), so a crash
  never leaves a mix of an old and a new report. Checkpoints with fewer than 2
  valid chains are left out of the stage fit and named in the report; with
  fewer than 4 usable checkpoints the report is written without stages.
  `option_prefix` names the options in error messages.
  """
  options = options_for_run(workdir) if options is None else options
  validate_options(options, option_prefix)
  target = out_dir or os.path.join(workdir, "report")
  if (paths.isdir(target) and paths.listdir(target)
      and not paths.exists(paths.join(target, "report.json"))):
    raise ValueError(f"refusing to replace {target!r}: it is not empty and holds no "
                     f"report.json, so it is not a report directory. Pass an empty or new "
                     f"directory (the report replaces its directory whole).")
  with lock.hold(workdir):
    run = load_run(workdir)
    with atomic.replace_dir(target) as out:
      summary = _write_report(run, options, out)
  logging.info("Report written to %s (stages %s)", target,
               ", ".join(f"{s['label']} {s['start_step']}–{s['end_step']}"
                         for s in summary["stages"]) or "not fitted")
  return summary


def _write_report(run: Run, options: ml_collections.ConfigDict, out: str) -> dict[str, Any]:
  timings = {}
  t0 = time.time()
  eval_loss = run.logged("eval_loss")
  is_lm = run.experiment == "lm"
  figures = []
  try:
    boundaries = stage_boundaries(run, options)
    excluded = boundaries.settings["excluded_steps"]
  except StageFitError as e:
    logging.warning("%s; the report is written without stages", e)
    boundaries, no_fit_reason, excluded = None, str(e), e.excluded_steps
  if boundaries is not None:
    o_st = options.stages.get("stability")
    if o_st is None or o_st.get("enabled", True):
      t1 = time.time()
      boundaries = dataclasses.replace(
          boundaries, stability=stage_stability(run.steps, run.llc, boundaries, options))
      timings["stage_stability"] = round(time.time() - t1, 1)
      logging.info("Stage stability: %s", boundaries.stability.summary())
      for reason in boundaries.stability.reasons:
        logging.warning("Unstable stage boundary: %s", reason)
    boundaries.save(out)
    figures.append(("stages", stages_viz.plot_stages(
        boundaries, os.path.join(out, "stages.png"), loss_steps=run.steps, loss=eval_loss,
        loss_label="validation loss (nats)" if is_lm else "eval MSE",
        title="LLC stages (attention-only language model)" if is_lm else
        "LLC stages (in-context linear regression)")))
    logging.info("Stage boundaries at steps %s", list(boundaries.boundary_steps))
  else:
    atomic.write_text(os.path.join(out, "stages.json"), json.dumps(
        {"fitted": False, "reason": no_fit_reason, "boundary_steps": [],
         "excluded_steps": excluded}, indent=1) + "\n")
  timings["stages"] = round(time.time() - t0, 1)

  t0 = time.time()
  metrics = compute_metrics(run, options)
  timings["metrics"] = round(time.time() - t0, 1)
  columns = {"llc_mean": run.llc.llc_mean, "llc_std": run.llc.llc_std,
             "eval_loss": eval_loss, **scalar_columns(metrics)}
  atomic.save_npz(os.path.join(out, "metrics.npz"), steps=run.steps,
                  **{k.replace("/", "__"): np.asarray(v) for k, v in metrics.items()
                     if np.asarray(v).dtype != object})
  edges = [] if boundaries is None else list(boundaries.boundary_steps)
  if is_lm:
    figures.append(("lm_metrics", lm_viz.plot_lm_metrics(
        run.steps, metrics, os.path.join(out, "lm_metrics.png"), boundaries=edges,
        title="Language-model development (App. C)")))
  else:
    figures.append(("behaviour", lr_viz.plot_behaviour(
        run.steps, metrics, os.path.join(out, "behaviour.png"), boundaries=edges,
        title="Behaviour (App. D.1)")))
    figures.append(("structure", lr_viz.plot_structure(
        run.steps, metrics, os.path.join(out, "structure.png"), boundaries=edges,
        title="Structure (App. D.2)")))
  if options.hessian.enabled:
    figures.append(("hessian", hessian_viz.plot_llc_vs_hessian(
        run.steps, run.llc.llc_mean, run.llc.llc_std,
        {"trace": metrics["hessian_trace"], "trace_se": metrics["hessian_trace_se"],
         "top_eigenvalues": metrics["hessian_top_eigenvalues"]},
        os.path.join(out, "hessian.png"), band_label="std over chains", boundaries=edges,
        title="LLC vs Hessian curvature (App. B.5)")))
  if options.overlap.enabled:
    o = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("overlap/")}
    figures.append(("overlap", overlap_viz.plot_overlap(
        run.steps, o, [str(n) for n in o["names"]], os.path.join(out, "overlap.png"),
        boundaries=edges, title="Functional overlap of heads (mean ablation)")))
  overlap_final = overlap_extremes(metrics) if options.overlap.enabled else None
  head_result = head_analysis(run, options, boundaries, metrics, out)
  if head_result is not None:
    figures += head_result.pop("figures")
    columns.update(head_result.pop("columns"))
  _write_csv(os.path.join(out, "metrics.csv"), run.steps, columns)   # once, with head columns
  if is_lm:
    labels_final = {k: str(v) for k, v in lm_metrics.classify_lm_heads(metrics).items()}
  else:
    labels = lr_structure.head_labels(metrics)
    labels_final = {k: str(np.asarray(v)[-1]) for k, v in sorted(labels.items())
                    if not k.endswith(("x", "y"))}
  changes = [] if boundaries is None else stage_changes(
      run.steps, {k: v for k, v in columns.items() if not k.endswith(("_std", "_se"))},
      boundaries, options.top_metrics)
  marks = (lm_metrics.milestones(run.steps, metrics) if is_lm else
           milestones(run.steps, columns, boundaries))
  atomic.write_text(os.path.join(out, "stage_changes.json"), json.dumps(changes, indent=1))
  summary = {"workdir": paths.absolute(run.workdir),
             "stages": [] if boundaries is None else boundaries.stages,
             "stages_fitted": boundaries is not None,
             "excluded_checkpoints": excluded,
             "boundary_steps": edges,
             "boundary_kinds": [] if boundaries is None else list(boundaries.boundary_kinds),
             "boundaries": [] if boundaries is None else boundaries.boundaries,
             "stage_stability": (None if boundaries is None or boundaries.stability is None
                                 else boundaries.stability.to_dict()),
             "stability_passes": (None if boundaries is None or boundaries.stability is None
                                  else boundaries.stability.passes),
             "schedule_features": [] if boundaries is None else list(
                 boundaries.schedule_features),
             "milestones": marks,
             "head_labels_last_checkpoint": labels_final, "heads": head_result,
             "overlap_last_checkpoint": overlap_final,
             "figures": [os.path.basename(p) for _, p in figures], "timings": timings,
             "options": options.to_dict()}
  atomic.write_text(os.path.join(out, "report.json"), json.dumps(summary, indent=1))
  atomic.write_text(os.path.join(out, "report.md"),
                    _markdown(run, boundaries, changes, marks, labels_final, figures, timings,
                              head_result, overlap_final, excluded))
  return summary
