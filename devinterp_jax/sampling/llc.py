"""LLC estimation with SGLD for many checkpoints × chains in one program.

    λ̂(w*) = nβ · (E_chain[L_B(w_t)] − L(w*))           (paper eq. 3, App. A.3)

The loss of each recorded step is the minibatch loss already computed for the
SGLD gradient ("recycled" losses). L(w*) (`init_loss`) is the mean of
L_B(w*) over every `init_loss_stride`-th recorded batch of the chain itself,
so it costs a few forward passes and shares the chain's batch noise.

Randomness: chain c uses `fold_in(key(seed), c)`; step t of that chain uses
`fold_in(chain_key, t)` split into a batch key and a noise key. The keys never
depend on the checkpoint, so every checkpoint sees the same minibatches and
the same injected noise (App. A.5.2), and results do not depend on how
checkpoints are chunked.

`estimate_llcs` vmaps over checkpoints and (by default) chains and scans over
steps; checkpoints are processed in chunks of `checkpoint_chunk` (the last
chunk padded so the program compiles once) and, with `output_dir`, each
finished chunk is written atomically so a killed sweep resumes where it
stopped. Chunks live in `output_dir/<fingerprint>/` (`sweep_identity`: the
settings, a digest of the data, the loss's identity) and store a digest of
their checkpoints' params, so no result of other inputs is ever reused. With a
`mesh`, each minibatch is sharded along `batch_axis`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import zipfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from devinterp_jax import atomic
from devinterp_jax.sampling import results as results_lib
from devinterp_jax.sampling import diagnostics as diagnostics_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling import sgld as sgld_lib
from devinterp_jax.storage import chunks as chunks_lib
from devinterp_jax.storage import digest as digest_lib

Params = Any
LossFn = Callable[[Params, Any], jax.Array]
SamplerFactory = Callable[..., optax.GradientTransformationExtraArgs]


# What the MALA acceptance diagnostic tests (`SamplerSettings.mala_target`):
#   'posterior': the sampled potential nβ L_B + (γ/2)‖w − w*‖², the proposal the chain made;
#   'loss': the tempered loss nβ L_B alone, for a Langevin proposal without the
#     localisation drift (same noise). The localisation term is an isotropic Gaussian
#     whose discretisation bias is known in closed form (variance × 1/(1 − εγ/4)); in
#     d ~ 10⁵ dimensions it dominates the 'posterior' acceptance while a chain is still
#     spreading from w* (docs/lm.md), and 'loss' isolates how well ε resolves the loss.
MALA_TARGETS = ("posterior", "loss")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Everything that determines an LLC estimate besides params and data."""

  num_chains: int
  num_draws: int
  step_size: float
  localization: float
  nbeta: float
  batch_size: int
  seed: int = 0
  num_burnin_steps: int = 0
  thinning: int = 1
  init_loss_stride: int = 10
  mala_stride: int = 10
  mala_target: str = "posterior"
  diagnostics: bool = True

  def __post_init__(self):
    for name in ("num_chains", "num_draws", "batch_size", "thinning", "init_loss_stride"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.mala_stride < 0:
      raise ValueError(f"mala_stride must be >= 0 (0 = off), got {self.mala_stride}")
    if self.mala_target not in MALA_TARGETS:
      raise ValueError(f"mala_target must be one of {MALA_TARGETS}, got {self.mala_target!r}")
    if self.num_burnin_steps < 0:
      raise ValueError(f"num_burnin_steps must be >= 0, got {self.num_burnin_steps}")
    for name in ("step_size", "nbeta", "localization"):
      value = getattr(self, name)
      if (isinstance(value, bool) or np.ndim(value) != 0
          or not np.issubdtype(np.asarray(value).dtype, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
      object.__setattr__(self, name, float(value))   # e.g. a jnp.float32 scalar
      if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if self.step_size <= 0:
      raise ValueError(f"step_size must be > 0, got {self.step_size}")
    if self.nbeta <= 0:
      raise ValueError(f"nbeta must be > 0, got {self.nbeta}: with nβ = 0 the chain samples "
                       "the localising Gaussian alone and every LLC is exactly 0")
    if self.localization < 0:
      raise ValueError(f"localization must be >= 0, got {self.localization}")

  @property
  def num_steps(self) -> int:
    return self.num_burnin_steps + self.num_draws * self.thinning

  @property
  def draw_steps(self) -> np.ndarray:
    return self.num_burnin_steps + self.thinning * np.arange(self.num_draws)

  @property
  def init_steps(self) -> np.ndarray:
    return self.draw_steps[::self.init_loss_stride]

  @property
  def mala_steps(self) -> np.ndarray:
    """Steps whose proposal gets a MALA acceptance (every stride-th, after burn-in)."""
    if not self.mala_stride:
      return np.zeros((0,), np.int64)
    steps = np.arange(self.num_steps)
    return steps[(steps >= self.num_burnin_steps) & (steps % self.mala_stride == 0)]


def batch_fn_from_data(data: Any, batch_size: int) -> Callable[[jax.Array], Any]:
  """A pure `key -> minibatch` function over `data`.

  `data` is a pytree of arrays sharing a leading sample axis (minibatches are
  drawn uniformly with replacement: a gather of `batch_size` rows, whose cost
  does not grow with n), or already a callable `key -> batch` (a batch source,
  e.g. one that generates fresh samples or reads data that is not in memory).
  """
  if callable(data):
    return data
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("data is an empty pytree; pass arrays with a leading sample axis")
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
  if len(sizes) != 1 or min(sizes) < 1:
    raise ValueError(f"every data array needs the same leading sample axis; got sizes "
                     f"{sorted(sizes)} for shapes {[np.shape(x) for x in leaves]}")
  n = sizes.pop()

  def batch_fn(key):
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)

  return batch_fn


def _run_chain(params_star: Params, chain_key: jax.Array, hypers: dict[str, jax.Array],
               mask: Params | None = None, *, loss_fn: LossFn, batch_fn: Callable,
               sampler: SamplerFactory, settings: SamplerSettings,
               loss_batch_fn: Callable | None = None) -> dict[str, jax.Array]:
  """One SGLD chain from w* (a restricted chain's w* is its selected coordinates θ*).

  `mask` (0/1, shaped like w*) freezes coordinates: the padding of restrictions
  shorter than the longest one (`restrict.compact`).

  Returns per-step `loss` [S] (and with diagnostics `distance`, `grad_norm`,
  `noise_norm` [S]; with MALA `mala` [S], NaN off the measured steps) and
  `init_loss`, L_B(w*) on the init batches [m].
  """
  transform = sampler(**hypers)
  grad_fn = jax.value_and_grad(loss_fn)
  nbeta, gamma, eps = hypers["nbeta"], hypers["localization"], hypers["step_size"]

  def keys(t):
    return jax.random.split(jax.random.fold_in(chain_key, t))

  def potential(loss, params):
    dist2 = sgld_lib.tree_norm(jax.tree.map(jnp.subtract, params, params_star)) ** 2
    return nbeta * loss + 0.5 * gamma * dist2

  def step(carry, t):
    params, state = carry
    batch_key, noise_key = keys(t)
    batch = batch_fn(batch_key)
    loss, grads = grad_fn(params, batch)
    grads = restrict_lib.apply(mask, grads)      # restricted gradient
    updates, state = transform.update(grads, state, params, params_star=params_star,
                                      noise_key=noise_key)
    updates = restrict_lib.apply(mask, updates)  # restricted noise (w − w* is 0 off the mask)
    proposal = optax.apply_updates(params, updates)
    # Data-refined LLC: the recorded loss is measured on other data (same key).
    out = {"loss": loss if loss_batch_fn is None else loss_fn(params, loss_batch_fn(batch_key))}
    if settings.diagnostics:
      out["distance"] = sgld_lib.tree_norm(jax.tree.map(jnp.subtract, params, params_star))
      out["grad_norm"] = sgld_lib.tree_norm(grads)
      if mask is None:
        out["noise_norm"] = state.noise_norm
      else:  # η = Δw + (ε/2) P ∇U on the selected coordinates
        drift = sgld_lib.potential_grad(grads, params, params_star, nbeta, gamma)
        precond = getattr(state, "precond", None)
        scaled = drift if precond is None else jax.tree.map(jnp.multiply, precond, drift)
        out["noise_norm"] = sgld_lib.tree_norm(jax.tree.map(
            lambda u, d: u + 0.5 * eps * d, updates, restrict_lib.apply(mask, scaled)))
    if settings.mala_stride:
      precond = getattr(state, "precond", None)

      def acceptance():
        if settings.mala_target == "posterior":
          loss_p, grads_p = grad_fn(proposal, batch)  # same minibatch at both points
          log_a = sgld_lib.mala_log_acceptance(
              params, proposal, potential(loss, params), potential(loss_p, proposal),
              sgld_lib.potential_grad(grads, params, params_star, nbeta, gamma),
              sgld_lib.potential_grad(grads_p, proposal, params_star, nbeta, gamma),
              eps, precond)
        else:  # the same step without the localisation drift, tested against nβ L_B
          shift = jax.tree.map(lambda w, w0: gamma * (w - w0), params, params_star)
          if precond is not None:
            shift = jax.tree.map(jnp.multiply, precond, shift)
          shift = restrict_lib.apply(mask, shift)
          target = jax.tree.map(lambda w, d: (w + 0.5 * eps * d).astype(w.dtype),
                                proposal, shift)
          loss_p, grads_p = grad_fn(target, batch)
          grads_p = restrict_lib.apply(mask, grads_p)
          log_a = sgld_lib.mala_log_acceptance(
              params, target, nbeta * loss, nbeta * loss_p,
              jax.tree.map(lambda g: nbeta * g, grads),
              jax.tree.map(lambda g: nbeta * g, grads_p), eps, precond)
        return jnp.exp(log_a).astype(jnp.float32)
      measure = (t % settings.mala_stride == 0) & (t >= settings.num_burnin_steps)
      out["mala"] = jax.lax.cond(measure, acceptance, lambda: jnp.float32(jnp.nan))
    return (proposal, state), out

  carry = (params_star, transform.init(params_star))
  _, out = jax.lax.scan(step, carry, jnp.arange(settings.num_steps))
  init_batch_fn = batch_fn if loss_batch_fn is None else loss_batch_fn
  out["init_loss"] = jax.lax.map(lambda t: loss_fn(params_star, init_batch_fn(keys(t)[0])),
                                 jnp.asarray(settings.init_steps))
  return out


def _sweep_fn(loss_fn, batch_fn, sampler, settings, chain_strategy, loss_batch_fn=None,
              leaves: tuple[int, ...] | None = None):
  """(stacked params [N, ...], hypers, restriction) -> {name: [N, C, ...]} (see `_run_chain`).

  `restriction` is None or one restriction's `(index [k], valid [k] | None)`
  into the union vector of `leaves` (`restrict.compact`): the chains then
  sample only those k coordinates θ and the model sees `embed(w*, θ)`.
  """
  chain_keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.key(settings.seed), c))(
      jnp.arange(settings.num_chains))

  def one_checkpoint(params_star, hypers, restriction):
    start, lf, valid = params_star, loss_fn, None
    if restriction is not None:
      index, valid = restriction
      start = restrict_lib.gather(params_star, leaves, index)
      lf = lambda theta, batch: loss_fn(
          restrict_lib.embed(params_star, leaves, index, theta, start), batch)
    run = lambda k: _run_chain(start, k, hypers, valid, loss_fn=lf, batch_fn=batch_fn,
                               sampler=sampler, settings=settings,
                               loss_batch_fn=loss_batch_fn)
    if chain_strategy == "vmap":
      return jax.vmap(run)(chain_keys)
    return jax.lax.map(run, chain_keys)

  return jax.vmap(one_checkpoint, in_axes=(0, None, None))


