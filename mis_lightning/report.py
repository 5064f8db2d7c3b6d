"""Report objects: per scheme and per layer, serialised to dict / JSON / CSV, a table, a figure."""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._accuracy_error import SHARE_AVERAGES
from ._warning_lines import FAILED_SCHEME, MORE, warning_line

# Renamed report fields: old name -> new name (old JSON keys load, old attributes still read).
RENAMED = {"frozen_fraction": "pinned_fraction", "sparsity": "zero_fraction"}
#: default utility tolerance of the table's verdict, relative to the best scheme's utility
UTILITY_TOLERANCE = 0.01
#: where :meth:`Report.table`'s one-line warnings say their full text is
WARNINGS_IN_FULL = "report.warnings_text(), table(verbose=True) or the JSON report"
#: the figure's pointer to the report file a front end writes with it (:meth:`Report.plot`'s
#: ``warnings_in_full``: the callback's ``mis_report.json``, the app's ``report.md``)
WRITTEN_WITH_FIGURE = "{name}, written with this figure"


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


# The game of ``leakage`` (method.md section 1), stated in every report.
GAME = ("population: a training member against a fresh draw from the population, co-training "
        "records unknown (pool_leakage: the pool protocol of reference-model audits)")


@dataclass
class SchemeResult:
    """Figures of one scheme.

    ``leakage`` is the estimated best-attack advantage ``Delta`` (mean saturated per-record
    TV), ``mis = 1 - leakage``; ``interval`` is an 80% uncertainty interval of ``leakage``
    and ``interval_regime`` how it was built (method.md section 3, "The uncertainty
    interval"): ``"position-dominated"`` (few coarse weights: the range over where their
    population values sit in their cells) or ``"averaged"`` (many: the widened parametric
    bootstrap spread); ``d_eff = sum kappa`` over the weights the data moves (sd > 0: the
    others leak nothing and count 0, method.md section 3);
    ``pinned_fraction`` = share of assessed weights with ``kappa < 1e-6`` (pinned to one
    cell by the quantization) or sd 0 (never moved by the data: not to be confused with
    frozen ``requires_grad=False`` parameters); ``zero_fraction`` = share of quantized weights released as exactly 0 (the
    old names ``frozen_fraction`` / ``sparsity`` still read, with a DeprecationWarning, and
    old JSON keys load); ``bits_per_weight`` averages the
    storage of all assessed weights (float ones at their dtype's width) including scales;
    ``quantized_fraction`` = share of assessed weights the scheme quantized; ``float_params``
    = assessed parameter -> why the scheme left it in float (scored as unprotected,
    ``kappa = 1``).

    The game of ``leakage`` (method.md section 1): a member against a fresh draw from the
    population, the co-training records unknown to the attacker. ``pool_leakage`` is the same
    release in the pool protocol of reference-model audits (ML Privacy Meter, LiRA, RMIA:
    the target trained on a random half of a known pool of ``2n`` records; method.md
    section 3, "Pool protocol"), the number to set beside such an audit's advantage.
    ``covariance``: how the headline treats the correlation of the weights (``"full"``,
    ``"factor"`` or ``"independent"``); ``leakage_independent``: the independent-coordinate
    value, kept for comparison when another form was used (the figure ``covariance="independent"``
    gives: with the finite-sample spread term where the headline has it). ``clt_error_estimate``: the
    Gaussian form's worst Edgeworth error estimate over records, or, where the influences are
    streamed and an upper bound already shows it within tolerance, that bound (the scheme-free
    one from ``B = sum_j w_j^4``, summed as such on bf16 / fp16-stored weights too, else the
    sharper one from each layer's largest moments; method.md section 3, "Gaussian form's
    diagnostics").
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
    pool_leakage: float = math.nan
    covariance: str = "independent"
    leakage_independent: float | None = None
    # what the release carries beyond its weights that ``leakage`` does not score (AWQ's and
    # SmoothQuant's per-channel factors, computed from the calibration records): the figure is
    # then a lower bound of the whole release's leakage (data processing); ``None``: nothing
    unscored: str | None = None
    # the largest relative move of ``leakage`` when the exact sandwich's eigenvalue floor is set
    # 10x higher or lower (computed only where the floor bites; ``None``: it does not, or not
    # checked); above :data:`FLOOR_SENSITIVITY_MAX` the figure is unstable (``~`` in the table)
    floor_sensitivity: float | None = None
    # position-dominated intervals only: how far the upper end reaches above ``leakage`` (relative)
    # beyond the record average's widening, i.e. what the unknown position of the population
    # weights in their cells adds; above ``assess.POSITION_GAP_WARN`` a warning names the scheme
    position_gap: float | None = None
    # the full correlation's Gaussian-form first-order leakage with its rank rule (eigenvalue cutoff)
    # and with a 100x finer one, and the relative move (``{"leakage", "leakage_fine_cutoff", "move"}``; ``None``:
    # not checked); above ``assess.CUTOFF_SENSITIVITY_MAX`` the figure is set by the cutoff (``~``)
    cutoff_sensitivity: dict[str, float] | None = None
    # the cutoff check applies (full correlation, quantized) but was skipped for its cost (``d``
    # above ``assess.CUTOFF_CHECK_MAX_D``): one merged warning says so (sm45)
    cutoff_check_skipped: bool = False
    # the whole quantized copy (the release: the scheme applied to every parameter, assessed or
    # not, as torchao's quantize_ does), whose ``utility`` is reported: its storage per weight
    # incl. scales (float parameters at their dtype's width) and its number of weights; ``None``:
    # a report saved before fz44
    model_bits_per_weight: float | None = None
    model_d: int | None = None
    # parameters outside the assessment (frozen, or left out by params=) the scheme left in float
    # in that copy -> why (a group size, a layer type): they count in its utility and size as such
    float_unassessed: dict[str, str] = field(default_factory=dict)
    # parameters outside the assessment the scheme quantized in that copy by another method than its
    # backend (``LayerResult.quantized_by``'s text: a frozen Conv2d under int8_weight_only): not scored,
    # they count in its utility and size; a torchao-named scheme's ``^`` and warning name them (ux55b)
    quantized_by_unassessed: dict[str, str] = field(default_factory=dict)
    # the full correlation only, some weights quantized and some exact (cr49): how the weights left in
    # float span R's kept eigenspace (functional.correlated.ExactSpan.as_dict: d, rank, float_weights,
    # float_rank, smallest_singular_value, rank_rule, determined, near_rule); ``determined``: they fix
    # the quantized weights through the fitted correlation, so the headline is the baseline's
    # (:func:`float_determined`; ``=`` in the table)
    exact_determination: dict[str, Any] | None = None
    # the quantized copy could not run the model's forward (a quantized weight used outside its module:
    # quantization.release_forward.ReleaseForwardError's message): no utility, the table's utility
    # cell reads "failed"; the leakage, a property of the quantized weights, stands (nux50)
    utility_error: str | None = None

    frozen_fraction = property(*_renamed("frozen_fraction", "pinned_fraction"))
    sparsity = property(*_renamed("sparsity", "zero_fraction"))

    def unassessed_float_warning(self) -> str | None:
        """A warning naming the weights outside the assessment that the scheme left in float in
        its quantized copy (a frozen layer too narrow for the group size, a layer type it does not
        take), or ``None`` when only biases or nothing stayed float: the copy's utility and
        ``model_bits_per_weight`` are those of that partly quantized release."""
        if self.error or all(r.startswith("bias:") for r in self.float_unassessed.values()):
            return None
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.float_unassessed.items():
            if not reason.startswith("bias:"):
                by_reason.setdefault(reason, []).append(name)
        parts = [f"{', '.join(v[:4])}{f' and {len(v) - 4} more' if len(v) > 4 else ''} ({r})"
                 for r, v in by_reason.items()]
        return (f"scheme {self.name!r} leaves {sum(len(v) for v in by_reason.values())} weight tensor(s) outside "
                "the assessment in float in its quantized copy (not scored: they are not assessed; its utility "
                "and model b/w are those of this partly quantized release): " + "; ".join(parts))

    def utility_warning(self) -> str | None:
        """A warning for a scheme whose quantized copy could not run the forward (its utility is
        missing, its leakage stands), or ``None``."""
        if self.error or not self.utility_error:
            return None
        return f"scheme {self.name!r}: utility not measured (its leakage stands): {self.utility_error}"

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

    def _quantized_by(self, unassessed: bool = False) -> dict[str, list[str]]:
        """``{"<layer kind> by <how>": [parameter names]}`` of the assessed weights quantized by
        another method than the scheme's own backend (``LayerResult.quantized_by``): convolutions
        and attention projections by the library's round-to-nearest, embeddings by torchao;
        ``unassessed``: those outside the assessment too (:attr:`quantized_by_unassessed`), after them."""
        by: dict[str, list[str]] = {}
        done = [(name, lr.quantized_by) for name, lr in self.layers.items() if lr.quantized and lr.quantized_by]
        for name, method in done + (list(self.quantized_by_unassessed.items()) if unassessed else []):
            kind, _, how = method.partition(":")
            how = ("the library's round-to-nearest" if how.rstrip().endswith("(library RTN)")
                   else "torchao" if "torchao" in how else how.strip())
            by.setdefault(f"{kind} by {how}", []).append(name)
        return by

    def beyond_torchao(self) -> dict[str, list[str]]:
        """What a scheme named after a torchao config (``description["config"]``, e.g.
        ``int8_weight_only``) quantized beyond the layers torchao's ``quantize_(model, config)``
        takes (its default filter: ``nn.Linear``), as :meth:`_quantized_by`, in the whole release:
        the assessed weights and those outside the assessment (frozen, or left out by ``params=``:
        :attr:`quantized_by_unassessed`, not scored but shipped); ``{}`` for the other
        schemes (``rtn_*``, casts, native: no torchao release to differ from) and where nothing was."""
        if self.error or not self.description.get("config"):
            return {}
        return self._quantized_by(unassessed=True)

    def torchao_release_warning(self) -> str | None:
        """A warning for a scheme named after a torchao config whose scored release quantizes
        more layers than torchao's ``quantize_`` with that config (:meth:`beyond_torchao`):
        naming every such layer (those outside the assessment said to be so: they change the
        utility and model b/w, not the leakage), the call that exports the scored release and the
        option that scores torchao's own (``beyond_linear=False``); ``None`` otherwise."""
        by = self.beyond_torchao()
        if not by:
            return None
        kinds: dict[str, list[str]] = {}
        for m, v in by.items():
            kinds.setdefault(m.split(" by ")[0], []).extend(v)
        shown = lambda v: ", ".join(v[:3]) + (f" and {len(v) - 3} more" if len(v) > 3 else "")  # noqa: E731
        outside = list(self.quantized_by_unassessed)
        scored = any(n not in self.quantized_by_unassessed for v in by.values() for n in v)
        # the first sentence (the console line, :func:`warning_line`) names the layers and the mismatch
        return (f"scheme {self.name!r} quantizes " + "; ".join(f"{k} ({shown(v)})" for k, v in kinds.items())
                + " beyond torchao's quantize_, which leaves them in float. "
                + (f"Of these, {shown(outside)} lie outside the assessment (frozen, or left out by params=): "
                   "not scored, they count in the utility and model b/w. " if outside else "")
                + "The figures (" + ("leakage, bits/w, utility" if scored else "utility, model b/w")
                + ") are of this wider release (" + "; ".join(by) + "), not of the model quantize_ "
                "ships with the same config (its default filter takes nn.Linear only). Ship the release "
                "scored: mis_lightning.get_scheme(name).apply(model).model; score torchao's own release: "
                "get_scheme(name, beyond_linear=False) (named name_linear_only; the app: "
                "quantizer=<name> +quantizer.beyond_linear=false; a schemes list entry {name: <name>, "
                "beyond_linear: false})")

    def methods_line(self) -> str | None:
        """A line, for information, naming the layers beyond the scheme's own backend that the
        library quantized too (``LayerResult.quantized_by``: convolutions, attention projections by
        the library's round-to-nearest, embeddings by torchao), or ``None`` when the backend did all,
        or when :meth:`torchao_release_warning` says it (a scheme named after a torchao config).

        It names the layer types and how, not each grid's bit layout (the per-layer rows hold
        that), so that schemes quantizing the same layers say the same line and
        :func:`merge_scheme_warnings` says it once for all of them."""
        by = self._quantized_by()
        if self.error or not by or self.beyond_torchao():
            return None
        parts = [f"{m} ({', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''})"
                 for m, v in by.items()]
        return (f"scheme {self.name!r} quantizes, besides its backend's own layers, " + "; ".join(parts)
                + " at the same bit width (information: these weights are quantized and scored like the "
                "others; each layer's method is in the report's per-layer rows)")

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
        unquantized release; baseline_pool_leakage: the unquantized release in the pool
        protocol (see :class:`SchemeResult`); game: the attack game ``leakage`` belongs to;
        row_notes: scheme name -> a short note printed after its name in :meth:`table` (the
        planner's ``"chosen"``, ``"over budget"``, ``"not chosen"``, ...: :data:`ROW_NOTES`).
        utility_modes: ``{utility metric name: "min" | "max"}``, the direction of each measured
        utility metric whose direction is known (declared ``utility_mode``, the torchmetrics
        object's ``higher_is_better``, or the name; :func:`metric_mode`); every ranking by
        utility reads it (:func:`higher_is_better`). utility_key: the metric the table's verdict
        and the figure use by default (``ScoringConfig.utility_key``; ``None``: the first of
        rmse, auroc, accuracy, loss). utility_tolerance: the verdict's utility band, relative
        to the best scheme's (``ScoringConfig.utility_tolerance``; in the JSON where it is not
        the default :data:`UTILITY_TOLERANCE`).
        utility_records: the number of validation records the utility was measured on
        (:class:`~mis_lightning.evaluation.UtilityValues`; ``None``: unknown, e.g. a user's
        ``utility_fn``); utility_classes: ``{utility metric name: num_classes}`` of the metric
        objects that expose it (torchmetrics' multiclass metrics). utility_errors: ``{utility
        metric name: {"average": ..., "se": {scheme: standard error}, "chance_se": ...}}`` for the
        torchmetrics accuracies, from their own counts (:func:`~mis_lightning._accuracy_error.accuracy_error`:
        a macro average's error is its classes' binomial errors averaged, not the binomial of its
        value). These only let the verdict set an accuracy's gaps against its sampling error
        and tell an accuracy at chance (:func:`utility_noise_note`); in the JSON only where set.
        verdict_note: a line :meth:`table` prints in place of the verdict (``None``: the
        verdict), kept in the JSON so that a loaded report prints what its front end printed: a
        sweep's job that assessed one scheme has no choice to make
        (:func:`mis_lightning.app.job.sweep_verdict_note`), and its ``report.json`` loaded with
        :meth:`from_json` formerly named that one scheme "safest".
        notes: lines for information, not problems (which layers a scheme quantized by another
        method than its backend: :meth:`SchemeResult.methods_line`): :meth:`table` prints them
        under ``notes:``, the callback and the Metric log them (INFO) where ``warnings`` are
        raised as ``UserWarning`` (a note raised as a warning read as a problem).
    """

    n: int
    d: int
    estimation: dict[str, Any]
    diagnostics: dict[str, Any]
    schemes: dict[str, SchemeResult]
    baseline_leakage: float
    baseline_mis: float
    warnings: list[str] = field(default_factory=list)
    baseline_pool_leakage: float = math.nan
    game: str = GAME
    row_notes: dict[str, str] = field(default_factory=dict)
    utility_modes: dict[str, str] = field(default_factory=dict)
    utility_key: str | None = None
    verdict_note: str | None = None
    notes: list[str] = field(default_factory=list)
    utility_tolerance: float = UTILITY_TOLERANCE
    utility_records: int | None = None
    utility_classes: dict[str, int] = field(default_factory=dict)
    utility_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # the keys only where set: reports without a note keep their JSON as before
        note = {} if self.verdict_note is None else {"verdict_note": self.verdict_note}
        if self.notes:
            note["notes"] = list(self.notes)
        if self.utility_tolerance != UTILITY_TOLERANCE:
            note["utility_tolerance"] = self.utility_tolerance
        if self.utility_records is not None:
            note["utility_records"] = self.utility_records
        if self.utility_classes:
            note["utility_classes"] = dict(self.utility_classes)
        if self.utility_errors:
            note["utility_errors"] = to_plain(self.utility_errors)
        return {
            "n": self.n,
            "d": self.d,
            "estimation": self.estimation,
            "diagnostics": to_plain(self.diagnostics),
            "baseline_leakage": self.baseline_leakage,
            "baseline_mis": self.baseline_mis,
            "baseline_pool_leakage": self.baseline_pool_leakage,
            "game": self.game,
            "warnings": list(self.warnings),
            "utility_modes": dict(self.utility_modes),
            "utility_key": self.utility_key,
            "schemes": {k: v.to_dict() for k, v in self.schemes.items()},
            "row_notes": dict(self.row_notes),
            # groups of schemes whose order by leakage the figures do not resolve (table: ties line)
            "not_ranked": self.not_ranked(),
            **note,
        }

    def not_ranked(self) -> list[list[str]]:
        """The scheme names whose order by leakage the figures do not resolve, one list per group
        (:func:`unranked_groups`: each leakage inside its neighbour's 80% interval, or printed
        the same), each by leakage; ``[]`` when every order is resolved."""
        return [[str(r["scheme"]) for r in g] for g in unranked_groups(self.rows())]

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
        Non-finite figures saved as strings (``"nan"``, ``"inf"``, ``"-inf"``: :func:`to_plain`)
        load back as floats; keys that are no field (``not_ranked``, a front end's additions)
        are ignored.

        Raises:
            KeyError: a required key is missing; TypeError: an unknown result field.
        """
        schemes, lost = {}, []
        for k, v in data["schemes"].items():
            v = _floats_back(SchemeResult, _new_keys(dict(v)))
            v["layers"] = {ln: LayerResult(**_floats_back(LayerResult, _new_keys(dict(lv))))
                           for ln, lv in v.get("layers", {}).items()}
            if v.get("interval") is not None:
                v["interval"] = tuple(v["interval"])
                if not all(math.isfinite(float(e)) for e in v["interval"]):
                    v["interval"] = None  # saved before the scoring pass dropped NaN ends: no interval, said below
                    lost.append(k)
            schemes[k] = SchemeResult(**v)
        top = _floats_back(cls, {k: data[k] for k in ("baseline_leakage", "baseline_mis", "baseline_pool_leakage")
                                 if k in data})
        warnings = list(data.get("warnings", []))
        if lost:
            warnings.append(interval_lost_warning(lost, " in this saved report"))
        return cls(
            n=data["n"], d=data["d"], estimation=data["estimation"], diagnostics=data["diagnostics"],
            schemes=schemes, baseline_leakage=top["baseline_leakage"],
            baseline_mis=top["baseline_mis"], warnings=warnings,
            baseline_pool_leakage=top.get("baseline_pool_leakage", math.nan),
            game=data.get("game", GAME), row_notes=dict(data.get("row_notes") or {}),
            utility_modes=dict(data.get("utility_modes") or {}), utility_key=data.get("utility_key"),
            verdict_note=data.get("verdict_note"), notes=list(data.get("notes") or []),
            utility_tolerance=float(data.get("utility_tolerance", UTILITY_TOLERANCE)),
            utility_records=None if data.get("utility_records") is None else int(data["utility_records"]),
            utility_classes={k: int(v) for k, v in (data.get("utility_classes") or {}).items()},
            utility_errors={k: dict(v) for k, v in (data.get("utility_errors") or {}).items()},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> Report:
        """The report saved at ``path``: by :meth:`to_json`, :func:`mis_lightning.assess`'s
        caller, the callback (``mis_report.json`` and its per-epoch copies) or the app
        (``report.json``). Every field loads as written (``Report.from_json(p).to_json()``
        gives the file's report keys back), so :meth:`table` (with any ``utility_key``),
        :meth:`rows` and :meth:`plot` re-render from the file. The keys a front end adds beside
        the report (the callback's ``lightning``: stage, epoch, step) are not fields: read them
        from the JSON.

        Raises:
            OSError: ``path`` cannot be read; ValueError: not JSON, a failed assessment's
            record (its ``error``: the callback writes one when the assessment raised), or
            not a report (e.g. the app's ``result.json``: its ``rows`` are :meth:`rows`).
        """
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:  # name the file and what does load (fu32: aggregate.csv)
            raise ValueError(f"{path} is not JSON ({e}): Report.from_json reads a report saved as JSON (the "
                             "app's report.json, the callback's mis_report.json, Report.to_json); a sweep's "
                             "aggregate.csv / aggregate.md are tables of its jobs' rows, each job's report.json "
                             "loads") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a saved report (a JSON object with 'schemes')")
        if "schemes" not in data and "error" in data:
            raise ValueError(f"{path} records a failed assessment: {data['error']}")
        if "schemes" not in data:
            raise ValueError(f"{path} is not a saved report (no 'schemes'; the app's result.json holds "
                             "rows, its report.json the report)")
        return cls.from_dict(data)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per scheme (for CSV, tables and trackers)."""
        out = []
        # the unquantized figure's own cutoff check (assess._baseline_cutoff_check, pl46): the same
        # for every row, carried on each so that every table (a sweep's aggregate too) can mark it
        base_cut = (self.diagnostics or {}).get("baseline_cutoff_sensitivity")
        unranked = (self.diagnostics or {}).get("headline_unranked")  # assess.headline_unranked
        not_trained = bool((self.diagnostics or {}).get("not_trained"))  # the callback's fit took no step
        for name, s in self.schemes.items():
            row = {
                "scheme": name, "bits_per_weight": s.bits_per_weight, "leakage": s.leakage,
                "mis": s.mis, "leakage_p10": s.interval[0] if s.interval else None,
                "leakage_p90": s.interval[1] if s.interval else None,
                "interval_regime": s.interval_regime, "pool_leakage": s.pool_leakage,
                "baseline_leakage": s.baseline_leakage, "d_eff": s.d_eff, "d": s.d,
                "zero_fraction": s.zero_fraction, "pinned_fraction": s.pinned_fraction,
                "float_fraction": math.nan if s.error else 1.0 - s.quantized_fraction,
                "method": s.method, "error": s.error or "", "unscored": bool(s.unscored),
            }
            if s.floor_sensitivity is not None:  # only where the floor bites (exact estimator)
                row["floor_sensitivity"] = s.floor_sensitivity
            if s.cutoff_sensitivity is not None:  # only with the full correlation, quantized
                row["cutoff_sensitivity"] = s.cutoff_sensitivity["move"]
            if base_cut is not None and not s.error:
                row["baseline_cutoff_sensitivity"] = base_cut["move"]
            if not_trained and not s.error:  # carried on each row as the baseline's check is: every table sees it
                row["not_trained"] = True
            if float_determined(s):  # the float weights fix the quantized ones: "=" in the table (cr49)
                row["float_determined"] = True
            if unranked and not s.error and s.leakage_independent is not None:
                # the headline does not rank some schemes: every row's independent form, to rank by (nux51 #1)
                row["leakage_independent"] = s.leakage_independent
            if not s.error and scale_symmetric(self.diagnostics):  # the diagonal estimator's blind spot
                row["scale_symmetry"] = True
            failed = [] if s.error else regime_failures(self.diagnostics, self.n, self.d, s.d_eff)
            if failed:  # outside the analysis's assumptions: "*" in the table, named in the verdict
                row["indicative"] = "; ".join(failed)
            beyond = s.beyond_torchao()
            if beyond:  # wider than torchao's quantize_ with its config: "^" after the name (nux54 #1)
                row["beyond_torchao"] = ", ".join(dict.fromkeys(k.split(" by ")[0] for k in beyond))
            if name in self.row_notes:  # the planner's role of the row (the table prints it)
                row["note"] = self.row_notes[name]
            if s.model_bits_per_weight is not None and s.model_d is not None:
                # the whole quantized model (assessed weights and the others): its size
                row["model_bits_per_weight"] = s.model_bits_per_weight
                row["model_d"] = s.model_d
            row.update({f"utility_{k}": v for k, v in s.utility.items()})
            if s.utility_error and not s.error:  # the utility column reads "failed" (nux50)
                row["utility_error"] = s.utility_error
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

    def warnings_text(self) -> str:
        """Every warning of :attr:`warnings` in full, one ``"  - "`` line each (a failed scheme's
        too), under ``warnings:``; ``""`` when there is none. The console (the callback's and the
        Metric's ``UserWarning``, :meth:`table`) shows each by its first sentence
        (:func:`~mis_lightning._warning_lines.warning_line`), which is a prefix of its line here, and
        those behind the table's ``*`` in one line naming each (:meth:`console_warnings`)."""
        return "warnings:\n" + "\n".join(f"  - {w}" for w in self.warnings) if self.warnings else ""

    def console_warnings(self, warnings: Sequence[str] | None = None) -> list[str]:
        """The console's lines of ``warnings`` (default: :attr:`warnings`; :func:`console_warnings`):
        each warning's first sentence, the warnings the ``*`` mark stands for in one line."""
        return console_warnings(self.warnings if warnings is None else warnings, self.rows())

    def verdict_text(self, utility_key: str | None = None, utility_tolerance: float | None = None,
                     rows: list[dict[str, Any]] | None = None) -> str:
        """The verdict line :meth:`table` prints (:func:`verdict`; :attr:`verdict_note` in its place
        where the report carries one): the safest scheme within the utility tolerance, or why
        none is chosen. ``utility_key``, ``utility_tolerance``: as :meth:`table`'s (``None``: the
        report's own). ``rows``: :meth:`rows`, where the caller already has them.

        Raises:
            ValueError: ``utility_tolerance`` is negative; the utility metric's direction is unknown.
        """
        if self.verdict_note is not None:
            return self.verdict_note
        return verdict(self.rows() if rows is None else rows,
                       utility_key if utility_key is not None else self.utility_key,
                       self.utility_tolerance if utility_tolerance is None else utility_tolerance,
                       modes=self.utility_modes, records=self.utility_records, classes=self.utility_classes,
                       errors=self.utility_errors)

    def table(self, utility_key: str | None = None, utility_tolerance: float | None = None,
              with_verdict: bool = True, legend_columns: str | None = None,
              verdict_note: str | None = None, verbose: bool = False,
              warnings_in_full: str = WARNINGS_IN_FULL, width: int | None = None) -> str:
        """Plain-text table: scheme, bits/weight, share of assessed weights left in float,
        utility, leakage and its 80% interval (``pos.``: position-dominated), MIS, baseline;
        then a legend of the columns (:func:`legend`), the estimator that ran (``estimation``), the verdict (:func:`verdict`: the safest
        scheme whose utility is within ``utility_tolerance``, relative, of the best, and the
        schemes whose intervals overlap its own; ``with_verdict=False`` leaves it out, e.g.
        where a planner's budgeted choice follows), the schemes whose order by leakage the
        figures do not resolve (:func:`ties_line`: "not ranked beyond their intervals", with or
        without the verdict), the notes (:attr:`notes`: information, under ``notes:``) and every
        warning (an assumption that failed must be read next to the numbers, not only in the
        JSON): one line each, its first sentence naming what failed, those behind the ``*`` mark in
        one line naming each (:meth:`console_warnings`; ``[...]`` where text is left out, and
        then the header says where the full text is: ``warnings_in_full``), or in full where
        ``verbose`` (files that keep the table: the app's ``report.md``, the trackers' text).
        ``legend_columns``: one line in place of the
        legend's entries for the columns every table has (:func:`legend`'s ``columns``).
        ``verdict_note``: a line printed in place of the verdict (a sweep's job that assessed
        one scheme has no choice to make: :func:`mis_lightning.app.job.sweep_verdict_note`);
        ``None``: :attr:`verdict_note`, the report's own (``None`` too: the verdict).

        ``width``: a terminal's columns (the app's printed table: :data:`CONSOLE_WIDTH`): the
        table without its derived columns and with long scheme names shortened
        (:func:`format_table`'s ``width``), the fixed columns' legend one short entry pointing to
        ``warnings_in_full`` (where the table is in full: the app's ``report.md``) unless
        ``legend_columns`` is given, and the "not ranked" line wrapped; ``None``: the full table.

        ``utility_key``: ``None``: :attr:`utility_key` (declared), else the default pick.
        ``utility_tolerance``: ``None``: :attr:`utility_tolerance` (``ScoringConfig.utility_tolerance``).

        Raises:
            ValueError: ``utility_tolerance`` is negative; the utility metric's direction is
                unknown (:func:`higher_is_better`).
        """
        rows = self.rows()
        utility_key = utility_key if utility_key is not None else self.utility_key
        if utility_tolerance is None:
            utility_tolerance = self.utility_tolerance
        modes = self.utility_modes
        text = format_table(rows, utility_key, utility_tolerance, modes=modes, width=width)
        if width is not None and legend_columns is None:  # the console's: ~300 characters, not ~1,700
            legend_columns = CONSOLE_LEGEND.format(
                where=warnings_in_full, pos=f"; {POSITION_CONSOLE}" if position_dominated(rows) else "",
                float=f"; {FLOAT_CONSOLE}" if any(
                    (ff := r.get("float_fraction")) and math.isfinite(ff) for r in rows if not r.get("error")) else "")
        text += "\n\n" + legend(rows, utility_key, columns=legend_columns, modes=modes)
        est = self.estimation or {}
        if est.get("estimator"):  # which estimator ran, in every front end's printed table (fu25)
            cov = f"; covariance of the weights: {est['covariance']}" if est.get("covariance") else ""
            total = max((int(r["model_d"]) for r in rows if r.get("model_d") is not None), default=self.d)
            # which weights are assessed and which quantized (fz44: a frozen backbone is quantized, not assessed)
            whole = (f" of the model's {total}; every scheme quantizes the whole model (the utility and "
                     "model b/w are its), the leakage is that of the assessed weights" if total > self.d else "")
            line = (f"estimated by: {est['estimator']}{cov}; n = {self.n} training records, "
                    f"d = {self.d} assessed weights{whole}")
            if asked := est.get("num_records_requested"):  # num_records above n: every record was used (fu31)
                from .config import EstimationConfig  # lazily: config imports this module
                # not "asked for": on a small training set the default exceeds n unasked (nux57)
                default = ", its default," if asked == EstimationConfig.num_records else ""
                line += (f"; leakage averaged over all {est['num_records']} training records "
                         f"(num_records={asked}{default} is more than there are)")
            text += "\n" + (line if width is None else wrap_entry(line, width))
        if stats := (self.diagnostics or {}).get("running_statistics_layers"):
            # the same for every row, so no row mark (the verdict's order stands), but next to the
            # figures: every one, the baseline's too, leaves out a released channel (nu42b)
            shown = ", ".join(repr(k) for k in stats[:3]) + (f" and {len(stats) - 3} more" if len(stats) > 3 else "")
            text += (f"\nnot scored: the running statistics of {len(stats)} normalisation layer(s) ({shown}), "
                     "released in float with every scheme: each leakage is a lower bound for the release "
                     "(see warnings)")
        if moved := (self.diagnostics or {}).get("data_dependent_buffers"):
            shown = ", ".join(repr(k) for k in moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
            text += (f"\nnot scored: {len(moved)} buffer(s) / frozen parameter(s) the forward sets from the records ({shown}), "
                     "released in float with every scheme: each leakage is a lower bound for the release "
                     "(see warnings)")
        if fitted := (self.diagnostics or {}).get("fitted_buffers"):
            shown = ", ".join(repr(k) for k in list(fitted)[:3]) + (f" and {len(fitted) - 3} more" if len(fitted) > 3 else "")
            text += (f"\nnot scored: {len(fitted)} buffer(s) / frozen parameter(s) equal to statistics of the training "
                     f"inputs ({shown}), released in float with every scheme: each leakage is a lower bound for the "
                     "release (see warnings)")
        if with_verdict:
            # wrapped as the legend's entries (one line was 290-545 characters: cv53); the words unchanged
            text += "\n" + wrap_entry(verdict_note if verdict_note is not None else
                                       self.verdict_text(utility_key, utility_tolerance, rows=rows))
        elif utility_tolerance < 0:
            raise ValueError(f"utility_tolerance must be >= 0, got {utility_tolerance}")
        ties = ties_line(rows)  # also without the verdict: the table's figures still invite an order
        if ties:
            text += "\n" + (ties if width is None else wrap_entry(ties, width))
        # a failed scheme's message is under the table's "errors:" (nux48: the same refusal was
        # there, in its row and again here); the list itself keeps it (JSON, the callback's warnings)
        shown = {failure_warning(k, s.error) for k, s in self.schemes.items() if s.error}
        said = [w for w in self.warnings if w not in shown]
        if self.notes:
            text += "\n\nnotes:\n" + "\n".join(f"  - {w}" for w in self.notes)
        if said:
            lines = said if verbose else console_warnings(said, rows)
            cut = f" ({MORE.strip()}: the rest in {warnings_in_full})" if lines != said else ""
            text += f"\n\nwarnings:{cut}\n" + "\n".join(f"  - {w}" for w in lines)
        return text

    def plot(self, path: str | Path | None = None, utility_key: str | None = None,
             warnings_in_full: str = WARNINGS_IN_FULL):
        """Privacy-utility figure (:func:`privacy_utility_figure`; saved if ``path``); the report's
        warnings are printed under it as the console prints them, one line each (a figure shared
        without the table keeps every caveat's headline), with a line pointing to where each is in
        full: ``warnings_in_full`` (e.g. the file written beside the figure).
        ``utility_key``: ``None``: :attr:`utility_key`, else the default pick."""
        return privacy_utility_figure(self.rows(), path, utility_key if utility_key is not None else self.utility_key,
                                      warnings=self.warnings, modes=self.utility_modes,
                                      warnings_in_full=warnings_in_full)


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _floats_back(kind: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the non-finite floats :func:`to_plain` wrote as strings back to floats, in
    the fields of the dataclass ``kind`` typed with ``float`` (also inside tuples and dicts)."""
    floats = {f.name for f in fields(kind) if "float" in str(f.type)}

    def back(x: Any) -> Any:
        if isinstance(x, str):
            return _NON_FINITE.get(x, x)
        if isinstance(x, list):
            return [back(v) for v in x]
        if isinstance(x, dict):
            return {k: back(v) for k, v in x.items()}
        return x

    return {k: back(v) if k in floats else v for k, v in values.items()}


#: the utility cell of a row whose quantized copy could not run the forward (its warning says why)
UTILITY_FAILED = "failed"


def failure_warning(name: str, error: str) -> str:
    """The report's warning for a scheme that failed (``error``: its ``SchemeResult.error``);
    :meth:`Report.table` leaves it out of its warnings, the message being under ``errors:``."""
    return FAILED_SCHEME.format(name=name) + error


def merge_scheme_warnings(lines: Sequence[tuple[str, str]]) -> list[str]:
    """Per-scheme warnings said once for every scheme they apply to.

    Args:
        lines: ``(scheme name, warning)`` pairs, each warning naming its scheme as ``repr(name)``.

    Returns:
        One warning per distinct text once the scheme names are set aside, in first-appearance
        order: a text shared by several schemes names them all ("schemes 'a' and 'b' leave ...",
        the verbs that follow "scheme" made plural); a text of one scheme is returned as is.
    """
    mark = "\x00"
    plural = {"leaves": "leave", "quantizes": "quantize", "is": "are", "has": "have", "does": "do"}
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, text in lines:
        groups.setdefault(text.replace(repr(name), mark), []).append((name, text))
    out = []
    for template, members in groups.items():
        if len(members) == 1:
            out.append(members[0][1])
            continue
        names = [repr(k) for k, _ in members]
        who = ", ".join(names[:-1]) + " and " + names[-1]
        t = re.sub(r"\bscheme \x00 (leaves|quantizes|is|has|does)\b", lambda m: f"schemes {mark} {plural[m[1]]}", template)
        t = t.replace("scheme " + mark, "schemes " + mark).replace("its backend's", "their backends'")
        out.append(t.replace(mark, who))
    return out


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


def pick_utility_key(rows: list[dict[str, Any]], utility_key: str | None = None,
                     modes: Mapping[str, str] | None = None) -> str | None:
    """The row key of the utility the table, verdict and figure use: ``utility_key`` when given
    (``None`` if not measured), else the first of rmse, auroc, accuracy, loss, else the first
    measured metric whose direction is known (``modes`` or the name: a default pick never ranks
    by a direction it would have to guess; naming such a metric raises in
    :func:`higher_is_better`)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("utility_")))
    if utility_key is not None:
        k = utility_key if utility_key.startswith("utility_") else f"utility_{utility_key}"
        return k if k in keys else None
    for pref in ("utility_rmse", "utility_auroc", "utility_accuracy", "utility_loss"):
        if pref in keys:
            return pref
    return next((k for k in keys if k.removeprefix("utility_") in (modes or {}) or known_mode(k) is not None), None)


def check_utility_key_measured(rows: Sequence[Mapping[str, Any]], utility_key: str | None, picked: str | None) -> None:
    """Refuse a named ``utility_key`` that no row measured while others were (the table
    dropped the column and its verdict ranked by leakage alone, recommending the scheme that costs
    the model most, silently).

    Raises:
        ValueError: naming the key and the utilities the rows do hold.
    """
    if utility_key is None or picked is not None:
        return
    measured = list(dict.fromkeys(k.removeprefix("utility_") for r in rows for k in r if k.startswith("utility_")))
    if measured:
        raise ValueError(f"utility_key={utility_key!r} was not measured for any scheme; the report holds "
                         f"{', '.join(measured)}: name one of those")


def _fmt(v: Any, extra: int = 0, exponent: bool | None = None) -> str:
    """A figure: a float with 4 decimals (3 in exponent notation below 1e-3 or from 1e5),
    plus ``extra`` digits; ``-`` for a missing value; anything else as ``str``. ``exponent``:
    the notation forced (a table column's, :func:`column_format`); ``None``: by the value."""
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if exponent is None:
            exponent = _needs_exponent(v)
        if exponent and math.isfinite(v):
            return f"{v:.{3 + extra}e}"
        return f"{v:.{4 + extra}f}"
    return str(v)


def _needs_exponent(v: float) -> bool:
    """Four decimals would show fewer than two significant digits (``0 < |v| < 1e-3``) or more
    than nine characters (``|v| >= 1e5``)."""
    return v != 0 and math.isfinite(v) and (abs(v) < 1e-3 or abs(v) >= 1e5)


def column_format(values: Iterable[Any], extra: int = 0) -> Callable[[Any], str]:
    """The formatter of one table column: every float of the column in one notation, 4 decimals,
    or 4 significant digits in exponent notation (``3.870e-06``) for the whole column when any of
    its values needs it (below 1e-3, from 1e5: :func:`_fmt`); ``extra`` digits more. Before, an MIS
    column read ``0.0367`` over ``3.870e-06`` over ``0.0000``, three styles for one quantity; a
    per-value choice would hide a small value behind ``0.0000`` or break the column's alignment."""
    exponent = any(_needs_exponent(float(v)) for v in values if isinstance(v, float))
    return lambda v: _fmt(v, extra, exponent)


#: significant digits the utility column shows of its smallest value (ux49: loss 0.0056 at 4
#: decimals, 2 digits, could not show a 1% band: 0.0056 inside, 0.0057 outside)
UTILITY_SIGNIFICANT = 4


def significant_extra(values: Iterable[Any], significant: int = UTILITY_SIGNIFICANT) -> int:
    """Digits to add to :func:`_fmt`'s 4 decimals so that the column's smallest nonzero finite
    ``|value|`` shows ``significant`` significant digits (0 where the column is in exponent
    notation, which shows 4 already, or its values are large enough), at most
    :data:`MAX_EXTRA_UTILITY_DIGITS`."""
    floats = [abs(float(v)) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(float(v)) and v != 0]
    if not floats or any(_needs_exponent(v) for v in floats):
        return 0
    return min(max(significant - 1 - math.floor(math.log10(min(floats))) - 4, 0), MAX_EXTRA_UTILITY_DIGITS)


def count_format(values: Iterable[Any]) -> Callable[[Any], str]:
    """The formatter of a column of counts with fractions (``d_eff``: how many weights still leak,
    up to ``d``): fixed decimals, as few as show the smallest nonzero value to 3 significant digits
    (at least 1, at most 4: ``1004.2``, ``18.7``, ``0.0123``), never exponent notation for a large
    count; exponent notation for the whole column only where a value is below 1e-3 (4 decimals
    would read 0). Before: ``15889.0000``, four decimals of a near-count."""
    floats = [abs(float(v)) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0]
    if any(v < 1e-3 for v in floats):
        return lambda v: _fmt(v, 0, True)
    decimals = min(max(2 - math.floor(math.log10(min(floats))), 1), 4) if floats else 1
    return lambda v: "-" if v is None or v == "" else f"{v:.{decimals}f}" if isinstance(v, float) else str(v)


def share_format(v: Any) -> str:
    """A share of weights (0 to 1) as a percentage with one decimal (``29.1%``), the float and
    zeros columns' one notation; ``<0.1%`` / ``>99.9%`` where a nonzero share (or one short of
    all) would round to ``0.0%`` / ``100.0%``; ``-`` for a missing value. Before, the zeros column
    read ``2.907e-01`` beside the float column's ``0.9%``."""
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if 0 < v < 0.0005:
        return "<0.1%"
    if 0.9995 <= v < 1:
        return ">99.9%"
    return f"{100 * v:.1f}%"


# the most digits added to the utility column to tell the verdict's utility band from the rest
MAX_EXTRA_UTILITY_DIGITS = 6


def _utility_band(ok: list[dict[str, Any]], uk: str | None, utility_tolerance: float,
                  modes: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The verdict's utility band over rows ``ok``: ``(best row, rows within utility_tolerance
    (relative) of its utility)``; ``(None, ok)`` without a utility metric or a finite value."""
    if not uk:
        return None, ok
    have = [r for r in ok if r.get(uk) is not None and math.isfinite(float(r[uk]))]
    if not have:
        return None, ok
    hib = higher_is_better(uk, modes)
    best = (max if hib else min)(have, key=lambda r: float(r[uk]))
    b = float(best[uk])
    tol = utility_tolerance * abs(b)
    return best, [r for r in have if (float(r[uk]) >= b - tol if hib else float(r[uk]) <= b + tol)]


def safest_in_band(band: Sequence[Mapping[str, Any]], uk: str | None,
                   modes: Mapping[str, str] | None = None) -> Any:
    """The verdict's choice among the utility band's rows ``band`` (:func:`_utility_band`): the
    lowest leakage, and among rows of the same leakage the best utility ``uk`` (a scheme whose
    leakage equals another's and whose utility is worse is dominated; before, a seed sweep chose
    ``int8_weight_only`` at rmse 1.0404 over ``int8_dynamic_activation_int8_weight``'s 1.0394 at
    the same 0.05637162343063942, by the rows' order); then the rows' order. Read by the verdict and
    the sweep's across-seeds count (:mod:`mis_lightning.app.replicates`).

    Raises:
        ValueError: ``uk``'s direction is unknown (:func:`higher_is_better`)."""
    sign = (-1.0 if higher_is_better(uk, modes) else 1.0) if uk else 0.0

    def cost(r: Mapping[str, Any]) -> float:
        u = r.get(uk) if uk else None
        return sign * float(u) if u is not None and math.isfinite(float(u)) else math.inf

    return min(band, key=lambda r: (float(r["leakage"]), cost(r)))


def _ranked_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the verdict ranks: no error, a finite leakage, not a lower bound (``unscored``)."""
    return [r for r in rows if not r.get("error") and r.get("leakage") is not None
            and math.isfinite(float(r["leakage"])) and not r.get("unscored")]


def utility_digits(rows: list[dict[str, Any]], utility_key: str | None = None,
                   utility_tolerance: float = UTILITY_TOLERANCE, modes: Mapping[str, str] | None = None) -> int:
    """Digits to add to :func:`_fmt` in the utility column (and the verdict's utility figures) so
    that the column's smallest value shows :data:`UTILITY_SIGNIFICANT` significant digits
    (:func:`significant_extra`) and no row inside the verdict's utility band shows the same value
    as one outside it: 0 where 4 decimals do both (e.g. rmse 0.6669 against 0.6755), more where
    the values are small or the band is narrower than the last digit (loss 0.005003 inside a 1%
    band, 0.005061 outside: both 0.0050 at 4 decimals), at most
    :data:`MAX_EXTRA_UTILITY_DIGITS`."""
    ranked = _ranked_rows(rows)
    uk = pick_utility_key(ranked, utility_key, modes)
    # at least UTILITY_SIGNIFICANT digits of the column's smallest value (its rows without an error)
    base = significant_extra([r.get(uk) for r in rows if not r.get("error")]) if uk else 0
    best, inside = _utility_band(ranked, uk, utility_tolerance, modes)
    if best is None:
        return base
    inside_ids = {id(r) for r in inside}
    outside = [float(r[uk]) for r in ranked if id(r) not in inside_ids
               and r.get(uk) is not None and math.isfinite(float(r[uk]))]
    within = [float(r[uk]) for r in inside]
    for extra in range(base, MAX_EXTRA_UTILITY_DIGITS + 1):
        fmt = column_format([*within, *outside], extra)  # as the column prints them
        if not {fmt(v) for v in within} & {fmt(v) for v in outside}:
            return extra
    return MAX_EXTRA_UTILITY_DIGITS


#: utility names where larger is better, matched whole (lower case) after a ``utility_`` and a
#: ``val_`` / ``test_`` / ``train_`` prefix (:func:`metric_name`); one list for the table's verdict
#: and legend, the figure, the sweep's aggregate and the planner (the report's own short list missed
#: ``acc``: fu30, the verdict called a scheme at chance accuracy the best).
HIGHER_IS_BETTER = frozenset({
    "accuracy", "acc", "top1", "top5", "top1_acc", "top5_acc", "top1_accuracy", "top5_accuracy",
    "top_1_accuracy", "top_5_accuracy", "balanced_accuracy", "auroc", "auc", "roc_auc", "auprc", "pr_auc",
    "r2", "r2_score", "f1", "f1_score", "fbeta", "precision", "recall", "specificity", "sensitivity",
    "average_precision", "ap", "map", "mcc", "matthews_corrcoef", "pearson", "pearson_corrcoef",
    "spearman", "spearman_corrcoef", "explained_variance", "cohen_kappa", "kappa", "iou", "jaccard",
    "jaccard_index", "dice", "bleu", "rouge", "psnr", "ssim", "ndcg", "hit_rate", "hits"})
#: utility names where smaller is better (matched as :data:`HIGHER_IS_BETTER`; also any name ending
#: in ``_loss`` or ``_error``). Any other name has no known direction: :func:`higher_is_better`
#: raises rather than guess (a name read as smaller-is-better made the verdict pick the worst scheme)
LOWER_IS_BETTER = frozenset({
    "loss", "mse", "rmse", "mae", "mape", "smape", "msle", "rmsle", "nrmse", "nll", "cross_entropy", "ce",
    "log_loss", "logloss", "bce", "error", "error_rate", "err", "top1_error", "top5_error", "wer", "cer",
    "perplexity", "ppl", "brier", "brier_score", "kl", "kl_div", "kl_divergence", "hinge", "huber"})
#: the two values of a declared direction, as Lightning's ModelCheckpoint / EarlyStopping ``mode``
UTILITY_MODES = ("min", "max")


def metric_name(utility_key: str) -> str:
    """``utility_key`` without its ``utility_`` and ``val_`` / ``test_`` / ``train_`` prefixes
    (also ``val/``...), in lower case: the name the direction lists are matched against."""
    key = utility_key.lower().removeprefix("utility_")
    for prefix in ("val_", "val/", "valid_", "validation_", "test_", "test/", "train_", "train/"):
        key = key.removeprefix(prefix)
    return key


_metric_name = metric_name  # the name before fu31


def known_mode(utility_key: str) -> str | None:
    """The direction of a utility metric known from its name (:data:`HIGHER_IS_BETTER`,
    :data:`LOWER_IS_BETTER`, a ``_loss`` / ``_error`` ending): ``"max"``, ``"min"``, or ``None``."""
    name = metric_name(utility_key)
    if name in HIGHER_IS_BETTER:
        return "max"
    if name in LOWER_IS_BETTER or name.endswith(("_loss", "_error")):
        return "min"
    return None


def metric_mode(name: str, metric: Any = None, declared: str | None = None) -> str | None:
    """The direction of utility metric ``name``: ``declared`` (``"min"`` / ``"max"``), else the
    metric object's own ``higher_is_better`` (torchmetrics), else :func:`known_mode`; ``None``
    where none of them says."""
    if declared is not None:
        return declared
    hib = getattr(metric, "higher_is_better", None)
    if isinstance(hib, bool):
        return "max" if hib else "min"
    return known_mode(name)


def higher_is_better(utility_key: str, modes: Mapping[str, str] | None = None) -> bool:
    """Whether a larger value of the utility metric ``utility_key`` (``"utility_auroc"`` or
    ``"auroc"``) is better: the direction recorded in ``modes`` (``{metric name: "min" | "max"}``,
    :attr:`Report.utility_modes`: declared, or the torchmetrics object's), else the name
    (:func:`known_mode`). The one function every ranking by utility reads (table, verdict, legend,
    figure, the sweep's aggregate, the planner).

    Raises:
        ValueError: the direction is unknown (names the metric and how to declare it).
    """
    modes = modes or {}
    key = utility_key.removeprefix("utility_")
    mode = modes.get(key, modes.get(metric_name(utility_key))) or known_mode(utility_key)
    if mode is None:
        raise ValueError(unknown_mode_message(key))
    return mode == "max"


def unknown_mode_message(name: str) -> str:
    """The error for a utility metric whose direction is unknown (names it and the fix)."""
    return (f"utility metric {name!r}: whether higher or lower is better is unknown (its metric object has no "
            f"higher_is_better, and {name!r} is not a name with a known direction, e.g. accuracy, auroc, f1, "
            "rmse, loss); declare it: utility_mode='max' or 'min' (ScoringConfig(utility_key=..., "
            "utility_mode=...); Hydra: mis.scoring.utility_mode=max), as Lightning's ModelCheckpoint mode=")


def has_interval(r: Mapping[str, Any]) -> bool:
    """Whether row ``r`` has an 80% interval: both ends given and finite (an end read NaN, as an
    uncertified correlated form can, is no interval: compared, it read as no overlap)."""
    try:
        return math.isfinite(float(r["leakage_p10"])) and math.isfinite(float(r["leakage_p90"]))
    except (KeyError, TypeError, ValueError):  # absent, None, or a table's "-"
        return False


def interval_lost_warning(schemes: Sequence[str], detail: str = "") -> str:
    """The warning for the schemes whose 80% interval was dropped as an end read NaN (``detail``:
    why, where known); the scoring pass says it, and a report saved before that pass dropped such
    intervals says it on loading (:meth:`Report.from_dict`, :func:`drop_nan_interval`)."""
    return (f"no 80% interval for {', '.join(schemes)}: an end of the interval read NaN{detail}, so the row has "
            "none and differences from it are not judged; the headline itself is finite")


def drop_nan_interval(row: dict[str, Any]) -> bool:
    """Set both ends of row ``row`` to ``None`` where one is given but :func:`has_interval` is false
    (a row saved before the scoring pass dropped NaN ends: every reader then sees no interval, never
    a NaN end); whether it did."""
    if has_interval(row) or all(row.get(k) is None for k in ("leakage_p10", "leakage_p90")):
        return False
    row["leakage_p10"] = row["leakage_p90"] = None
    return True


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether the 80% intervals of rows ``a`` and ``b`` overlap (``None``: one has none)."""
    if not (has_interval(a) and has_interval(b)):
        return None
    return a["leakage_p10"] <= b["leakage_p90"] and b["leakage_p10"] <= a["leakage_p90"]


def _unresolved(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the headlines of rows ``a`` and ``b`` are not told apart by the figures: each one
    lies inside the other's 80% interval (a row without an interval, the unquantized ``none``,
    is a point: the other's interval decides), or both print the same (:func:`_fmt`): an order
    between them would then be the digits', not the data's."""
    la, lb = float(a["leakage"]), float(b["leakage"])
    if _fmt(la) == _fmt(lb):
        return True
    in_a = not has_interval(a) or a["leakage_p10"] <= lb <= a["leakage_p90"]
    in_b = not has_interval(b) or b["leakage_p10"] <= la <= b["leakage_p90"]
    if not has_interval(a) and not has_interval(b):
        return False  # no interval on either side (uncertainty_draws=0): nothing to judge by
    return in_a and in_b


def unranked_groups(rows: Sequence[dict[str, Any]], label: str = "scheme") -> list[list[dict[str, Any]]]:
    """The runs of rows whose order by leakage the figures do not resolve (method.md section 3,
    "The uncertainty interval"): the ranked rows (no error, a finite leakage, not a lower bound)
    sorted by leakage, neighbours joined where :func:`_unresolved`; groups of two or more, each
    sorted by leakage, in order of leakage. ``label``: the key naming a row (only for the sort's
    tie-break, so that the groups do not depend on the rows' order).

    E.g. rtn_int4 0.05142 [0.0460, 0.0797] and rtn_int2 0.05140 [0.0447, 0.1071]: each
    inside the other's interval, one group; a table or legend listing them "safest first"
    would otherwise rank them by digits the data do not carry.
    """
    ranked = sorted(_ranked_rows(list(rows)), key=lambda r: (float(r["leakage"]), str(r.get(label))))
    groups: list[list[dict[str, Any]]] = []
    run: list[dict[str, Any]] = ranked[:1]
    for prev, r in zip(ranked, ranked[1:]):
        if _unresolved(prev, r):
            run.append(r)
            continue
        if len(run) > 1:
            groups.append(run)
        run = [r]
    if len(run) > 1:
        groups.append(run)
    return groups


#: the most schemes a verdict or "not ranked" list names; the rest are counted ("and 12 more"):
#: all_schemes.py's 40 schemes made a ~3,000-character verdict line (nux48). The table above it,
#: ``rows()`` and the JSON name every scheme.
LINE_NAMES = 2
#: the names of the list the verdict is about (the schemes not clearly different from the safest):
#: a job's 3-6 of them named in full ("and 3 more" hid a 5-scheme job's, nux50), all_schemes.py's
#: 31 still counted past these
VERDICT_NAMES = 6
#: the same for the "not ranked beyond their intervals" line, over all its groups (its own line:
#: a sweep's 4-8 tied jobs stay named in full; all_schemes.py's 13 groups made 2,000 characters)
TIES_NAMES = 8


def name_list(names: Sequence[str], limit: int = LINE_NAMES) -> str:
    """``names`` joined by ", ", the first ``limit`` named and the rest counted
    (``"a, b and 3 more"``)."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def brief_list(names: Sequence[str], limit: int = LINE_NAMES) -> str:
    """The verdict's secondary lists (outside the utility band, lower bounds, indicative):
    ``names`` in full when there are at most ``limit``, else only their number (``"29 schemes"``;
    the table names each). Formerly all_schemes.py's verdict named 2 of each list and counted the rest,
    598 characters; the list the verdict is about (not clearly different from the safest) keeps
    :func:`name_list`."""
    names = list(names)
    return name_list(names, limit) if len(names) <= limit else f"{len(names)} schemes"


#: how the table, the figures, the aggregate and the planner say it (one wording, every front end)
NOT_RANKED = "not ranked beyond their intervals"


def ties_line(rows: Sequence[dict[str, Any]], label: str = "scheme") -> str | None:
    """One line naming the schemes whose order the figures do not resolve
    (:func:`unranked_groups`), e.g. ``"not ranked beyond their intervals: rtn_int2 (0.0514),
    rtn_int4 (0.0514), rtn_int8 (0.0548) (each leakage inside its neighbour's 80% interval, or
    printed the same)"``; groups are separated by ``;``. ``None`` when every order is resolved."""
    groups = unranked_groups(rows, label)
    if not groups:
        return None
    parts, left = [], TIES_NAMES
    for i, g in enumerate(groups):
        if left <= 0:  # the rest counted: the table lists them in order
            parts.append(f"and {len(groups) - i} more group(s) ({sum(len(h) for h in groups[i:])} schemes)")
            break
        # each figure with the table's marks (*, !, ...): the line is read apart from the table
        parts.append(name_list([f"{r.get(label)} ({_fmt(r['leakage'])}{leakage_marks(r)})" for r in g], left))
        left -= len(g)
    text = "; ".join(parts)
    return (f"{NOT_RANKED}: {text} (each leakage inside its neighbour's 80% interval, or printed the same: "
            "their order is not a ranking)")


def verdict(rows: list[dict[str, Any]], utility_key: str | None = None,
            utility_tolerance: float = UTILITY_TOLERANCE, modes: Mapping[str, str] | None = None,
            records: int | None = None, classes: Mapping[str, int] | None = None,
            errors: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One line: the safest scheme (lowest leakage) among those whose utility is within
    ``utility_tolerance`` (relative, e.g. 0.01 = 1%) of the best scheme's, and which schemes it
    is not clearly different from (80% intervals overlap). Without utility: the safest scheme.
    A row whose leakage is only a lower bound (``unscored``: a part of the release the figure
    does not score, marked ``+``) is not ranked; the line names it.

    ``modes``: the utility metrics' directions (:attr:`Report.utility_modes`). ``records``,
    ``classes``: the validation records and the metrics' class counts
    (:attr:`Report.utility_records`, :attr:`Report.utility_classes`), ``errors`` the accuracies'
    own errors (:attr:`Report.utility_errors`): where given, an accuracy's band decided by gaps
    below its standard error, or an accuracy at chance, is said (:func:`utility_noise_note`);
    none of them changes the scheme chosen or a figure.

    Raises:
        ValueError: ``utility_tolerance`` is negative; the utility metric's direction is unknown.
    """
    if utility_tolerance < 0:
        raise ValueError(f"utility_tolerance must be >= 0, got {utility_tolerance}")
    ok = [r for r in rows if not r.get("error") and r.get("leakage") is not None
          and math.isfinite(float(r["leakage"]))]
    if not ok:
        return "verdict: no scheme succeeded"
    # a row whose quantized copy cannot run the forward has no utility to weigh (nux50): not ranked
    unmeasured = [str(r["scheme"]) for r in ok if r.get("utility_error")]
    ok = [r for r in ok if not r.get("utility_error")]
    failed = (f"; not ranked (utility {UTILITY_FAILED}: the quantized copy cannot run the forward, see warnings): "
              f"{brief_list(unmeasured)}") if unmeasured else ""
    if not ok:
        return f"verdict: no scheme ranked{failed.removeprefix(';')}"
    if undetermined := undetermined_headline(ok):
        # the baseline caps every figure and is set by the rank rule: no order of the schemes is measured
        return f"verdict: none: {undetermined}; no scheme is ranked (see warnings)"
    # a leakage that is only a lower bound (+: an unscored part of the release) cannot be ranked
    bounded = [str(r["scheme"]) for r in ok if r.get("unscored")]
    note = (f"; not ranked (leakage a lower bound, +): {brief_list(bounded)}" if bounded else "") + failed
    ranked = _ranked_rows(ok)
    if not ranked:
        return f"verdict: no scheme ranked: every leakage is a lower bound (+): {name_list(bounded)}"
    extra = utility_digits(ok, utility_key, utility_tolerance, modes)  # as the table's column
    text = (_ranked_verdict(ranked, utility_key, utility_tolerance, extra, modes)
            + utility_noise_note(ranked, utility_key, utility_tolerance, modes, records, classes, extra, errors)
            + note)
    marked = [str(r["scheme"]) for r in ranked if r.get("indicative")]
    if marked and len(marked) == len(ranked):
        # every figure outside the analysis's assumptions: an order, not a measured ranking
        every = "every figure is outside the analysis's assumptions (see warnings)"
        bias = near_identity_bias(ranked)
        if bias is None:
            return text + f"; indicative only (*): {every}"
        row, gap = bias
        # which assumptions failed (the rows' "*" phrases): off a minimum and d / n near 1 both give it
        why = "; ".join(failed_assumptions(ranked))
        said = (f"{row['scheme']}, which removes almost no information (d_eff {float(row['d_eff']):.1f} of "
                f"{int(row['d'])}), reads {100 * gap:.0f}% below the unquantized baseline ({_fmt(row['leakage'])} "
                f"against {_fmt(row['baseline_leakage'])}): the size of the bias the failed assumptions ({why}) put "
                "on these figures")
        low, high = (f(float(r["leakage"]) for r in ranked) for f in (min, max))
        if len(ranked) > 1 and high > 0 and (high - low) / high <= gap:
            # an accuracy at chance is said here too: the model's own utility, whatever the leakage
            return (f"verdict: none: every figure is indicative only (*) and they differ by at most "
                    f"{100 * (high - low) / high:.0f}%, within the bias shown: {said}; no scheme is ranked (see warnings)"
                    + utility_noise_note(ranked, utility_key, utility_tolerance, modes, records, classes, extra,
                                         errors, band=False))
        return (text + f"; indicative only (*): {every}, and {said}: differences between schemes under "
                f"{100 * gap:.0f}% are not a ranking")
    if marked:
        text += f"; indicative only (*): {brief_list(marked)}"
    return text


#: a quantized row keeping at least this share of the information (d_eff / d) removes almost none
#: (:func:`near_identity_bias`): int8_weight_only read d_eff 160.9 of 161 on nux54's MLP
NEAR_IDENTITY_DEFF = 0.99
#: ... and reading more than this share below its unquantized baseline shows the figures' bias where
#: every row is indicative (*): at minima with d / n <= 0.81 such rows read 0.1-1.5% below (nux54: 0.0976 /
#: 0.0980, 0.0914 / 0.0922, 0.0988 / 0.0989; rv54c: 0.3-1.5% at d / n 0.20-0.81); off a minimum 2.9-15%
#: (0.2479 / 0.2552, 0.1164 / 0.1215, 0.1347 / 0.1589), and at minima with d / n 0.85-0.95 2.9-5.6% (rv54c,
#: ux55b: bf16, which removes nothing, 1.0-3.1% there)
NEAR_IDENTITY_GAP = 0.02


def near_identity_bias(ranked: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], float] | None:
    """The row that shows how far the figures of a report whose every row is indicative (``*``)
    can move without a cause in the release, with its relative gap: a quantized row
    with ``d_eff / d >= NEAR_IDENTITY_DEFF`` (almost no information removed, so it should read
    the baseline: method.md section 3) reading more than :data:`NEAR_IDENTITY_GAP` below its
    ``baseline_leakage``; the largest gap if several, ``None`` if none. Whatever assumption
    failed (the caller asks only where every row is ``*``; the verdict names the rows' failures),
    since a gap between two releases that differ by almost nothing is the figures' own error
    wherever it comes from. Measured twice (docs/benchmarks.md, "ux54e", "rv54c", "ux55b"):
    (a) off a minimum (an Adam-trained MLP, 2.9-15%): an indefinite Hessian (35 negative
    eigenvalues) with an eigenvalue near 0 puts 97% of the weights' standardised variance on one
    direction, so int8's cells, fine against each weight's marginal sd, hide the narrow directions
    that carry most of the Mahalanobis norm -- right within the Gaussian model, but that model's
    covariance is the assumption that failed; (b) at a minimum with d / n 0.85-0.95 (L-BFGS-polished
    tanh MLPs, 2.9-5.6%; bf16, which removes nothing, 1.0-3.1%): outside the ``d_eff << n`` regime
    the first-order figures are no estimate (method.md section 6: mean leverage 0.74-0.80, the
    leverage correction moves the baseline 2.2-2.4x, and the first-order gaps are larger still,
    5.3-9.2%), so the clause is right there too. At minima with d / n <= 0.81 such rows read
    0.1-1.5% below: no clause. Gap = (baseline - leakage) / baseline."""
    best: tuple[dict[str, Any], float] | None = None
    for r in ranked:
        try:
            lk, base, d_eff, d = (float(r[k]) for k in ("leakage", "baseline_leakage", "d_eff", "d"))
        except (KeyError, TypeError, ValueError):
            continue
        if not all(map(math.isfinite, (lk, base, d_eff, d))) or d <= 0 or base <= 0:
            continue
        gap = (base - lk) / base
        if d_eff / d >= NEAR_IDENTITY_DEFF and gap > NEAR_IDENTITY_GAP and (best is None or gap > best[1]):
            best = (r, gap)
    return best


#: utility names (:func:`metric_name`) that are a share of the validation records (top-1
#: accuracy): their sampling error is the binomial sqrt(p (1 - p) / m) and chance is 1 / classes
ACCURACY_NAMES = frozenset({"accuracy", "acc", "top1", "top1_acc", "top1_accuracy", "top_1_accuracy"})
#: standard errors within which the best accuracy counts as at chance (about a 95% two-sided band)
CHANCE_SE = 2.0


def utility_noise_note(ranked: list[dict[str, Any]], utility_key: str | None, utility_tolerance: float,
                       modes: Mapping[str, str] | None = None, records: int | None = None,
                       classes: Mapping[str, int] | None = None, extra: int = 0,
                       errors: Mapping[str, Mapping[str, Any]] | None = None, band: bool = True) -> str:
    """The verdict's clause on the validation set's sampling noise: ``""`` unless the
    utility is a top-1 accuracy (:data:`ACCURACY_NAMES`, larger is better, values in [0, 1]) and
    ``records`` (m, the validation records) is known. Its standard error se at the best scheme's
    accuracy p: ``errors[name]["se"][scheme]`` where the metric's own counts gave it
    (:func:`~mis_lightning._accuracy_error.accuracy_error`: for a macro average,
    sqrt(sum_c r_c (1 - r_c) / m_c) / K over the classes' recalls; none given for an average
    that is neither a share of the records nor the classes' mean of shares: no clause), else
    sqrt(p (1 - p) / m) (binomial: a share of the m records). Says (a) when the choice rests on a
    gap below se: the safest scheme in the band, or one reading lower leakage outside it, within
    se of the band's edge; (b) with ``classes[name]`` = K known, when |p - 1/K| <= :data:`CHANCE_SE`
    se0 (guessing's own error at c = 1/K: ``errors[name]["chance_se"]``, else sqrt(c (1 - c) / m)):
    the model's accuracy is at chance (below it under 1/K - CHANCE_SE se0). se is each accuracy's
    own error; the difference of two schemes on the same records is paired and can be resolved
    more finely. Nothing chosen changes. ``ranked``: the verdict's ranked rows (:func:`_ranked_rows`).
    ``band=False``: (b) alone (a verdict that chooses no scheme has no band's choice to qualify)."""
    if not records or records <= 0:
        return ""
    uk = pick_utility_key(ranked, utility_key, modes)
    if not uk or metric_name(uk) not in ACCURACY_NAMES or not higher_is_better(uk, modes):
        return ""
    best, eligible = _utility_band(ranked, uk, utility_tolerance, modes)
    if best is None or not all(0.0 <= float(r[uk]) <= 1.0 for r in eligible):
        return ""
    metric = uk.removeprefix("utility_")
    p = float(best[uk])
    own = (errors or {}).get(metric)
    if own is not None:  # the metric's own counts: its average's error, per scheme
        se = (own.get("se") or {}).get(str(best.get("scheme")))
        if se is None or not math.isfinite(float(se)):
            return ""  # an average whose error is not known here: none claimed
        se = float(se)
        formula = ("sqrt(p(1-p)/m)" if own.get("average") in SHARE_AVERAGES
                   else f"{own.get('average')} average: the classes' binomial errors averaged")
    else:
        se, formula = math.sqrt(p * (1.0 - p) / records), "sqrt(p(1-p)/m)"
    edge = p - utility_tolerance * abs(p)
    safest = safest_in_band(eligible, uk, modes)
    inside = {id(r) for r in eligible}
    # the rows whose side of the band's edge decides the choice: the safest in it, lower leakage outside
    deciding = [safest] + [r for r in ranked if id(r) not in inside and r.get(uk) is not None
                           and math.isfinite(float(r[uk])) and float(r["leakage"]) < float(safest["leakage"])]
    gaps = [abs(float(r[uk]) - edge) for r in deciding if r is not best]
    out = ""

    def fmt(v: float, digits: int = extra) -> str:  # accuracies as the verdict prints them
        return _fmt(float(v), digits)
    if band and gaps and min(gaps) < se:
        out += (f"; the utility band's choice rests on {metric} gaps below its standard error (down to "
                f"{fmt(min(gaps), 0)} from the band's edge; se {fmt(se, 0)} on {records:,} validation records, "
                f"{formula}; a paired difference on the same records can be finer)")
    k = (classes or {}).get(metric)
    if k:
        chance = 1.0 / k
        # the error of guessing's accuracy (the null's, sqrt(c(1-c)/m)), not the best's: at p above
        # chance that is larger and called 0.04 "at chance" of 1/1000 on 50 records (2 hits where
        # guessing expects 0.05: rv53b)
        se0 = (float(own["chance_se"]) if own is not None and own.get("chance_se") is not None
               else math.sqrt(chance * (1.0 - chance) / records))
        if p <= chance + CHANCE_SE * se0:
            where = ("at chance: the best {m} {p} is within {c:g} se ({se}) of" if p >= chance - CHANCE_SE * se0
                     else "below chance: the best {m} {p} is more than {c:g} se ({se}) below")
            out += ("; the model's accuracy is " + where.format(m=metric, p=fmt(p), c=CHANCE_SE, se=fmt(se0, 0))
                    + f" 1/{k} = {fmt(chance)}: no scheme's utility is told from guessing")
    return out


def _ranked_verdict(ok: list[dict[str, Any]], utility_key: str | None, utility_tolerance: float,
                    extra: int = 0, modes: Mapping[str, str] | None = None) -> str:
    """:func:`verdict` over the rows whose leakage is a full figure; utility figures with
    ``extra`` digits (:func:`utility_digits`, as in the table's column)."""
    uk = pick_utility_key(ok, utility_key, modes)
    how = ""
    best, eligible = _utility_band(ok, uk, utility_tolerance, modes)
    if best is not None:
        metric = uk.removeprefix("utility_")
        how = (f" with {metric} within {100 * utility_tolerance:g}% of the best "
               f"({_fmt(float(best[uk]), extra)}, {best['scheme']})")
    safest = safest_in_band(eligible, uk if best is not None else None, modes)
    if _ties_baseline(safest):
        # cr49: a quantized scheme at the unquantized figure is not "safest": none is safer than the float model
        return _no_safer_verdict(ok, eligible, how, uk, extra)
    text = f"verdict: safest{how}: {safest['scheme']} (leakage {_fmt(safest['leakage'])})"
    if best is None and len(ok) > 1:
        # nux48: without a utility the verdict ranks by leakage alone, which favours the coarsest
        # scheme whatever it does to the model: say so on the verdict line itself
        text += " by leakage alone (no utility measured: the schemes' cost to the model is not weighed)"
    others = [r for r in ok if r is not safest]
    if not others:
        return text
    if _overlap(safest, safest) is None:
        # schemes reading lower than it but outside the utility band (safest being, e.g., the
        # unquantized "none"): named with their utility even where no interval judges them (fu25)
        inside_ids = {id(r) for r in eligible}
        lower = [r for r in others if id(r) not in inside_ids and float(r["leakage"]) < float(safest["leakage"])]
        low = ("; lower leakage but outside the utility band: "
               + brief_list([f"{r['scheme']} (leakage {_fmt(r['leakage'])}"
                            + (f", {uk.removeprefix('utility_')} {_fmt(r[uk], extra)}" if uk and r.get(uk) is not None else "")
                            + ")" for r in lower])) if lower else ""
        if all(_overlap(r, r) is None for r in others):
            return text + "; no intervals (uncertainty_draws=0): differences cannot be judged" + low
        return (text + "; it has no interval of its own (unquantized, or its interval left out: see the warnings), "
                "so differences from it cannot be judged" + low)
    inside = {id(r) for r in eligible}

    def vs_safest(r: dict[str, Any]) -> bool:
        """Whether ``r`` overlaps the safest's interval; a row without an interval (the
        unquantized ``none``) is a point: inside that interval it is not clearly different."""
        o = _overlap(safest, r)
        return safest["leakage_p10"] <= float(r["leakage"]) <= safest["leakage_p90"] if o is None else o

    same = [r["scheme"] for r in others if vs_safest(r) and id(r) in inside]
    outside = [r["scheme"] for r in others if vs_safest(r) and id(r) not in inside]
    # schemes clearly safer than it (no overlap, lower leakage): outside the utility band, since
    # it is the safest inside; said, never folded into "clearly safer than every other scheme"
    safer = [r for r in others if not vs_safest(r) and float(r["leakage"]) < float(safest["leakage"])]
    tail = ""
    if safer:
        tail = ("; clearly safer than it but outside the utility band: "
                + brief_list([f"{r['scheme']} (leakage {_fmt(r['leakage'])}"
                             + (f", {uk.removeprefix('utility_')} {_fmt(r[uk], extra)}" if uk and r.get(uk) is not None else "")
                             + ")" for r in safer]))
    if not same and not outside:
        if safer and not any(id(r) in inside for r in others):  # nothing else in the band to beat
            return text + "; the only scheme in the utility band" + tail
        return text + ("; clearly safer than every other scheme" + (" in the utility band" if safer else "")
                       + " (no interval overlaps its own)") + tail
    if same:
        text += "; not clearly different from it (intervals overlap): " + name_list(same, VERDICT_NAMES)
    if outside:  # as safe within the intervals, but their utility is outside the band
        text += (f"; {'also ' if same else ''}overlapping its interval but outside the utility band: "
                 + brief_list(outside))
    return text + tail


def _ties_baseline(row: dict[str, Any]) -> bool:
    """Whether a quantized row's leakage is its unquantized baseline's by the verdict's tie rule
    (both print the same, :func:`_fmt`), or the float weights determine its quantized ones
    (``float_determined``, ``=``). The unquantized row itself (no quantized weight) is not."""
    try:
        quantized = float(row.get("float_fraction", math.nan)) < 1.0
        base = row.get("baseline_leakage")
        tied = row.get("float_determined") or (base is not None and _fmt(float(row["leakage"])) == _fmt(float(base)))
    except (TypeError, ValueError):
        return False
    return quantized and bool(tied)


def _no_safer_verdict(ok: list[dict[str, Any]], eligible: list[dict[str, Any]], how: str, uk: str | None,
                      extra: int) -> str:
    """:func:`verdict`'s line where the lowest leakage in the utility band is the unquantized
    baseline's (:func:`_ties_baseline`): no scheme there is safer than the float model by this
    estimate; schemes reading lower outside the band are named with their utility."""
    low = min(float(r["leakage"]) for r in eligible)
    tied = [str(r["scheme"]) for r in eligible if _ties_baseline(r) or _fmt(float(r["leakage"])) == _fmt(low)]
    text = (f"verdict: no scheme{how} is safer than the unquantized model by this estimate: "
            # the verdict's subject: named as its list is (nux52 #7: "none, bf16 and 2 more" hid two of five)
            f"{name_list(tied, VERDICT_NAMES)} read its leakage ({_fmt(low)})")
    inside = {id(r) for r in eligible}
    lower = [r for r in ok if id(r) not in inside and float(r["leakage"]) < low and not _ties_baseline(r)]
    if lower:
        text += ("; lower leakage but outside the utility band: "
                 + name_list([f"{r['scheme']} (leakage {_fmt(r['leakage'])}"
                              + (f", {uk.removeprefix('utility_')} {_fmt(r[uk], extra)}" if uk and r.get(uk) is not None else "")
                              + ")" for r in lower]))
    return text


# Legend entries of columns shown both by a job's table and by a sweep's aggregate.md
# (app/aggregate.py), declared once.
FLOAT_ENTRY = ("float: share of assessed weights left in float (they leak like the baseline): biases, which "
               "weight-only schemes never quantize, and layers a scheme cannot take (a warning names those).")
MODEL_BITS_ENTRY = ("model b/w: storage per weight of the whole model as the scheme quantizes it (the weights "
                    "not assessed too, e.g. a frozen backbone); the utility is that whole quantized model's.")
ZEROS_ENTRY = "zeros: share of quantized weights released as exactly 0."
POSITION_ENTRY = ("pos. after [p10, p90]: a position-dominated interval, set by where few coarse weights "
                  "sit in their cells, not a bootstrap spread; the figure can then read below the truth: "
                  "where p90 reaches above it by more than the record average's error allows, a warning "
                  "names the scheme and p90 is the bound to hold.")


# The console's and the full legend's word on a ``pos.`` interval (POSITION_ENTRY in full: report.md,
# aggregate.md); nux55 read "set by where few coarse weights sit in their cells" as opaque
POSITION_SHORT = ("pos. after an interval: not a sampling spread but set by where the few coarse weights sit "
                  "in their grid cells, so the figure can read below the truth (hold p90 as the bound)")


# the console's (its legend stays under ~500 characters): the same two, short
POSITION_CONSOLE = ("pos.: not a sampling spread, set by where few coarse weights sit in their grid cells: the "
                    "figure can read low, hold p90")
FLOAT_CONSOLE = "float: share left in float, e.g. biases (a warning names other layers)"


def position_dominated(rows: list[dict[str, Any]]) -> bool:
    """Whether a row without an error has a position-dominated interval (``pos.`` in the table)."""
    return any(r.get("interval_regime") == "position-dominated" for r in rows if not r.get("error"))


def _bits_example(rows: list[dict[str, Any]]) -> str:
    """The bits/w legend's example, taken from ``rows``: the first row with weights left in float
    (its scheme, bits/w and float share, as the table prints them), ``""`` where none has any
    (a static "e.g. 12.91" under tables without such a value)."""
    for r in rows:
        ff, bits = r.get("float_fraction"), r.get("bits_per_weight")
        if not r.get("error") and bits is not None and ff is not None and math.isfinite(ff) and ff > 0:
            return (f", so a partly quantized row reads above its grid's width (here {r['scheme']}: "
                    f"{bits:.2f} with {share_format(ff)} in float)")
    return ""


def legend(rows: list[dict[str, Any]], utility_key: str | None = None, columns: str | None = None,
           modes: Mapping[str, str] | None = None) -> str:
    """What the table's columns mean (printed below it by :meth:`Report.table`).

    ``columns``: when given, this one line replaces the entries of the columns every table has
    (leakage, pool, interval, bits/w, float, baseline, d_eff, zeros), e.g. a pointer to a legend
    printed once for several tables (the jobs of a Hydra sweep); the entries that depend on the
    rows (the utility metric, plans, the ``+``, ``~`` and ``!`` marks) are kept."""
    uk = pick_utility_key(rows, utility_key, modes)
    lines = [columns] if columns is not None else [
        "legend: leakage = advantage of the best membership-inference attack on the released "
        "weights (0 = none, 1 = always right); lower is safer. MIS = 1 - leakage. Game: a "
        "training member against a fresh draw from the population, other training records unknown.",
        "  pool: the same release in the pool protocol of reference-model audits (LiRA, RMIA, "
        "ML Privacy Meter: target trained on a random half of a known pool); compare such audits "
        "with this column.",
        "  80% interval [p10, p90]: uncertainty of the leakage; overlapping intervals = not clearly different"
        + (f"; {POSITION_SHORT}." if position_dominated(rows) else "."),
        "  bits/w: storage per assessed weight incl. scales; weights left in float count at their "
        "width (32)" + _bits_example(rows) + ".",
        f"  {FLOAT_ENTRY} baseline: leakage of the unquantized model.",
        f"  d_eff: how many weights still leak (sum of the surviving information fractions); {ZEROS_ENTRY}",
    ]
    if whole_model_column(rows):  # row-dependent: kept when ``columns`` replaces the fixed entries
        lines.append("  " + MODEL_BITS_ENTRY)
    if uk:
        better = "higher" if higher_is_better(uk, modes) else "lower"
        lines.append(f"  {uk.removeprefix('utility_')}: utility of the quantized copy on the "
                     f"validation data ({better} is better).")
    if any(re.fullmatch(r"plan(_\d+)?", str(r.get("scheme", ""))) for r in rows):
        lines.append("  plan, plan_k: mixed-precision plans of the planner (mode=plan), re-assessed like the "
                     "schemes; their per-layer assignment, budget and proxy values are in plan.md.")
    notes = [n for n in ROW_NOTES if any(note_kind(r.get("note")) == n for r in rows)]
    if notes:
        lines.append("  " + "; ".join(f"({n}): {ROW_NOTES[n]}" for n in notes) + ".")
    lines += marks_legend(rows)
    return "\n".join(wrap_entry(ln) for ln in lines)


def wrap_entry(line: str, width: int = 100) -> str:
    """``line`` wrapped at ``width`` characters for a terminal, continuation lines indented four
    spaces, words (a scheme's name, a path) never broken: the legend's entries and the verdict.
    ``" ".join(text.split())`` gives the words back on one line."""
    return textwrap.fill(line, width, subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)


def leakage_marks(row: dict[str, Any]) -> str:
    """The marks after a row's leakage in every table (the report's, a sweep's aggregate):
    ``!`` above the baseline, ``=`` the baseline's figure although quantized (:func:`float_determined`),
    ``+`` a lower bound, ``~`` unstable, ``?`` the diagonal estimator's scale-symmetry blind spot,
    ``*`` outside the analysis's assumptions; each explained by :func:`marks_legend`."""
    return ((" !" if above_baseline(row) else "") + (" =" if row.get("float_determined") else "")
            + (" +" if row.get("unscored") else "")
            + (" ~" if unstable(row) else "") + (" ?" if row.get("scale_symmetry") else "")
            + (" *" if row.get("indicative") else ""))


def scheme_marks(row: dict[str, Any]) -> str:
    """The mark after a row's scheme name in every table: ``^`` where a scheme named after a torchao
    config released more layers than torchao's ``quantize_`` with that config
    (:meth:`SchemeResult.beyond_torchao`); explained by :func:`marks_legend`."""
    return " ^" if row.get("beyond_torchao") else ""


def failed_assumptions(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct phrases (sorted) of the assumptions that fail for the scored ``rows``' figures
    (their ``indicative``, :func:`regime_failures` joined by ``"; "``): the ``*`` legend's and the
    verdict's near-identity clause's list."""
    return sorted({p for r in rows if not r.get("error") and r.get("indicative")
                   for p in str(r["indicative"]).split("; ")})


def marks_legend(rows: list[dict[str, Any]]) -> list[str]:
    """The legend entries (one line each, indented two spaces) of the marks
    (:func:`leakage_marks`) that ``rows`` carry."""
    out: list[str] = []
    beyond = sorted({k for r in rows if r.get("beyond_torchao") for k in str(r["beyond_torchao"]).split(", ")})
    if beyond:
        out.append(f"  ^ after a scheme: not the release torchao's quantize_ makes with that config: it also "
                   f"quantizes {', '.join(beyond)}, which quantize_ leaves in float, and its figures are of that "
                   "wider release; ship it with get_scheme(name).apply(model).model, or score torchao's own with "
                   "get_scheme(name, beyond_linear=False) (see warnings).")
    if any(r.get("unscored") for r in rows if not r.get("error")):
        out.append("  +: a lower bound: the release also carries a part this figure does not score "
                   "(AWQ's or SmoothQuant's per-channel factors, computed from the calibration "
                   "records; see warnings); not ranked by the verdict.")
    undetermined = any(headline_undetermined(r) for r in rows if not r.get("error"))
    if undetermined:
        out.append(f"  undet. (after the baseline): undetermined: the unquantized figure moves by more than "
                   f"{100 * UNDETERMINED_MOVE:.0f}% when the rank rule of the gradient covariance it is read with is "
                   f"set {CUTOFF_CHECK_FACTOR:.0f}x finer: it is set by that rule, not by the data, and it caps every "
                   "quantized figure, so no figure here is determined and none is ranked (see warnings).")
    base_moves = any(baseline_unstable(r) and not headline_undetermined(r) for r in rows if not r.get("error"))
    base_entry = (f"the unquantized figure moves by more than {100 * CUTOFF_SENSITIVITY_MAX:.0f}% when the rank "
                  f"rule of the gradient covariance it is read with is set {CUTOFF_CHECK_FACTOR:.0f}x finer: it "
                  "caps every quantized figure, so every figure is indicative (see warnings)")
    if any(unstable(r) for r in rows if not r.get("error")):
        out.append(f"  ~: unstable: the figure moves by more than {100 * FLOOR_SENSITIVITY_MAX:.0f}% when the "
                   "eigenvalue floor of the Hessian is set 10x higher or lower, or the pseudo-inverse cutoff "
                   f"on the weights' correlation {CUTOFF_CHECK_FACTOR:.0f}x finer (a near-singular Hessian or correlation: the "
                   "figure is set by the floor or cutoff, not by the data; see warnings)"
                   + (f"; after the baseline: {base_entry}." if base_moves else "."))
    elif base_moves:
        out.append(f"  ~ (after the baseline): unstable: {base_entry}.")
    if any(r.get("scale_symmetry") for r in rows if not r.get("error")):
        out.append("  ?: uncertain: layers whose weights can be scaled together without changing the model "
                   "(before a LayerNorm / GroupNorm / InstanceNorm / RMSNorm, or under weight_norm) were read by the "
                   "diagonal estimator, whose per-weight sigma misses that direction: the figure can be off "
                   "in either direction (see warnings; estimation='exact' handles it).")
    failed = failed_assumptions(rows)
    if failed:
        out.append(f"  *: indicative only: an assumption of the analysis fails for this figure ({', '.join(failed)}; "
                   "see warnings): it can read above or below what real attacks achieve; the verdict says so.")
    if any(r.get("float_determined") for r in rows if not r.get("error")):
        out.append("  =: the unquantized baseline's figure although the scheme quantizes weights: the weights "
                   "it leaves in float determine the quantized ones through the weights' fitted correlation, or "
                   "a singular Hessian leaves the leakage in directions no scheme hides, so the headline earns "
                   "these schemes no credit (see warnings; rank them by indep.).")
    if independent_column(rows):
        out.append("  indep.: the leakage with the weights' errors taken as uncorrelated, another estimate than "
                   "the correlated headline (it can read above it), shown because the headline does not rank some "
                   "schemes (see warnings): compare the schemes' indep. with each other and with the baseline "
                   "row's, not with the headline.")
    if any(above_baseline(r) for r in rows if not r.get("error")):
        out.append("  !: leakage above the unquantized baseline, which no quantized release can "
                   "exceed: the figure is not reliable here (see warnings).")
    return out


#: the planner's note on a re-assessed row that misses a budget, followed by which ("over budget:
#: utility, bits"; :func:`note_kind` reads the key of :data:`ROW_NOTES` back)
OVER_BUDGET = "over budget"


def note_kind(note: Any) -> Any:
    """The :data:`ROW_NOTES` key of a row note: ``"over budget: utility"`` -> ``"over budget"``."""
    return note.split(": ", 1)[0] if isinstance(note, str) else note


#: the planner's notes after a row's name (:attr:`Report.row_notes`) and what the legend says of them
ROW_NOTES = {
    "chosen": "the planner's release, the best re-assessed plan within the budget",
    "chosen, over budget": "the planner's release by its proxy, which misses the budget once re-assessed "
                           "(no re-assessed plan meets it: see warnings)",
    "over budget": "misses the planner's budget named after it once re-assessed (utility: max_utility_loss, "
                   "bits: max_bits, MIS: target_mis): not the release",
    "not chosen": "a plan within the budget that the chosen one beats: not the release",
    # hd51's undet. (cor52): the plans' leakages rank nothing
    "returned, not ranked": "the scheme the planner returns, within the budget by its measured utility and size; "
                          "the headline is undetermined (undet.), so no plan is ranked by leakage: not a privacy "
                          "choice (see warnings)",
    "not chosen, not ranked": "a plan within the budget; the headline is undetermined (undet.): not ranked against the "
                  "returned one, not the release",
}

ERROR_CELL_WIDTH = 60  # characters of an error message shown in a table row


#: a failed row's cell where its message is too long for the row: the message is under the table
ERROR_BELOW = 'see "errors:" below'


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


# Relative excess over the baseline (or between its two forms) beyond which a figure that
# must not exceed it is flagged (``!`` in the table, a warning; the Monte Carlo forms' own
# error is ~1%).
CONSISTENCY_TOLERANCE = 0.02


# Relative distance of a quantized scheme's correlated headline from its baseline within which
# the figure is the baseline's (cr49): the full form's determined case reads it to ~1e-15 (the
# per-record cap ties it), far below any Monte Carlo or rounding difference of a real credit
BASELINE_TIE_RTOL = 1e-9


def float_determined(s: SchemeResult) -> bool:
    """Whether a scheme quantizes weights (some ``kappa < 1``) yet its correlated headline is the
    unquantized one because the weights left in float determine the quantized ones through the
    fitted correlation (``exact_determination["determined"]``, functional.correlated.ExactSpan),
    or equals the baseline within :data:`BASELINE_TIE_RTOL` (relative) for another reason: ``=``
    in the table, one warning (assess._consistency_warnings)."""
    if s.error or s.quantized_fraction <= 0 or s.covariance not in ("full", "factor"):
        return False
    if s.exact_determination is not None and s.exact_determination.get("determined"):
        return True
    lk, base = float(s.leakage), float(s.baseline_leakage)
    return (s.d_eff < s.d and math.isfinite(lk) and math.isfinite(base)
            and abs(lk - base) <= BASELINE_TIE_RTOL * max(abs(base), 1e-300))


#: d / n, or a scheme's d_eff / n, above which the asymptotic regime (d_eff << n, docs/method.md
#: section 2) is not met: the figure is indicative only (a warning; ``*`` in the table)
D_EFF_OVER_N_MAX = 0.1


def leverage_failure(diagnostics: Mapping[str, Any]) -> bool:
    """Whether the exact estimator's mean leverage (``diagnostics["mean_leverage"]``, the records'
    average share of the fit, ~d / n at a well-posed minimum) exceeds :data:`D_EFF_OVER_N_MAX`, the
    bound the d / n rule puts on the same regime, and the warning's threshold
    (``assess._leverage_note``). Measured: 11 of 12 seeds of one design (d / n = 0.081) read mean
    leverage 0.078-0.090 and leakage 0.098-0.102; the twelfth 0.247 (max 6.72, a near-singular Hessian),
    its figure 0.150, 27% of it the leverage correction, unmarked. The diagonal estimator's leverage is
    one approximate mean per loss direction (its own note): not read here."""
    h = diagnostics.get("mean_leverage")
    return (diagnostics.get("leverage_estimate") != "diagonal" and h is not None
            and math.isfinite(float(h)) and float(h) > D_EFF_OVER_N_MAX)


# Records the model never saw read the stiff-direction statistic (``stiff_offset_sd``) at
# ~sqrt(1 + m / n_train) on a fit at its minimum (method.md section 6, "Records unlike the training
# set"): 1.41 for as many records as it was trained on, 3 only for m = 8 n_train, more than any
# held-out set fed against its training set. Above it, unseen records alone do not explain the
# figure: the fit is off its minimum along the stiff directions, whatever the records (nux55: an
# Adam fit read 18 sd on its own 2,000 training records and was told "likely: records it was not
# trained on").
UNSEEN_RECORDS_EXPLAIN_MAX = 3.0


def stiff_offset_cause(diagnostics: Mapping[str, Any]) -> str | None:
    """What the stiff-direction test (``diagnostics["records_unlike_training"]``, the exact
    estimator's ``stiff_offset_sd`` above its limit; method.md section 6) can say, as the library
    knows it: ``None`` where it did not fire or cannot speak (an interpolant: rounding over
    rounding); ``"off_minimum"`` where the records are known to be the training records
    (``records_from_training_loader``: the callback and the Hydra app pick them) or the figure is
    above :data:`UNSEEN_RECORDS_EXPLAIN_MAX`, which unseen records alone do not reach; else
    ``"records_or_off"``: records it was not trained on, or a fit off its minimum there."""
    if not diagnostics.get("records_unlike_training") or diagnostics.get("interpolating"):
        return None
    if diagnostics.get("records_from_training_loader") or \
            float(diagnostics.get("stiff_offset_sd", 0.0)) > UNSEEN_RECORDS_EXPLAIN_MAX:
        return "off_minimum"
    return "records_or_off"


def regime_failures(diagnostics: Mapping[str, Any] | None, n: int, d: int, d_eff: float | None) -> list[str]:
    """The assumptions of the analysis (docs/method.md sections 2 and 6) that fail for a figure
    of a report with ``n`` records, ``d`` assessed weights and the scheme's ``d_eff``, given the
    report's ``diagnostics``: ``d / n`` or ``d_eff / n`` above :data:`D_EFF_OVER_N_MAX`, weights
    not at a minimum (or records that read like records it was not trained on:
    ``diagnostics["records_unlike_training"]``), a Hessian with negative curvature (or a negative reading within its precision
    at a gradient too large to exclude a saddle), a model interpolating its data. Each
    is a short phrase; empty when none fails. The warnings say each in full. The diagonal
    sandwich on a model with recurrent layers (``diagnostics["diagonal_over_recurrent"]``) is one:
    its sigma's error there has no bound it can state (docs/benchmarks.md, "rn43"); so is the
    diagonal sandwich whose K-FAC correction a refused layer lost (``diagnostics["kfac_lost"]``: e.g. a
    transposed convolution called twice per forward; docs/benchmarks.md, "nu49", "tw51"). So is the
    exact estimator's mean leverage above the d / n bound where d / n is not (:func:`leverage_failure`), its
    finite-sample (leverage) correction not run where d / n makes it matter (``diagnostics["leverage_not_run"]``:
    the figures read low; docs/benchmarks.md, "est57"), a Hessian whose residual block a DDP process left out
    of its sums (``diagnostics["residual_not_computed"]``; docs/benchmarks.md, "dd58"), and
    the diagonal estimator's flag that its figures may read below the exact one's
    (``diagnostics["diagonal_low_read"]``: its mean leverage per loss direction not small; docs/benchmarks.md,
    "dg55"). So
    is a callback's loss several-fold above the one ``training_step`` returned on the same batches
    (``diagnostics["loss_mismatch"]``: :mod:`mis_lightning._loss_match`), and a model the callback's
    fit took no optimizer step on (``diagnostics["not_trained"]``: :data:`NOT_TRAINED`), and a callback's
    records read from a stream cut by ``limit_train_batches`` whose passes, or the pass assessed, read
    other batches, or from a shuffled loader so cut that left records unread
    (``diagnostics["stream_records_differ"]``: not the records trained on)."""
    diagnostics = diagnostics or {}
    out = []
    if n > 0 and d / n > D_EFF_OVER_N_MAX:
        out.append(f"d / n = {d / n:.2g}")
    elif n > 0 and d_eff is not None and math.isfinite(float(d_eff)) and float(d_eff) / n > D_EFF_OVER_N_MAX:
        out.append(f"d_eff / n = {float(d_eff) / n:.2g}")
    elif leverage_failure(diagnostics):
        out.append(f"mean leverage {float(diagnostics['mean_leverage']):.2g}")
    if diagnostics.get("not_at_minimum"):
        # ux54b (nux53 #14): which of its causes the diagnostics single out, as its warning says
        cause = stiff_offset_cause(diagnostics)
        held = diagnostics.get("offset_decay_held")
        # nux55: the training records off along the stiff directions are not "near-flat directions only"
        out.append("records not trained on, or not at a minimum" if cause == "records_or_off" and held
                   else "not at a minimum (stiff directions too)" if cause == "off_minimum" and held
                   else "not at a minimum (near-flat directions only)" if held else "not at a minimum")
    elif (cause := stiff_offset_cause(diagnostics)) is not None:  # nux50: a held-out set's figures, 1.9x the members'
        # nux51 #2: the callback reads the training loader itself: then only the other cause remains
        out.append("not at a minimum (stiff directions)" if cause == "off_minimum"
                   else "records not trained on, or not at a minimum")
    if diagnostics.get("not_trained"):  # nux53 #3: no optimizer step in the fit assessed
        out.append("not trained in this fit")
    if diagnostics.get("stream_records_differ"):  # nu57: a reshuffling stream cut by limit_train_batches
        out.append("records assessed not those trained on")
    if diagnostics.get("loss_mismatch"):  # nux52 #2: the callback's loss is not training_step's
        out.append("assessed loss not the training loss")
    if diagnostics.get("negative_curvature"):
        out.append("negative curvature")
    elif diagnostics.get("curvature_unresolved"):
        out.append("saddle not excluded")
    if diagnostics.get("interpolating"):
        out.append("interpolating")
    if diagnostics.get("diagonal_over_recurrent"):
        out.append("diagonal sandwich over recurrent layers")
    if diagnostics.get("leverage_not_run"):  # est57: the exact estimator's figures read low, said in a warning only
        out.append("leverage correction not run")
    if diagnostics.get("residual_not_computed"):  # dd58: a DDP process's Hessian lacks a residual block
        out.append("Hessian's residual term not computed on every record")
    if diagnostics.get("kfac_lost"):  # nu49: a layer called twice lost it unmarked
        out.append("diagonal sigma without its K-FAC correction")
    low = diagnostics.get("diagonal_low_read")
    if low:  # dg55: down to 0.73x the exact estimator's figures where measured, with nothing said before
        out.append(f"diagonal estimator at mean leverage {float(low['leverage_per_direction']):.2g} per direction: "
                   "may read below the exact one")
    return out


#: the d / n warning's sentence naming the schemes whose own d_eff / n is not small either
#: (assess.py builds it; the aggregate of a sweep lists those per job under one warning)
D_EFF_SCHEMES_MARK = "Quantization leaves d_eff / n"


# Relative move of a leakage under the eigenvalue floor x10 or /10 beyond which the figure is
# flagged unstable (``~`` in the table, a warning; SchemeResult.floor_sensitivity).
FLOOR_SENSITIVITY_MAX = 0.05
# The full correlation's rank rule (its eigenvalue cutoff, correlated.RCOND) is re-read this many
# times finer, and a relative move of the leakage beyond CUTOFF_SENSITIVITY_MAX flags it (``~``, a
# warning; SchemeResult.cutoff_sensitivity; rc44, cf45): the figures' accuracy target
# (validation.md: within 5%)
CUTOFF_CHECK_FACTOR = 100.0
CUTOFF_SENSITIVITY_MAX = 0.05


def unstable(row: dict[str, Any]) -> bool:
    """Whether a row's leakage moves by more than :data:`FLOOR_SENSITIVITY_MAX` (relative) when
    the exact sandwich's eigenvalue floor is set 10x higher or lower, or when the full
    correlation's rank rule (eigenvalue cutoff) is set :data:`CUTOFF_CHECK_FACTOR` x finer
    (``cutoff_sensitivity`` above :data:`CUTOFF_SENSITIVITY_MAX`)."""
    return any(v is not None and math.isfinite(float(v)) and float(v) > cap
               for v, cap in ((row.get("floor_sensitivity"), FLOOR_SENSITIVITY_MAX),
                              (row.get("cutoff_sensitivity"), CUTOFF_SENSITIVITY_MAX)))


# Relative move of the unquantized figure under the rank rule set CUTOFF_CHECK_FACTOR x finer beyond
# which the headline is said to be undetermined, not only unstable (``undet.`` after the baseline, no
# verdict; nux51 #2): twice the figures' accuracy target (CUTOFF_SENSITIVITY_MAX). A tied LM at chance
# (its headline 0.81 at 60 epochs, 0.82 resumed to 90, where a loss-threshold attack reads 0.094)
# moved 23% and 17% (0.80 -> 0.98, 0.81 -> 0.95; docs/benchmarks.md, "hd51")
UNDETERMINED_MOVE = 0.1


def headline_undetermined(row: Mapping[str, Any]) -> bool:
    """Whether a row's unquantized baseline moves by more than :data:`UNDETERMINED_MOVE`
    (relative) when the gradient covariance's rank rule is set :data:`CUTOFF_CHECK_FACTOR` x finer
    (``baseline_cutoff_sensitivity``): the baseline, which caps every quantized figure, is set by
    the rule, not by the data; ``undet.`` after the baseline in the table and no verdict."""
    v = row.get("baseline_cutoff_sensitivity")
    return v is not None and math.isfinite(float(v)) and float(v) > UNDETERMINED_MOVE


def baseline_unstable(row: dict[str, Any]) -> bool:
    """Whether a row's unquantized baseline moves by more than :data:`CUTOFF_SENSITIVITY_MAX`
    (relative) when the rank rule of the gradient covariance it is read with is set
    :data:`CUTOFF_CHECK_FACTOR` x finer (``baseline_cutoff_sensitivity``): ``~`` after the
    baseline in the table."""
    v = row.get("baseline_cutoff_sensitivity")
    return v is not None and math.isfinite(float(v)) and float(v) > CUTOFF_SENSITIVITY_MAX


def baseline_marks(row: Mapping[str, Any]) -> str:
    """The mark after a row's baseline in every table (the report's, a sweep's aggregate):
    ``" undet."`` (:func:`headline_undetermined`), ``" ~"`` (:func:`baseline_unstable`) or
    ``""``; each explained by :func:`marks_legend`."""
    return " undet." if headline_undetermined(row) else " ~" if baseline_unstable(row) else ""


#: Why a model the callback's fit took no optimizer step on has no verdict (nux53 #3: a freshly
#: initialised model read 0.70 with "safest: intx_weight_only_int4"): its weights never saw the
#: records, so their true advantage is 0, yet the estimator reads the curvature and gradient spread
#: of a model far from any minimum. ``diagnostics["not_trained"]``, ``row["not_trained"]``.
NOT_TRAINED = "the model was not trained in this fit (no optimizer step): the figures are not membership leakage"
#: the start of the callback's warning where a stream that yields other records each pass was cut by
#: ``limit_train_batches`` (nu57), or a shuffled loader so cut left records unread (docs/benchmarks.md "dd59").
#: ``diagnostics["stream_records_differ"]``.
STREAM_RECORDS_DIFFER = "the training records assessed are not those trained on"
#: the start of the warning where a DDP process left a block of the Hessian's residual term out of its sums
#: (assess.residual_not_computed_warning; dd58)
RESIDUAL_NOT_COMPUTED = "the Hessian's residual term was not computed on every record"


#: the ``*`` mark's phrases (:func:`regime_failures`) and the warnings that say each in full: ``(the
#: phrase's start, the warning's start, what to do, short)``; ``None``: the warning's own console line
#: in place of the phrase (it names the likely cause, which says what to do). On the console (:func:`console_warnings`)
#: the warnings a row's ``*`` stands for are one line, each failed assumption named by its phrase with
#: its remedy (nux55: six warnings of a 3-layer CNN, three of them the ``*`` legend's list again); a
#: phrase not listed here keeps its warning's own line. Every warning stays in full in the report.
STAR_WARNINGS: tuple[tuple[str, str, str | None], ...] = (
    ("d / n = ", "d / n = ", "assess fewer weights or use more records"),
    # the records' mean leverage, ~d / n: the same regime (its warning says the figures are marked * for it)
    ("d / n = ", "finite-sample (leverage) correction", "assess fewer weights or use more records"),
    ("d_eff / n = ", "d_eff / n is not small", "assess fewer weights or use more records"),
    ("mean leverage ", "finite-sample (leverage) correction", "assess fewer weights or use more records"),
    ("diagonal estimator at mean leverage", "finite-sample (leverage) correction",
     "estimation='exact' if affordable, for the more conservative figure"),  # dg57: real attacks read below both
    # its warning's first sentence names the cause and what lets the correction run
    ("leverage correction not run", "the finite-sample (leverage) correction could not run", None),
    ("Hessian's residual term not computed", RESIDUAL_NOT_COMPUTED, "hessian='exact' computes every block"),
    # the diagonal estimator's remedy line (dg56): the same failed assumption, its figures "rows marked *"
    ("diagonal estimator at mean leverage", "the diagonal estimator's figures may read below",
     "estimation='exact' if affordable, for the more conservative figure"),
    # the warning's own headline: its likely causes (dropout trained in train mode, records not trained on, ...)
    ("not at a minimum", "the model is not at a minimum", None),
    ("records not trained on", "the model is not at a minimum", None),
    ("records not trained on", "the records assessed are not", None),
    ("not trained in this fit", NOT_TRAINED, "assess a trained model"),
    ("records assessed not those trained on", STREAM_RECORDS_DIFFER, "train on a fixed subset, or pass the records trained on to assess()"),
    ("negative curvature", "the Hessian has negative curvature", "train on, with the loss and weight decay assessed: "
     "full-batch L-BFGS (ReLU kinks can stall it)"),
    ("saddle not excluded", "saddle not excluded", "train on: full-batch L-BFGS (ReLU kinks can stall it)"),
    ("interpolating", "the model interpolates", "add weight decay, or assess fewer weights than records"),
)
#: the ``*`` line's lead on the console (:func:`console_warnings`)
STAR_LINE = "figures marked * are indicative only (they may read above or below what attacks achieve):"
#: how a fit trained on minibatches (Adam, SGD) reaches the minimum the analysis assumes, as docs/lightning.md
#: and the README say it (benchmarks/minibatch_polish.py: after 20 Adam epochs, one L-BFGS call of 1,000
#: iterations cleared every warning and *); an L-BFGS fit that stopped short: more of it
MINIMUM_CURE = ("after the minibatch epochs, full-batch L-BFGS (line_search_fn='strong_wolfe') on the same "
                "objective, weight decay included, until the gradient is tiny (an L-BFGS fit: more iterations; on "
                "ReLU-type activations L-BFGS can stall at the kinks short of the minimum, where smooth ones such as "
                "GELU or SiLU reach it: docs/lightning.md)")


def console_warnings(warnings: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The console's lines of ``warnings`` (the callback's and the Metric's ``UserWarning``s, the
    printed table): each warning by its first sentence (:func:`~mis_lightning._warning_lines.warning_line`),
    except the warnings that the rows' ``*`` mark stands for (:data:`STAR_WARNINGS`, matched to the
    phrases of :func:`failed_assumptions`): those are one entry, at the first one's place, starting
    with :data:`STAR_LINE` and naming each failed assumption by its phrase, as the ``*`` legend
    does, with what to do (or by its warning's headline, which names its likely causes, and where it
    suspects the training the cure, full-batch L-BFGS: :data:`MINIMUM_CURE`), after the lead where one
    failed, else a line each under it (``"\n    - "``); it ends in
    :data:`~mis_lightning._warning_lines.MORE` (each in full in the report). A failed assumption is thus in the table's mark, in its legend and in a console
    warning; nothing is dropped: a warning no phrase claims keeps its own line."""
    claimed: dict[int, None] = {}
    items: list[str] = []
    for phrase in failed_assumptions(rows):
        hits = [(i, todo) for start, lead, todo in STAR_WARNINGS if phrase.startswith(start)
                for i, w in enumerate(warnings) if w.startswith(lead)]
        if hits:
            claimed.update(dict.fromkeys(i for i, _ in hits))
            i, todo = hits[0]
            if todo is not None:
                items.append(f"{phrase} ({todo})")
                continue
            head = warning_line(warnings[i]).removesuffix(MORE).removeprefix("the model is ")
            # the cure that exists, where the headline suspects the training (nux56: not said)
            items.append(head + ("; to converge: full-batch L-BFGS on the objective assessed"
                                 if "not converged" in head else ""))
    out: list[str] = []
    for i, w in enumerate(warnings):
        if i not in claimed:
            out.append(warning_line(w))
        elif i == min(claimed):  # one assumption: one line; several: one each under the lead (ux56a: 372 characters)
            out.append(f"{STAR_LINE} {items[0]}{MORE}" if len(items) == 1
                       else STAR_LINE + "".join(f"\n    - {it}" for it in items) + MORE)
    return out


def not_trained_warning(how: str) -> str:
    """The report's first warning where the fit assessed took no optimizer step, ``how`` saying
    how that is known (e.g. ``"trainer.global_step is 0 and no training batch ran in this fit"``):
    begins with :data:`NOT_TRAINED`, then why the figures mean nothing and what to do instead."""
    return (f"{NOT_TRAINED}. {how} (max_epochs=0, limit_train_batches=0, or a fit stopped before its first "
            "step): this fit never trained the weights on these records (untrained, they leak nothing of them; "
            "trained elsewhere, on other records or with another loss), while the figures read the curvature and "
            "gradient spread as at a minimum of this loss on these records; "
            "no scheme is ranked. To assess a model trained elsewhere, pass it to mis_lightning.assess with the "
            "records and the loss it was trained on")


def undetermined_headline(rows: Iterable[Mapping[str, Any]]) -> str | None:
    """Why no figure of these rows ranks anything, in the words every front end uses (the
    verdict, the planner's choice, the callback's line): :data:`NOT_TRAINED` where a scored row
    is ``not_trained`` (the callback's fit took no optimizer step), else ``"the headline is
    undetermined (undet.: the unquantized figure moves 23% when the rank rule it is read with is
    set 100x finer)"`` where a scored row's baseline is :func:`headline_undetermined`, else ``None``."""
    rows = [r for r in rows if not r.get("error")]
    if any(r.get("not_trained") for r in rows):
        return NOT_TRAINED
    row = next((r for r in rows if headline_undetermined(r)), None)
    if row is None:
        return None
    return (f"the headline is undetermined (undet.: the unquantized figure moves "
            f"{100 * float(row['baseline_cutoff_sensitivity']):.0f}% when the rank rule it is read with "
            f"is set {CUTOFF_CHECK_FACTOR:.0f}x finer)")


def scale_symmetric(diagnostics: Mapping[str, Any] | None) -> bool:
    """Whether the diagonal estimator read layers with a scale symmetry (its diagnostics'
    ``normalised_layers`` or ``weight_normed_layers``; estimation/symmetries.py): the report's
    rows are then marked ``?`` in the table and a warning says why."""
    return bool(diagnostics) and bool(diagnostics.get("normalised_layers") or diagnostics.get("weight_normed_layers"))


def above_baseline(row: dict[str, Any]) -> bool:
    """Whether a row's leakage exceeds its unquantized baseline by more than
    :data:`CONSISTENCY_TOLERANCE` (impossible for a real release: the figure is unreliable)."""
    lk, base = row.get("leakage"), row.get("baseline_leakage")
    if lk is None or base is None:
        return False
    lk, base = float(lk), float(base)
    return math.isfinite(lk) and math.isfinite(base) and lk > base * (1 + CONSISTENCY_TOLERANCE)


def independent_column(rows: list[dict[str, Any]]) -> bool:
    """Whether the table shows ``indep.``, each scheme's independent-coordinate leakage: some
    row carries it (:meth:`Report.rows`, where the correlated headline does not rank some schemes:
    ``diagnostics["headline_unranked"]``, assess.headline_unranked)."""
    return any(r.get("leakage_independent") is not None for r in rows if not r.get("error"))


def whole_model_column(rows: list[dict[str, Any]]) -> bool:
    """Whether the table shows ``model b/w``: some row's model has weights outside the
    assessment (a frozen backbone, ``params=``), so the assessed weights' ``bits/w`` is not the
    size of the model each scheme releases (``SchemeResult.model_bits_per_weight``)."""
    for r in rows:
        try:
            if not r.get("error") and float(r["model_d"]) > float(r["d"]):  # NaN: a row without it
                return True
        except (KeyError, TypeError, ValueError):
            continue
    return False


def zeros(row: Mapping[str, Any]) -> Any:
    """A row's zero fraction (``sparsity`` in reports before it was renamed)."""
    return row.get("zero_fraction", row.get("sparsity"))


#: the figure columns of a table, by row key (``interval``: both ends, ``zeros``: :func:`zeros`)
FIGURE_COLUMNS = ("leakage", "leakage_independent", "interval", "mis", "pool_leakage", "baseline_leakage", "d_eff",
                  "zeros")


def column_formats(rows: Sequence[Mapping[str, Any]], utility_keys: Sequence[str | None] | str | None = (),
                   extra: int = 0) -> dict[str, Callable[[Any], str]]:
    """The formatter of each figure column of ``rows`` (:data:`FIGURE_COLUMNS`: :func:`column_format`;
    ``d_eff``: :func:`count_format`; ``zeros``: :func:`share_format`) and of each utility key (with
    ``extra`` digits, at least :func:`significant_extra`'s), over the rows without an error."""
    ok = [r for r in rows if not r.get("error")]
    keys = [utility_keys] if isinstance(utility_keys, str) or utility_keys is None else list(utility_keys)

    def values(key: str) -> list[Any]:
        if key == "interval":
            return [r.get(k) for r in ok if has_interval(r) for k in ("leakage_p10", "leakage_p90")]
        return [zeros(r) if key == "zeros" else r.get(key) for r in ok]

    out = {k: column_format(values(k)) for k in FIGURE_COLUMNS}
    out["d_eff"] = count_format(values("d_eff"))  # a near-count: 1004.2, not 1004.2399
    out["zeros"] = share_format  # a share: 29.1%, as the float column
    out.update({k: column_format(values(k), max(extra, significant_extra(values(k)))) for k in keys if k})
    return out


def _fmt_bits(v: Any) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.2f}"


def short_names(names: Sequence[str], limit: int) -> dict[str, str]:
    """``{name: shortened}`` for the names longer than ``limit`` characters: the longest of its
    ``_``-separated words cut to their first 3 letters, one at a time, until it fits
    (``int8_dynamic_activation_int8_weight`` -> ``int8_dyn_act_int8_wei`` at 21 to 23,
    ``int8_dynamic_act_int8_weight`` at 28), else (one word, or 3-letter words) cut at
    ``limit - 1`` and ``~`` appended; a shortened name that equals another name, or another's
    shortened name, gets ``~<k>`` (k = 2, 3, ...) in place of its last characters. Never names a
    name ``limit`` fits: those are not in the mapping."""
    out: dict[str, str] = {}
    taken = {n for n in names if len(n) <= limit}
    for name in names:
        if len(name) <= limit or name in out:
            continue
        words = name.split("_")
        while len(words) > 1 and len("_".join(words)) > limit and max(len(w) for w in words) > 3:
            k = max(range(len(words)), key=lambda i: (len(words[i]), -i))
            words[k] = words[k][:3]  # an abbreviation a reader completes (dyn, act, wei), not a word cut short
        short = "_".join(words)
        if len(short) > limit:
            short = short[:limit - 1] + "~"
        k = 2
        base = short
        while short in taken:
            tag = f"~{k}"
            short, k = base[:limit - len(tag)] + tag, k + 1
        out[name] = short
        taken.add(short)
    return out


#: the width the app's printed table fits (``Report.table(width=...)``; cv53: 130 columns with
#: ``int8_dynamic_activation_int8_weight``, 35 characters)
CONSOLE_WIDTH = 100
#: the fixed columns' legend in a table printed at a terminal's width (``Report.table(width=...)``):
#: what leakage is and where every column is explained (``where``: the table in full)
CONSOLE_LEGEND = ("legend: leakage = advantage of the best membership-inference attack on the released weights "
                  "(0 = none, 1 = always right; lower is safer; MIS = 1 - leakage); 80% interval: its uncertainty "
                  "(overlapping = not clearly different{pos}){float}; every column explained in {where}.")
#: the narrowest scheme column :func:`format_table` shortens names to where ``width`` is given
MIN_NAME_WIDTH = 12


def format_table(rows: list[dict[str, Any]], utility_key: str | None = None,
                 utility_tolerance: float = UTILITY_TOLERANCE, modes: Mapping[str, str] | None = None,
                 width: int | None = None) -> str:
    """Plain-text table of :meth:`Report.rows`.

    Each figure column prints in one notation (:func:`column_format`): 4 decimals, or 4
    significant digits in exponent notation throughout where one of its values is below 1e-3 or
    from 1e5; ``d_eff`` as a count (:func:`count_format`: ``1004.2``), ``float`` and ``zeros`` as
    percentages (:func:`share_format`). The utility column has 4 decimals, or as many more as show
    its smallest value to 4 significant digits and tell the rows inside the verdict's utility
    band (``utility_tolerance``, relative, of the best) from those outside it
    (:func:`utility_digits`).

    A failed scheme's row shows ``error: <message>`` across the figure columns where the message
    fits their width (it does not widen them), else ``error: see "errors:" below`` and the message
    follows the table under ``errors:``: each message once.

    ``width`` (a terminal's columns, e.g. :data:`CONSOLE_WIDTH`; ``None``: every column, as the
    files print it): the two columns a reader derives are left out, ``MIS`` (1 - leakage) and
    ``baseline`` where every row prints the same one (said on a line under the table), and the
    scheme names longer than what the other columns leave (at least :data:`MIN_NAME_WIDTH`) are
    shortened (:func:`short_names`) with their full names on a ``names:`` line under the table.
    A table whose other columns alone are wider (``indep.``, ``model b/w``) stays wider.
    """
    uk = pick_utility_key(rows, utility_key, modes)
    check_utility_key_measured(rows, utility_key, uk)
    extra = utility_digits(rows, utility_key, utility_tolerance, modes)
    whole = whole_model_column(rows)
    indep = independent_column(rows)
    fmt = column_formats(rows, uk, extra)  # one notation per column
    scored = [r for r in rows if not r.get("error")]
    bases = {fmt["baseline_leakage"](r["baseline_leakage"]) + baseline_marks(r) for r in scored}
    # the console's table (cv53): the derived columns out, the baseline once where it is one figure
    mis_col, base_col = width is None, width is None or len(bases) != 1
    head = ["scheme", "bits/w", "float"] + (["model b/w"] if whole else []) + (
        [uk.removeprefix("utility_")] if uk else []) + [
        "leakage"] + (["indep."] if indep else []) + [
        "80% interval"] + (["MIS"] if mis_col else []) + ["pool"] + (["baseline"] if base_col else []) + [
        "d_eff", "zeros"]  # zero_fraction
    body: list[list[str] | tuple[str, str]] = []
    for r in rows:
        label = str(r["scheme"]) + scheme_marks(r) + (f" ({r['note']})" if r.get("note") else "")
        if r.get("error"):
            body.append((label, str(r["error"])))
            continue
        interval = "-" if not has_interval(r) else \
            f"[{fmt['interval'](r['leakage_p10'])}, {fmt['interval'](r['leakage_p90'])}]"
        if interval != "-" and r.get("interval_regime") == "position-dominated":
            interval += " pos."  # the range over where few coarse weights' true values sit
        ff = r.get("float_fraction")  # share of assessed weights left in float (kappa = 1)
        pool = r.get("pool_leakage")
        body.append([label, f"{r['bits_per_weight']:.2f}",
                     share_format(ff)] + (
            [_fmt_bits(r.get("model_bits_per_weight"))] if whole else []) + (
            [UTILITY_FAILED if r.get("utility_error") else fmt[uk](r.get(uk))] if uk else []) + [
            fmt["leakage"](r["leakage"]) + leakage_marks(r)] + (
            [fmt["leakage_independent"](r.get("leakage_independent"))] if indep else []) + [
            interval] + ([fmt["mis"](r["mis"])] if mis_col else []) + [
            "-" if pool is None or (isinstance(pool, float) and math.isnan(pool)) else fmt["pool_leakage"](pool)] + (
            [fmt["baseline_leakage"](r["baseline_leakage"]) + baseline_marks(r)] if base_col else []) + [
            fmt["d_eff"](r["d_eff"]), fmt["zeros"](zeros(r))])
    under = []
    if not base_col:
        under.append(f"baseline (the unquantized model's leakage): {next(iter(bases))} on every row")
    if width is not None:
        rest = [max(len(str(c[i])) for c in [head] + [b for b in body if isinstance(b, list)])
                for i in range(1, len(head))]
        limit = max(width - sum(rest) - 2 * len(rest), MIN_NAME_WIDTH)
        short = short_names([b[0] if isinstance(b, tuple) else b[0] for b in body], limit)
        if short:
            body = [(short.get(b[0], b[0]), b[1]) if isinstance(b, tuple) else [short.get(b[0], b[0]), *b[1:]]
                    for b in body]
            under.append("names: " + "; ".join(f"{v} = {k}" for k, v in short.items()))
    cols = [head] + [b for b in body if isinstance(b, list)] + [[b[0]] for b in body if isinstance(b, tuple)]
    widths = [max(len(str(c[i])) for c in cols if i < len(c)) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    # An error spans the figure columns: the table keeps the width of its figures.
    room = max(sum(widths[1:]) + 2 * (len(widths) - 2) - len("error: "), 30)
    lines = [line(head), line(["-" * w for w in widths])]
    errors = []
    for b in body:
        if isinstance(b, tuple):
            # each message said once (ux49: the row said it cut, "errors:" in full): in the row
            # where it fits, else under the table, the row pointing there
            msg = " ".join(str(b[1]).split())
            lines.append(f"{b[0].ljust(widths[0])}  error: {msg if len(msg) <= room else ERROR_BELOW}")
            if len(msg) > room:
                errors.append((b[0], b[1]))
        else:
            lines.append(line(b))
    lines += [wrap_entry(u, width) for u in under]  # (only with width: the console's table)
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


def merge_identical(rows: list[dict[str, Any]], x_key: str | None) -> list[tuple[dict[str, Any], str]]:
    """``(row, label)`` per distinct result: rows with the same ``x_key`` value (default: bits
    per weight), leakage and
    interval (rounded to 1e-6) share one entry labelled ``"a = b"`` (drawn separately, one would
    hide the other; e.g. int8 weight-only and int8 dynamic on the same grid)."""
    groups: dict[tuple[float, ...], list[dict[str, Any]]] = {}
    for r in rows:
        x = r.get(x_key or "bits_per_weight")
        ends = (r.get("leakage_p10"), r.get("leakage_p90")) if has_interval(r) else (None, None)
        key = tuple(round(float(v), 6) if v is not None else None for v in (x, r["leakage"], *ends))
        groups.setdefault(key, []).append(r)
    return [(rs[0], " = ".join(str(r["scheme"]) for r in rs)) for rs in groups.values()]


def figure_notes(fig: Any, warnings: Sequence[str], notes: Sequence[str] = (),
                 in_full: str | None = None) -> None:
    """``warnings`` (lines as given: the console's, :func:`console_warnings`), wrapped, in red
    under the panels (the figure grows to hold them), after ``notes`` (e.g. the schemes not ranked
    beyond their intervals, what the marks mean) in black, each entry's first line after
    ``"warning: "`` / ``"note: "``, an entry's own lines (the ``*`` entry's, ``"\n    - "``) kept;
    then, where ``in_full`` is given, one red line ``"each warning in full: <in_full>"``. The
    privacy-utility figure's, a sweep's ``frontier.png`` and the planner's figure. ``fig`` needs a
    layout engine (``layout="constrained"``)."""
    def wrap(items: Sequence[str], head: str) -> list[str]:
        out: list[str] = []
        for w in items:
            for k, part in enumerate(str(w).split("\n")):  # the * entry: its lead, then "- " a line each
                first, rest = (head, "    ") if k == 0 else ("    ", "      ")
                out += textwrap.wrap(" ".join(part.split()), 130 + len(first), initial_indent=first,
                                     subsequent_indent=rest, break_on_hyphens=False)  # "full-batch" whole
        return out

    first, lines = wrap(notes, "note: "), wrap(warnings, "warning: ")
    if in_full is not None and lines:
        lines += textwrap.wrap(f"each warning in full: {in_full}", 130, subsequent_indent="    ")
    w, h = fig.get_size_inches()
    extra = 0.17 * (len(first) + len(lines)) + 0.15
    fig.set_size_inches(w, h + extra)
    fig.get_layout_engine().set(rect=(0, extra / (h + extra), 1, 1 - extra / (h + extra)))
    top = extra / (h + extra) - 0.02
    if first:
        fig.text(0.01, top, "\n".join(first), ha="left", va="top", fontsize=7, color="black",
                 family="monospace")
    if lines:  # below the notes: one line of 7 pt is about 0.17 in
        fig.text(0.01, top - 0.17 * len(first) / (h + extra), "\n".join(lines), ha="left", va="top",
                 fontsize=7, color="firebrick", family="monospace")


def privacy_utility_figure(rows: list[dict[str, Any]], path: str | Path | None = None,
                           utility_key: str | None = None, warnings: Sequence[str] = (),
                           modes: Mapping[str, str] | None = None, warnings_in_full: str = WARNINGS_IN_FULL):
    """A matplotlib Figure of two aligned panels, one row per distinct result, sorted by
    leakage (safest on top): left, the leakage with its 80% interval and the unquantized
    baseline (dashed); right, the utility of the same scheme (bits per weight when no utility
    was measured). Schemes with identical figures share one row labelled ``"a = b"``; each
    row's label carries its bits per weight and the table's marks (:func:`scheme_marks` after each
    name, :func:`leakage_marks` after the label, explained by :func:`marks_legend`'s lines under the
    panels). ``warnings`` (the report's) are printed under the panels as the console prints them
    (:func:`console_warnings`: each by its first sentence, those the ``*`` mark stands for in one
    entry naming each), with a line saying where each is in full (``warnings_in_full``; only where
    a line leaves text out): a figure is often shared without the table, and its figures then
    carry every caveat's headline (the full text drew ~0.75 s of glyphs on a report of five
    warnings: docs/benchmarks.md "fg59"); so is the line naming the schemes not ranked beyond
    their intervals (:func:`ties_line`). Saved if ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    uk = pick_utility_key(rows, utility_key, modes)
    ok = [r for r in rows if not r.get("error") and r.get("leakage") is not None]
    # each scheme's own mark after its name (^: merged rows can differ in it), as in the table (ux55b)
    points = sorted(merge_identical([{**r, "scheme": f"{r['scheme']}{scheme_marks(r)}"} for r in ok], uk),
                    key=lambda p: (p[0]["leakage"], p[1]))
    height = 1.6 + 0.42 * max(len(points), 2)
    fig, (ax, ax_u) = plt.subplots(1, 2, figsize=(10.0, height), sharey=True,
                                   gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    if not points:  # every scheme failed: say so rather than draw empty axes
        ax_u.remove()
        no_points_note(ax, rows)
        ax.set_xlabel(f"{uk.removeprefix('utility_')} (validation)" if uk else "bits per weight")
        ax.set_title("Privacy-utility trade-off of quantization schemes")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig
    ys = list(range(len(points)))
    # the table's marks after each label (nux54: the figure showed no '*', only the warnings' text)
    names = [f"{name}  ({r['bits_per_weight']:.2f} b/w){leakage_marks(r)}" for r, name in points]
    for y, (r, _) in zip(ys, points):
        x = r["leakage"]
        if has_interval(r):
            ax.errorbar([x], [y], xerr=[[max(x - r["leakage_p10"], 0)], [max(r["leakage_p90"] - x, 0)]],
                        fmt="o", color="C0", capsize=3)
        else:
            ax.plot([x], [y], "o", color="C0")
    base = ok[0].get("baseline_leakage")
    if base is not None:
        ax.axvline(base, ls="--", color="gray", lw=1,
                   label=f"unquantized baseline ({_fmt(base)}{baseline_marks(ok[0])})")
        fig.legend(loc="outside upper right", fontsize=8, frameon=False)  # never over a point
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(len(points) - 0.5, -0.5)  # safest on top
    ax.set_xlabel("leakage = 1 - MIS (lower is safer)\nbars: 80% interval")
    ax.grid(axis="x", alpha=0.3)
    # right panel: utility of the same rows (bits per weight when none was measured)
    ukey = uk or "bits_per_weight"
    vals = [r.get(ukey) for r, _ in points]
    # points, not bars: the axis is zoomed in on the differences, so bar lengths would mislead
    ax_u.plot([v for v in vals if v is not None], [y for y, v in zip(ys, vals) if v is not None],
              "s", color="C1")
    finite = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    for y, v in zip(ys, vals):
        if v is not None:
            ax_u.annotate(_fmt(float(v)), (float(v), y), xytext=(7, 0), textcoords="offset points",
                          va="center", fontsize=7)
    if finite and uk:  # zoom in on the differences (bars from 0 would hide them)
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.05
        ax_u.set_xlim(lo - pad, hi + 3 * pad)
    if uk:
        better = "higher" if higher_is_better(uk, modes) else "lower"
        ax_u.set_xlabel(f"{uk.removeprefix('utility_')} (validation; {better} is better)")
    else:
        ax_u.set_xlabel("bits per weight (no utility measured)")
    ax_u.tick_params(axis="y", left=False)
    ax_u.grid(axis="x", alpha=0.3)
    # an undetermined headline (undet.) ranks nothing: the order by leakage is no "safest on top"
    order = "by leakage: the headline is undetermined, none ranked" if undetermined_headline(ok) else "safest on top"
    fig.suptitle(f"Privacy-utility trade-off of quantization schemes ({order})", fontsize=11,
                 x=0.02, ha="left")
    ties = ties_line(ok)  # "safest on top" is no ranking where the intervals do not resolve it
    notes = ([ties] if ties else []) + [ln.strip() for ln in marks_legend(ok)]  # what the labels' marks mean
    if warnings or notes:
        lines = console_warnings(warnings, rows)
        figure_notes(fig, lines, notes, in_full=warnings_in_full if lines != list(warnings) else None)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
