"""SepaReg's SIS region sizes on OpenKBP: the old setting, the alternatives, and the paper's.

Usage::

    OMP_NUM_THREADS=1 python -m contourcl.training.experiments.slic_regions --data ../shared/data/openkbp [--cases 3] [--every 4]

Data: the first ``--cases`` CTs of ``--images DIR``, else of ``train-pats/`` in the OpenKBP folder
(``--data DIR`` or the environment variable ``CONTOURCL_OPENKBP``),
loaded as pretraining loads them (RAS, 4 mm in-plane, window -500..800 HU, body mask); every
``--every``-th slice with at least 64 body pixels (SepaReg's ``min_body_pixels``). Each setting
runs :func:`contourcl.training.pretrain.separeg.slic_slice` on those slices; its regions are
measured on the 4 mm grid the region images are cut from: area (mm^2 and pixels), bounding-box
side (the longer side, the square a region is padded to) and the resulting upsampling to the
128-pixel region images; quartiles over all regions, and the pixel-weighted median area (the
region a body pixel lies in). The time is SLIC per slice, resampling included.

The reference row is the authors' protocol (code of Separate_CL: ``utils/prepare_data.py`` crops
slices to 384 x 384 pixels, ``utils/prepare_segs_utils.py`` runs SLIC with 32 centres,
compactness 15 and sigma 0.8 on the *whole* crop, then zeroes the background), emulated on the
same slices resampled to 1 mm; its pieces are measured on the 1 mm grid, all of them and the
"interior" ones (the superpixels the body edge did not cut).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from contourcl.data.datasets import find_ct_images, openkbp_root
from contourcl.errors import DataNotFoundError
from contourcl.training.pretrain.separeg import PAPER_REGION_AREA_MM2, regions_of_slice, slic_slice
from contourcl.training.pretrain.volumes import load_volume

GRID_MM = 4.0  #: the pretraining grid (PretrainConfig.spacing)
IMAGE_SIZE = 128  #: the region images' side (PretrainConfig.image_size)

SETTINGS = {  # name: slic_slice options
    "n_segments=32 per slice (old default)": {},
    "n_segments=32, SLIC at 2 mm": {"slic_spacing": 2.0},
    "n_segments=32, SLIC at 1 mm": {"slic_spacing": 1.0},
    "region_area_mm2=4608 (new default)": {"region_area_mm2": PAPER_REGION_AREA_MM2},
    "region_area_mm2=4608, SLIC at 2 mm": {"region_area_mm2": PAPER_REGION_AREA_MM2, "slic_spacing": 2.0},
    "region_area_mm2=4608, SLIC at 1 mm": {"region_area_mm2": PAPER_REGION_AREA_MM2, "slic_spacing": 1.0},
}


def authors_protocol(image: np.ndarray, body: np.ndarray, pixel_mm: float, crop: int = 384, mm: float = 1.0):
    """The authors' SIS on one slice resampled to ``mm``: SLIC (32 centres) on the centre
    ``crop`` x ``crop`` pixels, background zeroed after. Returns ``(areas, sides, interior)`` in
    pixels of that grid (``interior``: the superpixel lies wholly in the body)."""
    from skimage.segmentation import slic
    from skimage.transform import resize

    shape = tuple(round(n * pixel_mm / mm) for n in image.shape)
    img = resize(image.astype(np.float64), shape, order=1, anti_aliasing=False)
    fg = resize(body, shape, order=0, anti_aliasing=False).astype(bool)
    pad = [(max(0, (crop - n + 1) // 2),) * 2 for n in shape]  # a field smaller than the crop: pad with air
    img, fg = np.pad(img, pad), np.pad(fg, pad)
    r0, c0 = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
    img, fg = img[r0 : r0 + crop, c0 : c0 + crop], fg[r0 : r0 + crop, c0 : c0 + crop]
    labels = slic(img, n_segments=32, compactness=0.15, sigma=0.8, channel_axis=None, start_label=1)
    whole = np.bincount(labels.ravel())
    rows = regions_of_slice(labels * fg)
    areas = np.array([r[5] for r in rows])
    sides = np.array([max(r[3] - r[1], r[4] - r[2]) for r in rows])
    interior = np.array([r[5] == whole[r[0]] for r in rows], bool)
    return areas, sides, interior


def weighted_median(values: np.ndarray) -> float:
    v = np.sort(np.asarray(values, float))
    c = np.cumsum(v)
    return float(v[np.searchsorted(c, c[-1] / 2)])


def q(values, scale: float = 1.0) -> str:
    a = np.percentile(np.asarray(values, float) * scale, [25, 50, 75])
    return f"{a[1]:.0f} ({a[0]:.0f}-{a[2]:.0f})"


def row(name, grid_mm, areas_px, sides_px, per_slice, seconds, slices) -> str:
    areas_mm2 = np.asarray(areas_px, float) * grid_mm**2
    up = IMAGE_SIZE / np.maximum(1, np.asarray(sides_px, float))
    return (f"| {name} | {grid_mm:g} | {len(areas_px)} | {np.median(per_slice):.0f} | {q(areas_mm2)} | {weighted_median(areas_mm2):.0f} "
            f"| {q(areas_px)} | {q(sides_px)} | {q(sides_px, grid_mm)} | {np.median(up):.1f} | {1000 * seconds / slices:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", help="CT files or a folder (default: OpenKBP train-pats)")
    p.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--every", type=int, default=4, help="measure every N-th body slice")
    args = p.parse_args()
    try:
        images = args.images or str(openkbp_root(args.data) / "train-pats")
    except DataNotFoundError as err:
        p.error(f"{err} (or give --images)")
    paths = find_ct_images(images)[: args.cases]
    volumes = [load_volume(path, spacing=(GRID_MM, GRID_MM)) for path in paths]
    slices = [(v.image[..., z], v.body[..., z]) for v in volumes
              for z in [z for z in range(v.num_slices) if v.body[..., z].sum() >= 64][:: args.every]]
    body_mm2 = [b.sum() * GRID_MM**2 for _, b in slices]
    print(f"{len(slices)} slices of {', '.join(Path(x).parent.name for x in paths)} at {GRID_MM:g} mm; body area per slice "
          f"{q(body_mm2)} mm^2 (median, quartiles); target region area {PAPER_REGION_AREA_MM2:.0f} mm^2\n")
    print("| setting | grid mm | regions | per slice | area mm^2 | px-weighted median mm^2 | area px | bbox side px | bbox side mm "
          "| upsampling to 128 | ms / slice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, options in SETTINGS.items():
        areas, sides, per_slice = [], [], []
        t = time.perf_counter()
        for image, body in slices:
            rows = regions_of_slice(slic_slice(image, body, pixel_mm=(GRID_MM, GRID_MM), **options))
            areas += [r[5] for r in rows]
            sides += [max(r[3] - r[1], r[4] - r[2]) for r in rows]
            per_slice.append(len(rows))
        print(row(name, GRID_MM, areas, sides, per_slice, time.perf_counter() - t, len(slices)))
    areas, sides, interior = [], [], []
    t = time.perf_counter()
    for image, body in slices:
        a, s, i = authors_protocol(image, body, GRID_MM)
        areas.append(a), sides.append(s), interior.append(i)
    seconds = time.perf_counter() - t
    counts = [len(a) for a in areas], [int(i.sum()) for i in interior]
    areas, sides, interior = np.concatenate(areas), np.concatenate(sides), np.concatenate(interior)
    print(row("authors' protocol, all pieces (reference)", 1.0, areas, sides, counts[0], seconds, len(slices)))
    print(row("authors' protocol, interior superpixels", 1.0, areas[interior], sides[interior], counts[1], seconds, len(slices)))


if __name__ == "__main__":
    main()
