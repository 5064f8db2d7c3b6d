"""The estimation pass's accumulator is freed when its last reference goes, not at the next cyclic
collection (issue 13: the 1e7 benchmark MLP's pass left ~400 MiB -- its private model copy, program,
scratch and sums -- in a reference cycle, accumulator -> loss-directions sample -> bound method ->
accumulator, freed inside the next scoring call; docs/benchmarks.md, "p57b")."""

from __future__ import annotations

import copy
import gc
import importlib
import pickle
import weakref

import pytest
import torch
from _nets import mse_per_record, trained_relu_mlp  # tests/_nets.py
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs

A = importlib.import_module("mis_lightning.assess")
E = importlib.import_module("mis_lightning.estimation.estimate")


def _accumulators(monkeypatch) -> list[weakref.ref]:
    """Weak references to every MomentAccumulator built from now on."""
    made: list[weakref.ref] = []
    init = E.MomentAccumulator.__init__

    def recording(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    monkeypatch.setattr(E.MomentAccumulator, "__init__", recording)
    return made


@pytest.mark.parametrize("weak", [True, False])
def test_the_estimation_pass_is_freed_without_the_cyclic_collector(monkeypatch, weak):
    """With the collector off, ``run_estimation``'s accumulator (and the private model copy its
    program holds) is gone once the call returns; with the sample's bound method (the switch off)
    the cycle holds it until a collection: what the test tells apart."""
    monkeypatch.setattr(E, "LOSS_RANKS_WEAK", weak)
    model, x, y = trained_relu_mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    est_cfg, _, _ = stage_configs("assess", None, None, {"estimation": "diagonal", "hessian": "ggn",
                                                        "num_records": 64})
    made = _accumulators(monkeypatch)
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        est = A.run_estimation(model, loader, mse_per_record, est_cfg)
        alive = [r for r in made if r() is not None]
    finally:
        if was:
            gc.enable()
    assert made and est.n == 512
    if weak:
        assert alive == []
    else:
        assert len(alive) == len(made)  # held by the cycle until collected
        gc.collect()
        assert all(r() is None for r in made)


def test_a_copied_or_pickled_accumulator_measures_through_its_own_copy(monkeypatch):
    """The sample's measure follows the accumulator as the bound method did: a deep copy's and an
    unpickled accumulator's sample call their own ``_loss_ranks``; a measure whose accumulator was
    freed raises RuntimeError naming it (nothing else holds a sample)."""
    model, x, y = trained_relu_mlp(steps=5)
    acc = E.MomentAccumulator(model, mse_per_record, num_records=8)
    twin = copy.deepcopy(acc)
    back = pickle.loads(pickle.dumps(acc))
    # each accumulator answers with its own tag
    monkeypatch.setattr(E.MomentAccumulator, "_loss_ranks",
                        lambda self, xs, ys, k: (torch.full((k,), float(self.tag), dtype=torch.float64), ""))
    for i, who in enumerate((acc, twin, back)):
        who.tag = i
    for i, who in enumerate((acc, twin, back)):
        ranks, _ = who._loss_rank.measure(x[:3], y[:3], 3)
        assert ranks.tolist() == [float(i)] * 3
    measure = acc._loss_rank.measure
    del acc, who
    with pytest.raises(RuntimeError, match="after its estimation pass was freed"):
        measure(x[:3], y[:3], 3)


def test_a_shallow_copy_of_an_accumulator_measures_after_the_original_is_freed():
    """rv57c: ``copy.copy`` of an accumulator shares its loss-directions sample, whose measure holds the
    original only weakly: once the original's last other reference went (here the Metric that held it,
    freed by a collection), the copy's ``loss_directions()`` raised RuntimeError; with the bound method it
    read the count. The copy now holds the original (``MomentAccumulator.__copy__``), the count as the
    original's own read (2 loss directions of the 3-class ReLU classifier's records, 64 sampled)."""
    from torch import nn

    import mis_lightning as ml

    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def make():
        m = ml.MISIndicator(model, _ce, ["rtn_int8"], estimation="diagonal", hessian="ggn")
        for i in range(0, 256, 64):
            m.update(x[i:i + 64], y[i:i + 64])
        return m

    own = make().accumulator.loss_directions()
    assert own is not None and own[1] == "measured" and own[2] == 64
    acc = make().accumulator
    probe = weakref.ref(acc)
    twin = copy.copy(acc)
    del acc
    gc.collect()
    assert probe() is not None  # held by the copy, not only by the collected Metric
    assert twin.loss_directions() == own


def _ce(o, t):
    return torch.nn.functional.cross_entropy(o, t, reduction="none")
