"""dg56: where ``estimation="auto"`` runs the diagonal estimator, and its figures against the exact
estimator's on models just above the rule's threshold (``estimate.EXACT_MAX_PARAMS``; docs/benchmarks.md, "dg56").

    python benchmarks/dg56_diagonal_auto.py rule       # auto's choice for MLPs / CNNs of ~1e3-1e7 weights (not trained)
    python benchmarks/dg56_diagonal_auto.py kf33 N     # kf33's ReLU / tanh 20-80-5 (d = 2,085 > 2,000) at n = N
    python benchmarks/dg56_diagonal_auto.py cnn N      # kc32's ReLU CNN widened to 8 / 26 channels (d = 2,086) at n = N
    python benchmarks/dg56_diagonal_auto.py nu48 N     # nu48's twice-called MLP and its twin (d = 54 / 74; diagonal forced)
    python benchmarks/dg56_diagonal_auto.py hessians N # kf33's ReLU at decay 1e-2: ggn_mc against ggn in the diagonal one
    python benchmarks/dg56_diagonal_auto.py blocks N   # the same models: the block model's sigma against the full one
    (append ``off``: the figures with the leverage correction off in both estimators too)

Each fitted model (full-batch L-BFGS, float64, decay 1e-2 and 1e-3): ``assess(estimation="auto")`` (the estimator
it chose is printed: the diagonal one here) over ``assess(estimation="exact")`` (the CNN: ``hessian="ggn_residual"``,
the exact Hessian assembled as Gauss-Newton + residual, what ``auto`` takes below the threshold), ``none`` /
``rtn_int8`` / ``rtn_int4``, and the diagonal report's low-read flag (``diagnostics["diagonal_low_read"]``) and
marks; a loss-threshold attack's advantage on each release against records of the population not trained on.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.config import EstimationConfig
from mis_lightning.groundtruth.attacks import quantized, roc_metrics

sys.path.insert(0, "benchmarks")
import kfac_classifier as kf  # noqa: E402 - kf33's classifiers and fit
import kfac_conv as kc  # noqa: E402 - kc32's CNN data and fit
from classifier_rank_forms import teacher_sample  # noqa: E402 - kf33's population

torch.set_num_threads(1)
E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def rule() -> None:
    """``choose_estimator``'s answer (``n = 10,000``, forward floats measured on 8 records) for MLPs and CNNs."""
    def mlp(width: int, depth: int, fan: int = 64) -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(fan, width), nn.ReLU()]
            fan = width
        return nn.Sequential(*layers, nn.Linear(fan, 10))

    def cnn(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))

    cases = [("MLP 64-24-10", mlp(24, 1), (8, 64)), ("MLP 64-28-10", mlp(28, 1), (8, 64)),
             ("MLP 64-256x2-10", mlp(256, 2), (8, 64)), ("MLP 64-1024x2-10", mlp(1024, 2), (8, 64)),
             ("MLP 64-2048x3-10", mlp(2048, 3), (8, 64)), ("CNN c=4", cnn(4), (8, 3, 32, 32)),
             ("CNN c=64", cnn(64), (8, 3, 32, 32)), ("CNN c=256", cnn(256), (8, 3, 32, 32)),
             ("CNN c=640", cnn(640), (8, 3, 32, 32))]
    for label, model, shape in cases:
        d = sum(p.numel() for p in model.parameters())
        x = torch.randn(*shape)
        names = [k for k, _ in model.named_parameters()]
        largest = max(sum(model.get_parameter(k).numel() for k in g) for g in E.parameter_groups(names))
        mode, hessian, why = E.choose_estimator(
            model, d, n=10_000, reused=E.reused_layers(model, x), forward_floats=E.forward_floats(model, x, 8),
            outputs=10, largest=largest)
        print(f"{label}: d = {d:,}: {mode} / {hessian} ({why})", flush=True)


