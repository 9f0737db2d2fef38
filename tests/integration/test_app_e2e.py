"""End to end: the real MONAI Label server on a copy of the sample data, driven like Slicer.

The server is started as a user starts it (``monailabel start_server --app ... --studies ...
--conf models all``) on 127.0.0.1 and a free port, and driven with
``monailabel.client.MONAILabelClient``: info, next sample, infer, submit a corrected label,
train, infer again. The served ``oar`` model is the shipped one, trained on real CT: on the
synthetic phantoms of the sample data it scores about 0.3 mean Dice, and retraining on the
submitted phantom labels adapts it to them within a few CPU epochs, as retraining adapts it to a
department's own contours (``python -m contourcl.serving.retrain_phantoms --model <oar.pt>`` prints the
served and retrained Dice with each of the three unlabeled phantoms as the validation case).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from contourcl.data.labels import STORED_LABELS, to_model
from contourcl.data.phantom import make_phantom
from contourcl.inference import model_version
from contourcl.testing import CodePayload, start_monailabel, stop_process, wait_for_training, wait_until_serving

pytestmark = pytest.mark.timeout(900)


def _dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    scores = []
    for v in labels:
        x, y = a == v, b == v
        if y.any():
            scores.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def server(tmp_path_factory, app_sandbox):
    root = tmp_path_factory.mktemp("e2e")
    app, studies = app_sandbox(root, weights=None)  # every weight the checkout ships

    server_tmp = root / "server-tmp"  # the server's temporary folder: no request may leave a file in it
    server_tmp.mkdir()
    proc, url = start_monailabel(app, studies, {"models": "all", "min_gate_cases": 1}, root / "server.log", cwd=root, env={"TMPDIR": str(server_tmp)})
    try:
        wait_until_serving(proc, url, root / "server.log")
        yield {"url": url, "app": app, "studies": studies, "log": root / "server.log", "tmp": server_tmp}
    finally:
        stop_process(proc)



def test_clinician_loop(server):
    url, app, studies = server["url"], server["app"], server["studies"]
    # results go to a folder of their own: on one machine, the server's temporary result file
    # has the same name in /tmp, and the server removes it after answering
    client = MONAILabelClient(url, tmpdir=str(app.parent / "client"))
    (app.parent / "client").mkdir(exist_ok=True)

    info = client.info()
    # each model twice: deepedit (Slicer's and OHIF's point tools) and <model>_seg (OHIF's Auto-Segmentation lists only segmentation)
    assert set(info["models"]) == {"oar", "gtv", "oar_seg", "gtv_seg"}
    assert [info["models"][m]["type"] for m in ("oar", "gtv", "oar_seg", "gtv_seg")] == ["deepedit", "deepedit", "segmentation", "segmentation"]
    assert info["models"]["oar_seg"]["labels"] == info["models"]["oar"]["labels"]
    assert info["models"]["oar"]["labels"] == {"Brainstem": 1, "SpinalCord": 2, "Parotid_R": 3, "Parotid_L": 4, "Mandible": 5, "Larynx": 6, "Esophagus": 7}
    assert info["models"]["gtv"]["labels"] == {"GTV": 1}
    assert {"oar", "gtv"} <= set(info["trainers"])

    # next sample: an unlabeled study (random, and the uncertainty strategy)
    unlabeled = {p.name.removesuffix(".nii.gz") for p in studies.glob("*.nii.gz")} - {p.name.removesuffix(".nii.gz") for p in (studies / "labels" / "final").glob("*.nii.gz")}
    assert client.next_sample("random", {})["id"] in unlabeled
    image_id = client.next_sample("oar_uncertainty", {})["id"]
    assert image_id in unlabeled

    # auto-contour: a label map on the image's own grid
    image_path = studies / f"{image_id}.nii.gz"
    result_file, params = client.infer("oar", image_id, {})
    first = nib.load(result_file)
    image = nib.load(image_path)
    assert first.shape == image.shape and np.allclose(first.affine, image.affine, atol=1e-4)
    assert params["label_names"]["Parotid_L"] == 4
    served_before = params["model_version"]
    assert served_before == model_version(app / "model" / "oar.pt")
    seg_file, seg_params = client.infer("oar_seg", image_id, {})
    assert np.array_equal(np.asanyarray(nib.load(seg_file).dataobj), np.asanyarray(first.dataobj)), "oar_seg is oar"
    assert seg_params["model"] == "oar" and seg_params["model_version"] == served_before

    # the clinician corrects the contours (here: the phantom's truth) and submits them; Slicer
    # numbers segments in its own order and says so in label_info
    seed = int(image_id.rsplit("_", 1)[1])
    truth_stored = make_phantom(seed, shape=image.shape, spacing=tuple(float(s) for s in image.header.get_zooms()))[1]
    slicer_order = ["Mandible", "GTV", "Brainstem", "Parotid_R", "Parotid_L", "SpinalCord", "Larynx", "Esophagus"]
    slicer = np.zeros_like(truth_stored)
    for idx, name in enumerate(slicer_order, start=1):
        slicer[truth_stored == STORED_LABELS[name]] = idx
    label_file = app.parent / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(slicer, image.affine), str(label_file))
    client.save_label(image_id, str(label_file), tag="final", params={"label_info": [{"name": n, "idx": i} for i, n in enumerate(slicer_order, start=1)]})
    stored = np.asanyarray(nib.load(studies / "labels" / "final" / f"{image_id}.nii.gz").dataobj)
    assert np.array_equal(stored, truth_stored), "segments were mapped by name into the stored numbering"

    # retrain: fine-tunes from the served model, validates, publishes because it is better
    client.train_start("oar", {"max_epochs": 4, "lr": 1e-3, "samples_per_volume": 16})
    status = wait_for_training(url)
    assert status["status"] == "DONE", status
    stats = client.info()["train_stats"]["oar"]
    published = stats["history"][-1]
    assert published["published"] is True, published
    assert published["val_dice"] >= published["served_val_dice"]

    # the new model is what now answers
    result_file, params = client.infer("oar", image_id, {})
    assert params["model_version"] != served_before
    assert params["model_version"] == model_version(app / "model" / "oar.pt")
    after = np.asanyarray(nib.load(result_file).dataobj)
    truth = to_model(truth_stored, "oar")
    assert _dice(after, truth, range(1, 8)) > _dice(np.asanyarray(first.dataobj), truth, range(1, 8))

    # a training run that makes the model worse is not served
    served_now = params["model_version"]
    client.train_start("oar", {"max_epochs": 1, "lr": 50.0})
    assert wait_for_training(url)["status"] == "DONE"
    rejected = client.info()["train_stats"]["oar"]["history"][-1]
    assert rejected["published"] is False and "kept the served model" in rejected["reason"]
    assert client.infer("oar", image_id, {})[1]["model_version"] == served_now
    versions = [e["version"] for e in client.info()["train_stats"]["oar"]["history"]]
    assert versions == [0, 1, 2]  # the original model, the published one, the rejected one: all kept


def test_bad_input_gets_a_clear_error_and_nothing_is_lost(server):
    url, studies = server["url"], server["studies"]
    labeled = sorted(p.name.removesuffix(".nii.gz") for p in (studies / "labels" / "final").glob("*.nii.gz"))
    image_id = labeled[0]
    label_path = studies / "labels" / "final" / f"{image_id}.nii.gz"
    before = label_path.read_bytes()
    image = nib.load(studies / f"{image_id}.nii.gz")

    r = requests.post(f"{url}/infer/liver?image={image_id}")
    assert r.status_code == 404 and "unknown model 'liver'" in r.json()["detail"]
    r = requests.post(f"{url}/train/liver")
    assert r.status_code == 404 and "unknown model 'liver'" in r.json()["detail"]
    for bad in ("../../etc/passwd", "/etc/passwd"):
        r = requests.post(f"{url}/infer/oar", params={"image": bad})
        assert r.status_code == 400 and "not allowed" in r.json()["detail"]

    def put_label(path, params, tag="final", image=image_id):
        with open(path, "rb") as f:
            return requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag}, files={"label": f}, data={"params": json.dumps(params)})

    tmp = server["app"].parent
    good = np.asanyarray(nib.load(label_path).dataobj)
    nib.save(nib.Nifti1Image(good[:-2], image.affine), str(tmp / "short.nii.gz"))
    r = put_label(tmp / "short.nii.gz", {})
    assert r.status_code == 422 and "shape" in r.json()["detail"]
    moved = image.affine.copy()
    moved[0, 3] += 10
    nib.save(nib.Nifti1Image(good, moved), str(tmp / "moved.nii.gz"))
    r = put_label(tmp / "moved.nii.gz", {})
    assert r.status_code == 422 and "affine differs" in r.json()["detail"]
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), image.affine), str(tmp / "named.nii.gz"))
    r = put_label(tmp / "named.nii.gz", {"label_info": [{"name": "Liver", "idx": 1}]})
    assert r.status_code == 422 and "Liver" in r.json()["detail"]
    r = put_label(tmp / "named.nii.gz", {"label_info": [{"name": "Mandible", "idx": 1}]}, tag="../../escape")
    assert r.status_code == 400 and "label tag" in r.json()["detail"]
    (tmp / "junk.nii.gz").write_bytes(b"not an image")
    with open(tmp / "junk.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/image", params={"image": "junk_case"}, files={"file": f})
    assert r.status_code == 422 and "cannot read the image 'junk_case'" in r.json()["detail"]
    with open(studies / f"{labeled[1]}.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/image", params={"image": image_id}, files={"file": f})
    assert r.status_code == 409 and "nothing was overwritten" in r.json()["detail"]

    assert label_path.read_bytes() == before, "the stored label is untouched"
    assert not list(studies.rglob("*escape*")) and not (studies / "junk_case.nii.gz").exists()
    assert requests.get(f"{url}/info/").ok, "the server keeps serving"


def _once_listed(url: str, image_id: str, method: str, path: str, timeout: float = 30) -> requests.Response:
    """The answer to ``method path?image=image_id`` once the server has found a file put into the
    studies folder by hand. MONAI Label's datastore finds such files by watching the folder, in
    the server and in any task subprocess running at the time (scoring, training), each of which
    rewrites the datastore's JSON: until the server has found it, and while they disagree, the
    image is not known to it (404: MONAI Label's "Image NOT Found", or "not in the datastore")."""
    deadline = time.time() + timeout
    while True:
        r = requests.request(method, f"{url}{path}", params={"image": image_id})
        if r.status_code != 404 or time.time() > deadline:
            return r
        time.sleep(1)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_uploads_models_and_paths_are_safe(server):
    url, app, studies, tmp = server["url"], server["app"], server["studies"], server["tmp"]
    work = app.parent / "safety"
    work.mkdir()
    temp_before = _tree(tmp)
    labeled = sorted(p.name.removesuffix(".nii.gz") for p in (studies / "labels" / "final").glob("*.nii.gz"))
    image_id = labeled[0]
    image = nib.load(studies / f"{image_id}.nii.gz")
    ct = np.asarray(image.dataobj)

    def put_image(name, array, affine):
        path = work / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(path))
        with open(path, "rb") as f:
            return requests.put(f"{url}/datastore/image", params={"image": name}, files={"file": (path.name, f)})

    # images no CT can be: refused at the door, nothing stored, no temp file left
    nan = ct.astype(np.float32)
    nan[10, 10, 10] = np.nan
    for name, array, affine, needle in [
        ("nan_ct", nan, image.affine, "NaN"),
        ("zero_ct", np.zeros_like(ct), image.affine, "constant"),
        ("tiny_spacing", ct, np.diag([0.001, 0.001, 0.001, 1.0]), "spacing"),
        ("huge_spacing", ct[:8, :8, :8], np.diag([100.0, 100.0, 100.0, 1.0]), "spacing"),
    ]:
        r = put_image(name, array, affine)
        assert r.status_code == 422 and needle in r.json()["detail"], (name, r.status_code, r.text[:300])
        assert not (studies / f"{name}.nii.gz").exists()

    # label_info that cannot be meant: 422 naming it; the stored label is untouched
    label_path = studies / "labels" / "final" / f"{image_id}.nii.gz"
    before = label_path.read_bytes()
    nib.save(nib.Nifti1Image((np.asanyarray(nib.load(label_path).dataobj) > 0).astype(np.uint8), image.affine), str(work / "one.nii.gz"))
    for info, needle in [
        ([{"name": "Brainstem", "idx": 1}, {"name": "SpinalCord", "idx": 1}], "twice"),
        ([{"name": "Brainstem", "idx": "one"}], "idx"),
        ([{"name": "Brainstem", "idx": 1.5}], "idx"),
    ]:
        with open(work / "one.nii.gz", "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": f}, data={"params": json.dumps({"label_info": info})})
        assert r.status_code == 422 and needle in r.json()["detail"], r.text[:300]
    assert label_path.read_bytes() == before
    # a correct one is stored renumbered, and /datastore/label/info describes the stored voxels
    with open(work / "one.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": f},
                         data={"params": json.dumps({"label_info": [{"name": "Mandible", "idx": 1}]})})
    assert r.ok, r.text[:300]
    stored = np.asanyarray(nib.load(label_path).dataobj)
    assert set(np.unique(stored)) == {0, STORED_LABELS["Mandible"]}
    info = requests.get(f"{url}/datastore/label/info", params={"label": image_id, "tag": "final"}).json()
    assert info["label_info"] == [{"name": "Mandible", "idx": STORED_LABELS["Mandible"]}]

    # a model file that runs code when unpickled: refused, never run, the served model untouched
    marker = work / "pwned"
    served = app / "model" / "oar.pt"
    served_bytes = served.read_bytes()
    evil = work / "evil.pt"
    torch.save({"format": "contourcl-model/1", "meta": CodePayload(marker), "state_dict": {}}, evil)
    with open(evil, "rb") as f:
        r = requests.put(f"{url}/model/oar", files={"file": ("oar.pt", f)})
    assert r.status_code == 422 and "not a ContourCL model file" in r.json()["detail"], r.text[:300]
    assert not marker.exists() and served.read_bytes() == served_bytes
    assert requests.post(f"{url}/infer/oar", params={"image": image_id, "output": "json"}).ok

    # a valid model goes the way of a retrained one: archived, gated, then published
    with open(served, "rb") as f:
        r = requests.put(f"{url}/model/oar", files={"file": ("oar.pt", f)})
    assert r.status_code == 200, r.text[:300]
    last = requests.get(f"{url}/info/").json()["train_stats"]["oar"]["history"][-1]
    assert last["origin"].startswith("uploaded") and last["published"] and last["gate_cases"] >= 1

    # DELETE /model stops serving but keeps the file in the history
    gtv = app / "model" / "gtv.pt"
    gtv_bytes = gtv.read_bytes()
    r = requests.delete(f"{url}/model/gtv")
    assert r.status_code == 200, r.text[:300]
    kept = r.json()["kept_as_version"]
    assert not gtv.exists() and (app / "model" / "history" / "gtv" / f"v{kept:04d}.pt").read_bytes() == gtv_bytes
    assert not {"gtv", "gtv_seg"} & set(requests.get(f"{url}/info/").json()["models"])
    assert requests.post(f"{url}/infer/gtv", params={"image": image_id}).status_code == 404

    # only datastore ids or the request's own upload are contoured
    (tmp / "other-client.nii.gz").write_bytes((studies / f"{image_id}.nii.gz").read_bytes())
    r = requests.post(f"{url}/infer/oar", params={"image": str(tmp / "other-client.nii.gz")})
    assert r.status_code == 400, r.text[:300]
    r = requests.post(f"{url}/infer/oar", params={"image": image_id, "output": "json"}, data={"params": json.dumps({"image": "/etc/passwd"})})
    assert r.ok and r.json()["label_names"]["Mandible"] == 5
    with open(studies / f"{image_id}.nii.gz", "rb") as f:
        r = requests.post(f"{url}/infer/oar", params={"output": "image"}, files={"file": ("ct.nii.gz", f)})
    assert r.ok and len(r.content) > 100
    (tmp / "other-client.nii.gz").unlink()

    # a symlink in the studies folder that leaves it is never served
    (studies / "escape.nii.gz").symlink_to("/etc/passwd")
    for r in (_once_listed(url, "escape", "get", "/datastore/image"), _once_listed(url, "escape", "post", "/infer/oar")):
        assert r.status_code == 400 and "outside the studies folder" in r.json()["detail"], r.text[:300]
    (studies / "escape.nii.gz").unlink()

    # a file put into the studies folder by hand that is no CT: found when first used, then skipped
    nib.save(nib.Nifti1Image(nan, image.affine), str(studies / "by_hand.nii.gz"))
    r = _once_listed(url, "by_hand", "post", "/infer/oar")
    assert r.status_code == 422 and "NaN" in r.json()["detail"], r.text[:300]
    assert "NaN" in requests.get(f"{url}/info/").json()["unusable_images"]["by_hand"]
    for _ in range(5):
        assert requests.post(f"{url}/activelearning/random").json().get("id") != "by_hand"
    (studies / "by_hand.nii.gz").unlink()

    # the dataset download leaves no zip behind
    r = requests.get(f"{url}/datastore/dataset")
    assert r.ok and r.content[:2] == b"PK"
    assert _tree(tmp) == temp_before, "no request left a file in the server's temporary folder"
    assert requests.get(f"{url}/info/").ok
