"""Which records a layer's K-FAC factors sum: a sample by record content, not by reading order.

The diagonal sandwich's K-FAC correction (method.md section 4, "The diagonal sandwich and
correlated weights") sums each layer's Kronecker factors over at most ``cap`` records (their
GEMMs cost ``p^2 + out^2`` per record). Summing the *first* ``cap`` records read made the
correction, and so the reported leakage, depend on the reading order and on the split of the
records over batches and DDP processes. Here a record enters a layer's factors when a hash of
its content key (:func:`~mis_lightning.estimation.records.record_keys`, mixed with the seed by
:func:`~mis_lightning.estimation.record_draws.record_words`) is below ``2^32 cap / n``, ``n``
the number of training records of every process together (a threshold sample, Poisson
sampling at rate ``cap / n``): a function of the record, so the same set whatever the order,
the batch size or the sharding, and the shards' factor sums ("sum" states) add up to the one
process's sums (to float64 summation order).

Law: each record enters with probability ``cap / n`` independently of the others (a uniform
32-bit hash; duplicates of a record enter together), so the selected records are, given their
number ``k ~ Binomial(n, cap / n)`` (mean ``cap``, sd below ``sqrt(cap)``), a uniformly random
subset of that size: the factors are the same kind of estimate as from the first ``cap`` records
of a random order, their ``k`` counted exactly (``kfac_n``) for the subsample's rescaling.
Within a batch the selected records come first, sorted by their hash (:func:`sample_order`):
a layer with a higher rate then takes a longer prefix of the same order.

Needs ``n`` before the pass (``assess`` / ``estimate``: ``len(dataset)``, or for a list or tuple of
batches the sum of their leading dimensions; ``MISCallback``: the trainer's data, the batches
``limit_train_batches`` leaves; ``MISIndicator``: ``num_training_records``). Without it the first records read
are summed as before, and the report says the figure depends on the order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .record_draws import record_words

# record_words streams 0 and 1 are the sampled-label Gauss-Newton's labels and signs
KFAC_SAMPLE_STREAM = 2
# per process, a layer's factors sum at most this many times its cap: a stream much longer than
# its stated size (a wrong num_training_records) keeps a bounded cost; the records past it are the
# first ones read, and the report says so (sample_truncated)
KFAC_SAMPLE_CEILING = 2
# a deficit of the selected records' count under its binomial mean, in standard deviations,
# beyond which the ceiling truncated the sample (p ~ 3e-7 by chance)
KFAC_SAMPLE_DEFICIT_SD = 5.0
_ALL = 1 << 32


def sample_thresholds(caps: Mapping[str, int], n: int) -> dict[str, int]:
    """Per layer the hash threshold ``floor(2^32 cap / n)``, at most ``2^32`` (every record).

    Args:
        caps: per layer the records its factors should sum (``>= 0``).
        n: the training records of every process together (``>= 1``).

    Raises:
        ValueError: ``n < 1`` or a negative cap.
    """
    if n < 1:
        raise ValueError(f"the number of training records must be >= 1, got {n}")
    bad = {m: c for m, c in caps.items() if c < 0}
    if bad:
        raise ValueError(f"K-FAC record caps must be >= 0, got {bad}")
    return {m: min(_ALL, c * _ALL // n) for m, c in caps.items()}


def record_hashes(keys: Tensor, seed: int) -> Tensor:
    """``[b]`` int64 uniform 32-bit hashes of the records' content keys (``[b]`` int64, see
    :func:`~mis_lightning.estimation.record_draws.record_words`) for the factors' sample."""
    return record_words(keys, seed, 1, KFAC_SAMPLE_STREAM)[:, 0]


def sample_order(hashes: Tensor, thresholds: Mapping[str, int]) -> tuple[Tensor, dict[str, int]]:
    """The batch's records below the largest threshold, sorted by hash (``[s]`` int64 row
    indices; ties, i.e. duplicate records, in batch order), and per layer how many of them, a
    prefix of that order, are below its own threshold."""
    top = max(thresholds.values(), default=0)
    sel = torch.nonzero(hashes < top).squeeze(-1)
    order = sel[torch.argsort(hashes[sel], stable=True)]
    ranked = hashes[order]
    return order, {m: int(torch.searchsorted(ranked, t)) for m, t in thresholds.items()}


def sample_truncated(k: int, cap: int, n: int, n_hint: int) -> bool:
    """Whether a layer's ``k`` records (summed over processes) show the ceiling
    (:data:`KFAC_SAMPLE_CEILING` caps per process) cut the threshold sample short, so that its
    last records are the first ones read: ``k`` reached the ceiling, or fell more than
    :data:`KFAC_SAMPLE_DEFICIT_SD` sd below its binomial mean ``n t / 2^32`` (``n`` records read,
    ``n_hint`` the count the threshold ``t`` was set for)."""
    if k >= KFAC_SAMPLE_CEILING * cap:
        return True
    p = sample_thresholds({"": cap}, n_hint)[""] / _ALL
    mean = n * p
    return k < mean - KFAC_SAMPLE_DEFICIT_SD * math.sqrt(mean * (1 - p)) - 1
