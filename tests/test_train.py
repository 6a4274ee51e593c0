"""Source training: pairing checks, augmentation that never flips left-right, resumption, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apl.cli import main
from napari_apl.core.checkpoint import load_checkpoint
from napari_apl.core.errors import APLError, CheckpointError
from napari_apl.core.phantom import write_phantom
from napari_apl.core.train import TrainConfig, augment_batch, gin, pair_files, random_remap, train_source
from napari_apl.core.utils import run_generator

SHAPE, SPACING = (48, 48, 8), (6.0, 6.0, 10.0)


@pytest.fixture(scope="module")
def mri_pairs(tmp_path_factory):
    """Two tiny MRI phantoms on disk as (image, labels) pairs."""
    root = tmp_path_factory.mktemp("src")
    pairs = [write_phantom(root / f"case{s}", "mri", s, shape=SHAPE, spacing=SPACING) for s in (0, 1)]
    return [(str(a), str(b)) for a, b in pairs]


def _cfg(**kw) -> TrainConfig:
    base = dict(arch_args={"base": 4}, epochs=2, batch_size=4, input_size=(32, 32), spacing=(9.0, 9.0),
                device="cpu", iters_per_epoch=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_pair_files_sorts_naturally_and_checks_counts(tmp_path):
    for n in (10, 2, 1):
        (tmp_path / f"image_{n}.nii.gz").touch()
        (tmp_path / f"label_{n}.nii.gz").touch()
    pairs = pair_files(str(tmp_path / "image_*.nii.gz"), str(tmp_path / "label_*.nii.gz"))
    assert [p[0].rsplit("_", 1)[1] for p in pairs] == ["1.nii.gz", "2.nii.gz", "10.nii.gz"]
    (tmp_path / "label_11.nii.gz").touch()
    with pytest.raises(APLError, match="pair"):
        pair_files(str(tmp_path / "image_*.nii.gz"), str(tmp_path / "label_*.nii.gz"))
    with pytest.raises(APLError, match="no image"):
        pair_files(str(tmp_path / "nothing_*.nii.gz"), str(tmp_path / "label_*.nii.gz"))


def test_mismatched_pairs_are_refused(tmp_path, mri_pairs):
    img, lab = mri_pairs[0]
    ref = nib.load(lab)
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj)[:-2], ref.affine), small)
    moved = tmp_path / "moved.nii.gz"
    aff = ref.affine.copy()
    aff[0, 3] += 30.0
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), aff), moved)
    for bad, what in ((small, "shape"), (moved, "affine")):
        gen = train_source([(img, str(bad))], tmp_path / f"{what}.pt", _cfg())
        with pytest.raises(APLError, match=what):
            next(gen)


def test_labels_on_the_same_grid_in_another_voxel_order_pair(tmp_path, mri_pairs):
    """Labels written in another orientation (e.g. LPS for a RAS image) are on the image's grid: they
    pair, and give the same training slices as the labels stored like the image."""
    from napari_apl.core.train import load_slice_set

    img, lab = mri_pairs[0]
    ref = nib.load(lab)
    lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(ref.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    flipped = ref.as_reoriented(lps)
    assert not np.allclose(flipped.affine, ref.affine)
    moved = tmp_path / "labels_lps.nii.gz"
    nib.save(flipped, moved)
    cfg = _cfg()
    from napari_apl.core.preprocess import PRESETS

    args = (PRESETS["mri"], cfg.spacing, cfg.input_size, 16)
    same = load_slice_set([(img, lab)], *args)
    other = load_slice_set([(img, str(moved))], *args)
    assert torch.equal(same.labels, other.labels) and torch.equal(same.images, other.images)


@pytest.mark.parametrize("kind", ["label_7", "fractional", "image_as_labels"])
def test_label_files_that_are_not_the_five_labels_are_refused(tmp_path, mri_pairs, kind):
    """A label 7, fractional labels or swapped --images/--labels ended in an IndexError traceback (or
    were silently rounded); each is one line naming the file."""
    img, lab = mri_pairs[0]
    ref = nib.load(lab)
    data = np.asarray(ref.dataobj).astype(np.float32)
    if kind == "label_7":
        data[0, 0, 0] = 7
    elif kind == "fractional":
        data[0, 0, 0] = 1.4
    else:
        img, data = lab, np.asarray(nib.load(img).dataobj).astype(np.float32)
    bad = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, ref.affine), bad)
    gen = train_source([(img, str(bad))], tmp_path / "out.pt", _cfg())
    with pytest.raises(APLError, match=f"{kind}.nii.gz is not a label volume") as exc:
        next(gen)
    assert "\n" not in str(exc.value) and not (tmp_path / "out.pt").exists()


def test_a_diverged_training_run_writes_no_checkpoint(tmp_path, mri_pairs):
    """Nor a resume state: resuming would diverge again, and the lower --lr the error asks for would be
    refused as a state of other settings. It stops at the first epoch's end, not after all of them."""
    epochs = []
    with pytest.raises(APLError, match="training diverged"):
        for ev in train_source(mri_pairs, tmp_path / "nan.pt", _cfg(lr=1e12, epochs=3)):
            epochs.append(ev.epoch)
    assert not (tmp_path / "nan.pt").exists()
    assert not (tmp_path / "nan.pt.train-state").exists()
    assert set(epochs) == {1}
    run_generator(train_source(mri_pairs, tmp_path / "nan.pt", _cfg(epochs=1)))  # a lower lr: no refusal
    assert (tmp_path / "nan.pt").exists()


