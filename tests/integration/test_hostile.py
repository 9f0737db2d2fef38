"""A hostile web page and a hostile client against the real server, as the README starts it.

One ``monailabel start_server`` on 127.0.0.1 with authentication off (the README's start), on
copies of the app (the synthetic weights) and of the sample data, with one granted browser origin
(``--conf cors_origins http://viewer.example``) and one inference at a time with one more waiting
(``--conf max_concurrent_infer 1 --conf max_queued_infer 1``). Its ``TMPDIR`` is a folder of the
test, so a file a request leaves behind is seen. The probes are those of issue 28: routes ContourCL
did not write (``/session`` archives, ``/reload``, ``/infer/wsi*``, ``/batch/infer``), any web
page's origin, DNS rebinding (a foreign ``Host``), cross-site form posts, an infer that asks to
store a final label, simultaneous inferences, and params no JSON parser should choke on.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from contourcl.data.labels import STORED_LABELS, model_labels
from contourcl.serving.security import NOT_SERVED, ROUTE_ROLES
from contourcl.testing import REPO, start_monailabel, stop_process, wait_until_serving

pytestmark = pytest.mark.timeout(300)

VIEWER = "http://viewer.example"  # the one origin the server grants
EVIL = "http://evil.example"
LABELED, UNLABELED = "synthetic_hn_000", "synthetic_hn_004"


@pytest.fixture(scope="module")
def server(tmp_path_factory, app_sandbox):
    base = tmp_path_factory.mktemp("hostile")
    app, studies = app_sandbox(base, weights=("synthetic",))
    tmp = base / "tmp"
    tmp.mkdir()
    conf = {"models": "oar", "weights": "synthetic", "skip_scoring": "true", "cors_origins": VIEWER,
            "max_concurrent_infer": 1, "max_queued_infer": 1}
    env = {"MONAI_LABEL_AUTH_ENABLE": None, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TMPDIR": str(tmp),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = base / "server.log"
    proc, url = start_monailabel(app, studies, conf, log, cwd=base, env=env, new_session=True)
    try:
        wait_until_serving(proc, url, log, timeout=240)
        yield {"url": url, "studies": studies, "app": app, "tmp": tmp, "log": log, "base": base,
               "host": url.split("//", 1)[1]}
    finally:
        stop_process(proc, timeout=20)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _label_bytes(server) -> bytes:
    return (server["studies"] / "labels" / "final" / f"{LABELED}.nii.gz").read_bytes()


# -- every route owned ---------------------------------------------------------------------------
def _explicit_row(method: str, path: str):
    """The role of the first row of the role table that names ``method path``; ``NOT_SERVED`` if none does."""
    path = path.replace("{", "").replace("}", "").replace(":path", "")
    for methods, pattern, role in ROUTE_ROLES:
        if methods != "*" and method not in methods.split():
            continue
        base = pattern[:-2] if pattern.endswith("/*") else None
        if (base is not None and (path == base or path.startswith(base + "/"))) or path == pattern:
            return role
    return NOT_SERVED


def test_every_mounted_route_has_an_owner_and_a_role(server):
    r = requests.get(f"{server['url']}/info/routes", timeout=30)
    assert r.status_code == 200, r.text
    routes = r.json()["routes"]
    assert len(routes) > 30, routes  # hidden routes (include_in_schema=False) are listed too
    paths = {x["path"] for x in routes}
    assert {"/", "/favicon.ico", "/info/routes", "/infer/{model}", "/datastore/label"} <= paths
    unowned = []
    for route in routes:
        assert route["owner"] in ("contourcl", "monailabel"), route
        assert route["role"] != NOT_SERVED, route
        unowned += [(m, route["path"]) for m in route["methods"] if _explicit_row(m, route["path"]) == NOT_SERVED]
    assert not unowned, f"mounted routes the role table does not serve: {unowned}"
    for gone in ("/session", "/reload", "/infer/wsi", "/batch"):
        assert not [p for p in paths if p.startswith(gone)], (gone, sorted(paths))


def _session_tar(marker: Path) -> bytes:
    """A tar whose members write outside any folder: ``../`` climbing, an absolute path, a link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("../../../../../../.." + str(marker) + "-climb", str(marker) + "-absolute", "radonc/main.py"):
            data = b"import os; os.system('touch " + str(marker).encode() + b"-ran')\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/"
        tar.addfile(link)
    return buf.getvalue()


