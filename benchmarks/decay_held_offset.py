"""nux53 #14 / #8 (ux54b): a LayerNorm token model assessed on its training records and on
validation records: the Newton-step test split by the directions only the weight decay holds, the
stiff-direction statistic, and the reports' warnings.

The model and data are nux53's (its ``nux53pkg``, copied here): tokens ``[n, 6]`` over 40 ids with a
binary label from a noisy linear score, Embedding(40, e) -> mean -> LayerNorm -> Linear -> GELU ->
Linear, label-smoothed BCE (0.05), full-batch L-BFGS + L2 1e-3 in ``training_step``, 15 epochs.
Two sizes: ``j`` (n = 3,000 training and 3,000 validation records, emb 4, hidden 4: d = 193) and
``e`` (n = 2,000 and 4,000, emb 6, hidden 8: d = 317).

Usage (from the repo root; one thread)::

    PYTHONPATH=$PWD python benchmarks/decay_held_offset.py train OUT_DIR      # both sizes, ~1-2 min
    PYTHONPATH=$PWD python benchmarks/decay_held_offset.py diag OUT_DIR j      # the diagnostics, members / validation
    PYTHONPATH=$PWD python benchmarks/decay_held_offset.py assess OUT_DIR j [--int4] [-v]  # the reports
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mis_lightning as ml
from mis_lightning.estimation.estimate import estimate

VOCAB, SEQ, DECAY = 40, 6, 1e-3
SIZES = {"j": (3000, 3000, 4, 4), "e": (2000, 4000, 6, 8)}  # n_train, n_val, emb, hidden
KEYS = ("gradient_norm_ratio", "minimum_offset_sd", "minimum_offset_sd_rest", "decay_held_directions",
        "offset_held_parameters", "offset_decay_held", "stiff_offset_sd", "records_unlike_training",
        "hessian_min_eigenvalue", "hessian_condition", "flat_directions")


class Records(Dataset):
    def __init__(self, t: torch.Tensor, y: torch.Tensor) -> None:
        self.t, self.y = t, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.t[i], "y": self.y[i]}


def xy(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["tokens"], batch["y"]


def records(n_train: int, n_val: int) -> tuple[Records, Records]:
    """nux53's TokenBinary(seed=0): the same draws."""
    aff = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(0)
    n = n_train + n_val
    t = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    y = ((aff[t].sum(1) + 1.5 * torch.randn(n, generator=g)) > 0).float()
    return Records(t[:n_train], y[:n_train]), Records(t[n_train:], y[n_train:])


class TokenNet(pl.LightningModule):
    def __init__(self, emb: int, hidden: int, smoothing: float = 0.05) -> None:
        super().__init__()
        self.weight_decay, self.smoothing = DECAY, smoothing
        self.emb, self.norm = nn.Embedding(VOCAB, emb), nn.LayerNorm(emb)
        self.fc1, self.fc2 = nn.Linear(emb, hidden), nn.Linear(hidden, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(self.emb(t).mean(1))))).squeeze(-1)

    def per_sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.smoothing
        return F.binary_cross_entropy_with_logits(out, y * (1 - s) + 0.5 * s, reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        t, y = xy(batch)
        loss = self.per_sample_loss(self(t), y).mean()
        return loss + 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in self.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=100, history_size=20,
                                 line_search_fn="strong_wolfe")


def train(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for tag, (n, nval, emb, hidden) in SIZES.items():
        pl.seed_everything(0)
        tr, _ = records(n, nval)
        model = TokenNet(emb, hidden)
        pl.Trainer(max_epochs=15, enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False).fit(model, DataLoader(tr, batch_size=n))
        torch.save(model.state_dict(), out / f"{tag}.pt")
        print(tag, "saved", flush=True)


def load(out: Path, tag: str) -> tuple[TokenNet, Records, Records]:
    n, nval, emb, hidden = SIZES[tag]
    model = TokenNet(emb, hidden)
    model.load_state_dict(torch.load(out / f"{tag}.pt"))
    return model.eval(), *records(n, nval)


def diag(out: Path, tag: str) -> None:
    model, tr, va = load(out, tag)
    for which, ds in (("training", tr), ("validation", va)):
        est = estimate(model, DataLoader(ds, batch_size=500), model.per_sample_loss, batch_fn=xy,
                       weight_decay=DECAY, mode="exact")
        print(f"{tag} {which}: " + "; ".join(f"{k}={est.diagnostics.get(k)!r}" for k in KEYS), flush=True)


def assess(out: Path, tag: str, int4: bool, verbose: bool) -> None:
    model, tr, va = load(out, tag)
    schemes = ["int8_weight_only", *(["intx_weight_only_int4"] if int4 else []), "intx_weight_only_int2"]
    for which, ds in (("training", tr), ("validation", va)):
        rep = ml.assess(model, schemes, DataLoader(ds, batch_size=500), model.per_sample_loss, batch_fn=xy,
                        weight_decay=DECAY)
        print(f"\n##### {tag} {which} records\n{rep.table()}")
        if verbose:
            print(rep.warnings_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, folder = sys.argv[1], Path(sys.argv[2])
    if cmd == "train":
        train(folder)
    elif cmd == "diag":
        diag(folder, sys.argv[3])
    else:
        assess(folder, sys.argv[3], "--int4" in sys.argv[4:], "-v" in sys.argv[4:])
