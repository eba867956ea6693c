"""A MADE's masked layers through the C kernel ``masked_kernel.c``, for float32 CPU tensors.

The layers ``h <- relu(h (W * M)^T + b)`` and the output layer of
:class:`~normflux.nets.MADE`, forward and backward, one C call per layer and pass (built
at first use with the other kernels, :mod:`~normflux.transforms.native`). The kernel
skips the products that the masks zero -- a MADE's masks, with its hidden units in order
of degree, are staircases about half zeros -- and applies the bias, the ReLU, the ReLU's
backward and the weight mask while each block of the result is in registers. It needs
AVX-512 (:func:`usable` is false without it, and the MADE runs on torch's GEMMs). It runs
on one thread, so it is used only when PyTorch's intra-op parallelism is one thread
(``torch.set_num_threads(1)``, as in the speed suite and in data-parallel training with
one process per core); with more threads PyTorch's threaded GEMMs run instead.

The products are the BLAS's own (one fused multiply-add per term, in order of the
summed index), so results match ``torch.mm`` to the rounding of the summation order;
the bias gradient is summed in double. Weights that the mask excludes never enter a
product: an inf or NaN there stays out of the output, where ``W * M`` would spread NaN.
Products of an input with a zero of the mask are skipped where a whole panel's range
allows, so an inf or NaN input may or may not reach outputs that do not depend on it
(:class:`~normflux.Flow` rejects such inputs at its entry).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tracing import is_compiling
from ..transforms import native

__all__ = ["usable", "forward", "backward"]

_MIN_ROWS = 16  # below this many rows, the packing of the weights costs more than it saves


_KERNEL: list[bool] = []  # whether the library has the masked kernel, once it is loaded


def _kernel() -> bool:
    if not _KERNEL:
        if not native.available():
            return False
        _KERNEL.append(bool(native.library().nfx_masked_available()))
    return _KERNEL[0]


def usable(x: Tensor, extra: Tensor | None,
           layers: list[tuple[Tensor, Tensor, Tensor]]) -> bool:
    """Whether the kernel takes ``x`` ``(batch, in)``, ``extra`` (or ``None``) and
    ``layers`` ``[(weight (N, K), bias (N,), mask (N, K)), ...]``: float32 CPU tensors,
    masks of their weight's shape (a bool or broadcast mask takes torch's ops), a batch
    of at least 16 rows, one intra-op thread, not traced by ``torch.compile``, and the
    kernel built with AVX-512."""
    f32 = torch.float32
    if not (x.is_cpu and x.dtype is f32 and x.dim() == 2 and x.shape[0] >= _MIN_ROWS
            and torch.get_num_threads() == 1 and not is_compiling()
            and (extra is None or (extra.dtype is f32 and extra.is_cpu))):
        return False
    for w, b, m in layers:
        if not (w.dtype is f32 and b.dtype is f32 and m.dtype is f32 and w.is_cpu
                and b.is_cpu and m.is_cpu and m.shape == w.shape and w.dim() == 2
                and b.shape == w.shape[:1]):
            return False
    return _kernel()


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("normflux: the masked-layer kernel could not allocate its "
                          "packed weights")


def forward(x: Tensor, layers: list[tuple[Tensor, Tensor, Tensor]], extra: Tensor | None
            ) -> tuple[Tensor, list[Tensor]]:
    """``(out (batch, N_L), hs)``: the network on ``x (batch, in)``, ``layers`` ``[(weight
    (N, K), bias (N,), mask (N, K)), ...]``, a ReLU after every layer but the last, and
    ``extra`` (``(batch, N_1)`` or ``(1, N_1)``, or ``None``) added before the first ReLU.
    ``hs`` are the inputs of the layers (``x`` first), which :func:`backward` reads.
    Call only when :func:`usable`.

    Raises:
        MemoryError: the kernel cannot allocate its packed weights."""
    lib = native.library()
    h = x.contiguous()
    M = h.shape[0]
    hs = [h]
    if extra is not None:
        extra = extra if extra.stride(-1) == 1 else extra.contiguous()
    for j, (w, b, m) in enumerate(layers):
        w, b, m = w.contiguous(), b.contiguous(), m.contiguous()
        N, K = w.shape
        out = x.new_empty(M, N)
        e = extra if j == 0 else None
        _checked(lib.nfx_masked_forward(
            M, K, N, h.data_ptr(), w.data_ptr(), m.data_ptr(), b.data_ptr(),
            None if e is None else e.data_ptr(),
            0 if e is None or e.shape[0] == 1 else e.stride(0),
            int(j < len(layers) - 1), out.data_ptr()))
        h = out
        if j < len(layers) - 1:
            hs.append(out)
    return h, hs


def backward(g: Tensor, hs: list[Tensor], layers: list[tuple[Tensor, Tensor, Tensor]],
             input_grad: bool, extra_grad: bool
             ) -> tuple[Tensor | None, Tensor | None, list[Tensor]]:
    """``(g_x or None, g_extra or None, [g_weight_1, g_bias_1, ...])``: the backward of
    :func:`forward` for the gradient ``g (batch, N_L)`` of its output; the weight gradients
    are masked. ``g_x`` only when ``input_grad``, ``g_extra`` (``(batch, N_1)``) only when
    ``extra_grad``.

    Raises:
        MemoryError: the kernel cannot allocate its packed weights."""
    lib = native.library()
    g = g.contiguous()
    M = g.shape[0]
    grads: list[Tensor] = []
    g_x = g_extra = None
    for j in range(len(layers) - 1, -1, -1):
        w, b, m = (t.contiguous() for t in layers[j])
        N, K = w.shape
        g_w, g_b = torch.empty_like(w), torch.empty_like(b)
        _checked(lib.nfx_masked_grad_weight(M, K, N, g.data_ptr(), hs[j].data_ptr(),
                                            m.data_ptr(), g_w.data_ptr(), g_b.data_ptr()))
        grads[:0] = [g_w, g_b]
        if j == 0:
            if extra_grad:
                g_extra = g
            if not input_grad:
                break
        g_in = g.new_empty(M, K)
        _checked(lib.nfx_masked_grad_input(
            M, K, N, g.data_ptr(), w.data_ptr(), m.data_ptr(),
            hs[j].data_ptr() if j else None, g_in.data_ptr()))
        if j == 0:
            g_x = g_in
        g = g_in
    return g_x, g_extra, grads