def test_routes_not_served_answer_404_and_write_nothing(server):
    url, tmp = server["url"], server["tmp"]
    marker = server["base"] / "pwned"
    before_tmp, before_app = _tree(tmp), _tree(server["app"])
    tar = _session_tar(marker)
    r = requests.put(f"{url}/session/?uncompress=true", files={"files": ("session.tar", tar)}, timeout=60)
    assert r.status_code == 404, r.text
    assert requests.post(f"{url}/reload", timeout=30).status_code == 404
    big = os.urandom(3 * 1024 * 1024)
    outside = str(REPO / "sample-data" / f"{LABELED}.nii.gz")  # a CT outside the server's datastore
    for path, kw in (
        (f"/infer/wsi/oar?image={outside}", {}),
        ("/infer/wsi/oar", {"json": {"image": outside, "_upload": outside}}),
        ("/infer/wsi_v2/oar", {"files": {"file": ("big.nii.gz", big)}, "data": {"wsi": json.dumps({"image": outside})}}),
        ("/batch/infer/oar", {"json": {}}),
    ):
        r = requests.post(url + path, timeout=60, **kw)
        assert r.status_code == 404, (path, r.status_code, r.text[:300])
    for method in ("GET", "PUT", "DELETE"):
        assert requests.request(method, f"{url}/session/anything", timeout=30).status_code == 404
    assert not list(server["base"].glob("pwned*")), "an archive member or an uploaded app ran"
    assert _tree(tmp) == before_tmp, "a refused request left files in the server's temporary folder"
    assert _tree(server["app"]) == before_app
    # the datastore's own routes still answer, and the one infer route keeps its path rule
    r = requests.post(f"{url}/infer/oar?image={outside}", timeout=60)
    assert r.status_code == 400 and "not allowed" in r.json()["detail"], r.text


# -- browsers -----------------------------------------------------------------------------------
def test_only_the_named_origin_gets_a_cors_grant(server):
    url = server["url"]
    r = requests.get(f"{url}/info/", headers={"Origin": EVIL}, timeout=30)
    assert "access-control-allow-origin" not in r.headers, dict(r.headers)
    r = requests.get(f"{url}/info/", headers={"Origin": VIEWER}, timeout=30)
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == VIEWER
    for origin, granted in ((EVIL, False), (VIEWER, True)):
        r = requests.options(f"{url}/datastore/label", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"})
        assert (r.headers.get("access-control-allow-origin") == origin) is granted, (origin, r.status_code, dict(r.headers))
        if not granted:
            assert r.status_code >= 400, dict(r.headers)  # and, above, no access-control-allow-origin


def test_the_host_header_must_name_this_server(server):
    url, port = server["url"], server["host"].rsplit(":", 1)[1]
    for host, ok in ((f"localhost:{port}", True), (f"127.0.0.1:{port}", True), (f"[::1]:{port}", True),
                     ("evil.example", False), (f"evil.example:{port}", False), (f"127.0.0.1.evil.example:{port}", False)):
        r = requests.get(f"{url}/datastore/?output=all", headers={"Host": host}, timeout=30)
        assert (r.status_code == 200) is ok, (host, r.status_code, r.text[:300])
        if not ok:
            assert r.status_code == 400 and "allowed_hosts" in r.json()["detail"]


def test_cross_site_requests_are_refused_and_change_nothing(server):
    url, studies = server["url"], server["studies"]
    label_before = _label_bytes(server)
    before = _tree(studies)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    label = {"label": ("l.nii.gz", label_before)}
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}):
        for method, path, kw in (
            ("POST", "/activelearning/random", {"data": "strategy=random", "headers": form}),
            ("PUT", f"/datastore/label?image={UNLABELED}&tag=final", {"files": label}),
            ("POST", "/train/oar", {"data": "max_epochs=1", "headers": form}),
            ("POST", f"/infer/oar?image={UNLABELED}", {"data": "params={}", "headers": form}),
            ("DELETE", f"/datastore/label?id={LABELED}&tag=final", {}),
        ):
            kw = dict(kw)
            r = requests.request(method, url + path, headers={**kw.pop("headers", {}), **headers}, timeout=60, **kw)
            assert r.status_code == 403 and "cross-site" in r.json()["detail"], (headers, method, path, r.status_code, r.text[:300])
    # a page on another site that embeds the server's data (an image tag): refused too
    r = requests.get(f"{url}/datastore/image?image={LABELED}", timeout=30,
                     headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"})
    assert r.status_code == 403, r.status_code
    assert _tree(studies) == before and _label_bytes(server) == label_before, "a refused request changed the datastore"
    assert requests.get(f"{url}/train/", timeout=30).status_code in (200, 404)
    assert "RUNNING" not in requests.get(f"{url}/train/", timeout=30).text
    # the server's own pages (same origin), the granted origin, a followed link, and non-browsers
    for headers in ({"Origin": f"http://{server['host']}"}, {"Origin": VIEWER}, {"Sec-Fetch-Site": "same-origin"}, {}):
        r = requests.post(f"{url}/activelearning/random", headers=headers, timeout=60)
        assert r.status_code == 200, (headers, r.status_code, r.text[:300])
    r = requests.get(f"{url}/info/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, timeout=30)
    assert r.status_code == 200


# -- infer --------------------------------------------------------------------------------------
def test_infer_never_writes_a_final_label(server):
    url, studies = server["url"], server["studies"]
    params = {"save_label": True, "label_tag": "final"}
    r = requests.post(f"{url}/infer/oar?image={UNLABELED}&output=json", data={"params": json.dumps(params)}, timeout=120)
    assert r.status_code == 200, r.text
    assert not (studies / "labels" / "final" / f"{UNLABELED}.nii.gz").exists(), "infer stored a final label"
    assert requests.get(f"{url}/datastore/label?label={UNLABELED}&tag=final", timeout=30).status_code == 404
    # what it keeps is the proposal, in the stored numbering (oar's values, nothing read as GTV)
    original = studies / "labels" / "original" / f"{UNLABELED}.nii.gz"
    assert original.is_file()
    values = set(np.unique(np.asarray(nib.load(str(original)).dataobj)).astype(int)) - {0}
    assert values and values <= {STORED_LABELS[s] for s in model_labels("oar")}, values


def test_inferences_are_bounded_and_the_rest_are_told_when_to_retry(server):
    url = server["url"]
    n = 6
    start = threading.Barrier(n)

    def one(_):
        start.wait()
        t0 = time.monotonic()
        r = requests.post(f"{url}/infer/oar?image={LABELED}&output=json", timeout=180)
        return r.status_code, r.headers.get("retry-after"), r.text, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 503}, answers
    assert 1 <= codes.count(200) <= n - 1 and codes.count(503) >= 1, codes
    for code, retry, text, _ in answers:
        if code == 503:
            assert retry is not None and int(retry) >= 1, (retry, text)
            assert "max_concurrent_infer 1" in text and "busy" in text
    status = requests.get(f"{url}/info/", timeout=30).json()["security"]
    assert status["running"] == 0 and status["queued"] == 0 and status["max_concurrent_infer"] == 1
    r = requests.post(f"{url}/infer/oar?image={LABELED}&output=json", timeout=180)
    assert r.status_code == 200, "a slot is free again"


def test_infer_answers_in_the_format_asked(server):
    """MONAI Label's result parameters (issue 33): OHIF and Slicer ask for a uint8 NRRD; an unknown
    extension is refused before any work, naming the allowed ones; no file is left behind."""
    url, tmp = server["url"], server["tmp"]
    before_tmp = _tree(tmp)
    for bad in ({"result_extension": ".png"}, {"result_extension": ".nrrd", "result_dtype": "uint9"}):
        r = requests.post(f"{url}/infer/oar?image={LABELED}&output=image", data={"params": json.dumps(bad)}, timeout=60)
        assert r.status_code == 422, (bad, r.status_code, r.text[:300])
        assert all(x in r.json()["detail"] for x in ((".nii.gz", ".nii", ".nrrd") if "result_dtype" not in bad else ("uint8",))), r.text
    r = requests.post(f"{url}/infer/oar?image={LABELED}&output=image", timeout=120)
    assert r.status_code == 200 and 'nii.gz"' in r.headers["content-disposition"], r.headers
    nifti = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
    ohif = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}  # what the OHIF panel sends
    r = requests.post(f"{url}/infer/oar?image={LABELED}&output=image", data={"params": json.dumps(ohif)}, timeout=120)
    assert r.status_code == 200 and '.nrrd"' in r.headers["content-disposition"], r.headers
    head, _, body = r.content.partition(b"\n\n")
    assert head.startswith(b"NRRD000") and b"type: uint8" in head and b"encoding: raw" in head, head
    assert len(body) == nifti.size  # one byte a voxel: what OHIF puts into its labelmap as it is
    got = np.frombuffer(body, np.uint8)
    assert {v: int((got == v).sum()) for v in range(1, 8)} == {v: int((nifti == v).sum()) for v in range(1, 8)}
    assert _tree(tmp) == before_tmp, "an answer left a file in the server's temporary folder"


