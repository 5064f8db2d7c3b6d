"""Calibration-based and optimised PTQ from torchao: GPTQ, AWQ, SmoothQuant, HQQ.

Each scheme runs torchao's own API on the private copy of the model:

* **GPTQ** (``torchao.prototype.gptq.GPTQConfig``, ``step="observe"`` -> forward passes on the
  calibration inputs -> ``step="convert"``) over ``Int8WeightOnlyConfig(PerRow())``
  (``gptq_int8_weight_only``) or ``Int4WeightOnlyConfig`` (``gptq_int4_weight_only``):
  error feedback through the Hessian of each layer's inputs. torchao 0.18 runs it on CUDA only
  (``gptq_quantize`` asserts ``GPTQ only supports CUDA currently``; int4 needs ``mslk``), so
  on CPU both are error rows with that reason.
* **AWQ** (``torchao.prototype.awq.AWQConfig``, ``step="prepare"`` -> forward -> ``"convert"``)
  over ``Int8WeightOnlyConfig`` (``awq_int8_weight_only``) or
  ``Int8DynamicActivationInt8WeightConfig`` (``awq_int8_dynamic_activation_int8_weight``):
  a per-input-channel factor ``s`` (``x_mean_abs ** ratio``, the ratio searched on the
  calibration outputs) multiplies the weight before quantization; ``1/s`` rides along with
  the release as the weight's ``act_pre_scale``. ``awq_int4_weight_only`` needs ``mslk``
  (error row).
* **SmoothQuant** (``torchao.prototype.smoothquant.SmoothQuantConfig``, same steps, alpha 0.5)
  over ``Int8DynamicActivationInt8WeightConfig`` (``smooth_quant_int8_dynamic_activation_int8_weight``,
  the W8A8 scheme of the paper) or ``Int8WeightOnlyConfig`` (``smooth_quant_int8_weight_only``):
  ``s_j = max|x_j| ** alpha / max_i |w_ij| ** (1 - alpha)``, released as ``act_pre_scale``.
* **HQQ** (``IntxWeightOnlyConfig(intx_choose_qparams_algorithm="hqq_scale_only")``,
  ``intx_weight_only_int4_hqq`` ...): data-free, the scale of each block optimised (half-quadratic
  solver) instead of ``absmax / qmax``.

The grid of a pre-scaled layer, in the units of the trained weight: ``w_ij`` is released as
``q_ij * scale_i / s_j``, an affine grid with one scale per element (``scale_i * act_pre_scale_j``,
block ``(1, 1)``); storage ``8 + 32/K`` (row scales) ``+ 32/N`` (the factors).

None of these rounds each weight to the nearest point of a grid that stays fixed when the
weight moves (GPTQ feeds the rounding error of each column into the next ones; AWQ's and
SmoothQuant's factors and HQQ's scales move with the weights), so every grid declares its
``rounding`` and is scored by Monte Carlo re-quantization: the real scheme, calibration
included, re-run on perturbed weights (:func:`~mis_lightning.quantization.requantize.requantize_joint`).

Calibration (``calibrate(model, batches)``, which ``assess``, ``MISCallback`` and the app call
with the training loader): the inputs of the first ``calibration_batches`` batches the
loader yields, with the global torch stream and the loader's own generators (``generator=``
of the loader or its sampler) seeded with ``calibration_seed``, all restored afterwards (a
shuffling loader draws the same batches every time and the caller's RNG is untouched). Defaults follow torchao's examples: 10 batches for AWQ and SmoothQuant
(``calibration_limit=10``), 128 for GPTQ (``--num-calibration-samples 128``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._rng import isolated_rng
from .base import ParamGrid, SchemeError, SchemeUnavailableError, affine_grid
from .registry import register_scheme
from .torchao_backend import (
    IntxWeightOnly,
    TorchAOScheme,
    _make_config,
    _read_affine,
    _torchao_version,
)


def _batch_inputs(batch: Any, scheme: str) -> Any:
    """The model inputs of a training batch: ``inputs`` of an ``(inputs, targets)`` pair, or
    the batch itself when it is a tensor."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(
        f"scheme {scheme!r} calibrates on the model inputs of the training batches: batches must "
        f"be (inputs, targets) pairs or input tensors, got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; call "
        "scheme.calibrate(model, [inputs, ...]) with the input tensors yourself")


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _quiet() -> Any:
    """torchao's GPTQ and SmoothQuant ``print`` progress lines; keep them off the caller's stdout."""
    return contextlib.redirect_stdout(io.StringIO())


