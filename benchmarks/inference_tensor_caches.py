"""Every public entry point that reaches a cache keyed on a tensor's version counter, given inference
tensors (made under ``torch.inference_mode``: no version counter), against the same call on ordinary
tensors, bitwise: ``ok``, ``DIFF`` or the exception raised (docs/benchmarks.md, "hy50").

    PYTHONPATH=$PWD python -W ignore benchmarks/inference_tensor_caches.py functional grids made_inside frontends

``functional``: the ``mis_lightning.functional`` entry points on inference tensors, inside inference
mode, and both; ``grids``: ``ParamGrid.moments`` / ``boundaries`` of grids made outside, called so;
``made_inside``: grids made by ``scheme.apply`` under inference mode (twice: a cache hit on the
second call); ``frontends``: ``assess`` inside inference mode, a model whose parameters are inference
tensors, ``MISIndicator.update`` / ``compute`` inside inference mode, each against the plain
``assess`` (its rows' leakage and error).
"""
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from _nets import fit_lbfgs  # noqa: E402 - tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning.functional as F
from mis_lightning import MISIndicator, assess
from mis_lightning.functional.storage import storage_cell_moments
from mis_lightning.quantization import get_scheme

torch.manual_seed(0)
torch.set_num_threads(1)
d = 4096
theta = torch.randn(d, dtype=torch.float64) * 0.05
sigma = torch.rand(d, dtype=torch.float64) * 0.01 + 1e-4
values = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64)  # symmetric table
scale = torch.full((d,), 0.05, dtype=torch.float64)


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for k in out.__dataclass_fields__ for t in flat(getattr(out, k))]
    return []


def inf(t):
    with torch.inference_mode():
        return t.clone()


def check(name, fn, *args, **kw):
    ref = flat(fn(*args, **kw))
    for how in ("inference tensors", "inside inference_mode", "both"):
        try:
            a = [inf(t) if isinstance(t, torch.Tensor) and how != "inside inference_mode" else t for t in args]
            if how == "inference tensors":
                got = fn(*a, **kw)
            else:
                with torch.inference_mode():
                    got = fn(*a, **kw)
            got = flat(got)
            same = len(got) == len(ref) and all(torch.equal(x.detach().clone(), y) for x, y in zip(got, ref))
            res = "ok" if same else "DIFF"
        except Exception as e:  # noqa: BLE001
            res = f"{type(e).__name__}: {str(e).splitlines()[0][:90]} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
        print(f"{name:40s} {how:24s} {res}", flush=True)


which = sys.argv[1:] or ["functional", "grids", "made_inside", "frontends"]
if "functional" in which:
    check("table_boundaries", F.table_boundaries, theta, values, scale, 2)
    check("table_cell_moments", F.table_cell_moments, theta, sigma, values, scale)
    check("affine_cell_moments", F.affine_cell_moments, theta, sigma, torch.full((d,), 0.01, dtype=torch.float64),
          torch.zeros(d, dtype=torch.float64), -8, 7)
    bnd = F.table_boundaries(theta, values, scale, 2)
    check("cell_moments", F.cell_moments, theta, sigma, bnd)
    check("cell_statistics", F.cell_statistics, theta, sigma, bnd)
    for dt in (torch.bfloat16, torch.float16):
        check(f"storage_cell_moments {dt}", storage_cell_moments, theta, sigma, dt)
    check("fine_grid_moments", F.fine_grid_moments, sigma * 0 + 0.3)
if "grids" in which:
    m = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))
    for name in ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "float8_weight_only",
                 "bf16", "fp16", "rtn_int4", "intx_weight_only_int2", "int8_dynamic_activation_int8_weight"]:
        try:
            res = get_scheme(name).apply(m)
        except Exception as e:  # noqa: BLE001
            print(name, "apply:", type(e).__name__, e)
            continue
        for p, g in res.grids.items():
            th = dict(m.named_parameters())[p].detach().to(torch.float64).reshape(-1)
            sg = torch.rand(th.numel(), dtype=torch.float64) * 0.01 + 1e-4
            n = th.numel()
            check(f"{name} {p}.moments", lambda t, s, g=g, n=n: g.moments(t, s, 0, n), th, sg)
            check(f"{name} {p}.moments(kappa_only)", lambda t, s, g=g, n=n: g.moments(t, s, 0, n, kappa_only=True).kappa, th, sg)
            check(f"{name} {p}.boundaries", lambda t, g=g, n=n: g.boundaries(t, 0, n, 2), th)
            break
