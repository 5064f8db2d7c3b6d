"""Send a :class:`~mis_lightning.report.Report` to Lightning loggers (CSV, TensorBoard, MLflow, ...).

Keys: ``mis/<scheme>/leakage``, ``mis/<scheme>/mis``, ``mis/<scheme>/leakage_p10``,
``mis/<scheme>/leakage_p90``, ``mis/<scheme>/d_eff``, ``mis/<scheme>/sparsity``,
``mis/<scheme>/bits_per_weight``, ``mis/<scheme>/frozen_fraction``,
``mis/<scheme>/utility/<metric>``, ``mis/baseline/leakage``, ``mis/baseline/mis``.
Loggers are used through their public ``log_metrics`` (rank-zero only in Lightning), and
figures through the experiment object where the logger has one that takes figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .report import Report


def report_metrics(report: Report, prefix: str = "mis") -> dict[str, float]:
    """Flat ``{key: value}`` of a report's per-scheme figures (finite values only)."""
    out: dict[str, float] = {
        f"{prefix}/baseline/leakage": report.baseline_leakage,
        f"{prefix}/baseline/mis": report.baseline_mis,
    }
    for name, s in report.schemes.items():
        base = f"{prefix}/{name}"
        vals: dict[str, Any] = {
            "leakage": s.leakage, "mis": s.mis, "d_eff": s.d_eff, "sparsity": s.sparsity,
            "bits_per_weight": s.bits_per_weight, "frozen_fraction": s.frozen_fraction,
            "failed": 1.0 if s.error else 0.0,
        }
        if s.interval is not None:
            vals["leakage_p10"], vals["leakage_p90"] = s.interval
        for k, v in s.utility.items():
            vals[f"utility/{k}"] = v
        for k, v in vals.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                out[f"{base}/{k}"] = float(v)
    return out


def log_report(loggers: Iterable[Any], report: Report, step: int = 0, prefix: str = "mis",
               figure: Any | None = None, figure_name: str = "mis_privacy_utility") -> None:
    """Log a report's metrics (and optionally a matplotlib figure) to every logger."""
    metrics = report_metrics(report, prefix)
    for lg in loggers:
        lg.log_metrics(metrics, step=step)
        if figure is not None:
            log_figure(lg, figure, figure_name, step)
        if hasattr(lg, "save"):
            lg.save()


def log_figure(logger: Any, figure: Any, name: str, step: int = 0) -> bool:
    """Log a matplotlib figure where the logger supports images; returns whether it did."""
    exp = getattr(logger, "experiment", None)
    if exp is None:
        return False
    if hasattr(exp, "add_figure"):  # TensorBoard SummaryWriter
        exp.add_figure(name, figure, global_step=step, close=False)
        return True
    if hasattr(exp, "log_figure") and hasattr(logger, "run_id"):  # MLflow client
        exp.log_figure(logger.run_id, figure, f"{name}.png")
        return True
    return False
