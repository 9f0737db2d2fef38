"""DICOMweb benchmark: from "infer" to an RTSTRUCT stored in the PACS (Orthanc), on CPU.

    CONTOURCL_OPENKBP=../shared/data/openkbp python benchmarks/bench_dicomweb.py [--runs 5] [--size ct|small] [--keep]

``--data DIR`` names the OpenKBP folder (``train-pats/``, ``validation-pats/``) where
``CONTOURCL_OPENKBP`` does not. Builds a CT series once in a temporary folder (``--size ct``:
OpenKBP pt_1 resampled to 512 x 512 x 150, as ``bench_serving.py`` does,
``contourcl.testing.resampled_ct``; ``--size small``: 128 x 128 x 60, to try the
script quickly), starts a real Orthanc with its DICOMweb plugin on 127.0.0.1 (a free port, its own
storage in the temporary folder), uploads the series, and starts the real MONAI Label server on
``--studies http://127.0.0.1:<port>/dicom-web`` with the shipped ``oar`` model (default weights;
no trainers, no active-learning strategies). Once the series is in the server's cache, each run
does what a clinician's viewer does and times it:

1. ``POST /infer/oar`` for the series (t0 before the request) until the label file is received;
2. the label renumbered to the stored numbering (``contourcl.data.labels.from_model``) and
   written as NIfTI, as a viewer would save the accepted segmentation;
3. ``PUT /datastore/label`` with tag ``final`` (the server checks it, writes RTSTRUCT + SEG and
   stores them in the PACS with STOW-RS) until answered;
4. QIDO-RS polled (every 20 ms) until a new RTSTRUCT instance is listed in the CT's study (t1).

Prints, as a Markdown table, the median, min and max of each step and of the total t1 - t0 over
``--runs`` runs (the first run included: the server loads the model on the first request, that run
is also shown alone), the server's own inference time from its answer (``latencies``), and the peak resident memory (VmHWM) of the server and of Orthanc. Orthanc
and the server are stopped by PID at the end; the temporary folder is removed unless ``--keep``.
Torch uses the threads it is given (``OMP_NUM_THREADS``, else all cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from contourcl.data.datasets import openkbp_or_exit
from contourcl.testing import (
    BENCH_CT,
    REPO,
    proc_status_kb,
    resampled_ct,
    start_monailabel,
    start_orthanc,
    stop_process,
    wait_for,
)

SIZES = {"ct": (512, 512, 150), "small": (128, 128, 60)}
MODEL = "oar"


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident memory (``VmHWM``) of a live process, in MB."""
    kb = proc_status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


def start_server(root: Path, dicomweb: str) -> tuple[subprocess.Popen, str]:
    app = root / "radonc"  # a copy: the server writes its cache and logs next to the app
    shutil.copytree(REPO / "apps" / "radonc", app, ignore=shutil.ignore_patterns(
        "history", "__pycache__", "*.tmp", "train_*", "dicomweb-cache", "logs", "synthetic"))
    # TMPDIR: MONAI Label writes its logging config to a temporary file it never removes
    (root / "tmp").mkdir()
    return start_monailabel(app, dicomweb, {"models": MODEL, "skip_trainers": "true", "skip_strategies": "true"}, root / "server.log",
                            cwd=root, env={"TMPDIR": str(root / "tmp")}, new_session=True)


def wait_for_image(proc: subprocess.Popen, url: str, image_id: str, log: Path, timeout: float = 900) -> None:
    """Until the server answers ``/info/`` and lists ``image_id`` (the series, fetched into its cache)."""

    def listed() -> bool:
        if not requests.get(f"{url}/info/", timeout=10).ok:
            return False
        objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json().get("objects", {})
        return image_id in objects

    wait_for(proc, listed, log, timeout, f"the server (serving {image_id})")


def rtstruct_instances(dicomweb: str, study_uid: str) -> set[str]:
    """SOPInstanceUIDs of the RTSTRUCT instances in the study, by QIDO-RS."""
    headers = {"Accept": "application/dicom+json"}
    r = requests.get(f"{dicomweb}/studies/{study_uid}/series", params={"Modality": "RTSTRUCT"}, headers=headers, timeout=30)
    r.raise_for_status()
    uids = set()
    for series in (r.json() if r.content else []):
        series_uid = series["0020000E"]["Value"][0]
        r = requests.get(f"{dicomweb}/studies/{study_uid}/series/{series_uid}/instances", headers=headers, timeout=30)
        r.raise_for_status()
        uids.update(inst["00080018"]["Value"][0] for inst in (r.json() if r.content else []))
    return uids


