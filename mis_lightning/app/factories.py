"""Small typed factories that Hydra configs point at with ``_target_``.

YAML holds plain strings; these functions turn them into torch / torchao objects. They exist
so that no OmegaConf resolver ever returns a torch object (that breaks
``OmegaConf.to_yaml(resolve=True)`` and hyperparameter logging), and so that a bad name fails
with a message listing the valid ones.

* :func:`scheme` -- ``quantizer=<name>``: a registry scheme (``get_scheme(name, **kw)``).
* :func:`store_quantizer_group` -- the Hydra ``quantizer`` group, generated from the registry
  into Hydra's ConfigStore (one option per registered scheme and deprecated alias; schemes
  registered later, e.g. by a plugin, are added as they register).
* :func:`torch_dtype` -- ``"bfloat16"`` / ``"torch.int4"`` -> ``torch.bfloat16`` / ``torch.int4``.
* :func:`granularity` -- ``"per_row"``, ``"per_tensor"``, ``"per_group:64"``, ``"per_axis:0"``
  -> a torchao granularity object.
* :func:`torchao_config` -- a torchao ``*Config`` class by dotted path, with its dtype /
  granularity / mapping-type arguments converted from strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mis_lightning.quantization import QuantizationScheme, available_schemes, get_scheme
from mis_lightning.quantization.registry import ALL_SCHEMES_AT, deprecated_aliases, on_register

__all__ = ["granularity", "mapping_type", "resolve_schemes", "scheme", "store_quantizer_group",
           "torch_dtype", "torchao_config"]

#: the Hydra config group of the single-scheme selection (``mis-lightning quantizer=NAME``)
QUANTIZER_GROUP = "quantizer"

# Torch dtypes that may be named in configs (alias -> attribute of ``torch``).
_DTYPE_ALIASES = {
    "float": "float32", "fp32": "float32", "float32": "float32",
    "double": "float64", "fp64": "float64", "float64": "float64",
    "half": "float16", "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
    "int8": "int8", "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64",
    "qint8": "qint8", "quint8": "quint8", "quint4x2": "quint4x2",
    **{f"int{b}": f"int{b}" for b in range(1, 8)},
    **{f"uint{b}": f"uint{b}" for b in range(1, 8)},
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` from its name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``).

    Raises:
        ValueError: unknown name (the message lists the accepted names), or a name this
            torch build does not define (e.g. ``int4`` on an old torch).
    """
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a dtype is given by name (a string), got {type(name).__name__}: {name!r}")
    key = name.strip().removeprefix("torch.").lower()
    attr = _DTYPE_ALIASES.get(key)
    if attr is None:
        raise ValueError(
            f"unknown torch dtype {name!r}; accepted names: {', '.join(sorted(_DTYPE_ALIASES))}"
        )
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(  # noqa: TRY004 - a missing dtype is a bad value, not a bad type
            f"torch {torch.__version__} has no dtype torch.{attr} (asked for {name!r})")
    return dt


def granularity(spec: Any) -> Any:
    """A torchao granularity from ``"per_row"``, ``"per_tensor"``, ``"per_token"``,
    ``"per_group:<size>"`` or ``"per_axis:<axis>"`` (objects pass through)."""
    if not isinstance(spec, str):
        return spec
    from ..quantization.torchao_backend import _import_torchao_quantization

    _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
    from torchao.quantization import PerAxis, PerGroup, PerRow, PerTensor, PerToken

    kind, _, arg = spec.strip().lower().partition(":")
    simple = {"per_row": PerRow, "per_tensor": PerTensor, "per_token": PerToken}
    if kind in simple and not arg:
        return simple[kind]()
    if kind in ("per_group", "per_axis") and arg.strip().lstrip("-").isdigit():
        return PerGroup(int(arg)) if kind == "per_group" else PerAxis(int(arg))
    raise ValueError(
        f"unknown granularity {spec!r}; use per_row, per_tensor, per_token, per_group:<size> "
        "or per_axis:<axis>"
    )


def mapping_type(spec: Any) -> Any:
    """torchao ``MappingType`` from ``"symmetric"`` / ``"asymmetric"`` (objects pass through)."""
    if not isinstance(spec, str):
        return spec
    from ..quantization.torchao_backend import _import_torchao_quantization

    _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
    from torchao.quantization import MappingType

    key = spec.strip().upper()
    if key not in MappingType.__members__:
        raise ValueError(f"unknown mapping type {spec!r}; use one of {list(MappingType.__members__)}")
    return MappingType[key]


