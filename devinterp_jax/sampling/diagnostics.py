"""Chain health: divergence, escape, non-convergence and negative estimates (App. A.5.4).

Every chain gets one status, the worst that applies:

  diverged       a recorded loss, L(w*) or ‖w − w*‖ is non-finite, or the loss
                 ran far above its start: nβ·(mean loss over the last quarter −
                 L(w*)) > max(`divergence_llc_factor` · d, `divergence_llc_floor`),
                 with d the number of sampled coordinates (a true LLC is at most
                 d/2; the floor keeps ordinary fluctuations of very small models,
                 d ≲ 100, from being called divergence). Excluded from the mean.
  escaped        the loss fell well below L(w*) and stayed there: over the last
                 quarter of the chain, mean(L_t) − L(w*) < 0 by more than
                 `escape_z` standard errors and by more than `escape_llc`/nβ.
                 w* is then not a local minimum at this temperature.
  not_converged  the trace still drifts: the mean loss of the last quarter
                 differs from that of the third quarter by more than
                 `drift_rel_tol` of the chain's LLC scale
                 (max(|λ̂_chain|, `drift_llc_floor`))/nβ, and that change is
                 significant: for the chain alone (> `drift_z` standard
                 errors), or shared by the checkpoint's chains (a t-test of the
                 chains' changes across ≥ 3 chains at two-sided p < 0.001).
  negative       the chain's estimate λ̂ = nβ (mean loss − L(w*)) is below 0.
  ok             none of the above.

Standard errors of quarter means use the chain's integrated autocorrelation
time τ (estimated on the detrended second halves of the checkpoint's chains):
se = std·√(τ/n). Chains much shorter than ~50 τ give noisy quarter means and
are more likely to be flagged not converged. The error of L(w*) is
that of the mean of the chain's init-loss batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STATUS_NAMES = ("ok", "negative", "not_converged", "escaped", "diverged")
OK, NEGATIVE, NOT_CONVERGED, ESCAPED, DIVERGED = range(len(STATUS_NAMES))


@dataclasses.dataclass(frozen=True)
class HealthCriteria:
  """Thresholds of the chain-health checks (see the module docstring)."""

  divergence_llc_factor: float = 1.0
  divergence_llc_floor: float = 100.0
  escape_z: float = 4.0
  escape_llc: float = 0.5
  drift_z: float = 4.0
  drift_rel_tol: float = 0.1
  drift_llc_floor: float = 0.1


# Two-sided p = 0.001 critical values of Student's t by degrees of freedom.
_T_001 = {1: 636.6, 2: 31.60, 3: 12.92, 4: 8.610, 5: 6.869, 6: 5.959, 7: 5.408, 8: 5.041,
          9: 4.781, 10: 4.587, 12: 4.318, 15: 4.073, 20: 3.850, 30: 3.646, 60: 3.460,
          120: 3.373, 10**9: 3.291}


def t_critical_001(dof: np.ndarray) -> np.ndarray:
  """|t| exceeded with probability 0.001 (two-sided), interpolated in 1/dof."""
  keys = np.array(sorted(_T_001))
  vals = np.array([_T_001[k] for k in keys])
  inv = 1.0 / np.maximum(np.asarray(dof, np.float64), 1)
  return np.interp(inv, 1.0 / keys[::-1], vals[::-1])


def autocorrelation_time(x: np.ndarray, window_factor: float = 5.0,
                         pool_axis: int | None = None) -> np.ndarray:
  """Integrated autocorrelation time τ of x along the last axis, [...].

  τ = 1 + 2 Σ_{k≤M} ρ_k with Sokal's adaptive window (the smallest M ≥ c·τ(M));
  the effective sample size of n draws is n/τ. With `pool_axis`, the
  autocovariances are averaged over that axis first (e.g. the chains of one
  checkpoint, which share their dynamics) and τ is broadcast back.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  if n < 4:
    return np.ones(x.shape[:-1])
  centred = x - x.mean(-1, keepdims=True)
  spec = np.fft.rfft(centred, n=2 * n, axis=-1)
  acf = np.fft.irfft(spec * np.conj(spec), axis=-1)[..., :n]
  if pool_axis is not None:
    acf = np.broadcast_to(acf.mean(pool_axis, keepdims=True), acf.shape)
  var = acf[..., :1]
  rho = np.where(var > 0, acf / np.where(var > 0, var, 1.0), 0.0)
  taus = 1.0 + 2.0 * np.cumsum(rho[..., 1:], axis=-1)  # τ(M) for M = 1..n-1
  lags = np.arange(1, n)
  ok = lags >= window_factor * taus
  idx = np.where(ok.any(-1), ok.argmax(-1), n - 2)
  tau = np.take_along_axis(taus, idx[..., None], axis=-1)[..., 0]
  return np.clip(tau, 1.0, n)


def _quarter_stats(x: np.ndarray, q: int, tau: np.ndarray):
  """Mean of x[..., q-th quarter] and its standard error given the chain's τ."""
  t = x.shape[-1]
  lo, hi = (q * t) // 4, ((q + 1) * t) // 4
  seg = x[..., lo:max(hi, lo + 1)]
  n = seg.shape[-1]
  se = seg.std(-1, ddof=1) * np.sqrt(tau / n) if n > 1 else np.zeros(seg.shape[:-1])
  return seg.mean(-1), se


