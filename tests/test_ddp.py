"""DDP: two CPU processes (gloo) give the result of one process over all the data.

Why they agree: every Metric state is a sum over records (reduced with ``"sum"``) except the
stored records, which are the bottom-``num_records`` by a content hash on every process and
after the ``"cat"`` sync (see :mod:`mis_lightning.metric`); the only difference is the order of
floating-point summation, hence a 1e-9 relative tolerance in float64.
"""

from __future__ import annotations

import importlib
import json
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_metric import _data, _SelfAssessing
from torch import nn

from mis_lightning import MISIndicator

SCHEMES = ["rtn_int8", "rtn_int4", "rtn_int2"]
CASES = {
    "exact": {"estimation": "exact", "num_records": 37},
    "ggn": {"estimation": "diagonal", "hessian": "ggn", "num_records": 37},
}


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(301, 5, generator=g)
    y = torch.tanh(X[:, 0]) - X[:, 1] + 0.3 * torch.randn(301, generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    return X, y, model


def _summary(metric):
    return {k: {f: float(v[f]) for f in ("leakage", "mis", "d_eff", "baseline_leakage",
                                         "leakage_p10", "leakage_p90")}
            for k, v in metric.compute().items()} | {"n": metric.report.n}


def metric_workloads(rank: int, out_dir: str) -> None:
    """The metric workloads of one rank of the running gloo world (``world``: run by
    tests/_ddp_world.py's ``MetricWorkloads`` at the end of the Lightning fit): the uneven shards
    of ``CASES`` (``rank{k}.json``) and the empty rank of ``EMPTY_CASES`` (``empty_rank{k}.json``)."""
    torch.set_num_threads(1)
    X, y, model = _setup()
    # uneven shards, different batch sizes on each process
    lo, hi, bs = (0, 130, 32) if rank == 0 else (130, 301, 50)
    res = {}
    for name, kw in CASES.items():
        met = MISIndicator(model, mse, SCHEMES, uncertainty_draws=4, **kw)
        for a in range(lo, hi, bs):
            met.update(X[a : min(a + bs, hi)], y[a : min(a + bs, hi)])
        res[name] = _summary(met)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    res = {}
    for name, kw in EMPTY_CASES.items():
        met = MISIndicator(model, mse, ["rtn_int4"], uncertainty_draws=0, num_records=16, **kw)
        if rank == 0:  # rank 1 sees no record at all
            for a in range(0, 301, 50):
                met.update(X[a : a + 50], y[a : a + 50])
        res[name] = [float(met.compute()["rtn_int4"]["leakage"]), met.report.n]
    with open(os.path.join(out_dir, f"empty_rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    with open(os.path.join(out_dir, f"auto_rank{rank}.json"), "w") as fh:
        json.dump(auto_workloads(rank), fh)
    with open(os.path.join(out_dir, f"padded_rank{rank}.json"), "w") as fh:
        json.dump(padded_workload(rank), fh)
    with open(os.path.join(out_dir, f"classes_rank{rank}.json"), "w") as fh:
        json.dump(multiclass_workload(rank), fh)
    with open(os.path.join(out_dir, f"leaves_rank{rank}.json"), "w") as fh:
        json.dump(output_leaves_workload(rank), fh)
    with open(os.path.join(out_dir, f"shards_rank{rank}.json"), "w") as fh:
        json.dump(first_batches_workload(rank), fh)
    with open(os.path.join(out_dir, f"choice_rank{rank}.json"), "w") as fh:
        json.dump(choice_workload(rank), fh)
    with open(os.path.join(out_dir, f"residual_rank{rank}.json"), "w") as fh:
        json.dump(residual_workload(rank), fh)
    with open(os.path.join(out_dir, f"union_rank{rank}.json"), "w") as fh:
        json.dump(residual_union_workload(rank), fh)


EMPTY_CASES = {
    "exact": {"estimation": "exact"},
    "ggn": {"estimation": "diagonal", "hessian": "ggn"},
    "records_not_grads": {"estimation": "diagonal", "hessian": "ggn", "budget": 10},  # s_rec_x / s_rec_y
}


def make_owner_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A module whose Metric assesses the module itself, sent to both ranks of ``world``, and
    its data (tests/test_metric.py's ``_SelfAssessing``)."""
    X, y = _data(n=200)
    torch.manual_seed(0)
    return _SelfAssessing(), X, y


@pytest.fixture(scope="module")
def owner_and_data():
    """``make_owner_and_data()``, shared by ``world`` and the test reading the owner."""
    return make_owner_and_data()


def run_world(path: Path, owner: torch.nn.Module, X_own: torch.Tensor, y_own: torch.Tensor) -> SimpleNamespace:
    """ONE two-process world for every check of this module (a spawned world costs two process
    starts and imports, ~5 CPU s each, and each rank's first estimation ~2 s more): Lightning's
    ddp_spawn (2 CPU ranks, gloo) fitting ``Regressor`` with the callback, whose ranks also run,
    through tests/_ddp_world.py's ``MetricWorkloads``, the pickled self-assessing ``owner`` at
    unpickling (before the world opens: ``owner_rank{k}.pt``) and ``metric_workloads`` in the
    open world after the fit (``metric/``). ``path`` gets the run's files; returns the main
    process's ``trainer`` and ``train`` loader."""
    import pytorch_lightning as pl
    from _ddp_world import DestroyWorldAtExit, MetricWorkloads  # tests/_ddp_world.py
    from pytorch_lightning.loggers import CSVLogger
    from test_callback import FAST, Regressor, loaders

    from mis_lightning import MISCallback
    from mis_lightning.app.job import EpochProgress

    torch.set_num_threads(1)
    (path / "metric").mkdir()
    pl.seed_everything(0)
    train, val = loaders(n_train=101)  # odd: the DistributedSampler pads one record
    # assessed after every validation epoch, with an early-stopping callback monitoring a utility
    # figure: it is measured on rank 0 and must reach every rank (rank 1 raised "not available")
    cb = MISCallback(SCHEMES, loss_fn=mse, uncertainty_draws=2, num_records=64, every_n_val_epochs=1,
                     **FAST)  # see test_callback
    stop = pl.callbacks.EarlyStopping(monitor="mis/rtn_int8/utility/loss", mode="min", patience=5)
    workloads = MetricWorkloads(path / "metric", owner, X_own, y_own)
    trainer = pl.Trainer(
        strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=2,
        logger=CSVLogger(str(path)), callbacks=[cb, stop, EpochProgress(None), workloads, DestroyWorldAtExit(path)],
        enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(path),
    )
    trainer.fit(Regressor(), train, val)
    return SimpleNamespace(path=path, trainer=trainer, train=train)


@pytest.fixture(scope="module")
def world(tmp_path_factory, owner_and_data):
    """The one two-process world of this module (``run_world``; spawned once: ``--dist loadfile``
    runs this module on one xdist worker). Every test here reads it."""
    return run_world(tmp_path_factory.mktemp("ddp_world"), *owner_and_data)


def test_metric_two_processes_equal_one(world):
    r0 = json.loads((world.path / "metric" / "rank0.json").read_text())
    r1 = json.loads((world.path / "metric" / "rank1.json").read_text())
    X, y, model = _setup()
    for name, kw in CASES.items():
        met = MISIndicator(model, mse, SCHEMES, uncertainty_draws=4, **kw)
        for a in range(0, 301, 64):
            met.update(X[a : a + 64], y[a : a + 64])
        single = _summary(met)
        assert r0[name]["n"] == r1[name]["n"] == single["n"] == 301
        for scheme in SCHEMES:
            for f, v in single[scheme].items():
                # The interval's ends are order statistics of 4 draws of a release whose coarse
                # cells make it position-dominated (rtn_int2 on this untrained MLP): draws near a
                # cell boundary amplify the estimate's 1e-14 rounding (batch composition alone:
                # 6.6e-10 at rtn_int2's lower end, lv25's probe ddp_rounding2.py, not kept; the
                # headline 5e-14), so 1e-8 there
                rel = 1e-8 if f in ("leakage_p10", "leakage_p90") else 1e-9
                assert r0[name][scheme][f] == pytest.approx(v, rel=rel, abs=1e-12), (name, scheme, f)
                assert r1[name][scheme][f] == pytest.approx(v, rel=rel, abs=1e-12), (name, scheme, f)


def test_metric_with_a_rank_that_saw_no_record(world):
    """Empty "cat" states used to be gathered as 1-d float32 against 2-d float64/int64 ones,
    which aborted the gloo job; now the empty rank changes nothing (1e-9: summation order)."""
    r = [json.loads((world.path / "metric" / f"empty_rank{k}.json").read_text()) for k in range(2)]
    X, y, model = _setup()
    for name, kw in EMPTY_CASES.items():
        met = MISIndicator(model, mse, ["rtn_int4"], uncertainty_draws=0, num_records=16, **kw)
        met.update(X, y)
        single = float(met.compute()["rtn_int4"]["leakage"])
        for k in range(2):
            assert r[k][name][1] == 301, (name, k)
            assert r[k][name][0] == pytest.approx(single, rel=1e-9), (name, k)


def test_metric_whose_auto_choice_adds_states_at_the_first_batch(world):
    """The K-FAC states "auto" adds at the first batch (nu42b) are synced like the others: two
    ranks on uneven shards equal one process, and a rank that saw no record takes the others'
    choice and states (before, such a rank held none of them: the gathers' order differed). 1e-9:
    float64 summation order."""
    single = auto_workloads(None)
    assert single["split"][2:] == ["diagonal", True]
    for k in range(2):
        r = json.loads((world.path / "metric" / f"auto_rank{k}.json").read_text())
        for name in AUTO_SHARDS:
            assert r[name][1:] == [300, "diagonal", True], (name, k)
            assert r[name][0] == pytest.approx(single[name][0], rel=1e-9), (name, k)


def test_a_metric_assessing_its_owner_crosses_spawn(world, owner_and_data):
    """Through torch.multiprocessing.spawn (ddp_spawn) a Metric assessing its owner module died
    in the child with "unable to resize file" (a generator-state tensor made in __getstate__ was
    freed before the child mapped it). torch.multiprocessing unpickles tensors into shared
    memory: every process given the same pickled Metric (ddp_spawn sends each rank the same
    module; here both ranks of ``world``) summed its records into one storage, the parent's
    included, so each rank held the global sums and the sync doubled them (Lightning ddp_spawn,
    2 CPU processes: leakage 0.0748 instead of one process's 0.1061; vf21): each unpickled
    Metric owns its states, and the parent's is left as it was. Same float64 operations: equal
    to 1e-12 relative. Here the owner travels as ddp_spawn sends it: inside the Trainer's
    callbacks (tests/_ddp_world.py's ``MetricWorkloads``), each rank updating it at unpickling,
    before the world opens. (The pickle round trip in one process: tests/test_metric.py.)"""
    owner, X, y = owner_and_data
    fresh = MISIndicator(owner, mse, ["rtn_int4"], uncertainty_draws=0, num_records=32)
    fresh.update(X, y)
    ref = float(fresh.compute()["rtn_int4"]["leakage"])
    for k in range(2):
        child = torch.load(world.path / "metric" / f"owner_rank{k}.pt")
        assert child["n"] == 200 and child["leakage"] == pytest.approx(ref, rel=1e-12), k
    assert int(owner.mis.s_n) == 0  # the parent's states untouched by the children
    owner.mis.update(X, y)
    assert int(owner.mis.s_n) == 200


AUTO_SHARDS = {"split": ((0, 130), (130, 300)), "empty_rank1": ((0, 300), (0, 0))}


def auto_workloads(rank: int | None) -> dict:
    """``"auto"`` moving from the exact to the diagonal sandwich at the first batch (a
    convolution's measured cost, its bounds set to 0 here): the Metric registers the K-FAC
    factors' states then, on the processes that saw records (nu42b). One output per record, so
    the Gauss-Newton directions are exact, not sampled per batch (with sampled ones the factors
    depend on the split, as Hutchinson's probes do). Each case of ``AUTO_SHARDS``: this rank's
    records (``rank=None``: every record, one process) -> ``[leakage, n, estimator mode,
    kfac_correction]``."""
    E = importlib.import_module("mis_lightning.estimation.estimate")  # (the package's `estimate` is the function)

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 2, 16, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 1))
    with torch.no_grad():
        y = model(X).squeeze(-1) + 0.3 * torch.randn(300, generator=g)
    saved = E.EXACT_REUSE_MAX_COST, E.RESIDUAL_MAX_COST
    E.EXACT_REUSE_MAX_COST = E.RESIDUAL_MAX_COST = 0.0
    try:
        res = {}
        for name, shards in AUTO_SHARDS.items():
            lo, hi = (0, 300) if rank is None else shards[rank]
            met = MISIndicator(model, mse, ["rtn_int4"], num_records=64, uncertainty_draws=0,
                               num_training_records=300)
            for a in range(lo, hi, 50):
                met.update(X[a:min(a + 50, hi)], y[a:min(a + 50, hi)])
            out = met.compute()
            res[name] = [float(out["rtn_int4"]["leakage"]), met.report.n, met.accumulator.mode,
                         met.report.diagnostics.get("kfac_correction")]
        return res
    finally:
        E.EXACT_REUSE_MAX_COST, E.RESIDUAL_MAX_COST = saved


def padded_workload(rank: int | None) -> list:
    """Sequences padded per batch (test_batching's ``_PaddedBag`` on token ids padded with 0 to each
    batch's longest) stored as records (``num_records * d > budget``): rank 0 reads records 0-29
    in batches of 7 (several widths), rank 1 records 30-59 in one batch (another width);
    ``rank=None``: all 60 in one batch. ``[leakage, n, stored chunk shapes after compute]``."""
    from test_batching import _ce, _padded_chunk, _PaddedBag

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 12, (int(k),), generator=g) for k in torch.randint(2, 9, (60,), generator=g)]
    y = torch.tensor([int(q[0] % 2) for q in seqs])
    torch.manual_seed(0)
    model = _PaddedBag()
    d = sum(p.numel() for p in model.parameters())
    met = MISIndicator(model, _ce, ["rtn_int4"], estimation="diagonal", num_records=40, budget=40 * d - 1,
                       weight_decay=1e-2, uncertainty_draws=0)
    lo, hi, bs = {None: (0, 60, 60), 0: (0, 30, 7), 1: (30, 60, 30)}[rank]
    for a in range(lo, hi, bs):
        b = min(a + bs, hi)
        met.update(_padded_chunk(seqs[a:b], max(len(q) for q in seqs[a:b])), y[a:b])
    out = met.compute()
    return [float(out["rtn_int4"]["leakage"]), met.report.n, [list(t.shape) for t in met.s_rec_x]]


