"""Tests for core.volume: canonical orientation round trips, validation, writing, lazy loading, SliceGrid."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_apl.core.errors import OutputError, OutputExistsError, VolumeError
from napari_apl.core.volume import (
    MAX_VOXEL_BYTES_ENV,
    SliceGrid,
    Volume,
    load_volume,
    save_canonical,
    save_nifti,
    volume_from_array,
)

SPACING = (0.8, 1.5, 5.0)
SHAPE = (11, 9, 6)


def _rotation(deg_z: float, deg_x: float = 0.0) -> np.ndarray:
    """Rotation about z then x (degrees)."""
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rx @ rz


def _affine(rot: np.ndarray, spacing=SPACING, origin=(-10.0, 20.0, 30.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


# Columns of the 3x3 part: file axis i -> world direction. "PIR": axis0 -> P, axis1 -> I, axis2 -> R.
ORIENTATIONS = {
    "RAS": _affine(np.eye(3)),
    "LAS": _affine(np.diag([-1.0, 1.0, 1.0])),
    "LPS": _affine(np.diag([-1.0, -1.0, 1.0])),
    "PIR": _affine(np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]])),
    "oblique": _affine(_rotation(20.0, 7.0) @ np.diag([-1.0, 1.0, 1.0])),
}
EXPECTED_CODES = {
    "RAS": ("R", "A", "S"),
    "LAS": ("L", "A", "S"),
    "LPS": ("L", "P", "S"),
    "PIR": ("P", "I", "R"),
    "oblique": ("L", "A", "S"),
}
CODES = [(1, 1), (0, 2), (2, 0), (1, 2)]


def _write(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 0, scode: int = 2) -> Path:
    """Write a NIfTI with chosen qform/sform codes (the file's data type is the array's)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    if qcode:
        hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    img = nib.Nifti1Image(data, None, header=hdr)  # no affine: the header's codes are kept as set
    nib.save(img, str(path))
    assert (int(nib.load(str(path)).header["qform_code"]), int(nib.load(str(path)).header["sform_code"])) == (
        qcode,
        scode,
    )
    return path


