"""Speed suite: normflux vs normflows, nflows and zuko, and the bare networks.

Run::

    .venv/bin/python benchmarks/suite.py                  # B1-B4, eager (~3-5 min, 2 cores)
    .venv/bin/python benchmarks/suite.py --compile --only B1   # + torch.compile
    .venv/bin/python benchmarks/suite.py --quick --only B4     # smoke run (seconds)
    .venv/bin/python benchmarks/suite.py --profile --only B1,B3  # normflux op profiles
    python benchmarks/suite.py --device cuda --only B1,B3 --libs zuko  # on a GPU (wall time)

Protocol:

* the same architecture in every library (same widths, layers and parameter count; see
  :mod:`peers` for what each peer needs to express it), float32, ``torch.set_num_threads(1)``;
* every parameter perturbed by ``N(0, 0.05^2)`` after construction, so that no library is
  timed at its identity initialisation (zero conditioner outputs);
* all candidates of a figure (normflux, each peer, the bare conditioner networks, and the
  compiled models with ``--compile``) are built in one process, warmed up, then timed
  **round-robin**: each round times every candidate once (the starting candidate rotates),
  15 rounds (5 with ``--quick``). A sample is ``reps`` consecutive steps (``reps`` chosen
  at warm-up so that a sample lasts ~0.25 s), reported per step;
* CPU time (``time.process_time``) and wall time (``time.perf_counter``) per step, medians
  over the rounds; ratios are paired: ``ours / peer`` within each round, then the median;
  with ``--device cuda`` every model, data set and bare network lives on the GPU, a sample
  ends with ``torch.cuda.synchronize()``, and wall time is the primary figure (CPU time
  then only counts the host's launch and wait work);
* a train step is ``grads = None; loss = -log_prob(x).mean(); loss.backward()`` (B4 adds
  ``Adam.step()``); a sample step is ``sample(n)`` under ``torch.no_grad()``;
* the bare networks ("limit") are the conditioners alone (plain ``nn.Linear`` MLPs /
  masked linears of the same sizes), with the same number of passes: train = one
  forward + backward per layer on the batch (inputs require grad, as inner flow layers
  do); coupling sampling = one forward per layer; autoregressive sampling = D full
  forwards per layer (what nflows / normflows / zuko do);
* output: one JSON line per figure on stdout, then a markdown table (also written to
  ``benchmarks/results.md``, one section per mode; ``--quick`` runs do not write it).

Extension point (B5: Glow, residual flows): add a :class:`Benchmark` with
:func:`register` at the end of the registry below (a normflux builder, a ``peer_kind``
with builders in ``peers.BUILDERS`` -- libraries without one are reported "n/a" --, a
data function and a bare-network step builder). Nothing else needs to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import peers  # noqa: E402
from peers import Handle  # noqa: E402

import normflux  # noqa: E402

PERTURB_STD = 0.05
OURS = "normflux"
ORDER = ["normflux", "normflows", "nflows", "zuko", "bare", "normflux-compiled", "zuko-compiled"]
COMPILABLE = ("normflux", "zuko")
RESULTS = HERE / "results.md"


# ============================================================================ normflux models
def nfx_coupling_spline(features: int, layers: int, hidden: Sequence[int], bins: int,
                        tail_bound: float) -> Handle:
    """NSF coupling: ``layers`` x ``Coupling(RQSpline)``, alternating masks."""
    t = normflux.Chain([
        normflux.Coupling(normflux.RQSpline(bins, tail_bound=tail_bound), mask="alternating",
                          features=features, flip=(i % 2 == 1), hidden_features=tuple(hidden))
        for i in range(layers)])
    flow = normflux.Flow(t, normflux.DiagGaussian(features))
    return Handle(OURS, flow, flow.log_prob, flow.sample)


def _nfx_maf(bijection: Callable[[], normflux.transforms.bijections.Bijection],
             features: int, layers: int, hidden: Sequence[int]) -> Handle:
    mods: list[normflux.Transform] = []
    for i in range(layers):
        if i:
            mods.append(normflux.Permutation.reverse(features))
        mods.append(normflux.MaskedAutoregressive(bijection(), features=features,
                                                  hidden_features=tuple(hidden)))
    flow = normflux.Flow(normflux.Chain(mods), normflux.DiagGaussian(features))
    return Handle(OURS, flow, flow.log_prob, flow.sample)


def nfx_maf_affine(features: int, layers: int, hidden: Sequence[int]) -> Handle:
    """MAF: ``layers`` x ``MaskedAutoregressive(Affine)``, reverse permutations between."""
    return _nfx_maf(normflux.Affine, features, layers, hidden)


def nfx_maf_spline(features: int, layers: int, hidden: Sequence[int], bins: int,
                   tail_bound: float) -> Handle:
    """Autoregressive NSF: ``layers`` x ``MaskedAutoregressive(RQSpline)``."""
    return _nfx_maf(lambda: normflux.RQSpline(bins, tail_bound=tail_bound), features, layers,
                    hidden)


def nfx_realnvp(features: int, layers: int, hidden: Sequence[int]) -> Handle:
    """Real NVP: ``layers`` x ``Coupling(Affine)``, alternating masks."""
    t = normflux.Chain([
        normflux.Coupling(normflux.Affine(), mask="alternating", features=features,
                          flip=(i % 2 == 1), hidden_features=tuple(hidden))
        for i in range(layers)])
    flow = normflux.Flow(t, normflux.DiagGaussian(features))
    return Handle(OURS, flow, flow.log_prob, flow.sample)


# ============================================================================ bare networks
class BareMLP(nn.Sequential):
    """``Linear -> ReLU -> ... -> Linear``: a coupling conditioner alone."""

    def __init__(self, widths: Sequence[int]):
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        super().__init__(*layers)


class BareMasked(nn.Module):
    """A MADE-sized masked MLP alone: ``F.linear(x, W * M, b)`` with ReLUs (MADE masks)."""

    def __init__(self, features: int, hidden: Sequence[int], per_feature: int):
        super().__init__()
        deg_in = torch.arange(1, features + 1)
        degs = [deg_in] + [torch.arange(h) % max(features - 1, 1) + 1 for h in hidden]
        degs.append(deg_in.repeat_interleave(per_feature))
        self.linears = nn.ModuleList()
        masks = []
        for j, (a, b) in enumerate(zip(degs[:-1], degs[1:])):
            self.linears.append(nn.Linear(a.numel(), b.numel()))
            last = j == len(degs) - 2
            masks.append(((b[:, None] > a[None, :]) if last else (b[:, None] >= a[None, :])).float())
        for j, m in enumerate(masks):
            self.register_buffer(f"mask{j}", m)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        n = len(self.linears)
        for j, lin in enumerate(self.linears):
            x = F.linear(x, lin.weight * getattr(self, f"mask{j}"), lin.bias)
            if j < n - 1:
                x = torch.relu(x)
        return x


@dataclass
class BareSpec:
    """The conditioners of a figure alone: ``nets`` networks, each seeing ``(batch, n_in)``."""

    nets: Callable[[], list[nn.Module]]
    n_in: int
    passes_sample: int = 1  # sequential passes per net when sampling (D for autoregressive)


def bare_step(spec: BareSpec, mode: str, batch: int, gen: torch.Generator,
              device: torch.device | str = "cpu") -> tuple[nn.Module, Callable]:
    """A step of the bare networks for ``mode`` in ``train``, ``train_adam``, ``sample``."""
    nets = nn.ModuleList(spec.nets())
    perturb(nets, gen)
    nets.to(device)
    params = list(nets.parameters())
    if mode.startswith("train"):
        xs = [torch.randn(batch, spec.n_in, generator=gen).to(device).requires_grad_()
              for _ in nets]
        opt = torch.optim.Adam(params, lr=1e-3) if mode == "train_adam" else None

        def step():
            for p in params:
                p.grad = None
            for x in xs:
                x.grad = None
            loss = sum(net(x).sum() for net, x in zip(nets, xs))
            loss.backward()
            if opt is not None:
                opt.step()
            return loss
        return nets, step
    xs = [torch.randn(batch, spec.n_in, generator=gen).to(device) for _ in nets]
    k = spec.passes_sample

    def sample_step():
        with torch.no_grad():
            out = None
            for net, x in zip(nets, xs):
                for _ in range(k):
                    out = net(x)
            return out
    return nets, sample_step


# ============================================================================ registry
@dataclass
class Benchmark:
    """One benchmark (a row group of the table): a model, its data and its figures.

    Attributes:
        id: ``"B1"`` ...
        title: a one-line description.
        normflux: builder of the normflux :class:`Handle` from ``arch``.
        peer_kind: key of ``peers.BUILDERS[lib]`` (``None``: no peers).
        arch: architecture keywords, passed to every builder.
        batch: training batch; ``sample_n``: samples per sample step.
        modes: figures to time, among ``"train"``, ``"train_adam"``, ``"sample"``.
        bare: the conditioners alone (``None``: no limit column).
        data: ``gen -> x`` of shape ``(batch, ...)``.
    """

    id: str
    title: str
    normflux: Callable[..., Handle]
    peer_kind: str | None
    arch: dict
    batch: int
    modes: tuple[str, ...]
    bare: BareSpec | None
    sample_n: int = 1024
    data: Callable[[torch.Generator], Tensor] | None = None

    def make_data(self, gen: torch.Generator) -> Tensor:
        if self.data is not None:
            return self.data(gen)
        return torch.randn(self.batch, self.arch["features"], generator=gen)


BENCHMARKS: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    BENCHMARKS[b.id] = b
    return b


_B1 = dict(features=16, layers=8, hidden=(128, 128), bins=8, tail_bound=3.0)
register(Benchmark(
    "B1", "RQ-spline coupling, D=16, 8 layers, K=8, MLP 8-128-128-184, batch 1024",
    nfx_coupling_spline, "coupling_spline", _B1, 1024, ("train", "sample"),
    BareSpec(lambda: [BareMLP((8, 128, 128, 8 * 23)) for _ in range(8)], 8)))
_B2 = dict(features=16, layers=5, hidden=(128, 128))
register(Benchmark(
    "B2", "MAF (affine), D=16, 5 layers, MADE 16-128-128-32, batch 1024",
    nfx_maf_affine, "maf_affine", _B2, 1024, ("train", "sample"),
    BareSpec(lambda: [BareMasked(16, (128, 128), 2) for _ in range(5)], 16, passes_sample=16)))
_B3 = dict(features=16, layers=5, hidden=(128, 128), bins=8, tail_bound=3.0)
register(Benchmark(
    "B3", "autoregressive RQ spline, D=16, 5 layers, K=8, MADE 16-128-128-368, batch 1024",
    nfx_maf_spline, "maf_spline", _B3, 1024, ("train", "sample"),
    BareSpec(lambda: [BareMasked(16, (128, 128), 23) for _ in range(5)], 16, passes_sample=16)))
_B4 = dict(features=2, layers=16, hidden=(64, 64))
register(Benchmark(
    "B4", "Real NVP, D=2, 16 layers, MLP 1-64-64-2, batch 512, train step with Adam",
    nfx_realnvp, "realnvp", _B4, 512, ("train_adam",),
    BareSpec(lambda: [BareMLP((1, 64, 64, 2)) for _ in range(16)], 1)))
# B5 (Glow, residual flow) goes here: register(Benchmark("B5", ..., peer_kind="glow", ...))


#: parameter counts of the documented architectures (asserted by tests/test_benchmarks.py)
EXPECTED_PARAMS = {
    "B1": 8 * ((8 * 128 + 128) + (128 * 128 + 128) + (128 * 184 + 184)),      # 331200
    "B2": 5 * ((16 * 128 + 128) + (128 * 128 + 128) + (128 * 32 + 32)),      # 114080
    "B3": 5 * ((16 * 128 + 128) + (128 * 128 + 128) + (128 * 368 + 368)),    # 330800
    "B4": 16 * ((1 * 64 + 64) + (64 * 64 + 64) + (64 * 2 + 2)),              # 70688
}


# ============================================================================ helpers
def perturb(module: nn.Module, gen: torch.Generator, std: float = PERTURB_STD) -> None:
    """Add ``N(0, std^2)`` to every parameter (in place, from ``gen``)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def figure_id(bench: Benchmark, mode: str) -> str:
    """``"B1-train"``, ``"B1-sample"``, ... (``train_adam`` is reported as ``train``)."""
    return f"{bench.id}-{'sample' if mode == 'sample' else 'train'}"


