"""Training loops: maximum likelihood on data and reverse KL to an unnormalised target.

Both loops use Adam (Kingma & Ba 2015) with a cosine learning-rate schedule
(Loshchilov & Hutter 2017, SGDR without restarts), gradient-norm clipping, a ``tqdm``
progress bar on stderr, and raise :class:`DivergenceError` as soon as a loss or a
gradient is NaN/Inf instead of training on it. They are reproducible: the same ``seed``
and the same initial weights give the same final weights (on the same machine and
torch build). Torch's global random state is left untouched (the loops run inside
``torch.random.fork_rng``).

Performance note: the default models are small; on a CPU shared with other work,
``torch.set_num_threads(1)`` was measured 2-25x faster than two threads (the ``normflux``
command uses one thread unless ``--threads`` says otherwise).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import integer, real
from .models import domains_from_config

__all__ = ["DivergenceError", "fit_to_data", "fit_to_target", "evaluate_nll", "make_optimizer"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient (the message says where and what).

    Attributes:
        epoch: the epoch (1-based) or ``None`` for :func:`fit_to_target`.
        step: the optimizer step (1-based, counted over the whole run).
        value: the offending loss (or gradient norm) as a float.
    """

    def __init__(self, message: str, *, epoch: int | None = None, step: int | None = None,
                 value: float | None = None):
        super().__init__(message)
        self.epoch, self.step, self.value = epoch, step, value


def make_optimizer(flow: nn.Module, lr: float, total_steps: int, weight_decay: float = 0.0):
    """Adam with a cosine schedule from ``lr`` to 0 over ``total_steps`` scheduler steps.

    Adam: Kingma & Ba 2015 (Algorithm 1); the schedule is ``CosineAnnealingLR``
    (Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts).

    Arguments:
        flow: the module whose ``parameters()`` are optimised.
        lr: peak learning rate (> 0).
        total_steps: length of the cosine schedule (>= 1).
        weight_decay: Adam's L2 penalty.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after each optimizer step.

    Raises:
        ValueError: ``lr`` not a finite number > 0, ``total_steps`` not an integer >= 1,
            or ``weight_decay`` not a finite number >= 0.
    """
    lr = real("lr", lr, low=0, low_open=True)
    total_steps = integer("total_steps", total_steps, minimum=1)
    weight_decay = real("weight_decay", weight_decay, low=0)
    opt = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return opt, sched


def _check_flow(flow, *methods: str) -> None:
    """``flow`` is a module with the methods a loop calls (a :class:`~normflux.flows.Flow`
    or an adapter with the same methods); TypeError naming what is missing."""
    missing = [m for m in methods if not callable(getattr(flow, m, None))]
    if not isinstance(flow, nn.Module) or missing:
        raise TypeError(f"flow must be an nn.Module with {', '.join(methods)} (a normflux Flow), "
                        f"got {type(flow).__name__}"
                        + (f" without {', '.join(missing)}" if missing else ""))


def _check_callable(name: str, f) -> None:
    if f is not None and not callable(f):
        raise TypeError(f"{name} must be callable or None, got {type(f).__name__}")