# -- input errors ---------------------------------------------------------------------------------
def test_bad_params_get_422_not_500(server):
    url = server["url"]
    deep = "{\"a\":" * 5000 + "1" + "}" * 5000
    nested = "{\"a\":" * 40 + "1" + "}" * 40
    label = {"label": ("l.nii.gz", _label_bytes(server))}
    before = _label_bytes(server)
    for params in (deep, nested, '{"label_info": [{"name": "Mandible", "idx": 1e400}]}', '{"label_info": [{"name": "Mandible", "idx": NaN}]}',
                   '{"x": -Infinity}'):
        r = requests.put(f"{url}/datastore/label?image={LABELED}&tag=final", files=label, data={"params": params}, timeout=60)
        assert r.status_code == 422, (params[:60], r.status_code, r.text[:300])
        r = requests.post(f"{url}/infer/oar?image={LABELED}", data={"params": params}, timeout=60)
        assert r.status_code == 422, (params[:60], r.status_code, r.text[:300])
    assert _label_bytes(server) == before


def test_control_characters_cannot_forge_a_log_line(server):
    url = server["url"]
    requests.post(f"{url}/x%0D%0AFORGED-LINE%20admin%20logged%20in", headers={"Origin": EVIL}, timeout=30)
    deadline = time.time() + 10
    while "FORGED-LINE" not in server["log"].read_text() and time.time() < deadline:
        time.sleep(0.2)
    lines = server["log"].read_text().splitlines()
    assert any("\\r\\nFORGED-LINE" in line for line in lines), "the refusal is logged, escaped"
    assert not [line for line in lines if line.startswith("FORGED-LINE")], "a client wrote a line of its own into the log"
