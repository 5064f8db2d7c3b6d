"""Empirical membership-inference attacks on quantized models (for comparison with the indicator).

Two protocols.

**Fresh-population game** (:func:`run_attacks`): the attacker scores ``n`` training members and
``n`` fresh non-members.

* loss-threshold attack: score ``-loss(model, z)``;
* reference-model attack (LiRA-offline): ``k`` reference models trained on shadow splits of
  a population pool that excludes the target's members; score
  ``(mu_ref(z) - loss(model, z)) / sd_ref(z)`` with the per-record mean and sd of the reference
  models' losses (the reference models are quantized with the same scheme).

**Pool protocol** (the audit of ML Privacy Meter and of LiRA's experiments): a known pool of
``N`` records, ``M`` models each trained on a random half (:func:`pool_splits`); each model in
turn is the target and the other ``M - 1`` its reference models (online attacks use the
references where the record was IN and where it was OUT, offline attacks the OUT ones only).
Per-record signals of every model are computed once, the attacks are vectorised over targets
with leave-the-target-out statistics:

* :func:`lira_scores` -- LiRA (Carlini et al. 2022, "Membership inference attacks from first
  principles"): Gaussian fits of the signal over IN / OUT references, online score = the
  log-likelihood ratio, offline score = the standardised distance above the OUT mean;
* :func:`rmia_scores` -- RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference
  attacks"): ``LR(x, z) = (p(x|target) / p(x)) / (p(z|target) / p(z))``, score = fraction of the
  population records ``z`` with ``LR >= gamma``; ``p(x)`` is the mean over all references
  (online) or ``((1 + a) p_OUT(x) + (1 - a)) / 2`` (offline);
* :func:`whitebox_scores` -- a LiRA-style test on the released (dequantized) parameter vector
  along each record's influence direction (see its docstring for the choice).

:func:`pool_advantage` turns per-target scores into advantages (:class:`PoolAttackResult`).

Metrics (:func:`roc_metrics`, torchmetrics' ROC / AUROC): AUC, TPR at 1% FPR, and the
advantage ``max_threshold (TPR - FPR)``, comparable to the indicator's ``Delta`` (the best
attack's advantage averaged over records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.functional import auroc, roc

from ..quantization import get_scheme


@dataclass
class AttackMetrics:
    """ROC summary of one attack on one target: ``auc``, ``tpr_at_1fpr`` (TPR at FPR <= 1%)
    and ``advantage = max_threshold (TPR - FPR)``."""

    auc: float
    tpr_at_1fpr: float
    advantage: float


def _rank_scale(scores: np.ndarray) -> torch.Tensor:
    """Scores mapped monotonically (ties kept) onto ``[0, 1]``, float64.

    torchmetrics' binary ROC treats predictions outside ``[0, 1]`` as logits and applies a
    sigmoid, which saturates to exactly 1.0 for log-likelihood ratios above ~37 and would merge
    distinct scores into ties; dense ranks keep the order exactly."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if not torch.isfinite(s).all():
        raise ValueError("attack scores must be finite (got NaN or inf)")
    uniq, inv = torch.unique(s, return_inverse=True)
    return inv.double() / max(len(uniq) - 1, 1)


def _roc(scores: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fpr, tpr, thresholds, preds)`` of torchmetrics' binary ROC on rank-scaled scores."""
    preds = _rank_scale(scores)
    fpr, tpr, thr = roc(preds, torch.as_tensor(labels, dtype=torch.long), task="binary")
    return fpr, tpr, thr, preds


def roc_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> AttackMetrics:
    """AUC, TPR at 1% FPR and advantage ``max_threshold (TPR - FPR)`` of a score (larger =
    "member").

    Args:
        scores_in: ``[n_in]`` scores of the members.
        scores_out: ``[n_out]`` scores of the non-members.

    Returns:
        :class:`AttackMetrics` (torchmetrics ``roc`` / ``auroc`` with ``task="binary"``;
        ``advantage`` in ``[0, 1]``: 1 = perfectly separable, 0 = no threshold does better
        than chance).

    Raises:
        ValueError: an empty side, or NaN / inf scores.
    """
    scores_in, scores_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    if scores_in.size == 0 or scores_out.size == 0:
        raise ValueError(f"roc_metrics needs members and non-members, got {scores_in.size} and {scores_out.size}")
    s = np.concatenate([scores_in, scores_out])
    lab = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    fpr, tpr, _, preds = _roc(s, lab)
    auc = float(auroc(preds, torch.as_tensor(lab, dtype=torch.long), task="binary"))
    ok = fpr <= 0.01 + 1e-12
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


