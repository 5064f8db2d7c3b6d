"""The estimation pass's memory traffic (es33, issue 13: the 1e7 MLP's estimation at most 2
epochs): the large-model finalisation in cached sub-blocks, the K-FAC factors' reused GEMM
buffers and lazily zeroed sums, the VIF's inverse diagonal by triangular solves. The figures
must not move: each change is checked against the computation it replaced (bitwise where the
operations are the same, to float64 rounding where they are not)."""

from __future__ import annotations

import importlib
import math
import resource

import pytest
import torch
from _live_bytes import LiveBytes  # tests/_live_bytes.py
from _nets import mse_per_record
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs

A = importlib.import_module("mis_lightning.assess")
E = importlib.import_module("mis_lightning.estimation.estimate")
LF = importlib.import_module("mis_lightning.estimation.linear_factors")


def _relu_mlp(n: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 1))
    with torch.no_grad():
        model[2].bias[:30] = -30.0  # 30 of the second layer's 40 units dead: the live-row paths
    x = torch.randn(n, 12)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n)
    return model, DataLoader(TensorDataset(x, y), batch_size=64)


def _lean_estimate(monkeypatch, model, loader, decay: float = 0.0):
    monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)  # the large-model path (_finalize_lean)
    est_cfg, _, _ = stage_configs("assess", None, None, {"estimation": "diagonal", "hessian": "ggn",
                                                        "num_records": 32, "weight_decay": decay,
                                                        "budget": 1000})  # no stored influences
    est = A.run_estimation(model, loader, mse_per_record, est_cfg)
    assert est.diagnostics["state_dtype"] == "float32" and est.diagnostics["kfac_correction"]
    return est


def _same(a, b) -> None:
    for k in a.names:
        for x, y in ((a.sigma[k], b.sigma[k]), (a._g_mean[k], b._g_mean[k]), (a._v_diag[k], b._v_diag[k])):
            assert torch.equal(x, y), k
    da, db = a.diagnostics, b.diagnostics
    assert da.keys() == db.keys()
    for k in da:
        same = da[k] == db[k] or (isinstance(da[k], float) and math.isnan(da[k]) and math.isnan(db[k]))
        assert same, (k, da[k], db[k])


@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_finalize_in_sub_blocks_is_bitwise_the_whole_block_pass(monkeypatch, decay):
    """``_finalize_lean`` runs each ``FINALIZE_CHUNK`` block's float64 element-wise work in
    ``FINALIZE_SUB_CHUNK`` sub-blocks, its float sums over one block buffer, its maxima over the
    sub-blocks' (es33: fresh 32 MB temporaries were ~45% of the 1e7 MLP's estimation, in page
    faults). With one sub-block per block (the former pass) and with odd sub-blocks and blocks
    (offsets crossing parameters, a last short block), the estimate is bitwise the same: sigma,
    the gradient means and variances, and every diagnostic (the gradient norm, the offset
    statistic, the leverage trace, the curvature extremes), with and without weight decay (the
    decay slices per sub-block). Fails on main (no ``FINALIZE_SUB_CHUNK``)."""
    runs = []
    for chunk, sub in ((1 << 22, 1 << 22), (1 << 22, 97), (1000, 1000), (1000, 61)):
        monkeypatch.setattr(E, "FINALIZE_CHUNK", chunk)
        monkeypatch.setattr(E, "FINALIZE_SUB_CHUNK", sub)
        model, loader = _relu_mlp()
        runs.append(_lean_estimate(monkeypatch, model, loader, decay))
    _same(runs[0], runs[1])
    _same(runs[2], runs[3])
    # and blocks of 1,000 weights read the whole-vector sums to float64 rounding only
    assert runs[2].diagnostics["gradient_norm"] == pytest.approx(runs[0].diagnostics["gradient_norm"], rel=1e-12)
    assert runs[2].diagnostics["leverage_trace"] == pytest.approx(runs[0].diagnostics["leverage_trace"], rel=1e-12)


def test_finalize_keeps_its_float64_temporaries_to_two_block_buffers(monkeypatch):
    """The peak of ``_finalize_lean``'s new tensors (the K-FAC correction and the stored
    records' factors left out): its float32 outputs (sigma, the gradient means and variances: 12
    bytes per weight), the two float64 block buffers of its float sums (16 bytes per weight where
    the model is one block) and sub-block temporaries: measured 30 bytes per weight. Before es33
    whole-block float64 temporaries were alive at once: 85 bytes per weight. Bound 36. Fails on
    main (85)."""
    model, loader = _relu_mlp()
    monkeypatch.setattr(E, "FINALIZE_SUB_CHUNK", 64, raising=False)
    peaks: list[int] = []
    original = E.MomentAccumulator._finalize_lean
    kfac = E.MomentAccumulator._kfac_factors

    def measured(self, *a, **k):
        with LiveBytes() as lb:
            out = original(self, *a, **k)
        peaks.append(lb.peak)
        return out

    monkeypatch.setattr(E.MomentAccumulator, "_finalize_lean", measured)
    monkeypatch.setattr(E.MomentAccumulator, "_kfac_factors",
                        lambda self, st, n, diagnostics, apply=None, **kw: kfac(self, st, n, diagnostics, apply=apply, **kw)
                        if apply is None else (diagnostics.update(kfac_correction=True) or {}))
    monkeypatch.setattr(E.MomentAccumulator, "_record_factors", lambda self, records: None)
    est = _lean_estimate(monkeypatch, model, loader)
    assert peaks and max(peaks) / est.d <= 36.0, max(peaks) / est.d


