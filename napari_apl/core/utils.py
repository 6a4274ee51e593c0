"""Small shared helpers: device selection, seeding and driving generators."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Generator
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import APLError

R = TypeVar("R")

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|mps`` (or ``cuda:N``) into a usable ``torch.device``."""
    check_device_name(str(device))
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise APLError(f"device '{device}' asked for but CUDA is not available: use --device auto or cpu")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise APLError("device 'mps' asked for but Apple MPS is not available: use --device auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def check_device_name(device: str) -> None:
    """Refuse a device name no machine could run (``resolve_device`` checks this first)."""
    name = str(device).lower()
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return
    raise APLError(f"unknown device '{device}': choose one of {', '.join(DEVICES)} (or cuda:N)")


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch for a reproducible run and return a numpy generator."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - third-party code may use the legacy global RNG
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed % 2**32))  # (Python takes 0..2**32 - 1 there)
    return np.random.default_rng(seed)


def run_generator(gen: Generator[Any, Any, R]) -> R:
    """Drive a progress generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def release_device_memory(device: torch.device) -> None:
    """Give cached accelerator memory back to the driver after long work."""
    if device.type not in ("cuda", "mps"):
        return
    import gc

    gc.collect()  # tensors kept only by reference cycles would otherwise stay cached
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif hasattr(torch, "mps"):
        torch.mps.empty_cache()


_warm_up_lock = threading.Lock()
_warmed_up = False


def warm_up_optimiser() -> bool:
    """Make one Adam step on a dummy tensor, once per process; return whether this call made it.

    torch imports its compiler stack (``torch._dynamo``, some 800 modules, 1.6 s on a 2-core CPU) on a
    process's first optimiser. That import runs under the GIL: in a worker thread beside a GUI it
    stalls the event loop for up to a quarter of a second at a time, so a viewer does it up front.
    """
    global _warmed_up
    with _warm_up_lock:
        if _warmed_up:
            return False
        p = torch.zeros(2, requires_grad=True)
        opt = torch.optim.Adam([p], lr=1e-3)
        p.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _warmed_up = True
        return True
