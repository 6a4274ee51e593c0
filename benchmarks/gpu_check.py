"""Goal 8: the GPU path gives the CPU's results (within tolerance) and how much faster it is.

Needs only torch, numpy and scipy (no nibabel, napari or dask): the volume is built in memory and
``napari_apl.core`` is used directly. Where nibabel is not installed a placeholder stands in for it so
that ``core.volume`` imports (nibabel is only used there to read and write files, which this script
never does). Without CUDA the CPU part runs and the GPU part is skipped (exit 0).

Checks, for predict (fp32, bf16 and fp16 autocast, channels-last) and for refine (APL, fp32 and bf16
autocast with float32 losses): label agreement and map differences GPU vs CPU, and the GPU/CPU speed.

    python benchmarks/gpu_check.py [--device cuda] [--slices 64] [--iterations 20] [--tiny] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

AGREE_GOAL = 0.99  # fraction of voxels whose label matches the CPU's
MAP_TOL = 0.05  # max |GPU - CPU| of a float16 map (autocast), fp32: 1e-2


class _Placeholder(types.ModuleType):
    """A stand-in module: any attribute is a dummy class (usable in ``except`` tuples, fails if called)."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (Exception,), {"__init__": _unavailable})
        setattr(self, name, cls)
        return cls


def _unavailable(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("nibabel is not installed: gpu_check only works on in-memory volumes")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides placeholder ``nibabel`` modules when the real one is missing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "nibabel" or fullname.startswith("nibabel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _Placeholder(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module) -> None:
        return None


def install_nibabel_placeholder() -> bool:
    """Install the placeholder when nibabel is absent; return whether it was needed."""
    if importlib.util.find_spec("nibabel") is not None:
        return False
    sys.meta_path.append(_PlaceholderFinder())
    return True


def synthetic_volume(shape: tuple[int, int, int], spacing: float = 1.0, seed: int = 0):
    """An in-memory CT-like volume (body, organs as ellipsoids, noise) as a canonical core ``Volume``."""
    from napari_apl.core.volume import Volume

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    img = np.full(shape, -1000.0, np.float32)
    img[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = -80.0
    img[(x / 0.8) ** 2 + (y / 0.6) ** 2 < 1] = 40.0
    for cx, cy, r, hu in (
        (0.4, 0.1, 0.3, 65.0),
        (-0.4, 0.0, 0.18, 50.0),
        (0.3, -0.35, 0.12, 35.0),
        (-0.3, -0.35, 0.12, 30.0),
    ):
        img[((x - cx) ** 2 + (y - cy) ** 2) / r**2 + (z / 0.8) ** 2 < 1] = hu
    img += rng.normal(0, 10, shape).astype(np.float32)
    data = img.astype(np.int16)
    aff = np.diag([spacing, spacing, 2 * spacing, 1.0])
    ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return Volume(data, aff, aff.copy(), shape, np.dtype(np.int16), None, ornt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_predict(model, meta, volume, device, amp, repeats: int = 2):
    """Best-of time and the prediction of ``predict_volume`` on ``device``."""
    from napari_apl.core.infer import predict_volume

    best, pred = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        pred = predict_volume(model, meta, volume, device=device, amp=amp, batch_size=16)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, pred


def compare(a, b) -> dict[str, float]:
    """Label agreement and map differences of two predictions."""
    out = {}
    for name in ("main", "aux", "pseudo"):
        out[f"{name}_agree"] = float(np.mean(getattr(a, name) == getattr(b, name)))
    for name in ("confidence", "consistency"):
        out[f"{name}_maxdiff"] = float(
            np.abs(getattr(a, name).astype(np.float32) - getattr(b, name).astype(np.float32)).max()
        )
    return out


def run_refine(model, meta, volume, device, amp, iterations: int, batch: int):
    """Per-iteration seconds, final pseudo labels and history of an APL refinement on ``device``."""
    from napari_apl.core.refine import RefineConfig, refine

    on = amp not in (False, None, "off")  # RefineConfig.amp is a bool: bf16 autocast or float32
    # the CPU run is the float32 reference (no bf16 teacher); on the GPU the teacher follows amp
    cfg = RefineConfig(
        iterations=iterations,
        batch_size=batch,
        device=str(device),
        amp=on,
        teacher_bf16=None if torch.device(device).type == "cuda" else False,
        seed=0,
    )
    gen = refine(model, meta, volume, cfg)
    stamps = []
    try:
        while True:
            next(gen)
            _sync(device)
            stamps.append(time.perf_counter())
    except StopIteration as stop:
        result = stop.value
    per_it = float(np.median(np.diff(stamps))) if len(stamps) > 2 else float("nan")
    return per_it, result


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit 0 (a GPU mismatch is reported as MISS, not as a crash)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=384, help="in-plane voxels of the synthetic volume")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the test suite)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/gpu_check.*")
    args = ap.parse_args(argv)
    placeholder = install_nibabel_placeholder()

    from napari_apl.core.checkpoint import CheckpointMeta
    from napari_apl.core.models import build_model

    if args.tiny:
        args.slices, args.size, args.iterations = 6, 48, 3
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    size = (args.size, args.size, args.slices)
    volume = synthetic_volume(size, spacing=384.0 / args.size * 0.8)
    torch.manual_seed(0)
    base = 4 if args.tiny else 12
    model = build_model("unet-dual", base=base).eval()
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=(32, 32) if args.tiny else (160, 160),
        spacing=(8.0, 8.0) if args.tiny else (2.5, 2.5),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
    )
    figures: list[tuple] = []
    cpu = torch.device("cpu")
    t_cpu, p_cpu = timed_predict(model, meta, volume, cpu, False, repeats=1 if args.tiny else 2)
    it_cpu, r_cpu = run_refine(model, meta, volume, cpu, False, args.iterations, 4 if args.tiny else 8)
    print(f"CPU: predict {t_cpu:.2f} s for {args.slices} slices, refine {it_cpu * 1000:.0f} ms/iteration")
    info = {"volume": size, "model": f"unet-dual base {base}", "nibabel_placeholder": placeholder}
    if not torch.cuda.is_available() or not str(args.device).startswith("cuda"):
        print("no CUDA: skipped GPU part")
        return 0
    dev = torch.device(args.device)
    info["gpu"] = torch.cuda.get_device_name(dev)
    print(f"GPU: {info['gpu']}")
    for amp in ("off", "bf16", "fp16"):
        t_gpu, p_gpu = timed_predict(model.to(cpu), meta, volume, dev, amp)
        cmp = compare(p_cpu, p_gpu)
        tol = 1e-2 if amp == "off" else MAP_TOL
        ok = (
            min(cmp[k] for k in cmp if k.endswith("agree")) >= AGREE_GOAL
            and max(cmp[k] for k in cmp if k.endswith("maxdiff")) <= tol
        )
        figures.append((f"predict {amp}: GPU/CPU speed-up", t_cpu / t_gpu, "x", None))
        figures.append(
            (
                f"predict {amp}: min label agreement",
                min(v for k, v in cmp.items() if k.endswith("agree")),
                "",
                AGREE_GOAL,
            )
        )
        figures.append(
            (
                f"predict {amp}: max map difference",
                max(v for k, v in cmp.items() if k.endswith("maxdiff")),
                "",
                -tol,
            )
        )
        print(f"predict amp={amp}: {t_gpu:.3f} s ({t_cpu / t_gpu:.1f}x), {cmp}, {'PASS' if ok else 'MISS'}")
    for amp in ("off", "bf16"):
        it_gpu, r_gpu = run_refine(model.to(cpu), meta, volume, dev, amp, args.iterations, 8)
        agree = float(np.mean(r_gpu.pseudo == r_cpu.pseudo))
        loss_cpu = np.array([h.get("ssl", np.nan) for h in r_cpu.history])
        loss_gpu = np.array([h.get("ssl", np.nan) for h in r_gpu.history])
        rel = float(np.nanmax(np.abs(loss_gpu - loss_cpu) / np.maximum(np.abs(loss_cpu), 1e-6)))
        figures.append((f"refine {amp}: GPU/CPU speed-up per iteration", it_cpu / it_gpu, "x", None))
        figures.append((f"refine {amp}: pseudo-label agreement", agree, "", 0.98))
        figures.append((f"refine {amp}: max relative L_SSL difference", rel, "", -0.05))
        speed = it_cpu / it_gpu
        print(f"refine amp={amp}: {it_gpu * 1000:.1f} ms/iteration ({speed:.1f}x), agreement {agree:.4f}")
    if not args.no_write:
        import _common as c

        rep = c.Report("gpu_check", "Goal 8: GPU results vs CPU and GPU/CPU speed")
        for name, value, unit, goal in figures:
            if goal is None:
                rep.add(name, value, unit)
            elif goal < 0:
                rep.add(name, value, unit, goal=-goal, op="<=")
            else:
                rep.add(name, value, unit, goal=goal, op=">=")
        rep.details = info
        rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