def test_inverse_diagonal_by_triangular_solves_equals_the_cholesky_inverse():
    """``diag((L L^T)^-1)`` by blocked triangular solves of ``L`` (the VIF's factor, half the flops of
    ``torch.cholesky_inverse``; es33): within 1e-12 relative of ``cholesky_inverse``'s diagonal on
    well- and ill-conditioned correlation matrices (condition up to ~1e8), widths below, at and
    across the block (several blocks and a short last one). Fails on main (ImportError)."""
    from mis_lightning.estimation.linear_factors import (
        INVERSE_DIAGONAL_BLOCK,
        _cholesky_inverse_diagonal,
    )

    g = torch.Generator().manual_seed(3)
    for k in (1, 7, INVERSE_DIAGONAL_BLOCK, INVERSE_DIAGONAL_BLOCK + 1, 2 * INVERSE_DIAGONAL_BLOCK + 37):
        for spread in (0.0, 4.0):
            X = torch.randn(3 * k + 5, k, generator=g, dtype=torch.float64) * torch.logspace(0, spread, k, dtype=torch.float64)
            X[:, -1] += 0.999 * X[:, 0] if k > 1 else 0.0  # a near-collinear pair
            S = X.T @ X
            sd = S.diagonal().sqrt()
            R = S / sd.unsqueeze(0) / sd.unsqueeze(1)
            L = torch.linalg.cholesky(R)
            ref = torch.cholesky_inverse(L).diagonal()
            torch.testing.assert_close(_cholesky_inverse_diagonal(L), ref, rtol=1e-12, atol=0.0)


def test_kfac_vif_with_cholesky_in_place_equals_the_explicit_inverse():
    """``kfac_variance_inflation`` at lambda = 0 (each factor's Cholesky in place of its live
    block, the pseudo-inverse forming the block again where the Cholesky fails): the VIF equals
    ``H_jj (H^+)_jj`` from the explicit Kronecker product (1e-9 relative) with both factors well
    conditioned, with a singular ``G`` (duplicated output units: the pseudo-inverse) and with dead
    rows and columns (exactly 1). A refactor guard (main passes it too)."""
    g = torch.Generator().manual_seed(5)
    n, p, q = 400, 6, 5
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    X[:, 2] = 0.0  # an input never active
    for dup in (False, True):
        D = torch.randn(n, q, generator=g, dtype=torch.float64)
        D[:, 4] = 0.0  # a dead unit
        if dup:
            D[:, 1] = D[:, 0]  # G singular: the pseudo-inverse route
        Af, Gf = X.T @ X, D.T @ D
        got = LF.kfac_variance_inflation(Af, Gf, n)
        la, lg = [0, 1, 3, 4, 5], [0, 1, 2, 3]
        H = torch.kron(Gf[lg][:, lg] / n, Af[la][:, la] / n)
        Hp = torch.linalg.pinv(H, hermitian=True, rtol=1e-10)
        ref = (H.diagonal() * Hp.diagonal()).reshape(len(lg), len(la)).clamp_min(1.0)
        torch.testing.assert_close(got[lg][:, la], ref, rtol=1e-9, atol=0.0)
        assert bool((got[4] == 1.0).all()) and bool((got[:, 2] == 1.0).all())


