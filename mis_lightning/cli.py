"""``mis-lightning``: the Hydra command line (train a model, assess its quantized copies).

Usage::

    mis-lightning                                   # ChEMBL regression, MLP probe, default schemes
    mis-lightning data=synthetic_linear model=linear trainer.max_epochs=3
    mis-lightning 'schemes=[int8_weight_only,intx_weight_only_int2_g32]' mis.estimation.num_records=512
    mis-lightning mode=assess ckpt_path=outputs/<date>/<time>/model.ckpt   # a trained model, no training
    mis-lightning logger=many_loggers               # CSV + TensorBoard (also: mlflow, wandb, none)
    mis-lightning experiment=chembl_mlp
    mis-lightning -m quantizer=int8_weight_only,intx_weight_only_int4_g32,intx_weight_only_int2_g32
    mis-lightning -m hydra/launcher=parallel quantizer=int8_weight_only,intx_weight_only_int4_g32
    mis-lightning --cfg job                         # print the composed config
    mis-lightning --help                            # config groups and options

Configs live in the package (``mis_lightning/conf``, ``pkg://mis_lightning.conf``); add your
own with ``hydra.searchpath=[file:///path/to/my_conf]`` (see docs/hydra.md). A multirun writes
``aggregate.csv``, ``aggregate.md`` and ``frontier.png`` into the sweep dir; re-aggregate an
existing sweep with ``mis-lightning-aggregate <sweep dir>``.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from mis_lightning.app.resolvers import register_resolvers

register_resolvers()


def main() -> Any:
    """Entry point of the ``mis-lightning`` console script (``sys.argv`` as ``hydra.main`` reads it).

    A config-group override naming no option of its group or no group
    (``quantizer=int8_weight_onyl``, ``quantiser=int8_weight_only``; a multirun's ``-m
    quantizer=a,b`` too) prints one line per culprit with the closest valid name and exits with
    status 2 before Hydra composes anything (:mod:`mis_lightning.app.overrides`); otherwise one
    Hydra job (or sweep) runs: :func:`_job`.
    """
    from mis_lightning.app.overrides import refuse_group_typos

    refuse_group_typos(sys.argv[1:])
    return _job()


@hydra.main(config_path="pkg://mis_lightning.conf", config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> Any:
    """One Hydra job of the ``mis-lightning`` console script.

    A configuration mistake found before training (a misspelled scheme, an invalid option, a
    scheme this machine cannot run, a missing checkpoint), or a plan budget no candidate can
    meet, prints its message alone and exits with status 2; any other failure keeps Hydra's
    traceback (exit status 1). A single run that scored no scheme (every row an error, e.g. a
    scheme that quantizes no layer of the model) exits with status 1 after writing its outputs
    (in a multirun the aggregate does)."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException  # trainer.* values

    from mis_lightning.app.job import run_job, user_error
    from mis_lightning.planning import PlanInfeasibleError
    from mis_lightning.quantization.base import SchemeError

    try:
        result = run_job(cfg)
    except Exception as raised:
        exc = user_error(raised)  # Hydra's InstantiationException: the config class's own error
        infeasible = isinstance(exc, PlanInfeasibleError)
        if not infeasible and (getattr(raised, "mis_lightning_stage", None) != "configuration" or not isinstance(
                exc, (KeyError, ValueError, TypeError, FileNotFoundError, ImportError, SchemeError,
                      MisconfigurationException))):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, ImportError) and exc is not raised:
            # a `_target_` that does not import: Hydra's own line names the option (full_key: model),
            # its cause says why (No module named ...); with HYDRA_FULL_ERROR unset it showed only the first
            msg = f"{' '.join(str(raised).replace(', set env var HYDRA_FULL_ERROR=1 to see chained exception', '').split())}: {' '.join(msg.split())}"
        what = "plan budget" if infeasible else "configuration error"
        done = "no plan was released" if infeasible else "nothing was trained"
        print(f"mis-lightning: {what} ({type(exc).__name__}): {msg}\n"
              f"  {done}; the failed job is recorded in its result.json", file=sys.stderr)
        raise SystemExit(2) from None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if isinstance(result, dict) and result.get("scored") is False and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
