"""Cell edges of real quantization grids and their fast cell moments (method.md section 5).

This module re-exports, for existing imports, what now lives in three modules:

* :mod:`~mis_lightning.functional.affine` -- affine integer grids (codes, edges, moments);
* :mod:`~mis_lightning.functional.table` -- value tables (float formats times a scale);
* :mod:`~mis_lightning.functional.kernel` -- the shared kernels: fine-grid expansion, the
  uniform-grid table, the fused kernel and its :class:`CompilePolicy`, windowed sums.
"""

from __future__ import annotations

from .affine import (
    _WINDOW_BUCKETS,
    FUSED_PATH,
    SPARSE_PATH,
    TABLE_MIN_ELEMENTS,
    _affine_cell_moments_sparse,
    _sparse_checked,
    affine_boundaries,
    affine_cell_moments,
    affine_codes,
    affine_reference_moments,
)
from .cells import moments_from_alpha
from .kernel import (
    _FUSED_STATE,
    _MAX_WINDOW,
    _TABLE_NH,
    _TABLE_NU,
    COMPILE_AFTER,
    COMPILED_PATH,
    CUTOFF_SIGMAS,
    FINE_STEP,
    REFERENCE_FINE_STEP,
    TABLE_H_MAX,
    CompilePolicy,
    _float64_inputs,
    _fused_affine,
    _fused_affine_codes,
    _fused_kernel,
    _uniform_table,
    fine_grid_moments,
    uniform_table_moments,
)
from .table import (
    _TABLE_BUCKETS,
    TABLE_PATH,
    _table_cell_moments,
    table_boundaries,
    table_cell_moments,
    table_reference_moments,
)

#: Former name of :func:`~mis_lightning.functional.cells.moments_from_alpha` (the one
#: cell-moment kernel; it now mirrors the upper tail like every other path).
moments_from_alpha_fast = moments_from_alpha

__all__ = [
    "COMPILED_PATH", "COMPILE_AFTER", "CUTOFF_SIGMAS", "FINE_STEP", "FUSED_PATH",
    "REFERENCE_FINE_STEP", "SPARSE_PATH", "TABLE_H_MAX", "TABLE_MIN_ELEMENTS", "TABLE_PATH",
    "CompilePolicy", "_FUSED_STATE", "_MAX_WINDOW", "_TABLE_BUCKETS", "_TABLE_NH", "_TABLE_NU",
    "_WINDOW_BUCKETS", "_affine_cell_moments_sparse", "_float64_inputs", "_fused_affine",
    "_fused_affine_codes", "_fused_kernel", "_sparse_checked", "_table_cell_moments",
    "_uniform_table", "affine_boundaries", "affine_cell_moments", "affine_codes",
    "affine_reference_moments", "fine_grid_moments", "moments_from_alpha",
    "moments_from_alpha_fast", "table_boundaries", "table_cell_moments",
    "table_reference_moments", "uniform_table_moments",
]
