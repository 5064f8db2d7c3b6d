"""A 16-bit cast's sd-0 weights that are not point masses (``functional.table.SD_ZERO_APART``): ties
(on an edge of their own cell) and weights within the point-mass margin of an edge get their moments
from ``table.sd_zero_moments`` instead of the table call, which then holds the live weights alone
(``ParamGrid._own_moments``; the split held for the pool call, ``quantization.base._sd_zero_split``).

Tolerance: none. The change is exact by construction (each element's moments are its own, whatever
its call holds; a tie's are the windowed path's on it alone), so every field is compared bit for bit
(NaN at the same places) with the table call's and with the switch off; the ties' and frozen weights'
kappa also against the reference sums (``table_reference_moments``) within the fast path's documented
1e-13.
"""

from __future__ import annotations

import pytest
import torch

import mis_lightning.quantization.base as qb
from mis_lightning.functional import table as T
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.casts import cast_cell_values, representable_values

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")
FLOOR = torch.finfo(F64).tiny


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, NaN at the same places."""
    return x.shape == y.shape and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


def _sd_zero_weights(layout: T.TableLayout, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """float32 sd-0 weights of every kind the table call meets: ties on interior edges (subnormal
    and top cells too), one float32 ulp either side of an edge (frozen: any nonzero distance is
    over 8.5 tiny sds), ordinary weights, the unbounded top cells, both signs."""
    g = torch.Generator().manual_seed(seed)
    m = layout.mids.numel()
    idx = torch.cat([torch.randint(1, m - 1, (60,), generator=g), torch.tensor([1, m - 2, m // 2, m // 2 - 1])])
    ties = layout.mids[idx].float()
    up = torch.nextafter(ties, torch.full_like(ties, float("inf")))
    down = torch.nextafter(ties, torch.full_like(ties, -float("inf")))
    top = torch.tensor([7e4, -7e4, 3e38, -3e38] if dtype == torch.float16 else [3e38, -3e38], dtype=torch.float32)
    plain = torch.randn(40, generator=g) * 0.05
    return torch.cat([ties, up, down, top, plain]).to(F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_sd_zero_moments_are_the_table_calls(dtype, kappa_only):
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    z = _sd_zero_weights(layout, dtype, 1)
    # as the table call gives them beside live weights (sd spanning 0: settled; some spilling on fp16)
    live = torch.randn(3000, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.05
    th = torch.cat([live, z])
    sg = torch.cat([torch.exp(torch.linspace(-3.0, 10.0, live.numel(), dtype=F64)), torch.zeros_like(z)])
    T._TIE_MOMENTS.clear()  # (either route fills it: here the table call's, then read by the other)
    call = T.table_cell_moments(th, sg, values, torch.ones_like(th), kappa_only=kappa_only)
    got = T.sd_zero_moments(z, values, kappa_only)
    assert got is not None
    for f in FIELDS:
        assert _same(getattr(got, f), getattr(call, f)[live.numel():]), (dtype, f)
    # ... and with the ties' numbers computed by sd_zero_moments itself (an empty cache)
    T._TIE_MOMENTS.clear()
    fresh = T.sd_zero_moments(z, values, kappa_only)
    for f in FIELDS:
        assert _same(getattr(fresh, f), getattr(got, f)), (dtype, f)
    ref = T.table_reference_moments(z, torch.zeros_like(z), values, torch.ones_like(z))
    assert float((got.kappa - ref.kappa).abs().max()) <= 1e-13
    tie = torch.isin(z, layout.mids)
    assert bool((got.kappa[~tie] == 0).all()) and bool((got.kappa[tie] > 0).all())  # frozen, ties 2/pi


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_zero_moments_decline(dtype, monkeypatch):
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    z = _sd_zero_weights(layout, dtype, 3)
    assert T.sd_zero_moments(z, values) is not None
    lowest = torch.cat([z, layout.mids[:1]])  # on the lowest edge: neither frozen nor a tie
    assert T.sd_zero_moments(lowest, values) is None
    assert T.sd_zero_moments(torch.cat([z, torch.tensor([float("nan")], dtype=F64)]), values) is None
    f8 = representable_values(torch.float8_e4m3fn).to(F64)
    assert T.sd_zero_moments(torch.zeros(3, dtype=F64), f8) is None  # not a 16-bit cast's table
    with torch.inference_mode():
        assert T.sd_zero_moments(z, values) is None
    monkeypatch.setattr(T, "SD_ZERO_APART", False)
    assert T.sd_zero_moments(z, values) is None


def _cast_chunk(scheme: str):
    """A cast's grid on a seeded Linear(128, 512): 7 rows in 8 sd 0 (dead units), among them ties
    (moved onto an edge of their own cell) and weights one float32 ulp off an edge; the live rows'
    sd from far below a cell to past fp16's top."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 512)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    theta = lin.weight.detach().reshape(-1).to(F64).clone()
    c = theta.numel()
    layout = T.table_layout(g.values, torch.device("cpu"))
    dead = torch.nonzero((torch.arange(512) % 8 != 3).repeat_interleave(128)).squeeze(-1)
    cell = layout.cells(theta)
    edge = layout.padded[cell]  # the own cell's lower edge
    on, near = dead[::61], dead[30::67]
    theta[on] = edge[on]
    theta[near] = torch.nextafter(edge[near].float(), torch.tensor(float("inf"))).double()
    gen = torch.Generator().manual_seed(1)
    live = (torch.arange(512) % 8 == 3).repeat_interleave(128)
    sigma = torch.where(live, torch.exp(torch.empty(c, dtype=F64).uniform_(-12.0, 12.0, generator=gen)),
                        torch.zeros_like(theta))
    return g, theta, sigma


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_own_moments_take_the_sd_zero_weights_apart(scheme, monkeypatch):
    """Main (full and kappa-only) and pool calls on a chunk mostly of point masses: every field bit
    for bit the switch off's; the table call sees no sd-0 weight (fails without the change), and the
    pool call reads the main's split (one sd_zero_moments per chunk)."""
    g, theta, sigma = _cast_chunk(scheme)
    c = theta.numel()
    seen: list[torch.Tensor] = []
    table_call = qb.table_cell_moments

    def spy(th, sg, *a, **k):
        seen.append(sg.clone())
        return table_call(th, sg, *a, **k)

    made: list[int] = []
    sdz = T.sd_zero_moments

    def count(*a, **k):
        made.append(1)
        return sdz(*a, **k)

    monkeypatch.setattr(qb, "table_cell_moments", spy)
    monkeypatch.setattr(T, "sd_zero_moments", count)
    calls = [dict(sigma=sigma), dict(sigma=sigma, kappa_only=True), dict(sigma=sigma / 2 ** 0.5, kappa_only=True)]
    out: dict[bool, list] = {}
    for on in (False, True):
        monkeypatch.setattr(T, "SD_ZERO_APART", on)
        qb.release_chunk_facts()
        seen.clear()
        made.clear()
        out[on] = [g.moments(theta, start=0, end=c, **kw) for kw in calls]
        if on:
            assert seen and all(bool((s > FLOOR).all()) for s in seen)  # no sd-0 weight in a table call
            assert len(made) == 2  # the full call, the kappa-only main; its pool reads the held split
        else:
            assert any(bool((s <= FLOOR).any()) for s in seen)  # (the case holds sd-0 weights that are not point masses)
    for kw, a, b in zip(calls, out[False], out[True]):
        for f in ("kappa",) if kw.get("kappa_only") else FIELDS:
            assert _same(getattr(a, f), getattr(b, f)), (scheme, f, kw.get("kappa_only"))
    qb.release_chunk_facts()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_zero_moments_of_an_infinite_weight_decline_quietly(dtype):
    """An infinite sd-0 weight is neither frozen nor a tie: ``None`` (the table call), without numpy's
    ``RuntimeWarning`` from ``inf - inf`` reaching the user (rv52)."""
    import warnings

    values = cast_cell_values(dtype)
    for v in (float("inf"), -float("inf")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert T.sd_zero_moments(torch.tensor([0.25, v], dtype=F64), values) is None
