"""A DICOMweb PACS (a real Orthanc with its DICOMweb plugin) as the studies of the real server.

Orthanc runs on 127.0.0.1 and a free port with its own storage folder; it is given two phantom
CT series (one JPEG 2000 lossless, feet first: Orthanc 1.10 cannot transcode it, so the app must
ask for the stored syntax), and later a series with a missing slice. The real MONAI Label server
is started on ``--studies http://127.0.0.1:<port>/dicom-web`` with both models (``oar`` and
``gtv``, the synthetic weights) and driven as Slicer would: info, next sample (random and
uncertainty), infer oar and gtv, submit corrected final labels, retrain, infer again from the new
model; the RTSTRUCTs and SEGs the app sent are read back from Orthanc. So that a few CPU epochs
make the retrain publish, the served ``oar`` model (in a copy of the app) is the synthetic one
with its output layer re-initialised, and the corrected labels are the phantoms' truth. Skipped
only where the Orthanc binary is not installed (CI installs it: ``.ci/run``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import torch
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from contourcl.data.dicom_series import read_series_geometry, write_ct_series
from contourcl.data.labels import STORED_LABELS, to_model
from contourcl.data.phantom import make_phantom
from contourcl.data.rtstruct import read_rtstruct, to_series_grid
from contourcl.data.seg import read_seg
from contourcl.inference import model_version
from contourcl.models.checkpoint import load_model, save_model
from contourcl.testing import (
    REPO,
    as_ohif_shows,
    find_orthanc,
    free_port,
    start_monailabel,
    start_orthanc,
    stop_process,
    wait_for_training,
    wait_until_serving,
)

ORTHANC = find_orthanc()
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)"),
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the server's environment here: one OpenMP thread, as conftest gives the tests


@pytest.fixture
def orthanc(tmp_path_factory):
    """``{"url": Orthanc's REST root, "dicomweb": its DICOMweb root}``: a fresh, empty Orthanc per test."""
    root = tmp_path_factory.mktemp("orthanc")
    proc, url = start_orthanc(root)
    try:
        yield {"url": url, "dicomweb": f"{url}/dicom-web", "root": root}
    finally:
        stop_process(proc)


def _upload(orthanc_url: str, files) -> None:
    for f in files:
        requests.post(f"{orthanc_url}/instances", data=Path(f).read_bytes(), timeout=30).raise_for_status()


def _to_jpeg2000(files) -> None:
    """Re-encode a written series as JPEG 2000 lossless (openjpeg), as a PACS may store it."""
    import openjpeg

    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([openjpeg.encode(ds.pixel_array, bits_stored=16)])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(f, write_like_original=False)


PHANTOMS = {"plain": (21, "HFS"), "j2k": (22, "FFS"), "gap": (23, "HFS")}  # name: (seed, PatientPosition)
PHANTOM_GRID = {"shape": (96, 80, 14), "spacing": (4.0, 4.0, 5.0)}


def _series(root: Path) -> dict[str, Path]:
    """``{name: folder}`` of the phantom series: ``plain`` (HFS, uncompressed), ``j2k`` (FFS,
    JPEG 2000 lossless), ``gap`` (a missing slice: not a CT grid)."""
    out = {}
    for name, (seed, position) in PHANTOMS.items():
        ct, _, affine = make_phantom(seed, **PHANTOM_GRID)
        files = write_ct_series(ct, affine, root / name, patient_id=f"phantom_{name}", patient_position=position)
        if name == "j2k":
            _to_jpeg2000(files)
        if name == "gap":
            files[7].unlink()
        out[name] = root / name
    return out


def _qido(dicomweb: str, path: str, **params) -> list[pydicom.Dataset]:
    r = requests.get(f"{dicomweb}/{path}", params=params, headers={"Accept": "application/dicom+json"}, timeout=30)
    r.raise_for_status()
    return [pydicom.Dataset.from_json(item) for item in (r.json() if r.content else [])]


def _dice(a: np.ndarray, b: np.ndarray, labels=range(1, 8)) -> float:
    scores = [2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in labels if (b == v).any()]
    return float(np.mean(scores))


def _truth_on(image: nib.Nifti1Image, name: str) -> np.ndarray:
    """The phantom's truth (stored numbering) on the grid of the cache's NIfTI ``image``: the
    series was written from the phantom's (array, affine); the cache's NIfTI holds the same voxels,
    possibly with its axes reordered, which :func:`to_series_grid` undoes exactly."""
    _, truth, affine = make_phantom(PHANTOMS[name][0], **PHANTOM_GRID)
    grid = SimpleNamespace(shape=image.shape, affine=image.affine)
    return to_series_grid(truth, affine, grid).astype(np.uint8)


#: the result parameters OHIF's MONAI Label panel sends with every infer (MonaiLabelClient.infer)
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}


