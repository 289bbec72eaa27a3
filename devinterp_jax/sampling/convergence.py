"""Convergence of SGLD loss traces: rank-normalised split-R̂, bulk/tail ESS, drift, burn-in.

All statistics act on traces [..., C, T] (any leading axes, chains on axis -2, draws on
axis -1) and return [...]; they are computed in float64 and follow Vehtari, Gelman,
Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding, and localization:
an improved R̂ for assessing convergence of MCMC", as implemented by Stan and ArviZ
(`rhat(method="rank")`, `ess(method="bulk" | "tail" | "mean")`):

  rank normalisation  z = Φ⁻¹((r − 3/8)/(S + 1/4)), r the rank (ties averaged) of a draw
                      among all S = C·T draws of its entry (Blom's offsets, c = 3/8).
  R̂                   max(R̂ of the rank-normalised split chains, R̂ of the rank-normalised
                      split chains folded about their median, |x − median|).
  ESS                 total over chains, from the multi-chain autocorrelation
                      ρ_t = 1 − (W − mean_c acov_c(t))/var⁺ truncated by Geyer's initial
                      positive sequence and made monotone (initial monotone sequence).
                      bulk: rank-normalised split chains; tail: min over the indicators
                      I(x ≤ q05), I(x ≤ q95) on split chains; mean: raw split chains.

`drift_z` compares the means of the first and last halves of the kept draws (Geweke);
`auto_burnin` picks a burn-in from the MSER-5 truncation (White 1997) of the chain-mean
trace; `assess` combines them into a status per entry under `ConvergenceCriteria`.

This module uses numpy only (no scipy or jax), so it can run anywhere a trace is loaded.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CONVERGENCE_STATUS = ("converged", "not_converged", "unchecked")
CONVERGED, NOT_CONVERGED, UNCHECKED = range(len(CONVERGENCE_STATUS))

# Wichura (1988), Algorithm AS 241 (PPND16): Φ⁻¹ to about 1e-16 relative accuracy.
_A = (
  3.3871328727963666080e0,
  1.3314166789178437745e2,
  1.9715909503065514427e3,
  1.3731693765509461125e4,
  4.5921953931549871457e4,
  6.7265770927008700853e4,
  3.3430575583588128105e4,
  2.5090809287301226727e3,
)
_B = (
  1.0,
  4.2313330701600911252e1,
  6.8718700749205790830e2,
  5.3941960214247511077e3,
  2.1213794301586595867e4,
  3.9307895800092710610e4,
  2.8729085735721942674e4,
  5.2264952788528545610e3,
)
_C = (
  1.42343711074968357734e0,
  4.63033784615654529590e0,
  5.76949722146069140550e0,
  3.64784832476320460504e0,
  1.27045825245236838258e0,
  2.41780725177450611770e-1,
  2.27238449892691845833e-2,
  7.74545014278341407640e-4,
)
_D = (
  1.0,
  2.05319162663775882187e0,
  1.67638483018380384940e0,
  6.89767334985100004550e-1,
  1.48103976427480074590e-1,
  1.51986665636164571966e-2,
  5.47593808499534494600e-4,
  1.05075007164441684324e-9,
)
_E = (
  6.65790464350110377720e0,
  5.46378491116411436990e0,
  1.78482653991729133580e0,
  2.96560571828504891230e-1,
  2.65321895265761230930e-2,
  1.24266094738807843860e-3,
  2.71155556874348757815e-5,
  2.01033439929228813265e-7,
)
_F = (
  1.0,
  5.99832206555887937690e-1,
  1.36929880922735805310e-1,
  1.48753612908506148525e-2,
  7.86869131145613259100e-4,
  1.84631831751005468180e-5,
  1.42151175831644588870e-7,
  2.04426310338993978564e-15,
)


def _poly(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
  out = np.zeros_like(x)
  for c in reversed(coeffs):
    out = out * x + c
  return out


def ndtri(p: np.ndarray | float) -> np.ndarray:
  """Inverse standard-normal CDF Φ⁻¹(p), elementwise (AS 241; ±inf at 0 and 1, nan outside)."""
  p = np.asarray(p, np.float64)
  q = p - 0.5
  with np.errstate(invalid="ignore", divide="ignore"):
    r = 0.180625 - q * q
    central = q * _poly(_A, r) / _poly(_B, r)
    s = np.sqrt(-np.log(np.minimum(p, 1.0 - p)))
    near = s - 1.6
    far = s - 5.0
    tail = np.where(s <= 5.0, _poly(_C, near) / _poly(_D, near), _poly(_E, far) / _poly(_F, far))
    out = np.where(np.abs(q) <= 0.425, central, np.where(q < 0, -tail, tail))
  out = np.where(p == 0.0, -np.inf, np.where(p == 1.0, np.inf, out))
  return np.where((p >= 0.0) & (p <= 1.0), out, np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..S along the last axis, ties given their average rank, [..., S]."""
  order = np.argsort(x, axis=-1, kind="stable")
  xs = np.take_along_axis(x, order, axis=-1)
  s = x.shape[-1]
  idx = np.broadcast_to(np.arange(s), xs.shape)
  start = np.ones(xs.shape, bool)
  start[..., 1:] = xs[..., 1:] != xs[..., :-1]
  end = np.ones(xs.shape, bool)
  end[..., :-1] = start[..., 1:]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
  last = np.flip(np.minimum.accumulate(np.flip(np.where(end, idx, s - 1), -1), axis=-1), -1)
  ranks = np.empty(xs.shape, np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
  return ranks


def rank_normalize(x: np.ndarray) -> np.ndarray:
  """Rank-normalised draws z = Φ⁻¹((r − 3/8)/(S + 1/4)), r ranked over all S = C·T draws, [..., C, T]."""
  x = np.asarray(x, np.float64)
  flat = x.reshape(*x.shape[:-2], -1)
  s = flat.shape[-1]
  z = ndtri((_average_ranks(flat) - 0.375) / (s + 0.25)).reshape(x.shape)
  bad = np.asarray(~np.isfinite(flat).all(-1))
  return np.where(bad[..., None, None], np.nan, z) if bad.any() else z


def split_chains(x: np.ndarray) -> np.ndarray:
  """Each chain cut into its halves: [..., C, T] -> [..., 2C, T//2] (the middle draw of odd T dropped)."""
  x = np.asarray(x)
  half = x.shape[-1] // 2
  return np.concatenate([x[..., :half], x[..., x.shape[-1] - half :]], axis=-2)


def _fast_len(n: int) -> int:
  """The smallest 2^a 3^b 5^c ≥ n (a fast FFT length)."""
  best = 1 << max(n - 1, 0).bit_length()
  p5 = 1
  while p5 < best:
    p35 = p5
    while p35 < best:
      m = p35
      while m < n:
        m *= 2
      best = min(best, m)
      p35 *= 3
    p5 *= 5
  return best


def _autocov(x: np.ndarray) -> np.ndarray:
  """Biased autocovariance (divided by T) at lags 0..T-1 along the last axis, by FFT, [..., T]."""
  n = x.shape[-1]
  centred = x - x.mean(-1, keepdims=True)
  m = _fast_len(2 * n)
  spec = np.fft.rfft(centred, n=m, axis=-1)
  return np.fft.irfft(spec * np.conj(spec), n=m, axis=-1)[..., :n] / n


def _ess_chains(x: np.ndarray) -> np.ndarray:
  """Total ESS of chains x [..., M, N] as Stan/ArviZ `_ess` (Geyer, multi-chain), [...]."""
  x = np.asarray(x, np.float64)
  m, n = x.shape[-2:]
  shape = x.shape[:-2]
  if n < 4 or m < 1:
    return np.full(shape, np.nan)
  finite = np.asarray(np.isfinite(x).all((-2, -1)))
  x = np.where(finite[..., None, None], x, 0.0)
  constant = (x.max((-2, -1)) - x.min((-2, -1))) < np.finfo(np.float64).resolution
  acov = _autocov(x)  # [..., M, N]
  mean_var = acov[..., 0].mean(-1) * n / (n - 1.0)  # W
  var_plus = mean_var * (n - 1.0) / n
  if m > 1:
    var_plus = var_plus + x.mean(-1).var(-1, ddof=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    rho = 1.0 - (mean_var[..., None] - acov.mean(-2)) / var_plus[..., None]  # [..., N]
  rho[..., 0] = 1.0
  kmax = (n - 3) // 2  # the last pair Geyer's loop can reach
  pairs = rho[..., 0 : 2 * kmax + 2 : 2] + rho[..., 1 : 2 * kmax + 2 : 2]  # P_k, k = 0..kmax
  nonpos = pairs[..., 1:] <= 0
  if kmax > 0:
    k_stop = np.where(nonpos.any(-1), nonpos.argmax(-1) + 1, kmax)
  else:
    k_stop = np.zeros(shape, np.int64)
  k_stop = np.where(pairs[..., 0] > 0, k_stop, 0)  # K: the last pair the loop looked at
  monotone = np.minimum.accumulate(pairs, axis=-1)  # initial monotone sequence
  csum = np.concatenate([np.zeros(shape + (1,)), np.cumsum(monotone, -1)], -1)
  head = np.take_along_axis(csum, k_stop[..., None], -1)[..., 0]  # Σ_{k<K} P'_k
  even = np.take_along_axis(rho, 2 * k_stop[..., None], -1)[..., 0]
  last_pair = np.take_along_axis(pairs, k_stop[..., None], -1)[..., 0]
  even = np.where((last_pair >= 0) | (even > 0), even, 0.0)
  total = m * n
  tau = np.maximum(-1.0 + 2.0 * head + even, 1.0 / math.log10(total))
  ess = total / tau
  ess = np.where(np.isfinite(rho).all(-1), ess, np.nan)
  ess = np.where(constant, float(total), ess)
  return np.where(finite, ess, np.nan)


def _rhat_chains(x: np.ndarray) -> np.ndarray:
  """Classic R̂ = √(var⁺/W) of chains x [..., M, N], [...]."""
  m, n = x.shape[-2:]
  if m < 2 or n < 2:
    return np.full(x.shape[:-2], np.nan)
  within = x.var(-1, ddof=1).mean(-1)
  between = n * x.mean(-1).var(-1, ddof=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.sqrt((between / within + n - 1.0) / n)


def _folded(split: np.ndarray) -> np.ndarray:
  flat = split.reshape(*split.shape[:-2], -1)
  return np.abs(split - np.median(flat, -1)[..., None, None])


def rhat(x: np.ndarray) -> np.ndarray:
  """Rank-normalised split-R̂ of x [..., C, T]: max(bulk, folded) R̂, [...] (nan if T < 4)."""
  split = split_chains(np.asarray(x, np.float64))
  if split.shape[-1] < 2:
    return np.full(split.shape[:-2], np.nan)
  return np.maximum(
    _rhat_chains(rank_normalize(split)), _rhat_chains(rank_normalize(_folded(split)))
  )


def ess_bulk(x: np.ndarray) -> np.ndarray:
  """Total bulk ESS of x [..., C, T]: ESS of the rank-normalised split chains, [...]."""
  return _ess_chains(rank_normalize(split_chains(np.asarray(x, np.float64))))


def ess_tail(x: np.ndarray) -> np.ndarray:
  """Total tail ESS of x [..., C, T]: min ESS of I(x ≤ q05) and I(x ≤ q95) on split chains, [...]."""
  x = np.asarray(x, np.float64)
  flat = x.reshape(*x.shape[:-2], -1)
  with np.errstate(invalid="ignore"):
    q = np.quantile(flat, [0.05, 0.95], axis=-1)  # [2, ...]
  out = [_ess_chains(split_chains((x <= qi[..., None, None]).astype(np.float64))) for qi in q]
  finite = np.isfinite(flat).all(-1)
  return np.where(finite, np.minimum(*out), np.nan)


def ess_mean(x: np.ndarray) -> np.ndarray:
  """Total ESS for the mean of x [..., C, T]: ESS of the raw split chains, [...]."""
  return _ess_chains(split_chains(np.asarray(x, np.float64)))


def mcse_mean(x: np.ndarray) -> np.ndarray:
  """Monte-Carlo standard error of the mean over all draws and chains: sd/√ess_mean, [...]."""
  x = np.asarray(x, np.float64)
  flat = x.reshape(*x.shape[:-2], -1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return flat.std(-1, ddof=1) / np.sqrt(ess_mean(x))


def drift_z(x: np.ndarray) -> np.ndarray:
  """Geweke z of the change in mean between the first and last halves of x [..., C, T], [...].

  z = (m_last − m_first)/√(SE_first² + SE_last²), with m_h the mean of half h over its
  chains and draws and SE_h = sd_h/√ESS_h (sd_h pooled over chains, ddof=1; ESS_h the
  `ess_mean` of that half).
  """
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  stats = []
  for h in (x[..., :half], x[..., x.shape[-1] - half :]):
    flat = h.reshape(*h.shape[:-2], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
      stats.append((flat.mean(-1), flat.std(-1, ddof=1) / np.sqrt(ess_mean(h))))
  (m0, se0), (m1, se1) = stats
  with np.errstate(invalid="ignore", divide="ignore"):
    return (m1 - m0) / np.hypot(se0, se1)


def mser_truncation(y: np.ndarray, batch: int = 5, max_fraction: float = 0.5) -> np.ndarray:
  """MSER-`batch` truncation point (in draws) of a trace y [..., T] (e.g. the chain-mean trace), [...].

  The series is cut into k = T // batch batch means Z_1..Z_k (a trailing remainder is
  dropped); for d = 0..⌊max_fraction·k⌋ batches (and k − d ≥ 2),
  MSER(d) = Σ_{j>d} (Z_j − Z̄_d)²/(k − d)², Z̄_d the mean of the kept batches; the
  smallest minimiser d is returned as d·batch draws (0 when k < 2).
  """
  y = np.asarray(y, np.float64)
  k = y.shape[-1] // batch
  if k < 2:
    return np.zeros(y.shape[:-1], np.int64)
  z = y[..., : k * batch].reshape(*y.shape[:-1], k, batch).mean(-1)
  z = z - z.mean(-1, keepdims=True)
  dmax = min(int(max_fraction * k), k - 2)
  s1 = np.cumsum(z[..., ::-1], -1)[..., ::-1][..., : dmax + 1]  # Σ_{j≥d} Z_j
  s2 = np.cumsum(z[..., ::-1] ** 2, -1)[..., ::-1][..., : dmax + 1]
  left = k - np.arange(dmax + 1)
  mser = (s2 - s1**2 / left) / left**2
  mser = np.where(np.isfinite(mser), mser, np.inf)
  return mser.argmin(-1).astype(np.int64) * batch


def auto_burnin(loss_trace: np.ndarray) -> dict[str, np.ndarray]:
  """Burn-in of traces [..., C, T] from MSER-5 of their chain-mean trace.

  Rule: b = MSER-5 truncation of the chain-mean trace, searched over the first half of
  the draws; burn-in = min(2·b, T//2); if b lies beyond the first quarter (b > T/4) the
  trace is flagged `relaxing` (still relaxing: the caller must run longer) and burn-in
  is T//2.

  Returns dict of [...] arrays: `burnin` (draws), `mser` (b, draws), `relaxing` (bool).
  """
  x = np.asarray(loss_trace, np.float64)
  t = x.shape[-1]
  b = mser_truncation(x.mean(-2), batch=5, max_fraction=0.5)
  relaxing = b > t / 4
  burnin = np.where(relaxing, t // 2, np.minimum(2 * b, t // 2)).astype(np.int64)
  return {"burnin": burnin, "mser": b, "relaxing": relaxing}


@dataclasses.dataclass(frozen=True)
class ConvergenceCriteria:
  """Thresholds of `assess` for the kept draws of one entry.

  `min_draws` (kept draws per chain before any look) must be ≥ 1; the measured
  false-alarm rate (docs/results/convergence_false_alarms.md) holds for ≥ 400 draws and
  ESS per chain well above the minima.
  """

  rhat_max: float = 1.01
  ess_bulk_min_per_chain: float = 100.0
  ess_tail_min_per_chain: float = 100.0
  drift_z_max: float = 3.0
  min_draws: int = 400
  min_chains: int = 4

  def __post_init__(self):
    if self.min_draws < 1:
      raise ValueError(f"min_draws must be ≥ 1, got {self.min_draws}")
    if self.min_chains < 1:
      raise ValueError(f"min_chains must be ≥ 1, got {self.min_chains}")
    if not self.rhat_max > 1.0:
      raise ValueError(f"rhat_max must be > 1, got {self.rhat_max}")
    if not self.drift_z_max > 0.0:
      raise ValueError(f"drift_z_max must be > 0, got {self.drift_z_max}")
    if self.ess_bulk_min_per_chain < 0 or self.ess_tail_min_per_chain < 0:
      raise ValueError("ESS minima must be ≥ 0")


_STATS = ("rhat", "ess_bulk", "ess_tail", "drift_z", "mcse")


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
  """The statistics of `assess` for chains x [..., C, T], sharing the split rank normalisation."""
  split = split_chains(x)
  shape = x.shape[:-2]
  if split.shape[-1] < 2 or x.shape[-2] < 1:
    return {k: np.full(shape, np.nan) for k in _STATS}
  z = rank_normalize(split)
  return {
    "rhat": np.maximum(_rhat_chains(z), _rhat_chains(rank_normalize(_folded(split)))),
    "ess_bulk": _ess_chains(z),
    "ess_tail": ess_tail(x),
    "drift_z": drift_z(x),
    "mcse": mcse_mean(x),
  }


def _fmt(v: float, spec: str) -> str:
  return format(v, spec).replace("-", "−")


def assess(
  loss_trace: np.ndarray,
  criteria: ConvergenceCriteria = ConvergenceCriteria(),
  valid: np.ndarray | None = None,
) -> dict:
  """Convergence of the kept draws loss_trace [..., C, T] (burn-in already removed).

  Args:
    loss_trace: kept draws [..., C, T].
    criteria: the thresholds.
    valid: optional [..., C] bool, the chains to include (e.g. not diverged); the
      others are dropped per entry.

  Returns:
    dict of [...] arrays: `rhat`, `ess_bulk`, `ess_tail` (totals over the valid chains),
    `ess_bulk_per_chain`, `ess_tail_per_chain`, `drift_z`, `mcse` (of the mean loss; in
    LLC units multiply by nβ), `num_draws`, `num_chains`, `status` (int codes into
    CONVERGENCE_STATUS); and `reasons`, a list over the flattened entries of why each
    not_converged entry failed ("" for the others). An entry is unchecked with fewer than
    `min_chains` valid chains or fewer than `min_draws` draws; otherwise not_converged if
    R̂ ≥ rhat_max, bulk or tail ESS per chain < its minimum, |drift z| > drift_z_max or
    any of these is non-finite; else converged.
  """
  c = criteria
  x = np.asarray(loss_trace, np.float64)
  if x.ndim < 2:
    raise ValueError(f"loss_trace must be [..., C, T], got shape {x.shape}")
  shape, (num_c, t) = x.shape[:-2], x.shape[-2:]
  if valid is None or np.all(valid):
    stats = _stats(x)
    chains = np.full(shape, num_c, np.int64)
  else:
    valid = np.broadcast_to(np.asarray(valid, bool), x.shape[:-1])
    flat_x, flat_v = x.reshape(-1, num_c, t), valid.reshape(-1, num_c)
    rows = [_stats(xi[vi]) for xi, vi in zip(flat_x, flat_v)]
    stats = {k: np.array([r[k] for r in rows], np.float64).reshape(shape) for k in _STATS}
    chains = flat_v.sum(-1).reshape(shape).astype(np.int64)
  safe = np.maximum(chains, 1)
  out: dict = dict(stats)  # the stats and their int / str fields
  out["ess_bulk_per_chain"] = stats["ess_bulk"] / safe
  out["ess_tail_per_chain"] = stats["ess_tail"] / safe
  out["num_draws"] = np.full(shape, t, np.int64)
  out["num_chains"] = chains

  fails = {
    "rhat": ~(stats["rhat"] < c.rhat_max),
    "ess_bulk": ~(out["ess_bulk_per_chain"] >= c.ess_bulk_min_per_chain),
    "ess_tail": ~(out["ess_tail_per_chain"] >= c.ess_tail_min_per_chain),
    "drift": ~(np.abs(stats["drift_z"]) <= c.drift_z_max),
  }
  bad = np.zeros(shape, bool)
  for f in fails.values():
    bad |= f
  unchecked = (chains < c.min_chains) | (t < c.min_draws)
  status = np.where(unchecked, UNCHECKED, np.where(bad, NOT_CONVERGED, CONVERGED)).astype(np.int8)
  out["status"] = status

  reasons = []
  flat = {k: np.ravel(v) for k, v in {**out, **{f"fail_{k}": v for k, v in fails.items()}}.items()}
  for i, s in enumerate(np.ravel(status)):
    if s != NOT_CONVERGED:
      reasons.append("")
      continue
    parts = []
    if flat["fail_rhat"][i]:
      parts.append(f"R̂ {_fmt(flat['rhat'][i], '.3f')} ≥ {c.rhat_max:g}")
    if flat["fail_ess_bulk"][i]:
      parts.append(
        f"bulk ESS/chain {_fmt(flat['ess_bulk_per_chain'][i], '.0f')} "
        f"< {c.ess_bulk_min_per_chain:g}"
      )
    if flat["fail_ess_tail"][i]:
      parts.append(
        f"tail ESS/chain {_fmt(flat['ess_tail_per_chain'][i], '.0f')} "
        f"< {c.ess_tail_min_per_chain:g}"
      )
    if flat["fail_drift"][i]:
      parts.append(f"drift z {_fmt(flat['drift_z'][i], '.1f')}")
    reasons.append("; ".join(parts))
  out["reasons"] = reasons
  return out
