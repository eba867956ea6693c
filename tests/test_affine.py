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


# --------------------------------------- the coupling layer's one-node step (C kernel or ops)
from normflux.transforms import native, native_affine  # noqa: E402
from normflux.transforms.bijections import _affine_coupling, _AffineCoupling  # noqa: E402


@pytest.fixture(params=["kernel", "tensor ops"])
def coupling_backend(request, monkeypatch):
    if request.param == "kernel":
        if not native.available():
            pytest.skip("no C kernel (no compiler)")
    else:
        monkeypatch.setattr(native_affine, "usable", lambda *tensors: False)
    return request.param


def _split_path(layer, x):
    """The layer's forward through the generic split / forward / merge path."""
    fused = layer.bijection.fused_coupling
    layer.bijection.fused_coupling = lambda: None
    try:
        return layer(x)
    finally:
        layer.bijection.fused_coupling = fused


def _assert_fused_matches_split(layer, x, params):
    """Values and gradients (input and ``params(layer)``) of ``layer`` through its fused
    node against its split path: to 1e-12 relative in float64, and in float32 no further
    from the float64 result than the split path itself."""
    batch = x.shape[0]
    gy, gl = torch.randn_like(x), torch.randn(batch, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        layer.to(dtype)
        xd = x.to(dtype).requires_grad_()
        for name, run in (("fused", layer), ("split", lambda v: _split_path(layer, v))):
            y, ladj = run(xd)
            assert y.shape == x.shape and ladj.shape == (batch,) and y.dtype == dtype
            grads = torch.autograd.grad((y, ladj), [xd, *params(layer)],
                                        (gy.to(dtype), gl.to(dtype)))
            results[name, dtype] = [t.double() for t in (y, ladj, *grads)]
    for a, b in zip(results["fused", torch.float64], results["split", torch.float64]):
        assert ((a - b).abs() / (1 + b.abs())).max() < 1e-12
    for a, b, ref in zip(results["fused", torch.float32], results["split", torch.float32],
                         results["split", torch.float64]):
        scale = 1 + ref.abs()
        err_fused, err_split = ((a - ref).abs() / scale).max(), ((b - ref).abs() / scale).max()
        assert err_fused <= max(2 * err_split, 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("mask,features", [("alternating", 2), ("alternating", 7),
                                           ("half", 6), ("random", 9)])
@pytest.mark.parametrize("flip", [False, True])
def test_fused_coupling_matches_the_split_path(coupling_backend, mask, features, flip):
    """Values and gradients (input and conditioner) of ``Coupling(Affine)`` through the
    fused node equal those of the split path: to 1e-12 relative in float64, and in
    float32 no further from the float64 result than the split path itself."""
    torch.manual_seed(features)
    layer = nf.Coupling(nf.Affine(2.0), mask=mask, features=features, flip=flip,
                        hidden_features=(16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.conditioner.packed.normal_(0, 0.7)
    x = 2 * torch.randn(300, features, dtype=torch.float64)
    _assert_fused_matches_split(layer, x, lambda layer: [layer.conditioner.packed])


def test_fused_coupling_second_order_and_batched(coupling_backend):
    """Second derivatives (``create_graph``) and batched VJPs of the closed form; the
    input may be a strided view, and data without gradient gets none."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = wide[:, ::2].requires_grad_()  # (6, 5), not contiguous
    params = (2 * torch.randn(6, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    cols = torch.tensor([3, 1])

    def f(x, p):
        return _AffineCoupling.apply(x, p, cols, 1.5)

    assert torch.autograd.gradcheck(f, (x, params))
    assert torch.autograd.gradgradcheck(f, (x, params))
    # the coupling's outputs alone (the log-scales unused: no gradient reaches them)
    assert torch.autograd.gradgradcheck(lambda x, p: f(x, p)[:2], (x, params))
    y, ladj, s = f(x, params)
    yr, lr, sr = _affine_coupling(x, params, cols, 1.5)
    assert (y - yr).abs().max() < 1e-13 and (ladj - lr).abs().max() < 1e-13
    assert (s - sr).abs().max() < 1e-13
    v = torch.randn(4, 6, 5, dtype=torch.float64)
    (J,) = torch.autograd.grad(y, params, v, is_grads_batched=True)
    (Jr,) = torch.autograd.grad(yr, params, v, is_grads_batched=True)
    assert (J - Jr).abs().max() < 1e-13
    # the first layer of a flow: the data needs no gradient
    y, ladj, _ = f(x.detach(), params)
    yr, lr, _ = _affine_coupling(x.detach(), params, cols, 1.5)
    (gp,) = torch.autograd.grad((y.sum() + ladj.sum()), (params,))
    (gr,) = torch.autograd.grad((yr.sum() + lr.sum()), (params,))
    assert (gp - gr).abs().max() < 1e-13
    assert _AffineCoupling.apply(x[:0], params[:0], cols, 1.5)[0].shape == (0, 5)


def test_fused_coupling_keeps_no_more_than_the_split_path():
    """What the one-node step keeps for the backward: ``x`` (whose storage the
    conditioner's input view keeps anyway) and one log-scale per transformed element."""
    torch.manual_seed(0)
    layer = nf.Coupling(nf.Affine(), features=5, hidden_features=(8, 8))  # 2 transformed
    x = torch.randn(50, 5, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, ladj = layer(x)
    assert sum(t.shape == (50, 2) for t in kept) == 1  # s
    assert not any(t.shape in ((50, 2, 2), (50, 4)) for t in kept)  # nor the parameters


def test_fused_coupling_under_autocast_matches_the_split_path():
    """CPU autocast hands the coupling bfloat16 parameters beside a float32 input: the one
    node takes its tensor ops (the kernel needs one dtype) and agrees with the split path."""
    torch.manual_seed(0)
    layer = nf.Coupling(nf.Affine(), features=4, hidden_features=(16, 16))
    x = torch.randn(5000, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, ladj0 = layer(x)  # zero-initialised: the identity
        assert not ladj0.any()
        layer.conditioner.packed.normal_(0, 0.5)
        y, ladj = layer(x)
        y_split, ladj_split = _split_path(layer, x)
    assert torch.equal(y, y_split) and torch.equal(ladj, ladj_split)


@pytest.mark.parametrize("features,batch", [(1, 40), (7, 300), (16, 1024), (1100, 3)])
def test_fused_autoregressive_matches_forward_and_sum(coupling_backend, features, batch):
    """``MaskedAutoregressive(Affine)`` takes the fused node with every column (the
    kernel's contiguous loops, in blocks of whole rows; beyond 1024 columns its loops over
    rows): values and gradients (input and MADE) equal those of ``Affine.forward`` and the
    sum of ``ladj``, to 1e-12 relative in float64, and in float32 no further from the
    float64 result than that path itself."""
    torch.manual_seed(features)
    layer = nf.MaskedAutoregressive(nf.Affine(2.0), features=features, hidden_features=(24,))
    with torch.no_grad():
        for p in layer.made.parameters():
            p.normal_(0, 0.6)
    x = 2 * torch.randn(batch, features, dtype=torch.float64)
    _assert_fused_matches_split(layer, x, lambda layer: list(layer.made.parameters()))
    if coupling_backend == "kernel":
        y, ladj = layer(x.float())
        assert type(ladj.grad_fn).__name__ == "_AffineCouplingBackward"