def chain_health(loss_trace: np.ndarray, init_losses: np.ndarray, nbeta: float,
                 num_params: int, distance: np.ndarray | None = None,
                 criteria: HealthCriteria = HealthCriteria()) -> dict[str, np.ndarray]:
  """Health flags and status of every chain.

  Args:
    loss_trace: recorded losses [..., C, T].
    init_losses: the chain's L_B(w*) samples [..., C, m].
    nbeta: nβ.
    num_params: number of sampled coordinates d.
    distance: optional ‖w_t − w*‖ [..., C, T].

  Returns:
    dict of boolean arrays [..., C] (`diverged`, `escaped`, `not_converged`,
    `negative`), `status` (int codes into STATUS_NAMES) and the statistics used
    (`llc_per_chain`, `drift_z`, `escape_z`, `autocorrelation_time`).
  """
  c = criteria
  loss = np.asarray(loss_trace, np.float64)
  init = np.asarray(init_losses, np.float64)
  init_loss = init.mean(-1)
  m = init.shape[-1]
  init_se = init.std(-1, ddof=1) / np.sqrt(m) if m > 1 else np.zeros_like(init_loss)
  with np.errstate(invalid="ignore", over="ignore"):
    llc = nbeta * (loss.mean(-1) - init_loss)
    finite = np.isfinite(loss).all(-1) & np.isfinite(init_loss)
    if distance is not None:
      finite &= np.isfinite(np.asarray(distance)).all(-1)
    half = loss[..., loss.shape[-1] // 2:]
    half = np.where(np.isfinite(half), half, 0.0)
    t = np.arange(half.shape[-1]) - (half.shape[-1] - 1) / 2
    slope = (half * t).sum(-1, keepdims=True) / max((t * t).sum(), 1e-12)
    # A trend is drift, not autocorrelation; the chains of a checkpoint share τ.
    tau = autocorrelation_time(half - slope * t, pool_axis=-2)
    m3, se3 = _quarter_stats(loss, 2, tau)
    m4, se4 = _quarter_stats(loss, 3, tau)
    threshold = np.maximum(c.divergence_llc_factor * np.asarray(num_params),
                           c.divergence_llc_floor)
    blown = nbeta * (m4 - init_loss) > threshold
    diverged = ~finite | blown

    below = m4 - init_loss
    escape_z = below / np.maximum(np.hypot(se4, init_se), 1e-30)
    escaped = ~diverged & (escape_z < -c.escape_z) & (nbeta * below < -c.escape_llc)

    drift = m4 - m3
    drift_z = drift / np.maximum(np.hypot(se3, se4), 1e-30)
    scale = np.maximum(np.abs(llc), c.drift_llc_floor)
    big = nbeta * np.abs(drift) > c.drift_rel_tol * scale
    not_converged = ~diverged & (np.abs(drift_z) > c.drift_z) & big
    # A drift shared by the chains of a checkpoint: a t-test across independent
    # chains needs no autocorrelation estimate.
    valid = ~diverged
    n = valid.sum(-1)
    d = np.where(valid, nbeta * drift, 0.0)
    d_mean = d.sum(-1) / np.maximum(n, 1)
    d_sd = np.sqrt(np.where(valid, (d - d_mean[..., None]) ** 2, 0.0).sum(-1)
                   / np.maximum(n - 1, 1))
    common_t = d_mean / np.maximum(d_sd / np.sqrt(np.maximum(n, 1)), 1e-30)
    common = (n >= 3) & (np.abs(common_t) > t_critical_001(n - 1))
    not_converged |= (valid & common[..., None] & big
                      & (np.sign(drift) == np.sign(d_mean)[..., None]))
    negative = ~diverged & (llc < 0)

  status = np.full(llc.shape, OK, np.int8)
  for flag, code in ((negative, NEGATIVE), (not_converged, NOT_CONVERGED),
                     (escaped, ESCAPED), (diverged, DIVERGED)):
    status = np.where(flag, np.int8(code), status)
  return {"status": status, "diverged": diverged, "escaped": escaped,
          "not_converged": not_converged, "negative": negative,
          "llc_per_chain": llc, "drift_z": np.where(finite, drift_z, np.nan),
          "escape_z": np.where(finite, escape_z, np.nan), "autocorrelation_time": tau,
          "common_drift_t": common_t}


def online_llc(loss_trace: np.ndarray, init_loss: np.ndarray, nbeta: float) -> np.ndarray:
  """The running estimate λ̂_t = nβ (mean_{s≤t} L_s − L(w*)) per chain, [..., C, T]."""
  loss = np.asarray(loss_trace, np.float64)
  running = np.cumsum(loss, -1) / np.arange(1, loss.shape[-1] + 1)
  return nbeta * (running - np.asarray(init_loss, np.float64)[..., None])


def status_counts(status: np.ndarray) -> dict[str, int]:
  return {name: int(np.sum(status == code)) for code, name in enumerate(STATUS_NAMES)}
