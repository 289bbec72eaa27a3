"""Config validation rules, applied at the boundary before any work starts.

Every experiment module's `validate_config(config)` checks each section of its
config (training, model, data) with `check_fields`, and calls
`llc_sweep.validate_sampling_sections` for the sections every setting shares
(llc, refined, calibration, analysis). A bad value raises `ConfigError` naming
the key, the value and the rule, so a typo in an LLC setting fails the main job
at once instead of after hours of training.

Rules (`check_fields`): 'int>=0', 'int>=1', 'int>=2', 'int>=3', 'int>=4', 'num>0', 'num>=0', 'unit'
([0, 1]), 'unit_open' ((0, 1)), 'unit_right_open' ([0, 1)), 'nums>0', 'nums>=0'
(a non-empty sequence), or a tuple of allowed values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

if TYPE_CHECKING:
  from ml_collections import ConfigDict


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """A finite int or float (not a bool)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES = {
  "int>=0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  "int>=1": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  "int>=2": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
  "int>=3": (lambda v: _is_int(v) and v >= 3, "an integer >= 3"),
  "int>=4": (lambda v: _is_int(v) and v >= 4, "an integer >= 4"),
  "num>0": (lambda v: is_number(v) and v > 0, "a finite number > 0"),
  "num>=0": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
  "unit": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
  "unit_open": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
  "unit_right_open": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
  "nums>0": (
    lambda v: (
      isinstance(v, (tuple, list)) and len(v) > 0 and all(is_number(x) and x > 0 for x in v)
    ),
    "a non-empty list of finite numbers > 0",
  ),
  "nums>=0": (
    lambda v: (
      isinstance(v, (tuple, list)) and len(v) > 0 and all(is_number(x) and x >= 0 for x in v)
    ),
    "a non-empty list of finite numbers >= 0",
  ),
}


def fail(key: str, value: Any, what: str) -> NoReturn:
  """Raises `ConfigError` naming `key`, its `value` and what it must be."""
  flag = f"--{key}=..." if key.startswith("config.") else key
  raise ConfigError(
    f"{key} = {value!r} is invalid: it must be {what}. Fix it in the config "
    f"file or on the command line ({flag})."
  )


def check_fields(section: Mapping | ConfigDict, prefix: str, spec: Mapping[str, Any]) -> None:
  """Checks the fields of `section` named in `spec` (absent fields are skipped)."""
  for key, rule in spec.items():
    if key not in section:
      continue
    value = section[key]
    if isinstance(rule, tuple):
      if value not in rule:
        fail(f"{prefix}.{key}", value, f"one of {list(rule)}")
      continue
    test, what = _RULES[rule]
    if not test(value):
      fail(f"{prefix}.{key}", value, what)
