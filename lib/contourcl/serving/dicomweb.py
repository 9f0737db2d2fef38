"""A DICOMweb PACS (e.g. Orthanc) as the studies, through a local mirror.

``--studies http(s)://host:port/dicom-web`` makes the app keep a cache folder (see
:func:`cache_folder`) that is an ordinary :class:`~contourcl.serving.datastore.SafeDatastore`
folder, so every check of the local datastore runs unchanged and retraining reads the cache's
``final`` labels. :class:`PacsMirror` fills it:

- CT series are listed with QIDO-RS (``Modality=CT``, plus ``--conf dicomweb_search``) at start,
  and again in a background thread at most every ``--conf dicomweb_refresh_s`` seconds (when
  ``/info/`` or next sample is asked);
- a new or changed series (another instance count) is fetched with WADO-RS in the transfer
  syntax the PACS stores (``transfer-syntax=*``: Orthanc 1.10 cannot transcode JPEG 2000 and
  answers 500 otherwise), decoded by ContourCL's own reader with its geometry checks, and
  written as ``<cache>/<SeriesInstanceUID>.nii.gz``; the instances stay in
  ``<cache>/.contourcl/dicomweb/series/<image id>/`` for the export, and the series registry of
  :mod:`contourcl.serving.series` remembers its study and series;
- a series that is not a usable CT is listed with why in ``/info/`` (``refused_series``), and
  fetched again only when it changes;
- an accepted ``final`` label goes through every check of ``SafeDatastore.save_label``; its
  RTSTRUCT and SEG (:func:`contourcl.serving.series.export_label`) are then sent to the PACS with
  STOW-RS. A send that fails is answered 502, kept, and retried at the next refresh.

Nothing is downloaded from the internet. In MONAI Label's task subprocesses (training,
scoring) the cache is used as it is, without contacting the PACS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pydicom
import requests
from fastapi import HTTPException

from contourcl.data.dicom_series import read_series_geometry
from contourcl.errors import ContourCLError, UnsafeIdError
from contourcl.files import atomic_write_text
from contourcl.ids import check_id
from contourcl.serving.datastore import SafeDatastore
from contourcl.serving.series import convert_series, export_label, read_registry, write_registry

logger = logging.getLogger(__name__)

#: WADO-RS: the instances as the PACS stores them (any transfer syntax), decoded here
ORIGINAL_SYNTAX = (("application/dicom", "*"),)
#: QIDO-RS: what a series is listed with; its instance count tells a changed series
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "Modality")
DEFAULT_REFRESH_S = 60.0
DEFAULT_TIMEOUT_S = 60.0
INSTALL_HINT = "pip install dicomweb-client==0.60.1 (it comes with monailabel 0.8.5)"


class PacsError(RuntimeError):
    """The PACS did not answer, or answered with an error."""


def is_dicomweb(studies) -> bool:
    """``--studies`` names a DICOMweb server (``http://`` or ``https://``), not a folder."""
    return str(studies).strip().lower().startswith(("http://", "https://"))


def cache_folder(app_dir: str | Path, url: str, conf: dict | None = None) -> Path:
    """``--conf dicomweb_cache PATH``, else ``<app_dir>/dicomweb-cache/<host>_<port>_<path>``: one
    folder per PACS, kept across restarts (the labels live there)."""
    given = str((conf or {}).get("dicomweb_cache", "") or "").strip()
    if given:
        return Path(given).expanduser().resolve()
    parts = urlparse(url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    name = f"{parts.hostname}_{port}_{parts.path.strip('/')}".rstrip("_")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "pacs"
    return Path(app_dir).resolve() / "dicomweb-cache" / name


def image_id_of(series_uid: str) -> str:
    """The image id of a series: its SeriesInstanceUID (a valid UID is a safe id), else a hash of it."""
    try:
        return check_id(series_uid)
    except UnsafeIdError:
        return "s" + hashlib.sha1(series_uid.encode()).hexdigest()[:20]


#: what a next-sample answer carries of an image's series (MONAI Label's DICOMweb datastore's
#: fields): OHIF's panel shows them and opens ``StudyInstanceUIDs=<StudyInstanceUID>``
STUDY_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "StudyDate", "StudyTime", "Modality")


def study_ids(studies: str | Path, image_id: str, url: str | None = None) -> dict[str, str]:
    """The DICOM ids of the series an image came from (a DICOMweb PACS' series, or a series in a
    studies folder): :data:`STUDY_FIELDS` read from the registry and one header of the series,
    plus ``RetrieveURL`` (WADO-RS) when ``url`` is the PACS' DICOMweb root. ``{}`` for an image
    that came from no series (a NIfTI file)."""
    entry = read_registry(studies).get("images", {}).get(image_id)
    if not entry or not entry.get("series_uid"):
        return {}
    out = {"SeriesInstanceUID": str(entry["series_uid"])}
    if entry.get("study_uid"):
        out["StudyInstanceUID"] = str(entry["study_uid"])
    folder = Path(studies) / str(entry.get("folder", ""))
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(STUDY_FIELDS))
        except Exception:  # noqa: BLE001 (not a DICOM file: the next one)
            continue
        if str(ds.get("SeriesInstanceUID", "")) == out["SeriesInstanceUID"]:
            out.update({k: str(ds.get(k)) for k in STUDY_FIELDS if ds.get(k) not in (None, "") and k not in out})
            break
    if url and out.get("StudyInstanceUID"):
        out["RetrieveURL"] = f"{url.rstrip('/')}/studies/{out['StudyInstanceUID']}/series/{out['SeriesInstanceUID']}"
    return out


