"""Many volumes at once: expand a folder or glob of volumes and run one task per volume on dask.distributed.

The task is any picklable function of one item (the CLI sends its own one-volume command, so a volume
processed here gives the files the one-volume command gives when run with the worker's torch thread
count: one per worker process by default; with another thread count PyTorch sums in another order, and
a confidence or consistency voxel may differ by one 1/255 step). By default the tasks run on a
``LocalCluster`` of worker *processes* (``n_workers`` processes, one thread each: each process runs
its own torch); with ``scheduler="tcp://host:8786"`` they run on an existing cluster, whose workers must
have napari-apl installed and see the same file paths (a shared file system). ``dask.distributed`` is
imported only when tasks are run.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import io
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import APLError, OutputError, OutputExistsError

__all__ = [
    "NIFTI_SUFFIXES",
    "TaskResult",
    "cluster_client",
    "done_folders",
    "expand_inputs",
    "is_many",
    "label_volumes",
    "output_dirs",
    "report_progress",
    "run_command_many",
    "run_many",
    "volume_name",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_GLOB_CHARS = set("*?[")


def volume_name(path: str | os.PathLike) -> str:
    """File name without its ``.nii``/``.nii.gz`` suffix (the per-volume output folder name)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    """Whether ``path`` is a file named like a NIfTI volume."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_hidden(path: Path) -> bool:
    """Whether ``path`` is a hidden file (a leftover ``.x.tmp.nii.gz`` or a macOS ``._x`` resource fork)."""
    return path.name.startswith(".")


def is_many(spec: str | os.PathLike) -> bool:
    """Whether an input names several volumes: a folder or a glob pattern (not one file)."""
    text = str(spec)
    return Path(text).expanduser().is_dir() or (bool(_GLOB_CHARS & set(text)) and not Path(text).exists())


def expand_inputs(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The volumes an input names, sorted: a file, a folder (its ``.nii``/``.nii.gz`` files) or a glob.

    Hidden files (names starting with ".") are skipped in folders and globs; a file named on its own
    is taken as given.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in specs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if _is_nifti(p) and not _is_hidden(p))
            if not matches:
                raise APLError(
                    f"folder {path} holds no .nii or .nii.gz volume: choose the folder of the scans"
                )
        elif path.exists() or not (_GLOB_CHARS & set(text)):
            matches = [path]  # one file: load_volume reports a missing or unreadable one
        else:
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [p for p in matches if _is_nifti(p) and not _is_hidden(p)]
            if not matches:
                raise APLError(f"pattern {text!r} matches no .nii or .nii.gz volume: check the pattern")
        found.extend(matches)
    unique = list(dict.fromkeys(p.absolute() for p in found))
    return unique


def _relative_name(image: Path, common: Path) -> str:
    """Output folder name of ``image`` from its path below ``common``: suffix dropped, "/" as "_"."""
    parts = image.relative_to(common).parts
    return "_".join([*parts[:-1], volume_name(parts[-1])])


def output_dirs(images: Sequence[Path], out_dir: str | os.PathLike) -> dict[Path, Path]:
    """Per-volume output folders ``out_dir/<volume name>``, named from the volumes' paths when names collide.

    When two volumes share a file name (``cases/case01/image.nii.gz``, ``cases/case02/image.nii.gz``),
    every folder is named from its volume's path below the deepest common parent of all the volumes
    (``out_dir/case01_image``, ``out_dir/case02_image``); volumes that still share a name are refused.
    """
    out = Path(out_dir).expanduser()
    names = [volume_name(image) for image in images]
    if len(set(names)) < len(names):
        absolute = [Path(image).expanduser().absolute() for image in images]
        try:
            common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
            names = [_relative_name(p, common) for p in absolute]
        except ValueError:  # no common parent (e.g. two drives): keep the file names, refused below
            pass
    dirs: dict[Path, Path] = {}
    seen: dict[str, Path] = {}
    for image, name in zip(images, names):
        if name in seen:
            raise OutputError(
                f"{seen[name]} and {image} would both write to {out / name}: "
                "give volumes with different file names (or run them separately)"
            )
        seen[name] = image
        dirs[image] = out / name
    return dirs


@dataclass
class TaskResult:
    """What one task did: its item, the value returned (or the error), its printed output and time."""

    item: Any
    value: Any = None
    error: str | None = None
    output: str = ""
    messages: str = ""  # what it wrote to stderr (notes and warnings)
    seconds: float = 0.0
    worker: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.error is None


REMOTE_STOP_WAIT_S = 30.0  # how long Ctrl-C waits for tasks running on a remote cluster to stop
# a task's progress goes to the client at most this often (its first and last step always)
PROGRESS_INTERVAL_S = 1.0
# inside a task run by run_many with on_progress: where report_progress sends a step
_PROGRESS: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "napari_apl_batch_progress", default=None
)


def report_progress(desc: str, done: int, total: int) -> None:
    """Tell the client of the batch this task belongs to how far it is (``done`` of ``total`` steps of
    ``desc``); does nothing outside a batch's task. Throttled to one message per ``PROGRESS_INTERVAL_S``."""
    hook = _PROGRESS.get()
    if hook is not None:
        hook(desc, int(done), int(total))


