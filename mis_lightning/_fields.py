"""Misnamed options of the public option dataclasses (:class:`~mis_lightning.config.EstimationConfig`,
:class:`~mis_lightning.config.ScoringConfig`, :class:`~mis_lightning.planning.PlanConfig`, every
quantization :class:`~mis_lightning.quantization.base.SchemeConfig`, a user's own subclasses
included): one check, declared here, that names the unknown keyword and the field meant.

A dataclass's generated ``__init__`` raises a bare ``TypeError: __init__() got an unexpected
keyword argument 'estimation'`` that names neither the field meant nor the other fields (e.g.
``EstimationConfig(estimation="exact")``, whose field is ``mode``). ``__new__`` runs before
``__init__`` with the same arguments, so a base class's ``__new__`` checks the keywords of every
dataclass below it, without touching their generated ``__init__``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

__all__ = ["CheckedFields", "canonical_decay", "close_names", "close_param_names", "did_you_mean", "parameter_aliases",
           "unknown_fields_error"]

_ACCEPTED: dict[type, frozenset[str] | None] = {}  # per class: its __init__'s keywords (None: any)


def _accepted(cls: type) -> frozenset[str] | None:
    if cls not in _ACCEPTED:
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):  # no signature to read: no check
            _ACCEPTED[cls] = None
        else:
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            _ACCEPTED[cls] = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else \
                frozenset(p.name for p in params if p.kind in kinds and p.name != "self")
    return _ACCEPTED[cls]


def close_names(name: str, names: Iterable[str], n: int = 2, cutoff: float = 0.6,
                fold_case: bool = False) -> list[str]:
    """The (at most ``n``) entries of ``names`` closest to a misspelt ``name``
    (:func:`difflib.get_close_matches`, ratio >= ``cutoff``), closest first: the one
    did-you-mean spelling match of the library (option, Hydra, parameter, metric and scheme
    names; the scheme matcher adds its word rules on top, ``quantization.registry``).
    ``fold_case``: compared in lower case and returned as spelled in ``names`` (the same name in
    another letter case first: ratio 1).
    """
    if not fold_case:
        return difflib.get_close_matches(name, sorted(names), n=n, cutoff=cutoff)
    lower = {m.lower(): m for m in names}  # (two spellings of one lower-case name: the last)
    return [lower[m] for m in difflib.get_close_matches(name.lower(), sorted(lower), n=n, cutoff=cutoff)]


def did_you_mean(name: str, names: Iterable[str], quote: bool = True) -> str:
    """``"did you mean 'a' or 'b'?"``: :func:`close_names`, quoted with ``repr`` unless
    ``quote`` is false (command-line overrides: ``did you mean int8_weight_only?``); ``""`` when
    none is close. The one did-you-mean of the option checks (keywords, dataclass fields, the
    app's config groups)."""
    close = close_names(name, names)
    return f"did you mean {' or '.join(repr(c) if quote else c for c in close)}?" if close else ""


def unknown_fields_error(cls: type, bad: list[str], known: frozenset[str],
                         aliases: Mapping[str, str]) -> TypeError:
    """The ``TypeError`` for keywords ``bad`` that ``cls`` has no field for: for each, the field
    it names elsewhere (``aliases``: the front ends' keyword for a field) or the closest fields
    (:func:`difflib.get_close_matches`), then every field."""
    hints = []
    for k in bad:
        if k in aliases and aliases[k] in known:
            hints.append(f"{k!r}: the field is {aliases[k]!r} (the front ends' keyword {k}= sets it; "
                         f"here {cls.__name__}({aliases[k]}=...))")
            continue
        if hint := did_you_mean(k, known):
            hints.append(f"{k!r}: {hint}")
    return TypeError(f"{cls.__name__}() got unexpected keyword argument(s) {bad}"
                     + (f" ({'; '.join(hints)})" if hints else "") + f": its fields are {sorted(known)}")


class CheckedFields:
    """Base of the public option dataclasses: an unknown keyword raises a ``TypeError`` naming
    it and the field meant (:func:`unknown_fields_error`) instead of the generated ``__init__``'s
    bare one. ``FIELD_ALIASES``: ``{keyword the front ends take: field}`` (``estimation`` for
    ``mode``). Positional arguments and a class whose ``__init__`` takes ``**kwargs`` pass as
    before.

    Raises:
        TypeError: from construction, as above.
    """

    FIELD_ALIASES: ClassVar[Mapping[str, str]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            known = _accepted(cls)
            if known is not None:
                bad = [k for k in kwargs if k not in known]
                if bad:
                    raise unknown_fields_error(cls, bad, known, cls.FIELD_ALIASES)
        return super().__new__(cls)


def close_param_names(name: str, named: Iterable[str]) -> list[str]:
    """Parameter names a misspelled ``name`` may mean: a module's own parameters when ``name``
    is a module path (``"fc1"`` -> ``"fc1.weight"``, ``"fc1.bias"``), the tensors a reparametrized
    weight is computed from (``"fc1.weight"`` -> ``"fc1.parametrizations.weight.original0"``, ...,
    or the hook-based ``"fc1.weight_g"``, ``"fc1.weight_v"``, ``"fc1.weight_orig"``: the closest
    spelling was another layer's weight), else the closest spellings."""
    named = list(named)
    under = [n for n in named if n.startswith(name + ".")]
    if under:
        return under[:4]
    owner, _, attr = name.rpartition(".")
    computed = [n for n in named if n.startswith(f"{owner}.parametrizations.{attr}.original" if owner
                                                 else f"parametrizations.{attr}.original")
                or n in (f"{name}_g", f"{name}_v", f"{name}_orig")]
    return computed[:4] if computed else close_names(name, named)


def parameter_aliases(model: Any) -> dict[str, str]:
    """``{other name: its named_parameters name}``: the names besides ``named_parameters``' under
    which a parameter of ``model`` may be given (``params=``, ``weight_decay={...}``): a tied
    parameter's other holders (``'head.weight'`` for an output layer tied to ``'emb.weight'``, as
    ``state_dict`` names it), and a compiled submodule's names without its ``_orig_mod.`` segment
    (``'backbone.0.weight'`` for ``'backbone._orig_mod.0.weight'``: the names of the module before
    ``torch.compile``; formerly refused with a suggestion). A short name that is itself
    another parameter's name is not an alias."""
    named = dict(model.named_parameters())
    first = {id(p): n for n, p in named.items()}
    out = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in named}
    for n in [*named, *out]:
        short = ".".join(part for part in n.split(".") if part != "_orig_mod")
        if short != n and short not in named and short not in out:
            out[short] = out.get(n, n)
    return out


def canonical_decay(decay: Mapping[str, float], model: Any) -> dict[str, float]:
    """A per-parameter ``weight_decay`` mapping with each alias (:func:`parameter_aliases`)
    replaced by its ``named_parameters`` name.

    Raises:
        ValueError: two names of one parameter with different coefficients (both named)."""
    aliases = parameter_aliases(model)
    out: dict[str, float] = {}
    given: dict[str, str] = {}
    for k, v in decay.items():
        name = aliases.get(k, k)
        if name in out and float(out[name]) != float(v):
            raise ValueError(f"weight_decay gives parameter {name!r} two coefficients: {given[name]!r}: "
                             f"{out[name]:g} and {k!r}: {float(v):g} (names of one parameter)")
        out[name], given[name] = v, k
    return out
