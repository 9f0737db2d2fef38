"""DICOM RT Structure Sets (RTSTRUCT) out of and into label maps on a CT series' grid.

- Writing (:func:`write_rtstruct`, :func:`build_rtstruct`): one ROI per structure; on each slice
  the outline follows the voxel *edges* (:func:`outline_polygons`), so the polygons enclose
  exactly the structure's pixels and a planning system's volume equals the voxel volume (tracing
  through the boundary voxels' centres, as rt-utils does, loses half a voxel all round). A hole is
  a separate contour with XOR semantics, as most planning systems read several contours on one
  slice; no keyholes are written.
- Reading (:func:`read_rtstruct`, :func:`load_rois`): each ROI's closed planar contours are
  rasterised on the series grid (pixel centres inside the polygon, XOR within a slice), and ROI
  names are mapped to the caller's structures through :data:`ROI_NAME_ALIASES`, whole names only.

Contour points are in patient coordinates (LPS mm) from each slice's own geometry, never by
flipping axes. This module imports no other part of ContourCL than :mod:`contourcl.errors` and
:mod:`contourcl.data.dicom_series`; structure names and their label values are passed in.
(measured outline volumes: docs/design-notes.md)
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from contourcl.data.dicom_series import SeriesGeometry, read_series_geometry
from contourcl.errors import InvalidImageError, LabelMismatchError, UnknownLabelError

log = logging.getLogger(__name__)

#: SOP Class UID of RT Structure Set Storage.
RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
#: What RTSTRUCTs put in RTReferencedStudySequence's ReferencedSOPClassUID (Detached Study
#: Management; retired, but what planning systems write and expect).
DETACHED_STUDY_MANAGEMENT = UID("1.2.840.10008.3.1.2.3.1")

#: Defined terms of RTROIInterpretedType (DICOM PS3.3 C.8.8.8).
INTERPRETED_TYPES = frozenset({
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE", "ORGAN",
    "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL",
    "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION",
    "CONTROL", "DOSE_MEASUREMENT",
})

_LATERAL = {"R": ("r", "rt", "right", "dx"), "L": ("l", "lt", "left", "sx")}


def _lateral(organ: str, side: str) -> tuple[str, ...]:
    words = _LATERAL[side]
    return tuple(f"{organ} {w}" for w in words) + tuple(f"{w} {organ}" for w in words)


#: Names other systems give to ContourCL's structures. Compared after :func:`normalise_roi_name`
#: (case, spaces, ``_``, ``-`` and ``.`` ignored); whole names only. The order within a tuple
#: is the preference when a structure set holds several of them (a ROI named exactly as the
#: structure comes first): "GTV" before "PTV70", which stands in for the target on OpenKBP.
ROI_NAME_ALIASES: dict[str, tuple[str, ...]] = {
    "Brainstem": ("Brain Stem", "BrainStem", "Brain_Stem", "Brainstem_Full"),
    "SpinalCord": ("Spinal Cord", "Spinal_Cord", "Cord", "Cord_Spinal", "Myelon", "Medulla Spinalis"),
    "Parotid_R": ("Parotid_R", *_lateral("parotid", "R"), "Parotid Gland R", "R Parotid Gland",
                  "Right Parotid Gland", "Parotid Gland Right", "Glnd_Parotid_R"),
    "Parotid_L": ("Parotid_L", *_lateral("parotid", "L"), "Parotid Gland L", "L Parotid Gland",
                  "Left Parotid Gland", "Parotid Gland Left", "Glnd_Parotid_L"),
    "Mandible": ("Bone_Mandible", "Mandible_Bone", "Mandibula"),
    "Larynx": ("Larynx", "Larynx_Total"),
    "Esophagus": ("Oesophagus", "Esophagus_S", "Oesophagus_S", "Esophagus_Cervical", "Esoph"),
    "GTV": ("GTV", "GTVp", "GTV_P", "GTV Primary", "GTV_Primary", "GTV_T", "GTV70",
            "PTV70", "PTV_70", "PTV7000", "PTV_7000", "PTV70Gy", "PTV_70Gy", "PTV_High"),
}

#: Display colours of ContourCL's structures (others get one from their name).
DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "Brainstem": (0, 151, 206),
    "SpinalCord": (255, 255, 0),
    "Parotid_R": (0, 200, 100),
    "Parotid_L": (200, 150, 0),
    "Mandible": (230, 230, 230),
    "Larynx": (150, 90, 255),
    "Esophagus": (255, 120, 160),
    "GTV": (255, 0, 0),
}


def normalise_roi_name(name: str) -> str:
    """``name`` lower-cased without spaces, underscores, hyphens or dots: ``"Parotid R"`` ->
    ``"parotidr"``."""
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def default_interpreted_type(name: str) -> str:
    """RTROIInterpretedType for a structure name: GTV/CTV/PTV from the name's start, EXTERNAL for
    a body outline, ORGAN otherwise (the organs at risk)."""
    key = normalise_roi_name(name)
    for prefix in ("gtv", "ctv", "ptv"):
        if key.startswith(prefix):
            return prefix.upper()
    if key in ("external", "body", "skin", "outline", "patient"):
        return "EXTERNAL"
    return "ORGAN"


# --------------------------------------------------------------------------------------------
# outlines on voxel edges

# directions as (d_row, d_col): right, down, left, up (rows grow downwards)
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def outline_polygons(mask) -> list[np.ndarray]:
    """The closed outlines of a 2D mask (rows x columns) along pixel edges.

    Returns one ``(m, 2)`` float array of ``(row, column)`` vertices per loop, in pixel index
    coordinates: vertices are pixel corners (``index +- 0.5``), the closing vertex is not
    repeated and only corners where the outline turns are kept. Outer boundaries run clockwise
    as seen in the image (rows down), holes counter-clockwise. Pixels touching only at a corner
    get separate loops. With XOR (even-odd) filling, or with signed areas, the loops enclose
    exactly the mask's pixels.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"outline_polygons takes a 2D mask, not shape {m.shape}")
    if not m.any():
        return []
    p = np.pad(m, 1)
    core = p[1:-1, 1:-1]
    width = m.shape[1] + 1  # corner lattice: (rows + 1) x (columns + 1)
    starts: list[np.ndarray] = []
    dirs: list[np.ndarray] = []
    # foreground on the right of travel: top sides go right, right sides down, bottom sides
    # left, left sides up (corner (y, x) is the top-left corner of pixel (y, x))
    for d, (side, dy, dx) in enumerate((
        (core & ~p[:-2, 1:-1], 0, 0),  # top side: from the top-left corner
        (core & ~p[1:-1, 2:], 0, 1),  # right side: from the top-right corner
        (core & ~p[2:, 1:-1], 1, 1),  # bottom side: from the bottom-right corner
        (core & ~p[1:-1, :-2], 1, 0),  # left side: from the bottom-left corner
    )):
        ys, xs = np.nonzero(side)
        starts.append((ys + dy) * width + (xs + dx))
        dirs.append(np.full(ys.size, d))
    start_arr = np.concatenate(starts)
    dir_arr = np.concatenate(dirs)
    outgoing: dict[int, list[int]] = {}
    for v, d in zip(start_arr.tolist(), dir_arr.tolist(), strict=False):
        outgoing.setdefault(v, []).append(d)
    delta = [dy * width + dx for dy, dx in _STEPS]

    loops = []
    for first in list(outgoing):
        while outgoing.get(first):
            d0 = outgoing[first].pop()
            corners = []
            v, d = first + delta[d0], d0
            while True:
                options = outgoing.get(v, [])
                # at the start corner the first edge is available again: taking it closes the loop
                candidates = options + [d0] if v == first else options
                # prefer turning right: the loop stays around the pixel on its right, so pixels
                # that touch only at a corner get separate loops
                for nd in ((d + 1) % 4, d, (d + 3) % 4):
                    if nd in candidates:
                        break
                else:
                    raise RuntimeError("outline tracing lost its way")  # cannot happen on a pixel mask
                if nd != d:
                    corners.append(v)
                if v == first and nd == d0 and nd not in options:
                    break
                options.remove(nd)
                v, d = v + delta[nd], nd
            ys, xs = np.divmod(np.asarray(corners), width)
            loops.append(np.stack([ys - 0.5, xs - 0.5], axis=1).astype(np.float64))
    return loops


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of 2D ``(row, column)`` vertices: positive for clockwise in the image
    (an outer outline of :func:`outline_polygons`), negative for a hole."""
    y, x = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# --------------------------------------------------------------------------------------------
# writing


def check_structures(structures: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(structures, Mapping) or not structures:
        raise UnknownLabelError(f"structures must be a non-empty {{name: value}} mapping, not {structures!r}")
    out: dict[str, int] = {}
    for name, value in structures.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise UnknownLabelError(f"structure name {name!r} is not a name of 1 to 64 characters")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 65535:
            raise UnknownLabelError(f"structure {name!r} has value {value!r}: a label value is an integer 1..65535")
        out[name] = int(value)
    values = list(out.values())
    if len(set(values)) != len(values):
        raise UnknownLabelError(f"structures give one value to several names: {out}")
    return out


def to_series_grid(label, affine, geo: SeriesGeometry) -> np.ndarray:
    """``label`` on the series' (column, row, slice) grid. A label on the same voxels with its
    axes permuted or reversed (e.g. reoriented to RAS) is reordered exactly; any other grid is
    refused."""
    lab = np.asarray(label)
    while lab.ndim > 3 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    while lab.ndim > 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 3:
        raise LabelMismatchError(f"the label is not a 3D label map (shape {np.asarray(label).shape})")
    if affine is None:
        if lab.shape != geo.shape:
            raise LabelMismatchError(f"the label has shape {lab.shape} but the series' grid is {geo.shape} (columns, rows, slices)")
        return lab
    affine = np.asarray(affine, dtype=np.float64)
    series = geo.affine
    if lab.shape == geo.shape and np.abs(affine - series).max() <= 1e-2:
        return lab
    # label index -> series index; an exact reordering is a signed permutation plus a shift
    m = np.linalg.solve(series, affine)
    perm = np.abs(m[:3, :3]).argmax(axis=0)  # label axis b -> series axis perm[b]
    if sorted(perm.tolist()) == [0, 1, 2]:
        signs = np.sign(m[:3, :3][perm, [0, 1, 2]])
        p = np.zeros((4, 4))
        p[3, 3] = 1
        for b in range(3):
            p[perm[b], b] = signs[b]
            p[perm[b], 3] = 0 if signs[b] > 0 else lab.shape[b] - 1
        shape_ok = all(lab.shape[b] == geo.shape[perm[b]] for b in range(3))
        if shape_ok and np.abs(series @ p - affine).max() <= 1e-2:
            out = np.transpose(lab, np.argsort(perm))
            for a in range(3):
                if signs[np.flatnonzero(perm == a)[0]] < 0:
                    out = np.flip(out, axis=a)
            return np.ascontiguousarray(out)
    raise LabelMismatchError(
        f"the label's grid (shape {lab.shape}, affine {np.round(affine, 3).tolist()}) is not the series' grid "
        f"(shape {geo.shape}, affine {np.round(series, 3).tolist()}): resample the label onto the series first"
    )


def label_values(lab: np.ndarray, structures: dict[str, int]) -> set[int]:
    """The structure values present in ``lab``; raises for a value no structure has."""
    if lab.dtype != bool and not np.issubdtype(lab.dtype, np.number):
        raise UnknownLabelError(f"the label holds {lab.dtype} values: a label map holds integers")
    if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
        raise UnknownLabelError("the label holds non-integer values: it is not a label map")
    allowed = np.array([0, *structures.values()])
    stray = np.isin(lab, allowed, invert=True)  # one byte per voxel (no index copy of the label)
    if stray.any():
        unknown = np.unique(lab[stray])
        raise UnknownLabelError(
            f"label values {unknown[:10].tolist()} are not in structures {structures}: which organ they are is unknown"
        )
    return {v for v in structures.values() if (lab == v).any()}


def _ds_numbers(values: np.ndarray) -> list[str]:
    out = []
    for v in values.tolist():
        s = f"{v:.3f}".rstrip("0").rstrip(".")
        out.append("0" if s in ("-0", "") else s)
    return out


def display_colour(name: str) -> list[int]:
    """The display colour (sRGB, 0-255) of structure ``name``: :data:`DEFAULT_COLORS`, or one made
    from the name; the RTSTRUCT's ``ROIDisplayColor`` and the SEG's ``RecommendedDisplayCIELabValue``."""
    if name in DEFAULT_COLORS:
        return list(DEFAULT_COLORS[name])
    h = sum((i + 1) * ord(ch) for i, ch in enumerate(name))
    return [64 + h % 192, 64 + (h // 7) % 192, 64 + (h // 49) % 192]


_PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def build_rtstruct(label, affine, structures: Mapping[str, int], series_folder: str | Path | None = None, *,
                   geometry: SeriesGeometry | None = None, series_uid: str | None = None,
                   interpreted_types: Mapping[str, str] | None = None,
                   colors: Mapping[str, tuple[int, int, int]] | None = None,
                   algorithm_name: str = "ContourCL", algorithm_version: str = "",
                   structure_set_label: str = "ContourCL", series_description: str = "ContourCL auto-contours",
                   series_number: int = 901, manufacturer: str = "ContourCL", generation_algorithm: str = "AUTOMATIC") -> Dataset:
    """The RTSTRUCT dataset of ``label`` on the series under ``series_folder`` (or ``geometry``
    from :func:`~contourcl.data.dicom_series.read_series_geometry`), see :func:`write_rtstruct`."""
    structures = check_structures(structures)
    geo = geometry if geometry is not None else read_series_geometry(series_folder, series_uid)
    lab = to_series_grid(label, affine, geo)
    present = label_values(lab, structures)
    types = {name: default_interpreted_type(name) for name in structures}
    for name, kind in (interpreted_types or {}).items():
        if name not in structures:
            raise UnknownLabelError(f"interpreted_types names {name!r}, which is not in structures {list(structures)}")
        if str(kind).upper() not in INTERPRETED_TYPES:
            raise ValueError(f"RTROIInterpretedType {kind!r} for {name!r} is not a DICOM defined term: {sorted(INTERPRETED_TYPES)}")
        types[name] = str(kind).upper()

    src = geo.header
    now = _dt.datetime.now()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CONTOURCL"
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian = True
    ds.is_implicit_VR = False

    for keyword in _PATIENT_STUDY:
        if keyword in src:
            ds[keyword] = src[keyword]
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name
    if algorithm_version:
        ds.SoftwareVersions = algorithm_version
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetName = structure_set_label[:64]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    if not geo.frame_of_reference_uid:
        raise InvalidImageError(f"the series {geo.series_uid} has no FrameOfReferenceUID: an RTSTRUCT cannot refer to it")
    ds.FrameOfReferenceUID = geo.frame_of_reference_uid  # Frame of Reference module, as the CT's
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "") or ""

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = geo.sop_class_uids[k]
        item.ReferencedSOPInstanceUID = geo.sop_instance_uids[k]
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = geo.series_uid
    series_ref.ContourImageSequence = Sequence([image_ref(k) for k in range(len(geo.files))])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = geo.study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = geo.frame_of_reference_uid
    for_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_ref])

    roi_seq, contour_seq, obs_seq = [], [], []
    for name, value in sorted(structures.items(), key=lambda kv: kv[1]):
        if value not in present:
            continue  # empty structure: left out
        m = lab == value
        (i0, i1), (j0, j1), (k0, k1) = (
            (int(a[0]), int(a[-1]) + 1) for a in (np.flatnonzero(m.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        )
        block = np.ascontiguousarray(m[i0:i1, j0:j1, k0:k1].transpose(2, 1, 0))  # the structure's box: [slice, row, column]
        contours = []
        for kb in np.flatnonzero(block.any(axis=(1, 2))).tolist():
            k = k0 + kb
            for loop in outline_polygons(block[kb]):  # (row, column) vertices within the box
                if len(loop) < 3:
                    continue
                pts = geo.slice_points_lps(k, loop[:, 1] + i0, loop[:, 0] + j0)
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(k)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c.ContourNumber = len(contours) + 1
                c.ContourData = _ds_numbers(pts.ravel())
                contours.append(c)
        if not contours:
            continue
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = geo.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = generation_algorithm  # AUTOMATIC; SEMIAUTOMATIC once a clinician corrected it
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}".strip()[:64]
        algo = Dataset()
        family = Dataset()
        family.CodeValue = "123110"
        family.CodingSchemeDesignator = "DCM"
        family.CodeMeaning = "Artificial Intelligence"
        algo.AlgorithmFamilyCodeSequence = Sequence([family])
        algo.AlgorithmName = algorithm_name[:64]
        algo.AlgorithmVersion = (algorithm_version or "unknown")[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = Sequence([algo])
        roi_seq.append(roi)
        rc = Dataset()
        rc.ROIDisplayColor = list((colors or {}).get(name, display_colour(name)))
        rc.ContourSequence = Sequence(contours)
        rc.ReferencedROINumber = value
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = value
        obs.ReferencedROINumber = value
        obs.ROIObservationLabel = name[:16]
        obs.RTROIInterpretedType = types[name]
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = Sequence(roi_seq)
    ds.ROIContourSequence = Sequence(contour_seq)
    ds.RTROIObservationsSequence = Sequence(obs_seq)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def write_rtstruct(label, affine, structures: Mapping[str, int], series_folder: str | Path | None,
                   out_path: str | Path, **kwargs) -> Path:
    """Write ``label``'s structures as an RTSTRUCT on the CT series under ``series_folder``.

    ``label`` is a 3D label map on the series' grid: either with ``affine=None`` in
    :func:`~contourcl.data.dicom_series.read_series`'s (column, row, slice) order, or with its
    RAS ``affine`` (the same voxels with axes permuted or reversed are accepted; another grid is
    refused with :class:`~contourcl.errors.LabelMismatchError`). ``structures`` maps each ROI name
    (TG-263) to its label value; a label value not in it is refused (UnknownLabelError).
    Keywords (see :func:`build_rtstruct`): ``series_uid``, ``geometry``, ``interpreted_types``
    (``{name: "ORGAN" | "GTV" | ...}``, default from the name: GTV/CTV/PTV, else ORGAN),
    ``colors``, ``algorithm_name``, ``algorithm_version``, ``structure_set_label``,
    ``series_description``, ``series_number``, ``manufacturer``.

    The file: RT Structure Set Storage, new SeriesInstanceUID and SOPInstanceUID, patient and
    study attributes copied from the series, ROIGenerationAlgorithm AUTOMATIC (with the
    algorithm identified), ApprovalStatus UNAPPROVED, explicit VR little endian with valid file
    meta. Returns ``out_path``.

    Outlines follow the voxel edges (:func:`outline_polygons`): each polygon's vertices are pixel
    corners and the polygons enclose exactly the structure's pixels (area = number of pixels x
    pixel area; a planning system's volume, area x slice thickness summed over slices, equals the
    voxel volume).

    Holes: a structure with a hole (a ring) gets *separate contours with XOR semantics*: an outer
    contour and, on the same slice, one contour around each hole (and one around each island
    inside a hole, and so on). A point belongs to the structure when an odd number of the
    slice's contours enclose it. That is how most planning systems read several contours on one
    slice (Eclipse and RayStation take a contour inside another as a hole; plastimatch and
    SlicerRT rasterise with XOR); no keyholes are written, so a system that only understands
    keyholes would see the hole as a second solid: check once on the target system. Outer
    contours run clockwise and holes counter-clockwise as seen in the image (rows down), so a
    reader that adds signed areas gets the same answer. Pixels touching only at a corner get
    separate contours that share that corner.

    Contour points are placed in patient coordinates (LPS mm) from each slice's own
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing, never by flipping axes.
    Each contour references its slice's SOPInstanceUID (ContourImageSequence), and
    ReferencedFrameOfReferenceSequence lists the study, the series and every SOP instance of it.
    Structures without a voxel are left out; contours of fewer than 3 points are dropped.
    """
    ds = build_rtstruct(label, affine, structures, series_folder, **kwargs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(out_path), ds, write_like_original=False)
    return out_path


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class Contour:
    """One contour of a ROI: its ContourGeometricType, points (m x 3, LPS mm) and the SOP
    instances it references."""

    geometric_type: str
    points: np.ndarray
    referenced_sop_uids: tuple[str, ...]


@dataclass(frozen=True)
class Roi:
    """A ROI of a structure set, with its contours."""

    number: int
    name: str
    interpreted_type: str
    frame_of_reference_uid: str
    color: tuple[int, ...]
    contours: tuple[Contour, ...]

    @property
    def closed_contours(self) -> tuple[Contour, ...]:
        return tuple(c for c in self.contours if c.geometric_type == "CLOSED_PLANAR" and len(c.points) >= 3)


def _open(rtstruct) -> Dataset:
    if isinstance(rtstruct, Dataset):
        return rtstruct
    try:
        ds = pydicom.dcmread(str(rtstruct), force=True)
    except Exception as err:
        raise InvalidImageError(f"cannot read the RTSTRUCT {str(rtstruct)!r}: {err}") from err
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != RT_STRUCTURE_SET_STORAGE and ds.get("Modality") != "RTSTRUCT":
        raise InvalidImageError(
            f"{str(rtstruct)!r} is not an RT Structure Set (SOP class {sop_class or 'none'}, modality {ds.get('Modality')})"
        )
    return ds


def find_structure_sets(folder: str | Path) -> list[Path]:
    """The RTSTRUCT files under ``folder`` (recursively), in path order; other files are skipped."""
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # not DICOM
            continue
        if ds.get("Modality") == "RTSTRUCT":
            found.append(path)
    return found


def load_rois(rtstruct) -> list[Roi]:
    """The ROIs of an RTSTRUCT (a path or a dataset), in the file's order, with their contours.
    Files without file meta (as some old systems write) are read too."""
    ds = _open(rtstruct)
    info = {int(r.ROINumber): r for r in ds.get("StructureSetROISequence", []) if "ROINumber" in r}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}
    contours: dict[int, list[Contour]] = {}
    colours: dict[int, tuple[int, ...]] = {}
    for rc in ds.get("ROIContourSequence", []):
        if "ReferencedROINumber" not in rc:
            continue
        number = int(rc.ReferencedROINumber)
        colours[number] = tuple(int(v) for v in (rc.get("ROIDisplayColor") or []))
        items = contours.setdefault(number, [])
        for c in rc.get("ContourSequence", []):
            data = c.get("ContourData")
            if data is None:
                continue
            values = np.asarray([float(v) for v in (data if isinstance(data, (list, tuple, MultiValue)) else [data])])
            if values.size % 3:
                log.warning("ROI %s: a contour with %d coordinates (not a multiple of 3) is skipped", number, values.size)
                continue
            refs = tuple(str(i.ReferencedSOPInstanceUID) for i in c.get("ContourImageSequence", []) if "ReferencedSOPInstanceUID" in i)
            items.append(Contour(str(c.get("ContourGeometricType", "") or ""), values.reshape(-1, 3), refs))
    out = []
    for number in list(info) + [n for n in contours if n not in info]:
        r = info.get(number)
        out.append(Roi(
            number=number,
            name=str(r.get("ROIName", "") or "") if r is not None else f"ROI {number}",
            interpreted_type=types.get(number, ""),
            frame_of_reference_uid=str(r.get("ReferencedFrameOfReferenceUID", "") or "") if r is not None else "",
            color=colours.get(number, ()),
            contours=tuple(contours.get(number, [])),
        ))
    return out


def match_roi_names(roi_names, structures, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{roi_name: structure}`` for the ROI names that mean one of ``structures`` (names, or a
    ``{name: value}`` mapping); at most one ROI per structure. A ROI named as the structure comes
    first, then the caller's ``aliases`` (``{alias: structure}``), then :data:`ROI_NAME_ALIASES`
    in its order; ties go to the first ROI."""
    names = list(structures)
    ranks: dict[str, tuple[str, int]] = {}

    def add(alias: str, structure: str, rank: int) -> None:
        key = normalise_roi_name(alias)
        if structure in names and (key not in ranks or ranks[key][1] > rank):
            ranks[key] = (structure, rank)

    for structure, extra in ROI_NAME_ALIASES.items():
        for i, alias in enumerate(extra):
            add(alias, structure, 1000 + i)
    for alias, structure in (aliases or {}).items():
        if structure not in names:
            raise UnknownLabelError(f"alias {alias!r} names {structure!r}, which is not in structures {names}")
        add(alias, structure, 1)
    for structure in names:
        add(structure, structure, 0)

    best: dict[str, tuple[int, int, str]] = {}
    for order, roi_name in enumerate(roi_names):
        hit = ranks.get(normalise_roi_name(roi_name))
        if hit is None:
            continue
        structure, rank = hit
        if structure not in best or (rank, order) < best[structure][:2]:
            best[structure] = (rank, order, roi_name)
    return {roi_name: structure for structure, (_, _, roi_name) in sorted(best.items(), key=lambda kv: kv[1][1])}


