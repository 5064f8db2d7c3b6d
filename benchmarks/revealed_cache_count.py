"""How many revealed ``(mask, indices)`` pairs (``ParamGrid._revealed_at``) one steady scoring call
of scale.py's eight schemes computes (cache misses) and how many reads it makes, in the checkout
under PYTHONPATH (dup48: before, two caches, ``_revealed_at``'s taken out by the pool call and
``_revealed_shared``'s; after, one). From a checkout's root, on a model saved by first_call.py:

    PYTHONPATH=$PWD python benchmarks/revealed_cache_count.py M5
"""
import importlib
import sys

sys.path.insert(0, ".")
from benchmarks.first_call import load_saved  # noqa: E402
from benchmarks.scale import COMMON_SCHEMES  # noqa: E402

A = importlib.import_module("mis_lightning.assess")
qb = importlib.import_module("mis_lightning.quantization.base")
n = {"computed": 0, "reads": 0}


class Counting(list):
    def insert(self, i, x):
        n["computed"] += 1
        super().insert(i, x)


if hasattr(qb, "_REVEALED"):
    qb._REVEALED = Counting()
else:
    qb._REVEALED_SHARED = Counting()
    qb._FACTS["revealed"] = Counting()
for attr in ("_revealed_at", "_revealed_shared"):
    if hasattr(qb.ParamGrid, attr):
        f0 = getattr(qb.ParamGrid, attr)

        def w(self, *a, _f0=f0):
            n["reads"] += 1
            return _f0(self, *a)
        setattr(qb.ParamGrid, attr, w)
saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(sys.argv[1])
est = A.run_estimation(model, loader, loss_fn, est_cfg)
A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)  # (warm-up)
n.update(computed=0, reads=0)
A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
print(f"one steady call: {n['reads']} reads, {n['computed']} (mask, indices) pairs computed")
