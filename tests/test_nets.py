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


# ------------------------------------------------- the packed parameter and its one node
def _linear_stack(n_in, hidden, out, residual):
    """The nn.Linear layers an MLP draws its initial values from, in the same order."""
    widths = [n_in] + ([hidden[0]] * (2 * len(hidden) - 1) if residual else list(hidden))
    lins = [torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    return lins + [torch.nn.Linear(hidden[-1], out)]


@pytest.mark.parametrize("residual", [False, True])
def test_mlp_packs_the_initial_values_of_linear_layers(residual):
    torch.manual_seed(3)
    mlp = MLP(3, 5, (7, 7, 7), residual=residual, zero_init=False)
    torch.manual_seed(3)
    lins = _linear_stack(3, (7, 7, 7), 5, residual)
    assert [n for n, _ in mlp.named_parameters()] == ["packed"]
    assert mlp.packed.numel() == sum(p.numel() for m in lins for p in m.parameters())
    layers = mlp.linear_parameters()
    assert len(layers) == len(lins)
    for (w, b), lin in zip(layers, lins):
        assert torch.equal(w, lin.weight) and torch.equal(b, lin.bias)
    # the views write through to the network, and zero_init zeroes the last layer only
    x = torch.randn(4, 3)
    with torch.no_grad():
        layers[-1][1].fill_(2.5)
        layers[-1][0].zero_()
    assert torch.equal(mlp(x), torch.full((4, 5), 2.5))
    torch.manual_seed(3)
    zeroed = MLP(3, 5, (7, 7, 7), residual=residual)
    w, b = zeroed.linear_parameters()[-1]
    assert not w.any() and not b.any() and torch.equal(
        zeroed.packed[:-w.numel() - b.numel()], mlp.packed[:-w.numel() - b.numel()])


@pytest.mark.parametrize("residual", [False, True])
def test_mlp_loads_a_state_dict_of_the_former_layout(residual):
    """``body.0.weight`` ... ``head.bias`` (one nn.Linear per layer) load into ``packed``,
    also nested in a flow, and the network computes what the old layers computed."""
    import normflux as nf
    torch.manual_seed(0)
    lins = _linear_stack(2, (6, 6), 4, residual)
    names = (["body.0", "body.2.net.0", "body.2.net.2"] if residual else ["body.0", "body.2"])
    old = {f"{n}.{k}": v for n, lin in zip(names + ["head"], lins)
           for k, v in lin.state_dict().items()}
    mlp = MLP(2, 4, (6, 6), residual=residual)
    mlp.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    x = torch.randn(5, 2)
    h = torch.relu(lins[0](x))
    if residual:
        h = torch.relu(h + lins[2](torch.relu(lins[1](h))))
    else:
        h = torch.relu(lins[1](h))
    assert (mlp(x) - lins[-1](h)).abs().max() < 1e-6
    if not residual:  # nested: the prefix of the conditioner inside a flow
        flow = nf.Flow(nf.Coupling(nf.Affine(), features=4, hidden_features=(6, 6)),
                       nf.DiagGaussian(4))
        sd = {k: v for k, v in flow.state_dict().items() if not k.endswith("packed")}
        sd.update({f"transform.conditioner.{k}": v for k, v in old.items()})
        flow.load_state_dict(sd)
        assert torch.equal(flow.transform.conditioner.packed, mlp.packed)


@pytest.mark.parametrize("transposed", [False, True])
def test_relu_mlp_node_matches_autograd_to_second_order(transposed):
    """The one-node ReLU MLP (eager, with gradients) against the same layers recorded op
    by op: values, first derivatives of input and parameters, gradgradcheck, batched
    VJPs."""
    from normflux.nets.mlp import _ReluNet
    torch.manual_seed(2)
    mlp = MLP(3, 4, (6, 5), context_features=2, zero_init=False,
              transposed_output=transposed).double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 2, dtype=torch.float64)
    out = mlp(x, c)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_ReluNetBackward"
    ref = mlp._layers(torch.cat([x, c], -1), mlp.packed, transposed)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, (x, mlp.packed), g)
    b = torch.autograd.grad(ref, (x, mlp.packed), g)
    assert all((u - v).abs().max() < 1e-13 for u, v in zip(a, b))
    # the parameters alone (the input is data), and a second order
    xc = torch.cat([x, c], -1).detach()
    assert torch.autograd.gradcheck(lambda p: _ReluNet.apply(xc, mlp, transposed, None, p),
                                    (mlp.packed,))
    assert torch.autograd.gradgradcheck(lambda x, p: _ReluNet.apply(x, mlp, transposed, None, p),
                                        (xc.requires_grad_(), mlp.packed))
    v = torch.randn(3, *out.shape, dtype=torch.float64)
    (J,) = torch.autograd.grad(mlp(x, c), x, v, is_grads_batched=True)
    (Jr,) = torch.autograd.grad(mlp._layers(torch.cat([x, c], -1), mlp.packed, transposed),
                                x, v, is_grads_batched=True)
    assert (J - Jr).abs().max() < 1e-13


