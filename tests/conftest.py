"""Test-session set-up.

The suite runs in parallel processes (``pytest -n auto``, pytest-xdist: one per core); each
process then uses one torch thread so that the processes do not oversubscribe the cores (tests
that compare thread counts start their own subprocesses with explicit counts).

Scheduling (``--dist loadfile --no-loadscope-reorder`` in pyproject.toml): each file runs on one
worker, and xdist hands the files out in collection order as workers become free. A slow file
handed out last keeps one worker busy while the other idles, so the slowest files are collected
first, in the order below (every file of 4 s or more, by its CPU seconds in a whole-suite
``-n 2`` run with tests/_cpu_clock.py: the sum over its tests of the process's and its reaped
children's user + sys time, measured on the shared 2-core machine); the other files follow in
their usual order.
"""

import gc
import os
import sys
from pathlib import Path

# t54: idle OpenMP threads sleep rather than spin (libgomp reads this once, when torch loads it, so
# before the import). The tests that run torch at 2 threads (test_fastpath's agreement matrix, the
# warm-up's thread count) otherwise spun on the shared cores: the matrix's 2-thread half 10.6 CPU s
# of runs against 4.1 passive, at load ~10 (docs/benchmarks.md, t54). Numbers are unchanged: it only
# decides how a thread waits. Subprocesses (CLI runs, DDP ranks) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# t55: the cyclic garbage collector runs less often (generation 0 after 10,000 net allocations, not 700;
# generation 1 after 20 of those): fewer objects outlive two young collections, so the full (generation-2)
# collections, which walk every live object of the worker (torch, Lightning, Hydra, MLflow, every test module:
# ~0.25 CPU s apiece), come rarely. Measured with tests/_gc_clock.py: the collector 8.9% -> 3.6% of a
# worker-like process's CPU. It only decides when unreachable cycles are freed (later; still freed): no
# figure moves (docs/benchmarks.md, t55).
gc.set_threshold(10_000, 20, 10)

import pytest  # noqa: E402
import torch  # noqa: E402

