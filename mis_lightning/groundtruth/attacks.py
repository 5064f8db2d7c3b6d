"""Empirical membership-inference attacks on quantized models (for comparison with the indicator).

Balanced game: the attacker scores ``n`` training members and ``n`` fresh non-members.

* loss-threshold attack: score ``-loss(model, z)``;
* reference-model attack (LiRA-offline): ``k`` reference models trained on shadow splits of
  a population pool that excludes the target's members; score
  ``(mu_ref(z) - loss(model, z)) / sd_ref(z)`` with the per-record mean and sd of the reference
  models' losses (the reference models are quantized with the same scheme).

Metrics: AUC, TPR at 1% FPR, and the advantage ``max_threshold (TPR - FPR)``, which is
comparable to the indicator's ``Delta`` (the best attack's advantage averaged over records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..quantization import get_scheme


@dataclass
class AttackMetrics:
    auc: float
    tpr_at_1fpr: float
    advantage: float


def roc_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> AttackMetrics:
    s = np.concatenate([scores_in, scores_out])
    lab = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    order = np.argsort(-s, kind="mergesort")
    lab = lab[order]
    tpr = np.concatenate([[0], np.cumsum(lab) / lab.sum()])
    fpr = np.concatenate([[0], np.cumsum(1 - lab) / (1 - lab).sum()])
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    ok = fpr <= 0.01
    return AttackMetrics(auc=auc, tpr_at_1fpr=float(tpr[ok].max()), advantage=float((tpr - fpr).max()))


def quantized(model: nn.Module, scheme: str) -> nn.Module:
    return model if scheme == "none" else get_scheme(scheme).apply(model).model


@torch.no_grad()
def per_record_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> np.ndarray:
    model.eval()
    return loss_fn(model(x.to(next(model.parameters()).dtype)), y.to(next(model.parameters()).dtype)).double().numpy()


def run_attacks(train_fn: Callable[[torch.Tensor, torch.Tensor], nn.Module], loss_fn: Callable,
                members: tuple[torch.Tensor, torch.Tensor], nonmembers: tuple[torch.Tensor, torch.Tensor],
                pool: tuple[torch.Tensor, torch.Tensor], schemes: list[str], k_ref: int = 8,
                seed: int = 0, target: nn.Module | None = None,
                null: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, dict[str, AttackMetrics]]:
    """Both attacks on every scheme. ``pool`` (disjoint from members and non-members) gives
    the shadow training sets (``n`` records each) of the ``k_ref`` reference models; the
    non-members, which the reference models never see, are evaluated like the members.
    ``null``: a second set of ``n`` fresh non-members; the same attacks scoring it against the
    non-members ("loss_null", "lira_null") measure the noise floor of ``max (TPR - FPR)``
    (with ``n`` per side it is ~``0.87 sqrt(2/n)`` with no signal at all)."""
    n = members[0].shape[0]
    g = np.random.default_rng(seed)
    target = target if target is not None else train_fn(*members)
    refs = []
    for _ in range(k_ref):
        idx = torch.from_numpy(g.choice(pool[0].shape[0], n, replace=False))
        refs.append(train_fn(pool[0][idx], pool[1][idx]))
    xs = torch.cat([members[0], nonmembers[0]] + ([null[0]] if null is not None else []))
    ys = torch.cat([members[1], nonmembers[1]] + ([null[1]] if null is not None else []))
    out = {}
    for sch in schemes:
        lt = per_record_loss(quantized(target, sch), xs, ys, loss_fn)
        lr = np.stack([per_record_loss(quantized(r, sch), xs, ys, loss_fn) for r in refs])
        mu, sd = lr.mean(0), lr.std(0) + 1e-12
        lira = (mu - lt) / sd
        m = nonmembers[0].shape[0]
        out[sch] = {"loss": roc_metrics(-lt[:n], -lt[n:n + m]), "lira": roc_metrics(lira[:n], lira[n:n + m])}
        if null is not None:
            out[sch]["loss_null"] = roc_metrics(-lt[n + m:], -lt[n:n + m])
            out[sch]["lira_null"] = roc_metrics(lira[n + m:], lira[n:n + m])
    return out
