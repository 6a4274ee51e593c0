"""npe2 reader: NIfTI scans and label volumes as napari layers that keep the scan's geometry.

Layer data are canonical RAS+ voxels transposed to ``(Z, Y, X)``; see ``_layers`` for the
convention. A broken file gives a one-line error notification and no layer (never a traceback).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import (
    confidence_colormap,
    ct_display_window,
    image_layer_data,
    labels_layer_data,
    notify_error,
)
from .core.batch import volume_name
from .core.errors import APLError
from .core.preprocess import (  # (the label rules live in the core: the command line refuses label files)
    LABEL_NAME_HINT,
    MAX_HINTED_LABEL_VALUES,
    is_integral,
    looks_like_offset_ct,
)
from .core.preprocess import looks_like_labels as _array_looks_like_labels
from .core.volume import Volume, display_data, load_volume, max_voxel_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LAZY_BYTES = 1024**3
NULL_LAYER: list = [(None,)]  # npe2's "handled, no layer" sentinel


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list] | None:
    """npe2 reader hook: return ``read_nifti`` for NIfTI paths, ``None`` for anything else."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_nifti(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | Sequence[str]) -> list:
    """Read one or more NIfTI files into layer data tuples; broken files become notifications."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list = []
    for p in paths:
        try:
            layers.append(read_layer_data(p))
        except APLError as exc:
            notify_error(exc)
        except Exception as exc:  # a bug or an unexpected library error: still one line, no dialog
            notify_error(f"{p} cannot be opened: {type(exc).__name__}: {exc}")
    return layers or NULL_LAYER


def read_layer_data(path: str | Path) -> tuple:
    """Read a NIfTI file as an image or a labels layer data tuple (raises ``APLError`` on bad files)."""
    path = Path(path)
    volume = load_volume(path, lazy=_should_be_lazy(path))
    kind = exported_map_kind(path.name)
    if kind is not None and np.dtype(volume.data.dtype).kind == "f":
        # a map napari-apl wrote: shown as the session showed it (over the scan, not an opaque grey
        # image hiding it), and kept out of the widget's image choice (MAP_FILE_ROLES)
        return image_layer_data(
            volume,
            role=f"{kind} map",
            colormap=confidence_colormap() if kind == "confidence" else "inferno",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.6,
        )
    if looks_like_labels(volume, path.name):
        return labels_layer_data(volume)
    extra: dict[str, Any] = {}
    limits = _ct_window(volume)
    if limits is not None:
        extra["contrast_limits"] = limits
    if volume.lazy:  # a slice with NaN/Inf is shown and said once, not a traceback from napari's slicing
        volume = dataclasses.replace(volume, data=display_data(volume, _warn_nonfinite))
    return image_layer_data(volume, **extra)


def exported_map_kind(name: str) -> str | None:
    """``"confidence"`` or ``"consistency"`` for a map file napari-apl writes (``confidence.nii.gz``
    from ``predict``, ``<scan>_consistency.nii.gz`` from the widget's export), else ``None``."""
    stem = volume_name(name).lower()
    for kind in ("confidence", "consistency"):
        if stem == kind or stem.endswith(f"_{kind}"):
            return kind
    return None


def _warn_nonfinite(message: str) -> None:
    """Say (once per layer, from whichever thread napari slices in) that a lazy scan holds NaN/Inf."""
    from napari.utils.notifications import show_warning

    show_warning(f"napari-apl: {message}")


def _should_be_lazy(path: Path) -> bool:
    """Whether the file is big enough to be read lazily (slice by slice through dask)."""

    from .core.volume import has_scaling, nib_load

    try:
        img = nib_load(path, keep_file_open=False)
        voxels = math.prod(int(s) for s in img.header.get_data_shape())
        dtype = np.dtype(img.header.get_data_dtype())
        unscaled = not has_scaling(img)
    except Exception:  # load_volume will report what is wrong with the file
        return False
    nbytes = voxels * (dtype.itemsize if unscaled else 8)  # scaled voxels come back as float64
    if (
        LABEL_NAME_HINT.search(path.name)
        and nbytes <= max_voxel_bytes()
        and ((dtype.kind in "iu" and unscaled) or _first_slices_look_like_labels(img))
    ):
        # a label file is held as the smallest integer type (uint8 for organ labels), also one stored as
        # floats (as CHAOS stores them): counted so, it opens as a paintable Labels layer, not as a lazy
        # image (if it can be read whole at all)
        return voxels > LAZY_BYTES
    return nbytes > LAZY_BYTES


def _first_slices_look_like_labels(img: Any) -> bool:
    """Whether a float (or scaled) file's first axial slices hold few whole numbers (cheap to read: they
    come first in the file), so that reading it whole for a Labels layer is worth it."""
    try:
        sample = np.asarray(img.dataobj[:, :, : min(4, int(img.shape[2]))])
    except Exception:
        return False
    return sample.size > 0 and is_integral(sample) and np.unique(sample).size <= MAX_HINTED_LABEL_VALUES


def looks_like_labels(volume: Volume, name: str = "") -> bool:
    """Whether a volume read whole opens as a Labels layer (``core.preprocess.looks_like_labels``: few
    non-negative whole numbers); a lazily read one opens as an image."""
    return not volume.lazy and _array_looks_like_labels(np.asarray(volume.data), name)


def _ct_window(volume: Volume) -> tuple[float, float] | None:
    """Abdominal CT display window for voxels in Hounsfield units (or HU + 1024), else ``None``."""
    if volume.lazy:
        return None
    data = np.asarray(volume.data)
    if data.size == 0:
        return None
    if looks_like_offset_ct(data):  # (first: a scanner's padding of -2000 is no air in Hounsfield units)
        return ct_display_window("ct-abdomen-offset")
    if float(data.min()) <= -500 and float(data.max()) >= 200:
        return ct_display_window()
    return None
