"""Tests of the synthetic head-and-neck CT phantoms (contourcl.data.phantom). Fast, CPU only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from contourcl.data.labels import STORED_LABELS
from contourcl.data.phantom import make_dataset, make_phantom, phantom_affine, write_phantom

SHAPE = (128, 128, 96)
SPACING = (4.0, 4.0, 3.0)
SEEDS = (0, 1, 2, 5)

# Plausible volumes (mL). Observed on the OpenKBP training cases (real CT, 20 cases):
# Brainstem 10-41, SpinalCord 16-48, parotids 5-47, Mandible 41-89, Larynx 5-47, Esophagus 5-19.
VOLUME_ML = {
    "Brainstem": (10, 40),
    "SpinalCord": (8, 50),
    "Parotid_R": (8, 50),
    "Parotid_L": (8, 50),
    "Mandible": (35, 120),
    "Larynx": (8, 50),
    "Esophagus": (3, 25),
    "GTV": (0.8, 35),  # 15-40 mm lobulated mass
}
# Mean HU over the whole label (edges include partial volume with neighbours, as on real CT:
# the larynx includes its air lumen, the parotids sit against the mandible).
MEAN_HU = {
    "Brainstem": (15, 50),
    "SpinalCord": (15, 55),
    "Parotid_R": (-45, 50),
    "Parotid_L": (-45, 50),
    "Mandible": (450, 1100),
    "Larynx": (-400, 0),
    "Esophagus": (-150, 70),
    "GTV": (35, 115),
}
# Mean HU of the interior (label eroded by one voxel): the painted tissue itself.
CORE_HU = {
    "Brainstem": (20, 50),
    "Parotid_R": (-55, 20),
    "Parotid_L": (-55, 20),
    "Mandible": (500, 1150),
    "GTV": (60, 110),
}


@pytest.fixture(scope="module")
def cases():
    return {seed: make_phantom(seed) for seed in SEEDS}


def _centroid_world(label, value, affine):
    idx = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_same_seed_is_bit_identical(cases):
    ct, label, affine = make_phantom(SEEDS[0])
    ct0, label0, affine0 = cases[SEEDS[0]]
    assert np.array_equal(ct, ct0)
    assert np.array_equal(label, label0)
    assert np.array_equal(affine, affine0)


def test_different_seeds_differ(cases):
    (ct0, lab0, _), (ct1, lab1, _) = cases[0], cases[1]
    assert not np.array_equal(ct0, ct1)
    assert not np.array_equal(lab0, lab1)
    # different anatomy, not just different noise
    assert np.count_nonzero(lab0 != lab1) > 1000


def test_dtype_shape_affine(cases):
    ct, label, affine = cases[0]
    assert ct.dtype == np.int16 and label.dtype == np.uint8
    assert ct.shape == SHAPE and label.shape == SHAPE
    assert affine.shape == (4, 4)
    assert np.allclose(affine, phantom_affine(SHAPE, SPACING))
    # OpenKBP-like layout: rows anterior->posterior, columns right->left, slices inferior->superior
    assert nib.aff2axcodes(affine) == ("P", "L", "S")
    assert np.allclose(nib.affines.voxel_sizes(affine), SPACING)
    centre = affine @ np.array([(s - 1) / 2 for s in SHAPE] + [1.0])
    assert np.allclose(centre[:3], 0.0)


def test_intensity_range(cases):
    ct, label, _ = cases[0]
    assert ct.min() >= -1024 and ct.max() <= 3071
    assert ct[0, 0, 0] == -1024 and ct[-1, -1, -1] == -1024  # outside the body, as OpenKBP
    body = ct > -1024
    assert 0.05 < body.mean() < 0.5
    assert (ct[body] < -900).sum() > 100  # air inside: airway, sinuses
    assert (ct > 600).sum() > 1000  # bone


@pytest.mark.parametrize("seed", SEEDS)
def test_structures_present_with_plausible_volume_and_hu(cases, seed):
    ct, label, affine = cases[seed]
    assert set(np.unique(label).tolist()) <= {0, *STORED_LABELS.values()}
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    # the body: not outside air, holes (airway, sinuses) filled slice by slice
    body = ndimage.binary_fill_holes(ct > -1024, structure=np.ones((3, 3, 1), bool))
    for name, value in STORED_LABELS.items():
        mask = label == value
        assert mask.any(), f"{name} missing (seed {seed})"
        ml = mask.sum() * voxel_ml
        lo, hi = VOLUME_ML[name]
        assert lo <= ml <= hi, f"{name} volume {ml:.1f} mL not in [{lo}, {hi}] (seed {seed})"
        mean = float(ct[mask].mean())
        lo, hi = MEAN_HU[name]
        assert lo <= mean <= hi, f"{name} mean {mean:.1f} HU not in [{lo}, {hi}] (seed {seed})"
        if name in CORE_HU:
            core = ndimage.binary_erosion(mask)
            assert core.sum() > 3, name
            mean = float(ct[core].mean())
            lo, hi = CORE_HU[name]
            assert lo <= mean <= hi, f"{name} interior {mean:.1f} HU not in [{lo}, {hi}] (seed {seed})"
        assert body[mask].all(), f"{name} labelled outside the body"


@pytest.mark.parametrize("seed", SEEDS)
def test_anatomical_orientation(cases, seed):
    _, label, affine = cases[seed]
    c = {name: _centroid_world(label, value, affine) for name, value in STORED_LABELS.items()}
    # RAS+: +x is the patient's right (as in the OpenKBP files, where Parotid_R has the larger x)
    assert c["Parotid_R"][0] > c["Parotid_L"][0] + 40
    assert c["Parotid_R"][0] > 0 > c["Parotid_L"][0]
    # +z superior: brainstem above cord, larynx above oesophagus, mandible above larynx
    assert c["Brainstem"][2] > c["SpinalCord"][2]
    assert c["Brainstem"][2] > c["Parotid_R"][2] > c["Larynx"][2] > c["Esophagus"][2]
    assert c["Mandible"][2] > c["Larynx"][2]
    # +y anterior: mandible and larynx in front, then oesophagus, then the cord
    assert c["Mandible"][1] > c["SpinalCord"][1] + 30
    assert c["Larynx"][1] > c["Esophagus"][1] > c["SpinalCord"][1]


@pytest.mark.parametrize("seed", SEEDS)
def test_gtv_is_separate_distinct_and_sized(cases, seed):
    ct, label, affine = cases[seed]
    gtv = label == STORED_LABELS["GTV"]
    # one label map, so no voxel is both; GTV voxels carry no OAR value by construction
    assert not np.isin(label[gtv], [v for n, v in STORED_LABELS.items() if n != "GTV"]).any()
    idx = np.argwhere(gtv)
    extent = (idx.max(0) - idx.min(0) + 1) * np.array(SPACING)
    assert 12 <= extent.max() <= 45, extent
    # slightly enhancing: brighter than the brainstem (30-40 HU soft tissue) inside
    core = ndimage.binary_erosion(gtv)
    bs_core = ndimage.binary_erosion(label == STORED_LABELS["Brainstem"])
    assert ct[core].mean() > ct[bs_core].mean() + 20
    # in the neck: between the oesophagus top and the skull base (brainstem bottom)
    def world_z(ijk):
        return (ijk @ affine[:3, :3].T + affine[:3, 3])[:, 2]

    assert world_z(idx).mean() < world_z(np.argwhere(label == STORED_LABELS["Brainstem"])).min()


def test_labels_consistent_with_ct(cases):
    ct, label, _ = cases[0]
    mand = ct[label == STORED_LABELS["Mandible"]]
    assert np.mean(mand > 250) > 0.8  # bone
    larynx = ct[label == STORED_LABELS["Larynx"]]
    assert np.mean(larynx < -500) > 0.05  # the air lumen is part of the organ
    assert np.mean(larynx > 50) > 0.25  # cartilage / soft-tissue wall
    cord = ct[label == STORED_LABELS["SpinalCord"]]
    assert np.mean((cord > -40) & (cord < 120)) > 0.9  # soft tissue, not bone


def test_other_grids():
    ct, label, affine = make_phantom(7, shape=(64, 64, 48), spacing=(8.0, 8.0, 6.0))
    assert ct.shape == label.shape == (64, 64, 48)
    assert np.allclose(nib.affines.voxel_sizes(affine), (8, 8, 6))
    assert {STORED_LABELS["Brainstem"], STORED_LABELS["Mandible"]} <= set(np.unique(label).tolist())
    with pytest.raises(ValueError):
        make_phantom(0, shape=(4, 4))


def test_write_phantom_layout_and_headers(tmp_path, cases):
    paths = write_phantom(tmp_path, "synthetic_hn_000", 0)
    assert paths["image"] == tmp_path / "synthetic_hn_000.nii.gz"
    assert paths["label"] == tmp_path / "labels" / "final" / "synthetic_hn_000.nii.gz"
    img, lab = nib.load(paths["image"]), nib.load(paths["label"])
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, lab.affine)
    ct, label, affine = cases[0]
    assert np.allclose(img.affine, affine)
    assert np.array_equal(np.asarray(img.dataobj), ct)
    assert np.array_equal(np.asarray(lab.dataobj), label)
    for im in (img, lab):
        assert int(im.header["qform_code"]) == 1 and int(im.header["sform_code"]) == 1
        assert im.header.get_xyzt_units()[0] == "mm"


def test_make_dataset(tmp_path):
    kw = dict(shape=(48, 48, 40), spacing=(10.0, 10.0, 7.5))  # coarse grid, to keep this quick
    ids = make_dataset(tmp_path, 3, first_seed=4, labeled=2, **kw)
    assert ids == ["synthetic_hn_004", "synthetic_hn_005", "synthetic_hn_006"]
    for i, case_id in enumerate(ids):
        assert (tmp_path / f"{case_id}.nii.gz").is_file()
        assert (tmp_path / "labels" / "final" / f"{case_id}.nii.gz").is_file() == (i < 2)
    # the file of a seed holds that seed's phantom
    ct, _, _ = make_phantom(5, **kw)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "synthetic_hn_005.nii.gz").dataobj), ct)
    with pytest.raises(ValueError):
        make_dataset(tmp_path, 2, labeled=3)
