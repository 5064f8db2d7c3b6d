"""Loader batches merged for the estimation pass (estimation/batching.py): the same records in
the same order, only regrouped, so every figure of the estimate is the one of the unmerged
pass up to float64 summation order (tolerance 1e-10 relative: sums of a few hundred float64
terms regrouped; a wrong grouping, a lost or duplicated record moves them by >= 1e-3)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation import batching, estimate
from mis_lightning.estimation.batching import batch_rows, merge_batches

E = importlib.import_module("mis_lightning.estimation.estimate")


def _ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def _batches(sizes, tail=(3,)):
    out, start = [], 0
    for s in sizes:
        x = torch.arange(start, start + s, dtype=torch.float32).reshape(s, 1).expand(s, *tail).contiguous()
        out.append({"x": x, "y": torch.arange(start, start + s)})
        start += s
    return out


def test_merge_batches_concatenates_up_to_the_cap_in_order():
    batches = _batches([4, 4, 4, 4, 4])
    got = list(merge_batches(batches, lambda: 9))
    assert [r for _, r in got] == [8, 8, 4]
    ys = torch.cat([b["y"] for b, _ in got])
    assert torch.equal(ys, torch.arange(20))  # every record once, in order
    assert torch.equal(got[0][0]["x"][:, 0], torch.arange(8, dtype=torch.float32))
    # no cap yet (the consumer has not sized the merge): batches pass as they came
    assert [b is orig for (b, _), orig in zip(merge_batches(batches, lambda: 0), batches)] == [True] * 5


def test_merge_batches_never_merges_what_cannot_be_concatenated():
    a, b = _batches([4, 4])
    wide = {"x": torch.zeros(4, 5), "y": torch.arange(4)}  # another per-record shape (padding)
    names = {"x": torch.zeros(4, 3), "y": ["s"] * 4}  # a non-tensor leaf
    ragged = {"x": torch.zeros(4, 3), "y": torch.arange(3)}  # leaves of different lengths
    assert batch_rows(names) is None and batch_rows(ragged) is None and batch_rows(a) == 4
    got = list(merge_batches([a, wide, b, names, ragged], lambda: 64))
    assert [r for _, r in got] == [4, 4, 4, None, None]
    assert got[1][0] is wide and got[3][0] is names and got[4][0] is ragged
    # a batch larger than the cap passes alone and ends the pending merge
    big = _batches([4, 10])
    assert [r for _, r in merge_batches(big, lambda: 8)] == [4, 10]


class _TF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_merged_estimation_equals_the_unmerged_pass(kind, monkeypatch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "transformer":  # the per-layer program (embedding, attention, norms)
        model = _TF().eval()
        X, Y = torch.randint(0, 11, (96, 5), generator=g), torch.randint(0, 3, (96,), generator=g)
    else:  # the factored nn.Linear path
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X, Y = torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    kw = dict(mode="diagonal", hessian="ggn", num_records=20, dtype=torch.float64)
    merged = estimate(model, loader, _ce, **kw)
    calls = []

    def counted(batches, records):
        for batch, rows in merge_batches(batches, records):
            calls.append(rows)
            yield batch, rows

    monkeypatch.setattr(E, "merge_batches", counted)
    monkeypatch.setattr(E, "_records_per_update", lambda fac, b, *_: 1)
    plain = estimate(model, loader, _ce, **kw)
    assert calls == [8] * 12, calls  # unmerged: one update per loader batch
    calls.clear()
    monkeypatch.setattr(E, "_records_per_update", lambda fac, b, *_: 40)
    again = estimate(model, loader, _ce, **kw)
    assert calls == [8, 40, 40, 8], calls  # the first batch sizes the merge, then up to 40 records
    assert merged.n == plain.n == again.n == 96
    for est in (merged, again):
        for k in plain.names:
            torch.testing.assert_close(est.sigma[k], plain.sigma[k], rtol=1e-10, atol=0)
            torch.testing.assert_close(est._g_mean[k], plain._g_mean[k], rtol=1e-10, atol=1e-14)
        assert est.diagnostics.keys() == plain.diagnostics.keys()
        for k, v in plain.diagnostics.items():
            if isinstance(v, float):
                assert est.diagnostics[k] == pytest.approx(v, rel=1e-8, abs=1e-12), k
        cols = {p: torch.ones(plain.offsets[plain.names[0]][1], 2, dtype=torch.float64) for p in (2, 4)}
        for p, v in est.power_sums(plain.names[0], cols).items():
            torch.testing.assert_close(v, plain.power_sums(plain.names[0], cols)[p], rtol=1e-10, atol=0)


def test_records_per_update_is_bounded_by_the_taps_memory():
    model = _TF().eval()
    acc = E.MomentAccumulator(model, _ce, mode="diagonal", hessian="ggn", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    acc.update((torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)))
    assert acc.records_per_update == E.MERGE_MAX_RECORDS  # small taps: the record cap
    taps = acc.factored  # the per-layer program was used
    assert taps is not None
    acc2 = E.MomentAccumulator(model, _ce, mode="diagonal", hessian="ggn", dtype=torch.float64)
    E_floats = E.MERGE_FLOATS
    try:
        E.MERGE_FLOATS = 1000  # a per-record taps size above the budget / 8 records
        acc2.update((torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)))
    finally:
        E.MERGE_FLOATS = E_floats
    assert 1 <= acc2.records_per_update < 8


def _mse(o, y):
    return 0.5 * (o.squeeze(-1) - y) ** 2


def test_a_small_factored_model_merges_more_records_within_the_float32_bound(monkeypatch):
    """SMALL_MODEL_MERGES (p54b): the factored Linear program of a small model takes
    MERGE_SMALL_RECORDS records per update (the first batch sizes it). Its float32 GEMMs then sum
    4x the records before the float64 accumulation: sigma and the mean gradient within 2e-4
    relative of the 512-record pass (the worst-case float32 summation bound, 2048 u = 1.2e-4 of
    each non-negative sum, sigma a ratio of two such; measured ~1e-7; a lost or doubled batch
    moves them by >= 1e-2)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    X = torch.randn(2304, 4, generator=g)
    loader = DataLoader(TensorDataset(X, X[:, 0] + 0.3 * torch.randn(2304, generator=g)), batch_size=256)
    calls = []
    merge0 = E.merge_batches

    def counted(batches, records):
        for batch, rows in merge0(batches, records):
            calls.append(rows)
            yield batch, rows

    monkeypatch.setattr(E, "merge_batches", counted)
    kw = dict(mode="diagonal", hessian="ggn", num_records=64, dtype=torch.float32)
    small = estimate(model, loader, _mse, **kw)
    assert calls == [256, 2048], calls
    calls.clear()
    monkeypatch.setattr(E, "SMALL_MODEL_MERGES", False)
    plain = estimate(model, loader, _mse, **kw)
    assert calls == [256] + [512] * 4, calls
    for k in plain.names:
        torch.testing.assert_close(small.sigma[k], plain.sigma[k], rtol=2e-4, atol=0)
        torch.testing.assert_close(small._g_mean[k], plain._g_mean[k], rtol=2e-4, atol=1e-7)


