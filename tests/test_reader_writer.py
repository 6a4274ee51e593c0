"""Reader and writer contributions: geometry kept, labels back on the original grid, bad files handled."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Layer

from napari_apl._layers import (
    META_KEY,
    ScanGeometry,
    geometry_of,
    layer_world_matrix,
    swap_affine,
    to_canonical_order,
)
from napari_apl._reader import NULL_LAYER, get_reader, read_layer_data, read_nifti
from napari_apl._sample_data import SAMPLE_IMAGE_NAME, SAMPLE_LABELS_NAME, phantom_layers
from napari_apl._writer import LayerNotSaved, nifti_path, write_image, write_labels
from napari_apl.core.labels import LABEL_COLORS

ORIENTATIONS = ["RAS", "LAS", "LPS"]


def as_layer(layer_data: tuple) -> Layer:
    """Build a napari layer (no viewer) from a reader's layer data tuple."""
    data, kwargs, kind = layer_data
    return Layer.create(data, kwargs, kind)


def world_centroid_napari(layer: Layer, label: int) -> np.ndarray:
    """World position (x_R, y_A, z_S mm) of a label's centroid according to napari's transform."""
    idx = np.argwhere(np.asarray(layer.data) == label).mean(axis=0)
    world = np.asarray(layer.data_to_world(idx), dtype=np.float64)
    return world[::-1]


def world_centroid_nibabel(path: Path, label: int) -> np.ndarray:
    """World position (x_R, y_A, z_S mm) of a label's centroid according to nibabel's affine."""
    img = nib.load(str(path))
    idx = np.argwhere(np.asarray(img.dataobj) == label).mean(axis=0)
    return (img.affine @ np.append(idx, 1.0))[:3]


def state(layer: Layer) -> dict:
    """The attributes dict napari passes to a writer."""
    return layer._get_state()


def test_get_reader_only_takes_nifti(tmp_path: Path) -> None:
    assert get_reader(str(tmp_path / "scan.tif")) is None
    assert get_reader(str(tmp_path / "scan.nii.zip")) is None
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.png")]) is None
    assert callable(get_reader(str(tmp_path / "scan.nii.gz")))
    assert callable(get_reader(str(tmp_path / "SCAN.NII")))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_reader_geometry_matches_nibabel(phantom_files, orientation: str) -> None:
    image_path, labels_path = phantom_files(orientation)
    image = read_layer_data(image_path)
    labels = read_layer_data(labels_path)
    assert image[2] == "image" and labels[2] == "labels"
    assert labels[0].dtype == np.uint8
    img_nii = nib.load(str(image_path))
    # (Z, Y, X) = (S, A, R) data, scale = canonical spacing reversed, translate = canonical origin reversed
    canonical = nib.as_closest_canonical(img_nii)
    assert image[0].shape == canonical.shape[::-1]
    np.testing.assert_allclose(image[1]["scale"], np.asarray(canonical.header.get_zooms()[:3])[::-1])
    np.testing.assert_allclose(image[1]["translate"], canonical.affine[:3, 3][::-1])
    assert labels[1]["scale"] == image[1]["scale"] and labels[1]["translate"] == image[1]["translate"]
    np.testing.assert_array_equal(image[0], np.asarray(canonical.dataobj).transpose(2, 1, 0))
    # the image reaches napari as a C-contiguous view of the one array read, not a transposed copy
    assert image[0].flags.c_contiguous and not image[0].flags.owndata
    # every organ's centroid sits at the same world position in napari and in nibabel
    lab_layer = as_layer(labels)
    for organ in (1, 2, 3, 4):
        np.testing.assert_allclose(
            world_centroid_napari(lab_layer, organ), world_centroid_nibabel(labels_path, organ), atol=1e-6
        )
    geom = geometry_of(image[1]["metadata"])
    assert isinstance(geom, ScanGeometry)
    np.testing.assert_array_equal(geom.original_affine, img_nii.affine)
    copy = pickle.loads(pickle.dumps(geom))  # small: the voxels are not in it
    assert len(pickle.dumps(geom)) < 20_000 and copy.shape == geom.shape
    np.testing.assert_array_equal(
        copy.with_data(labels[0].T).to_original(labels[0].T), np.asarray(nib.load(str(labels_path)).dataobj)
    )
    assert image[1]["metadata"][META_KEY]["source_path"] == str(Path(image_path).absolute())
    # organ colours and names come from core.labels
    assert labels[1]["colormap"][1] == LABEL_COLORS[1]
    assert labels[1]["features"]["name"][1] == "liver"


