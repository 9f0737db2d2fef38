"""``contourcl contour``: contour one CT with a model file, without a server, as the app would.

The CT is a volume file (NIfTI, NRRD) or a folder holding one DICOM CT series; for a series the
contours can be written as a DICOM RT Structure Set (``--rtstruct``) that a treatment planning
system imports and as a DICOM Segmentation (``--seg``), each referencing every slice of the series.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from contourcl.data.dicom_series import write_nifti_from_series
from contourcl.data.labels import to_model
from contourcl.data.rtstruct import write_rtstruct
from contourcl.data.seg import write_seg
from contourcl.data.volumes import read_ras
from contourcl.inference import Contourer
from contourcl.models.checkpoint import read_meta
from contourcl.plots import contour_overlay
from contourcl.serving.config import default_app, default_largest_component, resolve_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="a CT: a volume file (NIfTI or NRRD) or a folder holding one DICOM CT series")
    parser.add_argument("--model", help="model file (default: the app's served oar model, <app>/model/oar.pt)")
    parser.add_argument("--app", help="the app folder whose models and rules to use (default: the app shipped with the package)")
    parser.add_argument("--out", help="label map to write (.nii.gz), on the image's grid")
    parser.add_argument("--rtstruct", help="for a DICOM series: also write the contours as an RT Structure Set (.dcm)")
    parser.add_argument("--seg", help="for a DICOM series: also write the contours as a DICOM Segmentation (.dcm)")
    parser.add_argument("--series-uid", help="for a folder with several series: the SeriesInstanceUID to contour")
    parser.add_argument("--png", help="also write a contour overlay picture")
    parser.add_argument("--reference", help="a stored-numbering label to draw (dashed) on the picture")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.rtstruct and not args.seg:
        raise ValueError("nothing to write: give --out LABEL.nii.gz, --rtstruct OUT.dcm and/or --seg OUT.dcm")
    series = Path(args.image).is_dir()
    for option, value in (("--rtstruct", args.rtstruct), ("--seg", args.seg)):
        if value and not series:
            raise ValueError(f"{option} needs a DICOM series folder as the image; {args.image} is a file")
    app = resolve_app(args.app) if (args.app or not args.model) else default_app()
    model = args.model or app / "model" / "oar.pt"
    if not Path(model).is_file():
        raise FileNotFoundError(f"no model file at {model}: give --model FILE (see 'Shipped weights' in the docs)")
    meta = read_meta(model)
    contourer = Contourer(model, largest_component=default_largest_component(meta.model, app))
    with tempfile.TemporaryDirectory(prefix="contourcl-contour-") as tmp:
        image = write_nifti_from_series(args.image, Path(tmp) / "ct.nii.gz", args.series_uid) if series else Path(args.image)
        prediction = contourer(image)
        out = {"labels": prediction.labels, "seconds": {k: round(v, 2) for k, v in prediction.timings.items()}}
        if args.out:
            prediction.save(args.out)
            out["out"] = args.out
        if args.rtstruct:
            write_rtstruct(prediction.label, prediction.affine, prediction.labels, args.image, args.rtstruct,
                           series_uid=args.series_uid, algorithm_name=f"ContourCL {meta.model}",
                           algorithm_version=prediction.model_version)
            out["rtstruct"] = args.rtstruct
        if args.seg:
            written = write_seg(prediction.label, prediction.affine, prediction.labels, args.image, args.seg, series_uid=args.series_uid,
                                algorithm_name=f"ContourCL {meta.model}", algorithm_version=prediction.model_version)
            out["seg"] = str(written) if written else None  # None: no structure was found, no SEG written
        if args.png:  # RAS-ordered arrays, as contour_overlay expects
            label_file = args.out or prediction.save(Path(tmp) / "label.nii.gz")
            truth = to_model(read_ras(args.reference), meta.model) if args.reference else None
            contour_overlay(read_ras(image), read_ras(label_file), prediction.labels, args.png, truth=truth, title=f"{meta.model}: {args.image}")
    print(json.dumps(out))
    return 0
