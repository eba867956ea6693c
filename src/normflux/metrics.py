"""Importance sampling diagnostics and KL estimators (all in nats)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_importance_weights", "effective_sample_size", "log_normalizer",
           "reverse_kl", "forward_kl", "bits_per_dim"]


def log_importance_weights(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log w = log p~(x) - log q(x)`` for samples ``x ~ q``; shapes ``(n,)``."""
    return log_p - log_q


def effective_sample_size(log_w: Tensor) -> Tensor:
    """Kish effective sample size as a fraction of ``n``: ``(sum w)^2 / (n sum w^2)`` in (0, 1].

    Computed in log space (Kish 1965; Owen 2013, eq. 9.13). ``log_w``: ``(n,)``.
    """
    n = log_w.shape[0]
    log_w = log_w - log_w.max()  # shift first: exact for large |log w|
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(n))


def log_normalizer(log_w: Tensor) -> Tensor:
    """Importance-sampling estimate of ``log Z = log mean(w)`` (biased low by Jensen)."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def reverse_kl(log_q: Tensor, log_p: Tensor, log_z: float = 0.0) -> Tensor:
    """``KL(q || p) ~ mean(log q - log p~) + log Z`` from samples of ``q``; nats."""
    return (log_q - log_p).mean() + log_z


def forward_kl(log_p: Tensor, log_q: Tensor, log_z: float = 0.0) -> Tensor:
    """``KL(p || q) ~ mean(log p~ - log q) - log Z`` from exact samples of ``p``; nats."""
    return (log_p - log_q).mean() - log_z


def bits_per_dim(nll: float | Tensor, dims: int, levels: int | None = None) -> float | Tensor:
    """Bits per dimension of a dequantised model.

    For data with ``levels`` integer values per dimension, dequantised as
    ``(x + u) / levels`` with ``u ~ U(0, 1)``, the discrete negative log-likelihood in
    bits per dimension is ``log2(levels) + nll / (dims ln 2)`` where ``nll`` is the
    continuous NLL (nats per example) of the rescaled data (Theis et al. 2016).
    Without ``levels``, ``nll / (dims ln 2)``.
    """
    bpd = nll / (dims * math.log(2))
    return bpd + (math.log2(levels) if levels else 0.0)
