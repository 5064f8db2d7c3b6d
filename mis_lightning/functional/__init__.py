"""Pure tensor math of the MIS indicator (method.md sections 3 and 5); imports only torch.

Shapes and units: ``theta [d]`` weights and ``sigma [d]`` standard deviations of the trained
weights (parameter units); ``boundaries [d, K+1]`` cell edges (parameter units);
``influence [R, d]`` (``w``) standardised influences of R records (dimensionless). Lower-case
``sigma`` is always the ``[d]`` standard deviation of the trained weights; upper-case ``Sigma``
the ``[d, d]`` sandwich covariance of the per-record influence (``sigma_j = sqrt(Sigma_jj / n)``).
"""

from . import correlated, interval
from .affine import affine_boundaries, affine_cell_moments, affine_codes, warm_up_compiled_kernel
from .bootstrap import bootstrap_interval, record_standard_error
from .cells import (
    CellMoments,
    CellStatistics,
    cell_moments,
    cell_statistics,
    standardize_boundaries,
)
from .kernel import CompilePolicy, fine_grid_moments
from .leakage import (
    CLT_MIN_TERMS,
    CLT_TOLERANCE,
    DEFAULT_MC_DRAWS,
    FINE_KAPPA,
    FROZEN_KAPPA,
    MC_BUFFER,
    MC_FLOP_BUDGET,
    MC_HALF_WINDOW,
    MC_WINDOW_REACH,
    CltSums,
    HybridMC,
    baseline_leakage,
    carry_interval,
    choose_method,
    clt_out_of_tolerance,
    clt_sums,
    coarse_chunks,
    coarse_count,
    coarse_mask,
    effective_terms,
    exact1d_leakage,
    leakage_from_sums,
    mc_draws_for,
    mc_first_order,
    mis_from_leakage,
    record_leakage,
    resolve_method,
    sample_cell_means,
    saturate,
    unsaturate,
    window_too_narrow,
)
from .table import table_boundaries, table_cell_moments

__all__ = [
    "CLT_MIN_TERMS",
    "CLT_TOLERANCE",
    "CellMoments",
    "CellStatistics",
    "CltSums",
    "DEFAULT_MC_DRAWS",
    "FINE_KAPPA",
    "FROZEN_KAPPA",
    "HybridMC",
    "MC_BUFFER",
    "MC_FLOP_BUDGET",
    "MC_HALF_WINDOW",
    "MC_WINDOW_REACH",
    "bootstrap_interval",
    "clt_out_of_tolerance",
    "coarse_count",
    "coarse_mask",
    "exact1d_leakage",
    "mc_draws_for",
    "record_standard_error",
    "resolve_method",
    "CompilePolicy",
    "affine_boundaries",
    "affine_cell_moments",
    "affine_codes",
    "warm_up_compiled_kernel",
    "baseline_leakage",
    "cell_moments",
    "cell_statistics",
    "choose_method",
    "clt_sums",
    "effective_terms",
    "fine_grid_moments",
    "correlated",
    "interval",
    "leakage_from_sums",
    "window_too_narrow",
    "coarse_chunks",
    "mc_first_order",
    "mis_from_leakage",
    "record_leakage",
    "sample_cell_means",
    "saturate",
    "unsaturate",
    "carry_interval",
    "standardize_boundaries",
    "table_boundaries",
    "table_cell_moments",
]
