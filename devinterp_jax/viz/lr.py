"""In-context linear regression figures: behaviour (App. D.1) and structure (App. D.2).

`metrics` are the flat dicts of `experiments.icl_regression.behaviour.behaviour_metrics` and
`experiments.icl_regression.structure.structure_metrics` (every entry has the leading checkpoint
axis [N]).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.viz import figures


def _per_prediction(metrics: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
  """`{name}_k1 … {name}_kK` stacked into [N, K], or None without `{name}_k1`."""
  cols, k = [], 1
  while f"{name}_k{k}" in metrics:
    cols.append(np.asarray(metrics[f"{name}_k{k}"], np.float64))
    k += 1
  return np.stack(cols, axis=-1) if cols else None


def distinct_series(series: Sequence[tuple[str, Any]]) -> list[tuple[str, np.ndarray]]:
  """(label, values) pairs with exact duplicates merged: a series equal to an earlier
  one (NaN equal to NaN) is not drawn again; the earlier one's label names both,
  "a = b". E.g. with the infinite task prior (t̄ = 0) the task-prior prediction is the
  zero prediction, so `dist_prior` equals `dist_zero` and the prior baseline the zero
  baseline."""
  out: list[tuple[str, np.ndarray]] = []
  for label, values in series:
    values = np.asarray(values, np.float64)
    for i, (seen_label, seen) in enumerate(out):
      if seen.shape == values.shape and np.array_equal(seen, values, equal_nan=True):
        out[i] = (f"{seen_label} = {label}", seen)
        break
    else:
      out.append((label, values))
  return out


def _gain_columns(metrics: Mapping[str, np.ndarray], kind: str) -> list[tuple[float, str]]:
  prefix = f"nmse_ood_{kind}_g"
  return sorted((float(k[len(prefix) :]), k) for k in metrics if k.startswith(prefix))


def behaviour_figure(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  *,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> Figure:
  """Six panels over log step: ICL scores; distances to the zero / task-prior /
  ridge / dMMSE predictions; per-prediction losses; OOD NMSE per gain for inputs
  and for tasks; the last checkpoint's losses vs k beside the baselines. Identical
  series (the zero and task-prior distances and baselines under the infinite task
  prior) are drawn once with a joint label (`distinct_series`).
  """
  steps = np.asarray(steps)
  fig, axes = figures.figure(2, 3, figsize=(15, 8))
  ax = axes[0, 0]
  for name, label in (
    ("icl_1_4", r"ICL$_{1:4} = L_4 - L_1$"),
    ("icl_4_8", r"ICL$_{4:8} = L_8 - L_4$"),
  ):
    if name in metrics and np.any(np.isfinite(metrics[name])):
      ax.plot(steps, metrics[name], marker=".", label=label)
  ax.axhline(0, color="gray", lw=0.8)
  ax.set_title("ICL scores")
  ax = axes[0, 1]
  distances = [
    (label, metrics[name])
    for name, label in (
      ("dist_zero", "to zero prediction"),
      ("dist_prior", r"to task prior $\bar t\cdot x$"),
      ("dist_ridge", "to ridge"),
      ("dist_dmmse", "to dMMSE"),
    )
    if name in metrics
  ]
  for label, values in distinct_series(distances):
    ax.plot(steps, values, marker=".", label=label)
  ax.set_yscale("log")
  ax.set_title("mean squared distance of predictions")
  ax = axes[0, 2]
  losses_NxK = _per_prediction(metrics, "loss")
  losses_NxK = np.zeros((len(steps), 0)) if losses_NxK is None else losses_NxK
  colors = figures.colormap("viridis")(np.linspace(0, 1, max(losses_NxK.shape[1], 1)))
  for k in range(losses_NxK.shape[1]):
    ax.plot(steps, losses_NxK[:, k], color=colors[k], label=f"$L_{{{k + 1}}}$")
  ax.set_yscale("log")
  ax.set_title("per-prediction loss")
  for ax, kind, label in ((axes[1, 0], "x", "inputs"), (axes[1, 1], "t", "tasks")):
    cols = _gain_columns(metrics, kind)
    colors = figures.colormap("plasma")(np.linspace(0, 0.9, max(len(cols), 1)))
    for (g, name), c in zip(cols, colors):
      ax.plot(steps, metrics[name], color=c, marker=".", label=f"g = {g:g}")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_title(f"OOD {label}: MSE / MSE(zero prediction)")
  for ax in list(axes[0]) + list(axes[1, :2]):
    figures.step_axis(ax, steps, boundaries=boundaries)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  ax = axes[1, 2]
  if losses_NxK.shape[1]:
    ks = np.arange(1, losses_NxK.shape[1] + 1)
    ax.plot(ks, losses_NxK[-1], marker="o", label=f"model (step {steps[-1]})")
    baselines = [
      (name, b[-1])
      for name in ("zero", "prior", "ridge", "dmmse")
      if (b := _per_prediction(metrics, f"{name}_loss")) is not None
    ]
    for label, values in distinct_series(baselines):
      ax.plot(ks, values, ls="--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("prediction index k")
    ax.legend(fontsize=7)
  ax.set_title("loss vs k (last checkpoint) and baselines")
  ax.grid(alpha=0.3, which="both")
  fig.suptitle(title or "LR behavioural metrics")
  fig.tight_layout()
  return fig


def plot_behaviour(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  path: str,
  *,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> str:
  """`behaviour_figure` written to `path` (PNG); returns `path`."""
  return figures.save(behaviour_figure(steps, metrics, boundaries=boundaries, title=title), path)


# Percentiles of |LayerNorm scale| drawn per LayerNorm (`ln_scale_q{p}/{n}`): dashed, solid.
LN_QUANTILES = ("10", "50")


def structure_figure(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  *,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> Figure:
  """Six panels over log step: token and positional embedding singular values relative
  to the largest, s_k / s_1 (a collapse shows as falling ratios even while s_1 grows);
  embedding-subspace alignment; attention entropy per head (solid: x-queries,
  dashed: y-queries); attention variability per head; the 10th (dashed) and 50th
  (solid) percentiles of |scale| of every LayerNorm and of |w_eff| (black), with the
  collapsed fractions on a twin axis (dotted) — the percentiles move even while no
  scale has collapsed.
  """
  steps = np.asarray(steps)
  fig, axes = figures.figure(2, 3, figsize=(15, 8))
  for ax, name, label in (
    (axes[0, 0], "tok_embed_sv", "token embedding"),
    (axes[0, 1], "pos_embed_sv", "positional embedding"),
  ):
    if name in metrics:
      sv_NxR = np.asarray(metrics[name], np.float64)
      with np.errstate(divide="ignore", invalid="ignore"):
        rel_NxR = sv_NxR / sv_NxR[:, :1]
      colors = figures.colormap("viridis")(np.linspace(0, 0.9, sv_NxR.shape[1]))
      for i in range(1, sv_NxR.shape[1]):
        ax.plot(steps, rel_NxR[:, i], color=colors[i], label=f"$s_{{{i + 1}}} / s_1$")
      ax.set_yscale("log")
      if sv_NxR.shape[1] <= 9:
        ax.legend(fontsize=7)
    ax.set_title(f"{label}: singular values / largest")
  ax = axes[0, 2]
  for name, lbl in (
    ("embed_alignment", r"mean $\cos^2$ of principal angles"),
    ("embed_alignment_max_cos", r"max $\cos$"),
  ):
    if name in metrics:
      ax.plot(steps, metrics[name], marker=".", label=lbl)
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7)
  ax.set_title("token / positional embedding subspace alignment")
  for ax, score, label in (
    (axes[1, 0], "attn_entropy", "normalised attention entropy"),
    (axes[1, 1], "attn_variability", "attention variability"),
  ):
    if score in metrics:
      arr_NxLxHxQ = np.asarray(metrics[score])
      _, L, H, _ = arr_NxLxHxQ.shape
      colors = figures.colormap("tab20")(np.linspace(0, 1, max(L * H, 2)))
      for l in range(L):
        for h in range(H):
          c = colors[l * H + h]
          ax.plot(steps, arr_NxLxHxQ[:, l, h, 1], color=c, label=f"L{l}H{h}")
          ax.plot(steps, arr_NxLxHxQ[:, l, h, 2], color=c, ls="--")
      ax.set_ylim(-0.02, 1.02)
      ax.legend(fontsize=6, ncol=2, title="solid x, dashed y", title_fontsize=6)
    ax.set_title(label)
  ax = axes[1, 2]
  norms = [k[len("ln_collapse/") :] for k in metrics if k.startswith("ln_collapse/")]
  colors = figures.colormap("tab10")(np.arange(max(len(norms), 1)) % 10)
  series = [(n, c, 1.3, "ln_scale_q{}/" + n, f"ln_collapse/{n}") for n, c in zip(norms, colors)]
  series.append(("unembed w_eff", "k", 2.0, "unembed_eff_q{}", "unembed_collapse"))
  ax_c = ax.twinx()
  drawn = False
  for label, colour, width, quantile_key, collapse_key in series:
    for q, ls in zip(LN_QUANTILES, ("--", "-")):
      if quantile_key.format(q) in metrics:
        ax.plot(
          steps,
          metrics[quantile_key.format(q)],
          color=colour,
          ls=ls,
          lw=width,
          label=f"{label} q{q}",
        )
        drawn = True
    if collapse_key in metrics:
      ax_c.plot(steps, metrics[collapse_key], color=colour, ls=":", lw=1.0, alpha=0.7)
  if drawn:
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2, title="dashed q10, solid q50", title_fontsize=6)
  ax.set_ylabel("percentile of |scale|")
  ax_c.set_ylim(-0.02, 1.02)
  ax_c.set_ylabel("collapsed fraction (dotted)", fontsize=8)
  ax.set_title("LayerNorm scales / w_eff: 10th, 50th percentile of |·|")
  for ax in axes.flat:
    figures.step_axis(ax, steps, boundaries=boundaries)
  fig.suptitle(title or "LR structural metrics")
  fig.tight_layout()
  return fig


def plot_structure(
  steps: Any,
  metrics: Mapping[str, np.ndarray],
  path: str,
  *,
  boundaries: Sequence[float] = (),
  title: str = "",
) -> str:
  """`structure_figure` written to `path` (PNG); returns `path`."""
  return figures.save(structure_figure(steps, metrics, boundaries=boundaries, title=title), path)
