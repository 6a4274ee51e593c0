"""The APL dock widget in a real napari viewer (headless under Xvfb): predict, refine, correct, export."""

from __future__ import annotations

import gc
import itertools
import json
import threading
import time
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_apl._layers import layer_world_matrix, to_canonical_order, to_layer_order
from napari_apl.core.refine import RefineConfig
from napari_apl.widgets import WIDGET_NAME, APLWidget
from napari_apl.widgets._controller import (
    LAYER_AUX,
    LAYER_CONFIDENCE,
    LAYER_CONSISTENCY,
    LAYER_MAIN,
    LAYER_PSEUDO,
    PREDICTION_LAYERS,
    _slices_differ,
)

pytestmark = pytest.mark.viewer


def ctl_path(widget) -> Path:
    """The checkpoint the widget's controller loaded."""
    return Path(widget.controller.checkpoint_path)


def tiny_refine(iterations: int = 4, **kw) -> RefineConfig:
    """Refinement settings small enough for two CPU cores."""
    kw.setdefault("bn", "frozen")  # keep the tiny untrained model's batch-norm statistics: fast and stable
    return RefineConfig(iterations=iterations, batch_size=2, guard_every=1000, **kw)


@pytest.fixture
def setup(make_napari_viewer, phantom_files, tiny_checkpoint):
    """Factory: a viewer with a phantom CT (and its labels) opened by the plugin and the widget docked."""

    def make(orientation: str = "LPS", load: bool = True):
        viewer = make_napari_viewer()
        image_path, labels_path = phantom_files(orientation)
        [image] = viewer.open(str(image_path), plugin="napari-apl")
        [labels] = viewer.open(str(labels_path), plugin="napari-apl")
        _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
        if load:
            assert widget.controller.load_checkpoint(tiny_checkpoint) is not None
        widget.image_combo.set_layer(image)
        return viewer, widget, image, labels

    return make


def test_widget_opens_from_the_manifest(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    assert isinstance(widget, APLWidget)
    assert widget.viewer == viewer  # napari hands plugins a public-only proxy of the viewer
    assert [widget.tabs.tabText(i) for i in range(widget.tabs.count())] == ["Inspect", "Refine", "Export"]
    # the panel scrolls instead of forcing napari's window taller than a laptop screen (it forced 917 px),
    # and asks for the width its controls need (nothing cut off at the right edge)
    assert widget.minimumSizeHint().height() < 300
    assert viewer.window._qt_window.minimumSizeHint().height() <= 720
    content = widget.scroll.widget()
    assert widget.minimumSizeHint().width() >= content.minimumSizeHint().width()


def test_every_control_says_what_it_does(make_napari_viewer) -> None:
    """A hover over any button, box or choice of the panel shows what it is for (most had nothing)."""
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QTabBar

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)

    def tip(w) -> str:  # Qt shows the nearest ancestor's tooltip where a widget has none
        while w is not None and w is not widget:
            if w.toolTip():
                return w.toolTip()
            w = w.parentWidget()
        return ""

    controls = [
        w
        for kind in (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit)
        for w in widget.findChildren(kind)
        # (inner parts of spin boxes and combos, and the tab bar's own scroll arrows)
        if not isinstance(w.parentWidget(), (QAbstractSpinBox, QComboBox, QTabBar))
    ]
    assert len(controls) > 20
    silent = sorted({getattr(w, "text", lambda: "")() or type(w).__name__ for w in controls if not tip(w)})
    assert not silent, silent


def assert_aligned(viewer, image, widget) -> None:
    """The five prediction layers have the image's shape, dtypes and exact transform."""
    for name in PREDICTION_LAYERS:
        layer = viewer.layers[name]
        assert layer.data.shape == image.data.shape
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
        np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
        np.testing.assert_allclose(layer_world_matrix(layer), layer_world_matrix(image))
    for name in (LAYER_MAIN, LAYER_AUX, LAYER_PSEUDO):
        assert viewer.layers[name].data.dtype == np.uint8
        assert viewer.layers[name].data.max() <= 4
    for name in (LAYER_CONFIDENCE, LAYER_CONSISTENCY):
        layer = viewer.layers[name]
        assert layer.data.dtype == np.float16 and 0.0 <= layer.data.min() and layer.data.max() <= 1.0
        # additive blending over the scan: a map's colour for "nothing to see" is black (adds nothing)
        assert layer.blending == "additive"
    # ω lights up where the model is unsure: black at ω = 1 (sure), bright at ω = 0
    omega_cmap = viewer.layers[LAYER_CONFIDENCE].colormap
    np.testing.assert_allclose(omega_cmap.map(np.array([1.0]))[0, :3], 0.0, atol=0.02)
    assert omega_cmap.map(np.array([0.0]))[0, :3].sum() > 2.0
    assert viewer.layers[LAYER_CONSISTENCY].colormap.map(np.array([0.0]))[0, :3].sum() < 0.05  # agree: black
    # layer data are the core's canonical prediction, transposed to (Z, Y, X)
    pred = widget.controller.prediction
    np.testing.assert_array_equal(to_canonical_order(viewer.layers[LAYER_MAIN].data), pred.main)
    np.testing.assert_array_equal(to_canonical_order(viewer.layers[LAYER_PSEUDO].data), pred.pseudo)


def test_predict_adds_aligned_layers_and_updates_them_in_place(setup, phantom_files, qtbot) -> None:
    viewer, widget, ras_image, _ = setup("RAS")
    assert viewer.dims.axis_labels == ("axial", "coronal", "sagittal")  # what each slider steps through
    assert widget.predict(sync=True)
    assert_aligned(viewer, ras_image, widget)
    assert tuple(viewer.layers[LAYER_CONSISTENCY].contrast_limits) == (0.0, 1.0)
    viewer.layers[LAYER_CONFIDENCE].contrast_limits = (0.0, 0.5)  # the user's own display range
    first = {name: viewer.layers[name] for name in PREDICTION_LAYERS}
    assert all(layer.axis_labels == ("axial", "coronal", "sagittal") for layer in first.values())
    n_layers = len(viewer.layers)
    for orientation in ("LAS", "LPS"):  # other scans: the same layers follow the new geometry
        [image] = viewer.open(
            str(phantom_files(orientation)[0]), plugin="napari-apl", name=f"ct {orientation}"
        )
        widget.image_combo.set_layer(image)
        assert widget.predict(sync=True)
        assert_aligned(viewer, image, widget)
        assert widget.controller.geometry.original_affine[0, 0] < 0  # L: the file's x axis runs right-to-left
        assert all(viewer.layers[name] is layer for name, layer in first.items())
    assert len(viewer.layers) == n_layers + 2
    # in a thread worker, with napari progress; the layers are still updated in place
    widget.image_combo.set_layer(ras_image)
    assert widget.predict()
    assert widget.controller.busy and not widget.predict_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.controller.busy, timeout=30000)
    assert_aligned(viewer, ras_image, widget)
    assert all(viewer.layers[name] is layer for name, layer in first.items())
    assert widget.predict_button.isEnabled()
    viewer.dims.ndisplay = 3  # also fine in 3-D
    assert_aligned(viewer, ras_image, widget)
    viewer.dims.ndisplay = 2
    # layers updated in place take the scan's axis names too
    ras_image.axis_labels = ("S", "A", "R")
    assert widget.predict(sync=True)
    assert all(layer.axis_labels == ("S", "A", "R") for layer in first.values())
    # every re-prediction kept the user's display range of the map
    assert tuple(viewer.layers[LAYER_CONFIDENCE].contrast_limits) == (0.0, 0.5)


def hold_predictions(monkeypatch, fail: bool = False) -> threading.Event:
    """Hold every background prediction's worker until the returned event is set (then it runs, or
    raises when ``fail``): what shows meanwhile comes from napari's drawing."""
    import napari_apl.widgets._controller as controller_module
    from napari_apl.core.infer import SlicePredictor

    gate = threading.Event()
    real_run = SlicePredictor.run

    def held_run(self, *args, **kwargs):
        assert gate.wait(60)
        if fail:
            raise RuntimeError("the prediction broke")
        return (yield from real_run(self, *args, **kwargs))

    monkeypatch.setattr(controller_module.SlicePredictor, "run", held_run)
    return gate


def test_background_predict_shows_the_visible_slice_at_once(setup, qtbot, monkeypatch) -> None:
    """Predict in the worker: a lazy pseudo-label layer at once (its drawn slice predicted first), the
    four hidden lazy maps one per event-loop turn after it, then the finished maps; on a second Predict
    the existing layers go lazy in place."""
    viewer, widget, image, _ = setup("LPS")
    reference = widget.controller  # the finished maps of a synchronous run, to compare with
    assert reference.predict(image, sync=True)
    want = {name: np.array(viewer.layers[name].data) for name in PREDICTION_LAYERS}
    stacking = [layer.name for layer in viewer.layers if layer.name in PREDICTION_LAYERS]
    for name in PREDICTION_LAYERS:
        viewer.layers.remove(name)
    gate = hold_predictions(monkeypatch)  # what shows meanwhile comes from napari's drawing
    viewer.dims.set_current_step(0, 5)
    for _run_number in (1, 2):  # the first Predict builds the layers, the second reuses them
        gate.clear()
        assert widget.predict()
        try:
            # the visible layer at once; the hidden ones (first Predict) one per event-loop turn
            assert LAYER_PSEUDO in viewer.layers
            qtbot.waitUntil(lambda: all(n in viewer.layers for n in PREDICTION_LAYERS), timeout=20000)
            assert [ly.name for ly in viewer.layers if ly.name in PREDICTION_LAYERS] == stacking
            for name in PREDICTION_LAYERS:
                assert not isinstance(viewer.layers[name].data, np.ndarray), name
            assert not any(viewer.layers[n].visible for n in PREDICTION_LAYERS if n != LAYER_PSEUDO)
            pseudo = viewer.layers[LAYER_PSEUDO]
            assert not pseudo.editable
            qtbot.waitUntil(lambda p=pseudo: np.asarray(p._slice.image.raw).any(), timeout=20000)
            np.testing.assert_array_equal(np.asarray(pseudo._slice.image.raw), want[LAYER_PSEUDO][5])
        finally:
            gate.set()
        qtbot.waitUntil(lambda: not widget.controller.busy, timeout=30000)
        for name in PREDICTION_LAYERS:
            data = viewer.layers[name].data
            assert isinstance(data, np.ndarray), name
            np.testing.assert_array_equal(data, want[name], err_msg=name)
        assert viewer.layers[LAYER_PSEUDO].editable


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_a_lazy_layer_renamed_during_predict_ends_as_a_paintable_array(
    setup, qtbot, monkeypatch, notifications, outcome
) -> None:
    """A lazy prediction layer the user renames while Predict runs is no longer found by its name: it
    gets the finished map as a plain array it can paint in (or goes, when the prediction fails),
    instead of staying a placeholder that breaks on the first stroke and keeps the predictor alive."""
    viewer, widget, _image, _ = setup("LPS")
    assert widget.predict(sync=True)
    want = np.array(viewer.layers[LAYER_PSEUDO].data)
    gate = hold_predictions(monkeypatch, fail=outcome == "failed")
    assert widget.predict()
    try:
        renamed = viewer.layers[LAYER_PSEUDO]
        assert not isinstance(renamed.data, np.ndarray)
        renamed.name = "my copy"
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not widget.controller.busy, timeout=30000)
    if outcome == "failed":
        assert "my copy" not in viewer.layers
        return
    mine = viewer.layers["my copy"]
    assert isinstance(mine.data, np.ndarray)
    np.testing.assert_array_equal(mine.data, want)
    assert mine.editable
    before = widget.controller.prediction.pseudo.copy()
    mine.paint((6, 20, 20), 4)  # raised TypeError on the placeholder
    assert mine.data[6, 20, 20] == 4
    np.testing.assert_array_equal(widget.controller.prediction.pseudo, before)  # its own voxels
    assert isinstance(viewer.layers[LAYER_PSEUDO].data, np.ndarray)  # a new pseudo-label layer


