"""OHIF, the viewer MONAI Label serves at ``/ohif/``, in a real headless Chromium (selenium), against
the real server on a real Orthanc: what a clinician does in it, checked voxel for voxel.

Orthanc (DICOMweb, 127.0.0.1) holds two phantom CT series, one head first and one feet first,
each 96 x 80 pixels (not square). The real ``monailabel start_server`` serves them (``--studies``
Orthanc's DICOMweb root, the synthetic weights). In Chromium:

1. the study list shows both studies;
2. in *MONAI Label* mode the panel connects and lists ``oar_seg``/``gtv_seg`` under
   *Auto-Segmentation* and ``oar``/``gtv`` under *Point Prompts*; running ``oar_seg`` fills a
   labelmap equal, voxel for voxel, to the server's own answer placed by the series' DICOM headers
   (:func:`contourcl.testing.as_ohif_shows`), for both series;
3. *Next Sample* opens a study (the answer carries its ``StudyInstanceUID``);
4. after a final label, the SEG and the RT Structure Set ContourCL stored in Orthanc open in the
   basic viewer where the label is: the SEG's labelmap voxel for voxel, the RT Structure Set's
   contours on the label's slices and within a voxel of its extent on each;
5. OHIF's own *Export DICOM SEG* of ``oar_seg``'s labelmap (the command its segmentation panel
   runs, called in the page), stored in Orthanc through ``/proxy/dicom``, comes back as the
   head-first CT's final label (``--conf dicomweb_import_seg all``) where it was drawn.

Set ``CONTOURCL_SCREENSHOTS`` to a folder to keep screenshots of the run (the docs' come from here).
Skipped, with the reason, where Chromium, its driver, selenium or Orthanc is missing (``.ci/run``
installs them).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from contourcl.data.dicom_series import read_series_geometry, write_ct_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.phantom import make_phantom
from contourcl.data.rtstruct import to_series_grid
from contourcl.testing import (
    as_ohif_shows,
    find_chromium,
    find_orthanc,
    ohif_slices,
    start_chromium,
    start_monailabel,
    start_orthanc,
    stop_process,
    wait_until_serving,
)

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(find_orthanc() is None, reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)"),
    pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium is not installed (pip install -e '.[test]')"),
]

PHANTOMS = {"hfs": (21, "HFS"), "ffs": (22, "FFS")}  # name: (seed, PatientPosition)
GRID = {"shape": (96, 80, 14), "spacing": (4.0, 4.0, 5.0)}  # 96 x 80 pixels: not square

#: every labelmap segmentation OHIF holds: its segments' names and its voxels, either a volume's
#: (cornerstone3D's order: columns fastest, then rows, then slices; MONAI Label mode) or one image
#: per CT slice, each with the position of the CT image it lies on (a SEG in the basic viewer)
LABELMAPS = """
const cs = window.cornerstone;
const voxels = x => Array.from(x.voxelManager ? (x.voxelManager.getCompleteScalarDataArray ? x.voxelManager.getCompleteScalarDataArray()
                                                 : x.voxelManager.getScalarData()) : (x.getScalarData ? x.getScalarData() : x.getPixelData()));
return window.services.segmentationService.getSegmentations().flatMap(s => {
  const rep = (s.representationData || {}).Labelmap;
  if (!rep) return [];
  const names = {};
  for (const k in s.segments || {}) if (s.segments[k]) names[k] = s.segments[k].label;
  if (rep.volumeId) {
    const volume = cs.cache.getVolume(rep.volumeId);
    return volume ? [{names: names, dims: Array.from(volume.dimensions), data: voxels(volume)}] : [];
  }
  const slices = (rep.imageIds || []).map(id => cs.cache.getImage(id)).filter(i => i);
  return [{names: names, slices: slices.map(i => ({rows: i.rows, columns: i.columns, data: voxels(i),
    position: cs.metaData.get('imagePlaneModule', i.referencedImageId).imagePositionPatient}))}];
});
"""
#: every contour segmentation (an RT Structure Set): per segment, its name and its contours' points (LPS, mm)
CONTOURS = """
return window.services.segmentationService.getSegmentations().flatMap(s => {
  const rep = (s.representationData || {}).Contour;
  if (!rep) return [];
  return (rep.geometryIds || []).map(id => {
    const set = window.cornerstone.cache.getGeometry(id).data;
    return {name: s.segments[set.segmentIndex].label, contours: set.contours.map(c => c.points)};
  });
});
"""


#: OHIF's own *Export DICOM SEG*: the command its segmentation panel runs, on the one segmentation,
#: into the active data source (the PACS, through /proxy/dicom); ``window.__stored`` says how it ended
STORE_SEG = """
window.__stored = null;
const segmentation = window.services.segmentationService.getSegmentations()[0];
Promise.resolve(window.extensionManager._commandsManager.runCommand('storeSegmentation',
  {segmentationId: segmentation.segmentationId, dataSource: window.extensionManager.getActiveDataSource()[0]}, 'SEGMENTATION'))
  .then(() => { window.__stored = 'stored'; }, e => { window.__stored = 'failed: ' + e; });
