"""Typed settings at the estimator's boundary: sampler, sweep options, restrictions.

  SamplerSettings   everything that determines an LLC estimate besides the params,
                    the data and the loss; `SamplerSettings.from_config(config.llc)`
  SweepOptions      how a sweep runs (chunking, resume directory, mesh, progress):
                    none of it changes the numbers
  Restrictions      named 0/1 masks stacked on a leading [R] axis (refined LLCs)

Burn-in (`num_burnin_steps`): an integer is a number of SGLD steps run before
the first recorded draw. "auto" (the default) records from step 0 and reads
the burn-in from the trace (`convergence.auto_burnin`).

Chain length: with `max_draws=None` every chain runs `num_draws` draws. With
`max_draws`, chains run at least `num_draws` draws, then continue in blocks of
`block_draws` until the convergence criteria pass on the kept draws
(`diagnostics.HealthCriteria`) or `max_draws` is reached.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from devinterp_jax.sampling import restrict as restrict_lib
from devinterp_jax.typing import Params


# What the MALA acceptance diagnostic tests (`SamplerSettings.mala_target`):
#   'posterior': the sampled potential nβ L_B + (γ/2)‖w − w*‖², the proposal the chain made;
#   'loss': the tempered loss nβ L_B alone, for a Langevin proposal without the
#     localisation drift (same noise). The localisation term is an isotropic Gaussian
#     whose discretisation bias is known in closed form (variance × 1/(1 − εγ/4)); in
#     d ~ 10⁵ dimensions it dominates the 'posterior' acceptance while a chain is still
#     spreading from w* (docs/reference/lm.md), and 'loss' isolates how well ε resolves the loss.
MALA_TARGETS = ("posterior", "loss")
MATMUL_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
AUTO = "auto"
# Settings fields left out of a sweep's identity while they hold their default, so
# sweeps saved before the field existed keep their fingerprint.
IDENTITY_DEFAULTS = {"compute_dtype": None, "matmul_precision": None}

# Fields passed to the compiled program as arrays (changing them never recompiles).
TRACED_FIELDS = ("step_size", "nbeta", "localization")
# Fields that only decide how many blocks run (never part of a compiled program).
LENGTH_FIELDS = ("seed", "num_draws", "max_draws")


def parse_burnin(value: Any) -> int | str:
  """'auto', an int >= 0, or a string of digits (config files and flags)."""
  if isinstance(value, str):
    if value == AUTO:
      return AUTO
    if value.strip().isdigit():
      return int(value.strip())
  elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
    return int(value)
  raise ValueError(f"num_burnin_steps must be 'auto' or an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Everything that determines an LLC estimate besides params, data and loss."""

  num_chains: int
  num_draws: int
  step_size: float
  localization: float
  nbeta: float
  batch_size: int
  seed: int = 0
  num_burnin_steps: int | str = AUTO
  thinning: int = 1
  init_loss_stride: int = 10
  mala_stride: int = 10
  mala_target: str = "posterior"
  diagnostics: bool = True
  block_draws: int = 100
  max_draws: int | None = None
  compute_dtype: str | None = None  # e.g. "bfloat16": the loss's dtype (state stays f32)
  matmul_precision: str | None = None  # "default", "high" or "highest" inside the loss

  def __post_init__(self):
    for name in (
      "num_chains",
      "num_draws",
      "batch_size",
      "thinning",
      "init_loss_stride",
      "block_draws",
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
      object.__setattr__(self, name, int(value))
    if self.mala_stride < 0:
      raise ValueError(f"mala_stride must be >= 0 (0 = off), got {self.mala_stride}")
    if self.mala_target not in MALA_TARGETS:
      raise ValueError(f"mala_target must be one of {MALA_TARGETS}, got {self.mala_target!r}")
    object.__setattr__(self, "num_burnin_steps", parse_burnin(self.num_burnin_steps))
    if self.max_draws is not None:
      if isinstance(self.max_draws, bool) or int(self.max_draws) != self.max_draws:
        raise ValueError(f"max_draws must be None or an integer, got {self.max_draws!r}")
      object.__setattr__(self, "max_draws", int(self.max_draws))
      if self.max_draws < self.num_draws:
        raise ValueError(
          f"max_draws ({self.max_draws}) must be >= num_draws "
          f"({self.num_draws}), or None for a fixed length"
        )
    for name in TRACED_FIELDS:
      value = getattr(self, name)
      if (
        isinstance(value, bool)
        or np.ndim(value) != 0
        or not np.issubdtype(np.asarray(value).dtype, np.number)
      ):
        raise ValueError(f"{name} must be a number, got {value!r}")
      object.__setattr__(self, name, float(value))  # e.g. a jnp.float32 scalar
      if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if self.step_size <= 0:
      raise ValueError(f"step_size must be > 0, got {self.step_size}")
    if self.nbeta <= 0:
      raise ValueError(
        f"nbeta must be > 0, got {self.nbeta}: with nβ = 0 the chain samples "
        "the localising Gaussian alone and every LLC is exactly 0"
      )
    if self.localization < 0:
      raise ValueError(f"localization must be >= 0, got {self.localization}")
    if self.compute_dtype is not None:
      try:
        dtype = jax.numpy.dtype(self.compute_dtype)
      except TypeError:
        dtype = None
      if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise ValueError(
          f"compute_dtype must be a floating dtype name such as 'bfloat16' "
          f"or 'float32' (or None), got {self.compute_dtype!r}"
        )
      object.__setattr__(self, "compute_dtype", dtype.name)
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(
        f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}"
      )

  @classmethod
  def from_config(
    cls, section: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
  ) -> "SamplerSettings":
    """From a config section (e.g. `config.llc`), with `overrides` on top (e.g.
    `config.refined`). Keys that are not settings fields (dataset_size,
    checkpoint_chunk, …) are ignored; `max_draws=0` means a fixed length."""
    merged = {**dict(section), **dict(overrides or {})}
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in merged.items() if k in names}
    if kw.get("max_draws") == 0:
      kw["max_draws"] = None
    for name in IDENTITY_DEFAULTS:  # config files spell "unset" as ""
      if kw.get(name) == "":
        kw[name] = None
    return cls(**kw)

  def identity(self) -> dict[str, Any]:
    """The fields as a dict, without new fields at their defaults (`IDENTITY_DEFAULTS`)."""
    return {
      k: v
      for k, v in dataclasses.asdict(self).items()
      if not (k in IDENTITY_DEFAULTS and v == IDENTITY_DEFAULTS[k])
    }

  @property
  def adaptive(self) -> bool:
    return self.max_draws is not None

  @property
  def burnin_steps(self) -> int:
    """SGLD steps before the first recorded draw (0 with the auto burn-in)."""
    return 0 if self.num_burnin_steps == AUTO else int(self.num_burnin_steps)

  @property
  def block_steps(self) -> int:
    """Steps per compiled block. Adaptive: `block_draws` draws (at most `num_draws`,
    so the first look costs no extra block). Fixed length: the
    run split into equal blocks of at most `block_draws` draws (no wasted steps
    beyond rounding)."""
    if self.adaptive:
      return min(self.block_draws, self.num_draws) * self.thinning
    most = self.block_draws * self.thinning
    blocks = -(-self.num_steps // most)
    return -(-self.num_steps // blocks)

  def steps_for(self, num_draws: int) -> int:
    """SGLD steps that cover `num_draws` draws, rounded up to whole blocks."""
    need = self.burnin_steps + num_draws * self.thinning
    return -(-need // self.block_steps) * self.block_steps

  @property
  def num_steps(self) -> int:
    return self.burnin_steps + self.num_draws * self.thinning

  def draw_steps(self, num_steps: int | None = None) -> np.ndarray:
    """The recorded steps among the first `num_steps` (default: `num_draws` draws)."""
    n = self.num_steps if num_steps is None else num_steps
    return np.arange(self.burnin_steps, n, self.thinning)

  def program_key(self) -> tuple:
    """The fields a compiled block program depends on (and its block length)."""
    return tuple(
      (f.name, getattr(self, f.name))
      for f in dataclasses.fields(self)
      if f.name not in TRACED_FIELDS + LENGTH_FIELDS + ("block_draws",)
    ) + (("block_steps", self.block_steps),)


class Restrictions(NamedTuple):
  """Named weight restrictions: 0/1 masks shaped like the params, stacked on [R]."""

  names: list[str]
  masks: Params

  @classmethod
  def single(cls, mask: Params, name: str = "restricted") -> "Restrictions":
    return cls([name], restrict_lib.stack([mask]))

  def check(self) -> "Restrictions":
    """Binary float32 masks with one leading size, each selecting something."""
    restrict_lib.check_binary(self.masks)
    masks = jax.tree.map(lambda x: np.asarray(x, np.float32), self.masks)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(masks)}
    if sizes != {len(self.names)}:
      raise ValueError(
        f"{len(self.names)} restriction names for masks with leading sizes "
        f"{sorted(map(str, sizes))}"
      )
    counts = np.asarray(restrict_lib.num_selected(masks, leading_axes=1))
    if np.any(counts == 0):
      raise ValueError(
        f"restrictions {[n for n, c in zip(self.names, counts) if c == 0]} select no coordinate"
      )
    return Restrictions(list(self.names), masks)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  """How a sweep runs; none of these change its numbers.

  checkpoint_chunk: (grid, restriction, checkpoint) pairs per compiled call; bounds
    memory. Default: all pairs at once. "auto": as many as fit in
    `memory_fraction` of a device's memory (`program.memory_per_chunk`).
  output_dir: resume directory (see `sampling/sweep.py`).
  checkpoint_ids: names of the checkpoints (e.g. steps) for warnings and the
    resume fingerprint.
  mesh: None (one device), "auto" (the default) or a `jax.sharding.Mesh` whose
    axis names are sweep axes (`sampling/mesh.py`: checkpoint, restriction,
    grid, chain, batch).
  batch_axis: the mesh axis that shards the minibatch ("batch"; "data" too).
  memory_fraction: the share of a device's memory `checkpoint_chunk="auto"` fills.
  chain_strategy: 'vmap', 'map' (sequential chains in the program) or 'auto'.
  progress: log progress lines with an ETA (at least every `progress_every_s`).
  loss_key: with `output_dir`, a name of the loss (and of callable data) that
    changes whenever they do; needed for lambdas (see `digest.callable_identity`).
  checkpoint_cache_bytes: host memory for checkpoints read from a sequence (e.g. a
    `ParamsSequence` on disk), kept between the rounds of an adaptive sweep so each
    checkpoint is read and checked once; least recently used ones are dropped
    beyond it (0: read at every round).
  """

  checkpoint_chunk: int | str | None = None
  output_dir: str | None = None
  checkpoint_ids: Sequence[Any] | None = None
  mesh: Any = AUTO
  batch_axis: str = "batch"
  memory_fraction: float = 0.6
  chain_strategy: str = "auto"
  progress: bool = True
  progress_every_s: float = 15.0
  loss_key: str | None = None
  checkpoint_cache_bytes: int = 2**30

  def __post_init__(self):
    if self.chain_strategy not in ("auto", "vmap", "map"):
      raise ValueError(
        f"chain_strategy must be 'auto', 'vmap' or 'map', got {self.chain_strategy!r}"
      )
    chunk = self.checkpoint_chunk
    if (
      chunk is not None
      and chunk != AUTO
      and (isinstance(chunk, (bool, str)) or not isinstance(chunk, (int, np.integer)) or chunk < 1)
    ):
      raise ValueError(f"checkpoint_chunk must be None, 'auto' or an integer >= 1, got {chunk!r}")
    if not 0 < self.memory_fraction <= 1:
      raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
    if (
      isinstance(self.checkpoint_cache_bytes, bool)
      or not isinstance(self.checkpoint_cache_bytes, (int, np.integer))
      or self.checkpoint_cache_bytes < 0
    ):
      raise ValueError(
        f"checkpoint_cache_bytes must be an integer >= 0, got {self.checkpoint_cache_bytes!r}"
      )
