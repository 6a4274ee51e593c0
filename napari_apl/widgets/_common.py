"""Small shared Qt pieces: a layer chooser that follows the viewer's layer list, a learning-rate box."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtGui import QValidator
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QWidget

from .._layers import same_layer

NONE_TEXT = "(none)"


class LayerCombo(QComboBox):
    """Combo box listing the viewer's layers of one type, kept up to date as layers come, go and are renamed.

    The choice is held by identity, not by name: renaming the chosen layer keeps it chosen.
    """

    def __init__(
        self,
        viewer: Any,
        layer_type: type,
        allow_none: bool = False,
        exclude: Callable[[Any], bool] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.allow_none = allow_none
        self.exclude = exclude
        self._choices: list[Any] = []
        self.refresh()

    def layers(self) -> list[Any]:
        """The layers that can be chosen."""
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, self.layer_type) and not (self.exclude is not None and self.exclude(layer))
        ]

    def refresh(self, event: Any = None) -> None:
        """Re-list the layers (and their current names), keeping the current choice when it still exists."""
        current = self.layer()
        index = self.currentIndex() - (1 if self.allow_none else 0)
        # what the list showed as chosen, even if it has left the viewer since: its leaving is a change
        shown = self._choices[index] if 0 <= index < len(self._choices) else None
        none_chosen = self.allow_none and self.currentText() == NONE_TEXT
        self._choices = self.layers()
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem(NONE_TEXT)
        self.addItems([layer.name for layer in self._choices])
        offset = 1 if self.allow_none else 0
        index = next((i for i, layer in enumerate(self._choices) if same_layer(layer, current)), None)
        if index is not None:
            self.setCurrentIndex(index + offset)
        elif none_chosen:
            self.setCurrentIndex(0)
        self.blockSignals(False)
        if not same_layer(self.layer(), shown):
            self.currentIndexChanged.emit(self.currentIndex())

    def showPopup(self) -> None:
        """Re-list the layers before showing the choices."""
        self.refresh()
        super().showPopup()

    def layer(self) -> Any:
        """The chosen layer (``None`` when none is chosen or it has left the viewer)."""
        index = self.currentIndex() - (1 if self.allow_none else 0)
        if not 0 <= index < len(self._choices):
            return None
        layer = self._choices[index]
        return layer if any(same_layer(layer, other) for other in self.viewer.layers) else None

    def set_layer(self, layer: Any) -> None:
        """Choose ``layer`` (refreshing the list first)."""
        self.refresh()
        for i, other in enumerate(self._choices):
            if same_layer(other, layer):
                self.setCurrentIndex(i + (1 if self.allow_none else 0))
                return


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
