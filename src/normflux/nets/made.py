"""MADE: masked autoencoder for distribution estimation (Germain et al., ICML 2015)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import context_width, integer
from . import native_made
from .mlp import (
    _autocast,
    _linear_t,
    _ReluNet,
    check_net_input,
    plain_module,
    use_relu_node,
    use_transposed_output,
)

__all__ = ["MADE", "MaskedLinear", "autoregressive_order"]


def autoregressive_order(order: str | Sequence[int] | Tensor, features: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """Degrees ``1..D`` of the ``D`` inputs: input ``i`` is generated ``order[i]``-th.

    Arguments:
        order: ``"sequential"`` (1, 2, ..., D), ``"reversed"`` (D, ..., 1), ``"random"``
            (a random permutation from ``generator``), or explicit degrees (a permutation
            of ``1..D``).
        features: ``D >= 1``.
        generator: random generator for ``"random"``.

    Returns:
        ``(D,)`` long tensor of degrees, a permutation of ``1..D`` (the input ordering
        ``m^0`` of Germain et al. 2015, section 4; ``"random"`` is one draw of the
        order-agnostic training of section 4.3, fixed afterwards).

    Raises:
        ValueError: unknown order name, or explicit degrees that are not a permutation of
            ``1..D``.
    """
    if isinstance(order, str):
        if order == "sequential":
            return torch.arange(1, features + 1)
        if order == "reversed":
            return torch.arange(features, 0, -1)
        if order == "random":
            return torch.randperm(features, generator=generator) + 1
        raise ValueError(f"unknown order {order!r}: use 'sequential', 'reversed', 'random' "
                         "or explicit degrees")
    deg = torch.as_tensor(order, dtype=torch.long)
    if deg.shape != (features,) or not torch.equal(torch.sort(deg).values,
                                                   torch.arange(1, features + 1)):
        raise ValueError(f"order must be a permutation of 1..{features}, got {deg.tolist()}")
    return deg


class MaskedLinear(nn.Linear):
    """``y = x (W * M)^T + b`` with a fixed binary mask ``M`` (a saved buffer).

    The masked weight matrices of MADE (Germain et al. 2015, section 4: ``W * M``).

    Arguments:
        in_features, out_features: widths.
        mask: ``(out_features, in_features)`` 0/1.

    Shapes:
        ``x``: ``(batch, in_features)`` (any leading dimensions) ->
        ``(batch, out_features)``.

    Raises:
        ValueError: ``mask`` does not have shape ``(out_features, in_features)``.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({out_features}, {in_features})")
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class _MaskedResidualBlock(nn.Module):
    def __init__(self, mask: Tensor, activation: type[nn.Module]):
        super().__init__()
        H = mask.shape[0]
        self.l1 = MaskedLinear(H, H, mask)
        self.l2 = MaskedLinear(H, H, mask)
        self.act = activation()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(h + self.l2(self.act(self.l1(h))))


class _MaskedReluLayers:
    """A MADE's masked layers as :class:`~normflux.nets.mlp._ReluNet` sees them: weights
    ``W * M`` from the parameters ``(W_1, b_1, W_2, b_2, ...)``, and the gradients of
    ``W`` masked in turn."""

    __slots__ = ("masks", "native")

    def __init__(self, masks: list[Tensor]):
        self.masks = masks
        self.native = False  # the layers in the C kernel (nets/native_made.py): MADE sets it

    def _native_layers(self, params):
        return [(w, b, m) for m, w, b in zip(self.masks, params[0::2], params[1::2])]

    def _relu_layers(self, params):
        return [(w * m, b) for m, w, b in zip(self.masks, params[0::2], params[1::2])]

    def _relu_grads(self, params):
        grads = [torch.empty_like(p) for p in params]
        return grads, list(zip(grads[0::2], grads[1::2]))

    def _relu_finish(self, g_layers):
        for m, (g_w, _) in zip(self.masks, g_layers):
            g_w.mul_(m)


def _mask_degrees(made: "MADE") -> list[Tensor]:
    """The degrees of each hidden layer's units as its masks say: a unit's degree is the
    largest degree among the units (inputs, for the first layer) it sees, 0 when it sees
    none. That is the degree it was built with whenever every degree below it is present
    in the layer before; otherwise a smaller one that admits the same inputs, so the
    prefixes of :meth:`MADE.sequential_params` still contain every unit that matters."""
    deg = made.degrees.cpu()
    prev = deg if made._input_index is None else deg[made._input_index]
    out = []
    layers = [made.first] + [m for m in made.body if isinstance(m, MaskedLinear)]
    for lin in layers[:len(made._hidden_deg)]:
        sees = lin.mask.detach().cpu() != 0
        prev = torch.where(sees, prev[None, :], 0).amax(dim=1) if sees.shape[1] else (
            torch.zeros(sees.shape[0], dtype=torch.long))
        out.append(prev)
    while len(out) < len(made._hidden_deg):  # residual blocks keep the first layer's degrees
        out.append(out[0])
    return out