def _pairs(g0, g, th, sg, n):
    """(what, the call on the grid made outside, the same call on the grid made inside)."""
    return (("moments", lambda: g0.moments(th, sg, 0, n), lambda: g.moments(th, sg, 0, n)),
            ("moments(kappa_only)", lambda: g0.moments(th, sg, 0, n, kappa_only=True).kappa,
             lambda: g.moments(th, sg, 0, n, kappa_only=True).kappa),
            ("boundaries", lambda: g0.boundaries(th, 0, n, 2), lambda: g.boundaries(th, 0, n, 2)))


if "made_inside" in which:
    # the scheme applied (its grids' tensors made) under inference_mode, and the model's own
    # parameters inference tensors (a model built under inference_mode)
    m = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))
    for name in ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "float8_weight_only",
                 "bf16", "fp16", "rtn_int4", "int8_dynamic_activation_int8_weight", "native_int8_dynamic"]:
        ref_res = get_scheme(name).apply(m)
        try:
            with torch.inference_mode():
                res = get_scheme(name).apply(m)
        except Exception as e:  # noqa: BLE001
            print(f"{name:40s} apply inside inference_mode: {type(e).__name__}: {str(e)[:100]}")
            continue
        for p, g in res.grids.items():
            g0 = ref_res.grids[p]
            th = dict(m.named_parameters())[p].detach().to(torch.float64).reshape(-1)
            sg = torch.rand(th.numel(), dtype=torch.float64) * 0.01 + 1e-4
            n = th.numel()
            for what, f0, f1 in _pairs(g0, g, th, sg, n):
                ref = flat(f0())
                for attempt in (1, 2):  # twice: a cache hit on the second call
                    try:
                        got = flat(f1())
                        res_s = "ok" if all(torch.equal(x, y) for x, y in zip(got, ref)) and len(got) == len(ref) else "DIFF"
                    except Exception as e:  # noqa: BLE001
                        res_s = f"{type(e).__name__}: {str(e).splitlines()[0][:80]} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
                    print(f"{name + ' ' + p + '.' + what:55s} grid made inside, call {attempt}: {res_s}", flush=True)
            break


def frontends() -> None:
    SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "bf16", "float8_weight_only"]
    KW = dict(num_records=64, uncertainty_draws=0, weight_decay=1e-2)


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 6, generator=g)
        y = x @ torch.randn(6, 1, generator=g) + 0.3 * torch.randn(128, 1, generator=g)
        return x, y


    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        x, y = data()
        fit_lbfgs(m, lambda: ((m(x) - y) ** 2).mean() + 1e-2 * sum((p ** 2).sum() for p in m.parameters()))
        return m.train()


    def mse(out, t):
        return ((out - t) ** 2).sum(-1)


    def rows(rep):
        return {k: (s.leakage, s.kappa if hasattr(s, "kappa") else None, s.error) for k, s in rep.schemes.items()}


    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    ref = rows(assess(model(), SCHEMES, loader, mse, **KW))


    def run_front(name, fn):
        try:
            got = fn()
            print(f"{name:60s} {'ok' if got == ref else 'DIFF ' + str(got)[:200]}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:60s} {type(e).__name__}: {str(e).splitlines()[0][:100]} @ "
                  f"{traceback.extract_tb(e.__traceback__)[-1].filename.split('/')[-1]}:"
                  f"{traceback.extract_tb(e.__traceback__)[-1].lineno}", flush=True)


    def assess_inside():
        m = model()
        with torch.inference_mode():
            return rows(assess(m, SCHEMES, loader, mse, **KW))


    def inference_model():
        """The trained model's twin built and loaded under torch.inference_mode (inference-tensor parameters)."""
        m = model()
        with torch.inference_mode():
            mi = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
            mi.load_state_dict(m.state_dict())
        assert all(p.is_inference() for p in mi.parameters())
        return mi

    def inference_params():
        return rows(assess(inference_model(), SCHEMES, loader, mse, **KW))

    def inference_params_inside():
        mi = inference_model()
        with torch.inference_mode():
            return rows(assess(mi, SCHEMES, loader, mse, **KW))


    def metric(update_inside: bool, compute_inside: bool):
        """The Metric's update / compute each inside torch.inference_mode or not."""
        m = model()
        met = MISIndicator(m, mse, SCHEMES, **KW)
        with torch.inference_mode(update_inside):
            for b in loader:
                met.update(b)
        with torch.inference_mode(compute_inside):
            met.compute()
        return rows(met.report)

    def metric_inside():
        return metric(True, True)

    def metric_update_inside_compute_outside():
        return metric(True, False)

    def metric_plain():
        return metric(False, False)

    for f in (assess_inside, inference_params, inference_params_inside, metric_plain, metric_inside,
              metric_update_inside_compute_outside):
        run_front(f.__name__, f)


if "frontends" in which:
    frontends()
