"""Label clean-up after prediction: keep each organ's largest connected piece."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from .labels import ORGANS
from .metrics import bounding_box

LARGE_REMOVAL = 0.25
"""Removing more than this fraction of an organ is flagged: its largest piece may be a false positive
and the organ the smaller piece (measured: on a real CT with the CHAOS-trained model the spleen's
largest predicted piece lay elsewhere, and its Dice fell from 64.7 to 41.4)."""


def largest_components(labels: Any, organs: Iterable[int] = ORGANS) -> np.ndarray:
    """Return a copy of ``labels`` where every organ keeps only its largest connected piece.

    Each of the four organs is one connected object, so smaller islands of an organ's label are
    false positives (a kidney label on the other side, a spleen blob in the bowel); they become
    background. Connectivity is full (26-neighbourhood in 3-D), so thick slices whose cross-sections
    touch only at an edge or corner stay one piece. A tie keeps the piece found first in array order.
    """
    out = np.array(labels, copy=True)
    if out.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got {out.dtype}")
    structure = ndimage.generate_binary_structure(out.ndim, out.ndim)
    for c in organs:
        mask = out == c
        if not mask.any():
            continue
        box = bounding_box(mask)
        sub = mask[box]
        pieces, n = ndimage.label(sub, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        region = out[box]  # a view: writing into it edits ``out``
        region[sub & (pieces != int(sizes.argmax()))] = 0
    return out


def removed_fraction(
    before: np.ndarray, after: np.ndarray, organs: Iterable[int] = ORGANS
) -> dict[int, float]:
    """Fraction of each organ's voxels in ``before`` that the clean-up set to background."""
    out = {}
    for c in organs:
        n = int(np.count_nonzero(before == c))
        out[c] = 0.0 if n == 0 else 1.0 - int(np.count_nonzero(after == c)) / n
    return out


def clean_masks(
    masks: Mapping[str, Any], keep: Mapping[str, np.ndarray | None] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, float]]]:
    """Keep each organ's largest piece in every mask; also return each mask's fraction removed per organ.

    ``keep`` gives, per mask, the user's corrections (a label, or -1 where untouched): corrected voxels
    keep their label even away from the organ's largest piece, and count as not removed.
    """
    cleaned = {name: largest_components(arr) for name, arr in masks.items()}
    for name, corrections in (keep or {}).items():
        if corrections is not None and name in cleaned and corrections.shape == cleaned[name].shape:
            mask = cleaned[name]
            cleaned[name] = np.where(corrections >= 0, corrections, mask).astype(mask.dtype)
    return cleaned, {name: removed_fraction(masks[name], cleaned[name]) for name in masks}


def removal_warnings(removed: dict[int, float], names: tuple[str, ...] | list[str]) -> list[str]:
    """One line per organ that lost more than ``LARGE_REMOVAL`` of its voxels to the clean-up."""
    return [
        f"{names[c]}: {100 * f:.0f}% of its voxels lay outside its largest piece, which may be a false "
        "positive: check this organ against the mask without the clean-up"
        for c, f in removed.items()
        if f > LARGE_REMOVAL
    ]
