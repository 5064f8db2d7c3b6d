"""rv56r's reproducer (docs/benchmarks.md "rv56r"): ``mis_per_sample_loss`` hooks whose model output holds
several rows per record or is sequence-first with ``T`` steps other than the 4 records the first batch's hook
checks read, accepted on main 0f19162e and refused by rv56's first-batch check (``check_records_first``).

Each case runs ``MISIndicator`` (64 records in batches of 16, ``rtn_int4``, ``estimation=--estimation``) and
prints the leakage and the loss directions' count (``MomentAccumulator.loss_directions``), or the refusal:

* ``cat``: the hook calls the model once on the batch and a transformed copy, ``self(torch.cat([x, 0.5 x]))``
  (``[2B, C]``), each record's loss reading its two rows; ``twice``: the same loss, the model called twice
  (the independent reference: the hook then returns no single output, and no layout is read);
* ``flat``: a per-token model called on the tokens flattened (``[B*T, C]``, ``T = 5``), each record's loss
  the mean over its tokens;
* ``seq5``: a sequence-first ``[T, B, C]`` output of ``T = 5`` steps (tests/test_estimation_conditions.py's
  ``_SeqFirstHook`` accepted it for ``T = 4``);
* ``labelled``: the model called on the labelled records only (``self(x[keep])``, a quarter unlabelled, their
  losses 0; vmap cannot batch it), and ``masked``: its cure, the model on every record, the losses masked;
* (est57) the batch-first twins of ``cat``, ``flat`` and ``seq5``, the same weights and losses with the
  model's output ``[B, ...]``: ``cat_bf`` (``self(torch.stack([x, 0.5 x], 1))``, ``[B, 2, C]``), ``flat_bf``
  (``[B, T, C]``), ``seq5_bf`` (the RNN's output transposed to ``[B, T, C]`` inside ``forward``). With
  ``--leverage`` each line says whether the leverage correction ran (the exact estimator) or the loss
  directions were measured (the diagonal one), and why not;
* (rv57a) ``teacher``: the model called twice, the second call (on ``0.5 x``) under ``torch.no_grad()`` as a
  target, and its twin ``teacher_bf``: one batch-first call ``[B, 2, C]``, the target ``.detach()``-ed;
* (est57) ``penalty``: a weight penalty ``c |theta|^2`` added to each record's loss inside the hook (the
  loss reads the weights other than through the model's output: no leverage factors), and
  ``penalty_out``: the same objective with the penalty as weight decay (``lambda + 2 c``), the hook plain.

    python benchmarks/rv56r_hook_layouts.py [--estimation diagonal|exact] [--leverage]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mis_lightning import MISIndicator

PENALTY = 5e-3  # the penalty case's c in c |theta|^2 per record


class _Hooked(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.rnn = nn.RNN(4, 8) if kind.startswith("seq5") else None
        self.lin = nn.Linear(8 if self.rnn is not None else 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "seq5_bf":  # [B, T, 4] -> [B, T, 3]
            return self.lin(self.rnn(x.transpose(0, 1))[0]).transpose(0, 1)
        return self.lin(self.rnn(x)[0]) if self.rnn is not None else self.lin(x)

    def mis_per_sample_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.kind in ("teacher", "teacher_bf"):  # rv57a: a stop-gradient target, the model's output on 0.5 x
            if self.kind == "teacher":
                a = self(x)
                with torch.no_grad():
                    t = self(0.5 * x)
            else:
                o = self(torch.stack([x, 0.5 * x], 1))
                a, t = o[:, 0], o[:, 1].detach()
            return F.cross_entropy(a, y, reduction="none") + 0.3 * (a - t).square().sum(1)
        if self.kind in ("cat", "twice", "cat_bf"):
            if self.kind == "cat":
                o = self(torch.cat([x, 0.5 * x]))
                a, b = o[: len(x)], o[len(x):]
            elif self.kind == "cat_bf":
                o = self(torch.stack([x, 0.5 * x], 1))
                a, b = o[:, 0], o[:, 1]
            else:
                a, b = self(x), self(0.5 * x)
            return F.cross_entropy(a, y, reduction="none") + 0.3 * (a - b).square().sum(1)
        if self.kind == "penalty":  # a weight penalty inside the hook: the loss reads the weights directly
            return F.cross_entropy(self(x), y, reduction="none") + PENALTY * sum(p.square().sum() for p in self.lin.parameters())
        if self.kind in ("labelled", "masked", "penalty_out"):
            if self.kind == "penalty_out":
                return F.cross_entropy(self(x), y, reduction="none")
            keep = y >= 0
            if self.kind == "masked":
                return F.cross_entropy(self(x), y.clamp(min=0), reduction="none") * keep
            losses = torch.zeros(len(x), dtype=x.dtype)
            return losses.index_put((keep.nonzero().squeeze(1),), F.cross_entropy(self(x[keep]), y[keep], reduction="none"))
        if self.kind == "flat":
            return F.cross_entropy(self(x.reshape(-1, 4)), y.reshape(-1), reduction="none").reshape(len(x), -1).mean(1)
        if self.kind == "flat_bf":
            return F.cross_entropy(self(x).transpose(1, 2), y, reduction="none").mean(1)
        if self.kind == "seq5_bf":
            out = self(x)  # [B, T, C]
            return F.cross_entropy(out[:, -1], y, reduction="none") + 0.1 * out.square().sum((1, 2))
        out = self(x.transpose(0, 1))  # seq5: [T, B, C]
        return F.cross_entropy(out[-1], y, reduction="none") + 0.1 * out.square().sum((0, 2))


def indicator(kind: str, estimation: str) -> MISIndicator:
    """The case's ``MISIndicator`` after its 64 records (batches of 16) and ``compute()`` (its
    report in ``.report``; tests/test_hook_layout_leverage.py reads the twins' through it).

    Raises:
        ValueError / RuntimeError: the library's refusal of the hook."""
    torch.manual_seed(0)
    x = torch.randn(64, 5, 4) if kind.startswith(("flat", "seq5")) else torch.randn(64, 4)
    y = torch.randint(0, 3, (64, 5) if kind.startswith("flat") else (64,))
    if kind in ("labelled", "masked"):
        y[torch.arange(64) % 4 == 1] = -1  # a quarter unlabelled
    # (penalty_out: the hook's penalty c |theta|^2 as weight decay, lambda + 2 c: the same objective)
    decay = 1e-3 + (2 * PENALTY if kind == "penalty_out" else 0.0)
    m = MISIndicator(_Hooked(kind).eval(), None, ["rtn_int4"], estimation=estimation, uncertainty_draws=0,
                     weight_decay=decay, num_training_records=64, params=["lin.weight", "lin.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in range(0, 64, 16):
            m.update((x[a: a + 16], y[a: a + 16]))
        m.compute()
    return m


def run(kind: str, estimation: str, leverage: bool = False) -> str:
    try:
        m = indicator(kind, estimation)
    except (ValueError, RuntimeError) as exc:
        return f"refused: {str(exc)[:110]} ..."
    leak = float(m.report.schemes["rtn_int4"].leakage)
    dirs = m.accumulator.loss_directions()  # (None: the exact estimator counts none)
    if dirs is None:
        off = m.report.diagnostics.get("leverage_unavailable")
        return f"leakage {leak:.6f}" + ("" if not leverage else ", leverage correction " + (
            f"not run ({off[:70]}...)" if off else "run"))
    r, how, _ = dirs
    return f"leakage {leak:.6f}, loss directions {r:g} ({how[:60]}{'...' if len(how) > 60 else ''})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimation", default="diagonal", choices=["diagonal", "exact"])
    ap.add_argument("--leverage", action="store_true", help="say whether the leverage correction ran (exact)")
    args = ap.parse_args()
    for kind in ("cat", "cat_bf", "twice", "flat", "flat_bf", "seq5", "seq5_bf", "labelled", "masked", "penalty",
                 "penalty_out", "teacher", "teacher_bf"):
        print(f"{kind:7s} {run(kind, args.estimation, args.leverage)}")


if __name__ == "__main__":
    main()
