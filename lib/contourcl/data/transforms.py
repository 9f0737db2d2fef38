"""Preprocessing of CT and label volumes, shared by pretraining, fine-tuning and serving.

One pipeline for every stage, so that a model sees at serving time exactly what it saw in
training: load (NIfTI, NRRD, ... through MONAI's readers), channel first, RAS orientation (so
that axial slices lie along the last axis), in-plane resampling to the model's spacing (the
slice spacing is kept: the network is 2D), and a CT window scaled to [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from contourcl.data import labels as label_names

logger = logging.getLogger(__name__)

#: In-plane voxel size (mm) the networks work at: OpenKBP's 3.9-4.9 mm, a 512^2 CT's FOV in 128^2.
DEFAULT_SPACING: tuple[float, float] = (4.0, 4.0)
#: CT window (HU) mapped to [0, 1]: from fat and air-filled larynx to cortical bone.
DEFAULT_WINDOW: tuple[float, float] = (-500.0, 800.0)


def ct_preprocessing(
    image_key: str = "image",
    label_key: str | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING,
    window: Sequence[float] = DEFAULT_WINDOW,
    blank_unimaged: bool = False,
    check_reference: str | None = None,
) -> list:
    """MONAI dictionary transforms: load, orient RAS, resample in-plane, window to [0, 1].

    The label (when ``label_key`` is given) follows the image with nearest-neighbour
    resampling. All transforms are invertible, so a prediction can be put back on the
    image's own grid with :class:`monai.transforms.Invertd`. ``blank_unimaged``: the label is
    background on the slices that do not image the patient (:class:`UnimagedSlicesToBackgroundd`,
    on the CT's own grid): what every training reader of labels uses. ``check_reference``: a model
    name; the reference structures :mod:`contourcl.data.reference_check` finds implausible for that
    model are set to background, i.e. not contoured (:class:`ImplausibleStructuresToBackgroundd`).
    """
    keys = [image_key] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    blank = [UnimagedSlicesToBackgroundd(image_key, label_key)] if blank_unimaged and label_key else []
    if check_reference and label_key:
        blank = [ImplausibleStructuresToBackgroundd(image_key, label_key, check_reference), *blank]
    return [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
        *blank,
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=(float(spacing[0]), float(spacing[1]), -1.0), mode=modes),
        ScaleIntensityRanged(
            keys=image_key, a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True
        ),
    ]


class LabelToModeld(MapTransform):
    """Renumber a case's label map into ``model``'s labels.

    The label is first put in the stored numbering (:func:`contourcl.data.labels.to_stored`, with
    the case's ``label_values`` when its file is numbered otherwise, as OpenKBP's target), then
    reduced to the model's structures (:func:`contourcl.data.labels.to_model`).
    """

    def __init__(self, keys: KeysCollection, model: str):
        super().__init__(keys)
        self.model = model

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            stored = label_names.to_stored(arr, d.get("label_values"))
            mapped = torch.as_tensor(label_names.to_model(stored, self.model), dtype=torch.float32)
            d[key] = MetaTensor(mapped, meta=lab.meta, applied_operations=lab.applied_operations) if isinstance(lab, MetaTensor) else mapped
        return d


class UnimagedSlicesToBackgroundd(MapTransform):
    """Set the label to background on axial slices that do not image the patient
    (:func:`contourcl.data.volumes.imaged_slices`).

    Many OpenKBP CTs hold values only in small islands around the drawn structures on the slices
    away from the treatment (a quarter of the spinal cord's and brainstem's training voxels lie on
    such slices). No clinical CT looks like that: training there teaches the network to read the
    island, not the anatomy, and spends a quarter of the cord's and brainstem's samples on it.
    Those slices are not scored either (:func:`contourcl.evaluation.prepare_cases`). Run it on the
    loaded, channel-first image and label, before any resampling.
    """

    def __init__(self, image_key: str, label_key: str):
        super().__init__([label_key])
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from contourcl.data.volumes import blank_slices, imaged_slices

        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        imaged = imaged_slices(np.asarray(image[0]), np.asarray(image.affine, dtype=np.float64))
        blanked, removed = blank_slices(np.asarray(label[0]), imaged)
        if removed:
            label = label.clone()
            label[0] = torch.as_tensor(blanked, dtype=label.dtype)
            d[self.label_key] = label
        return d


class ImplausibleStructuresToBackgroundd(MapTransform):
    """Set to background the reference structures :mod:`contourcl.data.reference_check` finds
    implausible for ``model`` (a structure set not drawn on this CT; a "spinal cord" that fills the
    back of the neck), so that they count as not contoured: the partial-label loss neither trains
    them nor trains background there. Run it on the loaded, channel-first image (HU) and label
    (in the file's numbering; the case's ``label_values`` say how it maps to the stored one),
    before any resampling. Each structure set aside is logged with its reason.
    """

    def __init__(self, image_key: str, label_key: str, model: str):
        super().__init__([label_key])
        self.image_key = image_key
        self.label_key = label_key
        self.model = model

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from contourcl.data.reference_check import checked_reference, needs_check

        labels = label_names.model_labels(self.model)
        d = dict(data)
        if not needs_check(labels):
            return d
        image, label = d[self.image_key], d[self.label_key]
        in_file = np.asarray(label[0])  # the file's numbering
        in_model = label_names.to_model(label_names.to_stored(in_file, d.get("label_values")), self.model)
        kept, faults = checked_reference(np.asarray(image[0]), in_model, np.asarray(image.affine, dtype=np.float64), labels)
        if faults:
            for name, reason in faults.items():
                logger.info("%s: reference %s set aside: %s", _case_name(label), name, reason)
            label = label.clone()
            label[0][torch.as_tensor((in_model > 0) & (kept == 0))] = 0
            d[self.label_key] = label
        return d


def _case_name(tensor: torch.Tensor) -> str:
    """The file a loaded MetaTensor came from, for log lines."""
    meta = getattr(tensor, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "a case"))


class StructurePresenced(MapTransform):
    """Record which structures a case contours: ``present[k] = 1`` if label ``k`` has voxels.

    OpenKBP cases and clinicians' partial contours lack some structures; a missing structure
    means *not contoured*, not *absent*. The loss (:mod:`contourcl.training.finetune.partial_label_loss`)
    uses this vector so that an uncontoured organ is never trained as background. Background
    (index 0) is always "present". Run it on the whole volume, before cropping.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, output_key: str = "present"):
        super().__init__(keys)
        self.num_classes = num_classes
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.unique(torch.as_tensor(d[key]).round().long())
            present = torch.zeros(self.num_classes, dtype=torch.float32)
            present[0] = 1.0
            present[values[(values > 0) & (values < self.num_classes)]] = 1.0
            d[self.output_key] = present
        return d


