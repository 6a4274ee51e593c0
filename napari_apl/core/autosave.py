"""Crash recovery: periodic, atomic autosave of painted corrections and of the latest refined model.

Each image gets one folder under the autosave root (default: the user cache dir
``napari-apl/autosave``; override with the environment variable ``NAPARI_APL_AUTOSAVE_DIR``), named
``<image stem>-<key>`` where the key hashes the image path, its canonical shape and affine::

    <root>/<stem>-<key>/manifest.json        what is saved, when, for which image and checkpoint
                        corrections-<n>.npz  int16 canonical volume, -1 where nothing was painted
                        model-<n>.pt         the latest refined model (a normal napari-apl checkpoint)

A live session holds its folder (``.lock``, an advisory ``flock`` the system drops when the process
ends, crash included): a second session of the same image, in another viewer or process, saves into
``<stem>-<key>-2`` (and so on) instead, so two sessions never mix or delete each other's files, and a
held folder is neither offered for recovery (``AutosaveEntry.in_use``) nor discarded.

Every file goes through ``io_utils.atomic_write``. The data files of a snapshot get a new sequence
number ``<n>`` and are written first; the manifest is replaced last and is the commit point, so a
crash at any moment leaves the previous complete snapshot or the new one, never a mix. Files of older
snapshots are removed only after the new manifest is in place. Only files this module created inside
the autosave root are ever deleted; the user's images and checkpoints are only read.

Reading an autosave treats it as untrusted input like any other file: the manifest size is limited,
the corrections' array header (shape, dtype) is checked before anything is allocated, pickles are never
loaded (``allow_pickle=False``) and the model goes through ``checkpoint.load_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import APLError
from .io_utils import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: sessions of one process are still kept apart
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AUTOSAVE_DIR_ENV",
    "AutosaveEntry",
    "AutosaveError",
    "Autosaver",
    "default_root",
    "discard",
    "find_autosaves",
    "image_digest",
    "in_use",
    "restore",
    "session_key",
]

AUTOSAVE_DIR_ENV = "NAPARI_APL_AUTOSAVE_DIR"
MANIFEST = "manifest.json"
FORMAT_KEY = "napari_apl_autosave"
FORMAT_VERSION = 1
DEFAULT_INTERVAL_S = 120.0
_MAX_MANIFEST_BYTES = 1024 * 1024
_CORR_KEY = "corrections"
_DATA_FILE = re.compile(r"^(corrections-\d+\.npz|model-\d+\.pt)$")
_STALE_TEMP_S = 600.0
_TEMP_FILE = re.compile(r"^\.(corrections-\d+\.npz|model-\d+\.pt|manifest\.json)\..*\.tmp")
LOCK_FILE = ".lock"
_MAX_SESSIONS = 32  # folders per image: <stem>-<key>, <stem>-<key>-2, ...
_HOLD_TRIES = 5  # attempts to lock a folder (another process's probe holds a shared lock for microseconds)


class AutosaveError(APLError):
    """An autosave cannot be written, read or removed."""


def default_root() -> Path:
    """Return the autosave root: ``$NAPARI_APL_AUTOSAVE_DIR`` or the user cache ``napari-apl/autosave``."""
    env = os.environ.get(AUTOSAVE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("napari-apl", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs comes with napari
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-apl"
    return (base / "autosave").absolute()


def _root(root: str | os.PathLike | None) -> Path:
    """Return ``root`` as an absolute path (the default root when ``None``)."""
    return default_root() if root is None else Path(root).expanduser().absolute()


# -- identity of an image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """What an autosave is keyed on: the image's path (or name), canonical shape and affine."""

    path: str | None
    name: str
    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]

    @property
    def key(self) -> str:
        """A short stable hash of path/name, shape and affine."""
        ident = self.path if self.path is not None else f"<memory>:{self.name}"
        text = json.dumps([ident, list(self.shape), [list(r) for r in self.affine]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def folder_name(self) -> str:
        """The session folder name ``<safe stem>-<key>``."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)[:40].strip("._") or "image"
        return f"{stem}-{self.key}"


def _identity(image: Any) -> _Identity:
    """Describe a ``Volume`` or an image path (read lazily, header only) as an ``_Identity``."""
    from .volume import Volume, load_volume

    if isinstance(image, (str, os.PathLike)):
        image = load_volume(image, lazy=True)
    if not isinstance(image, Volume):
        raise AutosaveError(f"autosave needs a Volume or an image path, got {type(image).__name__}")
    path = str(Path(image.path).expanduser().resolve()) if image.path is not None else None
    affine = np.asarray(image.affine, dtype=np.float64)
    rounded = tuple(tuple(round(float(v), 4) + 0.0 for v in row) for row in affine)
    return _Identity(path=path, name=image.name, shape=tuple(image.shape), affine=rounded)


def image_digest(image: Any) -> str | None:
    """A hash of a regular sample of an in-memory image's voxels (``None`` for a lazily read one).

    It tells a scan from another one stored under the same path on the same grid. Lazily read volumes
    (dask, over 1 GiB) get none: sampling them would read the whole file.
    """
    from .volume import Volume

    data = image.data if isinstance(image, Volume) else image
    if not isinstance(data, np.ndarray) or data.ndim != 3 or (data.size > 1 and 0 in data.strides):
        return None  # lazy, or a geometry's stand-in without voxels
    sample = np.ascontiguousarray(data[::5, ::5, ::3])
    h = hashlib.blake2b(digest_size=16)
    h.update(str((sample.dtype.str, sample.shape)).encode())
    h.update(sample.data)
    return h.hexdigest()


def session_key(image: Any) -> str:
    """Return the autosave key of an image (a ``Volume`` or a path): a hash of path, shape and affine."""
    return _identity(image).key


# -- entries --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutosaveEntry:
    """One recoverable session found under the autosave root."""

    folder: Path
    root: Path
    key: str
    saved_at: float
    image_path: str | None
    image_name: str
    shape: tuple[int, int, int]
    checkpoint: str | None
    iteration: int | None
    corrections_file: str | None
    model_file: str | None
    painted_voxels: int
    manifest: dict[str, Any] = field(repr=False, compare=False)
    image_digest: str | None = None
    """``image_digest`` of the image when it was saved (``None``: not recorded)."""
    in_use: bool = False
    """Whether a live session (this process's or another's) holds the folder: not a crashed one."""

    def matches(self, digest: str | None) -> bool:
        """Whether a scan whose ``image_digest`` is ``digest`` may be the one this session was saved from."""
        return self.image_digest is None or digest is None or digest == self.image_digest

    @property
    def has_corrections(self) -> bool:
        """Whether painted corrections were saved."""
        return self.corrections_file is not None

    @property
    def has_model(self) -> bool:
        """Whether a refined model was saved."""
        return self.model_file is not None

    def summary(self) -> str:
        """Return a one-line description for a recovery dialog."""
        parts = [self.image_name]
        if self.has_corrections:
            parts.append(f"{self.painted_voxels} corrected voxels")
        if self.has_model:
            parts.append(
                "refined model" + (f" at iteration {self.iteration}" if self.iteration is not None else "")
            )
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
        return ", ".join(parts) + f" (saved {when})"


# -- which session holds a folder ------------------------------------------------------------------------

_HELD: dict[str, int] = {}  # folder -> the descriptor of its lock file, for the savers of this process
_HELD_GUARD = threading.Lock()


def _in_use(folder: Path) -> bool:
    """Whether a live session (a saver of this process, or another process) holds ``folder``."""
    with _HELD_GUARD:
        if str(folder) in _HELD:
            return True
    if fcntl is None:
        return False
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # never locked (or unreadable: then nobody can hold it either)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: only this process's savers are known
        return False
    finally:
        os.close(fd)  # (also drops the shared lock just taken)
    return False


def _hold(folder: Path) -> int | None:
    """Lock ``folder`` (which exists) for a saver: the lock file's descriptor, or ``None`` if held."""
    key = str(folder)
    with _HELD_GUARD:
        if key in _HELD:
            return None
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            for attempt in range(_HOLD_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # held, or probed for a moment by ``_in_use`` elsewhere: retry
                    if attempt == _HOLD_TRIES - 1:
                        os.close(fd)
                        return None
                    time.sleep(0.002)
                except OSError:  # a file system without locks: keep this process's sessions apart at least
                    break
        _HELD[key] = fd
        return fd


def _let_go(folder: Path, fd: int | None) -> None:
    """Release a folder this process holds (closing the descriptor drops the system's lock)."""
    if fd is None:
        return
    with _HELD_GUARD:
        if _HELD.get(str(folder)) == fd:
            del _HELD[str(folder)]
            try:
                os.close(fd)
            except OSError:
                pass


def _snapshot_id(folder: Path) -> tuple[float, int] | None:
    """Which session wrote the snapshot in ``folder`` (its saver's creation time and process), or
    ``None`` when there is none (or it cannot be read)."""
    try:
        data = _read_manifest(folder)
    except AutosaveError:
        return None
    created, pid = data.get("created_at"), data.get("pid")
    if isinstance(created, bool) or not isinstance(created, (int, float)) or _int_or_none(pid) is None:
        return (0.0, -1)  # (an older manifest: some session, not this one)
    return (float(created), int(pid))


def _let_go_all(held: dict[Path, int]) -> None:
    """Release every folder of a saver's ``held`` map (and empty it)."""
    for folder, fd in list(held.items()):
        _let_go(folder, fd)
    held.clear()


def in_use(entry: AutosaveEntry) -> bool:
    """Whether a live session holds ``entry``'s folder now (it may have been taken since it was listed)."""
    return _in_use(Path(entry.folder))


def _write_failure(folder: Path, exc: BaseException) -> str:
    """Say why writing into ``folder`` failed, in words (torch reports a full disk cryptically)."""
    import shutil

    try:
        if shutil.disk_usage(folder).free < 16 * 1024**2:
            return f"the disk of {folder} is full"
    except OSError:
        pass
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _bad(folder: Path, what: str) -> AutosaveError:
    """The error for a damaged autosave folder."""
    return AutosaveError(f"autosave {folder} is damaged ({what}): discard it")


def _int_or_none(value: Any) -> int | None:
    """Return ``value`` if it is a plain int, else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json`` (size-limited, plain JSON)."""
    path = folder / MANIFEST
    try:
        if path.is_symlink() or not path.is_file():
            raise _bad(folder, "no manifest")
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise _bad(folder, "manifest too large")
        data = json.loads(path.read_text(encoding="utf-8"))
    except AutosaveError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(folder, f"unreadable manifest: {type(exc).__name__}") from None
    if not isinstance(data, dict) or data.get(FORMAT_KEY) != FORMAT_VERSION:
        raise _bad(folder, "not a napari-apl autosave manifest")
    shape = data.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(_int_or_none(s) is not None and s > 0 for s in shape)
    ):
        raise _bad(folder, "bad shape in manifest")
    saved_at = data.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)) or not math.isfinite(saved_at):
        raise _bad(folder, "bad time in manifest")
    if not isinstance(data.get("key"), str):
        raise _bad(folder, "no key in manifest")
    for name in ("corrections", "model"):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not _DATA_FILE.match(value)):
            raise _bad(folder, f"bad {name} file name in manifest")
    for name in ("image_path", "image_name", "checkpoint"):
        if data.get(name) is not None and not isinstance(data.get(name), str):
            raise _bad(folder, f"bad {name} in manifest")
    return data


