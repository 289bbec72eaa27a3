"""Content identities: digests of array pytrees and identities of functions.

They key everything that must not be silently reused: checkpoint checksums
(`storage/checkpoints.py`) and the fingerprints of LLC results
(`sampling/llc.py`), which cover the data, every checkpoint's params and the
loss function.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from typing import Any, Callable

import jax
import numpy as np


def tree_digest(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (host copies)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype.name}|{x.shape}|".encode())
    h.update(x.tobytes())
  return h.hexdigest()


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _value_identity(value: Any) -> str | None:
  """A stable text for a closure or partial argument, or None if it has none."""
  if isinstance(value, _PLAIN):
    return repr(value)
  if isinstance(value, (np.ndarray, jax.Array)):
    return "array:" + tree_digest(value)
  if isinstance(value, (tuple, list)):
    parts = [_value_identity(v) for v in value]
    return None if None in parts else f"{type(value).__name__}({','.join(parts)})"
  if isinstance(value, dict):
    parts = [(repr(k), _value_identity(v)) for k, v in sorted(value.items(), key=repr)]
    return None if any(p is None for _, p in parts) else "{" + ",".join(
        f"{k}:{v}" for k, v in parts) + "}"
  if callable(value):
    return callable_identity(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"
  return None


def _code_digest(code: types.CodeType) -> str:
  h = hashlib.sha256(code.co_code)
  for const in code.co_consts:
    h.update((_code_digest(const) if isinstance(const, types.CodeType) else repr(const)).encode())
  h.update(repr(code.co_names).encode())
  return h.hexdigest()[:16]


def callable_identity(fn: Callable) -> str | None:
  """A stable identity of a function, or None when it has none a rerun could match.

  Named functions are identified by module, qualified name and a digest of their
  bytecode, constants and closure values; bound methods by their class and the
  repr of a dataclass instance (e.g. a Flax module with its fields); partials
  by their function and arguments. Lambdas, and closures over values without a
  stable identity, return None: resuming with them needs a user-supplied key.
  """
  while hasattr(fn, "__wrapped__"):  # jax.jit, functools.wraps
    fn = fn.__wrapped__
  if isinstance(fn, functools.partial):
    inner = callable_identity(fn.func)
    args = [_value_identity(a) for a in fn.args]
    kwargs = {k: _value_identity(v) for k, v in sorted(fn.keywords.items())}
    if inner is None or None in args or None in kwargs.values():
      return None
    return f"partial({inner},{args},{kwargs})"
  if isinstance(fn, types.MethodType):
    owner = fn.__self__
    if isinstance(owner, type):
      owner_id = f"{owner.__module__}.{owner.__qualname__}"
    elif dataclasses.is_dataclass(owner):
      owner_id = f"{type(owner).__module__}.{type(owner).__qualname__}:{owner!r}"
    else:
      return None
    inner = callable_identity(fn.__func__)
    return None if inner is None else f"{owner_id}.{inner}"
  if isinstance(fn, types.FunctionType):
    if fn.__name__ == "<lambda>":
      return None
    cells = []
    for cell in fn.__closure__ or ():
      try:
        ident = _value_identity(cell.cell_contents)
      except ValueError:  # an empty cell
        ident = "empty"
      if ident is None:
        return None
      cells.append(ident)
    defaults = [_value_identity(d) for d in fn.__defaults__ or ()]
    if None in defaults:
      return None
    return (f"{fn.__module__}.{fn.__qualname__}:{_code_digest(fn.__code__)}:"
            f"{hashlib.sha256(repr((cells, defaults)).encode()).hexdigest()[:16]}")
  if dataclasses.is_dataclass(fn) and not isinstance(fn, type):  # a callable dataclass
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{fn!r}"
  return None
