"""Config-group typos on the command line, refused before Hydra composes anything.

``mis-lightning quantizer=int8_weight_onyl`` got Hydra's composition error, which lists every
option of the group (~90 lines for ``quantizer``) and suggests nothing; a misspelt group name
(``quantiser=int8_weight_only``) got "Key 'quantiser' is not in struct", and with ``+`` it was
added as a key nobody reads, so the run scored the default schemes instead.
:func:`group_override_errors` reads the command line as Hydra does (its own argument parser and
override grammar) and the groups and options through Hydra's config loader (the search path of
the command line included: ``hydra.searchpath=...``, options stored in the ConfigStore, e.g.
the generated ``quantizer`` group or a user's own ``model`` options), and returns one line per
culprit::

    quantizer=int8_weight_onyl: no such option in the quantizer group (generated from the scheme registry, ...); did you mean int8_weight_only? (options: ...)
    quantiser=int8_weight_only: no such config group quantiser; did you mean quantizer? (groups: ...)

Checked: every value of a group override (``group=opt``, ``+group=opt``, ``~group=opt``, a
multirun's ``group=a,b`` and ``group=choice(a,b)``, a list ``group=[a,b]``, nested options
``group=sub/opt`` and groups ``hydra/launcher=...``); a key that is no group but close to one
(``quantiser=...``, ``~quantiser``) when the config has no such key, and with ``+`` when its value
is an option of that group; then, the groups being valid, a dotted key without ``+`` that the
composed config lacks and its node's ``_target_`` does not take (``mis.scoring.num_record=64``:
Hydra's own message suggested ``+mis.scoring.num_record=64``), with the closest keys of its node
and its target. Left to
Hydra: glob and range sweeps, a dotted key under no node, sweeps declared in a config
(``hydra.sweeper.params``), runs with ``--config-path`` / ``--config-dir``, and anything this
check cannot read (it then returns nothing and Hydra reports as before).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence
from typing import Any

from mis_lightning._fields import close_names, did_you_mean

__all__ = ["group_override_errors"]

CONFIG_MODULE = "mis_lightning.conf"
CONFIG_NAME = "config"
_LIST_MAX = 100  # options listed in a message (the generated quantizer group has ~90)


def _parse_command_line(args: Sequence[str]) -> Any:
    """Hydra's own reading of ``args`` (``None``: it would refuse them itself or print help)."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses; no public API

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ns = get_args_parser().parse_args(list(args))
    except SystemExit:  # --version, or arguments Hydra's parser refuses: Hydra says so
        return None
    if ns.help or ns.hydra_help or ns.shell_completion or ns.config_path or ns.config_dir:
        return None
    return ns


def _listing(kind: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST_MAX])
    return f"({kind}: {shown}{', ...' if len(names) > _LIST_MAX else ''})"


def _values(override: Any) -> list[str] | None:
    """The option names an override selects (``None``: a kind this check leaves to Hydra)."""
    from hydra.core.override_parser.types import ValueType

    if override.is_sweep_override():
        if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            return [str(v) for v in override.sweep_string_iterator()]
        return None  # glob / range / interval sweeps
    value = override.value()
    if value is None:  # group=null, ~group
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _is_config_key(loader: Any, config_name: str, overrides: Sequence[Any], key: str) -> bool:
    """Whether ``key`` is a top-level key of the config: the primary config's own keys first
    (``mode=`` is close to the group ``model``), else the config composed with the other
    overrides (a ``_global_`` experiment may add keys); ``True`` when that cannot be told."""
    from hydra.types import RunMode

    for source in loader.get_sources():
        if source.is_config(config_name):
            cfg = source.load_config(config_name).config
            if key in cfg:
                return True
            break
    try:
        return key in loader.load_configuration(config_name, _job_lines(overrides, key), RunMode.RUN)
    except Exception:
        return True


def _job_lines(overrides: Sequence[Any], skip: str | None = None) -> list[str]:
    """The overrides of one job (a sweep's first value), as lines, less those of key ``skip``."""
    lines = []
    for o in overrides:
        if o.key_or_group == skip:
            continue
        value = o.input_line
        if o.is_sweep_override():
            try:
                value = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            except Exception:
                continue
        lines.append(value)
    return lines


