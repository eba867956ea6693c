"""Peak memory per step (issue 4): normflux vs normflows, nflows and zuko.

Issue 4 asks for "peak memory per step no higher than the lowest peer's (measured in
fresh processes)". Run::

    .venv/bin/python benchmarks/memory.py                       # every figure, every library
    .venv/bin/python benchmarks/memory.py --only B1,B3-sample   # benchmarks or single figures
    .venv/bin/python benchmarks/memory.py --quick --only B4 --libs ""   # smoke run, normflux only

Protocol:

* the figures and models are the speed suite's (``benchmarks/suite.py``): for every
  figure (B1-train, B1-sample, B2-train, B2-sample, B3-train, B3-sample, B4-train) and
  every library, the model is built by ``suite.build_handle`` (same builder, same
  ``N(0, 0.05^2)`` perturbation), the data by ``Benchmark.make_data`` (same seed), the step
  by ``suite.model_step`` (train: ``grads = None; -log_prob(x).mean().backward()``, B4
  adding ``Adam.step()``; sample: ``sample(n)`` under ``no_grad``), with
  ``suite.configure_torch()`` (1 thread, float32);
* every (figure, library) is measured in **fresh processes** (``memory.py --child FIG LIB
  PHASE``, run one at a time, with ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``), so no
  allocator state, cache or high-water mark carries over from another model. Two children
  per (figure, library): ``alloc`` (torch's allocator, under the profiler) and ``rss``
  (the process, without the profiler, whose own bookkeeping would show up in the RSS);
* in each child: build, run 2 warm-up steps (1 with ``--quick``), ``gc.collect()``, then
  measure one step. Steps run with the garbage collector enabled, as in a training loop.

What the numbers mean (MiB = 2^20 bytes):

* ``step_peak`` (the headline, first table): the peak of the bytes allocated by torch's
  CPU allocator during the measured step, **above the level at the step's start**: the
  transient memory one step needs (saved activations, spline/conditioner intermediates,
  new gradients minus the previous ones freed by ``grads = None``, Adam's temporaries,
  the samples and everything computed on the way). Measured exactly, from the
  allocator's own events: ``torch.profiler.profile(profile_memory=True)`` records every
  allocation and free of the CPU allocator with its size; the events of the step are
  summed in time order and the running maximum is taken. One profiler session covers
  the build and the warm-up and a second one the measured step: the allocator reports a
  free only for blocks allocated while a profiler was recording, so the first session
  makes the frees of the step (the previous step's gradients, ...) visible.
* ``live_peak``: the same peak counted from before the model was built: every byte the
  library holds through torch at the step's peak (parameters, buffers such as masks, the
  data, gradients, Adam's state, and the step's transients) = ``live_start`` (the
  net bytes allocated by the build and warm-up session, i.e. live when the step begins) +
  ``step_peak``.
* ``rss_steps`` (third table): how far the process's peak resident set size rises above
  its level just after the build, over the first three steps of a freshly built model
  (the 2 warm-up steps and the measured one): ``VmHWM`` at the end minus ``VmRSS`` after
  the build, the high-water mark being reset (``/proc/self/clear_refs``) after the build,
  so the import phase does not count. This is what the operating system had to supply,
  including non-tensor memory (oneDNN/BLAS scratch, Python objects, allocator slack), and
  after the first step glibc's ``malloc`` reuses freed pages, so it is mostly set by the
  first step. Coarser and allocator-dependent: ``step_peak`` is the comparison figure.
* also in the JSON: ``rss_step`` (``VmHWM`` minus ``VmRSS`` over the measured step alone,
  high-water mark reset just before it: usually near 0, since the step re-uses the pages
  the warm-up steps freed), ``rss_built`` (``VmRSS`` after the build, imports included)
  and ``rss_peak`` (the absolute peak). Without ``/proc/self/clear_refs`` (not Linux) the
  RSS figures fall back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be reset
  (``rss_method`` says which was used; ``rss_step`` is then not available). The kernel
  keeps RSS counters per thread and folds them in lazily, so the RSS figures are only good
  to a few hundred KiB (a slightly negative ``rss_step`` is such noise).

Not counted by ``step_peak`` / ``live_peak``: memory that does not come from torch's
CPU allocator (Python objects, library-internal ``malloc`` buffers); ``rss_*`` counts it.

Output: one JSON line per (figure, library) on stdout, then markdown tables (rows
figures, columns libraries, MiB with one decimal, and ``ours / lowest peer``: normflux
divided by the smallest peer figure, at most 1 meeting the requirement), also written to
``benchmarks/results.md`` as the section ``memory <figures>`` (``suite.write_results``);
``--quick`` runs do not write it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import peers  # noqa: E402
import suite  # noqa: E402

OURS = suite.OURS
LIBS = (OURS, *peers.LIBRARIES)
MIB = 2 ** 20
WARMUP = 2
CHILD_TIMEOUT_S = 900


# ============================================================================ figures
def all_figures() -> dict[str, tuple[suite.Benchmark, str]]:
    """``figure id -> (benchmark, mode)`` for every figure of the suite's registry."""
    return {suite.figure_id(b, m): (b, m) for b in suite.BENCHMARKS.values() for m in b.modes}


