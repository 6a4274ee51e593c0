"""NIfTI volumes in canonical RAS+ voxel order, exact round trips to file order, and the 2-D slice grid.

``load_volume`` reads a ``.nii``/``.nii.gz`` file, validates it (one-line ``VolumeError`` messages that
name the file and say what to do) and reorients it to canonical RAS+ with axis permutations and flips
only, so that ``Volume.to_original`` gives back the file's voxel order exactly. ``save_nifti`` writes
an array in file order with the reference's original affine and header through ``atomic_write``.
``SliceGrid`` maps axial slices ``(N, C, X, Y)`` to the network grid ``(N, C, H', W')`` and back.

Lazy loading (``lazy=True``) returns a dask array with one chunk per axial slice (canonical axis 2)
read through nibabel's array proxy; nothing but the header is read at load time, so the NaN/Inf
check runs on demand, slice by slice, when the chunks are computed (a ``VolumeError`` is raised
then). The size limit for eager loading is ``NAPARI_APL_MAX_VOXEL_BYTES`` (bytes, default 4 GiB).
"""

from __future__ import annotations

import bisect
import copy
import gzip
import io
import logging
import math
import os
import struct
import sys
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from nibabel.spatialimages import HeaderDataError

from .errors import OutputError, VolumeError
from .io_utils import atomic_write, seek_target

try:  # ISA-L's inflate: a gzip stream read front to back in about half of zlib's CPU time
    from isal import isal_zlib as _isal_zlib
except ImportError:  # isal is a dependency, but a --no-deps install may lack it
    _isal_zlib = None

__all__ = [
    "DEFAULT_MAX_VOXEL_BYTES",
    "MAX_SPACING_MM",
    "MAX_VOXEL_BYTES_ENV",
    "MIN_SPACING_MM",
    "SliceGrid",
    "Volume",
    "derived_header",
    "display_data",
    "file_looks_whole",
    "has_scaling",
    "load_volume",
    "max_voxel_bytes",
    "save_canonical",
    "save_nifti",
    "volume_from_array",
]

MAX_VOXEL_BYTES_ENV = "NAPARI_APL_MAX_VOXEL_BYTES"
DEFAULT_MAX_VOXEL_BYTES = 4 * 1024**3
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 100.0
MAX_GRID_PX = 4096  # largest side of a slice on the model's grid (a checkpoint's input size: the same)
# an axial slice wider than this (a body is at most ~0.7 m; a CT's field of view 0.5-0.8 m) is a header error
MAX_FIELD_MM = 2000.0
_READ_CHUNK_BYTES = 64 * 1024**2
# Errors nibabel, gzip and zlib raise for files that are not NIfTI, corrupt or truncated.
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,
    EOFError,
    zlib.error,
    *((_isal_zlib.error,) if _isal_zlib is not None else ()),
    struct.error,
    ValueError,
    TypeError,
    MemoryError,
    ArithmeticError,  # e.g. an infinite vox_offset turned into an int
)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def max_voxel_bytes() -> int:
    """Largest voxel array in bytes an eager load may allocate (env ``NAPARI_APL_MAX_VOXEL_BYTES``)."""
    raw = os.environ.get(MAX_VOXEL_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXEL_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise VolumeError(
            f"environment variable {MAX_VOXEL_BYTES_ENV}={raw!r} is not a number of bytes: "
            "set it to an integer such as 8589934592 or unset it"
        ) from None
    if value <= 0:
        raise VolumeError(f"environment variable {MAX_VOXEL_BYTES_ENV}={raw!r} must be a positive byte count")
    return value


def _one_line(exc: BaseException) -> str:
    """Return a short, single-line description of an exception."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text[:200]}"


def _is_dask(arr: Any) -> bool:
    """Whether ``arr`` is a dask array (without importing dask when it is not loaded)."""
    mod = sys.modules.get("dask.array")
    return mod is not None and isinstance(arr, mod.Array)


def _is_torch(arr: Any) -> bool:
    """Whether ``arr`` is a torch tensor (without importing torch when it is not loaded)."""
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(arr, mod.Tensor)


def _apply_ornt(arr: Any, ornt: np.ndarray) -> Any:
    """Apply a nibabel orientation transform (flips then transpose) to the leading axes of ``arr``.

    Same semantics as ``nibabel.orientations.apply_orientation``; numpy arrays go through nibabel,
    dask arrays and torch tensors are handled here (views where the library allows it).
    """
    n = ornt.shape[0]
    if isinstance(arr, np.ndarray):
        return apply_orientation(arr, ornt)
    flips = [ax for ax in range(n) if ornt[ax, 1] == -1]
    perm = [int(p) for p in np.argsort(ornt[:, 0])] + list(range(n, arr.ndim))
    if _is_torch(arr):
        if flips:
            arr = arr.flip(flips)
        return arr.permute(*perm)
    if flips:
        key = tuple(slice(None, None, -1) if ax in flips else slice(None) for ax in range(n))
        arr = arr[key]
    return arr.transpose(perm)


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """Return the orientation transform that undoes ``ornt`` (canonical -> original)."""
    inv = np.empty_like(ornt)
    for ax, (dest, flip) in enumerate(ornt):
        inv[int(dest)] = (ax, flip)
    return inv


def _spatial_shape(shape: tuple[int, ...], label: str) -> tuple[int, int, int]:
    """Validate that ``shape`` is 3-D (trailing singleton axes allowed) and non-empty."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise VolumeError(
            f"{label} is {len(shape)}-D (shape {shape}): a 3-D volume is needed, "
            "convert the image to a 3-D NIfTI first"
        )
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise VolumeError(
            f"{label} is {len(shape)}-D (shape {shape}) with {math.prod(shape[3:])} volumes: "
            "extract a single 3-D volume first (e.g. fslroi or nibabel.four_to_three)"
        )
    spatial = shape[:3]
    if any(s <= 0 for s in spatial):
        raise VolumeError(f"{label} has an empty dimension (shape {shape}): give a non-empty 3-D volume")
    return spatial  # type: ignore[return-value]


# NIfTI spatial units other than millimetres, as the factor that turns them into millimetres
_UNITS_TO_MM = {"meter": 1000.0, "micron": 0.001}


def _in_millimetres(affine: np.ndarray, header: Any) -> tuple[np.ndarray, Any, str]:
    """``(affine, header, unit)``: for a header whose spatial unit is metres or microns (``xyzt_units``), the
    affine in millimetres and a copy of the header saying so (its qform, sform and voxel sizes scaled
    alike), with the file's unit; otherwise all three unchanged (millimetres, or no unit: taken as mm)."""
    try:
        unit = str(header.get_xyzt_units()[0])
    except (AttributeError, KeyError, ValueError):
        return affine, header, ""
    factor = _UNITS_TO_MM.get(unit)
    if factor is None:
        return affine, header, ""
    scale = np.diag([factor, factor, factor, 1.0])
    hdr = header.copy()
    zooms = hdr.get_zooms()
    hdr.set_zooms(tuple(float(z) * factor for z in zooms[:3]) + tuple(zooms[3:]))
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode > 0:
        hdr.set_qform(scale @ header.get_qform(), code=qcode)
    if scode > 0:
        hdr.set_sform(scale @ header.get_sform(), code=scode)
    hdr.set_xyzt_units("mm", hdr.get_xyzt_units()[1])
    return scale @ np.asarray(affine, dtype=np.float64), hdr, unit


def _check_affine(affine: np.ndarray, label: str, unit: str = "") -> np.ndarray:
    """Validate a 4x4 voxel-to-world affine (finite, sane spacing, non-singular) and return it; ``unit``
    names the header's spatial unit when the affine was converted from it to millimetres."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise VolumeError(f"{label} has an affine of shape {aff.shape}: a 4x4 matrix is needed")
    if not np.all(np.isfinite(aff)):
        raise VolumeError(
            f"{label} has a non-finite (NaN/Inf) affine: fix the qform/sform of the file header"
        )
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(zooms <= 0):
        raise VolumeError(
            f"{label} has a zero voxel spacing {tuple(round(float(z), 4) for z in zooms)} mm: "
            "fix the voxel sizes (pixdim) / affine in the file header"
        )
    if np.any(zooms < MIN_SPACING_MM) or np.any(zooms > MAX_SPACING_MM):
        said = f", converted from the header's unit, {unit}s," if unit else ""
        raise VolumeError(
            f"{label} has an implausible voxel spacing {tuple(round(float(z), 4) for z in zooms)} mm{said} "
            f"(allowed {MIN_SPACING_MM}..{MAX_SPACING_MM} mm): fix the voxel sizes "
            f"{'or their unit (xyzt_units) ' if unit else ''}in the file header"
        )
    # |det| relative to the product of column norms: 1 for orthogonal axes, 0 for degenerate ones.
    if abs(np.linalg.det(aff[:3, :3])) / float(np.prod(zooms)) < 1e-6:
        raise VolumeError(
            f"{label} has a singular affine (voxel axes are collinear): fix the qform/sform of the header"
        )
    if not np.allclose(aff[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"{label} has an affine whose last row is not [0, 0, 0, 1]: fix the header")
    return aff


def _orientation(affine: np.ndarray, label: str) -> np.ndarray:
    """Return the original -> canonical (RAS+) orientation transform of ``affine``."""
    ornt = io_orientation(affine)
    if np.any(np.isnan(ornt)):
        raise VolumeError(f"{label} has an affine whose axes cannot be matched to R/A/S: fix the header")
    return ornt


def _check_dtype(dtype: np.dtype, label: str) -> None:
    """Refuse data types that are not real scalar numbers (complex, RGB, structured)."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise VolumeError(
            f"{label} has voxel type {dtype}: a scalar integer or float image is needed "
            "(convert RGB/complex images first)"
        )


def _nonfinite_error(label: str, where: str = "") -> VolumeError:
    """The error for NaN/Inf voxels."""
    return VolumeError(
        f"{label} contains NaN or Inf voxels{where}: replace them (e.g. with 0) before using the image"
    )


def _check_finite(block: np.ndarray, label: str, where: str = "") -> np.ndarray:
    """Raise a ``VolumeError`` if a float block holds NaN or Inf; return the block."""
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise _nonfinite_error(label, where)
    return block


@dataclass(eq=False)
class Volume:
    """A 3-D image or label volume in canonical RAS+ voxel order plus what is needed to write it back."""

    data: Any
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    original_dtype: np.dtype
    header: Any
    ornt: np.ndarray
    path: Path | None = None
    _inverse_ornt: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ornt = np.asarray(self.ornt, dtype=np.float64)
        self._inverse_ornt = _invert_ornt(self.ornt)

    def __repr__(self) -> str:
        kind = "dask" if self.lazy else type(self.data).__name__
        codes = "".join(nib.aff2axcodes(self.original_affine))
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        return (
            f"Volume(path={str(self.path) if self.path else None!r}, shape={self.shape}, "
            f"dtype={np.dtype(self.data.dtype)}, {kind}, spacing=({spacing}) mm, file orientation={codes})"
        )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Canonical voxel sizes in mm (column norms of the canonical affine)."""
        zooms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical shape ``(X, Y, Z)`` of ``data``."""
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def lazy(self) -> bool:
        """Whether ``data`` is a dask array (read on demand)."""
        return _is_dask(self.data)

    @property
    def name(self) -> str:
        """File name without the ``.nii``/``.nii.gz`` suffix (``"volume"`` for in-memory volumes)."""
        if self.path is None:
            return "volume"
        name = self.path.name
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def _check_leading(self, arr: Any, expected: tuple[int, ...], order: str) -> None:
        """Check that the leading three axes of ``arr`` have the ``expected`` shape."""
        shape = tuple(int(s) for s in arr.shape)
        if len(shape) < 3 or shape[:3] != tuple(expected):
            raise VolumeError(
                f"array of shape {shape} does not match the {order} shape {tuple(expected)} "
                f"of {self.path or 'the volume'}: pass an array with the same leading 3 axes"
            )

    def to_original(self, arr: Any) -> Any:
        """Map an array in canonical order (extra trailing axes allowed) back to the file's voxel order."""
        self._check_leading(arr, self.shape, "canonical")
        return _apply_ornt(arr, self._inverse_ornt)

    def from_original(self, arr: Any) -> Any:
        """Map an array in the file's voxel order (extra trailing axes allowed) to canonical order."""
        self._check_leading(arr, self.original_shape, "file")
        return _apply_ornt(arr, self.ornt)

    def compute(self) -> np.ndarray:
        """Return ``data`` as a numpy array (computes a lazy volume, checking NaN/Inf)."""
        if _is_dask(self.data):
            return np.asarray(self.data.compute())
        return np.asarray(self.data)


def _read_image(path: Path, *, keep_file_open: bool) -> Any:
    """Open ``path`` with nibabel and return a NIfTI image, turning every failure into ``VolumeError``."""
    label = str(path)
    if not path.exists():
        raise VolumeError(f"{label} does not exist: check the path")
    if not path.is_file():
        raise VolumeError(f"{label} is not a file: give the path of a .nii or .nii.gz image")
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise VolumeError(f"{label} is not a NIfTI file: give a .nii or .nii.gz image")
    with _nibabel_log_held() as held:  # a refused file's error is the only line the user reads
        try:
            img = nib_load(path, keep_file_open)
        except _READ_ERRORS as exc:
            raise VolumeError(
                f"{label} cannot be read as NIfTI ({_one_line(exc)}): check it is a complete, "
                "uncorrupted .nii/.nii.gz file"
            ) from exc
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(f"{label} is a {type(img).__name__}, not a NIfTI image: convert it to .nii.gz")
        _refuse_repaired_zero_zooms(path, img)
    for record in held:  # an accepted file's header repairs are still reported
        nib.imageglobals.logger.handle(record)
    return img


def nib_load(path: Path, keep_file_open: bool) -> Any:
    """``nib.load``, also for a suffix nibabel cannot map (e.g. ``.Nii.Gz``: it looks for ``.nii.Gz``)."""
    try:
        return nib.load(str(path), keep_file_open=keep_file_open)
    except FileNotFoundError:
        if not path.is_file():
            raise
    # one file holds header and voxels: its header size tells NIfTI-1 (348 bytes) from NIfTI-2 (540)
    with nib.openers.ImageOpener(str(path)) as fh:
        head = fh.read(4)
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")} if len(head) == 4 else set()
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    holder = {"image": nib.FileHolder(str(path)), "header": nib.FileHolder(str(path))}
    return klass.from_file_map(holder, keep_file_open=keep_file_open)


@contextmanager
def _nibabel_log_held() -> Iterator[list[logging.LogRecord]]:
    """Hold the records nibabel logs from this thread (its header checks' repairs) inside the block."""
    logger = nib.imageglobals.logger
    held: list[logging.LogRecord] = []
    owner = threading.get_ident()

    def hold(record: logging.LogRecord) -> bool:
        if threading.get_ident() != owner:
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def _refuse_repaired_zero_zooms(path: Path, img: Any) -> None:
    """Raise a ``VolumeError`` for a file whose header gives a voxel size of 0 that nibabel replaced.

    Without an sform the affine comes from pixdim, and nibabel sets a pixdim of 0 to 1 while loading
    (with a log line): the scan would be predicted and written back with an invented 1 mm spacing.
    The header as stored is read again (its first bytes) only when the loaded one could be such a repair.
    """
    hdr = img.header
    n = min(3, max(0, int(hdr["dim"][0])))
    if int(hdr["sform_code"]) > 0 or not any(float(v) == 1.0 for v in hdr["pixdim"][1 : 1 + n]):
        return
    size = hdr.template_dtype.itemsize
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            raw = fh.read(size)
        stored = type(hdr)(binaryblock=raw, check=False)
    except Exception:  # unreadable here: the voxel reads report it
        return
    zooms = [float(v) for v in stored["pixdim"][1 : 1 + n]]
    if any(z == 0.0 for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise VolumeError(
            f"{path} has a voxel size of 0 in its header (pixdim {shown}, no sform): set the real voxel "
            "size before using it (nibabel: header.set_zooms)"
        )


# deflate cannot compress better than about 1032:1, so a .nii.gz declaring more is lying
_MAX_GZIP_RATIO = 1100


def _check_size_on_disk(path: Path, img: Any, nbytes: int) -> None:
    """Refuse a file early when it is shorter than the header says (or, gzipped, could not hold it)."""
    if path.name.lower().endswith(".nii.gz"):
        actual = path.stat().st_size
        if nbytes > _MAX_GZIP_RATIO * max(actual, 1) + 65536:
            raise VolumeError(
                f"{path} declares {nbytes} bytes of voxels but is only {actual} bytes compressed: "
                "the header is corrupt or the file truncated; copy or export it again"
            )
        return
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    actual = path.stat().st_size
    if actual < offset + nbytes:
        raise VolumeError(
            f"{path} is truncated ({actual} bytes, the header needs {offset + nbytes}): "
            "copy or export the file again"
        )


def has_scaling(img: Any) -> bool:
    """Whether a loaded NIfTI image's voxels are scaled (scl_slope/scl_inter), so they come back as
    float64 whatever their type on disk.

    Read from the image's data proxy: once nibabel has loaded a file, the header's own slope and
    intercept read as unset and the scaling lives on ``img.dataobj``.
    """
    proxy = img.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    return slope != 1.0 or inter != 0.0


class _CheckpointedGzipReader(io.IOBase):
    """Read-only, seekable view of a ``.gz`` file for lazy slice reads in any order.

    Python's gzip seeks backwards by decompressing again from the start of the file, which makes
    out-of-order slice reads quadratic. This reader saves the decompressor state every ``spacing``
    uncompressed bytes as it goes (about 12 MB of memory per GB of image at 4 MB spacing) and keeps
    the last ``cache`` bytes of output, so any read costs at most ``spacing`` bytes of decompression
    once the region was passed. Multi-member gzip files are supported; a truncated file raises
    ``EOFError`` when the missing part is read.

    ``sequential=True`` is for a reader that goes front to back (a prediction's stream, an eager load):
    it inflates with ISA-L (when installed: about half of zlib's CPU time) and saves no states, whose
    decompressor ISA-L cannot copy. Its first seek back behind the cache turns it into the indexed reader
    above for good, from the start of the file: still correct, at the cost of inflating that part again.
    """

    _IN_CHUNK = 1 << 15
    _OUT_CHUNK = 1 << 20

    def __init__(
        self, path: str | os.PathLike, spacing: int = 4 << 20, cache: int = 32 << 20, sequential: bool = False
    ) -> None:
        super().__init__()
        self.name = str(path)
        self._fh = open(path, "rb")  # closed by close() or the finalizer
        self._finalizer = weakref.finalize(self, self._fh.close)
        self._spacing = max(int(spacing), self._OUT_CHUNK)
        self._cache_limit = max(int(cache), 2 * self._OUT_CHUNK)
        self._lock = threading.RLock()
        self._pos = 0
        self._sequential = bool(sequential)
        self._fast = self._sequential and _isal_zlib is not None  # ISA-L, no saved states (yet)
        self._dec = self._decompressor()
        self._tail = b""  # compressed bytes read from the file but not fed to the decompressor yet
        self._started = False  # whether the current gzip member received any input
        self._done = False
        # Recent output: contiguous blocks covering [_cache_start, _end).
        self._blocks: list[bytes] = []
        self._starts: list[int] = []
        self._cache_start = 0
        self._end = 0
        # Saved states (uncompressed position, file position, decompressor, tail, started), sorted.
        self._mark_pos: list[int] = [0]
        self._marks: list[tuple[int, Any, bytes, bool]] = [(0, zlib.decompressobj(31), b"", False)]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = seek_target(self._pos, offset, whence, "a gzip stream")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = int(pos)
        return self._pos

    def close(self) -> None:
        self._finalizer()
        super().close()

    def __reduce__(self) -> tuple:
        # Pickled (e.g. for dask.distributed) as a fresh reader of the same file.
        return (type(self), (self.name, self._spacing, self._cache_limit, self._sequential))

    def _decompressor(self) -> Any:
        """A fresh decompressor for one gzip member: ISA-L's while reading front to back, else zlib's."""
        return _isal_zlib.decompressobj(31) if self._fast else zlib.decompressobj(31)

    def _decompress_next(self) -> bool:
        """Append the next block of output to the cache; False at the clean end of the file."""
        if not self._fast and self._end - self._mark_pos[-1] >= self._spacing:
            self._mark_pos.append(self._end)
            self._marks.append((self._fh.tell(), self._dec.copy(), self._tail, self._started))
        while True:
            if self._dec.eof:  # end of a gzip member: maybe another one follows
                # unused_data holds every input byte after the member's end; when the member ended in
                # a call capped by max_length, unconsumed_tail still repeats those bytes: not added
                self._tail = self._dec.unused_data
                self._dec = self._decompressor()
                self._started = False
            data = self._tail or self._fh.read(self._IN_CHUNK)
            if not data:
                if self._started:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                self._done = True
                return False
            if not self._started and not data.strip(b"\x00"):  # zero padding after the last member
                self._tail = b""
                continue
            self._started = True
            out = self._dec.decompress(data, self._OUT_CHUNK)
            self._tail = self._dec.unconsumed_tail
            if out:
                self._blocks.append(out)
                self._starts.append(self._end)
                self._end += len(out)
                while self._end - self._starts[0] > self._cache_limit and len(self._blocks) > 1:
                    self._blocks.pop(0)
                    self._starts.pop(0)
                self._cache_start = self._starts[0]
                return True

    def _restart(self, index: int) -> None:
        """Continue decompressing from saved state ``index`` (the cache is emptied)."""
        fpos, dec, tail, started = self._marks[index]
        self._fh.seek(fpos)
        self._dec, self._tail, self._started, self._done = dec.copy(), tail, started, False
        self._blocks, self._starts = [], []
        self._cache_start = self._end = self._mark_pos[index]

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            if self.closed:
                raise ValueError("read from a closed file")
            want = math.inf if size is None or size < 0 else int(size)
            parts: list[bytes] = []
            got = 0
            while got < want:
                pos = self._pos
                if self._cache_start <= pos < self._end:
                    i = bisect.bisect_right(self._starts, pos) - 1
                    block, offset = self._blocks[i], pos - self._starts[i]
                    piece = block[offset : offset + int(min(want - got, len(block) - offset))]
                    parts.append(piece)
                    got += len(piece)
                    self._pos += len(piece)
                    continue
                best = bisect.bisect_right(self._mark_pos, pos) - 1
                if pos < self._cache_start or self._mark_pos[best] > self._end:
                    self._fast = False  # read out of order: indexed from here on (best is then 0)
                    self._restart(best)
                elif self._done or not self._decompress_next():
                    break
            return b"".join(parts)


class _CanonicalSliceReader:
    """Array-like view of a NIfTI proxy in canonical order, read with dataobj slicing (for dask)."""

    def __init__(
        self,
        dataobj: Any,
        ornt: np.ndarray,
        original_shape: tuple[int, int, int],
        extra: int,
        dtype: np.dtype,
        label: str,
    ) -> None:
        self._dataobj = dataobj
        self._ornt = ornt
        self._original_shape = original_shape
        self._extra = extra  # number of trailing singleton axes in the file (squeezed away)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(original_shape[int(np.argsort(ornt[:, 0])[j])]) for j in range(3))
        self.ndim = 3
        self._label = label
        # None: NaN/Inf voxels raise; else they are returned as they are and this is told once (display)
        self._on_nonfinite: Callable[[str], None] | None = None

    def for_display(self, on_nonfinite: Callable[[str], None]) -> _CanonicalSliceReader:
        """A copy that returns NaN/Inf voxels as they are and says so once through ``on_nonfinite``:
        a viewer shows such a slice instead of failing on it. Whatever computes on the voxels (predict,
        refine) checks them itself and refuses them."""
        shown = copy.copy(self)
        told = threading.Event()

        def once(message: str) -> None:
            if not told.is_set():
                told.set()
                on_nonfinite(message)

        shown._on_nonfinite = once
        return shown

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.ascontiguousarray(self._oriented(key))

    def axial(self, start: int, stop: int) -> np.ndarray:
        """Canonical axial slices ``start:stop`` as a C-contiguous ``(n, X, Y)`` array (one copy)."""
        return np.ascontiguousarray(
            np.moveaxis(self._oriented((slice(None), slice(None), slice(start, stop))), 2, 0)
        )

    def _oriented(self, key: Any) -> np.ndarray:
        """The block ``key`` (unit-step slices in canonical order), read and reoriented (maybe a view)."""
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        orig: list[Any] = [slice(None)] * 3
        for cax, k in enumerate(key):
            if not isinstance(k, slice):
                raise TypeError("only slice keys are supported")
            start, stop, step = k.indices(self.shape[cax])
            if step != 1:
                raise TypeError("only unit-step slices are supported")
            oax = int(np.argsort(self._ornt[:, 0])[cax])
            n = self._original_shape[oax]
            if self._ornt[oax, 1] == -1:
                start, stop = n - stop, n - start
            orig[oax] = slice(start, max(start, stop))
        try:
            block = np.asarray(self._dataobj[tuple(orig) + (0,) * self._extra])
        except _READ_ERRORS as exc:
            raise VolumeError(
                f"{self._label} cannot be read ({_one_line(exc)}): check it is a complete, uncorrupted file"
            ) from exc
        if self._on_nonfinite is None:
            block = _check_finite(block, self._label, " (found while reading it lazily)")
        elif block.dtype.kind == "f" and not np.isfinite(block).all():
            self._on_nonfinite(
                str(
                    _nonfinite_error(
                        self._label,
                        " (found while reading it lazily; shown, but it cannot be predicted or refined)",
                    )
                )
            )
        return apply_orientation(block, self._ornt)


# The slice readers behind lazy volumes, by their dask array's name: ``axial_reader`` lets the predictor
# read a batch of slices in one piece, without a dask graph and its two extra copies per batch.
_AXIAL_READERS: weakref.WeakValueDictionary[str, _CanonicalSliceReader] = weakref.WeakValueDictionary()


def axial_reader(data: Any) -> _CanonicalSliceReader | None:
    """The slice reader of a lazy volume's unmodified dask array ``data`` (``None`` for anything else:
    every dask operation names its result anew)."""
    name = getattr(data, "name", None)
    return _AXIAL_READERS.get(name) if isinstance(name, str) else None


def display_data(volume: Volume, on_nonfinite: Callable[[str], None]) -> Any:
    """A lazy volume's voxels for a viewer: as ``volume.data``, but a slice with NaN/Inf voxels is shown
    (``on_nonfinite`` is told once) instead of raising inside the viewer's slicing. Other data as it is."""
    reader = axial_reader(volume.data)
    if reader is None:
        return volume.data
    import dask.array as da

    shown = reader.for_display(on_nonfinite)
    return da.from_array(
        shown,
        chunks=volume.data.chunks,
        name="apl-display-" + volume.data.name,
        meta=np.empty((0, 0, 0), dtype=shown.dtype),
        asarray=False,
        fancy=False,
    )


def file_looks_whole(volume: Volume) -> bool:
    """Whether the volume's file shows, without decompressing it, that it holds every voxel.

    An uncompressed file was already checked against the header's size when it was opened. A
    ``.nii.gz`` is taken as whole when its gzip trailer records the uncompressed size the header
    implies (a truncated file ends in arbitrary bytes); a multi-member gzip may not, and is then
    reported as not known to be whole. Used to decide whether a file may be streamed slice by slice:
    a file that is not known to be whole is read up front, so damage is reported before any work.
    """
    path = volume.path
    if path is None or not path.exists():
        return False
    if not path.name.lower().endswith(".gz"):
        return True
    try:
        proxy = nib.load(str(path)).dataobj  # the header only: where the voxels start, their type
        expected = int(proxy.offset) + math.prod(proxy.shape) * np.dtype(proxy.dtype).itemsize
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            recorded = int.from_bytes(fh.read(4), "little")
    except (OSError, ValueError, AttributeError, nib.filebasedimages.ImageFileError):
        return False
    return recorded == expected % (1 << 32)


def load_volume(path: str | os.PathLike, *, lazy: bool = False, sequential: bool = False) -> Volume:
    """Read and validate a 3-D NIfTI file and return it as a canonical (RAS+) ``Volume``.

    Every problem raises a one-line ``VolumeError`` naming the file: missing or not NIfTI, corrupt or
    truncated gzip, not 3-D (a trailing singleton 4th axis is squeezed), an empty axis, a voxel
    spacing that is zero, non-finite or outside 0.01..100 mm, a singular affine, NaN/Inf voxels, or
    more than ``NAPARI_APL_MAX_VOXEL_BYTES`` (default 4 GiB, eager only; checked from the header
    before anything is allocated). Eager loading reads the file in chunks of slices straight into a
    Fortran-ordered canonical array (each axial slice contiguous, like the file and napari's ``(Z, Y,
    X)`` layer order) and checks NaN/Inf chunk by chunk. ``lazy=True`` reads only the header
    and returns a dask array with one chunk per axial slice; the NaN/Inf check then happens when
    chunks are computed. ``.nii.gz`` slices can be read in any order (see ``_CheckpointedGzipReader``);
    ``sequential=True`` tells a lazy load its slices will be read front to back (a prediction's stream),
    which inflates a ``.nii.gz`` faster; read out of order they are still right, a little slower once.
    An eager load always reads front to back.
    """
    path = Path(path).expanduser()
    label = str(path)
    img = _read_image(path, keep_file_open=True)  # one handle: sequential gzip reads stay linear
    header = img.header
    try:
        file_shape = tuple(int(s) for s in header.get_data_shape())
        disk_dtype = np.dtype(header.get_data_dtype())
        affine = img.affine
    except _READ_ERRORS as exc:
        raise VolumeError(f"{label} has an unreadable header ({_one_line(exc)}): check the file") from exc
    shape = _spatial_shape(file_shape, label)
    extra = len(file_shape) - 3
    _check_dtype(disk_dtype, label)
    if affine is None:
        raise VolumeError(f"{label} has no affine: fix the qform/sform of the header")
    affine, header, unit = _in_millimetres(affine, header)
    affine = _check_affine(affine, label, unit)
    ornt = _orientation(affine, label)
    canonical_affine = affine @ inv_ornt_aff(ornt, shape)
    out_itemsize = 8 if has_scaling(img) else disk_dtype.itemsize
    nbytes = math.prod(shape) * disk_dtype.itemsize
    _check_size_on_disk(path, img, nbytes)

    if lazy:
        import dask.array as da
        from dask.base import tokenize

        try:
            probe = np.asarray(img.dataobj[(slice(0, 1),) * 3 + (0,) * extra])
        except _READ_ERRORS as exc:
            raise VolumeError(
                f"{label} cannot be read ({_one_line(exc)}): check it is a complete, uncorrupted file"
            ) from exc
        proxy = img.dataobj
        spec = (file_shape, disk_dtype, int(proxy.offset), float(proxy.slope), float(proxy.inter))
        if path.name.lower().endswith(".gz"):  # seekable gzip: slices may be read in any order
            dataobj = ArrayProxy(_CheckpointedGzipReader(path.absolute(), sequential=sequential), spec)
        else:  # opening an uncompressed file per read is cheap and keeps the graph picklable
            dataobj = ArrayProxy(str(path.absolute()), spec, keep_file_open=False)
        reader = _CanonicalSliceReader(dataobj, ornt, shape, extra, probe.dtype, label)
        stat = path.stat()
        name = "apl-volume-" + tokenize(str(path.absolute()), stat.st_mtime_ns, stat.st_size)
        data = da.from_array(
            reader,
            chunks=(reader.shape[0], reader.shape[1], 1),
            name=name,
            meta=np.empty((0, 0, 0), dtype=reader.dtype),
            asarray=False,
            fancy=False,
        )
        _AXIAL_READERS[name] = reader
    else:
        limit = max_voxel_bytes()
        needed = math.prod(shape) * out_itemsize
        if needed > limit:
            raise VolumeError(
                f"{label} needs {needed / 1024**3:.2f} GiB in memory, more than the limit of "
                f"{limit / 1024**3:.2f} GiB: load it lazily or raise {MAX_VOXEL_BYTES_ENV}"
            )
        dataobj, gz = img.dataobj, None
        if path.name.lower().endswith(".gz"):  # read front to back: ISA-L's inflate when installed
            spec = (file_shape, disk_dtype, int(dataobj.offset), float(dataobj.slope), float(dataobj.inter))
            gz = _CheckpointedGzipReader(path.absolute(), sequential=True)
            dataobj = ArrayProxy(gz, spec)
        try:
            data = _read_eager(dataobj, shape, extra, ornt, out_itemsize, label)
        finally:
            if gz is not None:
                gz.close()
    del img
    return Volume(
        data=data,
        affine=canonical_affine,
        original_affine=affine.copy(),
        original_shape=shape,
        original_dtype=disk_dtype,
        header=header.copy(),
        ornt=ornt,
        path=path.absolute(),
    )


def _read_eager(
    dataobj: Any, shape: tuple[int, int, int], extra: int, ornt: np.ndarray, itemsize: int, label: str
) -> np.ndarray:
    """Read the voxels in chunks of file slices straight into a Fortran-ordered canonical array.

    Fortran order is the file's own for RAS-like files, so each chunk is a plain copy, and the napari
    layer order ``(Z, Y, X)`` is then a C-contiguous view: no transposing copy on the way into napari.
    """
    per_slice = shape[0] * shape[1] * max(itemsize, 1)
    step = max(1, _READ_CHUNK_BYTES // per_slice)
    inverse = _invert_ornt(ornt)
    out: np.ndarray | None = None
    target: np.ndarray | None = None
    for z0 in range(0, shape[2], step):
        z1 = min(shape[2], z0 + step)
        try:
            block = np.asarray(dataobj[(slice(None), slice(None), slice(z0, z1)) + (0,) * extra])
        except _READ_ERRORS as exc:
            raise VolumeError(
                f"{label} cannot be read ({_one_line(exc)}): check it is a complete, uncorrupted "
                ".nii/.nii.gz file"
            ) from exc
        _check_finite(block, label)
        if out is None:
            canon_shape = tuple(shape[int(i)] for i in np.argsort(ornt[:, 0]))
            out = np.empty(canon_shape, dtype=block.dtype, order="F")
            target = apply_orientation(out, inverse)  # a view of ``out`` in file order
        target[:, :, z0:z1] = block  # type: ignore[index]
    assert out is not None
    return out


def _default_header(shape: tuple[int, ...], dtype: np.dtype, affine: np.ndarray) -> nib.Nifti1Header:
    """A fresh NIfTI-1 header with nibabel's defaults (sform 'aligned', qform 'unknown')."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    try:
        hdr.set_data_dtype(dtype)
    except HeaderDataError:
        hdr.set_data_dtype(np.float32 if np.dtype(dtype).kind == "f" else np.int32)
    hdr.set_sform(affine, code="aligned")
    hdr.set_qform(affine, code="unknown")
    hdr.set_xyzt_units("mm")
    return hdr


def volume_from_array(data: Any, affine: Any, header: Any = None) -> Volume:
    """Wrap an in-memory array in file voxel order (numpy or dask) as a canonical ``Volume``."""
    label = "the in-memory volume"
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    shape = _spatial_shape(tuple(data.shape), label)
    if data.ndim > 3:
        data = data.reshape(shape)
    _check_dtype(np.dtype(data.dtype), label)
    aff = _check_affine(affine, label)
    ornt = _orientation(aff, label)
    if _is_dask(data):
        data = data.map_blocks(_check_finite, label, " (found while computing it)", dtype=data.dtype)
    else:
        data = _check_finite(np.asarray(data), label)
    hdr = header.copy() if header is not None else _default_header(shape, np.dtype(data.dtype), aff)
    return Volume(
        data=_apply_ornt(data, ornt),
        affine=aff @ inv_ornt_aff(ornt, shape),
        original_affine=aff.copy(),
        original_shape=shape,
        original_dtype=np.dtype(data.dtype),
        header=hdr,
        ornt=ornt,
        path=None,
    )


def _output_dtype(arr: np.ndarray, dtype: Any, out: Path) -> np.dtype:
    """Choose the on-disk dtype: the requested one, else the array's (bool -> uint8, 64-bit ints shrunk)."""
    if dtype is not None:
        return np.dtype(dtype)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "b":
        return np.dtype(np.uint8)
    if kind == "f" and size < 4:
        return np.dtype(np.float32)
    if kind in "iu" and size == 8:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for cand in (np.uint8, np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
        raise OutputError(f"cannot write {out}: 64-bit integer values do not fit in int32, pass dtype")
    if kind not in "biuf":
        raise OutputError(f"cannot write {out}: voxel type {arr.dtype} is not supported, pass dtype")
    return arr.dtype


def _cast(arr: np.ndarray, dtype: np.dtype, out: Path) -> np.ndarray:
    """Cast ``arr`` to ``dtype``, refusing integer casts that would change values."""
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iu" and arr.size:
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
                raise OutputError(
                    f"cannot write {out} as {dtype}: the values are not all integers, pass a float dtype"
                )
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise OutputError(
                f"cannot write {out} as {dtype}: values {arr.min()}..{arr.max()} do not fit, pass dtype"
            )
    return arr.astype(dtype)


def derived_header(header: Any, dtype: Any) -> Any:
    """A copy of a scan's NIfTI header for new voxels on its grid: the voxel type set, and what described
    the scan's own values cleared (display range, intent such as a statistic, colour-table file, header
    extensions such as DICOM or JSON metadata)."""
    hdr = header.copy()  # (its extensions a new list: the scan's header keeps its own)
    if hasattr(hdr, "extensions"):
        hdr.extensions.clear()
    hdr.set_data_dtype(dtype)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr.set_intent("none", (), name="")
    hdr["aux_file"] = b""
    return hdr


def save_nifti(
    arr_original_order: Any,
    path: str | os.PathLike,
    reference: Volume,
    *,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Atomically write an array in the reference's file voxel order with its original affine and header."""
    out = Path(path).expanduser()
    if not out.name.lower().endswith(_NIFTI_SUFFIXES):
        raise OutputError(f"output {out} must end with .nii or .nii.gz")
    arr = arr_original_order
    if _is_torch(arr):
        arr = arr.detach().cpu().numpy()
    elif _is_dask(arr):
        arr = arr.compute()
    arr = np.asarray(arr)
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) < 3 or shape[:3] != tuple(reference.original_shape):
        raise OutputError(
            f"cannot write {out}: array shape {shape} does not match the reference's file shape "
            f"{tuple(reference.original_shape)}"
        )
    out_dtype = _output_dtype(arr, dtype, out)
    arr = _cast(arr, out_dtype, out)
    if arr.ndim == 3:
        arr = arr.reshape(written_shape(reference))  # the file's trailing axes of length 1 come back
    try:
        hdr = derived_header(reference.header, out_dtype)
    except HeaderDataError as exc:
        raise OutputError(f"cannot write {out}: NIfTI does not support voxel type {out_dtype}") from exc
    image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(arr, reference.original_affine, header=hdr)
    img.set_data_dtype(out_dtype)
    ref_codes = (int(reference.header["qform_code"]), int(reference.header["sform_code"]))
    if (int(img.header["qform_code"]), int(img.header["sform_code"])) != ref_codes and np.allclose(
        reference.header.get_best_affine(), reference.original_affine
    ):  # keep the reference's codes when the affine is the same
        img.header.set_qform(reference.header.get_qform(), code=ref_codes[0])
        img.header.set_sform(reference.header.get_sform(), code=ref_codes[1])
    inputs = (reference.path,) if reference.path is not None else ()
    if reference.path is not None and out.exists() and reference.path.exists():
        if os.path.samefile(out, reference.path):  # also catches symlinks and "..": never write the input
            raise OutputError(f"output {out} is the same file as an input: choose another output path")

    def _write(tmp: Path) -> None:
        if not out.name.lower().endswith(".gz"):
            nib.save(img, str(tmp))
            return
        from .io_utils import gzip_writer

        with open(tmp, "wb") as raw, gzip_writer(raw) as gz:
            img.to_file_map({"image": nib.FileHolder(filename=str(tmp), fileobj=gz)})

    return atomic_write(out, _write, overwrite=overwrite, inputs=inputs)


def written_shape(reference: Volume) -> tuple[int, ...]:
    """The shape a 3-D map on ``reference``'s grid is written with: the file's own, trailing axes of
    length 1 included (a ``(X, Y, Z, 1)`` scan gives ``(X, Y, Z, 1)`` outputs), else its three axes."""
    shape = tuple(int(s) for s in reference.original_shape)
    try:
        file_shape = tuple(int(s) for s in reference.header.get_data_shape())
    except (AttributeError, TypeError, ValueError):
        return shape
    if len(file_shape) > 3 and file_shape[:3] == shape and all(s == 1 for s in file_shape[3:]):
        return file_shape
    return shape


def save_canonical(arr_canonical: Any, path: str | os.PathLike, reference: Volume, **kw: Any) -> Path:
    """Write an array in canonical order: ``save_nifti(reference.to_original(arr), path, reference)``."""
    return save_nifti(reference.to_original(arr_canonical), path, reference, **kw)


# --------------------------------------------------------------------------------------------------
# In-plane slice grid
# --------------------------------------------------------------------------------------------------

_MODES = ("nearest", "bilinear")


def _pair(value: Any, name: str, *, positive_int: bool = False) -> tuple:
    """Validate a 2-sequence (or scalar, used for both axes) of positive numbers."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise VolumeError(f"{name} must be two numbers (X, Y), got {value!r}") from None
    out = []
    for v in (a, b):
        if isinstance(v, bool):
            raise VolumeError(f"{name} must be two positive numbers, got {value!r}")
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise VolumeError(f"{name} must be two positive numbers, got {value!r}") from None
        if not math.isfinite(fv) or fv <= 0:
            raise VolumeError(f"{name} must be two positive numbers, got {value!r}")
        if positive_int:
            if fv != int(fv):
                raise VolumeError(f"{name} must be two positive integers, got {value!r}")
            out.append(int(fv))
        else:
            out.append(fv)
    return tuple(out)


class GridTooLargeError(VolumeError):
    """The slices resampled to the model's spacing would exceed ``MAX_GRID_PX`` (a spacing too fine)."""

    def __init__(self, message: str, shape: tuple[int, int] = (0, 0)) -> None:  # (default: unpickling)
        super().__init__(message)
        self.shape = shape


class SliceGrid:
    """In-plane geometry between axial slices ``(X, Y)`` of a volume and the network grid ``(H', W')``.

    Forward: resample from the volume's in-plane spacing to the model spacing (``n' = round(n*s/m)``,
    at least 1), then pad centred to ``max(size, ceil(n'/stride)*stride)`` (never cropped).
    Inverse: crop the padding and resample back to ``(X, Y)``.
    """

    def __init__(
        self,
        in_shape: tuple[int, int],
        in_spacing: tuple[float, float],
        spacing: tuple[float, float],
        size: tuple[int, int],
        stride: int = 16,
    ) -> None:
        self.in_shape: tuple[int, int] = _pair(in_shape, "slice shape", positive_int=True)
        self.in_spacing: tuple[float, float] = _pair(in_spacing, "volume spacing")
        self.spacing: tuple[float, float] = _pair(spacing, "model spacing")
        self.size: tuple[int, int] = _pair(size, "model input size", positive_int=True)
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise VolumeError(f"stride must be a positive integer, got {stride!r}")
        self.stride = int(stride)
        self.resampled_shape: tuple[int, int] = tuple(  # type: ignore[assignment]
            max(1, round(n * s / m)) for n, s, m in zip(self.in_shape, self.in_spacing, self.spacing)
        )
        self.padded_shape: tuple[int, int] = tuple(  # type: ignore[assignment]
            max(sz, math.ceil(n / self.stride) * self.stride)
            for n, sz in zip(self.resampled_shape, self.size)
        )
        across = tuple(n * s for n, s in zip(self.in_shape, self.in_spacing))
        if max(across) > MAX_FIELD_MM:
            raise VolumeError(
                f"the axial slices are {across[0]:.0f} x {across[1]:.0f} mm across ({self.in_shape[0]} x "
                f"{self.in_shape[1]} voxels of {self.in_spacing[0]:g} x {self.in_spacing[1]:g} mm), wider "
                f"than any body (at most {MAX_FIELD_MM:.0f} mm): check the voxel size in the file's header "
                "(pixdim and its units)"
            )
        if max(self.padded_shape) > MAX_GRID_PX:
            h, w = self.padded_shape
            raise GridTooLargeError(
                f"the slices resampled to the model's spacing of {self.spacing[0]:g} x "
                f"{self.spacing[1]:g} mm would be {h} x {w} px (at most {MAX_GRID_PX}): this checkpoint's "
                f"spacing does not suit a scan {self.in_shape[0] * self.in_spacing[0]:.0f} mm across: "
                "use a model made for such scans",
                (h, w),
            )
        self.pad_before: tuple[int, int] = tuple(  # type: ignore[assignment]
            (p - n) // 2 for p, n in zip(self.padded_shape, self.resampled_shape)
        )
        self.pad_after: tuple[int, int] = tuple(  # type: ignore[assignment]
            p - n - b for p, n, b in zip(self.padded_shape, self.resampled_shape, self.pad_before)
        )

    @classmethod
    def for_volume(
        cls, volume: Volume, spacing: tuple[float, float], size: tuple[int, int], stride: int = 16
    ) -> SliceGrid:
        """Grid for the axial slices of a canonical ``volume``."""
        return cls(volume.shape[:2], volume.spacing[:2], spacing, size, stride)

    def __repr__(self) -> str:
        return (
            f"SliceGrid(in_shape={self.in_shape}, in_spacing={self.in_spacing}, spacing={self.spacing}, "
            f"size={self.size}, stride={self.stride}, resampled_shape={self.resampled_shape}, "
            f"padded_shape={self.padded_shape}, pad_before={self.pad_before})"
        )

    @staticmethod
    def _resample(t: Any, out_shape: tuple[int, int], mode: str) -> Any:
        """Resample the last two axes of a ``(N, C, A, B)`` tensor to ``out_shape``."""
        import torch
        import torch.nn.functional as F

        if tuple(t.shape[-2:]) == tuple(out_shape):
            return t
        if mode == "bilinear":
            if not t.is_floating_point():
                raise VolumeError(
                    f"bilinear resampling needs a float tensor, got {t.dtype}: use mode='nearest'"
                )
            return F.interpolate(t, size=out_shape, mode="bilinear", align_corners=False)
        if t.is_floating_point():
            return F.interpolate(t, size=out_shape, mode="nearest-exact")
        # Integer/bool tensors: gather with the same pixel-centre indices torch uses (exact, any dtype).
        out = t
        for axis, (n_in, n_out) in zip((-2, -1), zip(t.shape[-2:], out_shape)):
            if n_in == n_out:
                continue
            src = torch.arange(n_in, dtype=torch.float64, device=t.device).view(1, 1, n_in)
            idx = F.interpolate(src, size=n_out, mode="nearest-exact").view(n_out).long()
            out = out.index_select(axis, idx)
        return out

    def _check(self, t: Any, expected: tuple[int, int], what: str, mode: str) -> None:
        if mode not in _MODES:
            raise VolumeError(f"resampling mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if t.ndim != 4 or tuple(t.shape[-2:]) != tuple(expected):
            raise VolumeError(
                f"{what} expects a (N, C, {expected[0]}, {expected[1]}) tensor, got shape {tuple(t.shape)}"
            )

    def forward(self, t: Any, mode: str = "bilinear", pad_value: float = 0.0) -> Any:
        """Map slices ``(N, C, X, Y)`` to the padded model grid ``(N, C, H', W')`` (pads with pad_value)."""
        import torch.nn.functional as F

        self._check(t, self.in_shape, "SliceGrid.forward", mode)
        out = self._resample(t, self.resampled_shape, mode)
        (bx, by), (ax, ay) = self.pad_before, self.pad_after
        if bx or by or ax or ay:
            if out.dtype.is_floating_point:
                out = F.pad(out, (by, ay, bx, ax), mode="constant", value=float(pad_value))
            else:
                full = out.new_full((*out.shape[:2], *self.padded_shape), int(pad_value))
                full[..., bx : bx + out.shape[-2], by : by + out.shape[-1]] = out
                out = full
        return out

    def inverse(self, t: Any, mode: str = "bilinear") -> Any:
        """Map model-grid tensors ``(N, C, H', W')`` back to slices ``(N, C, X, Y)`` (crop then resample)."""
        self._check(t, self.padded_shape, "SliceGrid.inverse", mode)
        (bx, by), (rx, ry) = self.pad_before, self.resampled_shape
        out = t[..., bx : bx + rx, by : by + ry]
        return self._resample(out, self.in_shape, mode)
