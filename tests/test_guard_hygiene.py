"""The suite's own guard hygiene (tests/conftest.py ``no_guarded_path_left_disabled``): a test
that leaves an optimised cell-moment path disabled fails, and the path is re-enabled for the
tests after it. Before, one left disabled stayed off for every later file of that xdist worker,
silently: they ran the slow fallback (tests/test_eager_blocks.py needs the fused path)."""

import pytest
import torch
from conftest import release_disabled_paths

import mis_lightning.functional.affine as A
from mis_lightning.functional import CompilePolicy
from mis_lightning.functional.fastpath import GUARD

F64 = torch.float64


def test_a_disabled_path_is_reported_and_re_enabled():
    with pytest.warns(RuntimeWarning, match="disagrees with its reference"):
        GUARD.fail(A.FUSED_PATH, "kappa 1 against the reference 0 (injected)", A.SPARSE_PATH)
    left = release_disabled_paths()
    assert len(left) == 1 and A.FUSED_PATH in left[0] and "injected" in left[0]
    assert not GUARD.disabled and release_disabled_paths() == []
    # the fused path runs again: its kernel is called over the chunk
    c = A.TABLE_MIN_ELEMENTS
    th = torch.linspace(-1.0, 1.0, c, dtype=F64)
    sg = torch.full((c,), 0.05, dtype=F64)
    s, zp = torch.full((c,), 0.1, dtype=F64), torch.zeros(c, dtype=F64)
    out = A.affine_cell_moments(th, sg, s, zp, -8, 7, compile_policy=CompilePolicy("never"))
    assert A.FUSED_PATH not in GUARD.disabled and GUARD.is_checked(A.FUSED_PATH)
    assert bool(torch.isfinite(out.kappa).all())