def test_public_world_matrix_matches_napari(phantom_files) -> None:
    layer = as_layer(read_layer_data(phantom_files("LPS")[1]))
    np.testing.assert_allclose(layer_world_matrix(layer), layer._data_to_world.affine_matrix)


def test_oblique_scan_gets_full_affine(tmp_path: Path, phantom_files) -> None:
    _, labels_path = phantom_files("RAS")
    src = nib.load(str(labels_path))
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = src.affine.copy()
    affine[:3, :3] = rot @ src.affine[:3, :3]
    path = tmp_path / "oblique_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), affine), str(path))
    data, kwargs, kind = read_layer_data(path)
    assert "affine" in kwargs and "scale" not in kwargs
    layer = as_layer((data, kwargs, kind))
    for organ in (1, 4):
        np.testing.assert_allclose(
            world_centroid_napari(layer, organ), world_centroid_nibabel(path, organ), atol=1e-6
        )
    out = tmp_path / "oblique_out.nii.gz"
    write_labels(str(out), layer.data, state(layer))
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_painted_labels_go_back_to_the_original_grid(tmp_path: Path, phantom_files, orientation: str) -> None:
    image_path, labels_path = phantom_files(orientation)
    layer = as_layer(read_layer_data(labels_path))
    layer.data[5, 10:14, 20:26] = 3  # paint in napari's (Z, Y, X) order
    out = tmp_path / "painted.nii.gz"
    written = write_labels(str(out), layer.data, state(layer))
    assert written == [str(out)]
    back = nib.load(str(out))
    src = nib.load(str(labels_path))
    img = nib.load(str(image_path))
    assert back.shape == src.shape
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_array_equal(back.affine, img.affine)
    assert back.header.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(back.affine) == tuple(orientation)
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (
        int(src.header["qform_code"]),
        int(src.header["sform_code"]),
    )
    # the painted voxels sit at the same world positions in the file as in napari
    np.testing.assert_allclose(world_centroid_nibabel(out, 3), world_centroid_napari(layer, 3), atol=1e-6)
    # outside the painted box nothing moved
    expected = np.asarray(src.dataobj).copy()
    canonical = nib.as_closest_canonical(src)
    painted_can = np.asarray(canonical.dataobj).copy()
    painted_can[20:26, 10:14, 5] = 3
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(canonical.affine), nib.io_orientation(src.affine)
    )
    expected = nib.orientations.apply_orientation(painted_can, ornt)
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)


def test_writer_never_overwrites(tmp_path: Path, phantom_files) -> None:
    layer = as_layer(read_layer_data(phantom_files("LAS")[1]))
    out = tmp_path / "labels_out.nii.gz"
    write_labels(str(out), layer.data, state(layer))
    before = out.read_bytes()
    layer.data[:] = 0
    with pytest.raises(LayerNotSaved, match="exists already"):
        write_labels(str(out), layer.data, state(layer))
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_writer_keeps_label_dtypes_and_writes_scaled_ct_as_float32(tmp_path: Path, phantom_files) -> None:
    image_path, labels_path = phantom_files("LAS")
    src = nib.load(str(labels_path))
    int16 = tmp_path / "labels_i16.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj).astype(np.int16), src.affine), int16)
    assert nib.load(int16).header.get_data_dtype() == np.int16
    layer = as_layer(read_layer_data(int16))
    back = nib.load(write_labels(str(tmp_path / "out_labels.nii.gz"), layer.data, state(layer))[0])
    assert back.header.get_data_dtype() == np.int16  # the file's own label type, not uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))
    # an int16 CT stored with a slope and an intercept reads as floats, and is written as float32
    ct = nib.load(str(image_path))
    raw = np.asarray(ct.dataobj).astype(np.int16)
    scaled = nib.Nifti1Image(raw, ct.affine)
    scaled.header.set_slope_inter(0.5, -1024.0)
    scaled_path = tmp_path / "scaled.nii.gz"
    nib.save(scaled, scaled_path)
    layer = as_layer(read_layer_data(scaled_path))
    back = nib.load(write_image(str(tmp_path / "out_ct.nii.gz"), layer.data, state(layer))[0])
    assert back.header.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.get_fdata(), raw * 0.5 - 1024.0)


