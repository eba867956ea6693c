"""The RQ spline's forward and backward as Triton kernels for CUDA tensors.

The GPU counterpart of :mod:`~normflux.transforms.native_spline`: the same map as
:func:`~normflux.transforms.fused_spline.fused_rq_spline` (knots from the unconstrained
parameters, the located bin, the map or its inverse and its log-slope; then the
closed-form VJP), one element per lane, in double precision whatever the storage type
(float32 outputs correctly rounded, as on the CPU), reading every tensor through its
strides. At the batch sizes flows train with, a spline layer on a GPU is bound by kernel
launches, not arithmetic: the tensor-op Function launches some 100 kernels per layer and
pass, these kernels one (forward) or one (backward).

The backward recomputes the forward from the saved input and parameters instead of
saving intermediates (the parameters are alive anyway: the conditioner produced them).

Used where Triton imports (it ships with PyTorch's CUDA builds on Linux) for float32 and
float64 CUDA tensors outside ``torch.compile`` (which fuses the tensor-op Function itself);
``NORMFLUX_TRITON=0`` switches it off. If Triton fails to compile or launch the kernels
(an old Triton, an unsupported GPU), one warning says why and the process goes on with
the tensor-op Function, as it does when the C kernel does not build. CUDA graphs: capture
after one eager call per direction and dtype, which compiles the kernels and places their
constants on the device (neither may happen during a capture).

With ``TRITON_INTERPRET=1`` set before the first import, Triton interprets the kernels on
CPU tensors, which is how the CPU-only test suite checks them against the C kernel
(``tests/test_triton_spline.py``).

Formulas: Durkan et al., "Neural Spline Flows" (NeurIPS 2019), eq. 4 and appendix A;
their derivatives as in :func:`~normflux.transforms.splines._rq_partials`.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache

import torch
from torch import Tensor

from ._first_order import reference_backward, reference_grads

__all__ = ["KernelUnavailable", "available", "rq_spline"]

try:  # optional: PyTorch's CUDA wheels bring it; CPU builds usually do not
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

#: elements per program (float64 arithmetic on 4 warps)
BLOCK = 128


#: why the kernels failed in this process (then :func:`available` is false), else None
_failure: str | None = None


class KernelUnavailable(RuntimeError):
    """Triton could not compile or launch a spline kernel (reported once as a warning);
    the caller falls back to the tensor-op Function."""


def available() -> bool:
    """Whether the Triton kernels can run: Triton imports, ``NORMFLUX_TRITON`` is not
    ``"0"`` and no kernel has failed in this process."""
    return (triton is not None and _failure is None
            and os.environ.get("NORMFLUX_TRITON", "1") != "0")


def _launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; an error raised by Triton itself (compilation,
    resources, an unsupported device) switches the kernels off for the process with one
    warning and raises :class:`KernelUnavailable`. Other errors (out of memory, ...)
    propagate unchanged."""
    global _failure
    try:
        kernel[grid](*args, **meta)
    except Exception as e:
        if not type(e).__module__.startswith("triton"):
            raise
        lines = str(e).strip().splitlines()
        _failure = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        warnings.warn(f"normflux: Triton could not run the spline kernels ({_failure}); splines on "
                      "the GPU use tensor ops in this process (NORMFLUX_TRITON=0 skips the "
                      "attempt)", RuntimeWarning, stacklevel=2)
        raise KernelUnavailable(_failure) from e


