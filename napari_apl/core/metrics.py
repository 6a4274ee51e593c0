"""Segmentation metrics: per-organ Dice and average symmetric surface distance (ASSD, in mm).

Conventions (the same in every function):

- ``dice``: ``2 |P ∩ G| / (|P| + |G|)`` in [0, 1]; ``nan`` when the organ is absent from both
  ``pred`` and ``gt`` (nothing to score), ``0.0`` when it is in only one of them.
- ``assd``: surface voxels are the voxels of a mask with at least one face neighbour (6-neighbour
  in 3-D) outside the mask, counting the outside of the array as outside. Distances are Euclidean
  between voxel centres, in mm (``spacing``). ASSD is the pooled mean over both surfaces
  (Heimann et al., 2009): ``(sum_{p in S_P} d(p, S_G) + sum_{g in S_G} d(g, S_P)) / (|S_P| + |S_G|)``.
  ``nan`` when the organ is absent from both, ``inf`` when it is absent from exactly one.
- ``evaluate``: ``mean_dice`` is the mean over organs that are present in ``pred`` or ``gt``
  (``nan`` organs are skipped; a missed organ counts with Dice 0). ``mean_assd`` skips ``nan``
  organs likewise and is ``inf`` as soon as one organ is present in only one of the volumes (an
  unbounded surface error is not hidden by averaging); both means are ``nan`` when no organ is
  present anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import APLError
from .labels import CLASS_NAMES, ORGANS

__all__ = ["assd", "dice", "evaluate", "label_name"]

_MARGIN = 1  # voxels of padding around a mask's bounding box, where its surface is found


def label_name(label: int) -> str:
    """The display name of a label (``CLASS_NAMES`` entry, or ``"label N"`` outside the scheme)."""
    return CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else f"label {label}"


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise APLError(
            f"prediction shape {p.shape} does not match ground-truth shape {g.shape}:"
            " give label volumes on the same voxel grid"
        )
    if p.ndim == 0 or p.size == 0:
        raise APLError("prediction and ground truth are empty: give non-empty label volumes")
    return p, g


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise APLError(
            f"spacing {spacing!r} is invalid for {ndim}-D label volumes:"
            f" give {ndim} finite voxel sizes > 0 in mm"
        )
    return sp


def _labels(labels: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(lab) for lab in labels)


def dice(pred, gt, labels: Iterable[int] = ORGANS) -> dict[int, float]:
    """Dice coefficient per label: in [0, 1]; nan when the label is absent from both volumes."""
    p, g = _pair(pred, gt)
    out: dict[int, float] = {}
    for lab in _labels(labels):
        pm, gm = p == lab, g == lab
        total = int(np.count_nonzero(pm)) + int(np.count_nonzero(gm))
        if total == 0:
            out[lab] = math.nan
        else:
            out[lab] = 2.0 * int(np.count_nonzero(pm & gm)) / total
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside the mask (the array border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of the true voxels of ``mask`` (which must have some), padded by ``margin`` voxels."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, idx[0] - margin), min(mask.shape[axis], idx[-1] + 1 + margin)))
    return tuple(out)


def _surface_points(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The surface voxels' centres of ``mask`` (which has some) in mm, ``(n, ndim)``."""
    # Cropping to the mask's own box (one voxel of margin, or the array's edge) is exact: the erosion
    # sees the same neighbours there as in the whole array
    box = bounding_box(mask, _MARGIN)
    surface = _surface(mask[box])
    offset = np.array([b.start for b in box], dtype=np.float64)
    return (np.argwhere(surface) + offset) * np.asarray(spacing, dtype=np.float64)


def _assd_masks(pm: np.ndarray, gm: np.ndarray, spacing: Sequence[float]) -> float:
    """ASSD of two boolean masks (conventions in the module docstring)."""
    has_p, has_g = bool(pm.any()), bool(gm.any())
    if not has_p and not has_g:
        return math.nan
    if has_p != has_g:
        return math.inf
    # Exact nearest-surface distances between the two sets of surface points (k-d trees): time and memory
    # follow the surfaces, not the box around both masks (a distance transform over that box took two
    # minutes and 4 GB for a 512 x 512 x 300 CT with one stray voxel in a corner)
    sp_, sg_ = _surface_points(pm, spacing), _surface_points(gm, spacing)
    to_g = cKDTree(sg_).query(sp_, workers=1)[0]
    to_p = cKDTree(sp_).query(sg_, workers=1)[0]
    return (float(to_g.sum(dtype=np.float64)) + float(to_p.sum(dtype=np.float64))) / (len(sp_) + len(sg_))


def assd(pred, gt, spacing: Sequence[float], labels: Iterable[int] = ORGANS) -> dict[int, float]:
    """Average symmetric surface distance per label in mm; nan if absent from both, inf if from one."""
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    return {lab: _assd_masks(p == lab, g == lab, sp) for lab in _labels(labels)}


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan
    if any(math.isinf(v) for v in vals):
        return math.inf
    return float(sum(vals) / len(vals))


def evaluate(pred, gt, spacing: Sequence[float], labels: Iterable[int] = ORGANS) -> dict:
    """Dice and ASSD per organ (keyed by name) plus their means (nan/inf rules in the module docstring)."""
    p, g = _pair(pred, gt)
    labs = _labels(labels)
    d = dice(p, g, labs)
    a = assd(p, g, spacing, labs)
    return {
        "dice": {label_name(lab): d[lab] for lab in labs},
        "assd": {label_name(lab): a[lab] for lab in labs},
        "mean_dice": _mean(d.values()),
        "mean_assd": _mean(a.values()),
    }


def label_volume(arr: Any, what: str) -> np.ndarray:
    """``arr`` as integer labels (as it is when it is so already), refused in one line unless it holds
    only the scheme's labels 0..4.

    ``what`` names the volume in the message (a command-line flag, a layer).
    """
    arr = np.asarray(arr)
    top = len(CLASS_NAMES) - 1
    whole = arr.dtype.kind in "biu" or bool(np.array_equal(arr, np.round(arr)))
    if arr.size and (not whole or arr.min() < 0 or arr.max() > top):
        values = np.unique(arr) if whole and arr.min() >= 0 else None
        if values is not None and len(values) <= 256:  # a label map of another scheme
            shown = ", ".join(str(int(v)) for v in values[:12]) + (", ..." if len(values) > 12 else "")
            raise APLError(
                f"{what} holds labels {shown}, not only 0..{top} "
                f"({', '.join(f'{i} {n}' for i, n in enumerate(CLASS_NAMES))}): "
                "remap its labels to these (others to 0) first"
            )
        raise APLError(
            f"{what} is not a label volume (labels 0..{top} expected): did you pass the image instead of "
            "its labels?"
        )
    return arr if arr.dtype.kind in "iu" else arr.astype(np.int16)  # (no copy of a large integer volume)


def json_number(value: Any) -> float | str | None:
    """A score as strict JSON: NaN (an organ absent on both sides) -> None, ±inf (one missed) -> "inf"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def json_safe(value: Any) -> Any:
    """Scores (nested dicts and lists) as strict JSON, every float through ``json_number``."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return json_number(value)
    return value