def configure_torch() -> None:
    """The suite's process settings: one intra-op and one inter-op thread, float32."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work has started)
        pass
    torch.set_default_dtype(torch.float32)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_handle(bench: Benchmark, lib: str, device: torch.device | str = "cpu") -> Handle:
    """The perturbed model of ``lib`` (``"normflux"`` or a peer) for ``bench``, on ``device``
    (built and perturbed on the CPU, then moved, so that every device times the same model)."""
    torch.manual_seed(0)
    if lib == OURS:
        h = bench.normflux(**bench.arch)
    else:
        h = peers.build(lib, bench.peer_kind, **bench.arch)
    perturb(h.module, torch.Generator().manual_seed(1234))
    h.module.to(device)
    return h


def _err(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(tb)
                  if "/normflux/" in f.filename or "benchmarks" in f.filename), None)
    return f"{type(e).__name__}: {e}" + (f" (at {where})" if where else "")


def model_step(h: Handle, mode: str, x: Tensor, n: int, compiled: bool = False):
    """``(step, first_call)``: the timed closure; ``first_call`` is ``step`` itself (it
    triggers compilation when ``compiled``)."""
    params = list(h.module.parameters())
    if mode.startswith("train"):
        def loss_fn(x):
            return -h.log_prob(x).mean()
        if compiled:
            loss_fn = torch.compile(loss_fn)
        opt = torch.optim.Adam(params, lr=1e-3) if mode == "train_adam" else None

        def step():
            for p in params:
                p.grad = None
            loss = loss_fn(x)
            loss.backward()
            if opt is not None:
                opt.step()
            return loss
        return step

    def sample_fn():
        return h.sample(n)
    if compiled:
        sample_fn = torch.compile(sample_fn)

    def sample_step():
        with torch.no_grad():
            return sample_fn()
    return sample_step


def _finite(out) -> bool:
    return bool(torch.isfinite(out.detach()).all()) if isinstance(out, Tensor) else True


#: set by ``main`` for ``--device cuda``: every timed sample then waits for the GPU
_SYNC: Callable[[], None] | None = None


def _timed(step: Callable, reps: int) -> tuple[float, float]:
    """CPU and wall milliseconds per step over ``reps`` consecutive steps (GC paused; on a
    GPU the device is synchronised before the clocks start and before they stop)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if _SYNC is not None:
            _SYNC()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            step()
        if _SYNC is not None:
            _SYNC()
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        if enabled:
            gc.enable()
    return (c1 - c0) * 1e3 / reps, (w1 - w0) * 1e3 / reps


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ figures
@dataclass
class Figure:
    id: str
    bench: Benchmark
    mode: str
    steps: dict[str, Callable] = field(default_factory=dict)
    compile_s: dict[str, dict] = field(default_factory=dict)
    finite: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)


