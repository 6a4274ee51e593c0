"""Tests for core.preprocess: normalisation recipes, fitting (numpy and dask), presets, errors."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import torch

from napari_apl.core.errors import APLError, VolumeError
from napari_apl.core.preprocess import (
    PRESETS,
    FittedNormalization,
    Normalization,
    NormalizationError,
    choose_normalization,
    get_preset,
)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_ct_window_hand_values() -> None:
    norm = Normalization("ct_window", level=40, width=400)
    fitted = norm.fit(np.arange(8).reshape(2, 2, 2))  # the window's values do not depend on the data
    hu = np.array([-1000, -160, -60, 40, 140, 240, 3000], dtype=np.int16)
    out = fitted(hu)
    assert out.dtype == np.float32
    assert out.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    soft = get_preset("ct-soft").fit(None)
    assert soft(np.array([50 - 175, 50, 50 + 175])).tolist() == [0.0, 0.5, 1.0]
    assert get_preset("ct-abdomen") == norm


def test_percentile_hand_values() -> None:
    data = np.arange(101, dtype=np.float64).reshape(101, 1, 1)  # 0..100: percentile p is value p
    fitted = Normalization("percentile", lower=10, upper=90).fit(data)
    assert fitted.shift == pytest.approx(10.0) and fitted.scale == pytest.approx(80.0)
    out = fitted(np.array([0.0, 10.0, 50.0, 90.0, 100.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # Mostly-constant volume: the percentiles coincide, the full range is used instead.
    sparse = np.zeros((10, 10, 10), np.int16)
    sparse[0, 0, 0] = 100
    fitted = get_preset("mri").fit(sparse)
    assert (fitted.shift, fitted.scale) == (0.0, 100.0)


def test_zscore_hand_values() -> None:
    data = np.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1)  # mean 2.5, population sd sqrt(1.25)
    fitted = Normalization("zscore").fit(data)
    assert fitted.shift == pytest.approx(2.5)
    assert fitted.scale == pytest.approx(np.sqrt(1.25))
    out = fitted(data)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), rtol=1e-6)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(out.std()) == pytest.approx(1.0, rel=1e-5)
    assert not fitted.clip and fitted(np.array([100.0]))[0] > 1.0


@pytest.mark.parametrize("preset", ["mri", "zscore", "ct-abdomen"])
def test_constant_volume_is_an_error(preset: str) -> None:
    with pytest.raises(VolumeError) as exc:
        get_preset(preset).fit(np.full((4, 4, 4), 7, np.int16))
    assert "constant" in _one_line(exc)
    with pytest.raises(VolumeError):
        get_preset(preset).fit(da.full((4, 4, 4), 7.0, chunks=(4, 4, 1)))


def test_nan_is_an_error() -> None:
    data = np.ones((3, 3, 3), np.float32)
    data[0, 0, 0] = 2
    data[1, 1, 1] = np.nan
    with pytest.raises(VolumeError) as exc:
        get_preset("mri").fit(data)
    assert "NaN" in _one_line(exc)


def test_dask_fit_matches_numpy_and_subsamples() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=(30, 20, 16)).astype(np.float32)
    lazy = da.from_array(data, chunks=(30, 20, 1))
    for name in ("mri", "zscore"):
        a, b = get_preset(name).fit(data), get_preset(name).fit(lazy)
        assert a.shift == pytest.approx(b.shift) and a.scale == pytest.approx(b.scale)
    # With a voxel budget, only every k-th axial slice is used and the statistics stay close.
    sub = Normalization("zscore").fit(lazy, max_voxels=2000)
    full = Normalization("zscore").fit(data)
    assert sub.shift == pytest.approx(full.shift, rel=0.05)
    assert sub.scale == pytest.approx(full.scale, rel=0.1)
    # A slice-dependent volume shows which slices were used: every 5th, starting at 2.
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32), (30, 20, 16))
    used = Normalization("zscore").fit(da.from_array(ramp, chunks=(30, 20, 1)), max_voxels=2000)
    assert used.shift == pytest.approx(np.mean(np.arange(16)[2::5]))
    out = full(lazy)
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), full(data))
    # Fewer slices than the step (one huge slice): every k-th row and column is used instead
    one = rng.normal(100, 20, size=(200, 150, 1)).astype(np.float32)
    for name in ("mri", "zscore"):
        sub, full = get_preset(name).fit(one, max_voxels=2000), get_preset(name).fit(one)
        assert sub.shift == pytest.approx(full.shift, rel=0.1) and sub.scale == pytest.approx(
            full.scale, rel=0.2
        )
    two = np.stack([np.zeros((200, 150), np.float32), np.ones((200, 150), np.float32)], axis=2)
    assert get_preset("zscore").fit(two, max_voxels=2000).shift == pytest.approx(0.5)  # both slices seen


def test_callable_on_torch() -> None:
    fitted = get_preset("ct-abdomen").fit(None)
    out = fitted(torch.tensor([-160, 40, 240], dtype=torch.int16))
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.5, 1.0]


def test_to_dict_round_trip() -> None:
    for name, norm in PRESETS.items():
        d = norm.to_dict()
        assert json.loads(json.dumps(d)) == d
        back = Normalization.from_dict(json.loads(json.dumps(d)))
        assert back == norm, name
    custom = Normalization("percentile", lower=1, upper=99)
    assert Normalization.from_dict({"kind": "percentile", "lower": 1, "upper": 99}) == custom
    assert isinstance(custom.lower, float)
    fitted = custom.fit(np.arange(1000.0).reshape(10, 10, 10))
    assert FittedNormalization(**fitted.to_dict()) == fitted


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "minmax"},
        {"level": 40},
        {"kind": "ct_window", "width": 0},
        {"kind": "ct_window", "width": -5},
        {"kind": "percentile", "lower": 90, "upper": 10},
        {"kind": "percentile", "upper": 101},
        {"kind": "zscore", "level": "forty"},
        {"kind": "zscore", "level": float("nan")},
        {"kind": "zscore", "level": True},
        {"kind": "zscore", "gamma": 2},
        ["ct_window"],
    ],
)
def test_from_dict_rejects_bad_input(bad) -> None:
    with pytest.raises(NormalizationError) as exc:
        Normalization.from_dict(bad)
    assert isinstance(exc.value, APLError)
    _one_line(exc)


def test_presets_and_get_preset() -> None:
    assert set(PRESETS) == {"ct-abdomen", "ct-soft", "ct-abdomen-offset", "mri", "zscore"}
    assert PRESETS["ct-abdomen"] == Normalization("ct_window", level=40, width=400)
    assert PRESETS["ct-abdomen-offset"] == Normalization("ct_window", level=40 + 1024, width=400)
    assert PRESETS["ct-soft"] == Normalization("ct_window", level=50, width=350)
    assert PRESETS["mri"] == Normalization("percentile", lower=0.5, upper=99.5)
    assert PRESETS["zscore"].kind == "zscore"
    with pytest.raises(NormalizationError) as exc:
        get_preset("ct")
    msg = _one_line(exc)
    assert all(name in msg for name in PRESETS)
    with pytest.raises(NormalizationError, match="auto, checkpoint, ct-abdomen"):  # where those are valid
        choose_normalization("bogus", {"kind": "zscore"}, np.zeros((4, 4, 2)))
    with pytest.raises(AttributeError):
        PRESETS["mri"].kind = "zscore"  # type: ignore[misc]  # frozen


def test_auto_preset_picks_the_ct_window_only_for_hounsfield_units() -> None:
    from napari_apl.core.phantom import make_phantom
    from napari_apl.core.preprocess import choose_normalization, looks_like_ct

    ct, _, _ = make_phantom("ct", 0, shape=(32, 32, 8))
    mri, _, _ = make_phantom("mri", 0, shape=(32, 32, 8))
    source = {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    assert looks_like_ct(ct) and not looks_like_ct(mri)
    assert choose_normalization("auto", source, ct) == PRESETS["ct-abdomen"]
    assert choose_normalization("auto", source, mri) == Normalization.from_dict(source)
    assert choose_normalization("checkpoint", source, ct) == Normalization.from_dict(source)
    assert choose_normalization("zscore", source, ct) == PRESETS["zscore"]


def test_auto_preset_takes_the_shifted_window_for_ct_stored_as_hu_plus_1024() -> None:
    """CT written without its -1024 intercept gets the abdomen window moved by 1024 (same network
    input as the HU file), with a note; MRI phantoms on any of several scales do not."""
    from napari_apl.core.phantom import make_phantom
    from napari_apl.core.preprocess import choose_normalization, looks_like_ct, looks_like_offset_ct

    source = {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    for seed in range(3):
        ct, _, _ = make_phantom("ct", seed, shape=(48, 48, 8))
        raw = (ct + 1024).astype(np.uint16)
        assert not looks_like_ct(raw) and looks_like_offset_ct(raw)
        assert not looks_like_offset_ct(ct)
        notes: list[str] = []
        norm = choose_normalization("auto", source, raw, notes)
        assert norm == PRESETS["ct-abdomen-offset"]
        assert len(notes) == 1 and "HU + 1024" in notes[0] and "'checkpoint'" in notes[0]
        hu, shifted = PRESETS["ct-abdomen"].fit(ct), norm.fit(raw)
        assert np.allclose(shifted(raw.astype(np.float32)), hu(ct.astype(np.float32)), atol=1e-6)
        mri, _, _ = make_phantom("mri", seed, shape=(48, 48, 8))
        for scale in (1, 500, 1000, 2000, 4000):  # whatever the scanner's intensity scale
            img = np.round(mri / max(float(mri.max()), 1e-6) * scale)
            notes = []
            assert not looks_like_offset_ct(img), scale
            assert choose_normalization("auto", source, img, notes) == Normalization.from_dict(source)
            assert notes == []


def test_a_scanners_padding_does_not_decide_the_ct_window() -> None:
    """CT stored as HU + 1024 that keeps the scanner's raw padding (-2000 outside the field of view, so
    -3024 HU) was taken for Hounsfield units: its whole body normalised to 1. HU files with padding
    stay HU."""
    from napari_apl.core.phantom import make_phantom
    from napari_apl.core.preprocess import choose_normalization, looks_like_ct, looks_like_offset_ct

    source = {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    ct, _, _ = make_phantom("ct", 0, shape=(64, 64, 8))
    yy, xx = np.mgrid[:64, :64]
    outside = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 31**2)[:, :, None].repeat(8, axis=2)  # a round FOV
    for pad in (-2000, -1000):
        raw = (ct + 1024).astype(np.int16)
        raw[outside] = pad
        assert looks_like_offset_ct(raw) and not looks_like_ct(raw), pad
        assert choose_normalization("auto", source, raw, []) == PRESETS["ct-abdomen-offset"], pad
    for pad in (-3024, -2048):
        hu = ct.astype(np.int16)
        hu[outside] = pad
        assert looks_like_ct(hu) and not looks_like_offset_ct(hu), pad
        assert choose_normalization("auto", source, hu, []) == PRESETS["ct-abdomen"], pad
    # air masked to exactly 0 outside the body (HU + 1024) is air, not padding: it stays offset CT
    masked = (ct + 1024).astype(np.int16)
    masked[masked < 300] = 0
    assert looks_like_offset_ct(masked) and not looks_like_ct(masked)


def test_offset_ct_detection_on_the_real_scans(data_dir) -> None:
    """The real MRI scans are never taken for offset CT, the real CT stored as HU + 1024 always is
    (whichever four slices the probe sees)."""
    import nibabel as nib

    from napari_apl.core.preprocess import looks_like_ct, looks_like_offset_ct

    mris = [*sorted((data_dir / "chaos_t2").glob("image_*.nii.gz")), data_dir / "totalseg" / "mr_sm.nii.gz"]
    for path in mris:
        img = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
        assert not looks_like_ct(img) and not looks_like_offset_ct(img), path.name
    ct = np.asanyarray(nib.load(str(data_dir / "totalseg" / "ct_sm.nii.gz")).dataobj).astype(np.int32)
    assert looks_like_ct(ct) and not looks_like_offset_ct(ct)
    for z0 in range(0, ct.shape[2] - 4, 2):
        raw = (ct[:, :, z0:] + 1024).astype(np.int16)
        assert looks_like_offset_ct(raw) and not looks_like_ct(raw), z0
