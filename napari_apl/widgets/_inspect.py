"""Inspect panel: where the pseudo labels are noisy, slice by slice, and a histogram of ω per slice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from .._layers import canonical_world_matrix
from ..core.labels import CLASS_NAMES, LABEL_COLORS, ORGANS
from ._plots import HistogramPlot, LinePlot

if TYPE_CHECKING:
    from ..core.infer import Prediction
    from ._controller import APLController

HIST_BINS = 20
OMEGA_COLOR = (0.35, 0.80, 0.45, 1.0)
DISAGREEMENT_COLOR = (0.95, 0.45, 0.25, 1.0)


@dataclass
class SliceProfile:
    """Per axial slice summaries of a prediction (index = canonical axis 2 = napari axis 0)."""

    mean_confidence: np.ndarray
    mean_disagreement: np.ndarray
    organ_area_cm2: dict[int, np.ndarray]

    @property
    def n_slices(self) -> int:
        """Number of axial slices."""
        return int(self.mean_confidence.size)

    def least_confident_order(self) -> np.ndarray:
        """Slice indices from the least to the most confident (mean ω over the slice)."""
        return np.argsort(self.mean_confidence, kind="stable")


def slice_profile(
    pred: Prediction, spacing: tuple[float, float, float], labels: np.ndarray | None = None
) -> SliceProfile:
    """Summarise a canonical prediction per axial slice: mean ω, mean disagreement, organ areas (of
    ``labels`` when given: the pseudo labels as shown, painted corrections included)."""
    conf = pred.confidence.astype(np.float32).mean(axis=(0, 1))
    dis = pred.consistency.astype(np.float32).mean(axis=(0, 1))
    return SliceProfile(conf, dis, organ_areas(pred.pseudo if labels is None else labels, spacing))


def organ_areas(labels: np.ndarray, spacing: tuple[float, float, float]) -> dict[int, np.ndarray]:
    """Each organ's area in cm² per axial slice of canonical labels ``(X, Y, Z)``."""
    pixel_cm2 = spacing[0] * spacing[1] / 100.0
    return {lab: (labels == lab).sum(axis=(0, 1)) * pixel_cm2 for lab in ORGANS}


