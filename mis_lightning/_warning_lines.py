"""A warning's one console line: its first sentence (seven warnings of a fit printed 4,870
characters on the console, and the table repeated them in full under the figures).

The console (the callback's and the Metric's ``UserWarning``s, the printed table) shows each of the
report's warnings as :func:`warning_line`, its first clause naming what failed and the culprit;
the full text stays in the report (``Report.warnings``, the JSON, :meth:`Report.warnings_text`,
``Report.table(verbose=True)``, the app's ``report.md``). A line that leaves text out ends in
:data:`MORE`, and is a prefix of the full text, so the full text is found by it. The warnings behind
the table's ``*`` mark are one entry instead (a line each under one lead), naming each (:func:`mis_lightning.report.console_warnings`).
"""

from __future__ import annotations

import re

__all__ = ["FAILED_SCHEME", "MORE", "WARNING_LINE_WIDTH", "warning_line"]

#: the most characters of a warning's console line (before :data:`MORE`)
WARNING_LINE_WIDTH = 160
#: a first clause shorter than this ("saddle not excluded") takes in the next clause
_SHORT = 40
#: appended to a line that leaves text out
MORE = " [...]"
#: words whose period does not end a sentence (the word before the period, opening brackets and
#: quotes left out)
_ABBREVIATIONS = frozenset({"e.g", "i.e", "cf", "vs", "etc", "approx", "resp", "incl", "sec", "eq", "fig", "no"})
_OPEN, _CLOSE = "([{", ")]}"
#: the lead of a failed scheme's warning (:func:`mis_lightning.report.failure_warning` writes it): one
#: message whose cause is its end ("... failed, no figures: SchemeUnavailableError: ... needs a CUDA
#: GPU ..."), so its line is cut by words at the width, not after the error's class (rv53)
FAILED_SCHEME = "scheme {name!r} failed, no figures: "
_FAILURE = re.compile(re.escape(FAILED_SCHEME).replace(re.escape("{name!r}"), "'[^']*'"))


def _boundaries(text: str, commas: bool, brackets: bool = False, clauses: bool = True) -> list[int]:
    """The ends of the clauses of ``text`` outside brackets: before ``". "``, ``": "``,
    ``"; "``, ``" -- "`` (and ``", "`` where ``commas``; before ``" ("`` where ``brackets``;
    only ``". "``, the sentences' ends, where not ``clauses``), in order."""
    out, depth = [], 0
    for i, c in enumerate(text):
        if c in _OPEN:
            if brackets and depth == 0 and i > 0 and text[i - 1] == " ":
                out.append(i - 1)
            depth += 1
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
        elif depth == 0 and text[i + 1:i + 2] == " ":
            if clauses and (c in ":;" or (commas and c == ",")):
                out.append(i)
            elif c == "." and i > 0 and text[:i].rsplit(" ", 1)[-1].lstrip("([{'\"").lower() not in _ABBREVIATIONS:
                out.append(i)
            elif clauses and c == " " and text[i:i + 4] == " -- ":
                out.append(i)
    return out


def warning_line(text: str, width: int = WARNING_LINE_WIDTH) -> str:
    """The console line of a warning ``text``: its first sentence (up to the first ``". "``
    outside brackets) where that fits in ``width`` characters, else its first clause (up to the
    first ``.``, ``:``, ``;`` or `` -- `` outside brackets), with the next clause (to its next
    ``,``) when the first is shorter than 40 characters ("saddle not excluded: the Hessian's lowest eigenvalue reads ...");
    when longer than ``width`` characters, cut at the last ``", "`` or ``" ("`` outside brackets
    between 40 characters and ``width`` (a bracket kept whole or left out), else at the last
    space before ``width`` (inside a bracket: the culprits it names are kept). The text itself
    when it fits and has one clause; else the line, a prefix of ``text``, ends in :data:`MORE`.
    A failed scheme's warning (``"scheme 'x' failed, no figures: <error>"``) is cut by words at
    ``width``: its cause is the error's message, after the error's class.

    Raises:
        ValueError: ``width`` below 40 (no first clause would fit).
    """
    if width < _SHORT:
        raise ValueError(f"width must be >= {_SHORT}, got {width}")
    text = " ".join(text.split())  # one line
    if _FAILURE.match(text) and len(text) > width:
        return text[:text.rfind(" ", 0, width + 1)].rstrip(" ,;:.") + MORE
    sentence = next(iter(_boundaries(text, commas=False, clauses=False)), len(text))
    ends = _boundaries(text, commas=False)
    end = ends[0] if ends else len(text)
    if sentence <= width:  # the first sentence, whole, where it fits
        end = sentence
    elif end < _SHORT:  # "saddle not excluded": the next clause says what it is
        end = next((e for e in _boundaries(text, commas=True) if e > end + 2), len(text))
    if end > width:
        fits = [e for e in _boundaries(text, commas=True, brackets=True) if _SHORT <= e <= width]
        end = fits[-1] if fits else (text.rfind(" ", 0, width + 1) if " " in text[:width] else width)
    line = text[:end].rstrip(" ,;:.")
    return line if end >= len(text) else line + MORE
