"""Many volumes on dask.distributed: input expansion, output folders, and results identical to one volume."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apl import cli
from napari_apl.core.batch import expand_inputs, is_many, label_volumes, output_dirs, run_many, volume_name
from napari_apl.core.errors import APLError, OutputError

TINY_SHAPE = (64, 64, 12)  # as conftest.TINY_SHAPE / TINY_SPACING
TINY_SPACING = (5.0, 5.0, 12.0)
MAPS = ("main", "aux", "pseudo_label", "confidence", "consistency")


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small CT phantoms (different seeds) in one folder."""
    from napari_apl.core.phantom import write_phantom

    folder = tmp_path_factory.mktemp("many")
    for seed in range(3):
        work = tmp_path_factory.mktemp(f"seed{seed}")
        image, _ = write_phantom(work, "ct", seed, shape=TINY_SHAPE, spacing=TINY_SPACING)
        shutil.move(str(image), folder / f"case{seed}.nii.gz")
    (folder / "notes.txt").write_text("not a volume")
    return folder


def _one_volume(argv: list[str]) -> None:
    """Run the one-volume command in this process with one torch thread (as each worker uses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(before)


def _same_nifti(a: Path, b: Path) -> None:
    ia, ib = nib.load(str(a)), nib.load(str(b))
    assert np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)), a.name
    assert np.allclose(ia.affine, ib.affine) and ia.get_data_dtype() == ib.get_data_dtype()


def test_expand_inputs_folder_glob_and_file(phantom_folder: Path) -> None:
    names = [p.name for p in expand_inputs(phantom_folder)]
    assert names == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert [p.name for p in expand_inputs(str(phantom_folder / "case[12]*"))] == [
        "case1.nii.gz",
        "case2.nii.gz",
    ]
    assert is_many(phantom_folder) and is_many(str(phantom_folder / "*.nii.gz"))
    assert not is_many(phantom_folder / "case0.nii.gz")
    assert volume_name("a/b/scan.nii.gz") == "scan" and volume_name("scan.nii") == "scan"
    with pytest.raises(APLError, match="matches no"):
        expand_inputs(str(phantom_folder / "nothing*.nii.gz"))


def test_output_dirs_refuse_two_volumes_with_one_name(tmp_path: Path) -> None:
    dirs = output_dirs([Path("x/a.nii.gz"), Path("y/b.nii")], tmp_path)
    assert list(dirs.values()) == [tmp_path / "a", tmp_path / "b"]
    # one name in two folders: each is named from its path (the one-folder-per-case layout)
    dirs = output_dirs([Path("x/a.nii.gz"), Path("y/a.nii")], tmp_path)
    assert list(dirs.values()) == [tmp_path / "x_a", tmp_path / "y_a"]
    with pytest.raises(OutputError, match="both write"):
        output_dirs([Path("x/a.nii.gz"), Path("x/a.nii")], tmp_path)


def test_predict_and_refine_many_on_a_local_cluster_match_one_volume(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Goal 7: 3 phantoms on a 2-process local cluster give exactly the one-volume command's files."""
    ckpt = str(tiny_checkpoint)
    many = tmp_path / "many"
    rc = cli.main(["predict", str(phantom_folder), "-c", ckpt, "-o", str(many), "-q", "--workers", "2"])
    assert rc == 0, capsys.readouterr()
    assert "3 of 3 volumes done" in capsys.readouterr().out
    for seed in range(3):
        one = tmp_path / f"one{seed}"
        _one_volume(["predict", str(phantom_folder / f"case{seed}.nii.gz"), "-c", ckpt, "-o", str(one), "-q"])
        for name in MAPS:
            _same_nifti(many / f"case{seed}" / f"{name}.nii.gz", one / f"{name}.nii.gz")

    refined = tmp_path / "refined"
    args = ["-c", ckpt, "-q", "-n", "2", "--batch-size", "2"]
    rc = cli.main(
        ["refine", str(phantom_folder / "case*.nii.gz"), "-o", str(refined), "--workers", "2", *args]
    )
    assert rc == 0, capsys.readouterr()
    one = tmp_path / "refined_one"
    _one_volume(["refine", str(phantom_folder / "case1.nii.gz"), "-o", str(one), *args])
    for name in MAPS:
        _same_nifti(refined / "case1" / f"{name}.nii.gz", one / f"{name}.nii.gz")
    a = torch.load(refined / "case1" / "refined.pt", weights_only=True)["state_dict"]
    b = torch.load(one / "refined.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in refined.iterdir()) == ["case0", "case1", "case2"]


def test_many_checks_every_output_before_work(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "case2").mkdir(parents=True)
    (out / "case2" / "main.nii.gz").write_bytes(b"old")
    rc = cli.main(["predict", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(out), "-q"])
    assert rc == 2
    assert not (out / "case0").exists()  # refused before any folder was made or anything computed
    rc = cli.main(
        ["refine", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(out), "--corrections", "x.nii"]
    )
    assert rc == 2


def test_a_rerun_over_its_own_output_folder_leaves_earlier_outputs_out(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """A recursive glob run again with the output folder among its inputs: the outputs of the first run
    are not volumes (they were read as five more scans per case, and the real scans went to new folders
    named after their paths, past the existing-output check)."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for k in (0, 1):
        shutil.copy(phantom_folder / f"case{k}.nii.gz", cases / f"case{k}.nii.gz")
    argv = ["predict", str(cases / "**" / "*.nii.gz"), "-c", str(tiny_checkpoint), "-o", str(cases), "-q"]
    assert cli.main(argv) == 0
    first = {p: p.read_bytes() for p in sorted(cases.rglob("*.nii.gz"))}
    assert sorted(p.name for p in cases.iterdir()) == ["case0", "case0.nii.gz", "case1", "case1.nii.gz"]
    capsys.readouterr()
    assert cli.main(argv) == 2  # the same two volumes, whose outputs exist
    err = capsys.readouterr().err
    assert "10 file(s) under" in err and "left out" in err and "exists already" in err, err
    assert {p: p.read_bytes() for p in sorted(cases.rglob("*.nii.gz"))} == first
    assert cli.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in cases.iterdir()) == ["case0", "case0.nii.gz", "case1", "case1.nii.gz"]
    assert sorted(cases.rglob("*.nii.gz")) == list(first)


def test_many_refuses_an_output_that_is_another_volumes_input(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """An output that is, by a hard link, another input of the batch must not overwrite that input."""
    scans = tmp_path / "scans"
    (tmp_path / "out" / "case0").mkdir(parents=True)
    scans.mkdir()
    shutil.copy(phantom_folder / "case0.nii.gz", scans / "case0.nii.gz")
    shutil.copy(phantom_folder / "case1.nii.gz", scans / "other.nii.gz")
    (tmp_path / "out" / "case0" / "main.nii.gz").hardlink_to(scans / "other.nii.gz")
    before = (scans / "other.nii.gz").read_bytes()
    out = tmp_path / "out"
    argv = ["predict", str(scans), "-c", str(tiny_checkpoint), "-o", str(out), "--overwrite", "-q"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an input of this batch" in err[0] and "main.nii.gz" in err[0], err
    assert (scans / "other.nii.gz").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0"]  # nothing was made


def _square(x: int) -> int:
    if x < 0:
        raise APLError("negative")
    print(f"squared {x}")
    return x * x


def test_many_without_distributed_is_one_line_and_leaves_nothing(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """An install that lacks dask.distributed (e.g. --no-deps) gets exit 2 and one line, not a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    out = tmp_path / "out"
    rc = cli.main(["predict", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(out), "-q"])
    out_text, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err and out_text == ""  # no "N volumes on ..." before it
    assert "needs dask.distributed" in err and "pip install distributed" in err
    assert not out.exists()  # the folders made for the volumes are removed again


def test_run_many_reports_failures_per_item() -> None:
    """Failures are per item; a local cluster starts without dask's warning when port 8787 is taken."""
    import socket
    import warnings

    seen = []
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # already held by another program: just as good
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        results = run_many(_square, [2, -1, 3], workers=1, on_result=seen.append)
    assert not [str(w.message) for w in caught if "already in use" in str(w.message)]
    assert [r.value for r in results] == [4, None, 9]
    assert results[1].error == "negative" and not results[1].ok
    assert results[0].output.strip() == "squared 2" and len(seen) == 3


def _slow_or_fast(arg: tuple[str, int]) -> int:
    """Task for the stop test: kind 0 returns at once; kind 1 works for up to 60 s in Python."""
    import time

    marker, kind = Path(arg[0]), arg[1]
    if kind == 0:
        return 0
    marker.write_text("started")
    try:
        for _ in range(1200):
            time.sleep(0.05)
    except BaseException as exc:
        marker.write_text(f"stopped by {type(exc).__name__}")
        raise
    marker.write_text("finished")
    return 0


def test_ctrl_c_stops_the_tasks_running_on_a_remote_cluster(tmp_path: Path) -> None:
    """With --scheduler, Ctrl-C makes the task running on a worker stop (its clean-up runs) and the
    queued one never start, instead of leaving them to finish and write after the command has ended."""
    import time

    from distributed import LocalCluster

    markers = [tmp_path / "a.txt", tmp_path / "b.txt"]
    results = []

    def interrupt_once_running(res) -> None:
        results.append(res)
        deadline = time.monotonic() + 30
        while not any(m.exists() for m in markers) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt  # as Ctrl-C in the client while a slow task runs

    warnings: list[str] = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run_many(
                _slow_or_fast,
                [(str(tmp_path / "fast.txt"), 0), (str(markers[0]), 1), (str(markers[1]), 1)],
                scheduler=cluster.scheduler_address,
                on_result=interrupt_once_running,
                warn=warnings.append,
            )
        stopped_after = time.monotonic() - t0
        time.sleep(1.0)  # a queued task that started now would leave its marker
    assert len(results) == 1 and results[0].value == 0
    texts = sorted(m.read_text() for m in markers if m.exists())
    assert texts == ["stopped by TaskStopped"]  # the running one stopped; the queued one never began
    assert stopped_after < 30 and warnings == []


@pytest.mark.parametrize("greeting", [None, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"])
def test_a_port_that_is_not_a_dask_scheduler_is_one_line_and_bounded(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch, greeting
) -> None:
    """A port that accepts the connection and then stays silent (a dashboard or web server waiting for
    a request) held the client for ever; one that greets first (SSH) was read as a message length and
    reported as out of memory. Both are now the one-line 'cannot reach', before any folder is made."""
    import socket
    import threading
    import time

    from napari_apl.core import batch

    monkeypatch.setattr(batch, "SCHEDULER_TIMEOUT_S", 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                held.append(conn)
                if greeting:
                    conn.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    out = tmp_path / "out"
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    argv = ["predict", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(out), "-q"]
    t0 = time.monotonic()
    try:
        rc = cli.main([*argv, "--scheduler", address, "--workers", "3"])
    finally:
        server.close()
        for conn in held:
            conn.close()
    took = time.monotonic() - t0
    out_text, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and took < 20, took
    assert lines[0] == "note: --workers sizes a local cluster: the scheduler's own workers run this batch"
    assert len(lines) == 2 and "cannot reach the dask scheduler at " + address in lines[1], lines
    assert "memory" not in lines[1] and out_text == "" and not out.exists()


def test_a_device_name_no_machine_has_is_refused_once_before_a_remote_batch(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    argv = ["predict", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(tmp_path / "o"), "-q"]
    assert cli.main([*argv, "--scheduler", "tcp://127.0.0.1:9", "--device", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'bogus'" in err[0]


def test_no_more_local_workers_than_volumes(phantom_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """--workers 12 for three volumes started twelve processes, nine of them idle (and slower)."""
    from napari_apl.core import batch

    seen = []

    def fake_run_many(fn, items, *, scheduler=None, workers=2, **kw):
        seen.append(workers)
        return []

    monkeypatch.setattr(batch, "run_many", fake_run_many)
    args = cli.build_parser().parse_args(
        ["predict", str(phantom_folder), "-c", "x.pt", "-o", str(tmp_path / "o"), "--workers", "12"]
    )
    batch.run_command_many(lambda a: 0, args, outputs=["main.nii.gz"], echo=lambda t: None)
    assert seen == [3]


def _labels_file(folder: Path, name: str, seed: int = 0) -> Path:
    """A phantom's label volume (uint8, organs 0..4) saved as ``folder / name``."""
    from napari_apl.core.phantom import write_phantom

    work = folder.parent / f"phantom_for_{name}"
    _, labels = write_phantom(work, "ct", seed, shape=TINY_SHAPE, spacing=TINY_SPACING)
    return Path(shutil.move(str(labels), folder / name))


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Each file of ``folder``: its modification time (ns) and its bytes."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_skip_done_resumes_a_batch_and_label_files_are_left_out(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--skip-done leaves out a volume whose folder holds all five maps (its files untouched), runs the
    others, refuses a folder holding only some of them without --overwrite (saying so), and exits 0
    without a cluster once every volume is done. A label file the folder holds is left out, named."""
    from napari_apl.core import batch

    scans = tmp_path / "scans"
    scans.mkdir()
    for k in range(3):
        shutil.copy(phantom_folder / f"case{k}.nii.gz", scans / f"case{k}.nii.gz")
    _labels_file(scans, "case0_labels.nii.gz")
    ckpt, out = str(tiny_checkpoint), tmp_path / "out"
    out.mkdir()
    _one_volume(["predict", str(scans / "case0.nii.gz"), "-c", ckpt, "-o", str(out / "case0"), "-q"])
    done_before = _snapshot(out / "case0")
    (out / "case1").mkdir()
    (out / "case1" / "main.nii.gz").write_bytes(b"old")  # an interrupted run's folder: one map of five
    argv = ["predict", str(scans), "-c", ckpt, "-o", str(out), "-q", "--skip-done", "--workers", "2"]
    capsys.readouterr()

    assert cli.main(argv) == 2  # the partial folder needs --overwrite (refused before any cluster)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("napari-apl predict: error: "), err
    assert f"{out / 'case1'} holds 1 of the 5 outputs" in err[-1] and "add --overwrite" in err[-1], err
    assert (out / "case1" / "main.nii.gz").read_bytes() == b"old" and not (out / "case2").exists()

    assert cli.main([*argv, "--overwrite"]) == 0
    text, err = capsys.readouterr()
    assert (
        "note: 1 file looks like a label volume (few non-negative integer values), not an image: "
        "left out: case0_labels.nii.gz"
    ) in err, err
    assert f"note: 1 of 3 volumes already have all their outputs in {out}/<volume>/: skipped" in err, err
    assert "2 volumes on a local cluster" in text and "2 of 2 volumes done" in text, text
    assert _snapshot(out / "case0") == done_before  # the done volume was not redone
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case1", "case2"]  # no case0_labels
    for k in (1, 2):
        assert sorted(p.name for p in (out / f"case{k}").iterdir()) == sorted(f"{m}.nii.gz" for m in MAPS)
    assert (out / "case1" / "main.nii.gz").read_bytes() != b"old"

    monkeypatch.setattr(batch, "cluster_client", lambda *a, **k: pytest.fail("a cluster was started"))
    before = {k: _snapshot(out / f"case{k}") for k in range(3)}
    assert cli.main(argv) == 0
    text, _ = capsys.readouterr()
    assert f"all 3 volumes already have all their outputs in {out}/<volume>/: nothing to run" in text
    assert {k: _snapshot(out / f"case{k}") for k in range(3)} == before


def test_a_batch_of_only_label_volumes_is_one_line_before_any_cluster(
    tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from napari_apl.core import batch

    monkeypatch.setattr(batch, "cluster_client", lambda *a, **k: pytest.fail("a cluster was started"))
    segs = tmp_path / "segmentations"
    segs.mkdir()
    _labels_file(segs, "liver.nii.gz", seed=0)
    _labels_file(segs, "spleen.nii.gz", seed=1)
    out = tmp_path / "out"
    rc = cli.main(["predict", str(segs / "*.nii.gz"), "-c", str(tiny_checkpoint), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 2, err
    assert err[0].endswith("not images: left out: liver.nii.gz, spleen.nii.gz"), err
    assert "names only label volumes" in err[1] and "give the images" in err[1], err
    assert not out.exists()


def test_skip_done_still_checks_the_outputs_of_the_volumes_that_run(
    phantom_folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """An output of a volume that runs is still checked with --skip-done --overwrite: here one that is,
    by a hard link, another input of the batch (its folder is not complete: it is not skipped)."""
    from napari_apl.core import batch

    monkeypatch.setattr(batch, "run_many", lambda *a, **k: pytest.fail("a cluster was started"))
    monkeypatch.setattr(cli, "_check_shared_inputs", lambda args: None)
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(phantom_folder / "case0.nii.gz", scans / "case0.nii.gz")
    shutil.copy(phantom_folder / "case1.nii.gz", scans / "case1.nii.gz")
    (out / "case0").mkdir(parents=True)
    (out / "case0" / "main.nii.gz").hardlink_to(scans / "case1.nii.gz")
    before = (scans / "case1.nii.gz").read_bytes()
    argv = ["predict", str(scans), "-c", "model.pt", "-o", str(out), "-q", "--skip-done", "--overwrite"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an input of this batch" in err[0], err
    assert (scans / "case1.nii.gz").read_bytes() == before and not (out / "case1").exists()


def test_the_real_scans_and_their_label_files_are_told_apart(data_dir: Path) -> None:
    """On every file of the real data (CHAOS MRI stored as floats, TotalSegmentator CT and MRI), a glob
    over images and labels together keeps exactly the scans: the probe reads a few slices of each."""
    files = sorted([*data_dir.glob("chaos_t2/*.nii.gz"), *data_dir.glob("totalseg/*.nii.gz")])
    if len(files) < 4:
        pytest.skip(f"the real scans are not under {data_dir}")
    labels = set(label_volumes(files))
    scans = [f for f in files if f not in labels]
    assert labels and scans
    assert all(f.name.startswith("label_") or f.name.endswith("_labels.nii.gz") for f in labels), labels
    assert all(f.name.startswith("image_") or f.name in ("ct_sm.nii.gz", "mr_sm.nii.gz") for f in scans), (
        scans
    )


def test_an_interrupted_batch_removes_the_outputs_it_half_published(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A worker ended between two of a volume's final renames left some of its maps published: a folder
    --skip-done then refused to resume. After an interrupted run the client removes, for each unfinished
    volume, the outputs this run wrote into a folder that holds only some of them; a folder holding all of
    them, files that were there before the run and other files stay."""
    from napari_apl.core import batch

    scans = tmp_path / "scans"
    scans.mkdir()
    for k in range(3):
        shutil.copy(phantom_folder / f"case{k}.nii.gz", scans / f"case{k}.nii.gz")
    out = tmp_path / "out"
    (out / "case2").mkdir(parents=True)
    (out / "case2" / "main.nii.gz").write_bytes(b"before the run")  # replaced only with --overwrite
    (out / "case2" / "notes.txt").write_text("mine")

    def interrupted(command, items, **kwargs):
        """Publish case0 partly, case1 wholly and case2 partly, then Ctrl-C before any result came back."""
        for one in items:
            folder, name = Path(one.out_dir), Path(one.out_dir).name
            maps = {"case0": MAPS[:2], "case1": MAPS, "case2": MAPS[1:3]}[name]
            for m in maps:
                (folder / f"{m}.nii.gz").write_bytes(b"this run")
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_many", interrupted)
    argv = ["predict", str(scans), "-c", str(tiny_checkpoint), "-o", str(out), "-q", "--overwrite"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert not (out / "case0").exists()  # its two maps removed, then the folder this run made
    assert sorted(p.name for p in (out / "case1").iterdir()) == sorted(f"{m}.nii.gz" for m in MAPS)
    assert sorted(p.name for p in (out / "case2").iterdir()) == ["main.nii.gz", "notes.txt"]
    assert (out / "case2" / "main.nii.gz").read_bytes() == b"before the run"
    assert f"removed {out / 'case0' / 'main.nii.gz'}: its volume did not finish" in err, err
    assert "not finished: case0, case1, case2" in err, err


def _reporting(steps: int) -> int:
    """Task for the progress test: reports each of ``steps`` steps 50 ms apart, then waits for the events
    to reach the client before it returns."""
    import time

    from napari_apl.core.batch import report_progress

    for k in range(1, steps + 1):
        report_progress("count", k, steps)
        time.sleep(0.05)
    time.sleep(1.0)
    return steps


def test_tasks_report_their_progress_to_the_client_throttled() -> None:
    """What a task says through report_progress reaches run_many's on_progress with the task's index: its
    first and last steps always, the ones between at most once a second."""
    seen: list[tuple[int, str, int, int]] = []
    results = run_many(_reporting, [4, 2], workers=1, on_progress=lambda *a: seen.append(a))
    assert [r.value for r in results] == [4, 2]
    assert sorted(seen) == [(0, "count", 1, 4), (0, "count", 4, 4), (1, "count", 1, 2), (1, "count", 2, 2)]
    from napari_apl.core.batch import report_progress

    report_progress("outside a task", 1, 2)  # does nothing (no batch), and raises nothing


def test_the_batch_line_shows_the_running_volumes_progress(
    phantom_folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The client's line counts the volumes done and names how far the running ones are (a step of a
    volume already done is dropped); with -q there is no line. The one-volume commands report their bars'
    counts (predict: slices) through report_progress."""
    from napari_apl.core import batch
    from napari_apl.core.batch import TaskResult

    def fake_run_many(command, items, *, on_result, on_progress, **kwargs):
        assert all(one.labels_checked for one in items)  # probed by the client: not again in the worker
        on_progress(0, "refine (apl)", 5, 10)
        on_progress(1, "refine (apl)", 7, 10)
        on_result(TaskResult(item=items[0], value=0))
        on_progress(0, "refine (apl)", 10, 10)  # late: case0 is done
        on_result(TaskResult(item=items[1], value=0))
        return [TaskResult(item=one, value=0) for one in items]

    monkeypatch.setattr(batch, "run_many", fake_run_many)
    argv = ["refine", str(phantom_folder), "-c", str(tiny_checkpoint), "-o", str(tmp_path / "a")]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "case0: refine (apl) 5/10" in err and "case1: refine (apl) 7/10" in err, err
    assert "case0: refine (apl) 10/10" not in err and "volumes" in err
    assert cli.main([*argv[:-1], str(tmp_path / "b"), "-q"]) == 0
    assert "volumes:" not in capsys.readouterr().err

    got: list[tuple[str, int, int]] = []
    token = batch._PROGRESS.set(lambda *a: got.append(a))
    try:
        image = str(phantom_folder / "case0.nii.gz")
        assert (
            cli.main(["predict", image, "-c", str(tiny_checkpoint), "-o", str(tmp_path / "one"), "-q"]) == 0
        )
    finally:
        batch._PROGRESS.reset(token)
    slices = nib.load(image).shape[2]
    assert got and got[-1] == ("predict", slices, slices) and all(t == slices for _, _, t in got)
