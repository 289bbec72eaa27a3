"""Essential dynamics (ED): milestones of training found in function space.

The function-space probe of Hoogland et al. (2024, first version, "The Developmental
Landscape of In-Context Learning"; write-up "Stagewise Development in Neural
Networks"). The model's outputs on a fixed input set, recorded at U steps, are one
point per step in output space; PCA over the steps gives the trajectory's principal
directions, and the geometry of the smoothed trajectory in the planes of the top PCs
marks where development turns. What is implemented (docs/reference/essential_dynamics.md
has the same equations):

1. **PCA.** X_UxF (one row per step, F output features) is centred over steps,
   X̃ = X − mean_U X, and decomposed by SVD, X̃ = A Σ Bᵀ. The scores are
   s_UxZ = A Σ (top Z components) and the explained-variance ratio of PC z is
   σ_z² / Σ_j σ_j². Each PC's sign is fixed so that its score rises from the first to
   the last step (s[U−1, z] ≥ s[0, z]).
2. **Smoothing.** Each score is smoothed over the point index u with a Gaussian of
   width σ(u) points (`sigma_early` before step `late_from_step`, `sigma_late` from
   it on): s̄[u] = Σ_j w_uj s[j] / Σ_j w_uj, w_uj = exp(−(j − u)²/2σ(u)²) for
   |j − u| ≤ 4σ(u). Near the ends the kernel is truncated and renormalised (no
   reflection: a reflected curve has zero speed at its ends and spurious curvature).
3. **Osculating circles.** In a plane (PC a, PC b) the smoothed curve is
   γ_u = (s̄_a[u], s̄_b[u]). At an interior point, γ' = (γ_{u+1} − γ_{u−1})/2 and
   γ'' = γ_{u+1} − 2γ_u + γ_{u−1}; with k = γ'_x γ''_y − γ'_y γ''_x, the radius is
   R_u = |γ'|³/|k| and the centre c_u = γ_u + R_u · sign(k) · rot90(γ'/|γ'|)
   (the evolute is the curve of centres). The centre's relative movement is
   m_u = |c_{u+1} − c_{u−1}| / |γ_{u+1} − γ_{u−1}|, the discrete |dR/ds|: it is 0
   at a vertex of the curve (a cusp of the evolute).
4. **Milestones**, decided by thresholds (never a top-N selection, which always
   returns N). L is the smoothed curve's length in the plane and γ(s) the curve at
   arc length s (the polyline interpolated). A point u *turns* when, with
   ℓ = `turn_arc` · L, the chords a = γ_u − γ(s_u − ℓ) and b = γ(s_u + ℓ) − γ_u
   exist (the curve is at least ℓ long on both sides), are both at least
   `min_straightness` · ℓ long (the curve goes nearly straight into and out of u:
   a corner, not jitter such as that of the slow, flat ends of a random walk's
   cosine PCs) and meet at an angle of at least `min_turn_deg`.
   - **sharp point**: u turns, R_u ≤ R_{u±1} and R_u ≤ `sharp_radius` · L;
   - **cusp** (vertex): u turns, m_u ≤ m_{u±1}, m_u ≤ `cusp_movement`,
     R_u ≤ `cusp_radius` · L, and one of the plane's PCs reverses within
     ±`reversal_tolerance` points of u;
   - **reversal** of PC z: the smoothed score's derivative changes sign at u
     (s̄_z[u] is a strict local extremum) whose topographic prominence on both sides
     (the descent before a higher point, or the end) is at least `min_prominence` × the
     score's range. Reversals count only for PCs whose explained-variance
     ratio is at least `evr_threshold`.
   Planes are formed only from PCs above `evr_threshold` (among the top
   `num_components`), and always with PC1: (PC1, PC z) for z = 2 … (the paper's
   PC1–PC2 and PC1–PC3 figures). PC2–PC3 is left out: for a random walk it is the
   Lissajous curve (cos 2πt, cos 3πt), whose sharp features belong to the null.
   A reversal of a PC whose explained-variance ratio is at least `reversal_evr` is a
   milestone by itself (**reversal**): the trajectory turns back along a direction
   that carries much of its variance. A random walk's PCs that reverse (PC z ≥ 2
   reverses z − 1 times) carry at most ~15 % (6/π²z²), its PC1 never reverses.
   Milestones of all planes and PCs within `merge_tolerance` points of each other
   are one milestone, at the point with the smallest R/L among them.

The default thresholds were fixed on synthetic trajectories (planted turns) and then
checked against null trajectories: noisy log-sampled straight lines and matched
high-dimensional random walks, whose PCs are cosine-like (Antognini &
Sohl-Dickstein 2018): PC1–PC2 ≈ (cos πt, cos 2πt), a parabola with a genuine vertex
whose radius is about a quarter of the curve's length. The null regime is a walk in
F ≥ 10·U dimensions: with fewer, the PCs are rough at the scale of a point
(benchmarks/ed_null.py writes docs/results/ed_null.md; tests/test_essential_dynamics.py
asserts the rates). Below ~100 points a planted corner and a random walk's features
have similar radii: record more points (`config.train.ed_every`).

Arrays use the package glossary (`devinterp_jax.typing`): U output-recording steps,
F flattened output features, Z principal components.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from devinterp_jax import atomic
from devinterp_jax.analysis import batching
from devinterp_jax.typing import Params


@dataclasses.dataclass(frozen=True)
class EDOptions:
  """Thresholds and smoothing of `essential_dynamics` (module docstring: the rules)."""

  num_components: int = 3
  sigma_early: float = 1.0
  sigma_late: float = 1.0
  late_from_step: float | None = None
  evr_threshold: float = 0.05
  reversal_evr: float = 0.3
  turn_arc: float = 0.05
  min_straightness: float = 0.7
  min_turn_deg: float = 50.0
  min_prominence: float = 0.2
  sharp_radius: float = 0.02
  cusp_radius: float = 0.04
  cusp_movement: float = 0.5
  reversal_tolerance: int = 2
  merge_tolerance: int = 2

  def __post_init__(self):
    checks = {
      "num_components": self.num_components >= 2,
      "sigma_early": self.sigma_early >= 0,
      "sigma_late": self.sigma_late >= 0,
      "evr_threshold": 0 <= self.evr_threshold < 1,
      "reversal_evr": 0 <= self.reversal_evr <= 1,
      "turn_arc": 0 < self.turn_arc < 0.5,
      "min_straightness": 0 <= self.min_straightness <= 1,
      "min_prominence": 0 <= self.min_prominence < 1,
      "min_turn_deg": 0 <= self.min_turn_deg <= 180,
      "sharp_radius": self.sharp_radius > 0,
      "cusp_radius": self.cusp_radius > 0,
      "cusp_movement": self.cusp_movement >= 0,
      "reversal_tolerance": self.reversal_tolerance >= 0,
      "merge_tolerance": self.merge_tolerance >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
      values = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
      raise ValueError(f"essential dynamics: out-of-range option(s) {values}")


@dataclasses.dataclass
class Plane:
  """The geometry of one PC plane's smoothed curve (NaN at the two end points)."""

  pcs: tuple[int, int]
  length: float
  radius_U: np.ndarray
  centre_Ux2: np.ndarray
  movement_U: np.ndarray
  turn_deg_U: np.ndarray
  sharp: list[int]
  cusps: list[int]
  counted: bool = True  # both PCs pass evr_threshold: milestones are read from it