def _param_info(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in flow.parameters():
        return p.dtype, p.device
    for b in flow.buffers():
        if b.is_floating_point():
            return b.dtype, b.device
    return torch.get_default_dtype(), torch.device("cpu")


def _loop_args(batch_size, lr, clip, seed, weight_decay=0.0):
    """The arguments :func:`fit_to_data` and :func:`fit_to_target` share, checked with one
    wording: ``batch_size`` an integer >= 1, ``lr`` > 0, ``clip`` > 0 or ``None``, ``seed``
    an integer, ``weight_decay`` >= 0 (``ValueError`` naming the argument otherwise)."""
    return (integer("batch_size", batch_size, minimum=1),
            real("lr", lr, low=0, low_open=True),
            None if clip is None else real("clip", clip, low=0, low_open=True),
            integer("seed", seed),
            real("weight_decay", weight_decay, low=0))


def _check_rows(name: str, t) -> None:
    """``t`` must be a real (floating or integer) tensor with a leading row dimension."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a leading row dimension (N, ...), got a 0-d tensor")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {t.dtype}; expected a real floating-point or "
                         "integer tensor (it is converted to the flow's dtype)")


def _check_context_rows(context, n: int, *, data: str, name: str, single_row: bool) -> None:
    """``context`` (if any) must have as many rows as ``data`` (``n``), before any
    chunking or splitting; with ``single_row`` a single ``(C,)``/``(1, C)`` row is
    accepted too (it broadcasts over the data)."""
    if context is None:
        return
    _check_rows(name, context)
    if context.dim() == 1:
        if single_row:
            return
        raise ValueError(f"{name} must be 2-D (N, C), got a 1-D tensor of shape "
                         f"{tuple(context.shape)}; for one context feature per row use "
                         f"{name}.reshape(-1, 1)")
    rows = context.shape[0]
    if rows != n and not (single_row and rows == 1):
        raise ValueError(f"{data} has {n} rows but {name} has {rows}; they must match"
                         + (f" (or {name} must be a single row)" if single_row else ""))


def _step(flow: nn.Module, loss: Tensor, opt, sched, clip: float | None, *, where: str,
          epoch: int | None, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DivergenceError(f"training diverged at {where}: loss is {value} (not finite); "
                              "lower the learning rate, clip gradients or check the data",
                              epoch=epoch, step=step, value=value)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in flow.parameters() if p.grad is not None]
    if clip is not None and params:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params]))) if params else 0.0
    if not math.isfinite(norm):
        raise DivergenceError(f"training diverged at {where}: gradient norm is {norm} "
                              f"(loss {value:.6g}); lower the learning rate or check the data",
                              epoch=epoch, step=step, value=norm)
    opt.step()
    sched.step()
    return value


def _check_finite(t: Tensor, name: str) -> None:
    """Raise a ValueError naming the first rows of ``t`` with NaN/Inf (or float overflow)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        rows = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(-1).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or Inf (rows {rows[:5].tolist()}"
                         f"{' ...' if len(rows) > 5 else ''}); values beyond the float range "
                         "overflow to Inf")


@torch.no_grad()
def evaluate_nll(flow: nn.Module, data: Tensor, context: Tensor | None = None,
                 batch_size: int = 4096) -> float:
    """Mean negative log-likelihood ``-mean log p(x | c)`` in nats per example.

    Arguments:
        flow: a :class:`~normflux.flows.Flow`.
        data: ``(N, *event_shape)``, any real floating-point or integer dtype (converted
            to the flow's dtype and device chunk by chunk).
        context: ``(N, C)``, a single row ``(C,)`` or ``(1, C)`` shared by every
            example, or ``None``.
        batch_size: evaluation chunk size (memory only; the result does not depend on it).

    Returns:
        a float (``inf`` if some point has zero density). The flow is evaluated in eval
        mode and its training flag restored.

    Raises:
        TypeError: ``flow`` is not a module with ``log_prob``; ``data`` or ``context`` is
            not a :class:`torch.Tensor`.
        ValueError: ``data`` has no rows or is 0-d; ``data`` or ``context`` is complex or
            bool; ``context`` has neither ``N`` rows nor a single one (checked before
            chunking); ``batch_size`` is not an integer >= 1; or data or context the
            flow does not accept (see :class:`~normflux.flows.Flow`).
    """
    _check_flow(flow, "log_prob")
    _check_rows("data", data)
    n = data.shape[0]
    if n == 0:
        raise ValueError("evaluate_nll needs at least one row of data, got an empty tensor")
    _check_context_rows(context, n, data="data", name="context", single_row=True)
    batch_size = integer("batch_size", batch_size, minimum=1)
    whole_context = context is not None and (context.dim() == 1 or context.shape[0] == 1)
    dtype, device = _param_info(flow)
    was = flow.training
    flow.eval()
    try:
        total = 0.0
        for i in range(0, n, batch_size):
            xb = data[i:i + batch_size].to(device=device, dtype=dtype)
            cb = None if context is None else \
                (context if whole_context else context[i:i + batch_size]).to(device=device,
                                                                             dtype=dtype)
            total += float(flow.log_prob(xb, cb).double().sum())
    finally:
        flow.train(was)
    return -total / n


def fit_to_data(flow: nn.Module, data: Tensor, context: Tensor | None = None, *,
                epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
                val_fraction: float = 0.1, val_data: Tensor | None = None,
                val_context: Tensor | None = None, patience: int | None = 20, seed: int = 0,
                clip: float | None = 5.0, weight_decay: float = 0.0,
                dequantize: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> dict:
    """Maximum-likelihood training (forward KL; Papamakarios et al. 2021, eq. 13).

    Minimises ``flow.forward_kld(x, c)`` (the mean NLL) with Adam and a cosine schedule
    over ``epochs`` epochs, holding out a validation set for early stopping: training
    stops after ``patience`` epochs without a new best validation NLL, and the weights of
    the best epoch are restored at the end (also when no early stop happened).

    Arguments:
        flow: a :class:`~normflux.flows.Flow` (trained in place).
        data: ``(N, *event_shape)`` training data (any real float/int dtype, not complex
            or bool; converted to the flow's dtype and device batch by batch; array-likes
            are converted with ``torch.as_tensor``).
        context: ``(N, C)`` contexts for a conditional flow, or ``None``.
        epochs: maximum number of epochs (>= 1).
        batch_size: mini-batch size; the last, smaller batch of an epoch is kept.
        lr: peak learning rate.
        val_fraction: fraction of ``data`` held out for validation when ``val_data`` is
            not given (a seeded random split); 0 disables validation and early stopping
            (the final weights are kept).
        val_data, val_context: an explicit validation set instead of the split
            (``val_context``: ``(len(val_data), C)`` or one row shared by all).
        patience: epochs without improvement before stopping (``None``: never stop early).
        seed: seeds the split, the batch order, the dequantisation noise and torch's
            global generator inside the loop.
        clip: maximum gradient norm (``None``: no clipping).
        weight_decay: Adam's L2 penalty.
        dequantize: ``dequantize(x, generator) -> x'``, applied to the training data
            afresh each epoch (uniform dequantisation of integer data, e.g.
            :func:`normflux.data.digits.dequantize`) and once, with fixed noise, to the
            validation data.
        progress: show a tqdm progress bar on stderr.
        callback: ``callback(epoch, history)`` after every epoch.

    The flow trains in training mode and gets its own mode back at the end (a new module
    is in training mode): call ``flow.eval()`` before evaluating a flow with
    :class:`~normflux.transforms.BatchNorm` layers, which normalise with the batch's own
    statistics in training mode. A model of :func:`normflux.models.build` expects
    standardised data: a ``UserWarning`` says so when more than 10 % of the real
    coordinates' values lie outside its ``[-tail_bound, tail_bound]`` while its
    standardisation is unset (see :func:`normflux.models.fit_standardization`).

    Returns:
        ``history``: a dict with ``train_loss`` and ``val_loss`` (per epoch, nats per
        example), ``lr`` (per epoch), ``best_epoch`` (1-based), ``best_val_loss``,
        ``epochs`` (run), ``steps``, ``stopped_early`` and ``seconds``.

    Raises:
        DivergenceError: a non-finite training loss, gradient norm or validation loss
            (the message names the epoch, the step and the value).
        ValueError: ``data`` and ``context`` with different numbers of rows (likewise
            ``val_data`` and ``val_context``), a 1-D ``context``, data or context that is
            complex, bool, empty or contains NaN/Inf, ``val_context`` without
            ``val_data``, ``epochs``/``batch_size``/``patience`` not integers >= 1,
            ``seed`` not an integer, ``lr`` or ``clip`` not a finite number > 0,
            ``weight_decay`` < 0, ``val_fraction`` outside ``[0, 1)``, too few points for
            the validation split (e.g. a single point), or data the flow rejects. Each
            message names the argument.
        TypeError: ``flow`` is not a module with ``forward_kld``, or ``dequantize`` /
            ``callback`` is not callable.
    """
    t0 = time.perf_counter()
    _check_flow(flow, "forward_kld")
    _check_callable("dequantize", dequantize)
    _check_callable("callback", callback)
    if not isinstance(data, Tensor):
        data = torch.as_tensor(data)
    if context is not None and not isinstance(context, Tensor):
        context = torch.as_tensor(context)
    _check_rows("data", data)
    N = data.shape[0]
    _check_context_rows(context, N, data="data", name="context", single_row=False)
    epochs = integer("epochs", epochs, minimum=1)
    batch_size, lr, clip, seed, weight_decay = _loop_args(batch_size, lr, clip, seed,
                                                          weight_decay)
    if N == 0:
        raise ValueError("fit_to_data needs at least one row of data, got an empty tensor")
    if patience is not None:
        patience = integer("patience", patience, minimum=1)
    val_fraction = real("val_fraction", val_fraction, low=0, high=1, high_open=True)
    if val_context is not None and val_data is None:
        raise ValueError("val_context was given without val_data (the validation split of "
                         "data uses rows of context)")
    if val_data is not None:
        if not isinstance(val_data, Tensor):
            val_data = torch.as_tensor(val_data)
        if val_context is not None and not isinstance(val_context, Tensor):
            val_context = torch.as_tensor(val_context)
        _check_rows("val_data", val_data)
        if val_data.shape[0] == 0:
            raise ValueError("val_data has no rows; pass None to use a split of data")
        _check_context_rows(val_context, val_data.shape[0], data="val_data", name="val_context",
                            single_row=True)
    _check_finite(data, "data")
    if context is not None:
        _check_finite(context, "context")
    if val_data is not None:
        _check_finite(val_data, "val_data")
        if val_context is not None:
            _check_finite(val_context, "val_context")
    dtype, device = _param_info(flow)
    _warn_if_not_standardized(flow, data)
    gen = torch.Generator().manual_seed(seed)
    if val_data is not None:
        train_x, train_c = data, context
        val_x, val_c = val_data, val_context
    else:
        n_val = int(round(val_fraction * N))
        if val_fraction > 0:
            n_val = max(n_val, 1)
        if N - n_val < 1:
            raise ValueError(f"{N} data points are too few for a validation split of "
                             f"{val_fraction:g}")
        perm = torch.randperm(N, generator=gen)
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        train_x, val_x = data[tr_idx], (data[val_idx] if n_val else None)
        train_c = None if context is None else context[tr_idx]
        val_c = None if context is None or not n_val else context[val_idx]
    if val_x is not None and dequantize is not None:
        val_x = dequantize(val_x, gen)
    n_train = train_x.shape[0]
    steps_per_epoch = math.ceil(n_train / batch_size)
    opt, sched = make_optimizer(flow, lr, epochs * steps_per_epoch, weight_decay)
    history: dict = {"train_loss": [], "val_loss": [], "lr": [], "best_epoch": None,
                     "best_val_loss": None, "epochs": 0, "steps": 0, "stopped_early": False}
    best_state = None
    best = math.inf
    bad_epochs = 0
    step = 0
    was = flow.training
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bar = tqdm(total=epochs, disable=not progress, desc="fit", unit="epoch", leave=False,
                   dynamic_ncols=True)
        try:
            for epoch in range(1, epochs + 1):
                flow.train()
                xs = dequantize(train_x, gen) if dequantize is not None else train_x
                order = torch.randperm(n_train, generator=gen)
                total, count = 0.0, 0
                history["lr"].append(opt.param_groups[0]["lr"])
                for i in range(0, n_train, batch_size):
                    idx = order[i:i + batch_size]
                    xb = xs[idx].to(device=device, dtype=dtype)
                    cb = None if train_c is None else train_c[idx].to(device=device, dtype=dtype)
                    step += 1
                    loss = flow.forward_kld(xb, cb)
                    value = _step(flow, loss, opt, sched, clip, where=f"epoch {epoch}, step {step}",
                                  epoch=epoch, step=step)
                    total += value * xb.shape[0]
                    count += xb.shape[0]
                train_loss = total / count
                history["train_loss"].append(train_loss)
                if val_x is not None:
                    val_loss = evaluate_nll(flow, val_x, val_c)
                    if not math.isfinite(val_loss):
                        raise DivergenceError(
                            f"training diverged at epoch {epoch}, step {step}: validation loss "
                            f"is {val_loss} (train loss {train_loss:.6g})",
                            epoch=epoch, step=step, value=val_loss)
                    history["val_loss"].append(val_loss)
                    if val_loss < best:
                        best, bad_epochs = val_loss, 0
                        best_state = copy.deepcopy(flow.state_dict())
                        history["best_epoch"], history["best_val_loss"] = epoch, val_loss
                    else:
                        bad_epochs += 1
                history["epochs"], history["steps"] = epoch, step
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.4g}", val=f"{history['val_loss'][-1]:.4g}"
                                if history["val_loss"] else "-", best=f"{best:.4g}")
                if callback is not None:
                    callback(epoch, history)
                if patience is not None and val_x is not None and bad_epochs >= patience:
                    history["stopped_early"] = True
                    break
        finally:
            bar.close()
            flow.train(was)
    if best_state is not None:
        flow.load_state_dict(best_state)
    history["seconds"] = time.perf_counter() - t0
    return history


