"""The sampling error of ``sigma-hat`` (exact sandwich) over simulated trainings against the
position search's relative se: ``sd(w^2) / (2 sqrt(n))`` (since rn28: ``sigma-hat^2`` is a mean
over all ``n`` records) and the former ``sd(w^2) / (2 sqrt(R))`` (R stored records). method.md
section 3, "The step in sd units"; docs/validation.md, "Which records are stored; sigma's sample".

Independent of the library: closed-form OLS (d = 2, correlated features; normal, Student-t(3) and
heteroscedastic errors) and a Newton-fitted logistic regression, each sandwich computed directly.
Per model: the relative sd of ``sigma-hat_1`` over the trainings and the two forms' mean.
Runtime: ~30 s CPU with the defaults.

    python benchmarks/sigma_sampling_error.py                       # n = 3000, R = 512, 400 trainings
    python benchmarks/sigma_sampling_error.py --trainings 50        # quick
"""

from __future__ import annotations

import argparse
import math

import torch


def sandwich(x: torch.Tensor, gi: torch.Tensor, hm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight sd ``[d]`` and the standardised influences ``w`` ``[n, d]``."""
    n = x.shape[0]
    psi = -gi @ torch.linalg.inv(hm)
    s = psi.T @ psi / n
    return torch.sqrt(torch.diag(s) / n), psi / torch.sqrt(torch.diag(s))


def ols(n: int, kind: str, g: torch.Generator):
    x = torch.randn(n, 2, generator=g)
    x[:, 1] = 0.5 * x[:, 0] + math.sqrt(0.75) * x[:, 1]
    if kind == "normal":
        e = torch.randn(n, generator=g)
    elif kind == "t3":  # torch's global generator (seeded in main), as rn28's script drew it
        e = torch.distributions.StudentT(3.0).sample((n,)) / math.sqrt(3.0)
    else:  # heteroscedastic
        e = torch.randn(n, generator=g) * (0.3 + x[:, 0].abs())
    y = x @ torch.tensor([1.0, -0.5]) + e
    r = y - x @ torch.linalg.lstsq(x, y).solution
    return sandwich(x, -x * r[:, None], x.T @ x / n)


def logit(n: int, _kind: str, g: torch.Generator):
    x = torch.randn(n, 2, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.5, -1.0])), generator=g)
    b = torch.zeros(2)
    for _ in range(30):  # Newton to the MLE
        p = torch.sigmoid(x @ b)
        h = (x * (p * (1 - p))[:, None]).T @ x / n
        b = b - torch.linalg.solve(h, x.T @ (p - y) / n)
    p = torch.sigmoid(x @ b)
    h = (x * (p * (1 - p))[:, None]).T @ x / n
    return sandwich(x, x * (p - y)[:, None], h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--records", type=int, default=512, help="R, the stored records of the former form")
    ap.add_argument("--trainings", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, r, t = args.n, args.records, args.trainings
    print(f"n={n} R={r} trainings={t}: relative sd of sigma-hat_1 over trainings")
    print(f"{'model':14s} {'actual':>8s} {'sd(w2)/2sqrt(n)':>16s} {'sd(w2)/2sqrt(R)':>16s}")
    for name, f, kind in [("ols normal", ols, "normal"), ("ols t3", ols, "t3"), ("ols hetero", ols, "het"),
                          ("logistic", logit, "")]:
        sig, fn, fr = [], [], []
        for _ in range(t):
            s, w = f(n, kind, g)
            sig.append(float(s[0]))
            w2 = w[:, 0] ** 2
            fn.append(float(w2.std()) / (2 * math.sqrt(n)))
            fr.append(float(w2[:r].std()) / (2 * math.sqrt(r)))
        sd = torch.tensor(sig)
        print(f"{name:14s} {float(sd.std() / sd.mean()):8.4f} {sum(fn) / t:16.4f} {sum(fr) / t:16.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
