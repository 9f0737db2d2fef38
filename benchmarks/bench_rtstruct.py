"""RTSTRUCT on a real CT: outline-volume ratio per structure and the time to write it.

Usage::

    python benchmarks/bench_rtstruct.py --data ../shared/data/openkbp [--inplane-factor 1] [--repeats 3]
    python benchmarks/bench_rtstruct.py --case ../shared/data/openkbp/validation-pats/pt_201

Turns an OpenKBP case (``--case DIR``; default: ``validation-pats/pt_201`` of the OpenKBP folder,
``--data DIR`` or the environment variable ``CONTOURCL_OPENKBP``) (ct.nii.gz, oar.nii.gz, target.nii.gz; RAS affine, see that folder's
README) into a DICOM CT series in a temporary folder, as a scanner stores an axial head-first
CT (ImageOrientationPatient [1,0,0,0,1,0]: the NIfTI's first two axes swapped, nothing
resampled), reads it back with ``read_series`` (checked equal), writes the OARs and PTV70 (as
GTV) as an RTSTRUCT with ``write_rtstruct``, and prints per structure:

- the outline-volume ratio: the contours' polygon areas (XOR within a slice, as a planning
  system computes them) summed over slices x slice spacing, over the voxel volume
  (``contour_volumes``);
- for comparison, the same ratio for two other ways to trace: marching squares at 0.5 on the
  mask (``skimage.measure.find_contours``; cuts every corner), and outlines through the centres
  of the boundary voxels (marching squares at 0.999, close to OpenCV's border following that
  rt-utils uses);
- the Dice of label -> RTSTRUCT -> label (``read_rtstruct``);

and the time to write the RTSTRUCT (median of ``--repeats``), to read the series and to read
the RTSTRUCT back. ``--inplane-factor 4`` repeats every pixel 4 x 4 times (nearest neighbour),
which turns the 128 x 128 OpenKBP grid into a 512 x 512 planning-CT grid of the same anatomy.
Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.measure import find_contours

from contourcl.data.datasets import openkbp_root
from contourcl.data.dicom_series import (
    read_series,
    read_series_geometry,
    write_ct_series,
)
from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import (
    contour_volumes,
    load_rois,
    read_rtstruct,
    write_rtstruct,
)
from contourcl.errors import DataNotFoundError

#: ContourCL's stored numbering
STRUCTURES = dict(STORED_LABELS)
#: the case timed by default, relative to the OpenKBP folder
DEFAULT_CASE = Path("validation-pats") / "pt_201"


def traced_area(mask2d: np.ndarray, level: float) -> float:
    """Area (pixels) inside marching-squares outlines of the padded mask at ``level``, contours
    combined by their orientation (find_contours runs holes the other way). Level 0.5 cuts each
    corner of the voxel edges; a level just under 1 runs through the centres of the boundary
    voxels, as OpenCV's border following (rt-utils) does."""
    total = 0.0
    for c in find_contours(np.pad(mask2d.astype(float), 1), level):
        y, x = c[:, 0], c[:, 1]
        total += 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return abs(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, help=f"an OpenKBP case folder (default: {DEFAULT_CASE} of the OpenKBP folder)")
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    parser.add_argument("--inplane-factor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.case is None:
        try:
            args.case = openkbp_root(args.data) / DEFAULT_CASE
        except DataNotFoundError as err:
            parser.error(f"{err} (or give --case)")

    ct_img = nib.load(args.case / "ct.nii.gz")
    ct = np.asarray(ct_img.dataobj).astype(np.int16)
    oar = np.asarray(nib.load(args.case / "oar.nii.gz").dataobj).astype(np.uint8)
    target = np.asarray(nib.load(args.case / "target.nii.gz").dataobj)
    label = oar.copy()
    label[target > 0] = STRUCTURES["GTV"]  # PTV70 stands for the target; it overrides OARs it covers
    affine = ct_img.affine.copy()

    # as a scanner stores it: columns to the patient's left, rows to the back
    ct, label = ct.transpose(1, 0, 2), label.transpose(1, 0, 2)
    affine[:, [0, 1]] = affine[:, [1, 0]]
    f = args.inplane_factor
    if f > 1:
        ct = np.repeat(np.repeat(ct, f, axis=0), f, axis=1)
        label = np.repeat(np.repeat(label, f, axis=0), f, axis=1)
        affine[:3, :2] /= f
        affine[:3, 3] -= (affine[:3, 0] + affine[:3, 1]) * (f - 1) / 2  # same field of view
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert np.allclose(direction, np.diag([-1, -1, 1])), direction  # RAS -x, -y, +z: IOP [1,0,0,0,1,0]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        signed = bool(ct.min() < -1024)
        t0 = time.perf_counter()
        write_ct_series(ct, affine, folder, patient_id=args.case.name, signed=signed,
                        rescale_intercept=0 if signed else -1024)
        t_write_series = time.perf_counter() - t0
        t0 = time.perf_counter()
        arr, aff = read_series(folder)
        t_read_series = time.perf_counter() - t0
        assert np.array_equal(arr, ct) and np.allclose(aff, affine, atol=1e-4)
        geo = read_series_geometry(folder)

        times = []
        for r in range(args.repeats):
            out = Path(tmp) / f"RS{r}.dcm"
            t0 = time.perf_counter()
            write_rtstruct(label, affine, STRUCTURES, folder, out, geometry=geo,
                           algorithm_name="ContourCL", algorithm_version="bench")
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back, mapped, unmapped = read_rtstruct(out, folder, STRUCTURES, geometry=geo)
        t_read_rt = time.perf_counter() - t0
        volumes = contour_volumes(out, slice_thickness=geo.slice_spacing)
        rois = {r.name: r for r in load_rois(out)}
        size_kb = out.stat().st_size / 1024

    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    px_mm2 = voxel_mm3 / geo.slice_spacing
    print(f"case {args.case.name}: {label.shape[0]} x {label.shape[1]} x {label.shape[2]} voxels of "
          f"{np.linalg.norm(affine[:3, 0]):.3f} x {np.linalg.norm(affine[:3, 1]):.3f} x {geo.slice_spacing:.3f} mm "
          f"(in-plane factor {f}); {len(geo.files)} CT files")
    print()
    print("| structure | voxels | voxel volume (cm3) | contours | points | ratio: voxel edges (written) | "
          "ratio: marching squares 0.5 | ratio: boundary-voxel centres | Dice after round trip |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, value in STRUCTURES.items():
        mask = label == value
        n = int(mask.sum())
        if n == 0:
            print(f"| {name} | 0 | - | - | - | - | - | - | (not contoured: left out) |")
            continue
        slices = [mask[:, :, k].T for k in range(mask.shape[2]) if mask[:, :, k].any()]
        other = [sum(traced_area(sl, level) for sl in slices) * px_mm2 * geo.slice_spacing / (n * voxel_mm3)
                 for level in (0.5, 0.999)]
        roi = rois[name]
        back_mask = back == value
        d = 2 * np.count_nonzero(mask & back_mask) / (n + np.count_nonzero(back_mask))
        print(f"| {name} | {n} | {n * voxel_mm3 / 1000:.2f} | {len(roi.contours)} | {sum(len(c.points) for c in roi.contours)} | "
              f"{volumes[name] / (n * voxel_mm3):.6f} | {other[0]:.3f} | {other[1]:.3f} | {d:.4f} |")
    print()
    lps_x = {n: np.concatenate([c.points for c in rois[n].contours])[:, 0].mean() for n in ("Parotid_R", "Parotid_L") if n in rois}
    if len(lps_x) == 2:
        side = "right of" if lps_x["Parotid_R"] < lps_x["Parotid_L"] else "LEFT OF (wrong)"
        print(f"Parotid mean LPS x: Parotid_R {lps_x['Parotid_R']:.1f} mm, Parotid_L {lps_x['Parotid_L']:.1f} mm: "
              f"Parotid_R lies {side} Parotid_L (the patient's right is towards negative LPS x)")
    print(f"write_rtstruct: median {statistics.median(times):.3f} s over {len(times)} runs "
          f"({', '.join(f'{t:.3f}' for t in times)}); file {size_kb:.0f} KiB")
    print(f"write_ct_series {t_write_series:.2f} s; read_series {t_read_series:.2f} s; read_rtstruct {t_read_rt:.3f} s")
    print(f"mapped {len(mapped)} ROIs, unmapped {unmapped}")


if __name__ == "__main__":
    main()
