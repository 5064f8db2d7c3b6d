"""Report rendering of failed schemes (table, warnings, figure) and the empty scheme list."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.quantization import QuantizationScheme, SchemeUnavailableError
from mis_lightning.report import format_table, short_error

LONG = ("scheme 'needs_gpu' is unavailable: its kernel needs a CUDA GPU with compute capability "
        "8.0 or newer and this machine has none; on CPU use 'int4_weight_only' instead")


class _NeedsGPU(QuantizationScheme):
    """A scheme that is never available (stands for int4_tinygemm on a CPU-only machine)."""

    name = "needs_gpu"

    def check_available(self) -> None:
        raise SchemeUnavailableError(LONG)

    def _quantize_copy(self, model):  # pragma: no cover - never reached
        raise AssertionError


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _model_and_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g)
    y = X[:, 0] + 0.1 * torch.randn(200, generator=g)
    torch.manual_seed(0)
    return nn.Linear(4, 1), DataLoader(TensorDataset(X, y), batch_size=50)


def _ok_row(name: str) -> dict:
    return {"scheme": name, "bits_per_weight": 8.5, "leakage": 0.1234, "mis": 0.8766,
            "leakage_p10": 0.1, "leakage_p90": 0.15, "baseline_leakage": 0.2, "d_eff": 3.0,
            "d": 5, "sparsity": 0.0, "frozen_fraction": 0.0, "method": "clt", "error": ""}


def test_short_error_cuts_at_a_word_boundary():
    assert short_error("abc def", 60) == "abc def"
    assert short_error("alpha beta gamma delta", 15) == "alpha beta\u2026"  # not "alpha beta gam"
    assert short_error("x" * 100, 10) == "x" * 9 + "\u2026"  # one long word: cut inside it
    assert short_error("a\n  b", 60) == "a b"  # one line


def test_error_row_neither_cuts_mid_word_nor_widens_the_table():
    ok = format_table([_ok_row("rtn_int8")])
    # (a scheme name no longer than "rtn_int8": the first column keeps its width too)
    text = format_table([{"scheme": "gpu_only", "error": "SchemeUnavailableError: " + LONG},
                         _ok_row("rtn_int8")])
    lines = text.splitlines()
    width = max(len(ln) for ln in ok.splitlines())
    # the figure columns keep their widths: header and the ok row are unchanged
    assert lines[0] == ok.splitlines()[0] and lines[3] == ok.splitlines()[2]
    row = lines[2]
    assert len(row) <= width
    assert row.startswith("gpu_only ") and "error: SchemeUnavailableError: scheme" in row
    assert row.endswith("\u2026")
    cut = row.split("error: ", 1)[1][:-1]
    # cut after a whole word, as long as the figure columns allow (the width of the ok table)
    full = "SchemeUnavailableError: " + LONG
    assert full.startswith(cut) and full[len(cut)] == " " and len(cut) >= 40
    assert len(row) + len(full.split(" ")[len(cut.split(" "))]) + 1 > width  # the next word would not fit
    # the full message below the table
    assert lines[4:] == ["", "errors:", "  gpu_only: SchemeUnavailableError: " + LONG]


def test_failed_scheme_in_table_and_warnings():
    m, dl = _model_and_data()
    rep = ml.assess(m, [_NeedsGPU(), "rtn_int8"], dl, mse, num_records=64, uncertainty_draws=0,
                    strict=False)
    assert rep.schemes["needs_gpu"].error == "SchemeUnavailableError: " + LONG
    assert f"scheme 'needs_gpu' failed, no figures: SchemeUnavailableError: {LONG}" in rep.warnings
    assert "  needs_gpu: SchemeUnavailableError: " + LONG in rep.table().splitlines()


def test_figure_says_no_scheme_succeeded(tmp_path):
    m, dl = _model_and_data()
    rep = ml.assess(m, [_NeedsGPU()], dl, mse, num_records=64, uncertainty_draws=0, strict=False,
                    val_dataloader=dl)
    fig = rep.plot(tmp_path / "f.png")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 1 and texts[0].startswith("no scheme succeeded\nneeds_gpu: SchemeUnavailableError")
    assert not ax.lines and not ax.collections
    # no utility measured for any scheme: the axis is bits per weight, not "(validation)"
    assert ax.get_xlabel() == "bits per weight"
    rows = [_ok_row("a")]
    rows[0]["utility_rmse"] = 0.5
    assert ml.report.privacy_utility_figure(rows).axes[0].get_xlabel() == "rmse (validation)"


def test_empty_scheme_list_is_refused_everywhere():
    m, dl = _model_and_data()
    msg = r"schemes is empty: name at least one quantization scheme"
    with pytest.raises(ValueError, match=msg):
        ml.assess(m, [], dl, mse)
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(m, mse, schemes=[])
    with pytest.raises(ValueError, match=msg):
        ml.MISCallback(schemes=[])
    from mis_lightning.assess import score
    from mis_lightning.estimation import estimate

    est = estimate(m, dl, mse, num_records=16)
    with pytest.raises(ValueError, match=msg):
        score(est, m, [])


def test_renamed_fields_old_json_keys_load_and_old_names_warn():
    """Issue 10 item 5: ``sparsity`` -> ``zero_fraction`` (footprint's name) and
    ``frozen_fraction`` -> ``pinned_fraction`` (not requires_grad): a report saved with the old
    keys loads with its values, and the old attribute names still read, with a warning."""
    from mis_lightning.report import Report

    layer = {"name": "w", "d": 5, "quantized": True, "leakage": 0.1, "mis": 0.9,
             "baseline_leakage": 0.2, "d_eff": 3.0, "frozen_fraction": 0.25, "sparsity": 0.5,
             "bits_per_weight": 8.0}
    old = {"n": 10, "d": 5, "estimation": {}, "diagnostics": {}, "baseline_leakage": 0.2,
           "baseline_mis": 0.8, "schemes": {"rtn_int8": {
               "name": "rtn_int8", "leakage": 0.1, "mis": 0.9, "baseline_leakage": 0.2,
               "d_eff": 3.0, "d": 5, "sparsity": 0.125, "frozen_fraction": 0.375,
               "bits_per_weight": 8.0, "method": "clt", "layers": {"w": layer}}}}
    rep = Report.from_dict(old)
    s = rep.schemes["rtn_int8"]
    assert (s.zero_fraction, s.pinned_fraction) == (0.125, 0.375)
    assert (s.layers["w"].zero_fraction, s.layers["w"].pinned_fraction) == (0.5, 0.25)
    with pytest.warns(DeprecationWarning, match="sparsity is deprecated, use zero_fraction"):
        assert s.sparsity == 0.125
    with pytest.warns(DeprecationWarning, match="frozen_fraction is deprecated, use pinned_fraction"):
        assert s.layers["w"].frozen_fraction == 0.25
    new = rep.to_dict()["schemes"]["rtn_int8"]
    assert new["zero_fraction"] == 0.125 and "sparsity" not in new
    assert rep.rows()[0]["pinned_fraction"] == 0.375


def test_table_prints_every_warning_in_full():
    """A failed assumption is read next to the numbers: Report.table() ends with every warning,
    uncut (the callback also emits each one as a UserWarning; the app prints the table)."""
    m, dl = _model_and_data()
    rep = ml.assess(m, [_NeedsGPU(), "rtn_int8"], dl, mse, num_records=64, uncertainty_draws=0,
                    strict=False)
    rep.warnings.append("d_eff / n is not small for every scheme " + "x" * 300)
    text = rep.table()
    tail = text.split("\n\nwarnings:\n", 1)[1].splitlines()
    assert tail == [f"  - {w}" for w in rep.warnings] and len(tail) >= 2


def test_identical_results_share_one_labelled_point():
    from mis_lightning.report import privacy_utility_figure

    rows = [_ok_row("int8_weight_only"), _ok_row("int8_dynamic_activation_int8_weight"), _ok_row("rtn_int8")]
    rows[2]["leakage"] = 0.2
    fig = privacy_utility_figure(rows)
    ax = fig.axes[0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["int8_weight_only = int8_dynamic_activation_int8_weight", "rtn_int8"]
