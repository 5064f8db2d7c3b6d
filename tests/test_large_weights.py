"""Weights grown large without regularisation named as the likely cause (ux29: a tanh MLP trained
by full-batch L-BFGS without weight decay grew weights of root mean square 12.6 on 8 inputs; int4
and int2 lost all utility, and the report flagged negative curvature and unstable figures but not
the cause).

The sentence is added inside the curvature warning that fired, only when every signal agrees: no
weight decay, that warning, a loss that explodes across the schemes, and a weight matrix far above
its initial scale. The figures below are those of the ux29 run (its report's losses and its first
layer's root mean square); each control drops one signal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mis_lightning.assess import LARGE_WEIGHT_SCALE, LOSS_EXPLOSION_RATIO, _large_weights_sentence
from mis_lightning.report import Report, SchemeResult

CURVATURE = ("the Hessian has negative curvature (9 of 161 eigenvalues negative): the weights are not at a strict "
             "minimum of the objective assessed")
LBFGS_LOSS = {"int8_weight_only": 0.1283, "intx_weight_only_int4": 5.305, "intx_weight_only_int2": 151.27}
ADAM_LOSS = {"int8_weight_only": 0.0394, "intx_weight_only_int4": 0.0430, "intx_weight_only_int2": 0.0592}


def _report(losses: dict[str, float], warnings: list[str], key: str = "loss") -> Report:
    schemes = {k: SchemeResult(name=k, leakage=0.15, mis=0.85, baseline_leakage=0.19, d_eff=150.0, d=161,
                               zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=8.0, method="clt",
                               utility={key: v}) for k, v in losses.items()}
    return Report(n=1000, d=161, estimation={}, diagnostics={}, schemes=schemes, baseline_leakage=0.19,
                  baseline_mis=0.81, warnings=list(warnings))


def _model(first_rms: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The ux29 MLP (8-16-1) with its first layer at root mean square ``first_rms``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        w = net[0].weight
        w.mul_(first_rms / w.pow(2).mean().sqrt())
    theta = {k: p.detach().reshape(-1).double() for k, p in net.named_parameters()}
    return net, theta


def test_the_likely_cause_and_cure_are_named_when_every_signal_agrees():
    net, theta = _model(12.59)  # ux29's L-BFGS run: pre-activation sd 12.59 * sqrt(8) = 35.6
    text = _large_weights_sentence(_report(LBFGS_LOSS, [CURVATURE]), net, theta, {"weight_decay": 0.0})
    assert text is not None
    assert "weights grown large without regularisation" in text and "no weight decay" in text
    assert "retrain with weight decay" in text  # the cure
    assert "0.weight has root mean square 12.6" in text and f"{12.59 * math.sqrt(8):.3g}" in text
    assert "from 0.128 (int8_weight_only) to 151 (intx_weight_only_int2)" in text  # the loss explosion seen


@pytest.mark.parametrize("case", ["weight decay", "no curvature warning", "no explosion", "small weights",
                                  "higher is better", "one scheme"])
def test_no_cause_is_named_when_one_signal_is_missing(case):
    """Each control drops one signal of the L-BFGS case above (which fires)."""
    losses, warned, diag, rms, key = dict(LBFGS_LOSS), [CURVATURE], {"weight_decay": 0.0}, 12.59, "loss"
    if case == "weight decay":
        diag = {"weight_decay": 1e-3}
    elif case == "no curvature warning":
        warned = ["d / n = 0.161 is not small"]
    elif case == "no explosion":  # the Adam run of the same MLP: 1.5x
        losses = ADAM_LOSS
        assert max(losses.values()) < LOSS_EXPLOSION_RATIO * min(losses.values())
    elif case == "small weights":  # Adam's first layer: rms 0.27, pre-activation sd 0.76
        rms = 0.27
        assert rms * math.sqrt(8) < LARGE_WEIGHT_SCALE
    elif case == "higher is better":  # an accuracy that spans 10x is no loss explosion
        key = "accuracy"
    else:
        losses = {"intx_weight_only_int2": 151.27}
    net, theta = _model(rms)
    assert _large_weights_sentence(_report(losses, warned, key), net, theta, diag) is None


def test_the_cause_is_named_after_a_saddle_not_excluded_too():
    """ln43: a negative eigenvalue within the gradient's precision (p > 1e-4) is "saddle not excluded",
    no longer "negative curvature": the same Hessian signal for this sentence."""
    net, theta = _model(12.59)
    warned = ["saddle not excluded: the Hessian's lowest eigenvalue reads -0.001 of the largest"]
    assert _large_weights_sentence(_report(LBFGS_LOSS, warned), net, theta, {"weight_decay": 0.0}) is not None