def test_an_input_size_the_network_cannot_take_is_refused_before_training(tmp_path, mri_pairs):
    """70 x 70 is no multiple of unet-dual's stride 16: the checkpoint it made could not be loaded."""
    gen = train_source(mri_pairs, tmp_path / "s.pt", _cfg(input_size=(70, 70)))
    with pytest.raises(APLError, match="not a multiple of unet-dual's stride 16") as exc:
        next(gen)
    assert "\n" not in str(exc.value) and not (tmp_path / "s.pt").exists()


def test_augmentation_never_flips_left_and_right():
    gen = torch.Generator().manual_seed(0)
    n, h, w = 32, 64, 64
    x = torch.zeros(n, 1, h, w)
    y = torch.zeros(n, h, w, dtype=torch.long)
    y[:, 8:24, 20:44] = 2  # "right kidney" in the low rows (canonical axis 0 = towards Right)
    y[:, 40:56, 20:44] = 3
    x[:, 0][y > 0] = 1.0
    xa, ya = augment_batch(x, y, gen, TrainConfig())
    assert xa.shape == x.shape and ya.shape == y.shape and torch.isfinite(xa).all()
    rows = torch.arange(h).reshape(1, h, 1).float()
    for k in range(n):
        r2 = rows.expand(n, h, w)[k][ya[k] == 2].mean()
        r3 = rows.expand(n, h, w)[k][ya[k] == 3].mean()
        assert r2 < h / 2 < r3, k  # every sample keeps its sides
    assert set(ya.unique().tolist()) <= {0, 2, 3}


def test_intensity_transforms_are_random_and_bounded():
    gen = torch.Generator().manual_seed(1)
    x = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32).repeat(4, 1, 1, 1)
    r = random_remap(x, gen)
    assert r.min() >= 0 and r.max() <= 1
    assert not torch.allclose(r[0], r[1])
    d = torch.diff(r[0].flatten())
    assert (d > 1e-6).any() and (d < -1e-6).any()  # non-monotonic somewhere (with this seed)
    g = gin(x, gen)
    assert g.shape == x.shape and g.min() >= 0 and g.max() <= 1 + 1e-6
    assert not torch.allclose(g[0], g[1])


