"""Run by ``tests/test_triton_spline.py`` in a subprocess with ``TRITON_INTERPRET=1``: the
Triton spline kernels interpreted on CPU tensors against the differentiable reference in
float64 (the exact value) and against the C kernel, over layouts, directions, bin counts,
tails, NaN inputs and degenerate shapes. Prints one JSON object of measured errors (the
test asserts on them); not a test module itself."""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from normflux.transforms import native_spline, triton_spline  # noqa: E402
from normflux.transforms.fused_spline import _reference  # noqa: E402

FLOORS = (1e-3, 1e-3, 1e-3)
F64 = torch.float64


def problem(K, B, n, layout, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, generator=g, dtype=F64) * 2.5  # some in the tails
    if layout == "batch_minor":  # memory (n, P, B): a conditioner's transposed output
        p = (torch.randn(n, 3 * K - 1, B, generator=g, dtype=F64) * scale).permute(2, 0, 1)
    else:
        p = torch.randn(B, n, 3 * K - 1, generator=g, dtype=F64) * scale
    low = torch.linspace(-3, -2, n, dtype=F64)
    high = torch.linspace(2, 3, n, dtype=F64)
    gy = torch.randn(B, n, generator=g, dtype=F64)
    gl = torch.randn(B, n, generator=g, dtype=F64)
    return x, p, low, high, gy, gl


def run(fn, x, p, low, high, gy, gl, dtype, K, inverse):
    xd = x.detach().to(dtype).requires_grad_()
    pd = p.detach().to(dtype).requires_grad_()
    y, lad = fn(xd, pd, low.to(dtype), high.to(dtype), K, *FLOORS, inverse)
    gx, gp = torch.autograd.grad((y, lad), (xd, pd), (gy.to(dtype), gl.to(dtype)))
    return [t.detach().to(F64) for t in (y, lad, gx, gp)], gp.stride()


def reference(x, p, low, high, K, mw, mh, md, inverse):
    return _reference(x, p, low, high, K, mw, mh, md, inverse)


def err(a, b):
    """Largest error relative to max(1, |b|), NaNs compared by position."""
    nan = torch.isnan(a) != torch.isnan(b)
    if nan.any():
        return float("inf")
    ok = ~torch.isnan(b)
    return ((a[ok] - b[ok]).abs() / b[ok].abs().clamp(min=1)).max().item() if ok.any() else 0.0


def main() -> None:
    out: dict = {"native": native_spline.available(), "cases": []}
    for K, B, n in ((8, 300, 5), (2, 64, 3), (3, 50, 1), (11, 40, 4)):
        for layout in ("plain", "batch_minor"):
            for inverse in (False, True):
                x, p, low, high, gy, gl = problem(K, B, n, layout)
                if inverse:  # outputs of the forward map, so that the inverse is exercised
                    x = reference(x, p, low, high, K, *FLOORS, False)[0].detach()
                exact, _ = run(reference, x, p, low, high, gy, gl, F64, K, inverse)
                case = {"K": K, "B": B, "n": n, "layout": layout, "inverse": inverse}
                for dtype in (F64, torch.float32):
                    tri, strides = run(triton_spline.rq_spline, x, p, low, high, gy, gl, dtype,
                                       K, inverse)
                    name = "f64" if dtype == F64 else "f32"
                    case[f"{name}_vs_exact"] = [err(a, b) for a, b in zip(tri, exact)]
                    case["grad_strides_kept"] = strides == p.stride()
                    if out["native"]:
                        nat, _ = run(native_spline.rq_spline, x, p, low, high, gy, gl, dtype,
                                     K, inverse)
                        case[f"{name}_vs_kernel"] = [err(a, b) for a, b in zip(tri, nat)]
                out["cases"].append(case)
    # NaN and infinite inputs: the identity outside the box, NaN stays NaN
    x, p, low, high, gy, gl = problem(8, 6, 2, "plain")
    x[0, 0], x[1, 1], x[2, 0] = float("nan"), float("inf"), -float("inf")
    y, lad = triton_spline.rq_spline(x, p, low, high, 8, *FLOORS, False)
    out["nonfinite"] = {"y_nan": bool(torch.isnan(y[0, 0])), "y_inf": y[1, 1].item(),
                        "y_minf": y[2, 0].item(), "lad": [lad[0, 0].item(), lad[1, 1].item()],
                        "others_finite": bool(torch.isfinite(y[3:]).all())}
    # NaN and infinite parameters (a diverged network): NaN where the C kernel and the
    # reference give NaN, in both directions
    x, p, low, high, gy, gl = problem(4, 4, 2, "plain")
    p[0, 0, 1], p[1, 1, 5] = float("nan"), float("inf")
    x[0, 0], x[1, 1] = 0.5, 0.5  # inside the box
    nan_params = []
    for inverse in (False, True):
        y, lad = triton_spline.rq_spline(x, p, low, high, 4, *FLOORS, inverse)
        yr, lr = reference(x, p, low, high, 4, *FLOORS, inverse)
        nan_params.append([bool((torch.isnan(y) == torch.isnan(yr)).all()),
                           bool(torch.isnan(y[0, 0])), err(y, yr), err(lad, lr)])
    out["nan_params"] = nan_params
    # empty batch; leading batch dimensions
    x, p, low, high, gy, gl = problem(8, 12, 3, "plain")
    y0, l0 = triton_spline.rq_spline(x[:0], p[:0], low, high, 8, *FLOORS, False)
    y3, l3 = triton_spline.rq_spline(x.view(3, 4, 3), p.reshape(3, 4, 3, -1), low, high, 8,
                                     *FLOORS, False)
    y2, l2 = triton_spline.rq_spline(x, p, low, high, 8, *FLOORS, False)
    out["empty_shape"] = list(y0.shape)
    out["leading_dims"] = [list(y3.shape), err(y3.reshape(12, 3), y2), err(l3.reshape(12, 3), l2)]
    # create_graph: the backward differentiates the reference (second derivatives exact)
    xd = x.clone().requires_grad_()
    y, lad = triton_spline.rq_spline(xd, p, low, high, 8, *FLOORS, False)
    (g,) = torch.autograd.grad(lad.sum(), xd, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xd)
    xr = x.clone().requires_grad_()
    _, lr = reference(xr, p, low, high, 8, *FLOORS, False)
    (gr,) = torch.autograd.grad(lr.sum(), xr, create_graph=True)
    (hr,) = torch.autograd.grad(gr.sum(), xr)
    out["second_derivative"] = err(h, hr)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
