"""Send a :class:`~mis_lightning.report.Report` to Lightning loggers (CSV, TensorBoard, MLflow, ...).

Keys: ``mis/<scheme>/leakage``, ``mis/<scheme>/mis``, ``mis/<scheme>/leakage_p10``,
``mis/<scheme>/leakage_p90``, ``mis/<scheme>/d_eff``, ``mis/<scheme>/zero_fraction``,
``mis/<scheme>/bits_per_weight`` (the assessed weights'), ``mis/<scheme>/model_bits_per_weight`` (the whole
quantized model's, scales included: the table's ``model b/w``), ``mis/<scheme>/pinned_fraction``,
``mis/<scheme>/float_fraction``,
``mis/<scheme>/indicative`` (1: the table's ``*``), ``mis/<scheme>/failed``,
``mis/<scheme>/utility/<metric>``, ``mis/baseline/leakage``, ``mis/baseline/mis``,
``mis/baseline/undetermined`` (1: the table's ``undet.``: no figure ranks anything).
Loggers are used through their public ``log_metrics`` (rank-zero only in Lightning), and
figures and report files through the experiment object where the logger keeps them (MLflow:
figure and ``mis_report.json`` as artifacts; W&B: figure as an image, JSON in the run's files;
TensorBoard: figure as an image, the table as text); either Lightning package's loggers.
:func:`publish_report` / :func:`publish_failure` also write the report JSON and the figure
(what the Lightning callback publishes).
"""

from __future__ import annotations

import csv
import json
import math
import re
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._user_warnings import warn
from .report import WRITTEN_WITH_FIGURE, Report, undetermined_headline


def _head(prefix: str) -> str:
    """``"<prefix>/"``, or nothing for an empty prefix (keys then start with the scheme)."""
    return f"{prefix}/" if prefix else ""


#: The per-scheme figures logged as ``<prefix>/<scheme>/<figure>`` (SchemeResult attributes),
#: besides ``failed``, ``leakage_p10`` / ``leakage_p90`` (with an interval) and ``utility/<metric>``.
#: ``model_bits_per_weight`` (the whole quantized model's size, the table's ``model b/w``; fz44) is
#: logged beside ``bits_per_weight`` (the assessed weights') under the field's name, as in the JSON,
#: the CSV and ``aggregate.csv`` (until sm45 no tracker got it); absent from reports saved before fz44.
SCHEME_FIGURES = ("leakage", "mis", "pool_leakage", "d_eff", "zero_fraction", "bits_per_weight",
                  "model_bits_per_weight", "pinned_fraction")
#: Figures of the table's row (:meth:`Report.rows`) that qualify the others: ``float_fraction``
#: (share of the assessed weights left in float, the table's ``float``) and ``indicative`` (1 where
#: the table marks the leakage ``*``: outside the analysis's assumptions), so that a tracker's
#: plain numbers say what the table's columns and marks say (nu41b: they did not).
ROW_FIGURES = ("float_fraction", "indicative")
#: ``<prefix>/baseline/undetermined``: 1 where the table reads ``undet.`` after the baseline (the
#: headline set by the rank rule, no verdict: ``report.headline_undetermined``), else 0; logged with
#: every report, so that a tracker's plain baseline and scheme figures say so too (hd51, cor52)
BASELINE_FLAGS = ("undetermined",)


def metric_keys(schemes: Iterable[str], utility: Iterable[str], prefix: str = "mis", interval: bool = True
                ) -> list[str]:
    """Every key :func:`report_metrics` can log for these scheme names and utility metric
    names (``loss`` is always measured with a validation loader); ``leakage_p10`` /
    ``leakage_p90`` only with an ``interval`` (``uncertainty_draws > 0``)."""
    head = _head(prefix)
    keys = [f"{head}baseline/{k}" for k in ("leakage", "mis", "pool_leakage", *BASELINE_FLAGS)]
    figures = [*SCHEME_FIGURES, *ROW_FIGURES, "failed", *(("leakage_p10", "leakage_p90") if interval else ()),
               *(f"utility/{u}" for u in ("loss", *utility))]
    return keys + [f"{head}{s}/{k}" for s in schemes for k in figures]


