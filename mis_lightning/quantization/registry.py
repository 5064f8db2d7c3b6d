"""The scheme registry: public names -> scheme factories, discovered automatically.

Backends register their schemes when they are imported; nothing lists them by hand. The
first look-up imports (once):

1. every module of the ``mis_lightning.quantization`` package (a package scan: a new
   backend of this library is one new module that calls :func:`register_scheme`);
2. every Python entry point of the group ``mis_lightning.schemes`` (how a third-party
   package registers its schemes without editing this one)::

       # the plugin's pyproject.toml
       [project.entry-points."mis_lightning.schemes"]
       my_backend = "my_package.mis_schemes"             # a module that registers at import
       # or "my_package.mis_schemes:register"            # a function called with no argument

``available_schemes()`` lists the names (a public contract: configs, reports and outside
checks use them). Names follow torchao's vocabulary (``int8_weight_only`` is
``Int8WeightOnlyConfig``, ``intx_weight_only_int4_g32`` is ``IntxWeightOnlyConfig(
weight_dtype=torch.int4, granularity=PerGroup(32))``); the names of earlier releases stay
usable as deprecated aliases (:func:`register_alias`), with a ``DeprecationWarning``.
Every registration is also announced to the hooks of :func:`on_register` (the Hydra app
mirrors the registry into its ``quantizer`` config group that way).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any

from .._fields import close_names
from .._user_warnings import warn
from .base import QuantizationScheme

SchemeFactory = Callable[..., QuantizationScheme]
#: the entry-point group third-party packages register their schemes under
ENTRY_POINT_GROUP = "mis_lightning.schemes"

_FACTORIES: dict[str, SchemeFactory] = {}
_ALIASES: dict[str, tuple[str, str]] = {}  # old name -> (current name, why)
_HOOKS: list[Callable[[str], None]] = []


def register_scheme(name: str | QuantizationScheme, factory: SchemeFactory | None = None, *,
                    overwrite: bool = False) -> None:
    """Register a scheme under a public name.

    Two forms: ``register_scheme(scheme)`` registers a scheme object (a frozen-dataclass
    :class:`~mis_lightning.quantization.base.SchemeConfig`) under its own ``name``; keyword
    overrides of ``get_scheme(name, **kw)`` then build ``dataclasses.replace(scheme, **kw)``.
    ``register_scheme(name, factory)`` registers ``factory(**kwargs) -> QuantizationScheme``.

    Raises:
        ValueError: an empty name, or a name already registered (without ``overwrite``) or
            taken by a deprecated alias.
        TypeError: neither a scheme object nor a name with a callable factory.
    """
    if isinstance(name, QuantizationScheme):
        if factory is not None:
            raise TypeError("register_scheme(scheme) takes no factory: the scheme is its own preset")
        preset = name
        name = preset.name
        factory = (lambda **kw: dataclasses.replace(preset, **kw) if kw else preset) \
            if dataclasses.is_dataclass(preset) else (lambda: preset)
    if not name or not isinstance(name, str):
        raise ValueError(f"scheme name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"scheme {name!r}: the factory must be callable, got {type(factory).__name__}")
    if name in _ALIASES:
        raise ValueError(f"scheme name {name!r} is a deprecated alias of {_ALIASES[name][0]!r}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"scheme {name!r} is already registered (pass overwrite=True to replace it)")
    _FACTORIES[name] = factory
    for hook in list(_HOOKS):
        hook(name)


def register_alias(old: str, new: str, why: str = "") -> None:
    """Keep ``old`` usable as a deprecated name of the registered scheme ``new``.

    ``get_scheme(old, **kw)`` warns (``DeprecationWarning``, naming ``new``) and returns
    ``get_scheme(new, **kw)``; the scheme's ``name`` is ``new``.
    """
    if old in _FACTORIES:
        raise ValueError(f"{old!r} is a registered scheme, it cannot also be an alias")
    _ALIASES[old] = (new, why)
    for hook in list(_HOOKS):
        hook(old)


def deprecated_aliases() -> dict[str, str]:
    """``{old name: current name}`` of every deprecated alias."""
    _load_backends()
    return {k: v[0] for k, v in sorted(_ALIASES.items())}


def on_register(hook: Callable[[str], None]) -> None:
    """Call ``hook(name)`` for every name registered from now on (schemes and aliases)."""
    _HOOKS.append(hook)


def available_schemes() -> list[str]:
    """Registered scheme names, sorted (deprecated aliases are not listed; see
    :func:`deprecated_aliases`)."""
    _load_backends()
    return sorted(_FACTORIES)


def get_scheme(spec: str | QuantizationScheme, **kwargs: Any) -> QuantizationScheme:
    """A scheme object from a registry name (with optional keyword overrides) or a scheme.

    Raises:
        KeyError: unknown name (the message suggests close names and lists the registered ones).
        TypeError: ``spec`` is neither a name nor a scheme, or overrides given with a scheme.
    """
    if isinstance(spec, QuantizationScheme):
        if kwargs:
            raise TypeError("keyword overrides apply to registry names, not to scheme objects")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a scheme is a registry name or a QuantizationScheme, got {type(spec).__name__}")
    _load_backends()
    if spec in _ALIASES:
        new, why = _ALIASES[spec]
        warn(f"scheme name {spec!r} is deprecated: use {new!r}" + (f" ({why})" if why else ""),
             DeprecationWarning)
        spec = new
    if spec not in _FACTORIES:
        raise UnknownSchemeError(_unknown_names_message([spec]))
    scheme = _FACTORIES[spec](**kwargs)
    if not kwargs and not dataclasses.is_dataclass(scheme):
        # a hand-written (mutable) scheme takes its registry name; a dataclass scheme's name
        # derives from its fields
        scheme.name = spec
    return scheme


class UnknownSchemeError(KeyError):
    """An unknown scheme name (a ``KeyError``, as a missing registry key); its message prints as
    written: ``KeyError``'s own ``str`` quotes it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _close_names(spec: str) -> list[str]:
    """Up to 3 registered names close to ``spec``: the same name in other letter case first, then
    the names holding it as a word, then :func:`~mis_lightning._fields.close_names`' spelling
    matches on lower case (``INT8_weight_only`` suggested float8 first before); an alias
    that is close suggests the name it stands for (a deprecated alias would point outside the list
    printed with them)."""
    names = [*_FACTORIES, *_ALIASES]
    # the spelling match (in lower case: an exact one, other letter case, comes first at ratio 1)
    close = close_names(spec, names, n=6, fold_case=True)
    same_case = close[:1] if close and close[0].lower() == spec.lower() else []
    # a bare word (or words) of a name (``int8``): the shortest names holding it ('int8' read only
    # rtn_int8 before: difflib's ratio against the longer names is below its cutoff); the names
    # ending in it first, then registered names before aliases ('int4' offered rtn_int4 and two
    # aliases' targets, not the README's intx_weight_only_int4, nux50)
    low = spec.lower()
    word = sorted((m for m in names if f"_{low}_" in f"_{m.lower()}_"),  # whole words: weight_only_int4 too
                  key=lambda m: (not m.lower().endswith("_" + low), m in _ALIASES, len(m)))[:3]
    return list(dict.fromkeys(_ALIASES[m][0] if m in _ALIASES else m for m in same_case + word + close))[:3]