@dataclasses.dataclass
class EDResult:
  """PCA of the output trajectory, its smoothed geometry and the milestones."""

  steps_U: np.ndarray
  scores_UxZ: np.ndarray
  smoothed_UxZ: np.ndarray
  explained_variance_ratio_Z: np.ndarray
  reversals: dict[int, list[int]]
  planes: list[Plane]
  milestones: list[dict[str, Any]]
  options: EDOptions

  @property
  def milestone_steps(self) -> list[int]:
    return [m["step"] for m in self.milestones]

  def to_json(self) -> dict[str, Any]:
    return {
      "num_points": int(len(self.steps_U)),
      "explained_variance_ratio": [round(float(v), 6) for v in self.explained_variance_ratio_Z],
      "reversals": {
        f"PC{z + 1}": [int(self.steps_U[u]) for u in us] for z, us in self.reversals.items()
      },
      "milestones": self.milestones,
      "options": dataclasses.asdict(self.options),
    }

  def save(self, out_dir: str) -> None:
    """ed.json (milestones, explained variance, options) and ed.npz (the arrays)."""
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_text(os.path.join(out_dir, "ed.json"), json.dumps(self.to_json(), indent=1))
    arrays = {
      "steps": self.steps_U,
      "scores": self.scores_UxZ,
      "smoothed": self.smoothed_UxZ,
      "explained_variance_ratio": self.explained_variance_ratio_Z,
    }
    for p in self.planes:
      tag = f"pc{p.pcs[0] + 1}_pc{p.pcs[1] + 1}"
      arrays[f"{tag}_radius"] = p.radius_U
      arrays[f"{tag}_centre"] = p.centre_Ux2
    atomic.save_npz(os.path.join(out_dir, "ed.npz"), **arrays)


