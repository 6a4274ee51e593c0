"""Shared helpers between the core's canonical volumes and napari layers (no maths, only geometry).

Axis convention (the one place it is decided; the reader, the writer, the sample data and the
widget all go through these helpers):

- The core keeps volumes in canonical RAS+ voxel order ``(X, Y, Z) = (R, A, S)``.
- A napari layer holds the same voxels transposed to ``(Z, Y, X) = (S, A, R)``: napari's slider runs
  over axial slices (axis 0) and each displayed plane is an axial slice. No flips: voxel order stays
  RAS+.
- World coordinates are millimetres in scanner space, in the same reversed order
  ``(z_S, y_A, x_R)``. For an axis-aligned scan the layer gets ``scale`` = canonical spacing reversed
  and ``translate`` = canonical origin reversed; for an oblique scan it gets the full 4x4 ``affine``
  (the canonical affine with rows and columns reversed) and unit scale. So every file opened this way
  lines up with every other one in world space, whatever its on-disk orientation (RAS, LAS, LPS...).
- ``layer.metadata["napari_apl"]`` holds a small picklable ``ScanGeometry`` (original affine, file
  shape and dtype, header, orientation transform, source path) so that a layer can be written back
  on the file's ORIGINAL voxel grid with its original affine (``core.volume.save_nifti``).

Display note: with RAS+ voxel order, napari draws the patient's right on the right and anterior at
the bottom of the canvas (upside down for radiologists). The widget's "radiological view" box sets
``viewer.scene.camera.orientation2d = ("up", "left")``; data and world coordinates do not change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import APLError, OutputError
from .core.labels import CLASS_NAMES, LABEL_COLORS
from .core.volume import Volume, volume_from_array

META_KEY = "napari_apl"
UNITS = ("mm", "mm", "mm")
# napari's world axes for a scan are (S, A, R): its sliders step through axial, coronal and sagittal planes
AXIS_LABELS = ("axial", "coronal", "sagittal")
# Reverses the three spatial axes of a 4x4 homogeneous matrix: canonical (X, Y, Z) <-> napari (Z, Y, X).
_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_DEFAULT_LABEL_COLOR = (0.7, 0.7, 0.7, 1.0)


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """Everything about a scan but its voxels (small, picklable): rebuilds a ``Volume`` for any array."""

    shape: tuple[int, int, int]
    """Canonical ``(X, Y, Z)`` shape."""
    reference: Volume
    """The scan's ``Volume`` (affines, header, orientation transform, path) whose data is a zero-byte
    placeholder of the right shape and dtype."""

    @classmethod
    def from_volume(cls, volume: Volume) -> ScanGeometry:
        """Record the geometry of ``volume`` (its voxels are not kept)."""
        shape = tuple(int(s) for s in volume.shape)
        return cls(shape, dataclasses.replace(volume, data=_placeholder(shape, volume.data.dtype)))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the placeholder (it would be materialised)."""
        ref = self.reference
        return {
            "shape": self.shape,
            "dtype": ref.data.dtype,
            "reference": dataclasses.replace(ref, data=None),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the placeholder after unpickling."""
        ref = dataclasses.replace(state["reference"], data=_placeholder(state["shape"], state["dtype"]))
        object.__setattr__(self, "shape", state["shape"])
        object.__setattr__(self, "reference", ref)

    def with_data(self, canonical: Any) -> Volume:
        """Return a ``Volume`` with this geometry holding ``canonical`` (canonical ``(X, Y, Z)`` order)."""
        shape = tuple(int(s) for s in canonical.shape[:3])
        if shape != self.shape:
            raise APLError(
                f"a layer of canonical shape {shape} does not match the scan {self.name} {self.shape}: "
                "use a layer made from this image"
            )
        return dataclasses.replace(self.reference, data=canonical)

    @property
    def affine(self) -> np.ndarray:
        """Canonical voxel -> world (RAS mm) affine."""
        return np.asarray(self.reference.affine, dtype=np.float64)

    @property
    def original_affine(self) -> np.ndarray:
        """The file's own affine."""
        return np.asarray(self.reference.original_affine, dtype=np.float64)

    @property
    def path(self) -> Path | None:
        """The scan's file, if it has one."""
        return self.reference.path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Canonical voxel sizes in mm."""
        return self.reference.spacing

    @property
    def name(self) -> str:
        """File name without its NIfTI suffix (``"volume"`` when the scan has no file)."""
        return self.reference.name


def _placeholder(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A read-only array of ``shape`` that takes no memory (all strides 0)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


# -- array order ---------
def to_layer_order(canonical: Any) -> Any:
    """Canonical ``(X, Y, Z)`` array -> napari layer order ``(Z, Y, X)`` (a view; dask stays lazy)."""
    return canonical.transpose(2, 1, 0)


def to_canonical_order(layer_data: Any) -> Any:
    """Napari layer order ``(Z, Y, X)`` -> canonical ``(X, Y, Z)`` (a view; inverse of ``to_layer_order``)."""
    return layer_data.transpose(2, 1, 0)


def swap_affine(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 affine between canonical ``(X, Y, Z)`` and napari ``(Z, Y, X)`` order (an involution)."""
    return _SWAP @ np.asarray(matrix, dtype=np.float64) @ _SWAP


def layer_transform(canonical_affine: np.ndarray) -> dict[str, Any]:
    """Kwargs placing a canonical volume in world mm: ``scale``+``translate``, or ``affine`` if oblique."""
    napari_affine = swap_affine(canonical_affine)
    lin = napari_affine[:3, :3]
    diag = np.diag(lin)
    off = lin - np.diag(diag)
    if np.all(diag > 0) and np.abs(off).max() <= 1e-6 * np.abs(diag).max():
        return {
            "scale": tuple(float(v) for v in diag),
            "translate": tuple(float(v) for v in napari_affine[:3, 3]),
        }
    return {"affine": napari_affine}


def world_matrix_from_attributes(attributes: Mapping[str, Any], ndim: int = 3) -> np.ndarray:
    """Return the 4x4 data->world matrix (napari order) of a layer described by its state dict."""
    from napari.utils.transforms import Affine

    data2physical = Affine(
        scale=attributes.get("scale") if attributes.get("scale") is not None else [1.0] * ndim,
        translate=attributes.get("translate") if attributes.get("translate") is not None else [0.0] * ndim,
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        ndim=ndim,
    ).affine_matrix
    physical2world = attributes.get("affine")
    if physical2world is None:
        physical2world = np.eye(ndim + 1)
    elif hasattr(physical2world, "affine_matrix"):
        physical2world = physical2world.affine_matrix
    return np.asarray(physical2world, dtype=np.float64) @ np.asarray(data2physical, dtype=np.float64)


def layer_world_matrix(layer: Any) -> np.ndarray:
    """Return the 4x4 data->world matrix (napari order) of a 3-D napari layer (public attributes only)."""
    attrs = {key: getattr(layer, key) for key in ("scale", "translate", "rotate", "shear", "affine")}
    return world_matrix_from_attributes(attrs, ndim=layer.ndim)


def transform_kwargs(layer: Any) -> dict[str, Any]:
    """Return the transform kwargs that put a new layer exactly on top of ``layer``."""
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": layer.affine.affine_matrix.copy(),
        "units": tuple(str(u) for u in layer.units) if getattr(layer, "units", None) is not None else None,
        "axis_labels": tuple(map(str, layer.axis_labels)) if getattr(layer, "axis_labels", None) else None,
    }


