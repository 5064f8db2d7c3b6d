"""Estimate ``sigma_j`` and the standardised influences ``w(z)`` from a trained model.

method.md section 4. Two modes:

* ``"exact"`` sandwich (up to a few thousand parameters): ``H`` = autograd Hessian of the
  mean training loss (plus ``weight_decay * I``), per-sample gradients ``g_i``,
  ``psi_i = -H^{-1}(g_i - g_bar)``, ``Sigma = H^{-1} V H^{-1}`` with ``V`` the covariance of
  the per-sample gradients; ``sigma_j = sqrt(Sigma_jj / n)``, ``w_j = psi_j / sqrt(Sigma_jj)``.
* ``"diagonal"`` (any size): ``V_jj`` from per-sample gradients, ``H_jj`` exact (small
  models), Gauss-Newton (exact GGN diagonal from per-sample output Jacobians, for models
  with few outputs), its sampled-label Monte Carlo estimate (``"ggn_mc"``, many outputs; error
  bound reported) or Hutchinson (Hessian-vector products, with its standard error
  reported); ``sigma_j^2 = V_jj / (n H_jj^2)`` and ``w_j = (g_j - g_bar_j) / sqrt(V_jj)``.

Gradients are centred by their mean: at a penalised optimum the mean data gradient is
``-weight_decay * theta``, not 0, and the centred covariance is what the sandwich needs.
Every accumulator is a sum over records, so the pass streams over batches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .._fields import canonical_decay, close_param_names, parameter_aliases
from .._heap import raise_mmap_threshold
from .._modelcopy import ModelCopyError, private_copy
from .._precision import full_float32
from .._rng import restores_rng
from .._warning_filters import ignoring
from ..config import DEFAULT_LEVERAGE_CORRECTION
from ..functional.correlated import RCOND as CORRELATION_RCOND
from ..functional.correlated import (
    Correlation,
    SandwichFactor,
    correlation_from_covariance,
    nonfinite_coordinates,
)
from ..threads import scoring_threads
from . import linear_factors as LF
from .batching import items_are_batches, loader_batches, merge_batches
from .data_buffers import InputStatistics, persistent_float_buffers
from .kron_sample import (
    KFAC_SAMPLE_CEILING,
    record_hashes,
    sample_order,
    sample_thresholds,
    sample_truncated,
)
from .linear_factors import (
    GGN_EXACT_MAX_DIRECTIONS,
    KFAC_MIN_RECORDS,
    KFAC_RECORDS_PER_WIDTH,
    V_NONE,
    FactoredProgram,
    KronBlock,
    LayerProgram,
    LinearFactors,
    _BatchTaps,
    _Sparse,
    factored_power_sums,
    iterate_factor_blocks,
    kfac_influence_subsample_scale,
    kfac_inverse_apply,
    kfac_leverage_trace,
    kfac_subsample_scale,
    kfac_variance_inflation,
    per_layer_parameters,
    standardised_influence,
)
from .loss_directions import Held, LossDirectionSample
from .output_reads import OutputShape, OutputTree, flat_outputs, output_numel
from .per_sample import (
    FACTORS_OVER_BUDGET,
    RECURRENT_LAYERS,
    BatchFn,
    ComputeDtypeLoss,
    LossFn,
    LossProgram,
    default_batch_fn,
    load_forward_ad_decompositions,
    packed_sequence_error,
    packed_sequence_watch,
    vmap_fallback_quiet,
)
from .records import (
    batch_size_of,
    cat_state,
    prune_bottom_k,
    record_keys,
    repeated_records,
    slice_rows,
    slice_tree,
    split_batch,
    storable_rows,
    store_records,
)
from .symmetries import (
    SCALE_INVARIANT_NORMS,
    attention_head_tangents,
    attention_heads,
    normalised_layers,
    scale_free_reparametrizations,
    weight_normed,
)

__all__ = ["DEFAULT_BUDGET", "EXACT_MAX_PARAMS", "Estimate", "MomentAccumulator", "choose_estimator",
           "describe_estimator", "estimate", "estimator_warnings", "note_unknown_records", "record_keys",
           "recurrent_cost_factor", "reused_layers"]

# the layers whose sigma the K-FAC (KFC) correction serves where a per-layer program runs (_kfac_lost)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

Mode = Literal["auto", "exact", "diagonal"]
HessianMode = Literal["auto", "exact", "ggn", "ggn_mc", "hutchinson"]

EXACT_MAX_PARAMS = 2000  # "auto" uses the exact sandwich up to this many parameters
# "auto" also skips the exact sandwich above this many records x d^2 (its Hessian and d x d
# sums cost ~n d^2 multiply-adds for a dense model; 1e11 is about a minute on one core).
EXACT_MAX_COST = 1e11
# Layers that reuse their weights over positions (convolutions, recurrences, attention): one
# forward pass costs far more than d multiply-adds per record, and the exact Hessian needs d
# forward-over-reverse passes of it (a 1,466-weight CNN: minutes and ~12 GB against ~1 s for
# the Gauss-Newton diagonal). "auto" does not pick an exact Hessian for models holding them.
WEIGHT_REUSE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
)
# ... unless the first batch shows the exact sandwich is cheap for them: n x d x (floats one
# record's forward produces) below this (a few seconds), with d <= EXACT_MAX_PARAMS. The diagonal
# sandwich's sigma ignores the weights' correlation (method.md section 4), which reuse layers make
# strong: on a 4-weight linear Conv1d over an AR(1) input the default read 40-72% below the exact
# truth, the exact estimator within 2%. Measured: ~5e-8 s per unit of n d x floats on one core
# (examples/cnn_callback.py's 1,364-weight CNN: 13 s at 2.2e8, 43 s at 8.6e8 with n = 64 / 256,
# against 0.2 s for the diagonal sandwich), so this bound keeps the exact pass to a few seconds.
EXACT_REUSE_MAX_COST = 5e7
# ... with n d F weighted by this per recurrent layer type (the largest of the model's): the loss
# program takes their records one at a time (rn43; torch.func's vmap over records fails on torch's
# RNN kernels), so a unit costs more than the vmapped ~5e-8 s above. Measured (fu43, one core,
# benchmarks/fu43_recurrent_cost.py: nu42a's tied language models, d = 108, exact Hessian):
# LSTM 2.2e-7 / 2.4e-7 / 2.7e-7 s per unit at n = 96 / 192 / 384 (4.5-5.3x), GRU 5.1e-8 (1.0x),
# RNN 9.0e-8 (1.8x) at n = 192. Cells (nn.LSTMCell ...: a Python loop over steps) were not
# measured: the LSTM's factor, the largest.
RECURRENT_COST_FACTORS: dict[type[nn.Module], float] = {nn.LSTM: 5.0, nn.GRU: 1.0, nn.RNN: 2.0}
# ... and this much where a layer's weights have a scale symmetry (before a normalisation, or
# under weight_norm; symmetries.py): the diagonal estimator cannot represent that flat direction
# and read such models' quantized figures 0.78-3.9x the exact estimator's (ln40: Conv1d ->
# GroupNorm / LayerNorm -> Linear, n = 3,000-4,000), so the exact pass is worth ~10x its cost there
# (6-35 s CPU against ~1 s at n = 4,000, d = 169-396).
SYMMETRY_EXACT_MAX_COST = 10 * EXACT_REUSE_MAX_COST
# Above it, a model piecewise linear in each module's weights (PIECEWISE_LINEAR_LAYERS) gets the
# same exact sandwich with its Hessian assembled as Gauss-Newton + residual (hessian="ggn_residual":
# the residual's columns on all but the largest module, whose own block is zero) while
# n x (d - largest module's weights) x forward floats is below this. Measured (gn28, one core):
# ~1.5e-8 s per unit (examples/cnn_callback.py's CNN, n = 4,096: 100 of 396 columns, 1,620 floats,
# 6.6e8: ~10 s, against ~66 s for the exact Hessian's 396 columns of the loss), so ~15-25 s at most.
# cn29 took the columns one module at a time (batch_residual): the pass is 2.3-2.5x cheaper
# (docs/benchmarks.md "cn29"); the bound is unchanged, so "auto" chooses as before.
RESIDUAL_MAX_COST = 1e9
# Leaf modules through which the outputs stay affine in each module's weights (BatchNorm in eval
# mode: an affine map of fixed running statistics; ReLU and pooling: piecewise linear, second
# derivative zero almost everywhere). The first batch checks the zero block numerically.
PIECEWISE_LINEAR_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.LeakyReLU, nn.ReLU6,
    nn.Hardtanh, nn.PReLU, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten, nn.Unflatten,
    nn.Identity, nn.Dropout, nn.modules.dropout._DropoutNd, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)
# Without an explicit ``dtype``, the diagonal estimator's per-sample passes (the per-layer and
# factored nn.Linear programs) compute in float64 up to this many weights and in float32 above
# (oneDNN kernels, ~2.5x faster on a CNN); their sums accumulate in float64 either way
# (``acc_dtype``), and the exact estimator and the torch.func path keep ``dtype``. The float32
# figures differ from the float64 ones by ~1e-6 relative (method.md section 4, "Precision").
FAST_FLOAT64_MAX_PARAMS = 10_000
# Training records "auto" assumes where a stream does not say how many it will hold (weighs the
# exact sandwich's cost on weight-reuse models; finalize says when the n seen chooses otherwise).
N_ASSUMED = 10_000
# How the report names training data whose length counts batches (batching.items_are_batches)
UNKNOWN_RECORDS_SOURCE = "yields whole batches (DataLoader(batch_size=None)): its length counts batches, not records"
# A sampled-label Gauss-Newton diagonal whose median relative standard error (a bound) exceeds
# this gets a line in the report's warnings: sigma_j moves by as much.
GGN_MC_WARN_RELATIVE_ERROR = 0.1
# Flag a model whose distance to the minimum of the assessed objective exceeds this many of
# theta-hat's own sampling standard deviations (root mean square per weight; _not_at_minimum)
MINIMUM_OFFSET_SD = 1.0
# ... or whose penalised mean gradient exceeds this fraction of a per-sample gradient (root mean square)
GRADIENT_NORM_RATIO_MAX = 0.1
# Records unlike the training set (exact estimator, _stiff_offset): the mean gradient's t-statistics
# along the Hessian's stiffer half read ~0 on the records a fit converged on, even one stopped short
# (the stiff directions converge first), and ~N(0, 1 + m / n_train) each on records the fit never saw
# (a validation or test set), whose root mean square is below 0.5 with probability
# P(chi2_K < K / 4) over K such directions (0.009 at K = 10): docs/benchmarks.md, "nf50b". A model
# fitted to another objective than the one assessed reads above it on its own records too (nux51's
# tied LM, AdamW's decay not passed: 0.66; "hd51"): the warning names both causes
UNSEEN_RECORDS_SD = 0.5
# The weight-decay hint (_decay_hint): the assessed objective's mean gradient within this cosine
# of -theta, and its norm at least this fraction of a per-sample gradient's (rms), reads as a
# minimum of the loss plus another weight decay (docs/benchmarks.md, "wd48")
DECAY_HINT_COSINE = 0.99
DECAY_HINT_RATIO = 1e-4
# gradient variances below this fraction of the largest are rounding (dead units): left out of
# the offset statistic, whose terms divide by them
V_RELATIVE_FLOOR = 1e-12
GGN_MAX_OUTPUTS = 16  # "auto" uses the Gauss-Newton diagonal up to this many outputs per record
# Leverage above which the finite-sample correction is capped (method.md section 4, "Finite-sample
# (leverage) correction"): 1 / (1 - h) diverges at h = 1, which a GGN factor can only reach
# against a damped or sign-flipped Hessian.
LEVERAGE_CAP = 0.95
# The HC2 term of a record with several loss directions (rank(L_i) > 1; method.md section 4, "Gradient
# covariance"): "matrix" inflates its gradient by (I - A_i)^-1/2 in its own output directions, the form whose
# expectation is right in each of them (E[r r'] = (I - A_i) L_i for the in-sample residual; exact for linear
# models); "per_direction" (A/B) inflates the whole gradient by 1 / (1 - h_i / rank(L_i)), the mean, which
# understates the leverage along A_i's large directions, where the residual lies: against label draws on a
# softmax regression the deficit along A_i's top direction read 0.19 (matrix 0.20, per direction 0.095;
# docs/benchmarks.md "hc59"). One direction (rank 1): 1 / (1 - h_i) either way; an indefinite L_i (no
# L^1/2; not a covariance, so HC2's argument does not hold) keeps the per-direction form.
HC2_FORM = "matrix"
# The diagonal estimator's count of loss directions per record (rank(L_i), the denominator of its
# mean leverage per direction; method.md section 4, "Finite-sample (leverage) correction"): the mean
# over this many records, those with the smallest content keys of the whole pass (a sample that
# does not depend on the loader's order nor on the split over processes: loss_directions.py), from
# the loss Hessian in the outputs where a record has at most LOSS_RANK_MAX_OUTPUTS outputs (C x C
# each); above, every output counts as one direction. Measured LOSS_RANK_BLOCK records at a time.
LOSS_RANK_RECORDS = 64
LOSS_RANK_BLOCK = 16
LOSS_RANK_MAX_OUTPUTS = 1024
LOSS_DIRECTIONS_RTOL = 1e-4
LeverageOption = bool | Literal["auto"]
log = logging.getLogger(__name__)

# Stored records per forward/backward pass when their per-sample gradients are recomputed
# (activations of a batch of this size; the default num_records in one pass).
TAP_BLOCK = 512
# Records per block of the scoring's per-record power sums from per-sample gradients: a
# [32, numel] block stays in cache through its three element-wise passes and two products
# (1.7x faster than whole [chunk, numel] float64 passes at the same figures, measured)
POWER_SUM_ROWS = 32
# The diagonal estimator's fast programs take consecutive loader batches merged up to this
# many records (batching.merge_batches: fewer fixed per-batch costs; the sums do not depend on
# the grouping), within MERGE_FLOATS floats of per-record layer taps held for the batch
MERGE_MAX_RECORDS = 512
MERGE_FLOATS = 1 << 24
# The factored nn.Linear program of a small model (what an update holds per record -- the batch, the
# forward's saved activations, every layer's including those not assessed, and the taps -- x
# MERGE_SMALL_RECORDS within MERGE_SMALL_FLOATS float32's bytes: 32 MiB) takes up to MERGE_SMALL_RECORDS records per update: its
# per-update costs (the forward's and backward's operators, the loss derivatives' vmap, the record
# keys' and the K-FAC sample's steps, the sums' setup) were a large share of its pass (p54b: the
# 1e5-weight MLP's 4,096 records in 3 updates instead of 9). Not bitwise: each float32 GEMM of the
# gradient and K-FAC sums adds 4x the records before its float64 accumulation (at 1e5 weights the
# leakages and MIS moved <= 1.6e-8 relative, the K-FAC VIF diagnostics <= 7e-5: docs/benchmarks.md
# "p54b"; a measurement, not a bound: on a 16-128-128-1 ReLU MLP, 18,817 weights, sigma moved <= 8.9e-6
# (the float32 worst case, 2048 u = 1.2e-4, is what tests/test_batching.py pins), the schemes' leakage
# <= 7.1e-6 and a layer's <= 3.4e-5, far under the report's 3-4 printed digits: "rv55"). Weights in
# float64 (<= FAST_FLOAT64_MAX_PARAMS) move <= 2e-10. False: MERGE_MAX_RECORDS everywhere, as before (A/B).
SMALL_MODEL_MERGES = True
MERGE_SMALL_RECORDS = 2048
MERGE_SMALL_FLOATS = 1 << 23
DEFAULT_BUDGET = 1 << 25  # floats held at once by per-sample buffers (~128 MiB in float32)
# Above this many weights (where the sums are accumulated in float32 anyway) and without stored
# influences, the estimate's per-weight state (theta, sigma, the gradient means and variances)
# is held in float32 and computed in chunks of FINALIZE_CHUNK weights (MomentAccumulator._finalize_lean):
# 16 bytes per weight held instead of 32, no whole-model float64 temporaries.
FLOAT32_STATE_MIN_PARAMS = 10_000_000
FINALIZE_CHUNK = 1 << 22
# ... each block in sub-blocks of this many weights (float64 temporaries of 512 KiB: in cache, and
# reused by the allocator; es33)
FINALIZE_SUB_CHUNK = 1 << 16
# the diagonal estimator's K-FAC correction of sigma (MomentAccumulator._kfac_factors); False: the
# uncorrected diagonal sandwich (A/B benchmarks: benchmarks/kfac_sigma.py --cost)
KFAC_CORRECTION = True
# the stored influences of the K-FAC-corrected layers are those of psi = -H^-1 g under the same
# Kronecker model (MomentAccumulator._kfac_influences); False: the gradients' g / sqrt(V_jj) (A/B)
KFAC_INFLUENCES = True
# the diagonal leverage correction's trace, where the per-layer program holds a layer's Kronecker
# factors and a weight decay acts on it: the layer's tr((K + lambda)^-1 K) under that model in place of
# its diagonal terms sum_j K_jj / (K_jj + lambda) (never above them), which read far above it where a few
# stiff directions spread over many weights (dg52: nu49's wide tanh MLP, 174 against the exact 6; the
# headline 2.29x the exact estimator's). OFF by default (lead, s52): that over-read is on the safe side,
# while the Kronecker trace omits the correlation across layers and moved figures already below the exact
# estimator's further down (nu48's MLPs 0.96-1.04x -> 0.88-0.91x, kc32's CNN at decay 1e-3 0.73-0.88x ->
# 0.71-0.85x; docs/benchmarks.md "dg52"): a lower privacy figure needs a reference showing it is nearer the
# truth, which only the wide model gave. True: the Kronecker trace (A/B; tests/test_kfac_sandwich_decay.py)
KFAC_LEVERAGE_TRACE = False
# dg55: the diagonal estimator flags its own figures as possibly below the exact estimator's where the
# records' mean leverage per loss direction, counted with each decayed layer of the per-layer program under
# its Kronecker model (min with the diagonal count; the diagonal count alone elsewhere), exceeds
# DIAGONAL_LOW_READ_LEVERAGE: diagnostics["diagonal_low_read"], "*" in the table, a sentence in the leverage
# warning. Measured on dg52's 10 models (docs/benchmarks.md "dg55"; benchmarks/dg55_low_read.py): the three
# whose diagonal figures read below 0.95x the exact estimator's count 0.054-0.086 there (a ReLU CNN at decay
# 1e-3, whose exact per-record leverages near 1 raise its figures 1.57x against the uniform correction's
# 1.11x; two MLPs calling a layer twice, the correlation across layers), the seven at 0.95x or above
# 0.0005-0.022. An empirical threshold between those, not a bound. Nothing else changes (the figures are
# bitwise the same); False: no flag (the path before dg55)
DIAGONAL_LOW_READ_FLAG = True
DIAGONAL_LOW_READ_LEVERAGE = 0.04
# dg56: where the flag is set, estimator_warnings says what to do about it with this model's sizes: the exact
# estimator's cost n d^2 and memory d^2 (float64) against what "auto" itself allows it (EXACT_MAX_COST), and
# the figures measured under "auto" just above EXACT_MAX_PARAMS (DIAGONAL_LOW_READ_AUTO_FIGURES); the flag's
# dict carries d and n for it. False: no such line, the dict as before (A/B; the figures are the same either way)
DIAGONAL_LOW_READ_REMEDY = True
# dg56 (docs/benchmarks.md "dg56"; benchmarks/dg56_diagonal_auto.py): the diagonal estimator under
# estimation="auto" (chosen for d > EXACT_MAX_PARAMS) over the exact one, on models just above that threshold.
# ex58: dg56's command re-run at its own commit and on main reads 0.586 / 0.597 / 0.634 at decay 1e-2 (dg57's
# 0.59-0.61 at 1e-3); dg56's printed 0.44-0.56x came from exact figures (0.350 / 0.493 unquantized) that no
# commit reproduces, so the range is the reproduced one; the loss attack's ratios as re-run (1e-2) and dg56's (1e-3)
DIAGONAL_LOW_READ_AUTO_FIGURES = (
    "0.59-0.63x on ReLU 20-80-5 classifiers (d = 2,085, n = 4,000, decay 1e-2 / 1e-3; flagged at 0.054 / 0.16 per "
    "direction), where a loss-threshold attack's advantage read 0.17-0.67x these figures")
# dg57 (docs/benchmarks.md "dg57"; benchmarks/dg57_lira_auto.py): reference-model attacks (RMIA, LiRA; the pool
# protocol, 15 references per target) on those classifiers against both estimators' pool_leakage: the real
# attacks stay below the diagonal figures, so there the exact estimator's higher figures are the more
# conservative ones, not shown to be nearer the truth. The clause names the models itself: the leverage
# warning quotes it after dg55's figures, whose ReLU 20-80-5 classifiers are kf33's at n = 1,000 (rv57c: "those
# ReLU classifiers" read as them). dg56's exact per-record leverages (3.3-4.6, 31 / 169 records capped) did not
# reproduce in dg57 (decay 1e-2: max 0.65, none capped), so no text claims them
DIAGONAL_LOW_READ_ATTACK_FIGURES = (
    "reference-model attacks (RMIA, LiRA; the pool protocol, 15 references per target) on two benchmark "
    "ReLU 20-80-5 classifiers (d = 2,085, n = 4,000) reached 0.14 / 0.26 unquantized at decay 1e-2 / 1e-3 "
    "(0.11 / 0.19 under rtn_int4), below the diagonal estimator's "
    "pool_leakage 0.21 / 0.32 (1.5x / 1.2x the attacks) and far below the exact estimator's 0.37 / 0.52 (2.7x / "
    "2.0x): there the exact figures are the more conservative ones, not shown to be nearer the truth")
# dg57: the exact estimator's CPU time at the size of those classifiers (d = 2,085, n = 4,000; one thread, load
# 8-15; benchmarks/dg57_lira_auto.py profile): its Hessian's d forward-over-reverse passes over the n records
# took about half, the d x d decompositions of its finalize and of the correlated scoring (d^3 each, some 20
# of them) the rest; the n d^2 of its sums alone would be seconds
EXACT_MEASURED_COST = "57-111 CPU s at d = 2,085, n = 4,000"
# records whose loss does not depend on the weights are left out of n (LossProgram.void_rows; sm45);
# False: every record read counts (A/B of the test's cost: benchmarks/vb46_void_cost.py)
VOID_RECORD_TEST = True
# the widest layer (fan-in + bias + fan-out) given psi's influences: their cost, 2 R out p (out + p)
# flops (4x with weight decay) for R stored records, is then at most ~2x the in-sample correlation's
# R^2 numel Gram at R = 512 (a 200-256 layer: +1.8 s CPU, 1.45x the estimation); wider layers keep
# the gradients' influences (diagnostics["kfac_influences_left"])
KFAC_INFLUENCE_MAX_WIDTH = 1024


class _CopiedEmpty(dict):
    """A cache an :class:`Estimate` holds whose entries key on its own tensors by weak reference
    (``Estimate._unit_sums``): a pickle or a copy of the estimate starts it empty (a weak reference
    cannot be pickled, and a copy's tensors are other objects: it recomputes what it reads)."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return type(self), ()


@dataclass
class Estimate:
    """What the estimation pass returns.

    Attributes:
        n: number of training records seen.
        mode: ``"exact"`` or ``"diagonal"``; ``hessian``: how ``H`` (or its diagonal) was had.
        names: assessed parameter names; ``shapes``: their shapes; ``offsets``: flat ranges.
        theta: ``{name: [numel]}`` float64 trained weights (the estimator's own dtype --
            float32, the weights it computed with, exactly -- for models above
            :data:`FLOAT32_STATE_MIN_PARAMS` weights without stored influences).
        sigma: ``{name: [numel]}`` float64 (float32 as ``theta``: relative rounding 6e-8) std of each trained weight ``theta-hat_j``
            (parameter units; lower-case sigma = ``sqrt(Sigma_jj / n)``, with ``Sigma`` the
            ``[d, d]`` sandwich covariance of the per-record influence ``psi``).
        influence: ``[R, d]`` standardised influences ``w = psi / sqrt(diag Sigma)`` of the R
            stored records (dimensionless), or ``None`` when they are recomputed per
            parameter (large models); deprecated alias ``w``. Read them, whatever the path,
            with :meth:`iter_influence` or :meth:`power_sums`.
        mahalanobis: ``[R]`` ``|Sigma^{-1/2} psi|`` per record (exact mode only).
        leverage: ``[R]`` the variance fraction a member removes along its own shift direction
            (the scoring's spread term; method.md section 4, "Spread term") of the stored
            records, in the order of ``influence``: ``h_i`` where ``rank(L_i) = 1`` (one output,
            a two-class softmax), the directional ``c' V^+ J' L J V^+ c / (n c' V^+ c)`` where
            ``rank(L_i) > 1``; capped at :data:`LEVERAGE_CAP`. Only where the
            finite-sample (leverage) correction was applied; ``None`` otherwise (first-order forms).
        correlation: ``[d, d]`` correlation matrix of ``Sigma`` (exact mode only; dimensionless).
        self_term, self_weight: ``[R, d]`` and ``[R]``, exact mode with the leverage correction
            and fewer records stored than trained on (else ``None``): stored record ``i`` is
            scored through its own covariance ``R - self_weight_i x_i x_i'`` (``x_i`` the row of
            ``self_term``, in the units of ``influence``; ``R`` = ``correlation`` times
            ``diag Sigma``'s scale, i.e. the same standardisation), the HC2 term's
            leave-one-out estimate (method.md section 4, *Gradient covariance*).
            ``mahalanobis`` already includes it; the correlated forms apply it by
            Sherman-Morrison (``functional.correlated.Correlation``).
        influence_scale: the factor the diagonal estimator's finite-sample (leverage) correction
            put on every standardised influence, ``1 / sqrt(1 - h_bar)`` (method.md section 4;
            1.0 without it): the leave-one-out shifts over the corrected sigma. Correlation
            models of the weights, which assume unit-variance influences, are fitted to
            :meth:`unit_influence`.
        diagnostics: method.md section 6 diagnostics.
        factors: per-record factors of Linear layers (the factored diagonal path, see
            ``linear_factors``): ``w`` of those records is a product of small matrices and is
            never materialised for the whole model.
        estimator: which estimator ran (:func:`describe_estimator`); ``reason``: why
            (``"requested"`` or the ``"auto"`` rule that chose it, see :func:`choose_estimator`).
    """

    n: int
    mode: str
    hessian: str
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, tuple[int, int]]
    theta: dict[str, Tensor]
    sigma: dict[str, Tensor]
    influence: Tensor | None
    num_records: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    mahalanobis: Tensor | None = None
    correlation: Tensor | None = None
    correlation_factor: SandwichFactor | None = None
    leverage: Tensor | None = None
    self_term: Tensor | None = None
    self_weight: Tensor | None = None
    influence_scale: float = 1.0
    _program: LossProgram | None = None
    _records: list[tuple[Any, Any]] | None = None
    _g_mean: dict[str, Tensor] | None = None
    _v_diag: dict[str, Tensor] | None = None
    budget: int = DEFAULT_BUDGET
    factors: list[LinearFactors] | None = None
    estimator: str = ""
    reason: str = ""
    _tap_cache: list | None = None
    # exact mode where the eigenvalue floor bites: {factor: the estimate's exact-mode fields
    # (sigma, influence, mahalanobis, correlation, leverage) with the floor at factor x damping}
    # (sandwich_compute's floor_variants; the scoring's floor_sensitivity); None otherwise
    _floor_variants: dict[float, dict[str, Any]] | None = None
    # the power sums of the scoring pass's unit columns, which depend on the estimate alone (assess.UNIT_SUMS_ONCE):
    # {(name, a, b, power): (the inputs' key, [R] float64 sums)}; not compared, not shown
    _unit_sums: dict[Any, Any] = field(default_factory=_CopiedEmpty, repr=False, compare=False)
    # the power sums' chunk setups of the scoring pass's factored weights (assess.HOLD_CHUNK_SETUP):
    # {(name, a, b): (the inputs' key, the setup, its bytes), "bytes": their total}; not compared, not shown
    _chunk_setups: dict[Any, Any] = field(default_factory=_CopiedEmpty, repr=False, compare=False)

    def release_caches(self) -> int:
        """Drop what scoring calls left in this estimate to speed later calls on it: the unit
        columns' power sums and the factored weights' per-chunk setups (up to
        ``assess.HELD_SETUP_BYTES``, 256 MiB; ~35 MiB for a 1e7-weight MLP). A later scoring call
        recomputes them (the same figures, bitwise). For a process that keeps many scored estimates.

        Returns:
            the bytes of the tensors released (held setups only; the unit sums are ``[R]`` each).
        """
        held = int(self._chunk_setups.get("bytes", 0))
        self._unit_sums.clear()
        self._chunk_setups.clear()
        return held

    @property
    def d(self) -> int:
        """Number of assessed weights."""
        return sum(e - s for s, e in self.offsets.values())

    def cpu(self) -> Estimate:
        """This estimate with every tensor it holds on the CPU (``self`` when all are): the
        scoring runs on the CPU, whatever device the estimation pass ran on (its buffers and
        float64 sums are CPU tensors; a CUDA model's stored factors and influences mixed with them
        failed on GPU). The model and batches (``_program``, ``_records``) stay where they
        are: what they recompute is moved by :meth:`iter_influence` / :meth:`_layer_blocks`."""
        keep = ("_program", "_records")
        # the scoring's caches key on the copy's own tensors: the copy starts its own (rv51: shared
        # with the copy, they filled the user's estimate with entries no later copy could read)
        fresh = ("_unit_sums", "_chunk_setups")
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in keep + fresh}
        if not any(t.device.type != "cpu" for t in _tensors(moved)):
            return self
        return dataclasses.replace(self, **{k: _to_cpu(v) for k, v in moved.items()},
                                   **{k: _CopiedEmpty() for k in fresh})

    def __setstate__(self, state: dict[str, Any]) -> None:
        # an estimate pickled before a field with a default existed (the scoring's caches: s50, s51)
        # gets the default, not an AttributeError at its first scoring (rv51)
        for f in dataclasses.fields(self):
            if f.name not in state and f.default_factory is not dataclasses.MISSING:
                state[f.name] = f.default_factory()
            elif f.name not in state and f.default is not dataclasses.MISSING:
                state[f.name] = f.default
        self.__dict__.update(state)

    @property
    def w(self) -> Tensor | None:
        """Deprecated alias of :attr:`influence`."""
        warnings.warn("Estimate.w is deprecated; use Estimate.influence", DeprecationWarning, stacklevel=2)
        return self.influence

    def unit_influence(self) -> Tensor | None:
        """``[R, d]`` the stored influences over :attr:`influence_scale` (unit variance per
        weight: what a correlation model of the weights is fitted to), or ``None``."""
        if self.influence is None or self.influence_scale == 1.0:
            return self.influence
        return self.influence / self.influence_scale

    @property
    def influence_stored(self) -> bool:
        """Whether the ``[R, d]`` influences are held (the Monte Carlo form needs them)."""
        return self.influence is not None

    def power_sums(self, name: str, columns: Mapping[int, Tensor]) -> dict[int, Tensor]:
        """Per-record weighted power sums of the influences of one parameter.

        ``out[p][r, m] = sum_j w_rj^p columns[p][j, m]`` over the weights ``j`` of ``name``,
        for each even power ``p`` (2 or 4): what the Gaussian form's sums need
        (:class:`~mis_lightning.functional.CltSums`). Factored Linear layers use bilinear forms
        of their factors (no ``[R, numel]`` tensor); otherwise the influences are read once,
        in record blocks (:meth:`iter_influence`).

        Args:
            name: an assessed parameter.
            columns: ``{p: [numel, M_p]}`` float64 weights of each coordinate.

        Returns:
            ``{p: [R, M_p]}`` float64.

        Raises:
            ValueError: a power other than 2 or 4.
        """
        bad = [p for p in columns if p not in (2, 4)]
        if bad:
            raise ValueError(f"power_sums supports powers 2 and 4, got {bad}")
        factor = self._factor_of(name)
        if factor is not None:
            assert self._g_mean is not None and self._v_diag is not None
            layer, is_bias = factor
            gm, vd = self._centring(name)
            return {p: factored_power_sums(layer, gm, vd, c, p, bias=is_bias) for p, c in columns.items()}
        out = {p: torch.zeros(self.num_records, c.shape[1], dtype=torch.float64) for p, c in columns.items()}
        if self.influence is None and isinstance(self._program, LayerProgram):
            return self._layer_power_sums(name, columns, out)
        for r0, r1, wd in self.iter_influence([name]):
            w2 = wd[name].to(torch.float64).square()
            for p, c in columns.items():
                out[p][r0:r1] += (w2 if p == 2 else w2.square()) @ c
        return out

    def _layer_blocks(self, names: list[str]) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """:meth:`_program_blocks` on the CPU (a CUDA model's recomputed gradients: see :meth:`cpu`)."""
        for r0, r1, g in self._program_blocks(names):
            yield r0, r1, _to_cpu(g)

    def _program_blocks(self, names: list[str]) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(r0, r1, {name: per-sample gradients [r1 - r0, numel] or sparse})`` of the stored
        records, by the per-layer program (:class:`LayerProgram`). Each block's layer taps
        (inputs and output gradients: one forward and one backward pass for all parameters)
        are computed once and kept while they fit in ``budget`` floats, so the scoring's one
        call per parameter does not pass through the model again; otherwise recomputed per call."""
        prog = self._program
        assert isinstance(prog, LayerProgram) and self._records is not None
        if self._tap_cache is not None:
            for r0, _, taps in self._tap_cache:
                for a, c, g in prog.iter_grads(taps, names):
                    yield r0 + a, r0 + c, g
            return
        step = TAP_BLOCK
        cache: list | None = []
        size, r0 = 0, 0
        for inputs, targets in self._records:
            b = batch_size_of(targets)
            for x, y in split_batch(inputs, targets, b, step):
                bb = batch_size_of(y)
                taps = prog.record_taps(x, y, bb)
                if cache is not None:
                    size += taps.numel()
                    cache = cache + [(r0, r0 + bb, taps)] if size <= self.budget else None
                for a, c, g in prog.iter_grads(taps, names):
                    yield r0 + a, r0 + c, g
                r0 += bb
        if cache is not None:
            self._tap_cache = cache

    def _layer_power_sums(self, name: str, columns: Mapping[int, Tensor], out: dict[int, Tensor]
                          ) -> dict[int, Tensor]:
        """:meth:`power_sums` from the per-layer program's per-sample gradients; an embedding's
        sparse gradients (the rows a record touches) without a dense ``[R, numel]`` tensor:
        an untouched coordinate has ``w_rj = gbar_j / sqrt(V_jj)`` for every record."""
        assert self._g_mean is not None and self._v_diag is not None
        gm, vd = self._centring(name)
        sd = vd.clamp_min(V_NONE).sqrt()
        inv_sd = torch.where(vd > V_NONE, 1.0 / sd, torch.zeros_like(sd))  # no variance: no influence
        low = {}  # float32 copies, made on the first float32 block
        for r0, r1, g in self._layer_blocks([name]):
            v = g[name]
            if not isinstance(v, _Sparse):
                v = v.reshape(r1 - r0, -1)
                if v.dtype == torch.float32 and not low:
                    low = {"gm": gm.float(), "inv_sd": inv_sd.float(),
                           **({"c2": columns[2].float()} if 2 in columns else {})}
                # w^2 = ((g - gbar) / sqrt(V))^2 in blocks of POWER_SUM_ROWS records (in cache),
                # in place on a fresh copy. float32 gradients: w and the p = 2 product in float32
                # (the gradient's own precision; the product's relative error ~5e-7, measured,
                # docs/method.md section 4), the p = 4 product (heavier tailed) in float64.
                for q0 in range(0, r1 - r0, POWER_SUM_ROWS):
                    q1 = min(q0 + POWER_SUM_ROWS, r1 - r0)
                    rows = slice(r0 + q0, r0 + q1)
                    if v.dtype == torch.float32:
                        w2 = (v[q0:q1] - low["gm"]).mul_(low["inv_sd"]).square_()
                        if 2 in columns:
                            out[2][rows] += w2 @ low["c2"]
                        w2 = w2.double()
                    else:
                        w2 = v[q0:q1].to(torch.float64, copy=True).sub_(gm).mul_(inv_sd).square_()
                        if 2 in columns:
                            out[2][rows] += w2 @ columns[2]
                    if 4 in columns:
                        out[4][rows] += w2.square_() @ columns[4]
                continue
            base = gm / sd  # [numel]
            width = v.shape[1]
            for p, c in columns.items():
                out[p][r0:r1] += base.pow(p) @ c
            # the touched entries as a CSR matrix [records, numel] (one per power) times the
            # columns: no [pairs, width, columns] gather (6x faster on a 1,000 x 64 table)
            step = max(1, self.budget // max(width, 1))
            for u0 in range(0, v.row.numel(), step):
                u1 = min(u0 + step, v.row.numel())
                order = torch.argsort(v.sample[u0:u1], stable=True)
                smp, row = v.sample[u0:u1][order], v.row[u0:u1][order]
                idx = (row * width).unsqueeze(-1) + torch.arange(width)  # [U, D]
                wt = -(v.g[u0:u1][order].to(torch.float64) - gm[idx]) / sd[idx]
                crow = torch.zeros(r1 - r0 + 1, dtype=torch.long)
                crow[1:] = torch.bincount(smp, minlength=r1 - r0).cumsum(0) * width
                for p, c in columns.items():
                    delta = (wt.pow(p) - base[idx].pow(p)).reshape(-1)
                    mat = torch.sparse_csr_tensor(crow, idx.reshape(-1), delta, (r1 - r0, c.shape[0]))
                    out[p][r0:r1] += mat @ c
        return out

    def _centring(self, name: str, sel: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """float64 ``(g_bar, V_jj)`` of ``name`` (elements ``sel``): held in float32 by large
        models (:data:`FLOAT32_STATE_MIN_PARAMS`), the arithmetic on them stays float64."""
        assert self._g_mean is not None and self._v_diag is not None
        gm, vd = self._g_mean[name], self._v_diag[name]
        if sel is not None:
            gm, vd = gm[sel], vd[sel]
        return gm.to(torch.float64), vd.to(torch.float64)

    def _factor_of(self, name: str) -> tuple[LinearFactors, bool] | None:
        """The Linear layer factors holding ``name`` and whether it is the bias, if any."""
        for fac in self.factors or ():
            if fac.weight == name:
                return fac, False
            if fac.bias == name:
                return fac, True
        return None

    def iter_w(self, names: Iterable[str] | None = None) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
        """Deprecated alias of :meth:`iter_influence`."""
        warnings.warn("Estimate.iter_w is deprecated; use Estimate.iter_influence", DeprecationWarning,
                      stacklevel=2)
        return self.iter_influence(names)

    def iter_influence(self, names: Iterable[str] | None = None) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
        """Yield ``(r0, r1, {name: influence [r1 - r0, numel]})`` over record blocks.

        Stored influences are sliced; otherwise each parameter's per-sample gradients are
        recomputed for a block of records at a time, so the buffer stays below ``budget``.
        """
        names = list(self.names if names is None else names)
        if self.influence is not None:
            yield 0, self.influence.shape[0], {n: self.influence[:, slice(*self.offsets[n])] for n in names}
            return
        if self.factors is not None:
            assert self._g_mean is not None and self._v_diag is not None
            cen = {k: self._centring(k) for k in names}
            yield from iterate_factor_blocks(self.factors, {k: c[0] for k, c in cen.items()},
                                             {k: c[1] for k, c in cen.items()}, names, self.budget)
            return
        assert self._program is not None and self._records is not None
        if isinstance(self._program, LayerProgram):
            assert self._g_mean is not None and self._v_diag is not None
            for r0, r1, g in self._layer_blocks(names):
                yield r0, r1, {k: standardised_influence(_dense(v, r1 - r0).to(torch.float64), *self._centring(k))
                               for k, v in g.items()}
            return
        for name in names:
            numel = self.offsets[name][1] - self.offsets[name][0]
            r0 = 0
            for inputs, targets in self._records:
                b = int(targets.shape[0]) if isinstance(targets, Tensor) else len(targets)
                step = max(1, self.budget // max(numel, 1))
                for a, (x, y) in zip(range(0, b, step), split_batch(inputs, targets, b, step)):
                    g = self._program.per_sample_grads(x, y, [name])[name].reshape(-1, numel).to("cpu", torch.float64)
                    assert self._g_mean is not None and self._v_diag is not None
                    # psi_j / sqrt(Sigma_jj) = -(g_j - g_bar_j) / sqrt(V_jj) when H_jj > 0.
                    w = standardised_influence(g, *self._centring(name))
                    yield r0 + a, r0 + a + g.shape[0], {name: w}
                r0 += b


def reused_layers(model: nn.Module, inputs: Any, param_names: Iterable[str] | None = None) -> list[str]:
    """Layers of ``model`` that reuse their weights within one record, seen in one forward
    pass of ``inputs`` (a batch) on a private copy in eval mode: an ``nn.Linear`` applied to
    inputs with more than 2 dims and more than one position per record (``[batch, atoms,
    features]``, ``[batch, seq, features]``), or a module called more than once. Only the
    modules holding one of ``param_names`` (default: every parameter) count: a frozen encoder
    does not make the assessed head's exact Hessian costly. Returned as plural noun phrases naming
    the layers (:func:`choose_estimator`'s reason says "<phrase> make the exact Hessian costly"),
    e.g. ``"Linear layers on [B, 12, 32] (embed)"``, ``"layers called 2x per forward (sq)"``.

    Raises:
        Nothing of its own: a forward that fails here would fail the estimation too; it is
        reported there (the probe then returns ``[]``). A model that cannot be copied is not
        probed either (``[]``: the layer-type rule of :func:`choose_estimator` decides); the
        quantization steps that need a copy name the culprit attribute.
    """
    try:
        copy = private_copy(model, "copying the model to find layers that reuse their weights")
    except ModelCopyError as err:
        log.info("estimation: weight-reuse probe skipped (%s)", err)
        return []
    calls: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    handles = []

    def hook(name: str) -> Callable:
        def pre(mod: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(mod, nn.Linear) and args and isinstance(args[0], Tensor):
                shapes[name] = list(args[0].shape)
        return pre

    wanted = None if param_names is None else set(param_names)
    for name, mod in copy.named_modules():
        own = [f"{name}.{k}" if name else k for k, p in mod._parameters.items() if p is not None]
        if own and (wanted is None or wanted & set(own)):
            handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            copy.eval()(inputs)
    except Exception:  # noqa: BLE001 - the estimation's own forward reports it
        return []
    finally:
        for h in handles:
            h.remove()
    out = []
    linear = {k: v for k, v in shapes.items() if len(v) > 2 and math.prod(v[1:-1]) > 1}
    if linear:
        dims = {str(["B", *v[1:]]).replace("'", "") for v in linear.values()}
        out.append(f"Linear layers on {', '.join(sorted(dims))} ({', '.join(sorted(linear))})")
    twice = sorted(k for k, c in calls.items() if c > 1)
    if twice:
        out.append(f"layers called {max(calls[k] for k in twice)}x per forward ({', '.join(twice)})")
    return out


def forward_floats(model: nn.Module, inputs: Any, b: int) -> float | None:
    """Floats one record's forward pass produces (every floating output of every op, counted on
    one forward of a private copy over the batch ``inputs`` of ``b`` records, divided by ``b``):
    the exact Hessian needs ``d`` forward-over-reverse passes of it. ``None`` when the model
    cannot be copied or the forward fails here (the estimation reports that itself)."""
    try:
        copy = private_copy(model, "copying the model to measure its forward pass")
    except ModelCopyError:
        return None
    counter = _CountFloats()
    try:
        # with gradients, as the exact sandwich runs it: without, nn.MultiheadAttention takes its
        # fused inference path for batch_first=True only, and the same model measured 13x fewer
        # floats in one layout than in the other (the estimator then changed with the layout)
        with torch.enable_grad(), counter:
            copy.eval()(inputs)
    except Exception:  # noqa: BLE001 - the estimation's own forward reports it
        return None
    return counter.total / max(b, 1)


def recurrent_cost_factor(model: nn.Module) -> float:
    """The weight of ``model``'s ``n d F`` in ``"auto"``'s exact-sandwich cost: the largest
    :data:`RECURRENT_COST_FACTORS` entry of its recurrent layers (:data:`RECURRENT_LAYERS`; a type
    not listed, e.g. a cell, takes the largest entry), 1 without any."""
    found = [next((f for t, f in RECURRENT_COST_FACTORS.items() if isinstance(m, t)),
                  max(RECURRENT_COST_FACTORS.values()))
             for m in model.modules() if isinstance(m, RECURRENT_LAYERS)]
    return max(found, default=1.0)


def choose_estimator(
    model: nn.Module, d: int, mode: str = "auto", hessian: str = "auto", *,
    n: int | None = None, ggn: bool = True, reused: Iterable[str] = (),
    forward_floats: float | None = None, outputs: int | None = None, largest: int | None = None,
    symmetric: Iterable[str] = (),
) -> tuple[str, str, str]:
    """Resolve ``"auto"`` for ``mode`` and ``hessian`` by estimated cost.

    Args:
        model: the model (its layer types set the cost of a forward pass).
        d: number of assessed weights.
        mode, hessian: the requested ``mode`` and ``hessian`` (``"auto"`` or a fixed choice).
        n: number of training records when known (``len(dataset)``), else ``None``.
        ggn: whether the Gauss-Newton diagonal is available (not with a loss hook, whose
            "outputs" are the losses themselves).
        reused: layers seen to reuse their weights within a record (:func:`reused_layers`:
            a Linear over atoms or positions), which the layer types alone do not show.
        forward_floats: floats one record's forward pass produces (:func:`forward_floats`,
            measured on the first batch); with weight reuse the exact sandwich is still chosen
            when ``n d forward_floats`` times :func:`recurrent_cost_factor` is at most
            ``EXACT_REUSE_MAX_COST`` (``None``: not measured yet, the
            exact one is chosen provisionally for ``d <= EXACT_MAX_PARAMS`` and the first batch
            decides).
        outputs: floats per record of the model's output (measured on the first batch; ``None``:
            not known, the Gauss-Newton + residual Hessian is not chosen).
        largest: assessed weights of the largest module (:func:`parameter_groups`), whose block of
            the residual term the ``"ggn_residual"`` Hessian does not compute.
        symmetric: layers whose weights have a scale symmetry (:mod:`.symmetries`: before a
            normalisation, or under ``weight_norm``), which the diagonal sandwich cannot represent:
            with weight reuse the exact one is then chosen up to ``SYMMETRY_EXACT_MAX_COST``.

    Returns:
        ``(mode, hessian, reason)``: the resolved choice and a sentence saying why.

    The exact sandwich costs about ``n d^2`` for a dense model, and ``n d F`` where a forward
    pass costs ``F >> d`` (layers in :data:`WEIGHT_REUSE_LAYERS`; recurrent ones included, whose
    records the loss program takes one at a time: 2.6e-7 CPU s per unit against ~5e-8 vmapped, 10.5 s at
    a recurrent model's ``n d F = 4.1e7``, docs/benchmarks.md "rn43"; ``n d F`` is weighted by
    :func:`recurrent_cost_factor`, 5 for an LSTM); it is chosen only for
    dense models with ``d <= EXACT_MAX_PARAMS`` and ``n d^2 <= EXACT_MAX_COST``. The diagonal
    mode's Hessian is then exact for the same small dense models, else Gauss-Newton (or
    Hutchinson without model outputs). ``mode="exact", hessian="ggn"`` (asked for, never
    chosen by ``"auto"``) is the exact sandwich with the Gauss-Newton Hessian
    ``sum_i J_i' L_i J_i``: the weights' full correlation from the model's first derivatives
    only (method.md section 4, "Exact sandwich with the Gauss-Newton Hessian");
    ``mode="exact", hessian="ggn_residual"`` is the exact Hessian assembled as Gauss-Newton plus
    the residual term's columns on all modules but the largest (method.md section 4, "Exact
    sandwich for convolutional networks"): ``"auto"`` picks it where the exact Hessian's cost is
    the only reason against the exact sandwich (weight reuse), the model has convolutions (a
    Linear over atoms or positions keeps the diagonal sandwich), is piecewise linear in
    each module's weights (:data:`PIECEWISE_LINEAR_LAYERS`), ``hessian="auto"``, the outputs are
    known (``0 < outputs <= GGN_MAX_OUTPUTS``, no loss hook) and
    ``n (d - largest) forward_floats <= RESIDUAL_MAX_COST`` (and the accumulator's first batch finds
    the largest module's residual block zero, else it re-resolves without it); any other ``hessian`` with
    ``mode="exact"`` is the exact Hessian.
    """
    # each entry a plural noun phrase naming layers ("Conv2d layers", reused_layers' "layers called
    # 2x per forward (sq)"): the reasons below say "<entries> make ..." (tw51: "layers ... layers")
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, WEIGHT_REUSE_LAYERS)})
    reuse = ([f"{', '.join(types)} layers"] if types else []) + list(reused)
    reusing = " and ".join(reuse)
    slow = recurrent_cost_factor(model)
    cost = None if forward_floats is None else (n or N_ASSUMED) * d * forward_floats * slow
    units = "n d x forward floats" + (f" x {slow:g} (recurrent layers: records one at a time)" if slow != 1 else "")
    symmetric = list(symmetric)
    reuse_max = SYMMETRY_EXACT_MAX_COST if symmetric else EXACT_REUSE_MAX_COST
    if d > EXACT_MAX_PARAMS:
        why = f"d = {d:,} > {EXACT_MAX_PARAMS:,} weights"
    elif reuse and cost is not None and cost > reuse_max:
        why = (f"{reusing} make the exact Hessian costly (d = {d:,} passes of their forward, "
               f"{units} = {cost:.2g} > {reuse_max:.0g})")
    elif (n or N_ASSUMED) * d * d > EXACT_MAX_COST:  # an unknown n: the N_ASSUMED the report states
        why = f"n d^2 = {(n or N_ASSUMED) * d * d:.2g} > {EXACT_MAX_COST:.0g}"
    else:
        why = ""
    cheap_exact = not why
    reason = "requested"
    reuse_cost_only = bool(reuse) and cost is not None and cost > reuse_max and d <= EXACT_MAX_PARAMS \
        and not ((n or N_ASSUMED) * d * d > EXACT_MAX_COST)
    # convolutional networks only (measured, gn28): a Linear over atoms or positions keeps its choice
    conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if mode == "auto" and hessian == "auto" and reuse_cost_only and conv and ggn and outputs is not None \
            and 0 < outputs <= GGN_MAX_OUTPUTS and largest is not None and forward_floats is not None:
        r_cost = (n or N_ASSUMED) * (d - largest) * forward_floats
        layers = sorted({type(m).__name__ for m in model.modules()
                         if not list(m.children()) and not isinstance(m, PIECEWISE_LINEAR_LAYERS)})
        if not layers and r_cost <= RESIDUAL_MAX_COST:
            return "exact", "ggn_residual", (
                f"auto: d = {d:,}; {why}: the exact sandwich with the exact Hessian as Gauss-Newton + residual "
                f"(the model is piecewise linear in each module's weights: the residual's {d - largest:,} columns "
                f"off the largest module, n (d - {largest:,}) x forward floats = {r_cost:.2g} "
                f"<= {RESIDUAL_MAX_COST:.2g})")
    if mode == "auto":
        mode = "exact" if cheap_exact else "diagonal"
        if cheap_exact and reuse:
            reason = (f"auto: d = {d:,} weights; {reusing} reuse their weights, but the exact sandwich is cheap "
                      + (f"({units} = {cost:.2g})" if cost is not None else "(checked on the first batch)"))
            if symmetric and cost is not None and cost > EXACT_REUSE_MAX_COST:
                reason += (f" for a model whose layers {', '.join(symmetric[:6])} have a scale symmetry, which the "
                           f"diagonal sandwich cannot represent (allowed up to {SYMMETRY_EXACT_MAX_COST:.0g})")
        else:
            reason = f"auto: d = {d:,} dense weights" if cheap_exact else f"auto: {why}"
    if mode == "exact":
        return mode, hessian if hessian in ("ggn", "ggn_residual") else "exact", reason
    if hessian == "ggn_residual":
        raise ValueError("hessian='ggn_residual' is the exact sandwich's Hessian: use it with mode='exact' "
                         "(or leave both at 'auto')")
    if hessian == "auto":
        # the diagonal sandwich asked for (or chosen): its exact Hessian diagonal only for dense
        # models; with weight reuse it would cost the d passes the diagonal mode is there to avoid
        if cheap_exact and reuse:
            why = f"{reusing} make the exact Hessian costly (d = {d:,} passes of their forward)"
        exact_h = cheap_exact and not reuse
        hessian = "exact" if exact_h else ("ggn" if ggn else "hutchinson")
        if reason == "requested":
            reason = "auto Hessian: " + (f"d = {d:,} dense weights" if exact_h else why)
    return mode, hessian, reason


def describe_estimator(mode: str, hessian: str) -> str:
    """A short name of the estimator, e.g. ``"diagonal sandwich, Gauss-Newton Hessian"``."""
    if mode == "exact":
        if hessian == "ggn":
            return "exact sandwich (Gauss-Newton Hessian, per-sample gradients)"
        if hessian == "ggn_residual":
            return "exact sandwich (full Hessian as Gauss-Newton + residual, per-sample gradients)"
        return "exact sandwich (full Hessian, per-sample gradients)"
    h = {"exact": "exact Hessian diagonal", "ggn": "Gauss-Newton Hessian diagonal",
         "ggn_mc": "sampled-label Monte Carlo Gauss-Newton Hessian diagonal",
         "hutchinson": "Hutchinson Hessian diagonal"}.get(hessian, hessian)
    return f"diagonal sandwich ({h}, per-sample gradient variances)"


def _flat_names(program: LossProgram) -> tuple[dict[str, tuple[int, int]], int]:
    offsets, start = {}, 0
    for n in program.param_names:
        k = program.params[n].numel()
        offsets[n] = (start, start + k)
        start += k
    return offsets, start


def _flatten(d: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
    return torch.cat([d[n].reshape(lead, -1) for n in names], dim=1)


# The accumulator's loss-directions sample measures through a weak reference to the accumulator
# (_LossRanksOf): a bound method there closed a reference cycle (accumulator -> sample -> method ->
# accumulator) that kept the pass's private model copy, program, scratch and sums alive after the
# pass until the interpreter's cyclic collector ran (~400 MiB on the 1e7 benchmark MLP, freed inside
# the next scoring call, ~0.1 s of it; p57b). False: the bound method (A/B)
LOSS_RANKS_WEAK = True


class _LossRanksOf:
    """``acc._loss_ranks`` (the sample's ``measure``) without a strong reference to ``acc``, so that
    an accumulator no one holds is freed when its last reference goes, not at the next cyclic
    collection. Copied and pickled as the bound method is: a deep copy measures through the copy of
    the accumulator (the one in ``memo`` where the copy began there), a pickle through the unpickled
    one. Raises RuntimeError where called after the accumulator was freed (nothing holds the sample
    but the accumulator)."""

    __slots__ = ("_acc",)

    def __init__(self, acc: MomentAccumulator) -> None:
        self._acc = weakref.ref(acc)

    def _owner(self) -> MomentAccumulator:
        acc = self._acc()
        if acc is None:
            raise RuntimeError("the loss directions' sample was measured after its estimation pass was freed")
        return acc

    def __call__(self, inputs: Any, targets: Any, k: int) -> tuple[Tensor, str]:
        return self._owner()._loss_ranks(inputs, targets, k)

    def __deepcopy__(self, memo: dict) -> _LossRanksOf:
        return _LossRanksOf(copy.deepcopy(self._owner(), memo))

    def __reduce__(self) -> tuple:
        return _LossRanksOf, (self._owner(),)


def _loss_ranks_of(acc: MomentAccumulator) -> Callable[[Any, Any, int], tuple[Tensor, str]]:
    """The measure of ``acc``'s loss-directions sample (:data:`LOSS_RANKS_WEAK`)."""
    return _LossRanksOf(acc) if LOSS_RANKS_WEAK else acc._loss_ranks


class MomentAccumulator:
    """Streaming sums of method.md section 4, shared by :func:`estimate` and ``MISIndicator``.

    ``update(batch)`` adds a batch to ``state``, a dict of plain tensors (every entry is a sum
    over records, except the stored records) and ``finalize()`` turns it into an
    :class:`Estimate`. ``state`` entries (``d`` = assessed weights, flattened in
    ``param_names`` order):

    * ``n`` (int64 scalar): records; ``g_sum``, ``g2_sum`` ``[d]``: per-sample gradient sums
      and sums of squares; ``h_sum``, ``h2_sum`` ``[d]``: Hessian-diagonal sums (exact/GGN:
      summed over records; Hutchinson: over probes, ``h2_sum`` the summed variances of each
      batch's probe mean); ``probes``
      (int64 scalar); ``grad_norm_sq`` (float64 scalar): sum of per-sample ``|g|^2``;
    * exact mode only: ``gg_sum`` ``[d, d]`` (sum of ``g g^T``) and ``H_sum`` ``[d, d]`` (summed
      per-batch Hessians);
    * stored records (lists): ``rec_grad`` (per-sample gradients ``[k, d]`` when
      ``num_records * d <= budget``) or ``rec_x``/``rec_y`` (the records themselves), and with
      ``selection="hash"`` their ``rec_key`` (see :func:`record_keys`);
    * the diagonal sandwich's K-FAC factors per layer: ``kfac_A.<m>``, ``kfac_G.<m>`` (float64
      sums) over ``kfac_n.<m>`` records (``kfac_t.<m>``: records x positions). With ``n_hint``
      (the training records of every process together) they are a sample by record content
      (:mod:`~mis_lightning.estimation.kron_sample`), the same set however the data is ordered,
      batched or split; without it, the first records read (the report says so).

    ``selection="first"`` keeps the first ``num_records`` records seen;
    ``"hash"`` (``estimate`` and ``MISIndicator``) keeps those with the smallest content hash
    of the raw batch's tensors (:func:`record_keys`), which is the same set however the data is
    ordered (a shuffling loader), batched, split over processes (the union of per-process
    bottom-k sets contains the global bottom-k set), and whether the loss comes from
    ``loss_fn``/``batch_fn`` or a ``mis_per_sample_loss`` hook; so summed/concatenated states
    of several processes finalize to the same estimate as one process over all the data.
    Stored records (not gradients) must then be tensors, unless ``pytree_records`` (a state
    that is never synced across processes, as in ``estimate``).

    The parameters are read (detached copies) when the accumulator is built and again by
    :meth:`reset_program`; the model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        param_names: list[str] | None = None,
        mode: Mode = "auto",
        hessian: HessianMode = "auto",
        weight_decay: float | Mapping[str, float] = 0.0,
        num_records: int = 512,
        batch_fn: BatchFn | None = None,
        hutchinson_probes: int = 8,
        damping: float = 1e-8,
        budget: int = DEFAULT_BUDGET,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        selection: Literal["first", "hash"] = "first",
        program_cls: type[LossProgram] = LossProgram,
        use_factors: bool = True,
        pytree_records: bool = False,
        n_hint: int | None = None,
        ggn_available: bool = True,
        leverage_correction: LeverageOption = DEFAULT_LEVERAGE_CORRECTION,
        ggn_mc_samples: int = 1,
    ) -> None:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            # torch.func's functional_call refuses them ("The stateless API can't be used with
            # nn.DataParallel module"), and their replicas are not the weights the release holds
            raise TypeError(f"the model is wrapped in {type(model).__name__}: pass the wrapped model itself "
                            "(model.module); the assessment runs on one device")
        decay = dict(weight_decay) if isinstance(weight_decay, Mapping) else None
        if any(not float(v) >= 0 for v in (decay.values() if decay is not None else [weight_decay])):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if isinstance(ggn_mc_samples, bool) or not isinstance(ggn_mc_samples, int) or ggn_mc_samples < 1:
            raise ValueError(f"ggn_mc_samples must be an int >= 1, got {ggn_mc_samples!r}")
        if selection not in ("first", "hash"):
            raise ValueError(f"selection must be 'first' or 'hash', got {selection!r}")
        # before the pass's first temporaries (estimate(), the callback's and the metric's passes)
        raise_mmap_threshold()
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        if not param_names:
            raise ValueError("the model has no trainable parameter to assess")
        d = sum(named[n].numel() for n in param_names if n in named)
        # the diagonal estimator's per-layer / factored passes: float32 above a small size
        # (sums in acc_dtype), unless a dtype is given (FAST_FLOAT64_MAX_PARAMS)
        self.fast_dtype = dtype or (torch.float64 if d <= FAST_FLOAT64_MAX_PARAMS else torch.float32)
        if dtype is None:
            dtype = torch.float64 if d <= 100_000 else torch.float32
        floats = [p.dtype for p in named.values() if p.is_floating_point()]
        # a loss holding tensors of the model's dtype (class weights) runs on the compute dtype
        loss_fn = ComputeDtypeLoss(loss_fn, floats[0] if floats else torch.float32)
        self.model, self.loss_fn, self.batch_fn = model, loss_fn, batch_fn or default_batch_fn
        self.dtype, self.program_cls = dtype, program_cls
        self.param_names = list(param_names)
        self.program = program_cls(model, loss_fn, self.param_names, self.batch_fn, dtype)
        self.offsets, d = _flat_names(self.program)
        self.d = d
        if mode not in ("auto", "exact", "diagonal"):
            raise ValueError(f"mode must be 'auto', 'exact' or 'diagonal', got {mode!r}")
        if mode == "exact" and d > 20 * EXACT_MAX_PARAMS:
            raise ValueError(f"mode='exact' builds a d x d Hessian; d = {d} is too large, use mode='diagonal'")
        self._request = (mode, hessian, n_hint, ggn_available)
        # the largest module's assessed weights: the block of the residual term "ggn_residual" skips
        self._largest_group = max(parameter_groups([k for k in self.param_names if k in named]),
                                  key=lambda g: sum(named[k].numel() for k in g))
        self._largest = sum(named[k].numel() for k in self._largest_group)
        self._choice_outputs: int | None = None
        # "ggn_residual": the module whose residual block is skipped (None: every column), checked
        # on the first batch (residual_block_check); diagnostics for the report
        self._residual_skip: list[str] | None = None
        self._residual_info: dict[str, Any] | None = None
        # the checks' rows R v (residual_block_rows: "largest" [2, d], "others" (groups, [2 G, d]))
        self._residual_rows: dict[str, Any] | None = None
        mode, hessian, self.reason = choose_estimator(model, d, mode, hessian, n=n_hint, ggn=ggn_available)
        # "auto" chose an exact Hessian from the layer types: the first batch shows whether a
        # Linear is applied over atoms / positions (weight reuse the types do not show).
        self._probe_pending = hessian == "exact" and (self._request[0] == "auto" or self._request[1] == "auto")
        self._probe_requested = self._probe_pending  # (world_choice: whether the first batch re-chooses)
        # the per-layer programs' Gauss-Newton choice given by every DDP process's first batches
        # ({program attribute: (choice, directions)}, world_choice.force); None: each program's own
        self._forced_ggn: dict[str, tuple[str, int]] | None = None
        self._reused: list[str] = []
        self._forward_floats: float | None = None
        # the scale symmetries of layers before a normalisation, or under weight_norm (symmetries.py):
        # the first batch's forward finds the former; the diagonal estimator's report names them
        self._normalised: dict[str, str] = {}
        self._normalised_probe = True
        # persistent buffers a train-mode forward sets from the records (data_buffers.py), told
        # by the first batch; None until then
        self._data_buffers: list[str] | None = None
        # the candidates the probe could not check, and why (said in the report; vb45)
        self._data_buffers_unchecked: dict[str, Any] | None = None
        # the inputs' per-feature / per-channel statistics for the buffers that could hold them (a
        # standardiser fitted before training: the probe does not see it; vb46); False until the first batch
        self._input_stats: InputStatistics | None | bool = False
        self._batch_rerun = False  # a batch rerun on another program after its first one refused the model
        self._weight_normed = weight_normed(model, self.param_names)
        # the attention heads' query/key and value/output symmetries: the exact estimator's flat
        # directions from the model's structure (flat_directions' known)
        self._attention_heads = attention_heads(model, self.param_names)
        # which reparametrization makes each one's scale flat (the warning names it)
        self._weight_norm_kinds = scale_free_reparametrizations(model, self.param_names)
        self._choice_floats: float | None = None  # the forward cost the last choice weighed
        self.estimator = describe_estimator(mode, hessian)
        if hessian not in ("exact", "ggn", "ggn_mc", "hutchinson", "ggn_residual"):
            raise ValueError(f"hessian must be 'auto', 'exact', 'ggn', 'ggn_mc', 'hutchinson' or 'ggn_residual', "
                             f"got {hessian!r}")
        self.ggn_mc_samples = ggn_mc_samples
        # the Monte Carlo Gauss-Newton's draws: a hash of each record's content key and this seed
        # (record_draws; the generator's seed is read, it is not drawn from, nor is the global RNG)
        self._mc_seed = int(generator.initial_seed()) if generator is not None else 0
        self.mode, self.hessian = mode, hessian
        self.acc_dtype = torch.float64 if d <= 10_000_000 else torch.float32
        self.names = self.program.param_names
        # the L2 coefficient per assessed parameter (a mapping: those it names, others 0)
        if decay is not None:
            check_decay_names(decay, model)
            decay = canonical_decay(decay, model)  # a tied holder's or an '_orig_mod.'-less name
        self.decay = {k: float(decay.get(k, 0.0)) if decay is not None else float(weight_decay) for k in self.names}
        self._decay_told = dict(self.decay)  # finalize scales it by the records without loss (sm45)
        self.num_records = int(num_records)
        self.hutchinson_probes, self.damping, self.budget = hutchinson_probes, damping, budget
        self.generator, self.selection, self.pytree_records = generator, selection, pytree_records
        self.keep_w = num_records * d <= budget
        self._out_shape: OutputShape | None = None
        self.factored: FactoredProgram | LayerProgram | None = None
        self.use_factors = use_factors
        if use_factors and mode == "diagonal" and hessian in ("ggn", "ggn_mc") and program_cls is LossProgram:
            # nn.Linear layers with one output per record: per-sample statistics as products
            # of layer inputs and output gradients (linear_factors), no [B, d] tensors.
            self.factored = self._fast_program(FactoredProgram)
        # the K-FAC sigma correction's Kronecker factors where the diagonal estimator runs another
        # per-sample path on an all-Linear model (exact / Hutchinson Hessian diagonal): one more
        # forward and backward per batch through a factored program (_kron_program), or, for several
        # outputs per record (an MLP classifier, found on the first batch), through the per-layer
        # program's partial traces (kfd34: _update_kron_side)
        self._kron_side: FactoredProgram | LayerProgram | None = None
        self._draw_keys: _LazyKeys | None = None  # the batch being added's record keys (update)
        # why a per-layer program (the estimation's or the side one) refused the model at its first
        # batch (the NotImplementedError's message): where no program then gives the convolutions their
        # K-FAC correction, the diagnostics' "kfac_lost" and a report warning say so (_kfac_factors)
        self._kfac_refused: str | None = None
        self._set_kron_side()
        if not (isinstance(leverage_correction, bool) or leverage_correction == "auto"):
            raise ValueError(f"leverage_correction must be True, False or 'auto', got {leverage_correction!r}")
        self.leverage_correction = leverage_correction
        # The diagonal estimator's loss directions per record: mean rank(L_i) over a content-keyed
        # sample of the pass's records (loss_directions.py; _loss_ranks measures them); a model with
        # one output per record has one (rank(L_i) <= 1, counted as 1) and holds no sample
        self._loss_rank = LossDirectionSample(_loss_ranks_of(self), LOSS_RANK_RECORDS)
        self._one_output: bool | None = None
        # the count over every DDP process's records (EstimationMetric's sync, world_sample), and the
        # input statistics likewise (InputStatistics.merged); None outside a sync, and again at this
        # process's next batch
        self.directions_synced: tuple[float, str, int] | None = None
        self.input_stats_synced: InputStatistics | None = None
        # the "ggn_residual" block checks' diagnostics over every DDP process's first batch
        # (world_choice.world_residual; a process without records has none of its own), likewise
        self.residual_synced: dict[str, Any] | None = None
        # trainable weights left out of the assessment (a norm or bias kept in float): they fit
        # the data too, but neither estimator's leverage counts them (reported, method.md section 4)
        self._unassessed = sum(p.numel() for k, p in named.items() if p.requires_grad and k not in param_names)
        # Exact mode keeps each stored record's output Jacobian J [C, d] and loss Hessian in the
        # outputs L [C, C] next to its gradient (for the leverages; method.md section 4), unless
        # the model's outputs do not allow them (checked on the first batch; a loss hook's model
        # output is taken inside the hook) or they do not fit the budget.
        self._factors_possible = self.keep_w
        self.keep_factors = mode == "exact" and self._factors_possible
        self.program.count_unread = self.keep_factors  # (output_reads.unread_entries: read with the factors only)
        self._c_out: int | None = None
        # whether a train-mode forward is random (LossProgram.random_in_train_mode; the first batch)
        self._train_random: bool | None = None
        # output leaves other DDP processes put back (EstimationMetric's sync): the report names them too
        self.late_elsewhere: tuple[str, ...] = ()
        # why the leverages fell back to the Gauss-Newton factors J' L J (no per-record second
        # derivatives); None: each record's exact Hessian on its output-gradient span (_record_curvature)
        self._leverage_ggn: str | None = None
        # records per update for merged loader batches (batching.merge_batches): 0 (batches as
        # they come) until the first batch of a fast program has shown its taps' size
        self.records_per_update = 0
        self.state = self.empty_state()

    def __copy__(self) -> MomentAccumulator:
        """A shallow copy (``copy.copy``): every attribute shared, the loss directions' sample too,
        whose measure reaches this accumulator through a weak reference (:data:`LOSS_RANKS_WEAK`); the
        copy holds this accumulator, as the sample's bound method did, so that the shared sample is
        measured after the original's last other reference went (a RuntimeError there)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._shallow_of = self  # (no cycle: this accumulator does not hold the copy)
        return new

    #: what a pass decides outside the sums (at its first batches: the estimator's choice, the probes,
    #: the leverage factors' shape or why they are off, the input statistics), plain data that
    #: :meth:`finalize`, a DDP sync and the report read: :meth:`pass_facts` gives them (with the loss
    #: directions' sample) to a rebuilt accumulator (an unpickled or deep-copied ``EstimationMetric``:
    #: its programs hold closures and are built anew). dd58: an unpickled Metric lost them, its loss
    #: directions counted one a record with the note "no record was seen by this process", and its
    #: K-FAC side program taken as one output per record (rtn_int4 0.352 -> 0.305 on an MLP classifier)
    PASS_FACTS: tuple[str, ...] = (
        "mode", "hessian", "estimator", "reason", "_normalised", "_normalised_probe", "_data_buffers",
        "_data_buffers_unchecked", "_input_stats", "_one_output", "_train_random", "records_per_update", "_c_out",
        "_lev_shape", "_leverage_off", "_leverage_ggn", "keep_factors", "_kfac_refused", "_batch_rerun",
        "_residual_skip", "_residual_info", "_residual_rows", "_choice_floats", "_choice_outputs", "_out_shape")

    def pass_facts(self) -> dict[str, Any]:
        """:data:`PASS_FACTS` (those set), the loss directions' sample (``(fixed, groups)``: its held
        records, measured or not) and the Gauss-Newton choice of each per-layer program, for
        :meth:`take_pass_facts` on a rebuilt accumulator (the tensors are this accumulator's own:
        a pickle made now holds no temporary)."""
        facts = {k: getattr(self, k) for k in self.PASS_FACTS if hasattr(self, k)}
        facts["loss_directions"] = (self._loss_rank.fixed, list(self._loss_rank.groups))
        facts["ggn_programs"] = {k: (p.ggn_choice, p.ggn_directions) for k in ("factored", "_kron_side")
                                 if isinstance(p := getattr(self, k), LayerProgram)}
        return facts

    def take_pass_facts(self, facts: dict[str, Any]) -> None:
        """Take :meth:`pass_facts` of the accumulator this one rebuilds, whose programs were rebuilt of
        the same kinds (``EstimationMetric._rebuild_accumulator``): its decisions, its loss
        directions' sample (measured here through this accumulator), the programs' Gauss-Newton
        choices."""
        facts = dict(facts)
        fixed, groups = facts.pop("loss_directions", (None, []))
        self._loss_rank = LossDirectionSample(_loss_ranks_of(self), LOSS_RANK_RECORDS, list(groups), fixed)
        for k, (choice, dirs) in facts.pop("ggn_programs", {}).items():
            if isinstance(p := getattr(self, k), LayerProgram):
                p.ggn_choice, p.ggn_directions = choice, dirs
        for k, v in facts.items():
            setattr(self, k, v)
        self.program.count_unread = self.keep_factors

    @property
    def choice_pending(self) -> bool:
        """Whether ``"auto"``'s choice still waits for the first batch (weight reuse and the
        forward's cost are measured there); :attr:`mode` is provisional until then."""
        return self._probe_pending

    def _output_count(self, x: Any) -> int | None:
        """Floats per record of the model's output, ``None`` where the Gauss-Newton factors cannot
        be had (a loss hook, outputs that are not floating tensors)."""
        if not self._request[3]:
            return None
        try:
            return output_numel(self.program.output_shape(x))
        except Exception as exc:  # outputs the Gauss-Newton factors cannot read: no "ggn_residual"
            log.info("estimation: output size not measured (%s)", exc)
            return None

    def resolve(self, reused: list[str], floats: float | None = None, outputs: int | None = None) -> None:
        """Re-run the ``"auto"`` choice knowing the layers that reuse their weights and the
        floats of one record's forward pass (before any record is accumulated): the fast
        program and a fresh ``state`` follow the new choice (a caller's own state keeps the
        exact mode's ``[d, d]`` sums, unused, and gets the new choice's missing entries at
        :meth:`update`). Without a measured forward a weight-reuse model
        takes the diagonal sandwich."""
        mode, hessian, n_hint, ggn = self._request
        self._choice_floats = math.inf if floats is None else floats
        self._choice_outputs = outputs
        self.mode, self.hessian, self.reason = choose_estimator(
            self.model, self.d, mode, hessian, n=n_hint, ggn=ggn, reused=reused,
            forward_floats=self._choice_floats, outputs=outputs, largest=self._largest,
            symmetric=self._symmetric_layers())
        self.estimator = describe_estimator(self.mode, self.hessian)
        self._probe_pending, self._reused, self._forward_floats = False, list(reused), floats
        log.info("estimation: %s (%s)", self.estimator, self.reason)
        if self.factored is None and self.use_factors and self.mode == "diagonal" \
                and self.hessian in ("ggn", "ggn_mc") and self.program_cls is LossProgram:
            self.factored = self._fast_program(FactoredProgram)
        # The leverages' factors are kept only where the (re)chosen estimator is exact.
        self.keep_factors = self.mode == "exact" and self._factors_possible
        self.program.count_unread = self.keep_factors
        self._set_kron_side()
        self.state = self.empty_state()

    def _set_kron_side(self, kind: type = FactoredProgram) -> None:
        """Build (or drop) :attr:`_kron_side` for the current choice: a ``kind`` program
        (:class:`FactoredProgram`, or :class:`LayerProgram` once a first batch has shown several
        outputs per record, or where the estimation runs no per-layer program on a model with
        convolutions: :meth:`_layer_kron_side`)."""
        if self._kron_side is not None:
            self._kron_side.close()
            self._kron_side = None
        if self.mode == "diagonal" and self.use_factors and self.program_cls is LossProgram \
                and not isinstance(self.factored, FactoredProgram) and KFAC_CORRECTION:
            if kind is LayerProgram:
                self._kron_side = self._layer_kron_side()
                return
            try:
                self._kron_side = FactoredProgram(self.model, self.loss_fn, self.names, self.fast_dtype)
            except NotImplementedError:
                # no factored program; where no per-layer one runs either (a layer it refuses, or the
                # exact / Hutchinson Hessian diagonal), a model's convolutions get their own
                self._kron_side = self._layer_kron_side() if self.factored is None else None

    def _layer_kron_side(self) -> LayerProgram | None:
        """The per-layer side program (K-FAC factors only) of

        * an all-Linear model with several outputs per record (an MLP classifier, softmax
          regression) under the exact or Hutchinson Hessian diagonal: the per-layer program's partial-trace factors;
        * a model with convolutions whose estimation runs no per-layer program: the Hessian
          diagonal is exact or Hutchinson's, or another assessed layer is one the per-layer program
          refuses (``nn.GroupNorm``, an affine ``nn.InstanceNorm*d``;
          :func:`~mis_lightning.estimation.linear_factors.per_layer_parameters`). The program is
          built over the parameters it can take: the convolutions and Linear layers get their KFC
          factors as on a model without the refused layers, which stay uncorrected and are
          named in ``kfac_uncorrected_layers`` (:meth:`_kfac_factors`). Without this the
          convolutions' sigma read 0.01-0.5x the exact sandwich's (docs/benchmarks.md, "cv40").

        ``None`` where it has no Kronecker block (an all-Linear model with a norm, an embedding,
        tied weights, or a refused layer). Its Gauss-Newton directions are chosen as the
        ``"ggn"`` estimator's default (``"auto"``: sampled labels above
        ``GGN_EXACT_MAX_DIRECTIONS``), each record's a hash of its content key and the seed
        (:mod:`~mis_lightning.estimation.record_draws`), as the estimator's."""
        names = per_layer_parameters(self.model, self.names)
        if not names:
            return None
        try:
            prog = LayerProgram(self.model, self.loss_fn, names, self.fast_dtype, reference=self.program)
        except NotImplementedError:
            return None
        if not prog.kron_blocks() or not (prog.kron_conv or len(names) == len(self.names)):
            prog.close()
            return None
        prog.num_records, prog.group_budget = self.num_records, self.budget
        prog.ggn_mode, prog.mc_samples, prog.mc_seed = "auto", self.ggn_mc_samples, self._mc_seed
        self._apply_forced_ggn(prog, "_kron_side")
        return prog

    def _apply_forced_ggn(self, prog: Any, attr: str) -> None:
        """Give ``prog`` (the program held as ``attr``) the Gauss-Newton choice every DDP process's
        first batches made (:mod:`.world_choice`), where it chooses one (``ggn_mode="auto"``)."""
        forced = (self._forced_ggn or {}).get(attr)
        if forced is not None and isinstance(prog, LayerProgram) and prog.ggn_mode == "auto":
            prog.ggn_choice, prog.ggn_directions = forced

    def _kron_program(self) -> FactoredProgram | LayerProgram | None:
        """The program whose layers get the K-FAC correction: the estimation's own factored one,
        else the side one (factored, or per-layer for a classifier), else the per-layer
        program of a model with convolutions or an all-Linear classifier (partial traces:
        :meth:`LayerProgram.kron_blocks`), else ``None``."""
        if isinstance(self.factored, FactoredProgram):
            return self.factored
        if self._kron_side is not None:
            return self._kron_side
        if isinstance(self.factored, LayerProgram) and self.factored.kron_blocks() and KFAC_CORRECTION:
            return self.factored
        return None

    def _fast_program(self, kind: type) -> FactoredProgram | LayerProgram | None:
        """The fastest per-sample program the model's layout allows: the factored 2-D Linear
        path, else the per-layer path (convolutions, embeddings, norms, attention,
        ``linear_factors.LayerProgram``), else ``None`` (torch.func per-sample gradients)."""
        if kind is FactoredProgram:
            try:
                return FactoredProgram(self.model, self.loss_fn, self.names, self.fast_dtype)
            except NotImplementedError:
                pass
        try:
            prog = LayerProgram(self.model, self.loss_fn, self.names, self.fast_dtype, reference=self.program)
            prog.num_records, prog.group_budget = self.num_records, self.budget
            prog.ggn_mode = "auto" if self._request[1] == "auto" and self.hessian == "ggn" else self.hessian
            prog.mc_samples, prog.mc_seed = self.ggn_mc_samples, self._mc_seed
            self._apply_forced_ggn(prog, "factored")
            return prog
        except NotImplementedError as exc:
            log.info("estimation: torch.func per-sample gradients (%s)", exc)
            return None

    def reset_program(self) -> None:
        """Re-read the model's current weights (for a new pass after the model changed)."""
        self.program = self.program_cls(self.model, self.loss_fn, self.param_names, self.batch_fn, self.dtype)
        self.program.count_unread = self.keep_factors
        self._out_shape = None
        # a new pass's records only (EstimationMetric.reset(): the figures of a new Metric; rv54: the
        # loss directions' sample kept the records read before the reset, and the input statistics
        # counted a pass read again twice: a standardiser's ddof-1 sd then matched no statistic)
        self._loss_rank = LossDirectionSample(_loss_ranks_of(self), LOSS_RANK_RECORDS)
        if self._input_stats:
            self._input_stats = False
        if self.factored is not None:
            kind = type(self.factored)
            self.factored.close()
            self.factored = self._fast_program(kind)
        if self._kron_side is not None:  # its private copy holds the old weights
            self._set_kron_side(type(self._kron_side))

    def state_spec(self) -> dict[str, tuple[Any, str]]:
        """``{name: (default, reduction)}`` with reduction ``"sum"`` or ``"cat"`` (lists)."""
        d, ad = self.d, self.acc_dtype
        spec: dict[str, tuple[Any, str]] = {
            "n": (torch.zeros((), dtype=torch.int64), "sum"),
            # records read whose loss does not depend on the weights (LossProgram.void_rows)
            "n_void": (torch.zeros((), dtype=torch.int64), "sum"),
            "g_sum": (_zeros((d,), ad), "sum"),
            "g2_sum": (_zeros((d,), ad), "sum"),
            "h_sum": (_zeros((d,), ad), "sum"),
            "h2_sum": (_zeros((d,), ad), "sum"),
            "probes": (torch.zeros((), dtype=torch.int64), "sum"),
            "grad_norm_sq": (torch.zeros((), dtype=torch.float64), "sum"),
        }
        if self.mode == "exact":
            spec["gg_sum"] = (torch.zeros(d, d, dtype=torch.float64), "sum")
            spec["H_sum"] = (torch.zeros(d, d, dtype=torch.float64), "sum")
        kron = self._kron_program() if hasattr(self, "_kron_side") and KFAC_CORRECTION else None
        if kron is not None:
            # the Kronecker factors of the sigma correction (finalize, _kfac_factors)
            for m, (p, q) in kron.kron_layers().items():
                if isinstance(kron, LayerProgram):  # per group, and the positions summed (KFC)
                    k = kron.kron_blocks()[m].groups
                    spec[f"kfac_A.{m}"] = (torch.zeros(k, p, p, dtype=torch.float64), "sum")
                    spec[f"kfac_G.{m}"] = (torch.zeros(k, q, q, dtype=torch.float64), "sum")
                    spec[f"kfac_t.{m}"] = (torch.zeros((), dtype=torch.int64), "sum")
                else:
                    spec[f"kfac_A.{m}"] = (_zeros((p, p), torch.float64), "sum")
                    spec[f"kfac_G.{m}"] = (_zeros((q, q), torch.float64), "sum")
                spec[f"kfac_n.{m}"] = (torch.zeros((), dtype=torch.int64), "sum")
        if self.keep_w:
            spec["rec_grad"] = ([], "cat")
        else:
            spec["rec_x"] = ([], "cat")
            spec["rec_y"] = ([], "cat")
        if self.selection == "hash":
            spec["rec_key"] = ([], "cat")
        return spec

    def empty_state(self) -> dict[str, Any]:
        # state_spec() builds fresh tensors on each call: no clone (it doubled the init's peak, 16 bytes per weight)
        return {k: (v if isinstance(v, Tensor) else []) for k, (v, _) in self.state_spec().items()}

    # -- accumulation -------------------------------------------------------------------------
    @full_float32
    def update(self, batch: Any, state: dict[str, Any] | None = None) -> int:
        """Add one batch to ``state`` (default ``self.state``, updated in place); returns its size.

        Dispatches to one ``_update_*`` per kind: the factored Linear path, else per-sample
        gradients (with the Gauss-Newton diagonal when ``hessian="ggn"``) followed by the
        exact Hessian or the Hutchinson probes.

        Raises:
            ValueError: the model's forward updates a tensor it holds in place in eval mode
                (torch.func cannot differentiate through it; the message says what to change), or
                runs a recurrent layer on a ``PackedSequence`` (names the layer and the cure).
            RuntimeError: the forward uses activation checkpointing (says what to change).
        """
        try:
            # the library's own pass: one thread on an oversubscribed machine, as the scoring pass
            # (threads.py; nux56: 84 s on 2 threads against 6.8 s on 1 at load 9), the caller's restored
            with vmap_fallback_quiet(), scoring_threads(), packed_sequence_watch(self.model) as packed:
                return self._update(batch, state)  # (vmap: torch's notice about the library's own vmap)
        except RuntimeError as exc:
            if packed and "doesn't have storage" in str(exc):  # a recurrent layer over a PackedSequence (nu57)
                raise packed_sequence_error(self.model, packed, exc) from exc
            if "saved tensor hooks" in str(exc):
                raise RuntimeError(
                    f"{type(self.model).__name__}'s forward uses activation checkpointing "
                    "(torch.utils.checkpoint) or another saved-tensor hook, which the per-sample gradients "
                    f"(torch.func) do not support ({exc}): the assessment runs the model in eval mode, so "
                    "checkpoint in training mode only (if self.training: checkpoint(...) else the plain call), "
                    "or turn it off before assessing") from exc
            if "mutate a captured Tensor" not in str(exc):
                raise
            raise ValueError(
                f"{type(self.model).__name__}'s forward updates a tensor it holds in place (a buffer or "
                "an attribute, e.g. a counter) even in eval mode, which the per-sample gradients "
                "(torch.func) cannot differentiate through: update it in training mode only "
                "(if self.training: ...) or outside forward") from exc
        finally:
            self._draw_keys = None  # the batch is not held past its update

    def _update(self, batch: Any, state: dict[str, Any] | None) -> int:
        st = self.state if state is None else state
        program = self.program
        # (a sync's merge: stale from this record on)
        self.directions_synced = self.input_stats_synced = self.residual_synced = None
        inputs, targets, b = program.prepare(batch)
        if self._train_random is None:  # dropout written in a forward (the not-at-a-minimum warning's cause, ux53)
            probe = getattr(program, "random_in_train_mode", None)
            self._train_random = bool(probe(inputs, b)) if probe is not None else False
        if self._data_buffers is None and b >= 2:  # (one record cannot be split: the next batch tells)
            self._data_buffers, self._data_buffers_unchecked = program.data_dependent_buffers(inputs, b)
        if self._input_stats is False:
            names = persistent_float_buffers(self.model)
            self._input_stats = InputStatistics(self.model, names, inputs, b) if names else None
            if self._input_stats is not None and not self._input_stats.sums:
                self._input_stats = None
        if self._input_stats and not self._batch_rerun:
            # every record read, those left out of n too; a first batch rerun on another program once
            # (ux54a: counted twice before, a standardiser's ddof-1 sd then matched no statistic)
            self._input_stats.update(inputs, b)
        if self._normalised_probe:
            self._normalised_probe = False
            if int(st["n"]) == 0 and self._request[0] != "exact":  # the exact sandwich projects them out
                own, raw = getattr(program, "model", None), self.batch_fn(batch)[0]
                # the program's private copy (its weights in the model's dtype): no second copy of a
                # large model; where that forward fails (tensor attributes cast), a copy of the model
                # if it holds a norm module (a norm function alone is missed there: not worth a copy)
                found = normalised_layers(own, raw, self.names, owned=True) \
                    if isinstance(own, nn.Module) and own is not self.model else None
                moduled = any(isinstance(m, SCALE_INVARIANT_NORMS) for m in self.model.modules())
                self._normalised = found if found is not None else \
                    (normalised_layers(self.model, raw, self.names) if moduled else None) or {}
        if self._probe_pending:
            self._probe_pending = False
            first = int(st["n"]) == 0
            x = self.batch_fn(batch)[0]
            reused = reused_layers(self.model, x, self.names) if first else []
            typed = any(isinstance(m, WEIGHT_REUSE_LAYERS) for m in self.model.modules())
            if reused or (typed and first):
                floats = forward_floats(self.model, x, b) if first else None
                self.resolve(reused, floats, self._output_count(inputs) if first else None)
                if self.hessian == "ggn_residual" and not self._residual_block_zero(inputs, targets):
                    # the layer types allowed it, the forward does not (a functional tanh, a module
                    # applied twice): "auto" keeps the choice it made before gn28
                    self.resolve(reused, floats, None)
                if state is None:
                    st = self.state
                else:
                    # a caller's state (EstimationMetric's, registered before this choice) lacks what the
                    # new choice sums, the K-FAC factors of the diagonal sandwich's correction: added, zero,
                    # for the caller to register (without them MISCallback and MISIndicator read the
                    # uncorrected sigma where assess corrects it: nu42b, 3% on a small ResNet)
                    for k, v in self.state.items():
                        if k not in st:
                            st[k] = v.clone() if isinstance(v, Tensor) else []
        # Keys of the raw batch (before batch_fn and the dtype cast): the same whatever the
        # loader's order and whether batch_fn or a loss hook splits the batch.
        keys = record_keys(batch, None, b) if self.selection == "hash" else None
        # records whose loss does not depend on the weights (every label missing): not members,
        # left out of n, the sums (which they would not change) and the record sample; counted in
        # n_void, by which finalize rescales the weight decay (the same objective; sm45)
        void = (self.program.void_rows(inputs, targets, b)
                if VOID_RECORD_TEST and hasattr(self.program, "void_rows") else None)
        n_void = 0 if void is None else int(void.sum())
        if n_void:
            if n_void == b:
                _add_void(st, n_void)
                return b
            keep = (~void).nonzero().squeeze(1)
            keys = (record_keys(batch, None, b) if keys is None else keys)[keep]
            inputs, targets, b = slice_rows(inputs, keep), slice_rows(targets, keep), int(keep.numel())
        self._draw_keys = _LazyKeys(batch, b, keys)
        if self.mode != "exact" and not self._batch_rerun:  # (a rerun batch's records are sampled once)
            self._sample_loss_directions(inputs, targets)
        if self.factored is not None:
            kron_rows: dict[str, int] | None = None
            back = None
            if self._kron_program() is self.factored:
                # the K-FAC sample's records first (kf43: chosen by content, not by their place)
                order, kron_rows, alt = self._kron_rows(st, self.factored, b)
                inputs, targets, keys, back = self._kron_first(order, inputs, targets, keys, b)
            if isinstance(self.factored, LayerProgram):
                # the records whose KFC factors its backward passes form (_add_kron sums the same:
                # the dict itself, which the program lowers where a layer runs over positions)
                self.factored.kron_rows = kron_rows
                self.factored.kron_rows_positions = alt if kron_rows is not None else None
            try:
                self._give_draw_keys(self.factored)
                fac = self.factored.batch(inputs, targets, b)
            except NotImplementedError as exc:
                if int(st["n"]) > 0:
                    raise
                kind = type(self.factored)
                if kind is LayerProgram:
                    self._kfac_refused = str(exc)
                self.factored.close()
                # this model's layout needs the per-layer path, or the generic one
                self.factored = self._fast_program(LayerProgram) if kind is FactoredProgram else None
                if self.factored is None:  # the convolutions' K-FAC factors from a side program
                    self._set_kron_side()
                self._batch_rerun = True  # (the batch's records are read once by what counts them)
                try:
                    return self.update(batch, state)
                finally:
                    self._batch_rerun = False
            else:
                self._settle_ggn()
                if not self.records_per_update:
                    self.records_per_update = _records_per_update(fac, b, (inputs, targets),
                                                                  getattr(self.factored, "saved_bytes", None))
                self._update_factored(st, fac, inputs, targets, b, keys, kron_rows, back)
                if n_void:
                    _add_void(st, n_void)
                return b + n_void
        self._settle_ggn()
        self._update_kron_side(st, inputs, targets, b)
        self._update_gradients(st, inputs, targets, b, keys)
        if self.hessian == "exact":
            self._update_exact_hessian(st, inputs, targets)
        elif self.hessian == "ggn_residual":
            self._update_residual(st, inputs, targets)
        elif self.hessian == "hutchinson":
            self._update_hutchinson(st, inputs, targets)
        st["n"] += b
        if n_void:
            _add_void(st, n_void)
        return b + n_void

    def _give_draw_keys(self, prog: Any, rows: Tensor | None = None) -> None:
        """Give a per-layer program that may draw Monte Carlo Gauss-Newton directions (the
        estimation's own, the K-FAC side one) this batch's record keys, those of the raw batch
        (:func:`record_keys`, as the record sample's; of its ``rows`` only where it gets those),
        for its next ``batch`` call: each record's draws are then a function of the record, not
        of the batch size, order or process split."""
        if self._draw_keys is not None and isinstance(prog, LayerProgram) and prog.ggn_mode in ("ggn_mc", "auto") and prog.ggn_choice != "ggn":
            keys = self._draw_keys()
            prog.draw_keys = keys if rows is None else keys[rows]

    def _sample_loss_directions(self, inputs: Any, targets: Any) -> None:
        """Offer a batch's records to the loss directions' sample (:attr:`_loss_rank`, by their
        content keys), except on a model with one output per record (the first batch's: its
        ``rank(L_i)`` is at most 1, counted as 1, and no key is hashed)."""
        if self._one_output is None:
            try:
                self._one_output = output_numel(self.program.output_shape(slice_tree(inputs, 0, 2))) == 1
            except Exception:  # (the sample's measure says why no L_i is formed)
                self._one_output = False
        if not self._one_output:
            assert self._draw_keys is not None  # (set by _update for this batch)
            self._loss_rank.add(self._draw_keys(), inputs, targets)

    def loss_direction_part(self, who: int | None = None) -> Held:
        """This process's sample unmeasured, rows on the CPU (:meth:`LossDirectionSample.held`; a
        model with one output per record: a fixed count of 1), gathered at a DDP sync for
        :func:`~.loss_directions.world_sample`, which every process measures alike; with ``who``
        (this process's index) keys only (:meth:`LossDirectionSample.keyed`, the rows taken from
        :meth:`loss_direction_rows`)."""
        if self._one_output:
            return (1.0, "measured"), []
        return self._loss_rank.held() if who is None else self._loss_rank.keyed(who)

    def loss_direction_rows(self, positions: Tensor) -> list[tuple[Tensor, Any, Any]]:
        """The rows of this process's sample at ``positions`` (:meth:`LossDirectionSample.rows`)."""
        return [] if self._one_output else self._loss_rank.rows(positions)

    def loss_directions(self) -> tuple[float, str, int] | None:
        """``(r, how, records)``: the mean ``rank(L_i)`` the diagonal leverage is spread over, how
        it was had (``"measured"``, else why not) and over how many records (0: not sampled); the
        whole DDP world's where :attr:`directions_synced` holds it; ``None`` where the sample holds no
        record (none seen; a Metric pickled before :meth:`pass_facts` carried it) (:mod:`~.loss_directions`)."""
        if self.directions_synced is not None:
            return self.directions_synced
        if self._one_output:  # a fixed count of 1, not sampled
            return 1.0, "measured", 0
        return self._loss_rank.value() if self._loss_rank.groups or self._loss_rank.fixed else None

    def _loss_ranks(self, inputs: Any, targets: Any, k: int) -> tuple[Tensor, str]:
        """``([k] rank(L_i), how)`` of ``k`` records: the loss directions per record that the diagonal
        estimator's mean leverage is spread over (method.md section 4, "Finite-sample (leverage)
        correction"; ``rank(L_i)`` with eigenvalues below :data:`LOSS_DIRECTIONS_RTOL` of the
        largest left out, at least 1). ``how`` is ``""`` where measured, else why not: above
        :data:`LOSS_RANK_MAX_OUTPUTS` outputs each output is one direction (the rank of a
        softmax over ``V`` classes is ``V - 1`` per position: the leverage then reads low by
        ``1/V``); where the loss Hessian in the outputs cannot be formed (an output that is not
        floating tensors, a hook calling the model twice), no ranks (``[0]``): one direction per
        record (the largest correction: the leverage then reads high where there are more)."""
        try:
            shape = self.program.output_shape(inputs)
            c = output_numel(shape)
            if c > LOSS_RANK_MAX_OUTPUTS:
                return torch.full((k,), float(c), dtype=torch.float64), (
                    f"{c} outputs per record, above {LOSS_RANK_MAX_OUTPUTS}: each output counted as "
                    "one loss direction, the rank of their loss Hessian not measured")
            ranks = []
            for x, y in split_batch(inputs, targets, k, LOSS_RANK_BLOCK):
                L = self.program.loss_output_hessians(x, y, shape).reshape(-1, c, c).to(torch.float64)
                L = 0.5 * (L + L.transpose(1, 2))
                # a structural count: directions below LOSS_DIRECTIONS_RTOL of the record's largest
                # carry no leverage worth counting, and a loss evaluated in float32 (ComputeDtypeLoss:
                # a closure holding float32 class weights) reads a softmax's null direction up to ~1e-5
                ranks.append(torch.linalg.matrix_rank(L, rtol=LOSS_DIRECTIONS_RTOL, hermitian=True).clamp_min(1))
            return torch.cat(ranks).to(torch.float64), ""
        except Exception as exc:  # outputs without a loss Hessian: the conservative count
            log.info("estimation: rank of the loss Hessian not measured (%s)", exc)
            return torch.empty(0, dtype=torch.float64), (
                f"the loss Hessian in the outputs is not available ({type(exc).__name__}: {exc}); one "
                "loss direction per record assumed (the largest correction)")

    def _diagonal_leverage(self, trace: float, n: int, diagnostics: dict[str, Any]) -> float:
        """The diagonal estimator's mean leverage per loss direction, applied or not
        (:func:`diagonal_leverage`); ``0.0`` where :attr:`leverage_correction` is ``False``."""
        rank, how, sampled = self.loss_directions() or (
            # (no record seen by this process, or an EstimationMetric pickled before its pass's
            # decisions were carried: pass_facts)
            1.0, "no record's loss directions were sampled (none read by this process, or the sample was not "
            "carried by a copy of the Metric): one loss direction per record assumed (the largest correction)", 0)
        h = diagonal_leverage(trace, n, rank, diagnostics, correct=self.leverage_correction is not False)
        diagnostics["leverage_directions_records"] = sampled  # (0: one output per record, or not measured)
        # at most 1 each to the trace: what they could add to the mean leverage per direction
        diagnostics.update(leverage_unassessed_weights=self._unassessed,
                           leverage_unassessed_bound=self._unassessed / (n * max(rank, 1.0)))
        if how != "measured":
            diagnostics["leverage_directions_note"] = how
        return h

    def _settle_ggn(self) -> None:
        """After the first batch: the Gauss-Newton diagonal the program actually forms.
        The per-layer program's ``"auto"`` takes the sampled-label one when the exact one
        needs more than ``GGN_EXACT_MAX_DIRECTIONS`` directions; the factored nn.Linear path
        (one output per record: one direction) and the torch.func path (which forms every
        output Jacobian anyway) form the exact one, ``hessian="ggn_mc"`` included."""
        if self.hessian not in ("ggn", "ggn_mc"):
            return
        prog = self.factored
        if isinstance(prog, LayerProgram):
            new = prog.ggn_choice or self.hessian
            why = (f"sampled-label Gauss-Newton: the exact one needs {prog.ggn_directions} directions "
                   f"> {GGN_EXACT_MAX_DIRECTIONS} per record") if new == "ggn_mc" and self.hessian == "ggn" else ""
        else:
            new = "ggn"
            why = ("hessian='ggn_mc': the exact Gauss-Newton diagonal, as cheap on this path "
                   f"({'one output per record' if prog is not None else 'torch.func output Jacobians'})"
                   ) if self.hessian == "ggn_mc" else ""
        if new != self.hessian:
            self.hessian, self.estimator = new, describe_estimator(self.mode, new)
            self.reason = f"{self.reason}; {why}"
            log.info("estimation: %s (%s)", self.estimator, self.reason)

    def _update_gradients(self, st: dict[str, Any], inputs: Any, targets: Any, b: int,
                          keys: Tensor | None) -> None:
        """Per-sample gradient sums (and ``g g^T`` in exact mode), stored records, and with
        ``hessian="ggn"`` the Gauss-Newton diagonal from the per-sample output Jacobians."""
        program, names, d, ggn = self.program, self.names, self.d, self.hessian in ("ggn", "ggn_residual")
        if ggn:
            # each batch's own shape (one record's forward): a sequence model padded per batch has
            # another T in each (rv52b: the first batch's shape failed the second's reshape)
            first, self._out_shape = self._out_shape is None, program.output_shape(inputs)
            c = output_numel(self._out_shape)
            if first and c > GGN_MAX_OUTPUTS * 64:
                raise ValueError(f"hessian='ggn' needs few outputs per record; this model has {c}")
        out_shape = self._out_shape
        c_out = output_numel(out_shape)
        # per-record floats held at once: gradients, plus the output Jacobians when they are kept
        width = c_out if ggn else 1 + (self._c_out or 1 if self.keep_factors else 0)
        step = max(1, self.budget // max(d * width, 1))
        dev = st["g_sum"].device
        a = 0
        for x, y in split_batch(inputs, targets, b, step):
            bb = batch_size_of(y)
            if ggn:
                # (recurrent layers: the program takes their records one at a time, per_sample.RECURRENT_LAYERS)
                out, jac = program.output_jacobians(x)  # out [b, C], jac {n: [b, C, *shape]}
                e, L = program.loss_output_derivatives(out, y, out_shape or ())
                if self.mode == "exact":  # the Gauss-Newton Hessian sum_i J_i' L_i J_i, whole (d x d)
                    Jf = torch.cat([jac[k].reshape(bb, c_out, -1) for k in names], 2).to(torch.float64)
                    st["H_sum"] += torch.einsum("bcj,bce,bek->jk", Jf, L.to(torch.float64), Jf).to(dev)
                grads = {}
                for k in names:
                    J = jac[k].reshape(bb, c_out, -1)
                    grads[k] = torch.einsum("bc,bcj->bj", e, J)
                    LJ = torch.einsum("bce,bej->bcj", L, J)
                    st["h_sum"][slice(*self.offsets[k])] += (J * LJ).sum(dim=(0, 1)).to(dev, self.acc_dtype)
            else:
                grads = {k: v.reshape(bb, -1) for k, v in program.per_sample_grads(x, y).items()}
            extra = self._leverage_factors(x, y, bb) if self.keep_factors else None
            for k in names:
                gk = grads[k].to(dev, self.acc_dtype)
                sl = slice(*self.offsets[k])
                st["g_sum"][sl] += gk.sum(0)
                st["g2_sum"][sl] += gk.square().sum(0)
            flat = _flatten(grads, names, bb).to(dev, torch.float64)
            st["grad_norm_sq"] += flat.square().sum()
            if self.mode == "exact":
                st["gg_sum"] += flat.T @ flat
            if extra is not None:  # stored rows: [g | J | L] (split again in finalize)
                flat = torch.cat([flat, extra.to(flat.device)], 1)
            self._store(st, flat, x, y, None if keys is None else keys[a : a + bb])
            a += bb

    def _leverage_factors(self, x: Any, y: Any, b: int) -> Tensor | None:
        """``[b, C d + C^2]`` float64: each record's curvature factor pair, flattened: ``(Q, S)``
        of :func:`_record_curvature` (its exact Hessian on the span of its output gradients,
        ``Q' S Q``), or where the model has no per-record second derivatives the output Jacobian
        ``J`` and the loss Hessian in the outputs ``L`` (the Gauss-Newton factor ``J' L J``, which
        depends on where the output ends; ``_leverage_ggn`` says why); ``None`` (and no more
        factors) when the model's outputs do not allow them or they exceed the budget."""
        first = self._c_out is None
        try:
            if first:
                self._lev_shape = self.program.output_shape(x)
                self._c_out = output_numel(self._lev_shape)
                if self.num_records * (self.d + self._c_out * (self.d + self._c_out)) > self.budget:
                    raise ValueError(f"{self._c_out} outputs x {self.d} weights x {self.num_records} records: "
                                     f"{FACTORS_OVER_BUDGET}{self.budget}")
            else:
                shape = self.program.output_shape(x)
                if output_numel(shape) != self._c_out and _late(shape) != _late(self._lev_shape):
                    # a leaf the first batch dropped read here (output_reads.read_later): this record's
                    # factor in its own width, the stored rows widened to one at finalize (_widened_rows)
                    self._c_out = output_numel(shape)
                if output_numel(shape) != self._c_out:
                    # the stored rows [g | J | L] have one width for every record (rv52b)
                    raise ValueError(
                        f"the model's outputs per record change between batches ({self._c_out} on the first, "
                        f"{output_numel(shape)} here: e.g. a sequence model padded per batch): the exact "
                        "estimator's per-record leverage factors need one output size; pad every batch to one "
                        "length (e.g. the collate function's max_length), or use estimation='diagonal'")
                self._lev_shape = shape  # (the same size, this batch's leaf shapes)
            jac, L = self.program.gauss_newton_factors(x, y, self._lev_shape)
        except Exception as exc:  # a model whose outputs are not one tensor, or too many of them
            if not first:  # the first batch had them: a real error
                raise
            if self.leverage_correction is True:
                raise ValueError(f"leverage_correction=True: the per-record factors (output Jacobians) are not "
                                 f"available for this model ({type(exc).__name__}: {exc})") from exc
            log.info("estimation: no leverage factors (%s)", exc)
            self._leverage_off = f"{type(exc).__name__}: {exc}"
            self.keep_factors = False
            return None
        c = self._c_out
        J = torch.cat([jac[k].reshape(b, c, -1) for k in self.names], 2)
        rows = getattr(self.program, "read_rows", lambda _c: None)(c)
        if rows is not None:  # entries of one output tensor no record's loss reads: out of the span (ux53)
            rows = rows.to(J.device)
            J, L = J[:, rows], L[:, rows][:, :, rows]
        if self._leverage_ggn is None:
            try:
                Q, S = _record_curvature(self.program, x, y, J, self.names, self.offsets)
            except (RuntimeError, NotImplementedError) as exc:
                if not first:  # the first batch had them: a real error
                    raise
                # no second derivative per record (EmbeddingBag): the Gauss-Newton factor at the
                # model's output, which depends on where the output ends (said in the report)
                self._leverage_ggn = f"{type(exc).__name__}: {exc}"
                log.info("estimation: leverages from the Gauss-Newton factors (%s)", exc)
            else:
                return torch.cat([Q.reshape(b, -1), S.reshape(b, -1)], 1)
        return torch.cat([J.to(torch.float64).reshape(b, -1), L.reshape(b, -1).to(torch.float64)], 1)

    def late_leaves(self) -> list[str]:
        """The output leaves the first batch dropped and a later batch read, put back
        (:func:`~.output_reads.read_later`), by any of this accumulator's programs or, after a
        DDP sync, any process's (:attr:`late_elsewhere`)."""
        return sorted({leaf for prog in (self.program, self.factored, getattr(self, "_kron_side", None))
                       for attr in ("output_layout", "_hook_layout", "_shape", "_layout")
                       for leaf in _late(getattr(prog, attr, None))} | set(self.late_elsewhere))

    def _update_exact_hessian(self, st: dict[str, Any], inputs: Any, targets: Any) -> None:
        """The batch's autograd Hessian: whole (exact mode) or its diagonal. A layer without a
        second derivative in torch (``EmbeddingBag``) gets the Gauss-Newton Hessian ``J' L J``
        instead (first derivatives of the model only), said in the estimator's reason."""
        dev = st["g_sum"].device
        H_b = None
        if not getattr(self, "_no_second_derivative", False):
            try:
                H_b = _batch_hessian(self.program, inputs, targets, self.names, self.offsets, self.d)
            except (NotImplementedError, RuntimeError) as exc:
                if "derivative for" not in str(exc) or "not implemented" not in str(exc):
                    raise
                self._no_second_derivative = True
                self.reason = (f"{self.reason}; the exact Hessian is unavailable ({exc}): the Gauss-Newton "
                               "Hessian J'LJ in its place (equal at a minimum of a well-specified model)")
                self.estimator = self.estimator.replace("exact Hessian diagonal", "Gauss-Newton Hessian diagonal")
                if self.mode == "exact":
                    self.estimator = "exact sandwich (Gauss-Newton Hessian, per-sample gradients)"
                log.info("estimation: %s (%s)", self.estimator, self.reason)
        if H_b is None:
            H_b = _batch_gauss_newton(self.program, inputs, targets, self.names, self.d)
        H_b = H_b.to(dev)
        if self.mode == "exact":
            st["H_sum"] += H_b
        else:
            st["h_sum"] += torch.diagonal(H_b).to(self.acc_dtype)

    def _residual_block_zero(self, inputs: Any, targets: Any) -> bool:
        """Whether the largest module's own block of the residual term is zero on this batch
        (:func:`residual_block_check` <= :data:`RESIDUAL_BLOCK_RTOL`); sets what
        ``_update_residual`` then computes (that block skipped, or every column)."""
        if self._out_shape is None:
            self._out_shape = self.program.output_shape(inputs)
        block = self._largest_group
        ratio, rows = residual_block_check(self.program, inputs, targets, self.names, self.offsets, self.d, block)
        # the checks' rows R v, summed over DDP processes at the sync for the union's ratios (world_residual)
        self._residual_rows = {"largest": (list(block), residual_block_index(self.offsets, block), rows)}
        ok = ratio <= RESIDUAL_BLOCK_RTOL
        self._residual_skip = block if ok else None
        skipped = self._largest if ok else 0
        self._residual_info = {"residual_skipped_block": list(block) if ok else [],
                               "residual_block_ratio": ratio, "residual_columns": self.d - skipped}
        if not ok:
            log.info("estimation: the residual term's block of %s is not zero (relative %.2g)", block, ratio)
        return ok

    def _update_residual(self, st: dict[str, Any], inputs: Any, targets: Any) -> None:
        """``hessian="ggn_residual"``: add the batch's residual term ``R`` (:func:`batch_residual`)
        to ``H_sum``, which ``_update_gradients`` filled with ``J' L J``: their sum is the exact
        Hessian. The first batch checks that the largest module's own block of ``R`` is zero
        (:func:`residual_block_check`); where it is not, every column is computed (the exact
        Hessian still, at the full cost), said in the reason."""
        if self._residual_info is None and not self._residual_block_zero(inputs, targets):
            ratio = self._residual_info["residual_block_ratio"]
            self.reason = (f"{self.reason}; the residual term's block of the largest module is not zero "
                           f"(relative {ratio:.2g} > {RESIDUAL_BLOCK_RTOL:g}: the outputs are not affine in "
                           "its weights): all its columns computed")
        info = self._residual_info
        if "residual_zero_blocks" not in info:
            # the other modules' own blocks, checked once (first batch) as the largest one's: those
            # found zero leave their own rows out of batch_residual's passes (cn29: cheaper, same R)
            every = parameter_groups(self.names)
            others = [g for g in every if not set(g) & set(self._residual_skip or ())]
            zero, ratios, rows = residual_zero_blocks(self.program, inputs, targets, self.names, self.offsets,
                                                      self.d, others, drawn=every)
            info["residual_zero_blocks"] = [list(g) for g in zero]
            info["residual_block_ratios"] = {residual_group_key(g): r for g, r in zip(others, ratios)}
            self._residual_rows = {**(self._residual_rows or {}), "others": (
                [list(g) for g in others], [residual_block_index(self.offsets, g) for g in others], rows)}
        R = batch_residual(self.program, inputs, targets, self.names, self.offsets, self.d,
                           self._residual_skip, info["residual_zero_blocks"])
        st["H_sum"] += R.to(st["H_sum"].device)

    def _update_hutchinson(self, st: dict[str, Any], inputs: Any, targets: Any) -> None:
        """Rademacher probes of the Hessian diagonal. Welford over this batch's probes:
        ``h2_sum`` accumulates the variance of each batch's probe mean, so the sum over
        batches is the variance of the estimate (batches independent)."""
        names, dev, P = self.names, st["g_sum"].device, self.hutchinson_probes
        mean = {k: torch.zeros(self.offsets[k][1] - self.offsets[k][0], dtype=self.acc_dtype, device=dev) for k in names}
        m2 = {k: torch.zeros_like(v) for k, v in mean.items()}
        for p in range(P):
            est = _hutchinson_probe(self.program, inputs, targets, self.generator)
            for k in names:
                v = est[k].reshape(-1).to(dev, self.acc_dtype)
                delta = v - mean[k]
                mean[k] += delta / (p + 1)
                m2[k] += delta * (v - mean[k])
        for k in names:
            sl = slice(*self.offsets[k])
            st["h_sum"][sl] += mean[k] * P
            if P > 1:
                st["h2_sum"][sl] += m2[k] / (P - 1) / P
        st["probes"] += P

    def _update_factored(self, st: dict[str, Any], fac: dict, inputs: Any, targets: Any, b: int,
                         keys: Tensor | None, kron_rows: dict[str, int] | None = None,
                         back: Tensor | None = None) -> None:
        """Linear layers: gradient sums and the Gauss-Newton diagonal from layer factors; the
        K-FAC factors over ``kron_rows`` (:meth:`_kron_rows`) where the program is the K-FAC one.
        ``back``: each original row's place in the batch as passed (:meth:`_kron_first`)."""
        assert self.factored is not None
        dev = st["g_sum"].device
        into = None
        if (isinstance(self.factored, FactoredProgram) and dev.type == "cpu"
                and all(t[0].device.type == "cpu" for t in fac.values())):
            # (a CUDA model's factors with the functional pass's CPU state take the returned sums)
            # the weights' sums added in place over their live rows (linear_factors._add_live_rows):
            # no [d] float64 copies per batch, and no GEMMs over a ReLU layer's dead units
            into = {wn: tuple(st[s][slice(*self.offsets[wn])] for s in ("g_sum", "g2_sum", "h_sum"))
                    for wn, _ in self.factored.layout.values() if wn is not None and wn in self.offsets}
        sums, norm = self.factored.batch_sums(fac, self.acc_dtype, **({"into": into} if into is not None else {}))
        for k in self.names:
            if into is not None and k in into:  # added in place by batch_sums
                continue
            sl = slice(*self.offsets[k])
            g, g2, h, *h2 = sums[k]
            st["g_sum"][sl] += g.to(dev)
            st["g2_sum"][sl] += g2.to(dev)
            st["h_sum"][sl] += h.to(dev)
            if h2 and h2[0] is not None:  # the Monte Carlo Gauss-Newton's variance bound
                st["h2_sum"][sl] += h2[0].to(dev)
        st["grad_norm_sq"] += norm.to(dev, torch.float64).sum()
        if kron_rows is not None:
            self._add_kron(st, self.factored, fac, kron_rows)
        # Only the rows that can still be stored are materialised (a [rows, d] tensor).
        rows = storable_rows(st, keys, b, self.num_records, self.keep_w)
        if keys is None and back is not None:  # the first records read, wherever the K-FAC order put them
            rows = back[rows]
        if rows.numel():
            # the rows' taps only where their gradients are stored (slicing a convolution's
            # patches copies them)
            flat = (self.factored.record_gradients(self.factored.select_rows(fac, rows), rows.numel())
                    .to(dev, torch.float64) if self.keep_w else torch.empty(rows.numel(), 0))
            self._store(st, flat, slice_rows(inputs, rows), slice_rows(targets, rows),
                        None if keys is None else keys[rows])
        st["n"] += b

    def _kron_caps(self, st: dict[str, Any], prog: FactoredProgram | LayerProgram,
                   positions: bool = False) -> dict[str, int]:
        """Per K-FAC layer the records its factors sum (the cap
        ``max(KFAC_MIN_RECORDS, KFAC_RECORDS_PER_WIDTH * max(p, out))``, the partial traces' below;
        ``positions``: every layer of an all-Linear model taken as running over positions)."""
        caps: dict[str, int] = {}
        if not any(k.startswith("kfac_A.") for k in st):
            return caps
        trace = isinstance(prog, LayerProgram) and LF.KFAC_CONV_FACTORS == "trace"
        for m, (p, q) in prog.kron_layers().items():
            if f"kfac_n.{m}" in st:  # a state built before the program changed has none
                cap = max(KFAC_MIN_RECORDS, KFAC_RECORDS_PER_WIDTH * max(p, q))
                # the partial traces' outer products: a fixed cost (KFAC_TRACE_MAX_FLOPS); an all-Linear
                # model's layer on [B, in] inputs forms them from its rank-one gradients at p^2 + out^2 per
                # record (kf33): dg30's cap, as the factored program's
                if trace and (prog.kron_conv or positions or m in prog.kron_positions):
                    per = q * p * (p + q) * prog.kron_blocks()[m].groups
                    cap = min(cap, max(LF.KFAC_TRACE_MIN_RECORDS, int(LF.KFAC_TRACE_MAX_FLOPS // max(per, 1))))
                caps[m] = cap
        return caps

    def _kron_rows(self, st: dict[str, Any], prog: FactoredProgram | LayerProgram, b: int
                   ) -> tuple[Tensor | None, dict[str, int], dict[str, int] | None]:
        """Which of the batch's records each K-FAC layer's factors sum: ``(order, rows, alt)``, the
        layer summing the records ``order[:rows[m]]`` (``order`` ``[s]`` row indices; ``None``: the
        batch's first rows); ``alt``: an all-Linear per-layer program's layers not yet known to run
        over positions, their ``rows`` where they do (the partial traces' lower cap: a prefix of
        the same order, :attr:`LayerProgram.kron_rows_positions`), else ``None``. With the number
        of training records known (``n_hint``), a threshold sample by record content
        (:mod:`~mis_lightning.estimation.kron_sample`: the same records whatever the order,
        batching and process split), at most ``KFAC_SAMPLE_CEILING`` caps per process; else, as
        formerly, the first cap records read (order-dependent, reported)."""
        caps = self._kron_caps(st, prog)
        alt_caps = ({m: c for m, c in self._kron_caps(st, prog, positions=True).items() if c < caps[m]}
                    if isinstance(prog, LayerProgram) and not prog.kron_conv else {})
        done = {m: int(st[f"kfac_n.{m}"]) for m in caps}
        n_hint = self._request[2]
        if n_hint is None or n_hint < 1:
            return (None, {m: max(0, min(b, c - done[m])) for m, c in caps.items()},
                    {m: max(0, min(b, c - done[m])) for m, c in alt_caps.items()} or None)
        room = {m: max(0, KFAC_SAMPLE_CEILING * c - done[m]) for m, c in caps.items()}
        thresholds = sample_thresholds(caps, n_hint)
        if all(t >= 1 << 32 for t in thresholds.values()) and not alt_caps:  # every record (n <= cap)
            return None, {m: min(b, room[m]) for m in caps}, None
        order, rows = sample_order(record_hashes(self._draw_keys(), self._mc_seed), thresholds)
        alt = None
        if alt_caps:
            _, alt = sample_order(record_hashes(self._draw_keys()[order], self._mc_seed),
                                  sample_thresholds(alt_caps, n_hint))
            alt = {m: min(r, max(0, KFAC_SAMPLE_CEILING * alt_caps[m] - done[m])) for m, r in alt.items()}
        return order, {m: min(r, room[m]) for m, r in rows.items()}, alt

    def _kron_first(self, order: Tensor | None, inputs: Any, targets: Any, keys: Tensor | None, b: int
                    ) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        """The batch with the K-FAC sample's records first (``order``, then the others in batch
        order): ``(inputs, targets, keys, back)``, ``back [b]`` each original row's new place (the
        other sums are the same up to float summation order; the record sample keeps its records,
        its ``"first"`` rows through ``back``). Unchanged (``back`` None) where ``order`` is the
        batch's own first rows."""
        if order is None or bool((order == torch.arange(order.numel())).all()):
            return inputs, targets, keys, None
        rest = torch.ones(b, dtype=torch.bool)
        rest[order] = False
        full = torch.cat([order, torch.nonzero(rest).squeeze(-1)])
        back = torch.empty_like(full)
        back[full] = torch.arange(b)
        self._draw_keys = _LazyKeys(None, b, self._draw_keys()[full])
        return (slice_rows(inputs, full), slice_rows(targets, full),
                None if keys is None else keys[full], back)

    def _add_kron(self, st: dict[str, Any], prog: FactoredProgram | LayerProgram, fac: Any,
                  rows: dict[str, int]) -> None:
        """Add a batch's Kronecker factors (``kfac_A.<layer>``, ``kfac_G.<layer>``) over its first
        ``rows[m]`` records (:meth:`_kron_rows`, the batch put in its order) to ``st``."""
        if not any(k.startswith("kfac_A.") for k in st):
            return
        dev = st["g_sum"].device
        # the factored program adds in place where the state is on the CPU (no zero-filled,
        # widened [p, p] copies: es32); the per-layer program's sums are returned
        into = ({m: (st[f"kfac_A.{m}"], st[f"kfac_G.{m}"]) for m in rows}
                if dev.type == "cpu" and isinstance(prog, FactoredProgram)
                and all(t[0].device.type == "cpu" for t in fac.values()) else None)
        sums = (prog.kron_sums(fac, torch.float64, rows, into=into) if into is not None
                else prog.kron_sums(fac, torch.float64, rows))
        for m, (A, G, *pos) in sums.items():
            if into is None or m not in into:
                # an MLP classifier's state was laid out for the FactoredProgram ([p, p]) before its first
                # batch moved it to the per-layer program ([1, p, p] sums; kf33): the same floats
                st[f"kfac_A.{m}"] += A.to(dev).reshape(st[f"kfac_A.{m}"].shape)
                st[f"kfac_G.{m}"] += G.to(dev).reshape(st[f"kfac_G.{m}"].shape)
            st[f"kfac_n.{m}"] += rows[m]
            if pos and f"kfac_t.{m}" in st:  # (the partial traces' pos is 0: no kfac_t needed)
                st[f"kfac_t.{m}"] += pos[0]

    def _update_kron_side(self, st: dict[str, Any], inputs: Any, targets: Any, b: int) -> None:
        """The side program's forward and backward (K-FAC factors only). A layout the factored
        program cannot take (found on the first batch: several outputs per record) moves the
        side to the per-layer program where every assessed layer is an nn.Linear
        (:meth:`_layer_kron_side`; the state's ``[p, p]`` factors take its ``[1, p, p]`` sums, as
        the classifiers' side program's); otherwise it is dropped, and the sigma keeps no correction."""
        side = self._kron_side
        if side is None:
            return
        layer = isinstance(side, LayerProgram)
        order, rows, alt = self._kron_rows(st, side, b)
        if not rows or (not any(rows.values()) and int(st["n"]) > 0):
            # every layer's factors have their records, or none of this batch's is sampled (the
            # first batch still goes through: it finds whether the program takes the model)
            return
        xs, ys, bs = inputs, targets, b
        if order is not None and order.numel():  # only the sampled records through its passes (kf43)
            xs, ys, bs = slice_rows(inputs, order), slice_rows(targets, order), order.numel()
        try:
            if layer:
                side.kron_rows, side.kron_rows_positions = rows, alt  # (rows lowered there, as above)
                self._give_draw_keys(side, order if bs < b else None)
                fac = side.batch(xs, ys, bs, squares=False)
            else:
                fac = side.batch(xs, ys, bs)
        except NotImplementedError as exc:  # (e.g. a transposed convolution called twice: neither program takes it)
            if int(st["n"]) > 0:
                raise
            if layer:
                self._kfac_refused = str(exc)
                self._kron_side = None
                side.close()
                return
            self._set_kron_side(LayerProgram)
            self._update_kron_side(st, inputs, targets, b)
            return
        self._add_kron(st, side, fac, rows)

    def _store(self, st: dict[str, Any], flat: Tensor, x: Any, y: Any, keys: Tensor | None) -> None:
        store_records(st, flat, x, y, keys, num_records=self.num_records, keep_grad=self.keep_w,
                      pytree_records=self.pytree_records)

    # -- finalisation -------------------------------------------------------------------------
    @full_float32
    def finalize(self, state: dict[str, Any] | None = None) -> Estimate:
        """The :class:`Estimate` of the accumulated (possibly summed over processes) state.

        Where ``"auto"`` chose the estimator without knowing ``n`` (a stream, e.g. the
        Metric without ``num_training_records``) and the ``n`` seen would have chosen another
        one (the one ``assess`` gives the same data), ``diagnostics["estimator_with_n"]`` says
        which, and :func:`estimator_warnings` puts it in the report.

        Raises:
            ValueError: fewer than 2 records were seen; exact mode without stored gradients.
        """
        with scoring_threads():  # as update's
            est = self._finalize(state)
        n_void = int((self.state if state is None else state).get("n_void", 0))
        if n_void:
            # the decay as told (finalize used it scaled by (n + n_void) / n), and the records left out
            est.diagnostics.update(_decay_diagnostics(self._decay_told))
            est.diagnostics["records_without_loss"] = {"count": n_void, "read": est.n + n_void}
        if self._train_random:  # named by the not-at-a-minimum warning where no dropout layer explains it
            est.diagnostics["random_in_train_mode"] = True
        late = self.late_leaves()
        if late:  # output leaves the first batch dropped and a later one read (output_reads.read_later)
            est.diagnostics["output_leaves_read_late"] = late
        if self._repeated:
            # copies of a record scored as independent members (fu27): said in the report's warnings
            est.diagnostics["duplicate_records"] = self._repeated[0]
            est.diagnostics["duplicate_records_of"] = self._repeated[1]
        other = self.choice_with_n(est.n)
        if other is not None:
            est.diagnostics["estimator_with_n"] = other
        if self._data_buffers:  # released with the weights, not scored: the report's warning (nu45)
            est.diagnostics["data_dependent_buffers"] = list(self._data_buffers)
        stats = self.input_stats_synced or self._input_stats  # (every DDP process's records, at a sync)
        if stats:  # a standardiser fitted on the training inputs before training (vb46)
            fitted = {k: v for k, v in stats.matches(self.model).items()
                      if k not in (self._data_buffers or [])}
            if fitted:
                est.diagnostics["fitted_buffers"] = fitted
        unchecked = self._data_buffers_unchecked
        if self._data_buffers is None and unchecked is None:  # no batch held 2 records to split
            names = persistent_float_buffers(self.model)
            if names:
                unchecked = {"buffers": names, "why": "no batch read held the 2 records needed to split it"}
        if unchecked:
            est.diagnostics["data_buffers_unchecked"] = {"buffers": list(unchecked["buffers"]), "why": unchecked["why"]}
        if self.num_records > est.n and est.num_records == est.n:  # more asked for than there are: the
            # report says so (fu31); every record's influence is kept, so nothing is approximated
            est.diagnostics["num_records_requested"] = self.num_records
        rnns = [f"{type(m).__name__} {f!r}" for f, m in self.model.named_modules() if isinstance(m, RECURRENT_LAYERS)]
        if rnns:  # the diagonal sandwich misreads them (the report's warning, docs/benchmarks.md "rn43")
            est.diagnostics["recurrent_layers"] = rnns
            if est.mode == "diagonal":
                est.diagnostics["diagonal_over_recurrent"] = True
        return est

    def choice_with_n(self, n: int) -> dict[str, Any] | None:
        """``{"estimator", "reason", "n"}`` of the estimator ``"auto"`` gives ``n`` records when
        it differs from the one chosen without knowing ``n``; ``None`` otherwise (``n`` was
        given, the choice was not ``"auto"`` or does not move with ``n``)."""
        mode, hessian, n_hint, ggn = self._request
        if n_hint is not None or "auto" not in (mode, hessian):
            return None
        m, h, why = choose_estimator(self.model, self.d, mode, hessian, n=n, ggn=ggn, reused=self._reused,
                                     forward_floats=self._choice_floats, outputs=self._choice_outputs,
                                     largest=self._largest, symmetric=self._symmetric_layers())
        if (m, h) == (self.mode, self.hessian):
            return None
        return {"estimator": describe_estimator(m, h), "reason": why, "n": n}

    def _finalize(self, state: dict[str, Any] | None = None) -> Estimate:
        if isinstance(self.factored, FactoredProgram):
            self.factored.scratch.clear()  # the pass's GEMM buffers (refilled by a later update)
        st = self.state if state is None else dict(state)
        names, offsets = self.names, self.offsets
        n = int(st["n"])
        n_void = int(st.get("n_void", 0))
        # The training objective (1/N) sum_i loss_i + lam/2 |theta|^2 over the N = n + n_void records
        # read is (N/n) x [(1/n) sum over the n members + (lam N/n)/2 |theta|^2]: the same minimum,
        # Hessian and gradient covariance up to that factor, so each member's figures and sigma are
        # unchanged, and the records without loss leave the record average and d / n only (sm45)
        self.decay = {k: v * (n + n_void) / n if n else v for k, v in self._decay_told.items()}
        if n < 2:
            why = (": no record was seen (an empty dataloader, or a Metric's compute() with no update() since "
                   "reset())") if n == 0 else ""
            if n_void:
                why += (f"; {n_void} record(s) read have every target missing (NaN, an ignore index, a zero weight) and a loss that does not "
                        "depend on the weights: they are not counted")
            raise ValueError(f"n (number of training records) must be >= 2 (>= 4 to score schemes), got {n}{why}")
        self._repeated = None
        if self.keep_w and isinstance(st.get("rec_grad"), list):
            # rows of several factor widths (an output leaf put back mid-run, or processes whose
            # first batches sorted the outputs apart): one width, each record's factor unchanged
            st = {**st, "rec_grad": _widened_rows(st["rec_grad"], self.d)}
        if self.selection == "hash":
            st = {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
            prune_bottom_k(st, self.num_records)
            rep = repeated_records(st)
            if rep:
                self._repeated = (rep, int(cat_state(st["rec_key"]).numel()))
        cpu = torch.device("cpu")
        if self.mode != "exact" and not self.keep_w and self.d > FLOAT32_STATE_MIN_PARAMS:
            return self._finalize_lean(st, n)
        g_mean_flat = (st["g_sum"].to(cpu) / n).to(torch.float64)
        v_flat = (st["g2_sum"].to(cpu) / n).to(torch.float64) - g_mean_flat.square()
        theta = {k: self.program.params[k].reshape(-1).to(cpu, torch.float64) for k in names}
        diagnostics = _stationarity(g_mean_flat, v_flat, theta, names, offsets, self.decay,
                                    float(st["grad_norm_sq"]), n)
        stored_g = cat_state(st["rec_grad"]) if self.keep_w else None
        G = None if stored_g is None else stored_g.to(cpu, torch.float64)[: self.num_records]
        common = dict(n=n, names=names, shapes={k: tuple(self.program.params[k].shape) for k in names},
                      offsets=offsets, theta=theta, diagnostics=diagnostics, budget=self.budget,
                      estimator=self.estimator, reason=self.reason)
        if self.mode == "exact":
            if G is None:
                raise ValueError("exact mode stores per-sample gradients; raise budget or lower num_records")
            gg = st["gg_sum"].to(cpu) / n
            H = st["H_sum"].to(cpu) / n + torch.diag(torch.as_tensor(self._decay_slice(0, self.d), dtype=torch.float64).expand(self.d))
            J = L = None
            d, extra = self.d, G.shape[1] - self.d
            # C outputs from the row width d + C d + C^2 (a process that saw no record, or a
            # state synced from others, never set self._c_out)
            c = round((math.sqrt(d * d + 4 * extra) - d) / 2) if extra > 0 else None
            if c is not None and c * d + c * c == extra:  # the stored Gauss-Newton factors
                J = G[:, d : d + c * d].reshape(-1, c, d)
                L = G[:, d + c * d :].reshape(-1, c, c)
            G = G[:, :d]
            # a NaN or inf in the sums (a loss whose gradient or Hessian is not finite at some
            # record while the loss is) would reach the sandwich's eigendecompositions, which fail
            # inside LAPACK or return NaN without naming it: name the parameters here
            for what, x in (("Hessian", H), ("gradient covariance", gg), ("per-record gradients", G.T)):
                bad = nonfinite_coordinates(x)
                if bad.numel():
                    raise ValueError(f"the exact estimator's {what} is not finite (NaN or inf) at "
                                     f"{name_coordinates(bad, offsets)}: the loss's derivatives must be finite at the "
                                     "model's weights for every record")
            check_curvature(top_curvature(H) if d else 1.0,
                            bool((G - g_mean_flat).abs().max() > 0) if G.numel() else False)
            correct = self.leverage_correction is not False and J is not None
            if J is None and self.leverage_correction == "auto":
                diagnostics["leverage_unavailable"] = getattr(self, "_leverage_off", None) or \
                    "the per-record factors were not kept"
            if J is not None:
                # "exact": each record's exact Hessian on its output-gradient span (_record_curvature),
                # a function of the loss of the parameters; "gauss_newton": J' L J at the model's
                # output (no per-record second derivatives), which depends on where the output ends
                diagnostics["leverage_curvature"] = "exact" if self._leverage_ggn is None else "gauss_newton"
                if self._leverage_ggn is not None:
                    diagnostics["leverage_curvature_reason"] = self._leverage_ggn
            records: dict[str, Tensor] = {}
            # symmetries: no information, no curvature (method.md section 6); H's precision: the
            # stored weights' rounding or the distance to the stationary point
            precision = max(self._stored_eps(), diagnostics["gradient_norm_ratio"])
            flat = flat_directions(gg, H, G, self._decay_slice(0, self.d), precision,
                                   known=self._attention_tangents(names) if self._attention_heads else None)
            if flat.shape[1]:  # which parameters carry them: the report names the symmetry's owners (nux51 #1)
                diagnostics["flat_direction_parameters"] = flat_parameter_shares(flat, names, offsets)
            variants: dict[float, dict[str, Tensor | None]] = {}
            sigma_flat, w, mahal, corr = sandwich_compute(gg, H, g_mean_flat, G, n, self.damping, diagnostics,
                                                          jacobians=J, loss_hessians=L, correct_leverage=correct,
                                                          records=records, floor_variants=variants, flat=flat,
                                                          precision=precision,
                                                          newton_gradient=_penalised_gradient(
                                                              g_mean_flat, theta, names, self._decay_slice(0, self.d)),
                                                          decay=self._decay_slice(0, self.d))
            # the step through the curvature sigma was built from (floored, |eigenvalues|): ln41
            diagnostics.update(_newton_offset(records.pop("newton_step"), sigma_flat,
                                              diagnostics["gradient_norm_ratio"], records.pop("newton_step_held", None),
                                              offsets))
            diagnostics["records_unlike_training"] = diagnostics.get("stiff_offset_sd", 0.0) > UNSEEN_RECORDS_SD
            diagnostics.update(_interpolation(float(st["grad_norm_sq"]), n, diagnostics["gradient_norm"],
                                              float((torch.diagonal(H) * _flatten_theta(theta, names)).norm()),
                                              torch.finfo(self.dtype).eps))
            floor_variants = {f: {"sigma": _split(v["sigma"], names, offsets), "influence": v["w"],
                                  "mahalanobis": v["mahal"], "correlation": v["corr"], "leverage": v["leverage"],
                                  "self_term": v["self_term"], "self_weight": v["self_weight"],
                                  "correlation_factor": v["correlation_factor"]}
                              for f, v in variants.items()} or None
            residual = self._residual_info if self.residual_synced is None else self.residual_synced
            if residual is not None:
                diagnostics.update(residual)
            return Estimate(mode="exact", hessian=self.hessian, sigma=_split(sigma_flat, names, offsets),
                            influence=w, num_records=w.shape[0], mahalanobis=mahal, correlation=corr,
                            leverage=records.get("leverage"), self_term=records.get("self_term"),
                            self_weight=records.get("self_weight"),
                            correlation_factor=records.get("correlation_factor"),
                            _floor_variants=floor_variants, **common)

        diagnostics.update(self._symmetry_diagnostics())
        h_sum = st["h_sum"].to(cpu, torch.float64)
        if self.hessian == "hutchinson":
            # Each probe's v*Hv summed the batch Hessians; divide by n to get the mean-loss Hessian.
            total = h_sum / self.hutchinson_probes  # sum over batches of each batch's probe mean
            h_flat = total / n
            # Standard error from the within-batch spread of the probes (h2_sum: summed
            # variances of the batch means); needs >= 2 probes per batch.
            rel = st["h2_sum"].to(cpu, torch.float64).sqrt() / total.abs().clamp_min(1e-300)
            diagnostics["hutchinson_probes"] = int(st["probes"])
            diagnostics["hutchinson_median_relative_error"] = float(rel.median())
            # h_flat's own standard error (0 with one probe a batch: no spread measured)
            h_error = st["h2_sum"].to(cpu, torch.float64).sqrt() / n
        else:
            h_flat, h_error = h_sum / n, None
        if self.hessian == "ggn_mc":
            diagnostics.update(_mc_error(h_sum, st["h2_sum"].to(cpu, torch.float64), self.ggn_mc_samples))
        # coordinates the loss does not depend on: their gradients are rounding (w = 0 below)
        v_centring = _without_rounding_gradients(v_flat, names, offsets, self._rounding_eps(), diagnostics,
                                                 self._stored_eps())
        if self.d:
            check_curvature(float((h_flat + self._decay_slice(0, self.d)).max()), bool((v_flat > 0).any()))
        sigma_flat, w = diagonal_compute(h_flat + self._decay_slice(0, self.d), v_flat, g_mean_flat, G, n, self.damping,
                                         diagnostics, v_centring, h_error=h_error,
                                         precision=max(self._stored_eps(), diagnostics["gradient_norm_ratio"]))
        # the finite-sample (leverage) correction with the mean leverage per loss direction
        # (method.md section 4): V / (1 - h), so sigma and the standardised leave-one-out
        # influences (psi / (1 - h) over sigma / sqrt(1 - h)) both grow by 1 / sqrt(1 - h)
        trace = leverage_trace(h_flat, h_flat + self._decay_slice(0, self.d), torch.isfinite(v_centring))
        diagonal = trace
        if KFAC_LEVERAGE_TRACE and KFAC_CORRECTION:
            trace = self._kron_leverage_trace(st, n, v_centring, trace, diagnostics)
        hbar = self._diagonal_leverage(trace, n, diagnostics)
        self._low_read_flag(st, n, v_centring, trace, diagonal, diagnostics)
        if hbar > 0:
            grow = _influence_scale(hbar)
            sigma_flat = sigma_flat * grow
            w = None if w is None else w * grow
            v_centring = v_centring * (1.0 - hbar)
        kfac = self._kfac_factors(st, n, diagnostics, v_centring=v_centring)
        for k, f in kfac.items():
            sl = slice(*offsets[k])
            sigma_flat[sl] = sigma_flat[sl] * f
        if w is not None and kfac and G is not None and KFAC_INFLUENCES:
            # the stored influences of psi = -H^-1 g under the same Kronecker model (their
            # correlation, corr(H^-1 V H^-1), is what the correlated headline reads)
            lev = _influence_scale(hbar) if hbar > 0 else 1.0
            self._kfac_influences(st, G, g_mean_flat, sigma_flat / lev, n, torch.isfinite(v_centring), w, lev,
                                  diagnostics)
        hth = float(((h_flat + self._decay_slice(0, self.d)) * _flatten_theta(theta, names)).norm())
        diagnostics.update(_interpolation(float(st["grad_norm_sq"]), n, diagnostics["gradient_norm"], hth, self._rounding_eps()))
        records, factors = None, None
        if w is not None:
            kept = w.shape[0]
        else:
            xs, ys = st["rec_x"], st["rec_y"]
            if isinstance(xs, Tensor):  # concatenated (hash selection / synced states)
                records = [(xs, ys)] if xs.shape[0] else []
            else:
                records = list(zip(xs, ys))
            kept = sum(batch_size_of(y) for _, y in records)
            if isinstance(self.factored, FactoredProgram) and records:
                factors = self._record_factors(records)
        kept = min(kept, self.num_records)
        return Estimate(
            mode="diagonal", hessian=self.hessian, sigma=_split(sigma_flat, names, offsets), influence=w,
            num_records=kept, leverage=_uniform_leverage(hbar, kept), influence_scale=_influence_scale(hbar),
            # the per-layer path also recomputes the stored records' gradients (same numbers)
            _program=self.factored if isinstance(self.factored, LayerProgram) else self.program,
            _records=records,
            _g_mean=_split(g_mean_flat, names, offsets), _v_diag=_split(v_centring, names, offsets),
            factors=factors, **common,
        )

    def _attention_tangents(self, names: list[str]) -> Tensor:
        """``[d, k]`` the attention heads' symmetry tangents at the assessed weights
        (:func:`~.symmetries.attention_head_tangents`; frozen tensors from the model)."""
        params = dict(self.model.named_parameters())

        def value(k: str) -> Tensor | None:
            t = self.program.params[k] if k in self.names else params.get(k)
            return None if t is None else t.detach().to("cpu", torch.float64)
        return attention_head_tangents(self._attention_heads, value, names, dict(self.decay))

    def _symmetric_layers(self) -> list[str]:
        """The layers with a scale symmetry known so far (weight_norm from the start, the
        normalised ones after the first batch's probe): ``choose_estimator``'s ``symmetric``."""
        return [k or "(model)" for k in self._normalised] + list(self._weight_normed)

    def _symmetry_diagnostics(self) -> dict[str, Any]:
        """The diagonal estimator's scale symmetries (symmetries.py): ``normalised_layers``
        (``{layer: norm}``, the layers whose whole output a scale-invariant normalisation reads)
        and ``weight_normed_layers``, each only where there is one. The exact estimator projects
        such directions out (:func:`flat_directions`) and reports none."""
        out: dict[str, Any] = {}
        if self._normalised:
            out["normalised_layers"] = dict(self._normalised)
        if self._weight_normed:
            out["weight_normed_layers"] = list(self._weight_normed)
            other = {k: v for k, v in self._weight_norm_kinds.items() if v != "weight_norm"}
            if other:  # spectral_norm's (nu45); weight_norm's need no entry (the older reports')
                out["weight_normed_kinds"] = other
        return out

    def _kfac_factors(self, st: dict[str, Any], n: int, diagnostics: dict[str, Any],
                      apply: Callable[[str, Tensor], None] | None = None,
                      v_centring: Tensor | None = None) -> dict[str, Tensor]:
        """``{parameter: [numel] float64}``: ``sqrt(VIF_j)`` from each nn.Linear layer's Kronecker
        factors, the factor that turns the diagonal sandwich's conditional sd ``sqrt(V_jj) / H_jj``
        into the marginal sd ``sqrt((H^-1 V H^-1)_jj)`` where ``V`` is proportional to ``H`` within
        the layer (exact for one least-squares Linear layer; method.md section 4, "The diagonal
        sandwich and correlated weights"). Diagnostics: ``kfac_correction`` (whether applied),
        ``kfac_variance_inflation_median`` / ``_p90`` / ``_max`` over the corrected weights (the
        VIF, i.e. the variance factor), ``kfac_corrected_weights``, and ``kfac_uncorrected_layers``
        (layers wider than :data:`~mis_lightning.estimation.linear_factors.KFAC_MAX_WIDTH`) with
        ``kfac_uncorrected_weights``, ``kfac_records_min`` (the fewest records a layer's factors
        summed: :data:`~mis_lightning.estimation.linear_factors.KFAC_RECORDS_PER_WIDTH`; fewer than
        ``n`` for wide layers on many records). Empty
        where the path had no factored Linear program.

        ``apply``: the large-model path (:meth:`_finalize_lean`): each parameter's factor goes to
        ``apply(name, [rows, in] or [rows] float64 sqrt(VIF), r0)``, a block of its rows from row
        ``r0`` at a time, as its layer is done, and nothing of size numel is returned; the VIFs the diagnostics read are kept in float32 (4 bytes per
        corrected weight instead of ~32 in float64 copies; median and maximum are order statistics,
        so they are the float64 ones rounded to float32, the 90th percentile within 2^-24 relative).
        ``v_centring``: ``[d]`` the influences' variances, ``+inf`` at the coordinates whose
        gradients are rounding (:func:`_without_rounding_gradients`; :meth:`_kfac_blocks`).
        """
        prog = self._kron_program()
        if prog is None or not any(k.startswith("kfac_A.") for k in st):
            self._kfac_lost(diagnostics, prog)
            return {}
        self._kfac_order_note(st, n, prog, diagnostics)
        out: dict[str, Tensor] = {}
        kron = prog.kron_layers()
        mods = dict(prog.model.named_modules())
        left, left_w, records = [], 0, []
        todo: list[tuple[str, str | None, str | None]] = []
        # the per-layer program's KFC blocks (kc32; convolutions), computed here, written below
        # with the Linear layers' (the same buffer, diagnostics and ``apply``)
        block_parts: list[tuple[str, Tensor]] = []
        if isinstance(prog, LayerProgram):
            conv = []
            for m, blk, parts in self._kfac_blocks(st, n, prog, left, v_centring):
                ws, bs = [], []
                for A, G, k, scale, decay, _ in parts:
                    # the sandwich's factor: V ~ K, not K + decay (dg30's VIF over-reads there)
                    vif = kfac_variance_inflation(A, G, k, decay, sandwich=True) * scale
                    # below 1 only from factors of every record: a subsample's spread eigenvalues read
                    # it low, the unsafe side (rv52: median 0.155 against 0.313 on a 1200-32-10
                    # classifier, n = 8,000; its subsample scale is a VIF's); floored as a VIF there
                    if not (LF.KFAC_SANDWICH_SHRINKS and bool((decay > 0).any()) and k >= n):
                        vif = vif.clamp_min(1.0)
                    ws.append(vif[:, : blk.fan])
                    bs.append(vif[:, -1])
                if blk.weight is not None:  # [groups, out, fan] in the weight's order (a transposed conv's)
                    block_parts.append((blk.weight, blk.to_param(torch.stack(ws))))
                if blk.bias is not None:
                    block_parts.append((blk.bias, torch.cat(bs)))
                records.append(int(st[f"kfac_n.{m}"]))
                if not isinstance(mods[m], nn.Linear):
                    conv.append(m)
            left_w = sum(prog._numels[k] for m in left for k in prog.slots[m].values())
            # a side program's refused layers (_layer_kron_side): uncorrected, and said so
            taken = set(prog.names)
            for k in self.names:
                if k not in taken:
                    if k.rpartition(".")[0] not in left:
                        left.append(k.rpartition(".")[0])
                    left_w += self.offsets[k][1] - self.offsets[k][0]
            if prog.kron_conv:
                diagnostics["kfac_convolutions"] = conv
            else:  # an all-Linear model with several outputs per record (kf33): its own report sentence
                diagnostics["kfac_multi_output"] = True
        for m, (wn, bn) in ({} if isinstance(prog, LayerProgram) else prog.layout).items():
            if m not in kron or f"kfac_A.{m}" not in st or not float(st[f"kfac_A.{m}"].diagonal().sum()) > 0:
                left.append(m)
                left_w += sum(mods[m].get_parameter(k.rpartition(".")[2]).numel() for k in (wn, bn) if k is not None)
            else:
                todo.append((m, wn, bn))
        # the corrected weights' VIFs in one buffer (the diagnostics' order statistics), filled layer by layer
        total = sum(mods[m].weight.numel() * (wn is not None) + mods[m].out_features * (bn is not None)
                    for m, wn, bn in todo) + sum(part.numel() for _, part in block_parts)
        vifs = torch.empty(total, dtype=torch.float32 if apply is not None else torch.float64)
        at, vmax = 0, -math.inf

        def write(parts: list[tuple[str, Tensor]]) -> None:
            nonlocal at, vmax
            for name, part in parts:
                buf = vifs[at: at + part.numel()].view(part.shape)
                at += part.numel()
                if apply is None:
                    buf.copy_(part)
                    vmax = max(vmax, float(part.max()))
                    out[name] = part.reshape(-1).sqrt()
                    continue
                # by blocks of rows (es33: no [out, in] float64 sqrt and widened sigma per layer,
                # 134 MB of fresh memory at the 1e7 MLP's 4,096 x 2,049 layer); the maximum over
                # the blocks' maxima is the part's (NaN propagates as in one max)
                rows = max(1, FINALIZE_SUB_CHUNK // max(1, math.prod(part.shape[1:])))
                tops = []
                for r0 in range(0, part.shape[0], rows):
                    blk = part[r0: r0 + rows]
                    buf[r0: r0 + rows].copy_(blk)
                    tops.append(blk.max())
                    apply(name, blk.sqrt(), r0)
                vmax = max(vmax, float(torch.stack(tops).max()))

        write(block_parts)
        del block_parts
        for m, wn, bn in todo:
            decay = torch.tensor(([self.decay[wn]] * mods[m].in_features if wn is not None else [])
                                 + ([self.decay[bn]] if bn is not None else []), dtype=torch.float64)
            k = int(st[f"kfac_n.{m}"])
            vif = kfac_variance_inflation(st[f"kfac_A.{m}"].cpu(), st[f"kfac_G.{m}"].cpu(), k, decay)
            # a subsample's inverse reads high (Wishart): to the full sample's, never below 1
            scale = kfac_subsample_scale(k, n, *kron[m])
            if scale != 1.0:  # (all records summed: the VIF is already >= 1)
                vif = vif.mul_(scale).clamp_min_(1.0)
            records.append(k)
            parts = []
            if wn is not None:
                parts.append((wn, vif[:, : mods[m].in_features]))
            if bn is not None:
                parts.append((bn, vif[:, -1]))
            write(parts)
            del vif, parts
        if at and apply is not None:
            med, p90 = _order_statistics_in_place(vifs)
            diagnostics.update(kfac_correction=True, kfac_variance_inflation_median=med,
                               kfac_variance_inflation_p90=p90, kfac_variance_inflation_max=vmax,
                               kfac_corrected_weights=int(vifs.numel()), kfac_records_min=min(records))
        elif at:
            v = vifs
            diagnostics.update(kfac_correction=True, kfac_variance_inflation_median=float(v.median()),
                               kfac_variance_inflation_p90=_quantile(v, 0.9), kfac_variance_inflation_max=vmax,
                               kfac_corrected_weights=int(v.numel()), kfac_records_min=min(records))
        else:
            diagnostics["kfac_correction"] = False
        diagnostics["kfac_uncorrected_layers"] = left
        diagnostics["kfac_uncorrected_weights"] = left_w
        return out

    def _low_read_flag(self, st: dict[str, Any], n: int, v_centring: Tensor, trace: float, diagonal: float,
                       diagnostics: dict[str, Any]) -> None:
        """``diagnostics["diagonal_low_read"]`` where the mean leverage per loss direction,
        counted with each decayed layer of the per-layer program under its Kronecker model
        (:meth:`_kron_leverage_trace`: at most the diagonal count; the diagonal count ``diagonal``
        where no layer is), over ``n rank(L)``, exceeds :data:`DIAGONAL_LOW_READ_LEVERAGE`:
        ``{"leverage_per_direction": float, "count": "kronecker" | "diagonal", "threshold": float}``.
        The table marks the rows (*) and the leverage warning says why
        (:func:`~mis_lightning.report.regime_failures`, ``assess._diagonal_leverage_note``). The
        diagonal estimator's correction uses one mean leverage for every record, and its block models
        hold no correlation across layers; where the mean leverage is not small the exact estimator's
        per-record leverages (a few records near 1) and that correlation moved its figures above the
        diagonal ones (docs/benchmarks.md "dg55"). ``trace``: the count the correction used (the
        Kronecker one already where :data:`KFAC_LEVERAGE_TRACE`); the Kronecker count is formed here
        only where ``trace`` alone would flag (it is never above it), into a scratch dict: the
        correction's diagnostics are not touched. Call after :meth:`_diagonal_leverage` (its
        ``leverage_directions``). Nothing where :data:`DIAGONAL_LOW_READ_FLAG` is ``False``, nor where
        the mean leverage per direction was capped (``leverage_capped``: the figures then sit near their
        maximum, which the leverage warning says; e.g. issue 13's MLPs, d / n = 24-2,400)."""
        if not DIAGONAL_LOW_READ_FLAG or n <= 0 or diagnostics.get("leverage_capped"):
            return
        rank = max(float(diagnostics.get("leverage_directions", 1.0)), 1.0)
        if not trace / (n * rank) > DIAGONAL_LOW_READ_LEVERAGE:
            return
        counted = trace
        if KFAC_CORRECTION and not KFAC_LEVERAGE_TRACE:
            counted = self._kron_leverage_trace(st, n, v_centring, trace, {})
        per = max(counted, 0.0) / (n * rank)
        if per > DIAGONAL_LOW_READ_LEVERAGE:
            diagnostics["diagonal_low_read"] = {
                "leverage_per_direction": per, "threshold": DIAGONAL_LOW_READ_LEVERAGE,
                "count": "kronecker" if counted < diagonal else "diagonal"}
            if DIAGONAL_LOW_READ_REMEDY:  # what estimator_warnings' remedy sizes (dg56)
                diagnostics["diagonal_low_read"].update(d=int(self.d), n=int(n))

    def _kron_leverage_trace(self, st: dict[str, Any], n: int, v_centring: Tensor, trace: float,
                             diagnostics: dict[str, Any]) -> float:
        """The leverage trace with each decayed layer of the per-layer program's Kronecker blocks
        counted under its Kronecker model (:func:`~.linear_factors.kfac_leverage_trace`, capped at the
        diagonal terms it replaces: the diagonal count is an upper bound of the layer block's trace by
        Schur-Horn, :func:`leverage_trace`); ``trace`` unchanged elsewhere (method.md section 4,
        "Finite-sample (leverage) correction"). Diagnostics, where a layer was counted so:
        ``leverage_trace_diagonal`` (the diagonal count) and ``leverage_kronecker_layers``.
        ``v_centring``: ``[d]``, ``+inf`` at the weights left out of the trace (rounding gradients)."""
        prog = self._kron_program()
        if not isinstance(prog, LayerProgram) or not any(k.startswith("kfac_A.") for k in st):
            return trace
        out, layers = trace, []
        probes = self.hutchinson_probes if self.hessian == "hutchinson" else 1
        for m, blk, parts in self._kfac_blocks(st, n, prog, [], v_centring):
            change = 0.0
            for g, (A, G, k, _, decay, _) in enumerate(parts):
                # only factors of every record: a subsample's (k < n, KFAC_MIN_RECORDS) spreads the
                # eigenvalues and x / (1 + x) is concave, so its trace reads low, the unsafe side (rv52:
                # 0.59x the every-record trace on a 1200-32-10 classifier, n = 8,000); the diagonal
                # count stays there
                kt = kfac_leverage_trace(A, G, k, decay) if k >= n else None
                if kt is None:
                    continue
                idx, lam = [], []  # the group's weights (as _kfac_blocks reads them) and their decay
                if blk.weight is not None:
                    a = self.offsets[blk.weight][0] + g * blk.out * blk.fan
                    idx.append(torch.arange(a, a + blk.out * blk.fan))
                    lam.append(torch.full((blk.out * blk.fan,), float(self.decay[blk.weight]), dtype=torch.float64))
                if blk.bias is not None:
                    a = self.offsets[blk.bias][0] + g * blk.out
                    idx.append(torch.arange(a, a + blk.out))
                    lam.append(torch.full((blk.out,), float(self.decay[blk.bias]), dtype=torch.float64))
                j = torch.cat(idx)
                # the diagonal terms these weights added to trace (the finalizes' h_data, in their order)
                hd = (st["h_sum"][j].to("cpu", torch.float64) / probes) / n
                diag = float(_leverage_terms(hd, hd + torch.cat(lam), torch.isfinite(v_centring[j])).sum())
                change += min(kt, diag) - diag
            if change:
                out += change
                layers.append(m)
        if layers:
            diagnostics.update(leverage_trace_diagonal=trace, leverage_kronecker_layers=layers)
        return max(out, 0.0)

    def _kfac_order_note(self, st: dict[str, Any], n: int, prog: FactoredProgram | LayerProgram,
                         diagnostics: dict[str, Any]) -> None:
        """``kfac_order_dependent``: ``{"layers": [...], "cause": str}`` where some layer's factors
        summed records chosen by their place in the stream rather than by their content
        (:meth:`_kron_rows`): the number of training records was not given (the first cap records
        read), or the stream held more than it said (the per-process ceiling cut the sample short:
        :func:`~mis_lightning.estimation.kron_sample.sample_truncated`). Its sigma correction, so
        the leakage, then depends on the reading order and the split over processes (to the
        subsample's noise: ~``sqrt(2 / (k - p))`` relative on the VIF); :func:`estimator_warnings`
        says so."""
        n_hint = self._request[2]
        layers = []
        for m, cap in self._kron_caps(st, prog).items():
            k = int(st[f"kfac_n.{m}"])
            if k == 0:
                continue
            if (k < n) if n_hint is None or n_hint < 1 else sample_truncated(k, cap, n, n_hint):
                layers.append(m)
        if layers:
            cause = ("the number of training records was not given (MISIndicator without num_training_records, "
                     "or training data of unknown size: an iterable, a loader of whole batches), so they summed the first "
                     "records read"
                     if n_hint is None or n_hint < 1 else
                     f"the stream held more records (n = {n:,}) than the {n_hint:,} stated, and the records past "
                     f"{KFAC_SAMPLE_CEILING}x the sample's size per process were the first ones read")
            diagnostics["kfac_order_dependent"] = {"layers": layers, "cause": cause}

    def _kfac_lost(self, diagnostics: dict[str, Any], prog: Any) -> None:
        """Where the model's assessed convolutions, and the nn.Linear layers of a model whose
        assessed layers are all nn.Linear or convolutions (its factored or per-layer program, or
        the classifiers' side program, corrects them otherwise), get no K-FAC correction because a per-layer
        program refused the model at its first batch (a transposed convolution, a norm or an
        embedding called twice per forward, a Linear or convolution called twice on an input
        without the batch's records first, a transposed convolution on unbatched input, a weight
        also used outside its layer):
        ``kfac_correction`` False, ``kfac_lost`` (the cause, naming the layer),
        ``kfac_uncorrected_layers`` (those layers) and ``kfac_uncorrected_weights``;
        :func:`estimator_warnings` puts it in the report, :func:`~mis_lightning.report.regime_failures`
        marks the rows. Nothing where the correction is switched off (``KFAC_CORRECTION``) or was
        never due. (A Linear called twice lost it unsaid; now the per-layer program
        takes a Linear's or a convolution's calls as positions of one call,
        ``linear_factors.REPEATED_LINEAR_CALLS`` / ``REPEATED_CONV_CALLS``, and corrects it.)"""
        if self._kfac_refused is None or prog is not None or not KFAC_CORRECTION or self.mode != "diagonal":
            return
        mods = dict(self.model.named_modules())
        owners = [k.rpartition(".")[0] for k in self.names]
        all_linear = all(isinstance(mods.get(m), (nn.Linear, *_CONV_TYPES)) for m in owners)
        layers: list[str] = []
        weights = 0
        for k, m in zip(self.names, owners):
            if isinstance(mods.get(m), _CONV_TYPES) or (all_linear and isinstance(mods.get(m), nn.Linear)):
                if m not in layers:
                    layers.append(m)
                weights += self.offsets[k][1] - self.offsets[k][0]
        if layers:
            diagnostics.update(kfac_correction=False, kfac_lost=self._kfac_refused,
                               kfac_uncorrected_layers=layers, kfac_uncorrected_weights=weights)

    def _kfac_blocks(self, st: dict[str, Any], n: int, prog: LayerProgram, left: list[str],
                     v_centring: Tensor | None = None) -> Iterator[tuple[str, KronBlock, list[tuple[Tensor, Tensor, int, float, Tensor, float]]]]:
        """The per-layer program's KFC blocks (convolutions and nn.Linear layers of a model with
        convolutions; Grosse & Martens 2016) with factors: ``(module, block, per group (A, G,
        records, VIF subsample scale, decay [p], psi subsample scale))``. ``A`` is rescaled so that
        the Kronecker product's trace, ``tr(A / k) tr(G / k)``, equals the group's Gauss-Newton
        diagonal sum (``h_sum / n``): KFC's factors sum over positions, whose product reads about
        ``positions`` times the Hessian where the output gradients are spatially uncorrelated
        (its ``1 / positions``) and otherwise by another factor. The VIF does not depend on that
        scale without decay; ``psi = -H^-1 g`` does, and the decay's weight against it. The
        subsample scales count rows as records x positions (``kfac_t``): a smaller correction
        than per record, so the VIF is lowered less. Layers left out (no block, wider than
        :data:`~mis_lightning.estimation.linear_factors.KFAC_MAX_WIDTH`, no factors) are appended
        to ``left``.

        A group's bias whose gradients are all rounding (``v_centring`` ``+inf``: a convolution's
        bias before a GroupNorm / InstanceNorm, whose output gradients sum to zero over the
        positions) is a zero row and column of ``A``, its exact value: its rounding there, divided
        by its own tiny diagonal in ``A``'s correlations, read as O(1) correlations with the weights
        and moved their VIF (the weights' sigma 0.43x against 4.1x the exact one for the same
        Conv1d without the bias, benchmarks/kfac_conv.py ``instancenorm``)."""
        f64 = torch.float64
        kron, blocks = prog.kron_layers(), prog.kron_blocks()
        # the estimator's Hessian diagonal (as _finalize's h_flat: Hutchinson's h_sum sums its probes)
        h = st["h_sum"].to("cpu", f64) / max(n, 1) / (self.hutchinson_probes if self.hessian == "hutchinson" else 1)
        for m in prog.slots:
            if m not in kron or f"kfac_A.{m}" not in st or not float(st[f"kfac_A.{m}"].diagonal(0, -2, -1).sum()) > 0:
                left.append(m)
                continue
            blk = blocks[m]
            # [groups, p, p]; an MLP classifier's state may hold [p, p] (see _add_kron) and no kfac_t
            sA = st[f"kfac_A.{m}"].reshape(blk.groups, blk.p, blk.p)
            sG = st[f"kfac_G.{m}"].reshape(blk.groups, blk.out, blk.out)
            k, t = int(st[f"kfac_n.{m}"]), int(st.get(f"kfac_t.{m}", 0))
            pos = t / max(k, 1)  # t = 0: the partial traces, no subsample rescaling (scales 1)
            full = t == 0 or k >= n
            decay = torch.tensor(([self.decay[blk.weight]] * blk.fan if blk.weight is not None else [])
                                 + ([self.decay[blk.bias]] if blk.bias is not None else []), dtype=f64)
            parts = []
            for g in range(blk.groups):
                A, G = sA[g].to("cpu", f64), sG[g].to("cpu", f64)
                if blk.bias is not None and v_centring is not None:
                    a = self.offsets[blk.bias][0] + g * blk.out
                    if not bool(torch.isfinite(v_centring[a: a + blk.out]).any()):  # a cancelled bias
                        A = A.clone()
                        A[-1], A[:, -1] = 0.0, 0.0
                tr = 0.0
                if blk.weight is not None:
                    a = self.offsets[blk.weight][0] + g * blk.out * blk.fan
                    tr += float(h[a: a + blk.out * blk.fan].sum())
                if blk.bias is not None:
                    a = self.offsets[blk.bias][0] + g * blk.out
                    tr += float(h[a: a + blk.out].sum())
                kr = float(A.diagonal().sum()) * float(G.diagonal().sum()) / max(k, 1) ** 2
                if not (tr > 0 and kr > 0 and math.isfinite(tr / kr)):
                    break
                parts.append((A * (tr / kr), G, k,
                              1.0 if full else kfac_subsample_scale(t, round(n * pos), blk.p, blk.out), decay,
                              1.0 if full else kfac_influence_subsample_scale(t, round(n * pos), blk.p, blk.out)))
            if len(parts) < blk.groups:  # a group without curvature: the layer stays uncorrected
                left.append(m)
                continue
            yield m, blk, parts

    def _kfac_influences(self, st: dict[str, Any], grads: Tensor, g_mean: Tensor, sigma: Tensor, n: int,
                         live: Tensor, w: Tensor, grow: float, diagnostics: dict[str, Any]) -> None:
        """Replace, in place, the stored influences ``w [R, d]`` of each K-FAC-corrected nn.Linear
        layer (:meth:`_kfac_factors`) by those of ``psi = -H^-1 (g - g_bar)``, ``H`` the layer's
        Kronecker-factored Hessian (:func:`~mis_lightning.estimation.linear_factors.kfac_inverse_apply`;
        the bias column mixes into the weights' rows), standardised by ``sqrt(n) sigma_j`` (the
        corrected sigma before the leverage correction, whose factor ``w`` already carries): the
        estimator's own ``sqrt(diag Sigma)``, so that ``w = psi / sqrt(diag Sigma)`` as the exact
        estimator's. The gradients' influences ``g / sqrt(V_jj)`` have the correlation of ``V``
        (of ``H`` where ``V ~ H``); the weights' estimation errors have that of ``H^-1 V H^-1``
        (method.md section 4, "The diagonal sandwich and correlated weights"). Weights with no
        influence (``live`` False: rounding gradients) or no sigma keep 0; layers left without
        factors, or wider than :data:`KFAC_INFLUENCE_MAX_WIDTH` (``p + out``: cost), keep the
        gradients' influences (``diagnostics["kfac_influences_left"]``). Factors summed over
        ``m < n`` records: ``psi`` times
        :func:`~mis_lightning.estimation.linear_factors.kfac_influence_subsample_scale` (the bias of
        the inverses, first order as the VIF's, and their noise). ``grads``: ``[R, d]`` float64 stored gradients. Diagnostic
        ``kfac_influences``: the weights whose influences are the K-FAC psi's."""
        prog = self._kron_program()
        assert prog is not None
        kron, mods = prog.kron_layers(), dict(prog.model.named_modules())
        R = grads.shape[0]
        done, left = 0, []
        if isinstance(prog, LayerProgram):
            for m, blk, parts in self._kfac_blocks(st, n, prog, [], torch.where(live, 1.0, math.inf)):
                if blk.p + blk.out > KFAC_INFLUENCE_MAX_WIDTH:
                    left.append(m)
                    continue
                # [R, C_out, fan] and [R, C_out]: a group's rows are its out channels
                W = (blk.to_block((grads[:, slice(*self.offsets[blk.weight])] - g_mean[slice(*self.offsets[blk.weight])])
                                  * live[slice(*self.offsets[blk.weight])])
                     if blk.weight is not None else None)
                B = (((grads[:, slice(*self.offsets[blk.bias])] - g_mean[slice(*self.offsets[blk.bias])])
                      * live[slice(*self.offsets[blk.bias])]).reshape(R, blk.groups, blk.out, 1)
                     if blk.bias is not None else None)
                Y = torch.cat([y for y in (W, B) if y is not None], 3)  # [R, groups, out, p]
                psi = torch.stack([-kfac_inverse_apply(A, G, k, Y[:, g], decay) * iscale
                                   for g, (A, G, k, _, decay, iscale) in enumerate(parts)], 1)
                cols = [(blk.weight, blk.to_param(psi[..., : blk.fan]) if blk.weight is not None else None),
                        (blk.bias, psi[..., -1] if blk.bias is not None else None)]
                for name, x in cols:
                    if name is None or x is None:
                        continue
                    sl = slice(*self.offsets[name])
                    ok = live[sl] & (sigma[sl] > 0)
                    w[:, sl] = torch.where(ok, x.reshape(R, -1) / (math.sqrt(n) * sigma[sl]).clamp_min(1e-300),
                                           torch.zeros((), dtype=x.dtype)) * grow
                    done += int(ok.sum())
        for m, (wn, bn) in ({} if isinstance(prog, LayerProgram) else prog.layout).items():
            if m not in kron or f"kfac_A.{m}" not in st or not float(st[f"kfac_A.{m}"].diagonal().sum()) > 0:
                continue
            if sum(kron[m]) > KFAC_INFLUENCE_MAX_WIDTH:
                left.append(m)
                continue
            q = mods[m].out_features
            fin = mods[m].in_features if wn is not None else 0
            sls = [slice(*self.offsets[k]) for k in (wn, bn) if k is not None]
            parts = [((grads[:, sl] - g_mean[sl]) * live[sl]).reshape(R, q, -1) for sl in sls]
            decay = torch.tensor(([self.decay[wn]] * fin if wn is not None else [])
                                 + ([self.decay[bn]] if bn is not None else []), dtype=torch.float64)
            k = int(st[f"kfac_n.{m}"])
            # factors from a subsample: their inverses read high by m / (m - p - 1) against the full
            # sample's (Wishart, as the VIF's kfac_subsample_scale), and their noise adds ~p / m
            psi = -kfac_inverse_apply(st[f"kfac_A.{m}"].cpu(), st[f"kfac_G.{m}"].cpu(), k, torch.cat(parts, 2),
                                      decay) * kfac_influence_subsample_scale(k, n, *kron[m])
            cols = [psi[:, :, :fin].reshape(R, -1), psi[:, :, fin:].reshape(R, -1)]
            for sl, x in zip(sls, [c for c in cols if c.shape[1]]):
                ok = live[sl] & (sigma[sl] > 0)
                # the leverage correction's factor on every influence, as on the gradients' w
                w[:, sl] = torch.where(ok, x / (math.sqrt(n) * sigma[sl]).clamp_min(1e-300),
                                       torch.zeros((), dtype=x.dtype)) * grow
                done += int(ok.sum())
        diagnostics["kfac_influences"] = done
        diagnostics["kfac_influences_left"] = left

    def _rounding_eps(self) -> float:
        """The relative rounding of the passes' per-sample gradients (their compute dtype)."""
        return torch.finfo(self.fast_dtype if self.factored is not None else self.dtype).eps

    def _stored_eps(self) -> float:
        """The relative rounding of the model's stored assessed weights: a float32 model's
        weights are known to it whatever the passes' dtype."""
        params = dict(self.model.named_parameters())
        return max((torch.finfo(params[k].dtype).eps for k in self.names
                    if k in params and params[k].is_floating_point()), default=0.0)

    def _decay_slice(self, a: int, b: int) -> float | Tensor:
        """The L2 coefficient of flat weights ``a:b``: a float where it is uniform, else a
        float64 ``[b - a]`` vector (per parameter, :attr:`decay`)."""
        vals = set(self.decay.values())
        if len(vals) <= 1:
            return vals.pop() if vals else 0.0
        out = torch.zeros(b - a, dtype=torch.float64)
        for k in self.names:
            s0, e0 = self.offsets[k]
            lo, hi = max(s0, a), min(e0, b)
            if lo < hi:
                out[lo - a: hi - a] = self.decay[k]
        return out

    def _finalize_lean(self, st: dict[str, Any], n: int) -> Estimate:
        """The diagonal estimate of a large model (``d > FLOAT32_STATE_MIN_PARAMS``, influences
        not stored) with memory bounded by a chunk: the per-weight arithmetic of
        :meth:`finalize` (the same float64 operations, element by element) runs on flat chunks
        of :data:`FINALIZE_CHUNK` weights, the global diagnostics are reduced across chunks,
        and ``theta`` (the program's own weights, float32 for large models: exact), ``sigma``, ``g_mean`` and ``V_jj``
        are stored in float32 (relative rounding <= 2^-24 = 6e-8 each; readers cast each chunk
        back to float64). Before: ~90 bytes per weight of float64 temporaries and 32 held."""
        cpu, f64, f32 = torch.device("cpu"), torch.float64, torch.float32
        names, offsets, d = self.names, self.offsets, self.d
        # the weights the estimator computed with (float32 above 10^5 weights): exact, and views
        # of the program's private copy (which the estimate keeps anyway), not another copy
        theta = {k: self.program.params[k].detach().reshape(-1).to(cpu) for k in names}
        hutch = self.hessian == "hutchinson"
        h_sum = st["h_sum"]

        def chunk(a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
            # the same element-wise operations as finalize's whole-vector path
            g = (st["g_sum"][a:b].to(cpu) / n).to(f64)
            v = (st["g2_sum"][a:b].to(cpu) / n).to(f64) - g.square()
            hs = h_sum[a:b].to(cpu, f64)
            h = (hs / self.hutchinson_probes) / n if hutch else hs / n
            return g, v, h + self._decay_slice(a, b)

        g_out, v_out, s_out = (torch.empty(d, dtype=f32) for _ in range(3))
        grad_sq, zero_var, h_min, h_max, neg, h_abs = 0.0, 0, math.inf, -math.inf, 0, 0.0
        # Hutchinson: the lowest entry below -z of its own standard error (diagonal_compute's test)
        z, h_min_sampled = _sampling_z(d), math.inf
        def theta_slice(a: int, b: int) -> Tensor:
            return torch.cat([theta[k][max(s0, a) - s0:min(e0, b) - s0] for k, (s0, e0) in
                              ((k, offsets[k]) for k in names) if s0 < b and e0 > a]).to(f64)

        def penalised(a: int, b: int, g: Tensor) -> Tensor:
            return g + self._decay_slice(a, b) * theta_slice(a, b)

        # Each FINALIZE_CHUNK block runs as sub-blocks of FINALIZE_SUB_CHUNK weights (es33): the
        # same element-wise float64 operations, on temporaries that stay in cache and are reused
        # by the allocator instead of ~30 fresh 32 MB ones per block (each mapped and zeroed by
        # the kernel: ~45% of the 1e7 MLP's estimation was page faults). A block's float sums
        # are taken over its per-weight terms written to one reused [FINALIZE_CHUNK] buffer, its
        # maxima over the sub-blocks' (NaN-propagating, as one max): the same floats as before.
        terms = torch.empty(min(FINALIZE_CHUNK, d), dtype=f64)
        v_max = 0.0
        for a, b, subs in _finalize_blocks(d):
            ext = torch.empty(len(subs), 4, dtype=f64)  # per sub-block: max v, min h, max h, max |h|
            for i, (s, e) in enumerate(subs):
                g, v, h = chunk(s, e)
                torch.square(penalised(s, e, g), out=terms[s - a: e - a])
                zero_var += int((v <= 0).sum())
                ext[i, 0], ext[i, 1], ext[i, 2], ext[i, 3] = v.max(), h.min(), h.max(), h.abs().max()
                neg += int((h <= 0).sum())
                if hutch:
                    out = h < -z * st["h2_sum"][s:e].to(cpu, f64).sqrt() / n
                    if bool(out.any()):
                        h_min_sampled = min(h_min_sampled, float(h[out].min()))
                s_out[s:e] = _curvature_ratios(h, v)  # the floor's scale, before sigma overwrites it
                g_out[s:e], v_out[s:e] = g, v
            grad_sq += float(terms[: b - a].sum())
            bmax, bmin = ext.max(0).values, ext.min(0).values
            v_max = max(v_max, float(bmax[0]))
            h_min, h_max = min(h_min, float(bmin[1])), max(h_max, float(bmax[2]))
            h_abs = max(h_abs, float(bmax[3]))
        if d:
            check_curvature(h_max, v_max > 0)
        # v_out standardises the influences (_v_diag): rounding gradients, and a collapsed unit's
        # residue, get no influence, as in finalize's whole-vector path (in place: no copy of size d)
        rounding: dict[str, Any] = {}
        _without_rounding_gradients(v_out, names, offsets, self._rounding_eps(), rounding, self._stored_eps(),
                                    in_place=True)
        ratio = _curvature_ratio_reference(s_out)
        # the finite-sample (leverage) correction, as finalize's: its trace over the weights with
        # an influence (a pass over the curvature alone), then sigma and V_jj scaled in float64
        # before their float32 store (one rounding, as the whole-vector path's)
        trace, lev = 0.0, {}
        for a, b, subs in _finalize_blocks(d):
            for s, e in subs:
                hs = h_sum[s:e].to(cpu, f64)
                hd = (hs / self.hutchinson_probes) / n if hutch else hs / n
                terms[s - a: e - a] = _leverage_terms(hd, hd + self._decay_slice(s, e), torch.isfinite(v_out[s:e]))
            trace += float(terms[: b - a].sum())
        diagonal = trace
        if KFAC_LEVERAGE_TRACE and KFAC_CORRECTION:
            trace = self._kron_leverage_trace(st, n, v_out, trace, lev)
        hbar = self._diagonal_leverage(trace, n, lev)
        self._low_read_flag(st, n, v_out, trace, diagonal, lev)
        grow = _influence_scale(hbar)
        z_sum, z_count, hth_sq, g_theta, theta_sq = 0.0, 0, 0.0, 0.0, 0.0
        # the offset statistic's kept terms of a block, packed in order (_offset_terms' selection)
        kept = torch.empty(min(FINALIZE_CHUNK, d), dtype=f64)
        for a, b, subs in _finalize_blocks(d):  # diagonal_compute's sigma and the offset's terms (v_max known)
            at = 0
            for s, e in subs:
                g, v, h = chunk(s, e)
                s_out[s:e] = _diagonal_sigma(h, v, n, self.damping * ratio) * grow
                if hbar > 0:
                    v_out[s:e] = torch.where(torch.isfinite(v_out[s:e]), v * (1.0 - hbar), math.inf)
                torch.square(h * theta_slice(s, e), out=terms[s - a: e - a])
                tg = penalised(s, e, g)
                keep = v > V_RELATIVE_FLOOR * v_max
                k = int(keep.sum())
                torch.div(tg[keep].square(), v[keep], out=kept[at: at + k])
                at += k
            hth_sq += float(terms[: b - a].sum())
            # _decay_hint's <g, theta> and |theta|^2, g from its float32 store (2^-24)
            gt, ts = _hint_block_sums(a, b, subs, terms, lambda s, e: penalised(s, e, g_out[s:e].to(f64)), theta_slice)
            g_theta, theta_sq = g_theta + gt, theta_sq + ts
            z_sum, z_count = z_sum + float(kept[:at].sum()), z_count + at
        rms_g = math.sqrt(float(st["grad_norm_sq"]) / n)
        gnorm = math.sqrt(grad_sq)
        diagnostics: dict[str, Any] = {
            "gradient_norm": gnorm, "gradient_norm_ratio": gnorm / max(rms_g, 1e-300),
            **_not_at_minimum(gnorm / max(rms_g, 1e-300), z_sum, z_count, n),
            "minimum_offset_covariance": "diagonal", "zero_gradient_variance": zero_var,
            **_decay_diagnostics(self.decay), **_decay_hint(g_theta, grad_sq, theta_sq, rms_g, self.decay)}
        diagnostics.update(_interpolation(float(st["grad_norm_sq"]), n, gnorm, math.sqrt(hth_sq),
                                          self._rounding_eps()))
        diagnostics.update(self._symmetry_diagnostics())
        if hutch:  # whole-vector diagnostics of the estimators that report their own error
            total = h_sum.to(cpu, f64) / self.hutchinson_probes
            rel = st["h2_sum"].to(cpu, f64).sqrt() / total.abs().clamp_min(1e-300)
            diagnostics["hutchinson_probes"] = int(st["probes"])
            diagnostics["hutchinson_median_relative_error"] = float(rel.median())
            del total, rel
        if self.hessian == "ggn_mc":
            diagnostics.update(_mc_error(h_sum.to(cpu, f64), st["h2_sum"].to(cpu, f64), self.ggn_mc_samples))
        diagnostics.update(hessian_min_diagonal=h_min, hessian_max_diagonal=h_max,
                           **curvature_sign(h_min_sampled if hutch else h_min, h_abs, _DIAGONAL_ROUNDING,
                                            max(self._stored_eps(), diagnostics["gradient_norm_ratio"])),
                           nonpositive_hessian_diagonal=neg, state_dtype="float32", **rounding)
        diagnostics.update(lev)
        def corrected(k: str, f: Tensor, r0: int) -> None:
            # sigma times sqrt(VIF) in float64, one rounding to float32, a block of rows at a time
            a, b = offsets[k]
            sv = s_out[a:b].view(-1, *f.shape[1:])[r0: r0 + f.shape[0]]
            sv.copy_(sv.to(f64).mul_(f))

        self._kfac_factors(st, n, diagnostics, apply=corrected, v_centring=v_out)
        xs, ys = st["rec_x"], st["rec_y"]
        records = ([(xs, ys)] if xs.shape[0] else []) if isinstance(xs, Tensor) else list(zip(xs, ys))
        kept = min(sum(batch_size_of(y) for _, y in records), self.num_records)
        factors = self._record_factors(records) if isinstance(self.factored, FactoredProgram) and records else None
        return Estimate(
            n=n, mode="diagonal", hessian=self.hessian, names=names,
            shapes={k: tuple(self.program.params[k].shape) for k in names}, offsets=offsets,
            theta=theta, sigma=_split(s_out, names, offsets), influence=None,
            num_records=kept, leverage=_uniform_leverage(hbar, kept), influence_scale=_influence_scale(hbar),
            diagnostics=diagnostics, budget=self.budget,
            estimator=self.estimator, reason=self.reason,
            _program=self.factored if isinstance(self.factored, LayerProgram) else self.program,
            _records=records, _g_mean=_split(g_out, names, offsets), _v_diag=_split(v_out, names, offsets),
            factors=factors,
        )

    def _record_factors(self, records: list[tuple[Any, Any]]) -> list[LinearFactors]:
        """The stored records' layer factors: one forward/backward over R records."""
        assert self.factored is not None
        per_layer = [self.factored.batch(x, y, batch_size_of(y)) for x, y in records]
        merged = {m: tuple(torch.cat([p[m][i] for p in per_layer]) for i in range(3)) for m in per_layer[0]}
        R = self.num_records
        return [type(f)(f.module, f.weight, f.bias, f.x[:R], f.d[:R]) for f in self.factored.factors(merged)]


def _add_void(st: dict[str, Any], count: int) -> None:
    """``st["n_void"] += count`` in place (a Metric's registered state tensor), or set where a
    state saved by an earlier version lacks it."""
    if isinstance(st.get("n_void"), Tensor):
        st["n_void"] += count
    else:
        st["n_void"] = torch.tensor(count, dtype=torch.int64)


class _LazyKeys:
    """A batch's :func:`record_keys`, hashed on the first call only (none where no program draws)."""

    def __init__(self, batch: Any, b: int, keys: Tensor | None) -> None:
        self._batch, self._b, self._keys = batch, b, keys

    def __call__(self) -> Tensor:
        if self._keys is None:
            self._keys = record_keys(self._batch, None, self._b)
            self._batch = None  # the keys are all that is kept
        return self._keys


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.zeros(shape, dtype=dtype)``; from :data:`LAZY_ZEROS_MIN_BYTES` on, on an anonymous
    memory map, whose pages the kernel zeroes at their first touch: ``torch.zeros`` writes every
    page at once, and most of the large sums' pages are written late or never (a ReLU
    layer's dead rows of ``g_sum``, ``h2_sum`` outside Hutchinson and ``ggn_mc``, all but the live
    block of a 4,096-wide ``G``: ~270 of the 1e7 MLP's ~380 MB of state). Not numpy's ``calloc``:
    numpy advises huge pages for large buffers, each first touch then zeroes 2 MB (the 1e7 pass
    spent seconds in the kernel). An ordinary CPU tensor on the map (not resizable in place)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    import mmap

    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


# state tensors of at least this many bytes are zeroed lazily (_zeros)
LAZY_ZEROS_MIN_BYTES = 1 << 22


def _quantile(v: Tensor, q: float) -> float:
    """``torch.quantile(v, q)`` (linear interpolation between the order statistics at
    ``floor`` / ``ceil`` of ``q (n - 1)``; NaN if ``v`` holds one) of a non-empty 1-D ``v`` by one
    ``kthvalue`` selection and the least value above it instead of a sort: the same two order
    statistics and the same ``lerp``, so the same float (the sort was ~0.6 s of the 1e7
    MLP's estimation), and no size limit (torch's quantile takes at most 2^24 elements; the
    median formerly stood in above it)."""
    if bool(torch.isnan(v).any()):
        return float("nan")
    n = v.numel()
    rank = torch.tensor(q, dtype=v.dtype) * (n - 1)  # in v's dtype, as torch.quantile's ranks
    lo_k = int(rank.floor())
    hi_k = int(rank.ceil())
    lo = v.kthvalue(lo_k + 1).values
    hi = lo
    if hi_k > lo_k and int((v <= lo).sum()) < hi_k + 1:  # the next order statistic: the least above
        hi = v[v > lo].min()
    return float(torch.lerp(lo, hi, rank - lo_k))


def _order_statistics_in_place(v: Tensor) -> tuple[float, float]:
    """``(median, 90th percentile)`` of a 1-D CPU tensor, reordering it in place (no copy: a sort
    or ``Tensor.quantile`` holds 12 bytes per element more, ``Tensor.median`` 4): the median is
    the lower of the two middle values (as ``Tensor.median``), the percentile the linear
    interpolation between the order statistics around ``0.9 (N - 1)`` (as ``Tensor.quantile``),
    taken in float64."""
    a = v.numpy()
    N = a.shape[0]
    pos = 0.9 * (N - 1)
    lo, hi, mid = math.floor(pos), math.ceil(pos), (N - 1) // 2
    a.partition(sorted({mid, lo, hi}))
    frac = pos - lo
    below, above = float(a[lo]), float(a[hi])
    return float(a[mid]), below + (above - below) * frac


def _mc_error(h_sum: Tensor, h2_sum: Tensor, samples: int) -> dict[str, Any]:
    """The sampled-label Gauss-Newton diagonal's Monte Carlo error: per weight the relative
    standard error bound ``sqrt(h2_sum) / h_sum`` (``h2_sum`` bounds the variance of the summed
    estimate from above: per record ``E[X^2] / S >= Var(X) / S``), its median and 90th
    percentile over the weights with positive curvature."""
    pos = h_sum > 0
    rel = h2_sum[pos].clamp_min(0.0).sqrt() / h_sum[pos]
    med = float(rel.median()) if rel.numel() else 0.0
    p90 = _quantile(rel, 0.9) if rel.numel() else med
    return {"ggn_mc_samples": samples, "ggn_mc_median_relative_error": med, "ggn_mc_p90_relative_error": p90}


def note_unknown_records(est: Estimate, acc: MomentAccumulator, source: str) -> None:
    """Mark ``est`` as estimated from training data that could not say how many records it holds
    before the pass (``source`` names it, e.g. a loader whose items are whole batches,
    :func:`~mis_lightning.estimation.batching.items_are_batches`: its length counts batches):
    :func:`estimator_warnings` then states the count ``"auto"`` assumed (:data:`N_ASSUMED`)."""
    mode, hessian = acc._request[:2]
    est.diagnostics["records_unknown"] = {"source": source, "auto": "auto" in (mode, hessian), "n": est.n,
                                          "estimator": acc.estimator}


# the measured figures the scale-symmetry warning quotes (ln40; docs/benchmarks.md, "ln40")
SCALE_SYMMETRY_FIGURES = (
    "on Conv1d(4, 8, 3) -> GroupNorm / LayerNorm -> Linear models fitted to their minimum (n = 3,000-4,000) its "
    "quantized figures (rtn_int8, rtn_int4) read 0.78-0.85x the exact estimator's after a GroupNorm, 0.87-1.11x "
    "after a LayerNorm, and 3.8-3.9x on a 4-class head whose Linear sees fewer independent features than it has "
    "inputs (1,077 of its 1,548 directions flat, which the exact estimator projects out); the per-weight sigma "
    "is what is off: scored with the exact estimator's sigma, the diagonal estimate read 0.95-1.09x; on "
    "Conv1d -> affine InstanceNorm1d -> tanh -> Linear (n = 300) the default form read 0.80-1.07x and "
    "covariance=\"independent\" 1.5-2.5x, the convolution's K-FAC psi influences carrying ~21x the gradients' "
    "mean square there; on "
    "Linear -> LayerNorm -> ReLU -> Linear MLPs (n = 400-1,000) 0.62-0.97x (rtn_int8) and 0.39-0.83x (rtn_int4)")


# what the diagonal sandwich's sigma read against the exact estimator's on layers that lost their
# K-FAC correction (estimator_warnings' "kfac_lost"; docs/benchmarks.md "cv40", "nu49")
# (the tanh MLPs' figures are of the path before tw51, which refused a Linear called twice: the same
# uncorrected sandwich; their weights 54 and 769, nu48's table and scratch model; tw51 takes those
# layers and convolutions called twice, docs/benchmarks.md "tw51")
KFAC_LOST_FIGURES = ("0.01-0.5x the exact one on convolutions; on tanh MLPs calling one Linear twice (54 and "
                     "769 weights) with the correction off, their rtn_int4 figures read 0.75x the exact estimator's")


def scale_symmetry_warning(diagnostics: Mapping[str, Any]) -> str | None:
    """The report line for the diagonal estimator's scale symmetries (``normalised_layers``,
    ``weight_normed_layers``: :meth:`MomentAccumulator._symmetry_diagnostics`; method.md section
    6), or ``None`` without any: such a layer's weights can be scaled together without changing the
    model, a flat direction the exact estimator projects out (:func:`flat_directions`) and a
    per-weight sigma cannot represent. The table marks the rows ``?`` (report.scale_symmetric)."""
    norm = diagnostics.get("normalised_layers") or {}
    wn = list(diagnostics.get("weight_normed_layers") or [])
    if not norm and not wn:
        return None
    kinds = diagnostics.get("weight_normed_kinds") or {}
    named = [f"{k or 'the model'} (into {v})" for k, v in norm.items()] + [
        f"{k} ({kinds.get(k, 'weight_norm')})" for k in wn]
    return (
        f"uncertain figures (? in the table): the diagonal estimator read layers whose weights the model lets "
        f"scale together without changing its output: {', '.join(named[:6])}{' ...' if len(named) > 6 else ''}. "
        "Along that direction the data loss is flat and the layer's weights strongly correlated, which its per-weight "
        "sigma (the sd given the other weights, times a Kronecker model's variance inflation) does not "
        f"represent, so the leakage can be off in either direction ({SCALE_SYMMETRY_FIGURES}); "
        "estimation='exact' (up to a few thousand weights) projects the symmetry out; or leave those layers out of "
        "params")


def estimator_warnings(diagnostics: Mapping[str, Any]) -> list[str]:
    """Report lines about the estimator's own accuracy: another estimator than the one chosen
    without knowing ``n`` for the ``n`` seen (``"estimator_with_n"``, :meth:`MomentAccumulator.finalize`),
    the count ``"auto"`` assumed for training data that did not say it (``"records_unknown"``,
    :func:`note_unknown_records`), and the sampled-label Gauss-Newton diagonal's Monte Carlo error
    when its median relative standard error exceeds :data:`GGN_MC_WARN_RELATIVE_ERROR` (sigma_j
    carries the same relative error), the convolutions' K-FAC correction lost to a per-layer
    program that refused the model (``"kfac_lost"``, :meth:`MomentAccumulator._kfac_lost`), and
    K-FAC factors summed over records chosen by their place in the stream
    (``"kfac_order_dependent"``, :meth:`MomentAccumulator._kfac_order_note`), and Hutchinson's
    Hessian diagonal when its median relative standard error exceeds the same bound."""
    out = []
    late = diagnostics.get("output_leaves_read_late")
    if late:  # MomentAccumulator.finalize (output_reads.read_later)
        out.append(
            f"the loss did not read the model's output {', '.join(late)} on the first batch, so it was left out of the "
            "outputs the estimation differentiates; a later batch's losses read it (e.g. a head whose labels the "
            "first batch lacked), and it was put back from that batch on: every record's factors hold the outputs "
            "its own loss reads (none is read with zeros in its place); records after that batch whose loss does "
            "not read it count its rows too, which can only raise their leverage (the safe side)")
    void = diagnostics.get("records_without_loss")
    if void:  # MomentAccumulator._update / LossProgram.void_rows (sm45)
        members = void["read"] - void["count"]
        out.append(
            f"{void['count']:,} of the {void['read']:,} training records read have every target missing (NaN, an ignore index, a zero "
            "weight) and a loss of 0 that does not depend on the weights: training did not see them, so they are not members in "
            f"the sense of the loss and are not counted: n = {members:,} (the weight decay scaled by "
            f"{void['read']:,} / {members:,}: the same objective); counted, their zero leakage would have lowered "
            "the average")
    other = diagnostics.get("estimator_with_n")
    unknown = diagnostics.get("records_unknown")
    if unknown is not None and unknown["auto"]:
        head = (f"{unknown['source']}, so the number of training records is not known before the estimation pass; "
                f"estimation='auto' chose its estimator ({unknown['estimator']}) assuming {N_ASSUMED:,} records")
        if other is None:
            out.append(f"{head}; the n = {unknown['n']:,} records read give the same choice")
        else:
            out.append(f"{head}; the n = {other['n']:,} records read would choose the {other['estimator']} "
                       f"({other['reason']}): pass estimation= and hessian= to choose it yourself")
    elif other is not None:
        out.append(
            f"estimation='auto' chose its estimator without knowing the number of training records (a stream of "
            f"unknown size: MISIndicator without num_training_records, or an iterable training dataset; it assumes "
            f"{N_ASSUMED:,}); with the n = {other['n']:,} records "
            f"seen it chooses the {other['estimator']} ({other['reason']}), which assess and MISCallback give "
            f"the same data: the figures differ between the two; pass num_training_records={other['n']} (or "
            "estimation='exact' / 'diagonal') to get assess's")
    sym = scale_symmetry_warning(diagnostics)
    if sym:
        out.append(sym)
    lost = diagnostics.get("kfac_lost")
    if lost:
        layers = diagnostics.get("kfac_uncorrected_layers") or []
        out.append(
            f"the K-FAC correction of the layers' sigma is off ({', '.join(repr(m) for m in layers)}; rows marked *): "
            f"the per-layer estimation refused the model at its first batch ({lost}); their sigma is the "
            f"diagonal sandwich's, which read {KFAC_LOST_FIGURES}, so their leakage may read low; "
            "estimation='exact' (up to a few thousand weights) computes the marginal sd")
    order = diagnostics.get("kfac_order_dependent")
    if order:
        out.append(
            f"the K-FAC correction of sigma sums a sample of the records ({', '.join(repr(m) for m in order['layers'])}) "
            f"chosen by their place in the stream, not by their content: {order['cause']}; the corrected sigma, so "
            "the leakage, depends on the records' order and their split over processes (by the sample's noise, "
            "a few percent); pass the number of training records (num_training_records) for a figure that does not")
    remedy = diagonal_low_read_remedy(diagnostics)
    if remedy:
        out.append(remedy)
    med = diagnostics.get("ggn_mc_median_relative_error")
    if med is not None and med > GGN_MC_WARN_RELATIVE_ERROR:
        # its first sentence, the console's line, says what the error is and the fix (ux56a: it named the estimator only)
        out.append(
            f"the Hessian diagonal is a Monte Carlo estimate (median relative standard error {med:.2g}, carried by "
            f"sigma): raise ggn_mc_samples or use hessian='ggn'. It samples {diagnostics['ggn_mc_samples']} "
            f"label(s) per record (hessian='ggn_mc'): median relative standard error {med:.2g} (90th percentile "
            f"{diagnostics['ggn_mc_p90_relative_error']:.2g}; a bound), which sigma and the leakage's cell sizes carry; "
            "hessian='ggn' is exact")
    med = diagnostics.get("hutchinson_median_relative_error")
    if med is not None and med > GGN_MC_WARN_RELATIVE_ERROR:
        # the other Monte Carlo Hessian diagonal (nu44a: 1.39 on a 1,467-weight Transformer
        # through a mis_per_sample_loss hook, its figures 9-15% off the Gauss-Newton ones, unwarned)
        out.append(
            f"the Hessian diagonal is a Monte Carlo estimate (hessian='hutchinson', "
            f"{diagnostics['hutchinson_probes']} Rademacher probes in all): median relative standard error "
            f"{med:.2g} of H_jj, which sigma and the leakage's cell sizes carry (a weight whose H_jj reads "
            "near 0 gets a sigma far too large); raise hutchinson_probes, or use hessian='ggn' (exact, needs "
            "loss_fn(outputs, targets) instead of a mis_per_sample_loss hook) or hessian='exact' on small models")
    return out


def diagonal_low_read_remedy(diagnostics: Mapping[str, Any]) -> str | None:
    """What to do where the diagonal estimator flagged its figures as possibly below the exact
    estimator's (``diagnostics["diagonal_low_read"]`` with its ``d`` and ``n``: :data:`DIAGONAL_LOW_READ_REMEDY`),
    as a report line; ``None`` where not flagged or the sizes are not there (a report saved before).

    Both lines first say what real attacks read on the flagged classifiers where this was measured
    (:data:`DIAGONAL_LOW_READ_ATTACK_FIGURES`, below this estimator's figures, so a higher exact figure is
    the more conservative one, not shown to be nearer the truth). The exact sandwich (method.md section 4)
    holds ``d x d`` float64 matrices (``8 d^2`` bytes each); its sums cost ``n d^2`` (:func:`choose_estimator`'s
    own measure), its Hessian's ``d`` forward-over-reverse passes and its ``d x d`` decompositions (``d^3``
    each) as much again or more (:data:`EXACT_MEASURED_COST`): where ``n d^2`` is within
    :data:`EXACT_MAX_COST`, the line names the exact one as the run for the more conservative figure
    (``"auto"`` stops at :data:`EXACT_MAX_PARAMS` weights); beyond it, the line says it is out of reach and that
    more records per weight or a stronger weight decay lower the leverage that set the flag."""
    low = diagnostics.get("diagonal_low_read")
    if not low or "d" not in low or "n" not in low:
        return None
    d, n = int(low["d"]), int(low["n"])
    cost, mib = float(n) * d * d, 8.0 * d * d / 2**20
    size = f"{mib:,.0f} MiB" if mib < 2**10 else f"{mib / 2**10:,.0f} GiB"
    head = (f"the diagonal estimator's figures may read below the exact estimator's (rows marked *; mean leverage "
            f"{float(low['leverage_per_direction']):.2g} per loss direction, above {float(low['threshold']):g}): "
            f"measured under estimation='auto' {DIAGONAL_LOW_READ_AUTO_FIGURES}. ")
    if cost <= EXACT_MAX_COST:
        return head + (
            f"Against real attacks, {DIAGONAL_LOW_READ_ATTACK_FIGURES}. For the more conservative figure run "
            f"estimation='exact': for d = {d:,} weights and n = {n:,} records its sums cost about n d^2 = {cost:.2g} "
            f"and its Hessian and d x d decompositions as much again or more (d^3 = {float(d) ** 3:.2g} each; "
            f"{EXACT_MEASURED_COST}; estimation='auto' takes the exact estimator up to n d^2 = "
            f"{EXACT_MAX_COST:.0g} and d = {EXACT_MAX_PARAMS:,} weights), and it holds d x d float64 matrices of "
            f"{size} each; convolutions or a layer called several times add d passes of their forward "
            "(hessian='ggn_residual' avoids most of them on piecewise-linear convolutional networks)")
    return head + (
        f"Against real attacks, {DIAGONAL_LOW_READ_ATTACK_FIGURES}. "
        f"The exact estimator is out of reach at this size (d = {d:,} weights, n = {n:,} records: n d^2 = {cost:.2g} "
        f"> {EXACT_MAX_COST:.0g}, d x d float64 matrices of {size} each): these figures may read below the exact "
        "estimator's by the factors above; the flag's cause, a mean leverage that is not small, falls with more "
        "training records per weight or a stronger weight decay")


def _dense(v: Any, rows: int) -> Tensor:
    """A per-sample gradient ``[rows, numel]`` (sparse embedding gradients made dense)."""
    return v.dense(rows) if isinstance(v, _Sparse) else v.reshape(rows, -1)


def name_coordinates(flat_index: Tensor, offsets: dict[str, tuple[int, int]], most: int = 4) -> str:
    """The parameters holding the flat coordinates ``flat_index`` (the estimate's ``offsets``), each
    with its first entries: ``"'0.weight' (entries 3, 5), '2.bias' (entry 0)"``."""
    idx = flat_index.tolist()
    parts = []
    for name, (a, b) in offsets.items():
        inside = [i - a for i in idx if a <= i < b]
        if inside:
            more = " ..." if len(inside) > most else ""
            parts.append(f"'{name}' (entr{'y' if len(inside) == 1 else 'ies'} "
                         f"{', '.join(map(str, inside[:most]))}{more} of {b - a})")
    return ", ".join(parts[:most]) + (f" and {len(parts) - most} more parameter(s)" if len(parts) > most else "")


def _split(flat: Tensor, names: list[str], offsets: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    return {k: flat[slice(*offsets[k])] for k in names}


def check_decay_names(decay: Mapping[str, float], model: nn.Module) -> None:
    """A per-parameter ``weight_decay`` mapping names parameters of ``model`` only (by a name of
    ``named_parameters`` or an alias: :func:`~mis_lightning._fields.parameter_aliases`).

    Raises:
        KeyError: names the unknown entries and the model's parameters.
    """
    named = [n for n, _ in model.named_parameters()]
    unknown = sorted(set(decay) - set(named) - set(parameter_aliases(model)))
    if unknown:
        # the closest names: e.g. a submodule compiled in configure_model names its parameters
        # with an '_orig_mod.' segment ('backbone._orig_mod.0.weight'), as its state_dict does
        hints = [f"{n!r}: did you mean {' or '.join(repr(c) for c in close)}?"
                 for n in unknown if (close := close_param_names(n, named))]
        raise KeyError(f"weight_decay names parameters the model does not have: {unknown}"
                       + (f" ({'; '.join(hints)})" if hints else "") + f"; its parameters: "
                       f"{named[:12]}{' ...' if len(named) > 12 else ''}")


def _decay_diagnostics(decay: Mapping[str, float]) -> dict[str, Any]:
    """``{"weight_decay": the coefficient}``, plus ``"weight_decay_per_parameter"`` when it
    differs between parameters (then ``"weight_decay"`` is the largest)."""
    vals = set(decay.values())
    out: dict[str, Any] = {"weight_decay": max(vals, default=0.0)}
    if len(vals) > 1:
        out["weight_decay_per_parameter"] = dict(decay)
    return out


def _stationarity(g_mean: Tensor, v: Tensor, theta: dict[str, Tensor], names: list[str],
                  offsets: dict[str, tuple[int, int]], decay: Mapping[str, float], grad_norm_sq: float,
                  n: int) -> dict[str, Any]:
    """Stationarity diagnostics: the penalised mean gradient relative to the size of a
    per-sample gradient (method.md section 6); ``decay``: the L2 coefficient per parameter."""
    total_grad = torch.cat([g_mean[slice(*offsets[k])] + decay[k] * theta[k] for k in names])
    rms_g = math.sqrt(grad_norm_sq / n)
    ratio = float(total_grad.norm()) / max(rms_g, 1e-300)
    z_sum, z_count = _offset_terms(total_grad, v, float(v.max()) if v.numel() else 0.0)
    flat_theta = torch.cat([theta[k] for k in names]).to(total_grad)
    return {"gradient_norm": float(total_grad.norm()), "gradient_norm_ratio": ratio,
            **_not_at_minimum(ratio, z_sum, z_count, n), "minimum_offset_covariance": "diagonal",
            "zero_gradient_variance": int((v <= 0).sum()),
            **_decay_diagnostics(decay),
            **_decay_hint(float(total_grad @ flat_theta), float(total_grad.square().sum()),
                          float(flat_theta.square().sum()), rms_g, decay)}


def _offset_terms(total_grad: Tensor, v: Tensor, v_max: float) -> tuple[float, int]:
    """``sum_j g_j^2 / V_jj`` and its count over the weights with gradient variance above
    the rounding of the largest (the offset statistic of :func:`_not_at_minimum`)."""
    keep = v > V_RELATIVE_FLOOR * v_max
    return float((total_grad[keep].square() / v[keep]).sum()), int(keep.sum())


def _penalised_gradient(g_mean: Tensor, theta: dict[str, Tensor], names: list[str], decay: Any) -> Tensor:
    """``[d]`` the mean gradient of the assessed objective, ``g + decay * theta`` (float64 as ``g_mean``)."""
    return g_mean + torch.as_tensor(decay, dtype=g_mean.dtype) * torch.cat([theta[k] for k in names]).to(g_mean)


def flat_directions(gg_mean: Tensor, H: Tensor, G: Tensor | None = None, decay: float | Tensor = 0.0,
                    precision: float = 0.0, known: Tensor | None = None) -> Tensor:
    """``[d, k]`` orthonormal basis of the objective's exact flat directions at theta-hat
    (method.md section 6, "When the approximation holds"): the directions ``u`` along which
    every record's gradient is 0 to float64 rounding (``G u = 0``) and the objective, penalty
    included, has no curvature (``u' H u = 0`` to H's precision): where the penalty does not act
    (``decay`` 0 on them) the data loss has none; where it acts, the data loss cancels its
    curvature (``u' H_data u = -u' diag(decay) u``, the penalty's at least 100x the curvature cut).
    A symmetry of the model makes them: a constant input column beside a bias, duplicated
    columns, the scale of a weight under ``weight_norm``, softmax's shift, a rescaling between
    ReLU layers, and, under weight decay too, a rotation of a hidden space that leaves
    ``|theta|^2`` unchanged (two Linear layers with nothing between them, an attention head's
    ``W_q, W_k -> R W_q, R W_k``; weight decay ruled it out before, and sigma read rounding
    over rounding along it). The loss is constant along them: they carry no information and no
    membership signal. An L2 penalty that the symmetry moves (a rescaling, a shift) breaks it
    (curvature ``wd``): such directions are kept, as are near-flat ones (near-collinear features,
    saturated units: gradients small, not rounding).

    Args:
        gg_mean: ``[d, d]`` mean of ``g g'`` over the n records (data-loss gradients, float64).
        H: ``[d, d]`` mean Hessian of the objective, weight decay included.
        G: ``[R, d]`` the kept records' gradients: the candidates ``E[(g'u)^2] = 0`` (read from
            ``gg_mean`` to rounding of its square, ``100 d eps``) are kept where ``|G u|`` is
            rounding itself (``100 d eps`` of ``|G|``, relative, not squared); ``None``: not checked.
        decay: the L2 coefficient, a float or ``[d]`` per weight.
        precision: H's relative precision as the curvature at the minimum (0: float64 rounding).
            Off an exact stationary point (the weights' float rounding, the optimizer's residue)
            H holds terms linear in the mean gradient: ``-grad L . phi''`` along a curved
            symmetry; torch's ``weight_norm`` double backward adds a wrong one (asymmetric, 0
            where ``dL/dW = 0``; torch 2.13). :meth:`MomentAccumulator.finalize` passes the larger
            of the stored weights' eps and the gradient norm ratio (capped at
            :data:`FLAT_CURVATURE_MAX`).
        known: ``[d, k]`` tangents of symmetries known from the model's structure (parameter
            units; an attention head's, :func:`~.symmetries.attention_head_tangents`): every
            record's loss and the penalty are unchanged along their group, so the penalty test
            below is not needed; each is still checked (every record's gradient rounding along it,
            as above) and kept where the objective's curvature along it is below the same cut and,
            under a penalty, below 1% of the penalty's own (the data loss cancels it; a head
            whose weights the penalty holds near 0 has an orbit of rounding size, not flat). The
            rule above misses them where the penalty's curvature is close to the cut (a float32
            fit of an ``nn.MultiheadAttention``: 0 found, sigma up to 2.6x the reference).

    All are read in units where each weight's gradient has unit second moment (``D = diag(
    E[g_j^2])^-1/2``; a weight whose gradients are rounding of the largest's gets the largest's
    scale), so no weight's units decide; curvatures relative to ``D H D``'s largest eigenvalue.
    """
    d = H.shape[0]
    empty = H.new_zeros(d, 0)
    gd = gg_mean.diagonal().clamp_min(0.0)
    top = float(gd.max()) if d else 0.0
    if top <= 0.0:
        return empty  # no gradient at all: the interpolation flags speak (_interpolation)
    tol = 100 * d * torch.finfo(torch.float64).eps
    s = torch.where(gd > tol * top, gd, torch.full_like(gd, top)).rsqrt()
    ss = torch.outer(s, s)
    ggs = gg_mean * ss
    # eigh resolves a null subspace only to eps |gg| / gap: the candidates take in every
    # eigenvalue whose mixing (eps e_top / e_j, weight e_j) could lift |G u| above the cutoff
    e = torch.linalg.eigvalsh(ggs)  # ~3x cheaper than the vectors, which most models never need
    e_top = float(e[-1])
    has_known = known is not None and known.shape[1] > 0
    candidates = bool((e <= e_top / (100 * d) ** 2).any())
    if not candidates and not has_known:
        return empty
    dec = torch.as_tensor(decay, dtype=H.dtype).expand(d)
    h_top = float(torch.linalg.eigvalsh(H * ss).abs().max())
    curv = max(tol, min(precision, FLAT_CURVATURE_MAX))
    Hs = 0.5 * (H + H.T) * ss
    pen = torch.diag(dec * s * s)
    # the known symmetries' tangents along which every record's gradient is rounding: their own
    # rule decides which are flat, the derivatives' rule the rest (its directions orthogonal to
    # them: a numerical eigenvector mixes a near-flat direction into a rotation otherwise)
    Kg = _known_span(known / s.unsqueeze(-1), ggs, e_top, G, s, tol, h_top) if has_known else empty
    U = _unresolved_flat(ggs, e_top, Hs, pen, G, s, tol, curv, h_top, exclude=Kg) if candidates else empty
    if Kg.shape[1]:
        U = torch.cat([U, _known_flat(Kg, Hs, pen, tol, curv, h_top)], 1)
    if not U.shape[1]:
        return empty
    # back to parameter units (the subspace D U), orthonormal there
    return torch.linalg.qr(s.unsqueeze(-1) * U).Q


# Share of the flat subspace below which a parameter tensor is not named as carrying it (its
# projector's trace there, out of k): rounding of the basis reads ~1e-16, a carrier >= 1/d
FLAT_SHARE_MIN = 1e-3


def flat_parameter_shares(flat: Tensor, names: Sequence[str], offsets: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """How much of the flat subspace each parameter tensor carries: ``{name: trace share}``, the
    trace of the projector ``F F'`` on the tensor's coordinates (``sum of F[a:b]**2``; basis-free,
    in the parameter units ``flat`` is given in), the shares summing to ``k = flat.shape[1]``;
    tensors under :data:`FLAT_SHARE_MIN` (of k) left out, the largest first, rounded to 3 digits.
    ``flat``: ``[d, k]`` orthonormal (:func:`flat_directions`); ``offsets``: each name's ``(a, b)``
    slice of the flat coordinates. E.g. a 2-logit ``Linear(4, 2)`` head: its softmax shift (the
    same vector added to both rows) is 5 directions, ``{"fc.weight": 4.0, "fc.bias": 1.0}``."""
    k = int(flat.shape[1])
    mass = flat.square()
    out = {nm: float(mass[a:b].sum()) for nm in names for a, b in [offsets[nm]]}
    return {nm: round(v, 3) for nm, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > FLAT_SHARE_MIN * k}


def _gradient_null(U: Tensor, ggs: Tensor, e_top: float, G: Tensor | None, s: Tensor, tol: float,
                   h_top: float) -> Tensor:
    """The part of the scaled subspace ``U`` (orthonormal) along which the kept records'
    gradients ``G`` are rounding (relative ``tol`` of ``|G D|``) and so is every record's
    (``ggs``, the scaled ``E[g g']``): :func:`flat_directions`' first two tests."""
    if U.shape[1] and G is not None and G.shape[0]:
        # the null subspace from the kept records' gradients themselves: |G u| is rounding
        # (relative eps, where E[(g'u)^2] resolves only its square)
        Gs = G.to(U) * s
        _, sv, Vh = torch.linalg.svd(Gs @ U, full_matrices=True)
        sv = torch.cat([sv, sv.new_zeros(U.shape[1] - sv.numel())])
        U = U @ Vh.T[:, sv <= tol * float(torch.linalg.matrix_norm(Gs, 2))]
    if U.shape[1]:  # every record (not only the kept ones) flat
        c, W = torch.linalg.eigh(U.T @ (ggs / e_top * h_top) @ U)
        U = U @ W[:, c.abs() <= tol * h_top]
    return U


def _unresolved_flat(ggs: Tensor, e_top: float, Hs: Tensor, pen: Tensor, G: Tensor | None, s: Tensor,
                     tol: float, curv: float, h_top: float, exclude: Tensor | None = None) -> Tensor:
    """:func:`flat_directions`' rule from the derivatives alone: scaled ``[d, k]`` orthonormal,
    orthogonal to ``exclude`` (scaled, orthonormal: the known symmetries' span, decided by
    :func:`_known_flat`)."""
    d = Hs.shape[0]
    empty = Hs.new_zeros(d, 0)
    e, Q = torch.linalg.eigh(ggs)
    U = Q[:, e <= e_top / (100 * d) ** 2]
    if exclude is not None and exclude.shape[1] and U.shape[1]:
        # the candidates hold the known span (no record's gradient along it): what is left of them
        Ur, sv, _ = torch.linalg.svd(U - exclude @ (exclude.T @ U), full_matrices=False)
        U = Ur[:, sv > 0.5]
    U = _gradient_null(U, ggs, e_top, G, s, tol, h_top)
    if not U.shape[1]:
        return empty  # the common case: one eigh of E[gg'] is the whole cost
    # the objective (penalty included) without curvature
    c, W = torch.linalg.eigh(U.T @ Hs @ U)
    U = U @ W[:, c.abs() <= curv * h_top]
    if not U.shape[1]:
        return empty
    # and either no penalty on them, or one whose curvature the data loss cancels (a rotation that
    # keeps |theta|^2: the penalty's curvature well above the cut, the total's below it); a penalty
    # about as small as the cut is not resolved from the data loss having none: kept as before
    c, W = torch.linalg.eigh(U.T @ pen @ U)
    return U @ W[:, (c.abs() <= tol * h_top) | (c >= 100 * curv * h_top)]


def _known_span(Ks: Tensor, ggs: Tensor, e_top: float, G: Tensor | None, s: Tensor, tol: float,
                h_top: float) -> Tensor:
    """The span of :func:`flat_directions`' ``known`` tangents (scaled: ``D^-1 T``) along which
    every record's gradient is rounding (:func:`_gradient_null`): scaled ``[d, k]`` orthonormal."""
    Q, sv, _ = torch.linalg.svd(Ks, full_matrices=False)
    top = float(sv.max()) if sv.numel() else 0.0
    return _gradient_null(Q[:, sv > 1e-12 * top] if top > 0 else Q[:, :0], ggs, e_top, G, s, tol, h_top)


def _known_flat(U: Tensor, Hs: Tensor, pen: Tensor, tol: float, curv: float, h_top: float) -> Tensor:
    """The flat part of the known symmetries' span ``U`` (:func:`_known_span`): scaled ``[d, k]``
    orthonormal. Their group keeps the loss and the penalty, so the objective's curvature along
    them is ``-grad . phi''`` (0 at the minimum); flat where it is below the cut and, under a
    penalty, below 1% of the penalty's curvature (cancelled by the data loss, as
    :func:`_unresolved_flat`'s 100x)."""
    c, W = torch.linalg.eigh(U.T @ Hs @ U)
    p = torch.einsum("ij,ik,kj->j", W, U.T @ pen @ U, W)
    keep = (c.abs() <= curv * h_top) & ((p <= tol * h_top) | (100 * c.abs() <= p))
    return U @ W[:, keep]


# The largest relative curvature (of the largest eigenvalue, in gradient units) that a direction
# no record's gradient moves along may have and still be read as flat (flat_directions): H's
# precision off the minimum, capped. Measured (sy27): a ReLU MLP's rescaling at gradient norm
# ratio 1.5e-5 reads 2e-8, weight_norm's scale 3e-9 at 4e-8; a real curvature along such a
# direction (the one separating two identical hidden units at a saddle) is of the residuals' order.
FLAT_CURVATURE_MAX = 1e-5

# The curvature's resolution (relative to the largest eigenvalue / diagonal entry): a negative
# reading of H within its precision ``p`` (the stored weights' eps or the gradient norm ratio, as
# flat_directions takes it) has an unknown sign: off the stationary point H holds terms linear in the
# mean gradient (method.md section 6), measured (ln42): Linear -> LayerNorm -> ReLU MLPs read
# -0.9e-5 .. -3.4e-5 at gradient norm ratios 1.4e-3 .. 4.3e-3 (0.004-0.012 of the ratio), -2e-9 at
# 2.4e-5; Conv1d -> LayerNorm([8, 6]) -> Linear (n 4,000) -7.2e-8 at 5.9e-7 (0.12); weight_norm's
# wrong double backward 3e-9 at 4e-8 (0.075). "Negative curvature" reads only below ``-p`` (a
# saddle resolved); a reading in ``(-p, 0)`` is reported as "saddle not excluded"
# (``curvature_unresolved``) where ``p`` exceeds this resolution, so that every negative reading
# below ``-min(p, this)`` is said (ln43: capping ``p`` here instead, ln42, called LayerNorm
# gradient-level readings of up to 0.12 p "negative curvature" at p > 8e-4, and said nothing of a
# real one in (-1e-4, 0) at any p > 1e-4). Below it (a converged fit) a reading in (-p, 0) is
# curvature under 1e-4 of the largest, flat at the analysis's resolution (the figures use
# ``|lambda|`` floored at 1e-8 either way).
NEGATIVE_CURVATURE_PRECISION_MAX = 1e-4


def curvature_sign(lowest: float, top: float, rounding: float, precision: float) -> dict[str, Any]:
    """The Hessian's sign flags (method.md section 4, "Negative curvature") from its lowest
    reading ``lowest`` (eigenvalue, or diagonal entry beyond its sampling error; ``inf``: none)
    relative to ``|top|`` (the largest eigenvalue / entry magnitude), at relative rounding
    ``rounding`` and precision ``precision`` (``p``: the stored weights' eps or the gradient norm
    ratio; 0: rounding alone).

    Returns:
        ``negative_curvature``: below ``-max(rounding, p) |top|`` (a saddle or maximum beyond H's
        precision); ``curvature_unresolved``: not that, but below ``-rounding |top|`` while ``p``
        exceeds :data:`NEGATIVE_CURVATURE_PRECISION_MAX` (the gradient is too large to tell a
        minimum from a saddle: "saddle not excluded"); ``negative_curvature_tolerance``:
        ``max(rounding, p)``.
    """
    scale = max(abs(top), 1e-300)
    tol = max(rounding, precision)
    negative = lowest < -tol * scale
    unresolved = not negative and precision > NEGATIVE_CURVATURE_PRECISION_MAX and lowest < -rounding * scale
    return {"negative_curvature": bool(negative), "curvature_unresolved": bool(unresolved),
            "negative_curvature_tolerance": tol}


def _project_out(H: Tensor, flat: Tensor) -> Tensor:
    """``P H P`` with ``P = I - F F'`` (``flat`` = F ``[d, k]`` orthonormal): the Hessian of the
    identifiable part. Off an exact stationary point H couples a flat direction to the others by
    a gradient-level term (``H v = -grad L`` for a loss invariant to the scale of ``v``), which
    read as negative eigenvalues ("negative curvature (1 of 13)" on a converged weight_norm MLP,
    "(3 of 19)" on a ReLU one without weight decay); at the minimum it is 0 and ``P H P = H``."""
    HF = H @ flat
    FHF = flat.T @ HF
    return H - HF @ flat.T - flat @ HF.T + flat @ FHF @ flat.T


def _newton_offset(step: Tensor, sigma: Tensor, ratio: float, held: Tensor | None = None,
                   owners: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The exact estimator's stationarity flags: the Newton step in each weight's own sampling
    sd, ``(H^+ g)_j / sigma_j``, its root mean square over the weights with ``sigma_j > 0``
    (``minimum_offset_covariance = "full"``). The diagonal estimator's figure is the same with H
    and V diagonal (:func:`_not_at_minimum`). A Mahalanobis form ``n g' V^+ g`` read float32
    L-BFGS fits 1-8 sd off where training on moved them 0.06-0.4 (their rounding-level
    gradient divided by V eigenvalues 1e-12..1e-8 of the largest).

    ``held`` ``[d]``: the step's part along the directions the weight decay alone holds
    (:func:`_decay_held`); then also ``minimum_offset_sd_rest`` (the same root mean square of the
    step without that part), ``offset_held_parameters`` (``{name: share}`` of the held part's
    ``sum_j (held_j / sigma_j)^2`` per parameter of ``owners``, ``{name: (start, end)}``, largest
    first, shares of at least 1%) and ``offset_decay_held``: the step exceeds
    :data:`MINIMUM_OFFSET_SD` but not without that part, and the gradient norm ratio is under its
    limit (a converged LayerNorm model read 18.5 sd, 0.0752 without them)."""
    ok = sigma > 0
    z = step[ok].to(torch.float64) / sigma[ok].to(torch.float64)
    offset = float(z.square().mean().sqrt()) if z.numel() else 0.0
    out = {"minimum_offset_sd": offset, "not_at_minimum": ratio > GRADIENT_NORM_RATIO_MAX or offset > MINIMUM_OFFSET_SD,
           "minimum_offset_covariance": "full"}
    if held is not None and z.numel():
        zh = torch.where(ok, held.to(torch.float64) / sigma.to(torch.float64).clamp_min(1e-300), 0.0)
        rest = float((z - zh[ok]).square().mean().sqrt())
        out["minimum_offset_sd_rest"] = rest
        out["offset_decay_held"] = (offset > MINIMUM_OFFSET_SD and rest <= MINIMUM_OFFSET_SD
                                    and ratio <= GRADIENT_NORM_RATIO_MAX)
        total = float(zh.square().sum())
        if owners and total > 0:
            shares = {k: float(zh[a:b].square().sum()) / total for k, (a, b) in owners.items()}
            out["offset_held_parameters"] = {k: v for k, v in sorted(shares.items(), key=lambda kv: -kv[1])
                                             if v >= 0.01}
    return out


# _decay_held: an eigen-direction of the penalised Hessian whose curvature |lambda| is at most this
# multiple of the penalty's own along it (u' diag(decay) u): the data loss's curvature there lies in
# [-3, 1] x the penalty's, so the records barely curve it (a near-symmetry of the model, e.g. a
# LayerNorm making the embedding before it scale-invariant: nux53 #14 read -0.9 x the decay there)
DECAY_HELD_FACTOR = 2.0


def _decay_held(evals: Tensor, evecs: Tensor, decay: Tensor | None) -> Tensor | None:
    """``[d]`` bool: the eigen-directions ``u_k`` of the penalised Hessian (``evals [d]``,
    ``evecs [d, d]``) that the weight decay alone holds, ``|lambda_k| <= DECAY_HELD_FACTOR *
    u_k' diag(decay) u_k`` (``decay [d]``, the L2 coefficient per weight in the same units);
    ``None`` where there is none or no decay. Along them a fit converges at the decay's slow rate and
    the Newton-step test (:func:`_newton_offset`) divides the residual gradient by a sampling sd
    the records barely set: the step's size there says little about the fit elsewhere."""
    if decay is None or not bool((decay > 0).any()):
        return None
    pen = (evecs.square() * decay.to(evecs)[:, None]).sum(0)
    held = (pen > 0) & (evals.abs() <= DECAY_HELD_FACTOR * pen)
    return held if bool(held.any()) else None


def _stiff_offset(evals: Tensor, evecs: Tensor, V: Tensor, g: Tensor, n: int) -> float:
    """The mean gradient's t-statistics ``t_k = u_k' g / sqrt(u_k' V u_k / n)`` along the stiffer
    half of the Hessian's eigenvectors ``u_k`` (largest ``|eigenvalue|``; those without gradient
    variance left out), root mean square: the "records unlike the training set" test
    (:data:`UNSEEN_RECORDS_SD`, method.md section 6). Shapes: ``evals [d]``, ``evecs [d, d]``,
    ``V [d, d]`` the gradient covariance, ``g [d]`` the penalised mean gradient, all in one unit
    system (a t-statistic along a given direction is unit-free; the stiff half is H's in these
    units: the Jacobi-scaled H where the sandwich scales it).
    A first-order optimizer stopped short leaves its residue along the flat directions, the stiff
    ones converge first (``t_k ~ 0`` there); on records independent of theta-hat every ``t_k`` is
    a fresh sample's, ``~N(0, 1 + m / n_train)``."""
    # the stiffer half first: one [d/2, d] x [d, d] product (the sandwich's own are [d, d] x [d, d])
    U = evecs[:, evals.abs().argsort(descending=True)[:max(1, evals.numel() // 2)]]
    along = ((U.T @ V) * U.T).sum(-1)  # u' V u per direction
    live = along > 100 * evals.numel() * torch.finfo(torch.float64).eps * max(float(V.diagonal().abs().max()), 1e-300)
    if not bool(live.any()):
        return 0.0
    t = (U.T @ g)[live] * (n / along[live]).sqrt()
    return float(t.square().mean().sqrt())


def _not_at_minimum(ratio: float, z_sum: float, z_count: int, n: int) -> dict[str, Any]:
    """The stationarity flags (method.md section 6): the Newton step ``delta = H^{-1} g`` from
    theta-hat to the minimum of the assessed objective (``g``: the penalised mean gradient) in
    each weight's own sampling sd ``sqrt(Sigma_jj / n)``, root mean square over the weights
    (``minimum_offset_sd``). With H and V diagonal (the diagonal estimator; ``z_sum = sum_j
    g_j^2 / V_jj`` over ``z_count`` weights) ``delta_j / sd_j = g_j sqrt(n / V_jj)``, whatever H;
    the exact estimator replaces it (:func:`_newton_offset`). Flagged when it exceeds
    :data:`MINIMUM_OFFSET_SD` (the distance grows like ``ratio * sqrt(n)``, so a fixed
    ``gradient_norm_ratio`` threshold misses large n), or when the ratio exceeds 0.1."""
    offset = math.sqrt(n * z_sum / z_count) if z_count else 0.0
    return {"minimum_offset_sd": offset, "not_at_minimum": ratio > GRADIENT_NORM_RATIO_MAX or offset > MINIMUM_OFFSET_SD}


def _hint_block_sums(a: int, b: int, subs: Sequence[tuple[int, int]], terms: Tensor,
                     grad_at: Callable[[int, int], Tensor], theta_at: Callable[[int, int], Tensor]) -> tuple[float, float]:
    """``(<g, theta>, |theta|^2)`` over one finalize block ``[a, b)`` (:func:`_finalize_blocks`):
    each product written into the block buffer ``terms`` (float64) sub-block by sub-block and
    summed once, as the finalize's other block sums (the same floats whatever the sub-blocks).
    ``grad_at(s, e)`` / ``theta_at(s, e)``: the float64 gradient and weights of ``[s, e)``."""
    out = []
    for part in (0, 1):
        for s, e in subs:
            th = theta_at(s, e)
            torch.mul(grad_at(s, e) if part == 0 else th, th, out=terms[s - a: e - a])
        out.append(float(terms[: b - a].sum()))
    return out[0], out[1]


def _decay_hint(g_theta: float, g_sq: float, theta_sq: float, rms_g: float, decay: Mapping[str, float]) -> dict[str, Any]:
    """Whether the weights look like a minimum of the loss plus a weight decay other than the
    one assessed (method.md section 6's stationarity, read along theta). At a minimum of
    ``loss + wd/2 |theta|^2`` the data loss's mean gradient is ``-wd * theta``; so the assessed
    objective's mean gradient ``g`` (penalised by the decay given) reads ``-c * theta`` with
    ``c = -<g, theta> / <theta, theta>`` the decay missing (``c > 0``: too little decay passed, ``g``
    along ``-theta``) or in excess (``c < 0``: too much, ``g`` along ``+theta``; before, 10x and 100x
    the decay trained read only the generic not-at-a-minimum warning). Inputs are the sums
    ``<g, theta>``, ``|g|^2``, ``|theta|^2`` over the assessed weights (float), ``rms_g`` the
    per-sample gradients' root mean square (``gradient_norm_ratio``'s scale) and ``decay`` the
    coefficients given, per parameter.

    Returns ``{"decay_gradient_cosine": cos(g, theta), "decay_residual_ratio": |g + c theta| / rms_g,
    "weight_decay_implied": max(the decay given (largest) + c, 0), "weight_decay_mismatch": bool}``;
    ``{}`` when theta or g is 0. Flagged when ``|cos| >= DECAY_HINT_COSINE`` (``cos <= -`` it with
    ``c > 0``, ``cos >=`` it with ``c < 0``: the sign of ``c`` is the sign of ``-cos``) and
    ``|g| / rms_g >= DECAY_HINT_RATIO`` (docs/benchmarks.md, "wd48"); ``c < 0`` only where a decay was
    passed (without one no decay >= 0 fits a gradient along +theta). The decay implied is floored at
    0: a decay passed to a model trained without one reads ``c`` near ``-decay``, a hair either side."""
    if theta_sq <= 0 or g_sq <= 0 or not all(map(math.isfinite, (g_theta, g_sq, theta_sq))):
        return {}
    c = -g_theta / theta_sq
    cos = g_theta / math.sqrt(g_sq * theta_sq)
    residual = math.sqrt(max(g_sq - g_theta * g_theta / theta_sq, 0.0))
    scale = max(rms_g, 1e-300)
    given = max(decay.values(), default=0.0)
    return {"decay_gradient_cosine": cos, "decay_residual_ratio": residual / scale,
            "weight_decay_implied": max(given + c, 0.0),
            # too much decay (c < 0) only where one was passed (rv54c: without one, g along +theta
            # implies no decay >= 0 and the warning read "-theta, too little ... pass weight_decay=0")
            "weight_decay_mismatch": bool(abs(cos) >= DECAY_HINT_COSINE and (c > 0 or (c < 0 and given > 0))
                                          and math.sqrt(g_sq) / scale >= DECAY_HINT_RATIO)}


def _flatten_theta(theta: dict[str, Tensor], names: list[str]) -> Tensor:
    """``[d]`` float64 flat weights in the estimate's order."""
    return torch.cat([theta[k].reshape(-1).to(torch.float64) for k in names])


def _interpolation(grad_norm_sq: float, n: int, gradient_norm: float, curvature_scale: float,
                   eps: float) -> dict[str, Any]:
    """The interpolation flags: ``{}`` unless the per-sample gradients are rounding, their root
    mean square ``sqrt(grad_norm_sq / n)`` at most ``min(ROUNDING_GRADIENT_EPS * eps,
    ROUNDING_GRADIENT_MAX)`` times ``curvature_scale = |diag(H) theta|`` (the gradient a change of
    the weights by their own size would make: the scale of a per-sample gradient whose residual
    is of the order of the outputs). Then the model interpolates its training data (training loss
    ~0, e.g. d > n under MSE without weight decay): ``{"interpolating": True,
    "per_sample_gradient_ratio": rms / scale, "not_at_minimum": ...}``, where ``not_at_minimum``
    no longer reads ``gradient_norm_ratio`` (rounding over rounding: an exact least-squares
    interpolant read 0.19, flagged "not at a minimum") but whether the penalised mean gradient
    is above the same rounding level (weight decay: the interpolant is no minimum of the
    penalised objective). A least-squares fit with residuals 1e-9 of the outputs reads
    ~4e-9 against 2.2e-13 in float64 (not flagged); the interpolant 1.5e-14."""
    tol = min(ROUNDING_GRADIENT_EPS * eps, ROUNDING_GRADIENT_MAX) * curvature_scale
    rms = math.sqrt(max(grad_norm_sq, 0.0) / n)
    if not (curvature_scale > 0 and rms <= tol):
        return {}
    return {"interpolating": True, "per_sample_gradient_ratio": rms / curvature_scale,
            "not_at_minimum": gradient_norm > tol}


def sandwich_compute(gg_mean: Tensor, H: Tensor, g_mean: Tensor, G: Tensor, n: int, damping: float,
                     diagnostics: dict[str, Any], *, jacobians: Tensor | None = None,
                     loss_hessians: Tensor | None = None, correct_leverage: bool = False,
                     records: dict[str, Tensor] | None = None,
                     floor_variants: dict[float, dict[str, Tensor | None]] | None = None,
                     flat: Tensor | None = None, newton_gradient: Tensor | None = None,
                     precision: float = 0.0, decay: float | Tensor = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact sandwich (method.md section 4): ``Sigma = H^{-1} V H^{-1}``
    (:func:`_sandwich_scaled`, whose arguments and returns these are; ``decay``: the L2
    coefficient, a float or per weight ``[d]``, in parameter units), on the identifiable
    part: the exact flat directions ``flat`` (``[d, k]``; ``None``: :func:`flat_directions`)
    are projected out of H (``P H P``: no curvature, no variance, no influence along them;
    ``diagnostics["flat_directions"] = k``).

    The figures must not depend on the units of each weight (``theta_j -> c_j theta_j`` is the
    same model and estimator), but the eigenvalue floor (``damping`` times the largest) is
    relative: inputs on a 1e-5 scale put the weights' curvature 1e-10 below the bias's, the
    floor raised it and shrank their sigma 100x (int8 leakage -37%, no warning). Where the
    floor bites in parameter units, the sandwich is recomputed with Jacobi scaling
    (``D = diag|H_jj|^{-1/2}``: ``D H D``, ``D V D``, ``G D``, ``J D``; ``sigma`` scaled back,
    the rest unit-free) and kept if fewer eigenvalues are floored there (units, not flat
    directions, were the cause; ``diagnostics["hessian_scaling"] = "jacobi"``). A Hessian
    that is singular in any units keeps the parameter-unit pseudo-inverse.

    ``floor_variants``: when given and the floor bites in the units kept (``eigenvalues_floored
    > 0``), gets ``{f: {"sigma", "w", "mahal", "corr", "leverage"}}`` for the floor at ``f``
    times ``damping``, ``f`` in :data:`FLOOR_SENSITIVITY_FACTORS` (same units): the floored
    directions' variance is ``u' V u / floor^2``, set by the damping constant rather than by the
    data, and the scoring reports how far the headline follows it (``floor_sensitivity``). An
    unfloored Hessian leaves it empty (no extra work; the figures do not depend on the floor).

    ``newton_gradient``: ``[d]`` the penalised mean gradient ``g``; ``records`` then gets
    ``"newton_step"``, ``H^+ g`` (parameter units) through the very inverse ``Sigma`` was built
    from (flat directions and null directions dropped, ``|eigenvalues|`` floored), so that the
    stationarity check's ``step_j / sigma_j`` (:func:`_newton_offset`) compares like with like.
    """
    if flat is None:
        flat = flat_directions(gg_mean, H, G)
    if flat.shape[1]:
        H = _project_out(H, flat)
        if newton_gradient is not None:
            newton_gradient = newton_gradient - flat @ (flat.T @ newton_gradient)
    diagnostics["flat_directions"] = int(flat.shape[1])
    dvec = torch.as_tensor(decay, dtype=torch.float64).to(H.device).expand(H.shape[0]) \
        if newton_gradient is not None else None
    first: dict[str, Any] = {}
    rec1: dict[str, Tensor] = {}
    out = _sandwich_scaled(gg_mean, H, g_mean, G, n, damping, first, jacobians=jacobians,
                           loss_hessians=loss_hessians, correct_leverage=correct_leverage, records=rec1,
                           newton_gradient=newton_gradient, precision=precision, decay=dvec)
    if first.get("eigenvalues_floored", 0) > 0:
        hd = torch.diagonal(H).abs()
        top = float(hd.max())
        # a zero diagonal (a weight no record reaches) keeps the neutral scale of the largest
        s = torch.where(hd > 1e-300, hd, torch.full_like(hd, max(top, 1e-300))).rsqrt()
        ss = torch.outer(s, s)
        second: dict[str, Any] = {}
        rec2: dict[str, Tensor] = {}
        sigma, w, mahal, corr = _sandwich_scaled(
            gg_mean * ss, H * ss, g_mean * s, G * s, n, damping, second,
            jacobians=None if jacobians is None else jacobians * s, loss_hessians=loss_hessians,
            correct_leverage=correct_leverage, records=rec2,
            newton_gradient=None if newton_gradient is None else newton_gradient * s, precision=precision,
            decay=None if dvec is None else dvec * s * s)
        if second["eigenvalues_floored"] < first["eigenvalues_floored"]:
            diagnostics.update(second, hessian_scaling="jacobi")
            for key in ("newton_step", "newton_step_held"):  # D (D H D)^+ D g: back to parameter units
                if key in rec2:
                    rec2[key] = rec2[key] * s
            if records is not None:
                records.update(rec2)
            if floor_variants is not None:
                def scaled(f: float, rec: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
                    sg, *rest = _sandwich_scaled(
                        gg_mean * ss, H * ss, g_mean * s, G * s, n, damping * f, {},
                        jacobians=None if jacobians is None else jacobians * s, loss_hessians=loss_hessians,
                        correct_leverage=correct_leverage, records=rec)
                    return (sg * s, *rest)
                _floor_variants(floor_variants, second["eigenvalues_floored"], damping, scaled)
            return sigma * s, w, mahal, corr
    diagnostics.update(first)
    if records is not None:
        records.update(rec1)
    if floor_variants is not None:
        _floor_variants(floor_variants, first.get("eigenvalues_floored", 0), damping, lambda f, rec: _sandwich_scaled(
            gg_mean, H, g_mean, G, n, damping * f, {}, jacobians=jacobians, loss_hessians=loss_hessians,
            correct_leverage=correct_leverage, records=rec))
    return out


# The floor's sensitivity check (sandwich_compute's floor_variants): the sandwich again with the
# eigenvalue floor at these multiples of ``damping``, where the floor bites.
FLOOR_SENSITIVITY_FACTORS = (10.0, 0.1)


def _floor_variants(out: dict[float, dict[str, Tensor | None]], floored: int, damping: float,
                    compute: Callable[[float, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor, Tensor]]) -> None:
    """Fill ``out`` with the sandwich at each floor of :data:`FLOOR_SENSITIVITY_FACTORS` when
    ``floored > 0`` (``compute(factor, records)`` in the units the estimate kept)."""
    if floored <= 0 or damping <= 0:
        return
    for f in FLOOR_SENSITIVITY_FACTORS:
        rec: dict[str, Tensor] = {}
        sigma, w, mahal, corr = compute(f, rec)
        out[f] = {"sigma": sigma, "w": w, "mahal": mahal, "corr": corr, "leverage": rec.get("leverage"),
                  "self_term": rec.get("self_term"), "self_weight": rec.get("self_weight"),
                  "correlation_factor": rec.get("correlation_factor")}


def _sandwich_scaled(gg_mean: Tensor, H: Tensor, g_mean: Tensor, G: Tensor, n: int, damping: float,
                     diagnostics: dict[str, Any], *, jacobians: Tensor | None = None,
                     loss_hessians: Tensor | None = None, correct_leverage: bool = False,
                     records: dict[str, Tensor] | None = None, newton_gradient: Tensor | None = None,
                     precision: float = 0.0, decay: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact sandwich (method.md section 4): ``Sigma = H^{-1} V H^{-1}`` in the given units.

    Args:
        gg_mean: ``[d, d]`` mean of ``g g^T`` over the n records; ``g_mean``: ``[d]`` mean gradient.
        H: ``[d, d]`` mean Hessian of the training objective (weight decay included).
        G: ``[R, d]`` per-sample gradients of the R kept records.
        n: records; ``damping``: relative floor of ``|eigenvalues|`` of ``H``.
        diagnostics: updated in place with the Hessian's spectrum and, with ``jacobians``, the
            records' leverages (``mean_leverage``, ``max_leverage``, ``leverage_correction``).
        jacobians: ``[R, C, d]`` and
        loss_hessians: ``[R, C, C]`` the kept records' curvature factors, ``J_i' L_i J_i``
            the record's Hessian (:func:`_record_curvature`'s ``(Q_i, S_i)``: its exact Hessian
            on the span of its output gradients; or the Gauss-Newton factor, output Jacobian and
            loss Hessian in the outputs); ``None``: no leverages.
        correct_leverage: apply the finite-sample correction (method.md section 4,
            "Finite-sample (leverage) correction"): each record's centred gradient ``c_i``
            becomes ``H H_{-i}^{-1} c_i`` (Woodbury; ``c_i / (1 - h_i)`` for one output), so
            ``psi_i = -H_{-i}^{-1} c_i`` is the leave-one-out shift, and ``V`` gets the HC2
            term ``sum_i c_i c_i' a_i / n``, ``a_i = h_i / (1 - h_i)``: over the n records when
            all are kept, else each kept record's leave-one-out estimate of it, a shared ``V``
            less a rank-one term per record (:func:`_leverage`).
        records: when given and the correction is applied, gets ``"leverage"``: ``[R]`` the
            narrowing along each record's shift direction (capped), for the spread term
            (:func:`_spread_leverage`; ``h_i`` where ``rank(L_i) = 1``); with fewer records kept
            than ``n``, also ``"self_term"`` ``[R, d]`` and ``"self_weight"`` ``[R]``, record
            ``i``'s rank-one term in the units of ``w`` (:class:`Estimate`); the returned
            ``|Sigma^{-1/2} psi|`` includes it, ``sigma``, ``w`` and the correlation are the
            shared ones.
        newton_gradient: ``[d]`` (the given units); ``records`` then gets ``"newton_step"``,
            ``H^+ g`` through the inverse of ``Sigma`` (floored, null directions dropped), and,
            with ``decay``, ``"newton_step_held"``: its part along the directions the weight
            decay alone holds (:func:`_decay_held`; ``diagnostics["decay_held_directions"]`` their count).
        decay: ``[d]`` the L2 coefficient per weight in the given units (``c_j^2 wd_j`` under a
            scaling ``c``); ``None`` or all 0: no decay-held directions.
        precision: H's relative precision ``p`` (the stored weights' eps or the gradient norm ratio;
            0: float64 rounding alone). ``diagnostics["negative_curvature"]`` (and the count
            ``negative_eigenvalues_flipped``) reads the eigenvalues below ``-tol * lambda_max``,
            ``tol = max(100 d eps, p)`` (``negative_curvature_tolerance``; method.md section 4,
            exact sandwich), ``curvature_unresolved`` a lowest eigenvalue in ``[-tol, -100 d eps)``
            at ``p`` above :data:`NEGATIVE_CURVATURE_PRECISION_MAX` (:func:`curvature_sign`): ``100 d eps``
            is eigh's backward error (``~d eps |H|``), above the float64 rounding of the n-record
            sum H is (``~eps log2 n`` of the summed magnitudes, pairwise) unless the records'
            Hessians cancel by more than ``100 d / log2 n``; H sums every record, so it has no
            sampling error of its own as the objective's Hessian; ``p`` bounds the terms linear
            in the mean gradient that H holds off the stationary point (a negative eigenvalue of
            their size is no evidence of a saddle; measured 0.004-0.12 of ``p``). Every negative
            eigenvalue is used as ``|lambda|`` (floored) either way: the figures do not depend on
            the flag.

    Returns:
        ``sigma [d]`` (std of theta-hat, ``sqrt(Sigma_jj / n)``; parameter units), the
        standardised influences ``w = psi / sqrt(diag Sigma)`` ``[R, d]`` with
        ``psi = -H^{-1}(g - g_bar)``, ``|Sigma^{-1/2} psi|`` ``[R]`` (pseudo-inverse,
        functional/correlated.py) and the ``[d, d]`` correlation matrix of ``Sigma``.
    """
    V = gg_mean - torch.outer(g_mean, g_mean)
    H = 0.5 * (H + H.T)
    evals, evecs = torch.linalg.eigh(H)
    lo, hi = float(evals[0]), float(evals[-1])
    floor = damping * max(abs(hi), 1e-300)
    # eigh's own rounding (~d eps |max|): a singular PSD Hessian (a Gauss-Newton one with d > n)
    # reads -1e-16 eigenvalues, which are zeros (floored), not negative curvature
    rounding = 100 * H.shape[0] * torch.finfo(torch.float64).eps * max(abs(hi), 1e-300)
    # negative curvature: below H's own precision too (the terms off the stationary point)
    sign = curvature_sign(lo, hi, rounding / max(abs(hi), 1e-300), precision)
    flipped = int((evals < -sign["negative_curvature_tolerance"] * max(abs(hi), 1e-300)).sum())
    floored = int((evals.abs() < floor).sum())
    # Indefinite or singular H (a model near a saddle, or a flat direction): shifting the
    # whole spectrum up to the floor would leave a near-zero eigenvalue and an unbounded
    # variance along it. Use |eigenvalues| (the curvature's magnitude, as saddle-free Newton
    # does) floored at damping * max instead; reported in the diagnostics.
    inv = 1.0 / evals.abs().clamp_min(floor)
    # Exact null directions: H's eigenvalue within rounding of 0 and no gradient variance along
    # the direction either (a symmetry, e.g. softmax's shift of every output bias; a GGN's
    # directions no record's gradient reaches): the data never moves theta there, so the
    # sandwich's 0 / 0 is 0 (pseudo-inverse). Floored instead, the damped inverse (1e8 / max)
    # blew V's rounding along them up to O(1) of the variances, which then moved with the
    # summation order (the batch size) and split the baseline's two forms by a few percent.
    null = evals.abs() <= rounding
    if bool(null.any()):
        U = evecs[:, null]
        along = ((U.T @ V) * U.T).sum(-1)  # u' V u per direction
        v_round = 100 * H.shape[0] * torch.finfo(torch.float64).eps * max(float(V.diagonal().abs().max()), 1e-300)
        drop = torch.zeros_like(null)
        drop[null] = along.abs() <= v_round
        inv = torch.where(drop, torch.zeros_like(inv), inv)
        floored -= int(drop.sum())
        diagnostics["hessian_null_directions"] = int(drop.sum())
    diagnostics.update(
        hessian_min_eigenvalue=lo, hessian_max_eigenvalue=hi,
        hessian_condition=(hi / lo) if lo > 0 else math.inf,
        **sign, negative_eigenvalues_flipped=flipped, eigenvalues_floored=floored,
    )
    if decay is not None and bool((decay > 0).any()):
        # the decay along H's lowest direction u (u' diag(decay) u, H's units: the records' curvature
        # there is lo minus it) and u's share in the decayed weights: a lowest eigenvalue <= 0 along
        # weights left undecayed (biases) is the records' own, no decay cancelled (rv55)
        u2 = evecs[:, 0].square()
        diagnostics.update(hessian_min_direction_decay=float((u2 * decay.to(u2)).sum()),
                           hessian_min_direction_decayed=float(u2[decay.to(u2.device) > 0].sum()))
    Hinv = (evecs * inv) @ evecs.T
    if records is not None and newton_gradient is not None:
        records["newton_step"] = Hinv @ newton_gradient.to(Hinv)
        diagnostics["stiff_offset_sd"] = _stiff_offset(evals, evecs, V, newton_gradient.to(V), n)
        held = _decay_held(evals, evecs, decay)
        if held is not None:
            U = evecs[:, held]
            records["newton_step_held"] = U @ (inv[held] * (U.T @ newton_gradient.to(U)))
            diagnostics["decay_held_directions"] = int(held.sum())
    C0 = G - g_mean  # centred gradients [R, d]
    C, beta = C0, None
    if jacobians is not None and loss_hessians is not None:
        C, V, hp, beta = _leverage(C0, V, Hinv, jacobians, loss_hessians, n, correct_leverage, diagnostics)
        if records is not None and hp is not None:
            records["leverage"] = _spread_leverage(C, V, jacobians, loss_hessians, n, hp)
    Sigma = Hinv @ V @ Hinv
    Sigma = 0.5 * (Sigma + Sigma.T)
    sdiag = torch.diagonal(Sigma).clamp_min(0.0)
    # Weights the data never moves (a head weight on a feature that is 0 for every record):
    # their Sigma_jj and psi_j are rounding of the products with Hinv (~1e-30 against the
    # others' ~1e-2), and rounding over rounding gave them influences of order 1, counted as
    # leaking. Below the products' rounding floor they carry no influence.
    floor = max(1e-12, 100 * Sigma.shape[0] * torch.finfo(torch.float64).eps) * float(sdiag.max().clamp_min(0.0))
    moved = sdiag > floor
    sdiag = torch.where(moved, sdiag, torch.zeros_like(sdiag))
    # ... and no correlation: normalised, their rounding rows read as unit-variance coordinates
    # correlated with the others (0.65 on a dead ReLU unit's bias: the quantized schemes, scored
    # through the correlation, read 8-10% above the same model without that unit)
    Sigma = Sigma * (moved.unsqueeze(-1) & moved.unsqueeze(0))
    sigma = (sdiag / n).sqrt()
    psi = -C @ Hinv.T
    w = torch.where(sdiag > 0, psi / sdiag.clamp_min(1e-300).sqrt(), torch.zeros_like(psi))
    if beta is not None and records is not None:
        # R < n stored (lo29): record i's own V is V_bar - beta_i c_i c_i' (_leverage), so its
        # Sigma is Sigma_bar - beta_i (H^-1 c_i)(H^-1 c_i)', in the units of w: the rank-one
        # self term x_i = H^-1 c_i / sqrt(diag Sigma_bar) (the sign does not enter)
        x = C0 @ Hinv.T
        records["self_term"] = torch.where(sdiag > 0, x / sdiag.clamp_min(1e-300).sqrt(), torch.zeros_like(x))
        records["self_weight"] = beta
    # The correlation of Sigma (the standardised units of ``w``) carries the covariance into the
    # headline (functional/correlated.py); |Sigma^{-1/2} psi| = sqrt(w' R^+ w) by an
    # eigendecomposition pseudo-inverse with a stated cutoff (lstsq's default driver gave
    # run-dependent answers on the singular Sigma of collinear features).
    corr = correlation_from_covariance(Sigma)
    # The Hessian cancels in psi' Sigma^+ psi = g' V^+ g (g centred): computing it from V keeps
    # the damped flat directions of a singular H (collinear features) out of it. The weights the
    # data never moves are left out of it as out of Sigma: their gradients are rounding or an
    # optimizer's residue (fu26: 5 of 8 GELU units decayed to ~1e-7, whose unit-free gradients
    # added ~1 each to g' V^+ g: unquantized leakage 0.0484 against 0.0410 with them exactly 0).
    Vm = V * (moved.unsqueeze(-1) & moved.unsqueeze(0))
    Vs = Vm.diagonal().clamp_min(0.0).sqrt()
    Vinv = torch.where(Vs > 0, 1.0 / Vs.clamp_min(1e-300), torch.zeros_like(Vs))
    g_std = C * Vinv
    Rv = correlation_from_covariance(Vm)
    vcorr = Correlation(full=Rv, self_term=None if beta is None else C0 * Vinv, self_weight=beta)
    mahal = vcorr.quadratic(g_std).sqrt()
    if records is not None and SANDWICH_FACTOR:
        # V's correlation's eigendecomposition, computed once (the Mahalanobis norm's)
        records["correlation_factor"] = _sandwich_factor(vcorr._eigh["eigh"], Vs, Vinv, evecs, inv, sdiag)
    return sigma, w, mahal, corr


# The full correlated form through the sandwich's own factor (SandwichFactor; rc46): False restores
# the eigendecomposition of R itself, at RCOND on R (A/B)
SANDWICH_FACTOR = True


def _sandwich_factor(v_eigh: tuple[Tensor, Tensor], Vs: Tensor, Vinv: Tensor, evecs: Tensor, inv: Tensor,
                     sdiag: Tensor) -> SandwichFactor:
    """``R ~ B B'`` with ``B = D^-1 H^+ D_V Q Lambda^1/2`` from the eigendecomposition ``v_eigh`` of
    the gradient covariance's correlation ``Q Lambda Q'`` (ascending;
    :class:`~mis_lightning.functional.correlated.SandwichFactor`): ``H^+`` the
    sandwich's own inverse (``evecs diag(inv) evecs'``, floored, null directions 0), ``D`` the sd of
    ``Sigma`` (``sqrt(sdiag)``; 0 where the data never moves the weight), ``D_V = Vs``. Its left
    inverse ``D H D_V^-1 Q Lambda^-1/2`` maps ``w = -D^-1 H^+ c`` to ``-Lambda^-1/2 Q' D_V^-1 c``, the
    coordinates of the estimator's Mahalanobis norm (``|.|^2 = g'V^+g`` within the same rule)."""
    ev, Q = v_eigh
    top = float(ev[-1]) if ev.numel() else 0.0
    pos = ev > Q.shape[0] * torch.finfo(torch.float64).eps * max(top, 0.0)
    lam, Q = ev[pos], Q[:, pos]
    # eigh's sign per column is the round-off's (it flipped between estimation batch sizes and loss
    # scales): the Monte Carlo forms draw U = B z, so each column is signed by its product with a
    # fixed generic vector (not by its largest entry: a 2-class softmax's columns are [v; -v], whose
    # largest entries tie)
    probe = torch.remainder(torch.arange(1, Q.shape[0] + 1, dtype=Q.dtype) * 0.6180339887498949, 1.0) - 0.5
    Q = Q * torch.where(probe @ Q < 0, -1.0, 1.0)
    D = sdiag.sqrt()
    Dinv = torch.where(D > 0, 1.0 / D.clamp_min(1e-300), torch.zeros_like(D))
    hinv = (evecs * inv) @ (evecs.T @ (Vs.unsqueeze(-1) * Q))                 # H^+ D_V Q
    null = inv == 0
    if bool(null.any()):
        # H's dropped null directions (a softmax's class shift): n'H^+ = 0 exactly, but the product
        # leaves ~eps max(inv) |L| along them, which an ill-conditioned H lifts above the exact
        # block's round-off rule (a softmax's float biases would read their identically 0 sum as
        # observed); projected out (3e-16 of B's scale either way on a well-conditioned softmax)
        N = evecs[:, null]
        hinv = hinv - N @ (N.T @ hinv)
    h = torch.where(inv > 0, 1.0 / inv.clamp_min(1e-300), torch.zeros_like(inv))
    hfl = (evecs * h) @ (evecs.T @ (Vinv.unsqueeze(-1) * Q))                  # H D_V^-1 Q
    return SandwichFactor(evals=lam, root=Dinv.unsqueeze(-1) * hinv * lam.sqrt(),
                          left=D.unsqueeze(-1) * hfl * lam.rsqrt())


def _leverage(C: Tensor, V: Tensor, Hinv: Tensor, J: Tensor, L: Tensor, n: int, correct: bool,
              diagnostics: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The kept records' generalized leverages and, with ``correct``, the leave-one-out
    gradients and the HC2 gradient covariance (method.md section 4, "Finite-sample (leverage)
    correction").

    ``A_i = L_i J_i H^{-1} J_i' / n`` ``[C, C]``, leverage ``h_i = tr A_i`` (ridge: the hat
    value). Woodbury for ``H_{-i} = H - J_i' L_i J_i / n``:
    ``H H_{-i}^{-1} c = c + J_i' (I - A_i)^{-1} L_i J_i H^{-1} c / n`` (one output and
    ``c = J' e``: ``c / (1 - h_i)``). HC2: ``V + sum_i D_i / n`` over the n records, the record's
    own term ``D_i = a_i c_i c_i'``, ``a_i = h_i / (1 - h_i)``, for one loss direction (an indefinite
    ``L_i`` with several: ``a_i`` at ``h_i / rank(L_i)``), and with several (``rank(L_i) > 1``) the matrix form
    ``D_i = c^_i c^_i' - c_i c_i'``, ``c^ = (I - J' L J H^-1 / n)^-1/2 c`` (:func:`_hc2_matrix`;
    :data:`HC2_FORM` ``"per_direction"``: ``a_i`` at ``h'_i = h_i / rank(L_i)``, the former form).
    With every record kept (``R >= n``) that sum itself.
    With ``R < n`` kept (method.md section 4, *Gradient covariance*) each kept record ``i``
    is scored through its own leave-one-out estimate, unbiased for that sum given ``i``:
    its own term at ``D_i / n`` and the ``n - 1`` others by the regression (control-variate)
    estimate ``a_bar V_{-i} + mean_{kept j != i} (D_j - a_bar c_j c_j')``. That is one shared
    ``V_bar = (1 + a_bar) V + kappa sum_kept (D_j - a_bar c_j c_j')`` (``kappa = (n - 1) / (n (R - 1))``)
    less a rank-one term per record, ``V_i = V_bar - beta_i c_i c_i'``,
    ``beta_i = (n - R) / (n (R - 1)) (a_i - a_bar)`` (``a_i = c' D_i c / |c|^4`` for a matrix
    record: its own term's part along ``c_i``, the rest ``O(1 / R)``): the scoring applies it by Sherman-Morrison
    (functional/correlated.py, ``Correlation.self_term``). ``R = 1``: ``(1 + a) V``.

    Args:
        C: ``[R, d]`` centred gradients; ``V``: ``[d, d]`` their covariance over all n records.
        Hinv: ``[d, d]`` the (floored) inverse Hessian; ``J``: ``[R, K, d]``; ``L``: ``[R, K, K]``.
        n: records; ``correct``: return the corrected ``(C, V)`` (else the inputs).
        diagnostics: gets ``mean_leverage``, ``max_leverage`` (over the R kept records),
            ``leverage_capped`` (records whose ``A_i`` has an eigenvalue above
            :data:`LEVERAGE_CAP`: ``A_i`` scaled so that its largest is the cap) and
            ``leverage_correction`` (whether applied).

    Returns:
        ``(C, V, h', beta)``: corrected (``V`` the shared ``V_bar``), with ``h' [R]`` the capped
        per-direction leverages and ``beta [R]`` the per-record rank-one weights (``None`` with
        every record kept, or one kept: no per-record term); or ``(C, V, None, None)`` as given
        (no correction).
    """
    L = 0.5 * (L + L.transpose(1, 2))
    HJ = J @ Hinv  # [R, K, d] (Hinv symmetric)
    JHJ = HJ @ J.transpose(1, 2)  # [R, K, K]: J H^-1 J'
    A = L @ JHJ / n  # [R, K, K]
    h = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    top = _top_leverage(L, JHJ / n, h)
    capped = top > LEVERAGE_CAP
    diagnostics.update(mean_leverage=float(h.mean()), max_leverage=float(h.max()),
                       leverage_capped=int(capped.sum()), leverage_correction=bool(correct))
    if not correct:
        return C, V, None, None
    # Cap (I - A)^-1: scale the records' A so that its largest eigenvalue is LEVERAGE_CAP
    # (reported above; one direction: tr A = h). Not the trace: with K directions a positive
    # factor against a positive definite H has h up to K with every eigenvalue below 1, and a
    # cap on h understated those records' leave-one-out shifts (docs/benchmarks.md, "lv58").
    scale = torch.where(capped, LEVERAGE_CAP / top.clamp_min(1e-300), torch.ones_like(h))
    A = A * scale[:, None, None]
    h = h * scale
    K = A.shape[-1]
    u = torch.einsum("rkd,rd->rk", HJ, C)  # J H^-1 c
    rhs = torch.einsum("rkl,rl->rk", L * scale[:, None, None], u) / n
    v = torch.linalg.solve(torch.eye(K, dtype=A.dtype) - A, rhs.unsqueeze(-1)).squeeze(-1)
    C_loo = C + torch.einsum("rkd,rk->rd", J, v)
    rank = _loss_rank(L, h)
    hp = h / rank
    a = hp / (1 - hp)
    # Records with several loss directions (HC2_FORM "matrix"): their own term D_i = c^ c^' - c c',
    # c^ = c + J' g(A_i) L_i J H^-1 c / n with g(x) = ((1 - x)^-1/2 - 1) / x, i.e. (I - P_i H^-1 / n)^-1/2 c
    # (P_i = J' L J the record's factor; one direction: c / sqrt(1 - h_i) on its span)
    Cm, Ch, m = _hc2_matrix(L * scale[:, None, None], JHJ / n, u / n, J, C, rank)
    # a_eff: D_i's part along c_i (c' D c / |c|^4): the rank-one weight of the stored-subset forms below
    a_eff = a.clone()
    if m is not None:
        # (c' c^ / c'c)^2 - 1, the ratio taken before squaring: |c|^4 underflows where |c| < 1e-77 (a record fitted
        # to a float64 logit gap of ~180), and 0 / 0 made every figure NaN (docs/benchmarks.md "rv59b"); a
        # subnormal c'c (no precision left) keeps the per-direction weight
        cc = (Cm * Cm).sum(-1)
        ok = cc >= torch.finfo(cc.dtype).tiny
        a_eff[m] = torch.where(ok, ((Cm * Ch).sum(-1) / torch.where(ok, cc, torch.ones_like(cc))) ** 2 - 1.0, a[m])
        a = torch.where(m, torch.zeros_like(a), a)

    # the stored records' own terms: a_j c_j c_j' (scalar records, summed below as before the matrix form: with
    # none, the figures are bitwise those of the scalar form, also with R < n stored), D_j (matrix records) summed
    Ca = C * a.unsqueeze(-1)
    mine = None if m is None else Ch.T @ Ch - Cm.T @ Cm

    # HC2 adds (1/n) sum_j a_j c_j c_j' over all n records. With R < n stored, a mean over the
    # stored ones put each stored record's own c c' in at a_i / R and scored that record through
    # it, its c' V^-1 c lower by ~a_i d / R (rn28: OLS d = 201, R = 512 of 3,000, -1.8 %); a
    # scalar a_bar V for the records not stored (hs28) is right in trace, not in shape (-0.3 % on
    # that OLS, +1.5 % on a heteroscedastic high-leverage design). Here each record gets its
    # own term at a_i / n and the others' by a regression estimate on the known V (whose noise
    # is that of (a_j - a_bar) c_j c_j' alone: inverted, an unbiased but noisy sum reads high,
    # +0.2 % on that OLS with the plain mean), as V_bar less a rank-one term per record (beta).
    # A matrix record's own term D_j enters the sums as itself; its rank-one self term is D_j's
    # part along c_j (a_eff), the shape's remainder O(1 / R) of the record's own form.
    R = C.shape[0]
    if R >= n:  # every record stored: the HC2 sum itself
        V = V + (Ca.T @ C if mine is None else Ca.T @ C + mine) / n
        return C_loo, 0.5 * (V + V.T), hp, None
    abar = float(a_eff.mean())
    if R == 1:  # no other stored record: the others at this record's a (its own term cancels)
        return C_loo, V * (1.0 + abar), hp, None
    kappa = (n - 1) / (n * (R - 1))
    own = (Ca - abar * C).T @ C
    V = V * (1.0 + abar) + kappa * (own if mine is None else own + mine)
    beta = (n - R) / (n * (R - 1)) * (a_eff - abar)
    return C_loo, 0.5 * (V + V.T), hp, beta


def _hc2_matrix(L: Tensor, M: Tensor, u: Tensor, J: Tensor, C: Tensor,
                rank: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The matrix HC2 form's inflated gradients (:data:`HC2_FORM` ``"matrix"``; method.md section 4,
    "Gradient covariance"): for each record with ``rank(L_i) > 1`` and ``L_i`` positive semi-definite,
    ``c^ = (I - P_i H^-1 / n)^-1/2 c = c + J' L^1/2 g(B) L^1/2 u``, ``B = L^1/2 M L^1/2`` (eigenvalues
    those of ``A_i = L M``), ``g(x) = ((1 - x)^-1/2 - 1) / x`` (``(L M)^k L = L^1/2 B^k L^1/2``: no inverse).
    Its second moment is the loss's in every output direction where the in-sample residual's is
    ``(I - A_i) L_i`` (first order; exact for linear models), while ``c / sqrt(1 - h_i / rank)`` is right in
    trace only.

    Args:
        L: ``[R, K, K]`` symmetric, already scaled by the cap (``A_i``'s largest eigenvalue at most
            :data:`LEVERAGE_CAP`); M: ``[R, K, K]`` ``J H^-1 J' / n``; u: ``[R, K]`` ``J H^-1 c / n``;
            J: ``[R, K, d]``; C: ``[R, d]``; rank: ``[R]`` ``rank(L_i)``.

    Returns:
        ``(c, c^, mask)``: the selected records' ``[m, d]`` gradients and inflated gradients and the
        ``[R]`` mask selecting them; ``(C[:0], C[:0], None)`` where none is selected (or the
        per-direction form is chosen)."""
    none = (C[:0], C[:0], None)
    if HC2_FORM != "matrix" or L.shape[-1] == 1:
        return none
    lam, U = torch.linalg.eigh(L)
    tol = LOSS_RANK_RTOL * lam.abs().amax(-1).clamp_min(1e-300)
    m = (rank > 1) & (lam[:, 0] >= -tol)
    if not bool(m.any()):
        return none
    lam, U = lam[m], U[m]
    Lh = (U * lam.clamp_min(0.0).sqrt().unsqueeze(-2)) @ U.transpose(1, 2)
    B = Lh @ M[m] @ Lh
    b, W = torch.linalg.eigh(0.5 * (B + B.transpose(1, 2)))
    b = b.clamp(max=LEVERAGE_CAP)  # the cap's scaling already holds it there, up to rounding
    small = b.abs() < 1e-6
    g = torch.where(small, 0.5 + 0.375 * b, ((1.0 - b).rsqrt() - 1.0) / torch.where(small, torch.ones_like(b), b))
    G = (W * g.unsqueeze(-2)) @ W.transpose(1, 2)
    v = torch.zeros_like(u)
    v[m] = torch.einsum("rkl,rl->rk", Lh @ G @ Lh, u[m])  # L^1/2 g(B) L^1/2 u (0 on the records not selected)
    # J whole, not J[m]: indexing copied it (peak rise +553 MiB, was +652, per direction +379, medians of 3 at
    # K = 100, R = 256, d = 1000, J 195 MiB: docs/benchmarks.md "rv59b")
    return C[m], (C + torch.einsum("rkd,rk->rd", J, v))[m], m


def _top_leverage(L: Tensor, M: Tensor, h: Tensor) -> Tensor:
    """``[R]`` the largest eigenvalue of each record's leverage matrix ``A_i = L_i M_i`` (``L``:
    ``[R, K, K]`` the loss's output curvature, symmetric; ``M``: ``[R, K, K]`` ``J_i H^-1 J_i' / n``,
    positive semi-definite against the floored ``H^-1``; ``h = tr A_i`` ``[R]`` itself where
    ``K = 1``): what :data:`LEVERAGE_CAP` caps, ``I - A_i`` being singular where an eigenvalue
    reaches 1. Each is below 1 for a positive semi-definite ``L_i`` against a positive definite
    ``H`` (the record's own curvature is part of ``H``), while ``h_i`` reaches up to ``K``.

    Read as the eigenvalues of the symmetric ``M^1/2 L M^1/2`` (``AB`` and ``BA`` share their
    non-zero eigenvalues) by ``eigvalsh``: the general eigensolver on ``L M`` itself fails to
    converge on the ill-conditioned records of floor-dependent fits (tests/test_ill_posed_fits.py)."""
    if L.shape[-1] == 1:
        return h
    m, U = torch.linalg.eigh(0.5 * (M + M.transpose(1, 2)))
    root = (U * m.clamp_min(0.0).sqrt().unsqueeze(-2)) @ U.transpose(1, 2)  # M^1/2, [R, K, K]
    S = root @ L @ root
    return torch.linalg.eigvalsh(0.5 * (S + S.transpose(1, 2)))[..., -1].to(h.dtype)


def _loss_rank(L: Tensor, like: Tensor) -> Tensor:
    """``[R]`` ``rank(L_i)`` (at least 1), in ``like``'s dtype: directions below
    :data:`LOSS_RANK_RTOL` of the largest carry no leverage; the tolerance does not follow the
    dtype, so a loss evaluated in float32 (ComputeDtypeLoss) counts the same rank."""
    if L.shape[-1] == 1:
        return torch.ones(L.shape[0], dtype=like.dtype)
    return torch.linalg.matrix_rank(L, rtol=LOSS_RANK_RTOL).clamp_min(1).to(like.dtype)


def _spread_leverage(C: Tensor, V: Tensor, J: Tensor, L: Tensor, n: int, hp: Tensor) -> Tensor:
    """``[R]`` the spread term's leverage (method.md section 4, "Spread term"): the narrowing
    along each record's own shift direction, :func:`_directional_leverage` of the corrected
    ``(C, V)``, where ``rank(L_i) > 1``; the per-direction ``hp = h_i / rank(L_i)`` where the rank
    is 1 (there the two agree under the information equality, and ``hp`` is kept exactly). With
    ``rank(L_i) > 1`` the mean over the output directions understates the narrowing where the shift
    is: the residual lies along ``L_i``'s large directions, where ``A_i``'s eigenvalues are large
    too. At most ``h_i`` and :data:`LEVERAGE_CAP`; ``hp`` where ``c' V^+ c = 0``."""
    L = 0.5 * (L + L.transpose(1, 2))
    rank = _loss_rank(L, hp)
    multi = rank > 1
    if not bool(multi.any()):
        return hp
    hd = _directional_leverage(C[multi], V, J[multi], L[multi], n, (hp * rank)[multi])
    # At most the whole narrowing h_i = tr A_i: the share u' B_i u / tr B_i is at most 1 for a
    # positive semi-definite L_i; the minimum guards an indefinite one (a loss whose Hessian in
    # the outputs is not a covariance). The unnormalised u' B_i u was unbounded where V^+ is large
    # against H^-1 (a class-weighted 2-class MLP read 9x h_i) and moved with the loss's scale.
    out = hp.clone()
    out[multi] = torch.minimum(torch.where(torch.isfinite(hd), hd, hp[multi]),
                               (hp * rank)[multi]).clamp(0.0, LEVERAGE_CAP)
    return out


def _directional_leverage(C: Tensor, V: Tensor, J: Tensor, L: Tensor, n: int, h: Tensor) -> Tensor:
    """``[R]`` each record's narrowing along its own shift direction (method.md section 4,
    "Spread term"): whitened by ``Sigma = H^-1 V H^-1``, the member's covariance loses
    ``B_i = Sigma^-1/2 H^-1 J_i' L_i J_i H^-1 Sigma^-1/2 / n`` and its shift lies along
    ``u ~ Sigma^-1/2 H^-1 c_i``, so ``u' B_i u = c' V^+ J' L J V^+ c / (n c' V^+ c)`` and
    ``tr B_i = tr(V^+ J' L J) / n`` (the Hessian cancels in both). ``B_i`` is what the member
    removes under the information equality (its gradient's covariance given its inputs is
    ``L_i``); a loss scaled by ``s`` (a mean instead of a sum over outputs, MSE whose noise
    variance is not 1) scales ``B_i`` by ``1 / s`` while the narrowing is unchanged. The
    returned narrowing is therefore the leverage ``h_i`` (``h``, scale-free) times the share of
    ``B_i`` along the shift, ``u' B_i u / tr B_i`` (at most 1): equal to ``u' B_i u`` under the
    information equality (``tr B_i = h_i``), and the same figure whatever the loss's scale (before,
    the exact estimator's leakage moved 0.193 -> 0.182 -> 0.177 for a 3-output loss scaled by
    1, 3, 10). ``V^+`` is taken through the correlation matrix with the pseudo-inverse cutoff of
    the influences' Mahalanobis norm (functional/correlated.py); ``nan`` where ``c' V^+ c = 0``
    or ``tr B_i = 0``.
    """
    Vs = V.diagonal().clamp_min(0.0).sqrt()
    Dinv = torch.where(Vs > 0, 1.0 / Vs.clamp_min(1e-300), torch.zeros_like(Vs))
    Rinv = torch.linalg.pinv(correlation_from_covariance(V), hermitian=True, rtol=CORRELATION_RCOND)
    cs = C * Dinv
    y = cs @ Rinv  # R^+ symmetric
    den = (cs * y).sum(-1)
    Ja = torch.einsum("rkd,rd->rk", J, y * Dinv)  # J V^+ c
    num = torch.einsum("rk,rkl,rl->r", Ja, L, Ja)
    JD = J * Dinv
    JVJ = torch.einsum("rkd,rld->rkl", JD @ Rinv, JD)  # J V^+ J'
    tr = torch.einsum("rkl,rlk->r", L, JVJ)  # n tr B_i
    ok = (den > 0) & (tr > 0)
    share = num / (den * tr).clamp_min(1e-300)
    return torch.where(ok, h * share, torch.full_like(den, math.nan))


# Relative eigenvalue below which a direction of a record's loss Hessian L_i does not count in
# rank(L_i) (the per-direction leverage): above float64 rounding, not always above float32's (a
# 2-class softmax evaluated in float32 reads its null eigenvalue up to 3e-6 of the largest at
# logits of order 1, more for confident records, whose L is then rounding altogether; mc21: 19
# of 300 records of a class-weighted float32 closure counted rank 2, the figure 3e-6 relative
# from float64's)
LOSS_RANK_RTOL = 1e-6


# Per-sample gradient sd, relative to the largest median sd of a parameter of the same module,
# below which a coordinate's gradients are rounding (in units of the compute dtype's eps, at most
# ROUNDING_GRADIENT_MAX): a bias before a normalisation (InstanceNorm, LayerNorm over its
# channels) cancels exactly, and its float64 gradients (~1e-16 of the weights') standardised by
# their own sd read as a full-size influence (+3% to +19% on a Conv1d + InstanceNorm model). The
# cap keeps float32 passes (1e3 eps = 1.2e-4) from taking a bias under inputs of magnitude ~1e4
# (its gradient 1e-4 of its weight's) for rounding.
ROUNDING_GRADIENT_EPS = 1e3
ROUNDING_GRADIENT_MAX = 1e-5
# The module's scale is a high quantile of its parameters' sd, not their median: weight decay can
# collapse most hidden units of a layer to an optimizer's residue (~1e-7; fu26: 5 of 8 GELU units),
# whose median then read as the scale and kept their residue-sized gradients as full influences
# (diagonal estimator: unquantized leakage +18% to +57%). A module whose units all collapsed is
# measured against the largest module's scale times ROUNDING_MODULE_SHARE (inputs on a 1e-5
# scale keep their weights: their sd is above 1e-5 x 0.1 of the others').
ROUNDING_REFERENCE_QUANTILE = 0.9
ROUNDING_MODULE_SHARE = 0.1
# ... and below this many of the stored weights' eps (a float32 model computed in float64: its
# collapsed units' residue is its own rounding), at most STORED_ROUNDING_MAX (inputs on a 1e-5
# scale are not rounding; the exact sandwich's Sigma floor is the same 1e-6 in sd)
STORED_ROUNDING_FACTOR = 10.0
STORED_ROUNDING_MAX = 1e-6


def _without_rounding_gradients(v: Tensor, names: list[str], offsets: dict[str, tuple[int, int]], eps: float,
                                diagnostics: dict[str, Any], stored_eps: float = 0.0,
                                in_place: bool = False) -> Tensor:
    """``V_jj`` for standardising the influences ``w_j = -(g_j - g_bar_j) / sqrt(V_jj)``, with
    ``+inf`` (so ``w_j = 0``: no influence) where the per-sample gradient sd is below
    ``min(ROUNDING_GRADIENT_EPS * eps, ROUNDING_GRADIENT_MAX)`` times the module's scale: the
    largest ``ROUNDING_REFERENCE_QUANTILE`` quantile of the sd among the parameters of the same
    module, and at least ``ROUNDING_MODULE_SHARE`` times the largest module's (a module whose units
    all collapsed). ``stored_eps``: the rounding of the model's stored weights (float32: 1.2e-7),
    below ``min(STORED_ROUNDING_FACTOR * stored_eps, STORED_ROUNDING_MAX)`` of the scale whatever
    the passes' dtype (an optimizer's residue of a collapsed unit, ~1e-7 of the live weights).
    ``diagnostics["rounding_gradient_weights"]`` counts them. ``in_place``: ``v`` itself is
    returned, modified (the float32 state of a large model: no copy of size ``d``)."""
    by_module: dict[str, float] = {}
    for k in names:
        mod = k.rsplit(".", 1)[0] if "." in k else ""
        sd = v[slice(*offsets[k])].clamp_min(0.0).sqrt_()
        # the nearest-rank quantile (an order statistic, no sort of the whole parameter): on the
        # CPU by a partition of this copy in place (es33: kthvalue copied it again with int64
        # indices, 12 bytes per weight of fresh memory; the same value)
        q = _kth_smallest(sd, max(1, math.ceil(ROUNDING_REFERENCE_QUANTILE * sd.numel()))) if sd.numel() else 0.0
        by_module[mod] = max(by_module.get(mod, 0.0), q)
        del sd
    top = max(by_module.values(), default=0.0)
    by_module = {m: max(r, ROUNDING_MODULE_SHARE * top) for m, r in by_module.items()}
    rel = max(min(ROUNDING_GRADIENT_EPS * eps, ROUNDING_GRADIENT_MAX),
              min(STORED_ROUNDING_FACTOR * stored_eps, STORED_ROUNDING_MAX))
    out = v if in_place else v.clone()
    flagged = 0
    for k in names:
        mod = k.rsplit(".", 1)[0] if "." in k else ""
        if not by_module[mod] > 0:
            continue
        a0, e0 = offsets[k]
        # by sub-blocks (es33: no [numel] temporaries); each block's flags read v before its own
        # write, as the whole-parameter where did
        for a in range(a0, e0, FINALIZE_SUB_CHUNK):
            sl = slice(a, min(a + FINALIZE_SUB_CHUNK, e0))
            low = v[sl].clamp_min(0.0).sqrt_() <= rel * by_module[mod]
            c = int(low.sum())
            if c:
                out[sl].masked_fill_(low, math.inf)
                flagged += c
    diagnostics["rounding_gradient_weights"] = flagged
    return out


def _kth_smallest(x: Tensor, k: int) -> float:
    """``float(x.kthvalue(k).values)`` of a 1-D tensor the caller no longer needs: on the CPU a
    partition of ``x`` in place (reordering it), elsewhere ``kthvalue``. NaN sorts last in both."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return float(x.kthvalue(k).values)
    a = x.numpy()
    a.partition(k - 1)
    return float(a[k - 1])


# Hessian-diagonal entries within this fraction of the largest below 0 are rounding of 0
_DIAGONAL_ROUNDING = 1e-12
# A Hutchinson Hessian diagonal is an estimate from random probes: an entry reads negative
# curvature only below -z of its own standard error, z the normal quantile at this family-wise
# false-alarm rate over the d entries (Bonferroni; _sampling_z).
HUTCHINSON_FALSE_ALARM = 0.01


def _sampling_z(d: int) -> float:
    """``z`` with ``P(N(0, 1) < -z) = HUTCHINSON_FALSE_ALARM / d``: 3.7 for 100 entries, 5.6 for 10^6."""
    return NormalDist().inv_cdf(1.0 - HUTCHINSON_FALSE_ALARM / max(d, 1))


def _curvature_ratios(h: Tensor, v: Tensor) -> Tensor:
    """``H_jj / V_jj`` where both are positive, ``-|H_jj| / V_jj`` where ``H_jj < 0`` (``NaN`` where
    ``V_jj`` or ``H_jj`` is 0): unit-free (both scale as ``c_j^2`` when ``theta_j -> theta_j / c_j``);
    :func:`_curvature_ratio_reference` sets the diagonal floor's scale from them."""
    ok = (v > 0) & (h != 0)
    return torch.where(ok, h / v.clamp_min(1e-300), torch.full_like(h, math.nan))


#: The quantile of the positive curvature ratios ``H_jj / V_jj`` that scales the diagonal floor.
CURVATURE_RATIO_QUANTILE = 0.05


def _curvature_ratio_reference(r: Tensor) -> float:
    """The :data:`CURVATURE_RATIO_QUANTILE` quantile (lower order statistic) of the positive
    ratios ``r`` (:func:`_curvature_ratios`; of ``|r|`` when none is positive), ignoring ``NaN``;
    0 when there are none.

    A low quantile, not the maximum or the median: a class the model gives probability
    ``p ~ 0`` has ``H ~ p x^2`` and ``V ~ p^2 x^2`` on its head row, so ``H/V ~ 1/p`` (1e22 at
    p = 1e-22). A floor scaled by the maximum rose above every other weight's curvature and
    shrank every sigma (1e-13 of itself; at p = 2e-10, 5x and int8 leakage 5% low);
    one scaled by the median did the same when such rows held most weights (a 100-class softmax
    with 10 classes present: sigma 1.5e-8 of itself, int8 leakage 0.0400 for 0.0721)."""
    # one filtered copy (NaN compares False): at 1e8 weights each copy is 400 MB
    pos = r[r > 0]
    r = pos if pos.numel() else r[r < 0].abs()
    if not r.numel():
        return 0.0
    k = 1 + int(CURVATURE_RATIO_QUANTILE * (r.numel() - 1))
    # the k-th smallest by a partition of that copy in place: Tensor.kthvalue copied it again
    # with int64 indices (12 bytes per weight: 1.2 GB of the 1e8 estimation's peak, mm32)
    if r.device.type != "cpu":
        return float(r.kthvalue(k).values)
    a = r.numpy()
    a.partition(k - 1)
    return float(a[k - 1])


def top_curvature(H: Tensor) -> float:
    """A positive lower bound of the largest eigenvalue of a symmetric ``H [d, d]`` where one
    exists (its largest diagonal entry), else that eigenvalue: what :func:`check_curvature`
    needs, with ``eigvalsh`` only when no diagonal entry is positive."""
    top = float(H.diagonal().max())
    return top if top > 0 else float(torch.linalg.eigvalsh(0.5 * (H + H.T)).max())


def check_curvature(h_max: float, varies: bool) -> None:
    """Refuse a training objective with no positive curvature in any assessed weight while the
    records' gradients vary: a loss with no second derivative in the outputs (L1 / mean absolute
    error, hinge) has a Gauss-Newton Hessian of 0 on any model and an exact one of 0 on a model
    linear in its weights. The sandwich ``H^{-1} V H^{-1}`` then does not exist: the diagonal
    estimator floored ``H_jj`` at 1e-300 and read every scheme at the unquantized leakage (int2 =
    int8 = float, no warning; a 6-16-1 tanh MLP under the Gauss-Newton diagonal, the "auto" choice
    above 2,000 weights: 0.1335 for all three); the exact one failed in ``linalg.eigh`` or said no
    weight moves the loss.

    Args:
        h_max: the largest eigenvalue of the objective's Hessian (weight decay included), or
            the largest diagonal entry where only the diagonal is known.
        varies: some record's gradient differs from the others' (else the sigma-0 refusal of
            ``assess`` names its own causes).

    Raises:
        ValueError: no positive curvature; names the loss kinds and the fix.
    """
    if not varies or h_max > 0:
        return
    raise ValueError(
        "the training objective has no positive curvature in the assessed weights (Hessian "
        f"{'0' if h_max == 0 else 'with no positive eigenvalue'}) although the records' gradients vary: "
        "a loss with no second derivative in the model's outputs (L1 / mean absolute error, hinge) has a "
        "Gauss-Newton Hessian of 0 on any model, and an exact Hessian of 0 on a model linear in its "
        "weights; the M-estimator analysis (the sandwich H^-1 V H^-1 of method.md) needs curvature: "
        "assess a smooth loss (F.huber_loss or F.smooth_l1_loss in place of L1, MSE, a logistic loss), "
        "or the weight decay the training used (weight_decay=) if it had one")


def _diagonal_sigma(h: Tensor, v: Tensor, n: int, rel_floor: float) -> Tensor:
    """``sigma_j = sqrt(V_jj / n) / max(H_jj, floor_j)`` with ``floor_j = rel_floor V_jj``:
    a weight's curvature is floored relative to its own gradient variance (``rel_floor =
    damping * q_0.05(H_kk / V_kk)``), so a change of units of one weight moves no other
    weight's floor (relative to ``max |H_jj|`` in parameter units, inputs on a 1e-5 scale
    floored the weights' curvature against the bias's and shrank their sigma 100x)."""
    v = v.clamp_min(0.0)
    den = torch.maximum(h, (rel_floor * v).clamp_min(1e-300))
    # sqrt(v) / den, not sqrt(v / den^2): den^2 underflows where both are tiny
    return torch.where(v > 0, v.sqrt() / (math.sqrt(n) * den), torch.zeros_like(v))


def _finalize_blocks(d: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """``(a, b, [(s, e), ...])``: the :data:`FINALIZE_CHUNK` blocks of ``range(d)``, each with
    its :data:`FINALIZE_SUB_CHUNK` sub-blocks (:meth:`MomentAccumulator._finalize_lean`)."""
    for a in range(0, d, FINALIZE_CHUNK):
        b = min(a + FINALIZE_CHUNK, d)
        yield a, b, [(s, min(s + FINALIZE_SUB_CHUNK, b)) for s in range(a, b, FINALIZE_SUB_CHUNK)]


def _leverage_terms(h_data: Tensor, h: Tensor, live: Tensor | None = None) -> Tensor:
    """The per-weight terms of :func:`leverage_trace` (its sum is the trace)."""
    ok = (h > 0) & (h_data > 0)
    if live is not None:
        ok &= live
    r = torch.where(ok, h_data / torch.where(ok, h, torch.ones_like(h)), torch.zeros_like(h))
    return r.clamp(max=1.0)


def leverage_trace(h_data: Tensor, h: Tensor, live: Tensor | None = None) -> float:
    """``sum_j clamp(H_data_jj / H_jj, 0, 1)``: the diagonal approximation of the effective
    dimension ``tr(H^{-1} H_data)`` (method.md section 4, "Finite-sample (leverage) correction").

    Args:
        h_data: ``[d]`` the data part of the Hessian diagonal (mean loss, no weight decay).
        h: ``[d]`` the objective's (``h_data`` plus the weight decay ``lambda_j``).
        live: ``[d]`` bool, the weights that count (default all): the diagonal estimator leaves
            out those whose per-sample gradients are rounding (a bias cancelled by a
            normalisation: no influence, and no degree of freedom the data fits).

    Returns:
        The count (float; weights with ``H_jj <= 0`` or ``H_data_jj <= 0`` count 0, each weight
        at most 1). For a positive semi-definite ``H_data`` (a Gauss-Newton Hessian) and
        ``H = H_data + diag(lambda)`` it is at least the exact trace (Schur-Horn: the diagonal
        of ``diag(lambda)^{-1/2} H_data diag(lambda)^{-1/2}`` is majorised by its eigenvalues,
        and ``x / (x + 1)`` is concave), equal without weight decay up to the rank: ``d``
        against ``rank(H_data)``.
    """
    return float(_leverage_terms(h_data, h, live).sum())


def diagonal_leverage(trace: float, n: int, rank: float, diagnostics: dict[str, Any], *,
                      correct: bool = True) -> float:
    """The diagonal estimator's mean leverage per loss direction ``h_bar = T / (n rank(L))``,
    capped at :data:`LEVERAGE_CAP` (method.md section 4, "Finite-sample (leverage) correction").

    Args:
        trace: ``T`` of :func:`leverage_trace` over the assessed weights.
        n: training records; ``rank``: the mean ``rank(L_i)`` (loss directions per record).
        diagnostics: gets ``mean_leverage`` (``T / n``: the mean leverage per record, the exact
            estimator's ``mean h_i``), ``leverage_per_direction`` (``h_bar``, before the cap),
            ``leverage_directions`` (``rank``), ``leverage_trace`` (``T``), ``leverage_estimate``
            (``"diagonal"``: the approximation), ``leverage_capped`` (1 where ``h_bar`` was capped)
            and ``leverage_correction`` (whether applied).
        correct: whether the correction is applied.

    Returns:
        The capped ``h_bar`` where applied (``V_jj / (1 - h_bar)``: ``sigma`` and the standardised
        influences times ``1 / sqrt(1 - h_bar)``), else ``0.0``.
    """
    per = trace / (n * max(rank, 1.0))
    capped = per > LEVERAGE_CAP
    diagnostics.update(mean_leverage=trace / n, leverage_per_direction=per, leverage_directions=rank,
                       leverage_trace=trace, leverage_estimate="diagonal", leverage_capped=int(capped),
                       leverage_correction=bool(correct))
    return min(per, LEVERAGE_CAP) if correct else 0.0


def _influence_scale(hbar: float) -> float:
    """``1 / sqrt(1 - h_bar)``: what the diagonal estimator's correction puts on sigma and on
    the standardised influences (1.0 at ``h_bar = 0``)."""
    return 1.0 / math.sqrt(1.0 - hbar) if hbar > 0 else 1.0


def _uniform_leverage(hbar: float, records: int) -> Tensor | None:
    """``[R]`` every stored record's narrowing at the mean leverage per direction (the spread
    term, method.md section 4), or ``None`` where no correction was applied."""
    return torch.full((records,), hbar, dtype=torch.float64) if hbar > 0 else None


def diagonal_compute(h: Tensor, v: Tensor, g_mean: Tensor, G: Tensor | None, n: int, damping: float,
                     diagnostics: dict[str, Any], v_centring: Tensor | None = None,
                     h_error: Tensor | None = None, precision: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """The diagonal sandwich (method.md section 4): ``sigma_j^2 = V_jj / (n H_jj^2)``.

    Args:
        h: ``[d]`` Hessian diagonal of the training objective (weight decay included).
        v: ``[d]`` per-sample gradient variances ``V_jj``; ``g_mean``: ``[d]`` mean gradient.
        G: ``[R, d]`` per-sample gradients of the kept records, or ``None`` (not stored).
        n: records; ``damping``: floor of ``H_jj`` relative to ``V_jj q_0.05(H_kk / V_kk)``
            (:func:`_curvature_ratio_reference`).
        diagnostics: updated in place with the diagonal's range.
        v_centring: ``V_jj`` standardising ``w`` (default ``v``; ``+inf`` gives ``w_j = 0``).
        h_error: ``[d]`` the standard error of each ``h_j`` where ``h`` is estimated (Hutchinson's
            probes; ``None``: exact to rounding). ``negative_curvature`` then reads only entries
            below ``-z h_error_j`` too (:func:`_sampling_z`: a probe's noise is no curvature).
        precision: H's relative precision ``p`` (the stored weights' eps or the gradient norm
            ratio): ``negative_curvature`` reads entries below ``-max(1e-12, p) max|h|``,
            ``curvature_unresolved`` the rest below ``-1e-12 max|h|`` at ``p`` above
            :data:`NEGATIVE_CURVATURE_PRECISION_MAX` (:func:`curvature_sign`, as the exact sandwich).

    Returns:
        ``sigma [d]`` (parameter units) and ``w = -(g - g_bar) / sqrt(V_jj)`` ``[R, d]`` (the
        sign of ``psi = -H^{-1} g``), or ``None`` without ``G``.
    """
    neg = int((h <= 0).sum())
    # a zero diagonal (an unused embedding row, a dead unit) is flat, not negative curvature; an
    # entry off the stationary point within H's precision is no evidence of a saddle (ln43: the
    # diagonal read 1e-12 alone, where the exact sandwich reads p)
    seen = h if h_error is None else h[h < -_sampling_z(h.numel()) * h_error.to(h)]
    diagnostics.update(
        hessian_min_diagonal=float(h.min()), hessian_max_diagonal=float(h.max()),
        **curvature_sign(float(seen.min()) if seen.numel() else math.inf, float(h.abs().max()) if h.numel() else 0.0,
                         _DIAGONAL_ROUNDING, precision),
        nonpositive_hessian_diagonal=neg,
    )
    # float32 ratios, as the chunked finalize keeps them: the same median, bit for bit
    sigma = _diagonal_sigma(h, v, n, damping * _curvature_ratio_reference(_curvature_ratios(h, v).float()))
    vc = v if v_centring is None else v_centring
    w = None if G is None else -(G - g_mean) / vc.clamp_min(1e-300).sqrt()
    return sigma, w


@restores_rng("train_dataloader")
@full_float32
def estimate(
    model: nn.Module,
    train_dataloader: Iterable,
    loss_fn: LossFn,
    *,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> Estimate:
    """Stream the training records once and estimate ``sigma`` and ``w`` (method.md section 4).

    A thin loop over :class:`MomentAccumulator` (``update`` per batch, then ``finalize``).
    Consecutive loader batches of the same layout are concatenated up to
    :attr:`MomentAccumulator.records_per_update` records before ``update``
    (:func:`~mis_lightning.estimation.batching.merge_batches`): the same records and sums,
    fewer per-batch costs.

    Args:
        model: the trained model (never modified).
        train_dataloader: iterable of training batches (every record once).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample data losses.
        progress: called with the number of records processed after each batch.
        options: the keyword options of :class:`MomentAccumulator` (declared there once; the
            record selection is always by content hash here):
        param_names: parameters to assess (default: every parameter with ``requires_grad``).
        mode: ``"exact"``, ``"diagonal"`` or ``"auto"`` (by estimated cost: exact for dense
            models up to 2,000 parameters, see :func:`choose_estimator`).
        hessian: diagonal mode's Hessian: ``"exact"``, ``"ggn"``, ``"ggn_mc"`` (sampled-label
            Monte Carlo Gauss-Newton, its error in ``diagnostics``), ``"hutchinson"``, ``"auto"``.
        ggn_mc_samples: sampled labels per record for ``hessian="ggn_mc"``.
        weight_decay: L2 penalty coefficient of the training objective
            ``mean(loss) + weight_decay / 2 * |theta|^2`` (added to ``H``), or
            ``{parameter name: coefficient}`` (parameters not named: 0).
        num_records: records whose influences are kept: the ``num_records`` smallest content
            hashes (:func:`record_keys`), so the same records whatever the loader's order.
        batch_fn: ``batch -> (inputs, targets)``.
        hutchinson_probes: Rademacher probes per batch for ``hessian="hutchinson"``.
        damping: relative damping added to ``H`` when it is not positive definite.
        budget: floats held at once in per-sample buffers (memory bound).
        dtype: compute dtype (default float64 up to 10^5 parameters, float32 above; the
            diagonal estimator's per-layer passes: float64 up to 10^4, float32 above, summed
            in float64).
        generator: random stream of the Hutchinson probes; its seed (read, not drawn from) seeds
            the sampled labels, each record's a hash of its content key, the seed and the draw
            index (:mod:`~mis_lightning.estimation.record_draws`).
        use_factors: use the factored path for ``nn.Linear`` layers (same numbers, much
            faster; see ``linear_factors``) where the model allows it.

    Raises:
        TypeError: an option :class:`MomentAccumulator` does not take, or one it sets itself.
        ValueError: as :class:`MomentAccumulator` (bad options, non-per-sample losses, NaN).
    """
    fixed = {"selection", "pytree_records", "n_hint", "program_cls", "ggn_available"} & set(options)
    if fixed:
        raise TypeError(f"estimate() does not take {sorted(fixed)}: they are MomentAccumulator's own")
    acc = MomentAccumulator(model, loss_fn, selection="hash", pytree_records=True,
                            n_hint=_dataset_size(train_dataloader), **options)
    if items_are_batches(train_dataloader) and "auto" in acc._request[:2]:
        log.warning("estimation: train_dataloader %s; estimation='auto' assumes %s training records to choose its "
                    "estimator",
                    UNKNOWN_RECORDS_SOURCE, f"{N_ASSUMED:,}")
    log.info("estimation: %s (%s), d = %d", acc.estimator, acc.reason, acc.d)
    n = 0
    for batch, _ in merge_batches(loader_batches(train_dataloader), lambda: acc.records_per_update):
        n += acc.update(batch)
        if progress is not None:
            progress(n)
    est = acc.finalize()
    if items_are_batches(train_dataloader):
        note_unknown_records(est, acc, f"train_dataloader {UNKNOWN_RECORDS_SOURCE}")
    return est


def _records_per_update(fac: Any, b: int, batch: Any = None, saved: float | None = None) -> int:
    """Records per merged batch of a fast program (:data:`MERGE_MAX_RECORDS`, fewer when its
    per-record taps, measured on a batch of ``b``, would exceed :data:`MERGE_FLOATS`; the factored
    Linear program of a small model :data:`MERGE_SMALL_RECORDS`, :data:`SMALL_MODEL_MERGES`); at least 1.
    The small model's test bounds all an update holds per record, in bytes (float32 floats x 4): the
    batch's ``(inputs, targets)`` (``batch``; the merged batch is held, concatenated and cast),
    the forward's ``saved`` bytes per record (``FactoredProgram.saved_bytes``: the activations of
    every layer, those not assessed included; a frozen 8,192-wide layer before a 16-input assessed
    head held 2048 x 16k floats, +256 MB against +32 MB at 512 records) and the taps, together within
    :data:`MERGE_SMALL_FLOATS` x 4 bytes x :data:`MERGE_SMALL_RECORDS` (``saved`` ``None``: not
    measured, no small merges)."""
    cap = MERGE_MAX_RECORDS
    if isinstance(fac, tuple) and isinstance(fac[0], _BatchTaps):  # the per-layer program's taps
        floats = fac[0].numel()
    else:  # the factored Linear path: per-record layer inputs and output gradients [B, width]
        taps = [t for t in torch.utils._pytree.tree_leaves(fac) if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[0] == b]
        floats = sum(t.numel() for t in taps)
        held = sum(t.numel() * t.element_size() for t in taps) + sum(
            t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(batch)
            if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == b)
        if SMALL_MODEL_MERGES and saved is not None \
                and (held / max(b, 1) + saved) * MERGE_SMALL_RECORDS <= 4 * MERGE_SMALL_FLOATS:
            cap = max(cap, MERGE_SMALL_RECORDS)
    return max(1, min(cap, int(MERGE_FLOATS // max(floats / max(b, 1), 1.0))))


def _dataset_size(loader: Any) -> int | None:
    """The training records ``loader`` holds, when known before the pass: ``len(loader.dataset)``
    for a loader of a sized dataset of records; for a list or tuple of batches (held in memory) the
    sum of their record counts (:func:`_listed_records`); else ``None`` (no length, an iterable,
    or items that are whole batches: :func:`~.batching.items_are_batches`)."""
    if isinstance(loader, (list, tuple)):
        return _listed_records(loader)
    if items_are_batches(loader):
        return None
    try:
        return len(loader.dataset)
    except Exception:
        return None


def _listed_records(batches: list | tuple) -> int | None:
    """Records of a list of batches: each batch's leading dimension as the estimation pass reads it
    (:func:`~.records.batch_size_of`: its first tensor leaf's rows), summed; ``None`` when a batch
    holds no tensor with a leading dimension (the pass then counts the records as it reads them).
    It sets the K-FAC sample's rate and ``"auto"``'s cost, as ``len(dataset)`` does for a
    DataLoader. A count off from the records read (a ``batch_fn`` that changes the rows) samples
    more or fewer records than the cap, still by content; past the per-process ceiling the report
    says the figure depends on the order (``kron_sample.sample_truncated``, ``kfac_order_dependent``)."""
    total = 0
    for batch in batches:
        leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
        if not leaves or leaves[0].dim() == 0:
            return None
        total += batch_size_of(batch)
    return total or None


# Floats of the batched intermediates one exact-Hessian chunk may hold: the d tangents of the
# forward-over-reverse Hessian are taken this many at a time (all d at once held d copies of
# every activation: a 835-weight CNN on a batch of 128 16x16 images asked for 26 GB)
HESSIAN_CHUNK_FLOATS = 1 << 27  # 1 GiB in float64
# forward-over-reverse holds about this many floats per tangent and forward intermediate
# (the tangent, the saved activations of the reverse pass and its tangent)
_HESSIAN_FLOATS_PER_ACTIVATION = 4


class _CountFloats(TorchDispatchMode):
    """Counts the floating elements every op of a forward pass produces."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.total += t.numel()
        return out


def hessian_chunk(f: Callable[[Tensor], Tensor], flat0: Tensor, budget: int = HESSIAN_CHUNK_FLOATS) -> int:
    """Tangents per chunk of the exact Hessian of ``f`` at ``flat0`` ``[d]``: the floats of one
    forward pass's intermediates (counted on one evaluation without grad) times
    ``_HESSIAN_FLOATS_PER_ACTIVATION`` per tangent within ``budget`` floats; at least 1."""
    counter = _CountFloats()
    with torch.no_grad(), counter:
        f(flat0)
    per_tangent = _HESSIAN_FLOATS_PER_ACTIVATION * max(counter.total, 1)
    return int(max(1, min(flat0.numel(), budget // per_tangent)))


# Second derivatives in the parameters (the exact Hessian, the records' exact curvature): True
# (default) tries forward-over-reverse first (jvp of the gradient); False goes reverse-over-reverse
# (vjp of it, the fallback's form): the same steady-state cost on the small models that choose
# these estimators, without torch's first forward-AD use (~0.3-0.4 s CPU once per process: its jvp
# decompositions compiled with TorchScript). The matrices agree to rounding (1e-10 of the largest
# entry; sigma within 1e-14 - 1.3e-9 relative), but an ill-posed fit's floored directions amplify
# that rounding: the class-weighted fit of tests/test_ill_posed_fits.py read a floor sensitivity of
# 1.6% instead of 8.5% and lost its "unstable figures" warning, so forward stays the default
# (docs/benchmarks.md, pf29).
HESSIAN_FORWARD_AD = True


def _forward_ad_first(program: LossProgram) -> bool:
    """Whether second derivatives try forward-over-reverse first (:data:`HESSIAN_FORWARD_AD`),
    except for a model with recurrent layers (``program.looped``): there torch's first forward-AD
    pass through the recurrent kernel cost ~5 s (a 3-unit LSTM, one core, once per process) and
    every later one ~2x reverse-over-reverse (docs/benchmarks.md, "rn43"); and except for a
    program whose forward-over-reverse products disagreed with reverse-over-reverse ones
    (:func:`_forward_ad_agrees`)."""
    return HESSIAN_FORWARD_AD and not getattr(program, "looped", False) \
        and not getattr(program, "forward_ad_wrong", False)


def _forward_ad_agrees(program: LossProgram, forward: Tensor, reverse: Callable[[], Tensor]) -> bool:
    """Once per program (its first forward-over-reverse result, ``forward``): whether it equals the
    reverse-over-reverse one (``reverse()``, to 1e-8 float64 / 1e-4 float32 of the largest entry);
    where not, ``program.forward_ad_wrong`` is set and every later second derivative of the program
    is reverse-over-reverse (:func:`_forward_ad_first`). Forward AD is blind to ``torch.no_grad``:
    a loss whose target is computed under it (a teacher's or a copy's output, ``with
    torch.no_grad(): t = model(x_aug)``) is a constant to the per-sample gradients but its tangent
    still flows, a Hessian that can be symmetric and wrong (a two-call hook's leverages
    2.9% off their ``.detach()`` twin's; the symmetry check saw nothing). Where ``reverse()`` raises
    (torch has no reverse-over-reverse there, e.g. ``F.layer_norm`` with a bias only) the forward
    result stands, unchecked."""
    if getattr(program, "forward_ad_checked", False):
        return not getattr(program, "forward_ad_wrong", False)
    program.forward_ad_checked = True
    try:
        rev = reverse().to(forward.dtype)
    except (RuntimeError, NotImplementedError) as exc:  # no reverse-over-reverse here (F.layer_norm's bias
        log.info("estimation: forward-over-reverse unchecked (%s)", exc)  # alone): forward, as before
        return True
    tol = (1e-8 if forward.dtype == torch.float64 else 1e-4) * max(float(rev.abs().max()) if rev.numel() else 0.0,
                                                                    1e-30)
    if bool(((forward - rev).abs() > tol).any()):
        program.forward_ad_wrong = True
        log.info("estimation: forward-over-reverse second derivatives disagree with reverse-over-reverse "
                 "(e.g. a target computed under torch.no_grad): reverse-over-reverse from here on")
        return False
    return True


def _batch_hessian(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                   offsets: dict[str, tuple[int, int]], d: int) -> Tensor:
    """Hessian ``[d, d]`` of the batch's summed loss in the flattened parameters, its tangents
    :func:`hessian_chunk` at a time (memory bounded by ``HESSIAN_CHUNK_FLOATS``)."""
    shapes = {k: program.params[k].shape for k in names}
    flat0 = torch.cat([program.params[k].reshape(-1) for k in names])

    def f(flat: Tensor) -> Tensor:
        params = {k: flat[slice(*offsets[k])].reshape(shapes[k]) for k in names}
        return program.loss_fn(program.outputs(params, inputs), targets).sum()

    # The inner derivative is torch.func.grad, not jacrev (torch.func.hessian is jacfwd(jacrev)):
    # torch 2.13's second derivatives of F.layer_norm with a weight are wrong when the inner one is
    # a vmapped vjp (jacrev) and right through grad (norm_derivatives' docstring; lf41)
    def forward_over_reverse() -> Tensor:
        if chunk >= d:
            return torch.func.jacfwd(torch.func.grad(f))(flat0)
        grad_f = torch.func.grad(f)
        eye = torch.eye(d, dtype=flat0.dtype, device=flat0.device)

        def column(v: Tensor) -> Tensor:  # H v
            return torch.func.jvp(grad_f, (flat0,), (v,))[1]

        # rows j of the stack are H e_j: the transpose of torch.func.hessian's layout
        return torch.cat([torch.func.vmap(column)(eye[a: a + chunk]) for a in range(0, d, chunk)]).T

    # Forward-over-reverse first when HESSIAN_FORWARD_AD; reverse-over-reverse otherwise and
    # where an op has no forward AD (EmbeddingBag, weight_norm's kernel) or gets it wrong: torch's forward AD of an
    # embedding ignores padding_idx, which made the Hessian asymmetric (and a padding row read as
    # negative curvature), so an asymmetric result is recomputed
    H = None
    if _forward_ad_first(program):
        load_forward_ad_decompositions()  # torch's import notice filtered (ux48)
    with program.second_derivatives():  # the forward as these passes evaluate it, chunk included
        chunk = hessian_chunk(f, flat0)
        try:
            H = forward_over_reverse() if _forward_ad_first(program) else None
        except (NotImplementedError, RuntimeError) as exc:
            if "forward ad" not in str(exc).lower() and "forward-mode" not in str(exc).lower():
                raise
        if H is not None:
            scale = float(H.abs().max()) if H.numel() else 0.0
            tol = (1e-8 if H.dtype == torch.float64 else 1e-4) * max(scale, 1e-30)
            if bool(((H - H.T).abs() > tol).any()):
                H = None
        if H is not None:  # (once: two reverse-over-reverse products H v, v random, against H's)
            v = torch.randn(2, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(flat0)

            def reverse_products() -> Tensor:
                back = torch.func.vjp(torch.func.grad(f), flat0)[1]
                return torch.stack([back(u)[0] for u in v]).T

            if not _forward_ad_agrees(program, H.reshape(d, d) @ v.T, reverse_products):
                H = None
        if H is None:
            with ignoring(("There is a performance drop", Warning)):  # functorch's "no batching rule" notes
                H = torch.func.jacrev(torch.func.grad(f), chunk_size=chunk if chunk < d else None)(flat0)
    return H.to(torch.float64).reshape(d, d)


def _late(shape: OutputShape | None) -> tuple[str, ...]:
    """The output leaves put back after the first batch (:func:`~.output_reads.read_later`)."""
    return shape.late if isinstance(shape, OutputTree) else ()


def _factor_width(width: int, d: int) -> int | None:
    """``K`` of a stored row ``[g (d) | Q or J (K d) | S or L (K^2)]`` of ``width`` floats; ``None``
    where the width is not of that form (no factors kept)."""
    extra = width - d
    if extra <= 0:
        return None
    k = round((math.sqrt(d * d + 4 * extra) - d) / 2)
    return k if k * d + k * k == extra else None


def _widened_rows(chunks: list[Any], d: int) -> list[Any]:
    """Stored per-record rows (``rec_grad`` chunks ``[m, d + K d + K^2]``) of several ``K`` as rows
    of the largest: each record's ``Q_i`` (or ``J_i``) gets rows of zeros and its ``S_i`` (or
    ``L_i``) zero rows and columns, which leave ``Q_i' S_i Q_i`` (``J_i' L_i J_i``) and the span
    of its rows -- the leverage's projector, method.md section 4 "Per-record factors" -- as they
    were. Rows of one width (or not of that form) are returned as they are.

    Several widths arise where records' factors were taken in different output layouts, each
    holding every output leaf that record's loss reads: a leaf the first batch dropped and a later
    one read (:func:`~.output_reads.read_later`), or DDP processes whose first batches sorted the
    leaves apart (their rows gathered at their own widths by the sync's ragged path); before,
    ``torch.cat`` failed on them, or, of one ``K``, nothing noticed."""
    ks = [_factor_width(int(t.shape[1]), d) if isinstance(t, Tensor) and t.dim() == 2 else None for t in chunks]
    if len({*ks}) < 2 or None in ks:
        return chunks
    top, out = max(k for k in ks if k is not None), []
    for t, k in zip(chunks, ks):
        if k == top:
            out.append(t)
            continue
        m = t.shape[0]
        q = t[:, d: d + k * d].reshape(m, k, d)
        s = t[:, d + k * d:].reshape(m, k, k)
        out.append(torch.cat([t[:, :d], torch.nn.functional.pad(q, (0, 0, 0, top - k)).reshape(m, -1),
                              torch.nn.functional.pad(s, (0, top - k, 0, top - k)).reshape(m, -1)], 1))
    return out


def _record_curvature(program: LossProgram, inputs: Any, targets: Any, J: Tensor, names: list[str],
                      offsets: dict[str, tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Each record's curvature for the leverages (method.md section 4, "Per-record factors"): its
    exact loss Hessian ``∇²ℓ_i`` on the span of its output gradients, ``P_i ∇²ℓ_i P_i`` with
    ``P_i`` the projector onto the rows of ``J_i``, as the factor pair ``(Q_i, S_i)``:
    ``Q_i [K, d]`` an orthonormal basis of that span (right singular vectors of ``J_i``; rows of
    zeros for directions below ``sqrt(eps)`` of the largest singular value, e.g. a softmax's
    common shift) and ``S_i = Q_i ∇²ℓ_i Q_i' [K, K]`` (``K`` per-record Hessian-vector products,
    :meth:`LossProgram.record_hessian_products`), so that ``Q_i' S_i Q_i = P_i ∇²ℓ_i P_i``.

    Unlike the Gauss-Newton factor ``J_i' L_i J_i`` (``L_i`` the loss's Hessian in the model's
    outputs) this is a function of the loss as a function of the parameters: an invertible map
    moved between the end of ``forward`` and the loss (a sigmoid, softmax or tanh) leaves ``P_i``
    and ``∇²ℓ_i`` unchanged, where the Gauss-Newton factor took the loss's curvature in the
    probability (``(y - p)^2 x x'`` for a sigmoid + BCE, against ``p (1 - p) x x'``). Exact
    (``= ∇²ℓ_i``) for models affine in the parameters up to such an output map (GLMs, linear heads
    and probes); for deeper models the curvature off the span (hidden layers' residual-weighted
    second derivatives) is left out, as the Gauss-Newton factor leaves it out. May be indefinite
    (a loss not convex in the outputs, e.g. least squares on a tanh).

    Args:
        J: ``[B, C, d]`` the records' output Jacobians (flattened parameters in ``names`` order).

    Returns:
        ``(Q [B, K, d], S [B, K, K])`` float64, ``K = min(C, d)``.

    Raises:
        RuntimeError / NotImplementedError: the model has no per-record second derivative.
    """
    b = J.shape[0]
    _, sv, Vh = torch.linalg.svd(J, full_matrices=False)  # sv descending [B, K]
    keep = sv > torch.finfo(J.dtype).eps ** 0.5 * sv[:, :1]
    Q = Vh * keep.unsqueeze(-1).to(Vh.dtype)
    k = Q.shape[1]
    dirs = {n: Q[:, :, slice(*offsets[n])].reshape(b, k, *program.params[n].shape) for n in names}

    def curvature(reverse: bool) -> Tensor:
        hv = program.record_hessian_products(inputs, targets, dirs, reverse=reverse)
        HQ = torch.cat([hv[n].reshape(b, k, -1) for n in names], 2)
        return Q @ HQ.transpose(1, 2)

    # Forward-over-reverse first when HESSIAN_FORWARD_AD; reverse-over-reverse otherwise and where
    # forward AD is missing or asymmetric (an embedding's padding_idx, as in _batch_hessian)
    S = None
    try:
        S = curvature(False) if _forward_ad_first(program) else None
    except (NotImplementedError, RuntimeError) as exc:
        if "forward ad" not in str(exc).lower() and "forward-mode" not in str(exc).lower():
            raise
    if S is not None:
        tol = (1e-8 if S.dtype == torch.float64 else 1e-4) * S.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        if bool(((S - S.transpose(1, 2)).abs() > tol).any()):
            S = None
    if S is not None and not _forward_ad_agrees(program, S, lambda: curvature(True)):
        S = None
    if S is None:
        S = curvature(True)
    S = S.to(torch.float64)
    return Q.to(torch.float64), 0.5 * (S + S.transpose(1, 2))


def _batch_gauss_newton(program: LossProgram, inputs: Any, targets: Any, names: list[str], d: int) -> Tensor:
    """Gauss-Newton Hessian ``[d, d]`` of the batch's summed loss, ``sum_r J_r' L_r J_r``, from the
    per-record output Jacobians (first derivatives of the model only)."""
    out_shape = program.output_shape(inputs)
    with ignoring(("There is a performance drop", Warning)):  # functorch's "no batching rule" notes
        out, jac = program.output_jacobians(inputs)
    e, L = program.loss_output_derivatives(out, targets, out_shape or ())
    b, c = out.shape[0], out.reshape(out.shape[0], -1).shape[1]
    J = torch.cat([jac[k].reshape(b, c, -1) for k in names], 2).to(torch.float64)
    return torch.einsum("bcj,bce,bek->jk", J, L.to(torch.float64), J).reshape(d, d)


def parameter_groups(names: list[str]) -> list[list[str]]:
    """The assessed parameters grouped by the module that holds them (``"net.4.weight"`` and
    ``"net.4.bias"``: one group), in ``names`` order."""
    groups: dict[str, list[str]] = {}
    for k in names:
        groups.setdefault(k.rsplit(".", 1)[0] if "." in k else "", []).append(k)
    return list(groups.values())


# A model piecewise linear in each module's weights (convolutions, linear layers, BatchNorm in eval
# mode, ReLU, pooling) has outputs affine in any one module's weights: the residual term of its
# Hessian, sum_i sum_c dl_i/do_ic Hess(o_ic), is zero within each module's block.
RESIDUAL_BLOCK_RTOL = 1e-8  # |R_BB v| / |R v| above this on the first batch: the block is not zero


# Tangents per vmapped chunk of the residual term's columns: measured (cn29, one core) 32 at a time
# faster than 64 or all of a module's at once on both benchmark CNNs (the batched intermediates
# stay in cache); the memory bound of hessian_chunk applies below it.
RESIDUAL_TANGENT_CHUNK = 32


def _residual_weights(program: LossProgram, inputs: Any, targets: Any, names: list[str]) -> tuple[Callable[[dict[str, Tensor]], Tensor], Tensor]:
    """``(outputs, e)``: the batch's outputs ``[B, C]`` as a function of the parameters in
    ``names`` (the others held at their values; one batched forward, as the exact Hessian's loss
    takes it) and ``e = dl/do [B, C]`` at the current weights (detached), so that the residual
    term ``R`` of the summed-loss Hessian is the Hessian of ``Phi(theta) = sum(e * outputs(theta))``."""
    base = {k: program.params[k] for k in names}

    layout = program.output_layout  # the outputs the loss reads (output_reads), as the Jacobians see them

    def outputs(params: dict[str, Tensor]) -> Tensor:
        return flat_outputs(program.outputs({**base, **params}, inputs), layout)

    with torch.no_grad():
        raw = program.outputs(base, inputs)
    # dl_i/do_i for every record at once: the gradient of the summed (per-sample) loss in the
    # batched outputs, as the exact Hessian's loss sums them (no per-record loss Hessians)
    e = flat_outputs(torch.func.grad(lambda o: program.loss_fn(o, targets).sum())(raw), layout)
    return outputs, e.detach().to(flat_outputs(raw, layout).dtype)


def _residual_columns(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                      offsets: dict[str, tuple[int, int]], d: int, tangents: Tensor) -> Tensor:
    """``R t_k`` ``[K, d]`` (float64) for tangents ``[K, d]``: the residual term of the batch's
    summed-loss Hessian, ``R = sum_i sum_c e_ic Hess(o_ic)`` with ``e_ic = dl_i/do_ic`` held at
    the current weights, i.e. the Hessian of ``Phi(theta) = sum_i e_i . o_i(theta)`` (second
    derivatives of the model only; ``H = J'LJ + R``, method.md section 4). Forward-over-reverse
    in ``program``'s dtype, :func:`hessian_chunk` tangents at a time."""
    shapes = {k: program.params[k].shape for k in names}
    flat0 = torch.cat([program.params[k].reshape(-1) for k in names])
    outputs, e = _residual_weights(program, inputs, targets, names)

    def phi(flat: Tensor) -> Tensor:
        return (e * outputs({k: flat[slice(*offsets[k])].reshape(shapes[k]) for k in names})).sum()

    grad_phi = torch.func.grad(phi)
    t = tangents.to(flat0.device, flat0.dtype)

    def column(v: Tensor) -> Tensor:
        return torch.func.jvp(grad_phi, (flat0,), (v,))[1]

    load_forward_ad_decompositions()  # torch's import notice filtered (ux48)
    with program.second_derivatives():
        chunk = hessian_chunk(phi, flat0)
        return torch.cat([torch.func.vmap(column)(t[a: a + chunk]) for a in range(0, t.shape[0], chunk)]
                         ).to(torch.float64)


def residual_group_key(group: list[str]) -> str:
    """The name a parameter group (:func:`parameter_groups`) is reported by: its module's
    (``"c1"`` for ``["c1.weight", "c1.bias"]``)."""
    return group[0].rsplit(".", 1)[0] if "." in group[0] else group[0]


def residual_rows_ratios(rows: Tensor, idx: list[Tensor]) -> list[float]:
    """Each block's ``max |(R v)_M| / max |R v|`` from the residual rows ``R v`` ``[2 G, d]`` of two
    tangents per block (``idx[j]``: block ``j``'s coordinates; its tangents rows ``2j, 2j + 1``);
    ``0.0`` where ``R v = 0``. The rows of one batch's ``R`` sum over batches (``R`` is a sum over
    records): the union of several DDP processes' first batches reads the ratios of their sum
    (:func:`~.world_choice.world_residual`)."""
    out = []
    for j, ix in enumerate(idx):
        part = rows[2 * j: 2 * j + 2]
        top = float(part.abs().max()) if part.numel() else 0.0
        out.append(float(part[:, ix].abs().max()) / top if top > 0 else 0.0)
    return out


def residual_block_index(offsets: dict[str, tuple[int, int]], group: list[str]) -> Tensor:
    """A parameter group's coordinates in the flat ``[d]`` vector (int64)."""
    return torch.cat([torch.arange(*offsets[k]) for k in group])


def residual_block_rows(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                        offsets: dict[str, tuple[int, int]], d: int, groups: list[list[str]],
                        drawn: list[list[str]] | None = None) -> tuple[Tensor, list[Tensor]]:
    """``(R v [2 G, d] float64, idx)``: the residual term's rows for two random tangents ``v`` per
    block of ``groups`` (each supported on its block, ``idx[j]`` its coordinates), in one
    forward-over-reverse pass. The tangents are drawn (seed 0, standard normal) for every block of
    ``drawn`` (default ``groups``) in its order and those of ``groups`` used: a block's tangents are
    then the same on every DDP process checking any part of ``drawn`` (the rows of several processes
    sum: :func:`residual_rows_ratios`)."""
    gen = torch.Generator().manual_seed(0)
    span = {residual_group_key(g): residual_block_index(offsets, g) for g in drawn or groups}
    tangents = {key: torch.randn(2, ix.numel(), generator=gen, dtype=torch.float64) for key, ix in span.items()}
    idx = [span[residual_group_key(g)] for g in groups]
    v = torch.zeros(2 * len(groups), d, dtype=torch.float64)
    for j, g in enumerate(groups):
        v[2 * j: 2 * j + 2, idx[j]] = tangents[residual_group_key(g)]
    return _residual_columns(program, inputs, targets, names, offsets, d, v).cpu(), idx


def residual_block_check(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                         offsets: dict[str, tuple[int, int]], d: int, block: list[str]) -> tuple[float, Tensor]:
    """``(ratio, R v)``: ``max |(R v)_B| / max |R v|`` over two random tangents ``v`` supported on
    ``block`` (one module's parameters, ``B``; :func:`residual_block_rows`), and the rows: zero up
    to rounding where the model's outputs are affine in that module's weights (then ``R_BB = 0``; a
    random ``v`` finds a non-zero ``R_BB`` almost surely). Run in ``program``'s dtype (float64 in
    the accumulator)."""
    rows, idx = residual_block_rows(program, inputs, targets, names, offsets, d, [block])
    return residual_rows_ratios(rows, idx)[0], rows


def residual_zero_blocks(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                         offsets: dict[str, tuple[int, int]], d: int, groups: list[list[str]],
                         drawn: list[list[str]] | None = None) -> tuple[list[list[str]], list[float], Tensor]:
    """``(zero, ratios, R v)``: the modules (parameter groups, :func:`parameter_groups`) among ``groups``
    whose own block ``R_MM`` of the residual term is zero on this batch, and each group's
    ``max |(R v)_M| / max |R v|`` over two random tangents ``v`` supported on it, all in one
    forward-over-reverse pass (:func:`residual_block_rows`, tangents drawn over ``drawn``; as
    :func:`residual_block_check` for one module; zero: at most :data:`RESIDUAL_BLOCK_RTOL`), and the
    rows. A module applied twice, or followed by a smooth function of its outputs (a functional tanh),
    is not zero and keeps its own rows in :func:`batch_residual`."""
    if not groups:
        return [], [], torch.zeros(0, d, dtype=torch.float64)
    rows, idx = residual_block_rows(program, inputs, targets, names, offsets, d, groups, drawn)
    ratios = residual_rows_ratios(rows, idx)
    return [g for g, r in zip(groups, ratios) if r <= RESIDUAL_BLOCK_RTOL], ratios, rows


def _residual_module_rows(outputs: Callable[[dict[str, Tensor]], Tensor], e: Tensor, params0: dict[str, Tensor],
                          group: list[str], rows: list[str], chunk: int) -> Tensor:
    """``R[M, rows]`` ``[|M|, |rows|]`` (float64): one module ``M``'s (``group``) columns of the
    Hessian of ``Phi(theta) = sum(e * outputs(theta))`` in the parameters ``rows`` only, by
    forward-over-reverse with tangents on ``M``'s weights alone (``chunk`` of them per vmap; the
    forward before ``M`` carries none, the backward stops below the earliest row's module)."""
    sizes = [params0[k].numel() for k in group]
    at_m = {k: params0[k] for k in group}

    def grad_rows(pm: dict[str, Tensor]) -> Tensor:  # the gradient in the rows only
        wrt = {k: pm.get(k, params0[k]) for k in rows}
        held = {k: t for k, t in pm.items() if k not in wrt}  # M's weights outside the rows
        g = torch.func.grad(lambda p: (e * outputs({**held, **p})).sum())(wrt)
        return torch.cat([g[k].reshape(-1) for k in rows])

    def column(v: Tensor) -> Tensor:  # R[rows, M] v, v on M's weights only
        tangent = {k: t.reshape(params0[k].shape) for k, t in zip(group, torch.split(v, sizes))}
        return torch.func.jvp(grad_rows, (at_m,), (tangent,))[1]

    load_forward_ad_decompositions()  # torch's import notice filtered (ux48)

    m = sum(sizes)
    eye = torch.eye(m, dtype=e.dtype, device=e.device)
    return torch.cat([torch.func.vmap(column)(eye[a: a + chunk]) for a in range(0, m, chunk)]).to(torch.float64)


def batch_residual(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                   offsets: dict[str, tuple[int, int]], d: int, skip: list[str] | None = None, zero_blocks: list[list[str]] | None = None) -> Tensor:
    """The residual term ``R`` ``[d, d]`` (float64) of the batch's summed-loss Hessian
    (:func:`_residual_columns`) from its columns on every parameter outside ``skip`` (one
    module whose own block ``R_BB`` is zero: :func:`residual_block_check`); the rest by
    symmetry (``R_SB = R_BS'``), ``R_BB = 0``. ``skip=None``: every column (no assumption).

    The columns are taken one module ``M`` at a time (its parameters' groups,
    :func:`parameter_groups`, in ``names`` order), by forward-over-reverse of ``Phi`` with
    tangents on ``M``'s weights only (the forward before ``M`` carries no tangent) and the
    gradient taken only in the rows not yet known: ``M``, the modules after it in that order and
    ``skip`` (a row of an earlier module ``K`` is ``R[K, M] = R[M, K]'``, from ``K``'s columns;
    the backward stops where no such row needs it). ``zero_blocks``: modules (parameter groups)
    whose own block ``R_MM`` is zero (checked like ``skip``'s, :func:`residual_block_check`): their
    own rows are left out of their pass (``R_MM = 0``; the last module's pass then needs no backward
    beyond its own output). Every entry computed is the same derivative as the full column's, so
    ``R`` is the same to rounding (within 1e-15 of the largest entry).
    Cost: ``d - |B|`` Hessian-vector products of the batch, each cheaper than the full column's
    (2-4x less CPU on the benchmark CNNs), :data:`RESIDUAL_TANGENT_CHUNK` at a time."""
    skipped = [k for k in names if k in set(skip or ())]
    groups = [g for g in parameter_groups(names) if not set(g) & set(skipped)]
    params0 = {k: program.params[k] for k in names}
    R = torch.zeros(d, d, dtype=torch.float64, device=next(iter(params0.values())).device)
    if not groups:
        return R
    outputs, e = _residual_weights(program, inputs, targets, names)
    # tangents per chunk: the memory bound (one count of the forward's floats per batch)
    chunk = max(1, min(RESIDUAL_TANGENT_CHUNK, hessian_chunk(lambda _: (e * outputs(params0)).sum(),
                                                             e.new_zeros(d))))

    def span(keys: list[str]) -> Tensor:
        return torch.cat([torch.arange(*offsets[k]) for k in keys])

    zero = {k for g in zero_blocks or () for k in g}
    for i, group in enumerate(groups):
        later = {k for g in groups[i + 1:] for k in g} | set(skipped) | {k for k in group if k not in zero}
        if not later:
            continue  # a last module with a zero block of its own: its column is known by symmetry
        rows = [k for k in names if k in later]  # the rows not yet known, in names order
        r_idx, c_idx = span(rows), span(group)
        with program.second_derivatives():
            cols = _residual_module_rows(outputs, e, params0, group, rows, chunk)  # [m, |rows|] = R[M, rows]
        R[c_idx.unsqueeze(1), r_idx.unsqueeze(0)] = cols
        R[r_idx.unsqueeze(1), c_idx.unsqueeze(0)] = cols.T
    computed = span([k for k in names if k not in set(skipped)])
    sub = R[computed.unsqueeze(1), computed.unsqueeze(0)]
    R[computed.unsqueeze(1), computed.unsqueeze(0)] = 0.5 * (sub + sub.T)
    return R


def _hutchinson_probe(program: LossProgram, inputs: Any, targets: Any,
                      generator: torch.Generator | None) -> dict[str, Tensor]:
    """One Rademacher probe ``v * (H v)`` of the batch's summed loss, per parameter."""
    params = program.params
    v = {
        k: (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(p.dtype) * 2 - 1)
        for k, p in params.items()
    }

    def total(p: dict[str, Tensor]) -> Tensor:
        return program.loss_fn(program.outputs(p, inputs), targets).sum()

    # H v by reverse-over-reverse (the vjp of the gradient; H is symmetric): forward AD is missing
    # for some layers (EmbeddingBag) and wrong for others (an embedding's padding_idx)
    with program.second_derivatives():
        _, vjp_fn = torch.func.vjp(torch.func.grad(total), params)
        (hv,) = vjp_fn(v)
    return {k: v[k] * hv[k] for k in params}


def _tensors(x: Any) -> Iterator[Tensor]:
    """The tensors inside ``x`` (tensors, dataclass instances, mappings, lists and tuples)."""
    if isinstance(x, Tensor):
        yield x
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _to_cpu(x: Any) -> Any:
    """``x`` with its tensors on the CPU (:func:`_tensors`' containers rebuilt; ``x`` itself
    when they are all there already, so a CPU run's objects are the same objects)."""
    if not any(t.device.type != "cpu" for t in _tensors(x)):
        return x
    if isinstance(x, Tensor):
        return x.cpu()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _to_cpu(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init})
    if isinstance(x, Mapping):
        return {k: _to_cpu(v) for k, v in x.items()}
    items = [_to_cpu(v) for v in x]
    return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # a namedtuple takes fields
