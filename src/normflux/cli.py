"""The ``normflux`` command: demos, training, sampling and evaluation from the shell.

::

    normflux demo cylinder [--steps N] [--seed S] [--out DIR] [--model nsf]
    normflux train --data digits|two-moons|FILE.csv|FILE.npy [--model nsf] [--out DIR] ...
    normflux sample CKPT -n N -o FILE.npy|FILE.csv [--context C1 C2 ...]
    normflux eval CKPT --data digits|two-moons|FILE [--split test|train|all]

Each command prints one JSON line on stdout (progress bars and messages go to stderr).
User mistakes (a missing or malformed file, a checkpoint that does not fit the data, a
wrong context, an unknown model) print one ``normflux: error: ...`` line and exit with
status 2; a diverging fit exits with status 1. Set ``NORMFLUX_DEBUG=1`` to get the
Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "CYLINDER_DEFAULTS", "TRAIN_DEFAULTS", "CLIError"]

#: Default hyperparameters of ``normflux demo cylinder`` (one place to tune them).
CYLINDER_DEFAULTS = dict(model="nsf", layers=8, hidden=(64, 64), bins=8, steps=1500,
                         batch_size=256, lr=1e-3)

#: Default hyperparameters of ``normflux train`` per data set (``"file"``: .csv/.npy).
#: digits, measured on a shared 2-core CPU machine (torch 2.13, --threads 1, seed 0): test
#: 2.054 bits/dim in about 12 s of training (best epoch 51 of 60); the independent-pixel baseline
#: is 2.42. Nearby settings (8-12 layers, hidden 64-256, bins 8-16, lr 5e-4/1e-3, batch
#: 64-256) gave 2.05-2.11; wider nets overfit the 1500 images sooner.
TRAIN_DEFAULTS = {
    "digits": dict(model="nsf", layers=10, hidden=(64, 64), bins=8, epochs=60, batch_size=128,
                   lr=1e-3, patience=15),
    "two-moons": dict(model="nsf", layers=6, hidden=(64, 64), bins=8, epochs=100,
                      batch_size=256, lr=1e-3, patience=15),
    "file": dict(model="nsf", layers=6, hidden=(128, 128), bins=8, epochs=200, batch_size=256,
                 lr=1e-3, patience=20),
}

#: Number of model samples used by ``demo cylinder`` for its estimates.
DEMO_SAMPLES = 20_000


class CLIError(Exception):
    """A user mistake the command reports as ``normflux: error: ...`` (exit status 2)."""


# ---------------------------------------------------------------------------- helpers
def _emit(record: dict) -> None:
    """Print one JSON line on stdout (non-finite floats as strings, so it stays JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    print(json.dumps(clean(record)), flush=True)


def _setup_torch(args) -> None:
    import torch
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _seed(text: str) -> int:
    """A ``--seed`` value: an integer in ``0..2^32 - 1`` (as NumPy's seeds)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in 0..{2 ** 32 - 1}, got {text}")
    return v


_seed.__name__ = "seed"


def _model_choices() -> list[str]:
    from . import models
    return sorted(models.MODELS)


def _model_arg(text: str) -> str:
    known = _model_choices()
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown model {text!r} (known models: "
                                         f"{', '.join(known)})")
    return text


def _pick(args, defaults: dict, key: str):
    v = getattr(args, key, None)
    return defaults[key] if v is None else v


def _out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output directory {str(out)!r}: {e.strerror or e}") from e
    return out


# ---------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """``normflux demo cylinder``: reverse-KL fit of a circular NSF to the cylinder target.

    Writes ``cylinder.pt`` and ``cylinder.png`` under ``args.out`` and prints one JSON
    line (reverse and forward KL in nats, ESS fraction, ``log Z`` estimate, timings).

    Returns:
        0.

    Raises:
        CLIError: the output directory cannot be created.
        DivergenceError: the fit diverged.
    """
    import torch

    from . import metrics, models, plotting
    from .checkpoint import save_checkpoint
    from .targets import Cylinder
    from .training import fit_to_target

    t_start = time.perf_counter()
    d = CYLINDER_DEFAULTS
    cfg = {k: _pick(args, d, k) for k in ("model", "layers", "hidden", "bins", "steps",
                                          "batch_size", "lr")}
    target = Cylinder()
    flow = models.build(cfg["model"], 2, domains=target.domains, layers=cfg["layers"],
                        hidden=cfg["hidden"], bins=cfg["bins"], seed=args.seed)
    out = _out_dir(args.out)
    hist = fit_to_target(flow, target, steps=cfg["steps"], batch_size=cfg["batch_size"],
                         lr=cfg["lr"], seed=args.seed, progress=not args.quiet)
    t_eval = time.perf_counter()
    flow.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        x, log_q = flow.sample_and_log_prob(DEMO_SAMPLES)
        log_p = target.log_prob(x)
        xt = target.sample(DEMO_SAMPLES, generator=torch.Generator().manual_seed(args.seed + 2))
        log_p_t, log_q_t = target.log_prob(xt), flow.log_prob(xt)
    log_w = metrics.log_importance_weights(log_p, log_q)
    record = {
        "demo": "cylinder",
        "reverse_kl": float(metrics.reverse_kl(log_q, log_p, target.log_normalizer)),
        "forward_kl": float(metrics.forward_kl(log_p_t, log_q_t, target.log_normalizer)),
        "ess": float(metrics.effective_sample_size(log_w)),
        "log_z": float(metrics.log_normalizer(log_w)),
        "samples": DEMO_SAMPLES,
        "seconds": hist["seconds"],
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "seed": args.seed,
    }
    ckpt = save_checkpoint(out / "cylinder.pt", flow, extra={
        "command": "demo cylinder", "metrics": {k: record[k] for k in
                                                 ("reverse_kl", "forward_kl", "ess", "log_z")},
        "loss": hist["loss"]})
    png = plotting.plot_cylinder(target, flow, out / "cylinder.png",
                                 title=f"cylinder: reverse KL {record['reverse_kl']:.4f}, "
                                       f"ESS {record['ess']:.3f}")
    record.update(eval_seconds=time.perf_counter() - t_eval,
                  total_seconds=time.perf_counter() - t_start, checkpoint=str(ckpt),
                  figure=str(png))
    _emit(record)
    return 0


# ---------------------------------------------------------------------------- train
def _load_data(name: str, context_columns):
    from .data import DATASETS, load_dataset
    ds = load_dataset(name, context_columns=context_columns)
    kind = name if name in DATASETS else "file"
    return ds, kind


def cmd_train(args) -> int:
    """``normflux train``: maximum likelihood on a data set or file.

    Writes ``model.pt`` and ``samples.png`` under ``args.out`` (default
    ``runs/<data>``) and prints one JSON line (test NLL in nats per example, bits/dim
    where defined, training summary).

    Returns:
        0.

    Raises:
        CLIError: fewer than 2 data columns, fewer than 10 training rows, constant data
            columns, or an output directory that cannot be created.
        DataError: a missing or malformed data file.
        DivergenceError: the fit diverged.
    """
    import torch

    from . import models, plotting
    from .checkpoint import save_checkpoint
    from .training import evaluate_nll, fit_to_data

    t_start = time.perf_counter()
    ds, kind = _load_data(args.data, args.context_columns)
    if ds.features < 2:
        raise CLIError(f"{args.data}: the data have {ds.features} column"
                       f"{' after removing the context columns' if ds.context_features else ''}; "
                       "flows here need at least 2 data columns")
    d = TRAIN_DEFAULTS[kind]
    cfg = {k: _pick(args, d, k) for k in ("model", "layers", "hidden", "bins", "epochs",
                                          "batch_size", "lr", "patience")}
    if ds.train.shape[0] < 10:
        raise CLIError(f"{args.data}: {ds.train.shape[0]} training rows are too few to train "
                       "with a validation split (need at least 10)")
    if ds.dequantize is None:
        const = (ds.train.std(0) == 0).nonzero().flatten().tolist()
        if const:
            raise CLIError(f"{args.data}: data column{'s' if len(const) > 1 else ''} "
                           f"{', '.join(str(j + 1) for j in const)} (1-based, after removing "
                           "context columns) are constant in the training rows; a density "
                           "cannot be fitted to a constant: drop them or add noise")
    flow = models.build(cfg["model"], ds.features, context=ds.context_features,
                        layers=cfg["layers"], hidden=cfg["hidden"], bins=cfg["bins"],
                        standardize=True, seed=args.seed)
    out = _out_dir(args.out or os.path.join("runs", Path(args.data).stem if kind == "file"
                                            else kind))
    x_std = ds.train if ds.dequantize is None else ds.dequantize(
        ds.train, torch.Generator().manual_seed(args.seed))
    models.fit_standardization(flow, x_std, ds.train_context)
    hist = fit_to_data(flow, ds.train, ds.train_context, epochs=cfg["epochs"],
                       batch_size=cfg["batch_size"], lr=cfg["lr"], patience=cfg["patience"],
                       seed=args.seed, dequantize=ds.dequantize, progress=not args.quiet)
    x_test, c_test = ds.split("test")
    test_nll = evaluate_nll(flow, x_test, c_test)
    record = {"data": args.data, "test_nll": test_nll}
    if ds.bits_per_dim is not None:
        record["bits_per_dim"] = float(ds.bits_per_dim(test_nll))
    record.update({
        "val_nll": hist["best_val_loss"], "best_epoch": hist["best_epoch"],
        "epochs_run": hist["epochs"], "stopped_early": hist["stopped_early"],
        "seconds": hist["seconds"], "n_train": int(ds.train.shape[0]),
        "n_test": int(x_test.shape[0]), "features": ds.features,
        "context_features": ds.context_features,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "seed": args.seed})
    extra = {"command": "train", "data": args.data if kind != "file" else
             os.path.abspath(args.data), "context_columns": ds.context_columns,
             "test_nll": test_nll, "train_loss": hist["train_loss"], "val_loss": hist["val_loss"],
             "dequantize": ds.dequantize is not None}
    ckpt = save_checkpoint(out / "model.pt", flow, extra=extra)
    flow.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        n = x_test.shape[0]
        if c_test is None:
            samples = flow.sample(n)
        else:
            samples = flow.sample(1, c_test)[0]
    png = plotting.plot_samples(x_test, samples, out / "samples.png",
                                title=f"{args.data}: test NLL {test_nll:.3f} nats")
    record.update(total_seconds=time.perf_counter() - t_start, checkpoint=str(ckpt),
                  figure=str(png))
    _emit(record)
    return 0


# ---------------------------------------------------------------------------- sample / eval
def _load_ckpt(path: str):
    from .checkpoint import load_checkpoint
    return load_checkpoint(path)


def cmd_sample(args) -> int:
    """``normflux sample``: draw samples from a checkpoint into a .npy or .csv file.

    The file holds an ``(n, D)`` float64 array (``.csv``: a header ``x0,x1,...``).

    Returns:
        0.

    Raises:
        CLIError: an output name not ending in ``.npy``/``.csv``, a missing, superfluous
            or wrong-length ``--context``, or an output directory that cannot be created.
        CheckpointError, FileNotFoundError: the checkpoint cannot be loaded.
    """
    import numpy as np
    import torch

    out = Path(args.output)
    ext = out.suffix.lower()
    if ext not in (".npy", ".csv"):
        raise CLIError(f"output file {str(out)!r} must end in .npy or .csv")
    flow, extra = _load_ckpt(args.checkpoint)
    C = flow.context_features
    ctx = None
    if C is not None:
        if args.context is None:
            raise CLIError(f"the model in {args.checkpoint!r} is conditional on {C} context "
                           f"value{'s' if C > 1 else ''}; pass --context with {C} number"
                           f"{'s' if C > 1 else ''}")
        if len(args.context) != C:
            raise CLIError(f"--context has {len(args.context)} value"
                           f"{'s' if len(args.context) != 1 else ''} but the model expects {C}")
        ctx = torch.tensor(args.context, dtype=torch.float32)
    elif args.context is not None:
        raise CLIError(f"the model in {args.checkpoint!r} is unconditional; drop --context")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        x = flow.sample(args.n, ctx).reshape(args.n, -1).double().numpy()
    if out.parent and not out.parent.exists():
        _out_dir(str(out.parent))
    if ext == ".npy":
        np.save(out, x)
    else:
        header = ",".join(f"x{i}" for i in range(x.shape[1]))
        np.savetxt(out, x, delimiter=",", header=header, comments="", fmt="%.9g")
    _emit({"checkpoint": args.checkpoint, "output": str(out), "n": int(args.n),
           "features": int(x.shape[1])})
    return 0


def cmd_eval(args) -> int:
    """``normflux eval``: the NLL of a checkpoint on a data set or file.

    Prints one JSON line with the NLL in nats per example, under ``nll`` and under the
    split's own key (``test_nll`` for the default split, as ``train`` prints it,
    ``train_nll``, ``all_nll``), and bits/dim where the data set defines it.

    Returns:
        0.

    Raises:
        CLIError: the data's feature or context columns do not match the model.
        CheckpointError, FileNotFoundError: the checkpoint cannot be loaded.
        DataError: a missing or malformed data file.
    """
    from .training import evaluate_nll

    flow, extra = _load_ckpt(args.checkpoint)
    columns = args.context_columns if args.context_columns is not None else \
        extra.get("context_columns")
    ds, _ = _load_data(args.data, columns)
    D = flow.event_shape[0]
    C = flow.context_features
    if C != ds.context_features:
        if C is None:
            raise CLIError(f"the model in {args.checkpoint!r} is unconditional but "
                           f"{ds.context_features} context columns were selected")
        raise CLIError(f"the model in {args.checkpoint!r} expects {C} context column"
                       f"{'s' if C != 1 else ''}, got {ds.context_features or 0}; "
                       "select them with --context-columns")
    if ds.features != D:
        raise CLIError(f"the model in {args.checkpoint!r} has {D} features but {args.data} has "
                       f"{ds.features} data column{'s' if ds.features != 1 else ''}"
                       + (f" (after removing {ds.context_features} context columns)"
                          if ds.context_features else ""))
    x, c = ds.split(args.split, seed=args.seed)
    nll = evaluate_nll(flow, x, c)
    record = {"data": args.data, "split": args.split, "nll": nll, f"{args.split}_nll": nll,
              "n": int(x.shape[0])}
    if ds.bits_per_dim is not None:
        record["bits_per_dim"] = float(ds.bits_per_dim(nll))
    _emit(record)
    return 0


# ---------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``normflux: error: ...`` line (exit status 2)."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see 'normflux {sub + ' ' if sub else ''}--help')"
        self.exit(2, f"normflux: error: {' '.join(message.split())}{hint}\n")


def _text(value) -> str:
    """A default as the command line spells it (``(64, 64)`` as ``64 64``)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _per_data(key: str) -> str:
    """``key``'s defaults of ``normflux train`` per data set, for the help."""
    values = {data: _text(d[key]) for data, d in TRAIN_DEFAULTS.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{data} {v}" for data, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    """The ``normflux`` argument parser (sub-commands ``demo``, ``train``, ``sample``, ``eval``)."""
    p = _Parser(prog="normflux", description="Normalizing flows in PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=_Parser)

    def common(q):
        q.add_argument("--threads", type=_positive(int), default=1,
                       help="torch CPU threads (default 1: for these small models one thread "
                            "was measured faster than two on a 2-core machine)")

    def model_args(q, default):
        """Model options; ``default(key)`` describes a key's default in the help."""
        q.add_argument("--model", type=_model_arg, default=None,
                       help=f"architecture ({', '.join(_model_choices())}; default "
                            f"{default('model')})")
        q.add_argument("--layers", type=_positive(int), default=None,
                       help=f"flow layers (default {default('layers')})")
        q.add_argument("--hidden", type=_positive(int), nargs="+", default=None,
                       help="hidden widths of each conditioner, e.g. --hidden 128 128 "
                            f"(default {default('hidden')})")
        q.add_argument("--bins", type=_positive(int), default=None,
                       help=f"spline bins (default {default('bins')})")
        q.add_argument("--batch-size", type=_positive(int), default=None,
                       help=f"batch size (default {default('batch_size')})")
        q.add_argument("--lr", type=_positive(float), default=None,
                       help=f"peak learning rate (default {default('lr')})")
        q.add_argument("--seed", type=_seed, default=0, help="seed of weights and training")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run a demo (cylinder)",
                          description="Fit a flow to a built-in target and report KL and ESS.")
    demo.add_argument("name", choices=["cylinder"], help="the demo")
    demo.add_argument("--steps", type=_positive(int), default=None,
                      help=f"optimizer steps (default {CYLINDER_DEFAULTS['steps']})")
    demo.add_argument("--out", default=os.path.join("runs", "cylinder"),
                      help="output directory (default runs/cylinder)")
    model_args(demo, lambda key: _text(CYLINDER_DEFAULTS[key]))
    common(demo)
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="fit a flow to data by maximum likelihood",
                        description="Maximum likelihood on digits, two-moons or a .csv/.npy "
                                    "file (of a file, 10% is held out as the test set; digits "
                                    "and two-moons have their own).")
    tr.add_argument("--data", required=True, help="digits, two-moons, or a .csv/.npy file")
    tr.add_argument("--out", default=None, help="output directory (default runs/<data>)")
    tr.add_argument("--epochs", type=_positive(int), default=None,
                    help=f"training epochs (default: {_per_data('epochs')})")
    tr.add_argument("--patience", type=_positive(int), default=None,
                    help="early-stopping patience in epochs")
    tr.add_argument("--context-columns", nargs="+", default=None, metavar="COL",
                    help="file columns to condition on: 0-based indices or header names")
    model_args(tr, _per_data)
    common(tr)
    tr.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="draw samples from a checkpoint")
    sa.add_argument("checkpoint", help="a checkpoint written by train or demo")
    sa.add_argument("-n", type=_positive(int), required=True, help="number of samples")
    sa.add_argument("-o", "--output", required=True, help="output file, .npy or .csv")
    sa.add_argument("--context", type=float, nargs="+", default=None,
                    help="context values for a conditional model")
    sa.add_argument("--seed", type=_seed, default=0)
    common(sa)
    sa.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="negative log-likelihood of a checkpoint on data")
    ev.add_argument("checkpoint", help="a checkpoint written by train")
    ev.add_argument("--data", required=True, help="digits, two-moons, or a .csv/.npy file")
    ev.add_argument("--split", choices=["test", "train", "all"], default="test",
                    help="which rows (default test: the held-out split used by train)")
    ev.add_argument("--context-columns", nargs="+", default=None, metavar="COL",
                    help="context columns (default: those the model was trained with)")
    ev.add_argument("--seed", type=_seed, default=0, help="seed of the dequantisation noise")
    common(ev)
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``normflux`` command; returns the exit status (0 ok, 1 diverged, 2 user error).

    User errors (``CLIError``, ``CheckpointError``, ``ValueError``, ``OSError``) and
    divergence are printed as one ``normflux: error: ...`` line on stderr (re-raised
    when ``NORMFLUX_DEBUG`` is set); ``KeyboardInterrupt`` returns 130.

    Arguments:
        argv: the arguments (default ``sys.argv[1:]``).

    Raises:
        SystemExit: from ``argparse``, status 2 on a usage error and 0 after ``--help``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .training import DivergenceError
    debug = os.environ.get("NORMFLUX_DEBUG", "") not in ("", "0")
    try:
        _setup_torch(args)
        return args.func(args)
    except (CLIError, CheckpointError, ValueError, OSError) as e:
        if debug:
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.filename}: {e.strerror or e}"
        print(f"normflux: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        if debug:
            raise
        print(f"normflux: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("normflux: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