def build_figures(bench: Benchmark, libs: Sequence[str], compile_: bool,
                  warmup: int, device: torch.device | str = "cpu") -> list[Figure]:
    """Build every candidate of every figure of ``bench`` (models, data, steps) on ``device``
    and warm up."""
    figs = []
    for mode in bench.modes:
        fig = Figure(figure_id(bench, mode), bench, mode)
        x = bench.make_data(torch.Generator().manual_seed(0)).to(device)
        candidates: list[tuple[str, str, bool]] = [(lib, lib, False) for lib in libs]
        if compile_:
            candidates += [(f"{lib}-compiled", lib, True) for lib in COMPILABLE if lib in libs]
        for name, lib, compiled in candidates:
            if lib != OURS and (bench.peer_kind is None or bench.peer_kind not in
                                peers.BUILDERS.get(lib, {})):
                fig.errors[name] = "n/a (no builder for this architecture)"
                continue
            try:
                h = build_handle(bench, lib, device)
                fig.params[name] = num_params(h.module)
                step = model_step(h, mode, x, bench.sample_n, compiled)
                w0, c0 = time.perf_counter(), time.process_time()
                out = step()
                if _SYNC is not None:
                    _SYNC()
                first = (time.perf_counter() - w0, time.process_time() - c0)
                if compiled:
                    fig.compile_s[name] = {"wall_s": round(first[0], 2), "cpu_s": round(first[1], 2)}
                    _log(f"  {fig.id} {name}: first call (compile) {first[0]:.1f} s wall")
                fig.finite[name] = _finite(out)
                for _ in range(warmup):
                    out = step()
                fig.finite[name] = fig.finite[name] and _finite(out)
                fig.steps[name] = step
            except Exception as e:  # report precisely, keep going
                fig.errors[name] = _err(e)
                _log(f"  {fig.id} {name}: ERROR {fig.errors[name]}")
                if lib == OURS:
                    traceback.print_exc(file=sys.stderr)
        if bench.bare is not None:
            try:
                nets, step = bare_step(bench.bare, mode, bench.batch if mode != "sample"
                                       else bench.sample_n, torch.Generator().manual_seed(2),
                                       device)
                fig.params["bare"] = num_params(nets)
                for _ in range(warmup + 1):
                    step()
                fig.steps["bare"] = step
            except Exception as e:
                fig.errors["bare"] = _err(e)
        figs.append(fig)
    return figs


