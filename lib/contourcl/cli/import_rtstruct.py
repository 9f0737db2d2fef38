"""``contourcl import-rtstruct``: a clinic's RT Structure Set as a ContourCL label map.

The RTSTRUCT's ROIs are mapped to ContourCL's structures by name through the alias table of
:mod:`contourcl.data.rtstruct` ("Parotid R", "RT PAROTID", "parotid_r" -> Parotid_R, ...), and
rasterised on the CT series' grid in the stored numbering, next to the series as NIfTI: an
archive of approved plans becomes training data (a studies folder: ``CT.nii.gz`` +
``labels/final/CT.nii.gz``).
"""

from __future__ import annotations

import argparse
import json

from contourcl.data.dicom_series import read_series_geometry, write_nifti_from_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import read_rtstruct
from contourcl.data.volumes import write_label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rtstruct", help="the RT Structure Set file (.dcm)")
    parser.add_argument("series", help="the folder holding the CT series it was drawn on")
    parser.add_argument("--out", required=True, help="label map to write (.nii.gz), stored numbering, on the series' grid")
    parser.add_argument("--image-out", help="also write the CT series as NIfTI here (the label's image)")
    parser.add_argument("--series-uid", help="for a folder with several series: the SeriesInstanceUID")
    parser.add_argument("--alias", action="append", default=[], metavar="ROI=STRUCTURE",
                        help="map another ROI name to a structure (repeatable), e.g. --alias 'PAROTID RT=Parotid_R'")


def run(args: argparse.Namespace) -> int:
    aliases = {}
    for item in args.alias:
        roi, sep, structure = item.partition("=")
        if not sep or structure not in STORED_LABELS:
            raise ValueError(f"--alias {item!r}: write ROI=STRUCTURE with STRUCTURE one of {list(STORED_LABELS)}")
        aliases[roi] = structure
    label, mapped, unmapped = read_rtstruct(args.rtstruct, args.series, STORED_LABELS, aliases, series_uid=args.series_uid)
    if args.image_out:
        write_nifti_from_series(args.series, args.image_out, args.series_uid)
    write_label(args.out, label, read_series_geometry(args.series, args.series_uid).affine)
    print(json.dumps({"out": args.out, "mapped": mapped, "unmapped": unmapped}))
    return 0
