"""SepaReg (Wang et al., AAAI 2022): separated region-level contrastive learning, both stages.

1. **SIS**, structure-aware image separation (:func:`build_region_set`): each axial slice is cut
   into SLIC superpixels inside the body mask; each region is the image times the region's
   mask, cropped to its bounding box, zero-padded to a square (the paper;
   ``region_mode="resize"``: resized directly, as the authors' code) and resized to
   ``image_size`` (:class:`RegionDataset`). The regions of all images form one shuffled set.
   The superpixel label maps and the region index (case, slice, region id, bounding box, area)
   are built once by worker processes and cached on disk; the region images are cut on the fly
   by the DataLoader workers (cheap: a crop and a resize).

   Region size (issue 9): a slice gets (body area / ``region_area_mm2``) SLIC centres, default
   4608 mm^2, the paper's 32 centres on a 384 mm crop at ~1 mm (:data:`PAPER_REGION_AREA_MM2`);
   ``region_area_mm2=None`` is the old fixed ``n_segments``; ``slic_spacing`` (finer SLIC) is off,
   measured to change nothing but the time (docs/separeg-regions.md).
2. **Inter-organ model** (stage ``inter``): SimSiam on regions (Eq. 1-2,
   :mod:`contourcl.training.pretrain.simsiam`): encoder, projector (Linear-BN-ReLU-Linear, 4096, 256),
   predictor of the same shape, stop-gradient.
3. **IID**, intra- and inter-organ distillation: k-means (K = 5) on the inter-organ projections
   ``F_g^inter(F_e^inter(r))`` splits the region set into K subsets; K intra-organ SimSiam models
   are trained from scratch, one per subset (stages ``intra0`` ... ``intra{K-1}``); then a student
   encoder is distilled (stage ``distill``, :class:`Distiller`) with Eq. 3-5::

       L_intra = KL(softmax(f_hat / T) || softmax(f / T))        (Eq. 3)
       L_inter = D(F_g^inter(f), z_hat)                          (Eq. 4)
       L       = L_intra + L_inter                               (Eq. 5)

   where ``f`` is the student's pooled feature of region ``r``, ``f_hat`` the feature of the
   intra-organ encoder of ``r``'s cluster, ``z_hat = F_g^inter(F_e^inter(r))`` and ``D`` the
   negative cosine of Eq. 2. Both teachers are frozen (eval mode, no gradients).

   Choices where the paper is terse, with the code's variant as an option:

   - Eq. 4's head is the inter-organ *projector* ``F_g`` ("we use the inter-organ projector to
     project f into latent space"); the authors' code applies predictor(projector(f)):
     ``inter_head="predictor"``.
   - Eq. 3 writes ``KL(f || f_hat)`` on features; like the code, we compare softmax
     distributions at temperature ``T`` (0.1) over the feature channels, teacher first (the
     usual distillation direction, as the code's ``kl_div``); ``kl_direction="student-teacher"``
     gives the literal order.
   - ``D`` is Eq. 2's ``-cos``; ``distance="2-2cos"`` is the code's.
   - The student starts from random weights (``student_init="inter"``: from the inter-organ
     encoder) and sees the un-augmented regions (``distill_augment=True``: one augmented view,
     the same for student and teachers).

Augmentation: the paper's views are "different transformations" of SimSiam's without a list, and
it names no flip, so the views do not flip (``flip_p`` 0, since issue 32). Until then they flipped
horizontally with p 0.5 (issue 9's deviation, which swaps no label: SepaReg flips *regions*, which
carry no side or structure name); every SepaReg row of the label-efficiency tables was pretrained
so (``--set flip_p=0.5`` reproduces it). Whether the flip changes a table was not measured.

Step budget (issue 9): the paper pretrains every method "for 100k iterations in total"
(Experiments, Pretrain stage) without splitting SepaReg's share. ``budget="total"`` (default)
splits ``iterations`` over the three trainings by ``stage_shares`` (1:1:1): a third to the
inter-organ model, a third shared evenly by the K intra-organ models (each sees 1/K of the
regions, so as many passes over its subset as the inter-organ model over the whole set; a
skipped cluster's steps go to the others), a third to the distillation.
:meth:`SepaRegMethod.planned_iterations` states the split; ``budget="per-stage"`` is the old
behaviour (every stage ``iterations``, or its ``*_iterations`` option).

The checkpoint written at the end is the student's encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contourcl.models.networks import ResNetEncoder
from contourcl.training.distributed import all_gather_objects, broadcast_object, main_process_first
from contourcl.training.pretrain.augment import TwoViews, augment_from_options
from contourcl.training.pretrain.base import ConfigError, PretrainMethod, RunContext, Stage
from contourcl.training.pretrain.simsiam import SIMSIAM_OPTIONS, SimSiamModel, negative_cosine
from contourcl.training.pretrain.volumes import Volume, to_square

logger = logging.getLogger(__name__)

SIS_VERSION = 1
#: one row per region: volume number, slice, superpixel label, bounding box [r0, r1) x [c0, c1), area (pixels)
INDEX_DTYPE = np.dtype(
    [("case", np.int32), ("slice", np.int32), ("label", np.int32), ("r0", np.int32), ("c0", np.int32), ("r1", np.int32), ("c1", np.int32), ("area", np.int32)]
)


# ----------------------------------------------------------------------------------------------
# SIS: the region set


#: SepaReg's superpixel size (mm^2): 32 SLIC centres on the authors' 384 x 384 crops at ~1 mm
#: (``utils/prepare_data.py``, ``prepare_segs_utils.py``), i.e. a grid cell of 68 mm; measured in
#: docs/separeg-regions.md
PAPER_REGION_AREA_MM2 = 384.0**2 / 32


def segments_for_area(body_pixels: int, pixel_mm: Sequence[float], region_area_mm2: float) -> int:
    """SLIC centres for a body of ``body_pixels`` pixels of ``pixel_mm`` so that each region covers
    about ``region_area_mm2`` (at least 1)."""
    return max(1, round(body_pixels * float(np.prod(pixel_mm[:2])) / region_area_mm2))


def slic_slice(image: np.ndarray, body: np.ndarray, n_segments: int = 32, compactness: float = 0.15, sigma: float = 0.8,
               pixel_mm: Sequence[float] = (1.0, 1.0), region_area_mm2: float | None = None,
               slic_spacing: float | None = None) -> np.ndarray:
    """SLIC superpixels of one ``[0, 1]`` slice inside ``body``: labels 1..n, 0 outside the body.

    ``n_segments`` centres, or with ``region_area_mm2`` as many as give regions of that physical
    area (:func:`segments_for_area`; one centre: the whole body is one region). With
    ``slic_spacing`` (mm) SLIC runs on the slice resampled to that in-plane spacing and its labels
    are brought back to the slice's grid (nearest; body pixels a label lost take the nearest
    label's). ``sigma`` is in pixels of the grid SLIC runs on. ``compactness`` 0.15 on a [0, 1]
    single-channel image is about the authors' 15 on a grey image replicated to RGB (Lab, range 0-100).
    """
    from scipy import ndimage
    from skimage.segmentation import slic
    from skimage.transform import resize

    body = np.asarray(body, bool)
    if region_area_mm2:
        n_segments = segments_for_area(int(body.sum()), pixel_mm, float(region_area_mm2))
    if n_segments <= 1:
        return body.astype(np.int64)
    img, mask = np.asarray(image, dtype=np.float64), body
    if slic_spacing:
        shape = tuple(max(1, round(n * float(s) / float(slic_spacing))) for n, s in zip(body.shape, pixel_mm, strict=False))
        img = resize(img, shape, order=1, anti_aliasing=False)
        mask = resize(body, shape, order=0, anti_aliasing=False).astype(bool)
        if not mask.any():
            return body.astype(np.int64)
    labels = slic(img, n_segments=n_segments, compactness=compactness, sigma=sigma, channel_axis=None, mask=mask, start_label=1)
    if slic_spacing:
        labels = resize(labels, body.shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
        if (body & (labels == 0)).any():
            nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
            labels = labels[tuple(nearest)]
        labels = labels * body
    return labels


#: how a slice is cut into regions (the paper's Table 4 / Fig. 1): SIS's superpixels, square
#: cells of a regular grid, or no separation (see :func:`separate_slice`)
SEPARATIONS = ("superpixel", "grid", "none")


def grid_slice(body: np.ndarray, n_segments: int = 32, pixel_mm: Sequence[float] = (1.0, 1.0),
               region_area_mm2: float | None = None) -> np.ndarray:
    """*Regular separation*: square cells of a grid over the slice, cut to ``body``; labels 1..n.

    A cell's side gives it ``region_area_mm2`` (or, without it, ``n_segments`` cells over the
    body's bounding box), so grid cells and superpixels have the same size; the grid starts at
    the body's bounding box."""
    body = np.asarray(body, bool)
    if not body.any():
        return np.zeros(body.shape, np.int64)
    rows, cols = np.nonzero(body)
    r0, c0 = rows.min(), cols.min()
    if region_area_mm2:
        side_mm = float(np.sqrt(region_area_mm2))
        side = [max(1, round(side_mm / float(s))) for s in pixel_mm[:2]]
    else:
        h, w = rows.max() - r0 + 1, cols.max() - c0 + 1
        side = [max(1, round(float(np.sqrt(h * w / max(1, n_segments)))))] * 2
    rr, cc = np.mgrid[: body.shape[0], : body.shape[1]]
    cell_r, cell_c = (rr - r0) // side[0], (cc - c0) // side[1]
    cell = cell_r * (int(cell_c.max()) + 1) + cell_c
    _, labels = np.unique(np.where(body, cell, -1), return_inverse=True)  # -1 (outside) becomes 0
    return labels.reshape(body.shape).astype(np.int64)


