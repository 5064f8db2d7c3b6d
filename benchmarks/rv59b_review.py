"""Review checks of the stream check and the HC2 matrix form (docs/benchmarks.md "rv59b").

Modes:
  mem       peak resident memory of ``estimate._leverage`` at K = 100 classes (R = 256 records, d = 1000), each
            HC2 form in its own process (``VmHWM`` from /proc: Linux only); prints J's size and the rise.
  cost      seconds of ``estimate._leverage`` per HC2 form, alternating, at K = 10 (R = 512) and K = 100 (R = 256).
  streamfp  the stream check on deterministic streams (dict batches holding strings and lists, a deterministic
            ``on_after_batch_transfer``, a leaf above 2^18 values, ``accumulate_grad_batches``, a validation within
            the epoch, a resume from a checkpoint): prints, per run, the warnings that say the records differ
            (none expected). Reads tests/test_callback.py's helpers; run from the repo root.

Run: ``python benchmarks/rv59b_review.py mem``, ``... cost``, ``... streamfp /tmp/rv59b``.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader


def _case(R: int, K: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(R, K, d, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(R, K, generator=g, dtype=torch.float64), -1)
    L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # a softmax's output curvature (rank K - 1)
    X = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    Hinv = torch.linalg.inv(X.T @ X / (2 * d) + torch.eye(d, dtype=torch.float64))
    C = torch.randn(R, d, generator=g, dtype=torch.float64)
    return C, Hinv, J, L


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def mem(form: str | None) -> None:
    if form is None:  # one process per form: a peak is a process's
        for f in ("per_direction", "matrix"):
            subprocess.run([sys.executable, __file__, "mem", "--form", f], check=True)
        return
    E = importlib.import_module("mis_lightning.estimation.estimate")
    R, K, d = 256, 100, 1000
    C, Hinv, J, L = _case(R, K, d)
    E.HC2_FORM = form
    before = _hwm_mib()
    E._leverage(C, torch.eye(d, dtype=torch.float64), Hinv, J, L, 4 * R, True, {})
    print(f"{form}: J {J.numel() * 8 / 2**20:.0f} MiB; peak RSS {before:.0f} -> {_hwm_mib():.0f} MiB "
          f"(+{_hwm_mib() - before:.0f})")


def cost() -> None:
    E = importlib.import_module("mis_lightning.estimation.estimate")
    for K, R, d in ((10, 512, 400), (100, 256, 400)):
        C, Hinv, J, L = _case(R, K, d)
        V = torch.eye(d, dtype=torch.float64)
        seen: dict[str, list[float]] = {}
        for form in ("per_direction", "matrix") * 2:
            E.HC2_FORM = form
            t = time.perf_counter()
            E._leverage(C, V, Hinv, J, L, 4 * R, True, {})
            seen.setdefault(form, []).append(time.perf_counter() - t)
        print(f"K={K} R={R} d={d}: " + ", ".join(f"{f} {min(v):.2f} s" for f, v in seen.items()))


def streamfp(root: str) -> None:
    import glob
    import shutil
    import warnings
    from pathlib import Path

    sys.path.insert(0, "tests")
    warnings.filterwarnings("ignore")
    from test_callback import FAST, _NoHook, fit, loaders, mse, pl, xy

    from mis_lightning import MISCallback
    from mis_lightning.report import STREAM_RECORDS_DIFFER

    class DictStream(torch.utils.data.IterableDataset):
        def __init__(self, n: int = 160, big: bool = False) -> None:
            g = torch.Generator().manual_seed(3)
            self.X = torch.randn(n, 4, generator=g)
            self.y = self.X[:, 0] + 0.1 * torch.randn(n, generator=g)
            self.big = big

        def __iter__(self):
            for i in range(len(self.X)):
                d = {"x": self.X[i], "y": self.y[i], "name": f"rec{i}", "tags": [i, i + 1]}
                if self.big:  # batches of 16: 320,000 values, read at a stride
                    d["img"] = torch.full((20000,), float(i))
                yield d

    class Mod(_NoHook):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return {**batch, "x": batch["x"] * 2.0}  # deterministic

    def said(cb) -> list[str]:
        return [w[:160] for w in cb.report.warnings if STREAM_RECORDS_DIFFER in w or "other values at each pass" in w]

    runs = {"plain": dict(max_epochs=3, limit_train_batches=3),
            "big_leaf": dict(max_epochs=3, limit_train_batches=3, big=True),
            "accumulate": dict(max_epochs=3, limit_train_batches=4, accumulate_grad_batches=2),
            "val_within_epoch": dict(max_epochs=2, limit_train_batches=4, val_check_interval=2, every=1),
            "before_resume": dict(max_epochs=2, limit_train_batches=3)}
    for name, kw in runs.items():
        big, every = kw.pop("big", False), kw.pop("every", None)
        cb = MISCallback(["rtn_int8"], loss_fn=mse, batch_fn=xy, uncertainty_draws=0, **FAST,
                         **({"every_n_val_epochs": every} if every else {}))
        shutil.rmtree(Path(root) / name, ignore_errors=True)
        fit(Path(root) / name, Mod, [cb], data=(DataLoader(DictStream(big=big), batch_size=16),
                                                loaders(dict_batches=True)[1]), **kw)
        print(f"{name}: n {cb.report.n}, records-differ warnings: {said(cb)}")
    last = sorted(glob.glob(str(Path(root) / "before_resume" / "checkpoints" / "*.ckpt")))[-1]
    cb = MISCallback(["rtn_int8"], loss_fn=mse, batch_fn=xy, uncertainty_draws=0, **FAST)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=3, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(Path(root) / "resumed"))
    trainer.fit(Mod(), DataLoader(DictStream(), batch_size=16), loaders(dict_batches=True)[1], ckpt_path=last)
    print(f"resumed: n {cb.report.n}, records-differ warnings: {said(cb)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["mem", "cost", "streamfp"])
    ap.add_argument("root", nargs="?", default="/tmp/rv59b", help="streamfp: where the fits write")
    ap.add_argument("--form", choices=["per_direction", "matrix"], help="mem: one form, in this process")
    a = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    {"mem": lambda: mem(a.form), "cost": cost, "streamfp": lambda: streamfp(a.root)}[a.mode]()
