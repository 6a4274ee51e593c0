"""Tests of checkpoint saving, safe loading, metadata and raw state-dict import."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from napari_apl.core import checkpoint as ck
from napari_apl.core.checkpoint import (
    FORMAT_VERSION,
    CheckpointMeta,
    describe,
    import_state_dict,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from napari_apl.core.errors import CheckpointError, OutputExistsError
from napari_apl.core.labels import CLASS_NAMES
from napari_apl.core.models import build_model


class Evil:
    """Unpickling this creates ``target``: the stand-in for a malicious checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _meta(arch: str = "unet-dual", **kw) -> CheckpointMeta:
    base = {
        "arch": arch,
        "input_size": (64, 96),
        "spacing": (1.5, 2.0),
        "normalization": {"kind": "ct_window", "level": 40, "width": 400},
        "provenance": {"by": "tests", "method": "source", "training_data": "phantom seed 0"},
    }
    base.update(kw)
    return CheckpointMeta(**base)


def _unet(**kw):
    torch.manual_seed(0)
    model = build_model("unet-dual", base=4, **kw)
    model.train()
    with torch.no_grad():  # move the batch-norm running statistics away from their defaults
        model(torch.rand(2, 1, 32, 32) * 3 + 1)
    return model.eval()


def _deeplab():
    torch.manual_seed(0)
    model = build_model("deeplabv2", layers=(1, 1, 1, 1))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _x(hw=(64, 96)) -> torch.Tensor:
    return torch.rand(2, 1, *hw, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def saved(tmp_path):
    model = _unet()
    path = save_checkpoint(tmp_path / "model.pt", model, _meta())
    return model, path


def _raise(fn, *args, **kwargs) -> str:
    """Call ``fn``, expect a CheckpointError and return its (checked single-line) message."""
    with pytest.raises(CheckpointError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _rewrite(src: Path, dst: Path, mutate) -> Path:
    """Load a checkpoint payload, change it with ``mutate`` and write it to ``dst``."""
    payload = torch.load(src, weights_only=True)
    mutate(payload)
    torch.save(payload, dst)
    return dst


def _edit_meta(**changes):
    def mutate(payload):
        data = json.loads(payload["meta_json"])
        data.update(changes)
        payload["meta_json"] = json.dumps(data)

    return mutate


# -- metadata -------------------------------------------------------------------------------------
def test_meta_round_trip_and_defaults():
    meta = _meta()
    data = meta.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["input_size"] == [64, 96] and data["spacing"] == [1.5, 2.0]
    back = CheckpointMeta.from_dict(data)
    assert back == meta
    assert back.input_size == (64, 96) and back.spacing == (1.5, 2.0)
    assert CheckpointMeta.from_json(meta.to_json()) == meta
    default = CheckpointMeta()
    assert default.format_version == FORMAT_VERSION == 1
    assert default.class_names == list(CLASS_NAMES) and default.num_classes == 5


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"input_size": "big"}, "input_size"),
        ({"input_size": [64, 0]}, "input_size"),
        ({"input_size": [64.5, 64]}, "input_size"),
        ({"spacing": [1.0, -1.0]}, "spacing"),
        ({"spacing": [1.0]}, "spacing"),
        ({"class_names": "liver"}, "class_names"),
        ({"class_names": ["background", 3]}, "class_names"),
        ({"arch": ""}, "arch"),
        ({"arch_args": [1, 2]}, "arch_args"),
        ({"normalization": {"lower": 1}}, "kind"),
        ({"provenance": "me"}, "provenance"),
        ({"format_version": "1"}, "format_version"),
        ({"class_names": ["background", "liver", "liver"]}, "name liver twice"),
        ({"arch_args": {"base": 4, "in_channels": 3}}, "takes 3 input channels"),
    ],
)
def test_meta_validation(changes, needle):
    data = _meta().to_dict()
    data.update(changes)
    assert needle in _raise(CheckpointMeta.from_dict, data)


def test_meta_requires_arch_and_classes():
    data = _meta().to_dict()
    del data["arch"]
    assert "arch" in _raise(CheckpointMeta.from_dict, data)
    assert "JSON" in _raise(CheckpointMeta.from_json, "{not json")


