"""Density estimation on scikit-learn's 8x8 digits: normflux vs zuko vs nflows, one protocol.

Three model families -- NSF (spline coupling), MAF (affine autoregressive) and NSF-AR
(autoregressive spline) -- each trained with normflux, zuko and nflows at the same size
and under the same protocol. Every flow is trained and evaluated by the *same* code,
:func:`normflux.training.fit_to_data` and :func:`normflux.training.evaluate_nll`; only
the flow inside differs.

The defaults are those of ``normflux train --data digits`` (imported from
:data:`normflux.cli.TRAIN_DEFAULTS`, not copied), and the normflux NSF row *is* that
command: the same model (``build(..., standardize=True, seed=0)`` with
``fit_standardization`` on the same dequantised training draw), the same data, the same
validation split and the same call of ``fit_to_data``, so its ``test_nll_first_draw`` is
the number the command prints (with the same ``--threads``). The normflux MAF and NSF-AR
rows are ``normflux train --data digits --model maf`` / ``--model nsf-ar``.

Protocol (all defaults; see ``--help``):

* data: :func:`normflux.data.digits.load_digits_split` (1500 train / 297 test, seed 0);
  ``fit_to_data`` holds out 10 % of the 1500 (150 images, ``torch.randperm`` with the
  seeded generator) for validation and trains on the other 1350 -- exactly as the CLI;
* dequantisation: ``y = (x + u) / 17``, ``u ~ U[0, 1)`` -- a fresh, seeded draw every
  epoch for training, one fixed draw for validation (both inside ``fit_to_data``), and
  ``test_draws`` (10) successive draws of the test set from ``Generator().manual_seed(0)``,
  the first of which is the CLI's test draw; the same noise for every library;
* standardisation (fixed, not learned): ``s = (y - m) / sd`` with ``m``, ``sd`` the mean
  and standard deviation (``Standardize.set_stats``) of one dequantised draw of the 1500
  training images (``Generator().manual_seed(0)``), as ``normflux train`` does. normflux
  models carry it as their first layer; the peers get the very same numbers in an
  adapter (:class:`Standardised`). Its log-determinant ``-sum(log sd)`` is included, so
  every NLL is in nats per example on the ``(x + u) / 17`` scale and
  ``bits/dim = log2(17) + nll / (64 ln 2)``;
* optimiser: Adam (lr 1e-3), cosine annealing to 0 over the epoch budget (60 epochs),
  batch 128, gradient-norm clipping at 5; early stopping on the validation NLL with
  patience 15, best weights restored; a safety cap of ``max_seconds`` (600 s) of
  training per fit, far above what any fit needs on an idle machine;
* evaluation: the test NLL averaged over the 10 dequantisation draws of the 297 images.

Models (``L`` = layers = 10, ``H`` = hidden = (64, 64), ``K`` = bins = 8, ``B`` = tail
bound = 3; each conditioner is a (masked) MLP with the hidden widths ``H``, ReLU):

* ``nsf`` -- spline coupling:
  normflux ``build("nsf")``: alternating masks, seeded random permutations in between,
  RQ splines with linear tails outside ``[-B, B]``, zero-initialised last layer;
  zuko: ``MaskedAutoregressiveTransform(passes=2)`` (zuko's coupling) with
  ``MonotonicRQSTransform(bound=B)``, each given the *same* split of coordinates as the
  matching normflux layer (zuko's ``NSF`` class hard-codes bound 5 and offers only
  reversed or random orders); zuko also applies an unconditional spline to the
  conditioning half;
  nflows: ``PiecewiseRationalQuadraticCouplingTransform(tails="linear", tail_bound=B)``
  with nflows' ``MLP`` conditioner (exposing ``hidden_features``, see :class:`_NoContext`),
  again with the same splits as normflux;
* ``maf`` -- affine MADE layers, each library's own default mixing:
  normflux ``build("maf")``: MADE order alternating sequential / reversed *and* a seeded
  random permutation between layers, log-scale ``3 tanh(r / 3)``;
  zuko ``zuko.flows.MAF``: orders alternating ascending / descending (``randperm=False``,
  no permutation layer), log-scale soft-clipped at ``|log 1e-3|``;
  nflows ``MaskedAutoregressiveFlow(num_blocks_per_layer=1, use_residual_blocks=False)``
  (``MaskedAffineAutoregressiveTransform``): a ``ReversePermutation`` before every
  layer, ``scale = softplus(r) + 1e-3``;
* ``nsf-ar`` -- autoregressive RQ splines, ``K`` bins, bound ``B``:
  normflux ``build("nsf-ar")``: an ``LULinear`` layer between layers (Durkan et al.
  2019, section 4) and alternating MADE orders;
  nflows ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform(tails="linear",
  tail_bound=B, num_blocks=1, use_residual_blocks=False)`` with ``ReversePermutation`` +
  ``LULinear`` between layers (nflows has no ready-made class for this family);
  zuko ``zuko.flows.NSF``'s own construction -- ``zuko.flows.MAF`` with
  ``univariate=partial(MonotonicRQSTransform, bound=B)`` -- since ``NSF`` itself fixes
  bound 5; orders alternate, no linear layers (zuko's NSF has none).

Usage::

    python benchmarks/digits.py                        # full run (every family, library)
    python benchmarks/digits.py --quick                # smoke test: 2 epochs, 2 test draws
    python benchmarks/digits.py --models nsf,maf --libraries normflux zuko --epochs 50

Output: one JSON line per (library, model family) on stdout (``library``, ``family``,
``model``, ``test_nll``, ``bits_per_dim``, ``seconds`` -- wall-clock training time --,
``cpu_seconds``, ``params`` and extras: ``params_unmasked``, ``val_nll``, ``epochs_run``,
``best_epoch``, ``stop``, ``test_nll_first_draw``, ``test_nll_sd``), then a markdown
table grouped by family, with the independent-pixel baseline. Progress goes to stderr.
Libraries that are not installed are skipped with a note on stderr; a fit that fails
(e.g. diverges) gets a row with ``error`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from normflux.cli import TRAIN_DEFAULTS, build_parser
from normflux.data.digits import (
    DIMS,
    LEVELS,
    bits_per_dim,
    dequantize,
    independent_pixel_baseline,
    load_digits_split,
)
from normflux.models import Standardize, build, fit_standardization
from normflux.training import fit_to_data

LIBRARIES = ("normflux", "zuko", "nflows")
FAMILIES = ("nsf", "maf", "nsf-ar")
FAMILY_NAMES = {"nsf": "NSF coupling", "maf": "MAF (affine)", "nsf-ar": "NSF autoregressive"}

#: ``normflux train --data digits``'s defaults, and the defaults that command leaves to
#: ``build`` / ``fit_to_data`` / its parser (read from their signatures, not copied).
CLI = TRAIN_DEFAULTS["digits"]
_BUILD = inspect.signature(build).parameters
_FIT = inspect.signature(fit_to_data).parameters


def _cli_threads() -> int:
    return build_parser().parse_args(["train", "--data", "digits"]).threads


# --------------------------------------------------------------------------- config
@dataclass
class Config:
    seed: int = 0
    layers: int = CLI["layers"]
    hidden: tuple[int, ...] = tuple(CLI["hidden"])
    bins: int = CLI["bins"]
    tail_bound: float = _BUILD["tail_bound"].default
    batch_size: int = CLI["batch_size"]
    lr: float = CLI["lr"]
    epochs: int = CLI["epochs"]
    patience: int = CLI["patience"]
    clip: float = _FIT["clip"].default
    val_fraction: float = _FIT["val_fraction"].default
    test_draws: int = 10
    max_seconds: float = 600.0  # safety cap per fit (library x family); see the README
    threads: int = field(default_factory=_cli_threads)
    libraries: tuple[str, ...] = LIBRARIES
    models: tuple[str, ...] = FAMILIES


QUICK = dict(epochs=2, patience=2, test_draws=2, max_seconds=60.0)


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Tensor           # (1500, 64) float32 integers 0..16, as the CLI's Dataset.train
    test: Tensor            # (297, 64)
    mean: Tensor            # (64,) float32 standardisation, as normflux train sets it
    std: Tensor             # (64,)


def make_data(cfg: Config) -> Data:
    """The split and the CLI's standardisation statistics.

    ``normflux train`` calls ``fit_standardization(flow, dequantize(train,
    Generator().manual_seed(seed)))``; the same statistics are computed here once, for
    the peers' adapter (the normflux models compute them themselves, identically).
    """
    train, test = load_digits_split(cfg.seed)
    train = torch.as_tensor(train, dtype=torch.float32)
    test = torch.as_tensor(test, dtype=torch.float32)
    layer = Standardize(DIMS).set_stats(standardization_draw(train, cfg.seed))
    return Data(train, test, layer.mean.clone(), layer.std.clone())


def standardization_draw(train: Tensor, seed: int) -> Tensor:
    """The dequantised training draw ``normflux train`` standardises with."""
    return dequantize(train, generator=torch.Generator().manual_seed(seed))


class Standardised(nn.Module):
    """A peer library's flow behind the fixed standardisation, with normflux's Flow API.

    ``log_prob(y) = log q(s) - sum(log sd)`` with ``s = (y - m) / sd``, in nats on the
    ``(x + u) / 17`` scale (what normflux's ``Standardize`` layer computes), and
    ``forward_kld(y) = -mean log_prob(y)``: all that :func:`fit_to_data` and
    ``evaluate_nll`` call, so that every library runs through the very same code.
    """

    def __init__(self, inner: nn.Module, log_prob: Callable[[Tensor], Tensor], data: Data):
        super().__init__()
        self.inner = inner
        self._log_prob = log_prob
        self.register_buffer("mean", data.mean.clone())
        self.register_buffer("std", data.std.clone())

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self._log_prob((y - self.mean) / self.std) - torch.log(self.std).sum()

    def forward_kld(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return -self.log_prob(y).mean()


# --------------------------------------------------------------------------- models
@dataclass
class Model:
    library: str
    family: str
    name: str
    module: nn.Module                            # the library's flow (for parameter counts)
    flow: nn.Module                              # what is trained: has log_prob / forward_kld


def _hidden(cfg: Config) -> tuple[int, ...]:
    return tuple(int(h) for h in cfg.hidden)


def build_normflux_flow(family: str, cfg: Config, data: Data | None = None) -> nn.Module:
    """``normflux train --data digits --model FAMILY``'s model, standardisation set.

    ``data=None`` leaves the standardisation at the identity (the architecture only).
    """
    flow = build(family, DIMS, layers=cfg.layers, hidden=_hidden(cfg), bins=cfg.bins,
                 tail_bound=cfg.tail_bound, standardize=True, seed=cfg.seed)
    if data is not None:
        fit_standardization(flow, standardization_draw(data.train, cfg.seed))
    return flow


def build_normflux(family: str, cfg: Config, data: Data) -> Model:
    import normflux

    flow = build_normflux_flow(family, cfg, data)
    return Model("normflux", family, f"{FAMILY_NAMES[family]} (normflux {normflux.__version__})",
                 flow, flow)


def coupling_splits(flow: nn.Module) -> list[Tensor]:
    """For each coupling layer of a normflux flow, the data coordinates it transforms.

    Follows the permutations of the chain, so the returned index sets are in the
    coordinates of the flow's input; used to give zuko and nflows the same masks.
    """
    from normflux.transforms import Coupling, Permutation

    cur, out = torch.arange(DIMS), []
    for t in flow.transform:
        if isinstance(t, Permutation):
            cur = cur[t.perm]
        elif isinstance(t, Coupling):
            out.append(cur[t.idx_b].clone())
    return out


def zuko_coupling_orders(cfg: Config) -> list[Tensor]:
    """zuko ``order`` vectors that make ``passes=2`` transforms couple like normflux.

    With ``passes=2`` zuko's coordinates whose order is ``< ceil(D / 2) = 32`` condition
    those whose order is ``>= 32``; ``build("nsf")``'s alternating masks transform 32.
    """
    orders = []
    for b in coupling_splits(build_normflux_flow("nsf", cfg)):
        order = torch.zeros(DIMS, dtype=torch.long)
        is_b = torch.zeros(DIMS, dtype=torch.bool)
        is_b[b] = True
        order[~is_b] = torch.arange(int((~is_b).sum()))
        order[is_b] = DIMS - len(b) + torch.arange(len(b))
        orders.append(order)
    return orders


def build_zuko(family: str, cfg: Config, data: Data) -> Model:
    from functools import partial

    import zuko
    from zuko.distributions import DiagNormal
    from zuko.flows import MAF, Flow, UnconditionalDistribution
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.transforms import MonotonicRQSTransform

    spline = dict(univariate=partial(MonotonicRQSTransform, bound=cfg.tail_bound, slope=1e-3),
                  shapes=[(cfg.bins,), (cfg.bins,), (cfg.bins - 1,)])
    if family == "nsf":
        transforms = [MaskedAutoregressiveTransform(features=DIMS, passes=2, order=order,
                                                    hidden_features=_hidden(cfg), **spline)
                      for order in zuko_coupling_orders(cfg)]
        base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(DIMS),
                                         scale=torch.ones(DIMS), buffer=True)
        flow = Flow(transforms, base)
    elif family == "maf":
        flow = MAF(DIMS, transforms=cfg.layers, hidden_features=_hidden(cfg))
    else:  # nsf-ar: zuko.flows.NSF is exactly MAF(univariate=partial(MonotonicRQSTransform,
        # slope=slope), shapes=...) with the bound left at 5; the same with bound B
        flow = MAF(DIMS, transforms=cfg.layers, hidden_features=_hidden(cfg), **spline)
    return Model("zuko", family, f"{FAMILY_NAMES[family]} (zuko {zuko.__version__})", flow,
                 Standardised(flow, lambda s: flow().log_prob(s), data))


class _NoContext(nn.Module):
    """nflows' ``MLP`` (``forward(inputs)``) as a coupling conditioner ``(inputs, context)``.

    It exposes ``hidden_features`` like nflows' own ``ResidualNet``: nflows' spline
    coupling then divides the width and height logits by ``sqrt(hidden_features)`` (its
    intended initial scaling; without the attribute it skips that and warns).
    """

    def __init__(self, net: nn.Module, hidden_features: int):
        super().__init__()
        self.net = net
        self.hidden_features = hidden_features

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(inputs)


def _nflows_made_size(cfg: Config) -> dict:
    hidden = _hidden(cfg)
    if len(set(hidden)) != 1:
        raise ValueError(f"nflows' MADE has one hidden width; got hidden={hidden}")
    return dict(hidden_features=hidden[0], num_blocks=len(hidden) - 1,
                use_residual_blocks=False)


def build_nflows(family: str, cfg: Config, data: Data) -> Model:
    from importlib.metadata import version

    from nflows.distributions.normal import StandardNormal
    from nflows.flows.autoregressive import MaskedAutoregressiveFlow
    from nflows.flows.base import Flow
    from nflows.nn.nets import MLP
    from nflows.transforms import (
        CompositeTransform,
        LULinear,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        ReversePermutation,
    )

    made = _nflows_made_size(cfg) if family != "nsf" else None
    if family == "nsf":
        layers = []
        for b in coupling_splits(build_normflux_flow("nsf", cfg)):
            mask = torch.zeros(DIMS, dtype=torch.long)
            mask[b] = 1
            layers.append(PiecewiseRationalQuadraticCouplingTransform(
                mask, lambda n_in, n_out: _NoContext(MLP([n_in], [n_out], list(_hidden(cfg))),
                                               _hidden(cfg)[-1]),
                num_bins=cfg.bins, tails="linear", tail_bound=cfg.tail_bound))
        flow = Flow(CompositeTransform(layers), StandardNormal([DIMS]))
    elif family == "maf":
        flow = MaskedAutoregressiveFlow(features=DIMS, hidden_features=made["hidden_features"],
                                        num_layers=cfg.layers,
                                        num_blocks_per_layer=made["num_blocks"],
                                        use_residual_blocks=False)
    else:
        layers = []
        for i in range(cfg.layers):
            if i:
                layers += [ReversePermutation(DIMS), LULinear(DIMS, identity_init=True)]
            layers.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features=DIMS, num_bins=cfg.bins, tails="linear", tail_bound=cfg.tail_bound,
                **made))
        flow = Flow(CompositeTransform(layers), StandardNormal([DIMS]))
    return Model("nflows", family, f"{FAMILY_NAMES[family]} (nflows {version('nflows')})",
                 flow, Standardised(flow, flow.log_prob, data))


BUILDERS = {"normflux": build_normflux, "zuko": build_zuko, "nflows": build_nflows}


def available(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


def count_params(module: nn.Module) -> tuple[int, int]:
    """``(raw, effective)`` trainable parameter counts.

    ``effective`` counts only the weights a binary ``mask`` buffer lets through (masked
    linear layers of MADE / zuko store full weight matrices of which part is unused), and
    of normflux's ``LULinear`` (full ``D x D`` ``lower`` / ``upper`` tensors) only the
    strict triangles it uses.
    """
    raw = sum(p.numel() for p in module.parameters() if p.requires_grad)
    eff = raw
    for m in module.modules():
        mask = getattr(m, "mask", None)
        w = getattr(m, "weight", None)
        if isinstance(mask, Tensor) and isinstance(w, Tensor) and mask.shape == w.shape:
            eff -= w.numel() - int(mask.count_nonzero())
        tril = getattr(m, "tril_mask", None)
        if isinstance(tril, Tensor) and isinstance(getattr(m, "lower", None), nn.Parameter):
            eff -= 2 * (tril.numel() - int(tril.count_nonzero()))
    return raw, eff


# --------------------------------------------------------------------------- protocol
class _TimeCap(Exception):
    pass


def fit(model: nn.Module, data: Data, cfg: Config, label: str, log=print) -> dict:
    """``fit_to_data`` called exactly as ``normflux train`` calls it, plus a time cap.

    (The CLI passes ``epochs``, ``batch_size``, ``lr``, ``patience``, ``seed`` and
    ``dequantize`` and leaves ``val_fraction`` and ``clip`` at their defaults, which are
    :class:`Config`'s.) A ``cfg.max_seconds`` safety cap ends training after the epoch in
    which it is exceeded; the best weights are restored then too and the result records
    ``stop="time cap"``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    best: dict = {}
    hist: dict = {}

    def callback(epoch: int, h: dict) -> None:
        hist["h"] = h  # the loop's own dict: it sets "stopped_early" after the callback
        if h["best_epoch"] == epoch:
            best["state"] = copy.deepcopy(model.state_dict())
        elapsed = time.perf_counter() - t0
        if epoch % 10 == 1 or epoch == cfg.epochs:
            log(f"  [{label}] epoch {epoch:3d}  train {h['train_loss'][-1]:8.2f}  "
                f"val {h['val_loss'][-1]:8.2f}  best {h['best_val_loss']:8.2f}"
                f"@{h['best_epoch']}  {elapsed:6.1f}s")
        if elapsed > cfg.max_seconds and epoch < cfg.epochs:
            raise _TimeCap

    stop = "epochs"
    try:
        fit_to_data(model, data.train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                    val_fraction=cfg.val_fraction, patience=cfg.patience, seed=cfg.seed,
                    clip=cfg.clip, dequantize=dequantize, progress=False, callback=callback)
        if hist["h"].get("stopped_early"):
            stop = "early stopping"
    except _TimeCap:
        stop = "time cap"
        model.load_state_dict(best["state"])
    h = hist["h"]
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                epochs_run=h["epochs"], best_epoch=h["best_epoch"],
                val_nll=h["best_val_loss"], stop=stop)


def dequantized_test_sets(data: Data, cfg: Config) -> list[Tensor]:
    """``cfg.test_draws`` successive dequantisations of the test set from one generator
    seeded with ``cfg.seed``; the first is ``normflux train``'s test draw."""
    g = torch.Generator().manual_seed(cfg.seed)
    return [dequantize(data.test, generator=g) for _ in range(cfg.test_draws)]


def eval_test_nlls(model: nn.Module, data: Data, cfg: Config) -> list[float]:
    """Test NLL (nats per example) of each dequantisation draw."""
    from normflux.training import evaluate_nll

    return [evaluate_nll(model, y) for y in dequantized_test_sets(data, cfg)]


def run_one(library: str, family: str, data: Data, cfg: Config, log=print) -> dict:
    torch.manual_seed(cfg.seed)  # the peers initialise from torch's global generator
    m = BUILDERS[library](family, cfg, data)
    raw, eff = count_params(m.module)
    label = f"{library} {family}"
    log(f"[{label}] {m.name}: {raw} parameters ({eff} unmasked)")
    info = fit(m.flow, data, cfg, label, log)
    t0 = time.perf_counter()
    nlls = eval_test_nlls(m.flow, data, cfg)
    nll = sum(nlls) / len(nlls)
    log(f"[{label}] test NLL {nll:.3f} ({bits_per_dim(nll):.4f} bits/dim), {info['stop']} "
        f"after {info['epochs_run']} epochs, {info['seconds']:.1f} s (load average "
        f"{os.getloadavg()[0]:.2f})")
    return dict(library=library, family=family, model=m.name, test_nll=round(nll, 3),
                bits_per_dim=round(float(bits_per_dim(nll)), 4),
                seconds=round(info["seconds"], 1), cpu_seconds=round(info["cpu_seconds"], 1),
                params=raw, params_unmasked=eff, val_nll=round(info["val_nll"], 3),
                epochs_run=info["epochs_run"], best_epoch=info["best_epoch"],
                stop=info["stop"], test_nll_first_draw=round(nlls[0], 4),
                test_nll_sd=round(statistics.stdev(nlls), 3) if len(nlls) > 1 else 0.0,
                eval_seconds=round(time.perf_counter() - t0, 2))


def markdown(rows: list[dict], baseline: float) -> str:
    """One table, rows grouped by family (in ``FAMILIES`` order); the best bits/dim of
    each family in bold; the independent-pixel baseline last."""
    out = ["| family | library | test NLL (nats) | bits/dim | train s (wall / CPU) | "
           "params (unmasked) | epochs (best), stop |",
           "|---|---|---:|---:|---:|---:|---|"]
    for fam in FAMILIES:
        group = [r for r in rows if r.get("family") == fam]
        ok = [r["bits_per_dim"] for r in group if not r.get("error")]
        for r in group:
            if r.get("error"):
                out.append(f"| {FAMILY_NAMES[fam]} | {r['library']} | failed: "
                           f"{r['error'][:60]} | - | - | - | - |")
                continue
            bpd = f"{r['bits_per_dim']:.3f}"
            if len(ok) > 1 and r["bits_per_dim"] == min(ok):
                bpd = f"**{bpd}**"
            out.append(f"| {FAMILY_NAMES[fam]} | {r['library']} | {r['test_nll']:.2f} | {bpd} | "
                       f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f} | {r['params']:,} "
                       f"({r['params_unmasked']:,}) | {r['epochs_run']} ({r['best_epoch']}), "
                       f"{r['stop']} |")
    nll = (baseline - math.log2(LEVELS)) * DIMS * math.log(2)
    out.append(f"| baseline | independent pixels, add-one histogram | {nll:.2f} | "
               f"{baseline:.3f} | - | {DIMS * (LEVELS - 1):,} | - |")
    return "\n".join(out)


