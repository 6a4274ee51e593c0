"""Make the README screenshots from the real plugin (run: ``xvfb-run -a python scripts/screenshots.py``).

1. ``docs/images/demo_predict.png``: the demo viewer after Predict (the CT, the pseudo-label overlay and
   the docked widget's Inspect tab); ``demo_confidence.png`` and ``demo_consistency.png``: the canvas
   with only the scan and one of the two maps.
2. ``docs/images/demo_refine.png``: the same viewer while a refinement is running (Refine tab, live
   loss and ω plot, the overlay updated in place).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Open the demo, predict, screenshot; start a refinement, screenshot it mid-way; close."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--shoot-after", type=int, default=3, help="live updates before the refine shot")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a private autosave folder: the shots never offer (or leave) a recovered session
    os.environ["NAPARI_APL_AUTOSAVE_DIR"] = tempfile.mkdtemp(prefix="napari-apl-shots-")

    import napari
    from qtpy.QtCore import QTimer

    from napari_apl._demo import SCREENSHOT_SIZE, launch_demo

    viewer = launch_demo(run=False)
    viewer.window.resize(*SCREENSHOT_SIZE)
    widget = next(w for w in viewer.window.dock_widgets.values() if hasattr(w, "controller"))
    ctl = widget.controller
    if not widget.predict(sync=True):
        print("predict failed", file=sys.stderr)
        return 1
    viewer.dims.set_current_step(0, viewer.layers["pseudo-label"].data.shape[0] // 2)
    napari.qt.get_qapp().processEvents()
    viewer.screenshot(str(out / "demo_predict.png"), canvas_only=False)
    print(f"wrote {out / 'demo_predict.png'}")
    # the two maps over the scan, each alone (the labels hidden): where the model hesitates / disagrees
    shown = {layer.name: layer.visible for layer in viewer.layers}
    for layer in viewer.layers:
        layer.visible = layer.name == widget.image_combo.layer().name
    for name, file in (("confidence ω", "demo_confidence.png"), ("consistency", "demo_consistency.png")):
        viewer.layers[name].visible = True
        napari.qt.get_qapp().processEvents()
        viewer.screenshot(str(out / file), canvas_only=True)
        viewer.layers[name].visible = False
        print(f"wrote {out / file}")
    for layer in viewer.layers:
        layer.visible = shown[layer.name]

    widget.tabs.setCurrentWidget(widget.refine_panel)
    widget.refine_panel.iterations.setValue(args.iterations)
    seen = {"updates": 0, "shot": False}

    def on_event(_ev) -> None:
        seen["updates"] += 1
        if seen["updates"] >= args.shoot_after * 5 and not seen["shot"]:
            seen["shot"] = True
            QTimer.singleShot(300, shoot)

    def shoot() -> None:
        bar = widget.scroll.verticalScrollBar()  # the panel scrolled down to its live plots
        bar.setValue(bar.maximum())
        napari.qt.get_qapp().processEvents()
        viewer.screenshot(str(out / "demo_refine.png"), canvas_only=False)
        print(f"wrote {out / 'demo_refine.png'}")
        ctl.stop()

    def on_busy(busy: bool) -> None:
        if not busy and seen["shot"]:
            QTimer.singleShot(200, viewer.close)

    ctl.refine_event.connect(on_event)
    ctl.busy_changed.connect(on_busy)
    widget.refine_panel.start()
    napari.run()
    return 0 if seen["shot"] else 1


if __name__ == "__main__":
    sys.exit(main())
