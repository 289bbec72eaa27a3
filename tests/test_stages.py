"""Stage boundaries from LLC plateaus (App. B.1, B.4) on synthetic curves.

The curves are sums of logistic rises and falls in x = ln(step + 1) plus
Gaussian noise, sampled on checkpoints spaced like the paper's schedule. The
true plateaus are the minima of |d curve/dx| of the noiseless curve between
consecutive logistic centres, mapped to the nearest checkpoint.
"""

import csv
import dataclasses
import functools
import json

import numpy as np
import pytest

from devinterp_jax.analysis import stages
from devinterp_jax.analysis.stages import (
  NEAR_PLATEAU,
  ZERO_CROSSING,
  StageBoundaries,
  compare_boundaries,
  find_stage_boundaries,
)
from devinterp_jax.viz import stages as stages_viz
from devinterp_jax.viz.stages import plot_seed_stages, plot_stages


def _schedule(total: int = 100_000, n_log: int = 30, n_linear: int = 15) -> np.ndarray:
  log_steps = np.logspace(0, np.log10(total), n_log).astype(int)
  lin_steps = np.linspace(1, total, n_linear).astype(int)
  return np.union1d(log_steps, lin_steps)


STEPS = _schedule()
X = np.log1p(STEPS)
NOISE = 0.02  # noise std as a fraction of the curve's range (1–3 %, heteroscedastic)
SEEDS = (0, 1, 2)

# (amplitude, centre in ln step, width in ln step) of each logistic.
CURVES = {
  "two_rise": [(40, 3.0, 0.3), (40, 7.0, 0.3)],  # near-plateau
  "rise_fall": [(60, 4.0, 0.5), (-25, 7.5, 0.5)],  # LR-like peak
  "four": [(25, 2.0, 0.25), (40, 5.5, 0.25), (-30, 8.0, 0.3), (15, 10.3, 0.25)],
}
MONOTONE = {"single_mid": [(50, 6.0, 0.6)], "single_early_sharp": [(50, 3.0, 0.3)]}


def _curve(x, comps):
  x = np.asarray(x, dtype=float)
  return sum(a / (1.0 + np.exp(-(x - c) / s)) for a, c, s in comps)


def _true_plateaus(comps):
  """[(checkpoint index, |slope| / max |slope|, turns)] between consecutive centres."""
  xs = np.linspace(X[0], X[-1], 40001)
  d = np.gradient(_curve(xs, comps), xs)
  centres = sorted(c for _, c, _ in comps)
  out = []
  for c0, c1 in zip(centres[:-1], centres[1:]):
    inside = np.flatnonzero((xs > c0) & (xs < c1))
    j = inside[np.argmin(np.abs(d[inside]))]
    turns = bool(np.sign(d[inside[0]]) != np.sign(d[inside[-1]]))
    out.append((int(np.argmin(np.abs(X - xs[j]))), abs(d[j]) / np.abs(d).max(), turns))
  return out


def _noisy(comps, seed):
  y0 = _curve(X, comps)
  sd = NOISE * np.ptp(y0) * (0.5 + (y0 - y0.min()) / np.ptp(y0))
  return y0, sd, y0 + sd * np.random.default_rng(seed).standard_normal(len(X))


@functools.lru_cache(maxsize=None)
def _fit(name, seed, with_std):
  comps = {**CURVES, **MONOTONE}[name]
  _, sd, y = _noisy(comps, seed)
  return find_stage_boundaries(STEPS, y, sd if with_std else None)


def test_schedule_is_like_the_papers():
  assert 38 <= len(STEPS) <= 45 and STEPS[0] == 1 and STEPS[-1] == 100_000
  assert np.all(np.diff(STEPS) > 0)


