"""Dtype casts as quantizers: ``bf16`` and ``fp16`` (method.md section 5).

A cast to ``torch.bfloat16`` / ``torch.float16`` rounds every floating parameter to the
nearest representable value of the format (round half to even), so the release is a
quantized model whose grid is the format's table of finite values (kind ``"table"``,
scale 1). What ``model.to(dtype)`` casts is cast here: every floating parameter (weights
and biases) of every module, and the floating buffers too (buffers are released but not
scored); ``filter_fn(module, fqn)`` restricts the modules (a module's own parameters,
``recurse=False``).

The quantized copy keeps its parameters in their original dtype (float32) holding the cast
values (every bf16/fp16 value is exactly a float32 value), so it runs on float32 inputs
unchanged; the grid's ``dequantized`` is the same float32 tensor.

Overflow: torch casts finite weights from the midpoint between the largest finite value and
the next power of two on (float16: ``|w| >= 65520``; bfloat16: ``>= 3.3961775e38``) to
``+-inf``, so the largest value's cell ends there and an unbounded cell of ``inf`` lies beyond.
The grid's table (:func:`cast_cell_values`) holds that power of two (65536; ``2^128``) at each
end as the ``inf`` cell's value: its cells are the cast's (tests/test_cast_cells.py; formerly
the largest value's cell ran on to infinity, kappa up to 7e-5 low at sds of 3e4-1e6 around
0, 0.2 at 65504), and the grid's ``release_dtype`` turns it into ``inf`` where a released value is
asked for (:meth:`~mis_lightning.quantization.ParamGrid.cell_value`). ``apply`` adds a note
naming the parameters where a weight overflowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..functional.formats import check_format_dtype, format_values
from .base import ParamGrid, SchemeConfig, dequantized_kept
from .registry import register_scheme

_VALUE_TABLES: dict[torch.dtype, Tensor] = {}


def representable_values(dtype: torch.dtype) -> Tensor:
    """Every finite value of an 8- or 16-bit floating dtype, sorted, unique, as float64.

    Enumerates the bit patterns (:func:`~mis_lightning.functional.formats.format_values`:
    the non-negative ones of a sign-magnitude format, negated for the other half), drops NaN and
    infinities, merges ``+0`` and ``-0``. Cached per dtype (the tensor is shared: do not
    modify it).

    Raises:
        ValueError: ``dtype`` is not an 8- or 16-bit floating dtype of one value a bit pattern
            (a packed format such as ``float4_e2m1fn_x2`` too).
    """
    if dtype not in _VALUE_TABLES:
        check_format_dtype(dtype, "representable_values")
        _VALUE_TABLES[dtype] = format_values(dtype)
    return _VALUE_TABLES[dtype]


_CELL_TABLES: dict[torch.dtype, Tensor] = {}


def cast_cell_values(dtype: torch.dtype) -> Tensor:
    """The value table of a cast to ``torch.bfloat16`` / ``torch.float16`` as cells: every finite
    value (:func:`representable_values`) and, at each end, ``+-2^(emax + 1)``, the value the
    format would have after its largest one, standing for ``+-inf``: the midpoint between them is
    where torch's cast overflows (round half to even sends the midpoint itself to ``inf``, as the
    table's cells do), float64, sorted. Cached per dtype (shared: do not modify it).

    Raises:
        ValueError: ``dtype`` is not bfloat16 / float16 (named; a float8 format has no overflow to
            ``inf`` of this kind: float8_e8m0fnu's top value is a power of two, its table would
            repeat it).
    """
    if dtype not in _CELL_TABLES:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cast_cell_values needs torch.bfloat16 or torch.float16 (an 8- or 16-bit float dtype "
                             f"with an overflow to inf), got {dtype}")
        finite = representable_values(dtype)
        # the power of two above the largest finite value: float16 65536, bfloat16 2^128
        top = 2.0 ** math.ceil(math.log2(float(torch.finfo(dtype).max)))
        end = torch.tensor([top], dtype=torch.float64)
        _CELL_TABLES[dtype] = torch.cat([-end, finite, end])
    return _CELL_TABLES[dtype]


def _param_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as ``model.named_parameters()`` lists it (first name of a shared one)."""
    return {id(p): n for n, p in model.named_parameters()}


# DtypeCast finds the overflowed weights' tensors from the weight's extremes (one reduction, no
# weight-sized mask: ~35-45 ms on a 2^23-weight cast) where they are within the format's largest
# finite value; False: the cast's isinf mask on every weight (A/B)
OVERFLOW_FROM_EXTREMES = True


def _overflows(w: Tensor, cast: Tensor) -> bool:
    """Whether a finite weight of ``w`` was cast to an infinity in ``cast`` (its cast to a 16-bit
    float). Weights within +-``finfo.max`` of the format cast to finite values whatever the
    rounding path (monotone; that value is one of every wider float format), so where ``w``'s
    extremes lie there (NaN-free) no mask is built; elsewhere, or with
    :data:`OVERFLOW_FROM_EXTREMES` False, the masks of ``cast``'s infinities and ``w``'s finite
    weights."""
    if OVERFLOW_FROM_EXTREMES and w.numel():
        lo, hi = torch.aminmax(w)
        top = torch.finfo(cast.dtype).max
        if -top <= float(lo) and float(hi) <= top:  # (False for NaN)
            return False
    # the weight-sized finiteness mask only where the cast holds an infinity at all
    return bool(torch.isinf(cast).any()) and bool((torch.isinf(cast) & torch.isfinite(w)).any())


