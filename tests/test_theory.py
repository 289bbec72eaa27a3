import itertools
from fractions import Fraction

import pytest

from devinterp_jax import theory


def test_regular_and_normal_crossing():
  assert theory.regular(7) == (Fraction(7, 2), 1)
  assert theory.normal_crossing([1, 1]) == (Fraction(1, 2), 2)
  assert theory.normal_crossing([2, 2]) == (Fraction(1, 4), 2)
  assert theory.normal_crossing([1, 3, 2]) == (Fraction(1, 6), 1)
  with pytest.raises(ValueError):
    theory.normal_crossing([0, 1])


@pytest.mark.parametrize(
  "mhn,expected", [((5, 3, 5), 6.5), ((5, 4, 5), 8), ((4, 3, 8), 6), ((8, 3, 4), 6), ((3, 8, 4), 6)]
)
def test_reduced_rank_reference_values(mhn, expected):
  lam, _ = theory.reduced_rank_regression(*mhn, 0)
  assert lam == expected


@pytest.mark.parametrize(
  "widths,r,expected",
  [
    ((10, 10, 10, 10), 3, 42),
    ((8, 12, 6, 10), 2, Fraction(55, 2)),
    ((5, 3, 5), 0, Fraction(13, 2)),
  ],
)
def test_deep_linear_reference_values(widths, r, expected):
  assert theory.deep_linear_network(widths, r)[0] == expected


def test_depth_two_dln_equals_reduced_rank_everywhere_up_to_8():
  for m, h, n in itertools.product(range(1, 9), repeat=3):
    for r in range(0, min(m, h, n) + 1):
      assert theory.deep_linear_network((m, h, n), r) == theory.reduced_rank_regression(
        m, h, n, r
      ), (m, h, n, r)


def test_dln_lambda_is_at_most_half_the_parameter_count():
  for widths in itertools.product(range(1, 6), repeat=4):
    for r in range(0, min(widths) + 1):
      lam, m = theory.deep_linear_network(widths, r)
      d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
      assert 0 <= lam <= Fraction(d, 2) and 1 <= m <= len(widths) ** 2, (widths, r)


def test_dln_multiplicity_of_a_monomial():
  """K = (abc)² is the normal crossing with powers (1, 1, 1): λ = ½, θ = 3."""
  assert theory.deep_linear_network((1, 1, 1, 1), 0) == (Fraction(1, 2), 3)
  assert theory.deep_linear_network((1, 1, 1, 1), 0) == (theory.normal_crossing([1, 1, 1])[0], 3)
  assert theory.deep_linear_network((1, 1, 1), 0) == theory.normal_crossing([1, 1])


def test_bad_rank_is_refused():
  with pytest.raises(ValueError, match="true rank"):
    theory.deep_linear_network((3, 2, 3), 3)


def test_finite_nbeta_target():
  assert theory.finite_nbeta_target(6.5, 1, 100.0) == 6.5
  assert abs(theory.finite_nbeta_target(6.5, 2, 100.0) - (6.5 - 1 / 4.605170185988092)) < 1e-12
