"""Conditioning everywhere: C11 and C12 with the full layer set, and a known conditional density."""

import math

import pytest
import torch
from helpers import jitter_

import normflux as nf


def _jitter(module, scale=0.1, seed=0):
    return jitter_(module, scale, torch.Generator().manual_seed(seed))


def _c11_flow(C=4, D=2):
    """C11's minimal model: conditional Gaussian base + [MAF(ctx), LU, AR-RQS(ctx), coupling RQS(ctx)]."""
    layers = [
        nf.MaskedAutoregressive(nf.Affine(), features=D, context_features=C),
        nf.LULinear(D),
        nf.MaskedAutoregressive(nf.RQSpline(8), features=D, context_features=C),
        nf.Coupling(nf.RQSpline(8), mask="alternating", features=D, context_features=C),
    ]
    return _jitter(nf.Flow(nf.Chain(layers), nf.ConditionalDiagGaussian(D, C)))


def test_c11_sample_log_prob_agreement_rows_and_context_use():
    torch.manual_seed(0)
    flow = _c11_flow()
    ctx = torch.randn(8, 4)
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(1, ctx)
        x, log_q = x[0], log_q[0]
        lp = flow.log_prob(x, ctx)
        assert (log_q - lp).abs().max() < 1e-4
        rows = torch.cat([flow.log_prob(x[i:i + 1], ctx[i:i + 1]) for i in range(8)])
        assert (rows - lp).abs().max() < 1e-5
        assert (flow.log_prob(x, ctx + 1) - lp).abs().max() > 1e-3


def test_c11_sample_shapes_round_trip_through_log_prob():
    flow = _c11_flow()
    with torch.no_grad():
        one = flow.sample(5, torch.randn(4))
        assert one.shape == (5, 2)
        ctx = torch.randn(3, 4)
        many, lq = flow.sample_and_log_prob(5, ctx)
        assert many.shape == (5, 3, 2) and lq.shape == (5, 3)
        assert (flow.log_prob(many, ctx) - lq).abs().max() < 1e-4
        d = flow(ctx)
        assert d.batch_shape == (3,) and d.event_shape == (2,)
        assert d.sample((7,)).shape == (7, 3, 2)


def test_c12_context_errors_name_the_sizes():
    flow = _c11_flow()
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"context.*4.*3|context.*3.*4"):
        flow.log_prob(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"context.*(8.*5|5.*8)"):
        flow.log_prob(x, torch.randn(5, 4))
    with pytest.raises((ValueError, TypeError), match="context"):
        flow.log_prob(x)
    # sample with a (5, 4) context returns (8, 5, 2) by the documented broadcasting
    assert flow.sample(8, torch.randn(5, 4)).shape == (8, 5, 2)
    with pytest.raises(ValueError, match="context"):
        flow.sample(8, torch.randn(5, 3))
    uncond = nf.Flow(nf.LULinear(2), nf.DiagGaussian(2))
    with pytest.raises(ValueError, match="context"):
        uncond.log_prob(x, torch.randn(8, 4))


@pytest.mark.parametrize("model", ["maf", "nsf-coupling", "planar"])
def test_fits_known_conditional_gaussian(model):
    """y | x ~ N(2x - 1, (0.5 + 0.5 x^2)^2 I_2): the fitted conditional density has small KL.

    KL(p(.|x) || q(.|x)) averaged over x ~ N(0, 1) is estimated with exact samples of p.
    Reference run (seed 0, this budget): maf 0.040, nsf-coupling 0.008, planar 0.030 nats.
    A model that ignored x would pay at least the KL between p(y|x) and the best single
    Gaussian, which is far above 0.1 here (the conditional mean moves by 2 per unit x).
    """
    torch.manual_seed(0)
    D, C = 2, 1

    def sample(n):
        x = torch.randn(n, C)
        loc = 2 * x - 1
        scale = 0.5 + 0.5 * x**2
        return loc + scale * torch.randn(n, D), x

    def log_p(y, x):
        loc, scale = 2 * x - 1, 0.5 + 0.5 * x**2
        return (-0.5 * ((y - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)

    if model == "maf":
        layers = [nf.MaskedAutoregressive(nf.Affine(), features=D, context_features=C,
                                          hidden_features=(32, 32)) for _ in range(3)]
    elif model == "nsf-coupling":
        layers = []
        for i in range(4):
            layers.append(nf.Coupling(nf.RQSpline(8, tail_bound=4.0), mask="alternating",
                                      features=D, flip=i % 2 == 1, context_features=C,
                                      hidden_features=(32, 32)))
    else:
        layers = [nf.Planar(D, context_features=C) for _ in range(4)]
    flow = nf.Flow(nf.Chain(layers), nf.ConditionalDiagGaussian(D, C, hidden_features=(32, 32)))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(600):
        y, x = sample(256)
        loss = flow.forward_kld(y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y, x = sample(20000)
        kl = (log_p(y, x) - flow.log_prob(y, x)).mean()
    assert kl < 0.1, float(kl)
