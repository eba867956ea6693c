"""Density estimation on scikit-learn's 8x8 digits: normflux vs zuko vs nflows, one protocol.

Every library is trained and evaluated by the *same* code: each model is wrapped in a
thin adapter (:class:`Standardised`) and handed to :func:`normflux.training.fit_to_data`
and :func:`normflux.training.evaluate_nll`; only the flow inside differs.

Protocol (all defaults; see ``--help``):

* data: :func:`normflux.data.digits.load_digits_split` (1500 train / 297 test, seed 0);
  10 % of train (150 images, ``default_rng(seed + 1)``) is held out for validation, the
  other 1350 are trained on;
* dequantisation: ``y = (x + u) / 17``, ``u ~ U[0, 1)`` -- a fresh, seeded draw every
  epoch for training, one fixed draw for validation, 10 seeded draws for the test set
  (the same noise for every library);
* standardisation (fixed, not learned): ``s = (y - m) / sd`` with ``m``, ``sd`` the exact
  mean and standard deviation of ``y`` over the 1350 training images
  (``m = (mean(x) + 1/2) / 17``, ``sd^2 = (var(x) + 1/12) / 17^2``). Its log-determinant
  ``-sum(log sd)`` is added back, so every NLL is in nats per example on the
  ``(x + u) / 17`` scale and ``bits/dim = log2(17) + nll / (64 ln 2)``;
* optimiser: Adam (lr 1e-3), cosine annealing to 0 over the epoch budget (150 epochs),
  batch 64, gradient-norm clipping at 5; early stopping on the validation NLL with
  patience 20, best weights restored; a safety cap of 480 s of training per library;
* evaluation: the test NLL averaged over the 10 dequantisation draws of the 297 images.

Models (matched as far as the libraries allow):

* ``normflux`` NSF: ``normflux.models.build("nsf", 64, layers=5, hidden=(128, 128),
  bins=8, tail_bound=3, permutation="random", seed=0)``: 5 rational-quadratic spline
  couplings (K = 8, linear tails outside [-3, 3]), alternating masks, seeded random
  permutations in between, conditioner MLP 32 -> 128 -> 128 -> 32 * 23 (ReLU, zero last
  layer), standard normal base;
* ``zuko`` NSF: 5 ``MaskedAutoregressiveTransform(passes=2)`` (zuko's coupling) with
  ``MonotonicRQSTransform(bound=3)``, 8 bins, ``hidden_features=(128, 128)``, each given
  the *same* split of coordinates as the matching normflux layer (``order`` built from
  the normflux model's masks and permutations). zuko's ``NSF`` class hard-codes bound 5
  and only offers reversed or random orders, hence the explicit construction. Unlike
  normflux, zuko also applies an unconditional (learned-constant) spline to the
  conditioning half;
* ``nflows`` MAF: ``MaskedAutoregressiveFlow(features=64, hidden_features=128,
  num_layers=5, num_blocks_per_layer=1, use_residual_blocks=False)`` -- an *affine*
  autoregressive flow (the brief asks for nflows' MAF), whose MADE has the same two
  hidden layers of 128 as the other conditioners; reversal permutations in between.

Usage::

    python benchmarks/digits.py                 # full run (a few minutes per library)
    python benchmarks/digits.py --quick         # smoke test: 2 epochs, 2 test draws
    python benchmarks/digits.py --libraries normflux zuko --epochs 50

Output: one JSON line per library on stdout (``library``, ``model``, ``test_nll``,
``bits_per_dim``, ``seconds`` -- wall-clock training time --, ``params`` and extras:
``cpu_seconds``, ``params_unmasked``, ``val_nll``, ``epochs_run``, ``best_epoch``,
``stop``), then a markdown table with the independent-pixel baseline. Progress goes to
stderr. Libraries that are not installed are skipped with a note on stderr; a library
that fails (e.g. diverges) gets a row with ``error`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from normflux.data.digits import (DIMS, LEVELS, bits_per_dim, dequantize,
                                  independent_pixel_baseline, load_digits_split)

LIBRARIES = ("normflux", "zuko", "nflows")


# --------------------------------------------------------------------------- config
@dataclass
class Config:
    seed: int = 0
    layers: int = 5
    hidden: int = 128
    bins: int = 8
    tail_bound: float = 3.0
    batch_size: int = 64
    lr: float = 1e-3
    epochs: int = 150
    patience: int = 20
    clip: float = 5.0
    val_fraction: float = 0.1
    test_draws: int = 10
    max_seconds: float = 480.0  # safety cap per library (the brief's ~8 min budget)
    threads: int = 2
    libraries: tuple[str, ...] = field(default=LIBRARIES)


QUICK = dict(epochs=2, patience=2, test_draws=2, max_seconds=60.0)


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Tensor           # (1350, 64) int64
    val: Tensor             # (150, 64) int64
    test: Tensor            # (297, 64) int64
    mean: Tensor            # (64,) float32, on the (x + u) / 17 scale
    std: Tensor             # (64,) float32


def make_data(cfg: Config) -> Data:
    """The split, the 10 % validation hold-out and the exact standardisation statistics."""
    train_all, test = load_digits_split(cfg.seed)
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(train_all))
    n_val = int(round(cfg.val_fraction * len(train_all)))
    val, train = train_all[perm[:n_val]], train_all[perm[n_val:]]
    xt = train.astype(np.float64)
    mean = (xt.mean(0) + 0.5) / LEVELS                       # E[(x + u) / 17]
    std = np.sqrt((xt.var(0) + 1.0 / 12.0) / LEVELS ** 2)    # Var[(x + u) / 17], u indep.
    return Data(torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test),
                torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))


def dequantize_fn(x: Tensor, generator: torch.Generator) -> Tensor:
    """``fit_to_data``'s ``dequantize`` hook: ``(x + u) / 17`` from the loop's generator."""
    return dequantize(x, generator=generator)


class Standardised(nn.Module):
    """Any library's flow behind the fixed standardisation, with normflux's Flow API.

    ``log_prob(y) = log q(s) - sum(log sd)`` with ``s = (y - m) / sd``, in nats on the
    ``(x + u) / 17`` scale, and ``forward_kld(y) = -mean log_prob(y)``: all that
    :func:`normflux.training.fit_to_data` and ``evaluate_nll`` call, so that the three
    libraries run through the very same training and evaluation code.
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
    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]  # standardised data (batch, 64) -> (batch,)