@pytest.mark.parametrize("with_std", [False, True], ids=["white_kernel", "llc_std"])
@pytest.mark.parametrize("name", list(CURVES))
def test_finds_true_plateaus_and_nothing_else(name, with_std):
  truth = _true_plateaus(CURVES[name])
  true_idx = [i for i, _, _ in truth]
  # The synthetic plateaus are real ones: flat well below the 5 % tolerance.
  assert all(rel < 0.025 for _, rel, _ in truth), truth
  for seed in SEEDS:
    r = _fit(name, seed, with_std)
    found = list(r.boundary_indices)
    msg = f"{name} seed={seed} true={true_idx} found={found} kinds={r.boundary_kinds}"
    assert len(found) == len(true_idx), msg
    for p in true_idx:
      assert min(abs(b - p) for b in found) <= 1, msg
    for b in found:
      assert min(abs(b - p) for p in true_idx) <= 1, msg
    for (p, _, turns), b, kind in zip(truth, found, r.boundary_kinds):
      if turns:  # a peak or valley of the LLC is a zero crossing of the slope
        assert kind == ZERO_CROSSING, msg
    assert r.boundary_steps == tuple(int(STEPS[i]) for i in found)
    assert len(r.stages) == len(found) + 1


@pytest.mark.parametrize("with_std", [False, True], ids=["white_kernel", "llc_std"])
def test_gp_smooths_towards_the_truth_and_slope_is_its_derivative(with_std):
  # The GP mean is closer to the noiseless curve than the data are (on average:
  # a stationary RBF overshoots sharp transitions, so not on every curve).
  ratios = []
  for name in CURVES:
    for seed in SEEDS:
      y0, _, y = _noisy(CURVES[name], seed)
      rmse_gp = np.sqrt(np.mean((_fit(name, seed, with_std).gp_mean - y0) ** 2))
      ratios.append(rmse_gp / np.sqrt(np.mean((y - y0) ** 2)))
  assert np.mean(ratios) < 0.85 and np.max(ratios) < 1.15, ratios
  r = _fit("rise_fall", 0, with_std)
  assert np.all(r.gp_std > 0) and np.all(np.isfinite(r.gp_std))
  # The analytic slope matches central differences of the GP mean on the grid.
  fd = np.gradient(r.gp_mean_grid, r.x_grid)
  scale = np.abs(r.slope_grid).max()
  assert np.max(np.abs(fd[1:-1] - r.slope_grid[1:-1])) < 2e-3 * scale
  # Grid and checkpoint values are the same function.
  np.testing.assert_allclose(
    np.interp(r.x, r.x_grid, r.gp_mean_grid), r.gp_mean, atol=1e-3 * np.ptp(r.gp_mean)
  )
  # And the true slope is recovered where the curve changes most.
  true_slope = np.gradient(_curve(r.x_grid, CURVES["rise_fall"]), r.x_grid)
  assert abs(r.slope_grid.max() - true_slope.max()) < 0.25 * true_slope.max()


@pytest.mark.parametrize("with_std", [False, True], ids=["white_kernel", "llc_std"])
@pytest.mark.parametrize("name", list(MONOTONE))
def test_monotone_logistic_has_no_boundaries(name, with_std):
  r = _fit(name, 0, with_std)
  assert r.boundary_indices == () and r.boundary_kinds == ()
  assert r.stages == [
    {
      "label": "S1",
      "start_step": 1,
      "end_step": 100_000,
      "end_kind": "end",
      "end_stability": None,
      "description": "S1: steps 1–100000",
    }
  ]


