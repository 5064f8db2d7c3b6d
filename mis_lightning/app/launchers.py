"""Hydra launchers that run each job in another process, and the config values those jobs
cannot resolve: a dotted path into ``__main__`` (the ``_target_`` of a class defined in the script
that starts the sweep, ``batch_fn=__main__.xy``) names the worker's own ``__main__`` there (a
joblib/loky worker, a Ray task, a SLURM or RQ job), not the script, and every job failed with
Hydra's "Error locating target '__main__.X'". :func:`check_main_module_paths` refuses such
a sweep before anything is launched or trained (:class:`~mis_lightning.app.aggregate.AggregateSweep`
in the launching process, and each job's own checks in :func:`~mis_lightning.app.job.run_job`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: the launcher plugins whose jobs run in other processes, by the module of their ``_target_``
SEPARATE_PROCESS_LAUNCHERS = {
    "hydra_joblib_launcher": "joblib",
    "hydra_ray_launcher": "Ray",
    "hydra_submitit_launcher": "submitit",
    "hydra_rq_launcher": "RQ",
}


def separate_process_launcher(launcher: Mapping[str, Any] | None) -> str | None:
    """The name of ``launcher`` (a ``hydra.launcher`` node) when its jobs run in processes of their
    own (:data:`SEPARATE_PROCESS_LAUNCHERS`), else ``None``: Hydra's basic launcher, joblib on
    threads (``backend`` threading / sequential, ``prefer: threads``, ``require: sharedmem``) or
    with ``n_jobs: 1`` (joblib then runs the jobs in the calling process), an unknown launcher."""
    if not launcher:
        return None
    target = str(launcher.get("_target_") or "")
    name = next((v for k, v in SEPARATE_PROCESS_LAUNCHERS.items() if k in target), None)
    if name == "joblib":
        backend = launcher.get("backend")
        if backend in ("threading", "sequential") or launcher.get("n_jobs") == 1 or (
                backend is None and (launcher.get("prefer") == "threads" or launcher.get("require") == "sharedmem")):
            return None
    return name


def _strings(node: Any, key: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def main_module_paths(cfg: DictConfig | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(key, value)]``: every string of the job's config (the ``hydra`` node aside, values as
    written: interpolations unresolved) that is a dotted path into ``__main__``, e.g.
    ``("model._target_", "__main__.TinyMLP")``, ``("batch_fn", "__main__.xy")``."""
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    return [(k, v) for k, v in _strings({k: v for k, v in plain.items() if k != "hydra"}, "")
            if v.startswith("__main__.")]


def check_main_module_paths(cfg: DictConfig | Mapping[str, Any], launcher: Mapping[str, Any] | None) -> None:
    """Refuse a job config that names ``__main__`` under a launcher whose jobs run in other processes.

    Args:
        cfg: the job's config (its ``hydra`` node, if any, is not read).
        launcher: the ``hydra.launcher`` node in use (``None``: none, nothing to check).

    Raises:
        ValueError: ``launcher`` runs jobs in processes of their own (:func:`separate_process_launcher`)
            and ``cfg`` has a dotted path into ``__main__`` (:func:`main_module_paths`); the message
            names each key and the fix (the class or function in an importable module, or
            Hydra's basic launcher).
    """
    name = separate_process_launcher(launcher)
    found = main_module_paths(cfg) if name is not None else []
    if not found:
        return
    keys = ", ".join(f"{k}={v}" for k, v in found)
    k0, v0 = found[0]
    leaf = v0.rsplit(".", 1)[-1]
    raise ValueError(
        f"{keys}: the {name} launcher runs each job in a process of its own, whose __main__ is not the "
        f"script that started the sweep, so {v0} cannot be imported there (Hydra's \"Error locating "
        f"target\" in every job). Put {leaf} in an importable module (e.g. my_pkg/models.py, on the "
        f"PYTHONPATH of the jobs) and set {k0}=my_pkg.models.{leaf}; or sweep in one process with "
        "Hydra's basic launcher (drop the hydra/launcher override)")