def _progress_sender(topic: str, tag: int) -> Callable[[str, int, int], None]:
    """A ``report_progress`` hook that sends steps as dask events of ``topic`` (from the worker running
    the task), at most one per ``PROGRESS_INTERVAL_S`` besides each task part's first and last step."""
    from distributed import get_worker

    worker = get_worker()
    last = {"t": 0.0, "desc": None}

    def send(desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        if desc == last["desc"] and done < total and now - last["t"] < PROGRESS_INTERVAL_S:
            return
        last["t"], last["desc"] = now, desc
        with contextlib.suppress(Exception):  # progress is a courtesy: never the task's failure
            worker.log_event(topic, {"tag": tag, "desc": desc, "done": done, "total": total})

    return send


STOPPED = "stopped: the run was interrupted"


class TaskStopped(BaseException):
    """Raised in a task's thread when its run is interrupted (a BaseException: no ``except Exception``
    inside the task swallows it, and its ``finally`` clean-ups run)."""


class _StopWatch:
    """Watches a run's dask ``Event`` from a helper thread and stops this task's thread when it is set.

    A task on a remote worker cannot be killed from the client; this makes it stop itself. The
    exception is delivered between two Python bytecodes of the task's thread (a torch call running in
    C finishes first); outputs are written atomically, so a stopped task leaves no partial file.
    """

    def __init__(self, name: str) -> None:
        from distributed import Event, get_client

        self._event = Event(name, client=get_client())
        self._tid = threading.get_ident()
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        threading.Thread(target=self._watch, name="napari-apl-stop-watch", daemon=True).start()

    def stopped_already(self) -> bool:
        """Whether the run was interrupted before this task started."""
        try:
            return bool(self._event.is_set())
        except Exception:  # the scheduler went away: nothing to watch
            return False

    def _watch(self) -> None:
        import ctypes

        while True:
            try:
                is_set = bool(self._event.wait(timeout=1.0))
            except Exception:  # the scheduler went away: nothing to watch
                return
            with self._lock:
                if self._done:
                    return
                if is_set:
                    self.fired = True
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(self._tid), ctypes.py_object(TaskStopped)
                    )
                    return

    def finish(self) -> None:
        """The task is over: stop watching, and drop a stop that was sent but not yet delivered."""
        import ctypes

        with self._lock:
            self._done = True
            if self.fired:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid), None)


