"""Importance sampling diagnostics and KL estimators (all in nats)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._checks import integer

__all__ = ["log_importance_weights", "effective_sample_size", "log_normalizer",
           "reverse_kl", "forward_kl", "bits_per_dim"]


def log_importance_weights(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Log importance weights ``log w = log p~(x) - log q(x)`` for samples ``x ~ q`` (nats).

    Self-normalised importance sampling with proposal ``q`` (the flow) and an
    unnormalised target ``p~`` (Owen 2013, *Monte Carlo theory, methods and examples*,
    section 9.2).

    Arguments:
        log_p: ``(n,)`` unnormalised target log-density at the samples.
        log_q: ``(n,)`` proposal log-density at the same samples.

    Returns:
        ``(n,)`` (any shapes that broadcast are subtracted elementwise).
    """
    return log_p - log_q


def _weights(log_w) -> Tensor:
    """``log_w`` must be a non-empty 1-D tensor ``(n,)`` (shape checks only)."""
    if not isinstance(log_w, Tensor):
        raise TypeError(f"log_w must be a torch.Tensor, got {type(log_w).__name__}")
    if log_w.dim() != 1:
        raise ValueError(f"log_w must be 1-D (n,), got shape {tuple(log_w.shape)}; for "
                         "several sets of weights call it once per set")
    if log_w.shape[0] == 0:
        raise ValueError("log_w is empty: need at least one importance weight (n >= 1)")
    if not log_w.is_floating_point():
        raise ValueError(f"log_w must be floating point, got dtype {log_w.dtype}")
    return log_w


def effective_sample_size(log_w: Tensor) -> Tensor:
    """Kish effective sample size as a fraction of ``n``: ``(sum w)^2 / (n sum w^2)`` in (0, 1].

    Computed in log space after shifting by ``max log w``, so it is exact for weights far
    outside the float range (Kish 1965, *Survey Sampling*; Owen 2013, eq. 9.13).

    Arguments:
        log_w: ``(n,)`` log importance weights (nats), ``n >= 1``; any additive
            constant cancels.

    Returns:
        a scalar tensor in ``(0, 1]`` (1 for equal weights).

    Raises:
        TypeError: ``log_w`` is not a :class:`torch.Tensor`.
        ValueError: ``log_w`` is not 1-D, is empty, or is not floating point.
    """
    n = _weights(log_w).shape[0]
    log_w = log_w - log_w.max()  # shift first: exact for large |log w|
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(n))


def log_normalizer(log_w: Tensor) -> Tensor:
    """Importance-sampling estimate of ``log Z = log mean(w)`` in nats (biased low by Jensen).

    ``Z = E_q[p~(x) / q(x)]`` is the normalising constant of the target ``p~`` (Owen
    2013, section 9.2); ``log mean(w)`` is computed with ``logsumexp``.

    Arguments:
        log_w: ``(n,)`` log importance weights from :func:`log_importance_weights`.

    Returns:
        a scalar tensor.

    Raises:
        TypeError: ``log_w`` is not a :class:`torch.Tensor`.
        ValueError: ``log_w`` is not 1-D, is empty, or is not floating point.
    """
    return torch.logsumexp(_weights(log_w), 0) - math.log(log_w.shape[0])


def reverse_kl(log_q: Tensor, log_p: Tensor, log_z: float = 0.0) -> Tensor:
    """Monte Carlo ``KL(q || p) ~ mean(log q - log p~) + log Z`` from samples of ``q``; nats.

    The reverse KL of variational inference (Papamakarios et al. 2021, JMLR, section
    2.3.2); ``p = p~ / Z``.

    Arguments:
        log_q: ``(n,)`` model log-density at ``x ~ q``.
        log_p: ``(n,)`` unnormalised target log-density at the same ``x``.
        log_z: ``log Z`` of the target (0 for a normalised one).

    Returns:
        a scalar tensor.
    """
    return (log_q - log_p).mean() + log_z


def forward_kl(log_p: Tensor, log_q: Tensor, log_z: float = 0.0) -> Tensor:
    """Monte Carlo ``KL(p || q) ~ mean(log p~ - log q) - log Z`` from exact samples of ``p``; nats.

    The forward KL of maximum likelihood (Papamakarios et al. 2021, JMLR, section
    2.3.1); ``p = p~ / Z``.

    Arguments:
        log_p: ``(n,)`` unnormalised target log-density at ``x ~ p``.
        log_q: ``(n,)`` model log-density at the same ``x``.
        log_z: ``log Z`` of the target (0 for a normalised one).

    Returns:
        a scalar tensor.
    """
    return (log_p - log_q).mean() - log_z


def bits_per_dim(nll: float | Tensor, dims: int, levels: int | None = None) -> float | Tensor:
    """Bits per dimension of a dequantised model.

    For data with ``levels`` integer values per dimension, dequantised as
    ``(x + u) / levels`` with ``u ~ U(0, 1)``, the discrete negative log-likelihood in
    bits per dimension is ``log2(levels) + nll / (dims ln 2)`` where ``nll`` is the
    continuous NLL (nats per example) of the rescaled data; it is an upper bound on the
    discrete model's NLL (Theis, van den Oord & Bethge 2016, "A note on the evaluation
    of generative models", ICLR, section 3.1). Without ``levels``, ``nll / (dims ln 2)``.

    Arguments:
        nll: mean continuous NLL in nats per example: a float, or a tensor of any shape
            (elementwise).
        dims: dimensions per example (``D``), an integer >= 1.
        levels: integer values per dimension before dequantisation (an integer >= 1),
            or ``None``.

    Returns:
        bits per dimension, a float or a tensor of ``nll``'s shape.

    Raises:
        ValueError: ``dims`` or ``levels`` is not an integer >= 1.
        TypeError: ``nll`` is neither a real number nor a :class:`torch.Tensor`.
    """
    if not isinstance(nll, Tensor) and (isinstance(nll, bool) or
                                        not isinstance(nll, numbers.Real)):
        raise TypeError(f"nll must be a real number or a torch.Tensor, got {type(nll).__name__}")
    dims = integer("dims", dims, minimum=1)
    if levels is not None:
        levels = integer("levels", levels, minimum=1)
    bpd = nll / (dims * math.log(2))
    return bpd + (math.log2(levels) if levels is not None else 0.0)
