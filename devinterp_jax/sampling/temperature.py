"""Choices of the inverse temperature nβ (paper App. A.5.1).

nβ multiplies the mean minibatch loss in the SGLD drift and in the estimate
λ̂ = nβ (E[L] − L(w*)). Watanabe's WBIC temperature β* = 1/ln n gives
nβ = n / ln n for a dataset of n samples (Lau et al.). The paper samples at a
higher temperature, treating the SGLD batch size B as the effective n:
nβ = B / ln B (e.g. 1024/ln 1024 ≈ 147.7; 100/ln 100 ≈ 21.7). Smaller nβ
allows a larger step size and shorter chains; larger nβ brings the estimate
closer to its nβ → ∞ limit λ (for multiplicity m > 1 it sits near
λ − (m − 1)/ln nβ; see `theory.finite_nbeta_target`).
"""

from __future__ import annotations

import math


def nbeta_wbic(n: int) -> float:
  """nβ = n / ln n: the WBIC inverse temperature for a dataset of n samples."""
  if n < 2:
    raise ValueError(f"n must be >= 2, got {n}")
  return n / math.log(n)


def nbeta_from_batch_size(batch_size: int) -> float:
  """nβ = B / ln B: the paper's choice, with the SGLD batch size B as the effective n."""
  if batch_size < 2:
    raise ValueError(f"batch_size must be >= 2, got {batch_size}")
  return batch_size / math.log(batch_size)
