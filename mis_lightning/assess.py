"""``assess``: estimation -> quantization -> functional -> report, in one call.

``score`` is the second half on its own: given an :class:`~mis_lightning.estimation.Estimate`
(from :func:`~mis_lightning.estimation.estimate`, or rebuilt from synced Metric states) it
quantizes, computes cell moments chunk by chunk and returns the :class:`Report`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import logging
import math
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from . import functional as F
from ._augmentation import random_records_note
from ._fields import close_names, close_param_names, parameter_aliases
from ._heap import raise_mmap_threshold
from ._modelcopy import private_copy
from ._precision import full_float32
from ._rng import isolated_rng, restores_rng
from ._user_warnings import warn
from .config import (  # noqa: F401
    DEFAULT_CHUNK,
    EstimationConfig,
    ScoringConfig,
    check_user_functions,
    scoring_only,
    stage_configs,
    unexpected_options,
)
from .estimation import Estimate, estimate
from .estimation.batching import items_are_batches
from .estimation.estimate import (
    DECAY_HELD_FACTOR,
    DIAGONAL_LOW_READ_ATTACK_FIGURES,
    EXACT_MAX_PARAMS,
    GRADIENT_NORM_RATIO_MAX,
    KFAC_INFLUENCE_MAX_WIDTH,
    LEVERAGE_CAP,
    MINIMUM_OFFSET_SD,
    UNSEEN_RECORDS_SD,
    estimator_warnings,
    name_coordinates,
)
from .estimation.linear_factors import KFAC_MAX_WIDTH
from .estimation.per_sample import (
    FACTORS_OVER_BUDGET,
    HOOK_CALLS_REFUSED,
    OUTPUT_NOT_FLOATING,
    WEIGHTS_OUTSIDE_OUTPUT,
    BatchFn,
    LossFn,
)
from .evaluation import OutputTransform, evaluate_utility, metric_side_fix
from .functional._checks import check_finite
from .functional.bounds import _SPLIT_STATE
from .functional.correlated import nonfinite_coordinates
from .functional.interp import _TABLES as _INTERP_TABLES
from .functional.interp import interp_table
from .functional.kernel import _FUSED_STATE
from .functional.leakage import FROZEN_KAPPA, MC_BUFFER
from .functional.masks import all_set, any_along, any_set, count_set
from .functional.storage import storage_cell_moments, stored_bounds
from .functional.table import settled_drift_bound
from .functional.wide import (
    WIDE_MAX_WINDOW,
    WIDE_TABLE_MAX_VALUES,
    table_cube_sum,
    wide_deficit_bound,
)
from .progress import ProgressFn
from .quantization import NoQuantization, QuantizationScheme, SchemeError, get_scheme
from .quantization import base as _qbase
from .quantization.base import (
    ParamGrid,
    check_float_model,
    release_chunk_facts,
    release_unread,
    scale_facts_shared,
    zero_counts_only,
)
from .quantization.registry import check_scheme_names, scheme_list
from .quantization.release_forward import (
    ReleaseForwardError,
    joined,
    quantized_forward_errors,
    release_forward,
    uses_outside_layers,
)
from .quantization.storage_grid import storage_grids
from .record_count import (
    check_enough_records,
    check_not_a_shard,
    loader_dataset_size,
    records_read,
    records_read_note,
)
from .report import (
    CONSISTENCY_TOLERANCE,
    CUTOFF_CHECK_FACTOR,
    CUTOFF_SENSITIVITY_MAX,
    D_EFF_OVER_N_MAX,
    D_EFF_SCHEMES_MARK,
    FLOOR_SENSITIVITY_MAX,
    MINIMUM_CURE,
    RESIDUAL_NOT_COMPUTED,
    UNDETERMINED_MOVE,
    UNSEEN_RECORDS_EXPLAIN_MAX,
    LayerResult,
    Report,
    SchemeResult,
    above_baseline,
    failure_warning,
    float_determined,
    higher_is_better,
    interval_lost_warning,
    merge_scheme_warnings,
    metric_mode,
    metric_name,
    pick_utility_key,
    stiff_offset_cause,
    unknown_mode_message,
)
from .threads import scoring_threads

log = logging.getLogger(__name__)

# The schemes whose refusal (check_schemes) a front end has already shown (the app prints them
# before training): assess and score_schemes do not log them again (nu42c read the app's line,
# assess's and the scoring's "scheme ... failed", the same refusal three times). The report's
# errors and warnings still hold it.
_REFUSALS_SHOWN: ContextVar[frozenset[str]] = ContextVar("mis_lightning_refusals_shown", default=frozenset())


@contextmanager
def refusals_shown(names: Iterable[str]) -> Iterator[None]:
    """Within it, the schemes ``names`` (refused by :func:`check_schemes`, already shown to the
    user) are not logged again by :func:`assess` / :func:`score_schemes` (nor the planner's
    scoring); their failed rows and the report's warnings are unchanged."""
    token = _REFUSALS_SHOWN.set(_REFUSALS_SHOWN.get() | frozenset(names))
    try:
        yield
    finally:
        _REFUSALS_SHOWN.reset(token)


# Whether the front end running assess / plan picked the records itself from the model's training
# set (the Hydra app's non-shuffled pass over its data module's training split): the estimate is
# then marked as the callback marks its own (``records_from_training_loader``), so no warning
# offers "records it was not trained on" as a cause (nux55: the app's job was told so, 0.648 sd)
_TRAINING_RECORDS: ContextVar[bool] = ContextVar("mis_lightning_training_records", default=False)


@contextmanager
def training_records() -> Iterator[None]:
    """Within it, :func:`run_estimation` (``assess``, the planner) marks its estimate's records as
    the model's training records (``diagnostics["records_from_training_loader"]``): for a front end
    that reads them from the training split itself, never for records a user passes."""
    token = _TRAINING_RECORDS.set(True)
    try:
        yield
    finally:
        _TRAINING_RECORDS.reset(token)


SchemeSpec = str | QuantizationScheme
# Median variance inflation factor of the weights above which the report warns that the diagonal
# estimator's sigma is well below the marginal sd (sqrt(2) = 1.41x: a 4-bit grid's kappa moves a lot).
VARIANCE_INFLATION_WARN = 2.0
# d / n above which a finite-sample (leverage) correction that could not run is said: the
# first-order figures then read low by a few percent or more (measured: 7% at d / n = 0.07 on an
# MLP, 27% at 0.083 on an embedding + Conv1d model, against the 5% accuracy target).
LEVERAGE_NOTE_MIN_D_OVER_N = 0.02
# What the report says of the diagonal estimator's mean leverage (its measured accuracy against
# the exact estimator: docs/validation.md, "the diagonal estimator's leverage correction"; the derivation: method.md section 4).
# (the measurements themselves are in docs/validation.md: a warning says what to read, not the table)
# Ratio of the largest to the smallest lower-is-better utility (a loss) over the schemes from which,
# with no weight decay and an indefinite or floored Hessian, the report names large weights as the
# likely cause (ux29: 41x and 1,180x on an L-BFGS tanh MLP without weight decay, 1.1x and 1.5x
# on the same MLP trained with Adam; an order of magnitude separates them).
LOSS_EXPLOSION_RATIO = 10.0
# rms(W) sqrt(fan_in) (a unit's pre-activation sd over unit-variance inputs) above which a weight
# matrix is called large in that sentence: about 0.6 at PyTorch's default initialisation
# (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), 0.6-0.8 after Adam on the ux29 MLP, 36 after L-BFGS without
# weight decay; a tanh unit is mostly saturated from about 3.
LARGE_WEIGHT_SCALE = 5.0
DIAGONAL_LEVERAGE_ACCURACY = (
    "an approximation, exact for least squares without weight decay; its accuracy against the exact "
    "estimator: docs/validation.md, \"the diagonal estimator's leverage correction\"; the derivation: docs/method.md section 4")
# dg55: what the diagonal estimator's low-read flag (diagnostics["diagonal_low_read"]) quotes: its
# figures over the exact estimator's on dg52's models (benchmarks/dg55_low_read.py; docs/benchmarks.md "dg55")
DIAGONAL_LOW_READ_FIGURES = (
    "0.73-0.88x on a ReLU CNN at weight decay 1e-3 (d / n = 0.37; 0.086 per direction), where the exact "
    "estimator's per-record leverages (48 of its 512 stored records at or above the 0.95 cap) raised its figures "
    "1.57x against this estimator's uniform 1.11x; 0.87-1.08x on two MLPs calling a layer twice (0.054-0.060), "
    "0.76-0.90x there without either correction (the correlation across layers); 0.63-0.90x on ReLU 20-80-5 "
    "classifiers at d / n = 2.1 (0.13-0.26; the exact estimator's own correction 2.2-2.4x), 1.01-1.58x on tanh ones "
    "(0.06-0.20); 0.95-2.4x at 0.0005-0.022 (the same CNN at decay 1e-2, wide MLPs, convolutions)")


def _dtype_bits(t: Tensor) -> int:
    return torch.finfo(t.dtype).bits if t.is_floating_point() else 8 * t.element_size()


ParamSelection = Sequence[str] | Callable[[str, Tensor], bool] | None


def never_moved(sigma: Tensor) -> Tensor:
    """Boolean mask (``sigma``'s shape) of the weights no record's gradient moves: sd 0
    (``sigma <= 0``; float32-held, so none lies between 0 and float64's tiny, the moments
    paths' floor). They leak nothing (their influences are 0), so ``d_eff`` counts them 0 and
    the pinned share 1 in every release, float or grid, whatever kappa the cell moments give
    them there (a revealed block absmax: 1; one exactly on a cell edge: 2/pi)."""
    return sigma <= 0


# never_moved_count counts on slabs of _NEVER_MOVED_SLAB elements (a cache-sized mask, no int64 copy:
# a bool tensor's .sum() converts the whole [numel] mask to int64, 64 MiB at the 1e7 MLP's largest
# layer, faulted in on every call: ~0.04 s); False: never_moved(sigma).sum() (A/B; the same count)
NEVER_MOVED_SLABS = True
_NEVER_MOVED_SLAB = 1 << 18


def never_moved_count(sigma: Tensor) -> int:
    """The number of weights :func:`never_moved` marks in ``sigma`` (any shape)."""
    if not NEVER_MOVED_SLABS:
        return int(never_moved(sigma).sum())
    flat = sigma.reshape(-1)
    return sum(count_set(never_moved(flat[a:a + _NEVER_MOVED_SLAB])) for a in range(0, flat.numel(), _NEVER_MOVED_SLAB))


def select_params(model: nn.Module, params: ParamSelection = None) -> list[str]:
    """Names of the parameters to assess, checked: ``params`` is a list of names, a predicate
    ``(name, parameter) -> bool`` or ``None`` (every trainable parameter). A tied weight may be
    named by any of its holders (``'head.weight'`` for an output layer tied to ``'emb.weight'``,
    as ``state_dict`` names it); the name returned is ``named_parameters``' (its first holder's),
    which the report uses; so may a compiled submodule's without its ``_orig_mod.`` segment
    (:func:`~mis_lightning._fields.parameter_aliases`). Unknown names, an
    empty selection and NaN/inf weights raise errors that name the culprit; selected
    parameters that do not require grad (frozen: not trained on the records) get a warning.
    Inference tensors (a model built or loaded under ``torch.inference_mode``) are read as any
    other: the checks read detached values (autograd refuses ``isfinite`` / ``abs`` on an
    inference tensor that requires grad), and the estimation and the schemes work on private
    copies, which hold ordinary tensors.

    Raises:
        ValueError: the model is already quantized (see ``check_float_model``), holds tensors on
            the ``meta`` device (see :func:`check_materialized`), the selection
            is empty, a selected parameter holds NaN/inf, or belongs to a recurrent layer
            (``nn.LSTM``/``nn.GRU``/``nn.RNN``: no per-sample gradients for them), or the model
            holds batch normalisation without running statistics (records coupled by the batch).
        KeyError: a listed name is not a parameter of the model.
    """
    check_float_model(model)
    check_materialized(model)
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    else:
        # A tied weight has one name in named_parameters (its first holder's: 'emb.weight') but
        # one per holder in state_dict ('head.weight' too), and a compiled submodule's parameters
        # are also known without their '_orig_mod.' segment: any of them means that parameter.
        alias = parameter_aliases(model)
        names = list(dict.fromkeys(alias.get(n, n) for n in params))
        unknown = [n for n in names if n not in named]
        if unknown:
            hints = [f"{n!r}: did you mean {' or '.join(repr(c) for c in close)}?"
                     for n in unknown if (close := close_param_names(n, named))]
            raise KeyError(f"params not in the model: {unknown}"
                           + (f" ({'; '.join(hints)})" if hints else "") + f"; the model has {list(named)}")
    if not names:
        raise ValueError("no parameter selected for assessment")
    for n in names:
        p = named[n]
        # detached: on an inference tensor that requires grad (a model loaded under
        # torch.inference_mode) isfinite raised "abs(): functions with out=... arguments don't
        # support automatic differentiation" (hy50)
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"parameter {n!r} of the model holds NaN or inf")
    _check_recurrent(model, names)
    _check_batch_statistics(model)
    _check_embedding_max_norm(model)
    frozen = _frozen_warning(model, names)
    if frozen:
        warn(frozen, UserWarning)
    return names


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the ``meta`` device (built under
    ``torch.device("meta")`` or moved there, its weights not loaded yet): they hold no values,
    so there is no trained model to estimate or quantize (formerly the NaN check below failed
    with torch's "Tensor.item() cannot be called on meta tensors").

    Raises:
        ValueError: naming the tensors on ``meta`` (the first 5) and the fix.
    """
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if meta:
        more = f" (and {len(meta) - 5} more)" if len(meta) > 5 else ""
        raise ValueError(
            f"the model's {', '.join(repr(n) for n in meta[:5])}{more} are on the 'meta' device: they hold no "
            "values, so there are no trained weights to assess. Materialise the model first (e.g. "
            "model.to_empty(device='cpu') then load its trained state dict: model.load_state_dict(sd)) and "
            "assess that model")


def check_trainable_tensors(model: nn.Module) -> None:
    """Refuse, before training, trainable parameters that are inference tensors (the model built
    or its state dict loaded under ``torch.inference_mode``): torch cannot train them (their
    gradient stays ``None`` and the optimizer's in-place step raises "Inplace update to inference
    tensor outside InferenceMode"), which would surface after the fit started, far from the cause.
    Frozen ones (``requires_grad=False``) and buffers are left alone: a frozen encoder loaded that
    way trains its head normally. ``assess`` and ``MISIndicator`` take such models as they are
    (they only read them; :func:`select_params`).

    Raises:
        ValueError: naming the parameters (the first 5) and the fix.
    """
    bad = [n for n, p in model.named_parameters() if p.requires_grad and p.is_inference()]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"the model's trainable parameter(s) {', '.join(repr(n) for n in bad[:5])}{more} are inference "
            "tensors (the model was built or its weights loaded under torch.inference_mode): torch cannot "
            "train them (no gradient; the optimizer's in-place step is refused). Build the model and load its "
            "state dict outside torch.inference_mode (or give it ordinary copies outside it: "
            "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)), or "
            "freeze them (requires_grad_(False)) if they are not to be trained")


def _check_recurrent(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse selected parameters of recurrent layers, naming the layer: assessing a recurrent
    layer's own weights is not supported (it crashed deep in the estimation pass, after a whole
    training under the callback, where torch.func's vmap over the records met the RNN kernel; the
    loss program now takes such models one record at a time, but no scheme here but the
    bf16 / fp16 casts quantizes them and their estimation is unvalidated). A head or embedding
    around a recurrent encoder is assessed by selecting its parameters (exact sandwich included)."""
    chosen = set(names)
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):  # the cells' kernels too (LSTMCell loops)
            continue
        own = [f"{mod_name}.{p}" if mod_name else p for p, _ in mod.named_parameters()]
        hit = [n for n in own if n in chosen]
        if hit:
            rest = [n for n in names if n not in own]
            hint = f"params={rest}" if rest and len(rest) <= 8 else "params= without its parameters"
            raise ValueError(
                f"{type(mod).__name__} {mod_name!r} holds selected parameters ({', '.join(hit[:4])}"
                f"{', ...' if len(hit) > 4 else ''}): assessing a recurrent layer's own weights is not "
                f"supported; assess the layers around it, e.g. {hint}")


def _check_batch_statistics(model: nn.Module) -> None:
    """Refuse batch normalisation without running statistics, naming the layer: it normalises
    with the batch's own mean and variance even in eval mode, so a record's output depends on
    the other records of its batch (the indicator needs each record's own loss; torch raised
    "Expected more than 1 value per channel when training" on a record alone, deep in the
    estimation). InstanceNorm (per-record statistics) is not concerned."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (not mod.track_running_stats
                                                                 or mod.running_mean is None):
            raise ValueError(
                f"{type(mod).__name__} {mod_name!r} has track_running_stats=False: it normalises with "
                "each batch's own statistics even in eval mode, so a record's output depends on the "
                "other records of its batch and the per-record losses the indicator needs do not exist; "
                "use track_running_stats=True (the running statistics are then part of the release) or a "
                "per-record normalisation (nn.LayerNorm, nn.GroupNorm)")


def _check_embedding_max_norm(model: nn.Module) -> None:
    """Refuse embeddings with ``max_norm``, naming the layer: their forward rescales the rows it
    looks up in place (``torch.embedding_renorm_``), which per-sample gradients cannot batch
    (vmap raised "aten::embedding_renorm_ ... is not possible", or the in-place-update error
    when only other layers were selected), and the weights a forward uses are then not the
    weights stored. Renormalising once and clearing ``max_norm`` gives the same forward."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.max_norm is not None:
            raise ValueError(
                f"{type(mod).__name__} {mod_name!r} has max_norm={mod.max_norm}: its forward rescales the "
                "rows it looks up in place, which per-sample gradients cannot batch; renormalise its weight "
                f"once and clear max_norm (same outputs): `with torch.no_grad(): m.weight.copy_(torch.renorm("
                f"m.weight, {mod.norm_type}, 0, {mod.max_norm})); m.max_norm = None`")


def _frozen_warning(model: nn.Module, names: Sequence[str]) -> str | None:
    """The warning for selected parameters with ``requires_grad=False``, or ``None``."""
    named = dict(model.named_parameters())
    frozen = [n for n in names if n in named and not named[n].requires_grad]
    if not frozen:
        return None
    shown = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
    return (f"params selects {len(frozen)} parameter(s) that do not require grad ({shown}): "
            "frozen weights were not fitted to the training records, so the leakage analysis "
            "(an M-estimator of those records) does not apply to them and their figures are "
            "meaningless; select the trained parameters (params=None selects exactly those)")


# How far (relative) a position-dominated interval's upper end may reach above the leakage figure,
# beyond the record average's widening (SchemeResult.position_gap), before the warning below names
# the scheme: the accuracy target of the figures on grids of <= 1 sd (validation.md: within 5%)
POSITION_GAP_WARN = 0.05


def _position_warning(report: Report) -> str | None:
    """The schemes whose figure rests on where few coarse weights sit in their cells.

    In the position-dominated regime (``functional.interval``) the leakage is the plug-in at the
    trained weights, while the truth depends on where the population weights sit in their cells,
    known to about one sd: with every weight on a cell boundary (steps of 4-8 sd) the figure read
    0.69x the exact truth on average (method.md section 7: 0.70x in d = 1). Names the schemes
    whose interval's upper end is more than :data:`POSITION_GAP_WARN` above their figure (None
    when there are none)."""
    gaps = {k: s.interval[1] / s.leakage if s.leakage > 0 else math.inf for k, s in report.schemes.items()
            if not s.error and s.interval is not None and s.position_gap is not None
            and s.position_gap > POSITION_GAP_WARN}
    if not gaps:
        return None
    names = ", ".join(f"{k} ({g:.3g}x)" if math.isfinite(g) else f"{k} (figure 0)" for k, g in gaps.items())
    return (f"position-dominated figures: the 80% interval's upper end is above the leakage figure of {names}. "
            "Few coarse weights (cells several sd wide) carry these figures, and where their population values sit "
            "in their cells is known only to about one sd: the figure is the value at the trained weights and can "
            "read below the best attack's advantage (0.69x the exact truth on average with every weight on a cell "
            "boundary, steps of 4-8 sd; far above it with the weights mid-cell): hold the upper end (p90) as the "
            "bound for these schemes")


#: an interval narrower than this share of its figure is a point (iv58): every record read the same
POINT_INTERVAL_RTOL = 1e-9


def _point_interval(leakage: float, interval: tuple[float, float] | None) -> bool:
    """Whether ``interval`` (leakage units) has no width around a positive ``leakage``: the records'
    spread and the positions' range both read 0, so it states no uncertainty (:data:`POINT_INTERVAL_RTOL`
    of the figure; a figure of 0 with ``[0, 0]`` is kept: no record leaks by the form, the lowest figure there is)."""
    return (interval is not None and leakage > 0.0 and all(math.isfinite(v) for v in interval)
            and interval[1] - interval[0] <= POINT_INTERVAL_RTOL * leakage)


def _point_interval_warning(schemes: Sequence[str], report: Report, est: Estimate) -> str:
    """The warning for the schemes whose 80% interval had no width and was dropped: why (every stored
    record read the ceiling 1, or the same figure, which in-sample forms give with ``d`` at or above
    the stored records) and what the figure then is (docs/benchmarks.md, "iv58")."""
    saturated = all(report.schemes[s].leakage >= 1.0 - 1e-12 for s in schemes)
    if saturated:
        cause = ("every stored record reads the ceiling 1 (the first-order shift is far past where the "
                 "advantage saturates), so 1 is where the approximation ends, not a measured certainty")
    elif est.d >= est.num_records:
        cause = ("every stored record reads the same figure (with d at or above the stored records, "
                 f"here d = {est.d:,} and {est.num_records:,} records, each record's in-sample form equals the others')")
    else:
        cause = f"every stored record ({est.num_records:,}) reads the same figure"
    return (f"no 80% interval for {', '.join(schemes)}: {cause}; the interval, set by the records' spread "
            "and where the coarse weights sit, read a single point, which states a certainty the data do not "
            "give, so the row has none and differences from it are not judged. The figure is a point estimate "
            "without error bars (a Gaussian-mean model at d / n = 1.31 read 0.383 with such a point against "
            "the exact advantage 0.434: docs/benchmarks.md, \"iv58\")")


def _d_over_n_warning(d: int, n: int, d_eff_over_n: Mapping[str, float] | None = None,
                      num_schemes: int = 0, still: int = 0) -> str:
    """The warning for ``d / n`` above :data:`D_EFF_OVER_N_MAX`: the estimate itself (sigma, the
    influences; method.md section 2) and the baseline (``d_eff = d`` less the ``still`` weights
    no record moves, :func:`never_moved`: the table's unquantized d_eff) are then outside the
    asymptotic regime, whatever the schemes' ``d_eff``. ``d_eff_over_n``: the schemes (of
    ``num_schemes``) whose own ``d_eff / n`` is above it too, named in the same warning
    (:data:`D_EFF_STILL_LARGE`; the separate d_eff / n warning said nearly the same)."""
    # the schemes between the cause and the consequence: the warning still ends with its action (fu28)
    schemes = (_d_eff_over_n_sentence(d_eff_over_n, num_schemes, D_EFF_STILL_LARGE) + ". ") if d_eff_over_n else ""
    return (f"d / n = {d / n:.3g} is not small ({d:,} assessed weights, {n:,} records): sigma, the "
            f"influences and the unquantized baseline ({_baseline_d_eff_words(d, still)}) come from a normal approximation "
            f"of the trained weights that needs d << n. {schemes}Every figure, low d_eff included, is therefore "
            "indicative only and can read below what real attacks achieve (8-10% below on a tanh MLP at "
            f"d / n = 0.10: docs/validation.md). {D_OVER_N_INTERVAL} To act: assess fewer weights (e.g. a head "
            "over a frozen encoder) or use more records")


#: what the d / n warning says of the 80% intervals (``benchmarks/iv58b_coverage_map.py map`` and ``ols``, exact
#: references, 40 draws of the records a point; docs/benchmarks.md, "iv58b" and "iv59"): their record term, the
#: in-sample forms' spread, shrinks as d nears n while the figure's own error does not; they carry the
#: finite-sample correction's remainder for it (method.md section 3, "The correction's remainder"); the
#: first-order forms (leverage_correction=False) have no such term
D_OVER_N_INTERVAL = (
    "The 80% intervals need d << n too: their records' term shrinks as d nears n while the figure's own error "
    "does not, and they carry the finite-sample correction's remainder for it (the correction's size times "
    "d_eff / n), which widens them as d nears n. Against exact references they then held the truth "
    "in 40 of 40 draws of the records at every d / n from 0.05 to 0.95 (a Gaussian mean, 64 and 128 "
    "records; 0 of 40 at 0.9 without the remainder) and in 33-40 of 40 trainings at 0.1-0.75 (least squares, "
    "whose figure read up to 21% high): references of one loss direction per record. With several (a softmax "
    "classifier) the remainder is read short: multinomial logistic models read 5-16% above their exact-refit "
    "reference, and the widened interval missed it at d / n 0.5 and 0.9 (one dataset each; docs/benchmarks.md "
    "\"hc59\", \"rv59c\"). With "
    "leverage_correction=False they carry no such term and were not checked there.")


def _baseline_d_eff_words(d: int, still: int) -> str:
    """The unquantized baseline's d_eff in words: ``d_eff = d``, or with ``still`` weights no record
    moves (they count 0, :func:`never_moved`) its figure, d less them (the table's ``d_eff``)."""
    if not still:
        return "d_eff = d"
    return f"d_eff = {d - still:,}: d less the {still:,} weights no record moves"


#: how the d / n warning names the schemes whose own d_eff / n is not small either (the aggregate
#: of a sweep finds them by :data:`~mis_lightning.report.D_EFF_SCHEMES_MARK`)
D_EFF_STILL_LARGE = (f"{D_EFF_SCHEMES_MARK} (the weights that still leak, over n; the regime needs it small too) "
                     f"above {D_EFF_OVER_N_MAX:g} for ")


def _d_eff_over_n_sentence(large: Mapping[str, float], num_schemes: int, head: str) -> str:
    """``head`` + the schemes of ``large`` (name: d_eff / n), every scheme said as such, the
    largest value named."""
    worst = max(large, key=large.get)  # type: ignore[arg-type]
    which = "every scheme" if len(large) == num_schemes else ", ".join(sorted(large))
    size = f"{large[worst]:.3g}" if len(large) == 1 else f"up to {large[worst]:.3g}, {worst}"
    return f"{head}{which} ({size})"


def _covariance_cause(diagnostics: Mapping[str, Any]) -> str:
    """Why the weights' covariance may be undetermined, from the estimator's diagnostics: where
    the exact estimator found flat directions, the parameters that carry them
    (``flat_direction_parameters``, :func:`~.estimation.estimate.flat_parameter_shares`) and the
    cures the model's structure suggests (``flat_direction_cures``, :func:`flat_direction_cures`)."""
    cond = diagnostics.get("hessian_condition")
    flipped = int(diagnostics.get("negative_eigenvalues_flipped") or 0)
    parts = []
    if cond is not None and (not math.isfinite(float(cond)) or float(cond) > 1e12):
        parts.append(f"condition {float(cond):.3g}")
    if flipped:
        parts.append(f"{flipped} negative eigenvalue(s) replaced by their magnitudes")
    if not parts:
        return "the weights' covariance is poorly determined in some directions"
    if flipped:
        # negative curvature: a saddle or a slope, not a symmetry (nux45: a tanh MLP trained by Adam
        # read "condition inf ... e.g. an embedding", which named the wrong cause); the condition
        # number of an indefinite matrix says nothing more
        return (f"the Hessian is indefinite ({parts[-1]}): the weights are not at a minimum of the "
                "training objective along those directions (a saddle or a slope), where the weights' "
                "covariance is undetermined")
    shares = diagnostics.get("flat_direction_parameters")
    if shares:
        # nux51 #1: the example (an embedding) named a layer the model did not have; the estimator
        # knows which parameters the flat subspace lies in (the trace of its projector per tensor)
        k = int(diagnostics.get("flat_directions") or round(sum(shares.values())))
        carried = ", ".join(f"{nm} ({v:.3g})" for nm, v in list(shares.items())[:6]) + (
            f" and {len(shares) - 6} more" if len(shares) > 6 else "")
        cures = diagnostics.get("flat_direction_cures") or []
        cure = ("; to remove them: " + "; ".join(cures)) if cures else ""
        return (f"the Hessian is singular ({', '.join(parts)}): {k} flat direction(s), along which no record's "
                f"loss changes (symmetries of the model), lie in {carried} (share of the {k} directions each "
                f"parameter carries); they leave the weights' covariance undetermined there{cure}")
    if diagnostics.get("flat_directions") == 0:  # the exact estimator looked and found no exact symmetry
        decay = float(diagnostics.get("weight_decay") or 0.0)
        lo, hi = diagnostics.get("hessian_min_eigenvalue"), diagnostics.get("hessian_max_eigenvalue")
        if decay > 0 and lo is not None and hi and float(lo) <= 0:
            return _decay_cancelled_cause(diagnostics, decay, float(lo), float(hi))
        return (f"the Hessian is singular ({', '.join(parts)}) though no exact flat direction (symmetry) was "
                "found: near-flat directions, which the records barely determine (near-collinear features, "
                "saturated units, more weights than the data fix), leave the weights' covariance undetermined there"
                + ("" if decay > 0 else "; if the model was trained with weight decay, declare it (weight_decay=...: "
                   "an L2 penalty gives such directions curvature)"))
    return (f"the Hessian is singular ({', '.join(parts)}): flat directions (symmetries "
            "of the model, e.g. an embedding followed by a linear layer) leave the weights' covariance "
            "undetermined there")


# the share of H's lowest direction in decayed weights below which the condition-inf cause says the
# direction lies in weights left undecayed (the records' own curvature, not a cancelled decay)
DECAY_REACH_MIN = 0.5


def _decay_cancelled_cause(diagnostics: Mapping[str, Any], decay: float, lo: float, hi: float) -> str:
    """:func:`_covariance_cause` where weight decay ``decay`` was passed and H's lowest eigenvalue
    ``lo`` still reads ``<= 0`` (``hessian_condition`` inf) with no exact flat direction found: not
    a singular matrix of the data's, as "condition inf" alone suggested (a user read "no
    symmetry found" with weight decay 1e-3 passed), but the records' curvature cancelling the
    decay's along some direction. Names the likely causes, the parameters the directions the decay
    alone holds carry the Newton step in (``offset_held_parameters``, :func:`_not_at_minimum_detail`)
    and the cures. Where the lowest direction lies mostly (share of its squared entries above
    ``1 - DECAY_REACH_MIN``, ``hessian_min_direction_decayed``) in weights left undecayed (a
    per-parameter decay with biases at 0), the records' own curvature is said instead."""
    shares = diagnostics.get("offset_held_parameters") or {}
    where = (" (here the directions the decay alone holds carry the Newton step in "
             + ", ".join(f"{nm} ({100 * v:.0f}%)" for nm, v in list(shares.items())[:4]) + ")") if shares else ""
    per = diagnostics.get("weight_decay_per_parameter") or {}
    decays = list(per.values())
    uniform = not decays or min(decays) == max(decays)
    reach, along = diagnostics.get("hessian_min_direction_decayed"), diagnostics.get("hessian_min_direction_decay")
    if reach is not None and float(reach) < DECAY_REACH_MIN:
        # rv55: the lowest direction lies in weights left undecayed (biases): the records' own curvature is
        # <= 0 there, no decay was cancelled, and the decay passed is not the cure
        bare = [nm for nm, v in per.items() if not v]
        names = ", ".join(bare[:4]) + (f" and {len(bare) - 4} more" if len(bare) > 4 else "")
        return (f"the Hessian's lowest eigenvalue reads {lo:.3g} ({lo / abs(hi):.2g} of the largest; condition inf) "
                f"along a direction that lies {100 * (1 - float(reach)):.0f}% in weights the weight decay passed leaves "
                f"undecayed ({names or 'those at 0'}): the records' own curvature is 0 or below there and no exact flat "
                "direction (symmetry) was found; likely: a near-symmetry among those weights (two biases that shift "
                "one output together, a bias beside a normalisation layer) or near-collinear features the records "
                "barely determine; the weights' covariance is undetermined along it; to cure: if those weights were "
                "trained with weight decay, declare it (weight_decay={name: coefficient}), or remove the "
                "near-symmetry (one bias per output, bias=False beside a normalisation layer)")
    # the records' curvature along H's lowest direction u: lo - u' diag(decay) u (H's units, measured where
    # the estimator gave it); else lo - decay for one decay on every weight in parameter units only (rv54b)
    figure = (f" (it reads {lo - float(along):.3g} there)" if along is not None else
              f" (it reads {lo - decay:.3g} or below there)"
              if uniform and diagnostics.get("hessian_scaling") != "jacobi" else "")
    held = ("adds its own curvature to every direction" if uniform else
            "(the largest passed) adds its own curvature to the directions of the weights it decays")
    return (f"the Hessian's lowest eigenvalue reads {lo:.3g} ({lo / abs(hi):.2g} of the largest; condition inf) although "
            f"weight decay {decay:.3g} {held}: along some direction the "
            f"records' curvature cancels the decay's{figure} and no exact flat direction "
            "(symmetry) was found; likely: the weights are off the minimum along a near-symmetry of the model (a "
            "normalisation layer's scale traded against the Linear after it, the scale of an embedding or layer "
            "before a LayerNorm), where only the decay curves the objective and training converges at its slow "
            f"rate{where}, or the weight_decay passed is larger than the one trained with; the weights' covariance "
            "is undetermined along it; to cure: train on to convergence (more steps, or a second-order optimizer "
            "such as L-BFGS), remove the near-symmetry (e.g. LayerNorm(..., elementwise_affine=False) before a "
            "Linear, bias=False beside a normalisation layer), or pass the weight decay trained with")


def flat_direction_cures(model: nn.Module, shares: Mapping[str, float], decay: float) -> list[str]:
    """What would remove the flat directions that ``shares`` (``{parameter name: share}``,
    :func:`~.estimation.estimate.flat_parameter_shares`) puts in ``model``'s parameters: a 2-logit
    ``nn.Linear`` head among them (softmax's shift of both logits: one logit with a sigmoid has
    none), a Conv / Linear bias beside a normalisation layer's bias (the two shift together before
    BatchNorm: ``bias=False``), and, with ``decay`` 0, the weight decay the model was trained with
    (an L2 penalty gives shifts and rescalings curvature; flat_directions keeps such directions).
    Each cure one phrase naming the modules; empty when none applies."""
    mods = dict(model.named_modules())
    owner = {nm: mods.get(nm.rpartition(".")[0]) for nm in shares}
    out = []
    heads = sorted({nm.rpartition(".")[0] for nm, m in owner.items()
                    if isinstance(m, nn.Linear) and m.out_features == 2})
    if heads:
        out.append(f"{', '.join(heads)} has 2 outputs: if they are the logits of a softmax over 2 classes, both "
                   "shift together (the same vector added to both rows); 1 logit with a sigmoid (binary "
                   "cross-entropy) has no such direction")
    norm_kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    biases = sorted(nm for nm, m in owner.items() if nm.endswith(".bias")
                    and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and nm.rpartition(".")[0] not in heads)
    norms = sorted(nm for nm, m in owner.items() if nm.endswith(".bias") and isinstance(m, norm_kinds))
    if biases and norms:
        out.append(f"{', '.join(biases)} shift together with {', '.join(norms)} (a bias followed by a normalisation "
                   "layer): build those layers with bias=False")
    if decay == 0:
        out.append("declare the weight decay the model was trained with (weight_decay=...; an L2 penalty gives "
                   "shifts and rescalings curvature)")
    return out


def _consistency_warnings(report: Report, diagnostics: Mapping[str, Any],
                          form_gap: tuple[float, float] | None) -> list[str]:
    """Warnings for figures that break what any release must satisfy (method.md section 3): a
    quantized release cannot leak more than the unquantized one, nor one layer alone more than
    the whole model. Seen where the Hessian is singular (the two forms of the baseline then
    disagree) or the Monte Carlo error is large; the table marks such rows with ``!``."""
    out = []
    cause = _covariance_cause(diagnostics)
    base = report.baseline_leakage
    if form_gap is not None:
        grad, corr = form_gap
        # both first order; the table's baseline adds the spread term where leverages exist (fu25:
        # three baselines on one screen, none said to be the table's)
        shown = (f" (first-order values; the table's baseline {base:.4g} adds the finite-sample spread term)"
                 if "baseline_leakage_without_spread" in diagnostics else "")
        out.append(f"the unquantized leakage is {grad:.4g} from the gradient covariance but {corr:.4g} from the "
                   f"weights' correlation that scores the quantized schemes{shown} "
                   f"({100 * (corr - grad) / grad:+.1f}%): {cause}; each scheme's figure is capped by the "
                   "first, record by record (no release leaks more than the unquantized one), so schemes at "
                   "or near the baseline are not ranked by this estimate; treat every figure as indicative")
    above = {r["scheme"]: float(r["leakage"]) for r in report.rows() if not r.get("error") and above_baseline(r)}
    if above:
        which = ", ".join(f"{k} ({v:.4g})" for k, v in sorted(above.items()))
        why = cause if form_gap is not None or "Hessian" in cause else "Monte Carlo error, or " + cause
        out.append(f"leakage above the unquantized baseline {base:.4g} for {which} (marked ! in the table): a "
                   f"quantized release cannot leak more than the float one, so these figures are not reliable "
                   f"here; {why}")
    # Quantized weights, yet the correlated headline sits at the unquantized value: the weights left in
    # float determine the quantized ones through R (cr49; report.float_determined, "=" in the table), or
    # (capped for the records) the independent form drops: the correlation puts the leakage in
    # directions no scheme hides, which a singular Hessian (flat directions) leaves unidentified.
    # One warning per scheme: the determination's where R shows it, else this one.
    indep_base = diagnostics.get("baseline_leakage_independent")
    spanned = {k: r for k, r in report.schemes.items()
               if float_determined(r) and (r.exact_determination or {}).get("determined")}
    if spanned:
        out.append(_determined_warning(spanned, base))
    stuck = {k: report.schemes[k] for k in headline_unranked(report, diagnostics) if k not in spanned}
    if stuck:
        which = ", ".join(f"{k} (independent form {_fmt_or_nan(r.leakage_independent)})" for k, r in sorted(stuck.items()))
        indep = "" if indep_base is None else f" (independent form of the baseline {float(indep_base):.4g})"
        tied = [k for k, r in sorted(stuck.items()) if float_determined(r)]  # to 1e-9: "=" in the table
        mark = f" (marked = in the table: {', '.join(tied)})" if tied else ""
        # nux51 #1: "read it as an upper bound and compare leakage_independent" read as a contradiction
        # where every independent form sat above the headline: they are two estimates, not bound and value
        out.append(f"the correlated headline of {which} equals the unquantized value {base:.4g}{mark} although their "
                   f"weights are quantized{indep}: the weights' "
                   f"correlation puts the leakage in directions that no scheme hides ({cause}), so the headline "
                   "does not rank these schemes: it bounds their leakage from above only as the unquantized "
                   "model's figure does (no release leaks more than the float model). The independent form "
                   "(column indep. in the table: the weights' errors taken as uncorrelated) is another estimate, "
                   "which can read above the correlated headline: rank these schemes by it, against each other and "
                   "against the baseline's independent form, not against the headline"
                   + _same_reading(report, {*stuck, *spanned}))
    layers: dict[str, float] = {}
    for r in report.schemes.values():
        for name, lr in (r.layers or {}).items():
            if math.isfinite(lr.baseline_leakage):
                layers[name] = lr.baseline_leakage
    # the layers' values come from the correlation form: compared with the whole model's in it
    whole = float(diagnostics.get("baseline_leakage_correlation_form", base))
    over = {k: v for k, v in layers.items() if v > whole * (1 + CONSISTENCY_TOLERANCE)}
    if over:
        which = ", ".join(f"{k} ({v:.4g})" for k, v in sorted(over.items()))
        # the meaning first: the console shows the first clause (nux55: "one layer alone leaks more ..."
        # alarmed and said nothing of what it means for the figures)
        out.append(f"the per-layer and whole-model figures are not reliable here, as one layer alone leaks more than "
                   f"the whole model ({whole:.4g}) unquantized: {which}; releasing more weights cannot leak less; "
                   f"{cause}")
    return out


def headline_unranked(report: Report, diagnostics: Mapping[str, Any]) -> list[str]:
    """The quantized schemes whose correlated headline sits at the unquantized value (within
    :data:`~.report.BASELINE_TIE_RTOL`, :func:`float_determined`, or within 1e-3 while their
    independent form drops more than :data:`CONSISTENCY_TOLERANCE` below the baseline's,
    ``diagnostics["baseline_leakage_independent"]``): the headline does not rank them (the warning
    of :func:`_consistency_warnings`; the table then shows the independent form, column ``indep.``).
    Sorted names."""
    base = report.baseline_leakage
    indep_base = diagnostics.get("baseline_leakage_independent")
    return sorted(k for k, r in report.schemes.items()
                  if float_determined(r) or (
                      not r.error and r.quantized_fraction > 0 and r.covariance in ("full", "factor")
                      and math.isfinite(r.leakage) and abs(r.leakage - base) <= 1e-3 * max(base, 1e-12)
                      and indep_base is not None and r.leakage_independent is not None
                      and math.isfinite(r.leakage_independent)
                      and r.leakage_independent < float(indep_base) * (1 - CONSISTENCY_TOLERANCE)))


def _same_reading(report: Report, named: set[str]) -> str:
    """The stuck-headline warning's clause for the other quantized schemes printed at the
    baseline's value (those not ``named`` by it or the determination warning): the warning named
    only the stuck ones, and a table whose every row reads the same made it look as if the others
    were forgotten. ``""`` without any."""
    base = f"{report.baseline_leakage:.4g}"
    same = sorted(k for k, r in report.schemes.items() if k not in named and not r.error and r.quantized_fraction > 0
                  and f"{r.leakage:.4g}" == base)
    if not same:
        return ""
    return (f". {', '.join(same)} also read {base}, but their independent forms stay at the baseline's too: by "
            "both estimates their quantization hides little, and their figures need no other reading")


def _fmt_or_nan(x: float | None) -> str:
    """``x`` as ``.4g``, ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{x:.4g}"


def _determined_warning(spanned: Mapping[str, SchemeResult], base: float) -> str:
    """The warning for schemes whose float weights span R's kept eigenspace
    (``SchemeResult.exact_determination``, functional.correlated.ExactSpan): the quantized weights
    are then determined by the float ones through the fitted correlation, and the correlated
    headline is the baseline's; an upper bound where that runs through directions near R's rule."""
    parts, near = [], []
    for k, r in sorted(spanned.items()):
        e = r.exact_determination or {}
        parts.append(f"{k} (independent form {_fmt_or_nan(r.leakage_independent)}; {e['float_weights']} weights "
                     f"exact (left in float, or kappa = 1) span rank {e['rank']} of {e['d']})")
        if e.get("near_rule"):
            rel = float(e["smallest_singular_value"])
            near.append(f"{k} ({rel:.2g} of sqrt(lambda_max), {'beneath' if rel < float(e['rank_rule']) else 'near'} "
                        f"the rule's {float(e['rank_rule']):.2g})")
    text = (f"the correlated headline of {', '.join(parts)} equals the unquantized value {base:.4g} (marked = in "
            "the table): the weights left in float determine the quantized ones through the weights' fitted "
            "correlation (its kept eigenspace has that rank, and the float weights' block spans all of it), so "
            "quantizing those layers alone earns no credit in the correlated headline; compare "
            "leakage_independent")
    if near:
        text += ("; for " + ", ".join(near) + " the determination runs through directions of the float weights' "
                 "block whose smallest singular value lies beneath or near the correlation's rank rule (sqrt of its "
                 "relative eigenvalue cutoff): the headline is then an upper bound")
    return text


# Share of the records averaged over that repeat another above which the report warns: a record
# present k times reads about 1/k of its own figure, so below 1 % the headline moves by under 1 %
# of itself (one duplicate among the main job's 256 ChEMBL records: 0.4 %); the count is in
# diagnostics["duplicate_records"] either way.
DUPLICATE_WARN_SHARE = 0.01


# What records fed k times read against their distinct records' figure (every record twice; ux48,
# tests/test_duplicates_figure.py: OLS d = 3, n = 1,000 and d = 40, n = 100; nux47's CNN, docs/benchmarks.md)
DUPLICATE_FIGURES = "twice: 0.705x at leverage 0.003, 0.57x at 0.4 on OLS, 0.32x at 1.14 on a CNN"


def _duplicate_warning(diagnostics: Mapping[str, Any], n: int) -> str | None:
    """The warning for stored records that repeat another (``diagnostics["duplicate_records"]`` of
    ``["duplicate_records_of"]``), from :data:`DUPLICATE_WARN_SHARE` of them, else ``None``.

    A record present ``k`` times is scored as ``k`` members of a training set of ``n`` (the records
    read): each shift is ``1/k`` and each sd ``1/sqrt(k)`` of the distinct records', so the figures read
    about ``1/sqrt(k)`` of theirs where leverages are small and the figures well below 1, and less
    where leverages are not small: the leverage correction is computed at ``n`` too, ``k`` times
    below the distinct records' (1.14 -> 0.568 per loss direction, 0.32x, not the 0.71x the
    warning said). The stored records are a hash sample whose copies are kept or left together, so
    their share of repeats estimates the whole data's: ``k = 1 / (1 - share)`` copies per distinct
    record on average, ``n (1 - share)`` distinct records."""
    repeated = diagnostics.get("duplicate_records")
    of = diagnostics.get("duplicate_records_of") or 0
    if not repeated or repeated < DUPLICATE_WARN_SHARE * of:
        return None
    share = repeated / of
    k = 1.0 / (1.0 - share)
    per_direction = diagnostics.get("leverage_per_direction")
    h = per_direction if per_direction is not None else diagnostics.get("mean_leverage")
    lev = (f"; lower where leverages are not: the leverage correction is computed at n too (mean leverage "
           f"{float(h):.3g} per {'loss direction' if per_direction is not None else 'record'} here, {k * float(h):.3g} at "
           "the distinct records' n)" if h is not None and diagnostics.get("leverage_correction") else "")
    return (f"{repeated} of the {of} records the leakage is averaged over repeat another of them: about "
            f"{round(n * (1 - share)):,} distinct records among the n = {n:,} read, {k:.3g} copies each. Two readings: "
            "(a) independent draws that coincide (a data set of few distinct values: discrete features, short token "
            "sequences) are members of their own and the figures stand: then ignore this warning; (b) copies of one "
            "record (records held more than once: duplicates, oversampling, padding, records fed twice) are each "
            f"scored as a member of its own, so the figures understate the leakage: about 1/sqrt({k:.3g}) = "
            f"{1 / math.sqrt(k):.2f}x the distinct records' figure where leverages are small{lev} "
            f"({DUPLICATE_FIGURES}); with equal counts, assess the distinct records (the same weights and game); "
            "unequal counts (oversampling) are not modelled")


def _leverage_note(diagnostics: Mapping[str, Any]) -> str | None:
    """The records' leverage when its mean exceeds :data:`D_EFF_OVER_N_MAX` (method.md section 4,
    "Finite-sample (leverage) correction"), saying whether the estimator corrected for it; else
    ``None``."""
    if diagnostics.get("leverage_estimate") == "diagonal":
        return _diagonal_leverage_note(diagnostics)
    h = diagnostics.get("mean_leverage")
    if h is None or not h > D_EFF_OVER_N_MAX:
        return None
    hmax = float(diagnostics["max_leverage"])
    what = (f"finite-sample (leverage) correction: mean leverage {h:.3g} (max {hmax:.3g}) of the stored records"
            + (" (above 1: a record with several loss directions, up to one per direction; with one, the fit is "
               "no projection: more weights than records, or a damped or indefinite Hessian)" if hmax > 1.0 else "")
            + f", above {D_EFF_OVER_N_MAX:g} (the figures are marked *: the asymptotic regime needs it small, as "
            "d / n). ")
    if diagnostics.get("leverage_correction"):
        capped = int(diagnostics.get("leverage_capped", 0))
        return what + ("Their influences are the leave-one-out shifts and the gradient covariance is "
                       "HC2-corrected (leverage_correction), which first-order theory does not cover"
                       + (f". For that correction {capped} record(s) with a leverage above {LEVERAGE_CAP} along "
                          f"one loss direction (an eigenvalue of its leverage matrix) had it capped at "
                          f"{LEVERAGE_CAP} (the mean and max above are before the cap)"
                          if capped else ""))
    return what + ("Not corrected: the first-order influences understate each record's leave-one-out shift by "
                   "about 1 / (1 - leverage); leverage_correction=True corrects them")


# What the exact estimator reads at d >= n, against reference-model attacks (docs/validation.md,
# "The correlated headline of ReLU MLP classifiers at d > n": benchmarks/classifier_pool_attacks.py,
# ReLU 20-80-5 classifiers, d / n = 2.1, decay 1e-2)
EXACT_RANK_FIGURES = (
    "on ReLU 20-80-5 classifiers at d / n = 2.1 (weight decay 1e-2) the exact estimator's pool-protocol "
    "figures read 0.76-0.88 where the best of five reference-model attacks (LiRA, RMIA, loss) reached "
    "0.31-0.37, the diagonal estimator 0.48-0.50 and the first-order form with the population's gradient "
    "covariance about 0.40")


def _exact_rank_note(mode: str, d: int, n: int, diagnostics: Mapping[str, Any]) -> str | None:
    """What the exact estimator's figures are at ``d >= n`` (more assessed weights than records), or
    ``None`` (another estimator, or ``d < n``). Its gradient covariance ``V`` then has rank at most
    ``n - 1``, so the in-sample ``g' V^+ g`` of every record in its span is ``n - 1`` exactly (the trace
    identity with a projection: all leverages in ``G (G'G)^+ G'`` are 1), whatever the record: the
    first-order figures are the rank's, not the records', and the leverage correction, at leverages
    near 1, raises them towards saturation (method.md section 3, "Large models"; docs/validation.md,
    "The correlated headline of ReLU MLP classifiers at d > n")."""
    if mode != "exact" or d < n:
        return None
    corrected = bool(diagnostics.get("leverage_correction"))
    return (f"more assessed weights than records (d = {d:,}, n = {n:,}): the exact estimator's gradient covariance "
            f"has rank at most n - 1, so before any correction every record in the others' span reads the same shift "
            f"(delta^2 = (n - 1) / n, the trace identity), not its own"
            + (", and the finite-sample correction, at leverages near 1, raises the figures towards saturation"
               if corrected else "")
            + f"; where measured, such figures were far above what attacks achieved ({EXACT_RANK_FIGURES}; "
            "docs/validation.md, \"The correlated headline of ReLU MLP classifiers at d > n\"): read them as conservative, not as a reference for the diagonal estimator")


#: why the exact estimator's per-record leverage factors could not be formed (the first batch's
#: exception, ``diagnostics["leverage_unavailable"]``) -> (the cause in short, what lets it run);
#: the first entry whose phrase (each written into its refusal's message: estimation.per_sample) is in
#: the exception's message (:func:`leverage_off_warning`)
LEVERAGE_OFF_CURES: tuple[tuple[str, str, str], ...] = (
    # streaming._HookProgram._through_output / output_shape
    (HOOK_CALLS_REFUSED, "the loss hook calls the model not at all, or with outputs other than floating tensors",
     "have the hook call the model, its outputs floating tensors"),
    (WEIGHTS_OUTSIDE_OUTPUT, "the loss hook reads the weights other than through the model's output",
     "leave weight penalties out of the hook (weight_decay= counts them)"),
    (FACTORS_OVER_BUDGET, "the records' factors exceed budget=", "raise budget= or lower num_records="),
    (OUTPUT_NOT_FLOATING, "the model's output holds more than floating tensors",
     "return only floating tensors, records in dim 0, from forward"),
)


def leverage_off_warning(off: str, d_over_n: float) -> str:
    """The warning where the exact estimator's finite-sample (leverage) correction could not run
    (``off``: why, ``diagnostics["leverage_unavailable"]``) at ``d / n = d_over_n``: what lets it run
    and the cause in short first, the console's line (:data:`LEVERAGE_OFF_CURES`; otherwise
    ``leverage_correction=True``, which raises naming the cause), then how far the figures can read
    low and the cause in full. The rows are marked ``*`` (``diagnostics["leverage_not_run"]``,
    :func:`~mis_lightning.report.regime_failures`)."""
    cause, cure = next(((c, f) for key, c, f in LEVERAGE_OFF_CURES if key in off),
                       ("no per-record output Jacobians", "leverage_correction=True raises naming the cause"))
    return (f"the finite-sample (leverage) correction could not run (figures can read low): {cure}. "
            f"Its cause: {cause}. With d / n = {d_over_n:.3g} the first-order influences understate each record's "
            "leave-one-out shift by about 1 / (1 - leverage) and sigma reads low by about sqrt(1 - leverage) "
            "(in-sample residuals) (measured: 7% low on an MLP at d / n = 0.12, 27% on an embedding + Conv1d "
            "model at d / n = 0.083, 6% on a loss hook adding a weight penalty at d / n = 0.23). The error: "
            f"{off}")


def residual_not_computed_warning(missing: Mapping[str, Sequence[int]]) -> str:
    """The warning where a DDP process left a block of the Hessian's residual term out of its sums
    (``hessian="ggn_residual"``; ``missing``: ``{module: [ranks]}``, ``diagnostics["residual_not_computed"]``,
    :func:`~mis_lightning.estimation.world_choice.world_residual`): its own first batch found the block
    zero, every process's first batches together did not. The rows are marked ``*``."""
    where = "; ".join(f"{m} on process{'es' if len(r) > 1 else ''} {', '.join(map(str, r))}" for m, r in missing.items())
    return (f"{RESIDUAL_NOT_COMPUTED} (figures can read above or below the exact Hessian's): hessian='exact' "
            "computes every block. The Hessian is assembled as Gauss-Newton + residual term (hessian='ggn_residual'), "
            "each module's own block of the residual left out where a process's first batch found it zero; the "
            f"blocks of {where} were left out of those processes' records, while the first batches of every "
            "process together did not find them zero (a process's first batch atypical, e.g. every record's "
            "loss gradient in the outputs zero), so the Hessian lacks those blocks' part from those records")


def _diagonal_leverage_note(diagnostics: Mapping[str, Any]) -> str | None:
    """The diagonal estimator's finite-sample (leverage) correction (method.md section 4,
    "Finite-sample (leverage) correction", the diagonal estimator): said where its mean leverage
    per loss direction exceeds :data:`LEVERAGE_NOTE_MIN_D_OVER_N` (sigma moves by 1% or more),
    the mean per record exceeds :data:`D_EFF_OVER_N_MAX`, or it was capped; else ``None``."""
    per = float(diagnostics["leverage_per_direction"])
    h = float(diagnostics["mean_leverage"])
    capped = bool(diagnostics.get("leverage_capped"))
    if not (per > LEVERAGE_NOTE_MIN_D_OVER_N or h > D_EFF_OVER_N_MAX or capped):
        return None
    dirs = float(diagnostics["leverage_directions"])
    why = diagnostics.get("leverage_directions_note")
    kron = list(diagnostics.get("leverage_kronecker_layers") or [])  # (dg52)
    # one mean leverage: the one per loss direction, which the correction, the cap and the * mark read;
    # the per-record sum is that times the directions (rv55z: two means quoted side by side)
    what = (f"finite-sample (leverage) correction: mean leverage {per:.3g} per loss direction ("
            + ("one per record" if dirs == 1 else f"{h:.3g} per record over its {dirs:.3g} loss directions")
            + (f": {why}" if why else "") + "), from the Hessian diagonal "
            f"(sum_j H_data_jj / H_jj / n: {DIAGONAL_LEVERAGE_ACCURACY})"
            + (f", except the decayed layers {', '.join(m or '(the model)' for m in kron[:6])}, counted under their Kronecker-factored Gauss-Newton "
               f"block (tr((K + lambda)^-1 K), where the diagonal count read "
               f"{float(diagnostics['leverage_trace_diagonal']) / max(float(diagnostics['leverage_trace']), 1e-300):.3g}x "
               "it)" if kron else "") + ". ")
    if not diagnostics.get("leverage_correction"):
        return what + _diagonal_low_read_sentence(diagnostics) + (
            "It was not corrected (leverage_correction=False): the first-order influences understate each "
            "record's leave-one-out shift by about 1 / (1 - leverage) and sigma reads low by about "
            "sqrt(1 - leverage)")
    what += _diagonal_low_read_sentence(diagnostics)
    hb = min(per, LEVERAGE_CAP)
    free = int(diagnostics.get("leverage_unassessed_weights", 0))
    bound = float(diagnostics.get("leverage_unassessed_bound", 0.0))
    # trainable weights outside the assessment fit the data too (at most 1 each to the trace)
    left = (f". {free:,} trainable weight(s) not assessed are not counted (they fit the data too: up to "
            f"{bound:.3g} more per direction)" if free and bound >= 1e-3 else "")
    return what + (f"Sigma and the influences were raised by 1 / sqrt(1 - {hb:.3g}) = {1 / math.sqrt(1 - hb):.4g} "
                   "(the leave-one-out shift at the mean leverage; each record's own leverage is not known to "
                   "this estimator), a correction first-order theory does not cover"
                   + (f". The mean leverage per direction {per:.3g} was capped at {LEVERAGE_CAP}: the diagonal "
                      "approximation exceeds the count the data can fit (more weights than records x directions, "
                      "or a Hessian whose diagonal spreads a few large eigenvalues over many weights, as in "
                      "overparameterised networks), and sigma grows 4.5x: the figures then sit near their maximum "
                      "(the exact estimator reads near it too on such models: docs/validation.md), how far from "
                      "the model's own is not known in general" if capped else "") + left)


def _diagonal_low_read_sentence(diagnostics: Mapping[str, Any]) -> str:
    """The diagonal estimator's flag that its figures may read below the exact estimator's
    (``diagnostics["diagonal_low_read"]``, set by the estimator where its mean leverage per loss
    direction exceeds :data:`~mis_lightning.estimation.estimate.DIAGONAL_LOW_READ_LEVERAGE`; the rows
    are marked * by :func:`~mis_lightning.report.regime_failures`), with what real attacks read where
    measured (:data:`~mis_lightning.estimation.estimate.DIAGONAL_LOW_READ_ATTACK_FIGURES`), as a
    sentence ending in ". "; ``""`` where not flagged."""
    low = diagnostics.get("diagonal_low_read")
    if not low:
        return ""
    how = ("counted with the decayed layers' Kronecker-factored Gauss-Newton blocks"
           if low.get("count") == "kronecker" else "the diagonal count")
    return (f"These figures may read below the exact estimator's (marked * in the table): the mean leverage per "
            f"loss direction ({how}) is {float(low['leverage_per_direction']):.3g}, above "
            f"{float(low['threshold']):g}: there this estimator, which corrects every record by one mean leverage and "
            "models the weights' correlation within each layer only, read below the exact estimator where measured "
            f"({DIAGONAL_LOW_READ_FIGURES}; docs/benchmarks.md, \"dg55\"; an empirical threshold, not a bound). "
            f"Against real attacks, {DIAGONAL_LOW_READ_ATTACK_FIGURES} (docs/benchmarks.md, \"dg57\"). "
            "estimation='exact' forms each record's leverage and the correlation across layers, for the more "
            "conservative figure (its cost grows as n d^2 and d^3). ")


def _frozen_left_out_note(model: nn.Module, names: Sequence[str]) -> str | None:
    """A note naming the frozen (``requires_grad=False``) parameters the assessment left out, or
    ``None`` when every frozen parameter is assessed or there is none."""
    named = dict(model.named_parameters())
    chosen = set(names)
    out = [k for k, p in named.items() if not p.requires_grad and k not in chosen]
    if not out:
        return None
    numel = sum(named[k].numel() for k in out)
    shown = ", ".join(out[:5]) + (f" and {len(out) - 5} more" if len(out) > 5 else "")
    return (f"assessed only the {sum(named[k].numel() for k in chosen if k in named):,} trained weights: "
            f"{numel:,} frozen weights (requires_grad=False: {shown}) were not fitted by this training and "
            "are not assessed, but each scheme quantizes them in its copy as the rest of the model (the "
            "utility and model b/w are those of the whole quantized model); if they were fitted to these "
            "records earlier (pretraining on the same data), their leakage is not counted")


def _trained_left_out_note(model: nn.Module, names: Sequence[str]) -> str | None:
    """A warning naming the trainable (``requires_grad=True``) parameters ``params=`` left out,
    or ``None``. The estimate holds them fixed: the assessed weights' sigma and influences are
    those given the others (the conditional covariance), which is below their spread when all
    were fitted together; a fresh user measured an OLS weight's baseline 0.0191 against 0.0216
    for the full release (bias fitted jointly, released in float)."""
    named = dict(model.named_parameters())
    chosen = set(names)
    out = [k for k, p in named.items() if p.requires_grad and k not in chosen]
    if not out or not chosen:
        return None
    shown = ", ".join(out[:5]) + (f" and {len(out) - 5} more" if len(out) > 5 else "")
    # recurrent layers cannot be assessed at all (select_params refuses them): say that their
    # weights are released in float by every scheme here, so their own leakage is in no figure (nu42a)
    left = {id(named[k]) for k in out}
    rnns = [f"{type(m).__name__} {f!r}" for f, m in model.named_modules()
            if isinstance(m, (nn.RNNBase, nn.RNNCellBase)) and any(id(p) in left for p in m.parameters(recurse=False))]
    rnn_note = (f"; the recurrent layer(s) among them ({', '.join(rnns[:3])}) cannot be assessed (select_params "
                "refuses recurrent weights) and stay in float in every scheme's copy (torchao's quantize_ "
                "takes nn.Linear; torch's quantize_dynamic with its default mapping would make them int8): "
                "their own leakage is in no figure of this report") if rnns else ""
    return (f"params= leaves out {len(out)} trainable parameter(s) ({shown}, "
            f"{sum(named[k].numel() for k in out):,} weights): they are held fixed, so the assessed weights' "
            "figures are conditional on them; if they were trained jointly with the assessed ones (not a frozen "
            "encoder), the release leaks more than reported (they are released too, quantized in each scheme's "
            "copy as the rest of the model, and the assessed weights spread more than their conditional law says): "
            "assess every trained parameter, or freeze the others (requires_grad=False) if they were not fitted "
            f"to these records{rnn_note}")


@restores_rng("train_dataloader", "val_dataloader")
@full_float32
def _outside_inference_mode(fn: Callable[..., Report]) -> Callable[..., Report]:
    """Run ``fn`` outside ``torch.inference_mode`` when called inside it (a Lightning validation or
    test loop, a user's ``with torch.inference_mode():``): the estimation needs autograd, and the
    scoring's copies and caches key on version counters, which inference mode does not keep
    (every scheme failed late, "Inference tensors do not track version counter"). The
    user's tensors are read only."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Report:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@_outside_inference_mode
def assess(
    model: nn.Module,
    schemes: SchemeSpec | Sequence[SchemeSpec],
    train_dataloader: Iterable,
    loss_fn: LossFn,
    *,
    estimation_config: EstimationConfig | None = None,
    scoring_config: ScoringConfig | None = None,
    batch_fn: BatchFn | None = None,
    val_dataloader: Iterable | None = None,
    metrics: Mapping[str, Any] | None = None,
    output_transform: OutputTransform | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Report:
    """Membership-inference security of ``model`` under each quantization scheme.

    Estimation (``sigma [d]`` and the influences ``w [R, d]``, method.md section 4), then one
    scoring pass over every scheme (sections 3, 5, 7): :func:`run_estimation` followed by
    :func:`score_schemes`.

    Args:
        model: the trained model; never modified (parameters stay bit-identical).
        schemes: registry names (see ``mis_lightning.quantization.available_schemes()``) or
            scheme objects.
        train_dataloader: the training records (each once), batches ``(inputs, targets)``.
            Left as it was: the global RNG streams and the loader's generators are restored,
            and an iterable dataset is read from a deep copy (its pass state is untouched).
            A map-style dataset whose records differ between two reads (random augmentation
            in ``__getitem__``: each record is then assessed at one random draw) is said in
            the report's warnings (:func:`~mis_lightning._augmentation.random_records_note`).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (the data term of the
            training objective).
        estimation_config, scoring_config: the stages' options
            (:class:`~mis_lightning.config.EstimationConfig`,
            :class:`~mis_lightning.config.ScoringConfig`).
        batch_fn: ``batch -> (inputs, targets)`` for other batch layouts.
        val_dataloader, metrics, output_transform: utility of each quantized copy
            (``evaluate_utility``); the mean loss is always reported.
        progress: ``progress(stage, completed)`` hook: ``("estimation", records so far)``,
            then ``("schemes", schemes quantized and evaluated so far)``, and ``("compile", 0)``
            / ``("compile", 1)`` around a one-off compilation of the cell-moment kernel when
            the compile policy will use it (see :mod:`mis_lightning.progress` for a renderer).
        options: any field of either config by name (``estimation="exact"``,
            ``num_records=64``, ``method="mc"``, ...); they override the configs' fields.

    Returns:
        :class:`~mis_lightning.report.Report`.

    Raises:
        TypeError: an unknown keyword argument; ``loss_fn``, ``batch_fn`` or ``output_transform``
            not callable (named).
        ValueError: an invalid option (named), an empty or duplicated scheme list, an already
            quantized model, NaN/inf weights, or fewer than 4 training records.
        KeyError: an unknown scheme or parameter name.
        SchemeError: (``strict``) a scheme fails, or cannot take the model at all
            (``QuantizationScheme.check_model``, checked before the estimation pass).

    Example (a one-weight ridge regression; see docs/method.md for the figures):

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from mis_lightning import assess
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 1, generator=g); y = 0.5 * x[:, 0] + 0.1 * torch.randn(200, generator=g)
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(float((x[:, 0] @ y) / (x[:, 0] @ x[:, 0])))
    >>> mse = lambda out, t: (out[:, 0] - t) ** 2
    >>> report = assess(model, ["rtn_int8", "rtn_int2"], DataLoader(TensorDataset(x, y), batch_size=50),
    ...                 mse, num_records=64, uncertainty_draws=0)
    >>> list(report.schemes), report.n, report.d
    (['rtn_int8', 'rtn_int2'], 200, 1)
    >>> report.schemes["rtn_int2"].leakage <= report.schemes["rtn_int8"].leakage <= report.baseline_leakage
    True
    """
    est_cfg, sc_cfg, rest = stage_configs("assess", estimation_config, scoring_config, options)
    if rest:
        raise unexpected_options("assess", rest, known=inspect.signature(assess).parameters)
    check_user_functions(loss_fn=loss_fn, batch_fn=batch_fn, output_transform=output_transform)
    scheme_objs = resolve_schemes(schemes)
    # before the estimation pass: schemes that cannot run, or quantize nothing (all of them: refused)
    refused: list[str] = []
    shown = _REFUSALS_SHOWN.get()
    problems = check_schemes(model, scheme_objs, strict=sc_cfg.strict, params=select_params(model, est_cfg.params),
                             refused=refused)
    for name, msg in zip(refused, problems):  # said before the estimation, which may be long or fail (fu31)
        if name not in shown:
            log.warning("%s", msg)
    check_utility_metric(sc_cfg, metrics, validation=val_dataloader is not None and loss_fn is not None)
    if val_dataloader is not None and loss_fn is not None:  # before the estimation pass
        check_validation_batch(model, val_dataloader, loss_fn, metrics, batch_fn, output_transform,
                               schemes=scheme_objs, strict=sc_cfg.strict)
    check_not_a_shard(train_dataloader)  # one DDP process's shard taken for the training set: refused now
    est = run_estimation(model, train_dataloader, loss_fn, est_cfg, seed=sc_cfg.seed,
                         batch_fn=batch_fn, progress=progress)
    with refusals_shown(refused):  # said above: the scoring's failed rows need no second line
        report = score_schemes(
            est, model, scheme_objs, scoring_config=sc_cfg, val_dataloader=val_dataloader,
            loss_fn=loss_fn, metrics=metrics, output_transform=output_transform, batch_fn=batch_fn,
            progress=progress, calibration_data=train_dataloader,
        )
    sampling = _sampling_notes(train_dataloader)  # records drawn with replacement, another subset each call
    report.warnings += sampling
    # n = the records read, against the dataset's size (a drop_last batch, a sampler over part of it)
    counted = None if sampling else records_read_note(records_read(est), loader_dataset_size(train_dataloader),
                                                      "len(train_dataloader.dataset)", loader=train_dataloader)
    if counted:
        report.warnings.insert(0, counted)
    ds = getattr(train_dataloader, "dataset", None)
    if isinstance(train_dataloader, DataLoader) and not isinstance(ds, IterableDataset) and hasattr(ds, "__len__"):
        # random augmentation in __getitem__ or the collate_fn: each record was assessed at one random draw
        # (items that are whole batches: the collate_fn takes one item, not a list of them)
        collate = None if items_are_batches(train_dataloader) else train_dataloader.collate_fn
        if aug := random_records_note(ds, range(len(ds)), collate_fn=collate):
            report.warnings.append(aug)
    return report


def check_validation_batch(model: nn.Module, val_dataloader: Iterable, loss_fn: LossFn,
                           metrics: Mapping[str, Any] | None, batch_fn: BatchFn | None,
                           output_transform: OutputTransform | None,
                           schemes: Sequence[QuantizationScheme] = (), strict: bool = True) -> None:
    """Evaluate a private copy of ``model`` on the first validation batch, as each quantized
    copy's utility will be, so that a batch the model cannot take (float32 inputs to a bf16
    model, a wrong layout) fails before the estimation pass rather than after it. Only for a
    map-style DataLoader (a stream is not read twice); the random streams are restored. Then
    each of ``schemes``' quantized copies on that batch: one that cannot run the forward (a
    quantized weight used outside its module) raises with ``strict``, else is warned
    (its row keeps its leakage, its utility reads failed).

    Raises:
        RuntimeError: the batch fails; names ``val_dataloader``, the model's parameter dtypes and
            the original error (kept as the cause).
        ReleaseForwardError: (``strict``) a scheme's quantized copy cannot run the forward; names
            the parameters, the op and the fixes.
    """
    if not isinstance(val_dataloader, DataLoader) or isinstance(val_dataloader.dataset,
                                                                 torch.utils.data.IterableDataset):
        return
    with isolated_rng(val_dataloader):
        batch = next(iter(val_dataloader), None)
    if batch is None:
        return
    copy_ = private_copy(model, "copying the model to check the validation batches")
    try:
        with uses_outside_layers(copy_) as outside:  # a weight used past its layer's function (nux50)
            evaluate_utility(copy_, [batch], loss_fn, metrics, batch_fn=batch_fn, output_transform=output_transform)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        fix = metric_side_fix(exc, metrics, output_transform) or (
            f"each quantized copy's utility is loss_fn(model(inputs), targets) over these "
            f"batches, so give them in the layout, dtype and device the model takes (its parameters are "
            f"{', '.join(dtypes)})")
        raise RuntimeError(f"val_dataloader's first batch fails on the model ({type(exc).__name__}: {exc}); checked "
                           f"before the estimation pass: {fix}") from exc
    if not outside:  # every weight used by its layer's function: the quantized copies run it
        return
    with isolated_rng():
        errors = quantized_forward_errors(model, schemes, lambda q: evaluate_utility(
            q, [batch], loss_fn, metrics, batch_fn=batch_fn, output_transform=output_transform))
    if errors and strict:
        raise joined(errors)
    for e in errors:
        log.warning("%s", e)


def _check_some_gradient(est: Estimate) -> None:
    """Refuse an estimate in which no assessed weight moves the loss (sigma 0 everywhere): every
    figure would read 0 leakage, silently.

    Raises:
        ValueError: no assessed weight's gradient varies across records; names the likely causes.
    """
    if est.d == 0 or any(bool(est.sigma[k].any()) for k in est.names):
        return
    raise ValueError(
        f"no assessed weight moves the training loss: no record's gradient differs from the others' (sigma 0) "
        f"for any of the {est.d:,} weights "
        f"({', '.join(est.names[:4])}{' ...' if len(est.names) > 4 else ''}), so every figure would read 0 "
        "leakage. The library differentiates private copies of the model: a forward, hook or lambda set as an "
        "instance attribute that reaches the model through a global name (not through self) runs your model "
        "instead of the copy (set it in the class, or refer to the module through self); otherwise the "
        "forward or the loss detaches the outputs, or params= names weights the loss does not use")


def _sampling_notes(loader: Any) -> list[str]:
    """Notes for a training loader that does not read each record once: a sampler with
    replacement counts records as often as it draws them (n is then the draws), and a shuffled
    pass that leaves records out (``drop_last`` with a partial last batch, ``num_samples`` below
    the data) reads a different subset each call (figures move with the RNG)."""
    if not isinstance(loader, DataLoader):
        return []
    batches = loader.batch_sampler
    sampler = getattr(batches, "sampler", loader.sampler)
    drop_last = bool(getattr(batches, "drop_last", loader.drop_last))
    size = getattr(batches, "batch_size", loader.batch_size)
    if bool(getattr(sampler, "replacement", False)):
        return [f"train_dataloader's {type(sampler).__name__} draws records with replacement: each record counts "
                "as often as it is drawn (n is the number of draws, not of training records); assess over "
                "each training record once (a loader without a sampler, shuffle=False)"]
    if not isinstance(sampler, RandomSampler):
        return []
    total, drawn = len(sampler.data_source), sampler.num_samples
    kept = drawn - drawn % size if drop_last and size else drawn
    if kept >= total:
        return []
    why = "drops its last partial batch" if drawn >= total else f"draws {drawn} of its {total} records"
    return [f"train_dataloader shuffles and {why}: each call reads a different subset of the training "
            f"records ({kept} of {total}; the figures move with the RNG); read each record once "
            "(drop_last=False, no num_samples)"]


@restores_rng("train_dataloader")
def run_estimation(
    model: nn.Module,
    train_dataloader: Iterable,
    loss_fn: LossFn,
    config: EstimationConfig,
    *,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
    progress: ProgressFn | None = None,
) -> Estimate:
    """The estimation half of :func:`assess`: the selected parameters (``config.params``),
    then :func:`~mis_lightning.estimation.estimate` with ``config``'s options and a generator
    seeded with ``seed``; ``progress("estimation", records so far)`` after each batch.

    Raises:
        ValueError, KeyError: as :func:`select_params` and ``estimate``.
    """
    names = select_params(model, config.params)
    gen = torch.Generator().manual_seed(seed)
    est = estimate(
        model, train_dataloader, loss_fn, param_names=names,
        weight_decay=config.resolved_weight_decay(model), batch_fn=batch_fn, generator=gen,
        progress=(lambda k: progress("estimation", k)) if progress else None,
        **config.estimator_kwargs(),
    )
    if _TRAINING_RECORDS.get():  # the front end read the training split itself (training_records)
        est.diagnostics["records_from_training_loader"] = True
    return est


def score(*args: Any, **kwargs: Any) -> Report:
    """Deprecated name of :func:`score_schemes` (same arguments).

    Raises:
        As :func:`score_schemes`.
    """
    warnings.warn("mis_lightning.score is deprecated, use score_schemes", DeprecationWarning, stacklevel=2)
    return score_schemes(*args, **kwargs)


FAILED_ROW = "(it will be reported as a failed scheme)"


def assessed_weights_quantized(scheme: QuantizationScheme, model: nn.Module,
                               params: Sequence[str] | None = None,
                               reasons: dict[str, str] | None = None) -> list[str] | None:
    """The assessed parameters (``params``; ``None``: every parameter) that ``scheme`` would
    quantize on ``model``, decided from its layers without copying or quantizing anything: the
    layer-selection of the built-in backends (:meth:`~mis_lightning.quantization.QuantizationScheme.select_weights`
    with the backend's own skips, and the weights beyond ``nn.Linear`` its ``flat_spec`` takes), or
    every floating parameter for a dtype cast. ``None`` where it cannot be told without running the
    scheme (a third-party or mixed-precision scheme): such a scheme is not judged here.
    ``reasons``, when given, receives why the backend's layer selection leaves assessed weights of its
    layers in float (a tie to a layer it does not quantize, a group size), by parameter name."""
    from .quantization.base import SchemeConfig
    from .quantization.beyond_linear import beyond_linear_weights
    from .quantization.casts import DtypeCast

    named = dict(model.named_parameters())
    wanted = set(named) if params is None else set(params) & set(named)
    if isinstance(scheme, DtypeCast):
        return [n for n in named if n in wanted and named[n].is_floating_point()]
    if not isinstance(scheme, SchemeConfig) or isinstance(scheme, NoQuantization) \
            or type(scheme).select_weights is not SchemeConfig.select_weights:
        return None
    ids = {id(named[n]) for n in wanted}
    # the selection ``apply(params=...)`` sets for one call (object.__setattr__: frozen dataclasses)
    object.__setattr__(scheme, "_only", ids)
    try:
        chosen, why, _ = scheme.select_weights(model, skip_reason=getattr(scheme, "_skip_reason", None))
        spec = scheme.flat_spec()
        beyond = beyond_linear_weights(scheme, model, spec)[0] if spec is not None else []
    finally:
        object.__setattr__(scheme, "_only", None)
    if reasons is not None:
        reasons.update({n: r for n, r in why.items() if n in wanted})
    return [name for _, name, _ in chosen.values()] + [n for n in beyond if n in wanted]


def check_schemes(model: nn.Module, schemes: Sequence[QuantizationScheme], *, strict: bool,
                  availability: bool = False, params: Sequence[str] | None = None,
                  refused: list[str] | None = None) -> list[str]:
    """Check each scheme against ``model`` before anything is estimated or trained (the one
    check every front end runs: ``assess``, the Metric, the callback, the app): its
    :meth:`~mis_lightning.quantization.QuantizationScheme.check_model` (and, with
    ``availability``, its ``check_available``), and whether it would quantize any of the assessed
    weights ``params`` (:func:`assessed_weights_quantized`; ``None``: every parameter). The model
    is not modified.

    Returns:
        One message per scheme that cannot run or would quantize no assessed weight (each a failed
        row, :data:`FAILED_ROW`), naming it and why, for the caller to show; ``refused`` (when
        given) gets their scheme names, in the same order (:func:`refusals_shown`).

    Raises:
        SchemeError: (``strict``) the first scheme that cannot run; and, whatever ``strict``,
            when no requested scheme (``none`` aside) can quantize any assessed weight: the
            assessment could only report the float model (the message names every scheme and why).
    """
    problems: list[str] = []
    names: list[str] = []  # the schemes of ``problems``
    usable = 0
    for scheme in schemes:
        try:
            if availability:
                scheme.check_available()
            scheme.check_model(model)
        except SchemeError as exc:
            if strict:
                raise
            problems.append(str(exc))
            names.append(scheme.name)
            continue
        if isinstance(scheme, NoQuantization):  # the float release asked for: a reference, not a scheme
            continue
        why: dict[str, str] = {}
        quantized = assessed_weights_quantized(scheme, model, params, why)
        if quantized is not None and not quantized:
            layers = getattr(scheme, "layers", "its layers")
            beyond = " (and convolutions, embeddings, attention projections)" if (
                hasattr(scheme, "flat_spec") and scheme.flat_spec() is not None) else ""
            # the message of the scoring's own refusal (_prepare_scheme), said before training; where
            # an assessed weight is held by such a layer but left in float (a tie, a group size), why
            held = ("; ".join(f"{k}: {v}" for k, v in list(why.items())[:3]) if why
                    else "no assessed parameter is held by such a layer")
            tied = " (rtn_*, native_int8_per_row quantize a tied weight in every holder)" if "tied weight" in held else ""
            names.append(scheme.name)
            problems.append(f"scheme {scheme.name!r} applies to no assessed parameter of this model: it "
                            f"quantizes the weights of {layers}{beyond}, and {held}, so it would be scored as no "
                            f"protection at all; choose a scheme that applies{tied} (e.g. bf16 casts any parameter)")
            continue
        usable += 1
    if problems and usable == 0 and any(not isinstance(s, NoQuantization) for s in schemes):
        raise SchemeError("no requested scheme can quantize this model's assessed weights, so nothing was "
                          "trained or estimated: " + "; ".join(problems))
    if refused is not None:
        refused.extend(names)
    return [f"{p} {FAILED_ROW}" for p in problems]


def resolve_schemes(schemes: SchemeSpec | Sequence[SchemeSpec]) -> list[QuantizationScheme]:
    """Scheme objects from names / objects.

    Raises:
        ValueError: an empty list or a name listed twice.
        KeyError: an unknown name (the message lists the close registered names).
    """
    specs = scheme_list(schemes)
    check_scheme_names(specs)  # every unknown name at once, not the first only
    out = [get_scheme(s) for s in specs]
    seen: dict[str, Any] = {}
    for spec, s in zip(specs, out):
        if s.name in seen:
            given = [x for x in (seen[s.name], spec) if isinstance(x, str) and x != s.name]
            alias = f" ({' and '.join(repr(g) for g in given)} {'is an alias' if len(given) == 1 else 'are aliases'} of it)" \
                if given else ""
            raise ValueError(f"scheme {s.name!r} is listed twice{alias}")
        seen[s.name] = spec
    return out


def _running_statistics_layers(model: nn.Module) -> list[str]:
    """Normalisation layers whose running statistics were updated (BatchNorm or InstanceNorm with
    ``track_running_stats`` that ran in train mode): float buffers computed from the training
    batches, released with the weights and not scored (the report's
    ``diagnostics["running_statistics_layers"]``, a line of the table). A layer whose
    ``num_batches_tracked`` is 0 counts too where its statistics are not their reset values
    (:func:`_statistics_without_counter`: loaded from a state dict without the counter)."""
    from torch.nn.modules.batchnorm import _NormBase

    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
            and (m.num_batches_tracked is None or int(m.num_batches_tracked) > 0
                 or _statistics_without_counter(m))]


def _statistics_without_counter(m: nn.Module) -> bool:
    """Whether the normalisation layer ``m`` holds running statistics other than its reset values
    (``running_mean`` 0, ``running_var`` 1) while its ``num_batches_tracked`` says no batch ran: a
    state dict loaded without the counter (``load_state_dict(..., strict=False)`` after dropping the
    ``num_batches_tracked`` keys, as checkpoint converters and a common idiom do; a state dict
    without its version metadata gets the counter 0). Such statistics were computed from some data,
    the training batches if the layer ran in train mode: read by the counter alone they were not
    reported and the figures silently claimed the whole release (docs/benchmarks.md "rv59": the
    running mean of 400 records in 8 dimensions, alone, leaks 0.057, exact, above the int2 model's
    figure). An uninitialised lazy layer has none."""
    mean, var = m.running_mean, m.running_var
    if nn.parameter.is_lazy(mean) or mean.device.type == "meta":
        return False
    return bool(mean.detach().ne(0).any()) or (var is not None and bool(var.detach().ne(1).any()))


def _stochastic_layers(model: nn.Module) -> list[str]:
    """Layers random in train mode only, whose randomness the training objective averages over:
    dropout modules with ``p > 0`` (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...),
    ``MultiheadAttention`` with attention dropout, ``RReLU``. (Dropout written as
    ``F.dropout(..., self.training)`` inside a forward is not seen.)"""
    from torch.nn.modules.dropout import _DropoutNd

    return [name or type(m).__name__ for name, m in model.named_modules()
            if (isinstance(m, _DropoutNd) and float(m.p) > 0) or isinstance(m, nn.RReLU)
            or (isinstance(m, nn.MultiheadAttention) and float(m.dropout) > 0)]


def mode_dependent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model itself and its modules that compute another function in train mode than in eval
    mode (running-statistics normalisation, :func:`_stochastic_layers`' kinds), each named as those
    lists name it (the model itself: its class name). A front end that watches the training
    records which of them its last training batch ran in eval mode
    (``diagnostics["eval_mode_in_training"]``): those are no cause of the eval-mode objective
    differing from the one trained."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    return [(name or type(m).__name__, m) for name, m in model.named_modules()
            if not name or (isinstance(m, _NormBase) and m.track_running_stats) or isinstance(m, (_DropoutNd, nn.RReLU))
            or (isinstance(m, nn.MultiheadAttention) and float(m.dropout) > 0)]


def _mode_suspects(model: nn.Module, diagnostics: Mapping[str, Any] | None) -> tuple[list[str], list[str], bool]:
    """The running-statistics layers, the dropout layers and whether dropout written in the
    forward (``diagnostics["random_in_train_mode"]`` without a dropout layer) may have made the
    trained objective differ from the eval-mode one assessed, leaving out those the front end saw
    in eval mode at the last training batch (``diagnostics["eval_mode_in_training"]``: the model
    itself there rules out dropout written in its forward, which follows its flag)."""
    evald = set((diagnostics or {}).get("eval_mode_in_training") or ())
    drops_all = _stochastic_layers(model)
    norms = [n for n in _running_statistics_layers(model) if n not in evald]
    drops = [n for n in drops_all if n not in evald]
    written = (not drops_all and bool((diagnostics or {}).get("random_in_train_mode"))
               and type(model).__name__ not in evald)
    return norms, drops, written


def _shown(names: list[str], k: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _batch_statistics_cause(model: nn.Module, diagnostics: Mapping[str, Any] | None = None) -> str:
    """The not-at-a-minimum warning's clause for a model with layers that compute another function
    in train mode than in eval mode: running-statistics normalisation
    (:func:`_running_statistics_layers`; trained with batch statistics, assessed with the running
    ones) and dropout-like layers (:func:`_stochastic_layers`; trained on the loss averaged over
    random masks, assessed without them). Either way training minimised another objective than
    the one assessed in eval mode, whose minimum no amount of train-mode training reaches
    (BatchNorm: 4.50 sd after 4 L-BFGS rounds, 4.53 after 20, 1.16 after as many in eval mode;
    Dropout(0.3): 3.0 sd after 400 Adam steps, 4.7 after 1,600, at a minimum after 300
    more in eval mode). A forward random in train mode without such a layer
    (``diagnostics["random_in_train_mode"]``, the estimation's first batch:
    :meth:`~.estimation.per_sample.LossProgram.random_in_train_mode`) has dropout written in it
    (``F.dropout(x, p, self.training)``), named as such. Layers the training's last batch
    ran in eval mode are none of them (:func:`_mode_suspects`). ``""`` without any of them."""
    norms, drops, written = _mode_suspects(model, diagnostics)
    if not norms and not drops and not written:
        return ""
    what = []
    if norms:
        what.append(f"normalises with running statistics ({_shown(norms)}): trained in train mode it minimised the "
                    "loss with each batch's statistics, while the assessment evaluates it in eval mode with the "
                    "running ones")
    if drops or written:
        where = (_shown(drops) if drops else "written in its forward: a train-mode forward is random though no dropout "
                 "layer is, e.g. F.dropout(x, p, self.training) or torch.dropout")
        what.append(f"has dropout ({where}): trained in train mode it minimised the loss averaged over random "
                    "dropout masks, while the assessment evaluates it in eval mode, without them")
    return (f"the likely cause here: the model {'; and it '.join(what)}: a different objective whose minimum longer "
            "training in train mode does not reach (training longer does not remove this warning); to assess at "
            "the minimum, end training with steps in eval mode (model.eval(): "
            + ("the running statistics frozen, " if norms else "") + ("dropout off, " if drops or written else "")
            + "the objective assessed) before assessing, else read the figures as indicative. Otherwise, ")


#: what the stiff-direction statistic reads at a fit's minimum, in every warning that quotes it (one
#: figure, one wording: rv55z found "~1 or more" in one and "about 1.4" in another; method.md section 6,
#: "Records unlike the training set")
STIFF_READINGS = (f"a fit's training records read ~0 at its minimum, m records it never saw about sqrt(1 + m / n) "
                  f"against its n training records (~1 for few, {math.sqrt(2):.2g} for as many, "
                  f"{UNSEEN_RECORDS_EXPLAIN_MAX:g} for 8 times as many)")


def _not_at_minimum_suspects(model: nn.Module, diagnostics: Mapping[str, Any] | None = None) -> str:
    """The not-at-a-minimum warning's likely causes, short: its first sentence is what the console
    shows (:func:`~mis_lightning._warning_lines.warning_line`); the warning's text after
    it says each in full (:func:`_batch_statistics_cause` for the layers named here, and dropout
    written in the forward, found as :func:`_batch_statistics_cause` finds it). Where the front end
    watched the training (``diagnostics["eval_mode_in_training"]``, the callback) the layers it ran
    in eval mode are left out and the rest named as trained in train mode; elsewhere (``assess``:
    how training ended is not known) they are named on that condition (a model whose dropout
    the user ended in eval mode, as the warning advises, read "likely: dropout ...")."""
    norms, drops, written = _mode_suspects(model, diagnostics)
    if norms or drops or written:
        what = " and ".join([*([f"running statistics {_shown(norms, 2)}"] if norms else []),
                             *([f"dropout {_shown(drops, 2)}"] if drops else []),
                             *(["dropout written in its forward"] if written else [])])
        if "eval_mode_in_training" in (diagnostics or {}):
            return f"likely: {what} trained in train mode, assessed in eval mode"
        return f"likely, if trained in train mode: {what} (assessed in eval mode)"
    diagnostics = diagnostics or {}
    cause, held = stiff_offset_cause(diagnostics), diagnostics.get("offset_decay_held")
    stiff = f"{float(diagnostics.get('stiff_offset_sd', float('nan'))):.3g} sd along the stiff directions"
    if cause == "records_or_off" and held:
        # the step lies along directions the decay alone holds, yet the stiff ones are off: records the
        # model never saw read so (nux53 #14: validation records 1.49 sd, the members 0.007), and so do
        # minibatch fits on their own records (nf51: 0.67-1.50), so neither leads as "likely" (nux55)
        return f"records it was not trained on, or not converged: {stiff}"
    if cause == "off_minimum" and held:
        # the records are the training records (or read beyond what unseen ones reach): not "converged
        # along the others" (nux55: the callback said so of a fit 18 sd off along its stiff directions)
        return f"not converged: {stiff}, not only along near-flat ones"
    if held:
        return "only along near-flat directions the weight decay alone holds: converged along the others"
    if diagnostics.get("records_from_training_loader"):  # the front end read the training records itself
        return "not converged, or another loss or weight decay"
    if cause == "off_minimum":  # above 3 sd: records it never saw alone do not read so (rv55z)
        return f"not converged, or another loss or weight decay: {stiff}"
    return "not converged, another loss or weight decay, or records other than the ones it was trained on"


def _not_at_minimum_detail(diagnostics: Mapping[str, Any]) -> str:
    """The not-at-a-minimum warning's sentence on what the exact estimator's diagnostics single
    out, ``""`` where nothing: records that read like records the model was not
    trained on, or a fit off its minimum along the stiff directions whatever the records
    (:func:`~mis_lightning.report.stiff_offset_cause`), or a Newton step that lies along directions the
    weight decay alone holds (``offset_decay_held``, :func:`~.estimation.estimate._decay_held`)."""
    stiff = diagnostics.get("stiff_offset_sd")
    cause = stiff_offset_cause(diagnostics)
    if cause == "records_or_off":
        held = (f"; the Newton step itself lies along directions only the weight decay holds (without them "
                f"{float(diagnostics.get('minimum_offset_sd_rest', float('nan'))):.3g} sd), so the stiff directions are "
                "what tells these records from this fit's training records") \
            if diagnostics.get("offset_decay_held") else ""
        return (f"; along the stiffer half of the Hessian's directions, where training converges first, the records' "
                f"mean gradient is {float(stiff):.3g} of its own sampling standard deviation (root mean square; "
                f"{STIFF_READINGS}; the limit is {UNSEEN_RECORDS_SD:g}): if these records are a validation or test set, the figures are not the "
                "members' leakage -- pass the records the model was trained on; if they are its training records, "
                f"the fit is off its minimum along the stiff directions too{held}")
    off = ("" if cause != "off_minimum" else
           f"the records' mean gradient along the stiffer half of the Hessian's directions, where training converges "
           f"first, is {float(stiff):.3g} of its own sampling standard deviation (root mean square; the limit is "
           f"{UNSEEN_RECORDS_SD:g}; {STIFF_READINGS}"
           + ("): these are the training records, so " if diagnostics.get("records_from_training_loader")
              else "): so unless these are more than 8 times as many records the model never saw, ")
           + "the fit is off its minimum along the stiff directions too: training stopped short there, or it "
           "minimised another objective (a constant-step minibatch optimizer's noise, a weight decay not passed as "
           "weight_decay=, AdamW's decay (its own warning, where read from the optimizer), another loss)")
    if not diagnostics.get("offset_decay_held"):
        return f"; {off}" if off else ""
    if off:  # nux55: not "at a minimum except along near-flat directions" with the stiff ones 18 sd off
        return (f"; the Newton step lies mostly along {int(diagnostics.get('decay_held_directions') or 0)} "
                f"direction(s) of the Hessian that only the weight decay holds (without them "
                f"{float(diagnostics.get('minimum_offset_sd_rest', float('nan'))):.3g} sd), but {off}")
    k = int(diagnostics.get("decay_held_directions") or 0)
    shares = diagnostics.get("offset_held_parameters") or {}
    where = (" and lies in " + ", ".join(f"{nm} ({100 * v:.0f}%)" for nm, v in list(shares.items())[:4])) \
        if shares else ""
    return (f"; that step is along {k} direction(s) of the Hessian that only the weight decay holds (the records' "
            f"curvature along them is within {DECAY_HELD_FACTOR:g}x the decay's: a near-symmetry of the model, e.g. "
            "a normalisation layer's scale traded against the Linear after it, or the scale of the weights before "
            f"it){where}: without them the step is "
            f"{float(diagnostics.get('minimum_offset_sd_rest', float('nan'))):.3g} sd, under the limit"
            + ("" if stiff is None else f", and along the stiff half of the directions the records' mean gradient is "
               f"{float(stiff):.3g} sd ({STIFF_READINGS})")
            + ". So the model is at a minimum except along directions the records barely determine, where training "
            "converges only at the decay's slow rate; the figures stay marked * (the analysis assumes the exact "
            "minimum): train on (more steps, or a second-order optimizer such as L-BFGS) or remove the "
            "near-symmetry (e.g. LayerNorm(..., elementwise_affine=False) before a Linear) to clear it")


def _running_statistics_note(model: nn.Module) -> str | None:
    """The warning for :func:`_running_statistics_layers`; ``None`` where there is none."""
    names = _running_statistics_layers(model)
    if not names:
        return None
    shown = ", ".join(repr(k) for k in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    modules = {k or type(v).__name__: v for k, v in model.named_modules()}  # as _running_statistics_layers names them
    uncounted = [k for k in names if k in modules and int(modules[k].num_batches_tracked or 0) == 0]
    if uncounted:  # found by their values (_statistics_without_counter), not by the counter
        shown += (f"; {_shown(uncounted)} with num_batches_tracked 0 but statistics other than their reset values: "
                  "loaded without the counter, computed from some data")
    return (f"the release holds the running statistics of {len(names)} normalisation layer(s) ({shown}): float "
            "buffers (running_mean, running_var) computed from the training batches, released with every scheme "
            "and not scored, so every figure here is a lower bound for the release. They leak membership too, the "
            "last batches' records the most (docs/method.md section 6: one running mean can leak more than its "
            "model's int2 weights); recomputing them on data that is not private before release removes this "
            "channel (statistics computed from other data, a frozen pretrained encoder's, do not leak)")


def _data_buffers_note(names: Sequence[str]) -> str:
    """The warning for buffers of the user's own modules that a forward sets from the records
    (:func:`~mis_lightning.estimation.data_buffers.data_dependent_buffers`): like running
    statistics, released in float and not scored."""
    shown = ", ".join(repr(k) for k in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"the release holds {len(names)} buffer(s) or frozen parameter(s) that the forward sets from the "
            f"records it sees in train mode ({shown}: two halves of a training batch leave them at different "
            "values): if they were "
            "updated while training, as an input standardiser's running mean or an exponential average is, they "
            "are computed from the training records, released in float with every scheme and not scored, so "
            "every figure here is a lower bound for the release. Recompute them on data that is not private "
            "before release (or leave them out of the state dict: register_buffer(..., persistent=False)) to "
            "close this channel; values set once from public data do not leak")


def _fitted_buffers_note(fitted: dict[str, str]) -> str:
    """The warning for buffers that equal statistics of the training inputs read (a standardiser or
    scaler fitted on them before training, which no forward sets)."""
    items = list(fitted.items())
    shown = "; ".join(f"{k!r}: {v}" for k, v in items[:4]) + (f"; and {len(items) - 4} more" if len(items) > 4 else "")
    return (f"the release holds {len(items)} buffer(s) or frozen parameter(s) equal to statistics of the training "
            f"inputs read ({shown}): a standardiser or scaler fitted on the training records, released in float "
            "with every scheme and not scored, so every figure here is a lower bound for the release (a mean over "
            "the records leaks as a normalisation layer's running statistics do: docs/method.md section 6). Fit "
            "it on data that is not private (or leave it out of the state dict) to close this channel")


def _data_buffers_unchecked_note(names: Sequence[str], why: str) -> str:
    """The warning where the probe for buffers a forward sets from the records could not run
    (:func:`~mis_lightning.estimation.data_buffers.probe_data_buffers`): the candidates are
    named, as unknown rather than clean."""
    shown = ", ".join(repr(k) for k in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"could not check whether the forward sets {len(names)} buffer(s) or frozen parameter(s) from the "
            f"records ({shown}): {why}. If any was updated from the training records while training (an input "
            "standardiser's running mean, an exponential average), it is released in float with every scheme and "
            "not scored, and every figure here is a lower bound for the release; values set once from public "
            "data, constant tables and step counters do not leak")


# elements per float64 block of the whole-tensor checks below: a 8192 x 8192 weight in float64
# with its difference and absolute value was 2 GiB at once (the 1e8 benchmark's scoring, mm32)
_CHECK_BLOCK = 1 << 20


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    """``max |a - b|`` in float64 over flat tensors of one shape, block by block (a NaN wins)."""
    out = 0.0
    for i in range(0, a.numel(), _CHECK_BLOCK):
        d = float((a[i: i + _CHECK_BLOCK].to("cpu", torch.float64)
                   - b[i: i + _CHECK_BLOCK].to("cpu", torch.float64)).abs().max())
        if math.isnan(d):  # as one max over the whole tensor
            return d
        out = max(out, d)
    return out


def _max_abs(a: Tensor) -> float:
    """``max |a|`` of a flat tensor, block by block (``a.abs().max()`` is exact in any float dtype)."""
    return _max_abs_diff(a, torch.zeros((), dtype=a.dtype).expand(a.shape))


# _check_model_matches_estimate passes a parameter whose values equal the estimate's theta exactly
# at once (torch.equal: ~7 against ~45 ms for the float64 differences of the 1e7 MLP's weights; NaN
# is never equal, so it reaches the full test); False: the differences always (A/B). Models up to
# 1e7 weights keep theta in float64 (the model's float32 widened): compared in float64, block by
# block (dup48: on the 1e5 / 1e6 MLPs the shortcut never fired while it compared dtypes; 0.19 / 2.3
# ms against the differences' 0.68 / 7.6 ms)
MATCH_EQUAL_FIRST = True


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether flat float tensors ``a`` and ``b`` (one shape, one device, any float dtypes) hold
    exactly the same values (NaN never; ``-0.0`` equals ``0.0``): compared in their promoted dtype,
    which holds both exactly (float32 and float64: float64; float16 and bfloat16: float32), block by
    block (:data:`_CHECK_BLOCK`); ``False`` for other dtypes unless they are equal (then
    ``torch.equal``)."""
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    if not (a.is_floating_point() and b.is_floating_point()) or a.shape != b.shape:
        return False
    dt = torch.promote_types(a.dtype, b.dtype)
    return all(torch.equal(a[i: i + _CHECK_BLOCK].to(dt), b[i: i + _CHECK_BLOCK].to(dt))
               for i in range(0, a.numel(), _CHECK_BLOCK))


def _check_model_matches_estimate(est: Estimate, model: nn.Module) -> None:
    """The schemes quantize ``model``'s weights while sigma and the influences are those of
    ``est``: weights changed since the estimation (training on after a Metric's first
    ``update``, or another model) would score a mix of two models, silently. The estimate's
    ``theta`` are exact copies of the weights it read, so any difference above 1e-6 of the
    tensor's largest weight is a change.

    Raises:
        ValueError: naming the first assessed parameter that differs, is missing, or holds a NaN.
    """
    named = dict(model.named_parameters())
    for k in est.names:
        if k not in named:
            raise ValueError(f"the model has no parameter {k!r}, which the estimate assessed: score the "
                             "model the estimate was computed from")
        now, then = named[k].detach().reshape(-1), est.theta[k].reshape(-1)
        if MATCH_EQUAL_FIRST and now.device == then.device and _same_values(now, then):  # difference 0
            continue
        diff = math.inf if now.shape != then.shape else _max_abs_diff(now, then)
        scale: float | None = None
        if math.isnan(diff):  # `nan > tol` is False: a weight turned NaN would pass the test below
            a, b = now.to("cpu", torch.float64), then.to("cpu", torch.float64)
            if not torch.equal(a.isnan(), b.isnan()):
                raise ValueError(
                    f"the model's parameter {k!r} holds a NaN weight where the estimate read a number "
                    "(or the reverse): the weights changed since the estimation; estimate again on finite weights")
            keep = ~a.isnan()  # NaN in the same places (the estimate's own reading): compare the rest
            diff = float((a[keep] - b[keep]).abs().max()) if bool(keep.any()) else 0.0
            scale = float(b[keep].abs().max()) if bool(keep.any()) else 0.0
        if diff > 1e-6 * max(_max_abs(then) if scale is None else scale, 1e-30):
            raise ValueError(
                f"the model's weights differ from those the estimate was computed from (parameter {k!r}): the "
                "schemes would quantize the new weights while sigma and the influences are the old ones'. "
                "Estimate again on the current weights (MISIndicator: reset() and update again; its weights "
                "are read at the first update after construction or reset())")


@restores_rng("val_dataloader", "calibration_data")
@full_float32
@_outside_inference_mode
def score_schemes(
    est: Estimate,
    model: nn.Module,
    schemes: Sequence[SchemeSpec],
    *,
    scoring_config: ScoringConfig | None = None,
    val_dataloader: Iterable | None = None,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, Any] | None = None,
    output_transform: OutputTransform | None = None,
    batch_fn: BatchFn | None = None,
    utility_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    progress: ProgressFn | None = None,
    calibration_data: Iterable | None = None,
    **options: Any,
) -> Report:
    """Score each scheme from an estimate: the second half of :func:`assess` (see it for the
    arguments; ``options`` are fields of :class:`~mis_lightning.config.ScoringConfig`).

    ``est`` comes from :func:`run_estimation` (or ``estimate``, or a Metric's synced states).
    ``utility_fn(quantized_copy) -> {name: value}``, when given, measures each quantized
    copy's utility instead of ``evaluate_utility`` over ``val_dataloader`` (front ends with
    their own evaluation loop, e.g. the Lightning callback). ``progress("schemes", i)`` after
    the i-th scheme is quantized and evaluated; ``("compile", 0)`` / ``("compile", 1)`` around
    the compilation and check of the cell-moment kernel, before the cell-moment pass, when the
    compile policy will use it in this call. ``calibration_data`` (training batches): each
    scheme's ``calibrate(model, batches)`` runs on it first (data-dependent schemes; a no-op
    for data-free ones); ``None`` skips calibration.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: an invalid option, ``n < 4`` records (:func:`~mis_lightning.record_count.check_enough_records`),
            non-finite ``sigma``, ``model``'s weights not those of ``est``, or (with ``strict``)
            a failing scheme's error.
        KeyError: an unknown scheme name.
    """
    cfg = scoring_only("score_schemes", scoring_config, options)
    est = est.cpu()  # the scoring's sums are CPU tensors, whatever device the estimation ran on
    method, uncertainty_draws, num_samples = cfg.method, cfg.uncertainty_draws, cfg.mc_draws
    seed, strict, chunk_size = cfg.seed, cfg.strict, cfg.chunk_size
    scheme_objs = resolve_schemes(list(schemes))
    if calibration_data is not None:  # data-dependent schemes learn first (data-free: no-op)
        scheme_objs = [s.calibrate(model, calibration_data) for s in scheme_objs]
    n = est.n
    check_enough_records(n, d=est.d)  # the pool protocol's figures are those of n / 2 records, which need >= 2
    for k in est.names:
        check_finite(f"sigma of {k!r}", est.sigma[k])
    _check_some_gradient(est)
    _check_model_matches_estimate(est, model)
    raise_mmap_threshold()  # before the scoring's first temporaries (a process that skipped the estimation here)
    R = est.num_records
    estimation_info = {"mode": est.mode, "hessian": est.hessian, "num_records": R,
                       "estimator": est.estimator, "reason": est.reason,
                       "leverage_correction": bool(est.diagnostics.get("leverage_correction", False)),
                       # the L2 coefficient the objective was assessed with (0: unpenalised)
                       "weight_decay": est.diagnostics.get("weight_decay")}
    if "num_records_requested" in est.diagnostics:  # more asked for than there are records (fu31)
        estimation_info["num_records_requested"] = int(est.diagnostics["num_records_requested"])
    if "weight_decay_per_parameter" in est.diagnostics:
        estimation_info["weight_decay_per_parameter"] = est.diagnostics["weight_decay_per_parameter"]
    diagnostics = dict(est.diagnostics)
    rc = _record_correlation(est, cfg)
    estimation_info["covariance"] = "independent" if rc is None else rc.kind

    # Phase A: quantize each scheme and evaluate its copy. Nothing here touches w or sigma.
    # Parameters stored in bf16 / fp16 released unquantized are released on their storage grid.
    storage = storage_grids(model, est.names)
    prepared: list[_Prepared] = []
    failures: dict[str, str] = {}
    interval_lost: list[str] = []  # schemes whose interval read NaN at a corner (dropped, warned)
    interval_point: list[str] = []  # schemes whose interval had no width (dropped, warned: iv58)
    layers_lost: dict[str, list[str]] = {}  # per scheme, the layers whose figure read NaN (warned)
    utility_records: int | None = None
    utility_errors: dict[str, dict[str, Any]] = {}  # Report.utility_errors
    shared_facts: list = []  # the scale facts the schemes reveal alike (scale_facts_shared)
    # whether anything runs a scheme's quantized copy (the utility); if not, the casts read the
    # model itself instead of copying it (casts.CAST_WITHOUT_COPY)
    read_release = utility_fn is not None or (val_dataloader is not None and loss_fn is not None)
    for scheme in scheme_objs:
        try:
            # the up-front reasons (no copy), not a vaguer one after apply: can it run here, then
            # can it take this model
            scheme.check_available()
            scheme.check_model(model)
            prep = _prepare_scheme(est, model, scheme, uncertainty_draws, shared_facts=shared_facts,
                                   release=read_release)
            prep.requant_seed = seed + 104729  # one seed for all schemes: common random numbers
            try:  # a quantized weight used outside its module: named (nux50)
                with release_forward(prep.qmodel, scheme.name) if prep.qmodel is not None else nullcontext():
                    values = None
                    if utility_fn is not None:
                        values = utility_fn(prep.qmodel)
                    elif val_dataloader is not None and loss_fn is not None:
                        values = evaluate_utility(prep.qmodel, val_dataloader, loss_fn, metrics,
                                                  batch_fn=batch_fn, output_transform=output_transform)
                    if values is not None:  # a plain dict in the report (torch.load(weights_only=True) reads it)
                        prep.utility = {k: float(v) for k, v in values.items()}
                    # the validation records counted (evaluate_utility's; a user's utility_fn: unknown)
                    utility_records = getattr(values, "records", None) or utility_records
                    for key, err in (getattr(values, "errors", None) or {}).items():  # each scheme's own se (ux54c)
                        kept = utility_errors.setdefault(key, {"average": err["average"], "se": {},
                                                               "chance_se": err["chance_se"]})
                        if err["se"] is not None:
                            kept["se"][scheme.name] = err["se"]
            except ReleaseForwardError as exc:  # the leakage is the weights': kept, the utility fails
                if strict:
                    raise
                prep.utility_error = str(exc)
            prep.qmodel = None  # release the copy; only its grids are kept
            prepared.append(prep)
            if progress is not None:
                progress("schemes", len(prepared) + len(failures))
        except Exception as exc:
            if strict:
                raise
            if scheme.name not in _REFUSALS_SHOWN.get():  # the report's row and warnings say why
                log.info("scheme %s failed (an error row): %s", scheme.name, type(exc).__name__)
            failures[scheme.name] = f"{type(exc).__name__}: {exc}"
            if progress is not None:
                progress("schemes", len(prepared) + len(failures))

    # Phase B: parameter by parameter, every scheme's cell moments (at theta-hat and at the
    # bootstrap draws) and one pass over the records' influences for all of them.
    col = 1
    for prep in prepared:
        prep.column = col
        col += 2 + prep.num_draws  # main, draws, pool protocol
    # The Monte Carlo form (small models, stored influences) needs every tensor's moments.
    policy = F.CompilePolicy.parse(cfg.compile, source="ScoringConfig.compile")
    # the wide shares' sample (fx35: ~0.06 s a call at 1e5) only where the upper bound would compile:
    # compile_due grows with the count, so below it the exact count decides the same
    fused = _fused_elements(est, prepared, chunk_size, keep=est.influence_stored, shares=False)
    if F.affine.compile_due(policy, fused):
        fused = _fused_elements(est, prepared, chunk_size, keep=est.influence_stored)
    with scoring_threads():  # memory-bound kernels: 1 thread on an oversubscribed machine (threads.py)
        # Compile and self-check the cell-moment kernel now, visibly, if this pass would do it
        # mid-call; at the pass's thread count (dynamo guards on it and inductor bakes it in: a
        # kernel warmed up at the caller's count was compiled again inside the pass, mm32).
        if fused and est.theta:
            F.warm_up_compiled_kernel(policy, fused, progress, device=next(iter(est.theta.values())).device)
        stored_base: dict[str, tuple[F.CltSums, Tensor | None, Tensor | None, F.CltSums]] = {}
        try:
            if storage and not prepared:  # the baseline's storage cells without any scheme to carry them
                prepared_base = _Prepared(NoQuantization())
                prepared_base.storage = dict(storage)
                sums = _joint_sums(est, [prepared_base], chunk_size, seed, keep_moments=est.influence_stored,
                                   strict=strict, policy=policy, stored=stored_base)
                sums = {k: v[:1] for k, v in sums.items()}
            else:
                sums = _joint_sums(est, prepared, chunk_size, seed, keep_moments=est.influence_stored, strict=strict,
                                   policy=policy, stored=stored_base)
        finally:  # the chunk facts kept for the pool call (ParamGrid._chunk_grid) end with the pass
            release_chunk_facts()
            F.table.release_own_cells()
    for prep in prepared:
        if prep.failed:
            failures[prep.scheme.name] = prep.failed
    base_layers = {name: sums[name][0] for name in est.names}
    base_total = _total(base_layers, R)
    baseline = float(base_total.leakage(n).mean())
    baseline_pool = float(base_total.leakage(n / 2).mean())  # kappa = 1: the cells do not enter
    base_kvec = base_kvec_pool = None  # stored weights: the storage grid's kappa (else 1)
    if stored_base:
        # the unquantized release of stored weights is their storage grid: the pool protocol reads
        # its cells at sigma / sqrt(2) (float32 parameters: kappa = 1, their baseline column)
        pool_layers = {name: stored_base[name][0] if name in stored_base else base_layers[name] for name in est.names}
        baseline_pool = float(_total(pool_layers, R).leakage(n / 2).mean())
        if all(v[1] is not None for v in stored_base.values()):
            base_kvec = _kappa_vector(est, {k: v[1] for k, v in stored_base.items()})  # type: ignore[misc]
            base_kvec_pool = _kappa_vector(est, {k: v[2] for k, v in stored_base.items()})  # type: ignore[misc]
    # per record, the unquantized first-order value t (before the saturation): the spread term's
    # reference for every scheme (method.md section 4, "Spread term")
    base_t = F.cells.SQRT_2_OVER_PI * base_total.s2.clamp_min(0.0).sqrt() / (2 * math.sqrt(n))
    # the reference is the continuous estimate's t (kappa = 1), whose narrowing the leverages are:
    # with stored weights the baseline itself is a release (their storage grid) that keeps the
    # fraction (t / ref_t)^2 of it, as a scheme does
    ref_t = base_t
    if stored_base:
        cont = {name: stored_base[name][3] if name in stored_base else base_layers[name] for name in est.names}
        ref_t = F.cells.SQRT_2_OVER_PI * _total(cont, R).s2.clamp_min(0.0).sqrt() / (2 * math.sqrt(n))

    def spread(t: Tensor, ref: Tensor) -> float:
        """The baseline with the spread term (float32 weights: the operations before the storage grid)."""
        assert est.leverage is not None
        if not stored_base:
            return float(F.saturate_spread(t, est.leverage).mean())
        return float(F.with_spread(F.saturate(t), ref, est.leverage).mean())

    # the independent form's own reference, for the independent values kept beside a correlated
    # headline: they get the spread term as covariance="independent" would give them (fu28)
    base_t_independent = ref_t
    form_gap = None  # the two unquantized forms, when they disagree
    if rc is not None:
        diagnostics["baseline_leakage_independent"] = (
            baseline if est.leverage is None else spread(base_t, ref_t))
        assert est.influence is not None
        cont_abs = _unquantized_mean_abs(est, rc)  # the continuous release (kappa = 1)
        base_abs = base_abs_pool = cont_abs
        if base_kvec is not None and base_kvec_pool is not None:
            # stored weights: the storage grid's kappa through the correlation, capped by the
            # continuous value, as _correlated_leakage scores the 'none' row
            base_abs = torch.minimum(rc.gaussian_mean_abs(est.influence, base_kvec), base_abs)
            base_abs_pool = torch.minimum(rc.gaussian_mean_abs(est.influence, base_kvec_pool), base_abs_pool)
        continuous = float(F.saturate(cont_abs / (2 * math.sqrt(n))).mean())
        base_t = base_abs / (2 * math.sqrt(n))
        ref_t = cont_abs / (2 * math.sqrt(n))  # base_t itself unless stored weights lowered it
        baseline = float(F.saturate(base_t).mean())
        baseline_pool = float(F.saturate(base_abs_pool / (2 * math.sqrt(n / 2))).mean())
        if rc.kind == "full" and est.mahalanobis is not None:
            # The quantized schemes are scored through the weights' correlation (its
            # pseudo-inverse); the baseline from the gradient covariance, which the Hessian
            # cancels out of. Equal when the Hessian is well conditioned; apart, the covariance
            # is not determined in every direction and schemes can read above the baseline.
            corr_form = float(F.saturate(rc.gaussian_mean_abs(est.influence) / (2 * math.sqrt(n))).mean())
            diagnostics["baseline_leakage_correlation_form"] = corr_form
            # the two forms of the continuous release (kappa = 1; the storage grid aside)
            if abs(corr_form - continuous) > CONSISTENCY_TOLERANCE * continuous:
                form_gap = (continuous, corr_form)
            # the unquantized figure re-read at its rank rule 100x finer, as each scheme's is (pl46)
            base_cutoff = _baseline_cutoff_check(est, rc, n, continuous)
            if base_cutoff is not None:
                diagnostics["baseline_cutoff_sensitivity"] = base_cutoff
    if est.leverage is not None:  # the spread term (the two forms above are compared without it)
        diagnostics["baseline_leakage_without_spread"] = baseline
        baseline = spread(base_t, ref_t)
    report = Report(
        n=n, d=est.d, estimation=estimation_info, diagnostics=diagnostics, schemes={},
        baseline_leakage=baseline, baseline_mis=1.0 - baseline, baseline_pool_leakage=baseline_pool,
    )

    # Phase C: per scheme, the chosen method, per-layer values and the interval.
    _joint_exact_fourth(est, [p for p in prepared if p.scheme.name not in failures], sums, chunk_size, policy)
    for scheme in scheme_objs:
        if scheme.name in failures:
            report.schemes[scheme.name] = SchemeResult(
                name=scheme.name, leakage=math.nan, mis=math.nan, baseline_leakage=baseline,
                d_eff=math.nan, d=est.d, zero_fraction=math.nan, pinned_fraction=math.nan,
                bits_per_weight=math.nan, method="-", error=failures[scheme.name],
                description=scheme.describe(),
            )
            continue
        prep = next(p for p in prepared if p.scheme is scheme)
        # The same draws for every scheme (common random numbers): differences between
        # schemes are then far less noisy than the schemes' own Monte Carlo errors.
        gen = torch.Generator().manual_seed(seed + 7919)
        # the Monte Carlo and box-mean forms are memory-bound too (fu25: 1.6 -> 19.7 s CPU of spinning
        # threads at load ~4 on 2 cores): the same thread scoping as the pass
        with scoring_threads():
            result = _finish_scheme(est, prep, sums, base_layers, baseline, method, num_samples, gen, chunk_size,
                                    rc=rc, base_t=ref_t, policy=policy,
                                    base_t_independent=base_t_independent, base_kvec=base_kvec)
        if result.error is None and not math.isfinite(result.leakage):  # never a silent NaN
            result.error = _nonfinite_error(result.method, rc, result.leakage_independent)
            failures[scheme.name] = result.error
        elif result.error is None and result.interval is not None and \
                not all(math.isfinite(v) for v in result.interval):
            # rv56s: a corner of the kappa box whose correlated form could not be certified reads NaN
            # while the headline holds; a NaN end compared as no overlap, and the verdict called the
            # row clearly different: no interval then (the verdict's "cannot be judged"), said
            result.interval = None
            interval_lost.append(scheme.name)
        elif result.error is None and _point_interval(result.leakage, result.interval):
            # iv58: every stored record read the same figure (all saturated at 1, or d >= the stored
            # records' rank): the interval's width, the records' spread and the positions', read 0, a
            # certainty the data do not give (a Gaussian mean at d / n = 1.31: [0.383, 0.383], exact 0.434)
            result.interval = None
            interval_point.append(scheme.name)
        if result.error is None:  # rv56s: a layer's figure read NaN (its block's form uncertified), never silent
            nan_layers = [name for name, lr in result.layers.items() if not math.isfinite(lr.leakage)]
            if nan_layers:
                layers_lost[scheme.name] = nan_layers
        report.schemes[scheme.name] = result
    if layers_lost:
        report.warnings.append(
            "per-layer figures not available (read NaN" + (": the correlated form on the layer's block lost its "
                                                          "digits" if rc is not None else "") + ") for " + "; ".join(f"{s}: {', '.join(v)}" for s, v in layers_lost.items())
            + "; the schemes' headlines do not read them")
    if interval_point:
        report.warnings.append(_point_interval_warning(interval_point, report, est))
    if interval_lost:
        report.warnings.append(interval_lost_warning(
            interval_lost, " (the correlated form lost its digits at a corner of the kappa box; covariance="
            "'independent' gives intervals of the independent form)" if rc is not None else ""))
    if rc is not None and not math.isfinite(baseline):  # first: every figure beside it reads through it
        report.warnings.insert(0, _nonfinite_baseline_warning(rc, diagnostics.get("baseline_leakage_independent")))
    if rc is None and est.d > 1 and cfg.covariance == "auto":
        # Without a correlation model the headline is the diagonal form, which measured about
        # 10% below reference-model attacks on correlated weights (method.md "Correlated coordinates").
        report.warnings.append(
            "the headline treats the weights as independent (no stored influences for a correlation "
            "model: raise budget= or use estimation='exact' on small models); with correlated weights it "
            "can read about 10% low" + (
                ", and the diagonal estimator's sigma, which ignores the correlation too, is unchecked here "
                "(on correlated weights it made the quantized figures read 26-41% low in small tests)"
                if est.mode == "diagonal" and not est.diagnostics.get("kfac_correction") else
                f", and the diagonal estimator's sigma is unchecked here beyond its K-FAC correction of the "
                f"correlation within each {_kfac_layer_kinds(est.diagnostics)} layer (median factor "
                f"{est.diagnostics.get('kfac_variance_inflation_median', 1.0):.3g} on the variance)"
                + (f"; layers left uncorrected: {', '.join(est.diagnostics['kfac_uncorrected_layers'][:6])}"
                   if est.diagnostics.get("kfac_uncorrected_layers") else "")
                if est.mode == "diagonal" else ""))
    vif = _diagonal_sigma_warning(est, rc, cfg.factor_rank, diagnostics)
    if vif:
        report.warnings.append(vif)
    rnn = _recurrent_diagonal_warning(est)
    if rnn:
        report.warnings.append(rnn)
    # A failed scheme has no figures: say so where users read (table, warnings), not only in JSON.
    report.warnings += [failure_warning(k, msg) for k, msg in failures.items()]
    report.warnings += [w for s in report.schemes.values() if (w := s.utility_warning())]
    if diagnostics.get("flat_direction_parameters"):  # the cures the warnings name (nux51 #1)
        diagnostics["flat_direction_cures"] = flat_direction_cures(
            model, diagnostics["flat_direction_parameters"], float(diagnostics.get("weight_decay", 0.0) or 0.0))
    if unranked := headline_unranked(report, diagnostics):  # the table shows their independent form
        diagnostics["headline_unranked"] = unranked
    report.warnings += _consistency_warnings(report, diagnostics, form_gap)
    # Whole parameters the data never moves (no gradient variance on any record: sigma 0): a
    # parameter the forward does not use, or frozen in effect. They carry no leakage, but were
    # counted silently in d (not in any d_eff: never_moved).
    unused = [k for k in est.names if est.sigma[k].numel() and not bool(est.sigma[k].any())]
    if unused:
        size = sum(est.sigma[k].numel() for k in unused)
        report.warnings.append(
            f"{len(unused)} assessed parameter(s) ({size:,} weights) never moved by the training data (no "
            f"gradient on any record, sigma 0): {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}; "
            "they carry no leakage but count in d: a parameter the forward does not use (check the model), units "
            "weight decay collapsed to zero (their residue is not counted), or one to leave out with params=")
    dup = _duplicate_warning(est.diagnostics, est.n)
    if dup:
        report.warnings.append(dup)
    stats = _running_statistics_note(model)
    if stats:
        report.warnings.append(stats)
        report.diagnostics["running_statistics_layers"] = _running_statistics_layers(model)
    moved = est.diagnostics.get("data_dependent_buffers")
    if moved:
        report.warnings.append(_data_buffers_note(moved))
        report.diagnostics["data_dependent_buffers"] = list(moved)
    fitted = est.diagnostics.get("fitted_buffers")
    if fitted:
        report.warnings.append(_fitted_buffers_note(fitted))
        report.diagnostics["fitted_buffers"] = dict(fitted)
    unchecked = est.diagnostics.get("data_buffers_unchecked")
    if unchecked:
        report.warnings.append(_data_buffers_unchecked_note(unchecked["buffers"], unchecked["why"]))
        report.diagnostics["data_buffers_unchecked"] = dict(unchecked)
    lev = _leverage_note(est.diagnostics)
    rank_note = _exact_rank_note(est.mode, est.d, n, est.diagnostics)
    if rank_note:
        lev = ((lev + ". ") if lev else "") + rank_note
    off = est.diagnostics.get("leverage_unavailable")
    if off and est.d / n > LEVERAGE_NOTE_MIN_D_OVER_N:
        # its own warning, and the rows' * (report.regime_failures): the figures read low, never silently
        report.warnings.append(leverage_off_warning(off, est.d / n))
        report.diagnostics["leverage_not_run"] = off
    missing = est.diagnostics.get("residual_not_computed")
    if missing:  # its own warning and the rows' * (report.regime_failures)
        report.warnings.append(residual_not_computed_warning(missing))
    if est.diagnostics.get("leverage_correction") and est.diagnostics.get("leverage_curvature") == "gauss_newton":
        report.warnings.append(
            "the leverages (finite-sample correction) are the records' Gauss-Newton factors J' L J at the model's "
            f"output, not their exact Hessians ({est.diagnostics.get('leverage_curvature_reason')}): they depend on "
            "where the model's output ends (a sigmoid or softmax moved from the loss into forward changes them, "
            "and the figures by a few percent at d / n above 0.1); leverage_correction=False gives the first-order "
            "forms, which do not")
    large = {k: s.d_eff / n for k, s in report.schemes.items() if not s.error and s.d_eff / n > D_EFF_OVER_N_MAX}
    if est.d / n > D_EFF_OVER_N_MAX:  # sigma's estimate needs d << n (the baseline's d_eff: d less the never moved)
        # one warning: the schemes' own d_eff / n only adds which of them stay above the bound
        still = sum(never_moved_count(est.sigma[k]) for k in est.names)
        report.warnings.append(_d_over_n_warning(est.d, n, large, len(scheme_objs), still))
    if lev:  # its own warning: joined to the d / n one it buried that one's action (fu28: 1,379 characters)
        report.warnings.append(lev)
    if large and est.d / n <= D_EFF_OVER_N_MAX:  # d_eff > d: not expected (kappa <= 1), said if it happens
        report.warnings.append(
            _d_eff_over_n_sentence(large, len(scheme_objs), "d_eff / n is not small for ")
            + "; the asymptotic regime needs d_eff << n: treat those figures as indicative")
    position = _position_warning(report)
    if position:
        report.warnings.append(position)
    # What a release carries beyond its weights and the indicator does not score (AWQ factors).
    for sc in scheme_objs:
        unscored = getattr(sc, "release_warning", lambda: None)()
        if unscored and sc.name not in failures:
            # a plan repeats its candidates' own words: each sentence once (a plan of AWQ and
            # SmoothQuant layers added both again, joined, beside the candidates' own: hy50)
            parts = sc.release_warnings() if hasattr(sc, "release_warnings") else [unscored]
            for w in parts:
                if w not in report.warnings:
                    report.warnings.append(w)
            report.schemes[sc.name].unscored = unscored  # marked "+" (a lower bound) in the table
    # Weights a scheme left in float (layer type, group size, tie, ...) leak like the baseline.
    # Said once for all the schemes they apply to (the same three lines per scheme buried the rest).
    report.warnings += merge_scheme_warnings(
        [(sc.name, w) for sc in scheme_objs if not isinstance(sc, NoQuantization)
         for w in [report.schemes[sc.name].float_warning()] if w])
    # Weights outside the assessment a scheme left in float in its copy (a frozen layer narrower than
    # the group size): its utility and model b/w are those of that partly quantized release (fz44).
    report.warnings += merge_scheme_warnings(
        [(k, w) for k, s in report.schemes.items() for w in [s.unassessed_float_warning()] if w])
    # A scheme named after a torchao config that quantized layers quantize_ leaves in float: its
    # figures are not of the release torchao ships with that config (nux54 #1), a warning
    report.warnings += merge_scheme_warnings(
        [(k, w) for k, s in report.schemes.items() for w in [s.torchao_release_warning()] if w])
    # Weights quantized by another method than the scheme's backend (quantization/beyond_linear), by a
    # scheme with no torchao namesake (rtn_*): information, not a problem (ux49: raised as a warning it read as one)
    report.notes += merge_scheme_warnings([(k, w) for k, s in report.schemes.items() for w in [s.methods_line()] if w])
    stored = _low_precision_note(model, est.names)
    if stored:
        report.warnings.append(stored)
    frozen = _frozen_warning(model, est.names)
    if frozen:
        report.warnings.append(frozen)
    left_out = _frozen_left_out_note(model, est.names)
    if left_out:
        report.warnings.append(left_out)
    trained_out = _trained_left_out_note(model, est.names)
    if trained_out:
        report.warnings.append(trained_out)
    report.warnings += estimator_warnings(diagnostics)  # e.g. the Monte Carlo Gauss-Newton's error
    unstable = _floor_sensitivity(est, model, scheme_objs, cfg, report)
    if unstable:
        report.warnings.append(unstable)
    cutoff_set = _cutoff_warning(report)
    if cutoff_set:
        report.warnings.append(cutoff_set)
    cutoff_skipped = _cutoff_skipped_note(report)
    if cutoff_skipped:
        report.warnings.append(cutoff_skipped)
    if diagnostics.get("interpolating"):
        report.warnings.append(
            "the model interpolates its training data (training loss ~0: the per-sample gradients are rounding, "
            f"root mean square {diagnostics.get('per_sample_gradient_ratio', float('nan')):.2g} of the curvature's "
            "scale |diag(H) theta|): the gradient covariance, sigma and the influences are built from rounding, "
            "so the figures are not determined by the data (the gradient norm ratio "
            f"{diagnostics['gradient_norm_ratio']:.3g} is rounding over rounding, not a sign of an unconverged "
            "fit); the M-estimator analysis needs training residuals: add weight decay, assess fewer weights "
            "than records, or use more records"
        )
    decay_hint = _decay_hint_warning(diagnostics)
    if decay_hint:
        report.warnings.append(decay_hint)
    if diagnostics.get("not_at_minimum"):
        report.warnings.append(
            f"the model is not at a minimum of the training loss ({_not_at_minimum_suspects(model, diagnostics)}): "
            f"{_not_at_minimum_criterion(diagnostics)}{_not_at_minimum_detail(diagnostics)}"
            + "; the M-estimator analysis may not apply; " + _batch_statistics_cause(model, diagnostics)
            + f"train to convergence, with the weight decay and loss you assess ({MINIMUM_CURE}) -- or, if the "
            "model is converged, pass the objective it was trained on: the "
            "loss_fn and weight_decay given here must be its (class weights, label smoothing, a penalty or "
            "weight-decay convention that differ make a converged model read as unconverged), and the "
            "records given must be the ones it was trained on (a validation or test set is not at its "
            "minimum, and its figures are not the members' leakage)"
        )
    elif stiff_offset_cause(diagnostics) is not None:
        # an interpolant's gradients are rounding: its stiff offset is rounding over rounding, as its
        # gradient norm ratio (the interpolation warning says so; hd51: the two causes named here
        # both read as wrong for it)
        report.warnings.append(_unseen_records_warning(diagnostics))
    if diagnostics.get("negative_curvature"):
        flipped = diagnostics.get("negative_eigenvalues_flipped")
        count = f" ({flipped} of {est.d} eigenvalues negative)" if flipped else ""
        report.warnings.append(
            f"the Hessian has negative curvature{count}: the weights are not at a strict minimum of the "
            "objective assessed (a saddle point, training not converged, or a loss_fn / weight_decay other "
            "than the one the model was trained with); its eigenvalues were replaced by their magnitudes, so "
            "the figures rest on a modified curvature: "
            + _curvature_action(diagnostics, "train to convergence (or add weight decay), with the objective you "
                                "pass here, before reading them (see diagnostics)")
        )
    elif diagnostics.get("curvature_unresolved"):
        lowest = diagnostics.get("hessian_min_eigenvalue", diagnostics.get("hessian_min_diagonal"))
        top = diagnostics.get("hessian_max_eigenvalue", diagnostics.get("hessian_max_diagonal"))
        rel = f"{float(lowest) / abs(float(top)):.2g} of the largest" if lowest is not None and top else "negative"
        report.warnings.append(
            f"saddle not excluded: the Hessian's lowest {'eigenvalue' if est.mode == 'exact' else 'diagonal entry'} "
            f"reads {rel}, within the precision this gradient allows "
            f"({diagnostics.get('negative_curvature_tolerance', float('nan')):.2g} of the largest: gradient norm ratio "
            f"{diagnostics.get('gradient_norm_ratio', float('nan')):.3g}), so whether the weights are at a minimum "
            "or near a saddle is not resolved; the figures use its magnitude either way; "
            + _curvature_action(diagnostics, "train further (a smaller gradient) to resolve it")
        )
    cause = _large_weights_sentence(report, model, est.theta, diagnostics)
    if cause:  # inside the curvature warning it explains (one cause, not one more warning)
        at = next(i for i, w in enumerate(report.warnings)
                  if w.startswith(("the Hessian has negative curvature", "saddle not excluded", "unstable figures")))
        report.warnings[at] += ". " + cause
    report.utility_modes = utility_modes(report, metrics, cfg)
    report.utility_key, report.utility_tolerance = cfg.utility_key, cfg.utility_tolerance
    report.utility_records = utility_records
    report.utility_errors = utility_errors
    report.utility_classes = utility_classes(metrics)
    return report


def _not_at_minimum_criterion(diagnostics: Mapping[str, Any]) -> str:
    """The clause naming which stationarity criterion fired (:func:`~.estimation.estimate._not_at_minimum`):
    the gradient norm ratio above :data:`~.estimation.estimate.GRADIENT_NORM_RATIO_MAX`, the Newton
    step above :data:`~.estimation.estimate.MINIMUM_OFFSET_SD` sampling sds, or both; the other's
    figure follows (a message that led with the Newton step hid which one fired)."""
    ratio = float(diagnostics["gradient_norm_ratio"])
    offset = float(diagnostics.get("minimum_offset_sd", float("nan")))
    by_ratio, by_offset = ratio > GRADIENT_NORM_RATIO_MAX, offset > MINIMUM_OFFSET_SD
    ratio_txt = (f"the mean gradient's norm is {ratio:.3g} of a per-sample gradient's (root mean square; "
                 f"the limit is {GRADIENT_NORM_RATIO_MAX:g})")
    offset_txt = (f"a Newton step to the minimum would move the weights {offset:.3g} of their own sampling "
                  "standard deviations, root mean square"
                  + (", from the gradient variances alone (a surrogate that ignores the weights' correlation)"
                     if diagnostics.get("minimum_offset_covariance") == "diagonal" else "")
                  + f" (the limit is {MINIMUM_OFFSET_SD:g})")
    if by_ratio and by_offset:
        return f"{ratio_txt}, and {offset_txt}"
    if by_ratio:
        return f"{ratio_txt}; {offset_txt}"
    return f"{offset_txt}; {ratio_txt}"


def _unseen_records_warning(diagnostics: Mapping[str, Any]) -> str:
    """The warning that the records' mean gradient is off along the Hessian's stiff directions
    (``diagnostics["records_unlike_training"]``: :func:`~.estimation.estimate._stiff_offset` above
    :data:`~.estimation.estimate.UNSEEN_RECORDS_SD`; method.md section 6), for a model under the
    not-at-a-minimum limits (a held-out set read 0.66 sd there, its figures 1.9x the members').
    Two causes read alike: records the model was not trained on, or a model off the minimum of the
    objective assessed along those directions; where the records are known to be the training
    records (``records_from_training_loader``: the callback read the trainer's loader) only the
    second is named (a tied LM at chance trained by AdamW, decay not passed, read 0.66
    on its own 600 training records and was told they looked unseen)."""
    stat = (f"along the stiffer half of the Hessian's directions, where training converges first, the records' mean "
            f"gradient is {float(diagnostics['stiff_offset_sd']):.3g} of its own sampling standard deviation (root "
            f"mean square; {STIFF_READINGS}; the limit is {UNSEEN_RECORDS_SD:g}), though the Newton step to the "
            f"minimum ({float(diagnostics.get('minimum_offset_sd', float('nan'))):.3g} sd, root mean square over "
            "all weights, which the soft directions dominate) is under its limit")
    off_minimum = ("the model is not at the minimum of the objective assessed along those directions: training "
                   "stopped short, or it minimised another objective (a weight decay not passed as weight_decay=, "
                   "a decoupled decay such as AdamW's, another loss): train on, or pass the loss_fn and "
                   "weight_decay it was trained with")
    if stiff_offset_cause(diagnostics) == "off_minimum":
        whose = ("the records are the trainer's training records" if diagnostics.get("records_from_training_loader")
                 else f"above {UNSEEN_RECORDS_EXPLAIN_MAX:g} sd, records it never saw do not explain it unless more "
                 "than 8 times as many as it was trained on")
        return (f"the model is not at a minimum of the objective assessed along its stiff directions: {stat}; "
                f"{whose}, so {off_minimum}; the M-estimator analysis may not apply")
    return (f"the records assessed are not the model's training records, or the model is not at a minimum of the "
            f"objective assessed: {stat}. Either: if these are a validation or test set (e.g. MISIndicator updated "
            "in validation_step), the figures are not the members' leakage -- pass the records the model was "
            f"trained on; or, if they are its training records, {off_minimum}")


def _decay_hint_warning(diagnostics: Mapping[str, Any]) -> str | None:
    """The warning that the weights look like a minimum of the loss plus another weight decay
    than the one assessed (``diagnostics["weight_decay_mismatch"]``,
    :func:`~.estimation.estimate._decay_hint`), naming the decay implied and the option; ``None``
    when not flagged (a missing ``weight_decay=`` moved the figures 7% under a saddle warning)."""
    if not diagnostics.get("weight_decay_mismatch"):
        return None
    given = float(diagnostics.get("weight_decay", 0.0))
    implied = float(diagnostics["weight_decay_implied"])
    per_param = "weight_decay_per_parameter" in diagnostics
    what = ("weight_decay was not passed (0 assessed)" if given == 0 else
            f"{'the largest weight_decay passed is' if per_param else 'weight_decay was passed as'} {given:.3g}")
    fix = _decay_fix(diagnostics)
    return (f"the weights look like a minimum of the training loss plus weight decay {implied:.3g} "
            f"(wd_hat = -<g, theta> / <theta, theta> with g the data loss's mean gradient), not of the objective "
            f"assessed: {what}. The mean gradient of the assessed objective points along "
            f"{'+' if implied < given else '-'}theta ({'too much' if implied < given else 'too little'} decay "
            "assessed; cosine "
            f"{float(diagnostics['decay_gradient_cosine']):.4f}; its norm {float(diagnostics['gradient_norm_ratio']):.3g} "
            f"of a per-sample gradient's, {float(diagnostics['decay_residual_ratio']):.2g} once wd_hat * theta is "
            "removed), so the Hessian and the figures are those of another objective than the one trained: if the "
            f"model was trained with weight decay, {fix} (the coefficient wd of mean loss + wd / 2 |theta|^2)")


def _decay_fix(diagnostics: Mapping[str, Any]) -> str:
    """What to pass where the weight-decay hint fired (:func:`_decay_hint_warning`): the decay
    implied, or what to add to each coefficient of a per-parameter mapping."""
    given, implied = float(diagnostics.get("weight_decay", 0.0)), float(diagnostics["weight_decay_implied"])
    if "weight_decay_per_parameter" in diagnostics:
        return f"add {implied - given:.3g} to each coefficient of the weight_decay mapping"
    return f"pass weight_decay={implied:.2g}"


def _curvature_action(diagnostics: Mapping[str, Any], default: str) -> str:
    """The closing action of the curvature warnings ("negative curvature", "saddle not excluded"):
    ``default`` (train further), or, where the weight-decay hint fired, that hint's fix: the Hessian
    of an objective without the decay the weights were trained with reads indefinite or flat, and
    training further does not change that (both warnings fired and the saddle one
    said "train further")."""
    if not diagnostics.get("weight_decay_mismatch"):
        return default
    return (f"the weights look trained with weight decay {float(diagnostics['weight_decay_implied']):.3g} "
            "(the weight-decay warning): the Hessian assessed "
            + ("adds curvature that decay did not" if float(diagnostics["weight_decay_implied"])
               < float(diagnostics.get("weight_decay", 0.0)) else "lacks that decay's curvature")
            + ", which is the "
            f"likely cause; {_decay_fix(diagnostics)} before training further")


def utility_modes(report: Report, metrics: Mapping[str, Any] | None, cfg: ScoringConfig) -> dict[str, str]:
    """``{utility metric name: "min" | "max"}`` for each metric the report measured whose direction
    is known (:func:`~mis_lightning.report.metric_mode`: ``cfg.utility_mode`` for
    ``cfg.utility_key``, else the torchmetrics object's ``higher_is_better``, else the name);
    what :attr:`Report.utility_modes` records, so that a saved report ranks as it was measured."""
    names = list(dict.fromkeys(k for s in report.schemes.values() for k in s.utility))
    declared = metric_name(cfg.utility_key) if cfg.utility_key is not None else None
    out: dict[str, str] = {}
    for name in names:
        mode = metric_mode(name, (metrics or {}).get(name),
                           cfg.utility_mode if declared is not None and metric_name(name) == declared else None)
        if mode is not None:
            out[name] = mode
    return out


def utility_classes(metrics: Mapping[str, Any] | None) -> dict[str, int]:
    """``{utility metric name: number of classes}`` for each metric object that exposes an integer
    ``num_classes`` (torchmetrics' multiclass metrics) and no ``top_k`` above 1 (whose chance is
    top_k / num_classes): what :attr:`Report.utility_classes` records, so the verdict can tell an
    accuracy at chance (1 / num_classes)."""
    out: dict[str, int] = {}
    for name, m in (metrics or {}).items():
        k = getattr(m, "num_classes", None)
        top_k = getattr(m, "top_k", None)
        if top_k not in (None, 1):  # a top-k accuracy's chance is k / K, not 1 / K: no class count told (rv53b)
            continue
        if isinstance(k, int) and not isinstance(k, bool) and k >= 2:
            out[name] = k
    return out


def check_utility_metric(scoring_config: ScoringConfig, metrics: Mapping[str, Any] | None,
                         known_names: bool = True, where: str = "utility_key", validation: bool = True,
                         metrics_option: str | None = "metrics") -> None:
    """Before training or estimating: the utility metric the verdict ranks by
    (``scoring_config.utility_key``) is measured and its direction is known, in every front end.

    Args:
        scoring_config: its ``utility_key`` / ``utility_mode``.
        metrics: ``{name: metric}`` the front end measures (``"loss"`` always is).
        known_names: whether ``metrics`` names every measured metric (``False`` for a
            ``utility_fn`` whose names are known only when it runs: the name is not checked,
            its direction still is).
        where: the option's name in this front end (e.g. ``mis.scoring.utility_key``).
        validation: whether the front end has validation data (no utility is measured without).
        metrics_option: the front end's argument that adds a measured metric (``metrics`` of
            ``assess``, ``utility_metrics`` of the callback), named in the fix of an unmeasured
            key; ``None`` where the user cannot add one (the app's metrics follow the task).

    Raises:
        ValueError: ``utility_key`` is given without validation data, or is not measured (close
            names suggested), or its direction is
            neither declared (``utility_mode``), the metric's ``higher_is_better``, nor known from
            the name (:func:`~mis_lightning.report.unknown_mode_message`).
    """
    key = scoring_config.utility_key
    if key is None:
        return
    if not validation:
        raise ValueError(f"{where}={key!r} names a utility metric, but no utility is measured without validation "
                         "data: pass validation data (val_dataloader=), or drop utility_key")
    metrics = dict(metrics or {})
    name = key.removeprefix("utility_")
    by_name = {metric_name(k): k for k in ["loss", *metrics]}
    measured = by_name.get(metric_name(name))
    if known_names and measured is None:
        close = close_names(name, by_name.values(), n=3, cutoff=0.5)
        # fu32: a researcher names the key their LightningModule logs (self.log("val_acc", ...)),
        # which is measured on the float model only; each quantized copy is measured by the
        # front end's own metrics, so say where a metric is added
        fix = (f"; the utility of each quantized copy is measured on the validation data by the mean loss and "
               f"the torchmetrics objects of {metrics_option}= only (a key the model logs itself, e.g. with "
               f"self.log, is not measured on the quantized copies): add one under that name, e.g. "
               f"{metrics_option}={{{name!r}: <a torchmetrics Metric>}}"
               if metrics_option else "")
        raise ValueError(f"{where}={key!r} is not a measured utility metric: the measured ones are "
                         f"{sorted(by_name.values())}" + (f" (did you mean {' or '.join(map(repr, close))}?)"
                                                          if close else "") + fix)
    if metric_mode(name, metrics.get(measured) if measured else None, scoring_config.utility_mode) is None:
        raise ValueError(unknown_mode_message(name))


def _large_weights_sentence(report: Report, model: nn.Module, theta: Mapping[str, Tensor],
                            diagnostics: Mapping[str, Any]) -> str | None:
    """The likely cause of an indefinite or floored Hessian together with quantized copies whose
    loss explodes, in a model assessed without weight decay whose weights are far above their
    initial scale: weights grown large without regularisation, with the cure; ``None`` otherwise
    (full-batch L-BFGS, no weight decay, a tanh MLP whose first layer reached root mean
    square 12.6 on 8 inputs; int4 / int2 lost all utility, loss 41x and 1,180x int8's).

    Fires when all hold: no weight decay in the objective assessed (``diagnostics``); the
    negative-curvature (or saddle-not-excluded) or the unstable-figures warning is in ``report`` (the Hessian signal of
    method.md section 6); a lower-is-better utility whose largest value over the schemes is at
    least :data:`LOSS_EXPLOSION_RATIO` times the smallest (positive) one; and a weight matrix
    (of ``theta``, the assessed weights by name) with ``rms(W) sqrt(fan_in)`` -- the sd of a
    unit's pre-activation over unit-variance inputs, about 0.6 at PyTorch's default
    initialisation -- above :data:`LARGE_WEIGHT_SCALE`. A tanh or sigmoid unit with such
    pre-activations is saturated (a near-singular Hessian), and quantization noise of a step
    proportional to the tensor's largest weight moves it across its steep part, which large
    downstream weights amplify into the loss."""
    if diagnostics.get("weight_decay") or not any(
            w.startswith(("the Hessian has negative curvature", "saddle not excluded", "unstable figures")) for w in report.warnings):
        return None
    rows = [r for r in report.rows() if not r.get("error")]
    uk = pick_utility_key(rows)
    if uk is None or higher_is_better(uk, report.utility_modes):
        return None
    vals = {r["scheme"]: float(r[uk]) for r in rows if r.get(uk) is not None and math.isfinite(float(r[uk]))}
    if len(vals) < 2:
        return None
    lo, hi = min(vals, key=vals.get), max(vals, key=vals.get)  # type: ignore[arg-type]
    if not vals[lo] > 0 or vals[hi] < LOSS_EXPLOSION_RATIO * vals[lo]:
        return None
    params = dict(model.named_parameters())
    scale: dict[str, tuple[float, float]] = {}  # name: (rms sqrt(fan_in), rms)
    for name, t in theta.items():
        shape = params[name].shape if name in params else ()
        if len(shape) >= 2 and t.numel():
            rms = float(t.detach().double().pow(2).mean().sqrt())
            scale[name] = (rms * math.sqrt(t.numel() / shape[0]), rms)
    big = max(scale, key=lambda k: scale[k][0], default=None)
    if big is None or scale[big][0] <= LARGE_WEIGHT_SCALE:
        return None
    what = uk.removeprefix("utility_")
    return (f"Likely cause: weights grown large without regularisation (no weight decay; {big} has root mean square "
            f"{scale[big][1]:.3g}, a pre-activation sd of {scale[big][0]:.3g} over unit-variance inputs against "
            f"about 0.6 at initialisation; the quantized copies' {what} ranges from {vals[lo]:.3g} ({lo}) to "
            f"{vals[hi]:.3g} ({hi})): large weights saturate the activations, which leaves the Hessian near-singular "
            "or indefinite, and amplify the quantization error (e.g. full-batch L-BFGS run to a minimum without "
            "weight decay); retrain with weight decay and pass the same weight_decay here")


def _floor_sensitivity(est: Estimate, model: nn.Module, schemes: Sequence[QuantizationScheme],
                       cfg: ScoringConfig, report: Report) -> str | None:
    """Where the exact sandwich's eigenvalue floor bites (``est._floor_variants``: the estimate
    again with the floor 10x higher and lower), each scheme's leakage rescored from those and
    its largest relative move stored (``SchemeResult.floor_sensitivity``, ``floor_sensitivity``
    in the diagnostics); a warning when one exceeds :data:`FLOOR_SENSITIVITY_MAX`, else ``None``.

    A near-singular or indefinite Hessian (a saturated, near-separable classifier) puts some
    eigenvalues below the floor: the variance along them is ``u' V u / floor^2``, set by the
    damping constant, and their eigenvectors by the Hessian's rounding (a class-weighted CE
    MLP's figures moved 20% under an exact rescaling of the loss, 1e-16 relative in H). The
    figure is then not determined by the data; no floor fixes that, so it is flagged."""
    variants = getattr(est, "_floor_variants", None)
    if not variants:
        return None
    rel = lambda a, b: abs(a - b) / abs(b) if b and math.isfinite(a) and math.isfinite(b) else math.nan
    moves: dict[str, float] = {}
    base_move = 0.0
    for fields in variants.values():
        alt = score_schemes(dataclasses.replace(est, _floor_variants=None, **fields), model, list(schemes),
                            scoring_config=dataclasses.replace(cfg, strict=False, uncertainty_draws=0))
        base_move = max(base_move, rel(alt.baseline_leakage, report.baseline_leakage))
        for name, res in report.schemes.items():
            other = alt.schemes.get(name)
            if res.error or other is None or other.error:
                continue
            moves[name] = max(moves.get(name, 0.0), rel(other.leakage, res.leakage))
    for name, move in moves.items():
        report.schemes[name].floor_sensitivity = move
    report.diagnostics["floor_sensitivity"] = {"baseline": base_move, **moves}
    over = {k: v for k, v in moves.items() if v > FLOOR_SENSITIVITY_MAX}
    if not over:
        return None
    worst = max(over, key=over.get)  # type: ignore[arg-type]
    floored = est.diagnostics.get("eigenvalues_floored")
    return (
        f"unstable figures (~ in the table): the leakage of {', '.join(sorted(over))} moves by up to "
        f"{100 * over[worst]:.0f}% ({worst}) when the Hessian's eigenvalue floor is set 10x higher or lower "
        f"({floored} eigenvalue(s) of {est.d} below the floor): the Hessian is near-singular or indefinite "
        "(a saturated or near-separable fit, a saddle point), so the weights' variance along those directions "
        "is set by the floor and by rounding, not by the data, and the figure is not determined (it can move "
        "with an exact rescaling of the loss); train to a strict minimum (weight decay, or a loss without "
        "saturated records) or assess fewer weights before reading it"
    )


def _diagonal_sigma_warning(est: Estimate, rc: F.correlated.RecordCorrelation | None, factor_rank: int,
                            diagnostics: dict[str, Any]) -> str | None:
    """The diagonal estimator's ``sigma_j`` is ``sqrt(V_jj) / H_jj``; the cells need the marginal
    sd ``sqrt((H^-1 V H^-1)_jj)``, which with correlated weights is larger by about the square
    root of the coordinate's variance inflation factor (exactly so when ``V = H``: the ratio of
    variances is ``H_jj (H^-1)_jj``). The stored records' standardised gradients give that
    factor (``diag(R^-1)`` of their correlation model; ``V = H`` at a well-specified minimum).
    Sets ``diagnostics["variance_inflation_median"]`` and returns a warning above
    :data:`VARIANCE_INFLATION_WARN` (method.md section 4, "The diagonal sandwich and correlated
    weights"). ``rc``: the headline's correlation form (``None``: independent coordinates,
    ``covariance="independent"`` included, where the stored records are measured all the same);
    the factors are read from the cross-fitted factor model, fitted here unless ``rc`` is one
    (the in-sample form's inverse diagonal is that of a near-singular sample matrix where the
    records show null directions)."""
    if est.mode != "diagonal" or not est.influence_stored or est.influence is None or est.num_records < 8 \
            or est.d <= 1:
        return None
    cross_fitted = rc is not None and rc.kind == "factor" and rc.fit == "cross_fitted"
    if 4 * est.d <= est.num_records:
        vrc = rc if cross_fitted and rc is not None else \
            F.correlated.RecordCorrelation.cross_fitted(est.unit_influence(), factor_rank)
        vif = vrc.variance_inflation().clamp_min(1.0)
        where = "from the stored records' gradients"
    else:
        # d > m / 4: the correlation of all d weights is not estimable from m records (a factor
        # model's residual variances go to 0 and its inverse saturates at 1 / shrinkage: median
        # 1,000 on a d / n = 46 ChEMBL MLP); within one row of each weight tensor (one output's
        # fan-in, at most m / 8 weights) it is, and a VIF within a subset is a lower bound
        vif = _row_variance_inflation(est)
        where = "within single rows of the weight tensors, a lower bound"
        if vif is None:
            return None
    med = float(vif.median())
    diagnostics["variance_inflation_median"] = med
    diagnostics["variance_inflation_p90"] = float(vif.quantile(0.9))
    if not med > VARIANCE_INFLATION_WARN:
        return None
    cure = (f"estimation='exact' computes the marginal sd (d = {est.d:,})" if est.d <= EXACT_MAX_PARAMS else
            f"no exact estimator for d = {est.d:,} here: read them as indicative")
    corrected = _kfac_sentence(est.diagnostics, short=True)
    # over recurrent layers the factor is no bound (measured 0.8-20x off it: RECURRENT_DIAGONAL_FIGURES)
    below = ("below the marginal sd of each weight that its cells need, by a factor this one does not bound on a "
             "model with recurrent layers (see the warning on them)" if est.diagnostics.get("diagonal_over_recurrent")
             else f"about {math.sqrt(med):.2g}x or more below the marginal sd of each weight that its cells need")
    if corrected is not None:
        # the warning says what was and was not corrected; the model and its measured accuracy go to
        # the report's diagnostics (JSON), where the whole sentence is kept
        head = f"the weights are correlated (median variance inflation factor {med:.3g} {where}"
        diagnostics["variance_inflation_detail"] = (f"{head}; the correlation model's shrinkage can only lower it): "
                                                    f"{_kfac_sentence(est.diagnostics)}; {cure}")
        return f"{head}): {corrected}; {cure} (the correction's model and measured accuracy: the report's " \
               "diagnostics['variance_inflation_detail'])"
    return (f"the weights are correlated (median variance inflation factor {med:.3g} {where}; the correlation "
            f"model's shrinkage can only lower it): the diagonal estimator's sigma "
            f"(sqrt(V_jj) / H_jj) is then {below}, so the quantized schemes' figures can be far off in either "
            "direction; "
            # the baseline clause only where the headline reads the cross-fitted model (the in-sample
            # form reads the exact estimator's baseline within 10%: method.md section 3)
            + ("the cross-fitted correlation model (more weights than stored records) is then ill-conditioned "
               "too, and the unquantized baseline read through it uncertain (1.6-2.3x the exact estimator's on an "
               "865-weight MLP on correlated inputs and a 1,364-weight CNN); " if cross_fitted else "")
            + cure)


# the measured figures the recurrent-layer warning quotes (rn43; docs/benchmarks.md, "rn43":
# benchmarks/rn43_recurrent_estimators.py, nu42a's tied LSTM / GRU language models)
RECURRENT_DIAGONAL_FIGURES = (
    "on tied LSTM / GRU language models (d = 108 weights, n = 192 records, 12 fits of 4 and 40 epochs) its "
    "per-weight sigma read a median 2.1-56x below the exact sandwich's (p90 up to 211x) where its variance-inflation "
    "warning said 2.0-2.8x (5.6x against 2.7x on the one fit at a strict minimum), and 11 of the 12 fits had "
    "negative curvature, which the diagonal estimator cannot see")


def _recurrent_diagonal_warning(est: Estimate) -> str | None:
    """The diagonal sandwich on a model with recurrent layers (``diagnostics["recurrent_layers"]``):
    a weight read at every time step is strongly correlated with the others through the recurrence,
    and the tied or fitted weights' Hessian is often indefinite short of a strict minimum; the
    diagonal estimator's sigma then has no error bound it can state (measured:
    :data:`RECURRENT_DIAGONAL_FIGURES`). ``None`` for another estimator or a model without them."""
    if est.mode != "diagonal" or not est.diagnostics.get("recurrent_layers"):
        return None
    layers = est.diagnostics["recurrent_layers"]
    cure = (f"estimation='exact' computes the marginal sd and checks the curvature (d = {est.d:,}; the records are "
            "taken one at a time)" if est.d <= EXACT_MAX_PARAMS else
            f"no exact estimator for d = {est.d:,} here: assess fewer weights with estimation='exact', or read the "
            "figures as indicative")
    return (f"the model has recurrent layers ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}) and the "
            f"diagonal sandwich estimated it: {RECURRENT_DIAGONAL_FIGURES} (docs/benchmarks.md, \"rn43\"); the "
            f"quantized schemes' figures can be far off in either direction (* in the table): " + cure)


# the measured figures the K-FAC sentence quotes for a model with convolutions (docs/validation.md,
# "The K-FAC correction and psi influences for convolutions": benchmarks/kfac_conv.py; the attacks:
# "The ReLU CNN's quantized figures", benchmarks/cnn_pool_attacks.py)
KFAC_CONV_FIGURES = (
    "(the convolutions' factors are the partial traces of their Gauss-Newton blocks; on linear convolutions "
    "over inputs correlated along their positions, dense outputs or pooled to one, the corrected sigma read "
    "0.93-1.06x the exact estimator's and the quantized figures 0.95-1.01x its; on a small ReLU CNN with "
    "global pooling (d = 372, n = 1,000) sigma read a median 0.04-0.72x the exact estimator's per parameter and "
    "the quantized figures 0.68-1.08x its, with weight decay 1e-3 to 1e-2, the exact estimator's sigma there "
    "being dominated by nearly flat directions across the layers of fits short of a strict minimum (one direction "
    "39-94% of its trace, the ReLU scale symmetries 0.2-35%; less as the fit converges); against reference-model "
    "attacks in the pool protocol the figures read high there, not low: on such CNNs at decay 1e-3 (two pools) "
    "the best of five attacks reached 0.21 / 0.17 / 0.07-0.08 (rtn_int8 / 6 / 4) where the diagonal estimator "
    "read 0.29-0.30 / 0.26-0.27 / 0.29-0.30 and the exact estimator 0.39 / 0.38 / 0.33-0.35, docs/validation.md, "
    "\"The ReLU CNN's quantized figures\")")


# ... and for an all-Linear model with several outputs per record, e.g. an MLP classifier (the
# per-layer program's partial traces, under every Hessian diagonal; docs/validation.md,
# "The K-FAC correction for MLP classifiers (2026-12-03)", "The K-FAC correction for MLP classifiers on
# every diagonal path": benchmarks/kfac_classifier.py, benchmarks/kfac_psi_diagnosis.py)
KFAC_CLASSIFIER_FIGURES = (
    "(the layers' factors are the partial traces of their Gauss-Newton blocks; on a softmax regression over "
    "inputs correlated along their features the corrected sigma read a median 0.98-1.44x the exact estimator's "
    "and the quantized figures 0.92-1.05x its (rtn_int4 0.53-0.90x uncorrected); on small MLP classifiers fitted "
    "to 91-100% training accuracy (one and two hidden layers, ReLU and tanh, weight decay 1e-3 to 1e-2) the "
    "correlation across layers kept the quantized figures 0.56-1.45x the exact estimator's (0.67-1.79x "
    "uncorrected). On ReLU 20-80-5 MLPs at decay 1e-2 (d / n = 2.1) they read 0.56-0.61x the exact estimator's "
    "(0.67-0.73x uncorrected), whose figures there are no reference: with more weights than records its "
    "in-sample form reads every record at the rank and its leverage correction, at leverages near 1, doubles "
    "them. Against reference-model attacks in the pool protocol the figures read high there, not low: the best "
    "of five attacks reached 0.31-0.37 where the diagonal estimator read 0.48-0.50 (the exact "
    "estimator 0.76-0.88) and the first-order form with the population's gradient covariance about 0.40, "
    "docs/validation.md, \"The correlated headline of ReLU MLP classifiers at d > n\")")


def _kfac_layer_kinds(diag: Mapping[str, Any]) -> str:
    """``"nn.Linear"``, or ``"convolution or nn.Linear"`` where the per-layer program's factors were
    used (``kfac_convolutions``: a model with convolutions)."""
    return "nn.Linear" if diag.get("kfac_convolutions") is None else "convolution or nn.Linear"


def _kfac_sentence(diag: Mapping[str, Any], short: bool = False) -> str | None:
    """What the diagonal estimator's K-FAC correction of sigma did (``Estimate.diagnostics``'s
    ``kfac_*``, :meth:`MomentAccumulator._kfac_factors`; method.md section 4, "The diagonal
    sandwich and correlated weights"), or ``None`` where it was not applied. ``short``: the
    warning's sentence (what was corrected, what was not), without the influences' model and the
    measured accuracy, which the full sentence (the report's ``diagnostics["variance_inflation_detail"]``)
    quotes (the warning ran to 2,231 characters on a user's CNN)."""
    if not diag.get("kfac_correction"):
        return None
    left = list(diag.get("kfac_uncorrected_layers") or [])
    conv = diag.get("kfac_convolutions")
    figures = (f"median factor {diag['kfac_variance_inflation_median']:.3g}, 90th percentile "
               f"{diag['kfac_variance_inflation_p90']:.3g}, over {diag['kfac_corrected_weights']:,} weights")
    if short:
        text = (f"the diagonal estimator's sigma was corrected by each {_kfac_layer_kinds(diag)} layer's "
                f"Kronecker-factored (K-FAC) Hessian ({figures}), not for the correlation across layers")
    else:
        text = (f"the diagonal estimator's sigma (sqrt(V_jj) / H_jj, the sd given the other weights) was multiplied "
                f"by the square root of each weight's variance inflation factor in its {_kfac_layer_kinds(diag)} "
                f"layer's Kronecker-factored (K-FAC) Hessian ({figures}), the marginal sd under that model"
                + (" (under weight decay the sandwich's factor, below 1 where the decay dominates a weight's "
                   "curvature)" if diag["kfac_variance_inflation_median"] < 1 else "")
                + (f", and the stored influences of {diag['kfac_influences']:,} of them are those of "
                   "psi = -H^-1 g under the same model (the weights' correlation, which the correlated headline "
                   "reads)" if diag.get("kfac_influences") else "")
                + (f" (those of {', '.join(diag['kfac_influences_left'][:6])} are the gradients', whose "
                   f"correlation is the Hessian's, not its inverse's: wider than {KFAC_INFLUENCE_MAX_WIDTH:,} inputs "
                   "and outputs)" if diag.get("kfac_influences_left") else "")
                + "; the correlation across layers, and within a layer beyond the Kronecker model, is not in it "
                + (KFAC_CLASSIFIER_FIGURES if diag.get("kfac_multi_output") else
                   "(on a 16-16-1 tanh MLP on rho = 0.9 inputs the corrected sigma read a median 0.81x the exact "
                   "estimator's on the first layer and 0.28x on the output layer, and the quantized figures "
                   "0.93-1.05x its; on one least-squares layer sigma and the influences are exact and the correlated "
                   "headline read 0.97-1.03x the closed-form reference)" if conv is None else
                   KFAC_CONV_FIGURES))
    if left:
        # (a transposed convolution is a convolution here: ct41; it is left out only where the
        # per-layer program refuses it, e.g. called with output_size)
        why = ("" if short else
               f" (a layer without Kronecker factors here: a normalisation, embedding or attention layer, one the "
               f"per-layer estimation refuses, a tied weight, or wider than {KFAC_MAX_WIDTH:,} inputs or outputs per "
               "group)" if conv is not None else f" (wider than {KFAC_MAX_WIDTH:,} inputs or outputs)")
        text += (f"; left uncorrected{why}: {', '.join(left[:6])}{' ...' if len(left) > 6 else ''} "
                 f"({diag.get('kfac_uncorrected_weights', 0):,} weights), whose sigma can be several times below "
                 "the marginal sd, so those figures can be far off in either direction")
    return text


def _row_variance_inflation(est: Estimate) -> Tensor | None:
    """Variance inflation factors of the weights of the first row of each assessed weight tensor
    (at most ``num_records / 8`` of them), from the stored influences' sample correlation within
    the row (scaled by ``(m - p - 1) / (m - 1)``, the inverse sample correlation's mean inflation),
    or ``None`` (no tensor with a row of >= 2 weights)."""
    assert est.influence is not None
    m = est.influence.shape[0]
    out = []
    for name in est.names:
        a, b = est.offsets[name]
        shape = est.shapes[name]
        if len(shape) < 2:
            continue
        p = min(b - a, math.prod(shape[1:]), max(m // 8, 2))
        if p < 2:
            continue
        W = est.influence[:, a: a + p].to(torch.float64)
        W = W[:, W.square().sum(0) > 0]
        p = W.shape[1]
        if p < 2:
            continue
        R = F.correlated.correlation_from_covariance(W.T @ W / m)
        vif = torch.linalg.pinv(R, hermitian=True, rtol=F.correlated.RCOND).diagonal()
        out.append(vif * (m - p - 1) / (m - 1))
    return torch.cat(out).clamp_min(1.0) if out else None


def _low_precision_note(model: nn.Module, names: Sequence[str]) -> str | None:
    """The warning for assessed weights stored in a 16-bit float format (a model trained with
    ``precision="bf16-true"``, or cast): they already sit on that format's grid."""
    named = dict(model.named_parameters())
    low = sorted({str(named[n].dtype).removeprefix("torch.") for n in names
                  if n in named and named[n].dtype in (torch.bfloat16, torch.float16)})
    if not low:
        return None
    fmt = " and ".join(low)
    return (f"the assessed weights are stored in {fmt}: they already sit on that format's grid, and the "
            f"unquantized release (the baseline, 'none', parameters a scheme leaves in float) is scored on it (its "
            f"kappa is below 1 where sd spans a few {fmt} ulps); a scheme that casts to {fmt} releases them "
            "unchanged and reads the same figure")


class _Prepared:
    """A scheme's grids, utility and figures; its cell moments are filled per parameter."""

    def __init__(self, scheme: QuantizationScheme) -> None:
        self.scheme = scheme
        self.qmodel: nn.Module | None = None
        self.utility_error: str | None = None  # its copy cannot run the forward (ReleaseForwardError)
        self.source: nn.Module | None = None  # the float model (for re-quantization)
        self.grids: dict[str, ParamGrid] = {}
        self.kappa: dict[str, Tensor] = {}  # at theta-hat (quantized params only)
        self.m4: dict[str, Tensor] = {}
        self.lam: dict[str, Tensor] = {}
        # the pool protocol reads the cells at sigma / sqrt(2) (method.md section 3, "Pool protocol")
        self.kappa_pool: dict[str, Tensor] = {}
        self.lam_pool: dict[str, Tensor] = {}
        self.draws: dict[str, list[Tensor]] = {}  # bootstrap kappas per parameter
        self.num_draws = 0
        self.column = 0  # index of this scheme's main column in the joint sums
        self.failed: str | None = None
        self.lam_draws: dict[str, list[Tensor]] = {}
        # per parameter whose draws were subsampled: [R, DRAW_SAMPLE_GROUPS] per-record sums of the
        # draws' centre (w^2 mu / pi) by random group of the sampled rows (_draw_sample_noise)
        self.draw_groups: dict[str, Tensor] = {}
        self.layers: dict[str, LayerResult] = {}
        self.utility: dict[str, float] = {}
        self.notes: list[str] = []
        self.float_params: dict[str, str] = {}  # assessed parameter -> why it stayed in float
        # parameter outside the assessment -> why the scheme left it in float in the copy
        self.float_unassessed: dict[str, str] = {}
        # parameter outside the assessment -> the method that quantized it beyond the scheme's backend
        self.quantized_by_unassessed: dict[str, str] = {}
        self.model_bits = 0.0  # bits of every parameter of the quantized copy (incl. scales)
        self.model_d = 0  # parameters of the whole model
        # assessed parameters stored in bf16 / fp16 -> their storage grid (the unquantized release)
        self.storage: dict[str, ParamGrid] = {}
        self.requant: Any = None  # JointRequant of the non-nearest grids (computed once)
        self.requant_seed = 0
        self.requant_moments: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        # per parameter and chunk of a bounded scheme: (moments state, [c, 2] fourth-power columns)
        # kept from the joint pass for _exact_fourth_sums (None: not kept, recomputed there)
        self.fourth_kept: dict[str, list[tuple[tuple, Tensor] | None]] = {}
        # the main sums with the exact fourth-power sums, where score_schemes computed them for
        # several schemes at once (JOINT_EXACT_FOURTH); read and dropped by _finish_scheme
        self.exact_fourth: dict[str, F.CltSums] | None = None
        # per bounded parameter whose fourth-power columns the pass kept (small models): the
        # main sums with the sharper bounds (SHARP_FOURTH_BOUND); read by _diagnostic_sums
        self.sharp_fourth: dict[str, F.CltSums] = {}
        self.bits = self.zero = self.quant = self.d_eff = self.frozen = 0.0


# Floats of cell moments held per parameter for the joint pass (bootstrap draws are cut to fit).
KAPPA_BUDGET = 1 << 27
# The joint pass's main call of a scheme's cell moments at theta-hat asks for kappa alone
# (``kappa_only``: the fine-grid forms' mean_abs and m4 terms, the own-cell edges of the wide-sd
# form, the point masses' zero fields are skipped) where nothing reads its m4 or mean_abs: a
# streamed parameter whose fourth-power sums the baseline's bound replaces
# (BOUND_FOURTH_POWER_SUMS) and whose fourth-power columns are not kept (FOURTH_KEEP_BYTES), of a
# model with more than one coordinate, whose moments are not kept whole (the Monte Carlo form).
# kappa is bitwise the same (the kappa_only contract of ParamGrid.moments); where a bound fails,
# _exact_fourth_sums computes m4 in its own pass, as before. False: every main call computes the
# four fields (tests, A/B; pf40: the 1e7 scoring's main calls)
MAIN_KAPPA_ONLY = True
# A chunk of a parameter takes kappa = 1 (and m4 = 3) at theta-hat and in the pool protocol for its
# weights of sd > 0, without a cell-moment call (sd-0 weights: point masses, kappa 0, or revealed,
# 1; any other sd-0 weight: the chunk is evaluated), on a grid whose per-block deficit bound at the
# chunk's least pool sd (ParamGrid.chunk_deficit_bound: 1 - kappa <= S = phi(0) C3 / (12 sigma^3) at
# every position, |3 - m4| <= 6 M^2 S) is at most UNIT_KAPPA_TOL, so each kappa moves by at most
# that from the exact cell sums and every power sum, a sum of non-negative terms in kappa, by at
# most that relative. (Below the wide-sd closed form's own gate, functional.wide.WIDE_TOL, 1e-8
# since p55b: nothing needs the two equal, since a chunk left to the per-element moments meets
# that gate per element; kept at 1e-11, where p45a / p46a measured it.) Its
# columns are then the baseline's own tensors (or one point-mass column shared by the grids with the
# same point masses), which the power sums sum once (SHARE_EQUAL_COLUMNS;
# the 1e7 MLP's first layer, sd 1e3-1e4 steps; method.md section 5, "Unit-kappa chunks";
# docs/benchmarks.md, "p45a"). Off with the wide-sd closed form
# (quantization.base.WIDE_SD_CLOSED_FORM: its derivation). False: every chunk's cells evaluated (A/B)
UNIT_KAPPA = True
UNIT_KAPPA_TOL = 1e-11
# ... and their bootstrap draws keep that kappa without evaluating a position: the bound holds at
# every position (sd-0 weights: theta-hat itself), so a draw's kappa is within UNIT_KAPPA_TOL of 1
# too (where the draws' own shortcuts, _position_free, find every element fixed: bitwise the same
# sums). False: the draws' parts as for any chunk (A/B)
UNIT_KAPPA_DRAWS = True
# ... and, where that tolerance does not settle a chunk, exactly to the closed form's lambda (p46a):
# where a chunk's weights of sd > 0 all lie in the
# wide-sd regime at the chunk's least sd (ParamGrid.chunk_wide_deficit: bounds at most
# WIDE_MAX_WINDOW sd apart, err = max((1 - lam) S_max, 6 M^2 S_max) <= UNIT_KAPPA_TOL in the pool
# protocol, S_max <= POSITION_FREE_WIDE_TOL at theta-hat where there are draws), a grid's kappa is
# the unit column less lam phi(0) C3_block / (12 sigma^3) on its live, unrevealed weights: at least
# the exact kappa (the conservative side) and within err of it, with the deficit kept (the 1e7
# MLP's first layer: ~1e-9 on int4 / g32 / float8, which UNIT_KAPPA_TOL alone cannot drop). Every
# such column is a per-block scaling of one column (sigma_min / sigma)^3 per revealed set: per-row
# blocks share it, their C3 as row weights in the power sums' contraction over the outputs
# (linear_factors.factored_power_sums' row_weights), the pool protocol its scaling by
# POOL_SIGMA_RATIO^3; other blocks (g32) fold C3 into one column of their own. Factored weights'
# streamed sums only (a scheme whose fourth-power sums the baseline's bound replaces); the draws
# keep the main kappa (as _position_free's shortcut). The power sums subtract the deficits' sums
# from the unit column's (method.md section 5, "Unit-kappa chunks"). False: p45a's unit columns
# at UNIT_KAPPA_TOL and the paths (A/B)
UNIT_KAPPA_EXACT = True


def _prepare_scheme(est: Estimate, model: nn.Module, scheme: QuantizationScheme, draws: int,
                    storage: Mapping[str, ParamGrid] | None = None, shared_facts: list | None = None,
                    release: bool = True) -> _Prepared:
    """Quantize (the copy is kept for the utility evaluation) and collect the per-parameter
    figures that need no sigma; the cell moments come later, one parameter at a time.
    ``storage``: the storage grids of the assessed parameters stored in bf16 / fp16
    (:func:`~mis_lightning.quantization.storage_grid.storage_grids`; ``None``: built here): each
    such parameter the scheme leaves unquantized is scored on it (its release is ``rnd_D(theta-hat)``,
    method.md section 5), as a grid of the scheme that counts as unquantized in the report.
    ``shared_facts``: a list kept across a call's schemes, whose grids then share the scale facts
    they reveal alike (:func:`~mis_lightning.quantization.base.scale_facts_shared`). ``release``
    False: nothing reads the quantized copy (``prep.qmodel`` may be ``None``: a scheme that reads
    the model itself, :func:`~mis_lightning.quantization.base.release_unread`)."""
    # The scheme quantizes the whole model, as the user's release (torchao's quantize_) would: a
    # frozen backbone or any parameter outside params= too, so that the copy's utility and size are
    # those of the model shipped (fz44: a head-only copy read rtn_int4's loss 0.244 for the
    # whole model's 0.306). Only the assessed parameters' grids are scored: the others were not
    # fitted to the records (requires_grad=False) or are left out by params= (warned).
    with zero_counts_only(), scale_facts_shared([] if shared_facts is None else shared_facts), \
            (nullcontext() if release else release_unread()):
        qres = scheme.apply(model)  # of each release only its zeros are read below
    prep = _Prepared(scheme)
    prep.source = model  # the float model: non-nearest grids re-run the scheme on it
    prep.qmodel = qres.model
    prep.notes = list(qres.notes)
    prep.grids = {k: g for k, g in qres.grids.items() if k in est.theta}
    prep.float_params = {k: qres.unquantized[k] for k in est.names if k in qres.unquantized}
    if not isinstance(scheme, NoQuantization):
        prep.float_unassessed = {k: r for k, r in qres.unquantized.items() if k not in est.theta}
        # ... and those it quantized by another method than its backend (a frozen Conv2d): the release's
        prep.quantized_by_unassessed = {k: g.method for k, g in qres.grids.items() if k not in est.theta and g.method}
    prep.storage = dict(storage_grids(model, est.names) if storage is None else storage)
    if not prep.grids and not isinstance(scheme, NoQuantization):
        raise SchemeError(
            f"scheme {scheme.name!r} applies to no assessed parameter of this model "
            f"(assessed: {est.names}); it would be scored as no protection at all"
        )
    params = dict(model.named_parameters())
    # the whole release's storage (every parameter, assessed or not, as the scheme left it)
    prep.model_d = sum(p.numel() for p in params.values())
    prep.model_bits = sum(p.numel() * (qres.grids[k].bits_per_weight if k in qres.grids else _dtype_bits(p))
                          for k, p in params.items())
    # the unquantized stored parameters: their storage grid (after the footprint and zero counts
    # below, which are those of the float parameter; their d_eff and pinned count come from the pass)
    stored = {k: prep.storage[k] for k in est.names if k not in prep.grids and k in prep.storage}
    grids = {**prep.grids, **stored}
    # Streamed parameters (stored or factored influences) hold one chunk of columns whatever the
    # draws; the others hold [numel, columns] float64 until their one power-sum call.
    largest = max((est.theta[k].numel() for k in grids
                   if est.influence is None and est._factor_of(k) is None), default=1)
    prep.num_draws = max(0, min(draws, KAPPA_BUDGET // max(largest, 1) - 2)) if grids else 0
    if prep.num_draws < draws and grids:
        prep.notes.append(f"uncertainty interval from {prep.num_draws} bootstrap draws (memory bound)")
    for name in est.names:
        numel = est.theta[name].numel()
        g = prep.grids.get(name)
        if g is None:
            bits, zero = _dtype_bits(params[name]), 0.0
            frz = never_moved_count(est.sigma[name])
            if name not in stored:
                # a weight the data never moves (sigma 0: no record's influence reaches it) leaks
                # nothing, in float as on a grid (where the pass counts it 0 whatever its kappa): 0 in d_eff
                prep.d_eff += float(numel - frz)
                prep.frozen += frz
        else:
            bits = g.bits_per_weight
            # the zeros counted without a [numel] mask (NaN counts as non-zero in both forms), or
            # by the backend (zero_counts_only)
            zero = float(g.zero_count if g.zero_count is not None
                         else g.dequantized.numel() - int(torch.count_nonzero(g.dequantized)))
            g.dequantized = g.dequantized.new_empty(0)  # not needed past this point: free it
            prep.zero += zero
            prep.quant += numel
            frz = 0
        prep.bits += bits * numel
        prep.layers[name] = LayerResult(
            name=name, d=numel, quantized=g is not None, leakage=math.nan, mis=math.nan,
            baseline_leakage=math.nan, d_eff=float(numel - frz) if g is None else math.nan,
            pinned_fraction=frz / max(numel, 1), zero_fraction=zero / numel if g is not None else 0.0,
            bits_per_weight=bits, quantized_by=g.method if g is not None else "",
        )
    prep.grids = grids
    return prep


def _param_moments(est: Estimate, prep: _Prepared, name: str, chunk: int, gen: torch.Generator,
                   policy: F.CompilePolicy | None = None) -> None:
    """Whole-parameter cell moments of one scheme (the one-coordinate form's ``lam``, tests):
    at theta-hat, the pool protocol and each bootstrap draw ``theta + sigma * xi`` with ``xi``
    from ``gen`` (``[num_draws, numel]``, one ``randn`` per chunk). Fills ``prep.kappa``,
    ``m4``, ``kappa_pool``, ``draws`` (and ``lam*`` when ``d = 1``)."""
    g = prep.grids[name]
    th, sg = est.theta[name], est.sigma[name]
    if g.rounding != "nearest":
        k, m4, lam = _requantized_moments(est, prep, name, chunk, policy)
    else:
        k, m4, lam = _grid_moments(g, th, sg, chunk, policy=policy)
    k_pool, _, lam_pool = _grid_moments(g, th, sg / POOL_SIGMA_RATIO, chunk, policy=policy)
    prep.kappa[name], prep.m4[name], prep.kappa_pool[name] = k, m4, k_pool
    numel, D = th.numel(), prep.num_draws
    draws = torch.empty(D, numel, dtype=torch.float64)
    lam_draws = torch.empty(D, numel, dtype=torch.float64)
    for a in range(0, numel, chunk):
        b = min(a + chunk, numel)
        xi = _draw_normals(_draw_noise_rows(D, est.d == 1), b - a, gen)
        if g.rounding != "nearest" or D == 0:
            draws[:, a:b], lam_draws[:, a:b] = k[a:b], lam[a:b]
        else:
            draws[:, a:b], lam_draws[:, a:b] = _draw_moments(g, th[a:b].to(torch.float64),
                                                             sg[a:b].to(torch.float64), a, b, k[a:b], xi, D, policy,
                                                             with_lam=est.d == 1)
    prep.draws[name] = list(draws)
    if est.d == 1:
        prep.lam[name], prep.lam_pool[name] = lam, lam_pool
        prep.lam_draws[name] = list(lam_draws)


# Step (in sd) up to which a weight far from the clamped ends keeps its kappa at every bootstrap
# draw: kappa's dependence on the position in the cell is 2e-9 at h = sigma (measured over 201
# positions: range 1.97e-9 at kappa 0.92; 3e-6 at 1.25 sd, 1.6e-4 at 1.5 sd).
POSITION_FREE_STEP = 1.0
# A weight whose sd dwarfs its bounded window (ParamGrid.wide_position_free, the wide-sd regime of
# wsd34: the 1e7 MLP's first layer) keeps its kappa at every draw where kappa cannot leave
# [1 - S, 1] with S at most this: the same 2e-9 the step shortcut above accepts.
POSITION_FREE_WIDE_TOL = 2e-9
# ... and on value tables (float8: the same bound on the table's own cells, _table_position_free);
# False: value-table draws keep only the elements that cannot move at all (sd 0, dead, revealed)
TABLE_WIDE_POSITION_FREE = True
# The draws of weights whose position cannot move (sd 0: theta + 0 * xi is theta-hat) keep the main
# kappa, and a sample or a chunk where no element moves evaluates nothing (_draw_freedom,
# _sampled_draw_parts, _table_draws_at_once); False: they are evaluated as before tb35
DRAWS_KEEP_STILL = True
# ... and the value-table draws form the moving elements' positions alone (not every element's,
# gathered after) and zero the dead blocks' kappa in place where there are any (not a where over
# [D, c] with a zeros tensor): the same numbers, ~4 [D, c] passes fewer on a mostly-still chunk
# (p49c). False: as before
DRAWS_LIVE_POSITIONS = True
# ... and where every (position, element) pair is evaluated in order (no sd-0 element, no padding:
# the 1e7 MLP's first layer, 8 x 16,384 pairs a call) the pairs' per-element tensors are the
# element's repeated (``repeat``, not a gather through ``pairs % c``: an integer remainder of ~3 ms
# a call) and the positions the [D, c] tensor itself; the built draws' unread ``lam`` (the joint
# pass reads a one-coordinate model's alone) one zero expanded, not two [D, c] fills: the same
# numbers (p50a). False: gathers and fills as before
DRAWS_PAIRS_IN_ORDER = True
# The 16-bit casts' (bf16, fp16) draws of a chunk keep the main kappa where a bound shows every
# element's kappa at every draw position within CAST_DRAWS_TOL of it (functional.table.
# settled_drift_bound: the settled own-cell form, 0 <= 1 - kappa <= h^2 / 12, h at most the own
# cell's width at |theta| + max|xi| sd), the chunk's draw evaluations then skipped (cd50). Not
# bitwise, bounded: each weight's draw kappa moves by at most the tolerance eps, so a record's
# delta^2 = sum_j kappa_j w_rj^2 by at most eps times the unquantized one's (a cast's kappa is within
# 1e-4 of 1 where it applies) and its 2 Phi(delta / 2) - 1 (concave in delta) by at most eps / 2
# relative: each draw's figure, hence the interval's ends, within ~eps / 2 relative (measured far
# less: docs/benchmarks.md, "cd50"); the headline is not a draw and does not move. False: evaluated
# as before (bitwise; A/B)
CAST_DRAWS_BOUNDED = True
# 1e-4 (lead50): bf16's bound on the 1e7 MLP reaches 8.1e-5, fp16's 1.3e-6, so both casts' chunks are
# covered; the ends' move, <= 5e-5 relative by the bound above, is 20x below the printed 4 decimals of
# a figure of 0.1 and ~1e-4 of a 16-draw end's own Monte Carlo error (~0.17 of the width); measured at
# 1e5-1e7: bf16 <= 3.5e-8 relative (<= 1.9e-5 of the width), fp16 <= 5.4e-10. POSITION_FREE_WIDE_TOL's
# 2e-9 takes no cast chunk (h^2 / 12 <= 2e-9 needs |theta| + max|xi| sd within ~0.04 sd (bf16) /
# ~0.16 sd (fp16) of 0)
CAST_DRAWS_TOL = 1e-4
_CAST_BOUND_PROBE = 512  # elements whose bound is tried first (a chunk beyond the tolerance: bf16's at 2e-6)
# The bound of a chunk's moving elements formed once (p53c): at most CAST_BOUND_ONCE_MAX of them in one call
# (the probe above pays a call's fixed cost for little: a sample of the 1e7 MLP's second layer holds
# ~1,000 live weights, and a chunk the bound covers took a second call over the probe's elements
# again), more after a probe passes on the elements past it alone. The bound is element-wise
# (settled_drift_bound), so the same mask; the draws bitwise as before. False: the probe, then
# every element, as before (A/B)
CAST_BOUND_ONCE = True
CAST_BOUND_ONCE_MAX = 4 * _CAST_BOUND_PROBE


_TINY64 = torch.finfo(torch.float64).tiny
_NAN64 = torch.full((1,), math.nan, dtype=torch.float64)  # (one value, expanded as a stand-in: read, never written)
# A unit column's (0 or 1 per weight: _unit_columns, the baseline's ones) count of never-moved
# weights at or above FROZEN_KAPPA read off its dot product with them (exact: a count below
# 2^53), not by a comparison, an and and a count over the chunk (p50c). False: counted
STILL_UNIT_COUNT = True


# The joint pass's per-chunk facts of the unit-kappa test (the least live pool sd, whether some weight
# has sd 0, the largest |theta|) read off the estimate's own held tensors (float32 at scale): one
# minimum, and a masked minimum only where some sd is not positive, not the float64 copy's mask, its
# masked select and |theta|'s float64 pass (~0.9 -> ~0.15 ms a 2^18-weight chunk). The same values
# bitwise: the widening is exact and monotone, and so is the division by POOL_SIGMA_RATIO (IEEE
# division by a positive number rounds a smaller value no larger), so the least quotient is the
# least value's quotient. False: on the float64 copies (A/B)
UNIT_FACTS_HELD = True
# The joint pass's frozen counts (kappa below FROZEN_KAPPA, and the never-moved weights at or above
# it) without their own passes where the counts follow from work already done: a unit column (0 or
# 1 per weight) counts c - sum(kappa) (its sum is an exact integer below 2^53); another column with
# never-moved weights in the chunk counts both at once, c less the weights at or above a per-chunk
# threshold (FROZEN_KAPPA, NaN on the never-moved ones: no comparison is true there), one
# comparison and a count, not two comparisons, an and and two counts (a NaN kappa, which neither
# count holds, takes the separate counts: its sum is NaN). The same integers. False: counted as
# before (A/B)
FROZEN_COUNTS_FUSED = True


def _unit_chunk_facts(th: Tensor, sg: Tensor, th_c: Tensor, sg_c: Tensor, sg_pool: Tensor
                      ) -> tuple[float, float, bool, bool]:
    """``(least pool sd of the live weights (sd above float64's tiny; 0.0 if none), largest |theta|,
    every weight live, some weight live)`` of one chunk of the joint pass (the unit-kappa test's
    facts, :data:`UNIT_KAPPA`), ``[c]`` tensors each: ``th`` / ``sg`` the estimate's (float32 or
    float64; read where :data:`UNIT_FACTS_HELD`), ``th_c`` / ``sg_c`` their float64 copies and
    ``sg_pool = sg_c / POOL_SIGMA_RATIO`` (read otherwise, and where some sd is NaN)."""
    c = sg_c.numel()
    if UNIT_FACTS_HELD and sg.dtype in (torch.float32, torch.float64) and th.dtype in (torch.float32, torch.float64) \
            and c > 0:
        tiny = _TINY64 if sg.dtype == torch.float64 else 0.0  # (float32's least positive value is above it)
        least = float(sg.amin())
        if not math.isnan(least):
            big = float(th.abs().amax())
            if least > tiny:  # every weight live: the least sd is the least live one
                return least / POOL_SIGMA_RATIO, big, True, True
            if sg.dtype == torch.float32 and least == 0.0:
                # no negative sd: the least positive one by its bits (ordered as the values), zeros
                # (and -0) moved to the top by ((bits & 0x7fffffff) - 1) & 0x7fffffff (no overflow):
                # int32 passes and a minimum, not a comparison, a select and a minimum (0.46 -> 0.18 ms
                # a 2^18 chunk)
                low = int(sg.view(torch.int32).bitwise_and(0x7FFFFFFF).sub_(1).bitwise_and_(0x7FFFFFFF).amin())
                live_least = math.inf if low == 0x7FFFFFFF else struct.unpack("<f", struct.pack("<i", low + 1))[0]
            else:
                live_least = float(torch.where(sg > tiny, sg, math.inf).amin())
            if live_least == math.inf:
                return 0.0, big, False, False
            return live_least / POOL_SIGMA_RATIO, big, False, True
    live_sd = sg_pool[sg_c > _TINY64]
    n = live_sd.numel()
    return (float(live_sd.min()) if n else 0.0), float(th_c.abs().max()), n == c, n > 0


def _frozen_with_still(k: Tensor, still: Tensor, still_sum: float, thr: Tensor | None) -> tuple[int, Tensor | None]:
    """``(count, thr)``: how many of a chunk's weights the joint pass counts pinned in a kappa column
    (:data:`FROZEN_COUNTS_FUSED`): kappa below ``FROZEN_KAPPA``, or never moved (``still``) and at or
    above it -- ``c`` less the weights at or above ``thr`` (``FROZEN_KAPPA``, NaN on the never-moved
    weights: built here when ``None``, returned for the chunk's next column). ``k``, ``still``:
    ``[c]`` float64 (no NaN: the caller's sum says so) and bool; ``still_sum``: ``k``'s dot with
    ``still``; where it is not positive the never-moved weights count as the separate counts count
    them (none at or above: the column's own count alone)."""
    if not still_sum > 0:
        return count_set(k < FROZEN_KAPPA), thr
    if thr is None:
        thr = torch.full((k.numel(),), FROZEN_KAPPA, dtype=k.dtype).masked_fill_(still, math.nan)
    return k.numel() - count_set(k >= thr), thr


# A unit-kappa chunk's sd-0 weights (each grid's point masses and revealed weights, _unit_columns)
# where each is never moved (sd <= 0) and without influence (a factored weight's V at most V_NONE,
# or infinite: the estimate's mark of rounding-level gradients; either way its power-sum terms are
# exact zeros, linear_factors.factored_power_sums): where the moments are not kept (the Monte Carlo
# form reads them per weight), no output of the joint pass reads their kappa (d_eff counts
# never-moved weights 0 and the pinned share 1 whatever their kappa, the power sums multiply it by
# 0), so every grid's unit column is the chunk's column of ones: no point-mass test
# per grid, no column per grid, one distinct column in the power sums (the 1e7 MLP's second layer,
# 94% such weights: ~12% of a steady scoring call, docs/benchmarks.md "p52b"). A chunk whose sd-0
# weights _unit_columns left to the paths (neither point masses nor revealed) is then a unit chunk
# too: its live weights' kappa is 1 within UNIT_KAPPA_TOL by the chunk's bound, as in every unit
# chunk. Not bitwise: the power sums' float sums over fewer distinct columns round otherwise (the
# 1e7 report's fields within 3e-10 relative). False: each grid's point masses tested (A/B).
INERT_ZERO_SD_UNIT = True


def _zero_sd_inert(reader: _InfluenceReader, sg: Tensor, a: int, b: int, still: Tensor | None) -> bool:
    """Whether every weight of elements ``a:b`` of ``reader``'s parameter with sd at most float64's
    tiny (``sg [c]``, the estimate's sd, float32 or float64) is never moved (``still [c]`` bool,
    ``sd <= 0``; ``None``: the parameter has none) and without influence: a factored parameter's
    variance ``V`` there at most ``V_NONE`` (NaN included: the power sums' dead weights) or
    infinite (:data:`INERT_ZERO_SD_UNIT`). ``False`` for stored or recomputed influences and with
    the switch off."""
    if not INERT_ZERO_SD_UNIT or still is None or reader.factor is None or reader.est._v_diag is None:
        return False
    from .estimation.linear_factors import V_NONE

    if sg.dtype != torch.float32 and any_set((sg > 0) & (sg <= _TINY64)):
        return False  # (an sd-0 weight of the paths that is not never moved)
    v = reader.est._v_diag[reader.name].reshape(-1)[a:b]
    # (V > V_NONE and finite on a never-moved weight: an influence; V infinite, the rounding
    # gradients' mark, or at most V_NONE: none, the power sums' terms exact zeros either way)
    return not any_set(still & (v > V_NONE) & (v < math.inf))


# A 16-bit cast's (bf16 / fp16: a value table at scale 1 whose cell moments of an element never read
# the call's other elements, _elementwise_table) main and pool kappa-only calls in a chunk whose sd-0
# weights are all inert (_zero_sd_inert: never moved and without influence) evaluate the chunk's
# live weights alone (sd > 0, or NaN: what ParamGrid._own_moments sends to the table path) and give
# the inert ones kappa 0 (a point mass's, what most of them had): no point-mass proof, sd-0 split,
# ties' moments or per-element grid over the chunk (the 1e7 MLP's second layer, 94% such weights:
# ~0.3 s of a ~3 s steady call, docs/benchmarks.md "p53a"). No output reads an inert weight's kappa
# (INERT_ZERO_SD_UNIT's reasoning: d_eff counts never-moved weights 0 and the pinned share 1 whatever
# their kappa, the power sums multiply it by an exact 0, the draws keep the main kappa at sd 0). The
# live weights' kappa is bitwise the old call's; the power sums move by the float32 GEMMs' rounding
# over other column values (each side within POWER_SUMS_F32_RTOL of the exact sums), d_eff by its
# float sum's rounding (the 1e5, 1e6 and 1e7 MLPs' reports: bitwise). False: the whole chunk's
# cell-moment calls, as before (A/B)
CAST_LIVE_ONLY = True


def _cast_live_applies(g: ParamGrid) -> bool:
    """Whether :data:`CAST_LIVE_ONLY` may evaluate grid ``g``'s chunks on their live weights alone: a
    16-bit cast's table (:func:`_elementwise_table`, every scale exactly 1), no release bounds, no
    revealed elements, rounding to nearest."""
    return (CAST_LIVE_ONLY and g.kind == "table" and g.rounding == "nearest" and _elementwise_table(g)
            and g.support is None and g.revealed is None and g._unit_scale())


# The chunk's _zero_sd_inert answer is computed once and read by both of its askers (the integer grids'
# unit chunks, then the casts' live facts, _cast_live_facts): the same mask pass over the chunk's
# variances ran twice (p53a, p54c: ~0.3 ms a chunk on the 1e7 MLP's second layer). The same answer.
# False: each asker computes its own, as before (A/B).
INERT_CHECK_ONCE = True


def _zero_sd_inert_once(memo: list[bool], reader: _InfluenceReader, sg: Tensor, a: int, b: int,
                        still: Tensor | None) -> bool:
    """:func:`_zero_sd_inert` of chunk ``a:b``, read from ``memo`` (the chunk's: empty, or its one
    answer) where :data:`INERT_CHECK_ONCE` and it holds one, else computed (and left in it)."""
    if INERT_CHECK_ONCE and memo:
        return memo[0]
    got = _zero_sd_inert(reader, sg, a, b, still)
    if INERT_CHECK_ONCE:
        memo[:] = [got]
    return got


def _cast_live_facts(reader: _InfluenceReader, sg: Tensor, a: int, b: int, still: Tensor, th_c: Tensor,
                     sg_c: Tensor, sg_pool: Tensor, inert: list[bool] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """``(live [m], theta, sd, pool sd, ones)`` of chunk ``a:b`` (float64 ``[m]`` each: ``th_c``,
    ``sg_c``, ``sg_pool`` ``[c]`` at the live indices, ``~still`` ascending; the live weights' unit
    scale) where some weight is never moved (``still [c]`` bool) and every sd-0 one is inert
    (:func:`_zero_sd_inert`; ``sg`` the estimate's ``[c]``), else ``None``: :data:`CAST_LIVE_ONLY`'s
    chunk facts, once for every cast and call (the same tensors: the table path's own-cell facts
    of the main call serve the pool's). ``inert``: the chunk's memo of :func:`_zero_sd_inert_once`."""
    if not any_set(still) or not _zero_sd_inert_once([] if inert is None else inert, reader, sg, a, b, still):
        return None
    live = torch.nonzero(~still).squeeze(-1)
    return (live, th_c.index_select(0, live), sg_c.index_select(0, live), sg_pool.index_select(0, live),
            torch.ones(live.numel(), dtype=torch.float64))


def _cast_live_kappa(g: ParamGrid, th_l: Tensor, sg_l: Tensor, ones_l: Tensor, live: Tensor, c: int,
                     policy: F.CompilePolicy | None) -> Tensor:
    """``[c]`` float64 kappa of a cast's chunk of ``c`` weights (:data:`CAST_LIVE_ONLY`): 0 on the
    inert weights, the table path's kappa (``kappa_only``) on the live ones, ``live [m]`` (ascending
    chunk-relative indices) with ``th_l`` / ``sg_l`` ``[m]`` their float64 weights and sd and
    ``ones_l`` ``[m]`` their scale (1: a grid :func:`_cast_live_applies` to): the values
    :meth:`ParamGrid.moments` gives them (their moments never read the call's other elements; a
    value table's path reads no zero point or code without bounds)."""
    sub = g._path_moments(th_l, sg_l, ones_l, torch.zeros_like(ones_l), None, None, policy, True)
    kappa = torch.zeros(c, dtype=torch.float64)
    return kappa.index_copy_(0, live, sub.kappa.to(torch.float64))


def _unit_columns(g: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int,
                  seen: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor] | None:
    """A unit-kappa chunk's ``(kappa, m4)`` columns ``[c]`` on grid ``g`` (:data:`UNIT_KAPPA`) where
    some element has sd 0: 1 and 3 but for the point masses (sd 0 inside their cell and bounds: 0
    and 0); ``None`` where some sd-0 element is neither a point mass nor revealed (the paths then
    evaluate it). ``seen``: the chunk's columns so far, reused where the
    point masses are the same (the same tensors: the power sums sum them once)."""
    point = g.point_masses_at(th, sg, a, b)
    if point is None:
        return None
    for p, k, m4 in seen:
        if torch.equal(p, point):
            return k, m4
    k = (~point).to(torch.float64)
    m4 = k * 3.0
    seen.append((point, k, m4))
    return k, m4


def _position_free(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, xi: Tensor,
                   k_main: Tensor | None = None) -> Tensor | None:
    """``[D, c]`` mask of the elements whose kappa at ``theta + sigma * xi_b`` equals their kappa
    at theta-hat, or ``None`` (no such shortcut for this grid): on an affine grid, a step
    ``h <= POSITION_FREE_STEP`` sd far (> ``CUTOFF_SIGMAS``) from both clamped ends, where kappa
    depends on the position in the cell by at most ~exp(-2 pi^2 sigma^2 / h^2) (Poisson
    summation: 2e-9 at h = sigma, 0 at h <= FINE_STEP where every path uses the fine-grid
    expansion ``kappa(h)``), dead blocks (kappa 0) and revealed elements (kappa 1). Far means
    at theta-hat and at the draw (``to_min + xi``, ``to_max - xi`` in sd units), from the
    clamped ends and from the bounds the release gives (``ParamGrid.support``). Also the weights
    whose sd dwarfs their bounded window, where kappa stays within ``POSITION_FREE_WIDE_TOL`` of 1
    at every position (:meth:`ParamGrid.wide_position_free`). The mask may be one ``[c]`` row
    expanded (read it, never write it). ``k_main``: the elements' main kappa (the 16-bit casts'
    bounded shortcut, :data:`CAST_DRAWS_BOUNDED`, reads it)."""
    # stored cells (bf16 / fp16 weights): their edges are not the grid's
    if grid.storage_dtype is not None:
        return None
    if grid.kind == "table":
        return _table_position_free(grid, sg, a, b, xi.shape[0], th, xi, k_main)
    if grid.kind != "affine" or F.affine.FUSED_PATH in F.fastpath.GUARD.disabled \
            or F.affine.SPARSE_PATH in F.fastpath.GUARD.disabled:
        return None
    scale, zp, _ = grid.element_grid(a, b)
    s, z = scale.to(torch.float64), zp.to(torch.float64)
    sg64 = sg.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    bounds = grid.element_bounds(a, b)
    fixed = scale <= 0
    if grid.revealed is not None:
        fixed = fixed | grid.revealed.reshape(-1)[a:b].to(torch.bool)
    if bounds is not None:
        fixed = fixed | grid.wide_position_free(sg64, s, z, bounds, POSITION_FREE_WIDE_TOL)
        if bool(fixed.all()):  # every element (the 1e7 MLP's first layer): no per-position test
            return fixed.unsqueeze(0).expand(xi.shape[0], -1)
    th64 = th.to(torch.float64)
    low, high = (grid.qmin + 0.5 - z) * s, (grid.qmax - 0.5 - z) * s  # the outer cells' edges
    if bounds is not None:  # outer cells cut at the bounds the release gives
        low, high = torch.maximum(low, bounds[0]), torch.minimum(high, bounds[1])
    to_min = (th64 - low) / sg64  # sd units above the lowest edge (or bound)
    to_max = (high - th64) / sg64
    cut = F.kernel.CUTOFF_SIGMAS
    # far from both ends at theta-hat (the main kappa is the plain expansion) and at the draw
    fine = ((s / sg64) <= POSITION_FREE_STEP) & (to_min > cut) & (to_max > cut)
    return fixed.unsqueeze(0) | (fine & (to_min + xi > cut) & (to_max - xi > cut))


def _table_position_free(grid: ParamGrid, sg: Tensor, a: int, b: int, draws: int, th: Tensor | None = None,
                         xi: Tensor | None = None, k_main: Tensor | None = None) -> Tensor | None:
    """``[draws, c]`` mask of the elements ``a:b`` of a value-table grid (not of stored weights)
    whose kappa at every bootstrap draw is their kappa at theta-hat, or ``None`` when some
    element's can move (the caller then evaluates every position, as before: a call of fewer
    elements could take another path, e.g. the float8 interpolation table's, and read the
    others' kappa differently by up to its 1e-7). Such elements: dead blocks (kappa 0),
    elements the release gives away (kappa 1), sd 0 (the draw's position is theta-hat itself)
    and, on a table of at most ``WIDE_TABLE_MAX_VALUES`` values with bounds, weights whose sd
    dwarfs their bounded window (at most ``WIDE_MAX_WINDOW`` sd) with the deficit bound ``S``
    (:func:`~mis_lightning.functional.wide.wide_deficit_bound`: ``0 <= 1 - kappa <= S`` at every
    position) at most ``POSITION_FREE_WIDE_TOL``: the affine grids' shortcut
    (:meth:`ParamGrid.wide_position_free`; method.md section 5, "The bootstrap draws") on the
    table's own cells (the 1e7 MLP's first layer under ``float8_weight_only``: all of it).
    With :data:`CAST_DRAWS_BOUNDED`, on a 16-bit cast's table (``th``, ``xi [draws, c]`` the
    positions in sd and ``k_main`` given), also the elements whose kappa provably stays within
    :data:`CAST_DRAWS_TOL` of ``k_main`` at every position (:func:`~mis_lightning.functional.
    table.settled_drift_bound`)."""
    scale, zp, _ = grid.element_grid(a, b)
    sg64 = sg.to(torch.float64)
    fixed = scale <= 0
    if DRAWS_KEEP_STILL:
        fixed = fixed | (sg64 == 0)
    if grid.revealed is not None:
        fixed |= grid.revealed.reshape(-1)[a:b].to(torch.bool)
    bounds = grid.element_bounds(a, b)
    if not bool(fixed.all()) and bounds is not None and TABLE_WIDE_POSITION_FREE and _qbase.WIDE_SD_CLOSED_FORM \
            and grid.values is not None and grid.values.numel() <= WIDE_TABLE_MAX_VALUES:
        lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
        cand = ~fixed & (hi - lo <= WIDE_MAX_WINDOW * sg64) & (hi > lo)
        if any_set(cand):
            ii = torch.nonzero(cand).squeeze(-1)
            cube = table_cube_sum(lo[ii], hi[ii], scale[ii].to(torch.float64), grid.values)
            fixed[ii] = wide_deficit_bound(sg64[ii], cube) <= POSITION_FREE_WIDE_TOL
    if not bool(fixed.all()) and CAST_DRAWS_BOUNDED and th is not None and xi is not None and k_main is not None \
            and bounds is None and _elementwise_table(grid):
        ii = torch.nonzero(~fixed).squeeze(-1)

        def covered(jj: Tensor) -> Tensor:
            return settled_drift_bound(th.index_select(0, jj).to(torch.float64), sg64.index_select(0, jj),
                                       xi.index_select(1, jj).abs().amax(0).to(torch.float64),
                                       k_main.index_select(0, jj).to(torch.float64), grid.values) <= CAST_DRAWS_TOL

        # (all or nothing: a first slice the bound does not cover spares the chunk's bound)
        unit = bool((scale.index_select(0, ii) == 1).all())
        if unit and CAST_BOUND_ONCE and ii.numel() <= CAST_BOUND_ONCE_MAX:
            # (a sample's few live weights, ~1,000 on the 1e7 MLP's second layer: one call over all)
            fixed[ii] = covered(ii)
        elif unit and all_set(covered(ii[:_CAST_BOUND_PROBE])):
            # (the probe's elements, covered, not bounded again: the bound is element-wise)
            rest = ii[_CAST_BOUND_PROBE:] if CAST_BOUND_ONCE else ii
            fixed[rest] = covered(rest)
            if CAST_BOUND_ONCE:
                fixed[ii[:_CAST_BOUND_PROBE]] = True
    if not bool(fixed.all()):
        return None
    return fixed.unsqueeze(0).expand(draws, -1)


# Bootstrap draws (``uncertainty_draws``) from which on the draws are built from 8 cell-moment
# evaluations per weight (see :func:`_draw_moments`); fewer draws are each evaluated.
BUILT_DRAWS_MIN = 5
BUILT_EVALUATIONS = 8  # two random antithetic pairs + the 4 outer nodes of the 5-point rule
# The 5-point Gauss-Hermite rule for a standard normal (probabilists'), nodes in sd units and
# weights summing to 1: the control variate of the built draws' mean. The centre node is
# theta-hat (the kappa change is 0 there), so 4 evaluations; exact for polynomials of degree 9.
_GH_X = torch.tensor([-2.856970013872806, -1.355626179974266, 0.0, 1.355626179974266, 2.856970013872806],
                     dtype=torch.float64)
_GH_W = torch.tensor([0.011257411327720691, 0.2220759220056126, 0.5333333333333333, 0.2220759220056126,
                      0.011257411327720691], dtype=torch.float64)


# p(t) = sum_{m=1..4} c_m t^m through (x_k, delta_k) at the 4 outer nodes: c = V^-1 delta, V_km = x_k^m
_GH_VANDERMONDE_INV = torch.linalg.inv(_GH_X[_GH_X != 0].unsqueeze(-1) ** torch.arange(1, 5, dtype=torch.float64))


def _fused_elements(est: Estimate, prepared: list[_Prepared], chunk_size: int, keep: bool,
                    shares: bool = True) -> int:
    """Affine-grid weights the coming pass sends through the fused cell-moment kernel, as
    :func:`_joint_sums` will: once per equal grid (:func:`_equal_grid_leads`), main and pool
    positions, and the draws' evaluations on their sample of the rows where a chunk is
    subsampled (``DRAW_SAMPLE_FRACTION``; not where the moments are kept). What decides whether
    the compiled kernel is warmed up before the pass (counting every scheme's grid and every
    draw evaluation read about 3.4x the kernel's own count, compiling where the pass would not).
    The share of the main and pool positions the wide-sd closed form takes, and of the draws'
    evaluations the wide-sd shortcut of :func:`_position_free` keeps (:meth:`ParamGrid.wide_shares`,
    on a sample), are left out: they never reach the kernel (the 1e7 MLP's first layer: most of
    its weights). ``shares=False`` keeps them in: an upper bound without the sample's cost."""
    total = 0.0
    for name in dict.fromkeys(n for p in prepared for n in p.grids):
        active = [p for p in prepared if name in p.grids]
        for j, (prep, lead) in enumerate(zip(active, _equal_grid_leads(active, name))):
            g = prep.grids[name]
            c = min(g.numel, chunk_size)
            if lead != j or g.kind != "affine" or c < F.affine.TABLE_MIN_ELEMENTS:
                continue
            ev = float(_draw_evaluations(prep.num_draws))
            if prep.num_draws >= BUILT_DRAWS_MIN and not keep and c >= DRAW_SAMPLE_MIN_WEIGHTS:
                ev *= DRAW_SAMPLE_FRACTION
            closed, free = (g.wide_shares(est.theta[name], est.sigma[name], POSITION_FREE_WIDE_TOL)
                            if shares else (0.0, 0.0))
            total += g.numel * (2.0 * (1.0 - closed) + ev * (1.0 - free))
    return int(total)


def _draw_evaluations(draws: int) -> int:
    """Cell-moment evaluations per movable element behind ``draws`` bootstrap draws (at most;
    position-free elements need none): 8 when the draws are built, else one per draw."""
    return BUILT_EVALUATIONS if draws >= BUILT_DRAWS_MIN else draws


def _draw_noise_rows(draws: int, with_lam: bool = False) -> int:
    """Rows of the standard normals ``xi`` that :func:`_draw_parts` takes for ``draws``
    bootstrap draws: the two random pairs' positions, then one row per evaluated draw (fewer
    than ``BUILT_DRAWS_MIN``, or ``with_lam``), or per antithetic pair of built draws (at least
    ``BUILT_DRAWS_MIN - 1``, so that a scheme with fewer draws, cut by memory, reads a prefix of
    the same rows)."""
    if not draws:
        return 0
    if with_lam or draws < BUILT_DRAWS_MIN:
        return 2 + draws
    return 2 + max((draws + 1) // 2, BUILT_DRAWS_MIN - 1)


# On, the bootstrap draws' standard normals ``xi`` (one block per chunk, shared by every scheme) are
# drawn in float32 and widened to float64, the precision of every later step: torch fills float32
# normals with its vectorized Box-Muller, ~5x faster than its float64 fill, which is scalar (p49b:
# 0.104 -> 0.020 s for a steady 1e7 call's 40 blocks of [10, 16384]; ~0.08 s of ~5.2 s). Another
# realization of the same draws, not a rounding of the old one: each normal is Box-Muller on
# 24-bit uniforms, so |xi| <= sqrt(48 ln 2) = 5.77 (float64's 53-bit uniforms: 8.57), a truncation
# of probability 8e-9 per normal; elsewhere each is within 2^-24 (2 pi r + 1 / (u r)) (and float32's
# own roundings, a few 2^-24 |xi|) of the exact Box-Muller normal of uniforms within 2^-24 of its
# own (u the radius' uniform, r the radius): the draws' statistics are those of exact normals to
# ~1e-6 relative, and the moments match N(0, 1) to the Monte Carlo error (1e8 draws: var 0.99988,
# m4 2.9996). Only the interval's ends (p10 / p90, Monte Carlo estimates) move: by <= 3.1e-6 of the
# width at 1e7, 9.3e-9 at 1e5 (p51c). tests/test_sampled_draws.py's sampled-vs-full check read a
# one-seed 5% of the width, which float64 normals also exceed on 3 of 24 seeds (float32: 4 of 24; up
# to 7-8%): p51c derived its bound (the sample noise the report carries, the draws' spread;
# docs/benchmarks.md, "p51c") and switched this on. The float32 fill's vectorized log / cos may
# round differently on another CPU's instruction set (as the GEMMs may). False: float64 normals,
# the stream before p49b.
DRAW_NORMALS_FLOAT32 = True


def _draw_normals(rows: int, n: int, gen: torch.Generator) -> Tensor:
    """``[rows, n]`` float64 standard normals from ``gen``: the bootstrap draws' positions ``xi``
    (:func:`_joint_sums`, :func:`_param_moments`), drawn in float32 where
    :data:`DRAW_NORMALS_FLOAT32` (then widened: exactly representable), else in float64."""
    if DRAW_NORMALS_FLOAT32:
        return torch.randn(rows, n, dtype=torch.float32, generator=gen).to(torch.float64)
    return torch.randn(rows, n, dtype=torch.float64, generator=gen)


def _draw_moments(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, k_main: Tensor, xi: Tensor,
                  draws: int, policy: F.CompilePolicy | None, with_lam: bool = False) -> tuple[Tensor, Tensor]:
    """``[D, c]`` kappa (and ``lam``) of elements ``a:b`` at the ``D = draws`` bootstrap draws:
    ``k_main + mix @ basis`` from :func:`_draw_parts` (arguments as there)."""
    basis, mix, lam = _draw_parts(grid, th, sg, a, b, k_main, xi, draws, policy, with_lam)
    return k_main + mix @ basis, lam


def _built_mix(draws: int) -> Tensor:
    """``[D, 1 + ceil(D / 2)]`` the built draws as combinations of their parts ``[mu, sd * zeta_1,
    ...]``: draw ``b`` is ``mu + sd zeta_b`` in the first half, ``mu - sd zeta_(b - half)`` in the
    second (antithetic)."""
    mix = _BUILT_MIX.get(draws)
    if mix is None:
        half = (draws + 1) // 2
        mix = torch.zeros(draws, 1 + half, dtype=torch.float64)
        mix[:, 0] = 1.0
        for bi in range(draws):
            mix[bi, 1 + bi % half] = 1.0 if bi < half else -1.0
        _BUILT_MIX[draws] = mix
    # a copy: the callers own their parts (one clone, not the ~D element writes: ~90 us a call,
    # ~90 calls a 1e5 scoring; py37)
    return mix.clone()


_BUILT_MIX: dict[int, Tensor] = {}  # draws -> _built_mix's matrix (constant: a function of draws alone)


def _draw_parts(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, k_main: Tensor, xi: Tensor,
                draws: int, policy: F.CompilePolicy | None, with_lam: bool = False,
                table_at_once: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The kappa changes of elements ``a:b`` at the ``D = draws`` bootstrap draws as
    ``(basis [k, c], mix [D, k], lam [D, c])``: draw ``b``'s kappa is ``k_main + mix[b] @ basis``
    (per-record sums are linear in the columns: the scoring pass sums the ``k`` basis rows, not
    the ``D`` draws), ``lam`` the draws' ``mean_abs`` when ``with_lam`` (else zeros); from
    ``xi [_draw_noise_rows(D, with_lam), c]`` standard normals.

    With fewer than :data:`BUILT_DRAWS_MIN` draws, or ``with_lam`` (one coordinate), each
    draw is evaluated: the cells re-read around ``theta + sigma * xi[2 + b]``. Otherwise the
    draws are built from each element's mean ``mu`` and variance ``v`` of the kappa change
    ``delta(t) = kappa(theta + sigma t) - kappa_main``, ``t ~ N(0, 1)``: draw ``b`` is
    ``kappa_main + mu + sqrt(v) * zeta_b`` with antithetic normals ``zeta`` (``xi[2 + b]`` for
    the first half of the draws, their negatives for the second). Both moments are unbiased,
    from 8 evaluations per element:

    * ``delta`` at the two antithetic random pairs ``+-xi[0]``, ``+-xi[1]``; with the even and
      odd halves ``e_i``, ``o_i`` of pair ``i``, ``v = (o_1^2 + o_2^2 + (e_1 - e_2)^2) / 2``
      (``E o_i = 0``, pairs independent; ``v >= 0``);
    * ``mu`` = the 5-point Gauss-Hermite rule of ``delta`` (4 evaluations) plus the mean over
      the 4 random positions of ``delta - p``, ``p`` the polynomial interpolating ``delta`` at
      the rule's nodes (the rule integrates ``p`` exactly, so the sum is unbiased; the random
      part is only the interpolation's residual: small where kappa moves smoothly, e.g. near a
      clamped end, where the pairs alone left a centre noise of ~0.7 of the draws' sd).

    A draw's leakage depends on the draw only through per-record sums of ``w^2 delta`` over
    many elements (the averaged regime, the only one that reads the draws: method.md section 3,
    "The uncertainty interval"), so only each element's mean and variance of ``delta`` matter
    there, estimated per element and averaged over elements: 8 evaluations replace ``D`` (16
    by default). Elements whose kappa cannot move (:func:`_position_free` at every position)
    keep ``k_main`` exactly. ``table_at_once``: a value-table grid scores the 8 positions in one
    call (:func:`_table_draws_at_once`; the subsampled draws, :func:`_draw_sample`)."""
    D, c = draws, xi.shape[1]
    if with_lam or D < BUILT_DRAWS_MIN:
        kap, lam = _evaluated_draws(grid, th, sg, a, b, k_main, xi[2: 2 + D], policy, with_lam)
        return kap - k_main, torch.eye(D, dtype=torch.float64), lam
    x, y = xi[0], xi[1]
    nodes = _GH_X[_GH_X != 0]
    t = torch.stack([x, -x, y, -y])  # [4, c] random positions
    pos = torch.cat([t, nodes.unsqueeze(-1).expand(-1, c)])
    free, still = _draw_freedom(grid, th, sg, a, b, pos, k_main)
    half = (D + 1) // 2
    if still:  # no element's kappa moves: every change exactly 0 (what the evaluations gave)
        if DRAWS_STILL_FLAGGED and DRAWS_STILL_EXPANDED:  # (StillParts' zeros are read, never written)
            return StillParts((_zeros(1 + half, c), _built_mix(D), _zeros(D, c)))
        out = (torch.zeros(1 + half, c, dtype=torch.float64), _built_mix(D), torch.zeros(D, c, dtype=torch.float64))
        return StillParts(out) if DRAWS_STILL_FLAGGED else out
    kap, _ = _evaluated_draws(grid, th, sg, a, b, k_main, pos, policy, table_at_once=table_at_once,
                              freedom=(free,))
    dl, dn = kap[:4] - k_main, kap[4:] - k_main  # at the random positions, at the rule's nodes
    even1, even2 = 0.5 * (dl[0] + dl[1]), 0.5 * (dl[2] + dl[3])
    odd1, odd2 = 0.5 * (dl[0] - dl[1]), 0.5 * (dl[2] - dl[3])
    sd = (0.5 * (odd1.square() + odd2.square() + (even1 - even2).square())).sqrt()
    # the interpolant at the random positions: p(t) = sum_m c_m t^m (m = 1..4; p(0) = 0, the
    # centre node), c from the 4 outer nodes (Vandermonde), evaluated by Horner
    coef = _GH_VANDERMONDE_INV @ dn  # [4, c]
    p = coef[3] * t
    for m in (2, 1, 0):
        p = (p + coef[m]) * t
    mu = _GH_W[_GH_X != 0] @ dn + (dl - p).mean(0)
    basis = torch.cat([mu.unsqueeze(0), sd * xi[2: 2 + half]])  # draws: mu +- sd zeta (_built_mix)
    return basis, _built_mix(D), (_zeros(D, c) if DRAWS_PAIRS_IN_ORDER else torch.zeros(D, c, dtype=torch.float64))


def _zeros(*shape: int) -> Tensor:
    """A float64 zero expanded to ``shape`` (stride 0: read it, never write it)."""
    return torch.zeros((), dtype=torch.float64).expand(*shape)


def _draw_freedom(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, xi: Tensor,
                  k_main: Tensor | None = None) -> tuple[Tensor | None, bool]:
    """``(free, still)``: :func:`_position_free`'s mask at the positions ``theta + sigma * xi_b``
    and whether no element moves at all (every one free or of sd 0, whose position is
    theta-hat itself): the draws then keep ``k_main`` with no evaluation (the 1e7 MLP's dead
    units, and its first layer on the bounded grids)."""
    free = _position_free(grid, th, sg, a, b, xi, k_main)
    if not DRAWS_KEEP_STILL:
        return free, False
    zero = sg == 0
    return free, bool(zero.all() if free is None else (free | zero).all())


# The 16-bit casts' draws of a chunk too small to subsample (the 1e7 MLP's biases and last layer,
# 4,096 weights: 8 positions of 2^15 pairs) in one table call, not one per position (tb37: their
# moments never read the call's other elements; the exact windows' row sums may round 1 ulp apart
# in a call of another size; the 1e7 report bitwise; ~5 ms per call saved).
# False: one call per position from INTERP_MIN_ELEMENTS pairs on, as before
DRAWS_AT_ONCE_ELEMENTWISE = True
# The draws of a small affine chunk (all its D * c (position, element) pairs below
# affine.TABLE_MIN_ELEMENTS, so that no position alone or together reaches the fused kernel: the 1e5
# MLP's last layer, 128 weights) in one cell-moment call, not one per position: the same per-element
# path and arithmetic (sm38: 13-20 -> 3.5-4 ms a scheme at 1e5; each call cost ~1-3 ms whatever its size).
# False: one call per position, as before
AFFINE_DRAWS_AT_ONCE_SMALL = True


def _evaluated_draws(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, k_main: Tensor, xi: Tensor,
                     policy: F.CompilePolicy | None, with_lam: bool = False,
                     table_at_once: bool = False,
                     freedom: tuple[Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """``[D, c]`` kappa (and ``lam`` when ``with_lam``, else zeros) of elements ``a:b`` with
    the cells re-read around ``theta + sigma * xi_b`` (``xi [D, c]``). Elements whose kappa
    cannot move (:func:`_position_free`) keep ``k_main`` without a cell-moment evaluation: on
    fine grids (int8 with sigma above the step) most of a draw costs nothing. ``freedom``:
    ``(free,)`` of :func:`_draw_freedom` already computed for these positions (not all still)."""
    D, c = xi.shape
    th64, sg64 = th.to(torch.float64), sg.to(torch.float64)
    kap = torch.empty(D, c, dtype=torch.float64)
    # (written below with_lam only; else read, never written: one zero expanded, DRAWS_PAIRS_IN_ORDER)
    lam = torch.zeros(D, c, dtype=torch.float64) if with_lam or not DRAWS_PAIRS_IN_ORDER else _zeros(D, c)
    if with_lam:
        free = None
    elif freedom is None:
        free, still = _draw_freedom(grid, th, sg, a, b, xi, k_main)
        if still:
            return k_main.to(torch.float64).expand(D, c).clone(), lam
    else:
        free = freedom[0]
    scale = zp = bounds = None
    if free is None and not with_lam and grid.kind == "table" and 1 < D \
            and (table_at_once or D * c < F.table.INTERP_MIN_ELEMENTS or (DRAWS_AT_ONCE_ELEMENTWISE
                                                                         and _elementwise_table(grid))):
        # A small chunk of a value-table grid: the D positions in one call (the per-call cost,
        # ~1-20 ms, dominated: a 128-weight float8 row cost as much as 32k weights). Every
        # element takes the path it takes alone (below INTERP_MIN_ELEMENTS in both forms; on
        # the 16-bit casts' tables, whatever the call's size: _elementwise_table).
        return _table_draws_at_once(grid, th64, sg64, a, b, xi, policy, k_main), lam
    if not with_lam and grid.kind == "affine" and 1 < D and (
            table_at_once or (AFFINE_DRAWS_AT_ONCE_SMALL and free is not None
                              and D * c < F.affine.TABLE_MIN_ELEMENTS)):
        # the sampled draws (_sampled_draw_parts): the positions' moving elements in one call, so
        # that a sample of a chunk of >= TABLE_MIN_ELEMENTS takes the chunk's (fused) path; a
        # small chunk (all its pairs below that path, as each position alone is) likewise
        return _affine_draws_at_once(grid, th64, sg64, a, b, k_main, xi, free, policy), lam
    for bi in range(D):
        th_b = th64 + sg64 * xi[bi]
        if free is None:
            mm = grid.moments(th_b, sg64, a, b, use_codes=False, compile_policy=policy)
            kap[bi] = mm.kappa
            if with_lam:
                lam[bi] = mm.mean_abs
            continue
        kap[bi] = k_main
        idx = torch.nonzero(~free[bi]).squeeze(-1)
        if idx.numel() == 0:
            continue
        path = None
        if idx.numel() < F.affine.TABLE_MIN_ELEMENTS <= c:
            # the same (fused, table) path as the whole chunk, not the slower exact window sums:
            # the movers alone on it (affine grids), or padded with position-free elements
            if _positions_unpadded(grid):
                path = F.affine.TABLE_MIN_ELEMENTS
            else:
                idx = _padded_positions(free[bi], idx, F.affine.TABLE_MIN_ELEMENTS)
        if scale is None:
            scale, zp, _ = grid.element_grid(a, b)
            bounds = grid.element_bounds(a, b)
        sel = lambda t, ii=idx: t.index_select(0, ii)  # noqa: E731 - the values of t[idx], faster
        kap[bi].index_copy_(0, idx, grid.element_moments(
            sel(th_b), sel(sg64), sel(scale), sel(zp), None,
            None if bounds is None else (sel(bounds[0]), sel(bounds[1])), policy, kappa_only=True,
            path_elements=path).kappa)
    return kap, lam


# The padded positions of a draw evaluation (the moving ones, then position-free ones up to
# affine.TABLE_MIN_ELEMENTS: the chunk's kernel path) in ascending order as one ``nonzero`` of the
# moving mask with the padding's positions set, not a ``sort`` of the two lists concatenated: the
# same indices (the two lists are disjoint, each ascending), ~0.4 against ~1.2 ms for 2^15 of them
# (p52d; three such sorts in a steady 1e5 call). False: the sort, as before
DRAW_PAD_BY_MASK = True


def _padded_positions(free: Tensor, idx: Tensor, path_min: int) -> Tensor:
    """``[n]`` int64 ascending: ``idx`` (``nonzero(~free)``, the positions that can move, fewer than
    ``path_min``) with the first ``path_min - idx.numel()`` positions of ``free`` (``[m]`` bool,
    position-free) added, whose kappa is recomputed (within the shortcut's tolerance of their
    ``k_main``), so that the call takes the path of ``path_min`` elements. Affine grids without
    stored weights take that path by ``path_elements`` instead (:data:`DRAW_POSITIONS_UNPADDED`)."""
    pad = torch.nonzero(free).squeeze(-1)[: path_min - idx.numel()]
    if not DRAW_PAD_BY_MASK:
        return torch.sort(torch.cat([idx, pad])).values
    return torch.nonzero((~free).index_fill_(0, pad, True)).squeeze(-1)


def _affine_draws_at_once(grid: ParamGrid, th64: Tensor, sg64: Tensor, a: int, b: int, k_main: Tensor, xi: Tensor,
                          free: Tensor | None, policy: F.CompilePolicy | None) -> Tensor:
    """``[D, c]`` kappa of elements ``a:b`` of an affine grid at ``theta + sigma * xi_b`` for every
    row of ``xi``, the elements that can move (not ``free``, :func:`_position_free`) of every
    position in one cell-moment call, on the path of a call of ``TABLE_MIN_ELEMENTS`` (the fused
    kernel's) whenever ``D * c`` (or the sampled chunk, ``_chunk_elements``) reaches it: by
    ``path_elements`` (:data:`DRAW_PAIRS_UNPADDED`, :data:`DRAW_POSITIONS_UNPADDED`), or padded
    with position-free pairs and then repeats (stored weights, or the switches off), as
    :func:`_evaluated_draws` does each position. Position-free elements keep ``k_main``; without the
    shortcut (``free is None``) dead blocks are 0, revealed elements 1."""
    D, c = xi.shape
    scale, zp, _ = grid.element_grid(a, b)
    dead = scale <= 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    bounds = grid.element_bounds(a, b)
    kap = k_main.to(torch.float64).expand(D, c).reshape(-1).clone()
    if free is None:
        idx = torch.arange(D * c)
    else:
        flat = free.reshape(-1)
        idx = torch.nonzero(~flat).squeeze(-1)
        if idx.numel() == 0:
            return kap.reshape(D, c)
        if idx.numel() < F.affine.TABLE_MIN_ELEMENTS <= D * c and not _positions_unpadded(grid):
            idx = _padded_positions(flat, idx, F.affine.TABLE_MIN_ELEMENTS)
    n_pairs = idx.numel()
    # (the movers alone stand for the call of D c pairs their padding reached, at least)
    chunk = max(getattr(grid, "_chunk_elements", c), D * c if _positions_unpadded(grid) else 0)
    path = None
    if DRAW_PAIRS_UNPADDED and grid.storage_dtype is None:
        # the pairs alone, on the path of the padded call (ParamGrid.element_moments' path_elements)
        ev = idx
        if 0 < n_pairs < F.affine.TABLE_MIN_ELEMENTS <= chunk:
            path = F.affine.TABLE_MIN_ELEMENTS
    else:
        ev = _padded_pairs(idx, chunk, F.affine.TABLE_MIN_ELEMENTS)
    el = ev % c  # the element of each evaluated (position, element) pair
    sel = lambda t: t.index_select(0, el)  # noqa: E731
    pos = (th64 + sg64 * xi).reshape(-1).index_select(0, ev)
    kap.index_copy_(0, idx, grid.element_moments(
        pos, sel(sg64), sel(scale), sel(zp), None, None if bounds is None else (sel(bounds[0]), sel(bounds[1])),
        policy, kappa_only=True, path_elements=path).kappa[:n_pairs])
    kap = kap.reshape(D, c)
    if free is None:
        kap = torch.where(dead, torch.zeros_like(kap), kap)
        kap = _revealed_draws(grid, kap, th64, sg64, xi, a, b)
    return kap


# The affine draws' evaluated pairs alone, on the kernel path of the call _padded_pairs pads them to
# (ParamGrid.element_moments' path_elements), not padded with repeats of themselves whose moments
# are discarded: a sampled chunk's ~4k moving pairs were evaluated as 2^15 (the 1e5 MLP's second
# layer, 8.5 -> 2.2 ms per int4 grid; p56a). The same moments: the kernels are element-wise
# (kernel.in_blocks' ulp caveat). False: padded, as before (affine grids of stored weights always)
DRAW_PAIRS_UNPADDED = True


# ... and, on affine grids, a draw's moving elements alone on the path of the call the position-free
# ones padded them to (_padded_positions, the fused kernel's affine.TABLE_MIN_ELEMENTS), in both
# _evaluated_draws and _affine_draws_at_once: the padding's position-free elements now keep k_main
# like every other position-free element, instead of their kappa recomputed at the draw (within
# POSITION_FREE_WIDE_TOL, 2e-9, of k_main; but a revealed weight, kappa 1 at every position, read
# ~1 - 7e-8 as an unrevealed one's cells: the 1e5 MLP's int4 absmaxes). p56a: 0.weight's int8
# draws 13.3 -> 4.0 ms (4,432 movers of 32,768 pairs). Only with DRAW_PAIRS_UNPADDED; False: padded, as before
DRAW_POSITIONS_UNPADDED = True


def _positions_unpadded(grid: ParamGrid) -> bool:
    """Whether a draw's moving elements on ``grid`` go alone on the padded call's path
    (:data:`DRAW_POSITIONS_UNPADDED`: affine grids without stored weights)."""
    return DRAW_POSITIONS_UNPADDED and DRAW_PAIRS_UNPADDED and grid.kind == "affine" and grid.storage_dtype is None


def _padded_pairs(idx: Tensor, chunk: int, path_min: int) -> Tensor:
    """``idx`` (the evaluated (position, element) pairs, flat) followed by repeats of itself up to
    ``path_min`` pairs when fewer, if the chunk (``chunk`` elements) is at least ``path_min``: a
    sample of a chunk whose full evaluation takes the kernel path of ``path_min`` elements and up
    at every position (fused affine kernel, interpolated value table) then takes it too, so that
    its moments are the full evaluation's (the caller reads the first ``idx.numel()`` results;
    the kernels are element-wise). A sixteenth of a 2^15-weight chunk, 8 positions, is 2^14
    pairs."""
    n = idx.numel()
    if n == 0 or n >= path_min or chunk < path_min:
        return idx
    return torch.cat([idx, idx.repeat(-(-(path_min - n) // n))[: path_min - n]])


def _table_draws_at_once(grid: ParamGrid, th64: Tensor, sg64: Tensor, a: int, b: int, xi: Tensor,
                         policy: F.CompilePolicy | None, k_main: Tensor | None = None) -> Tensor:
    """``[D, c]`` kappa of elements ``a:b`` at ``theta + sigma * xi_b`` for every row of ``xi``
    in one cell-moment call: what ``grid.moments(theta + sigma * xi_b, sigma, a, b,
    use_codes=False)`` gives row by row (dead blocks 0, revealed elements 1). With ``k_main``
    (their kappa at theta-hat), on a table whose moments never depend on the call's other
    elements (:func:`_elementwise_table`: no interpolation table, no bounds), the elements of sd
    0 keep it (their position is theta-hat itself) and only the others are evaluated: the 1e7
    MLP's second layer, mostly dead units, sent ~90% sd-0 positions through the point-mass test."""
    D, c = xi.shape
    scale, zp, _ = grid.element_grid(a, b)
    dead = scale <= 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    bounds = grid.element_bounds(a, b)
    live = None
    if DRAWS_KEEP_STILL and k_main is not None and bounds is None and _elementwise_table(grid):
        still = sg64 == 0
        if any_set(still):
            live = torch.nonzero(~still).squeeze(-1)
    in_order = False
    if live is None:
        ev = _padded_pairs(torch.arange(D * c), getattr(grid, "_chunk_elements", c), F.table.INTERP_MIN_ELEMENTS)
        # (no padding: ev is 0 .. D c - 1, the pairs in the positions' row-major order)
        in_order = DRAWS_PAIRS_IN_ORDER and ev.numel() == D * c
        el = ev if in_order else ev % c
    else:  # the moving elements' pairs alone (row-major like the positions)
        el = live.repeat(D)
        ev = el + c * torch.arange(D).repeat_interleave(live.numel())
    # [c] -> [D c], row-major like the positions
    rep = (lambda t: t.repeat(D)) if in_order else (lambda t: t.index_select(0, el))  # noqa: E731
    if live is not None and DRAWS_LIVE_POSITIONS:  # (theta + sigma * xi per element: the same numbers)
        pos = (th64.index_select(0, live) + sg64.index_select(0, live) * xi.index_select(1, live)).reshape(-1)
    elif in_order:
        pos = (th64 + sg64 * xi).reshape(-1)
    else:
        pos = (th64 + sg64 * xi).reshape(-1).index_select(0, ev)
    mm = grid.element_moments(pos, rep(sg64), rep(scale), rep(zp),
                              None, None if bounds is None else (rep(bounds[0]), rep(bounds[1])), policy,
                              kappa_only=True)  # kappa alone is read
    if live is None:
        kap = mm.kappa[: D * c].reshape(D, c)
    else:
        assert k_main is not None
        kap = k_main.to(torch.float64).expand(D, c).clone()
        kap[:, live] = mm.kappa.reshape(D, -1)
    if live is not None and DRAWS_LIVE_POSITIONS:  # (kap is this call's own copy)
        if any_set(dead):
            kap.masked_fill_(dead, 0.0)
    else:
        kap = torch.where(dead, torch.zeros_like(kap), kap)
    return _revealed_draws(grid, kap, th64, sg64, xi, a, b)


def _elementwise_table(grid: ParamGrid) -> bool:
    """Whether a value-table grid's cell moments of an element never depend on which other
    elements share its call: no float8 interpolation table (whose use counts the call's size,
    ``table.INTERP_MIN_ELEMENTS``) and no stored cells; the 16-bit casts (``bf16``, ``fp16``)."""
    return grid.kind == "table" and grid.storage_dtype is None and grid.values is not None \
        and interp_table(grid.values) is None


def _revealed_draws(grid: ParamGrid, kap: Tensor, th64: Tensor, sg64: Tensor, xi: Tensor, a: int, b: int) -> Tensor:
    """``kap [D, c]`` with the elements the release gives away (:attr:`ParamGrid.revealed`) at 1,
    or, for a grid of stored weights (``storage_dtype``), at the storage grid's kappa at each draw's
    position (their release is ``rnd_D(theta)``; method.md section 5)."""
    if grid.revealed is None:
        return kap
    rev = grid.revealed.reshape(-1)[a:b].to(torch.bool)
    if grid.storage_dtype is None or not bool(rev.any()):
        return torch.where(rev, torch.ones_like(kap), kap)
    ii = torch.nonzero(rev).squeeze(-1)
    pos = (th64[ii] + sg64[ii] * xi[:, ii]).reshape(-1)
    sm = storage_cell_moments(pos, sg64[ii].expand(xi.shape[0], -1).reshape(-1), grid.storage_dtype)
    kap = kap.clone()
    kap[:, ii] = sm.kappa.reshape(xi.shape[0], -1)
    return kap


# Subsampled bootstrap draws (averaged regime; method.md section 3, "Subsampled draws"). A chunk of
# at least DRAW_SAMPLE_MIN_WEIGHTS weights evaluates the built draws' moments (mu, v) on a simple
# random sample of DRAW_SAMPLE_FRACTION of its rows (whole output rows of a factored weight,
# elements otherwise), the same rows for every scheme, and scales them as Horvitz-Thompson
# estimates: mu / pi and sqrt(v / pi), so that the per-record sums of w^2 mu and of w^4 v, all a
# draw's leakage reads, are unbiased. The sample's noise in the draws' centre is estimated from
# DRAW_SAMPLE_GROUPS random groups of the sampled rows and added to the interval's record error.
# A sixteenth (a quarter until pf27): the draws were a third of a call's cost at 1e6-1e7 weights,
# where the records' error is the interval's width (the ends moved by ~1e-6 of it); where the
# draws are the width, the larger sample noise widens the interval (coverage kept: method.md
# section 3, "Subsampled draws"; docs/benchmarks.md, "pf27").
DRAW_SAMPLE_FRACTION = 1 / 16
DRAW_SAMPLE_MIN_WEIGHTS = 1 << 15
DRAW_SAMPLE_GROUPS = 8
DRAW_SAMPLE_MIN_ROWS = 4 * DRAW_SAMPLE_GROUPS  # rows of the chunk (the groups' noise estimate needs several per group)


class _SubsetGrid(ParamGrid):
    """A view of a :class:`ParamGrid` on some elements ``sel`` of its chunk ``a:b``: element
    ``i`` of the view is element ``a + sel[i]`` of the grid (:func:`_subset_grid`)."""

    _sel_grid: tuple[Tensor, Tensor, Tensor | None]
    _sel_bounds: tuple[Tensor, Tensor] | None
    _chunk_elements: int

    # ``shared`` (ParamGrid's: expansions shared between equal grids) has nothing to share here:
    # the view's per-element values are its own; accepted, as ParamGrid._chunk_grid passes it
    # (bb36: without it every bf16 / fp16-stored model's intx schemes failed with a TypeError)
    def element_grid(self, start: int, end: int, *, shared: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        scale, zp, code = self._sel_grid
        return scale[start:end], zp[start:end], None if code is None else code[start:end]

    def element_bounds(self, start: int, end: int, *, shared: bool = False) -> tuple[Tensor, Tensor] | None:
        if self._sel_bounds is None:
            return None
        return self._sel_bounds[0][start:end], self._sel_bounds[1][start:end]


# _subset_grid expands the per-block values over the sampled whole rows alone (a sixteenth of the
# chunk's rows: the draws' sample of a factored weight) instead of over the chunk, then a gather
# (tb36; the same values). False: the chunk's expansion and a gather (A/B)
SUBSET_BY_BLOCK = True


def _block_gather(t: Tensor | None, grid: ParamGrid, rows: Tensor) -> Tensor:
    """Float64 values ``[k * L]`` of the per-block tensor ``t`` (as ``ParamGrid`` holds ``scale``,
    ``zero_point`` and ``support``: one entry per block of ``grid.block_size``, row-major over the
    blocks; ``None``: zeros) over the whole rows ``rows [k]`` of the last dim (``L`` elements each)
    of a weight of ``grid.shape``: what ``_expand_blocks`` gives those elements (a copy of the
    same values; its row-wise form on the sampled rows alone)."""
    shape, block = tuple(grid.shape), tuple(grid.block_size)
    last, b_last = shape[-1], block[-1]
    if t is None:
        return torch.zeros(rows.numel() * last, dtype=torch.float64)
    nblocks = [math.ceil(s_ / b_) for s_, b_ in zip(shape, block)]
    lead_block = torch.zeros_like(rows)
    rem, stride = rows, math.prod(shape[:-1])
    for dim in range(len(shape) - 1):
        stride //= shape[dim]
        coord = torch.div(rem, stride, rounding_mode="floor")
        rem = rem - coord * stride
        lead_block += torch.div(coord, block[dim], rounding_mode="floor") * math.prod(nblocks[dim + 1: -1])
    vals = t.to(torch.float64).reshape(-1, nblocks[-1]).index_select(0, lead_block)  # [k, nb_last]
    if b_last > 1:
        k, nb = vals.shape
        vals = vals.unsqueeze(-1).expand(k, nb, b_last).reshape(k, nb * b_last)[:, :last]
    return vals.reshape(-1)


def _whole_rows(grid: ParamGrid, a: int, sel: Tensor) -> Tensor | None:
    """The rows ``[k]`` of the last dim whose elements are exactly ``a + sel`` (whole rows, in
    order: the draws' sample of a factored weight), or ``None``."""
    shape = tuple(grid.shape)
    if len(shape) < 2 or a % shape[-1] or sel.numel() % shape[-1]:
        return None
    last = shape[-1]
    rows = sel[::last].div(last, rounding_mode="floor")
    whole = (rows.unsqueeze(-1) * last + torch.arange(last)).reshape(-1)
    return rows + a // last if torch.equal(whole, sel) else None


def _subset_grid(grid: ParamGrid, a: int, b: int, sel: Tensor) -> ParamGrid:
    """``grid`` restricted to elements ``a + sel`` (``sel`` sorted, relative to ``a``), indexed
    ``0 .. len(sel)``: its per-element grid, bounds and revealed mask (what the draws read)."""
    sub = copy.copy(grid)
    sub.__class__ = _SubsetGrid
    rows = _whole_rows(grid, a, sel) if SUBSET_BY_BLOCK else None
    if rows is not None:
        code = None
        if grid.codes is not None:
            code = grid.codes.reshape(-1, grid.shape[-1]).index_select(0, rows).reshape(-1).to(torch.float64)
        sub._sel_grid = (_block_gather(grid.scale, grid, rows), _block_gather(grid.zero_point, grid, rows), code)
        bounds = None
        if grid.support is not None:
            bounds = (_block_gather(grid.support[0], grid, rows), _block_gather(grid.support[1], grid, rows))
            if grid.storage_dtype is not None:
                bounds = stored_bounds(bounds[0], bounds[1], grid.storage_dtype)
        sub._sel_bounds = bounds
    else:
        scale, zp, code = grid.element_grid(a, b)
        sub._sel_grid = (scale[sel], zp[sel], None if code is None else code[sel])
        bounds = grid.element_bounds(a, b)
        sub._sel_bounds = None if bounds is None else (bounds[0][sel], bounds[1][sel])
    if grid.revealed is not None:
        sub.revealed = grid.revealed.reshape(-1)[a:b][sel]
    sub._chunk_elements = b - a  # the kernel path a full evaluation of the chunk takes (_padded_pairs)
    return sub


def _draw_sample(c: int, unit: int, gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """A simple random sample of ``round(DRAW_SAMPLE_FRACTION * units)`` of the chunk's
    ``units = c // unit`` rows: ``(elements [m] sorted, group [m] in 0..DRAW_SAMPLE_GROUPS-1,
    pi)`` with ``pi`` the exact inclusion probability (sampled rows / rows)."""
    units = c // unit
    m = max(DRAW_SAMPLE_GROUPS, int(round(DRAW_SAMPLE_FRACTION * units)))
    perm = torch.randperm(units, generator=gen)[:m]
    group_of_row = torch.empty(units, dtype=torch.long)
    group_of_row[perm] = torch.arange(m) % DRAW_SAMPLE_GROUPS  # balanced random groups
    rows = torch.sort(perm).values
    elem = (rows.unsqueeze(-1) * unit + torch.arange(unit)).reshape(-1)
    return elem, group_of_row[rows].repeat_interleave(unit), m / units


# _draw_parts flags the parts of positions none of which moves (_draw_freedom's still: the 16-bit casts'
# chunks under CAST_DRAWS_BOUNDED, bf16's every chunk and fp16's first layer on the 1e7 MLP) as
# StillParts, and the sampled draws then return the flagged zeros of a sample of sd-0 weights (no
# Horvitz-Thompson scaling, groups' fill or the draws' sums' scan of their zeros): the same sums,
# the parts moving no row either way (p51d). False: the zeros scaled and scanned as before
DRAWS_STILL_FLAGGED = True
# ... and _draw_parts' flagged zeros one value expanded (as the sampled draws' above), not two fills of
# [1 + D / 2, c] and [D, c] float64 (fresh pages: ~0.2 ms a chunk sample, 0.01-0.02 s of the 1e7 call's
# casts, p53c): the same values. False: filled, as before
DRAWS_STILL_EXPANDED = True


class StillParts(tuple):
    """``(basis, mix, groups)`` of :func:`_sampled_draw_parts` for a sample where no kappa moves:
    every basis and group entry exactly 0 (the zeros may be one value expanded: read them, never
    write them). The flag lets the draws' sums (:func:`_draw_sums`, :func:`_joint_draw_sums`)
    take it as moving no row without scanning it (for the draws' GEMMs)."""


def _sampled_draw_parts(grid: ParamGrid, th: Tensor, sg: Tensor, a: int, b: int, k_main: Tensor, xi: Tensor,
                        draws: int, policy: F.CompilePolicy | None, sample: tuple[Tensor, Tensor, float],
                        xi_on_sample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_draw_parts` (built draws) of chunk ``a:b`` on a sample of its elements
    (:func:`_draw_sample`): ``(basis [k, m], mix [D, k], groups [G, m])`` over the ``m`` sampled
    elements (the draws' kappa changes are 0 off the sample): ``mu / pi`` and
    ``sd * zeta / sqrt(pi)`` (Horvitz-Thompson: the per-record sums of ``w^2 mu`` and their
    variance over the draws, ``sum w^4 v``, are unbiased over samples); ``groups[g]`` is the
    basis' ``mu`` row on the sample's group ``g`` only, 0 elsewhere (the centre's sample noise,
    :func:`_draw_sample_noise`). Elements of the sample read the same ``xi`` columns as a
    full evaluation, so their moments are the full evaluation's (value tables: the 8 positions
    in one call, the interpolated table from ``2^15`` elements on). ``xi_on_sample``: ``xi`` is
    ``[rows, m]``, the positions of the sampled elements only (the scoring pass draws no others).
    A sample whose kappa cannot move (every sampled weight of sd 0) returns :class:`StillParts`
    (zeros, flagged). A 16-bit cast's sample mostly of sd-0 weights evaluates its other weights
    alone (:data:`DRAWS_SAMPLE_LIVE_ONLY`: the same parts)."""
    elem, grp, pi = sample
    sg_s = sg.index_select(0, elem)
    moving = sg_s.ne(0)
    if DRAWS_KEEP_STILL and not any_set(moving):
        # every sampled weight has sd 0 (the 1e7 MLP's dead units): each draw's position is
        # theta-hat itself, so every kappa change is exactly 0 (what the 8 evaluations returned)
        zero = torch.zeros((), dtype=torch.float64)  # one value expanded: no chunk-sized fill
        m = elem.numel()
        return StillParts((zero.expand(1 + (draws + 1) // 2, m), _built_mix(draws), zero.expand(DRAW_SAMPLE_GROUPS, m)))
    sub = _subset_grid(grid, a, b, elem)
    th_s, k_s = th.index_select(0, elem), k_main.index_select(0, elem)
    xi_s = xi if xi_on_sample else xi.index_select(1, elem)
    m = elem.numel()
    live = _sample_live(grid, moving)
    if live is not None:  # (the cast's sd-0 sampled weights: exact zeros, not evaluated)
        sub = _live_subset_grid(sub, live)
        th_s, sg_s, k_s, xi_s = (th_s.index_select(0, live), sg_s.index_select(0, live), k_s.index_select(0, live),
                                 xi_s.index_select(1, live))
    got = _draw_parts(sub, th_s, sg_s, 0, th_s.numel(), k_s, xi_s, draws, policy, table_at_once=True)
    if isinstance(got, StillParts):  # no sampled kappa moves (a cast's chunk under its bound): as sd 0 above
        zero = torch.zeros((), dtype=torch.float64)
        return StillParts((zero.expand(1 + (draws + 1) // 2, m), got[1], zero.expand(DRAW_SAMPLE_GROUPS, m)))
    part, mix, _ = got
    if live is not None:  # the sd-0 weights' changes: exact zeros
        part = torch.zeros(part.shape[0], m, dtype=torch.float64).index_copy_(1, live, part)
    basis = torch.cat([part[:1] / pi, part[1:] / math.sqrt(pi)])
    groups = torch.zeros(DRAW_SAMPLE_GROUPS, elem.numel(), dtype=torch.float64)
    groups[grp, torch.arange(elem.numel())] = basis[0]
    return basis, mix, groups


# The 16-bit casts' sampled draws (_sampled_draw_parts) evaluate the sample's weights of non-zero sd
# alone and write their kappa changes into a column of zeros, where at most DRAWS_SAMPLE_LIVE_MAX of
# the sample moves (p54c: the 1e7 MLP's second layer, whose sampled rows are ~90% dead units: the
# positions, the freedom test, the rule's arithmetic and the parts over ~16k columns for ~1-2k live
# ones). An sd-0 weight's every position is theta-hat itself, so its change is exactly 0 in the full
# evaluation too (the freedom test fixes it: k_main kept, 0 - 0 through the rule), and a cast's cell
# moments of an element never read the call's other elements (_elementwise_table: no interpolation
# table, no stored cells, no bounds), so the live columns are the full evaluation's bit for bit, the
# freedom test's all-or-nothing answer the same (the sd-0 ones are fixed either way); only a zero's
# sign may differ (+0 for the sd * zeta of an sd-0 weight, -0 where zeta < 0), which no sum reads.
# Other grids (float8's interpolation table, the affine kernel: their path depends on the chunk's
# size) evaluate the whole sample. False: the whole sample, as before (A/B).
DRAWS_SAMPLE_LIVE_ONLY = True
DRAWS_SAMPLE_LIVE_MAX = 0.5


def _sample_live(grid: ParamGrid, moving: Tensor) -> Tensor | None:
    """``[n]`` int64 ascending: the positions of ``moving`` (``[m]`` bool, the sampled weights of
    non-zero sd) where :data:`DRAWS_SAMPLE_LIVE_ONLY` applies (a 16-bit cast's value table,
    :func:`_elementwise_table`, with at most :data:`DRAWS_SAMPLE_LIVE_MAX` of the sample moving);
    else ``None`` (the whole sample is evaluated)."""
    if not (DRAWS_SAMPLE_LIVE_ONLY and DRAWS_KEEP_STILL and grid.storage_dtype is None and _elementwise_table(grid)):
        return None
    if int(moving.count_nonzero()) > DRAWS_SAMPLE_LIVE_MAX * moving.numel():
        return None
    return torch.nonzero(moving).squeeze(-1)


def _live_subset_grid(sub: _SubsetGrid, live: Tensor) -> _SubsetGrid:
    """The view ``sub`` (:func:`_subset_grid`) on its elements ``live`` (``[n]`` ascending), indexed
    ``0 .. n``: its per-element grid, bounds and revealed mask gathered; its kernel path the
    view's own size (only on an element-wise table, :func:`_sample_live`, where no path reads it)."""
    out = copy.copy(sub)
    scale, zp, code = sub._sel_grid
    out._sel_grid = (scale.index_select(0, live), zp.index_select(0, live),
                     None if code is None else code.index_select(0, live))
    out._sel_bounds = None if sub._sel_bounds is None else tuple(t.index_select(0, live) for t in sub._sel_bounds)
    if sub.revealed is not None:
        out.revealed = sub.revealed.index_select(0, live)
    out._chunk_elements = live.numel()
    return out


def _requantized_moments(est: Estimate, prep: _Prepared, name: str, chunk: int,
                         policy: F.CompilePolicy | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``kappa, m4, lam`` of a grid whose rounding is not nearest.

    Monte Carlo re-quantization (the real scheme, calibration included, on perturbed
    weights; quantization/requantize.py: one joint run per scheme for all its parameters,
    the same draws for every scheme) conditions on the released codes only. The release also
    holds the scales and factors; conditioning on more can only raise ``kappa = E[E[xi |
    release]^2]`` (law of total variance), and the fixed-grid moments are the ones given the
    released grid. Each element is scored with the larger of the two (conservative)."""
    from .quantization.requantize import REQUANT_DRAWS, requantize_joint

    if prep.requant is None:
        names = [k for k, g in prep.grids.items() if g.rounding != "nearest"]
        rq = prep.requant = requantize_joint(prep.scheme, prep.source,
                                             {k: est.sigma[k].to(torch.float64) for k in est.names},
                                             names=names, num_draws=REQUANT_DRAWS, seed=prep.requant_seed)
        prep.requant_moments, d_an, d_max = {}, 0.0, 0.0
        for k in names:
            mc = rq.moments[k]
            ka, m4a, lama = _grid_moments(prep.grids[k], est.theta[k], est.sigma[k], chunk, policy=policy)
            grid = ka > mc.kappa
            prep.requant_moments[k] = (torch.where(grid, ka, mc.kappa), torch.where(grid, m4a, mc.m4),
                                       torch.where(grid, lama, mc.lam))
            moved = ~never_moved(est.sigma[k].reshape(-1))  # (the never-moved count 0, as in the pass)
            d_an += float(ka.reshape(-1)[moved].sum())
            d_max += float(prep.requant_moments[k][0].reshape(-1)[moved].sum())
        prep.notes.append(
            f"rounding {prep.grids[name].rounding!r} is not nearest: {len(names)} parameter(s) scored by "
            f"Monte Carlo re-quantization ({rq.num_draws} draws of the scheme re-run, calibration "
            f"included; seed {rq.seed}, the same draws for every scheme; {rq.seconds:.3g} s), each "
            f"element at the larger of its codes-only Monte Carlo kappa and its kappa on the released "
            f"grid: d_eff {d_max:.4g} (Monte Carlo, codes only: {rq.d_eff:.4g} +- {rq.d_eff_se:.2g} "
            f"s.e., jackknife; released grid: {d_an:.4g}), held fixed in the uncertainty interval")
    return prep.requant_moments[name]


def _release_moments(prep: _Prepared, name: str) -> None:
    """Drop one parameter's moments once its sums are accumulated (large models)."""
    for store in (prep.kappa, prep.m4, prep.draws, prep.kappa_pool):
        store.pop(name, None)


def _grid_moments(grid: ParamGrid, theta: Tensor, sigma: Tensor, chunk: int, use_codes: bool = True,
                  policy: F.CompilePolicy | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``kappa, m4, lam`` of a whole parameter, computed chunk by chunk (float64 ``[numel]``)."""
    numel = theta.numel()
    kappa = torch.empty(numel, dtype=torch.float64)
    m4 = torch.empty_like(kappa)
    lam = torch.empty_like(kappa)
    for a in range(0, numel, chunk):
        b = min(a + chunk, numel)
        # float64 chunks whatever the estimate holds (float32 for large models)
        mm = grid.moments(theta[a:b].to(torch.float64), sigma[a:b].to(torch.float64), a, b, use_codes=use_codes,
                          compile_policy=policy)
        kappa[a:b], m4[a:b], lam[a:b] = mm.kappa, mm.m4, mm.mean_abs
    return kappa, m4, lam


class _InfluenceReader:
    """Per-record power sums ``sum_j w_rj^p A_jm`` of a slice of one parameter's influences:
    stored influences are sliced, a factored Linear layer's are bilinear forms of the sliced
    factors (whole output rows), so that a chunk's columns are summed as soon as they exist
    (memory bounded by the chunk). Parameters whose influences are recomputed per record
    block (no factors, not stored) are not sliceable (``streaming`` is False): the caller
    collects their columns and makes one :meth:`Estimate.power_sums` call."""

    def __init__(self, est: Estimate, name: str) -> None:
        from .estimation.linear_factors import PowerCache, factored_power_sums

        self.est, self.name, self.start = est, name, est.offsets[name][0]
        self._fps = factored_power_sums
        self.factor = None if est.influence is not None else est._factor_of(name)
        self.streaming = est.influence is not None or self.factor is not None
        # elements per output row (a factored weight is summed in whole rows)
        self.unit = int(self.factor[0].x.shape[1]) if self.factor is not None and not self.factor[1] else 1
        # the layer's input powers, shared by every chunk, scheme and draw of this parameter (pf30)
        self.cache = PowerCache()

    def gemm_row_fraction(self, a: int, b: int) -> float:
        """The fraction of elements ``a:b``'s output rows whose ``d`` is non-zero on some record
        (those reach a factored weight's power-sum GEMMs: linear_factors.SKIP_SILENT_ROWS); 1.0
        for stored influences and biases."""
        if self.factor is None or self.factor[1] or b <= a:
            return 1.0
        d = self.factor[0].d[:, a // self.unit: b // self.unit]
        return int(d.ne(0).any(0).sum()) / max(d.shape[1], 1)

    def sums(self, a: int, b: int, columns: Mapping[int, Tensor], rows: Tensor | None = None,
             row_weights: Mapping[int, tuple[Tensor, Tensor]] | None = None) -> dict[int, Tensor]:
        """``{p: [R, M]}`` over elements ``a:b`` (``rows``: only these rows of ``unit`` elements,
        relative to ``a``; the columns then hold those rows' elements only). ``row_weights``: per
        power, ``linear_factors.factored_power_sums``' row-weighted columns (``[R, M + K]``; a
        factored weight's whole rows)."""
        est, u = self.est, self.unit
        if row_weights:
            assert self.factor is not None and not self.factor[1] and rows is None
        if rows is None:
            sel: slice | Tensor = slice(a, b)
            elem = None
        else:
            elem = (a + rows.unsqueeze(-1) * u + torch.arange(u)).reshape(-1)
            sel = elem
        if est.influence is not None:
            w = est.influence[:, self.start + a: self.start + b] if elem is None else est.influence[:, self.start + elem]
            w2 = w.to(torch.float64).square()
            return {p: (w2 if p == 2 else w2.square()) @ c for p, c in columns.items()}
        assert self.factor is not None and est._g_mean is not None and est._v_diag is not None
        fac, bias = self.factor
        gm, vd = est._centring(self.name, sel)
        out_rows = slice(a // u, b // u) if rows is None else a // u + rows
        part = dataclasses.replace(fac, d=fac.d[:, out_rows])
        held = _held_setup(self, a, b) if rows is None else None
        self.cache.hold_setup(None if held is None else held[1])
        try:
            return {p: self._fps(part, gm, vd, c, p, bias=bias, cache=self.cache,
                                 row_weights=None if row_weights is None else row_weights.get(p))
                    for p, c in columns.items()}
        finally:
            self.cache.hold_setup(None)
            if held is not None:
                _keep_setup(self, a, b, *held)


# A factored weight's chunk setup of the power sums (linear_factors.PowerCache.chunk_setup: the live
# mask, gb^2 / V, the silent and dead rows, the layer's scales, the rows the GEMMs read and their
# scaled d and gb) depends on the estimate alone, yet every scoring call computed it again for
# each chunk (p51b: ~0.1 s of a loaded 1e7 steady call's ~0.65 s of power-2 sums, most of it the
# second layer's 32 chunks whose GEMMs read 3-11 of 128 rows). With the switch the first call on
# an estimate leaves each chunk's setup in it (Estimate._chunk_setups, keyed as
# UNIT_SUMS_ONCE's entries: the same tensors at the same versions, records, scale and power-sum
# settings) and later calls read it: the same values, so bitwise the same sums. Not held: the
# chunk-sized entries a call recomputes in one pass from what it reads anyway (gb^2, the clamped
# variances, the scaled d and gb in float64: their float32 copies are held; gb^2 / V, see
# SETUP_QUOTIENT_PER_CALL); the rest is ~4 bytes a weight at 1e7 (the live mask, the first layer's
# scaled gb and d in float32: ~35 MiB; ~118 MiB with gb^2 / V held), at most HELD_SETUP_BYTES in all
# (then the further chunks compute theirs per call, as before). False: every call computes its own (A/B).
HOLD_CHUNK_SETUP = True
HELD_SETUP_BYTES = 1 << 28
# the memo's entries not held across calls (chunk-sized, one pass to recompute)
_UNHELD_SETUP = ("g2", "vclamp", "gs", "ds")
# The power-2 a = 0 coefficients gb^2 / V (linear_factors._zeroth_raw's "c0 raw 2", float64, 8 bytes a
# weight: ~80 of the ~115 MiB held at 1e7) recomputed by each call (two passes over the chunk: gb^2 and
# the quotient) instead of held (p55a): held, each chunk's quotient was a new allocation that the next
# chunk could not reuse, ~20k fresh pages (4 KiB) of a first call at 1e7, and 80 MiB more held between
# calls. The same operations on the same tensors: bitwise the same sums. False: held, as before (A/B).
SETUP_QUOTIENT_PER_CALL = True


def _held_setup(reader: _InfluenceReader, a: int, b: int) -> tuple[tuple, dict[Any, Any]] | None:
    """``(key, memo)``: the setup of chunk ``a:b`` of ``reader``'s factored weight held in the
    estimate (:data:`HOLD_CHUNK_SETUP`; empty where none is held yet or the held one was computed
    from other inputs), or ``None`` where no setup is held (the switch off, stored influences, a
    bias, inputs that cannot be keyed)."""
    if not HOLD_CHUNK_SETUP or reader.factor is None or reader.factor[1]:
        return None
    store = getattr(reader.est, "_chunk_setups", None)
    inputs = _unit_sums_inputs(reader) if isinstance(store, dict) else None
    if inputs is None or store is None:
        return None
    entry = store.get((reader.name, a, b))
    if entry is not None and _qbase._key_matches(entry[0], *inputs):
        return entry[0], entry[1]
    return _qbase._fact_key(*inputs), {}


def _keep_setup(reader: _InfluenceReader, a: int, b: int, key: tuple, memo: dict[Any, Any]) -> None:
    """Hold ``memo`` (less :data:`_UNHELD_SETUP`) in the estimate for chunk ``a:b`` while the
    setups held stay within :data:`HELD_SETUP_BYTES`."""
    store = reader.est._chunk_setups
    for k in _UNHELD_SETUP + (("c0 raw 2",) if SETUP_QUOTIENT_PER_CALL else ()):
        memo.pop(k, None)
    old = store.get((reader.name, a, b))
    size = _setup_bytes(memo)  # (a setup read back may have grown: the other power's entries)
    held = store.get("bytes", 0) - (0 if old is None else old[2])
    if held + size > HELD_SETUP_BYTES:
        if old is not None:
            del store[(reader.name, a, b)]
            store["bytes"] = held
        return
    store[(reader.name, a, b)] = (key, memo, size)
    store["bytes"] = held + size


def _setup_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_setup_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_setup_bytes(v) for v in value.values())
    return 0


# Streamed schemes' fourth-power sums replaced by the baseline's bound where it suffices
# (method.md section 3, "Gaussian form's diagnostics"); False: always summed (A/B benchmarks).
BOUND_FOURTH_POWER_SUMS = True
# The bounded schemes' fourth-power columns ([c, 2] float64 per chunk) are kept from the joint
# pass when all of them (16 bytes per quantized weight and scheme) fit in this many bytes, so that
# a scheme whose bound does not settle the Gaussian form's diagnostics (small models: every scheme
# of the 1e5 benchmark MLP) sums them without computing its cell moments at theta-hat a second
# time (1e5: 1.67 -> 1.35 s a call). All or none: larger models, whose bounds usually hold (1e6),
# do not hold tens of MB they would not read; they recompute where a bound fails.
FOURTH_KEEP_BYTES = 1 << 25
# Where the scheme-free bounds do not settle the Gaussian form's diagnostics, the sharper bounds
# of each layer's largest |m4 - 3 kappa^2| and kappa^2 (read off the columns kept for them,
# FOURTH_KEEP_BYTES: small models) decide before the exact sums are computed (fx36: at 1e5 weights the
# scheme-free bound read 0.01025 against the tolerance 0.01 for every scheme, and the exact pass
# was ~15% of a call; method.md section 3, "Gaussian form's diagnostics"). False: the scheme-free
# bounds, then the exact sums, as before (tests, A/B).
SHARP_FOURTH_BOUND = True


# _fourth_peaks reads the two fourth-power columns from the contiguous tensors they were stacked
# from, ``max |x|`` as ``max(|min x|, |max x|)`` of one ``aminmax`` pass (p50e: the stacked [c, 2]
# columns' strided ``abs`` + ``max`` cost ~0.6 ms per 65,536-weight chunk and scheme, ~3-4 ms of a
# 1e5 call; the same floats: both forms are exact). False: the stacked columns, as before (A/B).
FOURTH_PEAKS_FROM_PARTS = True


def _fourth_peaks(peaks: list[float], cols: Tensor, parts: tuple[Tensor, Tensor] | None = None) -> list[float]:
    """``peaks`` (``[max |m4 - 3 kappa^2|, max kappa^2]`` so far) updated with a chunk's ``[c, 2]``
    fourth-power columns ``(m4 - 3 kappa^2, kappa^2)`` (kept from the pass; ``c >= 1``), or with
    ``parts``, the same two columns as the ``[c]`` tensors they were stacked from
    (:data:`FOURTH_PEAKS_FROM_PARTS`: the same floats). A NaN anywhere in a column makes its peak
    infinite (no bound: the exact sums decide)."""
    if FOURTH_PEAKS_FROM_PARTS and parts is not None:
        lo, hi = torch.aminmax(parts[0])  # (NaN anywhere: both NaN)
        vals = (max(abs(float(lo)), abs(float(hi))), float(parts[1].max()))
    else:
        vals = (float(cols[:, 0].abs().max()), float(cols[:, 1].max()))
    out = []
    for cur, v in zip(peaks, vals):
        out.append(math.inf if math.isnan(v) else max(cur, v))
    return out


def _moments_state(policy: F.CompilePolicy | None, elements: int = 0) -> tuple:
    """What a grid's cell moments at given inputs depend on that can change within a process:
    the float8 interpolation octaves built so far, the paths the self-checks disabled, failed
    compilations and whether the compile policy runs the compiled kernels after ``elements``
    more elements (a kernel call counts its own elements before it decides). Moments computed
    under equal states are bitwise equal (the same paths on the same inputs)."""
    octaves = sum(int(t.built.sum()) for t in _INTERP_TABLES.values() if t is not None)
    fused = _FUSED_STATE
    return (octaves, tuple(sorted(F.fastpath.GUARD.disabled)), bool(fused["failed"]),
            bool(_SPLIT_STATE["failed"]), (policy or F.CompilePolicy()).wants(int(fused["elements"]) + elements))


def _joint_sums(est: Estimate, prepared: list[_Prepared], chunk: int, seed: int,
                keep_moments: bool, strict: bool = True,
                policy: F.CompilePolicy | None = None,
                stored: dict[str, tuple[F.CltSums, Tensor | None, Tensor | None, F.CltSums]] | None = None
                ) -> dict[str, list[F.CltSums]]:
    """Per parameter: ``[baseline, scheme_0 main, scheme_0 draws..., scheme_0 pool, scheme_1 main, ...]``
    sums, in one streaming pass over the weights for every scheme and bootstrap draw.

    Per chunk of a parameter (whole output rows of a factored Linear weight): one ``randn`` of
    the bootstrap positions ``xi [D, c]`` shared by every scheme (common random numbers), each
    scheme's cell moments at theta-hat, in the pool protocol and at the draws (only the
    elements whose kappa can move: :func:`_draw_moments`), then the chunk's power sums: the
    main and pool columns, and the draws as differences from the main kappa on the rows where
    some draw moved (usually few). Memory: the chunk's columns plus ``[R, columns]`` sums; the
    moments of whole parameters are kept only when ``keep_moments`` (the Monte Carlo form,
    small models) or the influences must be recomputed (no factors, not stored: one
    :meth:`Estimate.power_sums` call per parameter, as before).

    The baseline column of a parameter stored in bf16 / fp16 (``prepared[0].storage``) reads its
    storage grid (the unquantized release ``rnd_D(theta-hat)``, method.md section 5) instead of
    ``kappa = 1``; ``stored`` (when given) receives, per such parameter, the baseline's pool
    protocol sums (cells at ``sigma / sqrt(2)``), when the moments are kept its kappa at
    theta-hat and in the pool protocol (``[numel]``, else ``None``), and the sums at ``kappa = 1``
    (the continuous estimate: the spread term's reference). Float32 parameters: ``kappa = 1``, as before.
    """
    R = est.num_records
    out: dict[str, list[F.CltSums]] = {}
    storage = prepared[0].storage if prepared else {}
    keep_fourth = 16 * sum(g.numel for p in prepared for g in p.grids.values()) <= FOURTH_KEEP_BYTES
    for pi, name in enumerate(est.names):
        numel = est.theta[name].numel()
        th, sg = est.theta[name], est.sigma[name]
        # the weights no record moves count 0 in d_eff and as pinned whatever kappa their cell gives
        # them (a revealed absmax has kappa 1, one on a cell edge 2/pi: de49), as in float layers
        # (the min first: the mask's nonzero costs ~23 ms at 1e7 weights, the min ~5 ms, one thread)
        # (the min first, ~5 ms at 1e7 weights: most models have none)
        has_still = bool(sg.numel()) and bool(never_moved(sg.min()))
        reader = _InfluenceReader(est, name)
        step = max(1, chunk // reader.unit) * reader.unit
        active = [p for p in prepared if name in p.grids]
        D = max((p.num_draws for p in active), default=0)
        gen = torch.Generator().manual_seed(seed + 7919 * (pi + 1))  # xi: the same for every scheme
        keep = keep_moments or not reader.streaming or est.d == 1
        # the rows whose draws are evaluated (subsampled draws): their own stream, the same for every scheme
        sgen = torch.Generator().manual_seed(seed + 7919 * (pi + 1) + 1)
        for prep in active:
            if prep.failed is None and prep.grids[name].rounding != "nearest":
                try:
                    if prep.requant is None:
                        _requantized_moments(est, prep, name, chunk, policy)
                except Exception as exc:
                    if strict:
                        raise
                    prep.failed = f"{type(exc).__name__} in the cell moments of {name!r}: {exc}"
            if keep:
                prep.kappa[name] = torch.ones(numel, dtype=torch.float64)
                prep.m4[name] = torch.full((numel,), 3.0, dtype=torch.float64)
                prep.kappa_pool[name] = torch.ones(numel, dtype=torch.float64)
                prep.draws[name] = [torch.ones(numel, dtype=torch.float64) for _ in range(prep.num_draws)]
                if est.d == 1:
                    prep.lam[name] = torch.full((numel,), F.cells.SQRT_2_OVER_PI, dtype=torch.float64)
                    prep.lam_pool[name] = prep.lam[name].clone()
                    prep.lam_draws[name] = [prep.lam[name].clone() for _ in range(prep.num_draws)]
        nm = 1 + len(active)
        sgrid = storage.get(name)
        extra = 2 * int(sgrid is not None)  # the baseline's pool and kappa = 1 columns (stored weights)
        base_k = base_kp = None
        if sgrid is not None and keep:
            base_k, base_kp = torch.empty(numel, dtype=torch.float64), torch.empty(numel, dtype=torch.float64)
        # base, main per scheme, pool per scheme (, the baseline's pool, kappa = 1)
        s2 = torch.zeros(R, 2 * nm - 1 + extra, dtype=torch.float64)
        # (m4 - 3 k^2) then k^2 of the main columns (, B = sum_j w^4: stored weights)
        s4 = torch.zeros(R, 2 * nm + int(sgrid is not None), dtype=torch.float64)
        # Streamed influences: a scheme's fourth-power sums only feed the Gaussian form's
        # diagnostics, which the baseline's sum_j w^4 bounds (method.md section 3, "Gaussian
        # form's diagnostics"); _finish_scheme sums them exactly only where the bound fails.
        bounded = [BOUND_FOURTH_POWER_SUMS and not keep and p.grids[name].rounding == "nearest" for p in active]
        exact4 = [0] + [1 + j for j, bd in enumerate(bounded) if not bd]  # columns of K with exact sums
        # Stored weights: the baseline's k^2 column is sum_j w^4 kappa_storage^2, not B (bb36: with sd
        # below an ulp and skewed cell splits m4 - 3 kappa^2 of a scheme can exceed 3 kappa_storage^2
        # by orders of magnitude), so B is summed as a column of its own.
        cols4 = exact4 + [nm + i for i in exact4] + ([2 * nm] if sgrid is not None else [])
        keep4 = [keep_fourth and bd for bd in bounded]  # their columns kept for _exact_fourth_sums
        # the largest |m4 - 3 kappa^2| and kappa^2 over the parameter of the schemes whose columns
        # are kept (small models), times B = sum_j w^4: the sharper bounds, read off the kept
        # columns (no pass of their own over a large model's moments, whose scheme-free bounds usually hold)
        sharp = [SHARP_FOURTH_BOUND and kp for kp in keep4]
        lead = _equal_grid_leads(active, name)
        # the main call reads kappa alone where no scheme sharing its moments (equal grids) reads
        # m4 (exact or kept fourth-power columns) or mean_abs (kept moments, one coordinate)
        reads_all = [keep or est.d == 1 or not bd or kp for bd, kp in zip(bounded, keep4)]
        main_kappa_only = [MAIN_KAPPA_ONLY and not any(reads_all[i] for i in range(len(active)) if lead[i] == lead[j])
                           for j in range(len(active))]
        peaks = [[0.0, 0.0] for _ in active]
        for j in range(len(active)):
            if keep4[j]:
                active[j].fourth_kept[name] = []
        dd = [torch.zeros(R, p.num_draws, dtype=torch.float64) for p in active]  # draws minus main
        cg = [torch.zeros(R, DRAW_SAMPLE_GROUPS, dtype=torch.float64) for _ in active]  # sampled centre by group
        sampled = [False] * len(active)
        ksum = [0.0] * len(active)
        held: list[tuple[dict[int, Tensor], list[Tensor]]] = []
        frz = [0] * len(active)
        for a in range(0, numel, step):
            b = min(a + step, numel)
            c = b - a
            th_c, sg_c = th[a:b].to(torch.float64), sg[a:b].to(torch.float64)  # float32-held estimates
            # the chunk's never-moved weights (a mask), or None; as float64 for one dot product per
            # kappa column (a gather of them per scheme and chunk cost +0.4 s a 1e7 call whose second
            # layer is 94% sd 0: lead49)
            still_c = never_moved(sg_c) if has_still else None
            still_f = None
            still_sums: dict[int, tuple[float, int]] = {}  # per kappa column (equal grids share one)
            frz_with_still: set[int] = set()  # kappa columns whose frozen count waits for the never-moved one
            frz_thr: Tensor | None = None  # FROZEN_KAPPA, NaN on the never-moved weights (FROZEN_COUNTS_FUSED)
            # the pool protocol's sd, one tensor for every grid (their calls share its sd-0 facts, ws37)
            sg_pool = sg_c / POOL_SIGMA_RATIO
            # per scheme: (basis, mix, groups); subsampled: over the sample's elements only
            deltas: list[tuple[Tensor, Tensor, Tensor | None] | None] = []
            sample = None
            if D >= BUILT_DRAWS_MIN and not keep and c >= DRAW_SAMPLE_MIN_WEIGHTS \
                    and c // reader.unit >= DRAW_SAMPLE_MIN_ROWS:
                sample = _draw_sample(c, reader.unit, sgen)
            xi = xi_on_sample = None
            if D and sample is not None and all(not p.num_draws or p.num_draws >= BUILT_DRAWS_MIN
                                                or p.grids[name].rounding != "nearest" for p in active):
                # Every draw reads its positions on the sample only: draw them there (common random
                # numbers: the sample's columns, the same for every scheme), not on the whole chunk
                # (a sixteenth of the normals; randn was ~7% of a first call at 1e7, pf29).
                xi_on_sample = _draw_normals(_draw_noise_rows(D, est.d == 1), sample[0].numel(), gen)
            elif D:
                xi = _draw_normals(_draw_noise_rows(D, est.d == 1), c, gen)
            ones = torch.ones(c, dtype=torch.float64)
            K, P, M4 = [ones], [], [torch.full((c,), 3.0, dtype=torch.float64)]
            P0: list[Tensor] = []
            if sgrid is not None:  # the unquantized release of stored weights: the storage grid
                mm0 = sgrid.moments(th_c, sg_c, a, b, compile_policy=policy)
                K[0], M4[0] = mm0.kappa, mm0.m4
                P0.append(sgrid.moments(th_c, sg_pool, a, b, compile_policy=policy,
                                        kappa_only=est.d != 1).kappa)
                P0.append(ones)  # the continuous estimate's sums: the spread term's reference
                if base_k is not None and base_kp is not None:
                    base_k[a:b], base_kp[a:b] = K[0], P0[0]
            # per scheme: (k, m4, pool k, draws' parts, chunk sums) of schemes that computed this chunk
            done: dict[int, tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor | None] | None, float, int]] = {}
            # the unit-kappa chunks (UNIT_KAPPA): one coordinate's mean_abs unread, the baseline's
            # kappa = 1 (no storage grid); sd-0 weights (at most float64's tiny, as the paths floor
            # sd) are point masses (kappa 0) or revealed (1) in every unit column, else evaluated
            unit_ok = UNIT_KAPPA and _qbase.WIDE_SD_CLOSED_FORM and est.d != 1 and sgrid is None and c > 0
            unit_facts: tuple[float, float] | None = None
            unit_zero = False  # (some sd-0 element in the chunk)
            unit_cols: list[tuple[Tensor, Tensor, Tensor]] = []  # (point masses, kappa, m4) columns
            # the exact unit-kappa chunks (UNIT_KAPPA_EXACT): per scheme (deficit column, its key,
            # row weights at theta-hat and in the pool protocol); the chunk's deficit columns so far
            exact_ok = (UNIT_KAPPA_EXACT and unit_ok and not keep and SHARE_EQUAL_COLUMNS
                        and reader.factor is not None and not reader.factor[1])
            exact: dict[int, tuple[Tensor, Any, Tensor, Tensor]] = {}
            exact_cols: _DeficitColumns | None = None
            unit_sums: dict[int, tuple[float, int]] = {}  # id(unit column) -> (its sum, its count below FROZEN_KAPPA)
            # (CAST_LIVE_ONLY: the chunk's live weights, once a chunk: False until asked)
            cast_live: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None | bool = False
            inert: list[bool] = []  # (INERT_CHECK_ONCE: the chunk's _zero_sd_inert, once asked)
            state: dict[int, tuple] = {}  # per scheme kept (keep4): the moments state right after its main moments
            for j, prep in enumerate(active):
                k_c = m4_c = kp_c = None
                delta = None
                shared = done.get(lead[j]) if prep.failed is None else None
                if shared is not None:  # an equal grid (same_cells) computed it: bitwise the same
                    k_c, m4_c, kp_c, delta, k_sum, k_frz = shared
                    if lead[j] in exact:
                        exact[j] = exact[lead[j]]
                    if keep:
                        _keep_chunk(est, prep, active[lead[j]], name, a, b)
                elif prep.failed is None:
                    try:
                        g = prep.grids[name]
                        unit, ucols = False, None
                        if g.rounding != "nearest":
                            k_f, m4_f, lam_f = prep.requant_moments[name]
                            k_c, m4_c, lam_c = k_f[a:b], m4_f[a:b], lam_f[a:b]
                        elif unit_ok and not keep4[j]:
                            if unit_facts is None:  # (once per chunk: the least live pool sd, the largest |theta|)
                                least_sd, big_th, all_live, any_live = _unit_chunk_facts(th[a:b], sg[a:b], th_c,
                                                                                         sg_c, sg_pool)
                                unit_facts = (least_sd, big_th)
                                unit_zero = not all_live
                                if unit_zero and not keep and _zero_sd_inert_once(inert, reader, sg[a:b], a, b,
                                                                                  still_c):
                                    # (their kappa reaches no sum: the columns of ones; kept moments,
                                    # read per weight by the Monte Carlo form, as before)
                                    unit_zero = False
                                if exact_ok and any_live:
                                    # theta-hat's least live sd, from below (a smaller sd only makes
                                    # lam smaller and err larger: the conservative side)
                                    exact_cols = _DeficitColumns(sg_c, unit_facts[0] * POOL_SIGMA_RATIO * (1.0 - 1e-12))
                            # the tolerance first (no column of its own), then the exact deficits
                            unit = g.chunk_deficit_bound(a, b, *unit_facts) <= UNIT_KAPPA_TOL
                            wide = None
                            if not unit and exact_cols is not None and bounded[j] and unit_facts[0] > 0.0:
                                wide = g.chunk_wide_deficit(a, b, (exact_cols.sd_main, unit_facts[0]), unit_facts[1])
                                if wide is not None and not (wide[2][1] <= UNIT_KAPPA_TOL and (
                                        not prep.num_draws or wide[3][0] <= POSITION_FREE_WIDE_TOL)):
                                    wide = None
                            unit = unit or wide is not None
                            if unit:
                                ucols = _unit_columns(g, th_c, sg_c, a, b, unit_cols) if unit_zero \
                                    else (ones, M4[0])
                                unit = ucols is not None
                            if unit and wide is not None:
                                assert exact_cols is not None
                                exact[j] = exact_cols.of(g, a, b, wide)
                        if unit:  # kappa = 1, m4 = 3 within UNIT_KAPPA_TOL, point masses 0
                            assert ucols is not None
                            k_c, m4_c = ucols
                            lam_c, kp_c = None, k_c
                        elif main_kappa_only[j] and est.d != 1 and sgrid is None and not keep \
                                and still_c is not None and _cast_live_applies(g) and (
                                    cast_live is not False or (cast_live := _cast_live_facts(
                                        reader, sg[a:b], a, b, still_c, th_c, sg_c, sg_pool, inert)) is not None) \
                                and cast_live is not None:
                            # a cast on a chunk whose sd-0 weights are inert: its live weights alone
                            live_c, th_l, sg_l, sgp_l, ones_l = cast_live
                            k_c = _cast_live_kappa(g, th_l, sg_l, ones_l, live_c, c, policy)
                            kp_c = _cast_live_kappa(g, th_l, sgp_l, ones_l, live_c, c, policy)
                            m4_c = lam_c = _NAN64.expand(c)  # (kappa-only: unread, as the kappa-only stand-ins)
                        else:
                            if g.rounding == "nearest":
                                mm = g.moments(th_c, sg_c, a, b, compile_policy=policy,
                                               kappa_only=main_kappa_only[j])
                                k_c, m4_c, lam_c = mm.kappa, mm.m4, mm.mean_abs  # (m4, lam unread if kappa_only)
                                if keep4[j]:
                                    state[j] = _moments_state(policy)
                            # the pool protocol reads kappa alone (and lam for one coordinate)
                            pm = g.moments(th_c, sg_pool, a, b, compile_policy=policy,
                                           kappa_only=est.d != 1)
                            kp_c = pm.kappa
                        if prep.num_draws:
                            rows = _draw_noise_rows(prep.num_draws, est.d == 1)
                            x = xi_on_sample[:rows] if xi is None else xi[:rows]
                            if g.rounding != "nearest":  # the Monte Carlo moments are held in every draw
                                kd, ld = k_c.expand(prep.num_draws, c), lam_c.expand(prep.num_draws, c)
                            elif unit and (UNIT_KAPPA_DRAWS or j in exact):  # the bound holds at every position: no move
                                kd = k_c.expand(prep.num_draws, c)
                            elif sample is not None and prep.num_draws >= BUILT_DRAWS_MIN:
                                basis, mix, grp = _sampled_draw_parts(g, th_c, sg_c, a, b, k_c, x, prep.num_draws,
                                                                      policy, sample, xi_on_sample=xi is None)
                                delta = (basis, mix, grp)
                            else:
                                basis, mix, ld = _draw_parts(g, th_c, sg_c, a, b, k_c, x, prep.num_draws, policy,
                                                             with_lam=est.d == 1)
                                delta = (basis, mix, None)
                                kd = k_c + mix @ basis if keep else None
                            if keep:
                                for bi in range(prep.num_draws):
                                    prep.draws[name][bi][a:b] = kd[bi]
                                    if est.d == 1:
                                        prep.lam_draws[name][bi][a:b] = ld[bi]
                        if keep:
                            prep.kappa[name][a:b], prep.m4[name][a:b] = k_c, m4_c
                            prep.kappa_pool[name][a:b] = kp_c
                            if est.d == 1:
                                prep.lam[name][a:b], prep.lam_pool[name][a:b] = lam_c, pm.mean_abs
                        if unit:  # (a unit column is shared by tensor: its sums once per chunk, the same values)
                            key_k = id(k_c)
                            if key_k not in unit_sums:
                                u_sum = float(k_c.sum())
                                unit_sums[key_k] = (u_sum, c - int(u_sum) if FROZEN_COUNTS_FUSED
                                                    else int((k_c < FROZEN_KAPPA).sum()))
                            k_sum, k_frz = unit_sums[key_k]
                        elif FROZEN_COUNTS_FUSED:
                            k_sum = float(k_c.sum())
                            if still_c is not None and not math.isnan(k_sum):
                                k_frz = 0  # (both counts at once with the never-moved ones, below)
                                frz_with_still.add(id(k_c))
                            else:
                                k_frz = count_set(k_c < FROZEN_KAPPA)
                        else:
                            k_sum, k_frz = float(k_c.sum()), int((k_c < FROZEN_KAPPA).sum())
                        if j in exact:  # sum_j kappa: the unit column's less the deficit's
                            k_sum -= exact_cols.deficit_sum(exact[j]) if exact_cols is not None else 0.0
                        done[j] = (k_c, m4_c, kp_c, delta, k_sum, k_frz)
                    except Exception as exc:
                        if strict:
                            raise
                        # Keep the column layout (kappa = 1); the scheme is reported as failed.
                        prep.failed = f"{type(exc).__name__} in the cell moments of {name!r}: {exc}"
                        exact.pop(j, None)
                if prep.failed is not None:
                    k_c, m4_c, kp_c, delta = ones, M4[0] if sgrid is None else torch.full((c,), 3.0, dtype=torch.float64), ones, None
                    k_sum, k_frz = float(k_c.sum()), int((k_c < FROZEN_KAPPA).sum())
                assert k_c is not None and m4_c is not None and kp_c is not None
                cols_kept = parts4 = None
                if keep4[j]:  # the columns _exact_fourth_sums would recompute (the same operations)
                    st = state.get(j if shared is None else lead[j]) if prep.failed is None else None
                    if st is not None:
                        state[j] = st
                        k2 = k_c.square()
                        parts4 = (m4_c - 3.0 * k2, k2)
                        cols_kept = torch.stack(parts4, 1)
                        prep.fourth_kept[name].append((st, cols_kept))
                    else:
                        prep.fourth_kept[name].append(None)
                if sharp[j] and c:
                    # (not kept: a failed scheme, or a grid recomputed apart: no sharper bound)
                    peaks[j] = [math.inf, math.inf] if cols_kept is None else _fourth_peaks(peaks[j], cols_kept, parts4)
                K.append(k_c)
                M4.append(m4_c)
                P.append(kp_c)
                deltas.append(delta)
                if still_c is not None:  # never moved: 0 in d_eff, pinned, whatever their kappa
                    # (their kappa sum by one dot product, the count where it is not 0: no gather of
                    # the never-moved weights, ~94% of the 1e7 MLP's second layer, where a revealed
                    # absmax among them is in nearly every chunk)
                    if id(k_c) not in still_sums:
                        if still_f is None or still_f.dtype != k_c.dtype:
                            still_f = still_c.to(k_c.dtype)
                        s_k = float(torch.dot(k_c, still_f))
                        if STILL_UNIT_COUNT and id(k_c) in unit_sums:  # (0 or 1: the dot counts them, exactly)
                            n_k = int(s_k)
                        elif id(k_c) in frz_with_still:  # below FROZEN_KAPPA, or never moved and at or above it
                            n_k, frz_thr = _frozen_with_still(k_c, still_c, s_k, frz_thr)
                        else:
                            n_k = int(torch.count_nonzero(k_c.ge(FROZEN_KAPPA).logical_and_(still_c))) if s_k > 0 else 0
                        still_sums[id(k_c)] = (s_k, n_k)
                    s_k, n_k = still_sums[id(k_c)]
                    k_sum -= s_k
                    k_frz += n_k
                ksum[j] += k_sum
                frz[j] += k_frz
            if reader.streaming and SHARE_EQUAL_COLUMNS:
                # equal grids' columns (the same tensors) and zero columns summed once, the
                # distinct ones stacked alone (no [c, all columns] matrix to gather from; pf30)
                # kappa = 1 with m4 = 3 (the baseline's own columns, and the unit chunks' that share
                # them): k^2 is that column itself and m4 - 3 k^2 zero, known without a pass
                unit_pair = [sgrid is None and K[i] is ones and M4[i] is M4[0] for i in exact4]
                k2 = {i: K[i] if up else K[i].square() for i, up in zip(exact4, unit_pair)}
                lists = {2: [*K, *P, *P0], 4: [ones if up else M4[i] - 3.0 * k2[i] for i, up in zip(exact4, unit_pair)]
                         + [k2[i] for i in exact4]}
                keys = {2: [id(t) for t in (*K, *P, *P0)],
                        4: [_ZERO_COLUMN if up else (id(M4[i]), id(K[i])) for i, up in zip(exact4, unit_pair)]
                        + [id(K[i]) for i in exact4]}
                if sgrid is not None:
                    lists[4].append(ones)
                    keys[4].append("B")
                # the exact unit chunks' deficits: subtracted from their main (1 + j) and pool (nm + j) columns
                deficits = [(col, key, u, w) for j, (u, key, w_main, w_pool) in exact.items()
                            for col, w in ((1 + j, w_main), (nm + j, w_pool))]
                ps = _distinct_list_sums(reader, a, b, lists, keys, deficits, unit=ones)
            else:
                Km = torch.stack(K, 1)
                K4 = Km[:, exact4] if len(exact4) < nm else Km
                M4m = torch.stack([M4[i] for i in exact4], 1)
                cols = {2: torch.cat([Km, torch.stack(P + P0, 1)], 1) if P or P0 else Km,
                        4: torch.cat([M4m - 3.0 * K4.square(), K4.square()] + ([ones[:, None]] if sgrid is not None else []), 1)}
                if not reader.streaming:  # influences recomputed per record block: one call at the end
                    held.append((cols, [torch.zeros(c, p.num_draws, dtype=torch.float64) if dl is None
                                        else (dl[1] @ dl[0]).T for p, dl in zip(active, deltas)]))
                    continue
                ps = reader.sums(a, b, cols)
            s2 += ps[2]
            s4[:, cols4] += ps[4]
            # id(parts) -> its sums (equal grids share the parts); every scheme's in one call
            summed: dict[int, Tensor | None] = _joint_draw_sums(reader, a, b, deltas, sample) if JOINT_DRAW_SUMS else {}
            for j, parts in enumerate(deltas):
                if parts is None:
                    continue
                basis, mix, grp = parts  # the draws' kappa changes are mix @ basis: sum the basis rows
                k_ = basis.shape[0]
                if id(parts) not in summed:
                    summed[id(parts)] = _draw_sums(reader, a, b, parts, sample)
                ps_d = summed[id(parts)]
                if ps_d is None:  # no row moved
                    continue
                if grp is not None:
                    sampled[j] = True
                dd[j] += ps_d[:, :k_] @ mix.T
                if grp is not None:
                    cg[j] += ps_d[:, k_:]
        if held:
            widths = [p.num_draws for p in active]
            ps = est.power_sums(name, {2: torch.cat([torch.cat([h[0][2], *h[1]], 1) for h in held], 0),
                                       4: torch.cat([h[0][4] for h in held], 0)})
            s2 = ps[2][:, : 2 * nm - 1 + extra]
            s4 = ps[4]
            o = 2 * nm - 1 + extra
            for j, w_ in enumerate(widths):
                dd[j] = ps[2][:, o: o + w_]
                o += w_
            held.clear()
        # the columns in the layout the callers read
        base = F.CltSums(s2[:, 0].clone(), s4[:, 0].clone(), s4[:, nm].clone())
        res = [base]
        B = s4[:, nm] if sgrid is None else s4[:, 2 * nm]  # sum_j w^4 (kappa = 1 in the baseline's column)
        if sgrid is not None and stored is not None:
            zero = torch.zeros(R, dtype=torch.float64)
            stored[name] = (F.CltSums(s2[:, 2 * nm - 1].clone(), zero), base_k, base_kp,
                            F.CltSums(s2[:, 2 * nm].clone(), zero.clone()))
        for prep in prepared:
            if prep not in active:
                res.append(F.CltSums(base.s2.clone(), base.s4.clone(), base.s22.clone()))
                copies = base.s2.expand(prep.num_draws + 1, R).clone()  # one copy per column, at once
                zeros = torch.zeros(prep.num_draws + 1, R, dtype=torch.float64)
                res.extend(F.CltSums(c2, z) for c2, z in zip(copies.unbind(), zeros.unbind()))
                continue
            j = active.index(prep)
            main2 = s2[:, 1 + j]
            if bounded[j]:  # |s4| <= 3 B and s22 <= B, B = sum_j w^4 (method.md section 3)
                res.append(F.CltSums(main2.clone(), 3.0 * B, B.clone(), bound=True))
                if sharp[j]:
                    prep.sharp_fourth[name] = F.CltSums(res[-1].s2, peaks[j][0] * B, peaks[j][1] * B, bound=True)
            else:
                res.append(F.CltSums(main2.clone(), s4[:, 1 + j].clone(), s4[:, nm + 1 + j].clone()))
            # the draws' s2 main2 + dd[j][:, b] as the rows of one [D, R] sum (the same additions; py37)
            drawn = torch.add(dd[j].T, main2).contiguous()
            dzero = torch.zeros(prep.num_draws, R, dtype=torch.float64)
            res.extend(F.CltSums(d2, z) for d2, z in zip(drawn.unbind(), dzero.unbind()))
            res.append(F.CltSums(s2[:, nm + j].clone(), torch.zeros(R, dtype=torch.float64)))
            if sampled[j]:
                prep.draw_groups[name] = cg[j]
            prep.d_eff += ksum[j]
            prep.frozen += frz[j]
            prep.layers[name].d_eff = ksum[j]
            prep.layers[name].pinned_fraction = frz[j] / max(numel, 1)
        out[name] = res
        if keep_moments is False:
            for prep in prepared:
                _release_moments(prep, name)
    return out


def _draw_sums(reader: _InfluenceReader, a: int, b: int, parts: tuple[Tensor, Tensor, Tensor | None],
               sample: tuple[Tensor, Tensor, float] | None) -> Tensor | None:
    """``[R, k (+ DRAW_SAMPLE_GROUPS)]`` per-record sums ``sum_j w_rj^2 basis_kj`` of one scheme's
    draws' parts over chunk ``a:b`` (then its sampled centre's groups, when subsampled), on the
    rows where some basis row is non-zero; ``None`` when none is. (Summing each group over its
    own rows, instead of ``G`` columns that are zero off their group, measured no faster: 0.13
    -> 0.15 s at 1e5 weights, 1.3 -> 1.15 s at 1e6, the smaller products' overhead.)"""
    if isinstance(parts, StillParts):  # no row moved (the flag: no scan)
        return None
    basis, _, grp = parts
    k_ = basis.shape[0]
    moved = any_along(any_along((basis != 0).reshape(k_, -1, reader.unit), -1), 0)  # rows (of the sample)
    if not any_set(moved):
        return None
    if grp is not None:  # subsampled: whole sampled rows; the centre's groups summed with the basis
        assert sample is not None
        rows = sample[0][:: reader.unit].div(reader.unit, rounding_mode="floor")[moved]
        basis = torch.cat([basis, grp])
        kk = basis.shape[0]
        dsub = basis.reshape(kk, -1, reader.unit)[:, moved].reshape(kk, -1)
    else:
        rows = torch.nonzero(moved).squeeze(-1)
        kk = k_
        dsub = basis.reshape(kk, -1, reader.unit)[:, rows].reshape(kk, -1)
    return reader.sums(a, b, {2: dsub.T.contiguous()}, rows=rows)[2]


# A chunk's draws' parts of every scheme summed in one power-sum call (over the rows some scheme's
# draws moved), not one call per scheme: the record-side work of the call (the factors' rows,
# the centring, the scales, the a = 0 term) once per chunk, and one wider GEMM instead of several
# narrow ones (ps33). Not bitwise: the products round otherwise with more columns and rows
# (~1e-16 relative, as SHARE_EQUAL_COLUMNS). False: one call per scheme (tests, A/B).
JOINT_DRAW_SUMS = True
# ... and that call's GEMMs take the columns of the parts that moved some row, and of those the
# columns with a non-zero element, only (ps35); the others' sums are exact zeros. Not bitwise: the
# products round otherwise with fewer columns (~1e-16 relative, as JOINT_DRAW_SUMS). False: every
# distinct part's columns, as before (A/B).
JOINT_DRAW_NONZERO_COLUMNS = True


# ... and a subsampled part's basis and groups are gathered on the union's rows each, then joined,
# not joined over the whole sample first (p54c: [9 + 8, ~16k] float64 a part and chunk on the 1e7
# MLP's second layer, of which the rows some draw moved are a few): the same columns, the same
# values. False: joined first, as before (A/B).
JOINT_DRAW_ROWS_FIRST = True


def _joint_draw_sums(reader: _InfluenceReader, a: int, b: int,
                     deltas: list[tuple[Tensor, Tensor, Tensor | None] | None],
                     sample: tuple[Tensor, Tensor, float] | None) -> dict[int, Tensor | None]:
    """``{id(parts): sums}`` for the distinct draws' parts of a chunk (``deltas``, one per
    scheme): what :func:`_draw_sums` gives each (``[R, k (+ DRAW_SAMPLE_GROUPS)]``, ``None``
    where none of its rows moved), from one :meth:`_InfluenceReader.sums` call over the union
    of the rows any of them moved (a part is 0 on a row it did not move, so its columns read
    the same values). ``{}`` (the caller sums each alone) for fewer than two parts, or parts
    some subsampled and some not."""
    distinct: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
    for parts in deltas:
        if parts is not None:
            distinct.setdefault(id(parts), parts)
    kinds = {parts[2] is None for parts in distinct.values()}
    if len(distinct) < 2 or len(kinds) > 1:
        return {}
    u = reader.unit
    cols, moved = [], []
    for parts in distinct.values():
        basis, _, grp = parts
        if isinstance(parts, StillParts) and JOINT_DRAW_NONZERO_COLUMNS:  # moves no row: no scan, no columns
            moved.append(torch.zeros(basis.shape[1] // u, dtype=torch.bool))
            cols.append(basis)
            continue
        moved.append(any_along(any_along((basis != 0).reshape(basis.shape[0], -1, u), -1), 0))  # rows (of the sample)
        cols.append(basis if grp is None else (basis, grp) if JOINT_DRAW_ROWS_FIRST else torch.cat([basis, grp]))
    union = torch.stack(moved).any(0)
    if not any_set(union):
        return dict.fromkeys(distinct)
    local = torch.nonzero(union).squeeze(-1)
    if kinds == {False}:  # subsampled: whole sampled rows, numbered in the chunk
        assert sample is not None
        rows = sample[0][::u].div(u, rounding_mode="floor")[local]
    else:
        rows = local
    out: dict[int, Tensor | None] = dict.fromkeys(key for key, mv in zip(distinct, moved) if not any_set(mv))
    # the parts that moved a row only (the others' answer is None), and of their columns only those
    # with a non-zero element on the union's rows: an all-zero column sums to exactly 0 (finite
    # influences, as _distinct_list_sums), so it need not reach the GEMMs (ps35: at 1e7 half the
    # first layer's columns, those of the schemes whose draws moved nothing there, ~70% of the second's)
    live = [(key, c if isinstance(c, tuple) else (c,)) for key, c in zip(distinct, cols)
            if key not in out or not JOINT_DRAW_NONZERO_COLUMNS]
    dsub = torch.cat([t.reshape(t.shape[0], -1, u)[:, local].reshape(t.shape[0], -1) for _, c in live for t in c])
    nz = dsub.ne(0).any(1) if JOINT_DRAW_NONZERO_COLUMNS else None
    if nz is not None and not bool(nz.all()):
        ps = torch.zeros(reader.est.num_records, dsub.shape[0], dtype=torch.float64)
        ps[:, nz] = reader.sums(a, b, {2: dsub[nz].T.contiguous()}, rows=rows)[2]  # some row moved: nz.any()
    else:
        ps = reader.sums(a, b, {2: dsub.T.contiguous()}, rows=rows)[2]
    o = 0
    for key, c in live:
        width = sum(t.shape[0] for t in c)
        if key not in out:  # (switched off: a part that moved no row is summed with the others, still None)
            out[key] = ps[:, o: o + width]
        o += width
    return out


# Schemes whose grids of a parameter are equal (ParamGrid.same_cells) share its cell moments,
# draws and draws' sums in the scoring pass (bitwise what each computes alone); False: each
# computes its own (tests compare the two).
SHARE_EQUAL_GRIDS = True


# The main and pool columns of a chunk are summed once per distinct column: columns built from
# the same tensors (equal grids sharing their moments) and all-zero columns (the baseline's
# fourth-cumulant column, m4 - 3 kappa^2 = 0 at kappa = 1) are not summed again. Not bitwise:
# the power sums' matrix products round differently with another number of columns (~1e-16
# relative, measured); False: every column is summed (tests compare the two to 1e-12).
SHARE_EQUAL_COLUMNS = True


# a key of _distinct_list_sums for a column its caller knows to be zero (m4 - 3 kappa^2 at kappa 1, m4 3)
_ZERO_COLUMN = ("zero column",)


# A factored weight's chunk whose power-2 columns hold several near-unit kappas (0 <= 1 - kappa <=
# NEAR_UNIT_MAX on every element) that share a deficit direction sums the unit column and one deficit
# column per direction, each such kappa's sums the unit column's less alpha times the direction's
# (linear_factors.factored_power_sums' row weights, alpha on every row), where the residual
# max |delta - alpha delta_b| is at most SHARED_DEFICIT_TOL (1 - max delta) (checked per chunk and
# column at run time): then every such sum, a sum of non-negative terms w^2 kappa, is within that
# relative of its exact value (|sum w^2 r| <= max |r| sum w^2) before the float32 rounding, whose
# run-time bound covers both sums (the difference's relative error at most (1 + delta) / (1 - delta)
# times theirs: NEAR_UNIT_MAX keeps it within 1e-6 of the bound). The 1e7 MLP's first layer: fp16 /
# bf16 main and pool kappas (the fine expansion 1 - h^2 / 12 + h^4 / 144, h the own cell's width in
# sd: bf16's cells 8 times fp16's, the pool protocol's h^2 twice the main's) are one direction within
# ~7e-13: 7 -> 4 GEMM columns a chunk (docs/benchmarks.md, "p47a"; method.md section 3, "Shared
# deficit directions"). The tolerance is the unit-kappa chunks' (UNIT_KAPPA_TOL). False: every
# distinct column summed (A/B).
SHARED_DEFICITS = True
SHARED_DEFICIT_TOL = UNIT_KAPPA_TOL
NEAR_UNIT_MAX = 1e-6


def _shared_deficit_plan(columns: list[Tensor]) -> tuple[int | None, dict[int, tuple[int | None, float]],
                                                         list[Tensor]] | None:
    """How a chunk's distinct power-2 columns ``[c]`` are summed through shared deficit directions
    (:data:`SHARED_DEFICITS`): ``(unit, assigned, bases)`` with ``unit`` the index of a column
    equal to 1 everywhere (``None``: none is), ``assigned`` per near-unit column its ``(basis,
    alpha)`` (its kappa is ``1 - alpha bases[basis]`` within :data:`SHARED_DEFICIT_TOL` relative;
    ``basis`` ``None``: 1 within that), ``bases`` the deficit columns ``1 - kappa`` (``[c]``,
    ``>= 0``); ``None`` where that sums no fewer columns. A column is a candidate where every element
    lies in ``[1 - NEAR_UNIT_MAX, 1]`` (a sample of ~256 elements first: most columns that are not,
    e.g. with point masses, fail there)."""
    cand: list[tuple[int, Tensor, float]] = []
    unit = None
    for i, t in enumerate(columns):
        if t.dim() != 1 or t.dtype != torch.float64 or t.numel() == 0:
            continue
        probe = t[:: max(1, t.numel() // 256)]
        if not bool(((probe <= 1.0) & (probe >= 1.0 - NEAR_UNIT_MAX)).all()):
            continue
        lo, hi = torch.aminmax(t)
        if not (float(hi) <= 1.0 and float(lo) >= 1.0 - NEAR_UNIT_MAX):  # (NaN fails too)
            continue
        if float(lo) == 1.0:
            if unit is None:
                unit = i
                continue
            cand.append((i, torch.zeros((), dtype=t.dtype).expand(t.shape), 0.0))
            continue
        delta = 1.0 - t  # exact (Sterbenz: t in [1/2, 1])
        cand.append((i, delta, 1.0 - float(lo)))
    if not cand:
        return None
    cand.sort(key=lambda e: -e[2])  # the widest deficit first: the others are read off it
    bases: list[Tensor] = []
    norms: list[float] = []
    assigned: dict[int, tuple[int | None, float]] = {}
    for i, delta, top in cand:
        limit = SHARED_DEFICIT_TOL * (1.0 - top)
        done = False
        for bi, (db, nb) in enumerate(zip(bases, norms)):
            alpha = float(torch.dot(delta, db)) / nb
            if alpha >= 0.0 and float((delta - alpha * db).abs().max()) <= limit:
                assigned[i] = (bi, alpha)
                done = True
                break
        if done:
            continue
        if top <= limit:  # within the tolerance of the unit column itself
            assigned[i] = (None, 0.0)
            continue
        nb = float(torch.dot(delta, delta))
        if not nb > 0.0 or not math.isfinite(nb):
            continue
        bases.append(delta)
        norms.append(nb)
        assigned[i] = (len(bases) - 1, 1.0)
    used = {b for b, _ in assigned.values() if b is not None}
    if len(assigned) - len(used) - (1 if unit is None else 0) <= 0:
        return None
    return unit, assigned, bases


# A chunk's unit column (kappa = 1 on every element: the baseline's ``sum_j w_rj^p``) has power sums
# that depend on the estimate alone, no scheme's values: where it is the only distinct non-zero
# column of a power (the 1e7 MLP: every weight chunk's fourth powers, B = sum_j w^4 of the
# diagnostics' bounds, ~0.4 s of a 4.6 s call), its sums are computed by the first scoring call on
# an estimate and read back by the later ones (Estimate._unit_sums: [R] floats per chunk and power).
# Each entry is keyed by the identity and version of the tensors the sums are computed from (the
# factors d and x, the mean gradient and variances, or the stored influences), the chunk, the
# records and the power sums' settings (_power_sum_settings), so an entry is read only where the
# same call would compute the same sums: bitwise those of recomputing them. A first call on a new
# estimate computes them as before. False: every call sums them (A/B).
UNIT_SUMS_ONCE = True


# A factored parameter's power-4 unit sums (UNIT_SUMS_ONCE's entries, B = sum_j w^4 of the Gaussian
# form's diagnostics) for every chunk at once, by estimation.unit_fourth.unit_fourth_sums, when the
# first chunk needs them (p52a: the 1e7 MLP's 44 chunk calls of factored_power_sums on a column of
# ones, ~0.5 s of its first scoring call, each with its own small GEMMs, a = 0 term, A / V^2 and float64
# fallback): four float32 GEMMs over the parameter's rows that some record's gradient reaches, the
# a = 0 term in float64, the same run-time bound (POWER_SUMS_F32_RTOL) and the entries beyond it in
# float64. Not bitwise: each entry within the same 1e-4 relative bound of the exact sum as before
# (measured ~1e-6; the reports' clt_error_estimate up to ~1e-6 relative: 1.04e-6 on M5, 1.8e-7
# on M and M6; docs/benchmarks.md "p52a").
# False: each chunk's own factored_power_sums call, as before (A/B).
UNIT_FOURTH_BATCHED = True


def _unit_fourth_batched(reader: _InfluenceReader, a: int, b: int, inputs: tuple[tuple[Tensor | None, ...], tuple]
                         ) -> Tensor | None:
    """``[R]`` the power-4 unit sums of chunk ``a:b`` of ``reader``'s factored parameter
    (:data:`UNIT_FOURTH_BATCHED`), left in the estimate's :data:`UNIT_SUMS_ONCE` entries keyed by
    ``inputs`` (:func:`_unit_sums_inputs`) together with those of the parameter's further chunks of
    the same width when ``a`` is 0 (the scoring pass's chunks: ``range(0, numel, b - a)``), else of
    this chunk alone; ``None`` where the switch is off or the influences are not factored."""
    if not _unit_fourth_applies(reader, a, b):
        return None
    from .estimation.unit_fourth import unit_fourth_sums

    est, u, name = reader.est, reader.unit, reader.name
    assert est._g_mean is not None and est._v_diag is not None and reader.factor is not None
    fac, bias = reader.factor
    gm, vd = est._g_mean[name].reshape(-1), est._v_diag[name].reshape(-1)
    lo, hi = (0, gm.numel()) if a == 0 else (a, b)
    width = b - a
    sums = unit_fourth_sums(fac.d[:, lo // u: hi // u], fac.x, gm[lo:hi], vd[lo:hi], bias, width // u, reader.cache)
    key = _qbase._fact_key(*inputs)
    for k, c0 in enumerate(range(lo, hi, width)):
        est._unit_sums[(name, c0, min(c0 + width, hi), 4)] = (key, sums[:, k].clone())
    return sums[:, 0].clone()


def _unit_fourth_applies(reader: _InfluenceReader, a: int, b: int) -> bool:
    """Whether :func:`_unit_fourth_batched` sums chunk ``a:b`` of ``reader``'s parameter (the switch on,
    factored influences in float64, as the float32 path of the chunk calls reads them; whole output rows)."""
    u, fac = reader.unit, reader.factor
    return (UNIT_FOURTH_BATCHED and fac is not None and reader.est.influence is None
            and fac[0].d.dtype == torch.float64 and fac[0].x.dtype == torch.float64
            and a % u == 0 and (b - a) % u == 0 and b > a)


def _power_sum_settings() -> tuple:
    """The module settings that the power sums of a chunk's columns depend on (the float32 path,
    its tolerances, the layouts; linear_factors' upper-case scalars and the stacking switches of
    this module) and the torch threads (a GEMM's rounding may depend on them): part of the key of
    :data:`UNIT_SUMS_ONCE`'s entries."""
    from .estimation import linear_factors as _lf

    own = tuple((k, v) for k, v in sorted(vars(_lf).items())
                if k.isupper() and isinstance(v, (bool, int, float, str, frozenset)))
    from .estimation import unit_fourth as _uf

    own += tuple((k, v) for k, v in sorted(vars(_uf).items()) if k.isupper() and isinstance(v, (bool, int, float)))
    return own + (("COLUMN_MAJOR_STACK", COLUMN_MAJOR_STACK), ("COLUMN_MAJOR_ROWS", COLUMN_MAJOR_ROWS),
                  ("UNIT_FOURTH_BATCHED", UNIT_FOURTH_BATCHED), ("threads", torch.get_num_threads()))


def _unit_sums_inputs(reader: _InfluenceReader) -> tuple[tuple[Tensor | None, ...], tuple] | None:
    """What :data:`UNIT_SUMS_ONCE`'s entries of ``reader``'s parameter are computed from (the
    chunk and power are the entry's index): the tensors (keyed by identity and version) and the
    plain values; ``None`` where they cannot be keyed (an inference tensor has no version
    counter) or the estimate holds no entries (one unpickled from before them)."""
    est = reader.est
    if not isinstance(getattr(est, "_unit_sums", None), dict):
        return None
    if est.influence is not None:
        tensors: tuple[Tensor | None, ...] = (est.influence,)
    else:
        assert reader.factor is not None and est._g_mean is not None and est._v_diag is not None
        fac = reader.factor[0]
        tensors = (fac.d, fac.x, est._g_mean[reader.name], est._v_diag[reader.name])
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tensors, (est.num_records, est.influence_scale, reader.start, _power_sum_settings())


def _distinct_list_sums(reader: _InfluenceReader, a: int, b: int, cols: dict[int, list[Tensor]],
                        keys: dict[int, list[Any]],
                        deficits: list[tuple[int, Any, Tensor, Tensor]] | None = None,
                        unit: Tensor | None = None) -> dict[int, Tensor]:
    """``reader.sums(a, b, {p: torch.stack(cols[p], 1)})`` (``{p: [R, M]}``, ``cols[p]`` the
    ``[c]`` columns) from the distinct non-zero columns only: ``keys[p][m]`` identifies what
    column ``m`` is computed from (equal keys: bitwise-equal columns); a column with no non-zero
    element sums to exactly 0 (finite influences, as ``score_schemes`` checks). Only those
    columns are stacked, in order of first use (no matrix of every column to gather
    them from; the same matrix reaches ``reader.sums`` as before, so bitwise the same sums).

    ``deficits``: ``(m, key, u, W)`` entries (:data:`UNIT_KAPPA_EXACT`): the power-2 column ``m``'s
    sums less those of ``u [c] >= 0`` weighted by ``W [rows]`` per output row (a factored weight;
    ``key`` identifies ``u``: each distinct ``u`` one more GEMM column, every ``W`` on it a
    row-weighted column of ``linear_factors.factored_power_sums``).

    ``unit``: the chunk's column of ones (``[c]``, kappa = 1: the caller's, never written), whose
    sums depend on the estimate alone: where it is a power's only distinct non-zero column, its
    sums are read from the estimate's entry if a call on the same inputs and settings left one,
    else computed and left there (:data:`UNIT_SUMS_ONCE`)."""
    take: dict[int, list[Tensor]] = {}
    where: dict[int, list[int]] = {}
    for p, C in cols.items():
        first: dict[Any, int] = {}
        take[p], where[p] = [], []
        for t, key in zip(C, keys[p]):
            if key is _ZERO_COLUMN:  # (the caller knows it is zero: no scan)
                first[key] = -1
            elif key not in first:
                # NaN counts as non-zero too; a non-zero element among ~256 evenly spaced ones settles
                # it without a pass over the column (ps35: 636 count_nonzero calls of ~0.13 ms a 1e7
                # call; the second layer's kappas are mostly 0, a few percent of them not)
                nonzero = bool(t[:: max(1, t.numel() // 256)].ne(0).any()) or bool(torch.count_nonzero(t))
                first[key] = len(take[p]) if nonzero else -1
                if first[key] >= 0:
                    take[p].append(t)
            where[p].append(first[key])
    deficits = list(deficits or [])
    if (SHARED_DEFICITS and SHARE_EQUAL_COLUMNS and 2 in take and len(take[2]) > 1 and reader.factor is not None
            and not reader.factor[1] and reader.unit > 0 and (b - a) % reader.unit == 0):
        plan = _shared_deficit_plan(take[2])
        if plan is not None:
            # (ones_at: the plan's column of ones, an index; ``unit`` stays the caller's column)
            ones_at, assigned, bases = plan
            rows = (b - a) // reader.unit
            keep_cols = [i for i in range(len(take[2])) if i not in assigned]
            cols2 = [take[2][i] for i in keep_cols]
            if ones_at is None:
                cols2.append(torch.ones(b - a, dtype=torch.float64))
                unit_at = len(cols2) - 1
            else:
                unit_at = keep_cols.index(ones_at)
            moved = {old: new for new, old in enumerate(keep_cols)}
            for old in assigned:
                moved[old] = unit_at
            keys_b = [("shared deficit", id(db)) for db in bases]
            for m, w in enumerate(where[2]):
                if w < 0:
                    continue
                where[2][m] = moved[w]
                if w in assigned and assigned[w][0] is not None:
                    bi, alpha = assigned[w]
                    deficits.append((m, keys_b[bi], bases[bi], torch.full((rows,), alpha, dtype=torch.float64)))
            take[2] = cols2
    rw = None
    if deficits:
        plain = len(take[2])
        first_u: dict[Any, int] = {}
        src, ws, targets = [], [], []
        for m, key, u, w in deficits:
            if key not in first_u:
                first_u[key] = len(take[2])
                take[2].append(u)
            src.append(first_u[key])
            ws.append(w)
            targets.append(m)
        rw = {2: (torch.tensor(src, dtype=torch.long), torch.stack(ws, 1))}
    # the powers whose only column is the unit column: their sums from an earlier call on this estimate
    once = [p for p in take if UNIT_SUMS_ONCE and unit is not None and len(take[p]) == 1 and take[p][0] is unit
            and (p != 2 or rw is None)]
    inputs = _unit_sums_inputs(reader) if once else None
    if inputs is None:
        once = []
    known: dict[int, Tensor] = {}
    for p in once:
        assert inputs is not None
        entry = reader.est._unit_sums.get((reader.name, a, b, p))
        if entry is not None and _qbase._key_matches(entry[0], *inputs):
            known[p] = entry[1]
    # a first call's power-4 unit sums: every chunk's at once (UNIT_FOURTH_BATCHED), after the chunk's
    # other sums (which hold the layer's scaled input powers that they read too)
    batch4 = 4 in once and 4 not in known and _unit_fourth_applies(reader, a, b)
    stacked = {p: _stacked(reader, p, take[p], a, b) for p in cols if take[p] and p not in known and not (batch4 and p == 4)}
    if not stacked:
        ps = {}
    elif rw is None:
        ps = reader.sums(a, b, stacked)
    else:
        ps = reader.sums(a, b, stacked, row_weights=rw)
    if batch4:
        assert inputs is not None
        got = _unit_fourth_batched(reader, a, b, inputs)
        assert got is not None
        known[4] = got
    for p in once:
        if p in known:
            ps[p] = known[p].unsqueeze(1).clone()
        else:  # (the sums' own column: held, not a view of the call's result)
            assert inputs is not None
            reader.est._unit_sums[(reader.name, a, b, p)] = (_qbase._fact_key(*inputs), ps[p][:, 0].clone())
    ps = {p: ps[p] for p in cols if p in ps}  # (the callers' order of the powers)
    if not deficits and all(len(take[p]) == len(C) for p, C in cols.items()):
        return ps
    out = {}
    for p, C in cols.items():
        full = torch.zeros(reader.est.num_records, len(C), dtype=torch.float64)
        live = [m for m, w in enumerate(where[p]) if w >= 0]
        if live:
            full[:, live] = ps[p][:, [where[p][m] for m in live]]
        out[p] = full
    if deficits:
        extra = ps[2][:, plain + len(first_u):]
        for k, m in enumerate(targets):
            out[2][:, m] -= extra[:, k]
    return out


_PHI0_12 = 1.0 / (12.0 * math.sqrt(2.0 * math.pi))  # phi(0) / 12


class _DeficitColumns:
    """A chunk's deficit columns (:data:`UNIT_KAPPA_EXACT`): ``u = (sd_main / sigma)^3`` on the
    weights of sd > 0 (``sd_main`` their least sd at theta-hat; ``[c]`` float64 in ``(0, 1]``), 0
    elsewhere, one copy per revealed set (0 on its revealed weights too), and per grid with blocks
    narrower than a row ``u C3 / C3_max``: the same tensor for the same set (the power sums sum it
    once)."""

    def __init__(self, sg: Tensor, sd_main: float) -> None:
        self.sg, self.sd_main = sg, sd_main
        self.sd_pool_ratio = POOL_SIGMA_RATIO
        self._u: Tensor | None = None
        self._by_rev: list[tuple[Tensor | None, Tensor]] = []
        self._row_sums: dict[int, Tensor] = {}

    @property
    def u(self) -> Tensor:
        """``(sd_main / sigma)^3`` on the weights of sd > 0, else 0 (computed at first use: a chunk
        none of whose grids qualifies never builds it)."""
        if self._u is None:
            r = self.sd_main / self.sg.clamp_min(_TINY64)
            self._u = torch.where(self.sg > _TINY64, r * r * r, torch.zeros((), dtype=torch.float64))  # (pow: ~4x slower)
        return self._u

    def _unrevealed(self, rev: Tensor | None) -> Tensor:
        for r, u in self._by_rev:
            if (r is None and rev is None) or (r is not None and rev is not None and torch.equal(r, rev)):
                return u
        u = self.u if rev is None else self.u.masked_fill(rev, 0.0)
        self._by_rev.append((rev, u))
        return u

    def of(self, g: ParamGrid, a: int, b: int, wide: tuple[Tensor, list[float], list[float], list[float]]
           ) -> tuple[Tensor, Any, Tensor, Tensor]:
        """``(u, key, W_main [rows], W_pool [rows])`` of grid ``g`` on elements ``a:b`` (whole rows of
        the ``[out, in]`` weight) from :meth:`ParamGrid.chunk_wide_deficit`'s ``(C3, lam, err,
        S_max)`` at ``(sd_main, pool sd)``: the deficit ``lam phi(0) C3 / (12 sigma^3)`` of weight
        ``(o, i)`` is ``W[o] u_oi``."""
        cube, lams, _, _ = wide
        rev = None if g.revealed is None else g.revealed.reshape(-1)[a:b].to(torch.bool)
        if rev is not None and not any_set(rev):
            rev = None
        u = self._unrevealed(rev)
        unit = self.sd_main ** 3
        rows = cube.shape[0]
        if cube.shape[1] == 1:  # one block per output row: C3 in the row weights
            c3 = cube[:, 0]
        else:  # narrower blocks: C3 / C3_max folded into a column of this grid's own
            c3_max = float(cube.max())
            u = u * _qbase._rows_to_elements(cube / c3_max, g.block_size, g.shape, a, b)
            c3 = torch.full((rows,), c3_max, dtype=torch.float64)
        w_main = (lams[0] * _PHI0_12 / unit) * c3
        w_pool = (lams[1] * _PHI0_12 * self.sd_pool_ratio ** 3 / unit) * c3
        return u, id(u), w_main, w_pool

    def deficit_sum(self, entry: tuple[Tensor, Any, Tensor, Tensor]) -> float:
        """``sum_j`` of the deficit at theta-hat (the kappa column's sum less the unit column's)."""
        u, key, w_main, _ = entry
        rs = self._row_sums.get(key)
        if rs is None:
            rs = self._row_sums[key] = u.reshape(w_main.shape[0], -1).sum(1)
        return float(rs @ w_main)


# A factored weight's main and pool columns, where at most COLUMN_MAJOR_ROWS of the chunk's output
# rows reach the power sums' GEMMs (the others silent: d = 0 on every record), are written one
# after another into a held [M, c] buffer and passed as its transpose (a [c, M] view, strides
# (1, c); ps36's side branch, settled in ps37): 13 columns of 2^18 elements copied so in ~3 ms
# against ~6.5 ms interleaved, and the power sums then read the whole matrix only for its least
# element and the a = 0 term (a GEMV per column, linear_factors._zeroth_term: each column summed
# as the row-major GEMV sums it, so bitwise the same sums), gathering the few non-silent rows
# (1e7 second layer: a chunk's stack and that work 13 -> 9 ms). A chunk whose rows mostly reach
# the GEMMs forms S = A / V^(p/2) over all of them, which reads the columns interleaved either
# way (the 1e7 first layer: ~1 ms slower column-major): row-major there. Either layout gives
# bitwise the same sums. False: every chunk row-major, as before (A/B); stored influences always so.
COLUMN_MAJOR_STACK = True
COLUMN_MAJOR_ROWS = 0.5


def _stacked(reader: _InfluenceReader, slot: Any, columns: list[Tensor], a: int, b: int) -> Tensor:
    """``torch.stack(columns, 1)`` ``[c, M]`` of elements ``a:b``, written into the reader's held
    buffer for ``slot`` (:meth:`PowerCache.scratch`: the same values, without fresh pages for a
    chunk-sized matrix on every chunk; the power sums read it before the next chunk's columns are
    stacked); for a factored weight's chunk whose output rows mostly skip the GEMMs
    (:data:`COLUMN_MAJOR_STACK`) the transpose of ``[M, c]``: the same values, strides ``(1, c)``."""
    dtype = columns[0].dtype
    if any(t.dtype != dtype or t.dim() != 1 for t in columns):
        return torch.stack(columns, 1)
    # (one column: the same memory either way)
    if COLUMN_MAJOR_STACK and len(columns) > 1 and reader.gemm_row_fraction(a, b) <= COLUMN_MAJOR_ROWS:
        out = reader.cache.scratch(("columns", slot), (len(columns), columns[0].numel()), dtype, columns[0].device)
        return torch.stack(columns, 0, out=out).T
    out = reader.cache.scratch(("columns", slot), (columns[0].numel(), len(columns)), dtype, columns[0].device)
    return torch.stack(columns, 1, out=out)


def _equal_grid_leads(active: list[_Prepared], name: str) -> list[int]:
    """Per scheme of ``active``, the first scheme (its own index if none) whose grid of ``name``
    has the same cells and the same number of bootstrap draws: its moments are reused. Grids
    re-quantized by Monte Carlo (rounding not nearest) compute their own."""
    lead: list[int] = []
    for j, prep in enumerate(active):
        g = prep.grids[name]
        i = j
        if SHARE_EQUAL_GRIDS and g.rounding == "nearest":
            i = next((i0 for i0 in range(j) if lead[i0] == i0 and active[i0].num_draws == prep.num_draws
                      and active[i0].grids[name].same_cells(g)), j)
        lead.append(i)
    return lead


def _keep_chunk(est: Estimate, prep: _Prepared, src: _Prepared, name: str, a: int, b: int) -> None:
    """Copy the kept moments of elements ``a:b`` of ``name`` from ``src`` (an equal grid's
    scheme, same number of draws) into ``prep``'s (the whole-parameter moments kept for the
    Monte Carlo form, small models)."""
    prep.kappa[name][a:b] = src.kappa[name][a:b]
    prep.m4[name][a:b] = src.m4[name][a:b]
    prep.kappa_pool[name][a:b] = src.kappa_pool[name][a:b]
    for dst_b, src_b in zip(prep.draws[name], src.draws[name]):
        dst_b[a:b] = src_b[a:b]
    if est.d == 1:
        prep.lam[name][a:b] = src.lam[name][a:b]
        prep.lam_pool[name][a:b] = src.lam_pool[name][a:b]
        for dst_b, src_b in zip(prep.lam_draws[name], src.lam_draws[name]):
            dst_b[a:b] = src_b[a:b]


def _total(layer_sums: dict[str, F.CltSums], R: int) -> F.CltSums:
    return sum(layer_sums.values(), F.CltSums.zeros(R))


def _summed_s2(per_layer: Iterable[Tensor], rows: int, R: int) -> Tensor:
    """``[rows, R]`` float64: the layers' ``s2`` (each ``[rows, R]`` or ``[R]``) summed in
    :func:`_total`'s order (0, then each layer in turn): row ``i`` is bitwise ``_total``'s ``s2``
    of the layers' rows ``i`` (the same additions, element by element), in one operation per
    layer instead of one per row and layer (the interval's draws and groups)."""
    out = torch.zeros(rows, R, dtype=torch.float64)
    for s2 in per_layer:
        out = out + s2
    return out


def _row_leakage_means(s2: Tensor, n: float) -> list[float]:
    """Per row of ``s2 [rows, R]`` the mean over the ``R`` records of the Gaussian form's leakage
    (:meth:`F.CltSums.leakage`): bitwise ``float(F.CltSums(s2[i], ...).leakage(n).mean())`` (the
    same element-wise operations; each row's mean taken over its own contiguous values, as a
    ``[R]`` tensor's: no reduction over a strided dimension, whose order may differ)."""
    lk = F.leakage_from_sums(s2.contiguous(), n)
    return [float(lk[i].mean()) for i in range(lk.shape[0])]


# The schemes whose bounds do not settle the Gaussian form's diagnostics sum their exact fourth
# powers in one pass over the layers for all of them (pw34: at 1e5 weights every scheme's, 7
# passes of 0.04 s): one reader (one PowerCache, its held buffers) per layer and one power-sum
# call per chunk for every scheme's columns (equal columns once) instead of a pass and a call per
# scheme. Not bitwise: the GEMMs round otherwise with more columns (~1e-16 relative, as
# SHARE_EQUAL_COLUMNS). False: one pass per scheme, in _finish_scheme (tests, A/B).
JOINT_EXACT_FOURTH = True


def _joint_exact_fourth(est: Estimate, prepared: list[_Prepared], sums: dict[str, list[F.CltSums]], chunk: int,
                        policy: F.CompilePolicy | None) -> None:
    """``prep.exact_fourth`` of every scheme of ``prepared`` whose bounds need the exact sums
    (:func:`_needs_exact_fourth`), from one :func:`_exact_fourth_sums_of` pass for them all, where
    :data:`JOINT_EXACT_FOURTH` and at least two need them (one: _finish_scheme's own pass)."""
    if not JOINT_EXACT_FOURTH:
        return
    need = [p for p in prepared if _needs_exact_fourth(est, p, sums)]
    if len(need) < 2:
        return
    with scoring_threads():  # the same thread scope as the per-scheme pass in _finish_scheme
        got = _exact_fourth_sums_of(est, [(p, {name: sums[name][p.column] for name in est.names}) for p in need],
                                    chunk, policy)
    for p, main in zip(need, got):
        p.exact_fourth = main


def _clt_diagnostics(total: F.CltSums, R: int) -> tuple[float, float]:
    """``(clt_err, n_eff)``: the Edgeworth error estimate (the largest excess kurtosis over 24)
    and the least effective number of coordinates over the records (method.md section 3)."""
    clt_err = float(total.excess_kurtosis().abs().max()) / 24.0 if R else 0.0
    n_eff = float(total.effective_terms().min()) if R else math.inf
    return clt_err, n_eff


def _needs_exact_fourth(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]]) -> bool:
    """Whether ``prep``'s fourth-power bounds leave the Gaussian form's diagnostics out of their
    tolerance, so that :func:`_finish_scheme` needs the exact sums (the test it makes)."""
    return _diagnostic_sums(est, prep, sums)[2]


def _diagnostic_sums(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]]
                     ) -> tuple[dict[str, F.CltSums], F.CltSums, bool]:
    """``(main, total, exact_needed)``: the scheme's per-layer main sums whose fourth powers the
    Gaussian form's diagnostics read and their total over layers: the pass's sums (exact, or
    the scheme-free bounds where they show the form within tolerance), else the sharper bounds
    (:data:`SHARP_FOURTH_BOUND`) where those show it; ``exact_needed``: neither does, the
    exact sums must decide (``main`` is then the pass's sums)."""
    R = est.num_records
    main = {name: sums[name][prep.column] for name in est.names}
    total = _total(main, R)
    if not (total.bound and F.clt_out_of_tolerance(*_clt_diagnostics(total, R))):
        return main, total, False
    if prep.sharp_fourth:
        sharp = {name: prep.sharp_fourth.get(name, main[name]) for name in est.names}
        tight = _total(sharp, R)
        if not F.clt_out_of_tolerance(*_clt_diagnostics(tight, R)):
            return sharp, tight, False
    return main, total, True


def _exact_fourth_sums(est: Estimate, prep: _Prepared, main: dict[str, F.CltSums], chunk: int,
                       policy: F.CompilePolicy | None) -> dict[str, F.CltSums]:
    """``main`` with every bounded layer's fourth-power sums (``s4``, ``s22``; :class:`F.CltSums`
    ``bound``) replaced by the exact ones: a second pass over those layers' weights, their
    cell moments at theta-hat only (method.md section 3, "Gaussian form's diagnostics"). A
    chunk's columns kept from the joint pass (``prep.fourth_kept``) are used where the moments
    state (:func:`_moments_state`) is still the one they were computed in: bitwise what the
    recomputation would give. One scheme of :func:`_exact_fourth_sums_of` (bitwise the same)."""
    return _exact_fourth_sums_of(est, [(prep, main)], chunk, policy)[0]


def _exact_fourth_sums_of(est: Estimate, jobs: Sequence[tuple[_Prepared, dict[str, F.CltSums]]], chunk: int,
                          policy: F.CompilePolicy | None) -> list[dict[str, F.CltSums]]:
    """:func:`_exact_fourth_sums` of several schemes (``jobs``: ``(prep, main)`` each) in one pass:
    per layer one :class:`_InfluenceReader` and per chunk one power-sum call over every scheme's
    ``[c, 2]`` columns (``m4 - 3 kappa^2``, ``kappa^2``), a block equal to an earlier scheme's
    (equal grids) summed once; schemes with equal grids (``same_cells``) that recompute their
    moments compute them once. A single job's call is the one scheme's call (bitwise)."""
    outs = [dict(main) for _, main in jobs]
    R = est.num_records
    for name in est.names:
        who = [i for i, (_, main) in enumerate(jobs) if name in main and main[name].bound]
        if not who:
            continue
        reader = _InfluenceReader(est, name)
        th, sg = est.theta[name], est.sigma[name]
        step = max(1, chunk // reader.unit) * reader.unit
        preps = [jobs[i][0] for i in who]
        lead = _equal_grid_leads(preps, name)
        s4 = [torch.zeros(R, 2, dtype=torch.float64) for _ in who]
        for ci, a in enumerate(range(0, th.numel(), step)):
            b = min(a + step, th.numel())
            blocks: list[Tensor] = []
            for k, prep in enumerate(preps):
                kept = prep.fourth_kept.get(name, [])
                hold = kept[ci] if ci < len(kept) else None
                if hold is not None and hold[1].shape[0] == b - a and hold[0] == _moments_state(policy, b - a):
                    blocks.append(hold[1])
                elif lead[k] < k and not _is_kept(preps[lead[k]], name, ci):  # an equal grid recomputed it
                    blocks.append(blocks[lead[k]])
                else:
                    mm = prep.grids[name].moments(th[a:b].to(torch.float64), sg[a:b].to(torch.float64), a, b,
                                                  compile_policy=policy)
                    k2 = mm.kappa.square()
                    blocks.append(torch.stack([mm.m4 - 3.0 * k2, k2], 1))
            first: list[int] = []  # per block, the first equal block's index
            for k, blk in enumerate(blocks):
                first.append(next((i for i in range(k) if first[i] == i and (blocks[i] is blk or torch.equal(blocks[i], blk))), k))
            distinct = [blk for k, blk in enumerate(blocks) if first[k] == k]
            cols = distinct[0] if len(distinct) == 1 else torch.cat(distinct, 1)
            ps = reader.sums(a, b, {4: cols})[4]
            pos = {k: 2 * i for i, k in enumerate(k for k in range(len(blocks)) if first[k] == k)}
            for k in range(len(blocks)):
                s4[k] += ps[:, pos[first[k]]: pos[first[k]] + 2]
        for k, i in enumerate(who):
            cs = jobs[i][1][name]
            outs[i][name] = F.CltSums(cs.s2, s4[k][:, 0], s4[k][:, 1])
    return outs


def _is_kept(prep: _Prepared, name: str, ci: int) -> bool:
    kept = prep.fourth_kept.get(name, [])
    return ci < len(kept) and kept[ci] is not None


def _finish_scheme(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]],
                   base_layers: dict[str, F.CltSums], baseline: float, method: str,
                   num_samples: int | None, gen: torch.Generator, chunk: int,
                   rc: F.correlated.RecordCorrelation | None = None,
                   base_t: Tensor | None = None, policy: F.CompilePolicy | None = None,
                   base_t_independent: Tensor | None = None, base_kvec: Tensor | None = None) -> SchemeResult:
    """One scheme's figures from the pass's sums. ``base_t [R]``: the unquantized first-order
    values per record, the spread term's reference (with ``est.leverage``; method.md section 4,
    "Spread term"); ``base_t_independent [R]``: the same of the independent-coordinate form, the
    reference of ``leakage_independent`` (defaults to ``base_t``); ``base_kvec [d]``: the
    baseline's kappa (stored weights' storage grid, 1 elsewhere; ``None``: all 1), for the
    per-layer correlated baselines."""
    R, n, d = est.num_records, est.n, est.d
    idx = prep.column
    main, total, exact = _diagnostic_sums(est, prep, sums)
    if exact:
        # the bounds do not show the Gaussian form within its tolerance: the exact sums decide
        # (computed for every such scheme at once by score_schemes where JOINT_EXACT_FOURTH)
        main = prep.exact_fourth if prep.exact_fourth is not None else _exact_fourth_sums(est, prep, main, chunk, policy)
        total = _total(main, R)
    clt_err, n_eff = _clt_diagnostics(total, R)
    prep.fourth_kept.clear()  # read (or not needed): free them
    prep.exact_fourth = None
    prep.sharp_fourth.clear()
    layers = prep.layers
    for name in est.names:
        lk = float(main[name].leakage(n).mean())
        layers[name].leakage, layers[name].mis = lk, 1.0 - lk
        layers[name].baseline_leakage = float(base_layers[name].leakage(n).mean())
    kappas = {name: (prep.kappa[name].double() if name in prep.kappa else None) for name in est.names}
    coarse = F.coarse_count(kappas.values())
    chosen = F.resolve_method(method, d=d, quantized=bool(prep.grids), clt_error=clt_err, n_eff=n_eff,
                              influence_stored=est.influence_stored, num_records=R, coarse=coarse)
    notes = list(prep.notes)
    if chosen == "clt" and F.clt_out_of_tolerance(clt_err, n_eff):
        notes.append(f"Gaussian form used beyond its tolerance (Edgeworth error estimate {clt_err:.3g}, "
                     f"{n_eff:.3g} effective coordinates for the least spread record)")
    if chosen == "exact1d":
        if d != 1:
            raise ValueError(f"method='exact1d' needs d = 1 assessed weight, got d = {d}")
        leak = _exact1d(est, prep.lam)
    elif chosen == "mc":
        if est.influence is None:
            raise ValueError("method='mc' needs the stored influences (a model small enough to keep w)")
        if num_samples is None:  # as many draws as the budgets allow (error ~ 1/sqrt(S))
            num_samples = F.mc_draws_for(R, coarse)
        notes.append(f"Monte Carlo form with {num_samples} draws")
        leak = _mc_leakage(est, prep.grids, kappas, num_samples, gen, chunk, names=est.names)
        # Per-layer values: Monte Carlo too when cheap, else the Gaussian form (set above).
        if R * num_samples <= MC_BUFFER // 4:
            for name in est.names:
                if name in prep.grids:
                    lk = float(_mc_leakage(est, prep.grids, kappas, num_samples, gen, chunk, names=[name]).mean())
                    layers[name].leakage, layers[name].mis = lk, 1.0 - lk
    else:
        leak = total.leakage(n)
    leak_independent = leak
    span = None
    draws_used = num_samples if num_samples is not None else F.mc_draws_for(R, coarse)
    pool = _pool_leakage(est, prep, sums, idx, chosen, draws_used, gen, chunk, rc)
    if rc is not None:
        assert est.influence is not None
        kvec = _kappa_vector(est, prep.kappa)
        leak = _correlated_leakage(est, prep, rc, kvec, chosen, draws_used, gen, 1.0, n, notes)
        # the float weights' span of R's kept eigenspace (cr49): where it is whole, they determine
        # the quantized ones and the headline is the baseline's (report.float_determined)
        span = rc.parts[0][1].exact_span(kvec) if rc.kind == "full" else None
        for name in est.names:  # per layer: the Gaussian form on the layer's block
            sl = slice(*est.offsets[name])
            k_l = kvec[sl] if name in prep.kappa else None
            layers[name].leakage = float(F.saturate(_layer_mean_abs(est, rc, name, k_l) / (2 * math.sqrt(n))).mean())
            layers[name].mis = 1.0 - layers[name].leakage
            layers[name].baseline_leakage = _layer_baseline(est, rc, name, base_kvec)
        fitted = {"in_sample": " (the stored records' sample correlation)",
                  "cross_fitted": " (cross-fitted factor model)"}.get(rc.fit, "") if rc.kind == "factor" else ""
        # the independent value as covariance="independent" gives it: with the spread term where the
        # headline has it, so that the two differ by the covariance form only (fu28)
        ref_t = base_t if base_t_independent is None else base_t_independent
        independent_shown = float((leak_independent if est.leverage is None or ref_t is None
                                   else F.with_spread(leak_independent, ref_t, est.leverage)).mean())
        notes.append(f"covariance: {rc.kind} correlation of the weights{fitted} "
                     f"(independent-coordinate value {independent_shown:.4g})")
    # the Gaussian form at the cutoff is the scored first-order value unless Monte Carlo scored it
    cutoff = None if rc is None else _cutoff_check(est, rc, _kappa_vector(est, prep.kappa), n,
                                                   None if chosen == "mc" else float(leak.mean()))
    # a check that applies but was skipped for its cost: the report says so (_cutoff_skipped_note)
    cutoff_skipped = rc is not None and est.d > CUTOFF_CHECK_MAX_D and _cutoff_applies(
        est, rc, _kappa_vector(est, prep.kappa))
    leakage = float(leak.mean())  # first order (the interval is built around it)
    # Standard error of the mean over the R records (the truth averages over all z).
    record_se = F.record_standard_error(leak)
    first_order = leakage  # record_se is of this value (the spread term below scales both)
    # the interval's draws are of the independent form: its plug-in and record error go with them,
    # the correlated ones only to ends computed with the correlation (iv28)
    iv = _interval(est, prep, sums, idx, float(leak_independent.mean()), float(total.leakage(n).mean()),
                   chosen, F.record_standard_error(leak_independent) if rc is not None else record_se,
                   rc=rc, correlated_value=leakage, correlated_se=record_se)
    if iv is not None and rc is not None and not iv.correlated:
        # The interval's construction is independent-coordinate; carried over to the
        # correlated headline by the ratio of the two plug-in values, taken before the
        # saturation G so that the ends stay below 1 (method.md section 3).
        lo, hi = F.carry_interval(iv.lo, iv.hi, float(leak_independent.mean()), leakage)
        iv = dataclasses.replace(iv, lo=lo, hi=hi)
    allowance = 0.0
    if est.leverage is not None and base_t is not None:
        # the spread term on the headline (method.md section 4, "Spread term"); the interval is
        # carried to it like the correlated headline above
        first, first_leak = leakage, leak
        leak = F.with_spread(leak, base_t, est.leverage)
        leakage = float(leak.mean())
        if iv is not None:
            lo, hi = F.carry_interval(iv.lo, iv.hi, first, leakage)
            iv = dataclasses.replace(iv, lo=lo, hi=hi)
            # the correction's remainder (method.md section 3, "The uncertainty interval")
            allowance = F.correction_allowance(first_leak, leak, est.leverage,
                                               float(est.diagnostics.get("mean_leverage", 0.0)))
    position_gap = None
    if iv is not None and iv.regime == "position-dominated":
        # how far the upper end reaches above the figure beyond the record average's widening
        # (z standard errors): what where the population weights sit in their cells adds (acc43)
        widening = F.interval.normal_quantile(0.9) * record_se / first_order if first_order > 0 else 0.0
        position_gap = (max(iv.hi / leakage - 1.0 - widening, 0.0) if leakage > 0
                        else (math.inf if iv.hi > 0 else 0.0))
    if iv is not None and not _point_interval(leakage, (iv.lo, iv.hi)):
        # a point interval stays one (dropped with its warning): the allowance is no record error
        iv = dataclasses.replace(iv, **dict(zip(("lo", "hi"), F.widen_interval(iv.lo, iv.hi, leakage, allowance))))
    interval = None if iv is None else (iv.lo, iv.hi)
    return SchemeResult(
        name=prep.scheme.name, leakage=leakage, mis=1.0 - leakage, baseline_leakage=baseline,
        d_eff=prep.d_eff, d=d, zero_fraction=prep.zero / prep.quant if prep.quant else 0.0,
        pinned_fraction=prep.frozen / max(d, 1), bits_per_weight=prep.bits / max(d, 1), method=chosen,
        interval=interval, quantized_fraction=prep.quant / max(d, 1), clt_error_estimate=clt_err,
        layers=layers, utility=prep.utility, utility_error=prep.utility_error,
        description=prep.scheme.describe(), notes=notes,
        float_params=dict(prep.float_params), interval_regime=None if iv is None else iv.regime,
        pool_leakage=pool, covariance="independent" if rc is None else rc.kind,
        leakage_independent=None if rc is None else independent_shown, position_gap=position_gap,
        cutoff_sensitivity=cutoff, cutoff_check_skipped=cutoff_skipped,
        model_bits_per_weight=prep.model_bits / max(prep.model_d, 1), model_d=prep.model_d,
        float_unassessed=dict(prep.float_unassessed), quantized_by_unassessed=dict(prep.quantized_by_unassessed),
        exact_determination=None if span is None else span.as_dict(),
    )


# The full correlation's forms keep R's eigenvalues above correlated.RCOND of the largest (its one
# rank rule; cf45: no cutoff on the channel matrix M any more, which read pl44's MLP 2-21% low and
# non-monotone in the grid, mono44). Where R's spectrum runs smoothly through that rule the
# quantized figures may depend on it (a synthetic spectrum to 1e-12: 10.4%; pl44's MLP now
# 0.0-1.9%; through the exact estimator's factor, rc46, the rule is the gradient covariance's, the
# unquantized figure's: 0.0-2.7%): each scheme's Gaussian form is re-read with the rule at RCOND / CUTOFF_CHECK_FACTOR,
# and a move beyond CUTOFF_SENSITIVITY_MAX marks the scheme "~" and warns (report.py; rc44).
# Above this many weights the check is skipped. It reuses R's eigendecomposition (one more kept
# eigenspace and channel per scheme): +4.8% scoring CPU at d = 197 (pl44's MLP), +12% at
# d = 1,289 (R = 512; under load; rc44, before cf45); 2048 covers the exact estimator's auto range
# (2000 parameters).
CUTOFF_CHECK_MAX_D = 2048


def _cutoff_check(est: Estimate, rc: F.correlated.RecordCorrelation, kvec: Tensor, n: float,
                  at_cutoff: float | None = None) -> dict[str, float] | None:
    """The scheme's Gaussian-form first-order leakage with the full ``R``'s rank rule (``at_cutoff``
    when the scoring already has it, else computed) and with the rule at ``RCOND / CUTOFF_CHECK_FACTOR``
    (``{"leakage", "leakage_fine_cutoff", "move"}``, ``move`` relative to the first), or ``None``
    where not checked: no full correlation, nothing quantized, or ``d > CUTOFF_CHECK_MAX_D``.
    Each capped by the unquantized value as scored (``_correlated_leakage``)."""
    if rc.kind != "full" or est.influence is None or bool((kvec == 1.0).all()) or est.d > CUTOFF_CHECK_MAX_D:
        return None
    W, cap = est.influence, _unquantized_mean_abs(est, rc)
    base_rcond = rc.parts[0][1].rcond

    def first_order(r: F.correlated.RecordCorrelation) -> float:
        return float(F.saturate(torch.minimum(r.gaussian_mean_abs(W, kvec), cap) / (2 * math.sqrt(n))).mean())

    at = first_order(rc) if at_cutoff is None else at_cutoff
    fine = first_order(rc.with_rcond(base_rcond / CUTOFF_CHECK_FACTOR))
    move = abs(fine - at) / at if at > 0 else (0.0 if fine == 0 else math.inf)
    return {"leakage": at, "leakage_fine_cutoff": fine, "move": move}


def _baseline_cutoff_check(est: Estimate, rc: F.correlated.RecordCorrelation, n: float,
                           at_cutoff: float) -> dict[str, float] | None:
    """The unquantized release's first-order leakage (Gaussian form, every ``kappa = 1``: the
    estimator's Mahalanobis norms ``g'V^+g``) at the gradient covariance's rank rule (``at_cutoff``,
    as scored) and with that rule :data:`CUTOFF_CHECK_FACTOR` x finer (``{"leakage",
    "leakage_fine_cutoff", "move"}`` as :func:`_cutoff_check`), or ``None`` where not checked:
    no full correlation through the exact estimator's own factor (``SandwichFactor``; without it
    the unquantized figure is the estimator's, read at a rule the scoring does not hold), or
    ``d > CUTOFF_CHECK_MAX_D``. Not capped: it is the cap. Where ``V``'s spectrum runs smoothly
    through the rule this figure moves too (a 197-weight MLP: mean ``g'V^+g`` +16% from 1e-9 to 1e-11;
    docs/benchmarks.md, "pl44", "rc46"), and every quantized figure, capped by it, with it."""
    if (rc.kind != "full" or est.influence is None or est.d > CUTOFF_CHECK_MAX_D
            or any(c.sandwich is None for _, c in rc.parts)):
        return None
    fine_rc = rc.with_rcond(rc.parts[0][1].rcond / CUTOFF_CHECK_FACTOR)
    fine = float(F.saturate(fine_rc.gaussian_mean_abs(est.influence) / (2 * math.sqrt(n))).mean())
    move = abs(fine - at_cutoff) / at_cutoff if at_cutoff > 0 else (0.0 if fine == 0 else math.inf)
    return {"leakage": at_cutoff, "leakage_fine_cutoff": fine, "move": move}


def _cutoff_applies(est: Estimate, rc: F.correlated.RecordCorrelation, kvec: Tensor) -> bool:
    """Whether the full correlation's rank rule (its eigenvalue cutoff) is in play for a scheme, whatever ``d``: the full
    correlation, stored influences, and some weight with ``kappa < 1`` (quantized); the
    conditions of :func:`_cutoff_check` but its size bound."""
    return rc.kind == "full" and est.influence is not None and not bool((kvec == 1.0).all())


def _cutoff_skipped_note(report: Report) -> str | None:
    """One note naming the schemes whose cutoff check applies but was not run (``d`` above
    :data:`CUTOFF_CHECK_MAX_D`: ``SchemeResult.cutoff_check_skipped``), or ``None``: without it
    a figure set by the cutoff would go unmarked with nothing saying it was not looked for."""
    skipped = [k for k, s in report.schemes.items() if not s.error and s.cutoff_check_skipped]
    if not skipped:
        return None
    return (f"cutoff check not run for {', '.join(skipped)}: with d = {report.d} weights, above "
            f"assess.CUTOFF_CHECK_MAX_D = {CUTOFF_CHECK_MAX_D} (its cost: one more [d, d] apply per scheme), the full "
            f"correlation's figures were not re-read with its eigenvalue cutoff (rank rule) {CUTOFF_CHECK_FACTOR:.0f}x finer, so "
            "a figure set by that cutoff (near-singular correlation with a continuous spectrum) would not be marked ~ here")


def _cutoff_warning(report: Report) -> str | None:
    """One warning naming the schemes whose full-correlation figure moves by more than
    :data:`CUTOFF_SENSITIVITY_MAX` when the full correlation's rank rule is set
    :data:`CUTOFF_CHECK_FACTOR` x finer (``SchemeResult.cutoff_sensitivity``), and the unquantized
    baseline when its own figure does (``diagnostics["baseline_cutoff_sensitivity"]``), or ``None``."""
    over = {k: s.cutoff_sensitivity for k, s in report.schemes.items()
            if not s.error and s.cutoff_sensitivity is not None and s.cutoff_sensitivity["move"] > CUTOFF_SENSITIVITY_MAX}
    # the unquantized figure's own check (_baseline_cutoff_check): it caps every quantized one,
    # which then cannot move above it, so a rule-set baseline is named on its own (pl46)
    base = report.diagnostics.get("baseline_cutoff_sensitivity")
    base_over = base is not None and base["move"] > CUTOFF_SENSITIVITY_MAX
    if not over and not base_over:
        return None
    entries = [*([("the unquantized baseline", base)] if base_over else []), *over.items()]
    named = ", ".join(f"{k} ({c['leakage']:.4g} at the cutoff, {c['leakage_fine_cutoff']:.4g} at "
                      f"{CUTOFF_CHECK_FACTOR:.0f}x finer)" for k, c in entries)
    caps = ("the unquantized figure itself, the estimator's Mahalanobis norm, is set by the gradient covariance's "
            "rule and caps every quantized one" if base_over else
            "the unquantized figure, the estimator's Mahalanobis norm, is computed from the gradient covariance and caps it")
    # nux51 #2: a baseline moving beyond UNDETERMINED_MOVE is no figure at all: said first, in words
    undetermined = (f"undetermined headline (undet. in the table): the unquantized baseline reads {base['leakage']:.4g} "
                    f"at the cutoff but {base['leakage_fine_cutoff']:.4g} at {CUTOFF_CHECK_FACTOR:.0f}x finer "
                    f"({100 * base['move']:.0f}%, above {100 * UNDETERMINED_MOVE:.0f}%): it is set by the rank rule, "
                    "not by the data, and caps every quantized figure, so no figure of this report is determined "
                    "and the schemes are not ranked (no verdict); a model near a singular point (one that has "
                    "learned little, or with more weights than the records determine) reads so: assess fewer "
                    "weights, use more records, or train to a determined minimum (weight decay). "
                    if base_over and base["move"] > UNDETERMINED_MOVE else "")
    return (f"{undetermined}cutoff-set figures{' (~ in the table)' if over or base_over else ''}: the Gaussian-form leakage of {named} moves by "
            f"more than {100 * CUTOFF_SENSITIVITY_MAX:.0f}% when the eigenvalue cutoff (rank rule) on the full "
            "correlation of the weights is set finer: that correlation is near-singular with a continuous spectrum, so "
            "the figure depends on how many of its smallest directions count, which the data do not fix; it is "
            f"indicative ({caps})")


# theta-hat's spread in the pool protocol is sigma / sqrt(2) (method.md section 3, "Pool protocol").
POOL_SIGMA_RATIO = math.sqrt(2.0)


def _record_correlation(est: Estimate, cfg: ScoringConfig) -> F.correlated.RecordCorrelation | None:
    """The correlation form of the headline (``ScoringConfig.covariance``), or ``None`` for
    independent coordinates.

    Raises:
        ValueError: ``"full"`` without the exact estimator's correlation, ``"factor"`` without
            stored influences (the message says what to change).
    """
    form = cfg.covariance
    if form == "independent" or est.d == 1:
        return None
    if form == "full" and est.correlation is None:
        raise ValueError("covariance='full' needs the full correlation of the weights, which only the exact "
                         "estimator computes (estimation='exact'); use covariance='factor' or 'auto'")
    if est.correlation is not None and form in ("auto", "full"):
        bad = nonfinite_coordinates(est.correlation)
        if bad.numel():  # before any scheme: eigh would fail inside LAPACK without naming it
            raise ValueError(f"the estimate's full correlation of the weights is not finite (NaN or inf) at "
                             f"{name_coordinates(bad, est.offsets)}: re-run the estimation (estimation='exact') "
                             "or score with covariance='independent'")
        # with fewer records stored than trained on, each scored with its own leave-one-out HC2
        # term (Estimate.self_term; method.md section 4, *Gradient covariance*)
        return F.correlated.RecordCorrelation.full(est.correlation, est.self_term, est.self_weight,
                                                   getattr(est, "correlation_factor", None))
    if not est.influence_stored or est.influence is None or est.num_records < 8:
        if form == "factor":
            raise ValueError("covariance='factor' needs the stored influences of >= 8 records (a model small "
                             "enough for budget=, or more num_records=); use covariance='auto'")
        return None
    # the stored rows' own sample correlation where they show its rank (r < R); linearly
    # independent rows (d >= R) leave only the cross-fitted factor model
    # fitted to unit-variance influences (Estimate.unit_influence: the diagonal estimator's
    # leverage correction scales the influences, not the weights' correlation)
    unit = est.unit_influence()
    assert unit is not None
    return F.correlated.RecordCorrelation.in_sample(unit) or \
        F.correlated.RecordCorrelation.cross_fitted(unit, cfg.factor_rank)


def _unquantized_mean_abs(est: Estimate, rc: F.correlated.RecordCorrelation) -> Tensor:
    """``[R]`` ``sqrt(2/pi) |Sigma^-1/2 psi|``: the estimator's Mahalanobis norms where it has them
    (computed from the gradient covariance, which the Hessian cancels out of), else the
    correlation form with every ``kappa = 1``."""
    if rc.kind == "full" and est.mahalanobis is not None:
        return F.cells.SQRT_2_OVER_PI * est.mahalanobis.to(torch.float64)
    assert est.influence is not None
    # the same for every scheme (and the baseline, the caps, the interval's ends): one solve per
    # correlation, not one per use (22 factor-model solves, 5.7 of 13 s scoring a 9.4k-weight MLP)
    cached = rc.cache.get("unquantized_mean_abs")
    if cached is None:
        cached = rc.cache["unquantized_mean_abs"] = rc.gaussian_mean_abs(est.influence)
    return cached


def _correlation_name(rc: F.correlated.RecordCorrelation) -> str:
    """The weights' correlation a report scored through, in words (its rank for the in-sample fit)."""
    if rc.kind == "full":
        return "the weights' full correlation"
    if rc.fit == "in_sample":
        c = rc.parts[0][1]
        rank = 0 if c.factor is None else int(c.factor.shape[1])
        stored = "?" if c.self_term is None else str(int(c.self_term.shape[0]))
        return f"the weights' factor correlation (the stored records' sample correlation, numerical rank {rank}, {stored} records)"
    return "the weights' factor correlation (cross-fitted factor model)"


def _nonfinite_error(method: str, rc: F.correlated.RecordCorrelation | None, independent: float | None) -> str:
    """A scheme's error where its leakage is not finite: the correlation's form where the
    independent-coordinate value beside it is finite (``method``, e.g. 'mc', then computed the
    independent value, not the NaN; formerly a NaN under the in-sample factor correlation at
    d / n = 1.31 was blamed on 'mc'), else the ``method``'s form."""
    if rc is not None and independent is not None and math.isfinite(independent):
        return (f"the leakage is not finite: a numerical failure of {_correlation_name(rc)}, not of the "
                f"{method!r} form (the independent-coordinate value reads {independent:.4g}); its quadratic "
                "forms lost their digits (e.g. influences spanning many decades at a large d / n); "
                "covariance='independent' scores without it; no figure")
    return (f"the leakage is not finite (a numerical failure of the {method!r} form, e.g. "
            "a singular weights' covariance); no figure")


def _nonfinite_baseline_warning(rc: F.correlated.RecordCorrelation, independent: float | None) -> str:
    """The report's warning where the baseline read through the correlation ``rc`` is not finite
    (``independent``: the independent-coordinate baseline, ``None`` when not computed)."""
    shown = "" if independent is None else f" (the independent-coordinate baseline reads {independent:.4g})"
    return (f"the baseline leakage is not finite under {_correlation_name(rc)}{shown}: its quadratic forms lost "
            "their digits (e.g. influences spanning many decades at a large d / n); no scheme scored through it has "
            "a figure; covariance='independent' scores without it")


def _kappa_vector(est: Estimate, kappas: Mapping[str, Tensor]) -> Tensor:
    """``[d]`` kappa of every assessed weight (1 where the scheme left the parameter in float)."""
    out = torch.ones(est.d, dtype=torch.float64)
    for name in est.names:
        if name in kappas:
            s, e = est.offsets[name]
            out[s:e] = kappas[name].to(torch.float64)
    return out


def _layer_baseline(est: Estimate, rc: F.correlated.RecordCorrelation, name: str,
                    base_kvec: Tensor | None = None) -> float:
    """A layer's unquantized leakage with its block of the correlation (cached per estimate);
    ``base_kvec [d]``: the baseline's kappa where the layer is stored in bf16 / fp16 (its storage
    grid, as a scheme's layer reads its kappa), ``None``: 1."""
    cache = rc.cache.setdefault("layer_baseline", {})
    sl = slice(*est.offsets[name])
    stored = base_kvec is not None and not bool((base_kvec[sl] == 1.0).all())
    key = (name, "stored") if stored else name
    if key not in cache:
        mean_abs = _layer_mean_abs(est, rc, name, None if base_kvec is None or not stored else base_kvec[sl])
        cache[key] = float(F.saturate(mean_abs / (2 * math.sqrt(est.n))).mean())
    return cache[key]


def _layer_mean_abs(est: Estimate, rc: F.correlated.RecordCorrelation, name: str,
                    kappa: Tensor | None) -> Tensor:
    """``[R]`` the Gaussian form of a layer's block of the correlation at the layer's ``kappa``
    (``[d_layer]``; ``None``: unquantized), cached per estimate under the layer and the bytes of
    its kappa: a layer left in float, or on the same grid, gives the same kappa in every scheme and
    in the baseline (65 distinct of 119 factor-model forms, 1.7 of 7.8 s, on a 2,610-weight
    Transformer with 5 schemes; docs/benchmarks.md, "wf41"). Keyed by the values, not the
    scheme, so a layer on another grid is computed afresh; the result is the same tensor bit for
    bit (``kappa = None`` and all-ones kappa take the same path)."""
    assert est.influence is not None
    k = None if kappa is None else kappa.to(torch.float64).clamp(0.0, 1.0)
    if k is not None and bool((k == 1.0).all()):
        k = None
    key = (name, None if k is None else hashlib.sha256(k.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
    cache = rc.cache.setdefault("layer_mean_abs", {})
    if key not in cache:
        sl = slice(*est.offsets[name])
        cache[key] = rc.restrict(sl).gaussian_mean_abs(est.influence[:, sl], k)
    return cache[key]


def _exact1d(est: Estimate, lams: dict[str, Tensor]) -> Tensor:
    """One coordinate: ``G(|w| mean_abs / (2 sqrt n))`` (:func:`~mis_lightning.functional.exact1d_leakage`)."""
    assert est.influence is not None
    name = est.names[0]
    lam = lams[name] if name in lams else torch.tensor([F.cells.SQRT_2_OVER_PI], dtype=torch.float64)
    return F.exact1d_leakage(est.influence[:, 0], lam, est.n)


def _mc_leakage(est: Estimate, grids: dict[str, ParamGrid], kappas: dict[str, Tensor | None], num_samples: int,
                gen: torch.Generator, chunk: int, names: list[str], sigma_scale: float = 1.0,
                n: float | None = None) -> Tensor:
    """Hybrid Monte Carlo (:class:`~mis_lightning.functional.HybridMC`) over ``names`` (cells read
    at ``sigma / sigma_scale``; ``n`` defaults to the estimate's)."""
    assert est.influence is not None
    mc = F.HybridMC(est.num_records)
    for name in names:
        th = est.theta[name]
        g = grids.get(name)
        edges = None if g is None else (
            lambda lo, hi, g=g, th=th: g.boundaries(th[lo:hi], lo, hi, F.MC_HALF_WINDOW))
        mc.update(est.influence[:, slice(*est.offsets[name])], kappas[name], th, est.sigma[name] / sigma_scale,
                  edges, chunk)
    return mc.compute(est.n if n is None else n, num_samples, gen)


def _interval(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]], idx: int,
              leakage: float, clt_value: float, chosen: str, record_se: float = 0.0,
              rc: F.correlated.RecordCorrelation | None = None, correlated_value: float = math.nan,
              correlated_se: float = 0.0) -> F.interval.Interval | None:
    """An 80% uncertainty interval for the leakage and its regime
    (:func:`mis_lightning.functional.interval.leakage_interval`, method.md section 3 "The
    uncertainty interval").

    The bootstrap draws (cell statistics re-evaluated around ``theta_hat + sigma * xi``) feed
    the averaged regime; each uses the Gaussian form, rescaled by the ratio of the chosen
    method's value to the Gaussian form at ``theta_hat`` when that is Monte Carlo; one
    coordinate uses the exact form. With stored influences the coarse weights' range over a
    confidence box of their population values decides the regime and, when few weights carry
    it, is the interval. ``leakage`` and ``record_se`` are the independent form's (that of the
    draws). With a correlation ``rc`` (the correlated headline, value ``correlated_value``,
    record error ``correlated_se``) the position-dominated ends are computed with it
    (``Interval.correlated``); otherwise (averaged regime too) the interval is of the
    independent form and the caller carries it over by the ratio."""
    if prep.num_draws == 0:
        return None
    draw_noise = 0.0
    if chosen == "exact1d" and est.influence_stored:
        lam_draws = prep.lam_draws[est.names[0]]
        vals = [float(F.exact1d_leakage(est.influence[:, 0], lam_b, est.n).mean()) for lam_b in lam_draws]
    else:
        scale = leakage / clt_value if chosen == "mc" and clt_value > 0 else 1.0
        D = prep.num_draws
        s2 = _summed_s2((torch.stack([sums[name][idx + 1 + b].s2 for b in range(D)]) for name in est.names),
                        D, est.num_records)
        vals = [scale * v for v in _row_leakage_means(s2, est.n)]
        draw_noise = scale * _draw_sample_noise(est, prep, sums, idx)
    # The range over where the population weights sit in their cells (few coarse weights)
    # or the widened bootstrap spread (many): functional.interval, method.md section 3.
    coarse = _coarse_inputs(est, prep, chosen) if est.influence_stored else {}
    index = coarse.pop("index", None)
    ends = None
    if rc is not None and index is not None and est.influence is not None:
        ends = F.interval.CorrelatedEnds(rc, est.influence, _kappa_vector(est, prep.kappa), index,
                                         _unquantized_mean_abs(est, rc), value=correlated_value,
                                         record_se=correlated_se)
    mc_draws = int(min(4096, max(256, MC_BUFFER // max(est.num_records, 1))))
    return F.interval.leakage_interval(
        leakage, record_se, est.n, draws=torch.tensor(vals, dtype=torch.float64), method=chosen,
        mc_draws=mc_draws, generator=torch.Generator().manual_seed(7919), correlated=ends, draw_noise=draw_noise,
        **coarse)


def _draw_sample_noise(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]], idx: int) -> float:
    """Standard error (leakage units, Gaussian form) of the bootstrap draws' centre that the
    subsampled draws add (0 when no parameter's draws were subsampled): the random-group
    estimate over the ``G = DRAW_SAMPLE_GROUPS`` groups of the sampled rows, each group's own
    Horvitz-Thompson estimate ``G * group`` of the sampled parameters' centre sums replacing
    theirs, ``sqrt(sum_g (L_g - mean L)^2 / (G (G - 1)))``."""
    if not prep.draw_groups or prep.num_draws < 2:
        return 0.0
    R, G, D = est.num_records, DRAW_SAMPLE_GROUPS, prep.num_draws
    half = (D + 1) // 2  # draw `half` is draw 0's antithetic partner (_built_mix): their mean is the centre
    per_layer = []  # [G, R] (or [R], the same in every group) per layer
    for name in est.names:
        s2 = 0.5 * (sums[name][idx + 1].s2 + sums[name][idx + 1 + half].s2)
        grp = prep.draw_groups.get(name)
        if grp is not None:
            s2 = s2 + G * grp.T - grp.sum(1)  # group g's row: the same operations as on its column
        per_layer.append(s2)
    t = torch.tensor(_row_leakage_means(_summed_s2(per_layer, G, R), est.n), dtype=torch.float64)
    return float(((t - t.mean()).square().sum() / (G * (G - 1))).sqrt())


def _coarse_inputs(est: Estimate, prep: _Prepared, chosen: str) -> dict[str, Tensor | None]:
    """``theta, sigma, boundaries, influence`` of the quantized weights whose cell statistics
    depend on their position (``kappa < FINE_KAPPA``), their global ``index``, and
    ``gaussian_s2`` of all the others."""
    assert est.influence_stored
    gauss = torch.zeros(est.num_records, dtype=torch.float64)
    th_p, sg_p, b_p, w_p, i_p, bs_p = [], [], [], [], [], []
    for name in est.names:
        s, e = est.offsets[name]
        w = est.influence[:, s:e].to(torch.float64)
        if name not in prep.grids or name not in prep.kappa:
            gauss += w.square().sum(-1)
            continue
        k = prep.kappa[name].double()
        fine = k >= F.FINE_KAPPA
        gauss += w[:, fine].square() @ k[fine]
        idx = torch.nonzero(~fine).squeeze(-1)
        th, sg = est.theta[name], est.sigma[name]
        g = prep.grids[name]
        for ii, edges, narrow in F.coarse_chunks(
                idx, th, sg, lambda lo, hi, g=g, th=th: g.boundaries(th[lo:hi], lo, hi, F.MC_HALF_WINDOW),
                DEFAULT_CHUNK):
            gauss += w[:, narrow].square() @ k[narrow]  # fine cells, clipped: Gaussian
            if ii.numel() == 0:
                continue
            b_p.append(edges)
            th_p.append(th[ii].double())
            sg_p.append(sg[ii].double())
            w_p.append(w[:, ii])
            i_p.append(ii + s)
            bs_p.append(_grid_relative_sd(g, th, sg, w, ii))
    if not th_p:
        return {"theta": torch.zeros(0, dtype=torch.float64), "index": torch.zeros(0, dtype=torch.long)}
    return {"theta": torch.cat(th_p), "sigma": torch.cat(sg_p), "boundaries": torch.cat(b_p),
            "influence": torch.cat(w_p, 1), "gaussian_s2": None if chosen == "exact1d" else gauss,
            "index": torch.cat(i_p), "box_sigma": torch.cat(bs_p)}


def _grid_relative_sd(grid: ParamGrid, theta: Tensor, sigma: Tensor, w: Tensor, ii: Tensor) -> Tensor:
    """``[k]`` standard deviation of the coarse weights ``ii``'s positions relative to their
    released grid (parameter units; method.md section 3, "The uncertainty interval").

    A fixed grid: ``sigma``. A grid whose range ``[lo, hi]`` follows the weights (absmax:
    ``[-m, m]``; min/max: ``[min(w_min, 0), max(w_max, 0)]``, :meth:`ParamGrid.scale_setters`)
    places weight ``j`` at ``u_j = (theta_j - lo) / (hi - lo)`` of it, whose error in parameter
    units is ``e_j - (1 - u_j) e_lo - u_j e_hi`` (``e`` the estimation errors; an end at 0 has
    none): its variance from the sds and the correlations of the standardised influences
    ``w`` (absmax: ``sigma_j^2 + r_j^2 sigma_m^2 - 2 r_j sigma_j sigma_m rho_jm``, ``r_j =
    theta_j / m``). Never below ``sigma_j`` (the box stays at least the fixed-grid one)."""
    sg = sigma[ii].to(torch.float64)
    if grid.scale_rule not in ("absmax", "minmax"):
        return sg
    lo_i, lo_s, hi_i, hi_s = (t[ii] for t in grid.scale_setters(theta))
    th64 = theta.reshape(-1).to(torch.float64)
    sig64 = sigma.reshape(-1).to(torch.float64)
    lo, hi = lo_s * th64[lo_i], hi_s * th64[hi_i]
    u = (th64[ii] - lo) / (hi - lo).clamp_min(1e-300)
    # e_j - (1 - u) lo_s e[lo_i] - u hi_s e[hi_i]: coefficients on three columns of w
    cols = torch.stack([ii, lo_i, hi_i])                                   # [3, k]
    coef = torch.stack([torch.ones_like(u), -(1.0 - u) * lo_s, -u * hi_s]) * sig64[cols]
    W = w.to(torch.float64)
    Wn = W / W.square().mean(0).sqrt().clamp_min(1e-300)                   # unit mean square
    # Var = sum_ab coef_a coef_b rho_ab, rho_ab = mean_r Wn[r, a] Wn[r, b]
    comb = (Wn[:, cols] * coef.unsqueeze(0)).sum(1)                        # [R, k]
    var = comb.square().mean(0)
    return var.clamp_min(0.0).sqrt().maximum(sg)


def _coarse_cells(est: Estimate, prep: _Prepared, kvec: Tensor, sigma_scale: float
                  ) -> tuple[Tensor, F.CellStatistics | None, Tensor]:
    """Global indices ``[c]`` of the coarse quantized weights (``kappa`` in the Monte Carlo
    form's coarse range), their cell statistics and standardised cell edges ``[c, K+1]``, the
    cells read at ``sigma / sigma_scale``."""
    idx_all, th_p, sg_p, b_p = [], [], [], []
    for name in est.names:
        g = prep.grids.get(name)
        if g is None or name not in prep.kappa:
            continue
        s, e = est.offsets[name]
        idx = torch.nonzero(F.coarse_mask(kvec[s:e])).squeeze(-1)
        th, sg = est.theta[name], est.sigma[name] / sigma_scale
        for ii, edges, _ in F.coarse_chunks(  # the narrow ones: the Gaussian channel
                idx, th, sg, lambda lo, hi, g=g, th=th: g.boundaries(th[lo:hi], lo, hi, F.MC_HALF_WINDOW),
                DEFAULT_CHUNK):
            if ii.numel() == 0:
                continue
            b_p.append(edges)
            th_p.append(th[ii].double())
            sg_p.append(sg[ii].double())
            idx_all.append(ii + s)
    if not idx_all:
        return torch.zeros(0, dtype=torch.long), None, torch.zeros(0, 0, dtype=torch.float64)
    th, sg, edges = torch.cat(th_p), torch.cat(sg_p), torch.cat(b_p).to(torch.float64)
    stats = F.cell_statistics(th, sg, edges, validate=False)
    alpha = (edges - th.unsqueeze(-1)) / sg.clamp_min(1e-300).unsqueeze(-1)
    return torch.cat(idx_all), stats, alpha


# Flops one correlated Monte Carlo evaluation may cost (draws x d x (d + records)).
CORRELATED_MC_FLOPS = 4_000_000_000


def _correlated_leakage(est: Estimate, prep: _Prepared, rc: F.correlated.RecordCorrelation, kvec: Tensor,
                        chosen: str, draws: int, gen: torch.Generator, sigma_scale: float, n: float,
                        notes: list[str] | None = None) -> Tensor:
    """``[R]`` leakage with the correlation of the weights (functional/correlated.py): the
    Gaussian form, or, where the independent form would use Monte Carlo and some weight is
    coarse, jointly drawn cells; capped by the unquantized value (conditional Jensen).
    ``notes``: the row's notes, told where the Monte Carlo form gave way to the Gaussian one."""
    assert est.influence is not None
    W = est.influence
    if bool((kvec == 1.0).all()):  # nothing quantized: the unquantized (Mahalanobis) form
        return F.saturate(_unquantized_mean_abs(est, rc) / (2 * math.sqrt(n)))
    if chosen == "mc":
        idx, stats, alpha = _coarse_cells(est, prep, kvec, sigma_scale)
        if stats is not None and rc.kind == "full" and idx.numel() <= F.correlated.EXACT_MAX_COARSE:
            # few coarse weights: their joint boxes exactly (GHK), the rest through the channel
            try:
                mean_abs, _ = F.correlated.exact_box_mean_abs(rc.parts[0][1], W, kvec, idx, alpha, generator=gen)
            except torch.linalg.LinAlgError as exc:  # a degenerate block: the copula form below
                log.warning("exact box-mean form failed (%s); using the copula Monte Carlo form", exc)
            else:
                cap = _unquantized_mean_abs(est, rc)
                return F.saturate(torch.minimum(mean_abs, cap) / (2 * math.sqrt(n)))
        if stats is not None:
            d, R = est.d, est.num_records
            draws = int(max(F.leakage.MIN_MC_DRAWS, min(draws, CORRELATED_MC_FLOPS // max(d * (d + R), 1))))
            mean_abs = rc.mc_mean_abs(W, kvec, idx, stats, draws, gen)
            cap = _unquantized_mean_abs(est, rc)
            if bool(torch.isfinite(mean_abs).all()):
                return F.saturate(torch.minimum(mean_abs, cap) / (2 * math.sqrt(n)))
            # a near-singular correlation (most of the Hessian's spectrum floored, d ~ n) can
            # leave the jointly drawn cells without a finite value: the Gaussian form below
            lost = int((~torch.isfinite(mean_abs)).sum())
            log.warning("correlated Monte Carlo form not finite for %d of %d records; using the Gaussian form",
                        lost, mean_abs.numel())
            if notes is not None:  # (its weights not certified, Correlation.coefficients, or cells not drawn)
                notes.append(f"correlated Monte Carlo form not finite for {lost} of {mean_abs.numel()} records "
                             "(its weights could not be had in float64, or its cells drawn): the Gaussian form")
    # capped like the forms above: per record, no release leaks more than the unquantized one
    # (the two agree unless the Hessian is singular; the report warns then)
    cap = _unquantized_mean_abs(est, rc)
    return F.saturate(torch.minimum(rc.gaussian_mean_abs(W, kvec), cap) / (2 * math.sqrt(n)))


def _pool_leakage(est: Estimate, prep: _Prepared, sums: dict[str, list[F.CltSums]], idx: int, chosen: str,
                  draws: int, gen: torch.Generator, chunk: int,
                  rc: F.correlated.RecordCorrelation | None) -> float:
    """The leakage in the pool protocol of reference-model audits (method.md section 3, "Pool
    protocol"): the same forms with the cells read at ``sigma / sqrt(2)`` and ``n / 2`` in
    the shift's scale."""
    n_pool = est.n / 2
    if chosen == "exact1d":
        name = est.names[0]
        assert est.influence is not None
        lam = prep.lam_pool.get(name, torch.tensor([F.cells.SQRT_2_OVER_PI], dtype=torch.float64))
        return float(F.exact1d_leakage(est.influence[:, 0], lam, n_pool).mean())
    if rc is not None:
        kvec = _kappa_vector(est, prep.kappa_pool)
        return float(_correlated_leakage(est, prep, rc, kvec, chosen, draws, gen, POOL_SIGMA_RATIO, n_pool).mean())
    if chosen == "mc" and est.influence_stored:
        kappas = {name: (prep.kappa_pool[name].double() if name in prep.kappa_pool else None) for name in est.names}
        return float(_mc_leakage(est, prep.grids, kappas, draws, gen, chunk, names=est.names,
                                 sigma_scale=POOL_SIGMA_RATIO, n=n_pool).mean())
    pool_col = idx + 1 + prep.num_draws
    return float(_total({name: sums[name][pool_col] for name in est.names}, est.num_records).leakage(n_pool).mean())
