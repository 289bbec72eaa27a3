"""LLC results: a frozen dataclass, chain-health flags, and atomic storage."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import numpy as np

from devinterp_jax import atomic


@dataclasses.dataclass(frozen=True)
class LLCResult:
  """LLC estimates. Leading axes `[...]` are `[]` for one checkpoint, else
  `[checkpoint]` (and `[restriction, checkpoint]` where restrictions apply).

  Attributes:
    llc_mean: mean over non-diverged chains, [...].
    llc_std: standard deviation over non-diverged chains (ddof=1), [...].
    llc_per_chain: nβ (mean recorded loss − init_loss) per chain, [..., C].
    loss_trace: recorded minibatch losses after burn-in/thinning, [..., C, draws].
    init_loss: L(w*) per chain: mean of L_B(w*) over a subset of the chain's
      own batches, [..., C].
    diverged: chains with a non-finite loss, excluded from mean/std, [..., C].
    settings: the sampler settings that produced these numbers.
  """

  llc_mean: np.ndarray
  llc_std: np.ndarray
  llc_per_chain: np.ndarray
  loss_trace: np.ndarray
  init_loss: np.ndarray
  diverged: np.ndarray
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_valid_chains(self) -> np.ndarray:
    return np.sum(~self.diverged, axis=-1)

  @property
  def llc_sem(self) -> np.ndarray:
    """Standard error of `llc_mean` over chains."""
    return self.llc_std / np.sqrt(np.maximum(self.num_valid_chains, 1))

  def save(self, path: str) -> None:
    """Atomically writes an .npz (load with `LLCResult.load`)."""
    arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "settings"}
    atomic.save_npz(path, settings=np.array(json.dumps(self.settings)), **arrays)

  @classmethod
  def load(cls, path: str) -> "LLCResult":
    with np.load(path) as z:
      kw = {k: z[k] for k in z.files if k != "settings"}
      return cls(settings=json.loads(str(z["settings"])), **kw)


def summarize(loss_trace: np.ndarray, init_losses: np.ndarray, nbeta: float,
              settings: dict, labels: list[str] | None = None) -> LLCResult:
  """Builds an LLCResult from traces [..., C, draws] and init losses [..., C, m].

  Chains with any non-finite recorded loss are flagged `diverged`, left out of
  the mean and std, and named in a warning (`labels[i]` names entry i of the
  flattened leading axes, e.g. 'step 1200').
  """
  loss_trace = np.asarray(loss_trace, np.float64)
  init_loss = np.asarray(init_losses, np.float64).mean(-1)
  llc_per_chain = nbeta * (loss_trace.mean(-1) - init_loss)
  diverged = ~np.isfinite(loss_trace).all(-1) | ~np.isfinite(init_loss)
  ok = ~diverged
  n_ok = ok.sum(-1)
  safe = np.where(ok, llc_per_chain, 0.0)
  mean = np.where(n_ok > 0, safe.sum(-1) / np.maximum(n_ok, 1), np.nan)
  var = np.where(ok, (llc_per_chain - mean[..., None]) ** 2, 0.0).sum(-1)
  std = np.where(n_ok > 1, np.sqrt(var / np.maximum(n_ok - 1, 1)), np.nan)
  if diverged.any():
    flat = diverged.reshape(-1, diverged.shape[-1])
    bad = []
    for i, row in enumerate(flat):
      if row.any():
        name = labels[i] if labels is not None and i < len(labels) else f"entry {i}"
        bad.append(f"{name}: chains {np.flatnonzero(row).tolist()}")
    warnings.warn("diverged SGLD chains (non-finite loss) excluded from the LLC mean: "
                  + "; ".join(bad), RuntimeWarning, stacklevel=3)
  return LLCResult(llc_mean=mean, llc_std=std, llc_per_chain=llc_per_chain,
                   loss_trace=loss_trace.astype(np.float32), init_loss=init_loss,
                   diverged=diverged, settings=settings)
