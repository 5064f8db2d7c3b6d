"""Per-call work of a scoring call, counted (py37): tensor operations per calling function and
Python function calls per module.

Where the work per element is small (the 1e5 benchmark MLP of ``scale.py``), a scoring call's
CPU time is partly fixed costs per tensor operation (~1.5-7 us of dispatch and allocation each
on this project's machines, whatever the tensor's size) and per Python call. This script builds
``scale.py``'s model and data for one size, trains it as ``scale.py`` does (3 Adam epochs), runs
the estimation and one warm-up scoring call, then a second scoring call (the steady state) twice:

* under a ``TorchDispatchMode`` that attributes every ATen operation to the innermost
  ``mis_lightning`` function on the Python stack (``file:function``, with ``--lines`` the line):
  operations, those with fewer than 4,096 output elements ("small"), and the mean output size;
* under ``sys.setprofile``: Python function calls per module (``mis_lightning`` modules by
  name, others as ``other``) and C function calls.

Counts, not times (the counting modes slow the call several-fold); time a change with
``scale.py --calls K`` or ``first_call.py``. The same model, data and scheme list as
``scale.py``'s default:

    python benchmarks/op_counts.py --size 1e5 --top 40
    python benchmarks/op_counts.py --size 1e5 --root ../old --json old.json   # another checkout
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = 4096  # output elements below which an operation's fixed cost dominates


def _trained(size: str, n: int, batch: int):
    import torch

    from benchmarks.assess_speed import mlp

    torch.manual_seed(0)
    model, features = mlp(size)
    x = torch.randn(n, features)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model, loader, loss_fn


def count(size: str = "1e5", n: int = 4096, batch: int = 256, schemes: list[str] | None = None,
          lines: bool = False) -> dict:
    """``{"ops": {caller: [ops, small ops, mean output elements]}, "python": {module: calls},
    "totals": {...}}`` of one steady-state ``score_schemes`` call (see the module docstring)."""
    import lightning_fabric.utilities.seed  # noqa: F401  (as scale.py: a Lightning user's process)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import stage_configs

    torch.set_num_threads(1)
    schemes = schemes or COMMON_SCHEMES
    model, loader, loss_fn = _trained(size, n, batch)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    est = run_estimation(model, loader, loss_fn, est_cfg)

    def score():
        return score_schemes(est, model, schemes, scoring_config=sc_cfg)

    score()  # the first call's one-time work (imports, checks, tables) is not the steady state
    ops: collections.Counter[str] = collections.Counter()
    small: collections.Counter[str] = collections.Counter()
    elems: collections.Counter[str] = collections.Counter()

    class Attribute(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            f = sys._getframe(1)
            while f is not None and "mis_lightning" not in f.f_code.co_filename:
                f = f.f_back
            if f is None:
                key = "(outside mis_lightning)"
            else:
                key = f"{f.f_code.co_filename.replace(chr(92), '/').split('mis_lightning/')[-1]}:{f.f_code.co_name}"
                if lines:
                    key += f":{f.f_lineno}"
            k = out.numel() if isinstance(out, torch.Tensor) else 0
            ops[key] += 1
            elems[key] += k
            small[key] += k < SMALL
            return out

    with Attribute():
        score()
    calls: collections.Counter[str] = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            fn = frame.f_code.co_filename.replace("\\", "/")
            calls[fn.split("mis_lightning/")[-1] if "mis_lightning/" in fn else "other"] += 1
        elif event == "c_call":
            calls["(C functions)"] += 1

    sys.setprofile(prof)
    try:
        score()
    finally:
        sys.setprofile(None)
    return {
        "size": size, "schemes": schemes,
        "ops": {k: [v, small[k], elems[k] / v] for k, v in ops.most_common()},
        "python": dict(calls.most_common()),
        "totals": {"ops": sum(ops.values()), "small_ops": sum(small.values()),
                   "python_calls": sum(v for k, v in calls.items() if k != "(C functions)"),
                   "c_calls": calls["(C functions)"]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1e5", help="a size of benchmarks/assess_speed.py's ARCH")
    ap.add_argument("--n", type=int, default=4096, help="training records")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--schemes", nargs="+", default=None, help="default: scale.py's 8 common schemes")
    ap.add_argument("--lines", action="store_true", help="attribute operations to file:function:line")
    ap.add_argument("--top", type=int, default=30, help="rows printed per table")
    ap.add_argument("--root", type=Path, default=None, help="the checkout whose mis_lightning is counted")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.root is not None:  # ahead of this checkout (inserted at import) and of PYTHONPATH
        sys.path.insert(0, str(args.root))
    r = count(args.size, args.n, args.batch, args.schemes, args.lines)
    t = r["totals"]
    print(f"{args.size}: {t['ops']} tensor operations ({t['small_ops']} with < {SMALL} output elements), "
          f"{t['python_calls']} Python calls, {t['c_calls']} C calls in the steady-state scoring call")
    print(f"{'ops':>7} {'small':>7} {'mean out':>10}  caller")
    for k, (v, s, e) in list(r["ops"].items())[: args.top]:
        print(f"{v:7d} {s:7d} {e:10.0f}  {k}")
    print(f"{'calls':>7}  Python module")
    for k, v in list(r["python"].items())[: args.top]:
        print(f"{v:7d}  {k}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
