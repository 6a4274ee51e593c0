"""Cancellation (issue #6, item 4): stopping a refinement at random points leaves everything usable.

Three ways of stopping, each at random moments (during set-up, mid-loop, or while paused):

* core: ``refine`` driven in a worker thread, as the viewer does, and ``RefineControl.stop()`` called
  from the main thread;
* CLI in-process: ``napari_apl.cli.main(["refine", ...])`` with a real SIGINT delivered to this
  process while the CLI's Ctrl-C handler is installed (first Ctrl-C = stop cleanly and still write);
* CLI process: ``python -m napari_apl.cli refine`` interrupted with SIGINT.

After each stop: the returned / written model has finite weights, loads with ``load_checkpoint`` and
predicts (the written main map is exactly that model's prediction), the user's corrections array and
input checkpoint are unchanged, and no thread is left running. Trial counts (defaults 20 core + 10 CLI
in-process + 2 CLI processes) scale with ``NAPARI_APL_CANCEL_TRIALS`` (a multiplier, e.g. 5), and
``NAPARI_APL_CANCEL_SEED`` picks the stop times.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _tiny import write_ct_phantom, write_tiny_checkpoint

from napari_apl.cli import main
from napari_apl.core.checkpoint import load_checkpoint, save_checkpoint
from napari_apl.core.infer import predict_volume
from napari_apl.core.refine import RefineConfig, RefineControl, RefineResult, refine
from napari_apl.core.volume import load_volume

SCALE = max(1, int(os.environ.get("NAPARI_APL_CANCEL_TRIALS", "1")))
SEED = int(os.environ.get("NAPARI_APL_CANCEL_SEED", "0"))
CORE_TRIALS, CLI_TRIALS, PROCESS_TRIALS = 20 * SCALE, 10 * SCALE, 2 * SCALE
SHAPE = (48, 48, 8)
SPACING = (5.0, 5.0, 8.0)
ENDLESS = 1_000_000  # iterations: only a stop ends these refinements


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CT phantom on disk, a tiny checkpoint (16 x 16 model grid) and a corrections volume."""
    folder = tmp_path_factory.mktemp("cancel")
    img_path = write_ct_phantom(folder / "ct.nii.gz", 4, SHAPE, SPACING)
    ck = write_tiny_checkpoint(folder / "source.pt", seed=0)
    model, meta = load_checkpoint(ck)
    volume = load_volume(img_path)
    corrections = np.full(volume.shape, -1, np.int16)
    corrections[10:30, 15:25, 2:6] = 1
    corrections[35:40, 5:12, 3] = 0
    return img_path, ck, model, meta, volume, corrections


def _finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite."""
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def _check_model(model, meta, volume, folder: Path, name: str) -> None:
    """Finite weights; it saves, loads back identical and predicts the same masks."""
    assert _finite(model)
    path = save_checkpoint(folder / f"{name}.pt", model, meta)
    loaded, _ = load_checkpoint(path)
    a = predict_volume(model, meta, volume, device="cpu")
    b = predict_volume(loaded, meta, volume, device="cpu")
    assert (
        a.main.shape == volume.shape and np.array_equal(a.main, b.main) and np.array_equal(a.pseudo, b.pseudo)
    )


def _threads() -> set[threading.Thread]:
    """Live threads, except tqdm's shared progress-bar monitor (a daemon tqdm keeps between bars)."""
    return {t for t in threading.enumerate() if type(t).__name__ != "TMonitor"}


def _cfg(seed: int) -> RefineConfig:
    """A refinement that only ends when it is stopped."""
    return RefineConfig(iterations=ENDLESS, batch_size=1, device="cpu", lr=1e-3, seed=seed, guard_every=7)


