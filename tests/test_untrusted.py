"""Untrusted files (issue #6, item 2): mutation fuzzing of the NIfTI and checkpoint loaders.

A seeded mutation fuzzer feeds ``load_volume`` (eager and lazy) and ``load_checkpoint`` /
``read_meta`` with mutated versions of small valid files: truncations, bit flips, random chunks,
insertions and deletions, NIfTI header fields set to hostile values (``dim``, ``pixdim``,
``datatype``, ``bitpix``, ``vox_offset``, scaling, q/sform, ``magic``, ``sizeof_hdr``...), gzip
streams damaged before or after compression, and checkpoint payloads with broken metadata, wrong
tensors, foreign objects and code-running pickles. The only exceptions allowed to escape are
``APLError`` subclasses (one line each); a payload must never run (it would create a file); one
load may not take longer than 10 s.

Each fuzz test runs for ``NAPARI_APL_FUZZ_SECONDS`` seconds (default 4) from the seed
``NAPARI_APL_FUZZ_SEED`` (default 0) and prints its count and rate. Longer mode, e.g. ten minutes
per loader from another seed::

    NAPARI_APL_FUZZ_SECONDS=600 NAPARI_APL_FUZZ_SEED=7 pytest tests/test_untrusted.py -s

A failing input is written to the test's tmp folder and named in the failure message with its
mutation list, so it can be replayed. During fuzzing the eager size limit is lowered to 256 MiB
(``NAPARI_APL_MAX_VOXEL_BYTES``) to bound memory; the default limit has its own test below. Mutations
include infinite ``vox_offset`` values and huge ``arch_args`` in checkpoint metadata (both were
bugs this fuzzer found, now fixed and pinned by their own tests below).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import pickle
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from napari_apl.core.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from napari_apl.core.errors import APLError, CheckpointError, VolumeError
from napari_apl.core.models import DualHeadNet, build_model
from napari_apl.core.volume import MAX_VOXEL_BYTES_ENV, Volume, load_volume

FUZZ_SECONDS = float(os.environ.get("NAPARI_APL_FUZZ_SECONDS", "4"))
FUZZ_SEED = int(os.environ.get("NAPARI_APL_FUZZ_SEED", "0"))
CASE_TIMEOUT_S = 10.0
LAZY_COMPUTE_LIMIT = 64 * 1024**2


class _Hang(Exception):
    """Raised by the alarm when one load takes longer than ``CASE_TIMEOUT_S``."""


class Fuzzer:
    """Runs ``check(data, mutations)`` on mutated inputs for a bounded time and collects failures."""

    def __init__(
        self, name: str, out_dir: Path, seconds: float = FUZZ_SECONDS, seed: int = FUZZ_SEED
    ) -> None:
        self.name, self.out_dir, self.seconds = name, out_dir, seconds
        self.rng = random.Random(f"{name}-{seed}")
        self.count = 0
        self.outcomes: dict[str, int] = {}
        self.failures: list[str] = []

    def run(
        self, make_case: Callable[[random.Random], tuple[bytes, str, list[str]]], check: Callable
    ) -> None:
        """Fuzz until the time budget is spent; ``make_case`` returns (bytes, suffix, mutation list)."""
        previous = signal.signal(signal.SIGALRM, self._alarm)
        t0 = time.perf_counter()
        try:
            while time.perf_counter() - t0 < self.seconds:
                data, suffix, mutations = make_case(self.rng)
                path = self.out_dir / f"case{suffix}"
                path.write_bytes(data)
                signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        outcome = check(path)
                except APLError as exc:
                    text = str(exc)
                    if "\n" in text or not text:
                        self._fail(path, data, mutations, f"APLError message is not one line: {text!r}")
                    outcome = type(exc).__name__
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    self._fail(path, data, mutations, f"{type(exc).__name__}: {str(exc)[:300]}")
                    outcome = "FAILED"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                self.count += 1
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        finally:
            signal.signal(signal.SIGALRM, previous)
        elapsed = time.perf_counter() - t0
        print(
            f"\nfuzz {self.name}: {self.count} cases in {elapsed:.1f} s ({self.count / elapsed:.0f}/s), "
            f"outcomes {dict(sorted(self.outcomes.items()))}"
        )

    @staticmethod
    def _alarm(signum: int, frame: Any) -> None:
        raise _Hang(f"one load took longer than {CASE_TIMEOUT_S} s")

    def _fail(self, path: Path, data: bytes, mutations: list[str], what: str) -> None:
        keep = self.out_dir / f"failure-{len(self.failures)}{path.name[4:]}"
        keep.write_bytes(data)
        self.failures.append(f"{keep.name}: {what} after mutations {mutations}")

    def assert_clean(self) -> None:
        """Fail the test with one example of each distinct finding, if any."""
        assert self.count > 0
        kinds: dict[str, str] = {}
        for failure in self.failures:
            kinds.setdefault(failure.split(": ", 1)[1][:60], failure)
        assert not self.failures, f"{len(self.failures)} unclean failures, {len(kinds)} kinds:\n" + "\n".join(
            kinds.values()
        )


# -- byte-level mutations ---------------------------------------------------------------------------------


def _mutate_bytes(data: bytes, rng: random.Random, focus: int) -> tuple[bytes, str]:
    """One random byte-level mutation; ``focus`` bytes at the start (a header) are hit more often."""
    buf = bytearray(data)
    n = len(buf)

    def pos() -> int:
        if n == 0:
            return 0
        return rng.randrange(min(focus, n)) if rng.random() < 0.6 else rng.randrange(n)

    kind = rng.choice(["truncate", "flip", "chunk", "insert", "delete", "append"])
    if kind == "truncate":
        cut = pos()
        return bytes(buf[:cut]), f"truncate@{cut}"
    if kind == "flip":
        spots = [pos() for _ in range(rng.choice([1, 1, 2, 4, 8]))]
        for p in spots:
            if p < n:
                buf[p] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip@{spots}"
    if kind == "chunk":
        p = pos()
        size = rng.choice([1, 2, 4, 8, 64])
        buf[p : p + size] = bytes(rng.randrange(256) for _ in range(size))
        return bytes(buf[:n]) if len(buf) > n else bytes(buf), f"chunk@{p}+{size}"
    if kind == "insert":
        p = pos()
        size = rng.choice([1, 3, 16, 400])
        buf[p:p] = bytes(rng.randrange(256) for _ in range(size))
        return bytes(buf), f"insert@{p}+{size}"
    if kind == "delete":
        p = pos()
        size = rng.choice([1, 4, 100])
        del buf[p : p + size]
        return bytes(buf), f"delete@{p}+{size}"
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 100, 5000])))
    return bytes(buf) + extra, f"append+{len(extra)}"


# -- NIfTI -------------------------------------------------------------------------------------------------

_HOSTILE_INTS = [0, 1, 2, 3, 4, 5, 7, 8, -1, -2, -32768, 32767, 255, 256, 1000]
_HOSTILE_INTS2 = [2**31 - 1, 2**31, 2**40, 2**62, -(2**62)]
_HOSTILE_FLOATS = [0.0, -0.0, -1.0, 1.0, 1e-30, 1e-3, 1e3, 1e30, 3.4e38, math.nan, math.inf, -math.inf]
_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 99, -1]
_FIELDS = [
    "dim", "dim", "dim", "pixdim", "pixdim", "datatype", "datatype", "bitpix", "vox_offset", "vox_offset",
    "scl_slope", "scl_inter", "qform_code", "sform_code", "quatern_b", "quatern_c", "qoffset_x",
    "srow_x", "srow_y", "srow_z", "sizeof_hdr", "magic", "dim_info", "xyzt_units", "intent_code",
    "slice_code", "slice_start", "slice_end", "cal_min", "cal_max",
]  # fmt: skip


def _mutate_header(data: bytes, rng: random.Random, nifti2: bool) -> tuple[bytes, str]:
    """Set one NIfTI header field to a hostile value (raw bytes, no nibabel validation)."""
    dtype = (nib.Nifti2Header if nifti2 else nib.Nifti1Header).template_dtype
    if len(data) < dtype.itemsize:
        return data, "header-too-short"
    buf = bytearray(data)
    hdr = np.frombuffer(buf, dtype=dtype, count=1)
    name = rng.choice(_FIELDS)
    field_dtype = dtype.fields[name][0]
    base = field_dtype.base
    index = rng.randrange(field_dtype.shape[0]) if field_dtype.shape else None
    if name == "magic":
        value: Any = rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0", b"xxxx", b"\0\0\0\0"])
    elif name == "datatype":
        value = rng.choice(_DATATYPES)
    elif name == "vox_offset":
        value = rng.choice([0, 1, 348, 351, 352, 353, 540, 544, len(data), len(data) + 1, 10**9, -1, -352])
        if base.kind == "f":
            value = float(rng.choice([value, math.nan, math.inf, -math.inf]))
    elif base.kind == "f":
        value = rng.choice([*_HOSTILE_FLOATS, rng.uniform(-1e4, 1e4)])
    else:
        pool = _HOSTILE_INTS + ([*_HOSTILE_INTS2] if base.itemsize >= 8 else [])
        value = rng.choice([*pool, rng.randrange(-50, 50)])
        info = np.iinfo(base)
        value = int(min(max(value, info.min), info.max))
    with np.errstate(all="ignore"):
        if index is None:
            hdr[name][0] = value
        else:
            hdr[name][0][index] = value
    return bytes(buf), f"{name}{'' if index is None else f'[{index}]'}={value!r}"


def _nifti_bytes(img: Any, suffix: str) -> bytes:
    """Serialise a nibabel image to the bytes of a .nii or .nii.gz file."""
    raw = img.to_bytes() if hasattr(img, "to_bytes") else img.dataobj
    return gzip.compress(raw, compresslevel=1, mtime=0) if suffix == ".nii.gz" else raw


@pytest.fixture(scope="module")
def nifti_seeds() -> list[tuple[bytes, str, bool]]:
    """Small valid NIfTI files: (uncompressed bytes, suffix, is NIfTI-2)."""
    rng = np.random.default_rng(0)
    seeds = []
    data16 = rng.integers(-1000, 1000, (12, 10, 6), dtype=np.int16)
    img = nib.Nifti1Image(data16, np.diag([2.0, 2.0, 5.0, 1.0]))
    img.header.set_data_dtype(np.int16)
    seeds.append((img.to_bytes(), ".nii", False))
    seeds.append((img.to_bytes(), ".nii.gz", False))
    lps = np.diag([-1.5, -1.5, 4.0, 1.0])
    lps[:3, 3] = [10, 20, -30]
    f32 = rng.normal(size=(9, 11, 7)).astype(np.float32)
    seeds.append((nib.Nifti1Image(f32, lps).to_bytes(), ".nii.gz", False))
    scaled = nib.Nifti1Image(data16, np.eye(4))
    scaled.header.set_slope_inter(0.5, -10)
    seeds.append((scaled.to_bytes(), ".nii", False))
    n2 = nib.Nifti2Image(rng.integers(0, 5, (8, 8, 5), dtype=np.uint8), np.diag([3.0, 3.0, 3.0, 1.0]))
    seeds.append((n2.to_bytes(), ".nii", True))
    seeds.append((n2.to_bytes(), ".nii.gz", True))
    return seeds


def _nifti_case(
    seeds: list[tuple[bytes, str, bool]],
) -> Callable[[random.Random], tuple[bytes, str, list[str]]]:
    """Return a generator of mutated NIfTI files."""

    def make(rng: random.Random) -> tuple[bytes, str, list[str]]:
        raw, suffix, nifti2 = rng.choice(seeds)
        focus = 540 if nifti2 else 352
        mutations = [f"seed={suffix}{'/nifti2' if nifti2 else ''}"]
        outer = suffix == ".nii.gz" and rng.random() < 0.35  # damage the gzip stream itself
        data = raw
        for _ in range(rng.choice([1, 1, 2, 3])):
            if not outer and rng.random() < 0.55:
                data, what = _mutate_header(data, rng, nifti2)
            elif not outer:
                data, what = _mutate_bytes(data, rng, focus)
            else:
                what = ""
            if what:
                mutations.append(what)
        if suffix == ".nii.gz":
            data = gzip.compress(data, compresslevel=1, mtime=0)
            if outer:
                for _ in range(rng.choice([1, 2])):
                    data, what = _mutate_bytes(data, rng, 64)
                    mutations.append("gz:" + what)
        return data, suffix, mutations

    return make


def _check_volume(path: Path) -> str:
    """Load a file eagerly and lazily; a successful load must give a usable, consistent volume."""
    vol = load_volume(path)
    assert isinstance(vol, Volume) and vol.data.ndim == 3 and all(s > 0 for s in vol.shape)
    assert vol.to_original(vol.data).shape == tuple(vol.original_shape)
    assert np.isfinite(np.asarray(vol.spacing)).all()
    lazy = load_volume(path, lazy=True)
    assert lazy.shape == vol.shape
    if math.prod(lazy.shape) * lazy.data.dtype.itemsize <= LAZY_COMPUTE_LIMIT:
        assert np.array_equal(lazy.compute(), vol.data)
    return "ok"


def test_fuzz_nifti_loader(nifti_seeds, tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_VOXEL_BYTES_ENV, str(256 * 1024**2))
    fuzz = Fuzzer("nifti", tmp_path)
    fuzz.run(_nifti_case(nifti_seeds), _check_volume)
    fuzz.assert_clean()
    assert fuzz.outcomes.get("VolumeError", 0) > 0


def test_nifti_seeds_load(nifti_seeds, tmp_path):
    """The unmutated seeds are valid (so the fuzzer starts from files that load)."""
    for i, (raw, suffix, _) in enumerate(nifti_seeds):
        path = tmp_path / f"seed{i}{suffix}"
        path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
        assert _check_volume(path) == "ok"


# -- checkpoints --------------------------------------------------------------------------------------------


class Evil:
    """A pickle payload that creates a file when unpickled (proof that code ran)."""

    target: Path = Path("/nonexistent")

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _tiny_meta(model: DualHeadNet) -> CheckpointMeta:
    """Metadata of the fuzzing seed model."""
    return CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=(16, 16),
        spacing=(4.0, 4.0),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
        provenance={"note": "fuzz seed"},
    )


@pytest.fixture(scope="module")
def ckpt_seed(tmp_path_factory) -> tuple[bytes, dict]:
    """A valid tiny checkpoint: its bytes and its payload (read back safely)."""
    torch.manual_seed(0)
    model = build_model("unet-dual", base=2)
    path = tmp_path_factory.mktemp("seed") / "seed.pt"
    save_checkpoint(path, model, _tiny_meta(model))
    return path.read_bytes(), torch.load(path, weights_only=True)


_JSON_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 5, 1.5, -2.5, 1e308, "", "x", "unet-dual", "deeplabv2",
    [], [1], [0, 0], [16, 16], [16, 16, 16], [1e-9, 1e9], ["a", "b"], {}, {"kind": "zscore"},
    {"kind": "nope"}, "x" * 10000, [[1, 2]], {"a": {"b": [1, 2, {"c": None}]}},
]  # fmt: skip
# arch_args values, hostile ones included (huge widths must be refused before anything is allocated)
_ARCH_VALUES: list[Any] = [
    *(None, True, 0, -1, 1, 2, 3, 4, 7, 1.5, "x", [], {}),
    *(2.0, 0.5, 1e-3, 16, 1024, 2**20),
]


def _tensor_variant(t: torch.Tensor, rng: random.Random) -> tuple[Any, str]:
    """A hostile replacement for one tensor of the state dict."""
    kind = rng.choice(
        ["shape", "dtype", "nan", "inf", "empty", "scalar", "huge_view", "int", "str", "list", "none", "dict"]
    )
    if kind == "shape":
        shape = tuple(rng.choice([0, 1, 2, 3, 5, 16]) for _ in range(rng.randrange(0, 5)))
        return torch.zeros(shape), f"shape{shape}"
    if kind == "dtype":
        dt = rng.choice([torch.int64, torch.bool, torch.float16, torch.float64, torch.complex64, torch.uint8])
        return torch.zeros(t.shape, dtype=dt), f"dtype={dt}"
    if kind in ("nan", "inf"):
        return torch.full(t.shape, math.nan if kind == "nan" else math.inf), kind
    if kind == "empty":
        return torch.empty(0), kind
    if kind == "scalar":
        return torch.tensor(3.0), kind
    if kind == "huge_view":  # declares 2**40 elements backed by a single float: never materialise it
        return torch.zeros(1).expand(2**20, 2**20), kind
    return {"int": 7, "str": "weights", "list": [1, 2], "none": None, "dict": {"a": t}}[kind], kind


def _mutate_payload(payload: dict, rng: random.Random) -> str:
    """Apply one structural mutation to a checkpoint payload in place; return its description."""
    kind = rng.choice(["meta", "meta", "arch_args", "meta_raw", "format", "state", "state", "top", "evil"])
    if kind in ("meta", "arch_args"):
        try:
            meta = json.loads(payload.get("meta_json"))
        except (TypeError, ValueError):
            return "meta-unparsable"
        if not isinstance(meta, dict):
            return "meta-not-dict"
        if kind == "arch_args" and isinstance(meta.get("arch_args"), dict):
            key = rng.choice(["base", "num_classes", "in_channels", "dropout", "unknown"])
            meta["arch_args"][key] = rng.choice(_ARCH_VALUES)
            what = f"arch_args.{key}={meta['arch_args'][key]!r}"[:80]
        else:
            keys = [*list(meta), "extra"]
            key = rng.choice(keys)
            if rng.random() < 0.2:
                meta.pop(key, None)
                what = f"del meta.{key}"
            else:
                meta[key] = rng.choice(_JSON_VALUES)
                what = f"meta.{key}={meta[key]!r}"[:80]
        payload["meta_json"] = json.dumps(meta)
        return what
    if kind == "meta_raw":
        value = rng.choice([None, 3, b"{}", "{", "[]", "null", '"text"', "{}" * 1000, torch.zeros(2)])
        payload["meta_json"] = value
        return f"meta_json={value!r}"[:80]
    if kind == "format":
        value = rng.choice([0, -1, 2, 99, "1", 1.0, True, None, 2**70, torch.tensor(1)])
        payload["napari_apl_format"] = value
        return f"format={value!r}"[:80]
    if kind == "state":
        state = payload.get("state_dict")
        if not isinstance(state, dict) or not state:
            payload["state_dict"] = rng.choice([None, [], {}, 5, {"x": torch.zeros(1)}])
            return "state_dict replaced"
        key = rng.choice(list(state))
        action = rng.choice(["drop", "add", "rename", "replace", "replace", "all"])
        if action == "drop":
            del state[key]
        elif action == "add":
            state[f"extra.{rng.randrange(100)}"] = torch.zeros(rng.randrange(1, 5))
        elif action == "rename":
            state[f"module.{key}"] = state.pop(key)
        elif action == "replace":
            state[key], what = _tensor_variant(state[key], rng)
            return f"state[{key}]={what}"
        else:
            payload["state_dict"] = rng.choice([None, [], {}, "weights", {1: torch.zeros(1)}])
        return f"state {action} {key}"
    if kind == "top":
        action = rng.choice(["drop", "add", "list", "tensor", "str", "wrap"])
        if action == "drop":
            payload.pop(rng.choice(list(payload)), None)
        elif action == "add":
            payload[rng.choice(["x", "optimizer", 3])] = rng.choice([None, torch.zeros(2), [1]])
        else:
            replacement = {
                "list": [payload],
                "tensor": torch.zeros(3),
                "str": "hello",
                "wrap": {"model": payload},
            }
            payload.clear()
            payload["__replace__"] = replacement[action]
        return f"top {action}"
    where = rng.choice(["state", "meta", "top"])
    if where == "state" and isinstance(payload.get("state_dict"), dict):
        payload["state_dict"]["evil"] = Evil()
    elif where == "meta":
        payload["meta_json"] = Evil()
    else:
        payload["evil"] = Evil()
    return f"evil in {where}"


def _ckpt_case(seed: tuple[bytes, dict]) -> Callable[[random.Random], tuple[bytes, str, list[str]]]:
    """Return a generator of mutated checkpoint files."""
    seed_bytes, seed_payload = seed

    def make(rng: random.Random) -> tuple[bytes, str, list[str]]:
        mutations = []
        if rng.random() < 0.6:
            payload = copy.deepcopy(seed_payload)
            for _ in range(rng.choice([1, 1, 2, 3])):
                mutations.append(_mutate_payload(payload, rng))
            obj = payload.pop("__replace__") if "__replace__" in payload else payload
            buf = io.BytesIO()
            legacy = rng.random() < 0.1
            torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
            data = buf.getvalue()
            if legacy:
                mutations.append("legacy-format")
            if rng.random() < 0.2:
                data, what = _mutate_bytes(data, rng, 2048)
                mutations.append(what)
        else:
            data = seed_bytes
            for _ in range(rng.choice([1, 1, 2, 4])):
                data, what = _mutate_bytes(data, rng, 2048)
                mutations.append(what)
        return data, ".pt", mutations

    return make


def test_fuzz_checkpoint_loader(ckpt_seed, tmp_path):
    marker = tmp_path / "pwned"
    Evil.target = marker

    def check(path: Path) -> str:
        outcome = "ok"
        try:
            meta = read_meta(path)
            assert isinstance(meta, CheckpointMeta)
        except CheckpointError:
            outcome = "meta-refused"
        model, meta = load_checkpoint(path)
        assert isinstance(model, DualHeadNet) and isinstance(meta, CheckpointMeta)
        assert outcome == "ok", "load_checkpoint accepted a file that read_meta refused"
        return outcome

    before = psutil.Process().memory_info().rss
    fuzz = Fuzzer("checkpoint", tmp_path)
    fuzz.run(_ckpt_case(ckpt_seed), check)
    assert not marker.exists(), "a pickle payload ran"
    fuzz.assert_clean()
    assert fuzz.outcomes.get("CheckpointError", 0) > 0
    grown = (psutil.Process().memory_info().rss - before) / 1024**2
    print(f"fuzz checkpoint: resident memory grew by {grown:.0f} MiB")


def test_evil_payload_would_run(tmp_path):
    """The payload used by the fuzzer is live: an unrestricted unpickler creates the file."""
    Evil.target = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"x": Evil()}))["x"].close()
    assert Evil.target.exists()


# -- huge declared shapes are refused before anything is allocated ------------------------------------------


def _header_only(path: Path, shape: tuple[int, ...], nifti2: bool = False, dtype: Any = np.int16) -> Path:
    """Write a NIfTI header declaring ``shape`` followed by only a few bytes of data."""
    hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _rss() -> int:
    """Resident memory of this process (bytes)."""
    return psutil.Process().memory_info().rss


class _PeakRss:
    """Samples this process's resident memory every 2 ms in a thread; ``spike`` = peak over the start."""

    def __enter__(self) -> _PeakRss:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = _rss()
        self.peak = max(self.peak, self.end)

    @property
    def spike_mib(self) -> float:
        return (self.peak - self.start) / 1024**2

    @property
    def grown_mib(self) -> float:
        return (self.end - self.start) / 1024**2


