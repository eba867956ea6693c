"""Whether code runs under ``torch.compile`` tracing (shared by every layer and network)."""

from __future__ import annotations

import torch

__all__ = ["is_compiling", "constant_when_traced"]

# torch.compiler.is_compiling (torch >= 2.3), looked up once: it runs several times per layer
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def is_compiling() -> bool:
    """Whether the code runs under ``torch.compile`` tracing (then data checks are skipped
    and eager-only fast paths step aside).

    Returns:
        ``True`` inside a dynamo trace, else ``False`` (also on torch builds without
        ``torch.compiler.is_compiling``).
    """
    return _IS_COMPILING is not None and _IS_COMPILING()


def constant_when_traced(fn):
    """Mark ``fn`` so that ``torch.compile`` records a call as its result, a constant
    (what ``torch.compiler.assume_constant_result`` does), and returns ``fn``.

    It sets the mark that dynamo reads (``_dynamo_marked_constant``) itself: the public
    decorator imports ``torch._dynamo`` first, which took 1.5 of the 3.2 s of ``import
    normflux``. ``tests/test_compile.py`` checks that the public decorator still sets this
    mark.
    """
    fn._dynamo_marked_constant = True
    return fn
