"""Bad input to transforms and conditioner networks called directly: a clear ValueError
naming what is wrong, where torch would fail deep inside or quietly truncate / promote."""

import math

import pytest
import torch

import normflux as nf
from normflux.nets import MADE, MLP


@pytest.mark.parametrize("make,match", [
    (lambda: nf.RQSpline(bins=2.7), "bins must be an integer"),
    (lambda: nf.RQSpline(tail_bound=math.inf), "tail_bound must be a finite number"),
    (lambda: nf.Affine(log_scale_bound=math.inf), "log_scale_bound must be a finite number"),
    (lambda: nf.ActNorm(2, min_std=-1), "min_std must be > 0"),
    (lambda: nf.BatchNorm(4, eps=-1), "eps must be > 0"),
    (lambda: nf.BatchNorm(4, momentum=2), "momentum must be <= 1"),
    (lambda: nf.LULinear(-1), "features must be >= 1"),
    (lambda: nf.ActNorm(0), "features must be >= 1"),
    (lambda: nf.Planar(-1), "features must be >= 1"),
    (lambda: nf.Radial(2.5), "features must be an integer"),
    (lambda: nf.Sylvester(4, reflections=-1), "reflections must be >= 1"),
    (lambda: nf.Sylvester(0), "features must be >= 1"),
    (lambda: nf.Permutation.random(-1), "features must be >= 1"),
    (lambda: nf.Permutation.reverse(0), "features must be >= 1"),
    (lambda: nf.CircularShift([nf.circle], shift=math.nan), "shift must be a finite number"),
    (lambda: nf.Coupling(nf.Affine(), features=4, hidden_features=(2.5,)),
     "hidden_features must be an integer"),
    (lambda: nf.Coupling(nf.Affine(), features=4, context_features=-1),
     "context_features must be >= 1"),
    (lambda: nf.MaskedAutoregressive(nf.Affine(), features=2.5), "features must be an integer"),
    (lambda: nf.MaskedAutoregressive(nf.Affine(), features=3, context_features=0),
     "context_features must be >= 1"),
    (lambda: nf.Planar(3, context_features=-2), "context_features must be >= 1"),
    (lambda: MLP(3, 2, ("64",)), "hidden_features must be an integer"),
    (lambda: MADE(3, 2, (16,), context_features=1.5), "context_features must be an integer"),
    # read as 3 and as a boolean mask before
    (lambda: nf.Coupling(nf.Affine(), mask="half", features=2.5), "features must be an integer"),
    (lambda: nf.RQSpline(min_bin_height="a"), "min_bin_height must be a finite number"),
    (lambda: nf.Permutation(3), r"the single number 3; .*Permutation.reverse\(features\)"),
    (lambda: nf.Coupling(nf.Affine(), mask=[0.0, 0.5, 0.0, 1.0]),
     r"mask entries must be booleans \(or 0 and 1\)"),
    # a conditioner or MADE of another context width: one direction ignored the context
    (lambda: nf.Coupling(nf.Affine(), MLP(2, 4, (8,), context_features=3), features=4,
                         context_features=2),
     "conditioner takes context_features=3 but the layer has context_features=2"),
    (lambda: nf.Coupling(nf.Affine(), MLP(2, 4, (8,), context_features=3), features=4),
     "conditioner takes context_features=3 but the layer has context_features=None"),
    (lambda: nf.MaskedAutoregressive(nf.Affine(), MADE(3, 2), features=3, context_features=2),
     "MADE takes context_features=None but the layer has context_features=2"),
    (lambda: nf.MaskedAutoregressive(nf.Affine(), MADE(3, 2, context_features=2), features=3),
     "MADE takes context_features=2 but the layer has context_features=None"),
])
def test_constructor_values_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("index", [[0, -1], [0, 3], [0.0, 1.0], [[0, 1]]])
def test_made_input_index_is_checked(index):
    # a negative entry counted from the end before
    with pytest.raises(IndexError, match=r"input_index must be a 1-D integer tensor of "
                       r"coordinates 0..2"):
        MADE(3, 2, input_index=torch.tensor(index))


