"""Atomic, non-destructive file writing used by every writer in the project."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import OutputError, OutputExistsError

T = TypeVar("T")


def _suffix(path: Path) -> str:
    """Return the full suffix of ``path`` (``.nii.gz`` stays one suffix)."""
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def _read_umask() -> int:
    """Return the process umask (read once at import: changing it later is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Validate an output path before any work starts; return it as an absolute ``Path``."""
    out = Path(path).expanduser().absolute()
    if out.is_symlink():  # (a dangling link is an existing entry too: ``exists()`` says no)
        if not overwrite:
            raise OutputExistsError(
                f"{out} exists already (a link): pass overwrite (--overwrite) to replace the file it names"
            )
        try:
            out = out.resolve()  # the link stays; the file it names is replaced
        except (OSError, RuntimeError) as exc:  # (a loop of links)
            raise OutputError(f"output {out} is a link that names no file: {exc}") from exc
    for src in inputs:
        if src is None:
            continue
        src_path = Path(src).expanduser()
        same = src_path.absolute() == out or src_path.resolve() == out.resolve()
        if not same and src_path.exists() and out.exists():
            same = os.path.samefile(src_path, out)
        if same:
            raise OutputError(f"output {out} is the same file as an input: choose another output path")
    if out.is_dir():
        raise OutputError(f"output {out} is a folder: give a file name")
    folder = out.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable: choose another folder")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists already: pass overwrite (--overwrite) to replace it")
    return out


def seek_target(pos: int, offset: int, whence: int, what: str) -> int:
    """The position a ``seek(offset, whence)`` from ``pos`` asks for, in a stream of unknown length."""
    if whence == io.SEEK_SET:
        return int(offset)
    if whence == io.SEEK_CUR:
        return int(pos + offset)
    raise io.UnsupportedOperation(f"{what} cannot seek from the end")


class _FixedBlocks(io.RawIOBase):
    """Passes what is written on to ``gz`` in blocks of exactly ``block`` bytes (the last one shorter).

    ISA-L's compressed bytes depend on how the input is split into writes; fixed blocks make a file's
    bytes depend on its content alone, whether it was streamed slice by slice or written at once.
    """

    def __init__(self, gz: IO[bytes], block: int = 1 << 20) -> None:
        super().__init__()
        self._gz = gz
        self._block = int(block)
        self._buf = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move forward by writing zeros, as gzip's writer does (nibabel seeks to the data offset)."""
        self._checkClosed()  # type: ignore[attr-defined]
        target = seek_target(self._pos, offset, whence, "a gzip writer")
        if target < self._pos:
            raise io.UnsupportedOperation("a gzip writer can only seek forward")
        if target > self._pos:
            self.write(bytes(target - self._pos))
        return self._pos

    def write(self, data: Any) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        view = memoryview(data).cast("B")
        n = len(view)
        self._pos += n
        if self._buf:
            take = min(n, self._block - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < self._block:
                return n
            self._gz.write(self._buf)
            self._buf = bytearray()
        whole = len(view) - len(view) % self._block
        for s in range(0, whole, self._block):
            self._gz.write(view[s : s + self._block])
        self._buf += view[whole:]
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._buf:
                self._gz.write(self._buf)
        finally:
            self._buf = bytearray()
            try:
                self._gz.close()
            finally:
                super().close()  # closed even when the last write failed (e.g. a full disk)


def gzip_writer(raw: IO[bytes]) -> IO[bytes]:
    """A gzip writer (level 1, no name or time stamp) over ``raw``; closing it leaves ``raw`` open.

    ISA-L's deflate (the ``isal`` package) when it is installed: the same format and about the same size as
    zlib's level 1, which nibabel writes, at a fifth to a tenth of its CPU time; zlib otherwise. Either
    receives the bytes in fixed blocks, so with the same library (and version) equal content gives equal
    files however it was written; ISA-L's and zlib's files differ in their bytes, not in their content.
    """
    try:
        from isal.igzip import IGzipFile
    except ImportError:  # isal is a dependency, but a --no-deps install may lack it
        import gzip

        return _FixedBlocks(gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0))
    return _FixedBlocks(IGzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0))


