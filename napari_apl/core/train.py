"""Source-model training: a dual-head network on labelled source volumes with domain-randomising augmentation.

The augmentations aim at a model that transfers to an unseen modality without target data:
random non-monotonic intensity remapping, GIN-style random shallow convolutions, gamma, noise,
blur and a smooth bias field, plus rotations, scaling and shifts that never flip left and right
(the kidneys are side-specific classes). Both heads are supervised (cross-entropy + soft Dice).
"""

from __future__ import annotations

import glob
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (
    FORMAT_VERSION,
    MAX_INPUT_SIZE,
    MAX_SPACING_MM,
    MIN_INPUT_SIZE,
    MIN_SPACING_MM,
    CheckpointMeta,
    save_checkpoint,
    torch_save_file,
)
from .errors import APLError, CheckpointError
from .io_utils import atomic_write
from .labels import CLASS_NAMES
from .memory import retained_heap
from .models import DualHeadNet, build_model
from .preprocess import Normalization, get_preset
from .utils import resolve_device, seed_everything
from .volume import MAX_GRID_PX, GridTooLargeError, SliceGrid, Volume, load_volume


@dataclass
class TrainConfig:
    """Settings of a source-training run."""

    arch: str = "unet-dual"
    arch_args: dict = field(default_factory=dict)
    epochs: int = 45
    batch_size: int = 16
    lr: float = 1e-3
    spacing: tuple[float, float] = (2.5, 2.5)
    input_size: tuple[int, int] = (160, 160)
    normalization: str = "mri"
    seed: int = 0
    device: str = "auto"
    aux_weight: float = 0.5
    augment: bool = True
    gin_prob: float = 0.5
    remap_prob: float = 0.4
    iters_per_epoch: int | None = None
    """Batches per epoch; ``None`` = one pass over the slices."""
    channels_last: bool = False
    """Train with channels-last weights and batches: faster convolutions with oneDNN / cuDNN, but the
    float sums run in another order, so the weights differ from a contiguous run's."""
    amp: bool = False
    """Forward and backward under bf16 autocast (weights, optimiser and losses stay float32): ~1.5-2x
    faster where bf16 is native (CUDA, CPUs with AVX512-BF16 / AMX), slower where it is emulated."""

    def validate(self) -> TrainConfig:
        """Check the settings and raise a one-line ``APLError`` naming a bad one."""
        if not _is_count(self.epochs) or self.epochs < 1:
            raise APLError(f"epochs must be 1 or more, got {self.epochs}")
        if not _is_count(self.batch_size) or self.batch_size < 1:
            raise APLError(f"batch size must be 1 or more, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise APLError(f"learning rate must be a positive number, got {self.lr}")
        if not _is_count(self.seed) or not 0 <= self.seed < 2**64:
            raise APLError(f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed!r}")
        if len(self.spacing) != 2 or not all(
            MIN_SPACING_MM <= v <= MAX_SPACING_MM and math.isfinite(v) for v in self.spacing
        ):
            raise APLError(
                f"spacing must be two sizes in {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm, "
                f"got {tuple(self.spacing)}"
            )
        if len(self.input_size) != 2 or not all(
            MIN_INPUT_SIZE <= int(v) <= MAX_INPUT_SIZE for v in self.input_size
        ):
            raise APLError(
                f"input size must be two sizes in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} px, "
                f"got {tuple(self.input_size)}"
            )
        if self.iters_per_epoch is not None and (
            not _is_count(self.iters_per_epoch) or self.iters_per_epoch < 1
        ):
            raise APLError(f"iterations per epoch must be 1 or more, got {self.iters_per_epoch}")
        if not self.aux_weight >= 0:
            raise APLError(f"aux_weight must be 0 or more, got {self.aux_weight}")
        if not (0 <= self.gin_prob <= 1 and 0 <= self.remap_prob <= 1):
            raise APLError("gin_prob and remap_prob are probabilities in [0, 1]")
        return self


def _is_count(value: Any) -> bool:
    """Whether ``value`` is a whole number given as an int (``True`` and ``2.5`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


# --- data ---------------------------------------------------------------------------------------------


def pair_files(
    images: str | Sequence[str], labels: str | Sequence[str], check_names: bool = True
) -> list[tuple[str, str]]:
    """Pair image and label files (globs or lists) after sorting them naturally.

    A glob may start with ``~``, and a file that exists is taken as named (``[1]`` in its name is not a
    pattern). With ``check_names`` and several pairs, the case numbers of each pair must agree: a case
    missing on one side would otherwise shift every later pair onto another case's labels (see
    ``_case_numbers`` for what counts as a case number).
    """

    def expand(spec: str | Sequence[str]) -> list[str]:
        if isinstance(spec, str):
            path = os.path.expanduser(spec)
            items = [path] if os.path.isfile(path) else glob.glob(path)
        else:
            items = [str(s) for s in spec]
        return sorted(items, key=_natural_key)

    imgs, labs = expand(images), expand(labels)
    if not imgs:
        raise APLError(f"no image files match {images!r}: check the --images glob")
    if len(imgs) != len(labs):
        raise APLError(f"{len(imgs)} images but {len(labs)} label files: the globs must pair one to one")
    if check_names and len(imgs) > 1:
        for im, lab, a, b in zip(imgs, labs, _case_numbers(imgs), _case_numbers(labs)):
            if a and b and not a & b:
                named = [f"{Path(f).parent.name}/{Path(f).name}" for f in (im, lab)]
                raise APLError(
                    f"{named[0]} would pair with {named[1]}, another case by their numbers: give the same "
                    "cases to --images and --labels (or --pair-by-order to pair them as sorted)"
                )
    return list(zip(imgs, labs))


def _case_numbers(paths: Sequence[str]) -> list[set[int]]:
    """Each file's case numbers: the numbers in its folder's and its own name that vary across ``paths``.

    A number every file has at the same place is not a case number: a dataset's year or name
    (FLARE22, BraTS2021), a sequence (T2w), nnU-Net's channel suffix (``_0000``). Where the files hold
    different counts of numbers, those present in every file are dropped instead.
    """
    import re

    from .batch import volume_name

    def numbers(path: str) -> list[int]:
        return [int(d) for d in re.findall(r"\d+", f"{Path(path).parent.name}/{volume_name(path)}")]

    lists = [numbers(p) for p in paths]
    if len({len(n) for n in lists}) == 1:
        varying = [k for k in range(len(lists[0])) if len({n[k] for n in lists}) > 1]
        return [{n[k] for k in varying} for n in lists]
    common = set.intersection(*(set(n) for n in lists))
    return [set(n) - common for n in lists]


def _natural_key(s: str) -> list:
    """Sort key treating digit runs as numbers (image_2 before image_10)."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@dataclass
