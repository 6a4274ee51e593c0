"""The ``napari-apl`` command line: the phantom -> predict -> refine -> evaluate chain and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _tiny import write_tiny_checkpoint

from napari_apl.cli import main
from napari_apl.core.labels import CLASS_NAMES

MAPS = ("main", "aux", "pseudo_label", "confidence", "consistency")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A small untrained unet-dual checkpoint on a coarse grid (fast on CPU)."""
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    return write_tiny_checkpoint(
        path,
        0,
        base=8,
        input_size=(64, 64),
        spacing=(5.0, 5.0),
        normalization={"kind": "percentile", "lower": 0.5, "upper": 99.5},
    )


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    """A small LPS CT phantom written by the CLI itself."""
    out = tmp_path_factory.mktemp("ph") / "ct"
    rc = main(["phantom", "--modality", "ct", "--seed", "1", "--out-dir", str(out), "--orientation", "LPS",
               "--shape", "56", "48", "8", "--spacing", "4", "4", "8"])  # fmt: skip
    assert rc == 0
    return out


def test_chain_phantom_predict_refine_evaluate(tmp_path, tiny_ckpt, phantom_dir, capsys):
    image = phantom_dir / "image.nii.gz"
    ref = nib.load(image)
    pred_dir = tmp_path / "pred"
    assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(pred_dir), "-q"]) == 0
    for name in MAPS:
        img = nib.load(pred_dir / f"{name}.nii.gz")
        assert img.shape == ref.shape, name
        assert np.allclose(img.affine, ref.affine), name
        assert img.header["sform_code"] == ref.header["sform_code"]
    conf = np.asarray(nib.load(pred_dir / "confidence.nii.gz").dataobj)
    assert 0 <= conf.min() and conf.max() <= 1
    ref_dir = tmp_path / "ref"
    args = [
        "refine",
        str(image),
        "-c",
        str(tiny_ckpt),
        "-o",
        str(ref_dir),
        "-n",
        "3",
        "--batch-size",
        "2",
        "--teacher-precision",
        "fp32",
        "--bn-mix",
        "0.5",
        "--class-balance-power",
        "0.25",
        "--augment",
        "domain",
        "--augment-geometry",
        "--largest-component",
        "-q",
    ]
    assert main(args) == 0
    for name in (*MAPS, "refined"):
        suffix = ".pt" if name == "refined" else ".nii.gz"
        assert (ref_dir / f"{name}{suffix}").exists(), name
    log = json.loads((ref_dir / "log.json").read_text())
    assert len(log["history"]) == 3 and log["config"]["method"] == "apl"
    assert log["config"]["teacher_bf16"] is False
    assert log["config"]["channels_last"] is True
    assert log["config"]["bn_mix"] == 0.5 and log["largest_component"] is True
    assert log["config"]["class_balance_power"] == 0.25
    assert log["config"]["augment"] == "domain" and log["config"]["augment_geometry"] is True
    cleaned = np.asarray(nib.load(ref_dir / "pseudo_label.nii.gz").dataobj)
    assert all(_pieces(cleaned == c) <= 1 for c in range(1, 5))
    assert nib.load(ref_dir / "pseudo_label.nii.gz").shape == ref.shape
    # the refined checkpoint is accepted by info and predict
    capsys.readouterr()
    assert main(["info", str(ref_dir / "refined.pt")]) == 0
    assert "unet-dual" in capsys.readouterr().out
    assert (
        main(["predict", str(image), "-c", str(ref_dir / "refined.pt"), "-o", str(tmp_path / "p2"), "-q"])
        == 0
    )
    out_json = tmp_path / "scores.json"
    gt = str(phantom_dir / "labels.nii.gz")
    rc = main(
        ["evaluate", "--pred", str(ref_dir / "pseudo_label.nii.gz"), "--gt", gt, "--json", str(out_json)]
    )
    assert rc == 0
    scores = json.loads(out_json.read_text())
    assert set(scores["dice"]) == set(CLASS_NAMES[1:])
    # a perfect prediction scores 100 % Dice and 0 mm ASSD
    capsys.readouterr()
    lab = str(phantom_dir / "labels.nii.gz")
    assert main(["evaluate", "--pred", lab, "--gt", lab]) == 0
    text = capsys.readouterr().out
    assert "100.00" in text and "0.00" in text


def _pieces(mask: np.ndarray) -> int:
    """Number of 26-connected pieces of a boolean mask."""
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]


