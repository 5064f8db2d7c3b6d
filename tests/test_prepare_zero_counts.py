"""The scoring's scheme preparation counts the zeros of a torchao release without keeping its
dequantized tensor (fx35): ``zero_counts_only`` makes the torchao grid readers run torchao's own
``dequantize()`` on slabs of whole rows and keep only the count. The reference is the whole
tensor's ``dequantize()`` (what the readers kept before): the count must equal its zeros, and
every other field of the grid must be what the plain ``apply`` gives."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("torchao")

from mis_lightning.quantization import get_scheme  # noqa: E402
from mis_lightning.quantization.base import dequantized_kept, zero_counts_only  # noqa: E402

TB = importlib.import_module("mis_lightning.quantization.torchao_backend")
ROW_BLOCK_SCHEMES = ["int8_weight_only", "int8_dynamic_activation_int8_weight", "intx_weight_only_int4",
                     "intx_weight_only_int4_g32", "float8_weight_only"]


def _net(dtype: torch.dtype) -> torch.nn.Module:
    """Two Linear layers with exact zeros: an all-zero row (float8: scale 0, NaN codes repaired to
    0), weights that round to code 0, and exact zero weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 32))
    with torch.no_grad():
        w = net[0].weight
        w[3] = 0.0  # a whole row
        w[5, ::3] = 0.0  # exact zeros in a live row
        w[7] *= 1e-3
        w[7, 0] = 1.0  # the rest of this row rounds to code 0
    return net.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ROW_BLOCK_SCHEMES)
def test_zero_counts_equal_the_whole_release(monkeypatch, name, dtype):
    monkeypatch.setattr(TB, "_ZERO_COUNT_SLAB", 3 * 64 + 5)  # 3 rows a slab: uneven last slab
    net = _net(dtype)
    scheme = get_scheme(name)
    full = scheme.apply(net)
    assert dequantized_kept()
    with zero_counts_only():
        assert not dequantized_kept()
        counted = scheme.apply(net)
    assert dequantized_kept()
    assert set(full.grids) == set(counted.grids) and full.grids
    for k, g in full.grids.items():
        c = counted.grids[k]
        assert g.zero_count is None and tuple(g.dequantized.shape) == g.shape
        zeros = g.dequantized.numel() - int(torch.count_nonzero(g.dequantized))
        assert c.zero_count == zeros and c.dequantized.numel() == 0
        assert c.same_cells(g) and c.bits_per_weight == g.bits_per_weight
        assert c.product_dtype == g.product_dtype and c.release_dtype == g.release_dtype
    assert full.grids["0.weight"].zero_count is None
    # the test's zeros are there: the all-zero row at least (40 or 64 weights)
    g0 = full.grids["0.weight"]
    assert g0.dequantized.numel() - int(torch.count_nonzero(g0.dequantized)) >= 64
    assert full.notes == counted.notes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cast_zero_counts_equal_the_whole_release(name, dtype):
    """The dtype casts count the zeros of the cast weights (no float32 copy of them)."""
    net = _net(dtype)
    with torch.no_grad():
        net[2].weight[0, :4] = torch.tensor([1e-44, -1e-44, -0.0, float("nan")])  # cast to (-)0; NaN
    scheme = get_scheme(name)
    full = scheme.apply(net)
    with zero_counts_only():
        counted = scheme.apply(net)
    assert set(full.grids) == set(counted.grids) and len(full.grids) == 4  # weights and biases
    for k, g in full.grids.items():
        c = counted.grids[k]
        zeros = g.dequantized.numel() - int(torch.count_nonzero(g.dequantized))
        assert c.zero_count == zeros and c.dequantized.numel() == 0 and c.same_cells(g)
    g2 = full.grids["2.weight"]
    assert g2.dequantized.numel() - int(torch.count_nonzero(g2.dequantized)) >= 3


def test_per_tensor_blocks_keep_the_whole_release():
    """A per-tensor scale spans all rows: no slabs, the whole ``dequantize()`` as before."""
    net = _net(torch.float32)
    scheme = get_scheme("int8_weight_only", granularity="per_tensor")
    with zero_counts_only():
        res = scheme.apply(net)
    for g in res.grids.values():
        assert g.zero_count is None and tuple(g.dequantized.shape) == g.shape


