"""Whether ``mode=assess``'s ``ckpt_path`` fits the model and data the config builds (nux53 #13).

``mis-lightning mode=assess ckpt_path=<a sweep's model.ckpt of the user's own model>`` without
repeating ``data=`` / ``model=`` poured the checkpoint's hyperparameters (``hidden=8``, an int of
the user's model) into the default ``mlp_probe`` config and crashed with ``TypeError: 'int' object
is not iterable``, after reading the default data. The checkpoint's origin (the model's class,
the datamodule's ``_target_`` and the run's ``data=`` / ``model=`` group choices) is read from the
checkpoint itself (the app writes it since this change: :data:`ORIGIN_KEY`) or from the training
run's ``result.json`` beside it, and a mismatch is refused before any data is read, with the
options to pass (docs/hydra.md, "Assess a saved model").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["ORIGIN_KEY", "check_checkpoint_fits", "checkpoint_origin", "misfit_error", "origin_of"]

#: the app checkpoint's key holding its origin: ``{"model": "<module>.<class>", "data":
#: "<datamodule _target_>", "choices": {"data": ..., "model": ...}}`` (:func:`origin_of`)
ORIGIN_KEY = "mis_lightning_origin"


def origin_of(model: Any, data_target: str | None, choices: dict[str, Any]) -> dict[str, Any]:
    """What :func:`~mis_lightning.app.job.save_checkpoint` records under :data:`ORIGIN_KEY`: the
    model's class path, the datamodule's ``_target_`` and the Hydra group choices ``data`` and
    ``model`` of the run (``None`` where not run by Hydra)."""
    return {"model": f"{type(model).__module__}.{type(model).__qualname__}", "data": data_target,
            "choices": {k: choices.get(k) for k in ("data", "model")}}


def checkpoint_origin(path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The origin of the checkpoint at ``path`` (:func:`origin_of`'s keys): its own
    :data:`ORIGIN_KEY`, else the ``result.json`` of the run that wrote it, beside it (its
    ``files.checkpoint`` names this file; ``model`` is then the class name only), else ``None``
    (a Lightning checkpoint, or an app checkpoint of before this key without its result.json)."""
    own = ckpt.get(ORIGIN_KEY)
    if isinstance(own, dict) and own.get("model"):
        return own
    result = Path(path).parent / "result.json"
    try:
        res = json.loads(result.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or Path(str((res.get("files") or {}).get("checkpoint", ""))).name != Path(path).name \
            or not res.get("model"):
        return None  # another run's result (an assessment writes no checkpoint): not this file's origin
    choices = (res.get("job") or {}).get("choices") or {}
    return {"model": str(res["model"]), "data": res.get("data"),
            "choices": {k: choices.get(k) for k in ("data", "model")}, "from": str(result)}


def misfit_error(cfg: DictConfig, model_name: str, detail: str) -> ValueError:
    """The one message of a checkpoint that does not fit the configured model (docs/hydra.md):
    ``ckpt_path <path> does not fit the model <model_name> built from model=<target> and
    data=<target>: pass the model= and data= options of the run that trained it (<detail>)``."""
    return ValueError(
        f"ckpt_path {cfg.ckpt_path} does not fit the model {model_name} built from "
        f"model={cfg.model._target_} and data={cfg.data._target_}: pass the model= and data= "
        f"options of the run that trained it ({detail})")


def _name(target: Any) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def _configured_class(target: str) -> str | None:
    """The class name ``target`` builds, or ``None`` where it is no class (a factory function:
    the class it returns is known only once built) or does not import (Hydra says so later)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - instantiate reports a target that does not import
        return None
    return obj.__name__ if isinstance(obj, type) else None


def check_checkpoint_fits(cfg: DictConfig, ckpt: dict[str, Any]) -> None:
    """Refuse ``cfg.ckpt_path`` where its origin (:func:`checkpoint_origin`) names another model
    class or datamodule than ``cfg.model`` / ``cfg.data`` build, before any data is read; the
    message names the checkpoint's model class and, where its run's group choices are known, the
    ``data=... model=...`` to pass. Nothing is said where the origin is unknown (a Lightning
    checkpoint: the weights' own check, when loaded, names a mismatch).

    Raises:
        ValueError: the checkpoint was trained with another model or datamodule (:func:`misfit_error`).
    """
    origin = checkpoint_origin(str(cfg.ckpt_path), ckpt)
    if origin is None:
        return
    configured = _configured_class(str(cfg.model._target_))
    model_differs = configured is not None and configured != _name(origin["model"])
    data_differs = bool(origin.get("data")) and _name(origin["data"]) != _name(cfg.data._target_)
    if not (model_differs or data_differs):
        return
    choices = origin.get("choices") or {}
    options = " ".join(f"{k}={choices[k]}" for k in ("data", "model") if choices.get(k))
    where = f" ({origin['from']})" if origin.get("from") else ""
    detail = (f"the checkpoint holds a {_name(origin['model'])} trained on data {origin.get('data') or 'unknown'}{where}"
              + (f"; pass {options}" if options else ""))
    raise misfit_error(cfg, configured or _name(cfg.model._target_), detail)
