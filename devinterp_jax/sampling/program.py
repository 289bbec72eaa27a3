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
from devinterp_jax.sampling import kernel
from devinterp_jax.sampling import mesh as mesh_lib
from devinterp_jax.sampling import observers as observers_lib
from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.sampling import samplers as samplers_lib
from devinterp_jax.sampling.settings import SamplerSettings

CACHE_SIZE = 32
PROGRESS_CALLS_PER_BLOCK = 20


class CacheStats(NamedTuple):
  hits: int
  misses: int
  traces: int  # times a block or init program was traced (≈ compilations)
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
  return ("arrays", treedef, tuple((tuple(np.shape(x)), str(np.result_type(x))) for x in leaves))


def resolve_chain_strategy(strategy: str) -> str:
  if strategy not in ("auto", "vmap", "map"):
    raise ValueError(f"chain_strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
  if strategy == "auto":
    # Measured by benchmarks/llc_throughput.py: on CPU, vmapped chains lose to
    # a sequential map for transformer-sized models; accelerators want vmap.
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return strategy


def at_least_f32(tree: Any) -> Any:
  """Floating leaves in float32 or wider: the chain state's precision (a bf16
  checkpoint's √ε noise would fall below bf16's spacing)."""

  def up(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x

  return jax.tree.map(up, tree)


def with_precision(
  loss_fn: Callable, compute_dtype: str | None, matmul_precision: str | None
) -> Callable:
  """`loss_fn` evaluated with float params and batch leaves cast to `compute_dtype`
  and matmuls at `matmul_precision`; the loss comes back in float32."""
  if compute_dtype is None and matmul_precision is None:
    return loss_fn
  dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

  def cast(tree):
    return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
    )

  def lf(params, batch):
    if dtype is not None:
      params, batch = cast(params), cast(batch)
    if matmul_precision is None:
      out = loss_fn(params, batch)
    else:
      with jax.default_matmul_precision(matmul_precision):
        out = loss_fn(params, batch)
    return jnp.asarray(out, jnp.float32)

  return lf


class Program(NamedTuple):
  """A compiled sweep block and the init of its chain state (both jitted)."""

  init: Callable  # (params_star[P], hypers[P], index[P, k] | None) -> carry[P, C]
  block: jax.stages.Wrapped  # jitted (`.lower` in block_memory); see the module docstring
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


def get_program(
  loss_fn: Callable,
  settings: SamplerSettings,
  *,
  data: Any,
  loss_data: Any = None,
  sampler: Any = "sgld",
  chain_strategy: str = "auto",
  leaves: tuple[int, ...] | None = None,
  padded: bool = False,
  mesh: mesh_lib.SweepMesh | None = None,
) -> Program:
  """The cached `Program` for these static inputs (see the module docstring).

  `leaves` (restricted sweeps) are the param leaves any restriction touches
  (`restrict.compact`); `padded` whether some restriction is shorter than the
  longest (a `valid` mask is passed). With a `mesh` (`sampling/mesh.py`), the
  pair axis, the chains and the minibatch are sharded on its named axes; a
  sharded chain axis is always vmapped.
  """
  strategy = resolve_chain_strategy(chain_strategy)
  if mesh is not None and mesh.chain_axis is not None:
    strategy = "vmap"
  factory = samplers_lib.get_sampler(sampler)
  key = (
    _hashable(loss_fn),
    settings.program_key(),
    data_signature(data),
    data_signature(loss_data),
    _hashable(factory),
    strategy,
    leaves,
    padded,
    None if mesh is None else mesh.key(),
  )
  return _CACHE.get(
    key, lambda: _build(loss_fn, settings, data, loss_data, factory, strategy, leaves, padded, mesh)
  )


def _build(
  loss_fn,
  settings: SamplerSettings,
  data,
  loss_data,
  factory,
  strategy,
  leaves,
  padded,
  mesh: mesh_lib.SweepMesh | None,
) -> Program:
  s = settings
  burnin, block_steps = s.burnin_steps, s.block_steps
  init_every = s.thinning * s.init_loss_stride
  progress_every = max(1, block_steps // PROGRESS_CALLS_PER_BLOCK)
  source = callable(data)
  loss_source = callable(loss_data)
  loss_fn = with_precision(loss_fn, s.compute_dtype, s.matmul_precision)
  sharding = None if mesh is None or mesh.batch_axis is None else mesh.batch()
  pair_axis = None if mesh is None or not mesh.pair_axes else mesh.pair_axes
  chain_axis = None if mesh is None else mesh.chain_axis

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
      restrict_lib.embed(params_star, leaves, index, theta, theta_star), batch
    )

  def observers_for(lf, loss_batch_fn, batch_fn):
    obs = list(observers_lib.default(s.diagnostics))
    if loss_batch_fn is not None:  # data-refined: record the loss on other data, same key
      obs.insert(0, lambda info: {"loss": lf(info.params, loss_batch_fn(info.batch_key))})
    else:
      obs.insert(0, lambda info: {"loss": info.loss})
    init_batches = loss_batch_fn or batch_fn
    obs.append(
      observers_lib.gated(
        lambda info: {"init_loss": lf(info.params_star, init_batches(info.batch_key))},
        lambda t: (t >= burnin) & ((t - burnin) % init_every == 0),
      )
    )
    if s.mala_stride:
      obs.append(
        observers_lib.gated(
          observers_lib.step_check(samplers_lib.step_check(factory), s.mala_target),
          lambda t: (t >= burnin) & (t % s.mala_stride == 0),
        )
      )
    return obs

  def chains(fn, *args):
    if strategy == "vmap":
      return jax.vmap(fn, spmd_axis_name=chain_axis)(*args)
    return jax.lax.map(lambda a: fn(*a), args)

  def pairs(fn, *args):
    return jax.vmap(fn, spmd_axis_name=pair_axis)(*args)

  def init(params_star_P, hypers_P, index_P):
    _CACHE.traces += 1
    params_star_P = at_least_f32(params_star_P)

    def one(params_star, hypers, index):
      start, _ = chain_model(params_star, index)
      transform = factory(**hypers)
      rep = lambda x: jnp.broadcast_to(x, (s.num_chains,) + jnp.shape(x))
      return (jax.tree.map(rep, start), jax.tree.map(rep, transform.init(start)))

    return pairs(one, params_star_P, hypers_P, index_P)

  def block(
    carry_P, t0, params_star_P, hypers_P, chain_keys_C, data_arg, loss_data_arg, index_P, valid_P
  ):
    _CACHE.traces += 1
    params_star_P = at_least_f32(params_star_P)
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
          info = kernel.sgld_step(
            params,
            state,
            t,
            chain_key=chain_key,
            params_star=start,
            transform=transform,
            loss_fn=lf,
            batch_fn=batch_fn,
            hypers=hypers,
            mask=valid,
          )
          out = {}
          for o in obs:
            out.update(o(info))
          return (info.proposal, info.state), out

        return chains(chain, carry_p[0], carry_p[1], chain_keys_C)

      new_carry, out = pairs(pair, carry, params_star_P, hypers_P, index_P, valid_P)
      jax.lax.cond(t % progress_every == 0, lambda: jax.debug.callback(_progress, t), lambda: None)
      return new_carry, out

    carry, out = jax.lax.scan(body, carry_P, jnp.arange(block_steps))
    return carry, {k: jnp.moveaxis(v, 0, -1) for k, v in out.items()}  # [P, C, S]

  # The chain state is donated: each block overwrites it.
  if mesh is None:
    return Program(
      init=jax.jit(init), block=jax.jit(block, donate_argnums=(0,)), block_steps=block_steps
    )
  state = mesh.pair_chains()
  return Program(
    init=jax.jit(init, out_shardings=state),
    block=jax.jit(block, donate_argnums=(0,), out_shardings=(state, state)),
    block_steps=block_steps,
  )


def chain_keys(seed: int, num_chains: int, sharding: Any = None) -> jax.Array:
  """Chain c's key: fold_in(key(seed), c), the same at every checkpoint (built on
  the devices of `sharding` when given: a global array across processes)."""

  def build():
    base = jax.random.key(seed)
    return jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.arange(num_chains))

  return build() if sharding is None else jax.jit(build, out_shardings=sharding)()


