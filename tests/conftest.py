"""Shared fixtures: small volumes written to disk, tiny networks, one thread per test process."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from contourcl.testing import free_port, start_monailabel, stop_process, wait_until_serving  # noqa: F401  (the tests import them from here)

torch.set_num_threads(1)


class CodePayload:
    """Unpickling this runs ``touch marker``: what an attacker's model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def constant_oar_model(path, channel: int, spacing: float = 3.0):
    """A tiny ``oar`` model file (``spacing`` mm in-plane) whose output is class ``channel`` everywhere."""
    from contourcl.data.labels import model_labels
    from contourcl.models.checkpoint import ModelMeta, save_model
    from contourcl.models.networks import NetConfig, build_network

    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].weight.zero_()
        net.head[0].bias.fill_(-10.0)
        net.head[0].bias[channel] = 10.0
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), spacing=(spacing, spacing)))


def write_nifti(path, array, affine) -> str:
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return str(path)


def blob_case(shape=(40, 40, 8), spacing=(4.0, 4.0, 3.0), seed=0):
    """A tiny CT-like volume (air, a body disc, two 'organs') and its stored-numbering label."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    body = (x - cx) ** 2 + (y - cy) ** 2 < (0.4 * shape[0]) ** 2
    organ1 = (x - cx + 6) ** 2 + (y - cy) ** 2 < 9  # Brainstem (1)
    organ2 = (x - cx - 6) ** 2 + (y - cy) ** 2 < 9  # Mandible (5), bright
    ct = np.full(shape, -1000.0)
    lab = np.zeros(shape, np.uint8)
    ct[body] = 40
    ct[organ1] = 120
    ct[organ2] = 900
    lab[organ1] = 1
    lab[organ2] = 5
    ct = ct + rng.normal(0, 10, shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, 0]
    return ct.astype(np.int16), lab, affine


@pytest.fixture
def blob_files(tmp_path):
    """Paths of a tiny image/label pair on disk and their affine."""
    ct, lab, affine = blob_case()
    return write_nifti(tmp_path / "ct.nii.gz", ct, affine), write_nifti(tmp_path / "lab.nii.gz", lab, affine), affine


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """A studies folder of three small synthetic phantoms (64 x 64 x 24 at 4 x 4 x 8 mm), labeled."""
    from contourcl.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("phantoms")
    for i in range(3):
        write_phantom(root, f"case{i}", i, shape=(64, 64, 24), spacing=(4.0, 4.0, 8.0))
    return root