def test_train_source_resumes_from_its_last_epoch(tmp_path, mri_pairs):
    cfg = _cfg()
    full = tmp_path / "full.pt"
    run_generator(train_source(mri_pairs, full, cfg))
    ref_model, meta = load_checkpoint(full)
    assert meta.provenance["epochs"] == 2 and meta.arch == "unet-dual"
    assert not (tmp_path / "full.pt.train-state").exists()

    out = tmp_path / "resumed.pt"
    seen = []
    gen = train_source(mri_pairs, out, cfg, stop=lambda: len(seen) >= 3)  # stop inside epoch 2
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(gen))
    assert not out.exists() and (tmp_path / "resumed.pt.train-state").exists()
    # another epoch count would resume on another learning-rate schedule (or stop at once and call a
    # model of the saved epochs one of fewer): refused in one line, the state kept
    for epochs in (1, 3):
        with pytest.raises(CheckpointError, match=r"run of 2 epochs \(1 done\).*resume with --epochs 2"):
            run_generator(train_source(mri_pairs, out, _cfg(epochs=epochs)))
    assert not out.exists() and (tmp_path / "resumed.pt.train-state").exists()
    events = []
    gen = train_source(mri_pairs, out, cfg)  # picks up after epoch 1
    try:
        while True:
            events.append(next(gen))
    except StopIteration:
        pass
    assert {e.epoch for e in events} == {2}
    model, _ = load_checkpoint(out)
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k
    assert not (tmp_path / "resumed.pt.train-state").exists()


def test_channels_last_bf16_training_resumes_and_saves_contiguous(tmp_path, mri_pairs):
    """The fast recipe (channels-last, bf16 autocast) resumes exactly and writes plain contiguous weights."""
    cfg = _cfg(channels_last=True, amp=True)
    full = tmp_path / "fast.pt"
    run_generator(train_source(mri_pairs, full, cfg))
    fast, _ = load_checkpoint(full)
    out = tmp_path / "resumed.pt"
    seen = []
    gen = train_source(mri_pairs, out, cfg, stop=lambda: len(seen) >= 3)
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(gen))
    run_generator(train_source(mri_pairs, out, cfg))
    resumed, _ = load_checkpoint(out)
    plain_path = tmp_path / "plain.pt"
    run_generator(train_source(mri_pairs, plain_path, _cfg()))
    plain, _ = load_checkpoint(plain_path)
    differs = False
    for k, v in fast.state_dict().items():
        assert v.is_contiguous() and torch.isfinite(v.float()).all(), k
        assert torch.equal(v, resumed.state_dict()[k]), k
        differs |= not torch.allclose(v.float(), plain.state_dict()[k].float(), atol=1e-4)
    assert differs  # bf16 autocast really ran: float32 training gives other weights
    m, a = fast(torch.rand(2, 1, 32, 32))
    assert m.shape == a.shape == (2, 5, 32, 32) and m.dtype == torch.float32


def test_resume_with_other_settings_is_refused(tmp_path, mri_pairs):
    out = tmp_path / "m.pt"
    gen = train_source(mri_pairs, out, _cfg(), stop=lambda: True)
    with pytest.raises(StopIteration):
        while True:
            next(gen)
    # no epoch finished yet: nothing to resume, so a different run starts afresh
    assert not (tmp_path / "m.pt.train-state").exists()
    seen = []
    gen = train_source(mri_pairs, out, _cfg(), stop=lambda: len(seen) >= 3)
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(gen))
    with pytest.raises(APLError, match="other settings"):
        next(train_source(mri_pairs, out, _cfg(lr=5e-4)))
    # the same settings on other volumes are refused too (the first epoch was trained on both cases)
    with pytest.raises(APLError, match="other volumes"):
        next(train_source(mri_pairs[:1], out, _cfg()))
    assert (tmp_path / "m.pt.train-state").exists()  # kept: the original run can still resume
    assert next(train_source(mri_pairs, out, _cfg())).epoch == 2