def test_server_on_orthanc_clinician_loop(orthanc, tmp_path, app_sandbox):
    timings = {}
    started = time.time()
    series = _series(tmp_path / "series")
    geometry = {name: read_series_geometry(folder) for name, folder in series.items() if name != "gap"}
    by_uid = {geo.series_uid: name for name, geo in geometry.items()}
    _upload(orthanc["url"], sorted(series["plain"].iterdir()) + sorted(series["j2k"].iterdir()))

    app, _ = app_sandbox(tmp_path, weights=None, studies=False)  # the studies are the PACS
    # in the copy only: the served oar model is the synthetic one with its output layer
    # re-initialised (its Dice drops to about 0), so that a short retrain on the truth is better
    network, meta = load_model(REPO / "apps" / "radonc" / "model" / "synthetic" / "oar.pt")
    torch.manual_seed(0)
    network.head[0].reset_parameters()
    meta.metrics = {"note": "synthetic model, output layer re-initialised for the DICOMweb test"}
    save_model(app / "model" / "synthetic" / "oar.pt", network, meta)
    served_before = model_version(app / "model" / "synthetic" / "oar.pt")
    log = tmp_path / "server.log"
    proc, url = start_monailabel(app, orthanc["dicomweb"], {"models": "all", "weights": "synthetic", "dicomweb_refresh_s": 0, "min_gate_cases": 1}, log,
                                 cwd=tmp_path, env=ONE_THREAD)
    try:
        wait_until_serving(proc, url, log)
        timings["start"] = time.time() - started
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        (tmp_path / "client").mkdir()

        # the two CTs are the images (ids: their SeriesInstanceUIDs), cached next to the app
        info = client.info()
        cache = app / "dicomweb-cache" / f"127.0.0.1_{orthanc['url'].rsplit(':', 1)[1]}_dicom-web"
        assert info["studies"]["kind"] == "dicomweb" and info["studies"]["url"] == orthanc["dicomweb"]
        assert Path(info["studies"]["cache"]) == cache.resolve()
        assert info["datastore"]["total"] == 2
        assert set(info["models"]) == {"oar", "gtv", "oar_seg", "gtv_seg"} and {"oar", "gtv"} <= set(info["trainers"])
        assert info["models"]["gtv"]["labels"] == {"GTV": 1}
        assert {p.name.removesuffix(".nii.gz") for p in cache.glob("*.nii.gz")} == set(by_uid)

        # a series added to the PACS later is looked at on the next refresh; one that is not a
        # CT grid is named with why
        _upload(orthanc["url"], sorted(series["gap"].iterdir()))
        deadline = time.time() + 60
        while not (info := client.info())["refused_series"] and time.time() < deadline:
            time.sleep(0.5)  # the refresh runs in the background
        assert info["datastore"]["total"] == 2
        assert len(info["refused_series"]) == 1 and "gap" in next(iter(info["refused_series"].values())), info["refused_series"]

        assert client.next_sample("random", {})["id"] in by_uid
        assert client.next_sample("oar_uncertainty", {})["id"] in by_uid
        # what OHIF's panel opens for the next sample: its study (StudyInstanceUIDs=...), and more to show
        sample = client.next_sample("random", {})
        geo = geometry[by_uid[sample["id"]]]
        assert sample["StudyInstanceUID"] == geo.study_uid and sample["SeriesInstanceUID"] == sample["id"], sample
        assert sample["Modality"] == "CT" and sample["PatientID"] == f"phantom_{by_uid[sample['id']]}", sample
        assert sample["RetrieveURL"] == f"{orthanc['dicomweb']}/studies/{geo.study_uid}/series/{sample['id']}", sample

        # infer oar and gtv on each CT (one was JPEG 2000 in the PACS); the clinician corrects
        # the contours (here: to the phantom's truth, all eight structures) and submits them,
        # numbered as Slicer numbers its segments, with label_info naming them
        slicer_order = ["Mandible", "GTV", "Brainstem", "Parotid_R", "Parotid_L", "SpinalCord", "Larynx", "Esophagus"]
        label_info = [{"name": n, "idx": i} for i, n in enumerate(slicer_order, start=1)]
        accepted, first = {}, {}
        for image_id, name in by_uid.items():
            image = nib.load(cache / f"{image_id}.nii.gz")
            assert image.shape == geometry[name].shape
            result_file, params = client.infer("oar", image_id, {})
            pred = nib.load(result_file)
            assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-4)
            assert params["label_names"]["Parotid_L"] == 4
            first[image_id] = (np.asanyarray(pred.dataobj).copy(), params["model_version"])
            # the same contours as OHIF's panel asks for them: a raw uint8 NRRD whose bytes fill its labelmap as they are
            nrrd_file, _ = client.infer("oar", image_id, dict(OHIF_PARAMS))
            body = Path(nrrd_file).read_bytes().partition(b"\n\n")[2]
            shown = np.frombuffer(body, np.uint8).reshape(image.shape[::-1])
            np.testing.assert_array_equal(shown, as_ohif_shows(series[name], first[image_id][0], pred.affine),
                                          err_msg=f"{name}: OHIF would show the contours elsewhere")
            gtv_file, gtv_params = client.infer("gtv", image_id, {})
            gtv = nib.load(gtv_file)
            assert gtv.shape == image.shape and np.allclose(gtv.affine, image.affine, atol=1e-4)
            assert gtv_params["label_names"] == {"GTV": 1}
            assert set(np.unique(np.asanyarray(gtv.dataobj)).tolist()) <= {0, 1}

            accepted[image_id] = _truth_on(image, name)
            assert {STORED_LABELS["GTV"], STORED_LABELS["Mandible"]} <= set(np.unique(accepted[image_id]).tolist())
            slicer = np.zeros_like(accepted[image_id])
            for idx, structure in enumerate(slicer_order, start=1):
                slicer[accepted[image_id] == STORED_LABELS[structure]] = idx
            label_file = tmp_path / f"corrected_{name}.nii.gz"
            nib.save(nib.Nifti1Image(slicer, image.affine), str(label_file))
            client.save_label(image_id, str(label_file), tag="final", params={"label_info": label_info})
            stored = np.asanyarray(nib.load(cache / "labels" / "final" / f"{image_id}.nii.gz").dataobj)
            np.testing.assert_array_equal(stored, accepted[image_id], err_msg="segments mapped by name into the stored numbering")
        assert {version for _, version in first.values()} == {served_before}
        timings["infer+submit"] = time.time() - started - timings["start"]

        # the PACS now holds, in each study, an RTSTRUCT and a SEG on the CT's own instances
        pacs = DICOMwebClient(orthanc["dicomweb"])
        for image_id, name in by_uid.items():
            geo = geometry[name]
            found = {ds.Modality: ds.SeriesInstanceUID for ds in _qido(orthanc["dicomweb"], f"studies/{geo.study_uid}/series")}
            assert set(found) == {"CT", "RTSTRUCT", "SEG"}, found
            expected = to_series_grid(accepted[image_id], nib.load(cache / f"{image_id}.nii.gz").affine, geo)
            present = {n for n, v in STORED_LABELS.items() if (expected == v).any()}
            for modality in ("SEG", "RTSTRUCT"):
                (inst,) = pacs.search_for_instances(geo.study_uid, found[modality])
                uid = pydicom.Dataset.from_json(inst).SOPInstanceUID
                path = tmp_path / f"{modality}_{name}.dcm"
                pacs.retrieve_instance(geo.study_uid, found[modality], uid, media_types=(("application/dicom", "*"),)).save_as(str(path))
                if modality == "SEG":
                    back, numbers = read_seg(path, series[name])
                    assert set(numbers) == present, (numbers, present)  # segments named by structure
                    for structure, number in numbers.items():
                        np.testing.assert_array_equal(back == number, expected == STORED_LABELS[structure], err_msg=structure)
                else:
                    back, mapped, unmapped = read_rtstruct(path, series[name], STORED_LABELS)
                    np.testing.assert_array_equal(back, expected)
                    assert pydicom.dcmread(str(path)).ApprovalStatus == "UNAPPROVED"

        # retrain on the cache's final labels: fine-tunes the served model on one case, validates
        # on the other, and publishes because it is better than the re-initialised one
        client.train_start("oar", {"max_epochs": 6, "lr": 3e-3, "samples_per_volume": 16})
        status = wait_for_training(url)
        assert status["status"] == "DONE", status
        history = client.info()["train_stats"]["oar"]["history"]
        published = history[-1]
        assert published["published"] is True, history
        assert published["val_dice"] >= published["served_val_dice"], published
        assert published["gate_cases"] == 1

        # infer again: the new model answers (a new model_version), on the same grid
        dice = {}
        for image_id, name in by_uid.items():
            result_file, params = client.infer("oar", image_id, {})
            assert params["model_version"] != served_before
            assert params["model_version"] == model_version(app / "model" / "synthetic" / "oar.pt")
            after = nib.load(result_file)
            assert after.shape == geometry[name].shape and np.allclose(after.affine, nib.load(cache / f"{image_id}.nii.gz").affine, atol=1e-4)
            truth = to_model(accepted[image_id], "oar")
            dice[name] = (_dice(first[image_id][0], truth), _dice(np.asanyarray(after.dataobj), truth))
        assert sum(d[1] for d in dice.values()) > sum(d[0] for d in dice.values()), dice  # closer to the truth than before
        timings["train+infer"] = time.time() - started - timings["start"] - timings["infer+submit"]
    finally:
        stop_process(proc)
    timings["total"] = time.time() - started
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()}, "oar Dice before/after the retrain:",
          {k: tuple(round(x, 3) for x in v) for k, v in dice.items()}, "gate:", published["reason"])

    # a new cache (a new machine, or the cache deleted) gets the final labels back from the PACS
    from contourcl.serving.dicomweb import open_pacs

    store = open_pacs(orthanc["dicomweb"], tmp_path / "fresh-app", {}, extensions=("*.nii.gz",), auto_reload=False)
    assert set(store.get_labeled_images("final")) == set(by_uid)
    for image_id in by_uid:
        again = np.asanyarray(nib.load(store.get_label_uri(image_id, "final")).dataobj)
        np.testing.assert_array_equal(again, accepted[image_id])
        assert store.get_label_info(image_id, "final")["imported_from_pacs"]


