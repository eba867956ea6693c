"""Tests of the speed suite ``benchmarks/suite.py`` and the memory benchmark
``benchmarks/memory.py`` (issue 4).

Fast: the normflux builders produce the documented architectures, with the parameter
counts of the peers' (identical) architectures and of the bare networks; the memory
benchmark's figure selection, peak arithmetic, allocator events and table. Slow: smoke
runs of ``suite.py --quick --only B4`` and ``memory.py --quick --only B4`` (normflux only)
whose JSON lines parse.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.py"
MEMORY = ROOT / "benchmarks" / "memory.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


suite = _load("normflux_bench_suite", SUITE)
memory = _load("normflux_bench_memory", MEMORY)
import normflux  # noqa: E402
from normflux.nets import MADE, MLP  # noqa: E402


def _linears(module):
    if isinstance(module, MLP):  # one packed parameter: the layers' weight views
        return [(w.shape[1], w.shape[0]) for w, _ in module.linear_parameters()]
    return [(m.in_features, m.out_features) for m in module.modules()
            if isinstance(m, torch.nn.Linear)]


def test_documented_parameter_counts():
    # the formula in EXPECTED_PARAMS, spelled out
    assert suite.EXPECTED_PARAMS == {"B1": 331200, "B2": 114080, "B3": 330800, "B4": 70688}
    assert set(suite.BENCHMARKS) >= {"B1", "B2", "B3", "B4"}


@pytest.mark.parametrize("bid", ["B1", "B2", "B3", "B4"])
def test_normflux_builder_architecture(bid):
    bench = suite.BENCHMARKS[bid]
    h = bench.normflux(**bench.arch)
    flow = h.module
    assert isinstance(flow, normflux.Flow)
    assert suite.num_params(flow) == suite.EXPECTED_PARAMS[bid]
    layers = list(flow.transform)
    a = bench.arch
    D, H = a["features"], tuple(a["hidden"])
    if bid in ("B1", "B4"):  # couplings, alternating masks
        assert len(layers) == a["layers"]
        assert all(isinstance(t, normflux.Coupling) for t in layers)
        for i, t in enumerate(layers):
            odd = torch.arange(D) % 2 == 1
            assert torch.equal(t.mask, ~odd if i % 2 else odd)
            n_b = int(t.mask.sum())
            if bid == "B1":
                assert isinstance(t.bijection, normflux.RQSpline)
                assert (t.bijection.bins, t.bijection.tail_bound) == (8, 3.0)
                P = 3 * 8 - 1
            else:
                assert isinstance(t.bijection, normflux.Affine)
                P = 2
            assert _linears(t.conditioner) == [(D - n_b, H[0]), (H[0], H[1]), (H[1], n_b * P)]
    else:  # MAF / autoregressive spline: AR, reverse perm, AR, ...
        assert len(layers) == 2 * a["layers"] - 1
        ar, perms = layers[0::2], layers[1::2]
        assert all(isinstance(t, normflux.MaskedAutoregressive) for t in ar)
        assert all(isinstance(p, normflux.Permutation) for p in perms)
        for p in perms:
            assert p.perm.tolist() == list(range(D - 1, -1, -1))
        P = 2 if bid == "B2" else 23
        for t in ar:
            assert isinstance(t.bijection, normflux.Affine if bid == "B2" else normflux.RQSpline)
            assert isinstance(t.made, MADE)
            assert _linears(t.made) == [(D, H[0]), (H[0], H[1]), (H[1], D * P)]
    # the bare networks have the same parameters as the conditioners
    nets = torch.nn.ModuleList(bench.bare.nets())
    assert suite.num_params(nets) == suite.EXPECTED_PARAMS[bid]


@pytest.mark.parametrize("bid", ["B1", "B2", "B3", "B4"])
def test_perturbed_model_runs_and_is_not_identity(bid):
    bench = suite.BENCHMARKS[bid]
    h = suite.build_handle(bench, "normflux")
    x = torch.randn(64, bench.arch["features"], generator=torch.Generator().manual_seed(0))
    lp = h.log_prob(x)
    assert lp.shape == (64,) and torch.isfinite(lp).all()
    base = h.module.base.log_prob(x)
    assert (lp - base).abs().max() > 1e-3  # perturbed: the flow is not the identity
    with torch.no_grad():
        s = h.sample(32)
    assert s.shape == (32, bench.arch["features"]) and torch.isfinite(s).all()


@pytest.mark.parametrize("lib", ["normflows", "nflows", "zuko"])
@pytest.mark.parametrize("bid", ["B1", "B2", "B3", "B4"])
def test_peer_parameter_counts_equal_ours(lib, bid):
    pytest.importorskip(lib)
    bench = suite.BENCHMARKS[bid]
    h = suite.build_handle(bench, lib)
    assert suite.num_params(h.module) == suite.EXPECTED_PARAMS[bid]
    x = torch.randn(8, bench.arch["features"])
    assert torch.isfinite(h.log_prob(x)).all()


def test_results_sections_are_replaced(tmp_path):
    path = tmp_path / "results.md"
    suite.write_results(path, "eager B1", "BODY-ONE")
    suite.write_results(path, "compile B1", "c")
    suite.write_results(path, "eager B1", "BODY-TWO")
    text = path.read_text()
    assert "BODY-TWO" in text and "BODY-ONE" not in text and text.count("<!-- run:") == 2
    assert text.index("run:eager B1") < text.index("run:compile B1")


@pytest.mark.slow
def test_quick_b4_smoke():
    for lib in ("normflows", "nflows", "zuko"):
        pytest.importorskip(lib)
    proc = subprocess.run([sys.executable, str(SUITE), "--quick", "--only", "B4", "--no-write"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["figure"] for r in records] == ["B4-train"]
    r = records[0]
    for name in ("normflux", "normflows", "nflows", "zuko", "bare"):
        assert r["cpu_ms"][name] > 0 and r["wall_ms"][name] > 0
        assert r["params"][name] == suite.EXPECTED_PARAMS["B4"]
    assert set(r["ratio_cpu"]) == {"normflux/normflows", "normflux/nflows", "normflux/zuko",
                                   "normflux/bare"}
    assert all(r["finite"].values()) and not r["errors"]
    assert r["threads"] == 1
    assert "| B4-train |" in proc.stdout


# ---------------------------------------------------------------------------- memory.py
def test_memory_figure_selection():
    assert memory.select_figures("B1,B2,B3,B4") == [
        "B1-train", "B1-sample", "B2-train", "B2-sample", "B3-train", "B3-sample", "B4-train"]
    assert memory.select_figures("b4, B1-sample") == ["B1-sample", "B4-train"]
    with pytest.raises(ValueError):
        memory.select_figures("B9")


def test_memory_running_peak():
    assert memory.running_peak([]) == (0, 0)
    assert memory.running_peak([-5, 3, 10, -10, 4]) == (8, 2)
    assert memory.running_peak([4, -4], start=10) == (14, 10)


def test_memory_allocator_events_are_exact():
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(1000, 250)  # 1,000,000 bytes
        b = torch.empty(500)  # 2,000 bytes
        del a
        c = torch.empty(100)
        del b, c
    assert memory.running_peak(memory.allocator_deltas(prof)) == (1_002_000, 0)


def test_memory_table_ratio():
    mib = memory.MIB
    recs = [{"figure": "B1-train", "library": "normflux", "step_peak_bytes": 2 * mib},
            {"figure": "B1-train", "library": "nflows", "step_peak_bytes": 5 * mib},
            {"figure": "B1-train", "library": "zuko", "step_peak_bytes": 4 * mib},
            {"figure": "B1-train", "library": "normflows", "error": "RuntimeError: x"}]
    table = memory.markdown(recs, "step_peak_bytes")
    assert table.splitlines()[0] == (
        "| figure | normflux | normflows | nflows | zuko | ours / lowest peer |")
    assert table.splitlines()[2] == "| B1-train | 2.0 | err | 5.0 | 4.0 | 0.50 |"


@pytest.mark.slow
def test_memory_quick_b4_normflux(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(MEMORY), "--quick", "--only", "B4", "--libs", "",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["figure"], r["library"]) for r in records] == [("B4-train", "normflux")]
    r = records[0]
    assert "error" not in r and r["finite"] and r["threads"] == 1 and r["warmup"] == 1
    assert r["params"] == suite.EXPECTED_PARAMS["B4"]
    # parameters, gradients and Adam's two moments are live when the step starts
    assert r["live_start_bytes"] >= 4 * 4 * suite.EXPECTED_PARAMS["B4"]
    # the step holds at least one (batch, 64) float32 activation per layer for backward
    assert r["step_peak_bytes"] >= 16 * 512 * 64 * 4
    assert r["live_peak_bytes"] == r["live_start_bytes"] + r["step_peak_bytes"]
    assert r["rss_steps_bytes"] >= 0 and r["rss_peak_bytes"] > r["rss_built_bytes"] > 0
    assert "| B4-train |" in proc.stdout
    text = out.read_text()
    assert "<!-- run:memory B4-train -->" in text and "ours / lowest peer" in text
