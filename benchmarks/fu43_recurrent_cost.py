"""CPU seconds per unit of ``n d F`` (records x assessed weights x floats one record's forward
produces) of the exact sandwich through recurrent layers, against a convolutional model in the
same run (fu43; docs/benchmarks.md, "fu43"): the factor ``estimate.RECURRENT_COST_FACTOR`` that
"auto" weighs recurrent models' ``n d F`` by. Recurrent: nu42a's tied LSTM / GRU / RNN language models
(``benchmarks/nu42a_sequence_trial.py``, 4 Adam epochs, the tied decoder assessed, d = 108);
convolutional: a Conv1d(2, 8, 5) -> ReLU -> Linear classifier. One thread, ``time.process_time``.

    python benchmarks/fu43_recurrent_cost.py              # LSTM n = 96 / 192 / 384, GRU and RNN n = 192, 2 CNNs; ~1 min
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from nu42a_sequence_trial import collate, lm_batch, per_sample_loss
from rn43_recurrent_estimators import HEAD, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig
from mis_lightning.estimation.estimate import forward_floats

# CPU s per unit that estimate.EXACT_REUSE_MAX_COST was set by (examples/cnn_callback.py's CNN, vmapped)
CALIBRATION = 5e-8


def _timed(model, loader, loss, batch_fn, params) -> tuple[float, float]:
    """``(CPU s of the exact sandwich's pass, n d F)``, F measured on the first batch as "auto" does."""
    x = (batch_fn or (lambda b: b))(next(iter(loader)))[0]
    f = forward_floats(model, x, int(x.shape[0]))
    t0 = time.process_time()
    est = run_estimation(model, loader, loss, EstimationConfig(params=params, mode="exact", hessian="exact",
                                                               weight_decay=1e-3), batch_fn=batch_fn)
    return time.process_time() - t0, est.n * est.d * f


def _cnn(n: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(2, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * (width - 4), 3)).double()
    X = torch.randn(n, 2, width, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (n,), generator=g)
    return model, DataLoader(TensorDataset(X, Y), batch_size=64)


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ce = lambda o, y: F.cross_entropy(o, y, reduction="none")  # noqa: E731
    rows = []
    model, loader = _cnn(64, 16)
    _timed(model, loader, ce, None, ["0.weight", "0.bias"])  # warm-up: the first exact pass's one-time costs
    for n, width in ((256, 64), (512, 64)):
        model, loader = _cnn(n, width)
        rows.append((f"cnn n {n} width {width}", *_timed(model, loader, ce, None, ["0.weight", "0.bias"])))
    for kind, n in (("lstm", 96), ("lstm", 192), ("lstm", 384), ("gru", 192), ("rnn", 192)):
        model, ds = fit(kind, 0, n, 4)
        rows.append((f"{kind} n {n}", *_timed(model, DataLoader(ds, batch_size=64, collate_fn=collate),
                                               per_sample_loss, lm_batch, HEAD)))
    conv = sum(t / c for name, t, c in rows if name.startswith("cnn")) / 2
    for name, t, c in rows:
        print(f"{name}: exact {t:.2f} CPU s, n d F = {c:.3g}, {t / c:.3g} s per unit, {t / c / conv:.2f}x the CNNs', "
              f"{t / c / CALIBRATION:.1f}x the calibration's {CALIBRATION:g}", flush=True)


if __name__ == "__main__":
    main()