def test_the_3d_view_during_predict_predicts_nothing_on_the_event_loop(setup, qtbot, monkeypatch) -> None:
    """napari's 3-D view reads a layer's whole volume on the event loop: switching to it while Predict
    runs shows the slices done so far (the rest when the worker is done) instead of predicting them all
    there, which froze the viewer for the rest of the prediction."""
    viewer, widget, _image, _ = setup("LPS")
    assert widget.predict(sync=True)
    want = np.array(viewer.layers[LAYER_PSEUDO].data)
    gate = hold_predictions(monkeypatch)
    assert widget.predict()
    try:
        lazy = viewer.layers[LAYER_PSEUDO].data
        predictor = lazy.predictor
        qtbot.waitUntil(lambda: predictor.done.any(), timeout=20000)  # the visible slice, drawn in 2-D
        viewer.dims.ndisplay = 3
        qtbot.wait(200)
        assert 0 < predictor.done.sum() < predictor.total
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not widget.controller.busy, timeout=30000)
    np.testing.assert_array_equal(viewer.layers[LAYER_PSEUDO].data, want)  # the whole volume in the end
    viewer.dims.ndisplay = 2


def test_predict_in_the_3d_view_before_the_mouse_was_over_the_canvas(
    make_napari_viewer, phantom_files, tiny_checkpoint, notifications
) -> None:
    """napari 0.9 fails computing the status line of a new labels layer with features in the 3-D view
    until the mouse has set a view direction: Predict there must still finish and say so."""
    viewer = make_napari_viewer(show=True)  # (the status line is computed for a shown viewer)
    [image] = viewer.open(str(phantom_files("LPS")[0]), plugin="napari-apl")
    _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    assert widget.controller.load_checkpoint(tiny_checkpoint) is not None
    widget.image_combo.set_layer(image)
    viewer.dims.ndisplay = 3
    assert viewer.cursor._view_direction is None  # (what a fresh 3-D canvas has: private, no public API)
    assert widget.predict(sync=True)
    assert not notifications
    assert all(name in viewer.layers for name in PREDICTION_LAYERS)
    for name in (LAYER_PSEUDO, LAYER_MAIN, LAYER_AUX):
        assert list(viewer.layers[name].features["name"]) == list(widget.controller.meta.class_names)
    assert viewer.layers.selection.active is viewer.layers[LAYER_PSEUDO]
    viewer.dims.ndisplay = 2


def test_refine_finishes_with_consistent_layers(setup, qtbot) -> None:
    viewer, widget, _image, _ = setup("LAS")
    ctl = widget.controller
    widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    data_events: list[int] = []
    pseudo.events.data.connect(lambda e: data_events.append(1))
    finished: list = []
    ctl.refine_finished.connect(finished.append)
    statuses: list[str] = []
    ctl.status.connect(statuses.append)
    assert ctl.refine(tiny_refine(4, emit_every=1))
    assert not pseudo.editable  # no painting while the labels are being rewritten
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert finished and finished[0].iterations_done == 4 and not finished[0].stopped
    assert "organ size vs the starting model: liver " in statuses[-1]  # how the masks moved
    assert ctl.live_updates >= 1 and len(ctl.history) == 4
    # the first live overlay gives the layer a buffer of the run's own; later overlays and the final
    # re-prediction are copied into it (the content checks below see the final one arrive)
    assert len(data_events) >= 1
    assert ctl.refined and ctl.model is finished[0].model
    # every layer comes from the refined model's final prediction
    np.testing.assert_array_equal(to_canonical_order(pseudo.data), ctl.prediction.pseudo)
    maps = ctl.prediction.as_dict()
    for name, key in ((LAYER_MAIN, "main"), (LAYER_AUX, "aux"), (LAYER_CONFIDENCE, "confidence")):
        np.testing.assert_array_equal(to_canonical_order(viewer.layers[name].data), maps[key])
    assert pseudo.editable
    assert widget.refine_panel.omega_plot.length == 4  # the live plot got the history


def test_live_updates_rewrite_the_pseudo_labels(setup, qtbot, monkeypatch) -> None:
    """Each pseudo-label volume the refinement emits reaches the layer (throttling off)."""
    import napari_apl.widgets._controller as controller_module
    from napari_apl.core.refine import RefineEvent, RefineResult

    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    shape = ctl.prediction.pseudo.shape
    emitted = [np.full(shape, k, np.uint8) for k in (1, 2, 3)]

    def fake_refine(model, meta, volume, config, *, control=None, corrections=None, start=None):
        for i, labels in enumerate(emitted, start=1):
            yield RefineEvent(i, 3, {"con": 1.0 / i}, 0.5 + 0.1 * i, 0.1, 0.0, pseudo=labels)
        return RefineResult(model=model, pseudo=emitted[-1], iterations_done=3)

    monkeypatch.setattr(controller_module, "refine", fake_refine)
    monkeypatch.setattr(controller_module, "LIVE_UPDATE_SECONDS", 0.0)
    pseudo = viewer.layers[LAYER_PSEUDO]
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # the layer's data (copy, array), drawn slice

    def record(_ev) -> None:
        drawn = np.asarray(pseudo._slice.image.raw).copy()
        seen.append((np.asarray(pseudo.data).copy(), pseudo.data, drawn))

    ctl.refine_event.connect(record)
    assert ctl.refine(tiny_refine(3))
    qtbot.waitUntil(lambda: not ctl.busy, timeout=30000)
    assert ctl.live_updates == 3
    for k, (labels, (shown, _, drawn)) in enumerate(zip(emitted, seen[:3]), start=1):
        np.testing.assert_array_equal(to_canonical_order(shown), labels)
        assert drawn.size and np.all(drawn == k)  # the visible slice was redrawn with it
    # the first overlay gives the layer a buffer of the run's own; the next ones are copied into it
    assert seen[0][1] is seen[1][1] is seen[2][1]
    assert ctl._live_buffer is None  # not kept once the run has ended
    assert widget.refine_panel.loss_plot.series("L_Con").tolist() == [1.0, 0.5, 1.0 / 3]

    # with the real throttle, 20 quick events give at most ~2 layer updates per second
    def fast_refine(model, meta, volume, config, *, control=None, corrections=None, start=None):
        for i in range(1, 21):
            yield RefineEvent(i, 20, {"con": 1.0}, 0.5, 0.1, 0.0, pseudo=np.full(shape, i % 5, np.uint8))
        return RefineResult(model=model, pseudo=np.zeros(shape, np.uint8), iterations_done=20)

    monkeypatch.setattr(controller_module, "refine", fast_refine)
    monkeypatch.setattr(controller_module, "LIVE_UPDATE_SECONDS", 0.5)
    started = time.monotonic()
    assert ctl.refine(tiny_refine(20), sync=True)
    assert len(ctl.history) == 20
    assert 1 <= ctl.live_updates <= 1 + 2 * (time.monotonic() - started)


def test_refine_pause_resume_stop(setup, qtbot) -> None:
    viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    widget.predict(sync=True)
    panel = widget.refine_panel
    assert panel.bn_mix.value() == RefineConfig().bn_mix
    assert panel.class_power.value() == RefineConfig().class_balance_power
    assert panel.augment.currentText() == RefineConfig().augment and not panel.augment_geometry.isChecked()
    panel.iterations.setValue(500)
    panel.bn_mix.setValue(0.6)
    panel.class_power.setValue(0.25)
    panel.augment.setCurrentText("domain")
    panel.augment_geometry.setChecked(True)
    assert not panel.class_select.isChecked() and panel.class_select.isEnabled()
    panel.method.setCurrentText("cbst")
    assert not panel.class_select.isEnabled()  # an APL option
    panel.method.setCurrentText("apl")
    panel.class_select.setChecked(True)
    panel.start()
    qtbot.waitUntil(lambda: len(ctl.history) >= 1 and ctl.live_updates >= 1, timeout=60000)
    assert panel.stop_button.isEnabled() and not panel.start_button.isEnabled()
    # the run keeps the settings it started with, and the panel keeps showing them
    assert not panel.iterations.isEnabled() and not panel.method.isEnabled()
    assert not widget.file_radio.isEnabled() and not widget.checkpoint_file.native.isEnabled()
    panel.toggle_pause()
    assert ctl.paused and panel.pause_button.text() == "Resume"
    assert "before the running refinement" in widget.inspect.info.text()  # the curves are not live
    # a live overlay has been shown (napari re-enables editing when data is set): strokes painted now
    # would be overwritten by the next overlay, so the layer stays read-only, and the status says so
    assert not viewer.layers[LAYER_PSEUDO].editable
    assert "read-only" in widget.status.text()
    qtbot.wait(300)  # let a step in flight finish (its event carries the pause's overlay: it may be late)
    held = len(ctl.history)
    for _ in range(20):
        qtbot.wait(300)
        if len(ctl.history) == held:
            break
        held = len(ctl.history)
    qtbot.wait(700)
    assert len(ctl.history) == held
    panel.toggle_pause()
    assert not ctl.paused
    qtbot.waitUntil(lambda: len(ctl.history) > held, timeout=60000)
    panel.stop_button.click()
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    result = ctl.last_result
    assert result.stopped and 1 <= result.iterations_done < 500
    assert ctl.last_config.bn_mix == pytest.approx(0.6)  # the panel's settings reached the run
    assert ctl.last_config.class_balance_power == pytest.approx(0.25)
    assert ctl.last_config.augment == "domain" and ctl.last_config.augment_geometry
    assert ctl.last_config.class_select
    np.testing.assert_array_equal(to_canonical_order(viewer.layers[LAYER_PSEUDO].data), ctl.prediction.pseudo)
    assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()
    assert viewer.layers[LAYER_PSEUDO].editable  # paintable again once the run is over
    assert panel.iterations.isEnabled() and widget.file_radio.isEnabled()
    assert "before the running refinement" not in widget.inspect.info.text()
    summary = widget.summary.toPlainText()
    assert summary.startswith("refined model (apl,") and "not exported" in summary
    # the stopped model is usable, and Revert goes back to the checkpoint
    assert ctl.predict(sync=True)
    refined_pseudo = ctl.prediction.pseudo.copy()
    assert ctl.revert(sync=True)
    assert not ctl.refined
    assert ctl.prediction.pseudo.shape == refined_pseudo.shape


def test_closing_the_widget_stops_a_refinement(setup, qtbot) -> None:
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication, QDockWidget

    viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    widget.predict(sync=True)
    assert ctl.refine(tiny_refine(500))
    qtbot.waitUntil(lambda: len(ctl.history) >= 1, timeout=60000)
    destroyed = []
    widget.destroyed.connect(lambda *_: destroyed.append(True))
    # the panel's own close button: napari unparents the widget and deletes its dock, nothing more
    dock = next(d for d in viewer.window._qt_window.findChildren(QDockWidget) if d.widget() is widget)
    dock.title.close_button.click()
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert ctl.last_result is not None and ctl.last_result.stopped
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    qtbot.waitUntil(lambda: bool(destroyed), timeout=10000)  # and the widget went (its hooks with it)
    assert LAYER_PSEUDO in viewer.layers and viewer.layers[LAYER_PSEUDO].editable
    # a widget opened again predicts into layers the stopped run no longer touches
    _, again = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    assert again is not widget and again.predict(sync=True)
    qtbot.wait(300)
    np.testing.assert_array_equal(
        to_canonical_order(viewer.layers[LAYER_PSEUDO].data), again.controller.prediction.pseudo
    )


