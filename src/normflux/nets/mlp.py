"""Conditioner networks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import context_width, integer
from .._tracing import is_compiling

__all__ = ["MLP"]


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, activation: type[nn.Module]):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), activation(), nn.Linear(width, width))
        self.act = activation()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(h + self.net(h))


class MLP(nn.Module):
    """Multi-layer perceptron used as a conditioner, optionally residual and conditional.

    ``MLP(in_features, out_features, hidden_features=(64, 64))`` maps ``(batch, in)`` to
    ``(batch, out)``; with ``context_features=C`` the context ``(batch, C)`` is
    concatenated to the input. With ``residual=True`` the hidden layers are residual
    blocks of constant width (He et al. 2016; the ResNet conditioner of Durkan et al. 2019).
    ``zero_init=True`` zeroes the last layer, so that a coupling or autoregressive layer
    starts as the identity.

    Arguments:
        in_features: input width (may be 0 when only a context is seen).
        out_features: output width.
        hidden_features: hidden widths; with ``residual`` all must be equal.
        context_features: context width, or ``None``.
        activation: activation module class (default ``nn.ReLU``).
        residual: use residual blocks (two linear layers each).
        zero_init: zero the output layer's weight and bias.
        transposed_output: compute the output layer as ``W h^T + b`` and return its
            transpose: the same values and shape, in memory layout ``(out, batch)``.
            Spline layers read their parameters from this layout without a copy (see
            :func:`~normflux.transforms.fused_spline.fused_rq_spline`). Applies to a
            ``(batch, in)`` input only, and not when ``torch.compile`` traces a
            differentiable pass (see :func:`use_transposed_output`).

    Shapes:
        ``forward(x (batch, in), context (batch, C) or (1, C)) -> (batch, out)``.

    Raises:
        ValueError: widths that are not integers >= 1 (``in_features`` may be 0), no
            hidden layer, no input at all (``in_features = 0`` without a context), ``context_features``
            neither ``None`` nor an integer >= 1, or unequal widths with ``residual``.
    """

    def __init__(self, in_features: int, out_features: int,
                 hidden_features: Sequence[int] | int = (64, 64),
                 context_features: int | None = None, activation: type[nn.Module] = nn.ReLU,
                 residual: bool = False, zero_init: bool = True, transposed_output: bool = False):
        super().__init__()
        if isinstance(hidden_features, int):
            hidden_features = (hidden_features, hidden_features)
        hidden_features = tuple(integer("hidden_features", h, minimum=1) for h in hidden_features)
        in_features = integer("in_features", in_features, minimum=0)
        out_features = integer("out_features", out_features, minimum=1)
        if not hidden_features:
            raise ValueError("MLP needs at least one hidden layer, got hidden_features=()")
        if residual and len(set(hidden_features)) != 1:
            raise ValueError("a residual MLP needs equal hidden widths, got "
                             f"{hidden_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.context_features = context_features = context_width(context_features)
        self.transposed_output = bool(transposed_output)
        n_in = in_features + (context_features or 0)
        if n_in < 1:
            raise ValueError("MLP has neither input features nor context")
        layers: list[nn.Module] = [nn.Linear(n_in, hidden_features[0]), activation()]
        if residual:
            layers += [_ResidualBlock(hidden_features[0], activation)
                       for _ in range(len(hidden_features) - 1)]
        else:
            for a, b in zip(hidden_features[:-1], hidden_features[1:]):
                layers += [nn.Linear(a, b), activation()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden_features[-1], out_features)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(batch, in)`` (+ context ``(batch, C)``) -> ``(batch, out)``.

        Raises:
            ValueError: an input without ``in_features`` columns; a context for an
                unconditional MLP, none for a conditional one, or one without
                ``context_features`` columns.
        """
        check_net_input("MLP", x, self.in_features, context, self.context_features)
        if context is not None:
            if context.shape[0] != x.shape[0]:
                context = context.expand(x.shape[0], -1)
            x = torch.cat([x, context], dim=-1) if self.in_features else context
        h = self.body(x)
        if use_transposed_output(self) and h.dim() == 2:
            return _linear_t(h, self.head.weight, self.head.bias)
        return self.head(h)


def check_net_input(owner: str, x: Tensor, in_features: int, context: Tensor | None,
                    context_features: int | None) -> None:
    """Shape checks of a conditioner network's input and context (free under compile).

    Raises:
        ValueError: ``x`` without ``in_features`` columns in its last dimension; a context
            for a network without one, none for one with one, or a context without
            ``context_features`` columns.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"{owner} expects inputs with {in_features} features in the last "
                         f"dimension, got shape {tuple(x.shape)}")
    if context_features is None:
        if context is not None:
            raise ValueError(f"{owner} is unconditional but a context of shape "
                             f"{tuple(context.shape)} was passed")
    elif context is None:
        raise ValueError(f"{owner} is conditional and expects a context with "
                         f"{context_features} features, got context=None")
    elif context.shape[-1] != context_features:
        raise ValueError(f"{owner} expects a context with {context_features} features in the "
                         f"last dimension, got shape {tuple(context.shape)}")


def _linear_t(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear(h, weight, bias)`` computed as ``(W h^T + b)^T``: memory ``(out, batch)``.

    The bias is added after the product: ``addmm`` would first copy it, broadcast along
    the rows' inner axis, into the output, which is several times slower (B1 of the speed
    suite: 0.35 ms per step)."""
    if bias is None:
        return torch.mm(weight, h.t()).t()
    return torch.mm(weight, h.t()).add_(bias[:, None]).t()


def use_transposed_output(net: nn.Module) -> bool:
    """Whether ``net`` (an :class:`MLP` or MADE) emits its transposed output now.

    Its ``transposed_output`` flag, except while ``torch.compile`` traces a pass with
    gradients: there inductor's backward kernels run much faster on the usual layout,
    while compiled sampling gains from the transposed one (measured on B1 of the speed
    suite, ``benchmarks/suite.py --compile``).
    """
    return net.transposed_output and (not is_compiling() or not torch.is_grad_enabled())
