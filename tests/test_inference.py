import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from contourcl.checkpoint import ModelMeta, save_model
from contourcl.errors import InvalidImageError
from contourcl.inference import Contourer
from contourcl.labels import model_labels
from contourcl.networks import NetConfig, build_network
from conftest import blob_case, write_nifti


def model_file(path, bias_channel: int):
    """A tiny model whose output is the class ``bias_channel`` everywhere."""
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].weight.zero_()
        net.head[0].bias.fill_(-10.0)
        net.head[0].bias[bias_channel] = 10.0
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), spacing=(3.0, 3.0)))


@pytest.mark.parametrize("flip", [False, True])
def test_output_has_the_input_grid(tmp_path, flip):
    ct, _, affine = blob_case(shape=(50, 44, 7), spacing=(1.7, 2.3, 5.0))
    if flip:  # stored left-right and inferior-superior reversed (an LPI-like file): still RAS world
        ct = ct[::-1, :, ::-1]
        a = affine.copy()
        a[:3, 3] += a[:3, 0] * (ct.shape[0] - 1) + a[:3, 2] * (ct.shape[2] - 1)
        a[:, 0] *= -1
        a[:, 2] *= -1
        affine = a
    path = write_nifti(tmp_path / "ct.nii.gz", ct, affine)
    pred = Contourer(model_file(tmp_path / "m.pt", 3), largest_component=False)(path)
    assert pred.label.shape == ct.shape
    assert np.allclose(pred.affine, nib.load(path).affine, atol=1e-4)
    assert pred.labels["Parotid_R"] == 3 and set(np.unique(pred.label)) == {3}
    out = pred.save(tmp_path / "out.nii.gz")
    written = nib.load(out)
    assert written.shape == ct.shape and np.allclose(written.affine, nib.load(path).affine, atol=1e-4)


def test_model_is_reloaded_when_the_file_is_replaced(tmp_path):
    ct, _, affine = blob_case()
    path = write_nifti(tmp_path / "ct.nii.gz", ct, affine)
    served = tmp_path / "oar.pt"
    model_file(served, 1)
    contourer = Contourer(served, largest_component=False)
    first = contourer(path)
    assert set(np.unique(first.label)) == {1}
    time.sleep(0.01)
    model_file(tmp_path / "new.pt", 2)
    os.replace(tmp_path / "new.pt", served)
    second = contourer(path)
    assert set(np.unique(second.label)) == {2}
    assert second.model_version != first.model_version


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(InvalidImageError, match="scan.nii.gz"):
        Contourer(model_file(tmp_path / "m.pt", 1))(bad)