def test_an_undone_stroke_leaves_no_correction(setup) -> None:
    """Ctrl+Z on a stroke gives the voxels the model's labels back: they are no corrections (they were
    kept as hard labels of every later refinement); a stroke that stays is counted."""
    viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    before = pseudo.data.copy()
    pseudo.brush_size = 5
    pseudo.paint((4, 20, 20), (int(before[4, 20, 20]) + 1) % 5)  # napari's own paint tool (undoable)
    ctl.collect_corrections()
    painted = int((before != pseudo.data).sum())
    assert painted > 0 and ctl.n_corrected == painted
    pseudo.undo()
    np.testing.assert_array_equal(pseudo.data, before)
    ctl.collect_corrections()
    assert ctl.n_corrected == 0
    pseudo.paint((6, 30, 30), (int(before[6, 30, 30]) + 2) % 5)  # a stroke that stays
    ctl.collect_corrections()
    assert ctl.n_corrected == int((before != pseudo.data).sum()) > 0


def test_corrections_reach_the_next_refinement(setup, monkeypatch) -> None:
    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    painted = pseudo.data.copy()
    painted[6, 20:30, 10:18] = 2  # the user paints right kidney ...
    painted[2, :5, :5] = 0  # ... and erases a corner
    pseudo.data = painted
    import napari_apl.widgets._controller as controller_module

    seen = {}
    real_refine = controller_module.refine

    def spy(*args, **kwargs):
        seen["corrections"] = kwargs.get("corrections")
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(controller_module, "refine", spy)
    assert ctl.refine(tiny_refine(1), sync=True)
    corr = seen["corrections"]
    assert corr is not None and corr.dtype == np.int16 and corr.shape == ctl.prediction.pseudo.shape
    corr_layer = corr.transpose(2, 1, 0)
    assert (corr_layer[6, 20:30, 10:18] == 2).all()
    assert (corr_layer[2, :5, :5] == 0).all()
    touched = corr_layer >= 0
    assert touched.sum() == ((painted != ctl.last_pseudo.transpose(2, 1, 0)) | touched).sum()
    np.testing.assert_array_equal(corr, ctl.last_corrections)
    # the refinement kept them as hard labels (exactly where its 10 mm grid can hold them: the
    # box is aligned with it) and the overlay shows every corrected voxel
    res = ctl.last_result.pseudo.transpose(2, 1, 0)
    assert (res[6, 20:30, 10:18] == 2).all()
    assert (pseudo.data[corr_layer >= 0] == corr_layer[corr_layer >= 0]).all()
    assert (pseudo.data[6, 20:30, 10:18] == 2).all()
    assert ctl.n_corrected == int(touched.sum())
    # a second refinement without new painting passes the same corrections again
    assert ctl.refine(tiny_refine(1), sync=True)
    np.testing.assert_array_equal(seen["corrections"], corr)
    ctl.clear_corrections()
    assert ctl.refine(tiny_refine(1), sync=True)
    assert seen["corrections"] is None
    # painting then predicting again keeps the painted voxels as corrections
    pseudo.data[8, 40:44, 40:44] = 4
    assert ctl.predict(sync=True)
    assert ctl.n_corrected == 16 and (pseudo.data[8, 40:44, 40:44] == 4).all()


def test_a_painted_label_the_model_lacks_is_refused_before_refining(
    setup, notifications, monkeypatch
) -> None:
    """Label 5 (what napari's "new label" button picks next) is no class of the model: Refine says so in
    one line and starts nothing, instead of failing inside the loss."""
    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    painted = pseudo.data.copy()
    painted[6, 20:30, 10:18] = 5
    pseudo.data = painted
    import napari_apl.widgets._controller as controller_module

    started = []
    monkeypatch.setattr(controller_module, "refine", lambda *a, **k: started.append(1))
    assert not ctl.refine(tiny_refine(1), sync=True)
    assert not started and not ctl.busy
    assert notifications and notifications[-1].startswith(
        "label 5 in the painted 'pseudo-label' layer is not one of the model's classes (0 background"
    )
    assert pseudo.editable  # still paintable: the user can erase the stroke


def test_export_round_trip(setup, tmp_path: Path, notifications: list[str]) -> None:
    viewer, widget, _image, labels = setup("LAS")
    ctl = widget.controller
    widget.predict(sync=True)
    assert ctl.refine(tiny_refine(1), sync=True)
    panel = widget.export_panel
    panel.folder.value = str(tmp_path / "out")
    panel.gt_combo.set_layer(labels)
    written = panel.export()
    names = sorted(p.name for p in written)
    assert names == sorted(
        f"image_{kind}"
        for kind in (
            "main.nii.gz",
            "auxiliary.nii.gz",
            "pseudo_label.nii.gz",
            "confidence.nii.gz",
            "consistency.nii.gz",
            "refined.pt",
            "report.json",
            "report.csv",
        )
    )
    assert widget.summary.toPlainText().startswith(f"refined model (exported to {tmp_path / 'out'}")
    src = nib.load(str(labels.metadata["napari_apl"]["source_path"]))
    out = tmp_path / "out"
    back = nib.load(str(out / "image_pseudo_label.nii.gz"))
    assert back.shape == src.shape and nib.aff2axcodes(back.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(back.affine, src.affine)
    shown = viewer.layers[LAYER_PSEUDO].data
    np.testing.assert_array_equal(
        np.asarray(nib.as_closest_canonical(back).dataobj), to_canonical_order(shown)
    )
    conf = nib.load(str(out / "image_confidence.nii.gz"))  # uint8 x 1/255, as the CLI writes it
    assert conf.header.get_data_dtype() == np.uint8 and conf.dataobj.slope == pytest.approx(1 / 255)
    np.testing.assert_allclose(
        np.asarray(nib.as_closest_canonical(conf).get_fdata()),
        ctl.prediction.confidence.astype(np.float64),
        atol=1 / 510 + 1e-3,
    )
    report = json.loads((out / "image_report.json").read_text())
    assert report["ground_truth"] == labels.name and report["refined"]
    sizes = report["refinement"]["organ_voxels_model_grid"]  # loaded vs refined model, per class
    assert len(sizes["start"]) == len(sizes["refined"]) == 5 and sum(sizes["start"]) == sum(sizes["refined"])
    liver = report["organs"][0]
    assert liver["organ"] == "liver" and {"volume_ml", "mean_confidence", "dice", "assd_mm"} <= set(liver)
    voxel_ml = float(np.prod(ctl.geometry.spacing)) / 1000
    assert liver["volume_ml"] == pytest.approx(float((shown == 1).sum()) * voxel_ml)
    csv_lines = (out / "image_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("label,organ,voxels,volume_ml,mean_confidence,dice,assd_mm")
    assert len(csv_lines) == 5
    from napari_apl.core.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "image_refined.pt")
    assert meta.provenance["refined"]["iterations_done"] == 1
    # a second export refuses to overwrite anything by default ...
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert panel.export() == []
    assert (
        notifications
        and notifications[-1].startswith("nothing was written")
        and "exists already" in notifications[-1]
    )
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    # ... and replaces the files when asked
    panel.overwrite.setChecked(True)
    assert len(panel.export()) == 8


def test_export_keeps_each_organs_largest_piece(setup, tmp_path: Path, monkeypatch) -> None:
    """The export option drops an organ's smaller islands from the files, not from the layer."""
    import napari_apl.widgets._controller as controller_module

    warned: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda message: warned.append(str(message)))
    viewer, widget, _image, _labels = setup("LAS")
    widget.predict(sync=True)
    layer = viewer.layers[LAYER_PSEUDO]
    data = np.zeros_like(layer.data)
    data[2:5, 10:13, 10:13] = 1  # a liver of 27 voxels ...
    data[8:10, 30:32, 30:32] = 1  # ... and an 8-voxel island well away from it
    data[2:4, 30:32, 10:12] = 4  # a spleen of 8 voxels ...
    data[9, 5:8, 40:42] = 4  # ... and a 6-voxel island: 43 % of the spleen goes, which is flagged
    ctl = widget.controller
    ctl.prediction.pseudo[...] = to_canonical_order(data)  # as if the model had predicted these pieces
    ctl._write_pseudo(ctl.prediction.pseudo)
    panel = widget.export_panel
    panel.folder.value = str(tmp_path / "out")
    panel.largest.setChecked(True)
    assert panel.export()
    out = nib.as_closest_canonical(nib.load(tmp_path / "out" / "image_pseudo_label.nii.gz"))
    saved = np.asarray(out.dataobj)
    assert (saved == 1).sum() == 27 and (saved == 4).sum() == 8 and (saved == 0).sum() == saved.size - 35
    report = json.loads((tmp_path / "out" / "image_report.json").read_text())
    assert report["largest_component"] is True
    assert report["removed_fraction"]["pseudo-label"]["liver"] == pytest.approx(8 / 35)
    assert report["removed_fraction"]["pseudo-label"]["spleen"] == pytest.approx(6 / 14)
    assert report["removed_fraction"]["pseudo-label"]["left kidney"] == 0
    # 23 % of the liver went (not flagged), 43 % of the spleen (flagged)
    assert len(warned) == 1 and "spleen: 43%" in warned[0] and "false positive" in warned[0]
    assert report["organs"][0]["voxels"] == 27  # the report describes what was written
    assert (layer.data == 1).sum() == 35  # the layer keeps the island
    # a piece the user paints is a correction: it is exported as painted, even as a separate island
    painted = layer.data.copy()
    painted[6, 40:42, 40] = 1
    layer.data = painted
    panel.overwrite.setChecked(True)
    assert panel.export()
    out = nib.as_closest_canonical(nib.load(tmp_path / "out" / "image_pseudo_label.nii.gz"))
    saved = np.asarray(out.dataobj)
    assert (saved == 1).sum() == 27 + 2 and (saved == 4).sum() == 8
    report = json.loads((tmp_path / "out" / "image_report.json").read_text())
    assert report["removed_fraction"]["pseudo-label"]["liver"] == pytest.approx(8 / 37)  # (painted: kept)


@pytest.mark.parametrize("how", ["rename", "delete"])
def test_export_keeps_the_corrections_when_the_pseudo_label_layer_is_renamed_or_gone(
    setup, tmp_path: Path, how: str
) -> None:
    """Painted voxels are exported (and counted) whether or not the painted layer is still there by name:
    Refine uses them either way, so the files must too."""
    viewer, widget, _image, _labels = setup("RAS")
    widget.predict(sync=True)
    layer = viewer.layers[LAYER_PSEUDO]
    painted = layer.data.copy()
    painted[3:6, 4:14, 4:14] = 4  # 300 voxels of spleen, painted
    layer.data = painted
    widget.controller.collect_corrections()  # (what a brush stroke's paint event does)
    assert widget.controller.n_corrected > 0
    if how == "rename":
        layer.name = "my edits"
    else:
        viewer.layers.remove(layer)
    panel = widget.export_panel
    panel.folder.value = str(tmp_path / "out")
    assert panel.export()
    out = nib.load(tmp_path / "out" / "image_pseudo_label.nii.gz")
    saved = np.asarray(nib.as_closest_canonical(out).dataobj)
    expected = widget.controller._with_corrections(widget.controller.prediction.pseudo)
    assert np.array_equal(saved, expected)
    assert (to_layer_order(saved)[3:6, 4:14, 4:14] == 4).all()  # the painted block, as painted
    report = json.loads((tmp_path / "out" / "image_report.json").read_text())
    spleen = next(o for o in report["organs"] if o["label"] == 4)
    assert spleen["voxels"] == int((saved == 4).sum())


