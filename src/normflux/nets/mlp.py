"""Conditioner networks."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import context_width, integer
from .._tracing import is_compiling
from ..transforms._first_order import reference_backward, reference_grads, use_reference
from . import native_made

__all__ = ["MLP"]


class MLP(nn.Module):
    """Multi-layer perceptron used as a conditioner, optionally residual and conditional.

    ``MLP(in_features, out_features, hidden_features=(64, 64))`` maps ``(batch, in)`` to
    ``(batch, out)``; with ``context_features=C`` the context ``(batch, C)`` is
    concatenated to the input. With ``residual=True`` the hidden layers are residual
    blocks of constant width, ``h <- act(h + L2(act(L1(h))))`` (He et al. 2016; the
    ResNet conditioner of Durkan et al. 2019). ``zero_init=True`` zeroes the last layer,
    so that a coupling or autoregressive layer starts as the identity.

    All weights and biases live in one parameter, :attr:`packed` (layer by layer from
    the input, each weight ``(out, in)`` row-major, then its bias), so that an optimizer
    step updates one tensor per network instead of two per layer: with PyTorch's default
    (per-tensor) Adam on a CPU that is about a fifth of the optimizer's cost for two hidden
    layers (B4 of the speed suite, ``benchmarks/suite.py``: 2.3 ms -> 0.5 ms per step).
    :meth:`linear_parameters` gives each layer's ``(weight, bias)`` as views of it. The
    initial values are those of ``nn.Linear`` (drawn in the same order), and a state
    dict saved before this layout (``body.0.weight``, ..., ``head.bias``) still loads
    (activations with parameters of their own, such as ``nn.PReLU``, excepted).

    Arguments:
        in_features: input width (may be 0 when only a context is seen).
        out_features: output width.
        hidden_features: hidden widths; with ``residual`` all must be equal.
        context_features: context width, or ``None``.
        activation: activation module class (default ``nn.ReLU``), one instance per use.
        residual: use residual blocks (two linear layers each).
        zero_init: zero the output layer's weight and bias.
        transposed_output: compute the output layer as ``W h^T + b`` and return its
            transpose: the same values and shape, in memory layout ``(out, batch)``.
            Spline layers read their parameters from this layout without a copy (see
            :func:`~normflux.transforms.fused_spline.fused_rq_spline`). Applies to a
            ``(batch, in)`` input only, and not when ``torch.compile`` traces a
            differentiable pass (see :func:`use_transposed_output`).

    Shapes:
        ``forward(x (batch, in), context (batch, C) or (1, C)) -> (batch, out)``.

    Raises:
        ValueError: widths that are not integers >= 1 (``in_features`` may be 0), no
            hidden layer, no input at all (``in_features = 0`` without a context), ``context_features``
            neither ``None`` nor an integer >= 1, or unequal widths with ``residual``.
    """

    def __init__(self, in_features: int, out_features: int,
                 hidden_features: Sequence[int] | int = (64, 64),
                 context_features: int | None = None, activation: type[nn.Module] = nn.ReLU,
                 residual: bool = False, zero_init: bool = True, transposed_output: bool = False):
        super().__init__()
        if isinstance(hidden_features, int):
            hidden_features = (hidden_features, hidden_features)
        hidden_features = tuple(integer("hidden_features", h, minimum=1) for h in hidden_features)
        in_features = integer("in_features", in_features, minimum=0)
        out_features = integer("out_features", out_features, minimum=1)
        if not hidden_features:
            raise ValueError("MLP needs at least one hidden layer, got hidden_features=()")
        if residual and len(set(hidden_features)) != 1:
            raise ValueError("a residual MLP needs equal hidden widths, got "
                             f"{hidden_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.context_features = context_features = context_width(context_features)
        self.transposed_output = bool(transposed_output)
        self.residual = bool(residual)
        n_in = in_features + (context_features or 0)
        if n_in < 1:
            raise ValueError("MLP has neither input features nor context")
        # The layers as nn.Linear modules under their former names (the initial values,
        # and the keys of state dicts saved before the packed layout), in the order of use.
        widths = [n_in] + list(hidden_features) if not residual else \
            [n_in] + [hidden_features[0]] * (2 * len(hidden_features) - 1)
        names = ["body.0"] + ([f"body.{k}.net.{j}" for k in range(2, len(hidden_features) + 1)
                               for j in (0, 2)] if residual else
                              [f"body.{2 * k}" for k in range(1, len(hidden_features))])
        linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
        linears.append(nn.Linear(hidden_features[-1], out_features))
        names.append("head")
        if zero_init:
            nn.init.zeros_(linears[-1].weight)
            nn.init.zeros_(linears[-1].bias)
        self._shapes = [tuple(lin.weight.shape) for lin in linears]
        self._sizes = [n for a, b in self._shapes for n in (a * b, a)]
        self._legacy_keys = [f"{n}.{w}" for n in names for w in ("weight", "bias")]
        self.packed = nn.Parameter(torch.cat([p.detach().reshape(-1) for lin in linears
                                              for p in (lin.weight, lin.bias)]))
        n_act = len(hidden_features) if not residual else 2 * len(hidden_features) - 1
        self.acts = nn.ModuleList(activation() for _ in range(n_act))

    def linear_parameters(self) -> list[tuple[Tensor, Tensor]]:
        """``[(weight (out, in), bias (out,)), ...]`` of the linear layers, input to output
        (a residual block's two layers in turn): views of :attr:`packed`, so that writes
        under ``torch.no_grad()`` change the network and gradients flow to :attr:`packed`."""
        return _unpack(self.packed, self._sizes, self._shapes)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(..., in)`` (+ context ``(..., C)``, where a leading dimension of 1 broadcasts)
        -> ``(..., out)``.

        Raises:
            TypeError: ``x`` or the context is not a tensor.
            ValueError: see :func:`check_net_input` (widths, a context where none is
                expected or none where one is, shapes and batches, dtypes of ``x`` and of
                the context against the parameters').
        """
        check_net_input("MLP", x, self.in_features, context, self.context_features,
                        self.packed.dtype)
        if context is not None:
            if context.shape[:-1] != x.shape[:-1]:
                context = context.expand(*x.shape[:-1], -1)
            x = torch.cat([x, context], dim=-1) if self.in_features else context
        transposed = use_transposed_output(self) and x.dim() == 2
        if self._plain_relu() and use_relu_node(x, self.acts):
            return _ReluNet.apply(x, self, transposed, None, self.packed)
        return self._layers(x, self.packed, transposed)

    def _plain_relu(self) -> bool:
        """Whether :class:`_ReluNet` can compute this network: no residual blocks, and
        every activation a plain ``nn.ReLU`` (one may have been replaced)."""
        return not self.residual and all(type(a) is nn.ReLU for a in self.acts)

    # the network as :class:`_ReluNet` sees it
    def _relu_layers(self, params):
        return _unpack(params[0], self._sizes, self._shapes)

    def _relu_grads(self, params):
        g_packed = torch.empty_like(params[0])
        return (g_packed,), _unpack(g_packed, self._sizes, self._shapes)

    def _relu_finish(self, g_layers):
        pass

    def _layers(self, x: Tensor, packed: Tensor, transposed: bool) -> Tensor:
        """The network on ``(..., in + C)`` inputs, with plain differentiable ops on the
        parameters ``packed`` (any activations and residual blocks)."""
        layers = _unpack(packed, self._sizes, self._shapes)
        acts = list(self.acts)
        h = acts[0](F.linear(x, *layers[0]))
        if self.residual:
            for k in range(1, len(layers) - 1, 2):
                inner = acts[k](F.linear(h, *layers[k]))
                h = acts[k + 1](h + F.linear(inner, *layers[k + 1]))
        else:
            for act, (w, b) in zip(acts[1:], layers[1:-1]):
                h = act(F.linear(h, w, b))
        return _linear_t(h, *layers[-1]) if transposed else F.linear(h, *layers[-1])

    def extra_repr(self) -> str:
        widths = " -> ".join(str(w) for w in [self._shapes[0][1]] + [a for a, _ in self._shapes])
        return f"{widths}{', residual' if self.residual else ''}, packed={self.packed.numel()}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a state dict of the former layout (one nn.Linear per layer): pack it, after the
        # shape check each of those parameters had
        old = [prefix + k for k in self._legacy_keys]
        packed_key = prefix + "packed"
        legacy = packed_key not in state_dict and all(k in state_dict for k in old)
        if legacy:
            tensors = [state_dict.pop(k) for k in old]
            shapes = [shape for w, b in self._shapes for shape in ((w, b), (w,))]
            bad = [(k, tuple(t.shape), shape) for k, t, shape in zip(old, tensors, shapes)
                   if tuple(t.shape) != shape]
            for k, got, want in bad:
                error_msgs.append(f"size mismatch for {k}: copying a param with shape "
                                  f"{got} from checkpoint, the shape in current model is {want}.")
            if not bad:
                state_dict[packed_key] = torch.cat([t.reshape(-1) for t in tensors])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if legacy and packed_key in missing_keys:  # reported as the size mismatches
            missing_keys.remove(packed_key)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (it hands the layers other dtypes)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _unpack(packed: Tensor, sizes: list[int], shapes: list[tuple[int, int]]
            ) -> list[tuple[Tensor, Tensor]]:
    """The ``(weight, bias)`` views of a packed parameter vector (see :class:`MLP`)."""
    parts = packed.split(sizes)
    return [(parts[2 * j].view(shape), parts[2 * j + 1]) for j, shape in enumerate(shapes)]


class _ReluNet(torch.autograd.Function):
    """A ReLU network on ``(batch, in)`` inputs as one autograd node, with a hand-written
    backward: ``(x, net, transposed, extra, *params) -> (batch, out)``, the layers
    ``h <- relu(h W^T + b)`` then ``h W^T + b`` of :func:`relu_reference` (``extra``, or
    ``None``, added to the first layer's pre-activation: a MADE's context term).

    ``net`` (an :class:`MLP` or a :class:`~normflux.nets.MADE`) says how its parameters
    ``params`` make the layers: ``net._relu_layers(params) -> [(weight, bias), ...]``
    (views of a packed vector, or masked weights ``W * M``), ``net._relu_grads(params) ->
    (grads, [(g_weight, g_bias), ...])``, buffers that the backward fills layer by layer,
    and ``net._relu_finish(g_layers)``, which turns those into the parameters' gradients
    (applies the masks) in place.

    Autograd would record a split or a mask product, a transpose, an ``addmm`` and a ReLU
    per layer, each a node with its own buffers; here the backward is the products ``g^T
    h``, ``g W`` and the ReLU masks alone, in place. Fixed costs dominate small networks
    (B4 of the speed suite, Real NVP with 16 networks 1-64-64-2 at batch 512: 0.3 ms of a
    9 ms train step); on wide ones the ReLUs run on data still in cache, in place (B2,
    five MADEs 16-128-128-32 at batch 1024: 6.97 against 7.85 ms for their forward and
    backward). Keeps the inputs and the hidden activations, as autograd would. A backward
    that must be differentiable (``create_graph=True``) or runs batched differentiates
    :func:`relu_reference` (:func:`reference_grads`); ``torch.func`` transforms,
    forward-mode AD (:func:`use_reference`) and ``torch.compile`` (whose inductor fuses
    the plain layers) never reach this node (see :func:`use_relu_node`)."""

    @staticmethod
    def forward(ctx, x, net, transposed, extra, *params):
        ctx.net, ctx.transposed, ctx.n_params = net, transposed, len(params)
        if getattr(net, "native", False):  # a MADE's masked layers in the C kernel
            out, hs = native_made.forward(x, net._native_layers(params), extra)
            # the masks, not the weight products: the backward multiplies by them again
            # (and an in-place change to one before it is the usual version error)
            ctx.save_for_backward(extra, *params, *net.masks, *hs)
            ctx.n_layers, ctx.n_masks = 0, len(net.masks)
            return out
        ctx.n_masks = 0
        layers = net._relu_layers(params)
        hs = [x]
        for j, (w, b) in enumerate(layers[:-1]):
            h = _affine_layer(hs[-1], w, b)
            if j == 0 and extra is not None:
                h.add_(extra)
            hs.append(h.relu_())
        ctx.save_for_backward(extra, *params, *[w for w, _ in layers], *hs)
        ctx.n_layers = len(layers)
        return _linear_t(hs[-1], *layers[-1]) if transposed else _affine_layer(
            hs[-1], *layers[-1])

    @staticmethod
    def backward(ctx, g):
        extra, *saved = ctx.saved_tensors
        n, L, n_masks = ctx.n_params, ctx.n_layers, ctx.n_masks
        params, weights = saved[:n], saved[n:n + L]
        masks, hs = saved[n + L:n + L + n_masks], saved[n + L + n_masks:]
        net = ctx.net
        if reference_backward(g):
            grads = reference_grads(
                lambda x, e, *p: (relu_reference(net._relu_layers(p), x, e, ctx.transposed),),
                (hs[0], extra, *params), (g,))
            return grads[0], None, None, *grads[1:]
        if n_masks:  # the C kernel's forward
            g_x, g_extra, g_params = native_made.backward(
                g, list(hs), list(zip(params[0::2], params[1::2], masks)),
                ctx.needs_input_grad[0], ctx.needs_input_grad[3])
            return g_x, None, None, g_extra, *g_params
        g_params, g_layers = net._relu_grads(params)
        g_x = g_extra = None
        for j in range(len(weights) - 1, -1, -1):
            torch.mm(g.t(), hs[j], out=g_layers[j][0])
            torch.sum(g, 0, out=g_layers[j][1])
            if j:  # the gradient of the layer's input, through the ReLU that made it, in
                # place: the node keeps its saved activations until it returns, so every
                # extra buffer here would add to the step's peak memory
                g = g.mm(weights[j])
                _threshold_backward_(g, hs[j], 0, grad_input=g)
            else:
                if ctx.needs_input_grad[3]:
                    g_extra = g
                if ctx.needs_input_grad[0]:
                    g_x = g.mm(weights[0])
        net._relu_finish(g_layers)
        return g_x, None, None, g_extra, *g_params


#: outputs of at least this many entries take ``mm`` then the bias, in place (see below)
_LARGE_OUTPUT = 1 << 16


def _affine_layer(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h W^T + b``, as ``addmm`` computes it (bit for bit with the BLAS of PyTorch's CPU
    builds, which adds the bias after the product). ``addmm`` first copies the bias,
    broadcast, into its output; on large outputs (B2 of the speed suite: 1024 x 128) that
    write to a fresh buffer costs more than the product's own write followed by adding
    the bias to data still in cache (about 30 us each, ten per step), on small ones (B4:
    512 x 64) the second op costs more. On GPUs ``addmm`` (the bias in the product's
    epilogue)."""
    if h.device.type == "cpu" and h.shape[0] * w.shape[0] >= _LARGE_OUTPUT:
        return torch.mm(h, w.t()).add_(b)
    return torch.addmm(b, h, w.t())


def relu_reference(layers: list[tuple[Tensor, Tensor]], x: Tensor, extra: Tensor | None,
                   transposed: bool) -> Tensor:
    """The network of :class:`_ReluNet` with plain differentiable ops: ``layers`` ``[(weight
    (out, in), bias (out,)), ...]``, ``x`` ``(batch, in)``, ``extra`` ``(batch, H)`` or
    ``None`` (added before the first ReLU) -> ``(batch, out)``."""
    h = x
    for j, (w, b) in enumerate(layers[:-1]):
        h = F.linear(h, w, b)
        if j == 0 and extra is not None:
            h = h + extra
        h = torch.relu(h)
    return _linear_t(h, *layers[-1]) if transposed else F.linear(h, *layers[-1])


def use_relu_node(x: Tensor, modules) -> bool:
    """Whether :class:`_ReluNet` computes a network on ``x`` now: eager, with gradients,
    ``x`` of shape ``(batch, in)``, no fused-Function exception (:func:`use_reference`),
    no autocast (it hands the layers other dtypes), each of ``modules`` (the network's
    submodules) :func:`plain_module`, and no global module hook (a hook sees each
    layer's input and output, which the node never makes)."""
    return (x.dim() == 2 and torch.is_grad_enabled() and not is_compiling()
            and not use_reference() and not _autocast(x)
            and all(plain_module(m) for m in modules) and not _global_module_hooks())


def plain_module(m: nn.Module) -> bool:
    """Whether a submodule of a network may be skipped by :class:`_ReluNet`: no forward,
    forward-pre, backward or backward-pre hook, and no ``forward`` of its own instance
    (a patched method), which the plain layers would call."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or "forward" in m.__dict__)


_MODULE = torch.nn.modules.module
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _global_module_hooks() -> bool:
    """Whether a hook for every module is registered (``register_module_forward_hook``
    and the like; the registries are looked up at each call, in case torch rebinds them)."""
    return any(getattr(_MODULE, name, None) for name in _GLOBAL_HOOKS)


_threshold_backward_ = torch.ops.aten.threshold_backward.grad_input


def check_net_input(owner: str, x: Tensor, in_features: int, context: Tensor | None,
                    context_features: int | None, dtype: torch.dtype | None = None) -> None:
    """Checks of a conditioner network's input and context (shapes and dtypes: free under
    compile).

    Arguments:
        owner: the network's name, for the messages.
        x: ``(..., in_features)``.
        in_features, context_features: the widths the network expects.
        context: ``None`` or ``(..., C)`` with the leading dimensions of ``x``, where a
            dimension of 1 broadcasts.
        dtype: the parameters' dtype, which ``x`` and the context must have; ``None``
            skips that check (autocast, which hands layers other dtypes).

    Raises:
        TypeError: ``x`` or the context is not a tensor.
        ValueError: ``x`` without ``in_features`` columns in its last dimension; a context
            for a network without one, none for one with one, a context without
            ``context_features`` columns or whose leading dimensions are neither those of
            ``x`` nor 1 (``(batch, C)`` or ``(1, C)`` for ``x`` of shape ``(batch, in)``);
            ``x`` or the context not of ``dtype``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{owner} expects inputs with {in_features} features in the last "
                         f"dimension, got shape {tuple(x.shape)}")
    if context_features is None:
        if context is not None:
            raise ValueError(f"{owner} is unconditional but a context "
                             f"{_shape_of(context)} was passed")
    elif context is None:
        raise ValueError(f"{owner} is conditional and expects a context with "
                         f"{context_features} features, got context=None")
    elif not isinstance(context, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor context, got {type(context).__name__}")
    elif context.dim() == 0 or context.shape[-1] != context_features:
        raise ValueError(f"{owner} expects a context with {context_features} features in the "
                         f"last dimension, got shape {tuple(context.shape)}")
    elif context.dim() != x.dim() or any(c not in (1, n) for c, n in
                                         zip(context.shape[:-1], x.shape[:-1])):
        raise ValueError(f"{owner} expects a context whose leading dimensions are those of x "
                         f"(or 1): x of shape (batch, {in_features}) and a context of shape "
                         f"(batch, {context_features}) or (1, {context_features}), got "
                         f"{tuple(x.shape)} and {tuple(context.shape)}")
    if dtype is not None:
        check_net_dtype(owner, x, dtype)
        if context is not None:
            check_net_dtype(owner, context, dtype, "context")


def _shape_of(t) -> str:
    return f"of shape {tuple(t.shape)}" if isinstance(t, Tensor) else f"({type(t).__name__})"


def check_net_dtype(owner: str, x: Tensor, dtype: torch.dtype, what: str = "input") -> None:
    """A conditioner network's input (or context: ``what``) against its parameters'
    ``dtype``.

    Raises:
        ValueError: ``x`` of another dtype, naming both and the two conversions.
    """
    if x.dtype != dtype:
        name = "x" if what == "input" else what
        raise ValueError(f"{owner} has {dtype} parameters but its {what} is {x.dtype}; "
                         f"convert one of them ({name}.to({dtype}) or the network's "
                         f".to({x.dtype}))")


def _linear_t(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear(h, weight, bias)`` computed as ``(W h^T + b)^T``: memory ``(out, batch)``.

    The bias is added after the product: ``addmm`` would first copy it, broadcast along
    the rows' inner axis, into the output, which is several times slower (B1 of the speed
    suite: 0.35 ms per step)."""
    if bias is None:
        return torch.mm(weight, h.t()).t()
    return torch.mm(weight, h.t()).add_(bias[:, None]).t()


def use_transposed_output(net: nn.Module) -> bool:
    """Whether ``net`` (an :class:`MLP` or MADE) emits its transposed output now.

    Its ``transposed_output`` flag, except while ``torch.compile`` traces a pass with
    gradients: there inductor's backward kernels run much faster on the usual layout,
    while compiled sampling gains from the transposed one (measured on B1 of the speed
    suite, ``benchmarks/suite.py --compile``).
    """
    return net.transposed_output and (not is_compiling() or not torch.is_grad_enabled())
