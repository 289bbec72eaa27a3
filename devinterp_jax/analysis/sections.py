"""Report sections: named units of the analysis report, built from the config.

A report runs the stage fit of the LLC curve, then a list of sections named in
`config.analysis.sections` (big_vision builds its evaluators by name the same
way). Each `Section` has
  compute(ctx) -> Output   metrics over checkpoints, figures, markdown, milestones
  defaults                 its options, `config.analysis.<name>`
  validate(options, key)   refuses bad options, naming the key
The generic sections here work for any model with the `HeadModel` protocol:
"hessian" (Hessian trace and top eigenvalues, App. B.5), "overlap" (functional
overlap of heads under mean ablation) and "heads" (wrLLC trajectories per head
and their clusters). A setting adds its own (`Setting.sections`): the LR's
"behaviour" and "structure", the LM's "lm".

A section reads what earlier sections computed from `ctx.metrics`, so order
matters ("heads" draws the overlap beside the wrLLC dispersion).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, config_checks, paths
from devinterp_jax.analysis import heads as heads_lib
from devinterp_jax.analysis import essential_dynamics as ed_lib
from devinterp_jax.analysis import hessian, overlap, stages
from devinterp_jax.analysis.run_data import Run
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import outputs_log
from devinterp_jax.viz import essential_dynamics as ed_viz
from devinterp_jax.viz import heads as heads_viz
from devinterp_jax.viz import hessian as hessian_viz
from devinterp_jax.viz import overlap as overlap_viz

# Key streams of the evaluation data, folded into `options.seed` (independent of
# the training and SGLD streams). A setting's sections use 0 and 1.
HESSIAN_STREAM, OVERLAP_STREAM = 2, 3


@dataclasses.dataclass
class Context:
  """What a section sees: the run, the analysis options, the output directory, the
  stage fit (None when it failed) and what earlier sections computed."""

  run: Run
  options: ml_collections.ConfigDict
  out: str
  boundaries: stages.StageBoundaries | None
  metrics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  _checkpoints: list[Any] | None = None

  def checkpoints(self) -> list[Any]:
    """Every scheduled checkpoint's params, read from disk once per report (an LR
    checkpoint is ~0.2 MB; 190 of them are ~40 MB)."""
    if self._checkpoints is None:
      self._checkpoints = list(self.run.checkpoints())
    return self._checkpoints

  def key(self, stream: int) -> jax.Array:
    """The evaluation-data key of a stream: fold_in(key(options.seed), stream)."""
    return jax.random.fold_in(jax.random.key(self.options.seed), stream)

  @property
  def edges(self) -> list[int]:
    """The stage boundary steps ([] without a stage fit)."""
    return [] if self.boundaries is None else list(self.boundaries.boundary_steps)

  def path(self, name: str) -> str:
    return os.path.join(self.out, name)

  def stage_of(self, step: int) -> str:
    """The label of the stage holding `step` ('?' without a stage fit)."""
    for s in self.boundaries.stages if self.boundaries is not None else []:
      if s["start_step"] <= step <= s["end_step"]:
        return s["label"]
    return "?"


@dataclasses.dataclass
class Output:
  """A section's results.

  metrics: [N]-leading arrays (metrics.npz; the numeric [N] ones are CSV columns).
  columns: extra CSV columns that are not metrics.
  figures: (name, path) of the figures written.
  markdown: lines of report.md, after the stage and milestone parts.
  milestones: name → JSON-able milestone (report.json's `milestones`);
  milestone_lines: their report.md bullets.
  head_labels: head → label at the last checkpoint.
  report: further report.json entries (their keys must be unique across sections).
  """

  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  markdown: list[str] = dataclasses.field(default_factory=list)
  milestones: dict[str, Any] = dataclasses.field(default_factory=dict)
  milestone_lines: list[str] = dataclasses.field(default_factory=list)
  head_labels: dict[str, str] = dataclasses.field(default_factory=dict)
  report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Section:
  """A named report section: `compute`, its default options and their check."""

  name: str
  compute: Callable[[Context], Output]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  validate: Callable[[ml_collections.ConfigDict, str], None] | None = None

  def enabled(self, options: ml_collections.ConfigDict) -> bool:
    """Listed sections run unless their options say `enabled=False`."""
    own = options.get(self.name)
    return True if own is None else bool(own.get("enabled", True))


def build(names, available: Mapping[str, Section], prefix: str = "analysis") -> list[Section]:
  """The sections `names` (config.analysis.sections), in order; an unknown or
  repeated name is refused, naming the key and the known sections."""
  names = tuple(names)
  for n in names:
    if n not in available:
      config_checks.fail(
        f"{prefix}.sections",
        names,
        f"names of known sections ({', '.join(sorted(available))}); {n!r} is none",
      )
  if len(set(names)) != len(names):
    config_checks.fail(f"{prefix}.sections", names, "distinct section names")
  return [available[n] for n in names]


def timed(label: str):
  """Logs how long a block took (a section's compute)."""

  class _Timer:
    def __enter__(self):
      self.t0 = time.time()
      return self

    def __exit__(self, *exc):
      self.seconds = time.time() - self.t0
      logging.info("%s: %.1fs", label, self.seconds)

  return _Timer()


# ----------------------------------------------------------------------------
# Hessian (stream 2).
# ----------------------------------------------------------------------------


def _validate_hessian(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(
    o,
    prefix,
    {
      "enabled": (True, False),
      "batch_size": "int>=1",
      "num_hutchinson": "int>=1",
      "num_lanczos_iters": "int>=1",
      "top_k": "int>=1",
    },
  )
  if o.top_k > o.num_lanczos_iters:
    config_checks.fail(
      f"{prefix}.top_k", o.top_k, f"at most num_lanczos_iters = {o.num_lanczos_iters}"
    )


def _hessian(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.hessian
  llc = run.require_llc()
  batch = run.eval_batch(ctx.key(HESSIAN_STREAM), o.batch_size, "hessian")
  with timed("Hessian statistics"):
    h = hessian.hessian_stats(
      run.model.loss,
      ctx.checkpoints(),
      batch,
      num_hutchinson=o.num_hutchinson,
      num_lanczos_iters=o.num_lanczos_iters,
      top_k=o.top_k,
      seed=ctx.options.seed,
      checkpoint_chunk=ctx.options.checkpoint_chunk,
    )
  metrics = {
    "hessian_trace": h["trace"],
    "hessian_trace_se": h["trace_se"],
    "hessian_top_eigenvalues": h["top_eigenvalues"],
    "hessian_top_eigenvalue": h["top_eigenvalues"][:, 0],
  }
  fig = hessian_viz.plot_llc_vs_hessian(
    run.steps,
    llc.llc_mean,
    llc.llc_std,
    {"trace": h["trace"], "trace_se": h["trace_se"], "top_eigenvalues": h["top_eigenvalues"]},
    ctx.path("hessian.png"),
    band_label="std over chains",
    boundaries=ctx.edges,
    title="LLC vs Hessian curvature (App. B.5)",
  )
  return Output(metrics=metrics, figures=[("hessian", fig)])


HESSIAN = Section(
  "hessian",
  _hessian,
  defaults=dict(enabled=True, batch_size=512, num_hutchinson=32, num_lanczos_iters=32, top_k=3),
  validate=_validate_hessian,
)


# ----------------------------------------------------------------------------
# Functional overlap of heads (stream 3).
# ----------------------------------------------------------------------------


def overlap_extremes(metrics: Mapping[str, np.ndarray], index: int = -1) -> dict[str, Any]:
  """The most and least overlapping head pairs and the robustness at one checkpoint."""
  names = [str(n) for n in metrics["overlap/names"]]
  o = np.asarray(metrics["overlap/overlap"])[index]
  i, j = np.triu_indices(len(names), k=1)
  vals = o[i, j]
  ok = np.isfinite(vals)
  out: dict[str, Any] = {
    "robustness": float(metrics["overlap/robustness"][index]),
    "overlap_mean": float(metrics["overlap/overlap_mean"][index]),
  }
  if ok.any():
    hi, lo = np.nanargmax(np.where(ok, vals, -np.inf)), np.nanargmin(np.where(ok, vals, np.inf))
    s_attn = np.asarray(metrics["overlap/s_attn"])[index]
    for key, k in (("max", hi), ("min", lo)):
      out[f"overlap_{key}"] = {
        "pair": [names[i[k]], names[j[k]]],
        "overlap": float(vals[k]),
        "s_attn": float(s_attn[i[k], j[k]]),
      }
  return out


def _validate_overlap(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(o, prefix, {"enabled": (True, False), "batch_size": "int>=1"})
  if o.get("mask_batch") is not None:
    config_checks.check_fields(o, prefix, {"mask_batch": "int>=1"})


def _overlap(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.overlap
  batch = run.eval_batch(ctx.key(OVERLAP_STREAM), o.batch_size, "overlap")
  with timed("Head overlap (mean ablation)"):
    res = overlap.overlap_over_checkpoints(
      run.model.head_activations,
      run.model.ablated_loss,
      ctx.checkpoints(),
      batch,
      checkpoint_chunk=ctx.options.checkpoint_chunk,
      mask_batch=o.get("mask_batch"),
    )
  names = overlap.head_names(run.model.num_layers, run.model.num_heads)
  metrics: dict[str, Any] = {f"overlap/{k}": v for k, v in res.items()}
  metrics["overlap/names"] = np.array(names)
  fig = overlap_viz.plot_overlap(
    run.steps,
    dict(res, names=np.array(names)),
    names,
    ctx.path("overlap.png"),
    boundaries=ctx.edges,
    title="Functional overlap of heads (mean ablation)",
  )
  final = overlap_extremes(metrics)
  lines = [
    "## Functional overlap of heads (mean ablation)",
    "",
    f"At the last checkpoint: mean off-diagonal overlap O = "
    f"{final['overlap_mean']:.2f}, robustness 1 − Σ_i Δ_i / Δ_all = "
    f"{final['robustness']:.2f}.",
  ]
  for key in ("max", "min"):
    if f"overlap_{key}" in final:
      e = final[f"overlap_{key}"]
      lines.append(
        f"{key.title()} overlap: {' & '.join(e['pair'])}, O = {e['overlap']:.2f} "
        f"(attention-pattern correlation S_attn = {e['s_attn']:.2f})."
      )
  lines.append("")
  return Output(
    metrics=metrics,
    figures=[("overlap", fig)],
    markdown=lines,
    report={"overlap_last_checkpoint": final},
  )


OVERLAP = Section(
  "overlap",
  _overlap,
  # mask_batch: ablations evaluated at once (None: all 1 + H + H(H−1)/2 + 1
  # in one vmap; a number bounds memory: logits [chunk, mask_batch, B, T, V]
  # for the LM).
  defaults=dict(enabled=True, batch_size=256, mask_batch=None),
  validate=_validate_overlap,
)


# ----------------------------------------------------------------------------
# Heads: wrLLC per head from a refined sweep.
# ----------------------------------------------------------------------------


def _validate_heads(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(
    o,
    prefix,
    {
      "num_clusters": "int>=0",
      "normalize": heads_lib.NORMALIZATIONS,
      "linkage": heads_lib.LINKAGES,
    },
  )
  k_range = tuple(o.k_range)
  if (
    len(k_range) != 2
    or not all(isinstance(k, int) for k in k_range)
    or not (2 <= k_range[0] <= k_range[1])
  ):
    config_checks.fail(f"{prefix}.k_range", k_range, "two integers 2 <= low <= high")


def head_analysis(ctx: Context) -> Output:
  """wrLLC trajectories, clusters and dispersion of the heads (nothing without a sweep).

  Reads `<workdir>/<options.heads.refined>/llc.npz` (launch/estimate_llc.py
  --restrict=heads), writes heads.png, head_clusters.png, heads_summary.json and
  wrllc_dispersion.png (the across-head mean and variance of the wrLLC beside
  the mean-ablation overlap and robustness, when the overlap section ran).
  """
  run, o, boundaries = ctx.run, ctx.options.heads, ctx.boundaries
  path = os.path.join(run.workdir, o.refined, "llc.npz")
  if not paths.exists(path):
    logging.info("No head wrLLC sweep at %s: head figures skipped", path)
    return Output(report={"heads": None})
  res = LLCResult.load(path)
  names = [str(n) for n in res.settings.get("restrictions", [])]
  mean, sem = res.llc_mean, res.llc_sem
  if mean.ndim != 2 or mean.shape != (len(names), len(run.steps)):
    raise ValueError(
      f"{path} holds wrLLCs of shape {mean.shape}, not [heads, "
      f"{len(run.steps)} checkpoints] with restrictions {names}; rerun it"
    )
  steps, mean_ok, sem_ok, dropped = heads_lib.drop_nonfinite_checkpoints(run.steps, mean, sem)
  if dropped:
    logging.warning(
      "wrLLC: checkpoints %s have no valid chain for some head; left out of the clustering",
      list(dropped),
    )
  seed = ctx.options.seed
  summary = heads_lib.head_summary(
    steps,
    mean_ok,
    names,
    sem_RxN=sem_ok,
    num_clusters=o.num_clusters or None,
    k_range=tuple(o.k_range),
    normalize=o.normalize,
    linkage=o.linkage,
    seed=seed,
  )
  k = summary["num_clusters"]
  clusters = (
    {
      m: heads_lib.cluster_trajectories(
        mean_ok,
        names,
        num_clusters=k,
        method=m,
        normalize=o.normalize,
        linkage=o.linkage,
        seed=seed,
      )
      for m in heads_lib.CLUSTER_METHODS
    }
    if k >= 2
    else {}
  )
  figures = [
    (
      "heads",
      heads_viz.plot_head_trajectories(
        run.steps,
        mean,
        names,
        sem_RxN=sem,
        boundaries=boundaries,
        clusters=clusters.get("hierarchical"),
        path=ctx.path("heads.png"),
        title="wrLLC per head (colour: hierarchical cluster)",
      ),
    )
  ]
  if clusters:
    figures.append(
      (
        "head_clusters",
        heads_viz.plot_head_clusters(
          steps,
          mean_ok,
          names,
          clusters["hierarchical"],
          ctx.path("head_clusters.png"),
          title=f"Head wrLLC trajectories, {o.normalize}-normalised, hierarchical ({o.linkage})",
        ),
      )
    )
  ok = np.all(np.isfinite(mean), axis=0)
  part = heads_lib.dispersion(mean[:, ok])
  spread = {}
  for name in ("mean", "variance"):
    spread[name] = np.full(len(run.steps), np.nan)
    spread[name][ok] = part[name]
  columns = {"wrllc_head_mean": spread["mean"], "wrllc_head_variance": spread["variance"]}
  figures.append(
    (
      "wrllc_dispersion",
      heads_viz.plot_dispersion_and_overlap(
        run.steps, spread, ctx.metrics, ctx.edges, ctx.path("wrllc_dispersion.png")
      ),
    )
  )
  summary["settings"] = {
    k2: res.settings.get(k2)
    for k2 in ("step_size", "nbeta", "localization", "num_chains", "num_draws", "batch_size")
  }
  summary["chain_health"] = res.health_counts()
  atomic.write_text(ctx.path("heads_summary.json"), json.dumps(summary, indent=1))
  return Output(
    columns=columns, figures=figures, markdown=_heads_markdown(summary), report={"heads": summary}
  )


def _heads_markdown(heads: dict[str, Any]) -> list[str]:
  st = heads["settings"]
  lines = [
    "## Heads: weight-refined LLC (wrLLC)",
    "",
    f"wrLLC per head at the last checkpoint (step {heads['final_step']}; "
    f"ε = {st['step_size']}, nβ = {st['nbeta']}, γ = {st['localization']}, "
    f"{st['num_chains']} chains × {st['num_draws']} draws), its peak, and its "
    f"cluster ({heads['num_clusters']} clusters, {heads['normalize']}-normalised "
    f"trajectories; k-means and hierarchical agree with adjusted Rand index "
    f"{heads['cluster_agreement_ari']}):",
    "",
    "| head | final wrLLC | peak step | k-means | hierarchical |",
    "|---|---|---|---|---|",
  ]
  cl = heads["clusters"]
  for h in heads["heads"]:
    lines.append(
      f"| {h} | {heads['final_llc'][h]:.2f} ± {heads['final_sem'][h]:.2f} | "
      f"{heads['peak_step'][h]} | {cl.get('kmeans', {}).get('labels', {}).get(h, '')} | "
      f"{cl.get('hierarchical', {}).get('labels', {}).get(h, '')} |"
    )
  d = heads["dispersion_final"]
  return lines + [
    "",
    f"Across heads at the last checkpoint: mean {d['mean']:.2f}, variance {d['variance']:.2f}.",
    "",
  ]


HEADS = Section(
  "heads",
  head_analysis,
  # wrLLC per head, read from <workdir>/<refined> when that sweep exists;
  # num_clusters 0 = chosen by silhouette over k_range.
  defaults=dict(
    refined="wrllc_heads", num_clusters=0, k_range=(2, 4), normalize="zscore", linkage="ward"
  ),
  validate=_validate_heads,
)

# ----------------------------------------------------------------------------
# Essential dynamics: milestones in function space (analysis/essential_dynamics.py).
# ----------------------------------------------------------------------------

_ED_OPTIONS = tuple(f.name for f in dataclasses.fields(ed_lib.EDOptions))


def _validate_ed(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(
    o,
    prefix,
    {
      "enabled": (True, False),
      "source": ("auto", "recorded", "checkpoints"),
      "min_points": "int>=3",
      "pair_tolerance_log10": "num>=0",
      "null_seeds": "int>=0",
      "num_components": "int>=2",
      "sigma_early": "num>=0",
      "sigma_late": "num>=0",
      "evr_threshold": "num>=0",
      "reversal_evr": "num>=0",
      "turn_arc": "num>0",
      "min_straightness": "num>=0",
      "min_prominence": "num>=0",
      "sharp_radius": "num>0",
      "cusp_radius": "num>0",
      "cusp_movement": "num>=0",
      "reversal_tolerance": "int>=0",
      "merge_tolerance": "int>=0",
    },
  )
  try:
    ed_options(o)
  except ValueError as e:
    config_checks.fail(prefix, "(see message)", str(e))


def ed_options(o: ml_collections.ConfigDict) -> ed_lib.EDOptions:
  """The section's options as `EDOptions` (late_from_step < 0: one smoothing width)."""
  kw = {k: o[k] for k in _ED_OPTIONS if k in o and k != "late_from_step"}
  late = float(o.get("late_from_step", -1))
  return ed_lib.EDOptions(**kw, late_from_step=None if late < 0 else late)


def ed_trajectory(ctx: Context, source: str) -> tuple[np.ndarray, np.ndarray, str]:
  """steps [U], outputs [U, F] and where they came from: the dense record written
  during training, else the setting's probe on every scheduled checkpoint."""
  run = ctx.run
  if source in ("auto", "recorded"):
    steps, outputs = outputs_log.read(run.workdir)
    if len(steps) or source == "recorded":
      return steps, outputs, "recorded during training"
  if run.setting.ed_probe is None:
    raise ValueError(f"setting {run.setting.name!r} has no ed_probe: essential dynamics needs one")
  outputs_fn, inputs = run.setting.ed_probe(run.config, run.workdir)
  outputs = ed_lib.trajectory_outputs(
    outputs_fn, ctx.checkpoints(), inputs, checkpoint_chunk=ctx.options.checkpoint_chunk
  )
  return np.asarray(run.steps), outputs, "re-read from the scheduled checkpoints"


def _ed(ctx: Context) -> Output:
  o = ctx.options.ed
  with timed("Essential dynamics"):
    steps, outputs, source = ed_trajectory(ctx, o.source)
    if len(steps) < o.min_points:
      note = (
        f"skipped: {len(steps)} points ({source}), fewer than min_points = {o.min_points} "
        "(record more with config.train.ed_every)"
      )
      return Output(markdown=["## Essential dynamics", "", f"Essential dynamics {note}.", ""],
                    report={"essential_dynamics": {"skipped": note}})  # fmt: skip
    result = ed_lib.essential_dynamics(steps, outputs, ed_options(o))
    result.save(ctx.out)
    pairing = ed_lib.pair_milestones(result.milestone_steps, ctx.edges, o.pair_tolerance_log10)
    # The matched null: random walks of this run's U points in its F dimensions.
    null = (
      ed_lib.null_rate(
        "random_walk", len(steps), outputs.shape[1], range(o.null_seeds), ed_options(o)
      )
      if o.null_seeds
      else None
    )
  fig = ed_viz.plot_ed(
    result, ctx.path("ed.png"), ctx.edges,
    title=f"Essential dynamics ({len(steps)} points, {source})",
  )  # fmt: skip
  evr = ", ".join(f"PC{z + 1} {v:.1%}" for z, v in enumerate(result.explained_variance_ratio_Z))
  lines = [
    "## Essential dynamics",
    "",
    f"PCA of the outputs at {len(steps)} steps ({source}; {outputs.shape[1]} features). "
    f"Explained variance: {evr}.",
    "",
  ]
  if null is not None:
    lines += [
      f"Matched null: {null['with_milestones']} of {null['seeds']} random walks of "
      f"{null['num_points']} points in {null['dim']} dimensions give a milestone with "
      f"these thresholds (false-positive rate {null['rate']:.0%}).",
      "",
    ]
  if result.milestones:
    for m in result.milestones:
      lines.append(
        f"- ED milestone at step {m['step']}: {' and '.join(m['kinds'])} in "
        f"{', '.join(m['planes'])} (R/L = {m['radius_over_length']:.3g})."
      )
  else:
    lines.append("- No ED milestone passes the thresholds.")
  tol = o.pair_tolerance_log10
  lines += [
    "",
    f"Paired with LLC boundaries within {tol} in log10 step (a factor {10**tol:.2f}): "
    + (", ".join(f"ED {p['ed_step']} ↔ LLC {p['llc_step']}" for p in pairing["matched"]) or "none")
    + f". Unmatched ED milestones: {pairing['unmatched_ed'] or 'none'}; unmatched LLC "
    f"boundaries: {pairing['unmatched_llc'] or 'none'}.",
    "",
  ]
  return Output(
    figures=[("ed", fig)],
    markdown=lines,
    report={
      "essential_dynamics": {
        **result.to_json(),
        "source": source,
        "pairing": pairing,
        "matched_null": null,
      }
    },
  )


ED = Section(
  "ed",
  _ed,
  defaults=dict(
    enabled=True,
    source="auto",
    min_points=10,
    pair_tolerance_log10=0.2,
    null_seeds=20,
    late_from_step=-1.0,
    **{k: v for k, v in dataclasses.asdict(ed_lib.EDOptions()).items() if k != "late_from_step"},
  ),
  validate=_validate_ed,
)


GENERIC: dict[str, Section] = {s.name: s for s in (HESSIAN, OVERLAP, HEADS, ED)}
"""The sections every setting can run."""