def test_errors_become_notifications(setup, tmp_path: Path, notifications: list[str], monkeypatch) -> None:
    import napari_apl._sample_data as sample_module

    monkeypatch.setattr(sample_module, "demo_checkpoint_path", lambda: None)  # no demo model loaded at start
    viewer, widget, image, _ = setup("RAS", load=False)
    ctl = widget.controller
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert ctl.load_checkpoint(bad) is None
    assert ctl.load_checkpoint(tmp_path / "missing.pt") is None
    assert ctl.predict(image, sync=True) is False  # no model loaded
    assert ctl.export(tmp_path) == []  # nothing predicted
    assert len(notifications) == 4
    assert all("\n" not in m for m in notifications)
    assert "bad.pt" in notifications[0] and "does not exist" in notifications[1]
    assert "no model loaded" in notifications[2] and "Predict first" in notifications[3]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"garbage")
    n_layers = len(viewer.layers)
    assert viewer.open(str(broken), plugin="napari-apl") == []
    assert len(viewer.layers) == n_layers and "broken.nii.gz" in notifications[-1]


def test_worker_errors_are_notified(setup, qtbot, notifications: list[str], monkeypatch) -> None:
    viewer, widget, _image, _ = setup("RAS")
    import napari_apl.widgets._controller as controller_module
    from napari_apl.core.errors import APLError

    def failing(*args, **kwargs):
        yield 0, 1
        raise APLError("slices 0..3 contain NaN or Inf voxels: clean the volume first")

    monkeypatch.setattr(controller_module, "iter_predict", failing)
    assert widget.predict()
    qtbot.waitUntil(lambda: not widget.controller.busy, timeout=30000)
    assert notifications == ["slices 0..3 contain NaN or Inf voxels: clean the volume first"]
    assert LAYER_MAIN not in viewer.layers


@pytest.mark.parametrize("kind", ["gantry tilt", "oblique"])
def test_inspect_goes_to_the_slice_napari_shows_on_a_tilted_scan(
    make_napari_viewer, phantom_files, tiny_checkpoint, tmp_path, kind: str
) -> None:
    """On a scan whose slices are not perpendicular to the slider's axis, the Inspect panel's slice is the
    one napari displays (napari slices by the slider's coordinate alone, not the full world point)."""
    import warnings

    import nibabel as nib

    image_path, _ = phantom_files("RAS")
    src = nib.load(str(image_path))
    affine = src.affine.copy()
    if kind == "gantry tilt":  # the slice direction leans forward by 20 degrees (CT gantry tilt)
        affine[:3, 2] += np.array([0.0, np.tan(np.deg2rad(20.0)), 0.0]) * affine[2, 2]
    else:  # the slices are rotated by 15 degrees about the left-right axis
        a = np.deg2rad(15.0)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        affine[:3, :3] = rot @ affine[:3, :3]
    path = tmp_path / "tilted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), affine), str(path))
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Non-orthogonal slicing", UserWarning)
        [image] = viewer.open(str(path), plugin="napari-apl")
        _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
        assert widget.controller.load_checkpoint(tiny_checkpoint) is not None
        widget.image_combo.set_layer(image)
        widget.predict(sync=True)
        panel = widget.inspect
        n, axis = image.data.shape[0], viewer.dims.ndim - 3

        def shown() -> int | None:  # the data slice napari displays (private: no public API for it)
            k = round(float(image._data_slice.point[0]))
            return k if 0 <= k < n else None  # outside: napari shows an empty plane

        # every stop of napari's slider: the panel reads the slice napari shows
        reachable = set()
        for i in range(int(viewer.dims.nsteps[axis])):
            viewer.dims.set_current_step(axis, i)
            assert panel.current_slice() == shown()
            if shown() is None:
                assert panel.info.text() == f"{image.name}: no slice at this slider position"
            else:
                reachable.add(shown())
        # napari's slider step is not the slice spacing on these scans: some slices have no stop
        assert len(reachable) < n if kind == "gantry tilt" else len(reachable) >= n - 1
        for k in range(n):
            panel.go_to_slice(k)
            assert panel.current_slice() == shown()
            assert panel.info.text().startswith(f"{image.name}, slice {shown()}:")
            if k in reachable:
                assert shown() == k
            else:  # the nearest slice napari can show
                assert abs(shown() - k) == 1
        # "next least confident" moves at every press, to the slice it reports
        seen = [panel.current_slice()]
        for _ in range(4):
            seen.append(panel.next_least_confident())
            assert seen[-1] == shown() and seen[-1] != seen[-2]


def test_prediction_layers_sit_on_an_image_layer_whose_transform_flips_an_axis(setup) -> None:
    """A layer holding the scan's slices in reverse order under a negative axial scale (another reader's
    layer, a DICOM stack) is the same scan in world space: its prediction layers must sit where those
    of the plugin's own layer do, and the Inspect panel must name the same slices."""
    viewer, widget, image, _ = setup("RAS")
    assert widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    expected_data, expected_world = np.array(pseudo.data), layer_world_matrix(pseudo)
    axis = viewer.dims.ndim - 3
    viewer.dims.set_current_step(axis, 3)
    expected_slice = widget.inspect.current_slice()
    n = image.data.shape[0]
    flipped = viewer.add_image(
        np.ascontiguousarray(image.data[::-1]),
        name="flipped",
        scale=(-image.scale[0], image.scale[1], image.scale[2]),
        translate=(image.translate[0] + image.scale[0] * (n - 1), image.translate[1], image.translate[2]),
    )
    np.testing.assert_allclose(flipped.data_to_world((0, 0, 0)), image.data_to_world((n - 1, 0, 0)))
    widget.image_combo.set_layer(flipped)
    assert widget.predict(sync=True)
    assert viewer.layers[LAYER_PSEUDO] is pseudo
    np.testing.assert_allclose(layer_world_matrix(pseudo), expected_world)
    np.testing.assert_array_equal(pseudo.data, expected_data)
    for name in PREDICTION_LAYERS:
        np.testing.assert_allclose(layer_world_matrix(viewer.layers[name]), expected_world)
    viewer.dims.set_current_step(axis, 3)
    assert widget.inspect.current_slice() == expected_slice
    widget.inspect.go_to_slice(expected_slice + 1)
    assert widget.inspect.current_slice() == expected_slice + 1


def test_predict_on_a_scan_the_slider_misses_shows_its_middle_slice(setup) -> None:
    """A scan placed elsewhere in the world (no slice at the slider's position): after Predict the slider
    moves to its middle slice, so that its new layers are on screen."""
    viewer, widget, image, _ = setup("LPS")
    far = viewer.add_image(
        np.asarray(image.data),
        name="far scan",
        scale=image.scale,
        translate=np.add(image.translate, (500.0, 0, 0)),
    )
    axis = viewer.dims.ndim - 3
    viewer.dims.set_current_step(axis, 0)  # on the first scan, far below the second
    widget.image_combo.set_layer(far)
    assert widget.predict(sync=True)
    n = far.data.shape[0]
    assert widget.inspect.current_slice() == n // 2
    assert widget.inspect.info.text().startswith(f"far scan, slice {n // 2}:")


def test_inspect_moves_the_slider(setup) -> None:
    viewer, widget, image, _ = setup("LPS")
    widget.predict(sync=True)
    panel = widget.inspect
    prof = panel.profile
    assert prof is not None and prof.n_slices == image.data.shape[0]
    assert panel.noise_plot.length == prof.n_slices
    panel.go_to_slice(7)
    assert panel.current_slice() == 7
    assert panel.info.text().startswith(f"{image.name}, slice 7: mean ω")  # which scan the plots are of
    assert viewer.dims.current_step[0] == 7
    assert panel.hist_plot.counts.sum() == image.data.shape[1] * image.data.shape[2]
    k = panel.next_least_confident()
    assert k == int(np.argmin(prof.mean_confidence)) and panel.current_slice() == k
    k2 = panel.next_least_confident()
    assert k2 != k and prof.mean_confidence[k2] >= prof.mean_confidence[k]
    # a click on the plot goes to the slice under the mouse
    x = panel.noise_plot.plot_rect().left() + panel.noise_plot.plot_rect().width() * 3 / (prof.n_slices - 1)
    assert panel.noise_plot.index_at(x) == 3
    panel.noise_plot.clicked.emit(3)
    assert panel.current_slice() == 3
    # radiological view from the start (anterior up, patient's right on the left: a scan read by the
    # plugin was shown turned by 180 degrees without it); the box turns it off and on again
    camera = viewer.scene.camera
    assert widget.radiological.isChecked() and tuple(camera.orientation2d) == ("up", "left")
    widget.radiological.setChecked(False)
    assert tuple(camera.orientation2d) == ("down", "right")  # napari's own
    widget.radiological.setChecked(True)
    assert tuple(camera.orientation2d) == ("up", "left")
    # the model chooser shows where the loaded model came from
    assert widget.file_radio.isChecked() and Path(str(widget.checkpoint_file.value)) == ctl_path(widget)


def test_inspect_forgets_an_image_removed_from_the_viewer(setup) -> None:
    """The panel kept showing a deleted scan's curves and info line, its button enabled but doing nothing."""
    viewer, widget, image, _ = setup("RAS")
    widget.predict(sync=True)
    panel = widget.inspect
    panel.go_to_slice(5)
    assert panel.profile is not None and panel.next_button.isEnabled() and "slice 5" in panel.info.text()
    viewer.layers.remove(image)
    assert panel.profile is None and not panel.next_button.isEnabled()
    assert panel.noise_plot.length == 0 and panel.area_plot.length == 0 and panel.hist_plot.counts.size == 0
    assert "removed" in panel.info.text() and "Predict again" in panel.info.text()
    assert panel.next_least_confident() is None
    viewer.dims.set_current_step(0, 3)  # (slider events with nothing to inspect change nothing)
    assert "removed" in panel.info.text()


def test_sample_data_and_demo_checkpoint(make_napari_viewer, tiny_checkpoint, monkeypatch) -> None:
    import napari_apl._sample_data as sample_module
    import napari_apl.widgets._controller as controller_module

    monkeypatch.setattr(sample_module, "demo_checkpoint_path", lambda: tiny_checkpoint)
    monkeypatch.setattr(controller_module, "demo_checkpoint_path", lambda: tiny_checkpoint)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    assert widget.controller.checkpoint_path == tiny_checkpoint  # the demo model is the default
    layers = viewer.open_sample("napari-apl", "ct_phantom")
    assert [layer.name for layer in layers] == ["phantom CT", "phantom CT ground truth"]
    assert layers[0].metadata["napari_apl"]["checkpoint"] == str(tiny_checkpoint)
    assert widget.image_combo.layer() == layers[0]
    assert widget.demo_radio.isChecked()
    from napari_apl.widgets import find_apl_widget

    assert find_apl_widget(viewer) == widget


