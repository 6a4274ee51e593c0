"""Tests for napari_apl.core.metrics (values computed by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_apl.core.errors import APLError
from napari_apl.core.metrics import assd, dice, evaluate


def test_dice_hand_computed() -> None:
    pred = np.array([1, 1, 1, 0, 2, 2, 2, 0])
    gt = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    d = dice(pred, gt, labels=(1, 2))
    assert d[1] == pytest.approx(2 * 2 / 6)  # 2 of 3 voxels overlap, 3 + 3 voxels
    assert d[2] == pytest.approx(2 * 2 / 5)  # both gt voxels inside a 3-voxel prediction


def test_dice_empty_conventions() -> None:
    pred = np.zeros((3, 3, 3), np.uint8)
    gt = np.zeros((3, 3, 3), np.uint8)
    gt[1, 1, 1] = 4
    d = dice(pred, gt)
    assert math.isnan(d[1]) and math.isnan(d[2]) and math.isnan(d[3])  # absent from both
    assert d[4] == 0.0  # missed organ
    assert dice(gt, gt)[4] == 1.0


def test_shape_mismatch_raises_apl_error() -> None:
    with pytest.raises(APLError, match="does not match"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError):
        assd(np.zeros((2, 2, 2)), np.zeros((2, 3, 2)), (1, 1, 1))
    with pytest.raises(APLError):
        evaluate(np.zeros((2, 2, 2)), np.zeros((3, 2, 2)), (1, 1, 1))


def test_bad_spacing_raises() -> None:
    a = np.zeros((3, 3, 3), np.uint8)
    for bad in [(1, 1), (1, 0, 1), (1, float("nan"), 1)]:
        with pytest.raises(APLError, match="spacing"):
            assd(a, a, bad)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected"),
    [(0, (0.7, 1.3, 2.0), 3 * 0.7), (1, (0.7, 1.3, 2.0), 3 * 1.3), (2, (0.7, 1.3, 2.0), 3 * 2.0)],
)
def test_assd_parallel_planes_anisotropic(axis: int, spacing, expected: float) -> None:
    pred = np.zeros((6, 7, 8), np.uint8)
    gt = np.zeros_like(pred)
    idx_p = [slice(None)] * 3
    idx_g = [slice(None)] * 3
    idx_p[axis], idx_g[axis] = 1, 4  # one-voxel planes 3 voxels apart
    pred[tuple(idx_p)] = 1
    gt[tuple(idx_g)] = 1
    assert assd(pred, gt, spacing, labels=(1,))[1] == pytest.approx(expected, abs=1e-12)


def test_assd_identical_is_zero() -> None:
    m = np.zeros((10, 9, 8), np.uint8)
    m[2:7, 3:8, 1:6] = 2
    m[0, 0, 0] = 2  # a lone voxel at the array corner
    assert assd(m, m, (1.5, 0.8, 3.0), labels=(2,))[2] == 0.0


def _shifted_cubes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 1
    b[3:7, 2:6, 2:6] = 1
    return a, b


def test_assd_shifted_cube_isotropic() -> None:
    # Each cube has 56 surface voxels. A->B: 16 voxels on A's x=2 face are 1 away, and the 4 inner
    # voxels of A's x=5 face are 1 away (B's surface at x=6 or at y/z = 2/5); the rest lie on B's
    # surface. Same 20 from B to A, so ASSD = 40 / 112.
    a, b = _shifted_cubes()
    assert assd(a, b, (1.0, 1.0, 1.0), labels=(1,))[1] == pytest.approx(40 / 112)


def test_assd_shifted_cube_anisotropic() -> None:
    # Spacing 2 along the shift: the 16 face voxels are 2 mm away, the 4 inner ones still 1 mm
    # (sideways to the y/z faces), per direction 36 mm in total -> 72 / 112.
    a, b = _shifted_cubes()
    assert assd(a, b, (2.0, 1.0, 1.0), labels=(1,))[1] == pytest.approx(72 / 112)


def test_assd_empty_conventions() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    b[1, 1, 1] = 3
    out = assd(a, b, (1, 1, 1), labels=(1, 3))
    assert math.isnan(out[1])
    assert out[3] == math.inf
    assert assd(b, a, (1, 1, 1), labels=(3,))[3] == math.inf


def _reference_assd(pm: np.ndarray, gm: np.ndarray, spacing) -> float:
    """Uncropped reference: surfaces by explicit 6-neighbour checks, EDT on the whole array."""

    def surface(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1, constant_values=False)
        inner = np.ones_like(m)
        for ax in range(m.ndim):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=ax)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    sp, sg = surface(pm), surface(gm)
    dg = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dp = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return (dg[sp].sum() + dp[sg].sum()) / (sp.sum() + sg.sum())


def test_assd_cropping_matches_uncropped_reference() -> None:
    rng = np.random.default_rng(7)
    spacing = (0.9, 1.7, 3.1)
    for trial in range(6):
        shape = (24, 20, 12)
        pred = np.zeros(shape, np.uint8)
        gt = np.zeros(shape, np.uint8)
        for arr in (pred, gt):
            field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
            arr[field > np.quantile(field, 0.8)] = 1
        if trial % 2:  # touch the array border
            pred[0, :, :5] = 1
            gt[:, -1, -3:] = 1
        got = assd(pred, gt, spacing, labels=(1,))[1]
        want = _reference_assd(pred == 1, gt == 1, spacing)
        assert got == pytest.approx(want, rel=1e-12)


def test_assd_of_masks_far_apart_holds_only_their_surfaces() -> None:
    """A stray voxel in a far corner made the distance transforms span the whole volume: 50 bytes a
    voxel, 4 GB and two minutes for a 512 x 512 x 300 CT. Memory now follows the surfaces."""
    import tracemalloc

    shape = (256, 256, 96)
    pred = np.zeros(shape, np.uint8)
    gt = np.zeros(shape, np.uint8)
    pred[100:120, 100:120, 40:50] = 1
    gt[102:122, 98:118, 41:51] = 1
    spacing = (0.7, 0.7, 5.0)
    near = (slice(90, 130), slice(90, 130), slice(35, 55))
    want = _reference_assd(pred[near] == 1, gt[near] == 1, spacing)  # the organs alone
    pred[0, 0, 0] = gt[-1, -1, -1] = 1  # one stray voxel each, in opposite corners
    tracemalloc.start()
    got = assd(pred, gt, spacing, labels=(1,))[1]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40e6, peak  # the volume holds 6.3 M voxels: a transform over it needs 300 MB
    # the strays add their own distances: the exact pooled mean, computed by brute force
    pts = {name: np.argwhere(_surface_ref(m == 1)) * spacing for name, m in (("p", pred), ("g", gt))}
    d = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(1)  # noqa: E731
    brute = (d(pts["p"], pts["g"]).sum() + d(pts["g"], pts["p"]).sum()) / (len(pts["p"]) + len(pts["g"]))
    assert got == pytest.approx(brute, rel=1e-12) and got > want


def _surface_ref(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = np.ones_like(padded)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)
    return mask & ~inner[tuple(slice(1, -1) for _ in range(mask.ndim))]


def test_assd_accepts_2d() -> None:
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros_like(a)
    a[:, 2] = 1
    b[:, 5] = 1
    assert assd(a, b, (1.0, 0.5), labels=(1,))[1] == pytest.approx(1.5)


def test_evaluate_names_and_means() -> None:
    a, b = _shifted_cubes()
    pred = a.copy()
    gt = b.copy()
    pred[8:10, 8:10, 8:10] = 2  # right kidney predicted but absent from gt
    gt[0:2, 8:10, 0:2] = 4
    pred[0:2, 8:10, 0:2] = 4  # spleen perfect
    out = evaluate(pred, gt, (1.0, 1.0, 1.0))
    assert set(out) == {"dice", "assd", "mean_dice", "mean_assd"}
    assert list(out["dice"]) == ["liver", "right kidney", "left kidney", "spleen"]
    assert out["dice"]["liver"] == pytest.approx(2 * 48 / 128)
    assert out["dice"]["right kidney"] == 0.0
    assert math.isnan(out["dice"]["left kidney"])
    assert out["dice"]["spleen"] == 1.0
    assert out["mean_dice"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)  # nan organ skipped
    assert out["assd"]["right kidney"] == math.inf
    assert out["mean_assd"] == math.inf
    gt2 = gt.copy()
    gt2[8:10, 8:10, 8:10] = 2
    out2 = evaluate(pred, gt2, (1.0, 1.0, 1.0))
    assert out2["mean_assd"] == pytest.approx((40 / 112 + 0 + 0) / 3)


def test_evaluate_nothing_present() -> None:
    z = np.zeros((3, 3, 3), np.uint8)
    out = evaluate(z, z, (1, 1, 1))
    assert math.isnan(out["mean_dice"]) and math.isnan(out["mean_assd"])
