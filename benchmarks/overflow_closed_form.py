"""The fp16 draws' overflow elements of a saved model (issue 13; docs/benchmarks.md, "p48a"): the
elements a kappa-only table call leaves after its settling pass that ``table.OVERFLOW_CLOSED_FORM``
serves (sd dwarfing every finite cell: fp16 draws beyond +-65520), their closed form against the
windowed path it replaces (time, largest difference) and, with ``--mp N``, both against 40-digit
mpmath sums over every cell for N of them (~20 s each) and a few set cases at the form's limit.

    OMP_NUM_THREADS=1 python benchmarks/overflow_closed_form.py /tmp/m1e7.pt --mp 4

One scoring call with the ``fp16`` scheme after the default "assess" estimation
(``first_call.load_saved``), its table calls recorded; one thread, CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _captured(path: str):
    """``(theta, sd)`` float64 of the overflow-served elements of one fp16 scoring call."""
    import torch

    import mis_lightning.functional.table as T
    from benchmarks.first_call import load_saved
    from mis_lightning.assess import run_estimation, score_schemes

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    got: list[tuple] = []
    real = T._overflow_split

    def spy(th, sg, sc, rest, values, layout):
        out = real(th, sg, sc, rest, values, layout)
        if out is not None:
            got.append((th.index_select(0, out[0]), sg.index_select(0, out[0]), sc.index_select(0, out[0])))
        return out

    T._overflow_split = spy
    try:
        score_schemes(est, model, ["fp16"], scoring_config=sc_cfg)
    finally:
        T._overflow_split = real
    if not got:
        raise SystemExit("no element took the overflow closed form")
    return tuple(torch.cat(t) for t in zip(*got)), len(got), float(saved["epoch"])


def _mp_kappa(th: float, sg: float, mids: list[float]):
    import mpmath

    mpmath.mp.dps = 40
    t, s = mpmath.mpf(th), mpmath.mpf(sg)
    a = [(mpmath.mpf(e) - t) / s for e in mids]
    cdf = [mpmath.mpf(0)] + [mpmath.ncdf(x) for x in a] + [mpmath.mpf(1)]
    pdf = [mpmath.mpf(0)] + [mpmath.npdf(x) for x in a] + [mpmath.mpf(0)]
    k = mpmath.mpf(0)
    for i in range(len(cdf) - 1):
        p = cdf[i + 1] - cdf[i]
        if p > 0:
            k += (pdf[i] - pdf[i + 1]) ** 2 / p
    return k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--mp", type=int, default=0, help="elements checked against 40-digit sums (+ 3 set cases)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    import mis_lightning.functional.table as T
    from mis_lightning.quantization.casts import cast_cell_values

    torch.set_num_threads(1)
    (th, sg, sc), calls, epoch = _captured(args.path)
    values = cast_cell_values(torch.float16)
    layout = T.table_layout(values, th.device)
    rest = torch.arange(th.numel())
    print(f"{th.numel():,} elements in {calls} table calls; sd {float(sg.min()):.4g} .. {float(sg.max()):.4g};"
          f" |theta| {float(th.abs().min()):.6g} .. {float(th.abs().max()):.4g}")
    for r in range(args.rounds):
        c0 = time.process_time()
        closed = T._overflow_split(th, sg, sc, rest, values, layout)
        t1 = time.process_time() - c0
        c0 = time.process_time()
        win, _ = T._table_window_moments(th, sg, values, sc, True)
        t2 = time.process_time() - c0
        print(f"round {r}: closed form {t1:.4f} s, windowed {t2:.4f} s (all at once; CPU)")
    assert closed is not None and closed[0].numel() == th.numel()
    d = closed[1] - win.kappa
    print(f"closed - windowed: max |d| {float(d.abs().max()):.3e}, mean {float(d.mean()):.3e}; load {os.getloadavg()[0]:.1f}")
    if args.mp:
        import mpmath

        mids = (0.5 * (values[1:] + values[:-1])).tolist()
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(th.numel(), generator=g)[: args.mp]
        cases = [(65530.0, 18700.0), (70000.0, 16001.0), (1e5, 18700.0)] + \
            [(float(th[i]), float(sg[i])) for i in idx]
        t = torch.tensor([c[0] for c in cases], dtype=torch.float64)
        s = torch.tensor([c[1] for c in cases], dtype=torch.float64)
        one = torch.ones_like(t)
        k_c = T._overflow_split(t, s, one, torch.arange(t.numel()), values, layout)[1]
        k_w = T._table_window_moments(t, s, values, one, True)[0].kappa
        for i, (a, b) in enumerate(cases):
            ref = _mp_kappa(a, b, mids)
            print(f"theta {a:.6g} sd {b:.6g}: closed - 40 digits {float(mpmath.mpf(float(k_c[i])) - ref):.3e},"
                  f" windowed - 40 digits {float(mpmath.mpf(float(k_w[i])) - ref):.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