def principal_components(outputs_UxF: np.ndarray, num_components: int):
  """Scores [U, Z] and explained-variance ratios [Z] of the steps' outputs (PCA over
  steps; each PC's sign makes its score rise from the first to the last step)."""
  x = np.asarray(outputs_UxF, np.float64)
  if x.ndim != 2 or x.shape[0] < 3:
    raise ValueError(f"essential dynamics needs outputs [U ≥ 3 steps, F], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    bad = np.unique(np.nonzero(~np.isfinite(x))[0])
    raise ValueError(f"essential dynamics: non-finite outputs at point(s) {bad.tolist()[:10]}")
  x = x - x.mean(axis=0, keepdims=True)
  # The steps' Gram matrix is U×U (U ≪ F): its eigenvectors are the left singular vectors.
  gram = x @ x.T
  evals, evecs = np.linalg.eigh(gram)
  order = np.argsort(evals)[::-1]
  evals = np.clip(evals[order], 0.0, None)
  evecs = evecs[:, order]
  total = evals.sum()
  if total <= 0:
    raise ValueError("essential dynamics: the outputs do not change over the steps")
  z = min(num_components, x.shape[0] - 1)
  scores = evecs[:, :z] * np.sqrt(evals[:z])
  flip = np.where(scores[-1] >= scores[0], 1.0, -1.0)
  return scores * flip, evals[:z] / total


def smooth(values_UxZ: np.ndarray, steps_U: np.ndarray, options: EDOptions) -> np.ndarray:
  """Each column smoothed over the point index with the step-dependent Gaussian."""
  v = np.asarray(values_UxZ, np.float64)
  n = v.shape[0]
  sig = np.full(n, options.sigma_early, np.float64)
  if options.late_from_step is not None:
    sig[np.asarray(steps_U, np.float64) >= options.late_from_step] = options.sigma_late
  out = np.empty_like(v)
  idx = np.arange(n)
  for u in range(n):
    s = sig[u]
    if s <= 0:
      out[u] = v[u]
      continue
    j = idx[np.abs(idx - u) <= 4 * s]
    w = np.exp(-0.5 * ((j - u) / s) ** 2)
    out[u] = (w[:, None] * v[j]).sum(axis=0) / w.sum()
  return out


def osculating_circles(curve_Ux2: np.ndarray):
  """Radius [U], centre [U, 2] and relative centre movement [U] (NaN where undefined:
  the end points, and the centre and its movement where the curve is straight)."""
  g = np.asarray(curve_Ux2, np.float64)
  n = len(g)
  radius = np.full(n, np.nan)
  centre = np.full((n, 2), np.nan)
  movement = np.full(n, np.nan)
  if n < 3:
    return radius, centre, movement
  d1 = (g[2:] - g[:-2]) / 2
  d2 = g[2:] - 2 * g[1:-1] + g[:-2]
  k = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
  speed = np.linalg.norm(d1, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.where(np.abs(k) > 0, speed**3 / np.abs(k), np.inf)
    tangent = d1 / speed[:, None]
    normal = np.sign(k)[:, None] * np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    c = g[1:-1] + np.where(np.isfinite(r), r, np.nan)[:, None] * normal
  radius[1:-1] = r
  centre[1:-1] = c
  with np.errstate(divide="ignore", invalid="ignore"):
    chord = np.linalg.norm(g[2:] - g[:-2], axis=1)
    movement[2:-2] = np.linalg.norm(centre[3:-1] - centre[1:-3], axis=1) / chord[1:-1]
  return radius, centre, movement


def turning(curve_Ux2: np.ndarray, arc: float, min_straightness: float) -> np.ndarray:
  """Angle in degrees between the chords a = γ_u − γ(s_u − ℓ) and b = γ(s_u + ℓ) − γ_u,
  with ℓ = `arc` (a length along the curve; γ(s) interpolates the polyline by arc
  length s). NaN where the curve is shorter than ℓ on either side of u, or either
  chord is shorter than `min_straightness` · ℓ (the curve does not go straight
  there: jitter, not a corner)."""
  g = np.asarray(curve_Ux2, np.float64)
  n = len(g)
  out = np.full(n, np.nan)
  if n < 3 or arc <= 0:
    return out
  s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(g, axis=0), axis=1))])

  def at(t: float) -> np.ndarray:
    return np.array([np.interp(t, s, g[:, k]) for k in range(g.shape[1])])

  for u in range(1, n - 1):
    if s[u] - arc < 0 or s[u] + arc > s[-1]:
      continue
    a = g[u] - at(s[u] - arc)
    b = at(s[u] + arc) - g[u]
    la, lb = np.linalg.norm(a), np.linalg.norm(b)
    if min(la, lb) < min_straightness * arc or la == 0 or lb == 0:
      continue
    out[u] = np.degrees(np.arccos(np.clip(a @ b / (la * lb), -1.0, 1.0)))
  return out


