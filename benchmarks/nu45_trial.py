"""Researchers' own layers through ``mis_lightning.assess`` (nu45; docs/benchmarks.md, "nu45").

Each case trains a small classifier (Adam, coupled L2 1e-3 = the objective's ``weight_decay``) and
assesses it under the schemes below; for every scheme it prints the report's figures beside the
validation loss of ``scheme.apply(model)`` evaluated here (the whole quantized model, what the
scheme releases) and the parameters the scheme quantized, then the report's warnings that say
what stayed in float or is not scored. The user's state dict is compared before and after.

    python benchmarks/nu45_trial.py                 # every case (about 2 CPU minutes, one thread)
    python benchmarks/nu45_trial.py parametrize     # weight_norm / spectral_norm / orthogonal, new and old API
    python benchmarks/nu45_trial.py compile         # torch.compile: the whole module, a submodule (inductor, warmed)
    python benchmarks/nu45_trial.py mha             # nn.MultiheadAttention (packed and kdim / vdim projections)
    python benchmarks/nu45_trial.py lora            # LoRA adapters: peft-style Linear pairs, loralib raw A / B, raw base
    python benchmarks/nu45_trial.py layers          # Bilinear, Embedding(padding_idx), grouped Conv2d / ConvTranspose2d + BN
    python benchmarks/nu45_trial.py buffers         # an input standardiser's running buffers
    python benchmarks/nu45_trial.py symmetry        # spectral_norm's flat scale: exact vs diagonal estimator
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.quantization import get_scheme

torch.set_num_threads(1)
SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "rtn_int4", "bf16",
           "native_int8_dynamic", "float8_weight_only"]
P = nn.utils.parametrizations
KEYS = ("float", "parametri", "recomputes", "frozen", "beyond", "running statistics", "sets from", "applies to no")


def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none")


def _data(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "seq":
        x = torch.randn(n, 4, 8, generator=g)
        return x, (x[:, :, 0].sum(1) > 0).long()
    if kind == "tokens":
        x = torch.randint(0, 10, (n, 5), generator=g)
        x[:, 3:] = 0  # padding
        return x, (x[:, 0] > 4).long()
    if kind == "image":
        x = torch.randn(n, 2, 6, 6, generator=g)
        return x, (x[:, 0].mean((1, 2)) > 0).long()
    width = {"flat": 8, "wide": 32}[kind]
    x = 3 * torch.randn(n, width, generator=g) + 1
    return x, (x[:, 0] + x[:, 1] > 2).long()


def _fit(m: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        ce(m(x), y).mean().backward()
        opt.step()
    return m.eval()


def run(name: str, model: nn.Module, data: str, schemes: list[str] = SCHEMES) -> None:
    x, y = _data(data, 512, 0)
    xv, yv = _data(data, 256, 1)
    model = _fit(model, x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = ml.assess(model, schemes, DataLoader(TensorDataset(x, y), batch_size=128), ce, weight_decay=1e-3,
                    val_dataloader=DataLoader(TensorDataset(xv, yv), batch_size=256), strict=False)
    print(f"== {name}: assessed {[n for n, p in model.named_parameters() if p.requires_grad]}")
    print(f"   {'scheme':26s} {'float':>6s} {'bits/w':>6s} {'model':>6s} {'loss':>8s} {'direct':>8s} {'leakage':>8s}  quantized")
    for s in schemes:
        r = rep.schemes[s]
        if r.error:
            print(f"   {s:26s} error: {r.error[:110]}")
            continue
        q = get_scheme(s).apply(model)
        with torch.no_grad():
            direct = ce(q.model(xv), yv).mean().item()
        mb = getattr(r, "model_bits_per_weight", None) or r.bits_per_weight
        print(f"   {s:26s} {1 - r.quantized_fraction:6.3f} {r.bits_per_weight:6.2f} {mb:6.2f} {r.utility['loss']:8.5f} "
              f"{direct:8.5f} {r.leakage:8.5f}  {sorted(q.grids)}")
    for w in rep.warnings:
        if any(k in w for k in KEYS) and "d / n" not in w:
            print("   W:", w[:600])
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print(f"   user's state dict unchanged: {same}")


class _Seq(nn.Module):
    def __init__(self, layer: nn.Module, width: int = 16):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(width, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(z)))


def parametrize() -> None:
    torch.manual_seed(0)
    run("parametrizations.weight_norm(Linear)", _Seq(P.weight_norm(nn.Linear(8, 16))), "flat")
    run("parametrizations.spectral_norm(Linear)", _Seq(P.spectral_norm(nn.Linear(8, 16))), "flat")
    run("parametrizations.orthogonal(Linear)", _Seq(P.orthogonal(nn.Linear(8, 16))), "flat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        run("torch.nn.utils.weight_norm(Linear) (hook-based)", _Seq(nn.utils.weight_norm(nn.Linear(8, 16))), "flat")
    run("torch.nn.utils.spectral_norm(Linear) (hook-based)", _Seq(nn.utils.spectral_norm(nn.Linear(8, 16))), "flat")


def compile_() -> None:
    class Wrap(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = torch.compile(net)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z)

    for how in ("eager", "torch.compile(model)", "submodule compiled"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        x, y = _data("flat", 512, 0)
        _fit(m, x, y)
        model = m if how == "eager" else torch.compile(m) if how.startswith("torch") else Wrap(m)
        with torch.no_grad():
            model(x[:64])  # warmed: dynamo's guards and inductor's kernels exist before the assessment
        rep = ml.assess(model, ["none", "rtn_int4", "intx_weight_only_int4", "native_int8_dynamic"],
                        DataLoader(TensorDataset(x, y), batch_size=128), ce, weight_decay=1e-3,
                        val_dataloader=DataLoader(TensorDataset(*_data("flat", 256, 1)), batch_size=256))
        print(f"== {how}: " + ", ".join(f"{s} {r.leakage:.6f} / {r.utility['loss']:.6f}" for s, r in rep.schemes.items()))


def mha() -> None:
    class Att(nn.Module):
        def __init__(self, kdim: int | None):
            super().__init__()
            e = 8 if kdim is None else 4
            self.q = nn.Linear(8, e)
            self.a = nn.MultiheadAttention(e, 2, kdim=kdim, vdim=kdim, batch_first=True)
            self.h = nn.Linear(e, 2)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            q = self.q(z)
            kv = q if self.a._qkv_same_embed_dim else z
            return self.h(self.a(q, kv, kv, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    run("MultiheadAttention (packed in_proj_weight)", Att(None), "seq")
    run("MultiheadAttention (kdim = vdim = 8: q/k/v_proj_weight)", Att(8), "seq")


class PeftLora(nn.Module):
    """peft's layout: the frozen base layer and ModuleDicts of Linear A / B."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.base_layer(z) + 2.0 * self.lora_B["default"](self.lora_A["default"](z))


