"""Test-session set-up.

The suite runs in parallel processes (``pytest -n auto``, pytest-xdist: one per core); each
process then uses one torch thread so that the processes do not oversubscribe the cores (tests
that compare thread counts start their own subprocesses with explicit counts).

Scheduling (``--dist loadgroup`` in pyproject.toml): xdist runs the ``xdist_group`` groups
first (largest first), then hands the other tests out one by one in collection order. A slow
test handed out last keeps one worker busy while the other idles, so the slowest tests
(>= ~10 s on the shared 2-core CI machine, measured with ``--durations``) are moved to the
front of the collection, in the order below; the order of the others is unchanged.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SLOW_FIRST = (
    "tests/test_fastpath.py::test_agreement_matrix_compiled_eager_reference",
    "tests/test_cli.py::test_multirun_one_job_per_scheme_and_a_failing_job",
    "tests/test_cli.py::test_single_run_writes_reports_and_prints_table",
    "tests/test_cli.py::test_installed_package_ships_configs",
    "tests/test_validation.py::test_quick_headline_agreement",
    "tests/test_leakage.py::test_first_order_matches_exact_tv_gaussian_model",
    "tests/test_scoring_pass.py::test_one_pass_equals_per_draw_path",
    "tests/test_metric.py::test_pickle_round_trip_goes_on_accumulating",
    "tests/test_metric.py::test_states_reset_and_exact_mode_keeps_d_by_d_sums",
    "tests/test_ptq.py::test_assess_scores_calibrated_schemes_and_warns_about_the_factors",
    "tests/test_ptq.py::test_callback_calibrates_on_the_training_loader",
    "tests/test_cli.py::test_assess_mode_scores_a_saved_checkpoint_without_training",
    "tests/test_models.py::test_linear_adam_approaches_ridge",
    "tests/test_loggers.py::test_callback_logs_to_csv_tensorboard_mlflow_wandb_and_reads_back",
    "tests/test_callback.py::test_training_is_bit_identical_with_and_without_the_callback",
    "tests/test_fastpath.py::test_compiled_kernel_follows_the_code_range_of_each_call",
    "tests/test_grids.py::test_float8_table_matches_full_cell_sum",
    "tests/test_leakage.py::test_plugin_bias_and_position_average",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests of ``SLOW_FIRST`` (node-id prefixes) to the front (a stable sort: every
    xdist worker collects the same order)."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)), len(SLOW_FIRST))

    items.sort(key=rank)
