"""Weight restrictions for refined LLCs (wrLLC; Wang et al. 2024, arXiv 2410.02984).

A restriction is a pytree shaped like the params whose leaves are 0/1 float
masks: SGLD moves only the coordinates where the mask is 1 (gradient,
localisation and noise are all restricted; every other coordinate stays at
w*). Several restrictions stack on a leading [R] axis (`stack`), and
`estimate_llcs(..., restrict=...)` then estimates all of them in one program.
Inside the program the masks become gather indices (`compact`): a chain
carries only its k selected coordinates (state, noise, localisation), and the
model sees `embed(w*, θ)`, so frozen leaves cost no weight gradient either.

Selectors (all return a mask tree for one params pytree):
  by_pattern(params, regex)         leaves whose '/'-joined path matches
  by_head(params, layer, head)      one attention head: its slices of w_q, w_k,
                                    w_v ([D, H, E], head axis 1), w_o ([H, E, D],
                                    head axis 0) and b_q, b_k, b_v ([H, E]) where
                                    present; a shared output bias is no head's
  all_heads(params)                 (names, stacked masks) for every head
  from_spec(params, spec)           'heads', 'layers', 'groups', 'head:l:h', … (launchers)
  by_layer(params, layer)           every parameter of one block ('block_{layer}/')
  by_group(params, group)           a named group: 'token_embed', 'pos_embed',
                                    'unembed', 'layer_norms', 'mlp', 'attention'
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np
from devinterp_jax.typing import Params

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
    lambda path, x: np.full(np.shape(x), float(bool(regex.search(path_name(path)))), np.float32),
    params,
  )
  if num_selected(mask) == 0:
    raise ValueError(
      f"restriction pattern {pattern!r} selects no parameter; paths are like "
      f"{[path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:6]}"
    )
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


def by_head(
  params: Params, layer: int, head: int, layer_prefix: str = "block_{layer}/attn/"
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
      index: list[slice | int] = [slice(None)] * np.ndim(x)
      index[axis] = head
      m[tuple(index)] = 1.0
    return m

  mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
  if num_selected(mask) == 0:
    raise ValueError(f"no attention weights under {prefix!r} (layer {layer})")
  return mask


def all_heads(
  params: Params, layer_prefix: str = "block_{layer}/attn/"
) -> tuple[list[str], Params]:
  """Every head of every layer: names like 'L0H1' and masks stacked on [R]."""
  names, masks = [], []
  layer = 0
  while any(
    path_name(p).startswith(layer_prefix.format(layer=layer))
    for p, _ in jax.tree_util.tree_leaves_with_path(params)
  ):
    w_q = [
      x
      for p, x in jax.tree_util.tree_leaves_with_path(params)
      if path_name(p) == layer_prefix.format(layer=layer) + "w_q"
    ]
    num_heads = np.shape(w_q[0])[1] if w_q else 0
    for h in range(num_heads):
      names.append(f"L{layer}H{h}")
      masks.append(by_head(params, layer, h, layer_prefix))
    layer += 1
  if not masks:
    raise ValueError(f"no attention layers matching {layer_prefix!r}")
  return names, stack(masks)


def from_spec(params: Params, spec: str) -> tuple[list[str], Params]:
  """Named restrictions stacked on [R] from a command-line spec.

  'heads' (every attention head), 'layers' (every block), 'groups' (every
  named group the model has), 'group:<name>', 'layer:<l>', 'head:<l>:<h>', or
  any other string as a path regex (`by_pattern`).
  """
  if spec == "heads":
    return all_heads(params)
  paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if spec == "layers":
    layers = sorted({int(m.group(1)) for p in paths if (m := re.match(r"block_(\d+)/", p))})
    if not layers:
      raise ValueError("restriction 'layers': the params have no 'block_<l>/' layers")
    return [f"layer{l}" for l in layers], stack([by_layer(params, l) for l in layers])
  if spec == "groups":
    names = [g for g, pat in GROUPS.items() if any(re.search(pat, p) for p in paths)]
    return names, stack([by_group(params, g) for g in names])
  kind, _, arg = spec.partition(":")
  try:
    if kind == "group" and arg:
      return [arg], stack([by_group(params, arg)])
    if kind == "layer" and arg:
      return [f"layer{int(arg)}"], stack([by_layer(params, int(arg))])
    if kind == "head" and arg:
      layer, head = (int(v) for v in arg.split(":"))
      return [f"L{layer}H{head}"], stack([by_head(params, layer, head)])
  except ValueError as e:
    raise ValueError(f"bad restriction spec {spec!r}: {e}") from e
  if not spec:
    raise ValueError(
      "empty restriction spec; use 'heads', 'layers', 'groups', "
      "'group:<name>', 'layer:<l>', 'head:<l>:<h>' or a path regex"
    )
  return [spec], stack([by_pattern(params, spec)])


def stack(masks: Sequence[Params]) -> Params:
  """Restrictions on a leading [R] axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *masks)


