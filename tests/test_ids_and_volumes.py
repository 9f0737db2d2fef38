import numpy as np
import pytest

from contourcl.errors import InvalidImageError, LabelMismatchError, UnsafeIdError
from contourcl.ids import check_id
from contourcl.volumes import check_label_geometry, read_volume
from conftest import write_nifti


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