def _models_arg(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model family {', '.join(bad) or text!r}; "
                                         f"choose from {','.join(FAMILIES)}")
    return tuple(dict.fromkeys(names))


def parse(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 2 test draws")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    p.add_argument("--models", type=_models_arg, default=FAMILIES,
                   help=f"comma-separated model families (default {','.join(FAMILIES)})")
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="conditioner hidden widths; one value W means (W, W) "
                        f"(default {' '.join(map(str, CLI['hidden']))})")
    for name in ("seed", "layers", "bins", "batch_size", "epochs", "patience", "test_draws",
                 "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("tail_bound", "lr", "clip", "max_seconds", "val_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    a = p.parse_args(argv)
    cfg = Config(**(QUICK if a.quick else {}))
    for k, v in vars(a).items():
        if k not in ("quick", "libraries", "models", "hidden") and v is not None:
            setattr(cfg, k, v)
    if a.hidden is not None:
        cfg.hidden = tuple(a.hidden) * 2 if len(a.hidden) == 1 else tuple(a.hidden)
    cfg.libraries = tuple(a.libraries)
    cfg.models = tuple(a.models)
    return cfg


def main(argv=None) -> int:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}; config "
        + json.dumps(asdict(cfg)))
    data = make_data(cfg)
    rows = []
    missing = [lib for lib in cfg.libraries if not available(lib)]
    for lib in missing:
        log(f"[{lib}] not installed, skipped (pip install 'normflux[bench]')")
    for family in cfg.models:
        for lib in cfg.libraries:
            if lib in missing:
                continue
            try:
                row = run_one(lib, family, data, cfg, log)
            except Exception as e:  # a diverged or broken peer must not hide the others
                log(f"[{lib} {family}] failed: {type(e).__name__}: {e}")
                row = dict(library=lib, family=family, model="-", test_nll=None,
                           bits_per_dim=None, seconds=None, params=None,
                           error=f"{type(e).__name__}: {e}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(markdown(rows, independent_pixel_baseline(cfg.seed)))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