def test_small_merges_count_the_batch_floats_not_the_taps_only():
    """SMALL_MODEL_MERGES is for a small model: what an update holds per record, the batch, the
    forward's saved activations and the taps, x MERGE_SMALL_RECORDS within MERGE_SMALL_FLOATS float32's
    bytes. A factored program whose assessed taps are narrow but whose batch is wide (a frozen first
    layer reading 20,000 features: 2048 x 20,001 floats of merged batch, held, concatenated and cast)
    keeps MERGE_MAX_RECORDS (rv54b: it took 2048, the estimation's peak RSS 3.2x); so does one whose
    frozen layers are wide (rv55: Linear(16, 8192), ReLU, Linear(8192, 16), ReLU frozen before an
    assessed Linear(16, 1): 19 tap floats and 17 of batch a record, but the forward saves the frozen
    layers' activations, +256 MB of peak RSS at 2048 records against +32 MB at 512); the 1e5 MLP's
    geometry (256 -> 256 -> 128 -> 1: 1,795 tap floats a record, its float64 batch, 768 floats saved,
    as measured) still merges MERGE_SMALL_RECORDS. The forward's saved bytes are measured on the first
    batch (``FactoredProgram.saved_bytes``): a frozen 1,024-wide layer's activations are in them."""
    from mis_lightning.estimation.linear_factors import FactoredProgram

    b = 8

    def taps(*widths):
        return {str(k): (torch.zeros(b, i), torch.zeros(b, o), torch.zeros(b, o), torch.zeros(b, o), torch.zeros(b))
                for k, (i, o) in enumerate(zip(widths, widths[1:]))}

    narrow = (torch.zeros(b, 16), torch.zeros(b))
    assert E._records_per_update(taps(16, 1), b, narrow, 4 * 16.0) == E.MERGE_SMALL_RECORDS
    assert E._records_per_update(taps(16, 1), b, narrow, None) == E.MERGE_MAX_RECORDS  # (not measured)
    assert E._records_per_update(taps(16, 1), b, (torch.zeros(b, 20000), torch.zeros(b)), 4 * 16.0) \
        == E.MERGE_MAX_RECORDS
    assert E._records_per_update(taps(16, 1), b, narrow, 4 * (2 * 8192 + 32.0)) == E.MERGE_MAX_RECORDS
    assert E._records_per_update(taps(256, 256, 128, 1), b, (torch.zeros(b, 256, dtype=torch.float64),
                                                             torch.zeros(b, dtype=torch.float64)), 4 * 768.0) \
        == E.MERGE_SMALL_RECORDS
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    prog = FactoredProgram(model, _mse, ["4.weight", "4.bias"], torch.float32)
    prog.batch(torch.randn(b, 16), torch.randn(b), b)
    assert prog.saved_bytes is not None and prog.saved_bytes >= 4 * 1024, prog.saved_bytes
    prog.close()