class MemoryUse(NamedTuple):
  """Bytes per device of a compiled block (`compiled.memory_analysis()`)."""

  argument: int
  output: int
  temp: int
  alias: int  # outputs written over donated arguments (the chain state)

  @property
  def total(self) -> int:
    return self.argument + self.output + self.temp - self.alias


def block_memory(prog: Program, *args) -> MemoryUse | None:
  """The memory of `prog.block` compiled for these (abstract) arguments; None where
  the backend does not report it."""
  compiled = prog.block.lower(*args).compile()
  try:
    ma = compiled.memory_analysis()
  except Exception:  # not implemented on some backends / versions
    return None
  if isinstance(ma, (list, tuple)):  # one per device program on some versions
    ma = ma[0] if ma else None
  if ma is None:
    return None
  return MemoryUse(
    int(ma.argument_size_in_bytes),
    int(ma.output_size_in_bytes),
    int(ma.temp_size_in_bytes),
    int(ma.alias_size_in_bytes),
  )


def device_memory_bytes() -> int:
  """Memory of one local device: the allocator's limit on accelerators; on CPU the
  host's physical memory shared by its devices."""
  dev = jax.local_devices()[0]
  stats = None
  try:
    stats = dev.memory_stats()
  except Exception:
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  import os

  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(total // max(jax.local_device_count(), 1))
