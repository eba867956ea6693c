"""Float constants that stay exact across ``.to(dtype)`` (pi, domain bounds)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConstantsMixin"]


class ConstantsMixin(nn.Module):
    """Mixin for modules with non-persistent float buffers that are exact constants.

    A buffer made in float32 and converted by ``.double()`` keeps float32 rounding
    (``pi`` off by 9e-8, which breaks 2 pi-periodicity at float64 precision).
    :meth:`register_constant` keeps a float64 master copy, and every ``.to()``,
    ``.double()``, ``.float()`` rebuilds the buffer from it in the new dtype and device.
    """

    def register_constant(self, name: str, values) -> None:
        """Register ``values`` (a number, list or tensor) as a non-persistent constant buffer."""
        exact = torch.as_tensor(values, dtype=torch.float64)
        consts = self.__dict__.setdefault("_exact_constants", {})
        consts[name] = exact
        self.register_buffer(name, exact.to(torch.get_default_dtype()), persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name, exact in self.__dict__.get("_exact_constants", {}).items():
            buf = self._buffers[name]
            self._buffers[name] = exact.to(device=buf.device, dtype=buf.dtype)
        return out