# -- save / load ----------------------------------------------------------------------------------
def test_round_trip_identical_outputs(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta.arch == "unet-dual" and meta.arch_args == model.arch_args
    assert meta.input_size == (64, 96) and meta.spacing == (1.5, 2.0)
    assert meta.normalization["kind"] == "ct_window" and meta.provenance["by"] == "tests"
    x = _x()
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_file_layout_is_plain(saved):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"napari_apl_format", "meta_json", "state_dict"}
    assert payload["napari_apl_format"] == FORMAT_VERSION
    assert json.loads(payload["meta_json"])["arch"] == "unet-dual"
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())


def test_overwrite_refused_then_allowed(saved, tmp_path):
    _, path = saved
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_checkpoint(path, _unet(num_classes=5), _meta())
    assert path.read_bytes() == before
    other = build_model("unet-dual", base=4)
    save_checkpoint(path, other, _meta(), overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary files left


def test_save_checks_model_against_meta(tmp_path):
    model = _unet()
    out = tmp_path / "x.pt"
    assert "deeplabv2" in _raise(save_checkpoint, out, model, _meta(arch="deeplabv2"))
    assert "class" in _raise(save_checkpoint, out, model, _meta(class_names=["a", "b", "c"]))
    assert not out.exists()


def test_channels_last_weights_are_saved_contiguous(tmp_path):
    """Predict makes the weights channels-last in place; the saved tensors are the same as without that."""

    def members(path: Path) -> dict[str, bytes]:  # the archive's files, without its (temporary) root name
        with zipfile.ZipFile(path) as zf:
            return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}

    torch.manual_seed(0)
    model = build_model("unet-dual", base=4)
    a = save_checkpoint(tmp_path / "a.pt", model, _meta(arch_args={"base": 4}))
    model.to(memory_format=torch.channels_last)
    assert not model.down1[0].weight.is_contiguous()
    b = save_checkpoint(tmp_path / "b.pt", model, _meta(arch_args={"base": 4}))
    state = torch.load(b, weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in state.values())
    assert members(a) == members(b)


def test_save_takes_arch_args_from_model(tmp_path):
    model = _unet()
    path = save_checkpoint(tmp_path / "m.pt", model, _meta(arch_args={"base": 99}))
    assert read_meta(path).arch_args == model.arch_args


def test_read_meta(saved, tmp_path):
    _, path = saved
    meta = read_meta(path)
    assert meta == _meta(arch_args=meta.arch_args)
    assert meta.arch_args["base"] == 4
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 torch.save format cannot be memory-mapped
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert read_meta(legacy) == meta
    assert load_checkpoint(legacy)[1] == meta


def test_describe(saved):
    model, path = saved
    text = describe(path)
    for needle in (
        "unet-dual",
        "parameters:",
        "encoder",
        "classifiers",
        "right kidney",
        "64 x 96",
        "1.5 x 2 mm",
        "ct_window",
        "training_data: phantom seed 0",
        "format version: 1",
        str(path),
        "KB",
    ):
        assert needle in text, needle
    assert len(text.splitlines()) >= 8
    counts = model.parameter_counts()
    assert f"{counts['total']:,}" in text
    pair = describe((model, _meta()))
    assert "unet-dual" in pair and "not saved" in pair
    assert describe((_meta(), model)) == pair


def test_describe_shows_the_files_text_as_text(tmp_path):
    """A newline or a terminal escape in the provenance forged or hid lines of ``info``'s summary."""
    forged = "train-source\nfile: /opt/models/official.pt (7.0 MB)\x1b[8m"
    meta = CheckpointMeta(
        arch="unet-dual", input_size=(32, 32), spacing=(2.0, 2.0), provenance={"by": forged}
    )
    save_checkpoint(tmp_path / "m.pt", build_model("unet-dual", base=4), meta)
    text = describe(tmp_path / "m.pt")
    assert "\x1b" not in text and [ln for ln in text.splitlines() if ln.startswith("file:")] == [
        f"file: {tmp_path / 'm.pt'} ({text.rsplit('(', 1)[1]}"
    ]
    assert "  by: train-source\\nfile: /opt/models/official.pt (7.0 MB)\\x1b[8m" in text


