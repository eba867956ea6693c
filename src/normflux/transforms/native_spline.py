"""The RQ spline's forward and backward as a C kernel for CPU tensors, built at first use.

``rq_kernel.c`` (shipped beside this module) computes what
:func:`~normflux.transforms.fused_spline.fused_rq_spline` computes -- knots from the
unconstrained parameters, the located bin, the map or its inverse and the log-slope, and
the closed-form VJP -- in one pass per element, in double precision whatever the
storage type (one rounding on store), reading every tensor through its strides. It
replaces some 150 tensor ops per layer and pass, which is what a spline layer costs on
a CPU at small and moderate batch sizes.

The kernel is built at first use (:mod:`~normflux.transforms.native`). It is optional:
without a compiler, with ``NORMFLUX_NATIVE=0``, on other devices, or when the build
fails, :func:`available` is false and the splines run on tensor ops.
"""

from __future__ import annotations

import array
import hashlib
from pathlib import Path

import torch
from torch import Tensor

from .._tracing import constant_when_traced, is_compiling
from . import native
from ._first_order import reference_backward, reference_grads

__all__ = ["available", "rq_spline", "traceable"]

_SOURCE = Path(__file__).with_name("rq_kernel.c")


@constant_when_traced  # traced by torch.compile as its value (it may build)
def available() -> bool:
    """Whether the C kernels are built and loaded (:func:`normflux.transforms.native.available`)."""
    return native.available()


# ``_call`` passes ``io_t`` of ``rq_kernel.c`` as an array of int64 (its fields are all
# 64 bits wide on LP64: pointers and element strides), in the struct's field order.


def _call(fn, x: Tensor, u: Tensor, low: Tensor, high: Tensor, consts: tuple, *, y=None,
          lad=None, gy=None, gl=None, gx=None, gu=None, sv=None) -> None:
    """Run ``fn`` (``nfx_rq_forward`` / ``nfx_rq_backward``) on ``x (C, R)``, ``u (C, R, P)``
    and ``low``/``high (R,)``: the kernel's grid has the coordinates as rows and the batch
    as columns. ``y``, ``lad``, ``gy``, ``gl``, ``gx`` are ``(C, R)``, ``gu`` ``(C, R, P)``
    and ``sv`` (the saved tensor) ``(rows, R, C)``; those not given are null."""
    K, mw, mh, md, inverse = consts
    xs, us = x.stride(), u.stride()
    io = [x.shape[1], x.shape[0], x.data_ptr(), xs[1], xs[0], u.data_ptr(), us[2], us[1], us[0],
          low.data_ptr(), high.data_ptr(), low.stride(0), high.stride(0)]
    if gy is None:
        io += (0, 0, 0, 0, 0, 0)
    else:
        gs, ls = gy.stride(), gl.stride()
        io += (gy.data_ptr(), gl.data_ptr(), gs[1], gs[0], ls[1], ls[0])
    if y is None:
        io += (0, 0, 0, 0)
    else:
        ys = y.stride()  # lad: the same layout
        io += (y.data_ptr(), lad.data_ptr(), ys[1], ys[0])
    if gx is None:
        io += (0, 0, 0, 0, 0, 0, 0)
    else:
        gxs, gus = gx.stride(), gu.stride()
        io += (gx.data_ptr(), gxs[1], gxs[0], gu.data_ptr(), gus[2], gus[1], gus[0])
    io += (0, 0, 0, 0) if sv is None else (sv.data_ptr(),) + sv.stride()
    buf = array.array("q", io)
    if fn(int(x.dtype == torch.float64), K, mw, mh, md, int(inverse), buf.buffer_info()[0]) != 0:
        raise MemoryError("normflux spline kernel: out of memory for its scratch tiles")


# rows of the float64 tensor the forward saves for the backward (``SAVED_ROWS`` in
# ``rq_kernel.c``): eight per-element quantities of the located bin
_SAVED_ROWS = 8