def test_deterministic():
  _, sd, y = _noisy(CURVES["four"], 1)
  a = _fit("four", 1, False)
  b = find_stage_boundaries(list(STEPS), list(y))
  assert a.kernel == b.kernel and a.tolerance_used == b.tolerance_used
  assert a.boundary_indices == b.boundary_indices and a.boundary_kinds == b.boundary_kinds
  for field in ("gp_mean", "gp_std", "slope", "slope_grid", "gp_mean_grid"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_tolerance_options():
  r = _fit("two_rise", 0, False)
  assert r.tolerance_used == pytest.approx(0.05 * np.abs(r.slope).max())
  _, _, y = _noisy(CURVES["two_rise"], 0)
  # An absolute tolerance above every |slope| makes every local minimum of
  # |slope| a candidate; the merge rule still reports one boundary per plateau.
  big = find_stage_boundaries(STEPS, y, tolerance=1e6, relative_tolerance=False)
  assert big.tolerance_used == 1e6
  assert big.boundary_indices == r.boundary_indices
  # Without the merge rule the paper's raw rules report the ringing too.
  raw = find_stage_boundaries(
    STEPS, y, tolerance=1e6, relative_tolerance=False, min_stage_change=0.0
  )
  assert len(raw.boundary_indices) > len(r.boundary_indices)
  assert raw.pruned_indices == ()


def test_merge_rule():
  x = np.linspace(0.0, 10.0, 21)
  # Rise, a plateau with a small wiggle (candidates 8 and 12), rise again.
  gp = np.concatenate(
    [np.linspace(0, 10, 7), [10, 10.3, 10, 9.8, 10, 10.2, 10], np.linspace(10, 20, 7)[:-1], [20.0]]
  )
  assert len(gp) == 21
  kinds = {1: ZERO_CROSSING, 8: ZERO_CROSSING, 12: NEAR_PLATEAU}
  kept, out_kinds, dropped = stages._prune([1, 8, 12], kinds, x, gp, 0.1 * np.ptp(gp))
  assert kept == [10] and out_kinds == {10: NEAR_PLATEAU} and dropped == [1, 8, 12]
  # A plateau at a peak: the merged boundary turns, so it is a zero crossing.
  peak = np.where(np.arange(21) <= 10, gp, 2 * gp[10] - gp)
  kept, out_kinds, _ = stages._prune([8, 12], kinds, x, peak, 0.1 * np.ptp(peak))
  assert kept == [10] and out_kinds == {10: ZERO_CROSSING}
  # min_change 0 keeps every candidate and its kind.
  kept, out_kinds, dropped = stages._prune([1, 8, 12], kinds, x, gp, 0.0)
  assert kept == [1, 8, 12] and out_kinds == kinds and dropped == []


def test_detection_rules_directly():
  slope = np.array([5.0, 3.0, -1.0, -4.0, -0.2, -3.0, 2.0, 0.5])
  # Sign changes: (1,2) -> 2, (5,6) -> 6; (6,7) has no change.
  assert stages._zero_crossings(slope) == [2, 6]
  # |slope| local minima below 0.3: index 4 only (index 7 is the last).
  assert stages._near_plateaus(slope, 0.3) == [4]
  assert stages._near_plateaus(slope, 1.5) == [2, 4]
  # A crossing at the ends is never a boundary.
  assert stages._zero_crossings(np.array([0.1, -3.0, -2.0, -1.5, 1.0])) == []


def test_save_round_trip(tmp_path):
  r = _fit("four", 0, True)
  json_path, csv_path = r.save(str(tmp_path / "out"))
  with open(json_path) as f:
    d = json.load(f)
  assert d["boundary_steps"] == list(r.boundary_steps)
  assert d["boundary_kinds"] == list(r.boundary_kinds)
  assert d["stages"] == r.stages and d["kernel"] == r.kernel
  assert len(d["llc_std"]) == len(STEPS) and len(d["slope_grid"]) == len(r.x_grid)
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert [row["label"] for row in rows] == ["S1", "S2", "S3", "S4"]
  assert all(row["end_stability"] == "" for row in rows)  # no stability analysis here
  assert int(rows[0]["start_step"]) == 1 and int(rows[-1]["end_step"]) == 100_000
  assert [int(row["end_step"]) for row in rows[:-1]] == list(r.boundary_steps)
  assert [int(row["start_step"]) for row in rows[1:]] == list(r.boundary_steps)
  assert [row["end_kind"] for row in rows] == list(r.boundary_kinds) + ["end"]
  back = StageBoundaries.load(str(tmp_path / "out"))
  assert back.boundary_indices == r.boundary_indices and back.kernel == r.kernel
  np.testing.assert_allclose(back.slope, r.slope)
  assert back.stages == r.stages
  no_std = _fit("four", 0, False)
  no_std.save(str(tmp_path / "b"))
  assert StageBoundaries.load(str(tmp_path / "b")).llc_std is None


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(steps=[1, 2, 3, 4], llc_mean=[1, 2, 3]), "length"),
    (dict(steps=[1, 2, 3], llc_mean=[1, 2, 3]), "at least 4"),
    (dict(steps=[1, 2, 3, 4], llc_mean=[1, np.nan, 3, 4]), "finite"),
    (dict(steps=[1, 2, 3, 4], llc_mean=[1, 2, 3, 4], llc_std=[1, np.inf, 1, 1]), "finite"),
    (dict(steps=[1, 3, 2, 4], llc_mean=[1, 2, 3, 4]), "increasing"),
    (dict(steps=[1, 2, 2, 4], llc_mean=[1, 2, 3, 4]), "increasing"),
    (dict(steps=[-1, 2, 3, 4], llc_mean=[1, 2, 3, 4]), "non-negative"),
    (dict(steps=[1, 2, 3, 4], llc_mean=[1, 2, 3, 4], llc_std=[1, -1, 1, 1]), "non-negative"),
    (dict(steps=[1, 2, 3, 4], llc_mean=[1, 2, 3, 4], llc_std=[1, 1, 1]), "shape"),
    (dict(steps=[1, 2.5, 3, 4], llc_mean=[1, 2, 3, 4]), "integers"),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    find_stage_boundaries(**kwargs)