class SliceSet:
    """Source slices on the model grid: images ``(N, 1, H, W)`` float32 and labels ``(N, H, W)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    volume_index: torch.Tensor


def volume_slices(
    image: Volume,
    labels: Volume | None,
    norm: Normalization,
    spacing: Sequence[float],
    size: Sequence[int],
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise and resample all axial slices of a volume (and its labels) onto the model grid."""
    data = np.asarray(image.data)
    fitted = norm.fit(data)
    grid = SliceGrid.for_volume(image, spacing=tuple(spacing), size=tuple(size), stride=stride)
    x = torch.from_numpy(np.moveaxis(fitted(data).astype(np.float32), 2, 0).copy()).unsqueeze(1)
    x = grid.forward(x, mode="bilinear", pad_value=fitted.pad)  # as predict pads
    y = None
    if labels is not None:
        lab = np.moveaxis(np.asarray(labels.data).round().astype(np.float32), 2, 0).copy()
        y = grid.forward(torch.from_numpy(lab).unsqueeze(1), mode="nearest", pad_value=0.0)[:, 0].long()
    return x, y


def _check_labels(labels: Volume, name: str) -> None:
    """Refuse a label volume whose values are not the whole numbers 0..4 (an image passed as labels)."""
    arr = np.asarray(labels.data)
    top = len(CLASS_NAMES) - 1
    if arr.size and (
        float(arr.min()) < 0 or float(arr.max()) > top or not np.array_equal(arr, np.round(arr))
    ):
        raise APLError(
            f"{name} is not a label volume (whole numbers 0..{top} expected, found {float(arr.min()):g} to "
            f"{float(arr.max()):g}): give label files to --labels and images to --images"
        )


