"""The joint pass (``assess._joint_sums``) run with a boolean switch on and off, one function of
``assess`` counted per run: what a switch test of the scoring pass compares (tests/test_scoring_pass.py,
tests/test_cast_live_only.py)."""

from __future__ import annotations

import importlib
from typing import Any

from mis_lightning.quantization import get_scheme

A = importlib.import_module("mis_lightning.assess")


def joint_pass_on_off(monkeypatch: Any, est: Any, model: Any, schemes: list[str], flag: str, counted: str
                      ) -> tuple[dict[bool, tuple], dict[bool, int]]:
    """``(out, calls)``: per value of ``assess.<flag>`` (True, then False), ``out[value]`` the joint
    pass's sums (chunks of 2^18, seed 0, 16 draws, moments not kept) and each scheme's ``(d_eff,
    frozen, {layer: (d_eff, pinned_fraction)})``; ``calls[value]`` how often ``assess.<counted>`` ran."""
    calls = {True: 0, False: 0}
    original = getattr(A, counted)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(A, flag, on)

        def wrapper(*args: Any, on: bool = on, **kwargs: Any) -> Any:
            calls[on] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(A, counted, wrapper)
        prepared = [A._prepare_scheme(est, model, get_scheme(s), 16) for s in schemes]
        sums = A._joint_sums(est, prepared, 1 << 18, 0, keep_moments=False)
        out[on] = (sums, [(p.d_eff, p.frozen, {k: (v.d_eff, v.pinned_fraction) for k, v in p.layers.items()})
                          for p in prepared])
    return out, calls