@pytest.mark.parametrize("shuffle, drop_last", [(False, False), (True, True)])
def test_a_tensor_dataset_loader_is_read_by_index_as_its_batches(shuffle, drop_last, monkeypatch):
    """TENSOR_DATASET_BATCHES (p54b): a plain DataLoader over a TensorDataset is read by one index
    per tensor and batch, with no dataset item per record, giving the loader's own batches (the
    same list of tensors, values, dtypes and shapes; shuffled in the same order from the same
    random draws: torch's global stream left where iterating the loader leaves it)."""
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(50, 3, 2, generator=g).double(), torch.randint(0, 4, (50,), generator=g)
    loader = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=shuffle, drop_last=drop_last)
    torch.manual_seed(11)
    want = list(loader)
    state = torch.get_rng_state()
    items = []
    get0 = TensorDataset.__getitem__
    monkeypatch.setattr(TensorDataset, "__getitem__", lambda self, i: items.append(i) or get0(self, i))
    torch.manual_seed(11)
    got = list(batching.loader_batches(loader))
    assert items == []  # no record read one at a time
    assert torch.equal(torch.get_rng_state(), state)
    assert len(got) == len(want) == (6 if drop_last else 7)
    for a, b in zip(got, want):
        assert type(a) is type(b) is list and len(a) == len(b) == 2
        for s, t in zip(a, b):
            assert s.dtype == t.dtype and s.shape == t.shape and s.stride() == t.stride() and torch.equal(s, t)
    # another collate function, a permuted (non-contiguous) tensor: iterated as they are
    other = DataLoader(TensorDataset(X, Y), batch_size=8, collate_fn=lambda rows: rows)
    assert len(list(batching.loader_batches(other))[0]) == 8 and len(items) == 50
    permuted = DataLoader(TensorDataset(X.transpose(1, 2), Y), batch_size=8)
    first = next(batching.loader_batches(permuted))
    assert len(items) == 58 and first[0].is_contiguous() and torch.equal(first[0], X[:8].transpose(1, 2))


def test_record_keys_do_not_depend_on_per_batch_zero_padding():
    """The same sequences padded with zeros to each batch's longest keep their keys (the byte
    weights depend on the position only): otherwise the bottom-k sample, and every figure,
    depended on the batch size. Other content still changes the key."""
    from mis_lightning.estimation.records import record_keys

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (int(n),), generator=g) for n in torch.randint(2, 9, (6,), generator=g)]

    def padded(width):
        tok = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width)
        for r, s in enumerate(seqs):
            tok[r, : len(s)], mask[r, : len(s)] = s, 1.0
        return {"tokens": tok, "mask": mask, "y": torch.arange(len(seqs)) % 2}

    k8, k12, k5000 = (record_keys(padded(w), None, len(seqs)) for w in (8, 12, 5000))
    assert torch.equal(k8, k12) and torch.equal(k8, k5000)  # 5000: weights beyond one block
    assert k8.unique().numel() == len(seqs)
    other = padded(8)
    other["tokens"][0, 0] += 1
    changed = record_keys(other, None, len(seqs))
    assert changed[0] != k8[0] and torch.equal(changed[1:], k8[1:])