def test_deeply_nested_metadata_is_refused_in_one_line(tmp_path):
    """JSON nested past Python's recursion limit ended ``info`` in a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(_meta().to_dict())[:-1] + ', "deep": ' + deep + "}"
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointMeta.from_json(text)
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        CheckpointMeta(arch="unet-dual", input_size=(32, 32), spacing=(2.0, 2.0), provenance={"x": nested})


@pytest.mark.parametrize(
    ("kind", "line"),
    [
        ("ct_window", "normalization: ct_window (level=40, width=400)"),
        ("percentile", "normalization: percentile (lower=0.5, upper=99.5)"),
        ("zscore", "normalization: zscore"),
    ],
)
def test_describe_names_the_settings_the_normalisation_reads(kind: str, line: str) -> None:
    """A stored recipe holds all four settings; the summary shows only those its kind uses."""
    norm = {"kind": kind, "level": 40, "width": 400, "lower": 0.5, "upper": 99.5}
    model = build_model("unet-dual", base=4)
    text = describe((model, _meta(normalization=norm)))
    [shown] = [ln for ln in text.splitlines() if "normalization" in ln]
    assert shown == line


# -- loading errors -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    for fn in (load_checkpoint, read_meta, describe):
        msg = _raise(fn, missing)
        assert "nope.pt" in msg and "does not exist" in msg
    assert "not a file" in _raise(load_checkpoint, tmp_path)


@pytest.mark.parametrize("kind", ["random", "zip", "json", "empty"])
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.pt"
    if kind == "random":
        path.write_bytes(bytes((i * 131 + 7) % 256 for i in range(4096)))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
    elif kind == "json":
        path.write_text(json.dumps({"arch": "unet-dual", "state_dict": {}}))
    else:
        path.write_bytes(b"")
    for fn in (load_checkpoint, read_meta):
        msg = _raise(fn, path)
        assert path.name in msg and "not a PyTorch checkpoint" in msg


@pytest.mark.parametrize("container", ["pickle", "torch"])
def test_unsafe_pickle_runs_nothing(tmp_path, container):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"napari_apl_format": 1, "meta_json": "{}", "state_dict": {"w": Evil(target)}}
    if container == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    for fn in (load_checkpoint, read_meta, describe):
        msg = _raise(fn, path)
        assert "evil.pt" in msg and "unsafe" in msg and "open" in msg
    meta = _meta()
    assert "unsafe" in _raise(import_state_dict, path, meta)
    assert not target.exists()
    if container == "pickle":  # the payload is live: an unrestricted unpickler would have run it
        pickle.loads(path.read_bytes())["state_dict"]["w"].close()
        assert target.exists()


def test_raw_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "raw.pth"
    torch.save(_unet().state_dict(), path)
    msg = _raise(load_checkpoint, path)
    assert "raw.pth" in msg and "raw state dict" in msg and "import" in msg
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)
    assert "not a napari-apl checkpoint" in _raise(load_checkpoint, plain)


def test_newer_format(saved, tmp_path):
    _, path = saved
    newer = _rewrite(path, tmp_path / "newer.pt", lambda p: p.update(napari_apl_format=2))
    for fn in (load_checkpoint, read_meta):
        msg = _raise(fn, newer)
        assert "newer.pt" in msg
        assert "was written by a newer napari-apl (format 2 > 1): upgrade napari-apl" in msg
    meta_newer = _rewrite(path, tmp_path / "meta_newer.pt", _edit_meta(format_version=3))
    assert "(format 3 > 1)" in _raise(load_checkpoint, meta_newer)


def test_unknown_architecture(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "arch.pt", _edit_meta(arch="resnet9000"))
    msg = _raise(load_checkpoint, bad)
    assert "arch.pt" in msg and "unknown architecture 'resnet9000'" in msg and "unet-dual" in msg
    assert read_meta(bad).arch == "resnet9000"  # metadata alone is still readable


def test_wrong_class_count(saved, tmp_path):
    _, path = saved
    four = _rewrite(path, tmp_path / "four.pt", _edit_meta(class_names=["bg", "liver", "rk", "lk"]))
    msg = _raise(load_checkpoint, four)
    assert "four.pt" in msg and "class count" in msg and "4" in msg

    args = _rewrite(
        path,
        tmp_path / "args.pt",
        _edit_meta(arch_args={"base": 4, "in_channels": 1, "num_classes": 3, "dropout": 0.0}),
    )
    assert "class count" in _raise(load_checkpoint, args)

    msg = _raise(load_checkpoint, path, num_classes=3)
    assert "model.pt" in msg and "5 classes" in msg and "3 are expected" in msg
    model, _ = load_checkpoint(path, num_classes=5)
    assert model.num_classes == 5


def test_missing_and_unexpected_keys(saved, tmp_path):
    _, path = saved

    def drop(payload):
        del payload["state_dict"]["inc.0.weight"]

    def extra(payload):
        payload["state_dict"]["extra.weight"] = torch.zeros(3)

    msg = _raise(load_checkpoint, _rewrite(path, tmp_path / "missing.pt", drop))
    assert "missing.pt" in msg and "missing" in msg and "inc.0.weight" in msg
    msg = _raise(load_checkpoint, _rewrite(path, tmp_path / "extra.pt", extra))
    assert "extra.pt" in msg and "unexpected" in msg and "extra.weight" in msg


def test_shape_mismatch(saved, tmp_path):
    _, path = saved

    def reshape(payload):
        payload["state_dict"]["up1.reduce.weight"] = torch.zeros(4, 8, 3, 3)

    msg = _raise(load_checkpoint, _rewrite(path, tmp_path / "shape.pt", reshape))
    assert "shape.pt" in msg and "shape mismatch" in msg and "up1.reduce.weight" in msg


def test_damaged_payloads(saved, tmp_path):
    _, path = saved
    no_meta = _rewrite(path, tmp_path / "nometa.pt", lambda p: p.pop("meta_json"))
    assert "metadata" in _raise(load_checkpoint, no_meta)
    bad_json = _rewrite(path, tmp_path / "badjson.pt", lambda p: p.update(meta_json="{oops"))
    assert "JSON" in _raise(load_checkpoint, bad_json)
    no_weights = _rewrite(path, tmp_path / "noweights.pt", lambda p: p.update(state_dict={}))
    assert "weights" in _raise(load_checkpoint, no_weights)


def test_a_flipped_bit_in_the_weights_is_refused(saved, tmp_path):
    """torch.load does not check the zip's CRC-32: the loader does, so damaged weights never load."""
    model, path = saved
    data = bytearray(path.read_bytes())
    weight = model.state_dict()["head_main.3.weight"] if "head_main.3.weight" in model.state_dict() else None
    weight = weight if weight is not None else next(iter(model.state_dict().values()))
    raw = weight.contiguous().numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at + 1] ^= 0x40  # one bit of one float
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    msg = _raise(load_checkpoint, damaged)
    assert "is damaged" in msg and "checksum" in msg
    assert read_meta(damaged).arch == "unet-dual"  # the metadata alone is still readable
    assert load_checkpoint(path)[1].arch == "unet-dual"  # the intact file loads