def _entry(folder: Path, root: Path, data: dict[str, Any]) -> AutosaveEntry:
    """Build an ``AutosaveEntry`` from a validated manifest."""
    return AutosaveEntry(
        folder=folder,
        root=root,
        key=data["key"],
        saved_at=float(data["saved_at"]),
        image_path=data.get("image_path"),
        image_name=data.get("image_name") or "image",
        shape=tuple(int(s) for s in data["shape"]),  # type: ignore[arg-type]
        checkpoint=data.get("checkpoint"),
        iteration=_int_or_none(data.get("iteration")),
        corrections_file=data.get("corrections"),
        model_file=data.get("model"),
        painted_voxels=_int_or_none(data.get("painted_voxels")) or 0,
        manifest=data,
        image_digest=data["image_digest"] if isinstance(data.get("image_digest"), str) else None,
        in_use=_in_use(folder),
    )


def find_autosaves(image: Any = None, *, root: str | os.PathLike | None = None) -> list[AutosaveEntry]:
    """List recoverable sessions, newest first: all of them, or those of ``image`` (a Volume or path).

    Damaged or foreign folders under the root are skipped.
    """
    base = _root(root)
    key = session_key(image) if image is not None else None
    if not base.is_dir():
        return []
    entries = []
    for folder in sorted(base.iterdir()):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            data = _read_manifest(folder)
        except AutosaveError:
            continue
        if key is not None and data["key"] != key:
            continue
        entries.append(_entry(folder, base, data))
    entries.sort(key=lambda e: e.saved_at, reverse=True)
    return entries