def num_selected(mask: Params, leading_axes: int = 0) -> np.ndarray | int:
  """Number of selected coordinates (per restriction with `leading_axes=1`)."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(mask)]
  if leading_axes == 0:
    return int(sum(x.sum() for x in leaves))
  per_leaf = (x.reshape(x.shape[0], -1).sum(-1) for x in leaves)
  return cast(np.ndarray, sum(per_leaf)).astype(int)  # a sum of arrays [R]


def apply(mask: Params | None, tree: Params) -> Params:
  """`tree` with unselected coordinates zeroed (identity without a mask)."""
  if mask is None:
    return tree
  return jax.tree.map(lambda m, x: (m * x).astype(x.dtype), mask, tree)


def check_binary(masks: Params) -> None:
  """Refuses masks with values other than 0 and 1 (a weighting is not a restriction)."""
  for path, m in jax.tree_util.tree_leaves_with_path(masks):
    x = np.asarray(m)
    bad = ~((x == 0) | (x == 1))
    if bad.any():
      values = np.unique(x[bad])[:5]
      raise ValueError(
        f"restriction leaf {path_name(path)} has values {values.tolist()} "
        f"besides 0 and 1 ({int(bad.sum())} entries); a restriction is a 0/1 "
        f"mask selecting the coordinates SGLD moves"
      )


def check(mask: Params, params: Params, leading_axes: int = 0) -> None:
  """Names the problem when a restriction does not fit the params."""
  if jax.tree.structure(mask) != jax.tree.structure(params):
    raise ValueError(
      "the restriction's pytree structure differs from the params': "
      f"{jax.tree.structure(mask)} vs {jax.tree.structure(params)}"
    )
  for (path, m), x in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params)):
    if np.shape(m)[leading_axes:] != np.shape(x):
      raise ValueError(
        f"restriction leaf {path_name(path)} has shape {np.shape(m)}, the params leaf {np.shape(x)}"
      )


class Compaction(NamedTuple):
  """Restrictions as gather indices, so frozen coordinates carry no sampler state.

  `leaves` are the positions (in `jax.tree.leaves` order) of the leaves that
  any restriction touches; their flattened concatenation is the "union
  vector". `index` [R, k] holds each restriction's coordinates in it (k = the
  largest restriction; shorter ones are padded), `valid` [R, k] marks the real
  entries (None when every restriction has exactly k coordinates).
  """

  leaves: tuple[int, ...]
  index: np.ndarray  # pyright: ignore[reportIncompatibleMethodOverride]  (not tuple.index)
  valid: np.ndarray | None


def compact(masks: Params) -> Compaction:
  """The gather form of 0/1 masks stacked on a leading [R] axis."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(masks)]
  touched = tuple(i for i, x in enumerate(leaves) if x.any())
  if not touched:
    raise ValueError("the restrictions select no coordinate")
  union = np.concatenate([leaves[i].reshape(leaves[i].shape[0], -1) for i in touched], axis=1)
  per = [np.flatnonzero(row) for row in union]
  k = max(len(p) for p in per)
  if min(len(p) for p in per) == 0:
    raise ValueError("a restriction selects no coordinate")
  index = np.zeros((len(per), k), np.int32)
  valid = np.zeros((len(per), k), np.float32)
  for r, p in enumerate(per):
    index[r, : len(p)] = p
    index[r, len(p) :] = p[0]  # padding: a real coordinate, never moved (valid = 0)
    valid[r, : len(p)] = 1.0
  return Compaction(touched, index, None if valid.all() else valid)


def _union(params: Params, leaves: tuple[int, ...]) -> jax.Array:
  flat = jax.tree.leaves(params)
  return jnp.concatenate([jnp.ravel(flat[i]) for i in leaves])


def gather(params: Params, leaves: tuple[int, ...], index: jax.Array) -> jax.Array:
  """The selected coordinates [k] of `params` (one restriction's `index`)."""
  return jnp.take(_union(params, leaves), index)


def embed(
  params_star: Params,
  leaves: tuple[int, ...],
  index: jax.Array,
  theta: jax.Array,
  theta_star: jax.Array,
) -> Params:
  """`params_star` with its selected coordinates moved by `theta − theta_star`.

  A scatter-add, so padded entries (which never move) and repeated indices are
  harmless; gradients flow only into the touched leaves, so the backward pass
  skips the weight gradients of every frozen leaf.
  """
  flat, treedef = jax.tree.flatten(params_star)
  union = _union(params_star, leaves).at[index].add((theta - theta_star).astype(flat[0].dtype))
  out, offset = list(flat), 0
  for i in leaves:
    size = int(np.prod(np.shape(flat[i])))
    out[i] = union[offset : offset + size].reshape(np.shape(flat[i])).astype(flat[i].dtype)
    offset += size
  return treedef.unflatten(out)
