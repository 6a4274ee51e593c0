"""Memory: plain pages for large arrays, and freed tensor memory kept for reuse while a loop runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

# Arrays of at least this many bytes get their own anonymous memory map (``zeros_plain_pages``).
PLAIN_PAGES_MIN_BYTES = 4 << 20
PLAIN_PAGES = True  # benchmarks/inference_overhead.py switches it off to measure the difference


def zeros_plain_pages(shape: tuple[int, ...], dtype: Any, order: str = "C") -> np.ndarray:
    """A zero-filled array in fresh anonymous memory pages, without numpy's huge-page advice.

    numpy asks Linux for transparent huge pages on large arrays (``madvise(MADV_HUGEPAGE)``). Where
    the kernel then compacts memory on the first touch and still finds no huge page, as on the 2-core
    machine of the benchmarks, the first write costs several times more than with ordinary pages
    (550 MB: 1.3 s against 0.3 s there, timed once by hand; for the whole ``predict`` of a
    512 x 512 x 300 CT it was 3 % of the wall time, ``benchmarks/results/inference_overhead.md``).
    Large write-once stores gain nothing from huge pages, so they take plain pages from an anonymous
    ``mmap`` (zeroed by the kernel, freed with the array).
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if not PLAIN_PAGES or nbytes < PLAIN_PAGES_MIN_BYTES:
        return np.zeros(shape, dt, order=order)
    import mmap

    return np.ndarray(shape, dt, buffer=mmap.mmap(-1, nbytes), order=order)


def release_in_background(held: list[Any], delay_s: float = 1.0) -> threading.Thread:
    """Let go of the objects in ``held`` (emptied here) from a daemon thread, ``delay_s`` from now.

    Freeing arrays in plain pages (``zeros_plain_pages``) unmaps them page by page: 150 MB took
    47 ms here, on whichever thread dropped the last reference. CPython's ``mmap`` releases the GIL
    while it unmaps, so done from another thread it does not hold up the caller (a GUI's event loop:
    its longest gap stayed under 1 ms while 150 MB were freed beside it). The delay lets the caller
    drop its own references first, so that the last one is this thread's.
    """
    items = list(held)
    held.clear()

    def drop() -> None:
        time.sleep(delay_s)
        items.clear()

    thread = threading.Thread(target=drop, name="napari-apl-release", daemon=True)
    thread.start()
    return thread


def set_numpy_huge_pages(enabled: bool) -> bool | None:
    """Turn numpy's huge-page advice for large arrays on or off; return the previous setting.

    ``None`` (nothing changed) when the user chose with ``NUMPY_MADVISE_HUGEPAGE`` or this numpy
    has no such switch. The command line turns the advice off while it runs, for the reason given in
    ``zeros_plain_pages``: every large temporary array of a prediction then costs ordinary page faults.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return None
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    return None if setter is None else bool(setter(bool(enabled)))


# glibc's mallopt parameters and the values ``retained_heap`` sets (see there)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
HEAP_TRIM_WHILE_RETAINED = 1 << 30
HEAP_TRIM_AFTER = 2 * HEAP_MMAP_THRESHOLD  # what glibc's own adjustment sets beside that threshold
RETAIN_HEAP = True  # benchmarks/refine_overhead.py switches it off to measure the difference
_retained = 0
_retained_lock = threading.Lock()


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (musl has no mallopt)
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Keep the memory that tensors free inside this block in the process, for the next ones to reuse.

    A training loop frees its activations every step and allocates the same sizes again. By default
    glibc hands large freed blocks back to the kernel (blocks over its mmap threshold, and the heap's
    free top over its trim threshold), so every step pays page faults and zeroing for hundreds of
    megabytes again: in a micro-run a forward with gradient of the benchmark model took 1.6 x its time
    with the memory kept (2-core CPU). Refinement and source training run inside this block;
    prediction does not (it measured within noise there: its live memory is small). Inside the
    block blocks up to 32 MB come from the heap and its free memory is kept; when the last such block
    in the process ends, the free memory is given back (``malloc_trim``) and the heap is trimmed at
    64 MB again, which leaves glibc as its own adjustment would after freeing such blocks. Nested and
    concurrent blocks (a widget's worker beside the main thread) share one setting. Yields whether it
    took effect (glibc on Linux; elsewhere the block changes nothing).
    """
    global _retained
    libc = _glibc() if RETAIN_HEAP else None
    if libc is None:
        yield False
        return
    with _retained_lock:
        if _retained == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_WHILE_RETAINED)
        _retained += 1
    try:
        yield True
    finally:
        with _retained_lock:
            _retained -= 1
            if _retained == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_AFTER)
                libc.malloc_trim(0)
