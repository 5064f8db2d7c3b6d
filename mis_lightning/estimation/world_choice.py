"""One ``"auto"`` choice for every DDP process, from the facts all their first batches measured.

``"auto"`` settles the estimator on a process's first batch (:meth:`MomentAccumulator._update`):

* the exact-sandwich cost (:func:`~.estimate.choose_estimator`) reads the layers seen to reuse their
  weights, the floats of one record's forward and the output floats per record (sequences padded per
  batch: other lengths on each process), and the residual-block check of ``"ggn_residual"``;
* the per-layer program's Gauss-Newton diagonal (``ggn_mode="auto"``, the estimation's own and the
  K-FAC side program's) takes sampled labels where the first batch's loss Hessians need more than
  ``GGN_EXACT_MAX_DIRECTIONS`` directions (a masked or multi-label loss: other records on each process).

Processes whose shards hold other records can choose apart; their sums are then of two estimators
(the sync's refusal, ``streaming._align_first_batches``). Here the choice is made from the facts of
every process, reduced as one process reading all their first batches at once measures them (the
union of the reusing layers, the largest forward and output, the residual block zero only where
every process found it zero, sampled labels where any process needed them), and a process whose own
choice differs re-reads its records under it. A process without records takes it too. Every process
runs the one gather (:func:`agree`), then none or its own re-read, with no collective, then a second
gather of whether that failed (all raise where one did): no hang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .estimate import (
    RESIDUAL_BLOCK_RTOL,
    MomentAccumulator,
    choose_estimator,
    residual_group_key,
    residual_rows_ratios,
)
from .linear_factors import FactoredProgram, LayerProgram

# the programs whose Gauss-Newton choice is made on the first batch: the estimation's, the K-FAC side one
_PROGRAMS = ("factored", "_kron_side")


def choice_facts(acc: MomentAccumulator) -> dict[str, Any]:
    """What ``acc``'s first batch measured for ``"auto"``: ``{"probe": (reused layers, forward floats per
    record, output floats per record) or None (not re-chosen at the first batch), "ggn": {program:
    (choice, directions)}}``, plain Python values (for ``all_gather_object``)."""
    probed = acc._probe_requested and not acc._probe_pending and (bool(acc._reused) or acc._forward_floats is not None)
    ggn = {k: (p.ggn_choice, int(p.ggn_directions)) for k in _PROGRAMS
           if isinstance(p := getattr(acc, k), LayerProgram) and p.ggn_mode == "auto" and p.ggn_choice is not None}
    return {"probe": (list(acc._reused), acc._forward_floats, acc._choice_outputs) if probed else None, "ggn": ggn,
            # the per-sample programs the first batch settled on (the factored one falls back to the
            # per-layer one on a model with several outputs per record) and why one refused the model
            "programs": {k: type(getattr(acc, k)).__name__ for k in _PROGRAMS}, "kfac_refused": acc._kfac_refused,
            "estimator": (acc.mode, acc.hessian)}


def world_choice(facts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The facts one process reading every process's first batch at once measures, from each process's
    :func:`choice_facts` (those with records, in rank order): the union of the reusing layers, the
    largest forward and output floats per record (a batch padded to its longest record), outputs
    ``None`` where any process had none (its residual block not zero: no ``"ggn_residual"``), and per
    program the most Gauss-Newton directions (sampled labels where any process took them)."""
    probes = [f["probe"] for f in facts if f["probe"] is not None]
    probe = None
    if probes:
        floats = [p[1] for p in probes if p[1] is not None]
        outs = [p[2] for p in probes]
        probe = (sorted({r for p in probes for r in p[0]}), max(floats) if floats else None,
                 None if any(o is None for o in outs) else max(outs))
    ggn: dict[str, tuple[str, int]] = {}
    for f in facts:
        for k, (choice, dirs) in f["ggn"].items():
            was = ggn.get(k, ("ggn", 0))
            ggn[k] = ("ggn_mc" if "ggn_mc" in (choice, was[0]) else "ggn", max(dirs, was[1]))
    # (the programs follow the estimator: those of the first process that chose each)
    programs: dict[tuple[str, str], dict[str, str]] = {}
    for f in facts:
        programs.setdefault(tuple(f["estimator"]), f["programs"])
    return {"probe": probe, "ggn": ggn, "programs": programs,
            "kfac_refused": next((f["kfac_refused"] for f in facts if f["kfac_refused"] is not None), None)}


