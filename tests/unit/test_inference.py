import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from contourcl.errors import InvalidImageError
from contourcl.inference import Contourer
from contourcl.models.networks import NetConfig, build_network
from contourcl.testing import blob_case, constant_oar_model, write_nifti


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
    pred = Contourer(constant_oar_model(tmp_path / "m.pt", 3), largest_component=False)(path)
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
    constant_oar_model(served, 1)
    contourer = Contourer(served, largest_component=False)
    first = contourer(path)
    assert set(np.unique(first.label)) == {1}
    time.sleep(0.01)
    constant_oar_model(tmp_path / "new.pt", 2)
    os.replace(tmp_path / "new.pt", served)
    second = contourer(path)
    assert set(np.unique(second.label)) == {2}
    assert second.model_version != first.model_version


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(InvalidImageError, match="scan.nii.gz"):
        Contourer(constant_oar_model(tmp_path / "m.pt", 1))(bad)


def test_argmax_on_grid_interpolates_onto_any_axis_aligned_grid(monkeypatch):
    """Probabilities put on a grid with permuted, flipped, finer axes extending past theirs: each
    voxel is the argmax of the probabilities linearly interpolated at its position (background
    beyond half a voxel outside), as SciPy's ``map_coordinates`` computes it, also when
    interpolated a few slices at a time; a rotated grid is refused (``None``)."""
    from scipy.ndimage import map_coordinates

    from contourcl.inference import argmax_on_grid

    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.as_tensor(rng.normal(0, 2, (4, 6, 5, 4)), dtype=torch.float32), dim=0)
    affine = np.diag([4.0, 4.0, 3.0, 1.0])
    affine[:3, 3] = [-10, -8, 0]
    # output grid: axes permuted (z, x, y), x flipped, finer spacing, extending past the probabilities' grid
    out_affine = np.array([[0, -2.0, 0, 12], [0, 0, 1.5, -9], [1.5, 0, 0, -1], [0, 0, 0, 1]])
    shape = (7, 13, 15)
    at = (np.linalg.inv(affine) @ out_affine)[:3] @ np.vstack([np.indices(shape).reshape(3, -1), np.ones((1, np.prod(shape)))])
    size = np.array(probs.shape[1:])[:, None]
    inside = ((at >= -0.5) & (at <= size - 0.5)).all(axis=0)
    values = np.stack([map_coordinates(p, np.clip(at, 0, size - 1), order=1) for p in probs.numpy().astype(np.float64)])
    expected = np.where(inside, values.argmax(axis=0), 0).reshape(shape)
    assert 0.2 < (expected > 0).mean() < 0.8  # structures and background both
    for chunk in (1 << 24, 4 * 13 * 15):  # at once, one output slice at a time
        monkeypatch.setattr("contourcl.inference._CHUNK_VALUES", chunk)
        np.testing.assert_array_equal(argmax_on_grid(probs.clone(), affine, out_affine, shape, largest_component=False), expected)
    rotated = out_affine.copy()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[1, 0.3, 0], [-0.3, 1, 0], [0, 0, 1]])
    assert argmax_on_grid(probs, affine, rotated, shape, largest_component=False) is None


def test_oblique_image_gets_its_own_grid_back(tmp_path):
    ct, _, affine = blob_case(shape=(40, 36, 6))
    c, s = np.cos(0.35), np.sin(0.35)
    oblique = affine.copy()
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    path = write_nifti(tmp_path / "oblique.nii.gz", ct, oblique)
    pred = Contourer(constant_oar_model(tmp_path / "m.pt", 6), largest_component=False)(path)
    assert pred.label.shape == ct.shape and np.allclose(pred.affine, nib.load(path).affine, atol=1e-4)
    assert (pred.label == 6).mean() > 0.9  # the whole grid is covered (borders may fall outside)