def one_run(client, dicomweb: str, study_uid: str, image_id: str, work: Path, timeout: float = 300) -> dict:
    import nibabel as nib

    from contourcl.data.labels import from_model

    before = rtstruct_instances(dicomweb, study_uid)
    t0 = time.perf_counter()
    result_file, params = client.infer(MODEL, image_id, {})
    t_infer = time.perf_counter()
    pred = nib.load(result_file)
    label = from_model(np.asanyarray(pred.dataobj), MODEL).astype(np.uint8)
    label_file = work / "accepted.nii.gz"
    nib.save(nib.Nifti1Image(label, pred.affine), str(label_file))
    t_label = time.perf_counter()
    client.save_label(image_id, str(label_file), tag="final", params={})
    t_submit = time.perf_counter()
    while True:
        new = rtstruct_instances(dicomweb, study_uid) - before
        if new:
            break
        if time.perf_counter() - t_submit > timeout:
            raise RuntimeError(f"no new RTSTRUCT in study {study_uid} {timeout:g} s after the final label was accepted")
        time.sleep(0.02)
    t1 = time.perf_counter()
    Path(result_file).unlink(missing_ok=True)
    label_file.unlink(missing_ok=True)
    return {"infer_s": t_infer - t0, "label_s": t_label - t_infer, "submit_s": t_submit - t_label,
            "visible_s": t1 - t_submit, "total_s": t1 - t0, "structures": int(len(np.unique(label)) - 1),
            "server_model_s": float(params.get("latencies", {}).get("total", float("nan"))),
            "new_rtstruct": sorted(new), "model_version": params.get("model_version")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", choices=sorted(SIZES), default="ct", help="ct: 512x512x150 (default); small: 128x128x60")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (series, Orthanc storage, logs)")
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs: at least 1")
    kbp = openkbp_or_exit(parser, args.data) / BENCH_CT
    if not kbp.is_file():
        sys.exit(f"the OpenKBP case {kbp} is needed to make the CT series")

    from monailabel.client import MONAILabelClient
    from pydicom.uid import generate_uid

    from contourcl.data.dicom_series import write_ct_series
    from contourcl.serving.dicomweb import image_id_of

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="contourcl-bench-dicomweb-"))
    orthanc = server = None
    runs, marks = [], {}
    try:
        t = time.perf_counter()
        shape = SIZES[args.size]
        ct, affine = resampled_ct(kbp, shape)
        study_uid, series_uid = generate_uid(), generate_uid()
        files = write_ct_series(ct, affine, root / "series", patient_id="bench_pt_1", study_uid=study_uid, series_uid=series_uid)
        del ct
        marks["series written"] = time.perf_counter() - t

        t = time.perf_counter()
        orthanc, orthanc_url = start_orthanc(root / "orthanc", name="ContourCL benchmark PACS")
        dicomweb = f"{orthanc_url}/dicom-web"
        with requests.Session() as s:
            for f in files:
                s.post(f"{orthanc_url}/instances", data=Path(f).read_bytes(), timeout=60).raise_for_status()
        marks["Orthanc started, series uploaded"] = time.perf_counter() - t

        t = time.perf_counter()
        server, url = start_server(root, dicomweb)
        image_id = image_id_of(series_uid)
        wait_for_image(server, url, image_id, root / "server.log")
        marks["server started, series in its cache"] = time.perf_counter() - t

        (root / "client").mkdir()
        client = MONAILabelClient(url, tmpdir=str(root / "client"))
        for i in range(args.runs):
            r = one_run(client, dicomweb, study_uid, image_id, root / "client")
            runs.append(r)
            print(f"run {i + 1}: infer {r['infer_s']:.2f} s, label {r['label_s']:.2f} s, submit {r['submit_s']:.2f} s, "
                  f"visible +{r['visible_s']:.3f} s, total {r['total_s']:.2f} s ({r['structures']} structures)", flush=True)
        server_hwm, orthanc_hwm = vm_hwm_mb(server.pid), vm_hwm_mb(orthanc.pid)
        server_children = [p for p in _children(server.pid)]
    finally:
        stop_process(server)
        stop_process(orthanc)
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    threads = os.environ.get("OMP_NUM_THREADS", f"unset ({os.cpu_count()} cores)")
    print(f"\n{args.size}: {'x'.join(map(str, shape))} series ({len(files)} slices), model {MODEL} (default weights), "
          f"{len(runs)} runs, OMP_NUM_THREADS {threads}; setup: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()))
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n")
    rows = [("infer answered (`POST /infer/oar`, label file received)", "infer_s"),
            ("... of which the model on the server (its `latencies.total`: read, preprocess, network, invert)", "server_model_s"),
            ("label renumbered and written (client)", "label_s"),
            ("final label submitted (`PUT /datastore/label`: checks, RTSTRUCT + SEG, STOW-RS)", "submit_s"),
            ("new RTSTRUCT listed by QIDO-RS after the answer", "visible_s"),
            ("**total: infer to RTSTRUCT in Orthanc**", "total_s")]
    print("| step | median | min | max |\n| --- | --- | --- | --- |")
    for name, key in rows:
        values = [r[key] for r in runs]
        print(f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s |")
    if runs:
        print(f"| total, first run alone (the model is loaded on the first request) | {runs[0]['total_s']:.2f} s | | |")
    if server_hwm is not None:
        extra = f" (+ {len(server_children)} child processes)" if server_children else ""
        print(f"| peak RSS (VmHWM): server{extra} / Orthanc | {server_hwm:.0f} MB / {orthanc_hwm:.0f} MB | | |")


def _children(pid: int) -> list[int]:
    """PIDs of the processes ``pid`` started (none known without psutil)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


if __name__ == "__main__":
    main()