def _ratio_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [(OURS, p) for p in ("normflows", "nflows", "zuko", "bare") if p in names]
    if "normflux-compiled" in names:
        pairs += [("normflux-compiled", p) for p in ("zuko-compiled", "bare", OURS) if p in names]
    return [(a, b) for a, b in pairs if a in names]


def measure(fig: Figure, samples: int, target_s: float, device: str = "cpu") -> dict:
    """Time every candidate of ``fig`` round-robin; return the JSON record."""
    names = [n for n in ORDER if n in fig.steps]
    reps = {}
    for n in names:  # calibrate: one more step each (wall time on a GPU)
        c, w = _timed(fig.steps[n], 1)
        c = w if device != "cpu" else c
        reps[n] = max(1, min(200, round(target_s * 1e3 / max(c, 1e-3))))
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    for r in range(samples):
        gc.collect()
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c, w = _timed(fig.steps[n], reps[n])
            cpu[n].append(c)
            wall[n].append(w)
    med = statistics.median

    def q(v, p):
        s = sorted(v)
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    rec = {
        "figure": fig.id, "bench": fig.bench.id, "what": fig.bench.title,
        "step": ("sample(%d) under no_grad" % fig.bench.sample_n if fig.mode == "sample" else
                 "-log_prob(x).mean().backward()" + (" + Adam.step()" if fig.mode == "train_adam"
                                                     else "")),
        "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in fig.bench.arch.items()},
        "batch": fig.bench.sample_n if fig.mode == "sample" else fig.bench.batch,
        "samples": samples, "reps": reps,
        "cpu_ms": {n: round(med(cpu[n]), 3) for n in names},
        "wall_ms": {n: round(med(wall[n]), 3) for n in names},
        "cpu_ms_iqr": {n: [round(q(cpu[n], .25), 3), round(q(cpu[n], .75), 3)] for n in names},
        "ratio_cpu": {}, "ratio_wall": {},
        "compile_s": fig.compile_s, "params": fig.params, "finite": fig.finite,
        "errors": fig.errors,
        "threads": torch.get_num_threads(), "versions": versions(), "device": _device_name(device),
    }
    for a, b in _ratio_pairs(names):
        rec["ratio_cpu"][f"{a}/{b}"] = round(med([x / y for x, y in zip(cpu[a], cpu[b])]), 3)
        rec["ratio_wall"][f"{a}/{b}"] = round(med([x / y for x, y in zip(wall[a], wall[b])]), 3)
    return rec