def report_metrics(report: Report, prefix: str = "mis") -> dict[str, float]:
    """Flat ``{key: value}`` of a report's per-scheme figures (finite values only).

    Raises:
        Nothing for a well-formed report.
    """
    out: dict[str, float] = {
        f"{_head(prefix)}baseline/leakage": report.baseline_leakage,
        f"{_head(prefix)}baseline/mis": report.baseline_mis,
    }
    if math.isfinite(report.baseline_pool_leakage):
        out[f"{_head(prefix)}baseline/pool_leakage"] = report.baseline_pool_leakage
    rows = {r["scheme"]: r for r in report.rows()}
    out[f"{_head(prefix)}baseline/undetermined"] = 1.0 if undetermined_headline(rows.values()) else 0.0
    for name, s in report.schemes.items():
        base = f"{_head(prefix)}{name}"
        vals: dict[str, Any] = {k: getattr(s, k) for k in SCHEME_FIGURES}
        vals["float_fraction"] = rows[name]["float_fraction"]  # NaN (not logged) for a failed scheme
        vals["indicative"] = 1.0 if rows[name].get("indicative") else 0.0
        vals["failed"] = 1.0 if s.error else 0.0
        if s.interval is not None:
            vals["leakage_p10"], vals["leakage_p90"] = s.interval
        for k, v in s.utility.items():
            vals[f"utility/{k}"] = v
        for k, v in vals.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                out[f"{base}/{k}"] = float(v)
    return out


def log_report(loggers: Iterable[Any], report: Report, step: int = 0, prefix: str = "mis",
               figure: Any | None = None, figure_name: str = "mis_privacy_utility",
               epoch: int | None = None, pixels: Any | None = None) -> None:
    """Log a report's metrics (and optionally a matplotlib figure) to every logger at ``step``;
    with ``epoch`` (0-based, the epoch the assessed weights were trained in) also an ``epoch``
    entry, as Lightning's own logging adds to every row (the CSV logger's ``epoch`` column).
    ``pixels``: the figure as already drawn (see :func:`log_figure`).

    Raises:
        Exception: whatever a logger raises.
    """
    metrics = report_metrics(report, prefix)
    if epoch is not None:
        metrics["epoch"] = int(epoch)  # an int, as Lightning logs it (the CSV reads "3", not "3.0")
    for lg in loggers:
        keep_csv_rows(lg)
        lg.log_metrics(metrics, step=step)
        if figure is not None:
            log_figure(lg, figure, figure_name, step, pixels=pixels)
        if hasattr(lg, "save"):
            lg.save()


def keep_csv_rows(logger: Any) -> None:
    """A CSV logger that has not written in this process yet, over a ``metrics.csv`` that another
    process wrote (rank 0 of ``strategy="ddp_spawn"``, whose training metrics the app's report
    joins from the main process): keep those rows. Lightning's CSV writer deletes an existing
    ``metrics.csv`` when it is created, so the report's row would otherwise replace the whole
    training history. A no-op for other loggers and for a CSV logger already writing here.

    Raises:
        OSError: the file cannot be read or written back.
    """
    if not type(logger).__name__.endswith("CSVLogger") or getattr(logger, "_experiment", True) is not None:
        return
    path = Path(str(logger.log_dir)) / "metrics.csv"
    if not path.is_file():
        return
    text = path.read_text()
    writer = logger.experiment  # created now: it removes the file
    path.write_text(text)
    lines = text.splitlines()
    if lines and hasattr(writer, "metrics_keys"):  # the columns: save() rewrites the header with new keys
        writer.metrics_keys = next(csv.reader([lines[0]]))


def log_figure(logger: Any, figure: Any, name: str, step: int = 0, pixels: Any | None = None) -> bool:
    """Log a matplotlib figure where the logger supports images; returns whether it did.

    ``pixels``: the figure as already drawn, ``[H, W, 3]`` uint8 RGB (:func:`draw_figure`):
    TensorBoard logs them as they are (``add_figure`` would draw the figure again: 0.3-0.4 s of
    CPU for the report's figure); ``None``: the logger draws the figure.

    Raises:
        Exception: whatever the logger's experiment object raises.
    """
    exp = getattr(logger, "experiment", None)
    if exp is None:
        return False
    if hasattr(exp, "add_figure"):  # TensorBoard SummaryWriter
        if pixels is not None and hasattr(exp, "add_image"):
            # what add_figure logs (its canvas's RGB, HWC), without drawing the figure again
            exp.add_image(name, pixels, global_step=step, dataformats="HWC")
        else:
            exp.add_figure(name, figure, global_step=step, close=False)
        return True
    if _is_mlflow(logger, exp):
        exp.log_figure(logger.run_id, figure, f"{name}.png")
        return True
    if _is_wandb(exp) and hasattr(logger, "log_image"):  # W&B: an image in the run's media
        logger.log_image(key=name, images=[figure], step=step)
        return True
    return False


def _is_mlflow(logger: Any, exp: Any) -> bool:
    """An MLflow client with the logger's run (Lightning's MLFlowLogger, either package)."""
    return hasattr(exp, "log_figure") and hasattr(exp, "log_artifact") and hasattr(logger, "run_id")