def _refresh_caches(made: "MADE", incompatible_keys=None) -> None:
    """Cache, as Python lists (free under ``torch.compile``), the generation order and how
    many units of each hidden layer have a degree below each input's degree, with the
    hidden units' degrees read from the masks (:func:`_mask_degrees`) and their order of
    degree in the buffers ``_unit_order<l>``; again after ``load_state_dict`` (a loaded
    random order, or the masks of a checkpoint whose units are in another order: earlier
    builds of normflux 0.1.0 cycled them through the degrees), whether it is called on the
    MADE or on a module that contains it."""
    deg = made.degrees.cpu()
    made.generation_order = torch.argsort(deg, stable=True).tolist()
    made._hidden_deg = _mask_degrees(made)
    for layer, d in enumerate(made._hidden_deg):
        order = getattr(made, f"_unit_order{layer}")
        order.copy_(torch.argsort(d, stable=True).to(order.device))
    made._counts = [torch.searchsorted(d.sort().values, deg).tolist() for d in made._hidden_deg]


class MADE(nn.Module):
    """Masked MLP whose output for input ``i`` depends only on inputs of lower degree.

    Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015,
    eq. 13-14 (masks from degrees). Input ``i`` has degree ``degrees[i]`` in ``1..D``;
    the ``H`` units of a hidden layer take the degrees ``1 + (k mod (D-1))``, ``k < H``, in
    increasing order (all degrees present whenever ``H >= D - 1``; any ``H >= 1`` is
    valid, and ``D = 1`` gives outputs that depend only on the context), so that every
    mask is a staircase, which the C kernel of :mod:`~normflux.nets.native_made`
    multiplies block by block; output ``(i, p)`` sees hidden units of degree
    ``< degrees[i]``.
    The context (degree 0) feeds every hidden unit of the first layer. With
    ``residual=True`` hidden layers are masked residual blocks (Nash & Durkan 2019,
    as in nflows' ``MaskedResidualBlock``), which preserve the degrees.

    Inputs may carry several feature columns per coordinate (circular coordinates are
    fed as ``(cos, sin)``): ``input_index`` gives the coordinate of each input column.

    Arguments:
        features: ``D``, the number of coordinates.
        params_per_feature: ``P`` outputs per coordinate (the output multiplier).
        hidden_features: hidden widths (equal widths with ``residual``).
        context_features: context width ``C`` or ``None``.
        order: see :func:`autoregressive_order` (saved as the buffer ``degrees``).
        input_index: ``(n_in,)`` coordinate (0..D-1) of each input column; default
            ``0..D-1``.
        residual: residual masked blocks.
        activation: activation class (default ``nn.ReLU``).
        zero_init: zero the output layer (identity flows at initialisation).
        generator: random generator for ``order="random"``.
        transposed_output: compute the output layer as ``W h^T + b``: the same values
            and shapes, in memory layout ``(D, P, batch)`` (``(P, batch)`` for
            :meth:`sequential_params`), which spline layers read without a copy; see
            :func:`~normflux.nets.mlp.use_transposed_output`.

    Attributes:
        degrees: ``(D,)`` buffer, the coordinates' degrees ``1..D``.
        generation_order: the coordinates in increasing degree (a Python list, refreshed
            when a state dict brings other degrees): the order of a sequential inverse.

    Shapes:
        ``forward(x (batch, n_in), context (batch, C)) -> (batch, D, P)``.

    Raises:
        ValueError: widths or ``features`` that are not integers >= 1, no hidden layer,
            ``context_features``
            neither ``None`` nor an integer >= 1, unequal widths with ``residual``, bad
            order.
        IndexError: an ``input_index`` that is not a 1-D integer tensor of entries in
            ``0..D-1`` (a negative entry used to count from the end).
    """

    def __init__(self, features: int, params_per_feature: int,
                 hidden_features: Sequence[int] | int = (64, 64),
                 context_features: int | None = None,
                 order: str | Sequence[int] | Tensor = "sequential",
                 input_index: Tensor | None = None, residual: bool = False,
                 activation: type[nn.Module] = nn.ReLU, zero_init: bool = True,
                 generator: torch.Generator | None = None, transposed_output: bool = False):
        super().__init__()
        self.transposed_output = bool(transposed_output)
        if isinstance(hidden_features, int):
            hidden_features = (hidden_features, hidden_features)
        hidden = tuple(integer("hidden_features", h, minimum=1) for h in hidden_features)
        D = integer("features", features, minimum=1)
        P = integer("params_per_feature", params_per_feature, minimum=1)
        if not hidden:
            raise ValueError("MADE needs at least one hidden layer, got hidden_features=()")
        if residual and len(set(hidden)) != 1:
            raise ValueError(f"a residual MADE needs equal hidden widths, got {hidden}")
        self.features, self.params_per_feature = D, P
        self.context_features = context_features = context_width(context_features)
        degrees = autoregressive_order(order, D, generator)
        self.register_buffer("degrees", degrees)
        if input_index is not None:
            input_index = torch.as_tensor(input_index)
            if (input_index.dim() != 1 or input_index.is_floating_point()
                    or input_index.dtype == torch.bool or input_index.is_complex()
                    or bool(((input_index < 0) | (input_index >= D)).any())):
                raise IndexError(f"input_index must be a 1-D integer tensor of coordinates "
                                 f"0..{D - 1}, got {input_index.tolist()}")
        in_deg = degrees if input_index is None else degrees[input_index]
        self.in_features = in_deg.numel()

        def hidden_degrees(H: int) -> Tensor:
            # in order of degree, so that every mask is a staircase, which the C kernel
            # (native_made) multiplies block by block
            if D == 1:
                return torch.zeros(H, dtype=torch.long)
            return torch.sort(torch.arange(H) % (D - 1) + 1).values

        # for the prefix passes of :meth:`sequential_params`: each hidden layer's units in
        # order of degree (non-persistent: a function of D and the widths) and, refreshed
        # when a state dict brings other degrees, how many have a degree below each input's
        self._hidden_deg = [hidden_degrees(H) for H in hidden]
        for layer, d in enumerate(self._hidden_deg):
            self.register_buffer(f"_unit_order{layer}", torch.argsort(d, stable=True),
                                 persistent=False)
        # the input columns' coordinates, for the masks' degrees (a list: not a tensor attribute)
        self._input_index = None if input_index is None else input_index.tolist()
        h_deg = self._hidden_deg[0]
        self.first = MaskedLinear(self.in_features, hidden[0], (h_deg[:, None] >= in_deg[None, :]).float())
        self.context_layer = (nn.Linear(context_features, hidden[0], bias=False)
                              if context_features else None)
        blocks: list[nn.Module] = []
        act = activation
        if residual:
            m = (h_deg[:, None] >= h_deg[None, :]).float()
            blocks = [_MaskedResidualBlock(m, act) for _ in range(len(hidden) - 1)]
        else:
            for (a, d_in), (b, d_out) in zip(zip(hidden, self._hidden_deg),
                                             zip(hidden[1:], self._hidden_deg[1:])):
                blocks.append(MaskedLinear(a, b, (d_out[:, None] >= d_in[None, :]).float()))
                blocks.append(act())
            h_deg = self._hidden_deg[-1]
        self.act = act()
        self.body = nn.Sequential(*blocks)
        out_deg = degrees.repeat_interleave(P)  # output row i*P + p belongs to coordinate i
        self.head = MaskedLinear(hidden[-1], D * P, (out_deg[:, None] > h_deg[None, :]).float())
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        _refresh_caches(self)
        self.register_load_state_dict_post_hook(_refresh_caches)

    def hidden(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The last hidden layer, ``(batch, H)``.

        Arguments:
            x: ``(batch, n_in)``.
            context: ``(batch, C)`` (or ``(1, C)``), or ``None``; ignored by an
                unconditional MADE.
        """
        h = self.first(x)
        if self.context_layer is not None and context is not None:
            h = h + self.context_layer(context)
        return self.body(self.act(h))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(batch, n_in)`` (+ context ``(batch, C)``) -> ``(batch, D, P)``.

        Raises:
            TypeError: ``x`` or the context is not a tensor.
            ValueError: ``x`` not ``(batch, n_in)``; as in
                :func:`~normflux.nets.mlp.check_net_input`, a context where none is
                expected or none where one is, of the wrong width or batch, ``x`` or the
                context not of the parameters' dtype (outside autocast).
        """
        # autocast hands the layers other dtypes (a non-tensor x is named by the check)
        autocast = isinstance(x, Tensor) and _autocast(x)
        check_net_input("MADE", x, self.in_features, context, self.context_features,
                        None if autocast else self._modules["head"]._parameters["weight"].dtype)
        if x.dim() != 2:
            raise ValueError(f"MADE expects inputs of shape (batch, {self.in_features}), got "
                             f"{tuple(x.shape)}")
        linears = self._plain_relu()
        if linears and use_relu_node(x, ()):
            extra = None
            if self.context_layer is not None and context is not None:
                extra = self.context_layer(context).expand(x.shape[0], -1)
            # the modules' dictionaries read directly: nn.Module.__getattr__ costs a few
            # microseconds per layer and call, a sizeable part of a small MADE's step
            params = []
            for lin in linears:
                params += (lin._parameters["weight"], lin._parameters["bias"])
            net = _MaskedReluLayers([lin._buffers["mask"] for lin in linears])
            transposed = use_transposed_output(self)
            net.native = not transposed and native_made.usable(x, extra,
                                                               net._native_layers(params))
            out = _ReluNet.apply(x, net, transposed, extra, *params)
            return out.view(x.shape[0], self.features, self.params_per_feature)
        h = self.hidden(x, context)
        if use_transposed_output(self):
            out = _linear_t(h, self.head.weight * self.head.mask, self.head.bias)
        else:
            out = self.head(h)
        return out.view(x.shape[0], self.features, self.params_per_feature)

    def _plain_relu(self) -> list[MaskedLinear]:
        """The masked layers, input to output, where :class:`~normflux.nets.mlp._ReluNet`
        computes this MADE: masked layers with plain ``nn.ReLU`` between them (none
        replaced, no residual blocks) and no hooks on any of them; else ``[]``."""
        mods = self._modules
        body = mods["body"]
        layers = body._modules
        if len(layers) % 2 or not plain_module(body):
            return []
        chain = [mods["first"], mods["act"], *layers.values(), mods["head"]]
        for i, m in enumerate(chain):
            if type(m) is not (nn.ReLU if i % 2 else MaskedLinear) or not plain_module(m):
                return []
        return chain[0::2]

    def sequential_params(self, context: Tensor | None = None) -> Callable[[Tensor, int], Tensor]:
        """A function ``params(x, i) -> (batch, P)``: coordinate ``i``'s parameters, for the
        sequential passes of an autoregressive inverse (one coordinate per pass).

        Equal (to rounding) to ``forward(x, context)[:, i]``, at a fraction of the cost:
        the hidden units of every layer are relabelled in order of degree (the same
        function), so the units that coordinate ``i`` depends on -- those of degree
        below ``degrees[i]`` -- are a prefix of each layer, and only that prefix is
        computed (on average about a third of a square hidden layer's multiply-adds for
        ``D`` coordinates). Masks are applied and the context's contribution computed
        once, here, not in every pass.

        Arguments:
            context: ``(batch, C)`` or ``(1, C)``, or ``None``.

        Returns:
            ``params(x (batch, n_in), i) -> (batch, P)``; it raises ``IndexError`` for a
            coordinate outside ``0..D-1``.
        """
        perms = [getattr(self, f"_unit_order{layer}") for layer in range(len(self._hidden_deg))]
        counts = self._counts  # counts[l][i]: units of layer l with a degree below degrees[i]
        w_first = (self.first.weight * self.first.mask)[perms[0]]
        b_first = self.first.bias[perms[0]]
        ctx = None
        if self.context_layer is not None and context is not None:
            ctx = self.context_layer(context)[:, perms[0]]
        act = self.act
        body = []  # (kind, weights, biases, module): a masked layer or a residual block
        layer = 0
        for m in self.body:
            if isinstance(m, MaskedLinear):
                po, pi = perms[layer + 1], perms[layer]
                body.append(("linear", (m.weight * m.mask)[po][:, pi], m.bias[po], None))
                layer += 1
            elif isinstance(m, _MaskedResidualBlock):
                p = perms[0]
                body.append(("residual", ((m.l1.weight * m.l1.mask)[p][:, p],
                                          (m.l2.weight * m.l2.mask)[p][:, p]),
                             (m.l1.bias[p], m.l2.bias[p]), m.act))
            else:
                body.append(("module", None, None, m))
        last = perms[-1]
        w_head = (self.head.weight * self.head.mask)[:, last]
        P = self.params_per_feature
        linear = _linear_t if use_transposed_output(self) else F.linear

        def params(x: Tensor, i: int) -> Tensor:
            if not 0 <= i < self.features:
                raise IndexError(f"coordinate {i} out of range for a MADE of {self.features} "
                                 "features")
            c = counts[0][i]
            h = F.linear(x, w_first[:c], b_first[:c])
            if ctx is not None:
                h = h + ctx[:, :c]
            h = act(h)
            layer = 0
            for kind, w, b, mod in body:
                if kind == "linear":
                    layer += 1
                    c_in, c = c, counts[layer][i]
                    h = F.linear(h, w[:c, :c_in], b[:c])
                elif kind == "residual":
                    h = mod(h + F.linear(mod(F.linear(h, w[0][:c, :c], b[0][:c])), w[1][:c, :c],
                                         b[1][:c]))
                else:
                    h = mod(h)
            rows = slice(i * P, (i + 1) * P)
            return linear(h, w_head[rows, :c], self.head.bias[rows])

        return params