def test_resume_on_other_voxels_of_the_same_size_is_refused(tmp_path, mri_pairs):
    """Uncompressed files of one shape have one size: the volumes were told apart by name and size only,
    so a run on other voxels under the same names resumed from the first one's weights."""
    import nibabel as nib

    def copy_as_nii(folder: Path, change: bool) -> list[tuple[str, str]]:
        folder.mkdir()
        pairs = []
        for image, labels in mri_pairs:
            img = nib.load(image)
            data = np.asarray(img.dataobj).copy()
            if change:
                data[: data.shape[0] // 2] = data[: data.shape[0] // 2][::-1]  # other voxels, same size
            names = (
                Path(image).name.replace(".nii.gz", ".nii"),
                Path(labels).name.replace(".nii.gz", ".nii"),
            )
            nib.save(nib.Nifti1Image(data, img.affine, img.header), folder / names[0])
            nib.save(nib.load(labels), folder / names[1])
            pairs.append((str(folder / names[0]), str(folder / names[1])))
        return pairs

    first, other = copy_as_nii(tmp_path / "a", False), copy_as_nii(tmp_path / "b", True)
    assert [Path(f).stat().st_size for p in first for f in p] == [
        Path(f).stat().st_size for p in other for f in p
    ]
    out = tmp_path / "m.pt"
    seen = []
    gen = train_source(first, out, _cfg(), stop=lambda: len(seen) >= 3)  # epoch 1 finished and kept
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(gen))
    with pytest.raises(APLError, match="other volumes"):
        next(train_source(other, out, _cfg()))
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)  # the same files in another folder still resume
    pairs = [tuple(str(moved / Path(f).name) for f in p) for p in first]
    assert next(train_source(pairs, out, _cfg())).epoch == 2


def test_an_interrupt_names_the_epoch_that_was_running(tmp_path, mri_pairs, capsys, monkeypatch):
    """Ctrl-C just after an epoch was kept named the epoch before it (that of the last step shown)."""
    import napari_apl.core.train as train_mod
    from napari_apl.cli import main

    real = train_mod.atomic_write

    def interrupted_after_saving(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        if str(path).endswith(".train-state"):
            raise KeyboardInterrupt  # as a Ctrl-C arriving once epoch 1 is on disk
        return out

    monkeypatch.setattr(train_mod, "atomic_write", interrupted_after_saving)
    image, labels = (Path(f) for f in mri_pairs[0])
    argv = ["train-source", "--images", str(image.parent.parent / "*" / image.name),
            "--labels", str(labels.parent.parent / "*" / labels.name)]  # fmt: skip
    rc = main([*argv, "--epochs", "3", "--input-size", "32", "32", "--spacing", "9", "9", "-q",
               "--out", str(tmp_path / "m.pt")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted in epoch 2: the 1 finished epoch is kept in" in err


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": -1.0}, "learning rate"),
        ({"lr": float("nan")}, "learning rate"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"epochs": True}, "epochs"),
        ({"batch_size": 2.5}, "batch size"),
        ({"iters_per_epoch": 2.5}, "iterations per epoch"),
        ({"input_size": (100000, 100000)}, "input size"),
        ({"spacing": (0.0, 2.0)}, "spacing"),
    ],
)
def test_nonsense_training_settings_are_refused(tmp_path, mri_pairs, bad, words):
    with pytest.raises(APLError, match=words):
        next(train_source(mri_pairs, tmp_path / "m.pt", _cfg(**bad)))
    assert not list(tmp_path.iterdir())  # nothing was written


def test_training_never_writes_over_its_own_input(tmp_path, mri_pairs):
    img, lab = mri_pairs[0]
    copy = tmp_path / "image.nii.gz"
    copy.write_bytes(Path(img).read_bytes())
    before = copy.read_bytes()
    with pytest.raises(APLError, match="same file as an input"):
        next(train_source([(str(copy), lab)], copy, _cfg(), overwrite=True))
    assert copy.read_bytes() == before


