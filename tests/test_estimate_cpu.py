"""``Estimate.cpu()``: the scoring runs on the CPU whatever device the estimation pass ran on
(session 42's first GPU check: a CUDA model's stored factors met the scoring's CPU sums and
`factored_power_sums` failed). No CUDA here, so the tests check what can be checked on the CPU:
a CPU estimate is returned as the same object (a CPU run's scoring is untouched, bit for bit),
and the container walk reaches every tensor an estimate holds (dataclass fields, the factors'
dataclasses, mappings, lists, namedtuples), which is what moves a CUDA estimate's tensors."""
from __future__ import annotations

import collections
import dataclasses
import importlib

import torch
from torch.utils.data import DataLoader, TensorDataset

E = importlib.import_module("mis_lightning.estimation.estimate")  # the module (the package exports the function)


def _est(**kw) -> E.Estimate:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5) + 0.1 * torch.randn(64)
    model = torch.nn.Linear(5, 1)
    loss = lambda o, t: (o.squeeze(-1) - t) ** 2  # noqa: E731
    return E.estimate(model, DataLoader(TensorDataset(x, y), batch_size=16), loss, num_records=16, **kw)


def test_a_cpu_estimate_is_returned_as_is():
    for mode in ("exact", "diagonal"):
        est = _est(mode=mode)
        assert est.cpu() is est


def test_the_walk_reaches_every_tensor_of_an_estimate():
    est = _est(mode="diagonal")
    fields = {f.name: getattr(est, f.name) for f in dataclasses.fields(est)}
    found = {id(t) for t in E._tensors(fields)}
    expected = [t for v in (est.theta, est.sigma) for t in v.values()]
    assert expected and all(id(t) in found for t in expected)
    for f in est.factors or []:  # the factored path's stored records: dataclasses inside a list
        assert id(f.x) in found and id(f.d) in found


def test_to_cpu_rebuilds_containers_only_when_something_moves():
    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Box:
        t: torch.Tensor
        n: int

    obj = {"p": Pair(torch.ones(2), [torch.zeros(1), 3]), "box": Box(torch.ones(1), 4)}
    assert E._to_cpu(obj) is obj  # all on the CPU: the same objects
    meta = {"p": Pair(torch.ones(2, device="meta"), [torch.zeros(1), 3]), "box": Box(torch.ones(1, device="meta"), 4)}
    # 'meta' stands in for a CUDA device (a tensor not on the CPU); .cpu() of a meta tensor fails,
    # so the walk is checked on what it would move
    moved = [t for t in E._tensors(meta) if t.device.type != "cpu"]
    assert len(moved) == 2
