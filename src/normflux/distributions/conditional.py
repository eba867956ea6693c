"""Conditional base distributions: parameters are functions of the context."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import integer, real
from ..nets.mlp import MLP
from .base import BaseDistribution

__all__ = ["ConditionalDiagGaussian", "ClassConditionalDiagGaussian"]


class _GaussianFromParams(BaseDistribution):
    """Shared maths: a diagonal Gaussian whose ``(loc, log_scale)`` come from the context."""

    def _loc_log_scale(self, context: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check_log_prob(z, context)
        loc, log_scale = self._loc_log_scale(context)
        u = (z - loc) * torch.exp(-log_scale)
        return (-0.5 * u * u - log_scale).sum(-1) - 0.5 * math.log(2 * math.pi) * z.shape[-1]

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        n = self._check_sample(n, context)
        loc, log_scale = self._loc_log_scale(context)
        loc, log_scale = loc.expand(n, -1), log_scale.expand(n, -1)
        return loc + torch.exp(log_scale) * torch.randn_like(loc)


class ConditionalDiagGaussian(_GaussianFromParams):
    """``N(mu(c), diag(sigma(c)^2))`` with ``(mu, log sigma)`` from an MLP of the context.

    The encoder's last layer starts at zero, so the initial base is ``N(0, I)`` for every
    context (the conditional base of nflows' ``ConditionalDiagonalNormal``; Papamakarios
    et al. 2017, section 3.4, conditional MAF). ``log sigma`` is bounded to
    ``[-log_scale_bound, log_scale_bound]`` through ``tanh``.

    Arguments:
        features: ``D``, an integer >= 1.
        context_features: ``C``, an integer >= 1.
        hidden_features: hidden widths of the encoder MLP (integers >= 1).
        log_scale_bound: bound on ``|log sigma|`` (default 5), finite and ``> 0``.

    Shapes:
        ``log_prob(z (n, D), context (n, C)) -> (n,)``; ``sample(n, context (n, C))``
        (or ``(1, C)``) ``-> (n, D)``; a context of batch 1 broadcasts in both.

    Raises:
        ValueError: at construction, ``features`` or ``context_features`` not an
            integer >= 1, bad ``hidden_features`` (see :class:`~normflux.nets.MLP`),
            ``log_scale_bound`` not a finite number > 0. At call time, ``z`` not of
            shape ``(n, D)``, not floating-point or not of the distribution's dtype;
            ``n`` not an integer >= 0; a missing context, or one of the wrong shape,
            batch size or dtype.
        TypeError: ``z`` or ``context`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int, context_features: int,
                 hidden_features: Sequence[int] | int = (64, 64), log_scale_bound: float = 5.0):
        super().__init__()
        features = integer("features", features, minimum=1)
        self.event_shape = (features,)
        self.context_features = integer("context_features", context_features, minimum=1)
        self.log_scale_bound = real("log_scale_bound", log_scale_bound, low=0.0, low_open=True)
        self.encoder = MLP(self.context_features, 2 * features, hidden_features)

    def _dtype(self):
        return self.encoder.packed.dtype

    def _loc_log_scale(self, context):
        out = self.encoder(context)
        loc, raw = out.chunk(2, dim=-1)
        B = self.log_scale_bound
        return loc, B * torch.tanh(raw / B)


class ClassConditionalDiagGaussian(_GaussianFromParams):
    """One trainable diagonal Gaussian per class; the context is a one-hot class vector.

    ``mu(c) = c M``, ``log sigma(c) = c S`` for a one-hot (or soft) ``c`` of width
    ``classes``, so class ``k`` has ``N(M_k, diag(exp(S_k))^2)`` (the class-conditional
    base of Glow's class-conditional experiments, Kingma & Dhariwal 2018, section 5).

    Arguments:
        features: ``D``, an integer >= 1.
        classes: number of classes (the context width), an integer >= 1.

    Shapes:
        ``log_prob(z (n, D), context (n, classes)) -> (n,)`` (nats);
        ``sample(n, context (n, classes))`` (or ``(1, classes)``) ``-> (n, D)``; a
        context of batch 1 broadcasts in both.

    Raises:
        ValueError: at construction, ``features`` or ``classes`` not an integer >= 1. At
            call time, ``z`` not of shape ``(n, D)``, not floating-point or not of the
            distribution's dtype; ``n`` not an integer >= 0; a missing context, or one
            of the wrong shape, batch size or dtype.
        TypeError: ``z`` or ``context`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int, classes: int):
        super().__init__()
        features = integer("features", features, minimum=1)
        classes = integer("classes", classes, minimum=1)
        self.event_shape = (features,)
        self.context_features = classes
        self.means = nn.Parameter(torch.zeros(classes, features))
        self.log_scales = nn.Parameter(torch.zeros(classes, features))

    def _dtype(self):
        return self.means.dtype

    def _loc_log_scale(self, context):
        return context @ self.means, context @ self.log_scales
