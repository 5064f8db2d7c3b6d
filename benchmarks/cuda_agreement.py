"""The same trained models assessed on the CPU and on a CUDA GPU: do the reports agree?

Models (trained on the CPU in float64-free float32, seeded, so both devices assess the same
weights): an MLP regressor (~1e5 weights, the factored nn.Linear path) and a small ReLU CNN
classifier (the per-layer program, the K-FAC correction). Each is assessed by ``assess`` with the
default options and schemes both devices run (torchao's and the library's; schemes that need
CUDA, e.g. ``int4_weight_only_tinygemm``, on the GPU only) on the model moved to ``cpu`` and to
``cuda``. The reports are compared field by field (``compare_reports.flatten``); printed: the
number of fields, how many differ beyond ``--rtol`` relative (default 1e-6: float32 kernels on
the two devices sum in different orders), the largest relative move of the headline fields, and
each device's wall seconds. Runtime on a GPU machine: < 2 minutes.

    python benchmarks/cuda_agreement.py --out DIR        # writes DIR/cuda_agreement.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_reports import flatten  # noqa: E402

import mis_lightning as ml  # noqa: E402

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "float8_weight_only",
           "rtn_int4", "native_int8_per_row", "bf16"]
CUDA_ONLY = ["int4_weight_only_tinygemm"]
HEADLINE = ("leakage", "leakage_p10", "leakage_p90", "mis", "pool_leakage", "baseline_leakage", "d_eff")


def mse_per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.squeeze(-1), y, reduction="none")


def ce_per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, epochs: int, wd: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=wd)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            loss(model(x[i:i + 128]), y[i:i + 128]).mean().backward()
            opt.step()
    return model.eval()


def mlp_case() -> tuple[nn.Module, DataLoader, DataLoader, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(2048, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.Tanh(), nn.Linear(512, 64), nn.Tanh(), nn.Linear(64, 1))
    _fit(model, x[:1536], y[:1536], mse_per_sample, 20, 1e-4)
    return (model, DataLoader(TensorDataset(x[:1536], y[:1536]), batch_size=256),
            DataLoader(TensorDataset(x[1536:], y[1536:]), batch_size=256), mse_per_sample)


def cnn_case() -> tuple[nn.Module, DataLoader, DataLoader, object]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((-1, -2)) > 0).long() + 2 * (x[:, 0, 4:].mean((-1, -2)) > 0).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    _fit(model, x[:768], y[:768], ce_per_sample, 30, 1e-3)
    return (model, DataLoader(TensorDataset(x[:768], y[:768]), batch_size=128),
            DataLoader(TensorDataset(x[768:], y[768:]), batch_size=128), ce_per_sample)


def _assess(model: nn.Module, train: DataLoader, val: DataLoader, loss, device: str, schemes: list[str]) -> tuple[dict, float]:
    m = _copy(model).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    rep = ml.assess(m, schemes, train, loss, val_dataloader=val, strict=False)
    sync()
    return json.loads(json.dumps(rep.to_dict(), default=str)), time.perf_counter() - t0


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _rel(a: object, b: object) -> float:
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or isinstance(a, bool):
        return 0.0 if a == b else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compare(cpu: dict, gpu: dict, rtol: float) -> dict:
    fa, fb = dict(flatten(cpu.get("schemes", cpu))), dict(flatten(gpu.get("schemes", gpu)))
    keys = sorted(set(fa) & set(fb))
    moves = {k: _rel(fa[k], fb[k]) for k in keys if isinstance(fa[k], (int, float)) and not isinstance(fa[k], bool)}
    differ = {k: v for k, v in moves.items() if v > rtol}
    head = {k: v for k, v in moves.items() if k.rsplit("/", 1)[-1] in HEADLINE and "/layers/" not in k}
    return {"fields": len(keys), "numeric": len(moves), "differ": len(differ),
            "largest": sorted(differ.items(), key=lambda kv: -kv[1])[:10],
            "headline_max_rel": max(head.values(), default=0.0),
            "only_cpu": sorted(set(fa) - set(fb))[:10], "only_gpu": sorted(set(fb) - set(fa))[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a self-check)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or --device cpu for a self-check)")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out: dict = {"torch": torch.__version__, "device": args.device,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    for name, case in (("mlp", mlp_case), ("cnn", cnn_case)):
        model, train, val, loss = case()
        cpu, t_cpu = _assess(model, train, val, loss, "cpu", SCHEMES)
        gpu, t_gpu = _assess(model, train, val, loss, args.device, SCHEMES)
        res = compare(cpu, gpu, args.rtol)
        res.update(cpu_s=round(t_cpu, 2), device_s=round(t_gpu, 2),
                   leakage={s: (cpu["schemes"][s].get("leakage"), gpu["schemes"][s].get("leakage"))
                            for s in SCHEMES if s in cpu.get("schemes", {})})
        if args.device == "cuda":  # schemes only a GPU runs: they must give a row, not an error
            only, _ = _assess(model, train, val, loss, "cuda", CUDA_ONLY)
            res["cuda_only"] = {s: {k: only["schemes"][s].get(k) for k in ("leakage", "error", "bits_per_weight")}
                                for s in CUDA_ONLY if s in only.get("schemes", {})}
        out[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "largest"}, default=str))
        for k, v in res["largest"]:
            print(f"    {k}: {v:.3g}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cuda_agreement.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