def holds_canonical_voxels(layer: Any) -> bool:
    """Whether a 3-D layer's data, transposed, is in canonical RAS+ order (``volume_from_layer`` then
    uses its voxels as they are, without reorienting them)."""
    geom = geometry_of(layer.metadata)
    if geom is not None and geom.shape == tuple(int(s) for s in layer.data.shape[::-1]):
        return True
    from nibabel.orientations import io_orientation

    ornt = io_orientation(swap_affine(layer_world_matrix(layer)))
    return bool(np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]))


def canonical_transform_kwargs(layer: Any, geometry: ScanGeometry) -> dict[str, Any]:
    """Transform kwargs that put a layer of the canonical voxels of ``layer``'s scan (``geometry``)
    exactly over ``layer`` in world space.

    They are ``layer``'s own when it holds the canonical voxels already (a scan this plugin opened, or a
    layer in RAS+ order). A layer whose transform flips or permutes axes holds them in another order
    (``volume_from_layer`` reorients it): then they are the canonical affine's, and ``layer``'s units and
    axis labels are kept.
    """
    kw = transform_kwargs(layer)
    if holds_canonical_voxels(layer):
        return kw
    kw.update(scale=(1.0, 1.0, 1.0), translate=(0.0, 0.0, 0.0), rotate=np.eye(3), shear=np.zeros(3))
    kw["affine"] = np.eye(4)
    kw.update(layer_transform(geometry.affine))
    return kw


