"""Local processes for ContourCL's tests and benchmarks: a free port, the MONAI Label server started
as a user starts it, a throw-away Orthanc, waiting for a server, and stopping what was started, by
its PID; and what they measure with: a process's memory and a planning-CT-sized test volume.
Also the small things the tests build their inputs from: copies of the app and the sample data
(:func:`sandbox`), tiny volumes (:func:`blob_case`, :func:`write_nifti`), a tiny model file
(:func:`constant_oar_model`) and a hostile pickle (:class:`CodePayload`).

The end-to-end tests (``tests/``), the benchmarks (``benchmarks/``) and the analyses
(``contourcl.training.experiments``) start the same real servers (``monailabel start_server``,
Orthanc with its DICOMweb plugin) on 127.0.0.1 and share these helpers; this module is the one
place that knows how. Scripts never import each other.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

#: the source checkout this package runs from (an editable install: ``lib/contourcl`` in it)
REPO = Path(__file__).resolve().parents[2]
#: the shipped ``oar`` model file of the checkout
SHIPPED_OAR = REPO / "apps" / "radonc" / "model" / "oar.pt"
#: the OpenKBP CT the serving benchmarks resample, relative to the OpenKBP root
#: (:func:`contourcl.data.datasets.openkbp_root`)
BENCH_CT = Path("train-pats") / "pt_1" / "ct.nii.gz"
#: a typical planning CT's grid
CT_SIZED = (512, 512, 150)
#: where CI keeps OpenKBP: ``../shared/data/openkbp`` beside the checkout
OPENKBP_BESIDE = REPO.parent / "shared" / "data" / "openkbp"

#: where Debian/Ubuntu's ``orthanc-dicomweb`` package (or a local build) puts the plugin
ORTHANC_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                        "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log file, for an error message."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a process this code started, by its PID: SIGTERM, then SIGKILL after ``timeout`` s.

    A process started in a session of its own (``start_new_session=True``) is stopped with its
    whole process group, so the workers it started go with it.
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], log_path: str | Path, timeout: float, what: str) -> None:
    """Poll ``ready()`` until it is true; raise with the log's tail if ``proc`` exits or ``timeout`` s pass.

    Connection errors and unparsable answers from ``ready`` count as "not yet".
    """
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if ready():
                return
        except (requests.RequestException, ValueError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s:\n{log_tail(log_path)}")
        time.sleep(0.3)


def wait_until_serving(proc: subprocess.Popen, url: str, log_path: str | Path, timeout: float = 180,
                       path: str = "/info/") -> None:
    """Wait until the server ``proc`` answers ``GET url + path`` (any HTTP answer counts when
    ``path`` is not ``/info/``)."""
    wait_for(proc, lambda: requests.get(f"{url}{path}", timeout=10).ok or path != "/info/", log_path, timeout, "the server")


def wait_for_training(url: str, timeout: float = 600) -> dict:
    """Wait until the server at ``url`` has no training submitted or running; its ``GET /train/``
    status then (``DONE``, ``ERROR``, ...). TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(2)
    raise TimeoutError(f"the training did not finish within {timeout:g} s")


def infer_answer(response: requests.Response):
    """MONAI Label's answer to ``POST /infer/<model>`` (multipart: the parameters as JSON, then the
    label map as NIfTI, gzipped): ``(label map as int64, its affine, the parameters)``."""
    import gzip

    import nibabel as nib
    import numpy as np
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    img = nib.Nifti1Image.from_bytes(gzip.decompress(parts[1].content))
    return np.asarray(img.dataobj).astype(np.int64), img.affine, json.loads(parts[0].content)


#: the collapse floor of the pretraining tests: the mean per-dimension std of l2-normalised
#: embeddings is about 1/sqrt(d) when they spread and 0 when they collapse (SimSiam, Section 4.1);
#: measured on the tests' tiny runs: 0.58/sqrt(d) healthy, 0.11/sqrt(d) with the stop-gradient removed
COLLAPSE_FLOOR = 0.3


