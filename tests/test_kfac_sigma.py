"""The diagonal estimator's K-FAC correction of sigma (method.md section 4, "The diagonal
sandwich and correlated weights"): sigma_j times sqrt(VIF_j) of each nn.Linear layer's
Kronecker-factored Hessian, the marginal sd the cells need."""

from __future__ import annotations

import torch
from _nets import mse_per_record as _mse
from _nets import ols_ar1_linear as _ols
from torch import nn

from mis_lightning.estimation.estimate import estimate


def _sigma_ratio(model: nn.Module, loader: list) -> torch.Tensor:
    kw = dict(num_records=64, leverage_correction=False)
    diag = estimate(model, loader, _mse, mode="diagonal", hessian="ggn", **kw)
    exact = estimate(model, loader, _mse, mode="exact", **kw)
    return torch.cat([diag.sigma[k].reshape(-1) / exact.sigma[k].reshape(-1) for k in diag.names])


def test_the_diagonal_estimator_reads_the_marginal_sd_of_a_correlated_linear_layer() -> None:
    """AR(1) rho = 0.9 inputs (VIF ~ 9.5 inside, ~5 at the ends), with a bias on non-centred inputs
    (its VIF ~ 20): the diagonal sigma within 8% of the exact sandwich's marginal sd for every
    weight. Tolerance: K-FAC is exact for one least-squares layer, and the diagonal sandwich's
    V_jj (sum e_i^2 x_ij^2) against the exact H^-1 V H^-1 with the sample V differ by the
    heteroscedasticity the sample shows (Gaussian noise, n = 2,000: a few percent, amplified by the VIF; measured
    0.95-1.04, the bias case the widest). Main read 0.31-0.44 here (the conditional sd)."""
    for bias in (False, True):
        r = _sigma_ratio(*_ols(0.9, bias))
        assert float(r.min()) > 0.92 and float(r.max()) < 1.08, (bias, r)


def test_uncorrelated_inputs_keep_the_diagonal_sigma() -> None:
    """Independent centred inputs: the factor is ~1 (sample correlation only, VIF - 1 ~ d / n),
    so sigma moves by < 2% and still matches the exact estimator within 5%."""
    model, loader = _ols(0.0, False)
    est = estimate(model, loader, _mse, mode="diagonal", hessian="ggn", num_records=64)
    assert est.diagnostics["kfac_correction"] is True
    assert est.diagnostics["kfac_variance_inflation_max"] < 1.04  # sd factor < 1.02
    r = _sigma_ratio(model, loader)
    assert float((r - 1).abs().max()) < 0.05, r


