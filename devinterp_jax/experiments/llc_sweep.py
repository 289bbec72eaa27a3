"""The LLC sweep over a run's checkpoints, shared by every experiment.

  estimate_checkpoints(config, loss_fn, dataset, checkpoints, ids, output_dir)
  estimate_workdir(config, workdir, model, dataset)   # every scheduled checkpoint
  calibrate_workdir(config, workdir, model, dataset)  # App. A.5.3 grid, first + last
  write_results(workdir, steps, result, ...)          # llc/ files, curve and traces
  rise_test(llc_mean, llc_sem)
  run_main_job(config, workdir, experiment)          # train → LLC → results → report

Sampler settings come from `config.llc`; `config.calibration` (when present)
checks them against the calibration criteria on the first and last checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from devinterp_jax import atomic, config_checks
from devinterp_jax.analysis import report
from devinterp_jax.experiments import registry
from devinterp_jax.sampling import calibration, convergence
from devinterp_jax.sampling import llc as llc_lib
from devinterp_jax.sampling import mesh as mesh_lib
from devinterp_jax.sampling import settings as settings_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.storage import checkpoints as checkpointing
from devinterp_jax.storage import digest
from devinterp_jax.storage import lock
from devinterp_jax.storage import run_log
from devinterp_jax.viz import llc as llc_viz


_SAMPLER_FIELDS = {
  "num_chains": "int>=1",
  "num_draws": "int>=1",
  "block_draws": "int>=1",
  "max_draws": "int>=0",
  "friction": "num>=0",
  "thinning": "int>=1",
  "step_size": "num>0",
  "nbeta": "num>0",
  "localization": "num>=0",
  "batch_size": "int>=1",
  "seed": "int>=0",
  "init_loss_stride": "int>=1",
  "mala_stride": "int>=0",
  "dataset_size": "int>=1",
  "chain_strategy": ("auto", "vmap", "map"),
  "mala_target": llc_lib.MALA_TARGETS,
}


def _check_sampler(settings, prefix: str) -> None:
  """An LLC sampler section (config.llc, or config.llc with config.refined's overrides)."""
  config_checks.check_fields(settings, prefix, _SAMPLER_FIELDS)
  chunk = settings.get("checkpoint_chunk")
  if (
    chunk is not None
    and chunk != "auto"
    and not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1)
  ):
    config_checks.fail(f"{prefix}.checkpoint_chunk", chunk, "an integer >= 1 or 'auto'")
  for key in ("mesh", "compute_dtype", "matmul_precision"):
    if key in settings:
      try:
        if key == "mesh":
          parse_mesh(settings[key])
        else:
          override: dict[str, Any] = {key: settings[key] or None}  # a dtype or precision
          settings_lib.SamplerSettings(
            num_chains=1,
            num_draws=1,
            step_size=1.0,
            localization=0.0,
            nbeta=1.0,
            batch_size=1,
            **override,
          )
      except ValueError as e:
        config_checks.fail(f"{prefix}.{key}", settings[key], str(e))
  sampler = settings.get("sampler", "sgld")
  if not isinstance(sampler, str) or sampler not in samplers_lib.SAMPLERS:
    config_checks.fail(f"{prefix}.sampler", sampler, f"one of {sorted(samplers_lib.SAMPLERS)}")
  if "num_burnin_steps" in settings:
    try:
      settings_lib.parse_burnin(settings["num_burnin_steps"])
    except ValueError:
      config_checks.fail(
        f"{prefix}.num_burnin_steps",
        settings["num_burnin_steps"],
        "'auto' or an integer >= 0 (steps before the first draw)",
      )
  try:
    settings_lib.SamplerSettings.from_config(settings)
  except (TypeError, ValueError) as e:
    raise config_checks.ConfigError(f"{prefix}: {e}") from None
  if settings.get("num_chains") == 1:
    logging.warning(
      "%s.num_chains = 1: an LLC from one chain has no standard error, so the "
      "stage fit leaves such checkpoints out",
      prefix,
    )