def _device_name(device: str) -> str:
    """``"cpu"``, or ``"cuda (NVIDIA H200)"``: what the figures were measured on."""
    if device == "cpu":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def _git_state() -> str | None:
    """``<short HEAD>`` (``+dirty`` when ``src/`` has uncommitted changes), read-only."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None
    return (head + ("+dirty" if dirty else "")) or None


_VERSIONS: dict | None = None


def versions() -> dict:
    global _VERSIONS
    if _VERSIONS is not None:
        return _VERSIONS
    out = {"torch": torch.__version__, "normflux": normflux.__version__,
           "normflux_git": _git_state()}
    for lib in peers.LIBRARIES:
        try:
            from importlib.metadata import version
            out[lib] = version(lib)
        except Exception:
            out[lib] = None
    _VERSIONS = out
    return out


# ============================================================================ output
SHORT = {"normflux-compiled": "normflux-c", "zuko-compiled": "zuko-c"}


def markdown(records: list[dict], unit: str = "cpu") -> str:
    """Table of medians (``unit``: ``cpu`` or ``wall`` ms/step) and paired ratios."""
    key = f"{unit}_ms"
    names = [n for n in ORDER if any(n in r[key] or n in r["errors"] for r in records)]
    ratios: list[str] = []
    for r in records:
        for k in r[f"ratio_{unit}"]:
            if k not in ratios:
                ratios.append(k)
    comp = [n for n in names if n.endswith("-compiled")]
    head = ([f"{SHORT.get(n, n)}" for n in names]
            + [SHORT.get(a, a).replace("normflux", "ours") + " / " + SHORT.get(b, b)
               for a, b in (k.split("/") for k in ratios)]
            + [f"compile s ({SHORT[n]})" for n in comp])
    lines = ["| figure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in records:
        cells = []
        for n in names:
            if n in r[key]:
                cells.append(f"{r[key][n]:.3g}" if r[key][n] < 100 else f"{r[key][n]:.0f}")
            else:
                cells.append("err" if n in r["errors"] and not r["errors"][n].startswith("n/a")
                             else "n/a")
        cells += [f"{r[f'ratio_{unit}'][k]:.2f}" if k in r[f"ratio_{unit}"] else "" for k in ratios]
        cells += [f"{r['compile_s'][n]['wall_s']:.1f}" if n in r["compile_s"] else ""
                  for n in comp]
        lines.append(f"| {r['figure']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEADER = """# normflux speed suite: results