#: fraction of a model's real-coordinate data values outside its box that draws the warning
_OUTSIDE_WARNING = 0.1


def _warn_if_not_standardized(flow: nn.Module, data: Tensor) -> None:
    """Warn when a model of :func:`normflux.models.build` whose standardisation is not set
    (or absent) is fitted to data whose real coordinates lie mostly outside its box
    ``[-tail_bound, tail_bound]``: its spline layers are the identity there, and such a
    fit ends where it started, without a word (a user's report: a flat loss of 1e5 nats
    on two moons scaled by 50)."""
    config, standardizer = getattr(flow, "config", None), getattr(flow, "standardizer", None)
    if not isinstance(config, dict) or "tail_bound" not in config or not callable(standardizer):
        return
    layer = standardizer()
    if layer is not None and not layer.is_identity():
        return  # set by fit_standardization
    real_cols = [i for i, d in enumerate(domains_from_config(config.get("domains"),
                                                                config["features"]))
                 if d.kind == "real"]
    x = data.reshape(data.shape[0], -1)
    if not real_cols or x.shape[1] != config["features"]:
        return  # the flow will name a wrong shape itself
    x = x[:, real_cols].double()
    bound = float(config["tail_bound"])
    outside = float((x.abs() > bound).double().mean())
    if outside > _OUTSIDE_WARNING:
        warnings.warn(
            f"{100 * outside:.0f}% of the data's real-coordinate values lie outside "
            f"[-{bound:g}, {bound:g}]: the models of normflux.models.build expect standardised "
            "data (their spline layers are the identity outside that box, and such a fit "
            "learns little); build the model with standardize=True and call "
            "normflux.models.fit_standardization(flow, data) first, as `normflux train` does",
            UserWarning, stacklevel=3)


