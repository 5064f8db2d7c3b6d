"""Width of the report's interval on a >= 1,000-weight model: new construction vs the old
bootstrap p10-p90 hull (issue 12: at most 1.5x wider).

    python benchmarks/interval_width.py

The MLP of examples/all_schemes.py (1,041 weights; docs/validation.md's figures are from its
version before ex25); the old interval is rebuilt from the same bootstrap draws, plug-in and record standard error that the new one receives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mis_lightning.functional import interval as FI  # noqa: E402

CAPTURED: list[dict] = []
_real = FI.leakage_interval


def _spy(value, record_se, n, **kw):
    out = _real(value, record_se, n, **kw)
    t = kw["draws"]
    lo, hi = float(torch.quantile(t, 0.1)), float(torch.quantile(t, 0.9))
    old = (max(min(lo, value) - 1.2816 * record_se, 0.0), max(hi, value) + 1.2816 * record_se)
    CAPTURED.append({"old": old, "new": (out.lo, out.hi), "regime": out.regime, "terms": out.terms})
    return out


def main() -> None:
    torch.set_num_threads(1)
    FI.leakage_interval = _spy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import all_schemes

    rep = all_schemes.main()
    names = [k for k, s in rep.schemes.items() if s.interval is not None]
    print("\n| scheme | regime | effective coords | old width | new width | ratio |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for name, c in zip(names, CAPTURED):
        ow, nw = c["old"][1] - c["old"][0], c["new"][1] - c["new"][0]
        r = nw / ow if ow > 0 else float("nan")
        ratios.append(r)
        print(f"| {name} | {c['regime']} | {c['terms']:.0f} | {ow:.2e} | {nw:.2e} | {r:.2f} |")
    print(f"max ratio {max(ratios):.2f}")


if __name__ == "__main__":
    main()
