"""LLC estimation with SGLD for many checkpoints × chains (× restrictions) in one program.

    λ̂(w*) = nβ · (E_chain[L_B(w_t)] − L(w*))           (paper eq. 3, App. A.3)

The loss of each recorded step is the minibatch loss already computed for the
SGLD gradient ("recycled" losses). L(w*) (`init_loss`) is the mean of L_B(w*)
over every `init_loss_stride`-th recorded batch of the chain itself, so it
costs a few forward passes and shares the chain's batch noise.

The engine, by job:
  settings.py   SamplerSettings, SweepOptions, Restrictions (typed inputs)
  kernel.py     one SGLD step -> StepInfo
  observers.py  per-step diagnostics, StepInfo -> {name: array}
  program.py    the cached, compiled block program over pairs × chains
  sweep.py      the chunked, fingerprinted, resumable, adaptive driver
  llc.py        `estimate` (typed) and the flat-keyword `estimate_llcs` /
                `estimate_llc`; assembly of the `LLCResult`

Randomness: chain c uses `fold_in(key(seed), c)`; step t of that chain uses
`fold_in(chain_key, t)` (t global). The keys never depend on the checkpoint, so
every checkpoint sees the same minibatches and injected noise (App. A.5.2), and
results do not depend on chunking or blocking.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from devinterp_jax.sampling import diagnostics as diagnostics_lib
from devinterp_jax.sampling import program as program_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling import results as results_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling import sweep as sweep_lib
from devinterp_jax.sampling.kernel import batch_fn_from_data
from devinterp_jax.sampling.program import cache_stats, clear_cache
from devinterp_jax.sampling.settings import (
  MALA_TARGETS,
  Restrictions,
  SamplerSettings,
  SweepOptions,
)
from devinterp_jax.sampling.sweep import ChunkError, sweep_identity
from devinterp_jax.typing import LossFn, Params

SamplerFactory = Callable[..., optax.GradientTransformationExtraArgs]
__all__ = [
  "MALA_TARGETS",
  "ChunkError",
  "Restrictions",
  "SamplerSettings",
  "SweepOptions",
  "batch_fn_from_data",
  "cache_stats",
  "clear_cache",
  "estimate",
  "estimate_llc",
  "estimate_llcs",
  "sweep_identity",
]

_CONV_FIELDS = (
  "rhat",
  "ess_bulk",
  "ess_tail",
  "ess_bulk_per_chain",
  "ess_tail_per_chain",
  "drift_z",
  "mcse",
  "burnin",
  "num_draws",
  "num_recorded",
  "num_chains",
  "llc",
  "relaxing",
)


def sampler_name(sampler: str | SamplerFactory) -> str:
  if isinstance(sampler, str):
    return sampler
  func = getattr(sampler, "func", sampler)  # functools.partial
  kw = getattr(sampler, "keywords", None)
  return getattr(func, "__name__", repr(func)) + (f"{sorted(kw.items())}" if kw else "")


def num_sampled_params(params: Params, leading_axes: int = 0) -> int:
  """Number of coordinates d of one checkpoint (ignoring `leading_axes` stacked axes)."""
  return int(sum(np.prod(np.shape(x)[leading_axes:]) for x in jax.tree.leaves(params)))


def _window(settings: SamplerSettings, out: sweep_lib.SweepOutputs):
  """The draws every entry keeps: per (g, r) curve from the latest burn-in; one end."""
  G, R, N = out.shape
  end = min(len(sweep_lib.draw_index(settings, p.steps)) for p in out.pairs)
  if not settings.adaptive:
    end = min(end, settings.num_draws)
  start = np.zeros((G, R, N), np.int64)
  for g in range(G):
    for r in range(R):
      group = [p for p in out.pairs if p.grid == g and p.restriction == r]
      start[g, r] = max(int(out.assessments[p.index]["burnin"]) for p in group)
  return np.minimum(start, max(end - 1, 0)), end


def result_from_sweep(
  out: sweep_lib.SweepOutputs,
  settings: SamplerSettings,
  *,
  hyper_grid: list[dict],
  ids: Sequence[Any],
  restriction_names: list[str] | None,
  criteria: diagnostics_lib.HealthCriteria,
  extra_settings: dict,
) -> results_lib.LLCResult:
  """The `LLCResult` [G, R, N, ...] of a finished sweep (callers squeeze axes)."""
  G, R, N = out.shape
  start, end = _window(settings, out)
  steps_end = settings.burnin_steps + (end - 1) * settings.thinning + 1 if end else 0
  arrays: dict[str, list] = {}
  conv: dict[str, list] = {k: [] for k in _CONV_FIELDS + ("status", "reason")}
  for p in out.pairs:
    assert p.outputs is not None  # a finished sweep
    cut = {k: v[:, :steps_end] for k, v in p.outputs.items()}
    draws = sweep_lib.draw_index(settings, steps_end)
    arrays.setdefault("loss", []).append(cut["loss"][:, draws])
    arrays.setdefault("init_loss", []).append(
      cut["init_loss"][:, sweep_lib.init_index(settings, steps_end)]
    )
    if "mala" in cut:
      arrays.setdefault("mala", []).append(
        cut["mala"][:, sweep_lib.mala_index(settings, steps_end)]
      )
    for name in ("distance", "grad_norm", "noise_norm"):
      if name in cut:
        arrays.setdefault(name, []).append(cut[name][:, draws])
    a = out.assessments[p.index]
    for k in conv:
      conv[k].append(a[k])
  shape = lambda v: np.stack(v).reshape((G, R, N) + np.shape(v[0]))
  stacked = {k: shape(v) for k, v in arrays.items()}
  convergence = {k: np.asarray(v).reshape(G, R, N) for k, v in conv.items()}
  nbeta = np.array([float(h["nbeta"]) for h in hyper_grid])[:, None, None]
  labels = []
  for g in range(G):
    prefix = (
      ""
      if G == 1
      else (
        f"ε={hyper_grid[g]['step_size']:.3g}, "
        f"nβ={hyper_grid[g]['nbeta']:.4g}, "
        f"γ={hyper_grid[g]['localization']:.4g}, "
      )
    )
    for r in range(R):
      rname = "" if restriction_names is None else f"{restriction_names[r]} "
      labels += [f"{prefix}{rname}checkpoint {c}" for c in ids]
  return results_lib.summarize(
    stacked["loss"],
    stacked["init_loss"],
    np.broadcast_to(nbeta, (G, R, N)),
    settings={**dataclasses.asdict(settings), **extra_settings},
    labels=labels,
    num_params=out.num_params.reshape(G, R, N),
    mala=stacked.get("mala"),
    distance=stacked.get("distance"),
    grad_norm=stacked.get("grad_norm"),
    noise_norm=stacked.get("noise_norm"),
    criteria=criteria,
    burnin=start,
    convergence_stats=convergence,
  )


def _squeeze(
  res: results_lib.LLCResult, axes: tuple[int, ...], num_params: np.ndarray, per_restriction: bool
) -> results_lib.LLCResult:
  """Drops the length-1 grid / restriction axes; d is per restriction where R stays."""
  take = tuple(0 if i in axes else slice(None) for i in range(3))
  out = res.select(take) if axes else res
  d = np.asarray(num_params).reshape(res.llc_mean.shape)[0, :, 0]
  settings = {**out.settings, "num_params": [int(x) for x in d] if per_restriction else int(d[0])}
  return dataclasses.replace(out, settings=settings)


def estimate(
  loss_fn: LossFn,
  checkpoints: Sequence[Params] | Params,
  data: Any,
  settings: SamplerSettings,
  options: SweepOptions = SweepOptions(),
  *,
  sampler: str | SamplerFactory = "sgld",
  restrictions: Restrictions | None = None,
  loss_data: Any = None,
  criteria: diagnostics_lib.HealthCriteria | None = None,
  grid: list[dict] | None = None,
  squeeze_restrictions: bool = True,
) -> results_lib.LLCResult:
  """LLCs of many checkpoints × chains in one compiled program, typed arguments.

  Returns an `LLCResult` [N] (checkpoints), [R, N] with several restrictions
  (one restriction: [N] when `squeeze_restrictions`), with a leading [G] for
  a hyperparameter `grid`. See `estimate_llcs` for the meaning of each input.
  """
  criteria = criteria or diagnostics_lib.HealthCriteria()
  out = sweep_lib.run(
    loss_fn,
    checkpoints,
    data,
    settings,
    options,
    sampler=sampler,
    sampler_label=sampler_name(sampler),
    restrictions=restrictions,
    grid=grid,
    loss_data=loss_data,
    criteria=criteria,
  )
  G, R, N = out.shape
  ids = list(options.checkpoint_ids) if options.checkpoint_ids is not None else list(range(N))
  extra = {
    "chain_strategy": program_lib.resolve_chain_strategy(options.chain_strategy),
    "checkpoint_chunk": options.checkpoint_chunk,
    "sampler": sampler_name(sampler),
    "step_check": samplers_lib.step_check(sampler),
    "data_refined": loss_data is not None,
  }
  if out.fingerprint is not None:
    extra["fingerprint"] = out.fingerprint
  if restrictions is not None:
    extra["restrictions"] = list(restrictions.names)
  hyper_grid = grid or [
    {
      "step_size": settings.step_size,
      "nbeta": settings.nbeta,
      "localization": settings.localization,
    }
  ]
  res = result_from_sweep(
    out,
    settings,
    hyper_grid=hyper_grid,
    ids=ids,
    restriction_names=None if restrictions is None else list(restrictions.names),
    criteria=criteria,
    extra_settings=extra,
  )
  drop_r = restrictions is None or (squeeze_restrictions and R == 1)
  axes = tuple(i for i, drop in enumerate((grid is None, drop_r, False)) if drop)
  return _squeeze(res, axes, out.num_params, per_restriction=not drop_r)


def _restrictions(restrict: Any) -> Restrictions | None:
  if restrict is None:
    return None
  if isinstance(restrict, Restrictions):
    return restrict
  if (
    isinstance(restrict, tuple)
    and len(restrict) == 2
    and isinstance(restrict[0], (list, tuple))
    and all(isinstance(n, str) for n in restrict[0])
  ):
    return Restrictions(list(restrict[0]), restrict[1])
  restrict_lib.check_binary(restrict)
  return Restrictions.single(restrict)


def estimate_llcs(
  loss_fn: LossFn,
  checkpoints: Sequence[Params] | Params,
  data: Any,
  *,
  num_chains: int,
  num_draws: int,
  step_size: float,
  localization: float,
  nbeta: float,
  batch_size: int,
  seed: int = 0,
  num_burnin_steps: int | str = "auto",
  thinning: int = 1,
  init_loss_stride: int = 10,
  mala_stride: int = 10,
  mala_target: str = "posterior",
  diagnostics: bool = True,
  block_draws: int = 100,
  max_draws: int | None = None,
  sampler: str | SamplerFactory = "sgld",
  criteria: diagnostics_lib.HealthCriteria | None = None,
  checkpoint_chunk: int | str | None = None,
  mesh: Any = "auto",
  batch_axis: str = "batch",
  output_dir: str | None = None,
  checkpoint_ids: Sequence[Any] | None = None,
  chain_strategy: str = "auto",
  progress: bool = True,
  restrict: Any = None,
  loss_data: Any = None,
  loss_key: str | None = None,
  compute_dtype: str | None = None,
  matmul_precision: str | None = None,
) -> results_lib.LLCResult:
  """LLCs of many checkpoints × chains in one compiled program, with chain diagnostics.

  A thin wrapper of `estimate(loss_fn, checkpoints, data, SamplerSettings(...),
  SweepOptions(...), ...)`.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar` mean loss (any framework).
    checkpoints: a list (any `Sequence`, possibly lazy like `ParamsSequence`)
      of param pytrees of one structure and shape, or one stacked pytree with a
      leading checkpoint axis whose top level is not a list or tuple.
    data: pytree of arrays with a leading sample axis, or a `key -> batch`
      callable (see `kernel.batch_fn_from_data`).
    num_chains, num_draws: chains per checkpoint and recorded draws per chain
      (with `max_draws`: the draws before the first convergence look).
    step_size, localization, nbeta: ε, γ and nβ (units in `sampling/sgld.py`).
    batch_size: SGLD minibatch size.
    seed: chain c uses fold_in(key(seed), c), identical at every checkpoint.
    num_burnin_steps: "auto" (read the burn-in from the trace, the default) or a
      number of steps before the first recorded draw.
    thinning: steps per draw. init_loss_stride: L(w*) uses every stride-th draw.
    mala_stride: every stride-th step also evaluates the proposal on the same
      minibatch for a MALA acceptance probability; 0 turns it off.
    mala_target: 'posterior' or 'loss' (`settings.MALA_TARGETS`).
    diagnostics: record ‖w − w*‖, ‖∇L_B‖ and ‖η‖ at every step.
    block_draws, max_draws: draws per compiled block; with `max_draws`, chains
      continue until converged (`criteria`) or `max_draws` (settings.py).
    sampler: 'sgld', 'rmsprop_sgld' or a factory
      `(step_size, nbeta, localization) -> transformation`.
    criteria: chain-health and convergence thresholds (`diagnostics.HealthCriteria`).
    checkpoint_chunk: pairs (checkpoints × restrictions) per compiled call, or
      "auto" (as many as fit in a device's memory).
    mesh: None, "auto" or a `jax.sharding.Mesh` over the named sweep axes
      checkpoint / restriction / grid / chain / batch (`sampling/mesh.py`).
    batch_axis: the mesh axis that shards each minibatch ("batch" or "data").
    compute_dtype, matmul_precision: the loss's dtype (e.g. "bfloat16"; the chain
      state stays float32) and matmul precision.
    output_dir: resume directory (`sampling/sweep.py`): results of other
      settings, data, checkpoints or losses are never reused.
    checkpoint_ids: names of the checkpoints (e.g. steps).
    chain_strategy: 'vmap', 'map' or 'auto' (map on CPU, vmap elsewhere).
    progress: log progress lines with an ETA at least every 15 s.
    restrict: a weight restriction (refined LLC): one 0/1 mask tree shaped like
      a checkpoint, `(names, masks)` with masks stacked on [R] (e.g.
      `restrict.all_heads(params)`), or a `Restrictions`.
    loss_data: data-refined LLC: sample on `data`, record the losses and L(w*)
      on minibatches of `loss_data`.
    loss_key: with `output_dir`, a name for the loss (and for callable data)
      that changes whenever they do; lambdas need it.

  Returns:
    An `LLCResult` with leading axis [checkpoint] ([restriction, checkpoint]
    with several restrictions), the burn-in and convergence of every entry.
  """
  settings = SamplerSettings(
    num_chains=num_chains,
    num_draws=num_draws,
    step_size=step_size,
    localization=localization,
    nbeta=nbeta,
    batch_size=batch_size,
    seed=seed,
    num_burnin_steps=num_burnin_steps,
    thinning=thinning,
    init_loss_stride=init_loss_stride,
    mala_stride=mala_stride,
    mala_target=mala_target,
    diagnostics=diagnostics,
    block_draws=block_draws,
    max_draws=max_draws,
    compute_dtype=compute_dtype,
    matmul_precision=matmul_precision,
  )
  options = SweepOptions(
    checkpoint_chunk=checkpoint_chunk,
    output_dir=output_dir,
    checkpoint_ids=checkpoint_ids,
    mesh=mesh,
    batch_axis=batch_axis,
    chain_strategy=chain_strategy,
    progress=progress,
    loss_key=loss_key,
  )
  return estimate(
    loss_fn,
    checkpoints,
    data,
    settings,
    options,
    sampler=sampler,
    restrictions=_restrictions(restrict),
    loss_data=loss_data,
    criteria=criteria,
  )


def estimate_llc(
  loss_fn: LossFn,
  params: Params,
  data: Any,
  *,
  num_chains: int,
  num_draws: int,
  step_size: float,
  localization: float,
  nbeta: float,
  batch_size: int,
  seed: int = 0,
  num_burnin_steps: int | str = "auto",
  **kwargs,
) -> results_lib.LLCResult:
  """The LLC of one checkpoint; see `estimate_llcs` for the arguments.

  Returns an `LLCResult` without a checkpoint axis (`llc_per_chain` [C],
  `loss_trace` [C, draws]).
  """
  res = estimate_llcs(
    loss_fn,
    [params],
    data,
    num_chains=num_chains,
    num_draws=num_draws,
    step_size=step_size,
    localization=localization,
    nbeta=nbeta,
    batch_size=batch_size,
    seed=seed,
    num_burnin_steps=num_burnin_steps,
    **{"progress": False, **kwargs},
  )
  return res.select(0)
