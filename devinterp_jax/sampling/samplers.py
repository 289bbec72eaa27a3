"""The samplers by name, and the step-size check each one is judged by.

  sgld, rmsprop_sgld   overdamped Langevin (`sampling/sgld.py`); check: MALA
  sghmc, sgnht         underdamped Langevin (`sampling/underdamped.py`);
                       check: the Metropolis acceptance of one leapfrog step

A sampler is a factory `(step_size, nbeta, localization, **options) ->
optax.GradientTransformationExtraArgs` whose `update(grads, state, params, *,
params_star, noise_key, mask=None)` returns Δw. Options (e.g. `friction`) are
bound with `get_sampler(name, friction=...)`, which returns the same object for
equal arguments, so compiled programs are reused.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import optax

from devinterp_jax.sampling import sgld as sgld_lib
from devinterp_jax.sampling import underdamped

SamplerFactory = Callable[..., optax.GradientTransformationExtraArgs]

SAMPLERS: dict[str, SamplerFactory] = {
  "sgld": sgld_lib.sgld,
  "rmsprop_sgld": sgld_lib.rmsprop_sgld,
  "sghmc": underdamped.sghmc,
  "sgnht": underdamped.sgnht,
}
# The options each named sampler takes (config.llc keys of the same name).
OPTIONS: dict[str, tuple[str, ...]] = {
  "sgld": (),
  "rmsprop_sgld": (),
  "sghmc": ("friction",),
  "sgnht": ("friction",),
}
STEP_CHECKS = ("mala", "leapfrog")


@functools.lru_cache(maxsize=None)
def _bound(name: str, options: tuple) -> SamplerFactory:
  return functools.partial(SAMPLERS[name], **dict(options))


def get_sampler(sampler: str | SamplerFactory, **options: Any) -> SamplerFactory:
  """A sampler factory by name (options bound), or `sampler` itself if callable.

  Options the named sampler does not take are refused; options set to None are
  dropped (the sampler's default).
  """
  if callable(sampler):
    if options:
      raise ValueError("bind options to a sampler factory yourself (functools.partial)")
    return sampler
  if sampler not in SAMPLERS:
    raise ValueError(
      f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)} "
      f"or pass a factory (step_size, nbeta, localization) -> transformation"
    )
  options = {k: v for k, v in options.items() if v is not None}
  unknown = sorted(set(options) - set(OPTIONS[sampler]))
  if unknown:
    raise ValueError(
      f"sampler {sampler!r} takes no option(s) {unknown}; it takes "
      f"{list(OPTIONS[sampler]) or 'none'}"
    )
  if not options:
    return SAMPLERS[sampler]
  return _bound(sampler, tuple(sorted(options.items())))


def step_check(sampler: str | SamplerFactory) -> str:
  """'mala' or 'leapfrog': the acceptance the sampler's step size is checked by."""
  factory = get_sampler(sampler)
  func = getattr(factory, "func", factory)
  check = getattr(func, "step_check", "mala")
  if check not in STEP_CHECKS:
    raise ValueError(f"sampler {func!r} declares step_check {check!r}; use one of {STEP_CHECKS}")
  return check


def from_config(section: Any) -> SamplerFactory:
  """The sampler of a config section: `sampler` and its options (`friction`, 0 = default)."""
  name = section.get("sampler", "sgld")
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
  options = {}
  for key in OPTIONS[name]:
    value = section.get(key)
    options[key] = None if value in (None, 0, 0.0) else float(value)
  return get_sampler(name, **options)