@pytest.mark.parametrize("where", ["checkpoint", "raw"])
def test_sparse_tensors_are_one_line(saved, tmp_path, where):
    model, path = saved
    if where == "checkpoint":
        sparse = _rewrite(
            path,
            tmp_path / "sparse.pt",
            lambda p: p["state_dict"].update({"inc.0.weight": p["state_dict"]["inc.0.weight"].to_sparse()}),
        )
        msg = _raise(load_checkpoint, sparse)
    else:
        state = dict(model.state_dict())
        state["inc.0.weight"] = state["inc.0.weight"].to_sparse()
        sparse = tmp_path / "raw_sparse.pth"
        torch.save(state, sparse)
        msg = _raise(import_state_dict, sparse, _meta())
    assert "inc.0.weight" in msg and "sparse" in msg


def test_import_refuses_a_model_of_several_input_channels(tmp_path):
    torch.manual_seed(0)
    raw = tmp_path / "rgb_unet.pth"
    torch.save(build_model("unet-dual", base=4, in_channels=3).state_dict(), raw)
    msg = _raise(import_state_dict, raw, _meta(arch_args={}))
    assert "rgb_unet.pth" in msg and "takes 3 input channels" in msg


def test_size_guard(saved, monkeypatch):
    _, path = saved
    monkeypatch.setenv("NAPARI_APL_MAX_CHECKPOINT_BYTES", "1000")
    for fn in (load_checkpoint, read_meta):
        msg = _raise(fn, path)
        assert "model.pt" in msg and "NAPARI_APL_MAX_CHECKPOINT_BYTES" in msg and "1000" in msg
    monkeypatch.setenv("NAPARI_APL_MAX_CHECKPOINT_BYTES", "lots")
    assert "NAPARI_APL_MAX_CHECKPOINT_BYTES" in _raise(load_checkpoint, path)
    monkeypatch.delenv("NAPARI_APL_MAX_CHECKPOINT_BYTES")
    assert ck.max_checkpoint_bytes() == 2 * 1024**3
    load_checkpoint(path)


