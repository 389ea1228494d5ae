"""The static-law plot's guide lines come from the points a log–log axis can show."""

from __future__ import annotations

import warnings

import numpy as np

from ntrl.study.report import law_guide_anchor


def test_a_run_at_p_zero_leaves_the_guides_finite():
    """A sampled run whose P fell to exactly 0 (the full grid's NPG juice MLP run) once made the
    guides' grid log10(0) = −inf: no guide lines in that panel, and RuntimeWarnings on the
    terminal."""
    p = [1e-3, 1e-2, 0.0, 1e-1, 0.3]
    y = [1e-6, 1e-4, 0.0, 1e-2, 5e-2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid, p_ref, y_ref = law_guide_anchor(p, y)
    assert np.isfinite(grid).all() and abs(grid[0] / 1e-3 - 1) < 1e-12 and abs(grid[-1] / 0.3 - 1) < 1e-12
    # p_ref at the median log p of the four shown, 10^−1.5; no point within a quarter decade of
    # it, so y_ref is the median of the two nearest, (10⁻⁴·10⁻²)^½
    assert abs(p_ref / 10**-1.5 - 1) < 1e-12 and abs(y_ref / 1e-3 - 1) < 1e-12


def test_the_guides_pass_through_the_local_median_not_one_runs_dip():
    """Most points on p², a few runs' dips far below at the median p: the guides' height is the
    median of the points near the median p."""
    p = np.repeat([1e-3, 1e-2, 1e-1], 5)
    y = p**2
    y[5:7] = 1e-12  # two of the five points at the median p dip
    grid, p_ref, y_ref = law_guide_anchor(list(p), list(y))
    assert abs(p_ref / 1e-2 - 1) < 1e-12 and abs(y_ref / 1e-4 - 1) < 1e-12
    assert law_guide_anchor([0.0], [1.0]) is None and law_guide_anchor([], []) is None
    assert law_guide_anchor([0.1, 0.2], [np.nan, 0.0]) is None
