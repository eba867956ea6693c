"""Fused rational-quadratic spline: parameters -> (y, ladj) with a closed-form backward.

The same map as ``spline_knots`` followed by ``rational_quadratic_spline`` (Durkan et al.
2019, eq. 4 and appendix A) for real coordinates with linear tails, computed in one
``torch.autograd.Function`` laid out for the CPU:

* **parameter-major layout.** The parameters are transposed once to ``(P, N)`` (``N`` =
  batch x coordinates), so that every per-bin quantity is a contiguous row. The softmax,
  the cumulative sums and the bin search then reduce over the *leading* axis, which
  vectorises across ``N``; over a short last axis (K = 8 bins) the same reductions run
  on a scalar path several times slower. The bin is the count of interior knots ``<= x``
  (the sign of a float difference is exact, so this equals ``searchsorted``).
* **only what the located bin needs.** The slopes' softplus and sigmoid are evaluated at
  the two knots of the bin, not at all ``K - 1``; boundary slopes (exactly 1) are blended
  in arithmetically (``d * 1 + 0`` and ``d * 0 + 1`` are exact for finite ``d``).
* **closed-form backward.** The bin quantities' gradients come from
  :func:`~normflux.transforms.splines._rq_partials`. Only the two knots around bin ``k``
  receive gradient, so the softmax-cumsum backward reduces to step functions in the bin
  index: ``dL/dp_i = a W (g_lo [i < k] + g_hi [i <= k])`` (``a = 1 - K m`` the floor
  factor, ``W`` the box width), then ``dL/du = p (dL/dp - <p, dL/dp>)``; the slope
  parameters get ``sigmoid(u + shift)`` times the slope gradients at ``k`` and ``k + 1``.

On CPU tensors (float32, float64) :func:`fused_rq_spline` runs the same map and backward as
a C kernel instead (:mod:`~normflux.transforms.native_spline`, built at first use), and on
CUDA tensors as Triton kernels (:mod:`~normflux.transforms.triton_spline`); this tensor-op
Function is the path without a C compiler or Triton, on other devices, on GPUs under
``torch.compile`` (inductor fuses it), and on the CPU under ``torch.compile`` where the
kernel's custom operator is unavailable.

Second derivatives (``create_graph=True``) and batched VJPs fall back to differentiating
the reference implementation, and under ``torch.func`` transforms the reference is used
throughout, so every derivative order stays exact (checked against the reference in the
tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._tracing import is_compiling
from . import native_spline
from ._first_order import reference_backward, reference_grads, use_reference
from .splines import (
    _rq_forward,
    _rq_inverse,
    _rq_inverse_vjp,
    _rq_partials,
    check_floors,
    rational_quadratic_spline,
    spline_knots,
)

__all__ = ["fused_rq_spline"]


def _reference(x, params, low, high, bins, mw, mh, md, inverse):
    knots = spline_knots(params, low, high, bins=bins, min_bin_width=mw, min_bin_height=mh,
                         min_derivative=md)
    return rational_quadratic_spline(x, *knots, inverse=inverse)


def _probs(u: Tensor) -> Tensor:
    """Softmax over the leading (bin) axis of ``(K, *S)``."""
    e = torch.exp(u - u.amax(0))
    return e.div_(e.sum(0))


def _knots(p: Tensor, minimum: float, low: Tensor, width: Tensor, high: Tensor) -> Tensor:
    """``(K + 1, *S)`` knots from ``(K, *S)`` bin probabilities, the same operations as
    :func:`~normflux.transforms.splines.spline_knots` (equal to rounding: the summation
    order of a reduction depends on the layout): floored fractions
    ``minimum + (1 - minimum K) p``, cumulative sums, ``low + width * cum``, and the two
    ends exactly ``low`` and ``high``."""
    K = p.shape[0]
    kn = torch.empty((K + 1,) + p.shape[1:], dtype=p.dtype, device=p.device)
    fractions = p[:K - 1].mul(1.0 - minimum * K).add_(minimum)
    torch.cumsum(fractions, 0, out=kn[1:K])
    kn[1:K].mul_(width).add_(low)
    kn[0] = low
    kn[K] = high
    return kn


class _FusedRQ(torch.autograd.Function):
    """``(x (*S), u (P, *S)) -> (y, ladj)`` with the parameter axis leading; ``low`` and
    ``high`` broadcast to ``S``. Any strides whose innermost axis is dense and long."""

    @staticmethod
    def forward(ctx, x2, u, low, high, bins, mw, mh, md, inverse):
        K = bins
        width = high - low
        pw, ph = _probs(u[:K]), _probs(u[K:2 * K])
        xk = _knots(pw, mw, low, width, high)
        yk = _knots(ph, mh, low, width, high)
        src = yk if inverse else xk
        inside = (x2 >= low) & (x2 <= high)
        xs = torch.where(inside, x2, low)  # sanitised input for the unused branch
        # bin index: the number of interior knots <= xs (exact: see the module docstring)
        kf = (xs - src[1:K]).ge_(0).sum(0, dtype=x2.dtype)
        i0 = kf.long()[None]
        i1 = i0 + 1
        x0, x1 = xk.gather(0, i0)[0], xk.gather(0, i1)[0]
        y0, y1 = yk.gather(0, i0)[0], yk.gather(0, i1)[0]
        # slopes at the bin's two knots; softplus shifted so that u = 0 gives slope 1
        shift = math.log(math.expm1(1.0 - md))
        ud = u[2 * K:]
        s0 = ud.gather(0, (i0 - 1).clamp_(min=0))[0].add_(shift)
        s1 = ud.gather(0, i0.clamp(max=K - 2))[0].add_(shift)
        not_first = kf.clamp(max=1.0)              # 1 where k >= 1, else 0
        not_last = (K - 1.0 - kf).clamp_(max=1.0)  # 1 where k <= K - 2, else 0
        d0 = torch.addcmul(1.0 - not_first, F.softplus(s0).add_(md), not_first)
        d1 = torch.addcmul(1.0 - not_last, F.softplus(s1).add_(md), not_last)
        y, lad = (_rq_inverse if inverse else _rq_forward)(xs, x0, x1, y0, y1, d0, d1)
        y = torch.where(inside, y, x2)
        lad = lad.mul_(inside)
        ctx.save_for_backward(x2, u, low, high, y if inverse else x2, pw, ph, kf, x0, x1, y0, y1,
                              d0, d1, s0, s1, not_first, not_last, inside)
        ctx.consts = (K, mw, mh, md, inverse)
        return y, lad

    @staticmethod
    def backward(ctx, gy, gl):
        (x, u, low, high, xpt, pw, ph, kf, x0, x1, y0, y1, d0, d1, s0, s1, not_first,
         not_last, inside) = ctx.saved_tensors
        K, mw, mh, md, inverse = ctx.consts
        if reference_backward(gy, gl):
            # create_graph=True or batched VJPs: differentiate the reference (exact
            # higher derivatives)
            return tuple(reference_grads(
                lambda x, u: _reference(x, u.movedim(0, -1), low, high, K, mw, mh, md, inverse),
                (x, u), (gy, gl))) + (None,) * 7
        # the point in x-space where the forward map's partials are taken (in the box)
        xpt = torch.where(inside, xpt, x0)
        gy_in, gl_in = gy * inside, gl * inside
        theta = (x0, x1, y0, y1, d0, d1)
        if inverse:
            grads = _rq_inverse_vjp(xpt, *theta, gy_in, gl_in)
        else:
            grads, _, _ = _rq_partials(xpt, *theta, gy_in, gl_in)
        g_in, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1 = grads
        g_input = torch.where(inside, g_in, gy)
        g_u = torch.empty_like(u)  # the strides of u: no copy in the layout's backward
        bins = torch.arange(K, dtype=gy.dtype, device=gy.device).view((K,) + (1,) * kf.dim())
        below = (kf - bins).clamp_(0, 1)         # [i < k]
        upto = (kf + 1 - bins).clamp_(0, 1)      # [i <= k]
        width = high - low
        for p, g_lo, g_hi, m, out in ((pw, g_x0, g_x1, mw, g_u[:K]),
                                      (ph, g_y0, g_y1, mh, g_u[K:2 * K])):
            a = (1.0 - m * K) * width
            g_p = below * (g_lo * a)
            g_p.addcmul_(upto, g_hi.mul(not_last).mul_(a))  # the last upper knot is fixed
            q = g_p.mul_(p)
            torch.addcmul(q, p, q.sum(0), value=-1, out=out)
        g_ud = g_u[2 * K:].zero_()
        i0 = kf.long()[None]
        g_ud.scatter_add_(0, (i0 - 1).clamp_(min=0),
                          g_d0.mul(not_first).mul_(torch.sigmoid(s0))[None])
        g_ud.scatter_add_(0, i0.clamp(max=K - 2), g_d1.mul(not_last).mul_(torch.sigmoid(s1))[None])
        return g_input, g_u, None, None, None, None, None, None, None


def fused_rq_spline(x: Tensor, params: Tensor, low: Tensor, high: Tensor, *, bins: int,
                    min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                    min_derivative: float = 1e-3, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """RQ spline with linear tails from unconstrained parameters, in one fused op.

    Equal (to rounding) to ``rational_quadratic_spline(x, *spline_knots(params, low, high,
    bins=bins, ...), inverse=inverse)`` for real coordinates, with a closed-form backward.
    CPU float32/float64 tensors go through the C kernel where it builds (computed in
    float64: float32 results correctly rounded; ``NORMFLUX_NATIVE=0`` switches it off),
    CUDA ones through the same computation as Triton kernels where Triton imports
    (:mod:`~normflux.transforms.triton_spline`; ``NORMFLUX_TRITON=0`` switches it off;
    not under ``torch.compile``), others through a Function of tensor ops.
    That reference itself is evaluated under ``torch.func`` transforms and forward-mode AD,
    in compiled passes without gradients, for a single bin, a box (``low``, ``high``) that
    requires grad, and mixed dtypes. (Where rounding moves a knot by an ulp, an input
    exactly on it may be located in the neighbouring bin by one path and not the other:
    both are exact one-sided evaluations.)

    Arguments:
        x: ``(..., n)`` inputs (outputs when ``inverse``).
        params: ``(..., n, 3K - 1)`` unconstrained parameters (K widths, K heights, K - 1
            interior slopes). Any strides; batch-minor ones (memory ``(n, P, batch)``,
            a conditioner's ``transposed_output``) are read without a copy, others are
            transposed once.
        low, high: ``(n,)`` the spline box per coordinate (or scalars).
        bins: ``K``.
        min_bin_width, min_bin_height, min_derivative: floors.
        inverse: evaluate the inverse.

    Returns:
        ``(y, ladj)``, each of the shape of ``x``; ``ladj`` elementwise.

    Raises:
        ValueError: ``x`` is 0-d, ``params`` is not of shape ``x.shape + (3K - 1,)``, the
            floors are negative or leave no room (``min_bin_width * K >= 1``), or
            ``min_derivative`` is outside ``[0, 1)``.
    """
    check_floors(bins, min_bin_width, min_bin_height, min_derivative)
    if x.dim() == 0:
        raise ValueError("spline inputs must have shape (..., n), got a 0-d tensor")
    if params.shape[-1] != 3 * bins - 1:
        raise ValueError(f"spline expects {3 * bins - 1} parameters per coordinate for {bins} "
                         f"bins, got {params.shape[-1]}")
    if params.shape[:-1] != x.shape:
        raise ValueError(f"spline parameters of shape {tuple(params.shape)} do not match inputs "
                         f"of shape {tuple(x.shape)}: expected {tuple(x.shape) + (3 * bins - 1,)}")
    n = x.shape[-1]
    low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device) if not isinstance(b, Tensor)
                 else b for b in (low, high))
    low, high = (b.expand(n) if b.dim() == 0 else b for b in (low, high))
    # the C kernel (built at first use): one pass per element, any strides; torch.compile
    # keeps it in its graph as a custom operator
    native = (x.device.type == params.device.type == low.device.type == high.device.type == "cpu"
              and x.dtype in (torch.float32, torch.float64)
              and native_spline.available() and (not is_compiling() or native_spline.traceable()))
    if (use_reference(compiled_ok=native) or bins < 2 or n == 0
            or low.shape != (n,) or high.shape != (n,)
            or not x.dtype == params.dtype == low.dtype == high.dtype
            or low.requires_grad or high.requires_grad):
        # torch.func transforms (vmap, jacrev, hessian) and forward-mode AD differentiate
        # the reference, whose every derivative order is exact (the fused backward is
        # first-order only); so do a learnable box, mixed dtypes (promoted there), a
        # single bin (no interior slope) and no coordinates
        return _reference(x, params, low, high, bins, min_bin_width, min_bin_height,
                          min_derivative, inverse)
    consts = (bins, min_bin_width, min_bin_height, min_derivative, inverse)
    if native:
        return native_spline.rq_spline(x, params, low, high, *consts)
    if (x.is_cuda and x.dtype in (torch.float32, torch.float64) and not is_compiling()
            and params.device == low.device == high.device == x.device):
        # the Triton kernels: one launch per pass instead of ~100 (torch.compile fuses
        # the tensor-op Function below itself); imported at the first CUDA call, as
        # importing Triton takes 0.2 s
        from . import triton_spline
        if triton_spline.available():
            try:
                return triton_spline.rq_spline(x, params, low, high, *consts)
            except triton_spline.KernelUnavailable:
                pass  # warned once; the tensor ops below from now on
    if x.dim() == 2 and params.stride(0) == 1 and params.stride(2) == x.shape[0]:
        # batch-minor parameters (a conditioner's transposed output, memory (n, P, B)):
        # the parameter-major view is free, and only x (n values per row) is transposed
        y, lad = _FusedRQ.apply(x.t().contiguous(), params.permute(2, 1, 0), low[:, None],
                                high[:, None], *consts)
        return y.t(), lad.t()
    u = params.reshape(-1, n, 3 * bins - 1).permute(2, 0, 1).contiguous()
    y, lad = _FusedRQ.apply(x.reshape(-1, n), u, low, high, *consts)
    return y.view(x.shape), lad.view(x.shape)

