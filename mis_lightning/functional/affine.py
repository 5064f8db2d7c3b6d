"""Affine integer grids (value ``(q - zero_point) * scale``, codes ``q in [qmin, qmax]``):
their codes, cell edges and fast cell moments (method.md section 5).

Round-to-nearest cells are bounded by the midpoints ``(q + 1/2 - zero_point) * scale``; the
two outer cells are unbounded. All tensors are per element (``[c]``, one chunk of a flattened
parameter): nothing here is ever of the size of a whole model times the number of cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._user_warnings import warn
from . import kernel as _kernel
from .cells import CellMoments
from .fastpath import GUARD, SAME_ARITHMETIC, compare, sample_indices, verify_sample
from .kernel import (
    _FUSED_STATE,
    _MAX_WINDOW,
    COMPILED_PATH,
    CUTOFF_SIGMAS,
    FINE_STEP,
    REFERENCE_FINE_STEP,
    TABLE_H_MAX,
    CompilePolicy,
    _float64_inputs,
    _uniform_table,
    _uniform_table_axes,
    fine_grid_moments,
    windowed_moments,
)

# Window half-widths (number of edges each side) used for the elements summed exactly.
_WINDOW_BUCKETS = (2, 3, 4, 6, 10, 18)
# Floats per [rows, edges] working tensor of the windowed sums: small enough that a dozen
# temporaries stay in cache (eager torch is memory-bound here; measured in
# benchmarks/cell_statistics_speed.py).
_ROWS_BUDGET = 1 << 16
# Chunks of at least this many elements go through the fused kernel.
TABLE_MIN_ELEMENTS = 1 << 15
# Names of the optimised paths, as the self-check warnings print them.
FUSED_PATH = "the fused cell-moment kernel ((h, t) table, two-edge and fine forms)"
SPARSE_PATH = "the per-regime cell sums (fine-grid expansion)"


def affine_codes(theta: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest (halves to even) codes of ``theta`` on an affine grid, as float64.

    The nearest value ``(q - zero_point) * scale`` has ``q = round(theta / scale + zero_point)``;
    with an integer zero point this is the backends' ``round(theta / scale) + zero_point``, and
    it stays right for float zero points (torchao's tinygemm layout).
    """
    zp = zero_point.to(torch.float64)
    frac = zp - torch.round(zp)
    q = torch.round(theta.to(torch.float64) / scale.to(torch.float64) + frac) + (zp - frac)
    return q.clamp(qmin, qmax)


