"""Safe, self-describing model checkpoints.

A napari-apl checkpoint is a ``torch.save`` of a plain dictionary::

    {"napari_apl_format": FORMAT_VERSION, "meta_json": "<CheckpointMeta as JSON>",
     "state_dict": {name: tensor}}

It holds only strings, integers and tensors, so it is always read with
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused before
anything runs. Files are written atomically (``io_utils.atomic_write``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import APLError, CheckpointError
from .io_utils import atomic_write
from .labels import CLASS_NAMES
from .models import ARCHITECTURES, DualHeadNet, build_model, get_architecture

FORMAT_VERSION = 1
FORMAT_KEY = "napari_apl_format"
MAX_BYTES_ENV = "NAPARI_APL_MAX_CHECKPOINT_BYTES"
DEFAULT_MAX_BYTES = 2 * 1024**3
_BN_COUNTER = "num_batches_tracked"
_SHOW_KEYS = 3


def _default_normalization() -> dict[str, Any]:
    """Return the default normalization description (MRI-style percentile scaling)."""
    return {"kind": "percentile", "lower": 0.5, "upper": 99.5}


def _json_check(value: Any, what: str) -> None:
    """Raise CheckpointError when ``value`` cannot be stored as JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
        raise CheckpointError(f"checkpoint metadata {what} is not JSON-serialisable: {exc}") from None


# A model's slice size: a 4096 x 4096 slice of 5 float32 classes for both heads is already 0.6 GB.
MIN_INPUT_SIZE = 8
MAX_INPUT_SIZE = 4096
MIN_SPACING_MM = 0.01  # as a volume's voxel size (core.volume)
MAX_SPACING_MM = 100.0


