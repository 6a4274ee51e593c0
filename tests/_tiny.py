"""Tiny volumes and checkpoints shared by the reliability tests (small enough for 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import torch

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
