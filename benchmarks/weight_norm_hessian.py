"""torch's double backward of ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm``)
against the same ``W = g v / |v|`` written out, both against central finite differences of the
gradient (sy27; docs/validation.md, "Exact flat directions"; method.md section 6).

On a 2 x 3 weight-normed linear map with a squared loss: ``max |H - FD|`` for the reverse-mode
Hessian and the forward-over-reverse one, and the reverse Hessian's asymmetry, with the loss's
``dL/dW`` nonzero and zero (at the minimum). On torch 2.13 the written-out form agrees with finite
differences to ~1e-10 in both cases, ``torch._weight_norm``'s only where ``dL/dW = 0`` (0.35 off
and asymmetric otherwise). Runtime: < 2 s.

    python benchmarks/weight_norm_hessian.py
"""

from __future__ import annotations

import argparse

import torch
from torch.func import grad, jacfwd
from torch.nn.utils.parametrizations import weight_norm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=1e-6, help="finite-difference step")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    v = torch.randn(2, 3, dtype=torch.float64)
    gn = torch.rand(2, 1, dtype=torch.float64) + 0.5
    # the module itself is not used; building it draws its init from the same stream, which fixes
    # the random target below (the figures of the docs)
    weight_norm(torch.nn.Linear(3, 2, bias=False).double())
    f0 = torch.cat([gn.reshape(-1), v.reshape(-1)])  # the 8 parameters: g (2), then v (2 x 3)

    def w_manual(f):
        g_, v_ = f[:2].reshape(2, 1), f[2:].reshape(2, 3)
        return g_ * v_ / v_.norm(dim=1, keepdim=True)

    def w_torch(f):
        return torch._weight_norm(f[2:].reshape(2, 3), f[:2].reshape(2, 1), 0)

    eye = torch.eye(f0.numel(), dtype=torch.float64)
    for tag, target in (("grad_W != 0", torch.randn(2, 3, dtype=torch.float64)),
                        ("grad_W = 0 (at the minimum)", w_manual(f0).detach())):
        for wf in (w_manual, w_torch):
            def loss(f, wf=wf, target=target):
                return 0.5 * ((wf(f) - target) ** 2).sum()

            h_rr = torch.autograd.functional.hessian(loss, f0)
            try:
                h_fr = jacfwd(grad(loss))(f0)
            except NotImplementedError:  # no forward-mode rule for the op
                h_fr = torch.full_like(h_rr, float("nan"))

            def gfun(f, loss=loss):
                return torch.autograd.functional.jacobian(loss, f)

            h_fd = torch.stack([(gfun(f0 + args.eps * e) - gfun(f0 - args.eps * e)) / (2 * args.eps) for e in eye])
            print(f"{tag:28s} {wf.__name__:9s} |H_rr - FD| {float((h_rr - h_fd).abs().max()):.2e}  "
                  f"|H_fr - FD| {float((h_fr - h_fd).abs().max()):.2e}  asym {float((h_rr - h_rr.T).abs().max()):.2e}")
    print("torch", torch.__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