Produced by `benchmarks/suite.py` (issue 4); see its docstring for the protocol. Numbers
are milliseconds per step, median of the round-robin samples, one thread, float32, every
parameter perturbed by N(0, 0.05^2). Ratios are paired (ours / peer per round, then the
median): below 1 means normflux is faster. "bare" is the conditioner networks alone with
the same number of passes (the limit a flow library can approach). CPU time
(`time.process_time`) is the primary figure: wall time is only meaningful on an otherwise
idle machine (on a shared one it runs up to ~2x the CPU time). Compile times are the
wall time of the first call (cold: the inductor caches are disabled). The `memory`
sections come from `benchmarks/memory.py` and are in MiB (see its docstring). Each section
below is replaced when the same mode is run again.

Peer models (same architecture and parameter count; what each library needs):

"""


def write_results(path: Path, key: str, body: str) -> None:
    """Replace (or add) the section ``key`` of ``path``; other sections are kept."""
    old = path.read_text() if path.exists() else ""
    sections = dict(re.findall(r"<!-- run:(.*?) -->\n(.*?)\n<!-- end:\1 -->", old, re.S))
    sections[key] = body
    notes = "\n".join(f"* {lib}: {n}" for lib, ns in peers.NOTES.items() for n in ns)
    order = sorted(sections, key=lambda k: (not k.startswith("eager"), k))
    text = HEADER + notes + "\n\n" + "\n\n".join(
        f"<!-- run:{k} -->\n{sections[k]}\n<!-- end:{k} -->" for k in order) + "\n"
    path.write_text(text)


# ============================================================================ profiling
def profile(bench: Benchmark, rows: int, seconds: float) -> str:
    """``torch.profiler`` table of the normflux step(s) of ``bench`` by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    out = []
    x = bench.make_data(torch.Generator().manual_seed(0))
    for mode in bench.modes:
        h = build_handle(bench, OURS)
        step = model_step(h, mode, x, bench.sample_n)
        for _ in range(2):
            step()
        c, _ = _timed(step, 1)
        n = max(1, min(50, round(seconds * 1e3 / max(c, 1e-3))))
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        name = figure_id(bench, mode)
        ev = prof.key_averages()
        ops = sum(e.count for e in ev if e.key.startswith("aten::")) / n
        self_ms = sum(e.self_cpu_time_total for e in ev) / n / 1e3
        out.append(f"### normflux {name}\n\n{n} profiled steps; {c:.1f} ms/step unprofiled, "
                   f"{self_ms:.1f} ms/step self CPU under the profiler; {ops:.0f} aten op calls "
                   f"per step, nested calls included (divide the call counts below by {n})\n\n```\n"
                   + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
                   + "\n```")
    return "\n\n".join(out)


