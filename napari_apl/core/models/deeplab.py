"""``deeplabv2``: the paper's DeepLabv2 / ResNet-101 with two ASPP classifiers.

The module layout and parameter names follow the DeepLabv2 used by AdaptSegNet and ADVENT, so
their checkpoints (and the ImageNet-initialised DeepLab weights they start from) load by name:
``conv1``, ``bn1``, ``layer1`` .. ``layer4`` (the encoder; layer3 and layer4 are dilated, output
stride 8), ``layer5`` (auxiliary ASPP on layer3) and ``layer6`` (main ASPP on layer4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DualHeadNet

ASPP_RATES: tuple[int, ...] = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """A Caffe-style ResNet bottleneck: the stride sits on the first 1x1 convolution."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ClassifierModule(nn.Module):
    """ASPP classifier: the sum of four dilated 3x3 convolutions (rates 6, 12, 18, 24).

    ``branches`` < 4 sums only the first ones (all four are kept, so the state dict is the same):
    AdaptSegNet's released classifier returns inside its loop, after branches 0 and 1, so its trained
    models were trained, and must be run, with two.
    """

    def __init__(
        self, inplanes: int, num_classes: int, rates: Sequence[int] = ASPP_RATES, branches: int = 4
    ) -> None:
        super().__init__()
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, stride=1, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the summed logits of the branches in use."""
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1 : self.branches]:
            out = out + conv(x)
        return out


class DeepLabV2(DualHeadNet):
    """DeepLabv2 on a dilated ResNet (ResNet-101 by default) with main and auxiliary ASPP heads.

    A grey input (``in_channels=1``) is repeated to three channels inside ``features`` so that
    ImageNet / ADVENT weights for ``conv1`` fit unchanged.
    """

    arch = "deeplabv2"
    stride = 8
    classifier_modules = ("layer5", "layer6")
    main_head_key = "layer6.conv2d_list.0.weight"
    logit_prefixes = ("layer5.conv2d_list.", "layer6.conv2d_list.")  # four summed branches per head

    def __init__(
        self,
        num_classes: int = 5,
        layers: Sequence[int] = (3, 4, 23, 3),
        in_channels: int = 1,
        aspp_branches: int = 4,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        if isinstance(aspp_branches, bool) or aspp_branches not in (1, 2, 3, 4):
            raise ValueError(
                f"aspp_branches must be 1 to 4 (ADVENT: 4, AdaptSegNet: 2), got {aspp_branches!r}"
            )
        if aspp_branches != 4:  # (recorded only when it differs: earlier checkpoints stay as they were)
            self.arch_args["aspp_branches"] = int(aspp_branches)
        if in_channels not in (1, 3):
            raise ValueError(f"deeplabv2 takes in_channels 1 (grey, repeated) or 3, got {in_channels!r}")
        if (
            isinstance(layers, (str, bytes))
            or not isinstance(layers, Sequence)
            or len(layers) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers)
        ):
            raise ValueError(f"layers must be four integers >= 1 (ResNet-101: 3, 4, 23, 3), got {layers!r}")
        self.arch_args["layers"] = [int(n) for n in layers]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.layer5 = ClassifierModule(1024, num_classes, branches=aspp_branches)
        self.layer6 = ClassifierModule(2048, num_classes, branches=aspp_branches)
        for name, m in self.named_modules():
            if name.startswith(self.classifier_modules):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """The stem's and every bottleneck's ``convK``/``bnK``, and the downsampling branches' pairs."""
        pairs = super().conv_bn_pairs()  # the downsample Sequentials
        pairs.append(("conv1", "bn1"))
        for name, mod in self.named_modules():
            if isinstance(mod, Bottleneck):
                pairs += [(f"{name}.conv{k}", f"{name}.bn{k}") for k in (1, 2, 3)]
        return pairs

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        """Build one ResNet stage; the first block gets a projection shortcut when needed."""
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out or dilation in (2, 4):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        mods = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = out
        mods += [Bottleneck(out, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return ``(layer3, layer4)`` features (1024 and 2048 channels, output stride 8)."""
        self._check_input(x, multiple=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        f3 = self.layer3(x)
        f4 = self.layer4(f3)
        return f3, f4

    def heads(
        self, feats: tuple[torch.Tensor, ...], out_hw: tuple[int, int] | torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(main, aux)`` = (layer6(layer4), layer5(layer3)) upsampled to ``out_hw``."""
        f3, f4 = feats
        size = (int(out_hw[0]), int(out_hw[1]))
        main = F.interpolate(self.layer6(f4), size=size, mode="bilinear", align_corners=True)
        aux = F.interpolate(self.layer5(f3), size=size, mode="bilinear", align_corners=True)
        return main, aux
