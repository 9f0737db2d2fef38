"""Pictures a person would rather look at than read: contour overlays and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _radiological(a: np.ndarray, box: tuple[int, int, int, int], z: int) -> np.ndarray:
    """Axial slice ``z`` of a RAS array, cropped to ``box`` (x0, x1, y0, y1), as a radiologist views
    it: rows anterior to posterior, columns the patient's right to left."""
    x0, x1, y0, y1 = box
    return np.flip(a[x0:x1, y0:y1, z].T, axis=(0, 1))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def contour_overlay(ct: np.ndarray, label: np.ndarray, names: dict[str, int], out: str | Path, truth: np.ndarray | None = None,
                    slices: int = 4, window: tuple[float, float] = (-200.0, 300.0), title: str = "",
                    styles: tuple[str, str] = ("model", "reference")) -> Path:
    """Axial slices of ``ct`` (RAS array, as nibabel reads it) with ``label``'s contours (solid)
    and, if given, ``truth``'s (dashed); ``styles`` names the two in the title. Slices are spread
    over the labelled extent; the image is shown as in radiology (patient's right on the left of
    the picture, anterior up) and cropped to the body.
    """
    plt = _pyplot()
    fg = np.argwhere((label > 0) | ((truth > 0) if truth is not None else False))
    z_lo, z_hi = (fg[:, 2].min(), fg[:, 2].max()) if len(fg) else (0, ct.shape[2] - 1)
    zs = np.unique(np.linspace(z_lo, z_hi, slices + 2).round().astype(int)[1:-1])
    body = np.argwhere(ct.max(axis=2) > -500)
    (x0, y0), (x1, y1) = (body.min(0), body.max(0) + 1) if len(body) else ((0, 0), ct.shape[:2])
    colours = {v: plt.cm.tab10((v - 1) % 10) for v in names.values()}
    fig, axes = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.4), squeeze=False)
    for ax, z in zip(axes[0], zs, strict=False):
        # RAS array: x runs to the patient's right, y anterior. Radiological view: rows = anterior->posterior, columns = right->left
        def view(a, z=z):
            return _radiological(a, (x0, x1, y0, y1), z)

        ax.imshow(np.clip(view(ct), *window), cmap="gray", interpolation="nearest")
        for v in names.values():
            if truth is not None and (view(truth) == v).any():
                ax.contour(view(truth) == v, [0.5], colors=[colours[v]], linewidths=1.0, linestyles="dashed")
            if (view(label) == v).any():
                ax.contour(view(label) == v, [0.5], colors=[colours[v]], linewidths=1.6)
        ax.set_title(f"slice {z}")
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[v], label=n) for n, v in names.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title + (f"  (solid: {styles[0]}, dashed: {styles[1]})" if truth is not None else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def training_curves(history: list[dict], out: str | Path, title: str = "") -> Path:
    """Training loss and validation Dice per epoch (``finetune``'s history)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(epochs, [h["loss"] for h in history], label="training loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles = ax.get_lines()
    val = [(h["epoch"], h["val_dice"]) for h in history if "val_dice" in h]
    if val:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*val, strict=False), label="validation Dice", color="tab:orange")
        ax2.set_ylabel("mean Dice")
        ax2.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(handles=handles, loc="center right", fontsize=8)  # inside the axes, clear of the title
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def structure_overlays(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], name: str, value: int, out: str | Path,
                       slices: int = 3, margin: int = 12, window: tuple[float, float] = (-200.0, 300.0)) -> Path:
    """One structure on several patients: a row per ``(title, ct, prediction, reference)``.

    Each row shows ``slices`` axial slices spread over the reference's extent of the structure
    (label ``value``), cropped around it with ``margin`` voxels; reference dashed, model solid,
    in the radiological view of :func:`contour_overlay`.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), slices, figsize=(3 * slices, 3.1 * len(rows)), squeeze=False)
    for r, (title, ct, pred, ref) in enumerate(rows):
        fg = np.argwhere((ref == value) | (pred == value))
        if not len(fg):
            fg = np.argwhere(np.ones(ct.shape[:3], dtype=bool)[::8, ::8, ::8]) * 8
        inside = np.argwhere(ref == value) if (ref == value).any() else fg
        zs = np.unique(np.linspace(inside[:, 2].min(), inside[:, 2].max(), slices + 2).round().astype(int)[1:-1])
        (x0, y0), (x1, y1) = np.maximum(fg[:, :2].min(0) - margin, 0), np.minimum(fg[:, :2].max(0) + margin + 1, ct.shape[:2])
        for c in range(slices):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(zs):
                continue
            z = zs[c]
            def view(a, box=(x0, x1, y0, y1), z=z):
                return _radiological(a, box, z)

            ax.imshow(np.clip(view(ct), *window), cmap="gray", interpolation="nearest")
            if (view(ref) == value).any():
                ax.contour(view(ref) == value, [0.5], colors=["tab:orange"], linewidths=1.2, linestyles="dashed")
            if (view(pred) == value).any():
                ax.contour(view(pred) == value, [0.5], colors=["tab:cyan"], linewidths=1.6)
            ax.set_title(f"{title}, slice {z}" if c == 0 else f"slice {z}", fontsize=8)
    fig.suptitle(f"{name}: model (solid) and reference (dashed)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)
