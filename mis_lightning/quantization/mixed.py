"""Mixed precision: one candidate scheme per parameter (or layer), applied by the real backends.

:class:`MixedPrecisionScheme` is an ordinary :class:`~.base.QuantizationScheme`: ``apply``
deep-copies the model once and runs each candidate's own backend on that copy, restricted to
the parameters assigned to it (the same restriction ``apply(params=...)`` uses, so torchao's
``quantize_`` gets a ``filter_fn`` naming exactly those layers, native schemes swap exactly
those modules, ...). Its grids are the candidates' grids, so a mixed-precision release is
scored by the same pipeline as any uniform scheme (``assess(model, [mixed, "int8_weight_only"])``).

It is not registered (it is built from an assignment, e.g. by :func:`mis_lightning.plan`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from torch import nn

from .base import (
    ParamGrid,
    QuantizationResult,
    QuantizationScheme,
    SchemeError,
    parameter_uses,
)
from .registry import get_scheme


class MixedPrecisionScheme(QuantizationScheme):
    """A per-parameter choice among candidate schemes.

    Args:
        assignment: ``{parameter or module name: scheme or registry name}``; a module name
            (``"net.0"``) covers that module's parameters (``"net.0.weight"``); the longest
            matching key wins.
        default: the scheme of the parameters no key matches (``None``: left in float).
        name: the scheme's name in reports (default: built from the assignment).

    Raises:
        ValueError: an empty assignment without a default.
        KeyError: an unknown scheme name (see ``get_scheme``).
    """

    backend = "mixed"
    layers = "the layers of each candidate"

    def __init__(self, assignment: Mapping[str, QuantizationScheme | str],
                 default: QuantizationScheme | str | None = None, name: str | None = None) -> None:
        super().__init__(None)
        if not assignment and default is None:
            raise ValueError("MixedPrecisionScheme needs an assignment or a default scheme")
        self.assignment: dict[str, QuantizationScheme] = {str(k): get_scheme(v) for k, v in assignment.items()}
        self.default: QuantizationScheme | None = None if default is None else get_scheme(default)
        self.name = name or "mixed(" + ",".join(f"{k}={s.name}" for k, s in self.assignment.items()) + (
            f";default={self.default.name})" if self.default is not None else ")")

    # -- which candidate quantizes what -------------------------------------------------------
    def scheme_for(self, param: str) -> QuantizationScheme | None:
        """The candidate of parameter ``param`` (``None``: float)."""
        best, blen = None, -1
        for k, s in self.assignment.items():
            if (param == k or param.startswith(k + ".")) and len(k) > blen:
                best, blen = s, len(k)
        return best if best is not None else self.default

    def candidates(self) -> list[QuantizationScheme]:
        """The distinct candidate schemes (by name), default last."""
        out: dict[str, QuantizationScheme] = {}
        for s in [*self.assignment.values(), *([self.default] if self.default is not None else [])]:
            out.setdefault(s.name, s)
        return list(out.values())

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend,
                "assignment": {k: s.name for k, s in self.assignment.items()},
                "default": None if self.default is None else self.default.name}

    def __repr__(self) -> str:
        d = self.describe()
        return f"MixedPrecisionScheme({d['assignment']!r}, default={d['default']!r}, name={self.name!r})"

    def check_available(self) -> None:
        for s in self.candidates():
            s.check_available()

    def supports(self, module: nn.Module) -> bool:
        return any(s.supports(module) for s in self.candidates())

    def flat_spec(self) -> Any:
        return next((s.flat_spec() for s in self.candidates() if s.flat_spec() is not None), None)

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> MixedPrecisionScheme:
        """Each distinct candidate calibrated once (data-free candidates: unchanged)."""
        done = {s.name: s.calibrate(model, batches) for s in self.candidates()}
        out = MixedPrecisionScheme({k: done[s.name] for k, s in self.assignment.items()},
                                   None if self.default is None else done[self.default.name], name=self.name)
        return out

    def release_warnings(self) -> list[str]:
        """The candidates' release warnings (what the release holds beyond its weights), each
        distinct one once, in the candidates' order."""
        ws = (getattr(s, "release_warning", lambda: None)() for s in self.candidates())
        return list(dict.fromkeys(w for w in ws if w))

    def release_warning(self) -> str | None:
        """:meth:`release_warnings`, joined (``None``: none)."""
        return "; ".join(self.release_warnings()) or None

    def _check_keys(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_parameters()]
        unknown = [k for k in self.assignment if not any(n == k or n.startswith(k + ".") for n in names)]
        if unknown:
            raise KeyError(f"scheme {self.name!r}: assignment key(s) {unknown} match no parameter or module "
                           f"of the model (parameters: {names[:8]}{' ...' if len(names) > 8 else ''})")

    def apply(self, model: nn.Module, params: Collection[str] | None = None) -> QuantizationResult:
        """As :meth:`QuantizationScheme.apply`, each parameter by its candidate's backend.

        Raises:
            KeyError: an assignment key that matches no parameter or module (named), or an
                unknown name in ``params``.
            SchemeError: a candidate's backend failed (names the candidate and the parameters).
        """
        self._check_keys(model)
        return super().apply(model, params)

    def _quantize_copy(self, model: nn.Module):
        params = dict(model.named_parameters())
        uses = parameter_uses(model)
        groups: dict[str, tuple[QuantizationScheme, list[str]]] = {}
        reasons: dict[str, str] = {}
        for n, p in params.items():
            if not self._in_selection(p):
                continue
            s = self.scheme_for(n)
            if s is None:
                holders = uses.get(id(p), [])
                if not (holders and all(a.endswith("bias") for _, a, _ in holders)):  # biases: the base reason
                    reasons[n] = f"not assigned a candidate by {self.name!r} (no default): left in float"
                continue
            groups.setdefault(s.name, (s, []))[1].append(n)
        # float values before any backend runs: the revealed elements of weight-derived scales
        floats = {n: params[n].detach().clone() for _, ns in groups.values() for n in ns}
        grids: dict[str, ParamGrid] = {}
        notes: list[str] = []
        for cname, (cand, names) in groups.items():
            # the candidate's own restriction mechanism (apply(params=...)): its backend
            # quantizes exactly these parameters of the shared copy
            object.__setattr__(cand, "_only", {id(params[n]) for n in names})
            try:
                out = cand._quantize_copy(model)
            except SchemeError:
                raise
            except Exception as exc:
                raise SchemeError(f"scheme {self.name!r}: candidate {cname!r} failed in its backend on "
                                  f"{names}: {type(exc).__name__}: {exc}") from exc
            finally:
                object.__setattr__(cand, "_only", None)
            g, nts = out[0], out[1]
            rs: dict[str, str] = out[2] if len(out) > 2 else {}
            notes += [f"{cname}: {t}" for t in nts]
            for n, grid in g.items():
                # what QuantizationScheme.apply stamps for the candidate on its own
                if cand.rounding != "nearest" and grid.rounding == "nearest":
                    grid.rounding = cand.rounding
                if (cand.scale_rule != "none" and grid.revealed is None and n in floats
                        and tuple(floats[n].shape) == tuple(grid.shape)):
                    grid.reveal(floats[n], cand.scale_rule)  # type: ignore[arg-type]
                grids[n] = grid
            for n in names:
                if n not in g:
                    why = rs.get(n) or cand._float_reason(n, params[n], uses.get(id(params[n]), []))
                    reasons[n] = f"candidate {cname!r}: {why}"
        return grids, notes, reasons


__all__ = ["MixedPrecisionScheme"]