def test_metric_on_records_padded_to_several_lengths(world):
    """Records padded per batch to other lengths on each rank, kept as records (the budget): the
    gather cannot take them as one tensor (nu44a: ``torch.cat`` raised "Sizes of tensors must
    match"); each is gathered zero-padded and cut back to its own shape, so two ranks equal one
    process (1e-9: float64 summation order), and each rank's own records stay as they were."""
    single = padded_workload(None)
    for k in range(2):
        r = json.loads((world.path / "metric" / f"padded_rank{k}.json").read_text())
        assert r[1] == 60 and r[0] == pytest.approx(single[0], rel=1e-9), k
        widths = {shape[1] for shape in r[2]}
        assert len(widths) >= (2 if k == 0 else 1) and all(shape[0] > 0 for shape in r[2])


# -- Lightning ddp_spawn with the callback -------------------------------------------------------
def test_callback_under_ddp_spawn_writes_one_report(world):
    """The callback under Lightning's ddp_spawn (``run_world``): one report, the utility figure
    reaching every rank, the step and epoch the training ended on."""
    from mis_lightning.app.job import trained_epoch, trained_step

    tmp_path, trainer, train = world.path, world.trainer, world.train
    # the app logs its report at the step training ended on: the main process's trainer says 0
    # under ddp_spawn (vf21: the report row at step 0, step 3 in one process)
    assert trainer.global_step == 0
    # each rank ended its gloo world before its interpreter's finalization (the flake's cause)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    n_batches = -(-51 // train.batch_size)  # 51 records per rank after the sampler's padding
    assert trained_step(trainer) == 2 * n_batches
    assert trained_epoch(trainer) == 1  # the last epoch trained, 0-based (the CSV's epoch column)
    assert "_mis_lightning_global_step" not in trainer.callback_metrics  # not left for others to read
    reports = list(tmp_path.rglob("mis_report.json"))
    assert len(reports) == 1
    data = json.loads(reports[0].read_text())
    assert "error" not in data, data.get("error")
    assert data["n"] == 101  # the unpadded dataset, not 2 x 51
    assert set(data["schemes"]) == set(SCHEMES)
    assert all(s["utility"] for s in data["schemes"].values())
    rows = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("mis/rtn_int8/leakage")
    assert sum(1 for r in rows[1:] if r.split(",")[col] != "") == 2  # once per validation epoch (rank 0)