def fit_to_target(flow: nn.Module, target, *, steps: int = 1000, batch_size: int = 256,
                  lr: float = 1e-3, seed: int = 0, clip: float | None = 5.0,
                  progress: bool = True, callback: Callable[[int, float], None] | None = None
                  ) -> dict:
    """Variational fit by reverse KL to an unnormalised target (Papamakarios et al. 2021,
    eq. 17; Rezende & Mohamed 2015).

    Each step minimises ``flow.reverse_kld(target, batch_size)``, the Monte Carlo estimate
    of ``E_q[log q(x) - log p~(x)] = KL(q || p) - log Z`` with reparameterised samples.

    Arguments:
        flow: a :class:`~normflux.flows.Flow` (trained in place).
        target: an object with ``log_prob(x) -> (batch,)`` (e.g. :mod:`normflux.targets`);
            the returned shape is checked at every step.
        steps: number of optimizer steps (>= 1).
        batch_size: samples per step.
        lr: peak learning rate (cosine schedule to 0 over ``steps``).
        seed: seeds torch's global generator inside the loop (the base samples).
        clip: maximum gradient norm (``None``: no clipping).
        progress: show a tqdm progress bar on stderr.
        callback: ``callback(step, loss)`` after every step.

    Returns:
        ``history``: ``loss`` (per step, nats; the last entries approach ``-log Z``),
        ``steps`` and ``seconds``.

    Raises:
        DivergenceError: a non-finite loss or gradient norm (names the step and value).
        ValueError: ``steps`` or ``batch_size`` not an integer >= 1, ``seed`` not an
            integer, ``lr`` or ``clip`` not a finite number > 0 (the same checks as
            :func:`fit_to_data`), or ``target.log_prob`` returning another shape than
            ``(batch_size,)``.
        TypeError: ``flow`` is not a module with ``reverse_kld``, ``callback`` is not
            callable, ``target`` has no ``log_prob`` method, or it returns a non-tensor.
    """
    t0 = time.perf_counter()
    _check_flow(flow, "reverse_kld")
    _check_callable("callback", callback)
    steps = integer("steps", steps, minimum=1)
    batch_size, lr, clip, seed, _ = _loop_args(batch_size, lr, clip, seed)
    if not callable(getattr(target, "log_prob", None)):
        raise TypeError(f"target must have a log_prob(x) method, got {type(target).__name__}")
    _, device = _param_info(flow)
    opt, sched = make_optimizer(flow, lr, steps)
    history: dict = {"loss": [], "steps": 0}
    was = flow.training
    flow.train()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bar = tqdm(range(1, steps + 1), disable=not progress, desc="fit", unit="step",
                   leave=False, dynamic_ncols=True, mininterval=0.5)
        try:
            for step in bar:
                loss = flow.reverse_kld(target, batch_size)
                value = _step(flow, loss, opt, sched, clip, where=f"step {step}", epoch=None,
                              step=step)
                history["loss"].append(value)
                history["steps"] = step
                if step % 10 == 0 or step == steps:
                    bar.set_postfix(loss=f"{value:.4g}")
                if callback is not None:
                    callback(step, value)
        finally:
            bar.close()
            flow.train(was)
    history["seconds"] = time.perf_counter() - t0
    return history
