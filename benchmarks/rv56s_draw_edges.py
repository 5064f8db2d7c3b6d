# ruff: noqa: B023 - the lambdas are called within their iteration
"""p56a edge cases: _affine_draws_at_once / _evaluated_draws with DRAW_PAIRS_UNPADDED and
DRAW_POSITIONS_UNPADDED on against off (zero, one, all movers; a one-element grid): the movers bitwise."""
import importlib
import sys

sys.path.insert(0, ".")
import torch

from mis_lightning.functional import affine
from mis_lightning.functional.fastpath import GUARD
from tests.test_draw_kappa_only import _grid_and_weights

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64


def both(fn):
    out = {}
    for on in (True, False):
        A.DRAW_PAIRS_UNPADDED = A.DRAW_POSITIONS_UNPADDED = on
        GUARD.reset()
        out[on] = fn()
    A.DRAW_PAIRS_UNPADDED = A.DRAW_POSITIONS_UNPADDED = True
    return out[True], out[False]


def check(name, new, old, free, k_main):
    D, c = new.shape
    kept = k_main.expand(D, c)
    mv = ~free
    print(
        f"{name}: movers {int(mv.sum())}, movers equal {torch.equal(new[mv], old[mv])}, "
        f"free at k_main {torch.equal(new[free], kept[free])}, old free max dev {float((old - kept)[free].abs().max()) if bool(free.any()) else 0:.2e}"
    )


for rows, cols, D, mode, chunk in [
    (16, 512, 8, "zero", affine.TABLE_MIN_ELEMENTS),
    (16, 512, 8, "one", affine.TABLE_MIN_ELEMENTS),
    (16, 512, 2, "all", affine.TABLE_MIN_ELEMENTS),
    (1, 1, 8, "all", affine.TABLE_MIN_ELEMENTS),
    (1, 1, 8, "all", None),
    (16, 512, 8, "all", None),
    (64, 600, 1, "one", None),
]:
    g, w, sigma, gen = _grid_and_weights(rows, cols, 7, seed=rows + D)
    c = w.numel()
    k_main = g.moments(w, sigma, 0, c).kappa
    xi = torch.randn(D, c, generator=gen, dtype=F64)
    free = torch.ones(D, c, dtype=torch.bool)
    if mode == "one":
        free.view(-1)[3] = False
    elif mode == "all":
        free[:] = False
    if chunk:
        g._chunk_elements = chunk
    new, old = both(lambda: A._affine_draws_at_once(g, w, sigma, 0, c, k_main, xi, free, None))
    check(f"at_once {rows}x{cols} D={D} {mode} chunk={chunk}", new, old, free, k_main)
    if c >= affine.TABLE_MIN_ELEMENTS:
        new, old = both(lambda: A._evaluated_draws(g, w, sigma, 0, c, k_main, xi, None, freedom=(free,))[0])
        check(f"per position {rows}x{cols} D={D} {mode}", new, old, free, k_main)