def separate_slice(image: np.ndarray, body: np.ndarray, n_segments: int = 32, compactness: float = 0.15, sigma: float = 0.8,
                   pixel_mm: Sequence[float] = (1.0, 1.0), region_area_mm2: float | None = None,
                   slic_spacing: float | None = None, separation: str = "superpixel") -> np.ndarray:
    """One slice's regions: ``superpixel`` (SIS, :func:`slic_slice`), ``grid`` (:func:`grid_slice`,
    the paper's *regular separation*) or ``none`` (the whole body is one region).

    ``none`` departs from the paper's *no separation* (Table 4: PixPro without its PPM, pixel
    pairs at the same location of two feature maps): here the body slice is the one region and
    the rest of SepaReg runs unchanged, so the ablation varies only how slices are cut."""
    if separation == "superpixel":
        return slic_slice(image, body, n_segments, compactness, sigma, pixel_mm, region_area_mm2, slic_spacing)
    if separation == "grid":
        return grid_slice(body, n_segments, pixel_mm, region_area_mm2)
    if separation == "none":
        return np.asarray(body, bool).astype(np.int64)
    raise ConfigError(f"separation must be one of {', '.join(SEPARATIONS)}, not {separation!r}")


def regions_of_slice(labels: np.ndarray) -> list[tuple[int, int, int, int, int, int]]:
    """``(label, r0, c0, r1, c1, area)`` of every label > 0 of a 2D label map."""
    from scipy import ndimage

    areas = np.bincount(labels.ravel())
    out = []
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        out.append((lab, box[0].start, box[1].start, box[0].stop, box[1].stop, int(areas[lab])))
    return out