def affine_boundaries(
    theta: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    half_window: int,
    code: Tensor | None = None,
) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` around each element's code (parameter units).

    The edges are those of the codes ``code - half_window + 1 .. code + half_window - 1``
    plus ``-inf`` and ``+inf`` at the ends (the two outer cells lump the remaining codes,
    which lie beyond the window). Edges beyond ``[qmin, qmax]`` collapse to ``-inf`` or
    ``+inf`` (empty cells), so the layout is the same for every element.

    Args:
        theta: ``[c]`` weights; scale, zero_point: ``[c]`` per-element grid parameters.
        code: ``[c]`` the backend's own integer codes; computed by round-to-nearest if None.
    """
    s = scale.to(torch.float64)
    zp = zero_point.to(torch.float64)
    q0 = affine_codes(theta, scale, zero_point, qmin, qmax) if code is None else code.to(torch.float64)
    i = torch.arange(-half_window + 1, half_window + 1, dtype=torch.float64, device=theta.device)
    upper_code = q0.unsqueeze(-1) + i  # edge i separates codes upper_code - 1 and upper_code
    edges = (upper_code - 0.5 - zp.unsqueeze(-1)) * s.unsqueeze(-1)
    edges = torch.where(upper_code <= qmin, torch.full_like(edges, -math.inf), edges)
    edges = torch.where(upper_code > qmax, torch.full_like(edges, math.inf), edges)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=-1)


def _fine(h: Tensor, lower: Tensor | None, upper: Tensor | None, kappa_only: bool) -> CellMoments:
    """:func:`fine_grid_moments` (looked up on this module: tests substitute it), with
    ``kappa_only`` passed only when set."""
    if kappa_only:
        return fine_grid_moments(h, lower, upper, kappa_only=True)
    return fine_grid_moments(h, lower, upper)


def _affine_cell_moments_sparse(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
    fine_step: float = FINE_STEP,
    kappa_only: bool = False,
) -> CellMoments:
    """The per-regime path of :func:`affine_cell_moments` (frozen skipped, fine expansion,
    exact window sums grouped by window size): used for small chunks and for the elements of
    large chunks whose cells reach a clamped end of the code range.

    ``fine_step``: steps (sd units) at or below which the fine-grid expansion replaces the
    cell sum. The reference path (:func:`affine_reference_moments`) lowers it to the step
    below which the window would exceed ``_MAX_WINDOW`` edges.

    ``kappa_only``: the fine-grid forms skip ``mean_abs`` and ``m4`` (left NaN there; the exact
    window sums still fill them); ``kappa`` is bitwise the same."""
    th, sg, s, zp = _float64_inputs(theta, sigma, scale, zero_point)
    q0 = affine_codes(th, s, zp, qmin, qmax) if code is None else code.to(torch.float64)
    h = s / sg
    # Standardised distances to the lower and upper edge of the element's own cell.
    lower = torch.where(q0 > qmin, (th - (q0 - 0.5 - zp) * s) / sg, torch.full_like(th, math.inf))
    upper = torch.where(q0 < qmax, ((q0 + 0.5 - zp) * s - th) / sg, torch.full_like(th, math.inf))
    to_min = (th - (qmin + 0.5 - zp) * s) / sg
    to_max = ((qmax - 0.5 - zp) * s - th) / sg

    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    # kappa_only: not computed (NaN) where the fine-grid forms run
    mean_abs = torch.full_like(kappa, math.nan) if kappa_only else torch.zeros_like(kappa)
    m4 = torch.full_like(kappa, math.nan) if kappa_only else torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)

    def put(ii: Tensor, fm: CellMoments) -> None:
        # gathered once by index (index_select / index_copy_: the same values as boolean-mask
        # indexing, a few times faster on small chunks)
        kappa.index_copy_(0, ii, fm.kappa)
        if not kappa_only:
            # the fine forms' mean_abs exact from the nearest edge (the expansion's is an average
            # over the position in the cell), with the switch on
            ma = (_kernel.affine_fine_mean_abs(th.index_select(0, ii), sg.index_select(0, ii), s.index_select(0, ii),
                                               zp.index_select(0, ii), qmin, qmax)
                  if _kernel.EXACT_AFFINE_MEAN_ABS else fm.mean_abs)
            mean_abs.index_copy_(0, ii, ma)
            m4.index_copy_(0, ii, fm.m4)

    frozen = (lower > CUTOFF_SIGMAS) & (upper > CUTOFF_SIGMAS)
    fine_all = ~frozen & (h <= fine_step)
    far_ends = (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS)
    ii = torch.nonzero(fine_all & far_ends).squeeze(-1)
    if ii.numel():
        put(ii, _fine(h.index_select(0, ii), None, None, kappa_only))
    ii = torch.nonzero(fine_all & ~far_ends).squeeze(-1)
    if ii.numel():
        # A fine grid whose end cell is within reach (the weight's sd spans to the end of the
        # code range): fine interior + exact end cells; far ends drop out (phi(8.5) ~ 0).
        t_min, t_max = to_min.index_select(0, ii), to_max.index_select(0, ii)
        lo_edge = torch.where(t_min > CUTOFF_SIGMAS, torch.full_like(t_min, -math.inf), -t_min)
        hi_edge = torch.where(t_max > CUTOFF_SIGMAS, torch.full_like(t_max, math.inf), t_max)
        put(ii, _fine(h.index_select(0, ii), lo_edge, hi_edge, kappa_only))
    fine = fine_all
    rest = ~(frozen | fine)
    if bool(rest.any()):
        need = (torch.ceil(CUTOFF_SIGMAS / h[rest]) + 1).clamp(max=_MAX_WINDOW)
        windowed_moments(
            (kappa, mean_abs, m4, coverage), torch.nonzero(rest).squeeze(-1), need,
            (*_WINDOW_BUCKETS, _MAX_WINDOW), _ROWS_BUDGET,
            lambda ii, m: affine_boundaries(th[ii], s[ii], zp[ii], qmin, qmax, m, code=q0[ii]), th, sg)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)


def affine_reference_moments(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
) -> CellMoments:
    """Reference cell moments on an affine grid: the exact sum over every cell edge within
    8.5 sd of each element (``cells.moments_from_alpha``); only steps below
    ``REFERENCE_FINE_STEP`` (~0.0166 sd, windows of more than 512 edges) use the fine-grid
    expansion, whose error is below 1e-14 there. Slow: the optimised paths of
    :func:`affine_cell_moments` are checked against it on samples (``fastpath``).

    Args and returns as :func:`affine_cell_moments`.
    """
    return _affine_cell_moments_sparse(theta, sigma, scale, zero_point, qmin, qmax, code,
                                       fine_step=REFERENCE_FINE_STEP)


def _sparse_checked(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, qmin: int, qmax: int,
                    code: Tensor | None, kappa_only: bool = False) -> CellMoments:
    """The per-regime path, checked against the reference on a sample (see ``fastpath``;
    ``kappa_only``: only ``kappa`` is computed and checked)."""
    if SPARSE_PATH in GUARD.disabled:
        return affine_reference_moments(th, sg, s, zp, qmin, qmax, code)
    out = _affine_cell_moments_sparse(th, sg, s, zp, qmin, qmax, code, kappa_only=kappa_only)
    th64, sg64, s64 = _float64_inputs(th, sg, s)
    h = s64 / sg64  # cheap: computed whether or not a check is due
    ok = verify_sample(
        SPARSE_PATH, th.shape[0], out, lambda: (h, [h <= FINE_STEP, h > FINE_STEP]),
        lambda idx: affine_reference_moments(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax,
                                             None if code is None else code[idx]),
        "exact cell sums", kappa_only=kappa_only)
    return out if ok else affine_reference_moments(th, sg, s, zp, qmin, qmax, code)


def _kernel_table(compiled: bool) -> tuple[float, float, float, Tensor]:
    """``(lo, dlog, du, table)`` for the fused kernel: the uniform-grid table
    (:func:`~mis_lightning.functional.kernel._uniform_table`, ~0.1-0.2 s of exact sums to build,
    once per process) for the compiled kernel, which reads it for every element (branch-free);
    for the eager one its axes and, until it is built, an empty ``[0, 12]`` placeholder, which
    the eager kernel replaces by the table at its first read (``kernel._table_read``): only
    elements whose step ``h = s / sd`` is neither at most ``FINE_STEP`` nor at least
    ``TABLE_H_MAX`` read it, so a process without any (the 1e5 benchmark MLP's int8 and int4
    layers, whose sd spans the grid; the saved 1e7 one's) never builds it."""
    if compiled or _kernel._TABLE is not None:
        return _uniform_table()
    return (*_uniform_table_axes(), torch.empty(0, 12, dtype=torch.float64))


def affine_cell_moments(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
    *,
    compile_policy: CompilePolicy | None = None,
    kappa_only: bool = False,
    path_elements: int | None = None,
) -> CellMoments:
    """``kappa``, ``mean_abs``, ``m4`` of every element of an affine-grid chunk, fast.

    Regimes, chosen per element from the step ``h = scale / sigma``:

    * frozen -- both edges of the element's cell lie beyond 8.5 sigma: all moments are 0
      (< 1e-15 of kappa is lost);
    * fine -- ``h <= 0.5``: the fine-grid expansion of :func:`fine_grid_moments`, with the
      end cells of the code range treated exactly when they are within 8.5 sigma (kappa
      error < 5e-4 h^2 there, measured in tests/test_grids.py; in the fused kernel too);
      ``mean_abs`` exact there (:func:`~mis_lightning.functional.kernel.affine_fine_mean_abs`:
      ``2 phi`` of the distance to the nearest edge, ``kernel.EXACT_AFFINE_MEAN_ABS``);
    * otherwise the exact cell sum over the edges within 8.5 sigma.

    Chunks of at least ``TABLE_MIN_ELEMENTS`` elements go through one branch-free kernel
    (:func:`~mis_lightning.functional.kernel._fused_affine`; run under ``torch.compile`` as
    ``compile_policy`` says) in which
    steps between 0.5 and 19 sd read a precomputed table of exact sums
    (:func:`uniform_table_moments`, kappa error < 1e-4, measured in tests/test_grids.py) and
    larger steps a two-edge closed form (eager: in blocks of ``kernel.EAGER_BLOCK`` elements,
    :func:`~mis_lightning.functional.kernel.in_blocks`); elements with steps above 0.5 sd near a
    clamped end of the code range are then recomputed exactly (fine steps near an end keep the kernel's
    end-cell form: large models, whose sd spans the whole code range, stay in the kernel).

    Every optimised path is checked against its reference on a sample of its output (at first
    use per thread count, per new chunk size and code range for compiled code, then every few calls;
    :mod:`~mis_lightning.functional.fastpath`): a path that disagrees is disabled for the
    process with a ``RuntimeWarning`` and the call is recomputed by the next path down.

    Args:
        theta, sigma, scale, zero_point: ``[c]`` (parameter units; ``sigma >= 0``).
        qmin, qmax: the integer code range.
        code: ``[c]`` the backend's codes, if known (ties follow the backend).
        compile_policy: when the fused kernel is compiled (default :class:`CompilePolicy`
            ``"auto"``); decided by the caller (the front ends read ``MIS_LIGHTNING_COMPILE``).
        kappa_only: only ``kappa`` is needed (the bootstrap draws): the eager paths skip the
            ``mean_abs`` and ``m4`` terms of their fine-grid forms and check ``kappa`` alone;
            those two may then hold NaN. ``kappa`` is bitwise the same (the same operations,
            element by element); the compiled kernel computes all three as before.
        path_elements: the size of the call whose path these elements take (default ``c``):
            the live elements of a chunk mostly of point masses (the sd-0 closed form,
            ``ParamGrid._own_moments``) are given alone and take the path, and count towards
            ``compile_policy``, as a call of that many elements of which the others are frozen
            (an element's moments never read another's).

    Returns:
        float64 :class:`CellMoments` of shape ``[c]``.

    Raises:
        Exception: whatever the eager kernel raises (a failed compilation is not raised: it
            falls back to the eager kernel with a ``RuntimeWarning``).
    """
    c = theta.shape[0]
    size = max(c, path_elements or 0)
    if size < TABLE_MIN_ELEMENTS or FUSED_PATH in GUARD.disabled:
        return _sparse_checked(theta, sigma, scale, zero_point, qmin, qmax, code, kappa_only)
    th, sg, s, zp = _float64_inputs(theta, sigma, scale, zero_point)
    kernel, compiled = _kernel._fused_kernel(size, with_codes=code is not None, policy=compile_policy)
    lo, dlog, du, table = _kernel_table(compiled)
    table = table.to(th.device)
    # Every scalar goes in as a 0-d tensor. Python floats given to a dynamic-shape compiled
    # function are traced as symbols, and inductor (torch 2.13) folded the bounds of `clamp`
    # into constants from the first call without guarding them: a kernel compiled for int8
    # (-128..127) then clamped int4 codes to -128..127 (codes off by up to 120, kappa off by
    # 8.6e-3; tests/test_fastpath.py reproduces it with floats).
    bounds = tuple(torch.tensor(float(v), dtype=torch.float64, device=th.device)
                   for v in (qmin, qmax, lo, dlog, du)) + (table,)
    # Looked up on the module so that tests can substitute a kernel.
    eager = _kernel._fused_affine if code is not None else _kernel._fused_affine_codes
    q_given = None if code is None else code.to(torch.float64)

    def run(kernel, idx: Tensor | None = None, blocks: bool = False, **kw):
        # blocks: an eager kernel over the whole chunk runs on cache-sized blocks (element-wise:
        # the same numbers up to an ulp, kernel.in_blocks); the compiled one fuses its loop
        a = (th, sg, s, zp) if idx is None else (th[idx], sg[idx], s[idx], zp[idx])
        if q_given is not None:
            q = q_given if idx is None else q_given[idx]
            a = (*a, q)
        out = _kernel.in_blocks(kernel, a, bounds, **kw) if blocks else kernel(*a, *bounds, **kw)
        return (*out, q) if q_given is not None else out

    try:
        # kappa alone from the eager kernel (the compiled one computes all three)
        kappa, mean_abs, m4, ok, q0 = run(kernel, blocks=not compiled,
                                          **({"kappa_only": True} if kappa_only and not compiled else {}))
    except Exception as exc:  # noqa: BLE001 - a failed compilation falls back to eager, once
        if not compiled:
            raise
        warn(f"torch.compile of the cell-moment kernel failed ({type(exc).__name__}: {exc}); "
             "using the eager kernel", RuntimeWarning)
        _FUSED_STATE["failed"] = True
        compiled = False
        kappa, mean_abs, m4, ok, q0 = run(eager, blocks=True)
    def steps() -> tuple[Tensor, list[Tensor]]:
        # the step in sd and its strata, for the sampled self-checks only (6 chunk-sized
        # operations that most calls, eager and between checks, never read)
        h = s / sg
        return h, [h <= FINE_STEP, (h > FINE_STEP) & (h < TABLE_H_MAX), h >= TABLE_H_MAX]

    if compiled:
        # what the compiled code may specialise on besides the size: checked once each
        variant = (qmin, qmax, q_given is not None, str(th.device))
        k = GUARD.sample_size(COMPILED_PATH, c, per_size=True, variant=variant)
        if k:
            h, strata = steps()
            idx = sample_indices(c, k, [*strata, ~ok])
            ek, el, em, eok, eq = run(eager, idx)
            GUARD.observe(COMPILED_PATH, (kappa[idx], mean_abs[idx], m4[idx]), (ek, el, em))
            problem = compare((kappa[idx], mean_abs[idx], m4[idx]), (ek, el, em), h[idx], SAME_ARITHMETIC,
                              codes=(torch.cat([q0[idx], ok[idx].double()]), torch.cat([eq, eok.double()])),
                              equal_nan=True)
            if problem:
                GUARD.fail(COMPILED_PATH, problem, "the eager kernel")
                kappa, mean_abs, m4, ok, q0 = run(eager, blocks=True)
            else:
                GUARD.passed(COMPILED_PATH, c, variant)
    coverage = torch.ones_like(kappa)
    bad = ~ok
    if bool(bad.any()):
        idx = torch.nonzero(bad).squeeze(-1)
        mm = _sparse_checked(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax, q0[idx], kappa_only)
        kappa, mean_abs, m4 = kappa.clone(), mean_abs.clone(), m4.clone()
        kappa[idx], mean_abs[idx], m4[idx], coverage[idx] = mm.kappa, mm.mean_abs, mm.m4, mm.coverage
    out = CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)

    def regimes() -> tuple[Tensor, list[Tensor]]:
        # fine steps whose sd reaches a clamped end: the kernel's end-cell form, its own stratum
        h, strata = steps()
        cut = CUTOFF_SIGMAS
        near = (h <= FINE_STEP) & (((th - (qmin + 0.5 - zp) * s) / sg <= cut) | (((qmax - 0.5 - zp) * s - th) / sg <= cut))
        return h, [*strata, bad, near]

    ok = verify_sample(
        FUSED_PATH, c, out, regimes,
        lambda idx: affine_reference_moments(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax,
                                             None if q_given is None else q_given[idx]),
        SPARSE_PATH,
        codes=None if q_given is not None else (
            lambda idx: (q0[idx], affine_codes(th[idx], s[idx], zp[idx], qmin, qmax))),
        kappa_only=kappa_only)
    return out if ok else _sparse_checked(th, sg, s, zp, qmin, qmax, code, kappa_only)


#: Progress stage of the up-front compilation (:func:`warm_up_compiled_kernel`).
COMPILE_STAGE = "compile"
#: What the progress output says while it runs.
COMPILE_LABEL = "compiling the cell-moment kernel (once per process)"


def compile_due(policy: CompilePolicy | None, elements: int) -> bool:
    """Whether ``policy`` will run the compiled kernel in a pass that pushes ``elements``
    affine-grid weights through the fused kernel (``"always"``; ``"auto"`` once the process
    total, this pass included, exceeds ``policy.after``) and it has not been compiled and
    checked at this thread count yet (nor failed, nor been disabled by the self-check)."""
    policy = policy or CompilePolicy()
    if elements <= 0 or policy.mode == "never" or _FUSED_STATE["failed"] or COMPILED_PATH in GUARD.disabled:
        return False
    if not policy.wants(int(_FUSED_STATE["elements"]) + int(elements)):  # type: ignore[arg-type]
        return False
    from .bounds import SPLIT_COMPILED_PATH, split_compiled

    ready = _FUSED_STATE["compiled"] is not None and _FUSED_STATE["compiled_codes"] is not None
    split_ready = split_compiled() or SPLIT_COMPILED_PATH in GUARD.disabled
    return not (ready and split_ready and GUARD.is_checked(COMPILED_PATH))


def warm_up_compiled_kernel(policy: CompilePolicy | None = None, elements: int = 0,
                            progress: Callable[[str, int], None] | None = None,
                            device: torch.device | str = "cpu") -> bool:
    """Compile the fused cell-moment kernel and check it against the eager kernel *before* a
    pass, when the pass would otherwise compile mid-call (:func:`compile_due`).

    Both variants (given codes, codes from the grid) run once on a synthetic int8 chunk of
    ``TABLE_MIN_ELEMENTS`` weights spanning the kernel's regimes (fine, table, two-edge,
    frozen, clamped ends) under ``CompilePolicy("always")``, and so does the outer-cell split
    of bounded grids (:mod:`~mis_lightning.functional.bounds`): ``torch.compile`` builds them and
    the first-use self-check (:mod:`~mis_lightning.functional.fastpath`) compares them with the
    eager kernel, disabling the compiled path with a ``RuntimeWarning`` on disagreement. The
    process's element count (what ``"auto"`` waits for) is left as it was.

    Args:
        policy: the caller's compile policy.
        elements: affine-grid weights the coming pass sends through the fused kernel (chunks
            of at least ``TABLE_MIN_ELEMENTS``; 0: nothing is compiled).
        progress: ``progress(stage, completed)`` hook: ``(COMPILE_STAGE, 0)`` before and
            ``(COMPILE_STAGE, 1)`` after (labelled :data:`COMPILE_LABEL` by
            :class:`~mis_lightning.progress.ProgressDisplay`); also logged at INFO level.
        device: where the pass runs.

    Returns:
        True when it compiled (or tried to), False when nothing was due.
    """
    if not compile_due(policy, elements):
        return False
    import logging

    logging.getLogger("mis_lightning").info("%s ...", COMPILE_LABEL)
    if progress is not None:
        progress(COMPILE_STAGE, 0)
    c = TABLE_MIN_ELEMENTS
    gen = torch.Generator().manual_seed(0)
    scale = torch.full((c,), 0.01, dtype=torch.float64)
    theta = torch.randn(c, generator=gen, dtype=torch.float64) * 0.4  # some beyond +-1.27: clamped
    h = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(math.log(0.05), math.log(200.0), generator=gen))
    args = [t.to(device) for t in (theta, scale / h, scale, torch.zeros(c, dtype=torch.float64))]
    before = _FUSED_STATE["elements"]
    always = CompilePolicy("always")
    try:
        codes = affine_codes(args[0], args[2], args[3], -128, 127)
        mm = affine_cell_moments(*args, -128, 127, code=codes, compile_policy=always)
        affine_cell_moments(*args, -128, 127, compile_policy=always)
        # the outer-cell split of grids bounded by the release (absmax scales), on the same chunk
        from .bounds import warm_up_split

        warm_up_split(mm, *args[:3], 127, always)
    finally:
        _FUSED_STATE["elements"] = before
    if progress is not None:
        progress(COMPILE_STAGE, 1)
    return True
