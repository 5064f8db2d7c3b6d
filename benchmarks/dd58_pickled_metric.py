"""dd58's reproducer (docs/benchmarks.md "dd58"): a ``MISIndicator`` pickled, or deep-copied with a module owning it,
after its pass, against the original: the ``rtn_int4`` leakage, the loss directions the diagonal leverage is spread
over (``report.diagnostics["leverage_directions"]`` and its note), and the accumulator's attributes that differ
(tests/test_metric.py's ``_differing``: its programs by kind; closures and sums left out). An 8-16-3 ReLU classifier trained 200 Adam steps on 256 records, read
in batches of 64 (``benchmarks/rv57c_weak_measure.py``'s), under ``--estimation diagonal --hessian ggn`` (default), ``--hessian exact`` or
``--estimation exact``. Seconds.

    python benchmarks/dd58_pickled_metric.py --estimation diagonal --hessian exact
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import warnings
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_metric import _differing  # noqa: E402

from benchmarks.rv57c_weak_measure import loss, trained_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimation", choices=["diagonal", "exact", "auto"], default="diagonal")
    ap.add_argument("--hessian", choices=["ggn", "exact", "auto"], default="ggn")
    args = ap.parse_args()
    import mis_lightning as ml

    warnings.simplefilter("ignore")
    model, x, y = trained_classifier()
    kw = {"estimation": args.estimation} | ({"hessian": args.hessian} if args.estimation != "exact" else {})
    m = ml.MISIndicator(model, loss, ["rtn_int4"], uncertainty_draws=0, **kw)
    for i in range(0, 256, 64):
        m.update(x[i:i + 64], y[i:i + 64])
    owner = nn.Module()
    owner.net, owner.metric = model, m
    copies = {"pickle": pickle.loads(pickle.dumps(m)), "deepcopy of a module owning it": copy.deepcopy(owner).metric}
    differ = {how: _differing(c.accumulator, m.accumulator) for how, c in copies.items()}
    for how, c in {"original": m, **copies}.items():
        out = c.compute()["rtn_int4"]
        dg = c.report.diagnostics
        print(f"{how}: rtn_int4 leakage {float(out['leakage']):.6f}, loss directions "
              f"{dg.get('leverage_directions')} ({dg.get('leverage_directions_note', 'measured')}); attributes "
              f"unlike the original's: {differ.get(how, [])}")


if __name__ == "__main__":
    main()