def _run_task(
    fn: Callable[[Any], Any],
    item: Any,
    threads: int | None,
    stop_event: str | None = None,
    progress: tuple[str, int] | None = None,
) -> TaskResult:
    """Run one task in a worker, capturing what it prints and turning an error into a one-line message.

    With ``stop_event`` (the name of a dask ``Event``) the task stops, leaving no output, once the
    client sets that event (``TaskResult.error`` is then ``STOPPED``). With ``progress`` (a dask event
    topic and the task's index) what the task says through ``report_progress`` goes to the client.
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    buf, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    result = TaskResult(item=item, worker=f"pid {os.getpid()}")
    try:
        import dask

        watch = _StopWatch(stop_event) if stop_event else None
        try:
            if watch is not None and watch.stopped_already():
                raise TaskStopped
            # dask arrays inside the task (lazily read volumes) are computed in this worker, not sent
            # back to the cluster (whose threads are busy running tasks like this one)
            token = _PROGRESS.set(_progress_sender(*progress) if progress else None)
            try:
                with (
                    contextlib.redirect_stdout(buf),
                    contextlib.redirect_stderr(err),
                    dask.config.set(scheduler="synchronous"),
                ):
                    result.value = fn(item)
            finally:
                _PROGRESS.reset(token)
        finally:
            if watch is not None:
                watch.finish()
    except TaskStopped:
        result.error = STOPPED
    except APLError as exc:
        result.error = str(exc)
    except Exception as exc:  # report, do not kill the other volumes
        result.error = f"{type(exc).__name__}: {exc}"
        result.details["traceback"] = traceback.format_exc(limit=8)
    result.output, result.messages = buf.getvalue(), err.getvalue()
    result.seconds = time.perf_counter() - t0
    return result


def _ignore_sigint() -> int:
    """Make this (worker) process ignore Ctrl-C and return its pid; run on each worker of a local cluster."""
    import signal

    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return os.getpid()


async def _close_worker(dask_worker: Any) -> None:
    """End this worker process now, running tasks included (its nanny told first, so none restarts)."""
    from multiprocessing import util

    with contextlib.suppress(Exception):
        if dask_worker.nanny:
            await dask_worker.rpc(dask_worker.nanny).close_gracefully(reason="napari-apl interrupted")
    with contextlib.suppress(Exception):
        util._exit_function()  # multiprocessing's clean-up (its semaphores), as a normal exit runs it
    os._exit(0)  # not a normal exit: threads still running tasks would abort it


def _stop_workers(client: Any, pids: Sequence[int], wait: float = 3.0) -> None:
    """Stop a local cluster's worker processes now (on Ctrl-C): close them, terminate any still alive."""
    import signal

    with contextlib.suppress(Exception):
        client.run(_close_worker, wait=False)
    alive = list(pids)
    deadline = time.monotonic() + wait
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:  # this cluster's own worker processes
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _distributed() -> Any:
    """The ``distributed`` module; ``APLError`` in one line where it is missing (a --no-deps install)."""
    try:
        import distributed
    except ImportError:
        raise APLError(
            "running many volumes needs dask.distributed, which is not installed: pip install distributed"
        ) from None
    return distributed


SCHEDULER_TIMEOUT_S = 20


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, shortened to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _probe_scheduler(address: str, timeout: float) -> None:
    """Connect to ``address`` and ask its identity, all within ``timeout`` seconds; raise if that fails.

    A port that accepts the connection but is not a dask scheduler (its dashboard, a web or SSH server)
    otherwise holds the client in its handshake for ever, or has it read a banner as a message length.
    """
    import asyncio

    from distributed.comm import connect

    async def ask() -> None:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity"})
            reply = await comm.read()
        finally:
            comm.abort()
        if not (isinstance(reply, dict) and reply.get("type") == "Scheduler"):
            raise ValueError("the program there is not a dask scheduler")

    try:
        asyncio.run(asyncio.wait_for(ask(), timeout))
    except asyncio.TimeoutError:
        raise TimeoutError(f"no dask scheduler answered within {timeout:g} s") from None
    except MemoryError:  # (another protocol's greeting read as the length of a message)
        raise ValueError("the program there does not speak dask's protocol") from None


