"""A DICOM CT series as a volume, with the conventions ContourCL uses for NIfTI.

:func:`read_series` gives what MONAI's ITK/nibabel readers give for a NIfTI: a 3D array indexed
``(i, j, k)`` = (column, row, slice) in Hounsfield units and a 4 x 4 RAS affine in mm, from the
headers alone (slices sorted along the slice normal, never by InstanceNumber or file name; the
geometry SimpleITK's ``ImageSeriesReader`` gives, checked in ``tests/unit/test_dicom_series.py``).

What a grid cannot hold is refused with :class:`~contourcl.errors.InvalidImageError` naming the
problem: several series in the folder (unless ``series_uid`` picks one), a modality other than CT
(refused, unless ``allow_non_ct=True``), a tilted gantry (GantryDetectorTilt other than 0, or
slice positions that leave the normal), gaps or duplicates in the slice positions, mixed
orientations, image sizes or pixel spacings, multi-frame or colour images, missing geometry or
pixel data, pixel data no installed decoder reads, and a grid outside :data:`SERIES_BOUNDS`
(checked from the headers, before any pixel is decoded).

Compressed transfer syntaxes are decoded by pydicom 2.4 with pylibjpeg's plugins (JPEG 2000,
JPEG-LS, JPEG lossless) and by pydicom itself (RLE lossless, deflated explicit VR little endian).
This module imports no other part of ContourCL than :mod:`contourcl.errors`.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from contourcl.data.volumes import CT_BOUNDS
from contourcl.errors import InvalidImageError

#: SOP Class UID of CT Image Storage (one slice per file).
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
#: SOP Class UID of a DICOMDIR (skipped when a folder is scanned).
MEDIA_STORAGE_DIRECTORY = UID("1.2.840.10008.1.3.10")

#: Slice positions may deviate from a regular grid, and from the line along the normal, by
#: ``max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * slice spacing)``.
POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.01
#: Largest difference tolerated between two slices' direction cosines, and from unit length /
#: orthogonality.
ORIENTATION_TOLERANCE = 1e-4
#: A GantryDetectorTilt larger than this (degrees) is a tilted series.
TILT_TOLERANCE_DEG = 0.01


#: What a CT grid can be: the same bounds as any other CT file (checked from the headers).
SERIES_BOUNDS = CT_BOUNDS

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """One series' grid, from its headers alone; slice ``k`` is ``files[k]``, sorted along the normal.

    ``orientations`` (n x 6), ``pixel_spacings`` (n x 2, DICOM order: between rows, between
    columns) and ``positions`` (n x 3) are each slice's own ImageOrientationPatient, PixelSpacing
    and ImagePositionPatient (LPS, mm); they were checked to agree, and to lie on one regular grid.
    """

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uids: tuple[str, ...]
    positions: np.ndarray
    orientations: np.ndarray
    pixel_spacings: np.ndarray
    rows: int
    columns: int
    slice_spacing: float
    header: Dataset  # the first sorted slice's header, without pixel data

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(columns, rows, slices)``: the shape of :func:`read_series`'s array."""
        return (self.columns, self.rows, len(self.files))

    @property
    def row_cosine(self) -> np.ndarray:
        """LPS direction of increasing column index (array axis ``i``)."""
        return self.orientations[0, :3]

    @property
    def column_cosine(self) -> np.ndarray:
        """LPS direction of increasing row index (array axis ``j``)."""
        return self.orientations[0, 3:]

    @property
    def normal(self) -> np.ndarray:
        """LPS slice normal, row cosine x column cosine: the direction of increasing ``k``."""
        n = np.cross(self.row_cosine, self.column_cosine)
        return n / np.linalg.norm(n)

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel ``(i, j, k)`` to LPS mm."""
        aff = np.eye(4)
        row_sp, col_sp = self.pixel_spacings[0]
        aff[:3, 0] = self.row_cosine * col_sp
        aff[:3, 1] = self.column_cosine * row_sp
        aff[:3, 2] = self.normal * self.slice_spacing
        aff[:3, 3] = self.positions[0]
        return aff

    @property
    def affine(self) -> np.ndarray:
        """Voxel ``(i, j, k)`` to RAS mm, as MONAI's readers and nibabel give for NIfTI."""
        return _LPS_TO_RAS @ self.affine_lps

    def slice_points_lps(self, k: int, columns, rows) -> np.ndarray:
        """LPS coordinates (m x 3) of points at (fractional) ``columns``/``rows`` of slice ``k``,
        from that slice's own ImagePositionPatient, ImageOrientationPatient and PixelSpacing."""
        c = np.asarray(columns, dtype=np.float64)[:, None]
        r = np.asarray(rows, dtype=np.float64)[:, None]
        row_sp, col_sp = self.pixel_spacings[k]
        x_dir, y_dir = self.orientations[k, :3], self.orientations[k, 3:]
        return self.positions[k] + c * col_sp * x_dir + r * row_sp * y_dir

    def slice_index_of_position(self, distance: float) -> tuple[int, float]:
        """The slice nearest ``distance`` along the normal (mm), and how far it is from it."""
        d = self.positions @ self.normal
        k = int(np.argmin(np.abs(d - distance)))
        return k, float(abs(d[k] - distance))