def _layers():
    return [nf.Coupling(nf.RQSpline(), features=4, context_features=2),
            nf.MaskedAutoregressive(nf.Affine(), features=4, context_features=2),
            nf.Planar(4, context_features=2), nf.Sylvester(4, context_features=2)]


@pytest.mark.parametrize("i", range(4))
def test_input_and_context_dtype_named(i):
    """float64 data or context into a float32 layer: a ValueError naming both dtypes (torch
    would raise 'mat1 and mat2 must have the same dtype'); integers are refused too."""
    layer = _layers()[i]
    x, c = torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="float32 parameters but the input is torch.float64"):
        layer(x.double(), c)
    with pytest.raises(ValueError, match="float32 but the context is torch.float64"):
        layer(x, c.double())
    with pytest.raises(ValueError, match="floating-point input"):
        layer(x.long(), c)
    z, ladj = layer(x, c)  # the right dtypes still work, and after .double() float64 does
    z64, ladj64 = layer.double()(x.double(), c.double())
    assert z64.dtype == ladj64.dtype == torch.float64
    assert torch.allclose(z64.float(), z, atol=1e-5) and torch.allclose(ladj64.float(), ladj,
                                                                        atol=1e-4)


def test_layers_that_promoted_or_mixed_dtypes_now_refuse():
    """LULinear.inverse returned float32 for float64 input (8e-4 off the float64 result) and
    ActNorm returned a float64 output with a float32 ladj."""
    with pytest.raises(ValueError, match="float32 parameters but the input is torch.float64"):
        nf.LULinear(4).inverse(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 parameters but the input is torch.float64"):
        nf.ActNorm(4)(torch.randn(3, 4, dtype=torch.float64))


def test_one_d_context_message_says_one_d():
    layer = nf.Coupling(nf.Affine(), features=4, context_features=2)
    with pytest.raises(ValueError, match=r"1-D context of shape \(2,\); for one row use "
                                         r"context.reshape\(1, 2\)"):
        layer(torch.randn(3, 4), torch.randn(2))


def test_conditioner_networks_check_their_inputs():
    """MLP / MADE called directly: the widths and the context are checked (a conditional
    MADE used to ignore a missing context silently)."""
    mlp = MLP(3, 2, (4,), context_features=1)
    with pytest.raises(ValueError, match="MLP expects inputs with 3 features"):
        mlp(torch.zeros(5, 4), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="MLP is conditional"):
        mlp(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="context with 1 features"):
        mlp(torch.zeros(5, 3), torch.zeros(5, 2))
    assert mlp(torch.zeros(5, 3), torch.zeros(1, 1)).shape == (5, 2)  # a (1, C) context
    made = MADE(3, 2, (8,), context_features=2)
    with pytest.raises(ValueError, match="MADE is conditional"):
        made(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="MADE is unconditional"):
        MADE(3, 2, (8,))(torch.zeros(5, 3), torch.zeros(5, 2))
    assert made(torch.zeros(5, 3), torch.zeros(5, 2)).shape == (5, 3, 2)
    for net in (lambda: MLP(3, 2, ()), lambda: MADE(3, 2, ())):
        with pytest.raises(ValueError, match="at least one hidden layer"):
            net()
    with pytest.raises(ValueError, match="features must be >= 1, got 0"):
        MADE(0, 2, (8,))


def test_conditioners_of_the_wrong_kind_or_output_are_named():
    """A bijection or conditioner of the wrong kind fails at construction, and a
    conditioner output of the wrong shape at call time, naming the expected shape (torch
    said "shape '[5, 2, 2]' is invalid for input of size 15", or "'tuple' object has no
    attribute 'view'")."""
    with pytest.raises(TypeError, match="bijection must be a normflux Bijection"):
        nf.Coupling(None, features=4)
    with pytest.raises(TypeError, match="conditioner factory must return an nn.Module"):
        nf.Coupling(nf.Affine(), lambda *a: None, features=4)
    with pytest.raises(TypeError, match="conditioner must be None, an nn.Module or a factory"):
        nf.Coupling(nf.Affine(), 3, features=4)
    with pytest.raises(TypeError, match="made factory must return a MADE"):
        nf.MaskedAutoregressive(nf.Affine(), lambda *a: MLP(3, 6), features=3)
    x = torch.randn(5, 4)
    layer = nf.Coupling(nf.Affine(), MLP(2, 3, (8,)), mask="alternating", features=4)
    with pytest.raises(ValueError, match=r"conditioner must return a tensor of shape \(5, 4\) "
                       r".*2 x 2\) or \(5, 2, 2\), got \(5, 3\)"):
        layer(x)

    class Pair(torch.nn.Module):
        def forward(self, h):
            return h, h
    with pytest.raises(ValueError, match=r"shape \(5, 4\).*got tuple"):
        nf.Coupling(nf.Affine(), Pair(), mask="alternating", features=4)(x)

    class Shaped(torch.nn.Module):  # (batch, n_B, P) is accepted as well
        def __init__(self):
            super().__init__()
            self.net = MLP(2, 4, (8,), zero_init=False)

        def forward(self, h):
            return self.net(h).view(-1, 2, 2)
    shaped = nf.Coupling(nf.Affine(), Shaped(), mask="alternating", features=4)
    flat = nf.Coupling(nf.Affine(), shaped.conditioner.net, mask="alternating", features=4)
    assert torch.equal(shaped(x)[0], flat(x)[0])


@pytest.mark.parametrize("net", ["mlp", "made"])
def test_conditioner_networks_name_bad_shapes_types_and_dtypes(net):
    """MLP / MADE called directly: what torch reported as an expand, cat or view error, an
    AttributeError, or (int64 and float16 inputs beside a context, promoted by the concat)
    did not report at all, is named."""
    m = MLP(3, 4, (8,), context_features=2) if net == "mlp" else MADE(3, 2, (8,), 2)
    name = m.__class__.__name__
    x, c = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"leading dimensions are those of x.*\(5, 3\) and "
                       r"\(3, 2\)"):
        m(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"leading dimensions.*\(5, 3\) and \(1, 5, 2\)"):
        m(x, c[None])
    with pytest.raises(TypeError, match=f"{name} expects a torch.Tensor input, got list"):
        m(x.tolist(), c)
    with pytest.raises(TypeError, match=f"{name} expects a torch.Tensor context, got list"):
        m(x, c.tolist())
    for bad in (x.long(), x.half(), x.double()):
        with pytest.raises(ValueError, match=f"{name} has torch.float32 parameters but its "
                           f"input is {bad.dtype}"):
            m(bad, c)
    for bad in (c.long(), c.double()):
        with pytest.raises(ValueError, match=f"{name} has torch.float32 parameters but its "
                           rf"context is {bad.dtype}; convert one of them \(context.to"):
            m(x, bad)
    assert m(x, c[:1]).shape[0] == 5  # a (1, C) context broadcasts
    if net == "made":
        with pytest.raises(ValueError, match=r"MADE expects inputs of shape \(batch, 3\), got "
                           r"\(3,\)"):
            MADE(3, 2, (8,))(x[0])
    else:
        with pytest.raises(ValueError, match="leading dimensions"):
            MLP(0, 4, (8,), context_features=2)(torch.zeros(1, 5, 0), torch.zeros(1, 2))


def test_batchnorm_empty_batch_in_training():
    with pytest.raises(ValueError, match="non-empty batch"):
        nf.BatchNorm(4)(torch.randn(0, 4))


def test_dtype_cache_follows_conversions():
    """The cached parameter dtype is forgotten by .double() / .float(), also of members
    inside a Chain."""
    chain = nf.Chain([nf.LULinear(3), nf.Coupling(nf.Affine(), features=3)])
    x = torch.randn(4, 3)
    chain(x)
    chain.double()
    z, _ = chain(x.double())
    assert z.dtype == torch.float64
    with pytest.raises(ValueError, match="float64 parameters but the input is torch.float32"):
        chain(x)
    chain.float()
    assert chain(x)[0].dtype == torch.float32
