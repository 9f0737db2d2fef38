"""Crash-consistent, serialised label and image storage against the real server (issue 28, items 3, 4, 9).

The real ``monailabel start_server`` runs on a copy of the app and of ``sample-data`` (127.0.0.1, a
free port, ``--conf models oar``, no background scoring or strategies), started in a session of its
own and stopped by its PID. The studies folder is a small tmpfs where ``mount -t tmpfs`` works (as
root), so that the disk can really be filled; elsewhere it is an ordinary folder and the full-disk
test is skipped, saying why. The server's faults (:func:`contourcl.files.fault`) come from a file
(``CONTOURCL_FAULTS_FILE``) that the tests rewrite, so one server serves several fault points.

- :func:`test_unknown_ids_are_404`: ``DELETE /datastore/image?id=nosuch`` and
  ``PUT /datastore/image/info?image=nosuch`` answer 404 naming the id (not 500).
- :func:`test_kill9_at_each_step_of_a_label_save`: the server is killed (``kill -9`` by the fault
  point itself) at each step of a ``PUT /datastore/label`` and restarted on the same folders: the
  final label is the old one (killed before the rename) or the new one (after), its label info
  describes exactly that file's voxels (and names its sha256), nothing is 0 bytes, no temporary
  file or journal entry is left, the replaced label is in the history, and a second save works.
  Then the same for an image upload killed between the rename and the registration.
- :func:`test_full_or_read_only_disk_at_each_step`: a write failing with ``ENOSPC``/``EROFS`` at each
  step of a label save and an image upload: 507/503 naming the disk, the label and its info as
  they were, no temporary file, no history copy or journal entry, no image registered; the same
  upload succeeds once the disk takes writes again.
- :func:`test_a_removed_image_keeps_its_labels`: ``DELETE /datastore/image`` first copies the
  image's final label into the label history; refused with a full disk (507), it removes nothing.
- :func:`test_concurrent_saves_keep_every_submission`: 4 threads x 10 rounds of simultaneous saves
  on one image: every submission is the current label or in the history, none is 0 bytes, and
  the current file and its info agree.
- :func:`test_detached_nrrd_and_special_files_are_refused`: a NRRD header whose voxels are in
  another file (``data file:`` and ``datafile:``) is refused 422 and nothing is stored; a FIFO put
  into the studies folder is refused 422 without hanging a request.
- :func:`test_really_full_disk`: the studies tmpfs filled with a file: a label save and an image
  upload answer 507 naming the full disk, the old label and info are intact, no temporary file
  is left and no image is registered; with the space freed, the same upload succeeds (no 409).

The tests share one server (and restart it) and run in this order; about 2-3 minutes in all here.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from contourcl.data.labels import STORED_LABELS, stored_label_info
from contourcl.testing import sandbox, start_monailabel, stop_process, wait_until_serving

pytestmark = pytest.mark.timeout(400)
IMAGE = "synthetic_hn_000"
#: the stored value marking which submission a label is: that many voxels along one corner line
MARK = STORED_LABELS["Brainstem"]
LABEL_POINTS = ["label-temp-written", "label-history-kept", "label-pending-written", "label-renamed", "label-info-written"]
#: the points after which the new label is in place: a kill there must leave the new label
AFTER_RENAME = {"label-renamed", "label-info-written"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Server:
    """The real server on one copy of the app and the studies (restartable on the same folders)."""

    def __init__(self, root: Path):
        self.root = root
        self.studies = root / "studies"
        self.app = root / "radonc"
        self.work = root / "client"
        self.faults = root / "faults"
        self.studies.mkdir()
        self.tmpfs, self.tmpfs_reason = self._mount_tmpfs()
        # self.app and, into the (maybe mounted) self.studies, the sample data with any "original" folder
        sandbox(root, weights=("oar.pt", "gtv.pt"), studies_ignore=("datastore_v2.json", ".lock", "README.md", ".contourcl"))
        self.work.mkdir()
        self.faults.write_text("")
        self.procs: list[subprocess.Popen] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = root / "server-0.log"
        image = nib.load(self.studies / f"{IMAGE}.nii.gz")
        self.affine = image.affine
        self.truth = np.asanyarray(nib.load(self.studies / "labels" / "final" / f"{IMAGE}.nii.gz").dataobj).astype(np.uint8)

    def _mount_tmpfs(self) -> tuple[bool, str]:
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(self.studies)], check=False, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, f"mount -t tmpfs is not possible here: {err}"
        if done.returncode != 0:
            return False, f"mount -t tmpfs failed here (not root, or in a container without CAP_SYS_ADMIN): {done.stderr.strip()}"
        return True, ""

    def start(self) -> None:
        self.log_path = self.root / f"server-{len(self.procs)}.log"
        env = {"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "CONTOURCL_FAULTS_FILE": str(self.faults),
               "CONTOURCL_FAULTS": None}
        conf = {"models": "oar", "skip_scoring": "true", "skip_strategies": "true"}
        self.proc, self.url = start_monailabel(self.app, self.studies, conf, self.log_path, cwd=self.root, env=env, new_session=True)
        self.procs.append(self.proc)
        wait_until_serving(self.proc, self.url, self.log_path, 180)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=20)

    def unmount(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.studies)], check=False, capture_output=True, timeout=30)

    # -- labels ------------------------------------------------------------------------------
    def label_file(self, number: int, structures: tuple[str, ...] = ("Mandible",)) -> tuple[Path, dict]:
        """Submission ``number``: ``structures`` of the sample label, and ``number`` voxels of
        :data:`MARK` along one corner line (how :meth:`which` tells submissions apart)."""
        label = np.where(np.isin(self.truth, [STORED_LABELS[s] for s in structures]), self.truth, 0).astype(np.uint8)
        label[0, 0, :number] = MARK
        path = self.work / f"label-{number}-{'-'.join(structures)}.nii.gz"
        nib.save(nib.Nifti1Image(label, self.affine), str(path))
        names = [*structures, "Brainstem"]
        return path, {"label_info": [{"name": n, "idx": STORED_LABELS[n]} for n in names]}

    def put_label(self, number: int, structures: tuple[str, ...] = ("Mandible",), timeout: float = 120, image: str = IMAGE) -> requests.Response:
        path, params = self.label_file(number, structures)
        with open(path, "rb") as f:
            return requests.put(f"{self.url}/datastore/label", params={"image": image, "tag": "final"},
                                files={"label": (path.name, f)}, data={"params": json.dumps(params)}, timeout=timeout)

    @property
    def final(self) -> Path:
        return self.studies / "labels" / "final" / f"{IMAGE}.nii.gz"

    @property
    def history(self) -> Path:
        return self.studies / ".contourcl" / "label-history" / "final"

    def history_files(self) -> list[Path]:
        return sorted(self.history.glob(f"{IMAGE}.*.nii.gz")) if self.history.is_dir() else []

    @staticmethod
    def which(path: Path) -> int:
        """The submission a stored label file is (its number of corner voxels)."""
        arr = np.asanyarray(nib.load(path).dataobj)
        return int(np.count_nonzero(arr[0, 0, :] == MARK))

    def info(self) -> dict:
        r = requests.get(f"{self.url}/datastore/label/info", params={"label": IMAGE, "tag": "final"}, timeout=60)
        assert r.ok, r.text[:300]
        return r.json()

    def assert_consistent(self) -> int:
        """The final label is readable, its info (served and in datastore_v2.json) describes its
        voxels and names its sha256; nothing stored is 0 bytes; no temporary file or journal entry is
        left. Returns which submission it is."""
        voxels = np.asanyarray(nib.load(self.final).dataobj)
        expected = stored_label_info(voxels)
        on_disk = json.loads((self.studies / "datastore_v2.json").read_text())["objects"][IMAGE]["labels"]["final"]["info"]
        for info in (self.info(), on_disk):
            assert info.get("label_info") == expected, f"the label info {info.get('label_info')} does not describe the file's voxels {expected}"
            assert info.get("sha256") == _sha(self.final), "the label info names another file's sha256"
        empty = [str(p) for p in self.studies.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != ".lock"]
        assert not empty, f"0-byte files: {empty}"
        temps = [str(p) for p in self.studies.rglob("*.tmp")]
        assert not temps, f"temporary files left: {temps}"
        pending = self.studies / ".contourcl" / "pending"
        assert not (pending.is_dir() and any(pending.iterdir())), f"journal entries left: {list(pending.iterdir())}"
        return self.which(self.final)

    def wait_dead(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not die at the fault point:\n{self.log_tail()}") from None


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("storage"))
    try:
        server.start()
        yield server
    finally:
        server.stop_all()
        server.unmount()


def _ensure_running(srv: Server) -> None:
    if srv.proc is None or srv.proc.poll() is not None:
        srv.faults.write_text("")
        srv.start()


def test_unknown_ids_are_404(srv):
    r = requests.delete(f"{srv.url}/datastore/image", params={"id": "nosuch"}, timeout=60)
    assert r.status_code == 404 and "nosuch" in r.json()["detail"], (r.status_code, r.text[:300])
    r = requests.put(f"{srv.url}/datastore/image/info", params={"image": "nosuch"}, data={"info": "{}"}, timeout=60)
    assert r.status_code == 404 and "nosuch" in r.json()["detail"], (r.status_code, r.text[:300])


def test_kill9_at_each_step_of_a_label_save(srv):
    _ensure_running(srv)
    number = 1
    r = srv.put_label(number)
    assert r.ok, r.text[:300]
    assert srv.assert_consistent() == number
    for point in ["label-pending-written", "label-renamed", "label-info-written"]:
        old, new = number, number + 1
        history = set(srv.history_files())
        srv.faults.write_text(f"{point}=kill")
        with pytest.raises(requests.ConnectionError):
            srv.put_label(new, ("Mandible", "Parotid_L"))  # another set of structures: stale info shows
        assert srv.wait_dead() == -signal.SIGKILL
        srv.faults.write_text("")
        srv.start()
        now = srv.assert_consistent()
        assert now == (new if point in AFTER_RENAME else old), f"killed at {point}: the final label is submission {now}"
        added = [p for p in srv.history_files() if p not in history]  # by name, not by where they sort
        assert {srv.which(p) for p in added} >= {old}, f"killed at {point}: the replaced label is not in the history"
        number = new + 1
        r = srv.put_label(number)
        assert r.ok, f"killed at {point}: a second save fails: {r.text[:300]}"
        assert srv.assert_consistent() == number

    # an image upload killed between the rename and the registration: a whole image after the restart
    source = srv.studies / "synthetic_hn_003.nii.gz"
    srv.faults.write_text("image-renamed=kill")
    with pytest.raises(requests.ConnectionError), open(source, "rb") as f:
        requests.put(f"{srv.url}/datastore/image", params={"image": "killed_upload"}, files={"file": ("killed_upload.nii.gz", f)}, timeout=120)
    assert srv.wait_dead() == -signal.SIGKILL
    srv.faults.write_text("")
    srv.start()
    assert not list(srv.studies.glob(".*.tmp"))
    with open(source, "rb") as f:
        r = requests.put(f"{srv.url}/datastore/image", params={"image": "killed_upload"}, files={"file": ("killed_upload.nii.gz", f)}, timeout=120)
    assert r.status_code in (200, 409), r.text[:300]
    r = requests.get(f"{srv.url}/datastore/image", params={"image": "killed_upload"}, timeout=60)
    assert r.ok and r.content == source.read_bytes(), "the uploaded image is not stored whole"


def _disk_state(srv: Server) -> dict:
    return {"label": srv.final.read_bytes(), "info": srv.info(), "history": [p.name for p in srv.history_files()],
            "images": sorted(p.name for p in srv.studies.iterdir()), "temps": sorted(str(p) for p in srv.studies.rglob("*.tmp")),
            "pending": sorted(str(p) for p in (srv.studies / ".contourcl").rglob("pending/*"))}


def test_full_or_read_only_disk_at_each_step(srv):
    _ensure_running(srv)
    number = 40
    assert srv.put_label(number).ok
    before = _disk_state(srv)
    try:
        for point in LABEL_POINTS + ["datastore-file-temp-written"]:
            for action, code, words in (("enospc", 507, "the disk is full"), ("erofs", 503, "the disk refuses writes")):
                srv.faults.write_text(f"{point}={action}")
                r = srv.put_label(number + 1, ("Mandible", "Parotid_L"))
                assert r.status_code == code and words in r.json()["detail"], (point, action, r.status_code, r.text[:300])
                srv.faults.write_text("")
                assert _disk_state(srv) == before, f"{point}={action} changed what is stored"
        source = srv.studies / "synthetic_hn_004.nii.gz"
        for point in ["image-temp-written", "image-renamed", "image-registered"]:
            srv.faults.write_text(f"{point}=enospc")
            with open(source, "rb") as f:
                r = requests.put(f"{srv.url}/datastore/image", params={"image": "faulty_upload"}, files={"file": ("faulty_upload.nii.gz", f)}, timeout=120)
            assert r.status_code == 507 and "the disk is full" in r.json()["detail"], (point, r.status_code, r.text[:300])
            srv.faults.write_text("")
            assert requests.get(f"{srv.url}/datastore/image", params={"image": "faulty_upload"}, timeout=60).status_code == 404, point
            assert _disk_state(srv) == before, f"{point}=enospc changed what is stored"
    finally:
        srv.faults.write_text("")
    with open(source, "rb") as f:
        r = requests.put(f"{srv.url}/datastore/image", params={"image": "faulty_upload"}, files={"file": ("faulty_upload.nii.gz", f)}, timeout=120)
    assert r.ok, f"the upload fails once the disk takes writes again: {r.status_code} {r.text[:300]}"


def test_a_removed_image_keeps_its_labels(srv):
    _ensure_running(srv)
    with open(srv.studies / f"{IMAGE}.nii.gz", "rb") as f:  # a copy of IMAGE: the same grid as its labels
        assert requests.put(f"{srv.url}/datastore/image", params={"image": "removable"}, files={"file": ("removable.nii.gz", f)}, timeout=120).ok
    assert srv.put_label(7, image="removable").ok
    label = srv.studies / "labels" / "final" / "removable.nii.gz"
    stored = label.read_bytes()
    srv.faults.write_text("image-labels-kept=enospc")
    try:
        r = requests.delete(f"{srv.url}/datastore/image", params={"id": "removable"}, timeout=60)
    finally:
        srv.faults.write_text("")
    assert r.status_code == 507 and "the disk is full" in r.json()["detail"], (r.status_code, r.text[:300])
    assert label.read_bytes() == stored and (srv.studies / "removable.nii.gz").is_file(), "a refused removal removed files"
    assert not list(srv.history.glob("removable.*")), "a refused removal left copies in the label history"
    assert requests.get(f"{srv.url}/datastore/image", params={"image": "removable"}, timeout=60).ok
    r = requests.delete(f"{srv.url}/datastore/image", params={"id": "removable"}, timeout=60)
    assert r.ok, r.text[:300]
    assert not label.exists() and not (srv.studies / "removable.nii.gz").exists()
    assert requests.get(f"{srv.url}/datastore/image", params={"image": "removable"}, timeout=60).status_code == 404
    kept = [p.read_bytes() for p in srv.history.glob("removable.*.nii.gz")]
    assert stored in kept, "the final label of the removed image is not in the label history"


def test_concurrent_saves_keep_every_submission(srv):
    _ensure_running(srv)
    threads, rounds = 4, 10
    known = set(srv.history_files())
    first = 4  # submissions 4..43: that many marker voxels each, all distinct
    barrier = threading.Barrier(threads)

    def submit(t: int) -> list[tuple[int, int]]:
        answers = []
        for k in range(rounds):
            number = first + k * threads + t
            barrier.wait(timeout=120)
            answers.append((number, srv.put_label(number).status_code))
        return answers

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = [a for f in [pool.submit(submit, t) for t in range(threads)] for a in f.result()]
    assert all(code == 200 for _, code in answers), answers
    submitted = {n for n, _ in answers}
    new_history = [p for p in srv.history_files() if p not in known]
    empty = [p.name for p in new_history if p.stat().st_size == 0]
    assert not empty, f"0-byte history copies: {empty}"
    found = {srv.which(p) for p in new_history} | {srv.which(srv.final)}
    assert submitted <= found, f"submissions in neither the current label nor the history: {sorted(submitted - found)}"
    assert srv.assert_consistent() in submitted


def test_detached_nrrd_and_special_files_are_refused(srv):
    _ensure_running(srv)
    ct = np.asanyarray(nib.load(srv.studies / "synthetic_hn_005.nii.gz").dataobj).astype("<i2")
    outside = srv.work / "outside.raw"
    outside.write_bytes(ct.tobytes(order="F"))
    for field in ("data file", "datafile"):
        header = srv.work / "detached.nrrd"
        header.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {' '.join(map(str, ct.shape))}\nspace: left-posterior-superior\n"
                          f"space directions: (2,0,0) (0,2,0) (0,0,2.5)\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n{field}: {outside}\n\n")
        with open(header, "rb") as f:
            r = requests.put(f"{srv.url}/datastore/image", params={"image": "detached"}, files={"file": ("detached.nrrd", f)}, timeout=120)
        assert r.status_code == 422 and "data file" in r.json()["detail"], (field, r.status_code, r.text[:300])
        assert not list(srv.studies.glob("detached*")) and not list(srv.studies.glob(".detached*"))
        assert requests.get(f"{srv.url}/datastore/image", params={"image": "detached"}, timeout=60).status_code == 404

    fifo = srv.studies / "fifo_case.nii.gz"
    os.mkfifo(fifo)
    try:
        deadline = time.time() + 40
        while True:  # MONAI Label's folder watcher registers the file first (404 until then)
            r = requests.post(f"{srv.url}/infer/oar", params={"image": "fifo_case", "output": "json"}, timeout=30)
            if r.status_code != 404 or time.time() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 422 and "FIFO" in r.json()["detail"], (r.status_code, r.text[:300])
        r = requests.get(f"{srv.url}/datastore/image", params={"image": "fifo_case"}, timeout=30)
        assert r.status_code == 422 and "FIFO" in r.json()["detail"], (r.status_code, r.text[:300])
        assert requests.get(f"{srv.url}/info/", timeout=30).ok
    finally:
        fifo.unlink()


def test_really_full_disk(srv):
    if not srv.tmpfs:
        pytest.skip(srv.tmpfs_reason)
    _ensure_running(srv)
    number = 60
    assert srv.put_label(number).ok
    before = _disk_state(srv)
    filler = srv.studies / "filler.bin"
    try:
        with open(filler, "wb", buffering=0) as f:
            for size in (1 << 20, 1 << 12, 1):  # to the last byte
                try:
                    while f.write(b"\0" * size):
                        pass
                except OSError:
                    pass
        before["images"] = sorted(p.name for p in srv.studies.iterdir())
        r = srv.put_label(number + 1, ("Mandible", "Parotid_L"))
        assert r.status_code == 507 and "the disk is full" in r.json()["detail"], (r.status_code, r.text[:300])
        assert _disk_state(srv) == before
        source = srv.studies / "synthetic_hn_005.nii.gz"
        with open(source, "rb") as f:
            r = requests.put(f"{srv.url}/datastore/image", params={"image": "full_upload"}, files={"file": ("full_upload.nii.gz", f)}, timeout=120)
        assert r.status_code == 507 and "the disk is full" in r.json()["detail"], (r.status_code, r.text[:300])
        assert _disk_state(srv) == before
        assert requests.get(f"{srv.url}/datastore/image", params={"image": "full_upload"}, timeout=60).status_code == 404
    finally:
        filler.unlink(missing_ok=True)
    with open(source, "rb") as f:
        r = requests.put(f"{srv.url}/datastore/image", params={"image": "full_upload"}, files={"file": ("full_upload.nii.gz", f)}, timeout=120)
    assert r.ok, f"the upload fails once there is space again: {r.status_code} {r.text[:300]}"
    assert requests.get(f"{srv.url}/datastore/image", params={"image": "full_upload"}, timeout=60).content == source.read_bytes()
    assert srv.put_label(number + 2).ok and srv.assert_consistent() == number + 2