def test_kfac_variance_inflation_is_that_of_the_kronecker_factored_hessian() -> None:
    """Against the explicit inverse of ``(A / n) (x) (G / n) + lambda`` (float64: 1e-9 relative),
    uniform and per-column decay, and the pseudo-inverse along a duplicated input (lambda = 0:
    the factor is finite)."""
    from mis_lightning.estimation.linear_factors import kfac_variance_inflation
    g = torch.Generator().manual_seed(1)
    p, q, n = 5, 3, 40
    X = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64)
    D = torch.randn(n, q, generator=g, dtype=torch.float64) @ torch.randn(q, q, generator=g, dtype=torch.float64)
    A, G = X.T @ X, D.T @ D
    for lam in (0.0, 0.5, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)):
        lv = torch.as_tensor(lam, dtype=torch.float64).expand(p)
        H = torch.kron(G / n, A / n) + torch.diag(lv.repeat(q))
        ref = (H.diagonal() * torch.linalg.inv(H).diagonal()).reshape(q, p)
        got = kfac_variance_inflation(A, G, n, lam)
        torch.testing.assert_close(got, ref.clamp_min(1.0), rtol=1e-9, atol=0.0)
    Xd = torch.cat([X, X[:, :1]], 1)  # an exactly duplicated input: A singular
    vif = kfac_variance_inflation(Xd.T @ Xd, G, n, 0.0)
    assert bool(torch.isfinite(vif).all()) and float(vif.max()) < 1e6
    # dead units (a zero output row of G) and inputs never active (a zero column of A): the
    # eigendecompositions run on the live blocks only; the live weights' factors are those of the
    # explicit inverse on the live coordinates (where the decay's identity keeps H invertible the
    # full and the live inverse agree on them), the dead ones 1. Both Cholesky-failing (lambda = 0,
    # A singular) and decayed paths.
    Dz, Xz = D.clone(), torch.cat([X, X[:, :1], torch.zeros(n, 1, dtype=torch.float64)], 1)
    Dz[:, 1] = 0.0
    Az, Gz = Xz.T @ Xz, Dz.T @ Dz
    for lam in (0.0, 0.5):
        got = kfac_variance_inflation(Az, Gz, n, lam)
        assert bool((got[1] == 1.0).all()) and bool((got[:, -1] == 1.0).all())
        la, lg = [0, 1, 2, 3, 4, 5], [0, 2]
        Al, Gl = Az[la][:, la], Gz[lg][:, lg]
        H = torch.kron(Gl / n, Al / n) + lam * torch.eye(len(la) * len(lg), dtype=torch.float64)
        inv = torch.linalg.pinv(H, hermitian=True) if lam == 0.0 else torch.linalg.inv(H)
        ref = (H.diagonal() * inv.diagonal()).reshape(len(lg), len(la)).clamp_min(1.0)
        if lam > 0:
            torch.testing.assert_close(got[lg][:, la], ref, rtol=1e-9, atol=0.0)
        else:  # pseudo-inverse along the duplicated input: finite, as above
            assert bool(torch.isfinite(got).all()) and float(got.max()) < 1e6


def test_factors_from_a_subsample_read_the_full_samples_sigma(monkeypatch) -> None:
    """The factors sum a sample of about max(KFAC_MIN_RECORDS, 2 max(p, out)) records (cost), the VIF
    rescaled by the Wishart mean of an inverse (kfac_subsample_scale). AR(1) rho = 0.9, d = 16 + bias,
    n = 2,000, factors from 300 records: sigma against the exact estimator's (all records) within 5%
    at the median and 15% for every weight (the subsample's noise: relative sd ~ sqrt(2 / (m - p)) ~
    8% on the VIF, 4% on sigma, common to the layer's weights; measured median 0.96, 0.88-1.05;
    without the rescaling 0.99, 0.90-1.08 on this sample, the Wishart mean being 6% high on the VIF).
    Fails on main (no correction: 0.3x)."""
    import importlib

    E = importlib.import_module("mis_lightning.estimation.estimate")
    monkeypatch.setattr(E, "KFAC_MIN_RECORDS", 300)
    model, loader = _ols(0.9, True)
    est = estimate(model, loader, _mse, mode="diagonal", hessian="ggn", num_records=64)
    # a content sample at rate 300 / 2,000 (kf43; a list's records counted up front, fu43): its
    # count is Binomial(2000, 0.15), 300 +- 16 (sd); 5 sd either way, and well below the 2,000 records
    assert abs(est.diagnostics["kfac_records_min"] - 300) <= 80
    r = _sigma_ratio(model, loader)
    assert abs(float(r.median()) - 1.0) < 0.05 and float((r - 1).abs().max()) < 0.15, r


def test_factor_gram_over_the_live_columns_equals_the_full_gram() -> None:
    """The Kronecker factors' GEMM runs over the columns non-zero in the batch (dead ReLU units and
    the inputs they feed; pf31's 1e7 MLP: 91% of a layer): equal to the full ``u^T v`` (float64:
    the same products, 1e-12 relative), exact zeros in the dead rows and columns, both for a mostly
    dead batch (the live path) and a mostly live one (the plain GEMM)."""
    from mis_lightning.estimation.linear_factors import _live_gram

    g = torch.Generator().manual_seed(3)
    for dead in (0.9, 0.1):
        v = torch.randn(64, 40, generator=g, dtype=torch.float64)
        v[:, torch.rand(40, generator=g) < dead] = 0.0
        u = torch.rand(64, 1, generator=g, dtype=torch.float64) * v
        got = _live_gram(u, v)
        torch.testing.assert_close(got, u.T @ v, rtol=1e-12, atol=1e-12)
        zero = (v == 0).all(0)
        assert bool((got[zero] == 0).all()) and bool((got[:, zero] == 0).all())


