"""Quantization schemes: the registry, the scheme protocol and the backends.

``available_schemes()`` lists the registered names; ``get_scheme(name)`` builds one. A
backend is one module: schemes as frozen dataclasses (:class:`SchemeConfig`), registered
with :func:`register_scheme`; the modules of this package and the ``mis_lightning.schemes``
entry points of other packages are found automatically (see :mod:`.registry`).
"""

from .base import (
    NoQuantization,
    ParamGrid,
    QuantizationResult,
    QuantizationScheme,
    SchemeConfig,
    SchemeError,
    SchemeUnavailableError,
    affine_grid,
    check_float_model,
)
from .registry import (
    UnknownSchemeError,
    available_schemes,
    deprecated_aliases,
    get_scheme,
    register_alias,
    register_scheme,
)

register_scheme(NoQuantization())

__all__ = [
    "NoQuantization",
    "ParamGrid",
    "QuantizationResult",
    "QuantizationScheme",
    "SchemeConfig",
    "SchemeError",
    "SchemeUnavailableError",
    "UnknownSchemeError",
    "affine_grid",
    "available_schemes",
    "check_float_model",
    "deprecated_aliases",
    "get_scheme",
    "register_alias",
    "register_scheme",
]
