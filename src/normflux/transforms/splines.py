"""Monotone rational-quadratic splines (Durkan et al., "Neural Spline Flows", NeurIPS 2019).

Functional core shared by every spline layer (coupling, autoregressive, circular).
Written without boolean-mask indexing or in-place writes, so that it works under
``torch.func.vmap``/``jacrev`` and ``torch.compile(fullgraph=True)``; the branch of a
``torch.where`` that is not selected is always fed sanitised (in-range) values so that
its gradients stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._tracing import is_compiling

__all__ = ["check_floors", "rational_quadratic_spline", "spline_knots"]


def check_floors(bins: int, min_bin_width: float, min_bin_height: float,
                 min_derivative: float | None = None) -> None:
    """Check a spline's floors: of the bin widths and heights (fractions of the box) and,
    unless ``None``, of the slopes.

    Raises:
        ValueError: a negative bin floor (the knots could then decrease), a bin floor of
            ``1 / bins`` or more (no room left for the softmax), or ``min_derivative``
            outside ``[0, 1)`` (a zero parameter gives slope 1).
    """
    if not (0 <= min_bin_width and 0 <= min_bin_height
            and max(min_bin_width, min_bin_height) * bins < 1):
        raise ValueError(f"min_bin_width and min_bin_height must be >= 0 with floor * bins "
                         f"< 1, got {min_bin_width}, {min_bin_height} for {bins} bins")
    if min_derivative is not None and not 0 <= min_derivative < 1:
        raise ValueError(f"min_derivative must be in [0, 1) (a zero parameter gives slope 1), "
                         f"got {min_derivative}")


def _normalise(u: Tensor, minimum: float | Tensor) -> Tensor:
    """Softmax ``p`` over the last axis, floored: the bin fractions ``minimum + a p``
    (``a = 1 - minimum K``), which sum to 1.

    The softmax is written out (max-shift, exp, sum): for the short last axes of spline
    bins (K = 4..16) this is several times faster on CPU than ``torch.softmax``.
    """
    K = u.shape[-1]
    # the shift cancels in the ratio, so it needs no gradient (amax backward is slow)
    e = torch.exp(u - u.detach().amax(dim=-1, keepdim=True))
    return minimum + (1.0 - minimum * K) * (e / e.sum(dim=-1, keepdim=True))


def _knots(fractions: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Cumulative knot positions ``(..., K+1)`` from bin fractions, exactly ``low``..``high``."""
    K = fractions.shape[-1]
    cum = torch.split(torch.cumsum(fractions, dim=-1), [K - 1, 1], dim=-1)[0]
    inner = low[..., None] + (high - low)[..., None] * cum
    one = fractions[..., :1]  # not cum[..., :1]: cum is empty for a single bin (K = 1)
    return torch.cat([low[..., None].expand_as(one), inner, high[..., None].expand_as(one)], dim=-1)


