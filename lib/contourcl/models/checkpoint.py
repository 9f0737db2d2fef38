"""The model file: a network's weights with everything needed to use it.

One ``.pt`` file holds the network configuration, its weights, the structures it contours
(name -> output channel), the preprocessing it was trained with (spacing, window, slice size),
its largest-component rule (files written before the rule was recorded leave it to the caller),
and its provenance and validation figures. Serving, fine-tuning and benchmarks all read it
through :func:`load_model`, so a model can never be run with the wrong preprocessing.

Every file written by :func:`save_model` records where its encoder came from,
``provenance["encoder"]`` (issue 32; :func:`encoder_provenance`): ``{"source": "random"}``; a
pretraining checkpoint (``"pretrained"``: its method, steps, data and sha256); another model file it
continued from (``"continued"``); or, for the server's retraining, the model served before it
(``"retrained"``). Files written before the record say it from what they hold (the fine-tuning
config's ``init``, ``started_from``): :func:`encoder_provenance` derives it the same way.

A model file is data, never code: it is read with ``torch.load(weights_only=True)``, which
refuses any pickled object but tensors and plain containers, so a file uploaded by a client
cannot run anything when it is loaded (:func:`check_model_file` validates one fully).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from contourcl.data.labels import model_labels
from contourcl.data.transforms import DEFAULT_SPACING, DEFAULT_WINDOW
from contourcl.errors import InvalidModelError
from contourcl.files import sha256_file
from contourcl.models.networks import ContourUNet, NetConfig, build_network

FORMAT = "contourcl-model/1"

logger = logging.getLogger(__name__)


@dataclass
class ModelMeta:
    """Everything in a model file but the weights."""

    model: str  # "oar" or "gtv"
    labels: dict[str, int]  # structure name -> output channel (0 is background)
    net: dict  # NetConfig as a dict
    spacing: tuple[float, float] = DEFAULT_SPACING
    window: tuple[float, float] = DEFAULT_WINDOW
    roi: tuple[int, int] = (128, 128)
    metrics: dict = field(default_factory=dict)  # e.g. {"val_dice": ..., "val_ids": [...]}
    provenance: dict = field(default_factory=dict)  # data, command, init checkpoint, epochs, encoder (its origin)
    created: str = ""
    #: keep only the largest connected component of each structure when contouring; None: the
    #: file does not say (the contouring caller's default applies, e.g. the app's model config)
    largest_component: bool | None = None
    #: average the prediction with that of the left-right mirrored CT (``*_R``/``*_L`` swapped):
    #: test-time augmentation, chosen on validation cases when the model was trained
    tta_flip: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["window"] = list(self.window)
        d["roi"] = list(self.roi)
        return d


def pretraining_provenance(path: str | Path) -> dict:
    """``{"source": "pretrained", "checkpoint", ...}`` of a pretraining checkpoint: its method, steps,
    data (the CTs' number and folder) and sha256 when the file is there (else only its path)."""
    out: dict = {"source": "pretrained", "checkpoint": str(path)}
    if not Path(path).is_file():
        out["note"] = "the checkpoint is not on this machine"
        return out
    out["sha256"] = sha256_file(path)
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
        meta = dict(ckpt.get("meta", {})) if isinstance(ckpt, dict) else {}
    except Exception as err:  # noqa: BLE001 -- provenance must not stop a save
        out["note"] = f"unreadable: {type(err).__name__}"
        return out
    images = [str(i) for i in (meta.get("config") or {}).get("images", [])]
    folder = os.path.commonpath(images) if images else ""
    out.update(method=meta.get("method"), steps=meta.get("iterations"),
               data=f"{meta.get('num_cases', len(images))} CTs" + (f" under {folder}" if folder else ""))
    return out


def derive_encoder_provenance(provenance: dict, read_files: bool = True) -> dict:
    """Where the encoder of a file with this ``provenance`` came from (see the module docstring).

    ``read_files``: describe the pretraining checkpoint or the model file it started from when it
    is on this machine (its sha256, method, steps; the started-from file's own encoder)."""
    config = provenance.get("config") or {}
    init, started = config.get("init"), provenance.get("started_from")
    if init:
        return pretraining_provenance(init) if read_files else {"source": "pretrained", "checkpoint": str(init)}
    if started:
        out: dict = {"source": "continued", "from": str(started)}
        if read_files and Path(started).is_file():
            out["sha256"] = sha256_file(started)
            try:
                out["from_encoder"] = encoder_provenance(read_meta(started), read_files=False)
            except Exception as err:  # noqa: BLE001
                out["note"] = f"unreadable: {type(err).__name__}"
        return out
    if "trained_on" in provenance:  # the server's retraining continues the model served before it
        return {"source": "retrained", "from": "the model served before it"}
    return {"source": "random"}


def encoder_provenance(meta: ModelMeta, read_files: bool = False) -> dict:
    """The file's ``provenance["encoder"]``, or what it holds says (:func:`derive_encoder_provenance`)."""
    recorded = meta.provenance.get("encoder")
    if isinstance(recorded, dict) and recorded.get("source"):
        return dict(recorded)
    return derive_encoder_provenance(meta.provenance, read_files=read_files)


_ENCODER_CACHE: dict[tuple[str, int, int], dict] = {}


def encoder_of_file(path: str | Path) -> dict:
    """:func:`encoder_provenance` of a model file, cached for the file's state (mtime, size): a
    served summary asks for it on every call."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = encoder_provenance(read_meta(path))
    return dict(_ENCODER_CACHE[key])


def trace_retrained(encoder: dict, earlier_files: list[Path]) -> dict:
    """A ``"retrained"`` encoder with its first origin: the first of ``earlier_files`` (a model
    store's versions, oldest first) whose encoder is not itself retrained, as ``"origin"``."""
    if encoder.get("source") != "retrained":
        return encoder
    for f in earlier_files:
        try:
            found = encoder_of_file(f)
        except Exception:  # noqa: BLE001 -- a broken archive file says nothing about the origin
            continue
        if found.get("source") != "retrained":
            return {**encoder, "origin": found, "origin_file": Path(f).name}
    return encoder


def describe_encoder(encoder: dict) -> str:
    """One line for people: ``random init``, ``separeg pretraining, 300 steps, 40 CTs under DIR (sha256 1a2b3c4d5e6f)``..."""
    source = encoder.get("source", "?")
    if source == "random":
        return "random init"
    sha = f" (sha256 {encoder['sha256'][:12]})" if encoder.get("sha256") else ""
    if source == "pretrained":
        parts = [f"{encoder.get('method') or '?'} pretraining"]
        if encoder.get("steps") is not None:
            parts.append(f"{encoder['steps']} steps")
        if encoder.get("data"):
            parts.append(str(encoder["data"]))
        return ", ".join(parts) + f"{sha}: {encoder.get('checkpoint')}"
    if source == "continued":
        inner = encoder.get("from_encoder")
        return f"continued from {encoder.get('from')}{sha}" + (f", whose encoder: {describe_encoder(inner)}" if inner else "")
    if source == "retrained":
        origin = encoder.get("origin")
        return "retrained from the model served before it" + (f"; first: {describe_encoder(origin)}" if origin else "")
    return str(source)


def save_model(path: str | Path, network: ContourUNet, meta: ModelMeta, half: bool = False) -> Path:
    """Write ``network`` and ``meta`` atomically (a temporary file, then ``os.replace``).

    ``half=True`` stores the weights as float16 (half the file; they are cast back to float32
    on load): used for the weights shipped in the repository. A tensor with a value float16
    cannot hold (above 65504, e.g. a BatchNorm running variance) stays float32 (:func:`_half`):
    cast, it would become infinite and the file would fail :func:`check_model_file`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S")
    if not (isinstance(meta.provenance.get("encoder"), dict) and meta.provenance["encoder"].get("source")):
        meta.provenance = {**meta.provenance, "encoder": derive_encoder_provenance(meta.provenance)}
    state = {k: (_half(k, v) if half and v.is_floating_point() else v).detach().cpu() for k, v in network.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "meta": meta.to_dict(), "state_dict": state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _half(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float16, or unchanged when float16 would turn a finite value infinite."""
    half = tensor.half()
    if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(tensor).all()):
        return half
    logger.info("%s keeps float32: its values reach %.4g, beyond float16's %.0f", name, float(tensor.abs().max()), torch.finfo(torch.float16).max)
    return tensor


def read_meta(path: str | Path) -> ModelMeta:
    """The :class:`ModelMeta` of a model file (loads the file; weights are dropped)."""
    return _load(path)[0]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ContourUNet, ModelMeta]:
    """The network (in eval mode, float32, on ``device``) and its meta."""
    meta, state = _load(path)
    network = build_network(NetConfig(**meta.net))
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return network.to(device).eval(), meta


