"""``contourcl contour``: contour one CT with a model file, without a server."""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np

from contourcl.inference import Contourer
from contourcl.labels import to_model
from contourcl.plots import contour_overlay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="a CT volume (NIfTI or NRRD)")
    parser.add_argument("--model", default="apps/radonc/model/oar.pt", help="model file")
    parser.add_argument("--out", required=True, help="label map to write (.nii.gz), on the image's grid")
    parser.add_argument("--png", help="also write a contour overlay picture")
    parser.add_argument("--reference", help="a stored-numbering label to draw (dashed) on the picture")


def run(args: argparse.Namespace) -> int:
    contourer = Contourer(args.model)
    prediction = contourer(args.image)
    prediction.save(args.out)
    _, _, meta = contourer.model()
    if args.png:
        def canonical(path):  # RAS-ordered array, as contour_overlay expects
            return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)

        ct = canonical(args.image)
        label = canonical(args.out)
        truth = to_model(canonical(args.reference), meta.model) if args.reference else None
        contour_overlay(ct, label, prediction.labels, args.png, truth=truth, title=f"{meta.model}: {args.image}")
    print(json.dumps({"out": args.out, "labels": prediction.labels, "seconds": {k: round(v, 2) for k, v in prediction.timings.items()}}))
    return 0
