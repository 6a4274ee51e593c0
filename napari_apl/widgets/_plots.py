"""Two tiny QPainter plots (no matplotlib): a clickable multi-line plot and a histogram."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QMouseEvent, QPainter, QPainterPath, QPaintEvent, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

_MARGIN_LEFT = 48
_MARGIN_RIGHT = 8
_MARGIN_TOP = 8
_MARGIN_BOTTOM = 18
_LEGEND_BAND = 15  # px at the top of a line plot kept for the legend: no curve runs through it
_TEXT = QColor(200, 200, 200)
_GRID = QColor(110, 110, 110)
_MARKER = QColor(255, 255, 255, 160)


def _fmt(v: float) -> str:
    """Compact axis label for a value."""
    if not math.isfinite(v):
        return ""
    if abs(v) >= 1e4:
        return f"{v / 1000:.0f}k"
    if v != 0 and abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:.4g}" if abs(v) >= 1 else f"{v:.3g}"


def qcolor(rgba: Sequence[float]) -> QColor:
    """Turn an RGB(A) tuple in 0..1 into a ``QColor``."""
    r, g, b = (round(255 * float(c)) for c in rgba[:3])
    a = round(255 * float(rgba[3])) if len(rgba) > 3 else 255
    return QColor(r, g, b, a)


class _PlotBase(QWidget):
    """Shared frame: a plot rectangle with y-axis labels and a title."""

    def __init__(self, title: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.setToolTip(title)
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def plot_rect(self) -> QRectF:
        """Return the rectangle where data are drawn."""
        return QRectF(
            _MARGIN_LEFT,
            _MARGIN_TOP,
            max(1, self.width() - _MARGIN_LEFT - _MARGIN_RIGHT),
            max(1, self.height() - _MARGIN_TOP - _MARGIN_BOTTOM),
        )

    def _frame(self, p: QPainter, y0: float | None, y1: float | None, x_label: str) -> QRectF:
        """Draw the frame, the y-range labels (none when ``y0`` is None) and the x-axis label; return
        the data rectangle."""
        rect = self.plot_rect()
        p.setPen(QPen(_GRID, 1))
        p.drawRect(rect)
        p.setPen(_TEXT)
        font = p.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        if y0 is not None and y1 is not None:
            right = Qt.AlignmentFlag.AlignRight
            p.drawText(QRectF(0, rect.top() - 2, _MARGIN_LEFT - 4, 14), right, _fmt(y1))
            p.drawText(QRectF(0, rect.bottom() - 12, _MARGIN_LEFT - 4, 14), right, _fmt(y0))
        if x_label:
            p.drawText(
                QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
                Qt.AlignmentFlag.AlignHCenter,
                x_label,
            )
        return rect

    def _title(self, p: QPainter, rect: QRectF, free_from: float) -> None:
        """Draw the title top-right when it fits right of ``free_from`` (it is the tooltip anyway)."""
        width = p.fontMetrics().horizontalAdvance(self.title)
        if self.title and rect.right() - 4 - width > free_from:
            p.setPen(_TEXT)
            p.drawText(QPointF(rect.right() - 4 - width, rect.top() + 12), self.title)


class LinePlot(_PlotBase):
    """Several named series against a shared index; a click emits the nearest index."""

    clicked = Signal(int)

    def __init__(self, title: str = "", x_label: str = "", parent: QWidget | None = None) -> None:
        super().__init__(title, parent)
        self.x_label = x_label
        self._series: dict[str, tuple[np.ndarray, QColor]] = {}
        self._marker: int | None = None
        self._fixed_range: tuple[float, float] | None = None
        self.own_scales = False
        self.first_index = 0  # the number under the x axis's left end (1 for iterations)

    def set_series(
        self,
        series: Mapping[str, tuple[Sequence[float], Sequence[float] | QColor]],
        y_range: tuple[float, float] | None = None,
        own_scales: bool = False,
    ) -> None:
        """Replace the plotted series: ``{name: (values, colour)}``; ``y_range`` fixes the y axis.

        With ``own_scales`` each series spans the plot's height from its own minimum to its maximum
        (the legend gives each range): series of unlike sizes (ω near 1, disagreement near 0) then
        each show their ups and downs instead of two flat lines at the edges.
        """
        self._series = {
            name: (np.asarray(vals, dtype=np.float64), col if isinstance(col, QColor) else qcolor(col))
            for name, (vals, col) in series.items()
        }
        self._fixed_range = y_range
        self.own_scales = own_scales and y_range is None
        self.update()

    def series(self, name: str) -> np.ndarray:
        """Return the values of a plotted series."""
        return self._series[name][0]

    @property
    def length(self) -> int:
        """Number of points of the longest series."""
        return max((len(v) for v, _ in self._series.values()), default=0)

    def set_marker(self, index: int | None) -> None:
        """Draw a vertical marker at ``index`` (``None`` removes it)."""
        if index != self._marker:
            self._marker = index
            self.update()

    def y_range(self, name: str | None = None) -> tuple[float, float]:
        """The y range shown (of series ``name`` with own scales): fixed, or the finite data range
        (padded when flat)."""
        if self._fixed_range is not None:
            return self._fixed_range
        chosen = [self._series[name]] if name is not None else list(self._series.values())
        vals = [v[np.isfinite(v)] for v, _ in chosen]
        vals = [v for v in vals if v.size]
        if not vals:
            return (0.0, 1.0)
        lo = float(min(v.min() for v in vals))
        hi = float(max(v.max() for v in vals))
        if hi - lo < 1e-12:
            pad = abs(hi) * 0.05 or 0.5
            return (lo - pad, hi + pad)
        return (lo, hi)

    def index_at(self, x: float) -> int | None:
        """Return the series index under a widget x coordinate (``None`` when empty)."""
        n = self.length
        if n == 0:
            return None
        rect = self.plot_rect()
        if n == 1:
            return 0
        frac = (x - rect.left()) / rect.width()
        return int(min(n - 1, max(0, round(frac * (n - 1)))))

    def _x(self, i: int, n: int, rect: QRectF) -> float:
        return rect.left() + (rect.width() * i / (n - 1) if n > 1 else rect.width() / 2)

    def paintEvent(self, event: QPaintEvent) -> None:
        """Draw frame, series, legend and marker."""
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        y0, y1 = self.y_range()
        frame = (
            self._frame(p, None, None, self.x_label)
            if self.own_scales
            else self._frame(p, y0, y1, self.x_label)
        )
        n = self.length
        if n > 1:  # the first and last index under the axis ends
            p.setPen(_TEXT)
            below = QRectF(frame.left(), frame.bottom() + 2, frame.width(), 14)
            p.drawText(below, Qt.AlignmentFlag.AlignLeft, str(self.first_index))
            p.drawText(below, Qt.AlignmentFlag.AlignRight, str(self.first_index + n - 1))
        # the curves keep below the legend line
        rect = QRectF(
            frame.left(), frame.top() + _LEGEND_BAND, frame.width(), max(1, frame.height() - _LEGEND_BAND)
        )
        for name, (vals, col) in self._series.items():
            if self.own_scales:
                y0, y1 = self.y_range(name)
            span = (y1 - y0) or 1.0
            path = QPainterPath()
            pen_down = False
            for i, v in enumerate(vals):
                if not math.isfinite(v):
                    pen_down = False
                    continue
                pt = QPointF(
                    self._x(i, n, rect), rect.bottom() - (min(max(v, y0), y1) - y0) / span * rect.height()
                )
                if pen_down:
                    path.lineTo(pt)
                else:
                    path.moveTo(pt)
                    pen_down = True
            p.setPen(QPen(col, 1.6))
            p.drawPath(path)
        if self._marker is not None and 0 <= self._marker < max(n, 1):
            x = self._x(self._marker, n, rect)
            p.setPen(QPen(_MARKER, 1, Qt.PenStyle.DashLine))
            p.drawLine(QPointF(x, rect.top()), QPointF(x, rect.bottom()))
        x_text = frame.left() + 4
        for name, (_, col) in self._series.items():
            if self.own_scales:
                lo, hi = self.y_range(name)
                name = f"{name} {_fmt(lo)}–{_fmt(hi)}"
            p.setPen(col)
            p.drawText(QPointF(x_text, frame.top() + 12), name)
            x_text += p.fontMetrics().horizontalAdvance(name) + 10
        self._title(p, frame, x_text)
        p.end()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        """Emit ``clicked`` with the index under the mouse."""
        idx = self.index_at(event.pos().x())
        if idx is not None:
            self.clicked.emit(idx)


class HistogramPlot(_PlotBase):
    """Bar histogram of values in a fixed range."""

    def __init__(self, title: str = "", x_label: str = "", parent: QWidget | None = None) -> None:
        super().__init__(title, parent)
        self.x_label = x_label
        self.counts = np.zeros(0)
        self.edges = np.zeros(0)
        self.color = QColor(80, 160, 220)

    def set_histogram(self, counts: Sequence[float], edges: Sequence[float]) -> None:
        """Show ``counts`` for bins ``edges`` (as from ``numpy.histogram``)."""
        self.counts = np.asarray(counts, dtype=np.float64)
        self.edges = np.asarray(edges, dtype=np.float64)
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        """Draw the bars."""
        p = QPainter(self)
        top = float(self.counts.max()) if self.counts.size else 1.0
        rect = self._frame(p, 0.0, top, self.x_label)
        n = self.counts.size
        if n:
            w = rect.width() / n
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(self.color)
            bars = max(1.0, rect.height() - _LEGEND_BAND)  # the tallest bar stops below the title
            for i, c in enumerate(self.counts):
                h = bars * (c / top if top > 0 else 0.0)
                p.drawRect(QRectF(rect.left() + i * w + 0.5, rect.bottom() - h, max(1.0, w - 1.0), h))
            p.setPen(_TEXT)
            p.drawText(QPointF(rect.left(), rect.bottom() + 14), _fmt(float(self.edges[0])))
            last = _fmt(float(self.edges[-1]))
            p.drawText(
                QPointF(rect.right() - p.fontMetrics().horizontalAdvance(last), rect.bottom() + 14), last
            )
        self._title(p, rect, rect.left())
        p.end()