def _is_png(path):
  with open(path, "rb") as f:
    data = f.read()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_stages(tmp_path):
  r = _fit("four", 0, True)
  loss = 2.0 * np.exp(-_curve(X, CURVES["four"]) / 40)
  p = plot_stages(r, str(tmp_path / "stages.png"), loss_steps=STEPS, loss=loss, title="four")
  assert p == str(tmp_path / "stages.png") and _is_png(p)
  # Without a loss, and with a checkpoint at step 0 (symlog axis).
  steps0 = np.concatenate([[0], STEPS])
  y0 = _curve(np.log1p(steps0), CURVES["rise_fall"])
  r0 = find_stage_boundaries(steps0, y0 + 0.3 * np.sin(7 * np.arange(len(y0))), n_restarts=2)
  assert r0.stages[0]["start_step"] == 0
  assert _is_png(plot_stages(r0, str(tmp_path / "no_loss.png")))
  with pytest.raises(ValueError, match="loss_steps"):
    plot_stages(r, str(tmp_path / "x.png"), loss=loss)
  fig0 = stages_viz.stages_figure(r0)  # step 0 is drawn where it is: symlog
  assert {ax.get_xscale() for ax in fig0.axes} == {"symlog"} and fig0.axes[-1].get_xlim()[0] == 0


def _legend(ax):
  return ax.get_legend_handles_labels()[1]


def test_stage_error_bars_are_labelled_by_what_llc_std_holds():
  """stages.png called the error bars "± std" where they were the standard error over
  chains: the label names what `llc_std` holds (`settings["error_bar"]`, or the
  `error_bar` argument), and says "as given" when nothing says so."""
  r = _fit("four", 0, True)
  sem = dataclasses.replace(r, settings={**r.settings, "error_bar": "SEM"})
  std = dataclasses.replace(r, settings={**r.settings, "error_bar": "std"})
  llc_axis = -2  # the LLC panel (above the slope)
  assert r"$\hat\lambda$ ± SEM over chains" in _legend(stages_viz.stages_figure(sem).axes[llc_axis])
  assert r"$\hat\lambda$ ± std over chains" in _legend(stages_viz.stages_figure(std).axes[llc_axis])
  unnamed = _legend(stages_viz.stages_figure(r).axes[llc_axis])
  assert r"$\hat\lambda$ ± llc_std (as given)" in unnamed
  assert r"$\hat\lambda$ ± SEM over chains" in _legend(
    stages_viz.stages_figure(r, error_bar="SEM").axes[llc_axis]
  )
  fitted = dataclasses.replace(r, llc_std=None)  # noise fitted: no error bars, no "±"
  assert not any(
    "±" in t and "lambda" in t for t in _legend(stages_viz.stages_figure(fitted).axes[llc_axis])
  )


