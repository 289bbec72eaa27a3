"""LLC figures: the curve over training, per-chain traces, and the calibration grid."""

from __future__ import annotations

import itertools
import os

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from devinterp_jax.sampling.diagnostics import STATUS_NAMES
from devinterp_jax.viz import figures

_STATUS_COLORS = {
  "ok": "tab:gray",
  "negative": "tab:purple",
  "not_converged": "tab:orange",
  "escaped": "tab:green",
  "diverged": "tab:red",
}


def llc_curve_figure(
  steps,
  llc_mean,
  llc_band,
  loss_steps,
  losses,
  *,
  band_label: str,
  title: str = "",
  loss_label: str = "training loss",
) -> Figure:
  """LLC mean ± `llc_band` over log step, with the loss on a twin log axis.

  `band_label` names what `llc_band` holds (e.g. "std over chains" for
  `LLCResult.llc_std`, "SEM over chains" for `llc_sem`); the legend reads
  "± {band_label}".
  """
  steps, llc_mean, llc_band = (np.asarray(a, np.float64) for a in (steps, llc_mean, llc_band))
  fig, ax = figures.figure(figsize=(8, 4.5))
  ax.plot(steps, llc_mean, color="tab:blue", marker=".", label=r"LLC $\hat\lambda$")
  ax.fill_between(
    steps,
    llc_mean - llc_band,
    llc_mean + llc_band,
    color="tab:blue",
    alpha=0.25,
    label=f"± {band_label}",
  )
  figures.step_axis(ax, steps)
  ax.set_ylabel(r"LLC $\hat\lambda$", color="tab:blue")
  ax2 = ax.twinx()
  ax2.plot(loss_steps, losses, color="tab:red", alpha=0.8, label=loss_label)
  ax2.set_yscale("log")
  ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  ax2.set_ylabel(loss_label, color="tab:red")
  lines = ax.get_legend_handles_labels()
  lines2 = ax2.get_legend_handles_labels()
  ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
  ax.set_title(title or "LLC over training")
  return fig


def plot_llc_curve(
  steps,
  llc_mean,
  llc_band,
  loss_steps,
  losses,
  path: str,
  *,
  band_label: str,
  title: str = "",
  loss_label: str = "training loss",
) -> str:
  """`llc_curve_figure` written to `path` (PNG); returns `path`."""
  return figures.save(
    llc_curve_figure(
      steps,
      llc_mean,
      llc_band,
      loss_steps,
      losses,
      band_label=band_label,
      title=title,
      loss_label=loss_label,
    ),
    path,
  )


