"""Conditioner networks: the transposed output layout changes memory, not values."""

import pytest
import torch

from normflux.nets import MADE, MLP


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("context", [None, 3])
def test_mlp_transposed_output_same_values_and_gradients(residual, context):
    torch.manual_seed(0)
    plain = MLP(4, 6, (8, 8), context, residual=residual, zero_init=False).double()
    trans = MLP(4, 6, (8, 8), context, residual=residual, zero_init=False,
                transposed_output=True).double()
    trans.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    c = None if context is None else torch.randn(5, context, dtype=torch.float64)
    a, b = plain(x, c), trans(x, c)
    assert b.shape == (5, 6) and b.stride() == (1, 5)  # memory (out, batch)
    assert (a - b).abs().max() < 1e-14
    ga = torch.autograd.grad(a.square().sum(), list(plain.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(trans.parameters()))
    assert all((u - v).abs().max() < 1e-13 for u, v in zip(ga, gb))
    # other input ranks keep the usual layout and shapes
    x3 = torch.randn(2, 5, 4, dtype=torch.float64)
    c3 = None if context is None else torch.randn(2, 5, context, dtype=torch.float64)
    assert (trans(x3, c3) - plain(x3, c3)).abs().max() < 1e-14


def test_made_transposed_output_same_values():
    torch.manual_seed(1)
    plain = MADE(5, 3, (10, 10), 2, zero_init=False).double()
    trans = MADE(5, 3, (10, 10), 2, zero_init=False, transposed_output=True).double()
    trans.load_state_dict(plain.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    c = torch.randn(4, 2, dtype=torch.float64)
    a, b = plain(x, c), trans(x, c)
    assert b.shape == (4, 5, 3) and b.stride(0) == 1
    assert (a - b).abs().max() < 1e-14
    one = trans.sequential_params(c)(x, 2)
    assert one.stride(0) == 1  # memory (P, batch)
    assert (plain.sequential_params(c)(x, 2) - one).abs().max() < 1e-14
