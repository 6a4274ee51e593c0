"""Goal 5: peak resident memory of predicting a 512 x 512 x 300 int16 CT, on the command line and in a viewer.

Each measurement runs in a fresh Python process and reports its own peak RSS (``VmHWM``, in GB of 10^9
bytes):
``cli``: ``napari-apl predict`` (the .nii.gz streamed slice by slice, the maps compressed as they are
predicted); ``viewer``: a real napari viewer (Xvfb) holding the CT, the APL widget's controller
predicting it as its Predict button does (lazy layers for the visible slice while the volume completes
in its worker, then the finished maps), and its five layers, with the next refinement's set-up the
widget makes after Predict (peak over the whole run, and resident at the end).

    python benchmarks/memory.py [--slices 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

GOAL_CLI_GB = 1.5
GOAL_VIEWER_GB = 2.5


def _child(kind: str, image: Path, ckpt: Path, out: Path) -> dict:
    """Run one measurement in this (fresh) process."""
    import contextlib
    import io

    result: dict = {"kind": kind}
    if kind == "cli":
        from napari_apl import cli

        argv = [
            "predict",
            str(image),
            "-c",
            str(ckpt),
            "-o",
            str(out),
            "--overwrite",
            "-q",
            "--device",
            "cpu",
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(argv) == 0
    else:
        from napari_apl.widgets import APLController

        viewer, layer = c.viewer_with_ct(image)
        result["after_open_gb"] = c.rss_gb()
        ctl = APLController(viewer)
        assert ctl.load_checkpoint(ckpt) is not None
        assert ctl.predict(layer)  # as the Predict button: in the worker, with the lazy layers
        c.run_event_loop_while(lambda: ctl.busy, linger_ms=500)
        ahead = ctl._ahead  # the next refinement's set-up, made after Predict (prepare_ahead): counted too
        result["set_up_made_ahead"] = ahead is not None
        if ahead is not None:
            c.run_event_loop_while(ahead.thread.is_alive)
            result["set_up_ready"] = ahead.start is not None
        result["layers"] = [ly.name for ly in viewer.layers]
        result["resident_gb"] = c.rss_gb()
        result["display"] = c.display_kind()
        viewer.close()
    result["peak_gb"] = c.peak_rss_gb()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--child``, one measurement) and write its results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--child", choices=("cli", "viewer"))
    ap.add_argument("--image")
    ap.add_argument("--checkpoint")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        print(
            json.dumps(_child(args.child, Path(args.image), Path(args.checkpoint), Path(args.out))),
            flush=True,
        )
        os._exit(0)  # skip interpreter teardown (Qt against a display that is being closed)

    from napari_apl.core.checkpoint import save_checkpoint

    rep = c.Report("memory", "Goal 5: peak resident memory, 512 x 512 x 300 int16 CT")
    shape = (c.BIG_SHAPE[0], c.BIG_SHAPE[1], args.slices)
    image = c.synthetic_ct_file(shape)
    model, meta, source = c.demo_like_model(16)
    tmp = Path(tempfile.mkdtemp(prefix="apl_mem_"))
    ckpt = save_checkpoint(tmp / "model.pt", model, meta)
    runs = {}
    for kind in ("cli", "viewer"):
        cmd = [sys.executable, __file__, "--child", kind, "--image", str(image), "--checkpoint", str(ckpt)]
        cmd += ["--out", str(tmp / kind)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            rep.note(f"{kind} failed: {last}")
            continue
        runs[kind] = json.loads(lines[-1])
        print(kind, runs[kind], flush=True)
    if "cli" in runs:
        rep.add("napari-apl predict peak RSS", runs["cli"]["peak_gb"], "GB", goal=GOAL_CLI_GB)
    if "viewer" in runs:
        v = runs["viewer"]
        ahead = " and the set-up made after it" if v.get("set_up_made_ahead") else ""
        rep.add(
            f"viewer: CT + five layers, peak RSS during predict{ahead}",
            v["peak_gb"],
            "GB",
            goal=GOAL_VIEWER_GB,
        )
        rep.add(f"viewer: resident after predict{ahead}", v["resident_gb"], "GB", goal=GOAL_VIEWER_GB)
        rep.add("viewer: resident with the CT open (before predict)", v["after_open_gb"], "GB")
    volume_gb = shape[0] * shape[1] * shape[2] * 2 / 1e9
    rep.details = {
        "volume": f"{shape} int16 ({volume_gb:.2f} GB), {c.BIG_SPACING} mm",
        "model": source,
        "runs": runs,
    }
    rep.note(
        "each figure is a fresh process's own peak (VmHWM of /proc/self/status, which, unlike ru_maxrss, "
        "does not carry the peak of the process that started it); GB = 10^9 bytes"
    )
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
