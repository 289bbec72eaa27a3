"""Convergence statistics: Φ⁻¹, rank-normalised split-R̂, bulk/tail ESS, drift, MSER burn-in."""

from __future__ import annotations

import ast
import math
import os

import numpy as np
import pytest

from devinterp_jax.sampling import convergence as cv

DATA = os.path.join(os.path.dirname(__file__), "data", "runlocal_lr_traces.npz")


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
  """Stationary unit-variance AR(1) draws [..., T]."""
  e = rng.standard_normal(shape)
  x = np.empty(shape)
  x[..., 0] = e[..., 0]
  s = math.sqrt(1.0 - phi * phi)
  for t in range(1, shape[-1]):
    x[..., t] = phi * x[..., t - 1] + s * e[..., t]
  return x


def _planted(
  rng: np.random.Generator,
  n: int,
  t: int,
  lam: float = 40.0,
  tau: tuple[float, float] = (46.0, 80.0),
) -> np.ndarray:
  """Per-draw LLC-unit traces [n, 4, t]: λ − A·exp(−t/τ) + white noise (sd 10), as runlocal's."""
  amp = rng.uniform(26.0, 41.0, (n, 1, 1))
  tc = rng.uniform(*tau, (n, 1, 1))
  return lam - amp * np.exp(-np.arange(t) / tc) + 10.0 * rng.standard_normal((n, 4, t))


def _reference_sets() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(20240611)
  e = rng.normal(size=(4, 601))
  ar = np.zeros((4, 601))
  for t in range(1, 601):
    ar[:, t] = 0.8 * ar[:, t - 1] + e[:, t]
  return {
    "iid": rng.normal(size=(4, 500)),
    "ar_odd": ar,
    "shift": rng.normal(size=(4, 300)) + np.array([[0.0], [0.0], [0.0], [0.4]]),
    "scale": rng.normal(size=(4, 300)) * np.array([[1.0], [1.0], [1.0], [2.5]]),
    "ties": np.round(rng.standard_t(4, size=(3, 250)), 1),
  }


# ArviZ 0.23.4 (`_rhat_rank`, `_ess_bulk`, `_ess_tail`, `_ess_mean`, `_mcse_mean`) on
# `_reference_sets()`: (rhat, ess_bulk, ess_tail, ess_mean, mcse_mean).
ARVIZ = {
  "iid": (
    1.0014782025916529,
    1858.2209899033505,
    2012.307714495613,
    1860.6889156532354,
    0.02323128538043425,
  ),
  "ar_odd": (
    1.0053816264476527,
    240.30069754344933,
    559.2682801902945,
    239.37909802356612,
    0.11220048708379317,
  ),
  "shift": (
    1.0097405505168293,
    1174.0351046492663,
    1088.5923297698093,
    1170.0482018753758,
    0.02903161412284862,
  ),
  "scale": (
    1.0906072954856683,
    1176.284323180544,
    77.05308878847661,
    1186.0248588243533,
    0.04401019874370452,
  ),
  "ties": (
    1.0025947000570723,
    745.8419659882476,
    669.6186752188553,
    768.6426610352406,
    0.05460569683764654,
  ),
}
FUNCS = (cv.rhat, cv.ess_bulk, cv.ess_tail, cv.ess_mean, cv.mcse_mean)


def test_module_imports_only_numpy():
  with open(cv.__file__) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      names.add((node.module or "").split(".")[0])
  assert names <= {"__future__", "dataclasses", "math", "numpy"}, names


