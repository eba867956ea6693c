"""Shared plumbing of the fused autograd Functions (first-order closed-form backwards).

A fused Function (the spline of :mod:`~normflux.transforms.fused_spline`, the bounded
affine map of :mod:`~normflux.transforms.bijections`) computes its forward with plain
tensor ops and writes its first-order backward by hand, saving fewer tensors and running
fewer ops than autograd's generic one. Everything else is delegated to a *reference*
function, the same map written with differentiable ops:

* under ``torch.func`` transforms (``vmap``, ``jacrev``, ``hessian``) and forward-mode
  AD the reference is called instead of the Function (:func:`use_reference`), so every
  derivative order stays exact. ``torch.compile`` traces the Function, forward and
  closed-form backward, into its graph when the pass is differentiated (faster than
  compiling the reference, whose backward autograd derives: B1 of the speed suite), and
  the reference otherwise;
* a backward that must itself be differentiable (``create_graph=True``), or that runs
  under a ``torch.func`` transform (batched VJPs), differentiates the reference
  (:func:`reference_backward`, :func:`reference_grads`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .._tracing import is_compiling


def use_reference(compiled_ok: bool = False) -> bool:
    """Whether fused Functions must step aside: a ``torch.func`` transform is active, a
    forward-mode AD level is open (the Functions have no ``jvp``), or ``torch.compile``
    traces a pass without gradients (inductor fuses the reference's plain forward better
    than a Function of tensor ops; measured on B1 of the speed suite) and the fused
    implementation is not one that compiles as is (``compiled_ok``)."""
    if _functorch_active():
        return True
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    return not compiled_ok and is_compiling() and not torch.is_grad_enabled()


def reference_backward(*grads: Tensor) -> bool:
    """Whether a fused Function's backward (given its output gradients) must
    differentiate the reference instead: it is itself differentiated
    (``create_graph=True``), or it runs batched (``torch.func`` transforms, and
    ``torch.autograd.grad(..., is_grads_batched=True)``, whose gradients are batched
    tensors without storage)."""
    if torch.is_grad_enabled() or _functorch_active():
        return True
    if is_compiling():  # a traced backward never sees batched gradients (nor can dynamo
        return False    # trace the check)
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return legacy is not None and any(legacy(g) for g in grads if g is not None)


def _functorch_active() -> bool:
    fn = getattr(torch._C, "_are_functorch_transforms_active", None)
    return fn is not None and fn()


def reference_grads(reference: Callable[..., Sequence[Tensor]], inputs: Sequence,
                    grads: Sequence[Tensor]) -> list[Tensor | None]:
    """Vector-Jacobian product of ``reference(*inputs)`` with ``grads``, itself
    differentiable (for a backward called with ``create_graph=True``).

    Returns:
        one gradient per entry of ``inputs``: ``None`` for non-tensors and tensors that
        do not require grad.
    """
    wrt = [i for i, v in enumerate(inputs) if isinstance(v, Tensor) and v.requires_grad]
    out: list[Tensor | None] = [None] * len(inputs)
    if not wrt:
        return out
    with torch.enable_grad():
        # outputs that do not depend on the inputs being differentiated carry no gradient
        pairs = [(o, g) for o, g in zip(reference(*inputs), grads)
                 if o.requires_grad and g is not None]
        if not pairs:
            return out
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
    for i, g in zip(wrt, got):
        out[i] = g
    return out