def _pair(value: Any, what: str, kind: type) -> tuple:
    """Return ``value`` as a validated 2-tuple of positive ``kind`` values."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok:
        items = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                ok = False
                break
            if kind is int and (isinstance(v, float) and not v.is_integer()):
                ok = False
                break
            v = kind(v)
            if not math.isfinite(v) or v <= 0:
                ok = False
                break
            items.append(v)
    if not ok:
        kind_name = "integers" if kind is int else "numbers"
        raise CheckpointError(f"checkpoint metadata {what} must be two positive {kind_name}, got {value!r}")
    return tuple(items)


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild and correctly use a model: architecture, classes, geometry."""

    format_version: int = FORMAT_VERSION
    arch: str = "unet-dual"
    arch_args: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    input_size: tuple[int, int] = (256, 256)
    spacing: tuple[float, float] = (1.5, 1.5)
    normalization: dict[str, Any] = field(default_factory=_default_normalization)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate and normalise the field types (raises CheckpointError)."""
        fv = self.format_version
        if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
            raise CheckpointError(f"checkpoint metadata format_version must be an integer >= 1, got {fv!r}")
        if not isinstance(self.arch, str) or not self.arch:
            raise CheckpointError(f"checkpoint metadata arch must be a non-empty string, got {self.arch!r}")
        for name in ("arch_args", "normalization", "provenance"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise CheckpointError(f"checkpoint metadata {name} must be a dict with string keys")
            value = dict(value)
            _json_check(value, name)
            setattr(self, name, value)
        names = self.class_names
        if (
            isinstance(names, (str, bytes))
            or not isinstance(names, (list, tuple))
            or len(names) < 2
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise CheckpointError(
                f"checkpoint metadata class_names must be a list of at least 2 names, got {names!r}"
            )
        if len(set(names)) < len(names):
            twice = sorted(n for n, k in Counter(names).items() if k > 1)
            raise CheckpointError(
                f"checkpoint metadata class_names name {', '.join(twice)} twice: each class once"
            )
        self.class_names = list(names)
        check_one_channel(self.arch_args)
        kind = self.normalization.get("kind")
        if not isinstance(kind, str) or not kind:
            raise CheckpointError("checkpoint metadata normalization needs a 'kind' string")
        from .preprocess import Normalization  # (light: numpy only)

        try:
            Normalization.from_dict(self.normalization)
        except APLError as exc:
            raise CheckpointError(f"checkpoint metadata normalization is invalid: {exc}") from None
        self.input_size = _pair(self.input_size, "input_size", int)
        if not all(MIN_INPUT_SIZE <= v <= MAX_INPUT_SIZE for v in self.input_size):
            raise CheckpointError(
                f"checkpoint metadata input_size must be two sizes in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} px, "
                f"got {self.input_size}"
            )
        self.spacing = _pair(self.spacing, "spacing", float)
        if not all(MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in self.spacing):
            raise CheckpointError(
                f"checkpoint metadata spacing must be two values in {MIN_SPACING_MM}..{MAX_SPACING_MM} mm, "
                f"got {self.spacing}"
            )

    @property
    def num_classes(self) -> int:
        """Return the number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary of the metadata."""
        self.__post_init__()
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "arch_args": json.loads(json.dumps(self.arch_args)),
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "spacing": list(self.spacing),
            "normalization": json.loads(json.dumps(self.normalization)),
            "provenance": json.loads(json.dumps(self.provenance)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointMeta:
        """Build validated metadata from ``to_dict`` output; unknown keys are ignored."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"checkpoint metadata must be a JSON object, got {type(data).__name__}")
        for required in ("arch", "class_names"):
            if required not in data:
                raise CheckpointError(f"checkpoint metadata lacks the field {required!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        """Return the metadata as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        """Parse metadata written by ``to_json``."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
            raise CheckpointError(f"checkpoint metadata is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# -- safe reading ----------------------------------------------------------------------------------
def max_checkpoint_bytes() -> int:
    """Return the size limit for checkpoint files (env ``NAPARI_APL_MAX_CHECKPOINT_BYTES``)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise CheckpointError(f"{MAX_BYTES_ENV}={raw!r} is not a positive number of bytes: fix or unset it")
    return value


def check_one_channel(arch_args: Mapping[str, Any]) -> None:
    """Refuse a model that does not take one-channel slices: the pipeline feeds grey values only."""
    channels = arch_args.get("in_channels", 1)
    if channels != 1:
        raise CheckpointError(
            f"the model takes {channels!r} input channels (in_channels) but napari-apl feeds it one grey "
            "value per voxel: use a model trained on one-channel images"
        )


def _check_file(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is a readable file within the size limit, else raise CheckpointError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist: check the path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file: give the path of a .pt checkpoint file")
    size = p.stat().st_size
    limit = max_checkpoint_bytes()
    if size > limit:
        raise CheckpointError(
            f"checkpoint {p} is {size} bytes, more than the limit of {limit} bytes: "
            f"set {MAX_BYTES_ENV} to a larger value if you trust this file"
        )
    return p


def _check_checksums(path: Path) -> None:
    """Refuse a zip-format checkpoint whose parts fail their CRC-32 (torch.load does not check them).

    A flipped bit in a weight's bytes would otherwise load silently and change the masks. Legacy (not
    zip) files carry no checksums; a zip that cannot be opened is left to ``torch.load`` to report.
    """
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError):
        return
    if bad is not None:
        raise CheckpointError(
            f"{path} is damaged: its part {bad} fails its checksum (a bad copy or disk): "
            "copy the file again or use a backup"
        )


def _safe_load(path: Path, map_location: str = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError.

    The whole file's checksums are verified first, except for an ``mmap`` read (metadata only).
    """
    if not mmap:
        _check_checksums(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        text = str(exc)
        match = re.search(r"GLOBAL\s+([\w.]+)", text)
        if match or "Unsupported global" in text:
            culprit = match.group(1) if match else "a Python object"
            raise CheckpointError(
                f"{path} is unsafe: it would import {culprit} when loaded, which a checkpoint never needs; "
                "it was not loaded and nothing was run: only use files from a trusted source"
            ) from None
        if mmap and isinstance(exc, (RuntimeError, ValueError)) and "mmap" in text:
            return _safe_load(path, map_location, mmap=False)
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it could not be read as one): "
            "give a file written by napari-apl or torch.save"
        ) from None


def _check_dense(path: Path, state: Mapping[str, Any]) -> None:
    """Refuse sparse or quantised tensors: a napari-apl model holds ordinary dense float weights."""
    odd = [
        str(k)
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and (v.layout != torch.strided or v.is_quantized)
    ]
    if odd:
        raise CheckpointError(
            f"{path}: tensor(s) {_names(odd)} are stored sparse or quantised: save the model's ordinary "
            "dense weights (tensor.to_dense(), or the float model's state_dict())"
        )


def _is_state_dict(obj: Any) -> bool:
    """Return whether ``obj`` is a non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _newer_error(path: Path, version: int) -> CheckpointError:
    """Return the error for a checkpoint written by a newer napari-apl."""
    return CheckpointError(
        f"{path} was written by a newer napari-apl (format {version} > {FORMAT_VERSION}): upgrade napari-apl"
    )


def _parse(path: Path, obj: Any, *, need_weights: bool = True) -> tuple[CheckpointMeta, dict]:
    """Validate a loaded napari-apl checkpoint object; return its metadata and state dict."""
    if not isinstance(obj, Mapping) or FORMAT_KEY not in obj:
        if _is_state_dict(obj) or (isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict"))):
            raise CheckpointError(
                f"{path} is a raw state dict, not a napari-apl checkpoint: import it with import_state_dict "
                "(napari-apl import) and its metadata"
            )
        raise CheckpointError(f"{path} is not a napari-apl checkpoint (no {FORMAT_KEY!r} entry)")
    version = obj[FORMAT_KEY]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format version {version!r}: the file is damaged")
    if version > FORMAT_VERSION:
        raise _newer_error(path, version)
    text = obj.get("meta_json")
    if not isinstance(text, str):
        raise CheckpointError(f"{path} has no metadata (meta_json): the file is damaged")
    try:
        meta = CheckpointMeta.from_json(text)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if meta.format_version > FORMAT_VERSION:
        raise _newer_error(path, meta.format_version)
    state = obj.get("state_dict")
    if need_weights and not _is_state_dict(state):
        raise CheckpointError(f"{path} has no weights (state_dict of tensors): the file is damaged")
    if need_weights:
        _check_dense(path, state)
    return meta, dict(state) if isinstance(state, Mapping) else {}


def _model_args(meta: CheckpointMeta) -> dict[str, Any]:
    """Return the ``build_model`` keyword arguments described by ``meta``."""
    args = dict(meta.arch_args)
    args.setdefault("num_classes", meta.num_classes)
    return args


def _check_classes(
    path: Path, meta: CheckpointMeta, state: Mapping[str, torch.Tensor] | None, expected: int | None
) -> None:
    """Check that metadata, arch_args, head weights and ``expected`` agree on the class count."""
    n = meta.num_classes
    args_n = meta.arch_args.get("num_classes", n)
    if args_n != n:
        raise CheckpointError(
            f"{path}: wrong class count: arch_args num_classes={args_n!r} but {n} class names "
            f"({', '.join(meta.class_names)})"
        )
    if state is not None:
        key = get_architecture(meta.arch).main_head_key
        head = state.get(key)
        if isinstance(head, torch.Tensor) and head.ndim >= 1 and head.shape[0] != n:
            raise CheckpointError(
                f"{path}: wrong class count: the main head {key} has {head.shape[0]} output channels "
                f"but the metadata names {n} classes"
            )
    if expected is not None and expected != n:
        scheme = ""
        if expected == len(CLASS_NAMES):
            scheme = " (" + ", ".join(f"{i} {name}" for i, name in enumerate(CLASS_NAMES)) + ")"
        raise CheckpointError(
            f"{path}: wrong class count: the model has {n} classes ({', '.join(meta.class_names)}) "
            f"but {expected} are expected{scheme}: use a checkpoint trained for these labels"
        )


def _label_key(name: str) -> str:
    """A class name compared without case or separators ("Right_Kidney" is "right kidney")."""
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())


def check_label_scheme(path: str | os.PathLike, class_names: Sequence[str], scheme: Sequence[str]) -> None:
    """Raise a one-line ``CheckpointError`` unless ``class_names`` are ``scheme``'s, in its order.

    The label maps are written by channel index, so a model whose channel 1 is the spleen would write
    spleen voxels as label 1, which every reader of napari-apl's masks takes for the liver.
    """
    if [_label_key(n) for n in class_names] == [_label_key(n) for n in scheme]:
        return
    have = ", ".join(f"{i} {n}" for i, n in enumerate(class_names))
    want = ", ".join(f"{i} {n}" for i, n in enumerate(scheme))
    order = sorted(map(_label_key, class_names)) == sorted(map(_label_key, scheme))
    raise CheckpointError(
        f"{path}: classes {have} are "
        + ("in another order than" if order else "not")
        + f" napari-apl's labels ({want}): use a model whose output channels are these classes in this order"
    )


def scheme_order(class_names: Sequence[str], scheme: Sequence[str]) -> list[int] | None:
    """For class names that are ``scheme``'s in another order, the channel of each scheme class
    (``order[i]`` = the channel of ``scheme[i]``); ``None`` when they are other names."""
    keys = [_label_key(n) for n in class_names]
    wanted = [_label_key(n) for n in scheme]
    if sorted(keys) != sorted(wanted) or len(set(keys)) != len(keys):
        return None
    return [keys.index(k) for k in wanted]


@torch.no_grad()
def reorder_classes(model: DualHeadNet, order: Sequence[int]) -> None:
    """Reorder ``model``'s output classes in place: new class ``i`` is the old class ``order[i]``, in
    both heads (the tensors ``logit_prefixes`` name, along their first axis)."""
    index = torch.as_tensor(list(order), dtype=torch.long)
    if sorted(index.tolist()) != list(range(model.num_classes)):
        raise ValueError(f"order must be a permutation of 0..{model.num_classes - 1}, got {list(order)}")
    moved = 0
    for name, tensor in model.state_dict().items():
        if name.startswith(model.logit_prefixes) and tensor.ndim >= 1:
            if tensor.shape[0] != model.num_classes:
                raise ValueError(f"{name} has {tensor.shape[0]} rows, not one per class")
            tensor.copy_(tensor[index])
            moved += 1
    if moved == 0:
        raise ValueError(f"{model.arch} names no class-axis tensors (logit_prefixes)")


def _check_arch(path: Path, meta: CheckpointMeta) -> None:
    """Raise CheckpointError naming ``path`` when ``meta.arch`` is not a known architecture."""
    if meta.arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unknown architecture {meta.arch!r}: choose one of {', '.join(ARCHITECTURES)} "
            "(or upgrade napari-apl)"
        )


def _check_stride(model: DualHeadNet, meta: CheckpointMeta) -> None:
    """Refuse an input size the network cannot take (not a multiple of its output stride)."""
    stride = int(getattr(model, "stride", 1))
    if any(v % stride for v in meta.input_size):
        h, w = meta.input_size
        raise CheckpointError(
            f"input size {h} x {w} is not a multiple of {meta.arch}'s stride {stride}: "
            f"re-import the weights with --input-size a multiple of {stride}"
        )


def _build(
    path: Path, meta: CheckpointMeta, state: Mapping[str, torch.Tensor] | None = None, *, strict: bool = True
) -> DualHeadNet:
    """Build the model for ``meta``, naming ``path`` in any error.

    With ``state`` the network is first built on the meta device (no memory) and checked against the
    file's tensors, so absurd architecture arguments in untrusted metadata never allocate anything.
    """
    _check_arch(path, meta)
    try:
        if state is not None:
            with torch.device("meta"):
                probe = build_model(meta.arch, **_model_args(meta))
            probe_params = sum(t.numel() for t in probe.state_dict().values())
            file_params = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
            if strict or probe_params > 4 * max(file_params, 1):
                _check_fits(path, probe, state, strict=strict)
            if probe_params > 4 * max(file_params, 1):
                raise CheckpointError(
                    f"{path}: its metadata asks for a {meta.arch} with {probe_params:,} weights but the file "
                    f"holds {file_params:,}: the metadata does not describe these weights"
                )
            _check_stride(probe, meta)
        model = build_model(meta.arch, **_model_args(meta))
        _check_stride(model, meta)
        return model
    except CheckpointError as exc:
        msg = str(exc)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except (RuntimeError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot build {meta.arch} from its metadata ({first})") from None


def _check_fits(path: Path, probe: DualHeadNet, state: Mapping[str, torch.Tensor], *, strict: bool) -> None:
    """Raise a one-line error when ``state`` does not fit the (meta-device) ``probe`` network."""
    own = probe.state_dict()
    given = {k: v for k, v in state.items() if k in own or not k.endswith(_BN_COUNTER)}
    if not strict:
        if not any(k in own and tuple(v.shape) == tuple(own[k].shape) for k, v in given.items()):
            raise CheckpointError(f"{path}: no weight in the file matches architecture {probe.arch}")
        return
    missing = [k for k in own if not k.endswith(_BN_COUNTER) and k not in given]
    unexpected = [k for k in given if k not in own]
    mismatched = [k for k in given if k in own and tuple(given[k].shape) != tuple(own[k].shape)]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} weights of {probe.arch} are missing: {_names(missing)}: "
            "the file does not fit this architecture"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected weights for {probe.arch}: {_names(unexpected)}: "
            "the file does not fit this architecture"
        )
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"{path}: tensor shape mismatch for {k}: file has {tuple(given[k].shape)}, "
            f"{probe.arch} needs {tuple(own[k].shape)}"
            + (f" ({len(mismatched) - 1} more)" if len(mismatched) > 1 else "")
        )