class _TimeoutSession(requests.Session):
    """A ``requests`` session whose requests time out (dicomweb-client passes no timeout)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def _client(url: str, timeout: float):
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` (HTTP basic auth from MONAI Label's
    ``MONAI_LABEL_DATASTORE_USERNAME``/``PASSWORD`` when set)."""
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError as err:
        raise PacsError(f"--studies {url}: a DICOMweb PACS needs the package dicomweb-client: {INSTALL_HINT}") from err
    from monailabel.config import settings

    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    session = _TimeoutSession(timeout)
    if user:
        session.auth = (user, password)
    client = DICOMwebClient(url=url, session=session)
    # dicomweb-client retries every error 5 times with 2-16 s waits (30 s before a down PACS is
    # reported); 3 tries 0.5 and 1 s apart still ride out a busy PACS' 503
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


def _search_filters(conf: dict) -> dict:
    """``Modality=CT`` plus ``--conf dicomweb_search '{"StudyDate": "20260101-"}'`` (QIDO-RS keys)."""
    extra = conf.get("dicomweb_search") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except ValueError as err:
            raise ValueError(f"--conf dicomweb_search: not a JSON object of QIDO-RS filters: {extra!r}") from err
    if not isinstance(extra, dict):
        raise ValueError(f"--conf dicomweb_search: not a JSON object of QIDO-RS filters: {extra!r}")
    return {**{str(k): v for k, v in extra.items()}, "Modality": "CT"}