def _shifted_fits(shifts, seed0=10):
  """Fits of rise_fall-like curves with every centre moved by `shift` in ln step."""
  base = [(60, 3.5, 0.4), (-25, 7.0, 0.4), (20, 9.5, 0.3)]
  per_seed, curves = [], []
  for k, shift in enumerate(shifts):
    comps = [(a, c + shift, s) for a, c, s in base]
    y0 = _curve(X, comps)
    y = y0 + 0.01 * np.ptp(y0) * np.random.default_rng(seed0 + k).standard_normal(len(X))
    curves.append(y)
    per_seed.append(find_stage_boundaries(STEPS, y))
  reference = find_stage_boundaries(STEPS, np.mean(curves, axis=0))
  return per_seed, reference


@functools.lru_cache(maxsize=None)
def _shifted():
  return _shifted_fits((-0.5, 0.0, 0.5))


def test_compare_boundaries_tracks_shifts():
  per_seed, reference = _shifted()
  assert all(len(r.boundary_steps) == 2 for r in per_seed + [reference])
  out = compare_boundaries(per_seed, reference)
  assert [o["boundary"] for o in out] == [1, 2] and out[0]["label"] == "S1-S2"
  for o, ref_step in zip(out, reference.boundary_steps):
    assert o["reference_step"] == ref_step and o["count"] == 3 and o["n_seeds"] == 3
    x = np.log1p(o["matched_steps"])
    assert np.all(np.diff(x) > 0), o  # later centres, later boundaries
    assert 0.6 <= x[-1] - x[0] <= 1.6, o  # the shift is 1.0 in ln step
    assert o["min_step"] == min(o["matched_steps"]) and o["max_step"] == max(o["matched_steps"])
    assert o["min_step"] <= o["geometric_mean_step"] <= o["max_step"]
    assert o["log_step_std"] == pytest.approx(np.std(x))
    assert 0.25 <= o["log_step_std"] <= 0.7
    assert abs(np.log1p(o["geometric_mean_step"]) - np.log1p(ref_step)) < 0.45


def test_compare_boundaries_unmatched():
  per_seed, reference = _shifted()
  far = dataclasses.replace(
    per_seed[1],
    boundary_steps=(int(STEPS[-2]),),
    boundary_indices=(len(STEPS) - 2,),
    boundary_kinds=(NEAR_PLATEAU,),
  )
  empty = dataclasses.replace(
    per_seed[1], boundary_steps=(), boundary_indices=(), boundary_kinds=()
  )
  out = compare_boundaries([per_seed[1], far, empty], reference)
  assert [o["matched_steps"][1:] for o in out] == [[None, None], [None, None]]
  assert all(o["count"] == 1 for o in out)
  assert out[0]["log_step_std"] == 0.0
  assert out[0]["min_step"] == out[0]["max_step"] == per_seed[1].boundary_steps[0]
  none = compare_boundaries([empty], reference)
  assert none[0]["count"] == 0 and none[0]["geometric_mean_step"] is None
  # A large enough window matches the far boundary, to one reference boundary only:
  # the nearest one (matching is one-to-one).
  wide = compare_boundaries([far], reference, max_log_distance=20.0)
  hits = [k for k, o in enumerate(wide) if o["matched_steps"] == [int(STEPS[-2])]]
  nearest = int(
    np.argmin(np.abs(np.log1p(np.asarray(reference.boundary_steps, float)) - np.log1p(STEPS[-2])))
  )
  assert hits == [nearest]
  assert all(o["matched_steps"] == [None] for k, o in enumerate(wide) if k != nearest)
  assert (
    compare_boundaries(
      per_seed,
      dataclasses.replace(reference, boundary_steps=(), boundary_indices=(), boundary_kinds=()),
    )
    == []
  )