def _raw(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _distinct(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    """Data where every voxel value is unique, so any reorientation mistake shows."""
    return (np.arange(math.prod(shape)).reshape(shape) - 100).astype(dtype)


def _assert_one_line(exc: pytest.ExceptionInfo, fragment: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert fragment in msg, msg


# ---------------------------------------------------------------- canonical round trips


@pytest.mark.parametrize("name", list(ORIENTATIONS))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_canonical_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    affine = ORIENTATIONS[name]
    data = _distinct()
    path = _write(tmp_path / f"img{suffix}", data, affine)
    assert nib.aff2axcodes(nib.load(str(path)).affine) == EXPECTED_CODES[name]

    vol = load_volume(path)
    assert isinstance(vol, Volume)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.original_shape == SHAPE
    assert vol.original_dtype == np.int16 and vol.data.dtype == np.int16
    assert np.allclose(vol.original_affine, affine)
    assert vol.path == path.absolute()
    # axial slices contiguous: napari's (Z, Y, X) order is a C-contiguous view, no copy on the way in
    assert vol.data.flags["F_CONTIGUOUS"] and vol.data.T.flags["C_CONTIGUOUS"]
    # Exact inverse, both ways.
    back = vol.to_original(vol.data)
    assert back.shape == SHAPE and np.array_equal(back, data)
    assert np.array_equal(vol.from_original(data), vol.data)
    # Canonical spacing is the file spacing permuted.
    assert sorted(vol.spacing) == pytest.approx(sorted(SPACING))
    # The canonical affine keeps the rotation (oblique) and only permutes/flips axes.
    assert abs(np.linalg.det(vol.affine[:3, :3])) == pytest.approx(abs(np.linalg.det(affine[:3, :3])))
    # Same voxel -> same world coordinate, checked on several voxels through the voxel values.
    inv = np.linalg.inv(affine)
    rng = np.random.default_rng(0)
    for c in [
        (0, 0, 0),
        tuple(s - 1 for s in vol.shape),
        *(tuple(rng.integers(0, vol.shape)) for _ in range(8)),
    ]:
        world = vol.affine @ np.array([*c, 1.0])
        o = inv @ world
        oi = np.round(o[:3]).astype(int)
        assert np.allclose(o[:3], oi, atol=1e-6)
        assert data[tuple(oi)] == vol.data[c]


@pytest.mark.parametrize("name", ["RAS", "LPS", "PIR", "oblique"])
@pytest.mark.parametrize("codes", CODES)
def test_save_round_trip_keeps_affine_and_codes(tmp_path: Path, name: str, codes: tuple[int, int]) -> None:
    affine = ORIENTATIONS[name]
    data = _distinct(dtype=np.float32) / 7.0
    src = _write(tmp_path / "img.nii.gz", data, affine, *codes)
    vol = load_volume(src)
    out = save_nifti(vol.to_original(vol.data), tmp_path / "out.nii.gz", vol)
    assert out == (tmp_path / "out.nii.gz").absolute()
    ref, new = nib.load(str(src)), nib.load(str(out))
    assert np.array_equal(np.asarray(new.dataobj), data)
    assert new.get_data_dtype() == np.float32
    assert np.allclose(new.affine, ref.affine)
    assert (int(new.header["qform_code"]), int(new.header["sform_code"])) == codes
    assert np.allclose(new.header.get_zooms(), ref.header.get_zooms())
    # save_canonical is the same through to_original; labels are written as uint8.
    labels = (vol.data > vol.data.mean()).astype(np.uint8) * 3
    out2 = save_canonical(labels, tmp_path / "labels.nii", vol)
    re = nib.load(str(out2))
    assert re.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(re.dataobj), vol.to_original(labels))
    assert np.allclose(re.affine, ref.affine)
    assert np.array_equal(load_volume(out2).data, labels)


def test_save_dtypes_and_trailing_axes(tmp_path: Path) -> None:
    vol = load_volume(_write(tmp_path / "img.nii.gz", _distinct(), ORIENTATIONS["LPS"]))
    mask = vol.data > 0
    p = save_canonical(mask, tmp_path / "mask.nii.gz", vol)
    assert nib.load(str(p)).get_data_dtype() == np.uint8
    labels64 = mask.astype(np.int64) * 4
    p = save_canonical(labels64, tmp_path / "l64.nii.gz", vol)
    assert nib.load(str(p)).get_data_dtype() == np.uint8
    p = save_canonical(vol.data.astype(np.float64), tmp_path / "f.nii.gz", vol, dtype=np.int16)
    assert nib.load(str(p)).get_data_dtype() == np.int16
    with pytest.raises(OutputError) as exc:
        save_canonical(vol.data + 0.5, tmp_path / "bad.nii.gz", vol, dtype=np.uint8)
    _assert_one_line(exc, "bad.nii.gz")
    # Probability-like maps with a trailing channel axis.
    probs = np.stack([vol.data, -vol.data], axis=-1).astype(np.float32)
    orig = vol.to_original(probs)
    assert orig.shape == (*SHAPE, 2)
    assert np.array_equal(vol.from_original(orig), probs)
    p = save_nifti(orig, tmp_path / "probs.nii.gz", vol)
    assert np.array_equal(np.asarray(nib.load(str(p)).dataobj), orig)
    with pytest.raises(OutputError) as exc:
        save_nifti(vol.data[:-1], tmp_path / "shape.nii.gz", vol)
    _assert_one_line(exc, "does not match")
    with pytest.raises(OutputError):
        save_nifti(orig, tmp_path / "x.png", vol)


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_gzip_writer_bytes_equal_nibabel_and_plain(tmp_path: Path, monkeypatch, deflate: str) -> None:
    """A .nii.gz holds exactly the .nii's bytes (one standard gzip member), with ISA-L or with zlib."""
    import io
    import sys

    from napari_apl.core import io_utils

    if deflate == "isal":
        pytest.importorskip("isal.igzip")
    else:
        monkeypatch.setitem(sys.modules, "isal.igzip", None)  # as if isal were not installed
    with open(tmp_path / "probe.gz", "wb") as raw, io_utils.gzip_writer(raw) as gz:
        gz.write(b"x")
    kind = type(gz._gz).__name__
    assert kind == ("IGzipFile" if deflate == "isal" else "GzipFile")
    # the bytes depend on the content only, not on how it was split into writes (streamed vs at once):
    # content like a label map (long runs of a few values), which ISA-L alone compresses differently
    # depending on the split
    arr = np.zeros(3_500_000, np.uint8)
    arr[::5] = 1
    arr[1000:900_000] = 7
    content = arr.tobytes()
    steps = (len(content), 262_144, 999_983, 4_096 * 7 + 5)

    def written(step: int, writer) -> bytes:
        with open(tmp_path / "split.gz", "wb") as raw, writer(raw) as gz:
            gz.write(content[:10])
            gz.seek(30)  # forward only: zeros, as nibabel pads to its data offset
            assert gz.tell() == 30
            for s in range(10, len(content), step):
                gz.write(content[s : s + step])
        return (tmp_path / "split.gz").read_bytes()

    files = [written(step, io_utils.gzip_writer) for step in steps]
    assert all(f == files[0] for f in files[1:])
    assert gzip.decompress(files[0]) == content[:10] + bytes(20) + content[10:]
    if deflate == "isal":  # what the fixed blocks are for
        from isal.igzip import IGzipFile

        def plain_isal(raw):
            return IGzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0)

        plain = [written(step, plain_isal) for step in steps]
        assert len(set(plain)) > 1
    with pytest.raises(ValueError):  # closed: nothing more is accepted
        gz.write(b"late")

    class FullDisk(io.BytesIO):
        def write(self, data) -> int:
            if self.tell() > 100:
                raise OSError(28, "No space left on device")
            return super().write(data)

    gz = io_utils.gzip_writer(FullDisk())
    gz.write(content[:500_000])
    with pytest.raises(OSError):
        gz.close()
    assert gz.closed  # a failed close still closes (a second close is a no-op, not an error)
    gz.close()
    vol = load_volume(_write(tmp_path / "img.nii.gz", _distinct(), ORIENTATIONS["PIR"]))
    data = vol.to_original(vol.data).astype(np.float32) / 3.0
    gz_path = save_nifti(data, tmp_path / "out.nii.gz", vol)
    plain = save_nifti(data, tmp_path / "out.nii", vol)
    blob = gz_path.read_bytes()
    assert blob[:2] == b"\x1f\x8b" and blob[3] == 0  # gzip magic; no file name stored
    assert gzip.decompress(blob) == plain.read_bytes()
    nib_path = tmp_path / "nibabel.nii.gz"
    nib.save(nib.load(str(plain)), str(nib_path))
    assert gzip.decompress(nib_path.read_bytes()) == plain.read_bytes()  # what nibabel itself writes
    assert np.array_equal(np.asarray(nib.load(str(gz_path)).dataobj), data)


def test_save_refuses_existing_and_input(tmp_path: Path) -> None:
    src = _write(tmp_path / "img.nii.gz", _distinct(), ORIENTATIONS["RAS"])
    vol = load_volume(src)
    arr = vol.to_original(vol.data)
    out = save_nifti(arr, tmp_path / "out.nii.gz", vol)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError) as exc:
        save_nifti(arr * 2, out, vol)
    _assert_one_line(exc, "out.nii.gz")
    assert out.read_bytes() == before
    save_nifti(arr * 2, out, vol, overwrite=True)
    assert np.array_equal(_raw(out), arr * 2)
    src_bytes = src.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputError) as exc:
            save_nifti(arr, src, vol, overwrite=overwrite)
        _assert_one_line(exc, "same file as an input")
        with pytest.raises(OutputError) as exc:
            save_nifti(arr, tmp_path / ".." / tmp_path.name / "img.nii.gz", vol, overwrite=overwrite)
        _assert_one_line(exc, "same file as an input")
    assert src.read_bytes() == src_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "out.nii.gz"]  # no temporaries