def build_normflux(cfg: Config, ref: nn.Module | None = None) -> Model:
    import normflux
    from normflux.models import build

    flow = build("nsf", DIMS, layers=cfg.layers, hidden=(cfg.hidden, cfg.hidden),
                 bins=cfg.bins, tail_bound=cfg.tail_bound, permutation="random",
                 seed=cfg.seed)
    return Model("normflux", f"NSF coupling ({normflux.__version__})", flow, flow.log_prob)


def coupling_splits(flow: nn.Module) -> list[Tensor]:
    """For each coupling layer of a normflux flow, the data coordinates it transforms.

    Follows the permutations of the chain, so the returned index sets are in the
    coordinates of the flow's input; used to give zuko exactly the same masks.
    """
    from normflux.transforms import Coupling, Permutation

    cur, out = torch.arange(DIMS), []
    for t in flow.transform:
        if isinstance(t, Permutation):
            cur = cur[t.perm]
        elif isinstance(t, Coupling):
            out.append(cur[t.idx_b].clone())
    return out


def build_zuko(cfg: Config, ref: nn.Module | None = None) -> Model:
    from functools import partial

    import zuko
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, UnconditionalDistribution
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.transforms import MonotonicRQSTransform

    # zuko's coupling is a masked autoregressive transform with passes=2: coordinates
    # whose order is < D/2 condition those whose order is >= D/2. Give it the masks of
    # the normflux model (``ref``) so that both flows couple the same coordinates.
    if ref is None:
        ref = build_normflux(cfg).module
    orders = []
    for b in coupling_splits(ref):
        order = torch.zeros(DIMS, dtype=torch.long)
        is_b = torch.zeros(DIMS, dtype=torch.bool)
        is_b[b] = True
        order[~is_b] = torch.arange(int((~is_b).sum()))
        order[is_b] = DIMS - len(b) + torch.arange(len(b))
        orders.append(order)
    # (the split point is ceil(D / passes) = 32, so this needs |B| = 32, which the
    # alternating masks of build("nsf") give for D = 64)
    transforms = [
        MaskedAutoregressiveTransform(
            features=DIMS, passes=2, order=order, hidden_features=(cfg.hidden, cfg.hidden),
            univariate=partial(MonotonicRQSTransform, bound=cfg.tail_bound, slope=1e-3),
            shapes=[(cfg.bins,), (cfg.bins,), (cfg.bins - 1,)])
        for order in orders]
    base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(DIMS), scale=torch.ones(DIMS),
                                     buffer=True)
    flow = Flow(transforms, base)
    return Model("zuko", f"NSF coupling ({zuko.__version__})", flow,
                 lambda s: flow().log_prob(s))