def load_slice_set(
    pairs: Sequence[tuple[str, str]],
    norm: Normalization,
    spacing: Sequence[float],
    size: Sequence[int],
    stride: int,
) -> SliceSet:
    """Load paired volumes (checking shapes and affines) into one set of model-grid slices."""
    xs, ys, vi = [], [], []
    for k, (ip, lp) in enumerate(pairs):
        img, lab = load_volume(ip), load_volume(lp)
        # compared in canonical (RAS+) order: the same grid stored in another voxel order is one grid
        if tuple(img.shape) != tuple(lab.shape):
            raise APLError(
                f"{Path(ip).name} and {Path(lp).name} differ in shape: pair each image with its labels"
            )
        if not np.allclose(img.affine, lab.affine, atol=1e-3):
            raise APLError(f"{Path(ip).name} and {Path(lp).name} differ in affine: they are not on one grid")
        _check_labels(lab, Path(lp).name)
        try:
            x, y = volume_slices(img, lab, norm, spacing, size, stride)
        except GridTooLargeError as exc:  # (worded for a checkpoint; here the spacing is the user's)
            raise APLError(
                f"{Path(ip).name} resampled to --spacing {spacing[0]:g} {spacing[1]:g} mm would be "
                f"{exc.shape[0]} x {exc.shape[1]} px per slice (at most {MAX_GRID_PX}): choose a coarser "
                "--spacing"
            ) from None
        xs.append(x)
        ys.append(y)
        vi.append(torch.full((x.shape[0],), k, dtype=torch.long))
    # volumes whose field of view spans more of the model grid are never cropped: every slice is padded
    # to the largest (a crop would drop labelled organs at the edges of the larger scans)
    target = (max(x.shape[-2] for x in xs), max(x.shape[-1] for x in xs))
    xs = [_pad_hw(x, target, float(x.min())) for x in xs]
    ys = [_pad_hw(y.unsqueeze(1).float(), target, 0.0)[:, 0].long() for y in ys]
    return SliceSet(torch.cat(xs), torch.cat(ys), torch.cat(vi))


def _pad_hw(t: torch.Tensor, hw: tuple[int, int], pad: float) -> torch.Tensor:
    """Centre-pad ``(N, C, H, W)`` up to ``hw`` (training only: volumes of different sizes)."""
    _, _, h, w = t.shape
    ph, pw = hw[0] - h, hw[1] - w
    if ph == 0 and pw == 0:
        return t
    return F.pad(t, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=pad)


# --- augmentation -------------------------------------------------------------------------------------


def _smooth_field(n: int, hw: tuple[int, int], coarse: int, gen: torch.Generator, device) -> torch.Tensor:
    """Return a smooth random field ``(n, 1, H, W)`` in [-1, 1] by upsampling coarse noise."""
    f = torch.rand((n, 1, coarse, coarse), generator=gen, device=device) * 2 - 1
    return F.interpolate(f, size=hw, mode="bicubic", align_corners=False)


def random_remap(x: torch.Tensor, gen: torch.Generator, knots: int = 6) -> torch.Tensor:
    """Map intensities in [0, 1] through a random non-monotonic piecewise-linear curve per image."""
    n = x.shape[0]
    ys = torch.rand((n, knots), generator=gen, device=x.device)
    xc = x.clamp(0, 1) * (knots - 1)
    lo = xc.floor().long().clamp(0, knots - 2)
    frac = xc - lo
    flat_lo = lo.reshape(n, -1)
    y0 = torch.gather(ys, 1, flat_lo).reshape_as(x)
    y1 = torch.gather(ys, 1, flat_lo + 1).reshape_as(x)
    return y0 + (y1 - y0) * frac


