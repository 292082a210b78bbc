"""PNG figures for reports and MLflow artifacts, one function per figure.

Figures are built with matplotlib's object API (`Figure`, rendered by the Agg canvas) rather than
pyplot: no display, no global figure registry to leak, and the process-wide backend is untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure


def plot_spectrum(spectra: np.ndarray | Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Covariance eigenvalues (log scale, largest first) and their cumulative share of variance; one
    line per named model when given a mapping (e.g. pretrained and random init)."""
    if not isinstance(spectra, Mapping):
        spectra = {"": spectra}
    fig = Figure(figsize=(9, 3.5))
    ax_eig, ax_cum = fig.subplots(1, 2)
    for name, values in spectra.items():
        eigs = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        rank = np.arange(1, eigs.size + 1)
        ax_eig.semilogy(rank, np.clip(eigs, 1e-12, None), marker=".", linewidth=1, label=name or None)
        total = eigs.sum()
        ax_cum.plot(rank, np.cumsum(eigs) / total if total > 0 else np.zeros_like(eigs), label=name or None)
    ax_eig.set(xlabel="eigenvalue index", ylabel="eigenvalue", title="embedding covariance spectrum")
    ax_cum.set(xlabel="components", ylabel="cumulative variance share", ylim=(0, 1.02))
    for ax in (ax_eig, ax_cum):
        ax.grid(alpha=0.3)
    if any(spectra):
        ax_cum.legend()
    return _save(fig, path)


def plot_loss_curve(steps: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """`loss_curve_figure` as a PNG."""
    return _save(loss_curve_figure(steps, series), path)


def loss_curve_figure(steps: Sequence[float], series: Mapping[str, Sequence[float]]) -> Figure:
    """One panel per named series against the optimizer step, each on its own y scale.

    Separate panels because the terms live on different scales (SIGReg's is far above the
    prediction term's), so one shared axis would flatten all but the largest into a line near 0.
    """
    for name, values in series.items():
        if len(values) != len(steps):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(steps)} steps")
    panels = max(len(series), 1)
    fig = Figure(figsize=(3.6 * panels, 3.2))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (name, values) in zip(axes, series.items()):
        ax.plot(steps, values, linewidth=1)
        ax.set(xlabel="step", title=name)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def plot_patch_pca(patch_feats: Sequence[torch.Tensor | np.ndarray], images: Sequence[torch.Tensor | np.ndarray],
                   path: str | Path) -> Path:
    """Images above the first 3 principal components of their patch features shown as RGB.

    `patch_feats[i]` is (H, W, E) for image i, a (3, S, S) uint8 array. One PCA is fitted
    on the patches of all images together, so equal colours mean similar features across images.
    """
    if len(patch_feats) != len(images) or not images:
        raise ValueError(f"need one patch grid per image, got {len(patch_feats)} grids for {len(images)} images")
    grids = [np.asarray(f, dtype=np.float64) for f in patch_feats]
    flat = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids])
    flat = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    comps = flat @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    rgb = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig = Figure(figsize=(2.2 * len(images), 4.4))
    axes = fig.subplots(2, len(images), squeeze=False)
    start = 0
    for i, (grid, image) in enumerate(zip(grids, images)):
        h, w = grid.shape[:2]
        axes[0, i].imshow(np.asarray(image).transpose(1, 2, 0))
        axes[1, i].imshow(rgb[start:start + h * w].reshape(h, w, 3), interpolation="nearest")
        start += h * w
        for ax in axes[:, i]:
            ax.axis("off")
    axes[1, 0].set_title("patch PCA (RGB)", fontsize=8, loc="left")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