if triton is not None:

    @triton.jit
    def _clamp(v, lo, hi):
        """``min(max(v, lo), hi)`` that keeps a NaN ``v`` (``tl.minimum``/``tl.maximum``
        return the other operand, and a diverged network's NaN parameters must give NaN
        outputs, as on the CPU)."""
        return tl.where(v < lo, lo, tl.where(v > hi, hi, v))

    @triton.jit
    def _ld(ptr, mask):
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float64)

    @triton.jit
    def _softmax_stats(ub, sup, mask, OFF: tl.constexpr, K: tl.constexpr):
        """Max and reciprocal sum of ``exp(u - max)`` over parameter rows OFF..OFF+K-1."""
        mx = _ld(ub + OFF * sup, mask)
        for i in tl.static_range(1, K):
            mx = tl.maximum(mx, _ld(ub + (OFF + i) * sup, mask))
        sm = tl.zeros_like(mx)
        for i in tl.static_range(K):
            sm += tl.exp(_ld(ub + (OFF + i) * sup, mask) - mx)
        return mx, 1.0 / sm

    @triton.jit
    def _softplus(z):
        """``softplus(z)`` and its derivative ``sigmoid(z)`` from one exp (``log1p`` by
        Goldberg's correction, exact also where ``1 + e`` rounds to 1)."""
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        log1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        value = tl.maximum(z, 0.0) + log1p
        slope = tl.where(z >= 0, 1.0, e) / (1.0 + e)
        return value, slope

    @triton.jit
    def _locate(ub, sup, x, lo, hi, mask, mw, mh, md, shift, K: tl.constexpr,
                INVERSE: tl.constexpr):
        """Knots, the located bin ``kf`` (the number of interior knots <= x), its ends and
        slopes, as the C kernel's ``locate``."""
        mxw, isw = _softmax_stats(ub, sup, mask, 0, K)
        mxh, ish = _softmax_stats(ub, sup, mask, K, K)
        inside = (x >= lo) & (x <= hi)
        xs = tl.where(inside, x, lo)  # sanitised input (also NaN)
        width = hi - lo
        aw = 1.0 - mw * K
        ah = 1.0 - mh * K
        cw = tl.zeros_like(lo)
        ch = tl.zeros_like(lo)
        x0 = lo
        y0 = lo
        x1 = hi
        y1 = hi
        s0 = tl.zeros_like(lo)
        s1 = tl.zeros_like(lo)
        kf = tl.zeros_like(lo).to(tl.int32)
        found = kf
        for i in tl.static_range(1, K):
            cw += mw + aw * (tl.exp(_ld(ub + (i - 1) * sup, mask) - mxw) * isw)
            ch += mh + ah * (tl.exp(_ld(ub + (K + i - 1) * sup, mask) - mxh) * ish)
            xk = lo + width * cw
            yk = lo + width * ch
            if INVERSE:
                c = xs >= yk
            else:
                c = xs >= xk
            ud = _ld(ub + (2 * K + i - 1) * sup, mask) + shift
            x0 = tl.where(c, xk, x0)
            y0 = tl.where(c, yk, y0)
            s0 = tl.where(c, ud, s0)
            kf += c.to(tl.int32)
            first_above = (kf < i) & (found == 0)  # the first knot above xs
            x1 = tl.where(first_above, xk, x1)
            y1 = tl.where(first_above, yk, y1)
            s1 = tl.where(first_above, ud, s1)
            found = found | first_above.to(tl.int32)
        nf = kf >= 1
        nl = kf <= K - 2
        sp0, sl0 = _softplus(s0)
        sp1, sl1 = _softplus(s1)
        d0 = tl.where(nf, md + sp0, 1.0)
        d1 = tl.where(nl, md + sp1, 1.0)
        sg0 = tl.where(nf, sl0, 0.0)  # d slope / d parameter (0 at a boundary)
        sg1 = tl.where(nl, sl1, 0.0)
        return inside, xs, x0, x1, y0, y1, d0, d1, sg0, sg1, kf, mxw, isw, mxh, ish

    @triton.jit
    def _rq_forward(xi, y0, y1, w, h, d0, d1):
        s = h / w
        t = xi * (1 - xi)
        c2 = d1 + d0 - 2 * s
        den = s + c2 * t
        num_y = s * xi * xi + d0 * t
        y = _clamp(y0 + h * num_y / den, y0, y1)  # stay in the bin
        num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi)
        return y, tl.log(s * s * num / (den * den))

    @triton.jit
    def _rq_inverse_xi(ys, y0, h, s, d0, d1):
        """The bin coordinate of the preimage (appendix A, the cancellation-free root)."""
        dy = ys - y0
        c2 = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        root = tl.sqrt(tl.maximum(b * b - 4 * a * c, 0.0))
        pos = b >= 0
        dr = tl.where(pos, -b - root, -1.0)
        dr = tl.where(dr == 0, -1e-30, dr)
        a_safe = tl.where(pos, 1.0, a)
        xi = tl.where(pos, 2 * c / dr, (root - b) / (2 * a_safe))
        return _clamp(xi, 0.0, 1.0)

    @triton.jit
    def _rq_partials(xi, w, h, d0, d1, gy, gl):
        """Gradient of ``gy * y + gl * lad`` w.r.t. (x, x0, x1, y0, y1, d0, d1), the slope
        and dlad/dx (the C kernel's ``rq_partials``)."""
        s = h / w
        omx = 1 - xi
        t = xi * omx
        c2 = d1 + d0 - 2 * s
        den = s + c2 * t
        num_y = s * xi * xi + d0 * t
        num = d1 * xi * xi + 2 * s * t + d0 * omx * omx
        inv_den = 1 / den
        inv_num = 1 / num
        r = num_y * inv_den
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
        inv_w = 1 / w
        g_h = gy * r + g_s * inv_w
        g_w = -(g_s * s + g_xi * xi) * inv_w
        g_x = g_xi * inv_w
        return (g_x, -g_x - g_w, g_w, gy - g_h, g_h, gyh * r_d0 + gl * l_d0,
                gyh * r_d1 + gl * l_d1, h * r_xi * inv_w, l_xi * inv_w)

    @triton.jit
    def _xi_of(inside, xs, x0, x1, y0, y1, d0, d1, INVERSE: tl.constexpr):
        w = x1 - x0
        h = y1 - y0
        if INVERSE:
            xi = _rq_inverse_xi(xs, y0, h, h / w, d0, d1)
        else:
            xi = (xs - x0) / w
        return xi, w, h

    @triton.jit
    def _element(x_ptr, u_ptr, lo_ptr, hi_ptr, c_ptr, N, C, sxr, sxc, sur, suc, sup, slr, slc,
                 shr, shc, K: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr):
        """This program's elements (row ``r``, column ``c``): the input, the box, the
        located bin and the bin coordinate -- what the forward and backward share."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        r = idx // C
        c = idx % C
        # in 64 bits: (3K - 1) * sup may pass 2**31 where sup does not (an int argument
        # below 2**31 arrives as int32, and 1 as a constant)
        sup = r * 0 + sup
        mw = tl.load(c_ptr)
        mh = tl.load(c_ptr + 1)
        md = tl.load(c_ptr + 2)
        shift = tl.load(c_ptr + 3)
        x = _ld(x_ptr + r * sxr + c * sxc, mask)
        lo = _ld(lo_ptr + r * slr + c * slc, mask)
        hi = _ld(hi_ptr + r * shr + c * shc, mask)
        ub = u_ptr + r * sur + c * suc
        inside, xs, x0, x1, y0, y1, d0, d1, sg0, sg1, kf, mxw, isw, mxh, ish = _locate(
            ub, sup, x, lo, hi, mask, mw, mh, md, shift, K, INVERSE)
        xi, w, h = _xi_of(inside, xs, x0, x1, y0, y1, d0, d1, INVERSE)
        return (mask, r, c, x, lo, hi, ub, sup, mw, mh, inside, x0, x1, y0, y1, d0, d1, sg0,
                sg1, kf, mxw, isw, mxh, ish, xi, w, h)

    @triton.jit
    def _forward_kernel(x_ptr, u_ptr, lo_ptr, hi_ptr, c_ptr, y_ptr, lad_ptr, N, C,
                        sxr, sxc, sur, suc, sup, slr, slc, shr, shc, syr, syc, slar, slac,
                        K: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr):
        (mask, r, c, x, lo, hi, ub, sup, mw, mh, inside, x0, x1, y0, y1, d0, d1, sg0, sg1, kf,
         mxw, isw, mxh, ish, xi, w, h) = _element(
            x_ptr, u_ptr, lo_ptr, hi_ptr, c_ptr, N, C, sxr, sxc, sur, suc, sup, slr, slc, shr,
            shc, K, INVERSE, BLOCK)
        yb, lad = _rq_forward(xi, y0, y1, w, h, d0, d1)
        if INVERSE:
            yb = _clamp(x0 + xi * w, x0, x1)
            lad = -lad
        y = tl.where(inside, yb, x)
        lad = tl.where(inside, lad, 0.0)
        tl.store(y_ptr + r * syr + c * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(lad_ptr + r * slar + c * slac, lad.to(lad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, u_ptr, lo_ptr, hi_ptr, c_ptr, gy_ptr, gl_ptr, gx_ptr, gu_ptr,
                         N, C, sxr, sxc, sur, suc, sup, slr, slc, shr, shc, sgyr, sgyc,
                         sglr, sglc, sgxr, sgxc, sgur, sguc, sgup,
                         K: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr):
        (mask, r, c, x, lo, hi, ub, sup, mw, mh, inside, x0, x1, y0, y1, d0, d1, sg0, sg1, kf,
         mxw, isw, mxh, ish, xi, w, h) = _element(
            x_ptr, u_ptr, lo_ptr, hi_ptr, c_ptr, N, C, sxr, sxc, sur, suc, sup, slr, slc, shr,
            shc, K, INVERSE, BLOCK)
        gy_raw = _ld(gy_ptr + r * sgyr + c * sgyc, mask)
        gl_raw = _ld(gl_ptr + r * sglr + c * sglc, mask)
        gy = tl.where(inside, gy_raw, 0.0)
        gl = tl.where(inside, gl_raw, 0.0)
        if INVERSE:
            # implicit function theorem at x = f^-1(y): dx/dy = 1 / f_x,
            # dx/dtheta = -f_theta / f_x, lad_inv = -lad(x)
            _a, _b, _c, _d, _e, _f, _g, slope, lad_x = _rq_partials(xi, w, h, d0, d1,
                                                                     tl.zeros_like(gy),
                                                                     tl.zeros_like(gy))
            g = (gy - gl * lad_x) / slope
            _x, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1, _s, _l = _rq_partials(xi, w, h, d0, d1,
                                                                         -g, -gl)
            g_in = g
        else:
            g_in, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1, _s, _l = _rq_partials(xi, w, h, d0, d1,
                                                                           gy, gl)
        tl.store(gx_ptr + r * sgxr + c * sgxc,
                 tl.where(inside, g_in, gy_raw).to(gx_ptr.dtype.element_ty), mask=mask)
        # knot j (1..K-1) = lo + W sum_{i<j} (m + a p_i): the bin ends kf and kf + 1 give
        # dL/dp_i = a W (g_lo [i < kf] + g_hi [i <= kf] [kf + 1 < K]); then the softmax VJP
        gb = gu_ptr + r * sgur + c * sguc
        sgup = r * 0 + sgup  # 64 bits, as sup
        g_x1 = tl.where(kf <= K - 2, g_x1, 0.0)  # the last knot is fixed
        g_y1 = tl.where(kf <= K - 2, g_y1, 0.0)
        aw = (1.0 - mw * K) * (hi - lo)
        ah = (1.0 - mh * K) * (hi - lo)
        dot_w = tl.zeros_like(lo)
        dot_h = tl.zeros_like(lo)
        for i in tl.static_range(K):
            pw = tl.exp(_ld(ub + i * sup, mask) - mxw) * isw
            ph = tl.exp(_ld(ub + (K + i) * sup, mask) - mxh) * ish
            dot_w += (tl.where(i < kf, g_x0, 0.0) + tl.where(i <= kf, g_x1, 0.0)) * aw * pw
            dot_h += (tl.where(i < kf, g_y0, 0.0) + tl.where(i <= kf, g_y1, 0.0)) * ah * ph
        for i in tl.static_range(K):
            pw = tl.exp(_ld(ub + i * sup, mask) - mxw) * isw
            ph = tl.exp(_ld(ub + (K + i) * sup, mask) - mxh) * ish
            qw = (tl.where(i < kf, g_x0, 0.0) + tl.where(i <= kf, g_x1, 0.0)) * aw * pw
            qh = (tl.where(i < kf, g_y0, 0.0) + tl.where(i <= kf, g_y1, 0.0)) * ah * ph
            tl.store(gb + i * sgup, (qw - pw * dot_w).to(gu_ptr.dtype.element_ty), mask=mask)
            tl.store(gb + (K + i) * sgup, (qh - ph * dot_h).to(gu_ptr.dtype.element_ty),
                     mask=mask)
        g_s0 = g_d0 * sg0  # softplus' = sigmoid (0 for a boundary slope)
        g_s1 = g_d1 * sg1
        for i in tl.static_range(K - 1):
            q = tl.where(kf == i + 1, g_s0, 0.0) + tl.where(kf == i, g_s1, 0.0)
            tl.store(gb + (2 * K + i) * sgup, q.to(gu_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=64)
def _consts(device: torch.device, mw: float, mh: float, md: float) -> Tensor:
    """The floors and the softplus shift as a float64 tensor on ``device`` (kernel
    arguments given as Python floats would be passed in float32). Cached: one host-to-
    device copy per device and setting, not per call."""
    shift = math.log(math.expm1(1.0 - md))
    return torch.tensor([mw, mh, md, shift], dtype=torch.float64, device=device)


def _grid(x2: Tensor, u3: Tensor) -> tuple[int, int, bool]:
    """``(N, C, batch_fast)``: elements, the fast axis' size, and whether the batch axis is
    the fast one (parameters in the batch-minor layout: then adjacent lanes read adjacent
    parameters)."""
    B, n = x2.shape
    batch_fast = u3.stride(0) == 1 and n > 1
    return B * n, (B if batch_fast else n), batch_fast


def _rc(t: Tensor, batch_fast: bool) -> tuple[int, int]:
    """(row, column) element strides of a ``(B, n)`` tensor in the launch's order."""
    return (t.stride(1), t.stride(0)) if batch_fast else (t.stride(0), t.stride(1))