def test_relu_mlp_node_steps_aside_where_it_would_differ():
    """The one-node path only computes what the layers would: a replaced activation, a hook
    on one and autocast (bfloat16 activations beside float32 parameters) take the layers,
    with and without gradients alike; an input of another dtype is named."""
    torch.manual_seed(4)
    x = torch.randn(6, 3)
    mlp = MLP(3, 2, (8, 8), zero_init=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
        ref = mlp._layers(x, mlp.packed, False)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.float().sum(), mlp.packed)
    (g_ref,) = torch.autograd.grad(ref.float().sum(), mlp.packed)
    assert torch.equal(g, g_ref)
    calls = []
    mlp.acts[1].register_forward_hook(lambda *a: calls.append(1))
    mlp(x)
    assert calls == [1]
    mlp.acts[0] = torch.nn.Tanh()
    with torch.no_grad():
        a = mlp(x)
    assert torch.equal(a, mlp(x))
    with pytest.raises(ValueError, match="MLP has torch.float32 parameters but its input is "
                       "torch.float64"):
        MLP(3, 2, (8, 8))(x.double())


def test_old_layout_with_other_shapes_names_the_parameter():
    """A state dict of the former layout is checked layer by layer: the same total size in
    other shapes does not load silently, and the error names the key and both shapes."""
    torch.manual_seed(0)
    lins = _linear_stack(3, (6, 3), 2, False)
    old = {f"{n}.{k}": v for n, lin in zip(["body.0", "body.2", "head"], lins)
           for k, v in lin.state_dict().items()}
    mlp = MLP(3, 2, (4, 5))  # 53 numbers, as (6, 3)
    assert mlp.packed.numel() == sum(v.numel() for v in old.values())
    with pytest.raises(RuntimeError, match=r"size mismatch for body.0.weight: copying a param "
                       r"with shape \(6, 3\) from checkpoint, the shape in current model is "
                       r"\(4, 3\)") as err:
        mlp.load_state_dict(old)
    assert "Missing key" not in str(err.value)


def _made_layers(made, x, context=None):
    """A MADE's output through its modules, layer by layer (the path without the node)."""
    from normflux.nets.mlp import _linear_t
    h = made.hidden(x, context)
    w = made.head.weight * made.head.mask
    out = _linear_t(h, w, made.head.bias) if made.transposed_output else \
        torch.nn.functional.linear(h, w, made.head.bias)
    return out.view(x.shape[0], made.features, made.params_per_feature)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("context", [None, "rows", "one"])
def test_relu_made_node_matches_autograd_to_second_order(transposed, context):
    """The one-node masked ReLU MADE (eager, with gradients) against its layers recorded
    op by op: the same values, first derivatives of the input, every parameter and the
    context (one per row, or one broadcast row), masked weight gradients, gradgradcheck
    and batched VJPs."""
    torch.manual_seed(3)
    made = MADE(4, 3, (9, 7), context_features=None if context is None else 2,
                zero_init=False, transposed_output=transposed).double()
    with torch.no_grad():
        for p in made.parameters():
            p.normal_(0, 0.6)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    c = None if context is None else torch.randn(6 if context == "rows" else 1, 2,
                                                 dtype=torch.float64, requires_grad=True)
    out = made(x, c)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_ReluNetBackward"
    ref = _made_layers(made, x, c)
    assert torch.equal(out, ref)
    wrt = [x, *made.parameters()] + ([] if c is None else [c])
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, wrt, g)
    b = torch.autograd.grad(ref, wrt, g)
    assert all((u - v).abs().max() < 1e-13 for u, v in zip(a, b))
    for lin in (made.first, made.body[0], made.head):  # masked entries get no gradient
        (gw,) = torch.autograd.grad(made(x, c).sum(), lin.weight)
        assert gw[lin.mask == 0].abs().max() == 0 and gw[lin.mask == 1].abs().max() > 0
    params = tuple(made.parameters())

    def f(x, *p):
        return torch.func.functional_call(made, dict(zip(dict(made.named_parameters()), p)),
                                          (x, c))
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))
    v = torch.randn(3, *out.shape, dtype=torch.float64)
    (J,) = torch.autograd.grad(made(x, c), x, v, is_grads_batched=True)
    (Jr,) = torch.autograd.grad(_made_layers(made, x, c), x, v, is_grads_batched=True)
    assert (J - Jr).abs().max() < 1e-13