def test_scaled_file_and_squeezable_4d(tmp_path: Path) -> None:
    data = _distinct(dtype=np.float64) * 0.5 + 3.0
    img = nib.Nifti1Image(data, ORIENTATIONS["LAS"])
    img.set_data_dtype(np.int16)  # nibabel stores int16 with scl_slope/scl_inter
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol = load_volume(tmp_path / "scaled.nii.gz")
    assert vol.original_dtype == np.int16
    assert vol.data.dtype.kind == "f"
    assert np.array_equal(vol.to_original(vol.data), _raw(tmp_path / "scaled.nii.gz"))
    assert np.allclose(vol.to_original(vol.data), data, atol=0.01)  # int16 quantisation step ~0.0045

    four = _distinct()[..., None]
    p = _write(tmp_path / "four.nii.gz", four, ORIENTATIONS["LPS"])
    vol = load_volume(p)
    assert vol.original_shape == SHAPE
    assert np.array_equal(vol.to_original(vol.data), four[..., 0])
    lazy = load_volume(p, lazy=True)
    assert np.array_equal(lazy.data.compute(), vol.data)


@settings(max_examples=25, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
    shape=st.tuples(*[st.integers(1, 5)] * 3),
    angle=st.floats(-30, 30),
)
def test_orientation_property(perm, flips, shape, angle) -> None:
    rot = _rotation(angle)[:, perm] * np.array(flips)
    affine = _affine(rot, spacing=(1.0, 2.0, 3.0))
    data = _distinct(shape, np.int32)
    vol = volume_from_array(data, affine)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert np.array_equal(vol.to_original(vol.data), data)
    # Voxel (0,0,0) of the canonical grid is the same world point as the file voxel holding its value.
    idx = np.argwhere(data == vol.data[0, 0, 0])[0]
    assert np.allclose(vol.affine[:, 3], affine @ np.array([*idx, 1.0]))


def test_volume_from_array_and_dask(tmp_path: Path) -> None:
    import dask.array as da

    data = _distinct(dtype=np.float32)
    vol = volume_from_array(data, ORIENTATIONS["LPS"])
    assert vol.path is None and vol.original_shape == SHAPE
    assert np.array_equal(vol.to_original(vol.data), data)
    out = save_canonical(vol.data, tmp_path / "arr.nii.gz", vol)
    re = nib.load(str(out))
    assert np.allclose(re.affine, ORIENTATIONS["LPS"])
    assert np.array_equal(np.asarray(re.dataobj), data)
    lazy = volume_from_array(da.from_array(data, chunks=(11, 9, 2)), ORIENTATIONS["PIR"])
    eager = volume_from_array(data, ORIENTATIONS["PIR"])
    assert np.array_equal(lazy.data.compute(), eager.data)
    assert np.array_equal(lazy.to_original(lazy.data).compute(), data)
    t = torch.from_numpy(np.ascontiguousarray(eager.data))
    assert np.array_equal(eager.to_original(t).numpy(), data)
    bad = data.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(VolumeError):
        volume_from_array(bad, ORIENTATIONS["RAS"])
    with pytest.raises(VolumeError):
        volume_from_array(da.from_array(bad, chunks=(11, 9, 2)), ORIENTATIONS["RAS"]).data.compute()
    with pytest.raises(VolumeError) as exc:
        vol.to_original(np.zeros((3, 3, 3)))
    _assert_one_line(exc, "does not match")


# ---------------------------------------------------------------- lazy loading