# --------------------------------------------------------------------------------------------
# finding series


@dataclass(frozen=True)
class SeriesSummary:
    """A series found in a folder: its UID, modality, description and image files."""

    series_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]

    def __str__(self) -> str:
        desc = f", {self.description!r}" if self.description else ""
        return f"{self.series_uid} ({self.modality or 'no modality'}, {len(self.files)} images{desc})"


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file (no pixel data), ``None`` for a file that is not DICOM."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None


def _scan(folder: str | Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """Image instances under ``folder`` (recursively), grouped by SeriesInstanceUID.

    Files that are not DICOM, DICOMDIRs and objects without an image (RTSTRUCT, RTPLAN, SR,
    ...) are skipped: a patient's export often puts them beside the CT.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidImageError(f"{str(folder)!r} is not a folder: a DICOM series is read from a folder of files")
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root, name)
            if not path.is_file():
                continue
            ds = _read_header(path)
            if ds is None:
                continue
            meta_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
            if meta_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
                continue
            if "Rows" not in ds or "Columns" not in ds:
                continue  # no image: RTSTRUCT, RTPLAN, SR, ...
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                raise InvalidImageError(f"the DICOM file {str(path.relative_to(folder))!r} has no SeriesInstanceUID")
            series[uid].append((path, ds))
    return series


def list_series(folder: str | Path) -> list[SeriesSummary]:
    """The image series under ``folder``, largest first."""
    out = []
    for uid, items in _scan(folder).items():
        first = items[0][1]
        out.append(
            SeriesSummary(
                series_uid=uid,
                modality=str(first.get("Modality", "") or ""),
                description=str(first.get("SeriesDescription", "") or ""),
                files=tuple(p for p, _ in items),
            )
        )
    return sorted(out, key=lambda s: (-len(s.files), s.series_uid))


def _select(folder: str | Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    series = _scan(folder)
    if not series:
        raise InvalidImageError(f"no DICOM image found under {str(folder)!r}")
    if series_uid is not None:
        if series_uid not in series:
            known = "; ".join(str(s) for s in list_series(folder))
            raise InvalidImageError(f"no series {series_uid} under {str(folder)!r}; series there: {known}")
        return series[series_uid]
    if len(series) > 1:
        known = "; ".join(str(s) for s in list_series(folder))
        raise InvalidImageError(
            f"{str(folder)!r} holds {len(series)} image series: {known}. Pick one with series_uid="
        )
    return next(iter(series.values()))


# --------------------------------------------------------------------------------------------
# geometry


def _floats(ds: Dataset, keyword: str, n: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InvalidImageError(f"the DICOM file {name!r} has no {keyword}: its place in space is unknown")
    try:
        arr = np.array([float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])])
    except (TypeError, ValueError) as err:
        raise InvalidImageError(f"the DICOM file {name!r} has an unreadable {keyword} {value!r}") from err
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise InvalidImageError(f"the DICOM file {name!r} has {keyword} {list(value)!r}: {n} finite numbers expected")
    return arr


def _geometry(items: list[tuple[Path, Dataset]], root: Path, *, allow_non_ct: bool, bounds) -> SeriesGeometry:
    """Check a series' headers and sort its slices; see the module docstring for what is refused."""

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    first_path, first = items[0]
    uid = str(first.SeriesInstanceUID)
    what = f"series {uid}"

    modalities = Counter(str(ds.get("Modality", "") or "") for _, ds in items)
    if set(modalities) != {"CT"} and not allow_non_ct:
        listed = ", ".join(f"{m or 'none'} ({n} images)" for m, n in modalities.most_common())
        raise InvalidImageError(
            f"the {what} has modality {listed}: ContourCL contours CT (Hounsfield units); refused"
        )
    frames = [rel(p) for p, ds in items if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if frames:
        raise InvalidImageError(
            f"the {what} holds multi-frame images ({frames[0]} ...): enhanced (multi-frame) CT is not supported, "
            "export the series as one slice per file"
        )
    colour = [rel(p) for p, ds in items if int(ds.get("SamplesPerPixel", 1) or 1) != 1
              or str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2")]
    if colour:
        raise InvalidImageError(f"the {what} holds colour images ({colour[0]} ...): a CT is greyscale")
    tilts = sorted({round(float(ds.get("GantryDetectorTilt", 0) or 0), 3) for _, ds in items})
    if any(abs(t) > TILT_TOLERANCE_DEG for t in tilts):
        raise InvalidImageError(
            f"the {what} was acquired with a tilted gantry (GantryDetectorTilt {tilts} degrees): its slices are "
            "sheared, not a regular grid; resample it to an untilted grid first"
        )

    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in items)
    if len(sizes) > 1:
        listed = ", ".join(f"{c} x {r} ({n} images)" for (r, c), n in sizes.most_common())
        raise InvalidImageError(f"the {what} mixes image sizes (columns x rows): {listed}")
    rows, columns = next(iter(sizes))

    orientations = np.stack([_floats(ds, "ImageOrientationPatient", 6, rel(p)) for p, ds in items])
    spacings = np.stack([_floats(ds, "PixelSpacing", 2, rel(p)) for p, ds in items])
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, rel(p)) for p, ds in items])

    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        kinds = sorted({tuple(np.round(o, 4)) for o in orientations})
        raise InvalidImageError(f"the {what} mixes slice orientations (ImageOrientationPatient {kinds[:4]}): not one volume")
    x_dir, y_dir = orientations[0, :3], orientations[0, 3:]
    if (abs(np.linalg.norm(x_dir) - 1) > 1e-3 or abs(np.linalg.norm(y_dir) - 1) > 1e-3
            or abs(float(x_dir @ y_dir)) > 1e-3):
        raise InvalidImageError(f"the {what} has ImageOrientationPatient {orientations[0].tolist()}: not two orthogonal unit vectors")
    if np.abs(spacings - spacings[0]).max() > 1e-4 * max(1.0, float(spacings[0].max())):
        kinds = sorted({tuple(np.round(s, 4)) for s in spacings})
        raise InvalidImageError(f"the {what} mixes pixel spacings {kinds[:4]}: not one volume")
    if (spacings <= 0).any():
        raise InvalidImageError(f"the {what} has pixel spacing {spacings[0].tolist()}: must be positive")
    if len(items) < 2:
        raise InvalidImageError(f"the {what} has a single slice ({rel(first_path)}): not a 3D volume")

    normal = np.cross(x_dir, y_dir)
    normal /= np.linalg.norm(normal)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist, positions, orientations, spacings = dist[order], positions[order], orientations[order], spacings[order]
    items = [items[i] for i in order]

    steps = np.diff(dist)
    span = float(dist[-1] - dist[0])
    spacing = span / (len(items) - 1)
    tol = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * spacing)
    dup = np.flatnonzero(steps <= tol)
    if dup.size:
        i = int(dup[0])
        raise InvalidImageError(
            f"the {what} has {dup.size} duplicate slice position(s): {rel(items[i][0])} and {rel(items[i + 1][0])} "
            f"both lie at {dist[i]:.3f} mm along the normal (two acquisitions in one series?)"
        )
    expected = np.median(steps)
    bad = np.flatnonzero(np.abs(steps - expected) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * expected))
    if bad.size:
        i = int(bad[0])
        raise InvalidImageError(
            f"the {what} has irregular slice spacing: {steps[i]:.3f} mm between {rel(items[i][0])} and "
            f"{rel(items[i + 1][0])} where the others are {expected:.3f} mm apart ({bad.size} such gap(s)); "
            "a missing slice, or slices of different thickness: not a regular grid"
        )
    offsets = positions - positions[0]
    perpendicular = offsets - np.outer(offsets @ normal, normal)
    off = np.linalg.norm(perpendicular, axis=1)
    if off.max() > tol:
        k = int(np.argmax(off))
        angle = np.degrees(np.arctan2(off[k], abs(offsets[k] @ normal)))
        raise InvalidImageError(
            f"the {what}'s slice positions leave the slice normal ({off[k]:.3f} mm off at {rel(items[k][0])}, "
            f"{angle:.2f} degrees): a tilted-gantry or sheared series, not a regular grid"
        )

    row_sp, col_sp = spacings[0]
    voxels = rows * columns * len(items)
    if voxels > bounds.max_voxels:
        raise InvalidImageError(f"the {what} has {voxels:,} voxels: more than a CT has (at most {bounds.max_voxels:,})")
    grid_spacing = (float(col_sp), float(row_sp), spacing)
    if not all(bounds.min_spacing_mm <= s <= bounds.max_spacing_mm for s in grid_spacing):
        raise InvalidImageError(
            f"the {what} has voxel spacing {tuple(round(s, 4) for s in grid_spacing)} mm: a CT's spacing lies within "
            f"{bounds.min_spacing_mm}-{bounds.max_spacing_mm} mm"
        )
    extent = (columns * col_sp, rows * row_sp, len(items) * spacing)
    if max(extent) > bounds.max_extent_mm:
        raise InvalidImageError(f"the {what} spans {tuple(round(e) for e in extent)} mm: more than a CT (at most {bounds.max_extent_mm:g} mm)")

    missing_uid = [rel(p) for p, ds in items if not ds.get("SOPInstanceUID")]
    if missing_uid:
        raise InvalidImageError(f"the DICOM file {missing_uid[0]!r} has no SOPInstanceUID")
    sop_uids = [str(ds.SOPInstanceUID) for _, ds in items]
    if len(set(sop_uids)) != len(sop_uids):
        dup_uid = next(u for u, n in Counter(sop_uids).items() if n > 1)
        raise InvalidImageError(f"the {what} holds SOPInstanceUID {dup_uid} twice: the same image stored in two files?")
    for_uids = {str(ds.get("FrameOfReferenceUID", "") or "") for _, ds in items}
    if len(for_uids) > 1:
        raise InvalidImageError(f"the {what} mixes frames of reference {sorted(for_uids)}")

    return SeriesGeometry(
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=for_uids.pop(),
        modality=str(first.get("Modality", "") or ""),
        files=tuple(p for p, _ in items),
        sop_instance_uids=tuple(sop_uids),
        sop_class_uids=tuple(str(ds.get("SOPClassUID", CT_IMAGE_STORAGE)) for _, ds in items),
        positions=positions,
        orientations=orientations,
        pixel_spacings=spacings,
        rows=rows,
        columns=columns,
        slice_spacing=spacing,
        header=items[0][1],
    )


