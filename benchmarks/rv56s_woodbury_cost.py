"""rv56s: CPU time of Correlation._factor_quadratic with FACTOR_FORM_WOODBURY_CHECK on / off (R 512, d 5378, k 72)."""
import sys
import time

sys.path.insert(0, ".")
import torch

torch.set_num_threads(1)
import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import Correlation

g = torch.Generator().manual_seed(0)
R, d, r = 512, 5378, 72
L = torch.randn(d, r, generator=g, dtype=torch.float64) / r**0.5
c = Correlation(factor=L, residual=10 ** (-3 * torch.rand(d, generator=g, dtype=torch.float64)))
u = torch.randn(R, d, generator=g, dtype=torch.float64)
kap = 1 - 0.5 * torch.rand(d, generator=g, dtype=torch.float64)
res = {True: [], False: []}
for i in range(6):
    for flag in (True, False) if i % 2 == 0 else (False, True):
        C.FACTOR_FORM_WOODBURY_CHECK = flag
        t0 = time.process_time()
        v = c._factor_quadratic(u, kap)
        res[flag].append(time.process_time() - t0)
        out = v if flag else None
print("on", [f"{x:.3f}" for x in res[True]], "off", [f"{x:.3f}" for x in res[False]])
C.FACTOR_FORM_WOODBURY_CHECK = True
a = c._factor_quadratic(u, kap)
C.FACTOR_FORM_WOODBURY_CHECK = False
b = c._factor_quadratic(u, kap)
print("bitwise", torch.equal(a, b), "nan", int(a.isnan().sum()))
