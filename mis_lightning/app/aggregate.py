"""Aggregate a ``mis-lightning -m`` sweep: one row per (job, scheme).

:class:`AggregateSweep` is a Hydra callback (registered in ``conf/config.yaml`` under
``hydra.callbacks``); in ``on_multirun_end`` -- which runs in the launching process, after
every job, whatever the launcher -- it reads each job's ``result.json`` under the sweep dir
(ordered by job number) and writes into the sweep dir:

* ``aggregate.csv`` -- job, overrides, scheme, bits per weight, utility metrics, leakage with
  its (p10, p90) interval, MIS, baseline, d_eff, method, error, job dir, the job's report
  warnings (joined with `` | ``);
* ``aggregate.md`` -- the same as a Markdown table (one utility column per metric the rows are
  judged by: rmse and auroc in a sweep over both tasks);
* ``frontier.png`` -- leakage against utility, one point per distinct row (identical results
  merged, names in a legend beside the axes), the non-dominated points joined (the
  privacy-utility frontier) and the unquantized baseline dashed; one panel per utility when
  the rows are judged by several (regression and binary data); the legend's names carry
  ``aggregate.md``'s marks (``^``, ``*``, ``!``, ...), explained under the axes.

A failed job (its ``result.json`` has ``status: "failed"``, written by
:func:`~mis_lightning.app.job.run_job` or, as a fallback, by :meth:`AggregateSweep.on_job_end`)
gets one row with ``job_status = failed`` and its error; ``aggregate.md`` lists the failures
with their full messages below the table; the figure shows what succeeded (or says that
nothing did). When a job failed, or ran but scored no scheme (every row an error), the
callback exits with status 1 after aggregating, and ``mis-lightning-aggregate`` returns 1.

Re-run on an existing sweep: ``mis-lightning-aggregate <sweep dir>`` or
``python -m mis_lightning.app.aggregate <sweep dir>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mis_lightning.app.replicates import across_seeds_section
from mis_lightning.report import (
    D_EFF_SCHEMES_MARK,
    FLOAT_ENTRY,
    MODEL_BITS_ENTRY,
    NOT_RANKED,
    POSITION_ENTRY,
    UTILITY_TOLERANCE,
    ZEROS_ENTRY,
    baseline_marks,
    column_formats,
    drop_nan_interval,
    figure_notes,
    has_interval,
    higher_is_better,
    interval_lost_warning,
    leakage_marks,
    marks_legend,
    merge_identical,
    no_points_note,
    pick_utility_key,
    scheme_marks,
    share_format,
    short_error,
    ties_line,
    undetermined_headline,
    unranked_groups,
    verdict,
    whole_model_column,
)

__all__ = ["AggregateSweep", "aggregate", "collect", "failed_jobs", "frontier_figure", "main",
           "markdown_table", "own_utility_key", "unscored_jobs", "utility_keys", "write_failure"]

RESULT_NAME = "result.json"
#: set by :meth:`AggregateSweep.on_multirun_start` for the sweep's jobs, which record it in
#: ``result.json`` (``job.sweep_id``): the sweep-end aggregate then counts this sweep's jobs only
SWEEP_ID_ENV = "MIS_LIGHTNING_SWEEP_ID"


def _job_num(path: Path, data: dict[str, Any], sweep_dir: Path) -> tuple[int, str]:
    """The sort key of a result: its job number, else the number its folder starts with, else
    last (a single run's ``result.json``, ``job.num = None``, directly in ``sweep_dir`` too)."""
    num = (data.get("job") or {}).get("num")
    if num is None:
        parts = path.parent.relative_to(sweep_dir).parts
        m = re.match(r"(\d+)", parts[0]) if parts else None
        num = int(m.group(1)) if m else 10**9
    return int(num), str(path)


def collect(sweep_dir: str | Path, result_name: str = RESULT_NAME) -> list[dict[str, Any]]:
    """The per-job results under ``sweep_dir`` (any depth), sorted by job number (as int)."""
    sweep_dir = Path(sweep_dir)
    found = []
    for p in sweep_dir.rglob(result_name):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"mis-lightning-aggregate: skipping unreadable {p}: {exc}", file=sys.stderr)
            continue
        data["_path"] = str(p)
        found.append((_job_num(p, data, sweep_dir), data))
    return [d for _, d in sorted(found, key=lambda t: t[0])]


def sweep_id_of(result: dict[str, Any]) -> str | None:
    """The id of the sweep that wrote ``result`` (``job.sweep_id``), ``None`` if not recorded."""
    return (result.get("job") or {}).get("sweep_id")


def this_sweep(results: Sequence[dict[str, Any]], sweep_id: str | None,
               since: float | None) -> tuple[list[dict[str, Any]], int]:
    """``(results of the sweep sweep_id, number left out)``: a result recorded with another
    sweep id is stale (an earlier sweep into the same dir); one without an id (a launcher that
    did not pass the environment on) counts when its file is not older than ``since``."""
    if sweep_id is None:
        return list(results), 0
    kept = []
    for res in results:
        sid = sweep_id_of(res)
        if sid == sweep_id or (sid is None and (since is None or Path(res["_path"]).stat().st_mtime >= since - 1.0)):
            kept.append(res)
    return kept, len(results) - len(kept)


def _mixed_sweeps_note(results: Sequence[dict[str, Any]]) -> str:
    """A note when ``results`` come from several sweeps (several recorded sweep ids), else ``""``."""
    ids = sorted({sid for res in results if (sid := sweep_id_of(res)) is not None})
    if len(ids) < 2:
        return ""
    return (f"note: this dir holds the results of {len(ids)} sweeps (sweep ids {', '.join(ids)}): all "
            "are aggregated, so job numbers may repeat; give each sweep its own hydra.sweep.dir")


