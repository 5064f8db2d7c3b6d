"""A ``forward`` returning more than the logits against the same network returning the logits alone
(docs/benchmarks.md "ux52a"; nux52's findings 1 and 4, session 52).

Usage (from the repo root):

    python benchmarks/output_leaves.py assess [exact|diagonal]   # every output kind through assess()
    python benchmarks/output_leaves.py callback                   # MISCallback, d = 3,491 ("auto": diagonal)
    python benchmarks/output_leaves.py hook [exact|diagonal]      # mis_per_sample_loss on a dict output
    python benchmarks/output_leaves.py late                       # a leaf first read after the first batch (ux53)
    python benchmarks/output_leaves.py columns [DRAWS]            # 3 of 13 columns of one tensor read (ux53)
    python benchmarks/output_leaves.py probes                     # ux53's first-batch probes' CPU time

``assess``: a 5-10-3 tanh classifier (L-BFGS + L2 1e-3, n = 1000, d = 93) returning ``tensor``
(the logits), ``dict`` ({"logits", "features": h}), ``tuple`` ((logits, h)), ``dict1``
({"logits"}) or ``tuple_detached`` ((logits, h.detach())); the loss reads the logits only. One
line per kind: each scheme's leakage, the max leverage and the records capped (exact), the
warnings' count, and whether every leakage equals the tensor's bitwise. ``callback`` and ``hook``:
the tensor and dict twins trained in one process (same seed), their leakages side by side.

``late`` (ux53): tests/test_output_reads.py's ``ScoredNet`` (a classifier beside a fixed scoring head
whose output the loss reads as a weight, 4 for records scored above 0.5, the last ones), 240 records
in one batch (the leaf read from the first batch: the reference) and in batches of 40 (the first
reads no score), under the exact, diagonal and ggn-diagonal estimators: each scheme's leakage, the
relative difference to the one batch, and whether the report names the leaf. ``columns`` (ux53): the
``assess`` classifier trained at n = 400 returning ``cat([logits, h], 1)`` ([B, 13]) to a loss reading
``[:, :3]`` against the logits-only twin, under the exact estimator, for DRAWS label draws (default 4).
``probes``: the CPU time of ``LossProgram.random_in_train_mode`` and ``output_reads.unread_entries`` on a
1.2e7-weight MLP's batch of 256 against one training step of it (one thread).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback

SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"]
KINDS = ("tensor", "dict", "tuple", "dict1", "tuple_detached")


class Outputs(nn.Module):
    """A classifier whose forward returns the logits as ``kind`` says."""

    def __init__(self, body: nn.Module, head: nn.Module, kind: str) -> None:
        super().__init__()
        self.body, self.head, self.kind = body, head, kind

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        logits = self.head(h)
        return {"dict": {"logits": logits, "features": h}, "tuple": (logits, h), "dict1": {"logits": logits},
                "tuple_detached": (logits, h.detach())}.get(self.kind, logits)


def ce(out, y: torch.Tensor) -> torch.Tensor:
    logits = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits, y, reduction="none")


def run_assess(estimation: str) -> None:
    torch.manual_seed(123)  # the labels' draw (nux52's s8_dict_output.py, figure for figure)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 5, generator=g)
    y = torch.distributions.Categorical(logits=2 * x @ torch.randn(5, 3, generator=g)).sample()
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(5, 10), nn.Tanh()), nn.Linear(10, 3)
    net = nn.Sequential(body, head)
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        obj = ce(net(x[:1000]), y[:1000]).mean() + 1e-3 / 2 * sum((p ** 2).sum() for p in net.parameters())
        obj.backward()
        return obj

    for _ in range(5):
        opt.step(closure)
    ref = None
    for kind in KINDS:
        rep = ml.assess(Outputs(body, head, kind), SCHEMES, DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=100),
                        ce, weight_decay=1e-3, estimation=estimation,
                        val_dataloader=DataLoader(TensorDataset(x[1000:], y[1000:]), batch_size=500))
        leak = [rep.schemes[s].leakage for s in SCHEMES]
        ref = leak if ref is None else ref
        print(f"{estimation:8s} {kind:15s} " + " ".join(f"{v:.4f}" for v in leak),
              f"max_leverage {rep.diagnostics.get('max_leverage')} capped {rep.diagnostics.get('leverage_capped')}",
              f"warnings {len(rep.warnings)} bitwise_equal_to_tensor {leak == ref}")


class Module(pl.LightningModule):
    """The callback's module: ``wide`` an MLP of d = 3,491 (``"auto"`` picks the diagonal sandwich),
    else the 5-10-3 classifier; ``hook``: the loss through ``mis_per_sample_loss``."""

    def __init__(self, kind: str, wide: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        if wide:
            body, head = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 3)
        else:
            body, head = nn.Sequential(nn.Linear(5, 10), nn.Tanh()), nn.Linear(10, 3)
        self.net = Outputs(body, head, kind)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _i):
        return ce(self(batch[0]), batch[1]).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3 if self.net.body[0].in_features == 20 else 3e-2,
                                weight_decay=1e-4)


class HookModule(Module):
    def mis_per_sample_loss(self, batch):
        return ce(self(batch[0]), batch[1])


def run_lightning(hook: bool, estimation: str) -> None:
    g = torch.Generator().manual_seed(0)
    if hook:
        x = torch.randn(400, 5, generator=g)
        y = torch.distributions.Categorical(logits=2 * x @ torch.randn(5, 3, generator=g)).sample()
    else:
        x = torch.randn(3000, 20, generator=g)
        y = x[:, :3].argmax(1)
    for kind in ("tensor", "dict"):
        opts = dict(estimation=estimation) if hook else dict(loss_fn=ce)
        cb = MISCallback(schemes=SCHEMES[1:3], dirpath=tempfile.mkdtemp(), **opts)
        pl.Trainer(max_epochs=2, callbacks=[cb], enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, deterministic=True
                   ).fit((HookModule if hook else Module)(kind, wide=not hook), DataLoader(TensorDataset(x, y), batch_size=100))
        rep = cb.report
        print(f"{'hook' if hook else 'callback'} {kind:7s} " + " ".join(f"{rep.schemes[s].leakage:.6f}" for s in SCHEMES[1:3]),
              f"estimator {rep.estimation.get('estimator')!r} leverage_correction {rep.diagnostics.get('leverage_correction')}")


def run_late() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_output_reads import scored_case, scored_loss  # the tests' model: one definition

    model, x, y, above = scored_case()
    print(f"records read as weighted (score above the threshold): {above} of 240, all after the first 40")
    schemes = ["none", "rtn_int4", "rtn_int2"]
    for name, kw in (("exact", {"estimation": "exact"}), ("diagonal", {"estimation": "diagonal"}),
                     ("ggn", {"estimation": "diagonal", "hessian": "ggn"})):
        ref = None
        for bs in (240, 40):
            rep = ml.assess(model, schemes, [(x[a:a + bs], y[a:a + bs]) for a in range(0, 240, bs)], scored_loss,
                            weight_decay=1e-3, uncertainty_draws=0, **kw)
            leak = [rep.schemes[s].leakage for s in schemes]
            ref = leak if ref is None else ref
            named = any("did not read the model's output ['aux']" in w for w in rep.warnings)
            print(f"{name:8s} batch {bs:3d} " + " ".join(f"{v:.5f}" for v in leak),
                  "rel. to one batch " + " ".join(f"{v / r - 1:+.1e}" for v, r in zip(leak, ref)), f"leaf named {named}")


class Wide(nn.Module):
    """The logits and the hidden features in one tensor ``[B, 3 + 10]`` (``wide``), or the logits alone."""

    def __init__(self, body: nn.Module, head: nn.Module, wide: bool) -> None:
        super().__init__()
        self.body, self.head, self.wide = body, head, wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([self.head(h), h], 1) if self.wide else self.head(h)


def run_columns(draws: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _nets import fit_lbfgs_ce

    def ce3(o, t):
        return F.cross_entropy(o[:, :3], t, reduction="none")

    for draw in range(draws):
        torch.manual_seed(draw)  # the labels' draw
        g = torch.Generator().manual_seed(0)
        x = torch.randn(400, 5, generator=g)
        y = torch.distributions.Categorical(logits=2 * x @ torch.randn(5, 3, generator=g)).sample()
        torch.manual_seed(0)
        body, head = nn.Sequential(nn.Linear(5, 10), nn.Tanh()), nn.Linear(10, 3)
        fit_lbfgs_ce(nn.Sequential(body, head).double(), x.double(), y, 1e-3, 3)  # tests/_nets.py
        body.float(), head.float()
        out = []
        for wide in (False, True):
            rep = ml.assess(Wide(body, head, wide), SCHEMES, DataLoader(TensorDataset(x, y), batch_size=100), ce3,
                            weight_decay=1e-3, estimation="exact", uncertainty_draws=0, covariance="independent",
                            mc_draws=1024)
            out.append(([rep.schemes[s].leakage for s in SCHEMES], rep.diagnostics.get("max_leverage")))
        (a, la), (b, lb) = out
        print(f"draw {draw}: 3 outputs " + " / ".join(f"{v:.4f}" for v in a) + f" (max leverage {la:.3g}); 13 outputs "
              + " / ".join(f"{v:.4f}" for v in b) + f" (max leverage {lb:.3g}); ratio "
              + " / ".join(f"{v / r:.3f}" for v, r in zip(b, a)) + f"; equal to 1e-9 {all(abs(v / r - 1) < 1e-9 for v, r in zip(b, a))}")


def run_probes() -> None:
    import time

    from mis_lightning.estimation.output_reads import unread_entries
    from mis_lightning.estimation.per_sample import LossProgram

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1000, 3000), nn.Tanh(), nn.Linear(3000, 3000), nn.Tanh(), nn.Linear(3000, 10))
    x, y = torch.randn(256, 1000), torch.randint(0, 10, (256,))
    prog = LossProgram(m, ce, [n for n, _ in m.named_parameters()])
    out = m(x).detach()

    def clock(f, k=5):
        f()
        t = time.process_time()
        for _ in range(k):
            f()
        return (time.process_time() - t) / k

    def step():
        m.zero_grad()
        ce(m(x), y).mean().backward()

    print(f"training step {clock(step) * 1e3:.1f} ms; random_in_train_mode "
          f"{clock(lambda: prog.random_in_train_mode(x, 256)) * 1e3:.2f} ms; unread_entries "
          f"{clock(lambda: unread_entries(out, ce, y, 256)) * 1e3:.2f} ms")


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "assess"
    mode = sys.argv[2] if len(sys.argv) > 2 else "exact"
    if what == "assess":
        run_assess(mode)
    elif what in ("callback", "hook"):
        run_lightning(what == "hook", mode)
    elif what == "late":
        run_late()
    elif what == "columns":
        run_columns(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    elif what == "probes":
        run_probes()
    else:
        raise SystemExit(__doc__)