def _is_wandb(exp: Any) -> bool:
    """A W&B run (Lightning's WandbLogger.experiment, either package; online or offline)."""
    return type(exp).__module__.startswith("wandb") and hasattr(exp, "save")


def log_files(logger: Any, paths: Iterable[str | Path], table: str | None = None,
              step: int = 0) -> list[str]:
    """Attach report files to a logger's run; returns how each went (``"mlflow:<name>"``,
    ``"wandb:<name>"``, ``"tensorboard:text"``), empty when the logger takes no files (CSV).

    MLflow: each file as an artifact of the run; W&B: each file saved into the run's files
    (uploaded with the run, or with ``wandb sync`` offline); TensorBoard, which stores no
    files: the report's ``table`` as a text summary ``mis_report``.

    Raises:
        Exception: whatever the logger's experiment object raises.
    """
    exp = getattr(logger, "experiment", None)
    if exp is None:
        return []
    done = []
    if _is_mlflow(logger, exp):
        for p in paths:
            exp.log_artifact(logger.run_id, str(p))
            done.append(f"mlflow:{Path(p).name}")
    elif _is_wandb(exp):
        import shutil

        for p in paths:
            # into the run's files dir, which W&B uploads with the run; not `run.save(path)`,
            # which globs the path (a job dir named `schemes=[a,b]` would match nothing)
            # (the callback's own file is there already where no dirpath= or checkpoint folder applies)
            if (dest := Path(exp.dir) / Path(p).name).resolve() != Path(p).resolve():
                shutil.copyfile(p, dest)
            done.append(f"wandb:{Path(p).name}")
    elif hasattr(exp, "add_text") and table is not None:  # TensorBoard SummaryWriter
        exp.add_text("mis_report", "\n".join("    " + ln for ln in table.splitlines()), global_step=step)
        done.append("tensorboard:text")
    return done


REPORT_NAME = "mis_report.json"
FIGURE_NAME = "mis_privacy_utility.png"
FIGURE_DPI = 120  # the report figure's resolution (Report.plot's savefig)


