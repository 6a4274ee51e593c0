"""Export panel: masks, maps, report and refined checkpoint into a folder, never overwriting by default."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import FileEdit
from napari.layers import Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QFormLayout, QPushButton, QSizePolicy, QVBoxLayout, QWidget
from superqt import QElidingLabel

from ._common import LayerCombo

if TYPE_CHECKING:
    from ._controller import APLController


class ExportPanel(QWidget):
    """Choose a folder, an optional ground-truth layer, and export everything on the original grid."""

    def __init__(self, controller: APLController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from ._controller import is_prediction_layer

        self.controller = controller
        self.folder = FileEdit(mode="d", value="")
        self.gt_combo = LayerCombo(controller.viewer, Labels, allow_none=True, exclude=is_prediction_layer)
        self.gt_combo.setToolTip("a labels layer of the same scan: adds Dice and ASSD to the report")
        self.largest = QCheckBox("keep each organ's largest piece")
        self.largest.setToolTip(
            "exported masks keep only each organ's largest connected piece: smaller islands become "
            "background (the layers in the viewer are not changed)"
        )
        self.largest.setChecked(False)
        self.folder.native.setToolTip("the folder the files go to (created if its parent exists)")
        self.overwrite = QCheckBox("overwrite existing files")
        self.overwrite.setChecked(False)
        self.overwrite.setToolTip(
            "replace files of an earlier export; never the loaded checkpoint or a file open as a layer"
        )
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip(
            "write the masks and maps on the scan's own grid, the refined model and a JSON/CSV report"
        )
        # one line, a long folder elided in its middle (whole in the tooltip): a deep path must not widen
        # the dock widget
        self.result = QElidingLabel("")
        self.result.setElideMode(Qt.TextElideMode.ElideMiddle)
        self.result.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        form = QFormLayout()
        form.addRow("folder", self.folder.native)
        form.addRow("ground truth", self.gt_combo)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addWidget(self.largest)
        layout.addWidget(self.overwrite)
        layout.addWidget(self.export_button)
        layout.addWidget(self.result)
        layout.addStretch(1)
        self.export_button.clicked.connect(self.export)
        controller.busy_changed.connect(lambda busy: self.export_button.setEnabled(not busy))
        # an earlier export's line must not read as this model's once the model or the masks change
        controller.model_changed.connect(self._forget_result, check_nargs=False)
        controller.predicted.connect(self._forget_result, check_nargs=False)

    def _forget_result(self, *args: object) -> None:
        if self.result.text():
            self._say("(not exported since the model or the masks changed)")

    def _say(self, text: str) -> None:
        """Show ``text`` on the result line (elided to the panel's width) and whole in its tooltip."""
        self.result.setText(text)
        self.result.setToolTip(text)

    def export(self) -> list[Path]:
        """Export into the chosen folder; return the files written (empty on refusal or error)."""
        folder = str(self.folder.value) if str(self.folder.value) not in ("", ".") else ""
        written = self.controller.export(
            folder,
            overwrite=self.overwrite.isChecked(),
            gt_layer=self.gt_combo.layer(),
            largest_component=self.largest.isChecked(),
        )
        if written:
            self._say(f"wrote {len(written)} files to {Path(written[0]).parent}")
        else:  # the notification says why; an earlier export's line must not stay
            self._say("nothing was written (see the message)")
        return written