def gin(x: torch.Tensor, gen: torch.Generator, layers: int = 4, width: int = 2) -> torch.Tensor:
    """Apply a random shallow convolutional network (GIN-style) and rescale to the input's range."""
    n = x.shape[0]
    out = x
    cin = 1
    for i in range(layers):
        k = 1 if i == layers - 1 else int(torch.randint(1, 3, (1,), generator=gen, device=gen.device)) * 2 + 1
        cout = 1 if i == layers - 1 else width
        w = torch.randn((n * cout, cin, k, k), generator=gen, device=x.device)
        out = F.conv2d(out.reshape(1, n * cin, *out.shape[-2:]), w, padding=k // 2, groups=n).reshape(
            n, cout, *x.shape[-2:]
        )
        if i < layers - 1:
            out = F.leaky_relu(out, 0.2)
        cin = cout
    alpha = torch.rand((n, 1, 1, 1), generator=gen, device=x.device)
    mixed = alpha * out + (1 - alpha) * x
    lo = mixed.amin(dim=(1, 2, 3), keepdim=True)
    hi = mixed.amax(dim=(1, 2, 3), keepdim=True)
    return (mixed - lo) / (hi - lo).clamp_min(1e-6)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain-randomise a batch: geometry (no left-right flip) then intensity transforms."""
    grid = random_affine_grid(x, gen)
    return augment_intensity(warp_image(x, grid), gen, cfg.remap_prob, cfg.gin_prob), warp_labels(y, grid)


def random_affine_grid(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draw a sampling grid per image of ``x``: rotation ±15°, scale 0.85..1.2, shift ±8 %, never a flip."""
    n, _, h, w = x.shape
    dev = x.device
    ang = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * math.radians(15)
    scale = 0.85 + torch.rand(n, generator=gen, device=dev) * 0.35
    shift = (torch.rand((n, 2), generator=gen, device=dev) * 2 - 1) * 0.08
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    return F.affine_grid(theta, (n, 1, h, w), align_corners=False)


