"""rv56's reproducers (docs/benchmarks.md "rv56"): model outputs whose records are not in dim 0, and the
bytes a DDP sync's gathers carry for the loss directions' sample.

``layouts``: small models whose output holds the records in dim 1 -- two heads stacked ``[2, B, 1]`` and
``.squeeze()``d (``[2, B]``, ``[2]`` for one record), a sequence-first ``[T, B, 2]`` output of ``T = 1``, a
sequence-first ``[T = 2, B, 1]`` squeezed -- each through a plain ``loss_fn`` and through
``mis_per_sample_loss``, against the independent reference: the same weights laid out batch-first
(``[B, 2]``, mean squared error on 2 outputs). ``MISIndicator`` on 96 records in batches of 32,
``rtn_int4``, three estimators. ``--first-one``: the first batch holds one record (the first-batch checks
cannot tell the layout there), then batches of 1, 2, 32, 32, 28.

``gather``: the loss directions' part of a DDP sync's gathers, pickled as ``all_gather_object`` pickles
it, for ``--ranks`` processes of ``--records`` records each with 3 x ``--side`` x ``--side`` float32 inputs
(an image model: an average pool and a 10-class head), rv55's one gather of every process's held rows
against keys first and the rows the world's sample takes (``loss_directions.GATHER_KEYS_FIRST``); and
whether both give the same count. No world: each process is a ``MISIndicator`` fed its shard,
``_align_first_batches`` run as every process runs it.

    python benchmarks/rv56_record_dim.py layouts [--first-one]
    python benchmarks/rv56_record_dim.py gather [--ranks 2] [--records 96] [--side 224]
"""

from __future__ import annotations

import argparse
import pickle
import warnings

import torch
from torch import nn

from mis_lightning import MISIndicator

N = 96


def _mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # batch-first [B, 2]
    return ((o - t) ** 2).sum(-1)


class Twin(nn.Module):
    """The reference: ``[B, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class Stacked(Twin):
    """Two heads stacked ``[2, B, 1]``, then ``.squeeze()``: ``[2, B]`` (``[2]`` for one record)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.lin(x)
        return torch.stack([o[:, :1], o[:, 1:]]).squeeze()


class SeqFirst1(Twin):
    """Sequence-first with ``T = 1``: ``[1, B, 2]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).unsqueeze(0)


class SeqFirst2(Twin):
    """Sequence-first with ``T = 2`` steps of one output, squeezed: ``[2, B, 1]`` -> ``[2, B]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.lin(x)
        return torch.stack([o[:, 0], o[:, 1]]).reshape(2, -1, 1).squeeze()


def _stacked_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # reads [2, B] (and one record's [2])
    return _mse(o.reshape(2, -1).T, t)


def _seq_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _mse(o[-1], t)


def _hooked(cls: type[nn.Module], loss) -> nn.Module:
    class Hooked(cls):  # type: ignore[valid-type, misc]
        def mis_per_sample_loss(self, batch):
            x, y = batch
            return loss(self(x), y)

    return Hooked()


CASES = {"stacked": (Stacked, _stacked_loss), "seqfirst1": (SeqFirst1, _seq_loss), "seqfirst2": (SeqFirst2, _stacked_loss)}


def _run(model: nn.Module, loss, est: str, hess: str, cuts: list[tuple[int, int]], X, Y) -> str:
    try:
        met = MISIndicator(model.eval(), loss, ["rtn_int4"], estimation=est, hessian=hess, uncertainty_draws=0,
                           weight_decay=1e-2, num_training_records=N, num_records=32)
        for a, b in cuts:
            met.update((X[a:b], Y[a:b])) if loss is None else met.update(X[a:b], Y[a:b])
        out = met.compute()["rtn_int4"]
        d = met.report.diagnostics
        why = d.get("leverage_unavailable") or d.get("leverage_directions_note") or ""
        return (f"leakage {float(out['leakage']):.6f}  mean leverage {d.get('mean_leverage')}  directions "
                f"{d.get('leverage_directions')}" + (f"  [{why[:110]}]" if why else ""))
    except Exception as exc:  # noqa: BLE001 - the refusal is the figure
        return f"RAISED {type(exc).__name__}: {str(exc)[:160]}"


def layouts(first_one: bool) -> None:
    torch.manual_seed(0)
    X, Y = torch.randn(N, 4, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    cuts = [(0, 1), (1, 2), (2, 4), (4, 36), (36, 68), (68, 96)] if first_one else [(a, a + 32) for a in range(0, N, 32)]
    for est, hess in (("exact", "exact"), ("diagonal", "ggn"), ("diagonal", "exact")):
        print(f"{est}/{hess}")
        print(f"  {'reference':22s}", _run(Twin(), _mse, est, hess, cuts, X, Y))
        if hess != "ggn":  # (the hook takes no 'ggn')
            print(f"  {'reference hook':22s}", _run(_hooked(Twin, _mse), None, est, hess, cuts, X, Y))
        for name, (cls, loss) in CASES.items():
            print(f"  {name:22s}", _run(cls(), loss, est, hess, cuts, X, Y))
            if hess != "ggn":
                print(f"  {name + ' hook':22s}", _run(_hooked(cls, loss), None, est, hess, cuts, X, Y))


class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def gather(ranks: int, records: int, side: int) -> None:
    from mis_lightning.streaming import _align_first_batches, first_batch_facts

    torch.manual_seed(0)
    model = _Pool().eval()
    mets = []
    for _ in range(ranks):
        m = MISIndicator(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), ["rtn_int8"],
                         estimation="diagonal", hessian="ggn", uncertainty_draws=0,
                         num_training_records=ranks * records)
        for _ in range(0, records, 32):
            m.update(torch.randn(32, 3, side, side), torch.randint(0, 10, (32,)))
        mets.append(m)
    size = lambda obj: len(pickle.dumps(obj))  # noqa: E731
    full = [first_batch_facts(m.accumulator) for m in mets]
    keyed = [first_batch_facts(m.accumulator, i) for i, m in enumerate(mets)]
    sent: list[dict] = []

    def exchange(want):
        got = {w: mets[w].accumulator.loss_direction_rows(p) for w, p in want.items()}
        sent.append(got)
        return got

    _align_first_batches(mets[0].accumulator, full)
    old = mets[0].accumulator.directions_synced
    _align_first_batches(mets[0].accumulator, keyed, exchange)
    new = mets[0].accumulator.directions_synced
    rows = {w: size(v) for w, v in sent[0].items()} if sent else {}
    print(f"{ranks} processes x {records} records, inputs 3x{side}x{side} float32 "
          f"(held as the program's {mets[0].accumulator.program.dtype})")
    print("  first gather, bytes each process sends: rows", [size(f["loss_directions"]) for f in full],
          "/ keys", [size(f["loss_directions"]) for f in keyed])
    print("  keys first: the exchange's bytes by process", rows, "in all", sum(rows.values()))
    print("  bytes each process receives: rows", sum(size(f["loss_directions"]) for f in full),
          "/ keys first", sum(size(f["loss_directions"]) for f in keyed) + sum(rows.values()))
    print("  counts", old, new, "equal" if old == new else "DIFFER")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layouts")
    p.add_argument("--first-one", action="store_true")
    p = sub.add_parser("gather")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--side", type=int, default=224)
    a = ap.parse_args()
    layouts(a.first_one) if a.cmd == "layouts" else gather(a.ranks, a.records, a.side)
