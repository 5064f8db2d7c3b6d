"""A head fine-tuned on a frozen pretrained backbone: what the report's utility and size describe
(fz44; docs/benchmarks.md, "fz44").

A ``20 -> 64 -> 64`` tanh backbone is pretrained (with a throw-away head) on public records, frozen
(``requires_grad_(False)``), and a new ``64 -> 3`` head is fitted (Adam, coupled L2 = the objective's
``weight_decay``) on 2,048 private records. ``assess`` then scores the head (the trained weights)
under each scheme; the script prints each scheme's utility (validation loss, accuracy) beside the
utility of the whole model quantized by the scheme (``scheme.apply(model)``, what
``torchao.quantization.quantize_`` ships) and of the head alone quantized, the bits per weight,
and the warnings on the frozen weights. ``intx_weight_only_int4_g32`` leaves the backbone's first
layer in float (``in_features`` 20 is not a multiple of 32): the report must say so. ``fronts``
also runs ``MISIndicator`` and ``MISCallback`` on the same weights and records.

    python benchmarks/fz44_frozen_backbone.py            # assess: figures and warnings
    python benchmarks/fz44_frozen_backbone.py --fronts   # ... and MISIndicator / MISCallback vs assess
    python benchmarks/fz44_frozen_backbone.py --cost 1024   # one copy's CPU s: head alone vs whole model

Runtime (1 thread): about 11 CPU s with ``--fronts`` (97 s wall at load 18 on 2 shared cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.evaluation import evaluate_utility
from mis_lightning.quantization import get_scheme

SCHEMES = ["none", "int8_weight_only", "rtn_int4", "intx_weight_only_int4_g32", "bf16"]
WD, NREC = 1e-3, 256


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] * x[:, 3] > 0.3).long()
    return TensorDataset(x, y)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _fit(model: nn.Module, ds: TensorDataset, steps: int, wd: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=wd)
    x, y = ds.tensors
    for _ in range(steps):
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        opt.step()


def build() -> tuple[Net, TensorDataset, TensorDataset]:
    torch.manual_seed(0)
    model = Net()
    _fit(model, data(4096, 10), 300, 0.0)  # "pretraining" on public records
    model.backbone.requires_grad_(False)
    model.head = nn.Linear(64, 3)  # a new head, fitted on the private records
    train, val = data(2048, 1), data(512, 2)
    _fit(model, train, 600, WD)
    return model.eval(), train, val


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fronts", action="store_true")
    ap.add_argument("--cost", type=int, default=0, metavar="WIDTH",
                    help="only time one scheme's quantized copy, head alone vs whole model, on a frozen "
                         "WIDTH x WIDTH two-layer backbone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cost:
        cost(args.cost)
        return
    model, train, val = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    vl = DataLoader(val, batch_size=256)
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, SCHEMES, DataLoader(train, batch_size=128), ce, weight_decay=WD,
                        num_records=NREC, val_dataloader=vl, uncertainty_draws=0)
    print(f"assess: {time.process_time() - t0:.1f} CPU s; n = {rep.n}, d = {rep.d} assessed of "
          f"{sum(p.numel() for p in model.parameters())} weights")
    print(f"model untouched: weights {all(torch.equal(before[k], v) for k, v in model.state_dict().items())}, "
          f"requires_grad {flags == [p.requires_grad for p in model.parameters()]}")
    print("scheme: validation loss in the report | of the whole model quantized | of the head alone quantized ; "
          "accuracy of the whole model quantized ; bits/w (model b/w)")
    for s in SCHEMES:
        r = rep.schemes[s]
        if r.error:
            print(f"  {s:28s} error {r.error:.100}")
            continue
        whole = get_scheme(s).apply(model).model
        head = get_scheme(s).apply(model, params=["head.weight", "head.bias"]).model
        uw, uh = evaluate_utility(whole, vl, ce), evaluate_utility(head, vl, ce)
        acc = float(torch.cat([accuracy(whole(x), y) for x, y in vl]).mean())
        mb = getattr(r, "model_bits_per_weight", None)
        print(f"  {s:28s} {r.utility['loss']:.6f} | {uw['loss']:.6f} | {uh['loss']:.6f} ; whole acc {acc:.4f} ; "
              f"{r.bits_per_weight:.2f} ({'-' if mb is None else f'{mb:.2f}'}); leakage {r.leakage:.6f}")
    print("warnings on frozen / unassessed weights:")
    for w in rep.warnings:
        if any(k in w for k in ("frozen", "not assessed", "outside the assessment", "in float")):
            print("  -", w)
    table = rep.table()
    print(table.split("\n\n")[0])
    print("\n".join(ln for ln in table.splitlines() if ln.startswith(("verdict", "estimated by"))))
    if args.fronts:
        fronts(model, train, val, rep)


def cost(width: int, repeats: int = 3) -> None:
    """CPU seconds of ``apply`` as the scoring calls it (zero counts only, shared scale facts) for
    the head alone (before fz44) and the whole model (after), per scheme: the added cost of
    quantizing a frozen backbone; the median of ``repeats``, alternated."""
    from mis_lightning.quantization.base import scale_facts_shared, zero_counts_only

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10)).eval()
    model[:4].requires_grad_(False)
    head = ["4.weight", "4.bias"]
    print(f"cost: frozen backbone {2 * width * (width + 1):,} weights, head {10 * (width + 1):,}")
    for s in SCHEMES[1:]:
        times: dict[str, list[float]] = {"head": [], "whole": []}
        for _ in range(repeats):
            for k, params in (("head", head), ("whole", None)):
                t0 = time.process_time()
                with zero_counts_only(), scale_facts_shared([]):
                    get_scheme(s).apply(model, params=params)
                times[k].append(time.process_time() - t0)
        h, w = (sorted(v)[len(v) // 2] for v in times.values())
        print(f"  {s:28s} head alone {h:.3f} CPU s, whole model {w:.3f} CPU s (+{w - h:.3f})")


def fronts(model: Net, train: TensorDataset, val: TensorDataset, ref) -> None:
    """MISIndicator and MISCallback on the same weights and records: the same utility and leakage."""
    import pytorch_lightning as pl

    vl = DataLoader(val, batch_size=256)
    metric = ml.MISIndicator(model, ce, SCHEMES, weight_decay=WD, num_records=NREC, uncertainty_draws=0,
                             num_training_records=len(train),
                             utility_fn=lambda m: evaluate_utility(m, vl, ce))
    for x, y in DataLoader(train, batch_size=128):
        metric.update(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.compute()
    mrep = metric.report

    class Lit(pl.LightningModule):
        def __init__(self, net: Net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return ce(self(batch[0]), batch[1]).mean()

        def validation_step(self, batch, i):
            self.log("val_loss", ce(self(batch[0]), batch[1]).mean())

        def configure_optimizers(self):
            # lr 0: the callback assesses the weights as given (the same as assess's)
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)

    lit = Lit(model)
    cb = ml.MISCallback(SCHEMES, loss_fn=ce, weight_decay=WD, num_records=NREC, uncertainty_draws=0)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", enable_checkpointing=False,
                        default_root_dir=root)
        tr.fit(lit, DataLoader(train, batch_size=128), vl)
    crep = cb.report
    names = {"MISIndicator": mrep, "MISCallback": crep}
    for s in SCHEMES:
        a = ref.schemes[s]
        if a.error:
            continue
        line = [f"  {s:28s} assess loss {a.utility['loss']:.6f} leakage {a.leakage:.6f}"]
        for k, r in names.items():
            b = r.schemes[s]
            line.append(f"{k} loss {b.utility.get('loss', float('nan')):.6f} leakage {b.leakage:.6f}")
        print("; ".join(line))
    def frozen_words(rep) -> list[str]:  # the callback's module wraps the net: names start with "net."
        return [w.replace("net.", "") for w in rep.warnings if "frozen" in w or "outside the assessment" in w]

    for k, r in names.items():
        print(f"  {k}: warnings on frozen weights equal to assess's: {frozen_words(r) == frozen_words(ref)}")


if __name__ == "__main__":
    main()