def warp_image(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample images ``(N, 1, H, W)`` on ``grid`` (bilinear; outside filled with each image's minimum)."""
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg


def warp_labels(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample label maps ``(N, H, W)`` on ``grid`` (nearest; outside = background)."""
    y = F.grid_sample(y.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return y[:, 0].round().long()


def augment_intensity(
    x: torch.Tensor, gen: torch.Generator, remap_prob: float, gin_prob: float
) -> torch.Tensor:
    """Domain-randomise the intensities of a batch: remap, GIN, gamma, bias field, blur, noise.

    The transforms work on each slice stretched to [0, 1]. Slices of a clipped normalisation (within
    [0, 1]) stay so stretched; others (z-scores) go back to their own range, the one the model predicts on.
    """
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    x = _intensity_transforms(x, gen, remap_prob, gin_prob)
    unclipped = (lo < 0) | (hi > 1)
    return torch.where(unclipped, x * (hi - lo) + lo, x) if bool(unclipped.any()) else x


def _intensity_transforms(
    x: torch.Tensor, gen: torch.Generator, remap_prob: float, gin_prob: float
) -> torch.Tensor:
    """``augment_intensity``'s transforms of slices on [0, 1]."""
    n, _, h, w = x.shape
    dev = x.device
    # (both transforms are computed for the whole batch, then picked per image; skipped when never picked)
    if remap_prob > 0:
        r = torch.rand((n, 1, 1, 1), generator=gen, device=dev)
        x = torch.where(r < remap_prob, random_remap(x, gen), x)
    if gin_prob > 0:
        r = torch.rand((n, 1, 1, 1), generator=gen, device=dev)
        x = torch.where(r < gin_prob, gin(x, gen), x)
    gamma = torch.exp((torch.rand((n, 1, 1, 1), generator=gen, device=dev) * 2 - 1) * 0.5)
    x = x.clamp(0, 1) ** gamma
    bias = 1 + 0.3 * _smooth_field(n, (h, w), 4, gen, dev)
    x = x * bias
    blur = torch.rand(n, generator=gen, device=dev) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25], device=dev)
        kern = (k[:, None] * k[None, :]).reshape(1, 1, 3, 3)
        x = torch.where(blur.reshape(-1, 1, 1, 1), F.conv2d(x, kern, padding=1), x)
    noise = torch.rand((n, 1, 1, 1), generator=gen, device=dev) * 0.08
    return x + noise * torch.randn(x.shape, generator=gen, device=dev)


# --- training -----------------------------------------------------------------------------------------


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return cross-entropy plus soft Dice (over the organ classes) for one head."""
    ce = F.cross_entropy(logits, target)
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1) / (denom + 1)
    return ce + (1 - dice[1:]).mean()


@dataclass
class TrainEvent:
    """Progress of source training, one per batch."""

    epoch: int
    step: int
    steps: int
    loss: float


def _state_path(out: Path) -> Path:
    """Return the resumable training-state file that sits beside the output checkpoint."""
    return out.with_name(out.name + ".train-state")


def train_source(
    pairs: Sequence[tuple[str, str]],
    out: str | Path,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = True,
    stop: Callable[[], bool] | None = None,
) -> Generator[TrainEvent, None, tuple[DualHeadNet, CheckpointMeta]]:
    """Train a dual-head model on labelled source pairs; resumes from its last finished epoch.

    After every epoch the model, optimiser and RNG state are saved (atomically) beside ``out`` so an
    interrupted run goes on where it stopped; the final checkpoint is written to ``out``.
    """
    out = Path(out)
    from .io_utils import check_output_path

    cfg.validate()
    check_output_path(out, overwrite=overwrite, inputs=tuple(f for pair in pairs for f in pair))
    dev = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    norm = get_preset(cfg.normalization)
    model = build_model(cfg.arch, num_classes=len(CLASS_NAMES), **cfg.arch_args)
    stride = int(model.stride)
    if any(int(v) % stride for v in cfg.input_size):  # (the checkpoint could not be loaded afterwards)
        h, w = cfg.input_size
        raise APLError(
            f"input size {h} x {w} is not a multiple of {cfg.arch}'s stride {stride}: give --input-size "
            f"a multiple of {stride} (e.g. {max(stride, round(h / stride) * stride)})"
        )
    data = load_slice_set(pairs, norm, cfg.spacing, cfg.input_size, model.stride)
    model.to(dev)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n = data.images.shape[0]
    steps = cfg.iters_per_epoch or max(1, math.ceil(n / cfg.batch_size))
    total_steps = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    start_epoch = 0
    state_file = _state_path(out)
    config_key = _cfg_key(cfg, pairs)  # (once: it reads every volume's bytes)
    if resume and state_file.exists():
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
            if st.get("config") != config_key:
                raise CheckpointError(
                    f"{state_file} was left by a run with other settings or other volumes (or by an "
                    "earlier napari-apl): delete it to start afresh, or resume with the same settings "
                    "and volumes"
                )
            planned = st.get("epochs")  # (absent from the state files of earlier versions)
            if planned is not None and int(planned) != cfg.epochs:
                raise CheckpointError(
                    f"{state_file} was left by a run of {int(planned)} epochs ({int(st['epoch'])} done), "
                    f"its learning rate scheduled over them: resume with --epochs {int(planned)}, or "
                    "delete it to start afresh"
                )
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            gen.set_state(st["rng"])
            # the global generators (dropout draws from them): absent from earlier versions' state files
            if "torch_rng" in st:
                torch.set_rng_state(st["torch_rng"])
            if "cuda_rng" in st and dev.type == "cuda":
                torch.cuda.set_rng_state(st["cuda_rng"], dev)
            start_epoch = int(st["epoch"])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot resume from {state_file} ({exc}): delete it to start afresh"
            ) from exc
    with retained_heap():  # freed activations stay in the process for the next step
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            for step in range(steps):
                idx = perm[(step * cfg.batch_size) % n :][: cfg.batch_size]
                if idx.numel() < cfg.batch_size:
                    idx = torch.cat([idx, perm[: cfg.batch_size - idx.numel()]])
                x, y = data.images[idx], data.labels[idx]
                if cfg.augment:
                    x, y = augment_batch(x, y, gen, cfg)
                x, y = x.to(dev).contiguous(memory_format=fmt), y.to(dev)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    main, aux = model(x)
                main, aux = main.float(), aux.float()
                loss = seg_loss(main, y) + cfg.aux_weight * seg_loss(aux, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                sched.step()
                yield TrainEvent(epoch=epoch + 1, step=step + 1, steps=steps, loss=float(loss.detach()))
                if stop is not None and stop():
                    model = model.to(memory_format=torch.contiguous_format).eval()
                    return model, _meta(cfg, norm, pairs, epoch)
            _refuse_diverged(model, out, state_file)  # before its weights become the state to resume from
            state = {
                "config": config_key,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {}),
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
            }
            atomic_write(state_file, lambda p, s=state: torch_save_file(s, p), overwrite=True)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    _refuse_diverged(model, out, state_file)
    meta = _meta(cfg, norm, pairs, cfg.epochs)
    save_checkpoint(out, model, meta, overwrite=overwrite)
    state_file.unlink(missing_ok=True)
    return model, meta


def _epochs_done(state_file: Path) -> int | None:
    """The finished epochs a resumable training state holds (``None`` if there is no readable one)."""
    try:
        return int(torch.load(state_file, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return None


def _refuse_diverged(model: torch.nn.Module, out: Path, state_file: Path) -> None:
    """Stop a run whose weights are no longer finite; its resume state goes too (resuming it would
    diverge again, and a state of other settings would refuse the lower learning rate the error asks for)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        state_file.unlink(missing_ok=True)
        raise APLError(
            f"training diverged: {len(bad)} weight tensors hold NaN or infinite values ({bad[0]}, ...); "
            f"nothing was written to {out}: train again with a lower --lr"
        )


def _cfg_key(cfg: TrainConfig, pairs: Sequence[tuple[str, str]] = ()) -> str:
    """Return what must match for a resumed run (the settings and the volumes), as a string.

    The volumes count by file name, size and a digest of their bytes (not by folder, so a data folder
    that moved still resumes; uncompressed files of one shape all have one size).
    """
    import json

    d = asdict(cfg)
    d.pop("device", None)
    d.pop("epochs", None)
    d["volumes"] = [[Path(f).name, os.path.getsize(f), _file_digest(f)] for pair in pairs for f in pair]
    return json.dumps(d, sort_keys=True, default=list)


def _file_digest(path: str | os.PathLike) -> str:
    """A digest of a file's bytes (BLAKE2b, 128 bits; about a second per GB)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _meta(
    cfg: TrainConfig, norm: Normalization, pairs: Sequence[tuple[str, str]], epochs: int
) -> CheckpointMeta:
    """Build the checkpoint metadata of a trained source model."""
    model_args = dict(cfg.arch_args)
    return CheckpointMeta(
        format_version=FORMAT_VERSION,
        arch=cfg.arch,
        arch_args={"num_classes": len(CLASS_NAMES), **model_args},
        class_names=list(CLASS_NAMES),
        input_size=tuple(cfg.input_size),
        spacing=tuple(cfg.spacing),
        normalization=norm.to_dict(),
        provenance={
            "trained_by": "napari-apl train-source",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source_volumes": len(pairs),
            "source_files": [Path(p[0]).name for p in pairs][:50],
            "epochs": epochs,
            "seed": cfg.seed,
            "augmentation": (
                "intensity remap, GIN, gamma, noise, blur, bias field; rotate/scale/shift, no flips"
                if cfg.augment
                else "none"
            ),
        },
    )


def train_source_cli(args: Any) -> int:
    """Run ``napari-apl train-source`` with a progress bar."""
    from tqdm import tqdm

    pairs = pair_files(args.images, args.labels, check_names=not args.pair_by_order)
    cfg = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        spacing=tuple(args.spacing),
        input_size=tuple(args.input_size),
        normalization=args.normalize,
        seed=args.seed,
        device=args.device,
        channels_last=args.channels_last,
        amp=args.amp,
    )
    gen = train_source(pairs, args.out, cfg, overwrite=args.overwrite)
    bar = None
    try:
        while True:
            ev = next(gen)
            if bar is None:
                bar = tqdm(
                    total=ev.steps * cfg.epochs,
                    initial=(ev.epoch - 1) * ev.steps,
                    desc="train-source",
                    disable=args.quiet,
                    file=sys.stderr,
                )
                if ev.epoch > 1:  # (on its own line, above the bar)
                    state = _state_path(Path(args.out))
                    bar.write(f"resuming at epoch {ev.epoch} from {state}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(epoch=ev.epoch, loss=f"{ev.loss:.3f}")
    except StopIteration:
        pass
    except KeyboardInterrupt:
        if bar is not None:  # the message goes on its own line, below the bar
            bar.close()
            bar = None
        state = _state_path(Path(args.out))
        done = _epochs_done(state)  # (what the state holds: the last event shown may be a step behind)
        if done is not None and done >= cfg.epochs:  # after the last epoch, while the model was written
            print(
                f"interrupted while writing {args.out}: all {done} epochs are kept in {state}; the same "
                "command writes the model from there",
                file=sys.stderr,
            )
        elif done:
            print(
                f"interrupted in epoch {done + 1}: the {done} finished epoch{'s are' if done > 1 else ' is'} "
                f"kept in {state}; the same command resumes from there (delete that file to start afresh)",
                file=sys.stderr,
            )
        raise
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {args.out}")
    return 0
