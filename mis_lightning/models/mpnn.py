"""A message-passing neural network (MPNN) on padded molecular graphs, in plain torch.

Inputs are the graph batches of :mod:`mis_lightning.data.graphs`:
``{"atoms": [B, N, F], "adj": [B, N, N], "mask": [B, N]}``. The network (Gilmer et al. 2017,
with a shared message function and sum aggregation over bonds):

    h^0_v     = relu(embed(x_v))                                         [B, N, H]
    h^{t+1}_v = relu(update(h^t_v) + sum_{u ~ v} message(h^t_u))         (``steps`` times)
    r         = mean (or sum) of h^T_v over the real atoms (``mask``)     [B, H]
    f         = head(r)                                                   [B]

``embed``, ``message`` (no bias) and ``update`` are ``nn.Linear`` layers shared over atoms and
steps (the ``encoder``); ``head`` is an MLP (``head_hidden`` widths, then one output).
Padding atoms never reach a real atom (their adjacency rows and columns are zero) and are
masked out of the readout, so the output of a molecule does not depend on the padding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mis_lightning.models.base import PenalizedModule
from mis_lightning.models.linear import _check_features

__all__ = ["MPNN", "MPNNEncoder"]

READOUTS = ("mean", "sum")
GRAPH_KEYS = ("atoms", "adj", "mask")


def _check_graph(g: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(g, Mapping) or any(k not in g for k in GRAPH_KEYS):
        got = sorted(g) if isinstance(g, Mapping) else type(g).__name__
        raise TypeError(
            "the MPNN takes graph batches {'atoms': [B, N, F], 'adj': [B, N, N], 'mask': [B, N]} "
            f"(mis_lightning.data.graphs); got {got}")
    return g["atoms"], g["adj"], g["mask"]


class MPNNEncoder(nn.Module):
    """Atom embedding, ``steps`` rounds of message passing and a masked readout.

    Args:
        num_features: atom features ``F``.
        hidden: atom state width ``H``.
        steps: message-passing rounds ``T`` (weights shared over rounds).
        readout: ``"mean"`` or ``"sum"`` over the real atoms.

    Raises:
        ValueError: a bad width, step count or readout (names it).
    """

    def __init__(self, num_features: int, hidden: int = 32, steps: int = 3, readout: str = "mean") -> None:
        super().__init__()
        hidden, steps = int(hidden), int(steps)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.embed = nn.Linear(_check_features(num_features), hidden)
        self.message = nn.Linear(hidden, hidden, bias=False)
        self.update = nn.Linear(hidden, hidden)
        self.steps, self.readout, self.hidden = steps, readout, hidden

    def forward(self, graphs: Mapping[str, Tensor]) -> Tensor:
        """Graph embeddings ``[B, H]`` of a graph batch (see the module docstring)."""
        atoms, adj, mask = _check_graph(graphs)
        mask = mask.to(atoms.dtype).unsqueeze(-1)  # [B, N, 1]
        adj = adj.to(atoms.dtype)
        h = torch.relu(self.embed(atoms))
        for _ in range(self.steps):
            h = torch.relu(self.update(h) + adj @ self.message(h))
        pooled = (h * mask).sum(-2)  # [B, H]
        if self.readout == "mean":
            pooled = pooled / mask.sum(-2).clamp_min(1.0)
        return pooled


class MPNN(PenalizedModule):
    """An MPNN regressor / classifier on molecular graphs; outputs ``[B]``.

    Trains on ``mean(per_sample_loss) + weight_decay / 2 * ||theta||^2`` over the *trainable*
    parameters (:mod:`mis_lightning.models.base`). With ``freeze_encoder=True`` the encoder's
    weights get ``requires_grad=False`` and only the head is fitted (and assessed: the
    assessment selects the trainable parameters and reports the frozen ones it leaves out).

    Args:
        num_features: atom features ``F`` (28 for :mod:`mis_lightning.data.graphs`).
        task: ``"regression"`` or ``"binary"`` (logits).
        hidden: atom state width; steps: message-passing rounds; readout: ``"mean"``/``"sum"``.
        head_hidden: hidden widths of the head MLP (empty: a linear head ``Linear(H, 1)``).
        weight_decay, lr, optimizer: as in :class:`~mis_lightning.models.MLPProbe`.
        freeze_encoder: fix the encoder (``requires_grad=False``): the fine-tuned-head setting.
        encoder_checkpoint: a file saved with :meth:`save_encoder` (or ``torch.save`` of
            ``encoder.state_dict()``, or a Lightning checkpoint whose ``state_dict`` has
            ``encoder.*`` keys): the encoder's weights, e.g. pretrained on public molecules.
            ``None``: the encoder keeps its (seeded) random initialisation.
        pretrain_data: a graph datamodule (e.g. ``NCITPSAGraphDataModule``: public molecules,
            disjoint from the members) on which :meth:`pretrain_encoder` fits the encoder
            before training (in ``setup("fit")``); ``None``: no pretraining.
        pretrain_epochs: epochs of that pretraining.

    Raises:
        ValueError: a bad option (names it); FileNotFoundError: a missing checkpoint;
        KeyError: a checkpoint whose keys do not match the encoder.
    """

    def __init__(
        self,
        num_features: int,
        task: str = "regression",
        hidden: int = 32,
        steps: int = 3,
        readout: str = "sum",
        head_hidden: Sequence[int] = (16,),
        weight_decay: float = 1e-3,
        lr: float = 3e-3,
        optimizer: str = "adam",
        freeze_encoder: bool = False,
        encoder_checkpoint: str | None = None,
        pretrain_data: Any = None,
        pretrain_epochs: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pretrain_data"])
        self.encoder = MPNNEncoder(num_features, hidden, steps, readout)
        widths = [int(h) for h in head_hidden]
        if any(h < 1 for h in widths):
            raise ValueError(f"head_hidden widths must be >= 1, got {list(head_hidden)!r}")
        layers: list[nn.Module] = []
        prev = int(hidden)
        for h in widths:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.head = nn.Sequential(*layers)
        if encoder_checkpoint is not None:
            self.load_encoder(encoder_checkpoint)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
        self._setup_common(task, weight_decay, lr, optimizer)
        if pretrain_data is not None and not hasattr(pretrain_data, "train_dataloader"):
            raise TypeError("pretrain_data must be a datamodule with graph batches (e.g. "
                            f"NCITPSAGraphDataModule), got {type(pretrain_data).__name__}")
        self.pretrain_data = pretrain_data
        self.pretrain_epochs = int(pretrain_epochs)
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be >= 1, got {pretrain_epochs!r}")
        self.pretrained = False

    def setup(self, stage: str) -> None:
        """Before fitting: pretrain the encoder on ``pretrain_data`` (once) if one was given."""
        if stage == "fit" and self.pretrain_data is not None and not self.pretrained:
            self.pretrain_data.setup("fit")
            self.pretrain_encoder(self.pretrain_data.train_dataloader(), self.pretrain_epochs)

    def pretrain_encoder(self, dataloader: Any, epochs: int = 5, lr: float | None = None) -> float:
        """Fit the encoder, with a temporary linear head, to another (public) regression set.

        The encoder's weights are trained whatever ``freeze_encoder`` says (its
        ``requires_grad`` flags are restored after); this model's ``head`` is untouched.
        Loss: mean squared error ``0.5 (f - y)^2`` plus the same ``weight_decay`` penalty,
        Adam at ``lr`` (default: the model's).

        Args:
            dataloader: graph batches ``(graphs, targets [B])`` (targets z-scored).
            epochs: passes over ``dataloader``.

        Returns:
            The last epoch's mean data loss (squared target units / 2).
        """
        flags = [p.requires_grad for p in self.encoder.parameters()]
        tmp = nn.Linear(self.encoder.hidden, 1).to(self.device)
        params = [*self.encoder.parameters(), *tmp.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr if lr is None else float(lr))
        last = float("nan")
        try:
            with torch.enable_grad():
                for _ in range(int(epochs)):
                    total, count = 0.0, 0
                    for graphs, y in dataloader:
                        graphs = {k: v.to(self.device) for k, v in graphs.items()}
                        y = y.to(self.device).reshape(-1)
                        data = 0.5 * (tmp(self.encoder(graphs)).squeeze(-1) - y).square().mean()
                        loss = data + 0.5 * self.weight_decay * sum(p.square().sum() for p in params)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        total, count = total + float(data.detach()) * y.shape[0], count + y.shape[0]
                    last = total / max(count, 1)
        finally:
            for p, f in zip(self.encoder.parameters(), flags):
                p.requires_grad_(f)
                p.grad = None
        self.pretrained = True
        return last

    def forward(self, graphs: Mapping[str, Tensor]) -> Tensor:
        """Outputs ``[B]`` (predictions, or logits for ``task="binary"``) of a graph batch."""
        return self.head(self.encoder(graphs)).squeeze(-1)

    def save_encoder(self, path: str | os.PathLike) -> None:
        """Save the encoder's ``state_dict`` (for ``encoder_checkpoint=``)."""
        torch.save(self.encoder.state_dict(), path)

    def load_encoder(self, path: str | os.PathLike) -> None:
        """Load the encoder's weights from ``path`` (see ``encoder_checkpoint``).

        Raises:
            FileNotFoundError: no such file. KeyError: keys or shapes do not match the encoder
                (the message lists the expected and found keys).
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"encoder_checkpoint file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:  # a Lightning checkpoint
            state = state["state_dict"]
        if any(str(k).startswith("encoder.") for k in state):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        want = self.encoder.state_dict()
        if set(state) != set(want) or any(tuple(state[k].shape) != tuple(want[k].shape) for k in want):
            raise KeyError(
                f"encoder_checkpoint {os.fspath(path)!r} does not fit this encoder: expected "
                f"{ {k: list(v.shape) for k, v in want.items()} }, found "
                f"{ {k: list(getattr(v, 'shape', [])) for k, v in state.items()} }")
        self.encoder.load_state_dict(state)