def test_whole_slice_inference_matches_monai_slice_inferer():
    from monai.inferers import SliceInferer

    from contourcl.inference import slice_probabilities

    torch.manual_seed(0)
    net = build_network(NetConfig(out_channels=3, encoder="resnet10", width=8)).eval()
    image = torch.rand(1, 1, 50, 44, 5)
    ours = slice_probabilities(net, image, roi=(64, 64))
    with torch.no_grad():
        ref = torch.softmax(SliceInferer(roi_size=(64, 64), sw_batch_size=4, spatial_dim=2, progress=False)(image, net), dim=1)
    assert ours.shape == (1, 3, 50, 44, 5)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_body_box_and_whole_slice_roi():
    from contourcl.inference import body_box, whole_slice_roi

    image = torch.zeros(100, 80, 6)
    image[30:50, 20:41, 2] = 0.4  # the body in one slice
    rows, cols = body_box(image, margin=8)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (22, 58, 12, 49)
    image[0:5, 75:80, 0] = 1.0  # touching the edges: clipped to the volume
    rows, cols = body_box(image, margin=8)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 58, 12, 80)
    assert body_box(torch.zeros(10, 12, 3)) == (slice(0, 10), slice(0, 12))
    assert whole_slice_roi((36, 37)) == (64, 64)
    assert whole_slice_roi((20, 173)) == (32, 192)
    assert whole_slice_roi((600, 64)) == (512, 64)


def test_flip_test_time_augmentation_is_left_right_symmetric():
    """With ``tta_flip`` the contour of a mirrored CT is the mirrored contour, Parotid_R and
    Parotid_L swapped; without it an untrained network is not (so the test can fail)."""
    from contourcl.data.labels import mirror_channels, model_labels
    from contourcl.inference import model_probabilities
    from contourcl.models.checkpoint import ModelMeta
    from contourcl.models.networks import NetConfig, build_network

    labels = model_labels("oar")
    assert mirror_channels(labels) == [0, 1, 2, 4, 3, 5, 6, 7]
    torch.manual_seed(0)
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8)).eval()
    image = torch.rand(1, 40, 36, 3)
    image[:, :4] = 0  # air on one side: the body box is not symmetric either
    swap = mirror_channels(labels)
    for tta, symmetric in ((True, True), (False, False)):
        meta = ModelMeta(model="oar", labels=labels, net={}, tta_flip=tta)
        p = model_probabilities(net, image, meta)
        q = model_probabilities(net, torch.flip(image, dims=[1]), meta)
        assert torch.allclose(torch.flip(q, dims=[1])[swap], p, atol=1e-5) == symmetric


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 3.0), (-4.0, -4.0, 2.5)], ids=["finer-RAS", "coarser-LPS"])
def test_contour_interpolates_the_whole_volumes_probabilities_onto_the_ct_grid(tmp_path, spacing, monkeypatch):
    """The served contour (computed in the body's box, structure by structure) is, at each voxel
    of the CT's own grid, the argmax of the whole volume's probabilities linearly interpolated
    there; with the largest-component rule each structure's probability is first kept within
    one voxel (in-plane) of its largest component on the network's grid (0 elsewhere), and each structure is
    its largest component on the CT's grid. Checked against a direct (slow) computation with
    SciPy, on a CT finer than the network's grid and on a coarser one stored left-right and
    front-back flipped (as DICOM's LPS), the latter interpolated a few slices at a time."""
    from monai.transforms.utils import get_largest_connected_component_mask
    from scipy.ndimage import binary_dilation, map_coordinates

    from contourcl.data.labels import model_labels
    from contourcl.inference import contour, model_probabilities, preprocess_ct
    from contourcl.models.checkpoint import ModelMeta

    if spacing[0] < 0:
        monkeypatch.setattr("contourcl.inference._CHUNK_VALUES", 8 * 64 * 3)
    rng = np.random.default_rng(0)
    ct = np.full((96, 80, 6), -1000, np.int16)  # air, a body of random tissue in the middle
    ct[30:62, 24:52] = rng.integers(-300, 1500, (32, 28, 6))
    ct[70:80, 60:64, 2] = 500  # on one slice only: the box is wider than most slices' body
    path = write_nifti(tmp_path / "ct.nii.gz", ct, np.diag([*spacing, 1.0]))
    labels = model_labels("oar")
    meta = ModelMeta(model="oar", labels=labels, net={}, spacing=(3.0, 3.0))
    torch.manual_seed(0)
    net = build_network(NetConfig(out_channels=len(labels) + 1, encoder="resnet10", width=8)).eval()
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # an untrained network with a sharper last layer: many structures, in pieces
        head.weight.mul_(30)
    data, pre = preprocess_ct(path, meta)
    assert data["image"].shape[1:3] != (96, 80)  # resampled: the mapping between grids is exercised
    whole = model_probabilities(net, data["image"], meta).numpy().astype(np.float64)
    model_affine = np.asarray(data["image"].affine, dtype=np.float64)
    affine, shape = data["grid"]
    # each CT voxel's position on the network's grid; outside it (beyond half a voxel): background
    m = np.linalg.inv(model_affine) @ affine
    at = m[:3, :3] @ np.indices(shape).reshape(3, -1) + m[:3, 3:]
    size = np.array(whole.shape[1:])[:, None]
    inside = ((at >= -0.5) & (at <= size - 0.5)).all(axis=0).reshape(shape)
    at = np.clip(at, 0, size - 1)
    results = []
    for keep in (False, True):
        label, _ = contour(net, meta, data, pre, largest_component=keep)
        results.append(label)
        probs = whole.copy()
        if keep:
            hard = probs.argmax(axis=0)
            for k in range(1, probs.shape[0]):
                component = np.asarray(get_largest_connected_component_mask(torch.as_tensor(hard == k))) if (hard == k).any() else hard < 0
                probs[k] *= binary_dilation(component, np.ones((3, 3, 1)))
        values = np.stack([map_coordinates(p, at, order=1).reshape(shape) for p in probs])
        expected = np.where(inside, values.argmax(axis=0), 0).astype(np.uint8)
        if keep:
            for k in range(1, probs.shape[0]):
                if (expected == k).any():
                    expected[(expected == k) & ~np.asarray(get_largest_connected_component_mask(torch.as_tensor(expected == k)))] = 0
        assert label.shape == ct.shape
        assert len(np.unique(label)) > 2  # an untrained network draws several structures, in pieces
        assert (label != expected).sum() <= 2, (label != expected).sum()  # float32 against float64 near ties
        nearest = np.where(inside, whole.argmax(axis=0)[tuple(np.rint(at).astype(int))].reshape(shape), 0)
        assert (label != nearest).sum() > 20  # not the nearest voxel's label: interpolated
    assert (results[0] != results[1]).any()  # the largest components are really taken


