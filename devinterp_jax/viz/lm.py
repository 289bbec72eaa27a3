"""Language-model figure (App. C; `experiments/lm/metrics.py` computes the metrics)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.typing import head_name
from devinterp_jax.viz import figures


def _head_panel(ax, steps, arr_NxLxH, chance, title):
  arr = np.asarray(arr_NxLxH)
  _, L, H = arr.shape
  colors = figures.colormap("tab10")(np.linspace(0, 1, 10))
  styles = ("-", "--", ":", "-.")
  for l in range(L):
    for h in range(H):
      ax.plot(
        steps, arr[:, l, h], color=colors[h % 10], ls=styles[l % 4], lw=1.2, label=head_name(l, h)
      )
  if chance is not None:
    ax.axhline(float(np.asarray(chance).ravel()[0]), color="gray", lw=0.8, ls=":", label="chance")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=6, ncol=2)
  ax.set_title(title)


def lm_metrics_figure(
  steps: Any, metrics: Mapping[str, Any], *, boundaries: Sequence[float] = (), title: str = ""
) -> Figure:
  """Nine panels over log step (stage boundaries dashed): loss vs bigram entropy and
  the bigram score; n-gram scores; ICL score; positional-ablation loss increase;
  previous-token and prefix-matching scores per head (line style = layer); W_pos
  PCA variance; K-composition (layer 0 → 1, the 6 largest at the end); the
  per-position loss of a few checkpoints.
  """
  steps = np.asarray(steps)
  fig, axes = figures.figure(3, 3, figsize=(16, 12))
  ax = axes[0, 0]
  for name, label, kw in (
    ("loss", "validation loss", {}),
    ("bigram_score", "bigram score (CE to empirical bigram)", {}),
    ("bigram_entropy", "bigram entropy (train)", {"ls": "--"}),
  ):
    if name in metrics:
      ax.plot(steps, metrics[name], label=label, **kw)
  if "bigram_kl_pos1" in metrics:
    ax2 = ax.twinx()
    ax2.plot(steps, metrics["bigram_kl_pos1"], color="tab:red", alpha=0.6, lw=1)
    ax2.set_ylabel("KL to bigram at [BOS, a] (red)", fontsize=7, color="tab:red")
  ax.set_title("loss vs bigram statistics (nats)")
  ax = axes[0, 1]
  for name in sorted(k for k in metrics if k.startswith("ngram_score_")):
    ax.plot(steps, metrics[name], marker=".", label=f"n = {name[len('ngram_score_') :]}")
  ax.axhline(1, color="gray", lw=0.8)
  ax.set_title("n-gram score: val loss at n / n-gram loss")
  ax = axes[0, 2]
  if "icl_score" in metrics:
    label = "ICL score"
    if "icl_early_position" in metrics and "icl_late_position" in metrics:
      p0 = int(np.asarray(metrics["icl_early_position"])[0])
      p1 = int(np.asarray(metrics["icl_late_position"])[0])
      label = f"L(token {p1}) − L(token {p0})"
    ax.plot(steps, metrics["icl_score"], marker=".", label=label)
  ax.axhline(0, color="gray", lw=0.8)
  ax.set_title("ICL score")
  ax = axes[1, 0]
  if "pos_ablation_loss_mean" in metrics:
    ax.plot(steps, metrics["pos_ablation_loss_mean"], marker=".", label="mean over positions")
  if "pos_ablation_loss" in metrics:
    arr = np.asarray(metrics["pos_ablation_loss"])
    for p in sorted({1, 2, 4, arr.shape[1] // 2, arr.shape[1]}):
      if 1 <= p <= arr.shape[1]:
        ax.plot(steps, arr[:, p - 1], lw=0.8, alpha=0.7, label=f"token {p}")
  ax.axhline(0, color="gray", lw=0.8)
  ax.set_title("W_pos mean-ablation: loss increase (nats)")
  if "prev_token_score" in metrics:
    _head_panel(
      axes[1, 1],
      steps,
      metrics["prev_token_score"],
      metrics.get("prev_token_chance"),
      "previous-token score per head",
    )
  else:
    axes[1, 1].set_title("previous-token score per head")
  if "prefix_score" in metrics:
    _head_panel(
      axes[1, 2],
      steps,
      metrics["prefix_score"],
      metrics.get("prefix_chance"),
      "prefix-matching score per head",
    )
  else:
    axes[1, 2].set_title("prefix-matching score per head")
  ax = axes[2, 0]
  for i in (1, 2, 3):
    if f"pos_pca_top{i}" in metrics:
      ax.plot(steps, metrics[f"pos_pca_top{i}"], label=f"top {i} PCs")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("W_pos PCA: cumulative explained variance")
  ax = axes[2, 1]
  if "comp_k" in metrics:
    comp = np.asarray(metrics["comp_k"])
    _, H0, H1 = comp.shape
    flat = comp.reshape(len(steps), -1)
    top = np.argsort(-np.nan_to_num(flat[-1]))[:6]
    ax.plot(steps, np.median(flat, axis=1), color="k", ls="--", label="median pair")
    for j in top:
      ax.plot(steps, flat[:, j], label=f"{head_name(0, j // H1)}→{head_name(1, j % H1)}")
  ax.set_title("K-composition (layer 0 → layer 1)")
  for ax in list(axes[:2].flat) + [axes[2, 0], axes[2, 1]]:
    figures.step_axis(ax, steps, boundaries=boundaries)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6, ncol=2 if ax in (axes[1, 1], axes[1, 2]) else 1)
  ax = axes[2, 2]
  if "loss_per_position" in metrics:
    lpp = np.asarray(metrics["loss_per_position"])
    idx = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
    colors = figures.colormap("viridis")(np.linspace(0, 0.9, len(idx)))
    pos = np.arange(1, lpp.shape[1] + 1)
    for c, i in zip(colors, idx):
      ax.plot(pos, lpp[i], color=c, label=f"step {steps[i]}")
    ax.set_xscale("log")  # token position, not a training step
    ax.set_xlabel("token position")
    ax.legend(fontsize=6)
  ax.set_title("validation loss per position")
  ax.grid(alpha=0.3, which="both")
  fig.suptitle(title or "LM developmental metrics (App. C)")
  fig.tight_layout()
  return fig


def plot_lm_metrics(
  steps: Any,
  metrics: Mapping[str, Any],
  path: str,
  *,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> str:
  """`lm_metrics_figure` written to `path` (PNG); returns `path`."""
  return figures.save(lm_metrics_figure(steps, metrics, boundaries=boundaries, title=title), path)
