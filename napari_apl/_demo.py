"""``napari-apl demo``: napari with the phantom CT, its ground truth, the demo model and the APL widget."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .core.errors import APLError
from .core.io_utils import atomic_write, check_output_path

SCREENSHOT_SIZE = (1500, 950)  # window size of --screenshot (and of scripts/screenshots.py)
SCREENSHOT_DELAY_MS = 800
FIT_DELAY_MS = 200  # the scan is fitted this long after the canvas last changed size
FIT_WINDOW_MS = 3000  # ... during this long after start (later resizes are the user's: zoom kept)


def check_display() -> None:
    """Refuse in one line to open napari where Qt would find no screen (Linux without a display)."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise APLError(
            "no display to open napari on (DISPLAY is not set): run it on a desktop, or headless under "
            "a virtual display: xvfb-run -a napari-apl demo"
        )


def check_screenshot_path(path: str | Path, overwrite: bool = False) -> Path:
    """Check before napari starts that a screenshot can be written to ``path``; return it."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise APLError(f"--screenshot {out}: give a .png file name")
    return check_output_path(out, overwrite=overwrite)  # folder, writability, an existing file


def launch_demo(
    *,
    screenshot: str | Path | None = None,
    quit_after: bool = False,
    run: bool = True,
    outcome: dict[str, Any] | None = None,
) -> Any:
    """Open the demo viewer and return it; with ``screenshot``, predict first and save a window PNG.

    A screenshot that could not be written is recorded in ``outcome["screenshot_error"]`` (the command
    then exits with status 2).
    """
    import napari
    from qtpy.QtCore import QTimer

    from .widgets import WIDGET_NAME

    viewer = napari.Viewer(title="napari-apl demo")
    layers = viewer.open_sample("napari-apl", "ct_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    widget.image_combo.set_layer(layers[0])
    widget.export_panel.gt_combo.set_layer(layers[1])
    widget.set_radiological(True)
    # the ground truth as outlines: filled under the filled prediction, in the same colours, it would
    # hide what the prediction misses
    layers[1].contour = 1
    layers[1].opacity = 0.9
    if widget.controller.model is None:
        widget.use_demo_checkpoint()  # a missing demo file becomes a notification, not a crash
    viewer.layers.selection.active = layers[0]
    _fit_while_laying_out(viewer)

    if screenshot is not None:
        out = Path(screenshot).expanduser()
        # the size of the README's figures: napari's own default (about 1190 x 630 under Xvfb) shows three
        # of the seven layers, half the Inspect tab and a canvas a quarter of the window wide
        viewer.window.resize(*SCREENSHOT_SIZE)

        def shoot() -> None:
            # no half-written PNG, and a failure is one line (the path was checked before napari started)
            try:
                atomic_write(out, lambda tmp: viewer.screenshot(str(tmp), canvas_only=False), overwrite=True)
                print(f"wrote {out}")
            except Exception as exc:
                message = f"the screenshot could not be written to {out}: {' '.join(str(exc).split())}"
                print(f"napari-apl demo: error: {message}", file=sys.stderr)
                if outcome is not None:
                    outcome["screenshot_error"] = message
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


def _fit_while_laying_out(viewer: Any) -> None:
    """Fit the scan to the canvas once the window has settled (the docked widget narrows the canvas,
    and its width settles only after napari's style is applied), then leave the zoom to the user."""
    from qtpy.QtCore import QElapsedTimer, QEvent, QObject, QTimer

    native = getattr(viewer.window._qt_viewer.canvas, "native", None)
    timer = QTimer(viewer.window._qt_window)
    timer.setSingleShot(True)
    timer.timeout.connect(viewer.reset_view)
    timer.start(FIT_DELAY_MS)
    if native is None:
        return
    clock = QElapsedTimer()
    clock.start()

    class _Refit(QObject):
        def eventFilter(self, obj: QObject, event: QEvent) -> bool:
            if event.type() == QEvent.Type.Resize:
                if clock.elapsed() < FIT_WINDOW_MS:
                    timer.start(FIT_DELAY_MS)
                else:
                    obj.removeEventFilter(self)
            return False

    native.installEventFilter(_Refit(native))  # owned by the canvas