def test_train_source_cli(tmp_path, mri_pairs, capsys):
    folder = tmp_path
    imgs = folder / "img"
    labs = folder / "lab"
    imgs.mkdir()
    labs.mkdir()
    for k, (a, b) in enumerate(mri_pairs):
        (imgs / f"image_{k}.nii.gz").symlink_to(a)
        (labs / f"label_{k}.nii.gz").symlink_to(b)
    out = folder / "src.pt"
    argv = ["train-source", "--images", str(imgs / "*.nii.gz"), "--labels", str(labs / "*.nii.gz"),
            "--epochs", "1", "--input-size", "32", "32", "--spacing", "9", "9", "--batch-size", "8",
            "--seed", "3", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv[:-1], "--channels-last", "--amp", "--out", str(folder / "fast.pt"), "-q"]) == 0
    assert load_checkpoint(folder / "fast.pt")[1].provenance["seed"] == 3
    model, meta = load_checkpoint(out)
    assert meta.normalization["kind"] == "percentile" and meta.provenance["seed"] == 3
    x = torch.rand(2, 1, 32, 32)
    m, a = model(x)
    assert m.shape == a.shape == (2, 5, 32, 32)
    assert all(
        math.isfinite(float(t.abs().sum())) for t in model.state_dict().values() if t.is_floating_point()
    )
    assert main(argv) == 2  # exists: refused without --overwrite
    assert "exists" in capsys.readouterr().err


