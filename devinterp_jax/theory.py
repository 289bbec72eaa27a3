"""Exact learning coefficients λ and multiplicities m of models with known answers.

Each function returns `(λ, m)` with λ as an exact `Fraction`, for validating
the SGLD estimator:

* `regular(d)`: a non-degenerate minimum with d parameters: (d/2, 1).
* `normal_crossing(powers)`: loss ∝ Π_i w_i^(2 p_i): λ = 1/(2 max p), m = #argmax.
* `reduced_rank_regression(M, H, N, r)`: Aoyagi & Watanabe (2005), input M,
  hidden H, output N, true rank r.
* `deep_linear_network(widths, r)`: Aoyagi (2024), widths H_1 (input) … H_{L+1}
  (output), true product of rank r, at the most singular true parameter.

For finite nβ the SGLD estimate with multiplicity m > 1 sits near
λ − (m − 1)/ln(nβ) (`finite_nbeta_target`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence


def regular(d: int) -> tuple[Fraction, int]:
  if d < 0:
    raise ValueError(f"d must be >= 0, got {d}")
  return Fraction(d, 2), 1


def normal_crossing(powers: Sequence[int]) -> tuple[Fraction, int]:
  """λ, m of K(w) = Π_i w_i^(2 p_i) near the origin (p_i ≥ 1 integers)."""
  if not powers or any(int(p) != p or p < 1 for p in powers):
    raise ValueError(f"powers must be positive integers, got {powers}")
  top = max(powers)
  return Fraction(1, 2 * top), sum(p == top for p in powers)


def _check_rank(widths: Sequence[int], r: int) -> None:
  if any(int(h) != h or h < 1 for h in widths):
    raise ValueError(f"widths must be positive integers, got {widths}")
  if r < 0 or r > min(widths):
    raise ValueError(f"true rank r={r} must lie in [0, min(widths)={min(widths)}]")


def reduced_rank_regression(M: int, H: int, N: int, r: int) -> tuple[Fraction, int]:
  """Aoyagi & Watanabe (2005): input M, hidden H, output N, true rank r."""
  _check_rank((M, H, N), r)
  if M + H < N + r:
    return Fraction(H * M - H * r + N * r, 2), 1
  if N + H < M + r:
    return Fraction(H * N - H * r + M * r, 2), 1
  if M + N < H + r:
    return Fraction(M * N, 2), 1
  num = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
  if (M + H + N + r) % 2 == 0:
    return Fraction(num, 8), 1
  return Fraction(num + 1, 8), 2


def _aoyagi_sigma(deltas: Sequence[int]) -> list[int]:
  """The unique index set Σ of Aoyagi's theorem (smallest Δ's, ties kept together)."""
  order = sorted(range(len(deltas)), key=lambda i: deltas[i])
  found = []
  for k in range(2, len(order) + 1):
    if k < len(order) and deltas[order[k - 1]] == deltas[order[k]]:
      continue  # a tie would be split
    inside, outside = order[:k], order[k:]
    ell = k - 1
    s = sum(deltas[i] for i in inside)
    top = max(deltas[i] for i in inside)
    ok = s >= ell * top
    if outside:
      low = min(deltas[i] for i in outside)
      ok = ok and top < low and s < ell * low
    if ok:
      found.append(inside)
  if len(found) != 1:
    raise ArithmeticError(f"expected exactly one Σ for Δ={list(deltas)}, found {found}")
  return found[0]


def deep_linear_network(widths: Sequence[int], r: int) -> tuple[Fraction, int]:
  """Aoyagi (2024): λ, m of a deep linear network with widths H_1 … H_{L+1}.

  widths[0] is the input, widths[-1] the output; the true map has rank r and
  the parameter is the most singular true one (every layer of rank exactly r).
  The multiplicity (order) is θ = a(ℓ − a) + 1 (Aoyagi 2024, Thm. 1): 1 when S
  is a multiple of ℓ; e.g. K = (abc)² (widths 1,1,1,1, r = 0) has λ = ½, θ = 3.
  REFERENCE.md's "a = 0" is the same condition with a taken modulo ℓ.
  """
  widths = [int(h) for h in widths]
  if len(widths) < 3:
    raise ValueError(f"a deep linear network needs >= 2 layers (>= 3 widths), got {widths}")
  _check_rank(widths, r)
  deltas = [h - r for h in widths]
  sigma = _aoyagi_sigma(deltas)
  ell = len(sigma) - 1
  s = sum(deltas[i] for i in sigma)
  big_m = -(-s // ell)  # ⌈S/ℓ⌉
  a = s - (big_m - 1) * ell
  pairs = sum(deltas[i] * deltas[j] for x, i in enumerate(sigma) for j in sigma[x + 1 :])
  lam = (
    Fraction(-r * r + r * (widths[0] + widths[-1]), 2)
    + Fraction(a * (ell - a), 4 * ell)
    - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
    + Fraction(pairs, 2)
  )
  return lam, a * (ell - a) + 1


def finite_nbeta_target(lam: float, multiplicity: int, nbeta: float) -> float:
  """Where a finite-nβ estimate of a multiplicity-m model sits: λ − (m − 1)/ln(nβ)."""
  if nbeta <= 1:
    raise ValueError(f"nbeta must be > 1, got {nbeta}")
  return float(lam) - (multiplicity - 1) / math.log(nbeta)
