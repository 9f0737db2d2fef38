"""Final labels pushed to a planning system by C-STORE (issue 33, items 4 and 6).

A real C-STORE receiver (pynetdicom's storage SCP in a thread, on 127.0.0.1 and a free port)
takes what :mod:`contourcl.serving.dicom_push` sends after a final label is stored in a real
:class:`~contourcl.serving.datastore.SafeDatastore` on a studies folder holding a DICOM CT
series. The received RT Structure Set is read back with the project's rasterizer
(:func:`contourcl.data.rtstruct.read_rtstruct`) and compared with the label, structure by structure.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from contourcl.data.dicom_series import write_ct_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.phantom import make_phantom
from contourcl.data.rtstruct import read_rtstruct, to_series_grid
from contourcl.errors import ConfigError
from contourcl.serving.datastore import SafeDatastore
from contourcl.serving.dicom_push import DicomPush, Node, parse_nodes
from contourcl.serving.series import ingest_series, read_registry
from contourcl.testing import free_port

FAST = {"retry_s": 0.2, "retry_max_s": 0.5, "timeout_s": 5}


class Receiver:
    """A storage SCP (AE title ``TPS``) that keeps what it is sent; it checks the called AE title."""

    def __init__(self, folder, port: int, ae_title: str = "TPS"):
        self.folder, self.port, self.received = folder, port, []
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = StoragePresentationContexts  # RT Structure Set and SEG among them
        self.ae.require_called_aet = True
        self.server = None

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(path), write_like_original=False)
        self.received.append(path)
        return 0x0000

    def start(self):
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self):
        """Shut the server down, waiting at most 10 s: pynetdicom's shutdown once hung in this
        suite (a refused association's thread); the socket is closed either way."""
        if self.server is not None:
            stopping = threading.Thread(target=self.server.shutdown, daemon=True)
            stopping.start()
            stopping.join(10)
            if stopping.is_alive():
                self.server.server_close()
            self.server = None


@pytest.fixture
def studies(tmp_path):
    """A studies folder with one phantom CT series, ingested; ``(store, image_id, series folder, truth)``."""
    root = tmp_path / "studies"
    ct, truth, affine = make_phantom(31, shape=(64, 64, 32), spacing=(4.0, 4.0, 9.0))  # all eight structures
    write_ct_series(ct, affine, root / "patient" / "ct", patient_id="PUSH-1")
    ingest_series(root)
    (image_id,) = read_registry(root)["images"]
    image = nib.load(str(root / f"{image_id}.nii.gz"))
    label = to_series_grid(truth, affine, SimpleNamespace(shape=image.shape, affine=image.affine)).astype(np.uint8)
    label_file = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(label, image.affine), str(label_file))
    store = SafeDatastore(str(root), extensions=("*.nii.gz",), auto_reload=False, dicom_export=True)
    return SimpleNamespace(root=root, store=store, image_id=image_id, series=root / "patient" / "ct", label=label, label_file=label_file)


def _wait(condition, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _dice_per_structure(a, b) -> dict[str, float]:
    return {name: 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())
            for name, v in STORED_LABELS.items() if (b == v).any()}


def test_nodes_are_read_from_the_conf():
    assert parse_nodes("TPS@10.0.0.5:104, PACS_2@pacs.hospital.example:11112") == [
        Node("TPS", "10.0.0.5", 104), Node("PACS_2", "pacs.hospital.example", 11112)]
    assert parse_nodes("TPS@[::1]:104") == [Node("TPS", "::1", 104)]
    for bad in ("", "TPS", "TPS@host", "TPS@host:0", "TPS@host:70000", "@host:104", "A_TITLE_TOO_LONG_X@h:104",
                "TPS@host:104,", "TP\\S@host:104", "TPS@ho st:104"):
        if bad == "TPS@host:104,":  # a trailing comma is harmless
            assert parse_nodes(bad) == [Node("TPS", "host", 104)]
            continue
        with pytest.raises(ConfigError, match="dicom_push"):
            parse_nodes(bad)
    with pytest.raises(ConfigError, match="dicom_push_retry_s"):
        DicomPush.from_conf({"dicom_push": "TPS@h:104", "dicom_push_retry_s": "soon"}, None, "/tmp", start=False)
    assert DicomPush.from_conf({}, None, "/tmp") is None


