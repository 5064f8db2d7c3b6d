"""Quantization beyond ``nn.Linear``: convolutions, embeddings and attention projections.

torchao's weight-only configs quantize ``nn.Linear`` layers (its default filter); a model's
other weights -- ``Conv1d/2d/3d`` kernels, ``nn.Embedding`` and ``nn.EmbeddingBag`` tables, the packed
``in_proj_weight`` (or ``q/k/v_proj_weight``) of ``nn.MultiheadAttention`` and its
``out_proj`` (a ``NonDynamicallyQuantizableLinear`` that torchao's filter excludes) -- would
stay in float. The integer schemes (``int8_weight_only``, ``intx_weight_only_*``, ``rtn_*``)
quantize them too, with the same grid rule as their Linear layers:

* **through the real toolkit where it supports the layer**: an ``nn.Embedding`` table with
  torchao's ``quantize_(model, IntxWeightOnlyConfig(...), filter_fn=<that embedding>)``
  (torchao's documented path for embeddings; the grid is read from the
  ``IntxUnpackedToInt8Tensor`` it releases). torch has no weight-only quantized
  convolution (``torch.ao.nn.quantized.Conv2d`` needs quantized activations), and torchao
  none on CPU;
* **elsewhere by this library's round-to-nearest over flattened kernels**: the weight viewed
  as ``[out_channels, in/groups * prod(kernel)]``, one scale per output channel (or per group
  of the flattened row, or per tensor), the scale and codes from torchao's own primitives
  ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine`` with the scheme's
  mapping (``rtn_*``: ``scale = max|w| / qmax`` as for its Linear layers). The copy's weight is
  overwritten with the dequantized values (the layer runs in float on the released values);
* **``ConvTranspose1d/2d/3d`` per output channel**, the convention of the convolutions: their
  weight is ``[in_channels, out_channels/groups, *kernel]``, so output channel ``j`` of group ``g``
  is ``weight[g in/groups : (g+1) in/groups, j]``, one scale over those ``in/groups * prod(kernel)``
  weights (a box of the weight's own shape; groups of ``group_size`` consecutive weights of that
  row where they are boxes, else left in float with the reason; :func:`_transposed_block`). No
  library quantizes a transposed convolution's weight per output channel to follow: torch.ao's
  eager mode refuses a per-channel weight observer on ``ConvTranspose{1,2,3}d`` ("Per channel
  weight observer is not supported yet", ``torch.ao.quantization.qconfig._assert_valid_qconfig``,
  torch 2.13), ``torch.ao.nn.quantized.ConvTranspose*d`` is per-tensor with quantized
  activations, and torchao 0.18 has no weight-only config for it (its PT2E QAT conv-BN fold
  scales a transposed weight along dim 1, the output channels). Per output channel is chosen as
  for ``Conv*d``: an output channel's scale factors out of its sum (``y_j = s_j sum q w x``), what
  per-channel weight quantization relies on, and a per-input-channel scale along dim 0 (what
  ``per_row`` over dim 0 would give) would mix the scales of every output.

Each grid carries ``method`` (what was done, e.g. ``"Conv2d: per-channel int8 over flattened
kernels (library RTN)"``), shown in the per-layer rows of the report, and the scheme's notes
say per layer type what was done. Normalization parameters (``BatchNorm``/``LayerNorm``
weights) and biases stay in float, with their reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import ParamGrid, affine_grid, parameter_uses

_NDQLinear = nn.modules.linear.NonDynamicallyQuantizableLinear
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# weight [in_channels, out_channels / groups, *kernel]: one output channel's weights are the column
# weight[g in/groups : (g+1) in/groups, o] of its group g (see the module doc)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# tables of rows (one per token / index): per-channel over rows; torchao's embedding path only
# for nn.Embedding (its quantize_ filter), nn.EmbeddingBag through the library's RTN
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class FlatSpec:
    """How a scheme quantizes the weights beyond ``nn.Linear``.

    Attributes:
        bits: code bits (codes in ``[-2^(bits-1), 2^(bits-1) - 1]``).
        granularity: ``"per_row"`` (one scale per output channel / embedding row),
            ``"per_group"`` (groups of ``group_size`` consecutive elements of a flattened row)
            or ``"per_tensor"``.
        group_size: elements per group (``"per_group"``).
        mapping: ``"symmetric"`` or ``"asymmetric"`` (torchao's ``MappingType``).
        rule: ``"torchao"`` (``choose_qparams_affine``: symmetric ``scale = amax / ((qmax -
            qmin) / 2)``, as torchao's Linear configs) or ``"absmax_qmax"`` (``scale = amax /
            qmax``, the built-in ``rtn_*`` rule).
        torchao_embedding: quantize ``nn.Embedding`` with torchao's ``IntxWeightOnlyConfig``
            (else with the library RTN).
        in_place: the scheme's Linear pass writes in place (a tied weight is then quantized
            once and every holder sees it); otherwise a tied weight stays in float.
    """

    bits: int
    granularity: Literal["per_row", "per_group", "per_tensor"]
    group_size: int | None
    mapping: Literal["symmetric", "asymmetric"]
    rule: Literal["torchao", "absmax_qmax"] = "torchao"
    torchao_embedding: bool = True
    in_place: bool = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def words(self) -> str:
        """The granularity and dtype in words, e.g. ``"per-channel int8"``."""
        g = {"per_row": "per-channel", "per_tensor": "per-tensor",
             "per_group": f"per-group (g={self.group_size})"}[self.granularity]
        return f"{g} int{self.bits}{' asymmetric' if self.mapping == 'asymmetric' else ''}"


def _targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module fqn, module, attribute)`` of every weight beyond ``nn.Linear`` this module
    quantizes, in ``named_modules`` order."""
    out = []
    for fqn, m in model.named_modules():
        if isinstance(m, (*_CONVS, *_TRANSPOSED, *_EMBEDDINGS, _NDQLinear)):
            out.append((fqn, m, "weight"))
        elif isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(m._parameters.get(attr), Tensor):
                    out.append((fqn, m, attr))
    return out