def _names(keys: list[str]) -> str:
    """Return the first few ``keys`` and how many more there are."""
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f" and {len(keys) - _SHOW_KEYS} more" if len(keys) > _SHOW_KEYS else "")


def _load_weights(
    path: Path, model: DualHeadNet, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> list[str]:
    """Copy ``state`` into ``model``; num_batches_tracked may be absent or extra. Return skipped keys.

    With ``strict`` every other key must match by name and shape; otherwise matching keys are loaded,
    the rest is skipped (but at least one tensor must match).
    """
    own = model.state_dict()
    own_keys = [k for k in own if not k.endswith(_BN_COUNTER)]
    given = {k: v for k, v in state.items() if k in own or not k.endswith(_BN_COUNTER)}
    missing = [k for k in own_keys if k not in given]
    unexpected = [k for k in given if k not in own]
    mismatched = [k for k in given if k in own and tuple(given[k].shape) != tuple(own[k].shape)]
    if strict:
        _check_fits(path, model, state, strict=True)
    usable = {k: v for k, v in given.items() if k in own and k not in mismatched}
    if not any(not k.endswith(_BN_COUNTER) for k in usable):
        raise CheckpointError(f"{path}: no weight in the file matches architecture {model.arch}")
    for k, v in usable.items():
        if not torch.is_floating_point(v) and torch.is_floating_point(own[k]):
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, expected a floating-point tensor")
        if torch.is_floating_point(v) and not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                f"{path}: tensor {k} holds NaN or infinite values (a training run that diverged?): "
                "use an earlier checkpoint or train again with a lower learning rate"
            )
    try:
        model.load_state_dict(usable, strict=False)
    except RuntimeError as exc:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(
            f"{path}: weights do not fit {model.arch}: {str(exc).splitlines()[0]}"
        ) from None
    return sorted(set(missing) | set(unexpected) | set(mismatched))