# -- several classes -----------------------------------------------------------------------------
CLASS_CASES = {
    "exact": {"estimation": "exact"},
    "ggn": {"estimation": "diagonal", "hessian": "ggn"},        # 5 Gauss-Newton directions, exact
    "ggn_mc": {"estimation": "diagonal", "hessian": "ggn_mc"},  # labels sampled by record content
}


def _ce6(o, t):
    return torch.nn.functional.cross_entropy(o, t, reduction="none")


def multiclass_workload(rank: int | None) -> dict:
    """A 6-class softmax MLP (5-6-6, d = 78) on 240 records: rank 0 reads records 0-99 in batches
    of 32, rank 1 records 100-239 in batches of 50; ``rank=None``: all in batches of 64, one
    process. Each case of ``CLASS_CASES`` -> ``[leakage of rtn_int4, baseline leakage, n, hessian]``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(240, 5, generator=g)
    y = (X @ torch.randn(5, 6, generator=g) + torch.randn(240, 6, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    lo, hi, bs = {None: (0, 240, 64), 0: (0, 100, 32), 1: (100, 240, 50)}[rank]
    res = {}
    for name, kw in CLASS_CASES.items():
        met = MISIndicator(model, _ce6, ["rtn_int4"], num_records=48, uncertainty_draws=0, weight_decay=1e-2,
                           num_training_records=240, covariance="independent", **kw)
        for a in range(lo, hi, bs):
            met.update(X[a:min(a + bs, hi)], y[a:min(a + bs, hi)])
        out = met.compute()
        res[name] = [float(out["rtn_int4"]["leakage"]), float(out["rtn_int4"]["baseline_leakage"]), met.report.n,
                     met.report.estimation["hessian"]]
    return res


def test_metric_over_several_classes_two_processes_equal_one(world):
    """Softmax over 6 classes (carried from session 44): the multi-output sums (the exact Hessian,
    the exact and the sampled Gauss-Newton diagonals, the record sample) synced over two ranks on
    uneven shards equal one process (1e-9: float64 summation order; the sampled labels are drawn
    by record content, so the split does not move them)."""
    single = multiclass_workload(None)
    assert [v[2:] for v in single.values()] == [[240, "exact"], [240, "ggn"], [240, "ggn_mc"]]
    for k in range(2):
        r = json.loads((world.path / "metric" / f"classes_rank{k}.json").read_text())
        for name in CLASS_CASES:
            assert r[name][2:] == single[name][2:], (name, k)
            assert r[name][0] == pytest.approx(single[name][0], rel=1e-9), (name, k)
            assert r[name][1] == pytest.approx(single[name][1], rel=1e-9), (name, k)


# -- output leaves sorted apart on the ranks (ux53) ---------------------------------------------
LEAF_CASES = {"exact": {"estimation": "exact"}, "ggn": {"estimation": "diagonal", "hessian": "ggn"}}
# each split: rank 0's records, rank 1's (in the order read). "later": neither rank's first batch of 40
# reads the score leaf, rank 1's last batch does; "first": rank 1 reads its shard from the end, its
# first batch reads the leaf, rank 0's never does
LEAF_SPLITS = {"later": (range(0, 120), range(120, 240)), "first": (range(0, 120), range(239, 119, -1))}


def output_leaves_workload(rank: int | None) -> dict:
    """tests/test_output_reads.py's ``ScoredNet`` (a dict output whose ``"aux"`` leaf the loss reads,
    as a weight, only where a record's score exceeds a threshold: the last records) on the splits of
    ``LEAF_SPLITS``, batches of 40; ``rank=None``: all 240 records in one batch. Each case of
    ``LEAF_CASES`` x split -> ``[leakage of rtn_int4, of rtn_int2, n, whether the report names the leaf]``."""
    from test_output_reads import SAME_DRAWS, scored_case, scored_loss

    model, X, y, _ = scored_case()
    res = {}
    for split, shards in LEAF_SPLITS.items():
        idx = torch.arange(240) if rank is None else torch.tensor(list(shards[rank]))
        bs = 240 if rank is None else 40
        for name, kw in LEAF_CASES.items():
            first = next(iter(LEAF_SPLITS))
            if rank is None and split != first:  # one process reads every split alike (all 240 in one batch)
                res[f"{split}/{name}"] = res[f"{first}/{name}"]
                continue
            # t55: scored in the independent-coordinate form with 1,024 Monte Carlo draws (SAME_DRAWS): what the
            # ranks must agree on is the estimation's state, which every form reads; the correlated form's Monte
            # Carlo was ~80% of this workload's CPU (~6 s per rank, 3 s in the test process)
            met = MISIndicator(model, scored_loss, ["rtn_int4", "rtn_int2"], num_records=240, uncertainty_draws=0,
                               weight_decay=1e-3, num_training_records=240, **kw, **SAME_DRAWS)
            for a in range(0, len(idx), bs):
                met.update(X[idx[a:a + bs]], y[idx[a:a + bs]])
            out = met.compute()
            res[f"{split}/{name}"] = [float(out["rtn_int4"]["leakage"]), float(out["rtn_int2"]["leakage"]),
                                      met.report.n, any("'aux'" in w for w in met.report.warnings)]
    return res


def test_output_leaves_sorted_apart_on_the_ranks(world):
    """ux53: each rank sorts its own first batch, so the ranks can disagree on which output leaves the
    loss reads (here rank 0 never reads the score leaf; rank 1 reads it from its first batch, or from
    its last). Before, a leaf one rank dropped and read later was read with zeros in its place on that
    rank, and the exact estimator's stored per-record factor rows, of another width on each rank,
    failed the final ``torch.cat`` (or, of one width, mixed silently). Now each rank puts such a leaf
    back where its records read it (``output_reads.read_later``) and the rows are widened to one width
    (``estimate._widened_rows``: each record's factor unchanged), so two ranks equal one process that
    read the leaf from its first batch (1e-9 exact, 1e-7 with the diagonal's float32 passes:
    test_output_reads' tolerance). The loss directions per record (the diagonal leverage) are the
    whole world's sample (``test_the_ranks_reduce_their_first_batch_decisions``): before ux53, rank 1
    read 1.94 against rank 0's 1.81 and its rtn_int4 leakage 0.1242 against 0.1229. A leaf one rank
    put back is named in every rank's report."""
    single = output_leaves_workload(None)
    for k in range(2):
        r = json.loads((world.path / "metric" / f"leaves_rank{k}.json").read_text())
        for key, want in single.items():
            rel = 1e-9 if key.endswith("exact") else 1e-7
            assert r[key][2] == want[2] == 240, (key, k)
            assert r[key][0] == pytest.approx(want[0], rel=rel), (key, k)
            assert r[key][1] == pytest.approx(want[1], rel=rel), (key, k)
            # rank 1 put the leaf back in the "later" split: both ranks' reports say so
            assert r[key][3] is key.startswith("later") and want[3] is False, (key, k)


# -- first-batch decisions that differ between the ranks' shards (ux54a) ---------------------------
class _Shards(nn.Module):
    """A 3-class head beside a regression head read only for records that carry its label (so
    ``rank(L_i)`` is 3 for those, 2 else), a standardiser fitted on all 60 training inputs (buffers
    ``mean``, ``std``) and a buffer the train-mode forward sets from the records (``ema``)."""

    def __init__(self, X: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", X.mean(0))
        self.register_buffer("std", X.std(0))
        self.register_buffer("ema", torch.zeros(X.shape[1], dtype=X.dtype))
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 1)
        self.double()

    forwards = 0  # every instance's forwards, the private copies' included (rv55: per rank in the sync)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _Shards.forwards += 1
        if self.training:
            with torch.no_grad():
                self.ema.lerp_(x.mean(0), 0.1)
        h = self.body((x - self.mean) / self.std)
        return {"a": self.a(h), "b": self.b(h)}


def _shards_loss(o: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    y, v, m = t[:, 0].long(), t[:, 1:2], t[:, 2:3]
    return torch.nn.functional.cross_entropy(o["a"], y, reduction="none") + (m * (o["b"] - v) ** 2).squeeze(-1)


def first_batches_workload(rank: int | None) -> list:
    """``_Shards`` on 60 records: rank 0 reads records 0-39 (no second label: 2 loss directions each)
    in batches of 20, rank 1 records 40-59 (labelled: 3 each) one record per batch (no batch of 2 to
    split: its buffer probe cannot run); ``rank=None``: all 60 shuffled, one batch. ``[leakage of
    rtn_int4, n, loss directions, data_dependent_buffers, fitted_buffers (names), the model's
    forwards in compute() (the sync's and the finalisation's)]``."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    t = torch.stack([X[:, :3].argmax(1).double(), 0.7 * X[:, 3], (torch.arange(60) >= 40).double()], 1)
    model = _Shards(X).eval()
    idx = {None: torch.randperm(60, generator=g), 0: torch.arange(40), 1: torch.arange(40, 60)}[rank]
    bs = {None: 60, 0: 20, 1: 1}[rank]
    met = MISIndicator(model, _shards_loss, ["rtn_int4"], estimation="diagonal", hessian="ggn", uncertainty_draws=0,
                       weight_decay=1e-3, num_training_records=60)
    for a in range(0, 60 if rank is None else len(idx), bs):
        met.update(X[idx[a:a + bs]], t[idx[a:a + bs]])
    before = _Shards.forwards
    out = met.compute()
    dg = met.report.diagnostics
    return [float(out["rtn_int4"]["leakage"]), met.report.n, dg["leverage_directions"],
            dg.get("data_dependent_buffers"), sorted(dg.get("fitted_buffers", {})), _Shards.forwards - before]


def test_the_ranks_reduce_their_first_batch_decisions(world):
    """ux54a: what each rank decides on its own first batches is reduced over the ranks at the sync
    (``streaming._align_first_batches``), so both ranks report what one process reading all the
    records (shuffled, one batch) reports: the loss directions per record, 2 + 20 / 60 (the bottom-k
    sample by content key of the world: every record here; before, the first rank's first batch, 2,
    and every figure ~5% off), the buffer a forward sets from the records (rank 1, one record per
    batch, could not split one: before, its report said the buffers were unchecked), and the
    standardiser fitted on all 60 inputs (no shard's own statistics match it: before, named by
    neither rank). Leakage to 1e-9 (float64 sums in another order)."""
    single = first_batches_workload(None)
    assert single[1:5] == [60, pytest.approx(2 + 20 / 60, rel=1e-12), ["ema"], ["mean", "std"]]
    ranks = [json.loads((world.path / "metric" / f"shards_rank{k}.json").read_text()) for k in range(2)]
    for k, r in enumerate(ranks):
        assert r[1:5] == single[1:5], k
        assert r[0] == pytest.approx(single[0], rel=1e-9), k
    # rv55: each rank measured its own sample's loss directions inside the sync, 4 forwards on rank 0
    # and 3 on rank 1: a forward holding a collective would hang. Now the world's sample, on each
    assert ranks[0][5] == ranks[1][5], [r[5] for r in ranks]


def test_ranks_whose_first_batches_chose_different_estimators_are_refused():
    """A rank's "auto" estimator is chosen on its own first batch (a measured cost; sequences of other
    lengths on each rank can fall either side of a threshold): sums of two estimators cannot be
    combined, so the sync refuses them, naming each rank's and the argument that makes them one.
    Stood in for here by two processes' facts (``first_batch_facts``) from an exact and a diagonal
    accumulator, without a world: ``_align_first_batches`` is what every rank runs on the gathered
    facts (all raise alike); the same estimator passes."""
    from mis_lightning.streaming import _align_first_batches, first_batch_facts

    X, y, model = _setup()
    mets = []
    for kw in ({"estimation": "exact"}, {"estimation": "diagonal", "hessian": "ggn"}, {"estimation": "exact"}):
        met = MISIndicator(model, mse, ["rtn_int4"], uncertainty_draws=0, **kw)
        met.update(X[:20], y[:20])
        mets.append(met)
    facts = [first_batch_facts(m.accumulator) for m in mets]
    with pytest.raises(ValueError, match=r"chose different estimators .*process 1: diagonal sandwich .*"
                                         r"estimation='exact', hessian='exact'"):
        _align_first_batches(mets[0].accumulator, facts[:2])
    _align_first_batches(mets[0].accumulator, [facts[0], facts[2]])
    assert mets[0].accumulator.directions_synced is None  # (the exact estimator counts no directions)


def test_every_rank_measures_the_worlds_loss_directions_alike(monkeypatch):
    """The loss directions' sample is measured after the sync's gather, on the world's sample, by every
    rank alike (``loss_directions.world_sample``): the same forwards on each, none before the gather
    (rv55: each rank measured its own inside ``first_batch_facts``, 4 forwards on rank 0 and 3 on rank
    1 of ``first_batches_workload``'s split), and a rank without records, whose program never sorted
    the dict output's layout, measures in the ranks' layout and reads their count. Without a world:
    the ranks' facts as gathered, ``_align_first_batches`` as each rank runs it.

    rv56: the gather carries each rank's sample as keys only (``LossDirectionSample.keyed``) and one
    exchange then the rows the world's sample takes, ``LOSS_RANK_RECORDS`` in all (rv55 sent every
    rank's whole sample, up to 64 records' rows each): with a world sample of 16 of the 60 records,
    16 rows exchanged (not 40 + 20), the same count bitwise as the full parts' and the same forwards."""
    from mis_lightning import streaming
    from mis_lightning.streaming import _align_first_batches, first_batch_facts

    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    t = torch.stack([X[:, :3].argmax(1).double(), 0.7 * X[:, 3], (torch.arange(60) >= 40).double()], 1)
    mets = [MISIndicator(_Shards(X).eval(), _shards_loss, ["rtn_int4"], estimation="diagonal", hessian="ggn",
                         uncertainty_draws=0, weight_decay=1e-3, num_training_records=60) for _ in range(3)]
    mets[0].update(X[:40], t[:40])
    for a in range(40, 60, 10):
        mets[1].update(X[a:a + 10], t[a:a + 10])
    sent: list[int] = []

    def exchange(want):  # the sync's second gather: each rank's rows at the wanted positions
        got = {w: mets[w].accumulator.loss_direction_rows(p) for w, p in want.items()}
        sent.append(sum(int(pos.numel()) for rows in got.values() for pos, _, _ in rows))
        return got

    def world(keyed):
        before = _Shards.forwards
        facts = [first_batch_facts(m.accumulator, i if keyed else None) for i, m in enumerate(mets[:2])]
        assert _Shards.forwards == before  # (mets[2] saw no record)
        runs = []
        for m in mets:
            before = _Shards.forwards
            _align_first_batches(m.accumulator, facts, exchange if keyed else None)
            runs.append((_Shards.forwards - before, m.accumulator.directions_synced))
        return facts, runs

    full, runs = world(False)
    assert runs == [(runs[0][0], (pytest.approx(2 + 20 / 60, rel=1e-12), "measured", 60))] * 3
    facts, keyed = world(True)
    assert keyed == runs and sent == [60] * 3  # (the world's sample: every record)
    rows = [x for f in facts for _, x, _, _, _ in f["loss_directions"][1]]
    assert all(x.dtype == torch.int64 and x.shape[1:] == (2,) for x in rows)  # places, no rows, in the gather
    monkeypatch.setattr(streaming, "LOSS_RANK_RECORDS", 16)
    sent.clear()
    (_, small), (_, small_keyed) = world(False), world(True)
    assert small_keyed == small and small[0][1][2] == 16 and sent == [16] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a process's statistics on its device)")
def test_the_input_statistics_merge_from_other_devices():
    """Each DDP process's input statistics are on its own device (its inputs'): the sync merges
    them on the CPU (``InputStatistics.on_cpu``; rv54: ``cuda:0``'s with another process's raised a
    device mismatch at the sync). Stood in for by this process's statistics on the GPU and the
    other's on the CPU: together they tell the standardiser fitted on all 40 inputs."""
    from mis_lightning.estimation.data_buffers import InputStatistics

    X = torch.randn(40, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = _Shards(X)
    mine = InputStatistics(model, ["mean", "std"], X[:20].cuda(), 20)
    mine.update(X[:20].cuda(), 20)
    other = InputStatistics(model, ["mean", "std"], X[20:], 20)
    other.update(X[20:], 20)
    assert sorted(mine.merged([(other.sums, other.eps)]).matches(model)) == ["mean", "std"]


# -- "auto"'s first-batch choices made from every rank's facts (ddp56) ---------------------------------
CHOICE_SHARDS = {"split": ((0, 60, 30), (60, 90, 30)), "empty_rank1": ((0, 90, 90), (0, 0, 1))}


def _masked_data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A 5-output linear model on 90 records whose masked least squares label outputs 0-1 of records
    0-59 (2 loss directions each) and all 5 of records 60-89."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(90, 5, dtype=torch.float64)
    mask[:, :2], mask[60:] = 1, 1
    torch.manual_seed(0)
    model = nn.Linear(4, 5).double()
    with torch.no_grad():
        y = model(X) + 0.5 * torch.randn(90, 5, generator=g, dtype=torch.float64)
    return X, torch.cat([y, mask], 1), model


def _masked_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t[:, 5:] * (o - t[:, :5]) ** 2).sum(1)


def choice_workload(rank: int | None) -> dict:
    """Per case of ``CHOICE_SHARDS`` (this rank's ``(first, last, batch size)``; ``rank=None``: one case,
    ``"one"``: all 90 in one batch, one process): ``[leakage of rtn_int4, n, estimator, re-read]``, or the
    error's text. In the world, every rank runs ``world_choice.agree`` after its pass, as the callback
    does (its re-read: a fresh Metric given the world's choice). ``"split"``: rank 0's first batch
    needs 2 Gauss-Newton directions (exact), rank 1's 5 (sampled labels); ``"empty_rank1"``: rank 1
    reads nothing. ``EXACT_MAX_PARAMS`` is 0 here, so that ``"auto"`` takes the diagonal sandwich with
    the per-layer program's Gauss-Newton diagonal (``ggn_mode="auto"``) on this 25-weight model."""
    E = importlib.import_module("mis_lightning.estimation.estimate")
    saved, E.EXACT_MAX_PARAMS = E.EXACT_MAX_PARAMS, 0
    res = {}
    try:
        for name, shards in CHOICE_SHARDS.items() if rank is not None else [("one", None)]:
            try:
                res[name] = _choice_case(rank, *((0, 90, 90) if rank is None else shards[rank]))
            except Exception as exc:  # noqa: BLE001 - reported to the test, the world goes on
                res[name] = f"{type(exc).__name__}: {exc}"
        if rank is not None:  # "split" whose re-read (rank 0's) raises: every rank must raise (rv56d)
            try:
                res["reread_fails"] = _choice_case(rank, *CHOICE_SHARDS["split"][rank], fail=True)
            except Exception as exc:  # noqa: BLE001 - reported to the test, the world goes on
                res["reread_fails"] = f"{type(exc).__name__}: {exc}"
    finally:
        E.EXACT_MAX_PARAMS = saved
    return res


def _choice_case(rank: int | None, lo: int, hi: int, bs: int, fail: bool = False) -> list:
    from mis_lightning.estimation import world_choice as W

    X, Y, model = _masked_data()

    def new():
        return MISIndicator(model, _masked_loss, ["rtn_int4"], uncertainty_draws=0,
                            weight_decay=1e-2, num_training_records=90)

    def read(met):
        for a in range(lo, hi, bs):
            met.update(X[a:a + bs], Y[a:a + bs])

    box = [new()]
    read(box[0])
    again = False
    if rank is not None:
        def reread(choice):
            if fail:
                raise MemoryError("the re-read's forward ran out of memory (simulated)")
            box[0] = new()
            W.force(box[0].accumulator, choice)
            read(box[0])

        again = W.agree(box[0].accumulator, hi > lo, W.gather_objects, reread)
    out = box[0].compute()
    return [float(out["rtn_int4"]["leakage"]), box[0].report.n, box[0].accumulator.estimator, again]


def test_ranks_whose_first_batches_would_choose_apart_take_the_worlds_choice(world):
    """ddp56: "auto"'s first-batch choices read the ranks' own records (here the per-layer program's
    Gauss-Newton directions: 2 on rank 0, 5 on rank 1, so exact vs sampled labels); before, the sync
    refused them ("chose different estimators"). Now every rank gathers the facts after its pass
    (``world_choice.agree``, as ``MISCallback`` does), takes the choice one process reading all first
    batches at once makes (sampled labels: any rank needed more than 3 directions), and the rank that
    chose apart re-reads its records: both equal one process reading all 90 records in one batch. A
    rank without records takes the others' programs too: before, it kept the factored program and read
    the multi-output K-FAC factors as one output's. Figures to 1e-9
    relative (float64 sums in another order; the sampled labels are keyed by record content)."""
    single = choice_workload(None)["one"]
    assert "sampled-label" in single[2]
    for name in CHOICE_SHARDS:
        for k in range(2):
            r = json.loads((world.path / "metric" / f"choice_rank{k}.json").read_text())[name]
            assert not isinstance(r, str), (name, k, r)
            assert r[1:3] == single[1:3], (name, k)
            assert r[0] == pytest.approx(single[0], rel=1e-9), (name, k)
            assert r[3] == (name == "split" and k == 0), (name, k)  # only the rank that chose apart re-reads


def test_a_rank_whose_reread_fails_stops_every_rank(world):
    """rv56d: "split" again, rank 0's re-read raising (an out-of-memory, simulated). Before, only rank 0
    raised (``MISCallback`` with ``strict=False`` catches it and goes on training) while rank 1 went on
    to the sync's gather and waited there for it: a hang (in this world: until rank 0's process ended,
    "Connection closed by peer"). Now ``agree`` gathers every rank's failure
    after the re-reads and every rank raises, naming the rank and its error."""
    for k in range(2):
        r = json.loads((world.path / "metric" / f"choice_rank{k}.json").read_text())["reread_fails"]
        assert isinstance(r, str) and r.startswith("RuntimeError: process 0 failed to read its records"), (k, r)
        assert "MemoryError: the re-read's forward ran out of memory" in r, (k, r)


# -- a rank without records reports the "ggn_residual" block checks as the others (est57) ---------------
RESIDUAL_SHARDS = {"split": ((0, 32), (32, 64)), "empty_rank1": ((0, 64), (0, 0))}


def residual_workload(rank: int | None) -> dict:
    """Per case of ``RESIDUAL_SHARDS`` (this rank's records; ``rank=None``: ``"one"``, all 64 on one
    process): ``[leakage of rtn_int4, n, hessian, the report's residual_* diagnostics]`` of
    tests/test_estimation_conditions.py's ``_TinyCNN`` (a piecewise-linear CNN, 115 weights), for which
    ``"auto"`` takes the exact sandwich with ``hessian="ggn_residual"`` (n = 1,000 training records
    told). In the world every rank runs ``world_choice.agree`` after its pass, as ``MISCallback`` does:
    it resolves the rank without records before the sync."""
    from test_estimation_conditions import _cnn_data, _TinyCNN, ce

    from mis_lightning.estimation import world_choice as W

    x, y = _cnn_data(64, classes=3)
    res = {}
    for name, (lo, hi) in RESIDUAL_SHARDS.items() if rank is not None else [("one", (0, 64))]:
        if rank is not None:
            lo, hi = RESIDUAL_SHARDS[name][rank]
        torch.manual_seed(0)
        met = MISIndicator(_TinyCNN().eval(), ce, ["rtn_int4"], uncertainty_draws=0, num_training_records=1000,
                           num_records=16)
        for a in range(lo, hi, 16):
            met.update(x[a:a + 16], y[a:a + 16])
        if rank is not None:
            def reread(_world):
                raise AssertionError("no rank chooses apart here")

            W.agree(met.accumulator, hi > lo, W.gather_objects, reread)
        out = met.compute()
        res[name] = [float(out["rtn_int4"]["leakage"]), met.report.n, met.accumulator.hessian,
                     {k: v for k, v in met.report.diagnostics.items() if k.startswith("residual_")}]
    return res


def test_a_rank_without_records_reports_the_residual_checks_as_the_others(world):
    """rv56d: under DDP a rank that saw no record, resolved by ``agree`` before the sync (as the
    callback does), did not take the others' ``"ggn_residual"`` block checks at the sync
    (``resolve`` False there), and its report lacked every ``residual_*`` diagnostic (the figures
    the same). Now every rank reports the world's (``world_choice.world_residual``), equal to one
    process reading all 64 records: the same skipped block, columns, zero blocks and ratios. Figures
    to 1e-9 relative (float64 sums in another order)."""
    single = residual_workload(None)["one"]
    assert single[2] == "ggn_residual" and single[3]["residual_skipped_block"] == ["c2.weight", "c2.bias"]
    for name in RESIDUAL_SHARDS:
        for k in range(2):
            r = json.loads((world.path / "metric" / f"residual_rank{k}.json").read_text())[name]
            assert r[1:3] == single[1:3], (name, k)
            assert r[3] == single[3], (name, k, r[3])
            assert r[0] == pytest.approx(single[0], rel=1e-9), (name, k)


def test_the_residual_checks_reduce_over_the_ranks():
    """``world_residual``: the diagnostics one process reading every rank's first batch states. With each
    rank's check rows ``R v`` (dd58): the ratios of their sum, by hand here (d = 4; the block ``c2`` on
    coordinates 2-3: rank 0's rows read 0 there of 1.0, rank 1's 0.5 of 0.5, the union 0.5 of 1.0: 0.5,
    where the ranks' largest read 1.0), the decision the union's (not zero), and the block rank 0 left
    out of its sums (its own check found it zero) named with the rank (3 for the second here). Without rows (a Metric
    pickled before they were kept): the ranks' largest, said so; the zero blocks those every rank
    found zero, a block one rank left out named likewise. ``None`` where no rank checked."""
    from mis_lightning.estimation.world_choice import world_residual

    a = {"residual_skipped_block": ["c1.weight"], "residual_block_ratio": 0.0, "residual_columns": 39,
         "residual_zero_blocks": [["c2.weight"], ["head.weight"]], "residual_block_ratios": {"c2": 0.0, "head": 1e-12}}
    b = {**a, "residual_block_ratio": 1e-17, "residual_zero_blocks": [["head.weight"]],
         "residual_block_ratios": {"c2": 0.3, "head": 0.0}}
    assert world_residual([None, None]) is None
    assert world_residual([a, None]) == a
    w = world_residual([a, b])
    assert w == {**a, "residual_block_ratio": 1e-17, "residual_zero_blocks": [["head.weight"]],
                 "residual_block_ratios": {"c2": 0.3, "head": 1e-12}, "residual_not_computed": {"c2": [0]},
                 "residual_ratios": w["residual_ratios"]} and "not their union's" in w["residual_ratios"]
    assert world_residual([b, a]) == {**w, "residual_not_computed": {"c2": [1]}}
    # with rows: c1 (coordinates 0-1) the largest module, c2 (2-3) the other
    c1, c2 = torch.tensor([0, 1]), torch.tensor([2, 3])

    def rows(largest: list[float], other: list[float]) -> dict:
        pad = [0.0, 0.0, 0.0, 0.0]
        return {"largest": (["c1.weight"], c1, torch.tensor([largest, pad], dtype=torch.float64)),
                "others": ([["c1.weight"], ["c2.weight"]], [c1, c2],
                           torch.tensor([largest, pad, other, pad], dtype=torch.float64))}

    ia = {"residual_skipped_block": [], "residual_block_ratio": 1.0, "residual_columns": 4,
          "residual_zero_blocks": [["c2.weight"]], "residual_block_ratios": {"c1": 1.0, "c2": 0.0}}
    ib = {**ia, "residual_zero_blocks": [], "residual_block_ratios": {"c1": 1.0, "c2": 1.0}}
    ra, rb = rows([0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]), rows([0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0])
    assert world_residual([ia, ib], [ra, rb], [0, 3]) == {
        "residual_skipped_block": [], "residual_block_ratio": 1.0, "residual_columns": 4,
        "residual_zero_blocks": [], "residual_block_ratios": {"c1": 1.0, "c2": 0.5}, "residual_not_computed": {"c2": [0]}}
    assert world_residual([ia, ia], [ra, ra]) == ia  # agreeing ranks: their own decisions, nothing missing


# -- the residual checks' ratios are the union's; a block a rank left out is said (dd58) -----------------------
class _TwoHeads(nn.Module):
    """A shared tanh layer and two heads, ``b`` through a tanh (its first layer's own residual block
    is not zero where its labels are read), 4 outputs: ``a``'s 2 logits, ``b``'s 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.a = nn.Linear(4, 6), nn.Linear(6, 2)
        self.b1, self.b2 = nn.Linear(6, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        return torch.cat([self.a(h), self.b2(torch.tanh(self.b1(h)))], 1)


def _two_heads_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Head ``a``'s cross-entropy, and head ``b``'s where the record carries its label (``t[:, 2]``)."""
    ce = nn.functional.cross_entropy
    return ce(o[:, :2], t[:, 0].long(), reduction="none") + t[:, 2] * ce(o[:, 2:], t[:, 1].long(), reduction="none")


def _two_heads_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    t = torch.stack([torch.randint(0, 2, (64,), generator=g), torch.randint(0, 2, (64,), generator=g),
                     (torch.rand(64, generator=g) < 0.7)], 1).double()
    return x, t


# this rank's records per case, and one process's batches (the union of the ranks' first batches first)
UNION_SHARDS = {"union": ((0, 32), (32, 64)), "apart": ((0, 32), (32, 64))}
UNION_ONE = [list(range(0, 16)) + list(range(32, 48)), list(range(16, 32)), list(range(48, 64))]


def residual_union_workload(rank: int | None) -> dict:
    """Per case of ``UNION_SHARDS`` (``rank=None``: one process reading batches ``UNION_ONE``):
    ``[leakage of rtn_int4, the report's residual_* diagnostics, the rtn_int4 row's indicative phrases,
    whether a warning says the residual was not computed]`` of ``_TwoHeads`` under
    ``estimation="exact", hessian="ggn_residual"`` (batches of 16). ``"apart"``: rank 1's first batch
    carries no ``b`` label (its ``b1`` residual block zero there, not on the union)."""
    from mis_lightning.report import RESIDUAL_NOT_COMPUTED

    x, t = _two_heads_data()
    res = {}
    for name in UNION_SHARDS if rank is not None else ["one"]:
        tt = t.clone()
        if name == "apart":
            tt[32:48, 2] = 0.0
        met = MISIndicator(_TwoHeads(), _two_heads_loss, ["rtn_int4"], uncertainty_draws=0, estimation="exact",
                           hessian="ggn_residual", num_records=64)
        batches = UNION_ONE if rank is None else [list(range(a, a + 16)) for a in range(*UNION_SHARDS[name][rank], 16)]
        for idx in batches:
            met.update(x[idx], tt[idx])
        out = met.compute()
        row = next(r for r in met.report.rows() if r["scheme"] == "rtn_int4")
        res[name] = [float(out["rtn_int4"]["leakage"]),
                     {k: v for k, v in met.report.diagnostics.items() if k.startswith("residual_")},
                     row["indicative"], any(w.startswith(RESIDUAL_NOT_COMPUTED) for w in met.report.warnings)]
    return res


def test_the_ranks_report_the_residual_checks_of_their_union(world):
    """dd58 (rv57a): under DDP each ``"ggn_residual"`` block check's ratio was the ranks' largest (0.342
    where the union read 0.255 on a tanh CNN; below it elsewhere: not a bound). Now every rank sums the
    ranks' rows ``R v`` (the same seeded tangents on each): the ratios and decisions equal those of one
    process whose first batch is the union of the ranks' first batches (``residual_union_workload``:
    ``UNION_ONE``), to 1e-9 relative (float64 sums in another order). And a block a rank left out of its
    sums (``"apart"``: rank 1's first batch reads no ``b`` label, so its ``b1`` block was zero there and
    left out of every batch of rank 1, while the union's is not zero) was reported as computed; now
    ``residual_not_computed`` names it and the rank, the rows carry ``*`` and a warning says it."""
    from mis_lightning.estimation.estimate import RESIDUAL_BLOCK_RTOL

    one = residual_union_workload(None)["one"][1]
    assert one["residual_skipped_block"] == [] and "b1" not in [g[0].split(".")[0] for g in one["residual_zero_blocks"]]
    assert one["residual_block_ratios"]["b1"] > 1e3 * RESIDUAL_BLOCK_RTOL
    for k in range(2):
        r = json.loads((world.path / "metric" / f"union_rank{k}.json").read_text())
        got = r["union"][1]
        assert {a: v for a, v in got.items() if "ratio" not in a} == {a: v for a, v in one.items() if "ratio" not in a}
        assert got["residual_block_ratio"] == pytest.approx(one["residual_block_ratio"], rel=1e-9)
        assert got["residual_block_ratios"] == pytest.approx(one["residual_block_ratios"], rel=1e-9, abs=1e-15)
        assert not r["union"][3] and "residual" not in r["union"][2], (k, r["union"])
        apart = r["apart"]
        assert apart[1]["residual_not_computed"] == {"b1": [1]}, (k, apart[1])
        assert apart[3] and "Hessian's residual term not computed on every record" in apart[2], (k, apart)


class _MeanConv(nn.Module):
    """A convolution over a sequence of any length, averaged: one output per record."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv1d(2, 3, 3, padding=1), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(-1))


def test_the_worlds_choice_reads_every_ranks_first_batch(monkeypatch):
    """The exact sandwich's measured cost ``n d F`` reads the floats ``F`` of one record's forward on the
    first batch: sequences of length 8 on one rank and 32 on another fall on either side of
    ``EXACT_REUSE_MAX_COST`` (set between them here), so the ranks chose apart (the sync refused). The
    world's facts (``world_choice.world_choice``: the largest forward) give the choice one process makes
    on a first batch holding both (padded to 32: the diagonal sandwich); the rank that chose the exact
    one does not follow it, a fresh accumulator given it (``force``) takes it before its first batch and
    keeps it there. No world: ``agree``'s gather stood in for by the list of both ranks' facts. est57: as
    Metrics used directly (no ``agree``) the sync refuses them naming the cause and the cures: that
    estimator passed explicitly (the world's, not rank 0's), or ``MISCallback``."""
    from mis_lightning.estimation import world_choice as W

    E = importlib.import_module("mis_lightning.estimation.estimate")
    g = torch.Generator().manual_seed(0)
    short, long_ = torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 32, generator=g)
    y = torch.randn(20, generator=g)
    d, n = 3 * 2 * 3 + 3 + 3 + 1, 40

    def met():
        return MISIndicator(_MeanConv(), mse, ["rtn_int4"], uncertainty_draws=0, num_training_records=n)

    a, b, one = met(), met(), met()
    floats = {L: E.forward_floats(a.model, x, 20) for L, x in ((8, short), (32, long_))}
    monkeypatch.setattr(E, "EXACT_REUSE_MAX_COST", n * d * (floats[8] + floats[32]) / 2)
    monkeypatch.setattr(E, "RESIDUAL_MAX_COST", 0.0)
    a.update(short, y)
    b.update(long_, y)
    one.update(torch.cat([torch.nn.functional.pad(short, (0, 24)), long_]), torch.cat([y, y]))
    assert (a.accumulator.mode, b.accumulator.mode, one.accumulator.mode) == ("exact", "diagonal", "diagonal")
    world = W.world_choice([W.choice_facts(a.accumulator), W.choice_facts(b.accumulator)])
    # (the forward's floats per record, counted on a batch of 20 and of 40: the same to 1e-3)
    assert world["probe"][1] == b.accumulator._forward_floats
    assert world["probe"][1] == pytest.approx(W.choice_facts(one.accumulator)["probe"][1], rel=1e-3)
    assert not W.follows(a.accumulator, world) and W.follows(b.accumulator, world)
    again = met()
    W.force(again.accumulator, world)
    again.update(short, y)
    assert again.accumulator.mode == "diagonal" and W.follows(again.accumulator, world)
    # est57: the same two ranks as Metrics used directly (no agree) are refused at the sync: the refusal names
    # the cause and both cures, with the estimator "auto" chooses for the world (not rank 0's exact one)
    from mis_lightning.streaming import _align_first_batches, first_batch_facts

    facts = [first_batch_facts(m.accumulator) | {"rank": k} for k, m in enumerate((a, b))]
    with pytest.raises(ValueError) as err:
        _align_first_batches(a.accumulator, facts)
    msg = str(err.value)
    assert "process 0: exact sandwich" in msg and "process 1: diagonal sandwich" in msg, msg
    assert "decide on each process's own first batch" in msg and "sequences padded to other lengths" in msg, msg
    assert "estimation='diagonal', hessian='ggn' (what 'auto' chooses from every process's first batch)" in msg, msg
    assert "MISCallback, which makes that choice for every process and re-reads" in msg, msg
    # ... and that estimator, forced on both, passes
    forced = [MISIndicator(_MeanConv(), mse, ["rtn_int4"], uncertainty_draws=0, num_training_records=n,
                           estimation="diagonal", hessian="ggn") for _ in range(2)]
    forced[0].update(short, y)
    forced[1].update(long_, y)
    _align_first_batches(forced[0].accumulator, [first_batch_facts(m.accumulator) for m in forced])


class _Reshuffled(torch.utils.data.IterableDataset):
    """``_masked_data``'s records 0-59 (2 loss directions each), in an order reshuffled at every pass
    (``__iter__`` keeps the pass count: a stream's own state)."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        X, Y, _ = _masked_data()
        order = torch.randperm(60, generator=torch.Generator().manual_seed(self.passes)).tolist()
        self.passes += 1
        return iter([(X[i], Y[i]) for i in order])


def test_the_callbacks_reread_reads_the_records_of_its_first_read(monkeypatch):
    """rv56d: ``assess_on_trainer``'s re-read (ddp56) iterated its estimation loader again; over an
    iterable dataset that loader reads one private copy, whose pass state the first read moved: the
    re-read took other records (here the first 3 batches of 10, ``limit_train_batches=3``, of the
    second pass's order), silently. Now it reads a fresh copy: the records of the first read. No world:
    rank 0 of 2 on a stand-in trainer, ``agree``'s gathers stood in for by the other rank's facts (5
    loss directions: sampled labels), so rank 0 (2 directions: exact) re-reads; the reference reads
    the first pass's 30 records under that choice (the choice forced, ``force``). The first pass's Metric
    is freed before the re-read's is built (it sits in reference cycles with its private copies and sums:
    before, they were held through the re-read)."""
    from torch.utils.data import DataLoader

    import mis_lightning._lightning_support as LS
    from mis_lightning.config import EstimationConfig, ScoringConfig
    from mis_lightning.estimation import world_choice as W

    E = importlib.import_module("mis_lightning.estimation.estimate")
    monkeypatch.setattr(E, "EXACT_MAX_PARAMS", 0)
    X, Y, model = _masked_data()
    cfg, scoring = EstimationConfig(weight_decay=1e-2), ScoringConfig(uncertainty_draws=0)
    other = MISIndicator(model, _masked_loss, ["rtn_int4"], uncertainty_draws=0, weight_decay=1e-2)
    other.update(X[60:90], Y[60:90])
    facts = W.choice_facts(other.accumulator)
    monkeypatch.setattr(LS, "gather_objects", lambda obj: [obj, facts if isinstance(obj, dict) else None])
    built = []  # a weak reference to each Metric the callback builds, and whether the earlier ones were alive then

    class Recorded(LS.EstimationMetric):
        def __init__(self, *args, **kwargs):
            built.append((any(r() is not None for r, _ in built), None))
            super().__init__(*args, **kwargs)
            built[-1] = (weakref.ref(self.accumulator), built[-1][0])

    monkeypatch.setattr(LS, "EstimationMetric", Recorded)
    trainer = SimpleNamespace(world_size=2, global_rank=0, is_global_zero=True, num_training_batches=3,
                              fast_dev_run=False, val_dataloaders=None, limit_val_batches=0, progress_bar_callback=None,
                              train_dataloader=DataLoader(_Reshuffled(), batch_size=10))
    report = LS.assess_on_trainer(trainer, model, ["rtn_int4"], cfg, scoring, {"hook": False, "loss_fn": _masked_loss})
    first = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:30]
    ref = MISIndicator(model, _masked_loss, ["rtn_int4"], uncertainty_draws=0, weight_decay=1e-2)
    W.force(ref.accumulator, W.world_choice([facts]))
    ref.update(X[first], Y[first])
    single = ref.compute()
    assert "sampled-label" in ref.accumulator.estimator and report.n == 30
    assert report.schemes["rtn_int4"].leakage == pytest.approx(float(single["rtn_int4"]["leakage"]), rel=1e-9)
    # the first pass's Metric (its private copies and sums) freed before the re-read's was built
    assert [alive for _, alive in built] == [False, False]


# -- conditions one process sees (the callback's per-process checks) -------------------------------
def test_a_condition_one_process_sees_is_in_every_process_s_report(tmp_path):
    """The callback's checks of a process's own batches (the loss match, the stream check, ...) decided
    each process's report alone (dd58 left it): a condition seen on process 1 only left process 0's report,
    the one written, unmarked and the two reports disagreeing. Now every process's report carries the
    union. A ddp_spawn world of its own (2 CPU processes, gloo; tests/_ddp_world.py): process 1's stream
    reshuffles at every pass (one epoch, limit_train_batches=2: its assessed pass is not the one trained on)
    and its training_step returns a twentieth of its loss (the assessed loss ~10 times training's);
    process 0's stream is fixed and its loss half the assessed one (no condition)."""
    import pytorch_lightning as pl
    from _ddp_world import DestroyWorldAtExit, RankScaledLoss, RankStream, ReportsOut
    from test_callback import FAST
    from test_callback import mse as half_mse
    from torch.utils.data import DataLoader

    from mis_lightning import MISCallback
    from mis_lightning.report import STREAM_RECORDS_DIFFER

    torch.set_num_threads(1)
    pl.seed_everything(0)
    cb = MISCallback(["rtn_int8"], loss_fn=half_mse, uncertainty_draws=0, **FAST)
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, ReportsOut(tmp_path), DestroyWorldAtExit(tmp_path)],
                         default_root_dir=str(tmp_path))
    trainer.fit(RankScaledLoss(), DataLoader(RankStream(), batch_size=16), DataLoader(RankStream(), batch_size=16))
    reports = [json.loads((tmp_path / f"report_rank{k}.json").read_text()) for k in range(2)]
    for rep in reports:
        assert rep["n"] == 64
        assert rep["diagnostics"]["stream_records_differ"] is True and rep["diagnostics"]["loss_mismatch"] is True
        assert rep["diagnostics"]["records_from_training_loader"] is False
        assert any(w.startswith(STREAM_RECORDS_DIFFER) and w.endswith(
            "(seen by process 1 of 2: each process checks its own batches, and every process's report carries what "
            "any saw)") for w in rep["warnings"]), rep["warnings"]
        assert rep["warnings"][0].startswith("the assessed loss does not match") and "seen by process 1 of 2" in \
            rep["warnings"][0]
        assert rep["marks"] and all("records assessed not those trained on" in m and "assessed loss not the training "
                                    "loss" in m for m in rep["marks"])
        assert not any("limit_train_batches: the first 2 batches" in w for w in rep["warnings"])
    assert reports[0]["warnings"] == reports[1]["warnings"] and reports[0]["marks"] == reports[1]["marks"]
    written = json.loads(next(tmp_path.rglob("mis_report.json")).read_text())  # rank 0's
    assert written["diagnostics"]["stream_records_differ"] is True and written["diagnostics"]["loss_mismatch"] is True


