"""mis-lightning: membership-inference security (MIS) of post-training-quantized models.

Public API: :func:`assess`, :func:`plan` (per-layer quantization planner), :class:`MISCallback` (Lightning), :class:`MISIndicator`
(torchmetrics), :mod:`mis_lightning.functional` (the math), and the scheme registry
:mod:`mis_lightning.quantization` (``available_schemes``, ``get_scheme``, ``register_scheme``,
:class:`MixedPrecisionScheme`); the errors the README and docs/report.md name: :class:`SchemeError` (a scheme that
cannot quantize a layer), :class:`ModelCopyError` (a model the assessment cannot copy or substitute).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from . import functional, quantization
from ._modelcopy import ModelCopyError
from .assess import assess, score, score_schemes
from .config import EstimationConfig, ScoringConfig
from .planning import PlanConfig, PlanResult, plan
from .quantization import SchemeError, available_schemes, get_scheme, register_scheme
from .quantization.mixed import MixedPrecisionScheme
from .report import Report, SchemeResult

__version__ = "0.1.0"

__all__ = [
    "MISCallback",
    "MixedPrecisionScheme",
    "ModelCopyError",
    "SchemeError",
    "MISIndicator",
    "Report",
    "SchemeResult",
    "assess",
    "available_schemes",
    "functional",
    "get_scheme",
    "quantization",
    "register_scheme",
    "score",
    "score_schemes",
    "EstimationConfig",
    "ScoringConfig",
    "PlanConfig",
    "PlanResult",
    "plan",
]


def __getattr__(name: str) -> Any:
    # The Lightning and torchmetrics front ends are imported on first use, so that the
    # core (functional, assess) imports without loading Lightning.
    if name == "MISCallback":
        from .callback import MISCallback

        return MISCallback
    if name == "MISIndicator":
        from .metric import MISIndicator

        return MISIndicator
    # Submodules as attributes (``mis_lightning.utility.evaluate_utility`` after a plain
    # ``import mis_lightning``), imported on first use like the front ends (PEP 562): an
    # attribute error would otherwise depend on which submodules something imported earlier.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mis_lightning' has no attribute {name!r}")


_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__))