@pytest.mark.parametrize("name", ["LPS", "PIR", "oblique"])
def test_lazy_equals_eager(tmp_path: Path, name: str) -> None:
    import dask.array as da

    p = _write(tmp_path / "img.nii.gz", _distinct(dtype=np.float32), ORIENTATIONS[name])
    eager = load_volume(p)
    lazy = load_volume(p, lazy=True)
    assert isinstance(lazy.data, da.Array) and lazy.lazy and not eager.lazy
    assert lazy.data.shape == eager.data.shape and lazy.data.dtype == eager.data.dtype
    assert lazy.data.chunks[2] == (1,) * eager.data.shape[2]  # one chunk per axial slice
    assert np.array_equal(lazy.data[:, :, 2].compute(), eager.data[:, :, 2])
    assert np.array_equal(lazy.data.compute(), eager.data)
    assert np.array_equal(lazy.to_original(lazy.data).compute(), _raw(p))
    assert np.allclose(lazy.affine, eager.affine)


def test_lazy_does_not_read_data_and_checks_nan_on_demand(tmp_path: Path) -> None:
    data = _distinct(dtype=np.float32)
    data[..., 4] = np.nan
    p = _write(tmp_path / "nan.nii", data, ORIENTATIONS["RAS"])
    vol = load_volume(p, lazy=True)  # header checks only: the NaN slice is not read yet
    assert np.array_equal(vol.data[:, :, 0].compute(), data[..., 0])
    with pytest.raises(VolumeError) as exc:
        vol.data.compute()
    _assert_one_line(exc, "NaN")
    # A truncated .nii.gz has a readable header: it loads lazily and fails, one line, when read.
    full = _write(tmp_path / "full.nii.gz", _distinct(dtype=np.float32), ORIENTATIONS["RAS"]).read_bytes()
    p2 = tmp_path / "late.nii.gz"
    p2.write_bytes(full[: len(full) * 2 // 3])
    vol2 = load_volume(p2, lazy=True)
    with pytest.raises(VolumeError) as exc:
        vol2.data.compute()
    _assert_one_line(exc, "late.nii.gz")


def test_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path / "img.nii.gz", _distinct(), ORIENTATIONS["RAS"])
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, "1000")
    with pytest.raises(VolumeError) as exc:
        load_volume(p)
    _assert_one_line(exc, MAX_VOXEL_BYTES_ENV)
    assert load_volume(p, lazy=True).data.shape == SHAPE  # lazy loading does not allocate
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, "lots")
    with pytest.raises(VolumeError):
        load_volume(p)
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, str(10**6))
    assert load_volume(p).data.shape == SHAPE