def test_writer_refusals_name_a_way_out(tmp_path: Path, phantom_files) -> None:
    layer = as_layer(read_layer_data(phantom_files("RAS")[1]))
    out = tmp_path / "labels.nii.gz"
    write_labels(str(out), layer.data, state(layer))
    with pytest.raises(LayerNotSaved, match="save under another name"):
        write_labels(str(out), layer.data, state(layer))
    rgb = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(LayerNotSaved, match="RGB"):
        write_image(str(tmp_path / "photo.nii.gz"), rgb, {"metadata": {}, "rgb": True})


def test_writer_refuses_the_source_file_and_non_3d(tmp_path: Path, phantom_files) -> None:
    _, labels_path = phantom_files("RAS")
    layer = as_layer(read_layer_data(labels_path))
    with pytest.raises(LayerNotSaved):
        write_labels(str(labels_path), layer.data, state(layer))
    with pytest.raises(LayerNotSaved, match="3-D"):
        write_labels(str(tmp_path / "flat.nii.gz"), np.zeros((4, 4), np.uint8), {"metadata": {}})


def test_writer_adds_suffix_and_writes_images(tmp_path: Path, phantom_files) -> None:
    image_path, _ = phantom_files("LPS")
    layer = as_layer(read_layer_data(image_path))
    assert nifti_path(tmp_path / "ct") == tmp_path / "ct.nii.gz"
    written = write_image(str(tmp_path / "ct"), layer.data, state(layer))
    back = nib.load(written[0])
    src = nib.load(str(image_path))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))
    np.testing.assert_array_equal(back.affine, src.affine)
    assert back.header.get_data_dtype() == src.header.get_data_dtype()


def test_layer_without_metadata_is_written_with_its_transform(tmp_path: Path, phantom_files) -> None:
    image_path, _ = phantom_files("LPS")
    image = as_layer(read_layer_data(image_path))
    # a labels layer a user makes by hand over the CT: same transform, no napari-apl metadata
    painted = Layer.create(
        np.zeros(image.data.shape, np.uint8), {"scale": image.scale, "translate": image.translate}, "labels"
    )
    painted.data[3:6, 30:40, 12:20] = 2
    out = tmp_path / "hand_made.nii.gz"
    write_labels(str(out), painted.data, state(painted))
    np.testing.assert_allclose(world_centroid_nibabel(out, 2), world_centroid_napari(painted, 2), atol=1e-6)
    # ... and it lines up with the CT voxel for voxel once both are in canonical order
    ct = nib.as_closest_canonical(nib.load(str(image_path)))
    back = nib.as_closest_canonical(nib.load(str(out)))
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-6)


def test_broken_files_notify_and_open_nothing(tmp_path: Path, notifications: list[str]) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 100)
    assert read_nifti(str(bad)) == NULL_LAYER
    assert read_nifti(str(truncated)) == NULL_LAYER
    assert len(notifications) == 2
    assert all("\n" not in m and "broken" in notifications[0] for m in notifications)
    assert "truncated" in notifications[1]


def test_float_label_files_open_as_labels(tmp_path: Path, phantom_files) -> None:
    _, labels_path = phantom_files("LAS")
    src = nib.load(str(labels_path))
    path = tmp_path / "label_7.nii.gz"  # CHAOS-style: float64 labels named label_N
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj).astype(np.float64), src.affine), str(path))
    data, _, kind = read_layer_data(path)
    assert kind == "labels" and data.dtype == np.uint8
    # a float image with many values stays an image even with a mask-like name
    noisy = tmp_path / "mask_noise.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4)), np.eye(4)), str(noisy))
    assert read_layer_data(noisy)[2] == "image"


class _CountingArray:
    """A lazy volume stand-in: records each block read from it."""

    def __init__(self, data: np.ndarray) -> None:
        self._data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key: tuple) -> np.ndarray:
        self.reads.append(key)
        return self._data[key]