# errors of a file system that cannot make hard links (the no-overwrite publish then checks and renames)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished temporary file onto ``out`` (never over a file that appeared, unless ``overwrite``)."""
    appeared = f"{out} appeared while writing: move it away or pass overwrite to replace it"
    if overwrite:
        os.replace(tmp, out)
    else:
        try:  # a hard link is made only where no entry exists: no window between a check and the rename
            os.link(tmp, out)
        except FileExistsError:
            raise OutputExistsError(appeared) from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if out.exists() or out.is_symlink():
                raise OutputExistsError(appeared) from None
            os.replace(tmp, out)
        else:
            tmp.unlink()
    try:
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@dataclass
class _Stage:
    """Finished temporary files waiting to be renamed together."""

    pending: list[tuple[Path, Path, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("napari_apl_stage", default=None)


@contextlib.contextmanager
def staged_outputs() -> Iterator[Callable[[Callable[..., T]], Callable[..., T]]]:
    """Make every ``atomic_write`` in the block all-or-nothing: files appear only if the whole block succeeds.

    Inside the block each file is written and fsynced under a temporary name; at the end all are
    renamed in place; on any error every temporary file is removed and no output appears. Yields a
    ``bind(fn)`` helper that carries the staging into worker threads.
    """
    stage = _Stage()
    token = _STAGE.set(stage)

    def bind(fn: Callable[..., T]) -> Callable[..., T]:
        def run(*args: Any, **kwargs: Any) -> T:
            inner = _STAGE.set(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                _STAGE.reset(inner)

        return run

    try:
        yield bind
    except BaseException:
        for tmp, _, _ in stage.pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _STAGE.reset(token)
    _publish_all(stage.pending)


def _publish_all(pending: list[tuple[Path, Path, bool]]) -> None:
    """Rename staged temporaries onto their outputs, all or none: a refusal or failure undoes the new ones."""
    appeared = [out for _, out, overwrite in pending if not overwrite and (out.exists() or out.is_symlink())]
    if appeared:  # (a file made while the block ran) refused before anything is renamed
        for tmp, _, _ in pending:
            tmp.unlink(missing_ok=True)
        more = f" (and {len(appeared) - 1} more)" if len(appeared) > 1 else ""
        raise OutputExistsError(
            f"{appeared[0]}{more} appeared while writing: move it away or pass overwrite to replace it"
        )
    published: list[Path] = []  # outputs that did not exist before this block: removed again on failure
    replaced: list[tuple[Path, Path | None]] = []  # outputs replaced, and a link to their old file
    done = 0
    try:
        for tmp, out, overwrite in pending:
            existed = out.exists()
            if existed and overwrite:
                replaced.append((out, _link_aside(out)))
            _publish(tmp, out, overwrite)
            done += 1
            if not existed:
                published.append(out)
    except BaseException as exc:
        for tmp, _, _ in pending[done:]:
            tmp.unlink(missing_ok=True)
        for out in published:
            with contextlib.suppress(OSError):
                out.unlink()
        lost = []  # replaced files whose old version cannot come back
        for out, old in reversed(replaced):  # (newest first: an output written twice gets its first back)
            try:
                if old is None:
                    raise OSError(errno.ENOENT, "no link to the old file")
                os.replace(old, out)
            except OSError:
                if any(o == out for _, o, _ in pending[:done]):
                    lost.append(out.name)
            finally:  # (a rename between two links of one file does nothing: the aside link stays)
                if old is not None:
                    with contextlib.suppress(OSError):
                        old.unlink()
        if isinstance(exc, OSError):
            kept = (
                f"; replaced already: {', '.join(lost)}" if lost else "; the files that were there are kept"
            )
            raise OutputError(f"cannot finish writing the outputs: {exc.strerror or exc}{kept}") from exc
        raise
    for _, old in replaced:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()


def _link_aside(path: Path) -> Path | None:
    """A hidden hard link to ``path``'s file in its folder (its old version, if it is replaced and the
    block then fails), or ``None`` where the file system makes none."""
    for _ in range(8):
        aside = path.with_name(f".{path.name[:64]}.{os.urandom(4).hex()}.old")
        try:
            os.link(path, aside)
            return aside
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[Path], None],
    *,
    overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write a file through ``write_fn(tmp_path)`` to a temporary name, fsync, then rename it in place.

    A crash at any point leaves either the old file or the complete new one; an existing file is
    only replaced when ``overwrite`` is true.
    """
    out = check_output_path(path, overwrite=overwrite, inputs=inputs)
    try:  # (the name's start only: a name near the file system's limit leaves no room for more)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{out.name[:64]}.", suffix=".tmp" + _suffix(out), dir=out.parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes owner-only files: give the result the usual permissions (or the replaced file's)
        mode = out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        stage = _STAGE.get()
        if stage is not None:  # inside staged_outputs(): renamed together when the block succeeds
            with stage.lock:
                stage.pending.append((tmp, out, overwrite))
            return out
        _publish(tmp, out, overwrite)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {out}: free space and try again") from exc
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
