"""OmegaConf resolvers of the app (strings only: never return torch objects from a resolver).

``${mis_job_subdir:${hydra.job.num},${hydra.runtime.choices.quantizer},${hydra.job.override_dirname}}``
names a multirun job's folder: ``<num>_<scheme>`` when the sweep selects a ``quantizer``,
else ``<num>_<overrides>`` (``/`` replaced), else ``<num>``.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

__all__ = ["job_subdir", "register_resolvers"]


def job_subdir(num: Any, scheme: Any = None, overrides: Any = None) -> str:
    """``0_int4_weight_only``, ``3_seed=1,data.d=16`` or ``5`` (safe as one path component)."""
    label = scheme if scheme not in (None, "", "None", "null") else overrides
    label = re.sub(r"[/\\\s]+", "_", str(label or "")).strip("_")[:120]
    return f"{num}_{label}" if label else str(num)


def register_resolvers() -> None:
    """Register the app's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("mis_job_subdir", job_subdir, replace=True)