def test_one_singular_factor_keeps_the_other_factors_cholesky_vif() -> None:
    """lambda = 0 and a singular G (a duplicated output direction: its pseudo-inverse) beside a
    well-conditioned A whose last input is on a 1e-6 scale: the VIF is that of each factor taken
    alone (VIF_G (x) VIF_A, the (pseudo-)inverse of a Kronecker product), and does not depend on the
    input's units (the VIF is invariant under A -> D A D). es32: one Cholesky-failing factor no
    longer sends both to the eigendecomposition in parameter units, whose 1e-10 cutoff took the
    small input's eigenvalue (1e-12 of the largest) for a null direction: main read 12 of the 24
    factors 0.45-0.997x the unit-scaled ones (float64: 1e-8 relative). Dead units (a zero row of
    G, a zero column of A) read 1, as documented, whichever route each factor takes."""
    from mis_lightning.estimation.linear_factors import _factor_vif, kfac_variance_inflation

    g = torch.Generator().manual_seed(5)
    p, q, n = 6, 4, 60
    X = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64)
    D = torch.randn(n, q, generator=g, dtype=torch.float64)
    D[:, 3] = D[:, 0]  # G singular: its Cholesky route does not hold
    A, G = X.T @ X, D.T @ D
    assert _factor_vif(G / n) is None and _factor_vif(A / n) is not None
    Ai = torch.linalg.inv(A / n)
    va = (A / n).diagonal() * Ai.diagonal()
    Gp = torch.linalg.pinv(G / n, hermitian=True)
    vg = (G / n).diagonal() * Gp.diagonal()
    ref = (vg.unsqueeze(1) * va.unsqueeze(0)).clamp_min(1.0)
    got = kfac_variance_inflation(A, G, n, 0.0)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=0.0)
    s = torch.ones(p, dtype=torch.float64)
    s[-1] = 1e-6  # the last input in other units
    torch.testing.assert_close(kfac_variance_inflation(A * s.unsqueeze(0) * s.unsqueeze(1), G, n, 0.0), ref,
                               rtol=1e-8, atol=0.0)
    # a dead output unit and an input never active: their entries 1, the rest unchanged
    Dz, Xz = D.clone(), torch.cat([X, torch.zeros(n, 1, dtype=torch.float64)], 1)
    Dz[:, 1] = 0.0
    got = kfac_variance_inflation(Xz.T @ Xz, Dz.T @ Dz, n, 0.0)
    assert bool((got[1] == 1.0).all()) and bool((got[:, -1] == 1.0).all())
    lg = [0, 2, 3]
    Gl = (Dz.T @ Dz)[lg][:, lg] / n
    vgl = Gl.diagonal() * torch.linalg.pinv(Gl, hermitian=True).diagonal()
    torch.testing.assert_close(got[lg][:, :p], (vgl.unsqueeze(1) * va.unsqueeze(0)).clamp_min(1.0), rtol=1e-8, atol=0.0)