class LoraLib(nn.Linear):
    """loralib's layout: a Linear subclass with raw A / B parameters, its own weight frozen."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight, self.bias) + 2.0 * (z @ self.lora_A.T @ self.lora_B.T)


class RawBase(nn.Module):
    """A frozen base weight as a raw parameter (F.linear) and Linear adapters."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.A = nn.Linear(base.in_features, r, bias=False)
        self.B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight) + self.B(self.A(z))


def lora() -> None:
    for name, cls in (("peft-style adapters", PeftLora), ("loralib-style adapters", LoraLib),
                      ("raw frozen base + Linear adapters", RawBase)):
        torch.manual_seed(1)
        b1, b2 = nn.Linear(32, 64), nn.Linear(64, 2)
        pre = nn.Sequential(b1, nn.Tanh(), b2)
        xp, yp = _data("wide", 2048, 7)
        _fit(pre, xp, yp, 100)  # "pretrained" on public records
        run(name, nn.Sequential(cls(b1), nn.Tanh(), cls(b2)), "wide")


def layers() -> None:
    class Bil(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.h = nn.Bilinear(4, 4, 4), nn.Linear(4, 2)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.h(torch.tanh(self.b(z[:, :4], z[:, 4:])))

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = nn.Embedding(10, 4, padding_idx=0), nn.Linear(4, 2)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.h(self.e(z).sum(1))

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.bn = nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4)
            self.ct, self.h = nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), nn.Linear(2, 2)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.h(torch.tanh(self.ct(torch.relu(self.bn(self.dw(z))))).mean((2, 3)))

    torch.manual_seed(0)
    run("Bilinear", Bil(), "flat")
    run("Embedding(padding_idx=0)", Emb(), "tokens")
    run("grouped Conv2d + BatchNorm2d (train mode) + grouped ConvTranspose2d", Conv(), "image")


def buffers() -> None:
    class Standardise(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.register_buffer("mean", torch.zeros(d))
            self.register_buffer("var", torch.ones(d))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if self.training:
                with torch.no_grad():
                    self.mean.lerp_(z.mean(0), 0.1)
                    self.var.lerp_(z.var(0), 0.1)
            return (z - self.mean) / (self.var + 1e-5).sqrt()

    torch.manual_seed(0)
    run("input standardiser with running buffers", nn.Sequential(Standardise(8), nn.Linear(8, 16), nn.Tanh(),
                                                                   nn.Linear(16, 2)), "flat",
        ["none", "int8_weight_only", "rtn_int4"])


def _to_minimum(m: nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float) -> nn.Module:
    """Full-batch L-BFGS on ``mean CE + wd / 2 |theta|^2`` (train mode), returned in eval mode."""
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ce(m(x), y).mean() + wd / 2 * sum((p ** 2).sum() for p in m.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return m.eval()


def symmetry() -> None:
    """spectral_norm's flat scale under the exact and the diagonal estimator (an 8-8-2 tanh MLP,
    n = 1,024, full-batch L-BFGS on the objective with L2 5e-3: at its minimum)."""
    for name, wrap in (("parametrizations.spectral_norm", P.spectral_norm), ("torch.nn.utils.spectral_norm",
                                                                          nn.utils.spectral_norm)):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 8, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        m = _to_minimum(nn.Sequential(wrap(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 2)), x, y, 5e-3)
        for est in ("exact", "diagonal"):
            rep = ml.assess(m, ["none", "rtn_int4", "bf16"], DataLoader(TensorDataset(x, y), batch_size=256), ce,
                            weight_decay=5e-3, estimation=est)
            rows = [ln for ln in rep.table().splitlines() if ln.startswith(("none ", "rtn_int4", "bf16"))]
            sym = [w[:160] for w in rep.warnings if w.startswith("uncertain figures")]
            print(f"== {name}, {est}: " + ", ".join(f"{k} {r.leakage:.4f}" for k, r in rep.schemes.items()))
            print("   " + "\n   ".join(rows) + ("\n   W: " + sym[0] if sym else ""))


CASES = {"parametrize": parametrize, "compile": compile_, "mha": mha, "lora": lora, "layers": layers,
         "buffers": buffers, "symmetry": symmetry}

if __name__ == "__main__":
    for case in sys.argv[1:] or list(CASES):
        CASES[case]()
