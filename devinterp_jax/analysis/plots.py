"""Figures written as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from devinterp_jax import atomic  # noqa: E402
from devinterp_jax.sampling.diagnostics import STATUS_NAMES  # noqa: E402


def save_figure(fig, path: str) -> str:
  """Writes `fig` to `path` atomically (fsynced, `atomic.save_figure`) and closes it."""
  try:
    return atomic.save_figure(fig, path, dpi=120, bbox_inches="tight")
  finally:
    plt.close(fig)


def plot_llc_curve(steps, llc_mean, llc_std, loss_steps, losses, path: str,
                   title: str = "", loss_label: str = "training loss") -> str:
  """LLC mean ± std over log step, with the loss on a twin axis."""
  steps, llc_mean, llc_std = map(np.asarray, (steps, llc_mean, llc_std))
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.plot(steps, llc_mean, color="tab:blue", marker=".", label=r"LLC $\hat\lambda$")
  ax.fill_between(steps, llc_mean - llc_std, llc_mean + llc_std, color="tab:blue",
                  alpha=0.25, label="± std over chains")
  ax.set_xscale("log")
  ax.set_xlabel("training step")
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
  ax.grid(alpha=0.3, which="both")
  return save_figure(fig, path)


_STATUS_COLORS = {"ok": "tab:gray", "negative": "tab:purple", "not_converged": "tab:orange",
                  "escaped": "tab:green", "diverged": "tab:red"}


def plot_llc_traces(result, path: str, indices=None, labels=None, title: str = "",
                    max_panels: int = 6) -> str:
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
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  draws = np.arange(1, trace.shape[-1] + 1)
  for ax, i in zip(axes.flat, indices):
    seen = set()
    for c in range(trace.shape[1]):
      name = STATUS_NAMES[int(status[i, c])]
      ax.plot(draws, trace[i, c], lw=0.8, alpha=0.7, color=_STATUS_COLORS[name],
              label=f"chain ({name})" if name not in seen else None)
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
  for ax in list(axes.flat)[len(indices):]:
    ax.axis("off")
  fig.suptitle(title or "LLC traces per chain")
  fig.tight_layout()
  return save_figure(fig, path)
