"""The test suite's layout-only report figures: a new Agg renderer per figure against one kept per
size and dpi (tests/conftest.py ``lay_out``, used by the ``layout_only_figures`` fixture).

Matplotlib caches text metrics per renderer (``matplotlib.text._get_text_metrics_with_cache``);
``Figure.draw_without_rendering`` on a fresh figure makes a fresh renderer, so every string of
every report figure is measured again. ``lay_out`` hands the figure's Agg canvas a renderer kept
for the process. Four small reports (different schemes and interval draws, as a test file's
fits give) are built once; their figures are then built and laid out ``--rounds`` times each
way, alternating, and the process CPU per figure (build + layout) printed.

    python benchmarks/st58_layout_figures.py compare --rounds 3

Also ``check``: a figure with an unparsable mathtext label raises on every ``lay_out``, the
first and the later ones (an exception is not cached), and a good figure lays out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import lay_out  # noqa: E402  (tests/conftest.py)

from mis_lightning import assess  # noqa: E402


def reports() -> list:
    out = []
    for seed, schemes in ((0, ["rtn_int8", "rtn_int4", "bf16"]), (1, ["rtn_int8"]), (2, ["rtn_int4", "fp16"]),
                          (3, ["rtn_int8", "rtn_int4"])):
        torch.manual_seed(seed)
        X = torch.randn(200, 4)
        y = X[:, 0] + 0.1 * torch.randn(200)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        loader = DataLoader(TensorDataset(X, y), batch_size=64)
        out.append(assess(model, schemes, loader, lambda o, t: (o.squeeze(-1) - t) ** 2, val_dataloader=loader,
                          uncertainty_draws=seed))
    return out


def per_figure(reps: list, layout, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        for rep in reps:
            fig = rep.plot()
            fig.set_dpi(100)
            layout(fig)
            plt.close(fig)
    return (time.process_time() - start) / (rounds * len(reps))


def compare(rounds: int) -> None:
    torch.set_num_threads(1)
    reps = reports()
    for k in range(3):
        fresh = per_figure(reps, lambda fig: fig.draw_without_rendering(), rounds)
        kept = per_figure(reps, lay_out, rounds)
        print(f"pass {k}: CPU s per figure (build + layout): new renderer each {fresh:.3f}, kept renderer {kept:.3f}")


def check() -> None:
    for k in range(2):
        fig, ax = plt.subplots(layout="constrained")
        ax.set_xlabel(r"$\badcommand{x}$")
        try:
            lay_out(fig)
            raise SystemExit(f"layout {k} of an unparsable label did not raise")
        except ValueError:
            print(f"layout {k} of an unparsable label raised ValueError")
        plt.close(fig)
    fig, ax = plt.subplots(layout="constrained")
    ax.set_xlabel("fine")
    lay_out(fig)
    print("a good figure laid out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compare", "check"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    compare(args.rounds) if args.mode == "compare" else check()


if __name__ == "__main__":
    main()