def check_model_file(path: str | Path, model: str) -> ModelMeta:
    """Validate ``path`` as a servable ``model`` file, or raise :class:`InvalidModelError`.

    Checks everything serving relies on: the format, that the file is ``model``'s and contours
    its structures under their numbers, that the weights fit the network the file describes,
    and that the network runs on a slice and gives one output per structure and background.
    """
    meta, state = _load(path)
    expected = model_labels(model)
    if meta.model != model:
        raise InvalidModelError(f"{Path(path).name} is a {meta.model!r} model, not {model!r}")
    if dict(meta.labels) != expected:
        raise InvalidModelError(f"{Path(path).name} contours {dict(meta.labels)}, but the {model!r} model contours {expected}")
    channels = int(meta.net.get("in_channels", 1))
    if channels < 1 or channels % 2 == 0:
        raise InvalidModelError(f"{Path(path).name}: the network takes {channels} input channels; a ContourCL network takes one "
                                "slice, or one slice and as many neighbours on each side (an odd number)")
    try:
        network = build_network(NetConfig(**meta.net))
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        with torch.no_grad():
            out = network.eval()(torch.zeros(1, network.config.in_channels, 64, 64))
    except Exception as err:
        raise InvalidModelError(f"{Path(path).name}: the weights do not fit the network it describes ({type(err).__name__}: {err})") from err
    if out.shape[1] != len(expected) + 1:
        raise InvalidModelError(f"{Path(path).name}: the network gives {out.shape[1]} outputs, the {model!r} model needs {len(expected) + 1}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise InvalidModelError(f"{Path(path).name}: the weights hold NaN or infinite values")
    return meta


def _load(path: str | Path) -> tuple[ModelMeta, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        # data only: anything but tensors and plain containers is refused, nothing is executed
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidModelError(f"{path.name} is not a ContourCL model file: it cannot be read as weights and plain data ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InvalidModelError(f"{path.name} is not a ContourCL model file (format {FORMAT})")
    try:
        m = dict(ckpt["meta"])
        m["spacing"] = tuple(m["spacing"])
        m["window"] = tuple(m["window"])
        m["roi"] = tuple(m["roi"])
        meta = ModelMeta(**m)
        if meta.largest_component not in (None, True, False):
            raise ValueError(f"largest_component is {meta.largest_component!r}, not true, false or absent")
        if meta.tta_flip not in (True, False):
            raise ValueError(f"tta_flip is {meta.tta_flip!r}, not true or false")
        state = ckpt["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("state_dict is not a mapping of tensors")
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidModelError(f"{path.name} is not a ContourCL model file: {type(err).__name__}: {err}") from err
    return meta, state
