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
stopped. With a `mesh`, each minibatch is sharded along `batch_axis`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from devinterp_jax import atomic
from devinterp_jax.sampling import results as results_lib
from devinterp_jax.sampling.sgld import sgld

Params = Any
LossFn = Callable[[Params, Any], jax.Array]
SamplerFactory = Callable[..., optax.GradientTransformationExtraArgs]


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

  def __post_init__(self):
    for name in ("num_chains", "num_draws", "batch_size", "thinning", "init_loss_stride"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_burnin_steps < 0:
      raise ValueError(f"num_burnin_steps must be >= 0, got {self.num_burnin_steps}")
    if self.step_size <= 0:
      raise ValueError(f"step_size must be > 0, got {self.step_size}")
    if self.nbeta < 0 or self.localization < 0:
      raise ValueError(f"nbeta and localization must be >= 0, got "
                       f"{self.nbeta}, {self.localization}")

  @property
  def num_steps(self) -> int:
    return self.num_burnin_steps + self.num_draws * self.thinning

  @property
  def draw_steps(self) -> np.ndarray:
    return self.num_burnin_steps + self.thinning * np.arange(self.num_draws)

  @property
  def init_steps(self) -> np.ndarray:
    return self.draw_steps[::self.init_loss_stride]


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
               *, loss_fn: LossFn, batch_fn: Callable, sampler: SamplerFactory,
               settings: SamplerSettings) -> tuple[jax.Array, jax.Array]:
  """One SGLD chain from w*; returns losses [num_steps] and L_B(w*) [n_init]."""
  transform = sampler(**hypers)
  grad_fn = jax.value_and_grad(loss_fn)

  def keys(t):
    return jax.random.split(jax.random.fold_in(chain_key, t))

  def step(carry, t):
    params, state = carry
    batch_key, noise_key = keys(t)
    loss, grads = grad_fn(params, batch_fn(batch_key))
    updates, state = transform.update(grads, state, params, params_star=params_star,
                                      noise_key=noise_key)
    return (optax.apply_updates(params, updates), state), loss

  carry = (params_star, transform.init(params_star))
  _, losses = jax.lax.scan(step, carry, jnp.arange(settings.num_steps))
  init_losses = jax.lax.map(lambda t: loss_fn(params_star, batch_fn(keys(t)[0])),
                            jnp.asarray(settings.init_steps))
  return losses, init_losses


def _sweep_fn(loss_fn, batch_fn, sampler, settings, chain_strategy):
  """(stacked params [N, ...], hypers) -> (losses [N, C, S], init [N, C, m])."""
  chain_keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.key(settings.seed), c))(
      jnp.arange(settings.num_chains))
  run = lambda p, k, h: _run_chain(p, k, h, loss_fn=loss_fn, batch_fn=batch_fn,
                                   sampler=sampler, settings=settings)

  def one_checkpoint(params_star, hypers):
    if chain_strategy == "vmap":
      return jax.vmap(run, in_axes=(None, 0, None))(params_star, chain_keys, hypers)
    return jax.lax.map(lambda k: run(params_star, k, hypers), chain_keys)

  return jax.vmap(one_checkpoint, in_axes=(0, None))


