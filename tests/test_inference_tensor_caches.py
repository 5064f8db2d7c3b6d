"""The caches keyed on tensors' version counters, given inference tensors (made under
``torch.inference_mode``: no version counter; reading ``_version`` raises "Inference tensors do not
track version counter"): each entry point gives the numbers of the same call on ordinary tensors,
bit for bit, and never a stale entry (functional/versions.py, hy50; session 49 fixed
``table_cell_moments`` alone: tests/test_table_inference_mode.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mis_lightning.functional import table_boundaries
from mis_lightning.quantization import get_scheme

F64 = torch.float64


def _inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _fields(mm) -> list[torch.Tensor]:
    return [getattr(mm, f) for f in ("kappa", "mean_abs", "m4", "coverage")]


def test_table_boundaries_on_an_inference_value_table():
    """``per_table`` (the run / layout / variance / cube tables of a value table) read the table's
    version counter: an inference value table raised."""
    g = torch.Generator().manual_seed(0)
    th = torch.randn(3000, generator=g, dtype=F64) * 0.05
    values = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], dtype=F64)
    sc = torch.full((3000,), 0.05, dtype=F64)
    ref = table_boundaries(th, values, sc, 2)
    v_inf = _inference(values)
    for _ in range(2):  # the second call: where an entry is kept
        assert torch.equal(table_boundaries(th, v_inf, sc, 2), ref)
    # written in place (inference mode allows it): the new values are read, not a kept entry
    with torch.inference_mode():
        v_inf.mul_(2.0)
    assert torch.equal(table_boundaries(th, v_inf, sc, 2), table_boundaries(th, values * 2.0, sc, 2))


def test_interp_table_of_an_inference_table_and_under_inference_mode():
    """``interp_table`` kept the last tensor object's table by its version counter (an inference
    value table raised), and an interpolation table built inside inference mode ran the table
    path's own caches on inference tensors (raised): now the same table and numbers."""
    from mis_lightning.functional import interp as I
    from mis_lightning.functional.formats import format_values

    values = format_values(torch.float8_e4m3fn).to(F64)
    ref = I.interp_table(values)
    assert ref is not None
    v_inf = _inference(values)
    for _ in range(2):
        assert I.interp_table(v_inf) is ref  # keyed by the values
    with torch.inference_mode():
        v_inf.mul_(-1.0)  # written in place: read anew (the same table: it is symmetric)
        v_inf[0] = 0.5
    assert I.interp_table(v_inf) is None  # no longer symmetric: no interpolation table
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4000, generator=g, dtype=F64) - 0.5) * 200.0
    # one octave of s (each built octave is ~0.5 CPU s, twice: t53), some elements covered
    # (|x| small enough for the own cell), the others left to the exact path
    s = 2.0 ** torch.empty(4000, dtype=F64).uniform_(0.0, 1.0, generator=g)
    want = I.InterpTable(values).moments(x, s)  # a fresh table: built in the call
    with torch.inference_mode():
        got = I.InterpTable(values).moments(x, s)
    assert 0 < int(want[0].sum()) < want[0].numel()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "float8_weight_only",
           "bf16", "rtn_int4", "int8_dynamic_activation_int8_weight"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))


@pytest.mark.parametrize("name", SCHEMES)
def test_a_grid_made_under_inference_mode_scores_as_one_made_outside(model, name):
    """``scheme.apply(model)`` under inference mode (a validation loop, a user's ``with
    torch.inference_mode():``) makes the grids' scales and codes inference tensors; the grids'
    chunk facts, block expansions and scale checks keyed on them read their version counters:
    every ``moments`` call raised. Now the numbers of a grid made outside, twice over."""
    ref = get_scheme(name).apply(model).grids
    with torch.inference_mode():
        made = get_scheme(name).apply(model).grids
    assert ref.keys() == made.keys() and ref
    g = torch.Generator().manual_seed(1)
    for p, grid in made.items():
        th = dict(model.named_parameters())[p].detach().to(F64).reshape(-1)
        sg = torch.rand(th.numel(), generator=g, dtype=F64) * 1e-2 + 1e-4
        n = th.numel()
        want = _fields(ref[p].moments(th, sg, 0, n))
        want_kappa = ref[p].moments(th, sg, 0, n, kappa_only=True).kappa
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(_fields(grid.moments(th, sg, 0, n)), want)), p
            assert torch.equal(grid.moments(th, sg, 0, n, kappa_only=True).kappa, want_kappa), p
            with torch.inference_mode():  # and called inside inference mode, on inference weights
                got = _fields(grid.moments(_inference(th), _inference(sg), 0, n))
            assert all(torch.equal(a, b) for a, b in zip(got, want)), p


