"""``napari-apl demo``: napari with the phantom CT, its ground truth, the demo model and the APL widget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCREENSHOT_DELAY_MS = 800
FIT_DELAY_MS = 200


def launch_demo(*, screenshot: str | Path | None = None, quit_after: bool = False, run: bool = True) -> Any:
    """Open the demo viewer and return it; with ``screenshot``, predict first and save a window PNG."""
    import napari
    from qtpy.QtCore import QTimer

    from .widgets import WIDGET_NAME

    viewer = napari.Viewer(title="napari-apl demo")
    layers = viewer.open_sample("napari-apl", "ct_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    widget.image_combo.set_layer(layers[0])
    widget.export_panel.gt_combo.set_layer(layers[1])
    widget.set_radiological(True)
    if widget.controller.model is None:
        widget.use_demo_checkpoint()  # a missing demo file becomes a notification, not a crash
    viewer.layers.selection.active = layers[0]
    # fit the scan to the canvas once the window is laid out (the docked widget narrows the canvas)
    QTimer.singleShot(FIT_DELAY_MS, viewer.reset_view)

    if screenshot is not None:
        out = Path(screenshot).expanduser()

        def shoot() -> None:
            viewer.screenshot(str(out), canvas_only=False)
            print(f"wrote {out}")
            if quit_after:
                viewer.close()

        def after_predict(busy: bool) -> None:
            if busy:
                return
            widget.controller.busy_changed.disconnect(after_predict)
            QTimer.singleShot(SCREENSHOT_DELAY_MS, shoot)

        if widget.controller.model is not None and widget.predict():
            widget.controller.busy_changed.connect(after_predict)
        else:
            QTimer.singleShot(SCREENSHOT_DELAY_MS, shoot)
    if run:
        napari.run()
    return viewer