def test_size_limit_counts_scaled_voxels_as_float64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A uint16 CT with scl_slope/scl_inter is read as float64: the limit counts 8 bytes a voxel, not 2."""
    data = (_distinct() % 3000).astype(np.uint16)
    img = nib.Nifti1Image(data, ORIENTATIONS["RAS"])
    img.header.set_slope_inter(1.0, -1024.0)
    p = tmp_path / "scaled.nii.gz"
    nib.save(img, str(p))
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, str(data.size * 4))  # room for 2 bytes a voxel, not for 8
    with pytest.raises(VolumeError) as exc:
        load_volume(p)
    _assert_one_line(exc, MAX_VOXEL_BYTES_ENV)
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, str(data.size * 8))
    vol = load_volume(p)
    assert vol.data.dtype == np.float64 and vol.data.min() == -1024.0


def test_constant_volume_loads(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.nii.gz", np.full(SHAPE, 7, np.int16), ORIENTATIONS["RAS"])
    assert np.all(load_volume(p).data == 7)


# ---------------------------------------------------------------- bad input


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, fragment expected in the message)."""
    good = _distinct(dtype=np.float32)
    out: dict[str, tuple[Path, str]] = {}
    out["missing"] = (tmp / "missing.nii.gz", "does not exist")
    (tmp / "text.nii").write_bytes(b"this is not a nifti file at all\n" * 20)
    out["not nifti"] = (tmp / "text.nii", "cannot be read as NIfTI")
    (tmp / "text.nii.gz").write_bytes(b"garbage" * 100)
    out["not gzip"] = (tmp / "text.nii.gz", "cannot be read as NIfTI")
    (tmp / "plain.txt").write_text("x")
    out["suffix"] = (tmp / "plain.txt", "not a NIfTI")
    full = _write(tmp / "full.nii.gz", good, ORIENTATIONS["RAS"]).read_bytes()
    (tmp / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    out["truncated gz"] = (tmp / "trunc.nii.gz", "cannot be read")
    (tmp / "tiny.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    out["tiny gz"] = (tmp / "tiny.nii.gz", "cannot be read as NIfTI")
    fulln = _write(tmp / "full.nii", good, ORIENTATIONS["RAS"]).read_bytes()
    (tmp / "trunc.nii").write_bytes(fulln[: len(fulln) - 50])
    out["truncated nii"] = (tmp / "trunc.nii", "truncated")
    out["2-D"] = (_write(tmp / "flat.nii.gz", good[:, :, 0], np.eye(4)), "2-D")
    out["4-D"] = (_write(tmp / "four.nii.gz", np.stack([good] * 3, -1), np.eye(4)), "4-D")
    out["zero dim"] = (_write(tmp / "empty.nii.gz", np.zeros((4, 0, 3), np.int16), np.eye(4)), "empty")
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    out["nan"] = (_write(tmp / "nan.nii.gz", nan, np.eye(4)), "NaN")
    inf = good.copy()
    inf[0, 0, 0] = -np.inf
    out["inf"] = (_write(tmp / "inf.nii.gz", inf, np.eye(4)), "Inf")
    out["zero spacing"] = (_write(tmp / "zsp.nii.gz", good, np.diag([0.0, 1, 1, 1])), "zero voxel spacing")
    out["absurd spacing"] = (_write(tmp / "big.nii.gz", good, np.diag([200.0, 1, 1, 1])), "implausible")
    out["tiny spacing"] = (_write(tmp / "small.nii.gz", good, np.diag([1e-3, 1, 1, 1])), "implausible")
    sing = np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out["singular"] = (_write(tmp / "sing.nii.gz", good, sing), "singular")
    cplx = nib.Nifti1Image(np.zeros((3, 3, 3), np.complex64), np.eye(4))
    nib.save(cplx, str(tmp / "complex.nii.gz"))
    out["complex"] = (tmp / "complex.nii.gz", "scalar")
    (tmp / "folder.nii").mkdir()
    out["folder"] = (tmp / "folder.nii", "not a file")
    return out


def test_bad_inputs_raise_one_line_volume_errors(tmp_path: Path) -> None:
    for name, (path, fragment) in _bad_files(tmp_path).items():
        with pytest.raises(VolumeError) as exc:
            load_volume(path)
        msg = str(exc.value)
        assert "\n" not in msg, name
        assert str(path) in msg, (name, msg)
        assert fragment in msg, (name, msg)


def test_nan_check_is_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_apl.core.volume as volume_mod

    data = _distinct(dtype=np.float32)
    data[2, 3, 5] = np.nan  # in the last chunk of one-slice chunks
    p = _write(tmp_path / "nan.nii", data, ORIENTATIONS["LPS"])
    monkeypatch.setattr(volume_mod, "_READ_CHUNK_BYTES", 1)
    with pytest.raises(VolumeError) as exc:
        load_volume(p)
    _assert_one_line(exc, "NaN")
    data[2, 3, 5] = 1.0
    p = _write(tmp_path / "ok.nii.gz", data, ORIENTATIONS["PIR"])
    assert np.array_equal(load_volume(p).to_original(load_volume(p).data), data)


# ---------------------------------------------------------------- SliceGrid


def test_slicegrid_geometry() -> None:
    g = SliceGrid((37, 23), (0.8, 1.5), (0.7, 1.0), (32, 32), stride=16)
    assert g.resampled_shape == (round(37 * 0.8 / 0.7), round(23 * 1.5 / 1.0)) == (42, 34)
    assert g.padded_shape == (48, 48)
    assert g.pad_before == (3, 7) and g.pad_after == (3, 7)
    assert all(p % 16 == 0 and p >= s for p, s in zip(g.padded_shape, g.size))
    g2 = SliceGrid((10, 10), (1.0, 1.0), (1.0, 1.0), (160, 96), stride=32)
    assert g2.padded_shape == (160, 96) and g2.pad_before == (75, 43)
    g3 = SliceGrid((3, 3), (1.0, 1.0), (50.0, 50.0), (1, 1), stride=1)
    assert g3.resampled_shape == (1, 1)
    with pytest.raises(VolumeError):
        SliceGrid((10, 10), (1.0, 1.0), (0.0, 1.0), (16, 16))
    with pytest.raises(VolumeError):
        SliceGrid((10, 10), (1.0, 1.0), (1.0, 1.0), (16, 16), stride=0)
    # a slice wider than any body is a header error (e.g. voxel sizes in the wrong unit): refused at once
    # instead of resampling to thousands of pixels per slice for minutes
    with pytest.raises(VolumeError, match=r"6400 x 6400 mm across .*check the voxel size"):
        SliceGrid((128, 128), (50.0, 50.0), (4.0, 4.0), (80, 80))
    assert SliceGrid((512, 512), (1.5, 1.5), (4.0, 4.0), (80, 80)).resampled_shape == (192, 192)  # 768 mm


@pytest.mark.parametrize(
    ("in_shape", "in_spacing", "spacing", "size"),
    [
        ((37, 23), (0.8, 1.5), (0.7, 1.0), (32, 32)),
        ((50, 17), (3.0, 3.0), (2.5, 2.5), (64, 96)),
        ((29, 41), (1.25, 5.0), (1.25, 0.9), (16, 16)),
        ((13, 7), (2.0, 2.0), (2.0, 2.0), (8, 8)),
        ((64, 33), (1.0, 1.7), (0.3, 0.45), (128, 128)),
    ],
)
def test_slicegrid_label_round_trip_is_exact(in_shape, in_spacing, spacing, size) -> None:
    g = SliceGrid(in_shape, in_spacing, spacing, size)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=(3, 1, *in_shape))
    for dtype in (torch.uint8, torch.int64, torch.float32):
        t = torch.from_numpy(labels).to(dtype)
        fwd = g.forward(t, "nearest")
        assert tuple(fwd.shape) == (3, 1, *g.padded_shape) and fwd.dtype == dtype
        (bx, by), (rx, ry) = g.pad_before, g.resampled_shape
        border = fwd.clone()
        border[..., bx : bx + rx, by : by + ry] = 0
        assert not border.any()  # padding is zero
        back = g.inverse(fwd, "nearest")
        assert back.dtype == dtype and torch.equal(back, t)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), s=st.floats(0.3, 6.0), ratio=st.floats(0.2, 1.0))
