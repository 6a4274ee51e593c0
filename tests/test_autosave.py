"""Crash recovery (issue #6, item 7): autosaved corrections and refined models, reopened after a crash."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import stat
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apl.core import autosave
from napari_apl.core.autosave import (
    AUTOSAVE_DIR_ENV,
    AutosaveEntry,
    AutosaveError,
    Autosaver,
    default_root,
    discard,
    find_autosaves,
    restore,
    session_key,
)
from napari_apl.core.checkpoint import CheckpointMeta, save_checkpoint
from napari_apl.core.errors import APLError
from napari_apl.core.models import build_model
from napari_apl.core.phantom import make_phantom
from napari_apl.core.volume import load_volume, volume_from_array

SHAPE = (48, 48, 8)
SPACING = (5.0, 5.0, 8.0)


def _meta(model) -> CheckpointMeta:
    """Metadata of a tiny test model."""
    return CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=(48, 48),
        spacing=(5.0, 5.0),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CT phantom and a tiny checkpoint on disk (the user's files)."""
    folder = tmp_path_factory.mktemp("user")
    image, _, affine = make_phantom("ct", 2, shape=SHAPE, spacing=SPACING)
    img_path = folder / "patient.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(img_path))
    torch.manual_seed(0)
    model = build_model("unet-dual", base=4)
    ck = folder / "source.pt"
    save_checkpoint(ck, model, _meta(model))
    return img_path, ck, model