@pytest.mark.parametrize("on_codes", [True, False])
def test_scoring_counts_zeros_without_the_whole_release(monkeypatch, on_codes):
    """``score_schemes`` prepares the torchao schemes without dequantizing a whole weight (on the
    codes: none at all), and the report's zero fractions are those of the whole release."""
    from torchao.quantization import Int8Tensor

    import mis_lightning as ml

    shapes: list[tuple[int, ...]] = []
    real = Int8Tensor.dequantize

    def spy(self, *a, **k):
        shapes.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(TB, "_ZERO_COUNT_SLAB", 128)
    monkeypatch.setattr(TB, "ZEROS_FROM_CODES", on_codes)
    monkeypatch.setattr(Int8Tensor, "dequantize", spy)
    net = _net(torch.float32)
    x = torch.randn(64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].sum(-1)), batch_size=32)
    rep = ml.assess(net, ["int8_weight_only"], loader, lambda out, t: 0.5 * (out[:, 0] - t) ** 2,
                    estimation="diagonal", num_records=16, uncertainty_draws=0)
    assert all(s[0] * s[1] <= 128 for s in shapes), shapes  # slabs of at most 128 elements
    assert bool(shapes) != on_codes  # (the test's scales are normal: every count on the codes)
    full = get_scheme("int8_weight_only").apply(net)
    for k, g in full.grids.items():
        zeros = g.dequantized.numel() - int(torch.count_nonzero(g.dequantized))
        assert rep.schemes["int8_weight_only"].layers[k].zero_fraction == zeros / g.numel


def test_schemes_share_the_scale_facts_they_reveal_alike():
    """Inside ``scale_facts_shared`` grids revealing the same weights with the same block size and
    rule share one computation (the same tensors); the facts equal a fresh computation; a weight
    changed in place (its version) or another block size computes its own."""
    from mis_lightning.quantization.base import scale_facts_shared

    net = _net(torch.float32)
    shared: list = []
    with scale_facts_shared(shared):
        a = get_scheme("int8_weight_only").apply(net).grids["0.weight"]
    with scale_facts_shared(shared):
        b = get_scheme("float8_weight_only").apply(net).grids["0.weight"]
        g32 = get_scheme("intx_weight_only_int4_g32").apply(net).grids["0.weight"]
    fresh = get_scheme("float8_weight_only").apply(net).grids["0.weight"]
    assert b.revealed is a.revealed and b.support is not None and a.support is not None
    assert b.support[0] is a.support[0] and b.support[1] is a.support[1]
    assert fresh.revealed is not a.revealed and torch.equal(fresh.revealed, a.revealed)
    assert torch.equal(fresh.support[0], a.support[0]) and torch.equal(fresh.support[1], a.support[1])
    assert g32.revealed is not a.revealed and g32.block_size != a.block_size
    with torch.no_grad():
        net[0].weight[0, 0] *= 4.0  # the version moves: computed again, on the new weights
    with scale_facts_shared(shared):
        c = get_scheme("int8_weight_only").apply(net).grids["0.weight"]
    assert c.revealed is not a.revealed
    assert torch.equal(c.revealed, get_scheme("int8_weight_only").apply(net).grids["0.weight"].revealed)


def test_scoring_reveals_each_weight_once_for_schemes_alike(monkeypatch):
    """Three per-row absmax schemes in one scoring call: one scale-facts computation per weight."""
    import mis_lightning as ml

    qbase = importlib.import_module("mis_lightning.quantization.base")
    calls: list[tuple] = []
    real = qbase.scale_facts
    monkeypatch.setattr(qbase, "scale_facts", lambda t, bs, rule, *a, **k: calls.append((tuple(t.shape), bs))
                        or real(t, bs, rule, *a, **k))
    net = _net(torch.float32)
    x = torch.randn(64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].sum(-1)), batch_size=32)
    rep = ml.assess(net, ["int8_weight_only", "intx_weight_only_int4", "float8_weight_only"], loader,
                    lambda out, t: 0.5 * (out[:, 0] - t) ** 2, estimation="diagonal", num_records=16,
                    uncertainty_draws=0)
    assert all(r.error is None for r in rep.schemes.values())
    assert sorted(calls) == sorted([((40, 64), (1, 64)), ((32, 40), (1, 40))]), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int8_weight_only", "intx_weight_only_int4_g32", "intx_weight_only_int8_g32_asym",
                                  "float8_weight_only"])
