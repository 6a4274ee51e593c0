"""Atomic, non-destructive output (issue #6, item 3): kill -9 during exports, no overwrite without a flag.

The kill tests fork a child that exports over an existing file in a loop through the project's
writers (``volume.save_nifti`` for a ~3 MB .nii.gz, ``checkpoint.save_checkpoint`` for a ~7 MB
checkpoint; both go through ``io_utils.atomic_write``), alternating between two versions A and B.
The parent sends SIGKILL at a random moment and then checks that the target is exactly version A or
version B (byte-identical for NIfTI; for checkpoints every zip record is identical except torch's
random ``serialization_id`` and the archive's folder name, which torch derives from the temporary
file name), that it loads with the project's loader, that no other visible file appeared, and that
anything left over is a hidden ``.<name>.*.tmp*`` file.

``NAPARI_APL_KILL_TRIALS`` sets the kills per writer (default 10, so 20 in all; e.g. 200 for a long
run) and ``NAPARI_APL_KILL_SEED`` the random kill times.
"""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing as mp
import os
import random
import re
import signal
import stat
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_apl.core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from napari_apl.core.errors import OutputError, OutputExistsError
from napari_apl.core.io_utils import atomic_write, staged_outputs
from napari_apl.core.models import build_model
from napari_apl.core.volume import load_volume, save_nifti, volume_from_array

