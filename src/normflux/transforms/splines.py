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

__all__ = ["rational_quadratic_spline", "spline_knots"]


def _normalise(u: Tensor, minimum: float) -> Tensor:
    """Softmax over the last axis, floored at ``minimum``: bin fractions summing to 1.

    The softmax is written out (max-shift, exp, sum): for the short last axes of spline
    bins (K = 4..16) this is several times faster on CPU than ``torch.softmax``.
    """
    K = u.shape[-1]
    e = torch.exp(u - u.amax(dim=-1, keepdim=True))
    return minimum + (1.0 - minimum * K) * (e / e.sum(dim=-1, keepdim=True))


def _knots(fractions: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Cumulative knot positions ``(..., K+1)`` from bin fractions, exactly ``low``..``high``."""
    cum = torch.cumsum(fractions[..., :-1], dim=-1)
    inner = low[..., None] + (high - low)[..., None] * cum
    return torch.cat([low[..., None].expand_as(cum[..., :1]), inner,
                      high[..., None].expand_as(cum[..., :1])], dim=-1)


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
        ValueError: ``P`` does not match ``bins``, or the floors leave no room.
    """
    K = bins
    P = params.shape[-1]
    if min_bin_width * K >= 1 or min_bin_height * K >= 1:
        raise ValueError(f"min_bin_width/min_bin_height too large for {K} bins")
    full = kind is not None
    if P != (3 * K + 1 if full else 3 * K - 1):
        raise ValueError(f"spline expects {3 * K + 1 if full else 3 * K - 1} parameters per "
                         f"coordinate for {K} bins, got {P}")
    widths = _normalise(params[..., :K], min_bin_width)
    heights = _normalise(params[..., K:2 * K], min_bin_height)
    xk = _knots(widths, low, high)
    yk = _knots(heights, low, high)
    # softplus shifted so that a zero parameter gives slope exactly 1
    shift = math.log(math.expm1(1.0 - min_derivative))
    slopes = min_derivative + F.softplus(params[..., 2 * K:] + shift)
    if not full:
        one = torch.ones_like(slopes[..., :1])
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
    src, dst = (yk, xk) if inverse else (xk, yk)
    low, high = src[..., 0], src[..., K]
    inside = (x >= low) & (x <= high)
    xs = torch.where(inside, x, low)  # sanitised input for the unused branch
    # bin index: number of interior knots <= xs, in 0..K-1
    idx = (xs[..., None] >= src[..., 1:K]).sum(dim=-1, keepdim=True)
    x0, x1 = _gather(xk, idx)
    y0, y1 = _gather(yk, idx)
    d0, d1 = _gather(dk, idx)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if not inverse:
        xi = (xs - x0) / w
        xi1 = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * xi1
        y = y0 + h * (s * xi * xi + d0 * xi1) / den
        y = torch.minimum(torch.maximum(y, y0), y1)  # rounding must not leave the bin
    else:
        dy = xs - y0
        c2 = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp(min=0)
        root = torch.sqrt(disc)
        # The root in [0, 1] is 2c / (-b - sqrt(disc)) = (-b + sqrt(disc)) / (2a). Each form
        # is free of cancellation for one sign of b: the first for b >= 0, the second for
        # b < 0 (where a >= |b| > 0, since a + b + c = s (h - dy) >= 0 and c <= 0). Using
        # the first for b < 0 loses every digit in float32 (xi off by ~1e-3 near a knot).
        pos = b >= 0
        den_root = torch.where(pos, -b - root, torch.full_like(b, -1.0))
        den_root = torch.where(den_root == 0, torch.full_like(den_root, -1e-30), den_root)
        a_safe = torch.where(pos, torch.ones_like(a), a)
        xi = torch.where(pos, 2 * c / den_root, (root - b) / (2 * a_safe)).clamp(0, 1)
        xi1 = xi * (1 - xi)
        den = s + c2 * xi1
        y = torch.minimum(torch.maximum(x0 + xi * w, x0), x1)
    num = d1 * xi * xi + 2 * s * xi1 + d0 * (1 - xi) * (1 - xi)
    lad = 2 * torch.log(s) + torch.log(num) - 2 * torch.log(den)
    if inverse:
        lad = -lad
    y = torch.where(inside, y, x)
    lad = torch.where(inside, lad, torch.zeros_like(lad))
    return y, lad
