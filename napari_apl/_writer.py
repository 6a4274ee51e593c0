"""npe2 writers: labels and images back to NIfTI on the scan's ORIGINAL voxel grid, atomically.

A layer read by this plugin (or made by its widget) carries a ``ScanGeometry`` in its metadata: the
array is put back in the file's voxel order with the original affine and header
(``core.volume.save_nifti``). Any other 3-D layer is written in canonical order with the affine its
napari transform describes. An existing file is never replaced: npe2 writers cannot ask, so they
refuse with a one-line ``OutputExistsError``, shown as a notification too because napari turns a
writer's ``ValueError`` into a generic "nothing written" warning (the widget's export has an explicit
overwrite switch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._layers import notify_error, smallest_label_dtype, volume_for_writing
from .core.errors import APLError
from .core.volume import save_nifti

DEFAULT_SUFFIX = ".nii.gz"


def nifti_path(path: str | Path) -> Path:
    """Return ``path`` with ``.nii.gz`` appended unless it already ends in ``.nii``/``.nii.gz``."""
    p = Path(path).expanduser()
    if p.name.lower().endswith((".nii", ".nii.gz")):
        return p
    return p.with_name(p.name + DEFAULT_SUFFIX)


def write_layer_nifti(
    path: str | Path, data: Any, attributes: dict[str, Any], *, labels: bool, overwrite: bool = False
) -> Path:
    """Write one layer's data to a NIfTI file on its scan's original grid; return the path written."""
    out = nifti_path(path)
    volume = volume_for_writing(data, attributes)
    canonical = np.asarray(volume.data)
    if labels:
        dtype = smallest_label_dtype(canonical)
    elif canonical.dtype == np.float16:
        dtype = np.dtype(np.float32)
    else:
        dtype = None
    return save_nifti(volume.to_original(canonical), out, volume, dtype=dtype, overwrite=overwrite)


def _write_notifying(path: str, data: Any, attributes: dict[str, Any], labels: bool) -> list[str]:
    """Write for napari; a refusal is also shown as a one-line notification, since napari swallows it."""
    try:
        return [str(write_layer_nifti(path, data, attributes, labels=labels))]
    except APLError as exc:
        notify_error(exc)
        raise


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers (never overwrites an existing file)."""
    return _write_notifying(path, data, attributes, labels=True)


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (never overwrites an existing file)."""
    return _write_notifying(path, data, attributes, labels=False)
