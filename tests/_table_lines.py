"""The entry of a printed table (the legend's, the verdict) that starts with ``prefix``, its
continuation lines (wrapped at 100 columns, indented four spaces: ``report.wrap_entry``) joined
back with single spaces."""

from __future__ import annotations


def entry(text: str, prefix: str) -> str:
    """The first line of ``text`` starting with ``prefix`` and its continuation lines, on one line.

    Raises:
        StopIteration: no line starts with ``prefix``.
    """
    lines = text.splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
    block = [lines[k]]
    for ln in lines[k + 1:]:
        if not ln.startswith("    "):
            break
        block.append(ln)
    return " ".join(" ".join(block).split())
