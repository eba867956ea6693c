"""Importance-sampling diagnostics and KL estimators: exact values on constructed weights."""

from __future__ import annotations

import math

import pytest
import torch

from normflux import metrics

F64 = torch.float64


@pytest.mark.parametrize("n", [1, 10, 1000])
@pytest.mark.parametrize("level", [-1e4, 0.0, 700.0, 1e4])
def test_ess_of_equal_weights_is_one(n, level):
    """Equal weights give ESS = 1 at any scale (log space: no overflow at log w = 1e4).
    The log-space sums carry the rounding of |log w| (eps * 2e4 ~ 4e-12 at 1e4)."""
    log_w = torch.full((n,), level, dtype=F64)
    tol = 1e-12 + 10 * torch.finfo(F64).eps * abs(level)
    assert abs(metrics.effective_sample_size(log_w).item() - 1.0) < tol


@pytest.mark.parametrize("n", [2, 10, 1000])
def test_ess_of_one_dominant_weight_is_one_over_n(n):
    log_w = torch.full((n,), -1000.0, dtype=F64)
    log_w[n // 2] = 0.0
    assert abs(metrics.effective_sample_size(log_w).item() - 1.0 / n) < 1e-12


def test_ess_matches_kish_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(50, generator=g, dtype=F64) + 0.1
    kish = w.sum() ** 2 / (50 * (w * w).sum())
    assert torch.allclose(metrics.effective_sample_size(w.log()), kish, atol=1e-14)
    # two groups: k equal weights and n - k zero weights give ESS = k / n
    log_w = torch.cat([torch.zeros(3, dtype=F64), torch.full((7,), -math.inf, dtype=F64)])
    assert abs(metrics.effective_sample_size(log_w).item() - 0.3) < 1e-12


def test_log_normalizer_of_exact_weights():
    """p~ = Z q exactly: every log weight is log Z, and the estimate is exact."""
    g = torch.Generator().manual_seed(1)
    log_q = torch.randn(100, generator=g, dtype=F64)
    log_z = 3.7
    log_w = metrics.log_importance_weights(log_q + log_z, log_q)
    assert torch.allclose(log_w, torch.full((100,), log_z, dtype=F64), atol=1e-14)
    assert abs(metrics.log_normalizer(log_w).item() - log_z) < 1e-12
    # and the mean of the weights in general (logsumexp - log n)
    lw = torch.tensor([0.0, math.log(3.0)], dtype=F64)
    assert abs(metrics.log_normalizer(lw).item() - math.log(2.0)) < 1e-14


def test_log_normalizer_gaussian_importance_sampling():
    """Importance sampling of an unnormalised Gaussian (Z = 5) from a wider Gaussian
    proposal recovers log Z within 5 standard errors (seeded)."""
    torch.manual_seed(0)
    n = 100_000
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    x = q.sample((n,))
    p = torch.distributions.Normal(torch.tensor(0.5, dtype=F64), torch.tensor(1.0, dtype=F64))
    log_w = metrics.log_importance_weights(p.log_prob(x) + math.log(5.0), q.log_prob(x))
    est = metrics.log_normalizer(log_w).item()
    w = log_w.exp()
    se = (w.std() / w.mean()).item() / math.sqrt(n)  # delta method on log mean
    assert abs(est - math.log(5.0)) < 5 * se


def test_kl_estimators():
    log_q = torch.tensor([-1.0, -2.0, -3.0], dtype=F64)
    log_p = torch.tensor([-1.5, -2.0, -4.0], dtype=F64)
    assert abs(metrics.reverse_kl(log_q, log_p).item() - (0.5 + 0.0 + 1.0) / 3) < 1e-14
    assert abs(metrics.reverse_kl(log_q, log_p, log_z=2.0).item() - (0.5 + 2.0)) < 1e-14
    assert abs(metrics.forward_kl(log_p, log_q).item() + 0.5) < 1e-14
    assert abs(metrics.forward_kl(log_p, log_q, log_z=1.0).item() + 1.5) < 1e-14


def test_reverse_kl_gaussian_closed_form():
    torch.manual_seed(1)
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    p = torch.distributions.Normal(torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    x = q.sample((200_000,))
    terms = q.log_prob(x) - p.log_prob(x)
    est = metrics.reverse_kl(q.log_prob(x), p.log_prob(x)).item()
    exact = torch.distributions.kl_divergence(q, p).item()
    assert abs(est - exact) < 5 * terms.std().item() / math.sqrt(200_000)


def test_bits_per_dim():
    # nll of log(256) nats per dim of uniform data in [0, 1]: 8 bits/dim (no levels)
    assert abs(metrics.bits_per_dim(784 * math.log(256), 784) - 8.0) < 1e-12
    # with levels: log2(levels) + nll / (D ln 2); a uniform density on [0, 1]^D has nll 0
    assert abs(metrics.bits_per_dim(0.0, 3072, levels=256) - 8.0) < 1e-12
    t = metrics.bits_per_dim(torch.tensor(-3072 * math.log(2.0), dtype=F64), 3072, levels=256)
    assert abs(float(t) - 7.0) < 1e-12