def test_plot_seed_stages(tmp_path):
  per_seed, reference = _shifted()
  p = plot_seed_stages(per_seed, reference, str(tmp_path / "seeds.png"), labels=["a", "b", "c"])
  assert _is_png(p)
  with pytest.raises(ValueError, match="labels"):
    plot_seed_stages(per_seed, reference, str(tmp_path / "x.png"), labels=["a"])


# ----------------------------------------------------------------------------------------
# Stability under chain and draw-window resampling.
#
# Chains: per-chain LLC = true curve + a smooth chain-specific offset (a chain's noise is
# shared by all checkpoints) + small independent noise; SGLD loss traces around it, so the
# draw windows are recomputed from traces as in the report.

S_STEPS = np.unique(
  np.concatenate([np.logspace(0, 4, 20).astype(int), np.linspace(1, 10_000, 8).astype(int)])
)
S_X = np.log1p(S_STEPS)
S_CHAINS, S_DRAWS, S_NBETA, S_BURNIN = 4, 120, 10.0, 20


def _logistic(x, a, c, s):
  return a / (1.0 + np.exp(-(x - c) / s))


def _chain_data(curve, seed, spike=None):
  """(loss traces [K, C, T], init losses [K, C]); `spike` = (amplitude, centre, width)
  of a bump in ln step added to chain 0 only."""
  rng = np.random.default_rng(seed)
  k, c, span = len(S_STEPS), S_CHAINS, np.ptp(curve)
  llc = (
    curve[:, None]
    + 0.01 * span * rng.standard_normal((k, c))
    + 0.01 * span * rng.standard_normal(c)[None, :] * np.sin(S_X / 2)[:, None]
  )
  if spike is not None:
    a, centre, width = spike
    llc[:, 0] += a * np.exp(-((S_X - centre) ** 2) / (2 * width**2))
  init = rng.normal(1.0, 0.01, (k, c))
  trace = (
    init[:, :, None]
    + llc[:, :, None] / S_NBETA
    + 0.02 * span / S_NBETA * rng.standard_normal((k, c, S_DRAWS))
  )
  return trace, init


def _reference(llc_kc):
  mean = llc_kc.mean(1)
  sem = llc_kc.std(1, ddof=1) / np.sqrt(llc_kc.shape[1])
  return find_stage_boundaries(S_STEPS, mean, sem, n_restarts=2)


PLATEAU = _logistic(S_X, 40, 2.5, 0.3) + _logistic(S_X, 40, 6.5, 0.3)
SINGLE_RISE = _logistic(S_X, 60, 2.5, 0.3)
SPIKE = (60.0, 6.8, 0.45)  # one chain's bump: 60 LLC units (the curve's range is 60)


@functools.lru_cache(maxsize=None)
def _plateau_case():
  trace, init = _chain_data(PLATEAU, 0)
  llc = stages.window_llcs(trace, init, S_NBETA, S_BURNIN)
  ref = _reference(llc[0])
  return llc, ref, stages.stage_stability(ref, llc)


@functools.lru_cache(maxsize=None)
def _spike_case():
  trace, init = _chain_data(SINGLE_RISE, 0, spike=SPIKE)
  llc = stages.window_llcs(trace, init, S_NBETA, S_BURNIN)
  ref = _reference(llc[0])
  return llc, ref, stages.stage_stability(ref, llc)