def test_the_world_union_of_the_processes_observations(monkeypatch):
    """``world_union`` without a world: rank 0 of 2 on a stand-in trainer, the gather stood in for by the
    other process's observations. A note only process 1 made reaches process 0 naming process 1; a list is
    the union; an observation that raises on this process raises after the gather (the other process,
    waiting in it, is not left there)."""
    import mis_lightning._lightning_support as LS

    gathered = []

    def gather(obj):
        gathered.append(obj)
        return [obj, {"note": "seen there", "both": "b1", "layers": ["b", "c"], "failing": None}]

    monkeypatch.setattr(LS, "gather_objects", gather)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    trainer = SimpleNamespace(world_size=2)
    out = LS.world_union(trainer, {"note": None, "both": "b0", "layers": ["a", "b"], "failing": lambda: None})
    assert out["note"] == ("seen there (seen by process 1 of 2: each process checks its own batches, and every "
                           "process's report carries what any saw)")
    assert out["both"] == "b0" and out["layers"] == ["a", "b", "c"] and out["failing"] is None

    def fails():
        raise RuntimeError("this process's check failed")

    with pytest.raises(RuntimeError, match="this process's check failed"):
        LS.world_union(trainer, {"note": None, "both": None, "layers": None, "failing": fails})
    assert len(gathered) == 2 and gathered[-1]["failing"] is None  # it took part in the gather first
