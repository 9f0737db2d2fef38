"""Fault and load tests against the real server (issue 12, item 12).

The real ``monailabel start_server`` runs on a copy of the app and of ``sample-data`` (127.0.0.1,
a free port, ``--conf models oar``, the default weights), with ``TMPDIR`` pointing to a folder of
the test, so that any file a request leaves in the server's temporary folder is seen. Background
uncertainty scoring is switched off (``--conf skip_scoring true``): on this 2-core machine it would
take the cores from the trainings these tests wait for, and it exercises nothing checked here.

- :func:`test_concurrent_load`: at the same time, from a thread pool, 6 ``POST /infer/oar`` (3
  threads, 2 each), one corrected ``PUT /datastore/label`` per unlabeled image, and one
  ``POST /train/oar``. Every inference is answered 200 with a label map on the image's grid; every
  submitted label is stored, its voxels are the submitted contours in the stored numbering, and
  the server gives out exactly the stored bytes; training finishes ``DONE``; the served model loads
  and is a published version of the history; no request leaves a file in the server's temporary
  folder (nor a temporary folder in the studies or model folders).
- :func:`test_kill9_mid_training_then_restart`: ``kill -9`` of the server while its training
  subprocess trains (it holds ``train.lock``): that subprocess, and any other the server started,
  is gone within 10 s, nothing is published after the kill, the stale ``train.lock`` does not stop
  a training on the restarted server, which completes; every label stored before the kill is
  still there, byte for byte, and nothing is left in the temporary folder.

The two tests share one copy of the app and the studies (and the second one restarts the server of
the first), to keep the number of server starts (10-30 s each here) and trainings low. Either runs
alone as well. The server runs with ``OMP_NUM_THREADS=1`` unless the environment sets it: on a busy
2-core machine two OpenMP threads per process make every inference and training several times
slower, which changes nothing checked here but the time the tests take. Every process is started in a session of its own and stopped by its process group
(the server's pid) whatever happens, so that no server or trainer outlives the tests.
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
import psutil
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from contourcl.data.labels import STORED_LABELS
from contourcl.data.phantom import make_phantom
from contourcl.models.checkpoint import load_model
from contourcl.testing import sandbox, start_monailabel, wait_until_serving

pytestmark = pytest.mark.timeout(300)  # per test; about 1-3 minutes for the file here

#: a retraining that is as small as the app allows
SMALL_TRAINING = {"max_epochs": 1, "samples_per_volume": 4, "train_batch_size": 4}
#: the module MONAI Label runs its training (and scoring) subprocesses with
TASK_MODULE = "monailabel.interfaces.utils.app"
#: Slicer numbers segments in its own order and says so in label_info
SLICER_ORDER = ["Mandible", "GTV", "Brainstem", "Parotid_R", "Parotid_L", "SpinalCord", "Larynx", "Esophagus"]
OAR_NAMES = {"Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible", "Larynx", "Esophagus"}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:6])
    except psutil.Error:
        return "?"


def _is_task(proc: psutil.Process, method: str) -> bool:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return TASK_MODULE in cmd and "-m" in cmd and method in cmd[cmd.index(TASK_MODULE) + 1:]


class Server:
    """The real MONAI Label server on one copy of the app and the studies.

    ``start`` may be called again after the server died (a restart on the same folders, on a new
    port). Every server runs in a session of its own: :meth:`stop_all` ends each one's process
    group (its pid), which also takes the task subprocesses it started, orphaned or not.
    """

    def __init__(self, root: Path):
        self.root = root
        self.studies = root / "studies"
        self.app = root / "radonc"
        self.tmp = root / "server-tmp"  # the server's TMPDIR
        self.work = root / "client"
        self.procs: list[subprocess.Popen] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = root / "server-0.log"
        sandbox(root, weights=("oar.pt", "gtv.pt"))  # self.app, self.studies; not the synthetic weights
        self.tmp.mkdir()
        self.work.mkdir()

    @property
    def served(self) -> Path:
        return self.app / "model" / "oar.pt"

    @property
    def history(self) -> Path:
        return self.app / "model" / "history" / "oar"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 180) -> None:
        assert not self.running()
        self.log_path = self.root / f"server-{len(self.procs)}.log"
        # one OpenMP thread per process (as conftest.py gives the test processes), unless the caller
        # says otherwise: on a busy 2-core machine, two threads per process make inference and
        # training several times slower (see benchmarks/bench_load.py --omp-threads)
        env = {"TMPDIR": str(self.tmp), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc, self.url = start_monailabel(self.app, self.studies, {"models": "oar", "skip_scoring": "true"}, self.log_path,
                                               cwd=self.root, env=env, new_session=True)
        self.procs.append(self.proc)
        wait_until_serving(self.proc, self.url, self.log_path, timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill9(self) -> None:
        """``kill -9`` of the server process only (not its group): what a crash or the OOM killer does."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # a session of its own: its pgid is its pid
                except ProcessLookupError:
                    break  # nothing of that group is left
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def wait_for_training(self, task_id: str, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                status = requests.get(f"{self.url}/train/", timeout=30).json()
            except requests.RequestException:
                status = {}
            if status.get("id") == task_id and status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(1)
        raise AssertionError(f"training {task_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def wait_tmp(self, expected: list[str], timeout: float = 15) -> list[str]:
        """The server's temporary folder, once it lists ``expected`` (or after ``timeout``)."""
        deadline = time.time() + timeout
        while True:
            now = _tree(self.tmp)
            if now == expected or time.time() > deadline:
                return now
            time.sleep(0.5)

    def final_labels(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.studies / "labels" / "final").glob("*.nii.gz"))}

    def unlabeled(self) -> list[str]:
        images = {p.name.removesuffix(".nii.gz") for p in self.studies.glob("*.nii.gz")}
        return sorted(images - {p.name.removesuffix(".nii.gz") for p in (self.studies / "labels" / "final").glob("*.nii.gz")})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("reliability"))
    try:
        srv.start()
        yield srv
    finally:
        groups = [p.pid for p in srv.procs]
        srv.stop_all()
        # nothing of ours may be left: any process still in one of the servers' groups is killed by pid
        left = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
                    p.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        assert not left, f"processes outlived their server and had to be killed: {left}"