def test_record_keys_do_not_depend_on_ignore_index_label_padding():
    """Labels padded with -100 (``F.cross_entropy``'s ``ignore_index``, what language-model
    collators pad labels with) to each batch's longest keep their keys, as zero padding does
    (nu42a: they changed with the batch's longest sequence); an ignore index inside a record
    and a trailing non-negative value still count."""
    from mis_lightning.estimation.records import record_keys

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (int(n),), generator=g) for n in torch.randint(2, 9, (6,), generator=g)]

    def padded(width):
        tok = torch.zeros(len(seqs), width, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100)
        for r, s in enumerate(seqs):
            tok[r, : len(s)], lab[r, : len(s) - 1] = s, s[1:]
        return {"input_ids": tok, "labels": lab}

    k8, k11 = (record_keys(padded(w), None, len(seqs)) for w in (8, 11))
    assert torch.equal(k8, k11) and k8.unique().numel() == len(seqs)
    inner = padded(8)
    inner["labels"][0, 0] = -100  # an ignored token inside the record: other content
    last = padded(8)
    last["labels"][1, -1] = 7  # a record without padding: its last label is content
    ki, kl = record_keys(inner, None, len(seqs)), record_keys(last, None, len(seqs))
    assert ki[0] != k8[0] and torch.equal(ki[1:], k8[1:])
    assert kl[1] != k8[1] and torch.equal(kl[2:], k8[2:])


def _padded_chunk(seqs, width):
    tok = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        tok[r, : len(s)] = s
    return tok


@pytest.mark.parametrize("pytree", [False, True])
def test_stored_records_of_several_padded_lengths_keep_the_bottom_k_with_their_keys(pytree):
    """Records kept as records (``num_records * d > budget``) from batches padded to different
    lengths cannot be one tensor: until nu44a the prune raised "Sizes of tensors must match".
    Each kept record is its batch's row as padded, its key stored beside it (the next prune reads
    them together), and the kept set is the bottom-k of the keys; a record repeated in batches of
    other widths is counted once as a copy."""
    from mis_lightning.estimation.records import prune_bottom_k, record_keys, repeated_records

    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 50, (int(n),), generator=g) for n in torch.randint(2, 9, (30,), generator=g)]
    seqs.append(seqs[4].clone())  # a copy, padded by another batch
    st = {"rec_x": [], "rec_y": [], "rec_key": []}
    def form(part):
        x = _padded_chunk(part, max(len(s) for s in part))
        return {"input_ids": x, "attention_mask": (x != 0).long()} if pytree else x

    for a, b in ((0, 7), (7, 19), (19, 24), (24, 31)):
        x = form(seqs[a:b])
        y = torch.arange(a, b)
        st["rec_x"].append(x)
        st["rec_y"].append(y)
        st["rec_key"].append(record_keys(x, y, b - a))
        prune_bottom_k(st, 12)
    keys = torch.cat(st["rec_key"])
    all_keys = torch.cat([record_keys(form([s]), torch.tensor([i]), 1) for i, s in enumerate(seqs)])
    assert sorted(keys.tolist()) == sorted(all_keys.tolist())[:12]
    assert len(st["rec_x"]) == len(st["rec_y"]) > 1  # several widths kept apart
    # each stored row with the key of its content (the targets name the record)
    stored = torch.cat([record_keys(x, y, y.numel()) for x, y in zip(st["rec_x"], st["rec_y"])])
    assert torch.equal(stored, keys)
    rows = [(x["input_ids"] if pytree else x, y) for x, y in zip(st["rec_x"], st["rec_y"])]
    for x, y in rows:
        for r, i in enumerate(y.tolist()):
            assert torch.equal(x[r, : len(seqs[i])], seqs[i]) and not x[r, len(seqs[i]):].any()
    if not pytree:  # two rows of one sequence padded to other widths: one copy (equal keys need equal targets)
        dup = {"rec_x": [_padded_chunk(seqs[:5], 8), _padded_chunk([seqs[4]], 9)],
               "rec_y": [torch.zeros(5, dtype=torch.long), torch.zeros(1, dtype=torch.long)]}
        dup["rec_key"] = [record_keys(x, y, y.numel()) for x, y in zip(dup["rec_x"], dup["rec_y"])]
        assert repeated_records(dup) == 1


