"""Goal 8: the GPU path gives the CPU's results (within tolerance) and how much faster it is.

Needs only torch, numpy and scipy (no nibabel, napari or dask): the volume is built in memory and
``napari_apl.core`` is used directly. Where nibabel is not installed a placeholder stands in for it so
that ``core.volume`` imports (nibabel is only used there to read and write files, which this script
never does). Without CUDA the CPU part runs and the GPU part is skipped (exit 0).

Checks, each in its own section (a failing one is reported and the others still run):
- device selection: ``resolve_device("auto")`` picks CUDA when it is there;
- predict (fp32, bf16 and fp16 autocast, channels-last): label agreement and map differences GPU vs
  CPU, and the GPU/CPU speed-up;
- goal 1 on the GPU: the whole predict against the bare forward over the same slices;
- memory format and precision: forward and training step, contiguous vs channels-last, fp32 vs bf16;
- refine: without the student augmentation (its random draws differ by device), fp32 and bf16
  autocast with float32 losses against the CPU's float32 run (pseudo-label agreement, L_SSL); with
  each side's defaults, the per-iteration speed-up, channels-last (default) against contiguous;
- with ``--profile FILE``: torch.profiler tables of a few refine iterations and the fraction of the
  wall time the device spends in kernels.

    python benchmarks/gpu_check.py [--device cuda] [--slices 64] [--iterations 20] [--tiny] [--no-write]
                                   [--simulate] [--out DIR]

``--simulate --device cpu`` runs the accelerator sections on the CPU (the test suite does, with
``--tiny``), so that the script's code paths are checked on machines without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common as c
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


def synthetic_volume(shape: tuple[int, int, int], spacing: float = 1.0, seed: int = 0) -> Any:
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


def timed_predict(
    model: Any, meta: Any, volume: Any, device: torch.device, amp: Any, repeats: int = 2, batch: int = 16
) -> tuple[float, Any]:
    """Best-of time and the prediction of ``predict_volume`` on ``device``."""
    from napari_apl.core.infer import predict_volume

    best, pred = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        pred = predict_volume(model, meta, volume, device=device, amp=amp, batch_size=batch)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, pred


def compare(a: Any, b: Any) -> dict[str, float]:
    """Label agreement and map differences of two predictions."""
    out = {}
    for name in ("main", "aux", "pseudo"):
        out[f"{name}_agree"] = float(np.mean(getattr(a, name) == getattr(b, name)))
    for name in ("confidence", "consistency"):
        out[f"{name}_maxdiff"] = float(
            np.abs(getattr(a, name).astype(np.float32) - getattr(b, name).astype(np.float32)).max()
        )
    return out


def run_refine(
    model: Any,
    meta: Any,
    volume: Any,
    device: Any,
    iterations: int,
    batch: int,
    profile: Path | None = None,
    **cfg: Any,
) -> tuple[float, Any, float]:
    """Per-iteration seconds (median), result and profiled device-busy fraction of an APL refinement.

    ``cfg`` overrides ``RefineConfig`` fields (the rest are the defaults a user gets on that device).
    With ``profile``, the iterations after the first run under torch.profiler and its tables are
    appended to that file.
    """
    from napari_apl.core.refine import RefineConfig, refine

    config = RefineConfig(iterations=iterations, batch_size=batch, device=str(device), seed=0, **cfg)
    gen = refine(model, meta, volume, config)
    stamps = []
    prof = None
    try:
        while True:
            next(gen)
            _sync(torch.device(device))
            stamps.append(time.perf_counter())
            if profile is not None and prof is None:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                acts = [ProfilerActivity.CPU]
                if torch.device(device).type == "cuda":
                    acts.append(ProfilerActivity.CUDA)
                prof = torch_profile(activities=acts)
                prof.__enter__()
    except StopIteration as stop:
        result = stop.value
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    busy = float("nan")
    if prof is not None and profile is not None:
        averages = prof.key_averages()
        kernel_us = sum(
            getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) for e in averages
        )
        wall_s = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
        busy = kernel_us / 1e6 / wall_s
        with open(profile, "a") as fh:
            fh.write(f"=== refine {cfg}, {len(stamps) - 1} iterations, {wall_s * 1000:.1f} ms, ")
            fh.write(f"device kernels {kernel_us / 1000:.1f} ms ({busy:.1%} busy) ===\n")
            for key in ("self_cpu_time_total", "self_cuda_time_total"):
                try:
                    fh.write(averages.table(sort_by=key, row_limit=25) + "\n")
                except Exception as exc:  # a key this torch does not know
                    fh.write(f"(no table by {key}: {exc})\n")
    per_it = float(np.median(np.diff(stamps))) if len(stamps) > 2 else float("nan")
    return per_it, result, busy


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall milliseconds of ``fn()`` on ``device`` (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _forward_and_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, dtype: Any
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A no-grad forward and a training step (both heads' cross-entropy, Adam) of ``net`` on one batch."""
    ctx = dict(device_type=x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def forward() -> None:
        net.eval()
        with torch.inference_mode(), torch.autocast(**ctx):
            net(x)

    def step() -> None:
        net.train()
        with torch.autocast(**ctx):
            m, a = net(x)
        ce = torch.nn.functional.cross_entropy
        loss = ce(m.float(), y) + ce(a.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return forward, step


def memory_format_timings(
    model: torch.nn.Module, device: torch.device, batch: int, hw: tuple[int, int], repeats: int
) -> dict[str, float]:
    """Forward and training-step milliseconds, contiguous vs channels-last, float32 vs bf16 autocast."""
    import copy

    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, 1, *hw, generator=gen)
    y_cpu = torch.randint(0, 5, (batch, *hw), generator=gen)
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net = copy.deepcopy(model).to(device).to(memory_format=fmt)
        x = x_cpu.to(device).contiguous(memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-5)
        for amp_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            forward, step = _forward_and_step(net, x, y_cpu.to(device), opt, dtype)
            out[f"forward {amp_name} {fmt_name}"] = _median_ms(forward, device, repeats)
            out[f"train step {amp_name} {fmt_name}"] = _median_ms(step, device, repeats)
    return out


def bare_forward_ms(
    model: Any, meta: Any, volume: Any, device: torch.device, amp: str, batch: int, repeats: int
) -> float:
    """Milliseconds of the bare forward over all prepared slices of ``volume`` (goal 1's denominator)."""
    from napari_apl.core.infer import _amp_dtype, _forward, prepare

    prep = prepare(volume, meta, model)
    n = volume.data.shape[2]
    xs = [prep.batch(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    net = model.to(device).eval().to(memory_format=torch.channels_last)  # as predict runs it
    dtype = _amp_dtype(amp, device)
    xs_dev = [x.to(device) for x in xs]

    def run() -> None:
        with torch.inference_mode():
            for x in xs_dev:
                _forward(net, x, dtype)

    return _median_ms(run, device, repeats, warmup=1)


class Figures:
    """Collects (name, value, unit, goal) rows; goal None = reported only, negative = an upper bound."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, float | None, str]] = []
        self.failed: list[str] = []

    def add(self, name: str, value: float, unit: str = "", goal: float | None = None, note: str = "") -> None:
        self.rows.append((name, float(value), unit, goal, note))

    def section(self, title: str, fn: Callable[[], None]) -> None:
        """Run one part of the check; a failure is printed and recorded, and the other parts still run."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            import traceback

            traceback.print_exc()
            self.failed.append(title)
            print(f"[{title}] FAILED (traceback above)", flush=True)
        print(f"[{title}] {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit 0 (a GPU mismatch is reported as MISS, not as a crash)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=384, help="in-plane voxels of the synthetic volume")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--base", type=int, default=12, help="unet-dual width (12 = the demo checkpoint)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the test suite)")
    ap.add_argument(
        "--simulate",
        action="store_true",
        help="run the accelerator part on --device even when it is the CPU (tests the script's code paths)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/gpu_check.*")
    ap.add_argument("--out", type=Path, default=None, help="also copy the results files into this folder")
    ap.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables of refine here")
    args = ap.parse_args(argv)
    placeholder = install_nibabel_placeholder()
    t_start, t_wall = time.perf_counter(), time.time()

    from napari_apl.core.checkpoint import CheckpointMeta
    from napari_apl.core.utils import resolve_device

    if args.tiny:
        args.slices, args.size, args.iterations, args.base = 6, 48, 3, 4
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    size = (args.size, args.size, args.slices)
    volume = synthetic_volume(size, spacing=384.0 / args.size * 0.8)
    model, _meta, model_source = c.demo_like_model(args.base)  # the demo's weights where base fits
    hw = (32, 32) if args.tiny else (160, 160)
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=hw,
        spacing=(8.0, 8.0) if args.tiny else (2.5, 2.5),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
    )
    figs = Figures()
    cpu = torch.device("cpu")
    ref: dict = {}
    repeats = 3 if args.tiny else 20
    info = {
        "volume": size,
        "model": model_source,
        "model_grid": hw,
        "nibabel_placeholder": placeholder,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }

    def cpu_reference() -> None:
        ref["t_pred"], ref["pred"] = timed_predict(
            model, meta, volume, cpu, False, repeats=1 if args.tiny else 2
        )
        # numerics: float32 throughout, no student augmentation (its random draws differ by device)
        _, ref["refine"], _ = run_refine(
            model, meta, volume, cpu, args.iterations, 8, amp=False, teacher_bf16=False, augment="none"
        )
        # speed: the recipe a CPU user gets
        ref["it"], _, _ = run_refine(model, meta, volume, cpu, args.iterations, 8)
        print(
            f"CPU ({torch.get_num_threads()} threads): predict {ref['t_pred']:.2f} s for {args.slices} "
            f"slices, refine {ref['it'] * 1000:.0f} ms/iteration",
            flush=True,
        )

    figs.section("CPU reference", cpu_reference)
    if "pred" not in ref:
        return 1
    cuda_ok = torch.cuda.is_available() and str(args.device).startswith("cuda")
    if not cuda_ok and not args.simulate:
        print("no CUDA: skipped GPU part")
        return 0
    dev = torch.device(args.device)
    info["gpu"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"(simulated on {dev.type})"
    print(f"accelerator: {info['gpu']}", flush=True)

    def device_selection() -> None:
        auto = resolve_device("auto")
        named = resolve_device(str(args.device))
        info["resolve_device"] = {"auto": str(auto), str(args.device): str(named)}
        print(f"resolve_device: auto -> {auto}, {args.device} -> {named}", flush=True)
        if dev.type == "cuda":
            assert auto.type == "cuda", f"auto picked {auto} although CUDA is available"

    def predict_parts() -> None:
        for amp in ("off", "bf16", "fp16"):
            t_gpu, p_gpu = timed_predict(model.to(cpu), meta, volume, dev, amp)
            cmp = compare(ref["pred"], p_gpu)
            tol = 1e-2 if amp == "off" else MAP_TOL
            agree = min(v for k, v in cmp.items() if k.endswith("agree"))
            diff = max(v for k, v in cmp.items() if k.endswith("maxdiff"))
            tag = "fp16 (the CUDA default)" if amp == "fp16" else amp
            figs.add(f"predict {tag}: GPU/CPU speed-up", ref["t_pred"] / t_gpu, "x")
            figs.add(f"predict {tag}: GPU wall", t_gpu, "s")
            figs.add(f"predict {tag}: min label agreement", agree, "", AGREE_GOAL)
            figs.add(f"predict {tag}: max map difference", diff, "", -tol)
            ok = agree >= AGREE_GOAL and diff <= tol
            speed = ref["t_pred"] / t_gpu
            verdict = "PASS" if ok else "MISS"
            print(f"predict amp={amp}: {t_gpu:.3f} s ({speed:.1f}x), {cmp}, {verdict}", flush=True)

    def predict_overhead() -> None:
        # goal 1 on the accelerator: the whole predict (resample, both heads, maps, inverse resample)
        # against the bare forward over the same slices at the same batch size and precision
        for amp in ("off", "fp16"):
            bare = bare_forward_ms(model.to(cpu), meta, volume, dev, amp, 16, repeats=3 if args.tiny else 5)
            t_gpu, _ = timed_predict(model.to(cpu), meta, volume, dev, amp, repeats=3)
            figs.add(
                f"predict {amp} / bare forward (GPU)", t_gpu * 1000 / bare, "x", note=f"bare {bare:.1f} ms"
            )
            print(f"predict {amp}: {t_gpu * 1000:.1f} ms vs bare forward {bare:.1f} ms", flush=True)

    def memory_formats() -> None:
        ms = memory_format_timings(model.to(cpu), dev, 16, hw, repeats)
        info["memory_format_ms_batch16"] = ms
        for what in ("forward", "train step"):
            for amp in ("fp32", "bf16"):
                c_, l_ = ms[f"{what} {amp} contiguous"], ms[f"{what} {amp} channels_last"]
                figs.add(f"{what} {amp}, batch 16: contiguous / channels-last time", c_ / l_, "x")
                print(f"{what} {amp}: contiguous {c_:.2f} ms, channels-last {l_:.2f} ms", flush=True)
        figs.add(
            "train step: fp32 / bf16 autocast time (channels-last)",
            ms["train step fp32 channels_last"] / ms["train step bf16 channels_last"],
            "x",
        )

    def refine_parts() -> None:
        r_cpu = ref["refine"]
        loss_cpu = np.array([h.get("ssl", np.nan) for h in r_cpu.history])
        for amp in (False, True):
            # the same numerics as the CPU reference: no augmentation; the teacher follows amp
            _, r_gpu, _ = run_refine(
                model.to(cpu), meta, volume, dev, args.iterations, 8, amp=amp, augment="none"
            )
            label = f"refine {'bf16' if amp else 'fp32'}, no augmentation"
            agree = float(np.mean(r_gpu.pseudo == r_cpu.pseudo))
            loss_gpu = np.array([h.get("ssl", np.nan) for h in r_gpu.history])
            rel = float(np.nanmax(np.abs(loss_gpu - loss_cpu) / np.maximum(np.abs(loss_cpu), 1e-6)))
            figs.add(f"{label}: pseudo-label agreement with the CPU", agree, "", 0.98)
            figs.add(f"{label}: max relative L_SSL difference", rel, "", -0.05)
            print(f"{label}: agreement {agree:.4f}, L_SSL rel diff {rel:.4f}", flush=True)
        # speed: the defaults (bf16 autocast on CUDA, channels-last weights) against contiguous; the
        # default runs twice, before and after, so that warm-up order cannot decide the comparison
        runs = (("default", {}), ("contiguous", {"channels_last": False}), ("default, again", {}))
        for label, over in runs:
            it_gpu, _, _ = run_refine(model.to(cpu), meta, volume, dev, args.iterations, 8, **over)
            speed = ref["it"] / it_gpu
            figs.add(f"refine {label}: ms per iteration", it_gpu * 1000, "ms")
            figs.add(f"refine {label}: GPU/CPU speed-up per iteration (defaults on each)", speed, "x")
            print(f"refine {label}: {it_gpu * 1000:.1f} ms/iteration ({speed:.1f}x)", flush=True)

    def profile_refine() -> None:
        args.profile.write_text("")
        for over in ({}, {"channels_last": False}):
            *_, busy = run_refine(model.to(cpu), meta, volume, dev, 6, 8, profile=args.profile, **over)
            label = "default" if not over else "contiguous"
            figs.add(
                f"refine {label} under the profiler: device kernel time / wall time",
                busy,
                "",
                note="below 1: the iteration waits on the host (Python, kernel launches, copies)",
            )
            print(f"refine {label}: device busy {busy:.1%} of the profiled iterations", flush=True)
        print(f"profile tables in {args.profile}", flush=True)

    def refine_ahead() -> None:
        """The set-up made ahead (as the widget makes it after Predict) on the device, against its own."""
        from napari_apl.core.refine import RefineConfig, prepare_refinement, refine
        from napari_apl.core.utils import run_generator

        cfg = RefineConfig(iterations=args.iterations, batch_size=8, device=str(dev), seed=0)
        runs = {}
        t0 = time.perf_counter()
        start = prepare_refinement(model.to(cpu), meta, volume, cfg)
        _sync(dev)
        figs.add("refine set-up made ahead: seconds", time.perf_counter() - t0, "s")
        runs["ahead"] = run_generator(refine(model.to(cpu), meta, volume, cfg, start=start))
        figs.add("refine set-up made ahead: used by the run", float(start.used), "", 1.0)
        for label in ("own set-up", "own set-up, again"):
            runs[label] = run_generator(refine(model.to(cpu), meta, volume, cfg))

        def weight_diff(a: Any, b: Any) -> float:
            sa, sb = a.model.state_dict(), b.model.state_dict()
            return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)

        pairs = (
            ("set-up made ahead vs its own", runs["ahead"], runs["own set-up"]),
            ("its own set-up, run to run", runs["own set-up"], runs["own set-up, again"]),
        )
        for label, a, b in pairs:  # (on a GPU the second pair shows how far runs differ at all)
            agree = float(np.mean(a.pseudo == b.pseudo))
            figs.add(f"refine, {label}: pseudo-label agreement", agree, "", 0.98)
            figs.add(f"refine, {label}: max weight difference", weight_diff(a, b))
            print(f"refine, {label}: agreement {agree:.4f}, max weight difference {weight_diff(a, b):.3g}")

    figs.section("device selection", device_selection)
    figs.section("predict: GPU vs CPU", predict_parts)
    figs.section("predict overhead on the GPU", predict_overhead)
    figs.section("memory format and precision", memory_formats)
    figs.section("refine: GPU vs CPU", refine_parts)
    figs.section("refine: the set-up made ahead on the GPU", refine_ahead)
    if args.profile is not None:
        figs.section("refine profile", profile_refine)
    info["failed_sections"] = figs.failed
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"done in {info['wall_s']} s; failed sections: {figs.failed or 'none'}", flush=True)
    if not args.no_write:
        import shutil

        rep = c.Report("gpu_check", "Goal 8: GPU results vs CPU and GPU/CPU speed", started=t_wall)
        rep.note(
            "defaults on CUDA: predict runs fp16 autocast (a batch whose float16 logits overflow is "
            "recomputed in float32) and makes the five maps on the device; refine runs bf16 autocast with "
            "float32 losses and channels-last weights"
        )
        rep.note(
            "speed-ups are against the same machine's CPU with all its cores (torch_threads above), each "
            "side at its own defaults; predict = the in-memory volume to the five voxel-grid maps"
        )
        rep.note(
            "refine numerics are compared without the student augmentation, whose random draws differ "
            "between devices; the timed runs use the default recipe"
        )
        for name, value, unit, goal, note in figs.rows:
            if goal is None:
                rep.add(name, value, unit, note=note)
            elif goal < 0:
                rep.add(name, value, unit, goal=-goal, op="<=", note=note)
            else:
                rep.add(name, value, unit, goal=goal, op=">=", note=note)
        rep.details = info
        paths = rep.write()
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy(path, args.out / Path(path).name)
    return 1 if figs.failed else 0


if __name__ == "__main__":
    sys.exit(main())