def test_each_slice_is_averaged_with_its_neighbours():
    """The served probabilities of a slice are the mean of the network's for it and the slices
    above and below (the end slices count themselves twice), so a contour agrees with its
    neighbours; summing to 1 still."""
    from contourcl.data.labels import model_labels
    from contourcl.inference import box_probabilities, slice_probabilities, whole_slice_roi
    from contourcl.models.checkpoint import ModelMeta

    labels = model_labels("oar")
    torch.manual_seed(0)
    net = build_network(NetConfig(out_channels=len(labels) + 1, encoder="resnet10", width=8)).eval()
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # an untrained network with a sharper last layer
        head.weight.mul_(30)
    image = torch.rand(1, 40, 36, 5)
    probs, (rows, cols) = box_probabilities(net, image, ModelMeta(model="oar", labels=labels, net={}))
    crop = image[None, :, rows, cols]
    raw = slice_probabilities(net, crop, whole_slice_roi(crop.shape[2:4]))[0]
    assert not torch.allclose(raw[..., 1], raw[..., 2], atol=1e-3)  # the slices differ: the test can fail
    torch.testing.assert_close(probs[..., 2], (raw[..., 1] + raw[..., 2] + raw[..., 3]) / 3)
    torch.testing.assert_close(probs[..., 0], (2 * raw[..., 0] + raw[..., 1]) / 3)
    torch.testing.assert_close(probs[..., 4], (raw[..., 3] + 2 * raw[..., 4]) / 3)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(probs.shape[1:]))
