"""The ``napari-apl`` command line: the phantom -> predict -> refine -> evaluate chain and its errors."""

from __future__ import annotations

import json
import shutil
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
        "--class-select",
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
    from napari_apl.core.refine import _cpu_has_native_bf16

    native = _cpu_has_native_bf16()  # "auto" precision, said as what it was here
    assert log["config"]["amp"] is None and log["precision"] == ("bf16 autocast" if native else "float32")
    assert log["teacher_precision"] == "float32"  # (--teacher-precision fp32 above)
    assert log["config"]["channels_last"] is True
    assert log["config"]["bn_mix"] == 0.5 and log["largest_component"] is True
    assert log["config"]["class_balance_power"] == 0.25
    assert log["config"]["augment"] == "domain" and log["config"]["augment_geometry"] is True
    assert log["config"]["class_select"] is True
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
    [
        "missing_image",
        "not_nifti",
        "bad_ckpt",
        "missing_parent",
        "bad_method",
        "seven_classes",
        "beyond_float32",
        "model_grid_too_big",
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_ckpt, phantom_dir, capsys, case):
    image = str(phantom_dir / "image.nii.gz")
    ck = str(tiny_ckpt)
    out = tmp_path / "out"
    if case == "seven_classes":  # a valid checkpoint, but not for the five organ labels
        from napari_apl.core.checkpoint import CheckpointMeta, save_checkpoint
        from napari_apl.core.models import build_model

        model = build_model("unet-dual", base=4, num_classes=7)
        meta = CheckpointMeta(
            arch="unet-dual",
            arch_args=dict(model.arch_args),
            class_names=[f"c{i}" for i in range(7)],
            input_size=(64, 64),
            spacing=(5.0, 5.0),
            normalization={"kind": "zscore"},
        )
        ck = str(save_checkpoint(tmp_path / "seven.pt", model, meta))
    elif case == "beyond_float32":  # float64 voxels that overflow float32: was all-background, exit 0
        src = nib.load(image)
        big = np.asarray(src.dataobj).astype(np.float64) * 1e36
        image = str(tmp_path / "big.nii.gz")
        nib.save(nib.Nifti1Image(big, src.affine), image)
        out_extra = ["--normalize", "zscore"]
    elif case == "model_grid_too_big":  # a model spacing of 0.01 mm on a 224 mm scan: 22400 px slices
        fine = write_tiny_checkpoint(tmp_path / "f.pt", 0, input_size=(64, 64), spacing=(0.01, 0.01))
        ck = str(fine)
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
    if case == "beyond_float32":
        args += out_extra
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


def test_refining_a_refined_checkpoint_keeps_its_history(tmp_path, tiny_ckpt, phantom_dir):
    """A refined checkpoint refined again keeps the source's intensity preset as the source's, and the
    first refinement under earlier_refinements."""
    from napari_apl.core.checkpoint import load_checkpoint

    image = str(phantom_dir / "image.nii.gz")
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["refine", image, "--batch-size", "2", "-q"]
    assert main([*base, "-c", str(tiny_ckpt), "-o", str(first), "-n", "2"]) == 0
    assert main([*base, "-c", str(first / "refined.pt"), "-o", str(second), "-n", "1"]) == 0
    _, meta = load_checkpoint(second / "refined.pt")
    prov = meta.provenance
    assert prov["source_normalization"]["kind"] == "percentile"  # the source model's, not the CT window
    assert prov["refined_from"] == "refined.pt" and prov["iterations"] == 1
    [earlier] = prov["earlier_refinements"]
    assert earlier["refined_from"] == tiny_ckpt.name and earlier["iterations"] == 2
    assert earlier["target"] == "image.nii.gz" and earlier["method"] == "apl"


def test_refined_checkpoint_records_the_intensities_it_was_adapted_to(tmp_path, tiny_ckpt, phantom_dir):
    image = str(phantom_dir / "image.nii.gz")  # Hounsfield units: auto picks the CT window
    out = tmp_path / "ref"
    assert (
        main(["refine", image, "-c", str(tiny_ckpt), "-o", str(out), "-n", "1", "--batch-size", "2", "-q"])
        == 0
    )
    from napari_apl.core.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "refined.pt")
    log = json.loads((out / "log.json").read_text())
    assert meta.normalization == log["config"]["normalization"] and meta.normalization["kind"] == "ct_window"
    assert meta.provenance["source_normalization"]["kind"] == "percentile"
    # so predicting with the refined model's own preset gives the maps refine wrote
    pred = tmp_path / "pred"
    argv = [
        "predict",
        image,
        "-c",
        str(out / "refined.pt"),
        "-o",
        str(pred),
        "--normalize",
        "checkpoint",
        "-q",
    ]
    assert main(argv) == 0
    for name in ("main", "aux", "pseudo_label", "confidence", "consistency"):  # (the viewer's export too)
        np.testing.assert_array_equal(
            np.asarray(nib.load(pred / f"{name}.nii.gz").dataobj),
            np.asarray(nib.load(out / f"{name}.nii.gz").dataobj),
        )


