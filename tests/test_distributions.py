"""Base distributions: log_prob against torch.distributions, sample moments (bounds from
the sample size, seeded), dtype moves, context handling, construction errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import jitter_
from torch import distributions as td

import normflux as nf

F64 = torch.float64
PI = math.pi
N = 40_000  # samples for the moment checks; bounds are 5 standard errors


def _ind(d):
    return td.Independent(d, 1)


def _t(v):
    return torch.tensor(v, dtype=F64)


# ------------------------------------------------------------------ log_prob
@pytest.mark.parametrize("trainable", [False, True])
def test_diag_gaussian_log_prob(trainable):
    loc, scale = [0.5, -1.0, 2.0], [1.0, 0.3, 2.5]
    base = nf.DiagGaussian(3, loc=loc, scale=scale, trainable=trainable).double()
    z = 3 * torch.randn(20, 3, dtype=F64)
    ref = _ind(td.Normal(_t(loc), _t(scale))).log_prob(z)
    # 1e-6 relative: loc/scale were rounded to float32 at construction (default dtype)
    assert torch.allclose(base.log_prob(z), ref, atol=1e-6, rtol=1e-6)
    # against the module's own (float64) parameters the agreement is to rounding
    exact = _ind(td.Normal(base.loc, base.log_scale.exp())).log_prob(z)
    assert torch.allclose(base.log_prob(z), exact, atol=1e-12, rtol=0)
    assert (len(list(base.parameters())) == 2) == trainable


def test_diag_gaussian_scalar_arguments_broadcast():
    base = nf.DiagGaussian(4, loc=1.0, scale=2.0)
    z = torch.randn(5, 4)
    ref = _ind(td.Normal(torch.ones(4), 2 * torch.ones(4))).log_prob(z)
    assert torch.allclose(base.log_prob(z), ref, atol=1e-6, rtol=0)


def test_uniform_log_prob():
    low, high = [-1.0, 0.0, 2.0], [1.0, 3.0, 2.5]
    base = nf.Uniform(3, low=low, high=high).double()
    g = torch.Generator().manual_seed(0)
    z = _t(low) + (_t(high) - _t(low)) * torch.rand(20, 3, generator=g, dtype=F64)
    ref = _ind(td.Uniform(_t(low), _t(high))).log_prob(z)
    assert torch.allclose(base.log_prob(z), ref, atol=1e-6, rtol=0)
    out = z.clone()
    out[::2, 1] = 3.5
    lp = base.log_prob(out)
    assert torch.isinf(lp[::2]).all() and (lp[::2] < 0).all() and torch.isfinite(lp[1::2]).all()
    # the box is closed: the upper bound itself has the uniform density
    edge = _t([[1.0, 3.0, 2.5]])
    assert torch.allclose(base.log_prob(edge), -torch.log(_t(high) - _t(low)).sum()[None])


def test_vonmises_log_prob_including_outside_the_fundamental_interval():
    loc, kappa = [0.0, 1.0, -2.5], [1.0, 4.0, 0.3]
    base = nf.VonMises(3, loc=loc, concentration=kappa).double()
    z = 5 * torch.randn(30, 3, dtype=F64)  # many outside [-pi, pi): the density is periodic
    ref = _ind(td.VonMises(_t(loc), _t(kappa))).log_prob(z)
    assert torch.allclose(base.log_prob(z), ref, atol=1e-6, rtol=0)
    assert torch.allclose(base.log_prob(z + 2 * PI), base.log_prob(z), atol=1e-10)


def test_vonmises_large_concentration_is_stable():
    base = nf.VonMises(1, loc=0.0, concentration=1e4).double()
    z = _t([[0.0], [0.01]])
    ref = _ind(td.VonMises(_t([0.0]), _t([1e4]))).log_prob(z)
    lp = base.log_prob(z)
    assert torch.isfinite(lp).all()
    # log I0(k) ~ k - 0.5 log(2 pi k): the normaliser of a concentrated von Mises
    assert abs(lp[0].item() - (-0.5 * math.log(2 * PI) + 0.5 * math.log(1e4))) < 1e-4
    assert torch.allclose(lp, ref, rtol=1e-6)


def test_circular_uniform_log_prob():
    base = nf.CircularUniform(2).double()
    z = 10 * torch.randn(7, 2, dtype=F64)
    assert torch.allclose(base.log_prob(z), torch.full((7,), -2 * math.log(2 * PI), dtype=F64))
    inside = torch.rand(7, 2, dtype=F64) * 2 * PI - PI
    ref = _ind(td.Uniform(_t([-PI, -PI]), _t([PI, PI]))).log_prob(inside)
    assert torch.allclose(base.log_prob(inside), ref, atol=1e-6, rtol=0)


def test_product_log_prob_is_sum_over_blocks():
    parts = [nf.DiagGaussian(2, loc=[1.0, 0.0], scale=[0.5, 2.0]), nf.VonMises(1, 0.5, 2.0),
             nf.Uniform(1, -1.0, 2.0)]
    base = nf.Product(parts).double()
    assert base.event_shape == (4,)
    z = torch.cat([torch.randn(9, 2, dtype=F64), torch.randn(9, 1, dtype=F64),
                   torch.rand(9, 1, dtype=F64) * 3 - 1], 1)
    ref = (_ind(td.Normal(_t([1.0, 0.0]), _t([0.5, 2.0]))).log_prob(z[:, :2])
           + td.VonMises(_t(0.5), _t(2.0)).log_prob(z[:, 2])
           + td.Uniform(_t(-1.0), _t(2.0)).log_prob(z[:, 3]))
    assert torch.allclose(base.log_prob(z), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ sampling moments
def _mean_ok(x, mean, var, n=N):
    return ((x.mean(0) - mean).abs() <= 5 * torch.sqrt(var / n)).all()


def test_diag_gaussian_sample_moments():
    torch.manual_seed(1)
    loc, scale = _t([0.5, -1.0, 2.0]), _t([1.0, 0.3, 2.5])
    x = nf.DiagGaussian(3, loc=loc, scale=scale).double().sample(N)
    assert x.shape == (N, 3) and x.dtype == F64
    assert _mean_ok(x, loc, scale ** 2)
    var_se = scale ** 2 * math.sqrt(2 / (N - 1))  # standard error of a Gaussian variance
    assert ((x.var(0) - scale ** 2).abs() <= 5 * var_se).all()
    # independent coordinates
    corr = torch.corrcoef(x.T)
    assert (corr - torch.eye(3, dtype=F64)).abs().max() <= 5 / math.sqrt(N)


def test_uniform_sample_moments_and_support():
    torch.manual_seed(2)
    low, high = _t([-1.0, 0.0, 2.0]), _t([1.0, 3.0, 2.5])
    x = nf.Uniform(3, low=low, high=high).double().sample(N)
    assert ((x >= low) & (x <= high)).all()
    w = high - low
    var = w ** 2 / 12
    assert _mean_ok(x, (low + high) / 2, var)
    var_se = torch.sqrt((w ** 4 / 80 - var ** 2) / N)  # (mu4 - sigma^4) / n
    assert ((x.var(0) - var).abs() <= 5 * var_se).all()


def _bessel_ratio(k):
    """I1(k)/I0(k) and I2(k)/I0(k) (recurrence I2 = I0 - 2 I1 / k)."""
    k = _t(k)
    r1 = torch.special.i1e(k) / torch.special.i0e(k)
    return r1, 1 - 2 * r1 / k


@pytest.mark.parametrize("trainable", [False, True])
def test_vonmises_sample_circular_moments(trainable):
    """E[cos(phi - mu)] = I1/I0, E[sin(phi - mu)] = 0; samples in [-pi, pi)."""
    torch.manual_seed(3)
    loc, kappa = [2.5, -1.0, 0.0], [0.5, 2.0, 8.0]
    x = nf.VonMises(3, loc=loc, concentration=kappa, trainable=trainable).double().sample(N)
    assert x.shape == (N, 3) and x.dtype == F64
    assert ((x >= -PI) & (x < PI)).all()
    r1, r2 = _bessel_ratio(kappa)
    c, s = torch.cos(x - _t(loc)), torch.sin(x - _t(loc))
    var_c = (1 + r2) / 2 - r1 ** 2
    var_s = (1 - r2) / 2
    assert ((c.mean(0) - r1).abs() <= 5 * torch.sqrt(var_c / N)).all()
    assert (s.mean(0).abs() <= 5 * torch.sqrt(var_s / N)).all()


def test_circular_uniform_samples():
    torch.manual_seed(4)
    x = nf.CircularUniform(2).double().sample(N)
    assert ((x >= -PI) & (x < PI)).all()
    assert (torch.cos(x).mean(0).abs() <= 5 * math.sqrt(0.5 / N)).all()
    assert (torch.sin(x).mean(0).abs() <= 5 * math.sqrt(0.5 / N)).all()
    assert _mean_ok(x, torch.zeros(2, dtype=F64), torch.full((2,), PI ** 2 / 3, dtype=F64))


def test_product_samples_blockwise():
    torch.manual_seed(5)
    base = nf.Product([nf.DiagGaussian(1, loc=3.0), nf.CircularUniform(1), nf.Uniform(1, 5.0, 6.0)])
    x = base.double().sample(N)
    assert x.shape == (N, 3)
    assert abs(x[:, 0].mean().item() - 3.0) <= 5 / math.sqrt(N)
    assert ((x[:, 1] >= -PI) & (x[:, 1] < PI)).all()
    assert ((x[:, 2] >= 5) & (x[:, 2] <= 6)).all()
    z, lp = base.sample_and_log_prob(10)
    assert torch.allclose(lp, base.log_prob(z))


# ------------------------------------------------------------------ dtype, grads, context
BASES = {
    "diag": lambda: nf.DiagGaussian(3, loc=0.5, scale=2.0),
    "diag-trainable": lambda: nf.DiagGaussian(3, trainable=True),
    "uniform": lambda: nf.Uniform(3, -1.0, 2.0),
    "vonmises": lambda: nf.VonMises(3, loc=0.3, concentration=2.0),
    "vonmises-trainable": lambda: nf.VonMises(3, trainable=True),
    "circular-uniform": lambda: nf.CircularUniform(3),
    "product": lambda: nf.Product([nf.DiagGaussian(2), nf.VonMises(1)]),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_to_float64_moves_every_tensor(name):
    base = BASES[name]().to(F64)
    tensors = list(base.parameters()) + list(base.buffers())
    assert all(t.dtype == F64 for t in tensors if t.is_floating_point())
    for m in base.modules():
        assert not [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    z = base.sample(6)
    assert z.dtype == F64 and base.log_prob(z).dtype == F64
    back = base.to(torch.float32)
    assert back.sample(2).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(BASES))
def test_unconditional_bases_reject_context(name):
    base = BASES[name]()
    z = base.sample(4)
    with pytest.raises(ValueError, match="unconditional"):
        base.log_prob(z, torch.randn(4, 2))
    with pytest.raises(ValueError, match="unconditional"):
        base.sample(4, torch.randn(4, 2))
    assert base.context_features is None


def test_trainable_bases_get_gradients_from_log_prob_and_samples():
    for base in (nf.DiagGaussian(2, trainable=True), nf.VonMises(2, trainable=True)):
        jitter_(base, 0.3, torch.Generator().manual_seed(0))
        base.log_prob(torch.randn(8, 2)).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in base.parameters())
    g = nf.DiagGaussian(2, trainable=True)
    g.sample(8).sum().backward()  # reparameterised
    assert g.loc.grad is not None and torch.allclose(g.loc.grad, torch.full((2,), 8.0))


def test_construction_errors():
    with pytest.raises(ValueError, match="scale must be positive"):
        nf.DiagGaussian(2, scale=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        nf.DiagGaussian(3, loc=[0.0, 1.0])
    with pytest.raises(ValueError, match="low < high"):
        nf.Uniform(2, low=1.0, high=1.0)
    with pytest.raises(ValueError, match="concentration"):
        nf.VonMises(2, concentration=-1.0)
    with pytest.raises(ValueError):
        nf.Product([])


def test_conditional_diag_gaussian():
    """The conditional base: log_prob is a Normal at the encoder's (loc, scale); it needs
    its context; it starts as N(0, I) for every context (zero last layer)."""
    base = nf.ConditionalDiagGaussian(2, 3, hidden_features=(8, 8)).double()
    c = torch.randn(5, 3, dtype=F64)
    z = torch.randn(5, 2, dtype=F64)
    assert torch.allclose(base.log_prob(z, c), _ind(td.Normal(torch.zeros(2, dtype=F64),
                                                               torch.ones(2, dtype=F64))).log_prob(z))
    jitter_(base, 0.3, torch.Generator().manual_seed(0))
    loc, log_scale = base._loc_log_scale(c)
    assert torch.allclose(base.log_prob(z, c), _ind(td.Normal(loc, log_scale.exp())).log_prob(z),
                          atol=1e-12)
    assert base.sample(5, c).shape == (5, 2)
    with pytest.raises(ValueError, match="context"):
        base.log_prob(z, None)
    with pytest.raises(ValueError, match=r"context.*3.*4"):
        base.log_prob(z, torch.randn(5, 4, dtype=F64))
