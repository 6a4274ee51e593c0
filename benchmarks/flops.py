"""Goal 3: the model forward's achieved FLOP/s against the machine's measured peak (a large matmul).

For unet-dual and deeplabv2, the forward's FLOPs are counted (``torch.utils.flop_counter``) and its
time measured for every combination of torch threads, memory format (contiguous / channels-last) and
batch size (median of the repeats). The peak is the fastest float32 matrix product the machine runs,
measured in the same run (before and after the models) through each of torch's CPU matmul back-ends:
``torch.mm`` (MKL's sgemm, which on some CPUs, e.g. AMD's, runs narrower vector code) and the same
product as a 1 x 1 convolution on channels-last data (oneDNN, the library the models' convolutions
run in). Reported: the best setting per model and the setting predict runs, each as a fraction of
that peak; a fraction above 100 % would mean the peak was not the machine's and is flagged.

    python benchmarks/flops.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(threads: list[int], repeats: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s (median of ``repeats``) of an n x n x n product per dtype, back-end and thread count.

    Back-ends: ``mm`` is ``torch.mm`` (MKL); ``conv1x1`` is the same product as a 1 x 1 convolution of
    a channels-last ``(1, n, n/64, 64)`` input with ``n`` output channels (oneDNN, as the models' layers).
    """
    out = {}
    flop = 2 * n**3
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        x = torch.randn(1, n, n // 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)
        fns = {
            "mm": lambda a=a, b=b: torch.mm(a, b),
            "conv1x1": lambda x=x, w=w: torch.nn.functional.conv2d(x, w),
        }
        for t in threads:
            torch.set_num_threads(t)
            with torch.inference_mode():
                times = c.interleaved(fns, repeats + 2)
            for backend, ts in times.items():
                out[f"{str(dtype).split('.')[-1]} {backend} {t} thread(s)"] = flop / c.median(ts) / 1e9
    return out


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass on ``x``."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from napari_apl.core.models import build_model

    rep = c.Report("flops", "Goal 3: forward FLOP/s against the measured matmul peak")
    default_threads = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    threads = sorted({1, cpus} | ({default_threads} if not args.quick else set()))
    peak_before = matmul_peak(threads, args.repeats)
    models = {
        "unet-dual": (build_model("unet-dual", base=16).eval(), (160, 160), [1, 4, 8, 16]),
        "deeplabv2": (build_model("deeplabv2").eval(), (160, 160), [1, 4, 8]),
    }
    if args.quick:
        models = {
            "unet-dual": (build_model("unet-dual", base=8).eval(), (64, 64), [1, 4]),
            "deeplabv2": (build_model("deeplabv2").eval(), (48, 48), [1]),
        }
    results: dict[str, list[dict]] = {}
    for name, (model, hw, batches) in models.items():
        per_slice = forward_flops(model, torch.randn(1, 1, *hw))
        rows = []
        for t, fmt, bs in itertools.product(threads, ("contiguous", "channels_last"), batches):
            torch.set_num_threads(t)
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            m = model.to(memory_format=mf)
            x = torch.randn(bs, 1, *hw).contiguous(memory_format=mf)

            def fwd(m=m, x=x) -> None:
                with torch.inference_mode():
                    m(x)

            times = c.interleaved({"f": fwd}, args.repeats)["f"]
            best = c.median(times)
            rows.append(
                {
                    "threads": t,
                    "format": fmt,
                    "batch": bs,
                    "seconds": best,
                    "gflops": per_slice * bs / best / 1e9,
                }
            )
            print(f"{name} threads={t} {fmt} batch={bs}: {rows[-1]['gflops']:.2f} GFLOP/s", flush=True)
        model.to(memory_format=torch.contiguous_format)
        results[name] = rows
        results[name + " gflop_per_slice"] = per_slice / 1e9  # type: ignore[assignment]
    peak_after = matmul_peak(threads, args.repeats)
    torch.set_num_threads(default_threads)
    both = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    for dtype in ("float32", "bfloat16"):
        for backend in ("mm", "conv1x1"):
            best_t = max((v, k) for k, v in both.items() if k.startswith(f"{dtype} {backend} "))
            rep.add(
                f"{dtype} {backend} matmul (2048^3), best thread count",
                best_t[0],
                "GFLOP/s",
                note=best_t[1].split(" ", 2)[2] + ("" if dtype == "float32" else "; for reference"),
            )
    peak, peak_key = max((v, k) for k, v in both.items() if k.startswith("float32"))
    rep.add("float32 peak: the fastest of these", peak, "GFLOP/s", note=peak_key)
    batch = 8  # predict's batch (SlicePredictor's default), channels-last weights and input, default threads
    for name in models:
        rows = results[name]
        best = max(rows, key=lambda r: r["gflops"])
        used = [
            r
            for r in rows
            if r["threads"] == default_threads and r["format"] == "channels_last" and r["batch"] == batch
        ]
        rep.add(f"{name} GFLOP per slice", results[name + " gflop_per_slice"], "GFLOP")  # type: ignore[arg-type]
        rep.add(
            f"{name} best forward",
            best["gflops"],
            "GFLOP/s",
            note=f"threads {best['threads']}, {best['format']}, batch {best['batch']}",
        )
        for label, row in (("best", best), ("as predict runs it", used[0] if used else None)):
            if row is None:  # --quick leaves predict's batch out
                continue
            frac = row["gflops"] / peak * 100
            rep.add(
                f"{name} {label} / peak",
                frac,
                "%",
                note=(f"threads {row['threads']}, {row['format']}, batch {row['batch']}")
                + ("; ABOVE the measured peak: the peak is not this machine's" if frac > 100 else ""),
            )
    rep.details = {"matmul_gflops_before": peak_before, "matmul_gflops_after": peak_after, "runs": results}
    rep.note(
        "every time is the median of the repeats; the peak is the best back-end and thread count, so it is "
        "the fastest product the machine was seen to run, not a clock-rate figure"
    )
    rep.note(
        "FLOPs = 2 x multiply-adds of convolutions and matrix products (torch.utils.flop_counter); "
        "on a machine shared with other jobs every figure is a lower bound and the best setting can change "
        "between runs (many threads suffer most when cores are oversubscribed)"
    )
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