def world_residual(infos: Sequence[dict[str, Any] | None], rows: Sequence[dict[str, Any] | None] | None = None,
                   ranks: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The ``"ggn_residual"`` block checks' diagnostics (``MomentAccumulator._residual_info``: the
    largest module's block skipped, its ratio, the other modules' blocks found zero and their ratios)
    of one process reading every process's first batch at once, from each process's (``infos``;
    ``None``: it ran no check; ``None`` where none did), its checks' rows ``R v``
    (``MomentAccumulator._residual_rows``, ``rows``) and its rank (``ranks``, default the index).

    The residual term of the union of the first batches is the sum of theirs, and every process draws
    a block's tangents alike (:func:`~.estimate.residual_block_rows`): the ratios here are those of
    the summed rows, the union's exactly (formerly the processes' largest was reported, 0.342 on a tanh
    CNN where the union read 0.255, and below it elsewhere: not even a bound; docs/benchmarks.md "dd58"), and so are the decisions
    (a block zero where the union's ratio is at most ``RESIDUAL_BLOCK_RTOL``). Where a process left a
    block out of its own sums (its first batch found it zero: the skipped largest block, a zero
    block) that the union did not find zero, that block's residual was not computed on that process's
    records: ``"residual_not_computed"`` ``{module: [ranks]}`` (the report marks the figures ``*``
    and warns). Every process reports this, one without records too (it formerly reported none).
    Processes whose rows are missing (a Metric pickled before they were kept): each ratio the
    largest over the processes, said in ``"residual_ratios"``."""
    ranks = list(range(len(infos))) if ranks is None else list(ranks)
    rows = [None] * len(infos) if rows is None else list(rows)
    seen = [(i, r, k) for i, r, k in zip(infos, rows, ranks) if i is not None]
    if not seen:
        return None
    if len(seen) == 1:
        return dict(seen[0][0])
    out = _largest_residual([i for i, _, _ in seen]) if any(r is None or "largest" not in r for _, r, _ in seen) \
        else _union_residual(seen)
    left_out = {residual_group_key(g) for g in [out["residual_skipped_block"]] + out.get("residual_zero_blocks", []) if g}
    missing: dict[str, list[int]] = {}
    for info, _, k in seen:
        for g in [info["residual_skipped_block"]] + info.get("residual_zero_blocks", []):
            if g and residual_group_key(g) not in left_out:
                missing.setdefault(residual_group_key(g), []).append(k)
    out.pop("residual_not_computed", None)
    if missing:
        out["residual_not_computed"] = missing
    return out


def _union_residual(seen: Sequence[tuple[dict[str, Any], dict[str, Any], int]]) -> dict[str, Any]:
    """:func:`world_residual`'s decisions and ratios from the processes' summed check rows."""
    out = dict(seen[0][0])
    block, idx, _ = seen[0][1]["largest"]
    d = int(seen[0][1]["largest"][2].shape[1])
    ratio = residual_rows_ratios(sum(r["largest"][2] for _, r, _ in seen), [idx])[0]
    skip = ratio <= RESIDUAL_BLOCK_RTOL
    out.update(residual_skipped_block=list(block) if skip else [], residual_block_ratio=ratio,
               residual_columns=d - (int(idx.numel()) if skip else 0))
    if all("residual_zero_blocks" in i and "others" in r for i, r, _ in seen):
        # the union's other blocks: every module but the skipped one, in the parameters' order
        at = {tuple(g): int(ix[0]) for _, r, _ in seen for g, ix in zip(r["others"][0], r["others"][1])}
        at[tuple(block)] = int(idx[0])
        groups = sorted((g for g in at if not (skip and list(g) == list(block))), key=at.__getitem__)
        zero, ratios = [], {}
        for g in groups:
            parts = []
            for _, r, _ in seen:
                names, where, R = r["others"]
                j = names.index(list(g)) if list(g) in names else None
                parts.append(None if j is None else (R[2 * j: 2 * j + 2], where[j]))
            if all(p is not None for p in parts):
                ratios[residual_group_key(list(g))] = residual_rows_ratios(sum(p[0] for p in parts), [parts[0][1]])[0]
            else:  # (the largest block, which a process skipped: its own check's rows, summed above)
                ratios[residual_group_key(list(g))] = ratio
            if ratios[residual_group_key(list(g))] <= RESIDUAL_BLOCK_RTOL:
                zero.append(list(g))
        out["residual_zero_blocks"], out["residual_block_ratios"] = zero, ratios
    else:
        out.pop("residual_zero_blocks", None)
        out.pop("residual_block_ratios", None)
    return out


def _largest_residual(seen: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`world_residual` where a process's check rows are missing: the decisions (a block zero
    where every process found it zero) and each ratio the largest over the processes, not the union's."""
    first = seen[0]
    out = dict(first)
    if not all(i["residual_skipped_block"] == first["residual_skipped_block"] for i in seen):
        out["residual_skipped_block"] = []
    out["residual_columns"] = max(i["residual_columns"] for i in seen)
    out["residual_block_ratio"] = max(float(i["residual_block_ratio"]) for i in seen)
    if all("residual_zero_blocks" in i for i in seen):
        out["residual_zero_blocks"] = [g for g in first["residual_zero_blocks"]
                                       if all(g in i["residual_zero_blocks"] for i in seen)]
        keys = dict.fromkeys(k for i in seen for k in i["residual_block_ratios"])
        out["residual_block_ratios"] = {k: max(float(i["residual_block_ratios"].get(k, 0.0)) for i in seen) for k in keys}
    else:
        out.pop("residual_zero_blocks", None)
        out.pop("residual_block_ratios", None)
    out["residual_ratios"] = "the largest over the DDP processes, not their union's (a process's check rows were not kept)"
    return out


def world_estimator(acc: MomentAccumulator, world: dict[str, Any]) -> tuple[str, str]:
    """``(mode, hessian)`` that ``world``'s facts give ``acc``'s request."""
    mode, hessian = acc.mode, acc.hessian
    if world["probe"] is not None:
        req_mode, req_hessian, n_hint, ggn = acc._request
        reused, floats, outputs = world["probe"]
        mode, hessian, _ = choose_estimator(
            acc.model, acc.d, req_mode, req_hessian, n=n_hint, ggn=ggn, reused=reused,
            forward_floats=float("inf") if floats is None else floats, outputs=outputs, largest=acc._largest,
            symmetric=acc._symmetric_layers())
    main = world["ggn"].get("factored")
    if hessian in ("ggn", "ggn_mc") and main is not None:
        hessian = main[0]
    return mode, hessian


def follows(acc: MomentAccumulator, world: dict[str, Any]) -> bool:
    """Whether ``acc``'s sums are those ``world``'s choice accumulates: the same estimator, per-sample
    programs and Gauss-Newton choice of every first-batch program."""
    own, target = choice_facts(acc), world_estimator(acc, world)
    return target == (acc.mode, acc.hessian) and own["programs"] == world["programs"].get(target, own["programs"]) \
        and all(own["ggn"].get(k, choice)[0] == choice[0] for k, choice in world["ggn"].items())


def force(acc: MomentAccumulator, world: dict[str, Any]) -> None:
    """Make ``acc`` (before its first batch, or without records) take ``world``'s choice: its estimator
    re-chosen from ``world``'s facts (:meth:`MomentAccumulator.resolve`, a fresh state) and its
    programs' Gauss-Newton choice set, kept where a program is rebuilt (:meth:`MomentAccumulator.reset_program`)."""
    if world["probe"] is not None:
        reused, floats, outputs = world["probe"]
        acc.resolve(reused, floats, outputs)
    acc._forced_ggn = dict(world["ggn"])
    kinds = world["programs"].get(world_estimator(acc, world))
    if kinds is None:  # (no process chose it: the programs of the first batch to come)
        acc._settle_ggn()
        return
    take_programs(acc, kinds)  # (a process without records kept the first one)
    acc._kfac_refused = acc._kfac_refused or world["kfac_refused"]
    for k in _PROGRAMS:
        acc._apply_forced_ggn(getattr(acc, k), k)
    acc._settle_ggn()


def take_programs(acc: MomentAccumulator, kinds: dict[str, str]) -> None:
    """Rebuild ``acc``'s first-batch programs (the estimation's ``factored``, the K-FAC side one) as
    the kinds ``kinds`` names (``{attribute: class name}``, :func:`choice_facts`' ``"programs"``)
    where they differ: those another process settled on (:func:`force`), or those of the accumulator
    an unpickled Metric rebuilds (a fresh accumulator builds the K-FAC side program for one output
    per record: docs/benchmarks.md "dd58", a classifier's factors then read as one output's)."""
    if type(acc.factored).__name__ != kinds["factored"]:
        if acc.factored is not None:
            acc.factored.close()
        kind = {"LayerProgram": LayerProgram, "FactoredProgram": FactoredProgram}.get(kinds["factored"])
        acc.factored = acc._fast_program(kind) if kind is not None else None
    if type(acc._kron_side).__name__ != kinds["_kron_side"]:
        acc._set_kron_side(LayerProgram if kinds["_kron_side"] == "LayerProgram" else FactoredProgram)
        if kinds["_kron_side"] == "NoneType" and acc._kron_side is not None:
            acc._kron_side.close()
            acc._kron_side = None


def agree(acc: MomentAccumulator, read: bool, gather: Callable[[Any], list[Any]],
          reread: Callable[[dict[str, Any]], None]) -> bool:
    """Run by every process after its estimation pass, before the sync: ``gather`` (every process's
    object, in rank order; a collective every process runs) the :func:`choice_facts` of those that
    ``read`` records; where this process's choice is not the world's, ``reread(world)`` (its records
    again under ``world``'s choice: a fresh accumulator given :func:`force`, no collective); a process
    without records takes the choice without reading. Then a second ``gather`` of each process's
    failure there (every process, whether it re-read or not), so that all raise or none does.
    Returns whether this process re-read.

    Raises:
        RuntimeError: a process's re-read (or :func:`force`) raised: on every process, naming the
            first such process and its error (chained from it on that process)."""
    facts = [f for f in gather(choice_facts(acc) if read else None) if f is not None]
    if not facts:
        return False
    world = world_choice(facts)
    again, error = False, None
    try:
        if not read:
            force(acc, world)
        elif not follows(acc, world):
            again = True
            del acc  # (this frame's reference: the re-read can free the first pass's accumulator)
            reread(world)
    except Exception as exc:  # noqa: BLE001 - every process learns of it below, then every one raises
        error = exc
    # (rv56d: a re-read raising on one process alone, an out-of-memory say, left the others waiting
    # at the sync's gather, the failing one gone on with training; the callback catches it with
    # strict=False) every process runs this second gather and raises where any one failed
    failed = [(k, msg) for k, msg in enumerate(gather(None if error is None else f"{type(error).__name__}: {error}"))
              if msg is not None]
    if failed:
        k, msg = failed[0]
        raise RuntimeError(f"process {k} failed to read its records under the DDP processes' common \"auto\" "
                           f"choice ({msg}); every process stops the estimation here (the others would wait "
                           "for it at the sync)") from error
    return again


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every process's ``obj`` in rank order (``torch.distributed.all_gather_object`` over ``group``,
    default the world): one collective, run by every process."""
    out: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


__all__ = ["agree", "choice_facts", "follows", "force", "gather_objects", "take_programs", "world_choice", "world_estimator",
           "world_residual"]
