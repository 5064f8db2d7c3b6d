"""Report objects: per scheme and per layer, serialised to dict / JSON / CSV, a table, a figure."""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Renamed report fields: old name -> new name (old JSON keys load, old attributes still read).
RENAMED = {"frozen_fraction": "pinned_fraction", "sparsity": "zero_fraction"}


def _renamed(old: str, new: str) -> tuple[Any, Any]:
    """Getter and setter of a deprecated attribute name ``old`` for the field ``new``."""
    def get(self: Any) -> Any:
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def set_(self: Any, value: Any) -> None:
        setattr(self, new, value)

    return get, set_


def _new_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A serialised result with its pre-rename keys (``sparsity``, ``frozen_fraction``) renamed."""
    for old, new in RENAMED.items():
        if old in d:
            d.setdefault(new, d.pop(old))
    return d


@dataclass
class LayerResult:
    """Figures of one parameter tensor under one scheme (leakage of that tensor alone);
    ``pinned_fraction`` and ``zero_fraction`` as in :class:`SchemeResult`."""

    name: str
    d: int
    quantized: bool
    leakage: float
    mis: float
    baseline_leakage: float
    d_eff: float
    pinned_fraction: float
    zero_fraction: float
    bits_per_weight: float
    #: what quantized the tensor where the scheme's own backend did not (e.g. ``"Conv2d:
    #: per-channel int8 over flattened kernels (library RTN)"``); ``""`` otherwise
    quantized_by: str = ""

    frozen_fraction = property(*_renamed("frozen_fraction", "pinned_fraction"))
    sparsity = property(*_renamed("sparsity", "zero_fraction"))


@dataclass
class SchemeResult:
    """Figures of one scheme.

    ``leakage`` is the estimated best-attack advantage ``Delta`` (mean saturated per-record
    TV), ``mis = 1 - leakage``; ``interval`` is an 80% uncertainty interval of ``leakage``
    and ``interval_regime`` how it was built (method.md section 3, "The uncertainty
    interval"): ``"position-dominated"`` (few coarse weights: the range over where their
    population values sit in their cells) or ``"averaged"`` (many: the widened parametric
    bootstrap spread); ``d_eff = sum kappa``;
    ``pinned_fraction`` = share of assessed weights with ``kappa < 1e-6`` (pinned to one
    cell by the quantization: not to be confused with frozen ``requires_grad=False``
    parameters); ``zero_fraction`` = share of quantized weights released as exactly 0 (the
    old names ``frozen_fraction`` / ``sparsity`` still read, with a DeprecationWarning, and
    old JSON keys load); ``bits_per_weight`` averages the
    storage of all assessed weights (float ones at their dtype's width) including scales;
    ``quantized_fraction`` = share of assessed weights the scheme quantized; ``float_params``
    = assessed parameter -> why the scheme left it in float (scored as unprotected,
    ``kappa = 1``).
    """

    name: str
    leakage: float
    mis: float
    baseline_leakage: float
    d_eff: float
    d: int
    zero_fraction: float
    pinned_fraction: float
    bits_per_weight: float
    method: str
    interval: tuple[float, float] | None = None
    quantized_fraction: float = 0.0
    clt_error_estimate: float = 0.0
    layers: dict[str, LayerResult] = field(default_factory=dict)
    utility: dict[str, float] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    float_params: dict[str, str] = field(default_factory=dict)
    interval_regime: str | None = None

    frozen_fraction = property(*_renamed("frozen_fraction", "pinned_fraction"))
    sparsity = property(*_renamed("sparsity", "zero_fraction"))

    def float_warning(self) -> str | None:
        """A warning naming the share of assessed weights left in float and why, or ``None``
        when only biases (never quantized by weight-only schemes) or nothing stayed float."""
        if self.error or not self.float_params or all(r.startswith("bias:") for r in self.float_params.values()):
            return None
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.float_params.items():
            by_reason.setdefault(reason, []).append(name)
        n_float = sum(self.layers[k].d for k in self.float_params if k in self.layers)
        parts = []
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{shown} ({reason})")
        return (f"scheme {self.name!r} leaves {n_float} of {self.d} assessed weights "
                f"({100.0 * n_float / max(self.d, 1):.1f}%) in float, scored as unprotected "
                f"(leak like the baseline): " + "; ".join(parts))

    def methods_line(self) -> str | None:
        """A line naming, per layer type, how the weights beyond the scheme's own backend were
        quantized (``LayerResult.quantized_by``), or ``None`` when the backend did all."""
        by: dict[str, list[str]] = {}
        for name, lr in self.layers.items():
            if lr.quantized and lr.quantized_by:
                by.setdefault(lr.quantized_by, []).append(name)
        if self.error or not by:
            return None
        parts = [f"{m} ({', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''})"
                 for m, v in by.items()]
        return f"scheme {self.name!r} quantizes beyond its backend's layers: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = list(self.interval) if self.interval is not None else None
        return d


@dataclass
class Report:
    """What :func:`mis_lightning.assess` returns.

    Attributes:
        n: training records; d: assessed weights; estimation: how sigma and w were had;
        diagnostics: method.md section 6 diagnostics (plus ``d_eff_over_n`` warnings);
        schemes: scheme name -> :class:`SchemeResult`; baseline_leakage / baseline_mis: the
        unquantized release.
    """

    n: int
    d: int
    estimation: dict[str, Any]
    diagnostics: dict[str, Any]
    schemes: dict[str, SchemeResult]
    baseline_leakage: float
    baseline_mis: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "d": self.d,
            "estimation": self.estimation,
            "diagnostics": to_plain(self.diagnostics),
            "baseline_leakage": self.baseline_leakage,
            "baseline_mis": self.baseline_mis,
            "warnings": list(self.warnings),
            "schemes": {k: v.to_dict() for k, v in self.schemes.items()},
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The report as JSON text (also written to ``path``).

        Raises:
            OSError: ``path`` cannot be written.
        """
        text = json.dumps(to_plain(self.to_dict()), indent=indent)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report of :meth:`to_dict` / a saved JSON (also one saved before the renames:
        ``sparsity`` and ``frozen_fraction`` keys load as ``zero_fraction`` / ``pinned_fraction``).

        Raises:
            KeyError: a required key is missing; TypeError: an unknown result field.
        """
        schemes = {}
        for k, v in data["schemes"].items():
            v = _new_keys(dict(v))
            v["layers"] = {ln: LayerResult(**_new_keys(dict(lv))) for ln, lv in v.get("layers", {}).items()}
            if v.get("interval") is not None:
                v["interval"] = tuple(v["interval"])
            schemes[k] = SchemeResult(**v)
        return cls(
            n=data["n"], d=data["d"], estimation=data["estimation"], diagnostics=data["diagnostics"],
            schemes=schemes, baseline_leakage=data["baseline_leakage"],
            baseline_mis=data["baseline_mis"], warnings=data.get("warnings", []),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per scheme (for CSV, tables and trackers)."""
        out = []
        for name, s in self.schemes.items():
            row = {
                "scheme": name, "bits_per_weight": s.bits_per_weight, "leakage": s.leakage,
                "mis": s.mis, "leakage_p10": s.interval[0] if s.interval else None,
                "leakage_p90": s.interval[1] if s.interval else None,
                "interval_regime": s.interval_regime,
                "baseline_leakage": s.baseline_leakage, "d_eff": s.d_eff, "d": s.d,
                "zero_fraction": s.zero_fraction, "pinned_fraction": s.pinned_fraction,
                "float_fraction": math.nan if s.error else 1.0 - s.quantized_fraction,
                "method": s.method, "error": s.error or "",
            }
            row.update({f"utility_{k}": v for k, v in s.utility.items()})
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> None:
        rows = self.rows()
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)

    def table(self, utility_key: str | None = None) -> str:
        """Plain-text table: scheme, bits/weight, share of assessed weights left in float,
        utility, leakage and its 80% interval (``pos.``: position-dominated), MIS, baseline;
        then every warning in full (an assumption that failed must be read next to the numbers,
        not only in the JSON)."""
        text = format_table(self.rows(), utility_key)
        if self.warnings:
            text += "\n\nwarnings:\n" + "\n".join(f"  - {w}" for w in self.warnings)
        return text

    def plot(self, path: str | Path | None = None, utility_key: str | None = None):
        """Privacy-utility figure (leakage against the utility metric, one point per scheme)."""
        return privacy_utility_figure(self.rows(), path, utility_key)


