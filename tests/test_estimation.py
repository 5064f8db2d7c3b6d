"""Estimation against closed forms: OLS sandwich, orthogonal designs, Hessian diagonals."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from _small_mc import small_budgets
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation import estimate
from mis_lightning.estimation.estimate import record_keys

E = importlib.import_module("mis_lightning.estimation.estimate")  # the module, not estimate()


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def bce(o, t):
    return nn.functional.binary_cross_entropy_with_logits(o.squeeze(-1), t, reduction="none")


def _ols(n=400, d=3, seed=0, heteroscedastic=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    if heteroscedastic:  # the sandwich differs from the model-based covariance
        noise = noise * (0.5 + X[:, 0].abs())
    y = X @ torch.linspace(-1, 1, d, dtype=torch.float64) + noise
    beta = torch.linalg.solve(X.T @ X, X.T @ y)
    m = nn.Linear(d, 1, bias=False).double()
    m.weight.data = beta[None, :].clone()
    return X, y, beta, m


def test_exact_sandwich_equals_ols_closed_form():
    X, y, beta, m = _ols()
    n = X.shape[0]
    # the first-order sandwich (the finite-sample correction is tested in test_leverage.py)
    est = estimate(m, DataLoader(TensorDataset(X, y), batch_size=64), mse, mode="exact", leverage_correction=False)
    r = y - X @ beta
    A = X.T @ X / n
    B = (X * r[:, None]).T @ (X * r[:, None]) / n
    Ainv = torch.linalg.inv(A)
    S = Ainv @ B @ Ainv
    # Same estimator in float64: agreement to rounding error.
    torch.testing.assert_close(est.sigma["weight"], (torch.diagonal(S) / n).sqrt(), rtol=1e-9, atol=0)
    # Influences: psi_i = A^{-1} x_i r_i (OLS), standardised by sqrt(Sigma_jj).
    psi = (X * r[:, None]) @ Ainv.T
    w_ref = psi / torch.diagonal(S).sqrt()
    # The kept records: the smallest content hashes of the raw (inputs, targets), in key order.
    kept = torch.sort(record_keys([X, y], None, n), stable=True).indices[: est.influence.shape[0]]
    torch.testing.assert_close(est.influence, w_ref[kept], rtol=1e-8, atol=1e-10)
    assert est.diagnostics["gradient_norm_ratio"] < 1e-8
    assert not est.diagnostics["negative_curvature"]


def test_exact_sandwich_can_fail_when_the_weights_are_not_the_minimiser():
    X, y, beta, m = _ols()
    m.weight.data += 0.3  # no longer at the minimum: the diagnostic must say so
    est = estimate(m, DataLoader(TensorDataset(X, y), batch_size=64), mse, mode="exact")
    assert est.diagnostics["not_at_minimum"]


@pytest.mark.parametrize("mode", ["exact", "diagonal"])
def test_distance_to_the_minimum_is_measured_in_the_weights_own_standard_deviations(mode):
    # One weight, least squares: the Newton step is exact and theta-hat's sd is sqrt(Sigma / n),
    # so the weight moved t sd from the fit must read minimum_offset_sd = t (up to V evaluated at
    # the moved weight instead of the fit: the residuals grow by t sd * x, relative O(t^2 / n)).
    # At n = 4000 a 2 sd offset has gradient norm ratio ~2 / sqrt(n) = 0.03 < 0.1, which the
    # ratio-only flag missed.
    X, y, beta, m = _ols(n=4000, d=1)
    n = X.shape[0]
    r = y - X[:, 0] * beta[0]
    sd = math.sqrt(float((X[:, 0] * r).square().mean()) / float(X[:, 0].square().mean()) ** 2 / n)
    dl = DataLoader(TensorDataset(X, y), batch_size=500)
    for t, flagged in ((0.5, False), (2.0, True)):
        moved = nn.Linear(1, 1, bias=False).double()
        moved.weight.data = m.weight.data + t * sd
        est = estimate(moved, dl, mse, mode=mode)
        assert est.diagnostics["gradient_norm_ratio"] < 0.1
        assert est.diagnostics["minimum_offset_sd"] == pytest.approx(t, rel=1e-2)
        assert est.diagnostics["not_at_minimum"] is flagged


@pytest.mark.parametrize("direction", [0, 1], ids=["weakest", "strongest"])
def test_exact_mode_measures_the_newton_step_in_each_weights_own_sd(direction):
    # Two strongly correlated features, the weights moved from the least-squares fit along one of
    # Sigma's eigenvectors. Least squares: the Newton step is the move itself, so the exact
    # estimator must read RMS_j(delta_j / sd_j) with the closed-form sandwich sd (V at the moved
    # weights: O(1 / n) relative). V's diagonal alone (the diagonal estimator's surrogate)
    # reads a different figure (it ignores the correlation). A Mahalanobis form n g'V+g, tried
    # first, read float32 L-BFGS fits 1-8 sd off (vf21b).
    n = 4000
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    X = torch.stack([z[:, 0], 0.995 * z[:, 0] + 0.0999 * z[:, 1]], 1)
    y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    beta = torch.linalg.solve(X.T @ X, X.T @ y)
    r = y - X @ beta
    A = X.T @ X / n
    B = (X * r[:, None]).T @ (X * r[:, None]) / n
    Sigma = torch.linalg.inv(A) @ B @ torch.linalg.inv(A)
    lam, U = torch.linalg.eigh(Sigma)
    delta = 3.0 * math.sqrt(float(lam[direction]) / n) * U[:, direction]
    expected = float((delta / (torch.diagonal(Sigma) / n).sqrt()).square().mean().sqrt())
    m = nn.Linear(2, 1, bias=False).double()
    m.weight.data = (beta + delta)[None, :]
    dl = DataLoader(TensorDataset(X, y), batch_size=500)
    ex = estimate(m, dl, mse, mode="exact")
    assert ex.diagnostics["minimum_offset_covariance"] == "full"
    assert ex.diagnostics["minimum_offset_sd"] == pytest.approx(expected, rel=2e-2)
    assert ex.diagnostics["not_at_minimum"] is (expected > 1)
    dg = estimate(m, dl, mse, mode="diagonal")
    assert dg.diagnostics["minimum_offset_covariance"] == "diagonal"
    assert abs(dg.diagnostics["minimum_offset_sd"] / expected - 1) > 0.5


@pytest.mark.parametrize("c", [1e-4, 3e-5])
@pytest.mark.parametrize("t", [0.5, 3.0])
def test_the_newton_step_along_a_direction_under_the_eigenvalue_floor_reads_its_own_sd(c, t):
    # Two features collinear to c: H's weak eigenvalue 2.6e-9 / 2.3e-10 of the largest, under the
    # sandwich's floor (damping 1e-8), which shrinks sigma along it by |e| / floor. The step must
    # go through that same inverse: with the plain pseudo-inverse (before ln41) the fit moved t
    # true sd along the weak direction read t * floor / |e| (3 sd: 11.5 / 128; 0.5 sd: flagged),
    # as the near-flat scale direction of a LayerNorm's input layer read a converged fit 9.9 sd
    # off. Least squares, so the step is the move; tolerance: V at the moved weights, O(t^2 / n).
    n = 4000
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    X = torch.stack([z[:, 0], math.sqrt(1 - c * c) * z[:, 0] + c * z[:, 1]], 1)
    y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    beta = torch.linalg.solve(X.T @ X, X.T @ y)
    r = y - X @ beta
    Ai = torch.linalg.inv(X.T @ X / n)
    B = (X * r[:, None]).T @ (X * r[:, None]) / n
    lam, U = torch.linalg.eigh(0.5 * (Ai @ B @ Ai + (Ai @ B @ Ai).T))
    delta = t * math.sqrt(float(lam[1]) / n) * U[:, 1]  # Sigma's largest: H's weakest direction
    m = nn.Linear(2, 1, bias=False).double()
    m.weight.data = (beta + delta)[None, :]
    ex = estimate(m, DataLoader(TensorDataset(X, y), batch_size=500), mse, mode="exact").diagnostics
    assert ex["eigenvalues_floored"] == 1
    assert ex["minimum_offset_sd"] == pytest.approx(t, rel=2e-2)
    assert ex["not_at_minimum"] is (t > 1)


def test_diagonal_agrees_with_exact_on_orthogonal_design():
    # Orthogonal design: X^T X = n I, so H is diagonal and the diagonal mode is exact.
    n, d = 256, 4
    H = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(8):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    X = H[:, 1 : d + 1] * 1.0  # Hadamard columns: orthogonal, entries +-1
    g = torch.Generator().manual_seed(1)
    y = X @ torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    beta = torch.linalg.solve(X.T @ X, X.T @ y)
    m = nn.Linear(d, 1, bias=False).double()
    m.weight.data = beta[None, :]
    dl = DataLoader(TensorDataset(X, y), batch_size=50)
    ex = estimate(m, dl, mse, mode="exact", leverage_correction=False)  # the diagonal mode is first order
    for hess in ("exact", "ggn"):
        dg = estimate(m, dl, mse, mode="diagonal", hessian=hess, leverage_correction=False)
        # H = I exactly, but V's off-diagonal terms do not enter sigma_jj with H diagonal.
        torch.testing.assert_close(dg.sigma["weight"], ex.sigma["weight"], rtol=1e-9, atol=0)
        torch.testing.assert_close(dg.influence, ex.influence, rtol=1e-8, atol=1e-10)


def test_ggn_equals_exact_hessian_diagonal_for_glm():
    # For a GLM (logistic regression) the Gauss-Newton matrix IS the Hessian.
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(300, generator=g, dtype=torch.float64) < torch.sigmoid(X[:, 0] - X[:, 1])).double()
    m = nn.Linear(5, 1).double()
    dl = DataLoader(TensorDataset(X, y), batch_size=64)
    a = estimate(m, dl, bce, mode="diagonal", hessian="exact", weight_decay=1e-2)
    b = estimate(m, dl, bce, mode="diagonal", hessian="ggn", weight_decay=1e-2)
    for k in a.sigma:
        torch.testing.assert_close(a.sigma[k], b.sigma[k], rtol=1e-9, atol=0)


def test_hutchinson_error_estimate_is_calibrated():
    from mis_lightning.estimation.estimate import MomentAccumulator

    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 6, generator=g, dtype=torch.float64)
    y = X.sum(-1) + torch.randn(512, generator=g, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    dl = DataLoader(TensorDataset(X, y), batch_size=32)
    ex = MomentAccumulator(m, mse, mode="diagonal", hessian="exact")
    for b in dl:
        ex.update(b)
    P = 16
    hu = MomentAccumulator(m, mse, mode="diagonal", hessian="hutchinson", hutchinson_probes=P,
                           generator=torch.Generator().manual_seed(0))
    for b in dl:
        hu.update(b)
    exact = ex.state["h_sum"]
    approx = hu.state["h_sum"] / P
    sd = hu.state["h2_sum"].sqrt()
    z = (approx - exact) / sd
    # The reported standard error must describe the actual error: |z| < 3 for nearly all
    # coordinates (Gaussian-ish sums of 16 batches x 16 probes), and not be wildly too large.
    assert float((z.abs() < 3).double().mean()) >= 0.9
    assert float(z.square().mean()) > 0.1
    est = hu.finalize()
    assert 0 < est.diagnostics["hutchinson_median_relative_error"]
    assert est.diagnostics["hutchinson_probes"] == P * len(dl)


class _CosAtMaximum(nn.Module):
    """``o = cos(a x_0) + c x_1`` at ``a = 0``: targets near -1 put a local maximum of the loss
    along ``a`` (``H_aa`` ~ -2 under the tests' half squared error, gradient 0, ``H_ac = 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Parameter(torch.zeros(1, dtype=torch.float64)), nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(self.a * x[:, :1]) + self.c * x[:, 1:]


@pytest.mark.parametrize("lean", [False, True], ids=["whole", "lean"])
def test_hutchinson_probe_noise_is_no_negative_curvature_and_a_maximum_still_is(lean, monkeypatch):
    """ln42: a Hutchinson diagonal entry reads negative curvature only below -z of its own
    standard error (z = 3.6 for 3 entries: family-wise 1%). OLS on two correlated features of
    scales 10 and 0.01 (H PD, H_22 = 1e-4 against H_12 = 0.1): probe noise puts h_2 below 0
    (seeds 0 / 2), flagged before."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x1 = torch.randn(n, 1, dtype=torch.float64, generator=g)
    X = torch.cat([10 * x1, 0.01 * (x1 + 0.1 * torch.randn(n, 1, dtype=torch.float64, generator=g))], 1)
    y = X @ torch.tensor([0.1, 5.0], dtype=torch.float64) + 0.3 * torch.randn(n, dtype=torch.float64, generator=g)
    m = nn.Linear(2, 1).double()
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1), y[:, None]).solution[:, 0]
    with torch.no_grad():
        m.weight.copy_(sol[:2][None])
        m.bias.copy_(sol[2:])
    dl = DataLoader(TensorDataset(X, y), batch_size=64)
    kw = {"mode": "diagonal", "hutchinson_probes": 4}
    if lean:  # the large-model finalize (float32 state, chunked): no influences stored
        monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
        kw["budget"] = 1
    for seed in (0, 2):
        d = estimate(m, dl, mse, hessian="hutchinson", generator=torch.Generator().manual_seed(seed), **kw).diagnostics
        assert (d.get("state_dtype") == "float32") is lean
        assert d["hessian_min_diagonal"] < 0 and not d["negative_curvature"], d["hessian_min_diagonal"]
    xc = torch.randn(n, 2, dtype=torch.float64, generator=g)
    yc = -1.0 + 0.5 * xc[:, 1] + 0.3 * torch.randn(n, dtype=torch.float64, generator=g)
    mc = _CosAtMaximum()
    with torch.no_grad():  # c at its least-squares value given a = 0: the gradient is 0
        mc.c.fill_(float(((yc - 1) * xc[:, 1]).sum() / xc[:, 1].square().sum()))
    for hessian in ("hutchinson", "exact"):
        d = estimate(mc, DataLoader(TensorDataset(xc, yc), batch_size=64), mse, hessian=hessian,
                     generator=torch.Generator().manual_seed(0), **kw).diagnostics
        assert d["negative_curvature"] and d["hessian_min_diagonal"] < -1.5, (hessian, d["hessian_min_diagonal"])


def test_loss_that_is_not_per_sample_is_rejected():
    X, y, _, m = _ols()
    with pytest.raises(ValueError, match="per-sample losses of shape"):
        estimate(m, DataLoader(TensorDataset(X, y), batch_size=64), lambda o, t: mse(o, t).mean())


def test_n_below_two_and_bad_batches_are_rejected():
    X, y, _, m = _ols()
    with pytest.raises(ValueError, match="n \\(number of training records\\) must be >= 2"):
        estimate(m, DataLoader(TensorDataset(X[:1], y[:1]), batch_size=1), mse)
    with pytest.raises(TypeError, match="batch_fn"):
        estimate(m, [X[:4]], mse)


def test_streamed_influences_match_stored_ones(monkeypatch):
    # With a tiny memory budget, w is recomputed per parameter; it must equal the stored one.
    # The stored influences of K-FAC layers are psi's, the streamed ones the gradients' (dg31;
    # method.md section 4, not done on the streamed paths): the match is of the gradients'.
    import importlib
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_INFLUENCES", False)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = X[:, 0] + torch.randn(200, generator=g, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    dl = DataLoader(TensorDataset(X, y), batch_size=40)
    full = estimate(m, dl, mse, mode="diagonal", hessian="ggn", num_records=50)
    small = estimate(m, dl, mse, mode="diagonal", hessian="ggn", num_records=50, budget=64)
    assert full.influence is not None and small.influence is None
    for r0, r1, wd in small.iter_influence():
        for name, w in wd.items():
            s, e = full.offsets[name]
            torch.testing.assert_close(w, full.influence[r0:r1, s:e], rtol=1e-9, atol=1e-12)
    for k in full.sigma:
        torch.testing.assert_close(full.sigma[k], small.sigma[k], rtol=1e-9, atol=0)
    assert math.isclose(full.diagnostics["gradient_norm"], small.diagnostics["gradient_norm"], rel_tol=1e-9)


def test_record_keys_do_not_depend_on_the_dtype():
    """The same records in float32, float64 or bfloat16-representable values, and labels as int32
    or int64, get the same keys (the subsample of num_records must not move with a dtype: a
    float64 copy of a model's data drew another 512 of 600 records and moved the figures 1%)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g).to(torch.bfloat16).float()  # exactly representable in all three
    y = torch.randint(0, 4, (50,), generator=g)
    k = record_keys([X, y], None, 50)
    assert torch.equal(k, record_keys([X.double(), y.int()], None, 50))
    assert torch.equal(k, record_keys([X.bfloat16(), y], None, 50))
    assert not torch.equal(k, record_keys([X + 1, y], None, 50))


@pytest.mark.parametrize("mode", ["exact", "diagonal"])
def test_weight_decay_per_parameter(mode, monkeypatch):
    """``weight_decay={name: coefficient}`` (e.g. none on the bias, a common optimizer setup):
    the penalty's curvature enters each parameter's own block. Against references: the same
    coefficient named for every parameter equals the scalar; the exact Hessian is the
    unpenalised one plus diag(coefficients) (closed form for OLS: X'X / n); the diagonal
    estimator's sigma of each parameter equals the scalar run with that parameter's coefficient
    (the diagonal sandwich itself: its K-FAC factor reads the whole layer's decay, the bias's
    included, and is checked against the factored Hessian in tests/test_kfac_sigma.py)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64) + 0.3 + torch.randn(300, generator=g, dtype=torch.float64)
    m = nn.Linear(3, 1).double()
    dl = DataLoader(TensorDataset(X, y), batch_size=64)
    kw = dict(mode=mode, hessian="exact" if mode == "exact" else "ggn", leverage_correction=False)
    names = [n for n, _ in m.named_parameters()]
    uniform = estimate(m, dl, mse, weight_decay=0.2, **kw)
    mapped = estimate(m, dl, mse, weight_decay=dict.fromkeys(names, 0.2), **kw)
    for k in names:
        torch.testing.assert_close(mapped.sigma[k], uniform.sigma[k], rtol=1e-12, atol=0)
    per = estimate(m, dl, mse, weight_decay={"weight": 0.2}, **kw)  # the bias: 0
    assert per.diagnostics["weight_decay_per_parameter"] == {"weight": 0.2, "bias": 0.0}
    if mode == "diagonal":
        zero = estimate(m, dl, mse, weight_decay=0.0, **kw)
        torch.testing.assert_close(per.sigma["weight"], uniform.sigma["weight"], rtol=1e-12, atol=0)
        torch.testing.assert_close(per.sigma["bias"], zero.sigma["bias"], rtol=1e-12, atol=0)
    else:  # sigma^2 = diag(H^-1 V H^-1), H = [X 1]'[X 1] / n + diag(0.2, 0.2, 0.2, 0)
        Z = torch.cat([X, torch.ones(300, 1, dtype=torch.float64)], 1)
        theta = torch.cat([m.weight.detach().reshape(-1), m.bias.detach()])
        r = Z @ theta - y
        Gc = Z * r.unsqueeze(-1)
        Gc = Gc - Gc.mean(0)  # V: the per-record gradients' covariance (the penalty's share cancels)
        H = Z.T @ Z / 300 + torch.diag(torch.tensor([0.2, 0.2, 0.2, 0.0], dtype=torch.float64))
        Hi = torch.linalg.inv(H)
        sig = (Hi @ (Gc.T @ Gc / 300) @ Hi).diagonal().sqrt() / math.sqrt(300)
        torch.testing.assert_close(per.sigma["weight"].reshape(-1), sig[:3], rtol=1e-8, atol=0)
        torch.testing.assert_close(per.sigma["bias"].reshape(-1), sig[3:], rtol=1e-8, atol=0)
    with pytest.raises(KeyError, match="does not have.*'wieght'"):
        estimate(m, dl, mse, weight_decay={"wieght": 0.1}, **kw)
    with pytest.raises(ValueError, match="weight_decay"):
        estimate(m, dl, mse, weight_decay={"weight": -1.0}, **kw)


def test_softmax_symmetry_directions_do_not_make_figures_depend_on_the_batch_size(monkeypatch):
    """Softmax cross-entropy without weight decay: shifting every class's row (and bias) by
    the same vector leaves the loss unchanged, a null direction of H and of V. Floored, the
    damped inverse blew V's rounding along it up to figures that moved with the summation
    order (7e-4 relative between estimation batch sizes 7 and 1,000, and a spurious +3.8% gap
    between the baseline's two forms at one of them); as null directions the figures agree to
    rounding."""
    from mis_lightning import assess

    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = (X[:, :3] + 0.8 * torch.randn(400, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    m = nn.Linear(5, 3).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X), y)
        loss.backward()
        return loss

    opt.step(closure)

    def ce(o, t):
        return nn.functional.cross_entropy(o, t, reduction="none")

    # on the same draws at 1/8 of the Monte Carlo budgets (tests/_small_mc.py: 3.2 -> 2.3 CPU s): the
    # figures' largest difference 6.8e-12 -> 7.5e-12; the weights moved by 1e-7 read 2.0e-8 either way
    mc = small_budgets(monkeypatch)
    got = [assess(m, ["rtn_int4"], DataLoader(TensorDataset(X, y), batch_size=bs), ce, estimation="exact",
                  uncertainty_draws=0, **mc) for bs in (7, 64, 400)]
    assert got[0].diagnostics["hessian_null_directions"] == 6  # 5 weights + 1 bias per class shift
    for r in got[1:]:
        assert r.baseline_leakage == pytest.approx(got[0].baseline_leakage, rel=1e-9)
        assert r.schemes["rtn_int4"].leakage == pytest.approx(got[0].schemes["rtn_int4"].leakage, rel=1e-9)
    assert not any("from the gradient covariance but" in w for r in got for w in r.warnings)


def test_forward_cost_probe_does_not_depend_on_the_attention_layout():
    """``"auto"`` weighs the exact sandwich's cost by the floats of one forward. Measured without
    gradients, nn.MultiheadAttention(batch_first=True) took its fused inference path and read 13x
    fewer floats than the same model with batch_first=False: the estimator (and the headline,
    17% apart) changed with the layout. Measured as the exact sandwich runs it (with gradients),
    both layouts read alike."""
    from mis_lightning.estimation.estimate import forward_floats

    class Attn(nn.Module):
        def __init__(self, batch_first: bool):
            super().__init__()
            self.batch_first = batch_first
            self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 1)

        def forward(self, x):  # x: [B, T, E] either way
            h = x if self.batch_first else x.transpose(0, 1)
            out, _ = self.mha(h, h, h, need_weights=False)
            out = out if self.batch_first else out.transpose(0, 1)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    a, b = Attn(True), Attn(False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 5, 8)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-5, atol=1e-6)
    fa, fb = forward_floats(a, x, 16), forward_floats(b, x, 16)
    assert fa is not None and fb is not None and 0.5 <= fa / fb <= 2.0, (fa, fb)


class _CosFlat(nn.Module):
    """``f(x) = a x + c cos(t)``: ``t`` is flat at the minimum (``t = 0``; ``H_tt = c mean(r) cos t``
    with ``r`` the residual, 0 there) and off it reads ``-c g_c``, a gradient-level term."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.t = (nn.Parameter(torch.zeros((), dtype=torch.float64)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x + self.c * torch.cos(self.t))[:, None]


@pytest.mark.parametrize("lean", [False, True], ids=["whole", "lean"])
def test_the_diagonal_reads_curvature_within_the_hessians_precision_as_the_exact_sandwich(lean, monkeypatch):
    """ln43: the exact Hessian diagonal read negative curvature below -1e-12 of its largest entry
    (rounding alone), while the exact sandwich reads H's precision p (the gradient norm ratio):
    a flat weight off the minimum read "negative curvature" at p = 1.2e-5 (H_tt -4.9e-6 of the largest),
    flagged before. Beyond the resolution (p > 1e-4) such a reading is "saddle not excluded"
    (reported, not called a saddle); a real maximum is negative curvature at any p."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x = torch.randn(n, dtype=torch.float64, generator=g)
    y = 0.7 * x + 1.0 + 0.3 * torch.randn(n, dtype=torch.float64, generator=g)
    sol = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0]
    kw = {"mode": "diagonal", "hessian": "exact"}
    if lean:
        monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
        kw["budget"] = 1
    dl = DataLoader(TensorDataset(x, y), batch_size=64)
    seen = []
    for shift in (5e-6, 1e-3):  # c above its least-squares value: mean residual -shift
        m = _CosFlat()
        with torch.no_grad():
            m.a.fill_(float(sol[0]))
            m.c.fill_(float(sol[1]) + shift)
        d = estimate(m, dl, mse, **kw).diagnostics
        assert (d.get("state_dtype") == "float32") is lean
        assert d["hessian_min_diagonal"] < 0  # H_tt = -c shift
        seen.append((d["gradient_norm_ratio"], d["negative_curvature"], d["curvature_unresolved"]))
    (p0, neg0, unres0), (p1, neg1, unres1) = seen
    assert p0 < 1e-4 and not neg0 and not unres0, seen  # within precision, converged: no false alarm
    assert p1 > 1e-4 and not neg1 and unres1, seen  # within precision, large gradient: said, not a saddle
    assert E.curvature_sign(-5e-3, 1.0, 1e-12, 1e-3)["negative_curvature"]  # beyond p: a saddle


def test_a_saddle_not_excluded_is_warned_and_marked():
    import mis_lightning as ml
    from mis_lightning.report import regime_failures

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, dtype=torch.float64, generator=g)
    y = 0.7 * x + 1.0 + 0.3 * torch.randn(256, dtype=torch.float64, generator=g)
    sol = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0]
    m = _CosFlat()
    with torch.no_grad():  # the exact sandwich's lowest eigenvalue -9.2e-4 of the largest at p = 2.4e-3
        m.a.fill_(float(sol[0]))
        m.c.fill_(float(sol[1]) + 1e-3)
    rep = ml.assess(m, ["bf16"], DataLoader(TensorDataset(x, y), batch_size=256), mse, estimation="exact",
                    uncertainty_draws=0)
    assert not rep.diagnostics["negative_curvature"]  # ln42's cap: "negative curvature" (-9.2e-4 < -1e-4)
    assert any(w.startswith("saddle not excluded: the Hessian's lowest eigenvalue reads -0.00092") for w in rep.warnings)
    assert "saddle not excluded" in rep.rows()[0].get("indicative", "")  # the row's "*"
    assert regime_failures({"curvature_unresolved": True}, 100, 1, None) == ["saddle not excluded"]
    assert regime_failures({"curvature_unresolved": True, "negative_curvature": True}, 100, 1, None) == \
        ["negative curvature"]
