"""Final labels pushed to a planning system by C-STORE, through the real server (issue 33, item 4).

``monailabel start_server`` on a studies folder of DICOM series with ``--conf dicom_push
TPS@127.0.0.1:<port>`` while nothing listens there: a final label is saved at once, ``/info/``
names the node that does not answer and the send waiting; then a storage SCP (pynetdicom, in a
thread) starts on that port, the retry sends the RT Structure Set, and it reads back as the label.
In-process, with the refusals and the restart: ``tests/unit/test_dicom_push.py``.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client import MONAILabelClient
from pynetdicom import AE, StoragePresentationContexts, evt

from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import read_rtstruct
from contourcl.testing import REPO, free_port, start_monailabel, stop_process, wait_until_serving, write_dicom_studies

pytestmark = pytest.mark.timeout(300)


def test_a_final_label_reaches_the_planning_system_once_it_is_up(tmp_path):
    studies = write_dicom_studies(tmp_path)
    port = free_port()
    node = f"TPS@127.0.0.1:{port}"
    conf = {"models": "oar", "weights": "synthetic", "skip_trainers": "true", "skip_strategies": "true", "skip_scoring": "true",
            "dicom_push": node, "dicom_push_retry_s": 0.5, "dicom_push_retry_max_s": 1}
    log = tmp_path / "server.log"
    proc, url = start_monailabel(REPO / "apps" / "radonc", studies, conf, log, cwd=tmp_path)
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = tmp_path / f"received_{len(received)}.dcm"
        ds.save_as(str(path), write_like_original=False)
        received.append(path)
        return 0x0000

    ae = AE(ae_title="TPS")
    ae.supported_contexts = StoragePresentationContexts
    scp = None
    try:
        wait_until_serving(proc, url, log)
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        assert client.info()["dicom_push"][node]["pending"] == 0
        image_id = "patient_a"
        image = nib.load(str(studies / f"{image_id}.nii.gz"))
        label = np.zeros(image.shape, np.uint8)
        x, y, z = (s // 2 for s in image.shape)
        label[x - 8:x + 8, y - 6:y + 6, 1:-1] = STORED_LABELS["Mandible"]
        label[x - 3:x + 3, y + 8:y + 12, 2:-2] = STORED_LABELS["SpinalCord"]
        label_file = tmp_path / "final.nii.gz"
        nib.save(nib.Nifti1Image(label, image.affine), str(label_file))

        t0 = time.monotonic()
        client.save_label(image_id, str(label_file), tag="final", params={})  # the planning system is down
        saved_s = time.monotonic() - t0
        assert (studies / "labels" / "final" / f"{image_id}.nii.gz").is_file()
        deadline = time.time() + 30
        while (state := requests.get(f"{url}/info/", timeout=30).json()["dicom_push"][node])["last_error"] is None:
            assert time.time() < deadline, state
            time.sleep(0.2)
        assert node in state["last_error"] and "does not answer" in state["last_error"] and state["pending"] == 1, state

        scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        deadline = time.time() + 30
        while (state := requests.get(f"{url}/info/", timeout=30).json()["dicom_push"][node])["pending"]:
            assert time.time() < deadline, state
            time.sleep(0.2)
        assert state["last_ok"] and state["sent"] == 1, state
        (rtstruct,) = received
        assert pydicom.dcmread(str(rtstruct)).Modality == "RTSTRUCT"
        back, _, unmapped = read_rtstruct(rtstruct, studies / image_id, STORED_LABELS)
        assert not unmapped
        for name in ("Mandible", "SpinalCord"):
            v = STORED_LABELS[name]
            dice = 2 * ((back == v) & (label == v)).sum() / ((back == v).sum() + (label == v).sum())
            assert dice >= 0.9, (name, dice)
        assert saved_s < 10, f"saving the label waited for the push ({saved_s:.1f} s)"
        assert f"sent to {node}" in log.read_text()
    finally:
        if scp is not None:
            scp.shutdown()
        stop_process(proc)