def _box(b: Tensor, batch_fast: bool) -> tuple[int, int]:
    """(row, column) strides of a per-coordinate ``(n,)`` box end."""
    return (b.stride(0), 0) if batch_fast else (0, b.stride(0))


def _forward(x2, u3, low, high, K, mw, mh, md, inverse):
    y = torch.empty_like(x2, memory_format=torch.contiguous_format)
    lad = torch.empty_like(y)
    N, C, bf = _grid(x2, u3)
    if N:
        sur, suc = (u3.stride(1), u3.stride(0)) if bf else (u3.stride(0), u3.stride(1))
        with torch.cuda.device(x2.device) if x2.is_cuda else _nothing():
            _launch(_forward_kernel, (triton.cdiv(N, BLOCK),),
                x2, u3, low, high, _consts(x2.device, mw, mh, md), y, lad, N, C,
                *_rc(x2, bf), sur, suc, u3.stride(2), *_box(low, bf), *_box(high, bf),
                *_rc(y, bf), *_rc(lad, bf), K=K, INVERSE=inverse, BLOCK=BLOCK)
    return y, lad


def _backward(x2, u3, low, high, gy, gl, K, mw, mh, md, inverse):
    gx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    gu = torch.empty_like(u3)  # the strides of u3 (dense): no copy in the layout's backward
    N, C, bf = _grid(x2, u3)
    if N:
        sur, suc = (u3.stride(1), u3.stride(0)) if bf else (u3.stride(0), u3.stride(1))
        sgur, sguc = (gu.stride(1), gu.stride(0)) if bf else (gu.stride(0), gu.stride(1))
        with torch.cuda.device(x2.device) if x2.is_cuda else _nothing():
            _launch(_backward_kernel, (triton.cdiv(N, BLOCK),),
                x2, u3, low, high, _consts(x2.device, mw, mh, md), gy, gl, gx, gu, N, C,
                *_rc(x2, bf), sur, suc, u3.stride(2), *_box(low, bf), *_box(high, bf),
                *_rc(gy, bf), *_rc(gl, bf), *_rc(gx, bf), sgur, sguc, gu.stride(2),
                K=K, INVERSE=inverse, BLOCK=BLOCK)
    return gx, gu


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _TritonRQ(torch.autograd.Function):
    """``(x (B, n), u (B, n, 3K - 1)) -> (y, ladj)`` by the Triton kernels; saves ``x``
    and ``u`` and recomputes the rest in the backward."""

    @staticmethod
    def forward(ctx, x2, u3, low, high, K, mw, mh, md, inverse):
        ctx.save_for_backward(x2, u3, low, high)
        ctx.consts = (K, mw, mh, md, inverse)
        return _forward(x2, u3, low, high, K, mw, mh, md, inverse)

    @staticmethod
    def backward(ctx, gy, gl):
        x2, u3, low, high = ctx.saved_tensors
        K, mw, mh, md, inverse = ctx.consts
        if not reference_backward(gy, gl):
            try:
                gx, gu = _backward(x2, u3, low, high, gy, gl, K, mw, mh, md, inverse)
                return gx, gu, None, None, None, None, None, None, None
            except KernelUnavailable:
                pass  # warned once: differentiate the reference instead
        # create_graph=True, batched VJPs, or the backward kernel failed
        from .fused_spline import _reference

        return tuple(reference_grads(
            lambda x, u: _reference(x, u, low, high, K, mw, mh, md, inverse),
            (x2, u3), (gy, gl))) + (None,) * 7