def test_batch_sums_added_in_place_over_the_live_rows_equal_the_returned_sums() -> None:
    """``FactoredProgram.batch_sums(..., into=)`` adds a weight's ``d^T x``, ``(d^2)^T x^2`` and
    ``c^T x^2`` to running sums in place, its GEMMs over the output rows live in the batch only
    (a ReLU layer's dead units: exact zeros elsewhere): equal to adding the returned sums (float64
    model: the same dot products, 1e-12 relative; exactly 0 added in the dead rows), for a mostly
    dead layer (the live rows' path), a mostly live one (the whole GEMM) and non-finite inputs (the
    whole GEMM: 0 x inf is NaN, which must stay visible). Fails on main (no ``into``)."""
    from mis_lightning.estimation.linear_factors import FactoredProgram

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 1)).double()
    with torch.no_grad():
        model[0].bias[:36] = -50.0  # 36 of 40 first-layer units dead on every record
    names = [k for k, _ in model.named_parameters()]
    prog = FactoredProgram(model, _mse, names, torch.float64)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    for poison in (False, True):
        xb = x.clone()
        if poison:
            xb[0, 0] = float("inf")
        fac = prog.batch(xb, y, 32)
        ref, _ = prog.batch_sums(fac, torch.float64)
        wn = [w for w, _ in prog.layout.values()]
        start = {w: tuple(torch.full_like(ref[w][0], 0.5) for _ in range(3)) for w in wn}
        into = {w: tuple(t.clone() for t in start[w]) for w in wn}
        got, _ = prog.batch_sums(fac, torch.float64, into=into)
        assert set(got) == {b for _, b in prog.layout.values()}  # the biases still returned
        for w in wn:
            for a, r, s0 in zip(into[w], ref[w], start[w]):
                torch.testing.assert_close(a, s0 + r, rtol=1e-12, atol=1e-12, equal_nan=True)
        rows = into["0.weight"][0].view(40, 6)[:36]  # the dead units' rows of the first weight
        if poison:  # the whole GEMM: 0 x inf in the dead rows, visible
            assert bool(torch.isnan(rows).any())
        else:  # the live rows' path: the dead rows untouched
            assert bool(((fac["0"][1] == 0) & (fac["0"][2] == 0)).all(0)[:36].all()) and bool((rows == 0.5).all())
    prog.close()


def test_the_diagnostics_quantile_is_torch_quantile_without_the_sort() -> None:
    """``estimate._quantile`` (the K-FAC VIF's and the Monte Carlo error's p90, by one ``kthvalue``
    and the least value above it; the sort was ~0.6 s of the 1e7 MLP's estimation): the same float
    as ``torch.quantile`` (bitwise) for float64 and float32, ties, constant and tiny inputs, and q at
    0, 1 and between; NaN where the input holds one."""
    import importlib

    E = importlib.import_module("mis_lightning.estimation.estimate")
    g = torch.Generator().manual_seed(6)
    for n in (1, 2, 3, 10, 11, 1000, 54321):
        for dt in (torch.float64, torch.float32):
            for v in (torch.randn(n, generator=g, dtype=dt), torch.randint(0, 5, (n,), generator=g).to(dt),
                      1 + torch.rand(n, generator=g, dtype=dt).pow(8) * 1e7, torch.ones(n, dtype=dt)):
                for q in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
                    assert E._quantile(v, q) == float(v.quantile(q)), (n, dt, q)
    v = torch.randn(50, generator=g, dtype=torch.float64)
    v[7] = float("nan")
    assert E._quantile(v, 0.9) != E._quantile(v, 0.9)


def test_symmetric_gram_from_its_upper_blocks_equals_the_gemm() -> None:
    """``_gram(u, None)`` (the input factor ``A``'s ``u^T u`` from its block-row GEMMs right of the
    diagonal, the blocks below mirrored: ~5/8 of the flops at 4 blocks; es32): equal to ``u^T u``
    (float64: the same dot products, 1e-12 relative), at widths not divisible by the blocks and
    below the split (one GEMM); ``_live_gram`` of ``u`` with itself on a mostly dead batch takes
    it on the live block. No test of speed here (benchmarks/)."""
    from mis_lightning.estimation.linear_factors import GRAM_BLOCK_MIN, _gram, _live_gram

    g = torch.Generator().manual_seed(8)
    for k in (GRAM_BLOCK_MIN - 1, GRAM_BLOCK_MIN, 2 * GRAM_BLOCK_MIN + 3):
        u = torch.randn(40, k, generator=g, dtype=torch.float64).relu()
        got = _gram(u, None)
        torch.testing.assert_close(got, u.T @ u, rtol=1e-12, atol=1e-12)
    u = torch.randn(40, 4 * GRAM_BLOCK_MIN, generator=g, dtype=torch.float64)
    u[:, torch.rand(u.shape[1], generator=g) < 0.6] = 0.0
    acc = torch.full((u.shape[1], u.shape[1]), 0.25, dtype=torch.float64)
    _live_gram(u, u, into=acc)
    torch.testing.assert_close(acc, 0.25 + u.T @ u, rtol=1e-12, atol=1e-12)
