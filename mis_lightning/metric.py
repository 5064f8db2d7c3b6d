"""``MISIndicator``: membership-inference security of quantized releases as a torchmetrics Metric.

The Metric's states are the sufficient statistics of the estimation pass (method.md
section 4): per-sample gradient sums and sums of squares, Hessian-diagonal sums (exact,
Gauss-Newton or Hutchinson), the record count and the squared gradient norm (all
``dist_reduce_fx="sum"``), the ``d x d`` sums of ``g g^T`` and of the Hessian in exact mode
(``"sum"``), and the stored records of the per-record term (``"cat"``). They are filled by
:class:`~mis_lightning.estimation.estimate.MomentAccumulator`, the same code that
:func:`~mis_lightning.estimation.estimate` runs, and ``compute()`` finalizes them into an
:class:`~mis_lightning.estimation.Estimate` and scores every scheme with
:func:`mis_lightning.assess.score_schemes`. The streaming part (states, sync, pickling) is
:class:`~mis_lightning.streaming.EstimationMetric`, which this Metric extends.

Distributed use (DDP): each process calls ``update`` on its shard; ``compute()`` (after
torchmetrics' sync) gives every process the same result, equal to one process over all the
data up to floating-point summation order (about 1e-12 relative in float64):

* the sums are partition-invariant;
* the records of the per-record term are chosen by a **bottom-k content hash**: each
  process keeps the ``num_records`` records with the smallest hash of their bytes
  (:func:`~mis_lightning.estimation.estimate.record_keys`), the kept sets are concatenated
  on sync and reduced to the global ``num_records`` smallest, sorted by hash. That is the
  same set, in the same order, however the data was split over processes and batches (a
  pseudo-random subsample of the training records, not "the first ones"). For models with
  ``num_records * d <= budget`` the per-sample gradients of those records are stored;
  otherwise the records themselves (tensor inputs and targets only) and their influences are
  recomputed at ``compute()``;
* a Hutchinson Hessian (large models without a cheap diagonal) draws random probes per
  batch, so its value depends on the batching: that mode is reproducible for a fixed
  split, not across splits.

Duplicated records (a ``DistributedSampler`` pads the last shard with repeats) are counted
twice: pass each record once (the Lightning callback streams an unpadded shard per process).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities.prints import rank_zero_only

from ._precision import full_float32
from ._user_warnings import warn
from ._warning_lines import MORE
from .assess import (
    SchemeSpec,
    check_schemes,
    check_utility_metric,
    resolve_schemes,
    score_schemes,
    select_params,
)
from .config import EstimationConfig, ScoringConfig, stage_configs
from .estimation.per_sample import BatchFn, LossFn
from .progress import ProgressFn
from .quantization import QuantizationScheme
from .record_count import records_read, records_read_note
from .report import Report, undetermined_headline
from .streaming import HOOK_NAME, EstimationMetric, default_schemes, hook_program

log = logging.getLogger(__name__)

__all__ = ["HOOK_NAME", "MISIndicator", "default_schemes", "hook_program", "report_summary"]


def _t(x: float) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


#: a report warning is raised again by a later ``compute`` only if its opening (this many
#: characters, before the figures it quotes) differs from every one raised before
WARNING_KEY_CHARS = 60
#: appended to the last of ``compute``'s one-line warnings that leaves text out (nux51 #9)
IN_FULL = "; these warnings in full: print(metric.report.warnings_text())"


def report_summary(report: Report) -> dict[str, dict[str, Any]]:
    """``{scheme: {leakage, mis, baseline_leakage, d_eff, d, leakage_p10, leakage_p90, indicative,
    undetermined, layers, [error]}}`` with 0-d float64 tensors (NaN for a failed scheme; ``leakage_p10`` /
    ``leakage_p90`` NaN where a scheme has no interval: the unquantized ``none``,
    ``uncertainty_draws=0``), the same keys for every scheme (a loop over the entries met a
    KeyError at ``none``). ``indicative``: 1 where the table marks the leakage ``*`` (outside the
    analysis's assumptions); ``undetermined``: 1 where it reads ``undet.`` after the baseline (the
    headline set by the rank rule: no figure ranks a scheme); else 0: the marks the tensors would
    otherwise drop, as the trackers' keys carry them (:mod:`mis_lightning.tracking`).

    Raises:
        Nothing for a report built by the pipeline.
    """
    out: dict[str, dict[str, Any]] = {}
    rows = {r["scheme"]: r for r in report.rows()}
    undetermined = 1.0 if undetermined_headline(rows.values()) else 0.0
    for name, s in report.schemes.items():
        entry: dict[str, Any] = {
            "leakage": _t(s.leakage), "mis": _t(s.mis), "baseline_leakage": _t(s.baseline_leakage),
            "d_eff": _t(s.d_eff), "d": _t(s.d),
            "indicative": _t(1.0 if rows[name].get("indicative") else 0.0), "undetermined": _t(undetermined),
            "layers": {ln: {"leakage": _t(lr.leakage), "mis": _t(lr.mis), "d_eff": _t(lr.d_eff),
                            "baseline_leakage": _t(lr.baseline_leakage)} for ln, lr in s.layers.items()},
        }
        lo, hi = (math.nan, math.nan) if s.interval is None else s.interval
        entry["leakage_p10"], entry["leakage_p90"] = _t(lo), _t(hi)
        if s.error:
            entry["error"] = s.error
        out[name] = entry
    return out


class MISIndicator(EstimationMetric):
    """Membership-inference security (MIS = 1 - best attack advantage) of quantized releases.

    ``update`` streams the training records (each once) through the estimation pass;
    ``compute`` returns, per scheme::

        {"int8_weight_only": {"leakage": tensor, "mis": tensor, "baseline_leakage": tensor,
                              "d_eff": tensor, "d": tensor, "leakage_p10": ..., "leakage_p90": ...,
                              "indicative": 0 or 1 (the table's *), "undetermined": 0 or 1 (undet.),
                              "layers": {param_name: {"leakage", "mis", "d_eff", "baseline_leakage"}}},
         ...}

    (0-d float64 tensors, dimensionless) and keeps the full
    :class:`~mis_lightning.report.Report` as ``metric.report``.

    Args:
        model: the trained model. Held by reference (not a submodule: the Metric never moves,
            copies or serialises it, and its parameters are not in the Metric's
            ``state_dict``). Its weights are read at the first ``update`` after construction
            or ``reset()``; do not train it while accumulating.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (the data term of the
            training objective). Default: ``model.mis_per_sample_loss(batch)`` if the model
            defines it (batches are then passed whole to the hook), else
            ``model.per_sample_loss``.
        schemes: registry names or scheme objects (default :func:`default_schemes`).
        estimation_config, scoring_config: the stages' options
            (:class:`~mis_lightning.config.EstimationConfig`,
            :class:`~mis_lightning.config.ScoringConfig`; here ``strict`` defaults to
            ``False``: a failing scheme gets NaN figures and its error). The records of the
            per-record term are the ``num_records`` smallest content hashes (module docstring).
        batch_fn: ``batch -> (inputs, targets)`` for ``update(batch)`` with other layouts.
        utility_fn: ``utility_fn(quantized_copy) -> {name: value}``, recorded per scheme.
        progress: ``progress("schemes", i)`` hook during ``compute`` (see
            :mod:`mis_lightning.progress`).
        num_training_records: the number of training records the stream will hold, when known:
            ``estimation="auto"`` weighs the exact sandwich's cost by it, as ``assess`` does with
            ``len(dataset)`` (``None`` assumes 10,000; the same data then may get another
            estimator than ``assess`` gives it); and the K-FAC correction's factors sum a sample
            of the records by content (the same figure whatever the order and the DDP split)
            only when it is given (else the first records read, and the report warns). Under
            DDP: the records of every process together.
        options: fields of either config by name (``estimation="exact"``, ``num_records=64``,
            ``method="mc"``, ...), then torchmetrics ``Metric`` options (``process_group``,
            ``sync_on_compute``, ...).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``loss_fn`` or ``batch_fn`` is not callable.
        TypeError: an option that is neither a config field nor a torchmetrics option (named,
            with the closest known names).
        ValueError: an invalid option (named), no usable loss, an empty scheme list.
        KeyError: an unknown scheme or parameter name.

    ``forward(...)`` only updates (returns ``None``): a value per batch would rerun the whole
    scoring each step. ``compute()`` is nested (``{scheme: {figure: value, "layers": ...}}``):
    for ``self.log_dict`` or a logger take the flat keys of
    ``mis_lightning.tracking.report_metrics(metric.report, prefix)``; in a torchmetrics
    ``MetricCollection`` the schemes become top-level keys (one MISIndicator per collection).

    Example:

    >>> import torch
    >>> from mis_lightning import MISIndicator
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(120, 2, generator=g)
    >>> y = x @ torch.tensor([1.0, -1.0]) + 0.3 * torch.randn(120, generator=g)
    >>> model = torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     sol = torch.linalg.lstsq(torch.cat([x, torch.ones(120, 1)], 1), y[:, None]).solution
    ...     _ = model.weight.copy_(sol[:2].T), model.bias.copy_(sol[2])
    >>> metric = MISIndicator(model, lambda out, t: (out[:, 0] - t) ** 2, ["rtn_int8"],
    ...                       num_records=32, uncertainty_draws=0)
    >>> for a in range(0, 120, 40):
    ...     metric.update(x[a:a + 40], y[a:a + 40])
    >>> out = metric.compute()
    >>> sorted(out["rtn_int8"])[:5], metric.report.n
    (['baseline_leakage', 'd', 'd_eff', 'indicative', 'layers'], 120)
    >>> bool(0.0 <= out["rtn_int8"]["mis"] <= 1.0)
    True
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        schemes: SchemeSpec | Sequence[SchemeSpec] | None = None,
        *,
        estimation_config: EstimationConfig | None = None,
        scoring_config: ScoringConfig | None = None,
        batch_fn: BatchFn | None = None,
        utility_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        progress: ProgressFn | None = None,
        num_training_records: int | None = None,
        **options: Any,
    ) -> None:
        est_cfg, sc_cfg, metric_kwargs = stage_configs(
            "MISIndicator", estimation_config, scoring_config, options, defaults={"strict": False})
        super().__init__(model, loss_fn, estimation_config=est_cfg, seed=sc_cfg.seed,
                         batch_fn=batch_fn, num_training_records=num_training_records, **metric_kwargs)
        # fails early on [] and unknown names
        self.schemes = resolve_schemes(default_schemes() if schemes is None else schemes)
        problems = check_schemes(model, self.schemes, strict=sc_cfg.strict, availability=True,
                                 params=select_params(model, est_cfg.params))
        for msg in problems:  # before any update (every scheme such: refused, SchemeError)
            warn(f"MISIndicator: {msg}", rank_zero=rank_zero_only)
        # the verdict's utility metric: its direction known (utility_fn's names are known when it runs)
        check_utility_metric(sc_cfg, None, known_names=False)
        for s in self.schemes:  # a calibrated scheme by name: the Metric sees no loader to calibrate on
            data_dependent = type(s).calibrate is not QuantizationScheme.calibrate  # data-free ones return self
            if data_dependent and hasattr(s, "calibration") and not s.calibration \
                    and not getattr(s, "calibration_error", None) \
                    and not any(f"scheme {s.name!r}" in msg for msg in problems):
                warn(f"MISIndicator: scheme {s.name!r} needs calibration batches, which a Metric does not see: "
                     f"pass get_scheme({s.name!r}).calibrate(model, train_loader) (it will be reported as a failed "
                     "scheme)", rank_zero=rank_zero_only)
        self.scoring_config, self.utility_fn, self.progress = sc_cfg, utility_fn, progress
        self.num_training_records = num_training_records
        self.report: Report | None = None
        # the report's warnings already raised (by their opening): a validation loop computing every
        # epoch says each caveat once, not once an epoch
        self._warned: set[str] = set()

    @full_float32
    def compute(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        """Score every scheme from the synced estimate; ``{scheme: {figure: 0-d tensor}}``.
        The report's warnings (``self.report.warnings``) are raised as ``UserWarning``s prefixed
        ``MISIndicator:`` on rank zero, each by its first sentence, those the table's ``*`` stands
        for in one line (:meth:`~mis_lightning.report.Report.console_warnings`; in full:
        ``self.report.warnings_text()``), each caveat once per Metric (:data:`WARNING_KEY_CHARS`),
        shown at the caller's line (``metric.compute()``); its notes (``self.report.notes``:
        information) are logged instead (INFO, logger ``mis_lightning.metric``).

        Raises:
            ValueError: fewer than 4 records, or (``strict``) a failing scheme's error.
        """
        with torch.inference_mode(False):
            est = self.estimate()
            self.report = score_schemes(
                est, self.model, self.schemes, scoring_config=self.scoring_config,
                utility_fn=self.utility_fn, progress=self.progress,
            )
        counted = self._records_note(est)
        if counted:
            self.report.warnings.insert(0, counted)
        # the figures' caveats (not at a minimum, d / n not small, weights left in float, ...) are
        # raised as warnings, as the callback prints them: the returned tensors carry none of them
        new: list[str] = []
        for msg in [*self.report.warnings, *self.report.notes]:
            if msg[:WARNING_KEY_CHARS] not in self._warned:
                self._warned.add(msg[:WARNING_KEY_CHARS])
                if msg in self.report.notes:  # information, not a problem: logged (INFO), as the callback does
                    if rank_zero_only.rank == 0:
                        log.info("MISIndicator: %s", msg)
                else:
                    new.append(msg)
        # one line each, the full text in the report (nux51 #9); those the table's * stands for in one (nux55)
        said = self.report.console_warnings(new)
        cut = [i for i, line in enumerate(said) if line.endswith(MORE)]
        if cut:  # the last line that leaves text out says where it is (the INFO log is not shown by default)
            said[cut[-1]] += IN_FULL
        for line in said:
            warn(f"MISIndicator: {line}", rank_zero=rank_zero_only)
        return report_summary(self.report)

    def _records_note(self, est: Any) -> str | None:
        """The warning where the updates held another number of records than
        ``num_training_records`` states (:func:`~mis_lightning.record_count.records_read_note`),
        with the Metric's likely causes: the torchmetrics habit of updating every epoch without
        ``reset()`` feeds each record again (a CNN fed twice read 0.31x the figure of one
        pass), a ``drop_last`` loader or a sampler leaves records out, and a DDP process computed
        alone counts its shard only."""
        stated = getattr(self, "num_training_records", None)  # a Metric pickled before nux47 lacks it
        if not stated:
            return None
        read = records_read(est)
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 1
        if read < stated and world > 1 and not getattr(self, "sync_on_compute", True):
            causes = f"sync_on_compute=False: this process's updates alone, of {world} processes"
        # the likely cause first, short: the console shows the first sentence (warning_line)
        elif read > stated:
            causes = ("records fed more than once (updates without reset()?). An update every epoch, or every "
                      "validation run, without reset() feeds them again: call reset() before each pass over the "
                      "training records; or num_training_records is not every process's records together, padding "
                      "included")
        else:
            causes = ("the updates left records out (drop_last=True? a sampler?). A loader with drop_last=True or a "
                      "sampler over part of the data leaves records out; or num_training_records is not every "
                      "process's records together")
        return records_read_note(read, stated, "num_training_records", causes=causes)

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """MIS per scheme (a point each, higher is better); ``val`` = a ``compute()`` result."""
        val = self.compute() if val is None else val
        if isinstance(val, Sequence):
            flat: Any = [{k: v["mis"] for k, v in x.items()} for x in val]
        else:
            flat = {k: v["mis"] for k, v in val.items() if not math.isnan(float(v["mis"]))}
        return self._plot(flat, ax)