# t55: every file of 4 CPU s or more in a whole-suite `-n 2` run with a per-test CPU clock (main 4b3dedb9, load
# 1-12; docs/benchmarks.md, t55), by that CPU, test_ddp and test_output_reads placed by their CPU after t55's trims
SLOW_FILES = (
    "test_callback.py", "test_fastpath.py", "test_app_config_checks.py", "test_ddp.py", "test_cli.py",
    "test_user_conditions.py", "test_conf.py", "test_output_reads.py", "test_planner.py", "test_interval.py",
    "test_sampled_draws.py", "test_estimation_conditions.py", "test_validation.py", "test_ptq.py",
    "test_scoring_pass.py", "test_correlated.py", "test_fp8_interp.py", "test_leakage.py", "test_assess.py",
    "test_table_draws.py", "test_metric.py", "test_weight_decay_hint.py", "test_revealed_skipped.py",
    "test_attention_symmetry.py", "test_estimation.py", "test_kfac_classifier.py", "test_callback_batch_hooks.py",
    "test_beyond_linear.py", "test_coverage_averaged.py", "test_spread_softmax.py", "test_mpnn.py",
    "test_kfac_conv.py", "test_off_cell_codes.py", "test_loggers.py", "test_fresh_process.py", "test_bounds.py",
    "test_inference_tensor_caches.py", "test_grids.py", "test_point_mass.py", "test_storage_rounding.py",
    "test_modelcopy.py", "test_estimation_one_pass.py", "test_gather.py", "test_scoring_fixed_costs.py",
    "test_spread.py", "test_exact_rank.py", "test_scale_symmetry.py", "test_unseen_records.py",
    "test_ill_posed_fits.py", "test_undetermined_consumers.py",
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the whole session, in an xdist worker and in a ``-n 0`` run alike
    (the one place that sets it: a dozen test modules set it at import before fx49, so a ``-n 0``
    run's thread count depended on which modules were collected). Tests that compare thread
    counts set their own and restore this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the files of ``SLOW_FILES`` first (a stable sort: each file's tests keep their
    order, and every xdist worker collects the same order)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)


def release_disabled_paths() -> list[str]:
    """The warnings of the optimised cell-moment paths the self-checks have disabled for the
    process (``fastpath.GUARD.disabled``), after re-enabling every path; ``[]`` when none is."""
    fastpath = sys.modules.get("mis_lightning.functional.fastpath")
    if fastpath is None or not fastpath.GUARD.disabled:  # not imported: nothing to disable
        return []
    left = list(fastpath.GUARD.disabled.values())
    fastpath.GUARD.reset()
    return left


@pytest.fixture(autouse=True)
def no_guarded_path_left_disabled():
    """Fails a test after which an optimised cell-moment path is left disabled for the process,
    then re-enables it. Either the test disabled it on purpose and did not restore the guard
    (use ``one_thread_fresh_guard``), or a self-check failed on a real input (a kernel wrong there
    or a check too tight: a user's numbers would silently come from the slow path). Unchecked,
    the later files of that xdist worker silently ran the fallback paths. (A failed compilation,
    ``kernel._FUSED_STATE["failed"]``, is the machine's and warned: not checked here.)"""
    yield
    left = release_disabled_paths()
    if left:
        pytest.fail("left disabled for the process: " + "; ".join(left), pytrace=False)


@pytest.fixture
def one_thread_fresh_guard():
    """One torch thread and a fresh self-check guard (fastpath.GUARD) for the test, restored after."""
    from mis_lightning.functional import fastpath

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    fastpath.GUARD.reset()
    yield
    fastpath.GUARD.reset()
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for the test (simulations whose timing on 2 shared cores is better
    single-threaded), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    """The ``real_figure`` marker; and the ``-q`` of pyproject's ``addopts`` as a default. It is
    there so that a plain ``pytest`` prints dots and the count line ("43 passed in 21.3s") without
    the session header and xdist's worker lines; a user's own ``-q`` stacked on it to ``-qq``, which
    drops the count line (nux54). So a user's ``-q`` asks for that same verbosity, ``-qq`` one step
    quieter."""
    config.addinivalue_line("markers", "real_figure: the test reads a written figure (PNG): "
                                       "layout_only_figures leaves its savefig alone")
    default = sum(arg in ("-q", "--quiet") for arg in config.getini("addopts"))
    if default and config.option.verbose < -default:
        config.option.verbose += default


def _layout_only(mp: pytest.MonkeyPatch) -> None:
    """Patch ``Figure.savefig`` and ``tracking.draw_figure`` through ``mp`` to lay figures out
    only (see :func:`layout_only_figures`)."""
    import numpy as np
    from matplotlib.figure import Figure

    from mis_lightning import tracking

    def draw_figure(figure, path, dpi=tracking.FIGURE_DPI):
        old = figure.get_dpi()
        figure.set_dpi(dpi)  # laid out at the dpi the real draw uses
        try:
            lay_out(figure)
            width, height = figure.canvas.get_width_height()
        finally:
            figure.set_dpi(old)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(LAYOUT_ONLY_NOTE)
        return np.zeros((height, width, 3), dtype=np.uint8)

    def savefig(self, fname, *args, **kwargs):
        lay_out(self)
        if not hasattr(fname, "write"):
            with open(fname, "wb") as f:
                f.write(LAYOUT_ONLY_NOTE)
        elif kwargs.get("format", "png") == "png":
            # a library's buffer, decoded as an image (W&B's log_image: PIL opens it): blank pixels of the
            # drawing's size, as draw_figure hands the loggers
            import matplotlib
            from PIL import Image

            dpi = kwargs.get("dpi") or matplotlib.rcParams["savefig.dpi"]
            scale = self.dpi if dpi == "figure" else dpi
            w, h = (round(v * scale) for v in self.get_size_inches())
            Image.new("RGB", (w, h)).save(fname, format="PNG")
        else:
            fname.write(LAYOUT_ONLY_NOTE)

    mp.setattr(tracking, "draw_figure", draw_figure)
    mp.setattr(Figure, "savefig", savefig)


@pytest.fixture(scope="session", autouse=True)
def layout_only_session():
    """:func:`layout_only_figures`' patches for the whole session, from before the first module
    fixture (a module-scoped fit with the callback publishes its figure at set-up), undone at the
    end; the ``real_figure`` tests lift them for themselves (``layout_only_figures``)."""
    from matplotlib.figure import Figure

    from mis_lightning import tracking

    real = {"draw_figure": tracking.draw_figure, "savefig": Figure.savefig}
    with pytest.MonkeyPatch.context() as mp:
        _layout_only(mp)
        yield real


@pytest.fixture(autouse=True)
def layout_only_figures(request, layout_only_session):
    """Every test (autouse; the patches are the session's, ``layout_only_session``):
    ``Figure.savefig`` and the report's one draw (``tracking.draw_figure``: the canvas's draw,
    then the PNG; fx33) lay the figure out (every artist, its text and mathtext included:
    ``draw_without_rendering``, which raises what a save would raise from them) and write a
    short note, not an image; ``draw_figure`` hands the loggers blank pixels of the drawing's
    size. Every report the callback, the planner, the app or ``Report.plot(path)`` publishes
    comes with a figure (0.35 s of CPU each rasterized, 74 of them in test_callback.py: 25 of its
    64 s) that almost no test reads. The figure is still built and laid out from each report. A
    test that reads a figure (a PNG's bytes or pixels) is marked ``real_figure`` and saves for
    real (the note is no PNG: a test reading one unmarked fails). A PNG saved to a buffer (a
    library that decodes it: W&B's ``log_image``) is blank pixels of the figure's size.
    Subprocesses (the CLI's runs, DDP ranks) draw for real.
    ts36: since fx33 the report no longer went through ``savefig``, so every figure was
    rasterized again (35% of test_callback.py's CPU); st59: autouse (it was a fixture some files
    asked for; the others rasterized every figure)."""
    if not request.node.get_closest_marker("real_figure"):
        yield
        return
    from matplotlib.figure import Figure

    from mis_lightning import tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "draw_figure", layout_only_session["draw_figure"])
        mp.setattr(Figure, "savefig", layout_only_session["savefig"])
        yield