# ============================================================================ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="5 samples, short warm-up and samples; does not write results.md")
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help="comma-separated benchmark ids (default: all, %(default)s)")
    ap.add_argument("--compile", action="store_true",
                    help="also time normflux and zuko under torch.compile")
    ap.add_argument("--libs", default=",".join(peers.LIBRARIES),
                    help="peer libraries (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=None, help="rounds (default 15, quick 5)")
    ap.add_argument("--target", type=float, default=None,
                    help="seconds per sample (default 0.25, quick 0.03)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown results file (default {RESULTS.relative_to(HERE.parent)}; "
                    "not written by --quick unless given)")
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, print torch.profiler tables of normflux steps")
    ap.add_argument("--rows", type=int, default=15, help="profile rows (default 15)")
    ap.add_argument("--device", default="cpu",
                    help="where models and data live: cpu (default) or cuda[:N]; on a GPU "
                         "wall time is the primary figure")
    ap.add_argument("--batch", type=int, default=None,
                    help="override the batch (and sample count) of the selected benchmarks, "
                         "e.g. 64 for the small-batch overhead figure")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be positive, got {args.batch}")

    device = args.device
    if device != "cpu":
        if not device.startswith("cuda"):
            ap.error(f"--device must be cpu or cuda[:N], got {device!r}")
        if not torch.cuda.is_available():
            ap.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
        global _SYNC
        dev = torch.device(device)
        _SYNC = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    configure_torch()
    ids = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    if not ids:
        ap.error(f"--only selects nothing; known: {list(BENCHMARKS)}")
    if args.samples is not None and args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    unknown = [i for i in ids if i not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")

    if args.profile:
        if device != "cpu":
            ap.error("--profile profiles the CPU steps; drop --device")
        for i in ids:
            print(profile(BENCHMARKS[i], args.rows, 1.5 if not args.quick else 0.2), flush=True)
        return 0

    if args.compile:
        try:  # report cold compile times (no on-disk cache hits from earlier runs)
            import torch._inductor.config as icfg
            icfg.fx_graph_cache = False
            import torch._functorch.config as fcfg
            fcfg.enable_autograd_cache = False
        except Exception:
            pass

    samples = args.samples if args.samples is not None else (5 if args.quick else 15)
    target = args.target or (0.03 if args.quick else 0.25)
    warmup = 1 if args.quick else 3
    libs = [OURS]
    for lib in [s.strip() for s in args.libs.split(",") if s.strip()]:
        why = peers.available(lib)
        if why is None:
            libs.append(lib)
        else:
            _log(f"peer {lib} unavailable ({why}): skipped")

    t0 = time.perf_counter()
    records = []
    for i in ids:
        bench = BENCHMARKS[i]
        if args.batch is not None:
            bench = dataclasses.replace(bench, batch=args.batch, sample_n=args.batch,
                                        title=f"{bench.title} (batch overridden: {args.batch})")
        _log(f"{i}: {bench.title} -- building and warming up")
        for fig in build_figures(bench, libs, args.compile, warmup, device):
            _log(f"{fig.id}: timing {', '.join(fig.steps)} ({samples} rounds)")
            rec = measure(fig, samples, target, device)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            del fig
            gc.collect()
    elapsed = time.perf_counter() - t0

    cmd = "python benchmarks/suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = versions()
    tables = [("CPU time (ms/step):", "cpu"), ("Wall time (ms/step):", "wall")]
    if device != "cpu":  # the GPU's figure is the wall time
        tables = [("Wall time (ms/step), the primary figure on a GPU:", "wall"),
                  ("Host CPU time (ms/step; launches and waits):", "cpu")]
    body = "\n".join([
        f"## {'torch.compile' if args.compile else 'eager'}: {', '.join(ids)}"
        + (f", batch {args.batch}" if args.batch is not None else "")
        + (f", {device}" if device != "cpu" else ""),
        "",
        f"`{cmd.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} ({platform.processor() or 'cpu'}), device {_device_name(device)}, "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + f", {samples} rounds, {elapsed / 60:.1f} min.",
    ])
    for title, unit in tables:
        body += f"\n\n{title}\n\n{markdown(records, unit)}"
    errs = [f"* {r['figure']} {n}: {e}" for r in records for n, e in r["errors"].items()
            if not e.startswith("n/a")]
    bad = [f"* {r['figure']} {n}: non-finite output" for r in records
           for n, ok in r["finite"].items() if not ok]
    if errs or bad:
        body += "\n\nProblems:\n\n" + "\n".join(errs + bad)
    print("\n" + body, flush=True)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None and not args.no_write:
        key = f"{'compile' if args.compile else 'eager'} {','.join(ids)}"
        if args.batch is not None:
            key += f" batch {args.batch}"
        if device != "cpu":
            key += f" {device}"
        write_results(out, key, body)
        _log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
