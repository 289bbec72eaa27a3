"""Head-level wrLLC analyses on synthetic trajectories with planted groups.

Trajectories are logistic shapes in x = ln(step + 1) (early rise, late rise,
rise-then-fall), scaled per head by 0.8–1.25 and perturbed by seeded Gaussian
noise of 2 % of the amplitude. Heads of one shape are interleaved with the
others so that the deterministic relabelling (clusters numbered by their first
head) is exercised.
"""

import json
import os
import warnings

import matplotlib.image
import numpy as np
import pytest

from devinterp_jax.analysis import heads
from devinterp_jax.analysis.heads import (
  HeadClusters,
  choose_num_clusters,
  cluster_trajectories,
  dispersion,
  drop_nonfinite_checkpoints,
  head_summary,
  normalize_trajectories,
)
from devinterp_jax.viz import heads as heads_viz
from devinterp_jax.viz.heads import plot_head_clusters, plot_head_trajectories

STEPS = np.unique(np.concatenate([[0], np.logspace(0, 5, 40).astype(int)]))
X = np.log1p(STEPS)


def _logistic(c, s=0.4):
  return 1.0 / (1.0 + np.exp(-(X - c) / s))


SHAPES = {
  "early": 50 * _logistic(3.0),
  "late": 50 * _logistic(8.0),
  "rise_fall": 60 * _logistic(4.5) - 30 * _logistic(8.5),
}