def test_live_overlays_are_made_in_the_worker_with_corrections_on_top() -> None:
    """_live_overlays: throttled, labels() only called when due, corrections on top, layer order, close()."""
    from napari_apl.core.refine import RefineEvent, RefineResult
    from napari_apl.widgets._controller import _live_overlays, _LiveOverlay

    shape = (6, 5, 4)  # canonical (X, Y, Z)
    calls: list[int] = []
    closed: list[bool] = []

    def labels_of(i: int):
        def make() -> np.ndarray:
            calls.append(i)
            return np.full(shape, i % 5, np.uint8, order="F")

        return make

    def events():
        try:
            for i in range(1, 5):
                yield RefineEvent(i, 4, {"con": 1.0}, 0.5, 0.1, 0.0, labels=labels_of(i))
            return RefineResult(model=None, pseudo=np.zeros(shape, np.uint8), iterations_done=4)
        finally:
            closed.append(True)

    corrections = np.full(shape, -1, np.int16)
    corrections[1, 2, 3] = 4
    out = list(_live_overlays(events(), corrections, every_s=0.0))
    assert all(isinstance(o, _LiveOverlay) for o in out) and calls == [1, 2, 3, 4]
    last = out[-1]
    assert last.data.shape == shape[::-1] and last.data.flags.c_contiguous
    assert last.data[3, 2, 1] == 4 and last.data[0, 0, 0] == 4 % 5
    np.testing.assert_array_equal(last.written, last.data)
    assert last.written is not last.data
    # throttled: only the first event within the interval gets an overlay; labels() is not called for the rest
    calls.clear()
    throttled = list(_live_overlays(events(), None, every_s=3600.0))
    assert [isinstance(o, _LiveOverlay) for o in throttled] == [True, False, False, False] and calls == [1]
    # a pause asked for: the next event gets an overlay whatever the interval, once per pause
    calls.clear()
    paused = iter([False, True, True, False])
    forced = list(_live_overlays(events(), None, every_s=3600.0, force=lambda: next(paused)))
    assert [isinstance(o, _LiveOverlay) for o in forced] == [True, True, False, False] and calls == [1, 2]
    # closing the wrapper closes the refinement generator (its finally blocks run)
    closed.clear()
    gen = _live_overlays(events(), None, every_s=0.0)
    next(gen)
    gen.close()
    assert closed == [True]


@pytest.mark.parametrize("where", [None, (0, 0, 0), (3, 4, 7), (9, 1, 10)])
def test_slices_differ_finds_any_changed_voxel(where):
    """The chunked comparison the Refine click runs sees a change in any slice, the last partial chunk too."""
    a = np.asfortranarray(np.random.default_rng(0).integers(0, 5, (10, 6, 11), dtype=np.uint8))
    b = a.copy(order="F")
    if where is not None:
        b[where] = (b[where] + 1) % 5
    layer_view = np.ascontiguousarray(b.transpose(2, 1, 0)).transpose(2, 1, 0)  # as the layer holds it
    assert _slices_differ(layer_view, a, chunk=4) is (where is not None)


# -- the user's work is never thrown away unasked --------------------------------------------------


def test_an_unexported_refined_model_is_replaced_only_when_the_user_agrees(
    setup, tmp_path: Path, questions, tiny_checkpoint
) -> None:
    _viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(2), sync=True) and ctl.refined and ctl.unsaved_refinement
    refined_model = ctl.model
    # "No": Load model keeps the refined model, and the choice shows the model that is loaded
    questions.answer = False
    widget.demo_radio.setChecked(True)
    assert widget.load_model() is None
    assert len(questions) == 1 and "not been exported" in questions[0]
    assert ctl.model is refined_model and ctl.refined and widget.file_radio.isChecked()
    assert not ctl.revert(sync=True) and ctl.model is refined_model  # Revert asks the same
    assert len(questions) == 2 and "go back to" in questions[1]
    # "Yes": the demo model replaces it; the layers still come from the refined model, and the
    # report says so instead of crediting the demo model with them
    questions.answer = True
    widget.demo_radio.setChecked(True)
    assert widget.load_model() is not None and not ctl.refined and len(questions) == 3
    report = ctl.report()
    assert report["refined"] is True and report["checkpoint"] == str(tiny_checkpoint)
    assert report["refinement"]["iterations_done"] == 2 and "no longer loaded" in report["note"]
    assert widget.predict(sync=True)  # predicting again: the report describes the demo model
    report = ctl.report()
    assert report["refined"] is False and report["refinement"] is None and "note" not in report
    assert Path(report["checkpoint"]).name == "demo_unet_dual.pt"
    # once exported, a refined model goes without a question
    widget.checkpoint_file.value = str(tiny_checkpoint)
    assert widget.load_model() is not None
    assert ctl.refine(tiny_refine(1), sync=True) and ctl.unsaved_refinement
    asked = len(questions)
    widget.export_panel.folder.value = str(tmp_path / "out")
    assert widget.export_panel.export() and not ctl.unsaved_refinement
    assert ctl.revert(sync=True) and len(questions) == asked and not ctl.refined


def test_the_chosen_checkpoint_is_what_predict_uses(setup, tmp_path: Path, notifications, tiny_checkpoint):
    viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    widget.demo_radio.setChecked(True)  # chosen, not loaded: Predict loads it first
    assert widget.predict(sync=True)
    assert ctl.checkpoint_path.name == "demo_unet_dual.pt"
    assert viewer.layers[LAYER_PSEUDO].metadata["napari_apl"]["image"] == _image.name
    bad = tmp_path / "fake.pt"
    bad.write_text("not a checkpoint")
    widget.checkpoint_file.value = str(bad)  # chosen, and it cannot be loaded
    assert widget.file_radio.isChecked()
    assert not widget.predict(sync=True)
    assert "fake.pt" in notifications[-1]
    assert ctl.checkpoint_path.name == "demo_unet_dual.pt" and widget.demo_radio.isChecked()
    widget.checkpoint_file.value = str(tiny_checkpoint)
    widget.refine_panel.iterations.setValue(1)
    assert widget.refine_panel.start()
    assert ctl.checkpoint_path == tiny_checkpoint  # Refine, too, runs the chosen model
    assert ctl.wait_idle(timeout=120) and ctl.refined


def two_scans(setup, phantom_files):
    """A viewer with scans A (predicted, shown) and B ("second scan", not predicted) and the widget."""
    viewer, widget, image_a, _ = setup("RAS")
    [image_b] = viewer.open(str(phantom_files("RAS", seed=1)[0]), plugin="napari-apl")
    image_b.name = "second scan"
    widget.image_combo.set_layer(image_a)
    assert widget.predict(sync=True)
    return viewer, widget, image_a, image_b


def test_each_images_corrections_are_kept(setup, phantom_files, questions) -> None:
    viewer, widget, image_a, image_b = two_scans(setup, phantom_files)
    ctl = widget.controller
    pseudo = viewer.layers[LAYER_PSEUDO]
    box = pseudo.data[4, 10:14, 10:14]
    c = min(range(5), key=lambda k: int((box == k).sum()))  # the label that changes most voxels
    painted = int((box != c).sum())
    assert painted > 0
    pseudo.data[4, 10:14, 10:14] = c  # the user paints on scan A
    pseudo.refresh()
    widget.image_combo.set_layer(image_b)
    assert widget.predict(sync=True)
    assert ctl.n_corrected == 0  # scan B has none of its own
    assert ctl.refine(tiny_refine(1), sync=True)  # refining B leaves A's painting alone
    widget.image_combo.set_layer(image_a)
    assert widget.predict(sync=True)
    assert ctl.n_corrected == painted and (viewer.layers[LAYER_PSEUDO].data[4, 10:14, 10:14] == c).all()
    assert ctl.refine(tiny_refine(1), sync=True)
    corr = ctl.last_corrections.transpose(2, 1, 0)
    assert (corr >= 0).sum() == painted and (corr[4, 10:14, 10:14][corr[4, 10:14, 10:14] >= 0] == c).all()
    # Clear corrections asks first: "No" keeps them, "Yes" forgets them
    questions.answer = False
    assert ctl.clear_corrections() is False and ctl.n_corrected == painted
    assert f"{painted} painted voxels" in questions[-1]
    questions.answer = True
    assert ctl.clear_corrections() is True and ctl.n_corrected == 0
    # the layer shows the model's labels again (the strokes forgotten are no longer drawn)
    np.testing.assert_array_equal(viewer.layers[LAYER_PSEUDO].data, to_layer_order(ctl.prediction.pseudo))


def test_the_users_layers_with_prediction_names_are_left_alone(setup, notifications) -> None:
    viewer, widget, image, _ = setup("RAS")
    ctl = widget.controller
    mine = viewer.add_labels(np.zeros(image.data.shape, dtype=np.uint8), name=LAYER_CONSISTENCY)
    scan = viewer.add_image(np.asarray(image.data), name=LAYER_MAIN)  # a scan opened as main.nii.gz
    assert scan in widget.image_combo.layers()  # the user's "main" is a scan that can be chosen
    assert not widget.predict(sync=True)
    assert "'main'" in notifications[-1] and "rename" in notifications[-1] and "\n" not in notifications[-1]
    assert viewer.layers[LAYER_CONSISTENCY] is mine and viewer.layers[LAYER_MAIN] is scan
    assert LAYER_PSEUDO not in viewer.layers
    mine.name = "my consistency"
    scan.name = "scan main"
    assert widget.predict(sync=True)
    assert viewer.layers["my consistency"] is mine and viewer.layers["scan main"] is scan
    assert all(name in viewer.layers for name in PREDICTION_LAYERS)
    assert viewer.layers.selection.active is viewer.layers[LAYER_PSEUDO]  # the layer to paint in
    assert viewer.layers[LAYER_CONFIDENCE] not in widget.image_combo.layers()  # ours are not offered
    widget.image_combo.set_layer(scan)  # a scan with no file: a refined model names its layer
    assert widget.predict(sync=True)
    assert ctl._refined_meta().provenance["refined"]["target"] == "scan main"


def test_renaming_the_chosen_image_keeps_it_chosen(setup) -> None:
    viewer, widget, image, _ = setup("RAS")
    image.name = "patient 7 CT"
    assert widget.image_combo.currentText() == "patient 7 CT"
    assert widget.image_combo.layer() is image
    assert widget.predict(sync=True)
    assert viewer.layers[LAYER_PSEUDO].metadata["napari_apl"]["image"] == "patient 7 CT"


def test_export_failures_are_one_line_and_the_panel_says_nothing_was_written(
    setup, tmp_path: Path, notifications, monkeypatch
) -> None:
    import napari_apl.widgets._controller as controller_module

    _viewer, widget, _image, _ = setup("RAS")
    assert widget.predict(sync=True)
    panel = widget.export_panel
    panel.folder.value = str(tmp_path / "out")
    assert panel.export() and panel.result.text().startswith("wrote")
    panel.folder.value = str(tmp_path / "full")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_write_map = controller_module.write_map
    monkeypatch.setattr(controller_module, "write_map", full_disk)
    assert panel.export() == []
    assert "cannot write into" in notifications[-1] and "No space left" in notifications[-1]
    assert "\n" not in notifications[-1]
    assert panel.result.text().startswith("nothing was written")
    assert not (tmp_path / "full").exists()  # the new folder and its first files went again
    monkeypatch.setattr(controller_module, "write_map", real_write_map)

    # another program saves a file of the export's name while the export runs: the export is refused
    # as a whole, and that program's file stays
    race = tmp_path / "race"
    race.mkdir()
    real_write = controller_module.atomic_write

    def racing_write(path, *args, **kwargs):
        out = real_write(path, *args, **kwargs)
        if str(path).endswith("_report.csv"):
            (race / Path(str(path)).name.replace(".csv", ".json")).write_text("someone else's")
        return out

    monkeypatch.setattr(controller_module, "atomic_write", racing_write)
    panel.folder.value = str(race)
    assert panel.export() == []
    assert "appeared while writing" in notifications[-1] and "\n" not in notifications[-1]
    assert [p.read_text() for p in race.iterdir()] == ["someone else's"]


def test_a_paused_refinement_says_so(setup, qtbot) -> None:
    _viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    statuses: list[str] = []
    ctl.status.connect(statuses.append)
    assert ctl.refine(tiny_refine(500))
    qtbot.waitUntil(lambda: len(ctl.history) >= 1, timeout=60000)
    at_pause = len(statuses)
    widget.refine_panel.toggle_pause()
    qtbot.wait(1000)  # the step in flight ends while paused
    while_paused = statuses[at_pause:]
    ctl.stop()
    ctl.resume()
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert while_paused and while_paused[0].startswith("refinement paused")
    assert not [s for s in while_paused if s.startswith("refine ")]  # no plain progress line
    assert while_paused[-1].startswith(("paused at refine", "refinement paused"))