def test_never_loads_with_weights_only_false(saved, monkeypatch):
    _, path = saved
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path)
    read_meta(path)
    describe(path)
    assert calls and all(c is True for c in calls)


# -- raw state-dict import (ADVENT DeepLabv2) -----------------------------------------------------
def _dl_meta() -> CheckpointMeta:
    return _meta(arch="deeplabv2", arch_args={"layers": [1, 1, 1, 1]}, input_size=(64, 64))


@pytest.fixture(scope="module")
def deeplab():
    model = _deeplab()
    with torch.no_grad():
        out = model(_x((64, 64)))
    return model, out


@pytest.mark.parametrize("form", ["plain", "module", "wrapped", "no_counters", "scale", "legacy"])
def test_import_advent_state_dict(tmp_path, deeplab, form):
    model, expected = deeplab
    sd = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    assert "layer1.0.downsample.1.num_batches_tracked" in sd
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer6.conv2d_list.3.bias",
    ):
        assert key in sd
    if form == "module":
        sd = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    elif form == "scale":
        sd = OrderedDict((f"Scale.{k}", v) for k, v in sd.items())
    elif form == "no_counters":  # checkpoints written before PyTorch 0.4.1
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    obj = {"state_dict": sd, "epoch": 3} if form == "wrapped" else sd
    raw = tmp_path / "advent.pth"
    torch.save(obj, raw, _use_new_zipfile_serialization=form != "legacy")
    imported = import_state_dict(raw, _dl_meta())
    assert imported.arch == "deeplabv2" and not imported.training
    with torch.no_grad():
        out = imported(_x((64, 64)))
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    # and it saves / reloads as a napari-apl checkpoint
    path = save_checkpoint(tmp_path / "dl.pt", imported, _dl_meta())
    again, meta = load_checkpoint(path)
    assert meta.arch_args["layers"] == [1, 1, 1, 1]
    with torch.no_grad():
        assert torch.equal(again(_x((64, 64)))[0], expected[0])


def test_an_adaptsegnet_model_runs_with_the_two_branches_it_was_trained_with(tmp_path, deeplab):
    """AdaptSegNet's released classifier sums ASPP branches 0 and 1 only (it returns inside its loop):
    its models imported as ADVENT's summed all four, two of them never trained."""
    model, _ = deeplab
    raw = tmp_path / "adaptsegnet.pth"
    torch.save(model.state_dict(), raw)
    meta = _meta(
        arch="deeplabv2", arch_args={"layers": [1, 1, 1, 1], "aspp_branches": 2}, input_size=(64, 64)
    )
    imported = import_state_dict(raw, meta)
    x = _x((64, 64))
    with torch.no_grad():
        feats = model.features(x)
        want = [sum(head.conv2d_list[k](f) for k in (0, 1)) for head, f in ((model.layer6, feats[-1]),)]
        main, _aux = imported(x)
        hw = x.shape[-2:]
        ref = torch.nn.functional.interpolate(want[0], size=hw, mode="bilinear", align_corners=True)
    assert torch.allclose(main, ref, atol=1e-5) and not torch.allclose(main, model(x)[0], atol=1e-3)
    again, meta2 = load_checkpoint(save_checkpoint(tmp_path / "asn.pt", imported, meta))
    assert meta2.arch_args["aspp_branches"] == 2
    with torch.no_grad():
        assert torch.equal(again(x)[0], main)