def test_refine_writes_the_refined_models_own_pseudo_labels(tmp_path, phantom_dir):
    """refine's pseudo_label is the refined model's merged labels (as the viewer exports them and as
    predict with refined.pt gives them), not the refinement's running ensemble, which differs."""
    from napari_apl._sample_data import demo_checkpoint_path

    image = str(phantom_dir / "image.nii.gz")
    out, pred = tmp_path / "ref", tmp_path / "pred"
    assert main(["refine", image, "-c", str(demo_checkpoint_path()), "-o", str(out), "-n", "4", "-q"]) == 0
    refined = str(out / "refined.pt")
    assert main(["predict", image, "-c", refined, "-o", str(pred), "--normalize", "checkpoint", "-q"]) == 0
    for name in ("main", "aux", "pseudo_label", "confidence", "consistency"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(pred / f"{name}.nii.gz").dataobj),
            np.asarray(nib.load(out / f"{name}.nii.gz").dataobj),
        )


def test_refine_corrections_of_any_integer_type(tmp_path, tiny_ckpt, phantom_dir, capsys):
    image = phantom_dir / "image.nii.gz"
    ref = nib.load(image)
    labels = np.asarray(nib.load(phantom_dir / "labels.nii.gz").dataobj)
    corr = np.full(ref.shape, 255, dtype=np.uint8)  # 255 = not corrected (the default marker)
    corr[:, :, 3] = labels[:, :, 3]
    base = ["refine", str(image), "-c", str(tiny_ckpt), "-n", "1", "--batch-size", "2", "-q"]
    path = tmp_path / "corr_u8.nii.gz"
    nib.save(nib.Nifti1Image(corr, ref.affine), path)
    assert main([*base, "-o", str(tmp_path / "u8"), "--corrections", str(path)]) == 0
    pseudo = np.asarray(nib.load(tmp_path / "u8" / "pseudo_label.nii.gz").dataobj)
    assert pseudo.max() <= 4  # untouched voxels were not read as a label 255 (a uint8 -1)
    np.testing.assert_array_equal(pseudo[:, :, 3], labels[:, :, 3])  # the corrected slice is kept
    # ... also with --largest-component: the clean-up does not remove the user's own voxels, even a
    # painted piece away from the organ's largest one
    island = corr.copy()
    island[1:5, 1:5, 5:8] = 0  # painted background all round ...
    island[2:4, 2:4, 6] = 4  # ... a 4-voxel spleen piece in it ...
    island[10:20, 10:20, 6] = 4  # ... and a larger spleen piece elsewhere
    nib.save(nib.Nifti1Image(island, ref.affine), tmp_path / "island.nii.gz")
    argv = [*base, "-o", str(tmp_path / "lc"), "--corrections", str(tmp_path / "island.nii.gz")]
    assert main([*argv, "--largest-component"]) == 0
    pseudo = np.asarray(nib.load(tmp_path / "lc" / "pseudo_label.nii.gz").dataobj)
    np.testing.assert_array_equal(pseudo[:, :, 3], labels[:, :, 3])
    assert (pseudo[2:4, 2:4, 6] == 4).all()
    capsys.readouterr()
    # a mask on another grid, or with labels the model does not have, is refused with one line
    shifted = ref.affine.copy()
    shifted[:3, 3] += 50.0
    nib.save(nib.Nifti1Image(corr, shifted), tmp_path / "shifted.nii.gz")
    bad = corr.copy()
    bad[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(bad, ref.affine), tmp_path / "nine.nii.gz")
    for name, words in (("shifted.nii.gz", "another affine"), ("nine.nii.gz", "label 9 in --corrections")):
        out = tmp_path / name.split(".")[0]
        assert main([*base, "-o", str(out), "--corrections", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
        assert not out.exists()
    # corrections edited in place (pseudo_label.nii.gz of an earlier run) are an input: refining again
    # into that folder with --overwrite must not replace them
    edited = tmp_path / "u8" / "pseudo_label.nii.gz"
    nib.save(nib.Nifti1Image(corr, ref.affine), edited)
    before = edited.read_bytes()
    argv = [*base, "-o", str(tmp_path / "u8"), "--corrections", str(edited), "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "same file as an input" in err and len(err.splitlines()) == 1
    assert edited.read_bytes() == before


def test_fraction_maps_read_back_within_0_and_1(tmp_path, tiny_ckpt, phantom_dir):
    """The stored float32 scale factor must not turn 255 into a value above 1 for any reader."""
    out = tmp_path / "o"
    image = phantom_dir / "image.nii.gz"
    assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(out), "-q"]) == 0
    for name in ("confidence", "consistency"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert float(np.float32(img.dataobj.slope)) * 255 <= 1.0
        assert img.get_fdata().max() <= 1.0 and np.asarray(img.dataobj).max() <= 1.0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["predict", "IMG", "--batch-size", "0"], "must be 1 or more"),
        (["refine", "IMG", "--seed", "-1"], "must be 0 or more"),
        (["refine", "IMG", "--lr", "0"], "above 0"),
        (["refine", "IMG", "--method", "threshold", "--tau", "5"], "tau"),
        (["predict", "IMG", "--workers", "0"], "must be 1 or more"),
    ],
)
def test_nonsense_numbers_are_refused(tmp_path, tiny_ckpt, phantom_dir, capsys, argv, words):
    argv = [str(phantom_dir / "image.nii.gz") if a == "IMG" else a for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc_info:  # argparse's own errors exit directly
        rc = main([*argv, "-c", str(tiny_ckpt), "-o", str(out), "-q"])
        raise SystemExit(rc)
    assert exc_info.value.code == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_wants_label_volumes_and_writes_strict_json(tmp_path, phantom_dir, capsys):
    image, labels = str(phantom_dir / "image.nii.gz"), str(phantom_dir / "labels.nii.gz")
    assert main(["evaluate", "--pred", labels, "--gt", image]) == 2
    err = capsys.readouterr().err.strip()
    assert "--gt is not a label volume" in err and len(err.splitlines()) == 1
    ref = nib.load(labels)
    other_scheme = np.asarray(ref.dataobj).copy()
    other_scheme[other_scheme == 2] = 6  # e.g. a 13-organ file: a label map, but not of these organs
    other = tmp_path / "other_scheme.nii.gz"
    nib.save(nib.Nifti1Image(other_scheme, ref.affine, ref.header), str(other))
    assert main(["evaluate", "--pred", labels, "--gt", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--gt holds labels 0, 1, 3, 4, 6, not only 0..4" in err and "remap" in err, err
    assert "image instead" not in err and len(err.splitlines()) == 1
    no_spleen = np.asarray(ref.dataobj).copy()
    no_spleen[no_spleen == 4] = 0
    pred = tmp_path / "no_spleen.nii.gz"
    nib.save(nib.Nifti1Image(no_spleen, ref.affine), pred)
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--pred", str(pred), "--gt", labels, "--json", str(out)]) == 0
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text
    scores = json.loads(text)
    assert scores["assd"]["spleen"] == "inf" and scores["dice"]["spleen"] == 0  # as the viewer's report


def test_import_reads_a_unet_width_from_the_file(tmp_path, capsys):
    import torch

    from napari_apl.core.checkpoint import load_checkpoint

    ck = write_tiny_checkpoint(tmp_path / "w6.pt", 0, base=6, input_size=(32, 32), spacing=(8.0, 8.0))
    model, _ = load_checkpoint(ck)
    raw = tmp_path / "raw.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, raw)
    out = tmp_path / "imported.pt"
    argv = ["import", str(raw), "--arch", "unet-dual", "--input-size", "32", "32", "--out", str(out)]
    assert main(argv) == 0
    imported, meta = load_checkpoint(out)
    assert meta.arch_args["base"] == 6
    for a, b in zip(imported.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert main([*argv[:-2], "--input-size", "100000", "100000", "--out", str(tmp_path / "huge.pt")]) == 2
    assert "input_size" in capsys.readouterr().err and not (tmp_path / "huge.pt").exists()
    assert main([*argv[:-2], "--aspp-branches", "2", "--out", str(tmp_path / "b.pt")]) == 2
    assert (
        "--aspp-branches is a deeplabv2 setting" in capsys.readouterr().err
        and not (tmp_path / "b.pt").exists()
    )
    # a file whose channels are the five classes in another order (spleen first) is reordered to
    # napari-apl's labels: the imported model's channel 1 is the file's liver channel (2), and so on
    capsys.readouterr()
    swapped = "background,spleen,liver,Right_Kidney,left kidney"
    assert main([*argv[:-2], "--classes", swapped, "--out", str(tmp_path / "swapped.pt")]) == 0
    assert (
        "reordered the class channels to napari-apl's labels: 0 background (channel 0 of the file), "
        "1 liver (channel 2 of the file)" in capsys.readouterr().out
    )
    reordered, meta = load_checkpoint(tmp_path / "swapped.pt", class_names=CLASS_NAMES)
    assert meta.class_names == list(CLASS_NAMES)
    assert meta.provenance["class_channels_of_the_file"][1] == "spleen"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        for mine, theirs in zip(reordered(x), model.eval()(x), strict=True):
            torch.testing.assert_close(mine, theirs[:, [0, 2, 3, 4, 1]])
    # other classes are refused in one line
    assert main([*argv[:-2], "--classes", "bg,a,b,c,d", "--out", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "are not napari-apl's labels" in err
    assert not (tmp_path / "other.pt").exists()


def test_phantom_refuses_a_shape_that_cannot_fit(tmp_path, capsys):
    argv = [
        "phantom",
        "--modality",
        "ct",
        "--out-dir",
        str(tmp_path / "big"),
        "--shape",
        "4000",
        "4000",
        "4000",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "too large" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_leaves_no_temporary_files(tmp_path, tiny_ckpt):
    import os
    import signal
    import time

    big = tmp_path / "big"
    rc = main(["phantom", "--modality", "ct", "--out-dir", str(big), "--shape", "192", "192", "160"])
    assert rc == 0
    out = tmp_path / "pred"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_apl.cli", "predict", str(big / "image.nii.gz"), "-c", str(tiny_ckpt),
         "-o", str(out), "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    t0 = time.monotonic()
    while not (out.exists() and any(out.iterdir())):  # the streamed maps' temporary files have appeared
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < 120
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"interrupted" in stderr
    assert not out.exists() or not list(out.iterdir())  # no temporary or half-written file is left


def test_a_run_the_collapse_guard_ends_early_exits_0(tmp_path, tiny_ckpt, phantom_dir, capsys):
    image = str(phantom_dir / "image.nii.gz")
    out = tmp_path / "guarded"
    argv = ["refine", image, "-c", str(tiny_ckpt), "-o", str(out), "-n", "6", "--lr", "1e30",
            "--batch-size", "2", "-q"]  # fmt: skip
    assert main(argv) == 0  # nobody interrupted it: the guard's stop is a result, not an interruption
    log = json.loads((out / "log.json").read_text())
    assert log["stopped"] is True and log["iterations_done"] < 6 and log["notes"]
    assert "interrupted" not in capsys.readouterr().err


def test_commands_run_without_numpy_huge_page_advice(monkeypatch, tmp_path) -> None:
    """A command turns numpy's huge-page advice off while it runs and back on after; the user's
    NUMPY_MADVISE_HUGEPAGE wins (core.memory)."""
    from napari_apl import cli
    from napari_apl.core import memory

    multiarray = pytest.importorskip("numpy._core.multiarray")
    if not hasattr(multiarray, "_get_madvise_hugepage"):
        pytest.skip("this numpy has no huge-page switch")
    seen = []
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(multiarray._get_madvise_hugepage()) or 0)
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = memory.set_numpy_huge_pages(True)
    try:
        assert cli.main(["info", str(tmp_path / "x.pt")]) == 0
        assert seen == [False] and multiarray._get_madvise_hugepage()
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        assert cli.main(["info", str(tmp_path / "x.pt")]) == 0
        assert seen == [False, True]
    finally:
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
        memory.set_numpy_huge_pages(bool(before))


def test_predict_on_ct_stored_as_hu_plus_1024_matches_the_hu_file(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """A CT file that stores HU + 1024 without an intercept gives the HU file's masks under auto, and
    the command says which window it took."""
    src = nib.load(str(phantom_dir / "image.nii.gz"))
    hu = np.asarray(src.dataobj).astype(np.int32)
    raw_img = nib.Nifti1Image((hu + 1024).astype(np.uint16), src.affine)
    raw_img.header.set_slope_inter(1, 0)
    nib.save(raw_img, str(tmp_path / "raw.nii.gz"))
    for name, image in (("hu", phantom_dir / "image.nii.gz"), ("raw", tmp_path / "raw.nii.gz")):
        assert main(["predict", str(image), "-c", str(tiny_ckpt), "-o", str(tmp_path / name), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("ct-abdomen-offset") == 1 and "HU + 1024" in err
    for mask in ("main", "aux", "pseudo_label"):
        a = np.asarray(nib.load(str(tmp_path / "hu" / f"{mask}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "raw" / f"{mask}.nii.gz")).dataobj)
        assert np.array_equal(a, b), mask


@pytest.mark.parametrize(("unit", "per_mm"), [("meter", 1e-3), ("micron", 1e3)])
def test_a_header_in_metres_or_microns_is_read_in_millimetres(tmp_path, tiny_ckpt, phantom_dir, unit, per_mm):
    """NIfTI's spatial unit is honoured: the scan stored with its affine in metres (or microns) and
    ``xyzt_units`` saying so was refused as "0.002 mm voxels"; now it predicts the masks of the same scan
    in millimetres, written in millimetres on the same physical grid, and evaluates against its labels."""
    src = nib.load(str(phantom_dir / "image.nii.gz"))
    scale = np.diag([per_mm, per_mm, per_mm, 1.0])
    for name in ("image", "labels"):
        img = nib.load(str(phantom_dir / f"{name}.nii.gz"))
        other = nib.Nifti1Image(np.asarray(img.dataobj), scale @ img.affine, img.header)
        other.header.set_xyzt_units(unit, "sec")
        nib.save(other, str(tmp_path / f"{name}_{unit}.nii.gz"))
    argv = ["-c", str(tiny_ckpt), "-q"]
    assert main(["predict", str(phantom_dir / "image.nii.gz"), "-o", str(tmp_path / "mm"), *argv]) == 0
    assert main(["predict", str(tmp_path / f"image_{unit}.nii.gz"), "-o", str(tmp_path / unit), *argv]) == 0
    for mask in ("main", "aux", "pseudo_label", "confidence"):
        a, b = (
            nib.load(str(tmp_path / "mm" / f"{mask}.nii.gz")),
            nib.load(str(tmp_path / unit / f"{mask}.nii.gz")),
        )
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), mask
        assert np.allclose(b.affine, src.affine, atol=1e-4) and b.header.get_xyzt_units()[0] == "mm"
    pred = str(tmp_path / unit / "pseudo_label.nii.gz")
    report = tmp_path / f"{unit}.json"
    assert (
        main(
            [
                "evaluate",
                "--pred",
                pred,
                "--gt",
                str(tmp_path / f"labels_{unit}.nii.gz"),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    same = tmp_path / "mm.json"
    mm_pred = str(tmp_path / "mm" / "pseudo_label.nii.gz")
    assert (
        main(["evaluate", "--pred", mm_pred, "--gt", str(phantom_dir / "labels.nii.gz"), "--json", str(same)])
        == 0
    )
    got, want = json.loads(report.read_text()), json.loads(same.read_text())
    assert got["dice"] == want["dice"]  # the same voxels; distances in mm up to float32 header rounding
    assert got["assd"].keys() == want["assd"].keys()
    for organ, d in want["assd"].items():
        assert (
            got["assd"][organ] == d
            if isinstance(d, str)
            else got["assd"][organ] == pytest.approx(d, rel=1e-5)
        )


def test_class_select_belongs_to_apl(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """--class-select with another method is refused in one line, and nothing is written."""
    out = tmp_path / "cbst"
    argv = ["refine", str(phantom_dir / "image.nii.gz"), "-c", str(tiny_ckpt), "-o", str(out)]
    assert main([*argv, "--method", "cbst", "--class-select", "-n", "1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class_select is an option of method apl, not of cbst" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_scheduler_address_it_cannot_parse_is_one_line(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """--scheduler foo (no port) ended in a 53-line traceback; an unreachable one was already one line."""
    folder = tmp_path / "many"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(phantom_dir / "image.nii.gz", folder / name)
    out = tmp_path / "out"
    assert (
        main(["predict", str(folder), "-c", str(tiny_ckpt), "-o", str(out), "--scheduler", "foo", "-q"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("napari-apl predict: error: cannot reach the dask scheduler at foo")
    assert "tcp://host:port" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


@pytest.mark.parametrize("case", ["no_display", "missing_folder", "exists", "not_png", "quit_without_shot"])
def test_demo_refuses_before_napari_starts(tmp_path, capsys, monkeypatch, case):
    """No display (Qt aborted the process), a screenshot folder that does not exist (a traceback, then a
    viewer that never closed), an existing screenshot (silently replaced): one line, exit 2."""
    import napari_apl._demo as demo

    def never(**kwargs):
        raise AssertionError("napari was started")

    monkeypatch.setattr(demo, "launch_demo", never)
    monkeypatch.setattr(demo.sys, "platform", "linux")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":99")
    shot = tmp_path / "shot.png"
    if case == "no_display":
        monkeypatch.delenv("DISPLAY")
        argv, words = ["demo"], "xvfb-run -a napari-apl demo"
    elif case == "missing_folder":
        argv, words = ["demo", "--screenshot", str(tmp_path / "nodir" / "d.png")], "does not exist"
    elif case == "exists":
        shot.write_bytes(b"earlier")
        argv, words = ["demo", "--screenshot", str(shot), "--quit-after"], "exists already: pass overwrite"
    elif case == "not_png":
        argv, words = ["demo", "--screenshot", str(tmp_path / "shot.jpg")], "give a .png file name"
    else:  # (it opened napari and never closed it)
        argv, words = ["demo", "--quit-after"], "give --screenshot FILE.png too"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    if case == "exists":
        assert shot.read_bytes() == b"earlier"


def test_demo_exits_2_when_its_screenshot_could_not_be_written(tmp_path, monkeypatch):
    """A screenshot that fails once napari has run (the path passed the early check) is exit status 2."""
    import napari_apl._demo as demo

    calls = []

    def failing(**kwargs):
        calls.append(kwargs)
        kwargs["outcome"]["screenshot_error"] = "the screenshot could not be written to x.png: denied"

    monkeypatch.setattr(demo, "launch_demo", failing)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    argv = ["demo", "--screenshot", str(tmp_path / "shot.png"), "--quit-after"]
    assert main(argv) == 2 and calls[0]["quit_after"] is True
    monkeypatch.setattr(demo, "launch_demo", lambda **kwargs: None)
    assert main(argv) == 0


def _tiny_refine_argv(phantom_dir, ckpt, out, extra: str = "") -> list[str]:
    """``napari-apl refine`` of the phantom for one iteration, with ``extra`` options."""
    image = str(phantom_dir / "image.nii.gz")
    return ["refine", image, "-c", str(ckpt), "-o", str(out), "-n", "1", "-q", *extra.split()]


def test_options_this_run_does_not_read_are_named(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """--tau with apl, --bn-mix with frozen batch norm, --corrections-unset without corrections and
    --workers with one volume were accepted in silence; each is now a note (the run goes on)."""
    out = tmp_path / "out"
    extra = "--tau 0.5 --bn frozen --bn-mix 0.4 --corrections-unset 7 --workers 3"
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, extra)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: --workers is for many volumes (a folder or a quoted glob): this one runs here",
        "note: --tau applies to --method threshold only: ignored in this run",
        "note: --bn-mix applies with --bn adapt only: ignored in this run",
        "note: --corrections-unset applies with --corrections only: ignored in this run",
    ]
    # an ignored option is ignored even when its value would be wrong for a run that reads it (the run
    # said "ignored", then failed on it)
    extra = "--tau 0 --bn frozen --bn-mix 5 --class-balance-power 9 --method cbst --overwrite"
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, extra)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3 and all(n.endswith("ignored in this run") for n in notes)
    extra = "--teacher-decay 0 --teacher-precision fp32 --overwrite"  # no teacher: nothing to set
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, extra)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: --teacher-precision applies with a teacher (--teacher-decay above 0) only: ignored in this run"
    ]
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, "--method threshold --tau 0 --overwrite")) == 2
    assert "tau" in capsys.readouterr().err  # (read, so checked)
    read = "--method threshold --tau 0.5 --overwrite"  # options the run reads: no note
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, read)) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]


def test_corrections_unset_cannot_be_a_label(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """--corrections-unset 3 turned every voxel corrected to the left kidney into 'untouched'."""
    out = tmp_path / "out"
    extra = f"--corrections {phantom_dir / 'labels.nii.gz'} --corrections-unset 3"
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--corrections-unset 3 is a label (0..4)" in err
    assert not out.exists() or not any(out.iterdir())


def test_refine_settings_are_checked_before_the_outputs(tmp_path, tiny_ckpt, phantom_dir, capsys):
    """A bad method used to be reported only after the user had dealt with existing outputs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "refined.pt").write_bytes(b"earlier")
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, "--method foo")) == 2
    assert "unknown method 'foo'" in capsys.readouterr().err


def test_import_refuses_a_napari_apl_checkpoint(tmp_path, tiny_ckpt, capsys):
    """Re-importing one replaced its input size, spacing and intensities with import's defaults."""
    out = tmp_path / "again.pt"
    assert main(["import", str(tiny_ckpt), "--arch", "unet-dual", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a napari-apl checkpoint already" in err and not out.exists()


def test_predict_says_when_no_organ_was_found(tmp_path, tiny_ckpt, phantom_dir, capsys, monkeypatch):
    """An all-background prediction (a wrong checkpoint or intensity preset) finished without a word."""
    import torch

    from napari_apl.core.models.unet import UNetDual

    def background_only(self, x):  # every pixel background, whatever the input
        n, _, h, w = x.shape
        logits = torch.full((n, 5, h, w), -5.0)
        logits[:, 0] = 5.0
        return logits, logits.clone()

    monkeypatch.setattr(UNetDual, "forward", background_only)
    out = tmp_path / "out"
    assert (
        main(["predict", str(phantom_dir / "image.nii.gz"), "-c", str(tiny_ckpt), "-o", str(out), "-q"]) == 0
    )
    err = capsys.readouterr().err
    assert "note: the pseudo labels hold no organ" in err


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, tiny_ckpt, phantom_dir, capsys, monkeypatch):
    """A batch too large to allocate (torch's CPU allocator, here simulated) was a traceback, exit 1."""
    import napari_apl.core.refine as refine_module

    def huge(*args, **kwargs):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 40960000000 bytes. "
            "Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(refine_module, "refine", huge)
    out = tmp_path / "out"
    assert main(_tiny_refine_argv(phantom_dir, tiny_ckpt, out, "--batch-size 100000")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "smaller --batch-size" in err[0], err
    assert not out.exists() or not any(out.rglob("*.nii.gz"))

    def other(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(refine_module, "refine", other)
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not dressed up as memory
        main(_tiny_refine_argv(phantom_dir, tiny_ckpt, tmp_path / "out2"))


@pytest.mark.parametrize("command", ["refine", "train-source"])
def test_a_seed_beyond_64_bits_is_refused_by_the_parser(command, capsys):
    """--seed 2**64 ended in torch.manual_seed's 'Overflow when unpacking long long' traceback."""
    argv = {
        "refine": ["refine", "x.nii.gz", "-c", "m.pt", "-o", "out"],
        "train-source": ["train-source", "--images", "a*", "--labels", "b*", "--out", "m.pt"],
    }[command]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--seed", str(2**64)])
    assert exc.value.code == 2 and "must be at most 18446744073709551615" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "amp"), [("auto", None), ("bf16", True), ("fp32", False)])
def test_precision_sets_the_students_training_precision(flag, amp):
    """--precision: bf16 autocast where native (auto), always, or float32 (RefineConfig.amp)."""
    from napari_apl import cli

    args = cli.build_parser().parse_args(["refine", "x.nii.gz", "-c", "m.pt", "-o", "o", "--precision", flag])
    assert cli._refine_config(args).amp is amp


def test_output_read_by_a_closed_pipe_ends_quietly() -> None:
    """`napari-apl info ... | head -1`: a reader that goes away ends the command quietly (status 141, as
    SIGPIPE would), not with a BrokenPipeError traceback."""
    import subprocess

    from napari_apl._sample_data import demo_checkpoint_path

    code = "import sys; from napari_apl.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "info", str(demo_checkpoint_path())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_file_system_error_is_one_line(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """An OSError of the file system (here an I/O error reading the checkpoint) was a traceback."""
    import errno

    import napari_apl.core.checkpoint as checkpoint

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tiny_ckpt))

    monkeypatch.setattr(checkpoint, "describe", failing)
    assert main(["info", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"napari-apl info: error: Input/output error: {tiny_ckpt}"


def test_maps_do_not_take_the_scans_intent(tmp_path, tiny_ckpt, phantom_dir):
    """A scan whose header declares a statistic (intent 't test') and a colour-table file gave its label
    and fraction maps the same declaration; refine's model labels (written another way) too. Header
    extensions (here a comment; DICOM or JSON metadata alike) describe the scan: the maps carry none."""
    src = nib.load(phantom_dir / "image.nii.gz")
    img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, src.header)
    img.header.set_intent("t test", (10,), name="tstat")
    img.header["aux_file"] = b"ct.lut"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"acquired on scanner 3"))
    nib.save(img, tmp_path / "in.nii.gz")
    assert (
        main(["predict", str(tmp_path / "in.nii.gz"), "-c", str(tiny_ckpt), "-o", str(tmp_path / "p"), "-q"])
        == 0
    )
    argv = ["refine", str(tmp_path / "in.nii.gz"), "-c", str(tiny_ckpt), "-o", str(tmp_path / "r"), "-q",
            "--iterations", "1", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    written = [tmp_path / "p" / f"{name}.nii.gz" for name in MAPS] + list((tmp_path / "r").glob("*.nii.gz"))
    assert len(written) > len(MAPS)
    for path in written:
        hdr = nib.load(path).header
        assert hdr.get_intent() == ("none", (), "") and hdr["aux_file"] == b"", path.name
        assert len(hdr.extensions) == 0, path.name
    assert nib.load(tmp_path / "in.nii.gz").header.get_intent()[0] == "t test"  # (the input's, as set)
    # the scan's own header keeps its extensions: the maps' header is a copy with them cleared
    from napari_apl.core.volume import derived_header, load_volume

    scan = load_volume(tmp_path / "in.nii.gz")
    assert len(derived_header(scan.header, np.uint8).extensions) == 0 and len(scan.header.extensions) == 1


def test_demo_names_the_bundled_checkpoint_unless_a_file_has_that_name(tmp_path, monkeypatch, capsys):
    """`-c demo` / `info demo` reach the demo model from any folder (wheel installs have no resources/)."""
    monkeypatch.chdir(tmp_path)
    assert main(["info", "demo"]) == 0
    assert "unet-dual" in capsys.readouterr().out
    (tmp_path / "demo").write_bytes(b"not a checkpoint")  # a file of that name is what the user means
    assert main(["info", "demo"]) == 2
    assert "demo is not a PyTorch checkpoint" in capsys.readouterr().err


def test_refine_help_states_the_engines_iteration_default():
    """--iterations' help names RefineConfig's default (the CLI leaves the option unset to use it)."""
    import argparse

    from napari_apl import cli
    from napari_apl.core.refine import RefineConfig

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices["refine"]._actions if "--iterations" in a.option_strings)
    assert action.default is None and f"default {RefineConfig().iterations})" in action.help


@pytest.mark.parametrize("command", ["predict", "refine"])
def test_a_label_volume_is_refused_before_the_model_is_loaded(
    tmp_path, tiny_ckpt, phantom_dir, capsys, monkeypatch, command
):
    """A label file given as the image (ct_sm_labels.nii.gz for ct_sm.nii.gz) was predicted as a scan:
    now one line before any model work; a CHAOS-style float label file (label_7) too."""
    import napari_apl.core.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    src = nib.load(phantom_dir / "labels.nii.gz")
    floats = tmp_path / "label_7.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj).astype(np.float64), src.affine), str(floats))
    for labels in (phantom_dir / "labels.nii.gz", floats):
        out = tmp_path / "out"
        assert main([command, str(labels), "-c", str(tiny_ckpt), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0] == (
            f"napari-apl {command}: error: {labels} looks like a label volume (few non-negative integer "
            "values), not an image: give the CT or MRI scan itself"
        )
        assert not out.exists()  # the output folder made for it is removed again


def test_skip_done_with_one_volume_is_noted(tmp_path, tiny_ckpt, phantom_dir, capsys):
    out = tmp_path / "one"
    argv = ["predict", str(phantom_dir / "image.nii.gz"), "-c", str(tiny_ckpt), "-o", str(out), "-q"]
    assert main([*argv, "--skip-done"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "note: --skip-done is for many volumes (a folder or a quoted glob): ignored for one" in err, err
    assert main([*argv, "--skip-done"]) == 2  # one volume's existing outputs: --overwrite, as before
    assert "exists already" in capsys.readouterr().err


def test_a_batch_volume_is_not_probed_for_labels_again(tmp_path, phantom_dir, monkeypatch):
    """A volume the batch's client probed already (labels_checked) is not read again for the label rule;
    a command given the file directly is."""
    import argparse

    import napari_apl.core.preprocess as preprocess
    from napari_apl import cli

    probed: list[str] = []
    monkeypatch.setattr(preprocess, "volume_looks_like_labels", lambda v: probed.append(v.path.name) or False)
    image = str(phantom_dir / "image.nii.gz")
    cli._refuse_label_volume(argparse.Namespace(image=image, labels_checked=True))
    assert probed == []
    cli._refuse_label_volume(argparse.Namespace(image=image))
    assert probed == ["image.nii.gz"]
