"""Smaller Monte Carlo budgets for tests that compare figures computed with the same draws
(invariances: the figures of ``s * loss``, of other batch sizes). Such a comparison reads the
difference between two runs on identical draws, not the figures' Monte Carlo error, so 1/8 of
the correlated form's budgets (``EXACT_BUDGET``, ``ALL_COARSE_BUDGET``) and 2,048 draws elsewhere
keep what it catches: in each of the three tests that use it, the weights moved by 1e-7 relative
in the compared call read the same difference at both budgets (2.3e-8, 2.0e-8, 5.1-5.7e-9 against
tolerances of 1e-8, 1e-9, 1e-9: docs/benchmarks.md, "ts38")."""

from __future__ import annotations

import pytest

from mis_lightning.functional import correlated as FC

MC_DRAWS = 2048


def small_budgets(mp: pytest.MonkeyPatch) -> dict:
    """Set the correlated form's budgets to 1/8 on ``mp``; the ``mc_draws`` option to pass."""
    mp.setattr(FC, "EXACT_BUDGET", FC.EXACT_BUDGET // 8)
    mp.setattr(FC, "ALL_COARSE_BUDGET", FC.ALL_COARSE_BUDGET // 8)
    return {"mc_draws": MC_DRAWS}