def spline_knots(params: Tensor, low: Tensor, high: Tensor, kind: Tensor | None = None, *,
                 bins: int, min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                 min_derivative: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """Turn unconstrained parameters into the knots of a monotone RQ spline.

    With all parameters zero the spline is the identity (equal bins, unit slopes).

    Arguments:
        params: ``(..., n, P)`` unconstrained parameters per coordinate; ``P = 3K - 1``
            (K widths, K heights, K - 1 interior slopes; boundary slopes 1: linear tails)
            or ``P = 3K + 1`` (K widths, K heights, K + 1 slopes) when ``kind`` is given.
        low, high: ``(n,)`` the spline's box ``[low, high]`` per coordinate.
        kind: ``(n,)`` long, domain codes (0 real: boundary slopes 1; 1 interval: both
            boundary slopes free; 2 circle: the two boundary slopes are one parameter, so
            that the map is C1 on the circle, Rezende et al. 2020, section 3.2).
        bins: number of bins ``K``.
        min_bin_width, min_bin_height, min_derivative: floors (fractions of the box, slope).

    Returns:
        ``(xk, yk, dk)``, each ``(..., n, K+1)``: x-knots, y-knots and slopes at the knots.

    Raises:
        ValueError: ``P`` does not match ``bins``, a negative floor, or floors that
            leave no room.
    """
    K = bins
    P = params.shape[-1]
    check_floors(K, min_bin_width, min_bin_height)
    full = kind is not None
    if P != (3 * K + 1 if full else 3 * K - 1):
        raise ValueError(f"spline expects {3 * K + 1 if full else 3 * K - 1} parameters per "
                         f"coordinate for {K} bins, got {P}")
    uwh, ud = torch.split(params, [2 * K, P - 2 * K], dim=-1)  # split: cheap backward
    # widths and heights in one tensor (..., n, 2, K): half the number of kernel launches
    if min_bin_width == min_bin_height:
        floor: float | Tensor = min_bin_width
    else:
        floor = torch.tensor([[min_bin_width], [min_bin_height]], dtype=params.dtype,
                             device=params.device)
    # contiguous first: reductions over a short strided last axis are several times slower
    fractions = _normalise(uwh.contiguous().unflatten(-1, (2, K)), floor)
    xk, yk = _knots(fractions, low[..., None], high[..., None]).unbind(-2)
    # softplus shifted so that a zero parameter gives slope exactly 1
    shift = math.log(math.expm1(1.0 - min_derivative))
    # (ud + shift) is a fresh contiguous tensor: softplus on a strided view is ~15x slower
    slopes = min_derivative + F.softplus(ud + shift)
    if not full:
        one = torch.ones_like(params[..., :1])  # slopes is empty for a single bin
        dk = torch.cat([one, slopes, one], dim=-1)
    else:
        one = torch.ones_like(slopes[..., :1])
        first, inner, last = slopes[..., :1], slopes[..., 1:K], slopes[..., K:]
        k = kind[..., None]
        left = torch.where(k == 0, one, first)
        right = torch.where(k == 0, one, torch.where(k == 2, first, last))
        dk = torch.cat([left, inner, right], dim=-1)
    return xk, yk, dk


def _gather(t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Values of ``t`` at bin ``idx`` and ``idx + 1`` along the last axis."""
    both = torch.gather(t, -1, torch.cat([idx, idx + 1], dim=-1))
    return both[..., 0], both[..., 1]


def _rq_forward(xs, x0, x1, y0, y1, d0, d1):
    """Forward RQ map inside the located bin, with the intermediates the gradients need."""
    w, h = x1 - x0, y1 - y0
    s = h / w
    xi = (xs - x0) / w
    t = xi * (1 - xi)
    c2 = d1 + d0 - 2 * s
    den = s + c2 * t
    num_y = s * xi * xi + d0 * t
    y = torch.clamp(y0 + h * num_y / den, y0, y1)  # rounding must not leave the bin
    num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi)
    lad = torch.log(s * s * num / (den * den))
    return y, lad


def _rq_inverse(ys, x0, x1, y0, y1, d0, d1):
    """Inverse RQ map inside the located bin (Durkan et al. 2019, appendix A)."""
    w, h = x1 - x0, y1 - y0
    s = h / w
    dy = ys - y0
    c2 = d1 + d0 - 2 * s
    a = h * (s - d0) + dy * c2
    b = h * d0 - dy * c2
    c = -s * dy
    root = torch.sqrt((b * b - 4 * a * c).clamp(min=0))
    # The root in [0, 1] is 2c / (-b - sqrt(disc)) = (-b + sqrt(disc)) / (2a). Each form is
    # free of cancellation for one sign of b: the first for b >= 0, the second for b < 0
    # (where a >= |b| > 0, since a + b + c = s (h - dy) >= 0 and c <= 0). Using the first
    # for b < 0 loses every digit in float32 (xi off by ~1e-3 near a knot).
    pos = b >= 0
    den_root = torch.where(pos, -b - root, -1.0)
    den_root = torch.where(den_root == 0, -1e-30, den_root)
    a_safe = torch.where(pos, 1.0, a)
    xi = torch.where(pos, 2 * c / den_root, (root - b) / (2 * a_safe)).clamp(0, 1)
    t = xi * (1 - xi)
    den = s + c2 * t
    x = torch.clamp(x0 + xi * w, x0, x1)
    num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi)
    lad = -torch.log(s * s * num / (den * den))
    return x, lad


def _rq_partials(x, x0, x1, y0, y1, d0, d1, gy, gl):
    """Gradient of ``gy * y + gl * lad`` of the forward map, w.r.t. all seven inputs.

    Also returns ``y_x`` (the slope) and ``lad_x``, which the inverse's backward needs.
    Closed-form derivatives of Durkan et al. (2019) eq. 4 and of its log-slope.
    """
    w, h = x1 - x0, y1 - y0
    s = h / w
    xi = (x - x0) / w
    omx = 1 - xi
    t = xi * omx
    c2 = d1 + d0 - 2 * s
    den = s + c2 * t
    num_y = s * xi * xi + d0 * t
    num = d1 * xi * xi + 2 * s * t + d0 * omx * omx
    inv_den = 1 / den
    inv_num = 1 / num
    r = num_y * inv_den  # y = y0 + h r
    one_m2xi = omx - xi
    den_xi = c2 * one_m2xi
    r_xi = (2 * s * xi + d0 * one_m2xi - r * den_xi) * inv_den
    r_s = (xi * xi - r * (1 - 2 * t)) * inv_den
    r_d0 = t * (1 - r) * inv_den
    r_d1 = -r * t * inv_den
    l_xi = (2 * d1 * xi + 2 * s * one_m2xi - 2 * d0 * omx) * inv_num - 2 * den_xi * inv_den
    l_s = 2 / s + 2 * t * inv_num - 2 * (1 - 2 * t) * inv_den
    two_t_den = 2 * t * inv_den
    l_d0 = omx * omx * inv_num - two_t_den
    l_d1 = xi * xi * inv_num - two_t_den
    gyh = gy * h
    g_xi = gyh * r_xi + gl * l_xi
    g_s = gyh * r_s + gl * l_s
    g_d0 = gyh * r_d0 + gl * l_d0
    g_d1 = gyh * r_d1 + gl * l_d1
    inv_w = 1 / w
    g_h = gy * r + g_s * inv_w
    g_w = -(g_s * s + g_xi * xi) * inv_w
    g_x = g_xi * inv_w
    g_x0 = -g_x - g_w
    g_y0 = gy - g_h
    slope = h * r_xi * inv_w
    return (g_x, g_x0, g_w, g_y0, g_h, g_d0, g_d1), slope, l_xi * inv_w


def _rq_inverse_vjp(x, x0, x1, y0, y1, d0, d1, gx, gl):
    """Gradient of ``gx * x + gl * lad_inv`` of the inverse map ``x = f^-1(y)``, w.r.t.
    ``(y, x0, x1, y0, y1, d0, d1)``, from the forward partials at the inverse's output
    ``x`` (implicit function theorem: ``dx/dy = 1 / f_x``, ``dx/dtheta = -f_theta / f_x``,
    ``lad_inv = -lad(x; theta)``)."""
    zeros = torch.zeros_like(gx)
    _, slope, lad_x = _rq_partials(x, x0, x1, y0, y1, d0, d1, zeros, zeros)
    g_y = (gx - gl * lad_x) / slope
    grads, _, _ = _rq_partials(x, x0, x1, y0, y1, d0, d1, -g_y, -gl)
    return (g_y,) + grads[1:]


def _t(t):
    """A missing tangent (``None``) is zero."""
    return 0.0 if t is None else t


def _jvp_forward(saved, tangents):
    """Forward-mode derivative of the forward map from its closed-form partials."""
    x = saved[0]
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    dy, _, _ = _rq_partials(*saved, ones, zeros)
    dl, _, _ = _rq_partials(*saved, zeros, ones)
    return (sum(a * _t(b) for a, b in zip(dy, tangents)),
            sum(a * _t(b) for a, b in zip(dl, tangents)))


class _RQForward(torch.autograd.Function):
    """Forward RQ map with a fused closed-form backward (one pass instead of ~60 ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xs, x0, x1, y0, y1, d0, d1):
        return _rq_forward(xs, x0, x1, y0, y1, d0, d1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, gy, gl):
        grads, _, _ = _rq_partials(*ctx.saved_tensors, gy, gl)
        return grads

    @staticmethod
    def jvp(ctx, *tangents):
        return _jvp_forward(ctx.saved_tensors, tangents)


class _RQInverse(torch.autograd.Function):
    """Inverse RQ map; backward by the implicit function theorem from the forward partials.

    With ``y = f(x; theta)``: ``dx/dy = 1 / f_x``, ``dx/dtheta = -f_theta / f_x``, and
    ``lad_inv = -lad_fwd(x; theta)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ys, x0, x1, y0, y1, d0, d1):
        return _rq_inverse(ys, x0, x1, y0, y1, d0, d1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[0], *inputs[1:])
        ctx.save_for_forward(output[0], *inputs[1:])

    @staticmethod
    def jvp(ctx, ty, *t_theta):
        x, *theta = ctx.saved_tensors
        ones, zeros = torch.ones_like(x), torch.zeros_like(x)
        dy, slope, lad_x = _rq_partials(x, *theta, ones, zeros)
        dl, _, _ = _rq_partials(x, *theta, zeros, ones)
        # x = f^-1(y; theta): dx = (dy - f_theta . dtheta) / f_x
        f_theta = sum(a * _t(b) for a, b in zip(dy[1:], t_theta))
        dx = (_t(ty) - f_theta) / slope
        # lad_inv = -lad(x; theta)
        dlad = -(lad_x * dx + sum(a * _t(b) for a, b in zip(dl[1:], t_theta)))
        return dx, dlad

    @staticmethod
    def backward(ctx, gx, gl):
        return _rq_inverse_vjp(*ctx.saved_tensors, gx, gl)


def rational_quadratic_spline(x: Tensor, xk: Tensor, yk: Tensor, dk: Tensor,
                              inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Evaluate a monotone rational-quadratic spline (or its inverse) elementwise.

    Inside ``[xk[0], xk[K]]`` the spline of Durkan et al. (2019, eq. 4 and appendix A);
    outside, the identity with log-slope 0 (linear tails; for continuity the boundary
    slopes and knots should match, as :func:`spline_knots` makes them for real
    coordinates). The inverse solves the quadratic of appendix A with the numerically
    stable root ``2c / (-b - sqrt(b^2 - 4ac))``, the discriminant clamped at 0 and the
    bin coordinate clamped to ``[0, 1]``: it never raises and never returns NaN for an
    input inside the codomain, and the result lies in the bin where ``y`` was located.

    Arguments:
        x: ``(...)`` inputs (outputs ``y`` when ``inverse``).
        xk, yk: ``(..., K+1)`` increasing knots; ``dk``: ``(..., K+1)`` positive slopes.
        inverse: evaluate the inverse map.

    Returns:
        ``(y, ladj)`` with the shape of ``x``; ``ladj`` is ``log|dy/dx|`` elementwise
        (for the inverse, ``log|dx/dy|``).
    """
    K = xk.shape[-1] - 1
    src = (yk if inverse else xk).detach()  # locating the bin needs no gradient
    low, high = src[..., 0], src[..., K]
    inside = (x >= low) & (x <= high)
    xs = torch.where(inside, x, low)  # sanitised input for the unused branch
    # bin index: number of interior knots <= xs, in 0..K-1
    idx = torch.searchsorted(src[..., 1:K].contiguous(), xs[..., None], right=True)
    x0, x1 = _gather(xk, idx)
    y0, y1 = _gather(yk, idx)
    d0, d1 = _gather(dk, idx)
    if is_compiling():
        # under torch.compile plain ops: inductor fuses them (dynamo cannot trace the
        # custom jvp of the autograd Functions)
        y, lad = (_rq_inverse if inverse else _rq_forward)(xs, x0, x1, y0, y1, d0, d1)
    else:
        fn = _RQInverse if inverse else _RQForward
        y, lad = fn.apply(xs, x0, x1, y0, y1, d0, d1)
    y = torch.where(inside, y, x)
    lad = torch.where(inside, lad, torch.zeros_like(lad))
    return y, lad