@pytest.mark.parametrize("orientation", ["LPS", "PIL"])
def test_the_label_rule_is_the_cores_and_probes_lazy_volumes_cheaply(
    tmp_path: Path, phantom_files, orientation: str
) -> None:
    """The reader's label rule lives in core.preprocess (the command line refuses label files with it);
    a lazily read volume is judged on a few of its file's slices, not read whole."""
    import napari_apl._reader as reader_module
    from napari_apl.core import preprocess
    from napari_apl.core.volume import load_volume

    assert reader_module.LABEL_NAME_HINT is preprocess.LABEL_NAME_HINT
    image_path, labels_path = phantom_files(orientation)
    for lazy in (True, False):
        assert preprocess.volume_looks_like_labels(load_volume(labels_path, lazy=lazy))
        assert not preprocess.volume_looks_like_labels(load_volume(image_path, lazy=lazy))
    lazy_labels = load_volume(labels_path, lazy=True)
    assert not reader_module.looks_like_labels(lazy_labels)  # the viewer opens a lazy file as an image
    assert reader_module.looks_like_labels(load_volume(labels_path), labels_path.name)
    labels = np.asarray(nib.load(str(labels_path)).dataobj)
    counting = _CountingArray(labels)
    assert preprocess.probe_looks_like_labels(counting)
    assert 0 < len(counting.reads) <= preprocess.LABEL_PROBE_SLICES
    assert all(key[2].stop - key[2].start == 1 for key in counting.reads)  # one file slice each
    # floats are labels only under a label-ish name; negative values, many values or one value are not
    floats = labels.astype(np.float64)
    assert preprocess.probe_looks_like_labels(floats, "label_7.nii.gz")
    assert not preprocess.probe_looks_like_labels(floats, "scan.nii.gz")
    assert not preprocess.probe_looks_like_labels(labels.astype(np.int16) - 1)
    assert not preprocess.probe_looks_like_labels(np.arange(labels.size).reshape(labels.shape))
    assert not preprocess.probe_looks_like_labels(np.zeros_like(labels))  # empty mask or blank scan
    ct = np.asarray(nib.load(str(image_path)).dataobj)
    assert not preprocess.probe_looks_like_labels(np.abs(ct).astype(np.uint16))


def test_ct_files_open_in_the_abdomen_window_hu_or_hu_plus_1024(tmp_path: Path, phantom_files) -> None:
    image_path, _ = phantom_files("RAS")
    src = nib.load(str(image_path))
    hu = np.asarray(src.dataobj).astype(np.int32)
    raw = tmp_path / "raw_ct.nii.gz"
    img = nib.Nifti1Image((hu + 1024).astype(np.uint16), src.affine)
    img.header.set_slope_inter(1, 0)
    nib.save(img, str(raw))
    _, meta, kind = read_layer_data(image_path)
    assert kind == "image" and tuple(meta["contrast_limits"]) == (-160.0, 240.0)
    _, meta, kind = read_layer_data(raw)
    assert kind == "image" and tuple(meta["contrast_limits"]) == (864.0, 1264.0)
    mri_path, _ = phantom_files("RAS", modality="mri")
    assert "contrast_limits" not in read_layer_data(mri_path)[1]


def test_sample_data_layers(tmp_path: Path) -> None:
    image, labels = phantom_layers(shape=(48, 48, 8), spacing=(5.0, 5.0, 12.0))
    assert image[1]["name"] == SAMPLE_IMAGE_NAME and labels[1]["name"] == SAMPLE_LABELS_NAME
    assert image[0].dtype == np.int16 and labels[2] == "labels"
    assert image[0].shape == (8, 48, 48)
    assert image[1]["scale"] == labels[1]["scale"] == (12.0, 5.0, 5.0)
    layer = as_layer(labels)
    out = tmp_path / "sample_labels.nii.gz"
    write_labels(str(out), layer.data, state(layer))
    back = nib.load(str(out))
    np.testing.assert_array_equal(
        np.asarray(nib.as_closest_canonical(back).dataobj), to_canonical_order(labels[0])
    )
    geom = geometry_of(image[1]["metadata"])
    np.testing.assert_allclose(swap_affine(swap_affine(geom.affine)), geom.affine)


