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


@hydra.main(config_path="pkg://mis_lightning.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    """Entry point of the ``mis-lightning`` console script (one Hydra job).

    A configuration mistake found before training (a misspelled scheme, an invalid option, a
    missing checkpoint) prints its message alone and exits with status 2; any later failure
    keeps Hydra's traceback (exit status 1)."""
    from mis_lightning.app.job import run_job

    try:
        return run_job(cfg)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        if getattr(exc, "mis_lightning_stage", None) != "configuration":
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"mis-lightning: configuration error ({type(exc).__name__}): {msg}\n"
              "  nothing was trained; the failed job is recorded in its result.json", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