def _load_measured(path: Path, lazy: bool) -> tuple[float, float]:
    """Load (expecting a one-line VolumeError); return (peak memory spike MiB, resident growth MiB)."""
    with _PeakRss() as mem, pytest.raises(VolumeError) as exc:
        load_volume(path, lazy=lazy)
    assert "\n" not in str(exc.value)
    return mem.spike_mib, mem.grown_mib


@pytest.mark.parametrize(
    ("name", "shape", "nifti2", "lazy"),
    [
        ("huge.nii.gz", (32767, 32767, 32767), False, False),
        ("huge.nii", (32767, 32767, 32767), False, False),
        ("huge.nii", (32767, 32767, 32767), False, True),
        ("huge2.nii.gz", (2**20, 2**20, 2**20), True, False),
        ("huge2.nii", (2**20, 2**20, 2**20), True, True),
        ("rows.nii.gz", (2**20, 4, 1000), True, False),
    ],
)
def test_huge_declared_volume_refused_before_allocation(tmp_path, name, shape, nifti2, lazy):
    spike, grown = _load_measured(_header_only(tmp_path / name, shape, nifti2), lazy)
    assert spike < 200 and grown < 200, (spike, grown)


def test_huge_slice_in_tiny_gz_refused_before_allocation(tmp_path):
    spike, _ = _load_measured(_header_only(tmp_path / "slice.nii.gz", (16384, 16384, 1)), False)  # 512 MiB
    assert spike < 200, spike