TRIALS = int(os.environ.get("NAPARI_APL_KILL_TRIALS", "10"))
SEED = int(os.environ.get("NAPARI_APL_KILL_SEED", "0"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")


def _visible_and_hidden(folder: Path, name: str) -> tuple[set[str], list[str]]:
    """Names of the visible files in ``folder`` and of the hidden temporary files of ``name``."""
    visible = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    pattern = re.compile(rf"^\.{re.escape(name)}\.[^/]+\.tmp")
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert all(pattern.match(h) for h in hidden), f"unexpected hidden files {hidden}"
    return visible, hidden


def _ckpt_records(data: bytes) -> dict[str, str]:
    """The records of a torch zip checkpoint (folder name stripped, serialization id left out) -> md5."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel.endswith("serialization_id"):
                continue
            out[rel] = hashlib.md5(zf.read(info)).hexdigest()
    return out


def _writer_loop(write: Callable[[int], None], ready) -> None:
    """Child process: export version A, B, A, B... over the target until killed."""
    torch.set_num_threads(1)
    ready.set()
    i = 1  # the target holds version A (0) already: start with B
    while True:
        write(i % 2)
        i += 1


def _kill_trials(
    name: str,
    folder: Path,
    target: Path,
    write: Callable[[int], None],
    verify: Callable[[Path], int],
    write_seconds: float,
) -> dict[str, int]:
    """Kill a looping writer ``TRIALS`` times at random moments; verify the target after each kill."""
    ctx = mp.get_context("fork")
    rng = random.Random(f"{name}-{SEED}")
    versions = {0: 0, 1: 0}
    mid_write = 0
    for _ in range(TRIALS):
        _, hidden_before = _visible_and_hidden(folder, target.name)
        ready = ctx.Event()
        proc = ctx.Process(target=_writer_loop, args=(write, ready), daemon=True)
        proc.start()
        try:
            assert ready.wait(30), "the writer did not start"
            time.sleep(rng.uniform(0.0, 3.0 * write_seconds))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        visible, hidden = _visible_and_hidden(folder, target.name)
        assert visible == {target.name}, f"stray files {visible}"
        versions[verify(target)] += 1
        mid_write += len(hidden) > len(hidden_before)
    print(
        f"\nkill -9 {name}: {TRIALS} kills, target was version A {versions[0]}x / B {versions[1]}x, "
        f"{mid_write} kills landed inside a write (left a hidden temp file), "
        f"{len(hidden)} hidden temp files left in all"
    )
    return {"mid_write": mid_write, "temps": len(hidden)}


def test_kill_during_nifti_export(tmp_path):
    rng = np.random.default_rng(0)
    data = np.cumsum(rng.integers(-3, 4, (256, 256, 48)), axis=0).astype(np.int16)  # ~3 MB as .nii.gz
    versions = [data, data + 1]
    ref = volume_from_array(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    expected = []
    t0 = time.perf_counter()
    for i, arr in enumerate(versions):
        expected.append(save_nifti(arr, scratch / f"v{i}.nii.gz", ref).read_bytes())
    write_seconds = (time.perf_counter() - t0) / 2
    folder = tmp_path / "export"
    folder.mkdir()
    target = folder / "labels.nii.gz"
    save_nifti(versions[0], target, ref)
    assert target.read_bytes() == expected[0]  # the writer is deterministic: bytes identify a version

    def write(v: int) -> None:
        save_nifti(versions[v], target, ref, overwrite=True)

    def verify(path: Path) -> int:
        data_now = path.read_bytes()
        assert data_now in expected, "the target is neither the old nor the new version"
        v = expected.index(data_now)
        assert np.array_equal(load_volume(path).to_original(load_volume(path).data), versions[v])
        return v

    _kill_trials("nifti", folder, target, write, verify, write_seconds)


def test_kill_during_checkpoint_export(tmp_path):
    torch.manual_seed(0)
    model_a = build_model("unet-dual", base=16)  # ~7 MB
    model_b = build_model("unet-dual", base=16)
    meta = CheckpointMeta(
        arch="unet-dual", arch_args=dict(model_a.arch_args), input_size=(64, 64), spacing=(2, 2)
    )
    models = [model_a, model_b]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    expected = []
    t0 = time.perf_counter()
    for i, model in enumerate(models):
        expected.append(_ckpt_records(save_checkpoint(scratch / f"v{i}.pt", model, meta).read_bytes()))
    write_seconds = (time.perf_counter() - t0) / 2
    assert expected[0] != expected[1]
    folder = tmp_path / "export"
    folder.mkdir()
    target = folder / "refined.pt"
    save_checkpoint(target, models[0], meta)

    def write(v: int) -> None:
        save_checkpoint(target, models[v], meta, overwrite=True)

    def verify(path: Path) -> int:
        records = _ckpt_records(path.read_bytes())
        assert records in expected, "the target is neither the old nor the new version"
        v = expected.index(records)
        loaded, _ = load_checkpoint(path)
        for k, t in models[v].state_dict().items():
            assert torch.equal(loaded.state_dict()[k], t), k
        return v

    _kill_trials("checkpoint", folder, target, write, verify, max(write_seconds, 0.05))


# -- nothing is overwritten without an explicit flag ------------------------------------------------------


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_no_overwrite_without_flag(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    ref = volume_from_array(data, np.eye(4))
    model = build_model("unet-dual", base=2)
    meta = CheckpointMeta(
        arch="unet-dual", arch_args=dict(model.arch_args), input_size=(16, 16), spacing=(2, 2)
    )
    nii, pt, txt = tmp_path / "a.nii.gz", tmp_path / "m.pt", tmp_path / "log.json"
    save_nifti(data, nii, ref)
    save_checkpoint(pt, model, meta)
    atomic_write(txt, lambda p: p.write_text("{}"))
    before = {p: _state(p) for p in (nii, pt, txt)}
    writers = [
        lambda: save_nifti(data + 1, nii, ref),
        lambda: save_checkpoint(pt, build_model("unet-dual", base=2), meta),
        lambda: atomic_write(txt, lambda p: p.write_text("[]")),
    ]
    for writer in writers:
        with pytest.raises(OutputExistsError) as exc:
            writer()
        assert "overwrite" in str(exc.value)
    assert {p: _state(p) for p in (nii, pt, txt)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "log.json", "m.pt"]
    save_nifti(data + 1, nii, ref, overwrite=True)  # with the flag it is replaced
    assert np.array_equal(load_volume(nii).to_original(load_volume(nii).data), data + 1)


def test_file_appearing_during_write_is_kept(tmp_path):
    target = tmp_path / "out.json"

    def writer(tmp: Path) -> None:
        tmp.write_text("new")
        target.write_text("someone else's")  # created by another program meanwhile

    with pytest.raises(OutputExistsError):
        atomic_write(target, writer)
    assert target.read_text() == "someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("boom"), KeyboardInterrupt()]
)
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old version")
    before = _state(target)

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise error

    with pytest.raises(type(error) if not isinstance(error, OSError) else OutputError):
        atomic_write(target, writer, overwrite=True)
    assert _state(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_written_files_get_normal_permissions(tmp_path):
    """Exports get the umask's permissions (not mkstemp's 0600); a replaced file keeps its mode."""
    umask = os.umask(0o022)
    try:
        target = tmp_path / "shared.json"
        atomic_write(target, lambda p: p.write_text("{}"))
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        target.chmod(0o640)
        atomic_write(target, lambda p: p.write_text("[]"), overwrite=True)
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_staged_outputs_refuse_a_file_that_appeared_before_renaming_any(tmp_path):
    """All or nothing: a file made by someone else while the block ran leaves none of the block's outputs
    and no temporary file (the other file is kept)."""
    names = ["a.json", "b.json", "c.json"]
    with pytest.raises(OutputExistsError, match=r"c\.json appeared while writing"):
        with staged_outputs():
            for name in names:
                atomic_write(tmp_path / name, lambda p: p.write_text("new"))
            (tmp_path / "c.json").write_text("someone else's")
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    assert (tmp_path / "c.json").read_text() == "someone else's"


def test_staged_outputs_undo_the_new_files_when_a_rename_fails(tmp_path, monkeypatch):
    """A rename failing midway removes the outputs the block had already published (and the rest's
    temporaries), and a file the block had replaced with overwrite gets its old version back (it stayed
    new: a set of maps half of one scan and half of another)."""

    (tmp_path / "a.json").write_text("old")
    calls = _replace_failing_at(3, monkeypatch)
    with pytest.raises(OutputError, match="Input/output error; the files that were there are kept"):
        with staged_outputs():
            for name in ("a.json", "b.json", "c.json", "d.json"):
                atomic_write(tmp_path / name, lambda p: p.write_text("new"), overwrite=True)
    assert calls[:3] == ["a.json", "b.json", "c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "old"


def test_a_failed_set_says_which_files_it_replaced_where_none_can_come_back(tmp_path, monkeypatch):
    """On a file system without hard links the old versions cannot be kept aside: the error names the
    files already replaced."""
    import napari_apl.core.io_utils as io_utils

    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("old")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(io_utils.os, "link", no_links)
    _replace_failing_at(2, monkeypatch)
    with pytest.raises(OutputError, match=r"Input/output error; replaced already: a\.json$"):
        with staged_outputs():
            for name in ("a.json", "b.json"):
                atomic_write(tmp_path / name, lambda p: p.write_text("new"), overwrite=True)
    assert [(tmp_path / n).read_text() for n in ("a.json", "b.json")] == ["new", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_a_name_near_the_length_limit_is_written(tmp_path):
    """A legal 248-byte file name failed: the temporary name added ~20 bytes and went past 255."""
    out = tmp_path / ("n" * 245 + ".pt")
    atomic_write(out, lambda p: p.write_bytes(b"model"))
    assert out.read_bytes() == b"model" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_linked_output_is_written_through_the_link(tmp_path):
    """With overwrite, the file a link names is replaced and the link stays; without it, a link (even
    one naming no file yet) counts as an existing output."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "labels.json").write_text("old")
    link = tmp_path / "labels.json"
    link.symlink_to(store / "labels.json")
    with pytest.raises(OutputExistsError, match="a link"):
        atomic_write(link, lambda p: p.write_text("new"))
    atomic_write(link, lambda p: p.write_text("new"), overwrite=True)
    assert link.is_symlink() and (store / "labels.json").read_text() == "new"
    dangling = tmp_path / "later.json"
    dangling.symlink_to(store / "not_yet.json")
    with pytest.raises(OutputExistsError):
        atomic_write(dangling, lambda p: p.write_text("new"))
    assert dangling.is_symlink() and not (store / "not_yet.json").exists()
    assert sorted(p.name for p in store.iterdir()) == ["labels.json"]


def test_a_file_made_at_the_last_moment_is_not_replaced(tmp_path, monkeypatch):
    """Without overwrite there is no window between a check and the rename: a file another process makes
    just before the move is kept and the write refused."""
    import napari_apl.core.io_utils as io_utils

    out = tmp_path / "result.json"

    def rival_first(real):
        def op(src, dst, *a, **k):
            Path(dst).write_text("someone else's")
            return real(src, dst, *a, **k)

        return op

    monkeypatch.setattr(io_utils.os, "replace", rival_first(os.replace))
    monkeypatch.setattr(io_utils.os, "link", rival_first(os.link))
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        atomic_write(out, lambda p: p.write_text("ours"))
    assert out.read_text() == "someone else's" and [p.name for p in tmp_path.iterdir()] == [out.name]


def _replace_failing_at(n: int, monkeypatch) -> list[str]:
    """Make io_utils' n-th ``os.replace`` fail with an I/O error; returns the names it is called for."""
    import napari_apl.core.io_utils as io_utils

    real, calls = io_utils.os.replace, []

    def flaky_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == n:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(io_utils.os, "replace", flaky_replace)
    return calls


def test_a_failed_set_leaves_no_link_aside_and_restores_the_first_version(tmp_path, monkeypatch):
    """The output whose own rename failed kept its hidden link aside (renaming a link onto another link
    of the same file does nothing), and an output written twice in one set got its middle version back."""
    (tmp_path / "a.txt").write_text("old")
    (tmp_path / "b.txt").write_text("old")
    _replace_failing_at(2, monkeypatch)
    with pytest.raises(OutputError, match="the files that were there are kept"):
        with staged_outputs():
            for name in ("a.txt", "b.txt"):
                atomic_write(tmp_path / name, lambda p: p.write_text("new"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt")] == ["old", "old"]
    monkeypatch.undo()
    _replace_failing_at(3, monkeypatch)
    with pytest.raises(OutputError):
        with staged_outputs():
            for text in ("new1", "new2"):
                atomic_write(tmp_path / "a.txt", lambda p, t=text: p.write_text(t), overwrite=True)
            atomic_write(tmp_path / "b.txt", lambda p: p.write_text("new"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_a_loop_of_links_as_output_is_one_line(tmp_path):
    """An output that is a link to itself raised a RuntimeError traceback."""
    loop = tmp_path / "image.nii.gz"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="a link that names no file") as err:
        atomic_write(loop, lambda p: p.write_text("x"), overwrite=True)
    assert "\n" not in str(err.value)
