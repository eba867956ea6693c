"""Checkpoints: a model's build configuration, its weights and free-form extras, saved atomically.

A checkpoint is one ``torch.save`` file holding the dict::

    {"format": "normflux-checkpoint", "version": 1,
     "config": flow.config,            # the arguments of normflux.models.build
     "state_dict": flow.state_dict(),
     "extra": {...}}                   # anything else: optimizer state, history, data info

It is read back with ``torch.load(weights_only=True)`` (no arbitrary code runs on
load), so ``extra`` may hold only tensors, numbers, strings, ``None`` and
lists/tuples/dicts of them — an optimizer's ``state_dict()`` qualifies, which is how a
run is resumed::

    save_checkpoint(path, flow, extra={"optimizer": opt.state_dict(), "step": step})
    flow, extra = load_checkpoint(path)
    opt = torch.optim.Adam(flow.parameters(), lr=...)
    opt.load_state_dict(extra["optimizer"])
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from . import models

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT", "VERSION"]

FORMAT = "normflux-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file is not a (readable, compatible) normflux checkpoint."""


def _check_extra(value, where: str = "extra") -> None:
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype,
                                           torch.device, torch.Size)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_extra(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where} has a key of type {type(k).__name__}; "
                                "use strings or numbers")
            _check_extra(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint's extra may hold only "
                    "tensors, numbers, strings, None and lists/tuples/dicts of them "
                    "(convert NumPy arrays with torch.as_tensor)")


def _fsync_dir(directory: Path) -> None:
    """Flush the directory entry (the rename) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, flow, extra: dict | None = None) -> Path:
    """Write ``{config, state_dict, extra}`` of a built flow to ``path``, atomically.

    The file is first written to a temporary file in the same directory, flushed and
    ``fsync``-ed, then moved over ``path`` with ``os.replace`` (atomic on POSIX and
    Windows): a crash or an exception mid-write leaves the previous checkpoint intact and
    no partial file under ``path`` (the temporary file is removed on errors).

    Arguments:
        path: destination file (parent directories are created).
        flow: a :class:`~normflux.models.ModelFlow` (it must have ``config``, as built by
            :func:`normflux.models.build`).
        extra: optional dict of extras (see the module docstring for what it may hold).

    Returns:
        the path written, as a :class:`pathlib.Path`.

    Raises:
        TypeError: the arguments in ``torch.save``'s order (the flow first), ``flow`` has
            no ``config`` or ``extra`` holds an unsupported type.
        OSError: the file cannot be written.
    """
    if isinstance(path, torch.nn.Module) and isinstance(flow, (str, os.PathLike)):
        raise TypeError("save_checkpoint takes the path first: save_checkpoint(path, flow) "
                        "(torch.save takes the object first)")
    config = getattr(flow, "config", None)
    if not isinstance(config, dict):
        raise TypeError("save_checkpoint needs a flow built by normflux.models.build "
                        "(it has no .config to rebuild it from)")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_extra(extra or {})
    payload = {"format": FORMAT, "version": VERSION, "config": config,
               "state_dict": flow.state_dict(), "extra": extra or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a flow from a checkpoint written by :func:`save_checkpoint`.

    The model is rebuilt with ``normflux.models.build(**config)`` and its weights loaded
    with ``strict=True`` (every key must match).

    Arguments:
        path: the checkpoint file.
        map_location: where to put the tensors (default CPU).

    Returns:
        ``(flow, extra)``: the :class:`~normflux.models.ModelFlow` in eval mode and the
        saved extras (a dict, ``{}`` when none were saved).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ``ValueError``): the file is not a normflux checkpoint (not a
            torch file, truncated, another format, an unknown version, a configuration
            the installed normflux cannot build, or weights that do not fit it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (file does not exist)")
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory, not a checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
            AttributeError, ImportError, KeyError, IndexError, TypeError) as e:
        detail = "" if isinstance(e, pickle.UnpicklingError) else \
            (": " + str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(f"{str(path)!r} is not a normflux checkpoint (torch.load cannot "
                              f"read it as a weights-only torch file; {type(e).__name__}"
                              f"{detail})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a normflux checkpoint (a torch file, but "
                              "without the normflux checkpoint header)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is a normflux checkpoint of version "
                              f"{payload.get('version')!r}; this normflux reads version {VERSION}")
    config = payload.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} has no model configuration")
    try:
        flow = models.build(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the model of {str(path)!r}: {e}") from e
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} has no weights (its 'state_dict' entry is "
                              f"{type(state).__name__}, not a dict)")
    try:
        flow.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckpointError(f"the weights in {str(path)!r} do not fit its configuration: "
                              f"{detail}") from e
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{str(path)!r} has non-finite weights in {bad[:3]}")
    flow.to(map_location)
    flow.eval()
    return flow, payload.get("extra") or {}
