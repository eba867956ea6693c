"""Figures for the demos and the command line (matplotlib, non-interactive Agg backend).

* :func:`plot_cylinder`: target and flow densities on the cylinder ``R x S^1``, flat on
  the ``(x, phi)`` plane and wrapped on the 3-D cylinder surface;
* :func:`plot_samples`: model samples next to data (8x8 image grids for 64-D digits,
  scatter plots otherwise).

Both write one PNG and close their figure (safe in loops and tests).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - select the backend before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpl_toolkits.mplot3d import Axes3D  # noqa: E402,F401 - registers the 3-D projection

__all__ = ["plot_cylinder", "plot_samples", "cylinder_grid"]


def _finish(fig, path, title):
    """Add the optional title, lay out, write the PNG and close the figure; returns ``path``."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def cylinder_grid(n: int = 200, x_range: tuple[float, float] = (-3.0, 3.0)):
    """The evaluation grid of :func:`plot_cylinder`.

    Arguments:
        n: grid points per axis.
        x_range: ``(low, high)`` of the real coordinate.

    Returns:
        ``(x, phi, points)``: ``x`` of shape ``(n,)`` spanning ``x_range`` (inclusive),
        ``phi`` of shape ``(n,)`` on ``[-pi, pi)`` in radians (the endpoint ``pi``
        excluded, it is ``-pi``), and ``points`` of shape ``(n * n, 2)``, in torch's
        default dtype (float32 unless changed), rows ``(x_i, phi_j)`` with ``phi``
        varying fastest.
    """
    x = torch.linspace(x_range[0], x_range[1], n)
    phi = -math.pi + 2 * math.pi * torch.arange(n) / n
    X, P = torch.meshgrid(x, phi, indexing="ij")
    return x, phi, torch.stack([X.reshape(-1), P.reshape(-1)], dim=1)


@torch.no_grad()
def _density(model, points: torch.Tensor, batch: int = 8192) -> np.ndarray:
    out = []
    dtype = torch.float32
    for p in getattr(model, "parameters", lambda: iter(()))():
        dtype = p.dtype
        break
    for i in range(0, points.shape[0], batch):
        out.append(model.log_prob(points[i:i + batch].to(dtype)).double().exp())
    return torch.cat(out).cpu().numpy()