def _resolve_chain_strategy(strategy: str) -> str:
  if strategy not in ("auto", "vmap", "map"):
    raise ValueError(f"chain_strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
  if strategy == "auto":
    # Measured by benchmarks/llc_throughput.py: on CPU, vmapped chains lose to
    # a sequential map for transformer-sized models; accelerators want vmap.
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return strategy


class ChunkError(ValueError):
  """A saved chunk of an LLC sweep is unreadable or does not match its sweep."""


def _data_identity(data: Any) -> str | None:
  """Digest of array data, or the identity of a batch-source callable (None: none)."""
  if callable(data):
    ident = digest_lib.callable_identity(data)
    return None if ident is None else f"callable:{ident}"
  return "arrays:" + digest_lib.tree_digest(data)


def sweep_identity(settings: SamplerSettings, *, loss_fn: LossFn, data: Any,
                   loss_data: Any = None, loss_key: str | None = None, sampler: str,
                   chunk: int, ids: Sequence[Any], restrictions: list[str] | None = None,
                   masks: Any = None) -> dict[str, Any]:
  """Everything besides the params that determines a sweep's numbers.

  The sampler settings and name, the chunking and checkpoint ids, a digest of
  `data` (and `loss_data`), the restriction masks, and the identity of the
  loss: `loss_key` (a user-supplied name, used alone when given) or else
  `digest.callable_identity`. Raises when neither identifies the loss or a
  callable data source.
  """
  loss_id = None if loss_key is not None else digest_lib.callable_identity(loss_fn)
  if loss_id is None and loss_key is None:
    raise ValueError(
        f"resuming from output_dir needs an identity of the loss, and {loss_fn!r} has none "
        f"that a rerun could match (a lambda, or a closure over objects without a stable "
        f"value). Pass loss_key='<a name that changes whenever the loss does>' or a named "
        f"function.")
  out = {"settings": dataclasses.asdict(settings), "sampler": sampler, "chunk": int(chunk),
         "ids": [str(i) for i in ids], "loss": {"key": loss_key, "function": loss_id}}
  for field, value in (("data", data), ("loss_data", loss_data)):
    if value is None:
      continue
    ident = ("callable:key" if callable(value) and loss_key is not None
             else _data_identity(value))
    if ident is None and loss_key is None:
      raise ValueError(
          f"resuming from output_dir needs an identity of {field}, and the batch source "
          f"{value!r} has none that a rerun could match. Pass loss_key='<a name that "
          f"changes whenever the loss or the data do>'.")
    out[field] = ident
  if masks is not None:
    out["restrictions"] = list(restrictions or [])
    out["restriction_digest"] = digest_lib.tree_digest(masks)
  return out


def _fingerprint(identity: dict) -> str:
  blob = json.dumps(identity, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_chunk(path: str, fingerprint: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as z:
      contents = {k: z[k] for k in z.files}
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ChunkError(f"{path} is unreadable ({type(e).__name__}: {e}): this saved chunk of "
                     f"the LLC sweep is damaged. Delete it and rerun; the sweep recomputes "
                     f"that chunk.") from None
  if ("fingerprint" not in contents or str(contents["fingerprint"]) != fingerprint
      or "params_digest" not in contents):
    raise ChunkError(f"{path} holds results of another sweep than its directory names "
                     f"(fingerprint {contents.get('fingerprint')!s} vs {fingerprint}). Delete "
                     f"it and rerun; the sweep recomputes that chunk.")
  return contents


def _require_arrays(params: Params) -> None:
  if not jax.tree.leaves(params):
    raise ValueError("the checkpoint params hold no arrays (an empty pytree): pass the "
                     "model's params, e.g. a dict of weight arrays")


def _check_finite(params: Params, ids: Sequence[Any]) -> None:
  """Names the checkpoints whose params hold NaN or inf (w* must be finite)."""
  bad = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(leaf)
    finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    for i in np.flatnonzero(~finite):
      if i < len(ids):
        bad.setdefault(ids[i], []).append(
            f"{jax.tree_util.keystr(path)} ({int(np.isnan(x[i]).sum())} NaN, "
            f"{int(np.isinf(x[i]).sum())} inf)")
  if bad:
    raise ValueError("non-finite w*: " + "; ".join(
        f"checkpoint {c} has non-finite params in {', '.join(leaves)}"
        for c, leaves in bad.items()) + ". An LLC needs finite params at the checkpoint; "
        "check how they were produced (a diverged training run, a corrupted file).")


def _auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axis types.

  The sweep places minibatches with `with_sharding_constraint`, which needs
  Auto axes; meshes made by `jax.make_mesh` default to Explicit axes in recent
  JAX versions.
  """
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older JAX: every axis is Auto
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def make_llc_program(loss_fn: LossFn, data: Any, settings: SamplerSettings, *,
                     sampler: str | SamplerFactory = "sgld", mesh: Mesh | None = None,
                     batch_axis: str = "data", chain_strategy: str = "auto",
                     grid: bool = False, restricted: bool = False, loss_data: Any = None):
  """The jitted sweep `(stacked_params, hypers) -> {name: [N, C, ...]}`.

  With `restricted=True` the program is `(stacked_params, hypers, masks)` with
  0/1 masks (`sampling/restrict.py`) on a leading [R] axis, and every output
  gains a leading [R] axis: all restrictions (e.g. all heads) in one program.
  With `loss_data`, SGLD samples on `data` but the recorded losses and L(w*)
  are measured on minibatches of `loss_data` (data-refined LLC).

  `hypers` is a dict of the sampler factory's arguments (`step_size`, `nbeta`,
  `localization`; traced, so changing them does not recompile). With
  `grid=True` every hyperparameter has a leading axis [G] and the outputs gain
  a leading [G] axis: a whole calibration grid in one program. Call the
  program repeatedly to reuse the compilation.
  """
  strategy = _resolve_chain_strategy(chain_strategy)
  sampler = sgld_lib.get_sampler(sampler)
  batch_fn = batch_fn_from_data(data, settings.batch_size)
  if mesh is not None:
    if batch_axis not in mesh.axis_names:
      raise ValueError(f"batch_axis {batch_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if settings.batch_size % mesh.shape[batch_axis]:
      raise ValueError(f"batch_size {settings.batch_size} is not divisible by the "
                       f"{mesh.shape[batch_axis]} devices of mesh axis {batch_axis!r}")
    mesh = _auto_mesh(mesh)
    if not callable(data):
      batch_fn = batch_fn_from_data(jax.device_put(data, NamedSharding(mesh, P())),
                                    settings.batch_size)
    batch_sharding = NamedSharding(mesh, P(batch_axis))
    unsharded_batch_fn = batch_fn
    batch_fn = lambda key: jax.lax.with_sharding_constraint(unsharded_batch_fn(key),
                                                            batch_sharding)
  loss_batch_fn = None
  if loss_data is not None:
    loss_batch_fn = batch_fn_from_data(loss_data, settings.batch_size)
    if mesh is not None:
      unsharded_loss_batch_fn = loss_batch_fn
      loss_batch_fn = lambda key: jax.lax.with_sharding_constraint(
          unsharded_loss_batch_fn(key), NamedSharding(mesh, P(batch_axis)))
  if restricted:
    if grid:
      raise ValueError("grid=True and restricted=True cannot be combined")
    return _restricted_program(loss_fn, batch_fn, sampler, settings, strategy, loss_batch_fn)
  sweep3 = _sweep_fn(loss_fn, batch_fn, sampler, settings, strategy, loss_batch_fn)
  sweep = lambda params, hypers: sweep3(params, hypers, None)
  if grid:
    if strategy == "map":
      sweep_one = sweep
      sweep = lambda params, hypers: jax.lax.map(lambda h: sweep_one(params, h), hypers)
    else:
      sweep = jax.vmap(sweep, in_axes=(None, 0))
  return jax.jit(sweep)


def _restricted_program(loss_fn, batch_fn, sampler, settings, strategy, loss_batch_fn):
  """`(stacked_params, hypers, masks [R, ...]) -> {name: [R, N, C, ...]}`.

  The masks are turned into gather indices on the host (`restrict.compact`);
  one compiled program per set of touched leaves and restriction size.
  """
  compiled = {}

  def program(params, hypers, masks):
    comp = restrict_lib.compact(masks)
    key = (comp.leaves, comp.index.shape, comp.valid is None)
    if key not in compiled:
      sweep3 = _sweep_fn(loss_fn, batch_fn, sampler, settings, strategy, loss_batch_fn,
                         leaves=comp.leaves)
      if strategy == "map":
        sweep = lambda p, h, r: jax.lax.map(lambda ri: sweep3(p, h, ri), r)
      else:
        sweep = jax.vmap(sweep3, in_axes=(None, None, 0))
      compiled[key] = jax.jit(sweep)
    return compiled[key](params, hypers, (comp.index, comp.valid))

  return program


def num_sampled_params(params: Params, leading_axes: int = 0) -> int:
  """Number of coordinates d of one checkpoint (ignoring `leading_axes` stacked axes)."""
  return int(sum(np.prod(np.shape(x)[leading_axes:]) for x in jax.tree.leaves(params)))


def sampler_name(sampler: str | SamplerFactory) -> str:
  if isinstance(sampler, str):
    return sampler
  func = getattr(sampler, "func", sampler)  # functools.partial
  kw = getattr(sampler, "keywords", None)
  return getattr(func, "__name__", repr(func)) + (f"{sorted(kw.items())}" if kw else "")


def results_from_outputs(outputs: dict[str, np.ndarray], settings: SamplerSettings,
                         nbeta: float, *, num_params: int, labels: list[str] | None,
                         criteria: diagnostics_lib.HealthCriteria, extra_settings: dict
                         ) -> results_lib.LLCResult:
  """An LLCResult from the program's outputs [..., C, S] (any leading axes)."""
  draws = settings.draw_steps
  get = lambda name: outputs[name][..., draws] if name in outputs else None
  mala = outputs["mala"][..., settings.mala_steps] if "mala" in outputs else None
  return results_lib.summarize(
      outputs["loss"][..., draws], outputs["init_loss"], nbeta,
      settings={**dataclasses.asdict(settings), **extra_settings}, labels=labels,
      num_params=num_params, mala=mala, distance=get("distance"),
      grad_norm=get("grad_norm"), noise_norm=get("noise_norm"), criteria=criteria)


def estimate_llcs(loss_fn: LossFn, checkpoints: Sequence[Params] | Params, data: Any, *,
                  num_chains: int, num_draws: int, step_size: float, localization: float,
                  nbeta: float, batch_size: int, seed: int = 0, num_burnin_steps: int = 0,
                  thinning: int = 1, init_loss_stride: int = 10, mala_stride: int = 10,
                  mala_target: str = "posterior", diagnostics: bool = True,
                  sampler: str | SamplerFactory = "sgld",
                  criteria: diagnostics_lib.HealthCriteria | None = None,
                  checkpoint_chunk: int | None = None,
                  mesh: Mesh | None = None, batch_axis: str = "data",
                  output_dir: str | None = None, checkpoint_ids: Sequence[Any] | None = None,
                  chain_strategy: str = "auto", progress: bool = True,
                  restrict: Any = None, loss_data: Any = None,
                  loss_key: str | None = None) -> results_lib.LLCResult:
  """LLCs of many checkpoints × chains in one compiled program, with chain diagnostics.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar` mean loss (any framework).
    checkpoints: a list (any `Sequence`, possibly lazy like `ParamsSequence`)
      of param pytrees of one structure and shape, or one stacked pytree with a
      leading checkpoint axis whose top level is not a list or tuple (wrap a
      list-shaped stacked pytree in a dict).
    data: pytree of arrays with a leading sample axis, or a `key -> batch`
      callable (see `batch_fn_from_data`).
    num_chains, num_draws: chains per checkpoint and recorded draws per chain.
    step_size, localization, nbeta: ε, γ and nβ of the update (units in
      `sampling/sgld.py`; nβ helpers in `sampling/temperature.py`).
    batch_size: SGLD minibatch size.
    seed: chain c uses fold_in(key(seed), c), identical at every checkpoint.
    num_burnin_steps, thinning: steps before the first draw; steps per draw.
    init_loss_stride: L(w*) uses every stride-th recorded batch.
    mala_stride: every stride-th step also evaluates the proposal on the same
      minibatch for a MALA acceptance probability (one extra forward+backward
      pass per stride steps); 0 turns it off.
    mala_target: 'posterior' (the sampled potential, default) or 'loss' (nβ L_B
      alone; see MALA_TARGETS).
    diagnostics: record ‖w − w*‖, ‖∇L_B‖ and ‖η‖ at every step.
    sampler: 'sgld', 'rmsprop_sgld' or a factory
      `(step_size, nbeta, localization) -> transformation` (e.g. a
      `functools.partial` of `rmsprop_sgld` with other `alpha`, `eps`).
    criteria: chain-health thresholds (`diagnostics.HealthCriteria`).
    checkpoint_chunk: checkpoints per compiled call (bounds memory; results
      are identical for any chunking). Default: all at once.
    mesh, batch_axis: shard each minibatch along this mesh axis.
    output_dir: write each finished chunk atomically here and reuse chunks
      already there (resume). Chunks live in `output_dir/<fingerprint>/`,
      where the fingerprint covers the sampler settings, the chunking and ids,
      a digest of `data` and `loss_data`, the restrictions and the identity
      of the loss; each chunk also stores a digest of its checkpoints' params,
      so results of other data, checkpoints or losses are never reused.
    checkpoint_ids: names of the checkpoints (e.g. steps) for warnings and
      the resume fingerprint.
    chain_strategy: 'vmap' (batched chains), 'map' (sequential chains inside
      the program) or 'auto' (map on CPU, vmap elsewhere; see the benchmark).
    progress: log a line with ETA after each chunk.
    restrict: a weight restriction (refined LLC): one 0/1 mask tree shaped like
      a checkpoint (`sampling/restrict.py`: `by_head`, `by_pattern`, …), or
      `(names, masks)` with masks stacked on a leading [R] axis (e.g.
      `restrict.all_heads(params)`), estimated together in one program with the
      same noise and minibatches. SGLD then moves only the selected coordinates;
      d in the health criteria is the number selected.
    loss_data: data-refined LLC: sample on `data`, but record the losses and
      L(w*) on minibatches of `loss_data` (same form as `data`; one extra
      forward pass per step). Default: `data` itself.
    loss_key: with `output_dir`, a name for the loss (and for callable data)
      that changes whenever they do. Named functions and methods of
      dataclasses (e.g. Flax modules) are identified without it; a lambda or
      a closure over objects without a stable value needs it.

  Returns:
    An `LLCResult` with leading axis [checkpoint] ([restriction, checkpoint]
    with several restrictions). Diverged chains are excluded from the mean and
    named in a warning; every chain has a health status.
  """
  settings = SamplerSettings(num_chains=num_chains, num_draws=num_draws, step_size=step_size,
                             localization=localization, nbeta=nbeta, batch_size=batch_size,
                             seed=seed, num_burnin_steps=num_burnin_steps, thinning=thinning,
                             init_loss_stride=init_loss_stride, mala_stride=mala_stride,
                             mala_target=mala_target, diagnostics=diagnostics)
  criteria = criteria or diagnostics_lib.HealthCriteria()
  strategy = _resolve_chain_strategy(chain_strategy)
  if isinstance(checkpoints, Sequence):
    if len(checkpoints) == 0:
      raise ValueError("checkpoints is empty")
    num_ckpts, get = len(checkpoints), (lambda lo, hi: chunks_lib.stack(checkpoints[lo:hi], lo))
  else:
    _require_arrays(checkpoints)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(checkpoints)}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"stacked checkpoints need one leading axis size, got "
                       f"{sorted(map(str, sizes))}")
    num_ckpts = sizes.pop()
    get = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], checkpoints)
  if checkpoint_ids is not None and len(checkpoint_ids) != num_ckpts:
    raise ValueError(f"{len(checkpoint_ids)} checkpoint_ids for {num_ckpts} checkpoints")
  ids = list(checkpoint_ids) if checkpoint_ids is not None else list(range(num_ckpts))
  chunk = chunks_lib.chunk_size(num_ckpts, checkpoint_chunk)

  masks, restriction_names, single = None, None, False
  if restrict is not None:
    if isinstance(restrict, tuple) and len(restrict) == 2 and isinstance(restrict[0], list):
      restriction_names, masks = restrict
      restrict_lib.check_binary(masks)
      masks = jax.tree.map(lambda x: np.asarray(x, np.float32), masks)
    else:
      restrict_lib.check_binary(restrict)
      masks, single = restrict_lib.stack([restrict]), True
      restriction_names = ["restricted"]
    counts = restrict_lib.num_selected(masks, leading_axes=1)
    if np.any(counts == 0):
      raise ValueError(f"restrictions {[n for n, c in zip(restriction_names, counts) if c == 0]} "
                       "select no coordinate")
  program = make_llc_program(loss_fn, data, settings, sampler=sampler, mesh=mesh,
                             batch_axis=batch_axis, chain_strategy=strategy,
                             restricted=masks is not None, loss_data=loss_data)
  hypers = {"step_size": jnp.float32(step_size), "nbeta": jnp.float32(nbeta),
            "localization": jnp.float32(localization)}
  name = sampler_name(sampler)
  axis = 0 if masks is None else 1   # the checkpoint axis of the outputs
  sweep_dir = fingerprint = None
  if output_dir:
    identity = sweep_identity(settings, loss_fn=loss_fn, data=data, loss_data=loss_data,
                              loss_key=loss_key, sampler=name, chunk=chunk, ids=ids,
                              restrictions=restriction_names, masks=masks)
    fingerprint = _fingerprint(identity)
    sweep_dir = os.path.join(output_dir, fingerprint)
    _note_other_sweeps(output_dir, fingerprint)
    if not os.path.exists(os.path.join(sweep_dir, "sweep.json")):
      atomic.write_text(os.path.join(sweep_dir, "sweep.json"),
                        json.dumps(identity, indent=1, default=str))

  starts = list(range(0, num_ckpts, chunk))
  outputs: list[dict[str, np.ndarray]] = []
  num_params = None
  t0, computed = time.time(), 0
  for i, lo in enumerate(starts):
    hi = min(lo + chunk, num_ckpts)
    params = get(lo, hi)
    _require_arrays(params)
    _check_finite(params, ids[lo:hi])
    if masks is not None and num_params is None:  # the first chunk loaded or computed
      restrict_lib.check(masks, jax.tree.map(lambda x: x[0], params), leading_axes=1)
    path = os.path.join(sweep_dir, f"llc_chunk_{i:05d}.npz") if sweep_dir else None
    digests = None
    if path:
      digests = np.array([digest_lib.tree_digest(jax.tree.map(lambda x: x[j], params))
                          for j in range(hi - lo)])
      if os.path.exists(path):
        z = _load_chunk(path, fingerprint)
        changed = [ids[lo + j] for j in np.flatnonzero(z["params_digest"] != digests)]
        if not changed:
          outputs.append({k: v for k, v in z.items()
                          if k not in ("fingerprint", "num_params", "params_digest")})
          num_params = int(z["num_params"])
          continue
        logging.warning("%s was computed on other params for checkpoints %s (they changed "
                        "since); recomputing it", path, changed)
    num_params = num_sampled_params(params, leading_axes=1)
    params = chunks_lib.pad(params, chunk)  # one shape for every call: one compilation
    raw = program(params, hypers) if masks is None else program(params, hypers, masks)
    out = {k: np.take(v, np.arange(hi - lo), axis=axis)
           for k, v in jax.device_get(raw).items()}
    if path:
      atomic.save_npz(path, fingerprint=np.array(fingerprint), num_params=np.array(num_params),
                      params_digest=digests, **out)
    outputs.append(out)
    computed += hi - lo
    if progress:
      elapsed = time.time() - t0
      remaining = num_ckpts - hi
      num_r = 1 if masks is None else len(restriction_names)
      rate = computed * num_r * settings.num_chains * settings.num_steps / max(elapsed, 1e-9)
      logging.info("LLC chunk %d/%d (checkpoints %d-%d): %.0f %schain-steps/s, ETA %.0fs",
                   i + 1, len(starts), lo, hi - 1, rate,
                   "" if masks is None else "restriction-", remaining * elapsed / max(computed, 1))
  merged = {k: np.concatenate([o[k] for o in outputs], axis=axis) for k in outputs[0]}
  extra_settings = {"chain_strategy": strategy, "checkpoint_chunk": chunk, "sampler": name,
                    "data_refined": loss_data is not None}
  if fingerprint is not None:
    extra_settings["fingerprint"] = fingerprint
  labels = [f"checkpoint {c}" for c in ids]
  if masks is not None:
    num_params = counts.reshape(-1, 1, 1)  # d per restriction, broadcast over [R, N, C]
    labels = [f"{r} checkpoint {c}" for r in restriction_names for c in ids]
    extra_settings["restrictions"] = restriction_names
    if single:
      merged = {k: v[0] for k, v in merged.items()}
      num_params, labels = int(counts[0]), labels[:num_ckpts]
  return results_from_outputs(
      merged, settings, nbeta, num_params=num_params, labels=labels, criteria=criteria,
      extra_settings=extra_settings)


