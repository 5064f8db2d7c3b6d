"""A researcher's trial of ``MISCallback``, ``MISIndicator`` and ``assess`` on a small recurrent
language model (nu42a; docs/benchmarks.md, "nu42a"): ``nn.Embedding(padding_idx=0)`` ->
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (batch_first) -> a Linear decoder whose weight is tied to the
embedding, next-token loss over padded sequences (per record: the mean over its tokens, ignore
index -100), dict batches, dropout, Adam on minibatches, CSVLogger; or an ``nn.EmbeddingBag``
classifier (``--rnn bag``). Checks that the run leaves the training bit-identical (weights,
optimizer state, RNG, the tie) and prints the table.

    python benchmarks/nu42a_sequence_trial.py                       # LSTM, head + tied embedding assessed
    python benchmarks/nu42a_sequence_trial.py --rnn gru --bidirectional
    python benchmarks/nu42a_sequence_trial.py --rnn bag

Runtime: ~10-30 s on one CPU thread (4 epochs of 384 records, then 4 schemes).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mis_lightning import MISCallback

VOCAB, WIDTH, PAD, IGNORE = 12, 8, 0, -100
SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "rtn_int4"]


class Sequences(Dataset):
    """Token sequences of 4-10 tokens from a fixed Markov chain over tokens 1..VOCAB-1 (0 pads),
    with a class label (does token 3 occur more often than token 5?). Items are dicts."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        trans = torch.softmax(3 * torch.randn(VOCAB - 1, VOCAB - 1, generator=torch.Generator().manual_seed(7)), -1)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(4, 11, (1,), generator=g))
            tok = [int(torch.randint(0, VOCAB - 1, (1,), generator=g))]
            for _ in range(length - 1):
                tok.append(int(torch.multinomial(trans[tok[-1]], 1, generator=g)))
            ids = torch.tensor(tok) + 1
            self.items.append({"input_ids": ids[:-1], "labels": ids[1:], "cls": int((ids == 3).sum() > (ids == 5).sum())})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> dict:
    """Pad to the longest sequence of the batch, at the end: inputs with PAD, labels with IGNORE."""
    t = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), t), PAD)
    lab = torch.full((len(items), t), IGNORE)
    for i, it in enumerate(items):
        ids[i, : len(it["input_ids"])] = it["input_ids"]
        lab[i, : len(it["labels"])] = it["labels"]
    return {"input_ids": ids, "labels": lab, "cls": torch.tensor([it["cls"] for it in items])}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of each sequence, the mean over its non-ignored tokens: [B]."""
    if logits.dim() == 2:  # the bag classifier: one label per record
        return F.cross_entropy(logits, labels, reduction="none")
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # [B, T]
    return tok.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


def lm_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["labels"]


def cls_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["cls"]


class RecurrentLM(pl.LightningModule):
    def __init__(self, rnn: str = "lstm", layers: int = 1, bidirectional: bool = False,
                 weight_decay: float = 1e-3, lr: float = 1e-2) -> None:
        super().__init__()
        self.weight_decay, self.lr, self.kind = weight_decay, lr, rnn
        self.drop = nn.Dropout(0.1)
        if rnn == "bag":
            self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean", padding_idx=PAD)
            self.head = nn.Linear(WIDTH, 2)
            return
        self.embedding = nn.Embedding(VOCAB, WIDTH, padding_idx=PAD)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[rnn]
        self.rnn = cls(WIDTH, WIDTH // (2 if bidirectional else 1), num_layers=layers, batch_first=True,
                       bidirectional=bidirectional)
        self.decoder = nn.Linear(WIDTH, VOCAB)
        self.decoder.weight = self.embedding.weight  # weight tying (Press & Wolf 2017)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "bag":
            return self.head(self.drop(self.bag(ids)))
        h, _ = self.rnn(self.drop(self.embedding(ids)))
        return self.decoder(self.drop(h))

    def _loss(self, batch: dict) -> torch.Tensor:
        x, y = (cls_batch if self.kind == "bag" else lm_batch)(batch)
        return per_sample_loss(self(x), y).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def fit(args, with_callback: bool, out: str):
    pl.seed_everything(0)
    model = RecurrentLM(args.rnn, args.layers, args.bidirectional)
    train = DataLoader(Sequences(384, 1), batch_size=32, shuffle=True, collate_fn=collate)
    val = DataLoader(Sequences(128, 2), batch_size=64, collate_fn=collate)
    cbs = []
    if with_callback:
        kw = {}
        if args.params == "head":
            kw["params"] = ["head.weight", "head.bias"] if args.rnn == "bag" else ["decoder.weight", "decoder.bias"]
        cbs.append(MISCallback(SCHEMES, loss_fn=per_sample_loss, batch_fn=cls_batch if args.rnn == "bag" else lm_batch,
                               estimation=args.estimation, **kw))
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=cbs, logger=CSVLogger(out, name="csv"),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    opt = trainer.optimizers[0].state_dict()
    return model, opt, torch.rand(3), (cbs[0] if cbs else None)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rnn", default="lstm", choices=["lstm", "gru", "rnn", "bag"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--params", default="head", choices=["head", "all"])
    ap.add_argument("--estimation", default="auto")
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="nu42a_")
    ref_model, ref_opt, ref_rng, _ = fit(a, False, out)
    t0 = time.perf_counter()
    model, opt, rng, cb = fit(a, True, out)
    print(f"fit + assessment: {time.perf_counter() - t0:.1f} s; logs in {out}")
    same_w = all(torch.equal(p, q) for p, q in zip(ref_model.state_dict().values(), model.state_dict().values()))
    same_opt = all(torch.equal(s1[k], s2[k]) for s1, s2 in zip(ref_opt["state"].values(), opt["state"].values())
                   for k in s1 if torch.is_tensor(s1[k]))
    tied = a.rnn == "bag" or model.decoder.weight is model.embedding.weight
    print(f"weights identical: {same_w}; optimizer state identical: {same_opt}; RNG identical: "
          f"{torch.equal(ref_rng, rng)}; tie kept: {tied}")
    print(cb.report.table())
    print("estimator:", cb.report.estimation.get("estimator"), "|", cb.report.estimation.get("reason"))
    return cb


if __name__ == "__main__":
    main()
