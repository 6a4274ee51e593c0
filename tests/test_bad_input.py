"""The bad-input matrix through the CLI (issue #6, item 1).

Every case must end with exit code 2, exactly one line on stderr, no traceback, and the output folder
exactly as it was (names, sizes, mtimes and the folder's own mtime: not even a temporary file was
left) and the user's inputs untouched. Cases run in-process through ``napari_apl.cli.main`` (fast);
two run as real ``python -m napari_apl.cli`` processes to check the stderr of a real run.

"Disk full" uses a real 64 KiB tmpfs, filled up, when the tests run as root and ``mount -t tmpfs``
works (it does in the project's containers); elsewhere, and for the disk that fills after the first
map (the CLI writes maps from two threads, so a real fill point would be racy), ``os.fsync`` fails
with ENOSPC, which exercises the same clean-up path. The read-only output folder uses a read-only
tmpfs as root and ``chmod 0500`` otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apl.cli import MAP_DTYPES, main
from napari_apl.core.checkpoint import MAX_BYTES_ENV, CheckpointMeta, save_checkpoint
from napari_apl.core.models import build_model
from napari_apl.core.phantom import make_phantom

SHAPE = (48, 48, 8)
SPACING = (5.0, 5.0, 8.0)
MAPS = [f"{name}.nii.gz" for name in MAP_DTYPES]


class Evil:
    """A pickle payload that creates a file when unpickled (proof that code ran)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