def test_refining_another_image_leaves_the_shown_images_painting_alone(
    setup, phantom_files, monkeypatch
) -> None:
    """Refine on scan B (never predicted) while scan A is shown: A's painting stays A's, autosave too."""
    import napari_apl.widgets._controller as controller_module
    from napari_apl._layers import volume_from_layer
    from napari_apl.core.autosave import find_autosaves
    from napari_apl.core.autosave import restore as restore_autosave
    from napari_apl.core.errors import APLError

    viewer, widget, image_a, image_b = two_scans(setup, phantom_files)
    ctl = widget.controller
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.data[4, 10:14, 10:14] = (pseudo.data[4, 10:14, 10:14] + 1) % 5  # 16 voxels painted on A
    pseudo.refresh()
    assert ctl.maybe_autosave(force=True) is not None
    assert ctl.refine(tiny_refine(1), image_layer=image_b, sync=True)  # B's run and its re-prediction
    [entry] = find_autosaves(volume_from_layer(image_a))
    corr, _, _ = restore_autosave(entry)
    assert corr is not None and int((corr >= 0).sum()) == 16  # A's autosave still holds A's painting

    def broken(*args, **kwargs):
        raise APLError("out of memory")  # (an APLError: a logged traceback would keep the viewer alive)
        yield  # a generator, like the real refine

    widget.image_combo.set_layer(image_a)
    assert widget.predict(sync=True)
    assert ctl.n_corrected == 16
    monkeypatch.setattr(controller_module, "refine", broken)
    assert ctl.refine(tiny_refine(1), image_layer=image_b, sync=True)  # fails in the task
    pseudo.data[6, 10:12, 10:12] = (pseudo.data[6, 10:12, 10:12] + 1) % 5  # 4 more on A, still shown
    pseudo.refresh()
    assert widget.predict(sync=True)  # A again: all 20 painted voxels are A's
    assert ctl.n_corrected == 20


def test_a_failed_export_over_old_files_leaves_them_all_as_they_were(
    setup, tmp_path: Path, notifications, monkeypatch
) -> None:
    import napari_apl.widgets._controller as controller_module

    viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    out = tmp_path / "out"
    assert ctl.export(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.data[4, 10:14, 10:14] = (pseudo.data[4, 10:14, 10:14] + 1) % 5
    pseudo.refresh()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(controller_module, "write_map", full_disk)  # after the masks were written
    assert ctl.export(out, overwrite=True) == []
    assert "nothing was written" in notifications[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no file replaced, none left over


def test_demo_opens_the_sample_with_the_widget_and_fits_it(make_napari_viewer, qtbot, monkeypatch) -> None:
    """README line 1: ``napari-apl demo`` (without running the event loop forever)."""
    import napari

    from napari_apl._demo import FIT_DELAY_MS, launch_demo
    from napari_apl.widgets._main import find_apl_widget

    # shown, as the demo is; the fixture closes it and checks for leaks
    monkeypatch.setattr(napari, "Viewer", lambda **kwargs: make_napari_viewer(show=True, **kwargs))
    viewer = launch_demo(run=False)
    widget = find_apl_widget(viewer)
    assert widget is not None and widget.controller.model is not None
    assert widget.controller.checkpoint_path.name == "demo_unet_dual.pt"
    assert widget.image_combo.layer() is viewer.layers[0] and widget.radiological.isChecked()
    viewer.window._qt_window.resize(1100, 900)
    qtbot.wait(FIT_DELAY_MS + 1500)  # the window is laid out, then the scan is fitted to the canvas
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    fitted = camera.zoom
    viewer.reset_view()
    assert camera.zoom == pytest.approx(fitted, rel=1e-3)  # already fitted: the scan is not cropped


def test_predict_on_ct_stored_as_hu_plus_1024_says_which_window(
    setup, phantom_files, tmp_path: Path, monkeypatch
) -> None:
    """Auto normalisation takes the shifted abdomen window for HU + 1024 CT and says so in a
    notification, once per scan; the masks equal those of the same scan in HU."""
    import napari_apl.widgets._controller as controller_module

    warned: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda message: warned.append(str(message)))
    viewer, widget, _image, _ = setup("RAS")
    assert widget.predict(sync=True) and warned == []
    hu_masks = np.asarray(viewer.layers[LAYER_PSEUDO].data).copy()
    src = nib.load(str(phantom_files("RAS")[0]))
    raw_path = tmp_path / "raw_ct.nii.gz"
    raw = nib.Nifti1Image((np.asarray(src.dataobj).astype(np.int32) + 1024).astype(np.uint16), src.affine)
    raw.header.set_slope_inter(1, 0)
    nib.save(raw, str(raw_path))
    [raw_layer] = viewer.open(str(raw_path), plugin="napari-apl")
    widget.image_combo.set_layer(raw_layer)
    assert widget.predict(sync=True)
    assert len(warned) == 1 and "HU + 1024" in warned[0] and "ct-abdomen-offset" in warned[0]
    assert np.array_equal(np.asarray(viewer.layers[LAYER_PSEUDO].data), hu_masks)
    # said once per scan: predicting and refining the same layer again adds no notification
    assert widget.predict(sync=True) and widget.controller.refine(tiny_refine(1), sync=True)
    assert len(warned) == 1


def test_export_never_writes_over_the_loaded_checkpoint(setup, tmp_path: Path, notifications) -> None:
    """Even with 'overwrite' ticked, an export into the folder the loaded checkpoint came from (an
    earlier export) refuses to replace it: Revert needs it (scans opened as layers are kept the same way)."""
    _viewer, widget, _image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(1), sync=True)
    panel = widget.export_panel
    panel.folder.value = str(tmp_path / "out")
    written = panel.export()
    [ck] = [p for p in written if p.suffix == ".pt"]
    assert ctl.load_checkpoint(ck) is not None and ctl.checkpoint_path == ck
    assert widget.predict(sync=True) and ctl.refine(tiny_refine(1), sync=True)
    before = {p: p.read_bytes() for p in written}
    panel.overwrite.setChecked(True)
    assert panel.export() == []
    assert "same file as an input" in notifications[-1] and ck.name in notifications[-1]
    assert {p: p.read_bytes() for p in written} == before  # nothing replaced, not only the checkpoint
    assert panel.result.text().startswith("nothing was written")


def test_a_user_layer_named_like_a_prediction_layer_mid_run_changes_no_layer(
    setup, qtbot, notifications
) -> None:
    """A layer of the user's taking a prediction layer's name during a refinement: the run's maps are
    not half shown (some layers refined, some not); the error says what to do."""
    viewer, widget, image, _ = setup("RAS")
    ctl = widget.controller
    assert widget.predict(sync=True)
    names = (LAYER_AUX, LAYER_CONFIDENCE, LAYER_PSEUDO)
    before = {name: np.asarray(viewer.layers[name].data).copy() for name in names}
    shown = ctl.prediction
    assert ctl.refine(tiny_refine(30, bn="adapt", lr=1e-2))
    qtbot.waitUntil(lambda: len(ctl.history) >= 1, timeout=60000)
    viewer.layers.remove(LAYER_MAIN)
    viewer.add_labels(np.zeros(image.data.shape, dtype=np.uint8), name=LAYER_MAIN)
    qtbot.waitUntil(lambda: not ctl.busy, timeout=120000)
    assert "'main'" in notifications[-1] and "rename" in notifications[-1]
    for name, data in before.items():  # as before the run (pseudo-label too, not its last live overlay)
        np.testing.assert_array_equal(np.asarray(viewer.layers[name].data), data)
    # Export writes from the layers and the prediction they show: still that one, no mix of two models
    assert ctl.prediction is shown


def test_result_layers_after_a_refinement_come_one_event_loop_turn_each(setup, qtbot) -> None:
    """The four hidden maps of the refined model go to their layers (the same layers, in place) one per
    event-loop turn while the task is still busy, before the pseudo labels and ``refine_finished``: no
    single turn of the main thread carries all five layers."""
    from qtpy.QtCore import QTimer

    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    hidden = (LAYER_MAIN, LAYER_AUX, LAYER_CONFIDENCE, LAYER_CONSISTENCY)
    layers = {name: viewer.layers[name] for name in hidden}
    shown_before = [weakref.ref(layer.data) for layer in layers.values()]
    ticks = [0]
    timer = QTimer()
    timer.setInterval(1)
    timer.timeout.connect(lambda: ticks.__setitem__(0, ticks[0] + 1))
    order: list[tuple[str, int, bool]] = []  # (what, timer ticks so far, busy)
    for name, layer in layers.items():
        layer.events.data.connect(lambda e, n=name: order.append((n, ticks[0], ctl.busy)))
    ctl.refine_finished.connect(lambda r: order.append(("finished", ticks[0], ctl.busy)))
    saver = ctl.autosaver
    assert saver is not None
    saved_from: list[tuple[bool, object]] = []  # (on the main thread, the meta of a saved model)
    real_save = saver.save

    def save(*args, **kwargs):
        if kwargs.get("model") is not None:
            saved_from.append((threading.current_thread() is threading.main_thread(), kwargs["meta"]))
        return real_save(*args, **kwargs)

    saver.save = save
    written = ctl.autosaves_written
    timer.start()
    try:
        assert ctl.refine(tiny_refine(2))
        qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    finally:
        timer.stop()
    # the refined model was autosaved once, from the worker, as finished (not "in progress")
    [(on_main, meta)] = saved_from
    assert not on_main and ctl.autosaves_written == written + 1
    refined = meta.provenance["refined"]
    assert refined["iterations_done"] == 2 and "in_progress" not in refined
    assert [what for what, _, _ in order] == [*hidden, "finished"]
    assert all(busy for _, _, busy in order)  # Export and Predict stay locked until the last layer
    stamps = [t for _, t, _ in order]
    assert all(b > a for a, b in itertools.pairwise(stamps))  # the timer ticked between each
    maps = ctl.prediction.as_dict()
    for (name, layer), key in zip(layers.items(), ("main", "aux", "confidence", "consistency"), strict=True):
        assert viewer.layers[name] is layer and not layer.visible
        np.testing.assert_array_equal(to_canonical_order(layer.data), maps[key])
    gc.collect()  # the maps shown before the run are let go (from a thread of their own, in a second)
    qtbot.waitUntil(lambda: all(ref() is None for ref in shown_before), timeout=10000)


def test_closing_while_result_layers_are_staged_puts_the_shown_maps_back(setup, qtbot, monkeypatch) -> None:
    """A close that comes while the refined maps go to the hidden layers one by one: no layer is left
    with the refined maps beside layers still showing the earlier prediction."""
    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    shown = ctl.prediction
    hidden = (LAYER_MAIN, LAYER_AUX, LAYER_CONFIDENCE, LAYER_CONSISTENCY)
    before = {name: viewer.layers[name].data for name in hidden}
    staged_names: list[str] = []
    real_stage = ctl._stage_result_layer

    def stage_then_close(item, *args, **kwargs):
        real_stage(item, *args, **kwargs)
        staged_names.append(item.name)
        ctl._closing = True  # as the viewer's close does, while the worker waits for the next turn

    monkeypatch.setattr(ctl, "_stage_result_layer", stage_then_close)
    finished: list = []
    ctl.refine_finished.connect(finished.append)
    assert ctl.refine(tiny_refine(2))
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert staged_names == [LAYER_MAIN] and finished  # one layer was given its refined map, then the close
    for name in hidden:
        assert viewer.layers[name].data is before[name], name
    assert ctl.prediction is shown and ctl.refined
    np.testing.assert_array_equal(to_canonical_order(viewer.layers[LAYER_PSEUDO].data), shown.pseudo)


