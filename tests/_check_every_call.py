"""pytest plugin: every call of an optimised cell-moment path is self-checked (``RECHECK_EVERY``
= 1 instead of once every 32 calls of a process), so a fault the sampled checks catch only on
some calls (which ones depends on what ran earlier in the worker) shows in whichever test meets
it: the conftest's guard fixture fails a test that leaves a path disabled.

    PYTHONPATH=tests python -m pytest -p _check_every_call -n 2 tests

Not part of the suite (about 4x its time). Session 41 (on 8b89fc0): everything passes except
tests/test_fastpath.py::test_checks_are_quiet_and_cheap_on_correct_paths, which counts the
checks and so expects the default cadence.
"""

import mis_lightning.functional.fastpath as _fastpath

_fastpath.RECHECK_EVERY = 1