def rq_spline(x: Tensor, params: Tensor, low: Tensor, high: Tensor, bins: int,
              min_bin_width: float, min_bin_height: float, min_derivative: float,
              inverse: bool) -> tuple[Tensor, Tensor]:
    """RQ spline with linear tails by the Triton kernels (see the module docstring).

    Arguments:
        x: ``(..., n)`` float32 or float64 inputs (outputs when ``inverse``), on a CUDA
            device (or the CPU under ``TRITON_INTERPRET=1``).
        params: ``(..., n, 3K - 1)`` unconstrained parameters, same dtype and device; any
            strides (the batch-minor layout of a conditioner's transposed output is read
            in place, with coalesced loads).
        low, high: ``(n,)`` the spline box per coordinate.
        bins, min_bin_width, min_bin_height, min_derivative, inverse: as
            :func:`~normflux.transforms.fused_spline.fused_rq_spline`, which checks them.

    Returns:
        ``(y, ladj)`` of the shape of ``x``, differentiable w.r.t. ``x`` and ``params``
        (first order by the kernel; ``create_graph`` and batched VJPs by the reference).

    Raises:
        RuntimeError: Triton is not importable (check :func:`available` first).
        KernelUnavailable: Triton failed to compile or launch the forward kernel (warned
            once; :func:`available` is false from then on).
    """
    if triton is None:
        raise RuntimeError("the Triton spline kernels need Triton, which does not import here")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    u3 = params.reshape(-1, n, params.shape[-1])
    y, lad = _TritonRQ.apply(x2, u3, low, high, bins, min_bin_width, min_bin_height,
                             min_derivative, inverse)
    return y.view(x.shape), lad.view(x.shape)