def test_import_errors(tmp_path, deeplab):
    model, _ = deeplab
    sd = model.state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "layer2.0.conv2.weight"}, missing)
    msg = _raise(import_state_dict, missing, _dl_meta())
    assert "missing.pth" in msg and "layer2.0.conv2.weight" in msg

    shape = tmp_path / "shape.pth"
    torch.save({**sd, "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, shape)
    msg = _raise(import_state_dict, shape, _dl_meta())
    assert "shape mismatch" in msg and "layer1.0.conv1.weight" in msg

    classes = tmp_path / "classes.pth"
    torch.save({k: (v[:4] if k.startswith(("layer5", "layer6")) else v) for k, v in sd.items()}, classes)
    msg = _raise(import_state_dict, classes, _dl_meta())
    assert "class count" in msg and "4" in msg

    unet = tmp_path / "unet.pth"
    torch.save(_unet().state_dict(), unet)
    assert "no weight" in _raise(import_state_dict, unet, _dl_meta(), strict=False)

    assert "unknown architecture" in _raise(import_state_dict, missing, _meta(arch="vgg"))
    notdict = tmp_path / "list.pth"
    torch.save([1, 2, 3], notdict)
    assert "state dict" in _raise(import_state_dict, notdict, _dl_meta())


def test_import_non_strict_skips_foreign_head(tmp_path, deeplab):
    model, _ = deeplab
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layer6")}
    sd.update({f"layer5.conv2d_list.{i}.weight": torch.zeros(21, 1024, 3, 3) for i in range(4)})
    raw = tmp_path / "imagenet.pth"
    torch.save(sd, raw)
    with pytest.raises(CheckpointError):
        import_state_dict(raw, _dl_meta())
    with pytest.warns(UserWarning, match="layer5.conv2d_list"):
        imported = import_state_dict(raw, _dl_meta(), strict=False)
    own = imported.state_dict()
    assert torch.equal(own["layer4.0.conv2.weight"], model.state_dict()["layer4.0.conv2.weight"])
    assert own["layer5.conv2d_list.0.weight"].shape == (5, 1024, 3, 3)


def test_weights_with_nan_or_inf_are_refused(tmp_path: Path) -> None:
    """A diverged training run saves NaN weights; loading such a file must say so instead of giving
    all-background masks."""
    model = _unet()
    meta = _meta(arch_args=dict(model.arch_args))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pt", model, meta)
    with pytest.raises(CheckpointError, match="NaN or infinite") as exc:
        load_checkpoint(path)
    assert "\n" not in str(exc.value) and "nan.pt" in str(exc.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"input_size": (81, 81)}, "not a multiple of unet-dual's stride 16"),
        ({"spacing": (1e-6, 1e-6)}, "spacing must be two values in 0.01..100"),
        ({"spacing": (500.0, 2.0)}, "spacing must be two values in 0.01..100"),
        ({"normalization": {"kind": "percentile", "lower": 50, "upper": 10}}, "normalization is invalid"),
        ({"normalization": {"kind": "minmax"}}, "normalization is invalid"),
    ],
)
def test_metadata_the_model_cannot_use_is_refused_at_load(tmp_path: Path, changes: dict, words: str) -> None:
    """An input size off the network's stride or an absurd spacing made predict crash with a traceback
    (or try to allocate exabytes), and a broken normalisation failed only once used: all are refused
    when the checkpoint is loaded."""
    model = _unet()
    meta80 = _meta(arch_args=dict(model.arch_args), input_size=(80, 80))
    path = save_checkpoint(tmp_path / "odd.pt", model, meta80)
    obj = torch.load(path, weights_only=True)
    meta = json.loads(obj["meta_json"])
    meta.update({k: v if isinstance(v, dict) else list(v) for k, v in changes.items()})
    obj["meta_json"] = json.dumps(meta)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=words.replace(".", r"\.")) as exc:
        load_checkpoint(path)
    assert "odd.pt" in str(exc.value)