def test_relu_made_node_steps_aside_where_it_would_differ():
    """Residual blocks, a replaced activation, a hook on a masked layer and autocast take
    the layers; an input of another dtype than the parameters is named."""
    torch.manual_seed(5)
    x = torch.randn(5, 4, requires_grad=True)

    def node(made):
        return type(made(x).grad_fn.next_functions[0][0]).__name__ == "_ReluNetBackward"
    made = MADE(4, 2, (8, 8), zero_init=False)
    assert node(made)
    assert not node(MADE(4, 2, (8, 8), residual=True))
    calls = []
    handle = made.body[0].register_forward_hook(lambda *a: calls.append(1))
    assert not node(made) and calls == [1]
    handle.remove()
    made.body[1] = torch.nn.Tanh()
    assert not node(made)
    made = MADE(4, 2, (8, 8), zero_init=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = made(x), _made_layers(made, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    with pytest.raises(ValueError, match="MADE has torch.float32 parameters but its input "
                       "is torch.float64"):
        made(x.double())


@pytest.mark.parametrize("net", ["mlp", "made"])
@pytest.mark.parametrize("how", ["container hook", "global hook", "global pre-hook",
                                 "backward hook", "patched forward"])
def test_relu_node_steps_aside_for_every_hook_and_patch(net, how):
    """Whatever would run on the way through the layers (a hook on the MADE's ``body``
    container, a hook for every module, a full backward hook, an activation whose
    ``forward`` was patched on the instance) runs, and gives the same output, with and
    without gradients: the node steps aside for all of them."""
    torch.manual_seed(7)
    x = torch.randn(5, 4, requires_grad=True)
    m = (MLP(4, 6, (8, 8), zero_init=False) if net == "mlp"
         else MADE(4, 2, (8, 8), zero_init=False))
    act = m.acts[0] if net == "mlp" else m.act
    calls = []

    def double_it(mod, args, out):
        calls.append(type(mod).__name__)
        return 2 * out
    handles = []
    if how == "container hook":
        if net == "mlp":
            pytest.skip("an MLP's activations sit in a ModuleList, which is never called")
        handles.append(m.body.register_forward_hook(double_it))
    elif how == "global hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(double_it))
    elif how == "global pre-hook":
        handles.append(torch.nn.modules.module.register_module_forward_pre_hook(
            lambda mod, args: calls.append(type(mod).__name__)))
    elif how == "backward hook":
        handles.append(act.register_full_backward_hook(
            lambda mod, gi, go: calls.append("backward")))
    else:
        act.forward = lambda h: 3 * torch.relu(h)
    try:
        out = m(x)
        if how == "backward hook":
            out.sum().backward()
            assert calls == ["backward"]
        else:
            assert type(out.grad_fn).__name__ != "_ReluNetBackward"
            if how == "container hook":
                assert calls == ["Sequential"]
            elif how != "patched forward":  # the network's call and its layers' own
                assert len(calls) > 1
        with torch.no_grad():
            assert torch.equal(m(x), out)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("net", ["mlp", "made"])
def test_relu_node_on_large_layers_matches_the_layers(net):
    """Layers of at least 2^16 outputs take ``mm`` and an in-place bias in the node: values
    and gradients as the layers op by op (``addmm``), in float64 to 1e-12 relative."""
    torch.manual_seed(6)
    x = torch.randn(600, 16, dtype=torch.float64, requires_grad=True)
    if net == "mlp":
        m = MLP(16, 200, (128, 128), zero_init=False).double()
        out, ref = m(x), m._layers(x, m.packed, False)
    else:
        m = MADE(16, 12, (128, 128), zero_init=False).double()
        out, ref = m(x), _made_layers(m, x)
    assert type(out.grad_fn).__name__ == "_ReluNetBackward" or \
        type(out.grad_fn.next_functions[0][0]).__name__ == "_ReluNetBackward"
    assert ((out - ref).abs() / (1 + ref.abs())).max() < 1e-12
    wrt = [x, *m.parameters()]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert ((a - b).abs() / (1 + b.abs())).max() < 1e-12
