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

    def f(x, params):
        return _BoundedAffine.apply(x, params, 2.0)

    assert torch.autograd.gradcheck(f, (x, params))
    assert torch.autograd.gradgradcheck(f, (x, params))
    # the saved log-scale is an output: third derivatives go through it too
    assert torch.autograd.gradgradcheck(
        lambda x, p: torch.autograd.grad(f(x, p)[0].pow(2).sum(), p, create_graph=True)[0],
        (x, params))


@pytest.mark.parametrize("fused", [True, False])
def test_saved_activations(fused):
    """What the backward keeps: x and the log-scale s (fused) against x, tanh and exp(s)
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


def test_broadcast_parameters_keep_autograd_reduction():
    """Parameters shared over the batch (shape (1, n, 2)): gradients are summed over the
    batch once, as plain autograd does (the Function would double-count the ladj term)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    p1 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    bij = nf.Affine()
    y, s = bij(x, p1, bij.make_spec([nf.real] * 3))
    a = torch.autograd.grad(y.sum() + s.sum(), p1)[0]
    p2 = p1.detach().clone().requires_grad_()
    y2, s2 = _affine(x, p2[..., 0], p2[..., 1], 3.0)
    b = torch.autograd.grad(y2.sum() + s2.sum(), p2)[0]
    assert (a - b).abs().max() < 1e-12


def test_only_x_differentiable_and_forward_mode():
    import torch.autograd.forward_ad as fwAD
    bij = nf.Affine(2.0)
    spec = bij.make_spec([nf.real] * 3)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 3, 2, dtype=torch.float64)
    y, s = bij(x, p, spec)
    assert not s.requires_grad  # the ladj depends on the parameters only
    assert torch.autograd.gradgradcheck(lambda a: bij(a, p, spec), (x,))
    t = torch.randn_like(x)
    with fwAD.dual_level():
        yd, _ = bij(fwAD.make_dual(x.detach(), t), p, spec)
        ty = fwAD.unpack_dual(yd).tangent
    assert torch.allclose(ty, t * torch.exp(2.0 * torch.tanh(p[..., 1] / 2.0)), atol=1e-14)


def test_batched_vjps_and_params_only():
    """``is_grads_batched`` VJPs (the out-of-place backward) equal one VJP at a time, and a
    layer whose input needs no gradient still gives the parameters theirs."""
    x, params = _setup(3)
    bij = nf.Affine(2.0)
    spec = bij.make_spec([nf.real] * 3)
    y, s = bij(x, params, spec)
    gys, gss = torch.randn((4,) + y.shape, dtype=y.dtype), torch.randn((4,) + s.shape, dtype=s.dtype)
    batched = torch.autograd.grad((y, s), (x, params), (gys, gss), retain_graph=True,
                                  is_grads_batched=True)
    y_ref, s_ref = _affine(x, params[..., 0], params[..., 1], 2.0)
    for k in range(4):
        one = torch.autograd.grad((y_ref, s_ref), (x, params), (gys[k], gss[k]), retain_graph=True)
        for b, o in zip(batched, one):
            assert (b[k] - o).abs().max() < 1e-13
    x2 = x.detach()
    y2, s2 = bij(x2, params, spec)
    (g,) = torch.autograd.grad(y2.sum() + s2.sum(), params)
    (g_ref,) = torch.autograd.grad(y_ref.sum() + s_ref.sum(), params)
    assert (g - g_ref).abs().max() < 1e-13