def test_predict_and_refine_want_the_five_organ_labels(tmp_path: Path) -> None:
    model = build_model("unet-dual", base=4, num_classes=7)
    meta = _meta(arch_args=dict(model.arch_args), class_names=[f"c{i}" for i in range(7)])
    path = save_checkpoint(tmp_path / "seven.pt", model, meta)
    assert load_checkpoint(path)[1].num_classes == 7  # a valid checkpoint in itself
    scheme = "0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen"
    with pytest.raises(CheckpointError, match=scheme):
        load_checkpoint(path, num_classes=len(CLASS_NAMES))


def test_a_full_disk_while_saving_is_the_one_line_disk_full_error(tmp_path: Path, monkeypatch) -> None:
    """Saving straight to a file, torch reports a full disk as "RuntimeError: unexpected pos ..."; the
    checkpoint is serialised in memory and written as bytes, so the write fails with its errno and the
    user reads the same line as for a NIfTI file. Nothing is left behind."""
    import errno

    class FullDisk:
        def __init__(self, path, mode):
            self.path = Path(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "open", FullDisk, raising=False)
    out = tmp_path / "m.pt"
    with pytest.raises(ck.APLError, match=r"^disk full while writing .*m\.pt: free space and try again$"):
        save_checkpoint(out, _unet(), _meta())
    assert list(tmp_path.iterdir()) == []


def test_the_class_order_must_be_napari_apls_labels(tmp_path: Path) -> None:
    """Masks are written by channel index: a model whose channel 1 is the spleen would write its spleen
    as label 1, which napari-apl (and every reader of its masks) takes for the liver."""
    model = _unet()
    spelled = save_checkpoint(
        tmp_path / "spelled.pt",
        model,
        _meta(class_names=["Background", "Liver", "Right_Kidney", "left-kidney", "SPLEEN"]),
    )
    _, meta = ck.load_checkpoint(spelled, class_names=CLASS_NAMES)  # the same classes, spelled otherwise
    assert meta.class_names[2] == "Right_Kidney"
    swapped = save_checkpoint(
        tmp_path / "swapped.pt",
        model,
        _meta(class_names=["background", "spleen", "liver", "right kidney", "left kidney"]),
    )
    other = save_checkpoint(tmp_path / "other.pt", model, _meta(class_names=["bg", "a", "b", "c", "d"]))
    for path, words in ((swapped, "in another order than"), (other, "not")):
        with pytest.raises(CheckpointError) as err:
            ck.load_checkpoint(path, class_names=CLASS_NAMES)
        text = str(err.value)
        assert (
            "\n" not in text and f"{words} napari-apl's labels (0 background, 1 liver, 2 right kidney" in text
        )
        assert ck.load_checkpoint(path)[1].class_names[1] in ("spleen", "a")  # (read as is when not asked)


@pytest.mark.parametrize("make", [_unet, _deeplab], ids=["unet-dual", "deeplabv2"])
def test_reordering_the_classes_permutes_both_heads_logits(make) -> None:
    """``reorder_classes`` moves every tensor on the logits' class axis (the four summed ASPP branches
    of deeplabv2 included): both heads' logits come out permuted, nothing else changes."""
    model = make()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before = model(x)
        order = [0, 4, 1, 3, 2]
        ck.reorder_classes(model, order)
        after = model(x)
    for new, old in zip(after, before, strict=True):
        torch.testing.assert_close(new, old[:, order])
    with pytest.raises(ValueError, match="permutation"):
        ck.reorder_classes(model, [0, 0, 1, 2, 3])
    assert ck.scheme_order(["Background", "spleen", "liver", "right kidney", "left_kidney"], CLASS_NAMES) == [
        0,
        2,
        3,
        4,
        1,
    ]
    assert ck.scheme_order(["bg", "a", "b", "c", "d"], CLASS_NAMES) is None