def supports_beyond(module: nn.Module) -> bool:
    """Whether :func:`quantize_beyond_linear` quantizes a weight of this module."""
    return isinstance(module, (*_CONVS, *_TRANSPOSED, *_EMBEDDINGS, _NDQLinear, nn.MultiheadAttention))


def _layer_kind(module: nn.Module, attr: str) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return f"MultiheadAttention.{attr}"
    if isinstance(module, _NDQLinear):
        return "MultiheadAttention.out_proj"
    return type(module).__name__


def _block(shape: tuple[int, ...], spec: FlatSpec, transposed_groups: int | None = None
           ) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """``(grid shape, block size)`` of a weight under ``spec``: the weight's own shape where the
    block is a box of it, else its flattened ``[out, K]`` view; or a reason it cannot be done.
    ``transposed_groups``: the ``groups`` of a transposed convolution (:func:`_transposed_block`)."""
    if transposed_groups is not None:
        return _transposed_block(shape, spec, transposed_groups)
    out, k = shape[0], math.prod(shape[1:])
    if spec.granularity == "per_row":
        return shape, (1, *shape[1:])
    if spec.granularity == "per_tensor":
        return shape, shape
    g = int(spec.group_size or 0)
    if k % g:
        return (f"flattened row length {k} is not a multiple of the group size {g}: left in "
                "float (the groups would not tile the rows)")
    if len(shape) == 2:
        return shape, (1, g)
    kern = math.prod(shape[2:])
    if g % kern == 0:  # a group = whole kernels of g / kern input channels: a box
        return shape, (1, g // kern, *shape[2:])
    return (out, k), (1, g)


def _transposed_block(shape: tuple[int, ...], spec: FlatSpec, groups: int
                      ) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """:func:`_block` of a transposed convolution's weight ``[C_in, C_out/G, *kernel]``: output
    channel ``j`` of group ``g`` holds ``weight[g C_in/G : (g+1) C_in/G, j]`` (``C_in/G * prod(kernel)``
    weights, as a convolution's output channel), so one scale per output channel is the box
    ``(C_in/G, 1, *kernel)`` of the weight's own shape, and a group of ``group_size`` consecutive
    weights of that row (ordered input channel, then kernel) a box of whole kernels
    ``(group_size / prod(kernel), 1, *kernel)`` or, within one kernel, ``(1, 1, group_size)`` of the
    ``[C_in, C_out/G, prod(kernel)]`` view. A group across the kernels of two input channels is no
    box (those weights are ``C_out/G * prod(kernel)`` apart): left in float, with the reason."""
    cin, kern = shape[0], math.prod(shape[2:])
    per_in = cin // groups  # input channels per group
    if spec.granularity == "per_row":
        return shape, (per_in, 1, *shape[2:])
    if spec.granularity == "per_tensor":
        return shape, shape
    g, k = int(spec.group_size or 0), per_in * kern
    if k % g:
        return (f"an output channel's {k} weights (C_in/groups {per_in} x kernel {kern}) are not a multiple "
                f"of the group size {g}: left in float (the groups would not tile the rows)")
    if g % kern == 0:  # whole kernels of g / kern input channels
        return shape, (g // kern, 1, *shape[2:])
    if kern % g == 0:  # within one kernel
        return (cin, shape[1], kern), (1, 1, g)
    return (f"a group of {g} weights would span the kernels ({kern} weights) of two input channels, "
            "which a transposed weight [in, out/groups, *kernel] does not hold together: left in float")


@torch.no_grad()
def flat_rtn(weight: Tensor, spec: FlatSpec, name: str, transposed_groups: int | None = None) -> ParamGrid | str:
    """Round-to-nearest of one weight over its flattened rows, with torchao's primitives.

    Args:
        weight: ``[out, *rest]`` float weight (a conv kernel, an embedding table, a packed
            attention projection).
        spec: the scheme's grid rule.
        name: the parameter's name (for the grid).
        transposed_groups: ``groups`` of a transposed convolution whose weight this is
            (``[C_in, C_out/groups, *kernel]``: scaled per output channel, :func:`_transposed_block`);
            ``None`` for every other weight (rows along dim 0).

    Returns:
        the grid (``dequantized`` is what the release holds), or a reason string when the
        granularity cannot tile the weight.
    """
    from .torchao_backend import _import_torchao_quantization

    _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    got = _block(tuple(weight.shape), spec, transposed_groups)
    if isinstance(got, str):
        return got
    gshape, block = got
    w = weight.detach().reshape(gshape)
    if spec.rule == "absmax_qmax":
        # the built-in rtn_* rule (rtn.py): float64, scale = max|w| / qmax per block
        w64 = w.to(torch.float64)
        nb = [s // b for s, b in zip(gshape, block)]
        boxed = w64.reshape([x for s, b in zip(nb, block) for x in (s, b)])
        red = tuple(range(1, 2 * len(gshape), 2))
        scale = (boxed.abs().amax(dim=red) / spec.qmax).clamp_min(1e-12)
        el = _per_element(scale, block, gshape)
        codes = torch.round(w64 / el).clamp(spec.qmin, spec.qmax)
        deq = codes * el
        zp = torch.zeros_like(scale)
        codes = codes.to(torch.int8)
        side = 32.0  # a float32 scale per block (nominal, as rtn.py)
    else:
        mt = MappingType.ASYMMETRIC if spec.mapping == "asymmetric" else MappingType.SYMMETRIC
        wf = w.to(torch.float32)
        # torchao 0.18's primitives fail on a weight one element wide ("shape [V, 1] is invalid
        # for input of size 1"): each block doubled has the same absmax, min and max
        twin = gshape[-1] == 1
        wq, bq = (torch.cat([wf, wf], -1), (*block[:-1], 2)) if twin else (wf, block)
        scale, zp = choose_qparams_affine(wq, mt, bq, torch.int8, spec.qmin, spec.qmax,
                                          eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                          zero_point_dtype=torch.int8)
        codes = quantize_affine(wq, bq, scale, zp, torch.int8, spec.qmin, spec.qmax)
        deq = dequantize_affine(codes, bq, scale, zp, torch.int8, spec.qmin, spec.qmax,
                                output_dtype=torch.float32)
        if twin:
            codes, deq = codes[..., :1], deq[..., :1]
        nb = [s // b for s, b in zip(gshape, block)]
        scale, zp = scale.reshape(nb), zp.reshape(nb)
        side = None
    grid = affine_grid(name, codes=codes.reshape(gshape), scale=scale, zero_point=zp, block_size=block,
                       qmin=spec.qmin, qmax=spec.qmax, dequantized=deq.reshape(gshape),
                       code_bits=spec.bits, side_bits=side, asymmetric=spec.mapping == "asymmetric")
    # written back in the weight's dtype (quantize_beyond_linear); torchao's primitives compute
    # w * (1 / scale) and (q - zp) * scale in float32
    grid.release_dtype = weight.dtype
    if spec.rule != "absmax_qmax":
        grid.quantize_arith, grid.product_dtype = "mul_inv32", torch.float32
    # the weights the released scale gives away (block absmax, or min and max), scored as float
    grid.reveal(w, "minmax" if spec.mapping == "asymmetric" else "absmax")
    return grid


def _per_element(scale: Tensor, block: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """A per-block tensor repeated to every element of ``shape``."""
    t = scale.reshape([s // b for s, b in zip(shape, block)])
    for dim, b in enumerate(block):
        t = t.repeat_interleave(b, dim=dim)
    return t


def _torchao_embedding(model: nn.Module, fqn: str, module: nn.Embedding, spec: FlatSpec,
                       scheme: Any, name: str, notes: list[str]) -> ParamGrid | None:
    """torchao ``quantize_`` with ``IntxWeightOnlyConfig`` on one embedding; ``None`` where
    torchao cannot (the caller then uses the library RTN)."""
    from .torchao_backend import _import_torchao_quantization

    aoq = _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices

    from .torchao_backend import _make_config, grid_reader

    if spec.granularity == "per_tensor" or module.max_norm is not None:
        return None  # IntxWeightOnlyConfig refuses per-tensor; max_norm renorms in place
    if module.weight.shape[-1] < 2:
        # rows of one weight: torchao's IntxWeightOnlyConfig fails on them ("shape [V, 1] is
        # invalid for input of size 1", torchao 0.18); the library RTN takes them (flat_rtn)
        return None
    gran = aoq.PerAxis(0) if spec.granularity == "per_row" else aoq.PerGroup(int(spec.group_size or 0))
    mt = aoq.MappingType.ASYMMETRIC if spec.mapping == "asymmetric" else aoq.MappingType.SYMMETRIC
    cfg = _make_config(aoq.IntxWeightOnlyConfig, weight_dtype=getattr(torch, f"int{spec.bits}"),
                       granularity=gran, mapping_type=mt)
    aoq.quantize_(model, cfg, filter_fn=lambda m, f: m is module and f == fqn)
    reader = grid_reader(module.weight)
    if reader is None:  # pragma: no cover - torchao left it in float
        return None
    return reader(scheme, name, module.weight, notes)


def _selected(scheme: Any, model: nn.Module, spec: FlatSpec, grids: Mapping[str, Any], reasons: dict[str, str]
              ) -> Iterator[tuple[str, nn.Module, str, Tensor, str, str]]:
    """The weights beyond ``nn.Linear`` that ``scheme`` quantizes under ``spec``:
    ``(module fqn, module, attribute, parameter, parameter name, layer kind)``; the reason of
    every one it leaves in float goes into ``reasons`` (one selection for the pass and for
    :func:`beyond_linear_weights`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    uses = parameter_uses(model)
    for fqn, module, attr in _targets(model):
        p = module._parameters.get(attr)
        if not isinstance(p, Tensor) or id(p) not in names or not p.is_floating_point() or p.dim() < 2:
            continue
        name = names[id(p)]
        if name in grids or name in reasons or not scheme._in_selection(p):
            continue
        kind = _layer_kind(module, attr)
        if scheme.filter_fn is not None and not scheme.filter_fn(module, fqn):
            reasons[name] = f"excluded by the filter_fn of scheme {scheme.name!r}"
            continue
        holders = uses.get(id(p), [])
        if len(holders) > 1 and not spec.in_place:
            others = ", ".join(f"{type(m).__name__} {f or '<root>'!r}.{a}" for f, a, m in holders
                               if not (m is module and a == attr))
            reasons[name] = (f"tied weight: also held by {others}; scheme {scheme.name!r} would quantize "
                             f"this {kind} in a pass apart from the other holders (a tied weight is not quantized "
                             "by two passes, and quantizing only some of its uses would release it in float "
                             "anyway): left in float everywhere")
            continue
        tiles = _block(tuple(p.shape), spec, module.groups if isinstance(module, _TRANSPOSED) else None)
        if isinstance(tiles, str):
            reasons[name] = f"{kind if '.' in kind else kind + '.' + attr}: {tiles}"
            continue
        yield fqn, module, attr, p, name, kind


def beyond_linear_weights(scheme: Any, model: nn.Module, spec: FlatSpec) -> tuple[list[str], dict[str, str]]:
    """Names of the weights beyond ``nn.Linear`` that :func:`quantize_beyond_linear` would
    quantize on ``model`` (nothing is modified), and the reasons of those it would leave in
    float (a backend's up-front :meth:`~mis_lightning.quantization.QuantizationScheme.check_model`)."""
    reasons: dict[str, str] = {}
    return [name for *_, name, _ in _selected(scheme, model, spec, {}, reasons)], reasons


def quantize_beyond_linear(scheme: Any, model: nn.Module, spec: FlatSpec, grids: dict[str, ParamGrid],
                           reasons: dict[str, str], notes: list[str]) -> None:
    """Quantize the copy's weights beyond ``nn.Linear`` in place (see the module doc).

    Args:
        scheme: the calling scheme (its ``name``, ``filter_fn`` and ``apply(params=...)``
            selection are honoured).
        model: the scheme's private copy (modified).
        spec: the scheme's grid rule.
        grids, reasons, notes: the Linear pass's results, extended in place (a weight that
            already has a grid or a reason is left alone).
    """
    done: dict[str, list[int]] = {}
    for fqn, module, attr, p, name, kind in _selected(scheme, model, spec, grids, reasons):
        grid = None
        if isinstance(module, nn.Embedding) and spec.torchao_embedding:
            grid = _torchao_embedding(model, fqn, module, spec, scheme, name, notes)
            if grid is not None:
                grid.method = f"{kind}: torchao IntxWeightOnlyConfig ({spec.words()})"
        if grid is None:
            got = flat_rtn(p, spec, name, module.groups if isinstance(module, _TRANSPOSED) else None)
            if isinstance(got, str):
                reasons[name] = f"{kind if '.' in kind else kind + '.' + attr}: {got}"
                continue
            grid = got
            p.data.copy_(grid.dequantized.reshape(p.shape).to(p.dtype))  # the release's values
            how = ("over flattened kernels" if isinstance(module, _CONVS) or
                   (isinstance(module, _TRANSPOSED) and spec.granularity == "per_tensor") else
                   "over flattened kernels (output channels on weight dim 1)" if isinstance(module, _TRANSPOSED)
                   else "over rows")
            grid.method = f"{kind}: {spec.words()} {how} (library RTN)"
        grids[name] = grid
        done.setdefault(grid.method, []).append(p.numel())
    for method, sizes in done.items():
        notes.append(f"{scheme.name}: {method}: {len(sizes)} weight tensor(s), {sum(sizes):,} weights")


__all__ = ["FlatSpec", "beyond_linear_weights", "flat_rtn", "quantize_beyond_linear", "supports_beyond"]
