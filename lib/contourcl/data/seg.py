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
from contourcl.data.rtstruct import check_structures, label_values, to_series_grid
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


def read_seg(seg_path: str | Path, series_folder: str | Path | None = None, *, geometry: SeriesGeometry | None = None,
             series_uid: str | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """A SEG back to a label map on the series' (column, row, slice) grid, valued by segment
    number, and ``{segment label: segment number}``; frames are placed by the instance they
    reference, not by their order."""
    import highdicom as hd

    geo = geometry if geometry is not None else read_series_geometry(series_folder, series_uid)
    seg = hd.seg.segread(str(seg_path))
    index = {uid: k for k, uid in enumerate(geo.sop_instance_uids)}
    out = np.zeros(geo.shape, dtype=np.uint16)
    names: dict[str, int] = {}
    for number in seg.segment_numbers:
        name = seg.get_segment_description(number).segment_label
        names[name] = int(number)
    for frame_number in range(1, int(seg.NumberOfFrames) + 1):
        item = seg.PerFrameFunctionalGroupsSequence[frame_number - 1]
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index.get(source)
        if k is None:
            raise UnknownLabelError(f"{Path(seg_path).name}: a frame refers to instance {source}, which is not in the series")
        pixels = np.asarray(seg.pixel_array[frame_number - 1] if int(seg.NumberOfFrames) > 1 else seg.pixel_array)
        out[:, :, k][pixels.T > 0] = number
    return out, names
