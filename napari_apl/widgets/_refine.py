"""Refine panel: method, iterations, learning rate, BN target share; run, pause, stop, revert; live plots."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.refine import AUGMENT_MODES, METHODS, RefineConfig, RefineEvent
from ._common import ScientificSpinBox
from ._plots import LinePlot

if TYPE_CHECKING:
    from ._controller import APLController

_SERIES_COLORS = [
    (0.40, 0.70, 1.00, 1.0),
    (1.00, 0.60, 0.20, 1.0),
    (0.80, 0.50, 0.90, 1.0),
    (0.90, 0.90, 0.40, 1.0),
]
_OMEGA_COLOR = (0.35, 0.80, 0.45, 1.0)
METHOD_HELP = {
    "apl": "APL: L_Con on the classifiers + ω-weighted self-training of the encoder",
    "apl-con": "APL with the consistency loss L_Con only",
    "threshold": "baseline: fixed confidence threshold pseudo labels",
    "cbst": "baseline: class-balanced self-training",
    "mrnet": "baseline: memory regularisation + uncertainty rectification",
}


# The loss plot's legend: the engine's loss keys as the paper names them (the plot's tooltip says what
# each is; longer names pushed the second one's range out of the plot)
LOSS_NAMES = {"con": "L_Con", "ssl": "L_SSL", "total": "loss", "rectified": "rectified", "memory": "memory"}


def _step_box(top: float, value: float, tip: str) -> QDoubleSpinBox:
    """A spin box for a setting in [0, ``top``] with steps of 0.05."""
    box = QDoubleSpinBox()
    box.setRange(0.0, top)
    box.setSingleStep(0.05)
    box.setDecimals(2)
    box.setValue(value)
    box.setToolTip(tip)
    return box


SETTINGS_SETTLE_MS = 400  # a setting the refinement's set-up depends on is final once unchanged this long


def _panel_settings(panel: weakref.ref) -> RefineConfig:
    """The settings of a Refine panel that may be gone (then the defaults)."""
    alive = panel()
    return alive.config() if alive is not None else RefineConfig()


class RefinePanel(QWidget):
    """Controls and live plots of a refinement run."""

    def __init__(
        self,
        controller: APLController,
        image_getter: Callable[[], Any] | None = None,
        before_start: Callable[[], bool] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self.image_getter = image_getter
        self.before_start = before_start  # e.g. load the chosen model first; False = do not start
        defaults = RefineConfig()
        self.method = QComboBox()
        for m in METHODS:
            self.method.addItem(m)
            self.method.setItemData(self.method.count() - 1, METHOD_HELP.get(m, m), 3)  # 3 = ToolTipRole
        self.method.setToolTip("the refinement method: apl (the default) or a baseline to compare with")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(defaults.iterations)
        self.iterations.setToolTip(
            f"training steps of {defaults.batch_size} slices each (default {defaults.iterations})"
        )
        self.lr = ScientificSpinBox(1e-8, 1.0)
        self.lr.setValue(defaults.lr)
        self.lr.setToolTip(
            f"Adam learning rate (default {defaults.lr:g}); 5x larger drove organs to background on a real CT"
        )
        self.bn_mix = _step_box(
            1.0,
            defaults.bn_mix,
            "share of the target scan in the re-estimated batch-norm statistics: 0 keeps the source "
            "model's, 1 is plain AdaBN; lower it if an organ fades as soon as refinement starts",
        )
        self.class_power = _step_box(
            2.0,
            defaults.class_balance_power,
            "APL's class weights ∝ 1/frequency^p (0 = unweighted): they make the rarer organs grow; "
            "raise p if the start model under-segments a small organ or it fades",
        )
        self.augment = QComboBox()
        self.augment.addItems(AUGMENT_MODES)
        self.augment.setCurrentText(defaults.augment)
        self.augment.setToolTip(
            "the student learns the teacher's pseudo labels from an augmented view of each slice: mild "
            "(gamma, bias field, blur, noise), domain (also random intensity remapping and GIN) or none"
        )
        self.augment_geometry = QCheckBox("also rotate / scale / shift")
        self.augment_geometry.setChecked(defaults.augment_geometry)
        self.augment_geometry.setToolTip(
            "organs tend to grow more with it: it helps where the start model under-segments them and "
            "hurts where it over-segments them (check the organ sizes reported at the end)"
        )
        self.class_select = QCheckBox("learn from each class's confident half only")
        self.class_select.setChecked(defaults.class_select)
        self.class_select.setToolTip(
            "APL only, not the default: CBST's class-wise selection of the pixels it learns from. On one "
            "real CT it gained far more than the default, on a synthetic CT and an in-domain MRI it lost: "
            "compare with a default run"
        )
        self.start_button = QPushButton("Refine")
        self.image_chosen: Callable[[], bool] = lambda: True  # (the main panel says whether a scan is chosen)
        self.start_button.setToolTip(
            "refine the model on the chosen scan in the background; the overlays update as it runs"
        )
        self.pause_button = QPushButton("Pause")
        self.pause_button.setToolTip("hold the refinement after the current step (Resume goes on)")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("end the refinement after the current step and keep the model reached")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("go back to the loaded checkpoint's weights")
        self.clear_button = QPushButton("Clear corrections")
        self.clear_button.setToolTip("forget the voxels painted in 'pseudo-label' (asks first)")
        self.corrections_label = QLabel("corrections: none (paint in 'pseudo-label' to add)")
        self.corrections_label.setWordWrap(True)
        self.loss_plot = LinePlot("losses", "iteration")
        self.loss_plot.setToolTip(
            "each loss on its own scale (its range in the legend): L_Con = the two heads' disagreement, "
            "which the classifiers minimise; L_SSL = the ω-weighted cross-entropy on the pseudo labels the "
            "encoder learns from; a baseline shows its own training loss"
        )
        self.omega_plot = LinePlot("mean ω", "iteration")
        self.loss_plot.first_index = self.omega_plot.first_index = 1  # the history's first is iteration 1

        form = QFormLayout()
        form.addRow("method", self.method)
        form.addRow("iterations", self.iterations)
        form.addRow("learning rate", self.lr)
        form.addRow("BN target share", self.bn_mix)
        form.addRow("class weight power", self.class_power)
        form.addRow("student augmentation", self.augment)
        form.addRow("", self.augment_geometry)
        form.addRow("", self.class_select)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.stop_button, self.revert_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addLayout(buttons)
        row = QHBoxLayout()
        row.addWidget(self.corrections_label, 1)
        row.addWidget(self.clear_button)
        layout.addLayout(row)
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.omega_plot)

        self.start_button.clicked.connect(self.start)
        self.method.currentTextChanged.connect(lambda _: self._on_busy(self.controller.busy))
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button.clicked.connect(controller.stop)
        self.revert_button.clicked.connect(lambda: controller.revert())
        controller.model_changed.connect(self._on_model_changed, check_nargs=False)
        self.clear_button.clicked.connect(self._clear)
        controller.refine_event.connect(self._on_event)
        controller.busy_changed.connect(self._on_busy)
        controller.predicted.connect(self._update_corrections)
        controller.corrections_changed.connect(self._update_corrections)
        controller.iterations_ended.connect(self._on_iterations_ended)
        # the set-up made after Predict is for the panel's settings (read through a weak reference: the
        # controller must not keep a closed panel, and with it the viewer, alive)
        controller.refine_settings = functools.partial(_panel_settings, weakref.ref(self))
        # a new BN target share (or intensity preset, or device): the set-up is made again for it, once
        # the value has settled (the mouse wheel over a combo box goes through many)
        self._settings_settled = QTimer(self)
        self._settings_settled.setSingleShot(True)
        self._settings_settled.setInterval(SETTINGS_SETTLE_MS)
        self._settings_settled.timeout.connect(controller.refresh_ahead)
        self.bn_mix.valueChanged.connect(lambda *_: self.settings_changed())
        self._on_busy(False)

    def settings_changed(self) -> None:
        """A setting the refinement's set-up depends on changed: remake it once the value has settled."""
        self._settings_settled.start()

    def config(self) -> RefineConfig:
        """The refinement settings shown in the panel."""
        return RefineConfig(
            method=self.method.currentText(),
            iterations=self.iterations.value(),
            lr=self.lr.value(),
            bn_mix=self.bn_mix.value(),
            class_balance_power=self.class_power.value(),
            augment=self.augment.currentText(),
            augment_geometry=self.augment_geometry.isChecked(),
            class_select=self.class_select.isChecked() and self.method.currentText() == "apl",
        )

    def start(self) -> bool:
        """Start a refinement with the panel's settings."""
        if self.before_start is not None and not self.before_start():
            return False
        self.loss_plot.set_series({})
        self.omega_plot.set_series({})
        image = self.image_getter() if self.image_getter is not None else None
        ok = self.controller.refine(self.config(), image_layer=image)
        self._update_corrections()
        return ok

    def toggle_pause(self) -> None:
        """Pause a running refinement, or resume a paused one."""
        if self.controller.paused:
            self.controller.resume()
        else:
            self.controller.pause()
        self.pause_button.setText("Resume" if self.controller.paused else "Pause")

    def _image(self) -> Any:
        return self.image_getter() if self.image_getter is not None else None

    def _clear(self) -> None:
        self.controller.clear_corrections(self._image())  # asks first when voxels were painted
        self._update_corrections()

    def _update_corrections(self) -> None:
        """Count the corrections of the scan Refine will run on (the image chosen), naming it."""
        image = self._image()
        n = self.controller.corrections_count(image)
        name = "" if image is None else image.name if len(image.name) <= 40 else image.name[:39] + "…"
        of = f" on '{name}'" if image is not None else ""  # (a long name must not widen the panel)
        self.corrections_label.setText(
            f"corrections{of}: {n} voxels kept as hard labels"
            if n
            else f"corrections{of}: none (paint in 'pseudo-label' to add)"
        )

    def _on_model_changed(self, *args: object) -> None:
        """Revert only has something to go back from once the model is refined."""
        self.revert_button.setEnabled(not self.controller.busy and self.controller.refined)

    def _on_busy(self, busy: bool) -> None:
        refining = busy and self.controller.task == "refine"
        self.start_button.setEnabled(not busy and self.image_chosen())
        self.revert_button.setEnabled(not busy and self.controller.refined)  # nothing to revert before
        self.clear_button.setEnabled(not busy)
        self.pause_button.setEnabled(refining)
        self.stop_button.setEnabled(refining)
        # a run uses the settings it started with: keep the panel showing those
        for w in (self.method, self.iterations, self.lr, self.bn_mix, self.class_power, self.augment):
            w.setEnabled(not busy)
        self.augment_geometry.setEnabled(not busy)
        self.class_select.setEnabled(not busy and self.method.currentText() == "apl")  # an APL option
        if not busy:
            self.pause_button.setText("Pause")

    def _on_iterations_ended(self) -> None:
        """Nothing is left to pause or stop once the refined model predicts the scan."""
        self.pause_button.setEnabled(False)
        self.pause_button.setText("Pause")
        self.stop_button.setEnabled(False)

    def _on_event(self, ev: RefineEvent) -> None:
        history = self.controller.history
        keys = [k for k in ev.losses if k != "portion"]
        self.loss_plot.set_series(
            {
                LOSS_NAMES.get(k, k): (
                    [h.get(k, float("nan")) for h in history],
                    _SERIES_COLORS[i % len(_SERIES_COLORS)],
                )
                for i, k in enumerate(keys)
            },
            own_scales=True,  # the losses differ in size
        )
        self.omega_plot.set_series({"mean ω": ([h["mean_confidence"] for h in history], _OMEGA_COLOR)})