def test_slicegrid_nearest_round_trip_property(n: int, s: float, ratio: float) -> None:
    g = SliceGrid((n, n + 3), (s, s), (s * ratio, s * ratio), (16, 16), stride=8)
    t = torch.arange(n * (n + 3), dtype=torch.int32).view(1, 1, n, n + 3)
    assert torch.equal(g.inverse(g.forward(t, "nearest"), "nearest"), t)
    assert torch.equal(g.inverse(g.forward(t.float(), "nearest"), "nearest"), t.float())


def test_slicegrid_bilinear_smooth_image() -> None:
    g = SliceGrid((40, 30), (1.5, 2.0), (1.0, 1.0), (64, 64))
    x, y = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    img = (np.sin(x / 8.0) + np.cos(y / 10.0)).astype(np.float32)
    t = torch.from_numpy(img)[None, None]
    fwd = g.forward(t, "bilinear", pad_value=-5.0)
    assert tuple(fwd.shape[-2:]) == g.padded_shape == (64, 64)
    assert float(fwd[0, 0, 0, 0]) == -5.0  # image padding uses the pad value
    (bx, by), (rx, ry) = g.pad_before, g.resampled_shape
    assert float(fwd[..., bx : bx + rx, by : by + ry].min()) > -2.01
    back = g.inverse(fwd, "bilinear")
    assert tuple(back.shape) == (1, 1, 40, 30)
    assert float((back - t).abs().max()) < 0.03
    assert float((back - t).abs().mean()) < 0.01
    with pytest.raises(VolumeError):
        g.forward(t.long(), "bilinear")
    with pytest.raises(VolumeError):
        g.forward(t, "bicubic")
    with pytest.raises(VolumeError):
        g.forward(t[..., :-1], "bilinear")
    with pytest.raises(VolumeError):
        g.inverse(t, "bilinear")


def test_slicegrid_never_crops() -> None:
    g = SliceGrid((300, 50), (1.0, 1.0), (1.0, 1.0), (128, 128), stride=16)
    assert g.padded_shape == (304, 128)
    labels = torch.randint(0, 5, (2, 1, 300, 50), generator=torch.Generator().manual_seed(0))
    fwd = g.forward(labels, "nearest")
    assert int((fwd > 0).sum()) == int((labels > 0).sum())
    (bx, by) = g.pad_before
    assert torch.equal(fwd[..., bx : bx + 300, by : by + 50], labels)
    assert torch.equal(g.inverse(fwd, "nearest"), labels)
    # Multi-channel logits keep their channels.
    logits = torch.randn(2, 5, 300, 50)
    assert torch.allclose(g.inverse(g.forward(logits, "bilinear"), "bilinear"), logits)


def test_slicegrid_for_volume_uses_canonical_spacing(tmp_path: Path) -> None:
    p = _write(tmp_path / "img.nii.gz", _distinct(), ORIENTATIONS["PIR"])
    vol = load_volume(p)
    g = SliceGrid.for_volume(vol, spacing=(0.5, 0.5), size=(32, 32), stride=16)
    assert g.in_shape == vol.shape[:2]
    assert g.in_spacing == pytest.approx(vol.spacing[:2])
    t = torch.from_numpy(np.ascontiguousarray(vol.data[:, :, 1:3]).transpose(2, 0, 1)[:, None].copy())
    assert torch.equal(g.inverse(g.forward(t, "nearest"), "nearest"), t)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "codes"), [("mr_sm_labels", ("L", "P", "S")), ("ct_sm_labels", ("R", "A", "S"))]
)
def test_realdata_labels_round_trip(data_dir: Path, name: str, codes: tuple[str, str, str]) -> None:
    # data_dir (conftest): $NAPARI_APL_DATA or <repo>/../shared/data, skipped when absent.
    path = data_dir / "totalseg" / f"{name}.nii.gz"
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (set NAPARI_APL_DATA)")
    raw = _raw(path)
    assert nib.aff2axcodes(nib.load(str(path)).affine) == codes
    vol = load_volume(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    g = SliceGrid.for_volume(vol, spacing=(2.5, 2.5), size=(160, 160))
    assert g.padded_shape[0] >= 160 and g.padded_shape[0] % 16 == 0
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol.data, 2, 0)))[:, None]
    back = g.inverse(g.forward(slices, "nearest"), "nearest")[:, 0].numpy()
    canon = np.moveaxis(back, 0, 2)
    assert np.array_equal(vol.to_original(canon), raw)
    assert set(np.unique(raw)) <= {0, 1, 2, 3, 4} and len(np.unique(raw)) == 5
    lazy = load_volume(path, lazy=True)
    assert np.array_equal(lazy.data.compute(), vol.data)


# ---------------------------------------------------------------- seekable gzip reader (lazy .nii.gz)


