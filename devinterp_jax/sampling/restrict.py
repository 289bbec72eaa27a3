"""Weight restrictions for refined LLCs (wrLLC; Wang et al. 2024, arXiv 2410.02984).

A restriction is a pytree shaped like the params whose leaves are 0/1 float
masks: SGLD moves only the coordinates where the mask is 1 (gradient,
localisation and noise are all restricted; every other coordinate stays at
w*). Several restrictions stack on a leading [R] axis (`stack`), and
`estimate_llcs(..., restrict=...)` then estimates all of them in one program.

Selectors (all return a mask tree for one params pytree):
  by_pattern(params, regex)         leaves whose '/'-joined path matches
  by_head(params, layer, head)      one attention head: its slices of w_q, w_k,
                                    w_v ([D, H, E], head axis 1), w_o ([H, E, D],
                                    head axis 0) and b_q, b_k, b_v ([H, E]) where
                                    present; a shared output bias is no head's
  all_heads(params)                 (names, stacked masks) for every head
  by_layer(params, layer)           every parameter of one block ('block_{layer}/')
  by_group(params, group)           a named group: 'token_embed', 'pos_embed',
                                    'unembed', 'layer_norms', 'mlp', 'attention'
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np

Params = Any
# Leaf name -> head axis, in the models' explicit-head-axis convention.
HEAD_AXES = {"w_q": 1, "w_k": 1, "w_v": 1, "w_o": 0, "b_q": 0, "b_k": 0, "b_v": 0}


def path_name(path) -> str:
  """'block_0/attn/w_q' for a jax key path."""
  parts = []
  for p in path:
    parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
  return "/".join(parts)


def by_pattern(params: Params, pattern: str) -> Params:
  """Whole leaves whose path matches `pattern` (re.search)."""
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full(np.shape(x), float(bool(regex.search(path_name(path)))),
                              np.float32), params)
  if num_selected(mask) == 0:
    raise ValueError(f"restriction pattern {pattern!r} selects no parameter; paths are like "
                     f"{[path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:6]}")
  return mask


# Named groups as path patterns (the LR transformer's names; the LM models use the same).
GROUPS = {
    "token_embed": r"(^|/)token_embed/",
    "pos_embed": r"(^|/)pos_embed",
    "unembed": r"(^|/)unembed/",
    "layer_norms": r"(^|/)ln_[^/]*/",
    "mlp": r"(^|/)mlp_(in|out)/",
    "attention": r"(^|/)attn/",
}


def by_group(params: Params, group: str) -> Params:
  """A named group of parameters (`GROUPS`)."""
  if group not in GROUPS:
    raise ValueError(f"unknown parameter group {group!r}; choose from {sorted(GROUPS)}")
  return by_pattern(params, GROUPS[group])


def by_layer(params: Params, layer: int) -> Params:
  """Every parameter of block `layer` (attention, MLP and its layer norms)."""
  return by_pattern(params, rf"^block_{int(layer)}/")


def by_head(params: Params, layer: int, head: int, layer_prefix: str = "block_{layer}/attn/"
            ) -> Params:
  """One attention head's slices (see the module docstring)."""
  prefix = layer_prefix.format(layer=layer)

  def leaf_mask(path, x):
    name = path_name(path)
    m = np.zeros(np.shape(x), np.float32)
    leaf = name.rsplit("/", 1)[-1]
    if name.startswith(prefix) and leaf in HEAD_AXES:
      axis = HEAD_AXES[leaf]
      if not 0 <= head < np.shape(x)[axis]:
        raise ValueError(f"head {head} out of range for {name} of shape {np.shape(x)}")
      index = [slice(None)] * np.ndim(x)
      index[axis] = head
      m[tuple(index)] = 1.0
    return m

  mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
  if num_selected(mask) == 0:
    raise ValueError(f"no attention weights under {prefix!r} (layer {layer})")
  return mask


def all_heads(params: Params, layer_prefix: str = "block_{layer}/attn/"
              ) -> tuple[list[str], Params]:
  """Every head of every layer: names like 'L0H1' and masks stacked on [R]."""
  names, masks = [], []
  layer = 0
  while any(path_name(p).startswith(layer_prefix.format(layer=layer))
            for p, _ in jax.tree_util.tree_leaves_with_path(params)):
    w_q = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
           if path_name(p) == layer_prefix.format(layer=layer) + "w_q"]
    num_heads = np.shape(w_q[0])[1] if w_q else 0
    for h in range(num_heads):
      names.append(f"L{layer}H{h}")
      masks.append(by_head(params, layer, h, layer_prefix))
    layer += 1
  if not masks:
    raise ValueError(f"no attention layers matching {layer_prefix!r}")
  return names, stack(masks)


def stack(masks: Sequence[Params]) -> Params:
  """Restrictions on a leading [R] axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *masks)


def num_selected(mask: Params, leading_axes: int = 0) -> np.ndarray | int:
  """Number of selected coordinates (per restriction with `leading_axes=1`)."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(mask)]
  if leading_axes == 0:
    return int(sum(x.sum() for x in leaves))
  return sum(x.reshape(x.shape[0], -1).sum(-1) for x in leaves).astype(int)


def apply(mask: Params | None, tree: Params) -> Params:
  """`tree` with unselected coordinates zeroed (identity without a mask)."""
  if mask is None:
    return tree
  return jax.tree.map(lambda m, x: (m * x).astype(x.dtype), mask, tree)


def check(mask: Params, params: Params, leading_axes: int = 0) -> None:
  """Names the problem when a restriction does not fit the params."""
  if jax.tree.structure(mask) != jax.tree.structure(params):
    raise ValueError("the restriction's pytree structure differs from the params': "
                     f"{jax.tree.structure(mask)} vs {jax.tree.structure(params)}")
  for (path, m), x in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params)):
    if np.shape(m)[leading_axes:] != np.shape(x):
      raise ValueError(f"restriction leaf {path_name(path)} has shape {np.shape(m)}, the "
                       f"params leaf {np.shape(x)}")