def _check_calibration(cal, prefix: str = "config.calibration") -> None:
  config_checks.check_fields(
    cal,
    prefix,
    {
      "step_sizes": "nums>0",
      "nbetas": "nums>0",
      "localizations": "nums>=0",
      "num_chains": "int>=4",
      "num_draws": "int>=1",
      "margin_se": "num>=0",
    },
  )
  band = cal.get("mala_band", (0.95, 1.0))
  if (
    not isinstance(band, (tuple, list))
    or len(band) != 2
    or not all(config_checks.is_number(b) and 0 <= b <= 1 for b in band)
    or band[0] > band[1]
  ):
    config_checks.fail(f"{prefix}.mala_band", band, "two numbers 0 <= low <= high <= 1")
  flags = ("diverged", "not_converged", "escaped", "negative")
  if any(f not in flags for f in cal.get("disqualify", ())):
    config_checks.fail(f"{prefix}.disqualify", tuple(cal.disqualify), f"a subset of {list(flags)}")


def validate_sampling_sections(config: ml_collections.ConfigDict) -> None:
  """The sections every setting shares: llc, refined (over llc), calibration, analysis."""
  if "llc" in config:
    _check_sampler(config.llc, "config.llc")
    if "refined" in config:
      merged = {**config.llc.to_dict(), **config.refined.to_dict()}
      _check_sampler(merged, "config.refined (over config.llc)")
  if "calibration" in config:
    _check_calibration(config.calibration)
  if "analysis" in config:
    report.validate_options(
      config.analysis,
      "config.analysis",
      registry.setting(config.get("experiment", "icl_regression")),
    )


