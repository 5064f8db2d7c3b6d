"""lo29: the stored records scored by the exact sandwich with R of n records stored, against the
same records scored with every record stored (paired: the same rows). hs28's designs (same data).
Reads, per record, |Sigma^-1/2 psi| (the estimator's Mahalanobis norm, the unquantized form) and
the quantized Gaussian channel's sqrt(s2) at a fixed kappa (random in [0.3, 1]), each as the
scoring reads them (with the per-record self term where the code has one).
    PYTHONPATH=$PWD python benchmarks/hc2_stored_records.py DESIGN n d R subsets   # DESIGN: iid, hetero, scaled, logit

method.md section 4, *Gradient covariance*; docs/validation.md, "The HC2 term with R < n stored records". Runs on code without the per-record
term too (the "before" column there)."""
import sys

import torch

from mis_lightning.estimation.estimate import sandwich_compute
from mis_lightning.functional.correlated import RecordCorrelation

design, n, d, R, k = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
X = torch.randn(n, d, generator=g, dtype=torch.float64)
if design == "hetero":  # heavy-tailed rows (high leverage) and errors growing with |x_0|
    X = X * (torch.distributions.Chi2(3.0).sample((n, 1)).double() / 3).rsqrt()
    e = torch.randn(n, generator=g, dtype=torch.float64) * (0.3 + X[:, 0].abs())
elif design == "scaled":  # rows scaled by 1 + |x_0| (spread leverages), homoscedastic errors
    X = X * (1 + X[:, :1].abs())
    e = torch.randn(n, generator=g, dtype=torch.float64)
else:
    e = torch.randn(n, generator=g, dtype=torch.float64)
if design == "logit":  # logistic regression at its MLE (Newton), the record's curvature p (1 - p)
    y = torch.bernoulli(torch.sigmoid(X @ torch.ones(d, dtype=torch.float64) * 1.5 / d**.5), generator=g)
    b = torch.zeros(d, dtype=torch.float64)
    for _ in range(30):
        p = torch.sigmoid(X @ b)
        b = b - torch.linalg.solve((X * (p * (1 - p))[:, None]).T @ X, X.T @ (p - y))
    p = torch.sigmoid(X @ b)
    G = X * (p - y)[:, None]
    H = (X * (p * (1 - p))[:, None]).T @ X / n
    L = (p * (1 - p)).reshape(n, 1, 1)
else:
    b = torch.linalg.lstsq(X, X @ torch.ones(d, dtype=torch.float64) / d**.5 + e).solution
    G = X * (X @ b - (X @ torch.ones(d, dtype=torch.float64) / d**.5 + e))[:, None]
    H = X.T @ X / n
    L = torch.ones(n, 1, 1, dtype=torch.float64)
C = G - G.mean(0)
V = C.T @ C / n
J = X[:, None, :]
z = torch.zeros(d, dtype=torch.float64)
kappa = 0.3 + 0.7 * torch.rand(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def forms(idx):
    rec = {}
    _, w, mahal, corr = sandwich_compute(V, H, z, C[idx], n, 1e-10, {}, jacobians=J[idx], loss_hessians=L[idx],
                                         correct_leverage=True, records=rec)
    rc = (RecordCorrelation.full(corr, rec["self_term"], rec["self_weight"]) if "self_term" in rec
          else RecordCorrelation.full(corr))
    return mahal, rc.gaussian_mean_abs(w, kappa)


m_all, q_all = forms(torch.arange(n))
rm, rq = [], []
for _ in range(k):
    idx = torch.randperm(n, generator=g)[:R]
    m_s, q_s = forms(idx)
    rm.append(float(m_s.mean() / m_all[idx].mean() - 1))
    rq.append(float(q_s.mean() / q_all[idx].mean() - 1))
tm, tq = torch.tensor(rm), torch.tensor(rq)
print(f"{design} n={n} d={d} R={R} ({k} subsets): stored / all-records - 1: |Sigma^-1/2 psi| "
      f"{tm.mean():+.5f} (sd {tm.std():.5f}); quantized Gaussian {tq.mean():+.5f} (sd {tq.std():.5f})")
