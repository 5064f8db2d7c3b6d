"""Empirical attacks (loss threshold, LiRA-offline) vs the indicator, per quantization scheme.

    python benchmarks/attacks.py [--targets 10] [--k-ref 8] [--d 50] [--n 200]
    python benchmarks/attacks.py --data chembl --featurizer physchem --n 200 --targets 20

Synthetic logistic regression (Gaussian design, ridge 1e-3, Newton), or ``--data chembl``:
logistic regression (features + an intercept column, Newton, ``--ridge``) on
``mis_lightning.data.ChEMBLDataModule(task="binary")`` features (1,017 compounds, active iff
activity >= 6.5): for each target the records are re-shuffled into ``n`` members, ``n``
non-members, ``n`` null non-members and the rest as the shadow pool. A linear layer is
released under each scheme. For each of ``--targets`` target models (fresh members / non-members /
shadow pool each time) both attacks are run on every quantized copy; the indicator is
``assess(..., estimation="exact")`` on the same target model. Prints per scheme: indicator
Delta (p10-p90), attack AUC, TPR@1%FPR, advantage max(TPR-FPR) (mean +- s.e. over targets),
and the Kendall tau between the indicator's and each attack's ranking of the schemes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sstats
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning import assess
from mis_lightning.groundtruth.attacks import run_attacks
from mis_lightning.groundtruth.ground_truth import newton_logistic

RIDGE = 1e-3


class Lin(nn.Module):
    def __init__(self, th: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(th.shape[0], 1, bias=False).double()
        with torch.no_grad():
            self.linear.weight.copy_(th.reshape(1, -1))

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def loss_fn(out, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")


def chembl_records(featurizer: str, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ChEMBL2321810 records (every split of the datamodule), binary labels, with an
    intercept column appended (the released layer has no separate bias)."""
    import warnings

    from mis_lightning.data import ChEMBLDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = ChEMBLDataModule(task="binary", featurizer=featurizer, n_bits=n_bits)
        dm.setup()
    xs, ys = [], []
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x, y = ds[:]
        xs.append(torch.as_tensor(x, dtype=torch.float64))
        ys.append(torch.as_tensor(y, dtype=torch.float64).reshape(-1))
    x = torch.cat(xs)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1), torch.cat(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--k-ref", type=int, default=8)
    ap.add_argument("--d", type=int, default=50)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--schemes", nargs="+", default=["none", "rtn_int8", "rtn_int4", "rtn_int3", "rtn_int2"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--data", choices=["synthetic", "chembl"], default="synthetic")
    ap.add_argument("--featurizer", default="physchem", help="ChEMBL features: physchem, descriptors, morgan")
    ap.add_argument("--n-bits", type=int, default=128, help="Morgan fingerprint length (--featurizer morgan)")
    ap.add_argument("--ridge", type=float, default=RIDGE, help="L2 of the logistic fit (weight_decay of assess)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ridge = args.ridge
    d, n = args.d, args.n
    rng = np.random.default_rng(0)

    def train(x, y):
        th = newton_logistic(x[None], y[None], torch.zeros(x.shape[1], dtype=torch.float64), ridge=ridge)[0]
        return Lin(th)

    if args.data == "chembl":
        X, Y = chembl_records(args.featurizer, args.n_bits)
        d = X.shape[1]
        if X.shape[0] < 4 * n:
            raise SystemExit(f"--n {n} too large for {X.shape[0]} ChEMBL records (need 3n + a pool >= n)")
        splits = {}

        def draw_target(t):
            perm = torch.from_numpy(np.random.default_rng([t, 17]).permutation(X.shape[0]))
            parts = [perm[:n], perm[n:2 * n], perm[2 * n:3 * n], perm[3 * n:]]
            splits[t] = [len(p) for p in parts]
            return [(X[p], Y[p]) for p in parts]
    else:
        theta = torch.from_numpy(rng.standard_normal(d) * 2.0 / np.sqrt(d))

        def draw(k):
            x = torch.randn(k, d, dtype=torch.float64)
            y = (torch.rand(k, dtype=torch.float64) < torch.sigmoid(x @ theta)).double()
            return x, y

        def draw_target(t):
            return draw(n), draw(n), draw(n), draw(10 * n)

    torch.manual_seed(0)
    res = {s: {"ind": [], "iv": [], "loss": [], "lira": [], "loss_null": [], "lira_null": []} for s in args.schemes}
    t_ind = t_att = 0.0
    for t in range(args.targets):
        mem, non, null, pool = draw_target(t)
        target = train(*mem)
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*mem), batch_size=n)
        rep = assess(target, [s for s in args.schemes], loader, loss_fn, estimation="exact",
                     weight_decay=ridge, num_records=n, uncertainty_draws=16, seed=t)
        t_ind += time.perf_counter() - t0
        t0 = time.perf_counter()
        att = run_attacks(train, loss_fn, mem, non, pool, args.schemes, k_ref=args.k_ref, seed=t, target=target,
                          null=null)
        t_att += time.perf_counter() - t0
        for s in args.schemes:
            r = rep.schemes[s]
            res[s]["ind"].append(r.leakage)
            res[s]["iv"].append(r.interval if r.interval else (r.leakage, r.leakage))
            for a in ("loss", "lira", "loss_null", "lira_null"):
                m = att[s][a]
                res[s][a].append((m.auc, m.tpr_at_1fpr, m.advantage))
    what = ("synthetic" if args.data == "synthetic" else f"ChEMBL ({args.featurizer}) binary") + " logistic regression"
    lines = [f"{what} d={d}, n={n}, {args.targets} target models, k_ref={args.k_ref}",
             "| scheme | indicator Delta | p10-p90 | loss AUC | loss TPR@1% | loss adv. | LiRA AUC | LiRA TPR@1% | LiRA adv. | null adv. (loss / LiRA) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summ = {}
    for s in args.schemes:
        ind = np.mean(res[s]["ind"])
        iv = np.mean(res[s]["iv"], 0)
        L, R = np.array(res[s]["loss"]), np.array(res[s]["lira"])
        LN, RN = np.array(res[s]["loss_null"]), np.array(res[s]["lira_null"])
        se = lambda v: v.std() / np.sqrt(len(v))
        lines.append(f"| {s} | {ind:.4f} | {iv[0]:.4f}-{iv[1]:.4f} | {L[:,0].mean():.3f} | {L[:,1].mean():.3f} | "
                     f"{L[:,2].mean():.3f}+-{se(L[:,2]):.3f} | {R[:,0].mean():.3f} | {R[:,1].mean():.3f} | "
                     f"{R[:,2].mean():.3f}+-{se(R[:,2]):.3f} | {LN[:,2].mean():.3f} / {RN[:,2].mean():.3f} |")
        summ[s] = {"indicator": ind, "interval": iv.tolist(), "loss": L.mean(0).tolist(), "lira": R.mean(0).tolist(),
                   "loss_adv_se": float(se(L[:, 2])), "lira_adv_se": float(se(R[:, 2])),
                   "loss_null": LN.mean(0).tolist(), "lira_null": RN.mean(0).tolist()}
    ind_v = [summ[s]["indicator"] for s in args.schemes]
    for a in ("loss", "lira"):
        tau = sstats.kendalltau(ind_v, [summ[s][a][2] for s in args.schemes]).statistic
        tau_auc = sstats.kendalltau(ind_v, [summ[s][a][0] for s in args.schemes]).statistic
        lines.append(f"\nKendall tau indicator vs {a} advantage: {tau:.2f}; vs {a} AUC: {tau_auc:.2f}")
        summ[f"tau_{a}"] = float(tau)
    lines.append(f"\ntime per target: indicator (assess, {len(args.schemes)} schemes) {t_ind / args.targets:.2f}s; "
                 f"reference-model attack ({args.k_ref} reference models, both attacks) {t_att / args.targets:.2f}s")
    summ["t_indicator"] = t_ind / args.targets
    summ["t_attack"] = t_att / args.targets
    summ["config"] = {"data": args.data, "d": d, "n": n, "targets": args.targets, "k_ref": args.k_ref,
                      "ridge": ridge, "featurizer": args.featurizer if args.data == "chembl" else None,
                      "command": "python benchmarks/attacks.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for a in ("loss", "lira"):
        summ[f"tau_{a}_auc"] = float(sstats.kendalltau(ind_v, [summ[s][a][0] for s in args.schemes]).statistic)
        summ[f"tau_{a}_tpr"] = float(sstats.kendalltau(ind_v, [summ[s][a][1] for s in args.schemes]).statistic)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summ, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