def embedding_spread(project, x) -> float:
    """Mean over dimensions of the std over ``x`` of the l2-normalised embeddings, times sqrt(d).

    ``project`` runs with batch statistics, as in training (pass copies: the running statistics
    move); a 24-step run's running statistics are not those of its batches yet."""
    import math

    import torch

    with torch.no_grad():
        z = torch.nn.functional.normalize(project(x).float(), dim=1)
    return float(z.std(dim=0).mean()) * math.sqrt(z.shape[1])


def start_monailabel(app: str | Path, studies: str | Path, conf: Mapping[str, object], log_path: str | Path, *,
                     host: str = "127.0.0.1", cwd: str | Path | None = None, env: Mapping[str, str | None] | None = None, new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """``monailabel start_server --app APP --studies STUDIES --conf K V ... --host HOST --port P``, as
    a user starts it, with this interpreter's ``bin`` first on ``PATH``; output goes to ``log_path``.

    ``env`` adds to (or, with a ``None`` value, removes from) this process's environment.
    ``new_session`` starts the server as a process-group leader, so that :func:`stop_process`
    stops its training workers with it. Returns the process and the URL it will serve on
    (127.0.0.1 and a free port); wait for it with :func:`wait_until_serving`.
    """
    bindir = Path(sys.executable).parent
    port = free_port()
    args = [str(bindir / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    for key, value in conf.items():
        args += ["--conf", str(key), str(value)]
    args += ["--host", host, "--port", str(port)]
    full_env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with open(log_path, "w") as log:  # the server holds its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=new_session)
    return proc, f"http://127.0.0.1:{port}"


#: what a copy of the app leaves behind: the server's own writings and, unless asked, other weights
APP_IGNORE = ("history", "__pycache__", "*.tmp", "train_*", "dicomweb-cache", "logs")
#: what a copy of the sample data leaves behind: the server's own writings there
STUDIES_IGNORE = ("datastore_v2.json", ".lock", "original", "README.md", ".contourcl", "logs")


def sandbox(base: str | Path, repo: str | Path = REPO, weights: tuple[str, ...] | None = ("oar.pt", "gtv.pt"), studies: bool = True,
            studies_ignore: tuple[str, ...] = STUDIES_IGNORE) -> tuple[Path, Path]:
    """Copies of ``apps/radonc`` (``base/radonc``) and of ``sample-data`` (``base/studies``) for a
    server a test may break. ``weights``: the model files (and weight folders, e.g. ``synthetic``)
    of ``apps/radonc/model`` to copy; the others are left out (``()``: none; ``None``: all of them).
    ``studies``: whether
    to copy the sample data, into ``base/studies`` even where that folder exists already (a mount
    point), leaving out ``studies_ignore``. Returns (app, studies)."""
    base, repo = Path(base), Path(repo)
    app, folder = base / "radonc", base / "studies"
    model = repo / "apps" / "radonc" / "model"
    skip = [p.name for p in model.iterdir() if weights is not None and p.name not in weights and (p.suffix == ".pt" or p.is_dir())]
    shutil.copytree(repo / "apps" / "radonc", app, ignore=_ignore_in(model, skip, APP_IGNORE))
    if studies:
        shutil.copytree(repo / "sample-data", folder, ignore=shutil.ignore_patterns(*studies_ignore), dirs_exist_ok=True)
    return app, folder


def _ignore_in(folder: Path, names: list[str], patterns: tuple[str, ...]):
    """``shutil.copytree``'s ignore: ``patterns`` anywhere, ``names`` only inside ``folder``."""
    by_pattern = shutil.ignore_patterns(*patterns)

    def ignore(path, entries):
        skipped = set(by_pattern(path, entries))
        if Path(path).resolve() == folder.resolve():
            skipped |= {e for e in entries if e in names}
        return skipped

    return ignore


def openkbp_for_tests() -> Path | None:
    """The OpenKBP root for tests that read the real data: ``CONTOURCL_OPENKBP``
    (:func:`contourcl.data.datasets.openkbp_root`), else ``../shared/data/openkbp`` beside the
    checkout (:data:`OPENKBP_BESIDE`, as CI has it), else None (the tests skip)."""
    from contourcl.data.datasets import openkbp_root

    root = openkbp_root(None, required=False)
    if root is None and OPENKBP_BESIDE.is_dir():
        root = OPENKBP_BESIDE
    return root


def find_orthanc() -> str | None:
    """Orthanc's executable (Debian puts it in /usr/sbin, off a user's PATH), or None."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


def find_dicomweb_plugin() -> str | None:
    """Orthanc's DICOMweb plugin, or None."""
    for pattern in ORTHANC_PLUGIN_PATHS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def start_orthanc(root: str | Path, name: str = "ContourCL test PACS", timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start an empty Orthanc with DICOMweb on 127.0.0.1, storing under ``root``; returns it and its REST root.

    No DICOM port, no remote access; ``{url}/dicom-web`` is its DICOMweb root. Stop it with
    :func:`stop_process`.
    """
    exe, plugin = find_orthanc(), find_dicomweb_plugin()
    if exe is None or plugin is None:
        raise RuntimeError("Orthanc and its DICOMweb plugin are needed (apt-get install orthanc orthanc-dicomweb); "
                           f"found Orthanc: {exe}, plugin: {plugin} (looked in {ORTHANC_PLUGIN_PATHS})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": name, "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"), "SaveJobs": False, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=1))
    with open(root / "orthanc.log", "w") as log:
        proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(proc, lambda: "dicom-web" in requests.get(f"{url}/plugins", timeout=5).json(), root / "orthanc.log",
                 timeout, "Orthanc")
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def proc_status_kb(pid: int, field: str) -> int | None:
    """A memory figure of a live process from ``/proc/PID/status``, in kB: ``VmHWM`` (its peak
    resident memory), ``VmRSS`` (its resident memory now). None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resampled_ct(src: str | Path, shape: tuple[int, int, int]):
    """``src`` resampled (linear) to ``shape``, with its affine scaled to match: a real CT's
    anatomy on another grid, for timings that depend on the grid's size. Returns ``(float32
    array, affine)``."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import zoom

    img = nib.load(src)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    factors = tuple(n / s for n, s in zip(shape, data.shape, strict=False))
    out = zoom(data, factors, order=1)
    affine = img.affine.copy()
    for i in range(3):
        affine[:3, i] /= factors[i]
    return out, affine


def ct_sized_volume(src: str | Path, out: str | Path) -> Path:
    """``src`` resampled to 512 x 512 x 150 (:data:`CT_SIZED`, a typical planning CT's grid),
    written as int16 NIfTI to ``out``."""
    import nibabel as nib
    import numpy as np

    data, affine = resampled_ct(src, CT_SIZED)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(out))
    return Path(out)


class CodePayload:
    """Unpickling this runs ``touch marker``: what an attacker's model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def constant_oar_model(path: str | Path, channel: int, spacing: float = 3.0) -> Path:
    """A tiny ``oar`` model file (``spacing`` mm in-plane) whose output is class ``channel`` everywhere."""
    import torch

    from contourcl.data.labels import model_labels
    from contourcl.models.checkpoint import ModelMeta, save_model
    from contourcl.models.networks import NetConfig, build_network

    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].weight.zero_()
        net.head[0].bias.fill_(-10.0)
        net.head[0].bias[channel] = 10.0
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), spacing=(spacing, spacing)))


def write_nifti(path: str | Path, array, affine) -> str:
    """``array`` as NIfTI at ``path``, its qform and sform both ``affine`` (code 1); returns the path."""
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return str(path)


def write_dicom_studies(root: str | Path) -> Path:
    """``root/studies``: a studies folder of DICOM CT series of phantoms (96 x 80 x 14 at 4 x 4 x 5
    mm): ``patient_a`` (HFS) and ``patient_b`` (FFS); ``patient_c`` with an approved plan's
    RTSTRUCT (ROI names as a planning system writes them: "Parotid R", "Mandible", "BODY"), which
    becomes its final label; ``patient_gap``, a series missing a slice (not a regular grid)."""
    import numpy as np

    from contourcl.data.dicom_series import write_ct_series
    from contourcl.data.phantom import make_phantom
    from contourcl.data.rtstruct import write_rtstruct

    studies = Path(root) / "studies"
    for seed, name, position in ((11, "patient_a", "HFS"), (12, "patient_b", "FFS")):
        ct, _, affine = make_phantom(seed, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
        write_ct_series(ct, affine, studies / name / "CT", patient_id=name, patient_position=position)
    # patient_c: an approved plan's export, the CT series and its RTSTRUCT (ROI names as a planning
    # system writes them); it becomes a final label
    ct, truth, affine = make_phantom(14, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    write_ct_series(ct, affine, studies / "patient_c" / "CT", patient_id="patient_c")
    names = {"Parotid R": 3, "Mandible": 5, "BODY": 99}
    plan = np.zeros_like(truth)
    plan[truth == 3], plan[truth == 5], plan[(truth == 0) & (ct > -500)] = 3, 5, 99
    write_rtstruct(plan, affine, names, studies / "patient_c" / "CT", studies / "patient_c" / "RS_plan.dcm")
    ct, _, affine = make_phantom(13, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    files = write_ct_series(ct, affine, studies / "patient_gap")
    files[7].unlink()  # a missing slice: not a regular grid
    return studies


def blob_case(shape=(40, 40, 8), spacing=(4.0, 4.0, 3.0), seed=0):
    """A tiny CT-like volume (air, a body disc, two 'organs') and its stored-numbering label:
    ``(int16 CT, uint8 label, affine)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    body = (x - cx) ** 2 + (y - cy) ** 2 < (0.4 * shape[0]) ** 2
    organ1 = (x - cx + 6) ** 2 + (y - cy) ** 2 < 9  # Brainstem (1)
    organ2 = (x - cx - 6) ** 2 + (y - cy) ** 2 < 9  # Mandible (5), bright
    ct = np.full(shape, -1000.0)
    lab = np.zeros(shape, np.uint8)
    ct[body] = 40
    ct[organ1] = 120
    ct[organ2] = 900
    lab[organ1] = 1
    lab[organ2] = 5
    ct = ct + rng.normal(0, 10, shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, 0]
    return ct.astype(np.int16), lab, affine


# -- small model files and labeled folders the unit and integration tests share ---------------------
def tiny_model_file(path: str | Path, model: str = "gtv", bias: float | None = None, seed: int | None = None,
                    dice: float | None = 0.5, roi: tuple[int, int] | None = None) -> Path:
    """A tiny model file of ``model`` (ResNet-10 encoder, width 8): its output layer's bias filled with
    ``bias`` (tells files apart, see :func:`head_bias`), or weights drawn with ``seed``; ``dice`` is
    the validation figure it records."""
    import torch

    from contourcl.data.labels import model_labels
    from contourcl.models.checkpoint import ModelMeta, save_model
    from contourcl.models.networks import NetConfig, build_network

    if seed is not None:
        torch.manual_seed(seed)
    labels = model_labels(model)
    net = build_network(NetConfig(out_channels=len(labels) + 1, encoder="resnet10", width=8))
    if bias is not None:
        with torch.no_grad():
            net.head[0].bias.fill_(bias)
    extra = {"roi": roi} if roi else {}
    meta = ModelMeta(model=model, labels=labels, net=net.config.to_dict(), metrics={"val_dice": dice} if dice is not None else {}, **extra)
    return save_model(path, net, meta)


def head_bias(path: str | Path) -> float:
    """The first output bias of a model file made by :func:`tiny_model_file`."""
    from contourcl.models.checkpoint import load_model

    return float(load_model(path)[0].head[0].bias[0])


def final_cases(root: str | Path) -> list[dict]:
    """``{"id", "image", "label"}`` of every image of a studies folder with its ``labels/final/`` file."""
    root = Path(root)
    return [{"id": p.name.removesuffix(".nii.gz"), "image": str(p), "label": str(root / "labels" / "final" / p.name)}
            for p in sorted(root.glob("*.nii.gz"))]


def write_gate_studies(root: str | Path) -> Path:
    """Four labeled phantoms, one of them (case3) with NaN voxels written into the CT."""
    import nibabel as nib
    import numpy as np

    from contourcl.data.phantom import write_phantom

    root = Path(root)
    for i in range(4):
        write_phantom(root, f"case{i}", i, shape=(64, 64, 16), spacing=(4.0, 4.0, 8.0))
    bad = root / "case3.nii.gz"
    img = nib.load(bad)
    ct = np.asarray(img.dataobj).astype(np.float32)
    ct[10:20, 10:20, 3] = np.nan
    nib.save(nib.Nifti1Image(ct, img.affine), str(bad))
    return root


def write_openkbp_like(root: str | Path) -> Path:
    """An OpenKBP-shaped folder (pt_*/ct, oar, target) of small synthetic phantoms. pt_11's spinal
    cord is drawn 7 voxels (2.8 cm) square: a reference the check sets aside."""
    import numpy as np

    from contourcl.data.phantom import make_phantom

    root = Path(root)
    for split, seeds in (("train-pats", range(4)), ("validation-pats", range(10, 12))):
        cases = []
        for seed in seeds:
            ct, lab, affine = make_phantom(seed, shape=(64, 64, 16), spacing=(4.0, 4.0, 8.0))
            if seed == 11:
                for z in np.nonzero((lab == 2).any(axis=(0, 1)))[0]:
                    x, y = np.argwhere(lab[..., z] == 2).mean(axis=0).round().astype(int)
                    block = lab[x - 3: x + 4, y - 3: y + 4, z]
                    block[block == 0] = 2
            d = root / split / f"pt_{seed}"
            d.mkdir(parents=True)
            write_nifti(d / "ct.nii.gz", ct, affine)
            write_nifti(d / "oar.nii.gz", np.where(lab <= 7, lab, 0).astype(np.uint8), affine)
            write_nifti(d / "target.nii.gz", (lab == 8).astype(np.uint8), affine)
            cases.append({"case": f"pt_{seed}", "has_target": bool((lab == 8).any())})
        (root / split / "manifest.json").write_text(json.dumps({"cases": cases}))
    return root


def run_contourcl(*args, cwd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``contourcl ARGS`` of this interpreter's environment, run in ``cwd``, output captured."""
    exe = Path(sys.executable).parent / "contourcl"
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def ohif_slices(folder: str | Path) -> list:
    """The headers of the DICOM series in ``folder``, in the order cornerstone3D stacks a volume's
    slices: ``(first - position) . (row x column cosine)``, largest first."""
    import numpy as np
    import pydicom

    headers = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(Path(folder).iterdir())]
    iop = np.array(headers[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    first = np.array(headers[0].ImagePositionPatient, float)
    return sorted(headers, key=lambda ds: -float((first - np.array(ds.ImagePositionPatient, float)) @ normal))


def as_ohif_shows(folder: str | Path, label, affine):
    """The labelmap OHIF fills from a raw NRRD's bytes, ``[slice, row, column]``, from the DICOM
    series in ``folder`` alone: slices in :func:`ohif_slices`' order, each voxel the ``label``'s
    value (an array on the NIfTI grid of ``affine``) at its patient position. Also what OHIF's
    labelmap of a SEG of that series holds, where the SEG is placed right."""
    import numpy as np

    headers = ohif_slices(folder)
    iop = np.array(headers[0].ImageOrientationPatient, float)
    dr, dc = (float(v) for v in headers[0].PixelSpacing)
    r, c = np.meshgrid(np.arange(int(headers[0].Rows)), np.arange(int(headers[0].Columns)), indexing="ij")
    to_voxel = np.linalg.inv(affine)
    out = []
    for ds in headers:
        lps = np.array(ds.ImagePositionPatient, float) + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
        ijk = np.rint((lps * [-1.0, -1.0, 1.0]) @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        out.append(label[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
    return np.stack(out)


def find_chromium() -> tuple[str, str] | None:
    """Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them), or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(size: tuple[int, int] = (1600, 1000)):
    """A headless Chromium driven by selenium (software WebGL, which OHIF's viewports need on a
    machine with no GPU); quit it with ``.quit()``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):
        options.add_argument(arg)
    options.binary_location = found[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(found[1]), options=options)
