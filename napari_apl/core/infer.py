"""Streaming prediction of a whole volume with a dual-head model, slice batch by slice batch."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import pseudo
from .checkpoint import CheckpointMeta
from .models import DualHeadNet
from .preprocess import FittedNormalization, Normalization
from .utils import resolve_device, run_generator
from .volume import SliceGrid, Volume


@dataclass
class Prediction:
    """Per-voxel outputs of both heads on the volume's canonical grid ``(X, Y, Z)``."""

    main: np.ndarray
    aux: np.ndarray
    pseudo: np.ndarray
    confidence: np.ndarray
    consistency: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """Return the five maps by their output names."""
        return {
            "main": self.main,
            "aux": self.aux,
            "pseudo_label": self.pseudo,
            "confidence": self.confidence,
            "consistency": self.consistency,
        }


@dataclass
class PreparedVolume:
    """A volume's axial slices normalised and resampled onto the model grid, ready for the network."""

    volume: Volume
    grid: SliceGrid
    fitted: FittedNormalization

    def batch(self, indices: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """Return slices ``indices`` as a float32 tensor ``(n, 1, H, W)`` on the model grid."""
        idx = list(indices)
        data = self.volume.data
        raw = data[:, :, idx]
        if not isinstance(raw, np.ndarray):  # dask: compute just these slices
            raw = raw.compute()
        arr = np.ascontiguousarray(np.moveaxis(np.asarray(raw), 2, 0))
        if not np.all(np.isfinite(arr)):
            from .errors import VolumeError

            raise VolumeError(f"slices {idx[0]}..{idx[-1]} contain NaN or Inf voxels: clean the volume first")
        norm = self.fitted(arr).astype(np.float32, copy=False)
        t = torch.from_numpy(norm).unsqueeze(1)
        pad = float(norm.min()) if norm.size else 0.0
        out = self.grid.forward(t, mode="bilinear", pad_value=pad)
        return out.to(device) if device is not None else out


def prepare(
    volume: Volume, meta: CheckpointMeta, model: DualHeadNet, normalization: Normalization | None = None
) -> PreparedVolume:
    """Fit the intensity normalisation and the in-plane geometry of ``volume`` for ``model``."""
    norm = normalization if normalization is not None else Normalization.from_dict(meta.normalization)
    fitted = norm.fit(volume.data)
    grid = SliceGrid.for_volume(
        volume, spacing=tuple(meta.spacing), size=tuple(meta.input_size), stride=model.stride
    )
    return PreparedVolume(volume=volume, grid=grid, fitted=fitted)


def heads_probabilities(
    model: DualHeadNet, x: torch.Tensor, grid: SliceGrid | None = None, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both heads on a model-grid batch; return their softmax probabilities (mapped back by ``grid``)."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        main, aux = model(x)
    main, aux = main.float(), aux.float()
    if grid is not None:
        main = grid.inverse(main, mode="bilinear")
        aux = grid.inverse(aux, mode="bilinear")
    return torch.softmax(main, dim=1), torch.softmax(aux, dim=1)


def iter_predict(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    *,
    normalization: Normalization | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    slices: Sequence[int] | None = None,
    amp: bool | None = None,
    prepared: PreparedVolume | None = None,
) -> Generator[tuple[int, int], None, Prediction]:
    """Predict every axial slice (or only ``slices``) of ``volume``, yielding ``(done, total)`` as it goes.

    Labels come back as uint8 and the maps as float16, on the canonical voxel grid, so a
    512 x 512 x 300 CT never holds a float probability volume for either head.
    """
    dev = resolve_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    prep = prepared if prepared is not None else prepare(volume, meta, model, normalization)
    shape = tuple(volume.data.shape)
    out = Prediction(
        main=np.zeros(shape, np.uint8),
        aux=np.zeros(shape, np.uint8),
        pseudo=np.zeros(shape, np.uint8),
        confidence=np.zeros(shape, np.float16),
        consistency=np.zeros(shape, np.float16),
    )
    order = list(range(shape[2])) if slices is None else [int(k) for k in slices]
    total = len(order)
    was_training = model.training
    model.eval()
    model.to(dev)
    try:
        yield 0, total
        done = 0
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                idx = order[start : start + batch_size]
                x = prep.batch(idx, dev)
                p_m, p_a = heads_probabilities(model, x, prep.grid, use_amp)
                merged = pseudo.merge(p_m, p_a)
                maps = {
                    "main": p_m.argmax(1).to(torch.uint8),
                    "aux": p_a.argmax(1).to(torch.uint8),
                    "pseudo": merged.argmax(1).to(torch.uint8),
                    "confidence": pseudo.confidence(merged).to(torch.float16),
                    "consistency": pseudo.consistency_map(p_m, p_a).to(torch.float16),
                }
                for name, t in maps.items():
                    getattr(out, name)[:, :, idx] = np.moveaxis(t.cpu().numpy(), 0, 2)
                done += len(idx)
                yield done, total
    finally:
        model.train(was_training)
    return out


def predict_volume(model: DualHeadNet, meta: CheckpointMeta, volume: Volume, **kwargs) -> Prediction:
    """Predict a whole volume at once (``iter_predict`` driven to its end)."""
    return run_generator(iter_predict(model, meta, volume, **kwargs))
