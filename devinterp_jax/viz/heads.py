"""Head-level wrLLC figures (`analysis/heads.py` computes the clusters and summaries).

`clusters` is duck-typed as `analysis.heads.HeadClusters`: `labels` [R], `names`,
`method`, `normalize`, `num_clusters`, `centers` [K, N], `normalized` [R, N] (the
trajectories the centres average), `linkage_matrix` (scipy format, or None) and
`linkage`. `boundaries` is a stage result (anything with `stages` and
`boundary_steps`, e.g. `StageBoundaries`) or a sequence of boundary steps.
"""

from __future__ import annotations

import math
import types
from typing import Any, Mapping, Sequence

import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures
from devinterp_jax.viz import overlap as overlap_viz
from devinterp_jax.viz.stages import mark_boundaries, shade_stages


def _check(steps, llc_RxN, names) -> tuple[np.ndarray, np.ndarray, list[str]]:
  x = np.asarray(llc_RxN, dtype=float)
  if x.ndim != 2 or min(x.shape) < 1:
    raise ValueError(f"llc_RxN must be 2-D [heads, checkpoints], got shape {x.shape}")
  names = [f"head {i}" for i in range(x.shape[0])] if names is None else [str(n) for n in names]
  if len(names) != x.shape[0]:
    raise ValueError(f"{len(names)} names for {x.shape[0]} heads")
  steps = np.asarray(steps)
  if steps.shape != (x.shape[1],):
    raise ValueError(f"steps has shape {steps.shape}, expected ({x.shape[1]},)")
  return steps, x, names


def as_stages(boundaries, steps: np.ndarray):
  """A stage result as given, or boundary steps turned into one (stages S1, S2, … from
  the first to the last checkpoint)."""
  if boundaries is None or hasattr(boundaries, "stages"):
    return boundaries
  b = sorted(int(s) for s in boundaries)
  starts, ends = [int(steps[0])] + b, b + [int(steps[-1])]
  return types.SimpleNamespace(
    boundary_steps=tuple(b),
    stability=None,
    stages=[
      {"label": f"S{i + 1}", "start_step": s, "end_step": e}
      for i, (s, e) in enumerate(zip(starts, ends))
    ],
  )


def head_styles(names: list[str], clusters: Any | None) -> list[dict[str, Any]]:
  """Colour by cluster (line style varies within one), else one colour per head."""
  if clusters is None:
    cmap = figures.colormap("tab10" if len(names) <= 10 else "tab20")
    return [dict(color=cmap(i % cmap.N), ls="-", label=n) for i, n in enumerate(names)]
  if tuple(names) != tuple(clusters.names):
    raise ValueError(f"clusters were computed for other heads: {list(clusters.names)} != {names}")
  cmap, dashes = figures.colormap("tab10"), ("-", "--", ":", "-.")
  seen: dict[int, int] = {}
  out = []
  for n, l in zip(names, np.asarray(clusters.labels).tolist()):
    j = seen.get(l, 0)
    seen[l] = j + 1
    out.append(dict(color=cmap(l % 10), ls=dashes[j % len(dashes)], label=f"{n} (c{l})"))
  return out


def head_trajectories_figure(
  steps,
  llc_RxN,
  names: Sequence[str],
  *,
  sem_RxN=None,
  boundaries: Any = None,
  clusters: Any | None = None,
  title: str = "",
) -> Figure:
  """wrLLC per head over log step, and the across-head dispersion.

  Top: one line per head (± `sem_RxN` band), coloured by cluster when
  `clusters` is given (legend names the heads), stages shaded and labelled
  between `boundaries`. Bottom: mean ± std across heads (population std,
  ddof=0) and, on a twin axis, the variance, over the checkpoints where every
  head is finite. Step 0 switches the x axis to symlog. NaN values leave gaps.
  """
  steps, x, names = _check(steps, llc_RxN, names)
  if sem_RxN is not None:
    sem_RxN = np.asarray(sem_RxN, dtype=float)
    if sem_RxN.shape != x.shape:
      raise ValueError(f"sem_RxN has shape {sem_RxN.shape}, llc_RxN {x.shape}")
  styles = head_styles(names, clusters)
  stages = as_stages(boundaries, steps)
  xs = steps.astype(float)

  fig, (ax, ax_d) = figures.figure(
    2, 1, figsize=(9, 7.2), sharex=True, gridspec_kw={"height_ratios": [1.6, 1]}
  )
  for a in (ax, ax_d):
    if stages is not None:
      shade_stages(a, stages, label=a is ax)
      mark_boundaries(a, stages)
  for r, style in enumerate(styles):
    ax.plot(xs, x[r], marker=".", ms=3, lw=1.3, **style)
    if sem_RxN is not None:
      ax.fill_between(
        xs, x[r] - sem_RxN[r], x[r] + sem_RxN[r], color=style["color"], alpha=0.15, lw=0
      )
  finite = x[np.isfinite(x)]
  if finite.size:
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.1 * max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad, hi + 2 * pad)  # room for the stage labels
  ax.set_ylabel(r"wrLLC $\hat\lambda$ per head")
  ax.legend(
    fontsize=7,
    ncol=max(1, math.ceil(len(names) / 12)),
    loc="center left",
    bbox_to_anchor=(1.01, 0.5),
    title="head (cluster)" if clusters else "head",
    title_fontsize=7,
  )
  ax.set_title(
    title
    or "wrLLC per head"
    + (f" ({clusters.method} clusters, {clusters.normalize})" if clusters else "")
  )

  ok_N = np.all(np.isfinite(x), axis=0)
  if ok_N.any():
    mean, var = x[:, ok_N].mean(axis=0), x[:, ok_N].var(axis=0)
    std = np.sqrt(var)
    ax_d.plot(xs[ok_N], mean, color="black", lw=1.5, label="mean over heads")
    ax_d.fill_between(
      xs[ok_N], mean - std, mean + std, color="gray", alpha=0.3, lw=0, label="± std over heads"
    )
    ax_v = ax_d.twinx()
    ax_v.plot(xs[ok_N], var, color="tab:red", lw=1.2, ls="--", label="variance (ddof=0)")
    ax_v.set_ylabel("variance across heads", color="tab:red")
    h1, l1 = ax_d.get_legend_handles_labels()
    h2, l2 = ax_v.get_legend_handles_labels()
    ax_d.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
  ax_d.set_ylabel("wrLLC across heads")
  for a in (ax, ax_d):
    figures.step_axis(a, xs, label=a is ax_d)
  fig.tight_layout()
  return fig