def reach_scheduler(address: str, then: Callable[[], Any] | None = None) -> Any:
    """Check that a dask scheduler answers at ``address`` (and return ``then()``); ``APLError`` in one
    line for whatever goes wrong: an address it cannot parse, a refused or silent port, another protocol."""
    try:
        _probe_scheduler(address, SCHEDULER_TIMEOUT_S)
        return then() if then is not None else None
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise APLError(
            f"cannot reach the dask scheduler at {address} ({_one_line(what)}): give its address as "
            "tcp://host:port (8786 by default, not the dashboard's), start it (dask scheduler) or leave "
            "out --scheduler for a local cluster"
        ) from None


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None, workers: int = 2, threads_per_worker: int = 1
) -> Iterator[Any]:
    """A dask.distributed ``Client``: to ``scheduler`` when given, else to a new local process cluster."""
    dist = _distributed()
    Client, LocalCluster = dist.Client, dist.LocalCluster
    if scheduler:
        client = reach_scheduler(scheduler, lambda: Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s"))
        # a scheduler lost mid-run is reported once per volume it held (run_many), not by dask's own
        # log records and tracebacks on stderr
        log = logging.getLogger("distributed")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close()
            log.setLevel(level)
        return
    if workers < 1:
        raise APLError(f"--workers must be at least 1, got {workers}")
    cluster = LocalCluster(
        n_workers=int(workers),
        threads_per_worker=int(threads_per_worker),
        processes=True,
        # the scheduler's HTTP server on a free local port: with None it tries :8787 (every interface) and
        # warns when another program holds it (no dashboard is shown: bokeh is not a dependency)
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
    )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    pids: list[int] = []
    try:
        # Ctrl-C reaches every process of the terminal: the workers ignore it and leave it to this
        # process, which stops them at once (running tasks included: outputs are written atomically,
        # so an unfinished volume leaves only temporary files, removed by run_command_many)
        with contextlib.suppress(Exception):
            pids = [int(pid) for pid in client.run(_ignore_sigint).values()]
        yield client
    except KeyboardInterrupt:
        _stop_workers(client, pids)
        raise
    finally:
        with contextlib.suppress(Exception):
            client.close()
        cluster.close()


def _forward_progress(event: Any, on_progress: Callable[[int, str, int, int], None]) -> None:
    """Hand one progress event (``(time, message)`` from dask) to ``on_progress``; a bad one is ignored."""
    with contextlib.suppress(Exception):  # (in the client's event loop: nothing may escape)
        msg = event[1]
        on_progress(int(msg["tag"]), str(msg["desc"]), int(msg["done"]), int(msg["total"]))


def run_many(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    threads: int | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
    warn: Callable[[str], None] | None = None,
    on_progress: Callable[[int, str, int, int], None] | None = None,
) -> list[TaskResult]:
    """Run ``fn(item)`` for every item on dask.distributed; return the results in the items' order.

    ``fn`` must be importable by the workers (a module-level function). ``threads`` sets torch's
    thread count in each task (default: the worker's, one per worker thread on a local cluster).
    ``on_result`` is called in this process as each task finishes; on Ctrl-C the unfinished tasks
    are stopped and ``KeyboardInterrupt`` is raised (``on_result`` has seen the finished ones): a local
    cluster's workers are ended at once; on a remote cluster the running tasks are told to stop and
    waited for up to ``REMOTE_STOP_WAIT_S`` seconds (``warn`` names any still running then).
    ``on_progress(index, desc, done, total)`` is called, from the client's event-loop thread, with what
    the tasks say through ``report_progress`` while they run (a step may arrive after its task's result).
    """
    if not items:
        return []
    import uuid

    as_completed = _distributed().as_completed

    results: dict[int, TaskResult] = {}
    stop_event = f"napari-apl-stop-{uuid.uuid4().hex}" if scheduler else None
    topic = f"napari-apl-progress-{uuid.uuid4().hex}" if on_progress is not None else None
    with cluster_client(scheduler, workers) as client:
        if topic is not None:
            client.subscribe_topic(topic, lambda event: _forward_progress(event, on_progress))
        futures = {
            client.submit(
                _run_task,
                fn,
                item,
                threads,
                stop_event,
                (topic, i) if topic is not None else None,
                pure=False,
                key=f"napari-apl-{i}-{time.time_ns()}",
            ): i
            for i, item in enumerate(items)
        }
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    res = future.result()
                except Exception as exc:  # the worker died or the task could not be sent
                    res = TaskResult(item=items[i], error=_one_line(f"{type(exc).__name__}: {exc}", 400))
                results[i] = res
                if on_result is not None:
                    on_result(res)
        except BaseException:  # Ctrl-C or a failing callback: stop the tasks not yet finished
            pending = [f for f, i in futures.items() if i not in results]
            if stop_event is not None and pending:
                _stop_remote(client, stop_event, pending, warn)
            with contextlib.suppress(Exception):
                client.cancel(pending)
            raise
    return [results[i] for i in range(len(items))]


def _stop_remote(
    client: Any, stop_event: str, pending: Sequence[Any], warn: Callable[[str], None] | None
) -> None:
    """Tell a remote cluster's tasks to stop and wait (a second Ctrl-C ends the wait) until they have."""
    from distributed import Event, wait

    try:
        Event(stop_event, client=client).set()
        wait(list(pending), timeout=REMOTE_STOP_WAIT_S)
    except (KeyboardInterrupt, Exception):  # a second Ctrl-C, a timed-out wait, a lost scheduler
        pass
    running = [f for f in pending if not f.done()]
    if running and warn is not None:
        warn(
            f"{len(running)} task(s) did not stop within {REMOTE_STOP_WAIT_S:.0f} s on the remote workers: "
            "they may still write their volumes' outputs"
        )


def _make_folders(out: Path, folders: Sequence[Path], created: list[Path]) -> None:
    """Create ``out`` and the missing per-volume ``folders``, appending each one made to ``created``."""
    for folder in [out, *folders]:
        if folder.is_dir():
            continue
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours to remove
            continue
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputError(
                f"cannot create output folder {folder}: {reason}: choose another --out-dir"
            ) from exc
        created.append(folder)


def _remove_temporaries(folder: Path, outputs: Sequence[str]) -> None:
    """Remove the temporary files a task stopped mid-write left for ``outputs`` in ``folder``."""
    if not folder.is_dir():
        return
    for name in outputs:
        pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp(\..+)?")
        for path in folder.glob(f".{glob.escape(name)}.*.tmp*"):
            if pattern.fullmatch(path.name) and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()


def _existing_outputs(folder: Path, outputs: Sequence[str]) -> set[str]:
    """The names among ``outputs`` that are files in ``folder`` now."""
    return {name for name in outputs if (folder / name).is_file()}


def _remove_partial_outputs(folder: Path, outputs: Sequence[str], before: set[str]) -> list[Path]:
    """Remove the outputs this run published into ``folder`` when it holds only some of ``outputs``.

    A worker ended between two of a volume's final renames (Ctrl-C on a local cluster ends the worker
    processes at once) leaves some of its files published and the others not: a folder that ``--skip-
    done`` would refuse to resume. Only files absent when the run started (``before``) are removed; a
    folder holding every output is left whole, and files that were there before stay. Returns the files
    removed.
    """
    if not folder.is_dir():
        return []
    present = _existing_outputs(folder, outputs)
    if not present or len(present) == len(outputs):
        return []
    removed = []
    for name in sorted(present - before):
        with contextlib.suppress(OSError):
            (folder / name).unlink()
            removed.append(folder / name)
    return removed


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this run created and left empty, deepest first (never one holding files)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def _identity_of(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of an existing file, else ``None``."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _file_identities(paths: Sequence[Path]) -> dict[Any, Path]:
    """Map each file's (device, inode) and resolved path to the file, to find an output among them."""
    found: dict[Any, Path] = {}
    for path in paths:
        ident = _identity_of(path)
        if ident is not None:
            found[ident] = path
        found[str(Path(path).resolve())] = path
    return found


def _earlier_output(path: Path, out: Path, outputs: Sequence[str]) -> bool:
    """Whether ``path`` is where a run writes an output: a file named as one, in a folder of ``out``."""
    return path.name in outputs and path.absolute().parent.parent == out.absolute()


def _probe_labels(path: Path) -> bool:
    """Whether the volume file at ``path`` looks like a label volume (a few of its slices read); a file
    that cannot be read is not judged here (its task reports what is wrong with it)."""
    from .preprocess import volume_looks_like_labels
    from .volume import load_volume

    try:
        return volume_looks_like_labels(load_volume(path, lazy=True))
    except Exception:
        return False


def label_volumes(images: Sequence[Path], threads: int = 4) -> list[Path]:
    """The volumes among ``images`` that look like label volumes (few non-negative whole numbers on a few
    probed slices: ``preprocess.probe_looks_like_labels``), in their order; ``threads`` probed at once."""
    if not images:
        return []
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(int(threads), len(images)))) as pool:
        flags = list(pool.map(_probe_labels, images))
    return [image for image, flag in zip(images, flags) if flag]


