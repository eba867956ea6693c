"""The bounded affine map's fused Function equals its reference to every derivative order
and keeps one activation fewer than autograd would."""

import pytest
import torch

import normflux as nf
from normflux.transforms.bijections import _affine, _BoundedAffine


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    params = (3 * torch.randn(5, 3, 2, generator=g, dtype=torch.float64)).requires_grad_()
    return x, params


def test_values_bit_identical_and_gradients_match_reference():
    x, params = _setup()
    bij = nf.Affine(log_scale_bound=2.0)
    spec = bij.make_spec([nf.real] * 3)
    y, s = bij(x, params, spec)
    y_ref, s_ref = _affine(x, params[..., 0], params[..., 1], 2.0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    a = torch.autograd.grad((y, s), (x, params), (gy, gs))
    b = torch.autograd.grad((y_ref, s_ref), (x, params), (gy, gs))
    for u, v in zip(a, b):
        assert (u - v).abs().max() < 1e-13


def test_gradcheck_and_second_derivatives():
    x, params = _setup(1)

    def f(x, t, r):
        return _BoundedAffine.apply(x, t, r, 2.0)

    t = params[..., 0].detach().clone().requires_grad_()
    r = params[..., 1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, t, r))
    assert torch.autograd.gradgradcheck(f, (x, t, r))


@pytest.mark.parametrize("fused", [True, False])
def test_saved_activations(fused):
    """What the backward keeps: x and a copy of r (fused) against x, tanh and exp(s)
    (autograd through the reference), counted in elements of the saved tensors."""
    x, params = _setup(2)
    x = x.detach().float().requires_grad_()
    params = params.detach().float().requires_grad_()
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fused:
            nf.Affine(2.0)(x, params, nf.Affine(2.0).make_spec([nf.real] * 3))
        else:
            _affine(x, params[..., 0], params[..., 1], 2.0)
    assert sum(saved.values()) == (2 if fused else 3) * x.numel()