def test_ndtri_known_quantiles():
  assert cv.ndtri(0.975) == pytest.approx(1.959963984540054, abs=1e-14)
  assert cv.ndtri(0.5) == 0.0
  assert cv.ndtri(0.8413447460685429) == pytest.approx(1.0, abs=1e-13)
  assert cv.ndtri(1e-10) == pytest.approx(-6.361340902404056, rel=1e-12)
  assert cv.ndtri(1e-300) == pytest.approx(-37.0470962993612, rel=1e-12)
  p = np.concatenate([np.logspace(-200, -1, 300), np.linspace(0.01, 0.99, 301)])
  # Dyadic p, so that 1 − p is exact.
  sym = np.concatenate([2.0 ** -np.arange(2, 52), np.arange(1, 2**20, 997) / 2**20])
  np.testing.assert_allclose(cv.ndtri(1 - sym), -cv.ndtri(sym), rtol=1e-9, atol=1e-12)
  # Φ(Φ⁻¹(p)) = p, with Φ from math.erfc.
  phi = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in cv.ndtri(p)])
  np.testing.assert_allclose(phi, p, rtol=1e-12)
  assert np.array_equal(cv.ndtri([0.0, 1.0]), [-np.inf, np.inf])
  assert np.isnan(cv.ndtri([-0.1, 1.1, np.nan])).all()
  scipy_special = pytest.importorskip("scipy.special")
  q = np.linspace(1e-6, 1 - 1e-6, 1001)
  np.testing.assert_allclose(cv.ndtri(q), scipy_special.ndtri(q), rtol=1e-13, atol=1e-15)


def test_rank_normalize_is_standard_normal_and_rank_based():
  rng = np.random.default_rng(0)
  x = rng.exponential(size=(4, 500)) ** 3
  z = cv.rank_normalize(x)
  assert z.shape == x.shape
  assert abs(z.mean()) < 1e-12 and 0.98 < z.std() < 1.0
  assert abs(np.mean(z**4) - 3.0) < 0.1
  np.testing.assert_allclose(cv.rank_normalize(np.log(x)), z)  # monotone invariant
  # Blom's offsets: the smallest of S draws maps to Φ⁻¹((1 − 3/8)/(S + 1/4)).
  assert z.min() == pytest.approx(cv.ndtri(0.625 / 2000.25))
  ties = cv.rank_normalize(np.array([[1.0, 2.0, 2.0, 3.0]]))
  assert ties[0, 1] == ties[0, 2] == 0.0
  # Leading axes are independent entries.
  both = cv.rank_normalize(np.stack([x, -x]))
  np.testing.assert_allclose(both[0], z)
  np.testing.assert_allclose(both[1], -z)


def test_split_chains():
  x = np.arange(2 * 7).reshape(2, 7)
  s = cv.split_chains(x)
  assert s.shape == (4, 3)
  np.testing.assert_array_equal(s, [[0, 1, 2], [7, 8, 9], [4, 5, 6], [11, 12, 13]])
  assert cv.split_chains(np.zeros((3, 2, 8))).shape == (3, 4, 4)


@pytest.mark.parametrize("name", sorted(ARVIZ))
def test_matches_arviz_reference_values(name):
  x = _reference_sets()[name]
  for f, want in zip(FUNCS, ARVIZ[name]):
    assert float(f(x)) == pytest.approx(want, rel=1e-10), f.__name__


def test_batched_equals_per_entry():
  sets = _reference_sets()
  x = np.stack([sets["shift"], sets["scale"]])[None]  # [1, 2, 4, 300]
  for f, col in zip(FUNCS, range(5)):
    np.testing.assert_allclose(f(x), [[ARVIZ["shift"][col], ARVIZ["scale"][col]]], rtol=1e-10)


def test_iid_normal_rhat_and_ess():
  x = np.random.default_rng(1).standard_normal((4, 1000))
  assert cv.rhat(x) < 1.005
  assert cv.ess_bulk(x) == pytest.approx(4000, rel=0.15)
  assert cv.ess_tail(x) == pytest.approx(4000, rel=0.15)
  assert cv.ess_mean(x) == pytest.approx(4000, rel=0.15)
  assert cv.mcse_mean(x) == pytest.approx(1 / math.sqrt(4000), rel=0.15)