def test_kth_smallest_by_partition_is_kthvalue():
    """``estimate._kth_smallest`` (the rounding-gradient reference quantile, by a partition in
    place instead of ``kthvalue``'s copy with int64 indices) is ``kthvalue``'s value, NaN and inf
    included (NaN sorts last in both), for float32 and float64. Fails on main (ImportError)."""
    g = torch.Generator().manual_seed(2)
    for dt in (torch.float32, torch.float64):
        for n in (1, 2, 9, 1000):
            x = torch.randn(n, generator=g, dtype=dt)
            x[::4] = 0.0
            if n > 5:
                x[1], x[3] = math.nan, math.inf
            for k in sorted({1, (n + 1) // 2, n, max(1, math.ceil(0.9 * n))}):
                a, b = float(x.kthvalue(k).values), E._kth_smallest(x.clone(), k)
                assert a == b or (math.isnan(a) and math.isnan(b)), (dt, n, k, a, b)


def test_large_state_is_zeroed_lazily_and_behaves_as_torch_zeros():
    """``estimate._zeros`` (the large sums of the estimation's state, es33): equal to
    ``torch.zeros``, writable, saved and loaded, deep-copied, and its pages not written at
    creation (minor page faults for 64 MB: most of a ReLU MLP's sums stay zero and are never
    touched): < 1/8 of its pages at creation. Fails on main (ImportError)."""
    import copy
    import io

    shape = (2048, 4096)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    z = E._zeros(shape, torch.float64)
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # torch.zeros writes all 16,384 pages (which, in a long-lived process, may already be mapped:
    # no fault to compare against); the lazy tensor's are fresh and untouched
    assert (f1 - f0) * 8 < z.numel() * 8 // 4096, f1 - f0
    ref = torch.zeros(shape, dtype=torch.float64)
    assert z.shape == shape and z.dtype == torch.float64 and z.is_contiguous() and torch.equal(z, ref)
    z[5, 7] = 2.0
    z.add_(1.0)
    buf = io.BytesIO()
    torch.save(z, buf)
    buf.seek(0)
    back = torch.load(buf)
    assert torch.equal(back, z) and torch.equal(copy.deepcopy(z), z) and float(z.sum()) == z.numel() + 2.0
    small = E._zeros((3,), torch.float32)
    assert torch.equal(small, torch.zeros(3))


def test_kfac_sums_in_reused_buffers_equal_fresh_products():
    """The K-FAC factors' and the weights' per-batch sums written through the program's reused
    GEMM buffers (``Scratch``; es33) equal the fresh products of es32's path exactly: two batches
    (the buffers then hold the last layer's products), layers of other widths sharing a buffer,
    float32 products added into float64 sums by row blocks, and a mostly dead layer (the live
    blocks). Fails on main (no ``Scratch``)."""
    model, loader = _relu_mlp(n=128)
    names = [k for k, _ in model.named_parameters()]
    prog = LF.FactoredProgram(model, mse_per_record, names, torch.float32)
    assert isinstance(prog.scratch, LF.Scratch)
    kron = prog.kron_layers()
    into = {m: (torch.zeros(p, p, dtype=torch.float64), torch.zeros(q, q, dtype=torch.float64))
            for m, (p, q) in kron.items()}
    ref = {m: [torch.zeros(p, p, dtype=torch.float64), torch.zeros(q, q, dtype=torch.float64)]
           for m, (p, q) in kron.items()}
    wn = [w for w, _ in prog.layout.values()]
    sums = {w: tuple(torch.zeros(model.get_parameter(w).numel()) for _ in range(3)) for w in wn}
    ref_sums = {w: [torch.zeros(model.get_parameter(w).numel()) for _ in range(3)] for w in wn}
    for xb, yb in loader:
        fac = prog.batch(xb, yb, xb.shape[0])
        prog.kron_sums(fac, torch.float64, into=into)
        for m in kron:
            x, _, _, delta, L = fac[m]
            a = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
            ref[m][0] += LF._live_gram(a, a).to(torch.float64)
            ref[m][1] += LF._live_gram(L.unsqueeze(-1) * delta, delta).to(torch.float64)
        prog.batch_sums(fac, torch.float32, into=sums)
        ret, _ = prog.batch_sums(fac, torch.float32)
        for w in wn:
            for r, t in zip(ref_sums[w], ret[w]):
                r += t
    for m in kron:
        assert torch.equal(into[m][0], ref[m][0]) and torch.equal(into[m][1], ref[m][1]), m
    for w in wn:
        for a, r in zip(sums[w], ref_sums[w]):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)  # live rows: MKL's blocking of a smaller GEMM
    prog.close()


class _Reused(nn.Module):
    """A Linear layer whose weight the forward also uses outside the layer (F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) + 0.5 * nn.functional.linear(x, self.a.weight))


def test_factored_path_verifies_its_gradient_on_the_first_records_and_still_finds_a_reused_weight():
    """``FactoredProgram`` checks its factored gradient against autograd's once, on the first
    ``VERIFY_RECORDS`` records of the first batch in a forward and backward of their own (es33:
    the weight gradients and products over the whole merged batch were ~0.25 s of the 1e7 MLP's
    first call), then runs the batch without weight gradients: the private copy sees 64 then
    200 records (main: 200 once). A weight also used outside its layer is still found (its
    extra terms are on every record): ``NotImplementedError``, the per-layer path's cue."""
    torch.manual_seed(1)
    x, y = torch.randn(200, 12), torch.randn(200)
    model, _ = _relu_mlp()
    prog = LF.FactoredProgram(model, mse_per_record, [k for k, _ in model.named_parameters()], torch.float32)
    seen: list[int] = []
    prog.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    prog.batch(x, y, 200)
    prog.batch(x, y, 200)
    assert seen == [LF.VERIFY_RECORDS, 200, 200]
    prog.close()
    reused = _Reused()
    prog = LF.FactoredProgram(reused, mse_per_record, [k for k, _ in reused.named_parameters()], torch.float32)
    with pytest.raises(NotImplementedError, match="also used outside layer"):
        prog.batch(torch.randn(200, 6), y, 200)
    prog.close()
