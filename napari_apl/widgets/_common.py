"""Small shared Qt pieces: a layer chooser that follows the viewer's layer list, a learning-rate box."""

from __future__ import annotations

from typing import Any

from qtpy.QtGui import QValidator
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QWidget

NONE_TEXT = "(none)"


class LayerCombo(QComboBox):
    """Combo box listing the viewer's layers of one type, kept up to date as layers come and go."""

    def __init__(
        self,
        viewer: Any,
        layer_type: type,
        allow_none: bool = False,
        exclude: tuple[str, ...] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.allow_none = allow_none
        self.exclude = exclude
        self.refresh()

    def layers(self) -> list[Any]:
        """The layers that can be chosen."""
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, self.layer_type) and layer.name not in self.exclude
        ]

    def refresh(self, event: Any = None) -> None:
        """Re-list the layers, keeping the current choice when it still exists."""
        current = self.currentText()
        names = [layer.name for layer in self.layers()]
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem(NONE_TEXT)
        self.addItems(names)
        if current in names or (self.allow_none and current == NONE_TEXT):
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def showPopup(self) -> None:
        """Re-list the layers (names may have changed) before showing the choices."""
        self.refresh()
        super().showPopup()

    def layer(self) -> Any:
        """The chosen layer, or ``None``."""
        name = self.currentText()
        if not name or name == NONE_TEXT or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        return layer if isinstance(layer, self.layer_type) else None

    def set_layer(self, layer: Any) -> None:
        """Choose ``layer`` (refreshing the list first)."""
        self.refresh()
        idx = self.findText(layer.name)
        if idx >= 0:
            self.setCurrentIndex(idx)


class ScientificSpinBox(QDoubleSpinBox):
    """A spin box for small positive numbers such as learning rates: shows ``2e-05``, steps ×/÷ 2."""

    def __init__(self, minimum: float = 1e-8, maximum: float = 1.0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setDecimals(12)
        self.setRange(minimum, maximum)

    def textFromValue(self, value: float) -> str:
        """Show the value in short scientific notation."""
        return f"{value:.3g}"

    def valueFromText(self, text: str) -> float:
        """Parse a typed number (``1e-4``, ``0.0001``)."""
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> tuple:
        """Accept anything that is, or could become, a positive number."""
        try:
            value = float(text)
        except ValueError:
            ok = text.strip() == "" or all(c in "0123456789.eE-+" for c in text)
            return (QValidator.State.Intermediate if ok else QValidator.State.Invalid, text, pos)
        state = (
            QValidator.State.Acceptable
            if self.minimum() <= value <= self.maximum()
            else QValidator.State.Intermediate
        )
        return (state, text, pos)

    def stepBy(self, steps: int) -> None:
        """Halve or double the value per step."""
        self.setValue(self.value() * (2.0**steps))