class _PaddedBag(nn.Module):
    """Token ids padded with 0 -> masked mean of their embeddings -> Linear: outputs independent
    of how far a batch padded a record."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(12, 3), nn.Linear(3, 2)

    def forward(self, ids):
        m = (ids != 0).unsqueeze(-1).to(self.emb.weight.dtype)
        return self.head((self.emb(ids) * m).sum(1) / m.sum(1))


def test_assess_on_records_padded_per_batch_within_a_small_budget():
    """The end-to-end case of the test above (nu44a: a Transformer on per-batch padded
    sequences failed at the end of training once ``num_records * d > budget``): the records
    path reads the same figures whatever the batch size, i.e. the padding (1e-9 relative:
    float64 sums of 40 records in other groupings; a lost, doubled or misread record moves
    them by > 1e-3)."""
    from mis_lightning import assess

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 12, (int(n),), generator=g) for n in torch.randint(2, 9, (60,), generator=g)]
    data = [(s, int(s[0] % 2)) for s in seqs]

    def collate(items):
        return _padded_chunk([s for s, _ in items], max(len(s) for s, _ in items)), torch.tensor([y for _, y in items])

    torch.manual_seed(0)
    model = _PaddedBag()
    d = sum(p.numel() for p in model.parameters())
    kw = dict(weight_decay=1e-2, num_records=40, estimation="diagonal", uncertainty_draws=0, budget=40 * d - 1)
    ref = assess(model, ["rtn_int4"], DataLoader(data, batch_size=60, collate_fn=collate), _ce, **kw)
    assert ref.estimation["covariance"] == "independent"  # the records path: no stored influences
    for bs in (5, 16):
        rep = assess(model, ["rtn_int4"], DataLoader(data, batch_size=bs, collate_fn=collate), _ce, **kw)
        assert rep.schemes["rtn_int4"].leakage == pytest.approx(ref.schemes["rtn_int4"].leakage, rel=1e-9)
        assert rep.baseline_leakage == pytest.approx(ref.baseline_leakage, rel=1e-9)


def _padded_graphs(width_atoms, width_edges, fill=0):
    """8 small graphs padded per batch: atoms ``[B, N, 3]``, edge lists ``[B, 2, E]`` (padding edges
    ``fill``), adjacencies ``[B, N, N]``."""
    g = torch.Generator().manual_seed(2)
    graphs = []
    for _ in range(8):
        n, e = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        graphs.append((torch.randn(n, 3, generator=g), torch.randint(0, n, (2, e), generator=g)))
    x = torch.zeros(8, width_atoms, 3)
    ei = torch.full((8, 2, width_edges), fill, dtype=torch.long)
    adj = torch.zeros(8, width_atoms, width_atoms)
    for r, (a, b) in enumerate(graphs):
        x[r, : a.shape[0]], ei[r, :, : b.shape[1]] = a, b
        adj[r, b[0], b[1]] = 1.0
    return {"x": x, "edge_index": ei, "adj": adj}


@pytest.mark.parametrize("fill", [0, -1])
def test_record_keys_do_not_depend_on_padding_along_any_dimension(fill):
    """nu44b: records of several dimensions padded per batch at the end of a dimension other than
    the first (edge lists ``[2, E]``, adjacencies ``[N, N]``) kept their bytes' flat positions, so
    their keys, the bottom-k sample and the figures moved with the batch composition (711 graphs
    batched by 16 and by 128: 1.8% apart). Their bytes are now weighed by their index in every
    dimension; an edge list padded with -1 (a trailing negative run per row) counts as zeros."""
    from mis_lightning.estimation.records import record_keys

    k = record_keys(_padded_graphs(7, 9, fill), None, 8)
    assert torch.equal(k, record_keys(_padded_graphs(12, 30, fill), None, 8))
    assert k.unique().numel() == 8
    other = _padded_graphs(7, 9, fill)
    other["edge_index"][3, 1, 0] += 1  # content: the key of that record only
    changed = record_keys(other, None, 8)
    assert changed[3] != k[3] and torch.equal(changed[:3], k[:3]) and torch.equal(changed[4:], k[4:])
    # a batch without any edge (single atoms): edge lists [B, 2, 0] hash as their zero padding
    # (they raised "torch.cat(): expected a non-empty list of Tensors")
    bare = dict(_padded_graphs(7, 9, fill), edge_index=torch.zeros(8, 2, 0, dtype=torch.long))
    padded = dict(bare, edge_index=torch.full((8, 2, 5), fill, dtype=torch.long))
    assert torch.equal(record_keys(bare, None, 8), record_keys(padded, None, 8))
