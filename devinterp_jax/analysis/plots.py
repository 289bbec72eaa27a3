"""Figures written as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str) -> str:
  """Writes `fig` to `path` atomically and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)
  return path


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