@dataclass(frozen=True)
class CalibratedScheme(TorchAOScheme):
    """Base of the schemes that learn from calibration batches (prepare -> forward -> convert).

    Args:
        calibration_batches: how many training batches calibrate (the first ones the loader
            yields under ``calibration_seed``).
        calibration_seed: torch seed while the loader is iterated (shuffling loaders).
        calibration: the calibration inputs (set by :meth:`calibrate`; not part of the name
            or of equality).

    Raises:
        ValueError: ``calibration_batches`` < 1.
    """

    calibration_batches: int = 10
    calibration_seed: int = 0
    calibration: tuple = field(default=(), kw_only=True, compare=False, repr=False)
    #: why calibration failed (raised as a SchemeError when the scheme is applied, so that
    #: one scheme's failure is an error row, not the end of the assessment)
    calibration_error: str | None = field(default=None, kw_only=True, compare=False, repr=False)

    #: the torchao wrapper config (``torchao.prototype.<module>.<class>``)
    wrapper: ClassVar[tuple[str, str]] = ("", "")
    #: the base config's name in ``torchao.quantization`` and its snake-case name
    base_config: ClassVar[str] = "Int8WeightOnlyConfig"
    base_suffix: ClassVar[str] = "int8_weight_only"
    #: the steps of the wrapper: (observe, convert)
    steps: ClassVar[tuple[str, str]] = ("prepare", "convert")
    default_batches: ClassVar[int] = 10
    #: whether the release carries a per-input-channel factor (act_pre_scale)
    prescaled: ClassVar[bool] = True
    layers: ClassVar[str] = "nn.Linear (torchao's default filter)"

    def __post_init__(self) -> None:
        for k in ("calibration_batches", "calibration_seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or (k == "calibration_batches" and v < 1):
                raise ValueError(f"{k} must be {'a positive' if k == 'calibration_batches' else 'an'} "
                                 f"integer, got {v!r}")

    def name_parts(self) -> list[str]:
        return [self.base_suffix,
                *([f"cal{self.calibration_batches}"] if self.calibration_batches != self.default_batches else []),
                *([f"seed{self.calibration_seed}"] if self.calibration_seed != 0 else [])]

    def describe(self) -> dict:
        out = super().describe()
        out["config"] = f"{self.wrapper[1]}({self.base_config})"
        out["calibration_inputs"] = sum(_rows(x) for x in self.calibration)
        return out

    # -- availability -----------------------------------------------------------------------
    def _import_wrapper(self) -> Any:
        import importlib

        from .torchao_backend import _import_torchao_quantization, _torchao_import_notices_filtered

        _import_torchao_quantization()
        # the prototype module's first import registers torchao's own Enums (torchao.prototype.gptq:
        # "<enum 'ScaleCalculationMode'> is an Enum subclass ..."): torchao's notice, not the user's
        with _torchao_import_notices_filtered():
            mod = importlib.import_module(self.wrapper[0])
        return getattr(mod, self.wrapper[1])

    def check_available(self) -> None:
        try:
            self._import_wrapper()
        except Exception as exc:
            raise SchemeUnavailableError(
                f"scheme {self.name!r} needs {self.wrapper[0]}.{self.wrapper[1]}, which torchao "
                f"{_torchao_version()} cannot provide here: {type(exc).__name__}: {exc}") from exc

    # -- calibration ------------------------------------------------------------------------
    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> CalibratedScheme:
        """The scheme holding the inputs of the first ``calibration_batches`` training batches.

        The loader is iterated with the global torch stream and the loader's own generators
        seeded with ``calibration_seed`` (the same batches every call); their states are
        restored afterwards; neither ``model`` nor the batches are modified.

        A batch that is neither an ``(inputs, targets)`` pair nor a tensor, or a loader that
        yields nothing, does not raise here: the returned scheme holds the reason and raises
        it as a :class:`SchemeError` when applied (an error row of that scheme in
        ``assess``; raised with ``strict=True``).
        """
        taken: list[Any] = []
        try:
            # the loader's own generator seeded too (a DataLoader(generator=g) shuffles from g):
            # the same batches every call, and the caller's states restored afterwards
            with isolated_rng(batches, seed=self.calibration_seed):
                for batch in batches:
                    taken.append(_detach(_batch_inputs(batch, self.name)))
                    if len(taken) >= self.calibration_batches:
                        break
        except TypeError as exc:
            return dataclasses.replace(self, calibration=(), calibration_error=str(exc))
        if not taken:
            return dataclasses.replace(self, calibration=(), calibration_error=(
                f"scheme {self.name!r}: the calibration data yielded no batch"))
        return dataclasses.replace(self, calibration=tuple(taken), calibration_error=None)

    # -- quantization -----------------------------------------------------------------------
    def _base(self) -> Any:
        from .torchao_backend import _import_torchao_quantization

        aoq = _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices

        cls = getattr(aoq, self.base_config)
        if self.base_config == "Int4WeightOnlyConfig":
            return _make_config(cls, group_size=128)
        if self.base_config == "Int8WeightOnlyConfig":
            return _make_config(cls, granularity=aoq.PerRow())
        return _make_config(cls)

    def _wrapper_config(self, step: str) -> Any:
        return self._import_wrapper()(base_config=self._base(), step=step)

    def _skip_reason(self, module: nn.Module) -> str | None:
        return None

    def _quantize_copy(self, model: nn.Module):
        from .torchao_backend import _import_torchao_quantization

        _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
        from torchao.quantization import quantize_

        chosen, reasons, notes = self.select_weights(model)
        for fqn in [f for f, (_, name, others) in chosen.items() if others]:
            _, name, others = chosen.pop(fqn)
            reasons[name] = (f"tied weight: scheme {self.name!r} rescales and quantizes each layer "
                             "on its own inputs, so a weight shared by several layers is left in float")
        if not chosen:
            return {}, notes, reasons
        if self.calibration_error:
            raise SchemeError(self.calibration_error)
        if not self.calibration:
            raise SchemeError(
                f"scheme {self.name!r} needs calibration batches: assess(), MISCallback and the "
                "mis-lightning app pass the training loader; elsewhere (MISIndicator, apply) pass "
                f"get_scheme({self.name!r}).calibrate(model, train_loader)")
        theta = {fqn: mod.weight.detach().clone() for fqn, (mod, _, _) in chosen.items()}
        names = {fqn: name for fqn, (_, name, _) in chosen.items()}
        device = next(iter(theta.values())).device

        def only(_m: nn.Module, fqn: str) -> bool:
            return fqn in chosen

        # isolated_rng: AWQ's convert builds a fresh nn.Linear (its init draws from the global RNG)
        with _quiet(), isolated_rng():
            quantize_(model, self._wrapper_config(self.steps[0]), filter_fn=only)
            with torch.no_grad():
                for x in self.calibration:
                    model(_to(x, device))
            quantize_(model, self._wrapper_config(self.steps[1]), filter_fn=only)
        grids: dict[str, ParamGrid] = {}
        modules = dict(model.named_modules())
        for fqn, name in names.items():
            w = modules[fqn].weight
            pre = getattr(w, "act_pre_scale", None)
            if self.prescaled and pre is not None:
                grids[name] = _prescaled_grid(name, w, theta[fqn], self.reveals_columns)
            elif type(w).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor"):
                grids[name] = _read_affine(self, name, w, notes)
            else:
                raise SchemeError(f"scheme {self.name!r}: torchao released {name!r} as a "
                                  f"{type(w).__name__}, which this scheme cannot read")
        return grids, notes, reasons

    #: SmoothQuant's factor is computed from each column's largest weight: it reveals it
    reveals_columns: ClassVar[bool] = False

    def release_warning(self) -> str | None:
        """What the release carries that the weight indicator does not score, or ``None``."""
        if not self.prescaled:
            return None
        return (f"scheme {self.name!r} releases a per-input-channel factor computed from the "
                "calibration batches' activations (training records where it calibrates on the "
                "training loader, as assess, MISCallback and the app do); the factor's own "
                "dependence on those records is not scored (only the weights it reveals are): its "
                "leakage is a lower bound of the whole release's (marked + in the table)")


def _rows(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return _rows(x[0])
    return 0


@torch.no_grad()
def _prescaled_grid(name: str, w: Tensor, theta: Tensor, reveals_columns: bool) -> ParamGrid:
    """The grid of an ``Int8Tensor`` with ``act_pre_scale`` (AWQ / SmoothQuant), in the units
    of the trained weight ``theta [N, K]``: value ``q_ij * scale_i * act_pre_scale_j``.

    ``revealed``: each row's element of largest ``|theta_ij / act_pre_scale_j|`` (the released
    row scale is its absmax / 127.5) and, when ``reveals_columns`` (SmoothQuant), each
    column's largest ``|theta_ij|`` (the released factor is ``max|x_j|^a / max_i|w_ij|^(1-a)``).
    """
    n, k = theta.shape
    pre = w.act_pre_scale.detach().reshape(1, k).to(torch.float64)
    row = w.scale.detach().reshape(n, 1).to(torch.float64)
    scale = (row * pre).cpu()
    codes = w.qdata.detach().reshape(n, k).cpu()
    # what the layer computes: (x * act_pre_scale) @ (q * scale_row)^T, i.e. weights q * scale_ij
    deq = codes.to(torch.float64) * scale
    grid = affine_grid(name, codes=codes, scale=scale,
                       zero_point=torch.zeros_like(scale), block_size=(1, 1), qmin=-128, qmax=127,
                       dequantized=deq, code_bits=8,
                       side_bits=w.scale.element_size() * 8 / k + w.act_pre_scale.element_size() * 8 / n)
    scaled = (theta.to(torch.float64).cpu() / pre.cpu()).abs()
    rev = (scaled == scaled.amax(dim=1, keepdim=True)) & (scaled > 0)
    if reveals_columns:
        a = theta.to(torch.float64).cpu().abs()
        rev |= (a == a.amax(dim=0, keepdim=True)) & (a > 0)
    grid.revealed = rev
    return grid


@dataclass(frozen=True)
class AWQ(CalibratedScheme):
    """``AWQConfig(base_config, step="prepare" | "convert")``: activation-aware per-channel
    rescaling (see the module doc). ``base``: ``"int8_weight_only"`` (default),
    ``"int8_dynamic_activation_int8_weight"`` or ``"int4_weight_only"`` (needs ``mslk``)."""

    base: str = "int8_weight_only"

    wrapper: ClassVar[tuple[str, str]] = ("torchao.prototype.awq", "AWQConfig")
    base_name: ClassVar[str] = "awq"
    rounding: ClassVar[str] = "awq"
    scale_rule: ClassVar[str] = "absmax"
    _bases: ClassVar[dict[str, str]] = {
        "int8_weight_only": "Int8WeightOnlyConfig",
        "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
        "int4_weight_only": "Int4WeightOnlyConfig",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in self._bases:
            raise ValueError(f"base must be one of {sorted(self._bases)}, got {self.base!r}")

    @property
    def base_config(self) -> str:  # type: ignore[override]
        return self._bases[self.base]

    @property
    def base_suffix(self) -> str:  # type: ignore[override]
        return self.base

    def check_available(self) -> None:
        super().check_available()
        if self.base == "int4_weight_only":
            _need_mslk(self.name)

    def _wrapper_config(self, step: str) -> Any:
        return self._import_wrapper()(base_config=self._base(), step=step)


@dataclass(frozen=True)
class SmoothQuant(AWQ):
    """``SmoothQuantConfig(base_config, step, alpha)``: ``s_j = max|x_j|^alpha /
    max_i|w_ij|^(1 - alpha)`` (see the module doc). ``base``:
    ``"int8_dynamic_activation_int8_weight"`` (default, W8A8) or ``"int8_weight_only"``."""

    base: str = "int8_dynamic_activation_int8_weight"
    alpha: float = 0.5

    wrapper: ClassVar[tuple[str, str]] = ("torchao.prototype.smoothquant", "SmoothQuantConfig")
    base_name: ClassVar[str] = "smooth_quant"
    rounding: ClassVar[str] = "smoothquant"
    reveals_columns: ClassVar[bool] = True
    _bases: ClassVar[dict[str, str]] = {
        "int8_weight_only": "Int8WeightOnlyConfig",
        "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")

    def name_parts(self) -> list[str]:
        return [*super().name_parts(), *([f"alpha{self.alpha:g}"] if self.alpha != 0.5 else [])]

    def _wrapper_config(self, step: str) -> Any:
        return self._import_wrapper()(base_config=self._base(), step=step, alpha=float(self.alpha))


@dataclass(frozen=True)
class GPTQ(CalibratedScheme):
    """``GPTQConfig(step="observe" | "convert", base_config)``: Hessian error feedback
    (see the module doc). CUDA only in torchao 0.18. ``base``: ``"int8_weight_only"``
    (per row, default) or ``"int4_weight_only"`` (groups of 128, needs ``mslk``)."""

    base: str = "int8_weight_only"
    calibration_batches: int = 128

    wrapper: ClassVar[tuple[str, str]] = ("torchao.prototype.gptq", "GPTQConfig")
    base_name: ClassVar[str] = "gptq"
    rounding: ClassVar[str] = "gptq"
    scale_rule: ClassVar[str] = "absmax"
    steps: ClassVar[tuple[str, str]] = ("observe", "convert")
    default_batches: ClassVar[int] = 128
    prescaled: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in ("int8_weight_only", "int4_weight_only"):
            raise ValueError(f"base must be 'int8_weight_only' or 'int4_weight_only', got {self.base!r}")

    @property
    def base_config(self) -> str:  # type: ignore[override]
        return "Int8WeightOnlyConfig" if self.base == "int8_weight_only" else "Int4WeightOnlyConfig"

    @property
    def base_suffix(self) -> str:  # type: ignore[override]
        return self.base

    def _import_wrapper(self) -> Any:
        # torchao.prototype.gptq.api sets torch._inductor.config.eager_numerics.division_rounding
        # = True at import (a global side effect): restore the caller's value.
        import torch._inductor.config as ind

        before = getattr(ind.eager_numerics, "division_rounding", None)
        try:
            return super()._import_wrapper()
        finally:
            if before is not None:
                ind.eager_numerics.division_rounding = before

    def check_available(self) -> None:
        super().check_available()
        if self.base == "int4_weight_only":
            _need_mslk(self.name)
        if not torch.cuda.is_available():
            raise SchemeUnavailableError(
                f"scheme {self.name!r} is unavailable: torchao's GPTQ (torchao.prototype.gptq."
                "gptq_quantize) runs on CUDA only ('GPTQ only supports CUDA currently'); this "
                "torch has no CUDA device. On CPU use 'awq_int8_weight_only' or "
                "'intx_weight_only_int4_hqq'")

    def _quantize_copy(self, model: nn.Module):
        dev = {p.device.type for p in model.parameters()}
        if dev != {"cuda"}:
            raise SchemeError(f"scheme {self.name!r} quantizes on the GPU: move the model to cuda "
                              f"first (its parameters are on {sorted(dev)})")
        return super()._quantize_copy(model)


def _need_mslk(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("mslk") is None:
        raise SchemeUnavailableError(
            f"scheme {name!r} is unavailable: torchao's Int4WeightOnlyConfig (plain layout) needs "
            "the 'mslk' kernel package (CUDA); on CPU use the int8 variant")


@dataclass(frozen=True)
class IntxWeightOnlyHQQ(IntxWeightOnly):
    """``IntxWeightOnlyConfig(..., intx_choose_qparams_algorithm="hqq_scale_only")``: the
    scale of each block optimised by HQQ's half-quadratic solver (data-free; symmetric).

    The scale is a continuous function of the whole block; it is counted as revealing one
    weight per block (the block's absmax, as for absmax scales): conservative.
    """

    base_name: ClassVar[str] = "intx_weight_only"
    rounding: ClassVar[str] = "hqq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mapping != "symmetric":
            raise ValueError("HQQ's scale-only algorithm is symmetric: mapping must be 'symmetric', "
                             f"got {self.mapping!r}")

    def name_parts(self) -> list[str]:
        return [*super().name_parts(), "hqq"]

    def _config(self) -> Any:
        from .torchao_backend import _import_torchao_quantization

        aoq = _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices

        from .torchao_backend import _granularity

        return _make_config(
            aoq.IntxWeightOnlyConfig, weight_dtype=getattr(torch, f"int{self.bits}"),
            granularity=_granularity(self.granularity, self.group_size, row="per_axis"),
            mapping_type=aoq.MappingType.SYMMETRIC, intx_choose_qparams_algorithm="hqq_scale_only")


# ---------------------------------------------------------------- registry (public names)
for _base in ("int8_weight_only", "int8_dynamic_activation_int8_weight", "int4_weight_only"):
    register_scheme(AWQ(base=_base))
for _base in ("int8_dynamic_activation_int8_weight", "int8_weight_only"):
    register_scheme(SmoothQuant(base=_base))
for _base in ("int8_weight_only", "int4_weight_only"):
    register_scheme(GPTQ(base=_base))
for _b in (2, 3, 4, 8):
    register_scheme(IntxWeightOnlyHQQ(bits=_b, granularity="per_row"))
register_scheme(IntxWeightOnlyHQQ(bits=4))

__all__ = ["AWQ", "GPTQ", "CalibratedScheme", "IntxWeightOnlyHQQ", "SmoothQuant"]
