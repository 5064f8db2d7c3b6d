"""One validated configuration per stage: :class:`EstimationConfig` and :class:`ScoringConfig`.

Every front end (:func:`~mis_lightning.assess.assess`, :func:`~mis_lightning.assess.score_schemes`,
:class:`~mis_lightning.metric.MISIndicator`, :class:`~mis_lightning.callback.MISCallback`, the
Hydra app through ``conf/mis/*.yaml`` and ``_target_``) takes these two frozen dataclasses; each
option is declared (with its default, its check and its documentation) once, here. The old
keyword arguments (``assess(..., num_records=64, method="mc")``) still work: they are the field
names, split between the two configs by :func:`stage_configs`.

Example:

>>> from mis_lightning.config import EstimationConfig, ScoringConfig, stage_configs
>>> EstimationConfig(num_records=64).num_records
64
>>> est, sc, rest = stage_configs("assess", None, None, {"estimation": "exact", "method": "clt"})
>>> est.mode, sc.method, rest
('exact', 'clt', {})
>>> ScoringConfig(method="bogus")
Traceback (most recent call last):
...
ValueError: method must be 'auto', 'mc', 'clt' or 'exact1d', got 'bogus'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ._fields import CheckedFields, did_you_mean
from ._user_warnings import warn
from .report import UTILITY_TOLERANCE

__all__ = ["DEFAULT_CHUNK", "EstimationConfig", "ScoringConfig", "compile_policy_from_env",
           "scoring_only", "stage_configs"]

DEFAULT_CHUNK = 1 << 18  # weights per chunk of the cell computations (memory bound)
ParamSelection = Sequence[str] | Callable[[str, Tensor], bool] | None

MODES = ("auto", "exact", "diagonal")
HESSIANS = ("auto", "exact", "ggn", "ggn_mc", "hutchinson", "ggn_residual")
METHODS = ("auto", "mc", "clt", "exact1d")
COMPILE_POLICIES = ("auto", "always", "never")
COVARIANCE_FORMS = ("auto", "full", "factor", "independent")


def _or_list(values: Sequence[str]) -> str:
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}an integer >= {low}, got {value!r}")


def _check_bool(name: str, value: Any) -> bool:
    # bool(value) would read strict="no" as True: a string or None is refused, not coerced
    if isinstance(value, str) or value not in (True, False):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# what each user function is called with: named in the error when one is not callable
USER_FUNCTIONS = {
    "loss_fn": "loss_fn(outputs, targets) -> per-sample losses [B]",
    "batch_fn": "batch_fn(batch) -> (inputs, targets)",
    "output_transform": "output_transform(outputs) -> outputs",
}


def check_user_functions(**fns: Any) -> None:
    """Refuse a user function that is not callable, naming it, before any record is read
    (otherwise the first batch fails as "'int' object is not callable", without its name).

    Args:
        fns: ``loss_fn=``, ``batch_fn=``, ``output_transform=``; ``None`` values are skipped.

    Raises:
        TypeError: a value that is neither ``None`` nor callable (names the argument).
    """
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable: {USER_FUNCTIONS[name]}, got {type(fn).__name__}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be {_or_list(choices)}, got {value!r}")


COMPILE_ENV = "MIS_LIGHTNING_COMPILE"


def compile_policy_from_env() -> str:
    """The kernel compile policy from ``MIS_LIGHTNING_COMPILE`` (read once, when a
    :class:`ScoringConfig` is built without ``compile``; the math never reads the environment):
    ``1``/``true``/``yes``/``on``/``always`` -> ``"always"``, ``auto`` or unset -> ``"auto"``,
    ``0``/``false``/``no``/``off``/``never`` -> ``"never"``.

    Raises:
        ValueError: any other value (the message names the variable).
    """
    from .functional.kernel import CompilePolicy

    return CompilePolicy.parse(os.environ.get(COMPILE_ENV), source=COMPILE_ENV).mode


# The finite-sample (leverage) correction by default, both estimators (method.md section 4); the
# one place that sets it (MomentAccumulator, estimate and every front end read it from here).
DEFAULT_LEVERAGE_CORRECTION: bool | str = "auto"


def check_weight_decay(wd: Any) -> float | dict[str, float]:
    """A weight decay option as a float, or a ``{parameter name: float}`` mapping (Hydra's
    DictConfig too), each value a number >= 0.

    Raises:
        ValueError: a value that is not a number >= 0 (naming the parameter for a mapping).
    """
    if isinstance(wd, Mapping):
        out = {}
        for k, v in wd.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) >= 0:
                raise ValueError(f"weight_decay[{k!r}] must be a number >= 0, got {v!r}")
            out[str(k)] = float(v)
        return out
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not float(wd) >= 0:
        raise ValueError(f"weight_decay must be None, a number >= 0 or a mapping {{parameter name: number}}, "
                         f"got {wd!r}")
    return float(wd)


@dataclass(frozen=True)
class EstimationConfig(CheckedFields):
    """Options of the estimation pass (``sigma`` and the influences ``w``; method.md section 4).

    Args:
        mode: ``"exact"`` sandwich, ``"diagonal"`` or ``"auto"`` (exact up to 2,000 parameters
            where it is cheap: for models with weight-reuse layers the first batch measures
            the forward, :func:`~mis_lightning.estimation.estimate.choose_estimator`). Front ends
            also take it as ``estimation=``.
        hessian: diagonal mode's Hessian: ``"exact"``, ``"ggn"`` (exact Gauss-Newton diagonal),
            ``"ggn_mc"`` (sampled-label Monte Carlo Gauss-Newton: one backward pass per draw
            instead of one per output direction; its error in ``diagnostics``), ``"hutchinson"``
            or ``"auto"`` (``"ggn_mc"`` where the exact one needs more than 3 directions per
            record, e.g. cross-entropy over 5 or more classes, on the per-layer path). With
            ``mode="exact"``, ``"ggn"`` is the exact sandwich with the whole Gauss-Newton
            Hessian (full correlation from the model's first derivatives; method.md section 4),
            ``"ggn_residual"`` the exact Hessian assembled as Gauss-Newton + the residual term's
            columns off the largest module (zero there for models piecewise linear in each
            module's weights, checked on the first batch; what ``"auto"`` runs on such CNNs
            where the exact Hessian's own columns cost too much; ``mode="exact"`` only), any
            other value the exact Hessian.
        weight_decay: L2 coefficient of the objective ``mean loss + wd / 2 |theta|^2``
            (dimensionless, >= 0), or ``{parameter name: coefficient}`` for a penalty that
            differs by parameter (e.g. none on biases and norms; parameters not named: 0);
            ``None``: the model's numeric ``weight_decay`` attribute, else 0 (see
            :meth:`resolved_weight_decay`).
        num_records: records ``z`` over which the leakage is averaged (>= 1).
        params: names of the parameters to assess, or ``predicate(name, param) -> bool``;
            ``None``: every parameter with ``requires_grad``.
        budget: floats held at once in per-sample buffers (``None``: the estimator's default,
            2^25); above ``num_records * d > budget`` influences are streamed, not stored.
        use_factors: the factored path for ``nn.Linear`` layers where possible (same numbers).
        hutchinson_probes: Rademacher probes per batch for ``hessian="hutchinson"``.
        ggn_mc_samples: sampled labels per record for ``hessian="ggn_mc"`` (>= 1; the Monte
            Carlo variance falls as 1 / ggn_mc_samples).
        leverage_correction: the finite-sample (leverage) correction (method.md section 4,
            "Finite-sample (leverage) correction"). The exact estimator: each stored record's
            influence becomes its leave-one-out shift ``H_{-i}^{-1} g_i`` (``psi_i / (1 - h_i)``
            for one output) and the gradient covariance gets the HC2 term. The leverages use
            each record's exact Hessian on the span of its output gradients, so they do not
            depend on where the model's output ends (a sigmoid in ``forward`` or in the loss); a
            model without per-record second derivatives (``EmbeddingBag``) gets the Gauss-Newton
            factors and a warning saying so. The diagonal estimator (every front end, the
            large-model path included): one mean leverage per loss direction from its Hessian
            diagonal, ``h_bar = sum_j H_data_jj / H_jj / (n rank(L))`` (an approximation: exact
            for least squares without weight decay, at or above the exact mean for a
            Gauss-Newton Hessian; capped at 0.95), and ``V_jj / (1 - h_bar)``: sigma and every
            standardised influence times ``1 / sqrt(1 - h_bar)``, the spread term at ``h_bar``.
            ``"auto"`` (default): wherever the diagonal estimator runs, and wherever the exact
            one runs with the per-record factors (the model's output is one tensor; with a
            ``mis_per_sample_loss`` hook, the model called once inside it and the loss a
            function of that output); ``True``: required (an error where the exact estimator's
            factors are unavailable); ``False``: the first-order forms. The leverages
            (``diagnostics["mean_leverage"]``; the exact estimator's ``["max_leverage"]``, the
            diagonal one's ``["leverage_per_direction"]``) are reported either way.

    Raises:
        ValueError: an option outside its range or choices (the message names the option).
        TypeError: ``params`` is neither a list of names, a callable nor ``None``.
    """

    mode: str = "auto"
    hessian: str = "auto"
    weight_decay: float | Mapping[str, float] | None = 0.0
    num_records: int = 512
    params: ParamSelection = None
    budget: int | None = None
    use_factors: bool = True
    hutchinson_probes: int = 8
    ggn_mc_samples: int = 1
    leverage_correction: bool | str = DEFAULT_LEVERAGE_CORRECTION

    def __post_init__(self) -> None:
        _check_choice("estimation (mode)", self.mode, MODES)
        lc = self.leverage_correction
        if not (isinstance(lc, bool) or (isinstance(lc, str) and lc == "auto")):
            raise ValueError(f"leverage_correction must be True, False or 'auto', got {self.leverage_correction!r}")
        _check_choice("hessian", self.hessian, HESSIANS)
        if self.weight_decay is not None:
            object.__setattr__(self, "weight_decay", check_weight_decay(self.weight_decay))
        _check_int("num_records", self.num_records, 1)
        _check_int("budget", self.budget, 1, allow_none=True)
        _check_int("hutchinson_probes", self.hutchinson_probes, 1)
        _check_int("ggn_mc_samples", self.ggn_mc_samples, 1)
        object.__setattr__(self, "use_factors", _check_bool("use_factors", self.use_factors))
        p = self.params
        if p is not None and not callable(p):
            if isinstance(p, str) or not hasattr(p, "__iter__"):
                raise TypeError(f"params must be a list of parameter names, a predicate "
                                f"(name, param) -> bool or None, got {p!r}")
            object.__setattr__(self, "params", tuple(str(n) for n in p))  # Hydra ListConfig too

    def resolved_weight_decay(self, model: Any) -> float | dict[str, float]:
        """``weight_decay`` (a per-parameter mapping as given: the estimator checks its names),
        or for ``None`` the model's numeric ``weight_decay`` attribute (else 0.0)."""
        if isinstance(self.weight_decay, Mapping):
            return dict(self.weight_decay)
        if self.weight_decay is not None:
            return self.weight_decay
        attr = getattr(model, "weight_decay", None)
        return float(attr) if isinstance(attr, (int, float)) and not isinstance(attr, bool) else 0.0

    def estimator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~mis_lightning.estimation.estimate` /
        ``MomentAccumulator`` (without ``param_names`` and ``weight_decay``, which need the
        model)."""
        out: dict[str, Any] = {"mode": self.mode, "hessian": self.hessian,
                               "num_records": self.num_records, "use_factors": self.use_factors,
                               "hutchinson_probes": self.hutchinson_probes,
                               "ggn_mc_samples": self.ggn_mc_samples,
                               "leverage_correction": self.leverage_correction}
        if self.budget is not None:
            out["budget"] = self.budget
        return out


@dataclass(frozen=True)
class ScoringConfig(CheckedFields):
    """Options of the scoring stage (per scheme: cell moments, leakage, interval; method.md
    sections 3, 5 and 7).

    Args:
        method: ``"auto"``, ``"mc"``, ``"clt"`` or ``"exact1d"`` (see ``functional.leakage``).
        uncertainty_draws: parametric-bootstrap draws for the (p10, p90) interval (0: none).
        mc_draws: Monte Carlo draws when that form is used; ``None``: as many as the cost and
            memory budgets allow (1,024 to 32,768; standard error ~ 1/sqrt(draws)). Front ends
            also take the old name ``num_samples=`` (deprecated).
        seed: seed of every random draw of the scoring (and of the estimation's probes).
        strict: raise on a failing scheme; otherwise the report records the error.
        chunk_size: weights per chunk of the cell computations (memory bound, >= 1).
        compile: ``torch.compile`` of the fused cell kernel: ``"auto"`` (after enough
            elements), ``"always"`` or ``"never"``; default from ``MIS_LIGHTNING_COMPILE``,
            read once here (:func:`compile_policy_from_env`) and passed down to the math.
        covariance: how the headline treats the correlation of the weights (method.md
            section 3, "Correlated coordinates"): ``"auto"`` (the full correlation where the
            exact estimator ran, else a factor model from the stored records' influences,
            else independent coordinates), ``"full"``, ``"factor"`` or ``"independent"``
            (the diagonal form of earlier versions). The report says which form was used.
        factor_rank: principal directions of the factor model (``covariance="factor"``, >= 1).
        utility_key: the utility metric the table's verdict and the figure rank by (``"loss"``,
            the mean per-sample loss, or a name of the front end's utility metrics, with or
            without a ``val_`` prefix); ``None``: the first of rmse, auroc, accuracy, loss.
        utility_mode: its direction, as Lightning's ``ModelCheckpoint(mode=...)``: ``"max"``
            (higher is better) or ``"min"``; ``None``: the metric object's own
            ``higher_is_better`` (torchmetrics), else the name (``report.known_mode``: accuracy,
            f1, top1, auroc... and rmse, mae, loss, ``*_loss``... after a ``val_`` / ``test_``
            prefix); a metric none of these knows is refused before training
            (``assess.check_utility_metric``), never guessed.
        utility_tolerance: the verdict's utility band, relative to the best scheme's utility
            (``0.05``: schemes within 5% of the best are eligible; >= 0): the report keeps it, and
            its table, the app's ``report.md`` and a sweep's aggregate verdicts use it
            (``report.table(utility_tolerance=...)`` overrides it for one table).

    Raises:
        ValueError: an option outside its range or choices (the message names the option).
    """

    method: str = "auto"
    uncertainty_draws: int = 16
    mc_draws: int | None = None
    seed: int = 0
    strict: bool = True
    chunk_size: int = DEFAULT_CHUNK
    compile: str = field(default_factory=compile_policy_from_env)
    covariance: str = "auto"
    factor_rank: int = 64
    utility_key: str | None = None
    utility_mode: str | None = None
    utility_tolerance: float = UTILITY_TOLERANCE

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("covariance", self.covariance, COVARIANCE_FORMS)
        _check_int("factor_rank", self.factor_rank, 1)
        _check_int("uncertainty_draws", self.uncertainty_draws, 0)
        _check_int("mc_draws", self.mc_draws, 1, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_int("chunk_size", self.chunk_size, 1)
        _check_choice("compile", self.compile, COMPILE_POLICIES)
        object.__setattr__(self, "strict", _check_bool("strict", self.strict))
        if self.utility_key is not None and (not isinstance(self.utility_key, str) or not self.utility_key):
            raise ValueError(f"utility_key must be None or a metric name, got {self.utility_key!r}")
        if self.utility_mode is not None:
            _check_choice("utility_mode", self.utility_mode, ("min", "max"))
            if self.utility_key is None:
                raise ValueError(f"utility_mode={self.utility_mode!r} needs utility_key= (the metric it is the "
                                 "direction of), as Lightning's ModelCheckpoint(monitor=..., mode=...)")
        tol = self.utility_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol == float("inf"):
            raise ValueError(f"utility_tolerance must be a finite number >= 0 (0.05: within 5% of the best "
                             f"scheme's utility), got {tol!r}")
        object.__setattr__(self, "utility_tolerance", float(tol))


# Old keyword names -> (field, deprecated). ``estimation=`` stays the front ends' documented name.
ALIASES: dict[str, tuple[str, bool]] = {"estimation": ("mode", False), "num_samples": ("mc_draws", True)}
_EST_FIELDS = frozenset(f.name for f in dataclasses.fields(EstimationConfig))
_SC_FIELDS = frozenset(f.name for f in dataclasses.fields(ScoringConfig))
# the same names for the configs built directly: EstimationConfig(estimation=...) names mode=
EstimationConfig.FIELD_ALIASES = {k: f for k, (f, _) in ALIASES.items() if f in _EST_FIELDS}
ScoringConfig.FIELD_ALIASES = {k: f for k, (f, _) in ALIASES.items() if f in _SC_FIELDS}


def stage_configs(
    where: str,
    estimation_config: EstimationConfig | None,
    scoring_config: ScoringConfig | None,
    options: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> tuple[EstimationConfig, ScoringConfig, dict[str, Any]]:
    """Both stage configs from a front end's arguments.

    ``options`` are keyword arguments named after config fields (or :data:`ALIASES`); they
    override the given configs (or the defaults: the front end's own ``defaults``, e.g.
    ``{"strict": False}``, then the dataclasses'). Keys that are no field are returned.

    Raises:
        TypeError: a config argument of the wrong type, or an option given under both its
            name and its old name.
        ValueError: an invalid option value (from the dataclasses' checks).
    """
    for arg, val, cls in (("estimation_config", estimation_config, EstimationConfig),
                          ("scoring_config", scoring_config, ScoringConfig)):
        if val is not None and not isinstance(val, cls):
            raise TypeError(f"{where}: {arg} must be a {cls.__name__}, got {type(val).__name__}")
    est: dict[str, Any] = {}
    sc: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in options.items():
        name = key
        if key in ALIASES:
            name, deprecated = ALIASES[key]
            if name in options:
                raise TypeError(f"{where}: give {name}= or {key}=, not both")
            if deprecated:
                warn(f"{where}: {key}= is deprecated, use {name}=", DeprecationWarning)
        if name in _EST_FIELDS:
            est[name] = value
        elif name in _SC_FIELDS:
            sc[name] = value
        else:
            rest[key] = value
    base = dict(defaults or {})
    if estimation_config is None:
        e = EstimationConfig(**{**{k: v for k, v in base.items() if k in _EST_FIELDS}, **est})
    else:
        e = dataclasses.replace(estimation_config, **est) if est else estimation_config
    if scoring_config is None:
        s = ScoringConfig(**{**{k: v for k, v in base.items() if k in _SC_FIELDS}, **sc})
    else:
        s = dataclasses.replace(scoring_config, **sc) if sc else scoring_config
    return e, s, rest


# The same argument under each front end's own keyword: the torchmetrics objects that measure
# the quantized copies' utility are ``metrics=`` to assess() and plan() and ``utility_metrics=`` to
# MISCallback (beside its other ``utility_*`` options). A keyword of one front end passed to
# another is named with this one's (nux49: assess(utility_metrics=...) suggested utility_mode).
KEYWORD_SYNONYMS: dict[str, str] = {"utility_metrics": "metrics", "metrics": "utility_metrics"}


def unexpected_options(where: str, rest: Iterable[str], what: str = "the fields of EstimationConfig and ScoringConfig",
                       known: Iterable[str] = ()) -> TypeError:
    """The ``TypeError`` for options that are no field of the configs (``what`` says which),
    with the closest known names for each (``known``: the front end's own keywords too; a
    keyword that another front end uses for one of them, :data:`KEYWORD_SYNONYMS`, is named
    with this one's)."""
    known = set(known)
    names = sorted({*_EST_FIELDS, *_SC_FIELDS, *ALIASES, *known})
    bad = sorted(rest)
    hints = []
    for k in bad:
        if KEYWORD_SYNONYMS.get(k) in known:
            hints.append(f"{k!r}: {where}() takes it as {KEYWORD_SYNONYMS[k]}=")
            continue
        if hint := did_you_mean(k, names):
            hints.append(f"{k!r}: {hint}")
    return TypeError(f"{where}() got unexpected keyword argument(s) {bad}"
                     + (f" ({'; '.join(hints)})" if hints else "") + f": options are {what}")


def scoring_only(where: str, scoring_config: ScoringConfig | None, options: Mapping[str, Any]) -> ScoringConfig:
    """The :class:`ScoringConfig` of a front end that only scores (options: its fields).

    Raises:
        TypeError: an option that is no field of :class:`ScoringConfig`.
        ValueError: an invalid option value.
    """
    if not options:
        return scoring_config if scoring_config is not None else ScoringConfig()
    bad = [k for k in options if ALIASES.get(k, (k, False))[0] not in _SC_FIELDS]
    if bad:
        raise unexpected_options(where, bad, "the fields of ScoringConfig")
    return stage_configs(where, None, scoring_config, options)[1]