def parse_data_spec(spec: str, fields: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
  """A data spec 'field=value,…' (`--data=`, `--loss_data=`) as typed overrides
  {field: fields[field](value)}; an unknown field or a bad value is refused, naming it."""
  overrides = {}
  for item in spec.split(","):
    field, sep, value = item.partition("=")
    if not sep or field.strip() not in fields:
      raise ValueError(
        f"bad data spec {item!r} in {spec!r}: use comma-separated "
        f"field=value with fields {sorted(fields)}"
      )
    try:
      overrides[field.strip()] = fields[field.strip()](value)
    except ValueError as e:
      raise ValueError(f"bad value in data spec {item!r}: {e}") from e
  return overrides


def loss_key(config: ml_collections.ConfigDict, loss_fn=None) -> str:
  """The identity of a setting's loss for resuming sweeps: the config without the
  training and analysis sections (the setting, its model and its data config), and
  the code identity of `loss_fn` where it has one (`digest.callable_identity`)."""
  skip = set(run_log.ANALYSIS_SECTIONS) | {"train"}
  key = json.dumps(
    {k: v for k, v in config.to_dict().items() if k not in skip}, sort_keys=True, default=str
  )
  code = None if loss_fn is None else digest.callable_identity(loss_fn)
  return key if code is None else f"{key}|{code}"


def check_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config whose weight-determining sections differ from the run's
  config.json (e.g. another --config.model.d_model for a run's checkpoints)."""
  run_log.check_config(workdir, config.to_json(sort_keys=True), write=False)


def estimate_checkpoints(
  config: ml_collections.ConfigDict, loss_fn, dataset, checkpoints, ids, output_dir: str | None
) -> LLCResult:
  """LLCs of any checkpoint sequence with config.llc's sampler settings on `dataset`."""
  settings = settings_lib.SamplerSettings.from_config(config.llc)
  logging.info(
    "Estimating LLCs for %d checkpoints × %d chains × %d draws%s (burn-in %s)",
    len(checkpoints),
    settings.num_chains,
    settings.num_draws,
    f" (up to {settings.max_draws} until converged)" if settings.adaptive else "",
    settings.num_burnin_steps,
  )
  return llc_lib.estimate(
    loss_fn,
    checkpoints,
    dataset,
    settings,
    sweep_options(config.llc, ids=ids, output_dir=output_dir, loss_key=loss_key(config, loss_fn)),
    sampler=samplers_lib.from_config(config.llc),
  )


def parse_mesh(spec: str | None):
  """A config's `mesh`: "auto", "none"/"" (one device) or "axis:size,…" over the
  sweep axes, e.g. "checkpoint:4,chain:2" (sizes multiply to the device count)."""
  if spec is None or spec in ("", "none"):
    return None
  if spec == "auto":
    return "auto"
  if not isinstance(spec, str):
    raise ValueError(f"mesh must be 'auto', 'none' or 'axis:size,…', got {spec!r}")
  names, sizes = [], []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    if name not in mesh_lib.SWEEP_AXES or not size.strip().isdigit():
      raise ValueError(
        f"mesh {spec!r}: {part.strip()!r} is not 'axis:size' with an axis of {mesh_lib.SWEEP_AXES}"
      )
    names.append(name)
    sizes.append(int(size))
  if int(np.prod(sizes)) != jax.device_count():
    raise ValueError(
      f"mesh {spec!r} has {int(np.prod(sizes))} devices, but {jax.device_count()} are present"
    )
  return jax.make_mesh(tuple(sizes), tuple(names))


def sweep_options(section, **kw) -> settings_lib.SweepOptions:
  """The `SweepOptions` of a config section (checkpoint_chunk, chain_strategy, mesh)."""
  return settings_lib.SweepOptions(
    checkpoint_chunk=section.get("checkpoint_chunk"),
    chain_strategy=section.get("chain_strategy", "auto"),
    mesh=parse_mesh(section.get("mesh", "auto")),
    checkpoint_ids=kw.pop("ids", None),
    **kw,
  )


def scheduled_checkpoints(
  workdir: str, model, pick=None
) -> tuple[np.ndarray, checkpointing.ParamsSequence]:
  """The scheduled steps of `workdir` (`pick(steps)` selects some) and their params,
  read lazily; every one is verified first, so a sweep fails at once on a corrupt one."""
  steps = checkpointing.scheduled_steps(workdir)
  if len(steps) == 0:
    raise checkpointing.CheckpointError(f"no scheduled checkpoints in {workdir!r}; train first")
  if pick is not None:
    steps = np.asarray(pick(steps), dtype=int)
  abstract = jax.eval_shape(model.init_params, jax.random.key(0))
  checkpoints = checkpointing.ParamsSequence(workdir, steps, abstract)
  checkpoints.verify()
  return steps, checkpoints


def estimate_workdir(
  config: ml_collections.ConfigDict, workdir: str, model, dataset
) -> tuple[np.ndarray, LLCResult]:
  """LLCs of every scheduled checkpoint in `workdir` (resumes finished chunks)."""
  with lock.hold(workdir):
    check_run_config(config, workdir)
    steps, checkpoints = scheduled_checkpoints(workdir, model)
    result = estimate_checkpoints(
      config,
      model.loss,
      dataset,
      checkpoints,
      [int(s) for s in steps],
      os.path.join(workdir, "llc", "chunks"),
    )
  return steps, result


@lock.holding
def calibrate_workdir(
  config: ml_collections.ConfigDict, workdir: str, model, dataset
) -> calibration.CalibrationResult:
  """The A.5.3 grid (config.calibration) on the earliest, a middle and the latest checkpoints.

  Writes <workdir>/calibration/{calibration.json, calibration.md, *.png}.
  """
  if "calibration" not in config:
    raise ValueError(
      f"config of experiment {config.experiment!r} has no 'calibration' "
      "section (the grid of step_sizes, nbetas, localizations)"
    )
  check_run_config(config, workdir)
  picked, checkpoints = scheduled_checkpoints(
    workdir, model, lambda s: [s[i] for i in calibration.spread_indices(len(s))]
  )
  picked = [int(s) for s in picked]
  c, cal = config.llc, config.calibration
  logging.info(
    "Calibrating on steps %s: %d step sizes × %d nβ × %d γ",
    picked,
    len(cal.step_sizes),
    len(cal.nbetas),
    len(cal.localizations),
  )
  out = os.path.join(workdir, "calibration")
  result = calibration.calibrate(
    model.loss,
    checkpoints,
    dataset,
    step_sizes=cal.step_sizes,
    nbetas=cal.nbetas,
    localizations=cal.localizations,
    num_chains=cal.num_chains,
    num_draws=cal.num_draws,
    batch_size=c.batch_size,
    seed=c.seed,
    num_burnin_steps=c.num_burnin_steps,
    mala_stride=c.mala_stride,
    mala_target=c.get("mala_target", "posterior"),
    sampler=samplers_lib.from_config(c),
    mala_band=tuple(cal.mala_band),
    disqualify=tuple(cal.disqualify),
    margin_se=float(cal.get("margin_se", 2.0)),
    checkpoint_ids=[f"step {s}" for s in picked],
    chain_strategy=c.chain_strategy,
    output_dir=out,
    mesh=parse_mesh(c.get("mesh", "auto")),
    compute_dtype=c.get("compute_dtype") or None,
    matmul_precision=c.get("matmul_precision") or None,
  )
  llc_viz.plot_calibration(result, out)
  return result


@lock.holding
def write_results(
  workdir: str,
  steps: np.ndarray,
  result: LLCResult,
  extra: dict | None = None,
  config: ml_collections.ConfigDict | None = None,
  loss_label: str = "eval loss",
  title: str = "LLC over training",
) -> dict:
  """Writes llc.npz, llc.csv (one line to load), summary.json, llc_curve.png and
  llc_traces.png; with `config`, also whether the configured sampler settings
  pass the calibration criteria on the earliest, a middle and the latest checkpoints."""
  out = os.path.join(workdir, "llc")
  result.save(os.path.join(out, "llc.npz"))
  metrics = {r["step"]: r for r in run_log.read_metrics(workdir)}
  losses = logged_losses(workdir, steps, metrics)
  conv = result.convergence or {}
  nan = np.full(len(steps), np.nan)
  columns = np.column_stack(
    [
      steps,
      result.llc_mean,
      result.llc_std,
      result.llc_sem,
      result.num_valid_chains,
      losses["train_loss"],
      losses["eval_loss"],
      nan if result.burnin is None else result.burnin,
      conv.get("status", nan),
      conv.get("llc", nan),
      conv.get("mcse", nan),
      conv.get("rhat", nan),
      conv.get("drift_z", nan),
      conv.get("burnin", nan),
      conv.get("num_recorded", nan),
    ]
  )
  header = (
    "step,llc_mean,llc_std,llc_sem,num_valid_chains,train_loss,eval_loss,"
    "window_start,convergence,llc_own,mcse_own,rhat,drift_z,burnin_own,num_recorded"
  )
  rows = [",".join([str(int(row[0]))] + [repr(float(v)) for v in row[1:]]) for row in columns]
  atomic.write_text(os.path.join(out, "llc.csv"), "\n".join([header, *rows]) + "\n")
  llc_viz.plot_llc_curve(
    steps,
    result.llc_mean,
    result.llc_std,
    [s for s, r in metrics.items() if "eval_loss" in r],
    [r["eval_loss"] for r in metrics.values() if "eval_loss" in r],
    os.path.join(workdir, "llc_curve.png"),
    band_label="std over chains",
    loss_label=loss_label,
    title=title,
  )
  llc_viz.plot_llc_traces(
    result,
    os.path.join(workdir, "llc_traces.png"),
    labels=[f"step {int(s)}" for s in steps],
    title="LLC traces per chain (colour: health status)",
  )
  check = None
  if config is not None and "calibration" in config:
    cal = config.calibration
    check = calibration.check_settings(
      result, None, tuple(cal.mala_band), tuple(cal.disqualify), float(cal.get("margin_se", 2.0))
    )
    if not check["passes"]:
      logging.warning(
        "The configured ε, nβ, γ fail the calibration criteria: %s; run launch/calibrate.py",
        "; ".join(check["reasons"]),
      )
  mid = len(steps) // 2
  summary = {
    "num_checkpoints": int(len(steps)),
    **rise_test(result.llc_mean, result.llc_sem),
    "llc_first": float(result.llc_mean[0]),
    "llc_middle": float(result.llc_mean[mid]),
    "llc_last": float(result.llc_mean[-1]),
    "steps_first_middle_last": [int(steps[0]), int(steps[mid]), int(steps[-1])],
    "diverged_chains": int(result.diverged.sum()),
    "chain_health": result.health_counts(),
    "mala_acceptance_mean": (
      float(np.nanmean(result.mala_acceptance))
      if np.isfinite(result.mala_acceptance).any()
      else None
    ),
    "settings_pass_calibration_check": check,
    "convergence": convergence_summary(steps, result),
    "fingerprint": result.settings.get("fingerprint"),
    **(extra or {}),
  }
  atomic.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
  return summary


def convergence_summary(steps: np.ndarray, result: LLCResult) -> dict | None:
  """Counts per convergence status, and each checkpoint's burn-in, statistics and reason."""
  conv = result.convergence
  if conv is None:
    return None
  names = convergence.CONVERGENCE_STATUS
  rows = []
  for i, step in enumerate(steps):
    rows.append(
      {
        "step": int(step),
        "status": names[int(conv["status"][i])],
        "reason": str(conv["reason"][i]),
        "burnin": int(conv["burnin"][i]),
        "draws_recorded": int(conv["num_recorded"][i]),
        "draws_kept": int(conv["num_draws"][i]),
        "llc_own_window": float(conv["llc"][i]),
        "mcse": float(conv["mcse"][i]),
        "rhat": float(conv["rhat"][i]),
        "ess_bulk_per_chain": float(conv["ess_bulk_per_chain"][i]),
        "ess_tail_per_chain": float(conv["ess_tail_per_chain"][i]),
        "drift_z": float(conv["drift_z"][i]),
      }
    )
  window = (
    None
    if result.burnin is None
    else {"start": int(np.max(result.burnin)), "end": int(result.loss_trace.shape[-1])}
  )
  return {
    "counts": result.convergence_counts(),
    "not_converged_steps": [r["step"] for r in rows if r["status"] == "not_converged"],
    "unchecked_steps": [r["step"] for r in rows if r["status"] == "unchecked"],
    "common_window": window,
    "checkpoints": rows,
  }


def logged_losses(
  workdir: str, steps: np.ndarray, metrics: dict[int, dict]
) -> dict[str, list[float]]:
  """train_loss and eval_loss at `steps`: from the training log's rows (`metrics`,
  by step), else from the checkpoint's meta (which holds the same row), else NaN."""
  metas = None
  out: dict[str, list[float]] = {"train_loss": [], "eval_loss": []}
  for step in steps:
    row = metrics.get(int(step), {})
    if any(k not in row for k in out):
      if metas is None:
        metas = checkpointing.read_metas(workdir)
      row = {**metas.get(int(step), {}), **row}
    for k in out:
      out[k].append(float(row.get(k, np.nan)))
  return out


def rise_test(llc_mean: np.ndarray, llc_sem: np.ndarray) -> dict:
  """Mean LLC of the last quarter of checkpoints minus the first quarter, in SEs.

  The standard error of a quarter's mean combines the per-checkpoint standard
  errors over chains: se = √(Σ sem_i²) / n_quarter.
  """
  n = len(llc_mean)
  q = max(n // 4, 1)
  first, last = slice(0, q), slice(n - q, n)
  m_first, m_last = float(np.mean(llc_mean[first])), float(np.mean(llc_mean[last]))
  se_first = float(np.sqrt(np.sum(np.square(llc_sem[first]))) / q)
  se_last = float(np.sqrt(np.sum(np.square(llc_sem[last]))) / q)
  z = (m_last - m_first) / max(np.hypot(se_first, se_last), 1e-12)
  return {
    "llc_first_quarter": m_first,
    "llc_last_quarter": m_last,
    "rise_in_standard_errors": float(z),
    "rises": bool(z > 3),
  }


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The LLC sweep of a trained run (launch/estimate_llc.py): every scheduled
  checkpoint with config.llc's settings, then the llc/ results; returns the summary."""
  experiment = registry.get(config.experiment)
  experiment.validate_config(config)
  with lock.hold(workdir):
    t0 = time.time()
    steps, result = experiment.estimate(config, workdir)
    return experiment.write_results(
      workdir, steps, result, config=config, extra={"llc_seconds": round(time.time() - t0, 1)}
    )


def run_main_job(config: ml_collections.ConfigDict, workdir: str, experiment) -> dict:
  """The main job of an experiment module (`train`, `estimate`, `write_results`):
  train, LLCs over all checkpoints, results, and the analysis report
  (<workdir>/report); returns llc/summary.json's content with the wall times."""
  experiment.validate_config(config)  # every section, before hours of training
  with lock.hold(workdir, create=True):
    t0 = time.time()
    experiment.train(config, workdir)
    t_train = time.time() - t0
    steps, result = experiment.estimate(config, workdir)
    t_llc = time.time() - t0 - t_train
    timings = {"train_seconds": round(t_train, 1), "llc_seconds": round(t_llc, 1)}
    summary = experiment.write_results(workdir, steps, result, extra=timings, config=config)
    t1 = time.time()
    analysis = report.analyze(workdir, registry.setting(config.experiment), config.analysis)
    summary.update(
      analysis_seconds=round(time.time() - t1, 1),
      total_seconds=round(time.time() - t0, 1),
      stage_boundaries=analysis["boundary_steps"],
      stages_excluded_checkpoints=analysis.get("excluded_checkpoints", []),
    )
    atomic.write_text(os.path.join(workdir, "llc", "summary.json"), json.dumps(summary, indent=2))
  logging.info("Done in %.0fs: %s", summary["total_seconds"], json.dumps(summary))
  return summary
