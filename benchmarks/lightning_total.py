"""The whole cost of an assessment as users run it, in one process, against that process's own
epoch (issue 13's "1e5 and 1e6 weights: at most 20 epochs in total"; docs/benchmarks.md, "fx33").

Per model size (``assess_speed.mlp``: the MLPs of scale.py, n = 4096, batch 256, Adam lr 1e-3,
3 epochs, 1 thread) and per mode, a fresh process:

* ``lightning``: a ``pytorch_lightning.LightningModule`` around the MLP, trained by
  ``Trainer(max_epochs=3)`` (CPU, defaults but the progress bar: its TensorBoard logger, its
  checkpoint at each epoch end, its model summary) with ``MISCallback(schemes)`` at its default
  options (the assessment at the end of ``fit``, report and figure written). The callback's
  cost: its construction and every hook (``HOOKS``), imports they trigger included. The epoch
  is the Lightning training's own: CPU time from one ``on_train_epoch_start`` to the next (the
  last to ``on_train_end``), which includes the Trainer's hooks, ``self.log``, the optimizer
  closure and the epoch-end checkpoint, less the callback's own hooks in it; the least of epochs
  2-3 of that fit and 2-4 of a second one (same module, no callback) after the assessment. A
  plain loop's epoch over the same batches (another model, same process) is reported beside it.
* ``plain``: the plain loop's 3 epochs, then ``mis_lightning.assess(model, schemes, loader,
  loss_fn)`` at its defaults (scale.py's protocol, through the public function, ``import
  mis_lightning`` inside the timed region), nothing of Lightning imported by the script; the
  epoch is the least of epochs 2-3 and 2-4 of a second model trained after the assessment.
  (``--stages`` imports the library before the timed region, to wrap it.)

Schemes: scale.py's eight ``COMMON_SCHEMES`` less ``int4_weight_only_tinygemm`` (CUDA only: on a
CPU it is an error row; ``--with-cuda-only`` keeps it, to show what its row costs).

The imports are split out by root package: each outermost import statement (``__import__`` and
``importlib.import_module`` at depth 0) is timed in CPU seconds and charged to the package
imported, and to the phase it ran in ("before": the script's own imports; then the callback's
hooks or ``assess``). ``--importtime`` also runs the child under ``python -X importtime`` and
writes its log (wall microseconds per module) to ``PREFIX_SIZE_MODE.importtime``, for where a
package's import time goes (torchao: torch._dynamo, through torchao.kernel.bsr_triton_ops).

    python benchmarks/lightning_total.py --sizes 1e5 1e6
    python benchmarks/lightning_total.py --sizes 1e5 --stages            # CPU per library stage
    python benchmarks/lightning_total.py --sizes 1e5 --modes lightning --no-callback  # the fit alone
    python benchmarks/lightning_total.py --sizes 1e5 --modes plain --profile prof   # cProfile of assess
    python benchmarks/lightning_total.py --sizes 1e5 --importtime it --json out.json

``--stages`` times the library's stages (``STAGES``: estimation, joint sums, cell moments, power
sums, fourth sums, figure, ...) in the same run; ``--no-callback`` runs the Lightning fit without
the callback, to see which imports the training makes itself (an import the callback triggers
first is the training's saving, not the callback's cost).

Every figure is process CPU time (``time.process_time``), in seconds and in epochs of the same
process. ``--root PATH`` measures another checkout's ``mis_lightning`` (before / after).
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import COMMON_SCHEMES  # noqa: E402

CUDA_ONLY = ["int4_weight_only_tinygemm"]
EXTRA_EPOCHS = 4  # a second training after the assessment, for a steadier epoch (its first left out)
HOOKS = ["setup", "on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
         "on_validation_epoch_end", "on_fit_end", "teardown", "state_dict"]


class ImportClock:
    """CPU seconds of every outermost import, by (phase, root package imported)."""

    def __init__(self) -> None:
        self.depth = 0
        self.phase = "before"
        self.spent: dict[str, dict[str, float]] = {}
        self._import, self._import_module = builtins.__import__, importlib.import_module

    def _root(self, name: str, globals_: dict | None, level: int) -> str:
        if level and globals_:
            return (globals_.get("__package__") or globals_.get("__name__") or "?").split(".")[0]
        return name.split(".")[0]

    def _timed(self, root: str, fn, *a, **k):
        if self.depth:
            return fn(*a, **k)
        self.depth += 1
        c0 = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            dt = time.process_time() - c0
            self.depth -= 1
            if dt > 1e-4:  # an import of a module already loaded costs microseconds
                per = self.spent.setdefault(self.phase, {})
                per[root] = per.get(root, 0.0) + dt

    def install(self) -> None:
        def imp(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
            return self._timed(self._root(name, globals, level), self._import, name, globals, locals, fromlist, level)

        def imp_module(name, package=None):
            root = (package or "?").split(".")[0] if name.startswith(".") else name.split(".")[0]
            return self._timed(root, self._import_module, name, package)

        builtins.__import__ = imp
        importlib.import_module = imp_module


CLOCK = ImportClock()

#: ``--stages``: the library functions whose CPU time is reported (nested ones within their
#: callers: the joint sums hold the cell moments and the power sums), with the helper that owns
#: them this round in docs/benchmarks.md ("fx33").
STAGES = [
    ("mis_lightning._lightning_support", "assess_on_trainer"), ("mis_lightning._lightning_support", "check_first_batch"),
    ("mis_lightning.streaming", "EstimationMetric.update"), ("mis_lightning.streaming", "EstimationMetric.estimate"),
    ("mis_lightning.assess", "check_schemes"), ("mis_lightning.assess", "run_estimation"),
    ("mis_lightning.assess", "score_schemes"), ("mis_lightning.assess", "_prepare_scheme"),
    ("mis_lightning.assess", "_joint_sums"), ("mis_lightning.quantization.base", "ParamGrid.element_moments"),
    ("mis_lightning.estimation.linear_factors", "factored_power_sums"),
    ("mis_lightning.assess", "_finish_scheme"), ("mis_lightning.assess", "_exact_fourth_sums_of"),
    ("mis_lightning.tracking", "publish_report"), ("mis_lightning.tracking", "draw_figure"),
    ("mis_lightning.tracking", "log_report"),
]
STAGE_S: dict[str, list] = {}


def _install_stages(lightning: bool) -> None:
    """Wrap :data:`STAGES` (and the references other library modules imported by name) with
    CPU timers, into :data:`STAGE_S` ``{label: [seconds, calls]}``; without ``lightning``, not
    the modules that import Lightning."""
    import mis_lightning  # noqa: F401

    for mod, name in STAGES:
        if not lightning and mod.rsplit(".", 1)[-1] in ("_lightning_support", "tracking", "streaming"):
            continue
        m = importlib.import_module(mod)
        *path, attr = name.split(".")
        owner = functools.reduce(getattr, path, m)
        fn = getattr(owner, attr, None)
        if fn is None:  # another checkout (--root) without it
            continue

        def timed(*a, __fn=fn, __label=name, **k):
            c0 = time.process_time()
            try:
                return __fn(*a, **k)
            finally:
                row = STAGE_S.setdefault(__label, [0.0, 0])
                row[0] += time.process_time() - c0
                row[1] += 1

        setattr(owner, attr, functools.wraps(fn)(timed))
        if not path:  # `from .x import name` copies elsewhere in the library
            for other in [v for k, v in sys.modules.items() if k.startswith("mis_lightning") and v is not m]:
                if getattr(other, attr, None) is fn:
                    setattr(other, attr, getattr(owner, attr))


def _data(size: str, n: int, batch: int):
    import torch

    from benchmarks.assess_speed import mlp

    torch.manual_seed(0)
    model, F = mlp(size)
    x = torch.randn(n, F)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)
    return model, loader


def per_sample_loss(out, t):
    """The data term of the objective per record, [B] (MSE / 2)."""
    return 0.5 * (out.squeeze(-1) - t) ** 2


def _plain_epochs(model, loader, epochs: int = 3) -> list[float]:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = []
    for _ in range(epochs):
        c0 = time.process_time()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            per_sample_loss(model(xb), yb).mean().backward()
            opt.step()
        out.append(time.process_time() - c0)
    opt.zero_grad(set_to_none=True)  # a trained model handed over: no .grad
    return out


def run_plain(size: str, n: int, batch: int, schemes: list[str], profile: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    model, loader = _data(size, n, batch)
    epochs = _plain_epochs(model, loader)
    CLOCK.phase = "assess"
    c0 = time.process_time()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile(time.process_time)
        prof.enable()
    import mis_lightning  # a plain user's import, charged to the assessment

    rep = mis_lightning.assess(model, schemes, loader, per_sample_loss)
    if prof is not None:
        prof.disable()
        _dump(prof, profile, size, "plain")
    spent = time.process_time() - c0
    CLOCK.phase = "after"
    # more epochs of the same training (a second model) after the assessment: on a loaded
    # machine one epoch's CPU time moves 20-50%, the least of more of them is steadier
    epochs += _plain_epochs(_data(size, n, batch)[0], loader, EXTRA_EPOCHS)[1:]
    return {"epoch_plain_s": min(epochs[1:]), "epochs_plain_s": epochs, "assess_s": spent,
            "mis_lightning": mis_lightning.__file__,
            "lightning_loaded": "lightning_fabric" in sys.modules,
            "results": {k: v.leakage for k, v in rep.schemes.items()},
            "errors": {k: v.error for k, v in rep.schemes.items() if v.error}}


def run_lightning(size: str, n: int, batch: int, schemes: list[str], profile: str | None,
                  callback: bool = True) -> dict:
    import pytorch_lightning as pl
    import torch

    import mis_lightning
    from mis_lightning import MISCallback

    torch.set_num_threads(1)
    plain_model, loader = _data(size, n, batch)
    plain_epochs = _plain_epochs(plain_model, loader)
    model, loader = _data(size, n, batch)
    hook_s: dict[str, float] = {}  # CPU seconds of the callback's construction and of each hook

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, out, t):
            return per_sample_loss(out, t)

        def training_step(self, b, i):
            loss = per_sample_loss(self(b[0]), b[1]).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    in_epoch = [0.0]  # the callback's hook time inside the current epoch
    prof = None

    def timed(name, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            nonlocal prof
            if name == "on_fit_end" and profile:
                import cProfile

                prof = cProfile.Profile(time.process_time)
                prof.enable()
            CLOCK.phase = f"callback.{name}"
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                dt = time.process_time() - c0
                if prof is not None:
                    prof.disable()
                hook_s[name] = hook_s.get(name, 0.0) + dt
                in_epoch[0] += dt
                CLOCK.phase = "training"
        return inner

    mis = None
    if callback:
        CLOCK.phase = "callback.__init__"
        c0 = time.process_time()
        mis = MISCallback(list(schemes))  # its construction checks the scheme names: the user's cost too
        hook_s["__init__"] = time.process_time() - c0
        for h in HOOKS:
            setattr(mis, h, timed(h, getattr(mis, h)))

    marks: list[tuple[str, float, float]] = []  # (event, CPU, callback time so far in the epoch)

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            marks.append(("start", time.process_time(), in_epoch[0]))

        def on_train_end(self, trainer, pl_module):
            marks.append(("end", time.process_time(), in_epoch[0]))

    root = tempfile.mkdtemp(prefix="mis_lt_")
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, default_root_dir=root,
                         enable_progress_bar=False, callbacks=[EpochClock()] + ([mis] if mis else []))
    CLOCK.phase = "training"
    c0 = time.process_time()
    trainer.fit(Module(model), train_dataloaders=loader)
    fit_s = time.process_time() - c0
    if prof is not None:
        _dump(prof, profile, size, "lightning")
    l_epochs = [(b[1] - a[1]) - (b[2] - a[2]) for a, b in zip(marks, marks[1:])][1:]
    # the same Lightning training again (a second model, no MISCallback) after the assessment,
    # its epochs after the first joining the sample (see run_plain)
    CLOCK.phase = "after"
    marks.clear()
    pl.Trainer(max_epochs=EXTRA_EPOCHS, accelerator="cpu", devices=1, default_root_dir=root, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[EpochClock()]).fit(Module(_data(size, n, batch)[0]),
                                                                          train_dataloaders=loader)
    l_epochs += [(b[1] - a[1]) - (b[2] - a[2]) for a, b in zip(marks, marks[1:])][1:]
    plain_epochs += _plain_epochs(_data(size, n, batch)[0], loader, EXTRA_EPOCHS)[1:]
    rep = mis.report if mis else None
    return {"epoch_plain_s": min(plain_epochs[1:]), "epochs_plain_s": plain_epochs,
            "epoch_lightning_s": min(l_epochs), "epochs_lightning_s": l_epochs, "fit_s": fit_s,
            "callback_s": sum(hook_s.values()), "hooks_s": hook_s, "mis_lightning": mis_lightning.__file__,
            "last_error": mis.last_error if mis else None, "callback": callback,
            "results": {} if rep is None else {k: v.leakage for k, v in rep.schemes.items()},
            "errors": {} if rep is None else {k: v.error for k, v in rep.schemes.items() if v.error}}


def _dump(prof, prefix: str, size: str, mode: str) -> None:
    import io
    import pstats

    out = f"{prefix}_{size}_{mode}"
    prof.dump_stats(out + ".prof")
    txt = io.StringIO()
    pstats.Stats(prof, stream=txt).sort_stats("cumulative").print_stats(100)
    pstats.Stats(prof, stream=txt).sort_stats("tottime").print_stats(40)
    Path(out + ".prof.txt").write_text(txt.getvalue())


def child(args) -> dict:
    CLOCK.install()
    if args.root is not None:
        sys.path.insert(0, str(args.root))
    c0 = time.process_time()
    import torch  # noqa: F401

    if args.one_mode == "lightning":
        import pytorch_lightning  # noqa: F401

        import mis_lightning  # noqa: F401  (a Lightning user imports the callback at the top)
    before_s = time.process_time() - c0
    if args.stages:  # (in plain mode this imports mis_lightning before the timed assess)
        _install_stages(args.one_mode == "lightning")
    run = run_lightning if args.one_mode == "lightning" else run_plain
    r = run(args.one, args.n, args.batch, args.schemes, args.profile) if args.one_mode == "plain" else \
        run(args.one, args.n, args.batch, args.schemes, args.profile, callback=not args.no_callback)
    r.update({"size": args.one, "mode": args.one_mode, "schemes": args.schemes, "before_s": before_s,
              "imports_s": CLOCK.spent, "load_avg": os.getloadavg(), "stages_s": STAGE_S,
              "params": sum(p.numel() for p in __import__("benchmarks.assess_speed", fromlist=["mlp"]).mlp(args.one)[0].parameters())})
    return r


def _summary(r: dict) -> str:
    if r["mode"] == "lightning" and not r.get("callback", True):
        train = r["imports_s"].get("training", {})
        return (f"{r['size']} lightning without the callback: epoch Lightning {r['epoch_lightning_s']:.4f} s (plain loop "
                f"{r['epoch_plain_s']:.4f} s); fit {r['fit_s']:.2f} s; imports during the fit: {sum(train.values()):.2f} s ("
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(train.items(), key=lambda kv: -kv[1]) if v >= 0.005) + ")")
    ep = r["epoch_lightning_s"] if r["mode"] == "lightning" else r["epoch_plain_s"]
    work = r["callback_s"] if r["mode"] == "lightning" else r["assess_s"]
    phase_imports = {ph: v for ph, v in r["imports_s"].items() if ph not in ("before", "training")}
    lazy = {}
    for per in phase_imports.values():
        for pkg, s in per.items():
            lazy[pkg] = lazy.get(pkg, 0.0) + s
    lazy_s = sum(lazy.values())
    ml_import = r["imports_s"].get("before", {}).get("mis_lightning", 0.0)
    if r["mode"] == "plain":
        ml_import = r["imports_s"].get("assess", {}).get("mis_lightning", 0.0)
    tao = lazy.get("torchao", 0.0)
    lines = [f"{r['size']} {r['mode']} ({Path(r['mis_lightning']).parent.parent.name}, d={r['params']:,}, "
             f"load {r['load_avg'][0]:.1f}): epoch "
             + (f"Lightning {r['epoch_lightning_s']:.4f} s (plain loop {r['epoch_plain_s']:.4f} s, "
                f"x{r['epoch_lightning_s'] / r['epoch_plain_s']:.2f})" if r["mode"] == "lightning"
                else f"{r['epoch_plain_s']:.4f} s")]
    what = "callback (construction and hooks)" if r["mode"] == "lightning" else "assess (with `import mis_lightning`)"
    total = work + (ml_import if r["mode"] == "lightning" else 0.0)
    lines.append(f"    {what} {work:.2f} s = {work / ep:.1f} ep"
                 + (f"; + import mis_lightning {ml_import:.2f} s = {total / ep:.1f} ep" if r["mode"] == "lightning" else "")
                 + f"; of which imports it made {lazy_s:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in sorted(lazy.items(), key=lambda kv: -kv[1]) if v >= 0.005)})")
    lines.append(f"    without torchao's import: {(total - tao) / ep:.1f} ep; without any import: {(total - lazy_s - (ml_import if r['mode'] == 'lightning' else 0)) / ep:.1f} ep"
                 + ("" if r["mode"] == "plain" else f"; mis_lightning import {ml_import / ep:.1f} ep"))
    if r["mode"] == "lightning":
        lines.append("    hooks: " + ", ".join(f"{k} {v:.3f}" for k, v in r["hooks_s"].items() if v >= 0.0005))
        train = r["imports_s"].get("training", {})
        lines.append(f"    imports during the fit's training (not the callback's): {sum(train.values()):.2f} s ("
                     + ", ".join(f"{k} {v:.2f}" for k, v in sorted(train.items(), key=lambda kv: -kv[1]) if v >= 0.005) + ")")
    before = r["imports_s"].get("before", {})
    lines.append("    script's imports (before): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(before.items(), key=lambda kv: -kv[1]) if v >= 0.005))
    if r.get("stages_s"):
        lines.append("    stages (CPU s, calls; nested in their callers): " + ", ".join(
            f"{k} {v[0]:.3f} ({v[1]})" for k, v in r["stages_s"].items()))
    if r.get("errors"):
        lines.append(f"    error rows: {sorted(r['errors'])}")
    if r.get("last_error"):
        lines.append(f"    callback failed: {r['last_error']}")
    return "\n".join(lines)


def _importtime_roots(lines: list[str]) -> list[tuple[str, int]]:
    """``-X importtime`` lines -> ``[(root package, cumulative microseconds)]`` of the outermost
    imports (no indentation), largest first."""
    out: dict[str, int] = {}
    for ln in lines:
        parts = ln.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header
        name = parts[2][1:]
        if name.startswith(" "):
            continue  # nested in another import
        root = name.split(".")[0]
        out[root] = out.get(root, 0) + int(parts[1])
    return sorted(out.items(), key=lambda kv: -kv[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6"])
    ap.add_argument("--modes", nargs="+", default=["lightning", "plain"], choices=["lightning", "plain"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--with-cuda-only", action="store_true", help="keep int4_weight_only_tinygemm (an error row on CPU)")
    ap.add_argument("--profile", default=None, metavar="PREFIX", help="cProfile the assessment (on_fit_end / assess)")
    ap.add_argument("--importtime", default=None, metavar="PREFIX", help="also run under -X importtime, log kept")
    ap.add_argument("--no-callback", action="store_true",
                    help="lightning mode: the same fit without MISCallback (the imports the training makes itself)")
    ap.add_argument("--stages", action="store_true", help="CPU time of the library's stages (STAGES)")
    ap.add_argument("--root", type=Path, default=None, help="the checkout whose mis_lightning is measured")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--schemes", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(child(args)))
        return 0
    schemes = [s for s in COMMON_SCHEMES if args.with_cuda_only or s not in CUDA_ONLY]
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            cmd = [sys.executable] + (["-X", "importtime"] if args.importtime else []) + [
                __file__, "--one", size, "--one-mode", mode, "--n", str(args.n), "--batch", str(args.batch),
                "--schemes", *schemes]
            if args.root is not None:
                cmd += ["--root", str(args.root.resolve())]
            if args.profile:
                cmd += ["--profile", str(Path(args.profile).resolve())]
            if args.stages:
                cmd.append("--stages")
            if args.no_callback:
                cmd.append("--no-callback")
            p = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if args.importtime:
                log = [ln for ln in p.stderr.splitlines() if ln.startswith("import time:")]
                Path(f"{args.importtime}_{size}_{mode}.importtime").write_text("\n".join(log))
                print(f"{size} {mode} -X importtime, outermost imports by package (wall ms): "
                      + ", ".join(f"{k} {v / 1e3:.0f}" for k, v in _importtime_roots(log)[:8]), flush=True)
            if p.returncode != 0:
                print(f"{size} {mode}: failed ({p.returncode})\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(_summary(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