def test_zero_counts_on_codes_where_the_scales_prove_them(monkeypatch, name, dtype):
    """The zeros counted on the codes (``ZEROS_FROM_CODES``) are the release's, and where a
    block's scale is too small to prove a non-zero code's value non-zero (a row of ~1e-41: float8's
    scale is subnormal there and small codes' values underflow to 0) the weight is dequantized."""
    seen: list[int | None] = []
    real = TB._zeros_from_codes
    monkeypatch.setattr(TB, "_zeros_from_codes", lambda w, g: seen.append(real(w, g)) or seen[-1])
    net = _net(torch.float32)
    with torch.no_grad():
        net[0].weight[9] *= 1e-41  # float32 only: the other dtypes flush it to 0
        net[0].weight[11] *= 1e-6
    net = net.to(dtype)
    scheme = get_scheme(name)
    full = scheme.apply(net)
    with zero_counts_only():
        counted = scheme.apply(net)
    for k, g in full.grids.items():
        zeros = g.dequantized.numel() - int(torch.count_nonzero(g.dequantized))
        assert counted.grids[k].zero_count == zeros, k
        if name.endswith("_asym"):  # (codes equal to non-zero zero points: the release's zeros)
            assert bool(g.zero_point.any()) and zeros > 0
    assert any(n is not None for n in seen)  # counted on the codes
    if name == "float8_weight_only":
        assert seen[0] is None  # the tiny (or all-zero) rows' scales prove nothing: dequantized


def test_zeros_on_codes_only_where_code_differences_are_exact_in_the_weight_dtype():
    # rv46: torchao dequantizes (q - zp) in the weight's dtype; int16 codes 1001 and 1000 round to the
    # same bfloat16 (8 significant bits), so code 1001 at zero point 1000 dequantizes to 0 though the
    # codes differ: counted on the codes, 1 zero where the release has 2. Wider codes than 8 bits are
    # not counted on the codes (None: the caller dequantizes). Fails before (1).
    from types import SimpleNamespace

    q = torch.tensor([[1001, 1000, 5, 7]], dtype=torch.int16)
    w = SimpleNamespace(qdata=q, scale=torch.ones(1, 1), zero_point=torch.full((1, 1), 1000, dtype=torch.int16),
                        dtype=torch.bfloat16)
    release = ((q.to(torch.bfloat16) - w.zero_point.to(torch.bfloat16)) * w.scale).to(torch.bfloat16)
    zeros = int((release == 0).sum())
    assert zeros == 2
    got = TB._zeros_from_codes(w, 4)
    assert got is None or got == zeros
    # 8-bit codes stay counted on the codes, and equal the release's zeros
    q8 = torch.tensor([[101, 100, 5, 100]], dtype=torch.int8)
    w8 = SimpleNamespace(qdata=q8, scale=torch.ones(1, 1), zero_point=torch.full((1, 1), 100, dtype=torch.int8),
                         dtype=torch.bfloat16)
    rel8 = ((q8.to(torch.bfloat16) - w8.zero_point.to(torch.bfloat16)) * w8.scale).to(torch.bfloat16)
    assert TB._zeros_from_codes(w8, 4) == int((rel8 == 0).sum()) == 2


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cast_slabs_equal_the_whole_cast(monkeypatch, name):
    """``CAST_SLABS`` (p50d): the casts write each parameter and count its zeros slab by slab (here 64
    elements; the biases are one partial slab) on the 16-bit patterns. The reference is the whole
    cast (the switch off): the copy's values bit for bit (a NaN's payload too: torch's vectorised and
    scalar half-to-float conversions give it different bits, so a slab is a multiple of the vector
    loop's width, as the whole tensor's loop is), the zero counts (+-0 zero, NaN not), the overflow
    note (a weight beyond fp16's range in one slab; bf16: none)."""
    casts = importlib.import_module("mis_lightning.quantization.casts")

    net = _net(torch.float32)
    with torch.no_grad():
        w = net[2].weight
        w[0, :6] = torch.tensor([1e-44, -1e-44, -0.0, float("nan"), 7e4, -1e-8])  # (-)0; NaN; fp16: inf, -0
        w[1, 3] = float("inf")
    res = {}
    for slabs in (False, True):
        monkeypatch.setattr(casts, "CAST_SLABS", slabs)
        monkeypatch.setattr(casts, "_CAST_SLAB", 64)
        with zero_counts_only():
            res[slabs] = get_scheme(name).apply(net)
    a, b = res[False], res[True]
    assert a.notes == b.notes and ("inf" in " ".join(a.notes)) == (name == "fp16")
    for k, g in a.grids.items():
        assert b.grids[k].zero_count == g.zero_count and b.grids[k].same_cells(g)
    assert a.grids["2.weight"].zero_count >= 3
    for (k, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32)), k


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_casts_read_the_model_itself_where_no_release_is_read(monkeypatch, name):
    """``casts.CAST_WITHOUT_COPY`` (p56b): inside ``release_unread`` (and ``zero_counts_only``) a cast
    reads the model's own weights slab by slab instead of casting a deep copy: no copy, ``model=None``,
    nothing of the model written (its weights, a floating buffer, its train mode), and the grids, zero
    counts (+-0 zero, NaN not) and overflow note (fp16) of the copy's path. Off: the copy, as before. A
    composite scheme's call of the cast's ``_quantize_copy`` on its own copy still writes it."""
    base = importlib.import_module("mis_lightning.quantization.base")
    casts = importlib.import_module("mis_lightning.quantization.casts")

    copies: list[int] = []
    real_copy = base.private_copy
    monkeypatch.setattr(base, "private_copy", lambda *a, **k: copies.append(1) or real_copy(*a, **k))
    monkeypatch.setattr(casts, "_CAST_SLAB", 64)  # several slabs a weight; the biases one partial slab
    net = _net(torch.float32).train()
    with torch.no_grad():
        net[2].weight[0, :6] = torch.tensor([1e-44, -1e-44, -0.0, float("nan"), 7e4, -1e-8])
    net[0].register_buffer("shift", torch.tensor([1.0 + 2.0 ** -20, 3e-8]))  # changed by a cast
    before = {k: t.detach().clone() for k, t in [*net.named_parameters(), *net.named_buffers()]}
    with zero_counts_only():
        ref = get_scheme(name).apply(net)
        assert len(copies) == 1 and ref.model is not None
        with base.release_unread():
            got = get_scheme(name).apply(net)
            assert len(copies) == 1 and got.model is None  # no copy
            monkeypatch.setattr(casts, "CAST_WITHOUT_COPY", False)
            off = get_scheme(name).apply(net)
            assert len(copies) == 2 and off.model is not None
    assert ref.model[0].shift.tolist() != before["0.shift"].tolist()  # (the copy's buffer is cast)
    for k, t in [*net.named_parameters(), *net.named_buffers()]:  # the model bit for bit
        assert torch.equal(t.detach().view(torch.int32), before[k].view(torch.int32)), k
    assert net.training
    assert got.notes == ref.notes and ("inf" in " ".join(got.notes)) == (name == "fp16")
    assert set(got.grids) == set(ref.grids) and len(got.grids) == 4
    for k, g in ref.grids.items():
        assert got.grids[k].zero_count == g.zero_count and got.grids[k].same_cells(g), k
        assert got.grids[k].release_dtype == g.release_dtype and got.grids[k].bits_per_weight == g.bits_per_weight
    assert got.unquantized == ref.unquantized
    assert ref.grids["2.weight"].zero_count >= 3
    # a composite scheme calls a candidate's _quantize_copy on its own copy: written, as the copy path's
    monkeypatch.setattr(casts, "CAST_WITHOUT_COPY", True)
    twin = base.private_copy(net, "a composite scheme's copy")
    with zero_counts_only(), base.release_unread():
        get_scheme(name)._quantize_copy(twin)
    for (k, p), q in zip([*ref.model.named_parameters(), *ref.model.named_buffers()],
                         [*twin.parameters(), *twin.buffers()]):
        assert torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32)), k