def select_figures(only: str) -> list[str]:
    """Figure ids for ``--only``: benchmark ids (``B1``) or figure ids (``B1-sample``)."""
    figs = all_figures()
    wanted = [s.strip().upper() for s in only.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in suite.BENCHMARKS and w not in
               {f.upper() for f in figs}]
    if unknown:
        raise ValueError(f"unknown benchmark(s) or figure(s) {unknown}; known: {list(figs)}")
    if not wanted:
        raise ValueError(f"--only selects nothing; known: {list(figs)}")
    return [f for f in figs if f.upper() in wanted or f.split("-")[0] in wanted]


# ============================================================================ measuring
def running_peak(deltas: Sequence[int], start: int = 0) -> tuple[int, int]:
    """``(peak, end)`` of the running sum ``start + d_1 + ... + d_k`` (peak >= ``start``)."""
    level = peak = start
    for d in deltas:
        level += d
        peak = max(peak, level)
    return peak, level


def allocator_deltas(prof) -> list[int]:
    """Signed sizes of the CPU allocator's allocations / frees recorded by ``prof``
    (a finished ``torch.profiler.profile(profile_memory=True)``), in time order."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep the recording order
    return [int(e.nbytes()) for e in events]


def _proc_status() -> dict[str, int] | None:
    """``VmRSS`` and ``VmHWM`` of this process in bytes (``None`` without ``/proc``)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m is None:
            return None
        out[key] = int(m.group(1)) * 1024
    return out


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _setup(fig: str, lib: str):
    bench, mode = all_figures()[fig]
    x = bench.make_data(torch.Generator().manual_seed(0))
    h = suite.build_handle(bench, lib)
    return h, suite.model_step(h, mode, x, bench.sample_n)


def measure_alloc(fig: str, lib: str, warmup: int) -> dict:
    """Child phase ``alloc``: ``live_start``, ``step_peak``, ``live_peak`` (bytes)."""
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as build_prof:
        h, step = _setup(fig, lib)
        for _ in range(warmup):
            step()
        gc.collect()
    live_start = sum(allocator_deltas(build_prof))
    del build_prof
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as step_prof:
        out = step()
    peak, end = running_peak(allocator_deltas(step_prof))
    return {"live_start_bytes": live_start, "step_peak_bytes": peak,
            "live_peak_bytes": live_start + peak, "step_net_bytes": end,
            "params": suite.num_params(h.module), "finite": suite._finite(out)}