"""


def _until(check, timeout: float, what: str, every: float = 0.5):
    """``check()``'s first truthy value within ``timeout`` seconds; else fail naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 -- the page is still changing under us
            value = None
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"within {timeout:.0f} s: {what}")


def _shot(driver, name: str) -> None:
    folder = os.environ.get("CONTOURCL_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _double_click(driver, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).double_click(element).perform()


def _by_text(driver, css: str, text: str):
    hits = [e for e in driver.find_elements("css selector", css) if e.text.strip().startswith(text)]
    return hits[0] if hits else None


@pytest.fixture(scope="module")
def clinic(tmp_path_factory, app_sandbox):
    """Orthanc with the two series, the real server on it, and a headless Chromium."""
    root = tmp_path_factory.mktemp("ohif")
    series, truth = {}, {}
    procs, driver = [], None
    try:
        orthanc, orthanc_url = start_orthanc(root / "orthanc")
        procs.append(orthanc)
        for name, (seed, position) in PHANTOMS.items():
            ct, truth[name], affine = make_phantom(seed, **GRID)
            files = write_ct_series(ct, affine, root / name, patient_id=f"phantom_{name}", patient_position=position)
            for f in files:
                requests.post(f"{orthanc_url}/instances", data=Path(f).read_bytes(), timeout=30).raise_for_status()
            series[name] = SimpleNamespace(folder=root / name, geometry=read_series_geometry(root / name), affine=affine)
        app, _ = app_sandbox(root, weights=None, studies=False)
        server, url = start_monailabel(app, f"{orthanc_url}/dicom-web", {"models": "all", "weights": "synthetic", "skip_scoring": "true",
                                                                           "dicomweb_import_seg": "all", "dicomweb_refresh_s": "1"},
                                       root / "server.log", env={"OMP_NUM_THREADS": "1"})
        procs.append(server)
        wait_until_serving(server, url, root / "server.log")
        driver = start_chromium()
        yield SimpleNamespace(url=url, orthanc=orthanc_url, series=series, truth=truth, app=app, root=root, driver=driver)
    finally:
        if driver is not None:
            driver.quit()
        for proc in reversed(procs):
            stop_process(proc)


def _cached_image(clinic, name: str) -> nib.Nifti1Image:
    uid = clinic.series[name].geometry.series_uid
    (path,) = (clinic.app / "dicomweb-cache").glob(f"*/{uid}.nii.gz")
    return nib.load(path)


def _open_monai_label_mode(driver, url: str, study_uid: str) -> None:
    driver.get(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
    connect = _until(lambda: driver.find_element("css selector", "table.settingsTable button.actionButton"), 90, "the MONAI Label panel")
    _until(lambda: driver.execute_script("return window.services.displaySetService.getActiveDisplaySets().length"), 60, "the series loaded")
    connect.click()  # the server's URL comes from the cookie set before
    _until(lambda: _options(driver, "Point Prompts"), 60, "the panel listing the models")


def _options(driver, tab: str) -> list[str]:
    """The models the panel's section ``tab`` (its title) lists."""
    return [o.get_attribute("value") for o in driver.find_elements("xpath", f"//label[text()='{tab}']/following-sibling::div//select/option")]


def _labelmap(driver, folder: Path) -> dict:
    """OHIF's one labelmap, with ``array`` ``[slice, row, column]`` in :func:`ohif_slices`' order
    of the series in ``folder`` (a labelmap of CT images placed by the positions of those images)."""
    def nonempty():
        return [m for m in driver.execute_script(LABELMAPS) if any(any(s["data"]) for s in m.get("slices", [m]))]

    (found,) = _until(nonempty, 120, "a labelmap with segments")
    if "dims" in found:
        cols, rows, slices = found["dims"]
        found["array"] = np.asarray(found["data"], dtype=np.int64).reshape(slices, rows, cols)
        return found
    positions = [np.array(ds.ImagePositionPatient, float) for ds in ohif_slices(folder)]
    found["array"] = np.zeros((len(positions), found["slices"][0]["rows"], found["slices"][0]["columns"]), np.int64)
    placed = set()
    for s in found["slices"]:
        (index,) = [i for i, p in enumerate(positions) if np.allclose(p, s["position"], atol=1e-3)]
        found["array"][index] = np.asarray(s["data"], dtype=np.int64).reshape(s["rows"], s["columns"])
        placed.add(index)
    assert placed == set(range(len(positions))), "a labelmap image on each CT slice"
    return found


def _in_ohif_numbers(label: np.ndarray, numbering: dict[str, int], names: dict[str, str]) -> np.ndarray:
    """``label`` (numbered by ``numbering``) renumbered as OHIF's segments ``names`` ({index: name})."""
    out = np.zeros(label.shape, np.int64)
    for index, name in names.items():
        if name in numbering:
            out[label == numbering[name]] = int(index)
    return out


def test_ohif_clinician_path(clinic):
    driver, url = clinic.driver, clinic.url
    studies = {name: s.geometry.study_uid for name, s in clinic.series.items()}

    # 1. the study list
    driver.get(f"{url}/ohif/")
    _until(lambda: all(f"phantom_{n}" in driver.find_element("tag name", "body").text for n in studies), 90, "both studies in the study list")
    banner = _by_text(driver, "button", "Confirm and Hide")  # OHIF's "investigational use only" notice, once per browser
    if banner is not None:
        banner.click()
    _shot(driver, "ohif-study-list")
    driver.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{url}/"})  # the panel's server, as a clinician types it

    # 2. MONAI Label mode: the models, and oar_seg's contours where the server put them
    client = MONAILabelClient(url, tmpdir=str(clinic.root))
    for name, study_uid in studies.items():
        _open_monai_label_mode(driver, url, study_uid)
        assert _options(driver, "Auto-Segmentation") == ["oar_seg", "gtv_seg"]
        assert _options(driver, "Point Prompts") == ["oar", "gtv"]
        driver.find_element("css selector", "button[title='Run Segmentation']").click()  # oar_seg: the first
        shown = _labelmap(driver, clinic.series[name].folder)
        _shot(driver, f"ohif-oar-{name}")
        answer_file, params = client.infer("oar", clinic.series[name].geometry.series_uid, {})
        answer = nib.load(answer_file)
        expected = as_ohif_shows(clinic.series[name].folder, _in_ohif_numbers(np.asanyarray(answer.dataobj), params["label_names"], shown["names"]),
                                 answer.affine)
        assert expected.any(), "the synthetic oar model contours the phantom"
        assert np.array_equal(shown["array"], expected), f"{name}: OHIF's labelmap is the server's answer, voxel for voxel"

    # 3. Next Sample opens a study
    _until(lambda: driver.find_element("css selector", "label[for=tab-1]"), 30, "the Active Learning section").click()
    _until(lambda: _by_text(driver, "button", "Next Sample"), 30, "the Next Sample button").click()
    _until(lambda: _by_text(driver, "button", "OK"), 30, "the next sample's form").click()
    _until(lambda: driver.switch_to.alert, 10, "the reload prompt").accept()
    opened = _until(lambda: driver.current_url.split("StudyInstanceUIDs=")[-1], 30, "a study opened")
    assert opened in studies.values(), driver.current_url
    _until(lambda: driver.execute_script("return window.services.displaySetService.getActiveDisplaySets().map(d => d.StudyInstanceUID)")
           == [opened], 90, "the next sample's CT shown")

    # 4. a final label: ContourCL's SEG and RT Structure Set, opened in the viewer
    name = "ffs"
    image = _cached_image(clinic, name)
    final = to_series_grid(clinic.truth[name], clinic.series[name].affine, SimpleNamespace(shape=image.shape, affine=image.affine)).astype(np.uint8)
    nib.save(nib.Nifti1Image(final, image.affine), str(clinic.root / "final.nii.gz"))
    client.save_label(clinic.series[name].geometry.series_uid, str(clinic.root / "final.nii.gz"), tag="final",
                      params={"label_info": [{"name": n, "idx": v} for n, v in STORED_LABELS.items()]})
    stored = set()
    for modality in ("SEG", "RTSTRUCT"):
        driver.get(f"{url}/ohif/viewer?StudyInstanceUIDs={studies[name]}")
        thumb = _until(lambda m=modality: _by_text(driver, "[data-cy='study-browser-thumbnail'], [id^='thumbnail-']", m), 90, f"the {modality} in the study")
        _double_click(driver, thumb)
        _until(lambda: _by_text(driver, "button", "Yes"), 60, f"OHIF offering to open the {modality}").click()
        if modality == "SEG":
            shown = _labelmap(driver, clinic.series[name].folder)
            expected = as_ohif_shows(clinic.series[name].folder, _in_ohif_numbers(final, STORED_LABELS, shown["names"]), image.affine)
            assert np.array_equal(shown["array"], expected), "the SEG where the label is, voxel for voxel"
        else:
            structures = _until(lambda: driver.execute_script(CONTOURS), 120, "the RT Structure Set's contours")
            _check_contours(structures, final, image.affine)
        stored.add(modality)
        _shot(driver, f"ohif-{modality.lower()}-{name}")
    assert stored == {"SEG", "RTSTRUCT"}

    # 5. OHIF's own export of oar_seg's labelmap becomes the head-first CT's final label
    name = "hfs"
    _open_monai_label_mode(driver, url, studies[name])
    driver.find_element("css selector", "button[title='Run Segmentation']").click()
    _labelmap(driver, clinic.series[name].folder)
    driver.execute_script(STORE_SEG)
    _until(lambda: [i for i in driver.find_elements("tag name", "input") if i.is_displayed() and not i.get_attribute("value")],
           30, "OHIF's dialog asking the SEG's name")[0].send_keys("OHIF export")
    _until(lambda: _by_text(driver, "button", "Save"), 30, "the dialog's Save button").click()
    assert _until(lambda: driver.execute_script("return window.__stored"), 60, "OHIF storing the SEG") == "stored"
    (cached,) = (clinic.app / "dicomweb-cache").glob("*/")
    final = cached / "labels" / "final" / f"{clinic.series[name].geometry.series_uid}.nii.gz"
    _until(lambda: requests.get(f"{url}/info/", timeout=30).ok and final.is_file(), 120, "the OHIF SEG imported as a final label")
    answer_file, params = client.infer("oar", clinic.series[name].geometry.series_uid, {})
    answer = np.asanyarray(nib.load(answer_file).dataobj)
    imported = np.asanyarray(nib.load(final).dataobj)
    for structure, value in params["label_names"].items():
        if (answer == value).any():
            np.testing.assert_array_equal(imported == STORED_LABELS[structure], answer == value, err_msg=structure)


def _check_contours(structures: list[dict], label: np.ndarray, affine: np.ndarray, voxel_mm: float = 4.0) -> None:
    """Each structure's contours lie on the slices the label has it on, and on each slice span the
    label's extent (voxel edges) within one voxel."""
    present = {n for n, v in STORED_LABELS.items() if (label == v).any()}
    assert {s["name"] for s in structures} == present
    ijk = np.indices(label.shape).reshape(3, -1).T
    lps = (np.c_[ijk, np.ones(len(ijk))] @ np.asarray(affine).T)[:, :3] * [-1.0, -1.0, 1.0]
    for s in structures:
        voxels = lps[(label == STORED_LABELS[s["name"]]).ravel()]
        points = np.concatenate([np.asarray(c, float).reshape(-1, 3) for c in s["contours"]])
        assert set(np.round(points[:, 2], 1)) == set(np.round(voxels[:, 2], 1)), f"{s['name']}: contours on the label's slices"
        for z in set(np.round(voxels[:, 2], 1)):
            v, p = voxels[np.round(voxels[:, 2], 1) == z][:, :2], points[np.round(points[:, 2], 1) == z][:, :2]
            for lo, hi in ((v.min(0) - voxel_mm / 2, p.min(0)), (v.max(0) + voxel_mm / 2, p.max(0))):
                assert np.all(np.abs(lo - hi) <= voxel_mm), f"{s['name']} at z={z}: contour extent {p.min(0)}..{p.max(0)}, label {v.min(0)}..{v.max(0)}"
