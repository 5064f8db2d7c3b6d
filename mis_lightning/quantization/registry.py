"""The scheme registry: public names -> scheme factories.

Backends register their schemes at import time; ``available_schemes()`` lists the names
(a public contract: configs, reports and outside checks use them).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from .base import QuantizationScheme

SchemeFactory = Callable[..., QuantizationScheme]
_FACTORIES: dict[str, SchemeFactory] = {}


def register_scheme(name: str, factory: SchemeFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> QuantizationScheme`` under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"scheme name must be a non-empty string, got {name!r}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"scheme {name!r} is already registered (pass overwrite=True to replace it)")
    _FACTORIES[name] = factory


def available_schemes() -> list[str]:
    """Registered scheme names, sorted."""
    _load_backends()
    return sorted(_FACTORIES)


def get_scheme(spec: str | QuantizationScheme, **kwargs: Any) -> QuantizationScheme:
    """A scheme object from a registry name (with optional keyword overrides) or a scheme."""
    if isinstance(spec, QuantizationScheme):
        if kwargs:
            raise TypeError("keyword overrides apply to registry names, not to scheme objects")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a scheme is a registry name or a QuantizationScheme, got {type(spec).__name__}")
    _load_backends()
    if spec not in _FACTORIES:
        close = difflib.get_close_matches(spec, _FACTORIES, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(
            f"unknown quantization scheme {spec!r}{hint}; available schemes: {', '.join(sorted(_FACTORIES))}"
        )
    scheme = _FACTORIES[spec](**kwargs)
    scheme.name = spec if not kwargs else scheme.name
    return scheme


def scheme_list(schemes: str | QuantizationScheme | Iterable[str | QuantizationScheme]) -> list:
    """The schemes to assess as a list, checked not empty (shared by ``assess``, ``score``,
    ``MISIndicator`` and ``MISCallback``).

    Args:
        schemes: one registry name or scheme object, or an iterable of them.

    Returns:
        ``list`` of the names / scheme objects, in order (not resolved).

    Raises:
        ValueError: ``schemes`` is empty (an assessment of no scheme would be an empty report).
        TypeError: ``schemes`` is neither a name, a scheme nor an iterable of them.
    """
    if isinstance(schemes, (str, QuantizationScheme)):
        return [schemes]
    if not isinstance(schemes, Iterable):
        raise TypeError(f"schemes must be a registry name, a QuantizationScheme or a list of them, "
                        f"got {type(schemes).__name__}: {schemes!r}")
    out = list(schemes)
    if not out:
        raise ValueError(
            "schemes is empty: name at least one quantization scheme, e.g. ['int8_weight_only', "
            "'int4_weight_only'] (mis_lightning.quantization.available_schemes() lists them)"
        )
    return out


_LOADED = False


def _load_backends() -> None:
    """Import the backend modules so that they register their schemes (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for mod in ("rtn", "torchao_backend", "native", "casts"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            # Only a missing *backend module* of ours is tolerated (while it is being
            # written); a missing third-party dependency is reported by the scheme itself.
            if exc.name != f"{__package__}.{mod}":
                raise