def test_ar1_ess_matches_theory():
  phi = 0.9
  x = _ar1(np.random.default_rng(2), (8, 4, 2000), phi)
  want = 4 * 2000 * (1 - phi) / (1 + phi)
  for f in (cv.ess_bulk, cv.ess_mean):
    ess = f(x)
    assert np.median(ess) == pytest.approx(want, rel=0.2)
    assert np.all(np.abs(ess / want - 1) < 0.4)


def test_rhat_detects_shifted_means_and_unequal_scales():
  rng = np.random.default_rng(3)
  shifted = rng.standard_normal((4, 1000)) + np.array([[0.0], [0.0], [0.0], [1.5]])
  assert cv.rhat(shifted) > 1.1
  scaled = rng.standard_normal((4, 1000)) * np.array([[1.0], [1.0], [1.0], [4.0]])
  bulk = cv._rhat_chains(cv.rank_normalize(cv.split_chains(scaled)))
  assert bulk < 1.01  # the locations agree: the classic (bulk) R̂ is blind to it
  assert cv.rhat(scaled) > 1.05  # the folded R̂ sees the different scales


def test_drift_z():
  rng = np.random.default_rng(4)
  z = cv.drift_z(_ar1(rng, (400, 4, 400), 0.5))
  assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.25 and np.mean(np.abs(z) > 3) < 0.02
  trend = rng.standard_normal((20, 4, 400)) + np.linspace(0, 1.0, 400)
  assert np.all(np.abs(cv.drift_z(trend)) > 3)
  assert np.all(cv.drift_z(-trend) < -3)


def test_mser_truncation_finds_a_planted_step():
  rng = np.random.default_rng(5)
  y = 0.3 * rng.standard_normal((50, 600))
  y[:, :120] += 3.0
  d = cv.mser_truncation(y)
  assert d.shape == (50,) and d.dtype.kind == "i"
  assert np.all(d % 5 == 0) and np.all(d >= 120)  # never stops inside the step
  assert np.median(d) == 120 and np.mean(d <= 140) >= 0.9
  assert np.all(cv.mser_truncation(0.3 * rng.standard_normal((50, 600))) <= 300)
  assert cv.mser_truncation(y, max_fraction=0.1).max() <= 60  # the search window


def test_auto_burnin_rule_and_relaxing():
  rng = np.random.default_rng(6)
  y = _planted(rng, 100, 800)
  b = cv.auto_burnin(y)
  assert set(b) == {"burnin", "mser", "relaxing"}
  np.testing.assert_array_equal(
    b["burnin"], np.where(b["relaxing"], 400, np.minimum(2 * b["mser"], 400))
  )
  np.testing.assert_array_equal(b["relaxing"], b["mser"] > 200)
  assert np.all(b["burnin"] >= 100)  # the transient (A e^{-t/τ} with τ ≥ 46) is cut
  slow = 40.0 - 35.0 * np.exp(-np.arange(400) / 400.0) + 10.0 * rng.standard_normal((20, 4, 400))
  assert np.all(cv.auto_burnin(slow)["relaxing"])


def test_planted_transients_not_converged_without_burnin():
  r = cv.assess(_planted(np.random.default_rng(7), 50, 400))
  assert np.all(r["status"] == cv.NOT_CONVERGED)
  assert all(r["reasons"])


def test_auto_burnin_estimate_is_unbiased_on_planted_transients():
  lam = 40.0
  y = _planted(np.random.default_rng(8), 200, 800, lam=lam)
  burn = cv.auto_burnin(y)["burnin"]
  z = np.empty(len(y))
  for i, (yi, bi) in enumerate(zip(y, burn)):
    kept = yi[:, bi:]
    z[i] = (kept.mean() - lam) / cv.mcse_mean(kept)
  assert np.mean(np.abs(z) <= 3) >= 0.95
  assert abs(z.mean()) <= 1.0