#: where an unknown scheme name's error points for the full list (nux51 #9: the message listed all
#: 56 names, 1,658 characters, after the close ones)
ALL_SCHEMES_AT = ("all {n} scheme names: mis_lightning.quantization.available_schemes() "
                  "(table: docs/quantization.md, \"The schemes\")")


def _unknown_names_message(unknown: Sequence[str]) -> str:
    """The error of unknown scheme names: each with up to 3 close registered names
    (:func:`_close_names`; where none is close, the 3 nearest by difflib's ratio), then where the
    full list is (:data:`ALL_SCHEMES_AT`), not the list."""
    parts = []
    for spec in unknown:
        close = _close_names(spec)
        # nothing close ('int9'): the 3 nearest registered names all the same, the list not being printed
        nearest = [] if close else close_names(spec, _FACTORIES, n=3, cutoff=0.0, fold_case=True)
        parts.append(f"{spec!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                    f" (nothing close; nearest: {', '.join(nearest)})" if nearest else ""))
    what = "unknown quantization scheme" if len(unknown) == 1 else f"{len(unknown)} unknown quantization schemes:"
    return f"{what} {'; '.join(parts)}; {ALL_SCHEMES_AT.format(n=len(_FACTORIES))}"


def check_scheme_names(specs: Iterable[Any]) -> None:
    """Every registry name among ``specs`` (other entries: scheme objects, config mappings, are
    skipped) is registered or a deprecated alias; checked all at once, so that a list with
    several misspelt names is corrected in one try.

    Raises:
        KeyError: the unknown names, each with up to 3 close registered names, then where the
            list is.
    """
    _load_backends()
    unknown = [s for s in specs if isinstance(s, str) and s not in _FACTORIES and s not in _ALIASES]
    if unknown:
        raise UnknownSchemeError(_unknown_names_message(list(dict.fromkeys(unknown))))


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
            "'intx_weight_only_int4'] (mis_lightning.quantization.available_schemes() lists them)"
        )
    return out


_LOADED = False


def _load_backends() -> None:
    """Import every module of this package, then every ``mis_lightning.schemes`` entry point
    (once), so that they register their schemes.

    A third-party entry point that fails to load is reported with a ``RuntimeWarning``
    naming it and the cause (one broken plugin must not disable the others); the schemes of
    this package must always load (their import errors propagate).
    """
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    pkg = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{__package__}.{mod.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:  # noqa: BLE001 - reported, the other plugins still load
            warnings.warn(f"mis_lightning.schemes entry point {ep.name!r} ({ep.value}) failed to "
                          f"load: {type(exc).__name__}: {exc}; its schemes are not registered",
                          RuntimeWarning, stacklevel=2)
