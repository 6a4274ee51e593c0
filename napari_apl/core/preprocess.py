"""Intensity normalisation of CT/MRI volumes: CT windows, robust percentiles and z-scores.

A ``Normalization`` is the recipe (stored in checkpoints as ``to_dict()``); ``fit(data)`` computes the
statistics of one volume (whole-volume statistics, on a subsample of axial slices for big or lazy
volumes) and returns a ``FittedNormalization`` that maps arrays to float32.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import APLError, VolumeError

if TYPE_CHECKING:
    from .volume import Volume

__all__ = [
    "KINDS",
    "LABEL_NAME_HINT",
    "LABEL_PROBE_SLICES",
    "MAX_FIT_VOXELS",
    "MAX_HINTED_LABEL_VALUES",
    "MAX_LABEL_VALUES",
    "PRESETS",
    "FittedNormalization",
    "Normalization",
    "NormalizationError",
    "get_preset",
    "is_integral",
    "looks_like_labels",
    "probe_looks_like_labels",
    "volume_looks_like_labels",
]

KINDS = ("ct_window", "percentile", "zscore")
MAX_FIT_VOXELS = 20_000_000
_FIELDS = ("kind", "level", "width", "lower", "upper")
USED_FIELDS = {"ct_window": ("level", "width"), "percentile": ("lower", "upper"), "zscore": ()}
"""The settings each kind reads (a recipe stores all four)."""


class NormalizationError(APLError):
    """A normalisation recipe is invalid (unknown kind or preset, bad window or percentiles)."""


def _number(value: Any, name: str) -> float:
    """Convert a parameter to a finite float or raise a one-line ``NormalizationError``."""
    if isinstance(value, bool):
        raise NormalizationError(f"normalization {name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise NormalizationError(f"normalization {name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise NormalizationError(f"normalization {name} must be finite, got {value!r}")
    return out


def _is_dask(arr: Any) -> bool:
    mod = sys.modules.get("dask.array")
    return mod is not None and isinstance(arr, mod.Array)


def _is_torch(arr: Any) -> bool:
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(arr, mod.Tensor)


def _sample(data: Any, max_voxels: int) -> np.ndarray:
    """Return ``data`` (numpy or dask) as numpy, keeping every k-th axial slice so at most ``max_voxels``."""
    if _is_torch(data):
        data = data.detach().cpu().numpy()
    if not hasattr(data, "shape") or not hasattr(data, "ndim"):
        data = np.asarray(data)
    size = math.prod(int(s) for s in data.shape)
    if size == 0:
        raise VolumeError("cannot normalise an empty volume: give a non-empty image")
    if data.ndim >= 3 and size > max_voxels:
        step = math.ceil(size / max_voxels)
        if step // 2 < data.shape[2]:
            data = data[:, :, step // 2 :: step]
        else:  # fewer slices than the step (a few huge ones): every k-th row and column of each
            k = math.ceil(math.sqrt(step))
            data = data[k // 2 :: k, k // 2 :: k]
    if _is_dask(data):
        data = data.compute()
    return np.asarray(data)


def constant_volume_error(value: float, kind: str) -> VolumeError:
    """The one-line error for a volume whose voxels all equal ``value`` (nothing to normalise)."""
    return VolumeError(
        f"the volume is constant (every voxel is {value:g}): there is nothing to normalise with "
        f"{kind}, check that the right image was loaded"
    )


@dataclass(frozen=True)
class FittedNormalization:
    """A normalisation fitted to one volume: ``(x - shift) / scale``, clipped to [0, 1] when ``clip``.

    ``pad`` is the normalised value of the volume's darkest voxels: what the slices are padded with on
    the model grid. It is one value per volume, so a slice's prediction does not depend on the other
    slices of its batch (0 for the clipped kinds; the volume's normalised minimum for ``zscore``).
    """

    kind: str
    shift: float
    scale: float
    clip: bool
    pad: float = 0.0

    def __post_init__(self) -> None:
        big = float(np.finfo(np.float32).max)
        if not (math.isfinite(self.scale) and self.scale > 0 and math.isfinite(self.shift)) or not (
            abs(self.shift) < big and 1.0 / big < self.scale < big and abs(self.pad) < big
        ):
            raise NormalizationError(
                f"the volume's intensities give a {self.kind} shift of {self.shift:.3g} and scale of "
                f"{self.scale:.3g}, beyond 32-bit floats: rescale the volume to a physical range (HU for CT)"
            )

    def __call__(self, arr: Any) -> Any:
        """Normalise an array (numpy, dask or torch) and return float32 of the same shape."""
        shift, inv = np.float32(self.shift), np.float32(1.0 / self.scale)
        if _is_torch(arr):
            out = (arr.float() - float(shift)) * float(inv)
            return out.clamp_(0.0, 1.0) if self.clip else out
        if _is_dask(arr):
            out = (arr.astype(np.float32) - shift) * inv
            return out.clip(0.0, 1.0) if self.clip else out
        with np.errstate(over="ignore", invalid="ignore"):  # voxels beyond float32: the caller checks
            out = np.asarray(arr, dtype=np.float32) - shift
            out *= inv
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description of the fitted statistics (for logs and provenance)."""
        return {
            "kind": self.kind,
            "shift": self.shift,
            "scale": self.scale,
            "clip": self.clip,
            "pad": self.pad,
        }


@dataclass(frozen=True)
class Normalization:
    """How to map image intensities to network inputs: ``ct_window``, ``percentile`` or ``zscore``."""

    kind: str
    level: float = 40.0
    width: float = 400.0
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NormalizationError(
                f"unknown normalization kind {self.kind!r}: use one of {', '.join(KINDS)}"
            )
        for name in ("level", "width", "lower", "upper"):
            object.__setattr__(self, name, _number(getattr(self, name), name))
        if self.width <= 0:
            raise NormalizationError(f"normalization width must be > 0, got {self.width}")
        if not (0.0 <= self.lower < self.upper <= 100.0):
            raise NormalizationError(
                f"normalization percentiles must satisfy 0 <= lower < upper <= 100, "
                f"got lower={self.lower}, upper={self.upper}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field (stored in checkpoint metadata)."""
        return {
            "kind": self.kind,
            "level": self.level,
            "width": self.width,
            "lower": self.lower,
            "upper": self.upper,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        """Rebuild a ``Normalization`` from ``to_dict()`` output, validating every field."""
        if not isinstance(d, Mapping):
            raise NormalizationError(f"normalization must be a dictionary, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _FIELDS)
        if unknown:
            raise NormalizationError(
                f"normalization has unknown field(s) {', '.join(unknown)}: allowed are {', '.join(_FIELDS)}"
            )
        if "kind" not in d:
            raise NormalizationError(f"normalization needs a 'kind' ({', '.join(KINDS)})")
        return cls(**{k: d[k] for k in _FIELDS if k in d})

    def fit(self, data: Any, *, max_voxels: int = MAX_FIT_VOXELS) -> FittedNormalization:
        """Compute the statistics of a whole volume (numpy/dask/torch; subsampled when large)."""
        window = FittedNormalization("ct_window", self.level - self.width / 2.0, self.width, True)
        if self.kind == "ct_window" and data is None:  # the window needs no statistics
            return window
        sample = _sample(data, max_voxels)
        if sample.dtype.kind not in "biuf":
            raise VolumeError(f"cannot normalise voxels of type {sample.dtype}: give a numeric image")
        if sample.dtype.kind == "f" and not np.isfinite(sample).all():
            raise VolumeError("the volume contains NaN or Inf voxels: replace them before normalising")
        if sample.dtype.kind == "b":
            sample = sample.astype(np.uint8)
        vmin, vmax = float(sample.min()), float(sample.max())
        if vmax <= vmin:
            raise constant_volume_error(vmin, self.kind)
        if self.kind == "ct_window":
            return window
        if self.kind == "percentile":
            lo, hi = (float(v) for v in np.percentile(sample, [self.lower, self.upper]))
            if hi <= lo:  # almost constant: fall back to the full range
                lo, hi = vmin, vmax
            return FittedNormalization(self.kind, lo, hi - lo, True)
        with np.errstate(over="ignore", invalid="ignore"):  # absurd intensities: refused just below
            mean = float(np.mean(sample, dtype=np.float64))
            std = float(np.std(sample, dtype=np.float64))
        if not std > 0:
            raise VolumeError("the volume has zero variance: there is nothing to normalise with zscore")
        return FittedNormalization(self.kind, mean, std, False, pad=(vmin - mean) / std)


PRESETS: dict[str, Normalization] = {
    "ct-abdomen": Normalization("ct_window", level=40.0, width=400.0),
    "ct-soft": Normalization("ct_window", level=50.0, width=350.0),
    # CT whose file keeps the scanner's stored values: HU + 1024 and no intercept in the header
    "ct-abdomen-offset": Normalization("ct_window", level=40.0 + 1024.0, width=400.0),
    "mri": Normalization("percentile", lower=0.5, upper=99.5),
    "zscore": Normalization("zscore"),
}


def get_preset(name: str) -> Normalization:
    """Return the normalisation preset called ``name`` (a one-line error lists the valid names)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise NormalizationError(
            f"unknown normalization preset {name!r}: use one of {', '.join(PRESETS)}"
        ) from None


CT_PROBE_SLICES = 4  # axial slices looks_like_ct reads (from the start of the volume)


def looks_like_ct(data: Any) -> bool:
    """Guess whether a volume holds Hounsfield units (air near -1000, nothing far above bone).

    Every CT slice shows air (or the scanner's padding) below -500 HU, so the first few axial slices
    decide: they are the cheap ones to read from a compressed file that is streamed slice by slice.
    """
    sample = _probe(data)
    return _hu_sample(sample) and not _offset_ct_sample(sample)


CT_STORED_OFFSET = 1024.0  # stored value of 0 HU in CT files written without the rescale intercept


def _probe(data: Any) -> np.ndarray:
    """The finite voxels of every 4th row and column of the first ``CT_PROBE_SLICES`` axial slices."""
    sample = data[::4, ::4, :CT_PROBE_SLICES]
    with np.errstate(over="ignore"):  # voxels beyond float32 become inf: dropped here, refused later
        sample = np.asarray(sample.compute() if _is_dask(sample) else sample, dtype=np.float32)
    return sample[np.isfinite(sample)]


def _hu_sample(sample: np.ndarray) -> bool:
    """``looks_like_ct`` on probed voxels."""
    return bool(sample.size and sample.min() < -500 and np.percentile(sample, 99) < 4000)


def _without_padding(sample: np.ndarray) -> np.ndarray:
    """Probed voxels without a scanner's padding: the minimum, when it is below -500, at least 1 % of the
    voxels hold it and the next value lies 100 or more above it (-2000 raw or -3024 HU outside the field
    of view; not the air of a file stored as HU + 1024, masked to exactly 0 outside the body)."""
    if sample.size < 100:
        return sample
    lowest = float(sample.min())
    if lowest >= -500:
        return sample
    at = sample == lowest
    if at.mean() < 0.01 or at.all():
        return sample
    rest = sample[~at]
    return rest if float(rest.min()) - lowest >= 100 else sample


def _offset_ct_sample(sample: np.ndarray) -> bool:
    """``looks_like_offset_ct`` on probed voxels (a scanner's padding value set aside)."""
    sample = _without_padding(sample)
    if not sample.size or not -200 <= float(sample.min()) < 124 or np.percentile(sample, 99) >= 5024:
        return False
    air = sample < 124  # below -900 HU
    body = sample[~air]
    if air.mean() < 0.02 or body.size < 100:
        return False
    band = (body >= CT_STORED_OFFSET - 200) & (body <= CT_STORED_OFFSET + 300)
    return bool(band.mean() >= 0.7)


def looks_like_offset_ct(data: Any) -> bool:
    """Guess whether a volume is CT stored as HU + 1024 (a file without its -1024 rescale intercept).

    Such files show air near 0 and nearly all other voxels between fat and bone-free soft tissue
    (-200..300 HU, stored 824..1324). On the probed slices MRI volumes put at most 10 % of their
    non-air voxels in that band (the 16 CHAOS T2 scans and TotalSegmentator's MRI, also rescaled by
    1.5 to 4 times: under 50 %); the real CT stored this way puts 83 to 91 % there.
    """
    return _offset_ct_sample(_probe(data))


def choose_normalization(
    name: str, checkpoint_normalization: Mapping[str, Any], data: Any, notes: list[str] | None = None
) -> Normalization:
    """Resolve a preset name, ``checkpoint`` (the source's) or ``auto`` (CT window for CT volumes).

    ``auto`` takes the abdomen window for volumes in Hounsfield units and its shifted twin
    (``ct-abdomen-offset``) for CT stored as HU + 1024, saying so in ``notes``; else the checkpoint's.
    """
    if name in ("checkpoint", "from checkpoint"):
        return Normalization.from_dict(checkpoint_normalization)
    if name == "auto":
        sample = _probe(data)  # read once for both tests
        # the shifted twin first: its padding (e.g. -2000 raw outside the field of view) is below -500
        # too, but its body sits near 1024, not near 0 (a padding in HU leaves air below -500)
        if _offset_ct_sample(sample):
            if notes is not None:
                notes.append(
                    "the volume looks like CT stored as HU + 1024 (air near 0, no rescale intercept): "
                    "normalised with 'ct-abdomen-offset'; choose 'checkpoint' if it is not CT"
                )
            return PRESETS["ct-abdomen-offset"]
        if _hu_sample(sample):
            return PRESETS["ct-abdomen"]
        return Normalization.from_dict(checkpoint_normalization)
    check_preset_name(name)
    return get_preset(name)


def check_preset_name(name: str) -> None:
    """Refuse a ``--normalize`` value that is neither a preset nor ``auto`` / ``checkpoint``."""
    if name not in ("auto", "checkpoint", "from checkpoint") and name not in PRESETS:
        raise NormalizationError(
            f"unknown normalization preset {name!r}: use one of auto, checkpoint, {', '.join(PRESETS)}"
        )


# --- label volumes --------------------------------------------------------------------------------------

# names that say a file holds labels: label(s), seg(mentation)(s), mask(s), (ground)truth, annotation(s)
# and gt, each a word of its own between non-letters (label_7.nii.gz, ct_sm_labels, case2_gt, liver-seg;
# not "unlabeled", "masked", "presegmentation", "annotated", "length" or "truthful": scans named so are
# common, and a scan taken for labels is refused)
LABEL_NAME_HINT = re.compile(
    r"(?<![a-z])(labels?|seg|segs|segmentations?|masks?|truth|groundtruth|annotations?|gt)(?![a-z])",
    re.IGNORECASE,
)
MAX_LABEL_VALUES = 64  # distinct values a label volume holds at most (organ labels: a handful)
MAX_HINTED_LABEL_VALUES = 1024  # the same for a file whose name says labels (instance labels)
LABEL_PROBE_SLICES = 5  # slices probe_looks_like_labels reads at most: the first, then spread out
# Labels are piecewise constant: at most this fraction of a probed slice's neighbouring voxel pairs differ
# (organ boundaries; a scan's texture and noise make far more pairs differ, however few its grey levels)
MAX_LABEL_EDGE_FRACTION = 0.1
_LABEL_SAMPLE_VOXELS = 200_000


def is_integral(arr: np.ndarray) -> bool:
    """Whether every value of ``arr`` is a (finite) whole number."""
    if arr.dtype.kind in "biu":
        return True
    return bool(np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr)))


def _label_value_limit(dtype: Any, name: str) -> int | None:
    """How many distinct values a label volume of this type and file name may hold; ``None`` where its
    type alone rules labels out (floats, unless the name says labels: CHAOS stores labels as floats)."""
    hinted = bool(LABEL_NAME_HINT.search(name))
    if not hinted and np.dtype(dtype).kind not in "biu":
        return None
    return MAX_HINTED_LABEL_VALUES if hinted else MAX_LABEL_VALUES


def _edge_fraction(block: np.ndarray, slice_axis: int) -> float:
    """Fraction of neighbouring voxel pairs within the slice ``block`` (both in-plane axes) that differ."""
    plane = np.squeeze(block, axis=slice_axis)
    pairs = differ = 0
    for axis in (0, 1):
        if plane.shape[axis] > 1:
            d = np.diff(plane, axis=axis) != 0
            pairs, differ = pairs + d.size, differ + int(d.sum())
    return differ / pairs if pairs else 0.0


def looks_like_labels(data: np.ndarray, name: str = "") -> bool:
    """Whether a whole in-memory array is a label volume: non-negative whole numbers, few distinct ones
    (at most ``MAX_LABEL_VALUES``; ``MAX_HINTED_LABEL_VALUES`` and float storage too when ``name`` says
    labels), piecewise constant on three axial slices (``MAX_LABEL_EDGE_FRACTION``). A subsample is
    judged first, so an image is turned down without a pass over all voxels."""
    data = np.asarray(data)
    limit = _label_value_limit(data.dtype, name)
    if limit is None:
        return False
    step = max(1, data.size // _LABEL_SAMPLE_VOXELS)
    sample = data.ravel(order="K")[::step]  # memory order: a view whatever the layout
    if not is_integral(sample) or np.unique(sample).size > limit:
        return False
    if data.ndim == 3 and data.shape[2] > 0:  # piecewise constant on three axial slices (a scan is not)
        picks = sorted({data.shape[2] // 4, data.shape[2] // 2, (3 * data.shape[2]) // 4})
        if any(_edge_fraction(data[:, :, k : k + 1], 2) > MAX_LABEL_EDGE_FRACTION for k in picks):
            return False
    return is_integral(data) and data.min() >= 0 and np.unique(data).size <= limit


def probe_looks_like_labels(data: Any, name: str = "", *, slice_axis: int = 2) -> bool:
    """Whether a volume looks like labels on ``LABEL_PROBE_SLICES`` slices along ``slice_axis``, spread
    over it: cheap for a lazy one (numpy, dask, a nibabel proxy or a lazy volume's slice reader).

    The rule the command line refuses a file by, so it errs towards the image: the probed voxels must be
    non-negative whole numbers, with at least two and at most ``MAX_LABEL_VALUES`` distinct values
    whatever the file's name (which only lets float storage count: CHAOS stores labels as floats), and
    piecewise constant (at most ``MAX_LABEL_EDGE_FRACTION`` of neighbouring voxels differ on each probed
    slice). Slices holding one value only (an empty mask, padding) say nothing.
    """
    limit = None if _label_value_limit(data.dtype, name) is None else MAX_LABEL_VALUES
    shape = tuple(int(s) for s in data.shape)
    if limit is None or len(shape) < 3 or 0 in shape:
        return False
    n = shape[slice_axis]
    spread = np.rint(np.linspace(0, n - 1, LABEL_PROBE_SLICES + 1)[1:-1]).astype(int).tolist()
    # the first slice first: the cheapest of a .nii.gz to read, and on a scan (air below zero in a CT,
    # an MRI's many values) the probe ends there
    picks = list(dict.fromkeys([0, *spread]))
    values: set = set()
    for k in picks:
        key = [slice(None)] * len(shape)
        key[slice_axis] = slice(k, k + 1)
        block = data[tuple(key)]
        block = np.asarray(block.compute() if _is_dask(block) else block)
        if block.size == 0:
            continue
        if not is_integral(block) or float(block.min()) < 0:
            return False
        values.update(np.unique(block).tolist())
        if len(values) > limit or _edge_fraction(block, slice_axis) > MAX_LABEL_EDGE_FRACTION:
            return False
    return len(values) >= 2


def volume_looks_like_labels(volume: Volume) -> bool:
    """Whether a loaded volume (lazy or not) looks like a label volume, from a few of its file's own
    slices (``probe_looks_like_labels``; its file name counts as the hint)."""
    from .volume import axial_reader

    reader = axial_reader(volume.data) if volume.lazy else None
    # the file's third axis is the one whose slices lie whole in the file: the cheap ones to read
    slice_axis = int(np.asarray(volume.ornt)[2, 0])
    name = volume.path.name if volume.path is not None else ""
    return probe_looks_like_labels(reader if reader is not None else volume.data, name, slice_axis=slice_axis)
