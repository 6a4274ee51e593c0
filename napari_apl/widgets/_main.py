"""The APL dock widget: model and image choice, Predict, and the Inspect / Refine / Export tabs."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

from magicgui.widgets import FileEdit
from napari.layers import Image
from napari.utils.notifications import show_warning
from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .._layers import unwrap_layer
from ..core.preprocess import PRESETS
from ..core.utils import DEVICES
from ._common import LayerCombo
from ._controller import (
    AUTO_PRESET,
    CHECKPOINT_PRESET,
    LAYER_PSEUDO,
    APLController,
    is_map_layer,
    layer_role,
)
from ._export import ExportPanel
from ._inspect import InspectPanel
from ._refine import RefinePanel

log = logging.getLogger(__name__)

WIDGET_NAME = "Adaptive pseudo labelling"
RADIOLOGICAL = ("up", "left")  # napari 2-D camera: row index grows upward, column index leftward
CORRECTIONS_COUNT_DEBOUNCE_MS = 400  # the Refine panel's count of painted voxels, after the strokes pause
AUTOSAVE_DEBOUNCE_MS = 2000  # an autosave waits this long after the first brush stroke (and the interval)
CLOSE_QUESTION = "A refinement is running: stop it and close?"
STATUS_LINES = 3  # the status line's height at most, in lines of text (the rest of a message is cut)


class _CloseGuard(QObject):
    """Event filter on napari's main window: asks before closing during a refinement, then shuts down."""

    def __init__(self, controller: APLController, parent: QObject) -> None:
        super().__init__(parent)
        self.controller = controller

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        """Let the controller decide whether a close of the main window goes ahead."""
        if event.type() != QEvent.Type.Close:
            return False
        try:
            go_on = self.controller.request_close()
        except Exception:  # never trap the user in the window because of a bug here
            log.exception("napari-apl: preparing the close failed")
            return False
        if go_on:
            return False  # napari's own closeEvent runs next
        event.ignore()
        return True


class _PaintWatcher:
    """Starts the autosave timer when the user paints in the pseudo-label layer (no Qt parent)."""

    def __init__(self, timer: QTimer, controller: APLController, count_timer: QTimer | None = None) -> None:
        self.timer = timer
        self.controller = controller
        self.count_timer = count_timer  # restarted on each stroke: the corrections are counted after them
        self.layer: Any = None
        self.history: tuple[int, int] | None = None  # the layer's undo/redo lengths at the last count

    def watch(self, layer: Any) -> None:
        """Follow ``layer``'s paint events (and stop following the previous layer's)."""
        if layer is self.layer:
            return
        self.disconnect()
        self.layer = layer
        self.history = _history_lengths(layer)
        if layer is not None:
            layer.events.paint.connect(self.on_paint)
            layer.events.set_data.connect(self.on_set_data)  # (undo and redo: no paint event)

    def disconnect(self) -> None:
        """Stop following paint events."""
        if self.layer is not None:
            try:
                self.layer.events.paint.disconnect(self.on_paint)
                self.layer.events.set_data.disconnect(self.on_set_data)
            except Exception:  # the layer is gone already
                pass
        self.layer = None

    def on_paint(self, event: Any = None) -> None:
        """Schedule an autosave (debounced; at most one per interval), unless one is scheduled already."""
        try:
            if not self.timer.isActive():
                wait_ms = int(1000 * self.controller.autosave_wait())
                self.timer.start(max(AUTOSAVE_DEBOUNCE_MS, wait_ms))
            if self.count_timer is not None:
                self.count_timer.start(CORRECTIONS_COUNT_DEBOUNCE_MS)
        except RuntimeError:  # the widget (and its timer) was deleted
            self.disconnect()

    def on_set_data(self, event: Any = None) -> None:
        """Recount the corrections after an undo or redo once things settle (napari sends ``set_data`` on
        every slice change too: only a change of the layer's undo/redo history counts)."""
        history = _history_lengths(self.layer)
        if history is not None and history == self.history:
            return
        self.history = history
        try:
            if self.count_timer is not None:
                self.count_timer.start(CORRECTIONS_COUNT_DEBOUNCE_MS)
        except RuntimeError:
            self.disconnect()


def _history_lengths(layer: Any) -> tuple[int, int] | None:
    """The lengths of a Labels layer's undo and redo histories (``None`` where napari keeps none)."""
    layer = unwrap_layer(layer)  # (as the controller's history reset: napari's proxy refuses private names)
    undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
    if undo is None or redo is None:
        return None
    return len(undo), len(redo)