def omega_histogram(pred: Prediction, k: int, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of ω over axial slice ``k`` in [0, 1]."""
    return np.histogram(pred.confidence[:, :, k].astype(np.float32), bins=bins, range=(0.0, 1.0))


class InspectPanel(QWidget):
    """Per-slice noise plots; a click or 'next least confident slice' moves napari's slider."""

    def __init__(self, controller: APLController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.profile: SliceProfile | None = None
        self._version_seen = -1  # the controller's shown_version the areas were counted at
        self._rank = -1
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.noise_plot = LinePlot("per slice", "axial slice (click to go)")
        self.noise_plot.setToolTip(
            "mean confidence ω and mean head disagreement per axial slice; click to go there"
        )
        self.area_plot = LinePlot("organ area (cm²)", "axial slice (click to go)")
        self.hist_plot = HistogramPlot("ω in this slice", "ω")
        self.info = QLabel("run Predict to inspect the pseudo labels")
        self.info.setWordWrap(True)
        # at the top of the room it gets (a wrapped label is given the height of more lines than it has,
        # and centred in it the text slid below the panel's fold)
        self.info.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.next_button = QPushButton("Next least confident slice")
        self.next_button.setToolTip("jump to the slices in order of increasing mean ω")
        self.next_button.setEnabled(False)
        row = QHBoxLayout()
        row.addWidget(self.next_button)
        layout.addWidget(self.noise_plot)
        layout.addWidget(self.area_plot)
        layout.addWidget(self.hist_plot)
        layout.addLayout(row)
        layout.addWidget(self.info)
        self.noise_plot.clicked.connect(self.go_to_slice)
        self.area_plot.clicked.connect(self.go_to_slice)
        self.next_button.clicked.connect(self.next_least_confident)
        controller.predicted.connect(self.refresh)
        controller.labels_reset.connect(self.refresh)
        controller.corrections_changed.connect(self.refresh_areas)  # (e.g. corrections recovered)
        controller.busy_changed.connect(self._on_busy)
        controller.viewer.dims.events.point.connect(self._on_dims)
        controller.viewer.layers.events.removed.connect(self._on_layer_removed)

    # -- data -----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute the slice profile from the controller's prediction and redraw."""
        ctl = self.controller
        if ctl.prediction is None or ctl.geometry is None:
            return
        # the areas of what the pseudo-label layer shows and Export writes: the corrections on top
        labels = ctl.shown_pseudo()
        self._version_seen = ctl.shown_version
        self.profile = prof = slice_profile(ctl.prediction, ctl.geometry.spacing, labels)
        self._rank = -1
        self.noise_plot.set_series(
            {
                "mean ω": (prof.mean_confidence, OMEGA_COLOR),
                "disagreement": (prof.mean_disagreement, DISAGREEMENT_COLOR),
            },
            own_scales=True,  # ω near 1 and disagreement near 0 on one axis were two flat lines
        )
        self._draw_areas()
        self.next_button.setEnabled(prof.n_slices > 0)
        if prof.n_slices and self.current_slice() is None:
            # the slider shows none of this scan's slices (a scan placed elsewhere in the world, or
            # past its end): show its middle slice, or its new layers would be nowhere to be seen
            self.go_to_slice(prof.n_slices // 2)
        self._on_dims()

    def refresh_areas(self) -> None:
        """Recount the organ areas after strokes or an undo in the pseudo-label layer (the ω and
        disagreement curves are the model's and stay)."""
        ctl = self.controller
        if self.profile is None or ctl.prediction is None or ctl.geometry is None:
            return
        ctl.collect_corrections()  # (folds the strokes in)
        if ctl.shown_version == self._version_seen:
            return
        labels = ctl.shown_pseudo(collect=False)
        if labels is None or labels.shape[2] != self.profile.n_slices:
            return
        self._version_seen = ctl.shown_version
        self.profile.organ_area_cm2 = organ_areas(labels, ctl.geometry.spacing)
        self._draw_areas()
        self._on_dims()

    def _draw_areas(self) -> None:
        prof = self.profile
        if prof is not None:
            self.area_plot.set_series(
                {CLASS_NAMES[lab]: (prof.organ_area_cm2[lab], LABEL_COLORS[lab]) for lab in ORGANS}
            )

    def current_slice(self) -> int | None:
        """The axial slice of the predicted image that napari shows (``None`` if none, e.g. the slider
        is past the scan's slices, where napari shows an empty plane)."""
        layer = self.controller.image_layer
        if layer is None or layer not in self.controller.viewer.layers or self.profile is None:
            return None
        gain, offset = _slider_to_slice(canonical_world_matrix(layer, self.controller.geometry))
        k = round(gain * float(self.controller.viewer.dims.point[-3]) + offset)
        return int(k) if 0 <= k < self.profile.n_slices else None

    def go_to_slice(self, k: int) -> None:
        """Move napari's slider to axial slice ``k`` of the predicted image."""
        layer = self.controller.image_layer
        if layer is None or layer not in self.controller.viewer.layers:
            return
        gain, offset = _slider_to_slice(canonical_world_matrix(layer, self.controller.geometry))
        dims = self.controller.viewer.dims
        axis = dims.ndim - 3
        rng, last = dims.range[axis], max(0, int(dims.nsteps[axis]) - 1)
        step = float(rng.step) or 1.0
        exact = (k - offset) / gain  # the slider coordinate at the middle of slice k
        # napari's slider stops at start + i * step; on a tilted scan its step is not the slice spacing,
        # so take the stop that shows slice k (the nearest stop when none does)
        below = math.floor((exact - rng.start) / step)
        stops = sorted({min(max(i, 0), last) for i in (below, below + 1)})

        def rank(i: int) -> tuple[bool, float]:
            point = rng.start + i * step
            return round(gain * point + offset) != k, abs(point - exact)

        dims.set_current_step(axis, min(stops, key=rank))

    def next_least_confident(self) -> int | None:
        """Go to the next slice in order of increasing mean ω; return the slice napari then shows.

        On a tilted scan a slice without a slider stop shows its neighbour; a rank that would show the
        slice already shown is skipped, so each press moves.
        """
        if self.profile is None or self.profile.n_slices == 0:
            return None
        order = self.profile.least_confident_order()
        before = self.current_slice()
        for _ in range(len(order)):
            self._rank = (self._rank + 1) % len(order)
            self.go_to_slice(int(order[self._rank]))
            if self.current_slice() != before:
                break
        return self.current_slice()

    def _on_layer_removed(self, event: Any = None) -> None:
        """The predicted image left the viewer: its curves, histogram and info line go with it."""
        layer = self.controller.image_layer
        if self.profile is not None and (layer is None or layer not in self.controller.viewer.layers):
            self.clear("the predicted image was removed from the viewer: open it and Predict again")

    def clear(self, message: str = "run Predict to inspect the pseudo labels") -> None:
        """Show nothing (no prediction to inspect) and say ``message``."""
        self.profile = None
        self._rank = -1
        for plot in (self.noise_plot, self.area_plot):
            plot.set_series({})
            plot.set_marker(None)
        self.hist_plot.set_histogram([], [])
        self.next_button.setEnabled(False)
        self.info.setText(message)

    def _on_busy(self, busy: bool) -> None:
        """Redo the info line: it says when the curves are not those of a running refinement."""
        self._on_dims()

    def _on_dims(self, event: Any = None) -> None:
        k = self.current_slice()
        self.noise_plot.set_marker(k)
        self.area_plot.set_marker(k)
        pred = self.controller.prediction
        if pred is None or self.profile is None:
            return
        if k is None:
            self.hist_plot.set_histogram([], [])
            layer = self.controller.image_layer
            if layer is not None and layer in self.controller.viewer.layers:
                self.info.setText(f"{layer.name}: no slice at this slider position")
            return
        counts, edges = omega_histogram(pred, k)
        self.hist_plot.set_histogram(counts, edges)
        areas = ", ".join(
            f"{CLASS_NAMES[lab]} {self.profile.organ_area_cm2[lab][k]:.1f}"
            for lab in ORGANS
            if self.profile.organ_area_cm2[lab][k] > 0
        )
        refining = self.controller.busy and self.controller.task == "refine"
        self.info.setText(
            f"{self.controller.image_layer.name}, slice {k}: mean ω {self.profile.mean_confidence[k]:.3f}, "
            f"disagreement {self.profile.mean_disagreement[k]:.3f}"
            + (f"; cm²: {areas}" if areas else "")
            + (" (the prediction before the running refinement: updated when it ends)" if refining else "")
        )


def _slider_to_slice(world_matrix: np.ndarray) -> tuple[float, float]:
    """``(gain, offset)`` with the axial slice napari shows of a layer with this data->world matrix (the
    prediction layers': canonical voxels) = round(gain * slider point + offset).

    Napari slices a layer at the data coordinate that the slider's world coordinate alone maps to
    (the in-plane part of the world->data transform is dropped), so on a tilted or oblique scan the
    slice differs from a full inverse of the world point; this follows napari's rule.
    """
    inverse = np.linalg.inv(world_matrix)
    gain = float(inverse[0, 0])
    if abs(gain) < 1e-12:  # the slider does not move through the axial slices (never for a reader layer)
        return 1.0, 0.0
    return gain, float(inverse[0, 3])