def read_series_geometry(folder: str | Path, series_uid: str | None = None, *, allow_non_ct: bool = False,
                         bounds=SERIES_BOUNDS) -> SeriesGeometry:
    """The checked, sorted grid of the series under ``folder``, from its headers alone (no pixel
    data is decoded). Raises :class:`InvalidImageError` as :func:`read_series` does."""
    return _geometry(_select(folder, series_uid), Path(folder), allow_non_ct=allow_non_ct, bounds=bounds)


# --------------------------------------------------------------------------------------------
# pixels


def _pylibjpeg_syntaxes() -> set[str]:
    try:
        from pylibjpeg.utils import get_pixel_data_decoders
    except ImportError:
        return set()
    return {str(uid) for uid in get_pixel_data_decoders()}


def _stored_pixels(ds: Dataset, name: str) -> np.ndarray:
    """A slice's stored values (rows x columns). Compressed data go to pylibjpeg's decoders when
    they read that transfer syntax (pydicom would otherwise try Pillow first for JPEG 2000)."""
    if "PixelData" not in ds:
        raise InvalidImageError(f"the DICOM file {name!r} has no pixel data")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if ts is not None and UID(ts).is_compressed and str(ts) in _pylibjpeg_syntaxes():
            ds.convert_pixel_data(handler_name="pylibjpeg")
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises RuntimeError, NotImplementedError, ValueError, ...
        ts_name = UID(ts).name if ts is not None else "unknown transfer syntax"
        hint = ""
        if ts is not None and UID(ts).is_compressed:
            hint = " (JPEG 2000 needs pylibjpeg-openjpeg, JPEG-LS and JPEG lossless pylibjpeg-libjpeg)"
        raise InvalidImageError(f"cannot decode the pixel data of {name!r} ({ts_name}): {err}{hint}") from err
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise InvalidImageError(f"the pixel data of {name!r} has shape {arr.shape}, not {int(ds.Rows)} x {int(ds.Columns)}")
    return arr


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope", 1) if ds.get("RescaleSlope", "") != "" else 1)
        intercept = float(ds.get("RescaleIntercept", 0) if ds.get("RescaleIntercept", "") != "" else 0)
    except (TypeError, ValueError) as err:
        raise InvalidImageError(f"the DICOM file {name!r} has an unreadable RescaleSlope/RescaleIntercept") from err
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise InvalidImageError(f"the DICOM file {name!r} has RescaleSlope {slope} / RescaleIntercept {intercept}")
    return slope, intercept


