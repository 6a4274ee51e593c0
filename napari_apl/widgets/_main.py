"""The APL dock widget: model and image choice, Predict, and the Inspect / Refine / Export tabs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import FileEdit
from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.preprocess import PRESETS
from ..core.utils import DEVICES
from ._common import LayerCombo
from ._controller import AUTO_PRESET, CHECKPOINT_PRESET, PREDICTION_LAYERS, APLController
from ._export import ExportPanel
from ._inspect import InspectPanel
from ._refine import RefinePanel

WIDGET_NAME = "Adaptive pseudo labelling"
RADIOLOGICAL = ("up", "left")  # napari 2-D camera: row index grows upward, column index leftward


class APLWidget(QWidget):
    """Dock widget for source-free adaptation: predict, inspect, refine and export (all maths in the core)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("napari_apl_widget")
        self.viewer = napari_viewer
        self.controller = ctl = APLController(napari_viewer)
        self._orientation_before = tuple(_camera(napari_viewer).orientation2d)

        # -- model and image ---------
        self.image_combo = LayerCombo(napari_viewer, Image, exclude=PREDICTION_LAYERS)
        self.demo_radio = QRadioButton("bundled demo model")
        self.file_radio = QRadioButton("checkpoint file")
        self.demo_radio.setChecked(True)
        self.checkpoint_file = FileEdit(mode="r", filter="*.pt *.pth", value="")
        self.load_button = QPushButton("Load model")
        self.summary = QPlainTextEdit()
        self.summary.setReadOnly(True)
        self.summary.setMaximumHeight(110)
        self.summary.setPlaceholderText("no model loaded")
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([AUTO_PRESET, CHECKPOINT_PRESET, *PRESETS])
        self.preset_combo.setToolTip(
            "intensity normalisation: auto = CT window L40/W400 for Hounsfield units, "
            "else the checkpoint's own"
        )
        self.radiological = QCheckBox("radiological view")
        self.radiological.setToolTip(
            "anterior up and the patient's right on the left of the screen (2-D view)"
        )
        self.predict_button = QPushButton("Predict")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        source = QHBoxLayout()
        source.addWidget(self.demo_radio)
        source.addWidget(self.file_radio)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", source)
        form.addRow("", self.checkpoint_file.native)
        form.addRow("", self.load_button)
        form.addRow("device", self.device_combo)
        form.addRow("intensity", self.preset_combo)
        form.addRow("display", self.radiological)

        self.inspect = InspectPanel(ctl)
        self.refine_panel = RefinePanel(ctl, image_getter=self.image_combo.layer)
        self.export_panel = ExportPanel(ctl)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.inspect, "Inspect")
        self.tabs.addTab(self.refine_panel, "Refine")
        self.tabs.addTab(self.export_panel, "Export")

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.summary)
        layout.addWidget(self.predict_button)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.status)

        # -- wiring ---------
        self.load_button.clicked.connect(self.load_model)
        self.predict_button.clicked.connect(lambda: self.predict())
        self.checkpoint_file.changed.connect(lambda *_: self.file_radio.setChecked(True))
        self.device_combo.currentTextChanged.connect(self._set_device)
        self.preset_combo.currentTextChanged.connect(self._set_preset)
        ctl.status.connect(self.status.setText, check_nargs=False)
        ctl.model_changed.connect(self._on_model_changed)
        self.radiological.toggled.connect(self.set_radiological)
        ctl.busy_changed.connect(self._on_busy)
        self._layer_events = (
            napari_viewer.layers.events.inserted,
            napari_viewer.layers.events.removed,
        )
        for emitter in self._layer_events:
            emitter.connect(self._refresh_layers)
        self.destroyed.connect(
            _disconnecter(self._layer_events, self._refresh_layers, napari_viewer, self.inspect, ctl)
        )
        if ctl.model is None and self.demo_available():
            self.use_demo_checkpoint()

    # -- actions ---------
    @staticmethod
    def demo_available() -> bool:
        """Whether the bundled demo checkpoint is installed."""
        from .._sample_data import demo_checkpoint_path

        return demo_checkpoint_path() is not None

    def use_demo_checkpoint(self) -> str | None:
        """Select and load the bundled demo model."""
        self.demo_radio.setChecked(True)
        return self.controller.load_checkpoint(None)

    def load_model(self) -> str | None:
        """Load the model chosen in the widget (demo or file)."""
        if self.demo_radio.isChecked():
            return self.controller.load_checkpoint(None)
        path = str(self.checkpoint_file.value)
        if path in ("", "."):
            self.controller.error("no checkpoint file chosen: choose a .pt file or the demo model")
            return None
        return self.controller.load_checkpoint(Path(path))

    def predict(self, sync: bool = False) -> bool:
        """Predict the chosen image layer with the loaded model."""
        return self.controller.predict(self.image_combo.layer(), sync=sync)

    def set_radiological(self, on: bool) -> None:
        """Show axial slices the radiological way (anterior up, patient's right on the left) or back."""
        camera = _camera(self.viewer)
        if on and tuple(camera.orientation2d) != RADIOLOGICAL:
            self._orientation_before = tuple(camera.orientation2d)
        camera.orientation2d = RADIOLOGICAL if on else self._orientation_before
        self.viewer.reset_view()
        if self.radiological.isChecked() != on:
            self.radiological.setChecked(on)

    def _on_model_changed(self, summary: str) -> None:
        from .._sample_data import demo_checkpoint_path

        self.summary.setPlainText(summary)
        path = self.controller.checkpoint_path
        demo = demo_checkpoint_path()
        is_demo = path is not None and demo is not None and Path(path).resolve() == demo.resolve()
        (self.demo_radio if is_demo else self.file_radio).setChecked(True)
        if not is_demo and path is not None and Path(str(self.checkpoint_file.value)) != Path(path):
            with self.checkpoint_file.changed.blocked():
                self.checkpoint_file.value = path

    def _set_device(self, name: str) -> None:
        self.controller.device = name

    def _set_preset(self, name: str) -> None:
        self.controller.preset = name

    def _refresh_layers(self, event: Any = None) -> None:
        self.image_combo.refresh()
        self.export_panel.gt_combo.refresh()

    def _on_busy(self, busy: bool) -> None:
        for w in (
            self.predict_button,
            self.load_button,
            self.image_combo,
            self.device_combo,
            self.preset_combo,
        ):
            w.setEnabled(not busy)


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _disconnecter(
    emitters: tuple, callback: Any, viewer: Any, inspect: InspectPanel, controller: APLController
) -> Any:
    """Return a function that stops a running task and drops the viewer callbacks when the widget goes."""
    on_dims = inspect._on_dims

    def disconnect(*_: Any) -> None:
        for signal in (
            controller.status,
            controller.busy_changed,
            controller.model_changed,
            controller.predicted,
            controller.refine_event,
            controller.refine_finished,
        ):
            signal.disconnect()  # the Qt side is gone: nothing may be called on it any more
        controller.stop()
        for emitter in emitters:
            try:
                emitter.disconnect(callback)
            except Exception:  # already gone with the viewer
                pass
        try:
            viewer.dims.events.point.disconnect(on_dims)
        except Exception:
            pass

    return disconnect


def find_apl_widget(viewer: Any) -> APLWidget | None:
    """Return the APL widget docked in ``viewer``, if any."""
    window = getattr(viewer, "window", None)
    docked = getattr(window, "dock_widgets", None)
    for inner in list(docked.values()) if docked is not None else []:
        native = getattr(inner, "native", inner)
        if isinstance(native, APLWidget):
            return native
        found = native.findChild(APLWidget) if hasattr(native, "findChild") else None
        if found is not None:
            return found
    return None
