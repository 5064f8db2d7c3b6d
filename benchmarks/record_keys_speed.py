"""The record content hashes' exact block sums: ``[2, bytes] @ [bytes, rows]`` against the
earlier ``[rows, bytes] @ [bytes, 2]`` (issue 13, the 1e5 line's estimation; docs/benchmarks.md,
"p45b").

``record_keys`` sums each record's bytes times 16-bit halves of random weights in float64, one
GEMM per block of rows; every product and partial sum is an integer below 2^53, so any order of
summation gives the same keys, bit for bit. The two-column product ran at ~1 G multiply-adds/s
on one thread; the transposed one (the same numbers) several times faster.

    python benchmarks/record_keys_speed.py                  # per batch, the two product forms
    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    python benchmarks/record_keys_speed.py --model /tmp/m1e5.pt --rounds 12   # + in situ A/B

Prints the CPU milliseconds per batch of each form (their keys compared for equality), and with
``--model`` the default "assess" estimation of that model with ``record_keys`` as now and with
the earlier product, alternating in one process (medians, each pair's ratio, the load).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

from mis_lightning.estimation import records


def _earlier_record_keys(inputs, targets, b):
    """``record_keys`` with the earlier two-column product (a 2-D float leaf's path only)."""
    h = torch.zeros(b, dtype=torch.int64)
    leaves = [t for t in torch.utils._pytree.tree_leaves((inputs, targets))
              if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b]
    for i, t in enumerate(leaves):
        assert t.dim() <= 2 and t.is_floating_point(), "the earlier form here covers float rows only"
        u8 = t.detach().reshape(b, -1).to(torch.float64).contiguous().view(torch.uint8)
        w = records._hash_weights(i, u8.shape[1])
        halves = torch.stack([w >> 16, w & 0xFFFF], 1).to(torch.float64)  # [L, 2]
        L, s = u8.shape[1], torch.zeros(b, dtype=torch.int64)
        for a in range(0, L, records._SUM_BLOCK):
            e = min(a + records._SUM_BLOCK, L)
            rows = max(1, records._KEY_ROW_BYTES // max(1, e - a))
            hl = torch.cat([u8[r: r + rows, a:e].to(torch.float64) @ halves[a:e]
                            for r in range(0, b, rows)]).to(torch.int64)
            s = (s + hl[:, 0] * 65536 + hl[:, 1]) % records._P31
        h = (h * 1_000_003 + s) % records._P31
    return h


def _per_batch(fn, x, y, n: int = 64) -> float:
    fn(x, y, x.shape[0])
    t = time.process_time()
    for _ in range(n):
        fn(x, y, x.shape[0])
    return (time.process_time() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--model", help="a model saved by first_call.py train: the in-situ estimation A/B")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.features, generator=g)
    y = torch.randn(args.batch, generator=g)
    same = torch.equal(records.record_keys(x, y, args.batch), _earlier_record_keys(x, y, args.batch))
    now, before = _per_batch(records.record_keys, x, y), _per_batch(_earlier_record_keys, x, y)
    print(f"batch [{args.batch}, {args.features}] float32 + targets: record_keys {now:.3f} ms, "
          f"earlier product {before:.3f} ms per batch; keys equal: {same}")
    if not args.model:
        return
    from benchmarks.first_call import load_saved
    from mis_lightning.assess import run_estimation

    est_mod = importlib.import_module("mis_lightning.estimation.estimate")
    lf_mod = importlib.import_module("mis_lightning.estimation.linear_factors")
    current = records.record_keys
    _, model, loader, loss_fn, est_cfg, _ = load_saved(args.model)
    run_estimation(model, loader, loss_fn, est_cfg)  # warm-up
    res: dict[str, list[float]] = {"now": [], "earlier": []}
    for r in range(args.rounds):
        for tag in (("earlier", "now") if r % 2 == 0 else ("now", "earlier")):
            est_mod.record_keys = lf_mod.record_keys = current if tag == "now" else _earlier_record_keys
            t = time.process_time()
            run_estimation(model, loader, loss_fn, est_cfg)
            res[tag].append(time.process_time() - t)
    est_mod.record_keys = lf_mod.record_keys = current
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    pairs = " ".join(f"{a / b:.3f}" for a, b in zip(res["now"], res["earlier"]))
    print(f"estimation CPU s, median of {args.rounds}: earlier {med['earlier']:.4f}, now {med['now']:.4f} "
          f"(now / earlier per pair: {pairs}); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