def _target_keywords(node: Any) -> set[str] | None:
    """The keywords a node's ``_target_`` takes (a node without one: ``set()``; ``None`` where
    it takes any, ``**kwargs``, or cannot be read: nothing refused)."""
    import inspect

    from hydra.utils import get_object

    target = node.get("_target_") if "_target_" in node else None
    if target is None:
        return set()
    try:
        params = inspect.signature(get_object(str(target))).parameters.values()
    except Exception:
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _sibling_hint(cfg: Any, parent: str, leaf: str) -> str:
    """``"did you mean mis.estimation.num_records?"``: the keys close to ``leaf`` in the nodes
    beside ``parent`` (an option set in the wrong stage's node); ``""`` when none is close."""
    from omegaconf import DictConfig, OmegaConf

    up, _, own = parent.rpartition(".")
    node = OmegaConf.select(cfg, up, default=None) if up else cfg
    if not isinstance(node, DictConfig):
        return ""
    where: dict[str, list[str]] = {}
    for child in node.keys():
        sub = node.get(child) if child != own else None
        if isinstance(sub, DictConfig):
            for k in sub.keys():
                where.setdefault(str(k), []).append(f"{up + '.' if up else ''}{child}.{k}")
    close = [path for k in close_names(leaf, where) for path in where[k]]
    return f"did you mean {' or '.join(close)}?" if close else ""


def _dotted_key_errors(loader: Any, config_name: str, overrides: Sequence[Any]) -> list[str]:
    """One line per dotted override without ``+`` (``mis.scoring.num_record=64``) whose key the
    composed config lacks under a node that takes no new keys, nor its ``_target_``: Hydra's own message for it
    ("Could not override ... To append to your config use +mis.scoring.num_record=64") points at
    ``+``, which adds a key nobody reads. The config is composed once with the group and ``+``
    overrides (a sweep's first value); nothing when it cannot be composed (Hydra then says why)."""
    from hydra.core.override_parser.types import OverrideType
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    dotted = [o for o in overrides if o.type == OverrideType.CHANGE and "." in o.key_or_group
              and "/" not in o.key_or_group and not o.key_or_group.startswith("hydra.")]
    if not dotted:
        return []
    rest = [o for o in overrides if not any(o is d for d in dotted)]
    try:
        cfg = loader.load_configuration(config_name, _job_lines(rest), RunMode.RUN)
    except Exception:
        return []
    errors = []
    for o in dotted:
        parent, _, leaf = o.key_or_group.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None)
        if not isinstance(node, DictConfig) or leaf in node or not OmegaConf.is_struct(node):
            continue  # (no such parent: Hydra names it; an open node takes the key)
        keys = sorted(str(k) for k in node.keys())
        accepted = _target_keywords(node)
        if accepted is None or leaf in accepted:
            continue  # a keyword the node's _target_ takes: Hydra's "+key=value" advice is right
        keys = sorted(set(keys) | accepted)
        hint = did_you_mean(leaf, keys, quote=False) or _sibling_hint(cfg, parent, leaf)
        line = o.input_line if o.input_line else o.get_key_element()
        errors.append(f"{line}: no such key in {parent}{'; ' + hint if hint else ''} {_listing('keys', keys)}")
    return errors


def current_options(group: str, options: Sequence[str]) -> list[str]:
    """``options`` of ``group`` to suggest and list: for the ``quantizer`` group, without the
    registry's deprecated aliases (still options, so old command lines run, with a
    DeprecationWarning; with them ``quantizer=int8_weight_onyl`` suggested ``int7_weight_only``),
    as ``schemes=[...]`` suggests :func:`~mis_lightning.quantization.available_schemes` only."""
    from mis_lightning.app.factories import QUANTIZER_GROUP
    from mis_lightning.quantization.registry import deprecated_aliases

    if group != QUANTIZER_GROUP:
        return list(options)
    old = deprecated_aliases()
    return [o for o in options if o not in old]


