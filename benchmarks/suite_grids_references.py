"""tests/test_grids.py's windowed full-sum reference (``_windowed_full_sum``, ts38) against the
whole-window cell sums it replaced, on the float8 and float16 / bfloat16 tests' own inputs
(rebuilt here as the tests build them): CPU seconds of each and the largest difference per field.

    PYTHONPATH=.:tests python benchmarks/suite_grids_references.py

Runtime: ~5 CPU s.
"""

from __future__ import annotations

import time

import test_grids as TG
import torch

from mis_lightning.functional import cell_statistics
from mis_lightning.functional.table import table_boundaries

F64 = torch.float64
L = TG._log_uniform


def compare(theta, sigma, values, scale, half_window: int, label: str) -> None:
    t = time.process_time()
    full = cell_statistics(theta, sigma, table_boundaries(theta, values, scale, half_window))
    a = time.process_time() - t
    t = time.process_time()
    new = TG._windowed_full_sum(theta, sigma, values, scale, half_window)
    b = time.process_time() - t
    diffs = {n: f"{float((getattr(new, n) - getattr(full, n)).abs().max()):.2e}"
             for n in ("kappa", "mean_abs", "m4", "coverage")}
    print(f"{label}: whole window {a:.2f} CPU s, windowed {b:.2f} CPU s, max |diff| {diffs}")


def main() -> None:
    torch.set_num_threads(1)
    v8 = TG._all_finite_values(torch.float8_e4m3fn)  # test_float8_table_matches_full_cell_sum
    gen = torch.Generator().manual_seed(5)
    c = 20_000
    scale = L(c, 1e-3, 1.0, gen)
    mag = L(c, 1e-4, 600.0, gen)
    theta = torch.where(torch.rand(c, generator=gen) < 0.5, -mag, mag) * scale
    theta[:200] = 0.0
    step = TG._local_step(theta, v8, scale)
    h = L(c, 0.05, 50.0, gen)
    sigma = torch.where(torch.isfinite(step), step / h, L(c, 1.0, 100.0, gen) * scale)
    sigma[:1000] = L(1000, 1.0, 1000.0, gen) * scale[:1000]
    mids = 0.5 * (v8[1:] + v8[:-1])
    k = torch.randint(0, mids.numel(), (500,), generator=gen)
    theta[-500:] = mids[k] * scale[-500:]
    compare(theta, sigma, v8, scale, 260, "float8")
    for dtype, h_range, window in ((torch.float16, (0.04, 50.0), 700), (torch.bfloat16, (0.2, 50.0), 200)):
        values = TG._all_finite_values(dtype)  # test_float16_tables_match_full_cell_sum
        gen = torch.Generator().manual_seed(int(h_range[0] * 100))
        c = 3000
        mag = L(c, 1e-6, 7e4, gen)
        theta = torch.where(torch.rand(c, generator=gen) < 0.5, -mag, mag)
        theta[:50] = 0.0
        scale = torch.ones(c, dtype=F64)
        step = TG._local_step(theta, values, scale)
        h = L(c, *h_range, gen)
        sigma = torch.where(torch.isfinite(step), step / h, mag * L(c, 1e-4, 1e-2, gen))
        edge = torch.exp2(torch.randint(-10, 10, (500,), generator=gen).to(F64))
        theta[-500:] = edge * (1 + torch.empty(500, dtype=F64).uniform_(-1, 1, generator=gen) * 2.0**-7)
        step_e = TG._local_step(theta[-500:], values, scale[-500:])
        sigma[-500:] = step_e / L(500, *h_range, gen)
        compare(theta, sigma, values, scale, window, str(dtype))


if __name__ == "__main__":
    main()
