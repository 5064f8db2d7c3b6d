"""Does the plug-in read low on REAL coarse grids (cg30)? Per-row / group-wise absmax and min/max
schemes on trained least-squares weights, against the first-order leakage at the population weights.

    python benchmarks/real_grid_positions.py --spread 2 3 5 --trainings 12

Population: ``nn.Linear(in, out)`` least squares, ``y = Theta* x + s_o eps`` with ``x ~ N(0, I)``
(``n`` records) and ``Theta*_oi = S sigma_o g_oi``, ``g ~ N(0, 1)`` (``S = --spread``: the weights'
spread in sds of ``theta-hat``; a real scheme's step is then a fixed multiple of ``S`` sds:
``rtn_int2`` ~2.5 S, ``rtn_int3`` ~0.9 S on 128 weights a row). The positions of ``theta*`` in
its cells are set by each row's (group's) range, not uniform: this is the case the averaged
regime's assumption (method.md section 3, "Assumptions and limits") does not cover.

A training: fresh ``X`` and noise, the exact least-squares fit, the library's own estimation pass
(``mode="diagonal"``, ``leverage_correction=False``: first-order influences, so that the
reference below is the same functional) and :func:`score_schemes` with each real scheme: the
plug-in ``L(theta-hat)`` and its 80% interval.

References, each with the training's own stored records (so the record error cancels in the
ratio and only the positions and ``sigma-hat`` are compared) and the exact ``sigma`` (``s_o
sqrt((X'X)^-1_jj)``):

* ``released``: ``L(theta*)`` read on the grid the training released (its scales, revealed
  weights and bounds, set by ``theta-hat``): the scale is released, so the first-order leakage of
  the codes given the scale is the cells of that grid read at ``theta*`` (method.md section 3);
  averaged over trainings this is the population quantity.
* ``at_theta_star``: ``L(theta*)`` on the grid the scheme puts on ``theta*`` itself. Not the
  release's quantity: ``max |theta-hat|`` of a row is biased upward by its noise (the maximum of
  noisy values), so this grid is finer than any released one when ``S`` is a few sds; reported
  to show that difference.

Prints per scheme and spread: the mean, sd and min over trainings of ``plug-in / reference`` and
the coverage of each reference by the interval (which also carries the record error, absent from
the comparison: coverage is then an upper bound).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS = importlib.import_module("mis_lightning.assess")
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.quantization import get_scheme  # noqa: E402
from mis_lightning.quantization.base import QuantizationScheme  # noqa: E402

SCHEMES = ["rtn_int2", "rtn_int3", "intx_weight_only_int2_g32", "intx_weight_only_int3_g32",
           "intx_weight_only_int4_g32", "intx_weight_only_int2_g32_asym"]


class ReleasedGrid(QuantizationScheme):
    """The grids one release of ``scheme`` put on the trained weights, handed back unchanged
    for any model of the same shape (the reference reads them at ``theta*``)."""

    backend = "builtin"

    def __init__(self, scheme: QuantizationScheme, trained: nn.Module) -> None:
        super().__init__()
        self.name = scheme.name
        self.scale_rule = scheme.scale_rule
        self.rounding = scheme.rounding
        self._grids = scheme.apply(trained).grids

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module):
        grids = copy.deepcopy(self._grids)
        params = dict(model.named_parameters())
        for n, g in grids.items():
            params[n].copy_(g.dequantized.reshape(params[n].shape).to(params[n].dtype))
        return grids, []


def loss_fn(o, t):
    return 0.5 * (o - t).square().sum(-1)


def linear(weight: np.ndarray) -> nn.Module:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=False)  # float32: what torchao quantizes
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(weight))
    return m


def run(spread: float, out_f: int, in_f: int, n: int, trainings: int, records: int, schemes: list[str],
        covariance: str, seed: int) -> dict:
    g = np.random.default_rng([seed, out_f, in_f, n, 5])
    row_sd = np.exp(g.uniform(math.log(0.5), math.log(2.0), out_f))
    theta_star = spread * (row_sd / math.sqrt(n))[:, None] * g.standard_normal((out_f, in_f))
    star = linear(theta_star)
    rows = []
    for t in range(trainings):
        rg = np.random.default_rng([seed, t, 77])
        X = rg.standard_normal((n, in_f))
        Y = X @ theta_star.T + rg.standard_normal((n, out_f)) * row_sd[None]
        fit = np.linalg.lstsq(X, Y, rcond=None)[0].T
        model = linear(fit)
        loader = DataLoader(TensorDataset(torch.from_numpy(X).float(), torch.from_numpy(Y).float()), batch_size=8192)
        est = AS.run_estimation(model, loader, loss_fn, EstimationConfig(mode="diagonal", num_records=records,
                                                                          weight_decay=0.0, leverage_correction=False),
                                seed=t)
        sig = row_sd[:, None] * np.sqrt(np.diag(np.linalg.inv(X.T @ X)))[None]
        est_star = copy.copy(est)
        est_star.theta = {"weight": star.weight.detach().reshape(-1).to(est.theta["weight"].dtype).clone()}
        est_star.sigma = {"weight": torch.from_numpy(sig.reshape(-1).copy()).to(est.sigma["weight"].dtype)}
        real = [get_scheme(s) for s in schemes]
        kw = dict(uncertainty_draws=16, seed=t, covariance=covariance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = AS.score_schemes(est, model, real, **kw).schemes
            rel = AS.score_schemes(est_star, star, [ReleasedGrid(s, model) for s in real], **kw).schemes
            own = AS.score_schemes(est_star, star, real, **kw).schemes
        for s in schemes:
            r = got[s]
            rows.append({"training": t, "scheme": s, "plug_in": r.leakage, "lo": r.interval[0], "hi": r.interval[1],
                         "released": rel[s].leakage, "at_theta_star": own[s].leakage,
                         "regime": r.interval_regime, "covariance": r.covariance})
    return {"spread": spread, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spread", nargs="+", type=float, default=[2.0, 3.0, 5.0])
    ap.add_argument("--shape", default="16x128")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--trainings", type=int, default=12)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--covariance", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    out_f, in_f = (int(v) for v in a.shape.split("x"))
    res = []
    for S in a.spread:
        t0 = time.process_time()
        r = run(S, out_f, in_f, a.n, a.trainings, a.records, a.schemes, a.covariance, a.seed)
        res.append(r)
        for s in a.schemes:
            rr = [x for x in r["rows"] if x["scheme"] == s]
            parts = []
            for ref in ("released", "at_theta_star"):
                q = np.array([x["plug_in"] / x[ref] for x in rr])
                cov = np.mean([x["lo"] <= x[ref] <= x["hi"] for x in rr])
                below = np.mean([x["hi"] < x[ref] for x in rr])
                parts.append(f"/{ref} mean {q.mean():.3f} sd {q.std(ddof=1):.3f} min {q.min():.3f} "
                             f"cov {cov:.2f} (below {below:.2f})")
            print(f"S={S:g} {s:<32} " + " | ".join(parts) + f" | {rr[0]['regime']} {rr[0]['covariance']}", flush=True)
        print(f"S={S:g}: {time.process_time() - t0:.0f} s CPU", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": res}))
    return {"results": res}


if __name__ == "__main__":
    main()
