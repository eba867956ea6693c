"""Normalisation layers as flows: ``ActNorm`` (Glow) and ``BatchNorm`` (Real NVP)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import integer, real
from .base import Transform, is_compiling

__all__ = ["ActNorm", "BatchNorm"]


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(Transform):
    """Per-channel affine ``z = (x - loc) * exp(-log_scale)`` with data-dependent init.

    Kingma & Dhariwal, "Glow", NeurIPS 2018, section 3.1. Channels are dimension 1 of
    ``(batch, C)`` vectors or ``(batch, C, H, W)`` images; ``ladj = -(H W) sum log_scale``.

    Initialisation: the first :meth:`forward` call in training mode (outside
    ``torch.compile``) sets ``loc`` and
    ``log_scale`` to the per-channel mean and standard deviation of its batch, so that
    the output is standardised. Degenerate batches never give NaN or absurd scales: a
    channel whose standard deviation is below ``min_std`` (a constant channel, or a
    batch of one sample) keeps scale 1 for that channel. The ``initialized`` flag is a
    buffer, so a loaded checkpoint never re-initialises. :meth:`inverse` never
    initialises (sampling from a fresh layer uses the identity).

    Data-parallel initialisation: statistics are sufficient sums (count, sum, sum of
    squares); under ``torch.distributed`` they are all-reduced before use, so every
    replica gets the statistics of the global batch. :meth:`initialize_from_statistics`
    does the same by hand for shards (sum the shards' :meth:`statistics`).

    Arguments:
        features: number of channels ``C``.
        min_std: threshold under which a channel keeps unit scale (default 1e-6).

    Shapes:
        ``x``, ``z``: ``(batch, C)`` or ``(batch, C, *spatial)``; ``ladj``: ``(batch,)``.

    Raises:
        ValueError: ``features`` not an integer >= 1 or ``min_std`` not finite and > 0;
            at call time, a context is passed (the layer is unconditional), or ``x`` does
            not have ``C`` channels in dimension 1 or is not of the parameters' dtype.
    """

    def __init__(self, features: int, min_std: float = 1e-6):
        super().__init__()
        self.features = integer("features", features, minimum=1)
        self.min_std = real("min_std", min_std, low=0, low_open=True)
        self.loc = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False
        self.register_load_state_dict_post_hook(_sync_flag)

    @staticmethod
    def statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-channel ``(count, sum, sum of squares)`` of ``x`` (float64 for accuracy).

        Arguments:
            x: ``(batch, C)`` or ``(batch, C, *spatial)``.

        Returns:
            ``count``: a 0-d float64 tensor, the number of values per channel
            (``batch * prod(spatial)``); ``sum``, ``sum of squares``: ``(C,)`` float64.
            Sums over data-parallel shards add up to the statistics of the global batch.
        """
        dims = _reduce_dims(x)
        x64 = x.detach().double()
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        return count, x64.sum(dims), (x64 * x64).sum(dims)

    @torch.no_grad()
    def initialize_from_statistics(self, count: Tensor, total: Tensor, total_sq: Tensor) -> None:
        """Set ``loc``/``log_scale`` from summed statistics and mark the layer initialised.

        ``loc`` becomes the per-channel mean and ``exp(log_scale)`` the (biased)
        standard deviation, or 1 where it is below ``min_std`` (Glow's data-dependent
        initialisation, Kingma & Dhariwal 2018, section 3.1).

        Arguments:
            count: 0-d tensor, values per channel; total, total_sq: ``(C,)`` sums of
                ``x`` and ``x^2`` (as from :meth:`statistics`, possibly summed over
                shards).
        """
        mean = total / count
        var = (total_sq / count - mean * mean).clamp(min=0)
        std = var.sqrt()
        std = torch.where(std < self.min_std, torch.ones_like(std), std)
        self.loc.copy_(mean.to(self.loc.dtype))
        self.log_scale.copy_(std.log().to(self.log_scale.dtype))
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation from the batch ``x`` (all-reduced when distributed).

        Kingma & Dhariwal 2018 (Glow), section 3.1: after it the layer's output on ``x``
        has zero mean and unit variance per channel.

        Arguments:
            x: ``(batch, C)`` or ``(batch, C, *spatial)``.

        Raises:
            ValueError: an empty batch, or NaN/Inf in ``x`` (the layer stays uninitialised).
        """
        if x.shape[0] == 0:
            raise ValueError("ActNorm cannot initialise from an empty batch")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("ActNorm cannot initialise from a batch containing NaN or Inf")
        count, total, total_sq = self.statistics(x)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([count[None], total, total_sq])
            torch.distributed.all_reduce(stats)
            count, total, total_sq = stats[0], stats[1:1 + self.features], stats[1 + self.features:]
        self.initialize_from_statistics(count, total, total_sq)

    def _ladj(self, x: Tensor) -> Tensor:
        spatial = math.prod(x.shape[2:])
        return (-spatial * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        if x.shape[1] != self.features:
            raise ValueError(f"ActNorm expects {self.features} channels in dim 1, got {x.shape[1]}")
        if not self._initialized and self.training and not is_compiling():
            self.initialize(x)
        z = (x - _per_channel(self.loc, x)) * torch.exp(-_per_channel(self.log_scale, x))
        return z, self._ladj(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        if z.shape[1] != self.features:
            raise ValueError(f"ActNorm expects {self.features} channels in dim 1, got {z.shape[1]}")
        x = z * torch.exp(_per_channel(self.log_scale, z)) + _per_channel(self.loc, z)
        return x, -self._ladj(z)

    def extra_repr(self) -> str:
        return f"features={self.features}, initialized={self._initialized}"


def _sync_flag(module: ActNorm, incompatible_keys=None) -> None:
    """Mirror the ``initialized`` buffer into a Python bool after ``load_state_dict``."""
    module._initialized = bool(module.initialized)


class BatchNorm(Transform):
    """Batch normalisation as a bijection (Dinh et al. 2017, Real NVP, section 3.7).

    ``z = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta`` per channel, with
    ``ladj = sum(log_gamma - 0.5 log(v + eps))`` (times ``H W`` for images). In training
    mode ``(m, v)`` are the batch statistics (and the running averages are updated with
    ``momentum``); in eval mode they are the running averages, so the layer is an exact
    bijection with an exact inverse. :meth:`inverse` always uses the running averages.

    Arguments:
        features: number of channels ``C`` (dimension 1).
        momentum: running-average update weight (default 0.1).
        eps: variance floor (default 1e-5).

    Shapes:
        ``x``, ``z``: ``(batch, C)`` or ``(batch, C, *spatial)``; ``ladj``: ``(batch,)``
        (the same value for every row).

    Raises:
        ValueError: ``features`` not an integer >= 1, ``momentum`` outside [0, 1], ``eps``
            not finite and > 0; at call time, a context is passed, an input not of the
            parameters' dtype; in training mode, an empty batch, or :meth:`forward` on a
            batch of one sample with a single value per channel (no variance).
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.features = integer("features", features, minimum=1)
        self.momentum = real("momentum", momentum, low=0, high=1)
        self.eps = real("eps", eps, low=0, low_open=True)
        self.log_gamma = nn.Parameter(torch.zeros(self.features))
        self.beta = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("running_mean", torch.zeros(self.features))
        self.register_buffer("running_var", torch.ones(self.features))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            if x.shape[0] == 0:
                raise ValueError("BatchNorm in training mode needs a non-empty batch")
            if x.shape[0] < 2 and x[0, 0].numel() < 2:
                raise ValueError("BatchNorm in training mode needs a batch size of at least 2")
            dims = _reduce_dims(x)
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
            return mean, var
        return self.running_mean, self.running_var

    def _ladj(self, x: Tensor, var: Tensor) -> Tensor:
        spatial = x[0, 0].numel()
        return (spatial * (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        mean, var = self._stats(x)
        z = ((x - _per_channel(mean, x)) * torch.rsqrt(_per_channel(var, x) + self.eps)
             * torch.exp(_per_channel(self.log_gamma, x)) + _per_channel(self.beta, x))
        return z, self._ladj(x, var)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        mean, var = self.running_mean, self.running_var
        x = ((z - _per_channel(self.beta, z)) * torch.exp(-_per_channel(self.log_gamma, z))
             * torch.sqrt(_per_channel(var, z) + self.eps) + _per_channel(mean, z))
        return x, -self._ladj(z, var)

    def extra_repr(self) -> str:
        return f"features={self.features}, momentum={self.momentum}"
