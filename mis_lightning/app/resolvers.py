"""OmegaConf resolvers of the app (strings only: never return torch objects from a resolver).

``${mis_job_subdir:${hydra.job.num},${hydra.runtime.choices.quantizer},${hydra.job.override_dirname}}``
names a multirun job's folder (and ``${mis_run_name:...}``, the same arguments after the job's
name, its tracker run: :func:`run_name`): ``<num>_<scheme>`` when the sweep selects a ``quantizer``
(followed by the job's other swept overrides, ``1_int8_weight_only_seed-1``: :func:`swept_keys`),
else ``<num>_<swept overrides>`` (``3_seed-1``; every override where no sweep is known), else
``<num>``: each override as ``<key>-<value>`` (no ``=`` or ``,``: the printed ``mode=assess
ckpt_path=<folder>/model.ckpt`` parses unquoted). A label longer than :data:`MAX_LABEL`
characters is cut after a whole override and marked ``+<k>more_<hash>`` (``k`` overrides left
out; ``hash``: 8 hex digits of the full label), so that no value is shown cut.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["MAX_LABEL", "MLFLOW_ARTIFACTS", "MLFLOW_DB", "job_subdir", "mlflow_artifacts", "mlflow_store",
           "register_resolvers", "run_name", "swept_keys"]

#: the longest label of a job folder (file systems allow 255 bytes per path component)
MAX_LABEL = 120


def _split_overrides(label: str) -> list[str]:
    """``a=1,b=[x,y],c=2`` -> ``["a=1", "b=[x,y]", "c=2"]``: commas inside brackets or quotes
    belong to a value."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in label:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _shorten(parts: list[str], sep: str, limit: int = MAX_LABEL) -> str:
    """``parts`` joined by ``sep`` if that fits ``limit``, else the leading whole parts and
    ``+<k>more_<hash>`` (``k`` parts left out; ``hash``: 8 hex digits of the full label)."""
    label = sep.join(parts)
    if len(label) <= limit:
        return label
    digest = hashlib.sha1(label.encode()).hexdigest()[:8]
    kept: list[str] = []
    for i, part in enumerate(parts):
        mark = f"+{len(parts) - i - 1}more_{digest}"
        if len(sep.join([*kept, part, mark])) > limit:
            break
        kept.append(part)
    mark = f"+{len(parts) - len(kept)}more_{digest}"
    return sep.join([*kept, mark])


def swept_keys(argv: list[str] | None = None) -> set[str] | None:
    """The keys the command line sweeps (``seed=0,1``, ``seed=range(3)``, ``x=choice(a,b)``: Hydra's
    own parser), of ``argv`` (``None``: ``sys.argv[1:]``); ``None`` where it does not parse as Hydra
    overrides (not Hydra's command line: a test's, a launcher's worker)."""
    import sys

    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=args)
    except Exception:  # noqa: BLE001 - not a Hydra command line: no sweep known
        return None
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


#: the characters of a swept value kept in a scheme job's folder name (others: "-")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def job_subdir(num: Any, scheme: Any = None, overrides: Any = None, swept: set[str] | None = None) -> str:
    """``0_int4_weight_only``, ``1_int8_weight_only_seed-1``, ``3_seed-1`` or ``5`` (safe as one
    path component; long labels cut at a whole override, see the module docstring). The job's
    swept overrides (``swept``: the keys swept; ``None``: read from the command line,
    :func:`swept_keys`) as ``<key>-<value>``, ``_``-joined, after its scheme (a user's
    ``quantizer=int8_weight_only seed=0,1`` named two jobs ``0_int8_weight_only`` and
    ``1_int8_weight_only``); without a scheme the swept ones, or where none is known every
    override of the job (``3_seed=1,data.d=16`` before, whose ``=`` and ``,`` broke the
    printed ``ckpt_path=<folder>/model.ckpt`` hint unquoted)."""
    has_scheme = scheme not in (None, "", "None", "null")
    pairs = [(k.lstrip("+~"), v) for k, _, v in (o.partition("=") for o in _split_overrides(str(overrides or "")))
             if k]
    swept = (swept_keys() if swept is None else swept) if pairs else None
    chosen = [(k, v) for k, v in pairs if k in (swept or ()) and k != "quantizer"]
    if not has_scheme and not chosen:
        chosen = pairs  # no sweep known (a test's argv, a launcher's worker): every override
    # <key>-<value>, no "=" or ",": the folder stays a path Hydra's ckpt_path=... parses unquoted
    items = [f"{_SAFE.sub('-', k).strip('-')}-{_SAFE.sub('-', v).strip('-')}" for k, v in chosen]
    label = _shorten([str(scheme), *items] if has_scheme else items, "_")
    label = re.sub(r"[/\\\s]+", "_", label).strip("_")
    return f"{num}_{label}" if label else str(num)


