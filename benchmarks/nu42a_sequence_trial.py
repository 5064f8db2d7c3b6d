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
    python benchmarks/nu42a_sequence_trial.py --reference              # + independent references (below)
    python benchmarks/nu42a_sequence_trial.py --rnn bag --params all --reference
    python benchmarks/nu42a_sequence_trial.py --batch-check   # + assess at batch 16 and 128, num_records=64
    python benchmarks/nu42a_sequence_trial.py --misconfig     # only: each mistake refused before training

``--reference`` compares the assessment with references computed here by plain autograd, one
record at a time in float64: the per-record gradient variances of the assessed weights (the tied
weight's two paths, through the LSTM included), the rank of their covariance ``V`` and the
first-order float leakage ``E|V^+1/2 g| / sqrt(2 pi n)`` (method.md), the exact Hessian of the mean
loss (double backward through the recurrent layer) with its smallest eigenvalue, and the exact
marginal sd ``sqrt(diag(H^-1 V H^-1) / n)`` against the estimator's sigma; with ``--rnn bag`` also
``estimation="exact"`` against ``"diagonal"``; for the recurrent models also the library's exact
sandwich (its negative-curvature check, and its sigma against the reference's marginal sd with the
Hessian's negative eigenvalues read as magnitudes, as the library reads them).

Runtime: ~10-30 s on one CPU thread (4 epochs of 384 records, then 4 schemes); ``--reference`` adds
~20-60 s.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mis_lightning as ml
from mis_lightning import MISCallback
from mis_lightning.assess import run_estimation, select_params
from mis_lightning.config import EstimationConfig

VOCAB, WIDTH, PAD, IGNORE = 12, 8, 0, -100
SCHEMES = ["none", "int8_weight_only", "native_int8_per_row", "rtn_int4"]


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


def reference(model: RecurrentLM, params: list[str] | None, weight_decay: float = 1e-3) -> None:
    """Print the references of the module doc against the library's estimation of ``model``."""
    bag = model.kind == "bag"
    bf = cls_batch if bag else lm_batch
    ds = Sequences(384, 1)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate)  # the callback's estimation pass reads it so
    names = select_params(model, params)
    m64 = copy.deepcopy(model).double().eval()
    named = dict(m64.named_parameters())
    ps = [named[k] for k in names]
    rows = []
    for b in loader:
        x, y = bf(b)
        for i in range(len(x)):
            loss = per_sample_loss(m64(x[i: i + 1]), y[i: i + 1]).sum()
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps)]))
    g = torch.stack(rows)
    n, d = g.shape
    gc = g - g.mean(0)
    v = gc.T @ gc / n
    ev = torch.linalg.eigvalsh(v)
    rank = int((ev > 1e-10 * ev.max()).sum())
    base = float((gc @ torch.linalg.pinv(v, hermitian=True, rtol=1e-10) * gc).sum(1).sqrt().mean()) / math.sqrt(2 * math.pi * n)
    print(f"reference (autograd per record, float64): d = {d}, n = {n}, rank V = {rank}, first-order float "
          f"leakage {base:.4f}")
    h = torch.zeros(d, d, dtype=torch.float64)
    try:
        for b in loader:
            x, y = bf(b)
            grads = torch.autograd.grad(per_sample_loss(m64(x), y).sum() / n, ps, create_graph=True)
            flat = torch.cat([t.flatten() for t in grads])
            for j in range(d):
                h[j] += torch.cat([t.flatten() for t in torch.autograd.grad(flat[j], ps, retain_graph=True)])
    except (NotImplementedError, RuntimeError) as exc:  # embedding_bag has no second derivative
        h = None
        print(f"  exact Hessian not available ({str(exc)[:60]})")
    if h is not None:
        h = (h + h.T) / 2 + weight_decay * torch.eye(d, dtype=torch.float64)
        hi = torch.linalg.inv(h)
        sd = ((hi @ v @ hi).diagonal() / n).sqrt()
        print(f"  exact Hessian eigenvalues [{float(torch.linalg.eigvalsh(h).min()):.4g}, "
              f"{float(torch.linalg.eigvalsh(h).max()):.4g}]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = run_estimation(model, loader, per_sample_loss, EstimationConfig(params=params, weight_decay=weight_decay),
                             batch_fn=bf)
    if est._v_diag is not None:  # held standardising the influences: V_jj (1 - mean leverage) where corrected
        vd = torch.cat([est._v_diag[k].flatten() for k in est.names]).double() / v.diagonal()
        print(f"  library V_jj / reference V_jj: {float(vd.min()):.6f} .. {float(vd.max()):.6f} "
              f"(influence scale {est.influence_scale:.4f}: 1 / scale^2 = {est.influence_scale ** -2:.6f})")
    if h is not None:
        q = sd / torch.cat([est.sigma[k].flatten() for k in est.names]).double()
        print(f"  exact marginal sd / library sigma ({est.estimator}): median {float(q.median()):.3f}, "
              f"p10 {float(q.quantile(0.1)):.3f}, p90 {float(q.quantile(0.9)):.3f}")
    if h is not None:  # the library's exact sandwich (rn43: recurrent layers taken one record at a time)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex = run_estimation(model, loader, per_sample_loss,
                                EstimationConfig(params=params, weight_decay=weight_decay, mode="exact"), batch_fn=bf)
        ev_h, vec = torch.linalg.eigh(h)
        habs = vec @ torch.diag(ev_h.abs()) @ vec.T  # negative eigenvalues as magnitudes, as the library reads them
        hai = torch.linalg.inv(habs)
        sd_abs = ((hai @ v @ hai).diagonal() / n).sqrt()
        sx = torch.cat([ex.sigma[k].flatten() for k in ex.names]).double()
        print(f"  library exact sandwich ({time.perf_counter() - t0:.1f} s): negative curvature "
              f"{ex.diagnostics.get('negative_curvature')}, not at a minimum {ex.diagnostics.get('not_at_minimum')}; "
              f"reference sd with |eigenvalues| / library sigma: median {float((sd_abs / sx).median()):.4f}, "
              f"range {float((sd_abs / sx).min()):.4f} .. {float((sd_abs / sx).max()):.4f}")
    if bag:
        for mode in ("exact", "diagonal"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = ml.assess(model, ["rtn_int4"], loader, per_sample_loss, batch_fn=bf, params=params,
                                weight_decay=weight_decay, estimation=mode, uncertainty_draws=0)
            print(f"  estimation={mode!r}: float leakage {rep.baseline_leakage:.4f} ({rep.baseline_leakage / base:.3f}x the "
                  f"reference), rtn_int4 {rep.schemes['rtn_int4'].leakage:.4f}")


def batch_check(model: RecurrentLM) -> None:
    """``assess`` of the same weights over the training records batched by 16 and by 128 (labels
    padded with -100 to each batch's longest), 64 of the 384 records sampled: the figures should
    not depend on the batching."""
    bf = cls_batch if model.kind == "bag" else lm_batch
    head = ["head.weight", "head.bias"] if model.kind == "bag" else ["decoder.weight", "decoder.bias"]
    got = {}
    for bs in (16, 128):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = ml.assess(model, ["rtn_int4"], DataLoader(Sequences(384, 1), batch_size=bs, collate_fn=collate),
                            per_sample_loss, batch_fn=bf, params=head, weight_decay=1e-3, num_records=64,
                            uncertainty_draws=0)
        got[bs] = (rep.baseline_leakage, rep.schemes["rtn_int4"].leakage)
        print(f"batch {bs}: float leakage {got[bs][0]:.5f}, rtn_int4 {got[bs][1]:.5f}")
    print(f"batch 128 / batch 16: float {got[128][0] / got[16][0]:.4f}, rtn_int4 {got[128][1] / got[16][1]:.4f}")


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # [B, T]


def _batch_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(logits, labels).mean()  # reduced over the batch


def misconfig() -> None:
    """Each mistake a user can make with this model, and the optimizer steps taken before the error."""
    head = ["decoder.weight", "decoder.bias"]
    cases = {"no loss_fn": dict(batch_fn=lm_batch, params=head),
             "dict batches, no batch_fn": dict(loss_fn=per_sample_loss, params=head),
             "loss reduced over the batch": dict(loss_fn=_batch_mean, batch_fn=lm_batch, params=head),
             "per-token loss [B, T]": dict(loss_fn=_token_losses, batch_fn=lm_batch, params=head),
             "LSTM weights assessed": dict(loss_fn=per_sample_loss, batch_fn=lm_batch)}
    for what, kw in cases.items():
        trainer = pl.Trainer(max_epochs=1, callbacks=[MISCallback(["rtn_int4"], **kw)], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(RecurrentLM(), DataLoader(Sequences(64, 1), batch_size=32, collate_fn=collate))
            print(f"[{what}] not refused")
        except (ValueError, TypeError) as exc:
            print(f"[{what}] {type(exc).__name__} after {trainer.global_step} steps: {str(exc)[:300]}")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rnn", default="lstm", choices=["lstm", "gru", "rnn", "bag"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--params", default="head", choices=["head", "all"])
    ap.add_argument("--estimation", default="auto")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reference", action="store_true", help="also the independent references (module doc)")
    ap.add_argument("--batch-check", action="store_true", help="also assess at two batch sizes (64 records)")
    ap.add_argument("--misconfig", action="store_true", help="only the misconfiguration checks")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.misconfig:
        return misconfig()
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
    if a.reference:
        head = ["head.weight", "head.bias"] if a.rnn == "bag" else ["decoder.weight", "decoder.bias"]
        reference(model, head if a.params == "head" else None)
    if a.batch_check:
        batch_check(model)
    return cb


if __name__ == "__main__":
    main()
