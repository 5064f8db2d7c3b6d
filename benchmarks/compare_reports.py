"""Compare two ``assess`` / ``score_schemes`` report JSONs field by field (two checkouts' runs of
the same benchmark): how many fields differ, each difference, and for an interval end its move as
a fraction of the interval's width.

The reports come from ``benchmarks/scale.py --report PREFIX`` or ``benchmarks/lowp_endtoend.py
--report PATH`` run once per checkout (``PYTHONPATH`` at each); two runs of one checkout give
identical reports (the library's random draws are seeded), so "0 of N fields differ" means the
change moved no number. Runtime: < 1 s.

    python benchmarks/compare_reports.py old_1e6.json new_1e6.json
    python benchmarks/compare_reports.py old.json new.json --rtol 1e-6   # list only moves above 1e-6 relative
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def flatten(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a JSON value; paths ``/key`` and ``[index]``."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flatten(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flatten(v, f"{path}[{i}]")
    else:
        yield path, x


def _same(u: Any, v: Any, rtol: float) -> bool:
    if u == v:
        return True
    if isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
        if math.isnan(u) and math.isnan(v):  # NaN == NaN for a report (an undefined figure on both sides)
            return True
        return rtol > 0 and abs(u - v) <= rtol * max(abs(u), abs(v))
    return False


def compare(old: dict, new: dict, rtol: float = 0.0) -> tuple[int, list[str]]:
    """Number of fields of ``old`` and one line per field that differs (beyond ``rtol`` relative)."""
    fa, fb = dict(flatten(old)), dict(flatten(new))
    lines = []
    for k in sorted(set(fa) | set(fb)):
        u, v = fa.get(k), fb.get(k)
        if _same(u, v, rtol):
            continue
        extra = ""
        if "/interval[" in k and isinstance(u, float) and isinstance(v, float):
            head = k.split("/interval[")[0]
            width = fa.get(head + "/interval[1]", math.nan) - fa.get(head + "/interval[0]", math.nan)
            if width > 0:
                extra = f"  (move / width {abs(u - v) / width:.2e})"
        lines.append(f"  {k}: {u!r} -> {v!r}{extra}")
    return len(fa), lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0, help="numbers within this relative difference count as equal")
    args = ap.parse_args(argv)
    n, lines = compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()), args.rtol)
    print(f"{n} fields, {len(lines)} differ" + (f" (beyond {args.rtol:g} relative)" if args.rtol else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