def _planted(shape_of_head, scales, noise=0.02, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for shape, scale in zip(shape_of_head, scales):
    base = SHAPES[shape]
    rows.append(scale * base + noise * np.ptp(base) * rng.standard_normal(len(X)))
  return np.asarray(rows)


# 12 heads, 3 shapes interleaved; planted labels numbered by first appearance.
SHAPE_OF = [
  "late",
  "early",
  "late",
  "rise_fall",
  "early",
  "rise_fall",
  "late",
  "early",
  "rise_fall",
  "late",
  "rise_fall",
  "early",
]
NAMES = [f"L{i // 4}H{i % 4}" for i in range(len(SHAPE_OF))]
SCALES = np.linspace(0.8, 1.25, len(SHAPE_OF))[np.random.default_rng(1).permutation(12)]
LLC = _planted(SHAPE_OF, SCALES)
EXPECTED = np.array([{"late": 0, "early": 1, "rise_fall": 2}[s] for s in SHAPE_OF])


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
@pytest.mark.parametrize("normalize", ["zscore", "max", "minmax"])
def test_planted_grouping_recovered_exactly(method, normalize):
  c = cluster_trajectories(LLC, NAMES, num_clusters=3, method=method, normalize=normalize)
  assert isinstance(c, HeadClusters)
  np.testing.assert_array_equal(c.labels, EXPECTED)  # exact, relabelled by first head
  assert c.num_clusters == 3 and c.names == tuple(NAMES)
  assert c.centers.shape == (3, len(STEPS)) and c.normalized.shape == LLC.shape
  for k in range(3):  # centres are the member means of the normalised trajectories
    np.testing.assert_allclose(c.centers[k], c.normalized[EXPECTED == k].mean(0), atol=1e-12)
  assert c.silhouette is not None and c.silhouette > 0.6
  if method == "hierarchical":
    assert c.linkage_matrix.shape == (len(NAMES) - 1, 4) and c.linkage == "ward"
  else:
    assert c.linkage_matrix is None and c.linkage is None
  assert c.members[1] == [n for n, s in zip(NAMES, SHAPE_OF) if s == "early"]


def test_relabelling_is_deterministic_across_seeds_and_orders():
  a = cluster_trajectories(LLC, NAMES, num_clusters=3, seed=0)
  b = cluster_trajectories(LLC, NAMES, num_clusters=3, seed=7)
  np.testing.assert_array_equal(a.labels, b.labels)
  # Reversing the heads gives the same partition, numbered by the new first head.
  r = cluster_trajectories(
    LLC[::-1], NAMES[::-1], num_clusters=3, method="hierarchical", linkage="average"
  )
  first_seen = {}
  expected_rev = [first_seen.setdefault(l, len(first_seen)) for l in EXPECTED[::-1].tolist()]
  np.testing.assert_array_equal(r.labels, expected_rev)
  assert r.labels[0] == 0


def test_normalisation_decides_shape_versus_scale():
  # Two shapes × two scales (×1 and ×10): shape groups {0,1,4,5}, {2,3,6,7}.
  shapes = ["early", "early", "late", "late"] * 2
  scales = [1.0, 1.15, 1.0, 1.15, 10.0, 11.5, 10.0, 11.5]
  llc = _planted(shapes, scales, noise=0.01, seed=3)
  names = [f"h{i}" for i in range(8)]
  by_shape = np.array([0, 0, 1, 1, 0, 0, 1, 1])
  for method in ("kmeans", "hierarchical"):
    for norm in ("zscore", "max", "final"):
      c = cluster_trajectories(llc, names, num_clusters=2, method=method, normalize=norm)
      np.testing.assert_array_equal(c.labels, by_shape, err_msg=f"{method}/{norm}")
    # Raw values: the ×10 early heads dominate the distances, so the ×1 heads of
    # both shapes fall together, apart from the ×10 heads of the same shape.
    raw = cluster_trajectories(llc, names, num_clusters=2, method=method, normalize="none")
    assert len(set(raw.labels[:4].tolist())) == 1, f"{method}: {raw.labels}"
    assert raw.labels[0] != raw.labels[4], f"{method}: {raw.labels}"
    # Even with K = 3 the ×1 heads of different shapes stay together: scale wins.
    raw3 = cluster_trajectories(llc, names, num_clusters=3, method=method, normalize="none")
    np.testing.assert_array_equal(raw3.labels, [0, 0, 0, 0, 1, 1, 2, 2], err_msg=method)


def test_normalisations_properties_and_scale_invariance():
  z = normalize_trajectories(LLC, "zscore")
  np.testing.assert_allclose(z.mean(1), 0, atol=1e-12)
  np.testing.assert_allclose(z.std(1), 1, atol=1e-12)
  np.testing.assert_allclose(np.abs(normalize_trajectories(LLC, "max")).max(1), 1, atol=1e-12)
  np.testing.assert_allclose(normalize_trajectories(LLC, "final")[:, -1], 1, atol=1e-12)
  mm = normalize_trajectories(LLC, "minmax")
  np.testing.assert_allclose(mm.min(1), 0, atol=1e-12)
  np.testing.assert_allclose(mm.max(1), 1, atol=1e-12)
  none = normalize_trajectories(LLC, "none")
  np.testing.assert_array_equal(none, LLC)
  assert none is not LLC
  scaled = LLC * np.array([3.0, 0.2] * 6)[:, None]
  for m in ("zscore", "max", "final", "minmax"):
    np.testing.assert_allclose(
      normalize_trajectories(scaled, m),
      normalize_trajectories(LLC, m),
      rtol=1e-10,
      atol=1e-12,
      err_msg=m,
    )
  const = normalize_trajectories(np.full((2, 5), 3.0), "zscore")  # constant head → 0
  np.testing.assert_array_equal(const, 0.0)


def test_dispersion_matches_numpy_population_variance():
  d = dispersion(LLC)
  np.testing.assert_allclose(d["mean"], LLC.mean(0), rtol=1e-12)
  np.testing.assert_allclose(d["variance"], np.var(LLC, axis=0, ddof=0), rtol=1e-12)
  np.testing.assert_allclose(d["std"], np.std(LLC, axis=0), rtol=1e-12)
  np.testing.assert_allclose(d["cv"], np.std(LLC, axis=0) / np.abs(LLC.mean(0)), rtol=1e-12)
  assert all(v.shape == (len(STEPS),) for v in d.values())
  zero = dispersion(np.array([[1.0, -2.0], [-1.0, 2.0]]))
  assert np.all(np.isnan(zero["cv"])) and np.allclose(zero["variance"], [1.0, 4.0])


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
def test_choose_num_clusters_finds_planted_k(method):
  k, scores = choose_num_clusters(LLC, NAMES, k_range=(2, 7), method=method)
  assert k == 3 and sorted(scores) == [2, 3, 4, 5, 6, 7]
  assert scores[3] == max(scores.values()) and scores[3] > max(scores[2], scores[4]) + 0.05
  two = ["early", "late"] * 4
  k2, _ = choose_num_clusters(
    _planted(two, np.linspace(0.8, 1.2, 8), seed=5),
    [f"h{i}" for i in range(8)],
    k_range=(2, 6),
    method=method,
  )
  assert k2 == 2


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown normalisation 'l2'"):
    normalize_trajectories(LLC, "l2")
  with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
    cluster_trajectories(LLC, NAMES, num_clusters=3, method="dbscan")
  with pytest.raises(ValueError, match="unknown linkage 'median'"):
    cluster_trajectories(LLC, NAMES, num_clusters=3, method="hierarchical", linkage="median")
  with pytest.raises(ValueError, match=rf"2-D.*\({len(STEPS)},\)"):
    normalize_trajectories(LLC[0], "zscore")
  with pytest.raises(ValueError, match="2-D"):
    dispersion(LLC[None])
  with pytest.raises(ValueError, match="11 names for 12 heads"):
    cluster_trajectories(LLC, NAMES[:-1], num_clusters=3)
  with pytest.raises(ValueError, match="num_clusters must be between 1 and .*13"):
    cluster_trajectories(LLC, NAMES, num_clusters=13)
  bad = LLC.copy()
  bad[5, 7] = np.nan
  bad[9, 30] = np.inf
  for fn in (
    lambda: normalize_trajectories(bad, "zscore", NAMES),
    lambda: cluster_trajectories(bad, NAMES, num_clusters=3),
    lambda: head_summary(STEPS, bad, NAMES),
  ):
    with pytest.raises(ValueError, match=r"L1H1 at checkpoint indices \[7\].*L2H1 .*\[30\]"):
      fn()
  with pytest.raises(ValueError, match=r"non-finite.*\[7\]"):
    dispersion(bad)
  neg = LLC.copy()
  neg[2, -1] = -1.0
  with pytest.raises(ValueError, match=r"'final'.*L0H2 \(last value -1\)"):
    normalize_trajectories(neg, "final", NAMES)
  with pytest.raises(ValueError, match="no K"):
    choose_num_clusters(LLC[:2], NAMES[:2])


def test_drop_nonfinite_checkpoints():
  bad, sem = LLC.copy(), np.full(LLC.shape, 0.5)
  bad[5, 7] = np.nan
  sem[0, 20] = np.nan
  steps, llc, sem2, dropped = drop_nonfinite_checkpoints(STEPS, bad, sem)
  assert dropped == [int(STEPS[7]), int(STEPS[20])]
  assert llc.shape == (12, len(STEPS) - 2) and sem2.shape == llc.shape
  np.testing.assert_array_equal(steps, np.delete(STEPS, [7, 20]))
  np.testing.assert_array_equal(llc, np.delete(LLC, [7, 20], axis=1))


def test_head_summary_is_json_and_consistent():
  sem = np.full(LLC.shape, 0.3)
  s = head_summary(STEPS, LLC, NAMES, sem_RxN=sem)
  s = json.loads(json.dumps(s, allow_nan=False))  # strictly JSON-serialisable
  assert s["num_clusters"] == 3 and s["num_clusters_source"] == "silhouette"
  for m in ("kmeans", "hierarchical"):
    assert [s["clusters"][m]["labels"][n] for n in NAMES] == EXPECTED.tolist()
  assert s["cluster_agreement_ari"] == pytest.approx(1.0)
  assert s["final_llc"]["L0H0"] == pytest.approx(LLC[0, -1]) and s["final_sem"]["L0H0"] == 0.3
  for r, n in enumerate(NAMES):
    assert s["peak_step"][n] == int(STEPS[np.argmax(LLC[r])])
  rf = NAMES[SHAPE_OF.index("rise_fall")]  # peak between the rise (e^4.5) and the fall (e^8.5)
  assert np.exp(4.5) < s["peak_step"][rf] < np.exp(8.5)
  assert s["dispersion_final"]["variance"] == pytest.approx(np.var(LLC[:, -1]), rel=1e-12)
  given = head_summary(STEPS, LLC, NAMES, num_clusters=2)
  assert given["num_clusters"] == 2 and given["num_clusters_source"] == "given"
  assert given["final_sem"]["L0H0"] is None


def _png_ok(path):
  assert os.path.getsize(path) > 10_000
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp file left


def test_plot_head_trajectories_writes_png(tmp_path):
  c = cluster_trajectories(LLC, NAMES, num_clusters=3)
  gappy = LLC.copy()
  gappy[3, 10] = np.nan  # a diverged checkpoint leaves a gap, not an error
  path = str(tmp_path / "a" / "heads.png")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = plot_head_trajectories(
      STEPS,
      gappy,
      NAMES,
      sem_RxN=np.full(LLC.shape, 1.0),
      boundaries=[20, 3000],
      clusters=c,
      path=path,
    )
  assert out == path
  _png_ok(path)
  path2 = str(tmp_path / "b" / "heads_plain.png")  # no step 0 → log axis; no clusters/sem
  plot_head_trajectories(STEPS[1:], LLC[:, 1:], NAMES, path=path2)
  _png_ok(path2)
  with pytest.raises(ValueError, match="other heads"):
    plot_head_trajectories(STEPS, LLC, NAMES[::-1], clusters=c, path=str(tmp_path / "x.png"))


def test_plot_head_trajectories_with_stage_boundaries(tmp_path):
  from devinterp_jax.analysis.stages import find_stage_boundaries

  mean = LLC.mean(0)
  stages = find_stage_boundaries(STEPS, mean, np.full_like(mean, 0.3), n_restarts=1)
  path = plot_head_trajectories(
    STEPS, LLC, NAMES, boundaries=stages, path=str(tmp_path / "s" / "heads.png")
  )
  _png_ok(path)


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
def test_plot_head_clusters_writes_png(tmp_path, method):
  c = cluster_trajectories(LLC, NAMES, num_clusters=3, method=method)
  path = plot_head_clusters(STEPS, LLC, NAMES, c, str(tmp_path / method / "clusters.png"))
  _png_ok(path)
  fig = heads_viz.head_clusters_figure(STEPS, LLC, NAMES, c)
  for j in range(c.num_clusters):  # each panel: the cluster's normalised heads and mean
    ys = [line.get_ydata() for line in fig.axes[j].get_lines() if len(line.get_ydata()) > 2]
    members = np.flatnonzero(c.labels == j)
    assert len(ys) == len(members) + 1
    np.testing.assert_allclose(ys[0], normalize_trajectories(LLC, c.normalize)[members[0]])


@pytest.mark.parametrize("linkage", ["ward", "average", "single"])
def test_dendrogram_layout_matches_scipy(linkage):
  """viz draws the dendrogram itself (no scipy): the same leaves and links as scipy's."""
  from scipy.cluster import hierarchy

  c = cluster_trajectories(LLC, NAMES, num_clusters=3, method="hierarchical", linkage=linkage)
  ref = hierarchy.dendrogram(c.linkage_matrix, no_plot=True)
  leaves, links = heads_viz.dendrogram_layout(c.linkage_matrix, len(NAMES))
  assert leaves == ref["leaves"]
  np.testing.assert_allclose([xs for _, xs, _ in links], ref["icoord"])
  np.testing.assert_allclose([ys for _, _, ys in links], ref["dcoord"])
  fig = heads_viz.head_clusters_figure(STEPS, LLC, NAMES, c)
  dendro = fig.axes[-1]
  assert [t.get_text() for t in dendro.get_xticklabels()] == [NAMES[i] for i in leaves]


def test_module_does_not_import_training():  # nor matplotlib: the figures are in viz
  import ast

  with open(heads.__file__) as f:
    tree = ast.parse(f.read())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
  assert imported and not any(m.startswith("devinterp_jax.training") for m in imported)
  assert not any(m.startswith(("matplotlib", "devinterp_jax.viz")) for m in imported)