def _run(model, loader, loss, wd: float, mode: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.assess(model, SCHEMES, loader, loss, strict=False, uncertainty_draws=0,
                         estimation_config=EstimationConfig(mode=mode, weight_decay=wd, **kw))


def _timed(*a, **k):
    t0 = time.process_time()
    out = _run(*a, **k)
    return out, time.process_time() - t0


def loss_attack(model, loss, members: tuple, fresh: tuple) -> dict[str, float]:
    """A real attack's advantage on each scheme's release (``groundtruth.attacks.quantized``), in the report's game
    (a training member against a fresh draw from the population): the loss-threshold attack at its best threshold
    (``groundtruth.attacks.roc_metrics``' ``max (TPR - FPR)``, the threshold chosen on the same records: sampling
    noise ~ ``1.36 sqrt(2 / n)`` at 95%). A lower bound of the best attack's advantage up to that noise."""
    out = {}
    for s in SCHEMES:
        released = quantized(model, s)
        with torch.no_grad():
            a, b = (loss(released(x), y).reshape(-1).numpy() for x, y in (members, fresh))
        out[s] = roc_metrics(-a, -b).advantage
    return out


def compare(label: str, model, loader, loss, wd: float, off: bool = False, fresh: tuple | None = None,
            other: str = "auto", **exact_kw) -> None:
    """One model: the figures and flag (above); each ``assess`` call's CPU seconds (``time.process_time``, one
    thread); ``off``: the figures with the leverage correction off in both too; ``fresh``: records the model never
    saw, from the training records' population, for :func:`loss_attack` (the members: the loader's records); ``other``:
    the estimation compared with the exact one (``"diagonal"`` where ``"auto"`` picks the exact one)."""
    (ex, t_ex), (auto, t_auto) = _timed(model, loader, loss, wd, "exact", **exact_kw), _timed(model, loader, loss, wd, other)
    dd, xd = auto.diagnostics, ex.diagnostics
    low = dd.get("diagonal_low_read")
    marks = sum("may read below" in (r.get("indicative") or "") for r in auto.rows())
    print(f"== {label}, wd {wd:g}: d = {auto.d}, n = {auto.n}; auto: {auto.estimation}\n"
          f"   exact {' / '.join(f'{ex.schemes[s].leakage:.4g}' for s in SCHEMES)}; {other} / exact "
          f"{' / '.join(f'{auto.schemes[s].leakage / ex.schemes[s].leakage:.3f}' for s in SCHEMES)}\n"
          f"   exact mean leverage {xd['mean_leverage']:.3g} (max {xd['max_leverage']:.3g}, "
          f"{xd.get('leverage_capped', 0)} capped); auto per direction {dd.get('leverage_per_direction', float('nan')):.3g}"
          f" (capped {dd.get('leverage_capped')}); flag {low and round(low['leverage_per_direction'], 4)}; "
          f"rows marked {marks}/{len(auto.rows())}; CPU s: exact {t_ex:.1f}, auto {t_auto:.1f}", flush=True)
    if fresh is not None:
        xs, ys = (torch.cat(c) for c in zip(*loader))
        adv = loss_attack(model, loss, (xs, ys), fresh)
        print(f"   loss-threshold attack's advantage {' / '.join(f'{adv[s]:.3f}' for s in SCHEMES)} (noise "
              f"~{1.36 * (2 / len(ys)) ** 0.5:.3f}); over {other}'s figures "
              f"{' / '.join(f'{adv[s] / auto.schemes[s].leakage:.2f}' for s in SCHEMES)}", flush=True)
    if off:
        ex0 = _run(model, loader, loss, wd, "exact", leverage_correction=False, **exact_kw)
        auto0 = _run(model, loader, loss, wd, other, leverage_correction=False)
        print(f"   leverage correction off in both: {other} / exact "
              f"{' / '.join(f'{auto0.schemes[s].leakage / ex0.schemes[s].leakage:.3f}' for s in SCHEMES)}", flush=True)


def kf33(n: int, off: bool = False) -> None:
    fresh = teacher_sample(n, 20, 5, 0.5, 0, n=n)  # records of the members' population, not trained on
    for act in ("relu", "tanh"):
        for wd in (1e-2, 1e-3):
            x, y = kf.data(n, 20, 5, 0.5, 0)
            torch.manual_seed(0)
            model = kf.mlp(20, [80], 5, act).double()
            kf.fit(model, x, y, wd)
            compare(f"kf33 {act} 20-80-5, n = {n}", model.eval(), DataLoader(TensorDataset(x, y), batch_size=250),
                    kf.ce, wd, off, fresh)


def hessians(n: int, off: bool = False) -> None:
    """kf33's ReLU 20-80-5 at ``n`` records, decay 1e-2: the diagonal estimator with ``"auto"``'s sampled-label
    Gauss-Newton diagonal (``hessian="ggn_mc"``) and with the exact one (``"ggn"``), over the exact estimator."""
    x, y = kf.data(n, 20, 5, 0.5, 0)
    torch.manual_seed(0)
    model = kf.mlp(20, [80], 5, "relu").double()
    kf.fit(model, x, y, 1e-2)
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    ex = _run(model, loader, kf.ce, 1e-2, "exact")
    for hessian in ("ggn_mc", "ggn"):
        r = _run(model, loader, kf.ce, 1e-2, "diagonal", hessian=hessian)
        print(f"kf33 ReLU, n = {n}, decay 1e-2, diagonal with hessian={hessian!r}: over the exact estimator "
              f"{' / '.join(f'{r.schemes[s].leakage / ex.schemes[s].leakage:.3f}' for s in SCHEMES)}", flush=True)


def cnn(n: int, off: bool = False) -> None:
    fresh = kc.case("cnn", n, 0.9, 1)[2:]  # the labels' rule and noise are the population's, seed-free
    for wd in (1e-2, 1e-3):
        _, loss, x, y = kc.case("cnn", n, 0.9, 0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 26, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(26, 4)).double()
        kc.fit(model, loss, x, y, wd)
        compare(f"ReLU CNN 8 / 26 channels, n = {n}", model.eval(), DataLoader(TensorDataset(x, y), batch_size=250),
                loss, wd, off, fresh, hessian="ggn_residual")


def nu48(n: int, off: bool = False) -> None:
    """nu48's MLP calling a layer twice and its untied twin (dg52's fits, d = 54 / 74: "auto" picks the exact
    estimator; the diagonal one forced) at ``n`` records: the correlation across layers at a low leverage."""
    import dg52_sandwich_factor as dg52
    from _nets import Repeated
    t = dg52.t
    fresh = t.data("flat", n, 1)  # the labels' rule and noise are the population's
    for untied in (False, True):
        torch.manual_seed(0)
        x, y = t.data("flat", n, 0)
        model = t.fit(Repeated(2, untied), x, y, t.ce)
        compare(f"nu48 {'untied twin' if untied else 'twice'}, n = {n}", model, t.loader_of(x, y)[0], t.ce, t.WD, off,
                fresh, other="diagonal")


def _block_ratios(label: str, model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, wd: float) -> None:
    """:func:`blocks` on one fitted model (float64 copy; every parameter assessed)."""
    from dg55_low_read import unflat
    from torch.func import functional_call, grad, hessian, vmap
    model = model.double().eval()
    x, n = x.double(), len(y)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    d, eye = theta.numel(), torch.eye(theta.numel(), dtype=torch.float64)

    def one(v: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, unflat(v, names, shapes), (xi[None],)), yi[None]).sum()

    H = hessian(lambda v: loss(functional_call(model, unflat(v, names, shapes), (x,)), y).mean())(theta) + wd * eye
    g = vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)
    g = g - g.mean(0)
    V = g.T @ g / n
    groups: dict[str, list[int]] = {}
    a = 0
    for k, sh in zip(names, shapes):
        groups.setdefault(k.rsplit(".", 1)[0], []).extend(range(a, a + sh.numel()))
        a += sh.numel()
    B = torch.zeros_like(H)
    for idx in groups.values():
        i = torch.tensor(idx)
        B[i[:, None], i] = H[i[:, None], i]
    Hi, Bi = torch.linalg.pinv(H, hermitian=True), torch.linalg.pinv(B, hermitian=True)
    ratio = (Hi @ V @ Hi).diagonal() / (Bi @ V @ Bi).diagonal()
    U = g[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:512]] / 512 ** 0.5

    def inv_diag(Uc: torch.Tensor) -> torch.Tensor:  # diag((lambda + Uc'Uc)^-1) times lambda
        S = torch.linalg.solve(wd * torch.eye(Uc.shape[0], dtype=torch.float64) + Uc @ Uc.T, Uc)
        return 1 - (Uc * S).sum(0)

    blk = torch.empty(d, dtype=torch.float64)
    for idx in groups.values():
        blk[torch.tensor(idx)] = inv_diag(U[:, idx])

    def q(v: torch.Tensor) -> str:
        return " / ".join(f"{float(v.quantile(p)):.3g}" for p in (0.1, 0.5, 0.9))

    print(f"{label}, n = {n}, d = {d}: Sigma_full / Sigma_block {q(ratio)}; (H^-1)_jj / (B^-1)_jj "
          f"{q(Hi.diagonal() / Bi.diagonal())}; its record-space count {q(inv_diag(U) / blk)}", flush=True)