def build_nflows(cfg: Config, ref: nn.Module | None = None) -> Model:
    from importlib.metadata import version

    from nflows.flows.autoregressive import MaskedAutoregressiveFlow

    flow = MaskedAutoregressiveFlow(features=DIMS, hidden_features=cfg.hidden,
                                    num_layers=cfg.layers, num_blocks_per_layer=1,
                                    use_residual_blocks=False)
    return Model("nflows", f"MAF affine ({version('nflows')})", flow, flow.log_prob)


BUILDERS = {"normflux": build_normflux, "zuko": build_zuko, "nflows": build_nflows}


def available(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


def count_params(module: nn.Module) -> tuple[int, int]:
    """``(raw, effective)`` trainable parameter counts.

    ``effective`` counts only the weights a binary ``mask`` buffer lets through (masked
    linear layers of MADE / zuko store full weight matrices of which part is unused).
    """
    raw = sum(p.numel() for p in module.parameters() if p.requires_grad)
    eff = raw
    for m in module.modules():
        mask = getattr(m, "mask", None)
        w = getattr(m, "weight", None)
        if isinstance(mask, Tensor) and isinstance(w, Tensor) and mask.shape == w.shape:
            eff -= w.numel() - int(mask.count_nonzero())
    return raw, eff


# --------------------------------------------------------------------------- protocol
class _TimeCap(Exception):
    pass


def fit(model: Standardised, data: Data, cfg: Config, library: str, log=print) -> dict:
    """:func:`normflux.training.fit_to_data` with the benchmark's settings.

    Adam + cosine schedule over ``cfg.epochs``, batch ``cfg.batch_size``, clipping
    ``cfg.clip``, early stopping on the (once dequantised) validation set, best weights
    restored. A ``cfg.max_seconds`` safety cap ends training early (best weights are
    restored then too; the result records ``stop="time cap"``).
    """
    from normflux.training import fit_to_data

    t0, c0 = time.perf_counter(), time.process_time()
    best: dict = {}

    def callback(epoch: int, h: dict) -> None:
        if h["best_epoch"] == epoch:
            best["state"] = copy.deepcopy(model.state_dict())
        elapsed = time.perf_counter() - t0
        if epoch % 10 == 1 or epoch == cfg.epochs:
            log(f"  [{library}] epoch {epoch:3d}  train {h['train_loss'][-1]:8.2f}  "
                f"val {h['val_loss'][-1]:8.2f}  best {h['best_val_loss']:8.2f}"
                f"@{h['best_epoch']}  {elapsed:6.1f}s")
        if elapsed > cfg.max_seconds and epoch < cfg.epochs:
            raise _TimeCap

    stop = "epochs"
    hist: dict = {}

    def record(epoch: int, h: dict) -> None:
        hist["h"] = h  # the loop's own dict: it sets "stopped_early" after the callback
        callback(epoch, h)

    try:
        fit_to_data(model, data.train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                    lr=cfg.lr, val_data=data.val, patience=cfg.patience, seed=cfg.seed,
                    clip=cfg.clip, dequantize=dequantize_fn, progress=False,
                    callback=record)
        if hist["h"].get("stopped_early"):
            stop = "early stopping"
    except _TimeCap:
        stop = "time cap"
        model.load_state_dict(best["state"])
    h = hist["h"]
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                epochs_run=h["epochs"], best_epoch=h["best_epoch"],
                val_nll=h["best_val_loss"], stop=stop)


