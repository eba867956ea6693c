"""Whether code runs under ``torch.compile`` tracing (shared by every layer and network)."""

from __future__ import annotations

import torch

__all__ = ["is_compiling"]


def is_compiling() -> bool:
    """Whether the code runs under ``torch.compile`` tracing (then data checks are skipped
    and eager-only fast paths step aside).

    Returns:
        ``True`` inside a dynamo trace, else ``False`` (also on torch builds without
        ``torch.compiler.is_compiling``).
    """
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False
