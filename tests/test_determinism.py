"""Determinism (issue #6, item 6): same inputs, checkpoint and seed give identical masks on CPU.

Checked in-process (predict twice with torch's default thread count; predict and refine twice with
one thread, the setting of these tests on 2 shared cores) and across processes (the CLI run in this
process and in a fresh ``python -m napari_apl.cli``): the written NIfTI files are byte-identical, the
refined weights are equal and the loss history matches. A different seed must give a different
refinement (the seed is really used).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import write_ct_phantom, write_tiny_checkpoint

from napari_apl.cli import MAP_DTYPES, main
from napari_apl.core.checkpoint import load_checkpoint
from napari_apl.core.infer import predict_volume
from napari_apl.core.refine import RefineConfig, refine
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import load_volume

SHAPE = (48, 48, 8)
SPACING = (5.0, 5.0, 8.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CT phantom on disk and a tiny checkpoint (16 x 16 model grid)."""
    folder = tmp_path_factory.mktemp("det")
    img_path = write_ct_phantom(folder / "ct.nii.gz", 11, SHAPE, SPACING)
    ck = write_tiny_checkpoint(folder / "source.pt", seed=1)
    model, meta = load_checkpoint(ck)
    return img_path, ck, model, meta, load_volume(img_path)


@pytest.fixture
def one_thread():
    """One torch intra-op thread (2 shared CPU cores: more threads only spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _refine(model, meta, volume, seed: int):
    cfg = RefineConfig(iterations=4, batch_size=2, device="cpu", lr=1e-3, seed=seed, guard_every=2)
    return run_generator(refine(model, meta, volume, cfg))


def _same_prediction(a, b) -> None:
    for name, arr in a.as_dict().items():
        assert np.array_equal(arr, b.as_dict()[name]), name


def test_predict_repeatable_with_default_threads(setup):
    _, _, model, meta, volume = setup
    _same_prediction(
        predict_volume(model, meta, volume, device="cpu"), predict_volume(model, meta, volume, device="cpu")
    )


def test_predict_and_refine_repeatable(setup, one_thread):
    _, _, model, meta, volume = setup
    _same_prediction(
        predict_volume(model, meta, volume, device="cpu"), predict_volume(model, meta, volume, device="cpu")
    )
    r1 = _refine(model, meta, volume, seed=3)
    r2 = _refine(model, meta, volume, seed=3)
    assert np.array_equal(r1.pseudo, r2.pseudo)
    for k, v in r1.model.state_dict().items():
        assert torch.equal(v, r2.model.state_dict()[k]), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in r1.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in r2.history]
    _same_prediction(
        predict_volume(r1.model, meta, volume, device="cpu"),
        predict_volume(r2.model, meta, volume, device="cpu"),
    )
    r3 = _refine(model, meta, volume, seed=4)
    assert any(not torch.equal(v, r3.model.state_dict()[k]) for k, v in r1.model.state_dict().items())


def _refine_argv(img: Path, ck: Path, out: Path) -> list[str]:
    return ["refine", str(img), "-c", str(ck), "-o", str(out), "-n", "5", "--batch-size", "2", "--seed", "7"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


def test_cli_outputs_identical_across_runs_and_processes(setup, tmp_path):
    img_path, ck, *_ = setup
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [tmp_path / "in-process-1", tmp_path / "in-process-2"]
        for out in runs:
            assert main([*_refine_argv(img_path, ck, out), "-q", "--device", "cpu"]) == 0
            assert (
                main(["predict", str(img_path), "-c", str(ck), "-o", str(out / "p"), "-q", "--device", "cpu"])
                == 0
            )
    finally:
        torch.set_num_threads(before)
    fresh = tmp_path / "fresh-process"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="12345")
    res = subprocess.run(
        [sys.executable, "-m", "napari_apl.cli", *_refine_argv(img_path, ck, fresh), "-q", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    runs.append(fresh)
    first = runs[0]
    for out in runs[1:]:
        for name in MAP_DTYPES:
            assert (out / f"{name}.nii.gz").read_bytes() == (first / f"{name}.nii.gz").read_bytes(), (
                out,
                name,
            )
        a, b = _tensors(first / "refined.pt"), _tensors(out / "refined.pt")
        assert all(torch.equal(v, b[k]) for k, v in a.items())
        log_a, log_b = (json.loads((d / "log.json").read_text()) for d in (first, out))
        drop = ("seconds",)
        assert [{k: v for k, v in h.items() if k not in drop} for h in log_a["history"]] == [
            {k: v for k, v in h.items() if k not in drop} for h in log_b["history"]
        ]
    for name in MAP_DTYPES:
        assert (runs[1] / "p" / f"{name}.nii.gz").read_bytes() == (
            first / "p" / f"{name}.nii.gz"
        ).read_bytes()


def test_a_large_seed_leaves_child_pythons_startable(monkeypatch):
    """A seed of 2**32 or more went to PYTHONHASHSEED as given, and every Python started afterwards (a
    spawn worker, pip) died with "PYTHONHASHSEED must be ... [0; 4294967295]"."""
    import os
    import subprocess
    import sys

    from napari_apl.core.utils import seed_everything

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed_everything(2**40 + 5)
    assert os.environ["PYTHONHASHSEED"] == "5"
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=60).returncode == 0