def _sis_job(args) -> tuple[int, int, np.ndarray, list]:
    """Worker: superpixels of slices ``z0..z1`` of one volume."""
    case, z0, image, body, n_segments, compactness, sigma, min_body_pixels, slic_options = args
    labels = np.zeros(image.shape, dtype=np.uint16)
    rows = []
    for k in range(image.shape[-1]):
        if int(body[..., k].sum()) < min_body_pixels:
            continue
        lab = separate_slice(image[..., k], body[..., k], n_segments, compactness, sigma, **slic_options)
        labels[..., k] = lab
        rows += [(case, z0 + k, *r) for r in regions_of_slice(lab)]
    return case, z0, labels, rows


class RegionSet:
    """The SIS region set: per-volume superpixel label maps and the region index.

    ``index`` is a structured array (:data:`INDEX_DTYPE`), already shuffled; ``labels[i]``
    is volume ``i``'s ``(H, W, D)`` label map (0: outside the body or skipped slice);
    ``cases[i]`` its case id. ``images`` are the volumes' windowed images.
    """

    def __init__(self, cases: list[str], images: list[np.ndarray], labels: list[np.ndarray], index: np.ndarray, key: str = ""):
        self.cases, self.images, self.labels, self.index, self.key = cases, images, labels, index, key

    def __len__(self) -> int:
        return len(self.index)

    def region_mask(self, i: int) -> tuple[np.ndarray, tuple[int, int, int, int], int, int]:
        """``(mask in the bbox, (r0, c0, r1, c1), case, slice)`` of region ``i``."""
        row = self.index[i]
        r0, c0, r1, c1 = int(row["r0"]), int(row["c0"]), int(row["r1"]), int(row["c1"])
        lab = self.labels[row["case"]][r0:r1, c0:c1, row["slice"]]
        return lab == row["label"], (r0, c0, r1, c1), int(row["case"]), int(row["slice"])

    def region_crop(self, i: int) -> np.ndarray:
        """Region ``i``: image x region mask, cropped to the bounding box (float32)."""
        mask, (r0, c0, r1, c1), case, z = self.region_mask(i)
        return np.asarray(self.images[case][r0:r1, c0:c1, z], dtype=np.float32) * mask


