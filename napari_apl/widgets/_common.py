"""Small shared Qt pieces: a layer chooser that follows the viewer's layer list."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QWidget

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

    def showPopup(self) -> None:  # noqa: N802 (Qt API)
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