def _snapshot(paths) -> dict:
    """Bytes and mtimes of files (to prove they were never touched)."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def _corrections(value: int = 1) -> np.ndarray:
    """A corrections volume with a small painted block."""
    corr = np.full(SHAPE, -1, np.int16)
    corr[10:20, 12:18, 2:5] = value
    corr[30:33, 30:33, 6] = 0
    return corr


def test_an_in_memory_scan_is_offered_under_its_layer_name(files, tmp_path):
    """A scan with no file (the bundled sample) was offered as "volume"; the name shown is the one given,
    and the session key (what an offer is matched on) does not depend on it."""
    img_path, _ck, model = files
    vol = volume_from_array(np.asarray(load_volume(img_path).data), np.eye(4))
    saver = Autosaver(vol, root=tmp_path, interval=0, display_name="phantom CT")
    entry = saver.save(_corrections(3), model, _meta(model))
    (found,) = find_autosaves(vol, root=tmp_path)
    assert found.image_name == "phantom CT" and entry.summary().startswith("phantom CT, ")
    assert found.key == session_key(vol) == Autosaver(vol, root=tmp_path, interval=0).key


def test_round_trip_with_manifest(files, tmp_path):
    img_path, ck, model = files
    before = _snapshot([img_path, ck])
    vol = load_volume(img_path)
    saver = Autosaver(vol, checkpoint=ck, root=tmp_path, interval=0)
    corr = _corrections(3)
    t0 = time.time()
    entry = saver.save(corr, model, _meta(model), iteration=42)
    assert entry.folder.parent == tmp_path and entry.key == session_key(vol) == session_key(img_path)
    assert stat.S_IMODE(entry.folder.stat().st_mode) == 0o700  # autosaves may hold patient data
    manifest = json.loads((entry.folder / "manifest.json").read_text())
    assert manifest["image_path"] == str(img_path.resolve())
    assert manifest["checkpoint"] == str(ck.resolve())
    assert manifest["iteration"] == 42 and manifest["painted_voxels"] == int((corr >= 0).sum())
    assert t0 - 1 <= manifest["saved_at"] <= time.time() + 1
    for image in (img_path, vol, str(img_path)):
        (found,) = find_autosaves(image, root=tmp_path)
        assert found.folder == entry.folder and found.iteration == 42
    assert "42" in entry.summary() and "corrected voxels" in entry.summary()
    corrections, refined, meta = restore(entry)
    assert corrections.dtype == np.int16 and np.array_equal(corrections, corr)
    assert meta.arch == "unet-dual" and meta.input_size == (48, 48)
    for k, v in model.state_dict().items():
        assert torch.equal(refined.state_dict()[k], v), k
    assert _snapshot([img_path, ck]) == before


def test_partial_saves_keep_the_rest_and_only_one_snapshot(files, tmp_path):
    img_path, _, model = files
    saver = Autosaver(img_path, root=tmp_path, interval=0)
    saver.save(_corrections(1))
    entry = saver.save(model=model, meta=_meta(model), iteration=5)
    assert entry.has_corrections and entry.has_model
    first_model = entry.model_file
    entry = saver.save(_corrections(2), iteration=6)  # the model did not change: not rewritten
    assert entry.model_file == first_model
    corr, refined, _ = restore(entry)
    assert np.array_equal(corr, _corrections(2)) and refined is not None
    names = sorted(p.name for p in entry.folder.iterdir())
    assert names == sorted([".lock", "manifest.json", entry.corrections_file, entry.model_file]), names
    with torch.no_grad():
        changed = build_model("unet-dual", base=4)
    entry2 = saver.save(model=changed, meta=_meta(changed), iteration=7)
    assert entry2.model_file != first_model
    assert not (entry.folder / first_model).exists()
    # clearing: an all -1 volume means nothing painted
    entry3 = saver.save(np.full(SHAPE, -1, np.int16))
    assert entry3.painted_voxels == 0


def test_newest_first_and_per_image(files, tmp_path):
    img_path, _, _ = files
    image, _, affine = make_phantom("ct", 5, shape=SHAPE, spacing=SPACING)
    other = volume_from_array(image, affine)  # in memory: keyed by name, shape and affine
    shifted = affine.copy()
    shifted[0, 3] += 10
    moved = volume_from_array(image, shifted)
    a = Autosaver(img_path, root=tmp_path, interval=0)
    b = Autosaver(other, root=tmp_path, interval=0)
    c = Autosaver(moved, root=tmp_path, interval=0)
    assert len({a.key, b.key, c.key}) == 3
    a.save(_corrections(1))
    time.sleep(0.02)
    b.save(_corrections(2))
    time.sleep(0.02)
    c.save(_corrections(3))
    time.sleep(0.02)
    a.save(_corrections(4))
    all_entries = find_autosaves(root=tmp_path)
    assert [e.key for e in all_entries] == [a.key, c.key, b.key]
    assert [e.key for e in find_autosaves(other, root=tmp_path)] == [b.key]
    corr, model, meta = restore(find_autosaves(img_path, root=tmp_path)[0])
    assert np.array_equal(corr, _corrections(4)) and model is None and meta is None
    assert find_autosaves(root=tmp_path / "nothing-here") == []


def test_throttle(files, tmp_path):
    img_path, _, _ = files
    now = [100.0]
    saver = Autosaver(img_path, root=tmp_path, interval=30.0, clock=lambda: now[0])
    assert saver.maybe_save(_corrections(1)) is None  # not due yet
    now[0] += 29.9
    assert saver.maybe_save(_corrections(1)) is None
    now[0] += 0.2
    assert saver.maybe_save(_corrections(1)) is not None
    assert saver.maybe_save(_corrections(2)) is None  # interval restarts after each save
    assert saver.maybe_save(_corrections(2), force=True) is not None
    assert np.array_equal(restore(find_autosaves(img_path, root=tmp_path)[0])[0], _corrections(2))


def test_default_root_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTOSAVE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(AUTOSAVE_DIR_ENV)
    from platformdirs import user_cache_dir

    assert default_root() == Path(user_cache_dir("napari-apl", appauthor=False)) / "autosave"


def test_env_root_is_used(files, tmp_path, monkeypatch):
    img_path, _, _ = files
    monkeypatch.setenv(AUTOSAVE_DIR_ENV, str(tmp_path / "env-root"))
    Autosaver(img_path, interval=0).save(_corrections(1))
    assert len(find_autosaves(img_path)) == 1
    assert (tmp_path / "env-root").is_dir()


def test_discard_never_deletes_user_files(files, tmp_path):
    img_path, ck, model = files
    before = _snapshot([img_path, ck])
    saver = Autosaver(img_path, checkpoint=ck, root=tmp_path / "root", interval=0)
    entry = saver.save(_corrections(1), model, _meta(model), iteration=1)
    # an entry pointing at the user's own folder is refused, nothing deleted there
    (img_path.parent / "manifest.json").write_text("{}")
    fake = AutosaveEntry(**{**entry.__dict__, "folder": img_path.parent})
    with pytest.raises(AutosaveError):
        discard(fake)
    assert _snapshot([img_path, ck]) == before
    (img_path.parent / "manifest.json").unlink()
    # a file the user put in the autosave folder survives a discard (and so does the folder)
    keep = entry.folder / "my-notes.txt"
    keep.write_text("mine")
    with pytest.raises(AutosaveError, match="still open"):
        discard(entry)  # the saver's session is live: its folder is not a crashed session's
    saver.close()  # (the session ends)
    discard(entry)
    assert keep.read_text() == "mine" and sorted(p.name for p in entry.folder.iterdir()) == ["my-notes.txt"]
    assert find_autosaves(img_path, root=tmp_path / "root") == []
    keep.unlink()
    entry = saver.save(_corrections(2))
    saver.discard()
    assert not entry.folder.exists()
    assert _snapshot([img_path, ck]) == before


class _Evil:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_damaged_autosaves_give_clean_errors(files, tmp_path):
    img_path, _, model = files
    root = tmp_path / "root"
    saver = Autosaver(img_path, root=root, interval=0)
    entry = saver.save(_corrections(1), model, _meta(model), iteration=3)
    corr_file = entry.folder / entry.corrections_file
    good = corr_file.read_bytes()
    bad_versions = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00garbage" * 50,
    }
    # an npz whose array header claims another shape, and one holding a pickled object array
    for name, arr in {
        "shape": np.zeros((4096, 4096, 64), np.int16)[:1, :1, :1],
        "object": np.array([_Evil(tmp_path / "pwned")], dtype=object),
    }.items():
        path = tmp_path / f"{name}.npz"
        with open(path, "wb") as fh:
            np.savez(fh, corrections=arr)
        bad_versions[name] = path.read_bytes()
    for name, data in bad_versions.items():
        corr_file.write_bytes(data)
        with pytest.raises(AutosaveError) as exc:
            restore(entry)
        assert "\n" not in str(exc.value) and "discard" in str(exc.value), name
    assert not (tmp_path / "pwned").exists()
    corr_file.write_bytes(good)
    # a model file that would run code is refused and nothing runs
    evil = {"napari_apl_format": 1, "meta_json": "{}", "state_dict": {"w": _Evil(tmp_path / "pwned")}}
    (entry.folder / entry.model_file).write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(AutosaveError) as exc:
        restore(entry)
    assert "unsafe" in str(exc.value) and not (tmp_path / "pwned").exists()
    # damaged or foreign manifests are skipped when listing, and refused when restoring
    for text in ("{not json", json.dumps({"napari_apl_autosave": 99}), json.dumps([1, 2]), "x" * (2 << 20)):
        (entry.folder / "manifest.json").write_text(text)
        assert find_autosaves(img_path, root=root) == []
        with pytest.raises(AutosaveError):
            restore(entry)
    (root / "not-a-folder.txt").write_text("x")
    assert find_autosaves(root=root) == []


def test_bad_arguments(files, tmp_path):
    img_path, _, model = files
    saver = Autosaver(img_path, root=tmp_path, interval=0)
    for bad in (np.zeros((3, 3, 3), np.int16), np.zeros(SHAPE, np.float32), np.full(SHAPE, -5, np.int16)):
        with pytest.raises(AutosaveError):
            saver.save(bad)
    with pytest.raises(AutosaveError):
        saver.save(model=model)
    with pytest.raises(AutosaveError):
        Autosaver(img_path, root=tmp_path, interval=-1)
    with pytest.raises(APLError):
        Autosaver(tmp_path / "missing.nii.gz", root=tmp_path)
    with pytest.raises(APLError):
        Autosaver(object(), root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written by failed saves
    unwritable = tmp_path / "file-not-folder"
    unwritable.write_text("x")
    with pytest.raises(APLError):
        Autosaver(img_path, root=unwritable, interval=0).save(_corrections(1))


# -- a crash during an autosave leaves a consistent snapshot ----------------------------------------------


def _autosave_forever(img_path: str, root: str, ready) -> None:
    """Child process: autosave snapshot i (corrections = i, model weights = i, iteration i) in a loop."""
    torch.set_num_threads(1)
    saver = Autosaver(img_path, root=root, interval=0)
    model = build_model("unet-dual", base=4)
    meta = _meta(model)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        saver.save(_corrections(i % 30000), model, meta, iteration=i)
        if i == 1:
            ready.set()


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_kill_during_autosave_leaves_a_consistent_snapshot(files, tmp_path):
    img_path, ck, _ = files
    before = _snapshot([img_path, ck])
    ctx = mp.get_context("fork")
    rng = random.Random(int(os.environ.get("NAPARI_APL_KILL_SEED", "6")))
    trials = int(os.environ.get("NAPARI_APL_AUTOSAVE_KILL_TRIALS", "5"))
    root = tmp_path / "root"
    seen = []
    for _ in range(trials):
        ready = ctx.Event()
        proc = ctx.Process(target=_autosave_forever, args=(str(img_path), str(root), ready), daemon=True)
        proc.start()
        assert ready.wait(60), "the autosave child did not start"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        (entry,) = find_autosaves(img_path, root=root)
        corr, model, _ = restore(entry)
        i = entry.iteration
        assert np.array_equal(corr, _corrections(i % 30000)), "corrections do not match the manifest"
        assert all(torch.all(p == float(i)) for p in model.parameters()), "model does not match the manifest"
        committed = {"manifest.json", entry.corrections_file, entry.model_file}
        names = {p.name for p in entry.folder.iterdir() if not p.name.startswith(".")}
        # a save killed before its manifest was replaced leaves its newer data files, one killed after
        # it the previous snapshot's files: neither is ever read, the next save removes them
        orphans = names - committed
        seq = entry.manifest["seq"]
        assert committed <= names and all(f"-{seq + 1}." in n or f"-{seq - 1}." in n for n in orphans), names
        seen.append(i)
    print(f"autosave kill trials: {trials}, snapshots recovered at iterations {seen}")
    # the next save of a new session removes orphans and stale temporary files of killed saves
    autosave._STALE_TEMP_S, stale = 0.0, autosave._STALE_TEMP_S
    try:
        entry = Autosaver(img_path, root=root, interval=0).save(_corrections(7))
    finally:
        autosave._STALE_TEMP_S = stale
    names = sorted(p.name for p in entry.folder.iterdir())
    assert names == sorted([".lock", "manifest.json", entry.corrections_file])
    assert _snapshot([img_path, ck]) == before


def test_restore_checks_header_before_allocating(files, tmp_path):
    img_path, _, _ = files
    saver = Autosaver(img_path, root=tmp_path, interval=0)
    entry = saver.save(_corrections(1))
    corr_file = entry.folder / entry.corrections_file
    # forge an npy header that declares a 32767^3 int16 array (70 TB) in a tiny file
    header = {"descr": "<i2", "fortran_order": False, "shape": (32767, 32767, 32767)}
    raw = tmp_path / "raw.npy"
    with open(raw, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\x00" * 64)
    with zipfile.ZipFile(corr_file, "w") as zf:
        zf.write(raw, "corrections.npy")
    with pytest.raises(AutosaveError) as exc:
        restore(entry)
    assert "expected int16" in str(exc.value)


def test_a_model_that_cannot_be_written_does_not_cost_the_corrections(files, tmp_path, monkeypatch):
    import napari_apl.core.checkpoint as checkpoint_module

    img_path, _, model = files
    saver = Autosaver(img_path, root=tmp_path, interval=0)
    saver.save(_corrections(1), model, _meta(model), iteration=3)

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", disk_full)
    changed = build_model("unet-dual", base=4)
    with pytest.raises(AutosaveError, match=r"model was not autosaved.*corrections were"):
        saver.save(_corrections(2), changed, _meta(changed), iteration=9)
    (entry,) = find_autosaves(img_path, root=tmp_path)
    assert entry.iteration == 3  # the model on disk is still the one of iteration 3
    corr, refined, _ = restore(entry)
    assert np.array_equal(corr, _corrections(2))  # the new corrections are committed ...
    for k, v in model.state_dict().items():  # ... beside the last model that could be written
        assert torch.equal(refined.state_dict()[k], v), k


# -- two sessions of one scan (two viewers, or two processes) ------------------------------------------------


def _hold_a_session(img_path: str, root: str, ready, stop) -> None:
    """Child process: a live session of the scan that has saved once, until told to stop."""
    saver = Autosaver(img_path, root=root, interval=0)
    saver.save(_corrections(9))
    ready.set()
    stop.wait(60)


def test_two_open_sessions_of_one_scan_never_mix_or_delete_each_others_snapshots(files, tmp_path):
    img_path, _ck, _model = files
    refined = build_model("unet-dual", base=4)
    with torch.no_grad():
        for p in refined.parameters():
            p.fill_(0.5)
    a = Autosaver(img_path, root=tmp_path, interval=0)
    b = Autosaver(img_path, root=tmp_path, interval=0)
    a.save(_corrections(1))
    b.save(_corrections(2))  # (once this reused a's file names and removed a's files)
    entry_a = a.save(_corrections(1), refined, _meta(refined), iteration=3)
    entry_b = b.save(_corrections(2))
    assert entry_a.folder != entry_b.folder and entry_b.folder.name.endswith("-2")
    corr_a, model_a, _ = restore(entry_a)
    corr_b, model_b, _ = restore(entry_b)
    assert np.array_equal(corr_a, _corrections(1)) and np.array_equal(corr_b, _corrections(2))
    assert model_b is None and all(torch.all(p == 0.5) for p in model_a.parameters())
    # both are live: listed as in use, and neither can be discarded as if it had crashed
    found = find_autosaves(img_path, root=tmp_path)
    assert len(found) == 2 and all(e.in_use for e in found)
    with pytest.raises(AutosaveError, match="still open"):
        discard(entry_b)
    # a ends (as a crash does): its session is recoverable, b's is still live
    a.close()
    (crashed,) = [e for e in find_autosaves(img_path, root=tmp_path) if not e.in_use]
    assert crashed.folder == entry_a.folder and crashed.has_model
    # a third session does not take b's folder, and can carry on a's
    c = Autosaver(img_path, root=tmp_path, interval=0, folder=crashed.folder, resume=True)
    assert c.folder == entry_a.folder
    entry_c = c.save(_corrections(3))
    assert entry_c.has_model and np.array_equal(restore(entry_c)[0], _corrections(3))
    assert np.array_equal(restore(entry_b)[0], _corrections(2))
    b.discard()
    c.discard()
    assert find_autosaves(img_path, root=tmp_path) == []


def test_adopting_a_recovered_session_moves_this_session_into_its_folder(files, tmp_path):
    img_path, _ck, model = files
    old = Autosaver(img_path, root=tmp_path, interval=0)
    live = Autosaver(img_path, root=tmp_path, interval=0)
    old.save(_corrections(1), model, _meta(model), iteration=4)
    live.save(_corrections(2))
    old.close()  # crashed
    (recovered,) = [e for e in find_autosaves(img_path, root=tmp_path) if not e.in_use]
    live.adopt(recovered)
    entry = live.save(_corrections(5))  # a partial save: the recovered model stays
    assert entry.folder == recovered.folder and entry.has_model and entry.iteration == 4
    # the folder the session used before is gone: its work is in the recovered session's snapshot now
    assert [e.folder for e in find_autosaves(img_path, root=tmp_path)] == [recovered.folder]


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork")
def test_a_session_of_another_process_holds_its_folder_until_that_process_ends(files, tmp_path):
    img_path, _ck, _model = files
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_a_session, args=(str(img_path), str(tmp_path), ready, stop), daemon=True)
    proc.start()
    try:
        assert ready.wait(60)
        (theirs,) = find_autosaves(img_path, root=tmp_path)
        assert theirs.in_use
        mine = Autosaver(img_path, root=tmp_path, interval=0).save(_corrections(1))
        assert mine.folder != theirs.folder
        assert np.array_equal(restore(theirs)[0], _corrections(9))
        with pytest.raises(AutosaveError, match="still open"):
            discard(theirs)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: the system drops its lock
        proc.join(10)
    (crashed,) = [e for e in find_autosaves(img_path, root=tmp_path) if e.folder == theirs.folder]
    assert not crashed.in_use
    discard(crashed)
    assert not theirs.folder.exists()


def test_a_recovered_session_is_held_at_once(files, tmp_path):
    """Adopting a crashed session locked it only at the next save: meanwhile another viewer was offered
    it and could discard it, and the refined model it held was lost."""
    img_path, _ck, model = files
    crashed = Autosaver(img_path, root=tmp_path, interval=0)
    crashed.save(_corrections(1), model, _meta(model), iteration=4)
    crashed.close()
    (entry,) = find_autosaves(img_path, root=tmp_path)
    live = Autosaver(img_path, root=tmp_path, interval=0)
    live.adopt(entry)
    (again,) = find_autosaves(img_path, root=tmp_path)
    assert again.in_use  # not offered elsewhere any more
    with pytest.raises(AutosaveError, match="still open"):
        discard(again)
    assert live.save(_corrections(2)).has_model


def test_a_session_whose_folder_was_taken_does_not_carry_on_another_crashed_one(files, tmp_path):
    """Back on an image whose folder another viewer holds now, the session must not resume (and later
    overwrite) some other crashed session of the scan as if it were its own."""
    img_path, _ck, model = files
    mine = Autosaver(img_path, root=tmp_path, interval=0)
    mine.save(_corrections(1))
    own_folder = mine.folder
    mine.close()  # (this viewer shows another image)
    holder = Autosaver(img_path, root=tmp_path, interval=0, folder=own_folder, resume=True)
    holder.save(_corrections(2))  # another viewer recovered it and holds it
    other = Autosaver(img_path, root=tmp_path, interval=0)  # and some session crashed with a model
    other.save(_corrections(3), model, _meta(model), iteration=7)
    other.close()
    back = Autosaver(img_path, root=tmp_path, interval=0, folder=own_folder, resume=True)
    entry = back.save(_corrections(4))
    assert entry.folder not in (own_folder, other.folder) and not entry.has_model
    assert [e.folder for e in find_autosaves(img_path, root=tmp_path) if not e.in_use] == [other.folder]


def test_discarding_a_held_folder_releases_it_before_deleting_the_lock(files, tmp_path, monkeypatch):
    """Windows cannot delete a file that is open: the lock file was deleted while still held, so every
    discard failed there and the folder stayed held."""
    img_path, _ck, model = files
    real_unlink = Path.unlink

    def windows_unlink(self, missing_ok=False):
        if self.name == autosave.LOCK_FILE and str(self.parent) in autosave._HELD:
            raise PermissionError(32, "The process cannot access the file: it is being used")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", windows_unlink)
    saver = Autosaver(img_path, root=tmp_path, interval=0)
    entry = saver.save(_corrections(1), model, _meta(model), iteration=3)
    saver.discard()
    assert not entry.folder.exists() and str(entry.folder) not in autosave._HELD
    assert saver.save(_corrections(2)).folder == entry.folder  # and the session saves again


def test_a_session_saved_after_this_saver_looked_is_never_replaced_or_discarded(files, tmp_path):
    """A saver created before another session of the scan saved (and crashed) in its folder took that
    folder at its first save: the crashed session, never offered, was overwritten; a clean export's
    discard deleted it; and a folder held by a live session made discard raise a false warning."""
    img_path, _ck, model = files
    early = Autosaver(img_path, root=tmp_path, interval=0)  # (looked: nothing there yet)
    crashed = Autosaver(img_path, root=tmp_path, interval=0)
    crashed.save(_corrections(1), model, _meta(model), iteration=5)
    crashed.close()
    assert crashed.folder == early.folder
    early.discard()  # a clean export of the early session: nothing of its own to delete
    (entry,) = find_autosaves(img_path, root=tmp_path)
    assert entry.has_model and not entry.in_use
    mine = early.save(_corrections(2))
    assert mine.folder != crashed.folder
    (kept,) = [e for e in find_autosaves(img_path, root=tmp_path) if e.folder == crashed.folder]
    assert kept.has_model and not kept.in_use and np.array_equal(restore(kept)[0], _corrections(1))
    # a discard where a live session holds the folder this saver looked at: quiet, nothing deleted
    live = Autosaver(img_path, root=tmp_path, interval=0, folder=crashed.folder, resume=True)
    live.save(_corrections(3))
    late = Autosaver(img_path, root=tmp_path, interval=0)
    late.folder = crashed.folder  # (as if it had looked before the live session took it)
    late.discard()
    assert np.array_equal(restore(find_autosaves(img_path, root=tmp_path)[0])[0], _corrections(3))
