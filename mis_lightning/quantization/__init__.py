"""Quantization schemes: the registry, the scheme protocol and the backends.

``available_schemes()`` lists the registered names; ``get_scheme(name)`` builds one.
"""

from .base import (
    NoQuantization,
    ParamGrid,
    QuantizationResult,
    QuantizationScheme,
    SchemeError,
    SchemeUnavailableError,
    check_float_model,
)
from .registry import available_schemes, get_scheme, register_scheme

register_scheme("none", lambda **kw: NoQuantization(**kw))

__all__ = [
    "NoQuantization",
    "ParamGrid",
    "QuantizationResult",
    "QuantizationScheme",
    "SchemeError",
    "SchemeUnavailableError",
    "available_schemes",
    "check_float_model",
    "get_scheme",
    "register_scheme",
]