def test_the_rtstruct_reaches_a_receiver_that_was_down_and_matches_the_label(studies, tmp_path, caplog):
    port = free_port()
    receiver = Receiver(tmp_path / "received", port)
    push = DicomPush([Node("TPS", "127.0.0.1", port)], studies.store, studies.root, send_seg=True, **FAST)
    studies.store.final_label_listeners.append(push.on_final_label)
    try:
        caplog.set_level(logging.INFO, logger="contourcl.serving.dicom_push")
        # the receiver is down: the label is saved at once all the same, and the send waits
        t0 = time.monotonic()
        studies.store.save_label(studies.image_id, str(studies.label_file), "final", {})
        saved_s = time.monotonic() - t0
        stored = np.asarray(nib.load(studies.store.get_label_uri(studies.image_id, "final")).dataobj)
        assert np.array_equal(stored, studies.label)
        node = f"TPS@127.0.0.1:{port}"
        assert _wait(lambda: push.status()[node]["last_error"] is not None, 20), push.status()
        state = push.status()[node]
        assert node in state["last_error"] and "does not answer" in state["last_error"], state
        assert state["pending"] == 1 and state["pending_images"] == [studies.image_id] and state["last_ok"] is None
        assert saved_s < 5, f"saving waited for the push ({saved_s:.1f} s)"
        assert (studies.root / ".contourcl" / "dicom_push.json").is_file()  # kept for a restart

        receiver.start()  # the node comes back: the next retry sends
        assert push.wait_idle(30), push.status()
        state = push.status()[node]
        assert state["pending"] == 0 and state["last_ok"] and state["sent"] == 2, state
        assert any("sent to " + node in r.getMessage() for r in caplog.records)
        modalities = sorted(pydicom.dcmread(str(p)).Modality for p in receiver.received)
        assert modalities == ["RTSTRUCT", "SEG"], receiver.received

        (rtstruct,) = [p for p in receiver.received if p.name.startswith("RTSTRUCT")]
        back, mapped, unmapped = read_rtstruct(rtstruct, studies.series, STORED_LABELS)
        assert not unmapped and back.shape == studies.label.shape
        dice = _dice_per_structure(back, studies.label)
        assert len(dice) == 8 and min(dice.values()) >= 0.9, dice
        assert set(np.unique(back)) == set(np.unique(studies.label))
    finally:
        push.close()
        receiver.stop()


def test_a_node_that_refuses_is_named_and_the_send_kept(studies, tmp_path):
    port = free_port()
    receiver = Receiver(tmp_path / "received", port, ae_title="OTHER_AE").start()  # it answers to another AE title
    push = DicomPush([Node("TPS", "127.0.0.1", port)], studies.store, studies.root, **FAST)
    studies.store.final_label_listeners.append(push.on_final_label)
    try:
        studies.store.save_label(studies.image_id, str(studies.label_file), "final", {})
        node = f"TPS@127.0.0.1:{port}"
        assert _wait(lambda: (push.status()[node]["last_error"] or "").count("refused") > 0, 20), push.status()
        assert node in push.status()[node]["last_error"] and push.status()[node]["pending"] == 1
        assert not receiver.received
    finally:
        push.close()
        receiver.stop()


def test_sends_not_done_survive_a_restart_and_a_newer_label_replaces_an_older_send(studies, tmp_path):
    port = free_port()
    push = DicomPush([Node("TPS", "127.0.0.1", port)], studies.store, studies.root, **FAST)
    studies.store.final_label_listeners.append(push.on_final_label)
    try:
        studies.store.save_label(studies.image_id, str(studies.label_file), "final", {})
        first = push.files_of(studies.image_id)
        time.sleep(1.1)  # the export's file names carry the time
        studies.store.save_label(studies.image_id, str(studies.label_file), "final", {})
        newest = push.files_of(studies.image_id)
        assert newest != first
        assert _wait(lambda: push.status()[f"TPS@127.0.0.1:{port}"]["last_error"] is not None, 20)
        assert push.status()[f"TPS@127.0.0.1:{port}"]["pending"] == 1  # one send per image and node: the newest
    finally:
        push.close()
    studies.store.final_label_listeners.clear()

    receiver = Receiver(tmp_path / "received", port).start()
    again = DicomPush([Node("TPS", "127.0.0.1", port)], studies.store, studies.root, **FAST)  # a restarted server
    try:
        assert again.wait_idle(30), again.status()
        (got,) = receiver.received
        assert str(pydicom.dcmread(str(got)).SOPInstanceUID) == str(pydicom.dcmread(newest[0]).SOPInstanceUID)
    finally:
        again.close()
        receiver.stop()


def test_the_listener_never_blocks_or_raises(studies):
    """A push whose label info cannot be read logs and returns; the label is saved."""

    class Broken:
        def get_label_info(self, *args):
            raise OSError("disk gone")

    push = DicomPush([Node("TPS", "127.0.0.1", free_port())], Broken(), studies.root, start=False, **FAST)
    done = threading.Event()
    threading.Thread(target=lambda: (push.on_final_label("x", None), done.set()), daemon=True).start()
    assert done.wait(5) and push.status()[str(push.nodes[0])]["pending"] == 0
