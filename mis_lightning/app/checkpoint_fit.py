"""Whether ``mode=assess``'s ``ckpt_path`` fits the model and data the config builds.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

__all__ = ["ORIGIN_KEY", "check_checkpoint_fits", "checkpoint_origin", "checkpoint_untrained", "misfit_error",
           "origin_of", "same_weights"]

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


def same_weights(model: torch.nn.Module, state: Mapping[str, Any]) -> bool:
    """Whether ``state`` (a checkpoint's ``state_dict``) holds exactly ``model``'s own entries:
    the same names, and every tensor equal bitwise. Called on the model as the config built it,
    before the checkpoint is loaded: equal means the checkpoint holds its initialisation."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(
        isinstance(state[k], torch.Tensor) and state[k].shape == v.shape and torch.equal(state[k].to(v.device), v)
        for k, v in own.items())


def _trained_by_lightning(ckpt: Mapping[str, Any]) -> bool:
    """A Lightning checkpoint's own record of training beside ``global_step``: an optimizer's
    state (Adam's moments, SGD's momentum: written at its first step) or a training batch
    completed (manual optimisation stepping a raw optimizer leaves ``global_step`` at 0)."""
    if any(isinstance(o, Mapping) and o.get("state") for o in ckpt.get("optimizer_states") or ()):
        return True
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]) > 0
    except (KeyError, TypeError, ValueError):
        return False


def checkpoint_untrained(path: str | Path, ckpt: Mapping[str, Any], initial: bool) -> tuple[bool, str] | None:
    """What ``mode=assess`` knows of whether the checkpoint at ``path`` was trained, where its
    ``global_step`` is 0 (a model trained outside Lightning and saved with
    ``trainer.save_checkpoint`` has ``global_step`` 0 too). ``initial``: its weights equal the
    model the config builds (:func:`same_weights`, before loading).

    Returns:
        ``None``: no ``global_step``, a step count above 0, or the checkpoint records training
        (an optimizer's state, a training batch completed). ``(True, how)``: known not trained:
        written by the app's own training run (:func:`checkpoint_origin` known: its ``global_step``
        is that fit's count) or holding the config's initialisation (``initial``); ``how`` for
        :func:`~mis_lightning.report.not_trained_warning`. ``(False, warning)``: not known (a
        Lightning checkpoint of weights other than the initialisation): the report's warning,
        saying both readings; the figures keep their verdict.
    """
    if "global_step" not in ckpt or int(ckpt["global_step"]) != 0 or _trained_by_lightning(ckpt):
        return None
    if initial:
        return True, f"the checkpoint's weights are the model's initialisation, as the config builds it ({path})"
    if checkpoint_origin(path, ckpt) is not None:
        return True, f"the checkpoint's global_step is 0, written by this app's training run ({path})"
    return False, (f"the checkpoint's global_step is 0 and it records no optimizer state ({path}): no Lightning fit "
                   "trained these weights, which differ from the config's initialisation; trained elsewhere (e.g. a "
                   "plain PyTorch loop, then trainer.save_checkpoint) on these records with this loss, the figures "
                   "hold; never trained (initialised with another seed), they are not membership leakage and no "
                   "scheme's figure means anything")