def test_power_cache_on_inference_activations():
    """The estimation's power cache (linear_factors.PowerCache) keys its powers on the
    activations' version counter: inference activations raised; an in-place change of them is seen."""
    from mis_lightning.estimation.linear_factors import PowerCache

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g, dtype=F64)
    want = PowerCache().scaled_power32(x, 3)
    x_inf, cache = _inference(x), PowerCache()
    for _ in range(2):
        assert torch.equal(cache.scaled_power32(x_inf, 3), want)
    with torch.inference_mode():
        x_inf.mul_(3.0)
    assert torch.equal(cache.scaled_power32(x_inf, 3), PowerCache().scaled_power32(x * 3.0, 3))
    keys = (x_inf, 3)
    assert cache.chunk_setup(*keys) is not cache.chunk_setup(*keys)  # nothing kept for an inference tensor
    assert cache.chunk_setup(x, 3) is cache.chunk_setup(x, 3)


def _regression():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(96, 1, generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
    return m.eval(), DataLoader(TensorDataset(x, y), batch_size=32)


def _inference_twin(m: nn.Module) -> nn.Module:
    """The same model built and loaded under inference_mode (deployment code's pattern): every
    parameter and buffer an inference tensor, the parameters requiring grad."""
    with torch.inference_mode():
        mi = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        mi.load_state_dict(m.state_dict())
    assert all(t.is_inference() for t in (*mi.parameters(), *mi.buffers()))
    assert all(p.requires_grad for p in mi.parameters())
    return mi.eval()


def _mse(out, t):
    return ((out - t) ** 2).sum(-1)


def _figures(rep):
    return [(k, s.leakage, s.error) for k, s in rep.schemes.items()], rep.baseline_leakage, rep.d, rep.n


_FRONT_SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "bf16", "rtn_int4"]
_FRONT_KW = dict(num_records=32, uncertainty_draws=0, weight_decay=1e-2)


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside_inference_mode"])
def test_assess_on_a_model_whose_parameters_are_inference_tensors(inside):
    """A model loaded under inference_mode (hy50: select_params' isfinite raised "abs(): functions
    with out=... arguments don't support automatic differentiation", inside inference mode or
    not): the report of its ordinary twin, bit for bit, and the model untouched (its tensors the
    same objects, still inference tensors, same values)."""
    from mis_lightning import assess

    m, loader = _regression()
    ref = _figures(assess(m, _FRONT_SCHEMES, loader, _mse, **_FRONT_KW))
    mi = _inference_twin(m)
    before = {k: (v, v.clone()) for k, v in mi.state_dict(keep_vars=True).items()}
    if inside:
        with torch.inference_mode():
            got = _figures(assess(mi, _FRONT_SCHEMES, loader, _mse, **_FRONT_KW))
    else:
        got = _figures(assess(mi, _FRONT_SCHEMES, loader, _mse, **_FRONT_KW))
    assert got == ref
    after = mi.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (obj, val) in before.items():
        assert after[k] is obj and obj.is_inference() and torch.equal(obj, val), k


def test_metric_on_a_model_whose_parameters_are_inference_tensors():
    """MISIndicator on the inference-tensor twin (updates inside inference_mode, as a Lightning
    validation loop runs them): the figures of the ordinary model's Metric, bit for bit."""
    from mis_lightning import MISIndicator

    m, loader = _regression()

    def run(model, inside):
        met = MISIndicator(model, _mse, _FRONT_SCHEMES, **_FRONT_KW)
        with torch.inference_mode(inside):
            for b in loader:
                met.update(b)
        met.compute()
        return _figures(met.report)

    ref = run(m, False)
    assert run(_inference_twin(m), False) == ref
    assert run(_inference_twin(m), True) == ref
