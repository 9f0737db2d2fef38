"""Reference contours that cannot be right, found from the CT and the label alone.

A reference structure that fails a check is *set aside*: it is treated as not contoured (as
OpenKBP's partial labels are), so it is neither trained on (the partial-label loss,
:mod:`contourcl.training.finetune.partial_label_loss`, does not count it) nor scored
(:mod:`contourcl.evaluation`), and ``contourcl evaluate`` names it with the reason. The checks are
physical impossibilities, not judgements of a contour's shape, and look only at the slices that
image the patient (:func:`contourcl.data.volumes.imaged_slices`):

1. **Registration.** Organs of soft tissue or bone (:data:`SOLID`) hold no air. When more than
   :data:`MAX_AIR_FRACTION` of such an organ's voxels are air (below
   :data:`~contourcl.data.volumes.TISSUE_HU`), the structure set was not drawn on this CT, and
   every structure of the label is set aside. (OpenKBP: pt_221's parotids are 35 % and 26 % air,
   its spinal cord runs through the vertebral bodies; every other solid organ of the 203 patients
   is at most 3.4 % air.)
2. **Tubes.** The spinal cord and the oesophagus (:data:`TUBES`) are 1-2 cm across. When a
   structure's median axial cross-section exceeds :data:`MAX_TUBE_CM2`, the label holds another
   structure under that name (OpenKBP: pt_215's and pt_216's "SpinalCord" fill the back of the
   neck, 18 and 35 cm²; three "Esophagus" contours ring the trachea's air column, 6.8-8.1 cm²;
   the medians over the 203 patients are 1.3 and 1.5 cm², the largest others 2.8 and 2.3 cm²).
   That structure alone is set aside.

``python -m contourcl.training.experiments.reference_check --data ../shared/data/openkbp`` prints both figures for
every OpenKBP patient and what is set aside.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from contourcl.data.volumes import TISSUE_HU, imaged_slices

#: structures of soft tissue or bone: no air inside (the larynx and oesophagus may hold air)
SOLID = ("Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible")
#: above this share of air, a solid organ was not drawn on this CT
MAX_AIR_FRACTION = 0.10
#: tubes a few centimetres square in cross-section at most
TUBES = ("SpinalCord", "Esophagus")
#: median axial cross-section above which a tube is another structure (a disc 2.5 cm across)
MAX_TUBE_CM2 = 5.0


def needs_check(labels: Mapping[str, int]) -> bool:
    """Whether ``labels`` (``{name: value}``) hold a structure the checks look at (the gtv target does not)."""
    return any(name in labels for name in (*SOLID, *TUBES))


def structure_figures(ct: np.ndarray, label: np.ndarray, affine: np.ndarray, labels: Mapping[str, int],
                      imaged: tuple[int, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Per structure of ``labels`` (``{name: value}`` in ``label``'s numbering) drawn on the imaged
    slices: its share of air (``air``) and its median axial cross-section in cm² (``cross_section_cm2``)."""
    affine = np.asarray(affine, dtype=np.float64)
    axis, kept = imaged_slices(ct, affine) if imaged is None else imaged
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pixel_cm2 = float(np.prod([spacing[a] for a in range(3) if a != axis])) / 100.0
    ct_slices = np.moveaxis(np.asarray(ct), axis, 0)[kept]
    label_slices = np.moveaxis(np.asarray(label), axis, 0)[kept]
    out = {}
    for name, value in labels.items():
        inside = label_slices == value
        per_slice = inside.sum(axis=(1, 2))
        if not per_slice.any():
            continue
        out[name] = {"air": float((ct_slices[inside] < TISSUE_HU).mean()),
                     "cross_section_cm2": float(np.median(per_slice[per_slice > 0]) * pixel_cm2)}
    return out


def implausible_structures(ct: np.ndarray, label: np.ndarray, affine: np.ndarray, labels: Mapping[str, int],
                           imaged: tuple[int, np.ndarray] | None = None) -> dict[str, str]:
    """``{name: reason}`` of the structures in ``label`` to set aside (the module's two checks).

    ``ct`` in HU and ``label`` on the same grid (``affine``); ``labels`` is ``{name: value}`` in
    ``label``'s numbering; ``imaged``: :func:`~contourcl.data.volumes.imaged_slices` of ``ct`` when
    the caller has it.
    """
    return faults(structure_figures(ct, label, affine, labels, imaged))


def faults(figures: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """``{name: reason}`` of the structures to set aside, from their :func:`structure_figures`."""
    unregistered = [f"{name} is {f['air']:.0%} air" for name, f in figures.items()
                    if name in SOLID and f["air"] > MAX_AIR_FRACTION]
    if unregistered:
        reason = f"not drawn on this CT ({', '.join(unregistered)}; a solid organ holds no air)"
        return {name: reason for name in figures}
    return {name: f"median cross-section {f['cross_section_cm2']:.1f} cm², more than the {MAX_TUBE_CM2:g} cm² "
                  f"a spinal cord or oesophagus (1-2 cm across) can have: another structure"
            for name, f in figures.items() if name in TUBES and f["cross_section_cm2"] > MAX_TUBE_CM2}


def set_aside(label: np.ndarray, labels: Mapping[str, int], faults: Mapping[str, str]) -> np.ndarray:
    """``label`` with the structures named in ``faults`` set to background (not contoured)."""
    if not faults:
        return label
    out = np.array(label, copy=True)
    out[np.isin(out, [labels[name] for name in faults])] = 0
    return out


def checked_reference(ct: np.ndarray, label: np.ndarray, affine: np.ndarray, labels: Mapping[str, int],
                      imaged: tuple[int, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """``label`` with its implausible structures set aside, and ``{name: reason}`` of those."""
    if not needs_check(labels):
        return label, {}
    faults = implausible_structures(ct, label, affine, labels, imaged)
    return set_aside(label, labels, faults), faults
