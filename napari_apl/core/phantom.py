"""Synthetic abdominal CT / MRI phantoms with organ labels, deterministic per seed.

The anatomy is built in canonical RAS+ voxel order (axis 0 increases toward the patient's Right,
axis 1 toward Anterior, axis 2 toward Superior; see nibabel's "coordinate systems" page: in RAS+
world coordinates +x points to the patient's right, +y to the front, +z to the head). The liver
and the right kidney therefore sit at large axis-0 indices / positive world x, the spleen and the
left kidney at small axis-0 indices / negative world x. The arrays are then flipped/permuted into
the requested file orientation with nibabel's orientation tools, and the affine is adjusted so
that reorienting the file back to RAS+ (``nib.as_closest_canonical``) gives the canonical arrays.

All geometry is defined in millimetres on a nominal adult abdomen (``_Anatomy`` works in
"nominal" coordinates: the patient's own frame after removing a global shift, a small axial
rotation, a body-size scale and a smooth random deformation), so the phantom looks the same at
any voxel size; a field of view smaller than the nominal body shrinks the body to fit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod
from scipy import ndimage

from .errors import APLError, OutputError
from .io_utils import atomic_write, check_output_path

__all__ = ["MODALITIES", "TISSUES", "make_anatomy", "make_phantom", "phantom_affine", "write_phantom"]

MODALITIES: tuple[str, ...] = ("ct", "mri")

# Tissue classes of the anatomy map (index = code in the array returned by make_anatomy).
TISSUES: tuple[str, ...] = (
    "air",  # 0
    "subcutaneous fat",  # 1
    "muscle",  # 2
    "visceral fat",  # 3
    "bowel wall",  # 4
    "bowel fluid",  # 5
    "bowel content",  # 6
    "bowel gas",  # 7
    "liver",  # 8
    "kidney cortex",  # 9
    "kidney medulla",  # 10
    "renal sinus fat",  # 11
    "spleen",  # 12
    "aorta",  # 13
    "ivc",  # 14
    "cortical bone",  # 15
    "trabecular bone",  # 16
    "disc",  # 17
    "csf",  # 18
    "gallbladder",  # 19
    "lung",  # 20
)
_T = {name: i for i, name in enumerate(TISSUES)}

# name: (mean, texture amplitude). CT in Hounsfield units.
_CT: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "subcutaneous fat": (-105.0, 8.0),
    "muscle": (45.0, 5.0),
    "visceral fat": (-95.0, 10.0),
    "bowel wall": (40.0, 6.0),
    "bowel fluid": (15.0, 8.0),
    "bowel content": (5.0, 45.0),
    "bowel gas": (-950.0, 20.0),
    "liver": (62.0, 4.0),
    "kidney cortex": (38.0, 3.0),
    "kidney medulla": (26.0, 3.0),
    "renal sinus fat": (-85.0, 8.0),
    "spleen": (50.0, 3.0),
    "aorta": (45.0, 2.0),
    "ivc": (40.0, 2.0),
    "cortical bone": (950.0, 60.0),
    "trabecular bone": (600.0, 60.0),
    "disc": (85.0, 6.0),
    "csf": (10.0, 3.0),
    "gallbladder": (12.0, 3.0),
    "lung": (-860.0, 30.0),
}
# T2-SPIR-like MRI (fat suppressed): fat, bone and air dark; fluid, spleen and kidneys bright.
_MRI: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "subcutaneous fat": (70.0, 15.0),
    "muscle": (220.0, 25.0),
    "visceral fat": (80.0, 15.0),
    "bowel wall": (420.0, 40.0),
    "bowel fluid": (860.0, 80.0),
    "bowel content": (520.0, 170.0),
    "bowel gas": (15.0, 5.0),
    "liver": (380.0, 25.0),
    "kidney cortex": (760.0, 35.0),
    "kidney medulla": (880.0, 35.0),
    "renal sinus fat": (80.0, 15.0),
    "spleen": (680.0, 30.0),
    "aorta": (90.0, 20.0),
    "ivc": (160.0, 25.0),
    "cortical bone": (50.0, 10.0),
    "trabecular bone": (150.0, 30.0),
    "disc": (650.0, 50.0),
    "csf": (980.0, 40.0),
    "gallbladder": (950.0, 40.0),
    "lung": (25.0, 10.0),
}


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _check_modality(modality: str) -> str:
    mod = str(modality).strip().lower()
    if mod not in MODALITIES:
        raise APLError(f"phantom modality {modality!r} is not supported: use one of {', '.join(MODALITIES)}")
    return mod


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise APLError(f"phantom seed {seed!r} is invalid: give a non-negative integer")
    return int(seed)


MAX_PHANTOM_VOXELS = 160_000_000  # twice a 512 x 512 x 300 CT


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or any(n < 8 for n in out) or tuple(shape) != out:
        raise APLError(f"phantom shape {shape!r} is invalid: give 3 integers, each at least 8")
    if any(n > 2048 for n in out) or math.prod(out) > MAX_PHANTOM_VOXELS:
        raise APLError(
            f"phantom shape {out} is too large: at most 2048 voxels per axis and "
            f"{MAX_PHANTOM_VOXELS // 1_000_000} million in all"
        )
    return out  # type: ignore[return-value]


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        out = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        out = ()
    from .volume import MAX_SPACING_MM, MIN_SPACING_MM  # what predict and refine accept

    if len(out) != 3 or not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in out):
        raise APLError(
            f"phantom spacing {spacing!r} is invalid: "
            f"give 3 voxel sizes in {MIN_SPACING_MM}..{MAX_SPACING_MM} mm"
        )
    return out  # type: ignore[return-value]


def _check_orientation(orientation: str) -> tuple[str, str, str]:
    code = tuple(str(orientation).strip().upper())
    pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
    ok = len(code) == 3 and all(sum(c in p for c in code) == 1 for p in pairs)
    if not ok:
        raise APLError(
            f"phantom orientation {orientation!r} is invalid: give 3 letters, one each of L/R, A/P, S/I"
            " (e.g. RAS, LPS)"
        )
    return code  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# smooth random fields
# ----------------------------------------------------------------------------------------------
def _interp_matrix(n: int, step: float, scale: float) -> np.ndarray:
    """Row-normalised Gaussian weights from coarse nodes (every ``scale`` mm) to ``n`` voxels."""
    pos = (np.arange(n) - (n - 1) / 2.0) * step
    half = abs(pos[0]) + 2.0 * scale
    nodes = np.arange(-half, half + 0.5 * scale, scale)
    w = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / scale) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape, spacing, scale: float) -> np.ndarray:
    """A smooth random float32 field with standard deviation ~1 and correlation length ~``scale`` mm."""
    mats = [_interp_matrix(n, s, scale) for n, s in zip(shape, spacing)]
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    f = np.tensordot(mats[0], coarse, axes=(1, 0))  # (n0, c1, c2)
    f = np.tensordot(f, mats[1], axes=(1, 1))  # (n0, c2, n1)
    f = np.tensordot(f, mats[2], axes=(1, 1))  # (n0, n1, n2)
    sub = f[:: max(1, shape[0] // 32), :: max(1, shape[1] // 32), :: max(1, shape[2] // 16)]
    sd = float(sub.std())
    f /= sd if sd > 0 else 1.0
    return np.ascontiguousarray(f, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jit(rng: np.random.Generator, sd: float, lim: float) -> float:
    return float(np.clip(rng.normal(0.0, sd), -lim, lim))


class _Anatomy:
    """Paints tissue classes and labels into canonical (RAS+) arrays from one random generator."""

    def __init__(self, rng: np.random.Generator, shape, spacing) -> None:
        self.rng = rng
        self.shape = shape
        self.spacing = spacing
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s) for n, s in zip(shape, spacing)]
        fov = [n * s for n, s in zip(shape, spacing)]

        # global, per-patient parameters (drawn first, in a fixed order)
        body_scale = _u(rng, 0.86, 1.06)
        height_scale = _u(rng, 0.93, 1.07)
        self.theta = math.radians(_jit(rng, 2.5, 5.0))
        self.tx, self.ty = _jit(rng, 3.0, 6.0), _jit(rng, 3.0, 6.0)
        self.tz = _jit(rng, 5.0, 10.0)
        self.amp = _u(rng, 2.0, 5.0)  # deformation amplitude in mm
        fit = min(
            1.0,
            (fov[0] / 2 - 8.0) / (150.0 * body_scale + 8.0),
            (fov[1] / 2 - 8.0) / (112.0 * body_scale + 8.0),
        )
        self.sxy = body_scale * max(fit, 0.05)
        self.sz = height_scale * min(1.0, fov[2] / 210.0)

        # smooth deformation of the nominal frame, and the nominal coordinates of every voxel
        warp = [
            np.clip(_smooth_field(rng, shape, spacing, 55.0) * (self.amp / 2), -self.amp, self.amp)
            for _ in range(3)
        ]
        c, s = math.cos(self.theta), math.sin(self.theta)
        x = (self.axes[0] - self.tx).astype(np.float32)[:, None, None]
        y = (self.axes[1] - self.ty).astype(np.float32)[None, :, None]
        z = (self.axes[2] - self.tz).astype(np.float32)[None, None, :]
        self.u = ((c * x + s * y) + warp[0]) / np.float32(self.sxy)
        self.v = ((-s * x + c * y) + warp[1]) / np.float32(self.sxy)
        self.w = (z + warp[2]) / np.float32(self.sz)
        self.tissue = np.zeros(shape, np.uint8)
        self.labels = np.zeros(shape, np.uint8)
        self.full = (slice(None), slice(None), slice(None))

    # -- geometry helpers ---------------------------------------------------------------------
    def box(self, c, rxy: float, rz: float):
        """Voxel slices covering a nominal sphere-ish region (centre ``c``, radii in nominal mm)."""
        cs, sn = math.cos(self.theta), math.sin(self.theta)
        ux, vy = c[0] * self.sxy, c[1] * self.sxy
        world = (cs * ux - sn * vy + self.tx, sn * ux + cs * vy + self.ty, c[2] * self.sz + self.tz)
        radius = (
            rxy * self.sxy + self.amp + 2 * max(self.spacing[:2]),
            rxy * self.sxy + self.amp + 2 * max(self.spacing[:2]),
            rz * self.sz + self.amp + 2 * self.spacing[2],
        )
        out = []
        for ax, cen, r, sp, n in zip(self.axes, world, radius, self.spacing, self.shape):
            lo = max(0, math.floor((cen - r - ax[0]) / sp))
            hi = min(n, math.ceil((cen + r - ax[0]) / sp) + 1)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def zslab(self, wlo: float, whi: float):
        """Slices covering nominal heights ``wlo..whi`` (full in-plane extent)."""
        zlo = wlo * self.sz + self.tz - self.amp - 2 * self.spacing[2]
        zhi = whi * self.sz + self.tz + self.amp + 2 * self.spacing[2]
        ax = self.axes[2]
        lo = max(0, math.floor((zlo - ax[0]) / self.spacing[2]))
        hi = min(self.shape[2], math.ceil((zhi - ax[0]) / self.spacing[2]) + 1)
        if hi <= lo:
            return None
        return (slice(None), slice(None), slice(lo, hi))

    def r2(self, box, c, h, angle: float = 0.0, shear=(0.0, 0.0)) -> np.ndarray:
        """Squared normalised ellipsoid radius (< 1 inside) on ``box``; ``angle`` rotates in-plane."""
        dw = self.w[box] - np.float32(c[2])
        du = self.u[box] - np.float32(c[0])
        dv = self.v[box] - np.float32(c[1])
        if shear[0]:
            du = du - np.float32(shear[0]) * dw
        if shear[1]:
            dv = dv - np.float32(shear[1]) * dw
        if angle:
            ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            du, dv = ca * du + sa * dv, -sa * du + ca * dv
        return (du / np.float32(h[0])) ** 2 + (dv / np.float32(h[1])) ** 2 + (dw / np.float32(h[2])) ** 2

    def paint(self, box, mask: np.ndarray, tissue: str, label: int = 0) -> None:
        """Set tissue class and label where ``mask`` is true inside ``box``."""
        self.tissue[box][mask] = _T[tissue]
        self.labels[box][mask] = label

    def ellipsoid_box(self, c, h, shear=(0.0, 0.0)):
        """The box of an ellipsoid with half-axes ``h`` (any in-plane rotation) and a z-shear."""
        rxy = max(h[0], h[1]) + max(abs(shear[0]), abs(shear[1])) * h[2]
        return self.box(c, rxy, h[2])

    # -- the anatomy ----------------------------------------------------------------------------
    def build(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw all random organ parameters and paint the anatomy; return (tissue, labels)."""
        rng = self.rng
        p = self._draw(rng)
        self._body(p)
        self._bowel(p)
        self._liver(p)
        self._spleen(p)
        self._kidneys(p)
        self._retroperitoneum(p)
        self._spine(p)
        self._ribs_and_lungs(p)
        return self.tissue, self.labels

    def _draw(self, rng: np.random.Generator) -> dict:
        p: dict = {}
        p["body"] = (150.0 * _u(rng, 0.95, 1.05), 110.0 * _u(rng, 0.92, 1.08))
        p["body_phase"] = _u(rng, 0, 2 * math.pi)
        p["fat"] = _u(rng, 10.0, 28.0)
        p["wall"] = _u(rng, 8.0, 13.0)
        p["y_vb"] = -p["body"][1] + 80.0 + _jit(rng, 3.0, 6.0)
        p["disc_phase"] = _u(rng, 0.0, 33.0)

        def organ(c, h, jitter=3.0, size=0.15):
            k = _u(rng, 1 - size, 1 + size)
            hh = tuple(float(v * k * _u(rng, 0.96, 1.04)) for v in h)
            cc = tuple(float(v + _jit(rng, jitter, 2 * jitter)) for v in c)
            return cc, hh, math.radians(_jit(rng, 4.0, 8.0))

        p["liver"] = organ((62.0, 5.0, 45.0), (72.0, 85.0, 65.0))
        p["liver_tip"] = organ((88.0, 0.0, -5.0), (42.0, 55.0, 45.0))
        p["liver_left"] = organ((-18.0, 40.0, 55.0), (55.0, 33.0, 30.0))
        p["gallbladder"] = organ((42.0, 40.0, 5.0), (14.0, 18.0, 28.0), size=0.2)
        p["spleen"] = organ((-85.0, -32.0, 55.0), (21.0, 55.0, 45.0))
        p["kidney_r"] = organ((64.0, -46.0, -14.0), (31.0, 22.0, 56.0))
        p["kidney_l"] = organ((-64.0, -46.0, 4.0), (31.0, 22.0, 56.0))
        p["stomach"] = organ((-45.0, 35.0, 48.0), (38.0, 32.0, 38.0), jitter=5.0, size=0.2)
        p["stomach_gas"] = _u(rng, 0.1, 0.5)
        # bowel loops: a fixed number of candidates so the anatomy does not depend on the shape
        blobs = []
        for _ in range(70):
            kind = rng.uniform()
            if kind < 0.18:  # ascending colon (right)
                c = (_u(rng, 80, 100), _u(rng, -10, 30), _u(rng, -130, 0))
                h = (_u(rng, 16, 24), _u(rng, 16, 24), _u(rng, 14, 22))
                contents = "bowel content"
            elif kind < 0.36:  # descending colon (left)
                c = (_u(rng, -100, -82), _u(rng, -15, 20), _u(rng, -130, 20))
                h = (_u(rng, 13, 20), _u(rng, 13, 20), _u(rng, 14, 22))
                contents = "bowel content"
            elif kind < 0.46:  # transverse colon (anterior)
                c = (_u(rng, -80, 80), _u(rng, 45, 65), _u(rng, 5, 30))
                h = (_u(rng, 16, 24), _u(rng, 14, 20), _u(rng, 14, 20))
                contents = "bowel content"
            else:  # small bowel (central / anterior)
                c = (_u(rng, -75, 75), _u(rng, -5, 70), _u(rng, -140, 15))
                h = (_u(rng, 10, 17), _u(rng, 10, 17), _u(rng, 10, 20))
                contents = "bowel fluid" if rng.uniform() < 0.6 else "bowel content"
            gas = _u(rng, 0.15, 0.6) if rng.uniform() < 0.45 else 0.0
            blobs.append((c, h, contents, gas))
        p["blobs"] = blobs
        p["aorta"] = (-12.0 + _jit(rng, 2.0, 4.0), 11.0 * _u(rng, 0.85, 1.15))
        p["ivc"] = (24.0 + _jit(rng, 2.0, 4.0), _u(rng, 0.85, 1.15))
        p["rib_phase"] = _u(rng, 0.0, 1.0)
        p["diaphragm"] = 100.0 + _jit(rng, 4.0, 8.0)
        return p

    def _body(self, p: dict) -> None:
        a0, b0 = p["body"]
        w = self.w
        wave = 1.0 + 0.03 * np.sin(w / np.float32(70.0) + np.float32(p["body_phase"]))
        a, b = a0 * wave, b0 * wave
        u, v = self.u, self.v
        # slightly flatter back: superellipse on the posterior half
        vv = np.where(v < 0, np.abs(v / b) ** 2.4, (v / b) ** 2)
        body = (u / a) ** 2 + vv
        self.paint(self.full, body <= 1.0, "subcutaneous fat")
        af, bf = a - p["fat"], b - p["fat"]
        inner = (u / af) ** 2 + np.where(v < 0, np.abs(v / bf) ** 2.4, (v / bf) ** 2)
        self.paint(self.full, inner <= 1.0, "muscle")
        ac, bc = af - p["wall"], bf - p["wall"]
        cav = (u / ac) ** 2 + np.where(v < 0, np.abs(v / bc) ** 2.4, (v / bc) ** 2)
        self.cavity = cav <= 1.0
        self.paint(self.full, self.cavity, "visceral fat")
        # the muscle ring (between subcutaneous fat and the cavity), used for the ribs
        self.ring = (inner <= 1.0) & ~self.cavity
        self.ring_angle = np.arctan2(v / bc, u / ac)

    def _blob(self, c, h, contents: str, gas: float, angle: float = 0.0) -> None:
        box = self.ellipsoid_box(c, h)
        if box is None:
            return
        r2 = self.r2(box, c, h, angle)
        inside = (r2 <= 1.0) & self.cavity[box]
        if not inside.any():
            return
        self.paint(box, inside, "bowel wall")
        lumen = inside & (r2 <= (1.0 - 4.0 / min(h)) ** 2)
        self.paint(box, lumen, contents)
        if gas > 0:
            # gas rises anteriorly (+v) in a supine patient: an air-fluid level
            level = np.float32(c[1] + (1.0 - 2.0 * gas) * h[1])
            self.paint(box, lumen & (self.v[box] > level), "bowel gas")

    def _bowel(self, p: dict) -> None:
        for c, h, contents, gas in p["blobs"]:
            self._blob(c, h, contents, gas)
        c, h, ang = p["stomach"]
        self._blob(c, h, "bowel content", p["stomach_gas"], ang)

    def _below_diaphragm(self, box, p: dict) -> np.ndarray:
        return self.w[box] < self._dome(box, p)

    def _dome(self, box, p: dict) -> np.ndarray:
        u, v = self.u[box], self.v[box]
        return (
            np.float32(p["diaphragm"])
            - np.float32(0.003) * (np.abs(u) - np.float32(55.0)) ** 2
            - np.float32(0.004) * np.minimum(v, np.float32(0.0)) ** 2
        )

    def _liver(self, p: dict) -> None:
        parts = [p["liver"], p["liver_tip"], p["liver_left"]]
        for c, h, ang in parts:
            box = self.ellipsoid_box(c, h)
            if box is None:
                continue
            m = (self.r2(box, c, h, ang) <= 1.0) & self.cavity[box] & self._below_diaphragm(box, p)
            self.paint(box, m, "liver", 1)
        c, h, ang = p["gallbladder"]
        box = self.ellipsoid_box(c, h)
        if box is not None:
            m = (self.r2(box, c, h, ang) <= 1.0) & self.cavity[box]
            self.paint(box, m, "gallbladder", 0)

    def _spleen(self, p: dict) -> None:
        c, h, ang = p["spleen"]
        alpha = math.radians(35.0) + ang  # long in-plane axis along the posterolateral wall
        box = self.ellipsoid_box(c, h)
        if box is None:
            return
        m = (self.r2(box, c, h, alpha) <= 1.0) & self.cavity[box] & self._below_diaphragm(box, p)
        # concave visceral (medial) surface: carve an ellipsoid displaced medially-anteriorly
        d = h[0] + 12.0
        cc = (c[0] + d * math.cos(alpha), c[1] + d * math.sin(alpha), c[2])
        carve = self.r2(box, cc, (18.0, 0.7 * h[1], 0.8 * h[2]), alpha) <= 1.0
        self.paint(box, m & ~carve, "spleen", 4)

    def _kidneys(self, p: dict) -> None:
        for key, label in (("kidney_r", 2), ("kidney_l", 3)):
            c, h, ang = p[key]
            side = 1.0 if c[0] > 0 else -1.0
            # hilum faces antero-medially; the long in-plane axis is perpendicular to it
            hilum_dir = math.radians(145.0) if side > 0 else math.radians(35.0)
            alpha = hilum_dir - math.pi / 2 + ang
            # upper pole more medial and posterior
            shear = (-0.22 * side, -0.1)
            box = self.ellipsoid_box(c, h, shear)
            if box is None:
                continue
            r2 = self.r2(box, c, h, alpha, shear)
            kid = (r2 <= 1.0) & self.cavity[box]
            hd = (math.cos(hilum_dir + ang), math.sin(hilum_dir + ang))
            dw = self.w[box] - np.float32(c[2])
            hc = (c[0] + 0.9 * h[1] * hd[0], c[1] + 0.9 * h[1] * hd[1], c[2])
            notch = self.r2(box, hc, (0.45 * h[0], 0.6 * h[1], 0.45 * h[2]), alpha, shear) <= 1.0
            notch &= np.abs(dw) < np.float32(0.5 * h[2])
            self.paint(box, kid & (r2 > 0.58), "kidney cortex", label)
            self.paint(box, kid & (r2 <= 0.58), "kidney medulla", label)
            self.paint(box, kid & notch, "renal sinus fat", 0)

    def _retroperitoneum(self, p: dict) -> None:
        yv = p["y_vb"]
        # psoas muscles, growing inferiorly below the kidneys' upper poles
        box = self.zslab(-250.0, 20.0)
        if box is not None:
            u, v, w = self.u[box], self.v[box], self.w[box]
            grow = np.clip((np.float32(20.0) - w) * np.float32(0.16), 0, 18)
            for side in (1.0, -1.0):
                rx, ry = 6.0 + grow, 6.0 + 0.9 * grow
                cx = np.float32(side) * (np.float32(26.0) + np.float32(0.6) * grow)
                m = ((u - cx) / rx) ** 2 + ((v - np.float32(yv + 4.0)) / ry) ** 2 <= 1.0
                self.paint(box, m & (w < 20.0), "muscle")
        # paraspinal muscles
        for side in (1.0, -1.0):
            m = ((self.u - np.float32(side * 30.0)) / np.float32(26.0)) ** 2 + (
                (self.v - np.float32(yv - 48.0)) / np.float32(24.0)
            ) ** 2 <= 1.0
            self.paint(self.full, m, "muscle")
        # aorta (anterior-left of the spine) and IVC (anterior-right)
        ax, ar = p["aorta"]
        m = ((self.u - np.float32(ax)) ** 2 + (self.v - np.float32(yv + 33.0)) ** 2) <= np.float32(ar * ar)
        self.paint(self.full, m, "aorta")
        ix, k = p["ivc"]
        m = ((self.u - np.float32(ix)) / np.float32(13.0 * k)) ** 2 + (
            (self.v - np.float32(yv + 30.0)) / np.float32(9.0 * k)
        ) ** 2 <= 1.0
        self.paint(self.full, m, "ivc")

    def _spine(self, p: dict) -> None:
        yv = p["y_vb"]
        u, v, w = self.u, self.v, self.w
        vb = (u / np.float32(22.0)) ** 2 + ((v - np.float32(yv)) / np.float32(18.0)) ** 2
        disc = np.mod(w - np.float32(p["disc_phase"]), np.float32(33.0)) < np.float32(8.0)
        self.paint(self.full, (vb <= 1.0) & (vb > 0.62) & ~disc, "cortical bone")
        self.paint(self.full, (vb <= 0.62) & ~disc, "trabecular bone")
        self.paint(self.full, (vb <= 1.0) & disc, "disc")
        rc = np.sqrt(u * u + (v - np.float32(yv - 30.0)) ** 2)
        self.paint(self.full, (rc <= 16.0) & (rc > 9.0), "cortical bone")
        sp = (u / np.float32(6.0)) ** 2 + ((v - np.float32(yv - 50.0)) / np.float32(16.0)) ** 2
        self.paint(self.full, sp <= 1.0, "cortical bone")
        tp = ((np.abs(u) - np.float32(32.0)) / np.float32(17.0)) ** 2 + (
            (v - np.float32(yv - 24.0)) / np.float32(5.0)
        ) ** 2
        self.paint(self.full, (tp <= 1.0) & ~disc, "cortical bone")
        self.paint(self.full, rc <= 9.0, "csf")

    def _ribs_and_lungs(self, p: dict) -> None:
        box = self.zslab(-30.0, 400.0)
        if box is None:
            return
        w, phi = self.w[box], self.ring_angle[box]
        stripes = np.cos(
            np.float32(2 * math.pi) * (w / np.float32(26.0) + phi * np.float32(2.0) + p["rib_phase"])
        )
        # ribs reach lower laterally/posteriorly than anteriorly (costal margin)
        lowest = np.float32(-30.0) + np.float32(80.0) * np.maximum(np.sin(phi), np.float32(0.0))
        ribs = self.ring[box] & (stripes > 0.7) & (w > lowest)
        self.paint(box, ribs, "cortical bone")
        # lung bases above the diaphragm dome (outside the mediastinum)
        box = self.zslab(p["diaphragm"] - 60.0, 400.0)
        if box is None:
            return
        u = self.u[box]
        lung = self.cavity[box] & (self.w[box] > self._dome(box, p) + 3.0) & (np.abs(u) > 32.0)
        self.paint(box, lung, "lung", 0)