def versioned(name: str, version: str) -> str:
    """``name`` with ``version`` (``""`` or ``"-v<k>"``) before its extension:
    ``versioned("mis_report.json", "-v1") == "mis_report-v1.json"``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}{version}{dot}{ext}" if dot else name + version


# the callback's file names with a fixed name in its folder (the plan's: callback.py's write_plan);
# mid-training copies are named mis_report_epoch=<E>-step=<S>.json
PLAN_NAMES = ("mis_plan.json", "mis_plan.md", "mis_plan.png")
FIXED_NAMES = (REPORT_NAME, FIGURE_NAME, *PLAN_NAMES)


def taken_names(out: Path, version: str = "", names: Iterable[str] = FIXED_NAMES, copies: bool = True) -> list[str]:
    """The files of ``out`` a fit writing its ``names`` (and, with ``copies``, its mid-training
    ``mis_report_epoch=<E>-step=<S>.json`` copies) under ``version`` (:func:`versioned`) would
    overwrite, sorted; ``[]`` where ``out`` does not exist."""
    taken = [versioned(n, version) for n in names if (out / versioned(n, version)).exists()]
    if copies and out.is_dir():
        copy = re.compile(rf"mis_report_epoch=\d+-step=\d+{re.escape(version)}\.json")
        taken += [p.name for p in out.glob("mis_report_epoch=*") if copy.fullmatch(p.name)]
    return sorted(taken)


def free_version(out: Path) -> str:
    """``""`` where none of the callback's file names is taken in ``out`` (:func:`taken_names`),
    else ``"-v<k>"`` with the least ``k >= 1`` whose names are all free: a fit's files are kept apart
    from an earlier run's (or any file of the user's with such a name) in the same folder, named as
    Lightning's ``ModelCheckpoint`` names a checkpoint whose name is taken (``STARTING_VERSION = 1``,
    ``"-v1"``; before, a second run overwrote the first's report, and a figure whose report was
    gone was overwritten)."""
    if not taken_names(out):
        return ""
    k = 1
    while taken_names(out, f"-v{k}"):
        k += 1
    return f"-v{k}"


def draw_figure(figure: Any, path: str | Path, dpi: float = FIGURE_DPI) -> Any:
    """Draw ``figure`` once at ``dpi``, write it to ``path`` as PNG (what
    ``figure.savefig(path, dpi=dpi)`` writes: the same pixels, through the same
    ``matplotlib.image.imsave`` call) and return the drawing, ``[H, W, 3]`` uint8 RGB, for
    :func:`log_figure` (TensorBoard's ``add_figure`` would draw it again, at the figure's dpi).
    A figure whose canvas is not Agg's is saved by ``savefig`` and ``None`` returned.

    Raises:
        OSError: ``path`` cannot be written.
    """
    import matplotlib.image
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(figure.canvas, FigureCanvasAgg):  # another backend's canvas: savefig draws
        figure.savefig(path, dpi=dpi)
        return None
    old = figure.get_dpi()
    figure.set_dpi(dpi)
    try:
        figure.canvas.draw()
        rgba = np.array(figure.canvas.buffer_rgba())  # a copy: the canvas's buffer is reused
    finally:
        figure.set_dpi(old)  # other loggers (MLflow, W&B) draw it at its own dpi, as before
    matplotlib.image.imsave(path, rgba, format="png", origin="upper", dpi=dpi)
    return np.ascontiguousarray(rgba[:, :, :3])


def publish_report(out: Path, report: Report, loggers: Iterable[Any], *, step: int = 0,
                   prefix: str = "mis", log_figure: bool = True, extra: dict[str, Any] | None = None,
                   copy_name: str | None = None, epoch: int | None = None, version: str = "") -> tuple[Path, Path]:
    """Write ``<out>/mis_report.json`` (plus ``extra`` keys, and a copy as ``copy_name``) and
    the privacy-utility figure ``<out>/mis_privacy_utility.png`` (both names with ``version``
    before the extension: :func:`free_version`; its warnings a line each, pointing to the JSON for
    the full text: :meth:`~mis_lightning.report.Report.plot`), and log the report (and the
    figure, with ``log_figure``) to every logger at ``step`` (and ``epoch``: :func:`log_report`);
    the JSON goes to the loggers that keep files (:func:`log_files`). Returns ``(report, figure)``
    paths.

    Raises:
        OSError: ``out`` cannot be written.
    """
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(report.to_json())
    data.update(extra or {})
    text = json.dumps(data, indent=2)
    report_path = out / versioned(REPORT_NAME, version)
    report_path.write_text(text)
    if copy_name:
        (out / copy_name).write_text(text)
    figure_path = out / versioned(FIGURE_NAME, version)
    fig = report.plot(warnings_in_full=WRITTEN_WITH_FIGURE.format(name=report_path.name))
    loggers = list(loggers)
    try:
        # drawn once, for the file and the loggers (each draw is 0.3-0.4 s of CPU: fx33)
        pixels = draw_figure(fig, figure_path)
        log_report(loggers, report, step=step, prefix=prefix, figure=fig if log_figure else None, epoch=epoch,
                   pixels=pixels)
    finally:
        plt.close(fig)
    table = report.table(verbose=True)  # the trackers keep the warnings in full
    for lg in loggers:  # the JSON report next to the figure in trackers that keep files
        log_files(lg, [report_path], table=table, step=step)
    return report_path, figure_path


def publish_failure(out: Path, exc: BaseException, loggers: Iterable[Any], *, step: int = 0,
                    prefix: str = "mis", extra: dict[str, Any] | None = None, epoch: int | None = None,
                    version: str = "") -> Path | None:
    """Record a failed assessment: ``<out>/mis_report.json`` (``version`` before the extension)
    with the error and traceback (plus ``extra``), and ``<prefix>/failed = 1`` (with ``epoch`` when given) in every logger at ``step``.
    Returns the JSON's path (``None``
    when recording failed: that is only warned about, so that reporting never breaks training).

    Raises:
        Nothing: a failure to record is a ``UserWarning``.
    """
    try:
        return _publish_failure(out, exc, loggers, step, prefix, extra, epoch, version)
    except Exception as exc2:  # noqa: BLE001 - never let reporting break training
        warn(f"MISCallback: could not record the failure: {exc2}", UserWarning)
        return None


def _publish_failure(out: Path, exc: BaseException, loggers: Iterable[Any], step: int, prefix: str,
                     extra: dict[str, Any] | None, epoch: int | None, version: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / versioned(REPORT_NAME, version)
    path.write_text(json.dumps({
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        **(extra or {}),
    }, indent=2))
    for lg in loggers:
        lg.log_metrics({f"{_head(prefix)}failed": 1.0, **({"epoch": int(epoch)} if epoch is not None else {})},
                       step=step)
        if hasattr(lg, "save"):
            lg.save()
    return path


def history_summary(report: Report) -> dict[str, dict[str, float]]:
    """``{scheme: {leakage, mis, d_eff}, "baseline": {leakage, mis}}`` (plain floats, for a
    callback's checkpointed history)."""
    out = {k: {"leakage": s.leakage, "mis": s.mis, "d_eff": s.d_eff} for k, s in report.schemes.items()}
    out["baseline"] = {"leakage": report.baseline_leakage, "mis": report.baseline_mis}
    return out