def test_a_failed_send_is_answered_and_retried(orthanc, tmp_path):
    """The PACS does not take a STOW-RS: the label is kept in the cache, the client gets 502, and
    the next refresh stores the contours. Then the local datastore's checks, on a PACS image."""
    from fastapi import HTTPException

    from contourcl.serving.dicomweb import open_pacs

    ct, truth, affine = make_phantom(31, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    files = write_ct_series(ct, affine, tmp_path / "series", patient_id="phantom_send")
    _upload(orthanc["url"], files)
    geo = read_series_geometry(tmp_path / "series")
    store = open_pacs(orthanc["dicomweb"], tmp_path / "app", {"dicomweb_import_seg": "none"}, extensions=("*.nii.gz",), auto_reload=False)
    image_id = geo.series_uid
    assert image_id in store.list_images()
    image = nib.load(store.get_image_uri(image_id))
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), image.affine), str(tmp_path / "label.nii.gz"))

    real = store.mirror.client.store_instances

    def down(*args, **kwargs):
        raise requests.ConnectionError("connection refused (test)")

    store.mirror.client.store_instances = down
    with pytest.raises(HTTPException) as err:
        store.save_label(image_id, str(tmp_path / "label.nii.gz"), "final", {})
    assert err.value.status_code == 502 and "stored in the cache" in err.value.detail and orthanc["dicomweb"] in err.value.detail
    assert store.get_label_uri(image_id, "final") and len(store.mirror.pending()) == 1
    assert store.studies_status()["pending_exports"] == 1

    store.mirror.client.store_instances = real
    store.refresh_studies(force=True, wait=True)
    assert store.mirror.pending() == []
    modalities = {ds.Modality for ds in _qido(orthanc["dicomweb"], f"studies/{geo.study_uid}/series")}
    assert modalities == {"CT", "RTSTRUCT", "SEG"}

    # a corrected final label, numbered as Slicer numbers it: renamed by structure, the replaced
    # one kept in the history, and a second RTSTRUCT + SEG stored (the first stays in the PACS)
    slicer = np.zeros_like(truth, dtype=np.uint8)
    slicer[truth == STORED_LABELS["Mandible"]] = 1
    slicer[truth == STORED_LABELS["Parotid_L"]] = 2
    nib.save(nib.Nifti1Image(slicer, image.affine), str(tmp_path / "corrected.nii.gz"))
    store.save_label(image_id, str(tmp_path / "corrected.nii.gz"), "final",
                     {"label_info": [{"name": "Mandible", "idx": 1}, {"name": "Parotid_L", "idx": 2}]})
    stored = np.asanyarray(nib.load(store.get_label_uri(image_id, "final")).dataobj)
    assert set(np.unique(stored)) == {0, STORED_LABELS["Mandible"], STORED_LABELS["Parotid_L"]}
    assert len(list((store.mirror.cache / ".contourcl" / "label-history" / "final").glob(f"{image_id}.*.nii.gz"))) == 1
    segs = [ds for ds in _qido(orthanc["dicomweb"], f"studies/{geo.study_uid}/series") if ds.Modality == "SEG"]
    assert len(segs) == 2

    # a label off the image's grid is refused before anything is written or sent
    nib.save(nib.Nifti1Image(slicer[:, :, :-1], image.affine), str(tmp_path / "wrong.nii.gz"))
    with pytest.raises(HTTPException) as err:
        store.save_label(image_id, str(tmp_path / "wrong.nii.gz"), "final", {})
    assert err.value.status_code == 422
    assert len([ds for ds in _qido(orthanc["dicomweb"], f"studies/{geo.study_uid}/series") if ds.Modality == "SEG"]) == 2


def test_server_start_names_a_pacs_that_does_not_answer(tmp_path, app_sandbox):
    """A PACS that does not answer stops the start with an error naming its URL (not an empty datastore)."""
    app, _ = app_sandbox(tmp_path, weights=(), studies=False)
    pacs = f"http://127.0.0.1:{free_port()}/dicom-web"
    log = tmp_path / "server.log"
    proc, _ = start_monailabel(app, pacs, {"models": "oar"}, log, cwd=tmp_path, env=ONE_THREAD)
    try:
        proc.wait(180)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        pytest.fail(f"the server started on a PACS that does not answer:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode != 0
    assert f"the DICOMweb server {pacs} does not answer" in text, text[-3000:]