def _check(loader: Any, config_name: str, lines: Sequence[str], overrides: Sequence[Any]) -> list[str]:
    """:func:`group_override_errors`'s lines for the parsed ``overrides`` (``lines``: as typed,
    for the search path), the groups and options asked of Hydra's config ``loader``."""
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.types import OverrideType

    # asked lazily, each answer once: every call re-reads the search path (~20 ms here)
    memo: dict[tuple[str, ObjectType], list[str]] = {}

    def listed(group: str, kind: ObjectType) -> list[str]:
        if (group, kind) not in memo:
            memo[group, kind] = loader.get_group_options(group, kind, config_name, list(lines))
        return memo[group, kind]

    def is_group(path: str) -> bool:
        parent, _, name = path.rpartition("/")
        return (not parent or is_group(parent)) and name in listed(parent, ObjectType.GROUP)

    def subgroups(parent: str) -> list[str]:
        return sorted(f"{parent}/{g}" if parent else g for g in listed(parent, ObjectType.GROUP))

    def options_of(group: str) -> list[str]:
        return listed(group, ObjectType.CONFIG) if is_group(group) else []

    def is_option(group: str, value: str) -> bool:
        head, _, tail = value.rpartition("/")  # group=sub/opt: conf/group/sub/opt
        return tail in options_of(f"{group}/{head}" if head else group)

    errors = []
    for o in overrides:
        key = o.key_or_group
        values = _values(o)
        if is_group(key):
            for v in values or []:
                if "${" in v:  # an interpolation (quantizer=${oc.env:Q}): Hydra resolves it first
                    continue
                if not is_option(key, v):
                    shown = current_options(key, options_of(key))
                    hint = did_you_mean(v, shown, quote=False)
                    errors.append(f"{o.get_key_element()}={v}: no such option in {_options_source(key)}"
                                  f"{'; ' + hint if hint else ''} {_listing('options', shown)}")
            continue
        if "." in key or key == "hydra":
            continue  # a config key (Hydra names a wrong one)
        parent = key.rpartition("/")[0]
        # the groups beside it: hydra/launchr=... is read against hydra/launcher, hydra/sweeper, ...
        near = subgroups(parent) if parent and is_group(parent) else \
            [g for g in subgroups("") if g != "hydra"]
        hint = did_you_mean(key, near, quote=False)
        if not hint:
            continue
        if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
            # +key=value adds a key: a group's typo only when the value is one of that group's options
            if not any(is_option(g, v) for g in close_names(key, near) for v in values or []):
                continue
        elif "/" not in key and _is_config_key(loader, config_name, overrides, key):
            continue
        line = o.input_line if o.input_line else o.get_key_element()
        errors.append(f"{line}: no such config group {key}; {hint} {_listing('groups', near)}")
    return errors or _dotted_key_errors(loader, config_name, overrides)


def _options_source(group: str, config_module: str = CONFIG_MODULE) -> str:
    """Where ``group``'s options come from, as the typo line names it: ``conf/<group>`` where the
    package's config folder has it, else Hydra's ConfigStore, generated by the package (the
    ``quantizer`` group: the scheme registry; a user looked for the ``conf/quantizer`` folder the
    line named and found none)."""
    from importlib.resources import files

    from mis_lightning.app.factories import QUANTIZER_GROUP

    if group == QUANTIZER_GROUP:
        return (f"the {group} group (generated from the scheme registry, no conf/{group} folder: "
                "mis_lightning.quantization.available_schemes())")
    with contextlib.suppress(ModuleNotFoundError, TypeError, OSError):
        if not (files(config_module) / group).is_dir():
            return f"the {group} group (stored in Hydra's ConfigStore, no conf/{group} folder)"
    return f"conf/{group}"


def group_override_errors(args: Sequence[str], config_module: str = CONFIG_MODULE,
                          config_name: str = CONFIG_NAME) -> list[str]:
    """One line per config-group override of ``args`` (the command line after the program name,
    as ``hydra.main`` reads it) that names no option of its group, or a group that does not exist.

    Args:
        args: e.g. ``["-m", "quantizer=int8_weight_only,int8_weight_onyl", "seed=1"]``.
        config_module: the module holding the app's configs (``pkg://`` search path entry).
        config_name: the primary config (``--config-name`` on the command line wins).

    Returns:
        ``"<override>: no such option in conf/<group>; did you mean <closest>? (options: ...)"``
        (a group the package generates, as ``quantizer``: its source instead of ``conf/<group>``)
        and ``"<override>: no such config group <key>; did you mean <group>? (groups: ...)"``
        lines; ``[]`` when every override is valid, or when Hydra would refuse the command line
        before composing (an override it cannot parse, a bad flag), prints help, or reads
        another config dir: Hydra's own message then.
    """
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    ns = _parse_command_line(args)
    if ns is None or not ns.overrides or GlobalHydra.instance().is_initialized():
        return []
    lines = list(ns.overrides)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except HydraException:  # Hydra's parse error names the override
        return []
    # the package's import stores its generated groups (quantizer, plan) in the ConfigStore; Hydra
    # imports it while listing, after it has read the ConfigStore's groups the first time
    importlib.import_module(config_module)
    with initialize_config_module(config_module, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return _check(loader, ns.config_name or config_name, lines, overrides)


def refuse_group_typos(args: Sequence[str], program: str = "mis-lightning") -> None:
    """Print :func:`group_override_errors`'s lines (``<program>: configuration error: ...``) to
    stderr and exit with status 2, as the app's other configuration errors; return when there is
    nothing to refuse.

    Raises:
        SystemExit: status 2, when an override names no option or no group.
    """
    import sys

    errors = group_override_errors(args)
    if errors:
        print("\n".join(f"{program}: configuration error: {line}" for line in errors), file=sys.stderr)
        raise SystemExit(2)
