"""DICOM Segmentation (SEG) of a label map on a CT series' grid, written with highdicom.

One segment per structure that has a voxel, numbered 1..K in the order of ``structures`` and
named by its TG-263 name taken from the label *value* (never from a list position: an empty
structure is left out, the others keep their names). Each segment carries SNOMED CT codes for
its anatomy (:data:`SEGMENT_CODES`, from the DICOM standard's code tables as pydicom ships
them; laterality as an anatomic-region modifier) and identifies the algorithm: ContourCL, the
model's name and the served model file's version. Frames follow the series' slices, each
referencing its source instance, so a viewer places them by the series' own geometry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from contourcl.data.dicom_series import SeriesGeometry, read_series_geometry
from contourcl.data.rtstruct import check_structures, display_colour, label_values, to_series_grid
from contourcl.errors import UnknownLabelError

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")  # DICOM CID 7150
MORPHOLOGICALLY_ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")

#: structure -> (category, type, laterality or None)
SEGMENT_CODES: dict[str, tuple[Code, Code, Code | None]] = {
    "Brainstem": (ANATOMICAL_STRUCTURE, codes.SCT.BrainStem, None),
    "SpinalCord": (ANATOMICAL_STRUCTURE, codes.SCT.SpinalCord, None),
    "Parotid_R": (ANATOMICAL_STRUCTURE, codes.SCT.ParotidGland, codes.SCT.Right),
    "Parotid_L": (ANATOMICAL_STRUCTURE, codes.SCT.ParotidGland, codes.SCT.Left),
    "Mandible": (ANATOMICAL_STRUCTURE, codes.SCT.Mandible, None),
    "Larynx": (ANATOMICAL_STRUCTURE, codes.SCT.Larynx, None),
    "Esophagus": (ANATOMICAL_STRUCTURE, codes.SCT.Esophagus, None),
    "GTV": (MORPHOLOGICALLY_ALTERED, codes.SCT.GrossTumorVolume, None),
}


def _segment_datasets(geo: SeriesGeometry) -> list[pydicom.Dataset]:
    """The series' instances in slice order, headers only (what highdicom reads of a source)."""
    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in geo.files]


def _lab(rgb) -> tuple[float, float, float]:
    """sRGB (0-255) as CIELab (D65): L* 0..100, a* and b* -128..127."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3) / 255.0)[0, 0]
    return float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))


def build_seg(label, affine, structures: Mapping[str, int], series_folder: str | Path | None = None, *,
              geometry: SeriesGeometry | None = None, series_uid: str | None = None,
              algorithm_name: str = "ContourCL", algorithm_version: str = "", series_description: str = "ContourCL auto-contours",
              series_number: int = 902, manufacturer: str = "ContourCL", generation_algorithm: str = "AUTOMATIC"):
    """The SEG dataset of ``label`` on the series (arguments as :func:`contourcl.data.rtstruct.write_rtstruct`).

    Returns ``None`` when no structure has a voxel (a SEG needs at least one segment).
    """
    import highdicom as hd

    structures = check_structures(structures)
    unknown = sorted(set(structures) - set(SEGMENT_CODES))
    if unknown:
        raise UnknownLabelError(f"no SNOMED CT codes for {unknown}: known structures {sorted(SEGMENT_CODES)}")
    geo = geometry if geometry is not None else read_series_geometry(series_folder, series_uid)
    lab = to_series_grid(label, affine, geo)  # (column, row, slice)
    present = label_values(lab, structures)
    names = [n for n, v in structures.items() if v in present]
    if not names:
        return None
    # frames (slice, row, column), numbered as the segments: 1..K in the order of ``structures``
    frames = np.zeros((lab.shape[2], lab.shape[1], lab.shape[0]), dtype=np.uint8)
    moved = np.transpose(lab, (2, 1, 0))
    for number, name in enumerate(names, start=1):
        frames[moved == structures[name]] = number
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=algorithm_version or "unknown")
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind, side = SEGMENT_CODES[name]
        region = [hd.sr.CodedConcept(kind.value, kind.scheme_designator, kind.meaning)] if side else None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[generation_algorithm], algorithm_identification=algorithm,
            anatomic_regions=region, primary_anatomic_structures=None,
        ))
        if side is not None:  # laterality: a modifier of the anatomic region (Parotid_R / Parotid_L)
            descriptions[-1].AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)]
        # the RTSTRUCT's colour, in CIELab as the SEG wants it (viewers warn and pick their own without one)
        descriptions[-1].RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(*_lab(display_colour(name))).value)
    return hd.seg.Segmentation(
        source_images=_segment_datasets(geo), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=manufacturer, manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version or "unknown", device_serial_number="0", series_description=series_description,
        omit_empty_frames=True,
    )


def write_seg(label, affine, structures: Mapping[str, int], series_folder: str | Path | None, out_path: str | Path, **kwargs) -> Path | None:
    """Write :func:`build_seg`'s dataset to ``out_path``; ``None`` (nothing written) without a segment."""
    seg = build_seg(label, affine, structures, series_folder, **kwargs)
    if seg is None:
        return None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out_path))
    return out_path