def _resolve_chain_strategy(strategy: str) -> str:
  if strategy not in ("auto", "vmap", "map"):
    raise ValueError(f"chain_strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
  if strategy == "auto":
    # Measured by benchmarks/llc_throughput.py: on CPU, vmapped chains lose to
    # a sequential map for transformer-sized models; accelerators want vmap.
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return strategy


def _stack(trees: Sequence[Params], first_index: int = 0) -> Params:
  """Stacks checkpoints on a new leading axis; names any that does not fit."""
  ref = jax.tree.structure(trees[0])
  ref_shapes = [np.shape(x) for x in jax.tree.leaves(trees[0])]
  for i, tree in enumerate(trees[1:], start=1):
    if jax.tree.structure(tree) != ref:
      raise ValueError(f"checkpoint {first_index + i} has another pytree structure than "
                       f"checkpoint {first_index}: {jax.tree.structure(tree)} vs {ref}")
    shapes = [np.shape(x) for x in jax.tree.leaves(tree)]
    if shapes != ref_shapes:
      bad = next(j for j, (a, b) in enumerate(zip(shapes, ref_shapes)) if a != b)
      raise ValueError(f"checkpoint {first_index + i} has leaf {bad} of shape {shapes[bad]}, "
                       f"checkpoint {first_index} has {ref_shapes[bad]}")
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _fingerprint(settings: SamplerSettings, extra: dict) -> str:
  blob = json.dumps({**dataclasses.asdict(settings), **extra}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
                     sampler: SamplerFactory = sgld, mesh: Mesh | None = None,
                     batch_axis: str = "data", chain_strategy: str = "auto"):
  """The jitted sweep `(stacked_params, hypers) -> (losses [N, C, S], init [N, C, m])`.

  `hypers` is a dict of the sampler factory's arguments (traced, so changing
  them does not recompile). Call it repeatedly to reuse the compilation.
  """
  strategy = _resolve_chain_strategy(chain_strategy)
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
  return jax.jit(_sweep_fn(loss_fn, batch_fn, sampler, settings, strategy))


def estimate_llcs(loss_fn: LossFn, checkpoints: Sequence[Params] | Params, data: Any, *,
                  num_chains: int, num_draws: int, step_size: float, localization: float,
                  nbeta: float, batch_size: int, seed: int = 0, num_burnin_steps: int = 0,
                  thinning: int = 1, init_loss_stride: int = 10,
                  sampler: SamplerFactory = sgld, checkpoint_chunk: int | None = None,
                  mesh: Mesh | None = None, batch_axis: str = "data",
                  output_dir: str | None = None, checkpoint_ids: Sequence[Any] | None = None,
                  chain_strategy: str = "auto", progress: bool = True) -> results_lib.LLCResult:
  """LLCs of many checkpoints × chains in one compiled program.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar` mean loss (any framework).
    checkpoints: a list (any `Sequence`, possibly lazy like `ParamsSequence`)
      of param pytrees of one structure and shape, or one stacked pytree with a
      leading checkpoint axis whose top level is not a list or tuple (wrap a
      list-shaped stacked pytree in a dict).
    data: pytree of arrays with a leading sample axis, or a `key -> batch`
      callable (see `batch_fn_from_data`).
    num_chains, num_draws: chains per checkpoint and recorded draws per chain.
    step_size, localization, nbeta: ε, γ and nβ of the SGLD update.
    batch_size: SGLD minibatch size.
    seed: chain c uses fold_in(key(seed), c), identical at every checkpoint.
    num_burnin_steps, thinning: steps before the first draw; steps per draw.
    init_loss_stride: L(w*) uses every stride-th recorded batch.
    sampler: factory `(step_size, nbeta, localization) -> transformation`.
    checkpoint_chunk: checkpoints per compiled call (bounds memory; results
      are identical for any chunking). Default: all at once.
    mesh, batch_axis: shard each minibatch along this mesh axis.
    output_dir: write each finished chunk atomically here and reuse chunks
      already there (resume). Stale chunks from other settings are refused.
    checkpoint_ids: names of the checkpoints (e.g. steps) for warnings and
      the resume fingerprint.
    chain_strategy: 'vmap' (batched chains), 'map' (sequential chains inside
      the program) or 'auto' (map on CPU, vmap elsewhere; see the benchmark).
    progress: log a line with ETA after each chunk.

  Returns:
    An `LLCResult` with leading axis [checkpoint].
  """
  settings = SamplerSettings(num_chains=num_chains, num_draws=num_draws, step_size=step_size,
                             localization=localization, nbeta=nbeta, batch_size=batch_size,
                             seed=seed, num_burnin_steps=num_burnin_steps, thinning=thinning,
                             init_loss_stride=init_loss_stride)
  strategy = _resolve_chain_strategy(chain_strategy)
  if isinstance(checkpoints, Sequence):
    if len(checkpoints) == 0:
      raise ValueError("checkpoints is empty")
    num_ckpts, get = len(checkpoints), (lambda lo, hi: _stack(checkpoints[lo:hi], lo))
  else:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(checkpoints)}
    if len(sizes) != 1:
      raise ValueError(f"stacked checkpoints need one leading axis size, got {sorted(sizes)}")
    num_ckpts = sizes.pop()
    get = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], checkpoints)
  if checkpoint_ids is not None and len(checkpoint_ids) != num_ckpts:
    raise ValueError(f"{len(checkpoint_ids)} checkpoint_ids for {num_ckpts} checkpoints")
  ids = list(checkpoint_ids) if checkpoint_ids is not None else list(range(num_ckpts))
  chunk = num_ckpts if checkpoint_chunk is None else int(checkpoint_chunk)
  if chunk < 1:
    raise ValueError(f"checkpoint_chunk must be >= 1, got {checkpoint_chunk}")
  chunk = min(chunk, num_ckpts)

  program = make_llc_program(loss_fn, data, settings, sampler=sampler, mesh=mesh,
                             batch_axis=batch_axis, chain_strategy=strategy)
  hypers = {"step_size": jnp.float32(step_size), "nbeta": jnp.float32(nbeta),
            "localization": jnp.float32(localization)}
  fingerprint = _fingerprint(settings, {"chunk": chunk, "ids": ids, "sampler": getattr(
      sampler, "__name__", repr(sampler))})

  starts = list(range(0, num_ckpts, chunk))
  losses, inits = [], []
  t0, computed = time.time(), 0
  for i, lo in enumerate(starts):
    hi = min(lo + chunk, num_ckpts)
    path = os.path.join(output_dir, f"llc_chunk_{i:05d}.npz") if output_dir else None
    if path and os.path.exists(path):
      with np.load(path) as z:
        if str(z["fingerprint"]) != fingerprint:
          raise ValueError(f"{path} holds results of other settings or checkpoints; "
                           f"remove {output_dir} or use another output_dir")
        losses.append(z["losses"])
        inits.append(z["init_losses"])
      continue
    params = get(lo, hi)
    if hi - lo < chunk:  # pad so every call has the same shape: one compilation
      params = jax.tree.map(lambda x: np.concatenate(
          [x, np.repeat(x[-1:], chunk - (hi - lo), axis=0)]), params)
    chunk_losses, chunk_inits = jax.device_get(program(params, hypers))
    chunk_losses, chunk_inits = chunk_losses[:hi - lo], chunk_inits[:hi - lo]
    if path:
      atomic.save_npz(path, losses=chunk_losses, init_losses=chunk_inits,
                                  fingerprint=np.array(fingerprint))
    losses.append(chunk_losses)
    inits.append(chunk_inits)
    computed += hi - lo
    if progress:
      elapsed = time.time() - t0
      remaining = num_ckpts - hi
      rate = computed * settings.num_chains * settings.num_steps / max(elapsed, 1e-9)
      logging.info("LLC chunk %d/%d (checkpoints %d-%d): %.0f chain-steps/s, ETA %.0fs",
                   i + 1, len(starts), lo, hi - 1, rate,
                   remaining * elapsed / max(computed, 1))
  all_losses = np.concatenate(losses)
  trace = all_losses[..., settings.draw_steps]
  return results_lib.summarize(
      trace, np.concatenate(inits), nbeta,
      settings={**dataclasses.asdict(settings), "chain_strategy": strategy,
                "checkpoint_chunk": chunk},
      labels=[f"checkpoint {c}" for c in ids])


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
      f.name: getattr(res, f.name)[0] for f in dataclasses.fields(res) if f.name != "settings"})