# --------------------------------------------------------------------------------------------
# Pool protocol
# --------------------------------------------------------------------------------------------


def pool_splits(num_records: int, num_models: int, num_members: int | None = None, seed: int = 0) -> np.ndarray:
    """Membership matrix of the pool protocol: model ``m`` trains on a uniformly random subset
    of ``num_members`` (default ``num_records // 2``) of the ``num_records`` pool records.

    Returns:
        ``[num_models, num_records]`` bool, ``True`` = IN; every row has exactly
        ``num_members`` entries; each record is IN in about half of the models
        (binomial ``(num_models, num_members / num_records)``).

    Raises:
        ValueError: fewer than 2 records or models, or ``num_members`` not in ``[1, N - 1]``.
    """
    if num_records < 2 or num_models < 2:
        raise ValueError(f"pool_splits needs >= 2 records and >= 2 models, got {num_records} and {num_models}")
    k = num_records // 2 if num_members is None else int(num_members)
    if not 1 <= k <= num_records - 1:
        raise ValueError(f"num_members must be in [1, {num_records - 1}], got {num_members}")
    g = np.random.default_rng(seed)
    member = np.zeros((num_models, num_records), dtype=bool)
    for m in range(num_models):
        member[m, g.permutation(num_records)[:k]] = True
    return member


@torch.no_grad()
def released_parameters(model: nn.Module, scheme: str) -> dict[str, torch.Tensor]:
    """The parameters a release under ``scheme`` publishes, dequantized, in float64.

    Quantized weights are torchao tensor subclasses (``.dequantize()``: codes x scale, the
    zero point subtracted) or float tensors holding the rounded values (built-in ``rtn_*``,
    dtype casts); parameters the scheme leaves in float (biases) are released as they are.

    Returns:
        parameter name (as in ``model``) -> float64 tensor of the parameter's shape.
    """
    q = quantized(model, scheme)
    out = {}
    for name, p in q.named_parameters():
        t = p.dequantize() if type(p) is not nn.Parameter and hasattr(p, "dequantize") else p.detach()
        out[name] = t.detach().to(torch.float64).clone()
    return out