def _place(model: DualHeadNet, map_location: str | torch.device | None) -> DualHeadNet:
    """Move ``model`` to the device ``map_location`` (if given) and set eval mode."""
    if map_location is not None:
        model = model.to(map_location)
    return model.eval()


# -- public API ------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike, model: DualHeadNet, meta: CheckpointMeta, *, overwrite: bool = False
) -> Path:
    """Write ``model`` and ``meta`` atomically to ``path``; ``arch``/``arch_args`` come from the model."""
    if not isinstance(model, DualHeadNet):
        raise CheckpointError(f"cannot save {type(model).__name__} to {path}: it is not a napari-apl model")
    if not isinstance(meta, CheckpointMeta):
        raise CheckpointError(f"cannot save to {path}: meta must be a CheckpointMeta")
    if meta.arch != model.arch:
        raise CheckpointError(
            f"cannot save to {path}: metadata says architecture {meta.arch!r} but the model is {model.arch!r}"
        )
    if meta.num_classes != model.num_classes:
        raise CheckpointError(
            f"cannot save to {path}: wrong class count: metadata names {meta.num_classes} classes "
            f"but the model predicts {model.num_classes}"
        )
    meta = dataclasses.replace(meta, format_version=FORMAT_VERSION, arch_args=dict(model.arch_args))
    payload = {
        FORMAT_KEY: FORMAT_VERSION,
        "meta_json": meta.to_json(),
        # contiguous copies: the same file whether or not the weights were made channels-last for speed
        "state_dict": {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items()
        },
    }

    return atomic_write(path, lambda tmp: torch_save_file(payload, tmp), overwrite=overwrite)


