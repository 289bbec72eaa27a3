"""devinterp_jax.viz: figures without pyplot, the one step axis, band labels, masks."""

import subprocess
import sys

import numpy as np
import pytest

from devinterp_jax.viz import figures
from devinterp_jax.viz import heads as heads_viz
from devinterp_jax.viz import llc as llc_viz


def test_step_axis_log_or_symlog_spanning_the_steps():
  fig, (a, b) = figures.figure(1, 2, figsize=(6, 3))
  a.plot([10, 100, 1000], [1, 2, 3])
  figures.step_axis(a, [10, 100, 1000], boundaries=(50, 500), boundary_label="stage boundary")
  assert a.get_xscale() == "log" and a.get_xlabel() == "training step"
  lo, hi = a.get_xlim()
  assert 5 < lo < 10 and 1000 < hi < 2000
  assert a.get_legend_handles_labels()[1] == ["stage boundary"]  # once, not per line
  assert sorted(line.get_xdata()[0] for line in a.get_lines()[1:]) == [50, 500]
  figures.step_axis(b, [0, 10, 1000], label=False)  # step 0: symlog, drawn at 0
  assert b.get_xscale() == "symlog" and b.get_xlim()[0] == 0 and b.get_xlabel() == ""


def test_figures_leave_pyplot_alone(tmp_path):
  """Building and saving every kind of figure never imports pyplot (no global figure
  registry, no backend selection), so a notebook's inline plots are kept."""
  code = f"""
import sys
import numpy as np
from devinterp_jax.viz import figures, heads, hessian, llc, lm, lr, overlap, stages
fig, ax = figures.figure(figsize=(3, 2))
ax.plot([1, 2], [3, 4])
figures.step_axis(ax, [1, 2])
figures.save(fig, {str(tmp_path / "f.png")!r})
llc.plot_llc_curve([1, 10, 100], [1., 2., 3.], [.1, .1, .1], [1, 100], [1., .5],
                   {str(tmp_path / "c.png")!r}, band_label="std over chains")
print('matplotlib.pyplot' in sys.modules)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"
  assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "c.png").stat().st_size > 10_000


def test_llc_curve_band_is_labelled_by_what_the_caller_passes():
  steps = np.array([0, 10, 100, 1000])
  for label in ("std over chains", "SEM over chains"):
    fig = llc_viz.llc_curve_figure(
      steps, np.ones(4), np.full(4, 0.1), steps[1:], [3.0, 2.0, 1.0], band_label=label
    )
    ax = fig.axes[0]
    assert f"± {label}" in [t.get_text() for t in ax.get_legend().texts]
    assert ax.get_xscale() == "symlog"  # step 0 is a checkpoint
  with pytest.raises(TypeError, match="band_label"):
    llc_viz.llc_curve_figure(steps, np.ones(4), np.ones(4), steps, np.ones(4))


def test_dispersion_figure_masks_weak_ablation_checkpoints():
  steps = np.array([0, 10, 100, 1000])
  spread = {"mean": np.arange(4.0), "variance": np.ones(4)}
  metrics = {
    "overlap/overlap_mean": np.array([2.0, 0.2, 0.3, 0.4]),
    "overlap/overlap_max": np.array([2.58, 0.5, 0.6, 0.7]),
    "overlap/robustness": np.array([-3.0, 0.1, 0.2, 0.3]),
    "overlap/delta_all": np.array([1e-3, 0.5, 0.8, 1.0]),
  }
  fig = heads_viz.dispersion_and_overlap_figure(steps, spread, metrics, boundaries=[50])
  ax = fig.axes[1]
  ys = {line.get_label(): np.asarray(line.get_ydata(), float) for line in ax.get_lines()}
  assert np.isnan(ys["max off-diagonal O"][0]) and ys["max off-diagonal O"][1] == 0.5
  assert any(p.get_hatch() == "///" for p in ax.patches) and "hatched: 1" in ax.get_title()
  assert {a.get_xscale() for a in fig.axes[:2]} == {"symlog"}
  plain = heads_viz.dispersion_and_overlap_figure(steps, spread, {})
  assert len(plain.axes) == 2  # the dispersion panel and its twin axis only