def canonical_world_matrix(layer: Any, geometry: ScanGeometry | None) -> np.ndarray:
    """The 4x4 data->world matrix (napari order) of a layer of ``layer``'s canonical voxels (see
    ``canonical_transform_kwargs``)."""
    if geometry is None or holds_canonical_voxels(layer):
        return layer_world_matrix(layer)
    return swap_affine(geometry.affine)


# -- metadata ---------
def make_metadata(geometry: ScanGeometry, role: str, **extra: Any) -> dict[str, Any]:
    """Return ``layer.metadata`` content recording the scan geometry and the layer's role."""
    return {
        META_KEY: {
            "geometry": geometry,
            "source_path": str(geometry.path) if geometry.path is not None else None,
            "role": role,
            **extra,
        }
    }


def unwrap_layer(layer: Any) -> Any:
    """The layer itself behind a proxy napari may hand plugins (``layer`` when it is none)."""
    return getattr(layer, "__wrapped__", layer)


def same_layer(a: Any, b: Any) -> bool:
    """Whether two layers are the same object (napari may hand plugins proxies of its layers)."""
    return unwrap_layer(a) is unwrap_layer(b)


def geometry_of(metadata: Mapping[str, Any] | None) -> ScanGeometry | None:
    """Return the ``ScanGeometry`` stored in a layer's metadata, if any."""
    if not metadata:
        return None
    rec = metadata.get(META_KEY)
    if isinstance(rec, Mapping) and isinstance(rec.get("geometry"), ScanGeometry):
        return rec["geometry"]
    return None


def volume_from_layer(layer: Any) -> Volume:
    """Return a canonical ``Volume`` viewing a 3-D napari layer's data (no copy for numpy data)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        raise APLError(f"layer '{layer.name}' is multiscale: open the scan as a single-resolution image")
    if getattr(layer, "rgb", False) or data.ndim != 3:
        raise APLError(
            f"layer '{layer.name}' is not a 3-D grey volume (shape {tuple(data.shape)}): choose a 3-D scan"
        )
    canonical = to_canonical_order(data)
    geom = geometry_of(layer.metadata)
    if geom is not None and geom.shape == tuple(canonical.shape):
        return geom.with_data(canonical)
    return volume_from_array(canonical, swap_affine(layer_world_matrix(layer)))


def volume_for_writing(data: Any, attributes: Mapping[str, Any]) -> Volume:
    """Return the canonical ``Volume`` a writer saves for a layer's ``data`` and state dict."""
    arr = np.asarray(data)
    if attributes.get("rgb"):
        raise OutputError("an RGB layer cannot be saved as NIfTI: only grey 3-D volumes can")
    if arr.ndim != 3:
        raise OutputError(f"only 3-D layers can be saved as NIfTI, this one has shape {arr.shape}")
    canonical = to_canonical_order(arr)
    geom = geometry_of(attributes.get("metadata"))
    if geom is not None and geom.shape == tuple(canonical.shape):
        return geom.with_data(canonical)
    return volume_from_array(canonical, swap_affine(world_matrix_from_attributes(attributes)))


# -- layer data tuples ---------
def label_colormap(class_names: tuple[str, ...] | list[str] = CLASS_NAMES) -> dict[Any, tuple]:
    """Return a napari label colormap dict: organ colours from ``core.labels``, grey for other values."""
    colors: dict[Any, tuple] = {None: _DEFAULT_LABEL_COLOR}
    for i in range(len(class_names)):
        colors[i] = LABEL_COLORS.get(i, _DEFAULT_LABEL_COLOR)
    return colors


