"""Tiny volumes and checkpoints shared by the reliability tests (small enough for 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import torch
from torch import nn

from napari_apl.core.checkpoint import CheckpointMeta, save_checkpoint
from napari_apl.core.models import DualHeadNet, build_model
from napari_apl.core.phantom import make_phantom
from napari_apl.core.volume import Volume, volume_from_array


def write_ct_phantom(path: Path, seed: int, shape: tuple[int, int, int], spacing: tuple[float, ...]) -> Path:
    """Write a CT phantom as NIfTI and return its path."""
    image, _, affine = make_phantom("ct", seed, shape=shape, spacing=spacing)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


CT_WINDOW = {"kind": "ct_window", "level": 40.0, "width": 400.0}


def write_tiny_checkpoint(
    path: Path,
    seed: int = 0,
    *,
    base: int = 4,
    input_size: tuple[int, int] = (16, 16),
    spacing: tuple[float, float] = (15.0, 15.0),
    normalization: dict | None = None,
) -> Path:
    """Write an untrained unet-dual checkpoint (default: base 4 on a 16 x 16 model grid at 15 mm)."""
    torch.manual_seed(seed)
    model = build_model("unet-dual", base=base)
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=input_size,
        spacing=spacing,
        normalization=dict(normalization or CT_WINDOW),
        provenance={"note": "untrained test model"},
    )
    save_checkpoint(path, model, meta)
    return path


def tiny_ct_case(base: int = 8) -> tuple[DualHeadNet, CheckpointMeta, Volume]:
    """An in-memory 48 x 48 x 8 CT phantom and an untrained (seeded) unet-dual with its metadata."""
    image, _labels, affine = make_phantom("ct", seed=3, shape=(48, 48, 8), spacing=(5.0, 5.0, 8.0))
    torch.manual_seed(0)
    model = build_model("unet-dual", num_classes=5, base=base)
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args={"num_classes": 5, "base": base},
        input_size=(48, 48),
        spacing=(5.0, 5.0),
        normalization=dict(CT_WINDOW),
    )
    return model, meta, volume_from_array(image, affine)


class BandNet(DualHeadNet):
    """A tiny dual-head net whose classes are intensity bands: many label boundaries, known probabilities.

    The auxiliary head's bands are the main head's shifted by ``aux_shift``, or, with ``aux_reversed``,
    in the opposite order (the two heads then disagree almost everywhere).
    """

    arch = "band"
    stride = 16
    classifier_modules = ("head_main", "head_aux")

    def __init__(self, aux_shift: float = 0.04, aux_reversed: bool = False) -> None:
        super().__init__(num_classes=5, in_channels=1)
        self.head_main = nn.Conv2d(2, 5, 1)
        self.head_aux = nn.Conv2d(2, 5, 1)
        centres = torch.tensor([0.0, 0.3, 0.45, 0.6, 0.8])
        aux = centres.flip(0) if aux_reversed else centres + aux_shift
        with torch.no_grad():
            for head, c in ((self.head_main, centres), (self.head_aux, aux)):
                # logit_c = -40 (x - c)^2 = -40 x^2 + 80 c x - 40 c^2
                head.weight.copy_(torch.stack([80 * c, torch.full_like(c, -40.0)], 1).view(5, 2, 1, 1))
                head.bias.copy_(-40 * c**2)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Intensity and its square."""
        return (torch.cat([x, x * x], 1),)

    def heads(self, feats: tuple[torch.Tensor, ...], out_hw: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits."""
        return self.head_main(feats[0]), self.head_aux(feats[0])