def _forward(x: Tensor, params: Tensor, low: Tensor, high: Tensor, consts: tuple,
             save: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    lad = torch.empty_like(y)
    sv = x.new_empty((_SAVED_ROWS, x.shape[1], x.shape[0]), dtype=torch.float64) if save else None
    _call(native.library().nfx_rq_forward, x, params, low, high, consts, y=y, lad=lad, sv=sv)
    return y, lad, sv


def _backward(x: Tensor, params: Tensor, low: Tensor, high: Tensor, sv: Tensor, gy: Tensor,
              gl: Tensor, consts: tuple) -> tuple[Tensor, Tensor]:
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # the strides of params (a dense permutation: a conditioner's transposed output), so
    # that the conditioner's backward reads its gradient without a copy
    gu = torch.empty_like(params)
    _call(native.library().nfx_rq_backward, x, params, low, high, consts, gy=gy, gl=gl, gx=gx, gu=gu, sv=sv)
    return gx, gu


def _reference_vjp(x, params, low, high, gy, gl, consts):
    """Differentiable VJP (a backward with ``create_graph=True``): the reference's."""
    from .fused_spline import _reference
    K, mw, mh, md, inverse = consts
    return tuple(reference_grads(lambda x, p: _reference(x, p, low, high, K, mw, mh, md, inverse),
                                 (x, params), (gy, gl)))


def _vjp(x, params, low, high, sv, gy, gl, consts, backward=None):
    # the reference also where the forward saved nothing (a compiled pass traced without
    # gradients, then differentiated anyway): the kernel needs the saved values
    if (reference_backward(gy, gl) or sv is None
            or sv.shape != (_SAVED_ROWS, x.shape[1], x.shape[0])):
        return _reference_vjp(x, params, low, high, gy, gl, consts)
    return (backward or _backward)(x, params, low, high, sv, gy, gl, consts)


class _NativeRQ(torch.autograd.Function):
    """``(x (B, n), params (B, n, P)) -> (y, ladj)`` through the C kernel; any strides."""

    @staticmethod
    def forward(ctx, x, params, low, high, bins, mw, mh, md, inverse):
        ctx.consts = (bins, mw, mh, md, inverse)
        y, lad, sv = _forward(x, params, low, high, ctx.consts, any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(x, params, low, high, sv)
        return y, lad

    @staticmethod
    def backward(ctx, gy, gl):
        return _vjp(*ctx.saved_tensors, gy, gl, ctx.consts) + (None,) * 7


# The same kernel as operators that torch.compile keeps in its graph (the autograd Function
# above has less overhead in eager mode); torch >= 2.4. Their names carry a hash of the
# kernel's source: inductor's on-disk caches key compiled graphs by operator name, so a
# changed kernel (another saved layout, say) must not meet graphs compiled for the old one.
_VERSION = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:10]
OP_NAME = f"normflux::rq_spline_{_VERSION}"
_op = None
if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op(OP_NAME, mutates_args=())
    def _op(x: Tensor, params: Tensor, low: Tensor, high: Tensor, bins: int, mw: float,
            mh: float, md: float, inverse: bool, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        y, lad, sv = _forward(x, params, low, high, (bins, mw, mh, md, inverse), save)
        return y, lad, sv if save else x.new_empty(0, dtype=torch.float64)

    @_op.register_fake
    def _(x, params, low, high, bins, mw, mh, md, inverse, save):
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        shape = (_SAVED_ROWS, x.shape[1], x.shape[0]) if save else (0,)
        return y, torch.empty_like(y), x.new_empty(shape, dtype=torch.float64)

    @torch.library.custom_op(f"normflux::rq_spline_backward_{_VERSION}", mutates_args=())
    def _op_backward(x: Tensor, params: Tensor, low: Tensor, high: Tensor, sv: Tensor,
                     gy: Tensor, gl: Tensor, bins: int, mw: float, mh: float, md: float,
                     inverse: bool) -> tuple[Tensor, Tensor]:
        return _backward(x, params, low, high, sv, gy, gl, (bins, mw, mh, md, inverse))

    @_op_backward.register_fake
    def _(x, params, low, high, sv, gy, gl, bins, mw, mh, md, inverse):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(params)

    def _op_setup(ctx, inputs, output):
        x, params, low, high, *consts, _ = inputs
        ctx.consts = tuple(consts)
        ctx.save_for_backward(x, params, low, high, output[2])

    def _op_vjp(ctx, gy, gl, _):
        return _vjp(*ctx.saved_tensors, gy, gl, ctx.consts,
                    lambda *a: _op_backward(*a[:-1], *a[-1])) + (None,) * 8

    _op.register_autograd(_op_vjp, setup_context=_op_setup)


def traceable() -> bool:
    """Whether ``torch.compile`` can keep the kernel in its graph (as a custom operator)."""
    return _op is not None


def rq_spline(x: Tensor, params: Tensor, low: Tensor, high: Tensor, bins: int, mw: float,
              mh: float, md: float, inverse: bool) -> tuple[Tensor, Tensor]:
    """The fused spline of :func:`~normflux.transforms.fused_spline.fused_rq_spline`
    through the C kernel (call only when :func:`available`).

    Arguments:
        x: ``(..., n)`` float32 or float64 CPU tensor; params: ``(..., n, 3 bins - 1)`` of
            the same dtype, any strides; low, high: ``(n,)`` the box, no gradient.

    Returns:
        ``(y, ladj)`` of the shape of ``x``.

    Raises:
        MemoryError: the kernel could not allocate its scratch tiles.
    """
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    p3 = params.reshape(-1, n, params.shape[-1])
    if is_compiling():
        # the saved tensor only where a backward can follow (compiled sampling skips it)
        save = torch.is_grad_enabled() and (x2.requires_grad or p3.requires_grad)
        y, lad, _ = _op(x2, p3, low, high, bins, mw, mh, md, inverse, save)
    else:
        y, lad = _NativeRQ.apply(x2, p3, low, high, bins, mw, mh, md, inverse)
    return y.view(x.shape), lad.view(x.shape)
