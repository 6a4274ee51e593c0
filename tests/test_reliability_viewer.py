"""Reliability of the napari side (issue #6): bad inputs, cancellation, closing, crash recovery.

Real napari viewers under Xvfb (``make_napari_viewer``), a 48 x 48 x 8 CT phantom and an untrained
tiny dual-head U-Net, so that the whole file runs in well under a minute on two CPU cores:

* (a) the bad-input matrix through the plugin reader, the widget's checkpoint loader and its export:
  one one-line notification each, no layer added, the previous model kept, nothing written;
* (b) 20 refinements in the thread worker, each stopped at a random (seeded) moment: the worker ends,
  the weights are finite, every layer equals a fresh prediction by the returned model and the painted
  corrections are intact;
* (c) closing the viewer during a refinement asks ``confirm_close``: no keeps window and refinement,
  yes stops it, waits for the worker and closes;
* (d) autosave while painting and after refining, a "crash", and recovery in a new viewer.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apl._layers import to_canonical_order, volume_from_layer
from napari_apl.core.autosave import find_autosaves, restore
from napari_apl.core.infer import predict_volume
from napari_apl.core.phantom import write_phantom
from napari_apl.core.refine import RefineConfig
from napari_apl.widgets import WIDGET_NAME
from napari_apl.widgets._controller import (
    LAYER_AUX,
    LAYER_CONFIDENCE,
    LAYER_CONSISTENCY,
    LAYER_MAIN,
    LAYER_PSEUDO,
    _leave_a_core_for_the_gui,
)

pytestmark = pytest.mark.viewer

SHAPE = (48, 48, 8)
SPACING = (5.0, 5.0, 12.0)
TRIALS = 20
TRIAL_ITERATIONS = 30


class Evil:
    """A pickle payload that creates a file when unpickled (proof that code ran)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def tiny_refine(iterations: int, **kw) -> RefineConfig:
    """Refinement settings small enough for two busy CPU cores (no AdaBN pass, one slice per step)."""
    return RefineConfig(iterations=iterations, batch_size=1, guard_every=1000, bn="frozen", **kw)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI with nibabel directly (sform only, so even a degenerate affine is kept)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(data, None, header=hdr), str(path))
    return path