@pytest.mark.realdata
@pytest.mark.parametrize("stem", ["ct_sm", "mr_sm"])
def test_totalseg_round_trip(data_dir: Path, tmp_path: Path, stem: str) -> None:
    folder = data_dir / "totalseg"
    image_path, labels_path = folder / f"{stem}.nii.gz", folder / f"{stem}_labels.nii.gz"
    if not labels_path.exists():
        pytest.skip(f"{labels_path} not found")
    image = as_layer(read_layer_data(image_path))
    labels = as_layer(read_layer_data(labels_path))
    assert isinstance(labels.data, np.ndarray) and labels.data.dtype == np.uint8
    np.testing.assert_allclose(layer_world_matrix(image), layer_world_matrix(labels))
    for organ in (1, 2, 3, 4):
        np.testing.assert_allclose(
            world_centroid_napari(labels, organ), world_centroid_nibabel(labels_path, organ), atol=1e-4
        )
    out = tmp_path / f"{stem}_labels_copy.nii.gz"
    write_labels(str(out), labels.data, state(labels))
    back, src = nib.load(str(out)), nib.load(str(labels_path))
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj).astype(np.uint8))


@pytest.mark.viewer
def test_open_and_save_through_napari(
    make_napari_viewer, phantom_files, tmp_path: Path, notifications, monkeypatch
) -> None:
    """The viewer's File > Open / Save Selected Layers go through this plugin, with no dialog."""
    viewer = make_napari_viewer()
    image_path, labels_path = phantom_files("LPS")
    [image] = viewer.open(str(image_path), plugin="napari-apl")
    [labels] = viewer.open(str(labels_path), plugin="napari-apl")
    assert type(image).__name__ == "Image" and type(labels).__name__ == "Labels"
    assert image.units == labels.units and str(image.units[0]) == "millimeter"
    labels.data[4, 30:34, 30:34] = 4
    viewer.layers.selection = {labels}
    out = tmp_path / "edited_labels.nii.gz"
    written = viewer.layers.save(str(out), selected=True, plugin="napari-apl")
    assert written == [str(out)]
    back, src = nib.load(str(out)), nib.load(str(labels_path))
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_allclose(world_centroid_nibabel(out, 4), world_centroid_napari(labels, 4), atol=1e-6)
    before = out.read_bytes()
    # a refusal reaches the caller as one line (a writer's ValueError napari would hide behind a vague
    # "not a valid writer" warning), and File > Save shows it as napari's error notification
    with pytest.raises(OSError, match=r"not saved: edited_labels\.nii\.gz exists already") as refused:
        viewer.layers.save(str(out), selected=True, plugin="napari-apl")
    assert "\n" not in str(refused.value) and out.read_bytes() == before
    from napari.plugins import _npe2
    from qtpy.QtWidgets import QFileDialog

    filters = _npe2.file_extensions_string_for_layers([labels])[0].split(";;")
    [ours] = [f for f in filters if "NIfTI" in f]  # the user picks this plugin's file type
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ours))
    with pytest.raises(OSError, match="exists already") as refused:
        viewer.window._qt_viewer._save_layers_dialog(selected=True)
    assert "save failed" not in str(refused.value) and out.read_bytes() == before
    assert notifications == []  # napari's own notification is the only one
    bad = tmp_path / "not_a_scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    assert viewer.open(str(bad), plugin="napari-apl") == []
    assert len(viewer.layers) == 2 and "not_a_scan" in notifications[-1]


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_a_big_label_file_opens_as_labels(tmp_path: Path, phantom_files, monkeypatch, dtype) -> None:
    """A label file over the lazy size opens as Labels (held as uint8), float ones (as CHAOS stores them)
    too: those opened as a lazy image."""
    import napari_apl._reader as reader_module

    image_path, labels_path = phantom_files("RAS")
    src = nib.load(str(labels_path))
    arr = np.asarray(src.dataobj).astype(dtype)
    monkeypatch.setattr(reader_module, "LAZY_BYTES", arr.size + 1)  # its own type: over; 1 byte: under
    seg = tmp_path / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(arr, src.affine), seg)
    data, _kwargs, kind = read_layer_data(seg)
    assert kind == "labels" and data.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(data).transpose(2, 1, 0), arr.astype(np.uint8))
    image = tmp_path / "case_ct.nii.gz"  # the same voxels without a label-like name stay a lazy image
    nib.save(nib.Nifti1Image(arr, src.affine), image)
    assert read_layer_data(image)[2] == "image"
    if dtype == np.float64:  # a float image whose name only hints labels stays lazy (no labels in it)
        ct = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float64) + 0.5
        masked = tmp_path / "ct_masked.nii.gz"
        nib.save(nib.Nifti1Image(ct, src.affine), masked)
        assert reader_module._should_be_lazy(masked)
    # one that cannot be read whole at its own size still opens (lazily), as before
    monkeypatch.setenv("NAPARI_APL_MAX_VOXEL_BYTES", str(2 * arr.size))
    data, _kwargs, kind = read_layer_data(seg)
    assert kind == "image" and data.shape == arr.shape[::-1]