def blocks(n: int, off: bool = False) -> None:
    """Is the low-leverage gap on nu48's models (:func:`nu48`) a block model's sigma reading below the marginal sd?
    Per weight ``Sigma_full_jj / Sigma_block_jj``, ``Sigma = M^-1 V M^-1`` with ``M`` the exact Hessian + decay
    (torch.func, float64) or its block diagonal by module, ``V`` the gradient covariance over the ``n`` records;
    then what 512 records' gradients say of ``(H^-1)_jj / (B^-1)_jj`` with ``H_data ~ U'U`` (``U`` the centred
    gradients over ``sqrt(512)``; Woodbury in record space: the cheap count a finalize could form), against the
    exact Hessian's own ratio. Deciles 10 / 50 / 90 over the weights. (``off``: unused.)"""
    import dg52_sandwich_factor as dg52
    from _nets import Repeated
    t = dg52.t
    for untied in (False, True):
        torch.manual_seed(0)
        x, y = t.data("flat", n, 0)
        _block_ratios(f"nu48 {'untied twin' if untied else 'twice'}", t.fit(Repeated(2, untied), x, y, t.ce), t.ce,
                      x, y, t.WD)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "rule":
        rule()
    else:
        {"kf33": kf33, "cnn": cnn, "nu48": nu48, "blocks": blocks, "hessians": hessians}[what](int(sys.argv[2]), sys.argv[3:4] == ["off"])
