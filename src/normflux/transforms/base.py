"""The transform contract: ``Transform``, ``Chain`` and ``Inverse``.

A transform maps data ``x`` to a base sample ``z`` in its *forward* (normalizing)
direction, as in nflows, zuko and the review of Papamakarios et al. (2021, JMLR 22(57),
section 2.1)::

    z, ladj = transform(x, context=None)          # ladj = log|det dz/dx|, shape (batch,)
    x, ladj = transform.inverse(z, context=None)  # ladj = log|det dx/dz|, shape (batch,)
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .._checks import first_float_parameter
from .._tracing import is_compiling

__all__ = ["Transform", "Chain", "Inverse", "check_context", "is_compiling"]


def check_context(context: Tensor | None, context_features: int | None, batch: int | None,
                  owner: str = "transform", dtype: torch.dtype | None = None) -> None:
    """Validate a ``context`` argument against what a conditional module expects.

    Arguments:
        context: ``None`` or a tensor of shape ``(batch, context_features)``; a leading
            dimension of 1 broadcasts over the batch.
        context_features: the number of context features expected, or ``None`` for an
            unconditional module (which then refuses any context).
        batch: the batch size of the input, or ``None`` to skip the batch check.
        owner: a name for the error messages.
        dtype: the dtype the context must have (the module's), or ``None``.

    Raises:
        ValueError: context given to an unconditional module, missing context for a
            conditional one, a context that is not 2-D or has the wrong number of
            features, a batch mismatch, a non-floating context or one of another dtype
            than ``dtype``. Shapes and dtypes only are checked, so this is free under
            ``torch.compile``.
        TypeError: a context that is not a :class:`torch.Tensor`.
    """
    if context_features is None:
        if context is not None:
            raise ValueError(
                f"{owner} is unconditional but a context of shape {tuple(context.shape)} was "
                "passed; build it with context_features=... to condition on it")
        return
    if context is None:
        raise ValueError(f"{owner} is conditional and expects a context with "
                         f"{context_features} features, got context=None")
    if not isinstance(context, Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if not context.is_floating_point():
        raise ValueError(f"context must be a floating-point tensor, got dtype {context.dtype}")
    if context.dim() != 2:
        raise ValueError(f"{owner} expects a context of shape (batch, {context_features}), "
                         f"got a {context.dim()}-D context of shape {tuple(context.shape)}"
                         + (f"; for one row use context.reshape(1, {context_features})"
                            if context.dim() == 1 and context.numel() == context_features
                            else ""))
    if context.shape[-1] != context_features:
        raise ValueError(f"{owner} expects a context of shape (batch, {context_features}), "
                         f"got context of shape {tuple(context.shape)} "
                         f"({context.shape[-1]} features, expected {context_features})")
    if dtype is not None and context.dtype != dtype:
        raise ValueError(f"{owner} is {dtype} but the context is {context.dtype}; convert one "
                         f"of them (context.to({dtype}) or the module's .to({context.dtype}))")
    if batch is not None and context.shape[0] not in (1, batch):
        raise ValueError(f"context has batch size {context.shape[0]} but the input has batch "
                         f"size {batch}; they must match (or the context batch must be 1)")


class Transform(nn.Module):
    """Base class of every invertible transform.

    Subclasses implement :meth:`forward` (data -> base, the normalizing direction) and
    :meth:`inverse` (base -> data). Both take ``x`` of shape ``(batch, *event_shape)`` and
    an optional ``context`` of shape ``(batch, context_features)`` and return the output
    with the input's shape and ``ladj`` of shape ``(batch,)``, the log-absolute-determinant
    of the Jacobian of *that* direction, in the input's dtype and device. They must satisfy
    ``forward(inverse(z)) == z`` on the support (1e-5 float32, 1e-10 float64).

    Class attributes a subclass may set:
        context_features: number of context features, ``None`` when unconditional.
        exact_inverse: ``False`` when :meth:`inverse` is iterative (documented tolerance).
        volume_preserving: ``True`` when ``ladj`` is zero for every input, both ways (a
            :class:`Chain` then skips adding it; :func:`~normflux.testing.check_transform`
            checks that it is zero).

    References:
        Papamakarios et al., "Normalizing flows for probabilistic modeling and inference",
        JMLR 22(57), 2021, eq. (2)-(5).
    """

    context_features: int | None = None
    exact_inverse: bool = True
    volume_preserving: bool = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        """Check the input's shape and ``context`` (shape checks only: free under compile).

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(batch, D)`` (or ``(batch, C, H, W)``) with ``D``
                the layer's ``features`` where it has one; ``x`` is not floating-point or
                not of the dtype of the layer's parameters; a bad context (including one
                of another dtype).
        """
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor input, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name} expects an input of shape (batch, ...), got {tuple(x.shape)}")
        features = getattr(self, "features", None)
        if isinstance(features, int) and x.shape[1] != features:
            raise ValueError(f"{name} expects {features} features in dimension 1, got input of "
                             f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")
        dtype = self._parameter_dtype()
        if dtype is not None and x.dtype != dtype:
            raise ValueError(f"{name} has {dtype} parameters but the input is {x.dtype}; "
                             f"convert one of them (x.to({dtype}) or the layer's "
                             f".to({x.dtype}))")
        check_context(context, self.context_features, x.shape[0], name, dtype)

    def _parameter_dtype(self) -> torch.dtype | None:
        """The dtype of the layer's first floating-point parameter (``None`` without one;
        see :func:`~normflux._checks.first_float_parameter`)."""
        p = first_float_parameter(self)
        return None if p is None else p.dtype


class Chain(Transform):
    """Composition of transforms, applied in order in the forward direction.

    ``Chain([t1, t2, t3])(x)`` computes ``t3(t2(t1(x)))`` and sums the ``ladj``;
    :meth:`inverse` applies the inverses in reverse order. ``context`` is passed to every
    member. A chain is conditional when any member is; each member checks the context.

    Arguments:
        transforms: an iterable of :class:`Transform`.

    Shapes:
        ``x``: ``(batch, *event_shape)`` (as the members expect); ``context``:
        ``(batch, C)``; ``ladj``: ``(batch,)``, the sum of the members' ``ladj``.

    Raises:
        TypeError: a member is not a :class:`Transform`.
        ValueError: members expect different context widths; at call time, a context
            the chain does not expect (or none where it does).
    """

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        transforms = list(transforms)
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Chain members must be Transforms, got {type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)
        feats = {t.context_features for t in transforms if t.context_features is not None}
        if len(feats) > 1:
            raise ValueError(f"Chain members expect different context sizes {sorted(feats)}")
        self.context_features = feats.pop() if feats else None
        self.exact_inverse = all(t.exact_inverse for t in transforms)

    @property
    def volume_preserving(self) -> bool:
        """Whether every member is volume preserving (looked up at each call: members may
        be added or replaced after construction)."""
        return all(t.volume_preserving for t in self.transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        return self._compose(x, context, self.transforms, "forward")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        return self._compose(z, context, reversed(self.transforms), "inverse")

    @staticmethod
    def _compose(x: Tensor, context: Tensor | None, transforms, direction: str
                 ) -> tuple[Tensor, Tensor]:
        """The members' ``direction`` in the order of ``transforms``, their ``ladj`` summed;
        the zero ``ladj`` of volume-preserving members is not added (an add and its backward
        node each, per member and step)."""
        ladj = None
        for t in transforms:
            step = t if direction == "forward" else t.inverse  # the call runs the hooks
            x, l = step(x, context if t.context_features is not None else None)
            if not t.volume_preserving:
                ladj = l if ladj is None else ladj + l
        return x, x.new_zeros(x.shape[0]) if ladj is None else ladj

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]


class Inverse(Transform):
    """The inverse of a transform: swaps :meth:`forward` and :meth:`inverse`.

    An inverse autoregressive flow is ``Inverse(MaskedAutoregressive(...))``: its
    density evaluation is sequential and its sampling is one pass.
    ``Inverse(Inverse(t))`` returns a module equivalent to ``t``.

    Arguments:
        transform: the :class:`Transform` to invert.

    Shapes:
        as those of ``transform``: ``x``: ``(batch, *event_shape)``; ``context``:
        ``(batch, C)``; ``ladj``: ``(batch,)``. ``Inverse(t)(x)`` is ``t.inverse(x)``
        and ``Inverse(t).inverse(z)`` is ``t(z)``, ``ladj`` included.

    Raises:
        TypeError: ``transform`` is not a :class:`Transform`.
    """

    def __init__(self, transform: Transform):
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"Inverse expects a Transform, got {type(transform).__name__}")
        self.transform = transform
        self.context_features = transform.context_features
        self.exact_inverse = transform.exact_inverse

    @property
    def volume_preserving(self) -> bool:
        """The wrapped transform's (looked up at each call)."""
        return self.transform.volume_preserving

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, context)