def measure_rss(fig: str, lib: str, warmup: int) -> dict:
    """Child phase ``rss``: ``rss_built``, ``rss_steps``, ``rss_step``, ``rss_peak`` (bytes)."""
    h, step = _setup(fig, lib)
    gc.collect()
    st = _proc_status()
    if st is not None and _reset_hwm():  # the RSS is read after each reset: VmHWM >= it
        built = _proc_status()["VmRSS"]
        for _ in range(warmup):
            step()
        gc.collect()
        hwm_warm = _proc_status()["VmHWM"]
        _reset_hwm()
        before = _proc_status()["VmRSS"]
        step()
        hwm_step = _proc_status()["VmHWM"]
        peak = max(hwm_warm, hwm_step)
        return {"rss_method": "VmHWM (reset after build)", "rss_built_bytes": built,
                "rss_steps_bytes": peak - built, "rss_step_bytes": hwm_step - before,
                "rss_peak_bytes": peak}
    built = st["VmRSS"] if st is not None else _maxrss()
    for _ in range(warmup + 1):
        step()
    peak = _maxrss()
    return {"rss_method": "ru_maxrss (not reset)", "rss_built_bytes": built,
            "rss_steps_bytes": max(0, peak - built), "rss_step_bytes": None,
            "rss_peak_bytes": peak}


def child(fig: str, lib: str, phase: str, warmup: int) -> int:
    """Measure one (figure, library, phase) in this (fresh) process; one JSON line out."""
    suite.configure_torch()
    try:
        if lib != OURS:
            __import__(lib)  # imported before any measurement starts
        rec = (measure_alloc if phase == "alloc" else measure_rss)(fig, lib, warmup)
    except Exception as e:  # the parent reports it
        print(json.dumps({"error": suite._err(e)}), flush=True)
        return 1
    rec["threads"] = torch.get_num_threads()
    print(json.dumps(rec), flush=True)
    return 0