class _VerticalScroll(QScrollArea):
    """Scrolls its widget vertically only, and asks for its widget's full width (nothing is clipped)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def setWidget(self, widget: QWidget) -> None:
        """Show ``widget``; the area's width follows the widget's whenever its layout changes."""
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # our size hints are the widget's width: let the dock ask again
        return super().eventFilter(obj, event)

    def _width_for(self, content_width: int) -> int:
        return content_width + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width_for(self.widget().minimumSizeHint().width()))
        return hint

    def sizeHint(self) -> QSize:
        hint = super().sizeHint()
        if self.widget() is not None:
            hint.setWidth(self._width_for(self.widget().sizeHint().width()))
        return hint


class _StatusLine(QLabel):
    """The status line: wrapped, at most ``STATUS_LINES`` lines high (the whole message in its tooltip)."""

    def __init__(self) -> None:
        super().__init__("")
        self.setWordWrap(True)
        self.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        # its own height (up to the maximum), not what is left over below the panels
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self._fit()

    def _fit(self) -> None:
        """Cap the height at ``STATUS_LINES`` lines as this label lays them out (its style included)."""
        text = self.text()
        super().setText("\n".join(["Ag"] * STATUS_LINES))
        hint = self.sizeHint().height()  # the lines and the padding above and below them
        super().setText("\n".join(["Ag"] * (STATUS_LINES + 1)))
        line = self.sizeHint().height() - hint
        super().setText(text)
        # down to the last line's bottom (as much padding below as above): no sliver of the next line
        self.setMaximumHeight((hint + STATUS_LINES * line + 1) // 2)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() in (QEvent.Type.FontChange, QEvent.Type.StyleChange):  # napari's style sheet
            self._fit()

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        self._fit()  # (styled by now)


class APLWidget(QWidget):
    """Dock widget for source-free adaptation: predict, inspect, refine and export (all maths in the core)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("napari_apl_widget")
        self.viewer = napari_viewer
        self.controller = ctl = APLController(napari_viewer)
        self._orientation_before = tuple(_camera(napari_viewer).orientation2d)

        # -- model and image ---------
        self.image_combo = LayerCombo(napari_viewer, Image, exclude=is_map_layer)
        self.demo_radio = QRadioButton("bundled demo model")
        self.file_radio = QRadioButton("checkpoint file")
        self.demo_radio.setChecked(True)
        self.checkpoint_file = FileEdit(mode="r", filter="*.pt *.pth", value="")
        self.image_combo.setToolTip("the scan to predict and refine (an image layer of the viewer)")
        self.demo_radio.setToolTip("the small model shipped with napari-apl, trained on synthetic MRI only")
        self.file_radio.setToolTip("a napari-apl checkpoint (.pt), e.g. from train-source or import")
        self.checkpoint_file.native.setToolTip("the checkpoint file to load")
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("load the chosen model (checked safely: no code in the file runs)")
        self.summary = QPlainTextEdit()
        self.summary.setReadOnly(True)
        line = self.summary.fontMetrics().lineSpacing()
        self.summary.setMinimumHeight(4 * line + 12)  # a long status line must not squeeze it to two lines
        self.summary.setMaximumHeight(8 * line + 12)  # the whole summary of a checkpoint (the panel scrolls)
        self.summary.setPlaceholderText("no model loaded")
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setToolTip("where the model runs: auto takes a GPU when there is one")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([AUTO_PRESET, CHECKPOINT_PRESET, *PRESETS])
        self.preset_combo.setToolTip(
            "intensity normalisation: auto = CT window L40/W400 for Hounsfield units (L1064 for CT "
            "stored as HU + 1024), else the checkpoint's own"
        )
        self.radiological = QCheckBox("radiological view")
        self.radiological.setToolTip(
            "anterior up and the patient's right on the left of the screen (2-D view)"
        )
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip(
            "predict both heads, ω and the disagreement map; the slice in view comes first"
        )
        # at most STATUS_LINES lines (the whole message in the tooltip): a long path in a message must not
        # push the tabs below out of view
        self.status = _StatusLine()
        # -- crash recovery: shown when an autosaved session of the chosen image exists ---------
        self.recovery_bar = QFrame()
        self.recovery_bar.setFrameShape(QFrame.Shape.StyledPanel)
        self.recovery_label = QLabel("")
        self.recovery_label.setWordWrap(True)
        self.recover_button = QPushButton("Recover session")
        self.recover_button.setToolTip("restore the autosaved corrections (and refined model) of this image")
        self.discard_button = QPushButton("Discard")
        self.discard_button.setToolTip("delete the autosaved session")
        bar = QVBoxLayout(self.recovery_bar)
        bar.setContentsMargins(4, 4, 4, 4)
        bar.addWidget(self.recovery_label)
        bar_buttons = QHBoxLayout()
        bar_buttons.addWidget(self.recover_button)
        bar_buttons.addWidget(self.discard_button)
        bar.addLayout(bar_buttons)
        self.recovery_bar.setVisible(False)
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.timeout.connect(self._autosave_tick)
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.timeout.connect(self._count_corrections)
        self._paint_watcher = _PaintWatcher(self._autosave_timer, ctl, self._count_timer)

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
        self.refine_panel = RefinePanel(
            ctl, image_getter=self.image_combo.layer, before_start=self.sync_model
        )
        self.export_panel = ExportPanel(ctl)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.inspect, "Inspect")
        self.tabs.addTab(self.refine_panel, "Refine")
        self.tabs.addTab(self.export_panel, "Export")

        # everything but the status line scrolls: the dock must fit a laptop screen (768 px tall) and
        # not force napari's window to the panel's full height
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self.recovery_bar)
        layout.addLayout(form)
        layout.addWidget(self.summary)
        layout.addWidget(self.predict_button)
        layout.addWidget(self.tabs, 1)
        self.scroll = _VerticalScroll()
        self.scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll, 1)
        outer.addWidget(self.status)

        # -- wiring ---------
        self.load_button.clicked.connect(self.load_model)
        self.predict_button.clicked.connect(lambda: self.predict())
        self.checkpoint_file.changed.connect(lambda *_: self.file_radio.setChecked(True))
        self.device_combo.currentTextChanged.connect(self._set_device)
        self.preset_combo.currentTextChanged.connect(self._set_preset)
        ctl.status.connect(self._show_status, check_nargs=False)
        ctl.model_changed.connect(self._on_model_changed)
        self.radiological.toggled.connect(self.set_radiological)
        ctl.busy_changed.connect(self._on_busy)
        ctl.recovery_changed.connect(self._on_recovery_changed)
        ctl.predicted.connect(self._watch_pseudo_layer)
        self.recover_button.clicked.connect(lambda: self.recover())
        self.discard_button.clicked.connect(self.discard_recovery)
        self.image_combo.currentIndexChanged.connect(lambda *_: self._check_recovery())
        self.image_combo.currentIndexChanged.connect(lambda *_: self._forget_stale_error())
        self.image_combo.currentIndexChanged.connect(lambda *_: self.refine_panel._update_corrections())
        # Predict and Refine act on the chosen scan: with none chosen they are off (not a click that fails)
        self.refine_panel.image_chosen = lambda: self.image_combo.layer() is not None
        self.image_combo.currentIndexChanged.connect(lambda *_: self._on_busy(self.controller.busy))
        self._on_busy(self.controller.busy)
        ctl.confirm_close = _weak_question(self)  # no reference cycle controller -> widget
        ctl.confirm = _weak_question(self, "ask")
        self._layer_events = (
            napari_viewer.layers.events.inserted,
            napari_viewer.layers.events.removed,
            napari_viewer.layers.events.renamed,
        )
        for emitter in self._layer_events:
            emitter.connect(self._refresh_layers)
        self._close_guard = _CloseGuard(ctl, self)
        self._guarded_window: QMainWindow | None = None
        self.install_close_guard(_main_window(napari_viewer))
        self.destroyed.connect(
            _disconnecter(
                self._layer_events,
                self._refresh_layers,
                napari_viewer,
                self.inspect,
                ctl,
                self._paint_watcher,
            )
        )
        if ctl.model is None and self.demo_available():
            self.use_demo_checkpoint()
        self._check_recovery()
        # scans the way radiologists read them (anterior up, the patient's right on the left); without
        # it napari shows a scan read by the plugin turned by 180 degrees. The box turns it off.
        self.set_radiological(True)

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
        """Load the model chosen in the widget (demo or file); on failure the choice shows the loaded one."""
        if self.demo_radio.isChecked():
            summary = self.controller.load_checkpoint(None)
        else:
            path = str(self.checkpoint_file.value)
            if path in ("", "."):
                self.controller.error("no checkpoint file chosen: choose a .pt file or the demo model")
                summary = None
            else:
                summary = self.controller.load_checkpoint(Path(path))
        if summary is None:
            self._show_loaded_choice()
            if self.demo_radio.isChecked() and str(self.checkpoint_file.value) not in ("", "."):
                # the file that failed must not stay on show beside the model in use (choosing it
                # again, once fixed, then counts as a change)
                with self.checkpoint_file.changed.blocked():  # (a change would tick "checkpoint file")
                    self.checkpoint_file.line_edit.value = ""  # (value = "" would give the folder)
        return summary

    def _count_corrections(self) -> None:
        """Count the painted voxels for the Refine panel, and the Inspect areas, once the strokes pause."""
        if not self.controller.busy:
            self.controller.collect_corrections()
            self.refine_panel._update_corrections()
            self.inspect.refresh_areas()

    def _show_status(self, text: str) -> None:
        """Show a status message (cut after ``STATUS_LINES`` lines) and the whole of it in the tooltip."""
        self.status.setText(text)
        self.status.setToolTip(text)

    def _forget_stale_error(self) -> None:
        """A new image choice clears an error line about the previous one (e.g. 'no image layer')."""
        if self.controller.error_shown and self.status.text() == self.controller.error_shown:
            self._show_status("")

    def _chosen_path(self) -> Path | None:
        """The checkpoint the model choice names (the demo's path for the demo model)."""
        from .._sample_data import demo_checkpoint_path

        if self.demo_radio.isChecked():
            return demo_checkpoint_path()
        path = str(self.checkpoint_file.value)
        return None if path in ("", ".") else Path(path).expanduser()

    def sync_model(self) -> bool:
        """Load the chosen model if it is not the one loaded; return whether the chosen one is loaded."""
        chosen, loaded = self._chosen_path(), self.controller.checkpoint_path
        if self.controller.model is not None and chosen is not None and loaded is not None:
            try:
                if chosen.resolve() == Path(loaded).resolve():
                    return True
            except OSError:
                pass
        return self.load_model() is not None

    def _show_loaded_choice(self) -> None:
        """Make the model choice show the checkpoint that is loaded (after a failed or refused load)."""
        if self.controller.checkpoint_path is not None:
            self._on_model_changed(self.summary.toPlainText())

    def predict(self, sync: bool = False) -> bool:
        """Predict the chosen image layer with the chosen model (loaded first if it is not yet)."""
        if not self.sync_model():
            return False
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

    # -- crash recovery and closing ---------
    def recover(self, sync: bool = False) -> bool:
        """Restore the autosaved session offered in the recovery bar."""
        return self.controller.recover(sync=sync)

    def discard_recovery(self) -> bool:
        """Delete the autosaved session offered in the recovery bar."""
        return self.controller.discard_recovery()

    def _check_recovery(self) -> None:
        """Offer recovery when the chosen image has an autosaved session (not while a task runs)."""
        if not self.controller.busy:
            self.controller.check_recovery(self.image_combo.layer())

    def _on_recovery_changed(self, entry: Any) -> None:
        if entry is None:
            self.recovery_bar.setVisible(False)
            self.recovery_label.setText("")
            return
        self.recovery_label.setText(f"An autosaved session was found: {entry.summary()}")
        self.recovery_bar.setVisible(True)

    def _watch_pseudo_layer(self) -> None:
        self._paint_watcher.watch(self.controller.pseudo_layer())

    def _autosave_tick(self) -> None:
        """Autosave after painting, or wait for the rest of the autosave interval first."""
        wait = self.controller.autosave_wait()
        if wait > 0:
            self._autosave_timer.start(int(1000 * wait) + 1)
        else:
            self.controller.maybe_autosave()

    def ask_close_during_refinement(self) -> bool:
        """Ask whether to stop the running refinement and close (a modal question)."""
        return self.ask(CLOSE_QUESTION)

    def ask(self, question: str) -> bool:
        """Ask a yes / no question in a modal box (No is the default); return whether the answer is yes."""
        answer = QMessageBox.question(
            self.window(),
            "napari-apl",
            question,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def install_close_guard(self, window: Any) -> bool:
        """Watch ``window`` (napari's main window) for closes; return whether it is watched."""
        if not isinstance(window, QMainWindow) or window is self._guarded_window:
            return window is self._guarded_window and window is not None
        if self._guarded_window is not None:
            self._guarded_window.removeEventFilter(self._close_guard)
        window.installEventFilter(self._close_guard)
        self._guarded_window = window
        return True

    def showEvent(self, event: Any) -> None:
        """Watch the main window we are docked in (a viewer without one gave none at creation)."""
        if self._guarded_window is None:
            self.install_close_guard(self.window())
        super().showEvent(event)

    def event(self, event: QEvent) -> bool:
        """Taken out of its dock (napari's close button on the panel): shut down as on closing.

        napari's ``remove_dock_widget`` only unparents the widget and deletes the dock: no close event
        comes and the widget is not deleted, so a running refinement went on unseen and later wrote
        into the layers of a widget opened again.
        """
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self._docked = False
                QTimer.singleShot(0, self._on_undocked)  # after napari has finished removing the dock
        return super().event(event)

    def _on_undocked(self) -> None:
        """Stop any task (its work autosaved for recovery) and delete the widget, which drops its hooks."""
        if self.parent() is not None:  # docked again meanwhile
            return
        self._autosave_timer.stop()
        self.controller.shutdown()
        self.deleteLater()

    def closeEvent(self, event: Any) -> None:
        """Closing the widget stops a running task and waits for its worker."""
        self._autosave_timer.stop()
        self.controller.shutdown()
        super().closeEvent(event)

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
        self.refine_panel.settings_changed()  # (the next refinement's set-up is made on the device chosen)

    def _set_preset(self, name: str) -> None:
        self.controller.preset = name
        self.refine_panel.settings_changed()  # (and with the intensities chosen)

    def _refresh_layers(self, event: Any = None) -> None:
        self.image_combo.refresh()
        self.export_panel.gt_combo.refresh()
        for layer in self.viewer.layers:  # (a pseudo-label layer the user renamed: its strokes go unused)
            if layer.name != LAYER_PSEUDO and layer_role(layer) == "pseudo-label":
                _warn_on_paint(layer)

    def _on_busy(self, busy: bool) -> None:
        for w in (
            self.predict_button,
            self.load_button,
            self.image_combo,
            self.device_combo,
            self.preset_combo,
            self.demo_radio,
            self.file_radio,
            self.checkpoint_file.native,
        ):
            w.setEnabled(not busy)
        chosen = self.image_combo.layer() is not None
        self.predict_button.setEnabled(not busy and chosen)
        self.refine_panel.start_button.setEnabled(not busy and chosen)


_RENAMED_WATCHED: weakref.WeakSet = weakref.WeakSet()  # renamed pseudo-label layers followed (once each)
_RENAMED_WARNED: weakref.WeakSet = weakref.WeakSet()  # ... and those already told about


def _warn_on_paint(layer: Any) -> None:
    """Say once, at the first stroke in a renamed pseudo-label layer, that its strokes are not corrections
    (Refine, Export and autosave read the layer named pseudo-label). No widget is referenced: the
    layer may outlive it."""
    layer = unwrap_layer(layer)
    if layer in _RENAMED_WATCHED:
        return
    _RENAMED_WATCHED.add(layer)

    def on_paint(event: Any = None) -> None:
        target = unwrap_layer(getattr(event, "source", None) or layer)
        if target.name == LAYER_PSEUDO or target in _RENAMED_WARNED:
            return
        _RENAMED_WARNED.add(target)
        show_warning(
            f"napari-apl: strokes in '{target.name}' are not used as corrections: Refine, Export and "
            f"autosave read the '{LAYER_PSEUDO}' layer of the scan shown (paint there)"
        )

    layer.events.paint.connect(on_paint)


def _weak_question(widget: APLWidget, method: str = "ask_close_during_refinement") -> Any:
    """``widget.<method>`` without keeping the widget alive (yes once it is gone)."""
    ref = weakref.ref(widget)

    def ask(*args: Any) -> bool:
        target = ref()
        if target is None:
            return True
        try:
            return bool(getattr(target, method)(*args))
        except RuntimeError:  # the Qt widget was deleted
            return True

    return ask


def _main_window(viewer: Any) -> QMainWindow | None:
    """Napari's Qt main window of ``viewer`` (through napari's plugin proxy), or ``None``."""
    real = getattr(viewer, "__wrapped__", viewer)
    window = getattr(getattr(real, "window", None), "_qt_window", None)
    return window if isinstance(window, QMainWindow) else None


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _disconnecter(
    emitters: tuple,
    callback: Any,
    viewer: Any,
    inspect: InspectPanel,
    controller: APLController,
    paint_watcher: _PaintWatcher | None = None,
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
            controller.recovery_changed,
            controller.autosaved,
            controller.corrections_changed,
        ):
            signal.disconnect()  # the Qt side is gone: nothing may be called on it any more
        controller.confirm_close = lambda: True
        controller.confirm = lambda question: True
        if paint_watcher is not None:
            paint_watcher.disconnect()
        controller.shutdown()  # stop a running task and wait for its worker (bounded)
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
