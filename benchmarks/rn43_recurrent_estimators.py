"""The diagonal sandwich against the exact one on small recurrent language models (rn43;
docs/benchmarks.md, "rn43"): nu42a's tied LSTM / GRU model (``benchmarks/nu42a_sequence_trial.py``),
trained by Adam (weight decay 1e-3, batches of 32) for a few or many epochs, its tied embedding and
decoder bias assessed (d = 108). Per fit: the exact sandwich's time, its negative-curvature and
not-at-a-minimum checks and gradient norm ratio; the ratio of its per-weight sigma to the diagonal
sandwich's (median, p10, p90), against the factor the diagonal report's warning states
(``sqrt`` of the median variance inflation factor).

    python benchmarks/rn43_recurrent_estimators.py                 # n = 192, LSTM and GRU, seeds 0-2, 4 and 40 epochs
    python benchmarks/rn43_recurrent_estimators.py --n 96 --kinds lstm --seeds 0 --epochs 40

Runtime: ~20-40 s per fit on one CPU thread (the exact sandwich takes the records one at a time).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from nu42a_sequence_trial import RecurrentLM, Sequences, collate, lm_batch, per_sample_loss
from torch.utils.data import DataLoader

import mis_lightning as ml
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig

HEAD = ["decoder.weight", "decoder.bias"]


def fit(kind: str, seed: int, n: int, epochs: int) -> tuple[RecurrentLM, Sequences]:
    torch.manual_seed(seed)
    model = RecurrentLM(kind)
    ds = Sequences(n, 1 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=g).split(32):
            b = collate([ds[int(i)] for i in idx])
            opt.zero_grad()
            per_sample_loss(model(b["input_ids"]), b["labels"]).mean().backward()
            opt.step()
    return model.eval(), ds


def compare(model: RecurrentLM, ds: Sequences) -> dict:
    loader = DataLoader(ds, batch_size=64, collate_fn=collate)
    cfg = dict(params=HEAD, weight_decay=1e-3)
    t0 = time.perf_counter()
    ex = run_estimation(model, loader, per_sample_loss, EstimationConfig(**cfg, mode="exact"), batch_fn=lm_batch)
    t_exact = time.perf_counter() - t0
    dg = run_estimation(model, loader, per_sample_loss, EstimationConfig(**cfg, mode="diagonal"), batch_fn=lm_batch)
    rep = ml.score_schemes(dg, model, ["rtn_int4"], uncertainty_draws=0)
    q = torch.cat([ex.sigma[k].flatten() for k in ex.names]) / torch.cat([dg.sigma[k].flatten() for k in dg.names])
    vif = rep.diagnostics.get("variance_inflation_median")
    return dict(t_exact=t_exact, neg=ex.diagnostics.get("negative_curvature"), notmin=ex.diagnostics.get("not_at_minimum"),
                gnr=ex.diagnostics.get("gradient_norm_ratio"), med=float(q.median()), p10=float(q.quantile(0.1)),
                p90=float(q.quantile(0.9)), stated=math.sqrt(vif) if vif else math.nan)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--kinds", nargs="+", default=["lstm", "gru"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", nargs="+", type=int, default=[4, 40])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for kind in a.kinds:
        for seed in a.seeds:
            for epochs in a.epochs:
                r = compare(*fit(kind, seed, a.n, epochs))
                print(f"{kind} seed {seed} epochs {epochs} n {a.n}: exact {r['t_exact']:.0f} s, negative curvature "
                      f"{r['neg']}, not at a minimum {r['notmin']}, gradient norm ratio {r['gnr']:.3g} | exact / diagonal "
                      f"sigma median {r['med']:.2f} (p10 {r['p10']:.2f}, p90 {r['p90']:.2f}) | stated "
                      f"{r['stated']:.2f}", flush=True)


if __name__ == "__main__":
    main()