def _listing(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` with size and mtime (``<absent>`` when it does not exist)."""
    if not folder.exists():
        return {"<absent>": ()}
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def _finite(model) -> bool:
    """Whether every floating-point tensor of the model's state is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _threads_idle() -> bool:
    """Whether no napari/superqt worker runs in Qt's global thread pool."""
    from qtpy.QtCore import QThreadPool

    return QThreadPool.globalInstance().activeThreadCount() == 0


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    """A 48 x 48 x 8 CT phantom on disk (LPS, so the canonical reorientation is exercised)."""
    folder = tmp_path_factory.mktemp("reliability_phantom")
    image, _labels = write_phantom(folder, "ct", 3, shape=SHAPE, spacing=SPACING, orientation="LPS")
    return image


@pytest.fixture
def setup(make_napari_viewer, small_image, tiny_checkpoint, monkeypatch):
    """Factory: a viewer with the phantom opened by the plugin and the widget docked (tiny model loaded)."""
    import napari_apl._sample_data as sample_module
    import napari_apl.widgets._controller as controller_module

    monkeypatch.setattr(sample_module, "demo_checkpoint_path", lambda: tiny_checkpoint)
    monkeypatch.setattr(controller_module, "demo_checkpoint_path", lambda: tiny_checkpoint)

    def make(image_path: Path = small_image):
        viewer = make_napari_viewer()
        [image] = viewer.open(str(image_path), plugin="napari-apl")
        _, widget = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
        assert widget.controller.checkpoint_path == tiny_checkpoint
        widget.image_combo.set_layer(image)
        return viewer, widget, image

    return make


# -- (a) bad inputs ---------------------------------------------------------------------------------------


def _bad_files_through_the_plugin_reader(viewer, small_image: Path, tmp_path: Path, notifications) -> None:
    """Broken NIfTI files opened with the plugin: one one-line notification each, no layer."""
    good = np.asarray(nib.load(str(small_image)).dataobj).astype(np.float32)
    aff = np.diag([*SPACING, 1.0])
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(small_image.read_bytes()[: small_image.stat().st_size // 2])
    text = tmp_path / "notes.nii"
    text.write_text("patient notes, not an image\n" * 40)
    nan = good.copy()
    nan[20, 20, 3] = np.nan
    singular = np.array([[5.0, 5.0, 0, 0], [0, 0, 0, 0], [0, 0, 12.0, 0], [0, 0, 0, 1]])
    cases = {
        truncated: "cannot be read",
        text: "cannot be read as NIfTI",
        _nifti(tmp_path / "flat.nii.gz", good[:, :, 0], aff): "2-D",
        _nifti(tmp_path / "series.nii.gz", np.stack([good] * 2, -1), aff): "4-D",
        _nifti(tmp_path / "nan.nii.gz", nan, aff): "NaN",
        _nifti(tmp_path / "zero_vox.nii.gz", good, np.diag([5.0, 0.0, 12.0, 1])): "zero voxel spacing",
        _nifti(tmp_path / "singular.nii.gz", good, singular): "singular",
    }
    names = [layer.name for layer in viewer.layers]
    for path, expected in cases.items():
        before = len(notifications)
        assert viewer.open(str(path), plugin="napari-apl") == []  # handled: no layer, no exception
        assert [layer.name for layer in viewer.layers] == names
        assert len(notifications) == before + 1, path.name
        msg = notifications[-1]
        assert "\n" not in msg and path.name in msg and expected in msg, msg


def _bad_checkpoints_keep_the_loaded_model(
    viewer, widget, image, tiny_checkpoint: Path, tmp_path: Path, notifications
) -> None:
    """Broken or hostile checkpoints: a notification each, the loaded model stays."""
    ctl = widget.controller
    model, meta, summary = ctl.model, ctl.meta, ctl.summary

    def rewrite(name: str, edit) -> Path:
        payload = torch.load(tiny_checkpoint, weights_only=True)
        edit(payload)
        torch.save(payload, tmp_path / name)
        return tmp_path / name

    def fewer_classes(payload: dict) -> None:
        data = json.loads(payload["meta_json"])
        data["class_names"] = ["background", "liver", "spleen"]
        payload["meta_json"] = json.dumps(data)

    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("not a checkpoint\n" * 100)
    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"napari_apl_format": 1, "w": Evil(pwned)}, protocol=2))
    evil_zip = rewrite("evil_zip.pt", lambda p: p["state_dict"].__setitem__("extra", Evil(pwned)))
    cases = {
        not_ckpt: "not a PyTorch checkpoint",
        evil: "unsafe",
        evil_zip: "unsafe",
        rewrite("classes.pt", fewer_classes): "class count",
        rewrite("newer.pt", lambda p: p.update(napari_apl_format=99)): "newer napari-apl",
    }
    for path, expected in cases.items():
        before = len(notifications)
        widget.checkpoint_file.value = str(path)
        assert widget.file_radio.isChecked()
        assert widget.load_model() is None
        assert len(notifications) == before + 1
        assert "\n" not in notifications[-1] and expected in notifications[-1], notifications[-1]
        assert not pwned.exists()  # the payload never ran
        assert ctl.model is model and ctl.meta is meta and ctl.checkpoint_path == tiny_checkpoint
        assert ctl.summary == summary and widget.summary.toPlainText() == summary
    assert widget.predict(sync=True)  # the previous model is still there and works
    assert viewer.layers[LAYER_PSEUDO].data.shape == image.data.shape


def test_bad_files_and_checkpoints_in_the_viewer(
    setup, small_image, tiny_checkpoint, tmp_path, notifications
) -> None:
    viewer, widget, image = setup()
    _bad_files_through_the_plugin_reader(viewer, small_image, tmp_path, notifications)
    _bad_checkpoints_keep_the_loaded_model(viewer, widget, image, tiny_checkpoint, tmp_path, notifications)


def _read_only_folder(path: Path) -> str | None:
    """Make ``path`` a folder nobody may write to; return how (``None`` when impossible here)."""
    if os.geteuid() == 0 and shutil.which("mount"):
        path.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
        )
        if res.returncode == 0:
            return "tmpfs"
        path.rmdir()
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o500)
        return "chmod"
    return None


def test_export_refuses_missing_and_unwritable_folders(setup, tmp_path, notifications, monkeypatch) -> None:
    _viewer, widget, _image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    panel = widget.export_panel
    # a folder whose parent does not exist: nothing is created
    missing = tmp_path / "no" / "such" / "folder"
    panel.folder.value = str(missing)
    assert panel.export() == []
    assert "does not exist" in notifications[-1] and "\n" not in notifications[-1]
    assert not (tmp_path / "no").exists()
    _a_failed_export_removes_its_new_files(ctl, tmp_path, notifications, monkeypatch)
    # a read-only folder: refused before anything is written
    ro = tmp_path / "readonly"
    how = _read_only_folder(ro)
    if how is None:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        before = _listing(ro)
        for target in (ro, ro / "new_subfolder"):
            n = len(notifications)
            panel.folder.value = str(target)
            assert panel.export() == []
            assert len(notifications) == n + 1 and "not writable" in notifications[-1], notifications[-1]
            assert "\n" not in notifications[-1]
            assert _listing(ro) == before
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            ro.chmod(0o700)
    # a writable folder still works afterwards
    assert len(ctl.export(tmp_path / "out")) == 7


def _a_failed_export_removes_its_new_files(ctl, tmp_path: Path, notifications, monkeypatch) -> None:
    """A write failing midway (disk full) removes the files and the folder this export created."""
    import napari_apl.widgets._controller as controller_module

    real = controller_module.atomic_write
    made: list[Path] = []

    def disk_full(path, *args, **kwargs):
        if str(path).endswith(".csv"):  # the last file: the five volumes and the JSON exist by now
            made.extend(Path(path).parent.iterdir())
            raise controller_module.OutputError(f"disk full while writing {path}: free space")
        return real(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(controller_module, "atomic_write", disk_full)
        out = tmp_path / "failed"
        assert ctl.export(out) == []
    assert "disk full" in notifications[-1]
    assert len(made) == 6 and not any(p.exists() for p in made)
    assert not out.exists()  # the files and the folder it created went again


# -- (b) cancellation ----------------------------------------------------------------------------------


def _assert_consistent(viewer, ctl, image, corrections: np.ndarray, painted: list) -> None:
    """Layers = a fresh prediction by the controller's model, with the user's corrections on top."""
    volume = volume_from_layer(image)
    with _leave_a_core_for_the_gui():  # the worker's thread count: bit-identical results
        fresh = predict_volume(
            ctl.model, ctl.meta, volume, normalization=ctl.normalization(volume.data), device=ctl.device
        )

    def canon(name: str) -> np.ndarray:
        return np.asarray(to_canonical_order(viewer.layers[name].data))

    np.testing.assert_array_equal(canon(LAYER_MAIN), fresh.main)
    np.testing.assert_array_equal(canon(LAYER_AUX), fresh.aux)
    np.testing.assert_array_equal(canon(LAYER_CONFIDENCE), fresh.confidence.astype(np.float32))
    np.testing.assert_array_equal(canon(LAYER_CONSISTENCY), fresh.consistency.astype(np.float32))
    np.testing.assert_array_equal(ctl.prediction.pseudo, fresh.pseudo)
    expected = np.where(corrections >= 0, corrections, fresh.pseudo).astype(np.uint8)
    np.testing.assert_array_equal(canon(LAYER_PSEUDO), expected)
    np.testing.assert_array_equal(ctl.corrections, corrections)
    layer = viewer.layers[LAYER_PSEUDO].data
    for index, label in painted:
        assert (layer[index] == label).all()
    assert viewer.layers[LAYER_PSEUDO].editable


def test_stopping_refinements_at_random_points(setup, qtbot, notifications) -> None:
    viewer, widget, image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    painted = [((3, slice(10, 20), slice(12, 22)), 2), ((5, slice(30, 36), slice(5, 11)), 0)]
    data = pseudo.data.copy()
    for index, label in painted:
        data[index] = label
    pseudo.data = data
    corrections = ctl.collect_corrections().copy()
    assert ctl.n_corrected > 0
    panel = widget.refine_panel
    rng = np.random.default_rng(20240611)
    # one uninterrupted run gives the time scale of the optimisation loop for the random stop times
    event_times: list[float] = []
    ctl.refine_event.connect(lambda ev: event_times.append(time.monotonic()))
    assert ctl.refine(tiny_refine(TRIAL_ITERATIONS))
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    full = 0.3 + (event_times[-1] - event_times[0]) * TRIAL_ITERATIONS / (TRIAL_ITERATIONS - 1)
    assert ctl.last_result.iterations_done == TRIAL_ITERATIONS and not ctl.last_result.stopped
    _assert_consistent(viewer, ctl, image, corrections, painted)
    done, stopped, waits = [], 0, []
    for trial in range(TRIALS):
        delay_ms = int(rng.uniform(0.0, full) * 1000) if trial else 0  # trial 0: at once
        assert ctl.refine(tiny_refine(TRIAL_ITERATIONS, seed=trial))
        if delay_ms:
            qtbot.wait(delay_ms)
        if panel.stop_button.isEnabled():
            panel.stop_button.click()
        t0 = time.monotonic()
        qtbot.waitUntil(lambda: not ctl.busy and ctl.worker is None and _threads_idle(), timeout=60000)
        waits.append(time.monotonic() - t0)
        result = ctl.last_result
        assert result is not None and result.model is ctl.model and ctl.refined
        assert 0 <= result.iterations_done <= TRIAL_ITERATIONS
        assert result.stopped or result.iterations_done == TRIAL_ITERATIONS
        assert _finite(ctl.model)
        _assert_consistent(viewer, ctl, image, corrections, painted)
        assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()
        done.append(result.iterations_done)
        stopped += int(result.stopped)
    assert notifications == []
    assert stopped >= TRIALS // 3 and min(done) < TRIAL_ITERATIONS // 2  # the stops hit all phases
    print(
        f"\noptimisation loop ~{full:.2f} s; {stopped}/{TRIALS} stopped; iterations done {sorted(done)}; "
        f"stop-to-idle max {max(waits):.2f} s"
    )


# -- (c) closing -------------------------------------------------------------------------------------


def test_closing_the_viewer_during_a_refinement(setup, qtbot, notifications, monkeypatch) -> None:
    from qtpy.QtWidgets import QMessageBox

    viewer, widget, _image = setup()
    ctl = widget.controller
    # the default question is the widget's message box (answered here without showing it)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    assert ctl.confirm_close() is False
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(5000))
    qtbot.waitUntil(lambda: len(ctl.history) >= 1, timeout=60000)
    asked: list[bool] = []

    def answer(value: bool):
        def confirm() -> bool:
            asked.append(value)
            return value

        return confirm

    window = viewer.window._qt_window
    ctl.confirm_close = answer(False)
    assert window.close() is False  # "no": the window stays, the refinement goes on
    assert asked == [False] and ctl.busy and ctl.task == "refine"
    held = len(ctl.history)
    qtbot.waitUntil(lambda: len(ctl.history) > held, timeout=60000)
    ctl.confirm_close = answer(True)
    t0 = time.monotonic()
    assert window.close() is True  # "yes": stopped, worker joined, then closed
    took = time.monotonic() - t0
    assert asked == [False, True]
    assert ctl.worker is None and not ctl.busy and ctl.control is None
    result = ctl.last_result
    assert result is not None and result.stopped and 1 <= result.iterations_done < 5000
    assert _finite(ctl.model)
    qtbot.waitUntil(_threads_idle, timeout=10000)
    assert took < 10.0
    assert notifications == []
    # the refined model of the stopped run was autosaved on the way out
    [entry] = find_autosaves(volume_from_layer(widget.image_combo.layer()))
    assert entry.has_model


def test_closing_the_widget_joins_the_worker(setup, qtbot) -> None:
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    viewer, widget, _image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(5000))
    qtbot.waitUntil(lambda: len(ctl.history) >= 1, timeout=60000)
    viewer.window.remove_dock_widget("all")
    widget.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert ctl.worker is None and not ctl.busy  # joined inside the close, no waiting needed here
    assert ctl.last_result.stopped and _finite(ctl.model)
    qtbot.waitUntil(_threads_idle, timeout=10000)


# -- (d) autosave and recovery ---------------------------------------------------------------------


def _crash(ctl) -> None:
    """A "crash": the session just stops (nothing is saved, shut down or exported), and its autosave
    folder's lock goes, as the system drops it when a process dies (here the viewer lives on)."""
    ctl.autosave_enabled = False
    if ctl.autosaver is not None:
        ctl.autosaver.close()


def test_autosave_and_recover_after_a_crash(
    setup, small_image, qtbot, autosave_dir, tmp_path, monkeypatch
) -> None:
    import napari_apl.widgets._main as main_module

    monkeypatch.setattr(main_module, "AUTOSAVE_DEBOUNCE_MS", 20)
    viewer, widget, image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    assert widget.recovery_bar.isHidden()
    pseudo = viewer.layers[LAYER_PSEUDO]
    pseudo.brush_size = 5
    pseudo.paint((4, 20, 20), 2)  # a brush stroke: the paint event schedules an autosave
    qtbot.waitUntil(lambda: ctl.autosaves_written == 1, timeout=5000)
    [entry] = find_autosaves(small_image)
    assert entry.folder.parent == autosave_dir  # $NAPARI_APL_AUTOSAVE_DIR, not the user's cache
    assert entry.has_corrections and not entry.has_model and entry.painted_voxels == ctl.n_corrected > 0
    # a refinement saves the refined model at its end (and nothing on unchanged events)
    assert ctl.refine(tiny_refine(3), sync=True)
    assert ctl.autosaves_written == 2
    pseudo.paint((6, 30, 30), 4)
    qtbot.waitUntil(lambda: ctl.autosaves_written == 3, timeout=5000)
    corrections = ctl.corrections.copy()
    weights = {k: v.clone() for k, v in ctl.model.state_dict().items()}
    shown = pseudo.data.copy()
    [entry] = find_autosaves(small_image)
    assert entry.has_model and entry.iteration == 3 and entry.painted_voxels == int((corrections >= 0).sum())
    # the "crash": the session just stops, nothing is shut down or exported
    widget._autosave_timer.stop()
    _crash(ctl)

    viewer2, widget2, image2 = setup()
    ctl2 = widget2.controller
    other = shutil.copy(ctl.checkpoint_path, tmp_path / "another_model.pt")
    assert ctl2.load_checkpoint(other) is not None  # the new session starts with another checkpoint
    assert not widget2.recovery_bar.isHidden() and "refined model" in widget2.recovery_label.text()
    assert ctl2.recoverable is not None and ctl2.recoverable.key == entry.key
    widget2.recover_button.click()
    qtbot.waitUntil(lambda: not ctl2.busy, timeout=30000)
    assert widget2.recovery_bar.isHidden() and ctl2.recoverable is None
    np.testing.assert_array_equal(ctl2.corrections, corrections)
    assert ctl2.refined
    # Revert and the report name what the recovered model was refined from
    assert ctl2.checkpoint_path.resolve() == ctl.checkpoint_path.resolve()
    for key, value in ctl2.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    np.testing.assert_array_equal(viewer2.layers[LAYER_PSEUDO].data, shown)
    canonical = np.asarray(to_canonical_order(viewer2.layers[LAYER_PSEUDO].data))
    assert (canonical[corrections >= 0] == corrections[corrections >= 0]).all()
    # the recovered session's own autosaves keep the recovered model (a second crash loses nothing)
    viewer2.layers[LAYER_PSEUDO].paint((2, 10, 10), 1)
    assert ctl2.maybe_autosave(force=True) is not None
    [again] = find_autosaves(small_image)
    assert again.has_model and again.painted_voxels == ctl2.n_corrected
    # a clean export ends the session: its autosave goes
    assert len(ctl2.export(tmp_path / "export")) == 8
    assert find_autosaves(small_image) == []
    assert image2 is not image


def test_two_viewers_of_one_scan_autosave_apart(setup, small_image, qtbot) -> None:
    """Two viewers of the same scan: neither is offered the other's live session, their snapshots never
    mix, and after a crash of the first its own corrections come back with its own refined model."""
    viewer_a, widget_a, _ = setup()
    viewer_b, widget_b, _ = setup()
    ctl_a, ctl_b = widget_a.controller, widget_b.controller
    ctl_a.autosave_interval = ctl_b.autosave_interval = 0.0
    assert widget_a.predict(sync=True)
    viewer_a.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl_a.maybe_autosave(force=True) is not None
    assert widget_b.predict(sync=True)
    assert ctl_b.recoverable is None and widget_b.recovery_bar.isHidden()  # a's session is live, not crashed
    viewer_b.layers[LAYER_PSEUDO].paint((6, 30, 30), 4)
    assert ctl_b.maybe_autosave(force=True) is not None
    assert ctl_a.refine(tiny_refine(2), sync=True)
    corrections_a, corrections_b = ctl_a.corrections.copy(), ctl_b.corrections.copy()
    assert not np.array_equal(corrections_a, corrections_b)
    weights_a = {k: v.clone() for k, v in ctl_a.model.state_dict().items()}
    found = find_autosaves(small_image)
    assert len(found) == 2 and all(e.in_use for e in found)
    assert {e.folder for e in found} == {ctl_a.autosaver.folder, ctl_b.autosaver.folder}
    _crash(ctl_a)
    _viewer_c, widget_c, _ = setup()
    ctl_c = widget_c.controller
    assert widget_c.predict(sync=True)
    assert ctl_c.recoverable is not None and ctl_c.recoverable.folder == ctl_a.autosaver.folder
    assert ctl_c.recover(sync=True) and ctl_c.refined
    assert np.array_equal(ctl_c.corrections, corrections_a)
    assert all(torch.equal(ctl_c.model.state_dict()[k], v) for k, v in weights_a.items())
    (entry_b,) = [e for e in find_autosaves(small_image) if e.folder == ctl_b.autosaver.folder]
    assert np.array_equal(restore(entry_b)[0], corrections_b)  # b's snapshot is untouched


def entry_key(image_path) -> str:
    """The autosave key of a scan on disk."""
    from napari_apl.core.autosave import session_key

    return session_key(image_path)


def test_a_session_stays_held_while_its_viewer_shows_another_image(setup, small_image) -> None:
    """Switching images let the first image's folder go: another viewer was offered that live session and
    its Discard deleted it. A recovery offer that went out of date is refused and withdrawn."""
    viewer_b, widget_b, _image_b = setup()
    ctl_b = widget_b.controller
    ctl_b.autosave_interval = 0.0
    assert widget_b.predict(sync=True)
    viewer_b.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl_b.maybe_autosave(force=True) is not None
    noise = np.random.default_rng(0).normal(40, 100, (8, 48, 48)).astype(np.float32)
    other = viewer_b.add_image(noise, name="another scan")
    widget_b.image_combo.set_layer(other)
    assert widget_b.predict(sync=True)  # (B's saver of the first scan stays open)
    assert ctl_b.autosaver is not None and ctl_b.autosaver.key != entry_key(small_image)
    [entry] = find_autosaves(small_image)
    assert entry.in_use
    _viewer_d, widget_d, _ = setup()
    assert widget_d.predict(sync=True) and widget_d.controller.recoverable is None
    # an offer made while the session was crashed, recovered elsewhere before this viewer answers it
    _crash(ctl_b)
    for saver in ctl_b._savers.values():
        saver.close()
    _viewer_c, widget_c, _ = setup()
    ctl_c = widget_c.controller
    assert widget_c.predict(sync=True) and ctl_c.recoverable is not None
    assert widget_d.controller.check_recovery() is not None and widget_d.controller.recover(sync=True)
    assert not ctl_c.recover(sync=True) and ctl_c.recoverable is None and not ctl_c.refined
    assert ctl_c.corrections is None or not (ctl_c.corrections >= 0).any()


def test_a_damaged_model_in_an_autosave_does_not_lose_the_corrections(
    setup, small_image, monkeypatch
) -> None:
    import napari_apl.widgets._controller as controller_module

    viewer, widget, _ = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.refine(tiny_refine(2), sync=True)
    assert ctl.maybe_autosave(force=True) is not None or ctl.autosaves_written > 0
    corrections = ctl.corrections.copy()
    [entry] = find_autosaves(small_image)
    assert entry.has_model and entry.has_corrections
    _crash(ctl)
    model_file = entry.folder / entry.model_file
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated (a disk failure, say)

    warned: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda message: warned.append(str(message)))
    _viewer2, widget2, _ = setup()
    ctl2 = widget2.controller
    ctl2.autosave_interval = 0.0
    assert widget2.predict(sync=True) and ctl2.recoverable is not None
    assert ctl2.recover(sync=True)
    assert np.array_equal(ctl2.corrections, corrections) and not ctl2.refined
    assert len(warned) == 1 and "recovered the corrections only" in warned[0] and "model" in warned[0]
    # the session goes on without the damaged model: its next autosave no longer names it
    assert ctl2.maybe_autosave(force=True) is not None
    [again] = find_autosaves(small_image)
    assert again.folder == entry.folder and not again.has_model and again.has_corrections
    assert not model_file.exists()


def test_recovery_offer_blocks_autosave_and_can_be_discarded(setup, small_image, qtbot, monkeypatch) -> None:
    viewer, widget, image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    data = pseudo.data.copy()
    data[2, 5:9, 5:9] = np.where(data[2, 5:9, 5:9] == 1, 2, 1)  # surely different from the prediction
    pseudo.data = data
    assert ctl.maybe_autosave(force=True) is not None and ctl.n_corrected == 16
    [entry] = find_autosaves(small_image)
    _crash(ctl)

    import napari_apl.widgets._controller as controller_module

    warned: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda message: warned.append(str(message)))
    viewer2, widget2, image2 = setup()
    ctl2 = widget2.controller
    ctl2.autosave_interval = 0.0
    assert widget2.predict(sync=True)  # predicting the same image keeps the offer
    assert ctl2.recoverable is not None and not widget2.recovery_bar.isHidden()
    layer2 = viewer2.layers[LAYER_PSEUDO]
    data2 = layer2.data.copy()
    data2[1, 0:4, 0:4] = np.where(data2[1, 0:4, 0:4] == 1, 2, 1)
    layer2.data = data2
    assert ctl2.maybe_autosave(force=True) is None  # the unanswered offer is never overwritten
    assert len(warned) == 1 and "waiting for Recover or Discard" in warned[0]  # ... and says so, once
    assert ctl2.maybe_autosave(force=True) is None and len(warned) == 1
    other = viewer2.add_image(np.zeros((8, 48, 48), np.float32), name="another scan")
    widget2.image_combo.set_layer(other)  # looking at another image hides the offer ...
    assert widget2.recovery_bar.isHidden() and ctl2.recoverable is None
    assert ctl2.maybe_autosave(force=True) is None  # ... but does not answer it
    widget2.image_combo.set_layer(image2)
    assert not widget2.recovery_bar.isHidden()
    [still] = find_autosaves(small_image)
    assert still.saved_at == entry.saved_at
    widget2.discard_button.click()
    assert find_autosaves(small_image) == [] and widget2.recovery_bar.isHidden()
    assert ctl2.maybe_autosave(force=True) is not None  # now this session autosaves
    [mine] = find_autosaves(small_image)
    assert mine.painted_voxels == ctl2.n_corrected
    assert ctl2.check_recovery() is None  # its own autosave is not offered back to it
    _crash(ctl2)  # of the second session

    # a new widget in the first viewer recovers the corrections in place (no re-prediction)
    saved = ctl2.corrections.copy()
    viewer.window.remove_dock_widget("all")
    _, widget3 = viewer.window.add_plugin_dock_widget("napari-apl", WIDGET_NAME)
    ctl3 = widget3.controller
    widget3.image_combo.set_layer(image)
    assert widget3.predict(sync=True) and not widget3.recovery_bar.isHidden()
    data3 = pseudo.data.copy()
    data3[7, 40:44, 40:44] = np.where(data3[7, 40:44, 40:44] == 4, 3, 4)
    pseudo.data = data3  # painted in the new session before recovering: wins over the autosave
    newer = ctl3.collect_corrections().copy()
    widget3.recover_button.click()
    assert not ctl3.busy and widget3.recovery_bar.isHidden()
    merged = np.where(newer >= 0, newer, saved)
    np.testing.assert_array_equal(ctl3.corrections, merged)
    shown = np.asarray(to_canonical_order(pseudo.data))
    assert (shown[merged >= 0] == merged[merged >= 0]).all()
    assert f"{int((merged >= 0).sum())} voxels" in widget3.refine_panel.corrections_label.text()


def test_autosave_failure_is_one_warning(setup, tmp_path, monkeypatch, qtbot) -> None:
    import napari.utils.notifications as nn

    import napari_apl.widgets._controller as controller_module

    warnings: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda m: warnings.append(str(m)))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAPARI_APL_AUTOSAVE_DIR", str(blocker / "autosave"))
    monkeypatch.setattr(nn, "show_error", lambda m: warnings.append(f"error: {m}"))
    viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    pseudo = viewer.layers[LAYER_PSEUDO]
    for k in range(3):
        data = pseudo.data.copy()
        data[k, :3, :3] = 4
        pseudo.data = data
        assert ctl.maybe_autosave() is None
    assert len(warnings) == 1 and "autosave failed" in warnings[0] and "\n" not in warnings[0]
    assert ctl.refine(tiny_refine(1), sync=True)  # refining still works
    assert len(warnings) == 1


def test_an_autosave_is_not_offered_for_another_scan_on_the_same_grid(setup, tmp_path, monkeypatch) -> None:
    import napari_apl.widgets._controller as controller_module

    warned: list[str] = []
    monkeypatch.setattr(controller_module, "show_warning", lambda message: warned.append(str(message)))
    image_path, _ = write_phantom(tmp_path / "scan", "ct", 3, shape=SHAPE, spacing=SPACING, orientation="LPS")
    viewer, widget, _image = setup(image_path)
    ctl = widget.controller
    assert widget.predict(sync=True)
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.maybe_autosave(force=True) is not None
    _crash(ctl)
    # the file is replaced by another patient's scan on exactly the same grid: not offered
    original = shutil.copy(image_path, tmp_path / "original.nii.gz")
    other, _ = write_phantom(tmp_path / "other", "ct", 4, shape=SHAPE, spacing=SPACING, orientation="LPS")
    shutil.copy(other, image_path)
    _viewer2, widget2, _image2 = setup(image_path)
    assert widget2.recovery_bar.isHidden() and widget2.controller.recoverable is None
    assert any("voxels differ" in w for w in warned)
    # the scan it was saved from is offered again
    shutil.copy(original, image_path)
    _viewer3, widget3, _image3 = setup(image_path)
    assert not widget3.recovery_bar.isHidden() and widget3.controller.recoverable is not None


def test_switching_images_autosaves_the_last_strokes_first(setup, small_image, tmp_path) -> None:
    viewer, widget, image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 3600.0  # no periodic save would come in time
    assert widget.predict(sync=True)
    ctl.maybe_autosave(force=True)  # the session's first save: nothing painted yet
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)  # strokes just before switching images
    painted = ctl.collect_corrections()
    assert painted is not None and (painted >= 0).sum() > 0
    other = viewer.add_image(np.asarray(image.data)[::-1].copy(), name="another scan")
    widget.image_combo.set_layer(other)
    assert widget.predict(sync=True)
    [entry] = find_autosaves(small_image)
    assert entry.painted_voxels == int((painted >= 0).sum())


def test_a_refinement_in_progress_is_autosaved(setup, small_image, qtbot) -> None:
    """A crash in the middle of a long run keeps the newest weights the collapse guard passed."""
    _viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    cfg = RefineConfig(iterations=5000, batch_size=2, bn="frozen", guard_every=2)
    assert ctl.refine(cfg)
    qtbot.waitUntil(lambda: len(ctl.history) >= 8, timeout=60000)
    qtbot.waitUntil(lambda: any(e.has_model for e in find_autosaves(small_image)), timeout=60000)
    [entry] = find_autosaves(small_image)
    assert ctl.busy and 2 <= entry.iteration < 5000  # saved while the run goes on
    _corrections, model, meta = restore(entry)  # a complete, loadable checkpoint
    assert model is not None and _finite(model)
    assert meta.provenance["refined"]["in_progress"] is True
    assert meta.normalization == ctl.last_config.normalization
    ctl.stop()
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)


def test_a_model_recovered_from_a_run_in_progress_records_how_far_it_got(setup, small_image, qtbot) -> None:
    """Exported, a model recovered from a snapshot of a running refinement said nothing of its run:
    iterations_done and stopped were None and the report's refinement null."""
    _viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    assert ctl.refine(RefineConfig(iterations=5000, batch_size=2, bn="frozen", guard_every=2))
    qtbot.waitUntil(lambda: any(e.has_model for e in find_autosaves(small_image)), timeout=60000)
    _crash(ctl)
    ctl.stop()
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60000)
    [entry] = find_autosaves(small_image)
    assert entry.iteration and restore(entry)[2].provenance["refined"]["in_progress"]
    _viewer2, widget2, _image2 = setup()
    ctl2 = widget2.controller
    assert widget2.predict(sync=True) and ctl2.recoverable is not None
    assert ctl2.recover(sync=True) and ctl2.refined
    [record] = ctl2._refinements
    assert record["iterations_done"] == entry.iteration and record["stopped"] is True
    assert "autosave" in record["interrupted"] and record["config"]["iterations"] == 5000
    assert ctl2.report()["refinement"]["iterations_done"] == entry.iteration
    refined = ctl2._refined_meta().provenance["refined"]  # what an export writes
    assert refined["iterations_done"] == entry.iteration and "in_progress" not in refined


def test_revert_lets_the_autosaved_refined_model_go(setup, small_image) -> None:
    """After Revert (or Load model) a crash offered the discarded refined model back, and Recover
    restored it: the autosave kept it until the next stroke or run."""
    viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    ctl.confirm = lambda question: True  # "discard the refined model?"
    assert widget.predict(sync=True)
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.refine(tiny_refine(2), sync=True)
    [entry] = find_autosaves(small_image)
    assert entry.has_model and entry.has_corrections
    assert ctl.revert(sync=True) and not ctl.refined
    [entry] = find_autosaves(small_image)
    assert not entry.has_model and entry.painted_voxels == ctl.n_corrected > 0
    assert ctl.refine(tiny_refine(2), sync=True) and find_autosaves(small_image)[0].has_model
    assert ctl.load_checkpoint(ctl.checkpoint_path) is not None
    assert not find_autosaves(small_image)[0].has_model


def _failing_after(n: int):
    """``refine`` that fails in the worker after ``n`` iterations (an APLError: no logged traceback)."""
    import napari_apl.widgets._controller as controller_module
    from napari_apl.core.errors import APLError

    real = controller_module.refine

    def failing(*args, **kwargs):
        for k, ev in enumerate(real(*args, **kwargs), start=1):
            yield ev
            if k >= n:
                raise APLError("out of memory")

    return failing


def test_a_failed_refinement_leaves_the_sessions_own_model_recoverable(
    setup, small_image, monkeypatch
) -> None:
    import napari_apl.widgets._controller as controller_module

    viewer, widget, image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(2), sync=True)  # run 1: the session's refined model
    good = {k: v.clone() for k, v in ctl.model.state_dict().items()}
    monkeypatch.setattr(controller_module, "refine", _failing_after(8))
    ctl.refine(RefineConfig(iterations=50, batch_size=1, guard_every=2, bn="frozen"), sync=True)  # fails
    assert ctl.check_recovery(image) is None  # its own snapshots are never offered back to it
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.maybe_autosave(force=True) is not None  # and autosaving is not held back
    [entry] = find_autosaves(small_image)
    _corrections, model, meta = restore(entry)  # a crash now recovers run 1's model, not run 2's weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    assert not meta.provenance["refined"].get("in_progress")


def test_a_snapshot_records_the_intensities_of_its_own_run(setup, small_image, monkeypatch) -> None:
    import napari_apl.widgets._controller as controller_module

    _viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    ctl.preset = "zscore"
    assert ctl.refine(tiny_refine(2), sync=True)  # run 1 adapted to z-scored intensities
    snapshots = []
    real_save = controller_module.Autosaver.save

    def spy(self, corrections=None, model=None, meta=None, **kwargs):
        if meta is not None and meta.provenance["refined"].get("in_progress"):
            snapshots.append(dict(meta.normalization))
        return real_save(self, corrections, model, meta, **kwargs)

    monkeypatch.setattr(controller_module.Autosaver, "save", spy)
    ctl.preset = "ct-abdomen"  # run 2 with other intensities than those run 1 adapted the model to
    assert ctl.refine(RefineConfig(iterations=8, batch_size=1, guard_every=2, bn="frozen"), sync=True)
    assert snapshots and all(n == ctl.last_config.normalization for n in snapshots)
    assert snapshots[0]["kind"] == "ct_window"
    # 'from checkpoint' is the model's own: for a refined one, what it was adapted to (its export says so)
    ctl.preset = controller_module.CHECKPOINT_PRESET
    assert ctl.normalization().to_dict() == ctl._refined_meta().normalization == snapshots[0]


def test_a_recovered_model_stays_in_its_own_session(setup, small_image, tmp_path) -> None:
    viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    viewer.layers[LAYER_PSEUDO].paint((4, 20, 20), 2)
    assert ctl.refine(tiny_refine(2), sync=True)
    assert find_autosaves(small_image)[0].has_model
    _crash(ctl)
    viewer2, widget2, _image2 = setup()
    ctl2 = widget2.controller
    ctl2.autosave_interval = 0.0
    assert ctl2.recover(sync=True) and ctl2.refined
    other_path, _ = write_phantom(tmp_path / "b", "ct", 7, shape=SHAPE, spacing=SPACING, orientation="LPS")
    [other] = viewer2.open(str(other_path), plugin="napari-apl")
    widget2.image_combo.set_layer(other)
    assert widget2.predict(sync=True)  # another scan right after recovering
    viewer2.layers[LAYER_PSEUDO].paint((4, 10, 10), 1)
    ctl2.maybe_autosave(force=True)
    [a] = find_autosaves(small_image)
    [b] = find_autosaves(other_path)
    assert a.has_model  # the recovered model is still in its own session ...
    assert not b.has_model  # ... and was not made the other scan's


def test_closing_while_refining_a_scan_not_shown_saves_no_model_into_the_shown_one(
    setup, small_image, tmp_path, monkeypatch
) -> None:
    import napari_apl.widgets._controller as controller_module

    viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    other_path, _ = write_phantom(tmp_path / "b", "ct", 7, shape=SHAPE, spacing=SPACING, orientation="LPS")
    [other] = viewer.open(str(other_path), plugin="napari-apl")
    real = controller_module.refine

    def closing(*args, **kwargs):
        result = yield from real(*args, **kwargs)
        ctl._closing = True  # the viewer closes as the run ends
        return result

    monkeypatch.setattr(controller_module, "refine", closing)
    assert ctl.refine(tiny_refine(2), image_layer=other, sync=True)
    assert not any(e.has_model for e in find_autosaves(small_image))


def test_the_widgets_masks_are_saved_as_uint8(setup, tmp_path) -> None:
    from napari_apl._writer import write_labels

    viewer, widget, _image = setup()
    assert widget.predict(sync=True)
    layer = viewer.layers[LAYER_PSEUDO]  # carries the CT's geometry (an int16 file's header)
    out = write_labels(str(tmp_path / "pseudo.nii.gz"), layer.data, layer.as_layer_data_tuple()[1])[0]
    assert nib.load(out).header.get_data_dtype() == np.uint8


def _paint_square(viewer, k: int = 4) -> int:
    """Change a 4 x 4 square of the pseudo labels on slice ``k`` (each voxel to another label)."""
    pseudo = viewer.layers[LAYER_PSEUDO]
    zz, yy, xx = np.meshgrid([k], np.arange(10, 14), np.arange(10, 14), indexing="ij")
    old = pseudo.data[zz, yy, xx]
    pseudo.data_setitem((zz.ravel(), yy.ravel(), xx.ravel()), ((old + 1) % 5).ravel())
    return old.size


def test_corrections_follow_the_scan_closed_and_opened_again_or_opened_twice(setup, small_image) -> None:
    """Painted corrections belong to the scan: closing its layer and opening the file again, or opening
    it twice, shows them again, and the autosave keeps them (it was overwritten with none)."""
    viewer, widget, image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    n = _paint_square(viewer)
    ctl.collect_corrections()
    assert ctl.n_corrected == n
    ctl.maybe_autosave(force=True)
    assert [e.painted_voxels for e in find_autosaves(small_image)] == [n]
    painted = ctl.corrections.copy()
    viewer.layers.remove(image)
    [again] = viewer.open(str(small_image), plugin="napari-apl")
    widget.image_combo.set_layer(again)
    assert widget.predict(sync=True)
    assert ctl.n_corrected == n
    np.testing.assert_array_equal(ctl.corrections, painted)
    [twice] = viewer.open(str(small_image), plugin="napari-apl", name="the same file again")
    widget.image_combo.set_layer(twice)
    assert widget.predict(sync=True)
    assert ctl.n_corrected == n
    ctl.maybe_autosave(force=True)
    assert [e.painted_voxels for e in find_autosaves(small_image)] == [n]


def test_clearing_a_scan_not_shown_clears_its_autosave(setup, small_image, tmp_path) -> None:
    """Clear corrections on a scan that is not shown also clears its autosaved corrections: they are
    not offered back after a crash."""
    viewer, widget, image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    _paint_square(viewer)
    ctl.maybe_autosave(force=True)
    other_path, _ = write_phantom(tmp_path / "b", "ct", 7, shape=SHAPE, spacing=SPACING, orientation="LPS")
    [other] = viewer.open(str(other_path), plugin="napari-apl")
    widget.image_combo.set_layer(other)
    assert widget.predict(sync=True)  # the first scan is no longer shown
    assert ctl.corrections_count(image) > 0
    assert ctl.clear_corrections(image)
    assert ctl.corrections_count(image) == 0
    assert [e.painted_voxels for e in find_autosaves(small_image)] == [0]


def test_clearing_the_shown_scan_clears_its_autosave(setup, small_image) -> None:
    """Clear corrections on the scan shown also empties its autosaved corrections at once."""
    viewer, widget, _image = setup()
    ctl = widget.controller
    assert widget.predict(sync=True)
    n = _paint_square(viewer)
    ctl.maybe_autosave(force=True)
    assert [e.painted_voxels for e in find_autosaves(small_image)] == [n]
    assert ctl.clear_corrections()
    assert [e.painted_voxels for e in find_autosaves(small_image)] == [0]


def test_recover_asks_before_discarding_an_unexported_refined_model(
    setup, small_image, tmp_path, questions, notifications
):
    """Recovering a session with a refined model, while this viewer holds another refined model not
    exported, asks first (as Load model and Revert do); No keeps the model and recovers nothing."""
    _viewer, widget, _image = setup()
    ctl = widget.controller
    ctl.autosave_interval = 0.0
    assert widget.predict(sync=True)
    assert ctl.refine(tiny_refine(2), sync=True)
    assert find_autosaves(small_image)[0].has_model
    _crash(ctl)
    viewer2, widget2, image2 = setup()
    ctl2 = widget2.controller
    other_path, _ = write_phantom(tmp_path / "b", "ct", 7, shape=SHAPE, spacing=SPACING, orientation="LPS")
    [other] = viewer2.open(str(other_path), plugin="napari-apl")
    widget2.image_combo.set_layer(other)
    assert widget2.predict(sync=True)
    assert ctl2.refine(tiny_refine(1), sync=True) and ctl2.unsaved_refinement
    mine = ctl2.model
    widget2.image_combo.set_layer(image2)  # the crashed session's scan: its recovery is offered
    assert ctl2.recoverable is not None and ctl2.recoverable.has_model
    questions.answer = False
    assert not ctl2.recover(image_layer=image2, sync=True)
    assert questions and "has not been exported" in questions[-1], notifications
    assert ctl2.model is mine
    questions.answer = True
    assert ctl2.recover(image_layer=image2, sync=True)
    assert ctl2.model is not mine and ctl2.refined
