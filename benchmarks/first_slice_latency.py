"""Goal 6: after Predict on a 512 x 512 x 300 CT, the visible slice's prediction shows within 1 s.

In a real napari viewer (Xvfb) holding the synthetic CT: the on-demand path (``core.infer.SlicePredictor``
layers: the five maps as lazy arrays whose visible slice is predicted when napari draws it, while the
whole volume completes in a background thread) is timed from Predict to the five layers showing the
current slice, then to the full volume; the APL widget's own Predict (its controller) is timed to
the visible slice's pseudo labels being drawn: first as the session's first Predict (the widget just
opened, no Labels layer built yet in the process: what a user meets), then a second time. Also: the Qt
event loop's longest stall while the volume completes in the background.

    python benchmarks/first_slice_latency.py [--slices 300] [--skip-widget]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import numpy as np

GOAL_S = 1.0


class TickGaps:
    """A Qt timer that records the gaps between its ticks (event-loop stalls)."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self.stamps: list[float] = []
        self._last = time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self.stamps.append(now)
        self._last = now

    def stop(self) -> list[float]:
        """Stop and return the gaps (seconds)."""
        self.timer.stop()
        return self.gaps


def on_demand(viewer, layer, model, meta) -> dict:
    """Predict through lazy layers; return the latencies."""
    import torch
    from napari.qt.threading import create_worker

    from napari_apl._layers import label_colormap, transform_kwargs, volume_from_layer
    from napari_apl.core.infer import SlicePredictor
    from napari_apl.widgets._controller import _task_threads

    before = torch.get_num_threads()
    torch.set_num_threads(_task_threads(os.cpu_count() or 1, before))  # as the widget runs its tasks
    t0 = time.perf_counter()
    sp = SlicePredictor(model, meta, volume_from_layer(layer), device="cpu")
    arrays = sp.as_layer_arrays()
    kw = transform_kwargs(layer)
    kw.pop("metadata", None)
    # the pseudo labels first (visible: napari draws the current slice, which predicts it), then the
    # other four hidden (as the widget shows them), which napari does not slice until shown
    viewer.add_labels(
        arrays["pseudo_label"], name="pseudo_label", colormap=label_colormap(), opacity=0.5, **kw
    )
    c.process_events()
    k = int(viewer.dims.current_step[0])
    shown = time.perf_counter() - t0
    assert sp.done[k], "the visible slice was not predicted"
    first_done = int(sp.done.sum())
    for name in ("main", "aux"):
        viewer.add_labels(
            arrays[name], name=name, colormap=label_colormap(), opacity=0.5, visible=False, **kw
        )
    for name, cmap in (("confidence", "viridis"), ("consistency", "inferno")):
        viewer.add_image(
            arrays[name], name=name, colormap=cmap, contrast_limits=(0.0, 1.0), visible=False, **kw
        )
    c.process_events()
    all_layers = time.perf_counter() - t0
    # the rest in a background thread worker, as the widget would
    gaps = TickGaps()
    worker = create_worker(sp.run, _start_thread=False)
    finished: list[float] = []
    worker.finished.connect(lambda: finished.append(time.perf_counter()))
    worker.start()
    while not finished:
        c.process_events(0.05)
    tick = np.asarray(gaps.stop())
    torch.set_num_threads(before)
    total = finished[0] - t0
    # swap the lazy arrays for the finished numpy maps (napari's layer order is a free view)
    for name, arr in sp.prediction.as_dict().items():
        viewer.layers[name].data = arr.T
    c.process_events(0.2)
    return {
        "visible_slice_s": shown,
        "five_layers_s": all_layers,
        "slices_computed_when_shown": first_done,
        "full_volume_s": total,
        "max_stall_ms": float(tick.max() * 1000) if tick.size else 0.0,
        "p99_tick_gap_ms": float(np.percentile(tick, 99) * 1000) if tick.size else 0.0,
    }


def remove_other_layers(viewer, layer) -> None:
    """Leave only the CT in the viewer."""
    for name in [ly.name for ly in viewer.layers if ly is not layer]:
        viewer.layers.remove(name)
    c.process_events(0.2)


