"""Viewer workflows a user meets between the main steps: undo after a new prediction, ground truth
from another reader, saving a layer still being predicted, a closed scan, the layers' stacking, and
file names nibabel cannot map. Real napari viewers under Xvfb, small phantoms, the demo model."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_apl._layers import ScanGeometry, to_layer_order, volume_from_layer
from napari_apl._reader import get_reader
from napari_apl._writer import LayerNotSaved, write_labels
from napari_apl.core.infer import SlicePredictor
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import load_volume
from napari_apl.widgets import WIDGET_NAME
from napari_apl.widgets._controller import (
    LAYER_AUX,
    LAYER_CONFIDENCE,
    LAYER_CONSISTENCY,
    LAYER_MAIN,
    LAYER_PSEUDO,
)

pytestmark = pytest.mark.viewer


@pytest.fixture
def demo_viewer(make_napari_viewer, phantom_files):
    """Factory: a viewer with two phantom scans (A: RAS, B: LPS) and the widget holding the demo model."""

    def make():
        viewer = make_napari_viewer()
        [a] = viewer.open(str(phantom_files("RAS")[0]), plugin="napari-apl", name="A")
        [b] = viewer.open(str(phantom_files("LPS", seed=1)[0]), plugin="napari-apl", name="B")
        _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
        assert widget.controller.load_checkpoint(None)
        return viewer, widget, a, b

    return make


def _predict(widget, layer) -> None:
    widget.image_combo.set_layer(layer)
    assert widget.predict(sync=True)


def test_undo_after_a_new_prediction_changes_nothing(demo_viewer) -> None:
    """A stroke painted on scan A, then scan B predicted: Ctrl+Z must not write A's old labels into B's
    pseudo labels (napari keeps a layer's undo history when its data is replaced), where they would
    become painted corrections and hard labels of the next refinement."""
    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    _predict(widget, b)
    labels_b = viewer.layers[LAYER_PSEUDO].data.copy()
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    labels_a = pseudo.data.copy()
    z, y, x = np.argwhere((labels_a != labels_b) & (labels_a > 0))[0]
    pseudo.brush_size = 7
    new = next(k for k in (2, 3, 1, 4) if k not in (labels_a[z, y, x], labels_b[z, y, x]))
    pseudo.paint((z, y, x), new)  # an undoable stroke on A
    ctl.collect_corrections()
    assert ctl.n_corrected > 0
    _predict(widget, b)
    pseudo = viewer.layers[LAYER_PSEUDO]
    shown = pseudo.data.copy()
    np.testing.assert_array_equal(shown, labels_b)
    pseudo.undo()
    np.testing.assert_array_equal(pseudo.data, shown)
    ctl.collect_corrections()
    assert ctl.n_corrected == 0
    _predict(widget, a)  # A's stroke is still A's correction
    assert ctl.n_corrected > 0 and viewer.layers[LAYER_PSEUDO].data[z, y, x] == new


def test_ground_truth_is_read_through_its_own_transform(demo_viewer, phantom_files) -> None:
    """Scan and ground truth as another reader gives them (slices reversed under a negative scale) score
    as the plugin's own layers do; ground truth of another grid is refused in one line."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    [gt] = viewer.open(str(phantom_files("RAS")[1]), plugin="napari-apl", name="A gt")
    _predict(widget, a)
    ref = ctl.report(gt_layer=gt)
    assert ref["mean_dice"] > 0.2
    n = a.data.shape[0]
    kw = {
        "scale": (-a.scale[0], a.scale[1], a.scale[2]),
        "translate": (a.translate[0] + a.scale[0] * (n - 1), a.translate[1], a.translate[2]),
    }
    image = viewer.add_image(np.ascontiguousarray(a.data[::-1]), name="flipped", **kw)
    truth = viewer.add_labels(np.ascontiguousarray(gt.data[::-1]), name="flipped gt", **kw)
    _predict(widget, image)
    rep = ctl.report(gt_layer=truth)
    assert rep["mean_dice"] == pytest.approx(ref["mean_dice"], abs=1e-9)
    assert [o["dice"] for o in rep["organs"]] == pytest.approx([o["dice"] for o in ref["organs"]], abs=1e-9)
    # the right voxels, but placed one slice further along: not this scan's ground truth
    moved = viewer.add_labels(np.asarray(gt.data), name="moved gt", scale=a.scale, translate=a.translate)
    moved.translate = (a.translate[0] + a.scale[0], a.translate[1], a.translate[2])
    _predict(widget, a)
    with pytest.raises(Exception, match="does not lie on the scan's voxel grid"):
        ctl.report(gt_layer=moved)


def test_predict_and_refine_refuse_a_closed_scan(demo_viewer, notifications) -> None:
    """With the last scan used removed from the viewer, Predict and Refine say so and run nothing."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    assert widget.predict_button.isEnabled() and widget.refine_panel.start_button.isEnabled()
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    assert widget.image_combo.layer() is None
    # with no scan to act on the buttons are off; a call from code still refuses in one line
    assert not widget.predict_button.isEnabled() and not widget.refine_panel.start_button.isEnabled()
    assert not widget.predict(sync=True)
    assert notifications[-1] == "the image 'A' is no longer in the viewer: open a scan and choose it"
    assert not ctl.refine(sync=True)
    assert notifications[-1] == "the image 'A' is no longer in the viewer: open a scan and choose it"
    assert len(viewer.layers) == 0 and not ctl.busy


def test_maps_added_by_a_finished_prediction_go_below_the_pseudo_labels(demo_viewer) -> None:
    """When the finished maps arrive before a background Predict added its hidden layers, those layers
    are stacked below the pseudo labels (as in an all-at-once build), not drawn over them."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    widget.image_combo.set_layer(a)
    volume = load_volume(Path(a.metadata["napari_apl"]["source_path"]))
    pred = run_generator(SlicePredictor(ctl.model, ctl.meta, volume).run())
    geometry = ScanGeometry.from_volume(volume_from_layer(a))
    with ctl._layers_of(a, geometry):  # the visible layer a background Predict shows at once
        ctl._add_labels(LAYER_PSEUDO, to_layer_order(pred.pseudo), "pseudo-label", image=a.name)
    ctl._show_prediction(a, geometry, pred)
    names = [layer.name for layer in viewer.layers]
    maps = [LAYER_MAIN, LAYER_AUX, LAYER_CONFIDENCE, LAYER_CONSISTENCY]
    assert names[-1] == LAYER_PSEUDO and set(maps) <= set(names)
    assert all(names.index(m) < names.index(LAYER_PSEUDO) for m in maps)


def test_a_layer_still_being_predicted_is_not_saved(tmp_path: Path, phantom_files) -> None:
    """Saving a prediction layer before its slices are done is refused (reading it whole would give
    zeros for them); once done, it saves the finished prediction."""
    from napari_apl._sample_data import demo_checkpoint_path
    from napari_apl.core.checkpoint import load_checkpoint

    model, meta = load_checkpoint(demo_checkpoint_path())
    volume = load_volume(phantom_files("RAS")[0])
    sp = SlicePredictor(model, meta, volume)
    sp.predict_slices([0, 1])
    lazy = sp.as_layer_arrays()["pseudo_label"]
    attributes = {"name": "pseudo-label", "metadata": {}, "scale": (1.0, 1.0, 1.0)}
    with pytest.raises(
        LayerNotSaved, match=r"'pseudo-label' is still being predicted \(2 of 12 slices done\)"
    ):
        write_labels(str(tmp_path / "early"), lazy, attributes)
    assert not list(tmp_path.iterdir())
    pred = run_generator(sp.run())
    [out] = write_labels(str(tmp_path / "done"), lazy, attributes)
    saved = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(saved.transpose(2, 1, 0), np.asarray(pred.pseudo).transpose(2, 1, 0))


@pytest.mark.parametrize("suffix", [".Nii.Gz", ".nii.Gz", ".Nii"])
def test_mixed_case_suffixes_open(tmp_path: Path, phantom_files, suffix: str) -> None:
    """A file whose suffix nibabel cannot map to a file name (``.Nii.Gz``) opens like any other."""
    image = phantom_files("LPS")[0]
    path = tmp_path / f"scan{suffix}"
    if suffix.lower() == ".nii":
        nib.save(nib.load(image), tmp_path / "plain.nii")
        shutil.copy(tmp_path / "plain.nii", path)
    else:
        shutil.copy(image, path)
    reference = load_volume(image)
    for lazy in (False, True):
        vol = load_volume(path, lazy=lazy)
        np.testing.assert_array_equal(np.asarray(vol.data), np.asarray(reference.data))
        np.testing.assert_allclose(vol.affine, reference.affine)
    [(data, _kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and data.shape == reference.shape[::-1]


def test_float_ground_truth_named_gt_opens_as_labels(tmp_path: Path, phantom_files) -> None:
    """A float label file (as CHAOS stores them) named like ground truth opens as a paintable Labels
    layer; the same voxels under a neutral name stay an image."""
    labels = nib.load(phantom_files("RAS")[1])
    floats = nib.Nifti1Image(np.asarray(labels.dataobj).astype(np.float64), labels.affine)
    for name, kind in (
        ("case2_gt.nii.gz", "labels"),
        ("ground_truth.nii.gz", "labels"),
        ("case2.nii.gz", "image"),
        ("case2_unannotated.nii.gz", "image"),  # (a hint inside another word is none)
    ):
        nib.save(floats, tmp_path / name)
        [(_data, _kwargs, got)] = get_reader(str(tmp_path / name))(str(tmp_path / name))
        assert got == kind, name


def test_inspect_areas_count_the_painted_corrections(demo_viewer) -> None:
    """The Inspect panel's organ areas are those of the labels shown (and exported): corrections kept on
    top of a new prediction count, not the model's own labels under them."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    k = int(np.argmax((pseudo.data == 1).sum(axis=(1, 2))))  # the slice with the most liver
    liver = np.nonzero(pseudo.data[k] == 1)
    pseudo.data_setitem((np.full(liver[0].size, k), *liver), 0)  # the eraser over the slice's liver
    _predict(widget, a)  # the corrections go on top of the new labels
    shown = viewer.layers[LAYER_PSEUDO].data
    assert not (shown[k] == 1).any() and (ctl.prediction.pseudo[:, :, k] == 1).any()
    sx, sy, _ = ctl.geometry.spacing
    profile = widget.inspect.profile
    for lab in (1, 2, 3, 4):
        expected = (shown == lab).sum(axis=(1, 2)) * sx * sy / 100.0
        np.testing.assert_allclose(profile.organ_area_cm2[lab], expected)
    assert profile.organ_area_cm2[1][k] == 0.0


def test_a_refined_models_provenance_records_each_refinement(demo_viewer, tmp_path: Path) -> None:
    """Two refinements in a row, then another scan predicted and the corrections cleared: the exported
    refined.pt names the scan each refinement adapted to, its own iterations and the voxels painted
    then, with the first refinement under ``earlier``."""
    from napari_apl.core.checkpoint import load_checkpoint
    from napari_apl.core.refine import RefineConfig

    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller

    def cfg(n: int) -> RefineConfig:
        return RefineConfig(iterations=n, batch_size=2, guard_every=1000, bn="frozen")

    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.data_setitem((np.array([5, 5, 5]), np.array([30, 31, 32]), np.array([30, 30, 30])), 4)
    assert ctl.refine(cfg(3), sync=True)
    assert ctl.refine(cfg(2), sync=True)
    assert ctl.clear_corrections()
    # another scan shown when exporting (one with no file: it would be named by its layer)
    other = viewer.add_image(np.asarray(b.data), name="other scan", scale=b.scale, translate=b.translate)
    _predict(widget, other)
    assert ctl.export(tmp_path / "out")
    [checkpoint] = (tmp_path / "out").glob("*_refined.pt")
    _, meta = load_checkpoint(checkpoint)
    refined = meta.provenance["refined"]
    assert refined["target"] == "image.nii.gz" and refined["iterations_done"] == 2  # A's file
    assert refined["config"]["iterations"] == 2 and refined["corrected_voxels"] == 3
    [first] = refined["earlier"]
    assert first["target"] == "image.nii.gz" and first["iterations_done"] == 3
    assert first["config"]["iterations"] == 3
    report = ctl.report()
    assert report["refinement"]["iterations_done"] == 2
    assert [r["iterations_done"] for r in report["refinement"]["earlier"]] == [3]


def test_pause_is_off_once_the_refined_model_predicts(demo_viewer) -> None:
    """When the iterations are over and the refined model predicts the scan, Pause is disabled and a
    click on it pauses nothing (it used to say 'paused' while the run went on to its end)."""
    from napari_apl.core.refine import RefineConfig

    _viewer, widget, a, _b = demo_viewer()
    ctl, panel = widget.controller, widget.refine_panel
    _predict(widget, a)
    seen = []

    def on_status(text: str) -> None:
        if text.startswith("re-predicting") and not seen:
            panel.toggle_pause()  # the user clicks Pause now
            seen.append((panel.pause_button.isEnabled(), panel.pause_button.text(), ctl.paused))

    ctl.status.connect(on_status)
    cfg = RefineConfig(iterations=2, batch_size=2, guard_every=1000, bn="frozen")
    assert ctl.refine(cfg, sync=True)
    assert seen == [(False, "Pause", False)]
    assert not ctl.busy and ctl.last_result.iterations_done == 2


def test_painting_in_a_renamed_pseudo_label_layer_says_it_is_not_used(demo_viewer, monkeypatch) -> None:
    """A pseudo-label layer the user renamed (to keep scan A's result while B is predicted) is the user's
    own: its strokes are not corrections, and the first one says so, once."""
    import napari_apl.widgets._main as main_module

    warned: list[str] = []
    monkeypatch.setattr(main_module, "show_warning", warned.append)
    viewer, widget, a, b = demo_viewer()
    _predict(widget, a)
    kept = viewer.layers[LAYER_PSEUDO]
    kept.name = "A labels"
    _predict(widget, b)  # a new pseudo-label layer, for B
    viewer.layers[LAYER_PSEUDO].paint((5, 30, 30), 2)  # strokes in the real one: nothing to say
    assert warned == []
    kept.paint((5, 30, 30), 3)
    kept.paint((6, 30, 30), 3)
    assert len(warned) == 1 and "'A labels' are not used as corrections" in warned[0]


def test_another_scans_labels_renamed_back_are_not_corrections(demo_viewer) -> None:
    """Scan A's pseudo labels, renamed, then named pseudo-label again while B is shown: their voxels
    (A's prediction) must not become B's corrections."""
    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    kept = viewer.layers[LAYER_PSEUDO]
    kept.name = "A labels"
    _predict(widget, b)
    viewer.layers.remove(LAYER_PSEUDO)  # B's own layer goes, A's takes its name
    kept.name = LAYER_PSEUDO
    ctl.collect_corrections()
    assert ctl.n_corrected == 0


def test_a_pause_asked_in_the_last_iteration_ends_with_the_run(demo_viewer) -> None:
    """A pause asked for while the last iteration runs holds nothing (the loop is over): the run ends,
    the controller is not left paused and Pause reads Pause, disabled; Stop, which has nothing left to
    stop during the final prediction, is disabled too."""
    from napari_apl.core.refine import RefineConfig

    _viewer, widget, a, _b = demo_viewer()
    ctl, panel = widget.controller, widget.refine_panel
    _predict(widget, a)
    seen = []

    def on_event(ev) -> None:
        if ev.iteration == ev.total and not seen:
            panel.toggle_pause()
            seen.append(ctl.paused)

    ctl.refine_event.connect(on_event)
    ended = []
    ctl.iterations_ended.connect(
        lambda: ended.append((ctl.paused, panel.pause_button.text(), panel.stop_button.isEnabled()))
    )
    assert ctl.refine(RefineConfig(iterations=2, batch_size=2, guard_every=1000, bn="frozen"), sync=True)
    assert seen == [True] and ended == [(False, "Pause", False)]
    assert ctl.last_result.iterations_done == 2 and not ctl.paused


def test_inspect_follows_a_clear_of_the_corrections(demo_viewer) -> None:
    """After Clear corrections the layer shows the model's labels again, and the Inspect areas too."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    k = int(np.argmax((pseudo.data == 1).sum(axis=(1, 2))))
    liver = np.nonzero(pseudo.data[k] == 1)
    pseudo.data_setitem((np.full(liver[0].size, k), *liver), 0)
    _predict(widget, a)
    assert widget.inspect.profile.organ_area_cm2[1][k] == 0.0
    assert ctl.clear_corrections()
    sx, sy, _ = ctl.geometry.spacing
    expected = (viewer.layers[LAYER_PSEUDO].data[k] == 1).sum() * sx * sy / 100.0
    assert expected > 0 and widget.inspect.profile.organ_area_cm2[1][k] == pytest.approx(expected)


@pytest.mark.parametrize("order", ["C", "F"])
def test_stashed_corrections_keep_only_the_painted_voxels(order: str) -> None:
    """Another scan's corrections are kept as their painted voxels (a closed scan's stay for the
    session) and come back exactly, in their memory order."""
    from napari_apl.widgets._controller import _SparseCorrections

    corrections = np.full((40, 30, 20), -1, dtype=np.int16, order=order)
    corrections[3, 4, 5], corrections[10:12, 2, 7], corrections[39, 29, 19] = 4, 0, 2
    kept = _SparseCorrections(corrections)
    assert kept.values.size == 4 and kept.index.nbytes + kept.values.nbytes < 64
    back = kept.dense()
    np.testing.assert_array_equal(back, corrections)
    assert back.flags.f_contiguous == (order == "F") and back.dtype == np.int16


def test_a_ground_truth_layer_that_is_not_3d_is_refused_as_such(demo_viewer) -> None:
    """A 2-D layer chosen as ground truth: one line that names it as ground truth."""
    viewer, widget, a, _b = demo_viewer()
    _predict(widget, a)
    flat = viewer.add_labels(np.zeros((64, 64), np.uint8), name="flat")
    with pytest.raises(Exception, match=r"^ground-truth layer 'flat' is not a 3-D labels volume"):
        widget.controller.report(gt_layer=flat)


def test_a_ground_truth_of_another_label_scheme_is_refused(demo_viewer) -> None:
    """Labels of another scheme (TotalSegmentator's 1 is the spleen) were scored as if they were these:
    one line naming the labels found, as ``napari-apl evaluate`` says."""
    viewer, widget, a, _b = demo_viewer()
    _predict(widget, a)
    other = np.zeros(a.data.shape, np.uint8)
    other[2:4, 10:20, 10:20] = 7
    other[5, 30:40, 30:40] = 1
    layer = viewer.add_labels(other, name="ts gt", scale=a.scale, translate=a.translate)
    with pytest.raises(Exception, match=r"^ground-truth layer 'ts gt' holds labels 0, 1, 7, not only 0..4"):
        widget.controller.report(gt_layer=layer)


def test_exported_maps_reopen_as_shown_and_are_not_offered_as_scans(demo_viewer, tmp_path) -> None:
    """Exported confidence / consistency files reopened as opaque grey images over the scan, and the
    image choice offered them (removing the scan made one the image to refine)."""
    viewer, widget, a, _b = demo_viewer()
    _predict(widget, a)
    assert widget.controller.export(tmp_path / "out")
    opened = {}
    for kind in ("confidence", "consistency"):
        [layer] = viewer.open(str(tmp_path / "out" / f"A_{kind}.nii.gz"), plugin="napari-apl")
        opened[kind] = layer
        assert layer.blending == "additive" and tuple(layer.contrast_limits) == (0.0, 1.0)
        assert layer.opacity == pytest.approx(0.6)
    assert opened["confidence"].colormap.name.startswith("ω doubt")
    assert opened["consistency"].colormap.name == "inferno"
    offered = widget.image_combo.layers()
    assert a in offered and not set(opened.values()) & set(offered)
    viewer.layers.remove(a)
    assert widget.image_combo.layer() is not opened["confidence"]
    assert widget.image_combo.layer() is not opened["consistency"]


def test_the_writer_does_not_import_the_compute_core() -> None:
    """Saving a layer through the napari-apl writer does not import torch (a stall on the event loop
    of a session that never predicted)."""
    import subprocess

    code = (
        "import sys, tempfile, numpy as np\n"
        "from napari_apl._writer import write_labels\n"
        "d = tempfile.mkdtemp()\n"
        "write_labels(d + '/x', np.zeros((4, 5, 6), np.uint8), {'name': 'x', 'metadata': {}})\n"
        "print('torch' in sys.modules, 'napari_apl.core.infer' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_a_refined_checkpoint_refined_again_keeps_its_history(demo_viewer, tmp_path: Path) -> None:
    """refined.pt loaded and refined again in the widget, then once more on the command line: each
    export names every refinement before it, oldest first."""
    from napari_apl.cli import main
    from napari_apl.core.checkpoint import load_checkpoint, refinement_history
    from napari_apl.core.refine import RefineConfig

    _viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller

    def cfg(n: int) -> RefineConfig:
        return RefineConfig(iterations=n, batch_size=2, guard_every=1000, bn="frozen")

    _predict(widget, a)
    assert ctl.refine(cfg(3), sync=True)
    assert ctl.export(tmp_path / "one")
    [first] = (tmp_path / "one").glob("*_refined.pt")
    assert ctl.load_checkpoint(first)
    _predict(widget, a)
    assert ctl.refine(cfg(2), sync=True)
    assert ctl.export(tmp_path / "two")
    [second] = (tmp_path / "two").glob("*_refined.pt")
    _, meta = load_checkpoint(second)
    history = refinement_history(meta.provenance)
    assert [r["iterations_done"] for r in history] == [3, 2]
    assert meta.provenance["refined"]["from_checkpoint"] == str(first)
    image = str(a.metadata["napari_apl"]["source_path"])
    out = tmp_path / "three"
    argv = ["refine", image, "-c", str(second), "-o", str(out), "-n", "1", "--batch-size", "2", "-q"]
    assert main(argv) == 0
    _, meta = load_checkpoint(out / "refined.pt")
    history = refinement_history(meta.provenance)
    assert [r.get("iterations_done", r.get("iterations")) for r in history] == [3, 2, 1]
    assert history[-1]["refined_from"] == second.name


def test_voxels_edited_in_place_are_another_scans(demo_viewer) -> None:
    """An image layer whose voxels are overwritten in place with another scan's does not keep the first
    scan's corrections (and gets them back when its voxels are put back)."""
    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    mine = viewer.add_image(np.array(a.data), name="in memory", scale=a.scale, translate=a.translate)
    _predict(widget, mine)
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.data_setitem((np.array([5, 5]), np.array([30, 31]), np.array([30, 30])), 4)
    ctl.collect_corrections()
    assert ctl.n_corrected == 2
    _predict(widget, b)
    original = np.array(mine.data)
    mine.data[...] = np.asarray(b.data)  # another scan's voxels, in the same array
    mine.refresh()
    assert ctl.corrections_count(mine) == 0
    _predict(widget, mine)
    assert ctl.n_corrected == 0
    _predict(widget, b)
    mine.data[...] = original
    assert ctl.corrections_count(mine) == 2


def test_inspect_areas_follow_strokes_and_undo(demo_viewer, qtbot) -> None:
    """The organ areas and the corrections count follow a stroke once the strokes pause, and an undo
    too (napari sends no paint event for an undo), without a new Predict."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    k = int(np.argmax((pseudo.data == 1).sum(axis=(1, 2))))
    sx, sy, _ = ctl.geometry.spacing
    before = widget.inspect.profile.organ_area_cm2[1][k]
    liver = np.nonzero(pseudo.data[k] == 1)
    assert before == pytest.approx(liver[0].size * sx * sy / 100.0) and before > 0
    pseudo.data_setitem((np.full(liver[0].size, k), *liver), 0)  # one erasing stroke over the liver
    qtbot.waitUntil(lambda: widget.inspect.profile.organ_area_cm2[1][k] == 0.0, timeout=5000)
    assert f"corrections on 'A': {liver[0].size} voxels" in widget.refine_panel.corrections_label.text()
    pseudo.undo()
    qtbot.waitUntil(
        lambda: widget.inspect.profile.organ_area_cm2[1][k] == pytest.approx(before), timeout=5000
    )
    qtbot.waitUntil(lambda: "none" in widget.refine_panel.corrections_label.text(), timeout=5000)
    assert ctl.n_corrected == 0
    # a slice change (napari sends set_data for it too) does not set off a recount of the whole volume
    qtbot.waitUntil(lambda: not widget._count_timer.isActive(), timeout=5000)
    viewer.dims.set_current_step(0, (k + 1) % pseudo.data.shape[0])
    assert not widget._count_timer.isActive()


def test_a_scan_closed_during_predict_gets_no_layers(demo_viewer, qtbot) -> None:
    """Predict of a scan closed before it ended added its five layers back for a scan no longer there."""
    from napari_apl.widgets._controller import is_prediction_layer

    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    widget.image_combo.set_layer(a)
    assert widget.predict()  # in the background: its result comes through the event loop, after this
    viewer.layers.remove(a)
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert [layer.name for layer in viewer.layers] == ["B"]
    assert not any(is_prediction_layer(layer) for layer in viewer.layers)
    assert "'A' was closed during Predict" in widget.status.text()


def test_a_scan_closed_during_refine_keeps_the_model_and_its_last_layers(demo_viewer, qtbot) -> None:
    """The refined model is kept, and the layers of a scan closed during the run are not given its maps."""
    from napari_apl.core.refine import RefineConfig

    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    before, labels = ctl.prediction, viewer.layers[LAYER_PSEUDO].data.copy()
    assert ctl.refine(RefineConfig(iterations=2, batch_size=2, guard_every=1000, bn="frozen"))
    viewer.layers.remove(a)
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    assert ctl.refined and ctl.last_result.iterations_done == 2
    assert ctl.prediction is before
    np.testing.assert_array_equal(viewer.layers[LAYER_PSEUDO].data, labels)
    assert "refinement finished after 2 iterations; 'A' was closed" in widget.status.text()


def test_closing_during_predict_lets_the_prediction_go(demo_viewer, qtbot) -> None:
    """A Predict quit by closing left its generator suspended: the predictor (model, map stores) and its
    helper thread stayed for the rest of the session."""
    import gc
    import threading
    import weakref

    _viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    made: list[weakref.ref] = []
    init = SlicePredictor.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    SlicePredictor.__init__ = tracked
    try:
        widget.image_combo.set_layer(a)
        assert widget.predict()
    finally:
        SlicePredictor.__init__ = init
    assert ctl.shutdown()
    qtbot.wait(50)
    gc.collect()
    assert len(made) == 1 and made[0]() is None
    assert not [t.name for t in threading.enumerate() if t.name.startswith("napari-apl-predict")]


def _tiny_refine(iterations: int = 2):
    from napari_apl.core.refine import RefineConfig

    return RefineConfig(iterations=iterations, batch_size=2, guard_every=1000, bn="frozen")


def _autosaves_of(layer) -> list:
    from napari_apl.core.autosave import find_autosaves

    return find_autosaves(volume_from_layer(layer))


def test_autosaves_name_the_checkpoint_loaded_and_forget_a_discarded_model(demo_viewer, tmp_path) -> None:
    """Load model kept the first checkpoint in the shown scan's autosave (Recover and Revert then went to
    it), and Revert with another scan shown left the refined model in the refined scan's autosave."""
    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    ctl.confirm = lambda question: True
    _predict(widget, a)
    other = shutil.copy(ctl.checkpoint_path, tmp_path / "other_model.pt")
    assert ctl.load_checkpoint(other) is not None
    _predict(widget, a)
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.refine(_tiny_refine(), sync=True)
    [entry] = _autosaves_of(a)
    assert entry.has_model and Path(entry.checkpoint) == Path(other).resolve()
    _predict(widget, b)  # the refined model looks at B; then the user discards it
    assert ctl.revert(sync=True) and not ctl.refined
    [entry] = _autosaves_of(a)
    assert not entry.has_model and entry.has_corrections  # A's strokes stay, its refined model goes


def test_the_report_describes_the_run_that_made_the_model(demo_viewer, monkeypatch) -> None:
    """A second run that failed left its settings in the report as those of the model in use."""
    import napari_apl.widgets._controller as controller_module

    _viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    assert ctl.refine(_tiny_refine(2), sync=True)
    real = controller_module.refine

    def failing(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(controller_module, "refine", failing)
    ctl.refine(dataclasses.replace(_tiny_refine(4), method="threshold"), sync=True)
    assert ctl.last_result.iterations_done == 2
    _predict(widget, a)  # the layers of the model in use (the first run's)
    refinement = ctl.report()["refinement"]
    assert refinement["config"]["method"] == "apl" and refinement["config"]["iterations"] == 2


def test_the_report_counts_strokes_not_yet_counted(demo_viewer) -> None:
    """A stroke exported at once (before the panel's count) was missing from corrected_voxels."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.brush_size = 5
    before = pseudo.data.copy()
    pseudo.paint((4, 20, 20), 3)
    painted = int((pseudo.data != before).sum())
    assert painted > 0 and ctl.report()["corrected_voxels"] == painted


def test_inspect_areas_follow_recovered_corrections(demo_viewer, qtbot) -> None:
    """Corrections recovered onto a scan already predicted were on the layer but not in the areas."""
    viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    _predict(widget, a)
    pseudo = viewer.layers[LAYER_PSEUDO]
    k = int(np.argmax((pseudo.data == 1).sum(axis=(1, 2))))
    liver = np.nonzero(pseudo.data[k] == 1)
    pseudo.data_setitem((np.full(liver[0].size, k), *liver), 0)
    assert ctl.maybe_autosave(force=True) is not None
    ctl.autosave_enabled = False  # the "crash"
    ctl.autosaver.close()
    viewer2, widget2, a2, _b2 = demo_viewer()
    ctl2 = widget2.controller
    _predict(widget2, a2)
    assert widget2.inspect.profile.organ_area_cm2[1][k] > 0 and ctl2.recoverable is not None
    assert ctl2.recover(sync=True)
    assert not (viewer2.layers[LAYER_PSEUDO].data[k] == 1).any()
    assert widget2.inspect.profile.organ_area_cm2[1][k] == 0.0


def test_from_checkpoint_is_the_refined_models_own_normalisation(demo_viewer) -> None:
    """After a refinement, 'from checkpoint' took the source's intensities, not those the model was
    adapted to (and that its export records): the same weights and preset gave other labels."""
    from napari_apl.widgets._controller import CHECKPOINT_PRESET

    _viewer, widget, a, _b = demo_viewer()
    ctl = widget.controller
    ctl.preset = "ct-abdomen"
    _predict(widget, a)
    assert ctl.refine(_tiny_refine(), sync=True)
    adapted = ctl._refined_meta().normalization
    assert adapted != ctl.meta.normalization  # (the demo model's own is percentile)
    ctl.preset = CHECKPOINT_PRESET
    assert ctl.normalization().to_dict() == adapted
    # and the model summary says so (it kept the source checkpoint's percentile line)
    [line] = [ln for ln in widget.summary.toPlainText().splitlines() if ln.startswith("normalization:")]
    assert line.startswith("normalization: ct_window") and "percentile" not in ctl.summary


def test_a_model_refined_on_a_scan_not_shown_is_autosaved_there(demo_viewer, monkeypatch) -> None:
    """Its final prediction failed, then Predict of that scan: its autosave never got the model."""
    import napari_apl.widgets._controller as controller_module

    _viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    _predict(widget, a)
    widget.image_combo.set_layer(b)

    def failing_predict(*args, **kwargs):
        raise MemoryError("out of memory")
        yield  # (a generator, as iter_predict)

    monkeypatch.setattr(controller_module, "iter_predict", failing_predict)
    assert ctl.refine(_tiny_refine(), image_layer=b, sync=True) and ctl.refined
    monkeypatch.undo()
    _predict(widget, b)  # as the warning says
    ctl.maybe_autosave(force=True)  # (the next autosave tick)
    [entry] = _autosaves_of(b)
    assert entry.has_model


def test_a_new_scans_first_strokes_are_autosaved_at_once_and_name_the_checkpoint(
    demo_viewer, tmp_path
) -> None:
    """A scan predicted after another waited a whole autosave interval before its first snapshot, and Load
    model left a snapshot holding corrections only naming the checkpoint before."""
    viewer, widget, a, b = demo_viewer()
    ctl = widget.controller
    ctl.autosave_interval = 30.0
    _predict(widget, a)
    _predict(widget, b)
    assert ctl.autosave_wait() == 0
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.maybe_autosave() is not None
    other = shutil.copy(ctl.checkpoint_path, tmp_path / "other_model.pt")
    assert ctl.load_checkpoint(other) is not None
    [entry] = _autosaves_of(b)
    assert entry.has_corrections and Path(entry.checkpoint) == Path(other).resolve()