def confidence_colormap() -> Any:
    """Return the ω layer's colormap: unsure voxels (ω near 0) bright, sure ones (ω = 1) black.

    With the layer's additive blending black adds nothing, so turning ``confidence ω`` on lights up
    where the model hesitates (organ borders, tissue the source never showed) over the scan instead of
    washing the whole canvas in one colour: almost every voxel of a scan is confidently background.
    The layer's values stay ω (napari's status bar reads them); only the colours run backwards.
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    inferno = ensure_colormap("inferno")
    reversed_colors = inferno.colors[::-1].copy()
    return Colormap(colors=reversed_colors, controls=inferno.controls, name="ω doubt (inferno reversed)")


def label_features(class_names: tuple[str, ...] | list[str] = CLASS_NAMES) -> dict[str, list]:
    """Return a Labels ``features`` table naming each label value (shown in napari's status bar)."""
    return {"index": list(range(len(class_names))), "name": list(class_names)}


def smallest_label_dtype(arr: np.ndarray) -> np.dtype:
    """Return the smallest integer dtype holding all values of a label array."""
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    for cand in (np.uint8, np.int16, np.int32):
        info = np.iinfo(cand)
        if info.min <= lo and hi <= info.max:
            return np.dtype(cand)
    return np.dtype(np.int64)


def labels_kwargs(geometry: ScanGeometry, name: str, role: str = "labels", **extra: Any) -> dict[str, Any]:
    """Layer kwargs of a Labels layer on ``geometry`` with organ names and colours."""
    return {
        "name": name,
        "colormap": label_colormap(),
        "features": label_features(),
        "metadata": make_metadata(geometry, role),
        "units": UNITS,
        "axis_labels": AXIS_LABELS,
        **layer_transform(geometry.affine),
        **extra,
    }


def image_kwargs(geometry: ScanGeometry, name: str, role: str = "image", **extra: Any) -> dict[str, Any]:
    """Layer kwargs of an Image layer on ``geometry``."""
    return {
        "name": name,
        "metadata": make_metadata(geometry, role),
        "units": UNITS,
        "axis_labels": AXIS_LABELS,
        **layer_transform(geometry.affine),
        **extra,
    }


def image_layer_data(volume: Volume, name: str | None = None, **extra: Any) -> tuple:
    """Return a napari ``(data, kwargs, "image")`` tuple for a canonical volume."""
    geom = ScanGeometry.from_volume(volume)
    data = to_layer_order(volume.data)
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    kwargs = image_kwargs(geom, name or volume.name, **extra)
    return data, kwargs, "image"


def labels_layer_data(volume: Volume, name: str | None = None, **extra: Any) -> tuple:
    """Return a napari ``(data, kwargs, "labels")`` tuple for a canonical label volume."""
    geom = ScanGeometry.from_volume(volume)
    arr = np.asarray(volume.compute())
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    arr = arr.astype(smallest_label_dtype(arr), copy=False)
    data = np.ascontiguousarray(to_layer_order(arr))
    return data, labels_kwargs(geom, name or volume.name, **extra), "labels"


def ct_display_window(preset_name: str = "ct-abdomen") -> tuple[float, float]:
    """Contrast limits of a CT window preset (``core.preprocess.PRESETS``; the abdomen's in HU by default)."""
    from .core.preprocess import PRESETS

    preset = PRESETS[preset_name]
    return (preset.level - preset.width / 2, preset.level + preset.width / 2)


def voxel_volume_ml(spacing: tuple[float, float, float]) -> float:
    """Volume of one voxel in millilitres."""
    return math.prod(spacing) / 1000.0


# -- notifications ---------
def one_line(exc: BaseException | str) -> str:
    """Return a one-line message for an exception (APLError messages as they are)."""
    if isinstance(exc, str):
        return " ".join(exc.split())
    text = " ".join(str(exc).split())
    if isinstance(exc, APLError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def notify_error(exc: BaseException | str) -> str:
    """Show a one-line error notification in napari (never a traceback dialog); return the message."""
    from napari.utils.notifications import show_error

    msg = one_line(exc)
    show_error(msg)
    return msg
