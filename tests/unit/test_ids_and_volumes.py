import nibabel as nib
import numpy as np
import pytest

from contourcl.data.volumes import CT_BOUNDS, check_header, check_label_geometry, read_ct, read_volume
from contourcl.errors import InvalidImageError, LabelMismatchError, UnsafeIdError
from contourcl.ids import check_id
from contourcl.testing import write_nifti


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/etc/passwd", "a\\b", "", ".hidden", "a..b", "x" * 200, None])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(UnsafeIdError, match="not allowed"):
        check_id(bad)


@pytest.mark.parametrize("good", ["pt_1", "synthetic_hn_000", "1.2.840.113619.2", "final", "case-7"])
def test_safe_ids_pass(good):
    assert check_id(good) == good


def test_unreadable_and_non_volume_files(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(InvalidImageError, match="cannot read the image 'bad.nii.gz'"):
        read_volume(bad)
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
    with pytest.raises(InvalidImageError, match="not a 3D volume"):
        read_volume(flat)


def test_label_geometry(blob_files, tmp_path):
    img_path, lab_path, affine = blob_files
    image, label = read_volume(img_path), read_volume(lab_path, "label")
    check_label_geometry(image, label)
    with pytest.raises(LabelMismatchError, match="shape"):
        check_label_geometry(image, (label[0][:-1], label[1]))
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(LabelMismatchError, match="affine differs .* by 2 mm"):
        check_label_geometry(image, (label[0], shifted))


def test_a_file_no_ct_could_be_is_refused_before_its_voxels_are_read(tmp_path):
    def write(name, array, spacing):
        nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(tmp_path / name))
        return tmp_path / name

    ct = np.random.default_rng(0).normal(0, 100, (16, 16, 8)).astype(np.int16)
    assert check_header(write("ok.nii.gz", ct, (1.0, 1.0, 3.0))) == ((16, 16, 8), (1.0, 1.0, 3.0))
    with pytest.raises(InvalidImageError, match="spacing"):
        read_ct(write("coarse.nii.gz", ct, (100.0, 100.0, 100.0)))
    with pytest.raises(InvalidImageError, match="spacing"):
        read_ct(write("fine.nii.gz", ct, (0.001, 0.001, 0.001)))
    # a header claiming more voxels than a CT has: refused from the header (the file is tiny)
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((2048, 2048, 2048))
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        f.write(img.header.binaryblock + b"\0" * 4)
    with pytest.raises(InvalidImageError, match=f"at most {CT_BOUNDS.max_voxels:,}"):
        check_header(path)
    nan = ct.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        read_ct(write("nan.nii.gz", nan, (1.0, 1.0, 3.0)))
    with pytest.raises(InvalidImageError, match="constant"):
        read_ct(write("zero.nii.gz", np.zeros_like(ct), (1.0, 1.0, 3.0)))
