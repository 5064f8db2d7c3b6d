"""Write pytest's assertion-rewritten bytecode of the test modules once, before the suite runs.

Each pytest-xdist worker imports every test module at collection; pytest rewrites each one's
``assert`` statements and caches the result in ``__pycache__/*-pytest-<version>.pyc``, keyed by
the source's hash. These machines set PYTHONDONTWRITEBYTECODE, so the cache is never written and
every worker rewrites all ~120 files (~6 CPU s apiece, tc38). This writes the same cache, from
the same rewrite (pytest's own functions, the suite's own configuration), without importing the
modules; pytest reads it whatever PYTHONDONTWRITEBYTECODE says. Run from the repository root:
``python .ci/rewrite_tests.py`` (it ignores PYTHONDONTWRITEBYTECODE: it writes on purpose).
"""

from __future__ import annotations

import sys
from pathlib import Path

from _pytest.assertion import assertstate_key
from _pytest.assertion.rewrite import (
    PYC_TAIL,
    _rewrite_test,
    _write_pyc,
    get_cache_dir,
    try_makedirs,
)
from _pytest.config import get_config


def main() -> int:
    config = get_config()  # pyproject's [tool.pytest.ini_options], without importing conftest.py
    config.parse(["-p", "no:xdist", "-p", "no:cacheprovider", "--noconftest", "tests"], addopts=False)
    state = config.stash[assertstate_key]
    files = sorted(Path("tests").glob("test_*.py")) + [Path("tests/conftest.py")]
    written = 0
    for fn in files:
        fn = fn.resolve()
        cache_dir = get_cache_dir(fn)
        if not try_makedirs(cache_dir):
            continue
        source_hash, co = _rewrite_test(fn, config)
        written += _write_pyc(state, co, source_hash, cache_dir / (fn.name[:-3] + PYC_TAIL))
    print(f"rewrote {written} of {len(files)} test modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
