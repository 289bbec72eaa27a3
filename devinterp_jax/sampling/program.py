"""The compiled SGLD block program, and its cache.

A sweep runs pairs × chains, where a pair is one (grid point, restriction,
checkpoint) entry: its w*, its hyperparameters and (for a refined LLC) the
gather indices of its restriction. The block program advances every chain of
every pair by `block_steps` SGLD steps:

    block(carry[P, C], t0, params_star[P], hypers[P], chain_keys[C], data,
          loss_data, index[P, k], valid[P, k]) -> (carry[P, C], outputs[P, C, S])

It is a pure function of explicit arrays: nothing data-dependent is a closure
constant, so one compilation serves new seeds, new data of the same shapes, new
hyperparameters and every block of a sweep. `lax.scan` over steps is the outer
loop, so the global step t is unbatched: strided observers (MALA, L(w*)) are
real branches and a progress callback fires once per `progress_every` steps.

Programs are cached (an LRU of `CACHE_SIZE` entries) on everything static: the
loss function object, the data's structure, shapes and dtypes (or the batch
source object), the static `SamplerSettings` fields, the sampler, the chain
strategy, the restriction's leaves and size, the mesh and the batch axis.
Python's equality decides a hit: a bound method of the same model hits, a fresh
lambda or `functools.partial` made per call misses (and holds a cache slot).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from devinterp_jax.sampling import kernel
from devinterp_jax.sampling import observers as observers_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling.settings import SamplerSettings

CACHE_SIZE = 32
PROGRESS_CALLS_PER_BLOCK = 20


class CacheStats(NamedTuple):
  hits: int
  misses: int
  traces: int       # times a block or init program was traced (≈ compilations)
  size: int


class _Cache:
  def __init__(self, maxsize: int):
    self.maxsize, self.entries = maxsize, collections.OrderedDict()
    self.hits = self.misses = self.traces = 0
    self.lock = threading.Lock()

  def get(self, key, build: Callable[[], Any]):
    with self.lock:
      if key in self.entries:
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key]
      self.misses += 1
    value = build()
    with self.lock:
      self.entries[key] = value
      while len(self.entries) > self.maxsize:
        self.entries.popitem(last=False)
    return value


_CACHE = _Cache(CACHE_SIZE)


def cache_stats() -> CacheStats:
  return CacheStats(_CACHE.hits, _CACHE.misses, _CACHE.traces, len(_CACHE.entries))


def clear_cache() -> None:
  with _CACHE.lock:
    _CACHE.entries.clear()


class _Identity:
  """A cache-key element for an unhashable object: equal only to itself (kept alive)."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.obj is self.obj


def _hashable(obj):
  try:
    hash(obj)
    return obj
  except TypeError:
    return _Identity(obj)


def data_signature(data: Any) -> Any:
  """The static part of `data`: the batch source object, or structure + shapes + dtypes."""
  if data is None:
    return None
  if callable(data):
    return ("source", _hashable(data))
  leaves, treedef = jax.tree.flatten(data)
  return ("arrays", treedef, tuple((tuple(np.shape(x)), str(np.result_type(x)))
                                   for x in leaves))


