"""Third-party notices the library's own calls raise are silenced around those calls only (ux29:
torch's ``KernelPreference`` register_constant notice at torchao's import, and torch's
``torch.quantize_per_tensor ... deprecated`` from native_int8_dynamic, came before the table).
The user's own warnings and log records are never filtered."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from mis_lightning.quantization.native import quiet_deprecated_quantization
from mis_lightning.quantization.torchao_backend import _torchao_import_notices_filtered

# torch 2.13's words (torch/utils/_pytree.py), logged at torchao's first import
KERNEL_PREFERENCE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                     "type. Calling register_constant() on Enum subclasses is deprecated and will be an error in a "
                     "future release.")
QINT8 = ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation functions that "
         "produce tensors with dtype torch.quint8, torch.qint8, and torch.qint32 are deprecated")


def test_torchaos_enum_registration_notice_is_dropped_during_its_import_only(caplog):
    log = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        with _torchao_import_notices_filtered():
            log.warning(KERNEL_PREFERENCE, "<enum 'KernelPreference'>")
            log.warning("another pytree notice")  # not torchao's: kept
        log.warning(KERNEL_PREFERENCE, "<enum 'UserEnum'>")  # after the import: the user's, kept
    got = [r.getMessage() for r in caplog.records]
    assert got == ["another pytree notice", KERNEL_PREFERENCE % "<enum 'UserEnum'>"]


# test_a_fresh_process_shows_no_dependency_notice_and_the_users_own_warning: in
# tests/test_fresh_process.py, the last part of its one fresh process (tc38)


def test_the_users_own_warnings_pass_through_the_scope():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with quiet_deprecated_quantization():
            warnings.warn("the user's own notice", UserWarning, stacklevel=1)
            warnings.warn(QINT8, UserWarning, stacklevel=1)  # torch's, raised by the library's call: dropped
        warnings.warn(QINT8, UserWarning, stacklevel=1)  # outside: kept
    assert [str(w.message) for w in rec] == ["the user's own notice", QINT8]


def test_the_suites_warning_filters_drop_the_expected_notices_and_keep_the_rest():
    """ux31 (fu30): a plain ``pytest`` ended with an ~885-line warnings summary, mostly the
    callback's report warnings on the suite's tiny models. pyproject's ``filterwarnings`` drops
    those, the data modules' notices on the fixtures' bad rows and three dependencies' internal
    deprecations; any other warning (a new library warning, a test's deprecated call, torch's
    own notices) still reaches the summary."""

    import pytest
    from _pytest.config import parse_warning_filter

    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    entries = cfg["tool"]["pytest"]["ini_options"]["filterwarnings"]

    def shown(message: str, category: type[Warning], module: str) -> bool:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for e in entries:  # pytest applies the ini entries in order, the last one winning
                action, msg, cat, mod, line = parse_warning_filter(e, escape=False)
                warnings.filterwarnings(action, msg, cat, mod, line)
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return bool(rec)

    dropped = [("MISCallback: the model is not at a minimum of the training loss", UserWarning, "mis_lightning.callback"),
               ("NCITPSADataModule: 3 kept SMILES hold several fragments", UserWarning, "mis_lightning.data.molecules"),
               ("TDCADMETDataModule: skipped 1 of 22 rows", UserWarning, "tests.test_data"),
               ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "pytorch_lightning.utilities._pytree"),
               ("`torch.jit.script` is deprecated.", DeprecationWarning, "torch.jit._script"),
               ("The ``noload`` loader strategy is deprecated", DeprecationWarning, "mlflow.store.tracking.x")]
    kept = [("d / n = 0.3 is not small", UserWarning, "mis_lightning.assess"),  # not through the callback
            ("Estimate.w is deprecated; use Estimate.influence", DeprecationWarning, "tests.test_metric"),
            ("There is a performance drop because we have not yet implemented the batching rule", UserWarning,
             "torch.nn.functional"),
            ("`torch.jit.script` is deprecated.", DeprecationWarning, "mis_lightning.quantization")]
    assert [m for m, c, mod in dropped if shown(m, c, mod)] == []
    assert [m for m, c, mod in kept if not shown(m, c, mod)] == []


def test_the_apps_trainer_notices_are_quieted_in_its_own_scope_only(caplog):
    """ux31: the README's default job printed Lightning's LeafSpec FutureWarning (Lightning 2.6's
    own check under torch 2.13) and its "💡 Tip" advert for litlogger, both set off by the app's
    own Trainer. The app quiets exactly those two around its Trainer's construction and fit; a
    user's own warning and Lightning's other lines pass, and nothing is quieted outside."""
    import contextlib
    import logging

    from mis_lightning.app.job import lightning_notices_quieted

    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def emit(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with lightning_notices_quieted() if quiet else contextlib.nullcontext():
                warnings.warn(leaf, FutureWarning, stacklevel=1)
                warnings.warn("the user's own FutureWarning", FutureWarning, stacklevel=1)
                caplog.clear()
                log.info(tip)
                log.info("GPU available: False, used: False")
        return [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"):
        inside, outside = emit(True), emit(False)
    assert inside == ["the user's own FutureWarning", "GPU available: False, used: False"]
    assert outside == [leaf, "the user's own FutureWarning", tip, "GPU available: False, used: False"]