def _small_reader(path: Path, spacing: int, cache: int, sequential: bool = False):
    """A gzip reader with tiny blocks so that its checkpoints and cache are exercised on small data."""
    from napari_apl.core import volume as volume_mod

    class Small(volume_mod._CheckpointedGzipReader):
        _IN_CHUNK = 37
        _OUT_CHUNK = 64

    return Small(path, spacing=spacing, cache=cache, sequential=sequential)


@settings(max_examples=30, deadline=None)
@given(
    members=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=3),
    ops=st.lists(st.tuples(st.integers(0, 9500), st.integers(0, 700)), min_size=1, max_size=25),
    spacing=st.sampled_from([64, 200, 1000]),
    cache=st.sampled_from([128, 500, 5000]),
    padding=st.booleans(),
    sequential=st.booleans(),
)
def test_gzip_reader_random_access(
    tmp_path_factory, members, ops, spacing, cache, padding, sequential
) -> None:
    tmp = tmp_path_factory.mktemp("gz")
    # Compressible content: repeat each member's bytes so offsets go past several checkpoints.
    members = [m * 3 for m in members]
    blob = b"".join(gzip.compress(m, mtime=0) for m in members) + (b"\x00" * 16 if padding else b"")
    path = tmp / "x.gz"
    path.write_bytes(blob)
    raw = b"".join(members)
    reader = _small_reader(path, spacing, cache, sequential)
    try:
        for pos, n in ops:
            reader.seek(pos)
            got = reader.read(n)
            assert got == raw[pos : pos + n]
            assert reader.tell() == pos + len(got)
        reader.seek(0)
        assert reader.read() == raw
    finally:
        reader.close()
    assert reader.closed


def test_gzip_reader_member_ending_in_a_capped_call(tmp_path: Path) -> None:
    """A member whose end is reached by a call capped at the output block size; another member follows.

    zlib then reports the bytes after the member both as unused data and as unconsumed input: reading
    them twice corrupted the next member (found by the property test above).
    """
    raw = [b"\x00" * 66, b"", b"abc" * 40]
    (tmp_path / "m.gz").write_bytes(b"".join(gzip.compress(m, mtime=0) for m in raw))
    for sequential in (False, True):
        reader = _small_reader(tmp_path / "m.gz", 64, 128, sequential)
        assert reader.read() == b"".join(raw)
        reader.seek(60)
        assert reader.read(20) == b"".join(raw)[60:80]
        reader.close()


