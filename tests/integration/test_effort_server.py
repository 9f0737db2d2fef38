"""Correction effort through the real server (issue 30, items 1-3).

The real ``monailabel start_server`` on copies of the app (synthetic weights) and of the sample
data. ``oar`` contours two CTs; one gets its reference as the final label (submitted in Slicer's
numbering), the other gets the proposal back unchanged. The unchanged one must show Dice 1.0, no
added path and no changed slice; the other, per structure, the Dice of the served answer against
the submitted label (checked against a Dice computed here) and the model version that answered.
``/info/`` and ``contourcl effort`` must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from contourcl.data.labels import from_model, model_labels, to_model
from contourcl.testing import REPO, infer_answer, sandbox, start_monailabel, stop_process, wait_until_serving

pytestmark = [pytest.mark.timeout(300)]
CORRECTED, ACCEPTED = "synthetic_hn_000", "synthetic_hn_003"  # the first has a reference in sample-data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("effort")
    app, studies = sandbox(base, REPO, weights=("synthetic",))
    reference = studies / "labels" / "final" / f"{CORRECTED}.nii.gz"
    kept = base / "reference.nii.gz"
    reference.rename(kept)  # the clinician's contour, submitted during the test
    conf = {"models": "oar", "weights": "synthetic", "skip_scoring": "true"}
    env = {"MONAI_LABEL_AUTH_ENABLE": None, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc, url = start_monailabel(app, studies, conf, base / "server.log", cwd=base, env=env, new_session=True)
    try:
        wait_until_serving(proc, url, base / "server.log", timeout=240)
        yield {"url": url, "studies": studies, "reference": kept, "base": base}
    finally:
        stop_process(proc, timeout=20)


def _infer(url: str, image: str) -> tuple[np.ndarray, np.ndarray, dict]:
    r = requests.post(f"{url}/infer/oar", params={"image": image}, timeout=180)
    assert r.status_code == 200, r.text
    return infer_answer(r)


def _submit(url: str, image: str, stored: np.ndarray, affine: np.ndarray, base: Path) -> None:
    """As Slicer submits: its own segment order, named in label_info."""
    order = ["Mandible", "GTV", "Brainstem", "Parotid_R", "Parotid_L", "SpinalCord", "Larynx", "Esophagus"]
    from contourcl.data.labels import STORED_LABELS

    slicer = np.zeros(stored.shape, np.uint8)
    for idx, name in enumerate(order, start=1):
        slicer[stored == STORED_LABELS[name]] = idx
    path = base / f"{image}-final.nii.gz"
    nib.save(nib.Nifti1Image(slicer, affine), str(path))
    with open(path, "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"}, files={"label": (path.name, f)},
                         data={"params": json.dumps({"label_info": [{"name": n, "idx": i} for i, n in enumerate(order, start=1)]})}, timeout=120)
    assert r.status_code == 200, r.text


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_every_final_label_is_scored_against_what_was_proposed(server):
    url, studies, base = server["url"], server["studies"], server["base"]
    proposed, affine, params = _infer(url, CORRECTED)
    accepted, accepted_affine, accepted_params = _infer(url, ACCEPTED)
    version = params["model_version"]
    assert version and accepted_params["model_version"] == version
    # the answers are remembered, with the model version that gave them
    kept = json.loads((studies / ".contourcl" / "effort" / "proposals" / "oar" / f"{CORRECTED}.json").read_text())
    assert kept["model_version"] == version and kept["model"] == "oar"

    reference = nib.load(str(server["reference"]))
    ref_stored = np.asarray(reference.dataobj).astype(np.int64)
    _submit(url, CORRECTED, ref_stored, reference.affine, base)
    _submit(url, ACCEPTED, from_model(accepted, "oar"), accepted_affine, base)

    effort = requests.get(f"{url}/info/", timeout=60).json()["correction_effort"]
    records = [json.loads(line) for line in (studies / ".contourcl" / "effort" / "records.jsonl").read_text().splitlines()]
    by_image = {r["image"]: r for r in records}
    assert set(by_image) == {CORRECTED, ACCEPTED} and all(r["model"] == "oar" and r["model_version"] == version for r in records)

    unchanged = by_image[ACCEPTED]["structures"]
    assert unchanged, "the accepted proposal is scored"
    for name, s in unchanged.items():
        assert (s["dice"], s["added_path_length_mm"], s["changed_slices"], s["change"]) == (1.0, 0.0, 0, "unchanged"), (name, s)

    corrected = by_image[CORRECTED]["structures"]
    truth = to_model(ref_stored, "oar")
    for name, value in model_labels("oar").items():
        if not ((proposed == value).any() or (truth == value).any()):
            assert name not in corrected
            continue
        s = corrected[name]
        if (truth == value).any():
            assert abs(s["dice"] - _dice(proposed == value, truth == value)) <= 0.01, (name, s)
        assert s["change"] in ("edited", "added", "deleted") and s["changed_slices"] > 0 and s["added_path_length_mm"] >= 0
    assert sum(s["added_path_length_mm"] for s in corrected.values()) > 0

    # /info/ and the command agree
    assert effort["oar"][version]["images"] == 2
    run = subprocess.run([str(Path(sys.executable).parent / "contourcl"), "effort", "--studies", str(studies)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    for name, figures in effort["oar"][version]["structures"].items():
        apl = figures["added_path_length_mm"]
        assert f"| oar | {version} | 2 | {name} | {apl['median']:.0f} [{apl['iqr'][0]:.0f}, {apl['iqr'][1]:.0f}]" in run.stdout, (name, run.stdout)


def test_a_final_label_with_no_proposal_is_stored_and_says_so(server):
    url, studies, base = server["url"], server["studies"], server["base"]
    image = "synthetic_hn_004"
    img = nib.load(str(studies / f"{image}.nii.gz"))
    stored = np.zeros(img.shape, np.int64)
    stored[10:20, 10:20, 5:8] = 5
    _submit(url, image, stored, img.affine, base)
    assert (studies / "labels" / "final" / f"{image}.nii.gz").is_file()
    records = [json.loads(line) for line in (studies / ".contourcl" / "effort" / "records.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["image"] == image]
    assert len(mine) == 1 and mine[0]["structures"] is None and "no model proposed" in mine[0]["note"]
    # a torn last line (a crash mid-write) does not stop /info/ nor the next save
    with open(studies / ".contourcl" / "effort" / "records.jsonl", "a") as f:
        f.write('{"image": "torn", "mod')
    assert requests.get(f"{url}/info/", timeout=60).status_code == 200
    _submit(url, image, stored, img.affine, base)
    lines = (studies / ".contourcl" / "effort" / "records.jsonl").read_text().splitlines()
    assert lines[-2] == '{"image": "torn", "mod'
    assert json.loads(lines[-1])["image"] == image, "the save after the torn line is recorded on a line of its own"