def _roi_slices(roi: Roi, geo: SeriesGeometry) -> dict[int, np.ndarray]:
    """``{slice index: (rows x columns) mask}`` of a ROI's closed planar contours; see :func:`rasterise_roi`."""
    from skimage.draw import polygon as fill_polygon

    slices: dict[int, np.ndarray] = {}
    normal = geo.normal
    tol = max(0.01, 0.1 * geo.slice_spacing)
    for contour in roi.closed_contours:
        d = contour.points @ normal
        if np.ptp(d) > tol:
            raise LabelMismatchError(
                f"ROI {roi.name!r} has a contour that is not in the series' slice planes (it spans {np.ptp(d):.2f} mm along "
                "the slice normal): a contour drawn in another orientation"
            )
        k, off = geo.slice_index_of_position(float(d.mean()))
        if off > tol:
            raise LabelMismatchError(
                f"ROI {roi.name!r} has a contour at {float(d.mean()):.2f} mm along the slice normal, {off:.2f} mm from the "
                f"nearest slice of series {geo.series_uid}: it was drawn on another series' slices"
            )
        rel = contour.points - geo.positions[k]
        row_sp, col_sp = geo.pixel_spacings[k]
        cols = rel @ geo.orientations[k, :3] / col_sp
        rows = rel @ geo.orientations[k, 3:] / row_sp
        rr, cc = fill_polygon(rows, cols, shape=(geo.rows, geo.columns))
        if k not in slices:
            slices[k] = np.zeros((geo.rows, geo.columns), dtype=bool)
        filled = np.zeros((geo.rows, geo.columns), dtype=bool)
        filled[rr, cc] = True
        slices[k] ^= filled
    return slices