def reversals(pc_U: np.ndarray, min_prominence: float) -> list[int]:
  """Points where the smoothed PC's derivative changes sign (a strict local extremum)
  whose prominence on *both* sides is at least `min_prominence` × the PC's range. For
  a maximum at u, its prominence on the left is p[u] − min p over the points between
  u and the nearest higher point to its left (or the start), and likewise on the
  right; minima the same with −p. Wiggles on a noisy plateau do not chop a real
  reversal's sides (topographic prominence, not the distance to the next extremum)."""
  p = np.asarray(pc_U, np.float64)
  span = np.ptp(p) if len(p) else 0.0
  if span == 0:
    return []
  d = np.diff(p)
  out = []
  for u in range(1, len(p) - 1):
    if d[u - 1] * d[u] >= 0:
      continue
    q = p if d[u - 1] > 0 else -p  # a maximum of q
    left = q[:u][::-1]
    higher = np.nonzero(left > q[u])[0]
    lo = left[: higher[0]] if higher.size else left
    right = q[u + 1 :]
    higher = np.nonzero(right > q[u])[0]
    hi = right[: higher[0]] if higher.size else right
    if lo.size and hi.size and min(q[u] - lo.min(), q[u] - hi.min()) >= min_prominence * span:
      out.append(u)
  return out


def _local_min(x: np.ndarray, u: int) -> bool:
  return bool(x[u] <= np.nanmin([x[u - 1], x[u + 1]]))


def _plane(smoothed_UxZ, pcs, revs, o: EDOptions, counted: bool) -> Plane:
  a, b = pcs
  curve = smoothed_UxZ[:, [a, b]]
  length = float(np.linalg.norm(np.diff(curve, axis=0), axis=1).sum())
  radius, centre, movement = osculating_circles(curve)
  turn = turning(curve, o.turn_arc * length, o.min_straightness)
  rev = sorted(set(revs.get(a, [])) | set(revs.get(b, [])))
  sharp, cusps = [], []
  for u in range(2, len(curve) - 2) if counted else ():
    if not (np.isfinite(turn[u]) and turn[u] >= o.min_turn_deg) or length == 0:
      continue
    rel = radius[u] / length
    if rel <= o.sharp_radius and _local_min(radius, u):
      sharp.append(u)
    near_reversal = any(abs(u - r) <= o.reversal_tolerance for r in rev)
    if (
      rel <= o.cusp_radius
      and np.isfinite(movement[u])
      and movement[u] <= o.cusp_movement
      and _local_min(movement, u)
      and near_reversal
    ):
      cusps.append(u)
  return Plane(pcs, length, radius, centre, movement, turn, sharp, cusps, counted)


