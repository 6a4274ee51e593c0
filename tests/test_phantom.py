"""Tests for napari_apl.core.phantom."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_apl.core.errors import APLError, OutputExistsError
from napari_apl.core.phantom import TISSUES, make_anatomy, make_phantom, write_phantom

FAT = TISSUES.index("subcutaneous fat")
BONE = (TISSUES.index("cortical bone"), TISSUES.index("trabecular bone"))


@pytest.fixture(scope="module")
def ct0():
    return make_phantom("ct", 0)


@pytest.fixture(scope="module")
def mri0():
    return make_phantom("mri", 0)


def test_dtypes_shapes_and_affine(ct0, mri0) -> None:
    image, labels, affine = ct0
    assert image.shape == labels.shape == (128, 128, 32)
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert mri0[0].dtype == np.float32 and mri0[1].dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), (2.5, 2.5, 6.0))
    assert np.all(affine[:3, 3] != 0)  # centred volume: non-zero origin
    centre = affine @ np.array([127 / 2, 127 / 2, 31 / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_deterministic_per_seed(ct0, mri0) -> None:
    image, labels, affine = make_phantom("ct", 0)
    np.testing.assert_array_equal(image, ct0[0])
    np.testing.assert_array_equal(labels, ct0[1])
    np.testing.assert_array_equal(affine, ct0[2])
    np.testing.assert_array_equal(make_phantom("mri", 0)[0], mri0[0])
    # the anatomy depends on the seed only: both modalities share the labels
    np.testing.assert_array_equal(mri0[1], ct0[1])
    other = make_phantom("ct", 1)
    assert not np.array_equal(other[1], ct0[1])
    assert not np.array_equal(other[0], ct0[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_organs_present(seed: int) -> None:
    _, labels = make_anatomy(seed)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert len(counts) == 5
    voxel_ml = 2.5 * 2.5 * 6.0 / 1000.0
    assert 700 < counts[1] * voxel_ml < 2500  # liver volume in ml
    for organ in (2, 3, 4):
        assert 30 < counts[organ] * voxel_ml < 400


def test_all_organs_present_mri() -> None:
    _, labels, _ = make_phantom("mri", 5, shape=(96, 96, 24), spacing=(3.3, 3.3, 8.0))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_ct_hounsfield_ranges(ct0) -> None:
    image, labels, _ = ct0
    tissue, _ = make_anatomy(0)
    med = {lab: float(np.median(image[labels == lab])) for lab in (1, 2, 3, 4)}
    assert 40 <= med[1] <= 80  # liver
    assert 35 <= med[4] <= 65  # spleen
    assert 15 <= med[2] <= 50 and 15 <= med[3] <= 50  # kidneys
    assert float(np.median(image[tissue == FAT])) < -50
    assert float(np.median(image[np.isin(tissue, BONE)])) > 300
    assert float(np.median(image[tissue == 0])) < -900  # air
    assert image.min() >= -1024


def test_mri_contrast(mri0) -> None:
    image, labels, _ = mri0
    tissue, _ = make_anatomy(0)
    med = {lab: float(np.median(image[labels == lab])) for lab in (1, 2, 3, 4)}
    assert med[4] > med[1] * 1.2  # spleen brighter than liver
    assert med[2] > med[1] * 1.2 and med[3] > med[1] * 1.2  # kidneys brighter than liver
    assert float(np.median(image[tissue == FAT])) < 0.5 * med[1]  # fat suppressed
    assert float(np.median(image[tissue == 0])) < 60  # air
    assert image.min() >= 0 and image.max() < 1600


def _centroid_world(labels: np.ndarray, affine: np.ndarray, label: int) -> np.ndarray:
    idx = np.argwhere(labels == label).mean(axis=0)
    return (affine @ np.append(idx, 1.0))[:3]


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "LPS", "LPI", "ASL"])
def test_written_file_orientation_and_sides(tmp_path, orientation: str) -> None:
    img_path, lab_path = write_phantom(tmp_path / "a" / "b", "ct", 3, orientation=orientation)
    img = nib.load(img_path)
    lab = nib.load(lab_path)
    assert nib.aff2axcodes(lab.affine) == tuple(orientation)
    assert int(lab.header["qform_code"]) == 1 and int(lab.header["sform_code"]) == 1
    assert lab.get_data_dtype() == np.uint8 and img.get_data_dtype() == np.int16
    labels = np.asarray(lab.dataobj)
    # RAS+ world: +x points to the patient's Right, +y Anterior, +z Superior (nibabel convention).
    body = _centroid_world(np.asarray(img.dataobj) > -500, img.affine, True)
    liver = _centroid_world(labels, lab.affine, 1)
    rk = _centroid_world(labels, lab.affine, 2)
    lk = _centroid_world(labels, lab.affine, 3)
    spleen = _centroid_world(labels, lab.affine, 4)
    assert liver[0] > body[0] + 20  # liver on the patient's right
    assert rk[0] > body[0] + 20  # right kidney on the right
    assert lk[0] < body[0] - 20 and spleen[0] < body[0] - 20  # left kidney and spleen on the left
    assert rk[2] < lk[2]  # the right kidney sits lower than the left
    assert spleen[1] < liver[1] and rk[1] < liver[1]  # spleen and kidneys posterior to the liver
    assert spleen[2] > lk[2]  # spleen above the left kidney


@pytest.mark.parametrize("orientation", ["LAS", "LPS", "PIL"])
def test_reorient_to_ras_gives_canonical_arrays(orientation: str) -> None:
    shape = (40, 36, 16)
    ref_img, ref_lab, ref_aff = make_phantom("mri", 4, shape=shape)
    image, labels, affine = make_phantom("mri", 4, shape=shape, orientation=orientation)
    assert nib.aff2axcodes(affine) == tuple(orientation)
    for arr, ref in ((image, ref_img), (labels, ref_lab)):
        canon = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
        np.testing.assert_array_equal(np.asarray(canon.dataobj), ref)
        np.testing.assert_allclose(canon.affine, ref_aff, atol=1e-9)


def test_write_phantom_refuses_to_overwrite(tmp_path) -> None:
    kw = {"shape": (48, 48, 16), "spacing": (6.0, 6.0, 12.0)}
    img_path, lab_path = write_phantom(tmp_path, "mri", 1, **kw)
    assert img_path == tmp_path / "image.nii.gz" and lab_path == tmp_path / "labels.nii.gz"
    before = (img_path.read_bytes(), lab_path.read_bytes())
    with pytest.raises(OutputExistsError):
        write_phantom(tmp_path, "mri", 2, **kw)
    assert (img_path.read_bytes(), lab_path.read_bytes()) == before
    # only the labels exist: nothing is written either
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.nii.gz").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        write_phantom(other, "ct", 1, **kw)
    assert not (other / "image.nii.gz").exists()
    assert (other / "labels.nii.gz").read_bytes() == b"keep"
    write_phantom(tmp_path, "mri", 2, overwrite=True, **kw)
    assert (img_path.read_bytes(), lab_path.read_bytes()) != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modality": "pet"}, "modality"),
        ({"orientation": "RAR"}, "orientation"),
        ({"orientation": "XYZ"}, "orientation"),
        ({"shape": (4, 64, 16)}, "shape"),
        ({"spacing": (1.0, -1.0, 2.0)}, "spacing"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"modality": "ct", "seed": 0, **kwargs}
    with pytest.raises(APLError, match=match):
        make_phantom(args.pop("modality"), args.pop("seed"), **args)


def test_write_phantom_into_a_file_path_fails(tmp_path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(APLError, match="is a file"):
        write_phantom(target, "ct", 0, shape=(16, 16, 8))
