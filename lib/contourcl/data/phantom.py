"""Synthetic head-and-neck CT phantoms for tests, demos and the sample datastore.

Everything made here is SYNTHETIC: drawn from geometric primitives and a seeded random number
generator, never from patient data. A phantom is a crude, cartoon-like model of a head-and-neck
radiotherapy planning CT (coarse 4 x 4 x 3 mm voxels, like the OpenKBP grid) with a label map of
the structures this app contours (the seven OARs and a GTV), in the stored numbering of
:mod:`contourcl.data.labels`. Each seed is a different synthetic patient, and the same seed always
gives bit-identical arrays; what is modelled is listed in :func:`make_phantom`.

Orientation follows the OpenKBP NIfTI convention of this project (:func:`phantom_affine`): array
axis 0 runs anterior to posterior, axis 1 from the patient's right to left, axis 2 inferior to
superior, in RAS+ world millimetres centred on the volume. These phantoms are for exercising the
software; they are far simpler than real anatomy and must not be used to judge clinical
contouring accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from contourcl.data.labels import STORED_LABELS

__all__ = ["make_phantom", "phantom_affine", "write_phantom", "make_dataset", "DEFAULT_SHAPE", "DEFAULT_SPACING"]

DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 96)
#: Voxel size in mm along array axes 0 (anterior-posterior), 1 (right-left), 2 (inferior-superior).
DEFAULT_SPACING: tuple[float, float, float] = (4.0, 4.0, 3.0)

HU_OUTSIDE = -1024.0
HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024, 3071

_LAB = STORED_LABELS
_LUT_STEP = 0.5  # mm, resolution of the per-level profile tables


def phantom_affine(shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> np.ndarray:
    """RAS+ affine of a synthetic phantom grid, centred on the volume.

    Axis 0 runs anterior to posterior (world -y), axis 1 from the patient's right to left
    (world -x), axis 2 inferior to superior (world +z), as in the OpenKBP NIfTI files.
    """
    ni, nj, nk = (int(s) for s in shape)
    dr, dc, dz = (float(s) for s in spacing)
    return np.array(
        [
            [0.0, -dc, 0.0, dc * (nj - 1) / 2.0],
            [-dr, 0.0, 0.0, dr * (ni - 1) / 2.0],
            [0.0, 0.0, dz, -dz * (nk - 1) / 2.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (radians) about z (yaw), x (pitch) and y (roll)."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


class _Frame:
    """Nominal patient coordinates of every voxel, and per-level profile look-ups.

    ``X`` (+ = patient right) and ``Y`` (+ = anterior) are in-plane patient coordinates in
    nominal millimetres (divided by the case's in-plane size factors); ``rel`` is the level in
    millimetres relative to the skull base (negative below it, neck levels divided by the case's
    neck-length factor). Anatomy is described in these nominal coordinates.
    """

    def __init__(self, shape, spacing, rot, shift, skull_base, neck_len, size_lat, size_ap):
        ni, nj, nk = shape
        aff = phantom_affine(shape, spacing)
        xw = (aff[0, 1] * np.arange(nj) + aff[0, 3] - shift[0]).astype(np.float32)
        yw = (aff[1, 0] * np.arange(ni) + aff[1, 3] - shift[1]).astype(np.float32)
        zw = (aff[2, 2] * np.arange(nk) + aff[2, 3] - shift[2]).astype(np.float32)
        rt = rot.T.astype(np.float32)  # patient = R^T (world - shift)

        def comp(r):
            return r[0] * xw[None, :, None] + r[1] * yw[:, None, None] + r[2] * zw[None, None, :]

        self.X = comp(rt[0]) / np.float32(size_lat)
        self.Y = comp(rt[1]) / np.float32(size_ap)
        z = comp(rt[2])
        zmin = float(z.min()) - 1.0
        n = int((float(z.max()) + 1.0 - zmin) / _LUT_STEP) + 2
        z1d = zmin + _LUT_STEP * np.arange(n)
        r1d = z1d - skull_base
        self.rel1d = np.where(r1d < 0, r1d / neck_len, r1d)
        self._idx = np.rint((z - zmin) / _LUT_STEP).astype(np.int32)
        self.rel = self.rel1d.astype(np.float32)[self._idx]
        # per axial slice, the range of levels it touches (for cropping work to a slab)
        self._kmin = self.rel.min(axis=(0, 1))
        self._kmax = self.rel.max(axis=(0, 1))
        self.shape = shape

    def slab(self, lo: float, hi: float):
        """Index ``(:, :, k0:k1)`` covering every voxel with ``lo <= rel <= hi`` (None if none)."""
        ks = np.nonzero((self._kmax >= lo) & (self._kmin <= hi))[0]
        if ks.size == 0:
            return None
        return (slice(None), slice(None), slice(int(ks[0]), int(ks[-1]) + 1))

    def prof(self, pts, vals, sl=None) -> np.ndarray:
        """A smooth per-level profile (piecewise linear in ``rel``) evaluated at every voxel."""
        table = np.interp(self.rel1d, pts, vals).astype(np.float32)
        idx = self._idx if sl is None else self._idx[sl]
        return table[idx]


def _ell2(x, y, cx, cy, a, b):
    """Squared normalised elliptic radius ((x-cx)/a)^2 + ((y-cy)/b)^2."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def _upsample(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` onto ``n`` evenly spaced points (end to end)."""
    m = a.shape[axis]
    pos = np.linspace(0.0, m - 1.0, n)
    i0 = np.minimum(pos.astype(np.int64), m - 2)
    shape = [1] * a.ndim
    shape[axis] = n
    w = (pos - i0).astype(a.dtype).reshape(shape)
    a0 = np.take(a, i0, axis=axis)
    return a0 + (np.take(a, i0 + 1, axis=axis) - a0) * w


def _smooth_fields(rng, shape, n, cell=6):
    """``n`` smooth random fields of unit standard deviation (noise on a coarse grid, upsampled)."""
    lo = tuple(max(2, -(-s // cell)) + 1 for s in shape)
    up = ndimage.gaussian_filter(rng.standard_normal((n, *lo), dtype=np.float32), (0, 0.7, 0.7, 0.7))
    for axis, s in enumerate(shape, start=1):
        up = _upsample(up, axis, s)
    up -= up.mean(axis=(1, 2, 3), keepdims=True)
    up /= up.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    return up


def _draw_case(rng: np.random.Generator) -> dict:
    """All random choices of one synthetic patient (scalars only, independent of the grid)."""
    U = rng.uniform
    p = {}
    # pose and size
    p["angles"] = np.radians([U(-5, 5), U(-4, 4), U(-3, 3)])  # yaw, pitch, roll
    p["shift"] = (U(-8, 8), U(-8, 8), 0.0)
    p["skull_base"] = U(62, 74)  # world z (mm) of the skull base; the default volume spans +-144 mm
    p["neck_len"] = U(0.92, 1.08)
    size = U(0.92, 1.08)
    p["size_lat"], p["size_ap"] = size * U(0.97, 1.03), size * U(0.97, 1.03)
    p["body_cx"] = U(-3, 3)
    p["fat_th"] = U(4, 8)
    # tissue values (HU)
    p["fat"], p["muscle"], p["brain"], p["csf"] = U(-110, -85), U(45, 58), U(28, 36), U(5, 14)
    p["cord"], p["bstem"] = U(30, 40), U(30, 40)
    p["parotid"] = (U(-35, 0), U(-35, 0))  # right, left
    p["cancellous"], p["cortical"], p["skull"] = U(280, 380), U(750, 1000), U(900, 1200)
    p["mand_cort"], p["mand_med"] = U(1000, 1200), U(550, 750)
    p["cartilage"], p["laryngeal_soft"], p["eso"] = U(150, 220), U(90, 120), U(35, 48)
    p["vessel"] = U(130, 220) if rng.random() < 0.7 else U(38, 50)  # with or without contrast
    p["thyroid"], p["globe"] = U(80, 110), U(8, 20)
    p["tumour"] = float(np.clip(p["muscle"] + U(32, 42), 75, 100))
    p["noise"] = U(15, 25)
    # structure geometry
    p["disc_phase"] = U(0, 17)
    p["aw_cx"] = U(-2, 2)
    p["cord_s"] = U(0.5, 0.6)
    p["mand"] = dict(c=8.0 + U(-3, 3), B=62.0 * U(0.94, 1.06), A_r=44.0 * U(0.95, 1.05), A_l=44.0 * U(0.95, 1.05),
                     lo=-96.0 + U(-3, 3), hi=-68.0 + U(-2, 2))
    p["parotids"] = []
    for side in (1, -1):  # right (+x), then left
        s = U(0.88, 1.12)
        p["parotids"].append(dict(side=side, cx=side * (48 + U(-3, 3)), cy=-10 + U(-3, 3), cz=-35 + U(-4, 4),
                                  ax=13 * s, ay=17 * s, az=25 * s))
    p["larynx"] = dict(hi=-102.0 + U(-3, 3), scale=U(0.9, 1.1))
    p["eso"] = (p["eso"], dict(top=-140.0 + U(-4, 0), a=9 * U(0.9, 1.1), b=5.5 * U(0.9, 1.1),
                               air=rng.random() < 0.5, air_z=U(-200, -155)))
    # tumour: site, size, lobes
    side = 1 if rng.random() < 0.5 else -1
    if rng.random() < 0.5:  # oropharynx (tonsil / tongue base)
        centre = np.array([side * U(18, 24), U(10, 20), U(-80, -55)])
    else:  # level II-III neck node
        centre = np.array([side * U(28, 36), U(6, 20), U(-130, -100)])
    r0 = U(8, 15)
    lobes = [(centre, r0, r0 * U(1.0, 1.25))]
    for _ in range(int(rng.integers(2, 5))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        rr = r0 * U(0.45, 0.7)
        lobes.append((centre + d * r0 * U(0.4, 0.75), rr, rr * U(0.9, 1.2)))
    p["gtv"] = dict(side=side, centre=centre, lobes=lobes)
    return p


def make_phantom(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING):
    """Make one synthetic head-and-neck CT phantom.

    Returns ``(ct, label, affine)``: ``ct`` int16 Hounsfield units, ``label`` uint8 in the stored
    numbering (:data:`contourcl.data.labels.STORED_LABELS`, 0 = background), ``affine`` the 4 x 4
    RAS+ voxel-to-world matrix (see :func:`phantom_affine`). Deterministic in ``seed``; the
    synthetic patient of a seed does not depend on the grid (only its sampling and noise do).

    What is modelled, built level by level along the last (inferior to superior) axis with
    smoothly varying per-level profiles:

    * a body outline (shoulders widening at the bottom, a narrow neck, a larger head) with a thin
      subcutaneous fat layer (about -100 HU) over soft tissue (about 40-60 HU), some fat planes in
      the neck, contrast-filled carotids and jugular veins, a thyroid gland;
    * the cervical spine along the whole neck: vertebral bodies (cancellous bone with a cortical
      rim, discs in between), posterior arches, lateral masses and spinous processes, and the
      spinal canal with CSF around the **SpinalCord**; above the foramen magnum the **Brainstem**
      in its CSF cisterns inside the skull base, brain, the skull vault with its base plate;
    * the face: orbits (fat and globes), nasal cavity, maxillary sinuses, hard palate and upper
      dental arch; the **Mandible** (a horseshoe body with two rami up to the condyles);
    * **Parotid_R** and **Parotid_L**, fatty glands behind the rami (Parotid_R on the patient's
      right, which is world +x in RAS+);
    * the airway (nasopharynx, oropharynx, hypopharynx, trachea with cartilage rings); the
      **Larynx** (cartilage and soft-tissue wall around an air lumen, labelled as the whole organ
      including the lumen, as clinical contours are); the **Esophagus** (a collapsed tube,
      sometimes with a little air) between the trachea and the spine;
    * a tumour **GTV**: a lobulated, slightly enhancing soft-tissue mass of 15-40 mm near the
      oropharynx or in a level II-III neck node, on a random side, painted only where no OAR is.

    Per seed, sizes, neck length, positions, left-right asymmetry, a slight head rotation, tissue
    values, tumour site and shape, and image noise all vary; ``numpy.random.default_rng(seed)`` is
    the only source of randomness. The labels are exactly the voxels where each structure's
    intensity was painted; the CT is the painted anatomy after a light Gaussian blur (partial
    volume at edges) plus Gaussian noise (sigma 15-25 HU), with -1024 HU outside the body (as in
    OpenKBP), clipped to [-1024, 3071].
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(f"need a 3-D shape of at least 8 voxels per axis and positive spacing, got {shape}, {spacing}")
    rng = np.random.default_rng(int(seed))
    p = _draw_case(rng)
    tex = _smooth_fields(rng, shape, 3)  # soft-tissue texture, fat planes, lobulation
    f = _Frame(shape, spacing, _rotation(*p["angles"]), p["shift"], p["skull_base"], p["neck_len"],
               p["size_lat"], p["size_ap"])
    X, Y, REL = f.X, f.Y, f.rel

    ct = np.full(shape, HU_OUTSIDE, np.float32)
    label = np.zeros(shape, np.uint8)
    bone = np.zeros(shape, bool)

    def paint(mask, value, sl=None, lab=None, is_bone=False):
        """Paint ``value`` where ``mask`` (inside slab ``sl``, inside the body); label it ``lab``."""
        sl = sl or (slice(None),) * 3
        mask = mask & body[sl]
        if lab is not None:
            mask = mask & (label[sl] == 0)  # never overwrite another structure
            label[sl][mask] = lab
        ct[sl][mask] = value[mask] if np.ndim(value) else value
        bone[sl][mask] = is_bone
        return mask

    # ---- body outline: shoulders / neck / jaw / head ---------------------------------------
    lvl = [-230, -190, -165, -115, -100, -85, -65, -10, 30, 60, 100]
    body_a = f.prof(lvl, [118, 78, 60, 60, 64, 67, 70, 74, 77, 76, 72])
    body_b = f.prof(lvl, [80, 66, 58, 58, 72, 76, 78, 92, 94, 94, 92])
    body_cy = f.prof(lvl, [-6, 2, 5, 5, 13, 13, 14, 8, 4, 3, 3])
    body_cx = np.float32(p["body_cx"])
    fat_th = p["fat_th"]
    body = _ell2(X, Y, body_cx, body_cy, body_a, body_b) < 1
    inner = _ell2(X, Y, body_cx, body_cy, body_a - fat_th, body_b - fat_th) < 1
    ct[body] = p["fat"]
    ct[inner] = (p["muscle"] + 6.0 * tex[0])[inner]
    neck = inner & (REL < -15) & (tex[1] > 1.1)  # fat planes between the neck muscles
    ct[neck] = p["fat"] + 10.0 * tex[0][neck]
    del neck

    # ---- neck: parapharyngeal fat, vessels, thyroid ------------------------------------------
    sl = f.slab(-240, 0)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        for side in (1, -1):
            paint((_ell2(x, y, side * 24, 12, 6, 8) + ((r + 50) / 18) ** 2) < 1, p["fat"], sl)
        vlvl = [-230, -120, -60, -10]
        for side in (1, -1):
            cx = side * f.prof(vlvl, [22, 24, 28, 30], sl)  # common / internal carotid
            cy = f.prof(vlvl, [12, 10, 4, 0], sl)
            paint((_ell2(x, y, cx, cy, 3.5, 3.5) < 1) & (r < -10), p["vessel"], sl)
            cx = side * f.prof(vlvl, [31, 34, 37, 34], sl)  # internal jugular vein
            cy = f.prof(vlvl, [9, 6, -2, -8], sl)
            paint((_ell2(x, y, cx, cy, 5.0, 4.5) < 1) & (r < -15), p["vessel"] - 15, sl)
        for side in (1, -1):
            paint((_ell2(x, y, side * 16, 28, 7, 9) + ((r + 160) / 18) ** 2) < 1, p["thyroid"], sl)
        paint((_ell2(x, y, 0, 41, 10, 4) < 1) & (np.abs(r + 162) < 5), p["thyroid"], sl)

    # ---- cranium, brain, face ----------------------------------------------------------------
    bs_cy_pts = ([-10, 15, 55], [-20, -16, -8])  # brainstem centre (ap) by level
    sl = f.slab(-75, 1e9)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        a, b, cy = body_a[sl], body_b[sl], body_cy[sl]
        floor = np.interp(y, [-30, 0, 20, 45], [-8, 0, 2, 45]).astype(np.float32)  # cranial fossae
        shell = (_ell2(x, y, body_cx, cy, a - 5, b - 5) < 1) & (r > floor - 7)
        cavity = (_ell2(x, y, body_cx, cy, a - 12, b - 12) < 1) & (r >= floor)
        foramen = (_ell2(x, y, 0, f.prof(*bs_cy_pts, sl), 15, 17) < 1) & (r < 5)
        paint(shell & ~cavity & ~foramen, p["skull"], sl, is_bone=True)
        paint(cavity, p["brain"] + 4.0 * tex[0][sl], sl)
        del shell, cavity, foramen, floor
        for side in (1, -1):  # orbits: fat cone and globe
            paint((_ell2(x, y, side * 32, 66, 17, 22) + ((r - 30) / 16) ** 2) < 1, p["fat"], sl)
            paint((_ell2(x, y, side * 32, 76, 12, 12) + ((r - 30) / 12) ** 2) < 1, p["globe"], sl)
        for side in (1, -1):  # maxillary sinuses with a bony wall
            e = _ell2(x, y, side * 27, 52, 13, 16) + ((r + 22) / 18) ** 2
            paint(e < 1.5, 600.0, sl, is_bone=True)
            paint(e < 1, HU_AIR, sl)
        paint((_ell2(x, y, 0, 56, 8, 29) + ((r + 15) / 27) ** 2) < 1, HU_AIR, sl)  # nasal cavity
        e = _ell2(x, y, 0, 28, 30, 50)  # hard palate and upper dental arch
        paint((e < 1) & (y > 28) & (np.abs(r + 49) < 2.5), 700.0, sl, is_bone=True)
        paint((np.abs(np.sqrt(e) - 0.93) < 0.1) & (y > 26) & (r > -60) & (r < -46), 1100.0, sl, is_bone=True)
        del e

    # ---- cervical spine, spinal canal and cord, brainstem, airway ---------------------------
    sl = f.slab(-1e9, 60)
    if sl is not None:
        vlvl = [-230, -190, -150, -60, -8]
        x, y, r = X[sl], Y[sl], REL[sl]
        vb_cy = f.prof(vlvl, [-16, -12, -8, -5, -4], sl)
        vb_a = f.prof(vlvl, [16, 13, 11, 10.5, 10], sl)
        vb_b = f.prof(vlvl, [12, 10, 8, 8, 8], sl)
        canal_b = f.prof(vlvl, [7, 7.5, 7.5, 8, 8.5], sl)  # spinal canal semi-axes (ap, lat)
        canal_a = canal_b * np.float32(1.35)
        canal_cy = vb_cy - vb_b - canal_b - 2
        phase = np.mod(r + 200.0 + p["disc_phase"], 17.0)  # vertebral level, ~17 mm each
        spine = r < -8
        e = _ell2(x, y, 0, vb_cy, vb_a, vb_b)
        disc = (phase < 4) & (r < -25)
        paint((e < 1) & spine, p["cortical"], sl, is_bone=True)
        paint((e < 0.55) & spine & ~disc, p["cancellous"] + 20.0 * tex[0][sl], sl, is_bone=True)
        paint((e < 1) & spine & disc, 85.0, sl)
        arch = spine & (phase > 4.5) & (phase < 15)
        rc = _ell2(x, y, 0, canal_cy, canal_a, canal_b)
        rim = _ell2(x, y, 0, canal_cy, canal_a + 5, canal_b + 5)
        paint(arch & (rc > 1) & (rim < 1) & (y < canal_cy + 3), p["cortical"], sl, is_bone=True)  # laminae
        tip = canal_cy - canal_b
        paint(arch & (np.abs(x) < 3.5) & (y < tip) & (y > tip - 22), p["cortical"], sl, is_bone=True)  # spinous
        for side in (1, -1):  # lateral masses
            paint(arch & (_ell2(x, y, side * 18, canal_cy + 4, 6, 7) < 1), p["cortical"] - 150, sl, is_bone=True)
        paint(spine & (rc < 1), p["csf"], sl)
        del e, disc, arch, phase, rc, rim
        bs_cy = f.prof(*bs_cy_pts, sl)
        bs_r = f.prof([-5, 5, 25, 45, 55], [8, 10, 14, 12, 11], sl)
        cist = (r >= -8) & (r <= 56) & (_ell2(x, y, 0, bs_cy, bs_r * 1.05 + 4, bs_r * 0.85 + 4) < 1)
        paint(cist, p["csf"], sl)  # CSF cisterns around the brainstem
        del cist

        alvl = [-230, -140, -135, -102, -92, -85, -40, -20, -8, -2]
        aw_cy = f.prof(alvl, [30, 30, 30, 30, 18, 13, 13, 18, 24, 28], sl)
        aw_a = f.prof(alvl, [8, 8, 6, 7, 13, 12, 12, 11, 10, 9], sl)
        aw_b = f.prof(alvl, [7, 7, 7, 8, 7, 6, 6, 7, 8, 8], sl)
        e = _ell2(x, y, np.float32(p["aw_cx"]), aw_cy, aw_a, aw_b)
        paint((r < -140) & (e < 1.6), p["cartilage"] - 30, sl)  # tracheal rings
        paint((e < 1) & (r < -2), HU_AIR, sl)  # pharynx, larynx, trachea
        del e

        # OARs, each only where no other OAR is
        cs = np.float32(p["cord_s"])
        cord = (r < -5) & (_ell2(x, y, 0, canal_cy + 0.5, canal_a * cs, canal_b * (cs + 0.02)) < 1)
        paint(cord, p["cord"], sl, lab=_LAB["SpinalCord"])
        bstem = (r >= -5) & (r <= 52) & (_ell2(x, y, 0, bs_cy, bs_r * 1.05, bs_r * 0.85) < 1)
        paint(bstem, p["bstem"] + 3.0 * tex[0][sl], sl, lab=_LAB["Brainstem"])
        del cord, bstem

    # ---- Mandible: horseshoe body and two rami ---------------------------------------------
    sl = f.slab(-105, -5)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        m = p["mand"]
        c, B = m["c"], m["B"]
        A = np.where(x > 0, np.float32(m["A_r"]), np.float32(m["A_l"]))
        u = np.sqrt(_ell2(x, y, 0, c, A, B)) + 1e-6
        grad = np.sqrt((x / A**2) ** 2 + ((y - c) / B**2) ** 2) / u + 1e-6
        dist = (u - 1) / grad  # about the signed distance to the arch curve, mm
        half = 4.5 + 1.5 * np.clip((y - c) / B, 0, 1)  # thicker at the chin
        mbody = (np.abs(dist) < half) & (y > c - 3) & (r > m["lo"]) & (r < m["hi"])
        del u, grad
        ramus = np.zeros(x.shape, bool)
        for side, As in ((1, m["A_r"]), (-1, m["A_l"])):
            cx = side * (As + 1.0 + 0.05 * (r + 80))
            post = c - 2 - 0.09 * (r + 80)  # posterior border leans back as it rises
            lat = np.abs(x - cx)
            ramus |= (lat < 3.5) & (y > post) & (y < post + 28) & (r > -82) & (r < -30)
            ramus |= (lat < 3.5) & (y > post) & (y < post + 10) & (r >= -30) & (r < -12)  # condylar neck
            ramus |= (lat < 6.5) & (y > post - 1) & (y < post + 10) & (r >= -20) & (r < -11)  # condyle
        mand = paint(mbody | ramus, p["mand_med"], sl, lab=_LAB["Mandible"], is_bone=True)
        ct[sl][mand & ~((np.abs(dist) < half - 2.5) & mbody)] = p["mand_cort"]
        del mand, mbody, ramus, dist, A

    # ---- Parotids: tapered ellipsoids (wider above), lobulated by a smooth field -------------
    sl = f.slab(-80, 5)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        lob = 0.15 * tex[2][sl]
        for g, name, hu in zip(p["parotids"], ("Parotid_R", "Parotid_L"), p["parotid"], strict=False):
            t = np.clip((r - g["cz"]) / g["az"], -1, 1)
            w = np.sqrt(np.clip(1 - t**2, 0, None)) * (1 + 0.3 * t) + 1e-3
            m = (np.abs(r - g["cz"]) < g["az"]) & (_ell2(x, y, g["cx"], g["cy"], g["ax"] * w, g["ay"] * w) < 1 + lob)
            paint(m, hu + 6.0 * tex[0][sl], sl, lab=_LAB[name])
        del lob, t, w, m

    # ---- Larynx (whole organ: cartilage, soft-tissue wall, air lumen); Esophagus below it ----
    sl = f.slab(-1e9, -105)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        aw_cx = np.float32(p["aw_cx"])
        sc = f.prof([-140, -130, -115, -102], [0.75, 0.95, 1.0, 0.9], sl) * np.float32(p["larynx"]["scale"])
        e = _ell2(x, y, aw_cx, 32.0, 17 * sc, 14 * sc)
        organ = paint((r >= -140) & (r <= p["larynx"]["hi"]) & (e < 1), p["laryngeal_soft"], sl, lab=_LAB["Larynx"])
        ct[sl][organ & (e > 0.62)] = p["cartilage"]
        lum_a = f.prof([-140, -125, -115, -102], [6, 4, 7, 9], sl)
        lum_b = f.prof([-140, -125, -102], [7, 8, 9], sl)
        ct[sl][organ & (_ell2(x, y, aw_cx, 30.0, lum_a, lum_b) < 1)] = HU_AIR
        del e, organ
        hu, q = p["eso"]
        e = _ell2(x, y, aw_cx - 2.0, 13.0, q["a"], q["b"])
        eso = paint((r < q["top"]) & (e < 1), hu + 4.0 * tex[0][sl], sl, lab=_LAB["Esophagus"])
        if q["air"]:  # a little air in part of the lumen
            ct[sl][eso & (e < 0.2) & (np.abs(r - q["air_z"]) < 10)] = HU_AIR
        del e, eso

    # ---- GTV: lobulated enhancing mass, only where no OAR and no bone, inside the body -------
    zc = p["gtv"]["centre"][2]
    sl = f.slab(zc - 40, zc + 40)
    if sl is not None:
        x, y, r = X[sl], Y[sl], REL[sl]
        tum = np.zeros(x.shape, bool)
        for (cx, cy, cz), rr, rz in p["gtv"]["lobes"]:
            tum |= (_ell2(x, y, cx, cy, rr, rr) + ((r - cz) / rz) ** 2) < 1 + 0.2 * tex[2][sl]
        tum &= inner[sl] & ~ndimage.binary_dilation(bone[sl])  # keep off bone, by a voxel
        paint(tum, p["tumour"] + 5.0 * tex[0][sl], sl, lab=_LAB["GTV"])
        del tum

    # ---- image formation: partial-volume blur, noise, outside the body ------------------------
    ct = ndimage.gaussian_filter(ct, sigma=(0.6, 0.6, 0.5), mode="nearest")
    ct += rng.standard_normal(shape, dtype=np.float32) * np.float32(p["noise"])
    ct[~ndimage.binary_dilation(body)] = HU_OUTSIDE
    ct = np.clip(np.rint(ct), HU_MIN, HU_MAX).astype(np.int16)
    return ct, label, phantom_affine(shape, spacing)


def write_phantom(out_dir, case_id: str, seed: int, with_label: bool = True, **kw) -> dict[str, Path]:
    """Write one synthetic phantom in the MONAI Label local-datastore layout.

    The CT goes to ``<out_dir>/<case_id>.nii.gz`` (int16) and, when ``with_label``, the label map
    to ``<out_dir>/labels/final/<case_id>.nii.gz`` (uint8), both with the same affine. ``kw`` goes
    to :func:`make_phantom` (``shape``, ``spacing``). Returns the paths written.
    """
    from contourcl.data.volumes import write_nifti

    out_dir = Path(out_dir)
    ct, label, affine = make_phantom(seed, **kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"image": out_dir / f"{case_id}.nii.gz"}
    write_nifti(paths["image"], ct, affine)
    if with_label:
        paths["label"] = out_dir / "labels" / "final" / f"{case_id}.nii.gz"
        paths["label"].parent.mkdir(parents=True, exist_ok=True)
        write_nifti(paths["label"], label, affine)
    return paths


def make_dataset(out_dir, n_cases: int, first_seed: int = 0, labeled: int | None = None,
                 prefix: str = "synthetic_hn_", **kw) -> list[str]:
    """Write ``n_cases`` synthetic phantoms with seeds ``first_seed ...`` into ``out_dir``.

    Case ids are ``<prefix><seed:03d>`` (``synthetic_hn_000`` ...). The first ``labeled`` cases
    (all of them when ``None``) get a final label in ``labels/final/``; the others are images only,
    left for a user to contour. Existing label files of unlabelled cases are left alone (they may
    be a user's work; the images are regenerated identically). Returns the case ids.
    """
    n_cases = int(n_cases)
    labeled = n_cases if labeled is None else int(labeled)
    if n_cases < 0 or not 0 <= labeled <= n_cases:
        raise ValueError(f"need 0 <= labeled <= n_cases, got labeled={labeled}, n_cases={n_cases}")
    ids = []
    for i in range(n_cases):
        seed = int(first_seed) + i
        case_id = f"{prefix}{seed:03d}"
        write_phantom(out_dir, case_id, seed, with_label=i < labeled, **kw)
        ids.append(case_id)
    return ids