def test_training_is_bit_identical_across_processes(tmp_path, mri_pairs):
    """Same pairs, same seed, two fresh processes (different hash seeds): the same weights, bit for bit."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from napari_apl.core.train import TrainConfig, train_source\n"
        "from napari_apl.core.utils import run_generator\n"
        "pairs = [(sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])]\n"
        "cfg = TrainConfig(arch_args={'base': 4}, epochs=2, batch_size=4, input_size=(32, 32),\n"
        "                  spacing=(9.0, 9.0), device='cpu', iters_per_epoch=2)\n"
        "run_generator(train_source(pairs, sys.argv[5], cfg))\n"
    )
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}.pt"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        args = [a for pair in mri_pairs for a in pair]
        subprocess.run([sys.executable, "-c", code, *args, str(out)], check=True, env=env, timeout=300)
        outs.append(load_checkpoint(out)[0].state_dict())
    for k, v in outs[0].items():
        assert torch.equal(v, outs[1][k]), k


def test_training_keeps_freed_memory_while_it_runs(mri_pairs, tmp_path, monkeypatch):
    """The epochs run inside one core.memory.retained_heap block, given back when training ends."""
    from napari_apl.core import memory

    calls: list[str] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append("mallopt")
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append("malloc_trim")
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(memory, "_retained", 0)
    gen = train_source(mri_pairs, tmp_path / "m.pt", _cfg(epochs=1))
    next(gen)
    assert memory._retained == 1 and calls == ["mallopt", "mallopt"]
    run_generator(gen)
    assert memory._retained == 0 and calls[-1] == "malloc_trim"
    assert (tmp_path / "m.pt").is_file()


def test_volumes_of_a_wider_field_of_view_are_padded_not_cropped(tmp_path):
    """Every slice went to the first volume's grid size: a later, wider scan lost the organs at its edges
    (which depended on the files' order). All are padded to the widest now, and no labelled voxel is lost."""
    from napari_apl.core.preprocess import get_preset
    from napari_apl.core.train import load_slice_set

    narrow = write_phantom(tmp_path / "narrow", "mri", 0, shape=(16, 16, 8), spacing=(6.0, 6.0, 10.0))
    wide = write_phantom(tmp_path / "wide", "mri", 1, shape=(48, 48, 8), spacing=(6.0, 6.0, 10.0))
    counts = np.bincount(np.asarray(nib.load(wide[1]).dataobj).round().astype(int).ravel(), minlength=5)
    assert counts[1:].sum() > 0
    for order in ([narrow, wide], [wide, narrow]):
        pairs = [(str(a), str(b)) for a, b in order]
        data = load_slice_set(pairs, get_preset("mri"), (6.0, 6.0), (16, 16), 16)
        k = next(i for i, (a, _) in enumerate(pairs) if Path(a).parent.name == "wide")
        got = np.bincount(data.labels[data.volume_index == k].numpy().ravel(), minlength=5)
        np.testing.assert_array_equal(got[1:], counts[1:])


def test_a_spacing_a_checkpoint_cannot_hold_is_refused_before_training(tmp_path, mri_pairs):
    """150 mm passed the checks, trained every epoch and failed when the checkpoint was written."""
    with pytest.raises(APLError, match=r"spacing must be two sizes in 0.01..100 mm"):
        next(train_source(mri_pairs, tmp_path / "m.pt", _cfg(spacing=(150.0, 150.0))))
    assert not list(tmp_path.iterdir())


def test_a_spacing_too_fine_for_the_scans_names_the_spacing(tmp_path, mri_pairs):
    """It was reported as a checkpoint's spacing unfit for the scan, though no checkpoint is involved."""
    with pytest.raises(APLError, match=r"--spacing 0.05 0.05 mm would be .* choose a coarser --spacing"):
        next(train_source(mri_pairs, tmp_path / "m.pt", _cfg(spacing=(0.05, 0.05))))


def _touch_pairs(root: Path, images: list[str], labels: list[str]) -> list[str]:
    """Empty files named ``images`` under ``root/i`` and ``labels`` under ``root/l``; their two globs."""
    for side, names in (("i", images), ("l", labels)):
        for n in names:
            f = root / side / f"{n}.nii.gz"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    return [str(root / side / ("*/*.nii.gz" if "/" in images[0] else "*.nii.gz")) for side in "il"]


@pytest.mark.parametrize(
    ("images", "labels", "wrong"),
    [
        (["case1_img", "case2_img", "case3_img"], ["case1_seg", "case2_seg", "case4_seg"], "case3_img"),
        # a number every name holds is no case number: FLARE22, nnU-Net's channel, T2w, a year
        (["FLARE22_Tr_0001_0000", "FLARE22_Tr_0003_0000"], ["FLARE22_Tr_0001", "FLARE22_Tr_0002"], "0003"),
        (["sub-01_T2w", "sub-03_T2w"], ["sub-01_dseg", "sub-02_dseg"], "sub-03_T2w"),
        (
            ["BraTS2021_00001_t1", "BraTS2021_00003_t1"],
            ["BraTS2021_00001_seg", "BraTS2021_00002_seg"],
            "00003",
        ),
        # one folder per case, the same file names
        (["s0011/ct", "s0013/ct"], ["s0011/seg", "s0012/seg"], "s0013/ct"),
    ],
)
def test_pairs_of_different_case_numbers_are_refused(tmp_path, images, labels, wrong):
    """Images 1..3 with labels 1, 2, 4 paired case 3's image with case 4's labels, silently."""
    globs = _touch_pairs(tmp_path, images, labels)
    with pytest.raises(APLError, match=rf"{wrong}.* would pair with .*--pair-by-order"):
        pair_files(*globs)
    assert len(pair_files(*globs, check_names=False)) == len(images)


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (["la_003_0000", "la_010_0000"], ["la_003", "la_010"]),  # nnU-Net
        (["img0001", "img0002"], ["label0001", "label0002"]),  # BTCV
        (["volume-0", "volume-10"], ["segmentation-0", "segmentation-10"]),  # LiTS
        (["s0011/ct", "s0012/ct"], ["s0011/seg", "s0012/seg"]),  # TotalSegmentator
        (["t2_haste_abdomen"], ["segmentation_v3"]),  # one pair: nothing can shift
        (["patient001_frame01"], ["patient001_frame01_gt"]),  # ACDC
    ],
)
def test_common_dataset_names_pair(tmp_path, images, labels):
    globs = _touch_pairs(tmp_path, images, labels)
    assert len(pair_files(*globs)) == len(images)


