"""nux51's two misleading outputs, reproduced with MISCallback (docs/benchmarks.md, "hd51").

``cnn``: a Conv2d + BatchNorm2d CNN with a 2-logit softmax head (300 images 1x8x8, Adam 3 epochs, dict
batches): every scheme's correlated headline sits at the unquantized value; prints the table (with the
``indep.`` column), the flat directions' owners and cures, and each headline and independent form to 17
digits (the ``=`` mark's 1e-9 rule against int8's figure).

``tiedlm``: a tied-embedding LM that cannot learn its task (loss at chance ln 12): AdamW 60 epochs, then 60
more on a second Trainer (fresh optimizer state), then a fresh model resumed from the first checkpoint to
90 epochs; prints each table, the stationarity statistics, the baseline's cutoff check, and a
loss-threshold attack's advantage (600 members against 5,000 fresh records) for the first model.

Run from the repo root: ``OMP_NUM_THREADS=1 python benchmarks/misleading_headlines.py cnn`` (about 1 min on
one loaded core) or ``... tiedlm`` (about 5 min).
"""
from __future__ import annotations

import glob
import sys
import tempfile

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mis_lightning import MISCallback

torch.set_num_threads(1)


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def trainer(epochs: int, cb: MISCallback | None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=[cb] if cb else [], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp(prefix="mis_hd51_"))


class Images(Dataset):
    """Two classes of 1x8x8 noise images, the second shifted by 0.5; items as dicts."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1) * 0.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class CNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, i):
        return ce(self(batch["image"]), batch["label"]).mean()

    def validation_step(self, batch, i):
        self.log("val_loss", ce(self(batch["image"]), batch["label"]).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


V, D = 12, 6


def tokens(n: int, seed: int) -> TensorDataset:
    """4 tokens and a label: their sum mod 12 plus a coin (not learnable by a mean of embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, 4), generator=g)
    return TensorDataset(x, (x.sum(1) + torch.randint(0, 2, (n,), generator=g)) % V)


class TiedLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.block = nn.Embedding(V, D), nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        h = torch.tanh(self.block(torch.tanh(self.block(self.emb(x).mean(1)))))  # one Linear, called twice
        return F.linear(self.norm(h), self.emb.weight)  # tied head

    def training_step(self, b, i):
        return ce(self(b[0]), b[1]).mean()

    def validation_step(self, b, i):
        self.log("val_loss", ce(self(b[0]), b[1]).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-2, weight_decay=1e-3)


def show(cb: MISCallback, keys: tuple[str, ...]) -> None:
    r = cb.report
    print(r.table())
    for k in keys:
        print(f"{k}: {r.diagnostics.get(k)}")
    for k, s in r.schemes.items():
        print(f"{k:24s} leakage {s.leakage!r} (relative to the baseline {(s.leakage - r.baseline_leakage) / r.baseline_leakage:+.2e}) "
              f"independent {s.leakage_independent!r} d_eff {s.d_eff:.4f}")


def cnn() -> None:
    pl.seed_everything(0, workers=True)
    cb = MISCallback(schemes=["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"],
                     loss_fn=ce, batch_fn=lambda b: (b["image"], b["label"]))
    trainer(3, cb).fit(CNN(), DataLoader(Images(300, 1), batch_size=32, shuffle=True),
                       DataLoader(Images(100, 2), batch_size=50))
    show(cb, ("flat_directions", "hessian_condition", "flat_direction_parameters", "flat_direction_cures",
              "headline_unranked", "baseline_leakage_independent"))


def tiedlm() -> None:
    schemes = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "bf16"]
    keys = ("gradient_norm_ratio", "minimum_offset_sd", "not_at_minimum", "stiff_offset_sd", "records_unlike_training",
            "hessian_condition", "flat_directions", "baseline_cutoff_sensitivity", "baseline_leakage_independent")
    train, val = DataLoader(tokens(600, 1), batch_size=600), DataLoader(tokens(200, 2), batch_size=100)
    pl.seed_everything(0)
    m, cb = TiedLM(), MISCallback(schemes=schemes, loss_fn=ce)
    first = trainer(60, cb)
    first.fit(m, train, val)
    print("== 60 epochs")
    show(cb, keys)
    m.eval()
    with torch.no_grad():
        (xm, ym), (xf, yf) = tokens(600, 1).tensors, tokens(5000, 7).tensors
        lm, lf = ce(m(xm), ym), ce(m(xf), yf)
    ts = torch.cat([lm, lf]).sort().values
    adv = max(abs(float((lm < t).float().mean() - (lf < t).float().mean())) for t in ts)
    print(f"mean loss members {lm.mean():.4f} fresh {lf.mean():.4f} (ln 12 = 2.4849); loss-threshold attack "
          f"advantage {adv:.4f}")
    ckpt = sorted(glob.glob(f"{first.default_root_dir}/**/*.ckpt", recursive=True))[0]
    trainer(60, cb).fit(m, train, val)  # 60 more epochs, a fresh AdamW state
    print("== a second fit of 60 epochs")
    show(cb, keys)
    pl.seed_everything(0)
    cb3 = MISCallback(schemes=schemes, loss_fn=ce)
    trainer(90, cb3).fit(TiedLM(), train, val, ckpt_path=ckpt)
    print("== resumed from the 60-epoch checkpoint to 90 epochs")
    show(cb3, keys)


if __name__ == "__main__":
    {"cnn": cnn, "tiedlm": tiedlm}[sys.argv[1]]()