def run_name(name: Any, scheme: Any = None, overrides: Any = None) -> str:
    """A tracker run's name (``conf/logger/mlflow.yaml``, ``wandb.yaml``): in a multirun,
    ``<job name>-<job folder>`` (``cli-0_int8_weight_only``, ``cli-3_seed-1``: each job's own, as
    :func:`job_subdir` names its folder); in a single run ``<job name>-<scheme>`` or the job name.
    Formerly it was ``<job name>-<scheme>``: a sweep over seeds gave its runs of one scheme one
    name, and a single run without ``quantizer=`` was named ``cli-None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN and hc.job.get("num") is not None:
        return f"{name}-{job_subdir(hc.job.num, scheme, overrides)}"
    return f"{name}-{scheme}" if scheme not in (None, "", "None", "null") else str(name)


#: the MLflow store's file in the run's folder (a multirun's: the sweep's, shared by its jobs)
MLFLOW_DB = "mlflow.db"
#: the folder of the MLflow runs' artifacts (the report, the figure), next to :data:`MLFLOW_DB`
MLFLOW_ARTIFACTS = "mlartifacts"


def mlflow_store() -> str:
    """The default tracking URI of ``logger=mlflow`` (``conf/logger/mlflow.yaml``, where
    ``MLFLOW_TRACKING_URI`` is unset): ``sqlite:///<dir>/mlflow.db`` with ``<dir>`` the run's output
    folder (``outputs/<date>/<time>``), or in a multirun the sweep's (``multirun/<date>/<time>``:
    one store for its jobs, compared in one ``mlflow ui``), absolute. Outside Hydra: ``mlflow.db``
    in the working directory. Formerly the default was ``sqlite:///mlflow.db`` in the working
    directory, and MLflow put the artifacts in ``./mlruns`` there too, outside every run's folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    folder = Path.cwd()
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        # (a config left set without a job reads runtime.output_dir "???": the working directory then)
        run_dir = OmegaConf.select(hc, "runtime.output_dir", default=None)
        if hc.mode == RunMode.MULTIRUN or run_dir:
            folder = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else run_dir).absolute()
    return f"sqlite:///{folder / MLFLOW_DB}"


def mlflow_artifacts(tracking_uri: Any) -> str | None:
    """The artifact location of the MLflow experiment the app creates: ``<folder>/mlartifacts``
    beside a local sqlite store's file (``sqlite:///<folder>/<name>.db``, relative paths from the
    working directory), absolute; ``None`` (MLflow's default) for any other store (a server, a
    ``file:`` store, which keeps its artifacts in its own folder). MLflow's default for a sqlite store
    is ``./mlruns`` in the working directory, wherever the store is."""
    uri = str(tracking_uri or "")
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).absolute().parent / MLFLOW_ARTIFACTS)


def register_resolvers() -> None:
    """Register the app's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("mis_job_subdir", job_subdir, replace=True)
    OmegaConf.register_new_resolver("mis_run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("mis_mlflow_store", mlflow_store, replace=True)
    OmegaConf.register_new_resolver("mis_mlflow_artifacts", mlflow_artifacts, replace=True)
