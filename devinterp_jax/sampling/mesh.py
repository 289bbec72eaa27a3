"""Named sweep axes: how a sweep's pairs, chains and minibatches map onto a device mesh.

Axis glossary (mesh axis names a sweep understands):

  checkpoint   checkpoints of a chunk          ┐ all three shard the chunk's flat
  restriction  restrictions (heads, layers)    │ pair axis P (pairs are grid ×
  grid         calibration grid points         ┘ restriction × checkpoint entries)
  chain        the chains of every pair (C)
  batch        the SGLD minibatch (data parallel; `data` is an alias)

`SweepOptions.mesh` takes a `jax.sharding.Mesh` over any subset of these names,
e.g. `jax.make_mesh((8,), ("checkpoint",))` or `jax.make_mesh((2, 4),
("checkpoint", "chain"))`, None (one device), or "auto" (the default):

  * CPU backend, one process: no mesh (fake CPU devices are for tests; chains run
    as `map`); several processes: the global mesh below, so no process repeats
    another's work;
  * one device: no mesh;
  * several devices (one host or a pod slice's global devices): all devices on
    `checkpoint` when a chunk has at least as many pairs as devices; otherwise
    `checkpoint` × `chain` with as many devices on `chain` as divide the chains.
  * `batch` is used only when asked for, and never chosen across hosts.

Sharded pairs and chains are independent, so a pair- or chain-sharded sweep
compiles to a program without cross-device reductions (tests/test_sharding.py
checks the optimised HLO). A batch-sharded sweep all-reduces every gradient.
Chunks round up to a multiple of the pair-axis devices; the chain count must
be divisible by the `chain` devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PAIR_AXES = ("grid", "restriction", "checkpoint")
CHAIN_AXIS = "chain"
BATCH_AXIS = "batch"
BATCH_ALIASES = ("batch", "data")
SWEEP_AXES = PAIR_AXES + (CHAIN_AXIS,) + BATCH_ALIASES
AUTO = "auto"


def auto_axis_types(mesh: Mesh) -> Mesh:
  """The same devices and names with Auto axis types (sharding propagation decides)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older JAX: every axis is Auto
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


@dataclasses.dataclass(frozen=True)
class SweepMesh:
  """A mesh and the role of each of its axes in a sweep."""

  mesh: Mesh
  pair_axes: tuple[str, ...]
  chain_axis: str | None
  batch_axis: str | None

  @property
  def pair_devices(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.pair_axes)

  @property
  def chain_devices(self) -> int:
    return 1 if self.chain_axis is None else self.mesh.shape[self.chain_axis]

  @property
  def batch_devices(self) -> int:
    return 1 if self.batch_axis is None else self.mesh.shape[self.batch_axis]

  @property
  def pair_spec(self):
    return self.pair_axes or None

  def sharding(self, *spec) -> NamedSharding:
    return NamedSharding(auto_axis_types(self.mesh), P(*spec))

  def pairs(self) -> NamedSharding:  # [P, ...]
    return self.sharding(self.pair_spec)

  def pair_chains(self) -> NamedSharding:  # [P, C, ...] chain state, outputs
    return self.sharding(self.pair_spec, self.chain_axis)

  def chains(self) -> NamedSharding:  # [C] chain keys
    return self.sharding(self.chain_axis)

  def replicated(self) -> NamedSharding:
    return self.sharding()

  def batch(self) -> NamedSharding:  # [B, ...] a chain's minibatch
    return self.sharding(self.batch_axis)

  def describe(self) -> str:
    return " × ".join(f"{a}={n}" for a, n in self.mesh.shape.items())

  def key(self) -> tuple:
    return (
      tuple(self.mesh.axis_names),
      tuple(self.mesh.devices.shape),
      tuple(d.id for d in self.mesh.devices.flat),
      self.pair_axes,
      self.chain_axis,
      self.batch_axis,
    )


def from_mesh(mesh: Mesh, batch_axis: str = BATCH_AXIS) -> SweepMesh:
  """The roles of a user mesh's axes (names from `SWEEP_AXES`, or `batch_axis`)."""
  names = tuple(mesh.axis_names)
  known = set(SWEEP_AXES) | {batch_axis}
  unknown = [a for a in names if a not in known]
  if unknown:
    raise ValueError(
      f"mesh axes {unknown} are not sweep axes; name mesh axes from "
      f"{SWEEP_AXES} (or pass batch_axis=<name> for the minibatch axis)"
    )
  batch = [a for a in names if a in BATCH_ALIASES or a == batch_axis]
  if len(batch) > 1:
    raise ValueError(f"the mesh has several minibatch axes {batch}; use one")
  return SweepMesh(
    mesh,
    tuple(a for a in names if a in PAIR_AXES),
    CHAIN_AXIS if CHAIN_AXIS in names else None,
    batch[0] if batch else None,
  )


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(limit, 1))


def auto(num_pairs: int, num_chains: int, devices: list | None = None) -> SweepMesh | None:
  """The "auto" mesh for a sweep of `num_pairs` pairs × `num_chains` chains."""
  if jax.default_backend() == "cpu" and devices is None and jax.process_count() == 1:
    return None
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if n == 1:
    return None
  if num_pairs >= n:
    shape, names = (n,), ("checkpoint",)
  else:
    on_pairs = _largest_divisor_at_most(n, num_pairs)
    on_chains = _largest_divisor_at_most(n // on_pairs, num_chains)
    while num_chains % on_chains:
      on_chains -= 1
    on_pairs = n // on_chains  # any leftover devices take padded pairs
    shape, names = (
      ((on_pairs, on_chains), ("checkpoint", "chain")) if on_chains > 1 else ((n,), ("checkpoint",))
    )
  try:  # topology-aware device order on accelerators
    m = jax.make_mesh(shape, names, devices=devices)
  except Exception:
    m = Mesh(np.asarray(devices).reshape(shape), names)
  return SweepMesh(m, names[:1], "chain" if "chain" in names else None, None)


def resolve(
  mesh: Any, *, num_pairs: int, num_chains: int, batch_size: int, batch_axis: str = BATCH_AXIS
) -> SweepMesh | None:
  """A `SweepMesh` from `SweepOptions.mesh` (None, "auto" or a Mesh), checked."""
  if mesh is None:
    return None
  if isinstance(mesh, str):
    if mesh != AUTO:
      raise ValueError(f"mesh must be None, 'auto' or a jax.sharding.Mesh, got {mesh!r}")
    sm = auto(num_pairs, num_chains)
  elif isinstance(mesh, SweepMesh):
    sm = mesh
  elif isinstance(mesh, Mesh):
    sm = from_mesh(mesh, batch_axis)
  else:
    raise ValueError(f"mesh must be None, 'auto' or a jax.sharding.Mesh, got {type(mesh).__name__}")
  if sm is None or sm.mesh.size == 1:
    return None
  if num_chains % sm.chain_devices:
    raise ValueError(
      f"num_chains {num_chains} is not divisible by the "
      f"{sm.chain_devices} devices of mesh axis 'chain'"
    )
  if batch_size % sm.batch_devices:
    raise ValueError(
      f"batch_size {batch_size} is not divisible by the {sm.batch_devices} "
      f"devices of mesh axis {sm.batch_axis!r}"
    )
  return sm


def round_chunk(chunk: int, sm: SweepMesh | None) -> int:
  """`chunk` rounded up to a multiple of the pair-axis devices."""
  if sm is None:
    return chunk
  k = sm.pair_devices
  return -(-chunk // k) * k
