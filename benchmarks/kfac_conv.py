"""The diagonal estimator's KFC correction (K-FAC for convolutions; kc32) against the exact
estimator on small convolutional models (method.md section 4, "The diagonal sandwich and
correlated weights").

Each case is fitted to its stationary point (full-batch L-BFGS, float64, a small L2 term given to
the estimators) on inputs correlated along their positions (AR(1) of correlation ``--rho`` along a
sequence, or along both axes of an image); then, with the correction off
(``estimate.KFAC_CORRECTION = False``: the code before kc32 on these models) and on:

* ``sigma``: the diagonal estimator's (Gauss-Newton diagonal) over the exact sandwich's, per
  parameter (median, min, max of the ratio);
* every scheme's leakage under ``assess(estimation="diagonal")`` over ``"exact"``'s (uncertainty
  draws off): the headline ratio.

Cases (``--cases``):

* ``conv1d``: a linear ``Conv1d(2, 3, 5, padding=2)`` predicting a 3-channel sequence of 24
  positions (squared error summed over positions): KFC's model is exact here (the output
  gradients at different positions are independent residuals);
* ``conv2d``: the same with a ``Conv2d(2, 3, 3, padding=1)`` on 8 x 8 images;
* ``pooled``: ``Conv1d(1, 1, 5) -> mean over positions`` (one output per record, the weights'
  correlation set by the pooling; tests/test_estimation_conditions.py's model): KFC's failure mode,
  spatially correlated output gradients;
* ``cnn``: a ReLU CNN classifier (examples/cnn_callback.py's layers without BatchNorm: two 3x3
  convolutions, max- and global average pooling, a Linear head; 4 classes, cross-entropy).

Convolutions beside layers the per-layer program refuses (cv40: the side program's KFC factors;
before it, ``KFAC_CORRECTION = False``'s figures were the code's on these models):

* ``beside_groupnorm`` / ``beside_instancenorm`` / ``beside_convtranspose`` / ``beside_conv3d``: a
  linear convolution (``Conv2d(2, 3, 3)`` on 6 x 6, ``Conv1d(2, 3, 5)`` on 24 positions, the same,
  ``Conv3d(1, 2, 3)`` on 4 x 4 x 4) plus a parallel branch of an ``nn.GroupNorm`` / an affine
  ``nn.InstanceNorm1d`` / an ``nn.ConvTranspose1d`` / an ``nn.GroupNorm`` on other input channels
  (sums of two linear models: KFC's model is exact for the convolution, the branch stays
  uncorrected);
* ``gn_cnn``: ``Conv2d -> GroupNorm -> tanh -> Conv2d`` (a nonlinear stack: the layers' mutual
  correlations are beyond a per-layer correction);
* ``instancenorm``: ``Conv1d -> InstanceNorm1d (no affine) -> tanh -> Linear`` (every layer taken by
  the per-layer program: its first-batch check now passes the cancelled bias).

Transposed convolutions (ct41: the per-layer program takes them, their KFC factors those of the
equivalent convolution; before, torch.func's path and no correction, so ``KFAC_CORRECTION = False``'s
figures are the code's before ct41 for these layers):

* ``convtranspose1d`` / ``convtranspose2d``: a linear ``ConvTranspose1d(2, 3, 3, stride=2,
  padding=1)`` on 12 positions / ``ConvTranspose2d(2, 3, 3, stride=2, padding=1,
  output_padding=1)`` on 4 x 4 images (KFC's model exact, as ``conv1d``);
* ``decoder``: ``Linear(6, 12) -> tanh -> ConvTranspose1d(2, 2, 4, stride=2, padding=1)``;
* ``beside_convtranspose`` (above): its ``ConvTranspose1d`` is now corrected too.
* ``convtranspose1d_sized`` (cq41): ``convtranspose1d``'s layer called with ``output_size`` (24
  positions: an output padding of 1 the layer does not hold). Before cq41 the per-layer program refused
  it (torch.func, no correction: the ``KFAC_CORRECTION = False`` row); now it is taken.

Since cq41 the rtn schemes quantize the transposed convolutions too (per output channel,
``quantization/beyond_linear.py``); the float share of each scheme is printed with its leakage.

    PYTHONPATH=. python benchmarks/kfac_conv.py                      # docs/validation.md, "The K-FAC correction and psi influences for convolutions"

``--cost``: the estimation pass (``estimate(mode="diagonal")``, its defaults) on a ReLU CNN of
~3e5 weights (``--n`` 8 x 8 ... 16 x 16 images in batches of 256), correction off and on,
interleaved ``--repeats`` times in one process; CPU seconds (``time.process_time``):

    PYTHONPATH=. python benchmarks/kfac_conv.py --cost --n 2048      # docs/benchmarks.md, "kc32"
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from mis_lightning.estimation.estimate import estimate  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
SCHEMES = ["rtn_int8", "rtn_int6", "rtn_int4"]
# (before cq41 the rtn schemes left a transposed convolution's weights in float: ct41's figures of the
# pure ConvTranspose cases took the float casts, ``--casts``)
CAST_SCHEMES = ["bf16", "fp16"]


def sq_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error per record, summed over its outputs: ``[B]``."""
    return (out - y.reshape(out.shape)).square().reshape(out.shape[0], -1).sum(1)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def ar1(shape: tuple[int, ...], rho: float, g: torch.Generator, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Unit-variance Gaussian noise made AR(1) of correlation ``rho`` along each of ``dims``."""
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    for d in dims:
        x = x.movedim(d, 0).clone()
        for t in range(1, x.shape[0]):
            x[t] = rho * x[t - 1] + (1 - rho * rho) ** 0.5 * x[t]
        x = x.movedim(0, d)
    return x


def fit(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, decay: float) -> float:
    """Full-batch L-BFGS on the mean loss + decay / 2 |theta|^2; returns the largest |gradient|."""
    opt = torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], lr=1.0, max_iter=500,
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        obj = loss(model(x), y).mean() + decay / 2 * sum(p.square().sum() for p in model.parameters()
                                                          if p.requires_grad)
        obj.backward()
        return obj

    for _ in range(4):
        opt.step(closure)
    closure()
    return max(float(p.grad.abs().max()) for p in model.parameters() if p.requires_grad)


def case(name: str, n: int, rho: float, seed: int) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "conv1d":
        x = ar1((n, 2, 24), rho, g)
        teacher = nn.Conv1d(2, 3, 5, padding=2).double()
        model = nn.Conv1d(2, 3, 5, padding=2).double()
        with torch.no_grad():
            y = teacher(x) + 0.5 * torch.randn(n, 3, 24, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    if name == "conv2d":
        x = ar1((n, 2, 8, 8), rho, g, dims=(-1, -2))
        teacher = nn.Conv2d(2, 3, 3, padding=1).double()
        model = nn.Conv2d(2, 3, 3, padding=1).double()
        with torch.no_grad():
            y = teacher(x) + 0.5 * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    if name == "pooled":
        x = ar1((n, 1, 24), rho, g)
        y = x[:, 0, 2:].mean(1) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        model = nn.Sequential(nn.Conv1d(1, 1, 5, bias=False), nn.Flatten(), nn.Linear(20, 1, bias=False)).double()
        with torch.no_grad():
            model[2].weight.fill_(1 / 20)
        model[2].weight.requires_grad_(False)
        return model, lambda o, t: (o.reshape(-1) - t).square(), x, y
    if name == "cnn":
        x = ar1((n, 1, 8, 8), rho, g, dims=(-1, -2))
        y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
        flip = torch.rand(n, generator=g) < 0.2  # label noise: no separable fit
        y = torch.where(flip, torch.randint(0, 4, (n,), generator=g), y)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()
        return model, ce, x, y
    if name in ("convtranspose1d", "convtranspose2d", "convtranspose1d_sized"):
        # ct41: a linear transposed convolution (stride 2: the zero-stuffed equivalent convolution)
        if name == "convtranspose1d_sized":  # cq41: called with output_size (output padding 1)
            x = ar1((n, 2, 12), rho, g)
            make = lambda: Sized(nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), [24])  # noqa: E731
        elif name == "convtranspose1d":
            x = ar1((n, 2, 12), rho, g)
            make = lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1)  # noqa: E731
        else:
            x = ar1((n, 2, 4, 4), rho, g, dims=(-1, -2))
            make = lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)  # noqa: E731
        teacher, model = make().double(), make().double()
        with torch.no_grad():
            out = teacher(x)
            y = out + 0.5 * torch.randn(out.shape, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    if name == "decoder":
        # ct41: Linear -> tanh -> ConvTranspose1d (a small nonlinear decoder)
        x = ar1((n, 6), rho, g)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Unflatten(1, (2, 6)),
                              nn.ConvTranspose1d(2, 2, 4, stride=2, padding=1)).double()
        with torch.no_grad():
            out = model(x)
            y = out + 0.3 * torch.randn(out.shape, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    if name.startswith("beside_"):
        return beside(name[len("beside_"):], n, rho, g)
    if name == "gn_cnn":
        x = ar1((n, 2, 6, 6), rho, g, dims=(-1, -2))
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                              nn.Conv2d(4, 2, 3, padding=1)).double()
        with torch.no_grad():
            y = model(x) + 0.3 * torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    if name == "instancenorm":
        x = ar1((n, 2, 12), rho, g)
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.InstanceNorm1d(4), nn.Tanh(), nn.Flatten(),
                              nn.Linear(48, 1)).double()
        with torch.no_grad():
            y = model(x) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        return model, sq_sum, x, y
    raise ValueError(name)


class Sized(nn.Module):
    """``layer(x, output_size=size)``, flattened: a transposed convolution called with ``output_size``."""

    def __init__(self, layer: nn.Module, size: list[int]) -> None:
        super().__init__()
        self.layer, self.size = layer, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, output_size=self.size)


class Beside(nn.Module):
    """``conv(x[:, :k]) + other(x[:, k:])`` (cropped to the convolution's output): a convolution and
    a layer the per-layer program refuses, side by side."""

    def __init__(self, conv: nn.Module, other: nn.Module, k: int) -> None:
        super().__init__()
        self.conv, self.other, self.k = conv, other, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (clone: torch.func's vmap of group_norm refuses the slice, whose .contiguous() is a no-op there)
        part = x[:, self.k:].clone(memory_format=torch.contiguous_format)
        a, b = self.conv(x[:, : self.k]), self.other(part)
        return a + b[(..., *[slice(0, s) for s in a.shape[2:]])]


def beside(kind: str, n: int, rho: float, g: torch.Generator) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    """A ``Beside`` model with a teacher of the same form plus Gaussian noise (sd 0.5)."""
    def make() -> nn.Module:
        if kind == "groupnorm":  # the branch's bias stands in for the convolution's (one intercept)
            return Beside(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.GroupNorm(1, 3), 2)
        if kind == "instancenorm":
            return Beside(nn.Conv1d(2, 3, 5, padding=2, bias=False), nn.InstanceNorm1d(3, affine=True), 2)
        if kind == "convtranspose":
            return Beside(nn.Conv1d(2, 3, 5, padding=2), nn.ConvTranspose1d(1, 3, 3, bias=False), 2)
        if kind == "conv3d":
            return Beside(nn.Conv3d(1, 2, 3, padding=1, bias=False), nn.GroupNorm(1, 2), 1)
        raise ValueError(kind)

    shape = {"groupnorm": (n, 5, 6, 6), "instancenorm": (n, 5, 24), "convtranspose": (n, 3, 24),
             "conv3d": (n, 3, 4, 4, 4)}[kind]
    x = ar1(shape, rho, g, dims=tuple(range(-1, 1 - len(shape), -1))).contiguous()
    teacher, model = make().double(), make().double()
    with torch.no_grad():
        out = teacher(x)
        y = out + 0.5 * torch.randn(out.shape, generator=g, dtype=torch.float64)
    return model, sq_sum, x, y


def compare(name: str, a: argparse.Namespace) -> None:
    t0 = time.process_time()
    model, loss, x, y = case(name, a.n, a.rho, a.seed)
    grad = fit(model, loss, x, y, a.weight_decay)
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kw = dict(weight_decay=a.weight_decay)
    schemes = CAST_SCHEMES if name.startswith("convtranspose") and a.casts else SCHEMES
    exact = estimate(model, loader, loss, mode="exact", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ml.assess(model, schemes, loader, loss, estimation="exact", uncertainty_draws=0, **kw)
    print(f"{name}: d = {d}, n = {a.n}, rho {a.rho:g}, max |grad| {grad:.1e}; exact baseline "
          f"{ref.baseline_leakage:.4f} " + " ".join(f"{s} {ref.schemes[s].leakage:.4f} (float share "
                                                    f"{1 - ref.schemes[s].quantized_fraction:.3f})"
                                                    for s in schemes), flush=True)
    for on in [False] + a.factors:
        E.KFAC_CORRECTION = bool(on)
        if on:
            LF.KFAC_CONV_FACTORS = on
        try:
            diag = estimate(model, loader, loss, mode="diagonal", hessian="ggn", **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = ml.assess(model, schemes, loader, loss, estimation="diagonal", hessian="ggn",
                                uncertainty_draws=0, **kw)
        finally:
            E.KFAC_CORRECTION, LF.KFAC_CONV_FACTORS = True, "trace"
        tag = f"after ({on})" if on else "before"
        print(f"  {tag} K-FAC median VIF {diag.diagnostics.get('kfac_variance_inflation_median', 'n/a')}, "
              f"psi influences for {diag.diagnostics.get('kfac_influences', 0)} weights, uncorrected "
              f"{diag.diagnostics.get('kfac_uncorrected_layers', 'all')}", flush=True)
        for k in diag.names:
            r = diag.sigma[k].reshape(-1) / exact.sigma[k].reshape(-1)
            print(f"    sigma diagonal / exact {k:10s} median {float(r.median()):.3f} min {float(r.min()):.3f} "
                  f"max {float(r.max()):.3f}", flush=True)
        print(f"    headline diagonal / exact: baseline {rep.baseline_leakage / ref.baseline_leakage:.3f} " + " ".join(
            f"{s} {rep.schemes[s].leakage / ref.schemes[s].leakage:.3f}" for s in schemes
            if ref.schemes[s].leakage > 0), flush=True)
    print(f"  ({time.process_time() - t0:.0f} s CPU)", flush=True)


def cost(n: int, repeats: int) -> None:
    """The estimation pass on a ReLU CNN of ~3e5 weights, KFC off / on (interleaved)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(128, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    kfac_on_off_cost(model, x, y, repeats, "CNN", "16 x 16 x 3 inputs, ")


def kfac_on_off_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, label: str,
                     extra: str = "") -> None:
    """The diagonal estimation pass of ``model`` on ``(x, y)`` (cross-entropy, batch 256), K-FAC off
    and on interleaved ``repeats`` times after a warm-up; prints the CPU seconds and the best on / off."""
    d = sum(p.numel() for p in model.parameters())
    n = len(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    estimate(model, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64), ce, mode="diagonal", num_records=8)
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for on in (False, True):
            E.KFAC_CORRECTION = on
            t0 = time.process_time()
            est = estimate(model, loader, ce, mode="diagonal")
            cpu[on].append(time.process_time() - t0)
    E.KFAC_CORRECTION = True
    off, on = min(cpu[False]), min(cpu[True])
    print(f"{label} d = {d:,}, n = {n}, {extra}{torch.get_num_threads()} thread(s), {est.estimator}, "
          f"K-FAC weights {est.diagnostics.get('kfac_corrected_weights', 0):,}, psi influences "
          f"{est.diagnostics.get('kfac_influences', 0):,}: estimation CPU s off {[round(c, 2) for c in cpu[False]]} "
          f"on {[round(c, 2) for c in cpu[True]]}; best on / off {on / off:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["conv1d", "conv2d", "pooled", "cnn"],
                    help="also: beside_groupnorm beside_instancenorm beside_convtranspose beside_conv3d "
                         "gn_cnn instancenorm (cv40); convtranspose1d convtranspose2d decoder (ct41); convtranspose1d_sized (cq41)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rho", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--factors", nargs="+", default=["trace"], choices=["trace", "kfc"],
                    help="the convolutions' Kronecker factors (linear_factors.KFAC_CONV_FACTORS) to compare")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--casts", action="store_true", help="the transposed cases with the float casts (ct41's figures)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"mis_lightning from {Path(ml.__file__).parent}", flush=True)
    if a.cost:
        cost(a.n, a.repeats)
        return
    for name in a.cases:
        compare(name, a)


if __name__ == "__main__":
    main()