def widget_predict(viewer, layer, ctl) -> dict:
    """Time the APL widget's Predict until the visible slice's pseudo labels are drawn, then until done."""
    from napari_apl.widgets._controller import LAYER_PSEUDO

    remove_other_layers(viewer, layer)
    k = int(viewer.dims.current_step[0])
    gaps = TickGaps()
    t0 = time.perf_counter()
    assert ctl.predict(layer)
    first = None
    while ctl.busy or first is None:
        c.process_events(0.005)
        if first is None and LAYER_PSEUDO in viewer.layers:
            data = viewer.layers[LAYER_PSEUDO].data
            predictor = getattr(data, "predictor", None)
            drawn = viewer.layers[LAYER_PSEUDO]._slice.image.raw
            if (predictor is None or predictor.done[k]) and drawn is not None and drawn.size:
                first = time.perf_counter() - t0
        if not ctl.busy and first is None:
            break
    done = time.perf_counter() - t0
    tick = np.asarray(gaps.stop())
    return {
        "first_visible_s": first,
        "done_s": done,
        "max_stall_ms": float(tick.max() * 1000) if tick.size else 0.0,
        "p99_tick_gap_ms": float(np.percentile(tick, 99) * 1000) if tick.size else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--skip-widget", action="store_true", help="do not time the widget's full-volume Predict")
    args = ap.parse_args(argv)

    from napari_apl.core.checkpoint import save_checkpoint
    from napari_apl.widgets._controller import _LAZY_STEP_MS

    rep = c.Report("first_slice_latency", "Goal 6: first visible prediction after Predict")
    shape = (c.BIG_SHAPE[0], c.BIG_SHAPE[1], args.slices)
    image = c.synthetic_ct_file(shape)
    model, meta, source = c.demo_like_model()
    ckpt = save_checkpoint(Path(tempfile.mkdtemp(prefix="apl_fsl_")) / "model.pt", model, meta)
    viewer, layer = c.viewer_with_ct(image)
    widget = again = None
    if not args.skip_widget:
        from napari_apl.widgets import APLController

        ctl = APLController(viewer)  # as the dock widget opens
        assert ctl.load_checkpoint(ckpt) is not None
        widget = widget_predict(viewer, layer, ctl)  # the session's first Predict, as a user meets it
        again = widget_predict(viewer, layer, ctl)
        remove_other_layers(viewer, layer)
    lazy = on_demand(viewer, layer, model, meta)
    rep.add(
        "on-demand: pseudo-label of the visible slice shown after", lazy["visible_slice_s"], "s", goal=GOAL_S
    )
    rep.add("on-demand layers: all five layers in the viewer after", lazy["five_layers_s"], "s")
    rep.add("on-demand layers: whole volume done after", lazy["full_volume_s"], "s")
    rep.add("event-loop longest stall while the volume completes", lazy["max_stall_ms"], "ms")
    rep.add("event-loop p99 tick gap while the volume completes", lazy["p99_tick_gap_ms"], "ms")
    if widget is not None and again is not None:
        for which, run in (("the session's first Predict", widget), ("Predict again (new layers)", again)):
            if run["first_visible_s"] is not None:
                rep.add(
                    f"APL widget, {which}: visible slice's pseudo labels drawn after",
                    run["first_visible_s"],
                    "s",
                    goal=GOAL_S,
                    note="a lazy pseudo-label layer at once; the worker fills the volume",
                )
        for which, run in (("the session's first Predict", widget), ("Predict again", again)):
            rep.add(f"APL widget, {which}: whole volume done after", run["done_s"], "s")
            rep.add(f"APL widget, {which}: event-loop longest stall", run["max_stall_ms"], "ms")
            rep.add(f"APL widget, {which}: event-loop p99 tick gap", run["p99_tick_gap_ms"], "ms")
    viewer.close()
    rep.details = {
        "volume": f"{shape} int16",
        "model": source,
        "on_demand": lazy,
        "widget": widget,
        "widget_again": again,
        "display": c.display_kind(),
    }
    rep.note(
        "on-demand path = SlicePredictor.as_layer_arrays() given to napari (the visible slice is predicted "
        "when napari draws it; the rest by SlicePredictor.run() in a thread worker); the widget's Predict "
        "does the same: at the click it builds only the visible pseudo-label layer, the four hidden maps "
        f"follow lazily {_LAZY_STEP_MS} ms apart (the controller's timer), and when its worker "
        "has the whole volume every layer gets the finished maps (views of the prediction, no float32 "
        "copies)"
    )
    rep.note(
        "the widget's Predict runs first, in a process that has built no Labels layer yet: the widget, as "
        "it opens, does the one-time work of a first Labels layer (pandas, scikit-image, vispy's dash "
        "patterns) and Predict sets the objects alive aside from garbage collection before it builds the "
        "layer (a full collection there was the longest stall when it was measured, 2026-11-27); the "
        "on-demand rows run after it"
    )
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