def sis_key(volumes: Sequence[Volume], n_segments, compactness, sigma, min_body_pixels, seed, slic_options: dict | None = None) -> str:
    """Cache key of a region set: the settings and a fingerprint of each volume's content."""
    extra = "" if not slic_options else "|" + json.dumps(slic_options, sort_keys=True)
    h = hashlib.sha1(f"sis-v{SIS_VERSION}|{n_segments}|{compactness}|{sigma}|{min_body_pixels}|{seed}{extra}".encode())
    for v in volumes:
        flat = np.asarray(v.image, dtype=np.float16).ravel()
        h.update(f"|{v.case}|{v.image.shape}|{int(v.body.sum())}".encode())
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 65536)]).tobytes())
    return h.hexdigest()[:16]


def build_region_set(
    volumes: Sequence[Volume],
    n_segments: int = 32,
    compactness: float = 0.15,
    sigma: float = 0.8,
    min_body_pixels: int = 64,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    seed: int = 0,
    chunk_slices: int = 16,
    pixel_mm: Sequence[float] = (1.0, 1.0),
    region_area_mm2: float | None = None,
    slic_spacing: float | None = None,
    separation: str = "superpixel",
) -> RegionSet:
    """SIS over all slices of ``volumes``; cached in ``cache_dir/sis-KEY`` when given.

    Slices whose body has fewer than ``min_body_pixels`` pixels are skipped. ``num_workers``
    processes share the work in chunks of ``chunk_slices`` slices. ``pixel_mm`` (the volumes'
    in-plane spacing), ``region_area_mm2`` and ``slic_spacing``: see :func:`slic_slice`.
    """
    slic_options = {}
    if region_area_mm2 or slic_spacing:
        slic_options = {"pixel_mm": [float(x) for x in pixel_mm[:2]], "region_area_mm2": region_area_mm2, "slic_spacing": slic_spacing}
    if separation != "superpixel":  # (the default adds nothing: its cache key is unchanged)
        if separation not in SEPARATIONS:
            raise ConfigError(f"separation must be one of {', '.join(SEPARATIONS)}, not {separation!r}")
        slic_options["separation"] = separation
    key = sis_key(volumes, n_segments, compactness, sigma, min_body_pixels, seed, slic_options)
    folder = Path(cache_dir) / f"sis-{key}" if cache_dir is not None else None
    images = [v.image for v in volumes]
    cases = [v.case for v in volumes]
    if folder is not None and (folder / "index.npy").is_file():
        try:
            index = np.load(folder / "index.npy")
            labels = [np.load(folder / f"labels-{i}.npy", mmap_mode="r") for i in range(len(volumes))]
            logger.info("SIS: %d regions from the cache %s", len(index), folder)
            return RegionSet(cases, images, labels, index, key)
        except (OSError, ValueError):
            logger.warning("SIS: unreadable cache %s, rebuilding", folder)

    jobs = []
    for i, v in enumerate(volumes):
        for z0 in range(0, v.num_slices, chunk_slices):
            z1 = min(v.num_slices, z0 + chunk_slices)
            jobs.append((i, z0, np.asarray(v.image[..., z0:z1], np.float32), v.body[..., z0:z1], n_segments, compactness, sigma,
                         min_body_pixels, slic_options))
    if num_workers > 1 and len(jobs) > 1:
        ctx = get_context("spawn" if torch.cuda.is_initialized() else "fork")
        with ctx.Pool(num_workers) as pool:
            results = pool.map(_sis_job, jobs, chunksize=1)
    else:
        results = [_sis_job(j) for j in jobs]
    labels = [np.zeros(v.image.shape, np.uint16) for v in volumes]
    rows: list = []
    for case, z0, lab, r in results:
        labels[case][..., z0 : z0 + lab.shape[-1]] = lab
        rows += r
    if not rows:
        raise ConfigError("SIS found no region: no slice has enough body")
    index = np.array(rows, dtype=INDEX_DTYPE)
    index = index[np.random.default_rng(seed).permutation(len(index))]  # pooled and shuffled
    if max(int(lab.max()) for lab in labels) < 256:
        labels = [lab.astype(np.uint8) for lab in labels]
    if folder is not None:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, lab in enumerate(labels):
            np.save(tmp / f"labels-{i}.npy", lab)
        np.save(tmp / "index.npy", index)
        (tmp / "meta.json").write_text(json.dumps({
            "cases": cases, "n_segments": n_segments, "compactness": compactness, "sigma": sigma,
            "min_body_pixels": min_body_pixels, **slic_options, "regions": len(index), "version": SIS_VERSION,
        }, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # built meanwhile by another process
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SIS: %d regions from %d slices of %d volumes", len(index), len({(r[0], r[1]) for r in rows}), len(volumes))
    return RegionSet(cases, images, labels, index, key)


def keep_regions(region_set: RegionSet, min_area: int = 1, filter_shape: bool = False) -> np.ndarray:
    """Indices of the regions kept: ``area >= min_area`` and, with ``filter_shape`` (the code's
    optional filter), fill ratio > 0.2 and aspect ratio < 15."""
    idx = region_set.index
    keep = idx["area"] >= min_area
    if filter_shape:
        h, w = (idx["r1"] - idx["r0"]).astype(float), (idx["c1"] - idx["c0"]).astype(float)
        keep &= (idx["area"] / (h * w) > 0.2) & (np.maximum(h, w) / np.minimum(h, w) < 15)
    return np.flatnonzero(keep)


class RegionDataset(Dataset):
    """Region images ``(1, size, size)`` of a :class:`RegionSet` (optionally a subset).

    With ``targets`` (one int per region of the *whole* set, e.g. cluster ids), items are
    ``(image, target)``.
    """

    def __init__(self, region_set: RegionSet, image_size: int = 128, mode: str = "pad", indices: Sequence[int] | None = None, targets: np.ndarray | None = None):
        if mode not in ("pad", "resize"):
            raise ConfigError(f"region_mode must be 'pad' or 'resize', not {mode!r}")
        self.region_set, self.image_size, self.mode = region_set, image_size, mode
        self.indices = np.arange(len(region_set)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        x = to_square(torch.from_numpy(self.region_set.region_crop(j))[None], self.image_size, self.mode)
        if self.targets is None:
            return x
        return x, int(self.targets[j])


class AugmentedWithTarget(Dataset):
    """``(augment(image), target)`` of a dataset of ``(image, target)``."""

    def __init__(self, base: Dataset, augment):
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, t = self.base[i]
        return self.augment(x), t


# ----------------------------------------------------------------------------------------------
# IID: k-means and distillation


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1, direction: str = "teacher-student") -> torch.Tensor:
    """SepaReg's Eq. 3 on ``(B, C)`` features: ``KL(softmax(teacher/T) || softmax(student/T))``
    summed over channels, averaged over the batch (float32). ``direction="student-teacher"``
    swaps the arguments of KL."""
    s = F.log_softmax(student.float() / temperature, dim=1)
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    if direction == "teacher-student":
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    if direction == "student-teacher":
        return F.kl_div(t, s, log_target=True, reduction="batchmean")
    raise ValueError(f"direction must be 'teacher-student' or 'student-teacher', not {direction!r}")


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0, normalize: bool = False) -> np.ndarray:
    """k-means cluster id of each row of ``features`` (scikit-learn; mini-batch above 200k rows)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(features, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    if len(x) < k:
        raise ConfigError(f"k-means: {len(x)} regions for {k} clusters")
    if len(x) > 200_000:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=10)
    return km.fit_predict(x).astype(np.int64)


class Distiller(nn.Module):
    """The distillation step (Eq. 3-5): trainable ``student``; frozen teachers.

    ``forward((regions, clusters))`` returns ``(L_intra + L_inter, logs)``. Each region's
    intra-organ teacher is ``intra_encoders[cluster]``; the teachers are held outside the
    module's parameters (not optimised, not wrapped by DDP) and always in eval mode.
    """

    def __init__(self, student: ResNetEncoder, inter: SimSiamModel, intra_encoders: Sequence[nn.Module], temperature: float = 0.1,
                 inter_head: str = "projector", distance: str = "neg-cos", kl_direction: str = "teacher-student",
                 lambda_intra: float = 1.0, lambda_inter: float = 1.0):
        super().__init__()
        if inter_head not in ("projector", "predictor"):
            raise ConfigError(f"inter_head must be 'projector' or 'predictor', not {inter_head!r}")
        self.student = student
        self._teachers = (inter, list(intra_encoders))  # not registered: frozen, not optimised
        self.temperature, self.inter_head, self.distance, self.kl_direction = temperature, inter_head, distance, kl_direction
        self.lambda_intra, self.lambda_inter = lambda_intra, lambda_inter
        self.freeze_teachers()

    @property
    def inter(self) -> SimSiamModel:
        return self._teachers[0]

    @property
    def intra(self) -> list[nn.Module]:
        return self._teachers[1]

    def freeze_teachers(self) -> None:
        for m in [self.inter, *self.intra]:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in [self.inter, *self.intra]:
            m.eval()
        return self

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """``f_hat``: each region through the intra-organ encoder of its cluster."""
        out = None
        for k in torch.unique(clusters).tolist():
            sel = (clusters == k).nonzero(as_tuple=True)[0]
            f = self.intra[int(k)].pooled(x[sel])
            if out is None:
                out = x.new_zeros((x.shape[0], f.shape[1]), dtype=f.dtype)
            out[sel] = f
        return out

    def inter_project(self, f: torch.Tensor) -> torch.Tensor:
        """``F_g^inter(f)`` (Eq. 4); with ``inter_head="predictor"``: ``F_q^inter(F_g^inter(f))``."""
        z = self.inter.projector(f)
        return self.inter.predictor(z) if self.inter_head == "predictor" else z

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, clusters = batch
        f_hat = self.teacher_features(x, clusters)
        with torch.no_grad():
            z_hat = self.inter.project(x)
        f = self.student.pooled(x)
        l_intra = kl_distillation(f, f_hat, self.temperature, self.kl_direction)
        l_inter = negative_cosine(self.inter_project(f), z_hat, stop_gradient=True, distance=self.distance)
        loss = self.lambda_intra * l_intra + self.lambda_inter * l_inter
        return loss, {"loss": loss.item(), "intra": l_intra.item(), "inter": l_inter.item()}


# ----------------------------------------------------------------------------------------------
# the step budget

#: the budget's groups of stages, in order: the inter-organ model, the K intra-organ models, the distillation
BUDGET_GROUPS = ("inter", "intra", "distill")


def split_steps(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` steps split in proportion to ``weights``, rounded so that they sum to ``total``
    (largest remainders first, ties to the earlier)."""
    w = np.asarray(weights, dtype=float)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"cannot split {total} steps by weights {list(weights)}")
    raw = int(total) * w / w.sum()
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: int(total) - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def stage_budget(iterations: int, options: dict) -> dict[str, int]:
    """Steps of each group of :data:`BUDGET_GROUPS` (``intra``: all K intra-organ models together).

    ``budget="total"``: ``iterations`` is the whole run, split by ``stage_shares``;
    ``budget="per-stage"``: every stage runs ``iterations`` (or its ``*_iterations`` option).
    """
    k = int(options["num_clusters"])
    if options["budget"] == "per-stage":
        per = {g: int(options[f"{g}_iterations"] or iterations) for g in BUDGET_GROUPS}
        return {**per, "intra": k * per["intra"]}
    if options["budget"] != "total":
        raise ConfigError(f"budget must be 'total' or 'per-stage', not {options['budget']!r}")
    given = [f"{g}_iterations" for g in BUDGET_GROUPS if options[f"{g}_iterations"]]
    if given:
        raise ConfigError(f"{given} set the steps of one stage: they need budget=per-stage (budget=total splits `iterations`)")
    shares = options["stage_shares"]
    if len(shares) != len(BUDGET_GROUPS):
        raise ConfigError(f"stage_shares needs {len(BUDGET_GROUPS)} weights ({', '.join(BUDGET_GROUPS)}), not {shares}")
    plan = dict(zip(BUDGET_GROUPS, split_steps(int(iterations), shares), strict=False))
    if plan["inter"] < 1 or plan["distill"] < 1 or plan["intra"] < k:
        raise ConfigError(f"{iterations} steps split as {plan}: need at least 1 step for inter and distill and {k} for intra")
    return plan


