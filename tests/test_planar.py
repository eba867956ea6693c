"""Planar, radial and Sylvester flows: harness, invertibility constraint, VI use."""

import pytest
import torch
from helpers import jitter_

import normflux as nf
from normflux.testing import check_transform


def _jitter(module, scale=0.5, seed=0):
    return jitter_(module, scale, torch.Generator().manual_seed(seed))


CASES = {
    "planar": lambda c: nf.Planar(3, context_features=c),
    "radial": lambda c: nf.Radial(3, context_features=c),
    "sylvester-orthogonal": lambda c: nf.Sylvester(3, rank=2, context_features=c),
    "sylvester-householder": lambda c: nf.Sylvester(3, reflections=2, context_features=c),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ctx", [None, 2])
def test_harness(name, ctx):
    torch.manual_seed(0)
    t = _jitter(CASES[name](ctx)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    c = torch.randn(6, 2, dtype=torch.float64) if ctx else None
    check_transform(t, x, c)


def test_planar_constraint_keeps_invertible_for_adversarial_u():
    """With w.u << -1 the raw map folds; u_hat restores w.u_hat > -1 (paper's appendix A.1)."""
    t = nf.Planar(2).double()
    with torch.no_grad():
        t.w.value.copy_(torch.tensor([1.0, 0.0]))
        t.u.value.copy_(torch.tensor([-5.0, 0.0]))
    u, w, _ = t._params(None, 1)
    assert (u * w).sum() > -1
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)[:, None].expand(-1, 2).contiguous()
    z, l = t(x)
    xr, _ = t.inverse(z)
    assert (xr - x).abs().max() < 1e-10
    assert torch.all(torch.diff(z[:, 0]) > 0)  # monotone along w


def test_planar_flow_fits_a_gaussian_by_reverse_kl():
    """A stack of planar layers over N(0, I) learns a shifted, scaled Gaussian."""
    torch.manual_seed(0)
    target_loc = torch.tensor([1.0, -0.5])
    target = torch.distributions.Independent(torch.distributions.Normal(target_loc, 0.7), 1)
    flow = nf.Flow(nf.Chain([nf.Planar(2) for _ in range(8)]), nf.DiagGaussian(2, trainable=True))
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(400):
        loss = flow.reverse_kld(target, 256)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, lq = flow.sample_and_log_prob(20000)
        kl = (lq - target.log_prob(x)).mean()
    assert kl < 0.02
    assert torch.allclose(x.mean(0), target_loc, atol=0.05)