def test_huge_declared_volume_refused_lazily_gz(tmp_path):
    path = _header_only(tmp_path / "huge.nii.gz", (1024, 1024, 10**6), nifti2=True)
    with pytest.raises(VolumeError):
        load_volume(path, lazy=True)


def test_huge_tensor_view_is_not_materialised(ckpt_seed, tmp_path):
    """A state-dict entry declaring 2**40 elements over one stored float is refused, never expanded."""
    payload = copy.deepcopy(ckpt_seed[1])
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.zeros(1).expand(2**20, 2**20)
    path = tmp_path / "view.pt"
    torch.save(payload, path)
    with _PeakRss() as mem, pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "shape mismatch" in str(exc.value)
    assert mem.spike_mib < 200 and mem.grown_mib < 200


def test_huge_declared_network_refused_before_allocation(ckpt_seed, tmp_path):
    payload = copy.deepcopy(ckpt_seed[1])
    meta = json.loads(payload["meta_json"])
    meta["arch_args"]["base"] = 2**20
    payload["meta_json"] = json.dumps(meta)
    path = tmp_path / "wide.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize(("suffix", "value"), [(".nii", np.inf), (".nii.gz", -np.inf)])
def test_infinite_vox_offset_is_a_clean_error(tmp_path, suffix, value):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = bytearray(img.to_bytes())
    np.frombuffer(raw, dtype=nib.Nifti1Header.template_dtype, count=1)["vox_offset"][0] = value
    path = tmp_path / f"inf{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    with pytest.raises(VolumeError):
        load_volume(path)