def _loo_moments(sig: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (target m, record i): count, mean and sd (ddof 1) of ``sig[r, i]`` over the
    references ``r != m`` with ``mask[r, i]`` (leave-the-target-out, vectorised)."""
    w = mask.astype(np.float64)
    c = w.sum(0)[None] - w
    s1 = (w * sig).sum(0)[None] - w * sig
    s2 = (w * sig**2).sum(0)[None] - w * sig**2
    cc = np.maximum(c, 1.0)
    mu = s1 / cc
    var = np.maximum(s2 / cc - mu**2, 0.0) * cc / np.maximum(c - 1.0, 1.0)
    return c, mu, np.sqrt(var)


def _check_signals(sig: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sig, member = np.asarray(sig, np.float64), np.asarray(member, bool)
    if sig.shape != member.shape or sig.ndim != 2:
        raise ValueError(f"signals {sig.shape} and membership {member.shape} must both be [models, records]")
    if sig.shape[0] < 3:
        raise ValueError(f"the pool protocol needs >= 3 models (a target and IN/OUT references), got {sig.shape[0]}")
    return sig, member


def _sd_floor(sd: np.ndarray, sig: np.ndarray) -> np.ndarray:
    # a signal that never moves over the references of one side (a code pinned by coarse
    # quantization) has sd 0; a floor far below the record's spread over all models keeps the
    # ratio finite (per record, so that rescaling a record's signal rescales its floor)
    return np.maximum(sd, 1e-6 * np.std(sig, axis=0) + 1e-300)


def lira_scores(signals: np.ndarray, member: np.ndarray, online: bool = True) -> np.ndarray:
    """LiRA (Carlini et al. 2022) of every model against the others, on a per-record signal
    (larger = more member-like; for MSE regression the negative loss).

    Per target ``m`` and record ``i``, Gaussians are fitted to the signal over the reference
    models (all ``r != m``) where ``i`` was IN and where it was OUT (per-record mean and sd).
    Online: score = ``log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out)``. Offline (OUT
    references only): score = ``(s - mu_out) / sd_out`` (LiRA's one-sided test; any monotone
    map of it, e.g. its p-value, has the same ROC).

    Args:
        signals: ``[M, N]`` signal of model ``m`` on pool record ``i``.
        member: ``[M, N]`` bool, record ``i`` in model ``m``'s training half.
        online: use IN and OUT references (else OUT only).

    Returns:
        ``[M, N]`` scores (row ``m``: model ``m`` as the target).

    Raises:
        ValueError: shapes differ or are not 2-D, fewer than 3 models.
    """
    sig, member = _check_signals(signals, member)
    _, mu_out, sd_out = _loo_moments(sig, ~member)
    sd_out = _sd_floor(sd_out, sig)
    z_out = (sig - mu_out) / sd_out
    if not online:
        return z_out
    _, mu_in, sd_in = _loo_moments(sig, member)
    sd_in = _sd_floor(sd_in, sig)
    z_in = (sig - mu_in) / sd_in
    return (-0.5 * z_in**2 - np.log(sd_in)) - (-0.5 * z_out**2 - np.log(sd_out))


def _lira_one_target(sig: np.ndarray, ref_sig: np.ndarray, ref_in: np.ndarray, online: bool,
                     all_sig: np.ndarray) -> np.ndarray:
    """:func:`lira_scores` of one target (signal ``[N]``) against given references ``[R, N]``
    (``all_sig``: every model's signal, for the sd floor as in :func:`lira_scores`)."""
    def fit(mask):
        w = mask.astype(np.float64)
        c = np.maximum(w.sum(0), 1.0)
        mu = (w * ref_sig).sum(0) / c
        var = (w * (ref_sig - mu) ** 2).sum(0) / np.maximum(c - 1.0, 1.0)
        return mu, _sd_floor(np.sqrt(var), all_sig)

    mu_out, sd_out = fit(~ref_in)
    z_out = (sig - mu_out) / sd_out
    if not online:
        return z_out
    mu_in, sd_in = fit(ref_in)
    z_in = (sig - mu_in) / sd_in
    return (-0.5 * z_in**2 - np.log(sd_in)) - (-0.5 * z_out**2 - np.log(sd_out))


def rmia_scores(probs: np.ndarray, member: np.ndarray, online: bool = True, offline_a: float = 0.3,
                gamma: float = 1.0) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024) of every model against the others.

    ``p(x | theta)`` is the model's likelihood of the record's label (for squared-error
    regression a Gaussian likelihood ``exp(-(f(x) - y)^2 / (2 s^2))``); ``p(x)`` is its mean over
    the references -- all ``r != m`` (online; about half have ``x`` IN) or, offline, the OUT ones
    corrected as in the paper: ``((1 + a) p_OUT(x) + (1 - a)) / 2``. With
    ``ratio(x) = p(x | target) / p(x)``, the score of ``x`` is the fraction of the population
    records ``z != x`` of the pool with ``ratio(x) / ratio(z) >= gamma``.

    All records of the pool serve as ``z`` (they are unlabelled for the attacker). With one
    ``z`` set for all records the score is a monotone function of ``ratio(x)``, so ``gamma``
    changes no ROC (it matters only for a fixed decision rule).

    Args:
        probs: ``[M, N]`` likelihoods ``p(x_i | theta_m)`` in ``(0, 1]``.
        member: ``[M, N]`` bool membership.
        online: IN and OUT references (else OUT only, with ``offline_a``).
        offline_a: the paper's ``a`` (Privacy Meter's default 0.3).
        gamma: the pairwise likelihood-ratio threshold.

    Returns:
        ``[M, N]`` scores in ``[0, 1]``.

    Raises:
        ValueError: shapes, fewer than 3 models, ``probs`` outside ``(0, 1]``, ``gamma <= 0``.
    """
    p, member = _check_signals(probs, member)
    if not ((p > 0) & (p <= 1)).all():
        raise ValueError("rmia_scores: probs must be likelihoods in (0, 1]")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if online:
        px = (p.sum(0)[None] - p) / (p.shape[0] - 1)
    else:
        _, p_out, _ = _loo_moments(p, ~member)
        px = ((1 + offline_a) * p_out + (1 - offline_a)) / 2
    ratio = p / px
    out = np.empty_like(ratio)
    n = ratio.shape[1]
    for m in range(ratio.shape[0]):
        rz = np.sort(ratio[m])
        # count z with ratio(z) <= ratio(x) / gamma, minus x itself when it counts itself
        cnt = np.searchsorted(rz, ratio[m] / gamma, side="right") - (gamma <= 1.0)
        out[m] = cnt / (n - 1)
    return out


def whitebox_scores(released: np.ndarray, member: np.ndarray, influence: np.ndarray, online: bool = True,
                    estimator_cov: np.ndarray | None = None, shrinkage: float = 0.1) -> np.ndarray:
    """A LiRA-style likelihood-ratio test on the released parameter vector, along each record's
    influence direction (white-box: the attacker reads the released codes x scales and the
    float biases).

    Choice. Membership of ``z`` moves the estimator's mean by ``psi(z) / n`` (method.md
    section 2) and the spread of the released vector is nearly the same for every record, so
    the Gaussian likelihood-ratio test is linear, along ``C^-1 psi(z)`` with ``C`` the
    covariance of the released vectors. Fitting a separate ``d``-dimensional mean per record from
    the IN and OUT references (diagonal, or a few principal directions) would be dominated by
    noise: with ~``M / 2`` references per side the estimated mean difference has a Mahalanobis
    noise of about ``sqrt(4 d / M)`` (~2 at d = 57..129, M = 129) against a signal
    ``|Sigma^-1/2 psi| / sqrt(n)`` of 0.1-0.5. The influence ``psi(z) = -H^-1 grad loss(z)`` is
    instead computed by the attacker at the model fitted to the whole (known) pool. The
    one-dimensional statistic ``t_m(z) = released_m . C^-1 psi(z)`` is then scored like LiRA:
    Gaussians fitted over the IN / OUT references, so the quantizer's effect on ``t`` is
    measured, not assumed.

    ``C``: with ``estimator_cov`` (the covariance of the unquantized estimator over random
    halves, e.g. the sandwich ``Sigma (N - n) / (n (N - 1))`` computed from the pool), ``C`` is
    that plus, per coordinate, the variance the release adds on top of it over the references
    (``max(var_ref_j - estimator_cov_jj, 0)``: rounding noise, taken as independent across
    coordinates). Without it, the references' sample covariance shrunk towards its diagonal by
    ``shrinkage`` (noisy when ``d`` is close to ``M``). Either way ``1e-9`` of the mean diagonal is
    added (coordinates that never move under a coarse grid), and the target is left out.

    Args:
        released: ``[M, d]`` released (dequantized) parameter vectors.
        member: ``[M, N]`` bool membership.
        influence: ``[N, d]`` influence ``psi(z_i)`` of each pool record.
        online: IN and OUT references (else OUT only).
        estimator_cov: ``[d, d]`` covariance of the unquantized estimator, or ``None``.
        shrinkage: weight of the diagonal in the sample covariance (in ``[0, 1]``; used
            without ``estimator_cov``).

    Returns:
        ``[M, N]`` scores (larger = member).

    Raises:
        ValueError: inconsistent shapes, fewer than 3 models, ``shrinkage`` outside ``[0, 1]``.
    """
    th = np.asarray(released, np.float64)
    psi = np.asarray(influence, np.float64)
    member = np.asarray(member, bool)
    if th.ndim != 2 or psi.ndim != 2 or th.shape[1] != psi.shape[1] or member.shape != (th.shape[0], psi.shape[0]):
        raise ValueError(f"released [M, d] {th.shape}, influence [N, d] {psi.shape} and member [M, N] "
                         f"{member.shape} do not fit together")
    d = th.shape[1]
    if estimator_cov is not None:
        estimator_cov = np.asarray(estimator_cov, np.float64)
        if estimator_cov.shape != (d, d):
            raise ValueError(f"estimator_cov must be [{d}, {d}], got {estimator_cov.shape}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    M = th.shape[0]
    if M < 3:
        raise ValueError(f"the pool protocol needs >= 3 models, got {M}")
    out = np.empty(member.shape)
    for m in range(M):
        refs = np.arange(M) != m
        if estimator_cov is not None:
            extra = np.maximum(th[refs].var(0, ddof=1) - np.diag(estimator_cov), 0.0)
            c = estimator_cov + np.diag(extra)
        else:
            c = np.atleast_2d(np.cov(th[refs], rowvar=False))
            c = (1 - shrinkage) * c + shrinkage * np.diag(np.diag(c))
        c = c + (1e-9 * max(float(np.mean(np.diag(c))), 1e-300)) * np.eye(d)
        v = np.linalg.solve(c, psi.T)  # [d, N]
        t = th @ v  # [M, N]: statistic of every model along this target's directions
        # LiRA on t, the target's own row scored against the references of this direction
        out[m] = _lira_one_target(t[m], t[refs], member[refs], online, t)
    return out


@dataclass
class PoolAttackResult:
    """Advantages of one attack over the targets of the pool protocol.

    ``advantage`` / ``advantage_se``: mean and standard error over targets of
    ``TPR - FPR`` at one threshold for all targets (the maximiser of the pooled ROC over all
    targets' scores; with ``M x N`` scores its selection bias is negligible) -- the estimate of
    the attack's advantage. ``max_advantage`` / ``max_advantage_se``: mean and se of each
    target's own ``max_threshold (TPR - FPR)`` (what a per-target ROC reports; biased upward by
    the maximum over thresholds). ``null_max_advantage``: the same maximum with the labels of
    each target permuted (no membership signal): the size of that bias. ``auc``,
    ``tpr_at_1fpr``: means over targets.
    """

    advantage: float
    advantage_se: float
    max_advantage: float
    max_advantage_se: float
    null_max_advantage: float
    auc: float
    tpr_at_1fpr: float


def pool_advantage(scores: np.ndarray, member: np.ndarray, seed: int = 0) -> PoolAttackResult:
    """Advantage of an attack in the pool protocol (members = the target's half, non-members =
    the other half), per target, summarised over targets.

    Args:
        scores: ``[M, N]`` scores, row ``m`` = model ``m`` as the target (larger = member).
        member: ``[M, N]`` bool membership.
        seed: the label permutations of the null (a stream distinct from :func:`pool_splits`'
            with the same seed).

    Returns:
        :class:`PoolAttackResult`.

    Raises:
        ValueError: shapes differ, a target without members or non-members, non-finite scores.
    """
    sc, member = np.asarray(scores, np.float64), np.asarray(member, bool)
    if sc.shape != member.shape or sc.ndim != 2:
        raise ValueError(f"scores {sc.shape} and membership {member.shape} must both be [models, records]")
    M = sc.shape[0]
    # a stream of its own: with default_rng(seed), the seed of pool_splits, the label permutations
    # would replay the splits' permutations and the "null" labels would be the first N/2 records
    g = np.random.default_rng([seed, 0x6E756C6C])
    per, null = [], []
    for m in range(M):
        per.append(roc_metrics(sc[m, member[m]], sc[m, ~member[m]]))
        perm = g.permutation(member[m])
        null.append(roc_metrics(sc[m, perm], sc[m, ~perm]).advantage)
    fpr, tpr, thr, preds = _roc(sc.ravel(), member.ravel())
    best = int(torch.argmax(tpr - fpr))
    hit = (preds >= thr[best]).numpy().reshape(sc.shape)
    adv = np.array([hit[m, member[m]].mean() - hit[m, ~member[m]].mean() for m in range(M)])
    mx = np.array([p.advantage for p in per])
    se = lambda v: float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")  # noqa: E731
    return PoolAttackResult(advantage=float(adv.mean()), advantage_se=se(adv), max_advantage=float(mx.mean()),
                            max_advantage_se=se(mx), null_max_advantage=float(np.mean(null)),
                            auc=float(np.mean([p.auc for p in per])),
                            tpr_at_1fpr=float(np.mean([p.tpr_at_1fpr for p in per])))