def torch_save_file(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through memory, so that a failed write is the ``OSError`` it is.

    Saving straight to a file, torch reports a full disk as a ``RuntimeError`` ("unexpected pos ...");
    written from memory, the error keeps its errno and ``io_utils.atomic_write`` says "disk full".
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[DualHeadNet, CheckpointMeta]:
    """Safely load a napari-apl checkpoint; return ``(model in eval mode on map_location, meta)``.

    The file is always read onto the CPU; the model is then moved to the device ``map_location``.
    ``num_classes``, when given, is the class count the caller needs; a different one is an error.
    ``class_names``, when given, are the classes the caller needs in this order (e.g.
    ``labels.CLASS_NAMES``); other names or another order are an error.
    """
    p = _check_file(path)
    meta, state = _parse(p, _safe_load(p, "cpu"))
    _check_arch(p, meta)
    _check_classes(p, meta, state, len(class_names) if class_names is not None else num_classes)
    if class_names is not None:
        check_label_scheme(p, meta.class_names, class_names)
    model = _build(p, meta, state)
    _load_weights(p, model, state, strict=True)
    return _place(model, map_location), meta


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Safely read only the metadata of a napari-apl checkpoint."""
    p = _check_file(path)
    meta, _ = _parse(p, _safe_load(p, "cpu", mmap=True), need_weights=False)
    return meta


def _fmt_mapping(d: Mapping[str, Any]) -> str:
    """Return ``k=v, ...`` for a small mapping."""
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _fmt_bytes(n: int) -> str:
    """Return a human-readable file size."""
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def describe(
    source: str | os.PathLike | tuple[DualHeadNet, CheckpointMeta] | tuple[CheckpointMeta, DualHeadNet],
) -> str:
    """Return a multi-line human summary of a checkpoint file or of a ``(model, meta)`` pair."""
    file_line = "file: (not saved)"
    if isinstance(source, (str, os.PathLike)):
        p = _check_file(source)
        model, meta = load_checkpoint(p)
        file_line = f"file: {p} ({_fmt_bytes(p.stat().st_size)})"
    elif isinstance(source, tuple) and len(source) == 2:
        model, meta = source if isinstance(source[0], DualHeadNet) else source[::-1]
        if not isinstance(model, DualHeadNet) or not isinstance(meta, CheckpointMeta):
            raise CheckpointError("describe needs a checkpoint path or a (model, CheckpointMeta) pair")
    else:
        raise CheckpointError("describe needs a checkpoint path or a (model, CheckpointMeta) pair")
    counts = model.parameter_counts()
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(meta.class_names))
    lines = [
        f"architecture: {meta.arch} ({_fmt_mapping(model.arch_args)})",
        f"parameters: {counts['total']:,} "
        f"(encoder {counts['encoder']:,} / classifiers {counts['classifiers']:,})",
        f"classes ({meta.num_classes}): {classes}",
        f"input size: {meta.input_size[0]} x {meta.input_size[1]} px",
        f"spacing: {meta.spacing[0]:g} x {meta.spacing[1]:g} mm",
        f"normalization: {_fmt_normalization(meta.normalization)}",
    ]
    if meta.provenance:
        lines.append("provenance:")
        lines += [
            f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in meta.provenance.items()
        ]
    else:
        lines.append("provenance: (none recorded)")
    lines += [f"format version: {meta.format_version}", file_line]
    # the file's own text, shown as text: a newline or a terminal control sequence in a name or in the
    # provenance could otherwise forge or hide lines of this summary
    return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """``text`` with every non-printable character (newline, escape, ...) written as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


CLI_REFINEMENT_KEYS = ("refined_from", "method", "iterations", "target", "refined_at")
"""What ``napari-apl refine`` records of its refinement at the top of a refined model's provenance."""


def refinement_history(provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The refinements a model's provenance records, oldest first.

    The command line keeps its refinement at the top (``refined_from``, ...) and the ones before it under
    ``earlier_refinements``; the widget keeps its refinement under ``refined`` and the ones before under
    ``refined["earlier"]``. Each writes the whole history it was given, so when both are present the
    one written last (the later ``refined_at``) holds all of it.
    """
    cli = widget = None
    if "refined_from" in provenance:
        earlier = [dict(r) for r in provenance.get("earlier_refinements", []) if isinstance(r, Mapping)]
        cli = [*earlier, {k: provenance[k] for k in CLI_REFINEMENT_KEYS if k in provenance}]
    rec = provenance.get("refined")
    if isinstance(rec, Mapping):
        earlier = [dict(r) for r in rec.get("earlier", []) if isinstance(r, Mapping)]
        widget = [*earlier, {k: v for k, v in rec.items() if k not in ("earlier", "in_progress")}]
    if cli and widget:
        cli_newer = str(provenance.get("refined_at") or "") >= str(rec.get("refined_at") or "")
        return cli if cli_newer else widget
    return cli or widget or []


def _fmt_normalization(norm: Mapping[str, Any]) -> str:
    """A normalisation recipe as one line: its kind and the settings that kind reads."""
    from .preprocess import USED_FIELDS

    kind = norm.get("kind")
    used = USED_FIELDS.get(str(kind))
    shown = {k: v for k, v in norm.items() if k != "kind" and (used is None or k in used)}
    return f"{kind}" + (f" ({_fmt_mapping(shown)})" if shown else "")


def _unwrap_raw(path: Path, obj: Any, accept_checkpoint: bool = True) -> dict[str, torch.Tensor]:
    """Return the tensors of a raw state-dict file (napari-apl, wrapped or DataParallel forms)."""
    if isinstance(obj, Mapping) and FORMAT_KEY in obj:
        if not accept_checkpoint:
            raise CheckpointError(
                f"{path} is a napari-apl checkpoint already, with its own input size, spacing and "
                "intensities (napari-apl info shows them): use it as it is; import wraps raw state dicts"
            )
        return _parse(path, obj)[1]
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(state) != len(obj):
        bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        raise CheckpointError(f"{path} is not a plain state dict: {_names(bad)} are not tensors")
    _check_dense(path, state)
    for prefix in ("module.", "Scale."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def import_state_dict(
    raw_path: str | os.PathLike, meta: CheckpointMeta, *, strict: bool = True, accept_checkpoint: bool = True
) -> DualHeadNet:
    """Safely load a raw state dict (e.g. an ADVENT DeepLabv2 ``.pth``) into the model ``meta`` describes.

    A ``module.`` (DataParallel) prefix and a top-level ``{"state_dict": ...}`` wrapper are accepted;
    ``num_batches_tracked`` buffers may be absent. With ``strict=False`` tensors that do not fit by
    name or shape are skipped with a warning (e.g. a 21-class ImageNet/VOC head). A ``unet-dual``
    whose ``arch_args`` give no ``base`` takes the width of the file's first convolution (written into
    ``meta.arch_args``, so the saved checkpoint records it). A napari-apl checkpoint is read for its
    weights too, unless ``accept_checkpoint`` is false (the ``import`` command: its metadata would be lost).
    """
    if not isinstance(meta, CheckpointMeta):
        raise CheckpointError(f"cannot import {raw_path}: meta must be a CheckpointMeta")
    p = _check_file(raw_path)
    state = _unwrap_raw(p, _safe_load(p, "cpu"), accept_checkpoint)
    _check_arch(p, meta)
    first = state.get("inc.0.weight")
    if meta.arch == "unet-dual" and "base" not in meta.arch_args and isinstance(first, torch.Tensor):
        if first.ndim == 4:  # the width of a U-Net is its first convolution's output channels
            meta.arch_args["base"] = int(first.shape[0])
            meta.arch_args.setdefault("in_channels", int(first.shape[1]))
    try:
        check_one_channel(meta.arch_args)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    _check_classes(p, meta, state if strict else None, None)
    model = _build(p, meta, state, strict=strict)
    skipped = _load_weights(p, model, state, strict=strict)
    if skipped:
        warnings.warn(
            f"{p}: {len(skipped)} tensors did not fit {meta.arch} and were left at their initial values: "
            f"{_names(skipped)}",
            stacklevel=2,
        )
    return model.eval()