# what layout_only_figures writes in place of an image
LAYOUT_ONLY_NOTE = b"laid out, not rasterized: tests/conftest.py layout_only_figures\n"

# st58: one Agg renderer per (width, height, dpi) for the process's layout-only draws
_LAYOUT_RENDERERS: dict = {}


def lay_out(figure) -> None:
    """``figure.draw_without_rendering()`` (its layout engine, then every artist's draw with the
    renderer's drawing disabled: text and mathtext laid out, what a save would raise raised), its
    Agg canvas handed a renderer kept for the process, one per size and dpi, instead of a new one
    per figure. Matplotlib caches text metrics per renderer (``text._get_text_metrics_with_cache``),
    so the strings the report figures share (axis labels, legend entries, the notes' fixed wording)
    are measured once per worker, not once per figure: the same metrics (a string that fails
    raises each time: an exception is not cached). A canvas of another backend draws as before."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg

    canvas = figure.canvas
    if isinstance(canvas, FigureCanvasAgg):
        w, h = canvas.get_width_height(physical=True)
        key = w, h, figure.dpi  # FigureCanvasAgg.get_renderer's own key: it reuses a renderer of this key
        if canvas._lastKey != key:
            if key not in _LAYOUT_RENDERERS:
                _LAYOUT_RENDERERS[key] = RendererAgg(w, h, figure.dpi)
            canvas.renderer, canvas._lastKey = _LAYOUT_RENDERERS[key], key
    figure.draw_without_rendering()