@pytest.mark.parametrize("sequential", [False, True])
def test_gzip_reader_truncated(tmp_path: Path, sequential: bool) -> None:
    raw = np.random.default_rng(0).integers(0, 4, 50_000, dtype=np.uint8).tobytes()
    blob = gzip.compress(raw, mtime=0)
    (tmp_path / "t.gz").write_bytes(blob[: len(blob) // 2])
    reader = _small_reader(tmp_path / "t.gz", 1000, 5000, sequential)
    assert reader.read(100) == raw[:100]
    with pytest.raises(EOFError):
        reader.read()
    reader.close()


def test_sequential_gzip_reader_inflates_with_isal_until_read_out_of_order(tmp_path: Path) -> None:
    """Front to back, a sequential reader inflates with ISA-L and saves no states; its first seek back
    behind the cache restarts it with zlib from the file's start, saving states from there on."""
    import zlib

    pytest.importorskip("isal")
    raw = np.random.default_rng(1).integers(0, 8, 200_000, dtype=np.uint8).tobytes()
    (tmp_path / "s.gz").write_bytes(gzip.compress(raw, mtime=0))
    reader = _small_reader(tmp_path / "s.gz", 1000, 2000, sequential=True)
    for pos in range(0, len(raw), 7000):  # forward reads only
        reader.seek(pos)
        assert reader.read(300) == raw[pos : pos + 300]
    assert type(reader._dec).__module__.startswith("isal") and len(reader._marks) == 1
    reader.seek(10)  # far behind the cache
    assert reader.read(50) == raw[10:60]
    reader.seek(150_000)
    assert reader.read(100) == raw[150_000:150_100]
    assert isinstance(reader._dec, type(zlib.decompressobj())) and len(reader._marks) > 100
    reader.seek(90_000)  # now a saved state near the target, not the file's start, serves it
    assert reader.read(100) == raw[90_000:90_100]
    assert reader._cache_start >= 89_000
    reader.close()


@pytest.mark.parametrize("where", ["body", "crc"])
def test_a_damaged_nii_gz_is_refused_eager_and_lazy(tmp_path: Path, where: str) -> None:
    """A flipped byte in the deflate stream or in the gzip trailer's CRC is a one-line VolumeError, not
    voxels read wrong, whichever inflater reads the file (eager: front to back with ISA-L)."""
    data = np.random.default_rng(2).integers(-1000, 1000, (64, 64, 12)).astype(np.int16)
    p = _write(tmp_path / "img.nii.gz", data, ORIENTATIONS["RAS"])
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2 if where == "body" else -6] ^= 0xFF
    p.write_bytes(bytes(blob))
    with pytest.raises(VolumeError, match=r"img\.nii\.gz cannot be read"):
        load_volume(p)
    for sequential in (False, True):
        lazy = load_volume(p, lazy=True, sequential=sequential)
        with pytest.raises(VolumeError, match=r"img\.nii\.gz cannot be read .*(checksum|data check)"):
            lazy.data.compute()


@pytest.mark.parametrize("name", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_axial_reader_reads_batches_of_canonical_slices(tmp_path: Path, name: str, suffix: str) -> None:
    """A lazy volume's slices read in one piece (the predictor's path) equal the eager ones in
    ``(n, X, Y)`` order; an array derived from the dask array has no reader (it is not the file)."""
    from napari_apl.core.volume import axial_reader

    p = _write(tmp_path / f"img{suffix}", _distinct(), ORIENTATIONS[name])
    eager, lazy = load_volume(p), load_volume(p, lazy=True)
    reader = axial_reader(lazy.data)
    assert reader is not None and axial_reader(eager.data) is None
    z = eager.data.shape[2]
    for start, stop in [(0, z), (1, 3), (z - 1, z), (2, 2)]:
        got = reader.axial(start, stop)
        assert got.flags.c_contiguous and got.dtype == eager.data.dtype
        assert np.array_equal(got, np.moveaxis(eager.data[:, :, start:stop], 2, 0)), (start, stop)
    assert axial_reader(lazy.data[:, :, ::-1]) is None and axial_reader(lazy.data + 1) is None
    assert axial_reader(lazy.data.rechunk((-1, -1, 2))) is None


def test_lazy_gz_any_order(tmp_path: Path) -> None:
    data = np.random.default_rng(3).standard_normal((20, 16, 40)).astype(np.float32)
    p = _write(tmp_path / "img.nii.gz", data, ORIENTATIONS["LPS"])
    lazy = load_volume(p, lazy=True)
    eager = load_volume(p)
    for k in [39, 0, 20, 19, 38, 1, 5, 5]:
        assert np.array_equal(lazy.data[:, :, k].compute(), eager.data[:, :, k])
    assert np.array_equal(lazy.data[:, :, ::-1].compute(), eager.data[:, :, ::-1])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_lazy_volume_pickles(tmp_path: Path, suffix: str) -> None:
    import pickle

    data = _distinct(dtype=np.float32)
    p = _write(tmp_path / f"img{suffix}", data, ORIENTATIONS["LAS"])
    lazy = load_volume(p, lazy=True)
    clone = pickle.loads(pickle.dumps(lazy))
    assert np.array_equal(clone.to_original(clone.data).compute(), data)
    assert np.allclose(clone.affine, lazy.affine)


def test_file_looks_whole_reads_the_gzip_trailer(tmp_path: Path) -> None:
    """A whole .nii.gz is known whole from its trailer; truncated or multi-member ones are not."""
    import gzip

    from napari_apl.core.volume import file_looks_whole

    data = np.arange(24 * 20 * 6, dtype=np.int16).reshape(24, 20, 6)
    gz = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(gz))
    plain = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(plain))
    assert file_looks_whole(load_volume(gz, lazy=True))
    assert file_looks_whole(load_volume(plain, lazy=True))
    raw = gzip.decompress(gz.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gz.read_bytes()[: int(gz.stat().st_size * 0.8)])
    vol = load_volume(gz, lazy=True)
    vol.path = cut  # the header is intact; only the file's end is missing
    assert not file_looks_whole(vol)
    multi = tmp_path / "multi.nii.gz"  # two members (as bgzip writes): the trailer counts only the last
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert not file_looks_whole(load_volume(multi, lazy=True))
    assert np.array_equal(np.asarray(load_volume(multi).data), np.asarray(load_volume(gz).data))


def test_a_qform_only_header_in_metres_is_converted_and_a_wrong_unit_is_named(tmp_path: Path) -> None:
    """Without an sform the voxel sizes (pixdim) and the qform are both scaled to millimetres, and the
    header copy the outputs are written from says mm; a spacing implausible only after the conversion
    names the header's unit in its one-line error."""
    data = _distinct()
    aff_mm = np.array([[0.0, -0.9, 0.0, 40.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 10.0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(data, np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ aff_mm)
    img.set_sform(None, code=0)
    img.set_qform(np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ aff_mm, code=1)
    img.header.set_xyzt_units("meter", "sec")
    nib.save(img, str(tmp_path / "q.nii.gz"))
    vol = load_volume(tmp_path / "q.nii.gz")
    assert np.allclose(vol.original_affine, aff_mm, atol=1e-4)
    assert vol.spacing == pytest.approx((0.9, 0.7, 2.5), abs=1e-5)  # canonical (RAS) order
    assert vol.header.get_xyzt_units() == ("mm", "sec") and int(vol.header["sform_code"]) == 0
    assert np.allclose(vol.header.get_zooms()[:3], (0.7, 0.9, 2.5), atol=1e-5)  # the file's order
    assert np.allclose(vol.header.get_qform(), aff_mm, atol=1e-4)
    assert np.array_equal(vol.to_original(vol.data), data)
    wrong = nib.Nifti1Image(data, aff_mm)  # millimetre values under a header that says metres
    wrong.header.set_xyzt_units("meter")
    nib.save(wrong, str(tmp_path / "w.nii.gz"))
    with pytest.raises(VolumeError) as exc:
        load_volume(tmp_path / "w.nii.gz")
    assert "converted from the header's unit, meters" in str(exc.value) and "xyzt_units" in str(exc.value)
    assert len(str(exc.value).splitlines()) == 1
