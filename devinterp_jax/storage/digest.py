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


def _value_identity(value: Any, home: str | None, seen: frozenset[int] = frozenset()) -> str | None:
  """A stable text for a closure, default or global value, or None if it has none."""
  if isinstance(value, _PLAIN):
    return repr(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return "array:" + tree_digest(value)
  if isinstance(value, (tuple, list, set, frozenset)):
    idents = [_value_identity(v, home, seen) for v in value]
    parts = [p for p in idents if p is not None]
    if len(parts) < len(idents):
      return None
    if isinstance(value, (set, frozenset)):
      parts = sorted(parts)
    return f"{type(value).__name__}({','.join(parts)})"
  if isinstance(value, dict):
    parts = [
      (_value_identity(k, home, seen), _value_identity(v, home, seen)) for k, v in value.items()
    ]
    if any(k is None or v is None for k, v in parts):
      return None
    return "{" + ",".join(f"{k}:{v}" for k, v in sorted(parts)) + "}"
  if isinstance(value, types.ModuleType):
    return f"module:{value.__name__}"
  if isinstance(value, type):
    return f"class:{value.__module__}.{value.__qualname__}"
  if callable(value):
    return _identity(value, home, seen)
  if dataclasses.is_dataclass(value):
    return _dataclass_identity(value, home, seen)
  return None


def _dataclass_identity(obj: Any, home: str | None, seen: frozenset[int]) -> str | None:
  """A dataclass instance (e.g. a Flax module) by its class and the identity of every
  field (not its repr, which may hold addresses or truncated arrays)."""
  fields = []
  for f in dataclasses.fields(obj):
    ident = _value_identity(getattr(obj, f.name, None), home, seen)
    if ident is None:
      return None
    fields.append(f"{f.name}={ident}")
  return f"{type(obj).__module__}.{type(obj).__qualname__}({','.join(fields)})"


def _const_text(const: Any) -> str:
  """A code constant as text that does not depend on the hash seed."""
  if isinstance(const, types.CodeType):
    return _code_digest(const)
  if isinstance(const, tuple):
    return "(" + ",".join(_const_text(c) for c in const) + ")"
  if isinstance(const, frozenset):
    return "frozenset(" + ",".join(sorted(_const_text(c) for c in const)) + ")"
  return repr(const)


def _code_digest(code: types.CodeType) -> str:
  h = hashlib.sha256(code.co_code)
  for const in code.co_consts:
    h.update(_const_text(const).encode())
  h.update(repr(code.co_names).encode())
  return h.hexdigest()[:16]


def _class_code(cls: type, home: str | None) -> str:
  """A digest of the code of every method a class (and its bases in `home`) defines,
  so methods reached through `self` are covered too."""
  h = hashlib.sha256()
  for klass in cls.__mro__:
    if klass.__module__ != home and klass is not cls:
      continue
    for key, value in sorted(vars(klass).items()):
      while hasattr(value, "__wrapped__"):
        value = value.__wrapped__
      if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
      if isinstance(value, types.FunctionType):
        h.update(f"{klass.__qualname__}.{key}:{_code_digest(value.__code__)}".encode())
  return h.hexdigest()[:16]


def _global_names(code: types.CodeType) -> set[str]:
  names = set(code.co_names)
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      names |= _global_names(const)
  return names


def _cell_value(cell) -> Any:
  try:
    return cell.cell_contents
  except ValueError:  # an empty cell
    return None


def _function_identity(
  fn: types.FunctionType, home: str | None, seen: frozenset[int]
) -> str | None:
  if fn.__name__ == "<lambda>":
    return None
  # The code's own module and name: `functools.wraps` copies the wrapped function's.
  module = fn.__globals__.get("__name__", fn.__module__)
  name = f"{module}.{getattr(fn.__code__, 'co_qualname', fn.__code__.co_name)}"
  if home is not None and module != home:
    # Library code: identified by its name and the names of the functions it closes
    # over (so jax.grad(f) and jax.value_and_grad(f) differ).
    inner = sorted(
      f"{v.__globals__.get('__name__')}.{v.__code__.co_name}"
      for v in map(_cell_value, fn.__closure__ or ())
      if isinstance(v, types.FunctionType)
    )
    own = name + (f"{{{','.join(inner)}}}" if inner else "")
  else:
    values = [_cell_value(c) for c in fn.__closure__ or ()] + list(fn.__defaults__ or ())
    values += sorted((fn.__kwdefaults__ or {}).items())
    parts = [_value_identity(v, home, seen) for v in values]
    if None in parts:
      return None
    for g in sorted(_global_names(fn.__code__)):
      if g in fn.__globals__:
        value = fn.__globals__[g]
        ident = _value_identity(value, home, seen)
        parts.append(f"{g}={ident if ident is not None else 'object:' + type(value).__qualname__}")
    own = (
      f"{name}:{_code_digest(fn.__code__)}:{hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}"
    )
  if hasattr(fn, "__wrapped__"):  # functools.wraps: the wrapper and what it wraps
    inner_id = _identity(getattr(fn, "__wrapped__"), home, seen)
    return None if inner_id is None else f"{own}[{inner_id}]"
  return own


def _identity(fn: Any, home: str | None, seen: frozenset[int]) -> str | None:
  if id(fn) in seen:
    return "<recursive>"
  seen = seen | {id(fn)}
  if isinstance(fn, types.MethodType):
    owner = fn.__self__
    if isinstance(owner, type):
      owner_id = f"class:{owner.__module__}.{owner.__qualname__}"
    elif dataclasses.is_dataclass(owner):
      owner_id = _dataclass_identity(owner, home, seen)
      if owner_id is not None:
        owner_id += f"@{_class_code(type(owner), home)}"
    else:
      return None
    inner = _identity(fn.__func__, home, seen)
    return None if owner_id is None or inner is None else f"{owner_id}.{inner}"
  if isinstance(fn, functools.partial):
    inner = _identity(fn.func, home, seen)
    args = [_value_identity(a, home, seen) for a in fn.args]
    kwargs = {k: _value_identity(v, home, seen) for k, v in sorted(fn.keywords.items())}
    if inner is None or None in args or None in kwargs.values():
      return None
    return f"partial({inner},{args},{kwargs})"
  if isinstance(fn, types.FunctionType):
    return _function_identity(fn, home, seen)
  if dataclasses.is_dataclass(fn) and not isinstance(fn, type):  # a callable dataclass
    owner_id = _dataclass_identity(fn, home, seen)
    call = _identity(type(fn).__call__, home, seen)
    return None if owner_id is None or call is None else f"{owner_id}.__call__:{call}"
  if hasattr(fn, "__wrapped__"):  # e.g. jax.jit
    inner = _identity(getattr(fn, "__wrapped__"), home, seen)
    return None if inner is None else f"{type(fn).__qualname__}({inner})"
  return None


def callable_identity(fn: Callable) -> str | None:
  """A stable identity of a function, or None when it has none a rerun could match.

  Named functions are identified by module, qualified name and a digest of their
  bytecode and constants, their closure values, defaults (keyword-only included)
  and the globals they read; functions they call from their own module are
  identified the same way, library functions by name. Bound methods add their
  owner: a class, or a dataclass instance (e.g. a Flax module) by the identity of
  every field. Wrappers (`functools.wraps`, `jax.jit`) add what they wrap;
  partials their arguments. Lambdas, and closures over values without a stable
  identity, return None: resuming with them needs a user-supplied key. The
  identity never holds a memory address, so it is the same in every process.
  """
  home = getattr(fn, "__module__", None)
  if isinstance(fn, types.FunctionType):
    # The module the code runs in: `functools.wraps` copies the wrapped function's
    # `__module__`, and a wrapper written elsewhere must still count its closure.
    home = fn.__globals__.get("__name__", home)
  if isinstance(fn, types.MethodType):
    owner = fn.__self__
    home = (owner if isinstance(owner, type) else type(owner)).__module__
  elif isinstance(fn, functools.partial):
    home = getattr(fn.func, "__module__", None)
  ident = _identity(fn, home, frozenset())
  if ident is None or " at 0x" in ident:
    return None
  return ident
