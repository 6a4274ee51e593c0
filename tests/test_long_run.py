"""Long runs (issue #6, item 5): 500 refinement iterations do not grow memory; GPU memory is given back.

Resident memory (psutil RSS) is sampled after a warm-up of 50 iterations and at the end of 500
iterations of APL on a tiny phantom and model (the figures are printed; run with ``-s``). The
criterion is growth <= 5 % after warm-up; the growth per iteration is printed too, so a slow leak
(retained autograd graphs, unbounded buffers) shows up as bytes/iteration. ``NAPARI_APL_LONG_ITERATIONS``
changes the length (e.g. 5000 for a longer check). The GPU test runs only where CUDA is available:
after a stopped refinement, allocated CUDA memory must be back at its level before the refinement.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from napari_apl.core.checkpoint import CheckpointMeta
from napari_apl.core.models import build_model
from napari_apl.core.phantom import make_phantom
from napari_apl.core.refine import RefineConfig, RefineControl, refine
from napari_apl.core.volume import volume_from_array

ITERATIONS = int(os.environ.get("NAPARI_APL_LONG_ITERATIONS", "500"))
WARMUP = 50


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def tiny():
    """The smallest useful set-up: a 32 x 32 x 8 phantom and a base-4 U-Net on a 16 x 16 grid."""
    image, _, affine = make_phantom("ct", 7, shape=(32, 32, 8), spacing=(10.0, 10.0, 8.0))
    torch.manual_seed(0)
    model = build_model("unet-dual", base=4)
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=(16, 16),
        spacing=(20.0, 20.0),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
    )
    return model, meta, volume_from_array(image, affine)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_500_iterations_do_not_grow_memory(tiny):
    model, meta, volume = tiny
    cfg = RefineConfig(iterations=ITERATIONS, batch_size=1, device="cpu", lr=1e-3, guard_every=50, seed=0)
    gen = refine(model, meta, volume, cfg)
    samples: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    try:
        while True:
            event = next(gen)
            assert event.pseudo is None  # no volume attached unless asked for (emit_every=0)
            assert all(isinstance(v, float) for v in event.losses.values())  # plain floats, no tensors
            if event.iteration == WARMUP or event.iteration % 50 == 0:
                samples.append((event.iteration, _rss()))
    except StopIteration as stop:
        result = stop.value
    elapsed = time.perf_counter() - t0
    assert result.iterations_done == ITERATIONS and not result.stopped, result.notes
    warm = dict(samples)[WARMUP]
    end = samples[-1][1]
    growth = (end - warm) / warm
    its = np.array([i for i, _ in samples if i >= WARMUP], float)
    mem = np.array([r for i, r in samples if i >= WARMUP], float)
    slope = float(np.polyfit(its, mem, 1)[0]) if len(its) > 1 else 0.0
    print(
        f"\nlong run: {ITERATIONS} iterations in {elapsed:.1f} s ({1000 * elapsed / ITERATIONS:.0f} ms/it); "
        f"RSS after {WARMUP} iterations {warm / 2**20:.1f} MiB, after {ITERATIONS} {end / 2**20:.1f} MiB: "
        f"growth {100 * growth:+.2f} % ({(end - warm) / 2**20:+.1f} MiB, fit {slope:+.0f} bytes/iteration); "
        f"history holds {len(result.history)} records"
    )
    assert growth <= 0.05
    # nothing keeps autograd state alive: the returned model carries no gradients or graph
    assert all(p.grad is None for p in result.model.parameters())
    assert all(p.grad_fn is None for p in result.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_returns_after_stop(tiny):
    model, meta, volume = tiny
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before_alloc = torch.cuda.memory_allocated()
    before_reserved = torch.cuda.memory_reserved()
    control = RefineControl()
    cfg = RefineConfig(iterations=100_000, batch_size=2, device="cuda", lr=1e-3, guard_every=25, seed=0)
    box: dict = {}

    def work() -> None:
        gen = refine(model, meta, volume, cfg, control=control)
        try:
            while True:
                ev = next(gen)
                box["peak"] = max(box.get("peak", 0), torch.cuda.memory_allocated())
                box["it"] = ev.iteration
        except StopIteration as stop:
            box["result"] = stop.value

    worker = threading.Thread(target=work)
    worker.start()
    t0 = time.monotonic()
    while box.get("it", 0) < 60 and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    control.stop()
    worker.join(120)
    assert not worker.is_alive()
    result = box.pop("result")
    assert result.stopped and next(result.model.parameters()).device.type == "cpu"
    del result
    gc.collect()
    torch.cuda.synchronize()
    after_alloc = torch.cuda.memory_allocated()
    after_reserved = torch.cuda.memory_reserved()
    print(
        f"\nGPU: allocated {before_alloc} -> peak {box.get('peak', 0)} -> {after_alloc} bytes after stop; "
        f"reserved {before_reserved} -> {after_reserved} bytes"
    )
    assert box.get("peak", 0) > before_alloc  # the refinement did run on the GPU
    assert after_alloc <= before_alloc
    assert after_reserved <= before_reserved + 2 * 2**20