def test_a_scaled_file_is_sized_as_the_float64_it_becomes(tmp_path: Path, phantom_files, monkeypatch) -> None:
    """The reader decides lazy or whole from what the file becomes in memory: scaled voxels are float64."""
    import napari_apl._reader as reader_module

    image_path, _ = phantom_files("RAS")
    src = nib.load(str(image_path))
    arr = (np.asarray(src.dataobj) + 1024).astype(np.uint16)
    img = nib.Nifti1Image(arr, src.affine)
    img.header.set_slope_inter(1.0, -1024.0)
    scaled = tmp_path / "scaled_ct.nii.gz"
    nib.save(img, str(scaled))
    monkeypatch.setattr(reader_module, "LAZY_BYTES", arr.size * 4)  # 2 bytes a voxel: under; 8: over
    assert reader_module._should_be_lazy(scaled)
    plain = tmp_path / "plain_ct.nii.gz"
    nib.save(nib.Nifti1Image(arr, src.affine), str(plain))
    assert not reader_module._should_be_lazy(plain)


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_trailing_axes_of_length_one_come_back(tmp_path: Path, phantom_files, extra: tuple) -> None:
    """A scan stored as (X, Y, Z, 1) gets (X, Y, Z, 1) outputs: from predict (streamed, and written at the
    end with --largest-component) and from the napari writer; the voxels are those of the 3-D scan's."""
    from _tiny import write_tiny_checkpoint

    from napari_apl.cli import main

    image_path, labels_path = phantom_files("LPS")
    src = nib.load(str(image_path))
    data = np.asarray(src.dataobj)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data.reshape(data.shape + extra), src.affine, src.header), str(four))
    ck = write_tiny_checkpoint(tmp_path / "tiny.pt")
    assert main(["predict", str(image_path), "-c", str(ck), "-o", str(tmp_path / "three"), "-q"]) == 0
    for out, flags in (("streamed", []), ("at_end", ["--largest-component"])):
        assert main(["predict", str(four), "-c", str(ck), "-o", str(tmp_path / out), "-q", *flags]) == 0
        for name in ("pseudo_label", "confidence"):
            got = nib.load(str(tmp_path / out / f"{name}.nii.gz"))
            assert got.shape == data.shape + extra and int(got.header["dim"][0]) == 3 + len(extra)
            np.testing.assert_array_equal(got.affine, src.affine)
            if out == "streamed":
                want = np.asarray(nib.load(str(tmp_path / "three" / f"{name}.nii.gz")).dataobj)
                np.testing.assert_array_equal(np.asarray(got.dataobj).reshape(want.shape), want)
    # the napari reader and writer: a labels layer of the 4-D file is saved back 4-D
    lab = nib.load(str(labels_path))
    four_labels = tmp_path / "four_labels.nii.gz"
    lab_data = np.asarray(lab.dataobj)
    nib.save(
        nib.Nifti1Image(lab_data.reshape(lab_data.shape + extra), lab.affine, lab.header), str(four_labels)
    )
    layer = as_layer(read_layer_data(four_labels))
    saved = tmp_path / "saved.nii.gz"
    assert write_labels(str(saved), layer.data, state(layer)) == [str(saved)]
    back = nib.load(str(saved))
    assert back.shape == lab_data.shape + extra
    np.testing.assert_array_equal(np.asarray(back.dataobj).reshape(lab_data.shape), lab_data)


