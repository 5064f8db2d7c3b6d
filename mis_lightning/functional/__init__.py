"""Pure tensor math of the MIS indicator (method.md sections 3 and 5); imports only torch.

Shapes and units: ``theta [d]`` weights and ``sigma [d]`` standard deviations of the trained
weights (parameter units); ``boundaries [d, K+1]`` cell edges (parameter units);
``w [R, d]`` standardised influences of R records (dimensionless).
"""

from . import interval
from .cells import (
    CellMoments,
    CellStatistics,
    cell_moments,
    cell_statistics,
    standardize_boundaries,
)
from .grids import (
    affine_boundaries,
    affine_cell_moments,
    affine_codes,
    fine_grid_moments,
    table_boundaries,
    table_cell_moments,
)
from .leakage import (
    CLT_MIN_TERMS,
    CLT_TOLERANCE,
    CltSums,
    baseline_leakage,
    choose_method,
    clt_sums,
    effective_terms,
    leakage_from_sums,
    mc_first_order,
    mis_from_leakage,
    record_leakage,
    sample_cell_means,
    saturate,
)

__all__ = [
    "CLT_MIN_TERMS",
    "CLT_TOLERANCE",
    "CellMoments",
    "CellStatistics",
    "CltSums",
    "affine_boundaries",
    "affine_cell_moments",
    "affine_codes",
    "baseline_leakage",
    "cell_moments",
    "cell_statistics",
    "choose_method",
    "clt_sums",
    "effective_terms",
    "fine_grid_moments",
    "interval",
    "leakage_from_sums",
    "mc_first_order",
    "mis_from_leakage",
    "record_leakage",
    "sample_cell_means",
    "saturate",
    "standardize_boundaries",
    "table_boundaries",
    "table_cell_moments",
]
