"""How many times operators ran in a call, read from ``torch.profiler``'s raw events.

``prof.events()`` turns every raw event into a ``FunctionEvent`` and rebuilds the call tree: ~50 us
an event, 5 CPU s for a float8 cell-moment call of a 16x128 grid (~110k operators) against 0.5 s
for the profiled call itself (t53). Counting names needs none of that: the raw (kineto) events
carry the same operator names, one event per dispatch. The parsed list folds an operator that
re-enters an operator of its own name as its only child (``aten::mul`` with a Python scalar,
``aten::count_nonzero``) into one event; the raw count has both. For the operators the tests count
(``aten::index``, ``aten::index_put_``, ``aten::special_ndtr``: none re-enters itself) the counts
are the parsed list's (t53: equal on every cell-moment call of tests/test_gather.py and
tests/test_split_on_edge.py). Where a torch build lacks the raw results, the parsed events are
counted as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from torch.profiler import ProfilerActivity, profile


def op_counts(fn: Callable[[], object], names: Iterable[str]) -> Counter[str]:
    """Operator name -> number of dispatches while ``fn()`` runs, for the operators ``names``
    (CPU activity: ``aten::*`` names; a name that did not run counts 0)."""
    wanted = set(names)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    raw = getattr(prof.profiler, "kineto_results", None)
    events = (e.name for e in prof.events()) if raw is None else (e.name() for e in raw.events())
    return Counter(name for name in events if name in wanted)