def test_exact_bootstrap_enumerates_every_multiset_with_its_multinomial_weight():
  from scipy.stats import multinomial

  counts, weights = stages.chain_multisets(4)
  assert counts.shape == (35, 4) and stages.num_distinct_resamples(4) == 35
  assert np.all(counts.sum(1) == 4) and len({tuple(r) for r in counts}) == 35
  assert weights.sum() == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(weights, multinomial.pmf(counts, 4, [0.25] * 4), rtol=1e-12)
  by = {tuple(r): w for r, w in zip(counts, weights)}
  assert by[(4, 0, 0, 0)] == pytest.approx(1 / 256) and by[(1, 1, 1, 1)] == pytest.approx(24 / 256)
  assert by[(2, 1, 1, 0)] == pytest.approx(12 / 256)
  for c in range(1, 7):
    assert stages.num_distinct_resamples(c) == len(stages.chain_multisets(c)[0])
  # C = 6: 462 <= 500 multisets, exact; C = 7: 1716, a fixed-seed random sample.
  assert stages.chain_resamples(6).exact and len(stages.chain_resamples(6).weights) == 462
  rnd = stages.chain_resamples(7, num_random=200, seed=3)
  assert not rnd.exact and rnd.num_distinct == 1716 and rnd.num_drawn == 200
  assert np.all(rnd.counts.sum(1) == 7) and rnd.weights.sum() == pytest.approx(1.0)
  again = stages.chain_resamples(7, num_random=200, seed=3)
  np.testing.assert_array_equal(rnd.counts, again.counts)


def test_window_llcs_are_nbeta_times_window_mean_minus_init():
  rng = np.random.default_rng(0)
  trace, init = rng.normal(2.0, 0.3, (3, 2, 40)), rng.normal(1.0, 0.1, (3, 2))
  burnin = np.array([0, 8, 20])
  w = stages.window_llcs(trace, init, np.array([1.0, 2.0, 3.0]), burnin)
  assert w.shape == (len(stages.DRAW_WINDOWS), 3, 2)
  names = [n for n, _, _ in stages.DRAW_WINDOWS]
  k = 1  # burn-in 8: kept length 32
  expect = {
    "kept": trace[k, :, 8:],
    "start +25%": trace[k, :, 16:],
    "start +50%": trace[k, :, 24:],
    "first 75%": trace[k, :, 8:32],
  }
  for name, draws in expect.items():
    np.testing.assert_allclose(w[names.index(name), k], 2.0 * (draws.mean(-1) - init[k]))


def test_clear_plateau_is_stable():
  llc, ref, st = _plateau_case()
  assert len(ref.boundary_steps) == 1  # the plateau between the two rises
  assert abs(S_X[ref.boundary_indices[0]] - 4.5) < 0.6
  assert st.num_distinct_chain_resamples == 35 and st.chain_resampling == "exact"
  assert st.num_fits == 35 * 4 and len(st.windows) == 4
  assert st.stability[0] >= 0.9 and st.stable == (True,) and st.passes and st.reasons == ()
  assert all(v >= 0.8 for v in st.by_window[0].values())
  # The identity resample with the kept window is the reference curve itself.
  kw = stages._refit_kwargs(ref.settings)
  assert (
    stages._fit_resample(
      S_STEPS, llc[0], np.ones(llc[0].shape, bool), np.ones(S_CHAINS, np.int64), "sem", kw
    )
    == ref.boundary_steps
  )
  assert sum(st.boundary_count_distribution.values()) == pytest.approx(1.0)


def test_boundary_from_one_chains_spike_is_unstable_and_fails_the_criterion():
  llc, ref, st = _spike_case()
  spike_index = int(np.argmin(np.abs(S_X - SPIKE[1])))
  near = [j for j, i in enumerate(ref.boundary_indices) if abs(i - spike_index) <= 1]
  assert near, (ref.boundary_steps, S_STEPS[spike_index])
  j = near[0]
  # The bump exists only when chain 0 is drawn: probability 1 − (3/4)^4 = 0.68.
  assert st.stability[j] == pytest.approx(1 - 0.75**4, abs=0.05)
  assert st.stable[j] is False and not st.passes
  assert any(f"step {ref.boundary_steps[j]}" in r for r in st.reasons)
  # Unstable boundaries are kept and marked, never pruned.
  assert st.boundary_steps == ref.boundary_steps
  marked = dataclasses.replace(ref, stability=st)
  assert marked.boundaries[j]["stable"] is False
  assert "unstable" in marked.stages[j]["description"]
  # Without chain 0 the curve is one monotone rise: resamples that lack it find nothing.
  assert st.boundary_count_distribution.get(0, 0.0) == pytest.approx(0.75**4, abs=0.05)


