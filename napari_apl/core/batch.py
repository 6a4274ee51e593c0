"""Many volumes at once: expand a folder or glob of volumes and run one task per volume on dask.distributed.

The task is any picklable function of one item (the CLI sends its own one-volume command, so a volume
processed here gives exactly the files the one-volume command gives). By default the tasks run on a
``LocalCluster`` of worker *processes* (``n_workers`` processes, one thread each: each process runs
its own torch); with ``scheduler="tcp://host:8786"`` they run on an existing cluster, whose workers must
have napari-apl installed and see the same file paths (a shared file system). ``dask.distributed`` is
imported only when tasks are run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import APLError, OutputError

__all__ = [
    "NIFTI_SUFFIXES",
    "TaskResult",
    "cluster_client",
    "expand_inputs",
    "is_many",
    "output_dirs",
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


def is_many(spec: str | os.PathLike) -> bool:
    """Whether an input names several volumes: a folder or a glob pattern (not one file)."""
    text = str(spec)
    return Path(text).expanduser().is_dir() or (bool(_GLOB_CHARS & set(text)) and not Path(text).exists())


def expand_inputs(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The volumes an input names, sorted: a file, a folder (its ``.nii``/``.nii.gz`` files) or a glob."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in specs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if _is_nifti(p))
            if not matches:
                raise APLError(
                    f"folder {path} holds no .nii or .nii.gz volume: choose the folder of the scans"
                )
        elif path.exists() or not (_GLOB_CHARS & set(text)):
            matches = [path]  # one file: load_volume reports a missing or unreadable one
        else:
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [p for p in matches if _is_nifti(p)]
            if not matches:
                raise APLError(f"pattern {text!r} matches no .nii or .nii.gz volume: check the pattern")
        found.extend(matches)
    unique = list(dict.fromkeys(p.absolute() for p in found))
    return unique


def output_dirs(images: Sequence[Path], out_dir: str | os.PathLike) -> dict[Path, Path]:
    """Per-volume output folders ``out_dir/<volume name>``; two volumes with one name are refused."""
    out = Path(out_dir).expanduser()
    dirs: dict[Path, Path] = {}
    seen: dict[str, Path] = {}
    for image in images:
        name = volume_name(image)
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
    seconds: float = 0.0
    worker: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.error is None


def _run_task(fn: Callable[[Any], Any], item: Any, threads: int | None) -> TaskResult:
    """Run one task in a worker, capturing what it prints and turning an error into a one-line message."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    buf = io.StringIO()
    t0 = time.perf_counter()
    result = TaskResult(item=item, worker=f"pid {os.getpid()}")
    try:
        import dask

        # dask arrays inside the task (lazily read volumes) are computed in this worker, not sent
        # back to the cluster (whose threads are busy running tasks like this one)
        with contextlib.redirect_stdout(buf), dask.config.set(scheduler="synchronous"):
            result.value = fn(item)
    except APLError as exc:
        result.error = str(exc)
    except Exception as exc:  # report, do not kill the other volumes
        result.error = f"{type(exc).__name__}: {exc}"
        result.details["traceback"] = traceback.format_exc(limit=8)
    result.output = buf.getvalue()
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None, workers: int = 2, threads_per_worker: int = 1
) -> Iterator[Any]:
    """A dask.distributed ``Client``: to ``scheduler`` when given, else to a new local process cluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - distributed is a dependency of the distributed extra
        raise APLError(
            "running many volumes needs dask.distributed: pip install 'napari-apl[distributed]'"
        ) from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise APLError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}): start it (dask scheduler) "
                "or leave out --scheduler for a local cluster"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1:
        raise APLError(f"--workers must be at least 1, got {workers}")
    cluster = LocalCluster(
        n_workers=int(workers),
        threads_per_worker=int(threads_per_worker),
        processes=True,
        dashboard_address=None,
        silence_logs=40,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_many(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    threads: int | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """Run ``fn(item)`` for every item on dask.distributed; return the results in the items' order.

    ``fn`` must be importable by the workers (a module-level function). ``threads`` sets torch's
    thread count in each task (default: the worker's, one per worker thread on a local cluster).
    ``on_result`` is called in this process as each task finishes.
    """
    if not items:
        return []
    from distributed import as_completed

    results: dict[int, TaskResult] = {}
    with cluster_client(scheduler, workers) as client:
        futures = {
            client.submit(_run_task, fn, item, threads, pure=False, key=f"napari-apl-{i}-{time.time_ns()}"): i
            for i, item in enumerate(items)
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                res = future.result()
            except Exception as exc:  # the worker died or the task could not be sent
                res = TaskResult(item=items[i], error=f"{type(exc).__name__}: {exc}")
            results[i] = res
            if on_result is not None:
                on_result(res)
    return [results[i] for i in range(len(items))]


def run_command_many(
    command: Callable[[Any], int],
    args: Any,
    *,
    outputs: Sequence[str],
    check: Callable[[list[Path], list[str]], None] | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Run a one-volume CLI ``command`` for every volume ``args.image`` names, on dask.distributed.

    Each volume gets a copy of ``args`` with its own ``image`` and ``out_dir/<volume name>`` and runs
    exactly the one-volume command in a worker. Every output path is checked (``check``) before any
    work starts. Returns 0 when every volume succeeded, else 2 (each failure reported by ``warn``).
    """
    import copy
    import sys

    warn = warn or (lambda text: print(text, file=sys.stderr))
    images = expand_inputs(args.image)
    dirs = output_dirs(images, args.out_dir)
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out-dir {out} is a file, not a folder: choose a folder")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist: create it first")
    for folder in dirs.values():
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} is a file, not a folder: move it or choose another --out-dir")
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    if check is not None:  # every output is checked before any work starts
        for image, folder in dirs.items():
            check([folder / name for name in outputs], [str(image), str(getattr(args, "checkpoint", ""))])
    items = []
    for image, folder in dirs.items():
        one = copy.copy(args)
        one.image, one.out_dir, one.quiet, one.scheduler = str(image), str(folder), True, None
        items.append(one)
    where = args.scheduler or f"a local cluster of {args.workers} worker processes"
    echo(f"{len(items)} volumes on {where}")

    def report(res: TaskResult) -> None:
        name = volume_name(res.item.image)
        if res.ok:
            echo(f"[{name}] done in {res.seconds:.1f} s ({res.worker})")
            for line in res.output.splitlines():
                echo(f"[{name}] {line}")
        else:
            warn(f"[{name}] error: {res.error}")

    results = run_many(command, items, scheduler=args.scheduler, workers=args.workers, on_result=report)
    failed = [r for r in results if not r.ok or r.value not in (0, None)]
    echo(f"{len(results) - len(failed)} of {len(results)} volumes done, outputs in {out}/<volume name>/")
    return 2 if failed else 0