def test_stop_core_refinement_from_another_thread(setup, tmp_path):
    _, _, model, meta, volume, corrections = setup
    original = {k: v.clone() for k, v in model.state_dict().items()}
    corr_before = corrections.copy()
    threads_before = _threads()
    rng = random.Random(f"core-{SEED}")
    done_at = []
    for trial in range(CORE_TRIALS):
        control = RefineControl()
        box: dict[str, object] = {"events": 0}

        def work(control: RefineControl = control, box: dict = box, trial: int = trial) -> None:
            gen = refine(model, meta, volume, _cfg(trial), control=control, corrections=corrections)
            try:
                while True:
                    next(gen)
                    box["events"] = int(box["events"]) + 1  # type: ignore[call-overload]
            except StopIteration as stop:
                box["result"] = stop.value
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=work, name=f"refine-trial-{trial}")
        mode = trial % 4  # 0/1: stop mid-run, 2: pause first then stop, 3: stop very early (set-up)
        worker.start()
        time.sleep(rng.uniform(0.0, 0.02) if mode == 3 else rng.uniform(0.05, 0.6))
        if mode == 2:
            control.pause()
            time.sleep(0.05)
            paused_at = box["events"]
            time.sleep(0.1)
            assert box["events"] in (paused_at, int(paused_at) + 1)  # held after at most one more step
        control.stop()
        worker.join(60)
        assert not worker.is_alive(), "the refinement did not stop"
        assert "error" not in box, box.get("error")
        result = box["result"]
        assert isinstance(result, RefineResult) and result.stopped
        assert result.iterations_done == box["events"] == len(result.history) < ENDLESS
        assert result.pseudo.shape == volume.shape and result.pseudo.dtype == np.uint8
        _check_model(result.model, meta, volume, tmp_path, f"trial{trial}")
        assert np.array_equal(corrections, corr_before), "the corrections array was modified"
        done_at.append(result.iterations_done)
        assert not _threads() - threads_before, "a thread is still running"  # (earlier ones may end)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), f"the caller's model changed: {k}"
    print(f"\ncore stops: {CORE_TRIALS} trials, stopped after {sorted(done_at)} iterations")


class _LateSigint:
    """A SIGINT handler installed around the CLI run: records signals arriving outside the CLI's window."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1


def _sigint_when_running(sentinel: _LateSigint, delay: float, sent: dict) -> None:
    """Wait until the CLI's own Ctrl-C handler is installed, wait ``delay`` s, send SIGINT to this process."""
    t0 = time.monotonic()
    while signal.getsignal(signal.SIGINT) is sentinel:
        if time.monotonic() - t0 > 60:
            return
        time.sleep(0.002)
    time.sleep(delay)
    if signal.getsignal(signal.SIGINT) is not sentinel:
        sent["at"] = time.monotonic() - t0
        os.kill(os.getpid(), signal.SIGINT)


def _check_cli_outputs(out: Path, ck: Path, meta, volume) -> dict:
    """The written refined.pt loads and predicts exactly the written main map; the log says stopped."""
    log = json.loads((out / "log.json").read_text())
    assert log["stopped"] is True and log["iterations_done"] < ENDLESS
    refined, refined_meta = load_checkpoint(out / "refined.pt")
    assert _finite(refined) and refined_meta.provenance["iterations"] == log["iterations_done"]
    pred = predict_volume(refined, meta, volume, device="cpu")
    written = load_volume(out / "main.nii.gz")
    assert np.array_equal(np.asarray(written.data), pred.main), "main.nii.gz is not refined.pt's prediction"
    for name in ("aux", "pseudo_label", "confidence", "consistency"):
        assert load_volume(out / f"{name}.nii.gz").shape == volume.shape
    return log


def _cli_argv(img: Path, ck: Path, out: Path, seed: int, corrections: Path | None = None) -> list[str]:
    argv = ["refine", str(img), "-c", str(ck), "-o", str(out), "-n", str(ENDLESS), "--batch-size", "1"]
    argv += ["--seed", str(seed), "--normalize", "checkpoint", "--device", "cpu"]
    return argv + (["--corrections", str(corrections)] if corrections else [])