def test_the_worker_stops_waiting_for_a_stage_that_never_comes(setup, qtbot, monkeypatch) -> None:
    """If the event loop stops turning while the refined maps are staged (the app quits), the worker
    does not wait for good: after a bound it hands the rest to on_return, which shows every map."""
    import napari_apl.widgets._controller as controller_module

    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    monkeypatch.setattr(controller_module, "_STAGE_PAUSE_MS", 3_600_000)  # the stage's timer never fires
    monkeypatch.setattr(controller_module, "_STAGE_WAIT_S", 0.3)
    staged: list[str] = []
    real_stage = ctl._stage_result_layer
    monkeypatch.setattr(
        ctl,
        "_stage_result_layer",
        lambda item, *a, **k: (staged.append(item.name), real_stage(item, *a, **k)),
    )
    assert ctl.refine(tiny_refine(2))
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert staged == [LAYER_MAIN]  # one stage, then the worker gave up waiting
    maps = ctl.prediction.as_dict()
    assert ctl.refined and ctl.prediction is not None
    for name, key in ((LAYER_MAIN, "main"), (LAYER_AUX, "aux"), (LAYER_CONFIDENCE, "confidence")):
        np.testing.assert_array_equal(to_canonical_order(viewer.layers[name].data), maps[key])


def test_a_failed_prediction_with_the_refined_model_keeps_the_model(setup, qtbot, monkeypatch) -> None:
    """The refinement ends, then predicting the scan with its model fails (say, out of memory): the
    refined model is kept (and its autosave too), a one-line warning says so, and every layer keeps the
    last full prediction."""
    import napari_apl.widgets._controller as controller_module

    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    shown, start_model = ctl.prediction, ctl.model
    before = {name: viewer.layers[name].data for name in (LAYER_MAIN, LAYER_AUX, LAYER_CONFIDENCE)}

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 2.1 GiB for an array")
        yield  # (a generator, as iter_predict is)

    monkeypatch.setattr(controller_module, "iter_predict", out_of_memory)
    warnings: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", warnings.append)
    discarded: list[bool] = []
    monkeypatch.setattr(ctl, "_autosave_without_the_failed_run", lambda: discarded.append(True))
    finished: list = []
    ctl.refine_finished.connect(finished.append)
    assert ctl.refine(tiny_refine(2))
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert finished and finished[0].iterations_done == 2
    assert ctl.refined and ctl.model is finished[0].model and ctl.model is not start_model
    assert ctl.unsaved_refinement and not discarded
    [warning] = [w for w in warnings if "refined model is kept" in w]
    assert "cannot allocate 2.1 GiB" in warning and "\n" not in warning
    assert ctl.prediction is shown
    for name, data in before.items():
        assert viewer.layers[name].data is data, name
    np.testing.assert_array_equal(to_canonical_order(viewer.layers[LAYER_PSEUDO].data), shown.pseudo)
    assert viewer.layers[LAYER_PSEUDO].editable


def test_a_refinement_that_fails_midway_leaves_no_live_overlay(setup, qtbot, monkeypatch) -> None:
    """A run that raises (a RuntimeError, as torch's errors are) after its live overlays were shown: the
    task ends with a one-line error, and the pseudo-label layer goes back to the last full prediction
    (Export would otherwise write the thrown-away model's labels)."""
    import napari_apl.widgets._controller as controller_module
    from napari_apl.core.refine import RefineEvent

    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    shown, start_model = ctl.prediction, ctl.model
    overlay = ((shown.pseudo.astype(np.int16) + 1) % 5).astype(np.uint8)  # differs from it everywhere

    def failing_refine(model, meta, volume, config, *, control=None, corrections=None, start=None):
        yield RefineEvent(1, 5, {"con": 1.0}, 0.5, 0.1, 0.0, pseudo=overlay)
        yield RefineEvent(2, 5, {"con": 0.9}, 0.5, 0.1, 0.0, pseudo=overlay)
        raise RuntimeError("weights became NaN")

    monkeypatch.setattr(controller_module, "refine", failing_refine)
    monkeypatch.setattr(controller_module, "LIVE_UPDATE_SECONDS", 0.0)
    errors: list[str] = []
    real_notify = controller_module.notify_error
    monkeypatch.setattr(
        controller_module, "notify_error", lambda exc: errors.append(real_notify(exc)) or errors[-1]
    )
    assert ctl.refine(tiny_refine(5))
    # a RuntimeError (torch's usual error) ends the task too: superqt's worker would swallow it, and the
    # widget stayed busy for good
    qtbot.waitUntil(lambda: not ctl.busy, timeout=30000)
    assert errors == ["RuntimeError: weights became NaN"]
    assert ctl.live_updates >= 1  # the overlay was shown during the run
    assert not ctl.refined and ctl.model is start_model and ctl.prediction is shown
    pseudo = viewer.layers[LAYER_PSEUDO]
    np.testing.assert_array_equal(to_canonical_order(pseudo.data), shown.pseudo)
    assert pseudo.editable
    ctl.collect_corrections()
    assert ctl.corrections is None or not (ctl.corrections >= 0).any()  # nothing counted as painted


def test_a_pseudo_label_layer_renamed_during_a_run_is_unlocked_after_it(setup, qtbot) -> None:
    """The layer is locked by its name at the start; renamed meanwhile, it was never found to unlock."""
    viewer, widget, _image, _ = setup("LPS")
    ctl = widget.controller
    widget.predict(sync=True)
    layer = viewer.layers[LAYER_PSEUDO]
    assert ctl.refine(tiny_refine(3))
    assert not layer.editable  # locked while the run writes into it
    layer.name = "my labels"
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert layer.editable


def test_predict_builds_only_the_visible_layer_before_it_returns(setup, qtbot, monkeypatch) -> None:
    """The click builds the pseudo-label layer with garbage collection of older objects off; the hidden
    layers come after Predict returns (napari's progress bar runs the event loop inside Predict, and
    building them there delayed the visible slice by about 0.5 s)."""
    import gc

    from napari.layers import Labels

    viewer, widget, image, _ = setup("LPS")
    ctl = widget.controller
    frozen_while_built: list[int] = []
    real_add = ctl._add_labels

    def add_labels(*args, **kwargs):
        frozen_while_built.append(gc.get_freeze_count())
        return real_add(*args, **kwargs)

    monkeypatch.setattr(ctl, "_add_labels", add_labels)
    assert ctl.predict(image)
    assert [n for n in PREDICTION_LAYERS if n in viewer.layers] == [LAYER_PSEUDO]
    assert frozen_while_built and frozen_while_built[0] > 0
    qtbot.waitUntil(lambda: all(n in viewer.layers for n in PREDICTION_LAYERS), timeout=20000)
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert gc.get_freeze_count() == 0  # given back to the collector when the task ends
    assert isinstance(viewer.layers[LAYER_MAIN], Labels)


def test_the_widget_does_a_first_labels_layers_one_time_work_as_it_opens() -> None:
    """In a fresh process, making the controller imports what a first Labels layer needs and fills
    vispy's dash-pattern cache, once (the first Predict then does not)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import napari_apl.widgets._controller as c\n"
        "from vispy.visuals.line.dash_atlas import _make_pattern\n"
        "assert 'pandas' not in sys.modules and _make_pattern.cache_info().currsize == 0\n"
        "c._warm_up_labels_layer()\n"
        "assert 'pandas' in sys.modules and _make_pattern.cache_info().currsize >= 13\n"
        "hits = _make_pattern.cache_info().hits\n"
        "c._warm_up_labels_layer()\n"
        "assert _make_pattern.cache_info().hits == hits  # once per process\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_viewer_tasks_leave_a_core_from_three_cores_up() -> None:
    from napari_apl.widgets._controller import _task_threads

    assert [_task_threads(n, n) for n in (1, 2, 3, 4, 16)] == [1, 2, 2, 3, 15]
    assert _task_threads(16, 4) == 4  # never more threads than torch had


def test_the_refine_panel_counts_painted_voxels_once_the_strokes_pause(setup, qtbot) -> None:
    """The count said 'none' until the next run, however much had been painted."""
    viewer, widget, _image, _ = setup("LPS")
    widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    label = widget.refine_panel.corrections_label
    assert "none" in label.text()
    k = pseudo.data.shape[0] // 2
    old = int(pseudo.data[k, 10, 10])
    pseudo.paint((k, 10, 10), (old + 1) % 5, refresh=True)  # one brush stroke (brush size 10 by default)
    qtbot.waitUntil(lambda: "voxels kept as hard labels" in label.text(), timeout=5000)
    n = widget.controller.n_corrected
    assert n > 0 and label.text().startswith(f"corrections on '{_image.name}': {n} voxels")


def test_the_corrections_count_and_clear_follow_the_chosen_scan(setup, phantom_files, questions) -> None:
    """The Refine tab counts (and clears) the corrections of the scan Refine will run on: it counted the
    shown scan's while another scan was chosen."""
    viewer, widget, image_a, image_b = two_scans(setup, phantom_files)
    ctl, label = widget.controller, widget.refine_panel.corrections_label
    a = image_a.name
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.data[4, 10:14, 10:14] = (pseudo.data[4, 10:14, 10:14] + 1) % 5  # 16 voxels painted on A
    pseudo.refresh()
    ctl.collect_corrections()
    widget.refine_panel._update_corrections()
    assert label.text() == f"corrections on '{a}': 16 voxels kept as hard labels"
    widget.image_combo.set_layer(image_b)  # B chosen, A still shown: Refine would use B's (none)
    assert label.text().startswith("corrections on 'second scan': none")
    assert widget.predict(sync=True)  # B shown, A's painting kept aside
    widget.image_combo.set_layer(image_a)  # A chosen, B shown
    assert label.text() == f"corrections on '{a}': 16 voxels kept as hard labels"
    widget.refine_panel.clear_button.click()  # asks, then forgets A's (not B's) corrections
    assert questions and f"16 voxels painted on '{a}'" in questions[-1]
    assert label.text().startswith(f"corrections on '{a}': none")
    assert ctl.corrections_count(image_a) == 0


def test_a_checkpoint_that_fails_to_load_does_not_stay_on_show(setup, tmp_path: Path) -> None:
    """After a broken file the choice went back to the model in use, but the field still named the file
    (and choosing it again was no change, so nothing happened)."""
    _viewer, widget, _image, _ = setup("LPS", load=False)
    widget.use_demo_checkpoint()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)
    widget.checkpoint_file.value = str(broken)
    assert widget.file_radio.isChecked()
    assert widget.load_model() is None
    assert widget.demo_radio.isChecked() and str(widget.checkpoint_file.value) in ("", ".")
    widget.checkpoint_file.value = str(broken)  # chosen again: a change, so it is picked as the model
    assert widget.file_radio.isChecked()


def test_stale_lines_go_when_they_no_longer_apply(setup, tmp_path: Path) -> None:
    """'no image layer chosen' stayed after an image was chosen; 'wrote 7 files' stayed after a refinement
    had made another model and other masks."""
    viewer, widget, image, _labels = setup("LPS")
    other = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="other")
    widget.image_combo.set_layer(other)
    widget.controller.error("no image layer chosen: open a CT scan")
    assert widget.status.text().startswith("no image layer chosen")
    widget.image_combo.set_layer(image)
    assert widget.status.text() == ""
    widget.predict(sync=True)
    widget.export_panel.folder.value = str(tmp_path / "out")
    assert widget.export_panel.export()
    assert widget.export_panel.result.text().startswith("wrote ")
    assert widget.controller.refine(tiny_refine(1), sync=True)
    assert widget.export_panel.result.text() == "(not exported since the model or the masks changed)"