def _convert(key: str, value: Any) -> Any:
    if key.endswith("dtype") and isinstance(value, str):
        return torch_dtype(value)
    if key == "granularity":
        if isinstance(value, (list, tuple)):
            return [granularity(v) for v in value]
        return granularity(value)
    if key == "mapping_type":
        return mapping_type(value)
    return value


def torchao_config(config: str, **kwargs: Any) -> Any:
    """Build a torchao config object, e.g.::

        _target_: mis_lightning.app.factories.torchao_config
        config: torchao.quantization.IntxWeightOnlyConfig
        weight_dtype: int4
        granularity: per_group:32
        mapping_type: symmetric

    ``config`` is a dotted path resolved with ``hydra.utils.get_object``; keys ending in
    ``dtype`` go through :func:`torch_dtype`, ``granularity`` through :func:`granularity`,
    ``mapping_type`` through :func:`mapping_type`.
    """
    from hydra.utils import get_object

    cls = get_object(config)
    if not callable(cls):
        raise TypeError(f"{config!r} is not a class or callable")
    return cls(**{k: _convert(k, v) for k, v in kwargs.items()})


def scheme(name: str, **kwargs: Any) -> QuantizationScheme:
    """A registry scheme (what the ``quantizer=<name>`` option instantiates).

    Keyword arguments are passed to the scheme's factory (dtype / granularity strings are
    converted as in :func:`torchao_config`); without them the scheme's ``name`` is ``name``.

    Raises:
        KeyError: ``name`` is not registered; the message names close ones and where the list is.
    """
    kw = {k: _convert(k, v) for k, v in kwargs.items()}
    return get_scheme(name, **kw)


def _store_quantizer(name: str) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(
        group=QUANTIZER_GROUP, name=name,
        node={"_target_": f"{__name__}.scheme", "name": name})


_STORED = False


def store_plan_group() -> None:
    """Store the ``plan`` group's ``default`` option: the dataclass
    :class:`~mis_lightning.planning.PlanConfig` itself as a structured config (its fields, types
    and defaults declared once; ``mis-lightning mode=plan plan.max_utility_loss=0.05``)."""
    from hydra.core.config_store import ConfigStore

    from mis_lightning.planning import PlanConfig

    ConfigStore.instance().store(group="plan", name="default", node=PlanConfig)


def store_quantizer_group() -> None:
    """Generate the Hydra ``quantizer`` group from the scheme registry (idempotent).

    Each registered scheme and each deprecated alias becomes the option
    ``quantizer=<name>``, the node ``{_target_: mis_lightning.app.factories.scheme, name:
    <name>}`` in Hydra's ConfigStore (extra keys reach the factory:
    ``+quantizer.group_size=64``); the group thus always equals the registry, plugins
    included, with no file to keep in sync. Schemes registered after this call are added as
    they register. Called when Hydra imports the config package ``mis_lightning.conf``.
    """
    global _STORED
    if _STORED:
        return
    _STORED = True
    for name in [*available_schemes(), *deprecated_aliases()]:
        _store_quantizer(name)
    on_register(_store_quantizer)


def resolve_schemes(specs: Iterable[Any]) -> list[QuantizationScheme]:
    """Scheme objects from a config list: registry names, ``{_target_: ...}`` nodes, or
    ``{name: ..., **kwargs}`` mappings (as in ``schemes:`` of ``config.yaml``)."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from mis_lightning.quantization.registry import check_scheme_names

    specs = list(specs)
    check_scheme_names(specs)  # every unknown name at once (the library's check)
    out: list[QuantizationScheme] = []
    for spec in specs:
        if isinstance(spec, QuantizationScheme):
            out.append(spec)
        elif isinstance(spec, str):
            out.append(scheme(spec))
        elif isinstance(spec, (Mapping, DictConfig)):
            node = OmegaConf.create(dict(spec)) if not isinstance(spec, DictConfig) else spec
            if "_target_" in node:
                obj = instantiate(node)
            else:
                plain = OmegaConf.to_container(node, resolve=True)
                obj = scheme(**plain)  # type: ignore[arg-type]
            if not isinstance(obj, QuantizationScheme):
                raise TypeError(f"{spec} did not build a QuantizationScheme (got {type(obj).__name__})")
            out.append(obj)
        else:
            raise TypeError(
                f"a scheme entry is a registry name or a mapping, got {type(spec).__name__}: {spec!r}"
                f" ({ALL_SCHEMES_AT.format(n=len(available_schemes()))})"
            )
    return out
