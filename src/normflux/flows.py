"""The flow model: a transform and a base distribution."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from ._checks import all_finite, context_width, first_float_parameter, integer
from .distributions.base import BaseDistribution
from .transforms.base import Transform, is_compiling

__all__ = ["Flow", "FlowDistribution"]


class Flow(nn.Module):
    """A normalizing flow ``x = T^{-1}(z), z ~ base``, with density by change of variables.

    ``log p(x | c) = log p_base(T(x; c) | c) + log|det dT/dx|`` (Papamakarios et al. 2021,
    eq. 2), where ``T = transform`` maps data to base (the forward direction).

    Shapes: ``x`` is ``(*batch, *event_shape)``; ``context`` is ``(*batch, C)``, or a
    single ``(C,)`` / ``(1, C)`` row that broadcasts over the batch. Leading batch
    dimensions are flattened for the transform and restored on the way out.

    Arguments:
        transform: a :class:`~normflux.transforms.Transform` (data -> base).
        base: a :class:`~normflux.distributions.BaseDistribution`.
        context_features: ``C`` for a conditional flow; default: the transform's or the
            base's ``context_features``.

    Raises (from every method):
        ValueError: ``x`` with the wrong event shape, dtype, device or NaN; a context of
            the wrong shape, dtype or device, with NaN, one passed to an unconditional
            flow, or none for a conditional one — each message names what was expected
            and what was received. These checks run before any computation (the NaN checks are
            skipped inside ``torch.compile``). At construction: ``transform``, ``base``
            and ``context_features`` that disagree on the context width, or a
            ``context_features`` that is not an integer >= 1.
        TypeError: ``x`` or ``context`` is not a :class:`torch.Tensor`. At construction:
            ``transform`` is not a :class:`~normflux.transforms.Transform` or ``base`` not
            a :class:`~normflux.distributions.BaseDistribution`.
    """

    def __init__(self, transform: Transform, base: BaseDistribution,
                 context_features: int | None = None):
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError("transform must be a normflux Transform (e.g. a Chain of layers), "
                            f"got {type(transform).__name__}")
        if not isinstance(base, BaseDistribution):
            raise TypeError("base must be a normflux BaseDistribution (e.g. DiagGaussian), "
                            f"got {type(base).__name__}")
        context_features = context_width(context_features)
        self.transform = transform
        self.base = base
        feats = {m.context_features for m in (transform, base) if m.context_features is not None}
        if context_features is not None:
            feats.add(context_features)
        if len(feats) > 1:
            raise ValueError(f"transform and base expect different context sizes {sorted(feats)}")
        self.context_features = feats.pop() if feats else None
        self.event_shape = tuple(base.event_shape)

    # ------------------------------------------------------------------ validation
    def _dtype(self) -> torch.dtype:
        """The flow's dtype: its first floating-point parameter's (see
        :func:`~normflux._checks.first_float_parameter`), else its first floating buffer's,
        else torch's default."""
        p = first_float_parameter(self)
        if p is not None:
            return p.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def _check_device(self, t: Tensor, what: str) -> None:
        """``t`` (``x`` or the context) on the device of the flow's parameters (of its first
        buffer without any; anywhere without either)."""
        p = first_float_parameter(self)
        if p is None:
            p = next(self.buffers(), None)
        if p is not None and t.device != p.device:
            raise ValueError(f"{what} is on {t.device} but the flow is on {p.device}; move "
                             f"one of them ({what}.to('{p.device}') or flow.to('{t.device}'))")

    def _prepare_x(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        ev = self.event_shape
        if x.dim() < len(ev) or tuple(x.shape[x.dim() - len(ev):]) != ev:
            raise ValueError(f"x must have shape (*batch, {', '.join(map(str, ev))}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dtype != self._dtype():
            raise ValueError(f"x has dtype {x.dtype} but the flow is {self._dtype()}; "
                             f"convert one of them (x.to({self._dtype()}) or flow.to({x.dtype}))")
        self._check_device(x, "x")
        if not is_compiling() and not all_finite(x):
            bad = ~torch.isfinite(x.reshape(-1, math.prod(ev)))
            rows = bad.any(-1).nonzero().flatten()
            what = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise ValueError(f"x contains {what} (non-finite values in rows {rows[:5].tolist()}"
                             f"{' ...' if len(rows) > 5 else ''})")
        batch = tuple(x.shape[:x.dim() - len(ev)])
        return x.reshape(-1, *ev), batch

    def _prepare_context(self, context: Tensor | None, batch: tuple[int, ...]) -> Tensor | None:
        C = self.context_features
        if context is not None and not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor or None, got {type(context).__name__}")
        if C is None:
            if context is not None:
                raise ValueError("this flow is unconditional but a context of shape "
                                 f"{tuple(context.shape)} was passed")
            return None
        if context is None:
            raise ValueError(f"this flow is conditional: pass a context with {C} features "
                             "(context=None was given)")
        if not context.is_floating_point():
            raise ValueError(f"context must be floating point, got dtype {context.dtype}")
        if context.dim() == 1 and context.shape[0] != C:
            raise ValueError(f"context must have {C} features, got a 1-D context of shape "
                             f"{tuple(context.shape)}, which is read as a single row of "
                             f"{context.shape[0]} features; a batch of contexts is 2-D "
                             f"(batch, {C})" + (": use context.reshape(-1, 1)" if C == 1 else ""))
        if context.dim() == 0 or context.shape[-1] != C:
            raise ValueError(f"context must have {C} features in its last dimension, got "
                             f"context of shape {tuple(context.shape)} "
                             f"({context.shape[-1] if context.dim() else 0} features, expected {C})")
        if context.dtype != self._dtype():
            raise ValueError(f"context has dtype {context.dtype} but the flow is {self._dtype()}")
        self._check_device(context, "context")
        cb = tuple(context.shape[:-1])
        try:
            shape = torch.broadcast_shapes(cb, batch)
        except RuntimeError:
            shape = None
        if shape != batch:
            raise ValueError(f"context batch shape {cb} does not match the input batch shape "
                             f"{batch}: they must be equal, or the context must have size 1 "
                             "where they differ")
        if not is_compiling() and not all_finite(context):
            what = "NaN" if bool(torch.isnan(context).any()) else "Inf"
            raise ValueError(f"context contains {what}")
        return context.expand(*batch, C).reshape(-1, C)

    def _base_context(self, context: Tensor | None) -> Tensor | None:
        """The context for the base: ``None`` when the base is unconditional."""
        return context if self.base.context_features is not None else None

    # ------------------------------------------------------------------ density
    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density ``log p(x | context)`` in nats.

        Arguments:
            x: ``(*batch, *event_shape)``.
            context: ``(*batch, C)``, or any shape that broadcasts with ``x``'s batch
                shape under torch's rules (``(C,)``, ``(1, C)``, or ``(M, C)`` for a
                single event ``x`` of shape ``event_shape``); ``None`` for an
                unconditional flow.

        Returns:
            ``(*batch,)``.
        """
        x, batch = self._prepare_x(self._broadcast_x(x, context))
        context = self._prepare_context(context, batch)
        z, ladj = self.transform(x, context)
        return (self.base.log_prob(z, self._base_context(context)) + ladj).reshape(batch)

    def _broadcast_x(self, x, context):
        """Expand ``x``'s batch dimensions against the context's (torch broadcasting), so
        that one event can be scored under many contexts; incompatible shapes are left
        for the context check to report."""
        if not isinstance(x, Tensor) or not isinstance(context, Tensor) or context.dim() == 0:
            return x
        ev = self.event_shape
        if x.dim() < len(ev) or tuple(x.shape[x.dim() - len(ev):]) != ev:
            return x
        xb, cb = tuple(x.shape[:x.dim() - len(ev)]), tuple(context.shape[:-1])
        try:
            full = tuple(torch.broadcast_shapes(xb, cb))
        except RuntimeError:
            return x
        return x.expand(*full, *ev) if full != xb else x

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw samples and their log-density in one pass (no second forward pass).

        Samples are reparameterized (differentiable with respect to the flow's
        parameters), as used by :meth:`reverse_kld`.

        Arguments:
            n: number of samples.
            context: ``None``, ``(C,)`` (one context for all samples) or ``(M, C)``.

        Returns:
            ``(x, log_prob)`` with ``x`` of shape ``(n, *event_shape)`` (context ``None``
            or ``(C,)``) or ``(n, M, *event_shape)`` (context ``(M, C)``), and
            ``log_prob`` of shape ``(n,)`` or ``(n, M)`` (nats).

        Raises:
            ValueError: ``n`` is not an integer >= 0 (``2.5``, ``"3"``, ``None``), or a
                context the flow does not accept (see the class docstring).
            TypeError: ``context`` is not a :class:`torch.Tensor` or ``None``.
        """
        n = integer("n", n)
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        batch: tuple[int, ...] = (n,)
        if context is not None and isinstance(context, Tensor) and context.dim() >= 2:
            batch = (n, *context.shape[:-1])
        ctx = self._prepare_context(context, batch) if self.context_features is not None or \
            context is not None else None
        m = math.prod(batch)
        bctx = self._base_context(ctx)
        z = self.base.sample(m, bctx)
        log_q = self.base.log_prob(z, bctx)
        x, ladj = self.transform.inverse(z, ctx)
        return x.reshape(*batch, *self.event_shape), (log_q - ladj).reshape(batch)

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Draw ``n`` samples (shapes as in :meth:`sample_and_log_prob`), without gradients.

        Like ``torch.distributions``' ``sample``, this runs under ``torch.no_grad()``; for
        reparameterized samples use :meth:`sample_and_log_prob` or
        ``flow.distribution(context).rsample(...)``.

        Raises:
            ValueError, TypeError: as :meth:`sample_and_log_prob`.
        """
        n = integer("n", n)
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        batch: tuple[int, ...] = (n,)
        if context is not None and isinstance(context, Tensor) and context.dim() >= 2:
            batch = (n, *context.shape[:-1])
        ctx = self._prepare_context(context, batch) if self.context_features is not None or \
            context is not None else None
        z = self.base.sample(math.prod(batch), self._base_context(ctx))
        x, _ = self.transform.inverse(z, ctx)
        return x.reshape(*batch, *self.event_shape)

    # ------------------------------------------------------------------ losses
    def forward_kld(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Forward KL up to the data entropy: the mean negative log-likelihood (nats).

        Minimising it is maximum likelihood (Papamakarios et al. 2021, eq. 13).

        Arguments:
            x, context: as in :meth:`log_prob`.

        Returns:
            a scalar tensor, ``-mean(log_prob(x, context))`` over every batch entry.

        Raises:
            ValueError: an empty batch (its mean would be NaN), or ``x``/``context`` the
                flow does not accept (see the class docstring).
            TypeError: ``x`` or ``context`` is not a :class:`torch.Tensor`.
        """
        lp = self.log_prob(x, context)
        if lp.numel() == 0:
            raise ValueError(f"forward_kld needs a non-empty batch, got x of shape "
                             f"{tuple(x.shape)} (empty batch)")
        return -lp.mean()

    def reverse_kld(self, target, n: int, beta: float = 1.0,
                    context: Tensor | None = None) -> Tensor:
        """Monte Carlo reverse KL ``E_q[log q(x) - beta log p~(x)]`` with ``n`` samples.

        ``target.log_prob(x)`` is an unnormalised log-density; the estimate equals
        ``KL(q || p)`` minus ``log Z`` of the target (Papamakarios et al. 2021, eq. 17).
        ``beta`` is an inverse temperature (annealing). Gradients flow through the
        reparameterized samples.

        Arguments:
            target: an object with ``log_prob(x)`` returning one value per sample
                (``(n,)``, or ``(n, M)`` for a context ``(M, C)``); called as
                ``log_prob(x, context)`` when a context is given.
            n: number of samples.
            beta: inverse temperature multiplying ``log p~``.
            context: as in :meth:`sample_and_log_prob`; passed to the target too.

        Returns:
            a scalar tensor (nats).

        Raises:
            ValueError: ``n`` is not an integer >= 1 (an empty batch has no mean), a
                context the flow does not accept, or ``target.log_prob`` returned a
                tensor of another shape than ``log_q`` (``(n,)`` or ``(n, M)``).
            TypeError: ``target.log_prob`` returned something other than a tensor, or
                ``context`` is not a tensor.
        """
        n = integer("n", n, minimum=1)
        x, log_q = self.sample_and_log_prob(n, context)
        if log_q.numel() == 0:
            raise ValueError(f"reverse_kld needs a non-empty batch, got samples of shape "
                             f"{tuple(x.shape)} (empty batch)")
        if context is not None:
            log_p = target.log_prob(x, context)
        else:
            log_p = target.log_prob(x)
        if not isinstance(log_p, Tensor):
            raise TypeError(f"target.log_prob must return a torch.Tensor of shape "
                            f"{tuple(log_q.shape)}, got {type(log_p).__name__}")
        if log_p.shape != log_q.shape:
            raise ValueError(f"target.log_prob returned shape {tuple(log_p.shape)} for samples "
                             f"x of shape {tuple(x.shape)}; expected one value per sample, "
                             f"shape {tuple(log_q.shape)}")
        return (log_q - beta * log_p).mean()

    # ------------------------------------------------------------------ distribution view
    def distribution(self, context: Tensor | None = None) -> "FlowDistribution":
        """A :class:`torch.distributions.Distribution` view of the flow at ``context``.

        With ``context`` of shape ``(M, C)`` the distribution has ``batch_shape (M,)``.

        Raises:
            TypeError: ``context`` is not a :class:`torch.Tensor` or ``None``.
        """
        return FlowDistribution(self, context)

    def forward(self, context: Tensor | None = None) -> "FlowDistribution":
        """``flow(context)`` is :meth:`distribution` (conditioning by partial application).

        ``context``: ``None``, ``(C,)`` or ``(M, C)``; returns a
        :class:`FlowDistribution` with ``batch_shape`` ``()`` or ``(M,)``.
        """
        return self.distribution(context)


class FlowDistribution(Distribution):
    """A flow at a fixed context, as a ``torch.distributions.Distribution``.

    Supports ``log_prob``, ``sample`` and ``rsample`` (reparameterized), so that a flow
    drops into Pyro or any code written against ``torch.distributions``.

    Arguments:
        flow: the :class:`Flow`.
        context: ``None``, ``(C,)`` or ``(M, C)``; the batch shape is ``()`` or ``(M,)``.

    Shapes:
        ``sample(sample_shape)`` and ``rsample(sample_shape)``:
        ``(*sample_shape, *batch_shape, *event_shape)``; ``log_prob(value)``: ``value``
        of shape ``(*sample_shape, *batch_shape, *event_shape)`` gives
        ``(*sample_shape, *batch_shape)`` (nats); with batch shape ``()``, a single
        event ``(*event_shape,)`` gives a 0-d tensor.

    Raises:
        ValueError: as :class:`Flow` (a value or context the flow does not accept).
        TypeError: ``context`` is not a :class:`torch.Tensor` or ``None`` (at
            construction).
    """

    has_rsample = True
    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, flow: Flow, context: Tensor | None = None):
        if context is not None and not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor or None, got {type(context).__name__}")
        self.flow = flow
        self.context = context
        batch = tuple(context.shape[:-1]) if context is not None else ()
        super().__init__(batch_shape=torch.Size(batch), event_shape=torch.Size(flow.event_shape),
                         validate_args=False)

    def _draw(self, sample_shape) -> tuple[Tensor, Tensor]:
        n = math.prod(sample_shape)
        x, lp = self.flow.sample_and_log_prob(n, self.context)
        return (x.reshape(*sample_shape, *self.batch_shape, *self.event_shape),
                lp.reshape(tuple(sample_shape) + tuple(self.batch_shape)))  # () is valid

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self._draw(torch.Size(sample_shape))[0]

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        """Reparameterized samples and their log-density in one pass.

        Returns:
            ``(x, log_prob)``: ``(*sample_shape, *batch_shape, *event_shape)`` and
            ``(*sample_shape, *batch_shape)`` (nats).
        """
        return self._draw(torch.Size(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(value | context)``; ``value`` broadcasts against ``batch_shape``
        (``(*sample, *batch_shape, *event_shape)`` or a single event)."""
        return self.flow.log_prob(value, self.context)
