"""``unet-dual``: a light 2-D U-Net with two classifier heads, small enough to train on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DualHeadNet


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    """Return a 3x3 convolution, batch norm and ReLU as a list of modules."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU) blocks."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class Up(nn.Module):
    """Bilinear x2 upsampling, a 1x1 channel reduction, concatenation with the skip, DoubleConv."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1, bias=False)
        self.conv = DoubleConv(2 * cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` to the size of ``skip``, merge them and convolve."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, self.reduce(x)], dim=1))


class Head(nn.Sequential):
    """A small classifier: 3x3 conv, BatchNorm, ReLU, 1x1 conv to class logits."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__(*_conv_bn_relu(cin, cin), nn.Conv2d(cin, num_classes, 1))


class UNetDual(DualHeadNet):
    """A 4-level 2-D U-Net trunk (the encoder E) with a full- and a half-resolution classifier.

    ``D_m`` reads the final full-resolution decoder features; ``D_a`` reads the decoder features
    one level coarser and is upsampled bilinearly, so the two heads see different features.
    """

    arch = "unet-dual"
    stride = 16
    classifier_modules = ("head_main", "head_aux")
    main_head_key = "head_main.3.weight"
    logit_prefixes = ("head_main.3.", "head_aux.3.")

    def __init__(
        self, in_channels: int = 1, num_classes: int = 5, base: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        if not isinstance(base, int) or isinstance(base, bool) or base < 1:
            raise ValueError(f"base must be an integer >= 1, got {base!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.arch_args.update({"base": base, "dropout": float(dropout)})
        c = [base * 2**i for i in range(5)]
        self.inc = DoubleConv(in_channels, c[0])
        self.down1 = DoubleConv(c[0], c[1])
        self.down2 = DoubleConv(c[1], c[2])
        self.down3 = DoubleConv(c[2], c[3])
        self.down4 = DoubleConv(c[3], c[4])
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up4 = Up(c[4], c[3], c[3])
        self.up3 = Up(c[3], c[2], c[2])
        self.up2 = Up(c[2], c[1], c[1])
        self.up1 = Up(c[1], c[0], c[0])
        self.head_main = Head(c[0], num_classes)
        self.head_aux = Head(c[1], num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return ``(full_res_decoder, half_res_decoder)`` features."""
        self._check_input(x)
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool2d(x1, 2))
        x3 = self.down2(F.max_pool2d(x2, 2))
        x4 = self.down3(F.max_pool2d(x3, 2))
        x5 = self.drop(self.down4(F.max_pool2d(x4, 2)))
        d4 = self.up4(x5, x4)
        d3 = self.up3(d4, x3)
        d2 = self.up2(d3, x2)
        d1 = self.up1(d2, x1)
        return d1, d2

    def heads(
        self, feats: tuple[torch.Tensor, ...], out_hw: tuple[int, int] | torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(main, aux)`` logits at ``out_hw`` from ``(full_res, half_res)`` features."""
        full, half = feats
        size = (int(out_hw[0]), int(out_hw[1]))
        main = self.head_main(full)
        if tuple(main.shape[-2:]) != size:
            main = F.interpolate(main, size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.head_aux(half), size=size, mode="bilinear", align_corners=False)
        return main, aux
