"""``contourcl contour``: contour one CT with a model file, without a server, as the app would."""

from __future__ import annotations

import argparse
import json

from contourcl.data.labels import to_model
from contourcl.data.volumes import read_ras
from contourcl.inference import Contourer
from contourcl.models.checkpoint import read_meta
from contourcl.plots import contour_overlay
from contourcl.serving.config import default_largest_component


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="a CT volume (NIfTI or NRRD)")
    parser.add_argument("--model", default="apps/radonc/model/oar.pt", help="model file")
    parser.add_argument("--out", required=True, help="label map to write (.nii.gz), on the image's grid")
    parser.add_argument("--png", help="also write a contour overlay picture")
    parser.add_argument("--reference", help="a stored-numbering label to draw (dashed) on the picture")


def run(args: argparse.Namespace) -> int:
    meta = read_meta(args.model)
    contourer = Contourer(args.model, largest_component=default_largest_component(meta.model))
    prediction = contourer(args.image)
    prediction.save(args.out)
    if args.png:  # RAS-ordered arrays, as contour_overlay expects
        ct = read_ras(args.image)
        label = read_ras(args.out)
        truth = to_model(read_ras(args.reference), meta.model) if args.reference else None
        contour_overlay(ct, label, prediction.labels, args.png, truth=truth, title=f"{meta.model}: {args.image}")
    print(json.dumps({"out": args.out, "labels": prediction.labels, "seconds": {k: round(v, 2) for k, v in prediction.timings.items()}}))
    return 0