def to_plain(x: Any) -> Any:
    """JSON-ready copy of nested dicts/lists/tensors/numbers (non-finite floats as strings)."""
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item") and callable(x.item):
        try:
            return to_plain(x.item())
        except (ValueError, RuntimeError):
            return str(x)
    return x


def pick_utility_key(rows: list[dict[str, Any]], utility_key: str | None = None) -> str | None:
    keys = [k for r in rows for k in r if k.startswith("utility_")]
    if utility_key is not None:
        k = utility_key if utility_key.startswith("utility_") else f"utility_{utility_key}"
        return k if k in keys else None
    for pref in ("utility_rmse", "utility_auroc", "utility_accuracy", "utility_loss"):
        if pref in keys:
            return pref
    return keys[0] if keys else None


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


ERROR_CELL_WIDTH = 60  # characters of an error message shown in a table row


def short_error(message: str, width: int = ERROR_CELL_WIDTH) -> str:
    """``message`` on one line, cut at a word boundary to at most ``width`` characters with an
    ellipsis (a single word longer than ``width`` is cut inside)."""
    text = " ".join(str(message).split())
    if len(text) <= width:
        return text
    cut = text[: max(width - 1, 1)]
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut
    if len(head) < width // 2:  # one very long word (a path, a URL): cut inside it
        head = cut
    return head.rstrip(" ,;:") + "\u2026"