def resolve_chain_strategy(strategy: str) -> str:
  if strategy not in ("auto", "vmap", "map"):
    raise ValueError(f"chain_strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
  if strategy == "auto":
    # Measured by benchmarks/llc_throughput.py: on CPU, vmapped chains lose to
    # a sequential map for transformer-sized models; accelerators want vmap.
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return strategy


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axis types (for sharding constraints)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older JAX: every axis is Auto
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


class Program(NamedTuple):
  """A compiled sweep block and the init of its chain state (both jitted)."""

  init: Callable     # (params_star[P], hypers[P], index[P, k] | None) -> carry[P, C]
  block: Callable    # see the module docstring
  block_steps: int


# Host side of the progress callback: the driver installs a function here. Callbacks
# run on a runtime thread, so this is a process global, not a thread-local.
_progress_hook: list[Callable[[int], None] | None] = [None]


def set_progress_hook(fn: Callable[[int], None] | None) -> None:
  _progress_hook[0] = fn


def _progress(t) -> None:
  fn = _progress_hook[0]
  if fn is not None:
    fn(int(t))


def get_program(loss_fn: Callable, settings: SamplerSettings, *, data: Any,
                loss_data: Any = None, sampler: Any = "sgld", chain_strategy: str = "auto",
                leaves: tuple[int, ...] | None = None, padded: bool = False,
                mesh: Mesh | None = None, batch_axis: str = "data") -> Program:
  """The cached `Program` for these static inputs (see the module docstring).

  `leaves` (restricted sweeps) are the param leaves any restriction touches
  (`restrict.compact`); `padded` whether some restriction is shorter than the
  longest (a `valid` mask is passed).
  """
  strategy = resolve_chain_strategy(chain_strategy)
  factory = samplers_lib.get_sampler(sampler)
  if mesh is not None:
    if batch_axis not in mesh.axis_names:
      raise ValueError(f"batch_axis {batch_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if settings.batch_size % mesh.shape[batch_axis]:
      raise ValueError(f"batch_size {settings.batch_size} is not divisible by the "
                       f"{mesh.shape[batch_axis]} devices of mesh axis {batch_axis!r}")
  key = (_hashable(loss_fn), settings.program_key(), data_signature(data),
         data_signature(loss_data), _hashable(factory), strategy, leaves, padded,
         _hashable(mesh), batch_axis)
  return _CACHE.get(key, lambda: _build(loss_fn, settings, data, loss_data, factory, strategy,
                                        leaves, padded, mesh, batch_axis))


def _build(loss_fn, settings: SamplerSettings, data, loss_data, factory, strategy, leaves,
           padded, mesh, batch_axis) -> Program:
  s = settings
  burnin, block_steps = s.burnin_steps, s.block_steps
  init_every = s.thinning * s.init_loss_stride
  progress_every = max(1, block_steps // PROGRESS_CALLS_PER_BLOCK)
  source = callable(data)
  loss_source = callable(loss_data)
  sharding = None if mesh is None else NamedSharding(auto_mesh(mesh), P(batch_axis))

  def batches(d):
    fn = kernel.batch_fn_from_data(d, s.batch_size)
    if sharding is None:
      return fn
    return lambda key: jax.lax.with_sharding_constraint(fn(key), sharding)

  def chain_model(params_star, index):
    """w* in chain coordinates, and the loss in chain coordinates."""
    if leaves is None:
      return params_star, loss_fn
    theta_star = restrict_lib.gather(params_star, leaves, index)
    return theta_star, lambda theta, batch: loss_fn(
        restrict_lib.embed(params_star, leaves, index, theta, theta_star), batch)

  def observers_for(lf, loss_batch_fn, batch_fn):
    obs = list(observers_lib.default(s.diagnostics))
    if loss_batch_fn is not None:   # data-refined: record the loss on other data, same key
      obs.insert(0, lambda info: {"loss": lf(info.params, loss_batch_fn(info.batch_key))})
    else:
      obs.insert(0, lambda info: {"loss": info.loss})
    init_batches = loss_batch_fn or batch_fn
    obs.append(observers_lib.gated(
        lambda info: {"init_loss": lf(info.params_star, init_batches(info.batch_key))},
        lambda t: (t >= burnin) & ((t - burnin) % init_every == 0)))
    if s.mala_stride:
      obs.append(observers_lib.gated(
          observers_lib.step_check(samplers_lib.step_check(factory), s.mala_target),
          lambda t: (t >= burnin) & (t % s.mala_stride == 0)))
    return obs

  def chains(fn, *args):
    if strategy == "vmap":
      return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args)

  def init(params_star_P, hypers_P, index_P):
    _CACHE.traces += 1

    def one(params_star, hypers, index):
      start, _ = chain_model(params_star, index)
      transform = factory(**hypers)
      rep = lambda x: jnp.broadcast_to(x, (s.num_chains,) + jnp.shape(x))
      return (jax.tree.map(rep, start), jax.tree.map(rep, transform.init(start)))

    return jax.vmap(one)(params_star_P, hypers_P, index_P)

  def block(carry_P, t0, params_star_P, hypers_P, chain_keys_C, data_arg, loss_data_arg,
            index_P, valid_P):
    _CACHE.traces += 1
    d = data if source else data_arg
    ld = loss_data if loss_source else loss_data_arg
    batch_fn = batches(d)
    loss_batch_fn = None if ld is None else batches(ld)

    def body(carry, step):
      t = t0 + step

      def pair(carry_p, params_star, hypers, index, valid):
        start, lf = chain_model(params_star, index)
        transform = factory(**hypers)
        obs = observers_for(lf, loss_batch_fn, batch_fn)

        def chain(params, state, chain_key):
          info = kernel.sgld_step(params, state, t, chain_key=chain_key, params_star=start,
                                  transform=transform, loss_fn=lf, batch_fn=batch_fn,
                                  hypers=hypers, mask=valid)
          out = {}
          for o in obs:
            out.update(o(info))
          return (info.proposal, info.state), out

        return chains(chain, carry_p[0], carry_p[1], chain_keys_C)

      new_carry, out = jax.vmap(pair)(carry, params_star_P, hypers_P, index_P, valid_P)
      jax.lax.cond(t % progress_every == 0, lambda: jax.debug.callback(_progress, t),
                   lambda: None)
      return new_carry, out

    carry, out = jax.lax.scan(body, carry_P, jnp.arange(block_steps))
    return carry, {k: jnp.moveaxis(v, 0, -1) for k, v in out.items()}   # [P, C, S]

  # The chain state is donated: each block overwrites it.
  return Program(init=jax.jit(init), block=jax.jit(block, donate_argnums=(0,)),
                 block_steps=block_steps)


def chain_keys(seed: int, num_chains: int) -> jax.Array:
  """Chain c's key: fold_in(key(seed), c), the same at every checkpoint."""
  base = jax.random.key(seed)
  return jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.arange(num_chains))
