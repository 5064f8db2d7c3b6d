"""A sweep's schemes across seeds: ``mis-lightning -m quantizer=a,b,c seed=0,1,2`` trains one model
per seed, and the aggregate's verdicts judge each seed's jobs apart (each seed is another trained
model, so its rows are no comparison with another seed's). What a user choosing a scheme needs
on top is how each scheme fares over the seeds: :func:`across_seeds_section` writes, per setup
(the jobs' overrides other than their schemes and their seed), one row per scheme with its
leakage and utility over the seeds (mean, min and max) and in how many seeds it was the verdict's
choice (the safest within the utility band of that seed's jobs, as
:func:`~mis_lightning.report.verdict` picks it).

The figures are those of the jobs, unchanged: the mean over seeds estimates what the training
procedure releases on average (each seed a new data split or initialisation, where the seed sets
them), and the min-max is the spread a single seed's figure carries on top of its own 80% interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from mis_lightning.report import (
    UTILITY_TOLERANCE,
    _ranked_rows,
    _ties_baseline,
    _utility_band,
    headline_undetermined,
    leakage_marks,
    safest_in_band,
)

__all__ = ["NO_SAFER", "REPLICATE_OVERRIDES", "across_seeds_section", "seed_of"]

#: a seed's choice where the safest in its utility band reads the unquantized figure (the verdict's
#: "no scheme is safer than the unquantized model")
NO_SAFER = "no scheme safer than the unquantized model"

#: the overrides that replicate a training: jobs that differ in these (and their schemes) alone
#: ran the same setup on another seed
REPLICATE_OVERRIDES = ("seed=", "+seed=", "++seed=")


def seed_of(key: str) -> str:
    """The replicate overrides of a training key (``"seed=1"``), ``""`` without any."""
    return " ".join(o for o in key.split() if o.startswith(REPLICATE_OVERRIDES))


def _setup_of(key: str) -> str:
    return " ".join(o for o in key.split() if not o.startswith(REPLICATE_OVERRIDES))


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _stats(values: list[float]) -> tuple[str, str]:
    """``(mean, "min to max")`` to 4 decimals, dashes without values."""
    if not values:
        return "-", "-"
    mean = sum(values) / len(values)
    return f"{mean:.4f}", f"{min(values):.4f} to {max(values):.4f}"


def across_seeds_section(rows: Sequence[dict[str, Any]], training_key: Callable[[dict[str, Any]], str],
                         utility_key: Callable[[list[dict[str, Any]]], str | None],
                         distinct: Callable[[str, Sequence[str]], str]) -> str:
    """The "Across seeds" Markdown section of ``aggregate.md`` (``""`` when no setup was run on
    two seeds or more with a scheme in two of them).

    Args:
        rows: the aggregate's rows (:func:`~mis_lightning.app.aggregate.rows_of`).
        training_key: a row's overrides other than its schemes (one trained model per key).
        utility_key: the utility key a group of rows is judged by (``None``: none measured).
        distinct: the overrides of a setup that tell it from the sweep's other setups.

    Returns:
        The section: per setup, a table of every scheme over the seeds (leakage and utility
        mean and range, the marks any seed's figure carries, how many seeds chose it), then a
        line naming the scheme chosen in every seed, or each seed's choice.
    """
    ok = [r for r in _ranked_rows(list(rows)) if not r.get("note")]
    setups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in ok:
        key = training_key(r)
        setups.setdefault(_setup_of(key), {}).setdefault(seed_of(key), []).append(r)
    out = []
    keys = list(setups)
    for setup, seeds in setups.items():
        if len(seeds) < 2 or "" in seeds:
            continue
        uk = utility_key([r for g in seeds.values() for r in g])
        chosen: dict[str, str] = {}  # seed -> the verdict's scheme there
        undetermined = []  # seeds whose headline the verdict does not rank (hd51's undet.; rv51)
        for seed, group in seeds.items():
            if len({r.get("scheme") for r in group}) < 2:
                continue  # one scheme in this seed: no choice among schemes (one job of several, `-m seed=0,1,2`
                # with `schemes=[...]`, is one trained model whose own verdict chose: counted, ux56b)
            if any(headline_undetermined(r) for r in group):
                undetermined.append(seed)
                continue
            base = [b for r in group if (b := _f(r.get("baseline_leakage"))) is not None]
            if base and max(base) - min(base) > 1e-9 * max(abs(max(base)), 1e-12):
                continue  # not one trained model (aggregate_verdicts gives this seed no verdict either)
            try:
                best, band = _utility_band(group, uk, float(group[0].get("utility_tolerance", UTILITY_TOLERANCE)))
                pick = safest_in_band(band, uk if best is not None else None)
            except ValueError:  # a utility whose direction is unknown: no guessed choice
                continue
            # the verdict's own rule: a quantized row at the unquantized figure is no choice (cr49)
            chosen[seed] = NO_SAFER if _ties_baseline(pick) else str(pick["scheme"])
        by_scheme: dict[str, list[dict[str, Any]]] = {}
        for group in seeds.values():
            for r in group:
                by_scheme.setdefault(str(r["scheme"]), []).append(r)
        if not any(len(v) > 1 for v in by_scheme.values()):
            continue
        metric = uk.removeprefix("utility_") if uk else None
        where = distinct(setup, keys) if len(keys) > 1 else ""
        head = ["scheme", "seeds", "leakage mean", "leakage min to max"] + (
            [f"{metric} mean", f"{metric} min to max"] if metric else []) + ["marks", "chosen in"]
        lines = [f"## Across seeds{f' ({where})' if where else ''}", "",
                 f"{len(seeds)} seeds ({', '.join(seeds)}), each a separately trained model: each scheme's figures "
                 "over the seeds (the mean estimates what this training releases on average; the range is the "
                 "spread between seeds, on top of each figure's own 80% interval), and in how many seeds it was "
                 "the verdict's choice (the safest within "
                 f"{100 * float(ok[0].get('utility_tolerance', UTILITY_TOLERANCE)):g}% of that seed's best utility).", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        # a seed whose figure is the baseline's (``=``: no credit of its own) is not averaged with the
        # seeds' own figures (nux56: int4's mean took seed 2's baseline figure); all ``=``: that figure
        own = {s: [r for r in rs if not r.get("float_determined")] or rs for s, rs in by_scheme.items()}
        order = sorted(by_scheme, key=lambda s: sum(float(r["leakage"]) for r in own[s]) / len(own[s]))
        for s in order:
            rs = by_scheme[s]
            n_eq = sum(bool(r.get("float_determined")) for r in rs)
            cells = [s, str(len(rs)) + (f" ({n_eq} =)" if n_eq else ""),
                     *_stats([float(r["leakage"]) for r in own[s]])]
            if metric:
                cells += _stats([v for r in rs if (v := _f(r.get(uk))) is not None])
            marks = sorted({m for r in rs for m in leakage_marks(r).split()})
            n_chosen = sum(c == s for c in chosen.values())
            cells += [" ".join(marks) or "-", f"{n_chosen} of {len(chosen)}" if chosen else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if any(r.get("float_determined") for rs in by_scheme.values() for r in rs):
            lines += ["", "(k =) after seeds: in k seeds the scheme's figure is the unquantized baseline's (=: no credit "
                          "of its own, see the legend above); its leakage mean and range are over the other seeds "
                          "(over those k where every seed's is)"]
        if chosen:
            picks = set(chosen.values())
            if picks == {NO_SAFER}:
                lines += ["", f"no scheme is chosen in any seed: in each, {NO_SAFER}"]
            elif len(picks) == 1 and len(chosen) == len(seeds):
                (pick,) = picks
                lines += ["", f"chosen in every seed: {pick} (the safest within the utility band of each seed's jobs)"]
            else:
                lines += ["", "no scheme is chosen in every seed: " + "; ".join(
                    f"{seed}: {pick}" for seed, pick in chosen.items())
                    + " (the seeds' verdicts disagree: compare the schemes' means and ranges above, or add seeds)"]
        if undetermined:
            lines += ["", f"undetermined in {len(undetermined)} seed(s) ({', '.join(undetermined)}): the unquantized "
                          "figure moves beyond its limit with the rank rule (undet.), so no scheme is chosen there"]
        if any(r.get("indicative") for g in seeds.values() for r in g):
            lines += ["", "*: indicative only in at least one seed (an assumption of the analysis fails: see the "
                          "Warnings section)"]
        out.append("\n".join(lines))
    return "\n\n".join(out)
