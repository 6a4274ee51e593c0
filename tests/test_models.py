"""Tests of the dual-head networks and their registry."""

from __future__ import annotations

import json

import pytest
import torch

from napari_apl.core.errors import CheckpointError
from napari_apl.core.labels import CLASS_NAMES
from napari_apl.core.models import ARCHITECTURES, DualHeadNet, build_model
from napari_apl.core.models.deeplab import DeepLabV2

SMALL_LAYERS = (1, 1, 1, 1)


def _model(arch: str, **kw) -> DualHeadNet:
    torch.manual_seed(0)
    if arch == "deeplabv2":
        kw.setdefault("layers", SMALL_LAYERS)
    return build_model(arch, **kw).eval()


def _input(arch: str, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    hw = (64, 96) if arch == "unet-dual" else (64, 64)
    return torch.rand(n, 1, *hw, generator=g)


def advent_keys(
    layers: tuple[int, ...], num_classes_layers: tuple[str, ...] = ("layer5", "layer6")
) -> set[str]:
    """The state-dict keys of ADVENT's DeepLabv2, written out from its description."""

    def bn(prefix: str) -> list[str]:
        return [
            f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]

    keys = ["conv1.weight", *bn("bn1")]
    for li, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0:  # every stage's first block projects (channels change or dilation 2/4)
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    for head in ("layer5", "layer6"):
        for i in range(4):
            keys += [f"{head}.conv2d_list.{i}.weight", f"{head}.conv2d_list.{i}.bias"]
    return set(keys)


# -- registry -------------------------------------------------------------------------------------
def test_registry_names():
    assert set(ARCHITECTURES) == {"unet-dual", "deeplabv2"}
    for name, cls in ARCHITECTURES.items():
        assert issubclass(cls, DualHeadNet)
        assert cls.arch == name


def test_unknown_architecture_message():
    with pytest.raises(CheckpointError) as exc:
        build_model("resnet9000")
    msg = str(exc.value)
    assert msg == "unknown architecture 'resnet9000': choose one of unet-dual, deeplabv2"


@pytest.mark.parametrize(
    ("arch", "kwargs", "needle"),
    [
        ("unet-dual", {"width": 3}, "width"),
        ("unet-dual", {"base": 0}, "base"),
        ("unet-dual", {"dropout": 1.5}, "dropout"),
        ("unet-dual", {"num_classes": 1}, "num_classes"),
        ("deeplabv2", {"layers": (1, 2)}, "layers"),
        ("deeplabv2", {"in_channels": 2}, "in_channels"),
    ],
)
def test_bad_arguments_raise_one_line(arch, kwargs, needle):
    with pytest.raises(CheckpointError) as exc:
        build_model(arch, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    assert arch in msg and needle in msg


@pytest.mark.parametrize("arch", ["unet-dual", "deeplabv2"])
def test_arch_args_rebuild_same_network(arch):
    model = _model(arch, num_classes=4)
    args = json.loads(json.dumps(model.arch_args))  # survives the checkpoint's JSON metadata
    assert args["num_classes"] == 4 and args["in_channels"] == 1
    again = build_model(arch, **args)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert again.arch_args == model.arch_args


# -- unet-dual ------------------------------------------------------------------------------------
def test_unet_default_size_and_stride():
    model = build_model("unet-dual")
    total = sum(p.numel() for p in model.parameters())
    assert 100_000 < total <= 2_000_000
    assert model.stride == 16
    assert model.num_classes == len(CLASS_NAMES) == 5
    assert model.parameter_counts()["total"] == total


@pytest.mark.parametrize("arch", ["unet-dual", "deeplabv2"])
def test_forward_shapes_and_heads_equivalence(arch):
    model = _model(arch)
    x = _input(arch)
    with torch.no_grad():
        main, aux = model(x)
        feats = model.features(x)
        main2, aux2 = model.heads(feats, x.shape[-2:])
    assert main.shape == aux.shape == (2, 5, *x.shape[-2:])
    assert isinstance(feats, tuple) and all(isinstance(f, torch.Tensor) for f in feats)
    assert torch.equal(main, main2) and torch.equal(aux, aux2)
    assert not torch.equal(main, aux)  # two different heads
    assert torch.isfinite(main).all() and torch.isfinite(aux).all()


def test_unet_heads_read_different_resolutions():
    model = _model("unet-dual")
    x = _input("unet-dual")
    with torch.no_grad():
        full, half = model.features(x)
    assert full.shape[-2:] == x.shape[-2:]
    assert half.shape[-2:] == (x.shape[-2] // 2, x.shape[-1] // 2)
    assert full.shape[1] == 16 and half.shape[1] == 32


def test_unet_other_class_count_and_base():
    model = _model("unet-dual", num_classes=3, base=8)
    main, aux = model(_input("unet-dual", n=1))
    assert main.shape == aux.shape == (1, 3, 64, 96)


def test_unet_rejects_bad_input():
    model = _model("unet-dual")
    with pytest.raises(ValueError, match="stride 16"):
        model(torch.zeros(1, 1, 40, 64))
    with pytest.raises(ValueError, match="N, 1, H, W"):
        model(torch.zeros(1, 3, 64, 64))


def test_unet_dropout_only_in_training():
    model = _model("unet-dual", dropout=0.5)
    x = _input("unet-dual", n=1)
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("arch", ["unet-dual", "deeplabv2"])
def test_parameter_groups_disjoint_and_complete(arch):
    model = _model(arch)
    enc = dict(model.encoder_named_parameters())
    cls = dict(model.classifier_named_parameters())
    assert enc and cls
    assert not set(enc) & set(cls)
    assert set(enc) | set(cls) == {n for n, _ in model.named_parameters()}
    ids_enc = {id(p) for p in model.encoder_parameters()}
    ids_cls = {id(p) for p in model.classifier_parameters()}
    assert not ids_enc & ids_cls
    assert ids_enc | ids_cls == {id(p) for p in model.parameters()}
    assert all(n.split(".")[0] in model.classifier_modules for n in cls)
    counts = model.parameter_counts()
    assert counts["encoder"] == sum(p.numel() for p in enc.values())
    assert counts["classifiers"] == sum(p.numel() for p in cls.values())
    assert len(model.classifier_heads()) == 2


@pytest.mark.parametrize("arch", ["unet-dual", "deeplabv2"])
def test_detached_features_leave_encoder_without_grads(arch):
    model = _model(arch).train()
    x = _input(arch)
    feats = tuple(f.detach() for f in model.features(x))
    main, aux = model.heads(feats, x.shape[-2:])
    (main.logsumexp(1).mean() + aux.logsumexp(1).mean()).backward()
    assert all(p.grad is None for p in model.encoder_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier_parameters())

    model.zero_grad(set_to_none=True)
    main, aux = model(x)
    (main.logsumexp(1).mean() + aux.logsumexp(1).mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters())


# -- deeplabv2 ------------------------------------------------------------------------------------
def test_deeplab_state_dict_keys_match_advent_exactly():
    model = _model("deeplabv2", layers=(2, 1, 3, 1))
    assert set(model.state_dict()) == advent_keys((2, 1, 3, 1))


def test_deeplab_resnet101_keys_and_shapes():
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build_model("deeplabv2")
    sd = model.state_dict()
    assert set(sd) == advent_keys((3, 4, 23, 3))
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.22.conv3.weight",
        "layer4.2.bn3.bias",
        "layer5.conv2d_list.0.weight",
        "layer6.conv2d_list.3.bias",
    ):
        assert key in sd, key
    assert "layer3.23.conv1.weight" not in sd
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer5.conv2d_list.0.weight"].shape == (5, 1024, 3, 3)
    assert sd["layer6.conv2d_list.3.weight"].shape == (5, 2048, 3, 3)
    assert sd["layer6.conv2d_list.3.bias"].shape == (5,)
    encoder = model.parameter_counts()["encoder"]
    assert 42_000_000 < encoder < 43_000_000  # ResNet-101 without its fc layer


def test_deeplab_layer_geometry():
    model = _model("deeplabv2")
    assert model.stride == 8
    assert model.maxpool.ceil_mode and model.maxpool.kernel_size == 3 and model.maxpool.stride == 2
    assert model.conv1.bias is None and model.conv1.stride == (2, 2)
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    assert model.layer3[0].conv1.stride == (1, 1) and model.layer4[0].conv1.stride == (1, 1)
    assert model.layer3[0].conv2.dilation == (2, 2) and model.layer3[0].conv2.padding == (2, 2)
    assert model.layer4[0].conv2.dilation == (4, 4) and model.layer4[0].conv2.padding == (4, 4)
    for head in (model.layer5, model.layer6):
        assert [c.dilation[0] for c in head.conv2d_list] == [6, 12, 18, 24]
        assert [c.padding[0] for c in head.conv2d_list] == [6, 12, 18, 24]
        assert all(c.bias is not None for c in head.conv2d_list)
    with torch.no_grad():
        f3, f4 = model.features(_input("deeplabv2"))
    assert f3.shape[1] == 1024 and f4.shape[1] == 2048
    assert f3.shape[-2:] == f4.shape[-2:] == (9, 9)  # 64 / 8 with Caffe's ceil-mode pooling


def test_deeplab_grey_input_is_repeated_to_rgb():
    grey = _model("deeplabv2")
    rgb = DeepLabV2(layers=SMALL_LAYERS, in_channels=3).eval()
    rgb.load_state_dict(grey.state_dict())
    x = _input("deeplabv2")
    with torch.no_grad():
        a = grey(x)
        b = rgb(x.repeat(1, 3, 1, 1))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def _random_batch_norm_stats(model: DualHeadNet) -> None:
    """Give every batch norm non-trivial statistics and affine weights (fresh ones fold to identity)."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(n, generator=g) - 0.2)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folded_copy_computes_the_eval_forward_and_follows_new_weights(arch):
    """Every batch norm is folded; the copy matches the eval forward before and after a refresh."""
    from napari_apl.core.models.fold import FoldedNet

    model = _model(arch)
    _random_batch_norm_stats(model)
    folded = FoldedNet(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(folded.pairs) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _input(arch)

    def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
        return all(torch.allclose(u, v, rtol=1e-4, atol=1e-5 * float(u.abs().max())) for u, v in zip(a, b))

    with torch.no_grad():
        assert close(model(x), folded(x))
        # the original changes (as the EMA teacher does each iteration): a refresh follows it
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
        _random_batch_norm_stats(model)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(2.0)
        stale = folded(x)
        folded.refresh(model.state_dict())
        assert close(model(x), folded(x))
        assert not close(model(x), stale)
    # the original is untouched by folding: its batch norms and bias-free convolutions are still there
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert not folded.training and model.training is False


def test_only_batch_norms_that_read_a_convolution_alone_are_folded():
    """A batch norm without running statistics or after a non-convolution stays a layer."""
    from napari_apl.core.models.fold import FoldedNet, foldable_pairs

    model = _model("unet-dual", base=4)
    model.inc[1] = torch.nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics even in eval
    pairs = foldable_pairs(model)
    assert ("inc.0", "inc.1") not in pairs and ("inc.3", "inc.4") in pairs
    assert len(pairs) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) - 1
    folded = FoldedNet(model)
    assert isinstance(folded.net.inc[1], torch.nn.BatchNorm2d)
    x = _input("unet-dual")
    with torch.no_grad():
        for a, b in zip(model.eval()(x), folded(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