def test_stability_does_not_depend_on_the_order_of_chains():
  llc, ref, st = _spike_case()
  perm = [2, 0, 3, 1]
  again = stages.stage_stability(ref, llc[:, :, perm])
  assert again.stability == st.stability and again.by_window == st.by_window
  assert again.boundary_count_distribution == st.boundary_count_distribution
  # Random resampling (7 chains, 1716 multisets) too: the chains are ordered canonically.
  rng = np.random.default_rng(1)
  seven = llc[0][:, [0, 1, 2, 3, 1, 2, 3]] + 0.2 * rng.standard_normal((len(S_STEPS), 7))
  a = stages.stage_stability(ref, seven, num_random=12, random_seed=5)
  b = stages.stage_stability(ref, seven[:, ::-1], num_random=12, random_seed=5)
  assert a.chain_resampling == "random" and a.num_random_draws == 12
  assert a.stability == b.stability


def test_seed_stability_is_reported_outside_the_criterion():
  llc, ref, st = _plateau_case()
  same, init = _chain_data(PLATEAU, 7)  # a re-estimate with another SGLD seed
  gone, init2 = _chain_data(SINGLE_RISE, 8)  # a re-estimate without the plateau
  curves = {
    "seed 1": (S_STEPS, stages.window_llcs(same, init, S_NBETA, S_BURNIN)[0]),
    "seed 2": (S_STEPS, stages.window_llcs(gone, init2, S_NBETA, S_BURNIN)[0], None),
  }
  out = stages.stage_stability(ref, llc, seed_curves=curves)
  assert out.seed_stability == (0.5,) and out.passes and out.stability == st.stability
  assert out.seed_matches[0]["seed 2"] is None
  assert (
    abs(int(np.searchsorted(S_STEPS, out.seed_matches[0]["seed 1"])) - ref.boundary_indices[0]) <= 1
  )
  assert [s["label"] for s in out.seeds] == ["seed 1", "seed 2"]


def test_stability_round_trips_and_marks_the_plot(tmp_path):
  _, ref, st = _spike_case()
  marked = dataclasses.replace(
    ref,
    stability=st,
    schedule_features=({"name": "learning-rate peak", "step": int(ref.boundary_steps[-1]) + 1},),
  )
  marked.save(str(tmp_path))
  back = StageBoundaries.load(str(tmp_path))
  assert back.stability == st and back.stages == marked.stages
  d = json.load(open(tmp_path / "stages.json"))
  assert d["stability_passes"] is False and d["stability"]["passes"] is False
  assert [b["stability"] for b in d["boundaries"]] == list(st.stability)
  assert "fails" in d["stability"]["summary"] and "35 chain multisets" in d["stability"]["summary"]
  # Stage descriptions name a schedule feature a boundary tracks (within ±1 checkpoint).
  last = marked.stages[len(ref.boundary_steps) - 1]["description"]
  assert f"tracks the learning-rate peak at step {ref.boundary_steps[-1] + 1}" in last
  fig = stages_viz.stages_figure(marked, error_bar="SEM")
  texts = [t.get_text() for ax in fig.axes for t in ax.texts]
  legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
  bad = [j for j, ok in enumerate(st.stable) if not ok]
  assert all(f"(unstable {st.stability[j]:.2f})" in texts for j in bad)
  assert any("± SEM" in t for t in legend) and not any("± std" in t for t in legend)
  assert "FAILS" in fig.axes[0].get_title()
  dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
  assert len(dashed) == len(bad)


def test_labels_claim_no_paper_stage():
  _, ref, st = _plateau_case()
  text = json.dumps(dataclasses.replace(ref, stability=st).to_dict())
  text += json.dumps(compare_boundaries([ref], ref))
  for paper in ("LR1", "LR2", "LM1", "LM2"):
    assert paper not in text
  assert [s["label"] for s in ref.stages] == ["S1", "S2"]
  assert ref.stages[0]["description"].startswith("S1: steps 1–")
