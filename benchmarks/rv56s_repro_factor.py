"""python repro_wrap.py on|off SCRIPT: run a /work/shared/repro script with assess(covariance='factor')
forced and functional.correlated.FACTOR_FORM_CHECK set."""

import functools
import os
import runpy
import sys

sys.path.insert(0, os.getcwd())
import mis_lightning as ml
import mis_lightning.functional.correlated as C

C.FACTOR_FORM_CHECK = sys.argv[1] == "on"
orig = ml.assess


@functools.wraps(orig)
def forced(*a, **k):
    k.setdefault("covariance", "factor")
    k.setdefault("num_records", 64)
    return orig(*a, **k)


ml.assess = forced
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
