"""Cost of planning over 4 candidates per layer against one ``assess`` of the 4 uniform schemes
(issue 16: planning must cost < 2x that assessment), and the plans' figures.

Two models:

* ``chembl``: the default job of the app (ChEMBL CHEMBL2321810 pIC50, physchem descriptors, MLP
  probe 12 -> 4 -> 1, n = 711). It trains once (``mis-lightning``), then runs the app on the
  saved checkpoint twice: ``mode=assess`` with the 4 candidates as ``schemes``, and
  ``mode=plan`` with the same candidates; the times are the app's own ``times_s`` (``assess``,
  ``plan``), i.e. estimation + everything after it, the same settings (conf/mis/default.yaml).
* ``mlp100k``: a 128 -> 256 -> 256 -> 10 ReLU MLP (101,386 parameters) trained with Adam on a
  synthetic 10-class task (``--n`` = 10,000 training, 4,000 validation records); ``assess`` and
  ``plan`` in-process with the same options (``--num-records`` 128, ``--draws`` 4).

    python benchmarks/planner_cost.py chembl --budget 0.05 --max-bits 8.5
    python benchmarks/planner_cost.py mlp100k --budget 0.02 --figure docs/figures/planner_mlp100k.png
    python benchmarks/planner_cost.py chembl --budget 0.03 --max-bits 8.4 --candidates intx_weight_only_int4 \
        intx_weight_only_int4_hqq intx_weight_only_int3 intx_weight_only_int3_hqq
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int3", "intx_weight_only_int2"]


def _app(overrides: list[str], out: Path) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mis_lightning.app.job import run_job

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "logger=none", "progress=false",
                                           f"trainer.default_root_dir={out}"])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    run_job(cfg)
    return json.loads((out / "result.json").read_text())


def chembl(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="planner_cost_"))
    names = "[" + ",".join(args.candidates) + "]"
    _app([f"schemes={names}"], tmp / "train")
    ckpt = tmp / "train" / "model.ckpt"
    a = _app(["mode=assess", f"ckpt_path={ckpt}", f"schemes={names}"], tmp / "assess")
    budget = [f"plan.max_utility_loss={args.budget}"] + ([f"plan.max_bits={args.max_bits}"] if args.max_bits else [])
    p = _app(["mode=plan", f"ckpt_path={ckpt}", f"plan.candidates={names}", *budget], tmp / "plan")
    if args.figure:
        import shutil

        shutil.copy(tmp / "plan" / "plan_frontier.png", args.figure)
    print((tmp / "plan" / "plan.md").read_text())
    dominated = json.loads((tmp / "plan" / "plan.json").read_text())["dominated_uniform"]
    print("uniform candidates the chosen plan strictly beats:", dominated)
    return {"model": "chembl", "candidates": list(args.candidates), "dominated_uniform": dominated, "assess_s": a["times_s"]["assess"], "plan_s": p["times_s"]["plan"],
            "plan_steps_s": p["plan"]["seconds"], "plan": p["plan"]["scheme"], "dir": str(tmp)}


def mlp100k(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from mis_lightning import assess, plan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, nv = args.n, 4000
    X = torch.randn(n + nv, 128, generator=g)
    teacher = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        Y = (3 * teacher(X) + torch.randn(n + nv, 10, generator=g)).argmax(-1)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    wd = 1e-4
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=500, shuffle=True)
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            obj = nn.functional.cross_entropy(model(x), y) + 0.5 * wd * sum((q ** 2).sum() for q in model.parameters())
            obj.backward()
            opt.step()

    def loss(o, t):
        return nn.functional.cross_entropy(o, t, reduction="none")

    tr = DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=1000)
    va = DataLoader(TensorDataset(X[n:], Y[n:]), batch_size=1000)
    opts = {"weight_decay": wd, "num_records": args.num_records, "uncertainty_draws": args.draws}
    ta = float("nan")
    if not args.skip_assess:
        t0 = time.perf_counter()
        rep = assess(model, args.candidates, tr, loss, val_dataloader=va, **opts)
        ta = time.perf_counter() - t0
        print(rep.table())
    t0 = time.perf_counter()
    res = plan(model, args.candidates, tr, loss, val_dataloader=va, max_utility_loss=args.budget,
               max_bits=args.max_bits, **opts)
    tp = time.perf_counter() - t0
    print(res.table())
    if args.figure:
        res.figure(args.figure)
    return {"model": "mlp100k", "params": sum(q.numel() for q in model.parameters()), "assess_s": ta,
            "plan_s": tp, "plan_steps_s": res.seconds, "plan": res.scheme.describe(),
            "dominated_uniform": res.dominated_uniform(), "result": res.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["chembl", "mlp100k"])
    ap.add_argument("--budget", type=float, default=0.05, help="max_utility_loss (relative)")
    ap.add_argument("--max-bits", type=float, default=None)
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES, help="registry names (default: 4 torchao widths)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--n", type=int, default=10000, help="mlp100k: training records")
    ap.add_argument("--num-records", type=int, default=128, help="mlp100k: records of the estimate")
    ap.add_argument("--draws", type=int, default=4, help="mlp100k: uncertainty_draws (as the app's default)")
    ap.add_argument("--figure", default=None)
    ap.add_argument("--skip-assess", action="store_true", help="mlp100k: plan only (no cost ratio)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = chembl(args) if args.model == "chembl" else mlp100k(args)
    out["ratio"] = out["plan_s"] / out["assess_s"]
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
