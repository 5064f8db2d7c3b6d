"""torch's notice that vmap has no batching rule for an operator ("There is a performance drop
because we have not yet implemented the batching rule for aten::_scaled_dot_product_flash_attention
_for_cpu ...", nu41b) comes from the estimation's own vmap passes over a model's attention: the user
can do nothing about it, so it is not shown (ln42); the user's warnings filters and own warnings are
left as they were (per_sample.vmap_fallback_quiet)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation.estimate import estimate
from mis_lightning.estimation.per_sample import VMAP_FALLBACK_WARNING


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


def _mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (o[:, 0] - t) ** 2


def _fallback_notices(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith(VMAP_FALLBACK_WARNING)]


def test_the_estimations_vmap_fallback_notice_is_not_shown_and_the_users_filters_are_kept():
    torch.manual_seed(0)
    m = _Attention().eval()
    with warnings.catch_warnings(record=True) as probe, torch.no_grad():  # does this torch fall back at all?
        warnings.simplefilter("always")
        torch.func.vmap(lambda r: m(r.unsqueeze(0)))(torch.randn(2, 3, 4))
    if not _fallback_notices(probe):
        pytest.skip("this torch batches attention under vmap: no notice to hide")
    dl = DataLoader(TensorDataset(torch.randn(16, 3, 4), torch.randn(16)), batch_size=8)
    with warnings.catch_warnings():  # a first call imports modules that add their own filters (sympy's)
        warnings.simplefilter("ignore")
        estimate(m, dl, _mse, mode="diagonal")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit's, not the point here
        before = list(warnings.filters)
        estimate(m, dl, _mse, mode="diagonal")
        assert warnings.filters == before  # the user's filters, as they were
    assert not _fallback_notices(record), _fallback_notices(record)[:1]  # 4 before (2 batches x forward, backward)
    assert any(str(w.message) == "the user's own warning" for w in record)  # theirs still reach them


def _warn_here() -> None:
    warnings.warn("shown once per location under 'default'", UserWarning, stacklevel=1)


def _quieting(name: str):
    """The library's quieting block ``name`` (imported here: a first import adds filters of its own)."""
    if name == "vmap":
        from mis_lightning.estimation.per_sample import vmap_fallback_quiet
        return vmap_fallback_quiet
    if name == "lightning":
        from mis_lightning.app.job import lightning_notices_quieted
        return lightning_notices_quieted
    from mis_lightning.quantization.native import quiet_deprecated_quantization
    return quiet_deprecated_quantization


@pytest.mark.parametrize("name", ["vmap", "lightning", "quantization"])
def test_silencing_keeps_filters_added_inside_and_the_shown_once_registries(name):
    # ln43: warnings.catch_warnings dropped a filter a module imported during the first update adds
    # (sympy's "once") and, on exit, reset every module's shown-once registry (a "default" warning
    # already shown was shown again); the library's other quieting blocks did the same
    quieting = _quieting(name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        _warn_here()
        theirs = ("once", None, DeprecationWarning, None, 0)
        before = list(warnings.filters)
        with quieting():
            if name == "vmap":
                warnings.warn(VMAP_FALLBACK_WARNING + " aten::x", UserWarning, stacklevel=1)  # silenced
            warnings.filters.insert(0, theirs)  # as a module imported here would add it
        assert warnings.filters == [theirs, *before]  # ours are gone, theirs stays
        _warn_here()  # the same location: the registry still says it was shown
    assert [str(w.message) for w in record] == ["shown once per location under 'default'"]
