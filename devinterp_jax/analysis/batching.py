"""Batching over checkpoints: one compiled program per metric function.

`map_checkpoints(fn, checkpoints, data)` evaluates a pure per-checkpoint
function on every checkpoint, `checkpoint_chunk` at a time, in one jitted
`vmap` over checkpoints. Every setting's metrics, the Hessian and the head
overlap go through it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from devinterp_jax.storage import chunks
from devinterp_jax.typing import Params


def map_checkpoints(
  fn: Callable[[Params, Any], Mapping[str, jax.Array]],
  params_list: Sequence[Params],
  data: Any = None,
  *,
  checkpoint_chunk: int = 8,
) -> dict[str, np.ndarray]:
  """Runs `fn(params, data)` for every checkpoint, `checkpoint_chunk` at a time.

  `params_list` is indexed chunk by chunk (it may load lazily). Each chunk is
  stacked, the last one padded by repeating its last checkpoint, and evaluated
  by one jitted `vmap` over checkpoints, so a single shape compiles. `fn` should
  be the same object across calls (e.g. cached) for jit to reuse its program.

  Args:
    fn: pure function of one checkpoint's params and the shared `data`,
      returning a dict of arrays.
    params_list: the checkpoints' param pytrees (same structure and shapes).
    data: pytree shared by every checkpoint (passed, not closed over).
    checkpoint_chunk: checkpoints per compiled call.

  Returns:
    The dict of `fn`'s outputs with a leading checkpoint axis [N].
  """
  if isinstance(params_list, Mapping):
    raise TypeError(
      "params_list must be a sequence of param pytrees, got a mapping "
      "(wrap a single checkpoint as [params])"
    )
  chunk = chunks.chunk_size(len(params_list), checkpoint_chunk)
  program = _vmapped(fn)
  outputs = []
  for lo, hi, stacked in chunks.iterate(params_list, chunk):
    out = jax.device_get(program(stacked, data))
    outputs.append({k: np.asarray(v)[: hi - lo] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


@functools.lru_cache(maxsize=32)
def _vmapped(fn):
  return jax.jit(jax.vmap(fn, in_axes=(0, None)))
