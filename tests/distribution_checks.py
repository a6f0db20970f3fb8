"""The goodness-of-fit check shared by the end-to-end sampling tests."""

from __future__ import annotations

import numpy as np
from scipy.stats import chisquare

#: Outcomes expected fewer times than this are pooled into one cell (chi-square's usual validity rule).
MIN_EXPECTED = 5


def chi_square_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square p-value of outcome ``counts`` against outcome probabilities ``expected``; outcomes
    expected fewer than :data:`MIN_EXPECTED` times are pooled into one."""
    runs = counts.sum()
    common = expected * runs >= MIN_EXPECTED
    observed, wanted = counts[common], expected[common] * runs
    if not common.all():
        observed = np.append(observed, counts[~common].sum())
        wanted = np.append(wanted, expected[~common].sum() * runs)
    return float(chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue)
