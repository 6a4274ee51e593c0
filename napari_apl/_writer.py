"""npe2 writers: labels and images back to NIfTI on the scan's ORIGINAL voxel grid, atomically.

A layer read by this plugin (or made by its widget) carries a ``ScanGeometry`` in its metadata: the
array is put back in the file's voxel order with the original affine and header
(``core.volume.save_nifti``). Any other 3-D layer is written in canonical order with the affine its
napari transform describes. An existing file is never replaced: npe2 writers cannot ask, so they
refuse with one line, raised as ``LayerNotSaved`` (an ``OSError``): napari reports a writer's
``ValueError`` only as a misleading "no writer found" warning, while other errors reach the caller and,
from File > Save, napari's own error notification (the widget's export has an explicit overwrite
switch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import META_KEY, smallest_label_dtype, volume_for_writing
from .core.errors import APLError, OutputError, OutputExistsError
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
    _check_complete(data, attributes)
    volume = volume_for_writing(data, attributes)
    canonical = np.asarray(volume.data)
    if labels:
        role = ((attributes.get("metadata") or {}).get(META_KEY) or {}).get("role")
        # a label file read back keeps its integer type; masks made on a scan take the smallest one
        dtype = _label_dtype(canonical, volume) if role == "labels" else smallest_label_dtype(canonical)
    elif canonical.dtype in (np.float16, np.float64):  # float64 (a scaled integer CT read): 4x the bytes
        dtype = np.dtype(np.float32)
    else:
        dtype = None
    try:
        return save_nifti(volume.to_original(canonical), out, volume, dtype=dtype, overwrite=overwrite)
    except OutputExistsError:
        raise OutputExistsError(
            f"not saved: {out.name} exists already (napari-apl does not replace a file when saving a "
            f"layer): save under another name, or delete {out} first"
        ) from None


def _check_complete(data: Any, attributes: dict[str, Any]) -> None:
    """Refuse a prediction layer still being computed: reading it whole gives zeros for slices not done."""
    infer = sys.modules.get("napari_apl.core.infer")  # (not imported: no prediction can exist yet)
    if infer is not None and isinstance(data, infer._LazyMap):
        done, total = data.slices_done(), data.predictor.total
        if done < total:
            name = attributes.get("name") or "the layer"
            raise OutputError(
                f"not saved: '{name}' is still being predicted ({done} of {total} slices done): save it "
                "when Predict has finished"
            )


def _label_dtype(canonical: np.ndarray, volume: Any) -> np.dtype:
    """The labels' dtype in the file: the file's own integer type when it holds them, else the smallest."""
    header = getattr(volume, "header", None)
    try:
        original = np.dtype(header.get_data_dtype()) if header is not None else None
    except Exception:  # a header without a data type
        original = None
    if original is not None and original.kind in "iu" and canonical.size:
        info = np.iinfo(original)
        if info.min <= int(canonical.min()) and int(canonical.max()) <= info.max:
            return original.newbyteorder("=")
    return smallest_label_dtype(canonical)


class LayerNotSaved(OSError):
    """A writer's one-line refusal, as an ``OSError`` so that napari passes it on instead of hiding it."""


def _write_for_napari(path: str, data: Any, attributes: dict[str, Any], labels: bool) -> list[str]:
    """Write for napari; a refusal is raised as ``LayerNotSaved`` with the same one-line message."""
    try:
        return [str(write_layer_nifti(path, data, attributes, labels=labels))]
    except APLError as exc:
        raise LayerNotSaved(" ".join(str(exc).split())) from None


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers (never overwrites an existing file)."""
    return _write_for_napari(path, data, attributes, labels=True)


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (never overwrites an existing file)."""
    return _write_for_napari(path, data, attributes, labels=False)
