"""Fused rational-quadratic spline: parameters -> (y, ladj) with a closed-form backward.

The same map as ``spline_knots`` followed by ``rational_quadratic_spline`` (Durkan et al.
2019, eq. 4 and appendix A) for real coordinates with linear tails, computed in one
``torch.autograd.Function``. Autograd's generic backward of the knot construction
(softmax, cumulative sums, concatenations, gathers) is the largest cost of a spline
layer on CPU; here the backward is written out:

* the bin quantities' gradients come from :func:`~normflux.transforms.splines._rq_partials`;
* only the two knots around the located bin receive gradient, so the softmax-cumsum
  backward reduces to step functions in the bin index:
  ``dL/du_i = p_i (g_lo [i < k] + g_hi [i <= k] - (g_lo P_k + g_hi P_{k+1}))`` with ``p``
  the bin fractions, ``P`` their cumulative sums and ``k`` the bin;
* the slope parameters get ``sigmoid(u + shift)`` times the slope gradients at ``k`` and
  ``k + 1``.

Second derivatives (``create_graph=True``) fall back to differentiating the reference
implementation, and under ``torch.func`` transforms the reference is used throughout, so
every derivative order stays exact (checked against the reference in the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .splines import (
    _knots,
    _rq_forward,
    _rq_inverse,
    _rq_partials,
    _softmax_floor,
    rational_quadratic_spline,
    spline_knots,
)

__all__ = ["fused_rq_spline"]


def _reference(x, params, low, high, bins, mw, mh, md, inverse):
    knots = spline_knots(params, low, high, bins=bins, min_bin_width=mw, min_bin_height=mh,
                         min_derivative=md)
    return rational_quadratic_spline(x, *knots, inverse=inverse)


class _FusedRQ(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, params, low, high, bins, mw, mh, md, inverse):
        K = bins
        uw, uh, ud = params[..., :K], params[..., K:2 * K], params[..., 2 * K:]
        pw, fw = _softmax_floor(uw, mw)
        ph, fh = _softmax_floor(uh, mh)
        xk = _knots(fw, low, high)
        yk = _knots(fh, low, high)
        shift = math.log(math.expm1(1.0 - md))
        one = torch.ones_like(params[..., :1])
        dk = torch.cat([one, md + F.softplus(ud + shift), one], dim=-1)
        src = yk if inverse else xk
        # the first and last knots are exactly low and high (broadcast over the batch)
        inside = (x >= low) & (x <= high)
        xs = torch.where(inside, x, low)
        idx = torch.searchsorted(src[..., 1:K].contiguous(), xs[..., None], right=True)
        idx2 = torch.cat([idx, idx + 1], dim=-1)
        x0, x1 = torch.gather(xk, -1, idx2).unbind(-1)
        y0, y1 = torch.gather(yk, -1, idx2).unbind(-1)
        d0, d1 = torch.gather(dk, -1, idx2).unbind(-1)
        f = _rq_inverse if inverse else _rq_forward
        y, lad = f(xs, x0, x1, y0, y1, d0, d1)
        y = torch.where(inside, y, x)
        lad = torch.where(inside, lad, torch.zeros_like(lad))
        return y, lad, pw, ph, idx, x0, x1, y0, y1, d0, d1, inside

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, params, low, high, bins, mw, mh, md, inverse = inputs
        y, lad, pw, ph, idx, x0, x1, y0, y1, d0, d1, inside = output
        # the point in x-space where the forward map's partials are taken
        xpt = y if inverse else x
        ctx.save_for_backward(x, params, low, high, xpt, pw, ph, idx, x0, x1, y0, y1, d0, d1,
                              inside)
        ctx.consts = (bins, mw, mh, md, inverse)
        ctx.mark_non_differentiable(pw, ph, idx, x0, x1, y0, y1, d0, d1, inside)

    @staticmethod
    def backward(ctx, gy, gl, *unused):
        (x, params, low, high, xpt, pw, ph, idx, x0, x1, y0, y1, d0, d1,
         inside) = ctx.saved_tensors
        bins, mw, mh, md, inverse = ctx.consts
        wrt = [t for t in (x, params) if t.requires_grad]
        if torch.is_grad_enabled() and wrt:
            # create_graph=True: differentiate the reference (exact higher derivatives)
            with torch.enable_grad():
                y, lad = _reference(x, params, low, high, bins, mw, mh, md, inverse)
                grads = iter(torch.autograd.grad((y, lad), wrt, (gy, gl), create_graph=True,
                                                 allow_unused=True))
            gx = next(grads) if x.requires_grad else None
            gp = next(grads) if params.requires_grad else None
            return gx, gp, None, None, None, None, None, None, None
        K = bins
        gy_in = torch.where(inside, gy, 0.0)
        gl_in = torch.where(inside, gl, 0.0)
        xs = torch.where(inside, xpt, x0)
        if inverse:
            zeros = torch.zeros_like(gy)
            _, slope, lad_x = _rq_partials(xs, x0, x1, y0, y1, d0, d1, zeros, zeros)
            g_in = (gy_in - gl_in * lad_x) / slope
            grads, _, _ = _rq_partials(xs, x0, x1, y0, y1, d0, d1, -g_in, -gl_in)
            _, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1 = grads
        else:
            grads, _, _ = _rq_partials(xs, x0, x1, y0, y1, d0, d1, gy_in, gl_in)
            g_in, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1 = grads
        g_input = torch.where(inside, g_in, gy)
        k = idx  # (..., 1)
        ar = torch.arange(K, device=params.device)
        below = (ar < k).to(params.dtype)      # [i < k]
        upto = (ar <= k).to(params.dtype)      # [i <= k]
        last = k == K - 1                      # the upper knot is the fixed high end
        width = high - low

        def softmax_grad(p, g_lo, g_hi, minimum):
            a = (1.0 - minimum * K) * width
            g_lo = a * g_lo
            g_hi = torch.where(last[..., 0], 0.0, a * g_hi)
            cp = torch.cumsum(p, dim=-1)
            cp_k = torch.gather(cp, -1, k)[..., 0]
            p_k = torch.gather(p, -1, k)[..., 0]
            dot = g_lo * (cp_k - p_k) + g_hi * cp_k
            return p * (g_lo[..., None] * below + g_hi[..., None] * upto - dot[..., None])

        g_uw = softmax_grad(pw, g_x0, g_x1, mw)
        g_uh = softmax_grad(ph, g_y0, g_y1, mh)
        shift = math.log(math.expm1(1.0 - md))
        sig = torch.sigmoid(params[..., 2 * K:] + shift)  # (..., K-1): slope m+1 from u_m
        am = torch.arange(K - 1, device=params.device)
        g_ud = sig * (g_d0[..., None] * (am == k - 1).to(params.dtype)
                      + g_d1[..., None] * (am == k).to(params.dtype))
        g_params = torch.cat([g_uw, g_uh, g_ud], dim=-1)
        return g_input, g_params, None, None, None, None, None, None, None


def fused_rq_spline(x: Tensor, params: Tensor, low: Tensor, high: Tensor, *, bins: int,
                    min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                    min_derivative: float = 1e-3, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """RQ spline with linear tails from unconstrained parameters, in one fused op.

    Equal (to rounding) to ``rational_quadratic_spline(x, *spline_knots(params, low, high,
    bins=bins, ...), inverse=inverse)`` for real coordinates, with a closed-form backward.

    Arguments:
        x: ``(..., n)`` inputs (outputs when ``inverse``).
        params: ``(..., n, 3K - 1)`` unconstrained parameters (K widths, K heights, K - 1
            interior slopes).
        low, high: ``(n,)`` the spline box ``[-B, B]`` per coordinate.
        bins: ``K``.
        min_bin_width, min_bin_height, min_derivative: floors.
        inverse: evaluate the inverse.

    Returns:
        ``(y, ladj)``, each of the shape of ``x``; ``ladj`` elementwise.

    Raises:
        ValueError: ``params`` does not have ``3K - 1`` entries per coordinate, or the
            floors leave no room (``min_bin_width * K >= 1``).
    """
    if min_bin_width * bins >= 1 or min_bin_height * bins >= 1:
        raise ValueError(f"min_bin_width/min_bin_height too large for {bins} bins")
    if params.shape[-1] != 3 * bins - 1:
        raise ValueError(f"spline expects {3 * bins - 1} parameters per coordinate for {bins} "
                         f"bins, got {params.shape[-1]}")
    if _functorch_active():
        # torch.func transforms (vmap, jacrev, hessian) differentiate the reference, whose
        # every derivative order is exact; the fused backward is first-order only there
        return _reference(x, params, low, high, bins, min_bin_width, min_bin_height,
                          min_derivative, inverse)
    out = _FusedRQ.apply(x, params, low, high, bins, min_bin_width, min_bin_height,
                         min_derivative, inverse)
    return out[0], out[1]


def _functorch_active() -> bool:
    fn = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(fn()) if fn is not None else False