def _note_other_sweeps(output_dir: str, fingerprint: str) -> None:
  """Logs the other sweeps kept in `output_dir` (other settings, data or loss)."""
  if not os.path.isdir(output_dir):
    return
  entries = os.listdir(output_dir)
  legacy = [e for e in entries if e.startswith("llc_chunk_") and e.endswith(".npz")]
  if legacy:
    logging.warning("%s holds %d chunks of an older layout without a fingerprint of the data, "
                    "params and loss; they are not reused", output_dir, len(legacy))
  others = [e for e in entries if e != fingerprint and
            os.path.exists(os.path.join(output_dir, e, "sweep.json"))]
  if others:
    logging.info("%s also holds %d sweeps of other settings, data or loss (kept apart): %s",
                 output_dir, len(others), ", ".join(sorted(others)))


def estimate_llc(loss_fn: LossFn, params: Params, data: Any, *, num_chains: int,
                 num_draws: int, step_size: float, localization: float, nbeta: float,
                 batch_size: int, seed: int = 0, num_burnin_steps: int = 0,
                 **kwargs) -> results_lib.LLCResult:
  """The LLC of one checkpoint; see `estimate_llcs` for the arguments.

  Returns an `LLCResult` without a checkpoint axis (`llc_per_chain` [C],
  `loss_trace` [C, draws]).
  """
  res = estimate_llcs(loss_fn, [params], data, num_chains=num_chains, num_draws=num_draws,
                      step_size=step_size, localization=localization, nbeta=nbeta,
                      batch_size=batch_size, seed=seed, num_burnin_steps=num_burnin_steps,
                      **{"progress": False, **kwargs})
  return dataclasses.replace(res, **{
      f.name: getattr(res, f.name)[0] for f in dataclasses.fields(res)
      if f.name != "settings" and getattr(res, f.name) is not None})
