"""``import mis_lightning`` gives every submodule as an attribute on first use (PEP 562), as a
plain package whose ``__init__`` imported them would: ``ml.utility.evaluate_utility`` is what
../shared/repro/09_zero_rows_dynamic_fp8.py calls. Whether it worked depended on which submodules
something had imported earlier (session 42 found it failing). Fresh interpreters: the test must
not see the submodules this worker's other tests imported. The core stays importable without
Lightning: the package's import alone does not load it."""
from __future__ import annotations

import subprocess
import sys

import mis_lightning


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_submodules_are_attributes_of_a_fresh_import():
    out = _fresh(
        "import sys, mis_lightning as ml\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules\n"
        "assert 'mis_lightning.utility' not in sys.modules\n"
        "print(ml.utility.__name__, callable(ml.utility.evaluate_utility), ml.groundtruth.__name__, ml.report.Report.__name__)\n"
        "try:\n    ml.no_such_module\nexcept AttributeError as e:\n    print('AttributeError', e)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "mis_lightning.utility True mis_lightning.groundtruth Report"
    assert "AttributeError module 'mis_lightning' has no attribute 'no_such_module'" in out.stdout


def test_every_listed_submodule_exists():
    names = mis_lightning._SUBMODULES
    assert {"utility", "assess", "callback", "metric", "functional", "quantization", "app"} <= names