def run_child(fig: str, lib: str, phase: str, warmup: int, timeout: float) -> dict:
    """Run :func:`child` in a fresh interpreter and return its record."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", fig, lib, phase,
           "--warmup", str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"{phase} child timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"{phase} child exited with {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def measure(fig: str, lib: str, warmup: int, timeout: float) -> dict:
    """The JSON record of (``fig``, ``lib``): both children, merged."""
    bench, mode = all_figures()[fig]
    rec = {"figure": fig, "library": lib,
           "step": (f"sample({bench.sample_n}) under no_grad" if mode == "sample" else
                    "-log_prob(x).mean().backward()" + (" + Adam.step()" if mode == "train_adam"
                                                        else "")),
           "batch": bench.sample_n if mode == "sample" else bench.batch, "warmup": warmup}
    if lib != OURS and bench.peer_kind not in peers.BUILDERS.get(lib, {}):
        rec["error"] = "n/a (no builder for this architecture)"
        return rec
    for phase in ("alloc", "rss"):
        out = run_child(fig, lib, phase, warmup, timeout)
        if "error" in out:
            rec["error"] = out["error"]
            return rec
        rec.update(out)
    return rec


# ============================================================================ output
TABLES = (("step_peak_bytes", "Step peak (MiB): torch CPU-allocator bytes above the level at the "
           "step's start (the transient memory of one step)"),
          ("live_peak_bytes", "Live peak (MiB): every torch byte live at the step's peak "
           "(parameters, buffers, data, gradients, Adam state + the step's transients)"),
          ("rss_steps_bytes", "RSS rise (MiB): peak resident set size over the warm-up and "
           "measured steps minus the RSS after the build (fresh process; includes non-torch "
           "memory)"))


def markdown(records: list[dict], key: str) -> str:
    """Rows figures, columns libraries (MiB, 1 decimal), then ``ours / lowest peer``."""
    libs = [lib for lib in LIBS if any(r["library"] == lib for r in records)]
    figs = list(dict.fromkeys(r["figure"] for r in records))
    by = {(r["figure"], r["library"]): r for r in records}
    lines = ["| figure | " + " | ".join(libs) + " | ours / lowest peer |",
             "|---" + "|---:" * (len(libs) + 1) + "|"]
    for f in figs:
        cells, vals = [], {}
        for lib in libs:
            r = by.get((f, lib))
            if r is None or r.get(key) is None:
                err = (r or {}).get("error", "")
                cells.append("n/a" if r is None or err.startswith("n/a") else "err")
                continue
            vals[lib] = r[key]
            cells.append(f"{r[key] / MIB:.1f}")
        peer_vals = [v for lib, v in vals.items() if lib != OURS]
        if OURS in vals and peer_vals and min(peer_vals) > 0:
            cells.append(f"{vals[OURS] / min(peer_vals):.2f}")
        else:
            cells.append("")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(records: list[dict], cmd: str, elapsed: float, warmup: int) -> str:
    """The markdown section: provenance, the three tables, problems."""
    env = suite.versions()
    parts = [f"## memory: {', '.join(dict.fromkeys(r['figure'] for r in records))}", "",
             f"`{cmd.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.machine()} ({platform.processor() or 'cpu'}), "
             + ", ".join(f"{k} {v}" for k, v in env.items())
             + f", warm-up steps: {warmup}, fresh processes, {elapsed / 60:.1f} min. "
             "MiB = 2^20 bytes; \"ours / lowest peer\" at most 1: normflux needs no more "
             "memory than the leanest peer; definitions in the docstring of "
             "`benchmarks/memory.py`."]
    for key, title in TABLES:
        parts += ["", title + ":", "", markdown(records, key)]
    errs = [f"* {r['figure']} {r['library']}: {r['error']}" for r in records
            if "error" in r and not r["error"].startswith("n/a")]
    bad = [f"* {r['figure']} {r['library']}: non-finite output" for r in records
           if r.get("finite") is False]
    if errs or bad:
        parts += ["", "Problems:", "", *errs, *bad]
    return "\n".join(parts)


# ============================================================================ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(suite.BENCHMARKS),
                    help="comma-separated benchmark ids (B1) or figure ids (B1-train) "
                    "(default: all, %(default)s)")
    ap.add_argument("--libs", default=",".join(peers.LIBRARIES),
                    help="peer libraries, comma-separated, '' for normflux only "
                    "(default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up step; does not write results.md")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"warm-up steps before the measured one (default {WARMUP}, quick 1)")
    ap.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S,
                    help="seconds per child process (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown results file (default "
                    f"{suite.RESULTS.relative_to(HERE.parent)}; not written by --quick "
                    "unless given)")
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    ap.add_argument("--child", nargs=3, metavar=("FIG", "LIB", "PHASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else WARMUP)

    if args.child:
        fig, lib, phase = args.child
        if fig not in all_figures() or lib not in LIBS or phase not in ("alloc", "rss"):
            ap.error(f"bad --child {args.child}")
        return child(fig, lib, phase, warmup)

    try:
        figs = select_figures(args.only)
    except ValueError as e:
        ap.error(str(e))
    libs = [OURS]
    for lib in [s.strip() for s in args.libs.split(",") if s.strip()]:
        if lib not in peers.LIBRARIES:
            ap.error(f"unknown library {lib!r}; known: {list(peers.LIBRARIES)}")
        why = peers.available(lib)
        if why is None:
            libs.append(lib)
        else:
            suite._log(f"peer {lib} unavailable ({why}): skipped")

    t0 = time.perf_counter()
    records = []
    for fig in figs:
        for lib in libs:
            suite._log(f"{fig} {lib}: measuring in fresh processes")
            rec = measure(fig, lib, warmup, args.timeout)
            rec["versions"] = suite.versions()
            records.append(rec)
            print(json.dumps(rec), flush=True)
    elapsed = time.perf_counter() - t0

    cmd = shlex.join(["python", "benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    body = report(records, cmd, elapsed, warmup)
    print("\n" + body, flush=True)
    out = args.out if args.out is not None else (None if args.quick else suite.RESULTS)
    if out is not None and not args.no_write:
        suite.write_results(out, "memory " + ",".join(figs), body)
        suite._log(f"written to {out}")
    return 1 if any("error" in r and not r["error"].startswith("n/a") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