def test_a_home_glob_and_a_file_name_with_brackets_are_found(tmp_path, monkeypatch):
    """``~`` was not expanded, and an existing file named ``case[1].nii.gz`` could not be given."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "img_1.nii.gz").touch()
    (tmp_path / "lab_1.nii.gz").touch()
    assert pair_files("~/img_*.nii.gz", "~/lab_*.nii.gz") == [
        (str(tmp_path / "img_1.nii.gz"), str(tmp_path / "lab_1.nii.gz"))
    ]
    (tmp_path / "case[1]_img.nii.gz").touch()
    (tmp_path / "case[1]_seg.nii.gz").touch()
    a, b = str(tmp_path / "case[1]_img.nii.gz"), str(tmp_path / "case[1]_seg.nii.gz")
    assert pair_files(a, b) == [(a, b)]


def test_a_resumed_run_with_dropout_equals_an_uninterrupted_one(tmp_path, mri_pairs):
    """Dropout draws from torch's global generator, which the resume state did not keep."""
    cfg = _cfg(arch_args={"base": 4, "dropout": 0.3})
    ref, _ = run_generator(train_source(mri_pairs, tmp_path / "straight.pt", cfg))
    seen = []
    gen = train_source(mri_pairs, tmp_path / "resumed.pt", cfg, stop=lambda: len(seen) >= 3)
    with pytest.raises(StopIteration):
        while True:
            seen.append(next(gen))
    torch.manual_seed(1234)  # whatever the global generator holds when the run resumes
    resumed, _ = run_generator(train_source(mri_pairs, tmp_path / "resumed.pt", cfg))
    for (k, v), w in zip(resumed.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k


def test_an_interrupt_while_the_model_is_written_says_so(tmp_path, mri_pairs, capsys, monkeypatch):
    """Ctrl-C after the last epoch named an epoch that does not exist ("interrupted in epoch 3" of 2)."""
    import napari_apl.core.train as train_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupted)
    image, labels = mri_pairs[0]
    out = tmp_path / "m.pt"
    argv = ["train-source", "--images", image, "--labels", labels, "--epochs", "2", "--input-size", "32",
            "32", "--spacing", "9", "9", "-q", "--out", str(out)]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted while writing {out}: all 2 epochs are kept in" in err and "epoch 3" not in err
    monkeypatch.undo()
    assert main(argv) == 0 and out.is_file()  # the same command writes it
    assert "resuming at epoch 3" not in capsys.readouterr().err


def test_the_resume_line_is_not_glued_to_the_progress_bar(tmp_path, mri_pairs, capsys, monkeypatch):
    """It was printed after the bar without a line break (``...?it/s]resuming at epoch 2``)."""
    import napari_apl.core.train as train_mod

    real = train_mod.atomic_write

    def interrupted_after_saving(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise KeyboardInterrupt  # once epoch 1 is on disk

    monkeypatch.setattr(train_mod, "atomic_write", interrupted_after_saving)
    image, labels = mri_pairs[0]
    argv = ["train-source", "--images", image, "--labels", labels, "--epochs", "2", "--input-size", "32",
            "32", "--spacing", "9", "9", "--batch-size", "4", "--out", str(tmp_path / "m.pt")]  # fmt: skip
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    pieces = [p.strip() for line in capsys.readouterr().err.split("\n") for p in line.split("\r")]
    assert any(p.startswith("resuming at epoch 2 from") for p in pieces), pieces
