"""LightningModules: penalised linear / logistic M-estimators and an MLP probe.

Every model maps ``[B, F]`` float32 inputs (the MPNN: graph batches, see
:mod:`mis_lightning.data.graphs`) to ``[B]`` outputs, exposes
``per_sample_loss(outputs, targets) -> [B]`` (no penalty) and ``weight_decay``, and trains on
``mean(per_sample_loss) + weight_decay / 2 * ||theta||^2`` (weights and biases, explicit
penalty, optimizer ``weight_decay=0``).
"""

from mis_lightning.models.base import PenalizedModule
from mis_lightning.models.linear import LinearRegression, LogisticRegression, MLPProbe
from mis_lightning.models.metrics import metric_inputs, utility_metrics
from mis_lightning.models.mpnn import MPNN, MPNNEncoder

__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "MLPProbe",
    "MPNN",
    "MPNNEncoder",
    "PenalizedModule",
    "metric_inputs",
    "utility_metrics",
]