def rasterise_roi(roi: Roi, geo: SeriesGeometry) -> np.ndarray:
    """A ROI's closed planar contours as a boolean mask on the series grid (column, row, slice):
    pixel centres inside a polygon, the contours of a slice combined with XOR. A contour that does
    not lie on one of the series' slices (within 10 % of the slice spacing) is refused with
    :class:`LabelMismatchError`: the structure set was drawn on another grid."""
    mask = np.zeros(geo.shape, dtype=bool)
    for k, sl in _roi_slices(roi, geo).items():
        mask[:, :, k] = sl.T
    return mask


def read_rtstruct(rtstruct_path, series_folder: str | Path | None, structures: Mapping[str, int],
                  aliases: Mapping[str, str] | None = None, *, series_uid: str | None = None,
                  geometry: SeriesGeometry | None = None) -> tuple[np.ndarray, dict[str, str], list[str]]:
    """``(label, mapped, unmapped)`` of an RTSTRUCT on the CT series under ``series_folder``.

    ``label`` lies on :func:`~contourcl.data.dicom_series.read_series`'s grid (same shape and
    affine), with ``structures``' values (``{name: value}``, e.g. TG-263 names). ``mapped`` is
    ``{roi_name: structure}``, through :func:`match_roi_names` (case/space/underscore-insensitive,
    :data:`ROI_NAME_ALIASES` plus the caller's ``{alias: structure}``); ``unmapped`` lists the
    other ROI names in the file's order (including a second ROI for an already mapped structure).
    A structure set in another frame of reference than the series, or whose mapped contours lie
    off the series' slices, is refused with :class:`LabelMismatchError`.

    Each ROI's closed planar contours are rasterised on the series grid: a pixel belongs to a
    contour when its centre lies inside the polygon (``skimage.draw.polygon``), and the contours
    of one slice are combined with XOR (the semantics of :func:`write_rtstruct`). ROI names are
    compared with case, spaces, underscores, hyphens and dots ignored, and only whole names match
    ("Cord PRV" is *not* the spinal cord). Voxels claimed by two mapped ROIs go to the structure
    with the larger label value.
    """
    structures = check_structures(structures)
    geo = geometry if geometry is not None else read_series_geometry(series_folder, series_uid)
    ds = _open(rtstruct_path)
    rois = load_rois(ds)
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])} - {""}
    frames |= {r.frame_of_reference_uid for r in rois if r.frame_of_reference_uid}
    if geo.frame_of_reference_uid and frames and geo.frame_of_reference_uid not in frames:
        raise LabelMismatchError(
            f"the RTSTRUCT lies in frame of reference {sorted(frames)} but the series {geo.series_uid} in "
            f"{geo.frame_of_reference_uid}: its contours do not belong to this CT"
        )
    with_contours = [r for r in rois if r.closed_contours]
    mapped = match_roi_names([r.name for r in with_contours], structures, aliases)
    by_name = {r.name: r for r in with_contours}
    for r in rois:
        if r.frame_of_reference_uid and geo.frame_of_reference_uid and r.name in mapped \
                and r.frame_of_reference_uid != geo.frame_of_reference_uid:
            raise LabelMismatchError(f"ROI {r.name!r} lies in frame of reference {r.frame_of_reference_uid}, not the series' {geo.frame_of_reference_uid}")
    dtype = np.uint8 if max(structures.values()) < 256 else np.uint16
    label = np.zeros(geo.shape, dtype=dtype)
    order = sorted(mapped.items(), key=lambda kv: structures[kv[1]])
    for roi_name, structure in order:
        overlap = 0
        for k, sl in _roi_slices(by_name[roi_name], geo).items():
            view = label[:, :, k]
            inside = sl.T
            overlap += int(np.count_nonzero(inside & (view != 0)))
            view[inside] = structures[structure]
        if overlap:
            log.warning("ROI %r overlaps other structures on %d voxels; they go to %s", roi_name, overlap, structure)
    unmapped = [r.name for r in rois if r.name not in mapped or by_name.get(r.name) is not r]
    return label, mapped, unmapped


