"""Chain health and convergence (App. A.5.4).

Every checkpoint (every pair of a sweep) gets a burn-in and a convergence status
from its kept draws (`assess`):

  burn-in        an integer `num_burnin_steps` is applied before recording; with
                 "auto" the burn-in is read from the chain-mean trace
                 (`convergence.auto_burnin`: b = MSER-5 over the first half,
                 burn-in = min(2b, T/2); b beyond the first quarter means the trace
                 is still relaxing: not converged, whatever the statistics say).
  converged      on the kept draws of ≥ `min_chains` valid chains, with ≥
                 `min_draws` draws each: rank-normalised split-R̂ < `rhat_max`,
                 bulk and tail ESS per chain ≥ `ess_*_min_per_chain`, and the
                 drift test between the halves |z| ≤ `drift_z_max`
                 (`convergence.assess`). The MCSE of λ̂ is reported, not tested.
  not_converged  any of those fails (or the trace is still relaxing).
  unchecked      fewer than `min_chains` valid chains or `min_draws` kept draws:
                 never reported as converged.

Every chain gets one status, the worst that applies:

  diverged       a recorded loss, L(w*) or ‖w − w*‖ is non-finite, or the loss
                 ran far above its start: nβ·(mean loss over the last quarter −
                 L(w*)) > max(`divergence_llc_factor` · d, `divergence_llc_floor`),
                 with d the number of sampled coordinates (a true LLC is at most
                 d/2; the floor keeps ordinary fluctuations of very small models,
                 d ≲ 100, from being called divergence). Excluded from the mean.
  escaped        the loss fell well below L(w*) and stayed there: over the last
                 quarter of the kept draws, mean(L_t) − L(w*) < 0 by more than
                 `escape_z` standard errors and by more than `escape_llc`/nβ.
                 w* is then not a local minimum at this temperature.
  not_converged  its checkpoint is not converged (above).
  negative       the chain's estimate λ̂ = nβ (mean loss − L(w*)) is below 0.
  ok             none of the above.

Standard errors of quarter means use the chain's integrated autocorrelation
time τ (estimated on the detrended second halves of the checkpoint's chains):
se = std·√(τ/n). The error of L(w*) is that of the mean of the chain's
init-loss batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from devinterp_jax.sampling import convergence as convergence_lib

STATUS_NAMES = ("ok", "negative", "not_converged", "escaped", "diverged")
OK, NEGATIVE, NOT_CONVERGED, ESCAPED, DIVERGED = range(len(STATUS_NAMES))


@dataclasses.dataclass(frozen=True)
class HealthCriteria(convergence_lib.ConvergenceCriteria):
  """Thresholds of the chain-health checks and (inherited) of the convergence checks
  (module docstring; `convergence.ConvergenceCriteria`: rhat_max 1.01, bulk and tail
  ESS ≥ 100 per chain, |drift z| ≤ 3, min_draws 400, min_chains 4).

  The convergence thresholds were fixed before any job was run against them; their
  false-alarm rate on stationary traces is measured by
  benchmarks/convergence_false_alarms.py (docs/results/convergence_false_alarms.md).
  """

  divergence_llc_factor: float = 1.0
  divergence_llc_floor: float = 100.0
  escape_z: float = 4.0
  escape_llc: float = 0.5


def autocorrelation_time(
  x: np.ndarray, window_factor: float = 5.0, pool_axis: int | None = None
) -> np.ndarray:
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
  seg = x[..., lo : max(hi, lo + 1)]
  n = seg.shape[-1]
  se = seg.std(-1, ddof=1) * np.sqrt(tau / n) if n > 1 else np.zeros(seg.shape[:-1])
  return seg.mean(-1), se


def chain_health(
  loss_trace: np.ndarray,
  init_losses: np.ndarray,
  nbeta: float | np.ndarray,
  num_params: int | np.ndarray,
  distance: np.ndarray | None = None,
  criteria: HealthCriteria = HealthCriteria(),
  not_converged: bool | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Health flags and status of every chain, on its kept draws.

  Args:
    loss_trace: kept losses [..., C, T].
    init_losses: the chain's L_B(w*) samples [..., C, m].
    nbeta: nβ (or [...] per entry).
    num_params: number of sampled coordinates d (or [...] per entry).
    distance: optional ‖w_t − w*‖ [..., C, T] (all recorded draws).
    not_converged: optional [...] bool, entries whose convergence check failed.

  Returns:
    dict of boolean arrays [..., C] (`diverged`, `escaped`, `not_converged`,
    `negative`), `status` (int codes into STATUS_NAMES) and the statistics used
    (`llc_per_chain`, `escape_z`, `autocorrelation_time`).
  """
  c = criteria
  loss = np.asarray(loss_trace, np.float64)
  init = np.asarray(init_losses, np.float64)
  nbeta = np.asarray(nbeta, np.float64)[..., None]
  init_loss = init.mean(-1)
  m = init.shape[-1]
  init_se = init.std(-1, ddof=1) / np.sqrt(m) if m > 1 else np.zeros_like(init_loss)
  with np.errstate(invalid="ignore", over="ignore"):
    llc = nbeta * (loss.mean(-1) - init_loss)
    finite = np.isfinite(loss).all(-1) & np.isfinite(init_loss)
    if distance is not None:
      finite &= np.isfinite(np.asarray(distance)).all(-1)
    half = loss[..., loss.shape[-1] // 2 :]
    half = np.where(np.isfinite(half), half, 0.0)
    t = np.arange(half.shape[-1]) - (half.shape[-1] - 1) / 2
    slope = (half * t).sum(-1, keepdims=True) / max((t * t).sum(), 1e-12)
    # A trend is drift, not autocorrelation; the chains of a checkpoint share τ.
    tau = autocorrelation_time(half - slope * t, pool_axis=-2)
    m4, se4 = _quarter_stats(loss, 3, tau)
    threshold = np.maximum(
      c.divergence_llc_factor * np.asarray(num_params, np.float64), c.divergence_llc_floor
    )[..., None]  # per entry, over its chains
    blown = nbeta * (m4 - init_loss) > threshold
    diverged = ~finite | blown
    below = m4 - init_loss
    escape_z = below / np.maximum(np.hypot(se4, init_se), 1e-30)
    escaped = ~diverged & (escape_z < -c.escape_z) & (nbeta * below < -c.escape_llc)
    stuck = (
      np.zeros(llc.shape, bool)
      if not_converged is None
      else np.broadcast_to(np.asarray(not_converged, bool)[..., None], llc.shape)
    )
    not_conv = ~diverged & stuck
    negative = ~diverged & (llc < 0)

  status = np.full(llc.shape, OK, np.int8)
  for flag, code in (
    (negative, NEGATIVE),
    (not_conv, NOT_CONVERGED),
    (escaped, ESCAPED),
    (diverged, DIVERGED),
  ):
    status = np.where(flag, np.int8(code), status)
  return {
    "status": status,
    "diverged": diverged,
    "escaped": escaped,
    "not_converged": not_conv,
    "negative": negative,
    "llc_per_chain": llc,
    "escape_z": np.where(finite, escape_z, np.nan),
    "autocorrelation_time": tau,
  }


def assess(
  loss_draws: np.ndarray,
  init_losses: np.ndarray,
  nbeta: float,
  num_params: int,
  burnin: int | str = "auto",
  criteria: HealthCriteria = HealthCriteria(),
) -> dict:
  """Burn-in, divergence and convergence of one checkpoint's chains.

  Args:
    loss_draws: every recorded draw [C, T] (after a fixed `num_burnin_steps`).
    init_losses: L_B(w*) samples [C, m].
    burnin: "auto" (read from the trace) or an int (already applied: 0 draws).

  Returns a dict: `burnin` (draws dropped), `mser`, `relaxing`, `valid` [C]
  (not diverged on the kept draws), `status` (CONVERGENCE_STATUS code), `reason`,
  the statistics `rhat`, `ess_bulk`, `ess_tail` (totals), `*_per_chain`,
  `drift_z`, `mcse` (of λ̂, in LLC units), `num_draws` (kept), `num_chains`
  (valid), and `llc` (mean over valid chains of the kept draws).
  """
  loss = np.asarray(loss_draws, np.float64)
  t = loss.shape[-1]
  finite = np.isfinite(loss).all(-1)
  if burnin == "auto" and finite.any():
    ab = convergence_lib.auto_burnin(loss[finite][None])
    b, mser, relaxing = int(ab["burnin"][0]), int(ab["mser"][0]), bool(ab["relaxing"][0])
  else:
    b, mser, relaxing = 0, 0, False
  kept = loss[:, b:]
  health = chain_health(kept, init_losses, nbeta, num_params, criteria=criteria)
  valid = ~health["diverged"]
  out: dict = {"burnin": b, "mser": mser, "relaxing": relaxing, "valid": valid, "num_recorded": t}
  conv = convergence_lib.assess(kept[None], criteria, valid[None])
  for k in (
    "rhat",
    "ess_bulk",
    "ess_tail",
    "ess_bulk_per_chain",
    "ess_tail_per_chain",
    "drift_z",
    "num_draws",
    "num_chains",
  ):
    out[k] = conv[k][0].item()
  out["mcse"] = float(nbeta * conv["mcse"][0])
  status, reason = int(conv["status"][0]), conv["reasons"][0]
  if relaxing and valid.any():
    status = convergence_lib.NOT_CONVERGED
    reason = "; ".join(
      r
      for r in (
        f"still relaxing (MSER-5 point at draw {mser} of {t}, beyond the first quarter)",
        reason,
      )
      if r
    )
  elif status == convergence_lib.UNCHECKED:
    reason = (
      f"{out['num_chains']} valid chains (< {criteria.min_chains})"
      if out["num_chains"] < criteria.min_chains
      else f"{out['num_draws']} kept draws (< {criteria.min_draws})"
    )
  out["status"], out["reason"] = status, reason
  llc = health["llc_per_chain"]
  out["llc"] = float(llc[valid].mean()) if valid.any() else float("nan")
  return out


def online_llc(loss_trace: np.ndarray, init_loss: np.ndarray, nbeta: float) -> np.ndarray:
  """The running estimate λ̂_t = nβ (mean_{s≤t} L_s − L(w*)) per chain, [..., C, T]."""
  loss = np.asarray(loss_trace, np.float64)
  running = np.cumsum(loss, -1) / np.arange(1, loss.shape[-1] + 1)
  return nbeta * (running - np.asarray(init_loss, np.float64)[..., None])


def status_counts(status: np.ndarray) -> dict[str, int]:
  return {name: int(np.sum(status == code)) for code, name in enumerate(STATUS_NAMES)}