def _load_corrections(folder: Path, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Load a corrections ``.npz``, checking its array header (shape, dtype) before reading the data."""
    path = folder / name
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            if members != [f"{_CORR_KEY}.npy"]:
                raise _bad(folder, f"unexpected members in {name}")
            with zf.open(members[0]) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    hshape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    hshape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise _bad(folder, f"unsupported array format in {name}")
                if tuple(hshape) != tuple(shape) or np.dtype(dtype) != np.dtype("<i2") or dtype.hasobject:
                    raise _bad(folder, f"{name} holds {dtype} {tuple(hshape)}, expected int16 {tuple(shape)}")
        with np.load(path, allow_pickle=False) as npz:
            arr = np.array(npz[_CORR_KEY], dtype=np.int16, copy=True)
    except AutosaveError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as exc:
        raise _bad(folder, f"unreadable {name}: {type(exc).__name__}") from None
    if arr.shape != tuple(shape) or arr.min(initial=-1) < -1:
        raise _bad(folder, f"bad values in {name}")
    return arr


def restore(
    entry: AutosaveEntry, *, map_location: str = "cpu", damaged: list[str] | None = None
) -> tuple[np.ndarray | None, Any, Any]:
    """Reopen a session: return ``(corrections, model, meta)``; missing parts are ``None``.

    ``corrections`` is the int16 canonical volume (-1 = not painted), ``model``/``meta`` the refined
    ``DualHeadNet`` and its ``CheckpointMeta``. The latest manifest of the folder is read again. A
    damaged part raises ``AutosaveError``; with a ``damaged`` list, the message goes there instead, that
    part is ``None`` and the intact one is still returned (a truncated model must not lose the painting).
    """
    from .checkpoint import load_checkpoint
    from .errors import CheckpointError

    folder = Path(entry.folder)
    data = _read_manifest(folder)
    shape = tuple(int(s) for s in data["shape"])
    corrections = None
    if data.get("corrections"):
        try:
            corrections = _load_corrections(folder, data["corrections"], shape)  # type: ignore[arg-type]
        except AutosaveError as exc:
            if damaged is None:
                raise
            damaged.append(str(exc))
    model = meta = None
    if data.get("model"):
        try:
            model, meta = load_checkpoint(folder / data["model"], map_location=map_location)
        except CheckpointError as exc:
            if damaged is None:
                raise _bad(folder, f"model: {exc}") from None
            damaged.append(str(_bad(folder, f"model: {exc}")))
    return corrections, model, meta


def _inside(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is a direct, real (not symlinked) child of ``root``."""
    try:
        return folder.parent.resolve() == root.resolve() and not folder.is_symlink()
    except OSError:
        return False


def _remove_own_files(folder: Path, keep: set[str], *, temp_age_s: float | None = None) -> None:
    """Delete our data files in ``folder`` except ``keep``, and our temp files older than ``temp_age_s``."""
    age = _STALE_TEMP_S if temp_age_s is None else temp_age_s
    now = time.time()
    for child in folder.iterdir():
        if child.name in keep or child.is_symlink() or not child.is_file():
            continue
        try:
            if _DATA_FILE.match(child.name) or (
                _TEMP_FILE.match(child.name) and now - child.stat().st_mtime >= age
            ):
                child.unlink()
        except FileNotFoundError:
            pass


def discard(entry: AutosaveEntry) -> None:
    """Delete an autosave (only files this module wrote; the folder goes when it is then empty).

    A folder a live session holds is refused: it is that session's, not a crashed one.
    """
    folder, root = Path(entry.folder), Path(entry.root)
    if not _inside(folder, root) or not (folder / MANIFEST).is_file():
        raise AutosaveError(f"{folder} is not an autosave folder under {root}: nothing was deleted")
    if _in_use(folder):
        raise AutosaveError(
            f"the autosave {folder.name} belongs to a session still open (another viewer or process): "
            "close that session first"
        )
    _remove_folder(folder)


def _remove_folder(folder: Path, *, let_go: Callable[[], None] | None = None) -> None:
    """Delete our files (manifest last) in ``folder``, release it (``let_go``: this process holds it),
    then delete the lock file unless another session holds it, and the folder if it is empty."""
    try:
        try:
            _remove_own_files(folder, keep=set(), temp_age_s=0.0)
            (folder / MANIFEST).unlink(missing_ok=True)
        finally:
            if let_go is not None:  # (an open file cannot be deleted on Windows: released first)
                let_go()
        if not _in_use(folder):
            (folder / LOCK_FILE).unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError as exc:
        raise AutosaveError(f"cannot remove autosave {folder}: {exc.strerror or exc}") from None


# -- writing --------------------------------------------------------------------------------------------


def _digest_array(arr: np.ndarray) -> str:
    """A content hash of an array (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _digest_model(model: Any) -> str:
    """A content hash of a model's state dict."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Autosaver:
    """Autosave of one image's session: ``maybe_save`` at most every ``interval`` seconds, ``save`` now.

    Arguments left out of a save (``None``) keep what this saver's previous snapshot holds; pass an all
    ``-1`` corrections array to clear them. Offer recovery (``find_autosaves``/``restore``) before
    creating a saver: its first save replaces an older snapshot of the same image, unless ``resume``
    (the session was recovered) and that snapshot is of the same voxels (``digest``): then what a
    save leaves out stays as that snapshot had it. Thread-safe: the refinement worker and the viewer
    may both call it.
    """

    def __init__(
        self,
        image: Any,
        *,
        checkpoint: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        digest: str | None = None,
        resume: bool = False,
        display_name: str | None = None,
        folder: str | os.PathLike | None = None,
    ) -> None:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval >= 0):
            raise AutosaveError(f"autosave interval must be a number of seconds >= 0, got {interval!r}")
        self._id = _identity(image)
        # what a recovery offer calls the image (e.g. the layer's name of a scan held only in memory)
        self._display_name = str(display_name) if display_name else self._id.name
        # ``digest``: the voxels' ``image_digest`` when ``image`` is a stand-in without them
        self._image_digest = digest or (
            image_digest(image) if not isinstance(image, (str, os.PathLike)) else None
        )
        self.root = _root(root)
        # the folders this saver holds (its own, and one it left for a recovered session's until its next
        # save): released by ``close``, or when the saver is collected
        self._held: dict[Path, int] = {}
        weakref.finalize(self, _let_go_all, self._held)
        self._retired: Path | None = None
        preferred = Path(folder).expanduser().absolute() if folder is not None else None
        self.folder = self._choose(preferred)
        if preferred is not None and self.folder != preferred:
            resume = False  # its own folder is another session's now: what the chosen one holds is not its
        self.checkpoint = str(Path(checkpoint).expanduser().resolve()) if checkpoint is not None else None
        self.interval = float(interval)
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        self._seq = 0
        self._state: dict[str, Any] = {}
        self._created = time.time()
        self._resume = resume
        self._load_older()

    def _candidates(self) -> list[Path]:
        """The folders this image's sessions may use, in order: ``<stem>-<key>``, ``<stem>-<key>-2``, ..."""
        base = self._id.folder_name
        return [self.root / base, *(self.root / f"{base}-{i}" for i in range(2, _MAX_SESSIONS + 1))]

    def _choose(self, preferred: Path | None) -> Path:
        """The folder to save into: ``preferred`` (this session's or a recovered one's) if free, else the
        first one not held; when ``preferred`` was taken, the first that holds no crashed session."""
        candidates = self._candidates()
        if preferred is None:
            return next((c for c in candidates if not _in_use(c)), candidates[0])
        if preferred in candidates and not _in_use(preferred):
            return preferred
        return self._free_folder(candidates)

    @staticmethod
    def _free_folder(candidates: list[Path]) -> Path:
        """The first candidate no live session holds and no snapshot is in, else the first not held."""
        free = [c for c in candidates if not _in_use(c)]
        return next((c for c in free if not (c / MANIFEST).exists()), free[0] if free else candidates[0])

    def _load_older(self) -> None:
        """Read the snapshot already in ``self.folder``: it stays until our first save commits. It is the
        one snapshot not written by this saver that it may replace (``_known``): the caller could offer it
        for recovery before creating the saver; a snapshot saved there later was never offered."""
        self._seq, self._state = 0, {}
        self._known = _snapshot_id(self.folder)
        if not (self.folder / MANIFEST).is_file():
            return
        try:
            older = _read_manifest(self.folder)
        except AutosaveError:
            return
        if older.get("key") != self._id.key:
            return
        self._seq = _int_or_none(older.get("seq")) or 0
        same_scan = not (
            isinstance(older.get("image_digest"), str)
            and self._image_digest is not None
            and older["image_digest"] != self._image_digest
        )
        if self._resume and same_scan:  # a session carried on (recovered): a partial save keeps the rest
            keys = ("corrections", "corrections_digest", "painted_voxels", "model", "model_digest")
            self._state = {k: older[k] for k in (*keys, "iteration") if older.get(k) is not None}

    def _hold_folder(self) -> None:
        """Make sure this saver holds its folder, moving to the next free one if a live session has it."""
        if self.folder in self._held:
            return
        # (a folder with another session's snapshot is passed over below: it is that session's)
        tried = [self.folder, *(c for c in self._candidates() if c != self.folder)]
        for folder in tried:
            try:
                folder.mkdir(exist_ok=True, mode=0o700)
                fd = _hold(folder)
            except OSError as exc:
                raise AutosaveError(
                    f"cannot create the autosave folder {folder}: {exc.strerror or exc}; "
                    f"set {AUTOSAVE_DIR_ENV} to a writable folder"
                ) from None
            if fd is None:
                continue  # another open session's
            current = _snapshot_id(folder)
            mine = current in (None, self._own_id()) or (folder == self.folder and current == self._known)
            if not mine:  # a session saved here after this saver looked, then ended: it is offered, not ours
                _let_go(folder, fd)
                continue
            self._held[folder] = fd
            if folder != self.folder:  # (taken meanwhile by a session opened after this saver)
                self.folder, self._resume = folder, False
                self._load_older()
            return
        raise AutosaveError(
            f"{len(tried)} sessions of {self._id.name} are open: close one to autosave this one"
        )

    @property
    def digest(self) -> str | None:
        """The ``image_digest`` of the scan this saver saves (``None``: not known, e.g. read lazily)."""
        return self._image_digest

    def holds(self, folder: str | os.PathLike) -> bool:
        """Whether this saver holds ``folder`` (it saved there, or carries that session on)."""
        return Path(folder) in self._held

    def _own_id(self) -> tuple[float, int]:
        """What this saver's manifests record as theirs (``_snapshot_id``)."""
        return (self._created, os.getpid())

    def _may_remove(self) -> bool:
        """Whether the snapshot in ``self.folder`` is this session's to delete (its own or the one it
        carries on or was created over), not another session's."""
        return _snapshot_id(self.folder) in (None, self._own_id(), self._known)

    def adopt(self, entry: AutosaveEntry, *, keep_model: bool = True, keep_corrections: bool = True) -> None:
        """Carry on the recovered session ``entry`` in its own folder (this saver's earlier snapshot, if it
        wrote one, is removed after the next save: the recovered session now holds that work too).

        ``keep_model`` / ``keep_corrections`` False: that part of the snapshot (found damaged) is not
        carried on: the next save leaves it out unless it is given again.
        """
        folder = Path(entry.folder)
        with self._lock:
            if entry.key != self._id.key:
                raise AutosaveError(f"the autosave is of {entry.image_name}, not of {self._id.name}")
            if folder not in self._held:  # held at once: no other viewer may offer or discard it now
                fd = _hold(folder) if folder in self._candidates() and folder.is_dir() else None
                if fd is None:
                    raise AutosaveError(f"the autosave {folder.name} is not one this session can carry on")
                self._held[folder] = fd
            if folder != self.folder:
                if self.folder in self._held:
                    self._retired = self.folder
                self.folder = folder
            self._resume = True
            self._load_older()
            dropped = (() if keep_model else ("model", "model_digest", "iteration")) + (
                () if keep_corrections else ("corrections", "corrections_digest", "painted_voxels")
            )
            for key in dropped:
                self._state.pop(key, None)

    def close(self) -> None:
        """Let the folder go (the session ends): another viewer may then recover it. A later save holds
        a folder again."""
        with self._lock:
            _let_go_all(self._held)
            self._retired = None

    @property
    def key(self) -> str:
        """The session key (hash of image path, shape and affine)."""
        return self._id.key

    def due(self) -> bool:
        """Whether ``interval`` seconds passed since the last save (or since creation)."""
        return self._clock() - self._last >= self.interval

    def maybe_save(
        self,
        corrections: Any = None,
        model: Any = None,
        meta: Any = None,
        *,
        iteration: int | None = None,
        force: bool = False,
    ) -> AutosaveEntry | None:
        """Save when the interval has passed (or ``force``); return the entry, or ``None`` when not due."""
        if not force and not self.due():
            return None
        return self.save(corrections, model, meta, iteration=iteration)

    def _check_corrections(self, corrections: Any) -> np.ndarray:
        """Return corrections as a C-contiguous int16 copy on this image's canonical grid."""
        arr = np.asarray(corrections)
        if arr.shape != self._id.shape:
            raise AutosaveError(
                f"corrections have shape {arr.shape} but the image has {self._id.shape}: "
                "autosave the corrections layer of this image"
            )
        if arr.dtype.kind not in "iu":
            raise AutosaveError(f"corrections must be integer labels, got {arr.dtype}")
        if arr.size and (int(arr.min()) < -1 or int(arr.max()) > np.iinfo(np.int16).max):
            raise AutosaveError("corrections must be -1 (not painted) or a label in 0..32767")
        return np.array(arr, dtype=np.int16, order="C", copy=True)

    def save(
        self, corrections: Any = None, model: Any = None, meta: Any = None, *, iteration: int | None = None
    ) -> AutosaveEntry:
        """Write a snapshot now (data files first, the manifest last) and return its entry."""
        from .checkpoint import save_checkpoint

        if (model is None) != (meta is None):
            raise AutosaveError("autosave needs both the model and its CheckpointMeta (or neither)")
        corr = self._check_corrections(corrections) if corrections is not None else None
        with self._lock:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: may hold patient data
            except OSError as exc:
                raise AutosaveError(
                    f"cannot create the autosave folder {self.folder}: {exc.strerror or exc}; "
                    f"set {AUTOSAVE_DIR_ENV} to a writable folder"
                ) from None
            self._hold_folder()
            seq = self._seq + 1
            state = dict(self._state)
            if corr is not None:
                digest = _digest_array(corr)
                if digest != state.get("corrections_digest") or not state.get("corrections"):
                    name = f"corrections-{seq}.npz"

                    def write_npz(tmp: Path, arr: np.ndarray = corr) -> None:
                        with open(tmp, "wb") as fh:
                            np.savez_compressed(fh, **{_CORR_KEY: arr})

                    atomic_write(self.folder / name, write_npz, overwrite=True)
                    state.update(corrections=name, corrections_digest=digest)
                state["painted_voxels"] = int(np.count_nonzero(corr >= 0))
            model_error: str | None = None
            if model is not None:
                digest = _digest_model(model)
                if digest != state.get("model_digest") or not state.get("model"):
                    name = f"model-{seq}.pt"
                    try:
                        save_checkpoint(self.folder / name, model, meta, overwrite=True)
                        state.update(model=name, model_digest=digest)
                    except Exception as exc:  # the corrections are still committed below
                        model_error = _write_failure(self.folder, exc)
            if iteration is not None and model_error is None:  # the iteration of the model on disk
                state["iteration"] = int(iteration)
            manifest = self._commit(seq, state)
            if self._retired is not None:  # what it held is in the recovered session's snapshot now
                retired, self._retired = self._retired, None
                fd = self._held.pop(retired, None)
                try:
                    _remove_folder(retired, let_go=lambda: _let_go(retired, fd))
                except AutosaveError:
                    pass
                _let_go(retired, fd)
            if model_error is not None:
                raise AutosaveError(f"the refined model was not autosaved ({model_error}); corrections were")
            return _entry(self.folder, self.root, manifest)

    def _commit(self, seq: int, state: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest of snapshot ``seq`` (its data files are written) and drop older files."""
        now = time.time()
        manifest = {
            FORMAT_KEY: FORMAT_VERSION,
            "key": self._id.key,
            "seq": seq,
            "saved_at": now,
            "saved_at_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            "created_at": self._created,
            "image_path": self._id.path,
            "image_name": self._display_name,
            "image_digest": self._image_digest,
            "shape": list(self._id.shape),
            "affine": [list(r) for r in self._id.affine],
            "checkpoint": self.checkpoint,
            "iteration": state.get("iteration"),
            "corrections": state.get("corrections"),
            "corrections_digest": state.get("corrections_digest"),
            "painted_voxels": state.get("painted_voxels", 0),
            "model": state.get("model"),
            "model_digest": state.get("model_digest"),
            "pid": os.getpid(),
        }
        text = json.dumps(manifest, indent=1)
        atomic_write(
            self.folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True
        )
        self._seq, self._state, self._last = seq, state, self._clock()
        keep = {n for n in (state.get("corrections"), state.get("model")) if n}
        try:
            _remove_own_files(self.folder, keep)
        except OSError:  # old snapshots are only clutter: the new one is committed
            pass
        return manifest

    def drop_model(self, checkpoint: str | os.PathLike | None = None) -> None:
        """Forget the refined model of the last snapshot (the user discarded it), keeping its corrections;
        with ``checkpoint``, the session's model now comes from that file."""
        with self._lock:
            renamed = False
            if checkpoint is not None:
                named = str(Path(checkpoint).expanduser().resolve())
                renamed, self.checkpoint = named != self.checkpoint, named
            if not self._state or not (self._state.get("model") or renamed):
                return  # (nothing saved yet, or nothing to change)
            state = {k: v for k, v in self._state.items() if k not in ("model", "model_digest", "iteration")}
            self._commit(self._seq + 1, state)

    def discard(self) -> None:
        """Delete this session's autosave (after a clean export or when the user declines recovery)."""
        with self._lock:
            held = self.folder in self._held
            if not held and (_in_use(self.folder) or not self._may_remove()):
                self._seq, self._state = 0, {}
                return  # another session's (open, or ended without being offered to this one): not ours
            if (self.folder / MANIFEST).is_file() or held:
                if not _inside(self.folder, self.root):
                    raise AutosaveError(f"{self.folder} is not an autosave folder under {self.root}")
                folder, fd = self.folder, self._held.pop(self.folder, None)
                try:
                    _remove_folder(folder, let_go=lambda: _let_go(folder, fd))
                finally:
                    _let_go(folder, fd)
            elif self.folder.is_dir() and not _in_use(self.folder):  # orphans of a killed save
                _remove_own_files(self.folder, keep=set(), temp_age_s=0.0)
            self._seq, self._state = 0, {}