def read_series(folder: str | Path, series_uid: str | None = None, *, allow_non_ct: bool = False,
                bounds=SERIES_BOUNDS) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of the CT series under ``folder``: HU indexed (column, row, slice), RAS mm.

    The array is int16 when every slice's rescale is integral and the values fit, float32
    otherwise. ``series_uid`` picks one series when the folder holds several. Raises
    :class:`InvalidImageError` naming the problem (see the module docstring).

    Voxels are in Hounsfield units (each slice's RescaleSlope/RescaleIntercept applied). The
    geometry comes from the headers alone:

    - slices are sorted by their position along the slice normal, ``ImagePositionPatient . n``
      with ``n = row cosine x column cosine`` (from ImageOrientationPatient), never by
      InstanceNumber or file name;
    - column ``i`` of the affine is the row cosine times the column spacing (``PixelSpacing[1]``),
      column ``j`` the column cosine times the row spacing (``PixelSpacing[0]``), column ``k`` the
      normal times the slice spacing, and the origin is the first sorted slice's
      ImagePositionPatient; all in DICOM's LPS, then turned to RAS (x and y negated). That is what
      SimpleITK's ``ImageSeriesReader`` gives (LPS), checked in ``tests/unit/test_dicom_series.py``.

    Decoders: JPEG 2000 by pylibjpeg-openjpeg; JPEG-LS and the JPEG lossless processes by
    pylibjpeg-libjpeg; RLE lossless and deflated explicit VR little endian by pydicom itself.
    """
    geo = read_series_geometry(folder, series_uid, allow_non_ct=allow_non_ct, bounds=bounds)
    root = Path(folder)
    out = np.empty(geo.shape, dtype=np.int16)
    for k, path in enumerate(geo.files):
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        try:
            ds = pydicom.dcmread(str(path))
        except Exception as err:
            raise InvalidImageError(f"cannot read the DICOM file {name!r}: {err}") from err
        if str(ds.get("SOPInstanceUID", "")) != geo.sop_instance_uids[k]:
            raise InvalidImageError(f"the DICOM file {name!r} changed while the series was read")
        stored = _stored_pixels(ds, name)
        slope, intercept = _rescale(ds, name)
        if slope == 1 and float(intercept).is_integer() and out.dtype == np.int16:
            hu = stored.astype(np.int32) + int(intercept)
            if hu.size and (hu.min() < -32768 or hu.max() > 32767):
                out = out.astype(np.float32)
        else:
            if out.dtype != np.float32:
                out = out.astype(np.float32)
            hu = stored.astype(np.float64) * slope + intercept
        out[:, :, k] = hu.T
    return out, geo.affine


def write_nifti_from_series(folder: str | Path, out_path: str | Path, series_uid: str | None = None, *,
                            allow_non_ct: bool = False, bounds=SERIES_BOUNDS) -> Path:
    """Write the series under ``folder`` as a NIfTI (``.nii`` or ``.nii.gz``) that MONAI and
    nibabel read back as :func:`read_series`'s ``(array, affine)``; returns ``out_path``."""
    import nibabel as nib

    array, affine = read_series(folder, series_uid, allow_non_ct=allow_non_ct, bounds=bounds)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------
# writing a series (tests, demos, and a NIfTI a planning system should import as a CT)


def write_ct_series(array, affine, folder: str | Path, *, patient_name: str = "Anonymous", patient_id: str = "ANON",
                    study_uid: str | None = None, series_uid: str | None = None,
                    frame_of_reference_uid: str | None = None, patient_position: str = "HFS",
                    rescale_intercept: int = -1024, signed: bool = False,
                    transfer_syntax: str = ExplicitVRLittleEndian, series_description: str = "ContourCL CT",
                    study_date: str = "20260101") -> list[Path]:
    """Write a 3D HU volume (indexed column, row, slice; ``affine`` RAS mm, as :func:`read_series`
    gives) as a CT series, one CT Image Storage file per slice, in ``folder``; returns the files in
    slice order.

    ImageOrientationPatient, PixelSpacing and each ImagePositionPatient come from the affine
    (turned to LPS). Voxels are rounded to integers and stored as ``HU - rescale_intercept``
    (unsigned 16 bits, or signed with ``signed=True``). ``transfer_syntax`` may be an uncompressed
    one (explicit/implicit VR little endian, deflated explicit VR little endian) or RLE lossless
    (pydicom's own encoder). The in-plane axes must be orthogonal; the slice axis need not be
    normal to them (that is how tests make a sheared series).
    """
    from pydicom.uid import ImplicitVRLittleEndian, RLELossless

    arr = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if arr.ndim != 3:
        raise InvalidImageError(f"a series is written from a 3D volume, not shape {arr.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_sp, row_sp = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    x_dir, y_dir = lps[:3, 0] / col_sp, lps[:3, 1] / row_sp
    if abs(float(x_dir @ y_dir)) > 1e-6:
        raise InvalidImageError("the affine's first two axes are not orthogonal: no DICOM slice has that geometry")
    hu = np.rint(arr).astype(np.int64)
    stored = hu - int(rescale_intercept)
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    if stored.size and (stored.min() < lo or stored.max() > hi):
        raise InvalidImageError(
            f"HU {hu.min()}..{hu.max()} minus the intercept {rescale_intercept} do not fit {'signed' if signed else 'unsigned'} 16 bits"
        )
    stored = stored.astype(np.int16 if signed else np.uint16)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    normal = np.cross(x_dir, y_dir)
    columns, rows, n = arr.shape
    paths = []
    for k in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax == RLELossless else UID(transfer_syntax)
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "ContourCL"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.KVP = "120"
        ds.SliceThickness = f"{abs(float(lps[:3, 2] @ normal)):.6g}"
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        position = lps[:3, 3] + k * lps[:3, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*x_dir, *y_dir)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(position @ normal):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.PixelSpacing = [f"{row_sp:.8g}", f"{col_sp:.8g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleIntercept = str(int(rescale_intercept))
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.is_little_endian = True
        ds.is_implicit_VR = UID(meta.TransferSyntaxUID) == ImplicitVRLittleEndian
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless)
        path = folder / f"CT.{sop_uid}.dcm"
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths
