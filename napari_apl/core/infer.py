"""Streaming prediction of a whole volume with a dual-head model, slice batch by slice batch.

Everything the maps need is computed on the model grid (``SliceGrid``: a few hundred pixels a side),
where it is cheap, and only then taken to the voxel grid:

* ``main``, ``aux`` and ``pseudo_label`` are the argmax of the bilinearly resampled class probabilities
  of the main head, the auxiliary head and their mean (the merged prediction). Where the four model-grid
  pixels around a voxel agree on the label, the argmax of any convex combination of them is that label,
  so it is copied; only voxels near a label boundary are interpolated class by class.
* ``confidence`` (ω, Eq. 3: top-1 minus top-2 of the merged prediction) and ``consistency`` (the heads'
  disagreement ``1 - <p_m, p_a>``) are computed on the model grid and resampled bilinearly.

Labels are uint8 and the maps float16, and the arrays are Fortran-ordered ``(X, Y, Z)`` (each axial
slice contiguous, which is also napari's ``(Z, Y, X)`` layer order and NIfTI's on-disk order), so a
512 x 512 x 300 CT never holds a float probability volume. ``SlicePredictor`` predicts single slices
on demand into the same store (for a viewer that shows the current slice at once) and can fill the rest
in the background; ``iter_predict`` is that fill driven slice batch by slice batch.
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import pseudo
from .checkpoint import CheckpointMeta
from .errors import APLError, VolumeError
from .memory import zeros_plain_pages
from .models import DualHeadNet
from .models.fold import FoldedNet
from .preprocess import FittedNormalization, Normalization, constant_volume_error
from .utils import resolve_device, run_generator
from .volume import SliceGrid, Volume, axial_reader, derived_header, written_shape

__all__ = [
    "FRACTION_MAPS",
    "FRACTION_SLOPE",
    "MAP_DTYPES",
    "MAP_NAMES",
    "Prediction",
    "PredictionWriter",
    "PreparedVolume",
    "SlicePredictor",
    "encode_map",
    "heads_probabilities",
    "iter_predict",
    "predict_volume",
    "prepare",
    "write_map",
    "write_maps",
]

MAP_NAMES = ("main", "aux", "pseudo_label", "confidence", "consistency")
MAP_DTYPES = {
    "main": np.dtype(np.uint8),
    "aux": np.dtype(np.uint8),
    "pseudo_label": np.dtype(np.uint8),
    "confidence": np.dtype(np.float16),
    "consistency": np.dtype(np.float16),
}
_FIELDS = {
    "main": "main",
    "aux": "aux",
    "pseudo_label": "pseudo",
    "confidence": "confidence",
    "consistency": "consistency",
}
# Whether SlicePredictor runs a copy of the model with its batch norms folded (off: the model itself).
FOLD_BN = True
# Above this fraction of boundary voxels a batch is resampled densely (same arithmetic, same result).
_DENSE_FRACTION = 0.25

# The most slices one read of a layer array predicts: napari's 2-D view reads the slice it shows. A
# larger read (the 3-D view's whole volume, or a thick-slice projection) shows what is done so far, and
# the rest when the worker's maps replace the lazy arrays (``as_layer_arrays``): on a heavy model even a
# few slices predicted on napari's event loop would freeze the viewer for seconds.
LAYER_READ_SLICES = 1


@dataclass
class Prediction:
    """Per-voxel outputs of both heads on the volume's canonical grid ``(X, Y, Z)``."""

    main: np.ndarray
    aux: np.ndarray
    pseudo: np.ndarray
    confidence: np.ndarray
    consistency: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """Return the five maps by their output names."""
        return {
            "main": self.main,
            "aux": self.aux,
            "pseudo_label": self.pseudo,
            "confidence": self.confidence,
            "consistency": self.consistency,
        }

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> Prediction:
        """Zero-filled maps of canonical ``shape`` (Fortran order: each axial slice contiguous)."""
        arrays = {_FIELDS[n]: zeros_plain_pages(shape, MAP_DTYPES[n], order="F") for n in MAP_NAMES}
        return cls(**arrays)


@dataclass
class PreparedVolume:
    """A volume's axial slices normalised and resampled onto the model grid, ready for the network.

    ``check_range``: the normalisation was fitted without reading the volume (a lazy volume under a
    fixed CT window), so the voxel range is gathered from the slices as they are prepared and
    ``check_not_constant`` refuses a constant volume once all of them were seen.
    """

    volume: Volume
    grid: SliceGrid
    fitted: FittedNormalization
    check_range: bool = False
    _range: tuple[float, float] | None = field(default=None, init=False, repr=False)
    _range_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _lut: tuple[np.dtype, np.ndarray] | None = field(default=None, init=False, repr=False)

    def _see(self, arr: np.ndarray) -> None:
        """Widen the running voxel range with the raw slices ``arr`` (batches may come from two threads)."""
        if not arr.size:
            return
        lo, hi = float(arr.min()), float(arr.max())
        with self._range_lock:
            old = self._range
            self._range = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def check_not_constant(self) -> None:
        """Raise ``VolumeError`` when every voxel seen so far has the same value (deferred fit check)."""
        seen = self._range
        if self.check_range and seen is not None and seen[1] <= seen[0]:
            raise constant_volume_error(seen[0], self.fitted.kind)

    def raw(self, indices: Sequence[int]) -> np.ndarray:
        """Return the voxels of slices ``indices`` as an ``(n, X, Y)`` array (dask slices computed)."""
        idx = [int(i) for i in indices]
        data = self.volume.data
        contiguous = bool(idx) and idx == list(range(idx[0], idx[-1] + 1))
        reader = axial_reader(data) if contiguous else None
        if reader is not None:  # a lazy file's slices, read in one piece
            return reader.axial(idx[0], idx[-1] + 1)
        if contiguous:
            raw = data[:, :, idx[0] : idx[-1] + 1]
        else:
            raw = data[:, :, idx]
        if not isinstance(raw, np.ndarray):  # dask: compute just these slices, here (never on a cluster)
            raw = raw.compute(scheduler="synchronous") if hasattr(raw, "compute") else np.asarray(raw)
        return np.ascontiguousarray(np.moveaxis(np.asarray(raw), 2, 0))

    def _normalise(self, arr: np.ndarray) -> np.ndarray:
        """Normalised float32 voxels; 8/16-bit integers through a lookup table of the same function."""
        if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size > 1 << 16:
            bits = np.dtype(f"u{arr.dtype.itemsize}")  # the table is indexed by the voxels' bit patterns
            lut = self._lut
            if lut is None or lut[0] != arr.dtype:
                values = np.arange(1 << (8 * bits.itemsize), dtype=bits).view(arr.dtype)
                lut = (arr.dtype, np.asarray(self.fitted(values), dtype=np.float32))
                self._lut = lut
            return np.take(lut[1], arr.view(bits))
        out = self.fitted(arr).astype(np.float32, copy=False)
        if not np.isfinite(out).all():  # e.g. float64 voxels beyond float32's range
            raise VolumeError(
                f"normalised voxels do not fit 32-bit floats (raw values from {float(arr.min()):.3g} to "
                f"{float(arr.max()):.3g}): rescale the volume to a physical range (HU for CT) first"
            )
        return out

    def batch(self, indices: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """Return slices ``indices`` as a float32 tensor ``(n, 1, H, W)`` on the model grid."""
        idx = list(indices)
        arr = self.raw(idx)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise VolumeError(f"slices {idx[0]}..{idx[-1]} contain NaN or Inf voxels: clean the volume first")
        if self.check_range:
            self._see(arr)
        norm = self._normalise(arr)
        t = torch.from_numpy(norm).unsqueeze(1)
        # the volume's padding value, not this batch's darkest: a slice's prediction must not depend on
        # the slices it is batched with (the batch size, or the slice shown first in the viewer)
        out = self.grid.forward(t, mode="bilinear", pad_value=self.fitted.pad)
        return out.to(device) if device is not None else out


def prepare(
    volume: Volume, meta: CheckpointMeta, model: DualHeadNet, normalization: Normalization | None = None
) -> PreparedVolume:
    """Fit the intensity normalisation and the in-plane geometry of ``volume`` for ``model``.

    A lazy (dask) volume under a fixed CT window is not read here: the window needs no statistics,
    and its constant-volume check happens as the slices stream through (``PreparedVolume.check_range``).
    """
    norm = normalization if normalization is not None else Normalization.from_dict(meta.normalization)
    defer = norm.kind == "ct_window" and not isinstance(volume.data, np.ndarray)
    fitted = norm.fit(None if defer else volume.data)
    grid = SliceGrid.for_volume(
        volume, spacing=tuple(meta.spacing), size=tuple(meta.input_size), stride=model.stride
    )
    return PreparedVolume(volume=volume, grid=grid, fitted=fitted, check_range=defer)


def _amp_dtype(amp: bool | str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (False: off; True/"bf16": bfloat16; "fp16": float16).

    ``None`` is float16 on CUDA and off elsewhere: for inference float16's finer mantissa keeps the
    maps closer to float32 than bfloat16 does, at the same speed (benchmarks/results/gpu_check.md), and
    a batch whose float16 logits overflow is recomputed in float32 (``SlicePredictor._logits``).
    """
    if amp is None:
        return torch.float16 if device.type == "cuda" else None
    if amp is False or amp == "off":
        return None
    if amp is True or amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half"):
        return torch.float16
    from .errors import APLError

    raise APLError(f"unknown mixed-precision mode {amp!r}: use off, bf16 or fp16")


def _forward(model: DualHeadNet, x: torch.Tensor, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """Both heads' logits as float32 (autocast when ``amp_dtype``; channels-last input on CUDA)."""
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        device_type=x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
    ):
        main, aux = model(x)
    return main.float(), aux.float()


def heads_probabilities(
    model: DualHeadNet, x: torch.Tensor, grid: SliceGrid | None = None, amp: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both heads on a model-grid batch; return their softmax probabilities (mapped back by ``grid``)."""
    main, aux = _forward(model, x, _amp_dtype(amp, x.device))
    if grid is not None:
        main = grid.inverse(main, mode="bilinear")
        aux = grid.inverse(aux, mode="bilinear")
    return torch.softmax(main, dim=1), torch.softmax(aux, dim=1)


# --- model grid -> voxel grid ---------------------------------------------------------------------
# Done in numpy on the CPU: a few dozen single-threaded passes over model-grid arrays cost far less
# than as many small multi-threaded torch operations on a busy two-core machine.


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of a float32 array (a new C-contiguous array)."""
    out = logits - logits.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def _first_argmax(prob: np.ndarray, top: np.ndarray | None = None) -> np.ndarray:
    """Index of the first maximum over axis 1 as uint8 (``np.argmax`` semantics, one pass per class)."""
    top = prob.max(axis=1) if top is None else top
    label = np.zeros(top.shape, dtype=np.uint8)
    for c in range(prob.shape[1] - 1, 0, -1):
        label[prob[:, c] == top] = c
    label[prob[:, 0] == top] = 0
    return label


def _confidence(prob: np.ndarray, label: np.ndarray, top: np.ndarray) -> np.ndarray:
    """ω = top-1 minus top-2 probability over axis 1 (Eq. 3)."""
    classes = np.arange(prob.shape[1], dtype=np.uint8).reshape(1, -1, *([1] * (prob.ndim - 2)))
    second = np.where(classes == label[:, None], -np.inf, prob).max(axis=1)
    return np.abs(top - second).astype(np.float32, copy=False)


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resampling ``n_in -> n_out`` (``align_corners=False``)."""
    scale = np.float32(n_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w1[i0 == i1] = 0.0
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


class _ToVoxels:
    """Maps model-grid outputs of one ``SliceGrid`` to voxel-grid slices stored as ``(n, Y, X)``."""

    def __init__(self, grid: SliceGrid) -> None:
        (self.bx, self.by), (self.rx, self.ry) = grid.pad_before, grid.resampled_shape
        self.X, self.Y = grid.in_shape
        self.xi0, self.xi1, self.xw0, self.xw1 = _axis_weights(self.rx, self.X)
        self.yi0, self.yi1, self.yw0, self.yw1 = _axis_weights(self.ry, self.Y)

    def crop(self, t: np.ndarray) -> np.ndarray:
        """Drop the padding of model-grid arrays ``(n, C, H', W')`` -> ``(n, C, rx, ry)`` (a view)."""
        return t[..., self.bx : self.bx + self.rx, self.by : self.by + self.ry]

    def maps(self, low: np.ndarray) -> np.ndarray:
        """Bilinearly resample float maps ``(n, k, rx, ry)`` to float16 ``(n, k, Y, X)``."""
        t = torch.from_numpy(np.ascontiguousarray(low.transpose(0, 1, 3, 2)))
        if (self.ry, self.rx) != (self.Y, self.X):
            t = F.interpolate(t, size=(self.Y, self.X), mode="bilinear", align_corners=False)
        return t.to(torch.float16).numpy()

    def nearest(self, low: np.ndarray) -> np.ndarray:
        """Each voxel's value at its model-grid cell (the corner ``i0, j0``): (n, rx, ry) -> (n, Y, X)."""
        rows = np.take(np.ascontiguousarray(low.transpose(0, 2, 1)), self.xi0, axis=2)  # (n, ry, X)
        return np.take(rows, self.yi0, axis=1)  # whole rows copied

    def labels(self, probs: Sequence[np.ndarray], lows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Argmax of the bilinearly resampled probabilities ``(n, C, rx, ry)`` as uint8 ``(n, Y, X)``.

        ``lows`` are their model-grid labels. A voxel whose four model-grid neighbours share every
        label takes it (a convex combination keeps the argmax); the others are interpolated, every
        map's classes at once from one table of the cells they need (densely when they are many).
        """
        n, C = probs[0].shape[:2]
        code = np.zeros(lows[0].shape, dtype=np.int32)
        for k, low in enumerate(lows):
            code |= low.astype(np.int32) << (8 * k)
        pad = np.pad(code, ((0, 0), (0, 1), (0, 1)), mode="edge")
        corner = pad[:, :-1, :-1]
        mixed = (corner != pad[:, 1:, :-1]) | (corner != pad[:, :-1, 1:]) | (corner != pad[:, 1:, 1:])
        out = [self.nearest(low).reshape(n, -1) for low in lows]
        edge = self.nearest(mixed).reshape(n, -1)
        boundary = np.flatnonzero(edge)
        if boundary.size > _DENSE_FRACTION * edge.size:
            for k, p in enumerate(probs):
                out[k] = np.where(edge, self._dense(p).reshape(n, -1), out[k])
        elif boundary.size:
            img, pix = np.divmod(boundary, self.Y * self.X)
            y, x = np.divmod(pix, self.X)
            i0, i1, j0, j1 = self.xi0[x], self.xi1[x], self.yi0[y], self.yi1[y]
            xw0, xw1 = self.xw0[x, None], self.xw1[x, None]
            yw0, yw1 = self.yw0[y, None], self.yw1[y, None]
            base = img * (self.rx * self.ry)
            r0, r1 = base + i0 * self.ry, base + i1 * self.ry
            # the cells those voxels read: each mixed cell and its +1 neighbours (at the last row or
            # column the neighbour is the cell itself: i1 = i0)
            need = np.zeros((n, self.rx + 1, self.ry + 1), dtype=bool)
            for di in (0, 1):
                for dj in (0, 1):
                    need[:, di : self.rx + di, dj : self.ry + dj] |= mixed
            cells = np.flatnonzero(need[:, : self.rx, : self.ry])
            slot = np.empty(n * self.rx * self.ry, dtype=np.int64)
            slot[cells] = np.arange(cells.size)
            cimg, cpix = np.divmod(cells, self.rx * self.ry)
            table = np.concatenate([p.reshape(n, C, -1)[cimg, :, cpix] for p in probs], axis=1)  # (m, K*C)

            def at(r: np.ndarray, j: np.ndarray) -> np.ndarray:
                return np.take(table, slot[r + j], axis=0)

            a0 = yw0 * at(r0, j0) + yw1 * at(r0, j1)  # along Y on row i0, then row i1
            a1 = yw0 * at(r1, j0) + yw1 * at(r1, j1)
            val = (xw0 * a0 + xw1 * a1).reshape(-1, len(probs), C)
            best = np.argmax(val, axis=2).astype(np.uint8)
            for k, o in enumerate(out):
                o.reshape(-1)[boundary] = best[:, k]
        return [o.reshape(n, self.Y, self.X) for o in out]

    def _dense(self, p: np.ndarray) -> np.ndarray:
        """Separable bilinear resampling of every class then argmax, as ``(n, Y, X)`` (same arithmetic)."""
        rows = self.yw0 * p[..., self.yi0] + self.yw1 * p[..., self.yi1]  # (n, C, rx, Y)
        full = self.xw0[:, None] * rows[:, :, self.xi0] + self.xw1[:, None] * rows[:, :, self.xi1]
        return np.ascontiguousarray(_first_argmax(full).transpose(0, 2, 1))


def _postprocess(tv: _ToVoxels, main: np.ndarray, aux: np.ndarray) -> dict[str, np.ndarray]:
    """The five voxel-grid maps ``(n, Y, X)`` of a batch from both heads' model-grid logits."""
    p_m = _softmax(np.ascontiguousarray(tv.crop(main)))  # (contiguous: half the softmax's time)
    p_a = _softmax(np.ascontiguousarray(tv.crop(aux)))
    merged = p_m + p_a
    merged *= np.float32(0.5)
    top_m, top_a, top_p = p_m.max(axis=1), p_a.max(axis=1), merged.max(axis=1)
    lows = [_first_argmax(p_m, top_m), _first_argmax(p_a, top_a), _first_argmax(merged, top_p)]
    omega = _confidence(merged, lows[2], top_p)
    disagree = np.clip(np.float32(1.0) - np.einsum("nc...,nc...->n...", p_m, p_a), 0.0, 1.0)
    maps = tv.maps(np.stack([omega, disagree.astype(np.float32, copy=False)], axis=1))
    lab_m, lab_a, lab_p = tv.labels([p_m, p_a, merged], lows)
    return {
        "main": lab_m,
        "aux": lab_a,
        "pseudo_label": lab_p,
        "confidence": maps[:, 0],
        "consistency": maps[:, 1],
    }


def _postprocess_torch(tv: _ToVoxels, main: torch.Tensor, aux: torch.Tensor) -> dict[str, np.ndarray]:
    """``_postprocess`` with torch on the logits' device (the CUDA path); the five maps come back to numpy.

    The same quantities: softmax of each head, their mean, ω (top-1 minus top-2 of the mean) and the
    disagreement on the model grid, bilinearly resampled; the labels are the argmax of the resampled
    probabilities, computed densely (on a GPU that is cheaper than finding the boundary voxels).
    """
    size = (tv.Y, tv.X)

    def crop(t: torch.Tensor) -> torch.Tensor:
        return t[..., tv.bx : tv.bx + tv.rx, tv.by : tv.by + tv.ry].float()

    def to_voxels(t: torch.Tensor) -> torch.Tensor:  # (n, k, rx, ry) -> (n, k, Y, X)
        t = t.transpose(2, 3)
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return t

    p_m = torch.softmax(crop(main), dim=1)
    p_a = torch.softmax(crop(aux), dim=1)
    merged = pseudo.merge(p_m, p_a)
    omega, disagree = pseudo.confidence(merged), pseudo.consistency_map(p_m, p_a)
    maps = to_voxels(torch.stack([omega, disagree], dim=1)).to(torch.float16).cpu().numpy()
    labels = [to_voxels(p).argmax(dim=1).to(torch.uint8).cpu().numpy() for p in (p_m, p_a, merged)]
    return {
        "main": labels[0],
        "aux": labels[1],
        "pseudo_label": labels[2],
        "confidence": maps[:, 0],
        "consistency": maps[:, 1],
    }


# --- on-demand and streaming prediction ---------------------------------------------------------------


class SlicePredictor:
    """Predicts axial slices of one volume on demand into a shared ``Prediction`` store (thread-safe).

    ``predict_slice(k)`` returns the five 2-D maps of slice ``k`` (computed once, then read from the
    store); ``run()`` fills every slice not computed yet, batch by batch, yielding progress, and returns
    the complete ``Prediction``. Both may run at the same time in different threads (e.g. a viewer
    asking for the visible slice while the whole volume completes in a worker). ``as_dask()`` gives
    dask arrays whose chunks (one per slice) call ``predict_slice``, for layers that show at once.
    """

    def __init__(
        self,
        model: DualHeadNet,
        meta: CheckpointMeta,
        volume: Volume,
        *,
        normalization: Normalization | None = None,
        device: str | torch.device = "auto",
        amp: bool | str | None = None,
        prepared: PreparedVolume | None = None,
        batch_size: int = 8,
        keep: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.amp_dtype = _amp_dtype(amp, self.device)
        self.model = model
        self.meta = meta
        self.volume = volume
        self.batch_size = max(1, int(batch_size))
        self.prepared = prepared if prepared is not None else prepare(volume, meta, model, normalization)
        self.shape = tuple(int(s) for s in volume.data.shape[:3])
        # keep=False: no store; each batch's maps go only to run()'s on_batch (a writer streaming them to
        # disk), and the store's pages (550 MB for a 512 x 512 x 300 CT) are never written: their first
        # touch alone cost about 0.35 s of CPU per predict of that CT (benchmarks/inference_overhead.py)
        self.keep = bool(keep)
        self.prediction: Prediction | None = Prediction.empty(self.shape) if keep else None  # type: ignore[arg-type]
        self._done = np.zeros(self.shape[2], dtype=bool)
        self._busy: set[int] = set()
        self._cond = threading.Condition()
        self._to_voxels: _ToVoxels | None = None
        self._uid = uuid.uuid4().hex[:12]
        model.eval()
        model.to(self.device)
        # channels-last weights (in place, like the move to the device; checkpoints are saved contiguous):
        # oneDNN and cuDNN run this model's convolutions faster so (a batch of 8 slices of the demo
        # model on 2 CPU threads: 150 -> 100 ms; benchmarks/results/flops.md)
        model.to(memory_format=torch.channels_last)
        # The forwards run on a copy with its batch norms folded into its convolutions (models.fold):
        # the same function to float rounding, one pass over the activations fewer per batch norm (on
        # 2 CPU threads the demo model's forward in 0.89x the time, deeplabv2's in 0.95x). The copy
        # holds the weights the model had when the predictor was made: every slice comes from them.
        self.net: nn.Module = model
        if FOLD_BN and isinstance(model, DualHeadNet):
            self.net = FoldedNet(model).to(memory_format=torch.channels_last)

    @property
    def total(self) -> int:
        """Number of axial slices."""
        return self.shape[2]

    @property
    def done(self) -> np.ndarray:
        """Which slices are predicted (a copy)."""
        with self._cond:
            return self._done.copy()

    def _logits(self, x: torch.Tensor) -> tuple[Any, Any]:
        """Both heads' model-grid logits of a prepared batch: float32 numpy arrays on the CPU, and
        tensors left on the device elsewhere (the maps are made there, ``_postprocess_torch``)."""
        with torch.inference_mode():
            x = x.to(self.device)
            main, aux = _forward(self.net, x, self.amp_dtype)
            if self.amp_dtype == torch.float16 and not (main.isfinite().all() and aux.isfinite().all()):
                main, aux = _forward(self.net, x, None)  # float16 overflowed: this batch in float32
            if not (bool(main.isfinite().all()) and bool(aux.isfinite().all())):
                raise APLError(
                    "the model's output is NaN or infinite on this volume (its weights or the normalised "
                    "voxels overflow): check the checkpoint and the intensity preset"
                )
        if self.device.type == "cpu":  # (channels-last weights give channels-last logits)
            return main.contiguous().numpy(), aux.contiguous().numpy()
        return main, aux

    def _store(
        self,
        idx: list[int],
        main: Any,
        aux: Any,
        sink: Callable[[list[int], dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        """Map a batch's logits to the voxel grid and write its five maps into the store (and give them
        to ``sink`` as ``(n, Y, X)`` arrays)."""
        if self._to_voxels is None:
            self._to_voxels = _ToVoxels(self.prepared.grid)
        if isinstance(main, torch.Tensor):
            with torch.inference_mode():
                arrays = _postprocess_torch(self._to_voxels, main, aux)
        else:
            arrays = _postprocess(self._to_voxels, main, aux)
        if sink is not None:
            sink(idx, arrays)
        if self.prediction is None:
            return
        pos = np.asarray(idx)
        contiguous = len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1))
        for name, arr in arrays.items():
            store = getattr(self.prediction, _FIELDS[name]).T  # (Z, Y, X) C-contiguous view
            if contiguous:
                store[idx[0] : idx[-1] + 1] = arr
            else:
                store[pos] = arr

    def _compute(self, idx: list[int]) -> None:
        """Predict slices ``idx`` (one batch) and store them."""
        self._store(idx, *self._logits(self.prepared.batch(idx)))

    def _claim(self, candidates: Sequence[int]) -> list[int]:
        """Mark the candidates that are neither done nor being computed as busy; return them."""
        with self._cond:
            mine = [int(k) for k in candidates if not self._done[k] and int(k) not in self._busy]
            self._busy.update(mine)
        return mine

    def _release(self, idx: Sequence[int], done: bool) -> None:
        """Un-mark slices as busy (and mark them done); wake waiting threads."""
        with self._cond:
            if done:
                self._done[list(idx)] = True
            self._busy.difference_update(idx)
            self._cond.notify_all()

    def predict_slices(self, indices: Sequence[int]) -> None:
        """Make sure slices ``indices`` are predicted (missing ones in batches; waits for busy ones)."""
        wanted = list(dict.fromkeys(int(k) for k in indices))
        if wanted and not self.keep:
            raise RuntimeError(
                "this predictor keeps no maps (keep=False): only run() predicts, for its on_batch"
            )
        for k in wanted:
            if not 0 <= k < self.total:
                raise IndexError(f"slice {k} is outside 0..{self.total - 1}")
        while True:
            with self._cond:
                missing = [k for k in wanted if not self._done[k]]
                if not missing:
                    return
                todo = [k for k in missing if k not in self._busy]
                if not todo:  # another thread is computing them
                    self._cond.wait(0.05)
                    continue
                self._busy.update(todo)
            try:
                for s in range(0, len(todo), self.batch_size):
                    chunk = todo[s : s + self.batch_size]
                    self._compute(chunk)
                    with self._cond:
                        self._done[chunk] = True
                        self._busy.difference_update(chunk)
                        self._cond.notify_all()
            finally:
                with self._cond:
                    self._busy.difference_update(todo)
                    self._cond.notify_all()

    def predict_slice(self, k: int) -> dict[str, np.ndarray]:
        """Return the five ``(X, Y)`` maps of slice ``k`` (views of the store), predicting it if needed."""
        self.predict_slices([k])
        pred = self.prediction
        return {name: getattr(pred, _FIELDS[name])[:, :, k] for name in MAP_NAMES}

    def run(
        self,
        batch_size: int | None = None,
        order: Sequence[int] | None = None,
        on_slices: Callable[[list[int]], None] | None = None,
        on_batch: Callable[[list[int], dict[str, np.ndarray]], None] | None = None,
    ) -> Generator[tuple[int, int], None, Prediction | None]:
        """Predict the slices (all, or ``order``) not done yet, yielding ``(done, total)``; return them
        (``None`` for a predictor that keeps no maps).

        A helper thread reads and prepares the next batch and maps the previous one to the voxel grid
        while the model runs on the current one (numpy and zlib release the GIL), so that on a CPU
        the forward is nearly all the work left on the critical path. ``on_slices`` (called in the
        helper thread) receives, in ``order``, each run of slices as soon as all before it are done;
        ``on_batch`` (also there) each batch's slices and their five maps ``(n, Y, X)``, batch by batch in
        ``order``.
        """
        from concurrent.futures import ThreadPoolExecutor

        bs = max(1, int(batch_size or self.batch_size))
        wanted = [int(k) for k in (range(self.total) if order is None else order)]
        total = len(wanted)
        index = np.asarray(wanted, dtype=np.int64)
        yield int(self._done[index].sum()) if total else 0, total
        todo = [k for k in wanted if not self._done[k]]
        plan = [todo[s : s + bs] for s in range(0, len(todo), bs)]
        claimed: list[list[int]] = []
        pending = None  # the previous batch's mapping to the voxel grid
        emitted = [0]  # how many slices of ``wanted`` went to ``on_slices``

        def emit() -> None:
            if on_slices is None:
                return
            start = stop = emitted[0]
            with self._cond:
                while stop < total and self._done[wanted[stop]]:
                    stop += 1
            if stop > start:
                emitted[0] = stop
                on_slices(wanted[start:stop])

        helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-apl-predict")

        def claim_next() -> tuple[list[int], Any] | None:
            while plan:
                chunk = self._claim(plan.pop(0))
                if chunk:
                    claimed.append(chunk)
                    return chunk, helper.submit(self.prepared.batch, chunk)
            return None

        def store(chunk: list[int], main: Any, aux: Any) -> None:
            self._store(chunk, main, aux, on_batch)
            self._release(chunk, done=True)
            claimed.remove(chunk)
            emit()

        try:
            current = claim_next()
            while current is not None:
                chunk, prepared = current
                x = prepared.result()
                current = claim_next()  # read the next batch during this forward
                logits = self._logits(x)
                if pending is not None:
                    pending.result()
                    yield int(self._done[index].sum()), total
                pending = helper.submit(store, chunk, *logits)
            if pending is not None:
                pending.result()
                pending = None
            self.predict_slices([k for k in wanted if not self._done[k]])  # any left to other threads
            if self._done.all():
                self.prepared.check_not_constant()
            emit()
            yield int(self._done[index].sum()), total
        finally:
            helper.shutdown(wait=True, cancel_futures=True)
            for chunk in claimed:
                self._release(chunk, done=False)
        return self.prediction

    def as_layer_arrays(self, predict_at_most: int | None = LAYER_READ_SLICES) -> dict[str, Any]:
        """Lazy array-likes of the five maps in napari's layer order ``(Z, Y, X)`` (no dask involved).

        Indexing one computes only the slices it covers, so layers made from them show the visible
        slice at once. A read covering more than ``predict_at_most`` slices (napari's 3-D view reads
        the whole volume, on its event loop) predicts none: it returns the slices done so far and zeros
        for the others (``None``: every read predicts what it covers).
        """
        return {name: _LazyMap(self, name, "zyx", predict_at_most) for name in MAP_NAMES}

    def as_dask(self) -> dict[str, Any]:
        """Dask arrays ``(X, Y, Z)`` of the five maps; computing a chunk (one slice) predicts it on demand."""
        import dask.array as da

        out = {}
        for name in MAP_NAMES:
            view = _LazyMap(self, name)
            out[name] = da.from_array(
                view,
                chunks=(self.shape[0], self.shape[1], 1),
                name=f"apl-{name}-{self._uid}",
                meta=np.empty((0, 0, 0), dtype=MAP_DTYPES[name]),
                asarray=False,
                fancy=False,
                lock=False,
            )
        return out


class _LazyMap:
    """Array-like view of one map of a ``SlicePredictor``; reading predicts the slices it covers.

    ``order="xyz"``: canonical ``(X, Y, Z)``; ``order="zyx"``: napari's layer order ``(Z, Y, X)``.
    """

    def __init__(
        self, predictor: SlicePredictor, name: str, order: str = "xyz", predict_at_most: int | None = None
    ) -> None:
        self.predictor = predictor
        self.name = name
        self.order = order
        self.predict_at_most = predict_at_most  # (see SlicePredictor.as_layer_arrays)
        x, y, z = predictor.shape
        self.shape = (x, y, z) if order == "xyz" else (z, y, x)
        self.dtype = MAP_DTYPES[name]
        self.ndim = 3
        self.size = x * y * z

    def __len__(self) -> int:
        return self.shape[0]

    def slices_done(self) -> int:
        """How many of the volume's slices are predicted so far (``len(self)`` once complete)."""
        return int(self.predictor.done.sum())

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _three_axis_key(key)
        zkey = key[2] if self.order == "xyz" else key[0]
        zs = np.atleast_1d(np.arange(self.predictor.total)[zkey])
        if self.predict_at_most is None or zs.size <= self.predict_at_most:
            self.predictor.predict_slices(zs.tolist())
        store = getattr(self.predictor.prediction, _FIELDS[self.name])
        return np.array((store if self.order == "xyz" else store.T)[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)


def _three_axis_key(key: Any) -> tuple:
    """A basic index of a 3-D array, one entry per axis (``...`` expanded as numpy reads it)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in key):
        raise IndexError("a prediction map takes no new axes (None) in its index")
    ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        i = ellipses[0]
        key = key[:i] + (slice(None),) * (3 - (len(key) - 1)) + key[i + 1 :]
    if len(key) > 3:
        raise IndexError(f"too many indices for a 3-D prediction map: {len(key)}")
    return key + (slice(None),) * (3 - len(key))


def iter_predict(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    *,
    normalization: Normalization | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    slices: Sequence[int] | None = None,
    amp: bool | str | None = None,
    prepared: PreparedVolume | None = None,
    predictor: SlicePredictor | None = None,
    on_slices: Callable[[list[int]], None] | None = None,
    on_batch: Callable[[list[int], dict[str, np.ndarray]], None] | None = None,
) -> Generator[tuple[int, int], None, Prediction | None]:
    """Predict every axial slice (or only ``slices``) of ``volume``, yielding ``(done, total)`` as it goes.

    Labels come back as uint8 and the maps as float16, on the canonical voxel grid, so a
    512 x 512 x 300 CT never holds a float probability volume for either head. ``amp`` is the
    mixed precision (``None``: fp16 on CUDA, off elsewhere; ``"fp16"``/``"bf16"``/``True``/``False``).
    Pass a ``predictor`` to complete one that already answered on-demand slice requests, and
    ``on_slices`` to hear of finished slices in order (e.g. ``PredictionWriter.feed``), ``on_batch`` to
    receive each batch's maps (e.g. ``PredictionWriter.feed_batch``, with a predictor made with
    ``keep=False``, which returns ``None``).
    """
    was_training = model.training
    model.eval()
    try:
        sp = predictor or SlicePredictor(
            model,
            meta,
            volume,
            normalization=normalization,
            device=device,
            amp=amp,
            prepared=prepared,
            batch_size=batch_size,
        )
        return (yield from sp.run(batch_size, slices, on_slices, on_batch))
    finally:
        model.train(was_training)


def predict_volume(model: DualHeadNet, meta: CheckpointMeta, volume: Volume, **kwargs: Any) -> Prediction:
    """Predict a whole volume at once (``iter_predict`` driven to its end)."""
    return run_generator(iter_predict(model, meta, volume, **kwargs))


# --- NIfTI output -----------------------------------------------------------------------------------------

# On disk every map is uint8: the labels as they are, and the two maps in [0, 1] (ω and the heads'
# disagreement) quantised to 1/255 steps with the NIfTI scaling ``scl_slope = 1/255`` (readers such as
# nibabel, ITK-SNAP and 3D Slicer apply it and see floats; the quantisation error is at most 1/510).
# A quarter of the bytes of float32 and cheap to compress, so writing keeps pace with prediction.
FRACTION_MAPS = ("confidence", "consistency")
# The header stores the slope as float32: float32(1/255) is a little above 1/255, and 255 of it read
# back as 1.00000006; the float32 just below keeps the maps within [0, 1] as read by any tool.
FRACTION_SLOPE = float(np.nextafter(np.float32(1.0 / 255.0), np.float32(0.0)))
_FILE_CHUNK_BYTES = 16 << 20  # end-of-run writing converts this much of a map at a time


def _quantise(values: Any) -> np.ndarray:
    """Fractions in [0, 1] as uint8 in 1/255 steps (clipped, rounded to the nearest step)."""
    scaled = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    scaled *= np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


# ``_quantise`` of every float16 value, by its bit pattern: the store's maps are encoded with one lookup
with np.errstate(invalid="ignore"):  # (the NaN patterns: maps never hold NaN)
    _HALF_TO_STEPS = _quantise(np.arange(1 << 16, dtype=np.uint16).view(np.float16))


def encode_map(name: str, arr: Any) -> np.ndarray:
    """The uint8 voxels a map is stored as on disk (fractions quantised to 1/255 steps)."""
    if name in FRACTION_MAPS:
        arr = np.asarray(arr)
        if arr.dtype == np.float16:  # looked up in memory order (a store's slice is Fortran-ordered)
            order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
            steps = np.take(_HALF_TO_STEPS, arr.view(np.uint16).ravel(order=order))
            return steps.reshape(arr.shape, order=order)
        return _quantise(arr)
    return np.asarray(arr, dtype=np.uint8)


class _HeaderCapture(io.BytesIO):
    """File object that keeps what nibabel writes before the voxel data, then stops it."""

    class Done(Exception):
        """Raised at the first write of voxel data."""

    def __init__(self, header: Any) -> None:
        super().__init__()
        self.header = header  # nibabel sets its data offset when it writes it

    @property
    def offset(self) -> int:
        """Where the voxel data starts (0 until nibabel has written the header)."""
        return int(self.header.get_data_offset())

    def write(self, data: Any) -> int:
        if 0 < self.offset <= self.tell():
            raise self.Done
        return super().write(data)


def _nifti_header_bytes(reference: Volume, name: str) -> bytes:
    """The header (and padding up to the voxels) of map ``name`` on ``reference``'s original grid."""
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    dtype = np.dtype(np.uint8)
    hdr = derived_header(reference.header, dtype)
    image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    fake = np.broadcast_to(np.zeros((), dtype), written_shape(reference))
    img = image_class(fake, reference.original_affine, header=hdr)
    img.set_data_dtype(dtype)
    ref_codes = (int(reference.header["qform_code"]), int(reference.header["sform_code"]))
    if (int(img.header["qform_code"]), int(img.header["sform_code"])) != ref_codes and np.allclose(
        reference.header.get_best_affine(), reference.original_affine
    ):
        img.header.set_qform(reference.header.get_qform(), code=ref_codes[0])
        img.header.set_sform(reference.header.get_sform(), code=ref_codes[1])
    img.update_header()
    capture = _HeaderCapture(img.header)
    try:
        img.to_file_map({"image": FileHolder(fileobj=capture)})
    except _HeaderCapture.Done:
        pass
    offset = capture.offset
    if offset <= 0:  # pragma: no cover - nibabel always writes a single-file header first
        raise RuntimeError("could not build the NIfTI header")
    raw = capture.getvalue()[:offset].ljust(offset, b"\0")
    # the header as written (nibabel resets the scaling of integer data), with the map's own scaling
    written = type(img.header).from_fileobj(io.BytesIO(raw))
    if name in FRACTION_MAPS:
        written.set_slope_inter(FRACTION_SLOPE, 0.0)
        written["cal_min"], written["cal_max"] = 0.0, 1.0
    else:
        written.set_slope_inter(1.0, 0.0)
    block = written.binaryblock
    return block + raw[len(block) :]


@contextlib.contextmanager
def _map_file(tmp: Any, path: Any) -> Iterator[Any]:
    """A binary writer for ``tmp``: gzip level 1 (``io_utils.gzip_writer``) for ``.gz`` names, else plain."""
    from .io_utils import gzip_writer

    with open(tmp, "wb") as raw:
        if str(path).lower().endswith(".gz"):
            with gzip_writer(raw) as gz:
                yield gz
        else:
            yield raw


def write_map(name: str, arr_canonical: Any, path: Any, reference: Volume, *, overwrite: bool = False) -> Any:
    """Atomically write one map (canonical ``(X, Y, Z)``) as NIfTI on ``reference``'s original grid.

    The bytes equal what ``PredictionWriter`` streams for the same map (``encode_map``'s voxels, the
    reference's affine and header codes).
    """
    from .io_utils import atomic_write

    original = reference.to_original(arr_canonical)
    header = _nifti_header_bytes(reference, name)
    z = int(original.shape[2])
    per_slice = max(1, int(original.shape[0]) * int(original.shape[1]) * 4)
    step = max(1, _FILE_CHUNK_BYTES // per_slice)
    inputs = (reference.path,) if reference.path is not None else ()

    def write(tmp: Any) -> None:
        with _map_file(tmp, path) as fh:
            fh.write(header)
            for s in range(0, z, step):
                fh.write(encode_map(name, original[:, :, s : s + step]).tobytes(order="F"))

    return atomic_write(path, write, overwrite=overwrite, inputs=inputs)


def write_maps(
    maps: dict[str, Any], paths: dict[str, Any], reference: Volume, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write several maps (``write_map`` each, two at a time: compression releases the GIL)."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    names = [n for n in MAP_NAMES if n in paths] + [n for n in paths if n not in MAP_NAMES]

    def one(n: str) -> Any:
        return write_map(n, maps[n], paths[n], reference, overwrite=overwrite)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="napari-apl-write") as pool:
        futures = {n: pool.submit(contextvars.copy_context().run, one, n) for n in names}
        return {n: f.result() for n, f in futures.items()}


# predict (the command line) streams each batch's maps to the writer without keeping them; False keeps them in
# a volume store the writer reads (for benchmarks/inference_overhead.py, which measures the difference)
STREAM_WITHOUT_STORE = True


class _Aborted(Exception):
    """A streamed map file was abandoned by ``PredictionWriter.abort``."""


class PredictionWriter:
    """Writes the prediction maps as NIfTI on the input's original grid while the slices are predicted.

    Each file (the bytes ``write_map`` writes) is compressed slice by slice in its own background
    thread as ``SlicePredictor.run(..., on_slices=writer.feed)`` finishes slices (read from the
    predictor's store ``prediction``), or as ``run(..., on_batch=writer.feed_batch)`` hands over each
    batch's maps (``prediction`` may then be ``None``: no store at all), through ``atomic_write``
    (inside ``staged_outputs`` when the caller is in one). Streaming needs the file's third axis to be
    the axial one (``streamable``); ``order`` is the prediction order that matches the file's slice
    order. ``organs_seen`` says whether a pseudo label fed so far holds an organ.
    """

    def __init__(
        self,
        reference: Volume,
        prediction: Prediction | None,
        paths: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> None:
        import contextvars

        if not self.streamable(reference):
            raise ValueError("the file's third axis is not the axial one: write the maps at the end")
        unknown = sorted(set(paths) - set(MAP_NAMES))
        if unknown:
            raise ValueError(f"unknown map names {unknown}: use {', '.join(MAP_NAMES)}")
        self.reference = reference
        self.prediction = prediction
        z = int(reference.shape[2])
        flip_z = int(np.asarray(reference.ornt)[2, 1]) == -1
        self.order = list(range(z - 1, -1, -1)) if flip_z else list(range(z))
        # canonical -> file orientation of the in-plane axes (the slice order is handled by ``order``)
        inverse = np.empty((3, 2))
        for ax, (dest, flip) in enumerate(np.asarray(reference.ornt, dtype=float)):
            inverse[int(dest)] = (ax, flip)
        inverse[2] = (2, 1)
        self._inverse = inverse
        self._identity = bool(np.array_equal(inverse, [[0, 1], [1, 1], [2, 1]]))
        self._queues: dict[str, Any] = {}
        self._fed = 0  # how many slices of ``order`` were queued
        self.organs_seen = False
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.written: dict[str, Any] = {}
        self._paths = dict(paths)
        self._overwrite = overwrite
        self._headers = {name: _nifti_header_bytes(reference, name) for name in paths}
        # the files join the caller's staged_outputs(), whichever thread feeds the first slices
        self._context = contextvars.copy_context()

    def _start(self) -> None:
        """Open the temporary files and start one compressing thread per map (at the first slices)."""
        import contextvars
        import queue

        from .io_utils import atomic_write

        reference, overwrite = self.reference, self._overwrite
        inputs = (reference.path,) if reference.path is not None else ()
        for name, path in self._paths.items():
            header = self._headers[name]
            q: Any = queue.Queue(maxsize=64)
            q.ended = False  # set once close()'s or abort()'s item was taken
            self._queues[name] = q

            def write(tmp: Any, q: Any = q, header: bytes = header, path: Any = path) -> None:
                with _map_file(tmp, path) as fh:
                    fh.write(header)
                    while True:
                        item = q.get()
                        if item is None:
                            q.ended = True
                            return
                        if isinstance(item, BaseException):  # abort(): the temporary file goes
                            q.ended = True
                            raise _Aborted from item
                        fh.write(item)

            def run(name: str = name, path: Any = path, write: Any = write, q: Any = q) -> None:
                try:
                    self.written[name] = atomic_write(path, write, overwrite=overwrite, inputs=inputs)
                except _Aborted:
                    pass
                except BaseException as exc:  # a writing error, reported by close()
                    self._errors.append(exc)
                    # keep feed() from blocking on a full queue until close() or abort()
                    while not q.ended:
                        item = q.get()
                        q.ended = item is None or isinstance(item, BaseException)

            ctx = self._context.run(contextvars.copy_context)  # one copy of the caller's per thread
            t = threading.Thread(target=ctx.run, args=(run,), name=f"napari-apl-write-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def streamable(reference: Volume) -> bool:
        """Whether the file's third (slowest) axis is the canonical axial axis."""
        return int(np.asarray(reference.ornt)[2, 0]) == 2

    def _next(self, slices: Sequence[int]) -> None:
        """Check that ``slices`` are the next ones of ``order``, and count them as queued."""
        if not self._threads:
            self._start()
        expected = self.order[self._fed : self._fed + len(slices)]
        if [int(k) for k in slices] != expected:
            raise ValueError(
                f"slices {list(slices)[:4]}... fed out of order: the file needs {expected[:4]}..."
            )
        self._fed += len(slices)

    def feed(self, slices: list[int]) -> None:
        """Queue the finished canonical slices ``slices`` (next in ``order``), read from the store."""
        from nibabel.orientations import apply_orientation

        if self.prediction is None:
            raise RuntimeError("this writer has no store to read slices from: use feed_batch")
        self._next(slices)
        self.organs_seen = self.organs_seen or bool(self.prediction.pseudo[:, :, list(slices)].any())
        for name, q in self._queues.items():
            store = getattr(self.prediction, _FIELDS[name])
            for k in slices:
                plane = store[:, :, k]  # (X, Y), Fortran-contiguous
                if not self._identity:
                    plane = apply_orientation(plane[:, :, None], self._inverse)[:, :, 0]
                q.put(encode_map(name, plane).tobytes(order="F"))

    def feed_batch(self, slices: list[int], arrays: dict[str, np.ndarray]) -> None:
        """Queue one batch's maps ``(n, Y, X)`` (``SlicePredictor.run``'s on_batch) of the canonical slices
        ``slices``, the next ones in ``order``."""
        from nibabel.orientations import apply_orientation

        self._next(slices)
        self.organs_seen = self.organs_seen or bool(arrays["pseudo_label"].any())
        for name, q in self._queues.items():
            batch = arrays[name]
            if self._identity:  # a slice (Y, X) in C order is the file's (X, Y) in Fortran order
                for plane in encode_map(name, batch):
                    q.put(plane.tobytes())
                continue
            for j in range(len(slices)):
                plane = apply_orientation(batch[j].T[:, :, None], self._inverse)[:, :, 0]
                q.put(encode_map(name, plane).tobytes(order="F"))

    def close(self) -> dict[str, Any]:
        """Finish every file; return their paths by map name (raises the first writing error)."""
        if not self._threads:
            self._start()
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join()
        if self._errors:
            raise self._errors[0]
        return self.written

    def abort(self, exc: BaseException | None = None) -> None:
        """Stop writing: every temporary file is removed and nothing is replaced."""
        for q in self._queues.values():
            q.put(exc or RuntimeError("prediction stopped"))
        for t in self._threads:
            t.join()
