"""Memory for large arrays: plain pages instead of numpy's transparent-huge-page advice (numpy only)."""

from __future__ import annotations

import os
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