def plot_cylinder(target, flow, path: str | os.PathLike, *, grid: int = 200,
                  x_range: tuple[float, float] = (-3.0, 3.0), title: str | None = None) -> Path:
    """Target and flow densities on the cylinder, side by side, in one PNG.

    Top row: ``p(x, phi)`` as images on the ``(x, phi)`` plane, ``x`` in ``x_range``
    (default ``[-3, 3]``), ``phi`` in ``[-pi, pi)``, on a ``grid x grid`` grid (default
    200 x 200). Bottom row: the same densities as colours on the cylinder surface
    ``(x, cos phi, sin phi)`` in 3-D (``mpl_toolkits.mplot3d``). Both models share one
    colour scale. Densities are ``exp(log_prob)`` as given (no renormalisation), so an
    unnormalised target is shown up to its constant.

    Arguments:
        target: an object with ``log_prob(points) -> (n,)`` for points ``(n, 2)`` rows
            ``(x, phi)``, e.g. :class:`normflux.targets.Cylinder`.
        flow: a flow on ``R x [-pi, pi)`` (anything with ``log_prob``).
        path: the PNG file (parent directories are created).
        grid: grid points per axis.
        x_range: the range of the real coordinate.
        title: a figure title.

    Returns:
        the path written.

    Raises:
        OSError: the directory or file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x, phi, pts = cylinder_grid(grid, x_range)
    dens = [_density(target, pts).reshape(grid, grid), _density(flow, pts).reshape(grid, grid)]
    vmax = max(float(np.nanmax(d)) for d in dens) or 1.0
    norm = matplotlib.colors.Normalize(0.0, vmax)
    cmap = plt.get_cmap("viridis")
    fig = plt.figure(figsize=(11, 9.5))
    names = ["target", "flow"]
    xs, ps = x.numpy(), phi.numpy()
    for k, d in enumerate(dens):
        ax = fig.add_subplot(2, 2, k + 1)
        im = ax.imshow(d.T, origin="lower", aspect="auto", cmap=cmap, norm=norm,
                       extent=(xs[0], xs[-1], -math.pi, math.pi))
        ax.set_xlabel("x")
        ax.set_ylabel(r"$\phi$")
        ax.set_yticks([-math.pi, 0, math.pi], [r"$-\pi$", "0", r"$\pi$"])
        ax.set_title(f"{names[k]} density on the (x, $\\phi$) plane")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    # close the cylinder: append phi = pi (= -pi) as the last column
    phic = np.concatenate([ps, [math.pi]])
    Xc, Pc = np.meshgrid(xs, phic, indexing="ij")
    for k, d in enumerate(dens):
        dc = np.concatenate([d, d[:, :1]], axis=1)
        ax = fig.add_subplot(2, 2, k + 3, projection="3d")
        ax.plot_surface(Xc, np.cos(Pc), np.sin(Pc), facecolors=cmap(norm(dc)),
                        rcount=min(grid, 72), ccount=min(grid + 1, 72), shade=False,
                        linewidth=0, antialiased=False)
        ax.set_xlabel("x")
        ax.set_ylabel(r"cos $\phi$")
        ax.set_zlabel(r"sin $\phi$")
        ax.set_yticks([-1, 0, 1])
        ax.set_zticks([-1, 0, 1])
        ax.set_box_aspect((2.2, 1, 1))
        ax.view_init(elev=25, azim=-60)
        ax.set_title(f"{names[k]} density on the cylinder")
    return _finish(fig, path, title)


def _montage(images: np.ndarray, side: int, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """Tile ``(n, side*side)`` images into one ``rows x cols`` array (NaN padding)."""
    out = np.full((rows * (side + pad) + pad, cols * (side + pad) + pad), np.nan)
    for i, img in enumerate(images[:rows * cols]):
        r, c = divmod(i, cols)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        out[y:y + side, x:x + side] = img.reshape(side, side)
    return out


def plot_samples(data, samples, path: str | os.PathLike, *, title: str | None = None,
                 max_points: int = 5000) -> Path:
    """Model samples next to data, in one PNG.

    * ``D = 64`` (8x8 digits; any square ``D >= 16``): two 8x8 grids of images, the
      first 64 data rows and the first 64 samples, on the data's grey scale (samples are
      clipped to the data range);
    * ``D = 2``: two scatter plots with the same axes;
    * ``D = 1``: overlaid histograms of data and samples;
    * other ``D >= 2``: scatter plots of the first two coordinates.

    Arguments:
        data: ``(N, D)`` array or tensor.
        samples: ``(M, D)`` array or tensor.
        path: the PNG file (parent directories are created).
        title: a figure title.
        max_points: at most this many points per scatter plot.

    Returns:
        the path written.

    Raises:
        ValueError: ``data`` and ``samples`` are not 2-D with the same ``D``.
        OSError: the directory or file cannot be written.
    """
    data, samples = _numpy(data), _numpy(samples)
    if data.ndim != 2 or samples.ndim != 2 or data.shape[1] != samples.shape[1]:
        raise ValueError(f"data and samples must be (N, D) with the same D, got "
                         f"{data.shape} and {samples.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    D = data.shape[1]
    side = int(round(math.sqrt(D)))
    if side * side == D and D >= 16:
        lo, hi = float(data.min()), float(data.max())
        fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
        for ax, arr, name in ((axes[0], data, "data"), (axes[1], np.clip(samples, lo, hi),
                                                         "samples")):
            m = _montage(arr, side, 8, 8)
            cmap = plt.get_cmap("gray_r").copy()
            cmap.set_bad("white")
            ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{name} ({min(len(arr), 64)} of {len(arr)})")
            ax.axis("off")
    elif D == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        both = np.concatenate([data[:, 0], samples[:, 0]])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 60)
        ax.hist(data[:, 0], bins=bins, density=True, alpha=0.5, label="data")
        ax.hist(samples[:, 0], bins=bins, density=True, alpha=0.5, label="samples")
        ax.set_xlabel("x[0]")
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True, sharey=True)
        both = np.concatenate([data[:, :2], samples[:, :2]])
        lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
        span = hi - lo
        for ax, arr, name in ((axes[0], data, "data"), (axes[1], samples, "samples")):
            a = arr[:max_points]
            ax.scatter(a[:, 0], a[:, 1], s=2, alpha=0.5, linewidths=0)
            ax.set_title(f"{name} ({len(a)} points)" + ("" if D == 2 else f", first 2 of {D} dims"))
            ax.set_xlabel("x[0]")
            ax.set_ylabel("x[1]")
        axes[0].set_xlim(lo[0] - 0.1 * span[0], hi[0] + 0.1 * span[0])
        axes[0].set_ylim(lo[1] - 0.1 * span[1], hi[1] + 0.1 * span[1])
    return _finish(fig, path, title)
