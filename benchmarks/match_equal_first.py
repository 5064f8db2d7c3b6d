"""Does assess.MATCH_EQUAL_FIRST's shortcut fire (dup48)? Per assessed parameter of a saved first_call model:
the model's and the estimate's theta dtypes, whether the shortcut's condition before dup48 holds and
whether this checkout's does (assess._same_values), and whether the values are equal in float64;
then the check's CPU time with the switch on and off, 5 alternating calls each (from a checkout's
root, one thread):

    python benchmarks/first_call.py train 1e5 M5     # the saved model (once)
    PYTHONPATH=$PWD python benchmarks/match_equal_first.py M5
"""
import importlib
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.first_call import load_saved  # noqa: E402

A = importlib.import_module("mis_lightning.assess")

path = sys.argv[1]
saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path, None)
est = A.run_estimation(model, loader, loss_fn, est_cfg)
named = dict(model.named_parameters())
fired = 0
for k in est.names:
    now, then = named[k].detach().reshape(-1), est.theta[k].reshape(-1)
    old = now.dtype == then.dtype and now.device == then.device and torch.equal(now, then)  # (before dup48)
    new = hasattr(A, "_same_values") and now.device == then.device and A._same_values(now, then)
    eq64 = torch.equal(now.to(torch.float64), then.to(torch.float64))
    fired += new
    print(f"{k}: numel {now.numel()} model {now.dtype} theta {then.dtype} old condition {old} "
          f"this checkout's {new} equal-in-float64 {eq64}")
# the check's own time, the switch on and off (CPU s, 5 calls each, alternating)
t = {True: 0.0, False: 0.0}
for r in range(5):
    for on in (True, False) if r % 2 else (False, True):
        A.MATCH_EQUAL_FIRST = on
        c0 = time.process_time()
        A._check_model_matches_estimate(est, model)
        t[on] += time.process_time() - c0
print(f"fired {fired} of {len(est.names)}; check per call: on {t[True] / 5 * 1e3:.1f} ms, off {t[False] / 5 * 1e3:.1f} ms")
