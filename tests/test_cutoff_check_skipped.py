"""The full correlation's cutoff check (rc44) is skipped above ``assess.CUTOFF_CHECK_MAX_D``
weights for its cost; the report must then say it was not run (one merged warning naming the
schemes it applies to), not leave a figure set by the cutoff unmarked in silence (sm45).

A ridge regression (d = 20) with the bound lowered to 10 stands for a large model: the check
applies to the quantized schemes (full correlation, kappa < 1), not to ``none``."""

from __future__ import annotations

import json

import torch
from _nets import ridge_linear  # tests/_nets.py

from mis_lightning import Report, assess
from mis_lightning._warning_lines import warning_line


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y) ** 2


def _report(monkeypatch, max_d: int) -> Report:
    import importlib

    A = importlib.import_module("mis_lightning.assess")
    monkeypatch.setattr(A, "CUTOFF_CHECK_MAX_D", max_d)
    model, loader = ridge_linear(150, 19)
    return assess(model, ["none", "rtn_int8", "rtn_int2"], loader, _mse, weight_decay=1e-2, uncertainty_draws=0,
                  estimation="exact", covariance="full")


def test_a_skipped_cutoff_check_is_said_once(monkeypatch):
    rep = _report(monkeypatch, 10)
    assert rep.estimation.get("covariance") == "full"  # the premise: the check would apply
    hit = [w for w in rep.warnings if w.startswith("cutoff check not run")]
    assert len(hit) == 1, rep.warnings
    assert "rtn_int8, rtn_int2:" in hit[0] and "none" not in hit[0].split(":")[0]
    assert "d = 20 weights, above assess.CUTOFF_CHECK_MAX_D = 10" in hit[0]
    assert hit[0] in rep.table(verbose=True)  # the table prints it with the figures: in full where verbose,
    assert f"  - {warning_line(hit[0])}" in rep.table().splitlines()  # else its first sentence (nux51 #9)
    assert all(rep.schemes[k].cutoff_sensitivity is None for k in rep.schemes)
    assert [k for k, s in rep.schemes.items() if s.cutoff_check_skipped] == ["rtn_int8", "rtn_int2"]
    assert Report.from_dict(json.loads(rep.to_json())).schemes["rtn_int2"].cutoff_check_skipped
    # run (the default bound): no note, and the figures are unchanged (the note adds nothing else)
    ran = _report(monkeypatch, 2048)
    assert not any(w.startswith("cutoff check not run") for w in ran.warnings)
    assert all(ran.schemes[k].cutoff_sensitivity is not None for k in ("rtn_int8", "rtn_int2"))
    assert {k: s.leakage for k, s in ran.schemes.items()} == {k: s.leakage for k, s in rep.schemes.items()}