class InvalidSegError(UnknownLabelError):
    """A SEG that cannot be placed on its series: malformed, another grid, or frames whose own
    attributes contradict each other (it is never made a label)."""


#: how far (mm) a frame's plane position may lie from the slice it is placed on
POSITION_TOLERANCE_MM = 0.1
ORIENTATION_TOLERANCE = 1e-3


def _frame_position(item, shared) -> np.ndarray | None:
    for group in (item, shared):
        seq = group.get("PlanePositionSequence") if group is not None else None
        if seq and "ImagePositionPatient" in seq[0]:
            return np.array([float(v) for v in seq[0].ImagePositionPatient])
    return None


def _frame_orientation(item, shared) -> np.ndarray | None:
    for group in (item, shared):
        seq = group.get("PlaneOrientationSequence") if group is not None else None
        if seq and "ImageOrientationPatient" in seq[0]:
            return np.array([float(v) for v in seq[0].ImageOrientationPatient])
    return None


def _frame_source(item) -> str | None:
    for derivation in item.get("DerivationImageSequence") or []:
        for source in derivation.get("SourceImageSequence") or []:
            uid = source.get("ReferencedSOPInstanceUID")
            if uid:
                return str(uid)
    return None


def place_frames(seg: pydicom.Dataset, geo: SeriesGeometry, name: str = "SEG") -> list[int]:
    """The series slice of each of ``seg``'s frames, by what the frame's own attributes agree on.

    Each frame says where it lies twice: the instance it was derived from (its
    ``DerivationImageSequence``) and its plane position (``PlanePositionSequence``, per frame or
    shared). A frame is placed on the slice both name; on the one slice one of them names when
    the other is missing; a frame whose two disagree (a writer that put one frame's pixels under
    another slice's reference or position), that names neither, that lies off every slice, or
    whose orientation or size is not the series', refuses the whole SEG
    (:class:`InvalidSegError`, naming the frame and both slices).
    """
    frames = int(seg.get("NumberOfFrames", 1) or 1)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]
    if len(per_frame) != frames:
        raise InvalidSegError(f"{name}: {frames} frames but {len(per_frame)} per-frame functional groups")
    columns, rows, _ = geo.shape
    if (int(seg.Columns), int(seg.Rows)) != (columns, rows):
        raise InvalidSegError(f"{name}: frames of {seg.Columns} x {seg.Rows} pixels on a series of {columns} x {rows}")
    index = {uid: k for k, uid in enumerate(geo.sop_instance_uids)}
    spacing = float(geo.slice_spacing)
    placed = []
    for f, item in enumerate(per_frame, start=1):
        orientation = _frame_orientation(item, shared)
        if orientation is not None and np.abs(orientation - geo.orientations[0]).max() > ORIENTATION_TOLERANCE:
            raise InvalidSegError(f"{name}: frame {f} is oriented {orientation.round(4).tolist()}, "
                                  f"the series {geo.orientations[0].round(4).tolist()}")
        source = _frame_source(item)
        by_ref = index.get(source) if source else None
        if source and by_ref is None:
            raise InvalidSegError(f"{name}: frame {f} refers to instance {source}, which is not in the series")
        position = _frame_position(item, shared)
        by_pos = None
        if position is not None:
            k, off = geo.slice_index_of_position(float(position @ geo.normal))
            in_plane = np.linalg.norm(position - geo.positions[k])
            if off > POSITION_TOLERANCE_MM or in_plane > POSITION_TOLERANCE_MM + 1e-6:
                raise InvalidSegError(f"{name}: frame {f} lies at {position.round(3).tolist()}, on no slice of the series "
                                      f"({off:.2f} mm along the normal, {in_plane:.2f} mm in plane from slice {k}; "
                                      f"slices are {spacing:g} mm apart)")
            by_pos = k
        if by_ref is None and by_pos is None:
            raise InvalidSegError(f"{name}: frame {f} names neither its source instance nor its plane position")
        if by_ref is not None and by_pos is not None and by_ref != by_pos:
            raise InvalidSegError(f"{name}: frame {f} contradicts itself: it is derived from slice {by_ref} "
                                  f"(instance {source}) but lies at slice {by_pos}'s position; not placed, not imported")
        placed.append(by_ref if by_ref is not None else by_pos)
    return placed


SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def read_seg(seg_path: str | Path, series_folder: str | Path | None = None, *, geometry: SeriesGeometry | None = None,
             series_uid: str | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """A SEG back to a label map on the series' (column, row, slice) grid, valued by segment
    number, and ``{segment label: segment number}``; frames are placed by :func:`place_frames`
    (never by their order). BINARY, FRACTIONAL (at half the maximum) and LABELMAP SEGs are read
    with pydicom alone, so a writer's missing optional attributes do not stop the reading. A SEG
    that cannot be read or placed raises :class:`InvalidSegError`."""
    geo = geometry if geometry is not None else read_series_geometry(series_folder, series_uid)
    name = Path(seg_path).name
    try:
        ds = pydicom.dcmread(str(seg_path))
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on a malformed file
        raise InvalidSegError(f"{name}: not a readable DICOM SEG ({type(err).__name__}: {err})") from err
    try:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
            raise InvalidSegError(f"{name}: not a DICOM SEG (SOP class {sop_class or 'missing'})")
        # OHIF's own export (dcmjs; MONAI Label 0.8.5's OHIF) is read like any SEG: its frames lie
        # where their references and positions say, head first and feet first (tests/fixtures/ohif-seg)
        placed = place_frames(ds, geo, name)
        names: dict[str, int] = {}
        for item in ds.SegmentSequence:
            names[str(item.SegmentLabel)] = int(item.SegmentNumber)
        kind = str(ds.get("SegmentationType", "BINARY")).upper()
        pixels = np.asarray(ds.pixel_array)
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.shape[0] != len(placed):
            raise InvalidSegError(f"{name}: {pixels.shape[0]} frames of pixels for {len(placed)} frames described")
        out = np.zeros(geo.shape, dtype=np.uint16)
        threshold = 0.5 * float(ds.get("MaximumFractionalValue", 1) or 1) if kind == "FRACTIONAL" else 0
        for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            frame = pixels[f].T
            if kind == "LABELMAP":  # the pixel values are the segment numbers
                known = np.isin(frame, list(names.values()))
                out[:, :, placed[f]][known & (frame > 0)] = frame[known & (frame > 0)]
                continue
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if number not in names.values():
                raise InvalidSegError(f"{name}: frame {f + 1} is of segment {number}, which the SEG does not describe")
            out[:, :, placed[f]][frame > threshold] = number
    except InvalidSegError:
        raise
    except Exception as err:  # noqa: BLE001 - a malformed SEG is refused with what was wrong, never half read
        raise InvalidSegError(f"{name}: malformed SEG ({type(err).__name__}: {err})") from err
    return out, names
