"""Deprecated: renamed :mod:`mis_lightning.evaluation` (same names)."""

import warnings

from .evaluation import BatchLoss, OutputTransform, evaluate_utility, to_device  # noqa: F401

warnings.warn("mis_lightning.utility is deprecated, import mis_lightning.evaluation",
              DeprecationWarning, stacklevel=2)
