"""torch.func's second derivatives of ``F.layer_norm`` with an affine weight against autograd's
double backward and central finite differences of the gradient (ln41, lf41; the exact estimator's
Hessian passes use torch.func: ``batch_residual``'s jvp of grad, ``_batch_hessian``'s ``hessian`` and
its ``jacrev(jacrev)`` fallback, since lf41 ``jacfwd(grad)`` and ``jacrev(grad)``).

``f(t) = sum(c * o) + sum(o^2)``, ``o = norm(x W')`` with ``t = (W [4, 3], gamma [4], beta [4])``,
50 records, float64; for ``norm`` in layer_norm, group_norm, rms_norm, instance_norm and the layer norm
written out (mean / var): ``|H - FD| / |FD|`` for ``torch.func.hessian`` (forward-over-reverse),
``torch.func.jacrev(jacrev)``, ``jacfwd(grad)`` (lf41: the inner derivative by ``grad``) and
``torch.autograd.functional.hessian``, the asymmetry of the
first, and the rows / columns where it is off. On torch 2.13 (CPU) both torch.func forms of
``F.layer_norm`` are off by ~0.35 in the gamma rows x W columns (d grad_gamma / d W), autograd and
the written-out form agree with finite differences to ~1e-10; so does ``jacfwd(grad)`` (the bug
needs the inner vmapped vjp). instance_norm (lf41) is off as layer_norm is; group_norm and rms_norm
are not. Runtime: < 5 s.

    python benchmarks/layer_norm_hessian.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=1e-6, help="finite-difference step")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64)
    c = torch.randn(50, 4, dtype=torch.float64)
    t0 = torch.randn(20, dtype=torch.float64)
    norms = {
        "layer_norm": lambda h, g, b: F.layer_norm(h, (4,), g, b),
        "group_norm": lambda h, g, b: F.group_norm(h, 2, g, b),
        "rms_norm": lambda h, g, b: F.rms_norm(h, (4,), g) + b,
        # 2 channels x 2 positions; gamma[2:4] / beta[2:4] unused (zero rows)
        "instance_norm": lambda h, g, b: F.instance_norm(h.reshape(-1, 2, 2), weight=g[:2], bias=b[:2]).reshape(-1, 4),
        "written out": lambda h, g, b: (h - h.mean(1, keepdim=True))
        / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt() * g + b,
    }
    print(f"torch {torch.__version__}; t = (W [0:12], gamma [12:16], beta [16:20])")
    for name, norm in norms.items():
        def f(t: torch.Tensor, norm=norm) -> torch.Tensor:
            o = norm(x @ t[:12].reshape(4, 3).T, t[12:16], t[16:20])
            return (c * o).sum() + o.square().sum()

        g = torch.func.grad(f)
        fd = torch.stack([(g(t0 + a.eps * e) - g(t0 - a.eps * e)) / (2 * a.eps)
                          for e in torch.eye(20, dtype=torch.float64)], 1)  # column j: d grad / d t_j
        fwd = torch.func.hessian(f)(t0)
        rev = torch.func.jacrev(torch.func.jacrev(f))(t0)
        inner_grad = torch.func.jacfwd(torch.func.grad(f))(t0)  # the estimation's form since lf41
        auto = torch.autograd.functional.hessian(f, t0)
        off = torch.nonzero((fwd - fd).abs() > 1e-6 * fd.abs().max())
        where = (f"rows {sorted(set(off[:, 0].tolist()))}, columns {sorted(set(off[:, 1].tolist()))}"
                 if off.numel() else "nowhere")
        err = {k: float((h - fd).norm() / fd.norm()) for k, h in (("func.hessian", fwd), ("jacrev^2", rev), ("jacfwd(grad)", inner_grad),
                                                                    ("autograd", auto))}
        print(f"{name:12s} " + ", ".join(f"{k} {v:.1e}" for k, v in err.items())
              + f"; asymmetry of func.hessian {float((fwd - fwd.T).norm() / fwd.norm()):.1e}; off in {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
