"""Which layers torchao's ``quantize_`` and torch's ``quantize_dynamic`` quantize by default
(docs/benchmarks.md "ux54d", docs/quantization.md "Beyond nn.Linear").

A model holding a Conv2d, an Embedding, an EmbeddingBag, a MultiheadAttention, an LSTM, a GRU and a
Linear; prints the parameters ``quantize_(copy, Int8WeightOnlyConfig())`` and
``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` turn into torchao tensors, and the modules
``quantize_dynamic(copy)`` (its default mapping) and ``quantize_dynamic(copy, {nn.Linear})`` convert.

    python benchmarks/default_layers.py
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class AllKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.emb, self.eb = nn.Conv2d(2, 4, 3), nn.Embedding(10, 8), nn.EmbeddingBag(10, 8)
        self.mha, self.lstm, self.gru, self.lin = nn.MultiheadAttention(8, 2), nn.LSTM(8, 8), nn.GRU(8, 8), nn.Linear(8, 2)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    m = AllKinds()
    from torch.ao.quantization import quantize_dynamic
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_

    for cfg in (Int8WeightOnlyConfig(), IntxWeightOnlyConfig(weight_dtype=torch.int4)):
        q = copy.deepcopy(m)
        quantize_(q, cfg)
        print(f"quantize_(model, {type(cfg).__name__}):",
              sorted(n for n, p in q.named_parameters() if type(p.data) is not torch.Tensor))
    for spec, label in ((None, "quantize_dynamic(model)"), ({nn.Linear}, "quantize_dynamic(model, {nn.Linear})")):
        q = quantize_dynamic(copy.deepcopy(m), spec)
        print(f"{label}:", sorted(n for n, mod in q.named_modules()
                                  if "quantized" in type(mod).__module__ and "." not in n))


if __name__ == "__main__":
    main()