# ----------------------------------------------------------------------------------------------
# the method


class SepaRegMethod(PretrainMethod):
    """SepaReg: SIS region set -> inter-organ SimSiam -> k-means -> K intra-organ SimSiam -> distilled student.

    Options (``--set KEY=VALUE``): ``region_area_mm2`` (:data:`PAPER_REGION_AREA_MM2`; ``null``:
    ``n_segments`` per slice), ``n_segments`` (32), ``slic_spacing`` (mm, ``null``: the volumes'
    grid), ``compactness`` (0.15), ``sigma`` (0.8), ``separation`` (superpixel | grid | none: the
    ablation of the paper's Table 4, :func:`separate_slice`), ``region_mode`` (pad | resize),
    ``min_region_area`` (1), ``filter_regions`` (False), ``num_clusters`` (K = 5), ``temperature``
    (T = 0.1), ``inter_head`` (projector | predictor), ``kl_direction``, ``distance`` (neg-cos |
    2-2cos), ``student_init`` (scratch | inter), ``distill_augment`` (False), ``budget`` (total |
    per-stage), ``stage_shares`` ([1, 1, 1]), ``inter_iterations`` / ``intra_iterations`` /
    ``distill_iterations`` (per-stage budget only; default ``iterations``), the SimSiam heads and
    augmentations (the authors' code: jitter p 0.3, blur p 0.2).
    """

    name = "separeg"
    default_options = {
        **SIMSIAM_OPTIONS,
        "flip_p": 0.0,  # the paper names no flip (issue 32); --set flip_p=0.5 for the earlier runs' views
        "jitter_p": 0.3,
        "blur_p": 0.2,
        "region_area_mm2": PAPER_REGION_AREA_MM2,
        "separation": "superpixel",
        "n_segments": 32,
        "slic_spacing": None,
        "compactness": 0.15,
        "sigma": 0.8,
        "min_body_pixels": 64,
        "region_mode": "pad",
        "min_region_area": 1,
        "filter_regions": False,
        "num_clusters": 5,
        "kmeans_normalize": False,
        "temperature": 0.1,
        "inter_head": "projector",
        "kl_direction": "teacher-student",
        "student_init": "scratch",
        "distill_augment": False,
        "lambda_intra": 1.0,
        "lambda_inter": 1.0,
        "budget": "total",
        "stage_shares": [1.0, 1.0, 1.0],
        "inter_iterations": None,
        "intra_iterations": None,
        "distill_iterations": None,
    }
    default_lr = 0.05
    default_optimizer = "sgd"
    lr_reference_batch = 256

    def __init__(self, encoder: ResNetEncoder, config):
        super().__init__(encoder, config)
        o = self.options
        if o["region_mode"] not in ("pad", "resize"):
            raise ConfigError(f"region_mode must be 'pad' or 'resize', not {o['region_mode']!r}")
        if o["student_init"] not in ("scratch", "inter"):
            raise ConfigError(f"student_init must be 'scratch' or 'inter', not {o['student_init']!r}")
        self.budget = stage_budget(config.iterations, o)  #: steps per group of stages (ConfigError if impossible)
        heads = (o["proj_hidden"], o["proj_dim"], o["pred_hidden"], o["distance"])
        self.inter = SimSiamModel(self.make_encoder(), *heads)
        self.intra = nn.ModuleList(SimSiamModel(self.make_encoder(), *heads) for _ in range(int(o["num_clusters"])))
        self.clusters: np.ndarray | None = None  #: cluster id of each region of the region set
        self.region_key: str = ""
        self.region_set: RegionSet | None = None
        self.student_initialised = False

    @classmethod
    def planned_iterations(cls, config) -> dict[str, int]:
        return stage_budget(config.iterations, {**cls.default_options, **config.options})

    # state that is not a tensor: the k-means result, and the budget it was trained under
    def get_extra_state(self):
        return {"clusters": self.clusters, "region_key": self.region_key, "student_initialised": self.student_initialised,
                "budget": self.budget}

    def set_extra_state(self, state) -> None:
        saved = state.get("budget")  # absent: a run from before budgets, where every stage ran `iterations`
        if saved is None and self.options["budget"] != "per-stage":
            raise ConfigError("this training state is from before step budgets (every stage ran `iterations` steps, 32 regions "
                              "per slice): finish it with the version that started it, or start over")
        if saved is not None and dict(saved) != self.budget:
            raise ConfigError(f"this training state was planned as {dict(saved)} steps, this run as {self.budget}")
        self.clusters = state.get("clusters")
        self.region_key = state.get("region_key", "")
        self.student_initialised = bool(state.get("student_initialised", False))

    # data ----------------------------------------------------------------------------------
    def build_region_set(self, volumes) -> RegionSet:
        if self.region_set is None:
            o, cfg = self.options, self.config
            cache = cfg.resolved_cache_dir
            with main_process_first():
                self.region_set = build_region_set(
                    volumes, o["n_segments"], o["compactness"], o["sigma"], o["min_body_pixels"],
                    cache_dir=cache, num_workers=cfg.num_workers, seed=cfg.seed, pixel_mm=cfg.spacing,
                    region_area_mm2=o["region_area_mm2"], slic_spacing=o["slic_spacing"], separation=o["separation"],
                )
        return self.region_set

    def region_dataset(self, indices=None, targets=None) -> RegionDataset:
        return RegionDataset(self.region_set, self.config.image_size, self.options["region_mode"], indices, targets)

    def kept_indices(self) -> np.ndarray:
        return keep_regions(self.region_set, int(self.options["min_region_area"]), bool(self.options["filter_regions"]))

    def build_dataset(self, volumes) -> Dataset:
        """The inter-organ stage's dataset: two augmented views of each region."""
        self.build_region_set(volumes)
        return TwoViews(self.region_dataset(self.kept_indices()), augment_from_options(self.config.image_size, self.options))

    # k-means -------------------------------------------------------------------------------
    @torch.no_grad()
    def inter_projections(self, ctx: RunContext, indices: np.ndarray) -> np.ndarray:
        """``F_g^inter(F_e^inter(r))`` of the regions ``indices`` (each rank a share, gathered)."""
        self.inter.eval()
        mine = indices[ctx.rank :: ctx.world_size]
        loader = DataLoader(self.region_dataset(mine), batch_size=max(2, self.config.batch_size * 4), shuffle=False, num_workers=self.config.num_workers)
        out = []
        for x in loader:
            with ctx.autocast():
                out.append(self.inter.project(x.to(ctx.device)).float().cpu().numpy())
        parts = all_gather_objects(np.concatenate(out) if out else np.zeros((0, self.options["proj_dim"]), np.float32))
        z = np.zeros((len(indices), parts[0].shape[1]), np.float32)
        for r, p in enumerate(parts):
            z[r :: ctx.world_size] = p
        return z

    def cluster(self, ctx: RunContext) -> np.ndarray:
        """k-means on the inter-organ projections: a cluster id per region (-1: filtered out)."""
        kept = self.kept_indices()
        z = self.inter_projections(ctx, kept)
        clusters = np.full(len(self.region_set), -1, np.int64)
        if ctx.is_main:
            clusters[kept] = kmeans_clusters(z, int(self.options["num_clusters"]), self.config.seed, bool(self.options["kmeans_normalize"]))
        clusters = broadcast_object(clusters)
        sizes = np.bincount(clusters[kept], minlength=int(self.options["num_clusters"]))
        logger.info("k-means: cluster sizes %s", sizes.tolist())
        return clusters

    def subset(self, k: int) -> np.ndarray:
        """Indices of the regions of cluster ``k`` (the training set of intra-organ model ``k``)."""
        return np.flatnonzero(self.clusters == k)

    # stages --------------------------------------------------------------------------------
    def stages(self, volumes, ctx: RunContext) -> Iterator[Stage]:
        o = self.options
        yield Stage("inter", self.inter, self.build_dataset(volumes), self.budget["inter"])

        if self.clusters is None or self.region_key != self.region_set.key:
            self.clusters = self.cluster(ctx)
            self.region_key = self.region_set.key
        augment = augment_from_options(self.config.image_size, o)
        trained = []
        for k in range(len(self.intra)):
            if len(self.subset(k)) < 2 * max(1, ctx.world_size):
                logger.warning("cluster %d has %d region(s): its intra-organ model stays untrained", k, len(self.subset(k)))
            else:
                trained.append(k)
        # the intra budget is shared evenly by the models that train (a skipped cluster's share goes to the others)
        per_model = split_steps(self.budget["intra"], [1] * len(trained)) if trained else []
        if o["budget"] == "per-stage":
            per_model = [self.budget["intra"] // len(self.intra)] * len(trained)
        for k, steps in zip(trained, per_model, strict=False):
            if steps < 1:
                logger.warning("intra-organ model %d gets no step of the budget: it stays untrained", k)
                continue
            yield Stage(f"intra{k}", self.intra[k], TwoViews(self.region_dataset(self.subset(k)), augment), steps)

        if o["student_init"] == "inter" and not self.student_initialised:
            self.encoder.load_state_dict(self.inter.encoder.state_dict())
        self.student_initialised = True
        distiller = Distiller(
            self.encoder, self.inter, [m.encoder for m in self.intra], float(o["temperature"]),
            o["inter_head"], o["distance"], o["kl_direction"], float(o["lambda_intra"]), float(o["lambda_inter"]),
        )
        dataset: Dataset = self.region_dataset(self.kept_indices(), targets=self.clusters)
        if o["distill_augment"]:
            dataset = AugmentedWithTarget(dataset, augment)
        yield Stage("distill", distiller, dataset, self.budget["distill"])

    def output_meta(self) -> dict:
        meta: dict = {"student": "distilled (SepaReg IID)"}
        if self.region_set is not None:
            meta["regions"] = len(self.region_set)
        if self.clusters is not None:
            c = self.clusters[self.clusters >= 0]
            meta["cluster_sizes"] = np.bincount(c, minlength=int(self.options["num_clusters"])).tolist()
        return meta