# DtypeCast, where the release is not kept (zero_counts_only), casts each contiguous parameter in
# place slab by slab (_cast_slabs: no weight-sized 16-bit copy) and counts the zeros on the 16-bit
# patterns (count_nonzero of a 16-bit float converts each element: ~3x the time); the same values,
# overflow notes and counts. False: the whole parameter at once (A/B)
CAST_SLABS = True
# (a multiple of the conversions' vector loop, so that on one thread each element takes the path it takes
# in the whole tensor's loop: torch's scalar half-to-float conversion gives a NaN other bits than its
# vectorised one; with several threads the whole copy splits at other places, so a NaN's payload may
# differ, as it does between thread counts without slabs; every finite value and count is the same; rv50)
_CAST_SLAB = 1 << 18
# DtypeCast inside release_unread (a scoring call that reads no release: no utility) reads the
# model's own weights, casting each slab to a temporary, instead of casting a deep copy in place
# (grids_from_source): the same values, overflow notes and zero counts, and no copy of every
# floating weight per call (the 1e7 MLP: ~16 ms and 8.2k fresh pages a cast scheme and call,
# 2.weight's 32 MiB copy being above glibc's largest mmap threshold; p56b). False: the copy (A/B)
CAST_WITHOUT_COPY = True


@dataclass(frozen=True)
class DtypeCast(SchemeConfig):
    """Round-trip every floating parameter through ``dtype`` (``bf16`` / ``fp16``).

    Args:
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects the modules whose own
            parameters (and buffers) are cast; default: every module.

    Raises:
        ValueError: another dtype.
    """

    dtype: torch.dtype = torch.bfloat16

    backend: ClassVar[str] = "torch"
    layers: ClassVar[str] = "every module's floating"

    def __post_init__(self) -> None:
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {self.dtype}")

    @property  # type: ignore[override]
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> dict:
        return {**super().describe(), "grid": "table", "layers": "every floating parameter"}

    def supports(self, module: nn.Module) -> bool:
        return True

    @property
    def grids_from_source(self) -> bool:
        """:data:`CAST_WITHOUT_COPY` (the slabs read the weights; nothing is written)."""
        return CAST_WITHOUT_COPY and CAST_SLABS

    def _cast_slabs(self, p: Tensor, write: bool = True) -> tuple[bool, int]:
        """Cast the contiguous parameter ``p`` in place on slabs of :data:`_CAST_SLAB` elements
        (``write=False``: each slab to a temporary, ``p`` unchanged): ``(whether a finite weight
        overflowed to +-inf, the number of zeros of the cast)``; the zeros are the cast's bit
        patterns without their sign bit equal to 0 (+-0; NaN is non-zero, as ``count_nonzero`` of
        the cast counts them)."""
        flat = p.detach().view(-1)
        over, nonzero = False, 0
        for a in range(0, flat.numel(), _CAST_SLAB):
            part = flat[a:a + _CAST_SLAB]
            cast = part.to(self.dtype)
            over = over or _overflows(part, cast)
            if write:
                part.copy_(cast)
            nonzero += int(torch.count_nonzero(cast.view(torch.int16).bitwise_and_(0x7FFF)))
        return over, flat.numel() - nonzero

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        names = _param_names(model)
        values = cast_cell_values(self.dtype)  # the overflow cells too
        bits = float(torch.finfo(self.dtype).bits)
        grids: dict[str, ParamGrid] = {}
        overflow: list[str] = []
        done: set[int] = set()
        # the model itself (QuantizationScheme.apply under release_unread, grids_from_source): read only
        write = not self._given_source()
        for fqn, module in model.named_modules():
            if not self._selected(module, fqn):
                continue
            own = list(module.parameters(recurse=False))
            if own and not any(self._in_selection(p) for p in own):
                continue  # apply(params=...): a module none of whose parameters is assessed
            for _, p in module.named_parameters(recurse=False):
                if id(p) in done or not p.is_floating_point() or id(p) not in names:
                    continue
                if not self._in_selection(p):  # apply(params=...): the rest stays in float
                    continue
                done.add(id(p))
                name = names[id(p)]
                shape = tuple(p.shape)
                kept = dequantized_kept()  # else the zeros alone (zero_counts_only), no float32 copy
                if not kept and CAST_SLABS and p.is_contiguous():
                    over, zeros = self._cast_slabs(p, write)
                    dequantized = torch.empty(0, dtype=torch.float32)
                else:
                    cast = p.detach().to(self.dtype)
                    over = _overflows(p.detach(), cast)
                    if write:
                        p.copy_(cast)  # copy_ converts as .to(p.dtype) does, without the temporary
                    dequantized = cast.to(torch.float32) if kept else torch.empty(0, dtype=torch.float32)
                    zeros = None if kept else cast.numel() - int(torch.count_nonzero(cast))
                if over:
                    overflow.append(name)
                grids[name] = ParamGrid(
                    name=name, shape=shape, kind="table", dequantized=dequantized, zero_count=zeros,
                    bits_per_weight=bits, scale=torch.ones([1] * len(shape), dtype=torch.float32),
                    block_size=shape, values=values,
                    release_dtype=self.dtype,  # the table's end values are inf in the release
                )
            for _bname, b in module.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and id(b) not in done and write:
                    done.add(id(b))
                    b.copy_(b.to(self.dtype).to(b.dtype))
        notes = []
        if overflow:
            notes.append(f"{self.name}: weights beyond the largest finite {self.dtype} "
                         f"({torch.finfo(self.dtype).max:g}) were cast to +-inf in: "
                         + ", ".join(overflow))
        return grids, notes


register_scheme(DtypeCast(torch.bfloat16))
register_scheme(DtypeCast(torch.float16))
