"""Goal 3: the model forward's achieved FLOP/s against the machine's measured peak (a large matmul).

For unet-dual and deeplabv2, the forward's FLOPs are counted (``torch.utils.flop_counter``) and its
time measured for every combination of torch threads, memory format (contiguous / channels-last) and
batch size; the peak is the best float32 matrix product (2048 x 2048) at any thread count, measured in
the same run (before and after the models). Reported: the best setting per model and its fraction of
the peak, and the default setting's.

    python benchmarks/flops.py [--quick] [--repeats 2]
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
    """Best GFLOP/s of an ``n x n`` float32 (and bfloat16) matrix product per thread count."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        for t in threads:
            torch.set_num_threads(t)
            times = c.interleaved({"mm": lambda a=a, b=b: a @ b}, repeats + 2)["mm"]
            out[f"{str(dtype).split('.')[-1]} {t} thread(s)"] = 2 * n**3 / min(times) / 1e9
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
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from napari_apl.core.models import build_model

    rep = c.Report("flops", "Goal 3: forward FLOP/s against the measured matmul peak")
    default_threads = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    threads = sorted({1, cpus} | ({default_threads} if not args.quick else set()))
    peak_before = matmul_peak(threads, args.repeats)
    models = {
        "unet-dual": (build_model("unet-dual", base=16).eval(), (160, 160), [1, 4, 8, 16]),
        "deeplabv2": (build_model("deeplabv2").eval(), (160, 160), [1, 4]),
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
            best = min(times)
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
    peak = max(v for k, v in {**peak_before, **peak_after}.items() if k.startswith("float32"))
    rep.add("float32 matmul peak (2048^3, best of runs)", peak, "GFLOP/s")
    bf16 = max(v for k, v in {**peak_before, **peak_after}.items() if k.startswith("bfloat16"))
    rep.add("bfloat16 matmul peak (for reference)", bf16, "GFLOP/s")
    for name in models:
        rows = results[name]
        best = max(rows, key=lambda r: r["gflops"])
        default = [r for r in rows if r["threads"] == default_threads and r["format"] == "contiguous"]
        dflt = max(default, key=lambda r: r["batch"]) if default else best
        rep.add(f"{name} GFLOP per slice", results[name + " gflop_per_slice"], "GFLOP")  # type: ignore[arg-type]
        rep.add(
            f"{name} best forward",
            best["gflops"],
            "GFLOP/s",
            note=f"threads {best['threads']}, {best['format']}, batch {best['batch']}",
        )
        rep.add(f"{name} best / peak", best["gflops"] / peak * 100, "%")
        rep.add(
            f"{name} default setting / peak",
            dflt["gflops"] / peak * 100,
            "%",
            note=f"threads {dflt['threads']}, contiguous, batch {dflt['batch']}",
        )
    rep.details = {"matmul_gflops_before": peak_before, "matmul_gflops_after": peak_after, "runs": results}
    rep.note(
        "FLOPs = 2 x multiply-adds of convolutions and matrix products (torch.utils.flop_counter); "
        "on a machine shared with other jobs every figure is a lower bound and the best setting can change "
        "between runs (many threads suffer most when cores are oversubscribed)"
    )
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