def test_sigint_stops_cli_refine_in_process(setup, tmp_path, capsys):
    img_path, ck, _, meta, volume, corrections = setup
    corr_path = tmp_path / "corrections.nii.gz"
    nib.save(
        nib.Nifti1Image(np.where(corrections < 0, 255, corrections).astype(np.uint8), volume.affine),
        corr_path,
    )
    ck_before = (ck.read_bytes(), ck.stat().st_mtime_ns)
    corr_before = corr_path.read_bytes()
    threads_before = _threads()
    rng = random.Random(f"cli-{SEED}")
    sentinel = _LateSigint()
    previous = signal.signal(signal.SIGINT, sentinel)
    stops = []
    try:
        for trial in range(CLI_TRIALS):
            out = tmp_path / f"run{trial}"
            sent: dict[str, float] = {}
            sender = threading.Thread(
                target=_sigint_when_running, args=(sentinel, rng.uniform(0.0, 0.8), sent)
            )
            sender.start()
            rc = main([*_cli_argv(img_path, ck, out, trial, corr_path), "-q"])
            sender.join(10)
            err = capsys.readouterr().err
            assert "at" in sent, "the stop signal was never sent"
            assert rc == 130, err  # interrupted: usable files written, but not every iteration ran
            log = _check_cli_outputs(out, ck, meta, volume)
            stops.append(log["iterations_done"])
            assert not _threads() - threads_before, "a thread is still running"  # (earlier ones may end)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sentinel.count == 0, "a SIGINT arrived outside the CLI's refinement"
    assert (ck.read_bytes(), ck.stat().st_mtime_ns) == ck_before, "the input checkpoint was modified"
    assert corr_path.read_bytes() == corr_before
    print(f"\nCLI in-process SIGINT stops: {CLI_TRIALS} trials, stopped after {sorted(stops)} iterations")


def _progress(chunks: list[bytes]) -> int:
    """Iterations shown by the latest tqdm bar in the captured stderr (-1 before the bar appears)."""
    found = re.findall(rb"refine \(apl\): *\d+%\|[^|]*\| *(\d+)/", b"".join(chunks))
    return int(found[-1]) if found else -1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_stops_cli_refine_process(setup, tmp_path):
    img_path, ck, _, meta, volume, _ = setup
    ck_before = (ck.read_bytes(), ck.stat().st_mtime_ns)
    rng = random.Random(f"process-{SEED}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    stops = []
    for trial in range(PROCESS_TRIALS):
        out = tmp_path / f"proc{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "napari_apl.cli", *_cli_argv(img_path, ck, out, trial)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        chunks: list[bytes] = []
        reader = threading.Thread(
            target=lambda p=proc, c=chunks: c.extend(iter(lambda: p.stderr.read1(4096), b""))
        )
        reader.start()
        t0 = time.monotonic()
        # stop during set-up (right after the progress bar appears) or after a random number of steps
        want = 0 if trial % 2 == 0 else rng.randint(1, 20)
        while _progress(chunks) < want:
            assert proc.poll() is None, b"".join(chunks).decode(errors="replace")
            assert time.monotonic() - t0 < 120, "the refinement never started"
            time.sleep(0.02)
        time.sleep(0.05)  # the Ctrl-C handler is installed just after the bar is drawn
        proc.send_signal(signal.SIGINT)
        stdout = proc.stdout.read().decode()
        rc = proc.wait(120)
        reader.join(10)
        stderr = b"".join(chunks).decode(errors="replace")
        assert rc == 130, stderr  # interrupted: usable files written, but not every iteration ran
        assert "Traceback" not in stderr
        assert "stopping after this step" in stderr + stdout  # tqdm.write prints it on stdout
        assert "wrote" in stdout and "refined.pt" in stdout
        stops.append(_check_cli_outputs(out, ck, meta, volume)["iterations_done"])
    assert (ck.read_bytes(), ck.stat().st_mtime_ns) == ck_before, "the input checkpoint was modified"
    print(f"\nCLI process SIGINT stops: {PROCESS_TRIALS} trials, stopped after {sorted(stops)} iterations")