def essential_dynamics(
  steps_U: Sequence[int] | np.ndarray,
  outputs_UxF: np.ndarray,
  options: EDOptions | None = None,
) -> EDResult:
  """PCA, smoothing, osculating geometry and milestones of an output trajectory
  (module docstring). `outputs_UxF[u]` is the model's flattened outputs at
  `steps_U[u]` (increasing)."""
  o = options or EDOptions()
  steps = np.asarray(steps_U)
  if steps.ndim != 1 or len(steps) != np.shape(outputs_UxF)[0]:
    raise ValueError(
      f"essential dynamics: {len(steps)} steps for outputs of shape {np.shape(outputs_UxF)}"
    )
  if np.any(np.diff(steps) <= 0):
    raise ValueError("essential dynamics: steps must increase")
  scores, evr = principal_components(outputs_UxF, o.num_components)
  smoothed = smooth(scores, steps, o)
  kept = [z for z in range(len(evr)) if evr[z] >= o.evr_threshold]
  revs = {z: reversals(smoothed[:, z], o.min_prominence) for z in kept}
  # Every (PC1, PC z) plane is drawn; milestones come only from those whose PCs pass
  # evr_threshold (`Plane.counted`).
  planes = [_plane(smoothed, (0, z), revs, o, 0 in kept and z in kept) for z in range(1, len(evr))]
  found = []  # (u, kind, where, R/L)
  for p in planes:
    for kind, us in (("sharp", p.sharp), ("cusp", p.cusps)):
      for u in us:
        found.append(
          (u, kind, f"PC{p.pcs[0] + 1}-PC{p.pcs[1] + 1}", float(p.radius_U[u] / p.length))
        )
  for z in kept:
    if evr[z] >= o.reversal_evr:
      found.extend((u, "reversal", f"PC{z + 1}", float("inf")) for u in revs[z])
  found.sort()
  groups: list[list[tuple]] = []
  for f in found:
    if groups and f[0] - groups[-1][-1][0] <= o.merge_tolerance:
      groups[-1].append(f)
    else:
      groups.append([f])
  milestones = []
  for g in groups:
    best = min(g, key=lambda f: f[3])
    milestones.append(
      {
        "step": int(steps[best[0]]),
        "index": int(best[0]),
        "kinds": sorted({f[1] for f in g}),
        "planes": sorted({f[2] for f in g}),
        "radius_over_length": round(best[3], 6) if np.isfinite(best[3]) else None,
      }
    )
  return EDResult(steps, scores, smoothed, evr, revs, planes, milestones, o)


OutputsFn = Callable[[Params, Any], jax.Array]
"""`outputs_fn(params, inputs) -> array`: the model's outputs on the fixed inputs (any
shape; flattened to the F features of one point)."""


@functools.lru_cache(maxsize=16)
def _flat(outputs_fn: OutputsFn):
  def fn(params, inputs):
    return {"outputs": jnp.reshape(outputs_fn(params, inputs), (-1,))}

  return fn


def trajectory_outputs(
  outputs_fn: OutputsFn,
  params_list: Sequence[Params],
  inputs: Any,
  *,
  checkpoint_chunk: int = 8,
) -> np.ndarray:
  """outputs_UxF: `outputs_fn(params, inputs)` flattened, for every params of
  `params_list` (one jitted vmap per `checkpoint_chunk`, `batching.map_checkpoints`)."""
  out = batching.map_checkpoints(
    _flat(outputs_fn), params_list, inputs, checkpoint_chunk=checkpoint_chunk
  )
  return np.asarray(out["outputs"], np.float64)


def recorder(probe, config, workdir: str) -> Callable[[Params], jax.Array] | None:
  """The training loop's `record_fn` for a setting's `ed_probe`: params → the flattened
  outputs on the probe's fixed inputs, jitted; None when `config.train.ed_every` is 0
  (or the setting has no probe)."""
  if probe is None or not config.train.get("ed_every", 0):
    return None
  outputs_fn, inputs = probe(config, workdir)
  flat = _flat(outputs_fn)
  return jax.jit(lambda params: flat(params, inputs)["outputs"])


def essential_dynamics_of(
  outputs_fn: OutputsFn,
  params_list: Sequence[Params],
  steps_U: Sequence[int],
  inputs: Any,
  options: EDOptions | None = None,
  *,
  checkpoint_chunk: int = 8,
) -> EDResult:
  """ED of any model from a notebook: its outputs on `inputs` at each params of
  `params_list` (taken at `steps_U`), then `essential_dynamics`."""
  outputs = trajectory_outputs(outputs_fn, params_list, inputs, checkpoint_chunk=checkpoint_chunk)
  return essential_dynamics(steps_U, outputs, options)


