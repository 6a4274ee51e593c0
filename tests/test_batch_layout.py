"""Many volumes: hidden files, one folder per case, read-only outputs, no empty folders left, Ctrl-C.

The volumes here are never read (the tasks are faked or the run is refused before any work), so
placeholder files stand in for them and no cluster is started; the check of the shared checkpoint and
settings (``cli._check_shared_inputs``) is skipped but where a test calls it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _tiny import write_tiny_checkpoint

from napari_apl import cli
from napari_apl.core import batch
from napari_apl.core.batch import TaskResult, expand_inputs, output_dirs
from napari_apl.core.errors import APLError, OutputError


def _touch(path: Path) -> Path:
    """Write a placeholder volume file (never read in these tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder")
    return path


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """A folder of three placeholder volumes case0..case2."""
    folder = tmp_path / "scans"
    for i in range(3):
        _touch(folder / f"case{i}.nii.gz")
    return folder


@pytest.fixture(autouse=True)
def _no_checkpoint_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The placeholder checkpoint ``model.pt`` is never read (see the module's docstring)."""
    monkeypatch.setattr(cli, "_check_shared_inputs", lambda args: None)


def _predict(image: Path | str, out: Path, *extra: str) -> int:
    """Run ``napari-apl predict`` on many volumes (the checkpoint is never read before the tasks)."""
    return cli.main(["predict", str(image), "-c", "model.pt", "-o", str(out), "-q", *extra])


def _fake_run_many(write: dict[str, bool], *, interrupt_after: int | None = None, error: str | None = None):
    """A ``run_many`` stand-in: each task writes main.nii.gz in its folder (when ``write[name]``)."""
    seen: list[Any] = []

    def run_many(fn: Any, items: list[Any], **kwargs: Any) -> list[TaskResult]:
        if error is not None:
            raise APLError(error)
        results = []
        for n, one in enumerate(items):
            note = f"note: {Path(one.image).name} looks odd\n"
            if interrupt_after is not None and n == interrupt_after:
                # a task stopped mid-write leaves its hidden temporary file (atomic_write's name)
                (Path(one.out_dir) / ".main.nii.gz.k2x9_q1a.tmp.nii.gz").write_bytes(b"partial")
                (Path(one.out_dir) / "user-notes.txt").write_bytes(b"kept") if n == 2 else None
                raise KeyboardInterrupt
            seen.append(one)
            folder = Path(one.out_dir)
            assert folder.is_dir(), "the per-volume folder exists before its task runs"
            if write.get(folder.name, True):
                (folder / "main.nii.gz").write_bytes(b"result")
                res = TaskResult(item=one, value=0, messages=note)
            else:
                res = TaskResult(item=one, error="VolumeError: unreadable", messages=note)
            results.append(res)
            if kwargs.get("on_result") is not None:
                kwargs["on_result"](res)
        return results

    run_many.seen = seen  # type: ignore[attr-defined]
    return run_many


# --- point 3: hidden files --------------------------------------------------------------------------


def test_folder_and_glob_skip_hidden_files(scans: Path) -> None:
    tmp = _touch(scans / ".case0.tmp.nii.gz")  # left by an interrupted atomic write
    fork = _touch(scans / "._case1.nii.gz")  # macOS resource fork
    names = [p.name for p in expand_inputs(scans)]
    assert names == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert [p.name for p in expand_inputs(str(scans / "*.nii.gz"))] == names
    with pytest.raises(APLError, match="matches no"):  # a glob that only finds hidden files
        expand_inputs(str(scans / ".*.nii.gz"))
    # a file named on its own is taken as given
    assert expand_inputs(fork) == [fork.absolute()]
    assert expand_inputs(str(tmp)) == [tmp.absolute()]


def test_folder_of_only_hidden_volumes_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "only" / "._scan.nii.gz")
    with pytest.raises(APLError, match="holds no"):
        expand_inputs(tmp_path / "only")


# --- point 4: one folder per case -------------------------------------------------------------------


def test_output_dirs_name_colliding_volumes_by_their_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [tmp_path / "cases" / f"case0{i}" / "image.nii.gz" for i in (1, 2)]
    assert list(output_dirs(cases, out).values()) == [out / "case01_image", out / "case02_image"]
    # relative input paths work the same
    rel = [Path("cases/case01/image.nii.gz"), Path("cases/case02/image.nii")]
    assert list(output_dirs(rel, out).values()) == [out / "case01_image", out / "case02_image"]
    # mixed depths: named below the deepest common parent, every volume
    mixed = [tmp_path / "s" / "a.nii.gz", tmp_path / "s" / "sub" / "a.nii.gz", tmp_path / "s" / "b.nii"]
    assert list(output_dirs(mixed, out).values()) == [out / "a", out / "sub_a", out / "b"]
    # names that do not collide keep out/<volume name>
    plain = [tmp_path / "x" / "a.nii.gz", tmp_path / "y" / "b.nii.gz"]
    assert list(output_dirs(plain, out).values()) == [out / "a", out / "b"]


def test_output_dirs_still_refuse_ambiguous_names(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"both write to .*scan"):
        output_dirs([tmp_path / "d" / "scan.nii", tmp_path / "d" / "scan.nii.gz"], tmp_path / "out")
    # c collides, and the path names a_b/c and a/b_c both become a_b_c
    images = [tmp_path / "a_b" / "c.nii.gz", tmp_path / "a" / "b_c.nii.gz", tmp_path / "q" / "c.nii"]
    with pytest.raises(OutputError, match=r"both write to .*a_b_c"):
        output_dirs(images, tmp_path / "out")


def test_predict_one_folder_per_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in (1, 2):
        _touch(tmp_path / "cases" / f"case0{i}" / "image.nii.gz")
    fake = _fake_run_many({})
    monkeypatch.setattr(batch, "run_many", fake)
    out = tmp_path / "out"
    assert _predict(tmp_path / "cases" / "*" / "image.nii.gz", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case01_image", "case02_image"]
    assert [Path(one.image).parent.name for one in fake.seen] == ["case01", "case02"]
    assert all((out / name / "main.nii.gz").is_file() for name in ("case01_image", "case02_image"))


# --- point 1: an output folder that cannot be made ----------------------------------------------------


def _refuse_mkdir(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make ``Path.mkdir`` fail with EACCES for ``target`` and anything below it (as without permission)."""
    real = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == target or target in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_out_dir_is_one_line(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "locked" / "out"
    out.parent.mkdir()
    _refuse_mkdir(monkeypatch, out)
    assert _predict(scans, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot create output folder {out}: Permission denied: choose another --out-dir" in err
    assert not out.exists()


def test_folder_that_cannot_be_made_removes_the_ones_made(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()  # existed before: kept
    _refuse_mkdir(monkeypatch, out / "case1")
    monkeypatch.setattr(batch, "run_many", _fake_run_many({}))
    with pytest.raises(OutputError, match=r"cannot create output folder .*case1"):
        batch.run_command_many(
            lambda one: 0, _namespace(scans, out), outputs=["main.nii.gz"], echo=lambda text: None
        )
    assert out.is_dir() and list(out.iterdir()) == []


def _namespace(image: Path, out: Path, **kw: Any) -> Any:
    """The arguments ``run_command_many`` reads, as the CLI passes them."""
    import argparse

    base = {"checkpoint": "model.pt", "quiet": False, "scheduler": None, "workers": 2}
    return argparse.Namespace(image=str(image), out_dir=str(out), **{**base, **kw})


# --- point 2: failed runs leave no empty folders ------------------------------------------------------


def test_zero_workers_is_refused_before_any_folder(scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for workers in (0, -1):
        with pytest.raises(APLError, match="--workers must be at least 1"):
            batch.run_command_many(
                lambda one: 0, _namespace(scans, out, workers=workers), outputs=["main.nii.gz"]
            )
        assert not out.exists()


def test_existing_output_refuses_before_any_folder(scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _touch(out / "case1" / "main.nii.gz")
    (out / "case0").mkdir()  # an empty folder the user made: kept
    assert _predict(scans, out) == 2
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case1"]
    assert (out / "case1" / "main.nii.gz").read_bytes() == b"placeholder"


def test_unreachable_scheduler_leaves_no_folders(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    @contextlib.contextmanager
    def unreachable(scheduler: str | None = None, *args: Any, **kwargs: Any) -> Iterator[Any]:
        raise APLError(f"cannot reach the dask scheduler at {scheduler}")
        yield  # pragma: no cover

    monkeypatch.setattr(batch, "cluster_client", unreachable)
    out = tmp_path / "out"
    assert _predict(scans, out, "--scheduler", "tcp://nowhere:8786") == 2
    assert "cannot reach the dask scheduler" in capsys.readouterr().err
    assert not out.exists()
    (out / "case2").mkdir(parents=True)  # made by the user before: kept
    assert _predict(scans, out, "--scheduler", "tcp://nowhere:8786") == 2
    assert sorted(p.name for p in out.iterdir()) == ["case2"]


def test_failed_volumes_leave_no_empty_folders(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(batch, "run_many", _fake_run_many({"case1": False}))
    out = tmp_path / "out"
    assert _predict(scans, out) == 2
    assert "[case1] error: VolumeError: unreadable" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case2"]


# --- point 5: Ctrl-C ----------------------------------------------------------------------------------


def test_interrupt_keeps_finished_volumes_and_reports_them(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(batch, "run_many", _fake_run_many({}, interrupt_after=1))
    out = tmp_path / "out"
    (out / "case2").mkdir(parents=True)  # existed before: kept although empty
    assert _predict(scans, out) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 3 volumes finished" in err
    assert "finished: case0\n" in err and "not finished: case1, case2" in err
    assert (out / "case0" / "main.nii.gz").read_bytes() == b"result"
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case2"]  # case1: only a temp file


def test_interrupt_removes_temporaries_but_no_other_file(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "run_many", _fake_run_many({}, interrupt_after=2))
    out = tmp_path / "out"
    assert _predict(scans, out) == 130
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case1", "case2"]
    assert sorted(p.name for p in (out / "case2").iterdir()) == ["user-notes.txt"]


def test_interrupt_before_any_volume_removes_the_out_dir_it_made(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "run_many", _fake_run_many({}, interrupt_after=0))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        batch.run_command_many(
            lambda one: 0, _namespace(scans, out), outputs=["main.nii.gz"], echo=lambda text: None
        )
    assert not out.exists()
    assert os.listdir(tmp_path) == ["scans"]


# --- shared inputs and paths -------------------------------------------------------------------------


def test_a_bad_shared_input_is_one_line_before_any_cluster(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A missing checkpoint, an unknown preset or an absent device is one error line, before any folder
    is made or any cluster started (not one error per volume)."""
    monkeypatch.undo()  # the real check
    monkeypatch.setattr(batch, "run_many", lambda *a, **k: pytest.fail("a cluster was started"))
    good = write_tiny_checkpoint(tmp_path / "good.pt")
    out = tmp_path / "out"
    cases = [
        (["-c", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
        (["-c", str(good), "--normalize", "foo"], "unknown normalization preset 'foo'"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["-c", str(good), "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        for command in ("predict", "refine"):
            assert cli.main([command, str(scans), "-o", str(out), "-q", *argv]) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()


def test_tasks_get_absolute_paths_and_their_notes_are_named(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Relative --out-dir and --checkpoint reach the tasks absolute (a remote worker would resolve them
    against its own folder); what a task writes to stderr comes back under its volume's name."""
    fake = _fake_run_many({"case1": False})
    monkeypatch.setattr(batch, "run_many", fake)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", str(scans), "-c", "model.pt", "-o", "out", "-q"]) == 2
    assert [Path(one.out_dir) for one in fake.seen] == [tmp_path / "out" / f"case{i}" for i in range(3)]
    assert {one.checkpoint for one in fake.seen} == {str(tmp_path / "model.pt")}
    err = capsys.readouterr().err.splitlines()
    for i in range(3):
        assert f"[case{i}] note: case{i}.nii.gz looks odd" in err
    assert err.index("[case1] note: case1.nii.gz looks odd") < err.index(
        "[case1] error: VolumeError: unreadable"
    )
