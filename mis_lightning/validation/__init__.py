"""Deprecated name of :mod:`mis_lightning.groundtruth` (renamed: "validation" reads as
Lightning's validation loop). ``mis_lightning.validation.compare`` etc. still import, with a
``DeprecationWarning``."""

import importlib
import sys
import warnings

warnings.warn("mis_lightning.validation is deprecated: use mis_lightning.groundtruth",
              DeprecationWarning, stacklevel=2)

for _name in ("attacks", "compare", "ground_truth"):
    _module = importlib.import_module(f"mis_lightning.groundtruth.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
