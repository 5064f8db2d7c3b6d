"""Cell moments of float-format grids (``fp8_weight_only``, ``bf16``, ``fp16``) against an
integer scheme (``int8_weight_only``), per weight, on the same weights and standard deviations.

Two settings, each in one process (ratios are what count on a shared machine):

* ``mlp``: the MLP of ``benchmarks/assess_speed.py`` (sizes 1e5 / 1e6), trained 3 Adam epochs on
  its synthetic regression data (n = 2,048), then ``estimate(..., mode="diagonal",
  hessian="ggn")``: the sigmas ``assess`` scores with. They are large against the weights
  (median sigma / |theta| ~ 13 at 1e5): every float8 cell lies within a fraction of a sd, the
  case issue 13 measured at 2-3e4 weights/s.
* ``synthetic``: one ``Linear`` weight (N(0, 0.05^2)) with ``sigma = ratio * 0.05`` for
  ``--ratios`` (default 0.01, 0.1, 1, 10): from well-determined weights (a weight's reach
  spans one or two binades, except near 0 where it covers every small binade) to the
  undetermined ones above.

Per scheme: ``ParamGrid.moments`` over every quantized parameter in chunks of
``--chunk`` (as ``assess`` scores them; compile policy ``never`` unless ``--compile``: the int8
kernel compiled, once, excluded), the best of ``--repeats`` passes after one warm-up pass
(which also runs the first self-check). For float8 the script also runs the previous
windowed-sum path (``table._table_cell_moments``) on the same chunks and prints its rate and
the largest |new - previous| of kappa, mean_abs and m4 (the two must agree to 1e-10).

    python benchmarks/float_grid_speed.py                      # mlp 1e5 + synthetic, 1 thread
    python benchmarks/float_grid_speed.py --setting mlp --size 1e6
    python benchmarks/float_grid_speed.py --compile            # int8 kernel compiled
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ("int8_weight_only", "float8_weight_only", "bf16", "fp16")


def _mlp_case(size: str) -> tuple[nn.Module, dict, dict]:
    from benchmarks.assess_speed import mlp
    from mis_lightning.estimation import estimate

    torch.manual_seed(0)
    model, F = mlp(size)
    x = torch.randn(2048, F)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(2048)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    est = estimate(model, loader, loss_fn, mode="diagonal", hessian="ggn", num_records=256)
    return model, est.theta, est.sigma


def _synthetic_case(ratio: float, d: int) -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    side = int(d**0.5)
    model = nn.Sequential(nn.Linear(side, side, bias=False))
    with torch.no_grad():
        model[0].weight.normal_(0.0, 0.05)
    theta = {"0.weight": model[0].weight.detach().to(torch.float64).clone()}
    return model, theta, {"0.weight": torch.full_like(theta["0.weight"], ratio * 0.05)}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: first self-check, tables, compilation
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(label: str, model: nn.Module, theta: dict, sigma: dict, chunk: int, repeats: int, compile_: bool) -> None:
    from mis_lightning.functional import CompilePolicy
    from mis_lightning.functional import table as T
    from mis_lightning.quantization import get_scheme

    policy = CompilePolicy("always" if compile_ else "never")
    rates: dict[str, float] = {}
    for name in SCHEMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grids = get_scheme(name).apply(model).grids
        items = [(g, theta[p].reshape(-1).to(torch.float64), sigma[p].reshape(-1).to(torch.float64))
                 for p, g in grids.items()]
        n = sum(th.numel() for _, th, _ in items)

        def new(items=items):
            out = []
            for g, th, sg in items:
                for a in range(0, th.numel(), chunk):
                    b = min(a + chunk, th.numel())
                    out.append(g.moments(th[a:b], sg[a:b], a, b, compile_policy=policy))
            return out

        el = _time(new, repeats)
        rates[name] = n / el
        extra = ""
        if name == "float8_weight_only":
            def raw(path, items=items):
                out = []
                for g, th, sg in items:
                    for a in range(0, th.numel(), chunk):
                        b = min(a + chunk, th.numel())
                        sc, _, _ = g.element_grid(a, b)
                        sc = torch.where(sc > 0, sc, torch.ones_like(sc))  # as ParamGrid.moments
                        out.append(T._table_cell_moments(th[a:b], sg[a:b], g.values, sc, 18, T.FINE_STEP)
                                   if path == "old" else T._table_fast_moments(th[a:b], sg[a:b], g.values, sc)[0])
                return out

            el_old = _time(lambda: raw("old"), max(1, repeats // 2))
            diff = max(float((getattr(x, k) - getattr(y, k)).abs().max())
                       for x, y in zip(raw("new"), raw("old")) for k in ("kappa", "mean_abs", "m4"))
            extra = f" | previous path {n / el_old:.3g}/s | max abs diff {diff:.1e}"
        print(f"| {label} | {name} | {n} | {rates[name]:.3g} | "
              f"{rates['int8_weight_only'] / rates[name]:.2f}{extra} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("mlp", "synthetic", "both"), default="both")
    ap.add_argument("--size", default="1e5", choices=("1e5", "1e6"))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--d", type=float, default=2.5e5, help="synthetic weights")
    ap.add_argument("--chunk", type=int, default=1 << 18)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads = {args.threads}, chunk = {args.chunk}, compile int8 = {args.compile}, "
          f"load = {os.getloadavg()[0]:.2f}")
    print("| setting | scheme | weights | weights/s | cost / int8_weight_only |")
    print("|---|---|---|---|---|")
    if args.setting in ("mlp", "both"):
        run(f"mlp {args.size}", *_mlp_case(args.size), args.chunk, args.repeats, args.compile)
    if args.setting in ("synthetic", "both"):
        for r in args.ratios:
            run(f"sigma = {r:g} x weight sd", *_synthetic_case(r, int(args.d)), args.chunk, args.repeats,
                args.compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
