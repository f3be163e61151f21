"""Small exact statistics for the report: mean and sample standard deviation, and the paired t-test.

The t distribution's tail comes from the regularized incomplete beta function
(two-sided p = I_{df/(df+t²)}(df/2, 1/2)), evaluated by its continued fraction (modified Lentz;
Numerical Recipes §6.4), so the report needs neither scipy nor an approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedTest", "betainc", "mean_std", "paired_t_test", "t_two_sided_p"]

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 500


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation with n - 1); the deviation is None for fewer than 2 values."""
    if not values:
        raise ValueError("values: expected at least one value, got none")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            step = d * c
            h *= step
        if abs(step - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"betainc: the continued fraction did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a, b: expected positive parameters, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x: expected a value in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df: expected a positive number of degrees of freedom, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``n`` pairs: mean difference, t statistic and two-sided p-value (None where the
    test is not defined: fewer than 2 pairs, or differences without spread)."""

    n: int
    mean_diff: float | None
    t: float | None
    p: float | None
    note: str = ""

    def describe(self) -> str:
        """``p 0.0418 (3 seeds)`` or ``n/a (1 seed)``."""
        if self.p is None:
            return f"n/a ({self.note})"
        return f"p {self.p:.3g} ({self.n} seeds)"


def paired_t_test(x: Sequence[float], y: Sequence[float]) -> PairedTest:
    """Paired t-test of ``x - y`` (same length, paired by position, e.g. by seed), two-sided."""
    if len(x) != len(y):
        raise ValueError(f"y: expected as many values as x ({len(x)}), got {len(y)}")
    n = len(x)
    if n == 0:
        return PairedTest(0, None, None, None, "no seeds")
    diffs = [a - b for a, b in zip(x, y)]
    mean, sd = mean_std(diffs)
    if n < 2:
        return PairedTest(n, mean, None, None, "1 seed")
    # differences equal up to rounding (0.3 - 0.2 vs 0.2 - 0.1) have no spread: t would be rounding noise
    if sd <= 1e-12 * max(max(abs(v) for v in (*x, *y)), _TINY):
        return PairedTest(n, mean, None, None, f"{n} seeds, identical differences")
    t = mean / (sd / math.sqrt(n))
    return PairedTest(n, mean, t, t_two_sided_p(t, n - 1), "")