def make_anatomy(
    seed: int, *, shape=(128, 128, 32), spacing=(2.5, 2.5, 6.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Return the phantom's (tissue classes, labels) as uint8 arrays in canonical RAS+ order."""
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    return _Anatomy(rng, shape, spacing).build()


# ----------------------------------------------------------------------------------------------
# appearance
# ----------------------------------------------------------------------------------------------
def _table(tab: dict[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([tab[name][0] for name in TISSUES], np.float32)
    amp = np.array([tab[name][1] for name in TISSUES], np.float32)
    return mean, amp


def _render(tissue: np.ndarray, modality: str, seed: int, spacing) -> np.ndarray:
    shape = tissue.shape
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, MODALITIES.index(modality)]))
    mean, amp = _table(_CT if modality == "ct" else _MRI)
    tex = 0.6 * _smooth_field(rng, shape, spacing, 25.0) + 0.8 * _smooth_field(rng, shape, spacing, 5.0)
    img = mean[tissue] + amp[tissue] * tex
    sigma = (1.0 / spacing[0], 1.0 / spacing[1], 1.5 / spacing[2])  # ~1 mm in-plane, 1.5 mm in z
    img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest", truncate=3.0)
    if modality == "ct":
        img += rng.standard_normal(shape, dtype=np.float32) * np.float32(_u(rng, 10.0, 20.0))
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    # MRI: global gain, smooth multiplicative coil bias, then Rician noise
    bias = np.exp(np.float32(0.08) * _smooth_field(rng, shape, spacing, 150.0))
    img *= np.float32(_u(rng, 0.9, 1.05)) * bias
    sd = np.float32(_u(rng, 12.0, 25.0))
    re = img + rng.standard_normal(shape, dtype=np.float32) * sd
    im = rng.standard_normal(shape, dtype=np.float32) * sd
    return np.sqrt(re * re + im * im).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# orientation and public API
# ----------------------------------------------------------------------------------------------
def phantom_affine(shape=(128, 128, 32), spacing=(2.5, 2.5, 6.0)) -> np.ndarray:
    """The canonical (RAS+) affine of a phantom: the given voxel sizes, volume centred on world 0."""
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


def _reorient(arrays, affine: np.ndarray, code) -> tuple[list[np.ndarray], np.ndarray]:
    """Flip/permute canonical RAS+ arrays into axis codes ``code`` with the matching affine."""
    shape = arrays[0].shape
    transform = ornt_mod.ornt_transform(ornt_mod.axcodes2ornt(("R", "A", "S")), ornt_mod.axcodes2ornt(code))
    out = [np.ascontiguousarray(ornt_mod.apply_orientation(a, transform)) for a in arrays]
    new_aff = affine @ ornt_mod.inv_ornt_aff(transform, shape)
    return out, new_aff


def make_phantom(
    modality: str,
    seed: int,
    *,
    shape=(128, 128, 32),
    spacing=(2.5, 2.5, 6.0),
    orientation: str = "RAS",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make a synthetic abdominal volume; return (image, labels, affine) in the file voxel order.

    ``shape`` and ``spacing`` are given in canonical RAS+ axis order (left-right, posterior-anterior,
    inferior-superior); ``orientation`` is the file's nibabel axis code (e.g. "RAS", "LPS", "LPI").
    CT images are int16 Hounsfield units, MRI images float32 (T2-SPIR-like, ~0..1300); labels are
    uint8 (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen). The anatomy depends on
    the seed only, so the same seed gives the same labels in both modalities.
    """
    mod = _check_modality(modality)
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    code = _check_orientation(orientation)
    tissue, labels = make_anatomy(seed, shape=shape, spacing=spacing)
    image = _render(tissue, mod, seed, spacing)
    affine = phantom_affine(shape, spacing)
    if code != ("R", "A", "S"):
        (image, labels), affine = _reorient([image, labels], affine, code)
    return image, labels, affine


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_phantom(
    out_dir: str | os.PathLike,
    modality: str,
    seed: int,
    *,
    overwrite: bool = False,
    **kw,
) -> tuple[Path, Path]:
    """Write ``out_dir/image.nii.gz`` and ``out_dir/labels.nii.gz`` for a phantom; return their paths.

    ``kw`` goes to :func:`make_phantom` (shape, spacing, orientation). Neither file is written when
    either exists already and ``overwrite`` is false (raises ``OutputExistsError``).
    """
    folder = Path(out_dir).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"phantom output {folder} is a file: give a folder")
    img_path, lab_path = folder / "image.nii.gz", folder / "labels.nii.gz"
    if folder.is_dir():  # fail fast, and check both files before writing either
        for path in (img_path, lab_path):
            check_output_path(path, overwrite=overwrite)
    image, labels, affine = make_phantom(modality, seed, **kw)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create phantom folder {folder}: {exc.strerror or exc}") from exc
    img_nii = _nifti(image, affine)
    lab_nii = _nifti(labels.astype(np.uint8, copy=False), affine)
    atomic_write(img_path, lambda tmp: nib.save(img_nii, tmp), overwrite=overwrite)
    atomic_write(lab_path, lambda tmp: nib.save(lab_nii, tmp), overwrite=overwrite)
    return img_path, lab_path
