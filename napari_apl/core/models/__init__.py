"""Dual-head segmentation networks and their registry."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .base import DualHeadNet
from .deeplab import DeepLabV2
from .unet import UNetDual

ARCHITECTURES: dict[str, type[DualHeadNet]] = {
    "unet-dual": UNetDual,
    "deeplabv2": DeepLabV2,
}

__all__ = ["ARCHITECTURES", "DeepLabV2", "DualHeadNet", "UNetDual", "build_model", "get_architecture"]


def get_architecture(arch: str) -> type[DualHeadNet]:
    """Return the network class registered as ``arch`` or raise a one-line CheckpointError."""
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}"
        ) from None


def build_model(arch: str, num_classes: int = 5, in_channels: int = 1, **arch_args: Any) -> DualHeadNet:
    """Build the network registered as ``arch``; bad names or arguments raise CheckpointError."""
    cls = get_architecture(arch)
    try:
        return cls(num_classes=num_classes, in_channels=in_channels, **arch_args)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad arguments for architecture {arch!r}: {exc}") from None