def done_folders(dirs: dict[Path, Path], outputs: Sequence[str]) -> list[Path]:
    """The volumes of ``dirs`` whose output folder holds a file for every one of ``outputs`` (outputs
    are written atomically: a file there is a whole one)."""
    return [image for image, folder in dirs.items() if _existing_outputs(folder, outputs) == set(outputs)]


def _names(paths: Sequence[Path], first: int = 3) -> str:
    """The file names of the first ``first`` paths (with their folder where names repeat), and how many
    more there are."""
    names = [p.name for p in paths]
    shown = ", ".join(
        f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths[:first]
    )
    return shown + (f" and {len(paths) - first} more" if len(paths) > first else "")


class _BatchProgress:
    """The client's progress line of a batch: volumes done of all, and how far the running ones are (what
    their commands report through ``report_progress``), on stderr; nothing with ``quiet``."""

    SHOWN = 3  # running volumes named on the line at most

    def __init__(self, names: Sequence[str], quiet: bool) -> None:
        self.names, self.quiet = list(names), quiet
        self.bar: Any = None
        self.running: dict[str, str] = {}
        self.ended: set[str] = set()
        self.lock = threading.RLock()

    def start(self) -> None:
        """Show the line (0 of all volumes done)."""
        if not self.quiet:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=len(self.names), desc="volumes", unit="vol", file=sys.stderr, leave=False)

    def _show(self) -> None:
        if self.bar is not None:
            items = list(self.running.items())
            more = f"; {len(items) - self.SHOWN} more" if len(items) > self.SHOWN else ""
            self.bar.set_postfix_str("; ".join(f"{n}: {s}" for n, s in items[: self.SHOWN]) + more)

    def step(self, index: int, desc: str, done: int, total: int) -> None:
        """A running volume's progress (from the client's event-loop thread)."""
        with self.lock:
            name = self.names[index] if 0 <= index < len(self.names) else None
            if name is None or name in self.ended:  # (a step can arrive after its volume's result)
                return
            self.running[name] = f"{desc} {done}/{total}"
            self._show()

    def finished_then(self, report: Callable[[TaskResult], None]) -> Callable[[TaskResult], None]:
        """``report`` of a finished volume, which then counts as done on the line."""

        def on_result(res: TaskResult) -> None:
            report(res)
            with self.lock:
                name = Path(res.item.out_dir).name
                self.ended.add(name)
                self.running.pop(name, None)
                if self.bar is not None:
                    self.bar.update(1)
                    self._show()

        return on_result

    def around(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """``say``, with the line cleared before and drawn again after."""

        def said(text: str) -> None:
            with self.lock:
                if self.bar is not None:
                    self.bar.clear()
                say(text)
                if self.bar is not None:
                    self.bar.refresh()

        return said

    def close(self) -> None:
        """Take the line away."""
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


def run_command_many(
    command: Callable[[Any], int],
    args: Any,
    *,
    outputs: Sequence[str],
    check: Callable[[list[Path], list[str]], None] | None = None,
    path_options: Sequence[str] = ("checkpoint",),
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Run a one-volume CLI ``command`` for every volume ``args.image`` names, on dask.distributed.

    Each volume gets a copy of ``args`` with its own ``image`` and output folder (``out_dir/<volume
    name>``, see ``output_dirs``) and runs exactly the one-volume command in a worker; ``out_dir`` and
    the ``path_options`` (attributes of ``args`` naming files) are made absolute first. The worker count
    and every output path are checked (``check``) before any folder is made or work starts; folders
    this run made and left empty are removed when it ends (an error, Ctrl-C, failed volumes). On Ctrl-C
    the volumes that finished keep their outputs, both lists are reported and ``KeyboardInterrupt`` is
    raised again. Returns 0 when every volume succeeded, else 2 (each failure reported by ``warn``).

    Before anything starts, files that look like label volumes are left out (``label_volumes``), and
    with ``args.skip_done`` so are the volumes whose output folder holds every one of ``outputs``
    (a folder holding only some still runs, and needs ``args.overwrite`` to replace them); when no
    volume is left to run, this says so and returns 0 without starting a cluster.
    """
    import copy
    import sys

    warn = warn or (lambda text: print(text, file=sys.stderr))
    _distributed()  # before any folder is made or anything is printed
    # every path the tasks read or write is made absolute here: a remote worker resolves a relative one
    # against its own working folder (and writes the outputs there, not where the user asked)
    args = copy.copy(args)
    for attr in ("out_dir", *path_options):
        value = getattr(args, attr, None)
        if value:
            setattr(args, attr, str(Path(value).expanduser().absolute()))
    scheduler = getattr(args, "scheduler", None)
    workers = getattr(args, "workers", None)
    workers = 2 if workers is None else workers  # (the command line leaves it unset: the default)
    if not scheduler and int(workers) < 1:
        raise APLError(f"--workers must be at least 1, got {workers}")
    images = expand_inputs(args.image)
    out = Path(args.out_dir).expanduser()
    earlier = [p for p in images if _earlier_output(p, out, outputs)]
    if earlier:
        images = [p for p in images if p not in earlier]
        warn(
            f"note: {len(earlier)} file(s) under {out} named as this command's outputs are left out: "
            "outputs of an earlier run, not volumes"
        )
        if not images:
            raise APLError(f"{args.image} names only outputs of an earlier run (under {out}): no volume")
    labels = label_volumes(images)
    if labels:
        images = [p for p in images if p not in labels]
        one = len(labels) == 1
        what = "file looks like a label volume" if one else "files look like label volumes"
        warn(
            f"note: {len(labels)} {what} (few non-negative integer values), not "
            f"{'an image' if one else 'images'}: left out: {_names(labels)}"
        )
        if not images:
            raise APLError(
                f"{args.image} names only label volumes (few non-negative integer values): give the images "
                "(a folder or glob that leaves the label files out)"
            )
    dirs = output_dirs(images, args.out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out-dir {out} is a file, not a folder: choose a folder")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist: create it first")
    for folder in dirs.values():
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} is a file, not a folder: move it or choose another --out-dir")

    skip_done = bool(getattr(args, "skip_done", False))
    if skip_done:
        done = done_folders(dirs, outputs)
        if done:
            dirs = {image: folder for image, folder in dirs.items() if image not in done}
            where_out = f"{out}/<volume>/"
            if not dirs:
                echo(
                    f"all {len(done)} volumes already have all their outputs in {where_out}: nothing to run "
                    "(--overwrite without --skip-done redoes them)"
                )
                return 0
            warn(
                f"note: {len(done)} of {len(done) + len(dirs)} volumes already have all their outputs in "
                f"{where_out}: skipped (--overwrite without --skip-done redoes them)"
            )

    # every file the batch reads: no volume's output may replace another volume's input (a recursive
    # glob run again with --overwrite can pick up <out>/<name>/main.nii.gz as an input of its own)
    read = [*images, *(Path(v) for o in path_options if (v := getattr(args, o, None)) and isinstance(v, str))]
    read_files = _file_identities(read)

    def check_one(image: Path, folder: Path, paths: list[Path]) -> None:
        """``check`` of one volume's outputs, its refusal of existing ones said for a batch."""
        try:
            check(paths, [str(image), str(getattr(args, "checkpoint", ""))])  # type: ignore[misc]
        except OutputExistsError as exc:
            present = len(_existing_outputs(folder, outputs))
            if skip_done and present:  # (a folder holding all of them was skipped above)
                raise OutputExistsError(
                    f"{folder} holds {present} of the {len(paths)} outputs (an unfinished run?): "
                    "--skip-done skips only folders holding all of them; add --overwrite to redo it"
                ) from None
            if present == len(paths):
                raise OutputExistsError(
                    f"{exc}, or add --skip-done to leave out the volumes that have all their outputs"
                ) from None
            raise

    def check_all(only_existing: bool) -> None:
        """Check every output (of the folders that exist already, when ``only_existing``)."""
        if check is None:
            return
        for image, folder in dirs.items():
            if only_existing and not folder.is_dir():
                continue  # a folder still to be made holds no output yet
            paths = [folder / name for name in outputs]
            check_one(image, folder, paths)
            for p in paths:
                src = read_files.get(_identity_of(p)) or read_files.get(str(p.resolve()))
                if src is not None:
                    raise OutputError(
                        f"output {p} of {image.name} is {src}, an input of this batch: choose another "
                        "--out-dir (or leave earlier outputs out of the inputs)"
                    )

    if not scheduler and int(workers) > len(dirs):  # a process per volume at most: more would only idle
        workers = len(dirs)
    if scheduler:  # reachable before any folder is made or the run is announced
        reach_scheduler(scheduler)
    check_all(only_existing=True)  # before any folder is made: a refused run leaves nothing behind
    items = []
    for image, folder in dirs.items():
        one = copy.copy(args)
        one.image, one.out_dir, one.quiet, one.scheduler = str(image), str(folder), True, None
        one.labels_checked = True  # (label_volumes above: the command need not probe the file again)
        items.append(one)

    finished: list[str] = []
    failed: list[str] = []

    def report(res: TaskResult) -> None:
        name = Path(res.item.out_dir).name
        ok = res.ok and res.value in (0, None)
        if ok:
            finished.append(name)
            echo(f"[{name}] done in {res.seconds:.1f} s ({res.worker})")
            for line in res.output.splitlines():
                echo(f"[{name}] {line}")
        else:
            failed.append(name)
        for line in res.messages.splitlines():  # its notes, named (they come from a worker's stderr)
            if line.strip():
                warn(f"[{name}] {line}")
        if not ok:
            warn(f"[{name}] error: {res.error or f'exit status {res.value}'}")

    created: list[Path] = []
    # the outputs each folder holds before the run: a volume left unfinished loses only what this run wrote
    before = {folder: _existing_outputs(folder, outputs) for folder in dirs.values()}
    progress = _BatchProgress(
        [Path(one.out_dir).name for one in items], quiet=bool(getattr(args, "quiet", False))
    )
    try:
        _make_folders(out, list(dirs.values()), created)
        check_all(only_existing=False)  # the new folders too (writable, not an input)
        where = scheduler or f"a local cluster of {workers} worker processes"
        echo(f"{len(items)} volumes on {where}")
        echo, warn = progress.around(echo), progress.around(warn)  # (the bar steps aside for each line)
        progress.start()
        results = run_many(
            command,
            items,
            scheduler=scheduler,
            workers=workers,
            on_result=progress.finished_then(report),
            warn=warn,
            on_progress=progress.step,
        )
    except KeyboardInterrupt:
        done = set(finished) | set(failed)
        unfinished = [Path(one.out_dir).name for one in items if Path(one.out_dir).name not in done]
        where_out = f", outputs in {out}/<volume>/" if finished else ""
        warn(f"interrupted: {len(finished)} of {len(items)} volumes finished{where_out}")
        warn(f"finished: {', '.join(finished) or 'none'}")
        if failed:
            warn(f"failed: {', '.join(failed)}")
        warn(f"not finished: {', '.join(unfinished) or 'none'}")
        raise
    finally:
        for one in items:  # a worker stopped mid-write leaves its hidden temporary files, or some of its
            # outputs published and the others not
            folder = Path(one.out_dir)
            if folder.name not in finished:
                _remove_temporaries(folder, outputs)
                for path in _remove_partial_outputs(folder, outputs, before.get(folder, set())):
                    warn(f"removed {path}: its volume did not finish (its other outputs were not written)")
        _remove_empty(created)
        progress.close()
    bad = [r for r in results if not r.ok or r.value not in (0, None)]
    where_out = f", outputs in {out}/<volume>/" if len(bad) < len(results) else ""
    echo(f"{len(results) - len(bad)} of {len(results)} volumes done{where_out}")
    return 2 if bad else 0