def test_a_lazily_read_scan_with_nan_is_shown_with_one_warning(
    make_napari_viewer, tmp_path: Path, monkeypatch
):
    """A NaN slice of a lazily read scan raised inside napari's slicing: a traceback notification each
    time the slider reached it, and the slice never drawn. It is now drawn and said once."""
    import napari.utils.notifications as nn

    import napari_apl._reader as reader_module

    warned: list[str] = []
    monkeypatch.setattr(nn, "show_warning", lambda message: warned.append(str(message)))
    data = np.linspace(-100, 300, 24 * 20 * 16, dtype=np.float32).reshape(24, 20, 16)
    data[:, :, 5] = np.nan  # axial slice 5
    path = tmp_path / "nan_ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    monkeypatch.setattr(reader_module, "LAZY_BYTES", 1000)  # stands in for a file over 1 GiB
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-apl")
    assert layer.data.__class__.__name__ == "Array"  # dask: read lazily
    for z in (4, 5, 6, 5):
        viewer.dims.set_current_step(0, z)
    shown = np.asarray(layer.data[5])
    assert np.isnan(shown).all() and np.array_equal(np.asarray(layer.data[4]), data[:, :, 4].T)
    assert len(warned) == 1 and "NaN or Inf" in warned[0] and "cannot be predicted" in warned[0]
    # what computes on the voxels still refuses them
    from napari_apl._layers import volume_from_layer
    from napari_apl.core.errors import VolumeError
    from napari_apl.core.volume import load_volume

    with pytest.raises(VolumeError, match="NaN or Inf"):
        load_volume(path, lazy=True).data[:, :, 5].compute()
    assert volume_from_layer(layer).data.shape == (24, 20, 16)


@pytest.mark.parametrize(
    "name",
    [
        "t2_unlabeled.nii.gz",
        "sub-01_T2w_masked.nii.gz",
        "T2_presegmentation.nii.gz",
        "liver_annotated.nii.gz",
    ],
)
def test_a_scan_with_a_label_like_word_inside_its_name_is_still_a_scan(tmp_path: Path, name: str) -> None:
    """A real scan named "unlabeled", "masked", "presegmentation" or "annotated" was refused by the
    command line (and opened as labels) when it held at most 1024 grey levels; a uint8 MRI with 32 grey
    levels was refused however it was named. Label names are whole words now, the command line's rule
    stays at 64 values whatever the name, and labels must be piecewise constant: a scan's texture is not."""
    from napari_apl.core import preprocess
    from napari_apl.core.phantom import make_phantom
    from napari_apl.core.volume import load_volume

    image, labels, affine = make_phantom("mri", 0, shape=(96, 96, 12), spacing=(3.0, 3.0, 6.0))
    mri = np.clip(image / image.max() * 800, 0, 800).astype(np.int16)  # a few hundred grey levels
    assert 64 < np.unique(mri).size <= preprocess.MAX_HINTED_LABEL_VALUES and mri.min() >= 0
    path = tmp_path / name
    nib.save(nib.Nifti1Image(mri, affine), str(path))
    assert not preprocess.LABEL_NAME_HINT.search(name)
    for lazy in (True, False):
        assert not preprocess.volume_looks_like_labels(load_volume(path, lazy=lazy))
    assert read_layer_data(path)[2] == "image"
    levels = (np.round(mri / 800 * 31) * 8).astype(np.uint8)  # 32 grey levels in uint8
    assert 2 < np.unique(levels).size <= preprocess.MAX_LABEL_VALUES
    assert not preprocess.probe_looks_like_labels(levels, "mri_u8.nii.gz")
    assert not preprocess.looks_like_labels(levels, "mri_u8.nii.gz")
    # the phantom's own labels, under a label name or none, still are labels
    for label_name in ("case_seg.nii.gz", "organs.nii.gz", "ground_truth.nii.gz"):
        assert preprocess.probe_looks_like_labels(labels.astype(np.uint8), label_name)
        assert preprocess.looks_like_labels(labels.astype(np.uint8), label_name)