def pair_milestones(
  ed_steps: Sequence[int], llc_steps: Sequence[int], tolerance_log10: float
) -> dict[str, Any]:
  """Each ED milestone paired with the nearest LLC boundary in log10 step, when within
  `tolerance_log10` (a boundary pairs with at most one milestone, the nearest)."""
  ed = [int(s) for s in ed_steps]
  llc = [int(s) for s in llc_steps]

  def dist(a: int, b: int) -> float:
    return abs(np.log10(max(a, 1)) - np.log10(max(b, 1)))

  candidates = sorted((dist(e, b), e, b) for e in ed for b in llc if dist(e, b) <= tolerance_log10)
  used_e: set[int] = set()
  used_b: set[int] = set()
  pairs = []
  for d, e, b in candidates:
    if e in used_e or b in used_b:
      continue
    used_e.add(e)
    used_b.add(b)
    pairs.append({"ed_step": e, "llc_step": b, "log10_distance": round(d, 4)})
  pairs.sort(key=lambda p: p["ed_step"])
  return {
    "tolerance_log10": tolerance_log10,
    "matched": pairs,
    "unmatched_ed": [e for e in ed if e not in used_e],
    "unmatched_llc": [b for b in llc if b not in used_b],
  }


# ----------------------------------------------------------------------------------------
# Synthetic trajectories with known answers, and null rates for calibrating thresholds.


def planted_turns(
  num_points: int, dim: int, turns: Sequence[int], noise: float, seed: int
) -> np.ndarray:
  """A piecewise-linear path [U, F] at unit speed per point that turns, at each index
  in `turns`, into a new random direction orthogonal to all earlier ones, plus
  isotropic Gaussian noise of s.d. `noise` per feature."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(dim, len(turns) + 1)))
  bounds = [0, *turns, num_points - 1]
  x = np.zeros((num_points, dim))
  for seg in range(len(bounds) - 1):
    for u in range(bounds[seg] + 1, bounds[seg + 1] + 1):
      x[u] = x[u - 1] + q[:, seg]
  return x + noise * rng.normal(size=x.shape)


def noisy_line(num_points: int, dim: int, noise: float, seed: int) -> np.ndarray:
  """A straight line of length 1 sampled at log-spaced positions (as log-spaced
  checkpoints see steady training), plus isotropic noise of s.d. `noise` per feature."""
  rng = np.random.default_rng(seed)
  direction = rng.normal(size=dim)
  direction /= np.linalg.norm(direction)
  s = np.geomspace(1.0, 1000.0, num_points) / 1000.0
  return s[:, None] * direction + noise * rng.normal(size=(num_points, dim))


def random_walk(num_points: int, dim: int, seed: int) -> np.ndarray:
  """A Gaussian random walk [U, F]: its PCs are cosine-like, PC1–PC2 a parabola."""
  rng = np.random.default_rng(seed)
  return np.cumsum(rng.normal(size=(num_points, dim)), axis=0)


def null_rate(
  kind: str,
  num_points: int,
  dim: int,
  seeds: Sequence[int],
  options: EDOptions | None = None,
  noise: float = 0.0,
) -> dict[str, Any]:
  """The fraction of null trajectories (`kind` "random_walk" or "noisy_line") of U
  points in F dimensions on which `essential_dynamics` finds any milestone: the
  false-positive rate of the thresholds for data of that size."""
  steps = np.arange(1, num_points + 1)
  hits = []
  for seed in seeds:
    if kind == "random_walk":
      x = random_walk(num_points, dim, seed)
    elif kind == "noisy_line":
      x = noisy_line(num_points, dim, noise, seed)
    else:
      raise ValueError(f"null_rate: unknown kind {kind!r} (random_walk, noisy_line)")
    hits.append(len(essential_dynamics(steps, x, options).milestones) > 0)
  return {
    "kind": kind,
    "num_points": num_points,
    "dim": dim,
    "noise": noise,
    "seeds": len(hits),
    "with_milestones": int(sum(hits)),
    "rate": float(np.mean(hits)),
  }