def test_predict_largest_component(tmp_path, phantom_dir, capsys):
    """--largest-component keeps each organ's largest piece of every mask and leaves the maps alone."""
    from scipy import ndimage

    from napari_apl._sample_data import demo_checkpoint_path

    image, ck = str(phantom_dir / "image.nii.gz"), str(demo_checkpoint_path())
    assert main(["predict", image, "-c", ck, "-o", str(tmp_path / "plain"), "-q"]) == 0
    capsys.readouterr()
    assert main(["predict", image, "-c", ck, "-o", str(tmp_path / "clean"), "-q", "--largest-component"]) == 0
    assert "largest component: pseudo_label: removed" in capsys.readouterr().out
    read = lambda d, n: np.asarray(nib.load(tmp_path / d / f"{n}.nii.gz").dataobj)  # noqa: E731
    fragmented = 0
    for name in ("main", "aux", "pseudo_label"):
        plain, clean = read("plain", name), read("clean", name)
        kept = clean != 0
        np.testing.assert_array_equal(clean[kept], plain[kept])  # nothing is relabelled, only removed
        for c in range(1, 5):
            pieces, n = ndimage.label(plain == c, structure=np.ones((3, 3, 3)))
            fragmented += n > 1
            biggest = np.bincount(pieces.ravel())[1:].max() if n else 0
            assert _pieces(clean == c) == min(n, 1) and (clean == c).sum() == biggest, (name, c)
    assert fragmented > 0  # the demo model's kidney masks on this small phantom have islands
    for name in ("confidence", "consistency"):
        np.testing.assert_array_equal(read("clean", name), read("plain", name))


def test_outputs_are_not_overwritten_without_flag(tmp_path, tiny_ckpt, phantom_dir, capsys):
    image = phantom_dir / "image.nii.gz"
    out = tmp_path / "o"
    assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(out), "-q"]) == 0
    before = (out / "main.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "main.nii.gz").stat().st_mtime_ns == before
    assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(out), "-q", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "case",
    ["missing_image", "not_nifti", "bad_ckpt", "missing_parent", "bad_method"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_ckpt, phantom_dir, capsys, case):
    image = str(phantom_dir / "image.nii.gz")
    ck = str(tiny_ckpt)
    out = tmp_path / "out"
    if case == "missing_image":
        image = str(tmp_path / "nope.nii.gz")
    elif case == "not_nifti":
        p = tmp_path / "fake.nii"
        p.write_text("hello")
        image = str(p)
    elif case == "bad_ckpt":
        p = tmp_path / "bad.pt"
        p.write_bytes(b"\x00" * 100)
        ck = str(p)
    elif case == "missing_parent":
        out = tmp_path / "no" / "such" / "dir"
    cmd = "refine" if case == "bad_method" else "predict"
    args = [cmd, image, "-c", ck, "-o", str(out), "-q"]
    if case == "bad_method":
        args += ["--method", "magic", "-n", "1"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if case != "missing_parent":
        assert not any(out.glob("*.nii.gz")) if out.exists() else True


def test_console_script_help_runs():
    res = subprocess.run(
        [sys.executable, "-m", "napari_apl.cli", "refine", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--method" in res.stdout


def test_refine_reports_organ_size_change(tmp_path, phantom_dir, capsys):
    """refine prints and logs each organ's size in the refined model against the model it started from."""
    from napari_apl._sample_data import demo_checkpoint_path

    image, ck = str(phantom_dir / "image.nii.gz"), str(demo_checkpoint_path())
    base = ["refine", image, "-c", ck, "--batch-size", "2", "--teacher-precision", "fp32"]
    # no iterations and the source's batch-norm statistics: the returned model is the loaded one
    assert main([*base, "-o", str(tmp_path / "same"), "-n", "0", "--bn", "frozen"]) == 0
    out = capsys.readouterr().out
    log = json.loads((tmp_path / "same" / "log.json").read_text())
    start, refined = log["organ_voxels"]["start"], log["organ_voxels"]["refined"]
    assert start == refined and len(start) == 5 and min(start[1:]) > 0  # the demo model finds every organ
    assert "organ size vs the starting model: liver +0%, right kidney +0%, left kidney +0%, spleen +0%" in out
    # a real run changes them, and the total stays the number of voxels on the model grid
    assert main([*base, "-o", str(tmp_path / "moved"), "-n", "4", "--lr", "1e-3", "-q"]) == 0
    moved = json.loads((tmp_path / "moved" / "log.json").read_text())["organ_voxels"]
    assert moved["start"] == start and sum(moved["refined"]) == sum(start) and moved["refined"] != start
    assert "organ size vs the starting model: liver " in capsys.readouterr().out