def llc_traces_figure(
  result, indices=None, labels=None, title: str = "", max_panels: int = 6
) -> Figure:
  """Per-chain online LLC traces with the running mean over chains (paper Fig. A.5).

  `result` is an `LLCResult` with or without a leading checkpoint axis;
  `indices` picks checkpoints (default: up to `max_panels` spread over all),
  `labels[i]` names checkpoint i. Chains are coloured by health status.
  """
  trace = result.llc_trace
  status, mean = result.status, result.llc_trace_mean
  if trace.ndim == 2:
    trace, status, mean = trace[None], status[None], mean[None]
  trace = trace.reshape(-1, *trace.shape[-2:])
  status = status.reshape(-1, status.shape[-1])
  mean = mean.reshape(-1, mean.shape[-1])
  n = trace.shape[0]
  if indices is None:
    indices = np.unique(np.linspace(0, n - 1, min(n, max_panels)).round().astype(int))
  indices = list(indices)
  cols = min(3, len(indices))
  rows = -(-len(indices) // cols)
  fig, axes = figures.figure(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  draws = np.arange(1, trace.shape[-1] + 1)
  for ax, i in zip(axes.flat, indices):
    seen = set()
    for c in range(trace.shape[1]):
      name = STATUS_NAMES[int(status[i, c])]
      ax.plot(
        draws,
        trace[i, c],
        lw=0.8,
        alpha=0.7,
        color=_STATUS_COLORS[name],
        label=f"chain ({name})" if name not in seen else None,
      )
      seen.add(name)
    ax.plot(draws, mean[i], color="black", lw=2, label="mean over chains")
    finite = trace[i][np.isfinite(trace[i])]
    if finite.size:  # keep a diverged chain from flattening the panel
      lo, hi = np.percentile(finite, [1, 99])
      pad = 0.15 * max(hi - lo, 1e-9)
      ax.set_ylim(min(lo, np.nanmin(mean[i])) - pad, max(hi, np.nanmax(mean[i])) + pad)
    ax.set_title(labels[i] if labels is not None else f"checkpoint {i}", fontsize=9)
    ax.set_xlabel("draw")
    ax.set_ylabel(r"online $\hat\lambda_t$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
  for ax in list(axes.flat)[len(indices) :]:
    ax.axis("off")
  fig.suptitle(title or "LLC traces per chain")
  fig.tight_layout()
  return fig


def plot_llc_traces(
  result, path: str, indices=None, labels=None, title: str = "", max_panels: int = 6
) -> str:
  """`llc_traces_figure` written to `path` (PNG); returns `path`."""
  return figures.save(llc_traces_figure(result, indices, labels, title, max_panels), path)


def calibration_figures(result) -> tuple[Figure, Figure]:
  """The figures of a `CalibrationResult`: final LLC (± its std over chains) and step-check
  acceptance against ε per checkpoint, and the online LLC of every grid point."""
  n_eps, n_nbeta, n_gamma, N = result.llc_mean.shape  # the [ε, nβ, γ, N] grid
  fig, axes = figures.figure(2, N, figsize=(4.5 * N, 7), squeeze=False)
  for n in range(N):
    ax, ax_acc = axes[0, n], axes[1, n]
    for j, k in itertools.product(range(n_nbeta), range(n_gamma)):
      label = f"nβ={result.nbetas[j]:.4g}" + (
        f", γ={result.localizations[k]:.4g}" if n_gamma > 1 else ""
      )
      m, s = result.llc_mean[:, j, k, n], result.llc_std[:, j, k, n]
      (line,) = ax.plot(result.step_sizes, m, marker="o", label=label)
      ax.fill_between(result.step_sizes, m - s, m + s, color=line.get_color(), alpha=0.2)
      fail = ~result.passes[:, j, k]
      ax.scatter(
        result.step_sizes[fail],
        m[fail],
        facecolors="white",
        edgecolors=line.get_color(),
        zorder=3,
        s=40,
      )
      se = (
        result.mala_se[:, j, k, n]
        if result.mala_se is not None
        else np.zeros(len(result.step_sizes))
      )
      ax_acc.errorbar(
        result.step_sizes,
        result.mala_acceptance[:, j, k, n],
        yerr=result.margin_se * np.nan_to_num(se),
        marker="o",
        capsize=2,
        color=line.get_color(),
        label=label + f" (±{result.margin_se:g} SE)",
      )
    rec = result.recommended
    if rec:
      for a in (ax, ax_acc):
        a.axvline(rec["step_size"], color="black", ls="--", lw=1, label="recommended ε")
    ax_acc.axhspan(
      *result.mala_band, color="tab:green", alpha=0.1, label=f"{result.step_check} band"
    )
    for a in (ax, ax_acc):
      a.set_xscale("log")  # the step size ε, not a training step
      a.grid(alpha=0.3)
      a.set_xlabel("step size ε")
    ax.set_ylabel(r"$\hat\lambda$ ± std over chains (hollow: fails)")
    ax_acc.set_ylabel(f"{result.step_check} acceptance")
    ax.set_title(f"checkpoint {result.checkpoint_ids[n]}", fontsize=9)
    ax.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
  fig.suptitle(f"Calibration: final LLC and {result.step_check} acceptance vs step size")
  fig.tight_layout()

  fig2, axes = figures.figure(
    n_nbeta * n_gamma, N, figsize=(4.5 * N, 3.2 * n_nbeta * n_gamma), squeeze=False
  )
  draws = np.arange(1, result.llc_trace_mean.shape[-1] + 1)
  cmap = figures.colormap("viridis")
  for (row, (j, k)), n in itertools.product(
    enumerate(itertools.product(range(n_nbeta), range(n_gamma))), range(N)
  ):
    ax = axes[row, n]
    for i in range(n_eps):
      ax.plot(
        draws,
        result.llc_trace_mean[i, j, k, n],
        color=cmap(i / max(n_eps - 1, 1)),
        ls="-" if result.passes[i, j, k] else ":",
        label=f"ε={result.step_sizes[i]:.3g}",
      )
    ax.set_title(
      f"checkpoint {result.checkpoint_ids[n]}, nβ={result.nbetas[j]:.4g}, "
      f"γ={result.localizations[k]:.4g}",
      fontsize=8,
    )
    ax.set_xlabel("draw")
    ax.set_ylabel(r"running mean $\hat\lambda_t$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig2.suptitle("Calibration: online LLC (mean over chains; dotted: fails)")
  fig2.tight_layout()
  return fig, fig2


def plot_calibration(result, directory: str) -> list[str]:
  """Writes calibration_llc_vs_step_size.png and calibration_traces.png of a
  `CalibrationResult` into `directory`; returns their paths."""
  llc_fig, traces_fig = calibration_figures(result)
  return [
    figures.save(llc_fig, os.path.join(directory, "calibration_llc_vs_step_size.png")),
    figures.save(traces_fig, os.path.join(directory, "calibration_traces.png")),
  ]
