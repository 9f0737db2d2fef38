"""Final labels pushed to the treatment planning system by DICOM C-STORE.

A planning system (or a PACS) takes RT Structure Sets by C-STORE to its AE title, not by
DICOMweb. ``--conf dicom_push AE@HOST:PORT[,AE2@HOST2:PORT2]`` names the nodes: after each final
label of an image that came from a DICOM series (a studies folder of series, a DICOMweb PACS),
the RT Structure Set that ContourCL wrote on the series (:mod:`contourcl.serving.series`) is sent
to every node, and the DICOM SEG too with ``--conf dicom_push_seg true``.

Sending never blocks or fails the label's saving: :meth:`DicomPush.on_final_label` (a datastore
final-label listener) only queues the send; a background thread sends it. A node that does not
answer, refuses the association, does not accept the SOP class or answers a failure status is
named in the log and in ``/info/`` (``"dicom_push"``), and the send is retried with a backoff
(``--conf dicom_push_retry_s``, doubling up to ``--conf dicom_push_retry_max_s``). The queue is
kept in ``<studies>/.contourcl/dicom_push.json``, so sends not done survive a restart. A newer
final label of the same image replaces its older send still waiting for that node.

Other keys: ``--conf dicom_push_ae`` (the calling AE title, default ``CONTOURCL``),
``--conf dicom_push_timeout_s`` (connection and each DIMSE exchange, default 30).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from contourcl.errors import ConfigError
from contourcl.files import atomic_write_text
from contourcl.serving.conf import conf_positive

logger = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "CONTOURCL"
DEFAULT_RETRY_S = 30.0
DEFAULT_RETRY_MAX_S = 900.0
DEFAULT_TIMEOUT_S = 30.0
_NODE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")
_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")  # the DICOM AE VR: printable ASCII, no backslash


class PushError(RuntimeError):
    """A send to one node failed; the message names the node and what it answered."""


@dataclass(frozen=True)
class Node:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_nodes(value) -> list[Node]:
    """The nodes of ``--conf dicom_push`` (``AE@HOST:PORT``, comma-separated); a malformed one
    raises :class:`ConfigError` naming it."""
    nodes = []
    for item in str(value or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = _NODE.match(item)
        port = int(m["port"]) if m else 0
        ae = m["ae"].strip() if m else ""
        if not m or not ae or not _AE_CHARS.match(ae) or not 0 < port < 65536:
            raise ConfigError(f"--conf dicom_push {item!r}: give AE@HOST:PORT (an AE title of 1-16 characters, "
                              "a host name or address, a port 1-65535), several separated by commas")
        nodes.append(Node(ae, m["host"].strip("[]"), port))
    if not nodes:
        raise ConfigError(f"--conf dicom_push {value!r}: no node given (AE@HOST:PORT)")
    return nodes


def c_store(node: Node, files, *, calling_ae: str = DEFAULT_CALLING_AE, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Send the DICOM ``files`` to ``node`` in one association; their SOP instance UIDs, or
    :class:`PushError` saying what the node did (no answer, refused, a context or status refused)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import uid_to_sop_class

    datasets = [pydicom.dcmread(str(f)) for f in files]
    try:  # a node that is down is told apart from one that refuses (pynetdicom reports both as aborted)
        socket.create_connection((node.host, node.port), timeout=timeout_s).close()
    except OSError as err:
        raise PushError(f"{node} does not answer ({err.strerror or err}: down, or the wrong host or port)") from None
    ae = AE(ae_title=calling_ae)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, timeout_s)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        stored = [str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == uid]
        ae.add_requested_context(uid, list(dict.fromkeys([*stored, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if assoc.is_rejected:
        reason = getattr(getattr(assoc, "acceptor", None), "primitive", None)
        detail = f" (result {reason.result_str}, {reason.reason_str})" if reason is not None and hasattr(reason, "reason_str") else ""
        raise PushError(f"{node} refused the association from {calling_ae}{detail}")
    if assoc.is_aborted:
        raise PushError(f"{node} aborted the association")
    if not assoc.is_established:
        raise PushError(f"{node} does not answer (no DICOM association within {timeout_s:g} s: down, or the wrong host or port)")
    sent = []
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        for ds in datasets:
            uid = str(ds.SOPClassUID)
            if uid not in accepted:
                name = getattr(uid_to_sop_class(uid), "__name__", uid)
                raise PushError(f"{node} does not accept {name} ({uid}) in {ds.file_meta.TransferSyntaxUID.name}")
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise PushError(f"{node} gave no C-STORE answer for {ds.SOPInstanceUID} (connection lost or timed out)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or the warnings of a stored instance
                raise PushError(f"{node} refused {ds.Modality} {ds.SOPInstanceUID}: C-STORE status 0x{code:04X}")
            sent.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


class DicomPush:
    """The push queue and its sender thread for the nodes of ``--conf dicom_push``.

    ``store`` is the datastore (a :class:`~contourcl.serving.datastore.SafeDatastore`): its
    ``get_label_info`` says which RTSTRUCT and SEG the final label was written as. ``studies`` is
    its folder (the cache folder for a DICOMweb PACS), where the queue is kept.
    """

    def __init__(self, nodes: list[Node], store, studies: str | Path, *, send_seg: bool = False,
                 calling_ae: str = DEFAULT_CALLING_AE, retry_s: float = DEFAULT_RETRY_S,
                 retry_max_s: float = DEFAULT_RETRY_MAX_S, timeout_s: float = DEFAULT_TIMEOUT_S, start: bool = True):
        self.nodes = list(nodes)
        self.store = store
        self.queue_path = Path(studies) / ".contourcl" / "dicom_push.json"
        self.send_seg = send_seg
        self.calling_ae = calling_ae
        self.retry_s, self.retry_max_s, self.timeout_s = retry_s, retry_max_s, timeout_s
        self._cond = threading.Condition()
        self._stop = False
        self._jobs: list[dict] = self._load()
        self._state = {str(n): {"last_ok": None, "last_error": None, "last_error_time": None, "sent": 0} for n in self.nodes}
        self._thread = None
        if start:
            self.start()

    @classmethod
    def from_conf(cls, conf: dict, store, studies, **kwargs) -> DicomPush | None:
        """The pusher ``--conf dicom_push`` asks for, or ``None`` when it names no node."""
        if not str(conf.get("dicom_push", "") or "").strip():
            return None
        ae = str(conf.get("dicom_push_ae", DEFAULT_CALLING_AE)).strip()
        if not ae or len(ae) > 16 or not _AE_CHARS.match(ae):
            raise ConfigError(f"--conf dicom_push_ae {ae!r}: an AE title of 1-16 printable characters")
        return cls(parse_nodes(conf["dicom_push"]), store, studies, calling_ae=ae,
                   send_seg=str(conf.get("dicom_push_seg", "false")).strip().lower() == "true",
                   retry_s=conf_positive(conf, "dicom_push_retry_s", DEFAULT_RETRY_S, "seconds"),
                   retry_max_s=conf_positive(conf, "dicom_push_retry_max_s", DEFAULT_RETRY_MAX_S, "seconds"),
                   timeout_s=conf_positive(conf, "dicom_push_timeout_s", DEFAULT_TIMEOUT_S, "seconds"), **kwargs)

    # -- the queue ----------------------------------------------------------------------------
    def _load(self) -> list[dict]:
        try:
            jobs = json.loads(self.queue_path.read_text())["jobs"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        known = {str(n) for n in self.nodes}
        out = [dict(j, due=0.0) for j in jobs if isinstance(j, dict) and j.get("node") in known and j.get("files")]
        if out:
            logger.info("DICOM push: %d send(s) left from before, sent again now", len(out))
        return out

    def _save(self) -> None:
        jobs = [{k: j[k] for k in ("image", "node", "files", "attempts", "error", "queued")} for j in self._jobs]
        try:
            atomic_write_text(self.queue_path, json.dumps({"jobs": jobs}, indent=1))
        except OSError as err:  # the sends still run; only a restart would forget them
            logger.warning("DICOM push: the queue could not be written to %s: %s", self.queue_path, err)

    def files_of(self, image_id: str) -> list[str]:
        """The RTSTRUCT (and SEG with ``send_seg``) the final label of ``image_id`` was written as."""
        info = self.store.get_label_info(image_id, "final") or {}
        if info.get("imported_from_pacs"):  # a SEG of the PACS made into a label: it was sent when it was made
            return []
        dicom = info.get("dicom") or {}
        if not dicom.get("rtstruct"):
            dicom = self._export(image_id)
        kinds = ("rtstruct", "seg") if self.send_seg else ("rtstruct",)
        return [str(dicom[k]) for k in kinds if dicom.get(k)]

    def _export(self, image_id: str) -> dict:
        """The RTSTRUCT and SEG of a final label not written as DICOM yet (``--conf dicom_export false``)."""
        import nibabel as nib
        import numpy as np

        from contourcl.serving.series import export_label

        path = self.store.get_label_uri(image_id, "final")
        if not path:
            return {}
        img = nib.load(str(path))
        return export_label(self.queue_path.parent.parent, image_id, np.asarray(img.dataobj).astype(np.uint8), img.affine,
                            "final", "clinician-reviewed")

    def on_final_label(self, image_id: str, path=None) -> None:
        """A datastore final-label listener: queue the label's sends (never blocks, never raises)."""
        try:
            files = self.files_of(image_id)
        except Exception as err:  # noqa: BLE001 - the label is stored; the push must not fail it
            logger.warning("DICOM push: final label of %s stored, but no DICOM file to send: %s", image_id, err)
            return
        if not files:
            logger.info("DICOM push: final label of %s has no RT Structure Set to send (not from a DICOM series)", image_id)
            return
        now = time.time()
        with self._cond:
            for node in self.nodes:
                self._jobs = [j for j in self._jobs if not (j["image"] == image_id and j["node"] == str(node))]
                self._jobs.append({"image": image_id, "node": str(node), "files": files, "attempts": 0, "error": None,
                                   "queued": time.strftime("%Y-%m-%dT%H:%M:%S"), "due": now})
            self._save()
            self._cond.notify_all()

    # -- the sender -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="contourcl-dicom-push", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    now = time.time()
                    due = [j for j in self._jobs if j["due"] <= now]
                    if due:
                        job = min(due, key=lambda j: j["due"])
                        break
                    wait = min((j["due"] for j in self._jobs), default=now + 3600) - now
                    self._cond.wait(max(0.01, wait))
                if self._stop:
                    return
            self._send(job)

    def _node(self, name: str) -> Node:
        return next(n for n in self.nodes if str(n) == name)

    def _send(self, job: dict) -> None:
        node = self._node(job["node"])
        missing = [f for f in job["files"] if not Path(f).is_file()]
        try:
            if missing:
                raise PushError(f"the file(s) to send to {node} are gone: {missing}")
            uids = c_store(node, job["files"], calling_ae=self.calling_ae, timeout_s=self.timeout_s)
        except Exception as err:  # noqa: BLE001 - any failure is a retry, named
            message = str(err) if isinstance(err, PushError) else f"{node}: {type(err).__name__}: {err}"
            retry = None
            with self._cond:
                state = self._state[job["node"]]
                state["last_error"], state["last_error_time"] = message, time.strftime("%Y-%m-%dT%H:%M:%S")
                job["attempts"] += 1
                job["error"] = message
                if any(j is job for j in self._jobs):
                    if missing:  # nothing to retry: the files were removed
                        self._jobs = [j for j in self._jobs if j is not job]
                    else:
                        retry = min(self.retry_max_s, self.retry_s * 2 ** (job["attempts"] - 1))
                        job["due"] = time.time() + retry
                    self._save()
            logger.warning("DICOM push of the final label of %s to %s failed (attempt %d)%s: %s", job["image"], node,
                           job["attempts"], f"; retried in {retry:g} s" if retry is not None else "; not retried", message)
            return
        logger.info("DICOM push: final label of %s sent to %s (%s)", job["image"], node, ", ".join(uids))  # before it is done
        with self._cond:
            state = self._state[job["node"]]
            state["last_ok"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            state["sent"] += len(uids)
            if any(j is job for j in self._jobs):
                self._jobs = [j for j in self._jobs if j is not job]
                self._save()

    def status(self) -> dict:
        """``{node: {"last_ok", "last_error", "last_error_time", "sent", "pending"}}`` for ``/info/``."""
        with self._cond:
            out = {}
            for node in self.nodes:
                name = str(node)
                pending = [j for j in self._jobs if j["node"] == name]
                out[name] = {**self._state[name], "pending": len(pending),
                             "pending_images": sorted({j["image"] for j in pending})}
            return out

    def wait_idle(self, timeout: float) -> bool:
        """Whether every queued send is done within ``timeout`` seconds (for tests and shutdown)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._cond:
                if not self._jobs:
                    return True
            time.sleep(0.05)
        return False