def test_false_alarm_rate_of_stationary_traces():
  tau = 1.2
  x = _ar1(np.random.default_rng(9), (300, 4, 400), (tau - 1) / (tau + 1))
  r = cv.assess(x)
  assert np.all(r["status"] != cv.UNCHECKED)
  assert np.mean(r["status"] == cv.NOT_CONVERGED) <= 0.03
  assert np.median(r["ess_bulk_per_chain"]) == pytest.approx(400 / tau, rel=0.1)


def test_assess_status_valid_mask_and_reasons():
  rng = np.random.default_rng(10)
  x = rng.standard_normal((2, 5, 400))
  x[0, 4] += 3.0  # one chain elsewhere
  r = cv.assess(x)
  assert r["status"].shape == (2,)
  assert [cv.CONVERGENCE_STATUS[s] for s in r["status"]] == ["not_converged", "converged"]
  assert r["reasons"][0].startswith("R̂ ") and "≥ 1.01" in r["reasons"][0] and r["reasons"][1] == ""
  np.testing.assert_array_equal(r["num_chains"], [5, 5])
  np.testing.assert_array_equal(r["num_draws"], [400, 400])
  np.testing.assert_allclose(r["ess_bulk_per_chain"], r["ess_bulk"] / 5)

  valid = np.ones((2, 5), bool)
  valid[0, 4] = False
  m = cv.assess(x, valid=valid)
  assert list(m["status"]) == [cv.CONVERGED, cv.CONVERGED]
  np.testing.assert_array_equal(m["num_chains"], [4, 5])
  ref = cv.assess(x[0, :4])
  for k in ("rhat", "ess_bulk", "ess_tail", "drift_z", "mcse"):
    assert m[k][0] == pytest.approx(ref[k]), k

  valid[1, 1:] = False  # 1 valid chain < min_chains
  assert cv.assess(x, valid=valid)["status"][1] == cv.UNCHECKED
  assert cv.assess(x[..., :399])["status"].tolist() == [cv.UNCHECKED] * 2
  loose = cv.ConvergenceCriteria(min_draws=200)
  assert cv.assess(x[1, :, :200], loose)["status"] == cv.CONVERGED

  bad = x[1].copy()
  bad[2, 17] = np.nan
  r = cv.assess(bad)
  assert r["status"] == cv.NOT_CONVERGED and "nan" in r["reasons"][0]

  drift = x[1] + np.linspace(0, 0.5, 400)
  r = cv.assess(drift)
  assert r["status"] == cv.NOT_CONVERGED and "drift z " in r["reasons"][0]


def test_criteria_validation():
  assert cv.ConvergenceCriteria().min_draws == 400
  with pytest.raises(ValueError):
    cv.ConvergenceCriteria(min_draws=0)
  with pytest.raises(ValueError):
    cv.ConvergenceCriteria(rhat_max=1.0)
  with pytest.raises(Exception):
    cv.ConvergenceCriteria().rhat_max = 2.0  # frozen


def test_real_runlocal_traces():
  """Real runlocal chains start at w* and relax for ~200 draws (amplitude ~10 early, ~40 late)."""
  d = np.load(DATA)
  loss, steps = d["loss_trace"], d["steps"]
  r = cv.assess(loss)
  # With no burn-in the 400 draws are not converged (R̂ and bulk ESS fail everywhere).
  assert np.all(r["status"][steps >= 100] == cv.NOT_CONVERGED)
  assert np.all(r["rhat"] >= 1.01) and np.all(r["ess_bulk_per_chain"] < 100)
  b = cv.auto_burnin(loss)
  assert np.all(b["burnin"] >= 150)
  # The developed checkpoints relax more slowly: MSER truncates past draw 100 of 400,
  # so they are flagged as still relaxing (run longer) and half the draws are dropped.
  late = steps >= 1500
  assert np.all(b["relaxing"][late]) and not np.any(b["relaxing"][steps <= 330])
  loose = cv.ConvergenceCriteria(min_draws=1)
  for i in range(len(steps)):
    kept = cv.assess(loss[i, :, b["burnin"][i] :], loose)
    assert kept["status"] == cv.CONVERGED, (steps[i], kept["reasons"])