def test_nll(model: Standardised, data: Data, cfg: Config) -> float:
    """Test NLL (nats per example) averaged over ``cfg.test_draws`` seeded dequantisations."""
    from normflux.training import evaluate_nll

    g = torch.Generator().manual_seed(cfg.seed + 4)
    return sum(evaluate_nll(model, dequantize(data.test, generator=g))
               for _ in range(cfg.test_draws)) / cfg.test_draws


def run_library(library: str, data: Data, cfg: Config, ref: nn.Module | None = None,
                log=print) -> dict:
    torch.manual_seed(cfg.seed)
    m = BUILDERS[library](cfg, ref)
    raw, eff = count_params(m.module)
    log(f"[{library}] {m.name}: {raw} parameters ({eff} unmasked)")
    model = Standardised(m.module, m.log_prob, data)
    info = fit(model, data, cfg, library, log)
    t0 = time.perf_counter()
    nll = test_nll(model, data, cfg)
    return dict(library=library, model=m.name, test_nll=round(nll, 3),
                bits_per_dim=round(float(bits_per_dim(nll)), 4),
                seconds=round(info["seconds"], 1), cpu_seconds=round(info["cpu_seconds"], 1),
                params=raw, params_unmasked=eff, val_nll=round(info["val_nll"], 3),
                epochs_run=info["epochs_run"], best_epoch=info["best_epoch"],
                stop=info["stop"], eval_seconds=round(time.perf_counter() - t0, 2))


def markdown(rows: list[dict], baseline: float) -> str:
    out = ["| library | model | test NLL (nats) | bits/dim | seconds | params | epochs (best), stop |",
           "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['library']} | failed: {r['error'][:60]} | - | - | - | - | - |")
            continue
        out.append(f"| {r['library']} | {r['model']} | {r['test_nll']:.2f} | "
                   f"{r['bits_per_dim']:.3f} | {r['seconds']:.0f} | {r['params']:,} | "
                   f"{r['epochs_run']} ({r['best_epoch']}), {r['stop']} |")
    nll = (baseline - math.log2(LEVELS)) * DIMS * math.log(2)
    out.append(f"| (baseline) | independent pixels, add-one histogram | {nll:.2f} | "
               f"{baseline:.3f} | - | {DIMS * (LEVELS - 1):,} | - |")
    return "\n".join(out)


def parse(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 2 test draws")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    for name in ("seed", "layers", "hidden", "bins", "batch_size", "epochs", "patience",
                 "test_draws", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("tail_bound", "lr", "clip", "max_seconds"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    a = p.parse_args(argv)
    cfg = Config(**(QUICK if a.quick else {}))
    for k, v in vars(a).items():
        if k not in ("quick", "libraries") and v is not None:
            setattr(cfg, k, v)
    cfg.libraries = tuple(a.libraries)
    return cfg


def main(argv=None) -> int:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config "
        + json.dumps({k: v for k, v in asdict(cfg).items()}))
    data = make_data(cfg)
    ref = build_normflux(cfg).module  # zuko copies its coupling masks
    rows = []
    for lib in cfg.libraries:
        if not available(lib):
            log(f"[{lib}] not installed, skipped (pip install 'normflux[bench]')")
            continue
        try:
            row = run_library(lib, data, cfg, ref, log)
        except Exception as e:  # a diverged or broken peer must not hide the others
            log(f"[{lib}] failed: {type(e).__name__}: {e}")
            row = dict(library=lib, model="-", test_nll=None, bits_per_dim=None,
                       seconds=None, params=None, error=f"{type(e).__name__}: {e}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(markdown(rows, independent_pixel_baseline(cfg.seed)))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
