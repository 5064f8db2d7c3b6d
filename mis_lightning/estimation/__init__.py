"""Estimation of ``sigma_j`` and the standardised influences ``w(z)`` (method.md section 4)."""

from .estimate import EXACT_MAX_PARAMS, Estimate, estimate
from .per_sample import LossProgram, default_batch_fn

__all__ = ["EXACT_MAX_PARAMS", "Estimate", "LossProgram", "default_batch_fn", "estimate"]
