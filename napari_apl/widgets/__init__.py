"""The napari-apl dock widget (thin Qt layer over ``napari_apl.core``)."""

from __future__ import annotations

from ._controller import APLController
from ._main import WIDGET_NAME, APLWidget, find_apl_widget

__all__ = ["WIDGET_NAME", "APLController", "APLWidget", "find_apl_widget"]