# -- helpers ------------------------------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (hidden ones too) with size, mtime and mode, plus the folder's mtime."""
    if not folder.exists():
        return {"<absent>": ()}
    out: dict[str, tuple] = {".": (folder.stat().st_mtime_ns,)}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _fingerprint(paths: list[Path]) -> dict[str, tuple]:
    """Bytes and mtimes of input files (they must never change)."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths if p.is_file()}


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file with nibabel directly (sform only, so even a degenerate affine is kept)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(data, None, header=hdr), str(path))
    return path


def _meta(model, **kw) -> CheckpointMeta:
    """Metadata of a tiny test model."""
    base = dict(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=(16, 16),
        spacing=(15.0, 15.0),
        normalization={"kind": "percentile", "lower": 0.5, "upper": 99.5},
    )
    base.update(kw)
    return CheckpointMeta(**base)


def _rewrite(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Load a checkpoint payload, edit it and save it again with torch.save."""
    payload = torch.load(src, weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return dst


def _edit_meta(**changes) -> Callable[[dict], None]:
    """Return an editor that changes fields of the payload's metadata JSON."""

    def edit(payload: dict) -> None:
        data = json.loads(payload["meta_json"])
        data.update(changes)
        payload["meta_json"] = json.dumps(data)

    return edit


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only); return whether it worked."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _umount(path: Path) -> None:
    """Unmount a tmpfs mounted by ``_mount_tmpfs`` (lazily when busy)."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def _small_fs(
    root: Path, monkeypatch: pytest.MonkeyPatch, *, full_after_files: int = 0, real: bool = True
) -> Iterator[Path]:
    """An output folder ``out`` (holding the user's notes.txt) on a disk that is full.

    ``real`` and root: a real 64 KiB tmpfs filled up completely (``full_after_files`` must be 0).
    Otherwise ``os.fsync`` fails with ENOSPC after ``full_after_files`` files were written, which
    makes the fill point exact even when the CLI writes its maps from several threads.
    """
    mnt = root / "smallfs"
    if real and full_after_files == 0 and _mount_tmpfs(mnt, "size=64k,mode=0755"):
        try:
            (mnt / "out").mkdir()
            (mnt / "out" / "notes.txt").write_text("the user's file\n")
            st = os.statvfs(mnt)
            with open(mnt / "filler.bin", "wb") as fh:
                fh.write(b"\0" * (st.f_bavail * st.f_frsize))
            yield mnt / "out"
        finally:
            _umount(mnt)
        return
    (mnt / "out").mkdir(parents=True)
    (mnt / "out" / "notes.txt").write_text("the user's file\n")
    real_fsync = os.fsync
    lock = threading.Lock()
    calls = {"files": 0}

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            with lock:
                calls["files"] += 1
                full = calls["files"] > full_after_files
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield mnt / "out"


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@dataclass
class Ctx:
    """What a case needs: the good inputs, a folder for bad ones and the output folder."""

    image: Path
    ckpt: Path
    bad: Path
    out: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack
    inputs: list[Path] = field(default_factory=list)
    check_dir_mtime: bool = True


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A good CT phantom file and a good tiny checkpoint (read-only inputs of every case)."""
    folder = tmp_path_factory.mktemp("good")
    image, _, affine = make_phantom("ct", 1, shape=SHAPE, spacing=SPACING)
    img_path = _nifti(folder / "image.nii.gz", image, affine)
    torch.manual_seed(0)
    model = build_model("unet-dual", base=4)  # a coarse 16 x 16 grid keeps predictions quick
    ck = folder / "model.pt"
    save_checkpoint(ck, model, _meta(model))
    return img_path, ck, image, affine


@pytest.fixture
def ctx(good, tmp_path, monkeypatch) -> Iterator[Ctx]:
    """A fresh output folder holding one file of the user's, and a folder for bad inputs."""
    img_path, ck = good[:2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    with contextlib.ExitStack() as stack:  # mounts and permission changes are undone after the test
        yield Ctx(img_path, ck, bad, out, tmp_path, monkeypatch, stack)


# -- the cases ----------------------------------------------------------------------------------------
# Each returns (argv, a fragment the one-line message must contain).


def _predict(
    c: Ctx, image: Path | str | None = None, ckpt: Path | str | None = None, *extra: str
) -> list[str]:
    return ["predict", str(image or c.image), "-c", str(ckpt or c.ckpt), "-o", str(c.out), "-q", *extra]


def _img(c: Ctx, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a bad image into the bad-input folder and register it as an input."""
    path = _nifti(c.bad / name, data, np.diag([*SPACING, 1.0]) if affine is None else affine)
    c.inputs.append(path)
    return path


def _phantom(shape=SHAPE) -> np.ndarray:
    return make_phantom("ct", 1, shape=shape, spacing=SPACING)[0].astype(np.float32)


def case_truncated_gz(c: Ctx):
    data = c.image.read_bytes()
    p = c.bad / "truncated.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    return _predict(c, p), "cannot be read"


def case_truncated_nii(c: Ctx):
    p = _img(c, "full.nii", _phantom())
    p.write_bytes(p.read_bytes()[:-100])
    return _predict(c, p), "truncated"


def case_text_named_nii(c: Ctx):
    p = c.bad / "notes.nii"
    p.write_text("patient notes, not an image\n" * 40)
    return _predict(c, p), "cannot be read as NIfTI"


def case_random_named_nii_gz(c: Ctx):
    p = c.bad / "random.nii.gz"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return _predict(c, p), "cannot be read as NIfTI"


def case_empty_file(c: Ctx):
    p = c.bad / "empty.nii.gz"
    p.write_bytes(b"")
    return _predict(c, p), "cannot be read"


def case_gzip_of_garbage(c: Ctx):
    p = c.bad / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"\x5c\x01" * 300))
    return _predict(c, p), "cannot be read"


def case_two_d(c: Ctx):
    return _predict(c, _img(c, "flat.nii.gz", _phantom()[:, :, 0])), "2-D"


def case_four_d(c: Ctx):
    return _predict(c, _img(c, "series.nii.gz", np.stack([_phantom()] * 2, -1))), "4-D"


def case_zero_sized(c: Ctx):
    return _predict(c, _img(c, "empty_dim.nii.gz", np.zeros((48, 0, 8), np.int16))), "empty"


def case_nan_voxels(c: Ctx):
    data = _phantom()
    data[20, 20, 3] = np.nan
    return _predict(c, _img(c, "nan.nii.gz", data)), "NaN"


def case_inf_voxels(c: Ctx):
    data = _phantom()
    data[0, 5, 7] = np.inf
    return _predict(c, _img(c, "inf.nii.gz", data)), "Inf"


def case_constant_volume(c: Ctx):
    return _predict(c, _img(c, "constant.nii.gz", np.zeros(SHAPE, np.int16))), "constant"


def case_constant_ct_volume(c: Ctx):
    # all air (-1000 HU): --normalize auto picks the fixed CT window, which fits any volume; a streamed
    # file is known to be constant only once its last slice was read: the temporary files go again
    c.check_dir_mtime = False
    return _predict(c, _img(c, "air.nii.gz", np.full(SHAPE, -1000, np.int16))), "constant"


def case_inf_in_last_slice(c: Ctx):
    # found while streaming, after the first slices' maps were compressed: nothing may appear
    c.check_dir_mtime = False
    data = _phantom(shape=(48, 48, 20))  # slice 19 is in the third batch of 8
    data[3, 4, -1] = -np.inf
    return _predict(c, _img(c, "inf_last.nii.gz", data)), "Inf"


def case_absurd_spacing(c: Ctx):
    return _predict(c, _img(c, "huge_vox.nii.gz", _phantom(), np.diag([5.0, 5.0, 5000.0, 1]))), "implausible"


def case_tiny_spacing(c: Ctx):
    return _predict(c, _img(c, "tiny_vox.nii.gz", _phantom(), np.diag([1e-4, 5.0, 8.0, 1]))), "implausible"


def case_zero_spacing(c: Ctx):
    return _predict(
        c, _img(c, "zero_vox.nii.gz", _phantom(), np.diag([5.0, 0.0, 8.0, 1]))
    ), "zero voxel spacing"


def case_zero_pixdim_without_sform(c: Ctx):
    """No sform and a pixdim of 0: nibabel repairs it to 1 mm while loading, which must not pass."""
    img = nib.Nifti1Image(_phantom(), None)
    img.header["qform_code"] = 0
    img.header["sform_code"] = 0
    img.header["pixdim"][1:4] = [5.0, 5.0, 0.0]
    path = c.bad / "zero_pixdim.nii.gz"
    nib.save(img, path)
    c.inputs.append(path)
    return _predict(c, path), "voxel size of 0 in its header (pixdim 5, 5, 0, no sform)"


def case_singular_affine(c: Ctx):
    aff = np.array([[5.0, 5.0, 0, 0], [0, 0, 0, 0], [0, 0, 8.0, 0], [0, 0, 0, 1]])
    return _predict(c, _img(c, "singular.nii.gz", _phantom(), aff)), "singular"


def case_complex_voxels(c: Ctx):
    return _predict(c, _img(c, "complex.nii.gz", np.zeros(SHAPE, np.complex64))), "scalar"


def case_missing_image(c: Ctx):
    return _predict(c, c.bad / "nope.nii.gz"), "does not exist"


def case_image_is_folder(c: Ctx):
    (c.bad / "folder.nii.gz").mkdir()
    return _predict(c, c.bad / "folder.nii.gz"), "folder.nii.gz"


def case_huge_declared_shape(c: Ctx):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((32767, 32767, 32767))  # 70 TB declared in a 400-byte file
    hdr.set_sform(np.diag([*SPACING, 1.0]), code=1)
    p = c.bad / "huge.nii.gz"
    p.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 64))
    return _predict(c, p), "huge.nii.gz"  # eager: over the memory limit; lazy (predict's default): no data


def case_ckpt_random_bytes(c: Ctx):
    p = c.bad / "random.pt"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return _predict(c, None, p), "not a PyTorch checkpoint"


def case_ckpt_json(c: Ctx):
    p = c.bad / "model.pt"
    p.write_text(json.dumps({"arch": "unet-dual", "state_dict": {}}))
    return _predict(c, None, p), "not a PyTorch checkpoint"


def case_ckpt_is_an_image(c: Ctx):
    return _predict(c, None, c.image), "not a PyTorch checkpoint"


def case_ckpt_missing(c: Ctx):
    return _predict(c, None, c.bad / "nope.pt"), "does not exist"


def case_ckpt_pickle_payload(c: Ctx):
    p = c.bad / "evil.pt"
    p.write_bytes(pickle.dumps({"napari_apl_format": 1, "w": Evil(c.tmp / "pwned")}, protocol=2))
    return _predict(c, None, p), "unsafe"


def case_ckpt_torch_payload(c: Ctx):
    p = c.bad / "evil_zip.pt"
    payload = torch.load(c.ckpt, weights_only=True)
    payload["state_dict"]["extra"] = Evil(c.tmp / "pwned")
    torch.save(payload, p)
    return _predict(c, None, p), "unsafe"


def case_ckpt_wrong_class_count(c: Ctx):
    names = ["background", "liver", "spleen"]
    return _predict(
        c, None, _rewrite(c.ckpt, c.bad / "classes.pt", _edit_meta(class_names=names))
    ), "class count"


def case_ckpt_unknown_arch(c: Ctx):
    return _predict(
        c, None, _rewrite(c.ckpt, c.bad / "arch.pt", _edit_meta(arch="resnet-magic"))
    ), "unknown architecture"


def case_ckpt_wrong_arch(c: Ctx):
    edit = _edit_meta(arch="deeplabv2", arch_args={"num_classes": 5})
    return _predict(c, None, _rewrite(c.ckpt, c.bad / "deeplab.pt", edit)), "does not fit"


def case_ckpt_wrong_width(c: Ctx):
    args = {"base": 16, "num_classes": 5, "in_channels": 1, "dropout": 0.0}
    return _predict(
        c, None, _rewrite(c.ckpt, c.bad / "wide.pt", _edit_meta(arch_args=args))
    ), "shape mismatch"


def case_ckpt_huge_arch_args(c: Ctx):
    # metadata asking for a network of 40 TB: must be refused before anything is allocated
    args = {"base": 2**20, "num_classes": 5, "in_channels": 1, "dropout": 0.0}
    return _predict(c, None, _rewrite(c.ckpt, c.bad / "huge.pt", _edit_meta(arch_args=args))), "huge.pt"


def case_ckpt_newer_format(c: Ctx):
    edit = lambda p: p.update(napari_apl_format=99)  # noqa: E731
    return _predict(c, None, _rewrite(c.ckpt, c.bad / "newer.pt", edit)), "newer napari-apl"


def case_ckpt_raw_state_dict(c: Ctx):
    p = c.bad / "raw.pth"
    torch.save(torch.load(c.ckpt, weights_only=True)["state_dict"], p)
    return _predict(c, None, p), "raw state dict"


def case_ckpt_over_size_limit(c: Ctx):
    c.monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    return _predict(c), "limit"


def case_out_parent_missing(c: Ctx):
    c.out = c.tmp / "no" / "such" / "folder"
    return _predict(c), "does not exist"


def case_out_is_a_file(c: Ctx):
    c.out = c.out / "notes.txt"
    return _predict(c), "is a file"


def case_out_unwritable(c: Ctx):
    mnt = c.tmp / "readonly"
    if _mount_tmpfs(mnt, "ro,size=64k"):
        c.stack.callback(_umount, mnt)
    elif os.name == "posix" and os.geteuid() != 0:
        mnt.mkdir()
        mnt.chmod(0o500)
        c.stack.callback(mnt.chmod, 0o700)
    else:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    c.out = mnt
    return _predict(c), "not writable"


def case_input_is_output(c: Ctx):
    target = c.out / "main.nii.gz"
    shutil.copy(c.image, target)
    return _predict(c, target, None, "--overwrite"), "same file as an input"


def case_input_is_output_via_dotdot(c: Ctx):
    target = c.out / "main.nii.gz"
    shutil.copy(c.image, target)
    return _predict(c, c.out / ".." / "out" / "main.nii.gz", None, "--overwrite"), "same file as an input"


def case_input_is_output_via_symlink(c: Ctx):
    target = c.out / "main.nii.gz"
    shutil.copy(c.image, target)
    link = c.bad / "scan.nii.gz"
    link.symlink_to(target)
    return _predict(c, link, None, "--overwrite"), "same file as an input"


def case_input_is_last_output_via_dotdot(c: Ctx):
    # the image is the last map written: the check must come before any map is written
    target = c.out / "consistency.nii.gz"
    shutil.copy(c.image, target)
    return _predict(c, c.out / ".." / "out" / "consistency.nii.gz", None, "--overwrite"), "same file"


def _refine(c: Ctx, ckpt: Path, *extra: str) -> list[str]:
    """``refine`` argv for one iteration."""
    argv = ["refine", str(c.image), "-c", str(ckpt), "-o", str(c.out), "-q", "-n", "1", "--batch-size", "1"]
    return argv + list(extra)


def case_checkpoint_is_output(c: Ctx):
    target = c.out / "refined.pt"
    shutil.copy(c.ckpt, target)
    return _refine(c, target, "--overwrite"), "same file as an input"


def case_checkpoint_is_output_via_symlink(c: Ctx):
    target = c.out / "refined.pt"
    shutil.copy(c.ckpt, target)
    link = c.bad / "colleague.pt"
    link.symlink_to(target)
    return _refine(c, link, "--overwrite"), "same file"


def case_outputs_exist(c: Ctx):
    for name in MAPS:
        (c.out / name).write_bytes(b"an earlier result")
    return _predict(c), "--overwrite"


def case_disk_full_at_start(c: Ctx):
    c.check_dir_mtime = False  # a temporary file was created and removed again
    c.out = c.stack.enter_context(_small_fs(c.tmp, c.monkeypatch))
    return _predict(c), "disk full"


def case_disk_full_midway(c: Ctx):
    c.check_dir_mtime = False
    c.out = c.stack.enter_context(_small_fs(c.tmp, c.monkeypatch, full_after_files=1, real=False))
    return _predict(c), "disk full"


def case_refine_disk_full(c: Ctx):
    c.check_dir_mtime = False
    c.out = c.stack.enter_context(_small_fs(c.tmp, c.monkeypatch))
    return _refine(c, c.ckpt), "disk full"


def case_import_disk_full(c: Ctx):
    """Only a checkpoint is written (torch reports a full disk as a RuntimeError of its own)."""
    c.check_dir_mtime = False
    raw = c.bad / "raw.pth"
    torch.save(torch.load(c.ckpt, weights_only=True)["state_dict"], raw)
    c.out = c.stack.enter_context(_small_fs(c.tmp, c.monkeypatch))
    return ["import", str(raw), "--arch", "unet-dual", "--out", str(c.out / "m.pt")], "disk full"


def case_corrections_wrong_shape(c: Ctx):
    corr = _img(c, "corr.nii.gz", np.zeros((40, 48, 8), np.uint8))
    return _refine(c, c.ckpt, "--corrections", str(corr)), "shape"


def case_bad_input_new_out_dir(c: Ctx):
    c.out = c.tmp / "new-results"  # does not exist yet: a failed run must not leave it behind
    p = c.bad / "notes.nii"
    p.write_text("not an image")
    return _predict(c, p), "cannot be read as NIfTI"


CASES: dict[str, Callable[[Ctx], tuple[list[str], str]]] = {
    name[len("case_") :]: fn for name, fn in dict(globals()).items() if name.startswith("case_")
}

_SAME_FILE = (
    "io_utils.check_output_path compares Path.absolute(), not the files (os.path.samefile): an input "
    "reached through '..' or a symlink is only caught when its map is written, after other maps"
)
# Confirmed bugs (see the report of issue #6): strict, so fixing them turns these into failures to remove.
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n
        for n in CASES
    ],
)
def test_bad_input_matrix(name, ctx, good, capsys):
    argv, fragment = CASES[name](ctx)
    inputs = [good[0], good[1], *ctx.inputs]
    before_inputs = _fingerprint(inputs)
    before = _listing(ctx.out)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    after = _listing(ctx.out)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("napari-apl ")
    assert fragment in lines[0], lines[0]
    if not ctx.check_dir_mtime:
        before.pop(".", None)
        after.pop(".", None)
    assert after == before, "the output folder changed"
    assert _fingerprint(inputs) == before_inputs, "an input file changed"
    assert not (ctx.tmp / "pwned").exists(), "a checkpoint payload ran"


def test_matrix_has_at_least_20_cases():
    assert len(CASES) >= 20
    print(f"bad-input matrix: {len(CASES)} cases, {len(XFAIL)} known bugs marked xfail")


def test_pickle_payload_is_live(tmp_path):
    """The payload used above does create a file when unpickled without restrictions."""
    target = tmp_path / "pwned"
    data = pickle.dumps({"w": Evil(target)}, protocol=2)
    pickle.loads(data)["w"].close()
    assert target.exists()


@pytest.mark.parametrize("kind", ["pickle_payload", "truncated", "zero_pixdim"])
def test_real_process_one_line(kind, good, tmp_path):
    """A real ``napari-apl`` process: exit 2, one stderr line, nothing written, payload not run (and no
    log line of nibabel's header repair before the error)."""
    img_path, ck = good[:2]
    out = tmp_path / "out"
    out.mkdir()
    image, checkpoint = img_path, ck
    if kind == "pickle_payload":
        checkpoint = tmp_path / "evil.pt"
        checkpoint.write_bytes(pickle.dumps({"w": Evil(tmp_path / "pwned")}, protocol=2))
    elif kind == "truncated":
        image = tmp_path / "cut.nii.gz"
        data = img_path.read_bytes()
        image.write_bytes(data[: math.ceil(len(data) * 0.7)])
    else:
        img = nib.Nifti1Image(np.asarray(nib.load(img_path).dataobj), None)
        img.header["qform_code"] = img.header["sform_code"] = 0
        img.header["pixdim"][1:4] = [5.0, 5.0, 0.0]
        image = tmp_path / "zero_pixdim.nii.gz"
        nib.save(img, image)
    before = _listing(out)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_apl.cli",
            "predict",
            str(image),
            "-c",
            str(checkpoint),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""
    assert _listing(out) == before
    assert not (tmp_path / "pwned").exists()