def _corrected_label(srv: Server, image_id: str) -> tuple[Path, dict, np.ndarray]:
    """The phantom's truth as Slicer would submit it: its own segment order, named in label_info.
    Returns the file, the request's params and the truth in the stored numbering."""
    image = nib.load(srv.studies / f"{image_id}.nii.gz")
    seed = int(image_id.rsplit("_", 1)[1])
    truth = make_phantom(seed, shape=image.shape, spacing=tuple(float(s) for s in image.header.get_zooms()))[1]
    slicer = np.zeros_like(truth)
    for idx, name in enumerate(SLICER_ORDER, start=1):
        slicer[truth == STORED_LABELS[name]] = idx
    path = srv.work / f"corrected-{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(slicer, image.affine), str(path))
    params = {"label_info": [{"name": n, "idx": i} for i, n in enumerate(SLICER_ORDER, start=1)]}
    return path, params, truth


def _put_label(srv: Server, image_id: str, path: Path, params: dict) -> requests.Response:
    with open(path, "rb") as f:
        return requests.put(f"{srv.url}/datastore/label", params={"image": image_id, "tag": "final"},
                            files={"label": (path.name, f)}, data={"params": json.dumps(params)}, timeout=180)


def _check_label(srv: Server, image_id: str, truth: np.ndarray) -> None:
    stored_path = srv.studies / "labels" / "final" / f"{image_id}.nii.gz"
    assert stored_path.is_file(), f"{image_id}: no final label stored"
    first = stored_path.read_bytes()
    stored = np.asanyarray(nib.load(stored_path).dataobj)
    assert np.array_equal(stored, truth), f"{image_id}: stored voxels differ from the submitted contours (stored numbering)"
    assert stored_path.read_bytes() == first, f"{image_id}: the stored file changed between two reads"
    r = requests.get(f"{srv.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
    assert r.status_code == 200 and r.content == first, f"{image_id}: the server gives out other bytes than it stored ({r.status_code})"
    info = requests.get(f"{srv.url}/datastore/label/info", params={"label": image_id, "tag": "final"}, timeout=60).json()
    present = {int(v) for v in np.unique(truth)} - {0}
    assert {(e["name"], e["idx"]) for e in info["label_info"]} == {(n, v) for n, v in STORED_LABELS.items() if v in present}, info


def _startup_artifact(tmp: Path, name: str) -> bool:
    """What a server start itself leaves in its TMPDIR (not a request, not a trainer): MONAI Label's
    logging config (``monailabel.utils.others.generic.init_log_config``, one ``tmp*.json`` per start,
    never removed) and the cache folder that importing MONAI makes (``torchinductor_<user>``)."""
    if Path(name).parts[0].startswith("torchinductor_"):
        return True
    try:
        return name.endswith(".json") and "/" not in name and '"formatters"' in (tmp / name).read_text(errors="replace")
    except OSError:
        return False


def _history(srv: Server) -> list[dict]:
    path = srv.history / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def _published_versions(srv: Server) -> dict[str, int]:
    """sha256 of each history file listed as published -> its version."""
    entries = json.loads((srv.history / "history.json").read_text())
    return {_sha(srv.history / e["file"]): e["version"] for e in entries if e.get("published")}


def _no_temp_dirs(srv: Server) -> None:
    """No temporary folder or file left where the datastore and the model store write theirs."""
    leftovers = [p for p in srv.studies.iterdir() if p.name.startswith("tmp")]
    leftovers += [p for p in (srv.studies / "labels" / "final").iterdir() if not p.name.endswith(".nii.gz")]
    leftovers += [p for p in (srv.app / "model").iterdir() if p.name.startswith("tmp") or p.name.endswith(".tmp")]
    leftovers += [p for p in srv.history.glob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def _infer(srv: Server, image_id: str) -> dict:
    """``POST /infer/oar?image=ID`` as Slicer sends it (multipart answer: params + label map)."""
    t0 = time.perf_counter()
    r = requests.post(f"{srv.url}/infer/oar", params={"image": image_id}, timeout=300)
    out = {"image": image_id, "status": r.status_code, "seconds": time.perf_counter() - t0, "text": r.text[:300] if not r.ok else ""}
    if r.ok:
        parts = MultipartDecoder.from_response(r).parts
        for part in parts:
            disposition = part.headers.get(b"Content-Disposition", b"").decode()
            if 'name="params"' in disposition:
                out["params"] = json.loads(part.content)
            elif 'name="image"' in disposition:
                out["label"] = part.content
    return out


def test_concurrent_load(server):
    srv = server
    if not srv.running():
        srv.start()
    images = sorted(p.name.removesuffix(".nii.gz") for p in srv.studies.glob("*.nii.gz"))
    to_label = srv.unlabeled()
    assert to_label, "the sample data has unlabeled images"
    labels = {i: _corrected_label(srv, i) for i in to_label}
    temp_before = _tree(srv.tmp)
    history_before = _history(srv)

    # all at the same time: 6 inferences from 3 threads, one label per unlabeled image, one training
    start = threading.Barrier(3 + len(labels) + 1, timeout=120)

    def infer_worker(ids):
        start.wait()
        return [_infer(srv, i) for i in ids]

    def label_worker(image_id):
        path, params, _ = labels[image_id]
        start.wait()
        r = _put_label(srv, image_id, path, params)
        return image_id, r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text[:300])

    def train_worker():
        start.wait()
        time.sleep(0.2)  # the training request lands among the uploads, not before all of them
        r = requests.post(f"{srv.url}/train/oar", json=SMALL_TRAINING, timeout=120)
        return r.status_code, r.json()

    plan = [images[k::3] for k in range(3)]
    plan = [(ids * 2)[:2] for ids in plan]  # 2 inferences per thread
    with concurrent.futures.ThreadPoolExecutor(max_workers=start.parties) as pool:
        infers = [pool.submit(infer_worker, ids) for ids in plan]
        puts = [pool.submit(label_worker, i) for i in labels]
        train = pool.submit(train_worker)
        infer_results = [r for f in infers for r in f.result(timeout=600)]
        put_results = [f.result(timeout=600) for f in puts]
        train_status, train_task = train.result(timeout=600)

    # every inference: 200, a label map on the image's grid, numbered as the model numbers
    assert len(infer_results) == 6
    for res in infer_results:
        assert res["status"] == 200, (res, srv.log_tail())
        assert "label" in res and "params" in res, res.keys()
        result_path = srv.work / f"result-{res['image']}-{time.time_ns()}.nii.gz"
        result_path.write_bytes(res["label"])
        label_map = nib.load(result_path)
        image = nib.load(srv.studies / f"{res['image']}.nii.gz")
        assert label_map.shape == image.shape and np.allclose(label_map.affine, image.affine, atol=1e-4), res["image"]
        values = set(np.unique(np.asanyarray(label_map.dataobj)).tolist())
        assert values <= set(range(8)), values
        assert set(res["params"]["label_names"]) == OAR_NAMES

    # every label: stored, the submitted contours in the stored numbering, the bytes the server gives out
    for image_id, status, body in put_results:
        assert status == 200, (image_id, status, body, srv.log_tail())
        assert body["image"] == image_id and body["label"] == image_id, body
    for image_id, (_, _, truth) in labels.items():
        _check_label(srv, image_id, truth)

    # training: started among the uploads, finished, and what is served is a published version
    assert train_status == 200, (train_task, srv.log_tail())
    status = srv.wait_for_training(train_task["id"])
    assert status["status"] == "DONE", (status, srv.log_tail())
    print(f"inference latencies (s): {sorted(round(r['seconds'], 1) for r in infer_results)}; "
          f"training {status.get('start_ts')} .. {status.get('end_ts')}")
    network, meta = load_model(srv.served)
    assert meta.model == "oar" and network is not None
    published = _published_versions(srv)
    assert _sha(srv.served) in published, f"the served oar.pt is none of the published history versions {sorted(published.values())}"
    history = _history(srv)
    assert len(history) > len(history_before) and history[-1]["origin"] == "retrain", history[-1:]
    # the labels are still what was submitted once all of it is over
    for image_id, (_, _, truth) in labels.items():
        _check_label(srv, image_id, truth)

    # no request left a file in the server's temporary folder, nor a temporary folder elsewhere
    temp_after = srv.wait_tmp(temp_before)
    assert temp_after == temp_before, f"left in the server's TMPDIR: {sorted(set(temp_after) - set(temp_before))}"
    _no_temp_dirs(srv)
    assert requests.get(f"{srv.url}/info/", timeout=60).ok


def test_kill9_mid_training_then_restart(server):
    srv = server
    if not srv.running():
        srv.start()
    # a label submitted through the server just before the crash (a new one, or a replacement)
    image_id = (srv.unlabeled() or sorted(p.name.removesuffix(".nii.gz") for p in srv.studies.glob("*.nii.gz")))[-1]
    path, params, truth = _corrected_label(srv, image_id)
    r = _put_label(srv, image_id, path, params)
    assert r.status_code == 200, (r.text[:300], srv.log_tail())
    _check_label(srv, image_id, truth)

    # a training long enough to be killed in the middle of it
    r = requests.post(f"{srv.url}/train/oar", json={"max_epochs": 200, "samples_per_volume": 4, "train_batch_size": 4}, timeout=120)
    assert r.status_code == 200, (r.text[:300], srv.log_tail())
    lock = srv.history / "train.lock"
    deadline = time.time() + 150
    trainer = None
    while time.time() < deadline:
        trainers = [p for p in srv.descendants() if _is_task(p, "train")]
        if trainers:
            trainer = trainers[0]
            try:
                if lock.read_text().strip() == str(trainer.pid):
                    break  # it holds the model's training lock: it is training
            except OSError:
                pass
        if not srv.running():
            raise AssertionError(f"the server died:\n{srv.log_tail()}")
        time.sleep(0.2)
    else:
        raise AssertionError(f"no training subprocess holding {lock} within 150 s (trainer: {trainer}):\n{srv.log_tail()}")

    labels_before = srv.final_labels()
    served_before = srv.served.read_bytes()
    history_before = (srv.history / "history.json").read_text() if (srv.history / "history.json").exists() else None
    temp_before = _tree(srv.tmp)
    children = srv.descendants()
    assert trainer.pid in {c.pid for c in children} and _alive(trainer.pid)

    srv.kill9()
    t0 = time.time()
    while any(_alive(c.pid) for c in children) and time.time() - t0 < 10:
        time.sleep(0.1)
    orphans = [(c.pid, _cmd(c)) for c in children if _alive(c.pid)]
    assert not orphans, f"still running 10 s after the server was killed: {orphans}\n{srv.log_tail()}"
    print(f"kill -9 of server {srv.proc.pid}: its {len(children)} subprocess(es) {[c.pid for c in children]} "
          f"(trainer {trainer.pid}) gone after {time.time() - t0:.1f} s")
    time.sleep(2)  # anything it would still publish, it would have by now
    assert srv.served.read_bytes() == served_before, "a model was published after the server was killed"
    now = (srv.history / "history.json").read_text() if (srv.history / "history.json").exists() else None
    assert now == history_before, "the history changed after the server was killed"
    assert srv.final_labels() == labels_before
    stale = lock.read_text().strip() if lock.exists() else ""
    assert stale in ("", str(trainer.pid)), stale  # a stale lock naming the dead trainer, or none
    print(f"train.lock after the kill: {stale!r}")

    # restart on the same app and studies: the stale lock does not stop a new training
    srv.start()
    temp_restarted = _tree(srv.tmp)
    new = set(temp_restarted) - set(temp_before)
    unexpected = [n for n in new if not _startup_artifact(srv.tmp, n)]
    assert not unexpected, f"the killed server or trainer left in TMPDIR: {unexpected}"
    entries_before = len(_history(srv))
    r = requests.post(f"{srv.url}/train/oar", json=SMALL_TRAINING, timeout=120)
    assert r.status_code == 200, (r.text[:300], srv.log_tail())
    status = srv.wait_for_training(r.json()["id"])
    assert status["status"] == "DONE", (status, srv.log_tail())
    assert "another trainer" not in srv.log_tail(50000), srv.log_tail()
    history = _history(srv)
    assert len(history) == entries_before + 1 + (entries_before == 0) and history[-1]["origin"] == "retrain", history[-2:]

    # every label stored before the kill is still there, byte for byte; the served model is published
    assert srv.final_labels() == labels_before
    _check_label(srv, image_id, truth)
    load_model(srv.served)
    published = _published_versions(srv)
    assert _sha(srv.served) in published, f"the served oar.pt is none of the published history versions {sorted(published.values())}"
    assert lock.read_text().strip() == "", "the finished training released its lock"
    temp_after = srv.wait_tmp(temp_restarted)
    assert temp_after == temp_restarted, f"left in the server's TMPDIR: {sorted(set(temp_after) - set(temp_restarted))}"
    _no_temp_dirs(srv)
