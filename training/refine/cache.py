"""The training cases on the refinement network's grid, computed once and kept in a work folder.

For each OpenKBP case (``<work>/cache/<id>.npz``): the CT in RAS order on the shipped models'
in-plane grid (:mod:`contourcl.refine.refiner`'s resampling: bilinear, then windowed to [0, 1],
float16), which slices image the patient, and for each model (``oar``, ``gtv``) the reference as
it is scored (:func:`contourcl.data.datasets.read_scored_reference`: implausible structures set
aside, background on unimaged slices) and the shipped model's automatic contour
(:class:`contourcl.inference.Contourer`, the served path, on the CT's own grid), both moved onto
the network's grid the way :class:`~contourcl.refine.refiner.Refiner` moves a mask (bilinear,
0.5), and the structures the reference contours (the others are not contoured, not background).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from contourcl.data.datasets import read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.data.volumes import read_nifti
from contourcl.inference import Contourer
from contourcl.refine.refiner import Orientation, as_slices, network_size, resample_slices, windowed

MODELS = ("oar", "gtv")


def to_grid(volume: np.ndarray, net_size: tuple[int, int]) -> torch.Tensor:
    """A RAS-ordered ``(H, W, D)`` volume resampled in-plane to ``net_size``: ``(D, h, w)`` float32."""
    return resample_slices(as_slices(volume), net_size)[:, 0]


def labels_to_grid(label: np.ndarray, values: list[int], net_size: tuple[int, int]) -> np.ndarray:
    """A RAS-ordered label map on the network's grid ``(h, w, D)`` uint8, each structure's mask
    moved as the refiner moves a mask (bilinear, above 0.5)."""
    out = torch.zeros((label.shape[2], *net_size), dtype=torch.uint8)
    for v in values:
        out[to_grid(label == v, net_size) > 0.5] = v
    return out.permute(1, 2, 0).numpy()


def build_case(cases: dict[str, dict], contourers: dict[str, Contourer], spacing: tuple[float, float],
               window: tuple[float, float]) -> dict[str, np.ndarray]:
    """The arrays of one case (``cases``: model -> its :func:`labeled_cases` entry)."""
    first = next(iter(cases.values()))
    ct, affine = read_nifti(first["image"])
    orient = Orientation.of(affine)
    sp = orient.spacing(affine)
    ras_ct = orient.view(np.asarray(ct))
    net_size = network_size(ras_ct.shape[:2], (sp[0], sp[1]), spacing)
    image = windowed(to_grid(ras_ct, net_size), window).permute(1, 2, 0).numpy().astype(np.float16)
    out = {"image": image, "spacing": np.array([ras_ct.shape[0] * sp[0] / net_size[0], ras_ct.shape[1] * sp[1] / net_size[1], sp[2]])}
    for model, case in cases.items():
        ref = read_scored_reference(case, model, ct=(ct, affine))
        axis, imaged = ref.imaged
        values = sorted(model_labels(model).values())
        present = [v for v in values if (ref.label == v).any()]
        auto = contourers[model](case["image"]).label
        out[f"{model}_ref"] = labels_to_grid(orient.view(ref.label), values, net_size)
        out[f"{model}_auto"] = labels_to_grid(orient.view(auto), values, net_size)
        out[f"{model}_present"] = np.array(present, dtype=np.int64)
        if orient.perm[2] != axis:
            raise ValueError(f"{case['id']}: the imaged slices' axis {axis} is not the RAS axial axis {orient.perm[2]}")
        out["imaged"] = imaged[::-1].copy() if orient.flip[2] else imaged.copy()
    return out


def build_cache(cases: dict[str, dict[str, dict]], work: Path, model_files: dict[str, Path], progress: bool = True) -> list[str]:
    """Write ``<work>/cache/<id>.npz`` for every case that has none yet; returns the ids cached.

    ``cases``: id -> model -> its :func:`labeled_cases` entry; ``model_files``: model -> file.
    """
    from tqdm.auto import tqdm

    from contourcl.models.checkpoint import read_meta

    folder = work / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    meta = read_meta(model_files["oar"])
    contourers = {m: Contourer(p) for m, p in model_files.items()}
    done = []
    for cid in tqdm(sorted(cases), desc="cache", disable=not progress, unit="case"):
        path = folder / f"{cid}.npz"
        if not path.is_file():
            arrays = build_case(cases[cid], contourers, tuple(meta.spacing), tuple(meta.window))
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)
        done.append(cid)
    (folder / "index.json").write_text(json.dumps({"cases": done, "models": {m: str(p) for m, p in model_files.items()}}, indent=1))
    return done


def load_case(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
