"""LLC results: a frozen dataclass, chain-health flags, and atomic storage."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import numpy as np

from absl import logging

from devinterp_jax import atomic, paths
from devinterp_jax.sampling import convergence, diagnostics


@dataclasses.dataclass(frozen=True)
class LLCResult:
  """LLC estimates with chain diagnostics. Leading axes `[...]` are `[]` for one
  checkpoint, else `[checkpoint]` (and `[restriction, checkpoint]` where
  restrictions apply).

  Attributes:
    llc_mean: mean over non-diverged chains, [...].
    llc_std: standard deviation over non-diverged chains (ddof=1), [...].
    llc_per_chain: nβ (mean recorded loss − init_loss) per chain, [..., C].
    loss_trace: recorded minibatch losses after burn-in/thinning, [..., C, draws].
    init_loss: L(w*) per chain: mean of L_B(w*) over a subset of the chain's
      own batches, [..., C].
    diverged: chains excluded from mean/std (non-finite, or blown up), [..., C].
    status: health code per chain (`diagnostics.STATUS_NAMES`), [..., C].
    escaped, not_converged, negative: health flags, [..., C] (see `diagnostics`).
    mala_acceptance: mean acceptance of the sampler's step-size check, [..., C]
      (NaN when not measured): MALA for SGLD samplers, one leapfrog step's
      Metropolis acceptance for SGHMC / SGNHT (`samplers.step_check`).
    mala_se: Monte-Carlo standard error of the chains' mean acceptance (ESS of
      the pooled acceptance samples), [...], or None.
    distance, grad_norm, noise_norm: ‖w_t − w*‖, ‖∇L_B(w_t)‖ and ‖η_t‖ at each
      recorded draw, [..., C, draws], or None when not recorded.
    burnin: draws of `loss_trace` left out of the estimate, [...]: the start of
      the window the entries of one curve share (the latest burn-in among them).
    convergence: per entry, on its own kept draws (`diagnostics.assess`):
      `status` (codes into `convergence.CONVERGENCE_STATUS`), `rhat`,
      `ess_bulk`, `ess_tail`, `drift_z`, `mcse` (of λ̂), `burnin` (its own),
      `num_draws` (kept), `num_recorded`, `llc` (on its own window), [...] each.
    settings: the sampler settings that produced these numbers.
  """

  llc_mean: np.ndarray
  llc_std: np.ndarray
  llc_per_chain: np.ndarray
  loss_trace: np.ndarray
  init_loss: np.ndarray
  diverged: np.ndarray
  status: np.ndarray
  escaped: np.ndarray
  not_converged: np.ndarray
  negative: np.ndarray
  mala_acceptance: np.ndarray
  distance: np.ndarray | None = None
  grad_norm: np.ndarray | None = None
  noise_norm: np.ndarray | None = None
  burnin: np.ndarray | None = None
  convergence: dict[str, np.ndarray] | None = None
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  mala_se: np.ndarray | None = None

  @property
  def num_valid_chains(self) -> np.ndarray:
    return np.sum(~self.diverged, axis=-1)

  @property
  def llc_sem(self) -> np.ndarray:
    """Standard error of `llc_mean` over chains."""
    return self.llc_std / np.sqrt(np.maximum(self.num_valid_chains, 1))

  @property
  def llc_trace(self) -> np.ndarray:
    """Online LLC per chain, λ̂_t = nβ (mean_{s≤t} L_s − L(w*)), [..., C, draws]."""
    return diagnostics.online_llc(self.loss_trace, self.init_loss, self.settings["nbeta"])

  @property
  def llc_trace_mean(self) -> np.ndarray:
    """Running mean over non-diverged chains of the online LLC, [..., draws]."""
    ok = ~self.diverged[..., None]
    trace = np.where(ok, self.llc_trace, 0.0)
    return trace.sum(-2) / np.maximum(ok.sum(-2), 1)

  def health_counts(self) -> dict[str, int]:
    """Number of chains per health status, over all checkpoints."""
    return diagnostics.status_counts(self.status)

  def select(self, index) -> "LLCResult":
    """The result for a subset of the leading (checkpoint) axis, e.g. a slice."""
    arrays: dict[str, Any] = {
      f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
      for f in dataclasses.fields(self)
      if f.name not in ("settings", "convergence")
    }
    conv = (
      None
      if self.convergence is None
      else {k: np.asarray(v)[index] for k, v in self.convergence.items()}
    )
    return LLCResult(settings=self.settings, convergence=conv, **arrays)

  def convergence_counts(self) -> dict[str, int]:
    """Number of entries per convergence status."""
    if self.convergence is None:
      return {}
    return {
      name: int(np.sum(self.convergence["status"] == code))
      for code, name in enumerate(convergence.CONVERGENCE_STATUS)
    }

  @property
  def kept_trace(self) -> np.ndarray:
    """`loss_trace` with the burn-in draws of each entry set to NaN, [..., C, draws]."""
    if self.burnin is None:
      return self.loss_trace
    draws = np.arange(self.loss_trace.shape[-1])
    cut = np.asarray(self.burnin)[..., None, None]
    return np.where(draws < cut, np.nan, self.loss_trace)

  def save(self, path: str) -> None:
    """Atomically writes an .npz (load with `LLCResult.load`)."""
    arrays = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ("settings", "convergence") and getattr(self, f.name) is not None
    }
    arrays.update({f"convergence_{k}": np.asarray(v) for k, v in (self.convergence or {}).items()})
    atomic.save_npz(path, settings=np.array(json.dumps(self.settings)), **arrays)

  @classmethod
  def load(cls, path: str) -> "LLCResult":
    z = paths.load_npz(path)
    kw = {k: v for k, v in z.items() if k != "settings" and not k.startswith("convergence_")}
    conv = {k[len("convergence_") :]: v for k, v in z.items() if k.startswith("convergence_")}
    return cls(settings=json.loads(str(z["settings"])), convergence=conv or None, **kw)


def acceptance_se(samples: np.ndarray) -> np.ndarray:
  """MCSE of the mean of acceptance samples [..., C, k] over chains and samples, [...].

  Per entry, samples that are NaN in any chain (an unmeasured first step) are
  dropped; an entry with a diverged (all-NaN) chain gets NaN.
  """
  x = np.asarray(samples, np.float64)
  flat = x.reshape((-1,) + x.shape[-2:])
  out = np.full(len(flat), np.nan)
  for i, entry in enumerate(flat):
    kept = entry[:, ~np.isnan(entry).any(axis=0)]
    if kept.shape[-1] >= 4:
      with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out[i] = float(convergence.mcse_mean(kept))
  return out.reshape(x.shape[:-2])


def _labelled(flags: np.ndarray, labels: list[str] | None) -> list[str]:
  flat = flags.reshape(-1, flags.shape[-1])
  out = []
  for i, row in enumerate(flat):
    if row.any():
      name = labels[i] if labels is not None and i < len(labels) else f"entry {i}"
      out.append(f"{name}: chains {np.flatnonzero(row).tolist()}")
  return out


def summarize(
  loss_trace: np.ndarray,
  init_losses: np.ndarray,
  nbeta: float | np.ndarray,
  settings: dict,
  labels: list[str] | None = None,
  *,
  num_params: int | np.ndarray,
  mala: np.ndarray | None = None,
  distance: np.ndarray | None = None,
  grad_norm: np.ndarray | None = None,
  noise_norm: np.ndarray | None = None,
  criteria: diagnostics.HealthCriteria = diagnostics.HealthCriteria(),
  burnin: np.ndarray | None = None,
  convergence_stats: dict[str, np.ndarray] | None = None,
) -> LLCResult:
  """Builds an LLCResult from traces [..., C, draws] and init losses [..., C, m].

  `burnin` [...] draws of each entry are left out of its estimate (default 0);
  `convergence_stats` are the entries' convergence statistics (`diagnostics.assess`),
  whose not-converged entries mark their chains. Diverged chains are left out of the
  mean and std and named in a warning (`labels[i]` names entry i of the flattened
  leading axes, e.g. 'step 1200'); escaped, non-converged and negative chains are
  kept and logged. `mala` holds acceptance probabilities [..., C, k].
  """
  loss_trace = np.asarray(loss_trace, np.float64)
  init_losses = np.asarray(init_losses, np.float64)
  lead = loss_trace.shape[:-2]
  b = (
    np.zeros(lead, np.int64)
    if burnin is None
    else np.broadcast_to(np.asarray(burnin, np.int64), lead)
  )
  stuck = None
  if convergence_stats is not None:
    stuck = np.asarray(convergence_stats["status"]) == convergence.NOT_CONVERGED
  nb = np.broadcast_to(np.asarray(nbeta, np.float64), lead)
  d = np.broadcast_to(np.asarray(num_params), lead)
  flat_loss = loss_trace.reshape((-1,) + loss_trace.shape[-2:])
  flat_init = init_losses.reshape((-1,) + init_losses.shape[-2:])
  flat_dist = None if distance is None else np.asarray(distance).reshape(flat_loss.shape)
  keys = ("status", "diverged", "escaped", "not_converged", "negative", "llc_per_chain")
  rows = {k: [] for k in keys}
  for i in range(len(flat_loss)):
    bi = int(np.ravel(b)[i])
    h = diagnostics.chain_health(
      flat_loss[i, :, bi:],
      flat_init[i],
      float(np.ravel(nb)[i]),
      int(np.ravel(d)[i]),
      distance=None if flat_dist is None else flat_dist[i],
      criteria=criteria,
      not_converged=None if stuck is None else bool(np.ravel(stuck)[i]),
    )
    for k in keys:
      rows[k].append(h[k])
  health = {k: np.stack(v).reshape(lead + (loss_trace.shape[-2],)) for k, v in rows.items()}
  init_loss = init_losses.mean(-1)
  llc_per_chain = health["llc_per_chain"]
  diverged = health["diverged"]
  ok = ~diverged
  n_ok = ok.sum(-1)
  safe = np.where(ok, llc_per_chain, 0.0)
  mean = np.where(n_ok > 0, safe.sum(-1) / np.maximum(n_ok, 1), np.nan)
  var = np.where(ok, (safe - mean[..., None]) ** 2, 0.0).sum(-1)
  std = np.where(n_ok > 1, np.sqrt(var / np.maximum(n_ok - 1, 1)), np.nan)
  if diverged.any():
    warnings.warn(
      "diverged SGLD chains (non-finite or blown-up loss) excluded from the LLC "
      "mean: " + "; ".join(_labelled(diverged, labels)),
      RuntimeWarning,
      stacklevel=3,
    )
  for flag in ("escaped", "negative"):
    if health[flag].any():
      logging.warning(
        "%d %s SGLD chains (kept in the mean): %s",
        int(health[flag].sum()),
        flag.replace("_", "-"),
        "; ".join(_labelled(health[flag], labels)),
      )
  if stuck is not None and stuck.any():
    assert convergence_stats is not None  # stuck comes from it
    reasons = convergence_stats.get("reason")
    named = [
      f"{labels[i] if labels and i < len(labels) else f'entry {i}'}"
      + (f" ({np.ravel(reasons)[i]})" if reasons is not None else "")
      for i in np.flatnonzero(np.ravel(stuck))
    ]
    logging.warning(
      "%d checkpoints not converged (kept, flagged): %s", len(named), "; ".join(named)
    )
  if mala is not None and np.size(mala):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of diverged chains
      mala_acceptance = np.nanmean(np.asarray(mala, np.float64), axis=-1)
    mala_se = acceptance_se(mala)
  else:
    mala_acceptance = np.full(llc_per_chain.shape, np.nan)
    mala_se = None
  as32 = lambda x: None if x is None else np.asarray(x, np.float32)
  scalar_nbeta = np.ndim(nbeta) == 0 or np.all(np.asarray(nbeta) == np.ravel(nbeta)[0])
  return LLCResult(
    llc_mean=mean,
    llc_std=std,
    llc_per_chain=llc_per_chain,
    loss_trace=loss_trace.astype(np.float32),
    init_loss=init_loss,
    diverged=diverged,
    status=health["status"],
    escaped=health["escaped"],
    not_converged=health["not_converged"],
    negative=health["negative"],
    mala_acceptance=mala_acceptance,
    distance=as32(distance),
    grad_norm=as32(grad_norm),
    noise_norm=as32(noise_norm),
    burnin=None if burnin is None else np.asarray(b),
    convergence=convergence_stats,
    mala_se=mala_se,
    settings={
      **settings,
      "nbeta": float(np.ravel(nbeta)[0]) if scalar_nbeta else np.asarray(nbeta).tolist(),
      "num_params": np.asarray(num_params).reshape(-1).tolist()
      if np.ndim(num_params)
      else int(num_params),
      "health_criteria": dataclasses.asdict(criteria),
    },
  )