def contour_volumes(rtstruct, slice_thickness: float) -> dict[str, float]:
    """Each ROI's volume (mm^3) as a planning system computes it from the contours: on each plane
    the contours' areas combined with XOR (a contour enclosed by an odd number of others is a
    hole), times ``slice_thickness``."""
    from skimage.measure import points_in_poly

    out = {}
    for roi in load_rois(rtstruct):
        planes: dict[tuple, list[tuple[np.ndarray, float]]] = {}
        for contour in roi.closed_contours:
            p = contour.points
            newell = np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0)
            area = 0.5 * float(np.linalg.norm(newell))
            if area == 0:
                continue
            n = newell / np.linalg.norm(newell)
            axis = int(np.argmax(np.abs(n)))
            n = n * np.sign(n[axis])
            key = (axis, round(float(p.mean(axis=0) @ n), 2))
            keep = [a for a in range(3) if a != axis]
            planes.setdefault(key, []).append((p[:, keep], area))
        total = 0.0
        for polys in planes.values():
            for i, (pts, area) in enumerate(polys):
                depth = sum(1 for j, (other, _) in enumerate(polys)
                            if j != i and points_in_poly(pts, other).mean() > 0.5)
                total += area if depth % 2 == 0 else -area
        out[roi.name] = total * float(slice_thickness)
    return out