def test_series_of_unlike_sizes_each_get_their_own_scale(qtbot) -> None:
    """Mean ω (about 0.95) and disagreement (about 0.03) on one axis were two flat lines at its edges."""
    from napari_apl.widgets._plots import LinePlot

    plot = LinePlot("per slice")
    qtbot.addWidget(plot)
    omega, dis = [0.93, 0.95, 0.99], [0.01, 0.06, 0.03]
    plot.set_series({"mean ω": (omega, (0, 1, 0, 1)), "disagreement": (dis, (1, 0, 0, 1))}, own_scales=True)
    assert plot.y_range("mean ω") == (0.93, 0.99) and plot.y_range("disagreement") == (0.01, 0.06)
    plot.resize(300, 120)
    plot.grab()  # paints without error
    plot.set_series({"mean ω": (omega, (0, 1, 0, 1))}, y_range=(0.0, 1.0), own_scales=True)
    assert not plot.own_scales and plot.y_range() == (0.0, 1.0)  # a fixed range wins


def test_revert_is_offered_only_for_a_refined_model(setup) -> None:
    """It was enabled before any refinement, with nothing to go back from."""
    _viewer, widget, _image, _ = setup("LPS")
    revert = widget.refine_panel.revert_button
    widget.predict(sync=True)
    assert not revert.isEnabled()
    assert widget.controller.refine(tiny_refine(1), sync=True)
    assert revert.isEnabled()
    widget.controller.confirm = lambda question: True
    assert widget.controller.revert(sync=True)
    assert not widget.controller.refined and not revert.isEnabled()


def test_a_long_export_folder_does_not_widen_the_panel(setup, tmp_path: Path) -> None:
    """The export line names the folder elided in the middle (the whole path in its tooltip and text), so
    a deep folder does not stretch the dock widget."""
    _viewer, widget, _image, _ = setup("RAS")
    assert widget.predict(sync=True)
    panel = widget.export_panel
    before = panel.sizeHint().width()
    folder = tmp_path.joinpath(*(["a_rather_long_folder_name_for_a_study"] * 8), "out")
    folder.parent.mkdir(parents=True)
    panel.folder.value = str(folder)
    assert panel.export()
    line = f"wrote {len(list(folder.iterdir()))} files to {folder}"
    assert panel.sizeHint().width() <= before + 20 and panel.minimumSizeHint().width() <= before + 20
    assert panel.result.text() == line and panel.result.toolTip() == line
    # the status line above the tabs says it too, in at most STATUS_LINES lines (it took 7 and pushed the
    # Export button out of view), whole in its tooltip
    from napari_apl.widgets._main import STATUS_LINES

    status = widget.status
    said = f"exported {len(list(folder.iterdir()))} files to {folder}"
    assert status.text() == said and status.toolTip() == said
    per_line = status.fontMetrics().lineSpacing()
    assert status.heightForWidth(300) > (STATUS_LINES + 1) * per_line  # the message needs more lines ...
    assert STATUS_LINES * per_line <= status.maximumHeight() < (STATUS_LINES + 1) * per_line  # ... than shown


def test_refine_starts_from_the_set_up_made_after_predict(setup, tiny_checkpoint, monkeypatch, qtbot) -> None:
    """After Predict the next refinement's set-up is made in the background for the Refine panel's
    settings; Refine then makes none of its own and refines exactly as a run that makes it."""
    import torch

    import napari_apl.core.refine as refine_module
    from napari_apl._layers import volume_from_layer
    from napari_apl.core.utils import run_generator

    _viewer, widget, image, _ = setup("LPS")
    ctl, panel = widget.controller, widget.refine_panel
    panel.iterations.setValue(3)
    made: list[str] = []  # "ahead" or "run": which thread made a set-up
    real = refine_module._set_up

    def spy(*args, **kwargs):
        made.append("ahead" if threading.current_thread().name == "napari-apl-prepare" else "run")
        return real(*args, **kwargs)

    monkeypatch.setattr(refine_module, "_set_up", spy)
    widget.predict(sync=True)
    ahead = ctl._ahead
    assert ahead is not None and ahead.model is ctl.model
    ahead.thread.join(60)
    assert ahead.start is not None and made == ["ahead"]
    model = ctl.model
    cfg = panel.config()
    assert ctl.refine(cfg, image_layer=image, sync=True)
    assert ahead.start.used and "run" not in made  # the run took the set-up made ahead
    warm = ctl.last_result

    volume = volume_from_layer(image)
    norm = ctl.normalization(volume.data, image)
    cold = run_generator(refine_module.refine(model, ctl.meta, volume, ctl._run_config(cfg, norm)))
    assert made.count("run") == 1
    for (key, value), other in zip(
        warm.model.state_dict().items(), cold.model.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), key
    assert np.array_equal(warm.pseudo, cold.pseudo)

    # the refined model gets its own set-up for a further refinement; a settings change leaves it unused
    ahead = ctl._ahead
    assert ahead is not None and ahead.model is ctl.model is warm.model
    ahead.thread.join(60)
    panel.bn_mix.setValue(panel.bn_mix.value() / 2)
    assert ctl.refine(panel.config(), image_layer=image, sync=True)
    assert not ahead.start.used and made.count("run") == 2

    # a new BN target share (once it has settled) or intensity preset: the set-up is made again for it
    ahead = ctl._ahead
    assert ahead is not None
    ahead.thread.join(60)
    panel.bn_mix.setValue(0.5)
    qtbot.waitUntil(lambda: ctl._ahead is not ahead, timeout=5000)
    assert ahead._cancel.is_set() and ctl._ahead.key == refine_module.setup_key(
        ctl._run_config(panel.config(), ctl.normalization(volume.data, image))
    )
    ahead = ctl._ahead
    widget.preset_combo.setCurrentText("ct-soft")
    qtbot.waitUntil(lambda: ctl._ahead is not ahead, timeout=5000)
    assert ahead._cancel.is_set()
    ahead = ctl._ahead
    ahead.thread.join(60)
    runs = made.count("run")
    assert ctl.refine(panel.config(), image_layer=image, sync=True)
    assert ahead.start.used and made.count("run") == runs  # the remade set-up served the run

    # loading a checkpoint cancels the set-up made for the model it replaces
    ahead = ctl._ahead
    assert ahead is not None
    assert ctl.load_checkpoint(tiny_checkpoint) is not None
    assert ctl._ahead is None and ahead._cancel.is_set()
    ahead.thread.join(60)

    # closing the scan lets go of the set-up made for it (and of the voxels it holds)
    widget.predict(sync=True)
    ahead = ctl._ahead
    assert ahead is not None
    _viewer.layers.remove(image)
    assert ctl._ahead is None and ahead._cancel.is_set()
    ahead.thread.join(60)


def test_the_set_up_made_ahead_computes_with_the_workers_thread_count(
    setup, tiny_checkpoint, monkeypatch
) -> None:
    """From three cores up a viewer task leaves one core for the GUI; the set-up made after Predict runs
    with that thread count too, so a refinement that takes it ends exactly as one that makes its own."""
    import os

    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # as on a 4-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _viewer, widget, image, _ = setup("LPS")
        ctl, panel = widget.controller, widget.refine_panel
        panel.iterations.setValue(2)
        weights = []
        for ahead in (True, False):
            assert ctl.load_checkpoint(tiny_checkpoint) is not None
            ctl.prepare_ahead = ahead
            widget.predict(sync=True)
            made = ctl._ahead
            if ahead:
                made.thread.join(60)
                assert made.start is not None and made.start.threads == 3
            else:
                assert made is None
            assert ctl.refine(panel.config(), image_layer=image, sync=True)
            assert not ahead or made.start.used
            weights.append(ctl.last_result.model.state_dict())
        for key, value in weights[0].items():
            assert torch.equal(value, weights[1][key]), key
        assert torch.get_num_threads() == 4  # given back once the tasks ended
    finally:
        torch.set_num_threads(before)


def test_overlapping_tasks_share_the_thread_count_and_give_it_back(monkeypatch) -> None:
    """A worker and the set-up made ahead, overlapping: both run with the count the first chose; each
    thread gets its own count back, and the last to end the count the first found."""
    import os

    import torch

    from napari_apl.widgets._controller import _leave_a_core_for_the_gui

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    seen: dict[str, int] = {}
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with _leave_a_core_for_the_gui():
            seen["first"] = torch.get_num_threads()
            first_in.set()
            second_in.wait(10)
        seen["first after"] = torch.get_num_threads()
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        torch.set_num_threads(2)  # a thread that had another count: it runs with the first's choice
        with _leave_a_core_for_the_gui():
            seen["second"] = torch.get_num_threads()
            second_in.set()
            first_out.wait(10)
            seen["second, first ended"] = torch.get_num_threads()
        seen["second after"] = torch.get_num_threads()

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert seen == {
            "first": 3,
            "second": 3,
            "first after": 4,
            "second, first ended": 3,
            "second after": 4,
        }
    finally:
        torch.set_num_threads(before)


def test_settings_changes_remake_the_set_up_once_and_never_raise(setup, qtbot, monkeypatch) -> None:
    """Many quick preset changes (a mouse wheel over the combo) remake the set-up once; an unusable device
    drops it without an error at selection (Refine says so when clicked); closing the viewer waits for a
    cancelled set-up still running."""
    import napari_apl.core.refine as refine_module
    import napari_apl.widgets._controller as controller_module

    viewer, widget, image, _ = setup("LPS")
    ctl = widget.controller
    made: list[str] = []
    real = refine_module._set_up

    def slow(*args, **kwargs):
        made.append("ahead" if kwargs.get("ahead") else "run")
        time.sleep(0.3)  # (a large scan: the set-up outlives the changes below)
        return real(*args, **kwargs)

    monkeypatch.setattr(refine_module, "_set_up", slow)
    created: list[object] = []

    class Counted(controller_module._Ahead):
        def __init__(self, *args, **kwargs) -> None:
            created.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(controller_module, "_Ahead", Counted)
    widget.predict(sync=True)
    first = ctl._ahead
    assert first is not None
    qtbot.waitUntil(lambda: made == ["ahead"], timeout=5000)
    for name in ["ct-soft", "ct-abdomen", "ct-soft", "checkpoint", "ct-soft"] * 3:
        widget.preset_combo.setCurrentText(name)
        qtbot.wait(20)
    qtbot.waitUntil(lambda: ctl._ahead is not first, timeout=5000)
    qtbot.wait(600)
    assert len(created) == 2 and len(made) == 2  # one set-up for the settled preset
    running = [th for th in threading.enumerate() if th.name == "napari-apl-prepare"]
    assert len(running) <= 2  # (the cancelled one winding down, the new one waiting for it)

    import torch

    if not torch.cuda.is_available():  # an unusable device: the set-up is dropped, nothing raised
        errors: list[BaseException] = []
        monkeypatch.setattr(ctl, "error", lambda exc: errors.append(exc))
        widget.device_combo.setCurrentText("cuda")
        assert ctl.device == "cuda"
        qtbot.waitUntil(lambda: ctl._ahead is None, timeout=5000)
        assert errors == []
        widget.device_combo.setCurrentText("auto")

    # a set-up cancelled while it runs is waited for when the viewer closes
    widget.refine_panel.settings_changed()
    widget.predict(sync=True)
    ahead = ctl._ahead
    assert ahead is not None and ahead.thread.is_alive()
    viewer.layers.remove(image)
    assert ctl._ahead is None and ahead.thread.is_alive()
    ctl.shutdown()
    assert not ahead.thread.is_alive()