def neighbouring_slices(volume: torch.Tensor, context: int) -> torch.Tensor:
    """2.5D input: ``(B, 1, H, W, D)`` -> ``(B, 2 context + 1, H, W, D)``, channel ``k`` of slice
    ``z`` holding slice ``z + k - context`` (inferior to superior: the volumes are RAS). Beyond
    the first and last slice the edge slice is repeated."""
    if context <= 0:
        return volume
    if volume.shape[1] != 1:
        raise ValueError(f"neighbouring_slices takes a 1-channel volume, not {volume.shape[1]} channels")
    z = torch.arange(volume.shape[-1], device=volume.device)
    return torch.cat([volume[..., (z + k).clamp(0, volume.shape[-1] - 1)] for k in range(-context, context + 1)], dim=1)


class SlabToChannelsd(MapTransform):
    """A training sample of ``2 context + 1`` slices ``(1, H, W, K)`` -> the network's 2.5D input
    ``(K, H, W)`` (the slices as channels, in the order of :func:`neighbouring_slices`) and,
    for ``label_key``, the centre slice's label ``(1, H, W)``."""

    def __init__(self, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.image_key])
        d[self.image_key] = image[0].permute(2, 0, 1)
        label = torch.as_tensor(d[self.label_key])
        d[self.label_key] = label[..., label.shape[-1] // 2]
        return d