class PacsMirror:
    """The CT series of a DICOMweb PACS, mirrored into ``cache`` (see the module docstring)."""

    def __init__(self, url: str, cache: str | Path, *, search: dict | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.strip().rstrip("/")
        self.cache = Path(cache)
        self.search = dict(search or {"Modality": "CT"})
        self.timeout = float(timeout)
        self.client = _client(self.url, self.timeout)
        self.last_sync: str | None = None
        self.last_error: str | None = None
        self._pending_lock = threading.Lock()  # the pending list is changed by requests and by the refresh

    @property
    def _dir(self) -> Path:
        return self.cache / ".contourcl" / "dicomweb"

    def _fail(self, what: str, err: Exception) -> PacsError:
        detail = str(err) or type(err).__name__
        return PacsError(f"the DICOMweb server {self.url} {what}: {detail}")

    # -- listing and fetching ---------------------------------------------------------------
    def _search(self, filters: dict, what: str) -> list[pydicom.Dataset]:
        """QIDO-RS series search, page by page (``offset``) until a page brings no new series: a
        server that ignores ``offset`` cannot loop it (dicomweb-client's ``get_remaining`` would)."""
        found: dict[str, pydicom.Dataset] = {}
        offset = 0
        for _ in range(100_000):
            try:
                page = self.client.search_for_series(search_filters=filters, fields=list(SERIES_FIELDS), offset=offset or None)
            except requests.RequestException as err:
                raise self._fail(f"does not answer a QIDO-RS search for {what} (is it running, and is the URL its DICOMweb root?)", err) from err
            except ValueError as err:
                raise self._fail(f"did not answer a QIDO-RS search for {what} with JSON (is the URL its DICOMweb root, e.g. .../dicom-web?)", err) from err
            if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
                raise PacsError(f"the DICOMweb server {self.url} did not answer a QIDO-RS search with DICOM JSON "
                                "(is the URL its DICOMweb root, e.g. http://host:8042/dicom-web?)")
            new = 0
            for item in page:
                ds = pydicom.Dataset.from_json(item)
                uid = str(ds.get("SeriesInstanceUID", "") or "")
                if uid and uid not in found:
                    found[uid] = ds
                    new += 1
            if not new:
                break
            offset += len(page)
        return list(found.values())

    def list_series(self) -> list[pydicom.Dataset]:
        """The PACS' series that match :attr:`search` (QIDO-RS, every page)."""
        return self._search(self.search, "CT series")

    def _fetch(self, study_uid: str, series_uid: str, image_id: str) -> Path:
        """Download a series (original transfer syntax) into a new folder; returns the folder."""
        tmp = self._dir / f".download.{image_id}.{os.getpid()}.{time.time_ns()}"
        tmp.mkdir(parents=True)
        try:
            count = 0
            for ds in self.client.iter_series(study_uid, series_uid, media_types=ORIGINAL_SYNTAX):
                sop = str(ds.get("SOPInstanceUID", "") or "")
                try:
                    name = f"{check_id(sop)}.dcm"
                except UnsafeIdError:
                    name = f"instance{count:05d}.dcm"
                ds.save_as(str(tmp / name), write_like_original=False)
                count += 1
            if not count:
                raise ContourCLError(f"series {series_uid}: the PACS sent no instances")
        except requests.RequestException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._fail(f"did not send series {series_uid} (WADO-RS)", err) from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _install(self, tmp: Path, image_id: str) -> Path:
        """Put a downloaded series folder in place of the image's (atomically for readers)."""
        final = self._dir / "series" / image_id
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = final.with_name(f".old.{image_id}.{time.time_ns()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def sync(self) -> dict:
        """Mirror the PACS' CT series into the cache; ``{"new", "changed", "refused", "images"}``.

        Raises :class:`PacsError` when the PACS does not answer (nothing in the cache changes for
        a series it could not send).
        """
        started = time.time()
        series = self.list_series()
        registry = read_registry(self.cache)
        images = registry.setdefault("images", {})
        state = registry.setdefault("dicomweb", {})
        state["url"] = self.url
        known = state.setdefault("series", {})
        counts = {"new": 0, "changed": 0, "refused": 0}
        try:  # what was fetched is recorded even when the PACS stops answering half-way
            for ds in series:
                series_uid = str(ds.get("SeriesInstanceUID", "") or "")
                study_uid = str(ds.get("StudyInstanceUID", "") or "")
                if not series_uid or not study_uid:
                    continue
                image_id = image_id_of(series_uid)
                instances = str(ds.get("NumberOfSeriesRelatedInstances", "") or "")
                entry = known.get(series_uid, {})
                have = (self.cache / f"{image_id}.nii.gz").is_file() and image_id in images
                if entry.get("instances") == instances and (entry.get("refused") or have):
                    continue
                tmp = self._fetch(study_uid, series_uid, image_id)
                try:
                    read_series_geometry(tmp, series_uid)  # headers only: refuse before replacing anything
                    folder = self._install(tmp, image_id)
                    images[image_id] = convert_series(self.cache, image_id, folder, series_uid, instances,
                                                      study_uid=study_uid, source=self.url)
                except (ContourCLError, OSError, ValueError) as err:
                    shutil.rmtree(tmp, ignore_errors=True)
                    known[series_uid] = {"image": image_id, "study_uid": study_uid, "instances": instances, "refused": str(err)}
                    counts["refused"] += 1
                    logger.warning("PACS series %s left out: %s", series_uid, err)
                    continue
                counts["changed" if entry else "new"] += 1
                known[series_uid] = {"image": image_id, "study_uid": study_uid, "instances": instances}
                logger.info("PACS series %s (%s instances) -> image %s", series_uid, instances, image_id)
        finally:
            registry["refused"] = {uid: e["refused"] for uid, e in known.items() if e.get("refused")}
            write_registry(self.cache, registry)
        self.last_sync = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.last_error = None
        counts["images"] = sum(1 for e in images.values() if e.get("source") == self.url)
        logger.info("PACS %s: %d CT series listed, %s (%.1f s)", self.url, len(series), counts, time.time() - started)
        return counts

    # -- SEGs already in the PACS --------------------------------------------------------------
    def seg_series(self) -> list[dict]:
        """The PACS' SEG series: ``[{"study_uid", "series_uid", "ct", "manufacturer", "when"}]``,
        read from each series' metadata (WADO-RS, no pixel data); ``ct`` is the SeriesInstanceUID
        its segments were drawn on."""
        out = []
        for ds in self._search({"Modality": "SEG"}, "SEG series"):
            study_uid, series_uid = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
            if not study_uid or not series_uid:
                continue
            out.append({"study_uid": study_uid, "series_uid": series_uid})
        return out

    def seg_metadata(self, study_uid: str, series_uid: str) -> dict:
        """``{"ct", "manufacturer", "when"}`` of a SEG series, from its first instance's metadata."""
        import warnings

        try:
            meta = self.client.retrieve_series_metadata(study_uid, series_uid)
        except (requests.RequestException, ValueError) as err:
            raise self._fail(f"did not send the metadata of SEG series {series_uid}", err) from err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bulk data (the frames) is not needed here
            ds = pydicom.Dataset.from_json(meta[0], bulk_data_uri_handler=lambda *args: b"") if meta else pydicom.Dataset()
        refs = ds.get("ReferencedSeriesSequence") or []
        ct = str(refs[0].get("SeriesInstanceUID", "") or "") if len(refs) else ""
        return {"ct": ct, "manufacturer": str(ds.get("Manufacturer", "") or ""),
                "when": f"{ds.get('ContentDate', '') or ''}{ds.get('ContentTime', '') or ''}"}

    def fetch_seg(self, study_uid: str, series_uid: str) -> list[Path]:
        """Download a SEG series' instances into ``<cache>/.contourcl/dicomweb/segs/<uid>/``."""
        tmp = self._fetch(study_uid, series_uid, image_id_of(series_uid))
        final = self._dir / "segs" / image_id_of(series_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return sorted(final.glob("*.dcm"))

    # -- sending contours back --------------------------------------------------------------
    def send(self, files, study_uid: str) -> dict[str, str]:
        """Store DICOM files in the PACS (STOW-RS to the study); ``{file name: SOPInstanceUID}``."""
        datasets = [pydicom.dcmread(str(f)) for f in files]
        try:
            answer = self.client.store_instances(datasets, study_instance_uid=study_uid)
        except requests.RequestException as err:
            raise self._fail("did not store the contours (STOW-RS)", err) from err
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{int(item.get('FailureReason', 0)):04X}" for item in failed)
            raise PacsError(f"the DICOMweb server {self.url} refused to store {reasons} (STOW-RS)")
        return {Path(f).name: str(ds.SOPInstanceUID) for f, ds in zip(files, datasets, strict=False)}

    def _pending_file(self) -> Path:
        return self._dir / "pending.json"

    def pending(self) -> list[dict]:
        """Exports not yet stored in the PACS: ``[{"image", "study_uid", "files", "error"}]``."""
        try:
            return json.loads(self._pending_file().read_text())
        except (OSError, ValueError):
            return []

    def _write_pending(self, items: list[dict]) -> None:
        atomic_write_text(self._pending_file(), json.dumps(items, indent=1))

    def add_pending(self, image_id: str, study_uid: str, files, error: str) -> None:
        with self._pending_lock:
            items = self.pending()
            items.append({"image": image_id, "study_uid": study_uid, "error": error,
                          "files": [str(Path(f).resolve().relative_to(self.cache.resolve())) for f in files]})
            self._write_pending(items)

    def send_pending(self) -> int:
        """Retry the exports a failed STOW-RS left behind; returns how many are still pending."""
        with self._pending_lock:
            items, left = self.pending(), []
            for item in items:
                files = [self.cache / f for f in item["files"]]
                if not all(f.is_file() for f in files):
                    logger.warning("pending export of %s dropped: its files are gone (%s)", item["image"], item["files"])
                    continue
                try:
                    stored = self.send(files, item["study_uid"])
                except PacsError as err:
                    left.append({**item, "error": str(err)})
                    continue
                logger.info("pending export of %s stored in the PACS: %s", item["image"], stored)
            if items:
                self._write_pending(left)
        return len(left)


class PacsDatastore(SafeDatastore):
    """A :class:`SafeDatastore` on a :class:`PacsMirror`'s cache folder: the same checks, the
    PACS refreshed every ``refresh_s`` seconds, accepted contours stored back in the PACS."""

    def __init__(self, mirror: PacsMirror, *, refresh_s: float = DEFAULT_REFRESH_S, offline: bool = False,
                 import_seg: str = "contourcl", **kwargs):
        if import_seg not in ("contourcl", "all", "none"):
            raise ValueError(f"--conf dicomweb_import_seg {import_seg!r}: one of contourcl, all, none")
        self.mirror = mirror
        self.import_seg = import_seg
        self.refresh_s = float(refresh_s)
        self.offline = offline  # a task subprocess: the cache as it is, no PACS requests
        self._sync_lock = threading.Lock()
        self._last_sync_at = time.monotonic()
        super().__init__(str(mirror.cache), **kwargs)

    def refresh_studies(self, force: bool = False, wait: bool = False) -> None:
        """Sync with the PACS if the last sync is older than ``refresh_s`` (or ``force``): in a
        background thread (a request is never held up by a download), or here with ``wait``. A
        PACS that does not answer now is logged and shown in ``/info/``; the cache is served."""
        if self.offline or not (force or time.monotonic() - self._last_sync_at >= self.refresh_s):
            return
        if not self._sync_lock.acquire(blocking=False):
            return  # a sync is running
        self._last_sync_at = time.monotonic()
        if wait:
            self._sync_and_release()
        else:
            threading.Thread(target=self._sync_and_release, name="pacs-refresh", daemon=True).start()

    def _sync_and_release(self) -> None:
        try:
            self.mirror.send_pending()
            counts = self.mirror.sync()
            if counts["new"] or counts["changed"]:
                self.refresh()
            self.import_segs()
        except (PacsError, ContourCLError, OSError) as err:
            self.mirror.last_error = str(err)
            logger.warning("PACS refresh failed; serving the cache as it is: %s", err)
        except Exception as err:  # a background thread: log what went wrong rather than die silently
            self.mirror.last_error = f"{type(err).__name__}: {err}"
            logger.exception("PACS refresh failed; serving the cache as it is")
        finally:
            self._sync_lock.release()

    def import_segs(self) -> dict[str, str]:
        """Make SEGs already in the PACS the ``final`` labels of cached images that have none.

        ``--conf dicomweb_import_seg``: ``contourcl`` (default: SEGs ContourCL made, e.g. this
        server's own exports when the cache is new), ``all`` (any SEG whose segment labels name
        the structures, through the RTSTRUCT alias table), ``none``. Each SEG series is looked
        at once; the newest SEG of a series wins. Returns ``{SEG series: what was done}``.
        """
        if self.import_seg == "none":
            return {}
        registry = read_registry(self.mirror.cache)
        segs = registry.setdefault("dicomweb", {}).setdefault("segs", {})
        images = registry.get("images", {})
        by_ct = {e["series_uid"]: i for i, e in images.items() if e.get("source") == self.mirror.url}
        done: dict[str, str] = {}
        candidates = []
        for item in self.mirror.seg_series():
            entry = segs.get(item["series_uid"])
            if entry is None:
                entry = segs[item["series_uid"]] = {**self.mirror.seg_metadata(item["study_uid"], item["series_uid"]), "status": "new"}
            if entry["status"] in ("new", "waiting"):
                candidates.append({**item, **entry})
        for item in sorted(candidates, key=lambda c: c["when"], reverse=True):
            entry = segs[item["series_uid"]]
            image_id = by_ct.get(item["ct"])
            if self.import_seg == "contourcl" and item["manufacturer"] != "ContourCL":
                entry["status"] = "skipped: not made by ContourCL (--conf dicomweb_import_seg all takes it)"
            elif image_id is None:
                entry["status"] = "waiting"  # its CT is not (yet) in the cache
            elif self.get_label_uri(image_id, "final"):
                entry["status"] = "skipped: the image has a final label"
            else:
                try:
                    entry["status"] = self._import_seg(item, image_id)
                except (ContourCLError, OSError, ValueError) as err:
                    entry["status"] = f"skipped: {err}"
                    logger.warning("SEG series %s not imported: %s", item["series_uid"], err)
            done[item["series_uid"]] = entry["status"]
        write_registry(self.mirror.cache, registry)
        return done

    def _import_seg(self, item: dict, image_id: str) -> str:
        import nibabel as nib

        from contourcl.data.labels import STORED_LABELS
        from contourcl.data.rtstruct import match_roi_names
        from contourcl.data.seg import read_seg

        source = self.mirror.cache / read_registry(self.mirror.cache)["images"][image_id]["folder"]
        files = self.mirror.fetch_seg(item["study_uid"], item["series_uid"])
        if len(files) != 1:
            raise ContourCLError(f"{len(files)} instances in the SEG series: one expected")
        geo = read_series_geometry(source, item["ct"])
        segments, numbers = read_seg(files[0], geometry=geo)
        mapped = match_roi_names(list(numbers), STORED_LABELS)
        if not mapped:
            raise ContourCLError(f"no segment label names a structure: {sorted(numbers)}")
        label = np.zeros(segments.shape, dtype=np.uint8)
        for name, structure in mapped.items():
            label[segments == numbers[name]] = STORED_LABELS[structure]
        image = nib.load(self.get_image_uri(image_id))
        tmp = self.mirror.cache / ".contourcl" / f".seg-import.{os.getpid()}.{time.time_ns()}.nii.gz"
        try:
            nib.save(nib.Nifti1Image(label, image.affine), str(tmp))
            self.save_label(image_id, str(tmp), "final", {"imported_from_pacs": item["series_uid"]})
        finally:
            tmp.unlink(missing_ok=True)
        unmapped = sorted(set(numbers) - set(mapped))
        logger.info("SEG series %s imported as the final label of %s (%s)%s", item["series_uid"], image_id,
                    ", ".join(f"{k} -> {v}" for k, v in mapped.items()), f"; not a structure: {unmapped}" if unmapped else "")
        return "imported" + (f" (not a structure: {unmapped})" if unmapped else "")

    def export_final(self, image_id: str, stored: np.ndarray, affine: np.ndarray, label_info: dict) -> dict:
        """Write the RTSTRUCT and SEG on the downloaded series and store them in the PACS.

        The label is stored in the cache already (every check passed). A failure here is
        answered 502 with what happened; a failed send is kept and retried at the next refresh.
        """
        if label_info.get("imported_from_pacs"):  # a SEG of the PACS itself: nothing to send back
            return {}
        registry = read_registry(self.mirror.cache).get("images", {}).get(image_id, {})
        study_uid = registry.get("study_uid")
        if not study_uid:  # an image put into the cache by hand: no series to contour on
            return super().export_final(image_id, stored, affine, label_info)
        try:
            written = export_label(self.mirror.cache, image_id, stored, affine, "final", "clinician-reviewed")
        except Exception as err:
            raise HTTPException(502, f"the final label of {image_id} is stored in the cache, but no RTSTRUCT/SEG could be "
                                     f"made on its series, so nothing was sent to the PACS: {err}") from err
        files = [written[k] for k in ("rtstruct", "seg") if k in written]
        try:
            stored_uids = self.mirror.send(files, study_uid)
        except PacsError as err:
            self.mirror.add_pending(image_id, study_uid, files, str(err))
            self.update_label_info(image_id, "final", {**label_info, "dicom": written, "pacs": {"pending": True, "error": str(err)}})
            raise HTTPException(502, f"the final label of {image_id} is stored in the cache and written as RTSTRUCT/SEG, "
                                     f"but not stored in the PACS yet (retried at the next refresh): {err}") from err
        logger.info("final label of %s stored in the PACS %s: %s", image_id, self.mirror.url, stored_uids)
        return {"dicom": written, "pacs": {"url": self.mirror.url, "study_uid": study_uid, "stored": stored_uids,
                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}

    def studies_status(self) -> dict:
        """What ``/info/`` says about the studies: a DICOMweb PACS, its cache and the last sync."""
        return {"kind": "dicomweb", "url": self.mirror.url, "cache": str(self.mirror.cache), "refresh_s": self.refresh_s,
                "syncing": self._sync_lock.locked(), "last_sync": self.mirror.last_sync, "last_error": self.mirror.last_error,
                "pending_exports": len(self.mirror.pending())}


def open_pacs(url: str, app_dir: str | Path, conf: dict, *, offline: bool = False, **datastore_kwargs) -> PacsDatastore:
    """The datastore of ``--studies URL``: a checked start (the PACS must answer), a first sync,
    then a :class:`PacsDatastore` on the cache. ``offline`` (MONAI Label's task subprocesses):
    the cache as the server left it, no request to the PACS."""
    conf = conf or {}
    cache = cache_folder(app_dir, url, conf)
    try:
        refresh_s = float(conf.get("dicomweb_refresh_s", DEFAULT_REFRESH_S))
        timeout = float(conf.get("dicomweb_timeout_s", DEFAULT_TIMEOUT_S))
    except ValueError as err:
        raise ValueError(f"--conf dicomweb_refresh_s / dicomweb_timeout_s: a number of seconds: {err}") from err
    mirror = PacsMirror(url, cache, search=_search_filters(conf), timeout=timeout)
    cache.mkdir(parents=True, exist_ok=True)
    if offline:
        logger.info("DICOMweb studies %s: using the cache %s as it is (task subprocess)", mirror.url, cache)
    else:
        logger.info("DICOMweb studies %s: cache %s", mirror.url, cache)
        mirror.send_pending()
        mirror.sync()  # a PACS that does not answer stops the start here, naming the URL
    store = PacsDatastore(mirror, refresh_s=refresh_s, offline=offline,
                          import_seg=str(conf.get("dicomweb_import_seg", "contourcl")).strip().lower(), **datastore_kwargs)
    if not offline:
        try:
            store.import_segs()
        except PacsError as err:  # the CTs are served; SEGs are looked for again at the next refresh
            mirror.last_error = str(err)
            logger.warning("SEGs of the PACS not imported now: %s", err)
    return store