def write_failure(path: str | Path, exc: BaseException, *, stage: str, job: dict[str, Any] | None = None,
                  schemes: Sequence[str] = (), **extra: Any) -> Path:
    """Write a failed job's ``result.json``: ``status: "failed"``, the ``stage`` it failed in,
    ``error`` (``"<type>: <message>"``), ``traceback``, the requested ``schemes`` and no rows."""
    import traceback

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "job": job or {}, "status": "failed", "stage": stage,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "schemes": list(schemes), **extra, "rows": [],
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def failed_jobs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of jobs that failed as a whole (not the error rows of single schemes)."""
    return [r for r in rows if r.get("job_status") == "failed"]


def unscored_jobs(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The jobs (``job`` numbers) that ran but scored no scheme: every row of theirs is an
    error row (e.g. a group size that divides no layer), so they released no figure either."""
    by_job: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("job_status") != "failed":
            by_job.setdefault((r.get("job"), r.get("job_dir")), []).append(r)
    return [job for (job, _), rs in by_job.items() if rs and all(r.get("error") for r in rs)]


def _float(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def rows_of(results: Sequence[dict[str, Any]], sweep_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Flat rows (one per job and scheme) from :func:`collect`'s results."""
    rows = []
    all_ov = [list((res.get("job") or {}).get("overrides") or []) for res in results]
    common = set.intersection(*(set(o) for o in all_ov)) if len(all_ov) > 1 else set()
    for res in results:
        job = res.get("job") or {}
        job_dir = Path(res["_path"]).parent if "_path" in res else None
        if job_dir is not None and sweep_dir is not None:
            try:
                job_dir = job_dir.relative_to(sweep_dir)
            except ValueError:
                pass
        head: dict[str, Any] = {
            "job": job.get("num"),
            "swept": " ".join(o for o in job.get("overrides") or [] if o not in common),
            "overrides": " ".join(job.get("overrides") or []),
            "data": (res.get("data") or "").rsplit(".", 1)[-1],
            "model": res.get("model"),
        }
        if "utility_tolerance" in res:  # the job's mis.scoring.utility_tolerance, where not the default
            head["utility_tolerance"] = res["utility_tolerance"]
        if res.get("utility_key"):  # the job's mis.scoring.utility_key: its table ranked by it
            head["ranked_by"] = res["utility_key"]
        failed = res.get("status") == "failed"
        # A failed job has no scheme rows: one row says which schemes it was to assess and why
        # it failed.
        job_rows = res.get("rows") or []
        if failed:
            job_rows = [{"scheme": ",".join(res.get("schemes") or []) or "-",
                         "error": f"job failed ({res.get('stage', '?')}): {res.get('error', '?')}"}]
        for r in job_rows:
            row = dict(head)
            row.update({k: (_float(v) if _is_numeric_key(k) else v) for k, v in r.items()})
            row["job_status"] = "failed" if failed else "ok"
            row["job_dir"] = str(job_dir) if job_dir is not None else ""
            # the report's warnings (d / n regime, not at a minimum, ...) travel with its figures
            row["warnings"] = " | ".join(" ".join(str(w).split()) for w in res.get("warnings") or [])
            if drop_nan_interval(row):  # a result.json saved before NaN ends were dropped: no interval, said
                row["warnings"] = " | ".join(
                    w for w in (row["warnings"], interval_lost_warning([row["scheme"]], " in this saved result")) if w)
            rows.append(row)
    return rows


_NUMERIC = {"bits_per_weight", "leakage", "mis", "leakage_p10", "leakage_p90", "baseline_leakage",
            "d_eff", "d", "zero_fraction", "pinned_fraction", "float_fraction",
            "sparsity", "frozen_fraction",  # these two: result.json of older versions
            "model_bits_per_weight", "model_d"}


# Legend lines of the columns a job's table explains in its own legend (report.legend), in the
# same words; the float entry adds where the layers are named.
# nux55: "the job's warnings name the layers and why" where every float weight was a bias and no job warned
FLOAT_LEGEND = FLOAT_ENTRY.removesuffix(".") + "; each job's report.json lists them all (float_params, with why)."
POSITION_LEGEND = POSITION_ENTRY


def _is_numeric_key(k: str) -> bool:
    return k in _NUMERIC or k.startswith("utility_")


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _fmt_bits(v: float | None) -> str:
    """A bits-per-weight cell (``-`` where a row has none: a report from before bits per weight were recorded)."""
    return "-" if v is None or math.isnan(v) else f"{v:.2f}"


def own_utility_key(row: dict[str, Any]) -> str | None:
    """The utility a row is judged by: the one its job declared (``ranked_by``: the job's
    ``mis.scoring.utility_key``, as its own table ranked), else its own preferred measured metric
    (:func:`~mis_lightning.report.pick_utility_key` over the keys it has a value for)."""
    measured = [{k: v for k, v in row.items() if _float(v) is not None}]
    return pick_utility_key(measured, row.get("ranked_by") or None)


def utility_keys(rows: Sequence[dict[str, Any]], utility_key: str | None = None) -> list[str]:
    """The utility keys to show: ``utility_key`` if given (and measured), else each row's own
    (:func:`own_utility_key`; several in a sweep over tasks: rmse for regression, auroc for
    binary data), in order of first appearance."""
    if utility_key is not None:
        uk = pick_utility_key(list(rows), utility_key)
        return [uk] if uk else []
    keys: list[str] = []
    for r in rows:
        if not r.get("error") and (k := own_utility_key(r)) is not None and k not in keys:
            keys.append(k)
    return keys or ([uk] if (uk := pick_utility_key(list(rows))) else [])


def markdown_table(rows: Sequence[dict[str, Any]], utility_key: str | None = None,
                   noise: Mapping[Any, Mapping[str, Any]] | None = None) -> str:
    """A Markdown table of the aggregated rows: one utility column per key of
    :func:`utility_keys` (each row shows its own utility). ``noise``: the jobs' validation
    counts and accuracy errors (:func:`noise_of`), for the verdicts' noise clause."""
    uks = utility_keys(rows, utility_key)
    whole = whole_model_column(list(rows))  # the whole quantized model's size, where not all is assessed
    head = ["job", "scheme", "swept overrides", "bits/w", "float"] + (["model b/w"] if whole else []) + [
        k.removeprefix("utility_") for k in uks] + [
        "leakage", "[p10, p90]", "MIS", "pool", "baseline", "d_eff", "zeros"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    errors = []
    # one notation per column (report.column_format), over the figures as numbers
    fmt = column_formats([{**r, **{k: _float(r.get(k)) for k in (*uks, "pool_leakage", "zero_fraction", "sparsity")}}
                          for r in rows], uks)
    for r in rows:
        if r.get("error"):
            errors.append(r)
            cells = [_fmt(r.get("job")), r["scheme"], r.get("swept") or "-", "-", "-"] + ["-"] * whole + [
                "-"] * len(uks) + [f"error: {short_error(str(r['error']))}", "-", "-", "-", "-", "-", "-"]
        else:
            p10, p90 = r.get("leakage_p10"), r.get("leakage_p90")
            interval = "-" if not has_interval(r) else f"[{fmt['interval'](p10)}, {fmt['interval'](p90)}]"
            if interval != "-" and r.get("interval_regime") == "position-dominated":
                interval += " pos."  # as in the job's own table: the interval is of another kind
            bits, ff = r.get("bits_per_weight"), _float(r.get("float_fraction"))
            cells = [_fmt(r.get("job")), r["scheme"] + scheme_marks(r), r.get("swept") or "-",
                     "-" if bits is None else f"{bits:.2f}",
                     share_format(ff)] + (
                [_fmt_bits(_float(r.get("model_bits_per_weight")))] if whole else []) + [
                fmt[uk](_float(r.get(uk))) for uk in uks] + [
                fmt["leakage"](r.get("leakage")) + leakage_marks(r), interval, fmt["mis"](r.get("mis")),
                "-" if (pool := _float(r.get("pool_leakage"))) is None or math.isnan(pool) else fmt["pool_leakage"](pool),
                # the baseline's own mark (undet. / ~), as the job's table prints it and the legend explains
                fmt["baseline_leakage"](r.get("baseline_leakage")) + baseline_marks(r),
                fmt["d_eff"](r.get("d_eff")), fmt["zeros"](_float(r.get("zero_fraction", r.get("sparsity"))))]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    marks = marks_legend([r for r in rows if not r.get("error")])
    if any(r.get("interval_regime") == "position-dominated" for r in rows if not r.get("error")):
        marks = [POSITION_LEGEND] + marks
    if any(_float(r.get("float_fraction")) for r in rows if not r.get("error")):
        marks = [FLOAT_LEGEND] + marks
    if any(_float(r.get("zero_fraction", r.get("sparsity"))) for r in rows if not r.get("error")):
        marks = [ZEROS_ENTRY] + marks
    if whole:
        marks = [MODEL_BITS_ENTRY] + marks
    if marks:  # what the marks and the less obvious columns mean, as under a job's own table
        lines += [""] + [m.strip() for m in marks]
    verdicts = aggregate_verdicts(rows, utility_key, noise)
    if verdicts:  # the jobs' one-scheme tables point here for the comparison (fu32)
        lines += [""] + verdicts
    ties = aggregate_ties(rows, utility_key)
    if ties:  # the rows' order by leakage that the figures do not resolve (same wording as the table)
        lines += [""] + ties
    seeds = across_seeds_section(rows, training_key, lambda g: (utility_keys(g, utility_key) or [None])[0],
                                 distinct_overrides)
    if seeds:  # a sweep over schemes and seeds: each scheme over the seeds, and the seeds' choices (nu42c)
        lines += ["", seeds]
    if errors:  # full messages below the table (the table shows them cut)
        lines += ["", "## Failures", ""] + [
            f"- job {_fmt(r.get('job'))} ({r.get('swept') or r.get('overrides') or '-'}), "
            f"{r['scheme']}: {' '.join(str(r['error']).split())}" for r in errors]
    return "\n".join(lines)


def _labelled(r: dict[str, Any]) -> dict[str, Any]:
    """Row ``r`` named as in the figure's legend (``"<job>: <scheme>"``), its figures as floats."""
    return {**r, "scheme": r["scheme"] if r.get("job") is None else f"{r.get('job')}: {r['scheme']}",
            "leakage": _float(r.get("leakage")), "leakage_p10": _float(r.get("leakage_p10")),
            "leakage_p90": _float(r.get("leakage_p90"))}


def aggregate_ties(rows: Sequence[dict[str, Any]], utility_key: str | None = None) -> list[str]:
    """The sweep's rows whose order by leakage the figures do not resolve
    (:func:`~mis_lightning.report.ties_line`, rows named ``"<job>: <scheme>"``), among the rows of
    one training setup only (:func:`training_key`: jobs that differ in more than their schemes,
    e.g. another seed, assessed other trained models, whose rows are no comparison), one
    line per utility the rows are judged by (the figure's panels; one line when there is one),
    prefixed with the setup's overrides when the sweep has several. A setup of one job names it
    once in that prefix (``"(job 0, seed=0) ..."``) and its rows by scheme alone; rows of several
    jobs are named ``"<job>: <scheme>"``."""
    ok = [r for r in rows if not r.get("error") and _float(r.get("leakage")) is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(training_key(r), []).append(r)
    out = []
    for key, rows_ in groups.items():
        jobs = {r.get("job") for r in rows_}
        one = jobs.pop() if len(jobs) == 1 else None  # one job: named once, before the line
        group = [_labelled({**r, "job": None}) if one is not None else _labelled(r) for r in rows_]
        what = [f"job {_fmt(one)}"] if one is not None else []
        what += [distinct_overrides(key, list(groups))] if len(groups) > 1 and key else []
        where = f"({', '.join(what)}) " if what else ""
        uks = utility_keys(group, utility_key) or [None]
        for uk in uks:
            part = group if len(uks) == 1 else [r for r in group if own_utility_key(r) == uk]
            line = ties_line(part)
            if line:
                out.append(where + (line if len(uks) == 1 else f"{uk.removeprefix('utility_')} rows: {line}"))  # type: ignore[union-attr]
    return out


#: the overrides that choose the schemes a job assesses: jobs that differ in these alone train
#: the same model, so their rows are one comparison (:func:`aggregate_verdicts`)
SCHEME_OVERRIDES = ("quantizer=", "schemes=", "+schemes=", "++schemes=")


def distinct_overrides(key: str, keys: Sequence[str]) -> str:
    """The overrides of ``key`` (a :func:`training_key`) that not every key of ``keys`` has: what
    tells its jobs from the sweep's other setups (``seed=1``; the verdict lines repeated every
    override the sweep's jobs share, ``data=... model=... trainer.max_epochs=...``); ``key`` itself
    when it has no such override."""
    common = set.intersection(*(set(k.split()) for k in keys)) if keys else set()
    return " ".join(o for o in key.split() if o not in common) or key


def training_key(row: dict[str, Any]) -> str:
    """A row's job overrides other than those choosing its schemes (:data:`SCHEME_OVERRIDES`):
    rows with the same key come from the same data, model, training and estimation options."""
    return " ".join(o for o in str(row.get("overrides") or "").split() if not o.startswith(SCHEME_OVERRIDES))


def noise_of(results: Sequence[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """``{job number: {"records", "classes", "errors"}}`` from the jobs' ``result.json``
    (``utility_records``, ``utility_classes``, ``utility_errors``: :class:`~mis_lightning.report.Report`'s
    fields), for the verdicts' noise clause (:func:`aggregate_verdicts`); jobs without them left out."""
    out: dict[Any, dict[str, Any]] = {}
    for res in results:
        if res.get("utility_records") is not None:
            out[(res.get("job") or {}).get("num")] = {
                "records": int(res["utility_records"]), "classes": dict(res.get("utility_classes") or {}),
                "errors": dict(res.get("utility_errors") or {})}
    return out


def _group_noise(group: Sequence[dict[str, Any]], noise: Mapping[Any, Mapping[str, Any]] | None
                 ) -> tuple[int | None, dict[str, int], dict[str, dict[str, Any]]]:
    """The ``records``, ``classes`` and ``errors`` arguments of
    :func:`~mis_lightning.report.verdict` for a group of jobs' rows named ``"<job>: <scheme>"``
    (:func:`_labelled`): known only where every job of the group measured its utility on the same
    number of validation records (one training setup: the same validation set); each row's error
    under its label."""
    per_job = [(noise or {}).get(r.get("job")) for r in group]
    if not per_job or any(n is None for n in per_job) or len({n["records"] for n in per_job}) != 1:
        return None, {}, {}
    errors: dict[str, dict[str, Any]] = {}
    for r, n in zip(group, per_job):
        for metric, e in (n.get("errors") or {}).items():
            kept = errors.setdefault(metric, {"average": e.get("average"), "se": {}, "chance_se": e.get("chance_se")})
            if (se := (e.get("se") or {}).get(r["scheme"])) is not None:
                kept["se"][_labelled(r)["scheme"]] = se
    return per_job[0]["records"], dict(per_job[0].get("classes") or {}), errors


def aggregate_verdicts(rows: Sequence[dict[str, Any]], utility_key: str | None = None,
                       noise: Mapping[Any, Mapping[str, Any]] | None = None) -> list[str]:
    """The verdict over the jobs of a sweep that differ only in their schemes (each job of
    ``-m quantizer=a,b,c`` assesses one scheme and points to the aggregate, which chose none).

    Jobs are compared only when every other override is the same (same data, model, training
    and estimation options) and their unquantized baselines agree (the same trained model:
    ``baseline_leakage`` within 1e-9 relative); one line per such group of two or more jobs,
    by :func:`~mis_lightning.report.verdict` on the rows named ``"<job>: <scheme>"`` and judged
    by the group's utility (:func:`utility_keys`), prefixed with the group's other overrides
    when the sweep has several groups. A group whose baselines differ gets a line saying why it
    has no verdict; a utility whose direction is unknown gives none (no guessed ranking);
    plan-mode rows (a planner's ``note``) are left to ``plan.md``. The utility band is the jobs'
    ``mis.scoring.utility_tolerance`` (``utility_tolerance`` of their ``result.json``). ``noise``
    (:func:`noise_of`): the noise clause of a job's own verdict (the band's choice resting on
    accuracy gaps below their standard error, an accuracy at chance: :func:`~mis_lightning.report.utility_noise_note`)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("error") and _float(r.get("leakage")) is not None and not r.get("note"):
            groups.setdefault(training_key(r), []).append(r)
    out = []
    for key, group in groups.items():
        if len({r.get("job") for r in group}) < 2:
            continue  # one job: its own table has the verdict
        where = f" ({distinct_overrides(key, list(groups))})" if len(groups) > 1 and key else ""
        base = [b for r in group if (b := _float(r.get("baseline_leakage"))) is not None]
        jobs = ", ".join(sorted({_fmt(r.get("job")) for r in group}, key=lambda j: (len(j), j)))
        if base and max(base) - min(base) > 1e-9 * max(abs(max(base)), 1e-12):
            out.append(f"verdict{where}: none across jobs {jobs}: their unquantized baselines differ "
                       f"({min(base):.4f} to {max(base):.4f}), so they assessed different trained models")
            continue
        uks = utility_keys(group, utility_key)
        try:
            # the jobs' own band (mis.scoring.utility_tolerance: an override, so one per group)
            records, classes, errors = _group_noise(group, noise)
            line = verdict([_labelled(r) for r in group], uks[0] if len(uks) == 1 else None,
                           float(group[0].get("utility_tolerance", UTILITY_TOLERANCE)),
                           records=records, classes=classes, errors=errors)
        except ValueError:  # a utility whose direction is unknown: no guessed ranking
            continue
        out.append(f"verdict across jobs {jobs}{where} (the same training; only their schemes differ): "
                   + line.removeprefix("verdict: "))
    return out


def warnings_section(results: Sequence[dict[str, Any]]) -> str:
    """The jobs' report warnings (``result.json`` ``warnings``: the d / n regime, a model not at a
    minimum, weights left in float, ...) as a Markdown section, one entry per distinct warning
    with the jobs that gave it; ``""`` when no job warned. Without it the aggregate showed the
    figures of a sweep whose every job was outside the analysis' regime as plainly as any other."""
    seen: dict[str, list[str]] = {}
    # the d / n warning names each job's schemes whose d_eff / n is not small either: the warning
    # once, those schemes per job after it (a sweep over quantizers: one scheme a job, one d / n)
    heads: dict[str, str] = {}
    tails: dict[str, list[str]] = {}
    for res in results:
        num = (res.get("job") or {}).get("num")
        for w in res.get("warnings") or []:
            w = " ".join(str(w).split())
            before, mark, rest = w.partition(" " + D_EFF_SCHEMES_MARK)
            head, sep, after = rest.partition(" for ")
            if mark and sep:
                schemes, _, after = after.partition(". ")  # scheme names hold no ". "
                w = f"{before} [{D_EFF_SCHEMES_MARK}{head} for: see below] {after}"
                heads[w] = f"{D_EFF_SCHEMES_MARK}{head} for: "
                tails.setdefault(w, []).append(f"job {_fmt(num)}: {schemes}")
            seen.setdefault(w, []).append(_fmt(num))
    if not seen:
        return ""
    return "\n\n## Warnings\n\n" + "\n".join(
        f"- job{'s' if len(jobs) > 1 else ''} {', '.join(jobs)}: {w}"
        + (f"\n  - {heads[w]}" + "; ".join(tails[w]) if w in tails else "") for w, jobs in seen.items())


def _pareto(points: list[tuple[float, float, int]], higher_better: bool) -> list[int]:
    """Indices of the non-dominated points (lower leakage, better utility), by utility."""
    keep = []
    for x, y, i in points:
        dominated = False
        for x2, y2, j in points:
            if j == i:
                continue
            better_u = x2 >= x if higher_better else x2 <= x
            strictly = (x2 != x) or (y2 < y)
            if better_u and y2 <= y and strictly:
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


#: letters naming the groups of points not ranked beyond their intervals in frontier.png
TIE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: two points closer than this share of the axis span in both leakage and utility are drawn
#: over each other (a marker is about 1.5% of the axis width at the figure's size)
COINCIDENT_SHARE = 0.015
#: horizontal step (points) between the markers of coincident points when all points share
#: one utility (no order along the axis to keep)
COINCIDENT_STEP = 7.0
#: horizontal step between the markers of coincident points, as a share of the utility span
#: (about 7 points: the axes are ~355 points wide over 1.16 spans, with their margins)
COINCIDENT_STEP_SHARE = 0.025
#: an offset marker moves at most this share of the gap to the nearest point of another
#: cluster on its side, so two markers moving toward each other both stop short of their
#: midpoint: no marker is drawn past another point's utility (nux48)
COINCIDENT_GAP_SHARE = 0.5


def _coincident_offsets(xy: Sequence[tuple[float, float]], names: Sequence[str]
                        ) -> tuple[list[float], list[float], list[str | None]]:
    """For points ``xy`` (in data units) with legend names ``names``: the horizontal offset
    of each marker in data units, the same in points (used only when all points share one
    utility), and, for each later member of a cluster of points that would hide each other,
    the name of its first member (``None`` otherwise). Points are coincident when closer than
    :data:`COINCIDENT_SHARE` of the axis span in both coordinates (int8_weight_only at
    rmse 0.6627, leakage 0.0975 was hidden under bf16 at 0.6627, 0.0976).

    The first of a cluster stays; the others step :data:`COINCIDENT_STEP_SHARE` of the span
    after another on the side of the first where their own value lies (to the right when
    equal), in the order of their own values, so the drawn order of a cluster is its order
    of utility. The steps on one side are scaled down together until none moves more than
    :data:`COINCIDENT_GAP_SHARE` of the gap to the nearest point of another cluster on its
    side: the drawn order along the utility axis is the order of the values (bf16 at
    rmse 0.6595 was drawn 14 points right, past float8 at 0.6626)."""
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    span_x = (max(xs) - min(xs)) if xs else 0.0
    span_y = (max(ys) - min(ys)) if ys else 0.0
    tol_x = COINCIDENT_SHARE * span_x or 1e-12 * max(abs(v) for v in xs or [1.0])
    tol_y = COINCIDENT_SHARE * span_y or 1e-12 * max(abs(v) for v in ys or [1.0])
    head: list[int] = []  # the first point of each cluster
    head_of = list(range(len(xy)))
    same_as: list[str | None] = [None] * len(xy)
    for i, (x, y) in enumerate(xy):
        h = next((j for j in head if abs(xy[j][0] - x) <= tol_x and abs(xy[j][1] - y) <= tol_y), None)
        if h is None:
            head.append(i)
            continue
        head_of[i], same_as[i] = h, names[h]
    dx, shift = [0.0] * len(xy), [0.0] * len(xy)
    for h in head:
        for side in (-1, 1):  # away from the first point, never back across it
            own = sorted((i for i in range(len(xy)) if head_of[i] == h and i != h
                          and (xs[i] < xs[h] if side < 0 else xs[i] >= xs[h])),
                         key=lambda i: (side * xs[i], i))
            if not own:
                continue
            if span_x == 0:  # one utility for all: no order to keep, markers in points
                for k, i in enumerate(own, 1):
                    shift[i] = side * COINCIDENT_STEP * k
                continue
            want = [COINCIDENT_STEP_SHARE * span_x * k for k in range(1, len(own) + 1)]
            scale = 1.0
            for i, w in zip(own, want):  # the room to the nearest point of another cluster
                gaps = [side * (xs[j] - xs[i]) for j in range(len(xy)) if head_of[j] != h]
                room = min((g for g in gaps if g > 0), default=math.inf)
                scale = min(scale, COINCIDENT_GAP_SHARE * room / w)
            for i, w in zip(own, want):
                dx[i] = side * w * scale
    return dx, shift, same_as


def _frontier_panel(ax: Any, rows: Sequence[dict[str, Any]], uk: str | None, first: int = 0,
                    first_tie: int = 0) -> tuple[int, int, int, int]:
    """Draw one frontier panel of ``rows`` against the utility ``uk`` (``None``: bits per
    weight); point styles start at index ``first``, tie letters (groups of points not ranked
    beyond their intervals) at ``first_tie``; points that would hide each other are drawn side
    by side, labelled "same point as". Returns ``(results, points drawn, tie groups, points drawn
    offset)``: a point drawn offset shares another's place at the figure's scale."""
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms

    metric = uk.removeprefix("utility_") if uk else "bits_per_weight"
    higher = higher_is_better(metric) if uk else False  # bits per weight: smaller is better
    xkey = uk or "bits_per_weight"
    ok = []
    for r in rows:
        x, y = _float(r.get(xkey)), _float(r.get("leakage"))
        if r.get("error") or x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        # the table's marks (aggregate.md): ^ after the name, *, !, ~, ... after the leakage (ux55b)
        label = (r["scheme"] if r.get("job") is None else f"{r.get('job')}: {r['scheme']}") + scheme_marks(r) + (
            leakage_marks(r))
        if r.get("warnings"):  # its report's caveats (d / n, not at a minimum...): aggregate.md
            label += " (warned)"
        ok.append({**r, xkey: x, "leakage": y, "scheme": label,
                   "leakage_p10": _float(r.get("leakage_p10")), "leakage_p90": _float(r.get("leakage_p90"))})
    points = sorted(merge_identical(ok, xkey), key=lambda p: p[0]["leakage"])
    # runs of points whose order by leakage the figures do not resolve: the legend's "safest
    # first" is no ranking there, so each run gets a letter ("tie A": not ranked beyond intervals);
    # among the points of one trained model only, as aggregate.md's ties (another seed's figures are
    # another model's: no ranking, and no tie, with them; nux56)
    tie_of: dict[int, str] = {}
    by_training: dict[str, list[dict[str, Any]]] = {}
    for i, (r, name) in enumerate(points):
        by_training.setdefault(training_key(r), []).append({**r, "scheme": name, "_i": i})
    groups = sorted((g for part in by_training.values() for g in unranked_groups(part)),
                    key=lambda g: min(m["_i"] for m in g))  # letters in the legend's order
    for g, members in enumerate(groups):
        for m in members:
            tie_of[m["_i"]] = TIE_LETTERS[(first_tie + g) % len(TIE_LETTERS)]
    dx, shift, same_as = _coincident_offsets([(r[xkey], r["leakage"]) for r, _ in points], [n for _, n in points])
    pts: list[tuple[float, float, int]] = []
    markers = "osD^vP*Xh<>p"
    for i, (r, name) in enumerate(points):
        x, y = r[xkey], r["leakage"]
        pts.append((x, y, i))
        k = first + i
        label = name + (f" (tie {tie_of[i]})" if i in tie_of else "")
        if same_as[i] is not None:  # drawn beside the point it would hide (the figures are unchanged)
            label += f" (same point as {same_as[i]}, drawn offset)"
        style = dict(color=plt.get_cmap("tab10")(k % 10), marker=markers[k % len(markers)],
                     linestyle="none", label=label)
        if dx[i]:  # moved in data units (its data unchanged), never past another point's utility
            style["transform"] = mtransforms.Affine2D().translate(dx[i], 0.0) + ax.transData
        elif shift[i]:
            style["transform"] = mtransforms.offset_copy(ax.transData, fig=ax.figure, x=shift[i], y=0.0,
                                                         units="points")
        if "(warned)" in name:  # hollow: a figure with caveats (merged rows: any of them)
            style["markerfacecolor"] = "none"
        p10, p90 = r.get("leakage_p10"), r.get("leakage_p90")
        if has_interval(r):
            ax.errorbar([x], [y], yerr=[[max(y - p10, 0)], [max(p90 - y, 0)]], capsize=3, **style)
        else:
            ax.plot([x], [y], **style)
    # one frontier per trained model (training setup): points of separately trained models (another seed)
    # are no choice between each other, as their ties are none (a line across seeds joined them)
    labelled = first != 0
    for key in dict.fromkeys(training_key(r) for r, _ in points):
        front = _pareto([p for p in pts if training_key(points[p[2]][0]) == key], higher)
        if len(front) > 1:
            fp = sorted(((x, y) for x, y, i in pts if i in front))
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "-", color="k", lw=1, alpha=0.6,
                    label=None if labelled else "frontier (non-dominated)" + (
                        ", one per trained model" if len({training_key(r) for r, _ in points}) > 1 else ""))
            labelled = True
    baselines = {round(v, 12) for r in rows if (v := _float(r.get("baseline_leakage"))) is not None}
    if len(baselines) == 1:
        # the baseline's own (undet., ~), as aggregate.md prints it; where the jobs sharing it differ (one ran
        # the rank rule's check, another did not) the largest move's mark, the strongest, as the notes say (rv55u)
        moved = [v if (v := _float(r.get("baseline_cutoff_sensitivity"))) is not None and math.isfinite(v)
                 else -math.inf for r in ok]
        mark = baseline_marks(ok[moved.index(max(moved))]) if ok else ""
        ax.axhline(next(iter(baselines)), ls="--", color="gray", lw=1,
                   label=f"unquantized baseline{mark}" if first == 0 else None)
    arrow = "higher is better" if higher else "lower is better"
    ax.set_xlabel(f"{metric} (validation; {arrow})" if uk else "bits per weight")
    ax.set_ylabel("leakage = 1 - MIS (lower is safer)")
    ax.margins(x=0.08, y=0.15)
    ax.grid(alpha=0.3)
    return len(ok), len(pts), len(groups), sum(s is not None for s in same_as)


def frontier_figure(rows: Sequence[dict[str, Any]], path: str | Path | None = None,
                    utility_key: str | None = None):
    """Leakage against utility, one point per distinct result, the frontier joined; saved if
    ``path``. Rows with identical figures (same utility, leakage and interval) share one point
    labelled ``"a = b"``; names are in a legend beside the axes (each point its own colour and
    marker), so that labels never overlap however the points cluster; the unquantized baseline
    is a dashed line (when all jobs share one). Rows judged by different utilities (a sweep
    over regression and binary data: rmse and auroc) get one panel per utility, each row in
    the panel of its own (:func:`utility_keys`), so that no row is left out. Each name carries
    the table's marks (:func:`~mis_lightning.report.scheme_marks` after it,
    :func:`~mis_lightning.report.leakage_marks` after those; the baseline's
    :func:`~mis_lightning.report.baseline_marks`), their legend
    (:func:`~mis_lightning.report.marks_legend`) printed under the axes, as the job's own figure
    does (a figure is often shared without its table)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    uks = utility_keys(rows, utility_key) or [None]
    groups = [list(rows)] if len(uks) == 1 else [
        [r for r in rows if r.get("error") or own_utility_key(r) == uk] for uk in uks]
    fig, axes = plt.subplots(1, len(uks), figsize=(7.0 + 3.5 * (len(uks) - 1), 4.8),
                             layout="constrained", squeeze=False)
    n_ok = n_pts = n_ties = n_off = 0
    for ax, uk, group in zip(axes[0], uks, groups):
        ok, pts, ties, off = _frontier_panel(ax, [r for r in group if len(uks) == 1 or not r.get("error")], uk,
                                             first=n_pts, first_tie=n_ties)
        n_ok, n_pts, n_ties, n_off = n_ok + ok, n_pts + pts, n_ties + ties, n_off + off
        if len(uks) > 1:
            ax.set_title(f"{uk.removeprefix('utility_')} ({ok} results)", fontsize=9)  # type: ignore[union-attr]
    if not n_pts:  # no job / scheme succeeded: say so rather than draw empty axes
        no_points_note(axes[0][0], list(rows))
    else:  # names beside the axes, in order of leakage (safest first): they never overlap
        fig.set_size_inches(fig.get_size_inches()[0] + 3.0, 4.8)
        warned = any(r.get("warnings") and not r.get("error") for r in rows)
        fig.legend(loc="outside right upper", fontsize=7, frameon=False, title_fontsize=8,
                   title=("schemes by leakage (undet.: a headline is undetermined, none ranked)"
                          if undetermined_headline(rows) else "schemes: safest first") + ("\nhollow: job warned (aggregate.md)" if warned else "")
                   + (f"\ntie A, B, ...: {NOT_RANKED}" if n_ties else ""))
    # the points as drawn: identical results merged ("a = b"), and those a legend entry calls
    # "same point as" (coincident at the figure's scale, drawn offset) not counted as distinct (fu30)
    # on two lines where it says what was drawn offset: on one it ran past the axes on both sides,
    # cut at the figure's left edge and over the legend's title on the right (fr32)
    title = (f"Privacy-utility frontier ({n_ok} results at {n_pts - n_off} distinct points"
             + (f";\n{n_off} drawn offset: the same point as another" if n_off else "") + ")")
    if len(uks) == 1:
        axes[0][0].set_title(title, fontsize=10 if n_off else None)
    else:
        fig.suptitle(title)
    notes = [m.strip() for m in marks_legend([r for r in rows if not r.get("error")])]
    if n_pts and notes:  # what the labels' marks mean, under the axes, as the job's figure says it (ux55b)
        figure_notes(fig, (), notes)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def aggregate(sweep_dir: str | Path, out_dir: str | Path | None = None,
              result_name: str = RESULT_NAME, verbose: bool = True, sweep_id: str | None = None,
              since: float | None = None) -> list[dict[str, Any]]:
    """Write ``aggregate.csv``, ``aggregate.md`` and ``frontier.png`` for a sweep dir.

    ``sweep_id`` (the sweep-end aggregate): only that sweep's results (see :func:`this_sweep`),
    the stale ones of earlier sweeps into the same dir are left out and counted in the header.
    Without it, every result is aggregated, and results of several sweeps are flagged.

    Returns the rows. Raises ``FileNotFoundError`` when the dir holds no ``result.json``.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir {sweep_dir} does not exist")
    results, n_stale = this_sweep(collect(sweep_dir, result_name), sweep_id, since)
    if not results:
        raise FileNotFoundError(f"no {result_name} under {sweep_dir}: is it a mis-lightning sweep dir?")
    notes = [f"note: {n_stale} result(s) of earlier sweeps into this dir left out"] * bool(n_stale)
    notes += [n] if (n := _mixed_sweeps_note(results)) else []
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(results, sweep_dir)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "aggregate.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        wr.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows])
    md = markdown_table(rows, noise=noise_of(results)) + warnings_section(results)
    n_failed = len(failed_jobs(rows))
    # jobs that ran but scored no scheme: the Failures section lists them too
    n_none = len(unscored_jobs(rows))
    parts = [f"{n_failed} failed"] * bool(n_failed) + [f"{n_none} scored no scheme"] * bool(n_none)
    failed_txt = f" ({'; '.join(parts)})" if parts else ""
    head = f"# mis-lightning sweep {sweep_dir}\n\n{len(results)} jobs{failed_txt}, {len(rows)} rows.\n\n"
    head += "".join(f"{n}\n\n" for n in notes)
    (out / "aggregate.md").write_text(head + md + "\n")
    import matplotlib.pyplot as plt

    fig = frontier_figure(rows, out / "frontier.png")
    plt.close(fig)
    for n in notes:
        print(f"mis-lightning-aggregate: {n}", file=sys.stderr)
    if verbose:
        print(f"\nAggregated {len(results)} jobs{failed_txt} of {sweep_dir}:")
        print(md)
        print(f"files: {out / 'aggregate.csv'}  {out / 'aggregate.md'}  {out / 'frontier.png'}")
    return rows


class AggregateSweep(Callback):
    """Hydra callback: aggregate the sweep in ``on_multirun_end`` (see the module docstring)."""

    def __init__(self, result_name: str = RESULT_NAME, verbose: bool = True) -> None:
        self.result_name = result_name
        self.verbose = verbose
        self.sweep_id: str | None = None
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Give the sweep an id, passed to its jobs in the environment (``SWEEP_ID_ENV``): each
        records it in its ``result.json``, so that the aggregate leaves out stale jobs of an
        earlier sweep into the same dir. First, a sweep whose launcher runs each job in another
        process and whose config names ``__main__`` (:func:`~mis_lightning.app.launchers.
        check_main_module_paths`) stops here, before any job: its message, exit status 2."""
        from mis_lightning.app.launchers import check_main_module_paths

        try:
            check_main_module_paths(config, (config.get("hydra") or {}).get("launcher"))
        except ValueError as exc:
            print(f"mis-lightning: configuration error (ValueError): {exc}\n  nothing was launched or trained",
                  file=sys.stderr)
            raise SystemExit(2) from None
        self.sweep_id, self.started = uuid.uuid4().hex[:12], time.time()
        os.environ[SWEEP_ID_ENV] = self.sweep_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A job that failed outside ``run_job``'s own handling still leaves a ``result.json``."""
        from hydra.core.utils import JobStatus

        if getattr(job_return, "status", None) != JobStatus.FAILED:
            return
        try:
            out = Path(str(config.hydra.runtime.output_dir))
        except Exception:  # noqa: BLE001 - no output dir known: nothing to write
            return
        path = out / self.result_name
        if not path.exists():
            exc = job_return._return_value
            if isinstance(exc, BaseException):
                write_failure(path, exc, stage="job", job={"overrides": list(job_return.overrides or []),
                                                           "sweep_id": os.environ.get(SWEEP_ID_ENV)})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Aggregate the sweep; exit with status 1 if any job failed or scored no scheme (after
        aggregating)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        os.environ.pop(SWEEP_ID_ENV, None)
        try:
            rows = aggregate(sweep_dir, result_name=self.result_name, verbose=self.verbose,
                             sweep_id=self.sweep_id, since=self.started)
        except FileNotFoundError as exc:
            print(f"mis-lightning: nothing to aggregate ({exc})", file=sys.stderr)
            return
        failed = [str(r.get("job")) for r in failed_jobs(rows)]
        unscored = [str(j) for j in unscored_jobs(rows)]
        if failed or unscored:
            what = [f"{len(failed)} job(s) of the sweep failed (job {', '.join(failed)})"] * bool(failed) + [
                f"{len(unscored)} job(s) scored no scheme (job {', '.join(unscored)})"] * bool(unscored)
            # "the others" where some job scored; a sweep whose every job failed has none (nux56)
            rest = ("the others are aggregated in" if set(failed) | set(unscored) < {str(r.get("job")) for r in rows}
                    else "no job scored a scheme: see")
            sys.exit(f"mis-lightning: {'; '.join(what)}; {rest} {sweep_dir / 'aggregate.md'}, which lists the errors")


def main(argv: Sequence[str] | None = None) -> int:
    """``mis-lightning-aggregate SWEEP_DIR [--out DIR]``; returns 0, 1 when a job of the sweep
    failed or scored no scheme (listed in the aggregate), 2 when no result was found."""
    ap = argparse.ArgumentParser(
        prog="mis-lightning-aggregate",
        description="Aggregate the per-job result.json files of a mis-lightning sweep dir into "
                    "aggregate.csv, aggregate.md and frontier.png.",
    )
    ap.add_argument("sweep_dir", help="the multirun sweep dir (e.g. multirun/2026-01-01/12-00-00)")
    ap.add_argument("--out", default=None, help="where to write (default: the sweep dir)")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    args = ap.parse_args(argv)
    try:
        rows = aggregate(args.sweep_dir, args.out, verbose=not args.quiet)
    except FileNotFoundError as exc:
        print(f"mis-lightning-aggregate: {exc}", file=sys.stderr)
        return 2
    return 1 if failed_jobs(rows) or unscored_jobs(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
