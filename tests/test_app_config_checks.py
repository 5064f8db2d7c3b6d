"""The app's checks before training (fresh-user sweep fu19): a config the job would ignore, or
could only refuse after training, is refused at once with one line and exit status 2; a failed
job records what it was to assess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FAST = [
    "data=synthetic_linear", "data.n_train=400", "data.n_val=200", "data.batch_size=400",
    "model=linear", "trainer.max_epochs=2", "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=2",
    "logger=none", "progress=false", "mis.scoring.covariance=independent",
]


def _console(monkeypatch, capsys, args: list[str]) -> tuple[object, str]:
    """The console script in this process: ``(exit code, stderr)``."""
    from mis_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mis-lightning", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


def _compose(overrides: list[str], out: Path):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _nothing_trained(run: Path) -> dict:
    """Nothing was trained or assessed in ``run``: the failed job's record (returned) and
    Hydra's own files only."""
    assert {p.name for p in run.iterdir()} <= {"result.json", ".hydra", "cli.log"}
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "failed" and res["stage"] == "configuration"
    return res


@pytest.mark.parametrize("override, given", [
    ("quantizer=rtn_int2", "quantizer=rtn_int2"),
    ("schemes=[rtn_int8,rtn_int2]", "schemes=[rtn_int8,rtn_int2]"),
])
def test_plan_mode_refuses_a_scheme_selection_it_would_ignore(tmp_path, monkeypatch, capsys, override, given):
    """W5: `mode=plan quantizer=...` (or `schemes=...`) planned over the default plan.candidates
    and said nothing; a sweep over quantizer= ran the same plan in every job."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "mode=plan", override, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert (f"configuration error (ValueError): mode=plan plans over plan.candidates and does not use {given}: "
            "list the schemes to plan with as 'plan.candidates=[<name>,...]' instead") in err
    assert "Traceback" not in err
    _nothing_trained(run)


def test_failed_plan_job_records_the_plan_candidates(tmp_path):
    """W8: a failed mode=plan job recorded the default `schemes` list in result.json (and the
    aggregate's failure row), not the candidates it was planning over."""
    from mis_lightning.app.job import run_job
    from mis_lightning.planning import PlanConfig

    run = tmp_path / "r"
    with pytest.raises(ValueError, match="max_bits"):
        run_job(_compose([*FAST, "mode=plan", "plan.max_bits=-1"], run))
    assert _nothing_trained(run)["schemes"] == PlanConfig().candidates
    with pytest.raises(ValueError, match="max_bits"):
        run_job(_compose([*FAST, "mode=plan", "plan.max_bits=-1", "plan.candidates=[rtn_int8,rtn_int2]"], run))
    assert _nothing_trained(run)["schemes"] == ["rtn_int8", "rtn_int2"]
