"""Clicks through the real server (issue 31, items 1, 2 and 6).

The real ``monailabel start_server`` on copies of the app (synthetic weights, ``oar`` only) and of
the sample data. Slicer's DeepEdit form and DeepGrow's form, with and without an uploaded label:
a positive click at voxel (i, j, k) makes it the structure, a negative click makes it background,
every voxel of every other structure is exactly the starting one, the starting contour is the
uploaded label, else the server's last answer, and the answer is kept as the latest proposal. A
request with no point answers the automatic contour. Every bad input answers 422 naming the
problem, and no file under the studies folder changes.
"""

from __future__ import annotations

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import requests
from scipy import ndimage

from contourcl.data.labels import model_labels
from contourcl.refine.plain_edit import PLAIN_EDIT_RADIUS_MM, plain_edit
from contourcl.testing import REPO, infer_answer, sandbox, start_monailabel, stop_process, wait_until_serving

pytestmark = [pytest.mark.timeout(300)]
IMAGE = "synthetic_hn_003"
OAR = model_labels("oar")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("clicks")
    app, studies = sandbox(base, REPO, weights=("synthetic",))
    conf = {"models": "oar", "weights": "synthetic", "skip_scoring": "true", "skip_trainers": "true"}
    env = {"MONAI_LABEL_AUTH_ENABLE": None, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc, url = start_monailabel(app, studies, conf, base / "server.log", cwd=base, env=env, new_session=True)
    try:
        wait_until_serving(proc, url, base / "server.log", timeout=240)
        yield {"url": url, "studies": studies}
    finally:
        stop_process(proc, timeout=20)


def _nifti(label: np.ndarray, affine: np.ndarray) -> bytes:
    return nib.Nifti1Image(label.astype(np.uint8), affine).to_bytes()


def _post(url: str, params: dict | None = None, label: bytes | None = None, image: str = IMAGE) -> requests.Response:
    files = {"label": ("label.nii", label, "application/octet-stream")} if label is not None else None
    return requests.post(f"{url}/infer/oar", params={"image": image}, data={"params": json.dumps(params or {})}, files=files, timeout=180)


def _infer(url: str, params: dict | None = None, label: bytes | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    r = _post(url, params, label)
    assert r.status_code == 200, r.text
    return infer_answer(r)


def _slicer(structure: str, positive: list, background: list, info_labels: list[str]) -> dict:
    """What Slicer's module sends for a deepedit model: every label's points, the clicked segment in label."""
    params = {name: [] for name in info_labels}
    params.update({structure: positive, "background": background, "label": structure, "largest_component": True})
    params["GTV"] = [[0, 0, 0]]  # another model's label (Slicer sends the server's labels): not read by oar
    return params


def _only(structure_value: int, before: np.ndarray, after: np.ndarray) -> None:
    """Only the structure changed, and it took only background voxels."""
    changed = before != after
    assert np.all((before[changed] == structure_value) | (after[changed] == structure_value)), "another structure changed"
    assert np.all((before[changed] == 0) | (before[changed] == structure_value)), "the structure took another's voxel"
    assert np.all((after[changed] == 0) | (after[changed] == structure_value))


def _far_background(label: np.ndarray, value: int, affine: np.ndarray, mm: float) -> tuple[int, int, int]:
    """A background voxel at least ``mm`` from the structure, nearest the image's centre."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(label != value, sampling=spacing)
    ok = (label == 0) & (distance >= mm)
    ok[[0, -1]] = ok[:, [0, -1]] = ok[:, :, [0, -1]] = False
    idx = np.argwhere(ok)
    centre = np.asarray(label.shape) / 2
    return tuple(int(v) for v in idx[np.argmin(((idx - centre) ** 2).sum(axis=1))])


def _beside_another(label: np.ndarray, value: int, affine: np.ndarray, mm: float) -> tuple[int, int, int]:
    """A background voxel touching another structure, at least ``mm`` from this one: its disk
    would cover the other structure's voxels, which must stay that structure's."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    far = ndimage.distance_transform_edt(label != value, sampling=spacing) >= mm
    touching = ndimage.binary_dilation((label != 0) & (label != value)) & (label == 0) & far
    idx = np.argwhere(touching)
    assert len(idx), "no other structure to click beside"
    return tuple(int(v) for v in idx[len(idx) // 2])


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_clicks_refine_only_their_structure(server):
    url, studies = server["url"], server["studies"]
    info = requests.get(f"{url}/info/", timeout=60).json()
    assert info["models"]["oar"]["type"] == "deepedit", "Slicer shows its point tools for deepedit models"
    assert info["models"]["oar"]["refine"]["method"] == "plain edit" and "background" in info["labels"]
    auto, affine, params = _infer(url)
    assert "refined_by" not in params
    present = {name: int((auto == v).sum()) for name, v in OAR.items() if (auto == v).any()}
    structure = max(present, key=present.get)
    s = OAR[structure]
    p = _far_background(auto, s, affine, 3 * PLAIN_EDIT_RADIUS_MM)
    q = tuple(int(v) for v in np.argwhere(auto == s)[len(np.argwhere(auto == s)) // 2])
    beside = _beside_another(auto, s, affine, 3 * PLAIN_EDIT_RADIUS_MM)
    covered = plain_edit(np.zeros(auto.shape, bool), [beside], [], affine) & (auto != 0)
    assert covered.any(), "the click beside another structure reaches it"
    proposal = studies / ".contourcl" / "effort" / "proposals" / "oar" / f"{IMAGE}.nii.gz"

    # Slicer's form, no upload: a positive click, from the automatic contour (the last answer)
    one, affine1, params = _infer(url, _slicer(structure, [list(p), list(beside)], [], info["labels"]))
    assert np.allclose(affine1, affine, atol=1e-3)
    assert params["refined_by"] == "plain edit" and params["start"] == "last answer" and params["refined"] == [structure]
    assert auto[p] == 0 and one[p] == s and one[beside] == s, "a positive click makes its voxel the structure"
    _only(s, auto, one)
    assert np.array_equal(one[covered], auto[covered]), "the disk beside another structure left its voxels alone"
    assert np.array_equal(np.asarray(nib.load(str(proposal)).dataobj), one), "the refined answer is the latest proposal"

    # Slicer's form, the clicks so far and a negative one: from the last answer (one)
    two, _, params = _infer(url, _slicer(structure, [list(p), list(beside)], [list(q)], info["labels"]))
    assert params["start"] == "last answer" and one[q] == s and two[q] == 0 and two[p] == s
    _only(s, one, two)

    # DeepGrow's form with an uploaded label that lacks the structure: the click creates it
    upload = np.where(auto == s, 0, auto)
    three, _, params = _infer(url, {"label": structure, "foreground": [list(p)], "background": []}, _nifti(upload, affine))
    assert params["start"] == "uploaded label" and three[p] == s
    _only(s, upload, three)
    expected = np.where(plain_edit(upload == s, [p], [], affine) & (upload == 0), s, upload)
    assert np.array_equal(three, expected), "exactly the plain edit's disk, on the uploaded label"

    # DeepGrow's form with no upload: from the last answer (three); a negative click removes the disk
    four, _, params = _infer(url, {"label": structure, "foreground": [], "background": [list(p)]})
    assert params["start"] == "last answer" and four[p] == 0 and not (four == s).any()
    _only(s, three, four)

    # Slicer's form with an upload: a negative click on the uploaded structure
    five, _, params = _infer(url, _slicer(structure, [], [list(q)], info["labels"]), _nifti(auto, affine))
    assert params["start"] == "uploaded label" and five[q] == 0
    _only(s, auto, five)

    # no point (Slicer's Update with no clicks): the automatic contour
    again, _, params = _infer(url, _slicer(structure, [], [], info["labels"]) | {"GTV": []})
    assert "refined_by" not in params and np.array_equal(again, auto)


def test_bad_clicks_answer_422_and_change_nothing(server):
    url, studies = server["url"], server["studies"]
    auto, affine, _ = _infer(url)
    shape = auto.shape
    before = _tree(studies)
    cases = [
        ({"label": "Mandible", "Mandible": [[shape[0], 0, 0]]}, None, ["outside the image", f"{shape[0]} x {shape[1]} x {shape[2]}"]),
        ({"label": "Mandible", "foreground": [], "background": [[0, -1, 0]]}, None, ["[0, -1, 0]", "'background'", "outside the image"]),
        ({"label": "Liver", "Liver": [[1, 2, 3]]}, None, ["'Liver'", "no such structure"]),
        ({"label": "GTV", "foreground": [[1, 2, 3]]}, None, ["'GTV'", "no such structure"]),
        ({"label": "Mandible", "Mandible": [[1.5, 2, 3]]}, None, ["[1.5, 2, 3]", "three integers"]),
        ({"label": "Mandible", "foreground": [[1, 2, 3]] * 1001}, None, ["1001", "at most 1000"]),
        ({"label": "Mandible", "Mandible": [[1, 2, 3]]}, _nifti(np.zeros((shape[0], shape[1], shape[2] - 1)), affine),
         ["uploaded label has shape", str(tuple(shape))]),
        ({"label": "Mandible", "Mandible": [[1, 2, 3]]}, _nifti(np.zeros(shape), affine @ np.diag([1, 1, 1.5, 1])),
         ["uploaded label's affine differs"]),
        ({"label": "Mandible", "Mandible": [[1, 2, 3]]}, _nifti(np.full(shape, 9), affine), ["uploaded label holds values [9]"]),
    ]
    for params, label, words in cases:
        r = _post(url, params, label)
        assert r.status_code == 422, (params.get("label"), r.status_code, r.text[:300])
        detail = r.json()["detail"]
        for word in words:
            assert word in detail, (word, detail)
    assert _tree(studies) == before, "a refused request changed a file under the studies folder"
