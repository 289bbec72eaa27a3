"""Checkpoint sequences read chunk by chunk for batched (vmapped) programs.

A sweep over C checkpoints indexes the sequence `chunk` at a time (it may load
lazily from disk), stacks each chunk on a new leading axis and pads the last
one by repeating its final checkpoint, so every call has one shape and the
program compiles once. The LLC estimator, the calibration grid and the
analysis metrics (behaviour, structure, Hessian) all batch this way.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np
from devinterp_jax.typing import Params


def stack(trees: Sequence[Params], first_index: int = 0) -> Params:
  """Stacks checkpoints on a new leading axis; names any that does not fit."""
  ref = jax.tree.structure(trees[0])
  ref_shapes = [np.shape(x) for x in jax.tree.leaves(trees[0])]
  for i, tree in enumerate(trees[1:], start=1):
    if jax.tree.structure(tree) != ref:
      raise ValueError(
        f"checkpoint {first_index + i} has another pytree structure than "
        f"checkpoint {first_index}: {jax.tree.structure(tree)} vs {ref}"
      )
    shapes = [np.shape(x) for x in jax.tree.leaves(tree)]
    if shapes != ref_shapes:
      bad = next(j for j, (a, b) in enumerate(zip(shapes, ref_shapes)) if a != b)
      raise ValueError(
        f"checkpoint {first_index + i} has leaf {bad} of shape {shapes[bad]}, "
        f"checkpoint {first_index} has {ref_shapes[bad]}"
      )
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def pad(stacked: Params, size: int) -> Params:
  """Pads the leading axis to `size` by repeating the last entry."""

  def pad_leaf(x):
    missing = size - x.shape[0]
    return x if missing <= 0 else np.concatenate([x, np.repeat(x[-1:], missing, axis=0)])

  return jax.tree.map(pad_leaf, stacked)


def chunk_size(num: int, checkpoint_chunk: int | None) -> int:
  """The chunk size actually used: at most `num`; None means all at once."""
  if num < 1:
    raise ValueError("the checkpoint sequence is empty")
  chunk = num if checkpoint_chunk is None else int(checkpoint_chunk)
  if chunk < 1:
    raise ValueError(f"checkpoint_chunk must be >= 1, got {checkpoint_chunk}")
  return min(chunk, num)


def iterate(checkpoints: Sequence[Params], chunk: int) -> Iterator[tuple[int, int, Params]]:
  """Yields (lo, hi, stacked checkpoints lo..hi−1 padded to `chunk`)."""
  for lo in range(0, len(checkpoints), chunk):
    hi = min(lo + chunk, len(checkpoints))
    yield lo, hi, pad(stack([checkpoints[i] for i in range(lo, hi)], lo), chunk)