def format_table(rows: list[dict[str, Any]], utility_key: str | None = None) -> str:
    """Plain-text table of :meth:`Report.rows`.

    A failed scheme's row shows ``error: <message cut at a word boundary>`` across the figure
    columns; it does not widen them. The full messages follow the table under ``errors:``.
    """
    uk = pick_utility_key(rows, utility_key)
    head = ["scheme", "bits/w", "float"] + ([uk.removeprefix("utility_")] if uk else []) + [
        "leakage", "80% interval", "MIS", "baseline", "d_eff", "zeros"]  # zero_fraction
    body: list[list[str] | tuple[str, str]] = []
    for r in rows:
        if r.get("error"):
            body.append((str(r["scheme"]), str(r["error"])))
            continue
        interval = "-" if r.get("leakage_p10") is None else f"[{_fmt(r['leakage_p10'])}, {_fmt(r['leakage_p90'])}]"
        if interval != "-" and r.get("interval_regime") == "position-dominated":
            interval += " pos."  # the range over where few coarse weights' true values sit
        ff = r.get("float_fraction")  # share of assessed weights left in float (kappa = 1)
        body.append([r["scheme"], f"{r['bits_per_weight']:.2f}",
                     "-" if ff is None else f"{100 * ff:.1f}%"] + ([_fmt(r.get(uk))] if uk else []) + [
            _fmt(r["leakage"]), interval, _fmt(r["mis"]), _fmt(r["baseline_leakage"]),
            _fmt(r["d_eff"]), _fmt(r.get("zero_fraction", r.get("sparsity")))])  # old rows: sparsity
    cols = [head] + [b for b in body if isinstance(b, list)] + [[b[0]] for b in body if isinstance(b, tuple)]
    widths = [max(len(str(c[i])) for c in cols if i < len(c)) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    # An error spans the figure columns: the table keeps the width of its figures.
    room = max(sum(widths[1:]) + 2 * (len(widths) - 2) - len("error: "), 30)
    lines = [line(head), line(["-" * w for w in widths])]
    for b in body:
        if isinstance(b, tuple):
            lines.append(f"{b[0].ljust(widths[0])}  error: {short_error(b[1], room)}")
        else:
            lines.append(line(b))
    errors = [b for b in body if isinstance(b, tuple)]
    if errors:
        lines += ["", "errors:"] + [f"  {name}: {msg}" for name, msg in errors]
    return "\n".join(lines)


def no_points_note(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Write "no scheme succeeded" and each failed row's short error on an empty plot."""
    failed = [r for r in rows if r.get("error")]
    labels = [str(r["scheme"]) if r.get("job") is None else f"job {r['job']}: {r['scheme']}"
              for r in failed]
    text = ["no scheme succeeded"] + [
        f"{lab}: {short_error(str(r['error']), 70)}" for lab, r in zip(labels[:8], failed)]
    if len(failed) > 8:
        text.append(f"... and {len(failed) - 8} more")
    ax.text(0.5, 0.5, "\n".join(text), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def privacy_utility_figure(rows: list[dict[str, Any]], path: str | Path | None = None,
                           utility_key: str | None = None):
    """A matplotlib Figure of leakage (with its interval) against utility, one point per distinct
    result (schemes with identical figures share a point labelled ``"a = b"``); saved if ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    uk = pick_utility_key(rows, utility_key)
    ok = [r for r in rows if not r.get("error") and (r.get(uk) if uk else r["bits_per_weight"]) is not None]
    # Schemes with identical results (e.g. int8 weight-only and int8 dynamic on the same grid)
    # are one point labelled "a = b": drawn separately, one hides the other.
    groups: dict[tuple[float, ...], list[dict[str, Any]]] = {}
    for r in ok:
        x = r.get(uk) if uk else r["bits_per_weight"]
        key = tuple(round(float(v), 6) for v in (x, r["leakage"], r.get("leakage_p10") or 0.0,
                                                  r.get("leakage_p90") or 0.0))
        groups.setdefault(key, []).append(r)
    points = [(rs[0], " = ".join(str(r["scheme"]) for r in rs)) for rs in groups.values()]
    # Few points: names next to them; many (they cluster): a legend of colours/markers.
    labels_inline = len(points) <= 4
    fig, ax = plt.subplots(figsize=(6.4 if labels_inline else 8.6, 4.6))
    markers = "osD^vP*Xh<>p"
    for i, (r, name) in enumerate(points):
        x = r.get(uk) if uk else r["bits_per_weight"]
        y = r["leakage"]
        style = dict(color=plt.get_cmap("tab20")(i % 20), marker=markers[i % len(markers)],
                     linestyle="none", label=None if labels_inline else name)
        if r.get("leakage_p10") is not None:
            ax.errorbar([x], [y], yerr=[[max(y - r["leakage_p10"], 0)], [max(r["leakage_p90"] - y, 0)]],
                        capsize=3, **style)
        else:
            ax.plot([x], [y], **style)
        if labels_inline:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if ok:
        ax.axhline(ok[0]["baseline_leakage"], ls="--", color="gray", lw=1, label="unquantized baseline")
        if labels_inline:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    if not ok:  # every scheme failed: say so rather than draw empty axes
        no_points_note(ax, rows)
    ax.margins(x=0.3 if labels_inline else 0.08, y=0.15)
    ax.set_xlabel(f"{uk.removeprefix('utility_')} (validation)" if uk else "bits per weight")
    ax.set_ylabel("leakage = 1 - MIS (lower is safer)")
    ax.set_title("Privacy-utility trade-off of quantization schemes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