def plot_head_trajectories(
  steps,
  llc_RxN,
  names: Sequence[str],
  *,
  sem_RxN=None,
  boundaries: Any = None,
  clusters: Any | None = None,
  path: str,
  title: str = "",
) -> str:
  """`head_trajectories_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    head_trajectories_figure(
      steps, llc_RxN, names, sem_RxN=sem_RxN, boundaries=boundaries, clusters=clusters, title=title
    ),
    path,
  )


def dendrogram_layout(
  z: np.ndarray, num_leaves: int
) -> tuple[list[int], list[tuple[int, list[float], list[float]]]]:
  """The leaf order and links of a scipy-format linkage matrix `z` [R − 1, 4], laid out
  as `scipy.cluster.hierarchy.dendrogram` does without sorting (leaf k at x = 5 + 10k,
  the first child on the left; links in post-order): (leaves, [(node id, xs[4], ys[4])])."""
  z = np.asarray(z, np.float64)
  leaves: list[int] = []
  links: list[tuple[int, list[float], list[float]]] = []

  def walk(i: int) -> tuple[float, float]:
    if i < num_leaves:
      leaves.append(i)
      return 5.0 + 10.0 * (len(leaves) - 1), 0.0
    a, b = int(z[i - num_leaves, 0]), int(z[i - num_leaves, 1])
    xa, ha = walk(a)
    xb, hb = walk(b)
    h = float(z[i - num_leaves, 2])
    links.append((i, [xa, xa, xb, xb], [ha, h, h, hb]))
    return 0.5 * (xa + xb), h

  walk(2 * num_leaves - 2)
  return leaves, links


def _draw_dendrogram(ax, clusters: Any, names: list[str], styles: list[dict]) -> None:
  z = np.asarray(clusters.linkage_matrix, np.float64)
  r, k = len(names), clusters.num_clusters
  labels = np.asarray(clusters.labels)
  members: list[list[int]] = [[i] for i in range(r)]
  for a, b in z[:, :2].astype(int):
    members.append(members[a] + members[b])
  tab10 = figures.colormap("tab10")
  order, links = dendrogram_layout(z, r)
  for node, xs, ys in links:  # a link inside one cluster takes the cluster's colour
    labs = set(labels[members[node]].tolist())
    colour = matplotlib.colors.to_hex(tab10(labs.pop() % 10)) if len(labs) == 1 else "gray"
    ax.plot(xs, ys, color=colour, lw=1.0)
  ax.set_xlim(0, 10 * r)
  ax.set_ylim(0, 1.05 * float(z[:, 2].max()))
  ax.set_xticks(
    5 + 10 * np.arange(r),
    [names[i] for i in order],
    rotation=0 if r <= 20 else (45 if r <= 40 else 90),
    fontsize=8,
  )
  ax.tick_params(axis="x", length=0)
  for tick, i in zip(ax.get_xticklabels(), order):
    tick.set_color(styles[i]["color"])
  if 1 < k < r:
    cut = 0.5 * (z[-k, 2] + z[-k + 1, 2])
    ax.axhline(cut, color="black", ls="--", lw=0.8)
  ax.set_ylabel(f"{clusters.linkage} distance", fontsize=8)
  ax.set_title(f"dendrogram ({clusters.linkage} linkage, cut at {k} clusters)", fontsize=9)


def head_clusters_figure(
  steps, llc_RxN, names: Sequence[str], clusters: Any, title: str = ""
) -> Figure:
  """Normalised trajectories per cluster (`clusters.normalized`, one panel each, cluster
  mean in black).

  For hierarchical clusters a dendrogram panel follows, cut (dashed line) into
  `clusters.num_clusters` clusters: links and leaf names inside one cluster
  take its colour, the links above the cut are gray.
  """
  steps, x, names = _check(steps, llc_RxN, names)
  styles = head_styles(names, clusters)
  norm_RxN = np.asarray(clusters.normalized, dtype=float)
  if norm_RxN.shape != x.shape:
    raise ValueError(f"clusters hold trajectories of shape {norm_RxN.shape}, llc_RxN {x.shape}")
  xs = steps.astype(float)
  labels = np.asarray(clusters.labels)
  k = clusters.num_clusters
  cols = min(3, k)
  rows = -(-k // cols)
  dendro = clusters.linkage_matrix is not None
  fig, grid = figures.figure(
    rows + int(dendro),
    cols,
    grid=True,
    figsize=(
      4.2 * cols if not dendro else max(4.2 * cols, 8),
      3.0 * rows + (3.2 if dendro else 0) + 0.4,
    ),
  )
  first = None
  for j in range(k):
    ax = fig.add_subplot(grid[j // cols, j % cols], sharex=first, sharey=first)
    first = first or ax
    for r in np.flatnonzero(labels == j):
      ax.plot(xs, norm_RxN[r], lw=1.0, alpha=0.8, **styles[r])
    ax.plot(xs, clusters.centers[j], color="black", lw=2.2, label="cluster mean")
    figures.step_axis(ax, xs, label=False)
    ax.set_title(f"cluster {j} ({int(np.sum(labels == j))} heads)", fontsize=9)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel(f"wrLLC ({clusters.normalize})", fontsize=8)
    ax.legend(fontsize=6, loc="best")
  if dendro:
    _draw_dendrogram(fig.add_subplot(grid[rows, :]), clusters, names, styles)
  fig.suptitle(
    title or f"{clusters.method} clusters of wrLLC trajectories ({clusters.normalize})", fontsize=10
  )
  fig.tight_layout()
  return fig


def plot_head_clusters(
  steps, llc_RxN, names: Sequence[str], clusters: Any, path: str, title: str = ""
) -> str:
  """`head_clusters_figure` written to `path` (PNG); returns `path`."""
  return figures.save(head_clusters_figure(steps, llc_RxN, names, clusters, title), path)


def dispersion_and_overlap_figure(
  steps,
  spread: Mapping[str, np.ndarray],
  metrics: Mapping[str, np.ndarray],
  boundaries: Sequence[float] = (),
) -> Figure:
  """wrLLC mean and variance across heads (`spread`: "mean", "variance" [N]), beside the
  overlap and robustness (`metrics["overlap/…"]`, weak-ablation checkpoints masked as
  in `viz.overlap`) over log step."""
  steps = np.asarray(steps)
  have_overlap = "overlap/overlap_mean" in metrics
  fig, axes = figures.figure(
    1, 2 if have_overlap else 1, figsize=(12 if have_overlap else 6, 4), squeeze=False
  )
  ax = axes[0, 0]
  ax.plot(steps, spread["mean"], "k-o", ms=3, label="mean across heads")
  ax.set_ylabel("wrLLC mean across heads")
  ax2 = ax.twinx()
  ax2.plot(steps, spread["variance"], "C3-s", ms=3, label="variance across heads")
  ax2.set_ylabel("wrLLC variance across heads", color="C3")
  ax.set_title("wrLLC dispersion across heads")
  panels = [ax]
  if have_overlap:
    ax = axes[0, 1]
    delta_all = metrics.get("overlap/delta_all")
    mask = (
      overlap_viz.weak_ablation_mask(delta_all)
      if delta_all is not None
      else np.zeros(len(steps), bool)
    )
    overlap_viz.shade_masked(ax, steps, mask)
    ax.plot(
      steps,
      overlap_viz.masked(metrics["overlap/overlap_mean"], mask),
      "C0-o",
      ms=3,
      label="mean off-diagonal O",
    )
    ax.plot(
      steps,
      overlap_viz.masked(metrics["overlap/overlap_max"], mask),
      "C1-^",
      ms=3,
      label="max off-diagonal O",
    )
    ax.plot(
      steps,
      overlap_viz.masked(metrics["overlap/robustness"], mask),
      "C2-s",
      ms=3,
      label="robustness",
    )
    note = overlap_viz.mask_note(mask)
    ax.set_title("Functional overlap (mean ablation)" + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(fontsize=8)
    panels.append(ax)
  for ax in panels:
    figures.step_axis(ax, steps, boundaries=boundaries, grid=False)
  fig.tight_layout()
  return fig


def plot_dispersion_and_overlap(
  steps, spread: Mapping[str, np.ndarray], metrics: Mapping[str, np.ndarray], boundaries, path: str
) -> str:
  """`dispersion_and_overlap_figure` written to `path` (PNG); returns `path`."""
  return figures.save(dispersion_and_overlap_figure(steps, spread, metrics, boundaries), path)