def test_scoring_without_utility_copies_no_cast(monkeypatch):
    """``score_schemes`` without a utility reads no release: the casts make no copy, and the report is the
    copy's path's (switch off) field for field; with a utility the copy is made and evaluated."""
    import mis_lightning as ml
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig

    base = importlib.import_module("mis_lightning.quantization.base")
    casts = importlib.import_module("mis_lightning.quantization.casts")
    copies: list[int] = []
    real_copy = base.private_copy
    monkeypatch.setattr(base, "private_copy", lambda *a, **k: copies.append(1) or real_copy(*a, **k))
    net = _net(torch.float32)
    x = torch.randn(64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].sum(-1)), batch_size=32)
    loss = lambda out, t: 0.5 * (out[:, 0] - t) ** 2  # noqa: E731
    est = run_estimation(net, loader, loss, EstimationConfig(mode="diagonal", num_records=16))
    reps = {}
    for on in (True, False):
        monkeypatch.setattr(casts, "CAST_WITHOUT_COPY", on)
        copies.clear()
        reps[on] = ml.score_schemes(est, net, ["fp16"], uncertainty_draws=0).to_json()
        assert len(copies) == (0 if on else 1)
    assert reps[True] == reps[False]
    copies.clear()
    rep = ml.score_schemes(est, net, ["fp16"], uncertainty_draws=0, utility_fn=lambda m: {"loss": 1.0})
    assert len(copies) == 1 and rep.schemes["fp16"].utility == {"loss": 1.0}
